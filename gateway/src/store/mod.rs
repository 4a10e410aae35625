//! The gateway's durable state: accounts, sessions, login codes, bot tokens, and the
//! revocations relays fetch, behind one interface ([`Tables`]) with two backends:
//! - [`redb`](self::redb): one embedded file, the default (`--data DIR`);
//! - [`postgres`](self::postgres): a PostgreSQL database (`--database postgres://…`), which
//!   several gateways share.
//!
//! Every request runs in one transaction ([`Store::write`]) and commits only if its closure
//! returns `Ok`, so a request either happens wholly or not at all. On PostgreSQL the
//! transaction is serializable and the closure runs again when the database says it lost a
//! race with another gateway, so the closure must do nothing but read and write the tables.
//! [`Store::read`] runs a closure and discards what it wrote.

pub mod postgres;
pub mod redb;

use libp2p::PeerId;
use meshgram_node::crypto::cert::{AccountKind, Revocation};
use meshgram_node::crypto::identity::DeviceKeys;
use meshgram_node::ids::{Phone, SessionId, UserId, Username};
use meshgram_node::proto::{Account, BackupRecord, BotCommandInfo, SessionInfo};
use meshgram_node::server::limits::RateLimiter;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

pub use self::postgres::PgStore;
pub use self::redb::RedbStore;

/// User ids start here so they look like account numbers, not row counters.
const FIRST_USER_ID: u64 = 1_000_001;

/// A storage failure: the disk or the database, or a record that no longer decodes.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed.
    #[error("database: {0}")]
    Db(#[from] ::redb::Error),
    /// PostgreSQL refused or failed a statement.
    #[error("postgres: {0}")]
    Postgres(String),
    /// The database cannot be reached, or is busy past what a request may wait: may pass.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// `migrate` refuses a database that already holds gateway data.
    #[error("the target database already holds gateway data (table {table}); migrate only into an empty one")]
    NotEmpty { table: &'static str },
    /// A stored record does not decode.
    #[error("corrupt {what} record: {reason}")]
    Corrupt { what: &'static str, reason: String },
}

/// An account as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredAccount {
    pub user_id: UserId,
    pub kind: AccountKind,
    pub phone: Option<Phone>,
    pub username: Option<Username>,
    pub name: String,
    /// argon2id PHC string.
    pub password_hash: Option<String>,
    pub owner: Option<UserId>,
    pub created_at: u64,
}

impl StoredAccount {
    /// The owner's view.
    pub fn to_account(&self) -> Account {
        Account {
            user_id: self.user_id,
            kind: self.kind,
            phone: self.phone.clone(),
            username: self.username.clone(),
            name: self.name.clone(),
            has_password: self.password_hash.is_some(),
            owner: self.owner,
            created_at: self.created_at,
        }
    }
}

/// A device session as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredSession {
    pub session_id: SessionId,
    pub user_id: UserId,
    pub device: PeerId,
    pub keys: DeviceKeys,
    pub device_name: String,
    pub kind: AccountKind,
    pub created_at: u64,
    pub last_seen: u64,
    pub revoked_at: Option<u64>,
}

impl StoredSession {
    /// As shown in a session list; `current` marks the caller's own.
    pub fn to_info(&self, current: SessionId) -> SessionInfo {
        SessionInfo {
            session_id: self.session_id,
            device: self.device,
            device_name: self.device_name.clone(),
            kind: self.kind,
            created_at: self.created_at,
            last_seen: self.last_seen,
            current: self.session_id == current,
        }
    }
}

/// A login code waiting to be used.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CodeRecord {
    /// Keyed blake3 of the code; compared in constant time.
    pub code_hash: [u8; 32],
    pub expires_at: u64,
    pub wrong_attempts: u32,
    /// After too many wrong attempts, nothing for this phone from this device until then.
    pub locked_until: u64,
}

/// An account's wrong 2FA passwords since the last right one, and until when it takes none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasswordGuard {
    pub wrong: u32,
    pub locked_until: u64,
}

/// A phone's wrong login codes from every device lately (each within a lockout period of the
/// one before), and until when it takes none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhoneGuard {
    pub wrong: u32,
    pub last_wrong_at: u64,
    pub locked_until: u64,
}

/// A public channel's name: who claimed it, and the channel's link it stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelName {
    pub owner: UserId,
    pub link: String,
}

/// The tables of one transaction, with typed accessors: what the gateway's rules read and
/// write, whichever database holds them.
pub trait Tables {
    // ---- accounts ----

    /// The account, if it exists.
    fn account(&mut self, id: UserId) -> Result<Option<StoredAccount>, StoreError>;
    /// Account by phone.
    fn account_by_phone(&mut self, phone: &Phone) -> Result<Option<StoredAccount>, StoreError>;
    /// Account by username, case-insensitively.
    fn account_by_username(&mut self, username: &Username) -> Result<Option<StoredAccount>, StoreError>;
    /// Allocates the next user id.
    fn next_user_id(&mut self) -> Result<UserId, StoreError>;
    /// Inserts or updates an account and its phone/username indexes. The caller has checked
    /// that a new username is free.
    fn put_account(&mut self, account: &StoredAccount) -> Result<(), StoreError>;
    /// Who holds this username, if anyone.
    fn username_holder(&mut self, username: &Username) -> Result<Option<UserId>, StoreError>;

    // ---- sessions ----

    /// The session, revoked or not.
    fn session(&mut self, id: SessionId) -> Result<Option<StoredSession>, StoreError>;
    /// The latest session of a device, revoked or not.
    fn session_of_device(&mut self, device: &PeerId) -> Result<Option<StoredSession>, StoreError>;
    /// Stores a session; active ones are indexed under their user, and each becomes its
    /// device's latest.
    fn put_session(&mut self, session: &StoredSession) -> Result<(), StoreError>;
    /// Active sessions of a user.
    fn active_sessions(&mut self, user: UserId) -> Result<Vec<StoredSession>, StoreError>;

    // ---- guards and login codes ----

    /// The account's guard against password guessing (none: no wrong password lately).
    fn password_guard(&mut self, user: UserId) -> Result<PasswordGuard, StoreError>;
    /// Stores it (the default removes it).
    fn put_password_guard(&mut self, user: UserId, guard: &PasswordGuard) -> Result<(), StoreError>;
    /// The phone's guard against code guessing from many devices at once.
    fn phone_guard(&mut self, phone: &Phone) -> Result<PhoneGuard, StoreError>;
    /// Stores it (the default removes it).
    fn put_phone_guard(&mut self, phone: &Phone, guard: &PhoneGuard) -> Result<(), StoreError>;
    /// The code `device` asked for `phone`.
    fn code(&mut self, phone: &Phone, device: &PeerId) -> Result<Option<CodeRecord>, StoreError>;
    /// Stores the code record of `device` for `phone`.
    fn put_code(&mut self, phone: &Phone, device: &PeerId, record: &CodeRecord) -> Result<(), StoreError>;
    /// Deletes the code record of `device` for `phone` (used, or undeliverable).
    fn remove_code(&mut self, phone: &Phone, device: &PeerId) -> Result<(), StoreError>;
    /// Deletes `phone`'s code records that `stale` says are of no more use (expired, and any
    /// lockout over), whichever devices asked for them.
    fn remove_stale_codes(&mut self, phone: &Phone, stale: &dyn Fn(&CodeRecord) -> bool) -> Result<(), StoreError>;

    // ---- backups ----

    /// Adds a backup pointer for `user` and drops all but the newest `keep`.
    fn put_backup(&mut self, user: UserId, record: &BackupRecord, keep: usize) -> Result<(), StoreError>;
    /// A user's backup pointers, newest first.
    fn backups(&mut self, user: UserId) -> Result<Vec<BackupRecord>, StoreError>;

    // ---- bots and channel names ----

    /// Replaces the commands a bot lists (none: removed).
    fn put_bot_commands(&mut self, bot: UserId, commands: &[BotCommandInfo]) -> Result<(), StoreError>;
    /// The commands a bot lists.
    fn bot_commands(&mut self, bot: UserId) -> Result<Vec<BotCommandInfo>, StoreError>;
    /// The public channel named `name`, if one is.
    fn channel_name(&mut self, name: &Username) -> Result<Option<ChannelName>, StoreError>;
    /// Names a public channel. The caller has checked that the name is free or already theirs.
    fn put_channel_name(&mut self, name: &Username, channel: &ChannelName) -> Result<(), StoreError>;
    /// Frees a channel's name (for any account or channel to take).
    fn remove_channel_name(&mut self, name: &Username) -> Result<(), StoreError>;
    /// The keyed hash of a bot's token secret.
    fn bot_secret(&mut self, bot: UserId) -> Result<Option<[u8; 32]>, StoreError>;
    /// Sets a bot's token hash and records its owner.
    fn put_bot_secret(&mut self, bot: UserId, owner: Option<UserId>, hash: &[u8; 32]) -> Result<(), StoreError>;
    /// Bots created by `owner`.
    fn bots_of(&mut self, owner: UserId) -> Result<Vec<StoredAccount>, StoreError>;
    /// Every bot account (for the operator's list).
    fn all_bots(&mut self) -> Result<Vec<StoredAccount>, StoreError>;

    // ---- revocations ----

    /// Appends a revocation; returns its sequence number. Numbers only grow, and one becomes
    /// visible only after every smaller one: relays page through them with `since`.
    fn add_revocation(&mut self, revocation: &Revocation) -> Result<u64, StoreError>;
    /// The sequence number the next revocation will get.
    fn next_revocation_seq(&mut self) -> Result<u64, StoreError>;
    /// Up to `limit` revocations from sequence number `since` on, with their numbers.
    fn revocations_since(&mut self, since: u64, limit: usize) -> Result<Vec<(u64, Revocation)>, StoreError>;
    /// Deletes the revocations that no longer matter at `now` (every certificate they end has
    /// expired); returns how many.
    fn prune_revocations(&mut self, now: u64) -> Result<usize, StoreError>;
    /// When `relay`'s admission was revoked, if it was.
    fn relay_revoked_at(&mut self, relay: &PeerId) -> Result<Option<u64>, StoreError>;
    /// Records that `relay`'s admission was revoked at `at`.
    fn put_revoked_relay(&mut self, relay: &PeerId, at: u64) -> Result<(), StoreError>;
}

/// One piece of a gateway's state, as `migrate` copies it from one database to another.
#[derive(Debug, Clone)]
pub enum Record {
    Account(StoredAccount),
    Session(StoredSession),
    /// A device's latest session (kept after revocation, to say SESSION_REVOKED).
    Device {
        device: PeerId,
        session: SessionId,
    },
    Code {
        phone: Phone,
        device: PeerId,
        record: CodeRecord,
    },
    PhoneGuard(Phone, PhoneGuard),
    PasswordGuard(UserId, PasswordGuard),
    BotSecret {
        bot: UserId,
        owner: Option<UserId>,
        hash: [u8; 32],
    },
    BotCommands(UserId, Vec<BotCommandInfo>),
    ChannelName(Username, ChannelName),
    Backup {
        user: UserId,
        seq: u64,
        record: BackupRecord,
    },
    Revocation {
        seq: u64,
        revocation: Revocation,
    },
    RevokedRelay {
        relay: PeerId,
        at: u64,
    },
    /// The id the next account gets.
    NextUserId(u64),
    /// The sequence number the next revocation gets.
    NextRevocation(u64),
}

/// The gateway database: an embedded redb file, or a PostgreSQL database shared by gateways.
#[derive(Debug)]
pub enum Store {
    Redb(RedbStore),
    // Boxed: its connection settings are large, and a Store is made once.
    Postgres(Box<PgStore>),
}

impl Store {
    /// Opens (or creates) a redb database file.
    pub fn open(path: &std::path::Path) -> Result<Self, StoreError> {
        RedbStore::open(path).map(Store::Redb)
    }

    /// Connects to PostgreSQL at `url` (TLS roots from `ca`, see [`PgStore::connect`]) and
    /// creates the gateway's tables if they are missing.
    pub fn connect(url: &str, ca: Option<&std::path::Path>) -> Result<Self, StoreError> {
        PgStore::connect(url, ca).map(|store| Store::Postgres(Box::new(store)))
    }

    /// Runs `f` in a transaction; commits (durably) only if it returns `Ok`. `f` may run more
    /// than once (see the module docs).
    pub fn write<T, E: From<StoreError>>(&self, f: impl FnMut(&mut dyn Tables) -> Result<T, E>) -> Result<T, E> {
        match self {
            Store::Redb(store) => store.write(f),
            Store::Postgres(store) => store.transaction(true, f),
        }
    }

    /// Runs `f` and discards whatever it wrote: for requests that only read.
    pub fn read<T, E: From<StoreError>>(&self, f: impl FnMut(&mut dyn Tables) -> Result<T, E>) -> Result<T, E> {
        match self {
            Store::Redb(store) => store.read(f),
            Store::Postgres(store) => store.transaction(false, f),
        }
    }

    /// Accounts (users and bots) and active sessions, for `/metrics`.
    pub fn counts(&self) -> Result<(u64, u64), StoreError> {
        match self {
            Store::Redb(store) => store.counts(),
            Store::Postgres(store) => store.counts(),
        }
    }

    /// Transactions committed since the store was opened (each a durable write), for tests of
    /// what costs one.
    pub fn commits(&self) -> u64 {
        match self {
            Store::Redb(store) => store.commits(),
            Store::Postgres(store) => store.commits(),
        }
    }

    /// Takes a token for `key` from `limiter` (called `name`) at `now`, or says how many whole seconds until
    /// one is there. For limits that must hold across gateways (code requests per phone,
    /// sign-in attempts per device): PostgreSQL keeps the bucket, for every gateway to share;
    /// a redb gateway is alone and keeps it in memory.
    pub fn take_token(
        &self,
        limiter: &RateLimiter,
        name: &'static str,
        key: &str,
        now: u64,
    ) -> Result<Result<(), u64>, StoreError> {
        match self {
            Store::Redb(_) => Ok(limiter.check(key, now)),
            Store::Postgres(store) => store.take_token(limiter, name, key, now),
        }
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("invariant: stored records always serialize")
}

fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt { what, reason: e.to_string() })
}
