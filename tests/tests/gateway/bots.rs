//! Bots: created by users (BotFather style) or by the operator, signed in with tokens that can
//! be replaced.

use meshgram_tests::{CliOutput, Gateway, array, is_bot_token, meshgram, str_field};
use serde_json::Value;

use crate::{ALICE, BOB, card_devices, lookup};

/// Checks a `{"bot":Account,"token":..}` answer and returns the token.
fn assert_bot_token(answer: &Value, username: &str, owner: &Value) -> String {
    let bot = &answer["bot"];
    assert_eq!(bot["kind"], "bot", "{answer}");
    assert_eq!(bot["username"], username, "{answer}");
    assert_eq!(bot["phone"], Value::Null, "{answer}");
    assert_eq!(&bot["owner"], owner, "{answer}");
    let token = str_field(answer, "token");
    assert!(is_bot_token(token), "token {token:?} is not <digits>:<35 chars of A-Za-z0-9_->");
    assert!(token.starts_with(&format!("{}:", bot["user_id"])), "the token names its bot: {answer}");
    token.to_string()
}

/// A successful bot login for `bot_id`.
fn assert_bot_login(out: &CliOutput, bot_id: &Value) -> Value {
    let login = out.ok_json();
    assert_eq!(login["user_id"], *bot_id, "{login}");
    assert_eq!(login["account"]["kind"], "bot", "{login}");
    login
}

#[test]
fn users_create_bots_that_sign_in_with_tokens() {
    let gw = Gateway::start();
    let (alice_p, bob_p, bot_p) = (gw.new_profile("alice"), gw.new_profile("bob"), gw.new_profile("echo"));
    let alice = gw.login(&alice_p, ALICE);

    let created = meshgram(&alice_p, &["bot", "create", "--username", "echo_bot", "--name", "Echo"]).ok_json();
    let token = assert_bot_token(&created, "echo_bot", &alice["user_id"]);
    let bot_id = created["bot"]["user_id"].clone();
    assert_eq!(created["bot"]["name"], "Echo", "{created}");
    assert_ne!(bot_id, alice["user_id"]);

    let bots = array(&meshgram(&alice_p, &["bot", "list"]).ok_json(), "bot list");
    assert_eq!(bots.len(), 1, "{bots:?}");
    assert_eq!(bots[0]["user_id"], bot_id, "{bots:?}");
    assert_eq!(bots[0]["username"], "echo_bot", "{bots:?}");

    meshgram(&alice_p, &["bot", "create", "--username", "echo_helper", "--name", "X"])
        .expect_err(&["USERNAME_INVALID"]);
    meshgram(&alice_p, &["bot", "create", "--username", "ECHO_bot", "--name", "X"]).expect_err(&["USERNAME_OCCUPIED"]);

    let bot_login = assert_bot_login(&gw.login_bot(&bot_p, &token), &bot_id);
    let me = meshgram(&bot_p, &["whoami"]).ok_json();
    assert_eq!(me["account"]["kind"], "bot", "{me}");
    assert_eq!(me["account"]["user_id"], bot_id, "{me}");
    let card = lookup(&alice_p, "@echo_bot");
    assert_eq!(card["user_id"], bot_id, "{card}");
    assert_eq!(card["kind"], "bot", "{card}");
    assert_eq!(card_devices(&card), vec![bot_login["device"].clone()], "{card}");

    meshgram(&bot_p, &["renew"]).ok_json();

    let bot_arg = bot_id.to_string();
    let revoked = meshgram(&alice_p, &["bot", "revoke-token", &bot_arg]).ok_json();
    let new_token = assert_bot_token(&revoked, "echo_bot", &alice["user_id"]);
    assert_ne!(new_token, token);
    assert_eq!(revoked["bot"]["user_id"], bot_id, "{revoked}");

    gw.login_bot(&gw.new_profile("old-token"), &token).expect_err(&["ACCESS_TOKEN_INVALID"]);
    meshgram(&bot_p, &["renew"]).expect_err(&["SESSION_REVOKED"]);
    meshgram(&bot_p, &["whoami"]).expect_err(&["SESSION_REVOKED"]);
    let new_p = gw.new_profile("new-token");
    assert_bot_login(&gw.login_bot(&new_p, &new_token), &bot_id);

    // Malformed tokens may be caught by the CLI before the gateway sees them.
    gw.login_bot(&gw.new_profile("garbage"), "not-a-token").expect_err(&["ACCESS_TOKEN_INVALID", "USAGE"]);
    let unknown = format!("999999:{}", "A".repeat(35));
    gw.login_bot(&gw.new_profile("unknown"), &unknown).expect_err(&["ACCESS_TOKEN_INVALID"]);

    // Bots do not make bots, and nobody else manages alice's bot (protocol.rs documents
    // FORBIDDEN for "someone else's bot").
    let child = ["bot", "create", "--username", "child_bot", "--name", "Child"];
    meshgram(&new_p, &child).expect_err(&["FORBIDDEN"]);
    gw.login(&bob_p, BOB);
    assert_eq!(meshgram(&bob_p, &["bot", "list"]).ok_json(), serde_json::json!([]));
    meshgram(&bob_p, &["bot", "revoke-token", &bot_arg]).expect_err(&["FORBIDDEN"]);
    assert_bot_login(&gw.login_bot(&gw.new_profile("still-valid"), &new_token), &bot_id);
}

#[test]
fn operator_creates_bots_on_the_running_gateway() {
    let gw = Gateway::start();
    let alice_p = gw.new_profile("alice");
    gw.login(&alice_p, ALICE);

    let created = gw.operator(&["bot", "create", "--username", "ops_bot", "--name", "Ops", "--json"]).ok_json();
    let token = assert_bot_token(&created, "ops_bot", &Value::Null);
    let bot_id = created["bot"]["user_id"].clone();

    let bots = array(&gw.operator(&["bot", "list", "--json"]).ok_json(), "operator bot list");
    assert!(bots.iter().any(|b| b["user_id"] == bot_id && b["username"] == "ops_bot"), "{bots:?}");

    let card = lookup(&alice_p, "@ops_bot");
    assert_eq!(card["user_id"], bot_id, "{card}");
    assert_eq!(card["kind"], "bot", "{card}");
    assert_eq!(card["name"], "Ops", "{card}");

    let bot_p = gw.new_profile("ops");
    assert_bot_login(&gw.login_bot(&bot_p, &token), &bot_id);

    let bot_arg = bot_id.to_string();
    let revoked = gw.operator(&["bot", "revoke-token", &bot_arg, "--json"]).ok_json();
    let new_token = assert_bot_token(&revoked, "ops_bot", &Value::Null);
    assert_ne!(new_token, token);
    gw.login_bot(&gw.new_profile("ops-old"), &token).expect_err(&["ACCESS_TOKEN_INVALID"]);
    meshgram(&bot_p, &["renew"]).expect_err(&["SESSION_REVOKED"]);
    assert_bot_login(&gw.login_bot(&gw.new_profile("ops-new"), &new_token), &bot_id);
}
