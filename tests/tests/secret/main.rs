//! Cross-process tests of secret chats: real gateway, relays, client nodes and CLI.
//!
//! - `chat`: a secret chat set up while the responder is offline; 300 messages both ways
//!   through three relays with one SIGKILLed midway, each once; the re-key happens; the
//!   fingerprints match; a self-destructed message is gone from both profiles' files; relays
//!   hold neither plaintext nor key material; the other device of the responder's account sees
//!   nothing; a message of a secret chat cannot be forwarded; close wipes both sides.
//! - `forgery`: a captured frame replayed, moved to another envelope id or altered is
//!   refused, and the message shows once.
//! - `media`: a file sent in a secret chat downloads byte for byte, cannot be forwarded, and its
//!   key never reaches either history database; a declined chat opens nothing.

// A failed unwrap here is a failed test, which is what it should be.
#![allow(clippy::unwrap_used)]

mod chat;
mod forgery;
mod media;

use std::path::Path;

use meshgram_tests::{array, meshgram};
use serde_json::Value;

const ALICE: &str = "+15550001111";
const BOB: &str = "+15550002222";

/// `secret list --json` for the one chat there is.
fn only_chat(profile: &Path) -> Value {
    let out = meshgram(profile, &["secret", "list"]);
    let list = out.ok_json();
    let chats = list.as_array().unwrap_or_else(|| panic!("a list: {list}"));
    assert_eq!(chats.len(), 1, "{list} {}", out.stderr);
    chats[0].clone()
}

/// The secret messages `messages` shows on `profile` (reading `chat` if given).
fn secret_messages(profile: &Path, chat: Option<&str>) -> Vec<Value> {
    let mut args = vec!["messages"];
    args.extend(chat);
    let shown = meshgram(profile, &args).ok_json();
    array(&shown, "messages").into_iter().filter(|m| m["secret"] == true).collect()
}
