//! Meshgram gateway: the Auth & Session Service.
//!
//! Layout, in the order a request flows through it:
//! - [`net`]: the event loop that owns the libp2p `Swarm`; each `/meshgram/auth/1` request is
//!   handed to the service on a blocking thread and answered on its channel.
//! - [`service`]: the rules — login codes, sign-in, 2FA, sessions, profiles, directory, bots,
//!   and the signed revocations relays poll for (ended sessions, revoked relays).
//! - [`store`]: accounts, sessions, codes, bot tokens and revocations, in a redb file or in
//!   PostgreSQL (shared by several gateways); one transaction per request.
//! - [`code_sender`]: where login codes go (a file, or an SMS provider's webhook).
//! - [`http`]: `/healthz`, `/metrics`, and the operator's admin endpoint for bots and relays.
//! - `behaviour`, [`config`], [`defaults`], [`metrics`]: configuration, tunables, Prometheus counters.
//!
//! [`Gateway::start`] wires them together; `main.rs` only parses flags and prints the ready line.

mod behaviour;
pub mod code_sender;
pub mod config;
pub mod defaults;
pub mod http;
pub mod metrics;
mod net;
pub mod service;
pub mod store;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use libp2p::{Multiaddr, PeerId, multiaddr::Protocol};
use meshgram_node::crypto::identity::{KeyFileError, load_or_create_ed25519, write_secret};
use meshgram_node::defaults::SERVER_IDLE_TIMEOUT;
use meshgram_node::ids::hex;
use meshgram_node::net::transport::{TransportError, build_swarm, listen_on_all};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::code_sender::{CodeSendError, CodeSender};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::service::AuthService;
use crate::store::{Store, StoreError};

pub use meshgram_node::defaults::GATEWAY_KEY_FILE;
/// The database inside its data dir.
pub const DATABASE_FILE: &str = "gateway.redb";
/// Where a running gateway tells operator commands how to reach its admin endpoint.
pub const ADMIN_FILE: &str = "admin.json";

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data dir {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Key(#[from] KeyFileError),
    #[error("database {what}: {source}")]
    Store { what: String, source: StoreError },
    #[error(transparent)]
    CodeSink(#[from] CodeSendError),
    #[error("config: {0}")]
    Config(String),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("could not serve HTTP on {addr}: {source}")]
    Http { addr: SocketAddr, source: std::io::Error },
}

/// What the ready line reports.
#[derive(Debug, Clone, Serialize)]
pub struct Ready {
    pub peer_id: PeerId,
    /// Listen addresses, each ending in `/p2p/<peer_id>`, ready to paste into `--gateway`.
    pub listen: Vec<Multiaddr>,
    pub http: Option<String>,
    /// Hex ed25519 key that verifies session certificates.
    pub public_key: String,
    pub code_sink: String,
}

/// How operator commands reach a running gateway's admin endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminFile {
    pub url: String,
    pub token: String,
}

impl AdminFile {
    /// Reads `admin.json` from a data dir.
    pub fn load(data_dir: &Path) -> Result<Self, String> {
        let path = data_dir.join(ADMIN_FILE);
        let bytes = std::fs::read(&path)
            .map_err(|e| format!("{}: {e} (is a gateway with --http running on this data dir?)", path.display()))?;
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// The gateway's database: PostgreSQL at `database` if given (TLS roots from `ca`), else the
/// redb file in `data`.
async fn open_store(data: &Path, database: Option<String>, ca: Option<PathBuf>) -> Result<Store, StartError> {
    match database {
        // The PostgreSQL client blocks: connect off the async threads.
        Some(url) => tokio::task::spawn_blocking(move || Store::connect(&url, ca.as_deref()))
            .await
            .unwrap_or_else(|e| Err(StoreError::Unavailable(format!("connecting stopped: {e}"))))
            .map_err(|source| StartError::Store { what: "(PostgreSQL)".into(), source }),
        None => {
            let path = data.join(DATABASE_FILE);
            Store::open(&path).map_err(|source| StartError::Store { what: path.display().to_string(), source })
        }
    }
}

/// A running gateway. Dropping it stops every task.
#[derive(Debug)]
pub struct Gateway {
    pub ready: Ready,
    tasks: JoinSet<()>,
    shutdown: CancellationToken,
}

impl Gateway {
    /// Opens the data dir, binds every listener and starts serving.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        config.limits.validate().map_err(StartError::Config)?;
        let data = &config.data_dir;
        std::fs::create_dir_all(data).map_err(|source| StartError::DataDir { path: data.clone(), source })?;
        let keypair = load_or_create_ed25519(&data.join(GATEWAY_KEY_FILE))?;
        let signer = keypair.clone().try_into_ed25519().expect("invariant: gateway keys are created as ed25519");
        let store = open_store(data, config.database.clone(), config.database_ca.clone()).await?;
        let sink = config.code_sink.clone().unwrap_or_else(|| format!("file:{}", data.join("codes.log").display()));
        let sender = CodeSender::parse(&sink)?;
        let metrics = Arc::new(Metrics::new());
        let service = Arc::new(AuthService::new(
            store,
            signer.clone(),
            sender.clone(),
            config.limits.clone(),
            tokio::runtime::Handle::current(),
            Arc::clone(&metrics),
        ));

        let mut swarm = build_swarm(keypair, SERVER_IDLE_TIMEOUT, behaviour::GatewayBehaviour::new)?;
        let peer_id = *swarm.local_peer_id();
        let listen = listen_on_all(&mut swarm, &config.listen).await?;
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        tasks.spawn(net::run(swarm, Arc::clone(&service), shutdown.clone()));

        let http = match config.http {
            Some(addr) => {
                Some(serve_http(addr, data, Arc::clone(&service), metrics, shutdown.clone(), &mut tasks).await?)
            }
            None => None,
        };
        let ready = Ready {
            peer_id,
            listen: listen.into_iter().map(|a| a.with(Protocol::P2p(peer_id))).collect(),
            http,
            public_key: hex(&signer.public().to_bytes()),
            code_sink: sender.describe(),
        };
        Ok(Gateway { ready, tasks, shutdown })
    }

    /// Stops accepting work and waits for the tasks to finish.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Waits until a task ends on its own (which only happens on a fatal error).
    pub async fn wait(&mut self) {
        self.tasks.join_next().await;
    }
}

/// Binds HTTP, writes `admin.json` with a fresh token, and serves until shutdown.
async fn serve_http(
    addr: SocketAddr,
    data: &Path,
    service: Arc<AuthService>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tasks: &mut JoinSet<()>,
) -> Result<String, StartError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| StartError::Http { addr, source })?;
    let bound = listener.local_addr().map_err(|source| StartError::Http { addr, source })?;
    let url = format!("http://{bound}");
    let token = hex(&rand::random::<[u8; 32]>());
    let admin = serde_json::to_vec(&AdminFile { url: url.clone(), token: token.clone() })
        .expect("invariant: AdminFile serializes");
    write_secret(&data.join(ADMIN_FILE), &admin)?;
    let app = http::router(http::HttpState { service, metrics, admin_token: Arc::new(token) });
    tasks.spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    Ok(url)
}
