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
    Server::start(&bin_path(CLI_BIN), &["--json", "up", "--data", &data.display().to_string(), "--relays", "3"])
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

/// The pid of the role process whose command line mentions `data_dir` (a role's `--data`).
fn role_pid(data_dir: &Path) -> Option<u32> {
    let out = std::process::Command::new("pgrep")
        .args(["-f", "--", &format!("--data {} ", data_dir.display())])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().next()?.trim().parse().ok()
}

/// Waits (bounded) for the role in `data_dir` to run under a pid other than `old`.
fn wait_restarted(data_dir: &Path, old: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(pid) = role_pid(data_dir).filter(|pid| *pid != old) {
            return pid;
        }
        assert!(Instant::now() < deadline, "{} was not restarted", data_dir.display());
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn up_restarts_a_role_that_dies_and_the_network_keeps_working() {
    let tmp = tempfile::tempdir().unwrap();
    let mut up = start_up(&tmp.path().join("net"));
    // `up` names each role's data dir by its absolute path.
    let data = tmp.path().join("net").canonicalize().unwrap();
    let network_path = data.join("network.json");
    let network: Value = serde_json::from_slice(&std::fs::read(&network_path).unwrap()).unwrap();
    let sink = Path::new(network["gateway"]["code_sink"].as_str().unwrap()).to_path_buf();
    let (alice, bob) = (tmp.path().join("alice"), tmp.path().join("bob"));
    login(&alice, &network_path, &sink, "+15550001111", 0);
    login(&bob, &network_path, &sink, "+15550002222", 0);

    // SIGKILL a relay: `up` restarts it on its data and ports; the others never stop.
    let relay = data.join("relay-1");
    let others: Vec<u32> = ["relay-0", "relay-2", "gateway"].iter().map(|r| role_pid(&data.join(r)).unwrap()).collect();
    let old = role_pid(&relay).expect("relay 1 runs");
    assert!(std::process::Command::new("kill").args(["-9", &old.to_string()]).status().unwrap().success());
    meshgram(&alice, &["send", "+15550002222", "while a relay restarts"]).ok_json();
    wait_restarted(&relay, old);
    let still: Vec<u32> = ["relay-0", "relay-2", "gateway"].iter().map(|r| role_pid(&data.join(r)).unwrap()).collect();
    assert_eq!(still, others, "the other roles kept running");

    // The gateway too: sign-in and sessions work again once it is back.
    let gateway = data.join("gateway");
    let old = role_pid(&gateway).unwrap();
    assert!(std::process::Command::new("kill").args(["-9", &old.to_string()]).status().unwrap().success());
    wait_restarted(&gateway, old);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !meshgram(&alice, &["whoami"]).status.success() {
        assert!(Instant::now() < deadline, "the restarted gateway does not answer");
        thread::sleep(Duration::from_millis(200));
    }
    meshgram(&alice, &["send", "+15550002222", "after the gateway came back"]).ok_json();
    assert_eq!(
        texts(&meshgram(&bob, &["messages"]).ok_json()),
        ["while a relay restarts", "after the gateway came back"]
    );
    assert!(up.terminate().expect("`meshgram up` stops on SIGTERM").success());
}
