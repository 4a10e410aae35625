use meshgram_tests::{Mesh, array, meshgram, str_field, texts, u64_field};

use super::{ALICE, BOB};

#[test]
fn two_users_chat_through_three_relays_with_replies_and_sync() {
    let mesh = Mesh::start(3, 2);
    let (alice, alice_laptop, bob) =
        (mesh.new_profile("alice"), mesh.new_profile("alice-laptop"), mesh.new_profile("bob"));
    let alice_id = u64_field(&mesh.login(&alice, ALICE), "user_id");
    mesh.login(&alice_laptop, ALICE);
    let bob_id = u64_field(&mesh.login(&bob, BOB), "user_id");
    meshgram(&bob, &["profile", "set", "--username", "bob_b"]).ok_json();

    let sent = meshgram(&alice, &["send", "@bob_b", "hi bob"]).ok_json();
    assert_eq!(u64_field(&sent, "sent"), 1);
    let message_id = array(&sent["ids"], "ids")[0].as_str().unwrap().to_string();

    let inbox = meshgram(&bob, &["messages"]).ok_json();
    let got = array(&inbox, "messages");
    assert_eq!(got.len(), 1, "{inbox}");
    assert_eq!(str_field(&got[0], "text"), "hi bob");
    assert_eq!(u64_field(&got[0], "chat"), alice_id);
    assert_eq!(got[0]["outgoing"], false);
    assert_eq!(str_field(&got[0], "id"), message_id);

    // Bob replies by phone number; Alice sees the reply, threaded.
    meshgram(&bob, &["send", ALICE, "hi alice", "--reply-to", &message_id]).ok_json();
    let alice_view = meshgram(&alice, &["messages", "@bob_b"]).ok_json();
    assert_eq!(texts(&alice_view), ["hi bob", "hi alice"]);
    assert_eq!(str_field(&array(&alice_view, "messages")[1], "reply_to"), message_id);

    // Alice's other device got both: her own message (as outgoing) and Bob's reply.
    let laptop = meshgram(&alice_laptop, &["messages", &bob_id.to_string()]).ok_json();
    assert_eq!(texts(&laptop), ["hi bob", "hi alice"]);
    assert_eq!(array(&laptop, "messages")[0]["outgoing"], true);

    // Fetching again delivers nothing twice.
    assert_eq!(texts(&meshgram(&bob, &["messages"]).ok_json()).len(), 2);
    let chats = meshgram(&bob, &["chats"]).ok_json();
    assert_eq!(u64_field(&array(&chats, "chats")[0], "messages"), 2);
}

#[test]
fn sending_to_unknown_users_and_empty_messages_fails_clearly() {
    let mesh = Mesh::start(1, 1);
    let alice = mesh.new_profile("alice");
    mesh.login(&alice, ALICE);
    meshgram(&alice, &["send", "@nobody_here", "hi"]).expect_err(&["NOT_FOUND"]);
    meshgram(&alice, &["send", "@bob_b", ""]).expect_err(&["USAGE", "NOT_FOUND"]);
    let long = "x".repeat(4097);
    mesh.login(&mesh.new_profile("bob"), BOB);
    meshgram(&alice, &["send", BOB, &long]).expect_err(&["USAGE"]);
}
