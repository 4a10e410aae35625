//! `meshgram node`: the profile's client node in the foreground, until Ctrl-C or SIGTERM.

use std::path::Path;

use meshgram_node::client::control::{ControlServer, Holder, NodeLock};
use meshgram_node::client::node::{NodeHandle, NodeMode};
use meshgram_node::server::service::{print_ready, stop_requested};
use serde::Serialize;

use meshgram_node::client::api::ApiError;

use super::{CliError, CliResult};

/// The ready line's fields (like every server binary's: one JSON line on stdout).
#[derive(Serialize)]
struct Ready {
    user_id: meshgram_node::ids::UserId,
    peer_id: String,
    socket: String,
    pid: u32,
}

pub(super) async fn run(profile: &Path, json: bool) -> CliResult {
    super::require_session(profile)?;
    let lock = NodeLock::acquire_when_free(profile, Holder::Node).await?;
    let node = NodeHandle::start(profile, NodeMode::Running).await?;
    let server = ControlServer::start(&lock, node.clone())?;
    let ready = Ready {
        user_id: node.user_id(),
        peer_id: node.device().to_string(),
        socket: server.path().display().to_string(),
        pid: std::process::id(),
    };
    print_ready("node", &ready).map_err(|e| CliError::usage(e.to_string()))?;
    if !json {
        eprintln!(
            "The client node for user {} runs (pid {}); this profile's commands now go through it. Ctrl-C stops it.",
            ready.user_id, ready.pid
        );
    }
    tokio::select! {
        why = stop_requested(false) => {
            let why = why.map_err(|e| CliError::usage(format!("waiting for a signal: {e}")))?;
            tracing::info!(why, "client node stopping");
            Ok(())
        }
        // A node that cannot answer any more must not keep the profile's lock and socket.
        () = node.stopped() => Err(CliError(ApiError::new("INTERNAL", "the client node stopped unexpectedly"))),
    }
}
