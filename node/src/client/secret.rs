//! Secret chats from a client's side: one device on each side, a Noise `IK` session between
//! them (see `crypto::secret`), re-keyed every [`REKEY_AFTER_MESSAGES`] messages or
//! [`REKEY_AFTER_SECS`], messages that destroy themselves once read, never on another device.
//!
//! - **Where they live.** Not in the history's redb: redb does not clear the pages it frees, so a
//!   destroyed message or a wiped key would stay readable in the file. Secret chats are one
//!   small file ([`SECRET_FILE`], 0600) rewritten whole on every change (a new file, then a
//!   rename), so what is deleted is gone from the profile's files. Never exported, never
//!   backed up, never synced: only this device has it.
//! - **What goes out.** Handshakes (and declines) travel inside the ordinary Noise X seal, as
//!   [`Body`] variants, to the peer device alone. Messages, receipts, timer changes and the
//!   close travel as bare session frames: relays see the two devices, the time and a padded
//!   size. Everything to send is queued here, sealed, before it goes: a send that cannot reach
//!   a relay now waits in this file's outbox ([`Messenger::flush_secret_outbox`]).
//! - **What comes in.** An envelope from a device we have a session with is tried as a frame
//!   first (current session, then the one before, for messages still in flight across a
//!   re-key); one that opens is applied once (its nonce is remembered), one that is a replay is
//!   dropped. Anything else goes on as an ordinary envelope.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::client::media::{OnProgress, Resume, Serve};
use crate::client::messaging::{Inbox, MessagingError, Messenger};
use crate::crypto::seal;
use crate::crypto::secret::{
    self as noise, Fingerprint, HandshakeContext, Initiation, ReplayWindow, SessionCipher, SessionKeys,
};
use crate::defaults::CARD_FRESH_SECS;
use crate::ids::{NoiseKey, UserId, now_ms};
use crate::proto::envelope::{Envelope, EnvelopeId};
use crate::proto::media::FileRef;
use crate::proto::payload::{Body, MAX_TEXT_CHARS, MessageId, Payload, SecretChatId, Status};
use crate::proto::{LookupQuery, MAX_ENVELOPES_PER_BATCH};

/// The profile's secret chats.
pub const SECRET_FILE: &str = "secret-chats.bin";
const FORMAT: u32 = 1;
/// A fresh handshake once a side has sent this many messages in a session...
pub const REKEY_AFTER_MESSAGES: u64 = 100;
/// ...or once the session is this old, whichever comes first.
pub const REKEY_AFTER_SECS: u64 = 7 * 24 * 3600;
/// The longest self-destruct timer (a week, as Telegram's).
pub const MAX_TTL_SECS: u32 = 7 * 24 * 3600;

/// Why a secret-chat operation could not be done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("no secret chat {0} on this device")]
    Unknown(String),
    #[error("{0} names more than one secret chat; give more of its id")]
    Ambiguous(String),
    #[error("secret chat {chat} is {state}, not {wanted}")]
    WrongState { chat: SecretChatId, state: SecretState, wanted: &'static str },
    #[error("a secret chat is with someone else")]
    WithYourself,
    #[error("messages of a secret chat cannot be forwarded")]
    NoForwarding,
    #[error("a self-destruct timer is 1 s to {MAX_TTL_SECS} s")]
    BadTtl,
    /// The file does not read (damaged, or of a newer layout): never overwritten.
    #[error("{path}: {why}")]
    Store { path: PathBuf, why: String },
}

/// Where a secret chat stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretState {
    /// We started it; the other device has not answered.
    Requested,
    /// The other side started it; accept or decline it here.
    Incoming,
    Active,
    Declined,
    /// Closed by either side: keys and messages wiped.
    Closed,
}

impl std::fmt::Display for SecretState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SecretState::Requested => "waiting for the other side",
            SecretState::Incoming => "waiting for you to accept",
            SecretState::Active => "active",
            SecretState::Declined => "declined",
            SecretState::Closed => "closed",
        })
    }
}

/// One message of a secret chat, as shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretMessage {
    pub id: MessageId,
    pub chat: SecretChatId,
    /// The other person.
    pub peer: UserId,
    pub outgoing: bool,
    /// The caption, for a file.
    pub text: String,
    pub file: Option<Box<FileRef>>,
    pub reply_to: Option<MessageId>,
    pub sent_at_ms: u64,
    pub status: Status,
    /// The self-destruct timer the sender set for it.
    pub ttl_secs: Option<u32>,
    /// When it is destroyed (on both devices): once read, plus the timer.
    pub expires_at_ms: Option<u64>,
}

/// A secret chat as `secret list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretChatInfo {
    pub id: SecretChatId,
    pub peer: UserId,
    pub peer_device: PeerId,
    pub state: SecretState,
    pub started_here: bool,
    pub created_at: u64,
    pub ttl_secs: Option<u32>,
    /// The current session's handshake: 0 for the first, one more per re-key.
    pub generation: Option<u32>,
    /// Re-keys done so far.
    pub rekeys: u32,
    pub rekey_pending: bool,
    /// In the current session: messages this side sent, frames it received, since when.
    pub session_sent: u64,
    pub session_received: u64,
    pub session_started_at: Option<u64>,
    pub fingerprint: Option<Fingerprint>,
    pub messages: usize,
}

/// What travels inside a session frame. Append-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum SecretBody {
    Text {
        id: MessageId,
        text: String,
        reply_to: Option<MessageId>,
        sent_at_ms: u64,
        ttl_secs: Option<u32>,
    },
    File {
        id: MessageId,
        file: FileRef,
        caption: String,
        sent_at_ms: u64,
        ttl_secs: Option<u32>,
    },
    /// The other side read these messages (their timers start).
    Read {
        messages: Vec<MessageId>,
    },
    /// The chat's self-destruct timer changed.
    Ttl {
        secs: Option<u32>,
    },
    /// The other side closed the chat: wipe it.
    Close,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    generation: u32,
    keys: SessionKeys,
    /// Unix seconds.
    established_at: u64,
    next_nonce: u64,
    received: ReplayWindow,
    /// Whether the other side has this session too: the initiator's always; the responder's of
    /// a re-key once a frame in it arrives. Until then the responder keeps sending in the
    /// session before, so no frame of the new one can reach the initiator ahead of the reply
    /// that completes it there.
    confirmed: bool,
}

impl Session {
    fn new(generation: u32, keys: SessionKeys, confirmed: bool) -> Self {
        Session {
            generation,
            keys,
            established_at: crate::crypto::cert::unix_now(),
            next_nonce: 0,
            received: ReplayWindow::default(),
            confirmed,
        }
    }

    fn is_due_for_rekey(&self, now: u64) -> bool {
        self.next_nonce >= REKEY_AFTER_MESSAGES || now.saturating_sub(self.established_at) >= REKEY_AFTER_SECS
    }
}

/// A handshake this device started and waits to complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Pending {
    generation: u32,
    started: Initiation,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Chat {
    id: SecretChatId,
    peer: UserId,
    peer_device: PeerId,
    peer_key: NoiseKey,
    started_here: bool,
    state: SecretState,
    created_at: u64,
    ttl_secs: Option<u32>,
    /// The first handshake's hash: the fingerprint both sides compare.
    first_hash: Option<[u8; 32]>,
    /// The other side's first handshake message, until we accept or decline.
    incoming: Option<Vec<u8>>,
    pending: Option<Pending>,
    current: Option<Session>,
    /// The session before the last re-key, for frames still in flight.
    previous: Option<Session>,
    rekeys: u32,
    messages: Vec<SecretMessage>,
}

impl Chat {
    /// A chat just started here (`Requested`) or by the other side (`Incoming`).
    fn new(id: SecretChatId, peer: UserId, peer_device: PeerId, peer_key: NoiseKey, state: SecretState) -> Self {
        Chat {
            id,
            peer,
            peer_device,
            peer_key,
            started_here: state == SecretState::Requested,
            state,
            created_at: crate::crypto::cert::unix_now(),
            ttl_secs: None,
            first_hash: None,
            incoming: None,
            pending: None,
            current: None,
            previous: None,
            rekeys: 0,
            messages: Vec::new(),
        }
    }

    fn info(&self) -> SecretChatInfo {
        let current = self.current.as_ref();
        SecretChatInfo {
            id: self.id,
            peer: self.peer,
            peer_device: self.peer_device,
            state: self.state,
            started_here: self.started_here,
            created_at: self.created_at,
            ttl_secs: self.ttl_secs,
            generation: current.map(|s| s.generation),
            rekeys: self.rekeys,
            rekey_pending: self.pending.is_some() && current.is_some(),
            session_sent: current.map_or(0, |s| s.next_nonce),
            session_received: current.map_or(0, |s| s.received.received()),
            session_started_at: current.map(|s| s.established_at),
            fingerprint: self.first_hash.as_ref().map(noise::fingerprint),
            messages: self.messages.len(),
        }
    }

    /// Wipes keys, handshakes and messages; the chat stays listed as closed.
    fn wipe(&mut self, state: SecretState) {
        self.state = state;
        self.incoming = None;
        self.pending = None;
        self.current = None;
        self.previous = None;
        self.messages.clear();
    }

    fn context<'a>(&'a self, generation: u32, initiator: &'a [u8], responder: &'a [u8]) -> HandshakeContext<'a> {
        HandshakeContext { chat: &self.id.0, generation, initiator, responder }
    }

    fn require(&self, state: SecretState, wanted: &'static str) -> Result<(), SecretError> {
        if self.state == state {
            Ok(())
        } else {
            Err(SecretError::WrongState { chat: self.id, state: self.state, wanted })
        }
    }
}

/// An envelope sealed and waiting for a relay, with the message it carries (if any).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Outgoing {
    envelope: Envelope,
    message: Option<MessageId>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Store {
    format: u32,
    chats: BTreeMap<SecretChatId, Chat>,
    outbox: Vec<Outgoing>,
}

impl Store {
    /// A chat by its id, a unique part of its id, or (`@name`, `+phone`) the one open chat
    /// with that user (`peer`, looked up by the caller).
    fn find(&self, name: &str, peer: Option<UserId>) -> Result<SecretChatId, SecretError> {
        let matches: Vec<SecretChatId> = match peer {
            Some(peer) => {
                let mut open: Vec<&Chat> = self
                    .chats
                    .values()
                    .filter(|c| c.peer == peer && !matches!(c.state, SecretState::Closed | SecretState::Declined))
                    .collect();
                open.sort_by_key(|c| c.created_at);
                open.last().map(|c| c.id).into_iter().collect()
            }
            None => {
                let wanted = name.to_ascii_lowercase();
                self.chats.keys().filter(|id| id.to_string().contains(&wanted)).copied().collect()
            }
        };
        match matches[..] {
            [id] => Ok(id),
            [] => Err(SecretError::Unknown(name.into())),
            _ => Err(SecretError::Ambiguous(name.into())),
        }
    }

    fn chat(&mut self, id: &SecretChatId) -> Result<&mut Chat, SecretError> {
        self.chats.get_mut(id).ok_or_else(|| SecretError::Unknown(id.to_string()))
    }

    /// Destroys the messages whose time has come; returns how many.
    fn sweep(&mut self, now_ms: u64) -> usize {
        let mut destroyed = 0;
        for chat in self.chats.values_mut() {
            let before = chat.messages.len();
            chat.messages.retain(|m| m.expires_at_ms.is_none_or(|at| at > now_ms));
            destroyed += before - chat.messages.len();
        }
        destroyed
    }

    fn next_expiry(&self) -> Option<u64> {
        self.chats.values().flat_map(|c| c.messages.iter().filter_map(|m| m.expires_at_ms)).min()
    }
}

/// The profile's secret chats, shared by a client node's messengers.
#[derive(Debug, Clone)]
pub struct SecretChats {
    path: PathBuf,
    store: Arc<Mutex<Store>>,
}

impl SecretChats {
    pub fn open(profile: &Path) -> Result<Self, SecretError> {
        let path = profile.join(SECRET_FILE);
        let store = match std::fs::read(&path) {
            Ok(bytes) => {
                let store: Store = postcard::from_bytes(&bytes)
                    .map_err(|e| SecretError::Store { path: path.clone(), why: format!("does not read: {e}") })?;
                if store.format != FORMAT {
                    return Err(SecretError::Store { path, why: format!("format {} is not {FORMAT}", store.format) });
                }
                store
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Store { format: FORMAT, ..Store::default() },
            Err(e) => return Err(SecretError::Store { path, why: e.to_string() }),
        };
        Ok(SecretChats { path, store: Arc::new(Mutex::new(store)) })
    }

    fn read<T>(&self, f: impl FnOnce(&Store) -> T) -> T {
        let store = self.store.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&store)
    }

    /// Changes the store: on a copy, written whole to the file before it replaces the one in
    /// memory, so a failure (disk full) changes nothing. Nothing is written when nothing changed.
    fn update<T>(&self, f: impl FnOnce(&mut Store) -> Result<T, MessagingError>) -> Result<T, MessagingError> {
        let mut store = self.store.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut next = store.clone();
        let out = f(&mut next)?;
        if next != *store {
            let bytes = postcard::to_stdvec(&next).expect("invariant: the store serializes");
            crate::crypto::identity::write_secret(&self.path, &bytes)
                .map_err(|e| SecretError::Store { path: self.path.clone(), why: e.to_string() })?;
            *store = next;
        }
        Ok(out)
    }

    /// When the next message is due to be destroyed (unix ms).
    pub fn next_expiry(&self) -> Option<u64> {
        self.read(Store::next_expiry)
    }

    /// Every key these secret chats hold (sessions' keys, pending handshakes' ephemeral keys):
    /// for audits that they appear nowhere else.
    pub fn key_material(&self) -> Vec<[u8; 32]> {
        self.read(|s| {
            let mut keys = Vec::new();
            for chat in s.chats.values() {
                for session in [&chat.current, &chat.previous].into_iter().flatten() {
                    keys.extend([session.keys.send, session.keys.recv]);
                }
                keys.extend(chat.pending.iter().map(|p| p.started.ephemeral));
            }
            keys
        })
    }

    pub fn outbox_waiting(&self) -> bool {
        self.read(|s| !s.outbox.is_empty())
    }
}

/// What one incoming envelope is to the secret chats.
pub(crate) enum Frame {
    /// Not a frame of any session with its sender: an ordinary envelope.
    NotSecret,
    /// Opened and applied.
    Applied,
    /// A frame opened before: the same envelope again (its id is the frame's associated data,
    /// so a frame moved to another id does not open at all), a relay's redelivery or a replay.
    Duplicate,
    /// Opened, but does not read: dropped.
    Bad(String),
}

fn no_text(text: &str) -> bool {
    text.chars().count() > MAX_TEXT_CHARS
}

impl Messenger {
    fn device_bytes(&self) -> Vec<u8> {
        self.client.identity.peer_id().to_bytes()
    }

    /// An envelope to the chat's peer device with the next send counter, sealed by `seal`.
    fn envelope_for(
        &self,
        chat: &Chat,
        seal: impl FnOnce(&mut Envelope) -> Result<(), MessagingError>,
    ) -> Result<Envelope, MessagingError> {
        let mut envelope = Envelope {
            id: EnvelopeId::random(),
            from_user: self.me(),
            from_device: self.client.identity.peer_id(),
            to_user: chat.peer,
            to_device: chat.peer_device,
            sent_at_ms: now_ms(),
            seq: self.h().reserve_seq(&chat.peer_device, 1)?,
            sealed: Vec::new(),
        };
        seal(&mut envelope)?;
        Ok(envelope)
    }

    /// A handshake message (or decline) inside the ordinary seal, for the peer device alone.
    fn sealed_body(&self, chat: &Chat, body: Body) -> Result<Outgoing, MessagingError> {
        let payload = Payload { message_id: MessageId::random(), chat_with: chat.peer, body };
        let bytes = postcard::to_stdvec(&payload).expect("invariant: payloads serialize");
        let envelope =
            self.envelope_for(chat, |e| Ok(seal::seal_envelope(&self.client.identity, &chat.peer_key, e, &bytes)?))?;
        Ok(Outgoing { envelope, message: None })
    }

    /// A frame of the chat's current session. Starts a re-key when one is due (the frame still
    /// goes in the current session; the next ones do once the handshake completes).
    fn framed(
        &self,
        chat: &mut Chat,
        body: &SecretBody,
        message: Option<MessageId>,
    ) -> Result<Vec<Outgoing>, MessagingError> {
        let mut out = Vec::new();
        let now = crate::crypto::cert::unix_now();
        let session = chat.current.as_ref().ok_or(SecretError::WrongState {
            chat: chat.id,
            state: chat.state,
            wanted: "active",
        })?;
        let rekey =
            chat.pending.is_none() && session.confirmed && session.is_due_for_rekey(now) && *body != SecretBody::Close;
        if let Some(generation) = session.generation.checked_add(1).filter(|_| rekey) {
            let (me, peer) = (self.device_bytes(), chat.peer_device.to_bytes());
            let started =
                noise::initiate(&self.client.identity, &chat.peer_key, &chat.context(generation, &me, &peer))?;
            let handshake = Body::SecretHandshake { chat: chat.id, generation, message: started.message.clone() };
            out.push(self.sealed_body(chat, handshake)?);
            chat.pending = Some(Pending { generation, started });
        }
        let session = match (chat.current.as_mut(), chat.previous.as_mut()) {
            (Some(current), Some(previous)) if !current.confirmed => previous,
            (Some(current), _) => current,
            (None, _) => unreachable!("checked above"),
        };
        let nonce = session.next_nonce;
        session.next_nonce += 1;
        let cipher = SessionCipher::new(&session.keys)?;
        let plain = postcard::to_stdvec(body).expect("invariant: secret bodies serialize");
        let envelope = self.envelope_for(chat, |e| {
            e.sealed = cipher.seal_frame(nonce, e, &plain)?;
            Ok(())
        })?;
        out.push(Outgoing { envelope, message });
        Ok(out)
    }

    /// Resolves a chat name (see [`Store::find`]), looking `@name` / `+phone` up.
    async fn secret_chat_id(&mut self, name: &str) -> Result<SecretChatId, MessagingError> {
        self.history()?;
        let peer = if name.starts_with('@') || name.starts_with('+') {
            let query: LookupQuery = name.parse().map_err(|e: crate::ids::InvalidValue| SecretError::Unknown(e.0))?;
            Some(self.card(query, CARD_FRESH_SECS).await?.user_id)
        } else {
            None
        };
        Ok(self.s().read(|s| s.find(name, peer))?)
    }

    fn secret_info(&self, id: &SecretChatId) -> Result<SecretChatInfo, MessagingError> {
        Ok(self.s().read(|s| s.chats.get(id).map(Chat::info)).ok_or_else(|| SecretError::Unknown(id.to_string()))?)
    }

    /// Starts a secret chat with one of `to`'s devices (`device`: its id or a unique part of
    /// it; by default the one that signed in last). It becomes active when that device accepts.
    pub async fn secret_start(
        &mut self,
        to: LookupQuery,
        device: Option<String>,
    ) -> Result<SecretChatInfo, MessagingError> {
        self.history()?;
        let card = self.card(to, CARD_FRESH_SECS).await?;
        if card.user_id == self.me() {
            return Err(SecretError::WithYourself.into());
        }
        let target = match &device {
            None => card.devices.last(),
            Some(part) => {
                let found: Vec<_> =
                    card.devices.iter().filter(|d| d.peer_id.to_string().contains(part.as_str())).collect();
                match found[..] {
                    [one] => Some(one),
                    [] => return Err(MessagingError::UnknownDevice(format!("{} has no device {part}", card.user_id))),
                    _ => return Err(MessagingError::UnknownDevice(format!("{part} names more than one device"))),
                }
            }
        };
        let target = target.ok_or(MessagingError::NoDevices(card.user_id))?.clone();
        let id = SecretChatId::random();
        let mut chat = Chat::new(id, card.user_id, target.peer_id, target.noise_key(), SecretState::Requested);
        let (me, peer) = (self.device_bytes(), chat.peer_device.to_bytes());
        let started = noise::initiate(&self.client.identity, &chat.peer_key, &chat.context(0, &me, &peer))?;
        let out = self
            .sealed_body(&chat, Body::SecretHandshake { chat: id, generation: 0, message: started.message.clone() })?;
        chat.pending = Some(Pending { generation: 0, started });
        self.s().update(|s| {
            s.chats.insert(id, chat);
            s.outbox.push(out);
            Ok(())
        })?;
        self.flush_secret_outbox_logged().await;
        self.secret_info(&id)
    }

    /// Changes one chat (found by name) with `change`, queues what it returns to send, sends it.
    async fn change_chat(
        &mut self,
        name: &str,
        change: impl FnOnce(&Self, &mut Chat) -> Result<Vec<Outgoing>, MessagingError>,
    ) -> Result<SecretChatInfo, MessagingError> {
        let id = self.secret_chat_id(name).await?;
        self.s().update(|s| {
            let out = change(self, s.chat(&id)?)?;
            s.outbox.extend(out);
            Ok(())
        })?;
        self.flush_secret_outbox_logged().await;
        self.secret_info(&id)
    }

    /// Accepts a secret chat the other side started: answers its handshake.
    pub async fn secret_accept(&mut self, name: &str) -> Result<SecretChatInfo, MessagingError> {
        self.change_chat(name, |me, chat| {
            chat.require(SecretState::Incoming, "waiting for you to accept")?;
            let message = chat.incoming.clone().unwrap_or_default();
            let (mine, peer) = (me.device_bytes(), chat.peer_device.to_bytes());
            let (initiator, reply, keys) =
                noise::respond(&me.client.identity, &chat.context(0, &peer, &mine), &message)?;
            if initiator != chat.peer_key {
                return Err(
                    seal::E2eError::Open("the handshake is not from the device that started the chat".into()).into()
                );
            }
            let out = me.sealed_body(chat, Body::SecretReply { chat: chat.id, generation: 0, message: reply })?;
            chat.first_hash = Some(keys.handshake_hash);
            chat.current = Some(Session::new(0, keys, true));
            chat.incoming = None;
            chat.state = SecretState::Active;
            Ok(vec![out])
        })
        .await
    }

    /// Declines a secret chat the other side started.
    pub async fn secret_decline(&mut self, name: &str) -> Result<SecretChatInfo, MessagingError> {
        self.change_chat(name, |me, chat| {
            chat.require(SecretState::Incoming, "waiting for you to accept")?;
            let out = me.sealed_body(chat, Body::SecretDecline { chat: chat.id })?;
            chat.wipe(SecretState::Declined);
            Ok(vec![out])
        })
        .await
    }

    /// Closes a secret chat: tells the other side, then wipes keys and messages here (the other
    /// side wipes its own when the close arrives).
    pub async fn secret_close(&mut self, name: &str) -> Result<SecretChatInfo, MessagingError> {
        self.change_chat(name, |me, chat| {
            let out = match chat.state {
                SecretState::Active => me.framed(chat, &SecretBody::Close, None)?,
                // Not agreed yet: the other side learns it was withdrawn (or declined).
                SecretState::Incoming | SecretState::Requested => {
                    vec![me.sealed_body(chat, Body::SecretDecline { chat: chat.id })?]
                }
                SecretState::Declined | SecretState::Closed => Vec::new(),
            };
            chat.wipe(SecretState::Closed);
            Ok(out)
        })
        .await
    }

    /// Sets the chat's self-destruct timer (`None`: off) for messages sent from now on, on
    /// both sides.
    pub async fn secret_ttl(&mut self, name: &str, secs: Option<u32>) -> Result<SecretChatInfo, MessagingError> {
        if secs.is_some_and(|s| s == 0 || s > MAX_TTL_SECS) {
            return Err(SecretError::BadTtl.into());
        }
        self.change_chat(name, |me, chat| {
            chat.require(SecretState::Active, "active")?;
            let out = me.framed(chat, &SecretBody::Ttl { secs }, None)?;
            chat.ttl_secs = secs;
            Ok(out)
        })
        .await
    }

    /// Sends texts (or one file with its caption) in a secret chat, in order.
    pub async fn secret_send(
        &mut self,
        name: &str,
        texts: Vec<String>,
        file: Option<FileRef>,
        reply_to: Option<MessageId>,
    ) -> Result<Vec<SecretMessage>, MessagingError> {
        if texts.iter().any(|t| no_text(t) || (t.is_empty() && file.is_none())) || (file.is_some() && texts.len() > 1) {
            return Err(MessagingError::TextTooLong);
        }
        let id = self.secret_chat_id(name).await?;
        let sent = self.s().update(|s| {
            let chat = s.chat(&id)?;
            chat.require(SecretState::Active, "active")?;
            let mut sent = Vec::new();
            let bodies: Vec<(String, Option<FileRef>)> = match file {
                Some(file) => vec![(texts.into_iter().next().unwrap_or_default(), Some(file))],
                None => texts.into_iter().map(|t| (t, None)).collect(),
            };
            let mut out = Vec::new();
            for (text, file) in bodies {
                let (message_id, sent_at_ms, ttl_secs) = (MessageId::random(), now_ms(), chat.ttl_secs);
                let body = match &file {
                    Some(file) => SecretBody::File {
                        id: message_id,
                        file: file.clone(),
                        caption: text.clone(),
                        sent_at_ms,
                        ttl_secs,
                    },
                    None => SecretBody::Text { id: message_id, text: text.clone(), reply_to, sent_at_ms, ttl_secs },
                };
                out.extend(self.framed(chat, &body, Some(message_id))?);
                let message = SecretMessage {
                    id: message_id,
                    chat: id,
                    peer: chat.peer,
                    outgoing: true,
                    text,
                    file: file.map(Box::new),
                    reply_to,
                    sent_at_ms,
                    status: Status::Pending,
                    ttl_secs,
                    expires_at_ms: None,
                };
                chat.messages.push(message.clone());
                sent.push(message);
            }
            s.outbox.extend(out);
            Ok(sent)
        })?;
        let flushed = self.flush_secret_outbox_logged().await;
        let ids: Vec<MessageId> = sent.iter().map(|m| m.id).collect();
        Ok(if flushed { self.secret_messages_by_id(&id, &ids) } else { sent })
    }

    fn secret_messages_by_id(&self, chat: &SecretChatId, ids: &[MessageId]) -> Vec<SecretMessage> {
        self.s().read(|s| {
            s.chats
                .get(chat)
                .map_or_else(Vec::new, |c| c.messages.iter().filter(|m| ids.contains(&m.id)).cloned().collect())
        })
    }

    /// One secret chat by name (see [`Store::find`]).
    pub async fn secret_get(&mut self, name: &str) -> Result<SecretChatInfo, MessagingError> {
        let id = self.secret_chat_id(name).await?;
        self.secret_info(&id)
    }

    /// Every secret chat on this device.
    pub fn secret_list(&mut self) -> Result<Vec<SecretChatInfo>, MessagingError> {
        self.history()?;
        self.secret_sweep()?;
        Ok(self.s().read(|s| s.chats.values().map(Chat::info).collect()))
    }

    /// The secret messages with `peer` (or everyone), oldest first.
    pub fn secret_messages(&mut self, peer: Option<UserId>) -> Result<Vec<SecretMessage>, MessagingError> {
        self.history()?;
        self.secret_sweep()?;
        Ok(self.s().read(|s| {
            let mut all: Vec<SecretMessage> = s
                .chats
                .values()
                .filter(|c| peer.is_none_or(|p| c.peer == p))
                .flat_map(|c| c.messages.iter().cloned())
                .collect();
            all.sort_by_key(|m| m.sent_at_ms);
            all
        }))
    }

    /// The file of a secret message, if it is one (downloads look here after the history).
    pub fn secret_file(&mut self, message: &MessageId) -> Result<Option<FileRef>, MessagingError> {
        self.history()?;
        Ok(self.s().read(|s| {
            s.chats
                .values()
                .flat_map(|c| &c.messages)
                .find(|m| m.id == *message)
                .and_then(|m| m.file.as_deref().cloned())
        }))
    }

    /// Uploads a file for a secret chat: under a fresh key (never one a cloud upload of the same
    /// file used), with no resume record (it would hold the key in the history's database),
    /// and not served to peers afterwards.
    pub async fn upload_secret_file(
        &mut self,
        path: &Path,
        progress: OnProgress<'_>,
    ) -> Result<FileRef, MessagingError> {
        self.upload(path, None, progress, Serve::No, Resume::No).await
    }

    /// Whether `message` is a secret one (which is never forwarded).
    pub fn is_secret_message(&mut self, message: &MessageId) -> Result<bool, MessagingError> {
        self.history()?;
        Ok(self.s().read(|s| s.chats.values().any(|c| c.messages.iter().any(|m| m.id == *message))))
    }

    /// Marks the secret messages from `peer` read: their timers start here, and the sender is
    /// told so that theirs start too.
    pub async fn secret_read(&mut self, peer: UserId) -> Result<usize, MessagingError> {
        self.history()?;
        let read = self.s().update(|s| {
            let mut read = 0;
            let mut out = Vec::new();
            for chat in s.chats.values_mut().filter(|c| c.peer == peer && c.state == SecretState::Active) {
                let now = now_ms();
                let mut ids = Vec::new();
                for m in chat.messages.iter_mut().filter(|m| !m.outgoing && m.status < Status::Read) {
                    m.status = Status::Read;
                    m.expires_at_ms = m.ttl_secs.map(|t| now + u64::from(t) * 1000);
                    ids.push(m.id);
                }
                if !ids.is_empty() {
                    read += ids.len();
                    out.extend(self.framed(chat, &SecretBody::Read { messages: ids }, None)?);
                }
            }
            s.outbox.extend(out);
            Ok(read)
        })?;
        if read > 0 {
            self.flush_secret_outbox_logged().await;
        }
        Ok(read)
    }

    /// Destroys the messages whose timers ran out; returns how many.
    pub fn secret_sweep(&mut self) -> Result<usize, MessagingError> {
        self.history()?;
        let now = now_ms();
        if self.s().next_expiry().is_none_or(|at| at > now) {
            return Ok(0);
        }
        self.s().update(|s| Ok(s.sweep(now)))
    }

    /// Sends what the secret chats' outbox holds, in order; returns whether it is empty now. A
    /// relay refusing an envelope for good (too large, say) drops it; the rest waits.
    pub async fn flush_secret_outbox(&mut self) -> Result<bool, MessagingError> {
        self.history()?;
        let waiting = self.s().read(|s| s.outbox.clone());
        // In order, one device's run at a time (a batch goes to relays chosen by its recipient).
        let mut runs: Vec<&[Outgoing]> = Vec::new();
        let mut rest = &waiting[..];
        while let Some(first) = rest.first() {
            let run = rest.iter().take_while(|o| o.envelope.to_device == first.envelope.to_device).count();
            let (head, tail) = rest.split_at(run.min(MAX_ENVELOPES_PER_BATCH));
            runs.push(head);
            rest = tail;
        }
        for batch in runs {
            let outcome = self.send_batch(batch.iter().map(|o| o.envelope.clone()).collect()).await;
            let sent = match outcome {
                Ok(()) => true,
                Err(e) if e.may_pass() => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "a relay refused secret-chat envelopes for good; dropping them");
                    false
                }
            };
            let done: Vec<EnvelopeId> = batch.iter().map(|o| o.envelope.id).collect();
            self.s().update(|s| {
                for o in s.outbox.iter().filter(|o| sent && done.contains(&o.envelope.id)) {
                    let Some(id) = o.message else { continue };
                    for m in s.chats.values_mut().flat_map(|c| c.messages.iter_mut()).filter(|m| m.id == id) {
                        m.status = m.status.max(Status::Sent);
                    }
                }
                s.outbox.retain(|o| !done.contains(&o.envelope.id));
                Ok(())
            })?;
        }
        Ok(true)
    }

    /// [`Messenger::flush_secret_outbox`] where a failure that may pass is only logged (the node
    /// retries).
    async fn flush_secret_outbox_logged(&mut self) -> bool {
        match self.flush_secret_outbox().await {
            Ok(done) => done,
            Err(e) => {
                tracing::info!(error = %e, "secret-chat envelopes wait in the outbox");
                false
            }
        }
    }

    /// Tries an incoming envelope as a session frame (see [`Frame`]).
    pub(crate) fn secret_frame(&self, envelope: &Envelope, inbox: &mut Inbox) -> Result<Frame, MessagingError> {
        let candidates = self.s().read(|s| {
            s.chats
                .values()
                .filter(|c| c.peer_device == envelope.from_device && c.peer == envelope.from_user)
                .map(|c| (c.id, [c.current.clone(), c.previous.clone()]))
                .collect::<Vec<_>>()
        });
        for (id, sessions) in candidates {
            for session in sessions.iter().flatten() {
                let Ok((nonce, plain)) = SessionCipher::new(&session.keys)?.open_frame(envelope) else {
                    continue;
                };
                let generation = session.generation;
                let body: Result<SecretBody, _> = postcard::from_bytes(&plain);
                // Checked again under the lock: another fetcher, or a close, may have come first.
                return self.s().update(|s| {
                    let chat = s.chat(&id)?;
                    let closed = chat.state != SecretState::Active;
                    let session = [chat.current.as_mut(), chat.previous.as_mut()]
                        .into_iter()
                        .flatten()
                        .find(|s| s.generation == generation);
                    let Some(session) = session else {
                        return Ok(Frame::Duplicate); // wiped or long re-keyed meanwhile
                    };
                    if closed || !session.received.is_fresh(nonce) {
                        return Ok(Frame::Duplicate);
                    }
                    session.received.mark(nonce);
                    session.confirmed = true;
                    let Ok(body) = body else {
                        return Ok(Frame::Bad(format!("a frame of secret chat {id} that does not read")));
                    };
                    apply_secret_body(chat, body, envelope, inbox);
                    Ok(Frame::Applied)
                });
            }
        }
        Ok(Frame::NotSecret)
    }
}

/// What one frame of a session changes in its chat.
fn apply_secret_body(chat: &mut Chat, body: SecretBody, envelope: &Envelope, inbox: &mut Inbox) {
    let incoming = |id: MessageId, text: String, file: Option<FileRef>, reply_to, sent_at_ms, ttl_secs: Option<u32>| {
        SecretMessage {
            id,
            chat: chat.id,
            peer: chat.peer,
            outgoing: false,
            text,
            file: file.map(Box::new),
            reply_to,
            sent_at_ms,
            status: Status::Sent,
            ttl_secs: ttl_secs.map(|t| t.clamp(1, MAX_TTL_SECS)),
            expires_at_ms: None,
        }
    };
    let message = match body {
        SecretBody::Text { id, text, reply_to, sent_at_ms, ttl_secs } if !no_text(&text) => {
            Some(incoming(id, text, None, reply_to, sent_at_ms, ttl_secs))
        }
        SecretBody::File { id, file, caption, sent_at_ms, ttl_secs } if file.check().is_ok() && !no_text(&caption) => {
            Some(incoming(id, caption, Some(file), None, sent_at_ms, ttl_secs))
        }
        SecretBody::Text { .. } | SecretBody::File { .. } => {
            tracing::warn!(envelope = %envelope.id, chat = %chat.id, "dropping a secret message that does not hold together");
            None
        }
        SecretBody::Read { messages } => {
            let now = now_ms();
            for m in chat.messages.iter_mut().filter(|m| m.outgoing && messages.contains(&m.id)) {
                if m.status < Status::Read {
                    m.status = Status::Read;
                    m.expires_at_ms = m.ttl_secs.map(|t| now + u64::from(t) * 1000);
                    inbox.secret_messages.push(m.clone());
                }
            }
            None
        }
        SecretBody::Ttl { secs } => {
            chat.ttl_secs = secs.map(|t| t.clamp(1, MAX_TTL_SECS));
            inbox.secret_chats.push(chat.info());
            None
        }
        SecretBody::Close => {
            chat.wipe(SecretState::Closed);
            inbox.secret_chats.push(chat.info());
            None
        }
    };
    if let Some(message) = message
        && !chat.messages.iter().any(|m| m.id == message.id)
    {
        chat.messages.push(message.clone());
        inbox.secret_messages.push(message);
    }
}

impl Messenger {
    /// Applies a handshake, reply or decline that came inside the ordinary seal from
    /// `sender_key` (already checked against the sender's card). Returns whether the envelope
    /// did something; the caller marks it seen either way.
    pub(crate) fn apply_secret_handshake(
        &self,
        envelope: &Envelope,
        sender_key: &NoiseKey,
        body: Body,
        inbox: &mut Inbox,
    ) -> Result<(), MessagingError> {
        let (me, peer) = (self.device_bytes(), envelope.from_device.to_bytes());
        let ours = |c: &Chat| c.peer == envelope.from_user && c.peer_device == envelope.from_device;
        self.s().update(|s| {
            match body {
                Body::SecretHandshake { chat: id, generation, message } => match s.chats.get_mut(&id) {
                    None if generation == 0 => {
                        let ctx = HandshakeContext { chat: &id.0, generation, initiator: &peer, responder: &me };
                        if noise::read_initiation(&self.client.identity, &ctx, &message)? != *sender_key {
                            return Err(seal::E2eError::Open("the handshake's key is not its sender's".into()).into());
                        }
                        let mut chat = Chat::new(
                            id,
                            envelope.from_user,
                            envelope.from_device,
                            *sender_key,
                            SecretState::Incoming,
                        );
                        chat.incoming = Some(message);
                        inbox.secret_chats.push(chat.info());
                        s.chats.insert(id, chat);
                    }
                    Some(chat) if ours(chat) && chat.state == SecretState::Active => {
                        let current = chat.current.as_ref().map_or(0, |c| c.generation);
                        let theirs_wins = match &chat.pending {
                            // Both sides started the same re-key: the lower device id's goes on.
                            Some(p) if p.generation == generation => peer < me,
                            _ => true,
                        };
                        // One re-key at a time, each the next generation: a peer cannot skip ahead.
                        if current.checked_add(1) != Some(generation) || !theirs_wins {
                            return Ok(());
                        }
                        let ctx = chat.context(generation, &peer, &me);
                        let (initiator, reply, keys) = noise::respond(&self.client.identity, &ctx, &message)?;
                        if initiator != chat.peer_key {
                            return Err(seal::E2eError::Open("a re-key from another key".into()).into());
                        }
                        let out = self.sealed_body(chat, Body::SecretReply { chat: id, generation, message: reply })?;
                        chat.pending = None;
                        chat.previous = chat.current.replace(Session::new(generation, keys, false));
                        chat.rekeys += 1;
                        inbox.secret_chats.push(chat.info());
                        s.outbox.push(out);
                    }
                    // Started again before we answered: the newer handshake is the one to answer.
                    Some(chat) if ours(chat) && chat.state == SecretState::Incoming && generation == 0 => {
                        let ctx = HandshakeContext { chat: &id.0, generation, initiator: &peer, responder: &me };
                        if noise::read_initiation(&self.client.identity, &ctx, &message)? != *sender_key {
                            return Err(seal::E2eError::Open("the handshake's key is not its sender's".into()).into());
                        }
                        chat.incoming = Some(message);
                    }
                    _ => tracing::info!(envelope = %envelope.id, chat = %id, "ignoring a handshake for no chat of ours in that state"),
                },
                Body::SecretReply { chat: id, generation, message } => {
                    let Some(chat) = s.chats.get_mut(&id).filter(|c| ours(c)) else { return Ok(()) };
                    let Some(pending) = chat.pending.clone().filter(|p| p.generation == generation) else { return Ok(()) };
                    let ctx = chat.context(generation, &me, &peer);
                    let keys = noise::complete(&self.client.identity, &chat.peer_key, &ctx, &pending.started, &message)?;
                    chat.pending = None;
                    if generation == 0 {
                        chat.first_hash = Some(keys.handshake_hash);
                        chat.state = SecretState::Active;
                        chat.current = Some(Session::new(0, keys, true));
                    } else {
                        chat.previous = chat.current.replace(Session::new(generation, keys, true));
                        chat.rekeys += 1;
                    }
                    inbox.secret_chats.push(chat.info());
                }
                // Declined, or closed before it was accepted (then it may be open here).
                Body::SecretDecline { chat: id } => match s.chats.get_mut(&id).filter(|c| ours(c)) {
                    Some(chat) if chat.state == SecretState::Requested => {
                        chat.wipe(SecretState::Declined);
                        inbox.secret_chats.push(chat.info());
                    }
                    Some(chat) if matches!(chat.state, SecretState::Incoming | SecretState::Active) => {
                        chat.wipe(SecretState::Closed);
                        inbox.secret_chats.push(chat.info());
                    }
                    _ => {}
                },
                _ => {}
            }
            Ok(())
        })
    }
}
