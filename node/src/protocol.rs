//! Wire spec in code: protocol names, size limits, and the messages of each protocol.
//!
//! Goals: every message is bounded; enums only ever grow (new variants at the end), so old
//! peers keep decoding what they knew; errors are data, not dropped streams.
//! Non-goals: human-readable encoding (postcard is compact and fast; see `codec`).
//!
//! Protocols: `/meshgram/auth/1` (below), `/meshgram/mailbox/1` and `/meshgram/replica/1`
//! (further down).
//!
//! ## `/meshgram/auth/1` (client ↔ gateway)
//! The libp2p connection already authenticates the device key, so requests carry no tokens: the
//! gateway maps the caller's `PeerId` to its session.
//!
//! ```text
//! SendCode{phone} ─────────────▶ CodeSent{expires_in}      (code goes out via the CodeSender)
//! SignIn{phone, code, device} ─▶ SignedIn{account, cert}   | Error(PASSWORD_REQUIRED) → retry with password
//! RenewCert ───────────────────▶ Cert(cert)                | Error(SESSION_REVOKED)
//! Lookup / ListSessions / RevokeSession / CreateBot / …
//! ```

use std::fmt;

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::cert::{AccountKind, RelayCert, SessionCert};
use crate::codec::PostcardCodec;
use crate::envelope::{Envelope, EnvelopeId};
use crate::identity::DeviceKeys;
use crate::ids::{NoiseKey, Phone, SessionId, UserId, Username};
use crate::pipe::PipeLimits;

/// Sign-in, sessions, profiles and the directory.
pub const AUTH_PROTOCOL: &str = "/meshgram/auth/1";
/// No auth request needs more than a few hundred bytes; 16 KiB leaves room and bounds abuse.
pub const MAX_AUTH_REQUEST_SIZE: usize = 16 * 1024;
/// Session lists and cards with many devices are the largest replies.
pub const MAX_AUTH_RESPONSE_SIZE: usize = 1024 * 1024;
/// Longest display name, in characters (Telegram's first+last name fit in 64).
pub const MAX_NAME_CHARS: usize = 64;
/// Longest device name a client may report.
pub const MAX_DEVICE_NAME_CHARS: usize = 64;
/// Longest 2FA password accepted.
pub const MAX_PASSWORD_BYTES: usize = 256;

/// The codec for [`AUTH_PROTOCOL`].
pub type AuthCodec = PostcardCodec<AuthRequest, AuthResponse>;

/// A new auth codec with this protocol's limits.
pub fn auth_codec() -> AuthCodec {
    AuthCodec::new(MAX_AUTH_REQUEST_SIZE, MAX_AUTH_RESPONSE_SIZE)
}

/// A client's request to the gateway.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AuthRequest {
    /// Send a login code to this phone.
    SendCode { phone: Phone },
    /// Sign in (creating the account on first use) with the code that was sent.
    SignIn {
        phone: Phone,
        code: String,
        device: DeviceKeys,
        device_name: String,
        /// The 2FA password, when the account has one.
        password: Option<String>,
    },
    /// Sign a bot in with its token.
    BotSignIn { token: String, device: DeviceKeys, device_name: String },
    /// A fresh certificate for the caller's session.
    RenewCert,
    /// The caller's own account.
    GetMe,
    /// Change username (`Some("")` removes it) and/or display name.
    SetProfile { username: Option<String>, name: Option<String> },
    /// Set, change (`new: Some`) or remove (`new: None`) the 2FA password.
    SetPassword { current: Option<String>, new: Option<String> },
    /// Find a user's card.
    Lookup(LookupQuery),
    /// The caller's account's active sessions.
    ListSessions,
    /// End one session of the caller's account.
    RevokeSession { session_id: SessionId },
    /// End every session of the caller's account but the caller's.
    RevokeOtherSessions,
    /// Create a bot owned by the caller (BotFather's /newbot).
    CreateBot { username: String, name: String },
    /// Bots the caller owns.
    ListBots,
    /// Replace a bot's token; its sessions end.
    RevokeBotToken { bot: UserId },
}

impl AuthRequest {
    /// A short stable name, for metrics and logs (never includes secrets).
    pub fn kind(&self) -> &'static str {
        match self {
            AuthRequest::SendCode { .. } => "send_code",
            AuthRequest::SignIn { .. } => "sign_in",
            AuthRequest::BotSignIn { .. } => "bot_sign_in",
            AuthRequest::RenewCert => "renew_cert",
            AuthRequest::GetMe => "get_me",
            AuthRequest::SetProfile { .. } => "set_profile",
            AuthRequest::SetPassword { .. } => "set_password",
            AuthRequest::Lookup(_) => "lookup",
            AuthRequest::ListSessions => "list_sessions",
            AuthRequest::RevokeSession { .. } => "revoke_session",
            AuthRequest::RevokeOtherSessions => "revoke_other_sessions",
            AuthRequest::CreateBot { .. } => "create_bot",
            AuthRequest::ListBots => "list_bots",
            AuthRequest::RevokeBotToken { .. } => "revoke_bot_token",
        }
    }
}

/// Who to look up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LookupQuery {
    /// By `@username`.
    Username(Username),
    /// By phone number.
    Phone(Phone),
    /// By account number.
    UserId(UserId),
}

impl std::str::FromStr for LookupQuery {
    type Err = crate::ids::InvalidValue;
    /// `@name`, `+15550001111`, or a number.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.starts_with('+') {
            s.parse().map(LookupQuery::Phone)
        } else if s.chars().all(|c| c.is_ascii_digit()) && !s.is_empty() {
            s.parse().map(LookupQuery::UserId)
        } else {
            s.parse().map(LookupQuery::Username)
        }
    }
}

/// The gateway's reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AuthResponse {
    /// A code is on its way.
    CodeSent { expires_in_secs: u64, code_length: u8 },
    /// Signed in; keep the certificate and renew it before `not_after`.
    SignedIn { account: Account, cert: SessionCert, new_account: bool },
    /// A renewed certificate.
    Cert(SessionCert),
    /// The caller's account.
    Me(Account),
    /// A user's public card.
    Card(UserCard),
    /// Active sessions.
    Sessions(Vec<SessionInfo>),
    /// How many sessions were ended.
    Revoked { count: u32 },
    /// A bot and its (new) token.
    BotToken { bot: Account, token: String },
    /// Bots owned by the caller.
    Bots(Vec<Account>),
    /// Done, nothing to return.
    Done,
    /// The request was refused.
    Error(WireError),
}

/// An account as its owner sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub user_id: UserId,
    pub kind: AccountKind,
    /// Users only.
    pub phone: Option<Phone>,
    pub username: Option<Username>,
    pub name: String,
    pub has_password: bool,
    /// Bots only: the user who created it (none when an operator did).
    pub owner: Option<UserId>,
    /// Unix seconds.
    pub created_at: u64,
}

/// What anyone may learn about a user: enough to encrypt to every device of theirs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserCard {
    pub user_id: UserId,
    pub kind: AccountKind,
    pub username: Option<Username>,
    pub name: String,
    pub devices: Vec<DeviceCard>,
}

/// One device of a user's card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCard {
    pub peer_id: PeerId,
    pub keys: DeviceKeys,
}

impl DeviceCard {
    /// The device's Noise key.
    pub fn noise_key(&self) -> NoiseKey {
        self.keys.noise_key
    }
}

/// One session in a session list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub session_id: SessionId,
    pub device: PeerId,
    pub device_name: String,
    pub kind: AccountKind,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds, updated at most once a minute.
    pub last_seen: u64,
    /// The session making the request.
    pub current: bool,
}

/// A refusal with a stable machine code (Telegram's RPC error names) and a human message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
    /// For [`ErrorCode::FloodWait`]: seconds to wait before trying again.
    pub retry_after_secs: Option<u64>,
}

impl WireError {
    /// An error without retry-after.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError { code, message: message.into(), retry_after_secs: None }
    }
    /// A rate-limit refusal.
    pub fn flood_wait(retry_after_secs: u64, what: &str) -> Self {
        WireError {
            code: ErrorCode::FloodWait,
            message: format!("too many {what}; retry after {retry_after_secs} s"),
            retry_after_secs: Some(retry_after_secs),
        }
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.retry_after_secs {
            Some(secs) => write!(f, "{}_{secs}: {}", self.code, self.message),
            None => write!(f, "{}: {}", self.code, self.message),
        }
    }
}

/// Machine-readable refusal reasons. Append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request could not be decoded, was too large, or a field is out of range.
    BadRequest,
    PhoneNumberInvalid,
    PhoneCodeInvalid,
    PhoneCodeExpired,
    /// The account has a 2FA password and none was given.
    SessionPasswordNeeded,
    PasswordHashInvalid,
    /// Rate limited; see `retry_after_secs`.
    FloodWait,
    /// This device has no session: sign in first.
    AuthKeyUnregistered,
    SessionRevoked,
    UsernameOccupied,
    UsernameInvalid,
    NameInvalid,
    /// No such user, session or bot.
    NotFound,
    /// Bot token malformed, unknown or revoked.
    AccessTokenInvalid,
    /// The caller may not do this (e.g. a bot creating bots, someone else's bot).
    Forbidden,
    /// The device keys do not verify or do not belong to the connection's peer.
    DeviceKeysInvalid,
    /// The code could not be delivered; try again later.
    CodeDeliveryFailed,
    /// The server failed; nothing the client did.
    Internal,
    /// A relay needs a valid session certificate (`Hello`) on this connection first.
    CertInvalid,
    /// An envelope's sender is not the connection's device or account.
    SenderMismatch,
    /// This relay does not hold that mailbox; ask one of the relays named in the message.
    NotResponsible,
    /// Not enough relays could store the data durably; nothing was acknowledged.
    Unavailable,
    /// A per-user quota (stored envelopes or bytes) is full.
    QuotaExceeded,
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::PhoneNumberInvalid => "PHONE_NUMBER_INVALID",
            ErrorCode::PhoneCodeInvalid => "PHONE_CODE_INVALID",
            ErrorCode::PhoneCodeExpired => "PHONE_CODE_EXPIRED",
            ErrorCode::SessionPasswordNeeded => "SESSION_PASSWORD_NEEDED",
            ErrorCode::PasswordHashInvalid => "PASSWORD_HASH_INVALID",
            ErrorCode::FloodWait => "FLOOD_WAIT",
            ErrorCode::AuthKeyUnregistered => "AUTH_KEY_UNREGISTERED",
            ErrorCode::SessionRevoked => "SESSION_REVOKED",
            ErrorCode::UsernameOccupied => "USERNAME_OCCUPIED",
            ErrorCode::UsernameInvalid => "USERNAME_INVALID",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::AccessTokenInvalid => "ACCESS_TOKEN_INVALID",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::DeviceKeysInvalid => "DEVICE_KEYS_INVALID",
            ErrorCode::CodeDeliveryFailed => "CODE_DELIVERY_FAILED",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::CertInvalid => "CERT_INVALID",
            ErrorCode::SenderMismatch => "SENDER_MISMATCH",
            ErrorCode::NotResponsible => "NOT_RESPONSIBLE",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::QuotaExceeded => "QUOTA_EXCEEDED",
        };
        f.write_str(s)
    }
}

// ---------------------------------------------------------------------------------------------
// `/meshgram/mailbox/1` (client ↔ relay) and `/meshgram/replica/1` (relay ↔ relay)
//
// ```text
// client                 entry relay                    mailbox relays (R closest to recipient)
//   Hello{cert} ───────────▶ verify once per connection
//   Send{envelopes} ───────▶ check sender = connection ─▶ Replica Store ─▶ synced log + redb
//   ◀──────── Stored{ids} ◀─ all R durable ◀────────────── Stored
//                            (relays greet each other first: Replica Hello{relay cert} ⇄
//                             Welcome{relay cert}, both signed by the gateway)
//
// recipient ── Hello ──▶ one of its mailbox relays
//   Fetch{wait, ack} ─▶ Envelopes (long-poll: answered as soon as a Store arrives, even
//                       before its commit); `ack` (the batch before) is deleted here and by
//                       Replica Delete on the other replicas. `Ack{ids}` does that alone.
// ```
// Both run on pipes (`crate::pipe`): one stream per connection, tagged requests and answers.
// Relays see routing fields and ciphertext only: the content is sealed end to end (`e2e`).

/// Client ↔ relay: hello, send, fetch, ack.
pub const MAILBOX_PROTOCOL: &str = "/meshgram/mailbox/1";
/// Relay ↔ relay: store and delete mailbox replicas.
pub const REPLICA_PROTOCOL: &str = "/meshgram/replica/1";
/// Relays find each other with Kademlia on this protocol.
pub const KAD_PROTOCOL: &str = "/meshgram/kad/1";
/// A sealed message: Noise allows 65,535 bytes per message; routing fields fit in the rest.
pub const MAX_ENVELOPE_SIZE: usize = 66 * 1024;
/// Envelopes per `Send`/`Store`/`Envelopes` batch: large batches amortize commits.
pub const MAX_ENVELOPES_PER_BATCH: usize = 256;
/// A whole mailbox request or response: a full batch of maximal envelopes plus framing.
pub const MAX_MAILBOX_MESSAGE_SIZE: usize = MAX_ENVELOPES_PER_BATCH * MAX_ENVELOPE_SIZE + 64 * 1024;
/// Longest a `Fetch` may wait for new envelopes before answering empty.
pub const MAX_FETCH_WAIT_MS: u32 = 25_000;

/// Both protocols run as pipes (`crate::pipe`): one long-lived stream per connection carrying
/// tagged requests and answers; these are their message size limits.
pub const MAILBOX_LIMITS: PipeLimits =
    PipeLimits { max_request: MAX_MAILBOX_MESSAGE_SIZE, max_response: MAX_MAILBOX_MESSAGE_SIZE };
/// See [`MAILBOX_LIMITS`].
pub const REPLICA_LIMITS: PipeLimits = MAILBOX_LIMITS;

/// A client's request to a relay.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MailboxRequest {
    /// Present the session certificate; required once per connection before anything else.
    Hello { cert: SessionCert },
    /// Store envelopes in their recipients' mailboxes; answered once durable on R relays.
    Send { envelopes: Vec<Envelope> },
    /// Envelopes waiting in the caller's own mailbox, oldest first. With `wait_ms > 0` and an
    /// empty mailbox, the relay answers as soon as something arrives (long-poll). `ack` are
    /// envelopes of earlier fetches the caller has kept, deleted first as by `Ack`: a
    /// receiving loop needs one request per batch, not two.
    Fetch { max: u32, wait_ms: u32, ack: Vec<EnvelopeId> },
    /// The caller has these envelopes; delete them on every replica.
    Ack { ids: Vec<EnvelopeId> },
}

impl MailboxRequest {
    /// A short stable name for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            MailboxRequest::Hello { .. } => "hello",
            MailboxRequest::Send { .. } => "send",
            MailboxRequest::Fetch { .. } => "fetch",
            MailboxRequest::Ack { .. } => "ack",
        }
    }
}

/// A relay's answer to a client.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MailboxResponse {
    /// The certificate is accepted. `mailbox_relays` hold the caller's mailbox (fetch there);
    /// `relays` are every relay this one knows.
    Welcome { relay: PeerId, mailbox_relays: Vec<RelayInfo>, relays: Vec<RelayInfo> },
    /// `stored` are durable on R relays; `duplicates` were stored before and were not again.
    Stored { stored: Vec<EnvelopeId>, duplicates: Vec<EnvelopeId> },
    /// Envelopes from the caller's mailbox, oldest first; `more` if the batch was cut short.
    Envelopes { envelopes: Vec<Envelope>, more: bool },
    /// How many envelopes were deleted here.
    Acked { count: u32 },
    /// Refused.
    Error(WireError),
}

/// A relay and where to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInfo {
    pub peer_id: PeerId,
    pub addrs: Vec<libp2p::Multiaddr>,
}

/// One relay asking another to keep or drop replicas.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ReplicaRequest {
    /// Keep these envelopes (the sender checked them); answer once committed.
    Store { envelopes: Vec<Envelope> },
    /// The recipient acknowledged these; delete them.
    Delete { mailbox: PeerId, ids: Vec<EnvelopeId> },
    /// Present this relay's certificate; required once per connection before `Store` or
    /// `Delete` (`CERT_INVALID` otherwise). Answered with the other relay's own.
    Hello { cert: RelayCert },
}

/// Answer to a [`ReplicaRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ReplicaResponse {
    /// Committed; `duplicates` were already held (or already delivered) and were skipped.
    Stored {
        duplicates: Vec<EnvelopeId>,
    },
    Deleted {
        count: u32,
    },
    Error(WireError),
    /// `Hello` accepted; this is the answering relay's certificate, for the caller to check.
    Welcome {
        cert: RelayCert,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_queries_parse_by_shape() {
        assert!(matches!("@alice_x".parse(), Ok(LookupQuery::Username(_))));
        assert!(matches!("+15550001111".parse(), Ok(LookupQuery::Phone(_))));
        assert_eq!("42".parse::<LookupQuery>().unwrap(), LookupQuery::UserId(UserId(42)));
        assert!("@x".parse::<LookupQuery>().is_err());
    }

    #[test]
    fn flood_wait_displays_like_telegram() {
        assert_eq!(
            WireError::flood_wait(42, "code requests").to_string(),
            "FLOOD_WAIT_42: too many code requests; retry after 42 s"
        );
    }
}
