//! `meshgram up`: a whole local network on loopback, each role its own process running the same
//! binary an operator would run. Today that is the gateway; relays, the bot bridge and the app
//! join as they land. Ports are remembered in `network.json`, so a second `up` on the same
//! directory resumes the same network at the same addresses, with its data.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use meshgram_node::network_file::{GatewayEntry, NETWORK_FILE, NetworkFile};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A role's process must print its ready line within this long.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// After SIGTERM, a role gets this long to exit before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A child process of one role; killed when dropped.
struct RoleProcess {
    role: &'static str,
    child: Child,
    ready: Value,
}

impl RoleProcess {
    /// Starts `bin` with `args`, logging stderr to `log`, and waits for its ready line.
    async fn start(role: &'static str, bin: &Path, args: &[String], log: &Path) -> anyhow::Result<Self> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(READY_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Ok(value) = serde_json::from_str::<Value>(&line)
                    && value["event"] == "ready"
                {
                    return Ok(Some(value));
                }
            }
            Ok::<_, std::io::Error>(None)
        })
        .await;
        let ready = match ready {
            Ok(Ok(Some(ready))) => ready,
            Ok(Ok(None)) | Ok(Err(_)) => bail!("{role} exited before it was ready; see {}", log.display()),
            Err(_) => bail!("{role} was not ready within {READY_TIMEOUT:?}; see {}", log.display()),
        };
        // Keep draining stdout so the role never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(RoleProcess { role, child, ready })
    }

    /// SIGTERM, then SIGKILL after the grace period.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
        }
        if tokio::time::timeout(STOP_GRACE, self.child.wait()).await.is_err() {
            tracing::warn!(role = self.role, "did not stop in time; killing");
            let _ = self.child.kill().await;
        }
    }
}

fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the meshgram binary")?;
    let bin = exe.with_file_name(name);
    if !bin.exists() {
        bail!("{} not found next to {}; build every binary with `cargo build --workspace --bins`", name, exe.display());
    }
    Ok(bin)
}

/// Listen addresses reusing the ports in `previous` (TCP and QUIC), or port 0.
fn listen_addrs(previous: Option<&[Multiaddr]>) -> Vec<String> {
    let (mut tcp, mut udp) = (0u16, 0u16);
    for addr in previous.unwrap_or_default() {
        let protocols: Vec<Protocol> = addr.iter().collect();
        match protocols.as_slice() {
            [Protocol::Ip4(_), Protocol::Tcp(port), ..] => tcp = *port,
            [Protocol::Ip4(_), Protocol::Udp(port), Protocol::QuicV1, ..] => udp = *port,
            _ => {}
        }
    }
    vec![format!("/ip4/127.0.0.1/tcp/{tcp}"), format!("/ip4/127.0.0.1/udp/{udp}/quic-v1")]
}

async fn start_gateway(data: &Path, previous: Option<&NetworkFile>) -> anyhow::Result<RoleProcess> {
    let bin = sibling_binary("meshgram-gateway")?;
    let dir = data.join("gateway");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let code_sink = dir.join("codes.log");
    let args_for = |listen: Vec<String>| {
        let mut args = vec![
            "--data".into(),
            dir.display().to_string(),
            "--code-sink".into(),
            format!("file:{}", code_sink.display()),
        ];
        for addr in listen {
            args.push("--listen".into());
            args.push(addr);
        }
        args
    };
    let log = data.join("gateway.log");
    let old_addrs = previous.map(|p| p.gateway.addrs.as_slice());
    match RoleProcess::start("gateway", &bin, &args_for(listen_addrs(old_addrs)), &log).await {
        Ok(p) => Ok(p),
        // The old ports may be taken by now; a fresh port still resumes the same data.
        Err(e) if old_addrs.is_some() => {
            tracing::warn!(error = %e, "could not reuse the previous ports; using new ones");
            RoleProcess::start("gateway", &bin, &args_for(listen_addrs(None)), &log).await
        }
        Err(e) => Err(e),
    }
}

fn gateway_entry(ready: &Value, code_sink: PathBuf) -> anyhow::Result<GatewayEntry> {
    let addrs: Vec<Multiaddr> =
        serde_json::from_value(ready["listen"].clone()).context("gateway ready line: listen")?;
    Ok(GatewayEntry {
        peer_id: serde_json::from_value(ready["peer_id"].clone()).context("gateway ready line: peer_id")?,
        // Stored without the /p2p suffix; the peer id is its own field.
        addrs: addrs
            .into_iter()
            .map(|mut a| {
                if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
                    a.pop();
                }
                a
            })
            .collect(),
        public_key: ready["public_key"].as_str().context("gateway ready line: public_key")?.to_string(),
        code_sink,
        http: ready["http"].as_str().map(str::to_string),
    })
}

/// Runs the network until Ctrl-C or SIGTERM.
pub(crate) async fn run(data: &Path, json: bool) -> anyhow::Result<()> {
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let data = data.canonicalize().with_context(|| format!("resolving {}", data.display()))?;
    let network_path = data.join(NETWORK_FILE);
    let previous = NetworkFile::load(&network_path).ok();

    let gateway = start_gateway(&data, previous.as_ref()).await?;
    let network = NetworkFile {
        gateway: gateway_entry(&gateway.ready, data.join("gateway").join("codes.log"))?,
        relays: Vec::new(),
        bot_api: None,
        app: None,
    };
    network.save(&network_path)?;

    if json {
        println!(
            "{}",
            serde_json::json!({ "event": "ready", "role": "network", "network": network_path, "data": data })
        );
    } else {
        let gw_addr = network.gateway.addrs.first().map(|a| a.to_string()).unwrap_or_default();
        println!("Meshgram network is up (data in {}).", data.display());
        println!("  gateway   {gw_addr}/p2p/{}", network.gateway.peer_id);
        println!("  codes     {}", network.gateway.code_sink.display());
        println!("  network   {}", network_path.display());
        println!();
        println!("Sign in from another terminal:");
        println!(
            "  meshgram --profile {}/alice login --network {} --phone +15550000001",
            data.display(),
            network_path.display()
        );
        println!("  (the login code appears in {})", network.gateway.code_sink.display());
        println!();
        println!("Press Ctrl-C to stop.");
    }

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut gateway = gateway;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
        status = gateway.child.wait() => bail!("the gateway exited ({status:?}); see {}", data.join("gateway.log").display()),
    }
    eprintln!("Stopping…");
    gateway.stop().await;
    Ok(())
}
