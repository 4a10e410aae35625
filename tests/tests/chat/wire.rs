//! Bad input straight at a real relay, from a raw client whose certificates the test signs:
//! the relays are started trusting a gateway key the test holds.

use libp2p::PeerId;
use libp2p::identity::ed25519;
use meshgram_node::cert::{AccountKind, CertBody, SessionCert, unix_now};
use meshgram_node::envelope::{Envelope, EnvelopeId};
use meshgram_node::identity::DeviceIdentity;
use meshgram_node::ids::{SessionId, UserId, hex};
use meshgram_node::net::ClientNet;
use meshgram_node::protocol::{ErrorCode, MAX_ENVELOPE_SIZE, MailboxRequest, MailboxResponse, RelayInfo};
use meshgram_tests::{Gateway, Mesh};

struct RawClient {
    identity: DeviceIdentity,
    net: ClientNet,
    relay: RelayInfo,
    _dir: tempfile::TempDir,
}

impl RawClient {
    fn new(relay: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let identity = DeviceIdentity::load_or_create(dir.path()).unwrap();
        let net = ClientNet::spawn(&identity).unwrap();
        let mut addr: libp2p::Multiaddr = relay.parse().unwrap();
        let Some(libp2p::multiaddr::Protocol::P2p(peer_id)) = addr.pop() else { panic!("no /p2p in {relay}") };
        RawClient { identity, net, relay: RelayInfo { peer_id, addrs: vec![addr] }, _dir: dir }
    }

    async fn call(&self, request: MailboxRequest) -> MailboxResponse {
        self.net.mailbox_request(self.relay.peer_id, self.relay.addrs.clone(), request).await.unwrap()
    }

    fn cert(&self, signer: &ed25519::Keypair, user: u64, not_before: u64, not_after: u64) -> SessionCert {
        let body = CertBody {
            user_id: UserId(user),
            device: self.identity.peer_id(),
            noise_key: self.identity.noise_public,
            session_id: SessionId(user),
            kind: AccountKind::User,
            not_before,
            not_after,
        };
        SessionCert::sign(body, signer)
    }

    fn envelope(&self, user: u64, to: PeerId, len: usize) -> Envelope {
        Envelope {
            id: EnvelopeId::random(),
            from_user: UserId(user),
            from_device: self.identity.peer_id(),
            to_user: UserId(2),
            to_device: to,
            sent_at_ms: 0,
            seq: 0,
            sealed: vec![0xab; len],
        }
    }
}

fn refused(response: &MailboxResponse) -> ErrorCode {
    match response {
        MailboxResponse::Error(e) => e.code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_refuse_bad_certificates_spoofed_senders_oversized_and_replayed_envelopes() {
    let gateway_key = ed25519::Keypair::generate();
    let mesh = Mesh::start_with_key(Gateway::start(), &hex(&gateway_key.public().to_bytes()), 2, 2);
    let relay = mesh.relays[0].tcp_addr();
    let now = unix_now();
    let mallory = RawClient::new(&relay);
    let bob = PeerId::random();

    // Nothing before Hello.
    let send = |_: &RawClient, e: Envelope| MailboxRequest::Send { envelopes: vec![e] };
    assert_eq!(refused(&mallory.call(send(&mallory, mallory.envelope(1, bob, 10))).await), ErrorCode::CertInvalid);

    // Forged (other signer), expired, not yet valid, and someone else's certificate.
    let forger = ed25519::Keypair::generate();
    for cert in [
        mallory.cert(&forger, 1, now, now + 3600),
        mallory.cert(&gateway_key, 1, now - 7200, now - 3600),
        mallory.cert(&gateway_key, 1, now + 3600, now + 7200),
        RawClient::new(&relay).cert(&gateway_key, 1, now, now + 3600),
    ] {
        assert_eq!(refused(&mallory.call(MailboxRequest::Hello { cert }).await), ErrorCode::CertInvalid);
    }

    // A valid certificate: welcome.
    let cert = mallory.cert(&gateway_key, 1, now, now + 3600);
    assert!(matches!(mallory.call(MailboxRequest::Hello { cert }).await, MailboxResponse::Welcome { .. }));

    // Spoofed sender account, spoofed device, empty and oversized envelopes.
    assert_eq!(refused(&mallory.call(send(&mallory, mallory.envelope(99, bob, 10))).await), ErrorCode::SenderMismatch);
    let mut spoofed = mallory.envelope(1, bob, 10);
    spoofed.from_device = PeerId::random();
    assert_eq!(refused(&mallory.call(send(&mallory, spoofed)).await), ErrorCode::SenderMismatch);
    assert_eq!(refused(&mallory.call(send(&mallory, mallory.envelope(1, bob, 0))).await), ErrorCode::BadRequest);
    let huge = mallory.envelope(1, bob, MAX_ENVELOPE_SIZE);
    assert_eq!(refused(&mallory.call(send(&mallory, huge)).await), ErrorCode::BadRequest);
    assert_eq!(refused(&mallory.call(MailboxRequest::Send { envelopes: vec![] }).await), ErrorCode::BadRequest);

    // A good envelope is stored; the same one again is reported as a duplicate, not stored twice.
    let good = mallory.envelope(1, bob, 100);
    match mallory.call(send(&mallory, good.clone())).await {
        MailboxResponse::Stored { stored, duplicates } => assert_eq!((stored, duplicates), (vec![good.id], vec![])),
        other => panic!("expected Stored, got {other:?}"),
    }
    match mallory.call(send(&mallory, good.clone())).await {
        MailboxResponse::Stored { stored, duplicates } => assert_eq!((stored, duplicates), (vec![], vec![good.id])),
        other => panic!("expected Stored with a duplicate, got {other:?}"),
    }

    // Mallory's own mailbox is empty: she cannot read or acknowledge Bob's.
    match mallory.call(MailboxRequest::Fetch { max: 10, wait_ms: 0, ack: vec![] }).await {
        MailboxResponse::Envelopes { envelopes, .. } => assert!(envelopes.is_empty()),
        other => panic!("expected Envelopes, got {other:?}"),
    }
    assert!(matches!(
        mallory.call(MailboxRequest::Ack { ids: vec![good.id] }).await,
        MailboxResponse::Acked { count: 0 }
    ));

    // The relay still serves an honest client, on the same relay.
    let honest = RawClient::new(&relay);
    let cert = honest.cert(&gateway_key, 2, now, now + 3600);
    assert!(matches!(honest.call(MailboxRequest::Hello { cert }).await, MailboxResponse::Welcome { .. }));
    let to_mallory = honest.envelope(2, mallory.identity.peer_id(), 50);
    assert!(matches!(honest.call(send(&honest, to_mallory.clone())).await, MailboxResponse::Stored { .. }));
    // And the long-poll hands it over.
    match mallory.call(MailboxRequest::Fetch { max: 10, wait_ms: 5_000, ack: vec![] }).await {
        MailboxResponse::Envelopes { envelopes, .. } => assert_eq!(envelopes, vec![to_mallory]),
        other => panic!("expected Envelopes, got {other:?}"),
    }
}
