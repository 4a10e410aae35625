//! A raw client for tests of bad input: a device that speaks the mailbox and media protocols to
//! one relay, with certificates the test signs (the relays trust a gateway key the test holds).

use libp2p::PeerId;
use libp2p::identity::ed25519;
use meshgram_node::client::net::ClientNet;
use meshgram_node::crypto::cert::{AccountKind, CertBody, SessionCert};
use meshgram_node::crypto::identity::DeviceIdentity;
use meshgram_node::ids::{SessionId, UserId};
use meshgram_node::proto::envelope::{Envelope, EnvelopeId};
use meshgram_node::proto::media::{MediaRequest, MediaResponse};
use meshgram_node::proto::{MailboxRequest, MailboxResponse, RelayInfo};

/// A client that speaks the mailbox protocol with certificates the test signs.
#[allow(missing_debug_implementations)] // a handle to a network task; nothing to show
pub struct RawClient {
    identity: DeviceIdentity,
    net: ClientNet,
    relay: RelayInfo,
    _dir: Option<tempfile::TempDir>,
}

impl RawClient {
    /// A fresh device talking to the relay at `relay` (a multiaddr ending in `/p2p/<id>`).
    pub fn new(relay: &str) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        let identity = DeviceIdentity::load_or_create(dir.path()).expect("device keys");
        Self::with_identity(relay, identity, Some(dir))
    }

    /// A profile's own device (its keys read from the profile), e.g. to capture or replay
    /// what that device's client would send or fetch.
    pub fn of_profile(relay: &str, profile: &std::path::Path) -> Self {
        let identity = DeviceIdentity::load_or_create(profile).expect("the profile's device keys");
        Self::with_identity(relay, identity, None)
    }

    fn with_identity(relay: &str, identity: DeviceIdentity, dir: Option<tempfile::TempDir>) -> Self {
        let net = ClientNet::spawn(&identity).expect("the network task");
        let mut addr: libp2p::Multiaddr = relay.parse().expect("a relay multiaddr");
        let Some(libp2p::multiaddr::Protocol::P2p(peer_id)) = addr.pop() else { panic!("no /p2p in {relay}") };
        RawClient { identity, net, relay: RelayInfo { peer_id, addrs: vec![addr] }, _dir: dir }
    }

    /// Its device: the mailbox its fetches read.
    pub fn device(&self) -> PeerId {
        self.identity.peer_id()
    }

    pub async fn call(&self, request: MailboxRequest) -> MailboxResponse {
        self.net
            .mailbox_request(self.relay.peer_id, self.relay.addrs.clone(), request)
            .await
            .expect("the relay answers")
    }

    pub async fn media_call(&self, request: MediaRequest) -> MediaResponse {
        self.net.media_request(self.relay.peer_id, self.relay.addrs.clone(), &request).await.expect("the relay answers")
    }

    pub fn cert(&self, signer: &ed25519::Keypair, user: u64, not_before: u64, not_after: u64) -> SessionCert {
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

    pub fn envelope(&self, user: u64, to: PeerId, len: usize) -> Envelope {
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
