//! What every command prints: JSON with `--json`, lines for people otherwise.

use meshgram_node::client::api::Names;
use meshgram_node::client::history::StoredMessage;
use meshgram_node::ids::UserId;
use meshgram_node::proto::Account;
use meshgram_node::proto::rich::{ButtonAction, Markup};
use serde_json::Value;

/// Prints `value` as JSON, or `text` for people.
pub(super) fn emit(json: bool, value: Value, text: impl FnOnce() -> String) {
    if json {
        outln!("{value}");
    } else {
        outln!("{}", text());
    }
}

/// `value` as JSON (`null` if it cannot be: never for our own types).
pub(super) fn to_json(value: &impl serde::Serialize) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// How to call an account: name and @username, either alone, or the phone or user id.
pub(super) fn describe(account: &Account) -> String {
    match (&account.username, account.name.is_empty()) {
        (Some(u), true) => u.to_string(),
        (Some(u), false) => format!("{} ({u})", account.name),
        (None, false) => account.name.clone(),
        (None, true) => account.phone.as_ref().map(|p| p.to_string()).unwrap_or_else(|| account.user_id.to_string()),
    }
}

/// A person by name when the node knows one, else by user id.
pub(super) fn name_of(names: &Names, user: UserId) -> String {
    names.get(&user).cloned().unwrap_or_else(|| user.to_string())
}

/// Bytes as people read them: 1.5 MiB.
pub(super) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} bytes") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// How long ago a unix time was, as people say it: "3 min ago".
pub(super) fn ago(unix_secs: u64) -> String {
    let secs = meshgram_node::crypto::cert::unix_now().saturating_sub(unix_secs);
    match secs {
        0..60 => "just now".into(),
        60..3600 => format!("{} min ago", secs / 60),
        3600..86_400 => format!("{} h ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    }
}

/// One message as a line: `[id] who (reply to …): text (edited) [status]`; a notice of this
/// device's own as `[id] — text`.
pub(super) fn message_line(m: &StoredMessage, names: &Names) -> String {
    if m.notice {
        return format!("[{}] — {}", m.id.fmt_short(), m.text);
    }
    let who = if m.outgoing { "me".to_string() } else { name_of(names, m.from) };
    let reply = m.reply_to.map(|r| format!(" (reply to {})", r.fmt_short())).unwrap_or_default();
    let file = match (&m.file, m.deleted) {
        (Some(f), false) => {
            format!("[file {} ({}, {}) — meshgram download {}] ", f.name, human_bytes(f.size), f.mime, m.id)
        }
        _ => String::new(),
    };
    let text = if m.deleted { "(deleted)".to_string() } else { format!("{file}{}", m.text) };
    let edited = if m.edited { " (edited)" } else { "" };
    let status = if m.outgoing { format!(" [{:?}]", m.status).to_lowercase() } else { String::new() };
    let keyboard = match m.extras.as_ref().and_then(|e| e.markup.as_ref()).filter(|_| !m.deleted) {
        // The whole id, which a press needs (the line shows only its end).
        Some(markup @ (Markup::Inline { .. } | Markup::Keyboard { .. })) if !m.outgoing => {
            format!("{}\n    meshgram press {} BUTTON", keyboard_lines(markup), m.id)
        }
        Some(markup) => keyboard_lines(markup),
        None => String::new(),
    };
    format!("[{}] {who}{reply}: {text}{edited}{status}{keyboard}", m.id.fmt_short())
}

/// A message's keyboard under its line: one line per row of buttons, `meshgram press` presses one.
fn keyboard_lines(markup: &Markup) -> String {
    let row = |buttons: Vec<String>| format!("\n    {}", buttons.join(" "));
    match markup {
        Markup::Inline { rows } => rows
            .iter()
            .map(|r| {
                row(r
                    .iter()
                    .map(|b| match &b.action {
                        ButtonAction::Callback { .. } => format!("[ {} ]", b.text),
                        ButtonAction::Url { url } => format!("[ {} ↗ {url} ]", b.text),
                    })
                    .collect())
            })
            .collect(),
        Markup::Keyboard { rows, placeholder, .. } => {
            let hint = placeholder.as_ref().map(|p| format!(" ({p})")).unwrap_or_default();
            format!("\n    keyboard{hint}:")
                + &rows.iter().map(|r| row(r.iter().map(|b| format!("< {b} >")).collect())).collect::<String>()
        }
        Markup::RemoveKeyboard => "\n    (keyboard removed)".into(),
        Markup::ForceReply { placeholder } => {
            format!(
                "\n    (reply to this message{})",
                placeholder.as_ref().map(|p| format!(": {p}")).unwrap_or_default()
            )
        }
    }
}
