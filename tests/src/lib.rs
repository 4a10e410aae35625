//! Harness for Meshgram's cross-process tests: start the real binaries, drive them through their
//! command lines, kill them.
//!
//! Layout, in the order a test uses it:
//! - [`bin_path`]: where `cargo build` put a binary (`target/<profile>/<name>`).
//! - [`Server`]: a long-running binary that prints a JSON ready line on stdout; its stderr goes to
//!   the test's output (shown when the test fails); SIGKILLed on drop.
//! - [`Gateway`] (built by [`GatewayBuilder`]): a `meshgram-gateway` in its own temp dir with a
//!   code sink, and sign-in helpers that type the code the gateway "texted" into `meshgram login`.
//! - [`run`], [`meshgram`], [`meshgram_stdin`], [`CliChild`]: one-shot commands under a hard
//!   timeout, returning a [`CliOutput`] whose `--json` result or error the test inspects.
//! - [`read_codes`], [`wait_code`]: the file code sink; [`WebhookSink`]: a local HTTP server
//!   standing in for an SMS provider.
//! - [`http_get`]: a minimal blocking HTTP/1 GET for the health and metrics endpoints.
//!
//! Every wait is bounded, so a hung binary fails its test instead of hanging the suite.

use std::fmt;
use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use libp2p::identity::ed25519;
use meshgram_node::crypto::cert::RelayCert;
/// Seconds since the Unix epoch.
pub use meshgram_node::crypto::cert::unix_now;
use meshgram_node::crypto::identity::load_or_create_ed25519;
use meshgram_node::defaults::{RELAY_CERT_FILE, RELAY_KEY_FILE};
use serde_json::Value;
use tempfile::TempDir;

/// How long a server may take to print its ready line (a cold debug binary opening redb).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one CLI command may take; the CLI's own request timeout is 30 s, so a command that
/// is still running after this is hung.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for a login code to reach a sink after `login` started.
pub const CODE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often bounded waits look again.
const POLL: Duration = Duration::from_millis(20);
/// How long to wait for an output-forwarding thread after its process is gone.
const PIPE_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The gateway binary's name.
pub const GATEWAY_BIN: &str = "meshgram-gateway";
/// The user CLI's name.
pub const CLI_BIN: &str = "meshgram";

// ---------------------------------------------------------------------------------------------
// Finding binaries

/// The cargo target directory: `$CARGO_TARGET_DIR` (relative to the workspace root when
/// relative) or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = manifest.parent().unwrap_or(manifest);
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if Path::new(&dir).is_absolute() => PathBuf::from(dir),
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    }
}

/// Path of a built workspace binary in `target/<profile>/`, where `<profile>` is `debug` unless
/// `MESHGRAM_PROFILE_DIR_NAME` names another (e.g. `release`).
///
/// `CARGO_BIN_EXE_*` is only set inside a binary's own package, hence this lookup.
pub fn bin_path(name: &str) -> PathBuf {
    let profile = std::env::var("MESHGRAM_PROFILE_DIR_NAME").unwrap_or_else(|_| "debug".to_string());
    let path = target_dir().join(profile).join(name);
    assert!(
        path.is_file(),
        "{} does not exist: run `cargo build --workspace --bins` first \
         (set MESHGRAM_PROFILE_DIR_NAME=release to test a release build)",
        path.display()
    );
    path
}

// ---------------------------------------------------------------------------------------------
// Long-running servers

/// A running server binary that announced itself with a `{"event":"ready",...}` line.
/// Dropping it SIGKILLs the process.
#[derive(Debug)]
pub struct Server {
    child: Child,
    /// The parsed ready line.
    pub ready: Value,
    /// The value of its `--data` flag, if it had one.
    pub data_dir: PathBuf,
    name: String,
    forwarders: Vec<JoinHandle<()>>,
}

/// What the stdout scanner reports until the ready line.
enum StdoutLine {
    Ready(Value),
    Other(String),
}

impl Server {
    /// Spawns `bin args…` and waits up to [`READY_TIMEOUT`] for its ready line.
    pub fn start(bin: &Path, args: &[&str]) -> anyhow::Result<Server> {
        let name = bin.file_name().map_or_else(|| bin.display().to_string(), |n| n.to_string_lossy().into_owned());
        let data_dir = args.iter().position(|a| *a == "--data").and_then(|i| args.get(i + 1)).map(PathBuf::from);
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {} {}", bin.display(), args.join(" ")))?;
        let stdout = child.stdout.take().context("stdout is piped")?;
        let stderr = child.stderr.take().context("stderr is piped")?;
        let (ready_tx, ready_rx) = mpsc::sync_channel(64);
        let stderr_label = format!("{name} stderr");
        let stdout_label = format!("{name} stdout");
        let forwarders = vec![
            thread::spawn(move || forward_lines(stderr, &stderr_label)),
            thread::spawn(move || scan_stdout(stdout, &stdout_label, ready_tx)),
        ];
        // Built before waiting so that any early return kills the process in `Drop`.
        let mut server = Server { child, ready: Value::Null, data_dir: data_dir.unwrap_or_default(), name, forwarders };
        server.ready = server.wait_ready(&ready_rx)?;
        Ok(server)
    }

    fn wait_ready(&mut self, lines: &mpsc::Receiver<StdoutLine>) -> anyhow::Result<Value> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut seen = Vec::new();
        loop {
            match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(StdoutLine::Ready(ready)) => return Ok(ready),
                Ok(StdoutLine::Other(line)) => seen.push(line),
                Err(RecvTimeoutError::Timeout) => {
                    bail!("{} printed no ready line within {READY_TIMEOUT:?}; stdout so far: {seen:?}", self.name)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = wait_exit(&mut self.child, Duration::from_secs(5))
                        .map_or_else(|| "still running".to_string(), |s| s.to_string());
                    bail!("{} closed stdout ({status}) before its ready line; stdout: {seen:?}", self.name)
                }
            }
        }
    }

    /// SIGTERM, then waits (bounded) for a clean exit; returns its status.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let status = wait_exit(&mut self.child, Duration::from_secs(20));
        for forwarder in self.forwarders.drain(..) {
            join_bounded(forwarder);
        }
        status
    }

    /// Kills the process with SIGKILL (no clean shutdown) and reaps it.
    pub fn kill9(&mut self) {
        // Errors mean it is already dead and reaped, which is what we want.
        let _ = self.child.kill();
        let _ = self.child.wait();
        for forwarder in self.forwarders.drain(..) {
            join_bounded(forwarder);
        }
    }

    /// `peer_id` from the ready line.
    pub fn peer_id(&self) -> String {
        self.ready["peer_id"]
            .as_str()
            .unwrap_or_else(|| panic!("ready line has no peer_id: {}", self.ready))
            .to_string()
    }

    /// `listen` from the ready line (each ends in `/p2p/<peer_id>`).
    pub fn listen_addrs(&self) -> Vec<String> {
        let Some(addrs) = self.ready["listen"].as_array() else {
            panic!("ready line has no listen array: {}", self.ready)
        };
        addrs
            .iter()
            .map(|a| a.as_str().unwrap_or_else(|| panic!("listen entry {a} is not a string")).to_string())
            .collect()
    }

    /// `http` from the ready line (`http://127.0.0.1:PORT`).
    pub fn http(&self) -> Option<String> {
        self.ready["http"].as_str().map(str::to_string)
    }

    /// The first listen address containing `needle` (e.g. `/tcp/` or `/quic-v1`).
    pub fn listen_addr(&self, needle: &str) -> String {
        let addrs = self.listen_addrs();
        addrs
            .iter()
            .find(|a| a.contains(needle))
            .unwrap_or_else(|| panic!("no {needle} address among {addrs:?}"))
            .clone()
    }

    /// The TCP listen address, ending in `/p2p/<peer_id>`.
    pub fn tcp_addr(&self) -> String {
        self.listen_addr("/tcp/")
    }

    /// The QUIC listen address, ending in `/p2p/<peer_id>`.
    pub fn quic_addr(&self) -> String {
        self.listen_addr("/quic-v1")
    }

    /// The port of [`Server::tcp_addr`].
    pub fn tcp_port(&self) -> u16 {
        let addr = self.tcp_addr();
        let parts: Vec<&str> = addr.split('/').collect();
        parts
            .iter()
            .position(|p| *p == "tcp")
            .and_then(|i| parts.get(i + 1))
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("no tcp port in {addr}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Copies a server's stdout to the test output and reports lines until the ready line.
fn scan_stdout(stdout: impl Read, label: &str, ready_tx: SyncSender<StdoutLine>) {
    let mut ready_tx = Some(ready_tx);
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        eprintln!("[{label}] {line}");
        if let Some(tx) = &ready_tx {
            let ready = serde_json::from_str::<Value>(&line).ok().filter(|v| v["event"] == "ready");
            let is_ready = ready.is_some();
            let report = ready.map_or(StdoutLine::Other(line), StdoutLine::Ready);
            // After the ready line (or once nobody listens) only forwarding remains.
            if tx.send(report).is_err() || is_ready {
                ready_tx = None;
            }
        }
    }
}

/// Copies lines to the test output, which libtest shows when the test fails.
fn forward_lines(from: impl Read, label: &str) {
    for line in BufReader::new(from).lines() {
        let Ok(line) = line else { break };
        eprintln!("[{label}] {line}");
    }
}

/// Joins a pipe-reading thread, giving up (detaching it) if the pipe stays open, e.g. because a
/// grandchild inherited it.
fn join_bounded<T>(handle: JoinHandle<T>) -> Option<T> {
    let deadline = Instant::now() + PIPE_DRAIN_TIMEOUT;
    while !handle.is_finished() {
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(POLL);
    }
    handle.join().ok()
}

/// Waits up to `timeout` for the child to exit.
fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
            Ok(None) | Err(_) => return None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One-shot commands

/// What a finished command printed.
#[derive(Debug)]
pub struct CliOutput {
    /// The command line, for failure messages.
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// Asserts success and parses stdout as one JSON document.
    pub fn ok_json(&self) -> Value {
        assert!(self.status.success(), "expected success:\n{self}");
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{self}"))
    }

    /// Asserts exit status 1 with a `{"error":{"code":..,"message":..}}` document on stdout, and
    /// returns the `error` object.
    pub fn err_json(&self) -> Value {
        assert_eq!(self.status.code(), Some(1), "expected exit status 1 (an error):\n{self}");
        let doc: Value = serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("error output is not JSON ({e}):\n{self}"));
        let error = doc.get("error").cloned().unwrap_or_else(|| panic!("stdout has no `error` object:\n{self}"));
        assert!(error["code"].is_string(), "error has no string `code`:\n{self}");
        assert!(
            error["message"].as_str().is_some_and(|m| !m.trim().is_empty()),
            "error has no human-readable `message`:\n{self}"
        );
        error
    }

    /// Asserts the command failed with one of `codes`, returning the `error` object.
    pub fn expect_err(&self, codes: &[&str]) -> Value {
        let error = self.err_json();
        let code = error["code"].as_str().unwrap_or_default();
        assert!(codes.contains(&code), "expected error code {codes:?}, got {code}:\n{self}");
        error
    }

    /// Asserts a `FLOOD_WAIT` error with `0 < retry_after <= max_secs`; returns `retry_after`.
    pub fn expect_flood_wait(&self, max_secs: u64) -> u64 {
        let error = self.expect_err(&["FLOOD_WAIT"]);
        let retry = error["retry_after"].as_u64().unwrap_or_else(|| panic!("FLOOD_WAIT without retry_after:\n{self}"));
        assert!(retry > 0 && retry <= max_secs, "retry_after {retry} not in 1..={max_secs}:\n{self}");
        retry
    }
}

impl fmt::Display for CliOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "$ {}\n{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command, self.status, self.stdout, self.stderr
        )
    }
}

/// A command still running, with its stdin open for answering prompts.
#[derive(Debug)]
pub struct CliChild {
    command: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
    deadline: Instant,
    reaped: bool,
}

impl CliChild {
    /// Starts `bin args…` with piped stdin, stdout and stderr; it must end within [`CLI_TIMEOUT`].
    pub fn spawn(bin: &Path, args: &[&str]) -> CliChild {
        let command =
            format!("{} {}", bin.display(), args.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(" "));
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn `{command}`: {e}"));
        let stdout = child.stdout.take().map(|out| thread::spawn(move || read_all(out)));
        let stderr = child.stderr.take().map(|err| thread::spawn(move || read_all(err)));
        let stdin = child.stdin.take();
        CliChild { command, child, stdin, stdout, stderr, deadline: Instant::now() + CLI_TIMEOUT, reaped: false }
    }

    /// Whether the process has ended.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Writes `line` and a newline to stdin. A process that already exited (broken pipe) is
    /// not an error here: [`CliChild::finish`] reports what it said.
    pub fn write_line(&mut self, line: &str) {
        let Some(stdin) = self.stdin.as_mut() else {
            return;
        };
        match writeln!(stdin, "{line}").and_then(|()| stdin.flush()) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::BrokenPipe => {}
            Err(e) => panic!("writing to stdin of `{}`: {e}", self.command),
        }
    }

    /// Closes stdin and waits for the exit (killing the process and panicking on timeout).
    pub fn finish(mut self) -> CliOutput {
        drop(self.stdin.take());
        let status = wait_exit(&mut self.child, self.deadline.saturating_duration_since(Instant::now()));
        let Some(status) = status else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.reaped = true;
            let (stdout, stderr) = self.collect();
            panic!(
                "`{}` did not finish within {CLI_TIMEOUT:?}; killed it\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
                self.command
            );
        };
        self.reaped = true;
        let (stdout, stderr) = self.collect();
        CliOutput { command: self.command.clone(), status, stdout, stderr }
    }

    fn collect(&mut self) -> (String, String) {
        let text =
            |h: Option<JoinHandle<String>>| h.and_then(join_bounded).unwrap_or_else(|| "<pipe still open>".into());
        (text(self.stdout.take()), text(self.stderr.take()))
    }
}

impl Drop for CliChild {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn read_all(mut from: impl Read) -> String {
    let mut bytes = Vec::new();
    // A read error ends the capture; whatever arrived is still worth showing.
    let _ = from.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Runs `bin args…` to completion under [`CLI_TIMEOUT`], feeding it `stdin` (then EOF).
pub fn run(bin: &Path, args: &[&str], stdin: Option<&str>) -> CliOutput {
    let mut child = CliChild::spawn(bin, args);
    if let Some(text) = stdin
        && let Some(pipe) = child.stdin.as_mut()
    {
        match pipe.write_all(text.as_bytes()) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::BrokenPipe => {}
            Err(e) => panic!("writing to stdin of `{}`: {e}", child.command),
        }
    }
    child.finish()
}

/// `meshgram --profile <profile> --json <args…>` prefixed argument list.
fn cli_args<'a>(profile: &'a Path, args: &[&'a str]) -> Vec<&'a str> {
    let profile = profile.to_str().unwrap_or_else(|| panic!("profile path {} is not UTF-8", profile.display()));
    let mut all = vec!["--profile", profile, "--json"];
    all.extend_from_slice(args);
    all
}

/// Runs `meshgram --profile <profile> --json <args…>` with an empty stdin.
pub fn meshgram(profile: &Path, args: &[&str]) -> CliOutput {
    run(&bin_path(CLI_BIN), &cli_args(profile, args), None)
}

/// Like [`meshgram`], writing `stdin_text` to its stdin first.
pub fn meshgram_stdin(profile: &Path, args: &[&str], stdin_text: &str) -> CliOutput {
    run(&bin_path(CLI_BIN), &cli_args(profile, args), Some(stdin_text))
}

/// Starts `meshgram --profile <profile> --json <args…>` for a test that answers its prompts.
pub fn spawn_meshgram(profile: &Path, args: &[&str]) -> CliChild {
    CliChild::spawn(&bin_path(CLI_BIN), &cli_args(profile, args))
}

// ---------------------------------------------------------------------------------------------
// Code sinks

/// Every `(phone, code)` in a file code sink, oldest first. A missing file has none; a line
/// still being written is skipped.
pub fn read_codes(sink: &Path) -> Vec<(String, String)> {
    let text = match fs::read_to_string(sink) {
        Ok(text) => text,
        Err(e) if e.kind() == ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("reading code sink {}: {e}", sink.display()),
    };
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|entry| Some((entry["phone"].as_str()?.to_string(), entry["code"].as_str()?.to_string())))
        .collect()
}

/// Waits up to [`CODE_TIMEOUT`] for the `nth` (0-based) code sent to `phone`.
pub fn wait_code(sink: &Path, phone: &str, nth: usize) -> String {
    let deadline = Instant::now() + CODE_TIMEOUT;
    loop {
        let codes: Vec<String> = read_codes(sink).into_iter().filter(|(p, _)| p == phone).map(|(_, c)| c).collect();
        if let Some(code) = codes.get(nth) {
            return code.clone();
        }
        if Instant::now() >= deadline {
            let raw = fs::read_to_string(sink).unwrap_or_else(|e| format!("<{e}>"));
            panic!("code #{nth} for {phone} did not reach {} within {CODE_TIMEOUT:?}; file:\n{raw}", sink.display());
        }
        thread::sleep(POLL);
    }
}

/// A code that is certainly not `code`: every digit changed, same length.
pub fn wrong_code(code: &str) -> String {
    code.chars().map(|c| c.to_digit(10).and_then(|d| char::from_digit((d + 1) % 10, 10)).unwrap_or('0')).collect()
}

/// A local HTTP server standing in for an SMS provider: records every JSON body POSTed to
/// `/sms` and answers with a fixed status.
#[derive(Debug)]
pub struct WebhookSink {
    url: String,
    posts: Arc<Mutex<Vec<Value>>>,
    /// Owns the server task; dropping the runtime stops it.
    _runtime: tokio::runtime::Runtime,
}

#[derive(Debug)]
struct WebhookState {
    status: StatusCode,
    posts: Arc<Mutex<Vec<Value>>>,
}

impl WebhookSink {
    /// Serves on `127.0.0.1:0`, answering every POST with `status`.
    pub fn start(status: u16) -> anyhow::Result<WebhookSink> {
        let status = StatusCode::from_u16(status).context("webhook status")?;
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).context("bind webhook sink")?;
        let url = format!("http://{}/sms", listener.local_addr()?);
        let posts = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(WebhookState { status, posts: posts.clone() });
        let app = Router::new().route("/sms", post(receive_sms)).with_state(state);
        runtime.spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("[webhook sink] server failed: {e}");
            }
        });
        Ok(WebhookSink { url, posts, _runtime: runtime })
    }

    /// The URL to pass as `--code-sink webhook:<url>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Bodies received so far (non-JSON bodies as JSON strings).
    pub fn posts(&self) -> Vec<Value> {
        self.posts.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// `POST /sms`: records the body.
async fn receive_sms(State(state): State<Arc<WebhookState>>, body: Bytes) -> StatusCode {
    let post =
        serde_json::from_slice(&body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    state.posts.lock().unwrap_or_else(PoisonError::into_inner).push(post);
    state.status
}

// ---------------------------------------------------------------------------------------------
// The gateway

/// Where a [`Gateway`] sends its login codes.
#[derive(Debug)]
enum CodeSource {
    File(PathBuf),
    Webhook(WebhookSink),
}

/// Options for [`Gateway`]; `Gateway::builder().config("…").start()`.
#[derive(Debug, Default)]
pub struct GatewayBuilder {
    config: Option<String>,
    webhook_status: Option<u16>,
    args: Vec<String>,
}

impl GatewayBuilder {
    /// Writes this TOML to a file and passes `--config FILE`.
    pub fn config(mut self, toml: &str) -> Self {
        self.config = Some(toml.to_string());
        self
    }

    /// Sends codes to a [`WebhookSink`] answering `status` instead of a file.
    pub fn webhook(mut self, status: u16) -> Self {
        self.webhook_status = Some(status);
        self
    }

    /// An extra command-line argument (e.g. `--cert-ttl-secs`, `900`).
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_string());
        self
    }

    /// Starts the gateway, panicking if it does not become ready.
    pub fn start(self) -> Gateway {
        let tmp = tempfile::Builder::new().prefix("meshgram-test-").tempdir().expect("create a temp dir");
        let data_dir = tmp.path().join("gw");
        let codes = match self.webhook_status {
            Some(status) => CodeSource::Webhook(WebhookSink::start(status).expect("start the webhook sink")),
            None => CodeSource::File(tmp.path().join("codes.log")),
        };
        let sink_arg = match &codes {
            CodeSource::File(path) => format!("file:{}", path.display()),
            CodeSource::Webhook(sink) => format!("webhook:{}", sink.url()),
        };
        let mut fixed_args =
            vec!["--data".to_string(), data_dir.display().to_string(), "--code-sink".to_string(), sink_arg];
        if let Some(toml) = &self.config {
            let path = tmp.path().join("gateway.toml");
            fs::write(&path, toml).expect("write the gateway config");
            fixed_args.extend(["--config".to_string(), path.display().to_string()]);
        }
        fixed_args.extend(self.args);
        let server = start_gateway(&fixed_args, 0).unwrap_or_else(|e| panic!("gateway did not start: {e:#}"));
        Gateway { server, codes, data_dir, fixed_args, tmp }
    }
}

/// Starts `meshgram-gateway` on loopback: TCP on `tcp_port` (0 = any), QUIC and HTTP on any port.
fn start_gateway(fixed_args: &[String], tcp_port: u16) -> anyhow::Result<Server> {
    let tcp = format!("/ip4/127.0.0.1/tcp/{tcp_port}");
    let mut args: Vec<&str> = fixed_args.iter().map(String::as_str).collect();
    args.extend(["--listen", &tcp, "--listen", "/ip4/127.0.0.1/udp/0/quic-v1", "--http", "127.0.0.1:0"]);
    Server::start(&bin_path(GATEWAY_BIN), &args)
}

/// A running gateway in its own temp dir, with helpers to sign people in through the CLI.
/// Dropping it kills the gateway, then deletes the dir.
#[derive(Debug)]
pub struct Gateway {
    /// The process and its ready line.
    pub server: Server,
    codes: CodeSource,
    data_dir: PathBuf,
    /// Arguments kept across restarts (everything but listen addresses).
    fixed_args: Vec<String>,
    tmp: TempDir,
}

impl Gateway {
    /// A gateway with default settings and a file code sink.
    pub fn start() -> Gateway {
        GatewayBuilder::default().start()
    }

    /// Options for a gateway.
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder::default()
    }

    /// The address clients dial (TCP, ending in `/p2p/<peer_id>`).
    pub fn addr(&self) -> String {
        self.server.tcp_addr()
    }

    /// Its `--data` dir.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The temp dir holding data, config, sink and profiles.
    pub fn tmp(&self) -> &Path {
        self.tmp.path()
    }

    /// The file code sink, unless codes go to a webhook.
    pub fn code_sink_file(&self) -> Option<&Path> {
        match &self.codes {
            CodeSource::File(path) => Some(path),
            CodeSource::Webhook(_) => None,
        }
    }

    /// The webhook sink, if codes go to one.
    pub fn webhook(&self) -> Option<&WebhookSink> {
        match &self.codes {
            CodeSource::Webhook(sink) => Some(sink),
            CodeSource::File(_) => None,
        }
    }

    /// A new, empty profile dir for one device.
    pub fn new_profile(&self, name: &str) -> PathBuf {
        let dir = self.tmp.path().join("profiles").join(name);
        assert!(!dir.exists(), "profile {name} already exists in this test");
        fs::create_dir_all(&dir).expect("create a profile dir");
        dir
    }

    /// Every code sent to `phone` so far, oldest first.
    pub fn codes_for(&self, phone: &str) -> Vec<String> {
        match &self.codes {
            CodeSource::File(path) => {
                read_codes(path).into_iter().filter(|(p, _)| p == phone).map(|(_, c)| c).collect()
            }
            CodeSource::Webhook(sink) => sink
                .posts()
                .iter()
                .filter(|post| post["phone"] == phone)
                .filter_map(|post| post["code"].as_str().map(str::to_string))
                .collect(),
        }
    }

    /// Waits for code number `nth` for `phone`; `None` if `login` exited first (its code request
    /// was refused).
    fn wait_new_code(&self, phone: &str, nth: usize, login: &mut CliChild) -> Option<String> {
        let deadline = Instant::now() + CODE_TIMEOUT;
        loop {
            let exited = login.has_exited();
            // Looked up after the exit check, so a code sent just before exiting is seen.
            if let Some(code) = self.codes_for(phone).get(nth) {
                return Some(code.clone());
            }
            if exited {
                return None;
            }
            assert!(
                Instant::now() < deadline,
                "no code for {phone} reached the sink within {CODE_TIMEOUT:?} while `{}` waits",
                login.command
            );
            thread::sleep(POLL);
        }
    }

    /// Runs `meshgram login <gateway_args> --phone PHONE <extra…>`, and once the code arrives
    /// writes the lines `answer(code)` returns (the code, maybe a password) to its stdin. If
    /// the CLI exits before a code is sent, `answer` is not called.
    pub fn login_via(
        &self,
        gateway_args: &[&str],
        profile: &Path,
        phone: &str,
        extra: &[&str],
        answer: impl FnOnce(&str) -> Vec<String>,
    ) -> CliOutput {
        let codes_before = self.codes_for(phone).len();
        let mut args = vec!["login"];
        args.extend_from_slice(gateway_args);
        args.extend(["--phone", phone]);
        args.extend_from_slice(extra);
        let mut login = spawn_meshgram(profile, &args);
        if let Some(code) = self.wait_new_code(phone, codes_before, &mut login) {
            for line in answer(&code) {
                login.write_line(&line);
            }
        }
        login.finish()
    }

    /// [`Gateway::login_via`] this gateway's TCP address.
    pub fn login_with(
        &self,
        profile: &Path,
        phone: &str,
        extra: &[&str],
        answer: impl FnOnce(&str) -> Vec<String>,
    ) -> CliOutput {
        let addr = self.addr();
        self.login_via(&["--gateway", &addr], profile, phone, extra, answer)
    }

    /// Signs `phone` in on `profile` with the code from the sink; returns the login JSON.
    pub fn login(&self, profile: &Path, phone: &str) -> Value {
        self.login_with(profile, phone, &[], |code| vec![code.to_string()]).ok_json()
    }

    /// `meshgram login --gateway ADDR --bot-token TOKEN`.
    pub fn login_bot(&self, profile: &Path, token: &str) -> CliOutput {
        meshgram(profile, &["login", "--gateway", &self.addr(), "--bot-token", token])
    }

    /// `meshgram-gateway --data DIR <args…>`: the operator's admin commands against this
    /// running gateway.
    pub fn operator(&self, args: &[&str]) -> CliOutput {
        let data = self.data_dir.display().to_string();
        let mut all = vec!["--data", data.as_str()];
        all.extend_from_slice(args);
        run(&bin_path(GATEWAY_BIN), &all, None)
    }

    /// SIGKILLs the gateway (no clean shutdown).
    pub fn kill9(&mut self) {
        self.server.kill9();
    }

    /// SIGKILLs the gateway and starts it again on the same data dir and the same TCP port, so
    /// that addresses saved in profiles stay valid. Retries briefly in case the port is not
    /// free again yet.
    pub fn restart_same_port(&mut self) {
        let port = self.server.tcp_port();
        self.server.kill9();
        let mut last_error = None;
        for _ in 0..10 {
            match start_gateway(&self.fixed_args, port) {
                Ok(server) => {
                    self.server = server;
                    return;
                }
                Err(e) => {
                    last_error = Some(e);
                    thread::sleep(Duration::from_millis(300));
                }
            }
        }
        panic!("gateway did not restart on tcp port {port}: {last_error:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers

/// Whether `token` has Telegram's bot token shape: `^\d+:[A-Za-z0-9_-]{35}$`.
pub fn is_bot_token(token: &str) -> bool {
    let Some((id, secret)) = token.split_once(':') else {
        return false;
    };
    !id.is_empty()
        && id.chars().all(|c| c.is_ascii_digit())
        && secret.len() == 35
        && secret.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The elements of a JSON array, panicking with `what` if it is not one.
pub fn array(value: &Value, what: &str) -> Vec<Value> {
    value.as_array().unwrap_or_else(|| panic!("{what} is not a JSON array: {value}")).clone()
}

/// A string field, panicking if absent.
pub fn str_field<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key].as_str().unwrap_or_else(|| panic!("`{key}` is not a string in {value}"))
}

/// A number field, panicking if absent.
pub fn u64_field(value: &Value, key: &str) -> u64 {
    value[key].as_u64().unwrap_or_else(|| panic!("`{key}` is not a non-negative integer in {value}"))
}

/// `GET base+path` over a fresh connection; returns status and body. `base` is
/// `http://host:port` as in a ready line.
pub fn http_get(base: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let authority = base.strip_prefix("http://").with_context(|| format!("{base} is not an http:// URL"))?;
    let authority = authority.trim_end_matches('/');
    let addr: SocketAddr =
        authority.to_socket_addrs()?.next().with_context(|| format!("{authority} resolves to nothing"))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).with_context(|| format!("read the answer to GET {path}"))?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").context("answer has no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body = &raw[split + 4..];
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    let chunked = head.lines().any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with("transfer-encoding:") && line.contains("chunked")
    });
    let body = if chunked { dechunk(body)? } else { body.to_vec() };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n").context("chunk size line not terminated")?;
        let size_line = String::from_utf8_lossy(&body[..line_end]).into_owned();
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16).with_context(|| format!("bad chunk size {size_line:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = body.get(..size).context("chunk shorter than its size")?;
        out.extend_from_slice(chunk);
        body = body.get(size + 2..).context("chunk not followed by CRLF")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_codes_differ_in_every_digit() {
        for code in ["00000", "12345", "99999", "505050"] {
            let wrong = wrong_code(code);
            assert_eq!(wrong.len(), code.len());
            assert!(wrong.chars().zip(code.chars()).all(|(a, b)| a != b), "{code} → {wrong}");
        }
    }

    #[test]
    fn bot_token_shape() {
        let secret = "A".repeat(35);
        assert!(is_bot_token(&format!("42:{secret}")));
        assert!(is_bot_token(&format!("42:{}", "a_-Z9".repeat(7))));
        for bad in [
            secret.clone(),
            format!(":{secret}"),
            format!("x:{secret}"),
            format!("42:{}", "A".repeat(34)),
            format!("42:{}!", "A".repeat(34)),
        ] {
            assert!(!is_bot_token(&bad), "{bad}");
        }
    }

    #[test]
    fn chunked_bodies_decode() {
        assert_eq!(dechunk(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n").ok(), Some(b"abcde".to_vec()));
        assert!(dechunk(b"5\r\nab").is_err());
    }

    #[test]
    fn code_sink_lines_parse_and_partial_lines_are_skipped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sink = dir.path().join("codes.log");
        assert!(read_codes(&sink).is_empty());
        fs::write(&sink, "{\"phone\":\"+15550001111\",\"code\":\"12345\",\"at\":1}\n{\"phone\":\"+1555\"")
            .expect("write");
        assert_eq!(read_codes(&sink), vec![("+15550001111".to_string(), "12345".to_string())]);
        assert_eq!(wait_code(&sink, "+15550001111", 0), "12345");
    }
}

// ---------------------------------------------------------------------------------------------
// A whole mesh: one gateway and N relays

/// The relay binary's name.
pub const RELAY_BIN: &str = "meshgram-relay";

/// A gateway and `N` relays on loopback, each relay joining through the ones before it.
#[derive(Debug)]
pub struct Mesh {
    pub gateway: Gateway,
    pub relays: Vec<Server>,
}

impl Mesh {
    /// Starts a gateway and `relays` relays with replication `replication`. Each relay is
    /// admitted as an operator would: `meshgram-gateway relay-cert` signs its certificate.
    pub fn start(relays: usize, replication: usize) -> Mesh {
        let gateway = Gateway::start();
        let key = gateway.server.ready["public_key"].as_str().expect("gateway ready line has public_key").to_string();
        let gateway_dir = gateway.data_dir().display().to_string();
        Mesh::start_relays(gateway, &key, relays, replication, |dir| {
            let relay = load_or_create_ed25519(&dir.join(RELAY_KEY_FILE)).expect("relay key").public().to_peer_id();
            let (relay, out) = (relay.to_string(), dir.join(RELAY_CERT_FILE).display().to_string());
            let args = ["--data", &gateway_dir, "relay-cert", "--relay", &relay, "--out", &out];
            let issued = run(&bin_path(GATEWAY_BIN), &args, None);
            assert!(issued.status.success(), "relay-cert failed: {}", issued.stderr);
        })
    }

    /// Like [`Mesh::start`], but relays trust `gateway` (a key the test holds, which also signs
    /// their certificates) instead of the gateway's own key.
    pub fn start_with_key(gateway: Gateway, signer: &ed25519::Keypair, relays: usize, replication: usize) -> Mesh {
        let key = meshgram_node::ids::hex(&signer.public().to_bytes());
        Mesh::start_relays(gateway, &key, relays, replication, |dir| {
            RelayCert::admit(signer, dir, 1, unix_now()).expect("admit the relay");
        })
    }

    /// Starts the relays, each after `admit` gave its data dir a key and a certificate.
    fn start_relays(
        gateway: Gateway,
        gateway_key: &str,
        relays: usize,
        replication: usize,
        admit: impl Fn(&Path),
    ) -> Mesh {
        let mut servers: Vec<Server> = Vec::new();
        for i in 0..relays {
            let dir = gateway.tmp().join(format!("relay-{i}"));
            fs::create_dir_all(&dir).expect("relay data dir");
            admit(&dir);
            let data = dir.display().to_string();
            let replication = replication.to_string();
            let mut args: Vec<String> = [
                "--data",
                &data,
                "--gateway-key",
                gateway_key,
                "--replication",
                &replication,
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--http",
                "127.0.0.1:0",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            for earlier in &servers {
                args.extend(["--bootstrap".to_string(), earlier.tcp_addr()]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let server =
                Server::start(&bin_path(RELAY_BIN), &args).unwrap_or_else(|e| panic!("relay {i} did not start: {e:#}"));
            servers.push(server);
        }
        // Give Kademlia a moment to learn every relay (bounded; identify runs on connect).
        thread::sleep(Duration::from_millis(500));
        Mesh { gateway, relays: servers }
    }

    /// `--gateway ADDR --relay R1 --relay R2 …` for `meshgram login`.
    pub fn login_args(&self) -> Vec<String> {
        let mut args = vec!["--gateway".to_string(), self.gateway.addr()];
        for relay in &self.relays {
            args.extend(["--relay".to_string(), relay.tcp_addr()]);
        }
        args
    }

    /// Signs `phone` in on `profile`, remembering this mesh's relays; returns the login JSON.
    pub fn login(&self, profile: &Path, phone: &str) -> Value {
        let args = self.login_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.gateway.login_via(&args, profile, phone, &[], |code| vec![code.to_string()]).ok_json()
    }

    /// A fresh profile dir under the mesh's temp dir.
    pub fn new_profile(&self, name: &str) -> PathBuf {
        self.gateway.new_profile(name)
    }

    /// Every file under every relay's data dir, concatenated: what a relay operator can read.
    pub fn relay_disk_bytes(&self) -> Vec<u8> {
        let mut all = Vec::new();
        for relay in &self.relays {
            for entry in fs::read_dir(&relay.data_dir).into_iter().flatten().flatten() {
                if let Ok(bytes) = fs::read(entry.path()) {
                    all.extend(bytes);
                }
            }
        }
        all
    }
}

/// The texts of a `meshgram messages --json` answer, in order.
pub fn texts(messages: &Value) -> Vec<String> {
    array(messages, "messages").iter().map(|m| str_field(m, "text").to_string()).collect()
}
