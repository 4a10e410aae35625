//! `upload` and `download`: calls to the profile's node like the others, watched while they
//! run: a progress bar (bytes, rate, ETA) on a terminal, `{"event":"transfer",...}` lines with
//! `--json`, nothing otherwise.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use meshgram_node::client::api::{Call, Event, Reply};
use meshgram_node::client::control::{ControlClient, ControlError, Holder, NodeLock};
use meshgram_node::client::media::{ByteRange, Direction};
use meshgram_node::client::node::{NodeHandle, NodeMode};
use meshgram_node::defaults::{PROFILE_BUSY_POLL, PROFILE_BUSY_WAIT};
use tokio::sync::broadcast;
use tokio_util::task::AbortOnDropHandle;

use super::output::{human_bytes, to_json};
use super::{CliError, CliResult};

/// How progress shows.
#[derive(Clone)]
enum Show {
    Json,
    Bar(ProgressBar),
    Nothing,
}

impl Show {
    fn new(json: bool, direction: Direction) -> Self {
        if json {
            return Show::Json;
        }
        if !std::io::stderr().is_terminal() {
            return Show::Nothing;
        }
        let bar = ProgressBar::new(0);
        let verb = match direction {
            Direction::Upload => "uploading",
            Direction::Download => "downloading",
        };
        let template =
            format!("{verb} {{msg}} {{bar:30}} {{bytes}}/{{total_bytes}} {{binary_bytes_per_sec}} ETA {{eta}}");
        if let Ok(style) = ProgressStyle::with_template(&template) {
            bar.set_style(style);
        }
        Show::Bar(bar)
    }

    fn event(&self, direction: Direction, event: Event) {
        let Event::Transfer { progress } = event else { return };
        if progress.direction != direction {
            return;
        }
        match self {
            Show::Json => outln!("{}", to_json(&Event::Transfer { progress })),
            Show::Bar(bar) => {
                bar.set_message(progress.name.clone());
                bar.set_length(progress.total_bytes);
                bar.set_position(progress.done_bytes);
            }
            Show::Nothing => {}
        }
    }

    fn finish(&self) {
        if let Show::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// Makes a transfer call on the profile's node (the running one, or one opened for it), showing
/// its progress meanwhile.
pub(super) async fn watched_call(
    profile: &Path,
    json: bool,
    direction: Direction,
    call: Call,
) -> Result<Reply, CliError> {
    let show = Show::new(json, direction);
    let deadline = tokio::time::Instant::now() + PROFILE_BUSY_WAIT;
    let answer = loop {
        if let Some(mut node) = ControlClient::connect(profile).await? {
            let _watching = match ControlClient::connect(profile).await? {
                Some(watcher) => {
                    let mut events = watcher.subscribe().await?;
                    let show = show.clone();
                    Some(AbortOnDropHandle::new(tokio::spawn(async move {
                        while let Ok(event) = events.next().await {
                            show.event(direction, event);
                        }
                    })))
                }
                None => None,
            };
            break node.call(&call).await.map_err(CliError::from);
        }
        match NodeLock::acquire(profile, Holder::OneShot) {
            Ok(_lock) => {
                let node = NodeHandle::start(profile, NodeMode::OneShot).await?;
                let mut events = node.subscribe();
                let show = show.clone();
                let _watching = AbortOnDropHandle::new(tokio::spawn(async move {
                    loop {
                        match events.recv().await {
                            Ok(event) => show.event(direction, event),
                            Err(broadcast::error::RecvError::Lagged(_)) => {}
                            Err(broadcast::error::RecvError::Closed) => return,
                        }
                    }
                }));
                break node.call(call).await.map_err(CliError::from);
            }
            Err(ControlError::AlreadyRunning { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(PROFILE_BUSY_POLL).await;
            }
            Err(e) => {
                super::require_session(profile)?;
                return Err(e.into());
            }
        }
    };
    show.finish();
    answer
}

/// An absolute path, so that a node running elsewhere reads or writes the same file.
pub(super) fn absolute(path: &Path) -> Result<PathBuf, CliError> {
    std::path::absolute(path).map_err(|e| CliError::usage(format!("{}: {e}", path.display())))
}

/// `meshgram upload FILE --to WHO`.
pub(super) async fn upload(
    profile: &Path,
    json: bool,
    file: &Path,
    to: &str,
    caption: Option<String>,
    part_size_kib: u32,
) -> CliResult {
    let path = std::fs::canonicalize(file).map_err(|e| CliError::usage(format!("{}: {e}", file.display())))?;
    let to = super::calls::parse_query(to)?;
    let part_size = part_size_kib.checked_mul(1024).ok_or_else(|| CliError::usage("--part-size-kib is too large"))?;
    let call = Call::Upload { path, to, caption, part_size: Some(part_size) };
    match watched_call(profile, json, Direction::Upload, call).await? {
        Reply::Message { message } => {
            let size = message.file.as_ref().map_or(0, |f| f.size);
            super::output::emit(json, to_json(&message), || {
                format!("Sent {} ({}) as message {}.", file.display(), human_bytes(size), message.id)
            });
            Ok(())
        }
        other => Err(CliError(meshgram_node::client::api::ApiError::unexpected("upload", &other))),
    }
}

/// `meshgram download MESSAGE_ID [-o PATH]`.
pub(super) async fn download(
    profile: &Path,
    json: bool,
    message_id: &str,
    output: Option<&Path>,
    range: Option<&str>,
) -> CliResult {
    let message = message_id
        .parse()
        .map_err(|e: meshgram_node::ids::InvalidValue| CliError::usage(format!("message id: {}", e.0)))?;
    let range = range.map(|r| r.parse::<ByteRange>().map_err(CliError::usage)).transpose()?;
    // Without -o, the file goes into this command's directory (not the node's).
    let out = absolute(output.unwrap_or(Path::new(".")))?;
    match watched_call(profile, json, Direction::Download, Call::Download { message, out: Some(out), range }).await? {
        Reply::Downloaded(done) => {
            super::output::emit(json, to_json(&done), || {
                format!("Saved {} ({}) to {}.", done.name, human_bytes(done.size), done.path.display())
            });
            Ok(())
        }
        other => Err(CliError(meshgram_node::client::api::ApiError::unexpected("download", &other))),
    }
}
