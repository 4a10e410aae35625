//! `devices approve` and `backup`: calls that move the history, watched while they run like
//! `upload` and `download`.

use std::path::Path;

use meshgram_node::client::api::{ApiError, Call, Reply};
use meshgram_node::client::media::Direction;
use serde_json::json;

use super::output::{emit, human_bytes, to_json};
use super::transfer::{absolute, watched_call};
use super::{BackupCommand, CliError, CliResult};

/// `meshgram devices approve ID`.
pub(super) async fn approve(profile: &Path, json: bool, device: String) -> CliResult {
    match watched_call(profile, json, Direction::Upload, Call::ApproveDevice { device }).await? {
        Reply::HistorySent(sent) => {
            emit(json, to_json(&sent), || {
                format!(
                    "Sent the history ({} messages, {}) to {}; it appears there as soon as that device's node fetches it.",
                    sent.messages,
                    human_bytes(sent.bytes),
                    sent.device
                )
            });
            Ok(())
        }
        other => Err(CliError(ApiError::unexpected("devices approve", &other))),
    }
}

/// `meshgram backup create|restore`.
pub(super) async fn backup(profile: &Path, json: bool, command: BackupCommand) -> CliResult {
    match command {
        BackupCommand::Create { output, new_code, keep } => {
            let out = output.as_deref().map(absolute).transpose()?;
            match watched_call(profile, json, Direction::Upload, Call::BackupCreate { out, new_code, keep }).await? {
                Reply::BackupMade(made) => {
                    emit(json, to_json(&made), || {
                        let place = match &made.path {
                            Some(path) => path.display().to_string(),
                            None => "the relays".into(),
                        };
                        let mut text =
                            format!("Backed up {} messages ({}) to {place}.", made.messages, human_bytes(made.bytes));
                        if let Some(code) = &made.recovery_code {
                            text.push_str(&format!(
                                "\nRecovery code: {code}\nWrite it down and keep it safe: it is shown only now, and without it no backup can be restored."
                            ));
                        }
                        text
                    });
                    Ok(())
                }
                other => Err(CliError(ApiError::unexpected("backup create", &other))),
            }
        }
        BackupCommand::Restore { code, from } => {
            let code = match code {
                Some(code) => code,
                None => super::login::read_line("Recovery code: ").await?,
            };
            let from = from.as_deref().map(absolute).transpose()?;
            match watched_call(profile, json, Direction::Download, Call::BackupRestore { code, from }).await? {
                Reply::Restored(imported) => {
                    emit(json, json!({ "restored": imported }), || {
                        format!(
                            "Restored {} messages in {} chats ({} were here already).",
                            imported.new_messages, imported.chats, imported.merged_messages
                        )
                    });
                    Ok(())
                }
                other => Err(CliError(ApiError::unexpected("backup restore", &other))),
            }
        }
        BackupCommand::List | BackupCommand::Schedule { .. } => {
            Err(CliError::usage("this backup command is a plain call to the client node"))
        }
    }
}

/// `--every 6h`: seconds from a number and a unit (s, m, h, d).
pub(super) fn parse_every(every: &str) -> Result<u64, CliError> {
    let bad = || CliError::usage(format!("--every {every}: give a number and a unit, like 90s, 30m, 6h or 1d"));
    let every = every.trim();
    let (number, unit) = every.split_at(every.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: u64 = number.parse().map_err(|_| bad())?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(scale).ok_or_else(bad)
}
