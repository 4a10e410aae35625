//! The client: a signed-in device. A leaf of the crate: only the `meshgram` binary and the bot
//! bridge use it; the shared core never does (`tests/run` checks).
//!
//! - [`session`]: the profile's saved session, where the gateway is, typed gateway calls.
//! - [`net`]: the client's network actor; one task owns the `Swarm`, callers hold a handle.
//! - [`history`]: the client's redb — messages, seen envelope ids, send counters, cached cards.
//! - [`messaging`]: cloud chats — seal per device, send via relays, fetch, verify, acknowledge.
//! - [`buttons`]: bots' keyboards — presses of inline buttons and the bots' answers.
//! - [`devices`]: the account's devices, and the history moving to a new one on approval.
//! - [`backup`]: encrypted backups of the history, opened with a recovery code.
//! - [`secret`]: secret chats — one device each side, Noise IK sessions, self-destructing messages.
//! - [`groups`]: groups — state by admins, an epoch key per membership, messages stored once.
//! - [`media`]: files — resumable uploads in encrypted parts, downloads from any holder.
//! - [`push`]: this device's Web Push endpoint, registered with its mailbox relays.
//! - [`node`]: the client node — a running device that receives, renews, and answers calls.
//! - [`api`]: the node's calls, replies, errors and events, shared by every front end.
//! - [`control`]: the node's local control socket (0600, same user only) and its client.

pub mod api;
pub mod backup;
pub mod buttons;
pub mod control;
pub mod devices;
pub mod groups;
pub mod history;
pub mod media;
pub mod messaging;
pub mod net;
pub mod node;
pub mod push;
pub mod secret;
pub mod session;

pub use session::{Client, ClientError, GatewayAddr, SESSION_FILE, SavedSession, public_key_of};
