//! The embedded backend: the gateway's tables in one redb file.
//!
//! Reads also use a write transaction, aborted instead of committed: redb serializes writers
//! anyway, the gateway's load is dominated by commits, and one tables type keeps the accessors
//! in one place. Values are postcard-encoded structs; indexes are separate tables.

use std::path::Path;

use libp2p::PeerId;
use meshgram_node::crypto::cert::Revocation;
use meshgram_node::ids::{Phone, SessionId, UserId, Username};
use meshgram_node::proto::{BackupRecord, BotCommandInfo};
use redb::{
    Database, MultimapTable, MultimapTableDefinition, ReadableMultimapTable, ReadableTable, Table, TableDefinition,
    WriteTransaction,
};

use super::{
    ChannelName, CodeRecord, FIRST_USER_ID, PasswordGuard, PhoneGuard, Record, StoreError, StoredAccount,
    StoredSession, Tables, decode, encode,
};

const ACCOUNTS: TableDefinition<u64, &[u8]> = TableDefinition::new("accounts");
const PHONES: TableDefinition<&str, u64> = TableDefinition::new("phones");
/// Lower-cased username → user id.
const USERNAMES: TableDefinition<&str, u64> = TableDefinition::new("usernames");
const SESSIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("sessions");
/// Device peer id bytes → its latest session (kept after revocation, to say SESSION_REVOKED).
const DEVICES: TableDefinition<&[u8], u64> = TableDefinition::new("devices");
/// User id → active session ids.
const USER_SESSIONS: MultimapTableDefinition<u64, u64> = MultimapTableDefinition::new("user_sessions");
/// `"<phone> <device peer id>"` → the code that device asked for ([`CodeRecord`]): each device
/// guesses at its own code, so wrong guesses lock out the guessing device, not the phone.
const CODES: TableDefinition<&str, &[u8]> = TableDefinition::new("device_codes");
/// Codes keyed by phone alone, before they were per device: short-lived, dropped at open.
const LEGACY_CODES: TableDefinition<&str, &[u8]> = TableDefinition::new("codes");
/// Phone → its wrong codes from every device together, and lockout ([`PhoneGuard`]).
const PHONE_GUARDS: TableDefinition<&str, &[u8]> = TableDefinition::new("phone_guards");
/// Bot id → keyed hash of its token secret.
const BOT_SECRETS: TableDefinition<u64, &[u8]> = TableDefinition::new("bot_secrets");
/// Owner user id → bot ids.
const OWNER_BOTS: MultimapTableDefinition<u64, u64> = MultimapTableDefinition::new("owner_bots");
/// Sequence number → a signed revocation (postcard), kept while it matters.
const REVOCATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("revocations");
/// Relay peer id bytes → when its admission was revoked (kept for good).
const REVOKED_RELAYS: TableDefinition<&[u8], u64> = TableDefinition::new("revoked_relays");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// (user id, sequence number) → a sealed backup pointer ([`BackupRecord`]), oldest first.
const BACKUPS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("backups");
/// Bot id → the commands it lists (postcard `Vec<BotCommandInfo>`).
const BOT_COMMANDS: TableDefinition<u64, &[u8]> = TableDefinition::new("bot_commands");
/// Public channels' `@name`s (canonical, as usernames) → [`ChannelName`].
const CHANNEL_NAMES: TableDefinition<&str, &[u8]> = TableDefinition::new("channel_names");
/// User id → its wrong 2FA passwords and lockout ([`PasswordGuard`]).
const PASSWORD_GUARDS: TableDefinition<u64, &[u8]> = TableDefinition::new("password_guards");
const NEXT_USER_ID: &str = "next_user_id";
const NEXT_REVOCATION: &str = "next_revocation";
macro_rules! from_redb {
    ($($t:ty),*) => {$(impl From<$t> for StoreError {
        fn from(e: $t) -> Self { StoreError::Db(e.into()) }
    })*};
}
from_redb!(redb::DatabaseError, redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

/// A gateway database in a redb file.
#[derive(Debug)]
pub struct RedbStore {
    db: Database,
    /// Transactions committed (each a durable write), for tests of what costs one.
    commits: std::sync::atomic::AtomicU64,
}

impl RedbStore {
    /// Opens (or creates) the database file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        tx.delete_table(LEGACY_CODES)?;
        tx.commit()?;
        let store = RedbStore { db, commits: std::sync::atomic::AtomicU64::new(0) };
        // Create every table up front so read paths never meet a missing table.
        store.write(|_| Ok::<_, StoreError>(()))?;
        Ok(store)
    }

    /// Accounts (users and bots) and active sessions, for `/metrics`; a read transaction, so it
    /// never waits for a writer.
    pub fn counts(&self) -> Result<(u64, u64), StoreError> {
        use redb::{ReadableDatabase, ReadableTableMetadata};
        let tx = self.db.begin_read()?;
        Ok((tx.open_table(ACCOUNTS)?.len()?, tx.open_multimap_table(USER_SESSIONS)?.len()?))
    }

    /// Runs `f` in a write transaction; commits (durably) only if it returns `Ok`.
    pub fn write<T, E: From<StoreError>>(&self, mut f: impl FnMut(&mut dyn Tables) -> Result<T, E>) -> Result<T, E> {
        let tx = self.db.begin_write().map_err(StoreError::from)?;
        let out = {
            let mut tables = RedbTables::open(&tx)?;
            f(&mut tables)?
        };
        tx.commit().map_err(StoreError::from)?;
        self.commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(out)
    }

    /// Transactions committed since the store was opened.
    pub fn commits(&self) -> u64 {
        self.commits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `f` and discards whatever it wrote: for requests that only read.
    pub fn read<T, E: From<StoreError>>(&self, mut f: impl FnMut(&mut dyn Tables) -> Result<T, E>) -> Result<T, E> {
        let tx = self.db.begin_write().map_err(StoreError::from)?;
        let out = {
            let mut tables = RedbTables::open(&tx)?;
            f(&mut tables)
        };
        tx.abort().map_err(StoreError::from)?;
        out
    }
}

impl RedbStore {
    /// Hands every record to `sink`, from one read transaction: what `migrate` copies.
    pub fn export(&self, sink: &mut dyn FnMut(Record) -> Result<(), StoreError>) -> Result<(), StoreError> {
        use redb::ReadableDatabase;
        let tx = self.db.begin_read()?;
        for entry in tx.open_table(ACCOUNTS)?.iter()? {
            sink(Record::Account(decode("account", entry?.1.value())?))?;
        }
        for entry in tx.open_table(SESSIONS)?.iter()? {
            sink(Record::Session(decode("session", entry?.1.value())?))?;
        }
        for entry in tx.open_table(DEVICES)?.iter()? {
            let (device, session) = entry?;
            let device = PeerId::from_bytes(device.value())
                .map_err(|e| StoreError::Corrupt { what: "device", reason: e.to_string() })?;
            sink(Record::Device { device, session: SessionId(session.value()) })?;
        }
        for entry in tx.open_table(CODES)?.iter()? {
            let (key, record) = entry?;
            let corrupt = |reason: String| StoreError::Corrupt { what: "code key", reason };
            let (phone, device) = key.value().split_once(' ').ok_or_else(|| corrupt("no device".into()))?;
            sink(Record::Code {
                phone: phone.parse().map_err(|e: meshgram_node::ids::InvalidValue| corrupt(e.0))?,
                device: device.parse().map_err(|e: libp2p::identity::ParseError| corrupt(e.to_string()))?,
                record: decode("code", record.value())?,
            })?;
        }
        for entry in tx.open_table(PHONE_GUARDS)?.iter()? {
            let (phone, guard) = entry?;
            let phone = phone.value().parse().map_err(|e: meshgram_node::ids::InvalidValue| StoreError::Corrupt {
                what: "phone guard",
                reason: e.0,
            })?;
            sink(Record::PhoneGuard(phone, decode("phone guard", guard.value())?))?;
        }
        for entry in tx.open_table(PASSWORD_GUARDS)?.iter()? {
            let (user, guard) = entry?;
            sink(Record::PasswordGuard(UserId(user.value()), decode("password guard", guard.value())?))?;
        }
        let accounts = tx.open_table(ACCOUNTS)?;
        for entry in tx.open_table(BOT_SECRETS)?.iter()? {
            let (bot, hash) = entry?;
            let owner = match accounts.get(bot.value())? {
                Some(account) => decode::<StoredAccount>("account", account.value())?.owner,
                None => None,
            };
            let hash = hash
                .value()
                .try_into()
                .map_err(|_| StoreError::Corrupt { what: "bot secret", reason: "not 32 bytes".into() })?;
            sink(Record::BotSecret { bot: UserId(bot.value()), owner, hash })?;
        }
        for entry in tx.open_table(BOT_COMMANDS)?.iter()? {
            let (bot, commands) = entry?;
            sink(Record::BotCommands(UserId(bot.value()), decode("bot commands", commands.value())?))?;
        }
        for entry in tx.open_table(CHANNEL_NAMES)?.iter()? {
            let (name, channel) = entry?;
            let name = name.value().parse().map_err(|e: meshgram_node::ids::InvalidValue| StoreError::Corrupt {
                what: "channel name",
                reason: e.0,
            })?;
            sink(Record::ChannelName(name, decode("channel name", channel.value())?))?;
        }
        for entry in tx.open_table(BACKUPS)?.iter()? {
            let (key, record) = entry?;
            let (user, seq) = key.value();
            sink(Record::Backup { user: UserId(user), seq, record: decode("backup", record.value())? })?;
        }
        for entry in tx.open_table(REVOCATIONS)?.iter()? {
            let (seq, revocation) = entry?;
            sink(Record::Revocation { seq: seq.value(), revocation: decode("revocation", revocation.value())? })?;
        }
        for entry in tx.open_table(REVOKED_RELAYS)?.iter()? {
            let (relay, at) = entry?;
            let relay = PeerId::from_bytes(relay.value())
                .map_err(|e| StoreError::Corrupt { what: "revoked relay", reason: e.to_string() })?;
            sink(Record::RevokedRelay { relay, at: at.value() })?;
        }
        let meta = tx.open_table(META)?;
        sink(Record::NextUserId(meta.get(NEXT_USER_ID)?.map_or(FIRST_USER_ID, |v| v.value())))?;
        sink(Record::NextRevocation(meta.get(NEXT_REVOCATION)?.map_or(0, |v| v.value())))?;
        Ok(())
    }
}

/// The open tables of one transaction, with typed accessors.
#[allow(missing_debug_implementations)] // redb tables are not Debug
pub struct RedbTables<'t> {
    accounts: Table<'t, u64, &'static [u8]>,
    phones: Table<'t, &'static str, u64>,
    usernames: Table<'t, &'static str, u64>,
    sessions: Table<'t, u64, &'static [u8]>,
    devices: Table<'t, &'static [u8], u64>,
    user_sessions: MultimapTable<'t, u64, u64>,
    codes: Table<'t, &'static str, &'static [u8]>,
    bot_secrets: Table<'t, u64, &'static [u8]>,
    owner_bots: MultimapTable<'t, u64, u64>,
    revocations: Table<'t, u64, &'static [u8]>,
    revoked_relays: Table<'t, &'static [u8], u64>,
    meta: Table<'t, &'static str, u64>,
    backups: Table<'t, (u64, u64), &'static [u8]>,
    bot_commands: Table<'t, u64, &'static [u8]>,
    channel_names: Table<'t, &'static str, &'static [u8]>,
    password_guards: Table<'t, u64, &'static [u8]>,
    phone_guards: Table<'t, &'static str, &'static [u8]>,
}

/// A code record's key: the phone, then the device that asked (peer ids have no spaces).
fn code_key(phone: &Phone, device: &PeerId) -> String {
    format!("{} {device}", phone.as_str())
}

impl<'t> RedbTables<'t> {
    fn open(tx: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(RedbTables {
            accounts: tx.open_table(ACCOUNTS)?,
            phones: tx.open_table(PHONES)?,
            usernames: tx.open_table(USERNAMES)?,
            sessions: tx.open_table(SESSIONS)?,
            devices: tx.open_table(DEVICES)?,
            user_sessions: tx.open_multimap_table(USER_SESSIONS)?,
            codes: tx.open_table(CODES)?,
            bot_secrets: tx.open_table(BOT_SECRETS)?,
            owner_bots: tx.open_multimap_table(OWNER_BOTS)?,
            revocations: tx.open_table(REVOCATIONS)?,
            revoked_relays: tx.open_table(REVOKED_RELAYS)?,
            meta: tx.open_table(META)?,
            backups: tx.open_table(BACKUPS)?,
            bot_commands: tx.open_table(BOT_COMMANDS)?,
            channel_names: tx.open_table(CHANNEL_NAMES)?,
            password_guards: tx.open_table(PASSWORD_GUARDS)?,
            phone_guards: tx.open_table(PHONE_GUARDS)?,
        })
    }
}

impl Tables for RedbTables<'_> {
    // ---- accounts ----

    /// The account, if it exists.
    fn account(&mut self, id: UserId) -> Result<Option<StoredAccount>, StoreError> {
        self.accounts.get(id.0)?.map(|v| decode("account", v.value())).transpose()
    }

    /// Account by phone.
    fn account_by_phone(&mut self, phone: &Phone) -> Result<Option<StoredAccount>, StoreError> {
        let id = self.phones.get(phone.as_str())?.map(|v| v.value());
        match id {
            Some(id) => self.account(UserId(id)),
            None => Ok(None),
        }
    }

    /// Account by username, case-insensitively.
    fn account_by_username(&mut self, username: &Username) -> Result<Option<StoredAccount>, StoreError> {
        let id = self.usernames.get(username.canonical().as_str())?.map(|v| v.value());
        match id {
            Some(id) => self.account(UserId(id)),
            None => Ok(None),
        }
    }

    /// Allocates the next user id.
    fn next_user_id(&mut self) -> Result<UserId, StoreError> {
        let id = self.meta.get(NEXT_USER_ID)?.map_or(FIRST_USER_ID, |v| v.value());
        self.meta.insert(NEXT_USER_ID, id + 1)?;
        Ok(UserId(id))
    }

    /// Inserts or updates an account and its phone/username indexes. The caller has checked
    /// that a new username is free.
    fn put_account(&mut self, account: &StoredAccount) -> Result<(), StoreError> {
        if let Some(old) = self.account(account.user_id)?
            && let Some(old_name) = old.username
            && Some(&old_name) != account.username.as_ref()
        {
            self.usernames.remove(old_name.canonical().as_str())?;
        }
        if let Some(name) = &account.username {
            self.usernames.insert(name.canonical().as_str(), account.user_id.0)?;
        }
        if let Some(phone) = &account.phone {
            self.phones.insert(phone.as_str(), account.user_id.0)?;
        }
        self.accounts.insert(account.user_id.0, encode(account).as_slice())?;
        Ok(())
    }

    /// Who holds this username, if anyone.
    fn username_holder(&mut self, username: &Username) -> Result<Option<UserId>, StoreError> {
        Ok(self.usernames.get(username.canonical().as_str())?.map(|v| UserId(v.value())))
    }

    // ---- sessions ----

    /// The session, revoked or not.
    fn session(&mut self, id: SessionId) -> Result<Option<StoredSession>, StoreError> {
        self.sessions.get(id.0)?.map(|v| decode("session", v.value())).transpose()
    }

    /// The latest session of a device, revoked or not.
    fn session_of_device(&mut self, device: &PeerId) -> Result<Option<StoredSession>, StoreError> {
        let id = self.devices.get(device.to_bytes().as_slice())?.map(|v| v.value());
        match id {
            Some(id) => self.session(SessionId(id)),
            None => Ok(None),
        }
    }

    /// Stores a session; active ones are indexed under their user and device.
    fn put_session(&mut self, session: &StoredSession) -> Result<(), StoreError> {
        self.sessions.insert(session.session_id.0, encode(session).as_slice())?;
        self.devices.insert(session.device.to_bytes().as_slice(), session.session_id.0)?;
        if session.revoked_at.is_none() {
            self.user_sessions.insert(session.user_id.0, session.session_id.0)?;
        } else {
            self.user_sessions.remove(session.user_id.0, session.session_id.0)?;
        }
        Ok(())
    }

    /// Active sessions of a user.
    fn active_sessions(&mut self, user: UserId) -> Result<Vec<StoredSession>, StoreError> {
        let ids = self.user_sessions.get(user.0)?.map(|id| Ok(id?.value())).collect::<Result<Vec<_>, StoreError>>()?;
        let mut out = Vec::new();
        for id in ids {
            if let Some(s) = self.session(SessionId(id))? {
                out.push(s);
            }
        }
        Ok(out)
    }

    // ---- login codes ----

    /// The account's guard against password guessing (none: no wrong password lately).
    fn password_guard(&mut self, user: UserId) -> Result<PasswordGuard, StoreError> {
        Ok(self
            .password_guards
            .get(user.0)?
            .map(|v| decode("password guard", v.value()))
            .transpose()?
            .unwrap_or_default())
    }

    /// Stores it (the default removes it).
    fn put_password_guard(&mut self, user: UserId, guard: &PasswordGuard) -> Result<(), StoreError> {
        if *guard == PasswordGuard::default() {
            self.password_guards.remove(user.0)?;
        } else {
            self.password_guards.insert(user.0, encode(guard).as_slice())?;
        }
        Ok(())
    }

    /// The phone's guard against code guessing from many devices at once.
    fn phone_guard(&mut self, phone: &Phone) -> Result<PhoneGuard, StoreError> {
        Ok(self
            .phone_guards
            .get(phone.as_str())?
            .map(|v| decode("phone guard", v.value()))
            .transpose()?
            .unwrap_or_default())
    }

    /// Stores it (the default removes it).
    fn put_phone_guard(&mut self, phone: &Phone, guard: &PhoneGuard) -> Result<(), StoreError> {
        if *guard == PhoneGuard::default() {
            self.phone_guards.remove(phone.as_str())?;
        } else {
            self.phone_guards.insert(phone.as_str(), encode(guard).as_slice())?;
        }
        Ok(())
    }

    /// The code `device` asked for `phone`.
    fn code(&mut self, phone: &Phone, device: &PeerId) -> Result<Option<CodeRecord>, StoreError> {
        self.codes.get(code_key(phone, device).as_str())?.map(|v| decode("code", v.value())).transpose()
    }

    /// Stores the code record of `device` for `phone`.
    fn put_code(&mut self, phone: &Phone, device: &PeerId, record: &CodeRecord) -> Result<(), StoreError> {
        self.codes.insert(code_key(phone, device).as_str(), encode(record).as_slice())?;
        Ok(())
    }

    /// Deletes the code record of `device` for `phone` (used, or undeliverable).
    fn remove_code(&mut self, phone: &Phone, device: &PeerId) -> Result<(), StoreError> {
        self.codes.remove(code_key(phone, device).as_str())?;
        Ok(())
    }

    /// Deletes `phone`'s code records that `stale` says are of no more use (expired, and any
    /// lockout over), whichever devices asked for them.
    fn remove_stale_codes(&mut self, phone: &Phone, stale: &dyn Fn(&CodeRecord) -> bool) -> Result<(), StoreError> {
        // Keys are "<phone> <device>": the phone's run ends before "<phone>!" (' ' < '!').
        let (from, to) = (format!("{} ", phone.as_str()), format!("{}!", phone.as_str()));
        let mut gone = Vec::new();
        for entry in self.codes.range(from.as_str()..to.as_str())? {
            let (key, value) = entry?;
            if stale(&decode("code", value.value())?) {
                gone.push(key.value().to_string());
            }
        }
        for key in gone {
            self.codes.remove(key.as_str())?;
        }
        Ok(())
    }

    // ---- backups ----

    /// Adds a backup pointer for `user` and drops all but the newest `keep`.
    fn put_backup(&mut self, user: UserId, record: &BackupRecord, keep: usize) -> Result<(), StoreError> {
        let last = self.backups.range((user.0, 0)..=(user.0, u64::MAX))?.next_back().transpose()?;
        let next = last.map_or(0, |(k, _)| k.value().1 + 1);
        self.backups.insert((user.0, next), encode(record).as_slice())?;
        let mut old = Vec::new();
        for entry in self.backups.range((user.0, 0)..=(user.0, u64::MAX))?.rev().skip(keep) {
            old.push(entry?.0.value());
        }
        for key in old {
            self.backups.remove(key)?;
        }
        Ok(())
    }

    /// A user's backup pointers, newest first.
    fn backups(&mut self, user: UserId) -> Result<Vec<BackupRecord>, StoreError> {
        let mut out = Vec::new();
        for entry in self.backups.range((user.0, 0)..=(user.0, u64::MAX))?.rev() {
            out.push(decode("backup", entry?.1.value())?);
        }
        Ok(out)
    }

    // ---- bots ----

    /// Replaces the commands a bot lists (none: removed).
    fn put_bot_commands(&mut self, bot: UserId, commands: &[BotCommandInfo]) -> Result<(), StoreError> {
        if commands.is_empty() {
            self.bot_commands.remove(bot.0)?;
        } else {
            self.bot_commands.insert(bot.0, encode(&commands).as_slice())?;
        }
        Ok(())
    }

    /// The public channel named `name`, if one is.
    fn channel_name(&mut self, name: &Username) -> Result<Option<ChannelName>, StoreError> {
        self.channel_names.get(name.canonical().as_str())?.map(|v| decode("channel name", v.value())).transpose()
    }

    /// Names a public channel. The caller has checked that the name is free or already theirs.
    fn put_channel_name(&mut self, name: &Username, channel: &ChannelName) -> Result<(), StoreError> {
        self.channel_names.insert(name.canonical().as_str(), encode(channel).as_slice())?;
        Ok(())
    }

    /// Frees a channel's name (for any account or channel to take).
    fn remove_channel_name(&mut self, name: &Username) -> Result<(), StoreError> {
        self.channel_names.remove(name.canonical().as_str())?;
        Ok(())
    }

    /// The commands a bot lists.
    fn bot_commands(&mut self, bot: UserId) -> Result<Vec<BotCommandInfo>, StoreError> {
        self.bot_commands.get(bot.0)?.map_or(Ok(Vec::new()), |v| decode("bot commands", v.value()))
    }

    /// The keyed hash of a bot's token secret.
    fn bot_secret(&mut self, bot: UserId) -> Result<Option<[u8; 32]>, StoreError> {
        self.bot_secrets
            .get(bot.0)?
            .map(|v| {
                v.value()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt { what: "bot secret", reason: "not 32 bytes".into() })
            })
            .transpose()
    }

    /// Sets a bot's token hash and records its owner.
    fn put_bot_secret(&mut self, bot: UserId, owner: Option<UserId>, hash: &[u8; 32]) -> Result<(), StoreError> {
        self.bot_secrets.insert(bot.0, hash.as_slice())?;
        if let Some(owner) = owner {
            self.owner_bots.insert(owner.0, bot.0)?;
        }
        Ok(())
    }

    /// Bots created by `owner`.
    fn bots_of(&mut self, owner: UserId) -> Result<Vec<StoredAccount>, StoreError> {
        let ids = self.owner_bots.get(owner.0)?.map(|id| Ok(id?.value())).collect::<Result<Vec<_>, StoreError>>()?;
        let mut out = Vec::new();
        for id in ids {
            if let Some(a) = self.account(UserId(id))? {
                out.push(a);
            }
        }
        Ok(out)
    }

    /// Every bot account (for the operator's list).
    fn all_bots(&mut self) -> Result<Vec<StoredAccount>, StoreError> {
        let ids = self.bot_secrets.iter()?.map(|entry| Ok(entry?.0.value())).collect::<Result<Vec<_>, StoreError>>()?;
        let mut out = Vec::new();
        for id in ids {
            if let Some(a) = self.account(UserId(id))? {
                out.push(a);
            }
        }
        Ok(out)
    }

    // ---- revocations ----

    /// Appends a revocation; returns its sequence number (they only grow).
    fn add_revocation(&mut self, revocation: &Revocation) -> Result<u64, StoreError> {
        let seq = self.next_revocation_seq()?;
        self.meta.insert(NEXT_REVOCATION, seq + 1)?;
        self.revocations.insert(seq, encode(revocation).as_slice())?;
        Ok(seq)
    }

    /// The sequence number the next revocation will get.
    fn next_revocation_seq(&mut self) -> Result<u64, StoreError> {
        Ok(self.meta.get(NEXT_REVOCATION)?.map(|v| v.value()).unwrap_or(0))
    }

    /// Up to `limit` revocations from sequence number `since` on, with their numbers.
    fn revocations_since(&mut self, since: u64, limit: usize) -> Result<Vec<(u64, Revocation)>, StoreError> {
        let mut out = Vec::new();
        for entry in self.revocations.range(since..)?.take(limit) {
            let (seq, value) = entry?;
            out.push((seq.value(), decode("revocation", value.value())?));
        }
        Ok(out)
    }

    /// Deletes the revocations that no longer matter at `now` (every certificate they end has
    /// expired); returns how many.
    fn prune_revocations(&mut self, now: u64) -> Result<usize, StoreError> {
        let mut expired = Vec::new();
        for entry in self.revocations.iter()? {
            let (seq, value) = entry?;
            let revocation: Revocation = decode("revocation", value.value())?;
            if revocation.body.until < now {
                expired.push(seq.value());
            }
        }
        for seq in &expired {
            self.revocations.remove(seq)?;
        }
        Ok(expired.len())
    }

    /// When `relay`'s admission was revoked, if it was.
    fn relay_revoked_at(&mut self, relay: &PeerId) -> Result<Option<u64>, StoreError> {
        Ok(self.revoked_relays.get(relay.to_bytes().as_slice())?.map(|v| v.value()))
    }

    /// Records that `relay`'s admission was revoked at `at`.
    fn put_revoked_relay(&mut self, relay: &PeerId, at: u64) -> Result<(), StoreError> {
        self.revoked_relays.insert(relay.to_bytes().as_slice(), at)?;
        Ok(())
    }
}
