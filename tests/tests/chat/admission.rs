//! Relays admit only relays the gateway certified: a peer without a relay certificate may not
//! store or delete replicas and is given none, and a relay without one does not start. Even a
//! certified relay deletes only what the recipient's signed acknowledgement names.

use std::time::Duration;

use futures::StreamExt;
use libp2p::identity::ed25519;
use libp2p::kad::{self, KBucketKey, store::MemoryStore};
use libp2p::swarm::NetworkBehaviour;
use libp2p::{PeerId, StreamProtocol, identify};
use meshgram_node::crypto::cert::{Cert, RelayCert, RelayCertBody, unix_now};
use meshgram_node::ids::UserId;
use meshgram_node::net::pipe::{self, PipePool};
use meshgram_node::proto::envelope::{Envelope, EnvelopeId};
use meshgram_node::proto::{ErrorCode, REPLICA_LIMITS, REPLICA_PROTOCOL, ReplicaRequest, ReplicaResponse, SignedAck};
use meshgram_tests::{
    Gateway, Mesh, RELAY_BIN, bin_path, meshgram, meshgram_stdin, relay_metric, run, texts, u64_field,
};

use super::{ALICE, BOB};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_certified_relays_may_store_or_delete_replicas() {
    let gateway_key = ed25519::Keypair::generate();
    let mesh = Mesh::start_with_key(Gateway::start(), &gateway_key, 1, 1);
    let relay: PeerId = mesh.relays[0].peer_id().parse().unwrap();

    // A bare libp2p node calling the relay on the replica protocol, as another relay would.
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let me = keypair.public().to_peer_id();
    let mut swarm = meshgram_node::net::transport::build_swarm(keypair.clone(), Duration::from_secs(60), |_| {
        libp2p_stream::Behaviour::new()
    })
    .unwrap();
    let pipes: PipePool<ReplicaRequest, ReplicaResponse> =
        PipePool::new(REPLICA_PROTOCOL, REPLICA_LIMITS, Duration::from_secs(10), swarm.behaviour().new_control());
    swarm.dial(mesh.relays[0].tcp_addr().parse::<libp2p::Multiaddr>().unwrap()).unwrap();
    tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    let call = |request: ReplicaRequest| {
        let pipes = &pipes;
        async move {
            for _ in 0..100 {
                match pipes.call(relay, &request, async { Ok(()) }).await {
                    Ok(response) => return response,
                    // Not connected yet.
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            panic!("the relay never answered");
        }
    };
    let refused = |response: ReplicaResponse| match response {
        ReplicaResponse::Error(e) => e.code,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let bob_keys = libp2p::identity::Keypair::generate_ed25519();
    let bob = bob_keys.public().to_peer_id();
    let envelope = Envelope {
        id: EnvelopeId::random(),
        from_user: UserId(1),
        from_device: me,
        to_user: UserId(2),
        to_device: bob,
        sent_at_ms: 0,
        seq: 0,
        sealed: vec![1; 100],
    };
    let store = ReplicaRequest::Store { envelopes: vec![envelope.clone()] };
    let delete = ReplicaRequest::Delete { mailbox: bob, ids: vec![envelope.id] };

    // No Hello: refused.
    assert_eq!(refused(call(store.clone()).await), ErrorCode::CertInvalid);
    assert_eq!(refused(call(delete.clone()).await), ErrorCode::CertInvalid);
    // Forged, someone else's, expired: each refused, and Store still is.
    let now = unix_now();
    let hello = |cert: RelayCert| ReplicaRequest::Hello { cert };
    let forged = RelayCert::issue(&ed25519::Keypair::generate(), me, 1, now);
    let someone_elses = RelayCert::issue(&gateway_key, PeerId::random(), 1, now);
    let expired = Cert::sign(RelayCertBody { relay: me, not_before: now - 7200, not_after: now - 3600 }, &gateway_key);
    for cert in [forged, someone_elses, expired] {
        assert_eq!(refused(call(hello(cert)).await), ErrorCode::CertInvalid);
    }
    assert_eq!(refused(call(store.clone()).await), ErrorCode::CertInvalid);

    // A valid certificate: Welcome with the relay's own, which checks out; then it serves.
    match call(hello(RelayCert::issue(&gateway_key, me, 1, now))).await {
        ReplicaResponse::Welcome { cert } => {
            assert_eq!(cert.verify_for(&gateway_key.public(), &relay, now).unwrap().relay, relay);
        }
        other => panic!("expected Welcome, got {other:?}"),
    }
    assert!(matches!(call(store).await, ReplicaResponse::Stored { duplicates } if duplicates.is_empty()));

    // Even a certified relay deletes nothing on its own word: a delete needs the recipient's
    // signed acknowledgement, and one signed by anyone else is refused.
    assert_eq!(refused(call(delete).await), ErrorCode::Forbidden);
    let forged = SignedAck { mailbox: bob, ..SignedAck::sign(&keypair, vec![envelope.id]) };
    assert_eq!(refused(call(ReplicaRequest::DeleteAcked { acks: vec![forged] }).await), ErrorCode::Forbidden);
    let mut tampered = SignedAck::sign(&bob_keys, vec![EnvelopeId::random()]);
    tampered.ids = vec![envelope.id];
    assert_eq!(refused(call(ReplicaRequest::DeleteAcked { acks: vec![tampered] }).await), ErrorCode::Forbidden);
    // Bob's own acknowledgement: the envelope was still there, and now it is not.
    let bobs_ack = SignedAck::sign(&bob_keys, vec![envelope.id]);
    let acked = ReplicaRequest::DeleteAcked { acks: vec![bobs_ack.clone()] };
    assert!(matches!(call(acked.clone()).await, ReplicaResponse::Deleted { count: 1 }));
    assert!(matches!(call(acked).await, ReplicaResponse::Deleted { count: 0 }));

    // Repair asks what the relay delivered: it answers with Bob's acknowledgement as proof, which
    // the asking relay checks before it drops its own copy (a relay's bare word drops nothing).
    let never_seen = EnvelopeId::random();
    match call(ReplicaRequest::ReconcileProven { mailbox: bob, held: vec![envelope.id, never_seen] }).await {
        ReplicaResponse::ReconciledProven { wanted, proofs } => {
            assert_eq!(wanted, [never_seen]);
            assert_eq!(proofs, [bobs_ack]);
        }
        other => panic!("expected ReconciledProven, got {other:?}"),
    }
}

#[test]
fn a_relay_without_a_valid_certificate_does_not_start_and_says_how_to_get_one() {
    let gateway = Gateway::start();
    let key = gateway.server.ready["public_key"].as_str().unwrap().to_string();
    let data = gateway.tmp().join("uncertified-relay");
    let data = data.display().to_string();
    let args = ["--data", &data, "--gateway-key", &key, "--listen", "/ip4/127.0.0.1/tcp/0", "--http", "127.0.0.1:0"];
    let refused = run(&bin_path(RELAY_BIN), &args, None);
    let error = refused.stderr;
    assert!(!refused.status.success());
    assert!(error.contains("has no valid certificate from the gateway"), "{error}");
    assert!(error.contains("relay-cert --relay 12D3KooW"), "names the command and its peer id: {error}");

    // A certificate signed by another gateway is refused as well.
    RelayCert::admit(&ed25519::Keypair::generate(), std::path::Path::new(&data), 1, unix_now()).unwrap();
    let refused = run(&bin_path(RELAY_BIN), &args, None);
    assert!(!refused.status.success());
    assert!(refused.stderr.contains("signature is not the gateway's"), "{}", refused.stderr);
}

/// A peer posing as a relay: Kademlia in server mode, identify, and the replica protocol, but
/// no certificate from this network's gateway.
#[derive(NetworkBehaviour)]
struct Rogue {
    identify: identify::Behaviour,
    kad: kad::Behaviour<MemoryStore>,
    stream: libp2p_stream::Behaviour,
}

#[test]
fn a_peer_posing_as_a_relay_without_a_certificate_is_given_nothing() {
    let mesh = Mesh::start(2, 2);
    let (alice, bob) = (mesh.new_profile("alice"), mesh.new_profile("bob"));
    mesh.login(&alice, ALICE);
    mesh.login(&bob, BOB);
    let bob_device: PeerId = meshgram(&bob, &["whoami"]).ok_json()["device"].as_str().unwrap().parse().unwrap();

    // The rogue is closer to Bob's mailbox than either relay: placement by distance alone
    // would hand it a copy of everything Bob is sent.
    let distance = |peer: &PeerId| KBucketKey::from(bob_device).distance(&KBucketKey::from(*peer));
    let relays: Vec<PeerId> = mesh.relays.iter().map(|r| r.peer_id().parse().unwrap()).collect();
    let nearest_relay = relays.iter().map(distance).min().unwrap();
    let keypair = loop {
        let keypair = libp2p::identity::Keypair::generate_ed25519();
        if distance(&keypair.public().to_peer_id()) < nearest_relay {
            break keypair;
        }
    };
    let me = keypair.public().to_peer_id();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (hellos, stores) = (
        std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
    );
    let relay_addrs: Vec<(PeerId, libp2p::Multiaddr)> =
        mesh.relays.iter().map(|r| (r.peer_id().parse().unwrap(), r.tcp_addr().parse().unwrap())).collect();
    let (seen_hellos, seen_stores) = (hellos.clone(), stores.clone());
    runtime.spawn(async move {
        let mut swarm = meshgram_node::net::transport::build_swarm(keypair, Duration::from_secs(60), |key| Rogue {
            identify: identify::Behaviour::new(meshgram_node::net::behaviour::identify_config(key, "rogue/0")),
            kad: meshgram_node::net::behaviour::relay_kad(me),
            stream: libp2p_stream::Behaviour::new(),
        })
        .unwrap();
        swarm.listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap()).unwrap();
        let mut incoming =
            swarm.behaviour().stream.new_control().accept(StreamProtocol::new(REPLICA_PROTOCOL)).unwrap();
        let (requests_tx, mut requests) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            // A pipe is served while its tasks are kept.
            let mut served = Vec::new();
            let serving = pipe::Serving::new(REPLICA_LIMITS);
            while let Some((peer, stream)) = incoming.next().await {
                served.push(pipe::serve(peer, stream, &serving, &Default::default(), requests_tx.clone()));
            }
        });
        // It says it is a relay, with a certificate from a gateway of its own making, and
        // acknowledges whatever it is given.
        let forged = RelayCert::issue(&ed25519::Keypair::generate(), me, 1, unix_now());
        tokio::spawn(async move {
            while let Some(inbound) = requests.recv().await {
                let inbound: pipe::Inbound<ReplicaRequest, ReplicaResponse> = inbound;
                let response = match inbound.request {
                    Ok(ReplicaRequest::Hello { .. }) => {
                        seen_hellos.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        ReplicaResponse::Welcome { cert: forged.clone() }
                    }
                    Ok(ReplicaRequest::Store { envelopes }) => {
                        seen_stores.fetch_add(envelopes.len(), std::sync::atomic::Ordering::SeqCst);
                        ReplicaResponse::Stored { duplicates: Vec::new() }
                    }
                    _ => ReplicaResponse::Deleted { count: 0 },
                };
                inbound.responder.respond(response);
            }
        });
        for (peer, addr) in relay_addrs {
            swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
            swarm.dial(addr).unwrap();
        }
        let _ = swarm.behaviour_mut().kad.bootstrap();
        loop {
            swarm.select_next_some().await;
        }
    });
    // Both relays meet the rogue and check its certificate (bounded wait).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while hellos.load(std::sync::atomic::Ordering::SeqCst) < relays.len() {
        assert!(std::time::Instant::now() < deadline, "the relays never greeted the rogue");
        std::thread::sleep(Duration::from_millis(50));
    }

    let expected: Vec<String> = (0..50).map(|i| format!("for bob {i:02}")).collect();
    let sent = meshgram_stdin(&alice, &["send", BOB, "--lines"], &expected.join("\n")).ok_json();
    assert_eq!(u64_field(&sent, "sent"), 50);
    assert_eq!(texts(&meshgram(&bob, &["messages"]).ok_json()), expected, "all delivered, by the real relays");
    assert_eq!(stores.load(std::sync::atomic::Ordering::SeqCst), 0, "the rogue was given no copy");
    // Nor a place in the routing table, where other relays' lookups would find it: each relay's
    // holds the other relay alone (the gauge is set every 2 s).
    std::thread::sleep(Duration::from_millis(2500));
    for relay in &mesh.relays {
        assert_eq!(relay_metric(relay, "meshgram_relay_routing_table_peers"), Some(1), "the rogue is not routed");
    }
    drop(runtime);
}
