use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshgram_tests::{
    Mesh, blake3_of_file, files_under, meshgram, meshgram_stdin, random_file, spawn_meshgram, start_node, str_field,
};

use super::{create_group, group_texts, held_by_relays, relays_by_group_distance, wait_for_texts};

const PHONES: [&str; 5] = ["+15550003001", "+15550003002", "+15550003003", "+15550003004", "+15550003005"];
const PER_SENDER_PER_HALF: usize = 10;

fn lines(sender: usize, from: usize) -> String {
    (from..from + PER_SENDER_PER_HALF).map(|i| format!("m{sender}-{i:02}")).collect::<Vec<_>>().join("\n")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn five_members_across_three_relays_get_every_message_once_in_each_senders_order_through_a_relay_kill() {
    let mut mesh = Mesh::start(3, 2);
    let profiles: Vec<PathBuf> = (0..5).map(|i| mesh.new_profile(&format!("member-{i}"))).collect();
    for (profile, phone) in profiles.iter().zip(PHONES) {
        mesh.login(profile, phone);
    }
    let group = create_group(&profiles[0], "Five", &PHONES[1..]);
    // Two members' client nodes receive as messages arrive; the others fetch when they look.
    let _nodes = [start_node(&profiles[1]), start_node(&profiles[2])];

    for (k, profile) in profiles.iter().enumerate() {
        let sent = meshgram_stdin(profile, &["send", &group, "--lines"], &lines(k, 0)).ok_json();
        assert_eq!(sent["sent"], PER_SENDER_PER_HALF, "{sent}");
    }
    // Stored once per group: on R = 2 relays, each holding each message once.
    let held = held_by_relays(&mesh, &group);
    assert_eq!(held.iter().filter(|&&n| n == 5 * PER_SENDER_PER_HALF + 1).count(), 2, "{held:?}");
    assert!(held.contains(&0), "{held:?}");
    // The relay closest to the group dies.
    let closest = relays_by_group_distance(&mesh, &group)[0];
    mesh.relays[closest].kill9();
    for (k, profile) in profiles.iter().enumerate() {
        let sent = meshgram_stdin(profile, &["send", &group, "--lines"], &lines(k, PER_SENDER_PER_HALF)).ok_json();
        assert_eq!(sent["sent"], PER_SENDER_PER_HALF, "{sent}");
    }

    let total = 5 * 2 * PER_SENDER_PER_HALF;
    for (i, profile) in profiles.iter().enumerate() {
        let texts = wait_for_texts(profile, &group, total);
        assert_eq!(texts.len(), total, "member {i} shows each message once: {texts:?}");
        for sender in 0..5 {
            let own: Vec<&String> = texts.iter().filter(|t| t.starts_with(&format!("m{sender}-"))).collect();
            let want: Vec<String> = (0..2 * PER_SENDER_PER_HALF).map(|n| format!("m{sender}-{n:02}")).collect();
            assert_eq!(own, want.iter().collect::<Vec<_>>(), "member {i} shows sender {sender}'s messages in order");
        }
    }
    // The relays hold ciphertext only, on disk and in their logs.
    for sentinel in ["m0-03", "m3-17", "Five"] {
        assert_eq!(mesh.relay_files_containing(sentinel.as_bytes()), Vec::<PathBuf>::new(), "{sentinel}");
    }
}

#[test]
fn a_removed_member_cannot_open_or_post_what_follows_even_restored_with_every_key_it_had() {
    let mesh = Mesh::start(3, 2);
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|n| mesh.new_profile(n));
    for (profile, phone) in [(&alice, PHONES[0]), (&bob, PHONES[1]), (&carol, PHONES[2])] {
        mesh.login(profile, phone);
    }
    let group = create_group(&alice, "Three", &PHONES[1..3]);
    meshgram(&alice, &["send", &group, "before the removal"]).ok_json();
    assert_eq!(wait_for_texts(&carol, &group, 1), ["before the removal"]);
    // Carol's device as it is now, every key it was given included.
    let kept = carol.with_file_name("carol-kept-keys");
    copy_dir(&carol, &kept);

    let removed = meshgram(&alice, &["group", "remove", &group, PHONES[2]]).ok_json();
    assert_eq!(removed["members"].as_array().map(Vec::len), Some(2), "{removed}");
    assert_eq!(removed["epoch"], 1, "a removal re-keys: {removed}");
    let secret = "after the removal 7f3e";
    meshgram(&alice, &["send", &group, secret]).ok_json();
    assert_eq!(wait_for_texts(&bob, &group, 2), ["before the removal", secret]);

    // Carol's client knows it is out, and says so.
    assert_eq!(group_texts(&carol, &group), ["before the removal"]);
    let info = meshgram(&carol, &["group", "info", &group]).ok_json();
    assert_eq!(info["active"], false, "{info}");
    assert_eq!(meshgram(&carol, &["send", &group, "still here?"]).expect_err(&["FORBIDDEN"])["code"], "FORBIDDEN");

    // Restored as it was before the removal, it reads everything the relays hold and opens
    // nothing new: the new epoch's key never reached it.
    assert_eq!(group_texts(&kept, &group), ["before the removal"]);
    let history = meshgram_node::client::history::History::open(&kept).unwrap();
    let groups = meshgram_node::client::groups::Groups::open(&history).unwrap();
    let record = groups.all().unwrap().pop().unwrap();
    assert_eq!(record.keys.iter().map(|(epoch, _)| *epoch).collect::<Vec<_>>(), [0], "only epoch 0's key");
    drop((groups, history));
    let on_disk: Vec<PathBuf> = files_under(&kept)
        .into_iter()
        .filter(|f| std::fs::read(f).is_ok_and(|b| memchr::memmem::find(&b, secret.as_bytes()).is_some()))
        .collect();
    assert!(on_disk.is_empty(), "{on_disk:?}");
    // And what it posts with the old key the relays refuse: nothing is stored.
    let before = held_by_relays(&mesh, &group);
    assert_eq!(before.iter().filter(|&&n| n > 0).count(), 2, "stored once, on R = 2 relays: {before:?}");
    let refused = meshgram(&kept, &["send", &group, "with the old key"]).expect_err(&["FORBIDDEN"]);
    assert!(str_field(&refused, "message").contains("epoch"), "{refused}");
    assert_eq!(held_by_relays(&mesh, &group), before);
}

#[test]
fn a_member_who_joins_by_link_reads_from_the_join_on_and_others_cannot_act_as_admins() {
    let mesh = Mesh::start(3, 2);
    let [alice, bob, dave, erin] = ["alice", "bob", "dave", "erin"].map(|n| mesh.new_profile(n));
    for (profile, phone) in [(&alice, PHONES[0]), (&bob, PHONES[1]), (&dave, PHONES[3]), (&erin, PHONES[4])] {
        mesh.login(profile, phone);
    }
    let group = create_group(&alice, "Club", &PHONES[1..2]);
    meshgram(&alice, &["send", &group, "old news"]).ok_json();

    // Admin-only actions, refused to a member who is no admin, with a clear error.
    for args in [
        vec!["group", "add", &group, PHONES[3]],
        vec!["group", "remove", &group, PHONES[0]],
        vec!["group", "title", &group, "Mine now"],
        vec!["group", "link", &group],
        vec!["group", "admin", &group, PHONES[1]],
    ] {
        let refused = meshgram(&bob, &args).expect_err(&["FORBIDDEN"]);
        assert!(str_field(&refused, "message").contains("only admins"), "{args:?}: {refused}");
    }
    // Someone not in it cannot post to it.
    assert_eq!(meshgram(&erin, &["send", &group, "hello?"]).expect_err(&["NOT_FOUND"])["code"], "NOT_FOUND");

    let link = str_field(&meshgram(&alice, &["group", "link", &group]).ok_json(), "link").to_string();
    // Alice's client node lets people in as they ask.
    let _node = start_node(&alice);
    let asked = meshgram(&dave, &["join", &link]).ok_json();
    assert_eq!(asked["group"], group.as_str(), "{asked}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while meshgram(&dave, &["group", "info", &group]).status.code() != Some(0) {
        assert!(Instant::now() < deadline, "dave was never let in");
        std::thread::sleep(Duration::from_millis(300));
    }
    meshgram(&alice, &["send", &group, "welcome dave"]).ok_json();
    assert_eq!(wait_for_texts(&dave, &group, 1), ["welcome dave"]);
    meshgram(&dave, &["send", &group, "thanks"]).ok_json();
    assert_eq!(wait_for_texts(&dave, &group, 2), ["welcome dave", "thanks"], "nothing from before the join");
    assert_eq!(wait_for_texts(&bob, &group, 3), ["old news", "welcome dave", "thanks"]);

    // A file in the group: uploaded once, downloaded by a member byte for byte.
    let original = alice.with_file_name("photo.bin");
    random_file(&original, 700 * 1024, "group photo");
    let path = original.display().to_string();
    let sent =
        spawn_meshgram(&dave, &["upload", &path, "--to", &group, "--caption", "for all"]).finish().ok_json_lines();
    let message = sent.last().cloned().unwrap();
    assert_eq!(wait_for_texts(&bob, &group, 4)[3], "for all");
    let copy = alice.with_file_name("photo-bob.bin");
    let id = str_field(&message, "id").to_string();
    meshgram(&bob, &["download", &id, "-o", &copy.display().to_string()]).ok_json_lines();
    assert_eq!(blake3_of_file(&copy), blake3_of_file(&original));

    // A revoked link lets nobody in.
    meshgram(&alice, &["group", "revoke-link", &group, &link]).ok_json();
    meshgram(&erin, &["join", &link]).ok_json();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(meshgram(&erin, &["group", "info", &group]).expect_err(&["NOT_FOUND"])["code"], "NOT_FOUND");
    let info = meshgram(&alice, &["group", "info", &group]).ok_json();
    assert_eq!(info["members"].as_array().map(Vec::len), Some(3), "{info}");
    assert_eq!(info["links"].as_array().map(Vec::len), Some(0), "{info}");
}
