//! `meshgram up`: a whole network from one command, resumed with its data by a second one,
//! supervising its roles, with relays that apply the gateway's revocations.

// A failed unwrap here is a failed test, which is what it should be.
#![allow(clippy::unwrap_used)]

use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use meshgram_tests::{RESTART_TIMEOUT, Up, meshgram, texts};
use serde_json::Value;

fn gateway_port(network: &Value) -> u16 {
    let addr = network["gateway"]["addrs"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|a| a.as_str().filter(|a| a.contains("/tcp/")))
        .unwrap();
    addr.rsplit('/').next().unwrap().parse().unwrap()
}

#[test]
fn up_runs_a_network_that_resumes_with_its_data() {
    let mut up = Up::start(3);
    let network = up.network.clone();
    assert_eq!(network["relays"].as_array().unwrap().len(), 3);
    let (alice, bob) = (up.tmp().join("alice"), up.tmp().join("bob"));
    up.login(&alice, "+15550001111", 0);
    up.login(&bob, "+15550002222", 0);
    meshgram(&alice, &["send", "+15550002222", "before the restart"]).ok_json();

    // The worst way to stop it: every role must still go away with it.
    up.server.kill9();
    let port = gateway_port(&network);
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(Instant::now() < deadline, "the gateway outlived a SIGKILLed `meshgram up`");
        thread::sleep(Duration::from_millis(100));
    }

    // Same data dir: same identities, same addresses, same accounts, the undelivered message.
    up.server = Up::start_on(&up.data, 3);
    let resumed: Value = serde_json::from_slice(&std::fs::read(up.network_file()).unwrap()).unwrap();
    assert_eq!(resumed["gateway"]["peer_id"], network["gateway"]["peer_id"]);
    assert_eq!(resumed["gateway"]["addrs"], network["gateway"]["addrs"]);
    for i in 0..3 {
        assert_eq!(resumed["relays"][i]["peer_id"], network["relays"][i]["peer_id"]);
    }
    meshgram(&alice, &["whoami"]).ok_json();
    assert_eq!(texts(&meshgram(&bob, &["messages"]).ok_json()), ["before the restart"]);

    // The bot bridge is up at the same Bot API URL, and a bot created now runs there.
    assert_eq!(resumed["bot_api"], network["bot_api"], "{resumed}");
    let bot_api = resumed["bot_api"].as_str().unwrap();
    let (http, bot_path) = bot_api.split_at(bot_api.rfind('/').unwrap());
    let created = meshgram(&alice, &["bot", "create", "--username", "up_bot", "--name", "Up", "--json"]).ok_json();
    let token = created["token"].as_str().unwrap();
    let (status, me) = meshgram_tests::http_get(http, &format!("{bot_path}{token}/getMe")).unwrap();
    assert_eq!(status, 200, "{me}");
    assert!(me.contains("\"username\":\"up_bot\""), "{me}");

    // The desktop app is back at the same address: its page is served, its API only with the
    // token (which network.json does not hold).
    assert_eq!(resumed["app"], network["app"], "{resumed}");
    let app = resumed["app"].as_str().unwrap();
    assert!(!app.contains("token"), "{app}");
    let (status, page) = meshgram_tests::http_get(app, "/").unwrap();
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("<title>Meshgram</title>"), "{page}");
    let (status, answer) = meshgram_tests::http_get(app, "/api/state").unwrap();
    assert_eq!(status, 401, "{answer}");

    // Ctrl-C / SIGTERM stops it cleanly.
    let status = up.server.terminate().expect("`meshgram up` stops within 20 s of SIGTERM");
    assert!(status.success(), "{status}");
}

#[test]
fn up_restarts_a_role_that_dies_and_the_network_keeps_working() {
    let mut up = Up::start(3);
    let (alice, bob) = (up.tmp().join("alice"), up.tmp().join("bob"));
    up.login(&alice, "+15550001111", 0);
    up.login(&bob, "+15550002222", 0);

    // SIGKILL a relay: `up` restarts it on its data and ports; the others never stop.
    let others = ["relay-0", "relay-2", "gateway"];
    let before: Vec<u32> = others.iter().map(|r| up.role_pid(r).unwrap()).collect();
    let old = up.kill9_role("relay-1");
    meshgram(&alice, &["send", "+15550002222", "while a relay restarts"]).ok_json();
    up.wait_restarted("relay-1", old);
    let after: Vec<u32> = others.iter().map(|r| up.role_pid(r).unwrap()).collect();
    assert_eq!(after, before, "the other roles kept running");

    // The gateway too: sign-in and sessions work again once it is back.
    let old = up.kill9_role("gateway");
    up.wait_restarted("gateway", old);
    let deadline = Instant::now() + RESTART_TIMEOUT;
    while !meshgram(&alice, &["sessions"]).status.success() {
        assert!(Instant::now() < deadline, "the restarted gateway does not answer");
        thread::sleep(Duration::from_millis(200));
    }
    meshgram(&alice, &["send", "+15550002222", "after the gateway came back"]).ok_json();
    assert_eq!(
        texts(&meshgram(&bob, &["messages"]).ok_json()),
        ["while a relay restarts", "after the gateway came back"]
    );
    assert!(up.server.terminate().expect("`meshgram up` stops on SIGTERM").success());
}

#[test]
fn up_with_one_relay_keeps_one_copy_and_delivers() {
    // The default replication is 2; one relay cannot keep two copies, so `up` runs it with 1
    // (a relay refuses to acknowledge with fewer copies than its --replication).
    let up = Up::start(1);
    assert_eq!(up.network["relays"].as_array().unwrap().len(), 1);
    let (alice, bob) = (up.tmp().join("alice"), up.tmp().join("bob"));
    up.login(&alice, "+15550001111", 0);
    up.login(&bob, "+15550002222", 0);
    meshgram(&alice, &["send", "+15550002222", "one relay is enough"]).ok_json();
    assert_eq!(texts(&meshgram(&bob, &["messages"]).ok_json()), ["one relay is enough"]);
}

#[test]
fn up_relays_cut_a_revoked_session_off_within_seconds() {
    let up = Up::start(1);
    let (phone, laptop) = (up.tmp().join("phone"), up.tmp().join("laptop"));
    up.login(&phone, "+15550001111", 0);
    up.login(&laptop, "+15550001111", 1);
    meshgram(&phone, &["messages"]).ok_json();
    meshgram(&laptop, &["sessions", "revoke", "--others"]).ok_json();
    // `up` tells its relays where the gateway is, so they learn of it within a poll (2 s). The
    // CLI still shows the local history, and logs why it could not fetch: in the relay's words,
    // not the gateway's, since it was the relay that refused.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !meshgram(&phone, &["messages"]).stderr.contains("SESSION_REVOKED: this session was revoked (signed out)") {
        assert!(Instant::now() < deadline, "the relay still serves the revoked session");
        thread::sleep(Duration::from_millis(200));
    }
}
