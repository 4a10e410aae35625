//! Real bot libraries against the bridge.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use meshgram_tests::{Mesh, meshgram, random_file};
use serde_json::Value;

use crate::{BotNet, bot_net, wait_chat};

/// A bot process, killed with the test.
struct BotProcess(Child);

impl Drop for BotProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the python-telegram-bot bot: polling, or in webhook mode on `webhook_port`.
fn start_ptb(base: &str, token: &str, webhook_port: Option<u16>) -> BotProcess {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bots/ptb_echo.py");
    let mut args = vec![script.to_string(), base.to_string(), token.to_string()];
    args.extend(webhook_port.map(|p| p.to_string()));
    let bot = Command::new("python3")
        .args(&args)
        .stdin(Stdio::null())
        .spawn()
        .expect("python3 runs (./tests/run installs python-telegram-bot)");
    BotProcess(bot)
}

fn texts_from(messages: &[Value], from_bot: bool) -> Vec<String> {
    messages
        .iter()
        .filter(|m| m["outgoing"] == !from_bot)
        .map(|m| m["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn an_unmodified_python_telegram_bot_answers_edits_formats_and_has_keyboards() {
    let BotNet { mesh, alice: alice_p, alice_id, token, bridge, .. } = bot_net("ptb_echo_bot");
    let base = bridge.ready["bot_api"].as_str().unwrap().to_string();

    let _bot = start_ptb(&base, &token, None);
    // What the bot lists with setMyCommands, users see.
    let mut commands = Value::Null;
    for _ in 0..100 {
        commands = meshgram(&alice_p, &["bot", "commands", "@ptb_echo_bot", "--json"]).ok_json();
        if commands.as_array().is_some_and(|c| !c.is_empty()) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(commands[0], serde_json::json!({"command": "start", "description": "Say hello"}), "{commands}");
    assert_eq!(commands.as_array().map(Vec::len), Some(3), "{commands}");

    meshgram(&alice_p, &["send", "@ptb_echo_bot", "/start", "--json"]).ok_json();
    meshgram(&alice_p, &["send", "@ptb_echo_bot", "hello there", "--json"]).ok_json();
    meshgram(&alice_p, &["send", "@ptb_echo_bot", "edit me", "--json"]).ok_json();
    let messages = wait_chat(&alice_p, "@ptb_echo_bot", "three answers from the PTB bot", |m| {
        let answers = texts_from(m, true);
        answers.len() >= 3 && answers.iter().any(|t| t == "final")
    });
    let answers = texts_from(&messages, true);
    assert_eq!(
        answers,
        vec![format!("Hello User {alice_id}, I am ptb_echo_bot"), "echo: hello there".into(), "final".into()],
        "each message answered once, in order; HTML parsed to plain text; the draft edited: {messages:#?}"
    );
    let edited = messages.iter().find(|m| m["text"] == "final").unwrap();
    assert_eq!(edited["edited"], true, "{edited}");
    assert_eq!(texts_from(&messages, false).len(), 3);
    // Nothing more comes: each update went to the bot once.
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(texts_from(&crate::chat(&alice_p, "@ptb_echo_bot"), true).len(), 3);

    press_inline_button(&alice_p, "@ptb_echo_bot", "You chose yes", &format!("Chosen: yes by User {alice_id}"));

    // A reply keyboard: pressing a button sends its text, which the bot echoes.
    meshgram(&alice_p, &["send", "@ptb_echo_bot", "/colors", "--json"]).ok_json();
    let messages =
        wait_chat(&alice_p, "@ptb_echo_bot", "the colors", |m| texts_from(m, true).contains(&"Pick a color".into()));
    let colors = messages.iter().find(|m| m["text"] == "Pick a color").unwrap();
    let sent = meshgram(&alice_p, &["press", colors["id"].as_str().unwrap(), "Red", "--json"]).ok_json();
    assert_eq!(sent["message"]["text"], "Red", "{sent}");
    wait_chat(&alice_p, "@ptb_echo_bot", "the echo of the pressed color", |m| {
        texts_from(m, true).contains(&"echo: Red".into())
    });

    files_come_back(&mesh, &alice_p, "@ptb_echo_bot");
}

#[test]
fn a_python_telegram_bot_in_webhook_mode_gets_every_update_pushed_even_after_it_was_away() {
    let BotNet { mesh: _mesh, alice: alice_p, token, bridge, http, .. } = bot_net("ptb_hook_bot");
    let base = bridge.ready["bot_api"].as_str().unwrap().to_string();
    let info = || {
        let (status, body) = meshgram_tests::http_get(&http, &format!("/bot{token}/getWebhookInfo")).unwrap();
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<Value>(&body).unwrap()["result"].clone()
    };
    // A free port for the bot's own server (it binds it itself).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let bot = start_ptb(&base, &token, Some(port));
    let hook = format!("http://127.0.0.1:{port}/hook");
    wait_for("the bot to set its webhook", || info()["url"] == hook.as_str());
    let (status, body) = meshgram_tests::http_get(&http, &format!("/bot{token}/getUpdates")).unwrap();
    assert_eq!(status, 409, "no getUpdates while a webhook is set: {body}");

    meshgram(&alice_p, &["send", "@ptb_hook_bot", "hello hook", "--json"]).ok_json();
    wait_chat(&alice_p, "@ptb_hook_bot", "the echo through the webhook", |m| {
        texts_from(m, true) == ["echo: hello hook"]
    });

    // The bot's server goes away: the update waits, the failure shows, and it comes when the
    // server is back.
    drop(bot);
    meshgram(&alice_p, &["send", "@ptb_hook_bot", "while you were away", "--json"]).ok_json();
    wait_for("the failed delivery in getWebhookInfo", || {
        let info = info();
        info["pending_update_count"] == 1 && info["last_error_message"].is_string()
    });
    let _bot = start_ptb(&base, &token, Some(port));
    let messages = wait_chat(&alice_p, "@ptb_hook_bot", "the update that waited", |m| texts_from(m, true).len() == 2);
    assert_eq!(texts_from(&messages, true), ["echo: hello hook", "echo: while you were away"], "once each, in order");
    wait_for("an empty queue", || info()["pending_update_count"] == 0);
}

/// Waits (bounded) until `done` holds.
fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + crate::REPLY_TIMEOUT;
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what} within {:?}", crate::REPLY_TIMEOUT);
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Sends `/menu` to `bot`, checks its inline keyboard (a link button is only opened, an unknown
/// button refused), presses "Yes", and checks the bot's answer and its edit, which takes the
/// keyboard away.
fn press_inline_button(alice: &Path, bot: &str, answer: &str, edited_text: &str) {
    meshgram(alice, &["send", bot, "/menu", "--json"]).ok_json();
    let messages = wait_chat(alice, bot, "the menu", |m| texts_from(m, true).contains(&"Pick one".into()));
    let menu = messages.iter().find(|m| m["text"] == "Pick one").unwrap();
    let rows = menu["extras"]["markup"]["inline"]["rows"].as_array().cloned().unwrap_or_default();
    assert_eq!(rows[0][1]["text"], "No", "the keyboard came with the message: {menu}");
    let menu_id = menu["id"].as_str().unwrap();
    for button in rows.iter().flat_map(|r| r.as_array().cloned().unwrap_or_default()) {
        if let Some(url) = button["action"]["url"]["url"].as_str() {
            let link = meshgram(alice, &["press", menu_id, button["text"].as_str().unwrap(), "--json"]).ok_json();
            assert_eq!((link["kind"].as_str(), link["url"].as_str()), (Some("url"), Some(url)), "{link}");
        }
    }
    meshgram(alice, &["press", menu_id, "Maybe", "--json"]).expect_err(&["NO_BUTTON"]);
    let pressed = meshgram(alice, &["press", menu_id, "Yes", "--json"]).ok_json();
    assert_eq!(pressed["answer"]["text"], answer, "the bot's answer came back: {pressed}");
    let messages = wait_chat(alice, bot, "the menu edited", |m| {
        m.iter().any(|m| m["id"] == menu["id"] && m["text"] == edited_text)
    });
    let edited = messages.iter().find(|m| m["id"] == menu["id"]).unwrap();
    assert!(edited["extras"]["markup"].is_null(), "an edit without a keyboard takes it away: {edited}");
    meshgram(alice, &["press", menu_id, "No", "--json"]).expect_err(&["NO_BUTTON"]);
}

/// Sends `bot` a photo and a document: the photo must come back by its file_id (the same file,
/// not uploaded again), the document fetched through getFile and the file route and uploaded
/// anew as `copy-<name>` with the caption "<size> bytes", byte for byte.
fn files_come_back(mesh: &Mesh, alice: &Path, bot: &str) {
    let dir = mesh.gateway.tmp().join("files");
    std::fs::create_dir_all(&dir).unwrap();
    let photo = dir.join("sunset.png");
    image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8, y as u8, 128])).save(&photo).unwrap();
    let upload = |path: &Path| {
        let lines = meshgram(alice, &["upload", path.to_str().unwrap(), "--to", bot, "--json"]).ok_json_lines();
        lines.last().unwrap()["file"]["file_id"].clone()
    };
    let photo_file = upload(&photo);
    let document = dir.join("report.bin");
    let size = 300 * 1024 + 7;
    random_file(&document, size, "a document for the bot");
    upload(&document);
    let messages = wait_chat(alice, bot, "the photo and the document back", |m| {
        let texts = texts_from(m, true);
        texts.contains(&"your photo".into()) && texts.contains(&format!("{size} bytes"))
    });
    let photo_back = messages.iter().find(|m| m["text"] == "your photo").unwrap();
    assert_eq!(photo_back["file"]["file_id"], photo_file, "sent again by file_id: {photo_back}");
    let copy = messages.iter().find(|m| m["text"] == format!("{size} bytes")).unwrap();
    assert_eq!(copy["file"]["name"], "copy-report.bin", "{copy}");
    let out = dir.join("copy.bin");
    let download = ["download", copy["id"].as_str().unwrap(), "-o", out.to_str().unwrap(), "--json"];
    meshgram(alice, &download).ok_json_lines();
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&document).unwrap(), "the bot's copy is the same bytes");
}

#[test]
fn an_unmodified_grammy_bot_answers_formats_keeps_files_and_keyboards() {
    let BotNet { mesh, alice: alice_p, alice_id, token, bridge, .. } = bot_net("grammy_echo_bot");
    let api_root = bridge.ready["bot_api"].as_str().unwrap().trim_end_matches("/bot").to_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bots/grammy/bot.js");
    let bot = Command::new("node")
        .args([script, &api_root, &token])
        .stdin(Stdio::null())
        .spawn()
        .expect("node runs (./tests/run installs nodejs and grammY)");
    let _bot = BotProcess(bot);

    meshgram(&alice_p, &["send", "@grammy_echo_bot", "/start", "--json"]).ok_json();
    meshgram(&alice_p, &["send", "@grammy_echo_bot", "hello grammY", "--json"]).ok_json();
    let messages = wait_chat(&alice_p, "@grammy_echo_bot", "two answers", |m| texts_from(m, true).len() >= 2);
    assert_eq!(texts_from(&messages, true), [format!("Hi User {alice_id}, grammY here"), "echo: hello grammY".into()]);
    let echo = messages.iter().find(|m| m["text"] == "echo: hello grammY").unwrap();
    assert_eq!(echo["extras"]["entities"][0]["kind"], "italic", "HTML became an entity: {echo}");

    press_inline_button(&alice_p, "@grammy_echo_bot", "grammY got yes", "Chosen: yes");
    files_come_back(&mesh, &alice_p, "@grammy_echo_bot");
}
