//! `meshgram-relay`: a relay node of the Meshgram mesh.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use meshgram_node::crypto::identity::load_or_create_ed25519;
use meshgram_node::server::service::{self, LogFormat};
use meshgram_relay::config::{CONFIG_FILE, InitValues, RelayFile, template};
use meshgram_relay::store::{Quota, StoreHandle, StoreLimits};
use meshgram_relay::{Ended, Relay};

#[derive(Parser, Debug)]
#[command(
    name = "meshgram-relay",
    version,
    about = "Meshgram relay: stores and forwards end-to-end encrypted envelopes",
    after_help = "Settings come from --config (TOML; `meshgram-relay init` writes a commented one), then \
                  MESHGRAM_RELAY_<KEY> environment variables, then flags, each overriding the one before."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Config file (TOML). Every key has a default; see `init`.
    #[arg(long, env = "MESHGRAM_RELAY_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Data directory (relay key, certificate, stores). Default: meshgram-relay-data.
    #[arg(long, env = "MESHGRAM_RELAY_DATA", global = true)]
    data: Option<PathBuf>,
    /// libp2p listen address (repeatable). Default: QUIC and TCP on 127.0.0.1, port 0.
    #[arg(long, global = true)]
    listen: Vec<String>,
    /// A relay to join the mesh through, ending in /p2p/<peer id> (repeatable).
    #[arg(long, global = true)]
    bootstrap: Vec<String>,
    /// The gateway's public key (hex, from its ready line or network.json): certificates
    /// it signs are the only ones this relay accepts.
    #[arg(long, env = "MESHGRAM_GATEWAY_KEY", global = true)]
    gateway_key: Option<String>,
    /// The gateway's address (from its ready line or network.json; several gateways of one
    /// network comma-separated), to ask it for revoked sessions and relays every 2 s. Without it a revoked session keeps access here until
    /// its certificate expires (up to an hour).
    #[arg(long, env = "MESHGRAM_RELAY_GATEWAY", global = true)]
    gateway: Option<String>,
    /// The gateway's certificate for this relay (default: DATA/relay.cert); see
    /// `meshgram-gateway relay-cert`.
    #[arg(long, env = "MESHGRAM_RELAY_RELAY_CERT")]
    relay_cert: Option<PathBuf>,
    /// Relays that must hold a copy of an envelope before it is acknowledged (default 2).
    #[arg(long, env = "MESHGRAM_RELAY_REPLICATION")]
    replication: Option<usize>,
    /// Acknowledge with fewer copies than --replication when fewer relays are live (at least
    /// this relay's own). Without it such a relay answers UNAVAILABLE and the client tries
    /// another; use it only for a network knowingly smaller than --replication.
    #[arg(long)]
    allow_fewer_replicas: bool,
    /// Look every mailbox's closest relays up with Kademlia, not only when the routing table
    /// may be incomplete (for tests of that path on a small mesh).
    #[arg(long, hide = true)]
    placement_lookups_always: bool,
    /// HTTP address for /healthz and /metrics (default 127.0.0.1:0).
    #[arg(long, env = "MESHGRAM_RELAY_HTTP", global = true)]
    http: Option<String>,
    /// Days an undelivered envelope is kept (default 30).
    #[arg(long, env = "MESHGRAM_RELAY_TTL_DAYS")]
    ttl_days: Option<u64>,
    /// Envelopes a mailbox may hold (default 100000).
    #[arg(long, env = "MESHGRAM_RELAY_MAILBOX_QUOTA")]
    mailbox_quota: Option<u64>,
    /// Envelopes one sender may have waiting in one mailbox (default 10000).
    #[arg(long, env = "MESHGRAM_RELAY_MAILBOX_QUOTA_PER_SENDER")]
    mailbox_quota_per_sender: Option<u64>,
    /// MiB one sender may have waiting on this relay in all mailboxes (default 1024).
    #[arg(long, env = "MESHGRAM_RELAY_SENDER_QUOTA_MIB")]
    sender_quota_mib: Option<u64>,
    /// Bytes of file chunks (MiB) one user may have recorded on this relay: the parts of their
    /// uploads whose file id this relay is among the closest relays to (default 10240).
    #[arg(long, env = "MESHGRAM_RELAY_MEDIA_QUOTA_MIB")]
    media_quota_mib: Option<u64>,
    /// Seconds an upload may take from its first part to its last; one not finished by then is
    /// expired (its chunks deleted, its bytes given back to its owner's quota). A client
    /// resuming later starts it afresh (default 86400).
    #[arg(long, env = "MESHGRAM_RELAY_MEDIA_UPLOAD_GRACE_SECS")]
    media_upload_grace_secs: Option<u64>,
    /// Envelopes per second one user may send, sustained (default 5000).
    #[arg(long, env = "MESHGRAM_RELAY_SEND_RATE")]
    send_rate: Option<u32>,
    /// Threads for networking and request handling (default: one per core). Relays that share
    /// a machine (`meshgram up`) do better with 1: no hand-offs between threads per message.
    #[arg(long, env = "MESHGRAM_RELAY_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// Log lines on stderr: text, or one JSON object per line for log shippers.
    #[arg(long, env = "MESHGRAM_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Wake devices that are not connected through their push endpoints (default true).
    #[arg(long, env = "MESHGRAM_RELAY_PUSH")]
    push: Option<bool>,
    /// Send wake-ups to push endpoints on loopback or private addresses (default false).
    #[arg(long, env = "MESHGRAM_RELAY_PUSH_PRIVATE_ENDPOINTS")]
    push_private_endpoints: Option<bool>,
    /// VAPID contact (mailto: or https://) for push services that ask for signed wake-ups.
    #[arg(long, env = "MESHGRAM_RELAY_PUSH_VAPID_SUBJECT")]
    push_vapid_subject: Option<String>,
    /// Connections taken in all (default 20000).
    #[arg(long, env = "MESHGRAM_RELAY_MAX_CONNECTIONS")]
    max_connections: Option<u32>,
    /// Connections taken from one IP address (default 64).
    #[arg(long, env = "MESHGRAM_RELAY_MAX_CONNECTIONS_PER_IP")]
    max_connections_per_ip: Option<u32>,
    /// Whether the per-address limit counts loopback addresses too (default false).
    #[arg(long, env = "MESHGRAM_RELAY_LIMIT_LOOPBACK")]
    limit_loopback: Option<bool>,
    /// MiB each client protocol's pipes may hold together (default 256).
    #[arg(long, env = "MESHGRAM_RELAY_PIPE_MEMORY_MIB")]
    pipe_memory_mib: Option<usize>,
    /// Exit when standard input closes (used by `meshgram up`, so that roles never outlive it).
    #[arg(long)]
    exit_on_stdin_close: bool,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Print what the (stopped) relay's store holds, as JSON: per mailbox, the ids of the
    /// envelopes waiting there; the hashes of the media chunks held; the uploads recorded
    /// (file id, owner, total parts, parts saved). Envelopes and chunks are sealed; this shows
    /// only what routing shows.
    Inspect,
    /// Set up a relay: write a commented config (DATA/relay.toml, with the --gateway-key,
    /// --gateway, --listen, --bootstrap and --http given) and the relay key, and print the peer
    /// id and the command that admits this relay to the network.
    Init {
        /// Print what was written as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let file = settings(&cli)?;
    match &cli.command {
        Some(Command::Inspect) => return inspect(&file.data_dir),
        Some(Command::Init { json }) => return init(&cli, &file.data_dir, *json),
        None => {}
    }
    let runtime = match file.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        0 => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
    }
    .context("starting the runtime")?;
    runtime.block_on(run(cli, file))
}

/// The config file (or the defaults), with the environment and flags laid over it.
fn settings(cli: &Cli) -> anyhow::Result<RelayFile> {
    let mut file = match &cli.config {
        Some(path) => RelayFile::load(path)?,
        None => RelayFile::default(),
    };
    fn set<T: Clone>(into: &mut T, from: &Option<T>) {
        if let Some(value) = from {
            into.clone_from(value);
        }
    }
    set(&mut file.data_dir, &cli.data);
    if !cli.listen.is_empty() {
        file.listen.clone_from(&cli.listen);
    }
    if !cli.bootstrap.is_empty() {
        file.bootstrap.clone_from(&cli.bootstrap);
    }
    file.gateway_key = cli.gateway_key.clone().or(file.gateway_key);
    file.gateway = cli.gateway.clone().or(file.gateway);
    file.relay_cert = cli.relay_cert.clone().or(file.relay_cert);
    set(&mut file.http, &cli.http);
    set(&mut file.replication, &cli.replication);
    file.allow_fewer_replicas |= cli.allow_fewer_replicas;
    set(&mut file.ttl_days, &cli.ttl_days);
    set(&mut file.mailbox_quota, &cli.mailbox_quota);
    set(&mut file.mailbox_quota_per_sender, &cli.mailbox_quota_per_sender);
    set(&mut file.sender_quota_mib, &cli.sender_quota_mib);
    set(&mut file.media_quota_mib, &cli.media_quota_mib);
    set(&mut file.media_upload_grace_secs, &cli.media_upload_grace_secs);
    set(&mut file.send_rate, &cli.send_rate);
    set(&mut file.worker_threads, &cli.worker_threads);
    set(&mut file.log_format, &cli.log_format);
    set(&mut file.push, &cli.push);
    set(&mut file.push_private_endpoints, &cli.push_private_endpoints);
    file.push_vapid_subject = cli.push_vapid_subject.clone().or(file.push_vapid_subject);
    set(&mut file.max_connections, &cli.max_connections);
    set(&mut file.max_connections_per_ip, &cli.max_connections_per_ip);
    set(&mut file.limit_loopback, &cli.limit_loopback);
    set(&mut file.pipe_memory_mib, &cli.pipe_memory_mib);
    Ok(file)
}

/// Descriptors a relay keeps for other things than connections.
const FILES_BESIDES_CONNECTIONS: u64 = 256;

async fn run(cli: Cli, file: RelayFile) -> anyhow::Result<()> {
    service::init_tracing("info", file.log_format);
    let exit_on_stdin_close = cli.exit_on_stdin_close;
    let mut config = file.to_config()?;
    service::keep_private(&config.data_dir).with_context(|| format!("creating {}", config.data_dir.display()))?;
    if cli.placement_lookups_always {
        config.settings.placement_lookups = meshgram_relay::PlacementLookups::Always;
    }
    // Stores, listeners and the HTTP server need descriptors besides the connections.
    let usable = service::raise_open_file_limit().saturating_sub(FILES_BESIDES_CONNECTIONS);
    let connections = &mut config.connections.max_connections;
    if u64::from(*connections) > usable {
        tracing::warn!(
            max_connections = *connections,
            usable,
            "the open-file limit allows fewer connections; raise it (LimitNOFILE=) to take more"
        );
        *connections = u32::try_from(usable).unwrap_or(u32::MAX).max(1);
    }

    let mut relay = Relay::start(config).await.context("starting the relay")?;
    service::print_ready("relay", &relay.ready)?;
    tracing::info!(peer_id = %relay.ready.peer_id, "relay ready");
    tokio::select! {
        why = service::stop_requested(exit_on_stdin_close) => tracing::info!("{}; shutting down", why?),
        ended = relay.wait() => {
            if ended == Ended::DiskTakesWritesAgain {
                // Nothing is left to write; closing connections cleanly spares clients a timeout.
                relay.shutdown().await;
            }
            // Nonzero, so that `meshgram up` or systemd's Restart=on-failure starts it again.
            return Err(ended.into());
        }
    }
    relay.shutdown().await;
    Ok(())
}

/// `init`: the data dir, its relay key and a commented config; refuses to overwrite a config.
fn init(cli: &Cli, data: &Path, json: bool) -> anyhow::Result<()> {
    service::keep_private(data).with_context(|| format!("creating {}", data.display()))?;
    let data = std::path::absolute(data).with_context(|| format!("resolving {}", data.display()))?;
    let config_path = data.join(CONFIG_FILE);
    if config_path.exists() {
        bail!("{} exists; edit it, or remove it to start over", config_path.display());
    }
    let values = InitValues {
        data_dir: data.clone(),
        gateway_key: cli.gateway_key.clone(),
        gateway: cli.gateway.clone(),
        listen: cli.listen.clone(),
        bootstrap: cli.bootstrap.clone(),
        http: cli.http.clone(),
    };
    let text = template(&values);
    // What init writes must start: check it as a start would (but for a missing key).
    let written: RelayFile = toml::from_str(&text).context("the written config does not parse")?;
    if written.gateway_key.is_some() {
        written.to_config()?;
    }
    let key = load_or_create_ed25519(&data.join(meshgram_relay::RELAY_KEY_FILE)).context("the relay key")?;
    let peer_id = key.public().to_peer_id();
    std::fs::write(&config_path, text).with_context(|| format!("writing {}", config_path.display()))?;
    let cert = data.join(meshgram_relay::RELAY_CERT_FILE);
    let admit = format!("meshgram-gateway --data GATEWAY_DATA relay-cert --relay {peer_id} --out {}", cert.display());
    let start = format!("meshgram-relay --config {}", config_path.display());
    if json {
        let line = serde_json::json!({
            "peer_id": peer_id.to_string(), "config": config_path, "key": data.join(meshgram_relay::RELAY_KEY_FILE),
            "admit": admit, "start": start,
        });
        println!("{line}");
    } else {
        println!("relay peer id: {peer_id}");
        println!("config:        {} (every key commented; edit it)", config_path.display());
        println!(
            "\nAdmit it to the network on the gateway's machine (copy the certificate here if that is another one):"
        );
        println!("  {admit}");
        if values.gateway_key.is_none() {
            println!(
                "\nSet gateway_key in the config (the gateway's ready line or network.json has it), then start it:"
            );
        } else {
            println!("\nThen start it:");
        }
        println!("  {start}");
    }
    Ok(())
}

/// `inspect`: opens the store (replaying its log, as a start would) and prints its mailboxes.
fn inspect(data: &Path) -> anyhow::Result<()> {
    let path = data.join(meshgram_relay::DATABASE_FILE);
    if !path.exists() {
        bail!("{} holds no relay store", data.display());
    }
    // Limits apply to new writes only, and inspecting makes none.
    let limits = StoreLimits { ttl: Duration::from_secs(30 * 24 * 3600), quota: Quota::UNLIMITED };
    let store = StoreHandle::open(&path, limits)
        .with_context(|| format!("opening {} (is the relay stopped?)", path.display()))?;
    let mailboxes: Vec<serde_json::Value> = store
        .held()?
        .into_iter()
        .map(|(mailbox, held)| serde_json::json!({ "mailbox": mailbox.to_string(), "held": held }))
        .collect();
    let chunks: Vec<String> =
        meshgram_relay::held_chunks(data).map_err(anyhow::Error::msg)?.iter().map(ToString::to_string).collect();
    let uploads = meshgram_relay::held_uploads(data).map_err(anyhow::Error::msg)?;
    println!("{}", serde_json::json!({ "mailboxes": mailboxes, "chunks": chunks, "uploads": uploads }));
    Ok(())
}
