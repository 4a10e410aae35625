//! `/meshgram/auth/1` (client ↔ gateway): sign-in, sessions, profiles and the directory.
//!
//! The libp2p connection already authenticates the device key, so requests carry no tokens: the
//! gateway maps the caller's `PeerId` to its session.
//!
//! ```text
//! SendCode{phone} ─────────────▶ CodeSent{expires_in}      (code goes out via the CodeSender)
//! SignIn{phone, code, device} ─▶ SignedIn{account, cert}   | Error(PASSWORD_REQUIRED) → retry with password
//! RenewCert ───────────────────▶ Cert(cert)                | Error(SESSION_REVOKED)
//! Lookup / ListSessions / RevokeSession / CreateBot / …
//! Revocations{since, relay_cert} ─▶ Revocations{revocations, next, more}   (relays, every ~2 s)
//! DevicesExist{devices, relay_cert} ─▶ Devices{existing}   (relays, before a new mailbox's first envelope)
//! ```

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::crypto::cert::{AccountKind, RelayCert, Revocation, SessionCert};
use crate::crypto::identity::DeviceKeys;
use crate::ids::{NoiseKey, Phone, SessionId, UserId, Username};
use crate::net::codec::PostcardCodec;
use crate::proto::WireError;

/// Sign-in, sessions, profiles and the directory.
pub const AUTH_PROTOCOL: &str = "/meshgram/auth/1";
/// No auth request needs more than a few hundred bytes; 16 KiB leaves room and bounds abuse.
pub const MAX_AUTH_REQUEST_SIZE: usize = 16 * 1024;
/// Session lists and cards with many devices are the largest replies.
pub const MAX_AUTH_RESPONSE_SIZE: usize = 1024 * 1024;
/// Revocations per answer: a signed revocation is ~150 bytes, so a full answer stays well
/// under [`MAX_AUTH_RESPONSE_SIZE`]; a relay that is further behind asks again at once.
pub const MAX_REVOCATIONS_PER_ANSWER: usize = 2_000;
/// Devices per `DevicesExist`: 256 peer ids (~40 bytes each) fit well in a request.
pub const MAX_DEVICES_PER_QUESTION: usize = 256;
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
    /// A relay asks for the revocations from sequence number `since` on (0: all that still
    /// matter). Only relays of this network may: the caller shows its relay certificate.
    Revocations { since: u64, relay_cert: RelayCert },
    /// Keep a pointer to an encrypted backup of the caller's history (sealed under a key only
    /// its owner's recovery code opens), and only the newest `keep` of the account's.
    PutBackup { backup: BackupRecord, keep: u8 },
    /// The account's backup pointers, newest first.
    ListBackups,
    /// The caller, a bot, lists these commands for its users (empty: none).
    SetBotCommands { commands: Vec<BotCommandInfo> },
    /// The commands a bot lists.
    BotCommands { bot: UserId },
    /// The caller (a user, the channel's admin) names a public channel `@name`, by its link:
    /// names share the namespace of usernames, first come first served. An empty link releases
    /// a name the caller holds.
    SetChannelName { name: String, link: String },
    /// A public channel's link by its `@name`.
    ChannelByName { name: String },
    /// A relay asks which of these devices have a session (signed in, not revoked): it keeps
    /// envelopes only for mailboxes of devices that exist. At most
    /// [`MAX_DEVICES_PER_QUESTION`]; only relays of this network may ask, as for `Revocations`.
    DevicesExist { devices: Vec<PeerId>, relay_cert: RelayCert },
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
            AuthRequest::Revocations { .. } => "revocations",
            AuthRequest::PutBackup { .. } => "put_backup",
            AuthRequest::ListBackups => "list_backups",
            AuthRequest::SetBotCommands { .. } => "set_bot_commands",
            AuthRequest::BotCommands { .. } => "bot_commands",
            AuthRequest::SetChannelName { .. } => "set_channel_name",
            AuthRequest::ChannelByName { .. } => "channel_by_name",
            AuthRequest::DevicesExist { .. } => "devices_exist",
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
    /// Not a person: a group or channel. Chat arguments take one wherever they take a person;
    /// the gateway knows no groups and answers `NOT_FOUND`.
    Group(crate::proto::group::GroupId),
}

impl std::str::FromStr for LookupQuery {
    type Err = crate::ids::InvalidValue;
    /// `@name`, `+15550001111`, a number, or a group id (`g` and 32 hex digits).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.starts_with('g') && s.len() == 33 && s[1..].chars().all(|c| c.is_ascii_hexdigit()) {
            s.parse().map(LookupQuery::Group)
        } else if s.starts_with('+') {
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
    /// Revocations from the asked sequence number on, each signed by the gateway. Ask again
    /// from `next`; `more`: there are more right now (the answer is bounded).
    Revocations { revocations: Vec<Revocation>, next: u64, more: bool },
    /// The account's backup pointers, newest first.
    Backups(Vec<BackupRecord>),
    /// A bot's commands.
    BotCommands(Vec<BotCommandInfo>),
    /// A public channel's link.
    ChannelLink(String),
    /// Those of the asked devices that have a session.
    Devices { existing: Vec<PeerId> },
}

/// The longest public channel link a name may stand for.
pub const MAX_CHANNEL_LINK_CHARS: usize = 1024;

/// Most commands a bot lists (Telegram's limit).
pub const MAX_BOT_COMMANDS: usize = 100;

/// A command a bot lists for its users, as `setMyCommands` sets it: `/command` and what it does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BotCommandInfo {
    pub command: String,
    pub description: String,
}

impl BotCommandInfo {
    /// Telegram's rules: at most 100 commands, each 1–32 of `a-z`, `0-9`, `_`, described in
    /// 1–256 characters.
    pub fn check_all(commands: &[BotCommandInfo]) -> Result<(), String> {
        if commands.len() > MAX_BOT_COMMANDS {
            return Err(format!("at most {MAX_BOT_COMMANDS} commands"));
        }
        for c in commands {
            let name_ok = (1..=32).contains(&c.command.len())
                && c.command.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_');
            if !name_ok {
                return Err(format!("command {:?}: 1 to 32 of a-z, 0-9 and _", c.command));
            }
            if !(1..=256).contains(&c.description.chars().count()) {
                return Err(format!("command {:?}: a description of 1 to 256 characters", c.command));
            }
        }
        Ok(())
    }
}

/// Longest sealed backup pointer the gateway keeps: a file reference with no thumbnail, sealed.
pub const MAX_BACKUP_POINTER_BYTES: usize = 4 * 1024;
/// Most backup pointers kept per account.
pub const MAX_BACKUPS_KEPT: u8 = 20;

/// Where an encrypted backup of an account's history is, as the gateway keeps it: opaque to
/// the gateway (sealed under a key derived from the owner's recovery code with `salt`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRecord {
    /// Unix seconds, set by the gateway when it takes the record.
    pub created_at: u64,
    /// The key derivation's salt and cost, so that a recovery code alone finds the key.
    pub kdf: KdfParams,
    #[serde(with = "serde_bytes")]
    pub sealed: Vec<u8>,
}

/// How a key is derived from a recovery code (argon2id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    pub salt: [u8; 16],
    /// Memory in KiB, passes, lanes.
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
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

impl UserCard {
    /// Leaves out the devices whose keys do not check out (each device's Noise key must be
    /// signed by its own ed25519 key, which is its peer id); gives each left out, and why.
    pub fn retain_checked_devices(&mut self) -> Vec<(PeerId, String)> {
        let mut left_out = Vec::new();
        self.devices.retain(|device| match device.keys.verify() {
            Ok(peer_id) if peer_id == device.peer_id => true,
            checked => {
                let why = checked.map_or_else(|e| e.to_string(), |other| format!("its keys are {other}'s"));
                left_out.push((device.peer_id, why));
                false
            }
        });
        left_out
    }
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
    fn devices_whose_keys_do_not_check_out_are_left_out_of_a_card() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let [a, b] = [a, b].map(|dir| {
            std::fs::create_dir_all(&dir).unwrap();
            crate::crypto::identity::DeviceIdentity::load_or_create(&dir).unwrap()
        });
        let honest = DeviceCard { peer_id: a.peer_id(), keys: a.device_keys() };
        // Someone else's Noise key under a's signature, and a's keys under b's id.
        let mut swapped_key = a.device_keys();
        swapped_key.noise_key = b.noise_public;
        let forged = DeviceCard { peer_id: a.peer_id(), keys: swapped_key };
        let misfiled = DeviceCard { peer_id: b.peer_id(), keys: a.device_keys() };
        let mut card = UserCard {
            user_id: UserId(1),
            kind: crate::crypto::cert::AccountKind::User,
            username: None,
            name: "a".into(),
            devices: vec![forged, honest.clone(), misfiled],
        };
        let left_out = card.retain_checked_devices();
        assert_eq!(card.devices, vec![honest]);
        assert_eq!(left_out.len(), 2);
        assert!(left_out[0].1.contains("signature"), "{left_out:?}");
        assert!(left_out[1].1.contains("keys are"), "{left_out:?}");
    }
}
