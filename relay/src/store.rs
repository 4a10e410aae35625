//! The relay's durable mailboxes in one redb file, behind a single-threaded actor that commits
//! many requests in one transaction (group commit): under load, one fsync covers every
//! envelope that arrived while the previous commit ran. Reads need no actor: redb serves
//! readers alongside its writer, so fetches read committed data on the caller's task.
//!
//! Tables:
//! - `mailbox`: (device peer id, arrival number) → envelope. Arrival order is fetch order.
//! - `envelope_ids`: envelope id → where it is and until when its id is remembered. Kept after
//!   delivery (until the TTL) so that a replayed envelope is recognised, not delivered twice;
//!   an id whose `mailbox` entry is gone was delivered. Ids lead with the sender's clock
//!   (`EnvelopeId`), so new ids land at the end of this table, not on random pages.
//! - `mailbox_sizes`: device → envelopes waiting, for quotas (one update per mailbox per batch).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use meshgram_node::envelope::{Envelope, EnvelopeId};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

const MAILBOX: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("mailbox");
const ENVELOPE_IDS: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("envelope_ids");
const MAILBOX_SIZES: TableDefinition<&[u8], u64> = TableDefinition::new("mailbox_sizes");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_ARRIVAL: &str = "next_arrival";

/// Requests queued for the store: a full queue pushes back on the network loop.
const STORE_QUEUE: usize = 4096;
/// Requests folded into one transaction at most.
const MAX_GROUP: usize = 512;
/// Deletes wait up to this long for a transaction that stores (and carries them along) before
/// committing on their own: a recipient acknowledges every batch, often a single envelope,
/// and nothing is lost if a delete comes late (the relay does not show acknowledged envelopes
/// again, and a crash only means a redelivery the recipient drops by id).
const DELETE_DELAY: Duration = Duration::from_millis(20);

/// A storage failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(String),
    #[error("the store has stopped")]
    Stopped,
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

/// What a put did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PutOutcome {
    pub stored: Vec<EnvelopeId>,
    /// Held or delivered before: not stored again.
    pub duplicates: Vec<EnvelopeId>,
    /// Refused because the recipient's mailbox is full.
    pub over_quota: Vec<EnvelopeId>,
}

enum Command {
    Put { envelopes: Vec<Envelope>, now: u64, reply: oneshot::Sender<Result<PutOutcome, StoreError>> },
    Delete { mailbox: PeerId, ids: Vec<EnvelopeId>, reply: oneshot::Sender<Result<u32, StoreError>> },
    Expire { now: u64, reply: oneshot::Sender<Result<u32, StoreError>> },
}

/// Cheap, cloneable handle to the store actor.
#[derive(Debug, Clone)]
pub struct StoreHandle {
    commands: mpsc::Sender<Command>,
    db: Arc<Database>,
}

/// A put already in the store's queue (see [`StoreHandle::put_in_order`]).
#[derive(Debug)]
pub struct QueuedPut(oneshot::Receiver<Result<PutOutcome, StoreError>>);

impl QueuedPut {
    /// What the put did, once committed.
    pub async fn outcome(self) -> Result<PutOutcome, StoreError> {
        self.0.await.map_err(|_| StoreError::Stopped)?
    }
}

/// Limits the store enforces.
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    /// How long an undelivered envelope (and a delivered one's id) is kept.
    pub ttl: Duration,
    /// Envelopes one mailbox may hold.
    pub max_per_mailbox: u64,
}

impl StoreHandle {
    /// Opens the database and starts the actor on its own thread.
    pub fn open(path: &Path, limits: StoreLimits) -> Result<Self, StoreError> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(MAILBOX)?;
        tx.open_table(ENVELOPE_IDS)?;
        tx.open_table(MAILBOX_SIZES)?;
        tx.open_table(META)?;
        tx.commit()?;
        let (commands, rx) = mpsc::channel(STORE_QUEUE);
        let db = Arc::new(db);
        let writer = Arc::clone(&db);
        std::thread::Builder::new()
            .name("relay-store".into())
            .spawn(move || run(&writer, limits, rx))
            .map_err(|e| StoreError::Db(e.to_string()))?;
        Ok(StoreHandle { commands, db })
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Command,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(make(reply)).await.map_err(|_| StoreError::Stopped)?;
        rx.await.map_err(|_| StoreError::Stopped)?
    }

    /// Stores envelopes durably (returns after the commit).
    pub async fn put(&self, envelopes: Vec<Envelope>, now: u64) -> Result<PutOutcome, StoreError> {
        self.ask(|reply| Command::Put { envelopes, now, reply }).await
    }

    /// Queues a put now, ahead of anything queued after this call returns (an `Ack` of these
    /// envelopes, say), and gives the future of its outcome; `None` if the queue is full.
    pub fn put_in_order(&self, envelopes: Vec<Envelope>, now: u64) -> Option<QueuedPut> {
        let (reply, rx) = oneshot::channel();
        self.commands.try_send(Command::Put { envelopes, now, reply }).ok()?;
        Some(QueuedPut(rx))
    }

    /// Oldest envelopes of a mailbox, and whether more are waiting (committed data only).
    pub fn fetch(&self, mailbox: PeerId, max: usize) -> Result<(Vec<Envelope>, bool), StoreError> {
        fetch(&self.db, &mailbox, max)
    }

    /// Deletes delivered envelopes of a mailbox (ids of other mailboxes are ignored).
    pub async fn delete(&self, mailbox: PeerId, ids: Vec<EnvelopeId>) -> Result<u32, StoreError> {
        self.ask(|reply| Command::Delete { mailbox, ids, reply }).await
    }

    /// Drops envelopes and ids past their TTL; returns how many envelopes were dropped.
    pub async fn expire(&self, now: u64) -> Result<u32, StoreError> {
        self.ask(|reply| Command::Expire { now, reply }).await
    }
}

/// The actor: take one command, then whatever else is queued, and run all writes in one
/// transaction whose commit they share.
fn run(db: &Database, limits: StoreLimits, mut rx: mpsc::Receiver<Command>) {
    // Only for receiving with a deadline on this plain thread.
    let timer = match tokio::runtime::Builder::new_current_thread().enable_time().build() {
        Ok(timer) => timer,
        Err(e) => {
            tracing::error!(error = %e, "the store could not start");
            return;
        }
    };
    // Deletes waiting to ride along with the next store, and since when.
    let mut deferred: Vec<Command> = Vec::new();
    let mut deferred_since = Instant::now();
    loop {
        let next = if deferred.is_empty() {
            rx.blocking_recv()
        } else {
            let left = DELETE_DELAY.saturating_sub(deferred_since.elapsed());
            timer.block_on(async { tokio::time::timeout(left, rx.recv()).await }).unwrap_or_default()
        };
        let timed_out = next.is_none();
        let starting = deferred.is_empty();
        let mut batch = std::mem::take(&mut deferred);
        if let Some(first) = next {
            batch.push(first);
            while batch.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
        } else if batch.is_empty() {
            return; // every handle is gone and nothing is left to write
        }
        let only_deletes = batch.iter().all(|c| matches!(c, Command::Delete { .. }));
        if only_deletes && !timed_out && batch.len() < MAX_GROUP {
            if starting {
                deferred_since = Instant::now();
            }
            deferred = batch;
            continue;
        }
        run_batch(db, &limits, batch);
    }
}

type Reply = Box<dyn FnOnce(Result<(), StoreError>)>;

fn run_batch(db: &Database, limits: &StoreLimits, writes: Vec<Command>) {
    let mut replies: Vec<Reply> = Vec::new();
    // A lost delete only means a redelivery, which recipients drop by id: batches of nothing
    // but deletes skip the fsync and become durable with the next batch that stores.
    let durability = if writes.iter().all(|w| matches!(w, Command::Delete { .. })) {
        redb::Durability::None
    } else {
        redb::Durability::Immediate
    };
    let result = (|| -> Result<(), StoreError> {
        let mut tx = db.begin_write()?;
        tx.set_durability(durability).map_err(|e| StoreError::Db(e.to_string()))?;
        for command in writes {
            match command {
                Command::Put { envelopes, now, reply } => {
                    let outcome = put(&tx, limits, envelopes, now);
                    replies.push(Box::new(move |committed| {
                        let _ = reply.send(committed.and(outcome));
                    }));
                }
                Command::Delete { mailbox, ids, reply } => {
                    let outcome = delete(&tx, &mailbox, &ids);
                    replies.push(Box::new(move |committed| {
                        let _ = reply.send(committed.and(outcome));
                    }));
                }
                Command::Expire { now, reply } => {
                    let outcome = expire(&tx, now);
                    replies.push(Box::new(move |committed| {
                        let _ = reply.send(committed.and(outcome));
                    }));
                }
            }
        }
        tx.commit()?;
        Ok(())
    })();
    if let Err(e) = &result {
        tracing::error!(error = %e, "relay store commit failed");
    }
    for reply in replies {
        reply(result.clone());
    }
}

fn put(
    tx: &redb::WriteTransaction,
    limits: &StoreLimits,
    envelopes: Vec<Envelope>,
    now: u64,
) -> Result<PutOutcome, StoreError> {
    let mut mailbox = tx.open_table(MAILBOX)?;
    let mut ids = tx.open_table(ENVELOPE_IDS)?;
    let mut sizes = tx.open_table(MAILBOX_SIZES)?;
    let mut meta = tx.open_table(META)?;
    let mut arrival = meta.get(NEXT_ARRIVAL)?.map(|v| v.value()).unwrap_or(0);
    let mut outcome = PutOutcome::default();
    // Waiting envelopes per mailbox touched by this batch, written back once at the end.
    let mut sizes_now: HashMap<Vec<u8>, u64> = HashMap::new();
    for envelope in envelopes {
        if ids.get(&envelope.id.0)?.is_some() {
            outcome.duplicates.push(envelope.id);
            continue;
        }
        let key = envelope.to_device.to_bytes();
        let size = match sizes_now.get(&key) {
            Some(size) => *size,
            None => sizes.get(key.as_slice())?.map(|v| v.value()).unwrap_or(0),
        };
        if size >= limits.max_per_mailbox {
            outcome.over_quota.push(envelope.id);
            continue;
        }
        let record = IdRecord { mailbox: key.clone(), arrival, expires_at: now + limits.ttl.as_secs() };
        let bytes = postcard::to_stdvec(&envelope).map_err(|e| StoreError::Db(e.to_string()))?;
        mailbox.insert((key.as_slice(), arrival), bytes.as_slice())?;
        ids.insert(
            &envelope.id.0,
            postcard::to_stdvec(&record).map_err(|e| StoreError::Db(e.to_string()))?.as_slice(),
        )?;
        sizes_now.insert(key, size + 1);
        outcome.stored.push(envelope.id);
        arrival += 1;
    }
    for (key, size) in sizes_now {
        sizes.insert(key.as_slice(), size)?;
    }
    meta.insert(NEXT_ARRIVAL, arrival)?;
    Ok(outcome)
}

fn fetch(db: &Database, mailbox: &PeerId, max: usize) -> Result<(Vec<Envelope>, bool), StoreError> {
    use redb::ReadableDatabase;
    let tx = db.begin_read()?;
    let table = tx.open_table(MAILBOX)?;
    let key = mailbox.to_bytes();
    let mut out = Vec::new();
    let mut more = false;
    for entry in table.range((key.as_slice(), 0)..=(key.as_slice(), u64::MAX))? {
        if out.len() == max {
            more = true;
            break;
        }
        let (_, value) = entry?;
        match postcard::from_bytes::<Envelope>(value.value()) {
            Ok(envelope) => out.push(envelope),
            Err(e) => tracing::error!(error = %e, "skipping a corrupt stored envelope"),
        }
    }
    Ok((out, more))
}

fn delete(tx: &redb::WriteTransaction, mailbox: &PeerId, delivered: &[EnvelopeId]) -> Result<u32, StoreError> {
    let mut table = tx.open_table(MAILBOX)?;
    let ids = tx.open_table(ENVELOPE_IDS)?;
    let mut sizes = tx.open_table(MAILBOX_SIZES)?;
    let key = mailbox.to_bytes();
    let mut count = 0;
    for id in delivered {
        let Some(record) = ids.get(&id.0)?.and_then(|v| postcard::from_bytes::<IdRecord>(v.value()).ok()) else {
            continue;
        };
        // Only the mailbox's owner may delete from it. The id record stays (a replay is still
        // a duplicate); the missing mailbox entry is what says "delivered".
        if record.mailbox == key && table.remove((key.as_slice(), record.arrival))?.is_some() {
            count += 1;
        }
    }
    if count > 0 {
        let size = sizes.get(key.as_slice())?.map(|v| v.value()).unwrap_or(0);
        sizes.insert(key.as_slice(), size.saturating_sub(u64::from(count)))?;
    }
    Ok(count)
}

fn expire(tx: &redb::WriteTransaction, now: u64) -> Result<u32, StoreError> {
    let mut table = tx.open_table(MAILBOX)?;
    let mut ids = tx.open_table(ENVELOPE_IDS)?;
    let mut sizes = tx.open_table(MAILBOX_SIZES)?;
    let mut expired = Vec::new();
    for entry in ids.iter()? {
        let (id, value) = entry?;
        if let Ok(record) = postcard::from_bytes::<IdRecord>(value.value())
            && record.expires_at <= now
        {
            expired.push((*id.value(), record));
        }
    }
    let mut dropped = 0;
    for (id, record) in expired {
        ids.remove(&id)?;
        if table.remove((record.mailbox.as_slice(), record.arrival))?.is_some() {
            let size = sizes.get(record.mailbox.as_slice())?.map(|v| v.value()).unwrap_or(0);
            sizes.insert(record.mailbox.as_slice(), size.saturating_sub(1))?;
            dropped += 1;
        }
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use meshgram_node::ids::UserId;

    use super::*;

    fn envelope(to: PeerId, seq: u64) -> Envelope {
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
        StoreHandle::open(&dir.join("relay.redb"), StoreLimits { ttl: Duration::from_secs(100), max_per_mailbox })
            .unwrap()
    }

    #[tokio::test]
    async fn envelopes_are_kept_in_order_deduplicated_and_deleted_on_ack() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1000);
        let (bob, carol) = (PeerId::random(), PeerId::random());
        let batch: Vec<_> = (0..5).map(|i| envelope(bob, i)).collect();
        let outcome = store.put(batch.clone(), 1).await.unwrap();
        assert_eq!(outcome.stored.len(), 5);
        store.put(vec![envelope(carol, 0)], 1).await.unwrap();

        let replay = store.put(vec![batch[0].clone()], 2).await.unwrap();
        assert_eq!(replay.duplicates, vec![batch[0].id]);

        let (got, more) = store.fetch(bob, 3).unwrap();
        assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), [0, 1, 2]);
        assert!(more);

        // Carol cannot delete Bob's envelopes; Bob can.
        assert_eq!(store.delete(carol, vec![batch[0].id]).await.unwrap(), 0);
        assert_eq!(store.delete(bob, batch.iter().map(|e| e.id).collect()).await.unwrap(), 5);
        assert!(store.fetch(bob, 10).unwrap().0.is_empty());
        // A delivered envelope replayed is still a duplicate.
        assert_eq!(store.put(vec![batch[1].clone()], 3).await.unwrap().duplicates.len(), 1);
        assert_eq!(store.fetch(carol, 10).unwrap().0.len(), 1);
    }

    #[tokio::test]
    async fn quotas_and_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 2);
        let bob = PeerId::random();
        let outcome = store.put((0..3).map(|i| envelope(bob, i)).collect(), 0).await.unwrap();
        assert_eq!((outcome.stored.len(), outcome.over_quota.len()), (2, 1));
        assert_eq!(store.expire(99).await.unwrap(), 0);
        assert_eq!(store.expire(100).await.unwrap(), 2);
        assert!(store.fetch(bob, 10).unwrap().0.is_empty());
        assert_eq!(store.put(vec![envelope(bob, 9)], 100).await.unwrap().stored.len(), 1, "quota freed");
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let bob = PeerId::random();
        {
            let store = open(dir.path(), 10);
            store.put(vec![envelope(bob, 0)], 0).await.unwrap();
        }
        // The actor thread exits when its handle is dropped; give it a moment to release the file.
        let mut reopened = None;
        for _ in 0..50 {
            match StoreHandle::open(
                &dir.path().join("relay.redb"),
                StoreLimits { ttl: Duration::from_secs(100), max_per_mailbox: 10 },
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
}
