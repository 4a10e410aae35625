//! Server processes for the benchmark: real `meshgram-relay` binaries and a mosquitto broker.
//!
//! Each runs on 127.0.0.1 under `timeout` (so nothing outlives a killed benchmark for long), in
//! its own directory, with its log in a file there. The benchmark stops each one by pid: SIGTERM
//! to the `timeout` wrapper, which forwards it, then SIGKILL if it lingers. Both pids are also
//! appended to `$MESHGRAM_BENCH_PIDFILE` when set, so the calling script can stop them too.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use libp2p::identity::ed25519;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use meshgram_node::crypto::cert::{RelayCert, unix_now};
use meshgram_node::ids::hex;
use meshgram_node::proto::RelayInfo;
use serde_json::Value;

/// How long a server may take to print its ready line or accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often bounded waits look again.
const POLL: Duration = Duration::from_millis(20);

/// A server process started through `timeout`. Dropping it stops the process.
#[derive(Debug)]
pub(crate) struct ServerProcess {
    name: String,
    /// The `timeout` process.
    wrapper: Child,
    /// The server itself (the wrapper's child): whose memory we read.
    pid: u32,
    log: PathBuf,
}

impl ServerProcess {
    /// Starts `bin args…` in `dir` under `timeout limit`, stdout piped to the caller.
    fn spawn(
        name: &str,
        bin: &Path,
        args: &[String],
        dir: &Path,
        limit: Duration,
    ) -> anyhow::Result<(Self, std::process::ChildStdout)> {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let log = dir.join(format!("{name}.log"));
        let stderr = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut wrapper = Command::new("timeout")
            .arg(format!("--kill-after={}s", STOP_GRACE.as_secs()))
            .arg(format!("{}s", limit.as_secs()))
            .arg(bin)
            .args(args)
            .current_dir(dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawn timeout {} {}", bin.display(), args.join(" ")))?;
        let stdout = wrapper.stdout.take().context("stdout is piped")?;
        record_pid(wrapper.id());
        let pid = match child_of(wrapper.id()) {
            Ok(pid) => pid,
            Err(e) => {
                let _ = wrapper.kill();
                let _ = wrapper.wait();
                return Err(e.context(format!("{name} did not start")));
            }
        };
        record_pid(pid);
        Ok((ServerProcess { name: name.to_string(), wrapper, pid, log }, stdout))
    }

    /// The server's own pid.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Resident memory (`VmRSS`) of the server, in KiB.
    pub(crate) fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid))
            .with_context(|| format!("{} (pid {}) is gone", self.name, self.pid))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no VmRSS in /proc/{}/status", self.pid))
    }

    /// Open file descriptors of the server: each connected client holds one socket.
    pub(crate) fn open_fds(&self) -> anyhow::Result<usize> {
        Ok(fs::read_dir(format!("/proc/{}/fd", self.pid))
            .with_context(|| format!("{} (pid {}) is gone", self.name, self.pid))?
            .count())
    }

    /// The last lines of the server's log, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERM through the wrapper, then SIGKILL to both if they are still there.
    pub(crate) fn stop(&mut self) {
        if matches!(self.wrapper.try_wait(), Ok(Some(_))) {
            return;
        }
        signal("TERM", self.wrapper.id());
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if matches!(self.wrapper.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(POLL);
        }
        signal("KILL", self.pid);
        let _ = self.wrapper.kill();
        let _ = self.wrapper.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// CPU time (user + system) of `/proc/<pid>` (`self` for this process), from its `stat`.
pub(crate) fn cpu_time_of(pid: &str) -> anyhow::Result<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("malformed stat")?;
    // After the comm: state ppid … utime stime are fields 14 and 15 of stat, 12 and 13 here.
    let field = |n: usize| rest.split_whitespace().nth(n).and_then(|v| v.parse::<u64>().ok());
    let ticks = field(11).zip(field(12)).map(|(u, s)| u + s).context("no utime/stime in stat")?;
    // USER_HZ is 100 on every Linux architecture we run on (it is fixed in the kernel ABI).
    Ok(Duration::from_millis(ticks * 10))
}

/// Sends a signal with kill(1): the workspace forbids `unsafe`, so no libc here.
fn signal(name: &str, pid: u32) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Appends a pid to `$MESHGRAM_BENCH_PIDFILE`, for the calling script's cleanup trap.
fn record_pid(pid: u32) {
    if let Some(path) = std::env::var_os("MESHGRAM_BENCH_PIDFILE")
        && let Ok(mut file) = OpenOptions::new().create(true).append(true).open(path)
    {
        let _ = writeln!(file, "{pid}");
    }
}

/// The pid of `parent`'s child once it has exec'd (its name is no longer `timeout`).
fn child_of(parent: u32) -> anyhow::Result<u32> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        for entry in fs::read_dir("/proc")?.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else { continue };
            // `pid (comm) state ppid …`; comm may contain spaces, so split after the last ')'.
            let Some((head, rest)) = stat.rsplit_once(')') else { continue };
            let comm = head.split_once('(').map(|(_, c)| c).unwrap_or_default();
            let ppid = rest.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(parent) && comm != "timeout" {
                return Ok(pid);
            }
        }
        thread::sleep(POLL);
    }
    bail!("no child of `timeout` (pid {parent}) appeared within {READY_TIMEOUT:?}")
}

// ---------------------------------------------------------------------------------------------
// Relays

/// A running `meshgram-relay`.
#[derive(Debug)]
pub(crate) struct RelayProcess {
    pub(crate) process: ServerProcess,
    pub(crate) info: RelayInfo,
    /// Its TCP listen address ending in `/p2p/<peer id>`, to bootstrap others through.
    pub(crate) bootstrap_addr: Multiaddr,
}

/// How to start a relay.
#[derive(Debug, Clone)]
pub(crate) struct RelayOptions<'a> {
    pub(crate) bin: &'a Path,
    pub(crate) dir: PathBuf,
    /// The gateway key the relay trusts, which also signs its relay certificate here.
    pub(crate) gateway: &'a ed25519::Keypair,
    pub(crate) replication: usize,
    pub(crate) bootstrap: Vec<Multiaddr>,
    pub(crate) limit: Duration,
}

impl RelayProcess {
    /// Starts a relay on loopback TCP port 0 and waits for its JSON ready line.
    pub(crate) fn start(name: &str, options: RelayOptions<'_>) -> anyhow::Result<Self> {
        // Admitted as `meshgram up` admits its relays.
        let data = options.dir.join("data");
        RelayCert::admit(options.gateway, &data, 1, unix_now())?;
        let mut args: Vec<String> = vec![
            "--data".into(),
            data.display().to_string(),
            "--gateway-key".into(),
            hex(&options.gateway.public().to_bytes()),
            "--replication".into(),
            options.replication.to_string(),
            "--listen".into(),
            "/ip4/127.0.0.1/tcp/0".into(),
            "--http".into(),
            "127.0.0.1:0".into(),
            // The default per-user limit (5,000 envelopes/s) is policy, not the data path this
            // measures: one sender at full speed would otherwise be told FLOOD_WAIT.
            "--send-rate".into(),
            "10000000".into(),
        ];
        for addr in &options.bootstrap {
            args.extend(["--bootstrap".into(), addr.to_string()]);
        }
        let (process, stdout) = ServerProcess::spawn(name, options.bin, &args, &options.dir, options.limit)?;
        let ready = match wait_ready_line(stdout) {
            Ok(ready) => ready,
            Err(e) => bail!("{name}: {e:#}\n--- log ---\n{}", process.log_tail()),
        };
        let tcp = ready["listen"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .find(|a| a.contains("/tcp/"))
            .with_context(|| format!("{name}: no TCP address in its ready line {ready}"))?;
        let bootstrap_addr: Multiaddr = tcp.parse().with_context(|| format!("{name}: bad address {tcp}"))?;
        let mut addr = bootstrap_addr.clone();
        let Some(Protocol::P2p(peer_id)) = addr.pop() else { bail!("{name}: {tcp} does not end in /p2p/<peer id>") };
        Ok(RelayProcess { process, info: RelayInfo { peer_id, addrs: vec![addr] }, bootstrap_addr })
    }

    pub(crate) fn peer_id(&self) -> PeerId {
        self.info.peer_id
    }
}

/// Reads stdout until a `{"event":"ready",…}` line (bounded); keeps draining it afterwards.
fn wait_ready_line(stdout: std::process::ChildStdout) -> anyhow::Result<Value> {
    let (tx, rx) = mpsc::sync_channel(1);
    thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(sender) = &tx
                && let Ok(value) = serde_json::from_str::<Value>(&line)
                && value["event"] == "ready"
            {
                let _ = sender.send(value);
                tx = None;
            }
        }
    });
    rx.recv_timeout(READY_TIMEOUT).map_err(|_| anyhow::anyhow!("no ready line within {READY_TIMEOUT:?}"))
}

// ---------------------------------------------------------------------------------------------
// mosquitto

/// A running mosquitto broker.
#[derive(Debug)]
pub(crate) struct MosquittoProcess {
    pub(crate) process: ServerProcess,
    pub(crate) port: u16,
}

impl MosquittoProcess {
    /// Starts `mosquitto -c <dir>/mosquitto.conf` on a free loopback port, with persistence in
    /// `dir`, and waits until it accepts connections.
    pub(crate) fn start(bin: &Path, dir: &Path, limit: Duration) -> anyhow::Result<Self> {
        fs::create_dir_all(dir.join("persistence"))?;
        let port = free_port()?;
        let config = dir.join("mosquitto.conf");
        // As in shared/BASELINES.md: loopback, persistence on (mosquitto's persistence is a
        // periodic snapshot, not an fsync per message). The queue limit is raised so that a
        // saturated subscriber is not silently dropped messages (the mesh never drops), which
        // the default of 1000 queued per client would do.
        let text = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n\
             max_queued_messages 1000000\nlog_dest stderr\nlog_type error\nlog_type warning\n",
            dir.join("persistence").display()
        );
        fs::write(&config, text).with_context(|| format!("write {}", config.display()))?;
        let args = vec!["-c".to_string(), config.display().to_string()];
        let (process, _stdout) = ServerProcess::spawn("mosquitto", bin, &args, dir, limit)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("mosquitto did not accept connections on port {port}\n--- log ---\n{}", process.log_tail());
            }
            thread::sleep(POLL);
        }
        Ok(MosquittoProcess { process, port })
    }
}

/// A loopback port that was free a moment ago (mosquitto cannot be told to pick one and report
/// it; the window for a clash is tiny on a bench machine).
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
