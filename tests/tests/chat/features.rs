use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use meshgram_tests::{CLI_BIN, Mesh, array, bin_path, meshgram, str_field, u64_field};
use serde_json::Value;

use super::{ALICE, BOB};

/// The message with `id` in a `messages --json` answer.
fn find(messages: &Value, id: &str) -> Value {
    array(messages, "messages").into_iter().find(|m| m["id"] == id).unwrap_or_else(|| panic!("no {id} in {messages}"))
}

#[test]
fn edits_deletes_and_receipts_reach_both_sides() {
    let mesh = Mesh::start(3, 2);
    let (alice, bob) = (mesh.new_profile("alice"), mesh.new_profile("bob"));
    mesh.login(&alice, ALICE);
    mesh.login(&bob, BOB);
    let sent = meshgram(&alice, &["send", BOB, "helo"]).ok_json();
    let id = array(&sent["ids"], "ids")[0].as_str().unwrap().to_string();
    assert_eq!(str_field(&find(&meshgram(&alice, &["messages"]).ok_json(), &id), "status"), "sent");

    // Bob's device fetches it: Alice learns it was delivered.
    meshgram(&bob, &["messages"]).ok_json();
    assert_eq!(str_field(&find(&meshgram(&alice, &["messages"]).ok_json(), &id), "status"), "delivered");

    // Alice fixes a typo; Bob sees the new text, marked edited.
    meshgram(&alice, &["edit", &id, "hello"]).ok_json();
    let on_bob = find(&meshgram(&bob, &["messages"]).ok_json(), &id);
    assert_eq!((str_field(&on_bob, "text"), &on_bob["edited"]), ("hello", &Value::Bool(true)));

    // Bob opens the chat: Alice learns it was read.
    meshgram(&bob, &["messages", ALICE]).ok_json();
    assert_eq!(str_field(&find(&meshgram(&alice, &["messages"]).ok_json(), &id), "status"), "read");

    // Only the author may change a message.
    meshgram(&bob, &["edit", &id, "mine now"]).expect_err(&["FORBIDDEN"]);
    meshgram(&bob, &["delete", &id]).expect_err(&["FORBIDDEN"]);
    meshgram(&alice, &["edit", &"0".repeat(32), "x"]).expect_err(&["NOT_FOUND"]);
    meshgram(&alice, &["edit", "not-an-id", "x"]).expect_err(&["USAGE"]);

    // Alice deletes it for everyone.
    meshgram(&alice, &["delete", &id]).ok_json();
    let on_bob = find(&meshgram(&bob, &["messages"]).ok_json(), &id);
    assert_eq!((str_field(&on_bob, "text"), &on_bob["deleted"]), ("", &Value::Bool(true)));
}

#[test]
fn follow_shows_typing_and_new_messages_as_they_arrive() {
    let mesh = Mesh::start(3, 2);
    let (alice, bob) = (mesh.new_profile("alice"), mesh.new_profile("bob"));
    let alice_id = u64_field(&mesh.login(&alice, ALICE), "user_id");
    mesh.login(&bob, BOB);

    let mut follow = Command::new(bin_path(CLI_BIN))
        .args(["--profile", &bob.display().to_string(), "--json", "messages", "--follow"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = mpsc::channel();
    let stdout = follow.stdout.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    // Let the follower park its long-poll, then type and send.
    thread::sleep(Duration::from_millis(1500));
    meshgram(&alice, &["typing", BOB]).ok_json();
    meshgram(&alice, &["send", BOB, "live!"]).ok_json();
    // The follower does not lock the profile: Bob can send from another terminal meanwhile.
    meshgram(&bob, &["send", ALICE, "sent while following"]).ok_json();

    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut saw_typing, mut saw_message) = (false, false);
    while !(saw_typing && saw_message) && Instant::now() < deadline {
        let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) else { continue };
        let value: Value = serde_json::from_str(&line).unwrap();
        saw_typing |= value["typing"].as_u64() == Some(alice_id);
        saw_message |= value["text"] == "live!";
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(saw_typing, "the typing notice was shown");
    assert!(saw_message, "the message was shown as it arrived");
}
