//! A gateway killed with SIGKILL loses nothing it had answered: accounts, sessions, usernames,
//! bot tokens and its own identity survive a restart on the same data dir. What servers keep is
//! their owner's alone (directories 0700, files 0600).

use std::path::Path;

use meshgram_tests::{Gateway, array, meshgram, str_field};
use serde_json::Value;

use crate::{ALICE, BOB, CAROL, lookup, sessions};

/// The parts of a session list that must survive a restart (`last_seen` may move on).
fn durable_sessions(profile: &Path) -> Vec<[Value; 5]> {
    let mut list: Vec<[Value; 5]> = sessions(profile)
        .into_iter()
        .map(|s| {
            [
                s["session_id"].clone(),
                s["device"].clone(),
                s["device_name"].clone(),
                s["created_at"].clone(),
                s["current"].clone(),
            ]
        })
        .collect();
    list.sort_by_key(|s| s[0].to_string());
    list
}

/// `whoami` still answers with the same account and session.
fn assert_still_signed_in(profile: &Path, login: &Value) {
    let me = meshgram(profile, &["whoami"]).ok_json();
    assert_eq!(me["account"]["user_id"], login["user_id"], "{me}");
    assert_eq!(me["session_id"], login["session_id"], "{me}");
    assert_eq!(me["device"], login["device"], "{me}");
}

#[test]
fn kill_9_and_restart_keeps_accounts_sessions_and_identity() {
    kill_9_and_restart_keeps_accounts_sessions_and_identity_of(Gateway::start());
}

/// The kill -9 test on `gw`, whichever database it keeps its accounts in.
pub(crate) fn kill_9_and_restart_keeps_accounts_sessions_and_identity_of(mut gw: Gateway) {
    let (alice1_p, alice2_p, bob_p) = (gw.new_profile("alice1"), gw.new_profile("alice2"), gw.new_profile("bob"));
    let alice1 = gw.login(&alice1_p, ALICE);
    let alice2 = gw.login(&alice2_p, ALICE);
    let bob = gw.login(&bob_p, BOB);
    meshgram(&alice1_p, &["profile", "set", "--username", "alice", "--name", "Alice"]).ok_json();
    let created = meshgram(&alice1_p, &["bot", "create", "--username", "echo_bot", "--name", "Echo"]).ok_json();
    let token = str_field(&created, "token").to_string();
    let bot_id = created["bot"]["user_id"].clone();

    let peer_id = gw.server.peer_id();
    let public_key = gw.server.ready["public_key"].clone();
    let port = gw.server.tcp_port();
    let alice_sessions = durable_sessions(&alice1_p);
    let bob_sessions = durable_sessions(&bob_p);
    assert_eq!(alice_sessions.len(), 2);

    gw.restart_same_port();

    assert_eq!(gw.server.peer_id(), peer_id, "the gateway keeps its identity");
    assert_eq!(gw.server.ready["public_key"], public_key, "and its signing key");
    assert_eq!(gw.server.tcp_port(), port);
    assert_still_signed_in(&alice1_p, &alice1);
    assert_still_signed_in(&alice2_p, &alice2);
    assert_still_signed_in(&bob_p, &bob);
    assert_eq!(durable_sessions(&alice1_p), alice_sessions);
    assert_eq!(durable_sessions(&bob_p), bob_sessions);
    meshgram(&bob_p, &["renew"]).ok_json();

    let card = lookup(&bob_p, "@alice");
    assert_eq!(card["user_id"], alice1["user_id"], "{card}");
    assert_eq!(card["name"], "Alice", "{card}");
    assert_eq!(array(&card["devices"], "devices").len(), 2, "{card}");

    // Bots and their tokens, and the operator's admin endpoint on the new process.
    let bot_login = gw.login_bot(&gw.new_profile("echo"), &token).ok_json();
    assert_eq!(bot_login["user_id"], bot_id, "{bot_login}");
    let bots = array(&gw.operator(&["bot", "list", "--json"]).ok_json(), "operator bot list");
    assert!(bots.iter().any(|b| b["user_id"] == bot_id), "{bots:?}");

    // New accounts get fresh ids; known phones map to their old accounts.
    let carol_p = gw.new_profile("carol");
    let carol = gw.login(&carol_p, CAROL);
    assert_eq!(carol["new_account"], true, "{carol}");
    for old in [&alice1["user_id"], &bob["user_id"], &bot_id] {
        assert_ne!(&carol["user_id"], old, "user ids are never reused after a crash");
    }
    let alice3 = gw.login(&gw.new_profile("alice3"), ALICE);
    assert_eq!(alice3["new_account"], false, "{alice3}");
    assert_eq!(alice3["user_id"], alice1["user_id"], "{alice3}");

    // What was written just before a crash is kept too.
    gw.restart_same_port();
    assert_still_signed_in(&carol_p, &carol);
    assert_eq!(durable_sessions(&alice1_p).len(), 3);
}

#[test]
fn servers_keep_their_data_their_owners_alone() {
    use std::os::unix::fs::PermissionsExt;
    let mesh = meshgram_tests::Mesh::start(1, 1);
    let profile = mesh.new_profile("alice");
    mesh.login(&profile, ALICE);
    meshgram(&profile, &["send", ALICE, "a note to self"]).ok_json();
    let dirs = [mesh.gateway.data_dir().to_path_buf(), mesh.relays[0].data_dir.clone()];
    for dir in &dirs {
        let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", dir.display());
        let files = meshgram_tests::files_under(dir);
        assert!(files.iter().any(|f| f.extension().is_some_and(|e| e == "redb")), "{}: {files:?}", dir.display());
        for file in files {
            let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", file.display());
        }
    }
}
