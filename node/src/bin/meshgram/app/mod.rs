//! `meshgram app`: the profile's client node with its web UI on 127.0.0.1 (docs/app.md).
//!
//! - this file: the command — the profile's lock, the token, the listener, the ready line,
//!   opening the browser, and the node once the profile is signed in;
//! - [`http`]: the local API (calls, sign-in, uploads, ranged media, the event WebSocket) and
//!   the guards in front of it (Host, Origin, token);
//! - [`assets`]: the UI's files, embedded in the binary.
//!
//! The app holds the profile's lock from start to end (as `Holder::App`), signed in or not, so
//! a second `meshgram app` on the profile finds it and opens the running one (its address is in
//! `PROFILE/app.json`); once signed in it serves the control socket too, so the CLI's commands
//! go through the same node and what one sends the other shows at once.

mod assets;
mod http;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use meshgram_node::client::api::ApiError;
use meshgram_node::client::control::{ControlError, ControlServer, Holder, NodeLock};
use meshgram_node::client::node::{NodeHandle, NodeMode};
use meshgram_node::client::{GatewayAddr, SESSION_FILE};
use meshgram_node::proto::RelayInfo;
use meshgram_node::server::service::{print_ready, stop_requested};
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use super::cli::{CliError, CliResult};

/// How long the address the app opens in the browser works (once).
const LAUNCH_VALID: std::time::Duration = std::time::Duration::from_secs(120);
/// Where a running app says where it is (with its token: the profile dir is the user's only).
const APP_FILE: &str = "app.json";
/// The profile's app token, made once: the app's URL stays the same across restarts.
const TOKEN_FILE: &str = "app.token";
/// Files being received from the browser, until they are whole.
const UPLOADS_DIR: &str = "app-uploads";
/// Windows of files fetched for one answer to the browser, each unlinked once open.
const DOWNLOADS_DIR: &str = "app-downloads";
/// Files kept: those sent from the browser (the node serves their chunks to peers from here,
/// as it does from the path a CLI upload names) and cloud files fetched whole, served from
/// here again without the network. Secret chats' files are never kept.
const FILES_DIR: &str = "app-files";

/// How `meshgram app` was asked to run.
#[derive(Debug)]
pub(crate) struct AppOptions {
    pub(crate) port: u16,
    pub(crate) open: bool,
    /// Where to sign in, when the profile has no session yet.
    pub(crate) gateway: Option<(GatewayAddr, Vec<RelayInfo>)>,
    pub(crate) device_name: String,
    /// Exit when stdin closes (the parent, `meshgram up`, has gone).
    pub(crate) exit_on_stdin_close: bool,
}

/// `PROFILE/app.json`.
#[derive(Debug, Serialize, Deserialize)]
struct AppFile {
    url: String,
    pid: u32,
}

/// What the HTTP handlers share.
#[derive(Debug)]
pub(crate) struct App {
    profile: PathBuf,
    /// The profile's token: in the printed address, and for `Authorization: Bearer`.
    token: String,
    /// This run's session, the cookie's value.
    session: String,
    /// The one-time code in the address the app opens in the browser itself (a process's
    /// arguments are visible to other local users; the token must not be among them).
    launch: std::sync::Mutex<Option<(String, std::time::Instant)>>,
    port: u16,
    gateway: Option<(GatewayAddr, Vec<RelayInfo>)>,
    device_name: String,
    lock: NodeLock,
    /// The node, once the profile is signed in.
    node: RwLock<Option<Running>>,
    /// The device's client while it signs in (the same keys from code to session).
    signing_in: tokio::sync::Mutex<Option<meshgram_node::client::Client>>,
}

/// A signed-in profile's node and its control socket.
#[derive(Debug)]
struct Running {
    node: NodeHandle,
    _control: ControlServer,
}

impl App {
    /// The node, or `NOT_SIGNED_IN`.
    async fn node(&self) -> Result<NodeHandle, ApiError> {
        match &*self.node.read().await {
            Some(running) => Ok(running.node.clone()),
            None => Err(ApiError::new("NOT_SIGNED_IN", "sign in first")),
        }
    }

    /// Starts the node on the profile's session (at start, or right after signing in).
    async fn start_node(&self) -> Result<NodeHandle, ApiError> {
        let mut slot = self.node.write().await;
        if let Some(running) = &*slot {
            return Ok(running.node.clone());
        }
        let node = NodeHandle::start(&self.profile, NodeMode::Running).await?;
        let control = ControlServer::start(&self.lock, node.clone())?;
        *slot = Some(Running { node: node.clone(), _control: control });
        Ok(node)
    }

    /// Whether `code` is the launch code, used now (once, and within [`LAUNCH_VALID`]).
    fn take_launch_code(&self, code: &str) -> bool {
        let mut slot = self.launch.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let valid = slot.as_ref().is_some_and(|(c, made)| c == code && made.elapsed() < LAUNCH_VALID);
        if valid {
            *slot = None;
        }
        valid
    }

    /// A new launch code, for an address to open in the browser.
    fn launch_url(&self) -> String {
        let code = meshgram_node::ids::hex(&rand::random::<[u8; 16]>());
        let url = format!("{}/#launch={code}", self.origin());
        *self.launch.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((code, std::time::Instant::now()));
        url
    }

    fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

pub(crate) async fn run(profile: &Path, json: bool, options: AppOptions) -> CliResult {
    meshgram_node::client::session::keep_private(profile)?;
    let lock = match NodeLock::acquire_when_free(profile, Holder::App).await {
        Ok(lock) => lock,
        Err(ControlError::AlreadyRunning { holder: Some(Holder::App), pid }) => {
            return open_running(profile, json, options.open, pid);
        }
        Err(e @ ControlError::AlreadyRunning { .. }) => {
            return Err(CliError::from(ApiError::new(
                "NODE_RUNNING",
                format!("{e}; stop it, then start the app, which runs the profile's node itself"),
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let token = load_or_make_token(profile)?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", options.port))
        .await
        .map_err(|e| CliError::usage(format!("listening on 127.0.0.1:{}: {e}", options.port)))?;
    let port = listener.local_addr().map_err(|e| CliError::usage(e.to_string()))?.port();
    for dir in [UPLOADS_DIR, DOWNLOADS_DIR] {
        // What an earlier app left half done is of no use now.
        let _ = std::fs::remove_dir_all(profile.join(dir));
    }
    let app = Arc::new(App {
        profile: profile.to_path_buf(),
        token,
        session: meshgram_node::ids::hex(&rand::random::<[u8; 32]>()),
        launch: std::sync::Mutex::new(None),
        port,
        gateway: options.gateway,
        device_name: options.device_name,
        lock,
        node: RwLock::new(None),
        signing_in: tokio::sync::Mutex::new(None),
    });
    let signed_in = profile.join(SESSION_FILE).exists();
    if signed_in {
        app.start_node().await?;
    }
    let url = format!("{}/#token={}", app.origin(), app.token);
    write_app_file(profile, &AppFile { url: url.clone(), pid: std::process::id() })?;
    let server = axum::serve(listener, http::router(app.clone()));
    print_ready(
        "app",
        &serde_json::json!({ "url": url, "port": port, "pid": std::process::id(), "signed_in": signed_in }),
    )
    .map_err(|e| CliError::usage(e.to_string()))?;
    if !json {
        eprintln!("The Meshgram app runs at\n  {url}\nCtrl-C stops it.");
    }
    if options.open {
        open_browser(&app.launch_url());
    }
    let stopped = async {
        loop {
            match app.node().await {
                Ok(node) => return node.stopped().await,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
            }
        }
    };
    let result = tokio::select! {
        served = server.into_future() => served.map_err(|e| CliError::usage(format!("serving the app: {e}"))),
        why = stop_requested(options.exit_on_stdin_close) => {
            let why = why.map_err(|e| CliError::usage(format!("waiting for a signal: {e}")))?;
            tracing::info!(why, "app stopping");
            Ok(())
        }
        () = stopped => Err(CliError::from(ApiError::new("INTERNAL", "the client node stopped unexpectedly"))),
    };
    let _ = std::fs::remove_file(profile.join(APP_FILE));
    result
}

/// Another `meshgram app` runs on the profile: show (and open) its address instead.
fn open_running(profile: &Path, json: bool, open: bool, pid: Option<u32>) -> CliResult {
    let found = std::fs::read(profile.join(APP_FILE)).ok().and_then(|b| serde_json::from_slice::<AppFile>(&b).ok());
    let Some(running) = found else {
        let pid = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
        return Err(CliError::from(ApiError::new(
            "NODE_RUNNING",
            format!("the app already runs on this profile{pid} but has not said where yet; try again in a moment"),
        )));
    };
    if json {
        outln!("{}", serde_json::json!({ "url": running.url, "pid": running.pid, "already_running": true }));
    } else {
        outln!("The app already runs for this profile (pid {}):\n  {}", running.pid, running.url);
    }
    if open {
        open_browser(&running.url);
    }
    Ok(())
}

/// The profile's token: 32 random bytes as hex, in a 0600 file made once.
fn load_or_make_token(profile: &Path) -> Result<String, CliError> {
    let path = profile.join(TOKEN_FILE);
    let fail = |e: std::io::Error| CliError::usage(format!("{}: {e}", path.display()));
    match std::fs::read_to_string(&path) {
        Ok(token) if token.trim().len() == 64 && token.trim().bytes().all(|b| b.is_ascii_hexdigit()) => {
            return Ok(token.trim().to_string());
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e)),
    }
    let token = meshgram_node::ids::hex(&rand::random::<[u8; 32]>());
    write_private(&path, token.as_bytes()).map_err(fail)?;
    Ok(token)
}

fn write_app_file(profile: &Path, file: &AppFile) -> Result<(), CliError> {
    let path = profile.join(APP_FILE);
    let bytes = serde_json::to_vec(file).map_err(|e| CliError::usage(e.to_string()))?;
    write_private(&path, &bytes).map_err(|e| CliError::usage(format!("{}: {e}", path.display())))
}

/// Writes a file only its owner reads, whole or not at all.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Opens the URL in the desktop's browser; without one, the printed URL is the way in.
fn open_browser(url: &str) {
    let opened = std::process::Command::new("xdg-open")
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    if opened.is_err() {
        eprintln!("(no browser could be opened here: open the address above yourself)");
    }
}
