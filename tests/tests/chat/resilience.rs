//! Messaging while the gateway is away: known contacts need only the relays, and an envelope
//! that cannot be verified now is kept, not dropped.

use std::time::{Duration, Instant};

use meshgram_tests::{Mesh, Server, meshgram, start_node, start_relay, texts};

use super::{ALICE, BOB};

/// SIGSTOPs a server for as long as this lives (SIGCONT on drop, also when a test fails).
struct Stopped<'a>(&'a Server);

impl<'a> Stopped<'a> {
    fn new(server: &'a Server) -> Self {
        server.stop();
        Stopped(server)
    }
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        self.0.cont();
    }
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

/// SIGKILLs the mesh's only relay; returns what restarts it on the same data dir and port.
fn kill_the_relay(mesh: &mut Mesh) -> impl FnOnce(&mut Mesh) + use<> {
    let relay = &mut mesh.relays[0];
    let (port, data) = (relay.tcp_port(), relay.data_dir.clone());
    relay.kill9();
    let key = mesh.gateway.server.ready["public_key"].as_str().unwrap().to_string();
    move |mesh: &mut Mesh| mesh.relays[0] = start_relay(&data, &key, 1, port, &[]).unwrap()
}

fn statuses(messages: &serde_json::Value) -> Vec<String> {
    messages.as_array().unwrap().iter().map(|m| m["status"].as_str().unwrap().to_string()).collect()
}

#[test]
fn messages_sent_while_no_relay_can_take_them_wait_in_the_outbox_and_go_out_once_in_order() {
    let mut mesh = Mesh::start(1, 1);
    let (alice, bob) = (mesh.new_profile("alice"), mesh.new_profile("bob"));
    mesh.login(&alice, ALICE);
    mesh.login(&bob, BOB);
    meshgram(&alice, &["send", BOB, "hello"]).ok_json();

    // Without a node: `send` queues (exit 0, status pending) and the history says so.
    let restart = kill_the_relay(&mut mesh);
    for text in ["queued 1", "queued 2"] {
        let sent = meshgram(&alice, &["send", BOB, text]).ok_json();
        assert_eq!(sent["status"], "pending", "{sent}");
    }
    let mine = meshgram(&alice, &["messages", BOB]).ok_json();
    assert_eq!(texts(&mine), ["hello", "queued 1", "queued 2"]);
    assert_eq!(statuses(&mine)[1..], ["pending", "pending"]);
    restart(&mut mesh);
    // The next command sends them, oldest first.
    meshgram(&alice, &["whoami"]).ok_json();
    assert_eq!(texts(&meshgram(&bob, &["messages"]).ok_json()), ["hello", "queued 1", "queued 2"]);
    let mine = meshgram(&alice, &["messages", BOB]).ok_json();
    assert!(statuses(&mine).iter().all(|s| s != "pending"), "{mine}");

    // With a node: it sends them by itself once a relay answers again.
    let node = start_node(&alice);
    let restart = kill_the_relay(&mut mesh);
    let sent = meshgram(&alice, &["send", BOB, "queued 3"]).ok_json();
    assert_eq!(sent["status"], "pending", "{sent}");
    restart(&mut mesh);
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let inbox = texts(&meshgram(&bob, &["messages"]).ok_json());
        if inbox.len() == 4 {
            assert_eq!(inbox, ["hello", "queued 1", "queued 2", "queued 3"], "once each, in order");
            break;
        }
        assert!(Instant::now() < deadline, "the node did not send its outbox: {inbox:?}");
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    drop(node);
}

#[test]
fn a_stopped_relay_costs_a_send_and_a_fetch_seconds_not_a_minute() {
    let mesh = Mesh::start(3, 2);
    let (alice, bob) = (mesh.new_profile("alice"), mesh.new_profile("bob"));
    mesh.login(&alice, ALICE);
    mesh.login(&bob, BOB);
    meshgram(&alice, &["send", BOB, "before"]).ok_json();
    meshgram(&bob, &["messages"]).ok_json();

    // Alice sends through the relay closest to Bob's mailbox, which also holds a copy: stop it.
    let closest = mesh.relays_by_mailbox_distance(&bob)[0];
    let _stopped = Stopped::new(&mesh.relays[closest]);
    let started = Instant::now();
    let sent = meshgram(&alice, &["send", BOB, "around a stopped relay"]).ok_json();
    let send_took = started.elapsed();
    assert_eq!(sent["status"], "sent", "two live relays keep the two copies: {sent}");
    let started = Instant::now();
    assert_eq!(texts(&meshgram(&bob, &["messages", ALICE]).ok_json()), ["before", "around a stopped relay"]);
    let fetch_took = started.elapsed();
    eprintln!("with the closest relay stopped: send {send_took:?}, messages {fetch_took:?}");
    // Each waited out a deadline or two (10 s for a send, 5 s for a fetch), not a minute's timeout.
    assert!(send_took < Duration::from_secs(30) && fetch_took < Duration::from_secs(30));
}
