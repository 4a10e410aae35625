//! Push notifications for devices that are not connected, through a local HTTP server standing
//! in for a Web Push service (`tests/tools/push_service.py`): one wake-up per burst, encrypted
//! as RFC 8291 (decrypted here by Python's http_ece, an implementation of its own) and saying
//! nothing of the sender or the text; none for a connected device; a gone endpoint dropped; a
//! slow, failing or flaky push service delaying nobody's messages; nobody registering or
//! removing another device's endpoint; the operator's switch.

// A failed unwrap here is a failed test, which is what it should be.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use meshgram_tests::{Mesh, Scrape, Server, array, meshgram, meshgram_stdin, run, start_node, texts, u64_field};
use serde_json::Value;

const ALICE: &str = "+15550001111";
const BOB: &str = "+15550002222";
const CAROL: &str = "+15550003333";
const DAVE: &str = "+15550004444";
const ERIN: &str = "+15550005555";
const MALLORY: &str = "+15550006666";
/// How long a wake-up may take to reach the push service (a relay sends it at once; debug
/// builds on two cores are slow).
const WAKE_WAIT: Duration = Duration::from_secs(20);
/// Longer than the relays' coalescing window (5 s): a second wake-up would have come by then.
const QUIET: Duration = Duration::from_secs(7);
/// The plaintext of every wake-up (`meshgram_relay::push::WAKE_UP_TEXT`).
const WAKE_UP_TEXT: &str = "{\"meshgram\":\"wake\"}";
/// The stand-in push service listens on loopback, which relays refuse to send into unless
/// told (a relay must not POST into its own network for anyone).
const LOCAL_PUSH: [&str; 2] = ["--push-private-endpoints", "true"];

fn tool() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/push_service.py").display().to_string()
}

/// The stand-in push service, logging to `log`.
fn push_service(log: &Path) -> (Server, String) {
    let server = Server::start(Path::new("python3"), &[&tool(), "serve", &log.display().to_string()])
        .expect("the push service starts (./tests/run installs http-ece)");
    let url = server.ready["url"].as_str().unwrap().to_string();
    (server, url)
}

/// A device's subscription keys: `private`, `p256dh`, `auth` (base64url).
fn keys() -> Value {
    keys_with(&[])
}

/// [`keys`], the auth secret starting with '-' (base64url's 62nd digit), which a command line
/// must take as a value, not a flag.
fn keys_starting_with_a_hyphen() -> Value {
    let keys = keys_with(&["--hyphen"]);
    assert!(keys["auth"].as_str().unwrap().starts_with('-'), "{keys}");
    keys
}

fn keys_with(flags: &[&str]) -> Value {
    let tool = tool();
    let mut args = vec![tool.as_str(), "keys"];
    args.extend_from_slice(flags);
    let out = run(Path::new("python3"), &args, None);
    assert!(out.status.success(), "{}", out.stderr);
    serde_json::from_str(&out.stdout).unwrap()
}

/// What the push service received on `path`, in order.
fn received(log: &Path, path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter(|e| e["path"] == path).collect()
}

/// Waits (bounded) until the push service has `n` requests on `path`; returns them.
fn wait_received(log: &Path, path: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + WAKE_WAIT;
    loop {
        let got = received(log, path);
        if got.len() >= n || Instant::now() > deadline {
            return got;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Decrypts a wake-up's body as the device would (http_ece, aes128gcm).
fn decrypt(keys: &Value, body_b64: &str) -> String {
    let (private, auth) = (keys["private"].as_str().unwrap(), keys["auth"].as_str().unwrap());
    let out = run(Path::new("python3"), &[&tool(), "decrypt", private, auth], Some(body_b64));
    assert!(out.status.success(), "the wake-up does not decrypt with the device's keys: {}", out.stderr);
    out.stdout
}

/// `meshgram push register URL --p256dh … --auth …` on `profile`.
fn register_output(profile: &Path, url: &str, keys: &Value) -> meshgram_tests::CliOutput {
    let (p256dh, auth) = (keys["p256dh"].as_str().unwrap(), keys["auth"].as_str().unwrap());
    meshgram(profile, &["push", "register", url, "--p256dh", p256dh, "--auth", auth])
}

/// [`register_output`], which must succeed; its JSON.
fn register(profile: &Path, url: &str, keys: &Value) -> Value {
    register_output(profile, url, keys).ok_json()
}

/// How many of `profile`'s mailbox relays hold `url` for it, as `push status` says.
fn relays_holding(profile: &Path, url: &str) -> usize {
    let status = meshgram(profile, &["push", "status"]).ok_json();
    array(&status["relays"], "relays").iter().filter(|r| r["endpoint"] == url).count()
}

fn relay_sum(mesh: &Mesh, sample: &str) -> f64 {
    mesh.relays.iter().map(|r| Scrape::of(&r.http().unwrap()).sum(sample, &[])).sum()
}

fn profile(mesh: &Mesh, name: &str, phone: &str) -> (PathBuf, u64) {
    let profile = mesh.new_profile(name);
    let id = u64_field(&mesh.login(&profile, phone), "user_id");
    (profile, id)
}

#[test]
fn an_offline_device_gets_one_wake_up_per_burst_that_says_nothing_and_a_connected_one_none() {
    let mesh = Mesh::start_with_relay_args(3, 2, &LOCAL_PUSH);
    let log = mesh.gateway.tmp().join("push.log");
    let (_service, base) = push_service(&log);
    let (alice, alice_id) = profile(&mesh, "alice", ALICE);
    let (bob, _) = profile(&mesh, "bob", BOB);
    let bob_keys = keys_starting_with_a_hyphen();
    let url = format!("{base}/ok/bob");
    let registered = register(&bob, &url, &bob_keys);
    assert_eq!(registered["subscription"]["url"], url.as_str());
    let relays = array(&registered["relays"], "relays");
    assert_eq!(relays.len(), 2, "both mailbox relays told: {registered}");
    assert!(relays.iter().all(|r| r["endpoint"] == url.as_str() && r.get("error").is_none()), "{registered}");
    assert_eq!(relays_holding(&bob, &url), 2);

    // Bob's app is closed. A burst of five messages wakes it once.
    let burst = "one\ntwo\nthree\nfour\nfive\n";
    meshgram_stdin(&alice, &["send", BOB, "--lines"], burst).ok_json();
    let woken = wait_received(&log, "/ok/bob", 1);
    assert_eq!(woken.len(), 1, "no wake-up within {WAKE_WAIT:?}");
    thread::sleep(QUIET);
    assert_eq!(received(&log, "/ok/bob").len(), 1, "one wake-up for the burst, from one relay");
    let wake = &woken[0];
    assert_eq!(wake["headers"]["content-encoding"], "aes128gcm");
    assert!(wake["headers"]["ttl"].as_str().is_some_and(|ttl| ttl.parse::<u64>().is_ok()), "{wake}");
    // It decrypts with Bob's keys, and says nothing of who wrote or what.
    let plaintext = decrypt(&bob_keys, wake["body"].as_str().unwrap());
    assert_eq!(plaintext, WAKE_UP_TEXT);
    let seen = format!("{wake}{plaintext}");
    for secret in [ALICE, &alice_id.to_string(), "one", "five"] {
        assert!(!seen.contains(secret), "the push service saw {secret:?}: {seen}");
    }
    assert_eq!(relay_sum(&mesh, "meshgram_relay_push_wakeups_sent_total"), 1.0);
    assert_eq!(texts(&meshgram(&bob, &["messages"]).ok_json()), ["one", "two", "three", "four", "five"]);

    // With Bob's node running (connected, long-polling), a message wakes nobody.
    let _node = start_node(&bob);
    meshgram(&alice, &["send", BOB, "six"]).ok_json();
    let deadline = Instant::now() + WAKE_WAIT;
    while !texts(&meshgram(&bob, &["messages"]).ok_json()).contains(&"six".to_string()) {
        assert!(Instant::now() < deadline, "the node did not receive the message");
        thread::sleep(Duration::from_millis(200));
    }
    thread::sleep(QUIET);
    assert_eq!(received(&log, "/ok/bob").len(), 1, "a connected device is not woken");

    // Unregistered: no relay holds it, and the profile has none.
    let gone = meshgram(&bob, &["push", "unregister"]).ok_json();
    assert!(gone["subscription"].is_null(), "{gone}");
    assert_eq!(relays_holding(&bob, &url), 0);
}

#[test]
fn gone_endpoints_are_dropped_and_slow_or_failing_push_services_delay_no_one() {
    // These relays sign their wake-ups (VAPID), as some push services ask.
    let mesh = Mesh::start_with_relay_args(
        2,
        2,
        &[LOCAL_PUSH[0], LOCAL_PUSH[1], "--push-vapid-subject", "mailto:ops@example.org"],
    );
    let log = mesh.gateway.tmp().join("push.log");
    let (_service, base) = push_service(&log);
    let (alice, _) = profile(&mesh, "alice", ALICE);
    let (erin, _) = profile(&mesh, "erin", ERIN);
    // How long a message takes to reach a reader with no push service in the way.
    let delivery = |text: &str| {
        let started = Instant::now();
        meshgram(&alice, &["send", ERIN, text]).ok_json();
        assert!(texts(&meshgram(&erin, &["messages"]).ok_json()).contains(&text.to_string()));
        started.elapsed()
    };
    let before = delivery("before");

    let mut wake_paths = Vec::new();
    for (name, phone, kind) in [("bob", BOB, "slow"), ("carol", CAROL, "gone"), ("dave", DAVE, "flaky")] {
        let (device, _) = profile(&mesh, name, phone);
        let path = format!("/{kind}/{name}");
        register(&device, &format!("{base}{path}"), &keys());
        wake_paths.push((device, phone, path));
    }
    let mallory_fails = {
        let (device, _) = profile(&mesh, "mallory", MALLORY);
        register(&device, &format!("{base}/fail/mallory"), &keys());
        device
    };
    for (_, phone, _) in &wake_paths {
        meshgram(&alice, &["send", phone, "wake up"]).ok_json();
    }
    meshgram(&alice, &["send", MALLORY, "wake up"]).ok_json();
    // The slow push service holds its requests for 30 s; messages to others go on meanwhile.
    let slow = wait_received(&log, "/slow/bob", 1);
    assert_eq!(slow.len(), 1);
    let during = delivery("during");
    eprintln!("delivery to a connected reader: {before:?} before, {during:?} while the push service hangs");
    assert!(during < Duration::from_secs(10), "a message waited on the push service: {during:?}");

    // 410: the relay that sent drops the endpoint, and refuses it when Carol's device comes
    // back with it, which then drops it too.
    let (carol, _, gone_path) = &wake_paths[1];
    assert_eq!(wait_received(&log, gone_path, 1).len(), 1);
    let deadline = Instant::now() + WAKE_WAIT;
    loop {
        let status = meshgram(carol, &["push", "status"]).ok_json();
        if status["subscription"].is_null() {
            break;
        }
        assert!(Instant::now() < deadline, "the gone endpoint was not dropped: {status}");
        thread::sleep(Duration::from_millis(200));
    }
    assert!(relays_holding(carol, &format!("{base}{gone_path}")) < 2, "the relay that sent holds it no more");
    assert!(relay_sum(&mesh, "meshgram_relay_push_endpoints_dropped_total") >= 1.0);
    // 503 with Retry-After: tried again, and taken.
    let (_, _, flaky_path) = &wake_paths[2];
    let flaky = wait_received(&log, flaky_path, 2);
    assert_eq!(flaky.len(), 2, "retried after the 503");
    // Signed for the push service's origin, by the relay's key, with the operator's contact.
    let authorization = flaky[1]["headers"]["authorization"].as_str().expect("a VAPID Authorization header");
    let checked = run(Path::new("python3"), &[&tool(), "vapid", authorization], None);
    assert!(checked.status.success(), "the VAPID token does not verify: {}", checked.stderr);
    let claims: Value = serde_json::from_str(&checked.stdout).unwrap();
    assert_eq!(claims["aud"], base.as_str(), "{claims}");
    assert_eq!(claims["sub"], "mailto:ops@example.org");
    assert!(claims["exp"].as_u64().unwrap() > meshgram_tests::unix_now());
    // 500 every time: retried with backoff (1 s, 2 s, ...), then given up; the messages wait.
    assert!(wait_received(&log, "/fail/mallory", 2).len() >= 2, "retried after a 500");
    assert_eq!(texts(&meshgram(&mallory_fails, &["messages"]).ok_json()), ["wake up"]);
    for (device, _, _) in &wake_paths {
        assert_eq!(texts(&meshgram(device, &["messages"]).ok_json()), ["wake up"]);
    }
}

#[test]
fn nobody_registers_or_removes_another_devices_endpoint_and_the_operator_can_turn_push_off() {
    let mesh = Mesh::start_with_relay_args(2, 2, &LOCAL_PUSH);
    let log = mesh.gateway.tmp().join("push.log");
    let (_service, base) = push_service(&log);
    let (alice, _) = profile(&mesh, "alice", ALICE);
    let (bob, _) = profile(&mesh, "bob", BOB);
    let (mallory, _) = profile(&mesh, "mallory", MALLORY);
    let bob_url = format!("{base}/ok/bob");
    register(&bob, &bob_url, &keys());
    // Mallory's registering and unregistering are her device's own: Bob's stays.
    register(&mallory, &format!("{base}/ok/mallory"), &keys());
    meshgram(&mallory, &["push", "unregister"]).ok_json();
    assert_eq!(relays_holding(&bob, &bob_url), 2);
    meshgram(&alice, &["send", BOB, "still yours"]).ok_json();
    assert_eq!(wait_received(&log, "/ok/bob", 1).len(), 1);
    assert!(received(&log, "/ok/mallory").is_empty());
    // Relays that were not told otherwise refuse endpoints in their own network.
    let guarded = Mesh::start(1, 1);
    let (carol, _) = profile(&guarded, "carol", CAROL);
    let refused = register_output(&carol, &format!("{base}/ok/carol"), &keys());
    let error = refused.expect_err(&["BAD_REQUEST"]);
    assert!(error["message"].as_str().unwrap().contains("public address"), "{error}");
    let status = meshgram(&carol, &["push", "status"]).ok_json();
    assert!(status["subscription"].is_null(), "a refused subscription is not kept: {status}");
    // A bad subscription is refused with a clear error, and the old one kept.
    let bad = meshgram(&bob, &["push", "register", "ftp://push.example/x", "--p256dh", "AAAA", "--auth", "AAAA"]);
    bad.expect_err(&["USAGE"]);
    assert_eq!(relays_holding(&bob, &bob_url), 2);

    // The operator's switch: relays started with `--push false` take registrations and send
    // nothing.
    let quiet = Mesh::start_with_relay_args(2, 2, &[LOCAL_PUSH[0], LOCAL_PUSH[1], "--push", "false"]);
    let quiet_log = quiet.gateway.tmp().join("push.log");
    let (_quiet_service, quiet_base) = push_service(&quiet_log);
    let (alice, _) = profile(&quiet, "alice", ALICE);
    let (bob, _) = profile(&quiet, "bob", BOB);
    register(&bob, &format!("{quiet_base}/ok/bob"), &keys());
    meshgram(&alice, &["send", BOB, "hello"]).ok_json();
    thread::sleep(QUIET);
    assert!(received(&quiet_log, "/ok/bob").is_empty(), "push is off");
    assert_eq!(texts(&meshgram(&bob, &["messages"]).ok_json()), ["hello"]);
}

/// The texts of a group's messages on `profile`, without its service messages.
fn group_texts(profile: &Path, group: &str) -> Vec<String> {
    let messages = meshgram(profile, &["messages", group]).ok_json();
    array(&messages, "messages")
        .iter()
        .filter(|m| m["notice"] != true)
        .filter_map(|m| m["text"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn a_member_is_woken_once_for_a_group_post_and_a_subscriber_for_a_channel_post() {
    let mesh = Mesh::start_with_relay_args(3, 2, &LOCAL_PUSH);
    let log = mesh.gateway.tmp().join("push.log");
    let (_service, base) = push_service(&log);
    let (alice, _) = profile(&mesh, "alice", ALICE);
    let (bob, _) = profile(&mesh, "bob", BOB);
    let created = meshgram(&alice, &["group", "create", "Hikers", BOB]).ok_json();
    let group = created["id"].as_str().unwrap().to_string();
    let channel = meshgram(&alice, &["channel", "create", "News"]).ok_json()["id"].as_str().unwrap().to_string();
    let link = meshgram(&alice, &["channel", "link", &channel]).ok_json()["link"].as_str().unwrap().to_string();
    meshgram(&bob, &["channel", "subscribe", &link]).ok_json();
    // Bob learns of the group, registers, and reads once: each relay he reads a group or the
    // channel from learns to wake him for it.
    meshgram(&bob, &["messages"]).ok_json();
    let url = format!("{base}/ok/bob");
    register(&bob, &url, &keys());
    meshgram(&bob, &["messages"]).ok_json();
    let before = received(&log, "/ok/bob").len();

    // Bob's app is closed. Three posts in the group wake him once.
    meshgram_stdin(&alice, &["send", &group, "--lines"], "g1\ng2\ng3\n").ok_json();
    let woken = wait_received(&log, "/ok/bob", before + 1);
    assert_eq!(woken.len(), before + 1, "no wake-up for the group posts within {WAKE_WAIT:?}");
    thread::sleep(QUIET);
    assert_eq!(received(&log, "/ok/bob").len(), before + 1, "one wake-up for the group's burst");
    assert_eq!(group_texts(&bob, &group), ["g1", "g2", "g3"]);

    // A channel post wakes him too, through the relay he reads the channel from (his own
    // mailbox relay, mirroring it, or one of the channel's).
    let before = received(&log, "/ok/bob").len();
    meshgram(&alice, &["channel", "post", &channel, "news"]).ok_json();
    assert_eq!(wait_received(&log, "/ok/bob", before + 1).len(), before + 1, "no wake-up for the channel post");
    thread::sleep(QUIET);
    assert_eq!(received(&log, "/ok/bob").len(), before + 1, "one wake-up for the channel post");
    assert_eq!(group_texts(&bob, &channel), ["news"]);
}
