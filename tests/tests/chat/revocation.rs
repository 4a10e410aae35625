//! Revocation in seconds: relays ask the gateway for revocations every 2 s, so a revoked
//! session loses its relay access, and a revoked relay its copies and replica access, long
//! before any certificate expires; and a gateway that is away stops none of that from
//! catching up when it is back.
//!
//! The devices under test talk to the relays as raw mailbox clients, with the identity and
//! certificate their profile signed in with, so that each refusal is seen as the relay sends it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::multiaddr::Protocol;
use meshgram_node::client::net::ClientNet;
use meshgram_node::client::session::SavedSession;
use meshgram_node::crypto::cert::SessionCert;
use meshgram_node::crypto::identity::DeviceIdentity;
use meshgram_node::proto::envelope::{Envelope, EnvelopeId};
use meshgram_node::proto::{ErrorCode, MailboxRequest, MailboxResponse, RelayInfo};
use meshgram_tests::{Mesh, Server, meshgram, relay_metric};

use super::{ALICE, BOB};

/// Revocations must take effect within this long (the relays poll every 2 s).
const REVOCATION_BOUND: Duration = Duration::from_secs(10);

/// A signed-in profile's device, speaking the mailbox protocol itself. The profile must not run
/// commands meanwhile (it would be the same peer twice).
struct Device {
    identity: DeviceIdentity,
    cert: SessionCert,
    net: Arc<ClientNet>,
}

impl Device {
    fn of(profile: &Path) -> Self {
        let identity = DeviceIdentity::load_or_create(profile).unwrap();
        let cert = SavedSession::load(profile).unwrap().expect("the profile signed in").cert;
        let net = Arc::new(ClientNet::spawn(&identity).unwrap());
        Device { identity, cert, net }
    }

    fn peer_id(&self) -> PeerId {
        self.identity.peer_id()
    }

    async fn call(&self, relay: &RelayInfo, request: MailboxRequest) -> MailboxResponse {
        self.net.mailbox_request(relay.peer_id, relay.addrs.clone(), request).await.unwrap()
    }

    async fn hello(&self, relay: &RelayInfo) -> MailboxResponse {
        self.call(relay, MailboxRequest::Hello { cert: self.cert.clone() }).await
    }

    async fn fetch(&self, relay: &RelayInfo, wait_ms: u32) -> MailboxResponse {
        self.call(relay, MailboxRequest::Fetch { max: 1000, wait_ms, ack: Vec::new() }).await
    }

    /// Envelopes (opaque to relays) from this device to `to`.
    fn envelopes(&self, to: &Device, n: usize) -> Vec<Envelope> {
        (0..n)
            .map(|seq| Envelope {
                id: EnvelopeId::random(),
                from_user: self.cert.body.user_id,
                from_device: self.peer_id(),
                to_user: to.cert.body.user_id,
                to_device: to.peer_id(),
                sent_at_ms: 0,
                seq: seq as u64,
                sealed: vec![0xab; 64],
            })
            .collect()
    }
}

/// Sends `n` envelopes from `from` to `to` through `relay`: their ids, and the relay's answer.
async fn send(from: &Device, to: &Device, relay: &RelayInfo, n: usize) -> (HashSet<EnvelopeId>, MailboxResponse) {
    let envelopes = from.envelopes(to, n);
    let ids = envelopes.iter().map(|e| e.id).collect();
    (ids, from.call(relay, MailboxRequest::Send { envelopes }).await)
}

fn relay_info(server: &Server) -> RelayInfo {
    let mut addr: libp2p::Multiaddr = server.tcp_addr().parse().unwrap();
    let Some(Protocol::P2p(peer_id)) = addr.pop() else { panic!("no /p2p in {addr}") };
    RelayInfo { peer_id, addrs: vec![addr] }
}

fn refusal(response: &MailboxResponse) -> Option<ErrorCode> {
    match response {
        MailboxResponse::Error(e) => Some(e.code),
        _ => None,
    }
}

fn welcomed(response: &MailboxResponse) -> bool {
    matches!(response, MailboxResponse::Welcome { .. })
}

/// The ids a fetch returned (panics on a refusal).
fn fetched_ids(response: MailboxResponse) -> HashSet<EnvelopeId> {
    match response {
        MailboxResponse::Envelopes { envelopes, .. } => envelopes.into_iter().map(|e| e.id).collect(),
        other => panic!("expected envelopes, got {other:?}"),
    }
}

/// A relay metric's value (0 when not reported yet).
fn metric(relay: &Server, name: &str) -> u64 {
    relay_metric(relay, name).unwrap_or(0)
}

/// Two relays; Alice signed in on a phone and a laptop, Bob on one device: the mesh, the
/// laptop's profile, the phone's and Bob's devices, and the relays.
fn alice_on_two_devices_and_bob() -> (Mesh, PathBuf, Device, Device, Vec<RelayInfo>) {
    let mesh = Mesh::start(2, 2);
    let (phone, laptop, bob) =
        (mesh.new_profile("alice-phone"), mesh.new_profile("alice-laptop"), mesh.new_profile("bob"));
    mesh.login(&phone, ALICE);
    mesh.login(&laptop, ALICE);
    mesh.login(&bob, BOB);
    let (alice, bob) = (Device::of(&phone), Device::of(&bob));
    let relays: Vec<RelayInfo> = mesh.relays.iter().map(relay_info).collect();
    (mesh, laptop, alice, bob, relays)
}

/// Revokes every other session of the account signed in on `profile` (a blocking CLI call).
async fn revoke_other_sessions(profile: &Path) {
    let profile = profile.to_path_buf();
    let revoked = tokio::task::spawn_blocking(move || meshgram(&profile, &["sessions", "revoke", "--others"]))
        .await
        .unwrap()
        .ok_json();
    assert_eq!(revoked["revoked"], 1, "{revoked}");
}

/// Asks `relay` (with no wait) until it refuses `device` with SESSION_REVOKED, bounded by
/// `deadline`; returns when it did.
async fn until_refused(device: &Device, relay: &RelayInfo, deadline: Instant) -> Instant {
    loop {
        let response = device.fetch(relay, 0).await;
        if refusal(&response) == Some(ErrorCode::SessionRevoked) {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "still served {:?} after revocation: {response:?}", REVOCATION_BOUND);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// After revocation: Send and Fetch on the live connection and a fresh Hello with the old
/// certificate are all refused, on every relay.
async fn assert_cut_off(device: &Device, to: &Device, relays: &[RelayInfo]) {
    for relay in relays {
        let send = device.call(relay, MailboxRequest::Send { envelopes: device.envelopes(to, 1) }).await;
        assert_eq!(refusal(&send), Some(ErrorCode::SessionRevoked), "{send:?}");
        assert_eq!(refusal(&device.fetch(relay, 0).await), Some(ErrorCode::SessionRevoked));
        let hello = device.hello(relay).await;
        assert_eq!(
            refusal(&hello),
            Some(ErrorCode::SessionRevoked),
            "a fresh Hello with the old certificate: {hello:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_session_loses_relay_access_within_seconds() {
    let (mesh, laptop, alice, bob, relays) = alice_on_two_devices_and_bob();

    // The phone is live on both relays, with a long-poll parked on the first, as a running
    // client is. (First it takes what waits: the laptop's request for the history.)
    for relay in &relays {
        assert!(welcomed(&alice.hello(relay).await));
        if let MailboxResponse::Envelopes { envelopes, .. } = alice.fetch(relay, 0).await {
            let ids = envelopes.iter().map(|e| e.id).collect();
            alice.call(relay, MailboxRequest::Ack { ids }).await;
        }
    }
    let parked = {
        let (net, relay) = (Arc::clone(&alice.net), relays[0].clone());
        tokio::spawn(async move {
            let fetch = MailboxRequest::Fetch { max: 10, wait_ms: 25_000, ack: Vec::new() };
            net.mailbox_request(relay.peer_id, relay.addrs, fetch).await.unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!parked.is_finished(), "the fetch is parked");

    // The laptop signs the phone out.
    let revoked_at = Instant::now();
    revoke_other_sessions(&laptop).await;
    let deadline = revoked_at + REVOCATION_BOUND;
    let answer = tokio::time::timeout_at(deadline.into(), parked).await.expect("the parked fetch is answered").unwrap();
    let parked_answered = revoked_at.elapsed();
    assert_eq!(refusal(&answer), Some(ErrorCode::SessionRevoked), "{answer:?}");
    let other_relay = until_refused(&alice, &relays[1], deadline).await - revoked_at;
    eprintln!("revocation: parked fetch refused after {parked_answered:?}, the other relay after {other_relay:?}");
    assert_cut_off(&alice, &bob, &relays).await;

    // Others are not affected.
    for relay in &relays {
        assert!(welcomed(&bob.hello(relay).await));
    }
    assert!(mesh.relays.iter().all(|r| metric(r, "meshgram_relay_sessions_revoked_total") >= 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_relay_gets_no_new_copies_and_its_replica_stores_are_refused() {
    let mesh = Mesh::start(3, 2);
    let (alice_p, bob_p) = (mesh.new_profile("alice"), mesh.new_profile("bob"));
    mesh.login(&alice_p, ALICE);
    mesh.login(&bob_p, BOB);
    // `closest` holds a copy of everything sent to Bob; revoked, it must hold none of what follows.
    let order = tokio::task::block_in_place(|| mesh.relays_by_mailbox_distance(&bob_p));
    let (alice, bob) = (Device::of(&alice_p), Device::of(&bob_p));
    let relays: Vec<RelayInfo> = mesh.relays.iter().map(relay_info).collect();
    let (closest, others) = (&relays[order[0]], [&relays[order[1]], &relays[order[2]]]);
    for relay in &relays {
        assert!(welcomed(&alice.hello(relay).await) && welcomed(&bob.hello(relay).await));
    }

    // Before: a send through another relay leaves a copy on the closest one.
    let (before, stored) = send(&alice, &bob, others[0], 5).await;
    assert!(matches!(stored, MailboxResponse::Stored { .. }), "{stored:?}");
    assert!(fetched_ids(bob.fetch(closest, 0).await).is_superset(&before), "the closest relay had a copy");

    let revoked_at = Instant::now();
    let revoked = tokio::task::block_in_place(|| {
        mesh.gateway.operator(&["relay-revoke", "--relay", &closest.peer_id.to_string(), "--json"]).ok_json()
    });
    assert_eq!(revoked["relay"], closest.peer_id.to_string());
    let deadline = revoked_at + REVOCATION_BOUND;
    for i in [order[1], order[2]] {
        while metric(&mesh.relays[i], "meshgram_relay_relays_revoked") < 1 {
            assert!(Instant::now() < deadline, "relay {i} did not learn of the revocation in {REVOCATION_BOUND:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(metric(&mesh.relays[i], "meshgram_relay_relays_verified"), 1, "only the other good relay");
    }
    eprintln!("relay revocation reached both other relays after {:?}", revoked_at.elapsed());
    // What only it and one good relay held is repaired onto the other good relay, now
    // responsible in its place (a round runs 2 s after the live relays change).
    let repair_deadline = Instant::now() + Duration::from_secs(20);
    while !fetched_ids(bob.fetch(others[1], 0).await).is_superset(&before) {
        assert!(Instant::now() < repair_deadline, "the revoked relay's copies were not repaired elsewhere");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("its copies were on two good relays again {:?} after the revocation", revoked_at.elapsed());

    // After: sends through either good relay are stored on the two good relays only.
    let mut after = HashSet::new();
    for relay in others {
        let (ids, stored) = send(&alice, &bob, relay, 20).await;
        assert!(matches!(stored, MailboxResponse::Stored { .. }), "{stored:?}");
        after.extend(ids);
    }
    let on_closest = fetched_ids(bob.fetch(closest, 0).await);
    assert!(on_closest.is_disjoint(&after), "the revoked relay got no new copy");
    for relay in others {
        assert!(fetched_ids(bob.fetch(relay, 0).await).is_superset(&after), "both good relays hold every copy");
    }
    // The good relays no longer name it to clients.
    match alice.hello(others[0]).await {
        MailboxResponse::Welcome { relays, mailbox_relays, .. } => {
            assert!(relays.iter().chain(&mailbox_relays).all(|r| r.peer_id != closest.peer_id));
        }
        other => panic!("expected Welcome, got {other:?}"),
    }
    // And it cannot place copies on them: its replica Stores are refused, so it acknowledges
    // nothing (R = 2 durable copies or none).
    let (_, through_revoked) = send(&alice, &bob, closest, 1).await;
    match through_revoked {
        MailboxResponse::Error(e) => {
            assert_eq!(e.code, ErrorCode::Unavailable, "{e}");
            assert!(e.message.contains("revoked"), "says why: {e}");
        }
        other => panic!("the revoked relay acknowledged a send: {other:?}"),
    }
    // It learns it is no longer admitted (the gateway refuses its polls) and greets no new
    // client, so clients go to the good relays.
    let deadline = Instant::now() + REVOCATION_BOUND;
    loop {
        match alice.hello(closest).await {
            MailboxResponse::Error(e) if e.code == ErrorCode::Unavailable => {
                assert!(e.message.contains("no longer admits"), "says why: {e}");
                break;
            }
            other => {
                assert!(Instant::now() < deadline, "the revoked relay still greets clients: {other:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_gateway_stopped_relays_keep_serving_and_catch_up_when_it_is_back() {
    let (mesh, laptop, alice, bob, relays) = alice_on_two_devices_and_bob();
    for relay in &relays {
        assert!(welcomed(&alice.hello(relay).await));
    }

    // Long enough for a poll to pass its deadline (5 s, checked every 2 s, after a poll sent
    // up to 2 s in), so that the relays' polls fail meanwhile.
    mesh.gateway.server.stop();
    let stopped_for = Duration::from_secs(10);
    let until = Instant::now() + stopped_for;
    while Instant::now() < until {
        for relay in &relays {
            let send = alice.call(relay, MailboxRequest::Send { envelopes: alice.envelopes(&bob, 1) }).await;
            assert!(matches!(send, MailboxResponse::Stored { .. }), "served while the gateway is away: {send:?}");
            assert!(welcomed(&alice.hello(relay).await), "a valid certificate is still taken");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    mesh.gateway.server.cont();
    for relay in &mesh.relays {
        assert!(metric(relay, "meshgram_relay_gateway_polls_failed_total") >= 1, "polls failed, and were retried");
    }

    let revoked_at = Instant::now();
    revoke_other_sessions(&laptop).await;
    let deadline = revoked_at + REVOCATION_BOUND;
    for relay in &relays {
        until_refused(&alice, relay, deadline).await;
    }
    eprintln!("after {stopped_for:?} without the gateway, a revocation applied in {:?}", revoked_at.elapsed());
    assert_cut_off(&alice, &bob, &relays).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_bot_token_cuts_the_bot_off_the_relays_within_seconds() {
    let mesh = Mesh::start(2, 2);
    let (owner_p, bot_p, bob_p) = (mesh.new_profile("owner"), mesh.new_profile("echo"), mesh.new_profile("bob"));
    mesh.login(&owner_p, ALICE);
    mesh.login(&bob_p, BOB);
    let created = meshgram(&owner_p, &["bot", "create", "--username", "echo_bot", "--name", "Echo"]).ok_json();
    let token = created["token"].as_str().unwrap().to_string();
    let bot_id = created["bot"]["user_id"].to_string();
    mesh.gateway.login_bot(&bot_p, &token).ok_json();
    let (bot, bob) = (Device::of(&bot_p), Device::of(&bob_p));
    let relays: Vec<RelayInfo> = mesh.relays.iter().map(relay_info).collect();
    for relay in &relays {
        assert!(welcomed(&bot.hello(relay).await));
        let (_, stored) = send(&bot, &bob, relay, 1).await;
        assert!(matches!(stored, MailboxResponse::Stored { .. }), "{stored:?}");
    }

    let revoked_at = Instant::now();
    let owner = owner_p.clone();
    tokio::task::spawn_blocking(move || meshgram(&owner, &["bot", "revoke-token", &bot_id]).ok_json()).await.unwrap();
    let deadline = revoked_at + REVOCATION_BOUND;
    for relay in &relays {
        until_refused(&bot, relay, deadline).await;
    }
    eprintln!("a replaced bot token cut the bot off both relays after {:?}", revoked_at.elapsed());
    assert_cut_off(&bot, &bob, &relays).await;
}

/// The relays' `envelopes_stored` gauges, summed (they are set every few seconds).
fn envelopes_stored(mesh: &Mesh) -> u64 {
    mesh.relays.iter().map(|relay| metric(relay, "meshgram_relay_envelopes_stored")).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_keep_envelopes_only_for_devices_that_exist() {
    let (mesh, laptop, alice, bob, relays) = alice_on_two_devices_and_bob();
    let relay = &relays[0];
    for device in [&alice, &bob] {
        assert!(welcomed(&device.hello(relay).await));
        if let MailboxResponse::Envelopes { envelopes, .. } = device.fetch(relay, 0).await {
            let ids = envelopes.iter().map(|e| e.id).collect();
            device.call(relay, MailboxRequest::Ack { ids }).await;
        }
    }
    // What waits already (the laptop's request for the history, say), as the gauges say.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let stored_before = envelopes_stored(&mesh);
    let to = |device: PeerId| {
        let mut envelope = alice.envelopes(&bob, 1).remove(0);
        envelope.to_device = device;
        envelope
    };

    // Made-up mailboxes are refused: the relays asked the gateway, which knows no such device.
    let made_up: Vec<Envelope> = (0..20).map(|_| to(PeerId::random())).collect();
    let sent = alice.call(relay, MailboxRequest::Send { envelopes: made_up }).await;
    assert_eq!(refusal(&sent), Some(ErrorCode::NotFound), "{sent:?}");
    // Mixed with a real one: the real one is kept, the rest dropped.
    let real = to(bob.peer_id());
    let sent = alice.call(relay, MailboxRequest::Send { envelopes: vec![to(PeerId::random()), real.clone()] }).await;
    assert!(matches!(sent, MailboxResponse::Stored { .. }), "{sent:?}");
    assert_eq!(fetched_ids(bob.fetch(relay, 0).await), HashSet::from([real.id]));
    assert!(metric(&mesh.relays[0], "meshgram_relay_mailboxes_missing_total") >= 21);
    // Bob's copy on both relays, nothing else (the gauges are set every 2 s).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(envelopes_stored(&mesh) - stored_before, 2, "only the real envelope, on R = 2 relays");

    // A device signed out is a mailbox no more, within seconds of the revocation.
    revoke_other_sessions(&laptop).await;
    let deadline = Instant::now() + REVOCATION_BOUND;
    loop {
        let sent = bob.call(relay, MailboxRequest::Send { envelopes: bob.envelopes(&alice, 1) }).await;
        if refusal(&sent) == Some(ErrorCode::NotFound) {
            break;
        }
        assert!(matches!(sent, MailboxResponse::Stored { .. }), "{sent:?}");
        assert!(Instant::now() < deadline, "a signed-out device still takes envelopes");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // With the gateway away, a new mailbox is no verdict: taken unchecked (messaging goes on).
    mesh.gateway.server.stop();
    let started = Instant::now();
    let mut envelope = bob.envelopes(&alice, 1).remove(0);
    envelope.to_device = PeerId::random();
    let sent = bob.call(relay, MailboxRequest::Send { envelopes: vec![envelope] }).await;
    assert!(matches!(sent, MailboxResponse::Stored { .. }), "taken while the gateway is away: {sent:?}");
    eprintln!("a new mailbox with the gateway stopped: stored after {:?}", started.elapsed());
    mesh.gateway.server.cont();
}
