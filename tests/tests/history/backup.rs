use std::time::{Duration, Instant};

use meshgram_tests::{Mesh, files_under, meshgram, spawn_meshgram, start_node, str_field};

use super::{ALICE, comparable, fill_history, text_of};

const CONTACTS: usize = 3;
const PER_CHAT: usize = 200;
const BACKUP_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn a_backup_restores_on_a_new_profile_with_its_code_and_only_with_it() {
    let mesh = Mesh::start(3, 2);
    let alice = mesh.new_profile("alice");
    mesh.login(&alice, ALICE);
    fill_history(&mesh, &alice, CONTACTS, PER_CHAT);
    let history = meshgram(&alice, &["messages"]).ok_json();

    // The first backup makes the recovery code and shows it once; the next reuses the key.
    let started = Instant::now();
    let made = spawn_meshgram(&alice, &["backup", "create"]).with_timeout(BACKUP_TIMEOUT).finish().ok_json_lines();
    eprintln!(
        "backup of {} messages, {} bytes, to the relays: {:?}",
        made.last().unwrap()["messages"],
        made.last().unwrap()["bytes"],
        started.elapsed()
    );
    let made = made.last().unwrap().clone();
    let code = str_field(&made, "recovery_code").to_string();
    assert_eq!(made["messages"].as_u64(), Some((CONTACTS * PER_CHAT + 6) as u64), "{made}");
    assert!(made["path"].is_null(), "to the relays: {made}");
    let file = mesh.gateway.tmp().join("alice.backup");
    let to_file = spawn_meshgram(&alice, &["backup", "create", "-o", file.to_str().unwrap()])
        .with_timeout(BACKUP_TIMEOUT)
        .finish()
        .ok_json_lines();
    let to_file = to_file.last().unwrap();
    assert!(to_file["recovery_code"].is_null(), "the code is shown once: {to_file}");
    eprintln!("backup file: {} bytes", std::fs::metadata(&file).unwrap().len());

    // A fresh profile of the same account: a wrong code and a malformed one are refused, and
    // leave the history empty; the right code restores it.
    let fresh = mesh.new_profile("alice-new-laptop");
    mesh.login(&fresh, ALICE);
    let wrong = code.chars().rev().collect::<String>();
    let refused = meshgram(&fresh, &["backup", "restore", "--code", &wrong]).expect_err(&["WRONG_CODE"]);
    assert!(str_field(&refused, "message").contains("recovery code"), "{refused}");
    meshgram(&fresh, &["backup", "restore", "--code", "not a code"]).expect_err(&["USAGE"]);
    meshgram(&fresh, &["backup", "restore", "--code", &wrong, "--from", file.to_str().unwrap()])
        .expect_err(&["WRONG_CODE"]);
    assert!(meshgram(&fresh, &["messages"]).ok_json().as_array().unwrap().is_empty());
    let restored = spawn_meshgram(&fresh, &["backup", "restore", "--code", &code.to_lowercase()])
        .with_timeout(BACKUP_TIMEOUT)
        .finish()
        .ok_json_lines();
    let restored = restored.last().unwrap();
    assert_eq!(restored["restored"]["new_messages"].as_u64(), Some((CONTACTS * PER_CHAT + 6) as u64), "{restored}");
    assert_eq!(comparable(&meshgram(&fresh, &["messages"]).ok_json()), comparable(&history));

    // The file restores the same on another fresh profile.
    let other = mesh.new_profile("alice-from-file");
    mesh.login(&other, ALICE);
    let restore = ["backup", "restore", "--code", &code, "--from", file.to_str().unwrap()];
    spawn_meshgram(&other, &restore).with_timeout(BACKUP_TIMEOUT).finish().ok_json_lines();
    assert_eq!(comparable(&meshgram(&other, &["messages"]).ok_json()), comparable(&history));
    // Restoring again adds nothing twice.
    let again = spawn_meshgram(&other, &restore).with_timeout(BACKUP_TIMEOUT).finish().ok_json_lines();
    assert_eq!(again.last().unwrap()["restored"]["new_messages"].as_u64(), Some(0));
    // A file that is not a backup is a clear error.
    meshgram(&other, &["backup", "restore", "--code", &code, "--from", alice.join("session.json").to_str().unwrap()])
        .expect_err(&["BAD_BACKUP"]);

    // Another account has no backups to find.
    let bob = mesh.new_profile("bob");
    mesh.login(&bob, "+15550009999");
    meshgram(&bob, &["backup", "restore", "--code", &code]).expect_err(&["NOT_FOUND"]);

    // Neither the relays nor the gateway hold the history's plaintext or the backup key.
    let key_file = std::fs::read(alice.join("backup.key")).unwrap();
    let key = &key_file[key_file.len() - 32..];
    let gateway_bytes: Vec<u8> =
        files_under(mesh.gateway.data_dir()).iter().flat_map(|f| std::fs::read(f).unwrap_or_default()).collect();
    let finder = |needle: &[u8]| memchr::memmem::find(&gateway_bytes, needle).is_some();
    for needle in [text_of(1, 150).into_bytes(), key.to_vec(), code.clone().into_bytes()] {
        assert!(
            mesh.relay_files_containing(&needle).is_empty(),
            "on a relay's disk: {:?}",
            String::from_utf8_lossy(&needle)
        );
        assert!(!finder(&needle), "in the gateway's files: {:?}", String::from_utf8_lossy(&needle));
    }
}

#[test]
fn a_running_node_backs_up_on_schedule_keeps_the_newest_and_waits_out_a_stopped_gateway() {
    let mut mesh = Mesh::start(3, 2);
    let alice = mesh.new_profile("alice");
    mesh.login(&alice, ALICE);
    fill_history(&mesh, &alice, 1, 5);
    // Scheduling needs a key, made (with its code shown) by a first backup.
    meshgram(&alice, &["backup", "schedule", "--every", "5s"]).expect_err(&["NOT_FOUND"]);
    let made = spawn_meshgram(&alice, &["backup", "create"]).with_timeout(BACKUP_TIMEOUT).finish().ok_json_lines();
    let code = str_field(made.last().unwrap(), "recovery_code").to_string();
    meshgram(&alice, &["backup", "schedule", "--every", "1s"]).expect_err(&["USAGE"]);
    meshgram(&alice, &["backup", "schedule", "--every", "soon"]).expect_err(&["USAGE"]);
    let set = meshgram(&alice, &["backup", "schedule", "--every", "5s", "--keep", "2"]).ok_json();
    assert_eq!(set["schedule"]["every_secs"].as_u64(), Some(5), "{set}");

    let last_at = |profile: &std::path::Path| {
        meshgram(profile, &["backup", "schedule"]).ok_json()["schedule"]["last_at"].as_u64().unwrap_or(0)
    };
    let wait_for_backup_after = |at: u64, why: &str| {
        let deadline = Instant::now() + BACKUP_TIMEOUT;
        while last_at(&alice) <= at {
            assert!(Instant::now() < deadline, "no scheduled backup {why}");
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    let _node = start_node(&alice);
    // Each scheduled backup finds something new (an unchanged history is not backed up again).
    let contact = super::contact_phone(0);
    meshgram(&alice, &["send", &contact, "news for the first scheduled backup"]).ok_json();
    wait_for_backup_after(last_at(&alice), "while the node runs");
    meshgram(&alice, &["send", &contact, "news for the second"]).ok_json();
    wait_for_backup_after(last_at(&alice), "a second time");
    let listed = meshgram(&alice, &["backup", "list"]).ok_json();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2, "the relays keep the newest two: {listed:?}");
    assert!(listed.iter().all(|b| b["opens_with_this_profile"] == true), "{listed:?}");

    // With the gateway down the scheduled backup fails and is tried again; a message sent
    // meanwhile (through the relays alone) is in the first backup after the gateway is back.
    mesh.gateway.kill9();
    let down_at = last_at(&alice);
    meshgram(&alice, &["send", &contact, "sent while the gateway was down"]).ok_json();
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(last_at(&alice), down_at, "no backup can be made without the gateway");
    mesh.gateway.restart_same_port();
    wait_for_backup_after(down_at, "once the gateway was back");

    let fresh = mesh.new_profile("alice-new");
    mesh.login(&fresh, ALICE);
    spawn_meshgram(&fresh, &["backup", "restore", "--code", &code])
        .with_timeout(BACKUP_TIMEOUT)
        .finish()
        .ok_json_lines();
    let restored = meshgram(&fresh, &["messages"]).ok_json();
    assert_eq!(super::count_text(&restored, "sent while the gateway was down"), 1);
}
