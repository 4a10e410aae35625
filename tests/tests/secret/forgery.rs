use libp2p::identity::ed25519;
use meshgram_node::crypto::identity::load_or_create_ed25519;
use meshgram_node::proto::envelope::EnvelopeId;
use meshgram_node::proto::{MailboxRequest, MailboxResponse};
use meshgram_tests::{Mesh, RawClient, dropped_envelopes, meshgram, str_field, unix_now, whoami_user_id};

use super::{ALICE, BOB, only_chat, secret_messages};

/// A profile's own device on one relay, signed in with a certificate the test signs.
async fn raw_device(mesh: &Mesh, relay: usize, profile: &std::path::Path, key: &ed25519::Keypair) -> RawClient {
    let raw = RawClient::of_profile(&mesh.relays[relay].tcp_addr(), profile);
    let cert = raw.cert(key, whoami_user_id(profile), unix_now() - 60, unix_now() + 3600);
    assert!(matches!(raw.call(MailboxRequest::Hello { cert }).await, MailboxResponse::Welcome { .. }));
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_secret_frame_replayed_moved_or_altered_is_refused() {
    let mesh = Mesh::start(3, 2);
    // The gateway's own key: the test's certificates are as good as the gateway's.
    let key_file = mesh.gateway.data_dir().join(meshgram_node::defaults::GATEWAY_KEY_FILE);
    let gateway_key = load_or_create_ed25519(&key_file).unwrap().try_into_ed25519().unwrap();
    let (alice, bob) = (mesh.new_profile("alice"), mesh.new_profile("bob"));
    mesh.login(&alice, ALICE);
    mesh.login(&bob, BOB);
    let id = str_field(&meshgram(&alice, &["secret", "start", BOB]).ok_json(), "id").to_string();
    assert_eq!(only_chat(&bob)["state"], "incoming");
    meshgram(&bob, &["secret", "accept", &id]).ok_json();
    assert_eq!(only_chat(&alice)["state"], "active");

    // The frame, as Bob's device fetches it (left on the relay: not acknowledged).
    let sentinel = "a frame to replay 51c0";
    meshgram(&alice, &["secret", "send", &id, sentinel]).ok_json();
    let holder = mesh.relays_by_mailbox_distance(&bob)[0];
    let fetched = {
        let raw_bob = raw_device(&mesh, holder, &bob, &gateway_key).await;
        match raw_bob.call(MailboxRequest::Fetch { max: 100, wait_ms: 0, ack: Vec::new() }).await {
            MailboxResponse::Envelopes { envelopes, .. } => envelopes,
            other => panic!("fetch: {other:?}"),
        }
    };
    let frame = fetched.last().unwrap_or_else(|| panic!("the frame waits for Bob")).clone();
    assert!(frame.sealed.len() >= 256, "padded: {} bytes", frame.sealed.len());
    assert!(!String::from_utf8_lossy(&frame.sealed).contains(sentinel));

    let shown = |p| secret_messages(p, None).into_iter().filter(|m| m["text"] == sentinel).count();
    assert_eq!(shown(&bob), 1);
    let before = dropped_envelopes(&bob);

    // Alice's device (the only one that may send as it) sends it again, as it was, under
    // another envelope id, and altered.
    let raw_alice = raw_device(&mesh, holder, &alice, &gateway_key).await;
    let mut moved = frame.clone();
    moved.id = EnvelopeId::random();
    let mut altered = frame.clone();
    altered.id = EnvelopeId::random();
    altered.sealed[100] ^= 0x20;
    for envelope in [frame, moved, altered] {
        let answer = raw_alice.call(MailboxRequest::Send { envelopes: vec![envelope] }).await;
        assert!(matches!(answer, MailboxResponse::Stored { .. }), "{answer:?}");
    }
    assert_eq!(shown(&bob), 1, "the message shows once");
    assert_eq!(dropped_envelopes(&bob), before + 2, "the moved and the altered copy are dropped as forged");
    assert_eq!(shown(&alice), 1);
}
