//! The shared backend: the gateway's tables in PostgreSQL, for several gateways at once.
//!
//! Each request is one SERIALIZABLE transaction. When the database says it lost a race with
//! another transaction (serialization failure, deadlock, or a unique key taken meanwhile) the
//! request runs again from the start, so two gateways can never both hand out one username,
//! one phone's account or one login code. When the connection is lost before the commit
//! (the primary died, or was demoted), the request runs again on a new connection, which
//! `target_session_attrs=read-write` points at the new primary; a connection lost *during* the
//! commit leaves the outcome unknown, and the request fails as unavailable.
//!
//! Unique usernames and phones are constraints, user ids come from a sequence, and values are
//! the same postcard records as in redb, next to the columns that index them. Connections over
//! TCP use TLS (rustls) when the server offers it, and must with `sslmode=require`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use meshgram_node::crypto::cert::Revocation;
use meshgram_node::ids::{Phone, SessionId, UserId, Username};
use meshgram_node::proto::{BackupRecord, BotCommandInfo};
use meshgram_node::server::limits::RateLimiter;
use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, Config, IsolationLevel, Row, Statement, Transaction};
use serde::de::DeserializeOwned;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{
    ChannelName, CodeRecord, FIRST_USER_ID, PasswordGuard, PhoneGuard, Record, StoreError, StoredAccount,
    StoredSession, Tables, decode, encode,
};

/// Connections one gateway keeps open at most (PostgreSQL allows 100 by default, for every
/// gateway together).
const MAX_CONNECTIONS: usize = 16;
/// How long a request may wait for a connection, or for the database to come back after a
/// failover, before it fails as unavailable (and the client retries).
const UNAVAILABLE_AFTER: Duration = Duration::from_secs(10);
/// Connecting to one host gives up after this (a dead host, not a slow query).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Races lost in a row before a request gives up: far more than contention between a few
/// gateways produces.
const MAX_CONFLICTS: u32 = 50;
/// Races lost in a row to one key inserted meanwhile (23505) before it counts as a real
/// duplicate: a retry sees the other's row and takes another path, so a second one is a bug.
const MAX_DUPLICATES: u32 = 3;
/// Server-side bounds, so that a statement or lock that hangs (a partitioned primary, a stuck
/// transaction elsewhere) fails as unavailable instead of holding a request and a connection.
const SESSION_OPTIONS: &str =
    "-c statement_timeout=5000 -c lock_timeout=3000 -c idle_in_transaction_session_timeout=30000";
/// A dead peer on an open connection is noticed after this (TCP keepalive and user timeout).
const DEAD_PEER_AFTER: Duration = Duration::from_secs(5);
/// Serializes schema creation between gateways starting at once (any fixed number).
const SCHEMA_LOCK: i64 = 0x6d65_7368_6772_616d; // "meshgram"

const SCHEMA: &str = "
SET LOCAL client_min_messages = warning; -- no notice per table that exists already
CREATE TABLE IF NOT EXISTS accounts (
    user_id BIGINT PRIMARY KEY,
    phone TEXT UNIQUE,
    username TEXT UNIQUE,          -- canonical (lower-case)
    record BYTEA NOT NULL
);
CREATE SEQUENCE IF NOT EXISTS user_ids START 1000001;
CREATE TABLE IF NOT EXISTS sessions (
    session_id BIGINT PRIMARY KEY, -- the random u64, bit for bit
    user_id BIGINT NOT NULL,
    active BOOLEAN NOT NULL,
    record BYTEA NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_active ON sessions (user_id) WHERE active;
CREATE TABLE IF NOT EXISTS devices (
    device BYTEA PRIMARY KEY,      -- peer id bytes
    session_id BIGINT NOT NULL     -- its latest session
);
CREATE TABLE IF NOT EXISTS codes (
    phone TEXT NOT NULL,
    device TEXT NOT NULL,
    record BYTEA NOT NULL,
    PRIMARY KEY (phone, device)
);
CREATE TABLE IF NOT EXISTS phone_guards (phone TEXT PRIMARY KEY, record BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS password_guards (user_id BIGINT PRIMARY KEY, record BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS bot_secrets (bot_id BIGINT PRIMARY KEY, owner BIGINT, hash BYTEA NOT NULL);
CREATE INDEX IF NOT EXISTS bot_secrets_owner ON bot_secrets (owner);
CREATE TABLE IF NOT EXISTS bot_commands (bot_id BIGINT PRIMARY KEY, record BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS channel_names (name TEXT PRIMARY KEY, record BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS backups (
    user_id BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    record BYTEA NOT NULL,
    PRIMARY KEY (user_id, seq)
);
CREATE TABLE IF NOT EXISTS revocations (seq BIGINT PRIMARY KEY, until_at BIGINT NOT NULL, record BYTEA NOT NULL);
CREATE INDEX IF NOT EXISTS revocations_until ON revocations (until_at);
CREATE TABLE IF NOT EXISTS revoked_relays (relay BYTEA PRIMARY KEY, at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS rate_limits (
    name TEXT NOT NULL,
    key TEXT NOT NULL,
    tokens DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (name, key)
);
";

/// Every table that holds gateway data (what `migrate` requires empty).
const DATA_TABLES: &[&str] = &[
    "accounts",
    "sessions",
    "devices",
    "codes",
    "phone_guards",
    "password_guards",
    "bot_secrets",
    "bot_commands",
    "channel_names",
    "backups",
    "revocations",
    "revoked_relays",
    "counters",
];

const NEXT_REVOCATION: &str = "next_revocation";

/// A gateway database in PostgreSQL, with this gateway's connections to it.
pub struct PgStore {
    config: Config,
    /// TLS for connections over TCP (`sslmode` decides whether it is required; unix sockets
    /// never use it).
    tls: MakeRustlsConnect,
    pool: Mutex<Pool>,
    /// Signalled when a connection is given back or closed.
    freed: Condvar,
    commits: AtomicU64,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("hosts", &self.config.get_hosts()).finish_non_exhaustive()
    }
}

impl Drop for PgStore {
    /// Closing a connection runs the client's own runtime, which must not happen on an async
    /// thread (where the last reference to a store may well be dropped): close them on a
    /// thread of their own.
    fn drop(&mut self) {
        let idle = std::mem::take(&mut self.lock().idle);
        if !idle.is_empty() {
            let _ = std::thread::spawn(move || drop(idle)).join();
        }
    }
}

#[derive(Default)]
struct Pool {
    idle: Vec<Connection>,
    /// Connections open, idle or lent out.
    open: usize,
}

/// A connection and the statements prepared on it.
struct Connection {
    client: Client,
    statements: HashMap<&'static str, Statement>,
}

/// How a statement failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Lost a race with another transaction: run the request again.
    Conflict,
    /// A key inserted meanwhile by another transaction: run again, a few times at most.
    Duplicate,
    /// A prepared statement this connection cached no longer fits (the schema changed, or
    /// the server forgot it): forget them all and run again.
    StaleStatement,
    /// The connection (or the primary behind it) is gone: run it again on a new one.
    Lost,
    /// Anything else: the request fails.
    Fatal,
}

fn classify(e: &postgres::Error) -> Failure {
    if e.is_closed() {
        return Failure::Lost;
    }
    let Some(code) = e.code() else {
        // No SQLSTATE: a socket that failed (refused, reset, timed out) may pass; a TLS
        // failure (a certificate nobody here trusts) and anything else (a value that does not
        // convert, a bad configuration) will not.
        let io = std::error::Error::source(e).and_then(|source| source.downcast_ref::<std::io::Error>());
        return match io {
            Some(io) if io.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) => Failure::Fatal,
            Some(_) => Failure::Lost,
            None => Failure::Fatal,
        };
    };
    if *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED {
        Failure::Conflict
    } else if *code == SqlState::UNIQUE_VIOLATION {
        Failure::Duplicate
    } else if *code == SqlState::INVALID_SQL_STATEMENT_NAME || *code == SqlState::FEATURE_NOT_SUPPORTED {
        Failure::StaleStatement
    } else if *code == SqlState::READ_ONLY_SQL_TRANSACTION
        || *code == SqlState::ADMIN_SHUTDOWN
        || *code == SqlState::CRASH_SHUTDOWN
        || *code == SqlState::CANNOT_CONNECT_NOW
        || *code == SqlState::TOO_MANY_CONNECTIONS
        || *code == SqlState::QUERY_CANCELED
        || *code == SqlState::LOCK_NOT_AVAILABLE
        || code.code().starts_with("08")
    {
        // A demoted primary, a server shutting down, starting up or full, a broken
        // connection, a statement or lock past its timeout: all may pass.
        Failure::Lost
    } else {
        Failure::Fatal
    }
}

fn pg_error(e: &postgres::Error) -> StoreError {
    // The client's own errors say what failed ("error performing TLS handshake") and leave
    // why ("invalid peer certificate: UnknownIssuer") to their source.
    let said = match (e.as_db_error(), std::error::Error::source(e)) {
        (Some(db), _) => format!("{}: {}", db.code().code(), db.message()),
        (None, Some(source)) => format!("{e}: {source}"),
        (None, None) => e.to_string(),
    };
    match classify(e) {
        Failure::Lost => StoreError::Unavailable(said),
        _ => StoreError::Postgres(said),
    }
}

impl PgStore {
    /// Connects to the database at `url` (a libpq-style URL or key=value string, several
    /// hosts allowed) and creates the gateway's tables if they are missing. Over TCP the
    /// server's certificate must chain to `ca` (PEM), or without it to the usual public roots;
    /// `sslmode=require` in `url` refuses a server without TLS.
    pub fn connect(url: &str, ca: Option<&Path>) -> Result<Self, StoreError> {
        let tls = tls_connector(ca)?;
        let mut config: Config =
            url.parse().map_err(|e| StoreError::Postgres(format!("the database URL does not parse: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("meshgram-gateway");
        }
        let options = match config.get_options() {
            Some(theirs) => format!("{SESSION_OPTIONS} {theirs}"),
            None => SESSION_OPTIONS.to_string(),
        };
        config.options(&options).keepalives(true).keepalives_idle(DEAD_PEER_AFTER).tcp_user_timeout(DEAD_PEER_AFTER);
        let store = PgStore { config, tls, pool: Mutex::default(), freed: Condvar::new(), commits: AtomicU64::new(0) };
        {
            let mut connection = store.connection(Instant::now())?;
            let mut tx = connection.client().transaction().map_err(|e| pg_error(&e))?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK]).map_err(|e| pg_error(&e))?;
            tx.batch_execute(SCHEMA).map_err(|e| pg_error(&e))?;
            tx.commit().map_err(|e| pg_error(&e))?;
        }
        Ok(store)
    }

    /// Runs `f` in a serializable transaction, committed if `commit` and `f` returned `Ok`,
    /// again from the start after a lost race or a lost connection (see the module docs).
    pub(super) fn transaction<T, E: From<StoreError>>(
        &self,
        commit: bool,
        mut f: impl FnMut(&mut dyn Tables) -> Result<T, E>,
    ) -> Result<T, E> {
        self.run(IsolationLevel::Serializable, commit, |t| f(t))
    }

    fn run<T, E: From<StoreError>>(
        &self,
        isolation: IsolationLevel,
        commit: bool,
        mut f: impl FnMut(&mut PgTables<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let started = Instant::now();
        let (mut conflicts, mut duplicates) = (0, 0);
        loop {
            let mut connection = self.connection(started)?;
            let (failure, error) = match connection.attempt(isolation, commit, &mut f) {
                Ok(Ok(out)) => {
                    if commit {
                        self.commits.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(out);
                }
                Ok(Err(e)) => return Err(e),
                Err(failed) => failed,
            };
            match failure {
                Failure::Duplicate if duplicates < MAX_DUPLICATES => duplicates += 1,
                Failure::Conflict | Failure::StaleStatement if conflicts < MAX_CONFLICTS => {
                    if failure == Failure::StaleStatement {
                        connection.forget_statements();
                    }
                    conflicts += 1;
                    // Step aside for a moment, longer each time, so the winner can finish; the
                    // connection goes back first, for others to use meanwhile.
                    drop(connection);
                    std::thread::sleep(Duration::from_micros(200 * u64::from(conflicts)));
                }
                Failure::Conflict | Failure::StaleStatement => {
                    return Err(StoreError::Unavailable(format!("{conflicts} lost races in a row: {error}")).into());
                }
                Failure::Lost if started.elapsed() < UNAVAILABLE_AFTER => {
                    connection.discard();
                    std::thread::sleep(Duration::from_millis(100));
                }
                Failure::Lost => {
                    connection.discard();
                    return Err(error.into());
                }
                Failure::Duplicate | Failure::Fatal => return Err(error.into()),
            }
        }
    }

    /// Accounts and active sessions.
    pub(super) fn counts(&self) -> Result<(u64, u64), StoreError> {
        // Read committed: counting whole tables serializably would make sign-ins running
        // meanwhile lose races to a metrics scrape.
        self.run(IsolationLevel::ReadCommitted, false, |t| {
            let row = t.query_one(
                "SELECT (SELECT count(*) FROM accounts), (SELECT count(*) FROM sessions WHERE active)",
                &[],
            )?;
            Ok((unsigned(t.column::<i64>(&row, 0)?), unsigned(t.column::<i64>(&row, 1)?)))
        })
    }

    pub(super) fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Takes a token for `key` from the bucket of `limiter` named `name`, kept in the
    /// database for every gateway to share. Read committed with the bucket's row locked: takes
    /// of one key queue on the lock instead of failing each other's transactions.
    pub(super) fn take_token(
        &self,
        limiter: &RateLimiter,
        name: &'static str,
        key: &str,
        now: u64,
    ) -> Result<Result<(), u64>, StoreError> {
        let now = now as f64;
        let taken = self.run(IsolationLevel::ReadCommitted, true, |t| {
            t.execute(
                "INSERT INTO rate_limits (name, key, tokens, updated) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name, key) DO NOTHING",
                &[&name, &key, &limiter.refilled(None, now), &now],
            )?;
            let row = t.query_one(
                "SELECT tokens, updated FROM rate_limits WHERE name = $1 AND key = $2 FOR UPDATE",
                &[&name, &key],
            )?;
            let (tokens, updated) = (t.column::<f64>(&row, 0)?, t.column::<f64>(&row, 1)?);
            // Gateways' clocks differ a little: a bucket never goes back in time, or each
            // round trip between a fast and a slow gateway would refill it for free.
            let at = now.max(updated);
            let tokens = limiter.refilled(Some((tokens, updated)), at);
            if tokens < 1.0 {
                return Ok(Err(limiter.secs_until(1.0 - tokens)));
            }
            t.execute(
                "UPDATE rate_limits SET tokens = $3, updated = $4 WHERE name = $1 AND key = $2",
                &[&name, &key, &(tokens - 1.0), &at],
            )?;
            Ok::<_, StoreError>(Ok(()))
        })?;
        // Buckets full again say nothing: now and then, drop them, in a transaction of its own.
        if rand::random::<u8>() == 0 {
            let full_since = now - limiter.secs_until(limiter.refilled(None, now)) as f64;
            let _dropped = self.run(IsolationLevel::ReadCommitted, true, |t| {
                t.execute("DELETE FROM rate_limits WHERE name = $1 AND updated < $2", &[&name, &full_since])
            })?;
        }
        Ok(taken)
    }

    /// Copies every record of `source` into this database, which must hold no gateway data;
    /// returns how many were copied. One transaction: a failed copy leaves nothing behind.
    pub fn migrate_from(&self, source: &super::RedbStore) -> Result<u64, StoreError> {
        self.run(IsolationLevel::Serializable, true, |t| {
            for table in DATA_TABLES {
                // Table names come from the constant list above, not from input.
                let sql = format!("SELECT EXISTS (SELECT 1 FROM {table})");
                let row = t.tx.query_one(sql.as_str(), &[]).map_err(|e| t.failed(&e))?;
                if t.column::<bool>(&row, 0)? {
                    return Err(StoreError::NotEmpty { table });
                }
            }
            let mut copied = 0;
            source.export(&mut |record| {
                t.import(&record)?;
                copied += 1;
                Ok(())
            })?;
            Ok(copied)
        })
    }

    /// A connection: an idle one, a new one while fewer than [`MAX_CONNECTIONS`] are open, or
    /// the next one given back. Waits, and retries connecting, until [`UNAVAILABLE_AFTER`]
    /// from `started`.
    fn connection(&self, started: Instant) -> Result<Lent<'_>, StoreError> {
        let mut pool = self.lock();
        loop {
            if let Some(connection) = pool.idle.pop() {
                if connection.client.is_closed() {
                    pool.open -= 1;
                    continue;
                }
                return Ok(Lent { store: self, connection: Some(connection) });
            }
            if pool.open < MAX_CONNECTIONS {
                pool.open += 1;
                drop(pool);
                match self.config.connect(self.tls.clone()) {
                    Ok(client) => {
                        let connection = Connection { client, statements: HashMap::new() };
                        return Ok(Lent { store: self, connection: Some(connection) });
                    }
                    Err(e) => {
                        self.closed();
                        if classify(&e) != Failure::Lost || started.elapsed() >= UNAVAILABLE_AFTER {
                            return Err(pg_error(&e));
                        }
                        tracing::warn!(error = %e, "cannot reach the database; trying again");
                        std::thread::sleep(Duration::from_millis(200));
                        pool = self.lock();
                        continue;
                    }
                }
            }
            let left = UNAVAILABLE_AFTER.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(StoreError::Unavailable(format!("all {MAX_CONNECTIONS} database connections are busy")));
            }
            pool = self.freed.wait_timeout(pool, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A lent connection was closed (or never opened).
    fn closed(&self) {
        self.lock().open -= 1;
        self.freed.notify_one();
    }
}

/// The TLS client for connections to the database: roots from the PEM file `ca`, else the
/// public ones (webpki-roots).
fn tls_connector(ca: Option<&Path>) -> Result<MakeRustlsConnect, StoreError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let bad = |why: String| StoreError::Postgres(format!("database CA file {}: {why}", path.display()));
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
                roots.add(cert.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(bad("no certificate in it".into()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    // The workspace has two crypto providers (ring and aws-lc-rs): name one.
    let config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| StoreError::Postgres(format!("TLS setup: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// A connection lent to one request; given back to the pool when dropped.
struct Lent<'s> {
    store: &'s PgStore,
    connection: Option<Connection>,
}

impl Lent<'_> {
    fn client(&mut self) -> &mut Client {
        &mut self.connection.as_mut().expect("invariant: lent until dropped or discarded").client
    }

    /// One try at `f` in a transaction. `Err` says why the try failed, if running it again may help.
    fn attempt<T, E: From<StoreError>>(
        &mut self,
        isolation: IsolationLevel,
        commit: bool,
        f: &mut impl FnMut(&mut PgTables<'_>) -> Result<T, E>,
    ) -> Result<Result<T, E>, (Failure, StoreError)> {
        let connection = self.connection.as_mut().expect("invariant: lent until dropped or discarded");
        let tx = connection
            .client
            .build_transaction()
            .isolation_level(isolation)
            .start()
            .map_err(|e| (classify(&e), pg_error(&e)))?;
        let mut tables = PgTables { tx, statements: &mut connection.statements, failure: None };
        let out = f(&mut tables);
        // After a failed statement the transaction is aborted, whatever `f` made of the error:
        // it is rolled back (by the drop), never reported as committed.
        match tables.failure.take() {
            Some((Failure::Fatal, e)) => return Ok(Err(e.into())),
            Some(failure) => return Err(failure),
            None => {}
        }
        let out = match out {
            Ok(out) => out,
            Err(e) => return Ok(Err(e)),
        };
        let ended = if commit { tables.tx.commit() } else { tables.tx.rollback() };
        match ended {
            Ok(()) => Ok(Ok(out)),
            Err(e) => match classify(&e) {
                // The commit may or may not have happened: never run the request twice.
                Failure::Lost if commit => Ok(Err(StoreError::Unavailable(format!(
                    "the database connection failed while committing ({e}); the request may or may not have \
                     taken effect"
                ))
                .into())),
                failure => Err((failure, pg_error(&e))),
            },
        }
    }

    /// Drops the statements prepared on this connection (they will be prepared again).
    fn forget_statements(&mut self) {
        if let Some(connection) = &mut self.connection {
            connection.statements.clear();
        }
    }

    /// Closes the connection instead of giving it back.
    fn discard(&mut self) {
        if self.connection.take().is_some() {
            self.store.closed();
        }
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take() {
            let mut pool = self.store.lock();
            if connection.client.is_closed() {
                pool.open -= 1;
            } else {
                pool.idle.push(connection);
            }
            drop(pool);
            self.store.freed.notify_one();
        }
    }
}

/// Ids are u64s; PostgreSQL has signed BIGINTs. Stored bit for bit (session ids are random).
fn signed(v: u64) -> i64 {
    v as i64
}

fn unsigned(v: i64) -> u64 {
    v as u64
}

/// A time or a bound that may be "forever" (u64::MAX): clamped, so that order is kept.
fn clamped(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The tables of one PostgreSQL transaction.
#[allow(missing_debug_implementations)] // a transaction is not Debug
pub struct PgTables<'c> {
    tx: Transaction<'c>,
    statements: &'c mut HashMap<&'static str, Statement>,
    /// The first failed statement's kind and error: after one, the transaction is aborted.
    failure: Option<(Failure, StoreError)>,
}

impl PgTables<'_> {
    /// Records a failed statement and says what went wrong.
    fn failed(&mut self, e: &postgres::Error) -> StoreError {
        if self.failure.is_none() {
            self.failure = Some((classify(e), pg_error(e)));
        }
        pg_error(e)
    }

    fn statement(&mut self, sql: &'static str) -> Result<Statement, StoreError> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.tx.prepare(sql).map_err(|e| self.failed(&e))?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }

    fn query(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, StoreError> {
        let statement = self.statement(sql)?;
        self.tx.query(&statement, params).map_err(|e| self.failed(&e))
    }

    fn query_opt(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>, StoreError> {
        let statement = self.statement(sql)?;
        self.tx.query_opt(&statement, params).map_err(|e| self.failed(&e))
    }

    fn query_one(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<Row, StoreError> {
        let statement = self.statement(sql)?;
        self.tx.query_one(&statement, params).map_err(|e| self.failed(&e))
    }

    fn execute(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        let statement = self.statement(sql)?;
        self.tx.execute(&statement, params).map_err(|e| self.failed(&e))
    }

    fn column<'r, T: postgres::types::FromSql<'r>>(&self, row: &'r Row, index: usize) -> Result<T, StoreError> {
        row.try_get(index).map_err(|e| StoreError::Corrupt { what: "column", reason: e.to_string() })
    }

    /// The postcard record in the first column of each row.
    fn records<T: DeserializeOwned>(
        &mut self,
        what: &'static str,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<T>, StoreError> {
        let rows = self.query(sql, params)?;
        rows.iter().map(|row| decode(what, self.column::<&[u8]>(row, 0)?)).collect()
    }

    fn record<T: DeserializeOwned>(
        &mut self,
        what: &'static str,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<T>, StoreError> {
        match self.query_opt(sql, params)? {
            Some(row) => Ok(Some(decode(what, self.column::<&[u8]>(&row, 0)?)?)),
            None => Ok(None),
        }
    }

    fn set_counter(&mut self, name: &'static str, value: u64) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO counters (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
            &[&name, &signed(value)],
        )?;
        Ok(())
    }

    /// Writes one record copied from another database.
    fn import(&mut self, record: &Record) -> Result<(), StoreError> {
        match record {
            Record::Account(account) => self.put_account(account),
            Record::Session(session) => self.put_session_row(session),
            Record::Device { device, session } => self.put_device(device, *session),
            Record::Code { phone, device, record } => self.put_code(phone, device, record),
            Record::PhoneGuard(phone, guard) => self.put_phone_guard(phone, guard),
            Record::PasswordGuard(user, guard) => self.put_password_guard(*user, guard),
            Record::BotSecret { bot, owner, hash } => self.put_bot_secret(*bot, *owner, hash),
            Record::BotCommands(bot, commands) => self.put_bot_commands(*bot, commands),
            Record::ChannelName(name, channel) => self.put_channel_name(name, channel),
            Record::Backup { user, seq, record } => {
                self.execute(
                    "INSERT INTO backups (user_id, seq, record) VALUES ($1, $2, $3)",
                    &[&signed(user.0), &signed(*seq), &encode(record)],
                )?;
                Ok(())
            }
            Record::Revocation { seq, revocation } => self.put_revocation(*seq, revocation),
            Record::RevokedRelay { relay, at } => self.put_revoked_relay(relay, *at),
            Record::NextUserId(next) => {
                self.query_one("SELECT setval('user_ids', $1, false)", &[&signed(*next)])?;
                Ok(())
            }
            Record::NextRevocation(next) => self.set_counter(NEXT_REVOCATION, *next),
        }
    }

    fn put_session_row(&mut self, session: &StoredSession) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO sessions (session_id, user_id, active, record) VALUES ($1, $2, $3, $4)
             ON CONFLICT (session_id) DO UPDATE SET active = EXCLUDED.active, record = EXCLUDED.record",
            &[
                &signed(session.session_id.0),
                &signed(session.user_id.0),
                &session.revoked_at.is_none(),
                &encode(session),
            ],
        )?;
        Ok(())
    }

    fn put_device(&mut self, device: &PeerId, session: SessionId) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO devices (device, session_id) VALUES ($1, $2)
             ON CONFLICT (device) DO UPDATE SET session_id = EXCLUDED.session_id",
            &[&device.to_bytes(), &signed(session.0)],
        )?;
        Ok(())
    }

    fn put_revocation(&mut self, seq: u64, revocation: &Revocation) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO revocations (seq, until_at, record) VALUES ($1, $2, $3)",
            &[&signed(seq), &clamped(revocation.body.until), &encode(revocation)],
        )?;
        Ok(())
    }
}

impl Tables for PgTables<'_> {
    fn account(&mut self, id: UserId) -> Result<Option<StoredAccount>, StoreError> {
        self.record("account", "SELECT record FROM accounts WHERE user_id = $1", &[&signed(id.0)])
    }

    fn account_by_phone(&mut self, phone: &Phone) -> Result<Option<StoredAccount>, StoreError> {
        self.record("account", "SELECT record FROM accounts WHERE phone = $1", &[&phone.as_str()])
    }

    fn account_by_username(&mut self, username: &Username) -> Result<Option<StoredAccount>, StoreError> {
        self.record("account", "SELECT record FROM accounts WHERE username = $1", &[&username.canonical().as_str()])
    }

    fn next_user_id(&mut self) -> Result<UserId, StoreError> {
        let row = self.query_one("SELECT nextval('user_ids')", &[])?;
        let id = self.column::<i64>(&row, 0)?;
        // Below the first id, the sequence was reset: it would hand out ids that are taken.
        match u64::try_from(id) {
            Ok(id) if id >= FIRST_USER_ID => Ok(UserId(id)),
            _ => Err(StoreError::Corrupt { what: "user id sequence", reason: format!("it gave {id}") }),
        }
    }

    fn put_account(&mut self, account: &StoredAccount) -> Result<(), StoreError> {
        let phone = account.phone.as_ref().map(Phone::as_str);
        let username = account.username.as_ref().map(Username::canonical);
        self.execute(
            "INSERT INTO accounts (user_id, phone, username, record) VALUES ($1, $2, $3, $4)
             ON CONFLICT (user_id) DO UPDATE
             SET phone = EXCLUDED.phone, username = EXCLUDED.username, record = EXCLUDED.record",
            &[&signed(account.user_id.0), &phone, &username.as_deref(), &encode(account)],
        )?;
        Ok(())
    }

    fn username_holder(&mut self, username: &Username) -> Result<Option<UserId>, StoreError> {
        let row =
            self.query_opt("SELECT user_id FROM accounts WHERE username = $1", &[&username.canonical().as_str()])?;
        row.map(|row| Ok(UserId(unsigned(self.column::<i64>(&row, 0)?)))).transpose()
    }

    fn session(&mut self, id: SessionId) -> Result<Option<StoredSession>, StoreError> {
        self.record("session", "SELECT record FROM sessions WHERE session_id = $1", &[&signed(id.0)])
    }

    fn session_of_device(&mut self, device: &PeerId) -> Result<Option<StoredSession>, StoreError> {
        self.record(
            "session",
            "SELECT s.record FROM devices d JOIN sessions s ON s.session_id = d.session_id WHERE d.device = $1",
            &[&device.to_bytes()],
        )
    }

    fn put_session(&mut self, session: &StoredSession) -> Result<(), StoreError> {
        self.put_session_row(session)?;
        self.put_device(&session.device, session.session_id)
    }

    fn active_sessions(&mut self, user: UserId) -> Result<Vec<StoredSession>, StoreError> {
        let mut sessions: Vec<StoredSession> =
            self.records("session", "SELECT record FROM sessions WHERE user_id = $1 AND active", &[&signed(user.0)])?;
        // In redb's order: by id as the u64 it is (signed, random ids from 2^63 up sort first).
        sessions.sort_by_key(|s| s.session_id.0);
        Ok(sessions)
    }

    fn password_guard(&mut self, user: UserId) -> Result<PasswordGuard, StoreError> {
        let guard =
            self.record("password guard", "SELECT record FROM password_guards WHERE user_id = $1", &[&signed(user.0)])?;
        Ok(guard.unwrap_or_default())
    }

    fn put_password_guard(&mut self, user: UserId, guard: &PasswordGuard) -> Result<(), StoreError> {
        if *guard == PasswordGuard::default() {
            self.execute("DELETE FROM password_guards WHERE user_id = $1", &[&signed(user.0)])?;
        } else {
            self.execute(
                "INSERT INTO password_guards (user_id, record) VALUES ($1, $2)
                 ON CONFLICT (user_id) DO UPDATE SET record = EXCLUDED.record",
                &[&signed(user.0), &encode(guard)],
            )?;
        }
        Ok(())
    }

    fn phone_guard(&mut self, phone: &Phone) -> Result<PhoneGuard, StoreError> {
        let guard =
            self.record("phone guard", "SELECT record FROM phone_guards WHERE phone = $1", &[&phone.as_str()])?;
        Ok(guard.unwrap_or_default())
    }

    fn put_phone_guard(&mut self, phone: &Phone, guard: &PhoneGuard) -> Result<(), StoreError> {
        if *guard == PhoneGuard::default() {
            self.execute("DELETE FROM phone_guards WHERE phone = $1", &[&phone.as_str()])?;
        } else {
            self.execute(
                "INSERT INTO phone_guards (phone, record) VALUES ($1, $2)
                 ON CONFLICT (phone) DO UPDATE SET record = EXCLUDED.record",
                &[&phone.as_str(), &encode(guard)],
            )?;
        }
        Ok(())
    }

    fn code(&mut self, phone: &Phone, device: &PeerId) -> Result<Option<CodeRecord>, StoreError> {
        self.record(
            "code",
            "SELECT record FROM codes WHERE phone = $1 AND device = $2",
            &[&phone.as_str(), &device.to_string()],
        )
    }

    fn put_code(&mut self, phone: &Phone, device: &PeerId, record: &CodeRecord) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO codes (phone, device, record) VALUES ($1, $2, $3)
             ON CONFLICT (phone, device) DO UPDATE SET record = EXCLUDED.record",
            &[&phone.as_str(), &device.to_string(), &encode(record)],
        )?;
        Ok(())
    }

    fn remove_code(&mut self, phone: &Phone, device: &PeerId) -> Result<(), StoreError> {
        self.execute("DELETE FROM codes WHERE phone = $1 AND device = $2", &[&phone.as_str(), &device.to_string()])?;
        Ok(())
    }

    fn remove_stale_codes(&mut self, phone: &Phone, stale: &dyn Fn(&CodeRecord) -> bool) -> Result<(), StoreError> {
        let rows = self.query("SELECT device, record FROM codes WHERE phone = $1", &[&phone.as_str()])?;
        let mut gone = Vec::new();
        for row in &rows {
            if stale(&decode("code", self.column::<&[u8]>(row, 1)?)?) {
                gone.push(self.column::<String>(row, 0)?);
            }
        }
        for device in gone {
            self.execute("DELETE FROM codes WHERE phone = $1 AND device = $2", &[&phone.as_str(), &device])?;
        }
        Ok(())
    }

    fn put_backup(&mut self, user: UserId, record: &BackupRecord, keep: usize) -> Result<(), StoreError> {
        let user = signed(user.0);
        let row = self.query_one("SELECT COALESCE(MAX(seq) + 1, 0) FROM backups WHERE user_id = $1", &[&user])?;
        let next: i64 = self.column(&row, 0)?;
        self.execute(
            "INSERT INTO backups (user_id, seq, record) VALUES ($1, $2, $3)",
            &[&user, &next, &encode(record)],
        )?;
        let keep = i64::try_from(keep).unwrap_or(i64::MAX);
        self.execute(
            "DELETE FROM backups WHERE user_id = $1 AND seq NOT IN
             (SELECT seq FROM backups WHERE user_id = $1 ORDER BY seq DESC LIMIT $2)",
            &[&user, &keep],
        )?;
        Ok(())
    }

    fn backups(&mut self, user: UserId) -> Result<Vec<BackupRecord>, StoreError> {
        self.records("backup", "SELECT record FROM backups WHERE user_id = $1 ORDER BY seq DESC", &[&signed(user.0)])
    }

    fn put_bot_commands(&mut self, bot: UserId, commands: &[BotCommandInfo]) -> Result<(), StoreError> {
        if commands.is_empty() {
            self.execute("DELETE FROM bot_commands WHERE bot_id = $1", &[&signed(bot.0)])?;
        } else {
            self.execute(
                "INSERT INTO bot_commands (bot_id, record) VALUES ($1, $2)
                 ON CONFLICT (bot_id) DO UPDATE SET record = EXCLUDED.record",
                &[&signed(bot.0), &encode(&commands)],
            )?;
        }
        Ok(())
    }

    fn bot_commands(&mut self, bot: UserId) -> Result<Vec<BotCommandInfo>, StoreError> {
        let commands =
            self.record("bot commands", "SELECT record FROM bot_commands WHERE bot_id = $1", &[&signed(bot.0)])?;
        Ok(commands.unwrap_or_default())
    }

    fn channel_name(&mut self, name: &Username) -> Result<Option<ChannelName>, StoreError> {
        self.record("channel name", "SELECT record FROM channel_names WHERE name = $1", &[&name.canonical().as_str()])
    }

    fn put_channel_name(&mut self, name: &Username, channel: &ChannelName) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO channel_names (name, record) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET record = EXCLUDED.record",
            &[&name.canonical().as_str(), &encode(channel)],
        )?;
        Ok(())
    }

    fn remove_channel_name(&mut self, name: &Username) -> Result<(), StoreError> {
        self.execute("DELETE FROM channel_names WHERE name = $1", &[&name.canonical().as_str()])?;
        Ok(())
    }

    fn bot_secret(&mut self, bot: UserId) -> Result<Option<[u8; 32]>, StoreError> {
        let row = self.query_opt("SELECT hash FROM bot_secrets WHERE bot_id = $1", &[&signed(bot.0)])?;
        row.map(|row| {
            self.column::<&[u8]>(&row, 0)?
                .try_into()
                .map_err(|_| StoreError::Corrupt { what: "bot secret", reason: "not 32 bytes".into() })
        })
        .transpose()
    }

    fn put_bot_secret(&mut self, bot: UserId, owner: Option<UserId>, hash: &[u8; 32]) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO bot_secrets (bot_id, owner, hash) VALUES ($1, $2, $3)
             ON CONFLICT (bot_id) DO UPDATE SET hash = EXCLUDED.hash, owner = COALESCE(EXCLUDED.owner, bot_secrets.owner)",
            &[&signed(bot.0), &owner.map(|o| signed(o.0)), &hash.as_slice()],
        )?;
        Ok(())
    }

    fn bots_of(&mut self, owner: UserId) -> Result<Vec<StoredAccount>, StoreError> {
        self.records(
            "account",
            "SELECT a.record FROM bot_secrets b JOIN accounts a ON a.user_id = b.bot_id WHERE b.owner = $1
             ORDER BY b.bot_id",
            &[&signed(owner.0)],
        )
    }

    fn all_bots(&mut self) -> Result<Vec<StoredAccount>, StoreError> {
        self.records(
            "account",
            "SELECT a.record FROM bot_secrets b JOIN accounts a ON a.user_id = b.bot_id ORDER BY b.bot_id",
            &[],
        )
    }

    fn add_revocation(&mut self, revocation: &Revocation) -> Result<u64, StoreError> {
        // One counter row that every revocation updates: concurrent ones serialize on it, so a
        // number is visible only after all smaller ones are (a sequence would not promise that).
        let seq = self.next_revocation_seq()?;
        let next = seq
            .checked_add(1)
            .ok_or_else(|| StoreError::Corrupt { what: "revocation counter", reason: "at its end".into() })?;
        self.set_counter(NEXT_REVOCATION, next)?;
        self.put_revocation(seq, revocation)?;
        Ok(seq)
    }

    fn next_revocation_seq(&mut self) -> Result<u64, StoreError> {
        let row = self.query_opt("SELECT value FROM counters WHERE name = $1", &[&NEXT_REVOCATION])?;
        row.map_or(Ok(0), |row| Ok(unsigned(self.column::<i64>(&row, 0)?)))
    }

    fn revocations_since(&mut self, since: u64, limit: usize) -> Result<Vec<(u64, Revocation)>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.query(
            "SELECT seq, record FROM revocations WHERE seq >= $1 ORDER BY seq LIMIT $2",
            &[&clamped(since), &limit],
        )?;
        rows.iter()
            .map(|row| {
                Ok((unsigned(self.column::<i64>(row, 0)?), decode("revocation", self.column::<&[u8]>(row, 1)?)?))
            })
            .collect()
    }

    fn prune_revocations(&mut self, now: u64) -> Result<usize, StoreError> {
        let pruned = self.execute("DELETE FROM revocations WHERE until_at < $1", &[&clamped(now)])?;
        Ok(usize::try_from(pruned).unwrap_or(usize::MAX))
    }

    fn relay_revoked_at(&mut self, relay: &PeerId) -> Result<Option<u64>, StoreError> {
        let row = self.query_opt("SELECT at FROM revoked_relays WHERE relay = $1", &[&relay.to_bytes()])?;
        row.map(|row| Ok(unsigned(self.column::<i64>(&row, 0)?))).transpose()
    }

    fn put_revoked_relay(&mut self, relay: &PeerId, at: u64) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO revoked_relays (relay, at) VALUES ($1, $2) ON CONFLICT (relay) DO UPDATE SET at = EXCLUDED.at",
            &[&relay.to_bytes(), &clamped(at)],
        )?;
        Ok(())
    }
}
