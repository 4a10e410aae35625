use std::collections::HashSet;
use std::thread;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::identity::ed25519;
use meshgram_node::crypto::cert::RelayCert;
use meshgram_node::proto::envelope::EnvelopeId;
use meshgram_node::proto::{ErrorCode, MailboxRequest, MailboxResponse, WireError};
use meshgram_tests::{
    Gateway, Mesh, RELAY_BIN, array, bin_path, http_get, meshgram, meshgram_stdin, run, spawn_meshgram, start_relay,
    texts, u64_field, unix_now,
};

use super::wire::RawClient;
use super::{ALICE, BOB};

const SENTINEL: &str = "sentinel-7f3a9c-plaintext";

#[test]
fn offline_recipient_gets_1000_messages_exactly_once_in_order_despite_a_killed_relay() {
    let mut mesh = Mesh::start(3, 2);
    let (alice, bob) = (mesh.new_profile("alice"), mesh.new_profile("bob"));
    mesh.login(&alice, ALICE);
    mesh.login(&bob, BOB);
    let expected: Vec<String> = (0..1000).map(|i| format!("message {i:04} {SENTINEL}")).collect();

    // Bob is offline (never fetches) while Alice sends; the relay closest to Bob's mailbox
    // (Kademlia distance from his device key: it holds a copy of everything) is SIGKILLed
    // part-way. Everything Alice's CLI reports as sent must reach Bob.
    let closest = mesh.relays_by_mailbox_distance(&bob)[0];
    let mut send = spawn_meshgram(&alice, &["send", BOB, "--lines"]);
    for line in &expected {
        send.write_line(line);
    }
    let mut victim = mesh.relays.remove(closest);
    let killer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(400));
        victim.kill9();
        victim
    });
    let sent = send.finish().ok_json();
    let _dead_relay = killer.join().unwrap();
    assert_eq!(u64_field(&sent, "sent"), 1000, "every message acknowledged");

    // The relays' files hold ciphertext only.
    let disk = mesh.relay_disk_bytes();
    assert!(disk.len() > 100_000, "the envelopes are on disk ({} bytes)", disk.len());
    assert!(!disk.windows(SENTINEL.len()).any(|w| w == SENTINEL.as_bytes()), "plaintext found in a relay's files");

    // Bob comes back while that relay is still dead: the surviving replica has it all.
    let inbox = meshgram(&bob, &["messages"]).ok_json();
    assert_eq!(texts(&inbox), expected, "all 1000, once each, in order");
    let messages = array(&inbox, "messages");
    let ids: std::collections::HashSet<&str> = messages.iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids.len(), 1000);

    // Fetching again (from whichever replicas are left) adds nothing.
    assert_eq!(texts(&meshgram(&bob, &["messages"]).ok_json()).len(), 1000);
}

#[test]
fn a_relay_killed_right_after_acknowledging_has_everything_when_it_restarts() {
    // One relay keeping the only copy: nothing else could hand Bob his messages.
    let mut mesh = Mesh::start(1, 1);
    let (alice, bob) = (mesh.new_profile("alice"), mesh.new_profile("bob"));
    mesh.login(&alice, ALICE);
    mesh.login(&bob, BOB);
    let expected: Vec<String> = (0..300).map(|i| format!("kept {i:03}")).collect();
    let sent = meshgram_stdin(&alice, &["send", BOB, "--lines"], &expected.join("\n")).ok_json();
    assert_eq!(u64_field(&sent, "sent"), 300);

    // SIGKILL at once: the newest envelopes are then only in the relay's write-ahead log
    // (redb is synced every 250 ms). The relay comes back on the same data dir and port.
    let relay = &mut mesh.relays[0];
    let (peer, port, data) = (relay.peer_id(), relay.tcp_port(), relay.data_dir.clone());
    relay.kill9();
    let key = mesh.gateway.server.ready["public_key"].as_str().unwrap().to_string();
    mesh.relays[0] = start_relay(&data, &key, 1, port, &[]).unwrap();
    assert_eq!(mesh.relays[0].peer_id(), peer, "same relay key");

    let inbox = meshgram(&bob, &["messages"]).ok_json();
    assert_eq!(texts(&inbox), expected, "all 300, once each, in order");
}

/// Hello on `client`'s relay with a certificate for user `user`.
async fn hello(client: &RawClient, signer: &ed25519::Keypair, user: u64) {
    let now = unix_now();
    let cert = client.cert(signer, user, now, now + 3600);
    assert!(matches!(client.call(MailboxRequest::Hello { cert }).await, MailboxResponse::Welcome { .. }));
}

/// [`hello`], then one `Send`; its answer and how long it took.
async fn hello_and_send(client: &RawClient, signer: &ed25519::Keypair, user: u64) -> (MailboxResponse, Duration) {
    hello(client, signer, user).await;
    let envelope = client.envelope(user, PeerId::random(), 100);
    let started = Instant::now();
    let answer = client.call(MailboxRequest::Send { envelopes: vec![envelope] }).await;
    (answer, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_knows_fewer_than_r_relays_does_not_acknowledge_unless_allowed() {
    // One relay with replication 2: what a relay that just restarted (and has checked no
    // other relay's certificate yet) sees. It keeps its own copy, but one copy is not R.
    let signer = ed25519::Keypair::generate();
    let mesh = Mesh::start_with_key(Gateway::start(), &signer, 1, 2);
    let (answer, _) = hello_and_send(&RawClient::new(&mesh.relays[0].tcp_addr()), &signer, 1).await;
    match answer {
        MailboxResponse::Error(e) => {
            assert_eq!(e.code, ErrorCode::Unavailable, "{e}");
            assert!(e.message.contains("needs 2 durable copies"), "says why: {e}");
        }
        other => panic!("acknowledged with one copy of two: {other:?}"),
    }

    // A network smaller than R is the operator's explicit choice.
    let dir = mesh.gateway.tmp().join("small-network-relay");
    std::fs::create_dir_all(&dir).unwrap();
    RelayCert::admit(&signer, &dir, 1, unix_now()).unwrap();
    let key = meshgram_node::ids::hex(&signer.public().to_bytes());
    let allowed = start_relay(&dir, &key, 2, 0, &["--allow-fewer-replicas"]).unwrap();
    let (answer, _) = hello_and_send(&RawClient::new(&allowed.tcp_addr()), &signer, 1).await;
    assert!(matches!(answer, MailboxResponse::Stored { .. }), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_relays_and_one_stopped_a_send_is_refused_within_seconds_not_acknowledged() {
    let signer = ed25519::Keypair::generate();
    let mesh = Mesh::start_with_key(Gateway::start(), &signer, 2, 2);
    // SIGSTOP: its sockets stay open and it answers nothing, like a hung relay.
    mesh.relays[1].stop();
    let (answer, took) = hello_and_send(&RawClient::new(&mesh.relays[0].tcp_addr()), &signer, 1).await;
    mesh.relays[1].cont();
    match answer {
        MailboxResponse::Error(e) => assert_eq!(e.code, ErrorCode::Unavailable, "{e}"),
        other => panic!("acknowledged with one copy of two: {other:?}"),
    }
    assert!(took < Duration::from_secs(10), "refused after {took:?}: a stopped replica should cost seconds");
}

#[test]
fn a_stopped_replica_costs_a_send_seconds_and_every_acknowledged_message_arrives_once() {
    let mesh = Mesh::start(3, 2);
    let (alice, bob) = (mesh.new_profile("alice"), mesh.new_profile("bob"));
    mesh.login(&alice, ALICE);
    mesh.login(&bob, BOB);

    // Stop the second closest relay to Bob's mailbox: the closest one (which Alice's client
    // sends through) keeps a copy and must find another relay for the second.
    let stopped = mesh.relays_by_mailbox_distance(&bob)[1];
    mesh.relays[stopped].stop();

    let expected: Vec<String> = (0..5).map(|i| format!("while a relay is stopped {i}")).collect();
    let mut took = Vec::new();
    for text in &expected {
        let started = Instant::now();
        let sent = meshgram(&alice, &["send", BOB, text]).ok_json();
        took.push(started.elapsed());
        assert_eq!(u64_field(&sent, "sent"), 1);
    }
    eprintln!("sends with a relay stopped took {took:?}");
    assert!(took.iter().all(|t| *t < Duration::from_secs(10)), "a send took far longer than the deadline: {took:?}");

    // The stopped relay carries on (with whatever copies it was given up on for); Bob gets
    // every acknowledged message once, from whichever relays hold it.
    mesh.relays[stopped].cont();
    let inbox = meshgram(&bob, &["messages"]).ok_json();
    assert_eq!(texts(&inbox), expected, "each once, in order");
    assert_eq!(texts(&meshgram(&bob, &["messages"]).ok_json()).len(), expected.len(), "nothing twice");
}

/// A small tmpfs, unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    /// Mounts a tmpfs of `size` (`mount -o size=`) at `dir`; `Err` says why not (not root, say).
    fn mount(dir: &std::path::Path, size: &str) -> Result<SmallDisk, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", &dir.display().to_string()])
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!("mount failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(SmallDisk(dir.to_path_buf()))
    }

    /// Writes `name` on it until the disk is full.
    fn fill(&self, name: &str) {
        use std::io::Write;
        let mut filler = std::fs::File::create(self.0.join(name)).unwrap();
        let chunk = vec![0u8; 4096];
        while filler.write_all(&chunk).and_then(|()| filler.sync_data()).is_ok() {}
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").args(["-l", &self.0.display().to_string()]).status();
    }
}

/// How long a relay whose store failed may take to exit once its disk takes writes again (it
/// probes every 2 s).
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends envelopes of 16 KiB to `to` until one is refused; the ids acknowledged and the refusal.
async fn send_until_refused(client: &RawClient, to: PeerId) -> (Vec<EnvelopeId>, WireError) {
    let mut acknowledged = Vec::new();
    for _ in 0..100 {
        let envelopes = vec![client.envelope(1, to, 16 * 1024)];
        match client.call(MailboxRequest::Send { envelopes }).await {
            MailboxResponse::Stored { stored, .. } => acknowledged.extend(stored),
            MailboxResponse::Error(e) => return (acknowledged, e),
            other => panic!("unexpected answer {other:?}"),
        }
    }
    panic!("100 sends of 16 KiB acknowledged on a full 8 MiB disk");
}

/// Every envelope id in `client`'s mailbox, acknowledging them as it goes.
async fn fetch_all(client: &RawClient) -> HashSet<EnvelopeId> {
    let (mut all, mut ack) = (HashSet::new(), Vec::new());
    loop {
        match client.call(MailboxRequest::Fetch { max: 100, wait_ms: 0, ack }).await {
            MailboxResponse::Envelopes { envelopes, .. } if envelopes.is_empty() => return all,
            MailboxResponse::Envelopes { envelopes, .. } => {
                ack = envelopes.iter().map(|e| e.id).collect();
                all.extend(ack.iter().copied());
            }
            other => panic!("expected Envelopes, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_disk_fills_stops_acknowledging_and_restarts_with_everything_once_there_is_room() {
    let signer = ed25519::Keypair::generate();
    let gateway = Gateway::start();
    let disk = match SmallDisk::mount(&gateway.tmp().join("small-disk"), "8m") {
        Ok(disk) => disk,
        Err(why) => {
            eprintln!("skipped: this test needs a small tmpfs ({why}); run it as root");
            return;
        }
    };
    let dir = disk.0.join("relay");
    std::fs::create_dir_all(&dir).unwrap();
    RelayCert::admit(&signer, &dir, 1, unix_now()).unwrap();
    let key = meshgram_node::ids::hex(&signer.public().to_bytes());
    let mut relay = start_relay(&dir, &key, 1, 0, &[]).unwrap();
    let (http, port) = (relay.http().unwrap(), relay.tcp_port());
    assert_eq!(http_get(&http, "/healthz").unwrap(), (200, "ok".to_string()));
    // Alice sends to Bob, who fetches once the relay is back.
    let (alice, bob) = (RawClient::new(&relay.tcp_addr()), RawClient::new(&relay.tcp_addr()));
    hello(&alice, &signer, 1).await;
    let mut acknowledged = Vec::new();
    for _ in 0..20 {
        match alice.call(MailboxRequest::Send { envelopes: vec![alice.envelope(1, bob.device(), 100)] }).await {
            MailboxResponse::Stored { stored, .. } => acknowledged.extend(stored),
            other => panic!("not acknowledged: {other:?}"),
        }
    }

    // The disk fills up: sends are refused from the first write that fails.
    disk.fill("filler");
    let (more, refused) = send_until_refused(&alice, bob.device()).await;
    acknowledged.extend(more);
    assert_eq!(refused.code, ErrorCode::Unavailable, "{refused}");

    // It says so, and acknowledges nothing more while the disk is full.
    let (status, body) = http_get(&http, "/healthz").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("failed"), "{body}");
    let (_, metrics) = http_get(&http, "/metrics").unwrap();
    assert!(metrics.lines().any(|l| l == "meshgram_relay_store_failed 1"), "{metrics}");
    match alice.call(MailboxRequest::Send { envelopes: vec![alice.envelope(1, bob.device(), 100)] }).await {
        MailboxResponse::Error(e) => {
            assert_eq!(e.code, ErrorCode::Unavailable, "{e}");
            assert!(e.message.contains("store failed"), "{e}");
        }
        other => panic!("acknowledged after a failed write: {other:?}"),
    }

    // Room again: the relay sees it and exits, nonzero, for its supervisor to restart it.
    std::fs::remove_file(disk.0.join("filler")).unwrap();
    let exit = relay.wait_for_exit(RECOVERY_TIMEOUT).expect("the relay exits once its disk takes writes again");
    assert!(!exit.success(), "{exit}");

    // The supervisor's part. On a disk that is full again, the relay does not start, and says
    // why (the supervisor retries)...
    disk.fill("filler");
    let data = dir.display().to_string();
    let args = ["--data", &data, "--gateway-key", &key, "--replication", "1", "--http", "127.0.0.1:0"];
    let refused_start = run(&bin_path(RELAY_BIN), &args, None);
    assert!(!refused_start.status.success(), "started on a full disk: {}", refused_start.stderr);
    assert!(refused_start.stderr.contains("takes no writes"), "{}", refused_start.stderr);
    // ...and once there is room, it starts on the same data dir and port with everything it
    // acknowledged, and acknowledges sends again.
    std::fs::remove_file(disk.0.join("filler")).unwrap();
    let relay = start_relay(&dir, &key, 1, port, &[]).unwrap();
    assert_eq!(http_get(&relay.http().unwrap(), "/healthz").unwrap(), (200, "ok".to_string()));
    hello(&bob, &signer, 2).await;
    let fetched = fetch_all(&bob).await;
    let lost: Vec<&EnvelopeId> = acknowledged.iter().filter(|id| !fetched.contains(id)).collect();
    assert!(lost.is_empty(), "{} of {} acknowledged envelopes lost: {lost:?}", lost.len(), acknowledged.len());
    hello(&alice, &signer, 1).await;
    match alice.call(MailboxRequest::Send { envelopes: vec![alice.envelope(1, bob.device(), 100)] }).await {
        MailboxResponse::Stored { stored, .. } => assert_eq!(stored.len(), 1),
        other => panic!("not acknowledged after the restart: {other:?}"),
    }
}
