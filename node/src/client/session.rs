//! Client logic shared by the CLI, the desktop app and the bot bridge: where the gateway is,
//! the profile's saved session, and typed calls to the gateway.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use libp2p::identity::{PublicKey, ed25519};
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

use crate::client::net::{ClientNet, NetError};
use crate::crypto::cert::{CertError, SessionCert, unix_now};
use crate::crypto::identity::{DeviceIdentity, KeyFileError, write_secret};
use crate::ids::{Phone, SessionId};
use crate::net::transport::TransportError;
use crate::proto::media::{MediaRequest, MediaResponse};
use crate::proto::{
    Account, AuthRequest, AuthResponse, BackupRecord, BotCommandInfo, ErrorCode, LookupQuery, MailboxRequest,
    MailboxResponse, RelayInfo, SessionInfo, UserCard, WireError,
};

/// File in a profile dir holding the signed-in session.
pub const SESSION_FILE: &str = "session.json";

/// Everything that can go wrong on the client side of a call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The gateway refused the request.
    #[error("{0}")]
    Gateway(#[from] WireError),
    /// The gateway could not be reached or did not answer.
    #[error("the gateway cannot be reached: {0}")]
    Net(#[from] NetError),
    /// The profile directory could not be read or written.
    #[error("profile {path}: {reason}")]
    Profile { path: PathBuf, reason: String },
    /// The device keys could not be loaded.
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    /// The swarm could not be built.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The profile has no session.
    #[error("this profile is not signed in: run `meshgram login` first")]
    NotSignedIn,
    /// An address or network file did not say where the gateway is.
    #[error("gateway address: {0}")]
    GatewayAddress(String),
    /// The gateway answered with a certificate that does not verify: a misbehaving gateway.
    #[error("the gateway's certificate does not verify: {0}")]
    BadCert(#[from] CertError),
    /// The gateway answered with a reply that does not fit the request.
    #[error("unexpected reply from the gateway to {0}")]
    UnexpectedResponse(&'static str),
}

impl ClientError {
    /// Whether the failure may pass: the gateway unreachable, busy or rate limiting.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Net(_) | ClientError::Transport(_) => true,
            ClientError::Gateway(e) => {
                matches!(e.code, ErrorCode::FloodWait | ErrorCode::Internal | ErrorCode::Unavailable)
            }
            _ => false,
        }
    }
}

/// Where the gateway is: its peer id (which is also its public key) and addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayAddr {
    pub peer_id: PeerId,
    pub addrs: Vec<Multiaddr>,
}

impl GatewayAddr {
    /// From a multiaddr ending in `/p2p/<peer id>`.
    pub fn from_multiaddr(addr: &Multiaddr) -> Result<Self, ClientError> {
        let mut addr = addr.clone();
        match addr.pop() {
            Some(Protocol::P2p(peer_id)) => Ok(GatewayAddr { peer_id, addrs: vec![addr] }),
            _ => Err(ClientError::GatewayAddress(format!(
                "{addr} does not end in /p2p/<gateway peer id>; copy the address from the gateway's ready line or network.json"
            ))),
        }
    }

    /// From the addresses of one gateway, or of several gateways of one network (they share one
    /// key, so one peer id): a client dials them all and talks to whichever answers, so one
    /// gateway down leaves the others.
    pub fn from_multiaddrs(addrs: &[Multiaddr]) -> Result<Self, ClientError> {
        let mut gateway: Option<GatewayAddr> = None;
        for addr in addrs {
            let one = Self::from_multiaddr(addr)?;
            match &mut gateway {
                None => gateway = Some(one),
                Some(known) if known.peer_id == one.peer_id => known.addrs.extend(one.addrs),
                Some(known) => {
                    return Err(ClientError::GatewayAddress(format!(
                        "{addr} is another network's gateway than {}: gateways of one network share one key",
                        known.peer_id
                    )));
                }
            }
        }
        gateway.ok_or_else(|| ClientError::GatewayAddress("no gateway address given".into()))
    }

    /// From the `gateway` entry of a `network.json` written by `meshgram up`.
    pub fn from_network_file(path: &Path) -> Result<Self, ClientError> {
        let file =
            crate::network_file::NetworkFile::load(path).map_err(|e| ClientError::GatewayAddress(e.to_string()))?;
        Ok(GatewayAddr { peer_id: file.gateway.peer_id, addrs: file.gateway.addrs })
    }

    /// The gateway's signing key: ed25519 peer ids embed their public key.
    pub fn public_key(&self) -> Result<ed25519::PublicKey, ClientError> {
        public_key_of(&self.peer_id)
            .ok_or_else(|| ClientError::GatewayAddress(format!("{} is not an ed25519 peer id", self.peer_id)))
    }
}

/// The ed25519 public key inlined in an identity-multihash peer id.
pub fn public_key_of(peer: &PeerId) -> Option<ed25519::PublicKey> {
    let hash = peer.as_ref();
    // Multihash code 0 is "identity": the digest is the protobuf-encoded public key itself.
    if hash.code() != 0 {
        return None;
    }
    PublicKey::try_decode_protobuf(hash.digest()).ok()?.try_into_ed25519().ok()
}

/// What a signed-in profile remembers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedSession {
    pub gateway: GatewayAddr,
    pub account: Account,
    pub cert: SessionCert,
    /// Relays to send through and fetch from; refreshed from each relay's Welcome.
    #[serde(default)]
    pub relays: Vec<RelayInfo>,
}

impl SavedSession {
    /// Reads the profile's session; `None` if it never signed in.
    pub fn load(profile: &Path) -> Result<Option<Self>, ClientError> {
        let path = profile.join(SESSION_FILE);
        let err = |reason: String| ClientError::Profile { path: path.clone(), reason };
        match fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(err(e.to_string())),
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| err(format!("corrupt: {e}"))),
        }
    }

    /// Writes the session (mode 0600: the certificate is a bearer credential for relays).
    pub fn save(&self, profile: &Path) -> Result<(), ClientError> {
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| ClientError::Profile { path: profile.into(), reason: e.to_string() })?;
        write_secret(&profile.join(SESSION_FILE), &json)?;
        Ok(())
    }
}

/// A device talking to its gateway. Cheap to clone: clones share one network task, which stops
/// when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Client {
    pub identity: Arc<DeviceIdentity>,
    pub gateway: GatewayAddr,
    profile: PathBuf,
    net: Arc<ClientNet>,
}

/// How many times [`Client::call`] sends a request again after its connection closed.
pub const GATEWAY_RESENDS: u32 = 2;
/// The pause before it does: a gateway's address that just went away is refused at once.
const GATEWAY_RESEND_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);

/// Turns an [`AuthResponse`] into the one variant a typed call expects, or says which call got
/// something else.
macro_rules! expect_reply {
    ($response:expr, $call:literal, $pattern:pat => $value:expr) => {
        match $response {
            $pattern => Ok($value),
            _ => Err(ClientError::UnexpectedResponse($call)),
        }
    };
}

impl Client {
    /// Opens the profile (creating its keys on first use) and starts the network task.
    pub fn open(profile: &Path, gateway: GatewayAddr) -> Result<Self, ClientError> {
        keep_private(profile)?;
        let identity = Arc::new(DeviceIdentity::load_or_create(profile)?);
        let net = Arc::new(ClientNet::spawn(&identity)?);
        Ok(Client { identity, gateway, profile: profile.to_path_buf(), net })
    }

    /// Opens a profile that has signed in, talking to the gateway it signed in with.
    pub fn open_signed_in(profile: &Path) -> Result<(Self, SavedSession), ClientError> {
        let session = SavedSession::load(profile)?.ok_or(ClientError::NotSignedIn)?;
        Ok((Client::open(profile, session.gateway.clone())?, session))
    }

    /// One request/response with the gateway; a refusal becomes `ClientError::Gateway`.
    ///
    /// A request whose connection closed under it is sent again, on a new connection (to
    /// another of the network's gateways, if one went away), at most
    /// [`GATEWAY_RESENDS`] times. It may have been served before the connection closed: a
    /// resent sign-in then finds its code used, which the user sees as such.
    pub async fn call(&self, request: AuthRequest) -> Result<AuthResponse, ClientError> {
        let mut resends = 0;
        let response = loop {
            let sent = self.net.auth_request(self.gateway.peer_id, self.gateway.addrs.clone(), request.clone()).await;
            match sent {
                Err(NetError::ConnectionClosed { .. }) if resends < GATEWAY_RESENDS => {
                    resends += 1;
                    tracing::debug!(resends, "the gateway's connection closed under a request; sending it again");
                    tokio::time::sleep(GATEWAY_RESEND_PAUSE).await;
                }
                sent => break sent?,
            }
        };
        match response {
            AuthResponse::Error(e) => Err(ClientError::Gateway(e)),
            ok => Ok(ok),
        }
    }

    /// One request/response with a relay (errors are in the response, for the caller to judge).
    pub async fn mailbox_request(
        &self,
        relay: &RelayInfo,
        request: MailboxRequest,
    ) -> Result<MailboxResponse, NetError> {
        self.net.mailbox_request(relay.peer_id, relay.addrs.clone(), request).await
    }

    /// One media request with a relay or a serving peer.
    pub async fn media_request(&self, peer: &RelayInfo, request: &MediaRequest) -> Result<MediaResponse, NetError> {
        self.net.media_request(peer.peer_id, peer.addrs.clone(), request).await
    }

    /// Listens on `addr` for peers (a node serving chunks); returns the bound address.
    pub async fn listen(&self, addr: Multiaddr) -> Result<Multiaddr, NetError> {
        self.net.listen(addr).await
    }

    /// Peers' media pipes to this device.
    pub fn accept_media(&self) -> Result<libp2p_stream::IncomingStreams, NetError> {
        self.net.accept_media()
    }

    /// The profile directory.
    pub fn profile(&self) -> &Path {
        &self.profile
    }

    /// Checks a certificate the gateway issued to this device, then saves the session.
    pub fn accept_session(
        &self,
        account: Account,
        cert: SessionCert,
        relays: Vec<RelayInfo>,
    ) -> Result<SavedSession, ClientError> {
        cert.verify_for(&self.gateway.public_key()?, &self.identity.peer_id(), unix_now())?;
        let session = SavedSession { gateway: self.gateway.clone(), account, cert, relays };
        session.save(&self.profile)?;
        Ok(session)
    }

    /// Renews the certificate now, saving it.
    pub async fn renew(&self, session: SavedSession) -> Result<SavedSession, ClientError> {
        let cert = self.renew_cert().await?;
        self.accept_session(session.account, cert, session.relays)
    }

    /// Renews the certificate if less than `within_secs` of its validity is left.
    pub async fn renew_if_due(&self, session: SavedSession, within_secs: u64) -> Result<SavedSession, ClientError> {
        if session.cert.body.not_after <= unix_now() + within_secs { self.renew(session).await } else { Ok(session) }
    }

    /// A fresh certificate for this device, checked.
    pub async fn renew_cert(&self) -> Result<SessionCert, ClientError> {
        let cert = expect_reply!(self.call(AuthRequest::RenewCert).await?, "RenewCert", AuthResponse::Cert(c) => c)?;
        cert.verify_for(&self.gateway.public_key()?, &self.identity.peer_id(), unix_now())?;
        Ok(cert)
    }

    // ---- typed gateway calls ----

    /// Asks the gateway to text a login code to `phone`; returns how long it stays valid (s).
    pub async fn send_code(&self, phone: Phone) -> Result<u64, ClientError> {
        let response = self.call(AuthRequest::SendCode { phone }).await?;
        expect_reply!(response, "SendCode", AuthResponse::CodeSent { expires_in_secs, .. } => expires_in_secs)
    }

    /// Signs in with a code (or a bot token); returns the account, certificate, and whether the
    /// account is new. `request` is `SignIn` or `BotSignIn`.
    pub async fn sign_in(&self, request: AuthRequest) -> Result<SignedIn, ClientError> {
        let response = self.call(request).await?;
        expect_reply!(response, "SignIn", AuthResponse::SignedIn { account, cert, new_account } =>
            SignedIn { account, cert, new_account })
    }

    /// The caller's own account.
    pub async fn get_me(&self) -> Result<Account, ClientError> {
        expect_reply!(self.call(AuthRequest::GetMe).await?, "GetMe", AuthResponse::Me(a) => a)
    }

    /// Changes the profile or the 2FA password (`SetProfile` / `SetPassword`); returns the
    /// account as it now is.
    pub async fn update_account(&self, request: AuthRequest) -> Result<Account, ClientError> {
        expect_reply!(self.call(request).await?, "account update", AuthResponse::Me(a) => a)
    }

    /// A user's card from the directory, without the devices whose keys do not check out: each
    /// device's Noise key must be signed by its own ed25519 key, which is its peer id. The
    /// gateway checks that at sign-in; a client that did not check would encrypt to whatever
    /// key the gateway, or someone between, put on the card.
    pub async fn lookup(&self, query: LookupQuery) -> Result<UserCard, ClientError> {
        let mut card =
            expect_reply!(self.call(AuthRequest::Lookup(query)).await?, "Lookup", AuthResponse::Card(c) => c)?;
        for (device, why) in card.retain_checked_devices() {
            tracing::warn!(user = %card.user_id, %device, %why, "a card's device is left out");
        }
        Ok(card)
    }

    /// The account's sessions.
    pub async fn sessions(&self) -> Result<Vec<SessionInfo>, ClientError> {
        expect_reply!(self.call(AuthRequest::ListSessions).await?, "ListSessions", AuthResponse::Sessions(s) => s)
    }

    /// Ends one session (`Some`) or every other session (`None`); returns how many ended.
    pub async fn revoke_sessions(&self, which: Option<SessionId>) -> Result<u32, ClientError> {
        let request = match which {
            Some(session_id) => AuthRequest::RevokeSession { session_id },
            None => AuthRequest::RevokeOtherSessions,
        };
        expect_reply!(self.call(request).await?, "RevokeSession", AuthResponse::Revoked { count } => count)
    }

    /// Creates a bot (`CreateBot`) or replaces a bot's token (`RevokeBotToken`); returns the bot
    /// and its token.
    pub async fn bot_token(&self, request: AuthRequest) -> Result<(Account, String), ClientError> {
        expect_reply!(self.call(request).await?, "bot token", AuthResponse::BotToken { bot, token } => (bot, token))
    }

    /// The bots the caller owns.
    pub async fn bots(&self) -> Result<Vec<Account>, ClientError> {
        expect_reply!(self.call(AuthRequest::ListBots).await?, "ListBots", AuthResponse::Bots(b) => b)
    }

    /// Lists this bot's commands for its users (`setMyCommands`).
    pub async fn set_bot_commands(&self, commands: Vec<BotCommandInfo>) -> Result<(), ClientError> {
        expect_reply!(self.call(AuthRequest::SetBotCommands { commands }).await?, "SetBotCommands", AuthResponse::Done => ())
    }

    /// The commands a bot lists.
    pub async fn bot_commands(&self, bot: crate::ids::UserId) -> Result<Vec<BotCommandInfo>, ClientError> {
        expect_reply!(self.call(AuthRequest::BotCommands { bot }).await?, "BotCommands", AuthResponse::BotCommands(c) => c)
    }

    /// Names a public channel (by its link) `@name` in the directory.
    pub async fn set_channel_name(&self, name: String, link: String) -> Result<(), ClientError> {
        let request = AuthRequest::SetChannelName { name, link };
        expect_reply!(self.call(request).await?, "SetChannelName", AuthResponse::Done => ())
    }

    /// The link of the public channel named `@name`.
    pub async fn channel_by_name(&self, name: String) -> Result<String, ClientError> {
        let request = AuthRequest::ChannelByName { name };
        expect_reply!(self.call(request).await?, "ChannelByName", AuthResponse::ChannelLink(link) => link)
    }

    /// Has the gateway keep a backup pointer, and only the newest `keep`.
    pub async fn put_backup(&self, backup: BackupRecord, keep: u8) -> Result<(), ClientError> {
        expect_reply!(self.call(AuthRequest::PutBackup { backup, keep }).await?, "PutBackup", AuthResponse::Done => ())
    }

    /// The account's backup pointers, newest first.
    pub async fn backups(&self) -> Result<Vec<BackupRecord>, ClientError> {
        expect_reply!(self.call(AuthRequest::ListBackups).await?, "ListBackups", AuthResponse::Backups(b) => b)
    }
}

/// Makes the profile directory (creating it if need be) readable by its owner only: it holds
/// the plaintext history, keys and exports on their way, so nobody else may even list it.
pub fn keep_private(profile: &Path) -> Result<(), ClientError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |e: std::io::Error| ClientError::Profile { path: profile.to_path_buf(), reason: e.to_string() };
    fs::create_dir_all(profile).map_err(err)?;
    let mode = fs::metadata(profile).map_err(err)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        fs::set_permissions(profile, fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

/// A successful sign-in.
#[derive(Debug, Clone)]
pub struct SignedIn {
    pub account: Account,
    pub cert: SessionCert,
    pub new_account: bool,
}
