//! Meshgram relay: keeps end-to-end encrypted envelopes for devices that are offline, replicated
//! on the relays Kademlia-closest to each mailbox, and hands them over when the device asks.
//!
//! # Layout, in the order a message flows through it
//!
//! - [`net`]: the event loop that owns the libp2p `Swarm` and dispatches: requests read from
//!   pipes to [`mailbox`], [`media`] or [`replica`], swarm events and reports on other relays
//!   to [`relays`], finished tasks back to whoever started them.
//! - [`sessions`]: clients' session certificates, checked once per connection (`Hello`), and
//!   the sessions the gateway revoked; [`mailbox`] and [`media`] each keep one.
//! - [`mailbox`]: serves clients. Checks `Send`s (sender = connection, sizes, rate) and hands
//!   them to [`replicate`], parks long-poll `Fetch`es until something arrives, applies `Ack`s.
//! - [`media`]: serves clients' uploads and downloads (`/meshgram/media/1`): `SaveFilePart`
//!   stores the part's chunk on the `R` relays closest to its hash, then its record on the `R`
//!   closest to the file id, before `PartSaved`; `GetUploadStatus`, `GetChunk`. Chunks are
//!   files (`media::chunks`), records a redb index with per-user quotas (`media::uploads`);
//!   `media::repair` runs with each [`repair`] round.
//! - [`replicate`]: stores a `Send` on the `R` closest relays (in parallel, replacing failed ones,
//!   `copy_to_closest`, which media uses too) before the sender hears "stored"; talks to other
//!   relays only after checking their certificate (`ReplicaClient`); forwards deletes of
//!   acknowledged envelopes to the other copies.
//! - [`replica`]: the other side of [`replicate`]: serves other relays' `Store`s and `Delete`s,
//!   repair's requests and media's (`StoreChunk`, `RecordPart`, ...), only from relays that
//!   showed a gateway-signed relay certificate.
//! - [`repair`]: brings what this relay holds (envelopes, chunks, part records) back to `R`
//!   responsible relays after relays die, return or join, and deletes copies a replica has
//!   delivered (rounds on a timer and on membership change).
//! - [`relays`]: owns every other relay's standing (certificate checked, down lately, not a
//!   relay, certified on its connection, revoked) and the words tasks report on relays with
//!   (`RelayReport`); lists the live relays placement chooses from.
//! - [`revocations`]: asks the gateway every 2 s for revoked sessions and relays, checks their
//!   signatures, and hands them to [`mailbox`] (drops the sessions) and [`relays`].
//! - [`devices`]: which devices' mailboxes exist (the gateway is asked about new ones); sends
//!   and replica stores for others are refused, and wait while the gateway is asked.
//! - [`placement`]: which `R` relays are responsible for a mailbox (the Kademlia-closest to its
//!   key); lives in `meshgram_node` because clients compute it too.
//! - [`store`]: redb mailboxes behind a group-commit actor; dedup by envelope id, TTL, quotas.
//!   Its [`wal`] makes a batch durable with one small synced append. After a failed write it
//!   takes no more (the relay refuses sends, `/healthz` says 503) until [`disk`] finds that the
//!   disk takes writes again; the relay then ends ([`Ended::DiskTakesWritesAgain`]) to be restarted.
//! - [`accept`]: starts serving each inbound pipe as libp2p negotiates it; each connection owns
//!   its pipes' tasks.
//! - [`behaviour`], [`metrics`]: the libp2p behaviour and Prometheus counters.
//!
//! [`Relay::start`] wires them together; `main.rs` parses flags and prints the ready line.

mod accept;
mod behaviour;
mod boxed;
pub mod config;
mod devices;
mod disk;
#[doc(hidden)]
pub mod fuzzing;
mod mailbox;
mod media;
pub mod metrics;
mod mirror;
mod net;
pub mod push;
pub use meshgram_node::net::placement;
mod relays;
pub use accept::ConnectionLimits;
pub use media::MediaOpenError;
pub use relays::PlacementLookups;
mod repair;
mod replica;
mod replicate;
mod revocations;
mod sessions;
pub mod store;
mod wal;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use libp2p::identity::ed25519;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use meshgram_node::crypto::cert::{RelayCert, unix_now};
use meshgram_node::crypto::identity::{KeyFileError, load_or_create_ed25519};
use meshgram_node::defaults::SERVER_IDLE_TIMEOUT;
pub use meshgram_node::defaults::{RELAY_CERT_FILE, RELAY_KEY_FILE};
use meshgram_node::net::transport::{TransportError, build_swarm, listen_on_all};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::store::{StoreError, StoreHandle, StoreLimits};

/// The mailbox database inside its data dir.
pub const DATABASE_FILE: &str = "relay.redb";
/// Each user's media quota on a relay, by default: 10 GiB of chunks recorded there, room for a
/// lot of photos and a few films, and small beside a relay's disk, since a user's uploads
/// spread over the relays closest to each file id.
pub const DEFAULT_MEDIA_QUOTA_MIB: u64 = 10_240;
/// How often a relay whose store failed checks whether its disk takes writes again: a disk
/// given room is back in service within seconds, and a probe of a still-full disk (1 MiB
/// written and removed) every few seconds costs nothing.
const DISK_PROBE_EVERY: Duration = Duration::from_secs(2);

/// What a relay is configured with.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub gateway_key: ed25519::PublicKey,
    /// Copies of an envelope (`R`, this relay's own included) that must be durable before its
    /// sender hears `Stored`.
    pub replication: usize,
    /// Acknowledge with fewer than `replication` copies when fewer relays are live (at least
    /// one copy). An operator's explicit choice for a network smaller than `R`; off by
    /// default, so that a relay that just restarted, or that sees its peers down, refuses.
    pub allow_fewer_replicas: bool,
    /// When placement looks mailboxes' closest relays up with Kademlia.
    pub placement_lookups: PlacementLookups,
    /// Envelopes per second a user may send, in a burst of `send_burst`.
    pub send_rate: u32,
    pub send_burst: u32,
    /// Bytes of file chunks one user may have recorded on this relay (parts of uploads whose
    /// file id this relay is among the closest to).
    pub media_quota: u64,
    /// How long an upload may take from its first part to its last before it is expired (its
    /// records dropped, its chunks deleted, its bytes given back to the owner's quota).
    pub media_upload_grace: Duration,
    /// Wake-ups of offline devices through their push endpoints.
    pub push: push::PushSettings,
}

/// Everything a relay needs to start.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub data_dir: PathBuf,
    pub listen: Vec<Multiaddr>,
    /// Other relays to join through, each ending in `/p2p/<peer id>`.
    pub bootstrap: Vec<Multiaddr>,
    /// Where the gateway listens (every gateway of the network: they share one key), to ask
    /// it for revocations every few seconds. Without it, revoked sessions keep access here
    /// until their certificates expire.
    pub gateway: Vec<Multiaddr>,
    pub http: Option<SocketAddr>,
    /// The gateway's certificate for this relay (JSON); default `DATA/relay.cert`.
    pub cert_file: Option<PathBuf>,
    pub settings: RelaySettings,
    pub store: StoreLimits,
    pub connections: ConnectionLimits,
}

impl RelayConfig {
    /// Defaults for everything but the data dir and gateway key.
    pub fn new(data_dir: PathBuf, gateway_key: ed25519::PublicKey) -> Self {
        RelayConfig {
            data_dir,
            listen: meshgram_node::net::transport::default_listen_addrs(),
            bootstrap: Vec::new(),
            gateway: Vec::new(),
            http: None,
            cert_file: None,
            settings: RelaySettings {
                gateway_key,
                replication: 2,
                allow_fewer_replicas: false,
                placement_lookups: PlacementLookups::default(),
                send_rate: 5_000,
                send_burst: 50_000,
                media_quota: DEFAULT_MEDIA_QUOTA_MIB << 20,
                media_upload_grace: Duration::from_secs(24 * 3600),
                push: push::PushSettings { enabled: true, vapid_subject: None, private_endpoints: false },
            },
            store: StoreLimits { ttl: Duration::from_secs(30 * 24 * 3600), quota: store::Quota::DEFAULT },
            connections: ConnectionLimits::default(),
        }
    }
}

/// Why a relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data dir {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Key(#[from] KeyFileError),
    #[error("mailbox database: {0}")]
    Store(#[from] StoreError),
    #[error("media store: {0}")]
    Media(#[from] media::MediaOpenError),
    #[error("push registrations: {0}")]
    Push(#[from] push::PushOpenError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("bootstrap address {0} does not end in /p2p/<peer id>")]
    Bootstrap(Multiaddr),
    #[error("gateway address {addr} names peer {named}, but the gateway key is {expected}'s")]
    GatewayAddr { addr: Multiaddr, named: PeerId, expected: PeerId },
    #[error(
        "this relay ({peer_id}) has no valid certificate from the gateway in {path}: {reason}. The \
         gateway's operator issues one with: meshgram-gateway --data GATEWAY_DIR relay-cert --relay \
         {peer_id} --out {path}"
    )]
    Cert { peer_id: PeerId, path: PathBuf, reason: String },
    #[error("could not serve HTTP on {addr}: {source}")]
    Http { addr: SocketAddr, source: std::io::Error },
}

/// What the ready line reports.
#[derive(Debug, Clone, Serialize)]
pub struct Ready {
    pub peer_id: PeerId,
    /// Listen addresses, each ending in `/p2p/<peer_id>`.
    pub listen: Vec<Multiaddr>,
    pub http: Option<String>,
}

/// Why a relay ended on its own (see [`Relay::wait`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Ended {
    /// The store took no writes since one failed, and its disk takes writes again. A running
    /// store cannot trust its files after a failed sync; a fresh start replays the log onto
    /// redb and serves again, so the relay exits for its supervisor to start it again.
    #[error("the store's disk takes writes again; exiting so the supervisor restarts the relay with a clean store")]
    DiskTakesWritesAgain,
    /// A task stopped on a fatal error (logged where it happened).
    #[error("a relay task stopped unexpectedly")]
    TaskStopped,
}

/// A running relay. Dropping it stops every task.
#[derive(Debug)]
pub struct Relay {
    pub ready: Ready,
    tasks: JoinSet<Ended>,
    shutdown: CancellationToken,
}

impl Relay {
    /// Opens the data dir, binds, joins the mesh through the bootstrap relays, and serves.
    pub async fn start(config: RelayConfig) -> Result<Self, StartError> {
        let data = &config.data_dir;
        std::fs::create_dir_all(data).map_err(|source| StartError::DataDir { path: data.clone(), source })?;
        let keypair = load_or_create_ed25519(&data.join(RELAY_KEY_FILE))?;
        let cert_file = config.cert_file.clone().unwrap_or_else(|| data.join(RELAY_CERT_FILE));
        let cert = load_cert(&cert_file, &keypair.public().to_peer_id(), &config.settings.gateway_key)?;
        let store = StoreHandle::open(&data.join(DATABASE_FILE), config.store)?;
        let mut bootstrap = Vec::new();
        for addr in &config.bootstrap {
            match addr.iter().last() {
                Some(Protocol::P2p(peer)) => bootstrap.push((peer, addr.clone())),
                _ => return Err(StartError::Bootstrap(addr.clone())),
            }
        }
        let gateway = gateway_addr(&config.gateway, &config.settings.gateway_key)?;
        let metrics = Arc::new(metrics::Metrics::new());
        let (acceptor, inbound) = net::inbound_pipes(&metrics, config.connections);
        let asks_gateway = gateway.is_some();
        let mut swarm = build_swarm(keypair, SERVER_IDLE_TIMEOUT, |key| {
            boxed::Boxed(behaviour::RelayBehaviour::new(key, acceptor, &config.connections, asks_gateway))
        })?;
        let peer_id = *swarm.local_peer_id();
        let listen = listen_on_all(&mut swarm, &config.listen).await?;
        let media = media::MediaStore::open(data, config.settings.media_quota, Arc::clone(&metrics))?;
        let pusher = push::Pusher::start(data, &config.settings.push, Arc::clone(&metrics))?;
        let mut event_loop = net::EventLoop::new(
            swarm,
            inbound,
            net::Stores { mailboxes: store.clone(), media, pusher },
            config.settings.clone(),
            cert.clone(),
            Arc::clone(&metrics),
            listen.clone(),
        );
        match gateway {
            Some(gateway) => event_loop.ask_gateway(revocations::RevocationPoller::new(
                gateway,
                config.settings.gateway_key.clone(),
                cert,
                metrics.gateway_polls_failed.clone(),
            )),
            None => tracing::warn!(
                "no --gateway: revoked sessions and relays keep access here until their certificates expire"
            ),
        }
        event_loop.bootstrap(&bootstrap);

        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let stopped = shutdown.clone();
        tasks.spawn(async move {
            event_loop.run(stopped).await;
            Ended::TaskStopped
        });
        tasks.spawn(wait_for_store_recovery(store.clone(), data.clone(), shutdown.clone()));
        let http = match config.http {
            Some(addr) => Some(serve_http(addr, metrics, store, data.clone(), shutdown.clone(), &mut tasks).await?),
            None => None,
        };
        let ready =
            Ready { peer_id, listen: listen.into_iter().map(|a| a.with(Protocol::P2p(peer_id))).collect(), http };
        Ok(Relay { ready, tasks, shutdown })
    }

    /// Stops and waits for the tasks.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Waits until the relay ends on its own: its store recovered (the relay should restart),
    /// or a fatal error.
    pub async fn wait(&mut self) -> Ended {
        match self.tasks.join_next().await {
            Some(Ok(ended)) => ended,
            Some(Err(_)) | None => Ended::TaskStopped,
        }
    }
}

/// Once the store has failed, probes every [`DISK_PROBE_EVERY`] whether the disk under
/// `data_dir` takes writes again; ends then, with [`Ended::DiskTakesWritesAgain`].
async fn wait_for_store_recovery(store: StoreHandle, data_dir: PathBuf, shutdown: CancellationToken) -> Ended {
    let mut every = tokio::time::interval(DISK_PROBE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ended::TaskStopped,
            _ = every.tick() => {}
        }
        if store.failure().is_none() {
            continue;
        }
        let dir = data_dir.clone();
        match tokio::task::spawn_blocking(move || disk::probe(&dir)).await {
            Ok(Ok(())) => {
                tracing::warn!("{}", Ended::DiskTakesWritesAgain);
                return Ended::DiskTakesWritesAgain;
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "the store's disk still takes no writes"),
            Err(e) => tracing::warn!(error = %e, "the disk probe did not finish"),
        }
    }
}

/// An upload as a relay's index records it (see [`held_uploads`]).
#[derive(Debug, Clone, Serialize)]
pub struct HeldUpload {
    pub file_id: String,
    pub owner: meshgram_node::ids::UserId,
    pub total_parts: u32,
    pub saved: Vec<u32>,
}

/// The media chunks in a relay's data dir (`DATA/chunks`), sorted; what `inspect` lists.
pub fn held_chunks(data_dir: &Path) -> Result<Vec<meshgram_node::proto::media::ChunkHash>, String> {
    let root = data_dir.join(media::chunks::CHUNKS_DIR);
    media::chunks::list_chunks(&root).map(|(hashes, _)| hashes).map_err(|e| e.to_string())
}

/// The uploads a stopped relay's index (`DATA/media.redb`) records; none if it has none.
pub fn held_uploads(data_dir: &Path) -> Result<Vec<HeldUpload>, String> {
    let path = data_dir.join(media::uploads::MEDIA_DATABASE_FILE);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let index = media::uploads::UploadIndex::open(&path, u64::MAX).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut held = Vec::new();
    for file_id in index.uploads_blocking().map_err(|e| e.to_string())? {
        if let Some(status) = index.status_blocking(&file_id).map_err(|e| e.to_string())? {
            let (owner, total_parts, saved) = (status.owner, status.total_parts, status.saved);
            held.push(HeldUpload { file_id: file_id.to_string(), owner, total_parts, saved });
        }
    }
    Ok(held)
}

/// Reads this relay's certificate and checks that it is the gateway's, for this relay, and valid
/// now: a relay without one could not replicate (other relays refuse it), so it does not start.
fn load_cert(path: &Path, relay: &PeerId, gateway_key: &ed25519::PublicKey) -> Result<RelayCert, StartError> {
    let refused = |reason: String| StartError::Cert { peer_id: *relay, path: path.to_path_buf(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| refused(e.to_string()))?;
    let cert: RelayCert = serde_json::from_str(&text).map_err(|e| refused(format!("not a relay certificate: {e}")))?;
    cert.verify_for(gateway_key, relay, unix_now()).map_err(|e| refused(e.to_string()))?;
    Ok(cert)
}

/// The gateway's peer id (its key's) and where to dial it (any of `addrs`, the addresses of
/// the network's gateways); `None` without addresses. An address ending in `/p2p/<id>` must
/// name the peer whose key signs certificates.
fn gateway_addr(addrs: &[Multiaddr], key: &ed25519::PublicKey) -> Result<Option<revocations::GatewayAddr>, StartError> {
    if addrs.is_empty() {
        return Ok(None);
    }
    let expected = libp2p::identity::PublicKey::from(key.clone()).to_peer_id();
    let mut dials = Vec::new();
    for addr in addrs {
        let mut dial = addr.clone();
        if let Some(Protocol::P2p(named)) = dial.iter().last() {
            if named != expected {
                return Err(StartError::GatewayAddr { addr: addr.clone(), named, expected });
            }
            dial.pop();
        }
        dials.push(dial);
    }
    Ok(Some(revocations::GatewayAddr { peer: expected, addrs: dials }))
}

/// `/healthz` (503 with the reason once the store takes no writes) and `/metrics`.
async fn serve_http(
    addr: SocketAddr,
    metrics: Arc<metrics::Metrics>,
    store: StoreHandle,
    data_dir: PathBuf,
    shutdown: CancellationToken,
    tasks: &mut JoinSet<Ended>,
) -> Result<String, StartError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| StartError::Http { addr, source })?;
    let bound = listener.local_addr().map_err(|source| StartError::Http { addr, source })?;
    let health = store.clone();
    let app = axum::Router::new()
        .route(
            "/healthz",
            axum::routing::get(move || async move {
                match health.failure() {
                    None => (axum::http::StatusCode::OK, "ok".to_string()),
                    Some(why) => (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "the store takes no writes since one failed: {why}; the relay restarts once its disk \
                             takes writes again"
                        ),
                    ),
                }
            }),
        )
        .route(
            "/metrics",
            axum::routing::get(move || {
                let (metrics, store, data_dir) = (Arc::clone(&metrics), store.clone(), data_dir.clone());
                async move {
                    // Off the runtime: a read transaction and a few stats.
                    let text = tokio::task::spawn_blocking(move || scrape(&metrics, &store, &data_dir)).await;
                    let text = text.unwrap_or_else(|e| format!("# the scrape failed: {e}\n# EOF\n"));
                    (
                        [(axum::http::header::CONTENT_TYPE, meshgram_node::server::service::OPENMETRICS_CONTENT_TYPE)],
                        text,
                    )
                }
            }),
        );
    tasks.spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "HTTP server failed");
        }
        Ended::TaskStopped
    });
    Ok(format!("http://{bound}"))
}

/// `/metrics`: the gauges read at scrape time (the store's counts, the files' sizes), then
/// every metric's text.
fn scrape(metrics: &metrics::Metrics, store: &StoreHandle, data_dir: &Path) -> String {
    metrics.store_failed.set(i64::from(store.failure().is_some()));
    match store.counts() {
        Ok((mailboxes, envelopes)) => {
            metrics.mailboxes_stored.set(i64::try_from(mailboxes).unwrap_or(i64::MAX));
            metrics.envelopes_stored.set(i64::try_from(envelopes).unwrap_or(i64::MAX));
        }
        Err(e) => tracing::warn!(error = %e, "could not count the store's mailboxes for /metrics"),
    }
    let size = |name: &str| std::fs::metadata(data_dir.join(name)).map_or(0, |m| m.len());
    let database = data_dir.join(DATABASE_FILE);
    metrics.set_disk_use(metrics::DiskUse {
        mailbox_store: size(DATABASE_FILE),
        mailbox_log: std::fs::metadata(database.with_extension("wal")).map_or(0, |m| m.len()),
        media_index: size(media::uploads::MEDIA_DATABASE_FILE),
        push_registrations: size(push::PUSH_DATABASE_FILE),
    });
    metrics.encode()
}
