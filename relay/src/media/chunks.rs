//! Media chunks on disk, one file per chunk named by its blake3 hash:
//! `DATA/chunks/<first 2 hex>/<64 hex>` (256 directories, so none grows past a few thousand
//! entries per million chunks).
//!
//! A put is durable before it returns: the bytes go to a temp file in `DATA/chunks/tmp/`, which
//! is synced, renamed into place, and its directory synced, so a chunk file is either whole or
//! absent after a crash. Temp files a crash left are removed at open. Every read checks the
//! hash: a chunk that fails it (a bad disk) is removed and answered as not held, so the copies
//! elsewhere are asked and repair brings a good one back (`media::repair`).
//!
//! The `*_blocking` methods do file I/O; the async ones run them on `spawn_blocking`, so the
//! event loop never waits on the disk.

use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use meshgram_node::proto::media::ChunkHash;
use meshgram_node::proto::{ErrorCode, WireError};

/// The chunks' directory inside the data dir.
pub(crate) const CHUNKS_DIR: &str = "chunks";
/// Where puts are written before they are renamed into place.
const TMP_DIR: &str = "tmp";

/// A chunk store failure.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChunkError {
    #[error("checksum mismatch: the bytes hash to {actual}, not {claimed}")]
    HashMismatch { claimed: ChunkHash, actual: ChunkHash },
    #[error("chunk store: {what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("a chunk store task did not finish: {0}")]
    Task(String),
}

impl ChunkError {
    fn io(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ChunkError {
        let path = path.to_path_buf();
        move |source| ChunkError::Io { what, path, source }
    }

    /// How a caller hears of it. A write that failed (a full disk, say) is `UNAVAILABLE` with
    /// its cause, so the part goes to another relay or the client sends it again; nothing is
    /// acknowledged either way.
    pub(crate) fn wire(&self) -> WireError {
        let code = match self {
            ChunkError::HashMismatch { .. } => ErrorCode::BadRequest,
            ChunkError::Io { .. } => ErrorCode::Unavailable,
            ChunkError::Task(_) => ErrorCode::Internal,
        };
        WireError::new(code, self.to_string())
    }
}

/// What a put did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Put {
    /// Written now.
    Stored,
    /// A good copy was here already.
    Duplicate,
}

/// The chunk files under one data dir; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct ChunkStore {
    root: Arc<PathBuf>,
}

impl ChunkStore {
    /// Opens (creating) `DATA/chunks` and removes the temp files a crash left.
    pub(crate) fn open(data_dir: &Path) -> Result<Self, ChunkError> {
        let root = data_dir.join(CHUNKS_DIR);
        let tmp = root.join(TMP_DIR);
        fs::create_dir_all(&tmp).map_err(ChunkError::io("creating", &tmp))?;
        for entry in fs::read_dir(&tmp).map_err(ChunkError::io("reading", &tmp))? {
            let path = entry.map_err(ChunkError::io("reading", &tmp))?.path();
            fs::remove_file(&path).map_err(ChunkError::io("removing", &path))?;
            tracing::info!(path = %path.display(), "removed a chunk a crash left half-written");
        }
        Ok(ChunkStore { root: Arc::new(root) })
    }

    fn path(&self, hash: &ChunkHash) -> PathBuf {
        chunk_path(&self.root, hash)
    }

    /// Stores `bytes` as chunk `hash`, durably, after checking that they hash to it.
    pub(crate) fn put_blocking(&self, hash: &ChunkHash, bytes: &[u8]) -> Result<Put, ChunkError> {
        let actual = ChunkHash::of(bytes);
        if actual != *hash {
            return Err(ChunkError::HashMismatch { claimed: *hash, actual });
        }
        let path = self.path(hash);
        let dir = path.parent().expect("a chunk path has a parent directory");
        // A copy that fails its hash is removed by the read, and written again here.
        if self.get_blocking(hash)?.is_some() {
            // Its writer may have failed to sync the directories (and so not acknowledged it),
            // or may still be syncing them: this acknowledgement must not rest on that.
            sync_dir(dir)?;
            sync_dir(&self.root)?;
            return Ok(Put::Duplicate);
        }
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(ChunkError::io("creating", dir))?;
            sync_dir(&self.root)?;
        }
        let tmp = self.root.join(TMP_DIR).join(format!("{hash}.{:016x}", rand::random::<u64>()));
        let written = write_synced(&tmp, bytes)
            .and_then(|()| fs::rename(&tmp, &path).map_err(ChunkError::io("renaming into place", &path)))
            .and_then(|()| sync_dir(dir));
        if written.is_err() {
            // Nothing half-written stays visible: a failed write leaves no temp file, and a
            // renamed file whose directory did not sync is not acknowledged (a later put of
            // the same chunk finds it whole, since it was synced before the rename).
            let _ = fs::remove_file(&tmp);
        }
        written.map(|()| Put::Stored)
    }

    /// Chunk `hash`, if held here and whole. One that fails its hash is removed (logged) and
    /// answered as not held.
    pub(crate) fn get_blocking(&self, hash: &ChunkHash) -> Result<Option<Vec<u8>>, ChunkError> {
        let path = self.path(hash);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ChunkError::io("reading", &path)(e)),
        };
        if ChunkHash::of(&bytes) == *hash {
            return Ok(Some(bytes));
        }
        tracing::error!(chunk = %hash, path = %path.display(), "a chunk on disk fails its hash; removing it");
        fs::remove_file(&path).map_err(ChunkError::io("removing a corrupt chunk", &path))?;
        Ok(None)
    }

    /// Of `hashes`, those not held here (by name; a held one is checked when it is read).
    pub(crate) fn missing_blocking(&self, hashes: &[ChunkHash]) -> Vec<ChunkHash> {
        hashes.iter().filter(|hash| !self.path(hash).exists()).copied().collect()
    }

    /// Deletes these chunks; returns the bytes freed.
    pub(crate) fn remove_blocking(&self, hashes: &[ChunkHash]) -> Result<u64, ChunkError> {
        let mut freed = 0;
        for hash in hashes {
            let path = self.path(hash);
            let len = match fs::metadata(&path) {
                Ok(meta) => meta.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(ChunkError::io("reading", &path)(e)),
            };
            match fs::remove_file(&path) {
                Ok(()) => freed += len,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(ChunkError::io("removing", &path)(e)),
            }
        }
        Ok(freed)
    }

    /// Every chunk held here, and the bytes they take.
    pub(crate) fn list_blocking(&self) -> Result<(Vec<ChunkHash>, u64), ChunkError> {
        list_chunks(&self.root)
    }

    /// See [`ChunkStore::put_blocking`].
    pub(crate) async fn put(&self, hash: ChunkHash, bytes: Vec<u8>) -> Result<Put, ChunkError> {
        let store = self.clone();
        blocking(move || store.put_blocking(&hash, &bytes)).await
    }

    /// See [`ChunkStore::get_blocking`].
    pub(crate) async fn get(&self, hash: ChunkHash) -> Result<Option<Vec<u8>>, ChunkError> {
        let store = self.clone();
        blocking(move || store.get_blocking(&hash)).await
    }

    /// See [`ChunkStore::missing_blocking`].
    pub(crate) async fn missing(&self, hashes: Vec<ChunkHash>) -> Result<Vec<ChunkHash>, ChunkError> {
        let store = self.clone();
        blocking(move || Ok(store.missing_blocking(&hashes))).await
    }

    /// See [`ChunkStore::remove_blocking`].
    pub(crate) async fn remove(&self, hashes: Vec<ChunkHash>) -> Result<u64, ChunkError> {
        let store = self.clone();
        blocking(move || store.remove_blocking(&hashes)).await
    }

    /// See [`ChunkStore::list_blocking`].
    pub(crate) async fn list(&self) -> Result<(Vec<ChunkHash>, u64), ChunkError> {
        let store = self.clone();
        blocking(move || store.list_blocking()).await
    }
}

/// Every chunk under `root` (`DATA/chunks`) and the bytes they take; read-only, so `inspect`
/// can use it on a stopped relay's data dir.
pub(crate) fn list_chunks(root: &Path) -> Result<(Vec<ChunkHash>, u64), ChunkError> {
    let (mut hashes, mut bytes) = (Vec::new(), 0);
    let dirs = match fs::read_dir(root) {
        Ok(dirs) => dirs,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((hashes, bytes)),
        Err(e) => return Err(ChunkError::io("reading", root)(e)),
    };
    for dir in dirs {
        let dir = dir.map_err(ChunkError::io("reading", root))?;
        let name = dir.file_name();
        if name.len() != 2 || !dir.path().is_dir() {
            continue;
        }
        let path = dir.path();
        for file in fs::read_dir(&path).map_err(ChunkError::io("reading", &path))? {
            let file = file.map_err(ChunkError::io("reading", &path))?;
            let Some(hash) = file.file_name().to_str().and_then(|n| n.parse::<ChunkHash>().ok()) else { continue };
            bytes += file.metadata().map(|m| m.len()).unwrap_or(0);
            hashes.push(hash);
        }
    }
    hashes.sort_unstable();
    Ok((hashes, bytes))
}

fn chunk_path(root: &Path, hash: &ChunkHash) -> PathBuf {
    let hex = hash.to_string();
    root.join(&hex[..2]).join(hex)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), ChunkError> {
    let mut file = File::create(path).map_err(ChunkError::io("creating", path))?;
    file.write_all(bytes).map_err(ChunkError::io("writing", path))?;
    file.sync_all().map_err(ChunkError::io("syncing", path))
}

/// Syncs a directory, so that a rename or a new entry in it survives a crash.
fn sync_dir(dir: &Path) -> Result<(), ChunkError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(ChunkError::io("syncing directory", dir))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ChunkError> + Send + 'static,
) -> Result<T, ChunkError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ChunkError::Task(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8, len: usize) -> (ChunkHash, Vec<u8>) {
        let bytes = vec![n; len];
        (ChunkHash::of(&bytes), bytes)
    }

    #[test]
    fn round_trip_and_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        let (a, a_bytes) = chunk(1, 1000);
        let (b, _) = chunk(2, 10);
        assert_eq!(store.put_blocking(&a, &a_bytes).unwrap(), Put::Stored);
        assert_eq!(store.put_blocking(&a, &a_bytes).unwrap(), Put::Duplicate);
        assert_eq!(store.get_blocking(&a).unwrap(), Some(a_bytes));
        assert_eq!(store.get_blocking(&b).unwrap(), None);
        assert_eq!(store.missing_blocking(&[a, b]), vec![b]);
        assert_eq!(store.list_blocking().unwrap(), (vec![a], 1000));
        let hex = a.to_string();
        assert!(dir.path().join(CHUNKS_DIR).join(&hex[..2]).join(&hex).is_file());
        assert_eq!(fs::read_dir(dir.path().join(CHUNKS_DIR).join(TMP_DIR)).unwrap().count(), 0);
    }

    #[test]
    fn a_wrong_hash_is_refused_and_nothing_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        let (a, _) = chunk(1, 100);
        let err = store.put_blocking(&a, b"something else").unwrap_err();
        assert!(matches!(err, ChunkError::HashMismatch { .. }));
        assert!(err.to_string().starts_with("checksum mismatch"), "{err}");
        assert_eq!(err.wire().code, ErrorCode::BadRequest);
        assert_eq!(store.list_blocking().unwrap(), (Vec::new(), 0));
        assert_eq!(fs::read_dir(dir.path().join(CHUNKS_DIR).join(TMP_DIR)).unwrap().count(), 0);
    }

    #[test]
    fn a_corrupt_chunk_on_disk_is_removed_and_not_held() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        let (a, bytes) = chunk(3, 4096);
        store.put_blocking(&a, &bytes).unwrap();
        let path = chunk_path(&dir.path().join(CHUNKS_DIR), &a);
        let mut bad = bytes.clone();
        bad[17] ^= 1;
        fs::write(&path, &bad).unwrap();
        assert_eq!(store.get_blocking(&a).unwrap(), None);
        assert!(!path.exists(), "removed");
        assert_eq!(store.missing_blocking(&[a]), vec![a]);
        assert_eq!(store.put_blocking(&a, &bytes).unwrap(), Put::Stored, "a good copy is taken again");

        // A corrupt copy does not pass for a duplicate either.
        fs::write(&path, &bad).unwrap();
        assert_eq!(store.put_blocking(&a, &bytes).unwrap(), Put::Stored);
        assert_eq!(store.get_blocking(&a).unwrap(), Some(bytes));
    }

    #[test]
    fn temp_files_a_crash_left_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        drop(ChunkStore::open(dir.path()).unwrap());
        let tmp = dir.path().join(CHUNKS_DIR).join(TMP_DIR);
        fs::write(tmp.join("half-written.1234"), b"partial").unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0);
        assert_eq!(store.list_blocking().unwrap().0, Vec::new(), "never listed as a chunk");
    }

    #[tokio::test]
    async fn async_calls_run_off_the_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        let (a, bytes) = chunk(4, 1 << 20);
        assert_eq!(store.put(a, bytes.clone()).await.unwrap(), Put::Stored);
        assert_eq!(store.get(a).await.unwrap(), Some(bytes));
        assert_eq!(store.missing(vec![a]).await.unwrap(), Vec::<ChunkHash>::new());
        assert_eq!(store.list().await.unwrap().0, vec![a]);
    }
}
