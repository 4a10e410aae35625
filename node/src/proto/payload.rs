//! What travels sealed inside an envelope: the content layer, apart from the transport (relays
//! never see it). Chat messages, edits, deletes, receipts and typing notices today; media
//! references, secret-chat and group messages join as new variants (the enums only grow).

use serde::{Deserialize, Serialize};

use crate::ids::UserId;

/// Longest message text, in characters (Telegram's limit).
pub const MAX_TEXT_CHARS: usize = 4096;

crate::ids::time_ordered_id! {
    /// One message, shared by every device's copy of it (each copy travels in its own envelope
    /// with its own [`EnvelopeId`](crate::proto::envelope::EnvelopeId)).
    MessageId
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
}

/// How far an outgoing message got; for incoming ones, whether we have read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Stored durably by the relays (outgoing) / received here (incoming).
    Sent,
    /// Reached one of the recipient's devices.
    Delivered,
    /// The recipient (or, for incoming, this user) has read it.
    Read,
}
