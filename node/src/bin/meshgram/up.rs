//! `meshgram up`: a whole local network on loopback, each role its own process running the same
//! binary an operator would run: the gateway, N relays, the bot bridge, and the desktop app for a
//! first profile. Ports are remembered in `network.json`, so a second `up` on the same
//! directory resumes the same network at the same addresses, with its data. `up` supervises its
//! roles: one that exits (a SIGKILLed relay, say) is restarted on the same data and ports while
//! the others keep running; only Ctrl-C or SIGTERM stops the network.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use meshgram_node::crypto::cert::{RelayCert, unix_now};
use meshgram_node::crypto::identity::load_ed25519;
use meshgram_node::defaults::{GATEWAY_KEY_FILE, RELAY_CERT_DAYS};
use meshgram_node::network_file::{GatewayEntry, NETWORK_FILE, NetworkFile, NodeEntry};
use meshgram_node::server::service::stop_requested;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

/// A role's process must print its ready line within this long.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// After SIGTERM, a role gets this long to exit before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long `up` waits for its relays to check each other's certificates before it says the
/// network is ready: until a relay knows R relays it refuses sends. On loopback this takes
/// well under a second; past this bound `up` warns and carries on (clients retry).
const RELAYS_VERIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// The first wait before restarting a role that exited; doubled after each quick exit.
const RESTART_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between restarts: a role that keeps failing is retried twice a minute.
const RESTART_MAX: Duration = Duration::from_secs(30);
/// A role that ran this long before exiting is restarted after [`RESTART_FIRST`] again: what
/// exits sooner is crash-looping (a bad config, a port taken), what ran longer was serving.
const RESTART_STABLE: Duration = Duration::from_secs(10);

/// A child process of one role; killed when dropped.
struct RoleProcess {
    role: &'static str,
    child: Child,
    /// Held, not used: the role exits when it closes. Kept out of `child`, whose `wait()`
    /// would close it.
    _stdin: ChildStdin,
    /// Drains stdout after the ready line, so the role never blocks on a full pipe.
    _drain: AbortOnDropHandle<()>,
    ready: Value,
}

/// How to start one role again: the same binary, data dir and ports.
struct RoleSpec {
    role: &'static str,
    /// For people: "gateway", "relay 1".
    label: String,
    bin: PathBuf,
    args: Vec<String>,
    log: PathBuf,
}

impl RoleProcess {
    /// Starts `bin` with `args`, logging stderr to `log`, and waits for its ready line.
    async fn start(role: &'static str, bin: &Path, args: &[String], log: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        // The role exits when this pipe closes, i.e. when `up` is gone however it died.
        let mut child = Command::new(bin)
            .args(args)
            .arg("--exit-on-stdin-close")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdin = child.stdin.take().context("child stdin")?;
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
        let drain =
            AbortOnDropHandle::new(tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} }));
        Ok(RoleProcess { role, child, _stdin: stdin, _drain: drain, ready })
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

/// Waits (bounded by [`RELAYS_VERIFY_TIMEOUT`]) until each relay has checked the certificate of
/// every other one, as its `/metrics` reports.
async fn wait_for_relays<'a>(processes: impl Iterator<Item = &'a RoleProcess>, relays: usize) {
    let others = relays.saturating_sub(1);
    let deadline = Instant::now() + RELAYS_VERIFY_TIMEOUT;
    for process in processes.filter(|p| p.role == "relay") {
        let Some(http) = process.ready["http"].as_str() else { continue };
        while relays_verified(http).await.is_none_or(|n| n < others) {
            if Instant::now() >= deadline {
                tracing::warn!(
                    "relays have not all checked each other's certificates yet; sends may be refused at first"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `meshgram_relay_relays_verified` from a relay's `/metrics` at `http` (`http://HOST:PORT`).
async fn relays_verified(http: &str) -> Option<usize> {
    let authority = http.strip_prefix("http://")?;
    let get = async {
        let mut stream = tokio::net::TcpStream::connect(authority).await.ok()?;
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.ok()?;
        Some(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(1), get).await.ok()??;
    answer.lines().find_map(|line| line.strip_prefix("meshgram_relay_relays_verified "))?.trim().parse().ok()
}

/// Starts one role's binary in `data/<name>`, reusing the ports it had last time if it can.
/// Admits a relay to the network before it starts, with the gateway's key (what an operator
/// does with `meshgram-gateway relay-cert`). Issued afresh on every `up`, so it never runs out.
fn admit_relay(gateway_dir: &Path, relay_dir: &Path) -> anyhow::Result<()> {
    let key_file = gateway_dir.join(GATEWAY_KEY_FILE);
    let gateway = load_ed25519(&key_file)?.with_context(|| format!("no gateway key at {}", key_file.display()))?;
    RelayCert::admit(&gateway, relay_dir, RELAY_CERT_DAYS, unix_now())?;
    Ok(())
}

async fn start_role(
    role: &'static str,
    name: &str,
    data: &Path,
    mut args: Vec<String>,
    previous: Option<&[Multiaddr]>,
) -> anyhow::Result<(RoleProcess, RoleSpec)> {
    let bin = sibling_binary(&format!("meshgram-{role}"))?;
    let dir = data.join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    args.extend(["--data".into(), dir.display().to_string()]);
    let with_listen = |listen: Vec<String>| {
        let mut all = args.clone();
        for addr in listen {
            all.extend(["--listen".into(), addr]);
        }
        all
    };
    let log = data.join(format!("{name}.log"));
    let process = match RoleProcess::start(role, &bin, &with_listen(listen_addrs(previous)), &log).await {
        Ok(p) => p,
        // The old ports may be taken by now; fresh ports still resume the same data.
        Err(e) if previous.is_some() => {
            tracing::warn!(error = %e, role, "could not reuse the previous ports; using new ones");
            RoleProcess::start(role, &bin, &with_listen(listen_addrs(None)), &log).await?
        }
        Err(e) => return Err(e),
    };
    // A restart binds the ports it has now, so every address handed out stays right (a
    // relay's HTTP port too: network.json names it for its metrics).
    let ports = ready_addrs(&process.ready)?;
    let mut restart_args = with_listen(listen_addrs(Some(&ports)));
    if role == "relay"
        && let Some(http) = process.ready["http"].as_str().and_then(|url| url.strip_prefix("http://"))
    {
        restart_args.extend(["--http".into(), http.to_string()]);
    }
    let spec = RoleSpec { role, label: name.replace('-', " "), bin, args: restart_args, log };
    Ok((process, spec))
}

/// Keeps one role running until `stop`, like systemd's `Restart=always`: a role that exits is
/// started again on the same data dir and ports, after a wait that doubles while it keeps
/// failing; the other roles are not touched.
async fn supervise(spec: RoleSpec, mut process: RoleProcess, stop: CancellationToken) {
    let mut delay = RESTART_FIRST;
    let mut started = Instant::now();
    loop {
        let status = tokio::select! {
            status = process.child.wait() => status,
            () = stop.cancelled() => return process.stop().await,
        };
        if started.elapsed() >= RESTART_STABLE {
            delay = RESTART_FIRST;
        }
        let how = match status {
            Ok(status) => describe_exit(status),
            Err(e) => format!("lost track of it ({e})"),
        };
        eprintln!("{} exited: {how}; restarting in {} s", spec.label, delay.as_secs());
        loop {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stop.cancelled() => return,
            }
            delay = (delay * 2).min(RESTART_MAX);
            match RoleProcess::start(spec.role, &spec.bin, &spec.args, &spec.log).await {
                Ok(restarted) => {
                    eprintln!("{} is back", spec.label);
                    process = restarted;
                    started = Instant::now();
                    break;
                }
                Err(e) => eprintln!("{} did not restart: {e:#}; retrying in {} s", spec.label, delay.as_secs()),
            }
        }
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

/// The addresses in a ready line, without their `/p2p/<peer id>` suffix.
fn ready_addrs(ready: &Value) -> anyhow::Result<Vec<Multiaddr>> {
    let addrs: Vec<Multiaddr> = serde_json::from_value(ready["listen"].clone()).context("ready line: listen")?;
    Ok(addrs
        .into_iter()
        .map(|mut a| {
            if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
                a.pop();
            }
            a
        })
        .collect())
}

fn ready_peer(ready: &Value) -> anyhow::Result<libp2p::PeerId> {
    serde_json::from_value(ready["peer_id"].clone()).context("ready line: peer_id")
}

fn gateway_entry(ready: &Value, code_sink: PathBuf) -> anyhow::Result<GatewayEntry> {
    Ok(GatewayEntry {
        peer_id: ready_peer(ready)?,
        addrs: ready_addrs(ready)?,
        public_key: ready["public_key"].as_str().context("gateway ready line: public_key")?.to_string(),
        code_sink,
        http: ready["http"].as_str().map(str::to_string),
    })
}

/// Sizes of the local network.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UpOptions {
    pub(crate) relays: usize,
    pub(crate) replication: usize,
}

/// Runs the network until Ctrl-C or SIGTERM.
pub(crate) async fn run(data: &Path, options: UpOptions, json: bool) -> anyhow::Result<()> {
    if options.relays == 0 || options.replication == 0 {
        bail!("need at least one relay and a replication of at least 1");
    }
    // Relays acknowledge only with R durable copies, so R cannot exceed the relays there are:
    // a smaller network keeps as many copies as it has relays (`--relays 1`: one).
    let replication = options.replication.min(options.relays);
    // The roles' stores, logs and keys are this user's alone (the roles do the same for their
    // own directories).
    meshgram_node::server::service::keep_private(data).with_context(|| format!("creating {}", data.display()))?;
    let data = data.canonicalize().with_context(|| format!("resolving {}", data.display()))?;
    let network_path = data.join(NETWORK_FILE);
    let previous = NetworkFile::load(&network_path).ok();

    let code_sink = data.join("gateway").join("codes.log");
    let gateway_args = vec!["--code-sink".into(), format!("file:{}", code_sink.display())];
    let mut roles = vec![
        start_role("gateway", "gateway", &data, gateway_args, previous.as_ref().map(|p| p.gateway.addrs.as_slice()))
            .await?,
    ];
    let gateway = gateway_entry(&roles[0].0.ready, code_sink)?;

    // Relays ask the gateway for revocations; it restarts on the same ports, so one address
    // serves for the network's life.
    let gateway_addr = gateway.addrs.iter().find(|a| a.to_string().contains("/tcp/")).cloned();
    let mut relays: Vec<NodeEntry> = Vec::new();
    for i in 0..options.relays {
        let mut args = vec![
            "--gateway-key".into(),
            gateway.public_key.clone(),
            "--replication".into(),
            replication.to_string(),
            // The relays share this machine's cores: one thread each saves hand-offs.
            "--worker-threads".into(),
            "1".into(),
            // A local network: a push service on this machine (ntfy, say) is one to wake.
            "--push-private-endpoints".into(),
            "true".into(),
        ];
        if let Some(addr) = &gateway_addr {
            args.extend(["--gateway".into(), addr.to_string()]);
        }
        // Each relay joins through the ones started before it.
        for relay in &relays {
            if let Some(addr) = relay.addrs.iter().find(|a| a.to_string().contains("/tcp/")) {
                args.extend(["--bootstrap".into(), format!("{addr}/p2p/{}", relay.peer_id)]);
            }
        }
        let old = previous.as_ref().and_then(|p| p.relays.get(i)).map(|r| r.addrs.as_slice());
        let name = format!("relay-{i}");
        admit_relay(&data.join("gateway"), &data.join(&name))?;
        let (process, spec) = start_role("relay", &name, &data, args, old).await?;
        relays.push(NodeEntry {
            peer_id: ready_peer(&process.ready)?,
            addrs: ready_addrs(&process.ready)?,
            http: process.ready["http"].as_str().map(str::to_string),
        });
        roles.push((process, spec));
    }
    // A relay that is restarted later joins through every other relay, not only the earlier ones.
    for (i, (_, spec)) in roles.iter_mut().skip(1).enumerate() {
        for later in relays.iter().skip(i + 1) {
            if let Some(addr) = later.addrs.iter().find(|a| a.to_string().contains("/tcp/")) {
                spec.args.extend(["--bootstrap".into(), format!("{addr}/p2p/{}", later.peer_id)]);
            }
        }
    }
    wait_for_relays(roles.iter().map(|(process, _)| process), options.relays).await;
    let mut network = NetworkFile { gateway, relays, bot_api: None, app: None };
    network.save(&network_path)?;
    // The bridge signs bots in through the network file, so it starts once that is written.
    let bridge_args = vec!["--network".into(), network_path.display().to_string()];
    let old = previous.as_ref().and_then(|p| p.bot_api.as_deref()).and_then(bridge_listen);
    let (process, spec) = start_role("bot-bridge", "bot-bridge", &data, bridge_args, old.as_deref()).await?;
    network.bot_api = process.ready["bot_api"].as_str().map(str::to_string);
    roles.push((process, spec));
    let old_port = previous.as_ref().and_then(|p| p.app.as_deref()).and_then(app_port);
    let (process, spec) = start_app(&data, &network_path, old_port).await?;
    // The address with its token stays in the app's profile (0600) and on this terminal;
    // network.json, readable by anyone who can read the data dir, names the page only.
    let app_url = process.ready["url"].as_str().context("app ready line: url")?.to_string();
    network.app = app_url.split('#').next().map(str::to_string);
    roles.push((process, spec));
    network.save(&network_path)?;

    if json {
        outln!(
            "{}",
            serde_json::json!({ "event": "ready", "role": "network", "network": network_path, "data": data, "app": app_url })
        );
    } else {
        print_welcome(&data, &network_path, &network, &app_url);
    }

    let stop = CancellationToken::new();
    let mut supervisors = JoinSet::new();
    for (process, spec) in roles {
        supervisors.spawn(supervise(spec, process, stop.clone()));
    }
    // Only Ctrl-C or SIGTERM stops the network; a role that exits is restarted.
    let why = stop_requested(false).await?;
    eprintln!("Stopping ({why})…");
    stop.cancel();
    while supervisors.join_next().await.is_some() {}
    Ok(())
}

/// Starts the desktop app on the profile `DATA/app` (signed in through its page), on
/// `previous_port` when it is free, so that an open page finds the app again.
async fn start_app(
    data: &Path,
    network_path: &Path,
    previous_port: Option<u16>,
) -> anyhow::Result<(RoleProcess, RoleSpec)> {
    let bin = std::env::current_exe().context("finding the meshgram binary")?;
    let profile = data.join("app");
    let args = |port: u16| -> Vec<String> {
        let (profile, network) = (profile.display().to_string(), network_path.display().to_string());
        let port = port.to_string();
        // --json: the app's address (with its token) goes only to the ready line, not the log.
        ["--profile", &profile, "--json", "app", "--network", &network, "--no-open", "--port", &port]
            .map(String::from)
            .to_vec()
    };
    let log = data.join("app.log");
    let process = match RoleProcess::start("app", &bin, &args(previous_port.unwrap_or(0)), &log).await {
        Ok(p) => p,
        Err(e) if previous_port.is_some() => {
            tracing::warn!(error = %e, "could not reuse the app's previous port; using a new one");
            RoleProcess::start("app", &bin, &args(0), &log).await?
        }
        Err(e) => return Err(e),
    };
    let port = process.ready["port"].as_u64().and_then(|p| u16::try_from(p).ok()).context("app ready line: port")?;
    let spec = RoleSpec { role: "app", label: "app".into(), bin, args: args(port), log };
    Ok((process, spec))
}

/// The port of the app's address in network.json (`http://127.0.0.1:PORT/`).
fn app_port(url: &str) -> Option<u16> {
    url.strip_prefix("http://127.0.0.1:")?.trim_end_matches('/').parse().ok()
}

/// The bot bridge's address in its Bot API URL (`http://HOST:PORT/bot`), to bind again, so that
/// the URL bots were given stays right.
fn bridge_listen(bot_api: &str) -> Option<Vec<Multiaddr>> {
    let addr: std::net::SocketAddr = bot_api.strip_prefix("http://")?.strip_suffix("/bot")?.parse().ok()?;
    Some(vec![format!("/ip4/{}/tcp/{}", addr.ip(), addr.port()).parse().ok()?])
}

fn print_welcome(data: &Path, network_path: &Path, network: &NetworkFile, app_url: &str) {
    let first = |addrs: &[Multiaddr]| addrs.first().map(|a| a.to_string()).unwrap_or_default();
    // Printed as they must be typed from any directory: this binary's real path (a new user has
    // no `meshgram` on PATH) and absolute data paths.
    let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "meshgram".into());
    let absolute = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()).display().to_string();
    let (data, network_path) = (absolute(data), absolute(network_path));
    outln!("Meshgram network is up (data and logs in {data}).");
    outln!("  gateway   {}/p2p/{}", first(&network.gateway.addrs), network.gateway.peer_id);
    for (i, relay) in network.relays.iter().enumerate() {
        outln!("  relay {i}   {}/p2p/{}", first(&relay.addrs), relay.peer_id);
    }
    if let Some(bot_api) = &network.bot_api {
        outln!("  bot API   {bot_api}<token>/<method>");
    }
    outln!("  network   {network_path}");
    outln!();
    outln!("Open the desktop app in your browser and sign in with any phone number:");
    outln!("  {app_url}");
    outln!("(meshgram --profile {data}/app app opens it again.)");
    outln!();
    outln!("Or sign in and chat from other terminals (login codes appear in {}):", network.gateway.code_sink.display());
    outln!("  {exe} --profile {data}/alice login --network {network_path} --phone +15550000001");
    outln!("  {exe} --profile {data}/bob login --network {network_path} --phone +15550000002");
    outln!("  {exe} --profile {data}/bob node                  # bob's client node: receives as messages arrive");
    outln!("  {exe} --profile {data}/alice send +15550000002 'hi bob'");
    outln!("  {exe} --profile {data}/bob messages --follow");
    outln!("  {exe} --profile {data}/alice upload FILE --to +15550000002   # then: bob download MESSAGE_ID");
    outln!();
    outln!("Press Ctrl-C to stop.");
}
