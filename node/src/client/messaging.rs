//! Cloud chats from a client's side: seal a message once per recipient device (and per own
//! other device, for sync), send it through any relay, fetch the own mailbox from every relay
//! that holds a copy, open and verify each envelope, record it exactly once, acknowledge it.

use std::collections::{HashMap, HashSet};

use libp2p::PeerId;

use crate::client::groups::{GroupError, GroupInfo, Groups};
use crate::client::history::{
    DeviceRequest, History, HistoryError, ParkedChange, PendingImport, Press, StoredMessage, change_of, mark_deleted,
};
use crate::client::secret::{Frame, SecretChatInfo, SecretChats, SecretError, SecretMessage};
use crate::client::session::{Client, ClientError, SavedSession};
use crate::crypto::cert::unix_now;
use crate::crypto::seal::{self, E2eError};
use crate::defaults::{
    CARD_FRESH_SECS, CARD_TRUST_SECS, CERT_RENEW_BEFORE_SECS, RELAY_ANSWER_DEADLINE, SEND_DEADLINE,
    UNRESPONSIVE_RELAY_LAST_FOR,
};
use crate::ids::{NoiseKey, UserId, now_ms};
use crate::net::placement;
use crate::proto::envelope::{Envelope, EnvelopeId};
use crate::proto::media::FileRef;
use crate::proto::payload::{Body, MAX_TEXT_CHARS, MessageId, Payload, Status};
use crate::proto::rich::{CallbackId, Extras};
use crate::proto::{
    ErrorCode, LookupQuery, MAX_ENVELOPES_PER_BATCH, MailboxRequest, MailboxResponse, RelayInfo, UserCard, WireError,
};

/// What a fetch brought: new or changed messages, and who is typing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inbox {
    pub messages: Vec<StoredMessage>,
    pub typing: Vec<UserId>,
    /// Envelopes that could not be verified yet (say, the gateway is away): left on the relays,
    /// unacknowledged, to be tried again. A receiving loop backs off while there are some, since
    /// the relays hand them straight back.
    pub deferred: usize,
    /// Own devices that asked for the history since the last fetch (approve them to send it).
    pub device_requests: Vec<crate::client::history::DeviceRequest>,
    /// Histories sent to this device that wait to be imported.
    pub imports: usize,
    /// Secret messages new or changed (read by the other side) since the last fetch.
    pub secret_messages: Vec<SecretMessage>,
    /// Secret chats that changed: started by someone, accepted, re-keyed, closed.
    pub secret_chats: Vec<SecretChatInfo>,
    /// Groups whose state changed (or that are new here).
    pub groups: Vec<GroupInfo>,
    /// Presses of our buttons (a bot's), and answers to our presses.
    pub presses: Vec<Press>,
    pub press_answers: Vec<Press>,
}

/// A new message as its author writes it: a text, or a file with its caption (then `text`
/// may be empty); with formatting or a keyboard (`extras`), as bots send them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draft {
    pub text: String,
    pub file: Option<FileRef>,
    pub extras: Option<Extras>,
}

impl Draft {
    /// A plain text message.
    pub fn text(text: String) -> Self {
        Draft { text, file: None, extras: None }
    }

    fn check(&self) -> Result<(), MessagingError> {
        let chars = self.text.chars().count();
        match &self.file {
            Some(_) if chars > MAX_CAPTION_CHARS => return Err(MessagingError::CaptionTooLong),
            None if self.text.is_empty() || chars > MAX_TEXT_CHARS => return Err(MessagingError::TextTooLong),
            _ => {}
        }
        match &self.extras {
            Some(extras) => extras.check().map_err(MessagingError::BadExtras),
            None => Ok(()),
        }
    }

    /// The message as this device records it (pending), and the payload that carries it.
    pub(crate) fn into_message(
        self,
        chat: UserId,
        me: UserId,
        sent_at_ms: u64,
        reply_to: Option<MessageId>,
    ) -> (StoredMessage, Payload) {
        let message_id = MessageId::random();
        let Draft { text, file, extras } = self;
        let extras = extras.filter(|e| !e.is_empty());
        let body = match (&file, &extras) {
            (file, Some(extras)) => Body::Rich {
                text: text.clone(),
                reply_to,
                file: file.clone().map(Box::new),
                extras: Box::new(extras.clone()),
            },
            (Some(file), None) => {
                Body::File { file: file.clone(), caption: (!text.is_empty()).then(|| text.clone()), reply_to }
            }
            (None, None) => Body::Text { text: text.clone(), reply_to },
        };
        let record = StoredMessage {
            id: message_id,
            chat,
            from: me,
            outgoing: true,
            text,
            reply_to,
            sent_at_ms,
            status: Status::Pending,
            edited: false,
            deleted: false,
            file: file.map(Box::new),
            notice: false,
            extras: extras.map(Box::new),
        };
        (record, Payload { message_id, chat_with: chat, body })
    }
}

impl Inbox {
    pub(crate) fn absorb(&mut self, other: Inbox) {
        self.messages.extend(other.messages);
        self.typing.extend(other.typing);
        self.deferred += other.deferred;
        self.device_requests.extend(other.device_requests);
        self.imports += other.imports;
        self.secret_messages.extend(other.secret_messages);
        self.secret_chats.extend(other.secret_chats);
        self.groups.extend(other.groups);
        self.presses.extend(other.presses);
        self.press_answers.extend(other.press_answers);
    }
}

/// A notice's id, the same on every device of ours for the same change (so a history merge
/// keeps one): a hash of the user and the device set it announces.
fn notice_id(card: &UserCard) -> MessageId {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&card.user_id.0.to_le_bytes());
    for device in &card.devices {
        hasher.update(&device.peer_id.to_bytes()).update(&device.keys.noise_key.0);
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    MessageId(id)
}

/// What a contact's chat says when their devices changed, if they did.
fn devices_changed_notice(before: &UserCard, now: &UserCard, name: String) -> Option<String> {
    let fingerprints = |card: &UserCard, other: &UserCard| -> Vec<String> {
        card.devices.iter().filter(|d| !other.devices.contains(d)).map(|d| d.keys.fingerprint()).collect()
    };
    let (added, removed) = (fingerprints(now, before), fingerprints(before, now));
    if added.is_empty() && removed.is_empty() {
        return None;
    }
    let mut parts = Vec::new();
    if !added.is_empty() {
        parts.push(format!("added {}", added.join(", ")));
    }
    if !removed.is_empty() {
        parts.push(format!("removed {}", removed.join(", ")));
    }
    Some(format!(
        "{name}'s devices changed: {}. If you did not expect this, check with them another way.",
        parts.join("; ")
    ))
}

/// How long a `Welcome`'s mailbox relays are used before a receiving device asks again.
const MAILBOX_RELAYS_FRESH_FOR: std::time::Duration = std::time::Duration::from_secs(30);
/// Longest caption of a file, in characters (Telegram's limit).
pub const MAX_CAPTION_CHARS: usize = 1024;
/// Message ids per receipt: 16 bytes each keeps a receipt far below the envelope limit.
const MAX_IDS_PER_RECEIPT: usize = 2_000;
/// A typing notice older than this is stale by the time it is read, and is dropped.
const TYPING_FRESH_MS: u64 = 10_000;

/// Messaging failures.
#[derive(Debug, thiserror::Error)]
pub enum MessagingError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Net(#[from] crate::client::net::NetError),
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error(transparent)]
    Seal(#[from] E2eError),
    /// No relay could take or give the messages.
    #[error("no relay could be used: {0}")]
    NoRelay(String),
    #[error("{0}")]
    Refused(WireError),
    #[error("a message must be 1-{MAX_TEXT_CHARS} characters")]
    TextTooLong,
    /// A local file could not be read or written, or is not one that can be sent.
    #[error("{0}")]
    File(String),
    #[error("message {0} has no file")]
    NoFile(MessageId),
    /// No holder had a good copy of a chunk (for now: the holders may come back).
    #[error("{0}")]
    ChunkUnavailable(String),
    /// A file's reference or manifest does not hold together: the sender's mistake or forgery.
    #[error("the file cannot be read: {0}")]
    BadFile(String),
    #[error(transparent)]
    MediaCrypto(#[from] crate::crypto::media::MediaCryptoError),
    #[error("a caption must be at most {MAX_CAPTION_CHARS} characters")]
    CaptionTooLong,
    #[error("{0} has no signed-in devices to send to")]
    NoDevices(UserId),
    #[error("no message {0} on this device")]
    UnknownMessage(MessageId),
    #[error("message {0} is not yours to change")]
    NotYours(MessageId),
    #[error("{0}")]
    UnknownDevice(String),
    #[error(transparent)]
    BackupKey(#[from] crate::crypto::backup::BackupKeyError),
    /// A backup or history export that does not read: damaged, or not this account's.
    #[error("{0}")]
    BadBackup(String),
    #[error("{0}")]
    NoBackup(String),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Group(#[from] GroupError),
    /// A message's formatting or keyboard is out of bounds.
    #[error("{0}")]
    BadExtras(String),
    #[error("message {message} has no button {button:?}")]
    NoButton { message: MessageId, button: String },
    /// A button press this device does not have (answered already, or too old).
    #[error("query {0} is too old, or was answered already")]
    NoCallback(CallbackId),
    /// A push subscription that cannot be used (its URL or keys).
    #[error("{0}")]
    BadPush(String),
}

impl MessagingError {
    /// Whether the failure may pass (a peer or the gateway unreachable or busy, our own history
    /// busy, our session in trouble): retry later, never turn it into a verdict. Only a bad seal,
    /// a key not on the sender's card, a malformed payload or a sender the directory does not
    /// know are definitive.
    pub fn is_transient(&self) -> bool {
        match self {
            MessagingError::Seal(_) => false,
            MessagingError::Client(ClientError::Gateway(e)) | MessagingError::Refused(e) => {
                e.code != ErrorCode::NotFound
            }
            MessagingError::Client(ClientError::BadCert(_) | ClientError::UnexpectedResponse(_)) => false,
            MessagingError::TextTooLong
            | MessagingError::CaptionTooLong
            | MessagingError::File(_)
            | MessagingError::NoFile(_)
            | MessagingError::BadFile(_)
            | MessagingError::MediaCrypto(_)
            | MessagingError::NoDevices(_)
            | MessagingError::UnknownMessage(_)
            | MessagingError::NotYours(_)
            | MessagingError::UnknownDevice(_)
            | MessagingError::BackupKey(_)
            | MessagingError::BadBackup(_)
            | MessagingError::NoBackup(_)
            | MessagingError::Group(_)
            | MessagingError::BadExtras(_)
            | MessagingError::BadPush(_)
            | MessagingError::NoButton { .. }
            | MessagingError::NoCallback(_) => false,
            // The secret chats' file could not be written (disk full): it may pass.
            MessagingError::Secret(e) => matches!(e, SecretError::Store { .. }),
            MessagingError::Client(_)
            | MessagingError::Net(_)
            | MessagingError::History(_)
            | MessagingError::NoRelay(_)
            | MessagingError::ChunkUnavailable(_) => true,
        }
    }
}

impl MessagingError {
    /// Whether a send that failed so may go through later (then it waits in the outbox): no
    /// relay or gateway reachable, relays busy or full for now. A refusal of the message itself
    /// (too large, malformed, no such user) is final.
    pub fn may_pass(&self) -> bool {
        match self {
            MessagingError::Refused(e) => {
                matches!(
                    e.code,
                    ErrorCode::Unavailable | ErrorCode::FloodWait | ErrorCode::QuotaExceeded | ErrorCode::Internal
                )
            }
            MessagingError::Client(e) => e.is_transient(),
            MessagingError::Net(_) | MessagingError::NoRelay(_) | MessagingError::History(_) => true,
            MessagingError::Secret(e) => matches!(e, SecretError::Store { .. }),
            _ => false,
        }
    }
}

/// A signed-in device that sends and receives.
#[derive(Debug)]
pub struct Messenger {
    pub client: Client,
    pub session: SavedSession,
    /// Opened on first use.
    history: Option<History>,
    /// Opened with the history.
    secrets: Option<SecretChats>,
    /// Opened with the history (its tables are in it).
    groups: Option<Groups>,
    /// Told when this account's set of groups (or their keys) changes, so that a client
    /// node's group reader reads the new set at once, not after its long-poll.
    pub(crate) groups_changed: std::sync::Arc<tokio::sync::Notify>,
    /// Relays that accepted our Hello on the current connection.
    greeted: HashSet<PeerId>,
    /// From the last Welcome: the relays holding our mailbox, and when it came.
    pub(crate) mailbox_relays: Vec<RelayInfo>,
    mailbox_relays_at: Option<std::time::Instant>,
    /// Envelopes fetched and recorded in the history but not yet acknowledged, per relay: the
    /// next `Fetch` there carries them ([`Messenger::flush_acks`] sends them on their own).
    unacked: HashMap<PeerId, Vec<EnvelopeId>>,
    /// Relays that failed to answer lately, and until when they are asked last (and, when
    /// receiving, skipped if another holder of the mailbox answers).
    unresponsive: HashMap<PeerId, std::time::Instant>,
    /// Whether this messenger writes `session.json` when it learns relays (a client node's
    /// messengers leave that to the node, which owns the session).
    saves_session: bool,
    /// This device's push endpoint (`push.json`), given to each mailbox relay it greets.
    pub(crate) push: Option<crate::proto::mailbox::PushEndpoint>,
    /// The groups each relay was told to wake this device for (`PushGroups`): those it reads
    /// there.
    pub(crate) push_groups_told: crate::client::push::PushGroupsTold,
}

impl Messenger {
    /// Opens a signed-in profile, renewing its certificate first if `renew` and it is due. The
    /// history is opened when first needed, so calls that only talk to the gateway never touch it.
    pub async fn open(profile: &std::path::Path, renew: bool) -> Result<Self, MessagingError> {
        let (client, session) = Client::open_signed_in(profile)?;
        if !renew {
            return Ok(Messenger::new(client, session));
        }
        let session = match client.renew_if_due(session.clone(), CERT_RENEW_BEFORE_SECS).await {
            Ok(renewed) => renewed,
            // The relays take the current certificate while it lasts; a renewal can wait.
            Err(e) if e.is_transient() && session.cert.body.not_after > unix_now() => {
                tracing::warn!(error = %e, "could not renew the session certificate now; using the current one");
                session
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Messenger::new(client, session))
    }

    fn new(client: Client, session: SavedSession) -> Self {
        // A subscription that no longer reads is reported by `push status`; the device is only
        // not woken meanwhile.
        let push = match crate::client::push::PushSubscription::load(client.profile()) {
            Ok(subscription) => subscription.and_then(|s| s.to_endpoint().ok()),
            Err(e) => {
                tracing::warn!(error = %e, "the push subscription does not read; not registering it");
                None
            }
        };
        let push_groups_told = crate::client::push::load_groups_told(client.profile());
        Messenger {
            client,
            session,
            history: None,
            secrets: None,
            groups: None,
            groups_changed: Default::default(),
            greeted: HashSet::new(),
            mailbox_relays: Vec::new(),
            mailbox_relays_at: None,
            unacked: HashMap::new(),
            unresponsive: HashMap::new(),
            saves_session: true,
            push_groups_told,
            push,
        }
    }

    /// Takes a changed session (a renewed certificate, say): relays are greeted with it anew.
    pub fn set_session(&mut self, session: SavedSession) {
        self.session = session;
        self.greeted.clear();
    }

    /// Leaves writing `session.json` to the caller, which owns the session.
    pub fn leave_session_saving_to_caller(&mut self) {
        self.saves_session = false;
    }

    /// A second messenger on the same network task and history, with its own relay state: a
    /// client node receives on one while it sends on the other.
    pub fn fork(&mut self) -> Result<Messenger, MessagingError> {
        let history = self.history()?.clone();
        Ok(Messenger {
            client: self.client.clone(),
            session: self.session.clone(),
            history: Some(history),
            secrets: self.secrets.clone(),
            groups: self.groups.clone(),
            groups_changed: std::sync::Arc::clone(&self.groups_changed),
            greeted: HashSet::new(),
            mailbox_relays: self.mailbox_relays.clone(),
            mailbox_relays_at: self.mailbox_relays_at,
            unacked: HashMap::new(),
            unresponsive: HashMap::new(),
            saves_session: self.saves_session,
            push: self.push.clone(),
            push_groups_told: self.push_groups_told.clone(),
        })
    }

    /// The profile's history, opening it on first use.
    pub fn history(&mut self) -> Result<&History, MessagingError> {
        if self.history.is_none() {
            self.history = Some(History::open(self.client.profile())?);
        }
        if self.secrets.is_none() {
            self.secrets = Some(SecretChats::open(self.client.profile())?);
        }
        if self.groups.is_none() {
            self.groups = Some(Groups::open(self.h())?);
        }
        Ok(self.h())
    }

    /// The open history. Every public operation opens it (`history()`) before work that
    /// needs it, so internal code can rely on it.
    pub(crate) fn h(&self) -> &History {
        self.history.as_ref().expect("invariant: public operations open the history before using it")
    }

    /// The open groups (opened with the history, as `h`).
    pub(crate) fn g(&self) -> &Groups {
        self.groups.as_ref().expect("invariant: public operations open the history before using it")
    }

    /// The open secret chats (opened with the history, as `h`).
    pub(crate) fn s(&self) -> &SecretChats {
        self.secrets.as_ref().expect("invariant: public operations open the history before using it")
    }

    pub(crate) fn me(&self) -> UserId {
        self.session.cert.body.user_id
    }

    /// A user's card: the cached one whatever its age, else the gateway's.
    pub async fn user_card(&mut self, query: LookupQuery) -> Result<UserCard, MessagingError> {
        self.history()?;
        self.card(query, u64::MAX).await
    }

    /// A card from the cache if it is at most `max_age_secs` old, else from the gateway (and
    /// cached). When the gateway cannot be reached, a cached card of any age does: messaging
    /// known contacts needs only the relays.
    pub(crate) async fn card(&self, query: LookupQuery, max_age_secs: u64) -> Result<UserCard, MessagingError> {
        let cached = self.h().cached_card(&query)?;
        if let Some((card, fetched)) = &cached
            && unix_now().saturating_sub(*fetched) <= max_age_secs
        {
            return Ok(card.clone());
        }
        match self.lookup(query).await {
            Err(e) if e.is_transient() => match cached {
                Some((card, _)) => {
                    tracing::debug!(user = %card.user_id, error = %e, "the gateway is away; using the cached card");
                    Ok(card)
                }
                None => Err(e),
            },
            fresh => fresh,
        }
    }

    /// A card from the gateway, cached. When a contact's devices changed since the cached
    /// card, their chat gets a notice (as Signal's "safety number changed"): a device the user
    /// did not expect is someone else reading along.
    pub(crate) async fn lookup(&self, query: LookupQuery) -> Result<UserCard, MessagingError> {
        let card = self.client.lookup(query.clone()).await?;
        let before = self.h().card(card.user_id)?;
        self.h().put_card(&card, &query, unix_now())?;
        if let Some(before) = before
            && card.user_id != self.me()
            && self.h().has_chat(card.user_id)?
            && let Some(text) = devices_changed_notice(
                &before,
                &card,
                crate::client::node::display_name(&card, self.h().known_phone(card.user_id)?),
            )
        {
            let notice = StoredMessage::notice(notice_id(&card), card.user_id, card.user_id, text);
            self.h().record(vec![(None, notice)])?;
        }
        Ok(card)
    }

    // ---- relays ----

    /// One request to a relay (greeting it first if need be), given up after `deadline`: a
    /// relay that is stopped or swamped must cost a bounded wait, then the next relay.
    pub(crate) async fn relay_call(
        &mut self,
        relay: &RelayInfo,
        request: MailboxRequest,
        deadline: std::time::Duration,
    ) -> Result<MailboxResponse, MessagingError> {
        let answer = match tokio::time::timeout(deadline, self.relay_call_unbounded(relay, request)).await {
            Ok(answer) => answer,
            Err(_) => {
                // Whatever state that connection is in, greet afresh next time.
                self.greeted.remove(&relay.peer_id);
                let reason = format!("no answer within {} s", deadline.as_secs_f32());
                Err(crate::client::net::NetError::RequestFailed { peer: relay.peer_id, reason }.into())
            }
        };
        match &answer {
            Err(MessagingError::Net(_)) => {
                self.unresponsive.insert(relay.peer_id, std::time::Instant::now() + UNRESPONSIVE_RELAY_LAST_FOR);
            }
            _ => {
                self.unresponsive.remove(&relay.peer_id);
            }
        }
        answer
    }

    pub(crate) fn is_unresponsive(&self, relay: &PeerId) -> bool {
        self.unresponsive.get(relay).is_some_and(|until| *until > std::time::Instant::now())
    }

    /// `relays` in their order, those that failed to answer lately moved to the end.
    pub(crate) fn answering_first(&self, mut relays: Vec<RelayInfo>) -> Vec<RelayInfo> {
        relays.sort_by_key(|r| self.is_unresponsive(&r.peer_id));
        relays
    }

    async fn relay_call_unbounded(
        &mut self,
        relay: &RelayInfo,
        request: MailboxRequest,
    ) -> Result<MailboxResponse, MessagingError> {
        self.greet(relay).await?;
        match self.client.mailbox_request(relay, request).await {
            Ok(MailboxResponse::Error(e)) if e.code == ErrorCode::CertInvalid => {
                // The relay forgot us (restart, expiry): greet again once.
                self.greeted.remove(&relay.peer_id);
                Err(MessagingError::Refused(e))
            }
            Ok(response) => Ok(response),
            Err(e) => {
                self.greeted.remove(&relay.peer_id);
                Err(e.into())
            }
        }
    }

    /// Whatever state the connection to `relay` is in, greet it afresh next time.
    pub(crate) fn forget_greeting(&mut self, relay: &PeerId) {
        self.greeted.remove(relay);
    }

    /// `relay` failed to answer: asked last for a while.
    pub(crate) fn note_unresponsive(&mut self, relay: &PeerId) {
        self.greeted.remove(relay);
        self.unresponsive.insert(*relay, std::time::Instant::now() + UNRESPONSIVE_RELAY_LAST_FOR);
    }

    /// Says Hello to `relay` on this connection unless done already.
    pub(crate) async fn greet(&mut self, relay: &RelayInfo) -> Result<(), MessagingError> {
        if !self.greeted.contains(&relay.peer_id) {
            let hello = MailboxRequest::Hello { cert: self.session.cert.clone() };
            // A greeting waits for nothing: a relay that does not answer it soon is not there.
            let greeting = tokio::time::timeout(RELAY_ANSWER_DEADLINE, self.client.mailbox_request(relay, hello)).await;
            let Ok(welcome) = greeting else {
                let reason = format!("no answer to Hello within {} s", RELAY_ANSWER_DEADLINE.as_secs());
                return Err(crate::client::net::NetError::RequestFailed { peer: relay.peer_id, reason }.into());
            };
            match welcome? {
                MailboxResponse::Welcome { mailbox_relays, relays, .. } => {
                    self.greeted.insert(relay.peer_id);
                    self.mailbox_relays = mailbox_relays;
                    self.mailbox_relays_at = Some(std::time::Instant::now());
                    let relays = merge_known_relays(relays, &self.session.relays);
                    if relays != self.session.relays {
                        self.session.relays = relays;
                        if self.saves_session {
                            self.session.save(self.client.profile())?;
                        }
                    }
                    self.push_after_greeting(relay).await;
                }
                MailboxResponse::Error(e) => return Err(MessagingError::Refused(e)),
                _ => return Err(ClientError::UnexpectedResponse("Hello").into()),
            }
        }
        Ok(())
    }

    fn known_relays(&self) -> Vec<RelayInfo> {
        self.session.relays.clone()
    }

    // ---- sending ----

    /// Sends text messages, in order, to `to`; returns them as recorded. They go through the
    /// outbox: when no relay can take them now they stay there, `Pending`, and go out (after
    /// anything queued before them) with the next flush; only a refusal is an error.
    pub async fn send_texts(
        &mut self,
        to: LookupQuery,
        texts: Vec<String>,
        reply_to: Option<MessageId>,
    ) -> Result<Vec<StoredMessage>, MessagingError> {
        let drafts = texts.into_iter().map(Draft::text).collect();
        self.send_messages(to, drafts, reply_to).await
    }

    /// Sends a file already uploaded (or forwarded: the same reference again), with a caption,
    /// through the outbox as [`Messenger::send_texts`] does.
    pub async fn send_file(
        &mut self,
        to: LookupQuery,
        file: FileRef,
        caption: Option<String>,
        reply_to: Option<MessageId>,
    ) -> Result<StoredMessage, MessagingError> {
        self.send_one(to, Draft { text: caption.unwrap_or_default(), file: Some(file), extras: None }, reply_to).await
    }

    async fn send_one(
        &mut self,
        to: LookupQuery,
        draft: Draft,
        reply_to: Option<MessageId>,
    ) -> Result<StoredMessage, MessagingError> {
        let mut sent = self.send_messages(to, vec![draft], reply_to).await?;
        sent.pop().ok_or_else(|| MessagingError::NoRelay("the message was not recorded".into()))
    }

    /// Checks that `to` names a user with devices to send to (before a long upload for them).
    pub async fn check_recipient(&mut self, to: &LookupQuery) -> Result<(), MessagingError> {
        self.history()?;
        if let LookupQuery::Group(group) = to {
            return self.check_group_member(group);
        }
        let card = self.card(to.clone(), CARD_FRESH_SECS).await?;
        if card.devices.is_empty() {
            return Err(MessagingError::NoDevices(card.user_id));
        }
        Ok(())
    }

    /// Records new messages (text, or a caption with a file) as pending, queues them in the
    /// outbox and flushes it.
    async fn send_messages(
        &mut self,
        to: LookupQuery,
        drafts: Vec<Draft>,
        reply_to: Option<MessageId>,
    ) -> Result<Vec<StoredMessage>, MessagingError> {
        let (records, payloads) = self.prepare_drafts(to, drafts, reply_to).await?;
        let ids: Vec<MessageId> = records.iter().map(|m| m.id).collect();
        self.queue(records, &payloads)?;
        self.flush_queued().await?;
        self.messages_now(&ids)
    }

    /// Queues new messages in the outbox, on disk, in one transaction: from here on they are
    /// sent, now or when a relay can take them.
    pub fn queue(&mut self, records: Vec<StoredMessage>, payloads: &[Payload]) -> Result<(), MessagingError> {
        self.history()?.queue(records, payloads)?;
        Ok(())
    }

    /// Checks new messages and makes them: the records this device keeps and the payloads to
    /// queue (see [`Messenger::queue`]).
    pub async fn prepare_drafts(
        &mut self,
        to: LookupQuery,
        drafts: Vec<Draft>,
        reply_to: Option<MessageId>,
    ) -> Result<(Vec<StoredMessage>, Vec<Payload>), MessagingError> {
        drafts.iter().try_for_each(Draft::check)?;
        self.history()?;
        let (records, payloads): (Vec<StoredMessage>, Vec<Payload>) = if let LookupQuery::Group(group) = &to {
            let (_, records, payloads) = self.group_payloads(group, drafts, reply_to)?;
            (records, payloads)
        } else {
            let card = self.card(to, CARD_FRESH_SECS).await?;
            if card.devices.is_empty() {
                return Err(MessagingError::NoDevices(card.user_id));
            }
            let (me, sent_at_ms) = (self.me(), now_ms());
            drafts.into_iter().map(|d| d.into_message(card.user_id, me, sent_at_ms, reply_to)).unzip()
        };
        Ok((records, payloads))
    }

    /// Sends what was queued: a failure that may pass leaves it in the outbox (and is no
    /// error: it goes when a relay can take it); a refusal is returned. Returns what was sent.
    pub async fn flush_queued(&mut self) -> Result<Vec<StoredMessage>, MessagingError> {
        match self.flush_outbox().await {
            Ok(sent) => Ok(sent),
            Err(e) if e.may_pass() => {
                tracing::info!(error = %e, "queued in the outbox; sent when a relay can take it");
                Ok(Vec::new())
            }
            Err(e) => Err(e),
        }
    }

    /// These messages as the history has them now.
    pub fn messages_now(&mut self, ids: &[MessageId]) -> Result<Vec<StoredMessage>, MessagingError> {
        let history = self.history()?;
        let mut now = Vec::new();
        for id in ids {
            now.extend(history.message(id)?);
        }
        Ok(now)
    }

    /// Sends what waits in the outbox, oldest first, and returns the messages now sent. Stops
    /// at the first failure that may pass (the rest wait, in order); a refusal takes the refused
    /// messages out (marked deleted) and is returned.
    pub async fn flush_outbox(&mut self) -> Result<Vec<StoredMessage>, MessagingError> {
        self.history()?;
        self.flush_secret_outbox().await?;
        let mut waiting = self.h().outbox()?;
        let mut sent = Vec::new();
        while !waiting.is_empty() {
            // The oldest entries for one recipient go together.
            let chat = waiting[0].1.chat_with;
            let run = waiting.iter().take_while(|(_, p)| p.chat_with == chat).count();
            let batch: Vec<(u64, Payload)> = waiting.drain(..run).collect();
            let keys: Vec<u64> = batch.iter().map(|(k, _)| *k).collect();
            let ids: Vec<MessageId> = batch.iter().map(|(_, p)| p.message_id).collect();
            let payloads: Vec<Payload> = batch.into_iter().map(|(_, p)| p).collect();
            let outcome = if crate::proto::group::is_group_chat(chat) {
                self.post_bodies(chat, payloads.into_iter().map(|p| (p.message_id, p.body)).collect()).await
            } else {
                match self.card(LookupQuery::UserId(chat), CARD_FRESH_SECS).await {
                    Ok(card) => self.send_sealed(&card, payloads, true).await.map(drop),
                    Err(e) => Err(e),
                }
            };
            match outcome {
                Ok(()) => sent.extend(self.h().sent_from_outbox(&keys, &ids)?),
                Err(e) if e.may_pass() => return Err(e),
                Err(e) => {
                    tracing::warn!(%chat, error = %e, "refused: taking these messages out of the outbox");
                    self.h().refused_from_outbox(&keys, &ids)?;
                    return Err(e);
                }
            }
        }
        Ok(sent)
    }

    /// Whether the outbox has anything waiting.
    pub fn outbox_waiting(&mut self) -> Result<bool, MessagingError> {
        Ok(!self.history()?.outbox()?.is_empty() || self.s().outbox_waiting())
    }

    /// Changes the text of one of our messages, here and on every device of the chat.
    pub async fn edit(&mut self, id: MessageId, text: String) -> Result<StoredMessage, MessagingError> {
        self.history()?;
        if text.is_empty() || text.chars().count() > MAX_TEXT_CHARS {
            return Err(MessagingError::TextTooLong);
        }
        let original = self.own_message(&id)?;
        self.send_to_chat(original.chat, vec![Body::Edit { message: id, text: text.clone() }], true).await?;
        let changed = self.h().update_own(&[id], |m| {
            m.text.clone_from(&text);
            m.edited = true;
            true
        })?;
        Ok(changed.into_iter().next().unwrap_or(original))
    }

    /// Deletes one of our messages for everyone in the chat.
    pub async fn delete(&mut self, id: MessageId) -> Result<StoredMessage, MessagingError> {
        self.history()?;
        let original = self.own_message(&id)?;
        self.send_to_chat(original.chat, vec![Body::Delete { messages: vec![id] }], true).await?;
        let changed = self.h().update_own(&[id], mark_deleted)?;
        Ok(changed.into_iter().next().unwrap_or(original))
    }

    /// Tells `to` that we are typing.
    pub async fn typing(&mut self, to: LookupQuery) -> Result<(), MessagingError> {
        self.history()?;
        if let LookupQuery::Group(group) = to {
            self.check_group_member(&group)?;
            return self.post_bodies(group.chat_number(), vec![(MessageId::random(), Body::Typing)]).await;
        }
        let card = self.card(to, CARD_FRESH_SECS).await?;
        self.send_payloads(&card, vec![Body::Typing], false).await?;
        Ok(())
    }

    /// Marks every incoming message of a chat as read, telling the sender.
    pub async fn mark_read(&mut self, chat: UserId) -> Result<usize, MessagingError> {
        self.history()?;
        let unread: Vec<MessageId> = self
            .h()
            .messages(Some(chat))?
            .into_iter()
            .filter(|m| !m.outgoing && m.status < Status::Read)
            .map(|m| m.id)
            .collect();
        if unread.is_empty() {
            return Ok(0);
        }
        self.h().update_own(&unread, |m| {
            m.status = Status::Read;
            true
        })?;
        // A channel's readers are not told apart: no receipts there.
        if self.is_channel(chat)? {
            return Ok(unread.len());
        }
        self.send_receipts(chat, Status::Read, &unread).await?;
        Ok(unread.len())
    }

    /// A message of the history, by id.
    pub fn stored_message(&mut self, id: MessageId) -> Result<StoredMessage, MessagingError> {
        self.history()?;
        self.h().message(&id)?.ok_or(MessagingError::UnknownMessage(id))
    }

    pub(crate) fn own_message(&self, id: &MessageId) -> Result<StoredMessage, MessagingError> {
        match self.h().message(id)? {
            Some(m) if m.outgoing && !m.deleted => Ok(m),
            Some(_) => Err(MessagingError::NotYours(*id)),
            None => Err(MessagingError::UnknownMessage(*id)),
        }
    }

    async fn send_receipts(&mut self, to: UserId, status: Status, ids: &[MessageId]) -> Result<(), MessagingError> {
        let bodies = ids.chunks(MAX_IDS_PER_RECEIPT).map(|c| Body::Receipt { status, messages: c.to_vec() }).collect();
        self.send_to_chat(to, bodies, false).await
    }

    /// Sends bodies that change a chat (edits, deletes, receipts): to the group, for a group;
    /// else sealed for the person's devices (and our other ones when `sync`).
    pub(crate) async fn send_to_chat(
        &mut self,
        chat: UserId,
        bodies: Vec<Body>,
        sync: bool,
    ) -> Result<(), MessagingError> {
        if crate::proto::group::is_group_chat(chat) {
            return self.post_bodies(chat, bodies.into_iter().map(|b| (MessageId::random(), b)).collect()).await;
        }
        let card = self.card(LookupQuery::UserId(chat), CARD_FRESH_SECS).await?;
        self.send_payloads(&card, bodies, sync).await?;
        Ok(())
    }

    /// Seals each body once per device of `card` (and per own other device when `sync`), and
    /// sends them in order; returns each payload with its send time.
    pub(crate) async fn send_payloads(
        &mut self,
        card: &UserCard,
        bodies: Vec<Body>,
        sync: bool,
    ) -> Result<Vec<(Payload, u64)>, MessagingError> {
        let payloads = bodies
            .into_iter()
            .map(|body| Payload { message_id: MessageId::random(), chat_with: card.user_id, body })
            .collect();
        self.send_sealed(card, payloads, sync).await
    }

    /// Seals each payload once per device of `card` (and per own other device when `sync`),
    /// and sends them in order; returns each payload with its send time.
    pub(crate) async fn send_sealed(
        &mut self,
        card: &UserCard,
        payloads: Vec<Payload>,
        sync: bool,
    ) -> Result<Vec<(Payload, u64)>, MessagingError> {
        if card.devices.is_empty() {
            return Err(MessagingError::NoDevices(card.user_id));
        }
        let me = self.me();
        let mine = if sync && card.user_id != me {
            Some(self.card(LookupQuery::UserId(me), CARD_FRESH_SECS).await?)
        } else {
            None
        };
        let (sent, envelopes) = self.seal_to(card, mine.as_ref(), payloads)?;
        for batch in envelopes.chunks(MAX_ENVELOPES_PER_BATCH) {
            self.send_batch(batch.to_vec()).await?;
        }
        Ok(sent)
    }

    /// Seals each payload once per device of `card` (other than this one), to be sent.
    pub(crate) fn seal_for(&self, card: &UserCard, payloads: Vec<Payload>) -> Result<Vec<Envelope>, MessagingError> {
        Ok(self.seal_to(card, None, payloads)?.1)
    }

    /// Seals each payload once per device of `card` and of `mine` (other than this one).
    #[allow(clippy::type_complexity)]
    fn seal_to(
        &self,
        card: &UserCard,
        mine: Option<&UserCard>,
        payloads: Vec<Payload>,
    ) -> Result<(Vec<(Payload, u64)>, Vec<Envelope>), MessagingError> {
        let me = self.me();
        let my_device = self.client.identity.peer_id();
        let targets: Vec<(UserId, crate::proto::DeviceCard)> = card
            .devices
            .iter()
            .map(|d| (card.user_id, d.clone()))
            .chain(mine.iter().flat_map(|c| c.devices.iter().map(|d| (me, d.clone()))))
            .filter(|(_, d)| d.peer_id != my_device)
            .collect();
        let mut first_seq = HashMap::new();
        for (_, device) in &targets {
            first_seq.insert(device.peer_id, self.h().reserve_seq(&device.peer_id, payloads.len() as u64)?);
        }
        let mut sent = Vec::new();
        let mut envelopes = Vec::new();
        for (i, payload) in payloads.into_iter().enumerate() {
            let bytes = postcard::to_stdvec(&payload).expect("invariant: payloads serialize");
            let sent_at_ms = now_ms();
            for (user, device) in &targets {
                let mut envelope = Envelope {
                    id: EnvelopeId::random(),
                    from_user: me,
                    from_device: my_device,
                    to_user: *user,
                    to_device: device.peer_id,
                    sent_at_ms,
                    seq: first_seq[&device.peer_id] + i as u64,
                    sealed: Vec::new(),
                };
                seal::seal_envelope(&self.client.identity, &device.noise_key(), &mut envelope, &bytes)?;
                envelopes.push(envelope);
            }
            sent.push((payload, sent_at_ms));
        }
        Ok((sent, envelopes))
    }

    /// One batch through the first relay that stores it; a relay that fails or cannot reach
    /// enough replicas is skipped. Resending is safe: relays report duplicates, not errors.
    ///
    /// Relays holding the first recipient device's mailbox come first: one copy is then local
    /// to the relay that takes the batch, and a recipient waiting there gets it as it arrives,
    /// one hop sooner than through any other relay (which would do as well, only slower).
    pub(crate) async fn send_batch(&mut self, envelopes: Vec<Envelope>) -> Result<(), MessagingError> {
        self.store_batch(envelopes, |envelopes| MailboxRequest::Send { envelopes }).await
    }

    /// A batch of group messages, as [`Messenger::send_batch`] sends one-to-one ones: the
    /// group's relays first.
    pub(crate) async fn post_batch(&mut self, envelopes: Vec<Envelope>) -> Result<(), MessagingError> {
        self.store_batch(envelopes, |envelopes| MailboxRequest::Post { envelopes }).await
    }

    async fn store_batch(
        &mut self,
        envelopes: Vec<Envelope>,
        request: impl Fn(Vec<Envelope>) -> MailboxRequest,
    ) -> Result<(), MessagingError> {
        let mut last = String::from("no relays known; sign in with --network");
        let mut relays = self.known_relays();
        if let Some(first) = envelopes.first() {
            relays = placement::by_closeness(&placement::mailbox_key(&first.to_device), relays);
        }
        for relay in self.answering_first(relays) {
            match self.relay_call(&relay, request(envelopes.clone()), SEND_DEADLINE).await {
                Ok(MailboxResponse::Stored { .. }) => return Ok(()),
                Ok(MailboxResponse::Error(e))
                    if matches!(e.code, ErrorCode::Unavailable | ErrorCode::CertInvalid | ErrorCode::Internal) =>
                {
                    last = e.to_string();
                }
                Ok(MailboxResponse::Error(e)) => return Err(MessagingError::Refused(e)),
                Ok(_) => last = "unexpected answer to Send".into(),
                // Our certificate refused there, or the relay takes no clients (not admitted):
                // another relay may do.
                Err(MessagingError::Refused(e))
                    if matches!(e.code, ErrorCode::CertInvalid | ErrorCode::Unavailable) =>
                {
                    last = e.to_string();
                }
                Err(MessagingError::Net(e)) => last = e.to_string(),
                Err(e) => return Err(e),
            }
        }
        Err(MessagingError::NoRelay(last))
    }

    // ---- receiving ----

    /// Fetches from every relay holding our mailbox (waiting up to `wait_ms` on the first for
    /// something to arrive), records what is new, acknowledges everything fetched.
    pub async fn receive(&mut self, wait_ms: u32) -> Result<Inbox, MessagingError> {
        if self.mailbox_relays.is_empty() {
            self.greet_any().await?;
        } else if self.mailbox_relays_at.is_none_or(|at| at.elapsed() >= MAILBOX_RELAYS_FRESH_FOR) {
            self.refresh_mailbox_relays().await?;
        }
        let mut fresh = Inbox::default();
        let mut reached = 0;
        let mut last = String::from("no mailbox relay known");
        for relay in self.answering_first(self.mailbox_relays.clone()) {
            // Another holder of the mailbox has answered: one that did not lately can wait.
            if reached > 0 && self.is_unresponsive(&relay.peer_id) {
                continue;
            }
            // Long-poll the first relay that answers; the others are only drained.
            let wait = if reached == 0 { wait_ms } else { 0 };
            match self.drain(&relay, wait).await {
                Ok(inbox) => {
                    reached += 1;
                    fresh.absorb(inbox);
                }
                Err(e) => {
                    tracing::warn!(relay = %relay.peer_id, error = %e, "mailbox relay unavailable");
                    last = e.to_string();
                }
            }
        }
        if reached == 0 {
            // Placement may have changed (a relay died): ask again next time.
            self.mailbox_relays.clear();
            return Err(MessagingError::NoRelay(last));
        }
        self.acknowledge_delivery(&fresh.messages).await;
        if self.secrets.as_ref().is_some_and(SecretChats::outbox_waiting) {
            // Answers to re-keys, say: best effort now, the node's retry sends them otherwise.
            let _ = self.flush_secret_outbox().await;
        }
        if !fresh.device_requests.is_empty() {
            // A device joined the account: its contacts should know (see `lookup`).
            self.announce_devices_changed().await;
        }
        Ok(fresh)
    }

    /// Tells each sender which of their messages reached this device. Best effort: a receipt
    /// that cannot be sent now is not worth failing the fetch for.
    async fn acknowledge_delivery(&mut self, fresh: &[StoredMessage]) {
        let mut by_sender: HashMap<UserId, Vec<MessageId>> = HashMap::new();
        for m in fresh.iter().filter(|m| !m.outgoing && m.status == Status::Sent && !m.edited && !m.deleted) {
            by_sender.entry(m.from).or_default().push(m.id);
        }
        for (sender, ids) in by_sender {
            if let Err(e) = self.send_receipts(sender, Status::Delivered, &ids).await {
                tracing::warn!(%sender, error = %e, "could not send delivery receipts");
            }
        }
    }

    /// Asks a relay afresh which relays hold this device's mailbox. Placement moves when relays
    /// join, leave or are revoked, and repair moves the copies with it: a long-running node asks
    /// now and then, or it keeps fetching from relays that no longer hold its mailbox. The old
    /// list serves if none answers; with none known, this fails.
    pub(crate) async fn refresh_mailbox_relays(&mut self) -> Result<(), MessagingError> {
        if self.mailbox_relays.is_empty() {
            return self.greet_any().await;
        }
        if let Err(e) = self.greet_any().await {
            tracing::warn!(error = %e, "could not refresh this device's mailbox relays");
            self.mailbox_relays_at = Some(std::time::Instant::now());
        }
        Ok(())
    }

    async fn greet_any(&mut self) -> Result<(), MessagingError> {
        let mut last = String::from("no relays known; sign in with --network");
        for relay in self.answering_first(self.known_relays()) {
            self.greeted.remove(&relay.peer_id);
            let hello = MailboxRequest::Fetch { max: 1, wait_ms: 0, ack: Vec::new() };
            match self.relay_call(&relay, hello, RELAY_ANSWER_DEADLINE).await {
                Ok(_) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
        }
        Err(MessagingError::NoRelay(last))
    }

    /// Everything waiting on one relay, batch by batch. Each `Fetch` acknowledges the batch
    /// before it; the last batch is acknowledged by the next `receive` or by `flush_acks`.
    async fn drain(&mut self, relay: &RelayInfo, wait_ms: u32) -> Result<Inbox, MessagingError> {
        let mut fresh = Inbox::default();
        let mut wait = wait_ms;
        loop {
            let ack = self.unacked.remove(&relay.peer_id).unwrap_or_default();
            let max = MAX_ENVELOPES_PER_BATCH as u32;
            // Signed, so that the relay can have the other replicas delete their copies too.
            let fetch = match ack.is_empty() {
                true => MailboxRequest::Fetch { max, wait_ms: wait, ack: Vec::new() },
                false => MailboxRequest::FetchAcked { max, wait_ms: wait, ack: self.signed_ack(ack.clone()) },
            };
            let deadline = std::time::Duration::from_millis(u64::from(wait)) + RELAY_ANSWER_DEADLINE;
            let answer = self.relay_call(relay, fetch, deadline).await;
            let (envelopes, more) = match answer {
                Ok(MailboxResponse::Envelopes { envelopes, more }) => (envelopes, more),
                failed => {
                    // Not acknowledged after all: keep them for the next attempt.
                    if !ack.is_empty() {
                        self.unacked.insert(relay.peer_id, ack);
                    }
                    return Err(match failed {
                        Ok(MailboxResponse::Error(e)) => MessagingError::Refused(e),
                        Ok(_) => ClientError::UnexpectedResponse("Fetch").into(),
                        Err(e) => e,
                    });
                }
            };
            if envelopes.is_empty() {
                return Ok(fresh);
            }
            self.history()?;
            let fetched: Vec<EnvelopeId> = envelopes.iter().map(|e| e.id).collect();
            let (inbox, deferred) = self.accept(envelopes).await?;
            fresh.absorb(inbox);
            fresh.deferred += deferred.len();
            // Acknowledged only after the history commit: a crash before it means a redelivery,
            // which the seen-set absorbs; never a loss. Deferred envelopes stay on the relays.
            let ids = fetched.into_iter().filter(|id| !deferred.contains(id)).collect();
            self.unacked.insert(relay.peer_id, ids);
            // More now would bring the deferred ones straight back.
            if !more || !deferred.is_empty() {
                return Ok(fresh);
            }
            wait = 0;
        }
    }

    /// `ids` of this device's mailbox, acknowledged under its signature.
    fn signed_ack(&self, ids: Vec<EnvelopeId>) -> crate::proto::SignedAck {
        crate::proto::SignedAck::sign(&self.client.identity.keypair, ids)
    }

    /// Acknowledges what `receive` left unacknowledged. Commands that receive once and exit
    /// call it. Best effort: a missed acknowledgement costs only a redelivery, which the
    /// seen-set absorbs, so a relay that cannot be reached is logged, not an error.
    pub async fn flush_acks(&mut self) {
        for relay in self.mailbox_relays.clone() {
            let Some(ids) = self.unacked.remove(&relay.peer_id).filter(|ids| !ids.is_empty()) else { continue };
            let ack = MailboxRequest::AckSigned { ack: self.signed_ack(ids) };
            match self.relay_call(&relay, ack, RELAY_ANSWER_DEADLINE).await {
                Ok(MailboxResponse::Acked { .. }) => {}
                Ok(other) => tracing::warn!(relay = %relay.peer_id, answer = ?other, "acknowledgement refused"),
                Err(e) => tracing::warn!(relay = %relay.peer_id, error = %e, "acknowledgement not delivered"),
            }
        }
    }

    /// Opens, verifies and applies envelopes. One that is definitively bad (bad seal, key not
    /// on the sender's card, malformed) is dropped, logged and counted; one that cannot be
    /// verified yet (the gateway away, say) is deferred, and so is everything after it from the
    /// same device, so that each sender's order holds. Returns what changed and the deferred ids.
    async fn accept(&mut self, envelopes: Vec<Envelope>) -> Result<(Inbox, HashSet<EnvelopeId>), MessagingError> {
        let mut inbox = Inbox::default();
        let mut deferred = HashSet::new();
        let mut waiting_devices = HashSet::new();
        for envelope in delivery_order(envelopes) {
            if self.h().seen(&envelope.id)? {
                continue;
            }
            if waiting_devices.contains(&envelope.from_device) {
                deferred.insert(envelope.id);
                continue;
            }
            match self.secret_frame(&envelope, &mut inbox)? {
                Frame::Applied | Frame::Duplicate => {
                    self.h().mark_seen(envelope.id)?;
                    continue;
                }
                Frame::Bad(why) => {
                    tracing::warn!(envelope = %envelope.id, %why, "dropping a secret-chat frame");
                    self.h().drop_envelope(envelope.id)?;
                    continue;
                }
                Frame::NotSecret => {}
            }
            match self.open_envelope(&envelope).await {
                Ok((payload, sender_key)) => {
                    if payload.body == Body::DevicesChanged
                        && let Err(e) = self.lookup(LookupQuery::UserId(envelope.from_user)).await
                    {
                        // The card is looked up again before the next send anyway.
                        tracing::info!(user = %envelope.from_user, error = %e, "could not refresh a changed card now");
                    }
                    if matches!(
                        payload.body,
                        Body::GroupState { .. }
                            | Body::GroupRemoved { .. }
                            | Body::GroupJoin { .. }
                            | Body::GroupLeave { .. }
                            | Body::ChannelSubscribe { .. }
                    ) {
                        self.apply_group_control(&envelope, payload.body, &mut inbox)?;
                    } else {
                        self.apply(&envelope, &sender_key, payload, &mut inbox)?
                    }
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(envelope = %envelope.id, error = %e, "cannot verify an envelope yet; keeping it for later");
                    waiting_devices.insert(envelope.from_device);
                    deferred.insert(envelope.id);
                }
                Err(e) => {
                    tracing::warn!(envelope = %envelope.id, error = %e, "dropping an envelope that does not verify");
                    self.h().drop_envelope(envelope.id)?;
                }
            }
        }
        Ok((inbox, deferred))
    }

    /// How many envelopes this profile dropped as definitively bad, ever.
    pub fn dropped_envelopes(&self) -> Result<u64, MessagingError> {
        Ok(self.h().dropped_envelopes()?)
    }

    /// What one verified payload changes here.
    fn apply(
        &self,
        envelope: &Envelope,
        sender_key: &NoiseKey,
        payload: Payload,
        inbox: &mut Inbox,
    ) -> Result<(), MessagingError> {
        let me = self.me();
        let outgoing = envelope.from_user == me;
        let chat = if outgoing { payload.chat_with } else { envelope.from_user };
        let author = envelope.from_user;
        match payload.body {
            body @ (Body::Text { .. } | Body::File { .. } | Body::Rich { .. }) => {
                return self.record_new(envelope, payload.message_id, chat, body, inbox);
            }
            // Each change is applied in the same transaction that marks its envelope seen, so
            // two fetchers never apply it twice; one for a message not here yet is parked for a
            // history import to bring it.
            body @ (Body::Edit { .. } | Body::EditRich { .. } | Body::Delete { .. } | Body::Receipt { .. }) => {
                let parked = ParkedChange { author, body, parked_at: unix_now() };
                if let Some((ids, change)) = change_of(&parked.body, author) {
                    inbox.messages.extend(self.h().update_or_park(envelope.id, ids, change, &parked)?);
                }
            }
            Body::Typing => self.note_typing(envelope, inbox)?,
            // The history moves between the account's own devices only.
            Body::HistoryRequest { .. } | Body::History { .. } if !outgoing => {
                tracing::warn!(envelope = %envelope.id, from = %author, "dropping another account's history message");
                self.h().drop_envelope(envelope.id)?;
            }
            Body::HistoryRequest { device_name } => {
                let name: String = device_name.chars().filter(|c| !c.is_control()).take(64).collect();
                let request = DeviceRequest {
                    device: envelope.from_device,
                    device_name: name,
                    requested_at: envelope.sent_at_ms / 1000,
                    sent_at: None,
                };
                inbox.device_requests.extend(self.h().put_device_request(envelope.id, request)?);
            }
            Body::History { .. } if !self.h().wants_history()? => {
                tracing::warn!(envelope = %envelope.id, from = %envelope.from_device, "dropping a history this device did not ask for");
                self.h().drop_envelope(envelope.id)?;
            }
            Body::History { file, messages } => {
                if let Err(why) = file.check() {
                    tracing::warn!(envelope = %envelope.id, %why, "dropping a history whose reference does not hold together");
                    return Ok(self.h().drop_envelope(envelope.id)?);
                }
                let import = PendingImport { from_device: envelope.from_device, file, messages };
                if self.h().put_pending_import(envelope.id, &import)? {
                    inbox.imports += 1;
                }
            }
            Body::DevicesChanged => {
                self.h().mark_seen(envelope.id)?;
            }
            // Secret chats are with other people's devices, never synced to our own.
            Body::SecretHandshake { .. } | Body::SecretReply { .. } | Body::SecretDecline { .. } if outgoing => {
                tracing::warn!(envelope = %envelope.id, "dropping a secret-chat handshake from our own account");
                self.h().drop_envelope(envelope.id)?;
            }
            body @ (Body::SecretHandshake { .. } | Body::SecretReply { .. } | Body::SecretDecline { .. }) => {
                match self.apply_secret_handshake(envelope, sender_key, body, inbox) {
                    Ok(()) => {
                        self.h().mark_seen(envelope.id)?;
                    }
                    Err(e) if e.is_transient() => return Err(e),
                    Err(e) => {
                        tracing::warn!(envelope = %envelope.id, error = %e, "dropping a secret-chat handshake that does not verify");
                        self.h().drop_envelope(envelope.id)?;
                    }
                }
            }
            // Presses are between other people and bots, never synced to our own devices.
            Body::Callback { .. } | Body::CallbackAnswer { .. } if outgoing => {
                tracing::warn!(envelope = %envelope.id, "dropping a button press from our own account");
                self.h().drop_envelope(envelope.id)?;
            }
            body @ (Body::Callback { .. } | Body::CallbackAnswer { .. }) => self.apply_press(envelope, body, inbox)?,
            // Group control is applied by `accept`; group posts never come pairwise.
            Body::GroupState { .. }
            | Body::GroupRemoved { .. }
            | Body::GroupJoin { .. }
            | Body::GroupLeave { .. }
            | Body::GroupChanged { .. }
            | Body::ChannelState { .. }
            | Body::ChannelSubscribe { .. } => {
                tracing::warn!(envelope = %envelope.id, "dropping a group message that came pairwise");
                self.h().drop_envelope(envelope.id)?;
            }
        }
        Ok(())
    }

    /// A new message from `envelope` (a text, or a file with its caption), recorded in `chat`
    /// once; a file reference that does not hold together is dropped. Other bodies are no
    /// new message and change nothing here.
    pub(crate) fn record_new(
        &self,
        envelope: &Envelope,
        id: MessageId,
        chat: UserId,
        body: Body,
        inbox: &mut Inbox,
    ) -> Result<(), MessagingError> {
        let (text, reply_to, file, extras) = match body {
            Body::Text { text, reply_to } => (text, reply_to, None, None),
            Body::File { file, caption, reply_to } => {
                (caption.unwrap_or_default(), reply_to, Some(Box::new(file)), None)
            }
            Body::Rich { text, reply_to, file, extras } => (text, reply_to, file, Some(extras)),
            _ => return Ok(()),
        };
        let holds = match (&file, &extras) {
            (Some(file), _) if let Err(why) = file.check() => Err(why.to_string()),
            (_, Some(extras)) => extras.check(),
            _ => Ok(()),
        };
        if let Err(why) = holds {
            tracing::warn!(envelope = %envelope.id, %why, "dropping a message that does not hold together");
            return Ok(self.h().drop_envelope(envelope.id)?);
        }
        let message = StoredMessage {
            id,
            chat,
            from: envelope.from_user,
            outgoing: envelope.from_user == self.me(),
            text,
            reply_to,
            sent_at_ms: envelope.sent_at_ms,
            status: Status::Sent,
            edited: false,
            deleted: false,
            file,
            notice: false,
            extras,
        };
        inbox.messages.extend(self.h().record(vec![(Some(envelope.id), message)])?);
        Ok(())
    }

    /// Someone typing, if the notice is fresh and not our own; never stored.
    pub(crate) fn note_typing(&self, envelope: &Envelope, inbox: &mut Inbox) -> Result<(), MessagingError> {
        let fresh = now_ms().saturating_sub(envelope.sent_at_ms) < TYPING_FRESH_MS;
        if self.h().mark_seen(envelope.id)? && envelope.from_user != self.me() && fresh {
            inbox.typing.push(envelope.from_user);
        }
        Ok(())
    }

    /// Opens an envelope and checks that the key that sealed it belongs to the device it names.
    async fn open_envelope(&self, envelope: &Envelope) -> Result<(Payload, NoiseKey), MessagingError> {
        if envelope.to_device != self.client.identity.peer_id() {
            return Err(E2eError::Open("addressed to another device".into()).into());
        }
        let opened = seal::open_envelope(&self.client.identity, envelope)?;
        let matches = |card: &UserCard| {
            card.devices.iter().any(|d| d.peer_id == envelope.from_device && d.noise_key() == opened.sender_key)
        };
        // The cached card first (looked up again once it is old, so a removed device stops being
        // trusted; the old one serves while the gateway is away); a key it does not list may be
        // a device added since.
        let cached = self.card(LookupQuery::UserId(envelope.from_user), CARD_TRUST_SECS).await?;
        if !matches(&cached) && !matches(&self.lookup(LookupQuery::UserId(envelope.from_user)).await?) {
            return Err(E2eError::Open(format!(
                "sealed by a key that is not device {} of user {}",
                envelope.from_device, envelope.from_user
            ))
            .into());
        }
        let payload = postcard::from_bytes(&opened.payload).map_err(|e| E2eError::Open(format!("payload: {e}")))?;
        Ok((payload, opened.sender_key))
    }
}

/// Interleaves senders by their send time, while each sender's own envelopes keep their `seq`
/// order (a sender's clock may step back; its counter does not).
pub(crate) fn delivery_order(mut envelopes: Vec<Envelope>) -> Vec<Envelope> {
    envelopes.sort_by_key(|e| (e.sent_at_ms, e.from_device.to_bytes(), e.seq));
    let mut slots: HashMap<PeerId, Vec<usize>> = HashMap::new();
    for (i, e) in envelopes.iter().enumerate() {
        slots.entry(e.from_device).or_default().push(i);
    }
    let mut ordered: Vec<Option<Envelope>> = vec![None; envelopes.len()];
    let mut by_sender: HashMap<PeerId, Vec<Envelope>> = HashMap::new();
    for e in envelopes {
        by_sender.entry(e.from_device).or_default().push(e);
    }
    for (sender, mut own) in by_sender {
        own.sort_by_key(|e| e.seq);
        for (slot, e) in slots[&sender].iter().zip(own) {
            ordered[*slot] = Some(e);
        }
    }
    ordered.into_iter().flatten().collect()
}

/// Relays a client remembers at most.
const MAX_KNOWN_RELAYS: usize = 64;

/// The relays to remember after a `Welcome` listed `live`: those first (live as that relay
/// sees them), then the others known before, which may be down now but come back — if every
/// relay of the Welcome dies, they are all the client has left to try — up to
/// [`MAX_KNOWN_RELAYS`] in all, so the longest-unseen go first.
fn merge_known_relays(live: Vec<RelayInfo>, known: &[RelayInfo]) -> Vec<RelayInfo> {
    let mut relays = live;
    for relay in known {
        if !relays.iter().any(|r| r.peer_id == relay.peer_id) {
            relays.push(relay.clone());
        }
    }
    relays.truncate(MAX_KNOWN_RELAYS);
    relays
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_welcome_puts_its_live_relays_first_and_forgets_none_known_before() {
        let relay = || RelayInfo { peer_id: PeerId::random(), addrs: Vec::new() };
        let (a, b, c) = (relay(), relay(), relay());
        let merged = merge_known_relays(vec![c.clone(), a.clone()], &[a.clone(), b.clone()]);
        assert_eq!(merged, vec![c, a, b]);
        let many: Vec<RelayInfo> = (0..100).map(|_| relay()).collect();
        assert_eq!(merge_known_relays(Vec::new(), &many).len(), MAX_KNOWN_RELAYS);
    }

    fn envelope(from: PeerId, seq: u64, sent_at_ms: u64) -> Envelope {
        Envelope {
            id: EnvelopeId::random(),
            from_user: UserId(1),
            from_device: from,
            to_user: UserId(2),
            to_device: PeerId::random(),
            sent_at_ms,
            seq,
            sealed: vec![1],
        }
    }

    #[test]
    fn only_bad_seals_keys_payloads_and_unknown_senders_are_definitive() {
        use crate::client::net::NetError;
        use crate::proto::WireError;
        let refused = |code| MessagingError::Client(ClientError::Gateway(WireError::new(code, "x")));
        let unreachable = NetError::Unreachable { peer: PeerId::random(), addrs: String::new(), reason: "down".into() };
        let transient = [
            MessagingError::Client(ClientError::Net(unreachable.clone())),
            MessagingError::Net(unreachable),
            MessagingError::NoRelay("all down".into()),
            MessagingError::History(crate::client::history::HistoryError::Db("busy".into())),
            refused(ErrorCode::FloodWait),
            refused(ErrorCode::Internal),
            refused(ErrorCode::SessionRevoked),
        ];
        for e in &transient {
            assert!(e.is_transient(), "{e}");
        }
        let definitive = [
            MessagingError::Seal(E2eError::Open("bad seal".into())),
            refused(ErrorCode::NotFound),
            MessagingError::Client(ClientError::UnexpectedResponse("Lookup")),
        ];
        for e in &definitive {
            assert!(!e.is_transient(), "{e}");
        }
    }

    #[test]
    fn senders_interleave_by_time_and_each_keeps_its_own_order() {
        let (a, b) = (PeerId::random(), PeerId::random());
        // a's clock stepped back between its seq 1 and 2.
        let input =
            vec![envelope(b, 0, 15), envelope(a, 2, 5), envelope(a, 0, 10), envelope(a, 1, 20), envelope(b, 1, 25)];
        let order: Vec<(bool, u64)> = delivery_order(input).iter().map(|e| (e.from_device == a, e.seq)).collect();
        assert_eq!(order, [(true, 0), (true, 1), (false, 0), (true, 2), (false, 1)]);
    }
}
