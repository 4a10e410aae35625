//! What only the servers (gateway, relays, bot bridge) use.
//!
//! - [`limits`]: in-memory token buckets for rate limits that answer with a retry-after.
//! - [`public_http`]: HTTP clients that reach public addresses only (bots' file URLs, push).
//! - [`service`]: what every long-running binary's `main` shares (logging, ready line, stop
//!   signals); the `meshgram node` binary uses it too.

pub mod limits;
pub mod public_http;
pub mod service;
