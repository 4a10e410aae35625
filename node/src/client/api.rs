//! The client node's API: the calls a front end makes ([`Call`]), their answers ([`Reply`]),
//! the one error shape ([`ApiError`]) and the event stream ([`Event`]).
//!
//! The same types serve a node in the same process ([`crate::client::node::NodeHandle`]) and
//! one in another process over its control socket ([`crate::client::control`]), so the CLI
//! prints the same whichever answered. Like every wire enum here, these only grow.

use std::collections::BTreeMap;

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use std::path::PathBuf;

use crate::client::backup::{BackupListed, BackupMade};
use crate::client::buttons::Pressed;
use crate::client::devices::{DeviceInfo, HistorySent};
use crate::client::groups::{GroupChange, GroupError, GroupInfo};
use crate::client::history::{BackupSchedule, Imported, Press, StoredMessage};
use crate::client::media::{ByteRange, Downloaded, Progress};
use crate::client::messaging::MessagingError;
use crate::client::push::{PushRelay, PushSubscription};
use crate::client::secret::{SecretChatInfo, SecretError, SecretMessage};
use crate::client::session::ClientError;
use crate::ids::{SessionId, UserId};
use crate::proto::group::GroupId;
use crate::proto::media::FileRef;
use crate::proto::payload::MessageId;
use crate::proto::rich::{CallbackId, Extras};
use crate::proto::{Account, BotCommandInfo, LookupQuery, SessionInfo, UserCard};

/// What a front end asks of its client node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "call", rename_all = "snake_case")]
pub enum Call {
    /// The account as the gateway has it now, and this device's session.
    Whoami,
    /// A fresh session certificate now.
    Renew,
    /// Change username (`Some("")` removes it) and/or display name.
    SetProfile {
        username: Option<String>,
        name: Option<String>,
    },
    /// Set, change (`new: Some`) or remove (`new: None`) the 2FA password.
    SetPassword {
        current: Option<String>,
        new: Option<String>,
    },
    /// A user's card from the directory.
    Lookup {
        query: LookupQuery,
    },
    /// The account's sessions.
    Sessions,
    /// End one session, or (`None`) every other one.
    RevokeSessions {
        session_id: Option<SessionId>,
    },
    /// Create a bot owned by this account.
    CreateBot {
        username: String,
        name: String,
    },
    /// The bots this account owns.
    ListBots,
    /// The commands a bot lists for its users.
    BotCommands {
        bot: LookupQuery,
    },
    /// This bot's commands for its users (as `setMyCommands` sets them; empty: none).
    SetBotCommands {
        commands: Vec<BotCommandInfo>,
    },
    /// Replace a bot's token.
    RevokeBotToken {
        bot: UserId,
    },
    /// Send text messages, in order.
    Send {
        to: LookupQuery,
        texts: Vec<String>,
        reply_to: Option<MessageId>,
    },
    /// Fetch what is waiting, then a chat's history (reading it), or every chat's; with
    /// `limit`, only a chat's newest `limit` messages (`History` pages further back).
    Messages {
        chat: Option<LookupQuery>,
        #[serde(default)]
        limit: Option<u32>,
    },
    /// One page of a chat's history: up to `limit` messages before `before` (the newest
    /// without it), oldest first. Reads from this device's history only, and marks nothing read.
    History {
        chat: LookupQuery,
        before: Option<MessageId>,
        limit: u32,
    },
    /// Fetch what is waiting, then every chat with its last message.
    Chats,
    /// Change the text of one of our messages.
    Edit {
        message: MessageId,
        text: String,
    },
    /// Delete one of our messages for everyone.
    Delete {
        message: MessageId,
    },
    /// Tell someone we are typing.
    Typing {
        to: LookupQuery,
    },
    /// Answered with `Subscribed`, then [`Event`]s until the caller hangs up (control socket only).
    Subscribe,
    /// Upload a file (resuming an interrupted upload of it) and send it; progress comes as
    /// [`Event::Transfer`]s. The path is read by the node, which runs as the same user.
    Upload {
        path: PathBuf,
        to: LookupQuery,
        caption: Option<String>,
        part_size: Option<u32>,
    },
    /// Upload a file without sending it: its reference comes back, to send with
    /// `SendRich` (as the bot bridge does, with a caption's formatting and a keyboard).
    UploadFile {
        path: PathBuf,
        part_size: Option<u32>,
    },
    /// One message of the history, by id.
    GetMessage {
        message: MessageId,
    },
    /// The file of a message, cloud or secret, by the message's id (to show it before or
    /// without downloading it: its name, type, size and preview).
    FileOf {
        message: MessageId,
    },
    /// Send a file already uploaded, by its reference (as a forward does).
    SendFile {
        to: LookupQuery,
        file: FileRef,
        caption: Option<String>,
        reply_to: Option<MessageId>,
    },
    /// Download the file of a message to `out` (a file or a directory; default: its name in
    /// the node's working directory), verifying every part.
    Download {
        message: MessageId,
        out: Option<PathBuf>,
        /// Only these bytes (both ends included), from the parts that cover them.
        #[serde(default)]
        range: Option<ByteRange>,
    },
    /// Send a message again to someone else (a file without uploading it again).
    Forward {
        message: MessageId,
        to: LookupQuery,
    },
    /// The account's devices, with their keys' fingerprints and which ask for the history.
    Devices,
    /// Send the history to another device of the account (by its id, session id, or a part of
    /// its id only it has); progress comes as [`Event::Transfer`]s.
    ApproveDevice {
        device: String,
    },
    /// Sign another device of the account out.
    RemoveDevice {
        device: String,
    },
    /// Back the history up: to the relays, or (`out`) to a file. `new_code`: make a new
    /// recovery code (the first backup always does). `keep`: backups kept on the relays.
    BackupCreate {
        out: Option<PathBuf>,
        new_code: bool,
        keep: Option<u8>,
    },
    /// Restore a backup into this profile's history with its recovery code: the newest on the
    /// relays the code opens, or the file `from`.
    BackupRestore {
        code: String,
        from: Option<PathBuf>,
    },
    /// The account's backups on the relays.
    BackupList,
    /// Show the client node's periodic backups, set them (`every_secs`, `keep`), or end them
    /// (`off`).
    BackupSchedule {
        every_secs: Option<u64>,
        keep: Option<u8>,
        off: bool,
    },
    /// Starts a secret chat with one of `to`'s devices (by default the one that signed in last).
    SecretStart {
        to: LookupQuery,
        device: Option<String>,
    },
    /// `chat` in the secret calls: its id, a unique part of it, or `@name` / `+phone` for the
    /// open secret chat with that user.
    SecretAccept {
        chat: String,
    },
    SecretDecline {
        chat: String,
    },
    SecretClose {
        chat: String,
    },
    /// Sets the self-destruct timer (`None`: off).
    SecretTtl {
        chat: String,
        secs: Option<u32>,
    },
    /// Texts, or (with `file`) one caption for the file.
    SecretSend {
        chat: String,
        texts: Vec<String>,
        #[serde(default)]
        file: Option<FileRef>,
        reply_to: Option<MessageId>,
    },
    /// Uploads a file and sends it in a secret chat.
    SecretUpload {
        chat: String,
        path: PathBuf,
        caption: Option<String>,
    },
    SecretList,
    /// One secret chat, with its fingerprint once active.
    SecretInfo {
        chat: String,
    },
    /// Create a group with this account as admin; answered with its id (in `Group`).
    GroupCreate {
        title: String,
        members: Vec<LookupQuery>,
    },
    /// An admin's change to a group.
    GroupChange {
        group: GroupId,
        change: GroupChange,
    },
    /// A new invite link (admins).
    GroupLink {
        group: GroupId,
    },
    /// Ask to be let into a group with an invite link.
    Join {
        link: String,
    },
    GroupLeave {
        group: GroupId,
    },
    GroupInfo {
        group: GroupId,
    },
    GroupList,
    /// Create a channel with this account as admin: public (its link lets anyone read) or not.
    ChannelCreate {
        title: String,
        public: bool,
    },
    /// A channel's link (a public one's carries its key; a private one's is an invite).
    ChannelLink {
        channel: GroupId,
    },
    /// Subscribe with a channel's link or `@name`; `announce: false` reads a public channel
    /// without being counted as a subscriber.
    ChannelSubscribe {
        link: String,
        announce: bool,
    },
    /// Send one message with formatting or a keyboard (as bots do): a text, or a file
    /// already uploaded with its caption.
    SendRich {
        to: LookupQuery,
        text: String,
        file: Option<FileRef>,
        extras: Extras,
        reply_to: Option<MessageId>,
    },
    /// Change one of our messages as bots do: its text and formatting (when `text` is
    /// given) and its keyboard (always; none takes it away).
    EditRich {
        message: MessageId,
        text: Option<String>,
        extras: Extras,
    },
    /// Name a public channel `@name` (its admin), so that anyone reads it by name; with `off`,
    /// give the name up.
    ChannelName {
        channel: GroupId,
        name: String,
        #[serde(default)]
        off: bool,
    },
    /// Press a button of a bot's message (by its text): an inline button's press waits a
    /// little for the bot's answer; a reply keyboard's sends its text.
    Press {
        message: MessageId,
        button: String,
    },
    /// The presses of this account's buttons (a bot's) not answered yet.
    Presses,
    /// Answer a press of one of this account's buttons, once.
    AnswerPress {
        query: CallbackId,
        text: Option<String>,
        alert: bool,
    },
    /// Register this device's Web Push subscription with its mailbox relays, which then wake
    /// it up when something arrives while it is not connected.
    PushRegister {
        subscription: PushSubscription,
    },
    /// Remove it from the relays and the profile.
    PushUnregister,
    /// The subscription, and whether each mailbox relay holds it.
    PushStatus,
}

impl Call {
    /// The group the call acts on, if it names one.
    pub fn group(&self) -> Option<GroupId> {
        let query = match self {
            Call::Send { to, .. }
            | Call::SendRich { to, .. }
            | Call::Typing { to }
            | Call::Upload { to, .. }
            | Call::SendFile { to, .. }
            | Call::Forward { to, .. } => to,
            Call::Messages { chat: Some(chat), .. } | Call::History { chat, .. } => chat,
            Call::GroupChange { group, .. }
            | Call::GroupLink { group }
            | Call::GroupLeave { group }
            | Call::GroupInfo { group }
            | Call::ChannelLink { channel: group }
            | Call::ChannelName { channel: group, .. } => return Some(*group),
            _ => return None,
        };
        match query {
            LookupQuery::Group(group) => Some(*group),
            _ => None,
        }
    }

    /// Whether the call moves files, so runs on a task of its own (calls and messages are not
    /// held up behind it) and reports progress.
    pub fn is_transfer(&self) -> bool {
        matches!(
            self,
            Call::Upload { .. }
                | Call::UploadFile { .. }
                | Call::Download { .. }
                | Call::ApproveDevice { .. }
                | Call::BackupCreate { .. }
                | Call::BackupRestore { .. }
                | Call::SecretUpload { .. }
        )
    }
}

/// A node's answer to a [`Call`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// `Whoami`, `Renew`.
    Me(Me),
    /// `SetProfile`, `SetPassword`: the account as it now is.
    Account {
        account: Account,
    },
    /// `Lookup`.
    Card {
        card: UserCard,
    },
    /// `Sessions`.
    Sessions {
        sessions: Vec<SessionInfo>,
    },
    /// `RevokeSessions`: how many ended.
    Revoked {
        count: u32,
    },
    /// `CreateBot`, `RevokeBotToken`.
    BotToken {
        bot: Account,
        token: String,
    },
    /// `ListBots`.
    Bots {
        bots: Vec<Account>,
    },
    /// `Send`, `Messages`: messages, and how to call the people in them.
    Messages {
        messages: Vec<StoredMessage>,
        #[serde(with = "names_as_pairs")]
        names: Names,
        /// The secret chats' messages with the same people (never in `messages`).
        #[serde(default)]
        secret: Vec<SecretMessage>,
    },
    /// `Chats`, and how to call the people in them (the authors of groups' last messages).
    Chats {
        chats: Vec<ChatSummary>,
        #[serde(default, with = "names_as_pairs")]
        names: Names,
    },
    /// `Edit`, `Delete`: the message as it now is.
    Message {
        message: StoredMessage,
    },
    /// `Typing`.
    Done,
    /// `Subscribe`: events follow.
    Subscribed,
    /// `Download`.
    Downloaded(Downloaded),
    /// `BotCommands`.
    BotCommands {
        commands: Vec<BotCommandInfo>,
    },
    /// `UploadFile`.
    Uploaded {
        file: FileRef,
    },
    /// `FileOf`: the file, and whether it is a secret chat's (never kept nor cached).
    FileOf {
        file: FileRef,
        secret: bool,
    },
    /// `Devices`.
    Devices {
        devices: Vec<DeviceInfo>,
    },
    /// `ApproveDevice`.
    HistorySent(HistorySent),
    /// `RemoveDevice`: the device signed out.
    DeviceRemoved {
        device: DeviceInfo,
    },
    /// `BackupCreate`.
    BackupMade(BackupMade),
    /// `BackupRestore`: what the history gained.
    Restored(Imported),
    /// `BackupList`.
    Backups {
        backups: Vec<BackupListed>,
    },
    /// `BackupSchedule`: the schedule now (none: off).
    BackupSchedule {
        schedule: Option<BackupSchedule>,
    },
    SecretChat {
        chat: SecretChatInfo,
    },
    SecretChats {
        chats: Vec<SecretChatInfo>,
    },
    SecretMessages {
        messages: Vec<SecretMessage>,
    },
    /// `GroupCreate`, `GroupChange`, `GroupLeave`, `GroupInfo`.
    Group {
        group: GroupInfo,
    },
    Groups {
        groups: Vec<GroupInfo>,
    },
    /// `GroupLink`.
    GroupLink {
        link: String,
    },
    /// `Join`: asked; the group shows up once an admin's device lets this account in.
    JoinRequested {
        group: GroupId,
        admin: UserId,
    },
    /// `Press`.
    Pressed {
        pressed: Pressed,
    },
    /// `Presses`.
    Presses {
        presses: Vec<Press>,
    },
    /// `PushRegister`, `PushUnregister`, `PushStatus`: the profile's subscription (none once
    /// unregistered) and what each mailbox relay holds.
    Push {
        subscription: Option<PushSubscription>,
        relays: Vec<PushRelay>,
    },
}

/// Display names of the people a reply mentions, from cached directory cards.
pub type Names = BTreeMap<UserId, String>;

/// [`Names`] as `[[user_id, name], …]`: JSON object keys are strings, and a user id is a number.
mod names_as_pairs {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::Names;
    use crate::ids::UserId;

    pub(super) fn serialize<S: Serializer>(names: &Names, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(names.iter())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Names, D::Error> {
        Ok(Vec::<(UserId, String)>::deserialize(d)?.into_iter().collect())
    }
}

/// The signed-in account and this device's session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Me {
    pub account: Account,
    pub session_id: SessionId,
    pub device: PeerId,
    /// Unix seconds.
    pub cert_not_after: u64,
    /// Envelopes this profile dropped as definitively bad (forged, malformed), ever: never
    /// shown, only counted.
    #[serde(default)]
    pub dropped_envelopes: u64,
}

/// One chat in a chat list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatSummary {
    /// The other person, or the group's chat number (see `GroupId::chat_number`).
    pub chat: UserId,
    /// How to call them: name and @username, or the user id when nothing else is known; a
    /// group's title.
    pub name: String,
    pub messages: usize,
    pub last: StoredMessage,
    /// "private" or "group".
    #[serde(default)]
    pub kind: String,
    /// What a command takes for this chat: the user id, or the group id.
    #[serde(default)]
    pub id: String,
    /// Incoming messages not read yet.
    #[serde(default)]
    pub unread: usize,
    /// Of those, the ones that mention this account's @username.
    #[serde(default)]
    pub mentions: usize,
}

/// Something that happened on the node, pushed to every subscriber.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A message is new or changed here. `received`: it came from the network (a message, an
    /// edit, a receipt, a copy from another own device); otherwise this node sent or changed it.
    Message {
        message: StoredMessage,
        received: bool,
        #[serde(with = "names_as_pairs")]
        names: Names,
    },
    /// Someone is typing to us.
    Typing { user: UserId },
    /// The node reached its mailbox relays again (`connected`), or lost them (`detail` says why).
    Connection { connected: bool, detail: Option<String> },
    /// This subscriber was too slow and missed `missed` events (they are in the history).
    Lagged { missed: u64 },
    /// An upload or download went one part further.
    Transfer { progress: Progress },
    /// Another device of the account asks for the history (`devices approve` sends it).
    DeviceRequest { device: PeerId, device_name: String },
    /// A history sent by another device of the account was merged in.
    HistoryImported { imported: Imported },
    /// A secret message arrived, or the other side read one of ours.
    SecretMessage { message: SecretMessage },
    /// A secret chat was started by someone, accepted, declined, re-keyed or closed.
    SecretChat { chat: SecretChatInfo },
    /// A group is new here or changed (members, title, admins, pin), or this account left it.
    Group { group: GroupInfo },
    /// Someone pressed a button of one of this account's messages (a bot's).
    Press { press: Press },
    /// A bot answered one of this device's presses.
    PressAnswer { press: Press },
}

/// A failed call: a stable code (Telegram's RPC error names where one fits), a message for
/// people, and for rate limits how long to wait.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: String,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error without retry-after.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        ApiError { code: code.into(), message: message.into(), retry_after: None }
    }

    /// The caller's input was wrong.
    pub fn usage(message: impl Into<String>) -> Self {
        ApiError::new("USAGE", message)
    }

    /// A reply that does not belong to the call: a node of another version, or a bug.
    pub fn unexpected(call: &str, reply: &Reply) -> Self {
        ApiError::new("INTERNAL", format!("the node answered {call} with {reply:?}"))
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        let code = match &e {
            ClientError::Gateway(g) => {
                return ApiError {
                    code: g.code.to_string(),
                    message: g.message.clone(),
                    retry_after: g.retry_after_secs,
                };
            }
            ClientError::Net(_) | ClientError::Transport(_) => "NETWORK",
            ClientError::NotSignedIn => "NOT_SIGNED_IN",
            ClientError::GatewayAddress(_) => "USAGE",
            ClientError::Profile { .. } | ClientError::KeyFile(_) => "PROFILE",
            ClientError::BadCert(_) | ClientError::UnexpectedResponse(_) => "BAD_GATEWAY",
        };
        ApiError::new(code, e.to_string())
    }
}

impl From<MessagingError> for ApiError {
    fn from(e: MessagingError) -> Self {
        let code = match e {
            MessagingError::Client(e) => return e.into(),
            MessagingError::Refused(w) => {
                return ApiError { code: w.code.to_string(), message: w.message, retry_after: w.retry_after_secs };
            }
            MessagingError::Net(_) | MessagingError::NoRelay(_) => "NETWORK",
            MessagingError::History(_) => "PROFILE",
            MessagingError::Seal(_) => "E2E",
            MessagingError::TextTooLong | MessagingError::CaptionTooLong => "USAGE",
            MessagingError::NoDevices(_) => "NO_DEVICES",
            MessagingError::UnknownMessage(_) | MessagingError::NoFile(_) => "NOT_FOUND",
            MessagingError::File(_) => "FILE",
            MessagingError::ChunkUnavailable(_) => "NETWORK",
            MessagingError::BadFile(_) | MessagingError::MediaCrypto(_) => "BAD_FILE",
            MessagingError::NotYours(_) => "FORBIDDEN",
            MessagingError::UnknownDevice(_) => "NOT_FOUND",
            MessagingError::BackupKey(crate::crypto::backup::BackupKeyError::WrongCode) => "WRONG_CODE",
            MessagingError::BackupKey(crate::crypto::backup::BackupKeyError::BadCode) => "USAGE",
            MessagingError::BackupKey(_) => "PROFILE",
            MessagingError::BadBackup(_) => "BAD_BACKUP",
            MessagingError::NoBackup(_) => "NOT_FOUND",
            MessagingError::BadExtras(_) | MessagingError::BadPush(_) => "USAGE",
            MessagingError::NoButton { .. } => "NO_BUTTON",
            MessagingError::NoCallback(_) => "QUERY_TOO_OLD",
            MessagingError::Group(ref e) => match e {
                GroupError::Unknown(_) => "NOT_FOUND",
                GroupError::NotMember(_) | GroupError::NotAdmin { .. } | GroupError::LinkNotOpen(_) => "FORBIDDEN",
                GroupError::Invalid(_) | GroupError::BadLink(_) => "USAGE",
            },
            MessagingError::Secret(ref e) => match e {
                SecretError::Unknown(_) => "NOT_FOUND",
                SecretError::Ambiguous(_) | SecretError::BadTtl | SecretError::WithYourself => "USAGE",
                SecretError::WrongState { .. } => "SECRET_STATE",
                SecretError::NoForwarding => "FORBIDDEN",
                SecretError::Store { .. } => "PROFILE",
            },
        };
        ApiError::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_read_as_json_lines() {
        let call: Call = serde_json::from_str(r#"{"call":"send","to":{"UserId":7},"texts":["hi"],"reply_to":null}"#)
            .expect("a send call parses");
        assert_eq!(call, Call::Send { to: LookupQuery::UserId(UserId(7)), texts: vec!["hi".into()], reply_to: None });
        let line = serde_json::to_string(&Call::Whoami).expect("serializes");
        assert_eq!(line, r#"{"call":"whoami"}"#);
        assert!(serde_json::from_str::<Call>(r#"{"call":"format_disk"}"#).is_err());
    }

    #[test]
    fn replies_with_names_round_trip_through_json() {
        let reply = Reply::Messages {
            messages: Vec::new(),
            names: [(UserId(7), "Alice (@alice)".into())].into(),
            secret: Vec::new(),
        };
        let line = serde_json::to_string(&reply).expect("serializes");
        assert_eq!(serde_json::from_str::<Reply>(&line).expect("parses"), reply);
    }
}
