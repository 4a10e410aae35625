//! Harness for Meshgram's cross-process tests: start the real binaries, drive them through their
//! command lines, kill them.
//!
//! Layout, in the order a test uses it (everything is re-exported here, so tests write
//! `use meshgram_tests::{Gateway, meshgram, ...}`):
//! - [`bins`]: [`bin_path`], where `cargo build` put a binary (`target/<profile>/<name>`, under
//!   [`target_dir`]), and the binaries' names.
//! - [`server`]: [`Server`] (and [`start_node`] for `meshgram node`), a long-running binary that prints a JSON ready line on stdout; its
//!   stderr goes to the test's output (shown when the test fails); SIGKILLed on drop.
//! - [`gateway`]: [`Gateway`] (built by [`GatewayBuilder`]), a `meshgram-gateway` in its own temp
//!   dir with a code sink, and sign-in helpers that type the code the gateway "texted" into
//!   `meshgram login`.
//! - [`mesh`]: [`Mesh`], a gateway and N relays on loopback, each relay admitted with a relay
//!   certificate.
//! - [`up`]: [`Up`], a whole network started with `meshgram up`, whose roles a test can
//!   SIGKILL and watch come back.
//! - [`cli`]: [`run`], [`meshgram`], [`meshgram_stdin`], [`CliChild`]: one-shot commands under a
//!   hard timeout, returning a [`CliOutput`] whose `--json` result or error the test inspects.
//! - [`codes`]: [`read_codes`], [`wait_code`], the file code sink; [`WebhookSink`], a local HTTP
//!   server standing in for an SMS provider.
//! - [`http`]: [`http_get`], a minimal blocking HTTP/1 GET for the health and metrics endpoints.
//! - [`metrics`]: [`Scrape`], a `/metrics` parsed by a real OpenMetrics parser, and
//!   [`documented_metrics`], the names an operator doc lists.
//! - [`files`]: [`random_file`] and [`blake3_of_file`], for files that round-trip.
//! - [`postgres`]: [`Postgres`], a throwaway PostgreSQL cluster on a unix socket, for gateways
//!   that share a database.
//! - [`raw`]: [`RawClient`], a device speaking the relay protocols with certificates the test signs.
//! - [`output`]: reading what commands printed ([`array`], [`str_field`], [`texts`], ...).
//!
//! Every wait is bounded, so a hung binary fails its test instead of hanging the suite.

mod bins;
mod cli;
mod codes;
mod files;
mod gateway;
mod http;
mod mesh;
mod metrics;
mod output;
mod postgres;
mod raw;
mod server;
mod up;

use std::time::Duration;

pub use bins::{BRIDGE_BIN, CLI_BIN, GATEWAY_BIN, RELAY_BIN, bin_path, target_dir};
pub use cli::{
    CLI_TIMEOUT, CliChild, CliOutput, dropped_envelopes, json_lines, meshgram, meshgram_stdin, run, spawn_meshgram,
    whoami_user_id,
};
pub use codes::{CODE_TIMEOUT, WebhookSink, read_codes, wait_code, wrong_code};
pub use files::{blake3_of_file, random_file};
pub use gateway::{Gateway, GatewayBuilder};
pub use http::{http_get, http_post};
pub use mesh::{Mesh, files_under, inspect_relay, relay_metric, start_relay, wait_repair_settled};
pub use metrics::{Scrape, documented_metrics};
pub use output::{array, is_bot_token, str_field, texts, u64_field};
pub use postgres::Postgres;
pub use raw::{RawClient, RawPeer, frame, frame_header, read_answer};
pub use server::{READY_TIMEOUT, Server, start_node, start_node_as};
pub use up::{RESTART_TIMEOUT, Roles, Up};

/// Seconds since the Unix epoch.
pub use meshgram_node::crypto::cert::unix_now;

/// How often bounded waits look again.
const POLL: Duration = Duration::from_millis(20);
