//! `meshgram up`: a whole network from one command, resumed with its data by a second one.

// A failed unwrap here is a failed test, which is what it should be.
#![allow(clippy::unwrap_used)]

use std::net::TcpStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use meshgram_tests::{CLI_BIN, Server, bin_path, meshgram, spawn_meshgram, texts, wait_code};
use serde_json::Value;

fn login(profile: &Path, network: &Path, sink: &Path, phone: &str, nth: usize) -> Value {
    let mut cli = spawn_meshgram(profile, &["login", "--network", &network.display().to_string(), "--phone", phone]);
    cli.write_line(&wait_code(sink, phone, nth));
    cli.finish().ok_json()
}

fn start_up(data: &Path) -> Server {
    start_up_with(data, "3")
}

fn start_up_with(data: &Path, relays: &str) -> Server {
    Server::start(&bin_path(CLI_BIN), &["--json", "up", "--data", &data.display().to_string(), "--relays", relays])
        .unwrap()
}

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
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("net");
    let mut up = start_up(&data);
    let network_path = data.join("network.json");
    let network: Value = serde_json::from_slice(&std::fs::read(&network_path).unwrap()).unwrap();
    assert_eq!(network["relays"].as_array().unwrap().len(), 3);
    let sink = Path::new(network["gateway"]["code_sink"].as_str().unwrap()).to_path_buf();

    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    login(&alice, &network_path, &sink, "+15550001111", 0);
    login(&bob, &network_path, &sink, "+15550002222", 0);
    meshgram(&alice, &["send", "+15550002222", "before the restart"]).ok_json();

    // The worst way to stop it: every role must still go away with it.
    up.kill9();
    let port = gateway_port(&network);
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(Instant::now() < deadline, "the gateway outlived a SIGKILLed `meshgram up`");
        thread::sleep(Duration::from_millis(100));
    }

    // Same data dir: same identities, same addresses, same accounts, the undelivered message.
    let mut up = start_up(&data);
    let resumed: Value = serde_json::from_slice(&std::fs::read(&network_path).unwrap()).unwrap();
    assert_eq!(resumed["gateway"]["peer_id"], network["gateway"]["peer_id"]);
    assert_eq!(resumed["gateway"]["addrs"], network["gateway"]["addrs"]);
    for i in 0..3 {
        assert_eq!(resumed["relays"][i]["peer_id"], network["relays"][i]["peer_id"]);
    }
    meshgram(&alice, &["whoami"]).ok_json();
    assert_eq!(texts(&meshgram(&bob, &["messages"]).ok_json()), ["before the restart"]);

    // Ctrl-C / SIGTERM stops it cleanly.
    let status = up.terminate().expect("`meshgram up` stops within 20 s of SIGTERM");
    assert!(status.success(), "{status}");
}

#[test]
fn up_with_one_relay_keeps_one_copy_and_delivers() {
    // The default replication is 2; one relay cannot keep two copies, so `up` runs it with 1
    // (a relay refuses to acknowledge with fewer copies than its --replication).
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("net");
    let _up = start_up_with(&data, "1");
    let network_path = data.join("network.json");
    let network: Value = serde_json::from_slice(&std::fs::read(&network_path).unwrap()).unwrap();
    assert_eq!(network["relays"].as_array().unwrap().len(), 1);
    let sink = Path::new(network["gateway"]["code_sink"].as_str().unwrap()).to_path_buf();

    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    login(&alice, &network_path, &sink, "+15550001111", 0);
    login(&bob, &network_path, &sink, "+15550002222", 0);
    meshgram(&alice, &["send", "+15550002222", "one relay is enough"]).ok_json();
    assert_eq!(texts(&meshgram(&bob, &["messages"]).ok_json()), ["one relay is enough"]);
}
