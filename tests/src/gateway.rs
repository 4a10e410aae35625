//! A `meshgram-gateway` in its own temp dir, with sign-in helpers that type the code it
//! "texted" into `meshgram login`.

use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use crate::{
    CODE_TIMEOUT, CliChild, CliOutput, GATEWAY_BIN, POLL, Server, WebhookSink, bin_path, meshgram, read_codes, run,
    spawn_meshgram,
};

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
    webhook_delay: Duration,
    args: Vec<String>,
    key_from: Option<PathBuf>,
    code_file: Option<PathBuf>,
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

    /// Like [`GatewayBuilder::webhook`], the webhook taking `delay` to answer each code.
    pub fn slow_webhook(mut self, status: u16, delay: Duration) -> Self {
        (self.webhook_status, self.webhook_delay) = (Some(status), delay);
        self
    }

    /// An extra command-line argument (e.g. `--cert-ttl-secs`, `900`).
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_string());
        self
    }

    /// Keeps its accounts in this PostgreSQL database (`--database URL`) instead of redb.
    pub fn database(self, url: &str) -> Self {
        self.arg("--database").arg(url)
    }

    /// Signs with the same key as `other` (two gateways of one network on one database).
    pub fn same_key_as(mut self, other: &Gateway) -> Self {
        self.key_from = Some(other.data_dir.join(meshgram_node::defaults::GATEWAY_KEY_FILE));
        self
    }

    /// Writes its codes to `other`'s code file (gateways that hand a sign-in to each other).
    pub fn same_code_sink_as(mut self, other: &Gateway) -> Self {
        self.code_file = other.code_sink_file().map(Path::to_path_buf);
        self
    }

    /// Starts the gateway, panicking if it does not become ready.
    pub fn start(self) -> Gateway {
        let tmp = tempfile::Builder::new().prefix("meshgram-test-").tempdir().expect("create a temp dir");
        let data_dir = tmp.path().join("gw");
        if let Some(key) = &self.key_from {
            fs::create_dir_all(&data_dir).expect("create the data dir");
            fs::copy(key, data_dir.join(meshgram_node::defaults::GATEWAY_KEY_FILE)).expect("copy the gateway key");
        }
        let codes = match self.webhook_status {
            Some(status) => CodeSource::Webhook(
                WebhookSink::start_slow(status, self.webhook_delay).expect("start the webhook sink"),
            ),
            None => CodeSource::File(self.code_file.clone().unwrap_or_else(|| tmp.path().join("codes.log"))),
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
        self.restart_same_port_with(&[]);
    }

    /// [`Gateway::restart_same_port`] with `extra` arguments from now on (e.g. `--database`).
    pub fn restart_same_port_with(&mut self, extra: &[&str]) {
        self.fixed_args.extend(extra.iter().map(|arg| arg.to_string()));
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
