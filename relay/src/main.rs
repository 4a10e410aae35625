//! `meshgram-relay`: a relay node of the Meshgram mesh.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use libp2p::Multiaddr;
use libp2p::identity::ed25519;
use meshgram_node::ids::parse_hex;
use meshgram_node::server::service;
use meshgram_relay::store::{StoreHandle, StoreLimits};
use meshgram_relay::{Ended, Relay, RelayConfig};

#[derive(Parser, Debug)]
#[command(
    name = "meshgram-relay",
    version,
    about = "Meshgram relay: stores and forwards end-to-end encrypted envelopes"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Data directory (relay key, mailbox database).
    #[arg(long, env = "MESHGRAM_RELAY_DATA", default_value = "meshgram-relay-data")]
    data: PathBuf,
    /// libp2p listen address (repeatable). Default: QUIC and TCP on 127.0.0.1, port 0.
    #[arg(long)]
    listen: Vec<Multiaddr>,
    /// A relay to join the mesh through, ending in /p2p/<peer id> (repeatable).
    #[arg(long)]
    bootstrap: Vec<Multiaddr>,
    /// The gateway's public key (hex, from its ready line or network.json): certificates
    /// it signs are the only ones this relay accepts.
    #[arg(long, env = "MESHGRAM_GATEWAY_KEY")]
    gateway_key: Option<String>,
    /// The gateway's address (from its ready line or network.json), to ask it for revoked
    /// sessions and relays every 2 s. Without it a revoked session keeps access here until
    /// its certificate expires (up to an hour).
    #[arg(long)]
    gateway: Option<Multiaddr>,
    /// The gateway's certificate for this relay (default: DATA/relay.cert); see
    /// `meshgram-gateway relay-cert`.
    #[arg(long)]
    relay_cert: Option<PathBuf>,
    /// Relays that must hold a copy of an envelope before it is acknowledged.
    #[arg(long, default_value_t = 2)]
    replication: usize,
    /// Acknowledge with fewer copies than --replication when fewer relays are live (at least
    /// this relay's own). Without it such a relay answers UNAVAILABLE and the client tries
    /// another; use it only for a network knowingly smaller than --replication.
    #[arg(long)]
    allow_fewer_replicas: bool,
    /// Look every mailbox's closest relays up with Kademlia, not only when the routing table
    /// may be incomplete (for tests of that path on a small mesh).
    #[arg(long, hide = true)]
    placement_lookups_always: bool,
    /// HTTP address for /healthz and /metrics.
    #[arg(long, default_value = "127.0.0.1:0")]
    http: std::net::SocketAddr,
    /// Days an undelivered envelope is kept.
    #[arg(long, default_value_t = 30)]
    ttl_days: u64,
    /// Envelopes a mailbox may hold.
    #[arg(long, default_value_t = 100_000)]
    mailbox_quota: u64,
    /// Bytes of file chunks (MiB) one user may have recorded on this relay: the parts of their
    /// uploads whose file id this relay is among the closest relays to.
    #[arg(long, default_value_t = meshgram_relay::DEFAULT_MEDIA_QUOTA_MIB)]
    media_quota_mib: u64,
    /// Seconds an upload may take from its first part to its last; one not finished by then is
    /// expired (its chunks deleted, its bytes given back to its owner's quota). A client
    /// resuming later starts it afresh.
    #[arg(long, default_value_t = 24 * 3600)]
    media_upload_grace_secs: u64,
    /// Envelopes per second one user may send (sustained).
    #[arg(long, default_value_t = 5_000)]
    send_rate: u32,
    /// Threads for networking and request handling (default: one per core). Relays that share
    /// a machine (`meshgram up`) do better with 1: no hand-offs between threads per message.
    #[arg(long)]
    worker_threads: Option<usize>,
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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Inspect) = cli.command {
        return inspect(&cli.data);
    }
    let runtime = match cli.worker_threads {
        Some(0) => bail!("--worker-threads must be at least 1"),
        Some(1) => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
        None => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
    }
    .context("starting the runtime")?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    service::init_tracing("info");
    let exit_on_stdin_close = cli.exit_on_stdin_close;
    service::keep_private(&cli.data).with_context(|| format!("creating {}", cli.data.display()))?;
    let key = cli.gateway_key.as_deref().context("--gateway-key is required to run a relay")?;
    let key = parse_hex::<32>(key).context("--gateway-key")?;
    let gateway_key = ed25519::PublicKey::try_from_bytes(&key).context("--gateway-key is not an ed25519 public key")?;
    if cli.replication == 0 {
        bail!("--replication must be at least 1");
    }
    let mut config = RelayConfig::new(cli.data, gateway_key);
    if !cli.listen.is_empty() {
        config.listen = cli.listen;
    }
    config.bootstrap = cli.bootstrap;
    config.gateway = cli.gateway;
    config.cert_file = cli.relay_cert;
    config.http = Some(cli.http);
    config.settings.replication = cli.replication;
    config.settings.allow_fewer_replicas = cli.allow_fewer_replicas;
    if cli.placement_lookups_always {
        config.settings.placement_lookups = meshgram_relay::PlacementLookups::Always;
    }
    config.settings.send_rate = cli.send_rate;
    config.store.ttl = Duration::from_secs(cli.ttl_days * 24 * 3600);
    config.store.max_per_mailbox = cli.mailbox_quota;
    config.settings.media_quota = cli.media_quota_mib.saturating_mul(1 << 20);
    if cli.media_upload_grace_secs == 0 {
        bail!("--media-upload-grace-secs must be at least 1");
    }
    config.settings.media_upload_grace = Duration::from_secs(cli.media_upload_grace_secs);

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

/// `inspect`: opens the store (replaying its log, as a start would) and prints its mailboxes.
fn inspect(data: &std::path::Path) -> anyhow::Result<()> {
    let path = data.join(meshgram_relay::DATABASE_FILE);
    if !path.exists() {
        bail!("{} holds no relay store", data.display());
    }
    // Limits apply to new writes only, and inspecting makes none.
    let limits = StoreLimits { ttl: Duration::from_secs(30 * 24 * 3600), max_per_mailbox: u64::MAX };
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
