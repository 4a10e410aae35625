//! The desktop app (`meshgram app`): its page driven in Debian's chromium by Playwright
//! (tests/app/ui_test.py), two users on one local network with a bot; and the app as a
//! process — one per profile, its address found again by a second `meshgram app`.

// A failed unwrap here is a failed test, which is what it should be.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use meshgram_tests::{CLI_BIN, Mesh, Server, bin_path, meshgram, start_relay, target_dir};

/// The whole browser run: sign-ins, chats, a photo, a video, a group, a secret chat, a bot,
/// two windows' sizes, each screen in two themes. Generous for a debug build on two cores.
const UI_TIMEOUT: Duration = Duration::from_secs(480);

/// Runs tests/app/ui_test.py (`scenario`: its argument) with `env`, doing what it asks of the
/// network through files in a control dir: for a request file NAME, `act(NAME)`, then NAME-done.
fn run_ui_test(scenario: Option<&str>, env: &[(&str, String)], control: &Path, mut act: impl FnMut(&str)) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("app/ui_test.py");
    let mut command = Command::new("python3");
    command.arg(&script).args(scenario).envs(env.iter().map(|(k, v)| (k, v))).env("CONTROL", control);
    let mut child = command.stdin(Stdio::null()).spawn().expect("python3 runs the browser test");
    let deadline = Instant::now() + UI_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the browser test did not finish within {UI_TIMEOUT:?}");
        }
        for entry in std::fs::read_dir(control).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            if !name.ends_with("-done") && !control.join(format!("{name}-done")).exists() {
                act(&name);
                std::fs::write(control.join(format!("{name}-done")), b"").unwrap();
            }
        }
        thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "the browser test failed ({status}); its output is above");
}

/// What the script needs to know of two apps on `mesh`.
fn ui_env(mesh: &Mesh, apps: [(&Path, &Server); 2]) -> Vec<(&'static str, String)> {
    let url = |app: &Server| app.ready["url"].as_str().unwrap().to_string();
    vec![
        ("MESHGRAM", bin_path(CLI_BIN).display().to_string()),
        ("CODES", mesh.gateway.code_sink_file().unwrap().display().to_string()),
        ("SHOTS", target_dir().join("app-screenshots").display().to_string()),
        ("A_URL", url(apps[0].1)),
        ("B_URL", url(apps[1].1)),
        ("A_PROFILE", apps[0].0.display().to_string()),
        ("B_PROFILE", apps[1].0.display().to_string()),
        ("LOGIN_ARGS", mesh.login_args().join(" ")),
    ]
}

#[test]
fn two_users_use_the_app_in_a_browser() {
    let mesh = Mesh::start(3, 2);
    let bridge = mesh.start_bridge(&mesh.gateway.tmp().join("bridge"));
    let (alice, bob) = (mesh.new_profile("alice"), mesh.new_profile("bob"));
    let (alice_app, bob_app) = (mesh.start_app(&alice), mesh.start_app(&bob));
    let mut env = ui_env(&mesh, [(&alice, &alice_app), (&bob, &bob_app)]);
    env.push(("BOT_API", bridge.ready["bot_api"].as_str().unwrap().trim_end_matches("/bot").to_string()));
    let control = mesh.gateway.tmp().join("control");
    std::fs::create_dir_all(&control).unwrap();
    run_ui_test(None, &env, &control, |what| panic!("nothing to {what} in this scenario"));
    // What the page did is in the profiles: the same node the CLI reaches.
    let chats = meshgram(&alice, &["chats"]).ok_json();
    assert!(chats.as_array().unwrap().len() >= 3, "{chats}");
}

#[test]
fn the_app_says_when_relays_are_unreachable_and_recovers() {
    let mut mesh = Mesh::start(1, 1);
    let (alice, bob) = (mesh.new_profile("alice"), mesh.new_profile("bob"));
    let (alice_app, bob_app) = (mesh.start_app(&alice), mesh.start_app(&bob));
    let env = ui_env(&mesh, [(&alice, &alice_app), (&bob, &bob_app)]);
    let control = mesh.gateway.tmp().join("control");
    std::fs::create_dir_all(&control).unwrap();
    let relay = &mesh.relays[0];
    let (port, data) = (relay.tcp_port(), relay.data_dir.clone());
    let key = mesh.gateway.server.ready["public_key"].as_str().unwrap().to_string();
    run_ui_test(Some("offline"), &env, &control, |what| match what {
        "kill-relay" => mesh.relays[0].kill9(),
        "restart-relay" => mesh.relays[0] = start_relay(&data, &key, 1, port, &[]).unwrap(),
        other => panic!("unknown request {other}"),
    });
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
