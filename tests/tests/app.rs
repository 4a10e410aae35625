//! The desktop app (`meshgram app`): its page driven in Debian's chromium by Playwright
//! (tests/app/ui_test.py), two users on one local network with a bot; and the app as a
//! process — one per profile, its address found again by a second `meshgram app`.

// A failed unwrap here is a failed test, which is what it should be.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use meshgram_tests::{CLI_BIN, Mesh, bin_path, meshgram, target_dir};

/// The whole browser run: sign-ins, chats, a photo, a video, a group, a secret chat, a bot,
/// two windows' sizes, each screen in two themes. Generous for a debug build on two cores.
const UI_TIMEOUT: Duration = Duration::from_secs(480);

#[test]
fn two_users_use_the_app_in_a_browser() {
    let mesh = Mesh::start(3, 2);
    let bridge_dir = mesh.gateway.tmp().join("bridge");
    let bridge = mesh.start_bridge(&bridge_dir);
    let (alice, bob) = (mesh.new_profile("alice"), mesh.new_profile("bob"));
    let (alice_app, bob_app) = (mesh.start_app(&alice), mesh.start_app(&bob));
    let url = |app: &meshgram_tests::Server| app.ready["url"].as_str().unwrap().to_string();
    let shots = target_dir().join("app-screenshots");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("app/ui_test.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .env("MESHGRAM", bin_path(CLI_BIN))
        .env("CODES", mesh.gateway.code_sink_file().unwrap())
        .env("SHOTS", &shots)
        .env("BOT_API", bridge.ready["bot_api"].as_str().unwrap().trim_end_matches("/bot"))
        .env("A_URL", url(&alice_app))
        .env("B_URL", url(&bob_app))
        .env("A_PROFILE", &alice)
        .env("B_PROFILE", &bob)
        .stdin(Stdio::null())
        .spawn()
        .expect("python3 runs the browser test");
    let deadline = Instant::now() + UI_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the browser test did not finish within {UI_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(200));
    };
    assert!(
        status.success(),
        "the browser test failed ({status}); its output is above; screenshots in {}",
        shots.display()
    );
    // What the page did is in the profiles: the same node the CLI reaches.
    let chats = meshgram(&alice, &["chats"]).ok_json();
    assert!(chats.as_array().unwrap().len() >= 3, "{chats}");
}

#[test]
fn a_second_app_on_a_profile_opens_the_running_one() {
    let mesh = Mesh::start(1, 1);
    let profile = mesh.new_profile("carol");
    let app = mesh.start_app(&profile);
    let first = app.ready["url"].as_str().unwrap();
    assert!(first.starts_with("http://127.0.0.1:") && first.contains("/#token="), "{first}");

    let again = meshgram(&profile, &["app", "--no-open"]).ok_json();
    assert_eq!(again["url"], first, "{again}");
    assert_eq!(again["already_running"], true, "{again}");

    // The app holds the profile even before it is signed in: a sign-in from the CLI is told so.
    let args = mesh.login_args();
    let mut login = vec!["login", "--phone", "+15550008001"];
    login.extend(args.iter().map(String::as_str));
    let refused = meshgram(&profile, &login).expect_err(&["NODE_RUNNING"]);
    assert!(refused["message"].as_str().unwrap().contains("app"), "{refused}");
}
