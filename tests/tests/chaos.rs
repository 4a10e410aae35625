//! Chaos with real processes: `meshgram up --relays 5`, two users; Alice sends while a loop
//! SIGKILLs a relay every few seconds (and the gateway once) and `up` restarts them. Every
//! message arrives at Bob's client node exactly once, in the order Alice sent them; none is
//! left pending.
//!
//! The short version runs in `./tests/run`. `MESHGRAM_CHAOS_MESSAGES=2000` runs a long one.
//! The killer waits for each relay to come back before it kills the next: two relays of one
//! mailbox down at once is the repair issue's case (copies placed on stand-ins are not yet
//! moved back), not this test's.

// A failed unwrap here is a failed test, which is what it should be.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use meshgram_tests::{Up, meshgram, meshgram_stdin, start_node, texts};

const ALICE: &str = "+15550001111";
const BOB: &str = "+15550002222";
const RELAYS: usize = 5;
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
    let up = Up::start(RELAYS);
    let (alice, bob) = (up.tmp().join("alice"), up.tmp().join("bob"));
    up.login(&alice, ALICE, 0);
    up.login(&bob, BOB, 0);
    meshgram(&alice, &["send", BOB, "warm-up"]).ok_json();
    let _bob_node = start_node(&bob);

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
    for batch in expected.chunks(BATCH) {
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
    // Bob's node has every message, once, in order.
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
