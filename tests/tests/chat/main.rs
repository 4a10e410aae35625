//! Cross-process tests of cloud chats: real gateway, real relays, real `meshgram` CLI.
//!
//! - `admission`: only gateway-certified relays may store or delete replicas or are given
//!   any; a relay without a certificate does not start.
//! - `basic`: two users chat through three relays; replies; sync to the sender's other device.
//! - `durability`: an offline recipient gets 1,000 messages exactly once and in order, with a
//!   relay killed by SIGKILL while they are being sent; relays' files hold no plaintext; a
//!   relay SIGKILLed right after acknowledging has everything when it restarts; a relay
//!   acknowledges only with R durable copies (or when the operator allowed fewer); a stopped
//!   (SIGSTOP) replica costs a send seconds, not a minute, and loses nothing; a relay whose
//!   disk fills (a small tmpfs; skipped unless root) acknowledges nothing after the failed write,
//!   says so on `/healthz` and in its metrics, exits once there is room again, does not start
//!   while the disk is full, and restarted has everything it acknowledged.
//! - `hostile`: a peer that reads no answers, pipes that never greet or announce 16 MiB and
//!   send a KiB, many pipes on one connection, a flood of connections from one address: each
//!   bounded in the relay's memory and descriptors, with honest clients served meanwhile.
//! - `features`: edits, deletes, delivery and read receipts, typing, `messages --follow`.
//! - `node`: the client node — the CLI through its socket with the same output, `--follow` by
//!   push, one node per profile, SIGKILL and restart, garbage on the socket, other users refused.
//! - `repair`: a dead relay's copies are back on `R` live relays before a second one dies;
//!   relays that come back get what they missed; stale copies never show twice.
//! - `resilience`: with the gateway stopped, known contacts still chat, and an envelope that
//!   cannot be verified yet is kept and shown once the gateway is back.
//! - `revocation`: a revoked session or a replaced bot token loses relay access within seconds
//!   (a parked fetch, sends, a fresh Hello); a revoked relay gets no new copies and its replica stores are refused; a
//!   stopped gateway stops neither serving nor, once it is back, revocations.
//! - `wire`: bad input straight at a relay (forged, expired and misused certificates, sender
//!   spoofing, oversized envelopes, replays, garbage); the relay keeps serving.

// A failed unwrap here is a failed test, which is what it should be.
#![allow(clippy::unwrap_used)]

mod admission;
mod altered;
mod basic;
mod durability;
mod features;
mod hostile;
mod node;
mod repair;
mod resilience;
mod revocation;
mod wire;

const ALICE: &str = "+15550001111";
const BOB: &str = "+15550002222";
