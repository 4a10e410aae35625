use libp2p::identity::ed25519;
use meshgram_node::client::groups::Groups;
use meshgram_node::client::history::History;
use meshgram_node::crypto::identity::DeviceIdentity;
use meshgram_node::crypto::seal;
use meshgram_node::ids::{NoiseKey, UserId, now_ms};
use meshgram_node::proto::envelope::{Envelope, EnvelopeId};
use meshgram_node::proto::group::{GroupId, GroupSeal, PostCert};
use meshgram_node::proto::payload::{Body, MessageId, Payload};
use meshgram_node::proto::{ErrorCode, MailboxRequest, MailboxResponse};
use meshgram_tests::{Mesh, RawClient, dropped_envelopes, meshgram, str_field, unix_now, whoami_user_id};

use super::{create_group, gateway_key, held_by_relays_now, relays_by_group_distance, unsealed_post, wait_for_texts};

const ALICE: &str = "+15550004001";
const BOB: &str = "+15550004002";
const CAROL: &str = "+15550004003";

/// A profile's own device on one relay, signed in with a certificate the test signs.
async fn raw_device(mesh: &Mesh, relay: usize, profile: &std::path::Path, key: &ed25519::Keypair) -> RawClient {
    let raw = RawClient::of_profile(&mesh.relays[relay].tcp_addr(), profile);
    let cert = raw.cert(key, whoami_user_id(profile), unix_now() - 60, unix_now() + 3600);
    assert!(matches!(raw.call(MailboxRequest::Hello { cert }).await, MailboxResponse::Welcome { .. }));
    raw
}

fn refusal(answer: MailboxResponse) -> ErrorCode {
    match answer {
        MailboxResponse::Error(e) => e.code,
        other => panic!("accepted: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_by_non_members_and_states_by_non_admins_are_refused_and_nothing_is_stored() {
    let mesh = Mesh::start(3, 2);
    let gateway_key = gateway_key(&mesh);
    let [alice, bob, carol, mallory] = ["alice", "bob", "carol", "mallory"].map(|n| mesh.new_profile(n));
    for (profile, phone) in [(&alice, ALICE), (&bob, BOB), (&carol, CAROL), (&mallory, "+15550004009")] {
        mesh.login(profile, phone);
    }
    let group = create_group(&alice, "Guarded", &[BOB, CAROL]);
    meshgram(&alice, &["send", &group, "first"]).ok_json();
    assert_eq!(wait_for_texts(&carol, &group, 1), ["first"]);
    let group_id: GroupId = group.parse().unwrap();
    let holder = relays_by_group_distance(&mesh, &group)[0];
    let held = held_by_relays_now(&mesh, &group).await;

    // Mallory, in no group, posts to it: under a certificate of her own admin key, under a
    // copy of the group's real certificate (she lacks its post key), as garbage, and with a
    // one-to-one Send addressed to the group's mailbox.
    let raw = raw_device(&mesh, holder, &mallory, &gateway_key).await;
    let post = |sealer: &dyn Fn(&mut Envelope)| {
        let mut envelope = unsealed_post(whoami_user_id(&mallory), raw.device(), group_id);
        sealer(&mut envelope);
        envelope
    };
    let own_admin = ed25519::Keypair::generate();
    let own_post = ed25519::Keypair::generate();
    let own_cert = PostCert::sign(&own_admin, 9, own_post.public().to_bytes());
    let forged = post(&|e| GroupSeal::seal(e, group_id, own_cert.clone(), &own_post, b"forged".to_vec()));
    assert_eq!(refusal(raw.call(MailboxRequest::Post { envelopes: vec![forged] }).await), ErrorCode::Forbidden);
    meshgram(&bob, &["group", "info", &group]).ok_json();
    let history = History::open(&bob).unwrap();
    let record = Groups::open(&history).unwrap().all().unwrap().pop().unwrap();
    drop(history);
    let real_cert = record.cert.clone().unwrap();
    let copied = post(&|e| GroupSeal::seal(e, group_id, real_cert.clone(), &own_post, b"copied".to_vec()));
    assert_eq!(refusal(raw.call(MailboxRequest::Post { envelopes: vec![copied] }).await), ErrorCode::Forbidden);
    let garbage = post(&|e| e.sealed = vec![7; 300]);
    assert_eq!(
        refusal(raw.call(MailboxRequest::Post { envelopes: vec![garbage.clone()] }).await),
        ErrorCode::BadRequest
    );
    assert_eq!(refusal(raw.call(MailboxRequest::Send { envelopes: vec![garbage] }).await), ErrorCode::BadRequest);
    assert_eq!(held_by_relays_now(&mesh, &group).await, held, "nothing stored");

    // Bob, a member but no admin, makes himself admin in a state as good as an admin's but
    // for its signer (the current epoch's key and certificate, the next version), and seals it
    // to Carol's device as an admin's client would.
    let mut state = record.state.clone();
    state.version += 1;
    state.changed_by = UserId(whoami_user_id(&bob));
    for member in &mut state.members {
        member.admin = member.user == UserId(whoami_user_id(&bob));
    }
    let body = Body::GroupState {
        state: Box::new(state),
        epoch_key: record.current_key().unwrap().0,
        admin_seed: None,
        cert: real_cert,
    };
    let payload = Payload { message_id: MessageId::random(), chat_with: group_id.chat_number(), body };
    let carol_card = meshgram(&bob, &["lookup", CAROL]).ok_json();
    let carol_device = &carol_card["devices"][0];
    let noise = NoiseKey(meshgram_node::ids::parse_hex::<32>(str_field(&carol_device["keys"], "noise_key")).unwrap());
    let bob_identity = DeviceIdentity::load_or_create(&bob).unwrap();
    let dropped_before = dropped_envelopes(&carol);
    let id = EnvelopeId::random();
    let envelope = Envelope {
        id,
        from_user: UserId(whoami_user_id(&bob)),
        from_device: bob_identity.peer_id(),
        to_user: UserId(whoami_user_id(&carol)),
        to_device: str_field(carol_device, "peer_id").parse().unwrap(),
        sent_at_ms: now_ms(),
        seq: 1_000,
        sealed: seal::seal(&bob_identity, &noise, &id, &postcard::to_stdvec(&payload).unwrap()).unwrap(),
    };
    let raw_bob = raw_device(&mesh, holder, &bob, &gateway_key).await;
    assert!(matches!(
        raw_bob.call(MailboxRequest::Send { envelopes: vec![envelope] }).await,
        MailboxResponse::Stored { .. }
    ));

    let info = meshgram(&carol, &["group", "info", &group]).ok_json();
    assert_eq!(dropped_envelopes(&carol), dropped_before + 1);
    assert_eq!(info["version"], record.state.version, "{info}");
    let admins: Vec<&str> = info["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["admin"] == true)
        .map(|m| str_field(m, "name"))
        .collect();
    assert_eq!(admins.len(), 1, "{info}");
    assert_eq!(info["members"][0]["admin"], true, "Alice is still the one admin: {info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_posting_with_its_old_key_through_a_relay_that_holds_no_copy_is_refused() {
    let mesh = Mesh::start(3, 2);
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|n| mesh.new_profile(n));
    for (profile, phone) in [(&alice, ALICE), (&bob, BOB), (&carol, CAROL)] {
        mesh.login(profile, phone);
    }
    let group = create_group(&alice, "Moving on", &[BOB, CAROL]);
    let group_id: GroupId = group.parse().unwrap();
    meshgram(&carol, &["group", "info", &group]).ok_json();
    let kept = {
        let history = History::open(&carol).unwrap();
        Groups::open(&history).unwrap().all().unwrap().pop().unwrap()
    };
    meshgram(&alice, &["group", "remove", &group, CAROL]).ok_json();
    meshgram(&alice, &["send", &group, "after carol"]).ok_json();
    assert_eq!(wait_for_texts(&bob, &group, 1), ["after carol"]);

    // Carol's device, with the key and certificate it had, posts through the one relay that
    // holds no copy of the group (and so has never seen its new epoch).
    let order = relays_by_group_distance(&mesh, &group);
    let raw = raw_device(&mesh, order[2], &carol, &gateway_key(&mesh)).await;
    let key = *kept.current_key().unwrap();
    let mut post = unsealed_post(whoami_user_id(&carol), raw.device(), group_id);
    let body = Body::Text { text: "still here".into(), reply_to: None };
    let identity = DeviceIdentity::load_or_create(&carol).unwrap();
    let ciphertext = key.seal(&identity.keypair, &post.id, &group_id, 0, MessageId::random(), body);
    GroupSeal::seal(&mut post, group_id, kept.cert.clone().unwrap(), &key.post_keypair(), ciphertext);
    let held = held_by_relays_now(&mesh, &group).await;
    assert_eq!(refusal(raw.call(MailboxRequest::Post { envelopes: vec![post] }).await), ErrorCode::Forbidden);
    assert_eq!(held_by_relays_now(&mesh, &group).await, held, "nothing stored");
}
