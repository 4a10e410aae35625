//! A client node's control socket: how the CLI (and anything else of the same user) reaches the
//! profile's running node.
//!
//! - `PROFILE/node.lock` is `flock`ed by the one process that is the profile's node and holds its
//!   pid. The kernel drops the lock when that process ends, however it ends, so a lock that can
//!   be taken means no node runs and any socket left behind is stale.
//! - `PROFILE/node.sock` is a unix socket, mode 0600; the node also checks each caller's uid
//!   (`SO_PEERCRED`) against its own, so another local user gets `FORBIDDEN` even if the file
//!   mode were wrong.
//!
//! The protocol is JSON lines. The caller writes one [`Call`] per line; the node answers each
//! with one line, `{"ok":<Reply>}` or `{"error":<ApiError>}`, in order. After `Subscribe` is
//! answered, every further line is an [`Event`] until either side hangs up. A line that is not
//! a call gets a `BAD_REQUEST` error line and the connection keeps serving; a line longer than
//! [`CONTROL_MAX_LINE`] gets one and the connection is closed (there is no way to resynchronize).

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast;
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;

use crate::client::api::{ApiError, Call, Event, Reply};
use crate::client::node::NodeHandle;
use crate::defaults::{CONTROL_MAX_LINE, PROFILE_BUSY_POLL, PROFILE_BUSY_WAIT};

/// The socket in a profile dir.
pub const SOCKET_FILE: &str = "node.sock";
/// The lock file in a profile dir.
pub const LOCK_FILE: &str = "node.lock";

/// One answer line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Answer {
    Ok(Reply),
    Error(ApiError),
}

/// Who holds a profile's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// A client node (`meshgram node`, a follower, the app), serving the socket.
    Node,
    /// One CLI command that found no node and opened the profile itself, for a moment.
    OneShot,
    /// `meshgram app`: the node with its web UI (whose address is in `PROFILE/app.json`),
    /// holding the profile even before it is signed in.
    App,
}

impl Holder {
    fn as_str(self) -> &'static str {
        match self {
            Holder::Node => "node",
            Holder::OneShot => "command",
            Holder::App => "app",
        }
    }
}

/// Why a process could not take over its profile.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another process holds the profile.
    #[error("{} already uses this profile{}", match .holder { Some(Holder::OneShot) => "another meshgram command", Some(Holder::App) => "the app (meshgram app)", _ => "a client node" }, .pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    AlreadyRunning { pid: Option<u32>, holder: Option<Holder> },
    /// The lock file or socket could not be set up.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        let code = match e {
            ControlError::AlreadyRunning { .. } => "NODE_RUNNING",
            ControlError::Io { .. } => "PROFILE",
        };
        ApiError::new(code, e.to_string())
    }
}

/// Proof that this process alone uses the profile, for as long as it is held.
#[derive(Debug)]
pub struct NodeLock {
    _file: File,
    profile: PathBuf,
}

impl NodeLock {
    /// Takes the profile's lock as `holder`, or says which process holds it.
    pub fn acquire(profile: &Path, holder: Holder) -> Result<NodeLock, ControlError> {
        let path = profile.join(LOCK_FILE);
        let io = |source| ControlError::Io { path: path.clone(), source };
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let mut words = text.split_whitespace();
                let pid = words.next().and_then(|p| p.parse().ok());
                let holder = words.next().map(|h| match h {
                    "command" => Holder::OneShot,
                    "app" => Holder::App,
                    _ => Holder::Node,
                });
                return Err(ControlError::AlreadyRunning { pid, holder });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).and_then(|()| write!(file, "{} {}", std::process::id(), holder.as_str())).map_err(io)?;
        Ok(NodeLock { _file: file, profile: profile.to_path_buf() })
    }
}

impl NodeLock {
    /// Like [`NodeLock::acquire`], but waits (bounded) while another one-shot command holds
    /// the profile for a moment; a running node is an answer at once.
    pub async fn acquire_when_free(profile: &Path, holder: Holder) -> Result<NodeLock, ControlError> {
        let deadline = tokio::time::Instant::now() + PROFILE_BUSY_WAIT;
        loop {
            match NodeLock::acquire(profile, holder) {
                Err(ControlError::AlreadyRunning { holder: Some(Holder::OneShot), .. })
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(PROFILE_BUSY_POLL).await;
                }
                other => return other,
            }
        }
    }
}

/// Serves a node's control socket; dropping it stops serving and removes the socket.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    _accept: AbortOnDropHandle<()>,
}

impl ControlServer {
    /// Binds `PROFILE/node.sock` (replacing a stale one: the lock says no node owns it) and
    /// serves `node` there.
    pub fn start(lock: &NodeLock, node: NodeHandle) -> Result<ControlServer, ControlError> {
        let path = lock.profile.join(SOCKET_FILE);
        let io = |source| ControlError::Io { path: path.clone(), source };
        match fs::remove_file(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
        let listener = UnixListener::bind(&path).map_err(|e| match e.kind() {
            ErrorKind::InvalidInput => io(std::io::Error::new(
                e.kind(),
                "the profile's path is too long for a unix socket (at most 107 bytes with /node.sock): use a shorter --profile",
            )),
            _ => io(e),
        })?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(io)?;
        let owner = fs::metadata(&path).map_err(io)?.uid();
        let accept = AbortOnDropHandle::new(tokio::spawn(accept_loop(listener, node, owner)));
        Ok(ControlServer { path, _accept: accept })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

async fn accept_loop(listener: UnixListener, node: NodeHandle, owner: u32) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, node.clone(), owner));
                }
                Err(e) => {
                    // Out of file descriptors, say: wait a little rather than spin.
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next() => {}
        }
    }
}

async fn serve_connection(stream: UnixStream, node: NodeHandle, owner: u32) {
    let caller = stream.peer_cred().map(|c| c.uid());
    let (read, mut write) = stream.into_split();
    if caller.as_ref().ok() != Some(&owner) {
        let who = caller.map_or_else(|e| format!("unknown ({e})"), |uid| uid.to_string());
        let refusal = ApiError::new("FORBIDDEN", format!("this client node belongs to uid {owner}, not {who}"));
        let _ = write_line(&mut write, &Answer::Error(refusal)).await;
        return;
    }
    let mut reader = BufReader::new(read);
    loop {
        let line = match read_line(&mut reader, CONTROL_MAX_LINE).await {
            Ok(Some(line)) => line,
            Ok(None) => return,
            Err(refusal) => {
                let _ = write_line(&mut write, &Answer::Error(refusal)).await;
                return;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let call = match serde_json::from_slice::<Call>(&line) {
            Ok(call) => call,
            Err(e) => {
                let refusal = ApiError::new("BAD_REQUEST", format!("not a call: {e}"));
                if write_line(&mut write, &Answer::Error(refusal)).await.is_err() {
                    return;
                }
                continue;
            }
        };
        if call == Call::Subscribe {
            stream_events(reader, write, node.subscribe()).await;
            return;
        }
        let answer = match node.call(call).await {
            Ok(reply) => Answer::Ok(reply),
            Err(e) => Answer::Error(e),
        };
        if write_line(&mut write, &answer).await.is_err() {
            return;
        }
    }
}

/// Writes events until the subscriber hangs up (or writes anything: a subscription is the last
/// thing on its connection).
async fn stream_events(
    mut reader: BufReader<OwnedReadHalf>,
    mut write: OwnedWriteHalf,
    mut events: broadcast::Receiver<Event>,
) {
    if write_line(&mut write, &Answer::Ok(Reply::Subscribed)).await.is_err() {
        return;
    }
    let mut byte = [0u8; 1];
    loop {
        let event = tokio::select! {
            event = next_event(&mut events) => match event {
                Some(event) => event,
                None => return,
            },
            _ = reader.read(&mut byte) => return,
        };
        if write_line(&mut write, &event).await.is_err() {
            return;
        }
    }
}

/// A subscriber's next event: the ones it was too slow for become one `Lagged`; `None` once
/// the node has stopped.
pub async fn next_event(events: &mut broadcast::Receiver<Event>) -> Option<Event> {
    match events.recv().await {
        Ok(event) => Some(event),
        Err(broadcast::error::RecvError::Lagged(missed)) => Some(Event::Lagged { missed }),
        Err(broadcast::error::RecvError::Closed) => None,
    }
}

/// One line without its newline; `None` at the end of input. A line over `max` bytes is refused.
async fn read_line(
    reader: &mut (impl AsyncBufReadExt + AsyncRead + Unpin),
    max: usize,
) -> Result<Option<Vec<u8>>, ApiError> {
    let mut line = Vec::new();
    let limit = (max as u64).saturating_add(1);
    let n = reader
        .take(limit)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| ApiError::new("BAD_REQUEST", format!("reading the control socket: {e}")))?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > max {
        return Err(ApiError::new("BAD_REQUEST", format!("a line is longer than {max} bytes")));
    }
    Ok(Some(line))
}

async fn write_line(write: &mut OwnedWriteHalf, value: &impl Serialize) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    write.write_all(&line).await
}

// ---------------------------------------------------------------------------------------------

/// A connection to the profile's running node.
#[derive(Debug)]
pub struct ControlClient {
    reader: BufReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
}

/// Events from a node, after [`ControlClient::subscribe`].
#[derive(Debug)]
pub struct EventStream {
    reader: BufReader<OwnedReadHalf>,
    _write: OwnedWriteHalf,
}

fn node_gone() -> ApiError {
    ApiError::new("NODE_GONE", "the client node closed the connection (it stopped or was killed)")
}

impl ControlClient {
    /// Connects to the profile's node; `None` when none runs (no socket, or one left behind by a
    /// node that was killed).
    pub async fn connect(profile: &Path) -> Result<Option<ControlClient>, ApiError> {
        let path = profile.join(SOCKET_FILE);
        match UnixStream::connect(&path).await {
            Ok(stream) => {
                let (read, write) = stream.into_split();
                Ok(Some(ControlClient { reader: BufReader::new(read), write }))
            }
            // No socket, a stale one, or a profile path too long for any socket (no node can
            // have bound it): no node runs.
            Err(e)
                if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused | ErrorKind::InvalidInput) =>
            {
                Ok(None)
            }
            Err(e) => Err(ApiError::new("PROFILE", format!("{}: {e}", path.display()))),
        }
    }

    /// Makes one call and waits for its answer.
    pub async fn call(&mut self, call: &Call) -> Result<Reply, ApiError> {
        // A node that refused the connection answered before it hung up: read that answer even
        // when the call could not be written.
        let written = write_line(&mut self.write, call).await;
        let answer = match self.answer().await {
            Err(_) if written.is_err() => return Err(node_gone()),
            answer => answer?,
        };
        match answer {
            Answer::Ok(reply) => Ok(reply),
            Answer::Error(e) => Err(e),
        }
    }

    async fn answer(&mut self) -> Result<Answer, ApiError> {
        // The node is this user's own process: its answers (a long history) are not bounded.
        let line = read_line(&mut self.reader, usize::MAX).await?.ok_or_else(node_gone)?;
        serde_json::from_slice(&line).map_err(|e| ApiError::new("INTERNAL", format!("the node's answer: {e}")))
    }

    /// Turns this connection into the node's event stream.
    pub async fn subscribe(mut self) -> Result<EventStream, ApiError> {
        match self.call(&Call::Subscribe).await? {
            Reply::Subscribed => Ok(EventStream { reader: self.reader, _write: self.write }),
            other => Err(ApiError::unexpected("subscribe", &other)),
        }
    }
}

impl EventStream {
    /// The next event; `Err(NODE_GONE)` when the node went away. Events this version does not
    /// know (from a newer node: the enum only grows) are skipped.
    pub async fn next(&mut self) -> Result<Event, ApiError> {
        loop {
            let line = read_line(&mut self.reader, usize::MAX).await?.ok_or_else(node_gone)?;
            match serde_json::from_slice(&line) {
                Ok(event) => return Ok(event),
                Err(e) => tracing::debug!(error = %e, "skipping an event this version does not know"),
            }
        }
    }
}
