//! A raw client for tests of bad input: a device that speaks the mailbox and media protocols to
//! one relay, with certificates the test signs (the relays trust a gateway key the test holds),
//! or the auth protocol to a gateway.

use libp2p::PeerId;
use libp2p::identity::ed25519;
use meshgram_node::client::net::ClientNet;
use meshgram_node::crypto::cert::{AccountKind, CertBody, SessionCert};
use meshgram_node::crypto::identity::{DeviceIdentity, DeviceKeys};
use meshgram_node::ids::{SessionId, UserId};
use meshgram_node::proto::envelope::{Envelope, EnvelopeId};
use meshgram_node::proto::media::{MediaRequest, MediaResponse};
use meshgram_node::proto::{AuthRequest, AuthResponse, MailboxRequest, MailboxResponse, RelayInfo};

/// A server's peer id and address, from a multiaddr ending in `/p2p/<id>`.
fn server_info(addr: &str) -> RelayInfo {
    let mut multiaddr: libp2p::Multiaddr = addr.parse().expect("a server multiaddr");
    let Some(libp2p::multiaddr::Protocol::P2p(peer_id)) = multiaddr.pop() else { panic!("no /p2p in {addr}") };
    RelayInfo { peer_id, addrs: vec![multiaddr] }
}

/// A client that speaks the mailbox protocol with certificates the test signs.
#[allow(missing_debug_implementations)] // a handle to a network task; nothing to show
pub struct RawClient {
    identity: DeviceIdentity,
    net: ClientNet,
    relay: RelayInfo,
    /// Where its device keys are (its own temp dir, or a profile's).
    keys: std::path::PathBuf,
    _dir: Option<std::sync::Arc<tempfile::TempDir>>,
}

impl RawClient {
    /// A fresh device talking to the relay at `relay` (a multiaddr ending in `/p2p/<id>`).
    pub fn new(relay: &str) -> Self {
        let dir = std::sync::Arc::new(tempfile::tempdir().expect("a temp dir"));
        Self::with_keys(relay, dir.path().to_path_buf(), Some(dir))
    }

    /// A profile's own device (its keys read from the profile), e.g. to capture or replay
    /// what that device's client would send or fetch.
    pub fn of_profile(relay: &str, profile: &std::path::Path) -> Self {
        Self::with_keys(relay, profile.to_path_buf(), None)
    }

    /// The same device talking to another server, over its own connections: two gateways of
    /// one network share a peer id, so one network task would take them for one.
    pub fn same_device_at(&self, server: &str) -> Self {
        Self::with_keys(server, self.keys.clone(), self._dir.clone())
    }

    fn with_keys(server: &str, keys: std::path::PathBuf, dir: Option<std::sync::Arc<tempfile::TempDir>>) -> Self {
        let identity = DeviceIdentity::load_or_create(&keys).expect("device keys");
        let net = ClientNet::spawn(&identity).expect("the network task");
        RawClient { identity, net, relay: server_info(server), keys, _dir: dir }
    }

    /// Sends an auth request to its server, a gateway.
    pub async fn auth(&self, request: AuthRequest) -> AuthResponse {
        self.net.auth_request(self.relay.peer_id, self.relay.addrs.clone(), request).await.expect("the gateway answers")
    }

    /// Its device's keys, as a sign-in sends them.
    pub fn device_keys(&self) -> DeviceKeys {
        self.identity.device_keys()
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

/// A bare libp2p peer that writes pipe frames by hand (see `meshgram_node::net::pipe`): what a
/// hostile client can send, byte for byte, including what no honest client would.
#[allow(missing_debug_implementations)] // a handle to a swarm task; nothing to show
pub struct RawPeer {
    keypair: libp2p::identity::Keypair,
    control: libp2p_stream::Control,
    relay: PeerId,
    swarm: tokio::task::JoinHandle<()>,
}

impl Drop for RawPeer {
    fn drop(&mut self) {
        self.swarm.abort();
    }
}

impl RawPeer {
    /// A new peer dialling the relay at `relay` (a multiaddr ending in `/p2p/<id>`).
    pub fn connect(relay: &str) -> Self {
        use futures::StreamExt;
        let keypair = libp2p::identity::Keypair::generate_ed25519();
        let mut swarm =
            meshgram_node::net::transport::build_swarm(keypair.clone(), std::time::Duration::from_secs(60), |_| {
                libp2p_stream::Behaviour::new()
            })
            .expect("a swarm");
        let control = swarm.behaviour().new_control();
        let mut addr: libp2p::Multiaddr = relay.parse().expect("a relay multiaddr");
        swarm.dial(addr.clone()).expect("dial the relay");
        let Some(libp2p::multiaddr::Protocol::P2p(relay)) = addr.pop() else { panic!("no /p2p in {relay}") };
        let swarm = tokio::spawn(async move {
            loop {
                swarm.select_next_some().await;
            }
        });
        RawPeer { keypair, control, relay, swarm }
    }

    pub fn peer_id(&self) -> PeerId {
        self.keypair.public().to_peer_id()
    }

    /// A session certificate for this peer as user `user`, signed by `signer`.
    pub fn cert(&self, signer: &ed25519::Keypair, user: u64) -> SessionCert {
        let now = meshgram_node::crypto::cert::unix_now();
        let body = CertBody {
            user_id: UserId(user),
            device: self.peer_id(),
            noise_key: meshgram_node::ids::NoiseKey([7; 32]),
            session_id: SessionId(user),
            kind: AccountKind::User,
            not_before: now - 60,
            not_after: now + 3600,
        };
        SessionCert::sign(body, signer)
    }

    /// An envelope of `len` sealed bytes from this peer (as `user`) to `to`.
    pub fn envelope(&self, user: u64, to: PeerId, len: usize) -> Envelope {
        Envelope {
            id: EnvelopeId::random(),
            from_user: UserId(user),
            from_device: self.peer_id(),
            to_user: UserId(user),
            to_device: to,
            sent_at_ms: 0,
            seq: 0,
            sealed: vec![0x5a; len],
        }
    }

    /// A new stream of `protocol` to the relay, once connected.
    pub async fn open(&self, protocol: &'static str) -> libp2p::Stream {
        for _ in 0..200 {
            match self.control.clone().open_stream(self.relay, libp2p::StreamProtocol::new(protocol)).await {
                Ok(stream) => return stream,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
        panic!("no {protocol} stream to the relay within 10 s");
    }
}

/// A pipe frame: its length, its tag, and `message` (postcard).
pub fn frame<M: serde::Serialize>(tag: u64, message: &M) -> Vec<u8> {
    let body = postcard::to_allocvec(message).expect("encodes");
    frame_header(tag, body.len()).into_iter().chain(body).collect()
}

/// A frame's header announcing a message of `len` bytes (whether or not they follow).
pub fn frame_header(tag: u64, len: usize) -> Vec<u8> {
    let len = u32::try_from(len + 8).expect("a frame length");
    len.to_be_bytes().into_iter().chain(tag.to_be_bytes()).collect()
}

/// Reads one answer frame: its tag and message, or `None` once the stream has ended.
pub async fn read_answer<M: serde::de::DeserializeOwned>(stream: &mut libp2p::Stream) -> Option<(u64, M)> {
    use futures::AsyncReadExt;
    let mut header = [0u8; 12];
    stream.read_exact(&mut header).await.ok()?;
    let len = u32::from_be_bytes(header[..4].try_into().ok()?) as usize - 8;
    let tag = u64::from_be_bytes(header[4..].try_into().ok()?);
    let mut body = vec![0; len];
    stream.read_exact(&mut body).await.ok()?;
    Some((tag, postcard::from_bytes(&body).expect("an answer decodes")))
}
