//! A whole network started the way a user starts it: `meshgram up`, each role its own process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use crate::{CLI_BIN, CliOutput, Server, bin_path, spawn_meshgram, wait_code};

/// How long `up` may take to bring a killed role back.
pub const RESTART_TIMEOUT: Duration = Duration::from_secs(30);

/// `meshgram --json up --data DIR --relays N` in a temp dir; SIGKILLed on drop (and its roles
/// with it: they exit when `up`'s pipe closes).
#[derive(Debug)]
pub struct Up {
    pub server: Server,
    /// The network's data dir, absolute (as `up` names its roles' dirs).
    pub data: PathBuf,
    /// `network.json` as `up` wrote it.
    pub network: Value,
    tmp: TempDir,
}

impl Up {
    /// Starts a network with `relays` relays.
    pub fn start(relays: usize) -> Up {
        let tmp = tempfile::Builder::new().prefix("meshgram-up-").tempdir().expect("create a temp dir");
        let data = tmp.path().join("net");
        let server = Up::start_on(&data, relays);
        let data = data.canonicalize().expect("up made its data dir");
        let network = serde_json::from_slice(&std::fs::read(data.join("network.json")).expect("network.json"))
            .expect("network.json is JSON");
        Up { server, data, network, tmp }
    }

    /// Starts `up` on `data` (a new network, or the one there before).
    pub fn start_on(data: &Path, relays: usize) -> Server {
        let (data, relays) = (data.display().to_string(), relays.to_string());
        Server::start(&bin_path(CLI_BIN), &["--json", "up", "--data", &data, "--relays", &relays])
            .unwrap_or_else(|e| panic!("meshgram up did not start: {e:#}"))
    }

    /// The temp dir holding the network and the tests' profiles.
    pub fn tmp(&self) -> &Path {
        self.tmp.path()
    }

    /// `network.json`'s path.
    pub fn network_file(&self) -> PathBuf {
        self.data.join("network.json")
    }

    /// Signs `phone` in on `profile` with `--network`, typing the code from the sink; `nth` is
    /// how many codes this phone was sent before.
    pub fn login(&self, profile: &Path, phone: &str, nth: usize) -> Value {
        let sink = PathBuf::from(self.network["gateway"]["code_sink"].as_str().expect("code_sink"));
        let network = self.network_file().display().to_string();
        let mut cli = spawn_meshgram(profile, &["login", "--network", &network, "--phone", phone]);
        cli.write_line(&wait_code(&sink, phone, nth));
        let done: CliOutput = cli.finish();
        done.ok_json()
    }

    /// The network's roles, for a thread that kills them.
    pub fn roles(&self) -> Roles {
        Roles { data: self.data.clone() }
    }

    /// See [`Roles::role_pid`].
    pub fn role_pid(&self, role: &str) -> Option<u32> {
        self.roles().role_pid(role)
    }

    /// See [`Roles::kill9_role`].
    pub fn kill9_role(&self, role: &str) -> u32 {
        self.roles().kill9_role(role)
    }

    /// See [`Roles::wait_restarted`].
    pub fn wait_restarted(&self, role: &str, old: u32) -> u32 {
        self.roles().wait_restarted(role, old)
    }
}

/// The roles of an [`Up`] network, by name (`gateway`, `relay-1`, …).
#[derive(Debug, Clone)]
pub struct Roles {
    data: PathBuf,
}

impl Roles {
    /// The pid of a role, found by its data dir on its command line.
    pub fn role_pid(&self, role: &str) -> Option<u32> {
        let pattern = format!("--data {} ", self.data.join(role).display());
        let out = Command::new("pgrep").args(["-f", "--", &pattern]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).lines().next()?.trim().parse().ok()
    }

    /// SIGKILLs a role; returns the pid it had.
    pub fn kill9_role(&self, role: &str) -> u32 {
        let pid = self.role_pid(role).unwrap_or_else(|| panic!("{role} is not running"));
        let killed = Command::new("kill").args(["-9", &pid.to_string()]).status().expect("run kill");
        assert!(killed.success(), "kill -9 {pid} ({role})");
        pid
    }

    /// Waits (bounded) for `up` to run `role` again under a pid other than `old`.
    pub fn wait_restarted(&self, role: &str, old: u32) -> u32 {
        let deadline = Instant::now() + RESTART_TIMEOUT;
        loop {
            if let Some(pid) = self.role_pid(role).filter(|pid| *pid != old) {
                return pid;
            }
            assert!(Instant::now() < deadline, "{role} was not restarted within {RESTART_TIMEOUT:?}");
            thread::sleep(Duration::from_millis(100));
        }
    }
}
