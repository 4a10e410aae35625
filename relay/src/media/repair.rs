//! Media repair, run with every mailbox repair round (`crate::repair`): what this relay holds
//! goes back to the `R` live relays now responsible for it.
//!
//! - Chunks: for each held chunk, the other relays among the `R` closest to its hash are asked
//!   `HasChunks` (4,096 hashes a request); each chunk one lacks is read here (off the event
//!   loop, its hash checked) and sent with `StoreChunk`.
//! - Part records: for each upload recorded here, each other relay among the `R` closest to its
//!   file id is asked `UploadStatus`, and sent `RecordPart` for each part it lacks.
//!
//! Work per round is bounded: a window of [`CHUNKS_PER_ROUND`] chunks and [`UPLOADS_PER_ROUND`]
//! uploads, moving on each round (so every one is checked within a few rounds however many are
//! held), and at most [`COPIES_PER_RELAY`] chunks (megabytes each) sent to one relay a round.
//! What a peer answers is checked against what it was asked.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};

use libp2p::PeerId;
use libp2p::kad::KBucketKey;
use meshgram_node::proto::media::{ChunkHash, FileId, MAX_HASHES_PER_REQUEST};
use meshgram_node::proto::{ErrorCode, ReplicaRequest, ReplicaResponse, WireError};

use super::{CHUNK_STORE_DEADLINE, MediaStore};
use crate::placement::{chunk_key, file_key};
use crate::repair::{per_relay, plan};
use crate::replicate::{Replicas, unexpected};

/// Held chunks checked per round.
const CHUNKS_PER_ROUND: usize = 4 * MAX_HASHES_PER_REQUEST;
/// Uploads checked per round (a request per upload and responsible relay).
const UPLOADS_PER_ROUND: usize = 256;
/// Chunks sent to one relay per round at most: up to 32 MiB.
const COPIES_PER_RELAY: usize = 32;
/// How long one repair request (but a chunk's copy) may take.
const CALL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// What a media repair round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MediaRepairReport {
    /// Chunks held here, and their bytes.
    pub(crate) chunks: usize,
    pub(crate) chunk_bytes: u64,
    /// Chunks copied to responsible relays that lacked them.
    pub(crate) chunks_copied: u64,
    /// Part records copied likewise.
    pub(crate) records_copied: u64,
    /// Relays the round could not finish with.
    pub(crate) unfinished: usize,
}

/// One round: see the module. `live` are the relays placement may choose from, this one
/// included.
pub(crate) async fn repair_media(replicas: &Replicas, store: &MediaStore, live: &[PeerId]) -> MediaRepairReport {
    let mut report = MediaRepairReport::default();
    let keys: Vec<KBucketKey<PeerId>> = live.iter().copied().map(KBucketKey::from).collect();
    match store.chunks.list().await {
        Ok((held, bytes)) => {
            (report.chunks, report.chunk_bytes) = (held.len(), bytes);
            store.metrics.chunk_bytes_held.set(i64::try_from(bytes).unwrap_or(i64::MAX));
            let window = window(&held, &store.repair_cursor.0, CHUNKS_PER_ROUND);
            let plan = plan(replicas, &keys, &window, chunk_key);
            let repair = |relay, hashes| repair_chunks(replicas, store, relay, hashes);
            let (copied, unfinished) = each_relay(plan, repair).await;
            report.chunks_copied = copied;
            report.unfinished += unfinished;
        }
        Err(e) => {
            tracing::error!(error = %e, "media repair could not list the chunks held");
            report.unfinished += 1;
        }
    }
    let index = store.uploads.clone();
    match tokio::task::spawn_blocking(move || index.uploads_blocking()).await {
        Ok(Ok(files)) => {
            let window = window(&files, &store.repair_cursor.1, UPLOADS_PER_ROUND);
            let plan = plan(replicas, &keys, &window, file_key);
            let repair = |relay, files| repair_records(replicas, store, relay, files);
            let (copied, unfinished) = each_relay(plan, repair).await;
            report.records_copied = copied;
            report.unfinished += unfinished;
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "media repair could not list the uploads recorded");
            report.unfinished += 1;
        }
        Err(e) => tracing::error!(error = %e, "media repair's read of the uploads did not finish"),
    }
    store.metrics.chunk_repair_copies.inc_by(report.chunks_copied);
    store.metrics.part_record_repair_copies.inc_by(report.records_copied);
    if report.chunks_copied > 0 || report.records_copied > 0 {
        tracing::info!(
            chunks = report.chunks,
            chunks_copied = report.chunks_copied,
            records_copied = report.records_copied,
            "media repair round"
        );
    }
    report
}

/// Up to `max` of `items` from `cursor` on (wrapping), and the cursor moved past them.
fn window<T: Copy>(items: &[T], cursor: &AtomicUsize, max: usize) -> Vec<T> {
    if items.len() <= max {
        return items.to_vec();
    }
    let start = cursor.fetch_add(max, Ordering::Relaxed) % items.len();
    items.iter().cycle().skip(start).take(max).copied().collect()
}

/// [`per_relay`], adding up the copies made; returns them and how many relays it could not
/// finish with.
async fn each_relay<K, Fut>(plan: HashMap<PeerId, Vec<K>>, repair: impl Fn(PeerId, Vec<K>) -> Fut) -> (u64, usize)
where
    Fut: Future<Output = (u64, Option<WireError>)>,
{
    let (mut copied, mut unfinished) = (0, 0);
    per_relay(plan, repair, |relay, (made, error): (u64, Option<WireError>)| {
        copied += made;
        if let Some(error) = error {
            unfinished += 1;
            tracing::warn!(%relay, %error, "media repair could not finish with a relay; the next round tries again");
        }
    })
    .await;
    (copied, unfinished)
}

/// Sends `relay` the chunks of `hashes` it lacks (at most [`COPIES_PER_RELAY`]).
async fn repair_chunks(
    replicas: &Replicas,
    store: &MediaStore,
    relay: PeerId,
    hashes: Vec<ChunkHash>,
) -> (u64, Option<WireError>) {
    let mut copied = 0;
    for batch in hashes.chunks(MAX_HASHES_PER_REQUEST) {
        let asked: HashSet<ChunkHash> = batch.iter().copied().collect();
        let request = ReplicaRequest::HasChunks { hashes: batch.to_vec() };
        let missing = match replicas.call_within(relay, &request, CALL_DEADLINE).await {
            Ok(ReplicaResponse::MissingChunks { hashes }) => hashes,
            Ok(other) => return (copied, Some(unexpected(&other))),
            Err(e) => return (copied, Some(e)),
        };
        // Only chunks it was asked about, each once.
        let missing: HashSet<ChunkHash> = missing.into_iter().filter(|h| asked.contains(h)).collect();
        for hash in missing {
            if copied as usize >= COPIES_PER_RELAY {
                return (copied, None);
            }
            let bytes = match store.chunk(hash).await {
                Ok(Some(bytes)) => bytes,
                // Gone or corrupt here since it was listed: nothing to send.
                Ok(None) => continue,
                Err(e) => return (copied, Some(e)),
            };
            let request = ReplicaRequest::StoreChunk { hash, bytes };
            match replicas.call_within(relay, &request, CHUNK_STORE_DEADLINE).await {
                Ok(ReplicaResponse::ChunkStored) => copied += 1,
                Ok(other) => return (copied, Some(unexpected(&other))),
                Err(e) => return (copied, Some(e)),
            }
        }
    }
    (copied, None)
}

/// Sends `relay` the part records of `files` it lacks.
async fn repair_records(
    replicas: &Replicas,
    store: &MediaStore,
    relay: PeerId,
    files: Vec<FileId>,
) -> (u64, Option<WireError>) {
    let mut copied = 0;
    for file_id in files {
        let index = store.uploads.clone();
        let records = match tokio::task::spawn_blocking(move || index.records_blocking(&file_id)).await {
            Ok(Ok(records)) => records,
            Ok(Err(e)) => return (copied, Some(e)),
            Err(e) => return (copied, Some(WireError::new(ErrorCode::Internal, e.to_string()))),
        };
        let Some(first) = records.first() else { continue };
        let request = ReplicaRequest::UploadStatus { file_id };
        let saved: HashSet<u32> = match replicas.call_within(relay, &request, CALL_DEADLINE).await {
            Ok(ReplicaResponse::UploadStatus { owner, total_parts, saved, .. }) => {
                if owner.is_some_and(|owner| owner != first.owner)
                    || (owner.is_some() && total_parts != first.total_parts)
                {
                    tracing::warn!(%relay, file = %file_id, "a relay records an upload differently; leaving it");
                    continue;
                }
                saved.into_iter().collect()
            }
            Ok(other) => return (copied, Some(unexpected(&other))),
            Err(e) => return (copied, Some(e)),
        };
        for record in records.into_iter().filter(|r| !saved.contains(&r.part)) {
            match replicas.call_within(relay, &ReplicaRequest::RecordPart { record }, CALL_DEADLINE).await {
                Ok(ReplicaResponse::PartRecorded) => copied += 1,
                Ok(other) => return (copied, Some(unexpected(&other))),
                Err(e) if e.code == ErrorCode::Unavailable => return (copied, Some(e)),
                // Refused (its quota, say): the rest of this upload would be too.
                Err(e) => {
                    tracing::warn!(%relay, file = %file_id, error = %e, "a relay refused a repaired part record");
                    break;
                }
            }
        }
    }
    (copied, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_move_on_and_wrap() {
        let cursor = AtomicUsize::new(0);
        let items: Vec<u32> = (0..5).collect();
        assert_eq!(window(&items, &cursor, 10), items, "all when they fit");
        assert_eq!(window(&items, &cursor, 2), vec![0, 1]);
        assert_eq!(window(&items, &cursor, 2), vec![2, 3]);
        assert_eq!(window(&items, &cursor, 2), vec![4, 0]);
        assert_eq!(window(&items, &cursor, 2), vec![1, 2]);
    }
}
