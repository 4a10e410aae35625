//! The client's own redb: message history per chat, envelope ids already seen (exactly-once
//! display even when a relay redelivers), per-device send counters, and cached user cards.

use std::path::Path;
use std::sync::Arc;

use libp2p::PeerId;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use crate::client::groups::GroupRecord;
use crate::client::messaging::MAX_CAPTION_CHARS;
use crate::crypto::media::MANIFEST_INDEX;
use crate::ids::{UserId, now_ms};
use crate::proto::envelope::EnvelopeId;
use crate::proto::media::{ChunkHash, FileId, FileRef, PartHashes};
use crate::proto::payload::{Body, MAX_TEXT_CHARS, MessageId, Payload, Status};
use crate::proto::rich::{CallbackId, Extras};
use crate::proto::{LookupQuery, UserCard};

/// File in a profile dir.
pub const HISTORY_FILE: &str = "history.redb";
/// How long `open` waits for another process of the same profile to let go of the history.
const OPEN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// (chat user id, local order) → message. Local order is the order messages reached this
/// device, which keeps each sender's messages in the order they were sent.
const MESSAGES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("messages");
const SEEN: TableDefinition<&[u8; 16], ()> = TableDefinition::new("seen_envelopes");
/// Message id → its key in `messages`, for edits, deletes and receipts.
const MESSAGE_INDEX: TableDefinition<&[u8; 16], (u64, u64)> = TableDefinition::new("message_index");
const SEND_SEQ: TableDefinition<&[u8], u64> = TableDefinition::new("send_seq");
const CARDS: TableDefinition<u64, &[u8]> = TableDefinition::new("cards");
/// User id → when its card was fetched (unix seconds): how fresh the cached card is.
const CARD_FETCHED: TableDefinition<u64, u64> = TableDefinition::new("card_fetched");
/// `@username` (canonical) or `+phone` → user id, so a known contact is found by name without
/// the gateway.
const CARD_NAMES: TableDefinition<&str, u64> = TableDefinition::new("card_names");
/// Messages no relay could take yet, oldest first: order → the sealed payload's plaintext
/// (`Payload`, whose `chat_with` names the recipient). Sealed afresh when sent.
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Absolute file path → its [`UploadState`].
const UPLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("uploads");
/// Files this device serves to peers: provider key ([`FileRef::provider_key`]) →
/// [`ServedFile`]. Keyed so, the keys alone are what the node announces.
const SERVED_FILES: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("served_files");
/// Chunk → (its file's provider key, part index; `MANIFEST_INDEX` for the manifest itself).
const SERVED_CHUNKS: TableDefinition<&[u8; 32], (&[u8; 32], u32)> = TableDefinition::new("served_chunks");
/// Own devices that asked for the history: device id → [`DeviceRequest`].
const DEVICE_REQUESTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("device_requests");
/// Histories sent to this device and not imported yet: envelope id → [`PendingImport`].
const PENDING_IMPORTS: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("pending_imports");
/// Changes (edits, deletes, receipts) to messages this device does not have yet, kept until a
/// history import brings them: (message id, envelope id) → [`ParkedChange`].
const PARKED: TableDefinition<(&[u8; 16], &[u8; 16]), &[u8]> = TableDefinition::new("parked_changes");
/// Most changes parked at once, and how long one waits for its message.
const MAX_PARKED: u64 = 100_000;
const PARKED_FOR_SECS: u64 = 30 * 86_400;
/// Button presses this device (a bot's) received and has not answered: press id → [`Press`].
const PRESSES_IN: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("presses_in");
/// Button presses this device made, and their answers once they come: press id → [`Press`].
const PRESSES_OUT: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("presses_out");
/// How long a press is kept, and most kept at once (the oldest go first).
const PRESS_KEPT_MS: u64 = 3_600_000;
const MAX_PRESSES: u64 = 10_000;
/// Most unanswered presses kept from one user: one pressing fast cannot crowd others out.
const MAX_PRESSES_PER_USER: usize = 100;
const NEXT_ORDER: &str = "next_order";
/// Set (to when it asked) while this device waits for its history from another device: only
/// then is a `History` taken.
const HISTORY_WANTED: &str = "history_wanted_since";
/// The blake3 (first 8 bytes) of the last backup's export: an unchanged history is not backed
/// up again.
const BACKUP_HASH: &str = "backup_export_hash";
const NEXT_OUTBOX: &str = "next_outbox";
/// Envelopes dropped as definitively bad (forged, malformed), ever.
const DROPPED_ENVELOPES: &str = "dropped_envelopes";
/// Periodic backups by the client node: how often (seconds; absent: off), how many the relays
/// keep, and when the last one was made (unix seconds).
const BACKUP_EVERY: &str = "backup_every_secs";
const BACKUP_KEEP: &str = "backup_keep";
const BACKUP_LAST: &str = "backup_last_at";

/// A message as this device keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub id: MessageId,
    /// The other person in the chat.
    pub chat: UserId,
    pub from: UserId,
    pub outgoing: bool,
    /// Empty once deleted.
    pub text: String,
    pub reply_to: Option<MessageId>,
    pub sent_at_ms: u64,
    pub status: Status,
    pub edited: bool,
    pub deleted: bool,
    /// A file sent with the message (then `text` is its caption).
    pub file: Option<Box<FileRef>>,
    /// Written by this device, not sent by anyone: a contact's devices changed, say.
    #[serde(default)]
    pub notice: bool,
    /// Formatting and keyboard, as bots send them.
    #[serde(default)]
    pub extras: Option<Box<Extras>>,
}

impl StoredMessage {
    /// A notice this device writes into a chat (a contact's devices changed, a group changed):
    /// read, from nobody's device.
    pub fn notice(id: MessageId, chat: UserId, from: UserId, text: String) -> Self {
        StoredMessage {
            id,
            chat,
            from,
            outgoing: false,
            text,
            reply_to: None,
            sent_at_ms: crate::ids::now_ms(),
            status: Status::Read,
            edited: false,
            deleted: false,
            file: None,
            notice: true,
            extras: None,
        }
    }
}

/// [`StoredMessage`] as histories written before extras existed hold it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct StoredMessageV3 {
    id: MessageId,
    chat: UserId,
    from: UserId,
    outgoing: bool,
    text: String,
    reply_to: Option<MessageId>,
    sent_at_ms: u64,
    status: Status,
    edited: bool,
    deleted: bool,
    file: Option<Box<FileRef>>,
    notice: bool,
}

impl From<StoredMessageV3> for StoredMessage {
    fn from(v3: StoredMessageV3) -> Self {
        StoredMessage {
            id: v3.id,
            chat: v3.chat,
            from: v3.from,
            outgoing: v3.outgoing,
            text: v3.text,
            reply_to: v3.reply_to,
            sent_at_ms: v3.sent_at_ms,
            status: v3.status,
            edited: v3.edited,
            deleted: v3.deleted,
            file: v3.file,
            notice: v3.notice,
            extras: None,
        }
    }
}

/// [`StoredMessage`] as histories written before notices existed hold it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct StoredMessageV2 {
    id: MessageId,
    chat: UserId,
    from: UserId,
    outgoing: bool,
    text: String,
    reply_to: Option<MessageId>,
    sent_at_ms: u64,
    status: Status,
    edited: bool,
    deleted: bool,
    file: Option<Box<FileRef>>,
}

/// [`StoredMessage`] as histories written before files existed hold it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct StoredMessageV1 {
    id: MessageId,
    chat: UserId,
    from: UserId,
    outgoing: bool,
    text: String,
    reply_to: Option<MessageId>,
    sent_at_ms: u64,
    status: Status,
    edited: bool,
    deleted: bool,
}

/// Reads a message record of any layout (postcard has no optional trailing fields).
fn decode_message(bytes: &[u8]) -> Result<StoredMessage, postcard::Error> {
    // An older layout must take up the whole record: postcard reads a prefix happily, and a
    // newer record read as an older one would silently lose its last fields.
    fn whole<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
        postcard::take_from_bytes(bytes).ok().filter(|(_, rest): &(T, &[u8])| rest.is_empty()).map(|(v, _)| v)
    }
    postcard::from_bytes(bytes).or_else(|e| {
        if let Some(v3) = whole::<StoredMessageV3>(bytes) {
            return Ok(v3.into());
        }
        let v2 = match whole::<StoredMessageV2>(bytes) {
            Some(v2) => v2,
            None => {
                let v1: StoredMessageV1 = whole(bytes).ok_or(e)?;
                StoredMessageV2 {
                    id: v1.id,
                    chat: v1.chat,
                    from: v1.from,
                    outgoing: v1.outgoing,
                    text: v1.text,
                    reply_to: v1.reply_to,
                    sent_at_ms: v1.sent_at_ms,
                    status: v1.status,
                    edited: v1.edited,
                    deleted: v1.deleted,
                    file: None,
                }
            }
        };
        Ok(StoredMessage {
            id: v2.id,
            chat: v2.chat,
            from: v2.from,
            outgoing: v2.outgoing,
            text: v2.text,
            reply_to: v2.reply_to,
            sent_at_ms: v2.sent_at_ms,
            status: v2.status,
            edited: v2.edited,
            deleted: v2.deleted,
            file: v2.file,
            notice: false,
            extras: None,
        })
    })
}

/// A press of an inline button: as the bot received it (`PRESSES_IN`), or as the presser made
/// it, with the bot's answer once it comes (`PRESSES_OUT`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Press {
    pub id: CallbackId,
    /// The other side: who pressed (for the bot), or the bot (for the presser).
    pub with: UserId,
    pub message: MessageId,
    pub data: String,
    /// When this device recorded it (unix ms).
    pub at_ms: u64,
    pub answer: Option<PressAnswer>,
}

/// A bot's answer to a press.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PressAnswer {
    pub text: Option<String>,
    pub alert: bool,
}

/// An own device that asked for the history, as this device has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRequest {
    pub device: PeerId,
    pub device_name: String,
    /// Unix seconds.
    pub requested_at: u64,
    /// When this device sent it the history (unix seconds).
    pub sent_at: Option<u64>,
}

/// A history sent to this device, waiting to be fetched and merged in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingImport {
    pub from_device: PeerId,
    pub file: FileRef,
    pub messages: u64,
}

/// Everything a device's history holds that another device of the account should have:
/// messages (with their files' references and read state) and contacts. Nothing that is this
/// device's alone (keys, send counters, seen envelopes, uploads, served files). Secret chats,
/// once they exist, live elsewhere and are never in an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryExport {
    /// [`EXPORT_FORMAT`]: an export of another layout is refused, not misread.
    pub format: u32,
    pub user_id: UserId,
    /// Unix seconds.
    pub exported_at: u64,
    /// In history order: by chat, then in the order they reached the exporting device.
    pub messages: Vec<StoredMessage>,
    /// Contacts' cards with when they were fetched (unix seconds).
    pub cards: Vec<(UserCard, u64)>,
    /// `@username` / `+phone` → user id, so contacts are found by name without the gateway.
    pub names: Vec<(String, UserId)>,
    /// The groups and channels the account is in, with their keys (as
    /// [`crate::client::groups::Groups::for_another_device`] gives them).
    pub groups: Vec<GroupRecord>,
}

/// When the client node backs the history up on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupSchedule {
    pub every_secs: u64,
    /// Backups the relays keep.
    pub keep: u8,
    /// The last backup to the relays (unix seconds).
    pub last_at: Option<u64>,
}

/// The layout of [`HistoryExport`] this build writes and reads (it reads formats 1 and 2 too).
pub const EXPORT_FORMAT: u32 = 3;

/// [`HistoryExport`] in format 2, from before exports carried groups.
#[derive(Deserialize)]
struct HistoryExportV2 {
    format: u32,
    user_id: UserId,
    exported_at: u64,
    messages: Vec<StoredMessage>,
    cards: Vec<(UserCard, u64)>,
    names: Vec<(String, UserId)>,
}

/// [`HistoryExport`] in format 1, from before messages had extras.
#[derive(Deserialize)]
struct HistoryExportV1 {
    format: u32,
    user_id: UserId,
    exported_at: u64,
    messages: Vec<StoredMessageV3>,
    cards: Vec<(UserCard, u64)>,
    names: Vec<(String, UserId)>,
}

impl HistoryExport {
    /// Reads an export of this build's format or an earlier one; `Ok(Err(format))` for a format
    /// this build does not know.
    pub fn decode(bytes: &[u8]) -> Result<Result<HistoryExport, u32>, postcard::Error> {
        let (format, _) = postcard::take_from_bytes::<u32>(bytes)?;
        match format {
            EXPORT_FORMAT => postcard::from_bytes(bytes).map(Ok),
            2 => {
                let v2: HistoryExportV2 = postcard::from_bytes(bytes)?;
                Ok(Ok(HistoryExport {
                    format: v2.format,
                    user_id: v2.user_id,
                    exported_at: v2.exported_at,
                    messages: v2.messages,
                    cards: v2.cards,
                    names: v2.names,
                    groups: Vec::new(),
                }))
            }
            1 => {
                let v1: HistoryExportV1 = postcard::from_bytes(bytes)?;
                Ok(Ok(HistoryExport {
                    format: v1.format,
                    user_id: v1.user_id,
                    exported_at: v1.exported_at,
                    messages: v1.messages.into_iter().map(StoredMessage::from).collect(),
                    cards: v1.cards,
                    names: v1.names,
                    groups: Vec::new(),
                }))
            }
            other => Ok(Err(other)),
        }
    }
}

/// A change to earlier messages that arrived before them (see `PARKED`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedChange {
    pub author: UserId,
    pub body: Body,
    /// Unix seconds.
    pub parked_at: u64,
}

/// The messages a change (an edit, a delete, a receipt) names, and what it does to one of them:
/// only a message's author may edit or delete it; receipts come from the other side of the
/// chat, about our messages. `None` for a body that is no change.
#[allow(clippy::type_complexity)]
pub fn change_of(
    body: &Body,
    author: UserId,
) -> Option<(&[MessageId], Box<dyn FnMut(&mut StoredMessage) -> bool + Send + '_>)> {
    match body {
        Body::Edit { message, text } => Some((
            std::slice::from_ref(message),
            Box::new(move |m: &mut StoredMessage| {
                m.from == author && !m.deleted && {
                    m.text.clone_from(text);
                    m.edited = true;
                    true
                }
            }),
        )),
        Body::EditRich { message, text, extras } => Some((
            std::slice::from_ref(message),
            Box::new(move |m: &mut StoredMessage| {
                // The bounds a new message is held to: an edit is no way around them.
                let longest = if m.file.is_some() { MAX_CAPTION_CHARS } else { MAX_TEXT_CHARS };
                let fits = extras.check().is_ok() && text.as_ref().is_none_or(|t| t.chars().count() <= longest);
                m.from == author && !m.deleted && fits && {
                    let mut now = m.extras.as_deref().cloned().unwrap_or_default();
                    if let Some(text) = text {
                        m.text.clone_from(text);
                        now.entities.clone_from(&extras.entities);
                    }
                    now.markup.clone_from(&extras.markup);
                    m.extras = (!now.is_empty()).then(|| Box::new(now));
                    m.edited = true;
                    true
                }
            }),
        )),
        Body::Delete { messages } => {
            Some((messages, Box::new(move |m: &mut StoredMessage| m.from == author && mark_deleted(m))))
        }
        Body::Receipt { status, messages } => {
            let status = *status;
            Some((
                messages,
                Box::new(move |m: &mut StoredMessage| {
                    m.outgoing && m.chat == author && m.status < status && {
                        m.status = status;
                        true
                    }
                }),
            ))
        }
        _ => None,
    }
}

/// Marks a message deleted (its text gone); false if it was already.
pub fn mark_deleted(m: &mut StoredMessage) -> bool {
    if m.deleted {
        return false;
    }
    m.text.clear();
    m.deleted = true;
    true
}

/// What an import changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Imported {
    /// Messages this device did not have.
    pub new_messages: u64,
    /// Messages it had, brought up to date (read state, edits, deletes).
    pub merged_messages: u64,
    pub chats: u64,
}

/// An upload this device started: what it needs to resume it after a crash, and to send the
/// same file again without uploading it twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadState {
    pub file_id: FileId,
    #[serde(with = "crate::ids::hex_or_bytes")]
    pub key: [u8; 32],
    pub part_size: u32,
    /// The file as it was when the upload started: a changed file is a new upload.
    pub size: u64,
    pub modified_ns: u128,
}

/// A complete file on this device's disk whose chunks it can hand to peers: each part is
/// sealed again from the file when asked for (sealing is deterministic, see `crypto::media`),
/// so serving costs no second copy on disk. A file changed since is noticed (the chunk's hash
/// no longer matches) and not served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedFile {
    pub path: String,
    pub file: FileRef,
    /// The encrypted manifest, as stored.
    #[serde(with = "serde_bytes")]
    pub manifest_chunk: Vec<u8>,
}

/// History failures.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("history database: {0}")]
    Db(String),
}

impl<E: Into<redb::Error>> From<E> for HistoryError {
    fn from(e: E) -> Self {
        let e: redb::Error = e.into();
        match e {
            redb::Error::DatabaseAlreadyOpen => HistoryError::Db(
                "the history is open in another meshgram process for this profile (a client node, or another command)"
                    .into(),
            ),
            other => HistoryError::Db(other.to_string()),
        }
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("invariant: history records always serialize")
}

/// The open history of one profile. Clones share the open database (a client node's sender and
/// receiver both write to it; redb serializes their write transactions).
#[derive(Debug, Clone)]
pub struct History {
    db: Arc<Database>,
}

impl History {
    /// The database, for the tables of other parts of the client kept in it (`groups`).
    pub(crate) fn db(&self) -> &Database {
        &self.db
    }

    /// Opens (or creates) the profile's history. Another process of the same profile may
    /// hold it for a moment (e.g. `messages --follow` applying a batch): wait a little for it.
    pub fn open(profile: &Path) -> Result<Self, HistoryError> {
        let path = profile.join(HISTORY_FILE);
        let deadline = std::time::Instant::now() + OPEN_WAIT;
        let db = loop {
            match Database::create(&path) {
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        let tx = db.begin_write()?;
        tx.open_table(MESSAGES)?;
        tx.open_table(SEEN)?;
        tx.open_table(MESSAGE_INDEX)?;
        tx.open_table(SEND_SEQ)?;
        tx.open_table(CARDS)?;
        tx.open_table(CARD_FETCHED)?;
        tx.open_table(CARD_NAMES)?;
        tx.open_table(META)?;
        tx.open_table(OUTBOX)?;
        tx.open_table(UPLOADS)?;
        tx.open_table(SERVED_FILES)?;
        tx.open_table(SERVED_CHUNKS)?;
        tx.open_table(DEVICE_REQUESTS)?;
        tx.open_table(PENDING_IMPORTS)?;
        tx.open_table(PARKED)?;
        tx.open_table(PRESSES_IN)?;
        tx.open_table(PRESSES_OUT)?;
        tx.commit()?;
        Ok(History { db: Arc::new(db) })
    }

    /// Reserves `n` consecutive send counters for a recipient device; returns the first.
    pub fn reserve_seq(&self, device: &PeerId, n: u64) -> Result<u64, HistoryError> {
        let tx = self.db.begin_write()?;
        let first = {
            let mut table = tx.open_table(SEND_SEQ)?;
            let key = device.to_bytes();
            let first = table.get(key.as_slice())?.map(|v| v.value()).unwrap_or(0);
            table.insert(key.as_slice(), first + n)?;
            first
        };
        tx.commit()?;
        Ok(first)
    }

    /// Records messages; those whose envelope was seen before are skipped. Returns the new ones.
    pub fn record(
        &self,
        messages: Vec<(Option<EnvelopeId>, StoredMessage)>,
    ) -> Result<Vec<StoredMessage>, HistoryError> {
        let tx = self.db.begin_write()?;
        let fresh = record_in(&tx, messages)?;
        tx.commit()?;
        Ok(fresh)
    }

    /// Marks an envelope processed without recording a message (typing, a dropped forgery);
    /// returns whether it was new.
    pub fn mark_seen(&self, id: EnvelopeId) -> Result<bool, HistoryError> {
        let tx = self.db.begin_write()?;
        let new = tx.open_table(SEEN)?.insert(&id.0, ())?.is_none();
        tx.commit()?;
        Ok(new)
    }

    /// Marks a definitively bad envelope seen, so that it is acknowledged and never opened
    /// again, and counts it (once, however often it is fetched).
    pub fn drop_envelope(&self, id: EnvelopeId) -> Result<(), HistoryError> {
        let tx = self.db.begin_write()?;
        if tx.open_table(SEEN)?.insert(&id.0, ())?.is_none() {
            let mut meta = tx.open_table(META)?;
            let dropped = meta.get(DROPPED_ENVELOPES)?.map(|v| v.value()).unwrap_or(0);
            meta.insert(DROPPED_ENVELOPES, dropped + 1)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The upload of `path` this device started, if any.
    pub fn upload(&self, path: &str) -> Result<Option<UploadState>, HistoryError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(UPLOADS)?.get(path)?.and_then(|v| postcard::from_bytes(v.value()).ok()))
    }

    /// Remembers an upload before its first part leaves (see [`UploadState`]).
    pub fn put_upload(&self, path: &str, state: &UploadState) -> Result<(), HistoryError> {
        let tx = self.db.begin_write()?;
        tx.open_table(UPLOADS)?.insert(path, encode(state).as_slice())?;
        tx.commit()?;
        Ok(())
    }

    /// Records a complete file this device can serve, with its parts' chunks.
    pub fn put_served(&self, served: &ServedFile, parts: &[PartHashes]) -> Result<(), HistoryError> {
        let (file, manifest) = (served.file.provider_key().0, served.file.manifest.chunk.0);
        let tx = self.db.begin_write()?;
        {
            tx.open_table(SERVED_FILES)?.insert(&file, encode(served).as_slice())?;
            let mut chunks = tx.open_table(SERVED_CHUNKS)?;
            chunks.insert(&manifest, (&file, MANIFEST_INDEX))?;
            for (part, hashes) in parts.iter().enumerate() {
                chunks.insert(&hashes.chunk.0, (&file, part as u32))?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The served file a chunk belongs to, and its part index there.
    pub fn served_chunk(&self, chunk: &ChunkHash) -> Result<Option<(ServedFile, u32)>, HistoryError> {
        let tx = self.db.begin_read()?;
        let Some((file, part)) = tx.open_table(SERVED_CHUNKS)?.get(&chunk.0)?.map(|v| {
            let (file, part) = v.value();
            (*file, part)
        }) else {
            return Ok(None);
        };
        let file = tx.open_table(SERVED_FILES)?.get(&file)?.and_then(|v| postcard::from_bytes(v.value()).ok());
        Ok(file.map(|f| (f, part)))
    }

    /// The provider keys of every file this device serves, to announce
    /// ([`FileRef::provider_key`]).
    pub fn served_files(&self) -> Result<Vec<ChunkHash>, HistoryError> {
        let tx = self.db.begin_read()?;
        let mut out = Vec::new();
        for entry in tx.open_table(SERVED_FILES)?.iter()? {
            out.push(ChunkHash(*entry?.0.value()));
        }
        Ok(out)
    }

    /// The periodic backup schedule, if one is set.
    pub fn backup_schedule(&self) -> Result<Option<BackupSchedule>, HistoryError> {
        let tx = self.db.begin_read()?;
        let meta = tx.open_table(META)?;
        let Some(every_secs) = meta.get(BACKUP_EVERY)?.map(|v| v.value()) else { return Ok(None) };
        let keep = meta.get(BACKUP_KEEP)?.map_or(1, |v| v.value()) as u8;
        let last_at = meta.get(BACKUP_LAST)?.map(|v| v.value());
        Ok(Some(BackupSchedule { every_secs, keep, last_at }))
    }

    /// Sets (or with `None` ends) the periodic backup schedule.
    pub fn set_backup_schedule(&self, schedule: Option<(u64, u8)>) -> Result<(), HistoryError> {
        let tx = self.db.begin_write()?;
        {
            let mut meta = tx.open_table(META)?;
            match schedule {
                Some((every, keep)) => {
                    meta.insert(BACKUP_EVERY, every)?;
                    meta.insert(BACKUP_KEEP, u64::from(keep))?;
                }
                None => {
                    meta.remove(BACKUP_EVERY)?;
                    meta.remove(BACKUP_KEEP)?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Remembers when the last backup to the relays was made.
    pub fn backup_made(&self, at: u64) -> Result<(), HistoryError> {
        let tx = self.db.begin_write()?;
        tx.open_table(META)?.insert(BACKUP_LAST, at)?;
        tx.commit()?;
        Ok(())
    }

    /// How many envelopes were dropped as definitively bad, ever.
    pub fn dropped_envelopes(&self) -> Result<u64, HistoryError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(META)?.get(DROPPED_ENVELOPES)?.map(|v| v.value()).unwrap_or(0))
    }

    /// Records outgoing messages as pending and queues their payloads, in one transaction.
    pub fn queue(
        &self,
        messages: Vec<StoredMessage>,
        payloads: &[Payload],
    ) -> Result<Vec<StoredMessage>, HistoryError> {
        let tx = self.db.begin_write()?;
        let fresh = {
            let fresh = record_in(&tx, messages.into_iter().map(|m| (None, m)).collect())?;
            let mut outbox = tx.open_table(OUTBOX)?;
            let mut meta = tx.open_table(META)?;
            let mut next = meta.get(NEXT_OUTBOX)?.map(|v| v.value()).unwrap_or(0);
            for payload in payloads {
                outbox.insert(next, encode(payload).as_slice())?;
                next += 1;
            }
            meta.insert(NEXT_OUTBOX, next)?;
            fresh
        };
        tx.commit()?;
        Ok(fresh)
    }

    /// What waits in the outbox, oldest first, with each entry's key.
    pub fn outbox(&self) -> Result<Vec<(u64, Payload)>, HistoryError> {
        let tx = self.db.begin_read()?;
        let mut out = Vec::new();
        for entry in tx.open_table(OUTBOX)?.range::<u64>(..)? {
            let (key, value) = entry?;
            match postcard::from_bytes(value.value()) {
                Ok(payload) => out.push((key.value(), payload)),
                Err(e) => tracing::warn!(error = %e, "skipping a corrupt outbox entry"),
            }
        }
        Ok(out)
    }

    /// Takes sent entries out of the outbox and marks their messages sent; returns those.
    pub fn sent_from_outbox(&self, keys: &[u64], ids: &[MessageId]) -> Result<Vec<StoredMessage>, HistoryError> {
        self.leave_outbox(keys, ids, |m| {
            m.status == Status::Pending && {
                m.status = Status::Sent;
                true
            }
        })
    }

    /// Takes refused entries out of the outbox; their messages stay, marked deleted (nobody
    /// got them), so the user sees what did not go out.
    pub fn refused_from_outbox(&self, keys: &[u64], ids: &[MessageId]) -> Result<Vec<StoredMessage>, HistoryError> {
        self.leave_outbox(keys, ids, |m| {
            m.status == Status::Pending && {
                m.deleted = true;
                true
            }
        })
    }

    fn leave_outbox(
        &self,
        keys: &[u64],
        ids: &[MessageId],
        change: impl FnMut(&mut StoredMessage) -> bool,
    ) -> Result<Vec<StoredMessage>, HistoryError> {
        let tx = self.db.begin_write()?;
        let changed = {
            let mut outbox = tx.open_table(OUTBOX)?;
            for key in keys {
                outbox.remove(key)?;
            }
            change_in(&tx, ids, change)?
        };
        tx.commit()?;
        Ok(changed)
    }

    /// A message by id.
    pub fn message(&self, id: &MessageId) -> Result<Option<StoredMessage>, HistoryError> {
        let tx = self.db.begin_read()?;
        let Some(key) = tx.open_table(MESSAGE_INDEX)?.get(&id.0)?.map(|v| v.value()) else {
            return Ok(None);
        };
        Ok(tx.open_table(MESSAGES)?.get(key)?.and_then(|v| decode_message(v.value()).ok()))
    }

    /// Applies `change` (what envelope `envelope` says) to each listed message that exists, and
    /// marks the envelope seen, in one transaction; returns the changed messages. An envelope
    /// seen before changes nothing.
    pub fn update(
        &self,
        envelope: EnvelopeId,
        ids: &[MessageId],
        change: impl FnMut(&mut StoredMessage) -> bool,
    ) -> Result<Vec<StoredMessage>, HistoryError> {
        self.change(Some(envelope), ids, change)
    }

    /// Applies a change of this device's own making to each listed message that exists.
    pub fn update_own(
        &self,
        ids: &[MessageId],
        change: impl FnMut(&mut StoredMessage) -> bool,
    ) -> Result<Vec<StoredMessage>, HistoryError> {
        self.change(None, ids, change)
    }

    fn change(
        &self,
        envelope: Option<EnvelopeId>,
        ids: &[MessageId],
        change: impl FnMut(&mut StoredMessage) -> bool,
    ) -> Result<Vec<StoredMessage>, HistoryError> {
        let tx = self.db.begin_write()?;
        if let Some(envelope) = envelope
            && tx.open_table(SEEN)?.insert(&envelope.0, ())?.is_some()
        {
            return Ok(Vec::new());
        }
        let changed = change_in(&tx, ids, change)?;
        tx.commit()?;
        Ok(changed)
    }

    /// Whether an envelope was already processed.
    pub fn seen(&self, id: &EnvelopeId) -> Result<bool, HistoryError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(SEEN)?.get(&id.0)?.is_some())
    }

    /// A chat's messages in order, or every chat's (grouped by chat) when `chat` is `None`.
    pub fn messages(&self, chat: Option<UserId>) -> Result<Vec<StoredMessage>, HistoryError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(MESSAGES)?;
        let range = match chat {
            Some(c) => table.range((c.0, 0)..=(c.0, u64::MAX))?,
            None => table.range::<(u64, u64)>(..)?,
        };
        let mut out = Vec::new();
        for entry in range {
            let (_, value) = entry?;
            match decode_message(value.value()) {
                Ok(message) => out.push(message),
                Err(e) => tracing::warn!(error = %e, "skipping a corrupt history record"),
            }
        }
        Ok(out)
    }

    /// Up to `limit` messages of a chat before message `before` (before its newest without it),
    /// oldest first: one page of a long history, read from its end.
    pub fn messages_before(
        &self,
        chat: UserId,
        before: Option<&MessageId>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, HistoryError> {
        let tx = self.db.begin_read()?;
        let end = match before {
            Some(id) => match tx.open_table(MESSAGE_INDEX)?.get(&id.0)?.map(|v| v.value()) {
                Some((c, seq)) if c == chat.0 => seq,
                // Not a message of this chat: nothing is before it.
                _ => return Ok(Vec::new()),
            },
            None => u64::MAX,
        };
        let table = tx.open_table(MESSAGES)?;
        let mut out = Vec::with_capacity(limit.min(1024));
        for entry in table.range((chat.0, 0)..(chat.0, end))?.rev() {
            if out.len() >= limit {
                break;
            }
            let (_, value) = entry?;
            match decode_message(value.value()) {
                Ok(message) => out.push(message),
                Err(e) => tracing::warn!(error = %e, "skipping a corrupt history record"),
            }
        }
        out.reverse();
        Ok(out)
    }

    /// A cached card.
    pub fn card(&self, user: UserId) -> Result<Option<UserCard>, HistoryError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(CARDS)?.get(user.0)?.and_then(|v| postcard::from_bytes(v.value()).ok()))
    }

    /// A cached card and when it was fetched (unix seconds), by any query.
    pub fn cached_card(&self, query: &LookupQuery) -> Result<Option<(UserCard, u64)>, HistoryError> {
        let tx = self.db.begin_read()?;
        let user = match query {
            LookupQuery::UserId(id) => id.0,
            by_name => match tx.open_table(CARD_NAMES)?.get(name_key(by_name).as_str())? {
                Some(id) => id.value(),
                None => return Ok(None),
            },
        };
        let Some(card) =
            tx.open_table(CARDS)?.get(user)?.and_then(|v| postcard::from_bytes::<UserCard>(v.value()).ok())
        else {
            return Ok(None);
        };
        // A name that has moved on to someone else since is no longer this card's.
        if let LookupQuery::Username(u) = query
            && card.username.as_ref().map(|c| c.canonical()) != Some(u.canonical())
        {
            return Ok(None);
        }
        let fetched = tx.open_table(CARD_FETCHED)?.get(user)?.map(|v| v.value()).unwrap_or(0);
        Ok(Some((card, fetched)))
    }

    /// The phone number this user was looked up by, if ever (cards carry no phone numbers).
    pub fn known_phone(&self, user: UserId) -> Result<Option<String>, HistoryError> {
        let tx = self.db.begin_read()?;
        for entry in tx.open_table(CARD_NAMES)?.range::<&str>("+"..",")? {
            let (name, id) = entry?;
            if id.value() == user.0 {
                return Ok(Some(name.value().to_string()));
            }
        }
        Ok(None)
    }

    /// Caches a card fetched at `now` (unix seconds) for `query`, and by its @username.
    pub fn put_card(&self, card: &UserCard, query: &LookupQuery, now: u64) -> Result<(), HistoryError> {
        let tx = self.db.begin_write()?;
        {
            let user = card.user_id.0;
            tx.open_table(CARDS)?.insert(user, encode(card).as_slice())?;
            tx.open_table(CARD_FETCHED)?.insert(user, now)?;
            let mut names = tx.open_table(CARD_NAMES)?;
            if !matches!(query, LookupQuery::UserId(_)) {
                names.insert(name_key(query).as_str(), user)?;
            }
            if let Some(username) = &card.username {
                names.insert(name_key(&LookupQuery::Username(username.clone())).as_str(), user)?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

impl History {
    /// The users this history has chats with, in history order.
    pub fn chats(&self) -> Result<Vec<UserId>, HistoryError> {
        let tx = self.db.begin_read()?;
        let mut chats: Vec<UserId> = Vec::new();
        for entry in tx.open_table(MESSAGES)?.range::<(u64, u64)>(..)? {
            let (chat, _) = entry?.0.value();
            if chats.last() != Some(&UserId(chat)) {
                chats.push(UserId(chat));
            }
        }
        Ok(chats)
    }

    /// Whether there is a chat with `user` (any message, either way).
    pub fn has_chat(&self, user: UserId) -> Result<bool, HistoryError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(MESSAGES)?.range((user.0, 0)..=(user.0, u64::MAX))?.next().is_some())
    }

    /// Records an own device's request for the history, and marks its envelope seen, in one
    /// transaction; returns it if it is news (a device that was sent the history already, or
    /// asked before, is not).
    pub fn put_device_request(
        &self,
        envelope: EnvelopeId,
        request: DeviceRequest,
    ) -> Result<Option<DeviceRequest>, HistoryError> {
        let tx = self.db.begin_write()?;
        let fresh = {
            if tx.open_table(SEEN)?.insert(&envelope.0, ())?.is_some() {
                return Ok(None);
            }
            let mut table = tx.open_table(DEVICE_REQUESTS)?;
            let key = request.device.to_bytes();
            let known = table.get(key.as_slice())?.is_some();
            if !known {
                table.insert(key.as_slice(), encode(&request).as_slice())?;
            }
            (!known).then_some(request)
        };
        tx.commit()?;
        Ok(fresh)
    }

    /// Records a press a bot received, and marks its envelope seen, in one transaction; false
    /// if it was seen before.
    pub fn put_press_in(&self, envelope: EnvelopeId, press: &Press) -> Result<bool, HistoryError> {
        let tx = self.db.begin_write()?;
        if tx.open_table(SEEN)?.insert(&envelope.0, ())?.is_some() {
            return Ok(false);
        }
        // Committed either way: the envelope was seen, kept or not.
        let kept = put_press(&tx, PRESSES_IN, press, Some(MAX_PRESSES_PER_USER))?;
        tx.commit()?;
        Ok(kept)
    }

    /// Records a press this device makes (before it is sent).
    pub fn put_press_out(&self, press: &Press) -> Result<(), HistoryError> {
        let tx = self.db.begin_write()?;
        put_press(&tx, PRESSES_OUT, press, None)?;
        tx.commit()?;
        Ok(())
    }

    /// The presses received and not answered, oldest first.
    pub fn presses_in(&self) -> Result<Vec<Press>, HistoryError> {
        let tx = self.db.begin_read()?;
        let cutoff = now_ms().saturating_sub(PRESS_KEPT_MS);
        let mut out: Vec<Press> = Vec::new();
        for entry in tx.open_table(PRESSES_IN)?.iter()? {
            out.extend(postcard::from_bytes::<Press>(entry?.1.value()).ok().filter(|p| p.at_ms >= cutoff));
        }
        out.sort_by_key(|p| p.at_ms);
        Ok(out)
    }

    /// A received press not answered yet.
    pub fn press_in(&self, id: &CallbackId) -> Result<Option<Press>, HistoryError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(PRESSES_IN)?.get(&id.0)?.and_then(|v| postcard::from_bytes(v.value()).ok()))
    }

    /// Forgets a received press once it is answered (it is answered once).
    pub fn answered_press_in(&self, id: &CallbackId) -> Result<(), HistoryError> {
        let tx = self.db.begin_write()?;
        tx.open_table(PRESSES_IN)?.remove(&id.0)?;
        tx.commit()?;
        Ok(())
    }

    /// Records a bot's answer to one of our presses, and marks its envelope seen, in one
    /// transaction: only for a press this device made to that bot, answered once. Returns the
    /// press as answered, if it is news.
    pub fn answer_press_out(
        &self,
        envelope: EnvelopeId,
        id: &CallbackId,
        from: UserId,
        answer: PressAnswer,
    ) -> Result<Option<Press>, HistoryError> {
        let tx = self.db.begin_write()?;
        let answered = {
            if tx.open_table(SEEN)?.insert(&envelope.0, ())?.is_some() {
                return Ok(None);
            }
            let mut table = tx.open_table(PRESSES_OUT)?;
            let press: Option<Press> = table.get(&id.0)?.and_then(|v| postcard::from_bytes(v.value()).ok());
            match press {
                Some(mut press) if press.with == from && press.answer.is_none() => {
                    press.answer = Some(answer);
                    table.insert(&id.0, encode(&press).as_slice())?;
                    Some(press)
                }
                _ => None,
            }
        };
        tx.commit()?;
        Ok(answered)
    }

    /// One of our presses, with its answer once it came.
    pub fn press_out(&self, id: &CallbackId) -> Result<Option<Press>, HistoryError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(PRESSES_OUT)?.get(&id.0)?.and_then(|v| postcard::from_bytes(v.value()).ok()))
    }

    /// Own devices that asked for the history.
    pub fn device_requests(&self) -> Result<Vec<DeviceRequest>, HistoryError> {
        let tx = self.db.begin_read()?;
        let mut out = Vec::new();
        for entry in tx.open_table(DEVICE_REQUESTS)?.iter()? {
            if let Ok(request) = postcard::from_bytes(entry?.1.value()) {
                out.push(request);
            }
        }
        Ok(out)
    }

    /// Remembers that `device` was sent the history now (whether or not it asked).
    pub fn history_sent(&self, device: PeerId, device_name: &str, now: u64) -> Result<(), HistoryError> {
        let tx = self.db.begin_write()?;
        {
            let mut table = tx.open_table(DEVICE_REQUESTS)?;
            let key = device.to_bytes();
            let mut request = table
                .get(key.as_slice())?
                .and_then(|v| postcard::from_bytes::<DeviceRequest>(v.value()).ok())
                .unwrap_or(DeviceRequest { device, device_name: device_name.into(), requested_at: now, sent_at: None });
            request.sent_at = Some(now);
            table.insert(key.as_slice(), encode(&request).as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Queues a history sent to this device for import, and marks its envelope seen.
    pub fn put_pending_import(&self, envelope: EnvelopeId, import: &PendingImport) -> Result<bool, HistoryError> {
        let tx = self.db.begin_write()?;
        if tx.open_table(SEEN)?.insert(&envelope.0, ())?.is_some() {
            return Ok(false);
        }
        tx.open_table(PENDING_IMPORTS)?.insert(&envelope.0, encode(import).as_slice())?;
        tx.commit()?;
        Ok(true)
    }

    /// Histories waiting to be imported, with the key each is queued under.
    pub fn pending_imports(&self) -> Result<Vec<([u8; 16], PendingImport)>, HistoryError> {
        let tx = self.db.begin_read()?;
        let mut out = Vec::new();
        for entry in tx.open_table(PENDING_IMPORTS)?.iter()? {
            let (key, value) = entry?;
            match postcard::from_bytes(value.value()) {
                Ok(import) => out.push((*key.value(), import)),
                Err(e) => tracing::warn!(error = %e, "skipping a corrupt pending import"),
            }
        }
        Ok(out)
    }

    /// Forgets a pending import (done, or definitively bad).
    pub fn remove_pending_import(&self, key: &[u8; 16]) -> Result<(), HistoryError> {
        let tx = self.db.begin_write()?;
        tx.open_table(PENDING_IMPORTS)?.remove(key)?;
        tx.commit()?;
        Ok(())
    }

    /// Everything another device of `user` should have, as of now (one read transaction).
    pub fn export(&self, user: UserId, now: u64) -> Result<HistoryExport, HistoryError> {
        let tx = self.db.begin_read()?;
        let mut messages = Vec::new();
        for entry in tx.open_table(MESSAGES)?.range::<(u64, u64)>(..)? {
            match decode_message(entry?.1.value()) {
                // Still in this device's outbox: it reaches the others as a sync copy once sent.
                Ok(message) if message.status == Status::Pending => {}
                Ok(message) => messages.push(message),
                Err(e) => tracing::warn!(error = %e, "leaving a corrupt history record out of the export"),
            }
        }
        let fetched = tx.open_table(CARD_FETCHED)?;
        let mut cards = Vec::new();
        for entry in tx.open_table(CARDS)?.iter()? {
            let (user, card) = entry?;
            if let Ok(card) = postcard::from_bytes::<UserCard>(card.value()) {
                cards.push((card, fetched.get(user.value())?.map(|v| v.value()).unwrap_or(0)));
            }
        }
        let mut names = Vec::new();
        for entry in tx.open_table(CARD_NAMES)?.iter()? {
            let (name, id) = entry?;
            names.push((name.value().to_string(), UserId(id.value())));
        }
        // Groups are the caller's to add: their table is `Groups`'s.
        let groups = Vec::new();
        Ok(HistoryExport { format: EXPORT_FORMAT, user_id: user, exported_at: now, messages, cards, names, groups })
    }

    /// Merges an export into this history, in one transaction. A message already here (a copy
    /// that reached both devices) is kept once, where it is, and brought up to date: the
    /// furthest status, and a delete or edit either side saw. Each chat's messages from both
    /// sides are interleaved by send time, each side keeping its own order. Cards fill in
    /// contacts this device had not looked up, as if fetched long ago (so the gateway is asked
    /// before they are relied on). Importing again adds nothing.
    pub fn import(&self, export: &HistoryExport) -> Result<Imported, HistoryError> {
        let mut by_chat: std::collections::BTreeMap<u64, Vec<&StoredMessage>> = Default::default();
        let mut ids = std::collections::HashSet::new();
        for m in export.messages.iter().filter(|m| ids.insert(m.id)) {
            by_chat.entry(m.chat.0).or_default().push(m);
        }
        let mut imported = Imported { chats: by_chat.len() as u64, ..Imported::default() };
        let tx = self.db.begin_write()?;
        {
            let mut table = tx.open_table(MESSAGES)?;
            let mut index = tx.open_table(MESSAGE_INDEX)?;
            let mut meta = tx.open_table(META)?;
            let mut order = meta.get(NEXT_ORDER)?.map(|v| v.value()).unwrap_or(0);
            for (chat, incoming) in by_chat {
                // Records that do not decode stay where they are, untouched.
                let mut local = Vec::new();
                for entry in table.range((chat, 0)..=(chat, u64::MAX))? {
                    let (key, value) = entry?;
                    if let Ok(m) = decode_message(value.value()) {
                        local.push((key.value(), m));
                    }
                }
                let mut mine: std::collections::HashMap<MessageId, StoredMessage> =
                    local.iter().map(|(_, m)| (m.id, m.clone())).collect();
                let mut theirs = Vec::with_capacity(incoming.len());
                for m in incoming {
                    match mine.remove(&m.id) {
                        Some(here) => {
                            imported.merged_messages += 1;
                            theirs.push(merge(here, m));
                        }
                        // Here already, in another chat: it stays there.
                        None if index.get(&m.id.0)?.is_some() => imported.merged_messages += 1,
                        None => {
                            imported.new_messages += 1;
                            theirs.push(m.clone());
                        }
                    }
                }
                let only_here: Vec<StoredMessage> =
                    local.iter().filter(|(_, m)| mine.contains_key(&m.id)).map(|(_, m)| m.clone()).collect();
                for (key, _) in &local {
                    table.remove(key)?;
                }
                for message in interleave_by_time(theirs, only_here) {
                    table.insert((chat, order), encode(&message).as_slice())?;
                    index.insert(&message.id.0, (chat, order))?;
                    order += 1;
                }
            }
            meta.insert(NEXT_ORDER, order)?;
            let mut cards = tx.open_table(CARDS)?;
            let mut fetched = tx.open_table(CARD_FETCHED)?;
            for (card, _) in &export.cards {
                if cards.get(card.user_id.0)?.is_none() {
                    cards.insert(card.user_id.0, encode(card).as_slice())?;
                    fetched.insert(card.user_id.0, 0)?;
                }
            }
            let mut names = tx.open_table(CARD_NAMES)?;
            for (name, user) in &export.names {
                if names.get(name.as_str())?.is_none() {
                    names.insert(name.as_str(), user.0)?;
                }
            }
        }
        tx.commit()?;
        Ok(imported)
    }

    /// Applies `change` (what envelope `envelope` says) like [`History::update`], and parks it
    /// for each named message this device does not have yet, so that an import bringing the
    /// message brings the change too.
    pub fn update_or_park(
        &self,
        envelope: EnvelopeId,
        ids: &[MessageId],
        change: impl FnMut(&mut StoredMessage) -> bool,
        parked: &ParkedChange,
    ) -> Result<Vec<StoredMessage>, HistoryError> {
        let tx = self.db.begin_write()?;
        if tx.open_table(SEEN)?.insert(&envelope.0, ())?.is_some() {
            return Ok(Vec::new());
        }
        let changed = change_in(&tx, ids, change)?;
        {
            let index = tx.open_table(MESSAGE_INDEX)?;
            let mut table = tx.open_table(PARKED)?;
            for id in ids {
                if index.get(&id.0)?.is_none() && table.len()? < MAX_PARKED {
                    table.insert((&id.0, &envelope.0), encode(parked).as_slice())?;
                }
            }
        }
        tx.commit()?;
        Ok(changed)
    }

    /// Applies the parked changes whose messages are here now (after an import), in one
    /// transaction, and forgets those that waited too long; returns the changed messages.
    pub fn replay_parked(&self, now: u64) -> Result<Vec<StoredMessage>, HistoryError> {
        let tx = self.db.begin_write()?;
        let mut changed = Vec::new();
        {
            let mut due = Vec::new();
            {
                let index = tx.open_table(MESSAGE_INDEX)?;
                for entry in tx.open_table(PARKED)?.iter()? {
                    let (key, value) = entry?;
                    let (message, envelope) = key.value();
                    let parked = postcard::from_bytes::<ParkedChange>(value.value()).ok();
                    let here = index.get(message)?.is_some();
                    let stale = parked.as_ref().is_none_or(|p| now > p.parked_at + PARKED_FOR_SECS);
                    if here || stale {
                        due.push((*message, *envelope, parked.filter(|_| here)));
                    }
                }
            }
            for (message, envelope, parked) in due {
                if let Some(parked) = parked
                    && let Some((_, change)) = change_of(&parked.body, parked.author)
                {
                    changed.extend(change_in(&tx, &[MessageId(message)], change)?);
                }
                tx.open_table(PARKED)?.remove((&message, &envelope))?;
            }
        }
        tx.commit()?;
        Ok(changed)
    }

    /// Notes that this device asked its other devices for the history (and takes one now).
    pub fn want_history(&self, since: u64) -> Result<(), HistoryError> {
        self.set_meta(HISTORY_WANTED, Some(since))
    }

    /// Whether this device waits for a history from another device.
    pub fn wants_history(&self) -> Result<bool, HistoryError> {
        Ok(self.meta(HISTORY_WANTED)?.is_some())
    }

    /// A history arrived and was merged: another is not taken unless asked for again.
    pub fn history_received(&self) -> Result<(), HistoryError> {
        self.set_meta(HISTORY_WANTED, None)
    }

    /// The hash of the last backup's export (first 8 bytes), if one was made.
    pub fn backup_hash(&self) -> Result<Option<u64>, HistoryError> {
        self.meta(BACKUP_HASH)
    }

    /// Remembers the last backup's export hash.
    pub fn set_backup_hash(&self, hash: u64) -> Result<(), HistoryError> {
        self.set_meta(BACKUP_HASH, Some(hash))
    }

    fn meta(&self, key: &str) -> Result<Option<u64>, HistoryError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(META)?.get(key)?.map(|v| v.value()))
    }

    fn set_meta(&self, key: &str, value: Option<u64>) -> Result<(), HistoryError> {
        let tx = self.db.begin_write()?;
        {
            let mut meta = tx.open_table(META)?;
            match value {
                Some(v) => meta.insert(key, v)?,
                None => meta.remove(key)?,
            };
        }
        tx.commit()?;
        Ok(())
    }
}

/// Two runs of one chat's messages as one, by send time; each run keeps its own order (a
/// sender's clock may step back), and on a tie the first run's message goes first.
fn interleave_by_time(first: Vec<StoredMessage>, second: Vec<StoredMessage>) -> Vec<StoredMessage> {
    let mut out = Vec::with_capacity(first.len() + second.len());
    let (mut a, mut b) = (first.into_iter().peekable(), second.into_iter().peekable());
    loop {
        let take_first = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => x.sent_at_ms <= y.sent_at_ms,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return out,
        };
        out.extend(if take_first { a.next() } else { b.next() });
    }
}

/// One message as two devices had it: the furthest status, and whatever edit or delete
/// either saw (a delete wins over everything).
fn merge(mut mine: StoredMessage, theirs: &StoredMessage) -> StoredMessage {
    mine.status = mine.status.max(theirs.status);
    if theirs.deleted {
        mine.deleted = true;
        mine.text.clear();
    } else if theirs.edited && !mine.edited && !mine.deleted {
        mine.edited = true;
        mine.text.clone_from(&theirs.text);
        mine.extras.clone_from(&theirs.extras);
    }
    mine
}

/// Keeps a press unless its id is taken (an id is the presser's choice: a second press with
/// it must not change who the answer goes to) or its user has `per_user` presses waiting.
/// Expired presses go first; when full, the one this device recorded first.
fn put_press(
    tx: &WriteTransaction,
    table: TableDefinition<&[u8; 16], &[u8]>,
    press: &Press,
    per_user: Option<usize>,
) -> Result<bool, HistoryError> {
    let mut table = tx.open_table(table)?;
    if table.get(&press.id.0)?.is_some() {
        return Ok(false);
    }
    let cutoff = now_ms().saturating_sub(PRESS_KEPT_MS);
    let (mut oldest, mut from_user): (Option<([u8; 16], u64)>, usize) = (None, 0);
    table.retain(|id, v| match postcard::from_bytes::<Press>(v) {
        Ok(p) if p.at_ms >= cutoff => {
            from_user += usize::from(p.with == press.with);
            if oldest.is_none_or(|(_, at)| p.at_ms < at) {
                oldest = Some((*id, p.at_ms));
            }
            true
        }
        _ => false,
    })?;
    if per_user.is_some_and(|cap| from_user >= cap) {
        return Ok(false);
    }
    if table.len()? >= MAX_PRESSES
        && let Some((id, _)) = oldest
    {
        table.remove(&id)?;
    }
    table.insert(&press.id.0, encode(press).as_slice())?;
    Ok(true)
}

/// Records messages within `tx`; see [`History::record`].
fn record_in(
    tx: &WriteTransaction,
    messages: Vec<(Option<EnvelopeId>, StoredMessage)>,
) -> Result<Vec<StoredMessage>, HistoryError> {
    let mut fresh = Vec::new();
    let mut table = tx.open_table(MESSAGES)?;
    let mut seen = tx.open_table(SEEN)?;
    let mut index = tx.open_table(MESSAGE_INDEX)?;
    let mut meta = tx.open_table(META)?;
    let mut order = meta.get(NEXT_ORDER)?.map(|v| v.value()).unwrap_or(0);
    for (envelope, message) in messages {
        if let Some(id) = envelope {
            if seen.get(&id.0)?.is_some() {
                continue;
            }
            seen.insert(&id.0, ())?;
        }
        if index.get(&message.id.0)?.is_some() {
            continue;
        }
        table.insert((message.chat.0, order), encode(&message).as_slice())?;
        index.insert(&message.id.0, (message.chat.0, order))?;
        order += 1;
        fresh.push(message);
    }
    meta.insert(NEXT_ORDER, order)?;
    Ok(fresh)
}

/// Applies `change` to each listed message within `tx`; returns the changed ones.
fn change_in(
    tx: &WriteTransaction,
    ids: &[MessageId],
    mut change: impl FnMut(&mut StoredMessage) -> bool,
) -> Result<Vec<StoredMessage>, HistoryError> {
    let mut changed = Vec::new();
    let index = tx.open_table(MESSAGE_INDEX)?;
    let mut table = tx.open_table(MESSAGES)?;
    for id in ids {
        let Some(key) = index.get(&id.0)?.map(|v| v.value()) else { continue };
        let Some(mut message) = table.get(key)?.and_then(|v| decode_message(v.value()).ok()) else {
            continue;
        };
        if change(&mut message) {
            table.insert(key, encode(&message).as_slice())?;
            changed.push(message);
        }
    }
    Ok(changed)
}

/// The key a by-name query is cached under: the canonical @username, or the phone.
fn name_key(query: &LookupQuery) -> String {
    match query {
        LookupQuery::Username(u) => format!("@{}", u.canonical()),
        LookupQuery::Phone(p) => p.as_str().to_string(),
        LookupQuery::UserId(id) => id.to_string(),
        LookupQuery::Group(group) => group.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_envelope_is_seen_and_counted_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let history = History::open(dir.path()).expect("open");
        let (bad, worse) = (EnvelopeId::random(), EnvelopeId::random());
        history.drop_envelope(bad).expect("drop");
        history.drop_envelope(bad).expect("fetched again");
        history.drop_envelope(worse).expect("drop");
        assert_eq!(history.dropped_envelopes().expect("count"), 2);
        assert!(history.seen(&bad).expect("seen"), "never opened again");
        drop(history);
        assert_eq!(History::open(dir.path()).expect("reopen").dropped_envelopes().expect("count"), 2, "kept");
    }

    fn message(chat: u64, text: &str, status: Status) -> StoredMessage {
        StoredMessage {
            id: MessageId::random(),
            chat: UserId(chat),
            from: UserId(1),
            outgoing: true,
            text: text.into(),
            reply_to: None,
            sent_at_ms: 5,
            status,
            edited: false,
            deleted: false,
            file: None,
            notice: false,
            extras: None,
        }
    }

    #[test]
    fn an_import_merges_copies_keeps_each_chats_order_and_adds_nothing_twice() {
        let (old_dir, new_dir) = (tempfile::tempdir().expect("temp dir"), tempfile::tempdir().expect("temp dir"));
        let (old, new) = (History::open(old_dir.path()).expect("open"), History::open(new_dir.path()).expect("open"));
        let (first, second) = (message(2, "first", Status::Read), message(2, "second", Status::Sent));
        let deleted = StoredMessage { deleted: true, text: String::new(), ..message(3, "gone", Status::Sent) };
        old.record(vec![(None, first.clone()), (None, second.clone()), (None, deleted.clone())]).expect("record");
        // The new device got `second` itself (less far along), `third` after it signed in, and
        // `deleted` before its author deleted it.
        let third = message(2, "third", Status::Sent);
        let undeleted = StoredMessage { text: "gone".into(), deleted: false, ..deleted.clone() };
        let second_here = StoredMessage { status: Status::Pending, ..second.clone() };
        new.record(vec![(None, second_here), (None, third.clone()), (None, undeleted)]).expect("record");

        // An edit of `first` reached the new device before `first` did: it waits for it.
        let edit = Body::Edit { message: first.id, text: "first, edited".into() };
        let parked = ParkedChange { author: UserId(1), body: edit, parked_at: 9 };
        let (ids, change) = change_of(&parked.body, UserId(1)).expect("a change");
        assert!(new.update_or_park(EnvelopeId::random(), ids, change, &parked).expect("park").is_empty());
        let pending = StoredMessage { status: Status::Pending, ..message(2, "in the outbox", Status::Pending) };
        old.record(vec![(None, pending)]).expect("record");

        let export = old.export(UserId(1), 9).expect("export");
        assert_eq!(export.messages.len(), 3, "not what waits in the exporter's outbox");
        let imported = new.import(&export).expect("import");
        assert_eq!(imported, Imported { new_messages: 1, merged_messages: 2, chats: 2 });
        assert_eq!(new.replay_parked(10).expect("replay").len(), 1);
        assert_eq!(new.replay_parked(10).expect("replay again").len(), 0, "applied once");
        let chat: Vec<(String, Status)> =
            new.messages(Some(UserId(2))).expect("read").into_iter().map(|m| (m.text, m.status)).collect();
        let want = [("first, edited", Status::Read), ("second", Status::Sent), ("third", Status::Sent)];
        assert_eq!(chat, want.map(|(t, s)| (t.to_string(), s)), "the exporter's order, then what only this device had");
        let gone = new.message(&deleted.id).expect("read").expect("kept");
        assert!(gone.deleted && gone.text.is_empty(), "a delete either side saw wins");
        assert_eq!(new.message(&third.id).expect("read").expect("kept").status, Status::Sent);

        assert_eq!(new.import(&export).expect("again"), Imported { new_messages: 0, merged_messages: 3, chats: 2 });
        assert_eq!(new.messages(None).expect("read").len(), 4, "nothing twice");
    }

    #[test]
    fn presses_are_kept_once_and_answered_once_by_their_bot() {
        let dir = tempfile::tempdir().expect("temp dir");
        let history = History::open(dir.path()).expect("open");
        let press = Press {
            id: CallbackId::random(),
            with: UserId(7),
            message: MessageId::random(),
            data: "yes".into(),
            at_ms: now_ms(),
            answer: None,
        };
        assert!(history.presses_in().expect("a new history reads").is_empty());
        let envelope = EnvelopeId::random();
        assert!(history.put_press_in(envelope, &press).expect("put"));
        assert!(!history.put_press_in(envelope, &press).expect("put again"), "an envelope counts once");
        let hijack = Press { with: UserId(666), ..press.clone() };
        assert!(!history.put_press_in(EnvelopeId::random(), &hijack).expect("put"), "an id is taken once");
        assert_eq!(history.presses_in().expect("read"), vec![press.clone()]);
        history.answered_press_in(&press.id).expect("answer");
        assert!(history.press_in(&press.id).expect("read").is_none(), "answered once");

        history.put_press_out(&press).expect("put");
        let answer = PressAnswer { text: Some("ok".into()), alert: false };
        let other_bot = history.answer_press_out(EnvelopeId::random(), &press.id, UserId(8), answer.clone());
        assert!(other_bot.expect("answer").is_none(), "only the bot pressed answers");
        let answered = history.answer_press_out(EnvelopeId::random(), &press.id, UserId(7), answer.clone());
        assert_eq!(answered.expect("answer").and_then(|p| p.answer), Some(answer.clone()));
        let twice = history.answer_press_out(EnvelopeId::random(), &press.id, UserId(7), answer);
        assert!(twice.expect("answer").is_none(), "answered once");
    }

    #[test]
    fn messages_recorded_before_files_existed_still_read() {
        let id = MessageId::random();
        let old = StoredMessageV1 {
            id,
            chat: UserId(2),
            from: UserId(2),
            outgoing: false,
            text: "hi".into(),
            reply_to: None,
            sent_at_ms: 5,
            status: Status::Read,
            edited: false,
            deleted: false,
        };
        let read = decode_message(&encode(&old)).expect("an old record reads");
        assert_eq!((read.id, read.text.as_str(), read.status, &read.file), (id, "hi", Status::Read, &None));
        let v2 = StoredMessageV2 {
            id,
            chat: UserId(2),
            from: UserId(2),
            outgoing: false,
            text: "file".into(),
            reply_to: None,
            sent_at_ms: 5,
            status: Status::Read,
            edited: false,
            deleted: false,
            file: None,
        };
        let read = decode_message(&encode(&v2)).expect("a record from before notices reads");
        assert_eq!((read.text.as_str(), read.notice), ("file", false));
        let v3 = StoredMessageV3 {
            id,
            chat: UserId(2),
            from: UserId(2),
            outgoing: false,
            text: "notice".into(),
            reply_to: None,
            sent_at_ms: 5,
            status: Status::Read,
            edited: false,
            deleted: false,
            file: None,
            notice: true,
        };
        let read = decode_message(&encode(&v3)).expect("a record from before extras reads");
        assert_eq!((read.text.as_str(), read.notice, &read.extras), ("notice", true, &None));
        let extras = Extras { entities: vec![], markup: Some(crate::proto::rich::Markup::RemoveKeyboard) };
        let new = StoredMessage { text: "again".into(), extras: Some(Box::new(extras)), ..read };
        assert_eq!(decode_message(&encode(&new)).expect("a new record reads"), new);
    }
}
