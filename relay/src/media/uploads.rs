//! The upload index: which parts of which upload are saved, by whom, in `DATA/media.redb`
//! (apart from the mailbox store, whose write-ahead log and group commit suit small envelopes,
//! not this). Every write commits with `Durability::Immediate`: a part is acknowledged only
//! once its record is on disk. Calls run on `spawn_blocking`.
//!
//! Tables:
//! - `uploads`: file id → (owner, total parts, created at unix s).
//! - `parts`: (file id, part) → (chunk hash, stored size).
//! - `usage`: owner → bytes of the chunks recorded for them here (the quota's figure).
//! - `chunk_refs`: chunk hash → how many recorded parts here name it (so a chunk is deleted
//!   only when no upload recorded here still names it).
//!
//! An upload not complete (every part recorded) within the grace period after it began is
//! expired: its records go, its bytes are given back to its owner's quota, and its chunks are
//! deleted on their holders ([`super::MediaServer::expire_uploads`]).

use std::path::Path;
use std::sync::Arc;

use meshgram_node::crypto::cert::unix_now;
use meshgram_node::ids::UserId;
use meshgram_node::proto::media::{ChunkHash, FileId, PartRecord};
#[cfg(test)]
use meshgram_node::proto::media::{MAX_CHUNK_SIZE, MAX_PARTS};
use meshgram_node::proto::{ErrorCode, WireError};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

/// The index's file inside the data dir.
pub(crate) const MEDIA_DATABASE_FILE: &str = "media.redb";

const UPLOADS: TableDefinition<&[u8; 16], (u64, u32, u64)> = TableDefinition::new("uploads");
/// (file id, part).
type PartKey = (&'static [u8; 16], u32);
/// (chunk hash, stored size).
type PartValue = ([u8; 32], u32);
const PARTS: TableDefinition<PartKey, PartValue> = TableDefinition::new("parts");
const USAGE: TableDefinition<u64, u64> = TableDefinition::new("usage");
const CHUNK_REFS: TableDefinition<&[u8; 32], u32> = TableDefinition::new("chunk_refs");

const MIB: u64 = 1 << 20;

/// An upload as recorded here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UploadStatus {
    pub(crate) owner: UserId,
    pub(crate) total_parts: u32,
    /// Saved parts, ascending.
    pub(crate) saved: Vec<u32>,
    /// The chunk each saved part was saved with, in the same order.
    pub(crate) hashes: Vec<ChunkHash>,
}

/// What expiring unfinished uploads did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Expired {
    pub(crate) uploads: u64,
    /// Chunks no upload recorded here names any more.
    pub(crate) chunks: Vec<ChunkHash>,
}

/// What recording a part did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recorded {
    New,
    /// The same part with the same hash was recorded before.
    Duplicate,
}

/// The upload index; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct UploadIndex {
    db: Arc<Database>,
    /// Bytes of chunks one owner may have recorded here.
    quota: u64,
}

impl UploadIndex {
    /// Opens (creating) the index at `path`.
    pub(crate) fn open(path: &Path, quota: u64) -> Result<Self, redb::Error> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(UPLOADS)?;
        tx.open_table(PARTS)?;
        tx.open_table(USAGE)?;
        tx.open_table(CHUNK_REFS)?;
        tx.commit()?;
        Ok(UploadIndex { db: Arc::new(db), quota })
    }

    /// Whether `record` would be taken (owner, total, hash, quota), without writing anything:
    /// checked before the part's chunk is stored anywhere.
    pub(crate) fn check_blocking(&self, record: &PartRecord) -> Result<Recorded, WireError> {
        let tx = self.db.begin_read().map_err(db_error)?;
        let uploads = tx.open_table(UPLOADS).map_err(db_error)?;
        let parts = tx.open_table(PARTS).map_err(db_error)?;
        let usage = tx.open_table(USAGE).map_err(db_error)?;
        validate(&uploads, &parts, &usage, record, self.quota)
    }

    /// Records a saved part, durably; idempotent. Refused (and nothing written) if the upload
    /// is another user's (`FORBIDDEN`), had another `total_parts` or had this part saved with
    /// another hash (`BAD_REQUEST`), or the owner's quota here is full (`QUOTA_EXCEEDED`).
    pub(crate) fn record_blocking(&self, record: &PartRecord) -> Result<Recorded, WireError> {
        let mut tx = self.db.begin_write().map_err(db_error)?;
        tx.set_durability(Durability::Immediate).map_err(db_error)?;
        let verdict = {
            let mut uploads = tx.open_table(UPLOADS).map_err(db_error)?;
            let mut parts = tx.open_table(PARTS).map_err(db_error)?;
            let mut usage = tx.open_table(USAGE).map_err(db_error)?;
            let verdict = validate(&uploads, &parts, &usage, record, self.quota)?;
            if verdict == Recorded::New {
                let file = &record.file_id.0;
                if uploads.get(file).map_err(db_error)?.is_none() {
                    uploads.insert(file, (record.owner.0, record.total_parts, unix_now())).map_err(db_error)?;
                }
                parts.insert((file, record.part), (record.hash.0, record.size)).map_err(db_error)?;
                let mut refs = tx.open_table(CHUNK_REFS).map_err(db_error)?;
                let named = refs.get(&record.hash.0).map_err(db_error)?.map_or(0, |v| v.value());
                refs.insert(&record.hash.0, named + 1).map_err(db_error)?;
                let used = usage.get(record.owner.0).map_err(db_error)?.map_or(0, |v| v.value());
                usage.insert(record.owner.0, used + u64::from(record.size)).map_err(db_error)?;
            }
            verdict
        };
        if verdict == Recorded::New {
            tx.commit().map_err(db_error)?;
        }
        Ok(verdict)
    }

    /// The upload `file_id` as recorded here, if it is.
    pub(crate) fn status_blocking(&self, file_id: &FileId) -> Result<Option<UploadStatus>, WireError> {
        let tx = self.db.begin_read().map_err(db_error)?;
        let Some(upload) = tx.open_table(UPLOADS).map_err(db_error)?.get(&file_id.0).map_err(db_error)? else {
            return Ok(None);
        };
        let (owner, total_parts, _) = upload.value();
        let parts = tx.open_table(PARTS).map_err(db_error)?;
        let (mut saved, mut hashes) = (Vec::new(), Vec::new());
        for entry in parts.range((&file_id.0, 0)..=(&file_id.0, u32::MAX)).map_err(db_error)? {
            let (key, value) = entry.map_err(db_error)?;
            saved.push(key.value().1);
            hashes.push(ChunkHash(value.value().0));
        }
        Ok(Some(UploadStatus { owner: UserId(owner), total_parts, saved, hashes }))
    }

    /// Every part record of `file_id` held here, by part.
    pub(crate) fn records_blocking(&self, file_id: &FileId) -> Result<Vec<PartRecord>, WireError> {
        let tx = self.db.begin_read().map_err(db_error)?;
        let Some(upload) = tx.open_table(UPLOADS).map_err(db_error)?.get(&file_id.0).map_err(db_error)? else {
            return Ok(Vec::new());
        };
        let (owner, total_parts, _) = upload.value();
        let parts = tx.open_table(PARTS).map_err(db_error)?;
        let mut records = Vec::new();
        for entry in parts.range((&file_id.0, 0)..=(&file_id.0, u32::MAX)).map_err(db_error)? {
            let (key, value) = entry.map_err(db_error)?;
            let ((_, part), (hash, size)) = (key.value(), value.value());
            records.push(PartRecord {
                file_id: *file_id,
                owner: UserId(owner),
                part,
                total_parts,
                hash: ChunkHash(hash),
                size,
            });
        }
        Ok(records)
    }

    /// Every upload recorded here.
    pub(crate) fn uploads_blocking(&self) -> Result<Vec<FileId>, WireError> {
        let tx = self.db.begin_read().map_err(db_error)?;
        let mut files = Vec::new();
        for entry in tx.open_table(UPLOADS).map_err(db_error)?.iter().map_err(db_error)? {
            files.push(FileId(*entry.map_err(db_error)?.0.value()));
        }
        Ok(files)
    }

    /// Bytes recorded for `owner` here.
    #[cfg(test)]
    fn used_blocking(&self, owner: UserId) -> u64 {
        let tx = self.db.begin_read().unwrap();
        tx.open_table(USAGE).unwrap().get(owner.0).unwrap().map_or(0, |v| v.value())
    }

    /// See [`UploadIndex::check_blocking`].
    pub(crate) async fn check(&self, record: PartRecord) -> Result<Recorded, WireError> {
        let index = self.clone();
        blocking(move || index.check_blocking(&record)).await
    }

    /// See [`UploadIndex::record_blocking`].
    pub(crate) async fn record(&self, record: PartRecord) -> Result<Recorded, WireError> {
        let index = self.clone();
        blocking(move || index.record_blocking(&record)).await
    }

    /// Expires the uploads begun before `begun_before` (unix s) that are not complete: their
    /// records go and their bytes go back to their owners. Returns the chunks no upload here
    /// names any more, to delete on their holders.
    pub(crate) fn expire_incomplete_blocking(&self, begun_before: u64) -> Result<Expired, WireError> {
        let mut tx = self.db.begin_write().map_err(db_error)?;
        tx.set_durability(Durability::Immediate).map_err(db_error)?;
        let mut expired = Expired::default();
        {
            let mut uploads = tx.open_table(UPLOADS).map_err(db_error)?;
            let mut parts = tx.open_table(PARTS).map_err(db_error)?;
            let mut usage = tx.open_table(USAGE).map_err(db_error)?;
            let mut refs = tx.open_table(CHUNK_REFS).map_err(db_error)?;
            let mut stale = Vec::new();
            for entry in uploads.iter().map_err(db_error)? {
                let (file, upload) = entry.map_err(db_error)?;
                let (owner, total_parts, created) = upload.value();
                if created < begun_before {
                    stale.push((*file.value(), owner, total_parts));
                }
            }
            for (file, owner, total_parts) in stale {
                let mut recorded = Vec::new();
                for entry in parts.range((&file, 0)..=(&file, u32::MAX)).map_err(db_error)? {
                    let (key, value) = entry.map_err(db_error)?;
                    recorded.push((key.value().1, value.value()));
                }
                if recorded.len() as u32 >= total_parts {
                    continue;
                }
                let mut freed = 0u64;
                for (part, (hash, size)) in recorded {
                    parts.remove((&file, part)).map_err(db_error)?;
                    freed += u64::from(size);
                    let named = refs.get(&hash).map_err(db_error)?.map_or(0, |v| v.value());
                    if named <= 1 {
                        refs.remove(&hash).map_err(db_error)?;
                        expired.chunks.push(ChunkHash(hash));
                    } else {
                        refs.insert(&hash, named - 1).map_err(db_error)?;
                    }
                }
                uploads.remove(&file).map_err(db_error)?;
                let used = usage.get(owner).map_err(db_error)?.map_or(0, |v| v.value());
                usage.insert(owner, used.saturating_sub(freed)).map_err(db_error)?;
                expired.uploads += 1;
            }
        }
        tx.commit().map_err(db_error)?;
        Ok(expired)
    }

    /// Those of `hashes` that some upload recorded here names.
    pub(crate) fn named_blocking(&self, hashes: &[ChunkHash]) -> Result<Vec<ChunkHash>, WireError> {
        let tx = self.db.begin_read().map_err(db_error)?;
        let refs = tx.open_table(CHUNK_REFS).map_err(db_error)?;
        let mut named = Vec::new();
        for hash in hashes {
            if refs.get(&hash.0).map_err(db_error)?.is_some() {
                named.push(*hash);
            }
        }
        Ok(named)
    }

    /// See [`UploadIndex::expire_incomplete_blocking`].
    pub(crate) async fn expire_incomplete(&self, begun_before: u64) -> Result<Expired, WireError> {
        let index = self.clone();
        blocking(move || index.expire_incomplete_blocking(begun_before)).await
    }

    /// See [`UploadIndex::named_blocking`].
    pub(crate) async fn named(&self, hashes: Vec<ChunkHash>) -> Result<Vec<ChunkHash>, WireError> {
        let index = self.clone();
        blocking(move || index.named_blocking(&hashes)).await
    }

    /// See [`UploadIndex::status_blocking`].
    pub(crate) async fn status(&self, file_id: FileId) -> Result<Option<UploadStatus>, WireError> {
        let index = self.clone();
        blocking(move || index.status_blocking(&file_id)).await
    }
}

/// Whether `record` fits what is recorded: see [`UploadIndex::record_blocking`].
fn validate(
    uploads: &impl ReadableTable<&'static [u8; 16], (u64, u32, u64)>,
    parts: &impl ReadableTable<PartKey, PartValue>,
    usage: &impl ReadableTable<u64, u64>,
    record: &PartRecord,
    quota: u64,
) -> Result<Recorded, WireError> {
    let PartRecord { file_id, owner, part, total_parts, hash, size } = record;
    let bad = |message: String| Err(WireError::new(ErrorCode::BadRequest, message));
    // Never trust the relay that passed it on.
    super::check_part(*part, *total_parts, *size as usize)?;
    if let Some(upload) = uploads.get(&file_id.0).map_err(db_error)? {
        let (recorded_owner, recorded_total, _) = upload.value();
        if recorded_owner != owner.0 {
            return Err(WireError::new(ErrorCode::Forbidden, format!("file_id {file_id} belongs to another user")));
        }
        if recorded_total != *total_parts {
            return bad(format!(
                "file {file_id} was started with {recorded_total} parts; this part says {total_parts}"
            ));
        }
        if let Some(saved) = parts.get((&file_id.0, *part)).map_err(db_error)? {
            let saved = ChunkHash(saved.value().0);
            if saved == *hash {
                return Ok(Recorded::Duplicate);
            }
            return bad(format!("part {part} of file {file_id} was saved with chunk {saved}; this one is {hash}"));
        }
    }
    let used = usage.get(owner.0).map_err(db_error)?.map_or(0, |v| v.value());
    if used + u64::from(*size) > quota {
        return Err(WireError::new(
            ErrorCode::QuotaExceeded,
            format!(
                "user {owner} has {used} of {quota} bytes of files here ({} of {} MiB); this part needs {size} more",
                used / MIB,
                quota / MIB
            ),
        ));
    }
    Ok(Recorded::New)
}

fn db_error(e: impl Into<redb::Error>) -> WireError {
    let e: redb::Error = e.into();
    tracing::error!(error = %e, "upload index failure");
    WireError::new(ErrorCode::Internal, format!("upload index: {e}"))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, WireError> + Send + 'static,
) -> Result<T, WireError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| WireError::new(ErrorCode::Internal, format!("an upload index task did not finish: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(quota: u64) -> (tempfile::TempDir, UploadIndex) {
        let dir = tempfile::tempdir().unwrap();
        let index = UploadIndex::open(&dir.path().join(MEDIA_DATABASE_FILE), quota).unwrap();
        (dir, index)
    }

    fn record(file_id: FileId, owner: u64, part: u32, total_parts: u32, size: u32) -> PartRecord {
        let hash = ChunkHash::of(&[part as u8, owner as u8, size as u8]);
        PartRecord { file_id, owner: UserId(owner), part, total_parts, hash, size }
    }

    #[test]
    fn parts_are_recorded_once_and_the_status_lists_them() {
        let (_dir, index) = index(u64::MAX);
        let file = FileId::random();
        assert_eq!(index.status_blocking(&file).unwrap(), None);
        assert_eq!(index.record_blocking(&record(file, 7, 2, 3, 100)).unwrap(), Recorded::New);
        assert_eq!(index.record_blocking(&record(file, 7, 0, 3, 100)).unwrap(), Recorded::New);
        assert_eq!(index.check_blocking(&record(file, 7, 0, 3, 100)).unwrap(), Recorded::Duplicate);
        assert_eq!(index.record_blocking(&record(file, 7, 0, 3, 100)).unwrap(), Recorded::Duplicate);
        let status = index.status_blocking(&file).unwrap().unwrap();
        assert_eq!((status.owner, status.total_parts, status.saved), (UserId(7), 3, vec![0, 2]));
        assert_eq!(index.used_blocking(UserId(7)), 200, "a duplicate counts once");
        assert_eq!(index.records_blocking(&file).unwrap().len(), 2);
        assert_eq!(index.uploads_blocking().unwrap(), vec![file]);
    }

    #[test]
    fn another_owner_is_forbidden() {
        let (_dir, index) = index(u64::MAX);
        let file = FileId::random();
        index.record_blocking(&record(file, 7, 0, 3, 100)).unwrap();
        let err = index.record_blocking(&record(file, 8, 1, 3, 100)).unwrap_err();
        assert_eq!(err.code, ErrorCode::Forbidden);
        assert_eq!(err.message, format!("file_id {file} belongs to another user"));
        assert_eq!(index.check_blocking(&record(file, 8, 1, 3, 100)).unwrap_err().code, ErrorCode::Forbidden);
        assert_eq!(index.used_blocking(UserId(8)), 0);
    }

    #[test]
    fn unfinished_uploads_expire_and_give_their_bytes_back() {
        let (_dir, index) = index(1000);
        let (done, unfinished) = (record(FileId::random(), 7, 0, 1, 300), record(FileId::random(), 7, 0, 2, 200));
        index.record_blocking(&done).unwrap();
        index.record_blocking(&unfinished).unwrap();
        assert!(index.expire_incomplete_blocking(unix_now() - 60).unwrap().uploads == 0, "not past its grace yet");
        let expired = index.expire_incomplete_blocking(unix_now() + 1).unwrap();
        assert_eq!(expired, Expired { uploads: 1, chunks: vec![unfinished.hash] });
        assert!(index.status_blocking(&unfinished.file_id).unwrap().is_none());
        assert!(index.status_blocking(&done.file_id).unwrap().is_some(), "a finished upload stays");
        assert_eq!(index.named_blocking(&[done.hash, unfinished.hash]).unwrap(), vec![done.hash]);
        // Its 200 bytes are back: 300 used of 1000, so 700 more fit.
        index.record_blocking(&record(FileId::random(), 7, 0, 1, 700)).unwrap();
    }

    #[test]
    fn a_changed_total_is_refused_with_both_numbers() {
        let (_dir, index) = index(u64::MAX);
        let file = FileId::random();
        index.record_blocking(&record(file, 7, 0, 3, 100)).unwrap();
        let err = index.record_blocking(&record(file, 7, 1, 4, 100)).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
        assert!(err.message.contains("3 parts") && err.message.contains("says 4"), "{}", err.message);
    }

    #[test]
    fn a_saved_part_with_another_hash_is_refused() {
        let (_dir, index) = index(u64::MAX);
        let file = FileId::random();
        let first = record(file, 7, 0, 3, 100);
        index.record_blocking(&first).unwrap();
        let other = PartRecord { hash: ChunkHash::of(b"other"), ..first.clone() };
        let err = index.record_blocking(&other).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
        assert!(err.message.contains(&first.hash.to_string()), "{}", err.message);
        assert_eq!(index.status_blocking(&file).unwrap().unwrap().saved, vec![0]);
    }

    #[test]
    fn parts_out_of_range_are_refused() {
        let (_dir, index) = index(u64::MAX);
        let file = FileId::random();
        for (part, total, size) in
            [(3, 3, 1), (0, 0, 1), (0, MAX_PARTS + 1, 1), (0, 1, 0), (0, 1, MAX_CHUNK_SIZE as u32 + 1)]
        {
            let err = index.record_blocking(&record(file, 7, part, total, size)).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest, "part {part} of {total}, {size} bytes");
        }
        assert_eq!(index.record_blocking(&record(file, 7, MAX_PARTS - 1, MAX_PARTS, 1)).unwrap(), Recorded::New);
    }

    #[test]
    fn the_quota_is_per_owner_and_named_in_the_refusal() {
        let quota = 3 * MIB;
        let (_dir, index) = index(quota);
        let file = FileId::random();
        let mib = MIB as u32;
        index.record_blocking(&record(file, 7, 0, 4, mib)).unwrap();
        index.record_blocking(&record(file, 7, 1, 4, mib)).unwrap();
        index.record_blocking(&record(file, 7, 2, 4, mib)).unwrap();
        let err = index.record_blocking(&record(file, 7, 3, 4, 1)).unwrap_err();
        assert_eq!(err.code, ErrorCode::QuotaExceeded);
        assert!(err.message.contains(&format!("{} of {quota} bytes", 3 * MIB)), "{}", err.message);
        assert!(err.message.contains("3 of 3 MiB"), "{}", err.message);
        assert_eq!(index.check_blocking(&record(file, 7, 3, 4, 1)).unwrap_err().code, ErrorCode::QuotaExceeded);
        assert_eq!(index.record_blocking(&record(file, 7, 2, 4, mib)).unwrap(), Recorded::Duplicate, "saved already");
        assert_eq!(
            index.record_blocking(&record(FileId::random(), 8, 0, 1, mib)).unwrap(),
            Recorded::New,
            "another owner"
        );
    }
}
