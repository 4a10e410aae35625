//! The client node: `meshgram node` holds the profile, and the CLI goes through its control
//! socket; the same output either way; one node per profile; a killed node loses nothing; the
//! socket serves its owner only and survives garbage.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use meshgram_node::crypto::cert::CERT_CLOCK_SKEW_SECS;
use meshgram_tests::{
    CLI_BIN, Gateway, Mesh, array, bin_path, meshgram, run, start_node, start_node_as, str_field, texts, unix_now,
};
use serde_json::Value;

use super::{ALICE, BOB};

/// Sessions without the field that changes by itself (last seen).
fn sessions_without_last_seen(profile: &Path) -> Value {
    let mut list = meshgram(profile, &["sessions"]).ok_json();
    for s in list.as_array_mut().unwrap() {
        s.as_object_mut().unwrap().remove("last_seen");
    }
    list
}

/// One JSON line written to the socket, one answer line read back.
fn socket_call(stream: &mut UnixStream, line: &[u8]) -> Value {
    stream.write_all(line).unwrap();
    stream.write_all(b"\n").unwrap();
    let mut answer = String::new();
    BufReader::new(stream.try_clone().unwrap()).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("answer {answer:?} is not JSON: {e}"))
}

#[test]
fn the_cli_goes_through_a_running_node_and_prints_the_same() {
    let mesh = Mesh::start(3, 2);
    let (alice, bob) = (mesh.new_profile("alice"), mesh.new_profile("bob"));
    mesh.login(&alice, ALICE);
    mesh.login(&bob, BOB);
    meshgram(&alice, &["profile", "set", "--username", "alice_a", "--name", "Alice"]).ok_json();
    meshgram(&alice, &["send", BOB, "one"]).ok_json();
    meshgram(&alice, &["send", BOB, "two"]).ok_json();

    // Without a node: what Bob's commands print once the history has settled (opening the chat
    // reads it, so the first round changes what the second shows).
    let commands: [&[&str]; 4] = [&["messages"], &["messages", ALICE], &["chats"], &["whoami"]];
    commands.iter().for_each(|c| drop(meshgram(&bob, c).ok_json()));
    let without: Vec<Value> = commands.iter().map(|c| meshgram(&bob, c).ok_json()).collect();
    let sessions_without = sessions_without_last_seen(&bob);
    let text_without = run(&bin_path(CLI_BIN), &["--profile", bob.to_str().unwrap(), "chats"], None);

    // With Bob's node running it holds his history (redb opens a file once), so a command that
    // succeeds went through the node.
    let node = start_node(&bob);
    assert!(bob.join("node.sock").exists());
    let with: Vec<Value> = commands.iter().map(|c| meshgram(&bob, c).ok_json()).collect();
    assert_eq!(with, without, "the same JSON with and without the node");
    assert_eq!(sessions_without_last_seen(&bob), sessions_without);
    let text_with = run(&bin_path(CLI_BIN), &["--profile", bob.to_str().unwrap(), "chats"], None);
    assert_eq!(text_with.stdout, text_without.stdout, "the same text");
    // People are shown by name, not by bare user id.
    assert!(text_with.stdout.contains("Alice (@alice_a)"), "{text_with}");

    // Sending, editing and deleting through Bob's node.
    let sent = meshgram(&bob, &["send", ALICE, "hello from the node"]).ok_json();
    let id = array(&sent["ids"], "ids")[0].as_str().unwrap().to_string();
    let edited = meshgram(&bob, &["edit", &id, "edited through the node"]).ok_json();
    assert_eq!(str_field(&edited, "text"), "edited through the node");
    assert_eq!(edited["edited"], true);
    assert_eq!(texts(&meshgram(&alice, &["messages", BOB]).ok_json()), ["one", "two", "edited through the node"]);
    let deleted = meshgram(&bob, &["delete", &id]).ok_json();
    assert_eq!(deleted["deleted"], true);
    meshgram(&bob, &["delete", &id]).expect_err(&["FORBIDDEN"]);
    let alice_view = meshgram(&alice, &["messages", BOB]).ok_json();
    assert_eq!(array(&alice_view, "messages")[2]["deleted"], true);

    // Errors come back the same way too.
    meshgram(&bob, &["send", "@nobody_here", "hi"]).expect_err(&["NOT_FOUND"]);
    meshgram(&bob, &["edit", "zz", "x"]).expect_err(&["USAGE"]);
    drop(node);
}

#[test]
fn follow_through_the_node_prints_each_message_as_it_arrives() {
    let mesh = Mesh::start(2, 2);
    let (alice, bob) = (mesh.new_profile("alice"), mesh.new_profile("bob"));
    mesh.login(&alice, ALICE);
    mesh.login(&bob, BOB);
    meshgram(&alice, &["send", BOB, "before"]).ok_json();
    let _node = start_node(&bob);

    let mut follow = Command::new(bin_path(CLI_BIN))
        .args(["--profile", bob.to_str().unwrap(), "--json", "messages", "--follow"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = mpsc::channel::<(Instant, Value)>();
    let stdout = follow.stdout.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(value) = serde_json::from_str(&line) {
                let _ = lines_tx.send((Instant::now(), value));
            }
        }
    });
    let (_, first) = lines.recv_timeout(Duration::from_secs(30)).expect("the history");
    assert_eq!(first["text"], "before");

    // Each message is printed once, pushed by the node: at the latest 100 ms after the send
    // returns (by then the relays have it, and a waiting node gets it as it arrives).
    let mut latencies = Vec::new();
    for i in 0..5 {
        let text = format!("live {i}");
        meshgram(&alice, &["send", BOB, &text]).ok_json();
        let sent_at = Instant::now();
        let (printed_at, line) = lines.recv_timeout(Duration::from_secs(10)).expect("the new message");
        assert_eq!(line["text"], text.as_str(), "in order, once each");
        latencies.push(printed_at.saturating_duration_since(sent_at));
    }
    eprintln!("printed after the send returned: {latencies:?}");
    assert!(latencies.iter().all(|l| *l <= Duration::from_millis(100)), "{latencies:?}");
    assert!(lines.recv_timeout(Duration::from_millis(300)).is_err(), "nothing printed twice");
    let _ = follow.kill();
    let _ = follow.wait();
}

#[test]
fn one_node_per_profile_and_a_killed_node_loses_nothing_and_shows_nothing_twice() {
    let mesh = Mesh::start(2, 2);
    let (alice, bob) = (mesh.new_profile("alice"), mesh.new_profile("bob"));
    mesh.login(&alice, ALICE);
    mesh.login(&bob, BOB);
    let mut node = start_node(&bob);
    let pid = node.ready["pid"].as_u64().unwrap();

    // A second node on the profile is refused, naming the first.
    let second = meshgram(&bob, &["node"]);
    let error = second.expect_err(&["NODE_RUNNING"]);
    assert!(str_field(&error, "message").contains(&format!("pid {pid}")), "{second}");
    // So is signing in again under the running node.
    let args = mesh.login_args();
    let mut login: Vec<&str> = vec!["login"];
    login.extend(args.iter().map(String::as_str));
    login.extend(["--phone", BOB, "--code", "00000"]);
    meshgram(&bob, &login).expect_err(&["NODE_RUNNING"]);

    let expected: Vec<String> = (0..20).map(|i| format!("m{i:02}")).collect();
    for text in &expected[..10] {
        meshgram(&alice, &["send", BOB, text]).ok_json();
    }
    // Let the node record some of them, then kill it without warning.
    thread::sleep(Duration::from_millis(300));
    node.kill9();
    assert!(bob.join("node.sock").exists(), "a killed node leaves its socket behind");
    for text in &expected[10..15] {
        meshgram(&alice, &["send", BOB, text]).ok_json();
    }
    // The stale socket is no node: a command opens the profile itself.
    meshgram(&bob, &["whoami"]).ok_json();
    // A new node replaces the stale socket and picks up where the killed one stopped.
    let _node = start_node(&bob);
    for text in &expected[15..] {
        meshgram(&alice, &["send", BOB, text]).ok_json();
    }
    let inbox = meshgram(&bob, &["messages", ALICE]).ok_json();
    assert_eq!(texts(&inbox), expected, "all 20, once each, in order");
}

#[test]
fn garbage_on_the_socket_gets_an_error_line_and_the_node_keeps_serving() {
    let mesh = Mesh::start(1, 1);
    let bob = mesh.new_profile("bob");
    mesh.login(&bob, BOB);
    let _node = start_node(&bob);
    let socket = bob.join("node.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "only the profile's owner may use the socket");

    let mut stream = UnixStream::connect(&socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    for garbage in [&b"not json"[..], b"{\"call\":\"format_disk\"}", b"[1,2,3]", &[0xff, 0xfe, 0x00]] {
        let answer = socket_call(&mut stream, garbage);
        assert_eq!(answer["error"]["code"], "BAD_REQUEST", "{answer}");
    }
    // The same connection still serves a real call.
    let answer = socket_call(&mut stream, br#"{"call":"whoami"}"#);
    assert!(answer["ok"]["account"]["user_id"].is_u64(), "{answer}");

    // A line too long to be a call is refused and its connection closed; the node goes on.
    let mut flood = UnixStream::connect(&socket).unwrap();
    flood.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let big = vec![b'x'; 65 * 1024 * 1024];
    let _ = flood.write_all(&big);
    let mut answer = String::new();
    let _ = BufReader::new(flood).read_line(&mut answer);
    assert!(answer.contains("BAD_REQUEST"), "{answer:?}");
    meshgram(&bob, &["whoami"]).ok_json();
}

/// Whether this test runs as root (needed to act as another user).
fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// A copy of the CLI in a directory `nobody` can read (the build tree may not be).
fn cli_for_nobody(dir: &Path) -> PathBuf {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("meshgram");
    std::fs::copy(bin_path(CLI_BIN), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

const AS_NOBODY: [&str; 4] = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"];

#[test]
fn another_local_user_cannot_use_the_node() {
    if !is_root() {
        eprintln!("skipped: acting as another user needs root");
        return;
    }
    let mesh = Mesh::start(1, 1);
    let shared = tempfile::tempdir().unwrap();
    let cli = cli_for_nobody(shared.path());

    // Root's node, on a profile dir others may enter: nobody's CLI cannot open the socket
    // (mode 0600), and says so instead of falling back to the profile (which it cannot read).
    let bob = shared.path().join("bob");
    std::fs::create_dir(&bob).unwrap();
    mesh.login(&bob, BOB);
    std::fs::set_permissions(&bob, std::fs::Permissions::from_mode(0o755)).unwrap();
    let node = start_node(&bob);
    let mut args: Vec<&str> = AS_NOBODY.to_vec();
    let cli_str = cli.display().to_string();
    let bob_str = bob.display().to_string();
    args.extend([cli_str.as_str(), "--profile", &bob_str, "--json", "whoami"]);
    let denied = run(Path::new(args[0]), &args[1..], None);
    denied.expect_err(&["PROFILE"]);
    assert!(denied.stdout.contains("node.sock"), "{denied}");
    drop(node);

    // Nobody's node: root gets past the file mode, but the node checks the caller's uid.
    let carol = shared.path().join("carol");
    std::fs::create_dir(&carol).unwrap();
    mesh.login(&carol, "+15550003333");
    let chown = Command::new("chown").args(["-R", "65534:65534", carol.to_str().unwrap()]).status().unwrap();
    assert!(chown.success());
    let _nobody_node = start_node_as(&AS_NOBODY, &cli, &carol);
    let refused = meshgram(&carol, &["whoami"]);
    let error = refused.expect_err(&["FORBIDDEN"]);
    assert!(str_field(&error, "message").contains("65534"), "{refused}");
}

/// `cert.body.not_after` of the profile's saved session.
fn saved_cert_expiry(profile: &Path) -> u64 {
    let session: Value = serde_json::from_slice(&std::fs::read(profile.join("session.json")).unwrap()).unwrap();
    session["cert"]["body"]["not_after"].as_u64().unwrap()
}

#[test]
fn a_running_node_renews_its_certificate_and_keeps_receiving_past_the_first_expiry() {
    // One-minute certificates: the node renews at half-life, with no command run meanwhile.
    let gateway = Gateway::builder().arg("--cert-ttl-secs").arg("60").start();
    let mesh = Mesh::start_on(gateway, 2, 2);
    let (alice, bob) = (mesh.new_profile("alice"), mesh.new_profile("bob"));
    mesh.login(&alice, ALICE);
    mesh.login(&bob, BOB);
    let first_expiry = saved_cert_expiry(&bob);
    let _node = start_node(&bob);

    let deadline = Instant::now() + Duration::from_secs(60);
    while saved_cert_expiry(&bob) == first_expiry {
        assert!(Instant::now() < deadline, "the node did not renew its certificate");
        thread::sleep(Duration::from_millis(500));
    }
    // Past the first certificate's end (and the relays' allowance for clock skew), Bob's node,
    // greeting the relays anew with its renewed certificate, still gets messages.
    while unix_now() <= first_expiry + CERT_CLOCK_SKEW_SECS + 1 {
        thread::sleep(Duration::from_millis(500));
    }
    meshgram(&alice, &["send", BOB, "after the first certificate expired"]).ok_json();
    let inbox = meshgram(&bob, &["messages"]).ok_json();
    assert_eq!(texts(&inbox), ["after the first certificate expired"]);
}
