//! `/meshgram/media/1`: files as content-addressed, end-to-end encrypted chunks on the relays.
//!
//! ```text
//! client                         entry relay (closest to the file id)      R relays closest to
//!   Hello{cert} ────────────────▶ verify once per connection                each chunk's hash
//!   GetUploadStatus{file} ──────▶ ◀── saved parts (resume)
//!   SaveFilePart{file, part, total, blake3, bytes}
//!                                 checksum OK? owner, total, size, quota
//!                                 ── Replica StoreChunk{hash, bytes} ──────▶ chunk file, synced
//!                                 ── Replica RecordPart{file, owner, ...} ─▶ R relays closest to
//!   ◀──────────── PartSaved ◀──── both durable on R                          the file id (redb)
//!   ... every part, several in flight, the encrypted manifest last; then the file reference
//!   travels sealed inside an ordinary message (`payload::Body::File`).
//!
//! downloader ── GetChunk{hash} ──▶ any holder (the chunk's closest relays first) ◀── Chunk
//!               verifies blake3 before a byte is written, then decrypts (`crypto::media`)
//!
//! client node that has a file ── Provide{files, addrs} ──▶ relays closest to each file's
//!                                                          provider key (from the file key)
//! downloader ── FindProviders{file} ──▶ those relays ◀── Providers ── GetChunk ──▶ that node
//! ```
//! Relays see chunk hashes, sizes, owners and times; never a key or a plaintext byte.

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::crypto::cert::SessionCert;
use crate::ids::UserId;
use crate::net::pipe::PipeLimits;
use crate::proto::WireError;

/// Client ↔ relay (and, for `GetChunk`, client ↔ client): uploads and chunk downloads.
pub const MEDIA_PROTOCOL: &str = "/meshgram/media/1";
/// A part of a file before encryption, by default: Telegram's `upload.saveFilePart` size.
pub const DEFAULT_PART_SIZE: u32 = 512 * 1024;
/// The largest part a client may choose (before encryption).
pub const MAX_PART_SIZE: u32 = 1024 * 1024;
/// The smallest part a client may choose: smaller parts only multiply requests.
pub const MIN_PART_SIZE: u32 = 4 * 1024;
/// The largest stored chunk: a maximal part, its AEAD tag and room to spare.
pub const MAX_CHUNK_SIZE: usize = MAX_PART_SIZE as usize + 1024;
/// Parts per file, the manifest included: 7.3 GiB at the default part size (Telegram stops at
/// 4 GiB), and the manifest (66 bytes per part) still fits one maximal chunk.
pub const MAX_PARTS: u32 = 15_000;
/// The largest thumbnail a file reference carries (a 90-pixel JPEG is 2–5 KiB).
pub const MAX_THUMBNAIL_BYTES: usize = 16 * 1024;
/// Requests carry one chunk at most; answers one chunk or an upload's status. Sixteen in flight
/// per pipe (a client keeps 8), so a pipe ties up at most ~17 MiB of a relay's memory.
pub const MEDIA_LIMITS: PipeLimits = PipeLimits {
    max_request: MAX_CHUNK_SIZE + 4096,
    max_response: MAX_CHUNK_SIZE + 64 * 1024,
    max_in_flight: 16,
    max_memory: 16 * (MAX_CHUNK_SIZE + 64 * 1024),
};

/// The blake3 hash of a stored (encrypted) chunk: its name everywhere.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkHash(#[serde(with = "crate::ids::hex_or_bytes")] pub [u8; 32]);

impl ChunkHash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        ChunkHash(*blake3::hash(bytes).as_bytes())
    }

    /// The first 8 hex digits, for logs.
    pub fn fmt_short(&self) -> String {
        crate::ids::hex(&self.0[..4])
    }
}

impl std::fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::ids::hex(&self.0))
    }
}

impl std::fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkHash({})", self.fmt_short())
    }
}

impl std::str::FromStr for ChunkHash {
    type Err = crate::ids::InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        crate::ids::parse_hex::<32>(s).map(ChunkHash)
    }
}

crate::ids::time_ordered_id! {
    /// One upload, chosen by the uploading client; its parts are recorded under it, with its
    /// owner, on the relays closest to it.
    FileId
}

/// A client's request to a relay on the media protocol.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MediaRequest {
    /// Present the session certificate; required once per connection before anything else.
    Hello { cert: SessionCert },
    /// Store one part of an upload: answered `PartSaved` once the chunk is durable on the `R`
    /// relays closest to `hash` and the part is recorded on the `R` relays closest to
    /// `file_id`. Saving a saved part again (same hash) is a no-op.
    SaveFilePart {
        file_id: FileId,
        part: u32,
        total_parts: u32,
        hash: ChunkHash,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Which parts of an upload are saved (the caller's own uploads only).
    GetUploadStatus { file_id: FileId },
    /// One chunk by its hash.
    GetChunk { hash: ChunkHash },
    /// The caller's client node serves the chunks of these files (each named by its provider
    /// key, `FileRef::provider_key`) at `addrs`: keep a provider record for [`PROVIDER_TTL_SECS`]. At most
    /// [`MAX_PROVIDED_PER_REQUEST`] files.
    Provide { files: Vec<ChunkHash>, addrs: Vec<libp2p::Multiaddr> },
    /// Client nodes that serve the chunks of this file (named by its provider key).
    FindProviders { file: ChunkHash },
}

impl MediaRequest {
    /// A short stable name for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            MediaRequest::Hello { .. } => "hello",
            MediaRequest::SaveFilePart { .. } => "save_file_part",
            MediaRequest::GetUploadStatus { .. } => "get_upload_status",
            MediaRequest::GetChunk { .. } => "get_chunk",
            MediaRequest::Provide { .. } => "provide",
            MediaRequest::FindProviders { .. } => "find_providers",
        }
    }
}

/// A relay's (or serving peer's) answer on the media protocol.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MediaResponse {
    /// The certificate is accepted.
    Welcome { relay: PeerId },
    /// The part is durable; `copies` relays hold its chunk.
    PartSaved { part: u32, copies: u32 },
    /// An upload's saved parts, ascending, and the chunk each was saved with (same order);
    /// `total_parts` is 0 for an upload nobody has started.
    UploadStatus { total_parts: u32, saved: Vec<u32>, hashes: Vec<ChunkHash> },
    /// The chunk asked for. The caller checks its hash before using a byte of it.
    Chunk {
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Refused (`NOT_FOUND` for a chunk this holder does not have).
    Error(WireError),
    /// `Provide`: recorded.
    Provided,
    /// `FindProviders`: client nodes serving the file's chunks, most recently announced first.
    Providers { peers: Vec<crate::proto::RelayInfo> },
}

impl crate::net::pipe::RequestKind for MediaRequest {
    fn kind(&self) -> &'static str {
        MediaRequest::kind(self)
    }

    fn is_greeting(&self) -> bool {
        matches!(self, MediaRequest::Hello { .. })
    }
}

impl crate::net::pipe::Greeting for MediaResponse {
    fn welcomes(&self) -> bool {
        matches!(self, MediaResponse::Welcome { .. })
    }
}

impl MediaResponse {
    /// A short stable name, for logs and errors (never a chunk's bytes).
    pub fn kind(&self) -> &'static str {
        match self {
            MediaResponse::Welcome { .. } => "Welcome",
            MediaResponse::PartSaved { .. } => "PartSaved",
            MediaResponse::UploadStatus { .. } => "UploadStatus",
            MediaResponse::Chunk { .. } => "Chunk",
            MediaResponse::Error(_) => "Error",
            MediaResponse::Provided => "Provided",
            MediaResponse::Providers { .. } => "Providers",
        }
    }
}

/// What the relays closest to a file id record of one saved part (replicated with
/// `ReplicaRequest::RecordPart`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRecord {
    pub file_id: FileId,
    pub owner: UserId,
    pub part: u32,
    pub total_parts: u32,
    pub hash: ChunkHash,
    /// Stored bytes of the chunk, counted against the owner's quota.
    pub size: u32,
}

/// A reference to an uploaded file, sent sealed inside a message: everything a recipient needs
/// to fetch, check and decrypt it. Forwarding a file sends the same reference again.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    pub file_id: FileId,
    /// The encrypted manifest, the upload's last part: lists every part's chunk.
    pub manifest: PartHashes,
    /// Plaintext bytes.
    pub size: u64,
    /// Plaintext bytes per part (the last may be shorter).
    pub part_size: u32,
    pub name: String,
    pub mime: String,
    /// The per-file key (`crypto::media`); only the ends of the chat ever see it.
    #[serde(with = "crate::ids::hex_or_bytes")]
    pub key: [u8; 32],
    /// A small JPEG preview for images, made by the sender.
    #[serde(with = "serde_bytes", default)]
    pub thumbnail: Vec<u8>,
}

impl std::fmt::Debug for FileRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("FileRef")
            .field("file_id", &self.file_id)
            .field("name", &self.name)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl FileRef {
    /// Checks what a sender could get wrong or forge before anything is fetched or allocated
    /// for it: the part size within limits, and a size that fits [`MAX_PARTS`] of them.
    pub fn check(&self) -> Result<(), String> {
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&self.part_size) {
            return Err(format!(
                "a part size of {} bytes is outside {MIN_PART_SIZE}..={MAX_PART_SIZE}",
                self.part_size
            ));
        }
        let parts = self.size.div_ceil(u64::from(self.part_size));
        if parts >= u64::from(MAX_PARTS) {
            return Err(format!("{} bytes in parts of {} is over {MAX_PARTS} parts", self.size, self.part_size));
        }
        if self.thumbnail.len() > MAX_THUMBNAIL_BYTES {
            return Err(format!("a thumbnail of {} bytes is over {MAX_THUMBNAIL_BYTES}", self.thumbnail.len()));
        }
        Ok(())
    }

    /// Data parts (the manifest not counted); meaningful once [`FileRef::check`] passed.
    pub fn data_parts(&self) -> u32 {
        let parts = self.size.div_ceil(u64::from(self.part_size.max(1)));
        u32::try_from(parts).unwrap_or(u32::MAX)
    }

    /// Plaintext bytes of data part `part`.
    pub fn part_len(&self, part: u32) -> u64 {
        let start = u64::from(part) * u64::from(self.part_size);
        self.size.saturating_sub(start).min(u64::from(self.part_size))
    }

    /// The key a file's provider records go under: derived from the file key, so that only
    /// someone who has the file's reference can look its providers up, and relays cannot tie
    /// the providers to the stored manifest chunk (and through it to the uploader).
    pub fn provider_key(&self) -> ChunkHash {
        ChunkHash(blake3::derive_key("meshgram 2026-12 media provider key v1", &self.key))
    }
}

/// One part as the manifest lists it: the stored chunk's hash and the plaintext's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartHashes {
    pub chunk: ChunkHash,
    #[serde(with = "crate::ids::hex_or_bytes")]
    pub plain: [u8; 32],
}

/// The manifest, encrypted as the upload's last part: the chunk of every data part, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub size: u64,
    pub part_size: u32,
    pub parts: Vec<PartHashes>,
}

/// How long a relay keeps a provider record: client nodes announce again well before.
pub const PROVIDER_TTL_SECS: u64 = 3600;
/// Files per `Provide`.
pub const MAX_PROVIDED_PER_REQUEST: usize = 4096;
/// Relays a client node announces a file to, and a downloader asks for its providers: the
/// closest to its manifest chunk, like Kademlia's provider records (all relays of a small mesh).
pub const PROVIDER_RELAYS: usize = 8;

/// Chunk hashes per `ReplicaRequest::HasChunks` (repair): 128 KiB of hashes.
pub const MAX_HASHES_PER_REQUEST: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_manifest_fits_one_chunk() {
        let part = PartHashes { chunk: ChunkHash([0xff; 32]), plain: [0xff; 32] };
        let manifest = Manifest { size: u64::MAX, part_size: MAX_PART_SIZE, parts: vec![part; MAX_PARTS as usize - 1] };
        let sealed = postcard::to_stdvec(&manifest).unwrap().len() + 16;
        assert!(sealed <= MAX_CHUNK_SIZE, "{sealed} bytes");
    }
}
