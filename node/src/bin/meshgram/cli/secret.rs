//! `meshgram secret …`: the calls, and how secret chats and their messages print.

use meshgram_node::client::api::{Call, Names, Reply};
use meshgram_node::client::secret::{SecretChatInfo, SecretMessage, SecretState};
use meshgram_node::ids::InvalidValue;
use serde_json::Value;

use super::output::{emit, human_bytes, name_of, to_json};
use super::{CliError, SecretCommand};

/// The call a `secret` command makes.
pub(super) async fn call_for(command: SecretCommand) -> Result<Call, CliError> {
    Ok(match command {
        SecretCommand::Start { to, device } => Call::SecretStart { to: super::calls::parse_query(&to)?, device },
        SecretCommand::Accept { chat } => Call::SecretAccept { chat },
        SecretCommand::Decline { chat } => Call::SecretDecline { chat },
        SecretCommand::Close { chat } => Call::SecretClose { chat },
        SecretCommand::Fingerprint { chat } => Call::SecretInfo { chat },
        SecretCommand::List => Call::SecretList,
        SecretCommand::Ttl { chat, timer } => {
            let secs = match timer.as_str() {
                "off" | "0" => None,
                every => Some(
                    u32::try_from(super::history::parse_every(every)?)
                        .map_err(|_| CliError::usage("a timer of at most a week"))?,
                ),
            };
            Call::SecretTtl { chat, secs }
        }
        SecretCommand::Send { chat, text, lines, file, reply_to } => {
            let reply_to = reply_to
                .map(|id| id.parse().map_err(|e: InvalidValue| CliError::usage(format!("--reply-to: {}", e.0))))
                .transpose()?;
            if let Some(path) = file {
                return Ok(Call::SecretUpload { chat, path, caption: text });
            }
            let texts = if lines { super::calls::stdin_lines().await? } else { text.into_iter().collect() };
            if texts.is_empty() {
                return Err(CliError::usage("nothing to send"));
            }
            Call::SecretSend { chat, texts, file: None, reply_to }
        }
    })
}

/// One secret chat as a line.
pub(super) fn chat_line(c: &SecretChatInfo) -> String {
    let ttl = c.ttl_secs.map_or("no timer".to_string(), |t| format!("timer {t} s"));
    let session = match c.generation {
        Some(g) => format!(
            "session {g} ({} re-keys{}): {} sent, {} received",
            c.rekeys,
            if c.rekey_pending { ", one under way" } else { "" },
            c.session_sent,
            c.session_received
        ),
        None => "no session".into(),
    };
    let next = match c.state {
        SecretState::Incoming => format!("\tmeshgram secret accept {}", c.id.fmt_short()),
        _ => String::new(),
    };
    format!(
        "{}\twith {} (device {})\t{}\t{ttl}\t{session}\t{} messages{next}",
        c.id.fmt_short(),
        c.peer,
        c.peer_device,
        c.state,
        c.messages
    )
}

/// A secret message as a line, like an ordinary one with a lock and its timer.
pub(super) fn message_line(m: &SecretMessage, names: &Names) -> String {
    let who = if m.outgoing { "me".to_string() } else { name_of(names, m.peer) };
    let file = match &m.file {
        Some(f) => format!("[file {} ({}, {}) — meshgram download {}] ", f.name, human_bytes(f.size), f.mime, m.id),
        None => String::new(),
    };
    let status = if m.outgoing { format!(" [{:?}]", m.status).to_lowercase() } else { String::new() };
    let timer = match (m.expires_at_ms, m.ttl_secs) {
        (Some(at), _) => {
            format!(" (destroyed in {} s)", at.saturating_sub(meshgram_node::ids::now_ms()).div_ceil(1000))
        }
        (None, Some(t)) => format!(" (timer {t} s once read)"),
        (None, None) => String::new(),
    };
    format!("[{}] 🔒 {who}: {file}{}{status}{timer}", m.id.fmt_short(), m.text)
}

/// A secret message as JSON: its own fields, marked `"secret": true`.
pub(super) fn message_json(m: &SecretMessage) -> Value {
    let mut value = to_json(m);
    if let Value::Object(fields) = &mut value {
        fields.insert("secret".into(), Value::Bool(true));
    }
    value
}

/// Prints a secret call's reply; `None` if it is not one.
pub(super) fn print(json: bool, call: &Call, reply: Reply) -> Result<Option<Reply>, CliError> {
    match (call, reply) {
        (Call::SecretInfo { .. }, Reply::SecretChat { chat }) => {
            emit(json, to_json(&chat), || match &chat.fingerprint {
                Some(f) => format!(
                    "Secret chat {} with {}. Compare with theirs, in person or on a call:\n{}\n{}",
                    chat.id.fmt_short(),
                    chat.peer,
                    f.emoji,
                    f.hex
                ),
                None => format!("Secret chat {} is {}: no fingerprint yet.", chat.id.fmt_short(), chat.state),
            })
        }
        (call, Reply::SecretChat { chat }) => emit(json, to_json(&chat), || match call {
            Call::SecretStart { .. } => format!(
                "Started secret chat {} with {}; it opens when their device accepts.",
                chat.id.fmt_short(),
                chat.peer
            ),
            Call::SecretAccept { .. } => format!(
                "Secret chat {} is open. Compare fingerprints: meshgram secret fingerprint {}",
                chat.id.fmt_short(),
                chat.id.fmt_short()
            ),
            Call::SecretTtl { .. } => match chat.ttl_secs {
                Some(t) => format!("New messages destroy themselves {t} s after they are read."),
                None => "Self-destruct timer off for new messages.".into(),
            },
            _ => format!("Secret chat {} is {}.", chat.id.fmt_short(), chat.state),
        }),
        (_, Reply::SecretChats { chats }) => emit(json, to_json(&chats), || {
            if chats.is_empty() {
                return "No secret chats: meshgram secret start @username".into();
            }
            chats.iter().map(chat_line).collect::<Vec<_>>().join("\n")
        }),
        (_, Reply::SecretMessages { messages }) => {
            let values: Vec<Value> = messages.iter().map(message_json).collect();
            emit(json, Value::Array(values), || {
                messages.iter().map(|m| message_line(m, &Names::new())).collect::<Vec<_>>().join("\n")
            })
        }
        (_, other) => return Ok(Some(other)),
    }
    Ok(None)
}
