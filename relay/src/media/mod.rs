//! Media on the relays: uploads in parts, each part's encrypted chunk kept on the `R` relays
//! closest to its hash and its record on the `R` relays closest to the upload's file id.
//!
//! - this module: [`MediaServer`] serves clients on `/meshgram/media/1`: `Hello` (the session
//!   certificate, checked as on the mailbox protocol, [`crate::sessions`]), `SaveFilePart`
//!   (checked here, copied by [`save_file_part`] on a task: chunk first, record second, then
//!   `PartSaved`), `GetUploadStatus` (here or from the upload's closest relays), `GetChunk`.
//!   [`MediaStore`] is what this relay keeps, shared with [`crate::replica`] (other relays'
//!   `StoreChunk`, `RecordPart`, ...) and repair.
//! - [`chunks`]: chunk files, synced before they count, checked on every read.
//! - [`providers`]: which client nodes serve which files (`Provide`, `FindProviders`), soft
//!   state in memory.
//! - [`uploads`]: the redb index of uploads, parts and per-owner usage (the quota).
//! - [`repair`]: brings held chunks and part records back to `R` responsible relays, run with
//!   each mailbox repair round.

pub(crate) mod chunks;
pub(crate) mod providers;
pub(crate) mod repair;
pub(crate) mod uploads;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use meshgram_node::crypto::cert::unix_now;
use meshgram_node::ids::UserId;
use meshgram_node::net::codec::FrameError;
use meshgram_node::net::pipe::Responder;
use meshgram_node::proto::media::{
    ChunkHash, FileId, MAX_CHUNK_SIZE, MAX_HASHES_PER_REQUEST, MAX_PARTS, MAX_PROVIDED_PER_REQUEST, MediaRequest,
    MediaResponse, PartRecord,
};
use meshgram_node::proto::{ErrorCode, ReplicaRequest, ReplicaResponse, WireError};
use tokio::task::{JoinError, JoinSet};

use self::chunks::{ChunkError, ChunkStore, Put};
use self::providers::{MAX_PROVIDER_ADDR_LEN, MAX_PROVIDER_ADDRS, Providers};
use self::uploads::{MEDIA_DATABASE_FILE, Recorded, UploadIndex};
use crate::metrics::{CertKind, Metrics};
use crate::placement::{chunk_key, closest_relays, file_key};
use crate::relays::KnownRelays;
use crate::replicate::{REPLICA_STORE_DEADLINE, Replicas, copy_to_closest, unexpected};
use crate::sessions::Sessions;

/// How long a copy of a chunk on another relay may take before the next closest relay is asked
/// instead (and the slow one is taken for down). A chunk is up to 1 MiB, written and synced
/// before the answer: on a loaded disk and a slow link (1 MiB at 1 MB/s) that is a second or
/// two, so 15 s is generous, and still well within a client's wait for `PartSaved`.
pub(crate) const CHUNK_STORE_DEADLINE: Duration = Duration::from_secs(15);

/// Why the media store did not open.
#[derive(Debug, thiserror::Error)]
pub enum MediaOpenError {
    #[error("chunk store: {0}")]
    Chunks(String),
    #[error("upload index {path}: {source}")]
    Index { path: std::path::PathBuf, source: redb::Error },
}

/// What this relay keeps of media: chunk files and the upload index; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct MediaStore {
    pub(crate) chunks: ChunkStore,
    pub(crate) uploads: UploadIndex,
    pub(crate) metrics: Arc<Metrics>,
    /// Where the next repair round starts in the held chunks and uploads (each round checks a
    /// bounded window of them, `repair`).
    pub(crate) repair_cursor: Arc<(AtomicUsize, AtomicUsize)>,
}

impl MediaStore {
    /// Opens `DATA/chunks` and `DATA/media.redb`; each owner may record `quota` bytes here.
    pub(crate) fn open(data_dir: &Path, quota: u64, metrics: Arc<Metrics>) -> Result<Self, MediaOpenError> {
        let chunks = ChunkStore::open(data_dir).map_err(|e| MediaOpenError::Chunks(e.to_string()))?;
        let path = data_dir.join(MEDIA_DATABASE_FILE);
        let uploads = UploadIndex::open(&path, quota).map_err(|source| MediaOpenError::Index { path, source })?;
        Ok(MediaStore { chunks, uploads, metrics, repair_cursor: Arc::default() })
    }

    /// Keeps a chunk here, durably (its hash checked again).
    pub(crate) async fn store_chunk(&self, hash: ChunkHash, bytes: Vec<u8>) -> Result<Put, WireError> {
        let len = bytes.len() as u64;
        let put = self.chunks.put(hash, bytes).await.map_err(|e| {
            if !matches!(e, ChunkError::HashMismatch { .. }) {
                tracing::error!(chunk = %hash, error = %e, "storing a chunk failed");
            }
            e.wire()
        })?;
        if put == Put::Stored {
            self.metrics.chunks_stored.inc();
            self.metrics.chunk_bytes_stored.inc_by(len);
        }
        Ok(put)
    }

    /// Records a saved part here, durably (see [`UploadIndex::record_blocking`]).
    pub(crate) async fn record_part(&self, record: PartRecord) -> Result<Recorded, WireError> {
        self.uploads.record(record).await
    }

    /// Deletes those of `hashes` that no upload recorded here names; returns how many.
    pub(crate) async fn delete_unnamed(&self, hashes: Vec<ChunkHash>) -> Result<u32, WireError> {
        let named: HashSet<ChunkHash> = self.uploads.named(hashes.clone()).await?.into_iter().collect();
        let unnamed: Vec<ChunkHash> = hashes.into_iter().filter(|h| !named.contains(h)).collect();
        let count = unnamed.len() as u32;
        let freed = self.chunks.remove(unnamed).await.map_err(|e| e.wire())?;
        self.metrics.chunks_deleted.inc_by(u64::from(count));
        self.metrics.chunk_bytes_held.dec_by(i64::try_from(freed).unwrap_or(i64::MAX));
        Ok(count)
    }

    /// A chunk held here: `Ok(None)` if not (or it failed its hash and was removed).
    pub(crate) async fn chunk(&self, hash: ChunkHash) -> Result<Option<Vec<u8>>, WireError> {
        self.chunks.get(hash).await.map_err(|e| {
            tracing::error!(chunk = %hash, error = %e, "reading a chunk failed");
            e.wire()
        })
    }
}

/// A finished media request, for [`MediaServer::finish`].
#[derive(Debug)]
pub(crate) struct Done {
    channel: Responder<MediaResponse>,
    response: MediaResponse,
}

/// Serves clients' media requests, with the tasks doing the work.
#[derive(Debug)]
pub(crate) struct MediaServer {
    sessions: Sessions<()>,
    /// Client nodes serving files, as they announced.
    providers: Providers,
    store: MediaStore,
    /// Where copies go (and the replication factor).
    replicas: Replicas,
    tasks: JoinSet<Done>,
}

impl MediaServer {
    pub(crate) fn new(
        gateway_key: libp2p::identity::ed25519::PublicKey,
        store: MediaStore,
        replicas: Replicas,
    ) -> Self {
        let providers = Providers::default();
        MediaServer { sessions: Sessions::new(gateway_key), providers, store, replicas, tasks: JoinSet::new() }
    }

    /// The next task to finish, for [`MediaServer::finish`]; `None` when none runs.
    pub(crate) async fn next_done(&mut self) -> Option<Result<Done, JoinError>> {
        self.tasks.join_next().await
    }

    /// Stops and waits for the tasks.
    pub(crate) async fn shutdown(&mut self) {
        self.tasks.shutdown().await;
    }

    /// Answers a finished task's request.
    pub(crate) fn finish(&mut self, done: Done) {
        self.respond(done.channel, done.response);
    }

    /// `peer`'s last connection closed: its session goes.
    pub(crate) fn disconnected(&mut self, peer: &PeerId) {
        self.sessions.disconnected(peer);
    }

    /// The gateway revoked `device`'s session `session` (see [`Sessions::revoke`]).
    pub(crate) fn revoke_session(&mut self, device: PeerId, session: meshgram_node::ids::SessionId, until: u64) {
        if self.sessions.revoke(device, session, until) == Some(true) {
            tracing::info!(%device, %session, "session revoked by the gateway; its media access here ends");
        }
    }

    /// The gateway refused this relay's certificate: greet no more clients.
    pub(crate) fn no_longer_admitted(&mut self, why: String) {
        self.sessions.no_longer_admitted(why);
    }

    /// Expires the uploads not finished within `grace` of their start (on a task): their
    /// records go here, and their chunks on the live relays responsible for them (this one
    /// included), unless another upload recorded there names them.
    pub(crate) fn expire_uploads(&mut self, grace: Duration, known: &mut KnownRelays<'_>) {
        let live: Vec<PeerId> = known.live_relays().into_iter().map(|r| r.peer_id).collect();
        let (store, replicas) = (self.store.clone(), self.replicas.clone());
        let begun_before = unix_now().saturating_sub(grace.as_secs());
        tokio::spawn(async move {
            let expired = match store.uploads.expire_incomplete(begun_before).await {
                Ok(expired) => expired,
                Err(e) => return tracing::error!(error = %e, "expiring unfinished uploads failed"),
            };
            if expired.uploads == 0 {
                return;
            }
            store.metrics.media_uploads_expired.inc_by(expired.uploads);
            let mut by_relay: std::collections::HashMap<PeerId, Vec<ChunkHash>> = Default::default();
            for hash in expired.chunks {
                // Repair may have put copies a little further out: ask one relay beyond R.
                for holder in closest_relays(&chunk_key(&hash), live.iter().copied(), replicas.replication + 1) {
                    by_relay.entry(holder).or_default().push(hash);
                }
            }
            let mut deleted = 0;
            for (relay, hashes) in by_relay {
                for batch in hashes.chunks(MAX_HASHES_PER_REQUEST) {
                    let answer = if relay == replicas.local {
                        store.delete_unnamed(batch.to_vec()).await
                    } else {
                        let request = ReplicaRequest::DeleteChunks { hashes: batch.to_vec() };
                        match replicas.call_within(relay, &request, REPLICA_STORE_DEADLINE).await {
                            Ok(ReplicaResponse::ChunksDeleted { count }) => Ok(count),
                            Ok(other) => Err(unexpected(&other)),
                            Err(e) => Err(e),
                        }
                    };
                    match answer {
                        Ok(count) => deleted += count,
                        // Left for the copy's own expiry (or a later round here): nothing is lost.
                        Err(e) => tracing::debug!(%relay, error = %e, "deleting an expired upload's chunks failed"),
                    }
                }
            }
            tracing::info!(uploads = expired.uploads, chunks_deleted = deleted, "expired unfinished uploads");
        });
    }

    /// Forgets revocations whose certificates have all expired, and provider records past
    /// their time.
    pub(crate) fn forget_expired_revocations(&mut self) {
        self.sessions.forget_expired_revocations(unix_now());
        self.providers.expire(Instant::now());
        self.store.metrics.media_provider_records.set(self.providers.len() as i64);
    }

    /// Serves one media request from `peer`.
    pub(crate) fn handle(
        &mut self,
        peer: PeerId,
        request: Result<MediaRequest, FrameError>,
        channel: Responder<MediaResponse>,
        known: &mut KnownRelays<'_>,
    ) {
        let request = match request {
            Ok(request) => request,
            Err(e) => return self.respond(channel, MediaResponse::Error(WireError::for_frame(&e))),
        };
        self.store.metrics.count_media_request(request.kind());
        let now = unix_now();
        let owner = match request {
            MediaRequest::Hello { cert } => {
                let hello = self.sessions.hello(peer, &cert, now, ());
                self.store.metrics.count_cert_check(CertKind::Session, hello.is_ok());
                let response = match hello {
                    Ok(_) => MediaResponse::Welcome { relay: known.local() },
                    Err(refusal) => MediaResponse::Error(refusal),
                };
                return self.respond(channel, response);
            }
            _ => match self.sessions.check(&peer, now) {
                Ok(session) => session.cert.user_id,
                Err(refusal) => return self.respond(channel, MediaResponse::Error(refusal)),
            },
        };
        let mut live = || -> Vec<PeerId> { known.live_relays().into_iter().map(|r| r.peer_id).collect() };
        let (store, replicas) = (self.store.clone(), self.replicas.clone());
        match request {
            MediaRequest::Hello { .. } => unreachable!("answered above"),
            MediaRequest::SaveFilePart { file_id, part, total_parts, hash, bytes } => {
                if let Err(refusal) = check_part(part, total_parts, bytes.len()) {
                    return self.respond(channel, MediaResponse::Error(refusal));
                }
                let record = PartRecord { file_id, owner, part, total_parts, hash, size: bytes.len() as u32 };
                let live = live();
                let chunk_targets = closest_relays(&chunk_key(&hash), live.iter().copied(), live.len());
                let record_targets = closest_relays(&file_key(&file_id), live.iter().copied(), live.len());
                self.tasks.spawn(async move {
                    let response =
                        save_file_part(&replicas, &store, record, bytes, &chunk_targets, &record_targets).await;
                    Done { channel, response }
                });
            }
            MediaRequest::GetUploadStatus { file_id } => {
                let mut holders = closest_relays(&file_key(&file_id), live(), replicas.replication);
                holders.retain(|relay| *relay != replicas.local);
                self.tasks.spawn(async move {
                    let response = upload_status(&replicas, &store, file_id, owner, &holders).await;
                    Done { channel, response }
                });
            }
            MediaRequest::Provide { files, addrs } => {
                let response = if files.len() > MAX_PROVIDED_PER_REQUEST
                    || addrs.len() > MAX_PROVIDER_ADDRS
                    || addrs.iter().any(|a| a.len() > MAX_PROVIDER_ADDR_LEN)
                {
                    refuse(
                        ErrorCode::BadRequest,
                        format!(
                            "announce at most {MAX_PROVIDED_PER_REQUEST} files at {MAX_PROVIDER_ADDRS} addresses of at \
                             most {MAX_PROVIDER_ADDR_LEN} bytes each"
                        ),
                    )
                } else {
                    // Only for itself: the provider is the connection's device.
                    self.providers.provide(peer, &files, &addrs, Instant::now());
                    self.store.metrics.media_provider_records.set(self.providers.len() as i64);
                    MediaResponse::Provided
                };
                self.respond(channel, response);
            }
            MediaRequest::FindProviders { file } => {
                let peers = self.providers.find(&file, &peer, Instant::now());
                self.respond(channel, MediaResponse::Providers { peers });
            }
            MediaRequest::GetChunk { hash } => {
                self.tasks.spawn(async move {
                    let response = match store.chunk(hash).await {
                        Ok(Some(bytes)) => MediaResponse::Chunk { bytes },
                        Ok(None) => refuse(ErrorCode::NotFound, format!("chunk {hash} is not held here")),
                        Err(e) => MediaResponse::Error(e),
                    };
                    Done { channel, response }
                });
            }
        }
    }

    fn respond(&mut self, channel: Responder<MediaResponse>, response: MediaResponse) {
        if let MediaResponse::Error(e) = &response {
            self.store.metrics.count_media_refusal(&e.code.to_string());
        }
        channel.respond(response);
    }
}

/// The checks of a part that need no state: its number and size.
fn check_part(part: u32, total_parts: u32, len: usize) -> Result<(), WireError> {
    if total_parts == 0 || total_parts > MAX_PARTS || part >= total_parts {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            format!("part {part} of {total_parts}: parts are numbered from 0, at most {MAX_PARTS} per file"),
        ));
    }
    if len == 0 || len > MAX_CHUNK_SIZE {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            format!("a part of {len} bytes: parts hold 1 to {MAX_CHUNK_SIZE} bytes"),
        ));
    }
    Ok(())
}

/// `SaveFilePart`, after [`check_part`]: checks the hash and, if this relay records the upload,
/// owner, total, hash and quota, before anything is stored; stores the chunk on `R` of
/// `chunk_targets` (live relays, closest to its hash first), then the record on `R` of
/// `record_targets` (closest to the file id first). `PartSaved` only once both are durable.
pub(crate) async fn save_file_part(
    replicas: &Replicas,
    store: &MediaStore,
    record: PartRecord,
    bytes: Vec<u8>,
    chunk_targets: &[PeerId],
    record_targets: &[PeerId],
) -> MediaResponse {
    let hash = record.hash;
    // Off the runtime: a megabyte takes a while to hash in a debug build.
    let (actual, bytes) = match tokio::task::spawn_blocking(move || (ChunkHash::of(&bytes), bytes)).await {
        Ok(hashed) => hashed,
        Err(e) => return refuse(ErrorCode::Internal, format!("hashing the part failed: {e}")),
    };
    if actual != hash {
        return refuse(ErrorCode::BadRequest, format!("checksum mismatch: the bytes hash to {actual}, not {hash}"));
    }
    // Every relay recording the upload checks the part first (owner, total, hash, quota), so
    // that a part they refuse leaves no chunk behind.
    let need = replicas.copies_needed(record_targets.len());
    let refusals = [ErrorCode::Forbidden, ErrorCode::BadRequest, ErrorCode::QuotaExceeded];
    let check = |target| record_part_on(replicas, store, &record, target, false);
    if let Err(refusal) =
        copy_to_closest(&replicas.metrics, "a part check", record_targets, need, &refusals, check).await
    {
        return MediaResponse::Error(refusal);
    }
    let request = ReplicaRequest::StoreChunk { hash, bytes };
    let need = replicas.copies_needed(chunk_targets.len());
    let copy = |target| store_chunk_on(replicas, store, &request, target);
    let copies = match copy_to_closest(&replicas.metrics, "a chunk", chunk_targets, need, &[], copy).await {
        Ok(copies) => copies.len() as u32,
        Err(refusal) => return MediaResponse::Error(refusal),
    };
    let part = record.part;
    let copy = |target| record_part_on(replicas, store, &record, target, true);
    if let Err(refusal) =
        copy_to_closest(&replicas.metrics, "a part record", record_targets, need, &refusals, copy).await
    {
        return MediaResponse::Error(refusal);
    }
    store.metrics.media_parts_saved.inc();
    MediaResponse::PartSaved { part, copies }
}

/// One copy of a chunk (`request` is its `StoreChunk`), here or on `target`.
async fn store_chunk_on(
    replicas: &Replicas,
    store: &MediaStore,
    request: &ReplicaRequest,
    target: PeerId,
) -> (PeerId, Result<(), WireError>) {
    let result = match request {
        ReplicaRequest::StoreChunk { hash, bytes } if target == replicas.local => {
            store.store_chunk(*hash, bytes.clone()).await.map(|_| ())
        }
        _ => match replicas.call_within(target, request, CHUNK_STORE_DEADLINE).await {
            Ok(ReplicaResponse::ChunkStored) => Ok(()),
            Ok(other) => Err(unexpected(&other)),
            Err(e) => Err(e),
        },
    };
    replicas.metrics.count_copy(result.is_ok());
    (target, result)
}

/// One copy of a part record, here or on `target`; or, unless `commit`, only its check there.
async fn record_part_on(
    replicas: &Replicas,
    store: &MediaStore,
    record: &PartRecord,
    target: PeerId,
    commit: bool,
) -> (PeerId, Result<(), WireError>) {
    let result = if target == replicas.local {
        match commit {
            true => store.record_part(record.clone()).await.map(|_| ()),
            false => store.uploads.check(record.clone()).await.map(|_| ()),
        }
    } else {
        let request = match commit {
            true => ReplicaRequest::RecordPart { record: record.clone() },
            false => ReplicaRequest::CheckPart { record: record.clone() },
        };
        match replicas.call_within(target, &request, REPLICA_STORE_DEADLINE).await {
            Ok(ReplicaResponse::PartRecorded | ReplicaResponse::PartChecked) => Ok(()),
            Ok(other) => Err(unexpected(&other)),
            Err(e) => Err(e),
        }
    };
    if commit {
        replicas.metrics.count_copy(result.is_ok());
    }
    (target, result)
}

/// `GetUploadStatus`: from the index here if it records the upload, else from the first of
/// `holders` (the other relays closest to the file id) that does; unknown everywhere is an
/// upload nobody started. Only its owner may ask.
async fn upload_status(
    replicas: &Replicas,
    store: &MediaStore,
    file_id: FileId,
    caller: UserId,
    holders: &[PeerId],
) -> MediaResponse {
    let answer = |owner: UserId, total_parts, saved, hashes| {
        if owner == caller {
            MediaResponse::UploadStatus { total_parts, saved, hashes }
        } else {
            refuse(ErrorCode::Forbidden, format!("file_id {file_id} belongs to another user"))
        }
    };
    match store.uploads.status(file_id).await {
        Ok(Some(status)) => return answer(status.owner, status.total_parts, status.saved, status.hashes),
        Ok(None) => {}
        Err(e) => return MediaResponse::Error(e),
    }
    for holder in holders {
        let request = ReplicaRequest::UploadStatus { file_id };
        match replicas.call_within(*holder, &request, REPLICA_STORE_DEADLINE).await {
            Ok(ReplicaResponse::UploadStatus { owner: Some(owner), total_parts, saved, hashes }) => {
                return answer(owner, total_parts, saved, hashes);
            }
            Ok(ReplicaResponse::UploadStatus { owner: None, .. }) => {}
            Ok(other) => tracing::warn!(relay = %holder, answer = ?other, "unexpected answer to UploadStatus"),
            Err(e) => tracing::debug!(relay = %holder, error = %e, "asking a relay for an upload's status failed"),
        }
    }
    MediaResponse::UploadStatus { total_parts: 0, saved: Vec::new(), hashes: Vec::new() }
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> MediaResponse {
    MediaResponse::Error(WireError::new(code, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_numbers_and_sizes_at_their_limits() {
        let ok = [(0, 1, 1), (0, 1, MAX_CHUNK_SIZE), (MAX_PARTS - 1, MAX_PARTS, 1)];
        for (part, total, len) in ok {
            assert!(check_part(part, total, len).is_ok(), "part {part} of {total}, {len} bytes");
        }
        let bad = [(1, 1, 1), (0, 0, 1), (0, MAX_PARTS + 1, 1), (0, 1, 0), (0, 1, MAX_CHUNK_SIZE + 1)];
        for (part, total, len) in bad {
            assert_eq!(check_part(part, total, len).unwrap_err().code, ErrorCode::BadRequest);
        }
    }
}
