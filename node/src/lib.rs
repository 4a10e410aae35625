//! Meshgram's core: what every role (client, gateway, relay, bot bridge) builds on, and the
//! client that users and bots run.
//!
//! # Shared core (every role; never imports the client)
//! - [`ids`]: typed identifiers, validated user input, the one clock (`now_ms`).
//! - [`crypto`]: device identity, gateway-signed certificates, end-to-end sealing.
//! - [`proto`]: the wire spec — one module per protocol, the envelope, and the sealed payload.
//! - [`net`]: transport, shared behaviour, framing, pipes, mailbox placement.
//! - [`server`]: what only servers use (rate limits, the ready line and stop signals).
//! - [`network_file`]: `network.json`, written by `meshgram up`.
//! - [`defaults`]: shared tunables and why they have their values.
//!
//! # Client (a leaf: the `meshgram` binary and the bot bridge)
//! - [`client`]: session, network actor, history, messaging, and the client node.
//!
//! A request from the CLI flows: `bin/meshgram/cli` → `client` (node or a one-off open of the
//! profile) → `client::messaging` → `crypto::seal` → `proto` → `net::pipe` → a relay.

pub mod client;
pub mod crypto;
pub mod defaults;
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
pub mod net;
pub mod network_file;
pub mod proto;
pub mod server;
