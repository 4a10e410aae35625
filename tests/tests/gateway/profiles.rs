//! What a user may call themselves, and the 2FA password that guards new devices.

use meshgram_tests::{Gateway, meshgram, meshgram_stdin};
use serde_json::Value;

use crate::{ALICE, BOB, lookup};

#[test]
fn usernames_are_unique_case_insensitively() {
    let gw = Gateway::start();
    let (alice_p, bob_p) = (gw.new_profile("alice"), gw.new_profile("bob"));
    let alice = gw.login(&alice_p, ALICE);
    let bob = gw.login(&bob_p, BOB);

    meshgram(&alice_p, &["profile", "set", "--username", "alice"]).ok_json();
    for taken in ["alice", "ALICE", "Alice"] {
        meshgram(&bob_p, &["profile", "set", "--username", taken]).expect_err(&["USERNAME_OCCUPIED"]);
    }
    let me = meshgram(&bob_p, &["whoami"]).ok_json();
    assert_eq!(me["account"]["username"], Value::Null, "a refused change changes nothing: {me}");

    // Removing a username frees it.
    let account = meshgram(&alice_p, &["profile", "set", "--username", ""]).ok_json();
    assert_eq!(account["username"], Value::Null, "{account}");
    let account = meshgram(&bob_p, &["profile", "set", "--username", "ALICE"]).ok_json();
    assert_eq!(account["username"], "ALICE", "stored as typed: {account}");
    let card = lookup(&alice_p, "@ALICE");
    assert_eq!(card["user_id"], bob["user_id"], "{card}");
    let card = lookup(&bob_p, &alice["user_id"].to_string());
    assert_eq!(card["username"], Value::Null, "{card}");
}

#[test]
fn user_usernames_may_not_look_like_bots() {
    let gw = Gateway::start();
    let alice_p = gw.new_profile("alice");
    gw.login(&alice_p, ALICE);
    for botlike in ["alice_bot", "AliceBot", "alicebot"] {
        meshgram(&alice_p, &["profile", "set", "--username", botlike]).expect_err(&["USERNAME_INVALID"]);
    }
    // Malformed names may be caught by the CLI before the gateway sees them.
    for malformed in ["ab", "1alice", "alice_", "ali-ce", &"a".repeat(33)] {
        meshgram(&alice_p, &["profile", "set", "--username", malformed]).expect_err(&["USERNAME_INVALID", "USAGE"]);
    }
    let me = meshgram(&alice_p, &["whoami"]).ok_json();
    assert_eq!(me["account"]["username"], Value::Null, "{me}");
}

#[test]
fn display_names_are_bounded_in_characters() {
    let gw = Gateway::start();
    let alice_p = gw.new_profile("alice");
    gw.login(&alice_p, ALICE);
    // (name, accepted): 64 characters is the limit, counted in characters, not bytes.
    let cases = [
        (String::new(), false),
        ("A".to_string(), true),
        ("x".repeat(64), true),
        ("x".repeat(65), false),
        ("é".repeat(64), true),
        ("é".repeat(65), false),
    ];
    for (name, accepted) in cases {
        let out = meshgram(&alice_p, &["profile", "set", "--name", &name]);
        if accepted {
            assert_eq!(out.ok_json()["name"], name.as_str(), "{out}");
        } else {
            out.expect_err(&["NAME_INVALID"]);
        }
    }
    let me = meshgram(&alice_p, &["whoami"]).ok_json();
    assert_eq!(me["account"]["name"], "é".repeat(64), "the last accepted name stays: {me}");
}

#[test]
fn two_factor_password_guards_new_devices() {
    let gw = Gateway::builder().config("[limits]\nsend_code_burst = 20\n").start();
    let alice_p = gw.new_profile("alice");
    let alice = gw.login(&alice_p, ALICE);

    // Asked for on stdin: a password never has to be on the command line.
    let account = meshgram_stdin(&alice_p, &["password", "set"], "hunter22\n").ok_json();
    assert_eq!(account["has_password"], true, "{account}");
    meshgram(&alice_p, &["password", "set", "--new", "other-pw", "--current", "wrong-pw"])
        .expect_err(&["PASSWORD_HASH_INVALID"]);

    // Code, then a wrong password on the next stdin line.
    let wrong_p = gw.new_profile("alice-wrong");
    gw.login_with(&wrong_p, ALICE, &[], |code| vec![code.to_string(), "not-hunter22".to_string()])
        .expect_err(&["PASSWORD_HASH_INVALID"]);
    meshgram(&wrong_p, &["whoami"]).expect_err(&["NOT_SIGNED_IN"]);

    // Code, then the right password on stdin.
    let stdin_p = gw.new_profile("alice-stdin");
    let login = gw.login_with(&stdin_p, ALICE, &[], |code| vec![code.to_string(), "hunter22".to_string()]).ok_json();
    assert_eq!(login["user_id"], alice["user_id"], "{login}");
    assert_eq!(login["account"]["has_password"], true, "{login}");

    // The password as a flag.
    let flag_p = gw.new_profile("alice-flag");
    let login = gw.login_with(&flag_p, ALICE, &["--password", "hunter22"], |code| vec![code.to_string()]).ok_json();
    assert_eq!(login["user_id"], alice["user_id"], "{login}");
    let me = meshgram(&flag_p, &["whoami"]).ok_json();
    assert_eq!(me["account"]["has_password"], true, "{me}");

    meshgram(&alice_p, &["password", "clear", "--current", "wrong-pw"]).expect_err(&["PASSWORD_HASH_INVALID"]);
    let account = meshgram_stdin(&alice_p, &["password", "clear"], "hunter22\n").ok_json();
    assert_eq!(account["has_password"], false, "{account}");

    // Without a password the code alone is enough again.
    let after_p = gw.new_profile("alice-after");
    let login = gw.login(&after_p, ALICE);
    assert_eq!(login["user_id"], alice["user_id"], "{login}");
    assert_eq!(login["account"]["has_password"], false, "{login}");
}

#[test]
fn wrong_passwords_lock_the_account_whatever_the_device_and_the_lockout_survives_a_restart() {
    let limits = "[limits]\nsend_code_burst = 20\nmax_password_attempts = 3\npassword_lockout_secs = 600\n";
    let mut gw = Gateway::builder().config(limits).start();
    let alice_p = gw.new_profile("alice");
    gw.login(&alice_p, ALICE);
    meshgram(&alice_p, &["password", "set", "--new", "hunter22"]).ok_json();

    // Each guess from a fresh device (devices are free) counts against the account.
    for i in 0..3 {
        let guesser = gw.new_profile(&format!("guesser-{i}"));
        gw.login_with(&guesser, ALICE, &[], |code| vec![code.to_string(), format!("guess-{i}")])
            .expect_err(&["PASSWORD_HASH_INVALID"]);
    }
    // Now not even the right password gets in, from any device, for the lockout.
    let owner = gw.new_profile("alice-new-phone");
    let wait =
        gw.login_with(&owner, ALICE, &[], |code| vec![code.to_string(), "hunter22".to_string()]).expect_flood_wait(600);
    assert!(wait > 500, "locked for the configured lockout: {wait} s");
    meshgram(&alice_p, &["password", "set", "--new", "other-pw", "--current", "hunter22"]).expect_flood_wait(600);
    // Kept on disk: a restarted gateway still refuses.
    gw.restart_same_port();
    gw.login_with(&owner, ALICE, &[], |code| vec![code.to_string(), "hunter22".to_string()]).expect_flood_wait(600);
    // The signed-in device is not signed out by someone else's guesses.
    meshgram(&alice_p, &["whoami"]).ok_json();
}

#[test]
fn directory_lookups_are_rate_limited_per_account() {
    let gw = Gateway::builder().config("[limits]\nlookup_burst = 2\nlookups_per_second = 1\n").start();
    let (alice_p, bob_p) = (gw.new_profile("alice"), gw.new_profile("bob"));
    gw.login(&alice_p, ALICE);
    gw.login(&bob_p, BOB);
    // Enumerating user ids runs into FLOOD_WAIT soon, found or not: a burst of 2 at 1/s, and a
    // lookup through the CLI takes well under a second.
    let mut refused = None;
    for i in 0..30 {
        let out = meshgram(&alice_p, &["lookup", &(1_000_001 + i).to_string()]);
        if out.status.success() {
            continue;
        }
        if out.err_json()["code"] == "FLOOD_WAIT" {
            refused = Some(i);
            out.expect_flood_wait(2);
            break;
        }
        out.expect_err(&["NOT_FOUND"]);
    }
    assert!(refused.is_some(), "30 lookups in a burst of 2 at 1/s, none refused");
    // Bob's lookups are his own.
    meshgram(&bob_p, &["lookup", ALICE]).ok_json();
}
