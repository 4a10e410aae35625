//! Repair: after a relay dies, the copies it held are back on `R` live relays before a second
//! failure can lose them; a relay that comes back gets what it missed; a delete that missed a
//! replica does not come back as a duplicate; a running node follows its mailbox when closer
//! relays join.

use std::thread;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::kad::KBucketKey;
use meshgram_node::crypto::identity::load_or_create_ed25519;
use meshgram_node::defaults::RELAY_KEY_FILE;
use meshgram_tests::{Mesh, Server, meshgram, meshgram_stdin, relay_metric, start_node, start_relay, texts, u64_field};

use super::{ALICE, BOB};

/// The bound DECISIONS.md promises for copies to be back on `R` live relays, with room for a
/// loaded machine.
const REPAIR_WITHIN: Duration = Duration::from_secs(45);

/// Waits (bounded) until `relay` has copied at least `count` envelopes by repair in all.
fn wait_repaired(relay: &Server, count: u64, what: &str) -> Duration {
    let started = Instant::now();
    loop {
        let copied = relay_metric(relay, "meshgram_relay_repair_copied").unwrap_or(0);
        if copied >= count {
            return started.elapsed();
        }
        assert!(started.elapsed() < REPAIR_WITHIN, "{what}: repair copied {copied} of {count} in {REPAIR_WITHIN:?}");
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn copies_of_a_dead_relay_are_back_on_r_relays_before_a_second_failure_and_a_returning_relay_catches_up() {
    dead_and_returning_relays(&[]);
}

/// The same with every placement going through a Kademlia lookup (a big mesh's path; on four
/// relays the routing table alone would be exact).
#[test]
fn the_same_with_placement_by_kademlia_lookups() {
    dead_and_returning_relays(&["--placement-lookups-always"]);
}

fn dead_and_returning_relays(relay_args: &[&str]) {
    let mut mesh = Mesh::start_with_relay_args(4, 2, relay_args);
    let (alice, bob) = (mesh.new_profile("alice"), mesh.new_profile("bob"));
    mesh.login(&alice, ALICE);
    mesh.login(&bob, BOB);
    let key = mesh.gateway.server.ready["public_key"].as_str().unwrap().to_string();
    // Bob's mailbox relays, closest first: the first two hold his copies.
    let order = mesh.relays_by_mailbox_distance(&bob);
    let (first, second, third, fourth) = (order[0], order[1], order[2], order[3]);

    let before: Vec<String> = (0..20).map(|i| format!("before {i:02}")).collect();
    let sent = meshgram_stdin(&alice, &["send", BOB, "--lines"], &before.join("\n")).ok_json();
    assert_eq!(u64_field(&sent, "sent"), 20);

    // The closest relay dies: the second copies what it holds to the next closest (the third)…
    let (first_port, first_data) = (mesh.relays[first].tcp_port(), mesh.relays[first].data_dir.clone());
    mesh.relays[first].kill9();
    let took = wait_repaired(&mesh.relays[second], 20, "after the first relay died");
    eprintln!("copies back on 2 relays {took:?} after the relay died");
    // …so that the second dying as well loses nothing.
    let (second_port, second_data) = (mesh.relays[second].tcp_port(), mesh.relays[second].data_dir.clone());
    mesh.relays[second].kill9();
    let inbox = meshgram(&bob, &["messages"]).ok_json();
    assert_eq!(texts(&inbox), before, "all 20 from the stand-ins, once each, in order");

    // While both are dead Alice sends more; they come back and, again responsible for Bob's
    // mailbox, get the copies they missed from the stand-ins.
    let after: Vec<String> = (0..10).map(|i| format!("after {i:02}")).collect();
    let sent = meshgram_stdin(&alice, &["send", BOB, "--lines"], &after.join("\n")).ok_json();
    assert_eq!(u64_field(&sent, "sent"), 10);
    let copied_so_far: u64 = [third, fourth]
        .iter()
        .map(|&i| relay_metric(&mesh.relays[i], "meshgram_relay_repair_copied").unwrap_or(0))
        .sum();
    mesh.relays[first] = start_relay(&first_data, &key, 2, first_port, relay_args).unwrap();
    mesh.relays[second] = start_relay(&second_data, &key, 2, second_port, relay_args).unwrap();
    let started = Instant::now();
    loop {
        let copied: u64 = [third, fourth]
            .iter()
            .map(|&i| relay_metric(&mesh.relays[i], "meshgram_relay_repair_copied").unwrap_or(0))
            .sum();
        // Ten envelopes onto each of the two returning relays.
        if copied >= copied_so_far + 20 {
            break;
        }
        assert!(started.elapsed() < REPAIR_WITHIN, "the returning relays got {} of 20 copies", copied - copied_so_far);
        thread::sleep(Duration::from_millis(200));
    }
    eprintln!("returning relays caught up {:?} after they started", started.elapsed());
    // The stand-ins die: the returning relays alone hand Bob the rest, and nothing twice (the
    // stale copies of what Bob already has are dropped by id).
    if relay_args.contains(&"--placement-lookups-always") {
        let lookups: u64 =
            mesh.relays.iter().map(|relay| relay_metric(relay, "meshgram_relay_placement_lookups").unwrap_or(0)).sum();
        assert!(lookups > 0, "placement went through Kademlia lookups");
    }
    mesh.relays[third].kill9();
    mesh.relays[fourth].kill9();
    let fetched = meshgram(&bob, &["messages"]);
    eprintln!("{}", fetched.stderr);
    let inbox = fetched.ok_json();
    let mut everything = before.clone();
    everything.extend(after);
    assert_eq!(texts(&inbox), everything, "every message once, in order");
}

/// How long a running node may take to notice that its mailbox moved: it asks for its mailbox
/// relays again every 30 s (`messaging::MAILBOX_RELAYS_FRESH_FOR`), between long-polls of up to
/// 25 s.
const MAILBOX_MOVED_WITHIN: Duration = Duration::from_secs(60);

#[test]
fn a_running_node_follows_its_mailbox_when_closer_relays_join() {
    let mut mesh = Mesh::start(2, 2);
    let (alice, bob) = (mesh.new_profile("alice"), mesh.new_profile("bob"));
    mesh.login(&alice, ALICE);
    mesh.login(&bob, BOB);
    let _bob_node = start_node(&bob);
    let device: PeerId = meshgram(&bob, &["whoami"]).ok_json()["device"].as_str().unwrap().parse().unwrap();
    let distance = |relay: PeerId| KBucketKey::from(device).distance(&KBucketKey::from(relay));
    let wait_for = |text: &str, within: Duration| {
        let started = Instant::now();
        while !texts(&meshgram(&bob, &["messages", ALICE]).ok_json()).iter().any(|t| t == text) {
            assert!(started.elapsed() < within, "Bob's node did not get {text:?} within {within:?}");
            thread::sleep(Duration::from_millis(500));
        }
    };
    meshgram(&alice, &["send", BOB, "before the join"]).ok_json();
    wait_for("before the join", Duration::from_secs(20));

    // Two relays join, both closer to Bob's mailbox than either relay his node fetches from:
    // they hold it now, and what Alice sends goes there.
    let farthest_now = mesh.relays.iter().map(|r| distance(r.peer_id().parse().unwrap())).min().unwrap();
    let key = mesh.gateway.server.ready["public_key"].as_str().unwrap().to_string();
    let mut extra = vec!["--gateway".to_string(), mesh.gateway.addr()];
    extra.extend(mesh.relays.iter().flat_map(|r| ["--bootstrap".to_string(), r.tcp_addr()]));
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    for n in 0.. {
        if mesh.relays.len() == 4 {
            break;
        }
        let dir = mesh.gateway.tmp().join(format!("joining-{n}"));
        let peer = load_or_create_ed25519(&dir.join(RELAY_KEY_FILE)).unwrap().public().to_peer_id();
        if distance(peer) < farthest_now {
            mesh.admit_relay(&dir);
            mesh.relays.push(start_relay(&dir, &key, 2, 0, &extra).unwrap());
        }
    }
    mesh.wait_until_verified();
    meshgram(&alice, &["send", BOB, "after the join"]).ok_json();
    wait_for("after the join", MAILBOX_MOVED_WITHIN);
}
