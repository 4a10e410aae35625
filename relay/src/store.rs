//! The relay's durable mailboxes: a redb file and its write-ahead log ([`crate::wal`]), behind
//! a single-threaded actor that applies many requests in one transaction (group commit). A
//! batch is durable once its log record (what the transaction did, not what was asked) is
//! synced; redb commits it without syncing, and every [`CHECKPOINT_EVERY`] one syncing commit
//! makes redb durable and empties the log. Reads need no actor: redb serves readers alongside
//! its writer, so fetches read on the caller's task.
//!
//! After a failed write the store takes no more ([`StoreError::Failed`]); that also keeps the
//! log bounded, to [`CHECKPOINT_BYTES`] and one batch, since only a checkpoint empties it. The
//! relay restarts once the disk takes writes again (see `Relay::wait`), and replays the log.
//!
//! Tables:
//! - `mailbox`: (device peer id, arrival number) → envelope. Arrival order is fetch order.
//! - `envelope_ids`: envelope id → where it is and until when its id is remembered. Kept after
//!   delivery (until the TTL) so that a replayed envelope is recognised, not delivered twice;
//!   an id whose `mailbox` entry is gone was delivered. Ids lead with the sender's clock
//!   (`EnvelopeId`), so new ids land at the end of this table, not on random pages.
//! - `mailbox_sizes`: device → envelopes waiting, for quotas (one update per mailbox per batch).
//! - `delivery_proofs` and `ack_proofs`: for an id delivered on its recipient's signed
//!   acknowledgement, that acknowledgement (kept once, however many ids it names, until the
//!   last of them expires): what repair shows another relay before it deletes its copy.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use meshgram_node::proto::envelope::{Envelope, EnvelopeId};
use meshgram_node::proto::{MailboxDigest, SignedAck};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::disk;
use crate::wal::{Effect, Replay, Wal};

const MAILBOX: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("mailbox");
const ENVELOPE_IDS: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("envelope_ids");
const MAILBOX_SIZES: TableDefinition<&[u8], u64> = TableDefinition::new("mailbox_sizes");
/// Per mailbox with envelopes waiting: the digest of their ids (`MailboxDigest`), kept up to
/// date by every put, delete and expiry, so repair compares replicas without reading mailboxes.
const MAILBOX_DIGESTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("mailbox_digests");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// (mailbox key, sender's user id) → that sender's envelopes waiting in that mailbox.
const SENDER_SHARES: TableDefinition<(&[u8], u64), u64> = TableDefinition::new("sender_shares");
/// Sender's user id → bytes of its envelopes waiting here, in every mailbox.
const SENDER_BYTES: TableDefinition<u64, u64> = TableDefinition::new("sender_bytes");
/// Set once the two above count every stored envelope (stores from before are counted at open).
const SENDERS_COUNTED: &str = "senders_counted";
/// (when it expires, envelope id) for every id record: expiry reads only what is due.
const EXPIRIES: TableDefinition<(u64, &[u8; 16]), ()> = TableDefinition::new("expiries");
/// Envelope id → the hash of the signed acknowledgement that delivered it (in [`ACK_PROOFS`]).
const DELIVERY_PROOFS: TableDefinition<&[u8; 16], &[u8; 32]> = TableDefinition::new("delivery_proofs");
/// Hash of a recipient's signed acknowledgement → [`StoredProof`].
const ACK_PROOFS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("ack_proofs");
/// Set once [`EXPIRIES`] holds every id record (stores from before it are indexed at open).
const EXPIRIES_BUILT: &str = "expiries_built";
/// Ids one expiry step drops at most: each step is one transaction, so that the single writer
/// never stops for long, however much is due at once.
const EXPIRE_STEP: usize = 10_000;
const NEXT_ARRIVAL: &str = "next_arrival";
/// Set once `MAILBOX_DIGESTS` covers the mailboxes (a store from before it is scanned once).
const DIGESTS_BUILT: &str = "mailbox_digests_built";

/// Requests queued for the store: a full queue pushes back on the network loop.
const STORE_QUEUE: usize = 4096;
/// Requests folded into one transaction at most.
const MAX_GROUP: usize = 512;
/// Envelope bytes folded into one transaction at most (one request more may pass it): this
/// bounds a log record, which is what replay holds in memory at a time.
const MAX_GROUP_BYTES: usize = 16 << 20;
/// Log bytes replayed per redb transaction: what replay holds uncommitted stays this small,
/// however long the log a crash left.
const REPLAY_TX_BYTES: u64 = 8 << 20;
/// The quota of a replayed store: none, what it stores was accepted when it was logged.
/// How often redb is made durable and the log emptied (sooner if the log reaches
/// [`CHECKPOINT_BYTES`]). The syncing commit holds up the store for ~2 ms after 250 ms of
/// steady traffic and ~7 ms after a second of it, so often and short is kinder to latency; the
/// log is replayed on open, so this also bounds the replay after a crash.
pub const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
const CHECKPOINT_BYTES: u64 = 64 << 20;
/// A batch is written at least this long after the one before it started: at most 1,000 log
/// syncs a second, whatever the load. At a steady trickle (a message every millisecond or so,
/// each its own batch) this lets a few share one sync; under a backlog batches take longer
/// than this anyway and nothing waits.
const MIN_BATCH_GAP: Duration = Duration::from_millis(1);

/// A storage failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(String),
    #[error("write-ahead log: {0}")]
    Log(String),
    #[error("the store has stopped")]
    Stopped,
    /// A write failed earlier (a full or failing disk), so the store takes no more: after a
    /// failed sync nobody can tell what reached the disk, and a later write that seems to
    /// succeed could be acknowledged on top of a lost one.
    #[error("the store takes no writes since one failed: {0}")]
    Failed(String),
    /// The store does not open on a disk that takes no writes (a full one, say): it would fail
    /// at its first write.
    #[error("the disk of {dir} takes no writes: {reason}")]
    DiskTakesNoWrites { dir: PathBuf, reason: String },
}

impl<E: Into<redb::Error>> From<E> for StoreError {
    fn from(e: E) -> Self {
        StoreError::Db(e.into().to_string())
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct IdRecord {
    mailbox: Vec<u8>,
    arrival: u64,
    /// Unix seconds after which the envelope (if still undelivered) and its id are dropped.
    expires_at: u64,
}

/// A signed acknowledgement kept as proof, and how many ids' records name it.
#[derive(Debug, Serialize, Deserialize)]
struct StoredProof {
    ids: u32,
    ack: SignedAck,
}

/// What a put did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PutOutcome {
    pub stored: Vec<EnvelopeId>,
    /// Held or delivered before: not stored again.
    pub duplicates: Vec<EnvelopeId>,
    /// Refused by the [`Quota`] ([`OVER_QUOTA`]).
    pub over_quota: Vec<EnvelopeId>,
}

/// What applying a [`Write`] did.
#[derive(Debug)]
enum Applied {
    Put(PutOutcome),
    /// Envelopes deleted.
    Count(u32),
    /// Envelopes expired by one step, and whether more are due.
    Expired {
        dropped: u32,
        more: bool,
    },
}

/// One write the store applies.
#[derive(Debug, Clone)]
enum Write {
    /// Kept for the TTL from `now`, or until `until` if that is sooner (a repaired copy).
    Put {
        envelopes: Vec<Envelope>,
        now: u64,
        until: Option<u64>,
    },
    Delete {
        mailbox: PeerId,
        ids: Vec<EnvelopeId>,
    },
    /// A delete on the recipient's signed acknowledgement, which is kept as proof.
    DeleteAcked {
        ack: SignedAck,
    },
    Expire {
        now: u64,
    },
}

impl Write {
    /// The envelopes a put stores (none for other writes).
    fn envelopes(&self) -> &[Envelope] {
        match self {
            Write::Put { envelopes, .. } => envelopes,
            Write::Delete { .. } | Write::DeleteAcked { .. } | Write::Expire { .. } => &[],
        }
    }
}

/// A write and who waits for it.
struct Command {
    write: Write,
    reply: oneshot::Sender<Result<Applied, StoreError>>,
}

/// Cheap, cloneable handle to the store actor.
#[derive(Debug, Clone)]
pub struct StoreHandle {
    commands: mpsc::Sender<Command>,
    db: Arc<Database>,
    queued: Queued,
    failure: Failure,
    /// How long envelopes are kept.
    ttl: Duration,
}

/// The first write failure, once there is one: from then on the store refuses every write
/// ([`StoreError::Failed`]) and the relay reports itself unhealthy. Reads go on.
#[derive(Debug, Clone, Default)]
struct Failure(Arc<OnceLock<String>>);

impl Failure {
    /// Records `what` (unless a failure came first) and returns the error writes now get.
    fn set(&self, what: &StoreError) -> StoreError {
        if self.0.set(what.to_string()).is_ok() {
            tracing::error!(
                error = %what,
                "relay store write failed; it takes no more writes, and the relay restarts once its disk takes writes again"
            );
        }
        StoreError::Failed(self.0.get().cloned().unwrap_or_default())
    }

    fn get(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }
}

/// Envelopes of puts in the store's queue, not yet applied, per mailbox. Fetches hand them
/// over too, so what a recipient sees never waits for a sync (as with a push on arrival); the
/// sender still hears "stored" only once the put is durable. One that turns out a duplicate,
/// or over quota, may so reach the recipient, who drops what it already has by id.
#[derive(Debug, Clone, Default)]
struct Queued(Arc<Mutex<HashMap<PeerId, Vec<Envelope>>>>);

impl Queued {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Vec<Envelope>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn add(&self, envelopes: &[Envelope]) {
        let mut queued = self.lock();
        for envelope in envelopes {
            queued.entry(envelope.to_device).or_default().push(envelope.clone());
        }
    }

    fn remove(&self, envelopes: &[Envelope]) {
        let Some(first) = envelopes.first() else { return };
        let ids: std::collections::HashSet<EnvelopeId> = envelopes.iter().map(|e| e.id).collect();
        let mut mailboxes = vec![first.to_device];
        for envelope in envelopes {
            if !mailboxes.contains(&envelope.to_device) {
                mailboxes.push(envelope.to_device);
            }
        }
        let mut queued = self.lock();
        for mailbox in mailboxes {
            if let Some(waiting) = queued.get_mut(&mailbox) {
                waiting.retain(|e| !ids.contains(&e.id));
                if waiting.is_empty() {
                    queued.remove(&mailbox);
                }
            }
        }
    }

    /// The first `max` waiting for `mailbox`, and whether there are more.
    fn of(&self, mailbox: &PeerId, max: usize) -> (Vec<Envelope>, bool) {
        match self.lock().get(mailbox) {
            Some(waiting) => (waiting.iter().take(max).cloned().collect(), waiting.len() > max),
            None => (Vec::new(), false),
        }
    }
}

/// A put already in the store's queue (see [`StoreHandle::put_in_order`]).
#[derive(Debug)]
pub struct QueuedPut(oneshot::Receiver<Result<Applied, StoreError>>);

impl QueuedPut {
    /// What the put did, once durable.
    pub async fn outcome(self) -> Result<PutOutcome, StoreError> {
        match self.0.await.map_err(|_| StoreError::Stopped)?? {
            Applied::Put(outcome) => Ok(outcome),
            Applied::Count(_) | Applied::Expired { .. } => Err(StoreError::Db("a put was answered as a delete".into())),
        }
    }
}

/// Limits the store enforces.
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    /// How long an undelivered envelope (and a delivered one's id) is kept.
    pub ttl: Duration,
    pub quota: Quota,
}

/// Why envelopes over the [`Quota`] are refused (`QUOTA_EXCEEDED`).
pub const OVER_QUOTA: &str =
    "over quota: the recipient's mailbox is full, or the sender has its share of it or of this relay";

/// What undelivered envelopes may take here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Envelopes one mailbox may hold.
    pub per_mailbox: u64,
    /// Envelopes one sender may have in one mailbox: a noisy sender fills its share of a
    /// mailbox, never the whole of it, so others still get through.
    pub per_sender_in_mailbox: u64,
    /// Bytes one sender may have here, in all mailboxes (any device id can be a mailbox, so a
    /// per-mailbox limit alone does not bound what one account stores).
    pub bytes_per_sender: u64,
}

impl Quota {
    /// A relay's defaults: 100,000 envelopes per mailbox, a tenth of that per sender, 1 GiB
    /// per sender.
    pub const DEFAULT: Quota = Quota { per_mailbox: 100_000, per_sender_in_mailbox: 10_000, bytes_per_sender: 1 << 30 };
    /// No limit (what the log replays was decided when it was logged).
    pub const UNLIMITED: Quota =
        Quota { per_mailbox: u64::MAX, per_sender_in_mailbox: u64::MAX, bytes_per_sender: u64::MAX };
}

impl StoreHandle {
    /// Checks that the disk takes writes, opens the database and its log next to it (`.wal`),
    /// applies what the log holds (the writes of the last moments before a crash), and starts
    /// the actor on its own thread.
    pub fn open(path: &Path, limits: StoreLimits) -> Result<Self, StoreError> {
        let dir = path.parent().filter(|dir| !dir.as_os_str().is_empty()).unwrap_or(Path::new("."));
        disk::probe(dir)
            .map_err(|e| StoreError::DiskTakesNoWrites { dir: dir.to_path_buf(), reason: e.to_string() })?;
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(MAILBOX)?;
        tx.open_table(ENVELOPE_IDS)?;
        tx.open_table(MAILBOX_SIZES)?;
        tx.open_table(MAILBOX_DIGESTS)?;
        tx.open_table(META)?;
        tx.open_table(EXPIRIES)?;
        tx.open_table(SENDER_SHARES)?;
        tx.open_table(SENDER_BYTES)?;
        tx.open_table(DELIVERY_PROOFS)?;
        tx.open_table(ACK_PROOFS)?;
        build_digests(&tx)?;
        build_expiries(&tx)?;
        count_senders(&tx)?;
        tx.commit()?;
        let wal = replay_log(&db, &path.with_extension("wal"))?;
        let (commands, rx) = mpsc::channel(STORE_QUEUE);
        let db = Arc::new(db);
        let (queued, failure) = (Queued::default(), Failure::default());
        let (writer, applied, failed, ttl) = (Arc::clone(&db), queued.clone(), failure.clone(), limits.ttl);
        std::thread::Builder::new()
            .name("relay-store".into())
            .spawn(move || run(&writer, wal, limits, rx, &applied, &failed))
            .map_err(|e| StoreError::Db(e.to_string()))?;
        Ok(StoreHandle { commands, db, queued, failure, ttl })
    }

    /// How long envelopes are kept.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Why the store refuses writes, if a write failed (see [`StoreError::Failed`]).
    pub fn failure(&self) -> Option<&str> {
        self.failure.get()
    }

    async fn ask(&self, write: Write) -> Result<Applied, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command { write, reply }).await.map_err(|_| StoreError::Stopped)?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// Stores envelopes durably (returns once they are), for the TTL or until `until` (Unix
    /// seconds) if that is sooner.
    pub async fn put(&self, envelopes: Vec<Envelope>, now: u64, until: Option<u64>) -> Result<PutOutcome, StoreError> {
        let (command, queued) = self.put_command(envelopes, now, until);
        if let Err(mpsc::error::SendError(command)) = self.commands.send(command).await {
            self.queued.remove(command.write.envelopes());
            return Err(StoreError::Stopped);
        }
        queued.outcome().await
    }

    /// Queues a put now, ahead of anything queued after this call returns (an `Ack` of these
    /// envelopes, say), and gives the future of its outcome; `None` if the queue is full. The
    /// envelopes are kept for the TTL, or until `until` (Unix seconds) if that is sooner.
    pub fn put_in_order(&self, envelopes: Vec<Envelope>, now: u64, until: Option<u64>) -> Option<QueuedPut> {
        let (command, queued) = self.put_command(envelopes, now, until);
        match self.commands.try_send(command) {
            Ok(()) => Some(queued),
            Err(mpsc::error::TrySendError::Full(command) | mpsc::error::TrySendError::Closed(command)) => {
                self.queued.remove(command.write.envelopes());
                None
            }
        }
    }

    /// A put for the actor, its envelopes already visible to fetches (the caller takes them
    /// back out if the command cannot be queued).
    fn put_command(&self, envelopes: Vec<Envelope>, now: u64, until: Option<u64>) -> (Command, QueuedPut) {
        let (reply, rx) = oneshot::channel();
        self.queued.add(&envelopes);
        (Command { write: Write::Put { envelopes, now, until }, reply }, QueuedPut(rx))
    }

    /// Oldest envelopes of a mailbox, and whether more are waiting: what is stored, then what
    /// is queued to be (see [`Queued`]).
    pub fn fetch(&self, mailbox: PeerId, max: usize) -> Result<(Vec<Envelope>, bool), StoreError> {
        self.fetch_within(mailbox, max, usize::MAX)
    }

    /// [`Self::fetch`], the envelopes also within about `max_bytes` as encoded (at least one
    /// whatever its size, so that a read always makes progress).
    pub fn fetch_within(
        &self,
        mailbox: PeerId,
        max: usize,
        max_bytes: usize,
    ) -> Result<(Vec<Envelope>, bool), StoreError> {
        // Queued first: a put is applied before it leaves the queue, so one missing from this
        // snapshot is in the read that follows.
        let (queued, more_queued) = self.queued.of(&mailbox, max);
        let (mut envelopes, mut more, mut bytes) = fetch(&self.db, &mailbox, max, max_bytes)?;
        if !more {
            let stored: std::collections::HashSet<EnvelopeId> = envelopes.iter().map(|e| e.id).collect();
            for envelope in queued.into_iter().filter(|e| !stored.contains(&e.id)) {
                let size = encoded_size(&envelope);
                if envelopes.len() == max || (!envelopes.is_empty() && bytes + size > max_bytes) {
                    more = true;
                    break;
                }
                bytes += size;
                envelopes.push(envelope);
            }
            more |= more_queued;
        }
        Ok((envelopes, more))
    }

    /// A group mailbox's envelopes from arrival number `from` on, oldest first, with their
    /// arrival numbers, and whether more are held. Only what is committed: members read a
    /// group from cursors, and a cursor must never pass a put that is still queued.
    pub fn fetch_from(
        &self,
        mailbox: PeerId,
        from: u64,
        max: usize,
    ) -> Result<(Vec<(u64, Envelope)>, bool), StoreError> {
        use redb::ReadableDatabase;
        let tx = self.db.begin_read()?;
        let table = tx.open_table(MAILBOX)?;
        let key = mailbox.to_bytes();
        let mut out = Vec::new();
        for entry in table.range((key.as_slice(), from)..=(key.as_slice(), u64::MAX))? {
            if out.len() == max {
                return Ok((out, true));
            }
            let (k, value) = entry?;
            match postcard::from_bytes::<Envelope>(value.value()) {
                Ok(envelope) => out.push((k.value().1, envelope)),
                Err(e) => tracing::error!(error = %e, "skipping a corrupt stored envelope"),
            }
        }
        Ok((out, false))
    }

    /// The envelope that arrived last in a mailbox, if it holds any.
    pub fn last_in(&self, mailbox: PeerId) -> Result<Option<Envelope>, StoreError> {
        use redb::ReadableDatabase;
        let tx = self.db.begin_read()?;
        let table = tx.open_table(MAILBOX)?;
        let key = mailbox.to_bytes();
        let last = table.range((key.as_slice(), 0)..=(key.as_slice(), u64::MAX))?.next_back();
        Ok(match last {
            Some(entry) => postcard::from_bytes::<Envelope>(entry?.1.value()).ok(),
            None => None,
        })
    }

    /// Every mailbox with envelopes waiting here, and their ids (`meshgram-relay inspect`).
    /// Reads the whole mailbox table.
    pub fn held(&self) -> Result<Vec<(PeerId, Vec<EnvelopeId>)>, StoreError> {
        let mut held: Vec<(PeerId, Vec<EnvelopeId>)> = Vec::new();
        for (mailbox, _) in self.digests()? {
            held.push((mailbox, self.held_in(&mailbox)?));
        }
        Ok(held)
    }

    /// How many mailboxes have envelopes waiting here, and how many envelopes wait (as of the
    /// last checkpoint: up to a fraction of a second behind). Cheap: redb keeps table lengths.
    pub fn counts(&self) -> Result<(u64, u64), StoreError> {
        use redb::{ReadableDatabase, ReadableTableMetadata};
        let tx = self.db.begin_read()?;
        Ok((tx.open_table(MAILBOX_DIGESTS)?.len()?, tx.open_table(MAILBOX)?.len()?))
    }

    /// Every mailbox with envelopes waiting here, and the digest of their ids: what repair
    /// compares with the other replicas. Reads one small row per such mailbox.
    pub fn digests(&self) -> Result<Vec<(PeerId, [u8; 32])>, StoreError> {
        use redb::ReadableDatabase;
        let tx = self.db.begin_read()?;
        let mut digests = Vec::new();
        for entry in tx.open_table(MAILBOX_DIGESTS)?.iter()? {
            let (mailbox, digest) = entry?;
            match (PeerId::from_bytes(mailbox.value()), <[u8; 32]>::try_from(digest.value())) {
                (Ok(mailbox), Ok(digest)) => digests.push((mailbox, digest)),
                _ => tracing::error!("skipping a corrupt mailbox digest"),
            }
        }
        Ok(digests)
    }

    /// The digest of what waits in `mailbox` here (all zeros for nothing).
    pub fn digest(&self, mailbox: &PeerId) -> Result<[u8; 32], StoreError> {
        use redb::ReadableDatabase;
        let tx = self.db.begin_read()?;
        let digest = tx.open_table(MAILBOX_DIGESTS)?.get(mailbox.to_bytes().as_slice())?;
        Ok(digest.and_then(|d| <[u8; 32]>::try_from(d.value()).ok()).unwrap_or_default())
    }

    /// The ids of the envelopes waiting in `mailbox` here.
    pub fn held_in(&self, mailbox: &PeerId) -> Result<Vec<EnvelopeId>, StoreError> {
        use redb::ReadableDatabase;
        let tx = self.db.begin_read()?;
        let table = tx.open_table(MAILBOX)?;
        let key = mailbox.to_bytes();
        let mut ids = Vec::new();
        for entry in table.range((key.as_slice(), 0)..=(key.as_slice(), u64::MAX))? {
            let (_, value) = entry?;
            match postcard::from_bytes::<EnvelopeHead>(value.value()) {
                Ok(head) => ids.push(head.id),
                Err(e) => tracing::error!(error = %e, "skipping a corrupt stored envelope"),
            }
        }
        Ok(ids)
    }

    /// Where each of `ids` stands in `mailbox` here (ids recorded for another mailbox are
    /// [`IdState::Unknown`]).
    pub fn states(&self, mailbox: &PeerId, ids: &[EnvelopeId]) -> Result<Vec<IdState>, StoreError> {
        use redb::ReadableDatabase;
        let tx = self.db.begin_read()?;
        let (records, table) = (tx.open_table(ENVELOPE_IDS)?, tx.open_table(MAILBOX)?);
        let key = mailbox.to_bytes();
        let mut states = Vec::with_capacity(ids.len());
        for id in ids {
            states.push(match id_record(&records, id, &key)? {
                Some(record) if table.get((key.as_slice(), record.arrival))?.is_some() => IdState::Held,
                Some(_) => IdState::Delivered,
                None => IdState::Unknown,
            });
        }
        Ok(states)
    }

    /// The envelopes of `ids` still waiting in `mailbox` here, each with when it expires (Unix
    /// seconds), in the order of `ids`.
    pub fn held_envelopes(&self, mailbox: &PeerId, ids: &[EnvelopeId]) -> Result<Vec<(Envelope, u64)>, StoreError> {
        use redb::ReadableDatabase;
        let tx = self.db.begin_read()?;
        let (records, table) = (tx.open_table(ENVELOPE_IDS)?, tx.open_table(MAILBOX)?);
        let key = mailbox.to_bytes();
        let mut envelopes = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(record) = id_record(&records, id, &key)? else { continue };
            if let Some(value) = table.get((key.as_slice(), record.arrival))? {
                match postcard::from_bytes::<Envelope>(value.value()) {
                    Ok(envelope) => envelopes.push((envelope, record.expires_at)),
                    Err(e) => tracing::error!(error = %e, "skipping a corrupt stored envelope"),
                }
            }
        }
        Ok(envelopes)
    }

    /// Deletes delivered envelopes of a mailbox (ids of other mailboxes are ignored).
    pub async fn delete(&self, mailbox: PeerId, ids: Vec<EnvelopeId>) -> Result<u32, StoreError> {
        count(self.ask(Write::Delete { mailbox, ids }).await)
    }

    /// Deletes the envelopes its recipient acknowledged (ids of other mailboxes are ignored),
    /// keeping the acknowledgement as proof of their delivery for the ids' lifetime. The caller
    /// checked it, or it is the recipient's own (who cannot prove more than it signed).
    pub async fn delete_acked(&self, ack: SignedAck) -> Result<u32, StoreError> {
        count(self.ask(Write::DeleteAcked { ack }).await)
    }

    /// The signed acknowledgements kept as proof that `ids` of `mailbox` were delivered, each
    /// once (ids delivered without one, or not delivered, have none).
    pub fn delivery_proofs(&self, mailbox: &PeerId, ids: &[EnvelopeId]) -> Result<Vec<SignedAck>, StoreError> {
        use redb::ReadableDatabase;
        let tx = self.db.begin_read()?;
        let (proofs_of, proofs) = (tx.open_table(DELIVERY_PROOFS)?, tx.open_table(ACK_PROOFS)?);
        let mut hashes = std::collections::HashSet::new();
        let mut found = Vec::new();
        for id in ids {
            let Some(hash) = proofs_of.get(&id.0)?.map(|v| *v.value()) else { continue };
            if !hashes.insert(hash) {
                continue;
            }
            match proofs.get(&hash)?.map(|v| postcard::from_bytes::<StoredProof>(v.value())) {
                Some(Ok(proof)) if proof.ack.mailbox == *mailbox => found.push(proof.ack),
                Some(Err(e)) => tracing::error!(error = %e, "skipping a corrupt delivery proof"),
                _ => {}
            }
        }
        Ok(found)
    }

    /// Drops envelopes and ids past their TTL, in steps of [`EXPIRE_STEP`] (other writes go
    /// between them); returns how many envelopes were dropped.
    pub async fn expire(&self, now: u64) -> Result<u32, StoreError> {
        let mut dropped = 0;
        loop {
            match self.ask(Write::Expire { now }).await? {
                Applied::Expired { dropped: step, more } => {
                    dropped += step;
                    if !more {
                        return Ok(dropped);
                    }
                }
                _ => return Err(StoreError::Db("an expiry was answered as something else".into())),
            }
        }
    }
}

/// Applies what the log at `path` holds, as it was decided when logged (whatever the limits
/// now), a few MiB per transaction; makes it durable and returns the log emptied.
fn replay_log(db: &Database, path: &Path) -> Result<Wal, StoreError> {
    let log = |e: std::io::Error| StoreError::Log(e.to_string());
    let mut replay = Replay::open(path).map_err(log)?;
    let mut batches = 0u64;
    let mut tx = unsynced_write(db)?;
    let mut in_tx = 0;
    while let Some(batch) = replay.next_batch().map_err(log)? {
        for effect in &batch.effects {
            apply_logged(&tx, effect)?;
        }
        batches += 1;
        in_tx += batch.bytes;
        if in_tx >= REPLAY_TX_BYTES {
            tx.commit()?;
            (tx, in_tx) = (unsynced_write(db)?, 0);
        }
    }
    tx.commit()?;
    if batches > 0 || replay.damaged_bytes() > 0 {
        // An empty transaction that syncs makes the unsynced commits before it durable.
        db.begin_write()?.commit()?;
        tracing::info!(
            batches,
            damaged_bytes = replay.damaged_bytes(),
            "applied the write-ahead log left by the last run"
        );
    }
    replay.into_empty_log().map_err(log)
}

/// A write transaction that commits without syncing (the log, or a later sync, makes it durable).
fn unsynced_write(db: &Database) -> Result<redb::WriteTransaction, StoreError> {
    let mut tx = db.begin_write()?;
    tx.set_durability(redb::Durability::None).map_err(|e| StoreError::Db(e.to_string()))?;
    Ok(tx)
}

fn count(applied: Result<Applied, StoreError>) -> Result<u32, StoreError> {
    match applied? {
        Applied::Count(n) => Ok(n),
        _ => Err(StoreError::Db("a delete was answered as something else".into())),
    }
}

/// The actor: take one command, then whatever else is queued, log them with one sync and
/// apply them in one transaction; make redb durable and empty the log now and then.
fn run(
    db: &Database,
    mut wal: Wal,
    limits: StoreLimits,
    mut rx: mpsc::Receiver<Command>,
    queued: &Queued,
    failure: &Failure,
) {
    // Only for receiving with a deadline on this plain thread.
    let timer = match tokio::runtime::Builder::new_current_thread().enable_time().build() {
        Ok(timer) => timer,
        Err(e) => {
            tracing::error!(error = %e, "the store could not start");
            return;
        }
    };
    let mut last_checkpoint = Instant::now();
    let mut last_batch_started: Option<Instant> = None;
    loop {
        let next = if wal.len() == 0 {
            rx.blocking_recv()
        } else {
            let left = CHECKPOINT_EVERY.saturating_sub(last_checkpoint.elapsed());
            match timer.block_on(async { tokio::time::timeout(left, rx.recv()).await }) {
                Ok(next) => next,
                Err(_) => {
                    checkpoint(db, &mut wal, &mut last_checkpoint, failure);
                    continue;
                }
            }
        };
        let Some(first) = next else { break };
        if let Some(started) = last_batch_started {
            // A plain sleep: the runtime's timer would round this up to a whole millisecond.
            std::thread::sleep((started + MIN_BATCH_GAP).saturating_duration_since(Instant::now()));
        }
        last_batch_started = Some(Instant::now());
        let mut bytes = envelope_bytes(&first.write);
        let mut batch = vec![first];
        while batch.len() < MAX_GROUP && bytes < MAX_GROUP_BYTES {
            match rx.try_recv() {
                Ok(command) => {
                    bytes += envelope_bytes(&command.write);
                    batch.push(command);
                }
                Err(_) => break,
            }
        }
        run_batch(db, &mut wal, &limits, batch, queued, failure);
        if last_checkpoint.elapsed() >= CHECKPOINT_EVERY || wal.len() >= CHECKPOINT_BYTES {
            checkpoint(db, &mut wal, &mut last_checkpoint, failure);
        }
    }
    // Every handle is gone: leave nothing to replay.
    checkpoint(db, &mut wal, &mut last_checkpoint, failure);
}

fn envelope_bytes(write: &Write) -> usize {
    write.envelopes().iter().map(|e| e.sealed.len()).sum()
}

/// Makes everything redb holds durable, then empties the log. On failure the log stays and
/// is replayed on the next open, and the store takes no more writes.
fn checkpoint(db: &Database, wal: &mut Wal, last: &mut Instant, failure: &Failure) {
    *last = Instant::now();
    if wal.len() == 0 || failure.get().is_some() {
        return;
    }
    // An empty transaction that syncs makes the unsynced commits before it durable.
    let mut durable = || -> Result<(), StoreError> {
        db.begin_write()?.commit()?;
        wal.clear().map_err(|e| StoreError::Log(e.to_string()))
    };
    if let Err(e) = durable() {
        tracing::error!(error = %e, "relay store checkpoint failed; the log is kept");
        let _ = failure.set(&e);
    }
}

fn run_batch(
    db: &Database,
    wal: &mut Wal,
    limits: &StoreLimits,
    batch: Vec<Command>,
    queued: &Queued,
    failure: &Failure,
) {
    if let Some(why) = failure.get() {
        for command in batch {
            queued.remove(command.write.envelopes());
            let _ = command.reply.send(Err(StoreError::Failed(why.to_string())));
        }
        return;
    }
    let result = apply_and_log(db, wal, limits, &batch);
    // Applied or failed, they are no longer waiting (a failed put's sender hears so).
    for command in &batch {
        queued.remove(command.write.envelopes());
    }
    match result {
        Ok(applied) => {
            for (command, applied) in batch.into_iter().zip(applied) {
                let _ = command.reply.send(applied);
            }
        }
        Err(e) => {
            let e = failure.set(&e);
            for command in batch {
                let _ = command.reply.send(Err(e.clone()));
            }
        }
    }
}

/// Applies the batch in one transaction, logs what that did, then commits without syncing:
/// nothing is committed that the log does not hold. A write that fails is answered so and
/// logs nothing; a failed log append or commit fails the whole batch.
fn apply_and_log(
    db: &Database,
    wal: &mut Wal,
    limits: &StoreLimits,
    batch: &[Command],
) -> Result<Vec<Result<Applied, StoreError>>, StoreError> {
    let tx = unsynced_write(db)?;
    let mut effects = Vec::new();
    let mut applied = Vec::with_capacity(batch.len());
    for command in batch {
        applied.push(apply(&tx, limits, &command.write).map(|(outcome, effect)| {
            effects.extend(effect);
            outcome
        }));
    }
    if !effects.is_empty() {
        // A lost delete only means a redelivery, which recipients drop by id: a batch of
        // nothing but deletes is not synced, and becomes durable with the next sync.
        let sync = effects.iter().any(|e| !matches!(e, Effect::Delete { .. } | Effect::DeleteAcked { .. }));
        if let Err(e) = wal.append(&effects, sync) {
            if let Err(abort) = tx.abort() {
                tracing::warn!(error = %abort, "aborting a transaction the log refused failed");
            }
            return Err(StoreError::Log(e.to_string()));
        }
    }
    tx.commit()?;
    Ok(applied)
}

/// Applies a write; what it did, and what the log is to keep of it (nothing if it changed nothing).
fn apply<'a>(
    tx: &redb::WriteTransaction,
    limits: &StoreLimits,
    write: &'a Write,
) -> Result<(Applied, Option<Effect<&'a Envelope>>), StoreError> {
    Ok(match write {
        Write::Put { envelopes, now, until } => {
            let expires_at = now.saturating_add(limits.ttl.as_secs());
            let expires_at = until.map_or(expires_at, |until| until.min(expires_at));
            let outcome = put(tx, envelopes, expires_at, &limits.quota)?;
            let effect = (!outcome.stored.is_empty())
                .then(|| Effect::Store { envelopes: stored_of(envelopes, &outcome.stored), expires_at });
            (Applied::Put(outcome), effect)
        }
        Write::Delete { mailbox, ids } => {
            let count = delete(tx, mailbox, ids)?;
            (Applied::Count(count), (count > 0).then(|| Effect::Delete { mailbox: *mailbox, ids: ids.clone() }))
        }
        Write::DeleteAcked { ack } => {
            let (count, proven) = delete_acked(tx, ack)?;
            (Applied::Count(count), (count > 0 || proven > 0).then(|| Effect::DeleteAcked { ack: ack.clone() }))
        }
        // Logged even when no envelope was dropped: the ids of delivered ones may have been.
        Write::Expire { now } => {
            let (dropped, more) = expire(tx, *now)?;
            (Applied::Expired { dropped, more }, Some(Effect::Expire { now: *now }))
        }
    })
}

/// The envelopes `stored` names, in order; of an id given twice, the first (the one stored).
fn stored_of<'a>(envelopes: &'a [Envelope], stored: &[EnvelopeId]) -> Vec<&'a Envelope> {
    let mut stored = stored.iter().peekable();
    envelopes.iter().filter(|e| stored.next_if(|id| **id == e.id).is_some()).collect()
}

/// Applies a logged effect again, as it was decided: no quota, the TTL it was given.
fn apply_logged(tx: &redb::WriteTransaction, effect: &Effect) -> Result<(), StoreError> {
    match effect {
        Effect::Store { envelopes, expires_at } => {
            put(tx, envelopes, *expires_at, &Quota::UNLIMITED)?;
        }
        Effect::Delete { mailbox, ids } => {
            delete(tx, mailbox, ids)?;
        }
        Effect::DeleteAcked { ack } => {
            delete_acked(tx, ack)?;
        }
        Effect::Expire { now } => {
            expire(tx, *now)?;
        }
    }
    Ok(())
}

/// Stores the envelopes not already known, their ids kept until `expires_at`, within `quota`.
fn put(
    tx: &redb::WriteTransaction,
    envelopes: &[Envelope],
    expires_at: u64,
    quota: &Quota,
) -> Result<PutOutcome, StoreError> {
    let mut senders = SenderCounts::open(tx)?;
    let mut mailbox = tx.open_table(MAILBOX)?;
    let mut ids = tx.open_table(ENVELOPE_IDS)?;
    let mut expiries = tx.open_table(EXPIRIES)?;
    let mut sizes = tx.open_table(MAILBOX_SIZES)?;
    let mut meta = tx.open_table(META)?;
    let mut arrival = meta.get(NEXT_ARRIVAL)?.map(|v| v.value()).unwrap_or(0);
    let mut outcome = PutOutcome::default();
    let mut digests = DigestChanges::default();
    // Per mailbox touched by this batch: its key bytes (made once, not per envelope) and how
    // many envelopes wait in it, written back once at the end.
    let mut touched: HashMap<PeerId, (Vec<u8>, u64)> = HashMap::new();
    let encoding = |e: postcard::Error| StoreError::Db(e.to_string());
    for envelope in envelopes {
        let (key, size) = match touched.entry(envelope.to_device) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                let key = envelope.to_device.to_bytes();
                let size = sizes.get(key.as_slice())?.map(|v| v.value()).unwrap_or(0);
                entry.insert((key, size))
            }
        };
        // One lookup for the usual case: insert the id, and put back what was there if the
        // envelope turns out to be known (or refused).
        let record = IdRecord { mailbox: key.clone(), arrival, expires_at };
        let previous = ids.insert(&envelope.id.0, postcard::to_stdvec(&record).map_err(encoding)?.as_slice())?;
        if let Some(previous) = previous.map(|p| p.value().to_vec()) {
            ids.insert(&envelope.id.0, previous.as_slice())?;
            outcome.duplicates.push(envelope.id);
            continue;
        }
        // Room for the sealed bytes and the routing fields, so the encoding never regrows.
        let bytes = postcard::to_extend(envelope, Vec::with_capacity(envelope.sealed.len() + 160)).map_err(encoding)?;
        if *size >= quota.per_mailbox || !senders.admit(key, envelope.from_user.0, bytes.len() as u64, quota)? {
            ids.remove(&envelope.id.0)?;
            outcome.over_quota.push(envelope.id);
            continue;
        }
        expiries.insert((expires_at, &envelope.id.0), ())?;
        mailbox.insert((key.as_slice(), arrival), bytes.as_slice())?;
        digests.toggle(key, &envelope.id);
        *size += 1;
        outcome.stored.push(envelope.id);
        arrival += 1;
    }
    for (key, size) in touched.into_values() {
        sizes.insert(key.as_slice(), size)?;
    }
    meta.insert(NEXT_ARRIVAL, arrival)?;
    senders.write_back()?;
    digests.apply(tx)?;
    Ok(outcome)
}

/// A mailbox's oldest envelopes, at most `max` and (but for the first) `max_bytes` encoded;
/// whether more are held; their encoded bytes.
fn fetch(
    db: &Database,
    mailbox: &PeerId,
    max: usize,
    max_bytes: usize,
) -> Result<(Vec<Envelope>, bool, usize), StoreError> {
    use redb::ReadableDatabase;
    let tx = db.begin_read()?;
    let table = tx.open_table(MAILBOX)?;
    let key = mailbox.to_bytes();
    let mut out = Vec::new();
    let mut more = false;
    let mut bytes = 0;
    for entry in table.range((key.as_slice(), 0)..=(key.as_slice(), u64::MAX))? {
        let (_, value) = entry?;
        let size = value.value().len();
        if out.len() == max || (!out.is_empty() && bytes + size > max_bytes) {
            more = true;
            break;
        }
        bytes += size;
        match postcard::from_bytes::<Envelope>(value.value()) {
            Ok(envelope) => out.push(envelope),
            Err(e) => tracing::error!(error = %e, "skipping a corrupt stored envelope"),
        }
    }
    Ok((out, more, bytes))
}

/// An envelope's size as stored and sent.
fn encoded_size(envelope: &Envelope) -> usize {
    postcard::experimental::serialized_size(envelope).unwrap_or(envelope.sealed.len())
}

/// Where an envelope id stands on a relay, for repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdState {
    /// Waiting in the mailbox.
    Held,
    /// Handed over and acknowledged by the mailbox's owner; the id is kept until its TTL so
    /// that a stale copy elsewhere is deleted, not brought back.
    Delivered,
    /// Never seen here (or forgotten after its TTL).
    Unknown,
}

/// The start of a stored envelope: postcard decodes a prefix and ignores what follows, so the
/// id and sender are read without copying the sealed bytes.
#[derive(Deserialize)]
struct EnvelopeHead {
    id: EnvelopeId,
    from_user: meshgram_node::ids::UserId,
}

/// What each sender's envelopes take here ([`SENDER_SHARES`], [`SENDER_BYTES`]), kept with
/// every put, delete and expiry in the same transaction: read once per sender and mailbox a
/// transaction touches, written back once ([`SenderCounts::write_back`]).
struct SenderCounts<'tx> {
    shares_table: redb::Table<'tx, (&'static [u8], u64), u64>,
    bytes_table: redb::Table<'tx, u64, u64>,
    shares: HashMap<(Vec<u8>, u64), u64>,
    bytes: HashMap<u64, u64>,
}

impl<'tx> SenderCounts<'tx> {
    fn open(tx: &'tx redb::WriteTransaction) -> Result<Self, StoreError> {
        Ok(SenderCounts {
            shares_table: tx.open_table(SENDER_SHARES)?,
            bytes_table: tx.open_table(SENDER_BYTES)?,
            shares: HashMap::new(),
            bytes: HashMap::new(),
        })
    }

    fn share(&mut self, mailbox: &[u8], sender: u64) -> Result<&mut u64, StoreError> {
        Ok(match self.shares.entry((mailbox.to_vec(), sender)) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                let stored = self.shares_table.get((mailbox, sender))?.map_or(0, |v| v.value());
                entry.insert(stored)
            }
        })
    }

    fn bytes(&mut self, sender: u64) -> Result<&mut u64, StoreError> {
        Ok(match self.bytes.entry(sender) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                let stored = self.bytes_table.get(sender)?.map_or(0, |v| v.value());
                entry.insert(stored)
            }
        })
    }

    /// Counts an envelope of `sender` (`size` bytes stored) into `mailbox` if `quota` has room
    /// for it; whether it had.
    fn admit(&mut self, mailbox: &[u8], sender: u64, size: u64, quota: &Quota) -> Result<bool, StoreError> {
        let bytes = *self.bytes(sender)?;
        let share = self.share(mailbox, sender)?;
        if *share >= quota.per_sender_in_mailbox || bytes.saturating_add(size) > quota.bytes_per_sender {
            return Ok(false);
        }
        *share += 1;
        *self.bytes(sender)? += size;
        Ok(true)
    }

    /// Counts out a stored envelope (its bytes as stored) that left `mailbox`.
    fn release(&mut self, mailbox: &[u8], stored: &[u8]) -> Result<(), StoreError> {
        let Ok(head) = postcard::from_bytes::<EnvelopeHead>(stored) else { return Ok(()) };
        let sender = head.from_user.0;
        let share = self.share(mailbox, sender)?;
        *share = share.saturating_sub(1);
        let bytes = self.bytes(sender)?;
        *bytes = bytes.saturating_sub(stored.len() as u64);
        Ok(())
    }

    /// Writes what changed back to the tables (a count of 0 is removed).
    fn write_back(mut self) -> Result<(), StoreError> {
        for ((mailbox, sender), share) in self.shares.drain() {
            match share {
                0 => drop(self.shares_table.remove((mailbox.as_slice(), sender))?),
                share => drop(self.shares_table.insert((mailbox.as_slice(), sender), share)?),
            }
        }
        for (sender, bytes) in self.bytes.drain() {
            match bytes {
                0 => drop(self.bytes_table.remove(sender)?),
                bytes => drop(self.bytes_table.insert(sender, bytes)?),
            }
        }
        Ok(())
    }
}

/// Counts what each sender has stored, for a store from before it was counted, once.
fn count_senders(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut meta = tx.open_table(META)?;
    if meta.get(SENDERS_COUNTED)?.is_some() {
        return Ok(());
    }
    let mut senders = SenderCounts::open(tx)?;
    for entry in tx.open_table(MAILBOX)?.iter()? {
        let (key, value) = entry?;
        if let Ok(head) = postcard::from_bytes::<EnvelopeHead>(value.value()) {
            senders.admit(key.value().0, head.from_user.0, value.value().len() as u64, &Quota::UNLIMITED)?;
        }
    }
    senders.write_back()?;
    meta.insert(SENDERS_COUNTED, 1)?;
    Ok(())
}

/// The id record of `id`, if it is one of the mailbox whose key is `mailbox`.
fn id_record(
    records: &impl ReadableTable<&'static [u8; 16], &'static [u8]>,
    id: &EnvelopeId,
    mailbox: &[u8],
) -> Result<Option<IdRecord>, StoreError> {
    let record = records.get(&id.0)?.and_then(|v| postcard::from_bytes::<IdRecord>(v.value()).ok());
    Ok(record.filter(|record| record.mailbox == mailbox))
}

/// Changes to mailbox digests within one write, applied once per mailbox at its end.
#[derive(Default)]
struct DigestChanges(HashMap<Vec<u8>, [u8; 32]>);

impl DigestChanges {
    /// An envelope of the mailbox whose key is `mailbox` came or went.
    fn toggle(&mut self, mailbox: &[u8], id: &EnvelopeId) {
        let digest = match self.0.get_mut(mailbox) {
            Some(digest) => digest,
            None => self.0.entry(mailbox.to_vec()).or_default(),
        };
        MailboxDigest::toggle(digest, id);
    }

    fn apply(self, tx: &redb::WriteTransaction) -> Result<(), StoreError> {
        if self.0.is_empty() {
            return Ok(());
        }
        let mut digests = tx.open_table(MAILBOX_DIGESTS)?;
        for (mailbox, change) in self.0 {
            let old = digests.get(mailbox.as_slice())?.and_then(|d| <[u8; 32]>::try_from(d.value()).ok());
            let mut digest = old.unwrap_or_default();
            digest.iter_mut().zip(change).for_each(|(d, c)| *d ^= c);
            // All zeros: the mailbox is empty here (a false zero needs a blake3 collision).
            if digest == [0; 32] {
                digests.remove(mailbox.as_slice())?;
            } else {
                digests.insert(mailbox.as_slice(), digest.as_slice())?;
            }
        }
        Ok(())
    }
}

/// Computes the mailbox digests of a store from before they were kept, once.
fn build_digests(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut meta = tx.open_table(META)?;
    if meta.get(DIGESTS_BUILT)?.is_some() {
        return Ok(());
    }
    let mut changes = DigestChanges::default();
    for entry in tx.open_table(MAILBOX)?.iter()? {
        let (key, value) = entry?;
        if let Ok(head) = postcard::from_bytes::<EnvelopeHead>(value.value()) {
            changes.toggle(key.value().0, &head.id);
        }
    }
    tx.open_table(MAILBOX_DIGESTS)?.retain(|_, _| false)?;
    changes.apply(tx)?;
    meta.insert(DIGESTS_BUILT, 1)?;
    Ok(())
}

fn delete(tx: &redb::WriteTransaction, mailbox: &PeerId, delivered: &[EnvelopeId]) -> Result<u32, StoreError> {
    let mut senders = SenderCounts::open(tx)?;
    let mut table = tx.open_table(MAILBOX)?;
    let ids = tx.open_table(ENVELOPE_IDS)?;
    let mut sizes = tx.open_table(MAILBOX_SIZES)?;
    let key = mailbox.to_bytes();
    let mut count = 0;
    let mut digests = DigestChanges::default();
    for id in delivered {
        // Only the mailbox's owner may delete from it. The id record stays (a replay is still
        // a duplicate); the missing mailbox entry is what says "delivered".
        let Some(record) = id_record(&ids, id, &key)? else { continue };
        if let Some(removed) = table.remove((key.as_slice(), record.arrival))? {
            senders.release(&key, removed.value())?;
            digests.toggle(&key, id);
            count += 1;
        }
    }
    if count > 0 {
        let size = sizes.get(key.as_slice())?.map(|v| v.value()).unwrap_or(0);
        sizes.insert(key.as_slice(), size.saturating_sub(u64::from(count)))?;
    }
    senders.write_back()?;
    digests.apply(tx)?;
    Ok(count)
}

/// [`delete`] on a signed acknowledgement, which is then kept as the proof of delivery of each
/// of its ids that has a record here and no proof yet. Gives the envelopes deleted and the ids
/// it became the proof of.
fn delete_acked(tx: &redb::WriteTransaction, ack: &SignedAck) -> Result<(u32, u32), StoreError> {
    let count = delete(tx, &ack.mailbox, &ack.ids)?;
    let encoded = postcard::to_stdvec(ack).map_err(|e| StoreError::Db(e.to_string()))?;
    let hash = *blake3::hash(&encoded).as_bytes();
    let ids = tx.open_table(ENVELOPE_IDS)?;
    let mut proofs_of = tx.open_table(DELIVERY_PROOFS)?;
    let key = ack.mailbox.to_bytes();
    let mut proven = 0;
    for id in &ack.ids {
        if id_record(&ids, id, &key)?.is_some() && proofs_of.get(&id.0)?.is_none() {
            proofs_of.insert(&id.0, &hash)?;
            proven += 1;
        }
    }
    if proven > 0 {
        let mut proofs = tx.open_table(ACK_PROOFS)?;
        let held =
            proofs.get(&hash)?.and_then(|v| postcard::from_bytes::<StoredProof>(v.value()).ok()).map_or(0, |p| p.ids);
        let proof = StoredProof { ids: held + proven, ack: ack.clone() };
        proofs.insert(&hash, postcard::to_stdvec(&proof).map_err(|e| StoreError::Db(e.to_string()))?.as_slice())?;
    }
    Ok((count, proven))
}

/// An id's record is gone: so is its share of its delivery proof.
fn drop_delivery_proof(
    proofs_of: &mut redb::Table<&[u8; 16], &[u8; 32]>,
    proofs: &mut redb::Table<&[u8; 32], &[u8]>,
    id: &[u8; 16],
) -> Result<(), StoreError> {
    let Some(hash) = proofs_of.remove(id)?.map(|v| *v.value()) else { return Ok(()) };
    let proof = proofs.get(&hash)?.and_then(|v| postcard::from_bytes::<StoredProof>(v.value()).ok());
    match proof {
        Some(proof) if proof.ids > 1 => {
            let proof = StoredProof { ids: proof.ids - 1, ..proof };
            proofs.insert(&hash, postcard::to_stdvec(&proof).map_err(|e| StoreError::Db(e.to_string()))?.as_slice())?;
        }
        _ => {
            proofs.remove(&hash)?;
        }
    }
    Ok(())
}

/// One step of expiry: drops at most [`EXPIRE_STEP`] ids due by `now` (their envelopes too, if
/// still held), read from [`EXPIRIES`] in order; gives the envelopes dropped and whether more
/// ids are due.
fn expire(tx: &redb::WriteTransaction, now: u64) -> Result<(u32, bool), StoreError> {
    let mut senders = SenderCounts::open(tx)?;
    let mut table = tx.open_table(MAILBOX)?;
    let mut ids = tx.open_table(ENVELOPE_IDS)?;
    let mut sizes = tx.open_table(MAILBOX_SIZES)?;
    let mut expiries = tx.open_table(EXPIRIES)?;
    let (mut proofs_of, mut proofs) = (tx.open_table(DELIVERY_PROOFS)?, tx.open_table(ACK_PROOFS)?);
    let mut due = Vec::new();
    for entry in expiries.range((0, &[0u8; 16])..=(now, &[0xff; 16]))?.take(EXPIRE_STEP + 1) {
        let (key, _) = entry?;
        let (expires_at, id) = key.value();
        due.push((expires_at, *id));
    }
    let more = due.len() > EXPIRE_STEP;
    due.truncate(EXPIRE_STEP);
    let mut dropped = 0;
    let mut digests = DigestChanges::default();
    for (expires_at, id) in due {
        expiries.remove((expires_at, &id))?;
        // The id's own record says when it expires: an index entry it no longer matches (the
        // record was replaced since) drops nothing.
        let record = ids.get(&id)?.and_then(|v| postcard::from_bytes::<IdRecord>(v.value()).ok());
        let Some(record) = record.filter(|r| r.expires_at == expires_at) else { continue };
        ids.remove(&id)?;
        drop_delivery_proof(&mut proofs_of, &mut proofs, &id)?;
        if let Some(removed) = table.remove((record.mailbox.as_slice(), record.arrival))? {
            senders.release(&record.mailbox, removed.value())?;
            digests.toggle(&record.mailbox, &EnvelopeId(id));
            let size = sizes.get(record.mailbox.as_slice())?.map(|v| v.value()).unwrap_or(0);
            sizes.insert(record.mailbox.as_slice(), size.saturating_sub(1))?;
            dropped += 1;
        }
    }
    senders.write_back()?;
    digests.apply(tx)?;
    Ok((dropped, more))
}

/// Indexes the id records of a store from before [`EXPIRIES`] was kept, once.
fn build_expiries(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut meta = tx.open_table(META)?;
    if meta.get(EXPIRIES_BUILT)?.is_some() {
        return Ok(());
    }
    let mut expiries = tx.open_table(EXPIRIES)?;
    for entry in tx.open_table(ENVELOPE_IDS)?.iter()? {
        let (id, value) = entry?;
        if let Ok(record) = postcard::from_bytes::<IdRecord>(value.value()) {
            expiries.insert((record.expires_at, id.value()), ())?;
        }
    }
    meta.insert(EXPIRIES_BUILT, 1)?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use meshgram_node::ids::UserId;

    use super::*;

    /// An envelope to `to` with a `seq` (its content is `seq` too), for the relay's unit tests.
    pub(crate) fn envelope(to: PeerId, seq: u64) -> Envelope {
        Envelope {
            id: EnvelopeId::random(),
            from_user: UserId(1),
            from_device: PeerId::random(),
            to_user: UserId(2),
            to_device: to,
            sent_at_ms: 0,
            seq,
            sealed: vec![seq as u8; 100],
        }
    }

    fn open(dir: &Path, max_per_mailbox: u64) -> StoreHandle {
        StoreHandle::open(
            &dir.join("relay.redb"),
            StoreLimits {
                ttl: Duration::from_secs(100),
                quota: Quota { per_mailbox: max_per_mailbox, ..Quota::UNLIMITED },
            },
        )
        .unwrap()
    }

    #[tokio::test]
    async fn envelopes_are_kept_in_order_deduplicated_and_deleted_on_ack() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1000);
        let (bob, carol) = (PeerId::random(), PeerId::random());
        let batch: Vec<_> = (0..5).map(|i| envelope(bob, i)).collect();
        let outcome = store.put(batch.clone(), 1, None).await.unwrap();
        assert_eq!(outcome.stored.len(), 5);
        store.put(vec![envelope(carol, 0)], 1, None).await.unwrap();

        let replay = store.put(vec![batch[0].clone()], 2, None).await.unwrap();
        assert_eq!(replay.duplicates, vec![batch[0].id]);

        let (got, more) = store.fetch(bob, 3).unwrap();
        assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), [0, 1, 2]);
        assert!(more);

        // Carol cannot delete Bob's envelopes; Bob can.
        assert_eq!(store.delete(carol, vec![batch[0].id]).await.unwrap(), 0);
        assert_eq!(store.delete(bob, batch.iter().map(|e| e.id).collect()).await.unwrap(), 5);
        assert!(store.fetch(bob, 10).unwrap().0.is_empty());
        // A delivered envelope replayed is still a duplicate.
        assert_eq!(store.put(vec![batch[1].clone()], 3, None).await.unwrap().duplicates.len(), 1);
        assert_eq!(store.fetch(carol, 10).unwrap().0.len(), 1);
    }

    #[tokio::test]
    async fn repair_reads_what_is_held_and_what_was_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1000);
        let (bob, carol) = (PeerId::random(), PeerId::random());
        let bobs: Vec<_> = (0..3).map(|i| envelope(bob, i)).collect();
        let carols = vec![envelope(carol, 0)];
        store.put(bobs.clone(), 1, None).await.unwrap();
        store.put(carols.clone(), 1, None).await.unwrap();
        store.delete(bob, vec![bobs[0].id]).await.unwrap();

        let mut held = store.held().unwrap();
        held.sort_by_key(|(mailbox, _)| *mailbox == carol);
        assert_eq!(held, vec![(bob, vec![bobs[1].id, bobs[2].id]), (carol, vec![carols[0].id])]);
        assert_eq!(store.held_in(&bob).unwrap(), [bobs[1].id, bobs[2].id]);

        let stranger = EnvelopeId::random();
        let states = store.states(&bob, &[bobs[0].id, bobs[1].id, stranger, carols[0].id]).unwrap();
        // Carol's envelope is not in Bob's mailbox: unknown there.
        assert_eq!(states, [IdState::Delivered, IdState::Held, IdState::Unknown, IdState::Unknown]);
        let got = store.held_envelopes(&bob, &[bobs[2].id, bobs[0].id, carols[0].id]).unwrap();
        assert_eq!(got, vec![(bobs[2].clone(), 101)], "only what waits in that mailbox, with its expiry");

        // Digests follow every put and delete, and match the definition.
        let digest_of = |ids: &[EnvelopeId]| MailboxDigest::of(bob, ids).digest;
        assert_eq!(store.digest(&bob).unwrap(), digest_of(&[bobs[1].id, bobs[2].id]));
        store.delete(bob, vec![bobs[1].id, bobs[2].id]).await.unwrap();
        assert_eq!(store.digest(&bob).unwrap(), [0; 32], "empty");
        assert_eq!(store.digests().unwrap(), vec![(carol, MailboxDigest::of(carol, &[carols[0].id]).digest)]);

        // A repaired copy expires with its original, not a TTL later.
        let repaired = envelope(bob, 7);
        store.put(vec![repaired.clone()], 1, Some(50)).await.unwrap();
        assert_eq!(store.held_envelopes(&bob, &[repaired.id]).unwrap(), vec![(repaired, 50)]);
        assert_eq!(store.expire(50).await.unwrap(), 1);
        assert_eq!(store.digest(&bob).unwrap(), [0; 32], "expiry takes it out of the digest");
    }

    #[tokio::test]
    async fn a_store_from_before_digests_gets_them_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let bob = PeerId::random();
        let batch: Vec<_> = (0..3).map(|i| envelope(bob, i)).collect();
        {
            let store = open(dir.path(), 10);
            store.put(batch.clone(), 0, None).await.unwrap();
        }
        // As an older relay left it: no digests, and no mark that they were built.
        let path = dir.path().join("relay.redb");
        let db = loop {
            match Database::create(&path) {
                Ok(db) => break db,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let tx = db.begin_write().unwrap();
        tx.delete_table(MAILBOX_DIGESTS).unwrap();
        tx.open_table(META).unwrap().remove(DIGESTS_BUILT).unwrap();
        tx.commit().unwrap();
        drop(db);
        let store = open(dir.path(), 10);
        let ids: Vec<EnvelopeId> = batch.iter().map(|e| e.id).collect();
        assert_eq!(store.digests().unwrap(), vec![(bob, MailboxDigest::of(bob, &ids).digest)]);
    }

    #[tokio::test]
    async fn expiry_reads_only_what_is_due_in_steps_and_a_store_from_before_is_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let (bob, carol) = (PeerId::random(), PeerId::random());
        {
            let store = open(dir.path(), 100_000);
            // More due at once than one step drops, and some not due yet.
            for _ in 0..(EXPIRE_STEP / 250 + 1) {
                store.put((0..250).map(|i| envelope(bob, i)).collect(), 0, None).await.unwrap();
            }
            store.put(vec![envelope(carol, 0)], 50, None).await.unwrap();
        }
        // As an older relay left it: no expiry index, and no mark that it was built.
        let path = dir.path().join("relay.redb");
        let db = loop {
            match Database::create(&path) {
                Ok(db) => break db,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let tx = db.begin_write().unwrap();
        tx.delete_table(EXPIRIES).unwrap();
        tx.open_table(META).unwrap().remove(EXPIRIES_BUILT).unwrap();
        tx.commit().unwrap();
        drop(db);

        let store = open(dir.path(), 100_000);
        let due = (EXPIRE_STEP / 250 + 1) * 250;
        assert_eq!(store.expire(100).await.unwrap() as usize, due, "every one due, over several steps");
        assert!(store.fetch(bob, 10).unwrap().0.is_empty());
        assert_eq!(store.fetch(carol, 10).unwrap().0.len(), 1, "not due yet");
        assert_eq!(store.expire(150).await.unwrap(), 1);
        let tx = store.db.begin_write().unwrap();
        assert_eq!(
            redb::ReadableTableMetadata::len(&tx.open_table(EXPIRIES).unwrap()).unwrap(),
            0,
            "the index empties"
        );
    }

    #[tokio::test]
    async fn a_sender_fills_its_share_of_a_mailbox_and_its_bytes_but_no_more() {
        let dir = tempfile::tempdir().unwrap();
        let quota = Quota { per_mailbox: 10, per_sender_in_mailbox: 3, bytes_per_sender: 2_000 };
        let limits = StoreLimits { ttl: Duration::from_secs(100), quota };
        let store = StoreHandle::open(&dir.path().join("relay.redb"), limits).unwrap();
        let (bob, carol) = (PeerId::random(), PeerId::random());
        let from = |user: u64, to: PeerId| Envelope { from_user: UserId(user), ..envelope(to, 0) };

        // A noisy sender gets 3 of Bob's 10; another sender still gets in.
        let noisy: Vec<_> = (0..5).map(|_| from(1, bob)).collect();
        let outcome = store.put(noisy.clone(), 0, None).await.unwrap();
        assert_eq!((outcome.stored.len(), outcome.over_quota.len()), (3, 2));
        assert_eq!(store.put(vec![from(2, bob)], 0, None).await.unwrap().stored.len(), 1);
        // Once Bob took one, the noisy sender has room for one more.
        store.delete(bob, vec![noisy[0].id]).await.unwrap();
        assert_eq!(store.put(vec![from(1, bob)], 0, None).await.unwrap().stored.len(), 1);

        // Its bytes count in every mailbox: ~200 bytes each, 2,000 in all.
        let elsewhere: Vec<_> = (0..12).map(|_| from(1, PeerId::random())).collect();
        let outcome = store.put(elsewhere, 0, None).await.unwrap();
        assert!(outcome.stored.len() < 12 && !outcome.over_quota.is_empty(), "{outcome:?}");
        assert_eq!(store.put(vec![from(3, carol)], 0, None).await.unwrap().stored.len(), 1, "others are not");

        // Expiry gives everything back, counts included.
        store.expire(1_000).await.unwrap();
        let again: Vec<_> = (0..3).map(|_| from(1, bob)).collect();
        assert_eq!(store.put(again, 1_000, None).await.unwrap().stored.len(), 3);
    }

    #[tokio::test]
    async fn quotas_and_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 2);
        let bob = PeerId::random();
        let batch: Vec<_> = (0..3).map(|i| envelope(bob, i)).collect();
        let outcome = store.put(batch.clone(), 0, None).await.unwrap();
        assert_eq!((outcome.stored.len(), outcome.over_quota, outcome.duplicates), (2, vec![batch[2].id], vec![]));
        assert_eq!(store.expire(99).await.unwrap(), 0);
        assert_eq!(store.expire(100).await.unwrap(), 2);
        assert!(store.fetch(bob, 10).unwrap().0.is_empty());
        // The refused one was not remembered: sent again once there is room, it is stored.
        assert_eq!(store.put(vec![batch[2].clone()], 100, None).await.unwrap().stored, [batch[2].id], "quota freed");
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let bob = PeerId::random();
        {
            let store = open(dir.path(), 10);
            store.put(vec![envelope(bob, 0)], 0, None).await.unwrap();
        }
        // The actor thread exits when its handle is dropped; give it a moment to release the file.
        let mut reopened = None;
        for _ in 0..50 {
            match StoreHandle::open(
                &dir.path().join("relay.redb"),
                StoreLimits { ttl: Duration::from_secs(100), quota: Quota { per_mailbox: 10, ..Quota::DEFAULT } },
            ) {
                Ok(s) => {
                    reopened = Some(s);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        assert_eq!(reopened.unwrap().fetch(bob, 10).unwrap().0.len(), 1);
    }

    #[tokio::test]
    async fn a_queued_put_is_fetched_at_once_and_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 10);
        let bob = PeerId::random();
        let first = envelope(bob, 0);
        store.put(vec![first.clone()], 0, None).await.unwrap();
        let second = envelope(bob, 1);
        let queued = store.put_in_order(vec![second.clone()], 0, None).unwrap();
        let ids = |(got, _): (Vec<Envelope>, bool)| got.iter().map(|e| e.id).collect::<Vec<_>>();
        assert_eq!(ids(store.fetch(bob, 10).unwrap()), [first.id, second.id], "visible before it is durable");
        assert_eq!(ids(store.fetch(bob, 1).unwrap()), [first.id]);
        queued.outcome().await.unwrap();
        assert_eq!(ids(store.fetch(bob, 10).unwrap()), [first.id, second.id], "once, not twice");
    }

    #[tokio::test]
    async fn a_crash_before_the_checkpoint_loses_nothing_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 10);
        let bob = PeerId::random();
        let batch: Vec<_> = (0..5).map(|i| envelope(bob, i)).collect();
        store.put(batch.clone(), 0, None).await.unwrap();
        store.put(vec![envelope(PeerId::random(), 9)], 0, None).await.unwrap();
        store.delete(bob, vec![batch[0].id]).await.unwrap();
        let crashed = crash_copy(dir.path());
        let reopened = open(crashed.path(), 10);
        assert_eq!(std::fs::metadata(crashed.path().join("relay.wal")).unwrap().len(), 0, "the log was applied");
        let (got, more) = reopened.fetch(bob, 10).unwrap();
        assert_eq!((got.iter().map(|e| e.seq).collect::<Vec<_>>(), more), (vec![1, 2, 3, 4], false));
        let replay = reopened.put(vec![batch[0].clone(), batch[1].clone()], 1, None).await.unwrap();
        assert_eq!(replay.duplicates, [batch[0].id, batch[1].id], "ids survive, delivered or not");
    }

    #[tokio::test]
    async fn a_signed_acknowledgement_is_kept_as_proof_across_a_crash_until_its_ids_expire() {
        use redb::{ReadableDatabase, ReadableTableMetadata};
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 10);
        let key = libp2p::identity::Keypair::generate_ed25519();
        let bob = key.public().to_peer_id();
        let bobs: Vec<_> = (0..3).map(|i| envelope(bob, i)).collect();
        store.put(bobs.clone(), 1, None).await.unwrap();
        let all: Vec<EnvelopeId> = bobs.iter().map(|e| e.id).collect();
        store.delete(bob, vec![all[0]]).await.unwrap();
        assert!(store.delivery_proofs(&bob, &all).unwrap().is_empty(), "an unsigned ack proves nothing");

        // One acknowledgement for all three (one delivered before, on the unsigned ack): kept once.
        let ack = SignedAck::sign(&key, all.clone());
        assert_eq!(store.delete_acked(ack.clone()).await.unwrap(), 2);
        assert_eq!(store.delivery_proofs(&bob, &all).unwrap(), std::slice::from_ref(&ack));
        assert!(store.delivery_proofs(&PeerId::random(), &all).unwrap().is_empty(), "of Bob's mailbox only");

        // A crash before the checkpoint: the log brings the proof back.
        let crashed = crash_copy(dir.path());
        let reopened = open(crashed.path(), 10);
        assert_eq!(reopened.delivery_proofs(&bob, &all).unwrap(), [ack]);

        // The ids expire, and their proof with them.
        reopened.expire(101).await.unwrap();
        assert!(reopened.delivery_proofs(&bob, &all).unwrap().is_empty());
        let tx = reopened.db.begin_read().unwrap();
        assert_eq!(tx.open_table(ACK_PROOFS).unwrap().len().unwrap(), 0, "nothing left behind");
        assert_eq!(tx.open_table(DELIVERY_PROOFS).unwrap().len().unwrap(), 0);
    }

    /// Copies the store's files as a crash now would leave them: redb has the writes unsynced
    /// (or, if a checkpoint came first, synced) and the log has them synced.
    fn crash_copy(dir: &Path) -> tempfile::TempDir {
        let crashed = tempfile::tempdir().unwrap();
        for file in ["relay.redb", "relay.wal"] {
            std::fs::copy(dir.join(file), crashed.path().join(file)).unwrap();
        }
        crashed
    }

    fn seqs((got, _): (Vec<Envelope>, bool)) -> Vec<u64> {
        got.iter().map(|e| e.seq).collect()
    }

    #[tokio::test]
    async fn a_lower_quota_after_a_crash_refuses_nothing_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 10);
        let bob = PeerId::random();
        for seq in 0..5 {
            assert_eq!(store.put(vec![envelope(bob, seq)], 0, None).await.unwrap().stored.len(), 1);
        }
        let crashed = crash_copy(dir.path());
        let reopened = open(crashed.path(), 2);
        assert_eq!(seqs(reopened.fetch(bob, 10).unwrap()), [0, 1, 2, 3, 4], "all five, over the new quota");
        assert_eq!(reopened.put(vec![envelope(bob, 5)], 0, None).await.unwrap().over_quota.len(), 1, "the quota holds");
    }

    /// A log at `dir` as a crash would leave it: one record per batch, stored for `bob`; where
    /// each record starts and the log's end.
    fn crashed_log(dir: &Path, bob: PeerId, batches: &[&[u64]]) -> Vec<u64> {
        let mut wal = Replay::open(&dir.join("relay.wal")).unwrap().into_empty_log().unwrap();
        let mut starts = Vec::new();
        for seqs in batches {
            starts.push(wal.len());
            let envelopes: Vec<Envelope> = seqs.iter().map(|&seq| envelope(bob, seq)).collect();
            let store = Effect::Store { envelopes: envelopes.iter().collect(), expires_at: 100 };
            wal.append(&[store], true).unwrap();
        }
        starts.push(wal.len());
        starts
    }

    #[tokio::test]
    async fn replay_stores_what_was_logged_without_the_quota_of_now() {
        // Nothing in redb: only the log can bring these back.
        let dir = tempfile::tempdir().unwrap();
        let bob = PeerId::random();
        crashed_log(dir.path(), bob, &[&[0, 1, 2], &[3, 4]]);
        let reopened = open(dir.path(), 1);
        assert_eq!(seqs(reopened.fetch(bob, 10).unwrap()), [0, 1, 2, 3, 4]);
        assert_eq!(std::fs::metadata(dir.path().join("relay.wal")).unwrap().len(), 0, "the log was applied");
        // Their ids are kept as long as when they were logged, whatever the TTL now.
        assert_eq!(reopened.expire(99).await.unwrap(), 0);
        assert_eq!(reopened.expire(100).await.unwrap(), 5);
    }

    #[tokio::test]
    async fn replay_applies_the_records_before_and_after_a_damaged_one() {
        let dir = tempfile::tempdir().unwrap();
        let bob = PeerId::random();
        let starts = crashed_log(dir.path(), bob, &[&[0, 1], &[2, 3], &[4, 5]]);
        // The middle of the second record: its payload.
        let mut bytes = std::fs::read(dir.path().join("relay.wal")).unwrap();
        bytes[((starts[1] + starts[2]) / 2) as usize] ^= 0x55;
        std::fs::write(dir.path().join("relay.wal"), bytes).unwrap();
        let reopened = open(dir.path(), 10);
        assert_eq!(seqs(reopened.fetch(bob, 10).unwrap()), [0, 1, 4, 5], "only the damaged record is lost");
    }
}
