//! Chaos with real processes: `meshgram up --relays 5`, two users; Alice sends while a loop
//! SIGKILLs a relay every few seconds (and the gateway once) and `up` restarts them. Bob's
//! client node runs for the first half and is stopped for the second, so that half waits on
//! the relays. Once the loop stops and repair has settled, every envelope any relay holds is on
//! the `R` relays responsible for its mailbox (read from their stores, the network stopped);
//! then, the network started again, every message arrives at Bob's node exactly once, in the
//! order Alice sent them, and none is left pending.
//!
//! The short version runs in `./tests/run`. `MESHGRAM_CHAOS_MESSAGES=2000` runs a long one.
//! The killer waits for each relay to come back before it kills the next.

// A failed unwrap here is a failed test, which is what it should be.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use std::collections::{HashMap, HashSet};

use libp2p::PeerId;
use libp2p::kad::KBucketKey;
use meshgram_tests::{Up, inspect_relay, meshgram, meshgram_stdin, start_node, texts, wait_repair_settled};

const ALICE: &str = "+15550001111";
const BOB: &str = "+15550002222";
const RELAYS: usize = 5;
/// Copies of each envelope (`up`'s default).
const REPLICATION: usize = 2;
/// Messages per `send --lines`.
const BATCH: usize = 10;
/// Between a killed role's return and the next kill.
const KILL_EVERY: Duration = Duration::from_secs(1);
/// Between batches: sending lasts long enough for several kills.
const PACE: Duration = Duration::from_millis(500);
/// How long the outbox and the delivery may take to settle once the killing stops.
const SETTLE: Duration = Duration::from_secs(90);

#[test]
fn every_message_arrives_once_in_order_while_relays_and_the_gateway_are_killed() {
    let count: usize = std::env::var("MESHGRAM_CHAOS_MESSAGES").ok().and_then(|n| n.parse().ok()).unwrap_or(200);
    let mut up = Up::start(RELAYS);
    let (alice, bob) = (up.tmp().join("alice"), up.tmp().join("bob"));
    up.login(&alice, ALICE, 0);
    up.login(&bob, BOB, 0);
    meshgram(&alice, &["send", BOB, "warm-up"]).ok_json();
    let mut bob_node = start_node(&bob);

    let stop = Arc::new(AtomicBool::new(false));
    let killer = {
        let (roles, stop) = (up.roles(), stop.clone());
        thread::spawn(move || {
            let mut kills = Vec::new();
            let mut seed = u64::from(std::process::id());
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(KILL_EVERY);
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                // Never the relay killed last: `up` restarts a role that keeps dying at once more
                // and more slowly, as supervisors do.
                let mut relay = (seed >> 33) as usize % RELAYS;
                if kills.last() == Some(&format!("relay-{relay}")) {
                    relay = (relay + 1) % RELAYS;
                }
                let role = if kills.len() == 2 { "gateway".to_string() } else { format!("relay-{relay}") };
                let old = roles.kill9_role(&role);
                roles.wait_restarted(&role, old);
                kills.push(role);
            }
            kills
        })
    };

    let expected: Vec<String> = (0..count).map(|i| format!("chaos {i:05}")).collect();
    let mut pending = 0;
    for (i, batch) in expected.chunks(BATCH).enumerate() {
        if i == expected.len() / BATCH / 2 {
            bob_node.terminate();
        }
        let sent = meshgram_stdin(&alice, &["send", BOB, "--lines"], &batch.join("\n")).ok_json();
        if sent["status"] == "pending" {
            pending += 1;
        }
        thread::sleep(PACE);
    }
    stop.store(true, Ordering::Relaxed);
    let kills = killer.join().unwrap();
    eprintln!("{count} messages in batches of {BATCH}; {pending} batches waited in the outbox; killed {kills:?}");
    assert!(kills.len() >= 3, "the chaos loop killed {kills:?}");

    // Alice's outbox empties (each command sends what waits in it).
    let deadline = Instant::now() + SETTLE;
    loop {
        let mine = meshgram(&alice, &["messages", BOB]).ok_json();
        if mine.as_array().unwrap().iter().all(|m| m["status"] != "pending") {
            break;
        }
        assert!(Instant::now() < deadline, "Alice's outbox did not empty");
        thread::sleep(Duration::from_millis(500));
    }
    // Every envelope held anywhere is on the R relays responsible for its mailbox.
    let https: Vec<String> =
        up.network["relays"].as_array().unwrap().iter().map(|r| r["http"].as_str().unwrap().to_string()).collect();
    let took = wait_repair_settled(&https, SETTLE);
    eprintln!("repair settled {took:?} after the killing stopped");
    let bob_device = meshgram(&bob, &["whoami"]).ok_json()["device"].as_str().unwrap().to_string();
    up.server.terminate();
    let relay_ids: Vec<PeerId> = up.network["relays"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["peer_id"].as_str().unwrap().parse().unwrap())
        .collect();
    let stores: Vec<HashMap<String, Vec<String>>> =
        (0..RELAYS).map(|i| inspect_relay(&up.data.join(format!("relay-{i}")))).collect();
    let mut held_anywhere: HashMap<&String, HashSet<&String>> = HashMap::new();
    for store in &stores {
        for (mailbox, ids) in store {
            held_anywhere.entry(mailbox).or_default().extend(ids);
        }
    }
    for (mailbox, ids) in &held_anywhere {
        let key = KBucketKey::from(mailbox.parse::<PeerId>().unwrap());
        let mut order: Vec<usize> = (0..RELAYS).collect();
        order.sort_by_key(|&i| key.distance(&KBucketKey::from(relay_ids[i])));
        for &i in &order[..REPLICATION] {
            let here: HashSet<&String> = stores[i].get(*mailbox).into_iter().flatten().collect();
            let missing = ids.difference(&here).count();
            assert_eq!(missing, 0, "relay {i}, responsible for mailbox {mailbox}, lacks {missing} of its envelopes");
        }
    }
    let waiting_for_bob = held_anywhere.get(&bob_device).map_or(0, HashSet::len);
    eprintln!("{waiting_for_bob} envelopes waited for Bob, each on {REPLICATION} responsible relays");
    assert!(waiting_for_bob >= count / 2 - BATCH, "the second half waited on the relays ({waiting_for_bob})");

    // The network again, on the same data: Bob's node has every message, once, in order.
    up.server = Up::start_on(&up.data, RELAYS);
    let _bob_node = start_node(&bob);
    let mut want = vec!["warm-up".to_string()];
    want.extend(expected);
    let deadline = Instant::now() + SETTLE;
    loop {
        let got = texts(&meshgram(&bob, &["messages", ALICE]).ok_json());
        if got.len() >= want.len() || Instant::now() >= deadline {
            assert_eq!(got, want, "every message once, in order");
            break;
        }
        thread::sleep(Duration::from_millis(500));
    }
}
