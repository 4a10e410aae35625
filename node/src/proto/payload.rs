//! What travels sealed inside an envelope: the content layer, apart from the transport (relays
//! never see it). Chat messages, edits, deletes, receipts and typing notices today; media
//! references, secret-chat and group messages join as new variants (the enums only grow).

use serde::{Deserialize, Serialize};

use crate::ids::UserId;
use crate::proto::group::{GroupId, GroupState};
use crate::proto::media::FileRef;
use crate::proto::rich::{CallbackId, Extras};

/// Longest message text, in characters (Telegram's limit).
pub const MAX_TEXT_CHARS: usize = 4096;

crate::ids::time_ordered_id! {
    /// One message, shared by every device's copy of it (each copy travels in its own envelope
    /// with its own [`EnvelopeId`](crate::proto::envelope::EnvelopeId)).
    MessageId
}

crate::ids::time_ordered_id! {
    /// One secret chat: between one device of each side (see `client::secret`).
    SecretChatId
}

/// What travels sealed inside an envelope. Append-only, like every wire enum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    /// Shared by every device's copy of the message.
    pub message_id: MessageId,
    /// The other person in the conversation, from the sender's side (for sync copies).
    pub chat_with: UserId,
    pub body: Body,
}

/// What a payload says. Append-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// A new message.
    Text { text: String, reply_to: Option<MessageId> },
    /// The author changed the text of an earlier message.
    Edit { message: MessageId, text: String },
    /// The author deleted earlier messages (for everyone).
    Delete { messages: Vec<MessageId> },
    /// The recipient's device got, or its user read, these messages.
    Receipt { status: Status, messages: Vec<MessageId> },
    /// The sender is typing in this chat; never stored.
    Typing,
    /// A file: its reference (keys included) and an optional caption. A forward sends the
    /// same reference again, so nothing is uploaded twice.
    File { file: FileRef, caption: Option<String>, reply_to: Option<MessageId> },
    /// A device that just signed in asks the account's other devices for the history; a user
    /// approves it on one of them. Only from the account's own devices.
    HistoryRequest { device_name: String },
    /// The history, for the one device it is sealed to: an export in the chunk store (its
    /// reference carries the key). Only from the account's own devices.
    History { file: FileRef, messages: u64 },
    /// The sender's devices changed: look its card up again (the gateway's card is what is
    /// trusted; this only says when to look).
    DevicesChanged,
    /// The first message of a secret chat's Noise `IK` handshake (generation 0 starts the
    /// chat, later ones re-key it), for the one device it is sealed to.
    SecretHandshake { chat: SecretChatId, generation: u32, message: Vec<u8> },
    /// The responder's answer to that handshake: it completes it.
    SecretReply { chat: SecretChatId, generation: u32, message: Vec<u8> },
    /// The responder declined the secret chat.
    SecretDecline { chat: SecretChatId },
    /// A group's state and its current epoch key, from one of its admins, for one member
    /// device; admins' devices also get the admin key's seed.
    GroupState {
        state: Box<GroupState>,
        #[serde(with = "crate::ids::hex_or_bytes")]
        epoch_key: [u8; 32],
        admin_seed: Option<Seed>,
        /// The admins' certificate of the epoch's post key, which members post under.
        cert: crate::proto::group::PostCert,
    },
    /// An admin removed the recipient from the group (in the state of this version).
    GroupRemoved { group: GroupId, version: u64 },
    /// The sender asks the recipient, an admin, to let them in with an invite link's secret.
    GroupJoin {
        group: GroupId,
        #[serde(with = "crate::ids::hex_or_bytes")]
        secret: [u8; 16],
    },
    /// The sender, a member, leaves the group; the recipient, an admin, re-keys it without them.
    GroupLeave { group: GroupId },
    /// Posted in a group after its state changed, under the new epoch (so that relays learn
    /// it, and refuse the old one); members show the change from the state itself.
    GroupChanged { version: u64 },
    /// Posted in a channel (by an admin, as every channel post): its state, for subscribers,
    /// who are not sent it pairwise.
    ChannelState { state: Box<GroupState> },
    /// The sender subscribes to (or leaves) a public channel; to the admin's device that counts.
    ChannelSubscribe { channel: GroupId, on: bool },
    /// A new message with formatting or a keyboard (as bots send): a text, or a file with
    /// its caption.
    Rich { text: String, reply_to: Option<MessageId>, file: Option<Box<FileRef>>, extras: Box<Extras> },
    /// The author changed an earlier message: its text and formatting (when `text` is given)
    /// and its keyboard (always; none takes it away).
    EditRich { message: MessageId, text: Option<String>, extras: Box<Extras> },
    /// The sender pressed an inline button of the recipient's message, which carried `data`.
    Callback { query: CallbackId, message: MessageId, data: String },
    /// The recipient of a [`Body::Callback`] answers it: a notice or (`alert`) an alert.
    CallbackAnswer { query: CallbackId, text: Option<String>, alert: bool },
}

/// A 32-byte secret key seed.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seed(#[serde(with = "crate::ids::hex_or_bytes")] pub [u8; 32]);

impl std::fmt::Debug for Seed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Seed(..)")
    }
}

/// How far an outgoing message got; for incoming ones, whether we have read it. Ordered by how
/// far along (`Pending` first), whatever the order of the variants on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Stored durably by the relays (outgoing) / received here (incoming).
    Sent,
    /// Reached one of the recipient's devices.
    Delivered,
    /// The recipient (or, for incoming, this user) has read it.
    Read,
    /// Outgoing, in this device's outbox: no relay could take it yet. Never sent in a receipt.
    Pending,
}

impl Status {
    fn progress(self) -> u8 {
        match self {
            Status::Pending => 0,
            Status::Sent => 1,
            Status::Delivered => 2,
            Status::Read => 3,
        }
    }
}

impl PartialOrd for Status {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Status {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.progress().cmp(&other.progress())
    }
}
