//! Sign-in, the directory and the session list, as two people and their devices see them.

use meshgram_tests::{CliOutput, Gateway, meshgram, str_field, u64_field, unix_now};
use serde_json::{Value, json};

use crate::{ALICE, BOB, CAROL, card_devices, lookup, sessions};

/// What every successful `login` answers for a person.
fn assert_user_login(login: &Value, phone: &str, cert_ttl_secs: u64) {
    let account = &login["account"];
    assert_eq!(account["kind"], "user", "{login}");
    assert_eq!(account["phone"], phone, "{login}");
    assert_eq!(account["user_id"], login["user_id"], "{login}");
    assert_eq!(account["owner"], Value::Null, "{login}");
    assert!(login["new_account"].is_boolean(), "{login}");
    assert!(login["session_id"].is_u64(), "{login}");
    assert!(str_field(login, "device").starts_with("12D3Koo"), "device should be a peer id: {login}");
    let not_after = u64_field(login, "cert_not_after");
    let now = unix_now();
    assert!(
        not_after > now && not_after <= now + cert_ttl_secs + 60,
        "cert_not_after {not_after} vs now {now}: {login}"
    );
}

/// Checks a card found by `lookup` against the other user's login.
fn assert_card_of(card: &Value, login: &Value, username: &str, name: &str) {
    assert_eq!(card["user_id"], login["user_id"], "{card}");
    assert_eq!(card["kind"], "user", "{card}");
    assert_eq!(card["username"], username, "{card}");
    assert_eq!(card["name"], name, "{card}");
    assert_eq!(card_devices(card), vec![login["device"].clone()], "one device, the one that signed in: {card}");
    assert!(card["devices"][0]["keys"].is_object(), "device keys are published: {card}");
}

#[test]
fn two_users_sign_in_and_find_each_other() {
    let gw = Gateway::start();
    let (alice_p, bob_p) = (gw.new_profile("alice"), gw.new_profile("bob"));

    let alice = gw.login(&alice_p, ALICE);
    assert_user_login(&alice, ALICE, 3600);
    assert_eq!(alice["new_account"], true);
    assert_eq!(alice["account"]["username"], Value::Null);
    assert_eq!(alice["account"]["has_password"], false);
    let bob = gw.login(&bob_p, BOB);
    assert_user_login(&bob, BOB, 3600);
    assert_eq!(bob["new_account"], true);
    assert_ne!(alice["user_id"], bob["user_id"]);
    assert_ne!(alice["device"], bob["device"]);

    let me = meshgram(&alice_p, &["whoami"]).ok_json();
    assert_eq!(me["account"]["user_id"], alice["user_id"], "{me}");
    assert_eq!(me["session_id"], alice["session_id"], "{me}");
    assert_eq!(me["device"], alice["device"], "{me}");

    let account = meshgram(&alice_p, &["profile", "set", "--username", "alice", "--name", "Alice Liddell"]).ok_json();
    assert_eq!(account["username"], "alice", "{account}");
    assert_eq!(account["name"], "Alice Liddell", "{account}");
    assert_eq!(account["user_id"], alice["user_id"], "{account}");
    let account = meshgram(&bob_p, &["profile", "set", "--username", "bobby", "--name", "Bob"]).ok_json();
    assert_eq!(account["username"], "bobby", "{account}");

    let bob_id = bob["user_id"].to_string();
    for query in ["@bobby", BOB, bob_id.as_str()] {
        assert_card_of(&lookup(&alice_p, query), &bob, "bobby", "Bob");
    }
    let alice_id = alice["user_id"].to_string();
    for query in ["@alice", ALICE, alice_id.as_str()] {
        assert_card_of(&lookup(&bob_p, query), &alice, "alice", "Alice Liddell");
    }

    meshgram(&alice_p, &["lookup", "@nobody_here"]).expect_err(&["NOT_FOUND"]);
    meshgram(&alice_p, &["lookup", CAROL]).expect_err(&["NOT_FOUND"]);
    meshgram(&alice_p, &["lookup", "987654321"]).expect_err(&["NOT_FOUND"]);
}

#[test]
fn second_device_is_listed_and_can_be_revoked() {
    let gw = Gateway::start();
    let (alice1_p, alice2_p, bob_p) = (gw.new_profile("alice1"), gw.new_profile("alice2"), gw.new_profile("bob"));
    let alice1 = gw.login(&alice1_p, ALICE);
    let bob = gw.login(&bob_p, BOB);

    let alice2 =
        gw.login_with(&alice2_p, ALICE, &["--device-name", "Alice phone"], |code| vec![code.to_string()]).ok_json();
    assert_user_login(&alice2, ALICE, 3600);
    assert_eq!(alice2["new_account"], false, "same phone, same account: {alice2}");
    assert_eq!(alice2["user_id"], alice1["user_id"]);
    assert_ne!(alice2["device"], alice1["device"]);
    assert_ne!(alice2["session_id"], alice1["session_id"]);

    for (profile, me, other) in [(&alice1_p, &alice1, &alice2), (&alice2_p, &alice2, &alice1)] {
        let list = sessions(profile);
        assert_eq!(list.len(), 2, "{list:?}");
        let current: Vec<&Value> = list.iter().filter(|s| s["current"] == true).collect();
        assert_eq!(current.len(), 1, "exactly one current session: {list:?}");
        assert_eq!(current[0]["session_id"], me["session_id"], "{list:?}");
        assert_eq!(current[0]["device"], me["device"], "{list:?}");
        let others: Vec<&Value> = list.iter().filter(|s| s["current"] == false).collect();
        assert_eq!(others.len(), 1, "{list:?}");
        assert_eq!(others[0]["session_id"], other["session_id"], "{list:?}");
        assert_eq!(others[0]["device"], other["device"], "{list:?}");
        for session in &list {
            assert_eq!(session["kind"], "user", "{session}");
            assert!(session["created_at"].is_u64() && session["last_seen"].is_u64(), "{session}");
        }
        let named = list.iter().find(|s| s["device"] == alice2["device"]).expect("alice2's session is listed");
        assert_eq!(named["device_name"], "Alice phone", "{named}");
    }
    let mut both = card_devices(&lookup(&bob_p, ALICE));
    both.sort_by_key(Value::to_string);
    let mut expected = vec![alice1["device"].clone(), alice2["device"].clone()];
    expected.sort_by_key(Value::to_string);
    assert_eq!(both, expected, "a card lists every signed-in device");

    let session2 = alice2["session_id"].to_string();
    let revoked = meshgram(&alice1_p, &["sessions", "revoke", &session2]).ok_json();
    assert_eq!(revoked, json!({"revoked": 1}));

    meshgram(&alice2_p, &["renew"]).expect_err(&["SESSION_REVOKED"]);
    meshgram(&alice2_p, &["whoami"]).expect_err(&["SESSION_REVOKED"]);

    let me = meshgram(&alice1_p, &["whoami"]).ok_json();
    assert_eq!(me["account"]["user_id"], alice1["user_id"], "{me}");
    let renewed = meshgram(&alice1_p, &["renew"]).ok_json();
    assert_eq!(renewed["session_id"], alice1["session_id"], "{renewed}");
    assert!(u64_field(&renewed, "cert_not_after") >= u64_field(&alice1, "cert_not_after"), "{renewed}");
    let list = sessions(&alice1_p);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["session_id"], alice1["session_id"], "{list:?}");
    assert_eq!(card_devices(&lookup(&bob_p, ALICE)), vec![alice1["device"].clone()], "revoked device leaves the card");

    // Revoking what is already gone, or someone else's session, ends nothing.
    assert_revokes_nothing(&meshgram(&alice1_p, &["sessions", "revoke", &session2]));
    let bob_session = bob["session_id"].to_string();
    assert_revokes_nothing(&meshgram(&alice1_p, &["sessions", "revoke", &bob_session]));
    meshgram(&bob_p, &["whoami"]).ok_json();
    assert_eq!(sessions(&alice1_p).len(), 1);
}

/// Either `{"revoked":0}` or a NOT_FOUND/FORBIDDEN refusal: the interface allows both.
fn assert_revokes_nothing(out: &CliOutput) {
    if out.status.success() {
        assert_eq!(out.ok_json(), json!({"revoked": 0}), "{out}");
    } else {
        out.expect_err(&["NOT_FOUND", "FORBIDDEN"]);
    }
}

#[test]
fn revoke_others_keeps_only_the_caller() {
    let gw = Gateway::start();
    let profiles: Vec<_> = (1..=3).map(|i| gw.new_profile(&format!("alice{i}"))).collect();
    let logins: Vec<Value> = profiles.iter().map(|p| gw.login(p, ALICE)).collect();
    assert_eq!(sessions(&profiles[1]).len(), 3);

    let revoked = meshgram(&profiles[1], &["sessions", "revoke", "--others"]).ok_json();
    assert_eq!(revoked, json!({"revoked": 2}));

    for gone in [&profiles[0], &profiles[2]] {
        meshgram(gone, &["whoami"]).expect_err(&["SESSION_REVOKED"]);
        meshgram(gone, &["renew"]).expect_err(&["SESSION_REVOKED"]);
    }
    let list = sessions(&profiles[1]);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["session_id"], logins[1]["session_id"], "{list:?}");
    assert_eq!(list[0]["current"], true, "{list:?}");
    let again = meshgram(&profiles[1], &["sessions", "revoke", "--others"]).ok_json();
    assert_eq!(again, json!({"revoked": 0}));
}

#[test]
fn signing_in_again_replaces_the_device_session() {
    let gw = Gateway::start();
    let bob_p = gw.new_profile("bob");
    let first = gw.login(&bob_p, BOB);
    let second = gw.login(&bob_p, BOB);
    assert_eq!(second["new_account"], false, "{second}");
    assert_eq!(second["user_id"], first["user_id"]);
    assert_eq!(second["device"], first["device"], "same profile, same device key");
    let list = sessions(&bob_p);
    assert_eq!(list.len(), 1, "the old session of this device is replaced: {list:?}");
    assert_eq!(list[0]["session_id"], second["session_id"], "{list:?}");
    let me = meshgram(&bob_p, &["whoami"]).ok_json();
    assert_eq!(me["session_id"], second["session_id"], "{me}");
}

#[test]
fn login_over_quic_and_from_a_network_file() {
    let gw = Gateway::builder().arg("--cert-ttl-secs").arg("900").start();

    let bob_p = gw.new_profile("bob");
    let quic = gw.server.quic_addr();
    let bob = gw.login_via(&["--gateway", &quic], &bob_p, BOB, &[], |code| vec![code.to_string()]).ok_json();
    assert_user_login(&bob, BOB, 900);
    assert!(u64_field(&bob, "cert_not_after") >= unix_now() + 800, "--cert-ttl-secs 900 is honoured: {bob}");
    let me = meshgram(&bob_p, &["whoami"]).ok_json();
    assert_eq!(me["account"]["user_id"], bob["user_id"], "{me}");

    // The file `meshgram up` writes; addresses there carry no /p2p suffix.
    let tcp = gw.addr();
    let bare_tcp = tcp.split("/p2p/").next().unwrap_or_default();
    let network = json!({
        "gateway": {
            "peer_id": gw.server.peer_id(),
            "addrs": [bare_tcp],
            "public_key": gw.server.ready["public_key"],
            "code_sink": gw.code_sink_file().map(|p| p.display().to_string()),
            "http": gw.server.http(),
        }
    });
    let network_file = gw.tmp().join("network.json");
    std::fs::write(&network_file, network.to_string()).expect("write network.json");
    let carol_p = gw.new_profile("carol");
    let file_arg = network_file.display().to_string();
    let carol = gw.login_via(&["--network", &file_arg], &carol_p, CAROL, &[], |code| vec![code.to_string()]).ok_json();
    assert_user_login(&carol, CAROL, 900);
    let card = lookup(&carol_p, BOB);
    assert_eq!(card["user_id"], bob["user_id"], "{card}");
}
