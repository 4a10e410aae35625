//! The store's write-ahead log: what makes a put durable.
//!
//! A redb commit that fsyncs costs ~270 µs of CPU on the 2-vCPU machine this was measured on,
//! whatever little it writes (each table it touches means more pages to write and sync), and at
//! a steady trickle of messages each `Send` is its own commit. Appending the batch to this log
//! and syncing it costs ~50 µs, and redb then commits without syncing (~50 µs). Every
//! [`CHECKPOINT_EVERY`](crate::store) the store makes redb durable with one syncing commit
//! and empties the log. On open, the records still in the log are applied again: a put of an
//! envelope already there is a duplicate and a delete of one already gone does nothing, so
//! records that did reach redb before a crash do no harm.
//!
//! Layout: records one after another, each `[payload length u32 LE][first 8 bytes of the
//! payload's blake3][postcard payload]`. A torn or corrupt record ends the log: it is the batch
//! whose sync did not finish, which nobody was told was stored.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write as _};
use std::path::Path;

use libp2p::PeerId;
use meshgram_node::proto::envelope::{Envelope, EnvelopeId};
use serde::{Deserialize, Serialize};

const HEADER: usize = 12;

/// One write the store applies.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Write {
    Put { envelopes: Vec<Envelope>, now: u64 },
    Delete { mailbox: PeerId, ids: Vec<EnvelopeId> },
    Expire { now: u64 },
}

impl Write {
    /// The envelopes a put stores (none for other writes).
    pub(crate) fn envelopes(&self) -> &[Envelope] {
        match self {
            Write::Put { envelopes, .. } => envelopes,
            Write::Delete { .. } | Write::Expire { .. } => &[],
        }
    }
}

/// The log file, positioned at its end.
#[derive(Debug)]
pub(crate) struct Wal {
    file: File,
    len: u64,
}

impl Wal {
    /// Opens (or creates) the log and reads the batches it holds, in order. A torn tail is cut
    /// off so that new records follow the last whole one.
    pub(crate) fn open(path: &Path) -> io::Result<(Wal, Vec<Vec<Write>>)> {
        let mut file = OpenOptions::new().create(true).read(true).write(true).truncate(false).open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let mut batches = Vec::new();
        let mut at = 0;
        while let Some((batch, next)) = decode(&bytes, at) {
            batches.push(batch);
            at = next;
        }
        if at < bytes.len() {
            tracing::warn!(path = %path.display(), kept = at, dropped = bytes.len() - at, "write-ahead log has a torn tail; cutting it off");
            file.set_len(at as u64)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::Start(at as u64))?;
        Ok((Wal { file, len: at as u64 }, batches))
    }

    /// Appends one batch; with `sync`, returns once it is on disk.
    pub(crate) fn append(&mut self, batch: &[&Write], sync: bool) -> io::Result<()> {
        // The header's place first, filled in once the payload is encoded after it; room for
        // the envelopes' sealed bytes and routing fields, so the encoding never regrows.
        let room: usize = batch.iter().flat_map(|w| w.envelopes()).map(|e| e.sealed.len() + 160).sum();
        let mut buffer = Vec::with_capacity(HEADER + room + 64);
        buffer.resize(HEADER, 0);
        let mut record = postcard::to_extend(batch, buffer).map_err(io::Error::other)?;
        let Ok(len) = u32::try_from(record.len() - HEADER) else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a batch of 4 GiB or more"));
        };
        let checksum = blake3::hash(&record[HEADER..]);
        record[..4].copy_from_slice(&len.to_le_bytes());
        record[4..HEADER].copy_from_slice(&checksum.as_bytes()[..8]);
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

/// The batch at `at` and where the next record starts; `None` at the end or at a torn record.
fn decode(bytes: &[u8], at: usize) -> Option<(Vec<Write>, usize)> {
    let header = bytes.get(at..at + HEADER)?;
    let len = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
    let payload = bytes.get(at + HEADER..at + HEADER + len)?;
    if blake3::hash(payload).as_bytes()[..8] != header[4..] {
        return None;
    }
    Some((postcard::from_bytes(payload).ok()?, at + HEADER + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delete(n: u8) -> Vec<Write> {
        vec![Write::Delete { mailbox: PeerId::random(), ids: vec![EnvelopeId([n; 16])] }]
    }

    fn ids(batches: &[Vec<Write>]) -> Vec<u8> {
        batches
            .iter()
            .flatten()
            .map(|w| match w {
                Write::Delete { ids, .. } => ids[0].0[0],
                _ => unreachable!(),
            })
            .collect()
    }

    #[test]
    fn batches_come_back_in_order_and_a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, old) = Wal::open(&path).unwrap();
        assert!(old.is_empty());
        for n in 1..=3 {
            wal.append(&delete(n).iter().collect::<Vec<_>>(), n == 3).unwrap();
        }
        let whole = wal.len();
        drop(wal);
        // A crash in the middle of the fourth append.
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[200, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(file);

        let (mut wal, batches) = Wal::open(&path).unwrap();
        assert_eq!(ids(&batches), [1, 2, 3]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole, "the torn record is gone");
        wal.append(&delete(4).iter().collect::<Vec<_>>(), true).unwrap();
        drop(wal);
        let (mut wal, batches) = Wal::open(&path).unwrap();
        assert_eq!(ids(&batches), [1, 2, 3, 4]);

        wal.clear().unwrap();
        drop(wal);
        assert!(Wal::open(&path).unwrap().1.is_empty());
    }

    #[test]
    fn a_corrupt_record_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, _) = Wal::open(&path).unwrap();
        let append = |wal: &mut Wal, n: u8| wal.append(&delete(n).iter().collect::<Vec<_>>(), true).unwrap();
        append(&mut wal, 1);
        let first = wal.len();
        append(&mut wal, 2);
        append(&mut wal, 3);
        drop(wal);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[first as usize + HEADER] ^= 0xff; // the second record's payload
        std::fs::write(&path, bytes).unwrap();
        let (_, batches) = Wal::open(&path).unwrap();
        assert_eq!(ids(&batches), [1]);
    }
}
