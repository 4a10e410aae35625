use meshgram_tests::{Mesh, blake3_of_file, meshgram, random_file, spawn_meshgram, str_field};

use super::{ALICE, BOB, only_chat, secret_messages};

#[test]
fn a_file_in_a_secret_chat_downloads_byte_for_byte_and_a_declined_chat_opens_nothing() {
    let mesh = Mesh::start(3, 2);
    let (alice, bob) = (mesh.new_profile("alice"), mesh.new_profile("bob"));
    mesh.login(&alice, ALICE);
    mesh.login(&bob, BOB);

    // Declined: Alice learns it, and nothing can be sent.
    let first = str_field(&meshgram(&alice, &["secret", "start", BOB]).ok_json(), "id").to_string();
    meshgram(&bob, &["secret", "list"]).ok_json();
    assert_eq!(meshgram(&bob, &["secret", "decline", &first]).ok_json()["state"], "declined");
    assert_eq!(only_chat(&alice)["state"], "declined");
    meshgram(&alice, &["secret", "send", &first, "hello?"]).expect_err(&["SECRET_STATE"]);

    // A second chat, accepted: a file goes with its key inside the secret message.
    let id = str_field(&meshgram(&alice, &["secret", "start", BOB]).ok_json(), "id").to_string();
    meshgram(&bob, &["secret", "list"]).ok_json();
    meshgram(&bob, &["secret", "accept", &id]).ok_json();
    meshgram(&alice, &["secret", "list"]).ok_json();
    let photo = mesh.gateway.tmp().join("secret-photo.bin");
    random_file(&photo, 1_300_000, "a photo for a secret chat");
    let sent = spawn_meshgram(&alice, &["secret", "send", &id, "--file", photo.to_str().unwrap(), "the view"])
        .finish()
        .ok_json();
    assert_eq!(sent[0]["file"]["size"], 1_300_000, "{sent}");
    let got = secret_messages(&bob, Some(ALICE));
    let message = got.iter().find(|m| m["text"] == "the view").unwrap_or_else(|| panic!("{got:?}"));
    let out = mesh.gateway.tmp().join("downloaded.bin");
    let id_of = str_field(message, "id");
    spawn_meshgram(&bob, &["download", id_of, "-o", out.to_str().unwrap()]).finish().ok_json_lines();
    assert_eq!(blake3_of_file(&out), blake3_of_file(&photo), "the file round-trips byte for byte");
    meshgram(&bob, &["forward", id_of, "--to", ALICE]).expect_err(&["FORBIDDEN"]);
    // The file key never reaches the history's database on either side.
    let key = message["file"]["key"].as_str().unwrap_or_else(|| panic!("a key: {message}")).to_string();
    let key = (0..key.len() / 2).map(|i| u8::from_str_radix(&key[2 * i..2 * i + 2], 16).unwrap()).collect::<Vec<u8>>();
    for profile in [&alice, &bob] {
        let history = std::fs::read(profile.join("history.redb")).unwrap();
        assert!(memchr::memmem::find(&history, &key).is_none(), "a secret file's key in the history");
    }
}
