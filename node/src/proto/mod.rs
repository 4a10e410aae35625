//! Wire spec in code: protocol names, size limits, and the messages of each protocol.
//!
//! Goals: every message is bounded; enums only ever grow (new variants at the end), so old
//! peers keep decoding what they knew; errors are data, not dropped streams.
//! Non-goals: human-readable encoding (postcard is compact and fast; see `net::codec`).
//!
//! - [`auth`]: `/meshgram/auth/1`, client ↔ gateway.
//! - [`mailbox`]: `/meshgram/mailbox/1`, client ↔ relay, and `/meshgram/replica/1`, relay ↔ relay.
//! - [`media`]: `/meshgram/media/1`, client ↔ relay: uploads in parts, chunks by hash.
//! - [`envelope`]: what relays store and forward (routing fields + sealed bytes).
//! - [`group`]: group messages as relays store and check them (one copy per group).
//! - [`payload`]: what is sealed inside an envelope; only the two ends ever read it.
//! - [`rich`]: formatting and keyboards of messages, as bots send them.
//! - [`error`]: refusals, shared by every protocol.

pub mod auth;
pub mod envelope;
pub mod error;
pub mod group;
pub mod mailbox;
pub mod media;
pub mod payload;
pub mod rich;

pub use auth::*;
pub use error::*;
pub use mailbox::*;
