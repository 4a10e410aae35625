use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use meshgram_node::client::secret::SecretChats;
use meshgram_tests::{Mesh, files_under, meshgram, meshgram_stdin, start_node, str_field};

use super::{ALICE, BOB, only_chat, secret_messages};

const PER_SIDE_PER_HALF: usize = 75;

/// Files under `dir` that contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|f| std::fs::read(f).is_ok_and(|b| memchr::memmem::find(&b, needle).is_some()))
        .collect()
}

/// Sends `texts` in the secret chat from `profile`, one line each.
fn send_lines(profile: &Path, chat: &str, texts: &[String]) {
    let sent = meshgram_stdin(profile, &["secret", "send", chat, "--lines"], &texts.join("\n")).ok_json();
    assert_eq!(sent.as_array().map(Vec::len), Some(texts.len()), "{sent}");
}

/// Waits until `profile` shows `want` secret messages (its node receives in the background).
fn wait_for_secret(profile: &Path, want: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let shown = secret_messages(profile, None);
        if shown.len() >= want || Instant::now() > deadline {
            return shown;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Waits until `profile`'s one secret chat is as `wanted` says; returns it.
fn wait_for_chat(profile: &Path, wanted: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let chat = only_chat(profile);
        if wanted(&chat) {
            return chat;
        }
        assert!(Instant::now() < deadline, "the secret chat never got there: {chat}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn texts(messages: &[serde_json::Value]) -> HashMap<String, usize> {
    let mut count = HashMap::new();
    for m in messages {
        *count.entry(str_field(m, "text").to_string()).or_default() += 1;
    }
    count
}

#[test]
fn a_secret_chat_set_up_offline_carries_300_messages_once_through_a_relay_crash_and_rekeys() {
    let mut mesh = Mesh::start(3, 2);
    let alice = mesh.new_profile("alice");
    let bob = mesh.new_profile("bob-phone");
    let bob_laptop = mesh.new_profile("bob-laptop");
    mesh.login(&alice, ALICE);
    let bob_device = str_field(&mesh.login(&bob, BOB), "device").to_string();
    mesh.login(&bob_laptop, BOB);
    // The laptop's history request is not what this test is about: take it now.
    meshgram(&bob, &["devices"]).ok_json();

    // Bob is offline (no node): the handshake waits on the relays for him.
    let started = meshgram(&alice, &["secret", "start", BOB, "--device", &bob_device]).ok_json();
    assert_eq!(started["state"], "requested", "{started}");
    let id = str_field(&started, "id").to_string();
    let incoming = only_chat(&bob);
    assert_eq!((incoming["state"].as_str(), incoming["id"].as_str()), (Some("incoming"), Some(id.as_str())));
    assert_eq!(
        meshgram(&bob, &["secret", "send", &id, "too early"]).expect_err(&["SECRET_STATE"])["code"],
        "SECRET_STATE"
    );
    let accepted = meshgram(&bob, &["secret", "accept", &id[24..]]).ok_json();
    assert_eq!(accepted["state"], "active", "{accepted}");
    let on_alice = only_chat(&alice);
    assert_eq!(on_alice["state"], "active", "{on_alice}");
    let fa = meshgram(&alice, &["secret", "fingerprint", &id]).ok_json()["fingerprint"].clone();
    // The open chat with someone is also named by them.
    let fb = meshgram(&bob, &["secret", "fingerprint", ALICE]).ok_json()["fingerprint"].clone();
    assert_eq!(fa, fb, "both sides see the same fingerprint");
    assert_eq!(str_field(&fa, "emoji").split(' ').count(), 8, "{fa}");
    assert_eq!(str_field(&fa, "hex").split(' ').count(), 16, "{fa}");

    // 300 messages both ways through the nodes, a relay SIGKILLed halfway.
    let (alice_node, bob_node) = (start_node(&alice), start_node(&bob));
    let line = |who: &str, half: usize, i: usize| format!("secret {who} {half}/{i} sentinel-{who}-{half}-{i}");
    for half in 0..2 {
        if half == 1 {
            mesh.relays[1].kill9();
        }
        let from_alice: Vec<String> = (0..PER_SIDE_PER_HALF).map(|i| line("alice", half, i)).collect();
        let from_bob: Vec<String> = (0..PER_SIDE_PER_HALF).map(|i| line("bob", half, i)).collect();
        send_lines(&alice, &id, &from_alice);
        send_lines(&bob, &id, &from_bob);
        let want = 2 * PER_SIDE_PER_HALF * (half + 1);
        assert_eq!(wait_for_secret(&alice, want).len(), want);
        assert_eq!(wait_for_secret(&bob, want).len(), want);
    }
    for profile in [&alice, &bob] {
        let counts = texts(&secret_messages(profile, None));
        assert_eq!(counts.len(), 4 * PER_SIDE_PER_HALF, "every message shows");
        assert!(counts.values().all(|n| *n == 1), "and each once");
        let chat = wait_for_chat(profile, |c| c["rekeys"].as_u64() >= Some(1) && c["rekey_pending"] == false);
        assert!(chat["rekeys"].as_u64().unwrap() >= 1, "a fresh handshake after 100 messages: {chat}");
        assert!(chat["generation"].as_u64().unwrap() >= 1, "{chat}");
        assert!(chat["session_sent"].as_u64().unwrap() < 150, "the new session counts afresh: {chat}");
    }
    assert_eq!(only_chat(&alice)["fingerprint"], fa, "re-keys keep the fingerprint of the first handshake");

    // Nothing of it on the other device of Bob's account.
    assert!(secret_messages(&bob_laptop, None).is_empty());
    assert_eq!(meshgram(&bob_laptop, &["secret", "list"]).ok_json(), serde_json::json!([]));
    let any_id = str_field(&secret_messages(&bob, None)[0], "id").to_string();
    meshgram(&bob, &["forward", &any_id, "--to", ALICE]).expect_err(&["FORBIDDEN"]);

    // A self-destructing message: read by Bob, gone from both profiles' files soon after.
    let ttl = meshgram(&alice, &["secret", "ttl", &id, "2s"]).ok_json();
    assert_eq!(ttl["ttl_secs"], 2, "{ttl}");
    let sentinel = "self-destruct sentinel 7f3a9c";
    send_lines(&alice, &id, &[sentinel.to_string()]);
    let seen = wait_for_secret(&bob, 4 * PER_SIDE_PER_HALF + 1);
    let m = seen.iter().find(|m| m["text"] == sentinel).unwrap_or_else(|| panic!("the message arrived"));
    assert_eq!(m["ttl_secs"], 2, "{m}");
    let read = secret_messages(&bob, Some(ALICE));
    assert!(read.iter().any(|m| m["text"] == sentinel && m["expires_at_ms"].is_u64()), "reading starts the timer");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && [&alice, &bob].iter().any(|p| secret_messages(p, None).iter().any(|m| m["text"] == sentinel))
    {
        std::thread::sleep(Duration::from_millis(300));
    }
    for profile in [&alice, &bob] {
        assert!(!secret_messages(profile, None).iter().any(|m| m["text"] == sentinel), "destroyed on both");
        assert_eq!(files_containing(profile, sentinel.as_bytes()), Vec::<std::path::PathBuf>::new());
    }
    assert_eq!(secret_messages(&alice, None).len(), 4 * PER_SIDE_PER_HALF, "the others stay");

    // Relays: no plaintext, no key material.
    drop((alice_node, bob_node));
    for needle in ["sentinel-alice-0-3", "sentinel-bob-1-7", sentinel] {
        assert!(mesh.relay_files_containing(needle.as_bytes()).is_empty(), "{needle} on a relay");
    }
    let keys: Vec<[u8; 32]> =
        [&alice, &bob].iter().flat_map(|p| SecretChats::open(p).unwrap().key_material()).collect();
    assert!(keys.len() >= 8, "current and previous sessions' keys on both sides");
    for key in &keys {
        assert!(mesh.relay_files_containing(key).is_empty(), "a secret-chat key on a relay");
        assert!(files_containing(&bob_laptop, key).is_empty(), "a secret-chat key on another device");
    }

    // Close: both sides wipe keys and messages.
    assert_eq!(meshgram(&alice, &["secret", "close", &id]).ok_json()["state"], "closed");
    wait_for_chat(&bob, |c| c["state"] == "closed");
    for profile in [&alice, &bob] {
        assert!(secret_messages(profile, None).is_empty());
        assert!(SecretChats::open(profile).unwrap().key_material().is_empty());
        assert!(files_containing(profile, b"sentinel-alice-0-3").is_empty());
    }
}
