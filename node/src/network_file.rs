//! `network.json`: what `meshgram up` started and where, so that clients, tests and people can
//! find the gateway, relays, bot API and app without copying addresses around.

use std::path::{Path, PathBuf};

use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

/// File name inside the `up` data dir.
pub const NETWORK_FILE: &str = "network.json";

/// A network file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("network file {path}: {reason}")]
pub struct NetworkFileError {
    pub path: PathBuf,
    pub reason: String,
}

/// The whole local network.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkFile {
    pub gateway: GatewayEntry,
    /// Relay nodes (empty until the relay role exists).
    #[serde(default)]
    pub relays: Vec<NodeEntry>,
    /// Bot API base URL, once the bot bridge runs.
    #[serde(default)]
    pub bot_api: Option<String>,
    /// Desktop app URL, once the app runs.
    #[serde(default)]
    pub app: Option<String>,
}

/// The gateway's entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayEntry {
    pub peer_id: PeerId,
    pub addrs: Vec<Multiaddr>,
    /// Hex ed25519 key relays verify certificates with.
    pub public_key: String,
    /// The file login codes are appended to.
    pub code_sink: PathBuf,
    /// Health and metrics.
    pub http: Option<String>,
}

/// A node's entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeEntry {
    pub peer_id: PeerId,
    pub addrs: Vec<Multiaddr>,
    /// Health and metrics (`/healthz`, `/metrics`), when it serves them.
    #[serde(default)]
    pub http: Option<String>,
}

impl NetworkFile {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, NetworkFileError> {
        let err = |reason: String| NetworkFileError { path: path.to_path_buf(), reason };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        serde_json::from_slice(&bytes).map_err(|e| err(format!("not a Meshgram network file: {e}")))
    }

    /// Writes it atomically.
    pub fn save(&self, path: &Path) -> Result<(), NetworkFileError> {
        let err = |reason: String| NetworkFileError { path: path.to_path_buf(), reason };
        let json = serde_json::to_vec_pretty(self).map_err(|e| err(e.to_string()))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, json).and_then(|()| std::fs::rename(&tmp, path)).map_err(|e| err(e.to_string()))
    }
}
