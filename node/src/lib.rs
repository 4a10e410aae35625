//! Meshgram's core: what every role (client, gateway, relay, bot bridge) builds on.
//!
//! Layout, in the order a request flows through it:
//! - [`ids`]: typed identifiers and validated user input (`UserId`, `Phone`, `Username`, …).
//! - [`identity`]: the device's ed25519 key (its `PeerId`) and its signed X25519 Noise key.
//! - [`cert`]: gateway-signed session certificates, verified offline by relays.
//! - [`envelope`]: what relays store and forward — routing fields plus a sealed payload.
//! - [`e2e`]: end-to-end sealing with Noise X (`snow`), so relays only ever hold ciphertext.
//! - [`protocol`]: the wire spec — protocol names, size limits, request/response enums.
//! - [`codec`]: length-prefixed postcard framing with limits, for the gateway's request-response
//!   protocol.
//! - [`placement`]: which relays hold a mailbox (Kademlia-closest), computed alike by relays
//!   and clients.
//! - [`pipe`]: many tagged requests over one long-lived stream, for the mailbox and replica
//!   protocols (where per-request streams cost more than the work).
//! - [`transport`]: the libp2p stack (QUIC + TCP/Noise/Yamux) and listening helpers.
//! - [`behaviour`]: the `NetworkBehaviour` shared by the gateway and its clients.
//! - [`net`]: the client's network actor; one task owns the `Swarm`, callers hold a handle.
//! - [`client`]: profile, saved session and typed gateway calls, used by the CLI and later the
//!   app and bot bridge.
//! - [`limits`]: in-memory token buckets for rate limits that answer with a retry-after.
//! - [`messaging`]: cloud chats — seal per device, send via relays, fetch, verify, acknowledge.
//! - [`history`]: the client's redb — messages, seen envelope ids, send counters, cached cards.
//! - [`network_file`]: `network.json`, written by `meshgram up`.
//! - [`service`]: what every server binary's `main` shares (logging, ready line, stop signals).
//! - [`defaults`]: shared tunables and why they have their values.

pub mod behaviour;
pub mod cert;
pub mod client;
pub mod codec;
pub mod defaults;
pub mod e2e;
pub mod envelope;
pub mod history;
pub mod identity;
pub mod ids;
pub mod limits;
pub mod messaging;
pub mod net;
pub mod network_file;
pub mod pipe;
pub mod placement;
pub mod protocol;
pub mod service;
pub mod transport;
