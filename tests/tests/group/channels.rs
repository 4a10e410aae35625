use std::path::Path;
use std::time::{Duration, Instant};

use libp2p::identity::ed25519;
use libp2p::kad::KBucketKey;
use meshgram_node::crypto::group::EpochKey;
use meshgram_node::crypto::identity::DeviceIdentity;
use meshgram_node::proto::envelope::EnvelopeId;
use meshgram_node::proto::group::{GroupCursor, GroupId, GroupSeal, PostCert};
use meshgram_node::proto::{ErrorCode, MailboxRequest, MailboxResponse};
use meshgram_tests::{Mesh, RawClient, meshgram, start_node, str_field, u64_field, unix_now};

use super::{gateway_key, group_texts, held_by_relays_now, relays_by_group_distance, unsealed_post, wait_for_texts};

const ADMIN: &str = "+15550005001";
const SUB1: &str = "+15550005002";
const SUB2: &str = "+15550005003";
const READER: &str = "+15550005004";
const STRANGER: &str = "+15550005005";

/// Waits (bounded) until `profile`'s `channel info` says `want` subscribers.
fn wait_for_subscribers(profile: &Path, channel: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = meshgram(profile, &["channel", "info", channel]).ok_json();
        if info["subscribers"] == want {
            return;
        }
        assert!(Instant::now() < deadline, "never {want} subscribers: {info}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_channel_is_read_from_its_link_only_its_admin_posts_and_subscribers_are_counted() {
    let mesh = Mesh::start(3, 2);
    let [admin, sub1, sub2, reader] = ["admin", "sub1", "sub2", "reader"].map(|n| mesh.new_profile(n));
    for (profile, phone) in [(&admin, ADMIN), (&sub1, SUB1), (&sub2, SUB2), (&reader, READER)] {
        mesh.login(profile, phone);
    }
    let created = meshgram(&admin, &["channel", "create", "News"]).ok_json();
    assert_eq!((created["kind"].as_str(), created["public"].as_bool()), (Some("channel"), Some(true)), "{created}");
    let channel = str_field(&created, "id").to_string();
    for text in ["first post", "second post"] {
        meshgram(&admin, &["channel", "post", &channel, text]).ok_json();
    }
    let link = str_field(&meshgram(&admin, &["channel", "link", &channel]).ok_json(), "link").to_string();

    // Read by someone who is not subscribed, from the link alone.
    let read = meshgram(&reader, &["channel", "read", &link]).ok_json();
    let shown: Vec<&str> =
        read.as_array().unwrap().iter().filter(|m| m["notice"] != true).map(|m| str_field(m, "text")).collect();
    assert_eq!(shown, ["first post", "second post"], "{read}");
    assert_eq!(meshgram(&reader, &["channel", "info", &channel]).ok_json()["title"], "News");

    // By its @name too, as a username is found: named by its admin, a name no account can take.
    meshgram(&admin, &["channel", "name", &channel, "@news_chan"]).ok_json();
    let stranger = mesh.new_profile("stranger");
    mesh.login(&stranger, STRANGER);
    let by_name = meshgram(&stranger, &["channel", "read", "@News_Chan"]).ok_json();
    let shown: Vec<&str> =
        by_name.as_array().unwrap().iter().filter(|m| m["notice"] != true).map(|m| str_field(m, "text")).collect();
    assert_eq!(shown, ["first post", "second post"], "{by_name}");
    meshgram(&reader, &["profile", "set", "--username", "news_chan"]).expect_err(&["USERNAME_OCCUPIED"]);
    meshgram(&reader, &["channel", "name", &channel, "@mine_now"]).expect_err(&["FORBIDDEN"]);
    meshgram(&reader, &["channel", "read", "@no_such_chan"]).expect_err(&["NOT_FOUND"]);
    // Given up by its admin, the name reads nothing and is anyone's to take.
    let freed = meshgram(&admin, &["channel", "name", &channel, "@news_chan", "--off"]).ok_json();
    assert_eq!(freed["off"], true, "{freed}");
    meshgram(&stranger, &["channel", "read", "@news_chan"]).expect_err(&["NOT_FOUND"]);
    meshgram(&reader, &["profile", "set", "--username", "news_chan"]).ok_json();

    // Subscribers are counted by the admin's device, and see the count.
    let _node = start_node(&admin);
    meshgram(&sub1, &["channel", "subscribe", &link]).ok_json();
    meshgram(&sub2, &["channel", "subscribe", &link]).ok_json();
    wait_for_subscribers(&admin, &channel, 2);
    wait_for_subscribers(&sub1, &channel, 2);
    meshgram(&admin, &["channel", "post", &channel, "third post"]).ok_json();
    assert_eq!(wait_for_texts(&sub2, &channel, 3), ["first post", "second post", "third post"]);

    // Only its admin posts: refused by a subscriber's client, and by the relays to a
    // subscriber's device that signs with what it has (the channel's key) under the admin's
    // certificate, or under a certificate of its own.
    let refused = meshgram(&sub1, &["channel", "post", &channel, "mine now"]).expect_err(&["FORBIDDEN"]);
    assert!(str_field(&refused, "message").contains("only admins"), "{refused}");
    let group: GroupId = channel.parse().unwrap();
    let holder = relays_by_group_distance(&mesh, &channel)[0];
    let raw = RawClient::of_profile(&mesh.relays[holder].tcp_addr(), &sub1);
    let sub1_user = u64_field(&meshgram(&sub1, &["whoami"]).ok_json()["account"], "user_id");
    let cert = raw.cert(&gateway_key(&mesh), sub1_user, unix_now() - 60, unix_now() + 3600);
    assert!(matches!(raw.call(MailboxRequest::Hello { cert }).await, MailboxResponse::Welcome { .. }));
    let fetched = match raw
        .call(MailboxRequest::GroupFetch { groups: vec![GroupCursor { group, from: 0 }], max: 1, wait_ms: 0 })
        .await
    {
        MailboxResponse::GroupEnvelopes { groups } => groups[0].envelopes[0].clone(),
        other => panic!("{other:?}"),
    };
    let admin_cert = GroupSeal::verify(&fetched).unwrap().cert;
    let key_hex = link.rsplit('/').next().unwrap();
    let channel_key = EpochKey(meshgram_node::ids::parse_hex::<32>(key_hex).unwrap());
    let own = ed25519::Keypair::generate();
    let held = held_by_relays_now(&mesh, &channel).await;
    for (cert, signer) in [
        (admin_cert.clone(), channel_key.post_keypair()),
        (PostCert::sign(&own, 0, channel_key.post_keypair().public().to_bytes()), channel_key.post_keypair()),
    ] {
        let mut post = unsealed_post(sub1_user, raw.device(), group);
        GroupSeal::seal(&mut post, group, cert, &signer, b"a subscriber's post".to_vec());
        match raw.call(MailboxRequest::Post { envelopes: vec![post] }).await {
            MailboxResponse::Error(e) => assert_eq!(e.code, ErrorCode::Forbidden, "{e}"),
            other => panic!("a subscriber's post was taken: {other:?}"),
        }
    }
    assert_eq!(held_by_relays_now(&mesh, &channel).await, held, "nothing stored");

    meshgram(&sub2, &["channel", "unsubscribe", &channel]).ok_json();
    wait_for_subscribers(&admin, &channel, 1);
    assert!(mesh.relay_files_containing(b"second post").is_empty());
}

#[test]
fn a_private_channel_lets_subscribers_in_by_invite_and_nobody_reads_it_from_the_link() {
    let mesh = Mesh::start(3, 2);
    let [admin, sub1, reader] = ["admin", "sub1", "reader"].map(|n| mesh.new_profile(n));
    for (profile, phone) in [(&admin, ADMIN), (&sub1, SUB1), (&reader, READER)] {
        mesh.login(profile, phone);
    }
    let created = meshgram(&admin, &["channel", "create", "Insiders", "--private"]).ok_json();
    assert_eq!(created["public"], false, "{created}");
    let channel = str_field(&created, "id").to_string();
    meshgram(&admin, &["channel", "post", &channel, "for subscribers: quokka zebra"]).ok_json();
    let link = str_field(&meshgram(&admin, &["channel", "link", &channel]).ok_json(), "link").to_string();
    assert!(link.starts_with("meshgram:join/"), "{link}");

    assert_eq!(meshgram(&reader, &["channel", "read", &link]).expect_err(&["USAGE"])["code"], "USAGE");
    let _node = start_node(&admin);
    meshgram(&sub1, &["channel", "subscribe", &link]).ok_json();
    let deadline = Instant::now() + Duration::from_secs(30);
    while meshgram(&sub1, &["channel", "info", &channel]).status.code() != Some(0) {
        assert!(Instant::now() < deadline, "the subscriber was never let in");
        std::thread::sleep(Duration::from_millis(300));
    }
    // A channel shows its history to new subscribers.
    assert_eq!(wait_for_texts(&sub1, &channel, 1), ["for subscribers: quokka zebra"]);
    wait_for_subscribers(&admin, &channel, 1);
    assert_eq!(group_texts(&admin, &channel), ["for subscribers: quokka zebra"]);
    assert!(mesh.relay_files_containing(b"quokka zebra").is_empty());
}

/// A channel's messages on one relay from `from` on, read by `raw` (long-polling `wait_ms`);
/// each is checked as a member's client checks a post's signatures.
async fn read_channel(raw: &RawClient, group: GroupId, from: u64, wait_ms: u32) -> (Vec<EnvelopeId>, u64) {
    let fetch = MailboxRequest::GroupFetch { groups: vec![GroupCursor { group, from }], max: 256, wait_ms };
    match raw.call(fetch).await {
        MailboxResponse::GroupEnvelopes { groups } if groups.is_empty() => (Vec::new(), from),
        MailboxResponse::GroupEnvelopes { mut groups } => {
            let batch = groups.remove(0);
            for envelope in &batch.envelopes {
                assert_eq!(GroupSeal::verify(envelope).unwrap().group, group);
            }
            (batch.envelopes.iter().map(|e| e.id).collect(), batch.next)
        }
        other => panic!("group fetch: {other:?}"),
    }
}

/// Reads on (bounded) until `want` more messages came; gives their ids and the next cursor.
async fn read_until(raw: &RawClient, group: GroupId, mut from: u64, want: usize) -> (Vec<EnvelopeId>, u64) {
    let (deadline, mut got) = (Instant::now() + Duration::from_secs(60), Vec::new());
    while got.len() < want {
        assert!(Instant::now() < deadline, "only {} of {want} messages came", got.len());
        let (ids, next) = read_channel(raw, group, from, 10_000).await;
        got.extend(ids);
        from = next;
    }
    (got, from)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_does_not_hold_a_channel_mirrors_it_for_its_readers_through_an_origin_killed_midway() {
    let mut mesh = Mesh::start(4, 2);
    let admin = mesh.new_profile("admin");
    mesh.login(&admin, ADMIN);
    let channel = str_field(&meshgram(&admin, &["channel", "create", "Mirrored"]).ok_json(), "id").to_string();
    let group: GroupId = channel.parse().unwrap();
    meshgram(&admin, &["channel", "post", &channel, "before the mirror"]).ok_json();
    let order = relays_by_group_distance(&mesh, &channel);
    let (origin, mirror) = (order[0], order[3]);
    let key = gateway_key(&mesh);

    // A subscriber whose own mailbox relay holds none of the channel reads it through that
    // relay. (Its device key is made before it signs in, until one is closest to that relay.)
    let link = str_field(&meshgram(&admin, &["channel", "link", &channel]).ok_json(), "link").to_string();
    let home = order[2];
    let subscriber = (0..1000)
        .map(|n| mesh.new_profile(&format!("sub{n}")))
        .find(|profile| {
            let device = DeviceIdentity::load_or_create(profile).unwrap().peer_id();
            let distance = |i: &usize| {
                let relay: libp2p::PeerId = mesh.relays[*i].peer_id().parse().unwrap();
                KBucketKey::from(device).distance(&KBucketKey::from(relay))
            };
            (0..mesh.relays.len()).min_by_key(distance) == Some(home)
        })
        .unwrap();
    mesh.login(&subscriber, "+15550006100");
    assert_eq!(mesh.relays_by_mailbox_distance(&subscriber)[0], home, "signed in with the key made for it");
    meshgram(&subscriber, &["channel", "subscribe", &link]).ok_json();
    meshgram(&admin, &["channel", "post", &channel, "for the subscriber"]).ok_json();
    assert_eq!(wait_for_texts(&subscriber, &channel, 2), ["before the mirror", "for the subscriber"]);
    assert_eq!(meshgram_tests::relay_metric(&mesh.relays[home], "meshgram_relay_groups_mirrored"), Some(1));

    // A reader on a relay that holds none of it: its first read waits for that relay's first
    // read of the channel's own relays, so it finds what was posted before.
    let raw = RawClient::new(&mesh.relays[mirror].tcp_addr());
    let cert = raw.cert(&key, 999_998, unix_now() - 60, unix_now() + 3600);
    assert!(matches!(raw.call(MailboxRequest::Hello { cert }).await, MailboxResponse::Welcome { .. }));
    let (first, from) = read_channel(&raw, group, 0, 0).await;
    let on_origin = RawClient::new(&mesh.relays[order[1]].tcp_addr());
    let cert = on_origin.cert(&key, 999_997, unix_now() - 60, unix_now() + 3600);
    assert!(matches!(on_origin.call(MailboxRequest::Hello { cert }).await, MailboxResponse::Welcome { .. }));
    let (held, _) = read_channel(&on_origin, group, 0, 0).await;
    assert!(!held.is_empty());
    assert_eq!(first, held, "what was posted before the mirror started, as the channel's relay holds it");
    assert_eq!(meshgram_tests::relay_metric(&mesh.relays[mirror], "meshgram_relay_groups_mirrored"), Some(1));

    // A new post reaches the parked reader through the mirror.
    let parked = read_until(&raw, group, from, 1);
    let ((live, from), _) = tokio::join!(parked, async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        meshgram(&admin, &["channel", "post", &channel, "live"]).ok_json();
    });
    assert_eq!(live.len(), 1);

    // The mirror's origin dies: it reads the next of the channel's relays from its start, and
    // its reader gets each new post once (the older ones are deduplicated by id).
    mesh.relays[origin].kill9();
    meshgram(&admin, &["channel", "post", &channel, "after the kill"]).ok_json();
    let (after, from) = read_until(&raw, group, from, 1).await;
    assert_eq!(after.len(), 1, "one new post, not the old ones again");
    assert!(!first.contains(&after[0]) && !live.contains(&after[0]));
    let (nothing, _) = read_channel(&raw, group, from, 0).await;
    assert!(nothing.is_empty(), "nothing more: {nothing:?}");
    assert!(meshgram_tests::relay_metric(&mesh.relays[mirror], "meshgram_relay_mirror_reads_failed").unwrap() >= 1);

    // The mirror holds ciphertext only, as the channel's relays do.
    assert!(mesh.relay_files_containing(b"after the kill").is_empty());
}
