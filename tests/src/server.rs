//! Long-running servers: a binary that prints a JSON ready line on stdout, killed on drop.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::{CLI_BIN, POLL, bin_path};

/// How long a server may take to print its ready line (a cold debug binary opening redb).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for an output-forwarding thread after its process is gone.
const PIPE_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// Its stderr lines so far (the first [`STDERR_KEPT`]).
    stderr: Arc<Mutex<Vec<String>>>,
}

/// Stderr lines a [`Server`] keeps for [`Server::stderr`]; the rest are only forwarded.
const STDERR_KEPT: usize = 10_000;

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
        let kept = Arc::new(Mutex::new(Vec::new()));
        let keep = Arc::clone(&kept);
        let forwarders = vec![
            thread::spawn(move || forward_lines(stderr, &stderr_label, &keep)),
            thread::spawn(move || scan_stdout(stdout, &stdout_label, ready_tx)),
        ];
        // Built before waiting so that any early return kills the process in `Drop`.
        let mut server = Server {
            child,
            ready: Value::Null,
            data_dir: data_dir.unwrap_or_default(),
            name,
            forwarders,
            stderr: kept,
        };
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

    /// The lines it wrote to stderr so far (its log).
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
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

    /// Waits up to `timeout` for the process to exit on its own; its status, if it did.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = wait_exit(&mut self.child, timeout)?;
        for forwarder in self.forwarders.drain(..) {
            join_bounded(forwarder);
        }
        Some(status)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its resident memory now, in bytes (`VmRSS`), or 0 once it has gone.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
        kib.unwrap_or(0) * 1024
    }

    /// How many files (sockets included) it has open.
    pub fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map_or(0, |dir| dir.count())
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

    /// SIGSTOP: the process stays, with its sockets open, and answers nothing until
    /// [`Server::cont`] (a hung or badly overloaded server).
    pub fn stop(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Server::stop`]: it carries on where it stopped.
    pub fn cont(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args([signal, &pid]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill {signal} {pid} ({}) failed", self.name);
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

/// Copies lines to the test output, which libtest shows when the test fails, keeping the first
/// [`STDERR_KEPT`] in `kept`.
fn forward_lines(from: impl Read, label: &str, kept: &Mutex<Vec<String>>) {
    for line in BufReader::new(from).lines() {
        let Ok(line) = line else { break };
        eprintln!("[{label}] {line}");
        let mut kept = kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if kept.len() < STDERR_KEPT {
            kept.push(line);
        }
    }
}

/// Joins a pipe-reading thread, giving up (detaching it) if the pipe stays open, e.g. because a
/// grandchild inherited it.
pub(crate) fn join_bounded<T>(handle: JoinHandle<T>) -> Option<T> {
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
pub(crate) fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
            Ok(None) | Err(_) => return None,
        }
    }
}

/// Starts `meshgram --profile P --json node` and waits for its ready line.
pub fn start_node(profile: &Path) -> Server {
    start_node_as(&[], &bin_path(CLI_BIN), profile)
}

/// Like [`start_node`], with `bin` run through `wrapper` (e.g. `setpriv …` to be another user).
pub fn start_node_as(wrapper: &[&str], bin: &Path, profile: &Path) -> Server {
    let (bin, profile) = (bin.display().to_string(), profile.display().to_string());
    let mut command: Vec<&str> = wrapper.to_vec();
    command.extend([bin.as_str(), "--profile", &profile, "--json", "node"]);
    let node = Server::start(Path::new(command[0]), &command[1..])
        .unwrap_or_else(|e| panic!("the client node did not start: {e:#}"));
    assert_eq!(node.ready["role"], "node", "{}", node.ready);
    node
}
