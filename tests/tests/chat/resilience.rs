//! Messaging while the gateway is away: known contacts need only the relays, and an envelope
//! that cannot be verified now is kept, not dropped.

use std::process::Command;
use std::time::Instant;

use meshgram_tests::{Mesh, Server, meshgram, texts};

use super::{ALICE, BOB};

/// SIGSTOPs a server for as long as this lives (SIGCONT on drop, also when a test fails).
struct Stopped<'a>(&'a Server);

impl<'a> Stopped<'a> {
    fn new(server: &'a Server) -> Self {
        signal(server, "-STOP");
        Stopped(server)
    }
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        signal(self.0, "-CONT");
    }
}

fn signal(server: &Server, signal: &str) {
    let status = Command::new("kill").args([signal, &server.pid().to_string()]).status().unwrap();
    assert!(status.success(), "kill {signal}");
}

#[test]
fn known_contacts_message_each_other_while_the_gateway_is_stopped() {
    let mesh = Mesh::start(2, 2);
    let (alice, bob) = (mesh.new_profile("alice"), mesh.new_profile("bob"));
    mesh.login(&alice, ALICE);
    mesh.login(&bob, BOB);
    // One exchange each way: both now hold the other's card.
    meshgram(&alice, &["send", BOB, "hello"]).ok_json();
    meshgram(&bob, &["messages"]).ok_json();
    meshgram(&bob, &["send", ALICE, "hi"]).ok_json();
    meshgram(&alice, &["messages"]).ok_json();

    let stopped = Stopped::new(&mesh.gateway.server);
    let started = Instant::now();
    meshgram(&alice, &["send", BOB, "while the gateway is away"]).ok_json();
    assert_eq!(texts(&meshgram(&bob, &["messages", ALICE]).ok_json()), ["hello", "hi", "while the gateway is away"]);
    meshgram(&bob, &["send", ALICE, "still here"]).ok_json();
    assert_eq!(
        texts(&meshgram(&alice, &["messages", BOB]).ok_json()),
        ["hello", "hi", "while the gateway is away", "still here"]
    );
    eprintln!("four commands without the gateway took {:?}", started.elapsed());
    // Commands that need the gateway say so.
    let error = meshgram(&alice, &["sessions"]).expect_err(&["NETWORK"]);
    assert!(error["message"].as_str().unwrap().contains("gateway"), "{error}");
    drop(stopped);
    meshgram(&alice, &["sessions"]).ok_json();
}

#[test]
fn an_envelope_that_cannot_be_verified_while_the_gateway_is_stopped_is_kept_and_shown_once() {
    let mesh = Mesh::start(2, 2);
    let (alice, bob) = (mesh.new_profile("alice"), mesh.new_profile("bob"));
    mesh.login(&alice, ALICE);
    mesh.login(&bob, BOB);
    meshgram(&alice, &["send", BOB, "first"]).ok_json();
    meshgram(&alice, &["send", BOB, "second"]).ok_json();

    // Bob has never seen Alice's card, and the gateway cannot tell him her key now: the
    // envelopes are neither shown nor dropped (nor acknowledged, so the relays keep them).
    {
        let _stopped = Stopped::new(&mesh.gateway.server);
        let inbox = meshgram(&bob, &["messages"]).ok_json();
        assert_eq!(texts(&inbox), Vec::<String>::new());
    }
    let inbox = meshgram(&bob, &["messages"]).ok_json();
    assert_eq!(texts(&inbox), ["first", "second"], "once each, in order, once the gateway is back");
    assert_eq!(texts(&meshgram(&bob, &["messages"]).ok_json()), ["first", "second"]);
}
