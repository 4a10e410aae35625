//! The store's write-ahead log: what makes a put durable.
//!
//! A redb commit that fsyncs costs ~270 µs of CPU on the 2-vCPU machine this was measured on,
//! whatever little it writes (each table it touches means more pages to write and sync), and at
//! a steady trickle of messages each `Send` is its own commit. Appending the batch to this log
//! and syncing it costs ~50 µs, and redb then commits without syncing (~50 µs). Every
//! [`CHECKPOINT_EVERY`](crate::store) the store makes redb durable with one syncing commit
//! and empties the log. On open, the records still in the log are applied again ([`Replay`]).
//!
//! What is logged is each write's [`Effect`], decided in the transaction that applied it (which
//! envelopes were stored, until when their ids are kept), not the request: applying it again
//! needs no limit of the moment, so a relay restarted with a smaller quota or TTL still applies
//! everything it acknowledged. A store of an envelope already there does nothing and a delete
//! of one already gone does nothing, so records that did reach redb before a crash do no harm.
//!
//! Layout: records one after another, each `[MAGIC][payload length u32 LE][first 8 bytes of
//! the payload's blake3][first 4 bytes of the blake3 of the 16 header bytes before]` then the
//! postcard payload. The header's own checksum makes a length trustworthy before anything is
//! read on its word, so that damage never makes replay read far or allocate much. A record
//! that does not verify is passed over and replay goes on with the next one that does (found by
//! its length if its header verifies, else by scanning for the next header that verifies):
//! damage in the middle costs only the records it hit. Damage with no intact record after it is
//! the tail: the batch whose sync did not finish, which nobody was told was stored.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use libp2p::PeerId;
use meshgram_node::proto::SignedAck;
use meshgram_node::proto::envelope::{Envelope, EnvelopeId};
use serde::{Deserialize, Serialize};

/// How a record starts, so that replay can find the next one after damage.
const MAGIC: [u8; 4] = *b"MGwl";
/// Magic, payload length, payload checksum, header checksum.
const HEADER: usize = 20;
/// What the header checksum covers: everything in the header before it.
const HEADER_CHECKED: usize = 16;
/// Read ahead while replaying (records are mostly far smaller than this), and read at a time
/// while scanning damage for the next header.
const READ_CHUNK: usize = 64 * 1024;

/// What the log keeps of one applied write, decided when it was applied. `E` is
/// `&Envelope` when appending (no copy of the envelopes) and `Envelope` when replaying: the
/// encoding is the same.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Effect<E = Envelope> {
    /// Envelopes stored (duplicates and those refused over quota left out), their ids kept until
    /// `expires_at` (Unix seconds).
    Store { envelopes: Vec<E>, expires_at: u64 },
    /// Envelopes of `mailbox` deleted on its owner's acknowledgement.
    Delete { mailbox: PeerId, ids: Vec<EnvelopeId> },
    /// Envelopes and ids past their TTL at `now` dropped.
    Expire { now: u64 },
    /// Envelopes deleted on their recipient's signed acknowledgement, kept as proof.
    DeleteAcked { ack: SignedAck },
}

impl Effect<&Envelope> {
    /// Room for the encoding of the envelopes' sealed bytes and routing fields.
    fn encoded_room(&self) -> usize {
        match self {
            Effect::Store { envelopes, .. } => envelopes.iter().map(|e| e.sealed.len() + 160).sum(),
            Effect::Delete { ids, .. } => ids.len() * 17 + 48,
            Effect::Expire { .. } => 16,
            Effect::DeleteAcked { ack } => ack.ids.len() * 17 + ack.signature.len() + 64,
        }
    }
}

/// The log file, positioned at its end, for appending.
#[derive(Debug)]
pub(crate) struct Wal {
    file: File,
    len: u64,
}

impl Wal {
    /// Appends one batch; with `sync`, returns once it is on disk.
    pub(crate) fn append(&mut self, batch: &[Effect<&Envelope>], sync: bool) -> io::Result<()> {
        // The header's place first, filled in once the payload is encoded after it; room for
        // the envelopes, so the encoding never regrows.
        let room: usize = batch.iter().map(Effect::encoded_room).sum();
        let mut buffer = Vec::with_capacity(HEADER + room + 64);
        buffer.resize(HEADER, 0);
        let mut record = postcard::to_extend(batch, buffer).map_err(io::Error::other)?;
        let Ok(len) = u32::try_from(record.len() - HEADER) else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a batch of 4 GiB or more"));
        };
        let checksum = blake3::hash(&record[HEADER..]);
        record[..4].copy_from_slice(&MAGIC);
        record[4..8].copy_from_slice(&len.to_le_bytes());
        record[8..HEADER_CHECKED].copy_from_slice(&checksum.as_bytes()[..8]);
        let header_checksum = blake3::hash(&record[..HEADER_CHECKED]);
        record[HEADER_CHECKED..HEADER].copy_from_slice(&header_checksum.as_bytes()[..4]);
        if let Err(e) = self.file.write_all(&record) {
            // Leave no partial record for the next append to follow.
            self.file.set_len(self.len)?;
            self.file.seek(SeekFrom::Start(self.len))?;
            return Err(e);
        }
        self.len += record.len() as u64;
        if sync { self.file.sync_data() } else { Ok(()) }
    }

    /// Bytes in the log.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Empties the log, once everything in it is durable elsewhere.
    pub(crate) fn clear(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.file.sync_data()?;
        self.len = 0;
        Ok(())
    }
}

/// One batch read back from the log.
#[derive(Debug)]
pub(crate) struct LoggedBatch {
    pub(crate) effects: Vec<Effect>,
    /// Its record's size in the log.
    pub(crate) bytes: u64,
}

/// The log as the last run left it, read one record at a time: what replay holds in memory is
/// one record and a read buffer, however long the log.
#[derive(Debug)]
pub(crate) struct Replay {
    path: PathBuf,
    reader: BufReader<File>,
    /// Where `reader` is in the file.
    position: u64,
    /// Where the next record is expected.
    next: u64,
    /// The file's length when opened.
    end: u64,
    /// Bytes passed over as damaged so far, the tail included.
    damaged: u64,
}

/// What is at a place in the log.
enum Found {
    Intact(LoggedBatch),
    /// A record whose header verifies but whose payload does not: the next record may start
    /// right after it (its length is trustworthy, its header's checksum says so).
    DamagedRecord {
        next: u64,
    },
    /// No record starts here.
    NoRecord,
}

impl Replay {
    /// Opens (or creates) the log for replay. A log an older relay left (records without
    /// [`MAGIC`]) is refused, not taken for damage: it may hold acknowledged writes.
    pub(crate) fn open(path: &Path) -> io::Result<Replay> {
        let file = OpenOptions::new().create(true).read(true).write(true).truncate(false).open(path)?;
        let end = file.metadata()?.len();
        let reader = BufReader::with_capacity(READ_CHUNK, file);
        let mut replay = Replay { path: path.to_path_buf(), reader, position: 0, next: 0, end, damaged: 0 };
        if replay.starts_with_an_older_record()? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} was written by an older relay; start that version on this data dir once (it applies \
                     and empties the log), then this one",
                    path.display()
                ),
            ));
        }
        Ok(replay)
    }

    /// Whether the log starts with a whole record of the format before [`MAGIC`]:
    /// `[payload length u32 LE][first 8 bytes of the payload's blake3][payload]`.
    fn starts_with_an_older_record(&mut self) -> io::Result<bool> {
        let header = self.read_up_to(0, 12)?;
        let Some(len) = header.get(..4).and_then(|len| len.try_into().ok()).map(u32::from_le_bytes) else {
            return Ok(false);
        };
        if header[..4] == MAGIC || 12 + u64::from(len) > self.end {
            return Ok(false);
        }
        let payload = self.read_up_to(12, len as usize)?;
        Ok(blake3::hash(&payload).as_bytes()[..8] == header[4..12])
    }

    /// The next intact batch, in log order; `None` once the log is read. Damage before it is
    /// passed over, and logged.
    pub(crate) fn next_batch(&mut self) -> io::Result<Option<LoggedBatch>> {
        let mut damaged_from = None;
        while self.next < self.end {
            let at = self.next;
            match self.read_at(at)? {
                Found::Intact(batch) => {
                    if let Some(from) = damaged_from {
                        tracing::warn!(
                            path = %self.path.display(), from, skipped = at - from,
                            "write-ahead log: skipped damaged bytes; applying the records after them"
                        );
                        self.damaged += at - from;
                    }
                    self.next = at + batch.bytes;
                    return Ok(Some(batch));
                }
                Found::DamagedRecord { next } => {
                    damaged_from.get_or_insert(at);
                    self.next = next;
                }
                Found::NoRecord => {
                    damaged_from.get_or_insert(at);
                    self.next = self.next_header(at + 1)?.unwrap_or(self.end);
                }
            }
        }
        if let Some(from) = damaged_from {
            tracing::warn!(
                path = %self.path.display(), from, dropped = self.end - from,
                "write-ahead log has a torn tail (a batch whose sync did not finish); not applying it"
            );
            self.damaged += self.end - from;
        }
        Ok(None)
    }

    /// Bytes passed over as damaged so far.
    pub(crate) fn damaged_bytes(&self) -> u64 {
        self.damaged
    }

    /// Once every batch was applied and is durable elsewhere: the log, emptied, for appending.
    pub(crate) fn into_empty_log(self) -> io::Result<Wal> {
        let mut wal = Wal { file: self.reader.into_inner(), len: self.end };
        wal.clear()?;
        Ok(wal)
    }

    /// Reads up to `len` bytes at `at` (fewer only at the end of the file).
    fn read_up_to(&mut self, at: u64, len: usize) -> io::Result<Vec<u8>> {
        if at != self.position {
            // Relative, so that a seek within what is buffered keeps the buffer.
            let offset = i64::try_from(i128::from(at) - i128::from(self.position)).map_err(io::Error::other)?;
            self.reader.seek_relative(offset)?;
            self.position = at;
        }
        let mut bytes = Vec::with_capacity(len);
        (&mut self.reader).take(len as u64).read_to_end(&mut bytes)?;
        self.position += bytes.len() as u64;
        Ok(bytes)
    }

    /// The record at `at`, if one starts there.
    fn read_at(&mut self, at: u64) -> io::Result<Found> {
        let header = self.read_up_to(at, HEADER)?;
        let Some(len) = verified_payload_len(&header) else { return Ok(Found::NoRecord) };
        let next = at + (HEADER + len) as u64;
        if next > self.end {
            // Torn: the rest of the file is its unfinished payload.
            return Ok(Found::DamagedRecord { next: self.end });
        }
        let payload = self.read_up_to(at + HEADER as u64, len)?;
        if payload.len() < len || blake3::hash(&payload).as_bytes()[..8] != header[8..HEADER_CHECKED] {
            return Ok(Found::DamagedRecord { next });
        }
        match postcard::from_bytes(&payload) {
            Ok(effects) => Ok(Found::Intact(LoggedBatch { effects, bytes: next - at })),
            Err(_) => Ok(Found::DamagedRecord { next }),
        }
    }

    /// Where the first header that verifies at or after `from` starts, if any.
    fn next_header(&mut self, mut from: u64) -> io::Result<Option<u64>> {
        // Overlapping windows, so that a header across two of them is seen whole in one.
        const WINDOW: usize = READ_CHUNK + HEADER - 1;
        while from < self.end {
            let window = self.read_up_to(from, WINDOW)?;
            if let Some(start) = window.windows(HEADER).position(|header| verified_payload_len(header).is_some()) {
                return Ok(Some(from + start as u64));
            }
            if window.len() < WINDOW {
                break;
            }
            from += READ_CHUNK as u64;
        }
        Ok(None)
    }
}

/// The payload length a header gives, if it is a whole header whose checksum verifies.
fn verified_payload_len(header: &[u8]) -> Option<usize> {
    let header = header.get(..HEADER)?;
    if header[..4] != MAGIC || blake3::hash(&header[..HEADER_CHECKED]).as_bytes()[..4] != header[HEADER_CHECKED..] {
        return None;
    }
    Some(u32::from_le_bytes(header[4..8].try_into().ok()?) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(wal: &mut Wal, n: u8) {
        let delete = [Effect::Delete { mailbox: PeerId::random(), ids: vec![EnvelopeId([n; 16])] }];
        wal.append(&delete, true).unwrap();
    }

    /// The bytes of a record of the delete `n`.
    fn record(n: u8) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let mut wal = Wal { file: File::create(&path).unwrap(), len: 0 };
        append(&mut wal, n);
        std::fs::read(&path).unwrap()
    }

    /// Replays the log at `path`: the ids of its deletes, the damaged bytes, and the log emptied.
    fn replay(path: &Path) -> (Vec<u8>, u64, Wal) {
        let mut replay = Replay::open(path).unwrap();
        let mut ids = Vec::new();
        while let Some(batch) = replay.next_batch().unwrap() {
            for effect in batch.effects {
                match effect {
                    Effect::Delete { ids: deleted, .. } => ids.push(deleted[0].0[0]),
                    other => panic!("only deletes were logged, not {other:?}"),
                }
            }
        }
        let damaged = replay.damaged_bytes();
        (ids, damaged, replay.into_empty_log().unwrap())
    }

    /// Writes a log of records `1..=n` at `path`; where each record starts.
    fn log_of(path: &Path, n: u8) -> Vec<u64> {
        let (_, _, mut wal) = replay(path);
        let mut starts = Vec::new();
        for i in 1..=n {
            starts.push(wal.len());
            append(&mut wal, i);
        }
        starts
    }

    fn corrupt(path: &Path, at: u64) {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[at as usize] ^= 0xff;
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn batches_come_back_in_order_and_a_torn_tail_is_not_applied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        log_of(&path, 3);
        // A crash in the middle of the fourth append: a whole header, part of its payload.
        let fourth = record(4);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&fourth[..fourth.len() - 3]).unwrap();
        drop(file);

        let (ids, damaged, mut wal) = replay(&path);
        assert_eq!((ids, damaged), (vec![1, 2, 3], fourth.len() as u64 - 3));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "applied, the log is emptied");
        append(&mut wal, 5);
        drop(wal);
        assert_eq!(replay(&path).0, [5]);
        assert_eq!(replay(&path).0, [0u8; 0], "emptied again");
    }

    #[test]
    fn a_damaged_record_in_the_middle_costs_only_that_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        // Damage in the second record's payload (passed by its length), in its length (passed
        // by scanning for the next header that verifies), and in its magic.
        for offset in [HEADER as u64 + 2, 5, 0] {
            let starts = log_of(&path, 4);
            corrupt(&path, starts[1] + offset);
            let (ids, damaged, _) = replay(&path);
            assert_eq!((ids, damaged), (vec![1, 3, 4], starts[2] - starts[1]), "damage at +{offset}");
        }
    }

    #[test]
    fn damage_across_several_records_and_in_the_last_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let starts = log_of(&path, 6);
        corrupt(&path, starts[1] + 1);
        corrupt(&path, starts[2] + HEADER as u64 + 1);
        corrupt(&path, starts[5] + 6);
        assert_eq!(replay(&path).0, [1, 4, 5], "the records between and after the damage are applied");
    }

    #[test]
    fn a_log_of_garbage_applies_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let garbage: Vec<u8> =
            (0..3 * READ_CHUNK as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        std::fs::write(&path, &garbage).unwrap();
        let (ids, damaged, _) = replay(&path);
        assert_eq!((ids, damaged), (vec![], garbage.len() as u64));
    }

    #[test]
    fn a_log_of_the_older_format_is_refused_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let payload = b"a batch of an older relay";
        let mut older = (payload.len() as u32).to_le_bytes().to_vec();
        older.extend(&blake3::hash(payload).as_bytes()[..8]);
        older.extend(payload);
        std::fs::write(&path, &older).unwrap();
        let refused = Replay::open(&path).unwrap_err();
        assert!(refused.to_string().contains("older relay"), "{refused}");
        assert_eq!(std::fs::read(&path).unwrap(), older, "left as it was");
    }

    #[test]
    fn a_record_after_a_long_damaged_stretch_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        // More than a scan window of zeros, so that the next header straddles two windows.
        let mut bytes = record(1);
        bytes.extend(vec![0u8; READ_CHUNK + 7]);
        bytes.extend(record(2));
        bytes.extend(record(3));
        std::fs::write(&path, &bytes).unwrap();
        let (ids, damaged, _) = replay(&path);
        assert_eq!((ids, damaged), (vec![1, 2, 3], READ_CHUNK as u64 + 7));
    }
}
