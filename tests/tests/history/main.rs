//! Cross-process tests of the history on every device: real gateway, real relays, real CLI.
//!
//! - `devices`: a new device of an account with 10,000 messages in 20 chats gets them all once
//!   another device approves it (the two histories compare equal, a message that arrives during
//!   the transfer is on both once, a file in the history downloads byte for byte on the new
//!   device); a device that is not approved gets nothing old; contacts see a notice when the
//!   account's devices change; a removed device is signed out; relays hold no plaintext; the
//!   account's groups come with the history, and the new device reads, posts and admins there.
//! - `backup`: a backup on the relays and one in a file restore on fresh profiles with the
//!   recovery code, to the same history; a wrong or malformed code is refused; another
//!   account finds no backup; relays and gateway hold neither plaintext nor the key.

// A failed unwrap here is a failed test, which is what it should be.
#![allow(clippy::unwrap_used)]

mod backup;
mod devices;

use std::path::Path;

use meshgram_tests::{Mesh, array, meshgram, meshgram_stdin};
use serde_json::Value;

const ALICE: &str = "+15550001111";

/// Contact `i`'s phone number.
fn contact_phone(i: usize) -> String {
    format!("+1555100{i:04}")
}

/// A message text that appears nowhere else: the needle for the relays' disks.
fn text_of(chat: usize, n: usize) -> String {
    format!("history line {n:03} for contact {chat:02}: the plaintext no relay may hold")
}

/// Signs `n` contacts in, and has alice (signed in on `alice`) send each `per_chat` messages;
/// the first three contacts each send her two, which she fetches and reads. Returns the
/// contacts' profiles.
fn fill_history(mesh: &Mesh, alice: &Path, n: usize, per_chat: usize) -> Vec<std::path::PathBuf> {
    let contacts: Vec<_> = (0..n)
        .map(|i| {
            let profile = mesh.new_profile(&format!("contact{i}"));
            mesh.login(&profile, &contact_phone(i));
            profile
        })
        .collect();
    for i in 0..n {
        let lines: String = (0..per_chat).map(|k| text_of(i, k) + "\n").collect();
        let sent = meshgram_stdin(alice, &["send", &contact_phone(i), "--lines"], &lines).ok_json();
        assert_eq!(sent["sent"].as_u64(), Some(per_chat as u64), "{sent}");
    }
    for (i, contact) in contacts.iter().enumerate().take(3) {
        for k in 0..2 {
            meshgram(contact, &["send", ALICE, &format!("reply {k} from contact {i}")]).ok_json();
        }
    }
    meshgram(alice, &["messages"]).ok_json();
    meshgram(alice, &["messages", &contact_phone(0)]).ok_json();
    contacts
}

/// A history as `messages --json` shows it, in a form two devices' can be compared by: each
/// message's content and state, by id (the local order of arrival is each device's own).
fn comparable(messages: &Value) -> std::collections::BTreeMap<String, Value> {
    array(messages, "messages")
        .into_iter()
        .filter(|m| m["notice"] != Value::Bool(true))
        .map(|m| {
            let id = m["id"].as_str().unwrap().to_string();
            let keep = ["chat", "from", "outgoing", "text", "reply_to", "status", "edited", "deleted", "file"];
            let view: serde_json::Map<String, Value> = keep.iter().map(|k| (k.to_string(), m[*k].clone())).collect();
            (id, Value::Object(view))
        })
        .collect()
}

/// How many messages of a history have exactly this text.
fn count_text(messages: &Value, text: &str) -> usize {
    array(messages, "messages").iter().filter(|m| m["text"] == text).count()
}
