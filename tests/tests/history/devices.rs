use std::time::{Duration, Instant};

use meshgram_tests::{Mesh, array, blake3_of_file, meshgram, random_file, spawn_meshgram, start_node, str_field};
use serde_json::Value;

use super::{ALICE, comparable, contact_phone, count_text, fill_history, text_of};

const CONTACTS: usize = 20;
const PER_CHAT: usize = 500;
/// Generous: a debug build on two cores seals, uploads and merges 10,000 messages.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(300);

/// The device of `devices --json` whose id is `id`.
fn device_entry(devices: &Value, id: &str) -> Value {
    array(devices, "devices").into_iter().find(|d| d["device"] == id).unwrap_or_else(|| panic!("{id} in {devices}"))
}

#[test]
fn a_new_device_gets_the_whole_history_once_approved_and_an_unapproved_one_gets_nothing() {
    let mesh = Mesh::start(3, 2);
    let d1 = mesh.new_profile("alice-laptop");
    assert_eq!(mesh.login(&d1, ALICE)["history_requested"], false, "a new account has no history to ask for");
    let contacts = fill_history(&mesh, &d1, CONTACTS, PER_CHAT);
    // A file in the history: its reference moves with it, and the new device can download it.
    let photo = mesh.gateway.tmp().join("photo.bin");
    random_file(&photo, 700_000, "a file in alice's history");
    let upload = ["upload", photo.to_str().unwrap(), "--to", &contact_phone(1), "--caption", "the photo"];
    spawn_meshgram(&d1, &upload).with_timeout(TRANSFER_TIMEOUT).finish().ok_json_lines();
    let before = meshgram(&d1, &["messages"]).ok_json();
    assert_eq!(array(&before, "messages").len(), CONTACTS * PER_CHAT + 6 + 1);

    // Device 2 signs in and asks; device 1 lists it as asking, with its key's fingerprint.
    let d2 = mesh.new_profile("alice-phone");
    let login = mesh.login(&d2, ALICE);
    assert_eq!(login["history_requested"], true, "{login}");
    let d2_id = str_field(&login, "device").to_string();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&d2).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the profile (plaintext history, exports on their way) is its owner's alone");
    let devices = meshgram(&d1, &["devices"]).ok_json();
    assert_eq!(array(&devices, "devices").len(), 2, "{devices}");
    let entry = device_entry(&devices, &d2_id);
    assert_eq!(entry["asked_for_history"], true, "{entry}");
    assert_eq!(str_field(&entry, "fingerprint").len(), 24, "five groups of four hex digits: {entry}");
    assert!(array(&devices, "devices").iter().any(|d| d["current"] == true));
    // Nothing moved yet: a stolen SIM alone reads nothing old.
    assert_eq!(array(&meshgram(&d2, &["messages"]).ok_json(), "messages").len(), 0);

    // Contacts were told: a notice in their chat names the new device's fingerprint.
    let bob = &contacts[0];
    let seen_by_bob = meshgram(bob, &["messages", ALICE]).ok_json();
    let notice = array(&seen_by_bob, "messages").into_iter().find(|m| m["notice"] == true);
    let notice = notice.unwrap_or_else(|| panic!("no notice of alice's new device in {seen_by_bob}"));
    assert!(str_field(&notice, "text").contains(str_field(&entry, "fingerprint")), "{notice}");

    // A message before the approval reaches both devices (and is in the export too), one
    // after it reaches both directly: each shows once everywhere.
    meshgram(bob, &["send", ALICE, "sent while the history moves, before"]).ok_json();
    meshgram(&d1, &["messages"]).ok_json();
    let started = Instant::now();
    let approved =
        spawn_meshgram(&d1, &["devices", "approve", &d2_id]).with_timeout(TRANSFER_TIMEOUT).finish().ok_json_lines();
    let approve_took = started.elapsed();
    let sent = approved.last().unwrap();
    assert_eq!(sent["device"], d2_id.as_str(), "{sent}");
    assert_eq!(sent["messages"].as_u64(), Some(array(&before, "messages").len() as u64 + 1), "{sent}");
    assert!(approved.iter().any(|e| e["event"] == "transfer"), "progress while uploading");
    meshgram(bob, &["send", ALICE, "sent while the history moves, after"]).ok_json();

    let started = Instant::now();
    let on_d2 = spawn_meshgram(&d2, &["messages"]).with_timeout(TRANSFER_TIMEOUT).finish().ok_json();
    let import_took = started.elapsed();
    let on_d1 = meshgram(&d1, &["messages"]).ok_json();
    eprintln!(
        "history of {} messages, {} bytes: approve (export + upload + send) {approve_took:?}, fetch + merge {import_took:?}",
        sent["messages"], sent["bytes"]
    );
    assert_eq!(comparable(&on_d2), comparable(&on_d1), "the two devices' histories differ");
    assert_eq!(array(&on_d2, "messages").len(), CONTACTS * PER_CHAT + 6 + 1 + 2);
    for text in ["sent while the history moves, before", "sent while the history moves, after"] {
        assert_eq!(count_text(&on_d2, text), 1, "{text} on the new device");
        assert_eq!(count_text(&on_d1, text), 1, "{text} on the old device");
    }
    // Read state came along: the chat alice read on device 1 is read on device 2.
    let read = array(&on_d2, "messages")
        .into_iter()
        .filter(|m| m["outgoing"] == false && m["text"].as_str().is_some_and(|t| t.ends_with("from contact 0")))
        .all(|m| m["status"] == "read");
    assert!(read, "bob's first two messages are read on device 2 as on device 1");
    // Each chat keeps its order.
    let chat_7: Vec<String> = array(&on_d2, "messages")
        .iter()
        .filter(|m| m["text"].as_str().is_some_and(|t| t.contains("for contact 07:")))
        .map(|m| m["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(chat_7, (0..PER_CHAT).map(|k| text_of(7, k)).collect::<Vec<_>>());
    // The file in the history downloads on the new device, byte for byte.
    let file_message = array(&on_d2, "messages").into_iter().find(|m| m["text"] == "the photo").unwrap();
    let copy = mesh.gateway.tmp().join("photo-on-d2.bin");
    let id = str_field(&file_message, "id").to_string();
    spawn_meshgram(&d2, &["download", &id, "-o", copy.to_str().unwrap()])
        .with_timeout(TRANSFER_TIMEOUT)
        .finish()
        .ok_json_lines();
    assert_eq!(blake3_of_file(&copy), blake3_of_file(&photo));
    let devices = meshgram(&d1, &["devices"]).ok_json();
    assert!(device_entry(&devices, &d2_id)["history_sent_at"].is_u64(), "{devices}");
    // A history the new device no longer asks for (it has one) is dropped, not merged.
    spawn_meshgram(&d1, &["devices", "approve", &d2_id]).with_timeout(TRANSFER_TIMEOUT).finish().ok_json_lines();
    assert_eq!(array(&meshgram(&d2, &["messages"]).ok_json(), "messages").len(), CONTACTS * PER_CHAT + 6 + 1 + 2);
    assert_eq!(meshgram(&d2, &["whoami"]).ok_json()["dropped_envelopes"], 1, "the unasked-for history");

    // Device 3 signs in and asks, but nobody approves it: it has nothing old.
    let d3 = mesh.new_profile("alice-stolen-sim");
    let d3_id = str_field(&mesh.login(&d3, ALICE), "device").to_string();
    let devices = meshgram(&d1, &["devices"]).ok_json();
    assert_eq!(device_entry(&devices, &d3_id)["asked_for_history"], true);
    let on_d3 = meshgram(&d3, &["messages"]).ok_json();
    let old = array(&on_d3, "messages").into_iter().filter(|m| m["notice"] != true).count();
    assert_eq!(old, 0, "an unapproved device got history: {on_d3}");
    // Approving it from device 2 would work too; removing it signs it out instead.
    let removed = meshgram(&d2, &["devices", "remove", &d3_id]).ok_json();
    assert_eq!(removed["device"], d3_id.as_str());
    let gone = meshgram(&d3, &["whoami"]).expect_err(&["SESSION_REVOKED", "AUTH_KEY_UNREGISTERED"]);
    assert!(!gone.is_null());
    assert_eq!(array(&meshgram(&d1, &["devices"]).ok_json(), "devices").len(), 2);
    // Approving this very device, or one that is not there, is a clear error.
    meshgram(&d1, &["devices", "approve", "nosuchdevice"]).expect_err(&["NOT_FOUND"]);

    // The relays' files hold none of the history's plaintext.
    for needle in [text_of(3, 123), text_of(19, 499), "sent while the history moves, before".into()] {
        let found = mesh.relay_files_containing(needle.as_bytes());
        assert!(found.is_empty(), "plaintext '{needle}' on a relay's disk: {found:?}");
    }
}

#[test]
fn a_node_that_was_off_approves_later_and_the_new_device_gets_it_with_the_gateway_down() {
    let mut mesh = Mesh::start(3, 2);
    let d1 = mesh.new_profile("alice-laptop");
    mesh.login(&d1, ALICE);
    fill_history(&mesh, &d1, 2, 50);
    // Device 2 signs in while device 1 is off; its node starts, and is stopped again.
    let d2 = mesh.new_profile("alice-phone");
    let d2_id = str_field(&mesh.login(&d2, ALICE), "device").to_string();
    let mut node2 = start_node(&d2);
    node2.terminate();

    // Device 1's node runs: the request waits for it, and the CLI approves through it.
    let node1 = start_node(&d1);
    let devices = meshgram(&d1, &["devices"]).ok_json();
    assert_eq!(device_entry(&devices, &d2_id)["asked_for_history"], true, "{devices}");
    let sent = spawn_meshgram(&d1, &["devices", "approve", &d2_id]).with_timeout(TRANSFER_TIMEOUT).finish();
    let sent = sent.ok_json_lines();
    assert_eq!(sent.last().unwrap()["messages"].as_u64(), Some(2 * 50 + 4));
    drop(node1);

    // The gateway is down when device 2's node starts again: the envelope verifies against the
    // card it cached, and the history comes from the relays alone.
    mesh.gateway.kill9();
    let _node2 = start_node(&d2);
    let deadline = Instant::now() + TRANSFER_TIMEOUT;
    loop {
        let on_d2 = meshgram(&d2, &["messages"]).ok_json();
        if array(&on_d2, "messages").len() == 2 * 50 + 4 {
            break;
        }
        assert!(Instant::now() < deadline, "no history on the new device: {on_d2}");
        std::thread::sleep(Duration::from_millis(200));
    }
    mesh.gateway.restart_same_port();
    assert_eq!(
        comparable(&meshgram(&d2, &["messages"]).ok_json()),
        comparable(&meshgram(&d1, &["messages"]).ok_json())
    );
}

/// The texts of a chat on `profile` (notices left out), waiting (bounded) for `want` of them.
fn texts_of_chat(profile: &std::path::Path, chat: &str, want: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let shown = meshgram(profile, &["messages", chat]).ok_json();
        let texts: Vec<String> = array(&shown, "messages")
            .into_iter()
            .filter(|m| m["notice"] != true)
            .filter_map(|m| m["text"].as_str().map(str::to_string))
            .collect();
        if texts.len() >= want || Instant::now() > deadline {
            return texts;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_new_device_gets_the_accounts_groups_with_the_history_and_reads_and_posts_in_them() {
    let mesh = Mesh::start(3, 2);
    let (d1, bob) = (mesh.new_profile("alice-laptop"), mesh.new_profile("bob"));
    mesh.login(&d1, ALICE);
    mesh.login(&bob, &contact_phone(0));
    let created = meshgram(&d1, &["group", "create", "Climbing", &contact_phone(0)]).ok_json();
    let group = str_field(&created, "id").to_string();
    meshgram(&d1, &["send", &group, "who is in on saturday?"]).ok_json();
    assert_eq!(texts_of_chat(&bob, &group, 1), ["who is in on saturday?"]);
    meshgram(&bob, &["send", &group, "me"]).ok_json();
    assert_eq!(texts_of_chat(&d1, &group, 2).len(), 2);

    // Device 2 is approved: the group comes with the history, its title, members and keys.
    let d2 = mesh.new_profile("alice-phone");
    let d2_id = str_field(&mesh.login(&d2, ALICE), "device").to_string();
    spawn_meshgram(&d1, &["devices", "approve", &d2_id]).with_timeout(TRANSFER_TIMEOUT).finish().ok_json_lines();
    assert_eq!(texts_of_chat(&d2, &group, 2), ["who is in on saturday?", "me"]);
    let info = meshgram(&d2, &["group", "info", &group]).ok_json();
    assert_eq!((info["title"].as_str(), info["admin"].as_bool()), (Some("Climbing"), Some(true)), "{info}");
    assert_eq!(array(&info["members"], "members").len(), 2, "{info}");
    let chats = meshgram(&d2, &["chats"]).ok_json();
    let listed = chats.as_array().unwrap().iter().find(|c| c["id"] == group.as_str());
    assert!(listed.is_some_and(|c| c["name"] == "Climbing" && c["kind"] == "group"), "{chats}");

    // What is posted from now on reaches it, and what it posts reaches the others once.
    meshgram(&bob, &["send", &group, "bring the rope"]).ok_json();
    assert_eq!(texts_of_chat(&d2, &group, 3).last().map(String::as_str), Some("bring the rope"));
    meshgram(&d2, &["send", &group, "from my phone"]).ok_json();
    let on_bob = texts_of_chat(&bob, &group, 4);
    assert_eq!(on_bob.iter().filter(|t| *t == "from my phone").count(), 1, "{on_bob:?}");
    // And it admins it: a title change reaches bob.
    meshgram(&d2, &["group", "title", &group, "Climbing club"]).ok_json();
    let deadline = Instant::now() + Duration::from_secs(60);
    while meshgram(&bob, &["group", "info", &group]).ok_json()["title"] != "Climbing club" {
        assert!(Instant::now() < deadline, "bob never saw the new title");
        std::thread::sleep(Duration::from_millis(300));
    }
}
