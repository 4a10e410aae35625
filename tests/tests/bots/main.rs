//! Cross-process tests of the bot bridge: real gateway, relays, bridge, CLI, and real bots.
//!
//! - `libraries`: unmodified python-telegram-bot and grammY bots, only their base URLs changed,
//!   answer `/start`, echo text with HTML formatting, edit their own messages, send inline and
//!   reply keyboards and answer presses, echo a photo by file_id and a document through getFile,
//!   each exactly once; PTB in webhook mode gets every update pushed, even after it was away.
//! - `wire`: bad input (tokens, methods, parameters, JSON, buttons, files) gets Telegram's
//!   errors; updates and button presses are confirmed by offset and survive a SIGKILL of the
//!   bridge, none lost and none twice; files go by upload, file_id and URL.

// A failed unwrap here is a failed test, which is what it should be.
#![allow(clippy::unwrap_used)]

mod libraries;
mod wire;

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use meshgram_tests::{Mesh, Server, meshgram};
use serde_json::Value;

const ALICE: &str = "+15550001001";

/// How long a reply may take to travel user → bot → user.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// A network for one bot test: alice signed in, her bot, and a bridge (data in `data`) that
/// has signed the bot in with its first request, so that the bot has a device to receive on.
/// Fields drop in order: the bridge before the network.
struct BotNet {
    bridge: Server,
    http: String,
    data: PathBuf,
    token: String,
    alice: PathBuf,
    alice_id: u64,
    mesh: Mesh,
}

fn bot_net(username: &str) -> BotNet {
    let mesh = Mesh::start(3, 2);
    let alice = mesh.new_profile("alice");
    let alice_id = mesh.login(&alice, ALICE)["user_id"].as_u64().unwrap();
    let token = create_bot(&alice, username);
    let data = mesh.gateway.tmp().join("bridge");
    let bridge = mesh.start_bridge(&data);
    let http = bridge.http().unwrap();
    let (status, me) = meshgram_tests::http_get(&http, &format!("/bot{token}/getMe")).unwrap();
    assert_eq!(status, 200, "{me}");
    BotNet { bridge, http, data, token, alice, alice_id, mesh }
}

/// Creates a bot owned by the user of `owner`; returns its token.
fn create_bot(owner: &Path, username: &str) -> String {
    let created = meshgram(owner, &["bot", "create", "--username", username, "--name", "Echo", "--json"]).ok_json();
    created["token"].as_str().unwrap().to_string()
}

/// The chat of `profile` with `chat`, as `messages --json` shows it.
fn chat(profile: &Path, with: &str) -> Vec<Value> {
    meshgram(profile, &["messages", with, "--json"]).ok_json().as_array().cloned().unwrap_or_default()
}

/// Waits until `done` holds for the chat, and returns it.
fn wait_chat(profile: &Path, with: &str, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + REPLY_TIMEOUT;
    loop {
        let messages = chat(profile, with);
        if done(&messages) {
            return messages;
        }
        assert!(Instant::now() < deadline, "{what} within {REPLY_TIMEOUT:?}; the chat is {messages:#?}");
        thread::sleep(Duration::from_millis(300));
    }
}
