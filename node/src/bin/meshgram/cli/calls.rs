//! Commands that are one call to the profile's client node: through its control socket when a
//! node runs, otherwise on a node opened for this command alone. Either way the reply is the
//! same, and so is what prints.

use std::io::BufRead;
use std::path::Path;

use meshgram_node::client::api::{ApiError, Call, Reply};
use meshgram_node::client::buttons::Pressed;
use meshgram_node::client::control::{ControlClient, ControlError, Holder, NodeLock};
use meshgram_node::client::history::PressAnswer;
use meshgram_node::client::node::{NodeHandle, NodeMode};
use meshgram_node::client::push::{PushRelay, PushSubscription};
use meshgram_node::defaults::{PROFILE_BUSY_POLL, PROFILE_BUSY_WAIT};
use meshgram_node::ids::InvalidValue;
use meshgram_node::proto::LookupQuery;
use meshgram_node::proto::payload::{MessageId, Status};
use serde_json::{Value, json};

use super::output::{describe, emit, message_line, to_json};
use super::{
    BackupCommand, BotCommand, CliError, CliResult, Command, DevicesCommand, PasswordCommand, ProfileCommand,
    PushCommand, SessionsCommand,
};

/// Makes `call` on the profile's node: the running one if there is one, else one opened for
/// this call, holding the profile's lock meanwhile (so no node starts under it). A node that is
/// still starting, or another one-shot command, is waited for (bounded).
pub(super) async fn call_node(profile: &Path, call: Call) -> Result<Reply, CliError> {
    let deadline = tokio::time::Instant::now() + PROFILE_BUSY_WAIT;
    loop {
        if let Some(mut node) = ControlClient::connect(profile).await? {
            return Ok(node.call(&call).await?);
        }
        match NodeLock::acquire(profile, Holder::OneShot) {
            Ok(_lock) => {
                let node = NodeHandle::start(profile, NodeMode::OneShot).await?;
                return Ok(node.call(call).await?);
            }
            Err(ControlError::AlreadyRunning { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(PROFILE_BUSY_POLL).await;
            }
            Err(e) => {
                // A profile that never signed in has no lock file to take either: say the former.
                super::require_session(profile)?;
                return Err(e.into());
            }
        }
    }
}

/// One device in `meshgram devices`.
fn device_line(d: &meshgram_node::client::devices::DeviceInfo) -> String {
    let mut line =
        format!("{}\t{}\tkey {}\tlast seen {}", d.device, d.name, d.fingerprint, super::output::ago(d.last_seen));
    if d.current {
        line.push_str("\t(this device)");
    }
    if d.asked_for_history {
        // The id's tail names it (a part of the id only it has will do).
        let id = d.device.to_string();
        line.push_str(&format!(
            "\tasks for the history: meshgram devices approve {}",
            &id[id.len().saturating_sub(10)..]
        ));
    }
    if d.history_sent_at.is_some() {
        line.push_str("\thistory sent");
    }
    line
}

fn unexpected(reply: &Reply) -> CliError {
    CliError(ApiError::unexpected("this command", reply))
}

pub(super) fn parse_query(s: &str) -> Result<LookupQuery, CliError> {
    s.parse().map_err(|e: InvalidValue| CliError::usage(e.0))
}

fn parse_message_id(s: &str) -> Result<MessageId, CliError> {
    s.parse().map_err(|e: InvalidValue| {
        // `messages` shows the last 8 digits; a command needs all 32.
        let hint = if s.len() < 32 && s.chars().all(|c| c.is_ascii_hexdigit()) {
            " (the short id `messages` shows is its end: `messages CHAT --json` shows whole ids)"
        } else {
            ""
        };
        CliError::usage(format!("message id: {}{hint}", e.0))
    })
}

/// The call a command makes.
async fn call_for(command: Command) -> Result<Call, CliError> {
    Ok(match command {
        Command::Whoami => Call::Whoami,
        Command::Renew => Call::Renew,
        Command::Profile(ProfileCommand::Set { username, name }) => {
            if username.is_none() && name.is_none() {
                return Err(CliError::usage("give --username and/or --name"));
            }
            Call::SetProfile { username, name }
        }
        Command::Password(PasswordCommand::Set { new, current }) => {
            let new = match new {
                Some(new) => new,
                None => super::login::read_line("New password: ").await?,
            };
            Call::SetPassword { current, new: Some(new) }
        }
        Command::Password(PasswordCommand::Clear { current }) => {
            let current = match current {
                Some(current) => current,
                None => super::login::read_line("Current password: ").await?,
            };
            Call::SetPassword { current: Some(current), new: None }
        }
        Command::Lookup { query } => Call::Lookup { query: parse_query(&query)? },
        Command::Sessions { command: None | Some(SessionsCommand::List) } => Call::Sessions,
        Command::Sessions { command: Some(SessionsCommand::Revoke { session_id, others }) } => {
            let session_id = if others {
                None
            } else {
                Some(session_id.unwrap_or_default().parse().map_err(|e: InvalidValue| CliError::usage(e.0))?)
            };
            Call::RevokeSessions { session_id }
        }
        Command::Bot(BotCommand::Create { username, name }) => Call::CreateBot { username, name },
        Command::Bot(BotCommand::List) => Call::ListBots,
        Command::Bot(BotCommand::Commands { bot }) => Call::BotCommands { bot: parse_query(&bot)? },
        Command::Bot(BotCommand::RevokeToken { bot_id }) => {
            Call::RevokeBotToken { bot: bot_id.parse().map_err(|e: InvalidValue| CliError::usage(e.0))? }
        }
        Command::Send { to, text, lines, reply_to } => {
            let to = parse_query(&to)?;
            let reply_to = reply_to
                .map(|id| id.parse().map_err(|e: InvalidValue| CliError::usage(format!("--reply-to: {}", e.0))))
                .transpose()?;
            let texts = if lines { stdin_lines().await? } else { vec![text.unwrap_or_default()] };
            if texts.is_empty() {
                return Err(CliError::usage("nothing to send"));
            }
            Call::Send { to, texts, reply_to }
        }
        Command::Messages { chat, .. } => {
            Call::Messages { chat: chat.as_deref().map(parse_query).transpose()?, limit: None }
        }
        Command::Chats => Call::Chats,
        Command::Edit { message_id, text } => Call::Edit { message: parse_message_id(&message_id)?, text },
        Command::Press { message_id, button } => Call::Press { message: parse_message_id(&message_id)?, button },
        Command::Delete { message_id } => Call::Delete { message: parse_message_id(&message_id)? },
        Command::Typing { to } => Call::Typing { to: parse_query(&to)? },
        Command::Forward { message_id, to } => {
            Call::Forward { message: parse_message_id(&message_id)?, to: parse_query(&to)? }
        }
        Command::Devices { command: None | Some(DevicesCommand::List) } => Call::Devices,
        Command::Devices { command: Some(DevicesCommand::Remove { device }) } => Call::RemoveDevice { device },
        Command::Backup(BackupCommand::List) => Call::BackupList,
        Command::Secret(command) => super::secret::call_for(command).await?,
        Command::Group(command) => super::group::call_for(command)?,
        Command::Join { link } => Call::Join { link },
        Command::Push(PushCommand::Register { url, p256dh, auth }) => {
            Call::PushRegister { subscription: PushSubscription { url, p256dh, auth } }
        }
        Command::Push(PushCommand::Status) => Call::PushStatus,
        Command::Push(PushCommand::Unregister) => Call::PushUnregister,
        Command::Channel(command) => super::group::channel_call_for(command)?,
        Command::Backup(BackupCommand::Schedule { every, keep, off }) => Call::BackupSchedule {
            every_secs: every.as_deref().map(super::history::parse_every).transpose()?,
            keep,
            off,
        },
        Command::Login { .. }
        | Command::Devices { command: Some(DevicesCommand::Approve { .. }) }
        | Command::Backup(BackupCommand::Create { .. } | BackupCommand::Restore { .. })
        | Command::Node
        | Command::App { .. }
        | Command::Up { .. }
        | Command::Upload { .. }
        | Command::Download { .. } => {
            return Err(CliError::usage("this command is not a call to the client node"));
        }
    })
}

/// The non-blank lines of stdin, for `send --lines`.
pub(super) async fn stdin_lines() -> Result<Vec<String>, CliError> {
    let lines = tokio::task::spawn_blocking(|| std::io::stdin().lock().lines().collect::<Result<Vec<String>, _>>())
        .await
        .map_err(|e| CliError::usage(format!("reading stdin: {e}")))?
        .map_err(|e| CliError::usage(format!("reading stdin: {e}")))?;
    Ok(lines.into_iter().filter(|l| !l.trim().is_empty()).collect())
}

/// Runs a command that is a call, and prints its reply.
pub(super) async fn run(profile: &Path, json: bool, command: Command) -> CliResult {
    let call = call_for(command).await?;
    let reply = call_node(profile, call.clone()).await?;
    print(json, &call, reply)
}

pub(super) fn print(json: bool, call: &Call, reply: Reply) -> CliResult {
    let Some(reply) = super::secret::print(json, call, reply)? else { return Ok(()) };
    let Some(reply) = super::group::print(json, call, reply) else { return Ok(()) };
    match (call, reply) {
        (Call::Whoami, Reply::Me(me)) => {
            let a = &me.account;
            emit(
                json,
                json!({
                    "account": a,
                    "session_id": me.session_id,
                    "device": me.device.to_string(),
                    "cert_not_after": me.cert_not_after,
                    "dropped_envelopes": me.dropped_envelopes,
                }),
                || {
                    [
                        format!("{} — {:?} account {}", describe(a), a.kind, a.user_id),
                        format!("phone: {}", a.phone.as_ref().map(|p| p.to_string()).unwrap_or_else(|| "-".into())),
                        format!(
                            "username: {}",
                            a.username.as_ref().map(|u| u.to_string()).unwrap_or_else(|| "-".into())
                        ),
                        format!("2FA password: {}", if a.has_password { "on" } else { "off" }),
                        format!("device: {} (session {})", me.device, me.session_id),
                        format!("envelopes dropped as forged or malformed: {}", me.dropped_envelopes),
                    ]
                    .join("\n")
                },
            );
        }
        (Call::Renew, Reply::Me(me)) => {
            emit(json, json!({ "session_id": me.session_id, "cert_not_after": me.cert_not_after }), || {
                format!("Certificate renewed; valid until {} (unix).", me.cert_not_after)
            });
        }
        (_, Reply::Account { account }) => {
            emit(json, to_json(&account), || format!("Updated: {}", describe(&account)));
        }
        (_, Reply::Card { card }) => emit(json, to_json(&card), || {
            let name = card.username.as_ref().map(|u| u.to_string()).unwrap_or_default();
            let mut out = format!(
                "{} {} — {:?} account {}, {} device(s)",
                card.name,
                name,
                card.kind,
                card.user_id,
                card.devices.len()
            );
            for d in &card.devices {
                out.push_str(&format!("\n  {} noise key {}", d.peer_id, d.noise_key().fmt_short()));
            }
            out
        }),
        (_, Reply::Sessions { sessions }) => emit(json, to_json(&sessions), || {
            sessions
                .iter()
                .map(|s| {
                    let current = if s.current { " (this device)" } else { "" };
                    format!("{}{current}\t{}\t{}", s.session_id, s.device_name, s.device)
                })
                .collect::<Vec<_>>()
                .join("\n")
        }),
        (_, Reply::Revoked { count }) => {
            emit(json, json!({ "revoked": count }), || format!("Ended {count} session(s)."))
        }
        (_, Reply::BotToken { bot, token }) => emit(json, json!({ "bot": bot, "token": token }), || {
            format!(
                "Bot {} (id {}) is ready.\nToken: {token}\nKeep the token secret: anyone with it controls the bot.",
                describe(&bot),
                bot.user_id
            )
        }),
        (_, Reply::Bots { bots }) => emit(json, to_json(&bots), || {
            bots.iter().map(|b| format!("{}\t{}", b.user_id, describe(b))).collect::<Vec<_>>().join("\n")
        }),
        (Call::Send { .. }, Reply::Messages { messages, .. }) => {
            let ids: Vec<String> = messages.iter().map(|m| m.id.to_string()).collect();
            let pending = messages.iter().any(|m| m.status == Status::Pending);
            let status = if pending { "pending" } else { "sent" };
            emit(json, json!({ "sent": messages.len(), "ids": ids, "status": status }), || {
                let what = match messages.as_slice() {
                    [one] => format!("(id {})", one.id),
                    many => format!("{} messages", many.len()),
                };
                if pending {
                    format!("Queued {what}: no relay can take it now; it goes out as soon as one can.")
                } else {
                    format!("Sent {what}.")
                }
            });
        }
        (_, Reply::Messages { messages, names, secret }) => {
            // A group's messages name it by its id (its chat number is the history's own).
            let group = match call {
                Call::Messages { chat: Some(LookupQuery::Group(group)), .. } => Some(group.to_string()),
                _ => None,
            };
            let message_json = |m| {
                let mut value = to_json(m);
                if let Some(group) = &group {
                    value["group"] = json!(group);
                }
                value
            };
            // Ordinary and secret messages together, by the time they were sent.
            let mut shown: Vec<(u64, Value, String)> =
                messages.iter().map(|m| (m.sent_at_ms, message_json(m), message_line(m, &names))).collect();
            shown.extend(
                secret
                    .iter()
                    .map(|m| (m.sent_at_ms, super::secret::message_json(m), super::secret::message_line(m, &names))),
            );
            if !secret.is_empty() {
                shown.sort_by_key(|(at, _, _)| *at);
            }
            let (values, lines): (Vec<Value>, Vec<String>) = shown.into_iter().map(|(_, v, l)| (v, l)).unzip();
            emit(json, Value::Array(values), || lines.join("\n"))
        }
        (_, Reply::Chats { chats, names }) => {
            let value: Vec<Value> = chats
                .iter()
                .map(|c| {
                    json!({
                        "chat": c.chat, "id": c.id, "kind": c.kind, "name": c.name, "messages": c.messages,
                        "unread": c.unread, "mentions": c.mentions, "last": c.last,
                    })
                })
                .collect();
            emit(json, Value::Array(value), || {
                chats
                    .iter()
                    .map(|c| {
                        let mut names = names.clone();
                        names.insert(c.chat, c.name.clone());
                        let unread = match (c.unread, c.mentions) {
                            (0, _) => String::new(),
                            (n, 0) => format!("\t{n} unread"),
                            (n, m) => format!("\t{n} unread, {m} mention you"),
                        };
                        let id = if c.kind == "group" { format!("\t{}", c.id) } else { String::new() };
                        format!("{}{id}\t{} messages{unread}\t{}", c.name, c.messages, message_line(&c.last, &names))
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        (Call::Edit { .. }, Reply::Message { message }) => {
            emit(json, to_json(&message), || format!("Edited: {}", message_line(&message, &Default::default())));
        }
        (_, Reply::BotCommands { commands }) => emit(json, to_json(&commands), || {
            if commands.is_empty() {
                return "This bot lists no commands.".into();
            }
            commands.iter().map(|c| format!("/{} — {}", c.command, c.description)).collect::<Vec<_>>().join("\n")
        }),
        (_, Reply::Pressed { pressed }) => emit(json, to_json(&pressed), || match &pressed {
            Pressed::Callback { answer: Some(PressAnswer { text: Some(text), alert: true }), .. } => {
                format!("The bot answers (alert): {text}")
            }
            Pressed::Callback { answer: Some(PressAnswer { text: Some(text), .. }), .. } => {
                format!("The bot answers: {text}")
            }
            Pressed::Callback { answer: Some(_), .. } => "Pressed; the bot acknowledged it.".into(),
            Pressed::Callback { answer: None, .. } => {
                "Pressed; no answer from the bot yet (`meshgram messages --follow` shows it if one comes).".into()
            }
            Pressed::Url { url } => format!("This button is a link: {url}"),
            Pressed::Sent { message } => format!("Sent: {}", message_line(message, &Default::default())),
        }),
        (Call::Forward { .. }, Reply::Message { message }) => {
            emit(json, to_json(&message), || format!("Forwarded as message {}.", message.id));
        }
        (Call::Delete { .. }, Reply::Message { message }) => {
            emit(json, to_json(&message), || format!("Deleted {}.", message.id));
        }
        (_, Reply::Devices { devices }) => {
            emit(json, to_json(&devices), || devices.iter().map(device_line).collect::<Vec<_>>().join("\n"))
        }
        (_, Reply::DeviceRemoved { device }) => emit(json, to_json(&device), || {
            format!("Signed out {} ({}); your contacts are told your devices changed.", device.name, device.device)
        }),
        (_, Reply::Backups { backups }) => emit(json, to_json(&backups), || {
            if backups.is_empty() {
                return "No backups on the relays yet: meshgram backup create".into();
            }
            backups
                .iter()
                .map(|b| {
                    let opens = if b.opens_with_this_profile { "" } else { "\t(another recovery code)" };
                    format!("backup of {}{opens}", super::output::ago(b.created_at))
                })
                .collect::<Vec<_>>()
                .join("\n")
        }),
        (_, Reply::BackupSchedule { schedule }) => emit(json, json!({ "schedule": schedule }), || match schedule {
            None => "No periodic backups: meshgram backup schedule --every 1d".into(),
            Some(s) => format!(
                "The client node backs up every {} s, keeping {}; last backup: {}.",
                s.every_secs,
                s.keep,
                s.last_at.map_or("none yet".into(), super::output::ago)
            ),
        }),
        (Call::Typing { .. }, Reply::Done) => emit(json, json!({ "typing": true }), || "Sent a typing notice.".into()),
        (Call::ChannelName { channel, name, off }, Reply::Done) => {
            let name = format!("@{}", name.trim().trim_start_matches('@'));
            emit(json, json!({ "channel": channel, "name": name, "off": off }), || match off {
                true => format!("{name} is free again; {channel} is read by its link only."),
                false => format!("{channel} is now {name}: anyone reads it with `meshgram channel read {name}`."),
            })
        }
        (_, Reply::Push { subscription, relays }) => {
            emit(json, json!({ "subscription": subscription, "relays": relays }), || push_text(&subscription, &relays))
        }
        (_, other) => return Err(unexpected(&other)),
    }
    Ok(())
}

/// `push` as text: the subscription, then each mailbox relay.
fn push_text(subscription: &Option<PushSubscription>, relays: &[PushRelay]) -> String {
    let mut text = match subscription {
        Some(s) => format!("Push endpoint: {}", s.url),
        None => "No push endpoint: this device is not woken when closed.".to_string(),
    };
    for relay in relays {
        let state = match (&relay.error, &relay.endpoint) {
            (Some(e), _) => format!("not reached ({e})"),
            (None, Some(url)) if subscription.as_ref().is_some_and(|s| &s.url == url) => "holds it".to_string(),
            (None, Some(url)) => format!("holds another one, {url}"),
            (None, None) => "holds none".to_string(),
        };
        text.push_str(&format!("\n  mailbox relay {}: {state}", relay.relay));
    }
    text
}
