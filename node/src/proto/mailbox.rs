//! `/meshgram/mailbox/1` (client ↔ relay) and `/meshgram/replica/1` (relay ↔ relay).
//!
//! ```text
//! client                 entry relay                    mailbox relays (R closest to recipient)
//!   Hello{cert} ───────────▶ verify once per connection
//!   Send{envelopes} ───────▶ check sender = connection ─▶ Replica Store ─▶ synced log + redb
//!   ◀──────── Stored{ids} ◀─ all R durable ◀────────────── Stored
//!                            (relays greet each other first: Replica Hello{relay cert} ⇄
//!                             Welcome{relay cert}, both signed by the gateway)
//!
//! recipient ── Hello ──▶ one of its mailbox relays
//!   Fetch{wait, ack} ─▶ Envelopes (long-poll: answered as soon as a Store arrives, even
//!                       before its commit); `ack` (the batch before) is deleted here and by
//!                       Replica Delete on the other replicas. `Ack{ids}` does that alone.
//!
//! relay ── Replica Digests{mailbox → blake3(held ids)} ──▶ another relay responsible for them
//!       ◀─ Differ{mailboxes} ─ Reconcile{mailbox, held} ─▶ Reconciled{wanted, delivered}
//!       ── Store{wanted envelopes} ──▶          (repair, every few seconds; `relay::repair`)
//! ```
//! Both run on pipes (`crate::net::pipe`): one stream per connection, tagged requests and answers.
//! Relays see routing fields and ciphertext only: the content is sealed end to end
//! (`crypto::seal`).

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::crypto::cert::{RelayCert, SessionCert};
use crate::ids::UserId;
use crate::net::pipe::{Greeting, PipeLimits, RequestKind};
use crate::proto::WireError;
use crate::proto::envelope::{Envelope, EnvelopeId};
use crate::proto::group::{GroupBatch, GroupCursor, GroupId};
use crate::proto::media::{ChunkHash, FileId, PartRecord};

/// Client ↔ relay: hello, send, fetch, ack.
pub const MAILBOX_PROTOCOL: &str = "/meshgram/mailbox/1";
/// Relay ↔ relay: store and delete mailbox replicas, and repair them.
pub const REPLICA_PROTOCOL: &str = "/meshgram/replica/1";
/// Relays find each other with Kademlia on this protocol.
pub const KAD_PROTOCOL: &str = "/meshgram/kad/1";
/// A sealed message: Noise allows 65,535 bytes per message; routing fields fit in the rest.
pub const MAX_ENVELOPE_SIZE: usize = 66 * 1024;
/// Envelopes per `Send`/`Store`/`Envelopes` batch: large batches amortize commits.
pub const MAX_ENVELOPES_PER_BATCH: usize = 256;
/// A whole mailbox request or response: a full batch of maximal envelopes plus framing.
pub const MAX_MAILBOX_MESSAGE_SIZE: usize = MAX_ENVELOPES_PER_BATCH * MAX_ENVELOPE_SIZE + 64 * 1024;
/// Longest a `Fetch` may wait for new envelopes before answering empty.
pub const MAX_FETCH_WAIT_MS: u32 = 25_000;

/// Both protocols run as pipes (`crate::net::pipe`): one long-lived stream per connection carrying
/// tagged requests and answers; these are their message size limits.
pub const MAILBOX_LIMITS: PipeLimits = PipeLimits {
    max_request: MAX_MAILBOX_MESSAGE_SIZE,
    max_response: MAX_MAILBOX_MESSAGE_SIZE,
    max_in_flight: crate::net::pipe::MAX_IN_FLIGHT,
    // Room for one maximal request and one maximal answer at once; more waits.
    max_memory: 2 * MAX_MAILBOX_MESSAGE_SIZE,
};
/// See [`MAILBOX_LIMITS`].
pub const REPLICA_LIMITS: PipeLimits = MAILBOX_LIMITS;

/// A client's request to a relay.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MailboxRequest {
    /// Present the session certificate; required once per connection before anything else.
    Hello { cert: SessionCert },
    /// Store envelopes in their recipients' mailboxes; answered once durable on R relays.
    Send { envelopes: Vec<Envelope> },
    /// Envelopes waiting in the caller's own mailbox, oldest first. With `wait_ms > 0` and an
    /// empty mailbox, the relay answers as soon as something arrives (long-poll). `ack` are
    /// envelopes of earlier fetches the caller has kept, deleted first as by `Ack`: a
    /// receiving loop needs one request per batch, not two.
    Fetch { max: u32, wait_ms: u32, ack: Vec<EnvelopeId> },
    /// The caller has these envelopes; delete them on every replica.
    Ack { ids: Vec<EnvelopeId> },
    /// Store group messages (envelopes to a group's mailbox, sealed as
    /// [`crate::proto::group::GroupSeal`]) once per group on its `R` relays; answered `Stored`
    /// once durable there, as `Send` is. Refused unless each is signed by its epoch's post key,
    /// certified by the group's admin key, in the newest epoch this relay knows.
    Post { envelopes: Vec<Envelope> },
    /// Group messages held here from each cursor on, at most `max` in all. With `wait_ms > 0`
    /// and nothing new, answered as soon as something arrives in one of the groups (long-poll;
    /// a newer `GroupFetch` from the same device answers an older one empty). Nothing is
    /// deleted: every member reads from a cursor of its own, until the messages expire.
    GroupFetch { groups: Vec<GroupCursor>, max: u32, wait_ms: u32 },
    /// Registers (`Some`, replacing any before) or removes (`None`) this device's push
    /// endpoint on this relay: when an envelope arrives for the device while it is not
    /// connected, the closest of its mailbox relays sends a wake-up there. Only for the device
    /// of the connection's session. Answered `PushSet`.
    SetPush { push: Option<PushEndpoint> },
    /// This device's push endpoint as this relay holds it. Answered `Push`.
    GetPush,
    /// Registers this device's push endpoint (as `SetPush`) and the groups it reads from this
    /// relay (at most [`crate::proto::group::MAX_GROUPS_PER_FETCH`], replacing those before):
    /// a post in one of them wakes the device while it is not connected here. Answered `PushSet`.
    PushGroups { push: PushEndpoint, groups: Vec<GroupId> },
    /// `Fetch`, its acknowledgements signed by the device ([`SignedAck`]): the relay passes
    /// the signature on, so that the other replicas delete their copies too. Answered as `Fetch`.
    FetchAcked { max: u32, wait_ms: u32, ack: SignedAck },
    /// `Ack`, signed. Answered `Acked`.
    AckSigned { ack: SignedAck },
}

/// A device's signed acknowledgement of envelopes in its own mailbox (the device is the
/// mailbox): what a relay must show another relay before that one deletes its copies, so that
/// no relay, certified or not, can erase envelopes their recipient never received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedAck {
    pub mailbox: PeerId,
    pub ids: Vec<EnvelopeId>,
    /// The mailbox device's ed25519 signature over [`SignedAck::message`].
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Why a [`SignedAck`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("the mailbox {0} is not an ed25519 device id")]
    NotADevice(PeerId),
    #[error("the acknowledgement is not signed by its mailbox's device")]
    BadSignature,
    #[error("an acknowledgement names 1 to {MAX_ENVELOPES_PER_BATCH} envelopes")]
    BadCount,
}

impl SignedAck {
    /// `ids` of `keypair`'s own mailbox, signed by it.
    pub fn sign(keypair: &libp2p::identity::Keypair, ids: Vec<EnvelopeId>) -> Self {
        let mailbox = keypair.public().to_peer_id();
        let signature = keypair.sign(&Self::message(&mailbox, &ids)).unwrap_or_default();
        SignedAck { mailbox, ids, signature }
    }

    /// Checks that the mailbox's own key signed exactly these ids.
    pub fn verify(&self) -> Result<(), AckError> {
        if self.ids.is_empty() || self.ids.len() > MAX_ENVELOPES_PER_BATCH {
            return Err(AckError::BadCount);
        }
        let key = libp2p::identity::PublicKey::try_decode_protobuf(self.mailbox.as_ref().digest())
            .map_err(|_| AckError::NotADevice(self.mailbox))?;
        if !key.verify(&Self::message(&self.mailbox, &self.ids), &self.signature) {
            return Err(AckError::BadSignature);
        }
        Ok(())
    }

    fn message(mailbox: &PeerId, ids: &[EnvelopeId]) -> Vec<u8> {
        let mut message = b"meshgram/ack/1".to_vec();
        message.extend(mailbox.to_bytes());
        ids.iter().for_each(|id| message.extend(id.0));
        message
    }
}

/// A Web Push subscription (RFC 8030, as UnifiedPush and browsers hand them out): where to POST
/// wake-ups, and the keys they are encrypted to (RFC 8291).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushEndpoint {
    /// `https://…` (or `http://…`, for a push service on the local network).
    pub url: String,
    /// The device's P-256 public key, uncompressed (65 bytes): `p256dh`.
    #[serde(with = "serde_bytes")]
    pub p256dh: Vec<u8>,
    /// The shared authentication secret (16 bytes): `auth`.
    #[serde(with = "serde_bytes")]
    pub auth: Vec<u8>,
}

/// The longest push endpoint URL a relay keeps.
pub const MAX_PUSH_URL_LEN: usize = 2048;

impl PushEndpoint {
    /// Checks what a relay can check without sending: the URL's scheme and length, the keys'
    /// sizes (the point itself is checked when a wake-up is encrypted to it).
    pub fn validate(&self) -> Result<(), String> {
        if !(self.url.starts_with("https://") || self.url.starts_with("http://")) {
            return Err("the push endpoint must be an http:// or https:// URL".into());
        }
        if self.url.len() > MAX_PUSH_URL_LEN || self.url.chars().any(char::is_whitespace) {
            return Err(format!("the push endpoint URL must be at most {MAX_PUSH_URL_LEN} characters, without spaces"));
        }
        if self.p256dh.len() != 65 || self.p256dh[0] != 4 {
            return Err("p256dh must be an uncompressed P-256 public key (65 bytes, starting 0x04)".into());
        }
        if self.auth.len() != 16 {
            return Err("auth must be 16 bytes".into());
        }
        Ok(())
    }
}

impl MailboxRequest {
    /// A short stable name for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            MailboxRequest::Hello { .. } => "hello",
            MailboxRequest::Send { .. } => "send",
            MailboxRequest::Fetch { .. } => "fetch",
            MailboxRequest::Ack { .. } => "ack",
            MailboxRequest::Post { .. } => "post",
            MailboxRequest::GroupFetch { .. } => "group_fetch",
            MailboxRequest::SetPush { .. } => "set_push",
            MailboxRequest::GetPush => "get_push",
            MailboxRequest::PushGroups { .. } => "push_groups",
            MailboxRequest::FetchAcked { .. } => "fetch",
            MailboxRequest::AckSigned { .. } => "ack",
        }
    }
}

impl RequestKind for MailboxRequest {
    fn kind(&self) -> &'static str {
        MailboxRequest::kind(self)
    }

    fn is_greeting(&self) -> bool {
        matches!(self, MailboxRequest::Hello { .. })
    }
}

impl Greeting for MailboxResponse {
    fn welcomes(&self) -> bool {
        matches!(self, MailboxResponse::Welcome { .. })
    }
}

/// A relay's answer to a client.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MailboxResponse {
    /// The certificate is accepted. `mailbox_relays` hold the caller's mailbox (fetch there);
    /// `relays` are every relay this one knows.
    Welcome { relay: PeerId, mailbox_relays: Vec<RelayInfo>, relays: Vec<RelayInfo> },
    /// `stored` are durable on R relays; `duplicates` were stored before and were not again.
    Stored { stored: Vec<EnvelopeId>, duplicates: Vec<EnvelopeId> },
    /// Envelopes from the caller's mailbox, oldest first; `more` if the batch was cut short.
    Envelopes { envelopes: Vec<Envelope>, more: bool },
    /// How many envelopes were deleted here.
    Acked { count: u32 },
    /// Refused.
    Error(WireError),
    /// Answer to `GroupFetch`: the groups with messages from their cursors on (a group with
    /// none is left out).
    GroupEnvelopes { groups: Vec<GroupBatch> },
    /// The answer to `SetPush`: kept (or removed) durably.
    PushSet,
    /// The answer to `GetPush`.
    Push { push: Option<PushEndpoint> },
}

/// A relay and where to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInfo {
    pub peer_id: PeerId,
    pub addrs: Vec<libp2p::Multiaddr>,
}

/// One relay asking another to keep or drop replicas.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ReplicaRequest {
    /// Keep these envelopes (the sender checked them); answer once committed.
    Store { envelopes: Vec<Envelope> },
    /// The recipient acknowledged these; delete them. Refused: a delete must carry the
    /// recipient's signature (`DeleteAcked`).
    Delete { mailbox: PeerId, ids: Vec<EnvelopeId> },
    /// Present this relay's certificate; required once per connection before `Store` or
    /// `Delete` (`CERT_INVALID` otherwise). Answered with the other relay's own.
    Hello { cert: RelayCert },
    /// Repair, first step: digests of the envelopes the caller holds per mailbox (at most
    /// [`MAX_DIGESTS_PER_REQUEST`]); answered with the mailboxes whose digest differs here.
    Digests { mailboxes: Vec<MailboxDigest> },
    /// Repair, second step, for a mailbox whose digest differed: the envelope ids the caller
    /// holds in it (at most [`MAX_IDS_PER_RECONCILE`] at a time). Answered with which of them
    /// this relay lacks and which it has delivered.
    Reconcile { mailbox: PeerId, held: Vec<EnvelopeId> },
    /// Repair, last step: keep these envelopes as `Store` does, but no longer than
    /// `expires_at` (Unix seconds, when the copy they repair expires), so that a repaired copy
    /// never outlives the original, nor the record of its delivery elsewhere.
    StoreUntil { envelopes: Vec<Envelope>, expires_at: u64 },
    /// Keep this media chunk (the caller checked its hash; so does the callee); answered
    /// `ChunkStored` once it is synced to disk.
    StoreChunk {
        hash: ChunkHash,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Record a saved part of an upload (this relay is among the `R` closest to its file id);
    /// refused if the upload belongs to another user, had another `total_parts`, or had this
    /// part saved with another hash. Answered `PartRecorded`.
    RecordPart { record: PartRecord },
    /// An upload's saved parts as recorded here, for a client resuming through another relay.
    UploadStatus { file_id: FileId },
    /// One chunk, if held here (`Chunk`, else `NOT_FOUND`).
    GetChunk { hash: ChunkHash },
    /// Media repair: which of these chunks (at most [`crate::proto::media::MAX_HASHES_PER_REQUEST`]) this relay
    /// lacks. Answered `MissingChunks`; the caller sends those with `StoreChunk`.
    HasChunks { hashes: Vec<ChunkHash> },
    /// Would `RecordPart` with this record be accepted here (owner, total, hash, quota)?
    /// Asked of every relay recording the upload before the chunk is stored anywhere, so that a
    /// part refused by them leaves no chunk behind. Answered `PartChecked`; commits nothing.
    CheckPart { record: PartRecord },
    /// These chunks belonged to an upload the caller expired (never finished within the grace
    /// period): delete those no upload recorded here still names. At most
    /// [`crate::proto::media::MAX_HASHES_PER_REQUEST`]. Answered `ChunksDeleted`.
    DeleteChunks { hashes: Vec<ChunkHash> },
    /// A relay mirroring groups for the readers it serves (it is not among their `R` relays)
    /// reads them here, as a member's `GroupFetch` does (the same cursors, limits and
    /// long-poll), so that a channel's readers spread over every relay while its relays answer
    /// one read per mirroring relay. Answered `GroupEnvelopes`.
    GroupFetch { groups: Vec<GroupCursor>, max: u32, wait_ms: u32 },
    /// Delete the envelopes these recipients acknowledged (at most [`MAX_ACKS_PER_DELETE`]),
    /// each ack checked against its mailbox's device key. Answered `Deleted`.
    DeleteAcked { acks: Vec<SignedAck> },
    /// `Reconcile`, answered `ReconciledProven`: the ids this relay delivered come as the
    /// recipient's signed acknowledgements, which the caller checks before it deletes its
    /// copies (an unproven "delivered" deletes nothing).
    ReconcileProven { mailbox: PeerId, held: Vec<EnvelopeId> },
}

impl RequestKind for ReplicaRequest {
    /// A short stable name for metrics and logs.
    fn kind(&self) -> &'static str {
        match self {
            ReplicaRequest::Store { .. } => "store",
            ReplicaRequest::Delete { .. } => "delete",
            ReplicaRequest::Hello { .. } => "hello",
            ReplicaRequest::Digests { .. } => "digests",
            ReplicaRequest::Reconcile { .. } | ReplicaRequest::ReconcileProven { .. } => "reconcile",
            ReplicaRequest::StoreUntil { .. } => "store_until",
            ReplicaRequest::StoreChunk { .. } => "store_chunk",
            ReplicaRequest::RecordPart { .. } => "record_part",
            ReplicaRequest::UploadStatus { .. } => "upload_status",
            ReplicaRequest::GetChunk { .. } => "get_chunk",
            ReplicaRequest::HasChunks { .. } => "has_chunks",
            ReplicaRequest::CheckPart { .. } => "check_part",
            ReplicaRequest::DeleteChunks { .. } => "delete_chunks",
            ReplicaRequest::GroupFetch { .. } => "group_fetch",
            ReplicaRequest::DeleteAcked { .. } => "delete",
        }
    }

    fn is_greeting(&self) -> bool {
        matches!(self, ReplicaRequest::Hello { .. })
    }
}

impl Greeting for ReplicaResponse {
    fn welcomes(&self) -> bool {
        matches!(self, ReplicaResponse::Welcome { .. })
    }
}

/// Acknowledgements per [`ReplicaRequest::DeleteAcked`].
pub const MAX_ACKS_PER_DELETE: usize = 64;

/// Ids per [`ReplicaRequest::Reconcile`]: 1 MiB of ids, far below the frame limit.
pub const MAX_IDS_PER_RECONCILE: usize = 65_536;

/// Digests per [`ReplicaRequest::Digests`]: ~100 bytes each, so a request stays far below the
/// pipe's frame limit.
pub const MAX_DIGESTS_PER_REQUEST: usize = 4096;

/// What a relay holds of one mailbox, in 32 bytes: the XOR of the blake3 hashes of the ids of
/// the envelopes it holds there (undelivered). Two replicas with the same digest hold the same
/// envelopes. XOR, so that a store keeps it up to date per put and delete instead of reading the
/// mailbox, and an empty mailbox's digest is all zeros.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxDigest {
    pub mailbox: PeerId,
    #[serde(with = "crate::ids::hex_or_bytes")]
    pub digest: [u8; 32],
}

impl MailboxDigest {
    /// The digest of holding `held` (in any order) in `mailbox`.
    pub fn of(mailbox: PeerId, held: &[EnvelopeId]) -> Self {
        let mut digest = [0; 32];
        for id in held {
            Self::toggle(&mut digest, id);
        }
        MailboxDigest { mailbox, digest }
    }

    /// Adds `id` to `digest`, or takes it out if it is in it.
    pub fn toggle(digest: &mut [u8; 32], id: &EnvelopeId) {
        for (d, h) in digest.iter_mut().zip(blake3::hash(&id.0).as_bytes()) {
            *d ^= h;
        }
    }
}

/// Answer to a [`ReplicaRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ReplicaResponse {
    /// Committed; `duplicates` were already held (or already delivered) and were skipped.
    Stored {
        duplicates: Vec<EnvelopeId>,
    },
    Deleted {
        count: u32,
    },
    Error(WireError),
    /// `Hello` accepted; this is the answering relay's certificate, for the caller to check.
    Welcome {
        cert: RelayCert,
    },
    /// Answer to `Digests`: the mailboxes whose digest differs from this relay's.
    Differ {
        mailboxes: Vec<PeerId>,
    },
    /// Answer to `Reconcile`: of the caller's ids, those this relay has never held (`wanted`:
    /// send them with `Store`) and those it has delivered to the mailbox's owner (`delivered`:
    /// the caller's copies are stale and may go).
    Reconciled {
        wanted: Vec<EnvelopeId>,
        delivered: Vec<EnvelopeId>,
    },
    /// Answer to `StoreChunk`: durable here.
    ChunkStored,
    /// Answer to `RecordPart`: committed here.
    PartRecorded,
    /// Answer to `UploadStatus`: the upload's owner (`None` if unknown here), its total parts
    /// and the parts saved, ascending.
    UploadStatus {
        owner: Option<UserId>,
        total_parts: u32,
        saved: Vec<u32>,
        /// The chunk each saved part was saved with, in the order of `saved`.
        hashes: Vec<ChunkHash>,
    },
    /// Answer to `GetChunk`.
    Chunk {
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Answer to `HasChunks`: those not held here.
    MissingChunks {
        hashes: Vec<ChunkHash>,
    },
    /// Answer to `CheckPart`: it would be recorded.
    PartChecked,
    /// Answer to `DeleteChunks`: how many were deleted here.
    ChunksDeleted {
        count: u32,
    },
    /// Answer to `GroupFetch`, as a member's is answered.
    GroupEnvelopes {
        groups: Vec<GroupBatch>,
    },
    /// Answer to `ReconcileProven`: the caller's ids this relay never held (`wanted`), and the
    /// signed acknowledgements of those it delivered that it kept (ids delivered on an unsigned
    /// acknowledgement have none: the caller keeps its copy until it expires).
    ReconciledProven {
        wanted: Vec<EnvelopeId>,
        proofs: Vec<SignedAck>,
    },
}
