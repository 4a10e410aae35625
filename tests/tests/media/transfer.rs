use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use meshgram_node::client::net::ClientNet;
use meshgram_node::client::session::SavedSession;
use meshgram_node::crypto::identity::DeviceIdentity;
use meshgram_node::net::pipe;
use meshgram_node::proto::RelayInfo;
use meshgram_node::proto::media::{ChunkHash, FileRef, MEDIA_LIMITS, MediaRequest, MediaResponse};

use meshgram_tests::{
    Mesh, array, blake3_of_file, files_under, meshgram, random_file, relay_metric, spawn_meshgram, str_field,
};
use serde_json::Value;

use super::{ALICE, BOB, CAROL};

const MIB: u64 = 1024 * 1024;
/// Generous: a debug build moves a few tens of MiB/s through three relays on two cores.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(600);

/// Parts the relays acknowledged, over all relays (each acknowledged part counts once, on the
/// relay the client sent it to).
fn parts_saved(mesh: &Mesh) -> u64 {
    mesh.relays.iter().filter_map(|r| relay_metric(r, "meshgram_relay_media_parts_saved")).sum()
}

/// The message in `messages --json` output that carries a file.
fn file_message(messages: &Value) -> Value {
    array(messages, "messages").iter().find(|m| !m["file"].is_null()).cloned().expect("a message with a file")
}

/// Signs each (name, phone) in on a profile of its own; returns a directory for the test's
/// files and the profiles.
fn sign_in<const N: usize>(mesh: &Mesh, users: [(&str, &str); N]) -> (PathBuf, [PathBuf; N]) {
    let files = mesh.gateway.tmp().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let profiles = users.map(|(name, phone)| {
        let profile = mesh.new_profile(name);
        mesh.login(&profile, phone);
        profile
    });
    (files, profiles)
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

#[test]
fn a_256_mib_file_survives_a_killed_upload_a_killed_relay_and_a_corrupt_chunk() {
    let mesh = Mesh::start(3, 2);
    let (files, [alice, bob, carol]) = sign_in(&mesh, [("alice", ALICE), ("bob", BOB), ("carol", CAROL)]);
    let original = files.join("big.bin");
    let size = 256 * MIB;
    random_file(&original, size, "a 256 MiB test file");
    let data_parts = size / (512 * 1024);

    // The upload is SIGKILLed once about half its parts are saved...
    let upload = ["upload", path_str(&original), "--to", BOB, "--caption", "the big one"];
    let first = spawn_meshgram(&alice, &upload).with_timeout(TRANSFER_TIMEOUT);
    let deadline = Instant::now() + TRANSFER_TIMEOUT;
    while parts_saved(&mesh) < data_parts / 2 {
        assert!(Instant::now() < deadline, "half the upload was not saved in {TRANSFER_TIMEOUT:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let killed = first.kill();
    assert!(!killed.status.success(), "the upload was killed before it finished:\n{killed}");
    // Parts in flight when it died are finished (or not) by the relays; then nothing moves.
    std::thread::sleep(Duration::from_secs(2));
    let saved_before = parts_saved(&mesh);
    assert!(saved_before < data_parts, "the upload was killed halfway, not after {saved_before} parts");

    // ...and resumes: the relays say which parts they have, and only the others are sent.
    let resumed = spawn_meshgram(&alice, &upload).with_timeout(TRANSFER_TIMEOUT).finish().ok_json_lines();
    let sent = resumed.last().cloned().expect("upload prints the message it sent");
    let first_event = resumed.iter().find(|e| e["event"] == "transfer").expect("upload --json prints progress");
    assert_eq!(first_event["progress"]["resumed_parts"].as_u64(), Some(saved_before), "{first_event}");
    assert_eq!(parts_saved(&mesh), data_parts + 1, "every part (and the manifest) was sent once, none twice");
    assert_eq!(sent["file"]["size"].as_u64(), Some(size));
    assert_eq!(str_field(&sent, "text"), "the big one");

    // Bob gets the message with its file reference, and the file, byte for byte.
    let inbox = meshgram(&bob, &["messages"]).ok_json();
    let message = file_message(&inbox);
    assert_eq!(str_field(&message["file"], "name"), "big.bin");
    let message_id = str_field(&message, "id").to_string();
    let copy = files.join("bob.bin");
    let done = spawn_meshgram(&bob, &["download", &message_id, "-o", path_str(&copy)])
        .with_timeout(TRANSFER_TIMEOUT)
        .finish()
        .ok_json_lines();
    assert_eq!(done.last().unwrap()["size"].as_u64(), Some(size));
    let original_hash = blake3_of_file(&original);
    assert_eq!(blake3_of_file(&copy), original_hash, "downloaded bytes differ");

    // No relay's files hold plaintext: a 64-byte window from the middle of the file.
    let bytes = std::fs::read(&original).unwrap();
    let middle = (size / 2) as usize + 12_345;
    let found = mesh.relay_files_containing(&bytes[middle..middle + 64]);
    assert!(found.is_empty(), "plaintext on a relay's disk: {found:?}");
    drop(bytes);

    // A chunk corrupted on one relay's disk, and another relay SIGKILLed: a forward to Carol
    // reuses the stored chunks, and her download still gets every part right.
    // One that relay 2 holds too: with relay 0 down, relay 2's copy is the good one left.
    let chunk_files = |relay: usize| {
        files_under(&mesh.relays[relay].data_dir.join("chunks"))
            .into_iter()
            .filter(|f| f.file_name().is_some_and(|n| n.len() == 64))
            .collect::<Vec<_>>()
    };
    let on_relay_2: std::collections::HashSet<_> =
        chunk_files(2).iter().filter_map(|f| f.file_name().map(|n| n.to_owned())).collect();
    let chunks: Vec<_> =
        chunk_files(1).into_iter().filter(|f| f.file_name().is_some_and(|n| on_relay_2.contains(n))).collect();
    assert!(!chunks.is_empty(), "relays 1 and 2 share chunks");
    let mut corrupt = std::fs::read(&chunks[0]).unwrap();
    corrupt[100] ^= 0xff;
    std::fs::write(&chunks[0], corrupt).unwrap();
    let mut mesh = mesh;
    mesh.relays[0].kill9();
    let saved = parts_saved(&mesh);
    let forwarded = meshgram(&alice, &["forward", &message_id, "--to", CAROL]).ok_json();
    assert_eq!(forwarded["file"]["file_id"], message["file"]["file_id"], "the same file, not a new upload");
    assert_eq!(parts_saved(&mesh), saved, "a forward uploads nothing");
    let carol_inbox = meshgram(&carol, &["messages"]).ok_json();
    let carol_message = file_message(&carol_inbox);
    let carol_copy = files.join("carol.bin");
    let carol_id = str_field(&carol_message, "id");
    spawn_meshgram(&carol, &["download", carol_id, "-o", path_str(&carol_copy)])
        .with_timeout(TRANSFER_TIMEOUT)
        .finish()
        .ok_json_lines();
    assert_eq!(blake3_of_file(&carol_copy), original_hash, "downloaded bytes differ with a relay down");
}

#[test]
fn bad_transfers_fail_clearly_and_write_nothing() {
    let mesh = Mesh::start(2, 2);
    let (files, [alice, bob]) = sign_in(&mesh, [("alice", ALICE), ("bob", BOB)]);

    meshgram(&alice, &["upload", path_str(&files.join("missing")), "--to", BOB]).expect_err(&["USAGE"]);
    meshgram(&alice, &["upload", path_str(&files), "--to", BOB]).expect_err(&["FILE"]);
    let small = files.join("small.txt");
    random_file(&small, 10_000, "small");
    meshgram(&alice, &["upload", path_str(&small), "--to", BOB, "--part-size-kib", "2"]).expect_err(&["FILE"]);
    meshgram(&alice, &["upload", path_str(&small), "--to", "@nobody_here"]).expect_err(&["NOT_FOUND"]);

    // A text message has no file to download; an unknown message is not found.
    let sent = meshgram(&alice, &["send", BOB, "just text"]).ok_json();
    let text_id = array(&sent["ids"], "ids")[0].as_str().unwrap().to_string();
    meshgram(&bob, &["messages"]).ok_json();
    meshgram(&bob, &["download", &text_id]).expect_err(&["NOT_FOUND"]);
    meshgram(&bob, &["download", "00000000000000000000000000000000"]).expect_err(&["NOT_FOUND"]);

    // A small file round-trips (one part and the manifest) into a directory, by its name.
    let out = meshgram(&alice, &["upload", path_str(&small), "--to", BOB]).ok_json_lines();
    assert_eq!(out.last().unwrap()["file"]["mime"], "text/plain");
    let message = file_message(&meshgram(&bob, &["messages"]).ok_json());
    let into = files.join("into");
    std::fs::create_dir_all(&into).unwrap();
    meshgram(&bob, &["download", str_field(&message, "id"), "-o", path_str(&into)]).ok_json_lines();
    assert_eq!(blake3_of_file(&into.join("small.txt")), blake3_of_file(&small));

    // A range, as a player asks for: exactly those bytes; one past the end is refused.
    let part = files.join("range.bin");
    let id = str_field(&message, "id");
    meshgram(&bob, &["download", id, "-o", path_str(&part), "--range", "100-9099"]).ok_json_lines();
    assert_eq!(std::fs::read(&part).unwrap(), std::fs::read(&small).unwrap()[100..9100]);
    let past = files.join("past.bin");
    meshgram(&bob, &["download", id, "-o", path_str(&past), "--range", "0-10000"]).expect_err(&["FILE"]);
    meshgram(&bob, &["download", id, "--range", "9-1"]).expect_err(&["USAGE"]);
    assert!(!past.exists(), "nothing written for a refused download");
}

#[test]
fn an_image_travels_with_a_thumbnail_made_by_its_sender() {
    let mesh = Mesh::start(2, 2);
    let (files, [alice, bob]) = sign_in(&mesh, [("alice", ALICE), ("bob", BOB)]);
    let photo = files.join("sunset.png");
    image::RgbImage::from_fn(640, 480, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 128]))
        .save(&photo)
        .unwrap();
    meshgram(&alice, &["upload", path_str(&photo), "--to", BOB, "--caption", "look"]).ok_json_lines();
    let message = file_message(&meshgram(&bob, &["messages"]).ok_json());
    assert_eq!(message["file"]["mime"], "image/png");
    let thumbnail: Vec<u8> =
        array(&message["file"]["thumbnail"], "thumbnail").iter().map(|b| b.as_u64().unwrap() as u8).collect();
    let preview = image::load_from_memory(&thumbnail).expect("the thumbnail is an image");
    assert_eq!((preview.width(), preview.height()), (90, 68), "the longest side is 90 pixels");
}

#[test]
fn a_ranged_download_fetches_only_the_parts_that_cover_it() {
    let mesh = Mesh::start(2, 2);
    let (files, [alice, bob]) = sign_in(&mesh, [("alice", ALICE), ("bob", BOB)]);
    let original = files.join("song.mp3");
    random_file(&original, 4 * MIB, "a song");
    meshgram(&alice, &["upload", path_str(&original), "--to", BOB, "--part-size-kib", "64"]).ok_json_lines();
    let message = file_message(&meshgram(&bob, &["messages"]).ok_json());
    // Bytes 1 MiB + 10 .. 1 MiB + 200 KiB: parts 16 to 19 of 64.
    let (start, end) = (MIB + 10, MIB + 200 * 1024);
    let out = files.join("middle.bin");
    let range = format!("{start}-{end}");
    let events = meshgram(&bob, &["download", str_field(&message, "id"), "-o", path_str(&out), "--range", &range])
        .ok_json_lines();
    let last_progress = events.iter().rev().find(|e| e["event"] == "transfer").unwrap();
    assert_eq!(last_progress["progress"]["total_parts"].as_u64(), Some(4), "{last_progress}");
    let bytes = std::fs::read(&original).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), bytes[start as usize..=end as usize]);
}

#[test]
fn a_peer_that_downloaded_a_file_serves_it_while_every_relay_holding_it_is_down() {
    let mut mesh = Mesh::start(5, 2);
    let (files, [alice, bob, carol]) = sign_in(&mesh, [("alice", ALICE), ("bob", BOB), ("carol", CAROL)]);
    // One part and the manifest: two chunks on at most four of the five relays.
    let original = files.join("photo.jpg");
    random_file(&original, 300 * 1024, "a photo");
    let sent = meshgram(&alice, &["upload", path_str(&original), "--to", BOB]).ok_json_lines();
    let message_id = str_field(sent.last().unwrap(), "id").to_string();
    assert_eq!(sent.last().unwrap()["file"]["mime"], "image/jpeg");
    meshgram(&alice, &["forward", &message_id, "--to", CAROL]).ok_json();

    // Bob downloads it, and his node then serves it to peers.
    let bob_message = file_message(&meshgram(&bob, &["messages"]).ok_json());
    let bob_copy = files.join("bob.jpg");
    meshgram(&bob, &["download", str_field(&bob_message, "id"), "-o", path_str(&bob_copy)]).ok_json_lines();
    let _bob_node = meshgram_tests::start_node(&bob);
    let carol_message = file_message(&meshgram(&carol, &["messages"]).ok_json());
    let deadline = Instant::now() + Duration::from_secs(30);
    while mesh.relays.iter().filter_map(|r| relay_metric(r, "meshgram_relay_media_provider_records")).sum::<u64>() == 0
    {
        assert!(Instant::now() < deadline, "Bob's node announced nothing within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Every relay holding a chunk of the file goes down.
    let holds_chunks =
        |dir: &Path| files_under(&dir.join("chunks")).iter().any(|f| f.file_name().is_some_and(|n| n.len() == 64));
    let mut stopped = 0;
    for relay in &mut mesh.relays {
        if holds_chunks(&relay.data_dir) {
            relay.kill9();
            stopped += 1;
        }
    }
    assert!((1..5).contains(&stopped), "{stopped} relays held chunks");

    // Carol gets the file from Bob's node, byte for byte.
    let carol_copy = files.join("carol.jpg");
    meshgram(&carol, &["download", str_field(&carol_message, "id"), "-o", path_str(&carol_copy)]).ok_json_lines();
    assert_eq!(blake3_of_file(&carol_copy), blake3_of_file(&original));
}

/// A signed-in profile's device turned liar: it announces to `relays` that it serves the file
/// with provider key `file`, and answers every chunk asked of it with garbage. Returns how many
/// chunks it was asked for so far.
fn start_lying_provider(
    runtime: &tokio::runtime::Runtime,
    profile: &Path,
    relays: &[RelayInfo],
    file: ChunkHash,
) -> Arc<AtomicUsize> {
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&asked);
    let identity = DeviceIdentity::load_or_create(profile).unwrap();
    let cert = SavedSession::load(profile).unwrap().expect("mallory signed in").cert;
    runtime.block_on(async move {
        let net = ClientNet::spawn(&identity).unwrap();
        let addr = net.listen("/ip4/127.0.0.1/tcp/0".parse().unwrap()).await.unwrap();
        for relay in relays {
            let hello = MediaRequest::Hello { cert: cert.clone() };
            let welcome = net.media_request(relay.peer_id, relay.addrs.clone(), &hello).await.unwrap();
            assert!(matches!(welcome, MediaResponse::Welcome { .. }), "{}", welcome.kind());
            let provide = MediaRequest::Provide { files: vec![file], addrs: vec![addr.clone()] };
            let provided = net.media_request(relay.peer_id, relay.addrs.clone(), &provide).await.unwrap();
            assert!(matches!(provided, MediaResponse::Provided), "{}", provided.kind());
        }
        let mut incoming = net.accept_media().unwrap();
        let me = identity.peer_id();
        tokio::spawn(async move {
            let _net = net;
            let (tx, mut requests) = tokio::sync::mpsc::channel(64);
            let mut pipes = Vec::new();
            let serving = pipe::Serving::new(MEDIA_LIMITS);
            loop {
                tokio::select! {
                    Some((peer, stream)) = incoming.next() => pipes.push(pipe::serve(peer, stream, &serving, &Default::default(), tx.clone())),
                    Some(inbound) = requests.recv() => {
                        let pipe::Inbound { request, responder, .. } = inbound;
                        responder.respond(match request {
                            Ok(MediaRequest::GetChunk { .. }) => {
                                counter.fetch_add(1, Ordering::SeqCst);
                                MediaResponse::Chunk { bytes: vec![0xee; 4096] }
                            }
                            _ => MediaResponse::Welcome { relay: me },
                        });
                    }
                }
            }
        });
    });
    asked
}

#[test]
fn a_peer_serving_corrupt_chunks_is_caught_and_an_honest_one_serves_instead() {
    let mut mesh = Mesh::start(5, 2);
    let (files, [alice, bob, carol, mallory]) =
        sign_in(&mesh, [("alice", ALICE), ("bob", BOB), ("carol", CAROL), ("mallory", "+15550004444")]);
    let original = files.join("photo.jpg");
    random_file(&original, 300 * 1024, "another photo");
    let sent = meshgram(&alice, &["upload", path_str(&original), "--to", BOB]).ok_json_lines();
    let message_id = str_field(sent.last().unwrap(), "id").to_string();
    meshgram(&alice, &["forward", &message_id, "--to", CAROL]).ok_json();
    let bob_message = file_message(&meshgram(&bob, &["messages"]).ok_json());
    meshgram(&bob, &["download", str_field(&bob_message, "id"), "-o", path_str(&files.join("bob.jpg"))])
        .ok_json_lines();
    let carol_message = file_message(&meshgram(&carol, &["messages"]).ok_json());
    let file: FileRef = serde_json::from_value(carol_message["file"].clone()).unwrap();

    // Every relay holding a chunk of the file goes down; Mallory claims to serve it.
    let holds_chunks =
        |dir: &Path| files_under(&dir.join("chunks")).iter().any(|f| f.file_name().is_some_and(|n| n.len() == 64));
    let mut left = Vec::new();
    for relay in &mut mesh.relays {
        if holds_chunks(&relay.data_dir) {
            relay.kill9();
        } else {
            let mut addr: libp2p::Multiaddr = relay.tcp_addr().parse().unwrap();
            addr.pop();
            left.push(RelayInfo { peer_id: relay.peer_id().parse().unwrap(), addrs: vec![addr] });
        }
    }
    assert!(!left.is_empty(), "a relay without chunks of the file is left");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let asked = start_lying_provider(&runtime, &mallory, &left, file.provider_key());

    // With only Mallory to ask, the download fails clearly and writes nothing.
    let carol_copy = files.join("carol.jpg");
    let carol_id = str_field(&carol_message, "id").to_string();
    meshgram(&carol, &["download", &carol_id, "-o", path_str(&carol_copy)]).expect_err(&["NETWORK"]);
    assert!(asked.load(Ordering::SeqCst) > 0, "Mallory was asked");
    assert!(!carol_copy.exists(), "nothing written from a corrupt chunk");

    // Bob's node serves it too: Carol gets every part right, whatever Mallory says.
    let _bob_node = meshgram_tests::start_node(&bob);
    let deadline = Instant::now() + Duration::from_secs(30);
    while mesh.relays.iter().filter_map(|r| relay_metric(r, "meshgram_relay_media_provider_records")).sum::<u64>()
        < 2 * left.len() as u64
    {
        assert!(Instant::now() < deadline, "Bob's node announced nothing within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    meshgram(&carol, &["download", &carol_id, "-o", path_str(&carol_copy)]).ok_json_lines();
    assert_eq!(blake3_of_file(&carol_copy), blake3_of_file(&original));
}
