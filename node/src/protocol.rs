//! Wire spec in code: protocol names, size limits, and the messages of each protocol.
//!
//! Goals: every message is bounded; enums only ever grow (new variants at the end), so old
//! peers keep decoding what they knew; errors are data, not dropped streams.
//! Non-goals: human-readable encoding (postcard is compact and fast; see `codec`).
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

use crate::cert::{AccountKind, SessionCert};
use crate::codec::PostcardCodec;
use crate::identity::DeviceKeys;
use crate::ids::{NoiseKey, Phone, SessionId, UserId, Username};

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
    Error(AuthError),
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
pub struct AuthError {
    pub code: AuthErrorCode,
    pub message: String,
    /// For [`AuthErrorCode::FloodWait`]: seconds to wait before trying again.
    pub retry_after_secs: Option<u64>,
}

impl AuthError {
    /// An error without retry-after.
    pub fn new(code: AuthErrorCode, message: impl Into<String>) -> Self {
        AuthError { code, message: message.into(), retry_after_secs: None }
    }
    /// A rate-limit refusal.
    pub fn flood_wait(retry_after_secs: u64, what: &str) -> Self {
        AuthError {
            code: AuthErrorCode::FloodWait,
            message: format!("too many {what}; retry after {retry_after_secs} s"),
            retry_after_secs: Some(retry_after_secs),
        }
    }
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.retry_after_secs {
            Some(secs) => write!(f, "{}_{secs}: {}", self.code, self.message),
            None => write!(f, "{}: {}", self.code, self.message),
        }
    }
}

/// Machine-readable refusal reasons. Append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthErrorCode {
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
    /// The gateway failed; nothing the client did.
    Internal,
}

impl fmt::Display for AuthErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            AuthErrorCode::BadRequest => "BAD_REQUEST",
            AuthErrorCode::PhoneNumberInvalid => "PHONE_NUMBER_INVALID",
            AuthErrorCode::PhoneCodeInvalid => "PHONE_CODE_INVALID",
            AuthErrorCode::PhoneCodeExpired => "PHONE_CODE_EXPIRED",
            AuthErrorCode::SessionPasswordNeeded => "SESSION_PASSWORD_NEEDED",
            AuthErrorCode::PasswordHashInvalid => "PASSWORD_HASH_INVALID",
            AuthErrorCode::FloodWait => "FLOOD_WAIT",
            AuthErrorCode::AuthKeyUnregistered => "AUTH_KEY_UNREGISTERED",
            AuthErrorCode::SessionRevoked => "SESSION_REVOKED",
            AuthErrorCode::UsernameOccupied => "USERNAME_OCCUPIED",
            AuthErrorCode::UsernameInvalid => "USERNAME_INVALID",
            AuthErrorCode::NameInvalid => "NAME_INVALID",
            AuthErrorCode::NotFound => "NOT_FOUND",
            AuthErrorCode::AccessTokenInvalid => "ACCESS_TOKEN_INVALID",
            AuthErrorCode::Forbidden => "FORBIDDEN",
            AuthErrorCode::DeviceKeysInvalid => "DEVICE_KEYS_INVALID",
            AuthErrorCode::CodeDeliveryFailed => "CODE_DELIVERY_FAILED",
            AuthErrorCode::Internal => "INTERNAL",
        };
        f.write_str(s)
    }
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
            AuthError::flood_wait(42, "code requests").to_string(),
            "FLOOD_WAIT_42: too many code requests; retry after 42 s"
        );
    }
}
