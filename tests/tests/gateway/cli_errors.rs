//! Failures the CLI reports itself: no session, an address it cannot use, a gateway that is
//! gone. Each must end promptly with exit status 1 and a JSON error.

use std::time::{Duration, Instant};

use meshgram_tests::{CliOutput, Gateway, meshgram, meshgram_stdin};

use crate::{ALICE, BOB};

/// Longer than a refused TCP connect ever takes, shorter than the harness's kill timeout: a
/// dead gateway must be reported, not waited on.
const FAIL_FAST: Duration = Duration::from_secs(35);

/// Runs `f`, asserting it took less than [`FAIL_FAST`].
fn promptly(f: impl FnOnce() -> CliOutput) -> CliOutput {
    let started = Instant::now();
    let out = f();
    assert!(started.elapsed() < FAIL_FAST, "took {:?}:\n{out}", started.elapsed());
    out
}

#[test]
fn commands_without_a_session_say_not_signed_in() {
    let dir = tempfile::tempdir().expect("temp dir");
    for command in [&["whoami"][..], &["renew"], &["sessions"], &["lookup", "@alice"], &["bot", "list"]] {
        meshgram(dir.path(), command).expect_err(&["NOT_SIGNED_IN"]);
    }
}

#[test]
fn gateway_address_without_peer_id_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = promptly(|| {
        meshgram_stdin(dir.path(), &["login", "--gateway", "/ip4/127.0.0.1/tcp/1", "--phone", ALICE], "12345\n")
    });
    out.expect_err(&["USAGE", "NETWORK"]);
    meshgram(dir.path(), &["whoami"]).expect_err(&["NOT_SIGNED_IN"]);
}

#[test]
fn unreachable_gateway_is_a_prompt_network_error() {
    let mut gw = Gateway::start();
    let alice_p = gw.new_profile("alice");
    gw.login(&alice_p, ALICE);
    let addr = gw.addr();
    gw.kill9();

    promptly(|| meshgram(&alice_p, &["whoami"])).expect_err(&["NETWORK"]);
    let bob_p = gw.new_profile("bob");
    promptly(|| meshgram_stdin(&bob_p, &["login", "--gateway", &addr, "--phone", BOB], "12345\n"))
        .expect_err(&["NETWORK"]);
    meshgram(&bob_p, &["whoami"]).expect_err(&["NOT_SIGNED_IN"]);
}
