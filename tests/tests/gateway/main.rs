//! Cross-process tests of `meshgram-gateway` driven through the `meshgram` CLI.
//!
//! One test binary (so `--test-threads` parallelizes across all of it), one module per concept:
//! - `sessions`: sign-in, lookups, devices and session revocation.
//! - `codes`: wrong, reused and expired codes, attempt lockout, code-request flood limits.
//! - `profiles`: usernames, display names and 2FA passwords.
//! - `bots`: bots created by users and by the operator, bot tokens.
//! - `durability`: kill -9 and restart on the same data.
//! - `postgres`: gateways on PostgreSQL: two on one database, and `migrate` from redb.
//! - `sinks_and_http`: webhook code delivery, ready line, health and metrics.
//! - `cli_errors`: client-side failures (no session, bad address, dead gateway).
//! - `wire`: garbage, oversized frames and non-libp2p bytes sent straight at the gateway.
//!
//! Each test starts its own gateway on port 0 in a temp dir (see `meshgram_tests::Gateway`), so
//! tests are independent. Build the binaries first: `cargo build --workspace --bins`.

// A failed unwrap here is a failed test, which is what it should be.
#![allow(clippy::unwrap_used)]

mod bots;
mod cli_errors;
mod codes;
mod durability;
mod postgres;
mod profiles;
mod sessions;
mod sinks_and_http;
mod wire;

use std::path::Path;

use meshgram_tests::{array, meshgram};
use serde_json::Value;

/// Phone numbers of the cast. Every test has its own gateway, so they never collide.
const ALICE: &str = "+15550001111";
const BOB: &str = "+15550002222";
const CAROL: &str = "+15550003333";

/// `meshgram sessions` on `profile`, as a list.
fn sessions(profile: &Path) -> Vec<Value> {
    array(&meshgram(profile, &["sessions"]).ok_json(), "sessions")
}

/// `meshgram lookup QUERY` on `profile`.
fn lookup(profile: &Path, query: &str) -> Value {
    meshgram(profile, &["lookup", query]).ok_json()
}

/// The peer ids on a user card.
fn card_devices(card: &Value) -> Vec<Value> {
    array(&card["devices"], "card devices").iter().map(|d| d["peer_id"].clone()).collect()
}
