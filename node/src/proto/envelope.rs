//! Envelopes: what relays store and forward. Routing fields in the clear, content sealed end to
//! end for one recipient device (see `e2e`).
//!
//! There is no per-envelope signature: the entry relay knows the sender from the authenticated
//! connection and its certificate, and the recipient learns the sender's Noise key from the
//! sealed message itself (Noise X transmits and authenticates it) and checks it against the
//! sender's directory card. A relay that rewrote routing fields would make the recipient reject
//! the envelope, not believe it.

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::ids::UserId;

crate::ids::time_ordered_id! {
    /// An id chosen by the sender; relays and recipients deduplicate by it.
    ///
    /// The first 6 bytes are the sender's clock in milliseconds (big-endian), the other 10 random
    /// (like a UUIDv7): ids made at about the same time sort together, so a relay's id index grows
    /// at its end instead of touching a random B-tree page per envelope. Relays never trust the
    /// time part; a client that picks ids otherwise only makes its own writes slower.
    EnvelopeId
}

/// Which conversation something belongs to, and of which kind (the enum only grows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ChatId {
    /// A one-to-one chat with this user (from the reader's side: the other person).
    User(UserId),
    /// A group: members post, everyone reads.
    Group(crate::proto::group::GroupId),
}

/// One sealed message for one device's mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: EnvelopeId,
    /// The sending account and device (checked by the entry relay against the connection).
    pub from_user: UserId,
    pub from_device: PeerId,
    /// The receiving account and device; the device's key names the mailbox.
    pub to_user: UserId,
    pub to_device: PeerId,
    /// Sender's clock, unix milliseconds.
    pub sent_at_ms: u64,
    /// Per (sender device, recipient device) counter: recipients order by it.
    pub seq: u64,
    /// Noise X message (see `crypto::seal`).
    #[serde(with = "crate::ids::hex_or_bytes")]
    pub sealed: Vec<u8>,
}

impl Envelope {
    /// Encoded size on the wire and on disk.
    pub fn encoded_len(&self) -> usize {
        postcard::experimental::serialized_size(self).unwrap_or(usize::MAX)
    }
}
