//! A relay that alters what an envelope says outside its seal: the recipient's real client
//! drops the envelope as forged rather than show a message re-dated, reordered or re-addressed.
//!
//! The test plays the relay that alters: it seals envelopes from Alice's device to Bob's as
//! her client does (her profile's keys, `seal_envelope`), changes the routing fields of some
//! on the way, and hands them to the relay through a raw mailbox client of hers.

use meshgram_node::crypto::identity::{DeviceIdentity, load_or_create_ed25519};
use meshgram_node::crypto::seal::seal_envelope;
use meshgram_node::ids::{UserId, now_ms};
use meshgram_node::proto::envelope::{Envelope, EnvelopeId};
use meshgram_node::proto::payload::{Body, MessageId, Payload};
use meshgram_node::proto::{MailboxRequest, MailboxResponse};
use meshgram_tests::{Mesh, RawClient, dropped_envelopes, meshgram, texts, unix_now, whoami_user_id};

use super::{ALICE, BOB};

/// The texts of Bob's messages, oldest first.
fn shown(bob: &std::path::Path) -> Vec<String> {
    texts(&meshgram(bob, &["messages"]).ok_json())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_re_dated_reordered_or_re_addressed_on_the_way_is_dropped_not_shown() {
    let mesh = Mesh::start(1, 1);
    let (alice, bob) = (mesh.new_profile("alice"), mesh.new_profile("bob"));
    mesh.login(&alice, ALICE);
    mesh.login(&bob, BOB);
    meshgram(&alice, &["send", BOB, "a real one first"]).ok_json();
    assert_eq!(shown(&bob), ["a real one first"]);
    let before = dropped_envelopes(&bob);

    let (alice_id, bob_id) = (UserId(whoami_user_id(&alice)), UserId(whoami_user_id(&bob)));
    let (alice_device, bob_device) =
        (DeviceIdentity::load_or_create(&alice).unwrap(), DeviceIdentity::load_or_create(&bob).unwrap());
    let sealed = |text: &str, seq: u64| {
        let payload = Payload {
            message_id: MessageId::random(),
            chat_with: bob_id,
            body: Body::Text { text: text.to_string(), reply_to: None },
        };
        let mut envelope = Envelope {
            id: EnvelopeId::random(),
            from_user: alice_id,
            from_device: alice_device.peer_id(),
            to_user: bob_id,
            to_device: bob_device.peer_id(),
            sent_at_ms: now_ms(),
            seq,
            sealed: Vec::new(),
        };
        let bytes = postcard::to_stdvec(&payload).unwrap();
        seal_envelope(&alice_device, &bob_device.noise_public, &mut envelope, &bytes).unwrap();
        envelope
    };
    let mut redated = sealed("re-dated on the way", 1_000);
    redated.sent_at_ms -= 86_400_000;
    let mut reordered = sealed("reordered on the way", 1_001);
    reordered.seq = 1;
    let mut readdressed = sealed("another account's on the way", 1_002);
    readdressed.to_user = UserId(bob_id.0 + 1);
    let intact = sealed("sealed and delivered as it was", 1_003);

    // Alice's device hands them to the relay, signed in with a certificate as good as the
    // gateway's (its own key).
    let key_file = mesh.gateway.data_dir().join(meshgram_node::defaults::GATEWAY_KEY_FILE);
    let gateway_key = load_or_create_ed25519(&key_file).unwrap().try_into_ed25519().unwrap();
    let raw_alice = RawClient::of_profile(&mesh.relays[0].tcp_addr(), &alice);
    let cert = raw_alice.cert(&gateway_key, alice_id.0, unix_now() - 60, unix_now() + 3600);
    assert!(matches!(raw_alice.call(MailboxRequest::Hello { cert }).await, MailboxResponse::Welcome { .. }));
    let envelopes = vec![redated, reordered, readdressed, intact];
    let sent = raw_alice.call(MailboxRequest::Send { envelopes }).await;
    assert!(matches!(sent, MailboxResponse::Stored { .. }), "{sent:?}");
    drop(raw_alice);

    assert_eq!(shown(&bob), ["a real one first", "sealed and delivered as it was"]);
    assert_eq!(dropped_envelopes(&bob), before + 3, "the three altered envelopes are dropped as forged");
}
