//! The Bot API's errors for bad input, and the update queue across a SIGKILL.

use meshgram_tests::{http_get, http_post, meshgram};
use serde_json::Value;

use crate::{BotNet, bot_net};

/// `(status, body as JSON)` of a GET.
fn get(http: &str, path: &str) -> (u16, Value) {
    let (status, body) = http_get(http, path).unwrap();
    (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}")))
}

fn post(http: &str, path: &str, content_type: &str, body: &str) -> (u16, Value) {
    let (status, answer) = http_post(http, path, content_type, body.as_bytes()).unwrap();
    (status, serde_json::from_str(&answer).unwrap_or_else(|e| panic!("POST {path}: {e}: {answer}")))
}

/// Checks a Telegram error envelope.
fn assert_error(answer: (u16, Value), code: u16, description: &str) {
    let (status, body) = answer;
    assert_eq!(status, code, "{body}");
    assert_eq!(body["ok"], false, "{body}");
    assert_eq!(body["error_code"], code, "{body}");
    assert_eq!(body["description"], description, "{body}");
}

/// The update ids and texts of a getUpdates answer.
fn updates(answer: (u16, Value)) -> Vec<(u64, String)> {
    let (status, body) = answer;
    assert_eq!(status, 200, "{body}");
    body["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| (u["update_id"].as_u64().unwrap(), u["message"]["text"].as_str().unwrap_or_default().to_string()))
        .collect()
}

/// Long-polls until `n` updates are pending, for at most a minute (a poll answers as soon as
/// any update waits, so fewer than `n` are looked at again a little later).
fn wait_updates(http: &str, token: &str, n: usize) -> Vec<(u64, String)> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let found = updates(get(http, &format!("/bot{token}/getUpdates?timeout=10")));
        if found.len() >= n {
            return found;
        }
        assert!(std::time::Instant::now() < deadline, "{n} updates did not arrive within a minute: {found:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn bad_input_gets_telegrams_errors_and_updates_survive_sigkill() {
    let BotNet { mesh, alice: alice_p, alice_id, token, data, mut bridge, http } = bot_net("wire_bot");

    // Tokens, paths and methods.
    assert_error(get(&http, "/botnonsense/getMe"), 401, "Unauthorized: invalid token specified");
    let forged = format!("{}:{}", token.split(':').next().unwrap(), "A".repeat(35));
    assert_error(get(&http, &format!("/bot{forged}/getMe")), 401, "Unauthorized");
    assert_error(get(&http, "/favicon.ico"), 404, "Not Found");
    assert_error(get(&http, &format!("/bot{token}/noSuchMethod")), 404, "Not Found: method not found");
    assert_error(
        get(&http, &format!("/bot{token}/sendPoll")),
        400,
        "Bad Request: method is not available on this server",
    );
    let (status, me) = get(&http, &format!("/bot{token}/GETME"));
    assert_eq!(status, 200, "method names are case-insensitive: {me}");
    assert_eq!(me["result"]["username"], "wire_bot", "{me}");
    assert_eq!(me["result"]["is_bot"], true, "{me}");

    // Parameters, by query, form and JSON.
    let send = format!("/bot{token}/sendMessage");
    assert_error(get(&http, &format!("{send}?text=hi")), 400, "Bad Request: chat_id is empty");
    assert_error(get(&http, &format!("{send}?chat_id={alice_id}")), 400, "Bad Request: message text is empty");
    assert_error(get(&http, &format!("{send}?chat_id=424242&text=hi")), 400, "Bad Request: chat not found");
    assert_error(
        post(&http, &send, "application/json", "{\"chat_id\": 1"),
        400,
        "Bad Request: can't parse JSON object",
    );
    assert_error(
        post(
            &http,
            &send,
            "application/x-www-form-urlencoded",
            &format!("chat_id={alice_id}&text=%3Cb%3Ex&parse_mode=HTML"),
        ),
        400,
        "Bad Request: can't parse entities: can't find end tag corresponding to start tag \"b\"",
    );
    let body = format!("{{\"chat_id\": \"{alice_id}\", \"text\": \"*hi* there\", \"parse_mode\": \"MarkdownV2\"}}");
    let (status, sent) = post(&http, &send, "application/json", &body);
    assert_eq!(status, 200, "{sent}");
    assert_eq!(sent["result"]["text"], "hi there", "{sent}");
    assert_eq!(sent["result"]["entities"][0]["type"], "bold", "{sent}");
    assert_eq!(sent["result"]["chat"]["id"], alice_id, "{sent}");
    let updates_path = format!("/bot{token}/getUpdates");
    assert_error(get(&http, &format!("{updates_path}?offset=x")), 400, "Bad Request: invalid offset specified");

    // Updates: three messages, the first confirmed, then the bridge SIGKILLed.
    for text in ["one", "two", "three"] {
        meshgram(&alice_p, &["send", "@wire_bot", text, "--json"]).ok_json();
    }
    let first = wait_updates(&http, &token, 3);
    let texts: Vec<&str> = first.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(texts, ["one", "two", "three"], "{first:?}");
    let confirm = first[0].0 + 1;
    let left = updates(get(&http, &format!("{updates_path}?offset={confirm}")));
    assert_eq!(left, first[1..], "an offset confirms the updates below it");
    bridge.kill9();

    let bridge = mesh.start_bridge(&data);
    let http = bridge.http().unwrap();
    let after = updates(get(&http, &format!("{updates_path}?timeout=5")));
    assert_eq!(after, first[1..], "after a SIGKILL: what was not confirmed, with the same ids, nothing twice");
    meshgram(&alice_p, &["send", "@wire_bot", "four", "--json"]).ok_json();
    let with_four = wait_updates(&http, &token, 3);
    assert_eq!(with_four.len(), 3, "{with_four:?}");
    assert_eq!(with_four[2].1, "four");
    assert!(with_four[2].0 > first[2].0, "update ids keep growing: {with_four:?}");
    let last_only = updates(get(&http, &format!("{updates_path}?offset=-1")));
    assert_eq!(last_only, with_four[2..], "a negative offset keeps the last updates");
}

/// Long-polls until a `callback_query` update is pending; returns it.
fn wait_callback_query(http: &str, token: &str) -> Value {
    for _ in 0..6 {
        let (status, body) =
            get(http, &format!("/bot{token}/getUpdates?timeout=10&allowed_updates=%5B%22callback_query%22%5D"));
        assert_eq!(status, 200, "{body}");
        if let Some(update) = body["result"].as_array().and_then(|u| u.first()) {
            return update.clone();
        }
    }
    panic!("no callback query arrived within a minute");
}

#[test]
fn keyboards_are_checked_and_presses_reach_the_bot_once_across_sigkill() {
    let BotNet { mesh, alice: alice_p, alice_id, token, data, mut bridge, http } = bot_net("keys_bot");
    let send = format!("/bot{token}/sendMessage");

    // A button nobody here could press is refused, and nothing is sent.
    let login = format!(
        "{{\"chat_id\": {alice_id}, \"text\": \"log in\", \"reply_markup\": {{\"inline_keyboard\": [[{{\"text\": \"Log in\", \"login_url\": {{\"url\": \"https://x.org\"}}}}]]}}}}"
    );
    assert_error(post(&http, &send, "application/json", &login), 400, "Bad Request: BUTTON_TYPE_INVALID");
    let keyboard = serde_json::json!({"inline_keyboard": [[{"text": "Yes", "callback_data": "y"}, {"text": "No", "callback_data": "n"}]]});
    let body = serde_json::json!({"chat_id": alice_id, "text": "Sure?", "reply_markup": keyboard}).to_string();
    let (status, sent) = post(&http, &send, "application/json", &body);
    assert_eq!(status, 200, "{sent}");
    assert_eq!(sent["result"]["reply_markup"], keyboard, "{sent}");
    let number = sent["result"]["message_id"].as_i64().unwrap();
    let messages = crate::wait_chat(&alice_p, "@keys_bot", "the question", |m| m.iter().any(|m| m["text"] == "Sure?"));
    assert_eq!(messages.len(), 1, "the refused message was not sent: {messages:#?}");
    let question = messages[0]["id"].as_str().unwrap().to_string();

    // A press comes as a callback query; the bot's answer goes back to the one who pressed.
    let press = |button: &'static str| {
        let (profile, question) = (alice_p.clone(), question.clone());
        std::thread::spawn(move || meshgram(&profile, &["press", &question, button, "--json"]).ok_json())
    };
    let pressing = press("Yes");
    let update = wait_callback_query(&http, &token);
    let query = &update["callback_query"];
    assert_eq!((query["data"].as_str(), query["from"]["id"].as_u64()), (Some("y"), Some(alice_id)), "{update}");
    assert_eq!(query["message"]["message_id"], number, "the pressed message comes with it: {update}");
    let answer = format!("/bot{token}/answerCallbackQuery");
    let body = serde_json::json!({"callback_query_id": query["id"], "text": "Noted", "show_alert": true}).to_string();
    let (status, answered) = post(&http, &answer, "application/json", &body);
    assert_eq!((status, &answered["result"]), (200, &Value::Bool(true)), "{answered}");
    let pressed = pressing.join().unwrap();
    assert_eq!((pressed["answer"]["text"].as_str(), pressed["answer"]["alert"].as_bool()), (Some("Noted"), Some(true)));
    let too_old = "Bad Request: query is too old and response timeout expired or query ID is invalid";
    assert_error(post(&http, &answer, "application/json", &body), 400, too_old);
    assert_error(get(&http, &format!("{answer}?callback_query_id=nonsense")), 400, too_old);

    // A press the bridge queued survives its SIGKILL, once, with the same update id.
    let confirm = update["update_id"].as_u64().unwrap() + 1;
    get(&http, &format!("/bot{token}/getUpdates?offset={confirm}"));
    let pressing = press("No");
    let update = wait_callback_query(&http, &token);
    bridge.kill9();
    let bridge = mesh.start_bridge(&data);
    let http = bridge.http().unwrap();
    let again = wait_callback_query(&http, &token);
    assert_eq!(again, update, "the same update after the SIGKILL");
    let (status, body) = get(&http, &format!("/bot{token}/getUpdates?offset={}&timeout=2", confirm));
    assert_eq!((status, body["result"].as_array().map(Vec::len)), (200, Some(1)), "and only once: {body}");
    pressing.join().unwrap();

    // The keyboard is taken away by an edit without one; only inline keyboards edit in.
    let edit = format!("/bot{token}/editMessageReplyMarkup?chat_id={alice_id}&message_id={number}");
    assert_error(
        get(&http, &format!("{edit}&reply_markup=%7B%22remove_keyboard%22%3Atrue%7D")),
        400,
        "Bad Request: REPLY_MARKUP_INVALID",
    );
    let (status, edited) = get(&http, &edit);
    assert_eq!(status, 200, "{edited}");
    assert!(edited["result"]["reply_markup"].is_null(), "{edited}");
    crate::wait_chat(&alice_p, "@keys_bot", "the keyboard gone", |m| m[0]["extras"]["markup"].is_null());
    meshgram(&alice_p, &["press", &question, "Yes", "--json"]).expect_err(&["NO_BUTTON"]);
}

/// A multipart body with text fields and one file; returns (content type, body).
fn multipart(fields: &[(&str, &str)], file: (&str, &str, &[u8])) -> (String, Vec<u8>) {
    let boundary = "meshgram-test-boundary";
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").bytes(),
        );
    }
    let (field, file_name, bytes) = file;
    body.extend(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{file_name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").bytes(),
    );
    body.extend_from_slice(bytes);
    body.extend(format!("\r\n--{boundary}--\r\n").bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[test]
fn files_go_by_upload_file_id_and_url_and_bad_ones_get_telegrams_errors() {
    let BotNet { mesh: _mesh, alice: alice_p, alice_id, token, bridge: _bridge, http, .. } = bot_net("files_bot");
    let method = |name: &str| format!("/bot{token}/{name}");

    // An upload, its bytes back through getFile and the file route.
    let notes: String = (0..5000).map(|i| format!("line {i}\n")).collect();
    let chat = alice_id.to_string();
    let (content_type, body) =
        multipart(&[("chat_id", &chat), ("caption", "the notes")], ("document", "../notes.txt", notes.as_bytes()));
    let (status, sent) = post(&http, &method("sendDocument"), &content_type, std::str::from_utf8(&body).unwrap());
    assert_eq!(status, 200, "{sent}");
    let document = &sent["result"]["document"];
    assert_eq!(
        (document["file_name"].as_str(), document["file_size"].as_u64()),
        (Some("notes.txt"), Some(notes.len() as u64))
    );
    let file_id = document["file_id"].as_str().unwrap();
    let (status, file) = get(&http, &format!("{}?file_id={file_id}", method("getFile")));
    assert_eq!(status, 200, "{file}");
    let file_path = file["result"]["file_path"].as_str().unwrap();
    let (status, bytes) = http_get(&http, &format!("/file/bot{token}/{file_path}")).unwrap();
    assert_eq!((status, bytes == notes), (200, true), "the file route serves the uploaded bytes");

    // By file_id: the same file again; by URL: fetched and uploaded as a new one.
    let (status, photo) = get(&http, &format!("{}?chat_id={alice_id}&photo={file_id}", method("sendPhoto")));
    assert_eq!(status, 200, "{photo}");
    assert_eq!(photo["result"]["photo"][0]["file_unique_id"], document["file_unique_id"], "{photo}");
    let url = format!("{http}/file/bot{token}/{file_path}");
    let by_url = serde_json::json!({"chat_id": alice_id, "document": url}).to_string();
    let (status, fetched) = post(&http, &method("sendDocument"), "application/json", &by_url);
    assert_eq!(status, 200, "{fetched}");
    assert_eq!(fetched["result"]["document"]["file_size"], notes.len(), "{fetched}");
    assert_ne!(fetched["result"]["document"]["file_unique_id"], document["file_unique_id"]);

    // Bad files: each refused with Telegram's words, nothing sent.
    let send_document = method("sendDocument");
    assert_error(
        get(&http, &format!("{send_document}?chat_id={alice_id}")),
        400,
        "Bad Request: there is no document in the request",
    );
    let wrong = "Bad Request: wrong file identifier/HTTP URL specified";
    assert_error(get(&http, &format!("{send_document}?chat_id={alice_id}&document=nonsense")), 400, wrong);
    assert_error(get(&http, &format!("{}?file_id=nonsense", method("getFile"))), 400, wrong);
    let refused = serde_json::json!({"chat_id": alice_id, "document": "http://127.0.0.1:9/x.bin"}).to_string();
    assert_error(
        post(&http, &send_document, "application/json", &refused),
        400,
        "Bad Request: failed to get HTTP URL content",
    );
    let garbage = "--meshgram-test-boundary\r\nno headers here";
    assert_error(
        post(&http, &send_document, "multipart/form-data; boundary=meshgram-test-boundary", garbage),
        400,
        "Bad Request: can't parse multipart/form-data body",
    );
    let (status, _) = http_get(&http, &format!("/file/bot{token}/nonsense/x")).unwrap();
    assert_eq!(status, 404);
    let messages = crate::wait_chat(&alice_p, "@files_bot", "three files", |m| m.len() >= 3);
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(crate::chat(&alice_p, "@files_bot").len(), 3, "only the good ones were sent: {messages:#?}");
}

#[test]
fn a_bot_in_a_group_sees_what_privacy_mode_allows_and_answers_there() {
    let BotNet { mesh: _mesh, alice: alice_p, alice_id, token, bridge: _bridge, http, .. } = bot_net("team_bot");
    let method = |name: &str| format!("/bot{token}/{name}");

    let group = meshgram(&alice_p, &["group", "create", "Team", "@team_bot", "--json"]).ok_json();
    let group = group["id"].as_str().unwrap().to_string();
    for text in ["hello everyone", "/start", "/help@other_bot", "hi @team_bot, a question"] {
        meshgram(&alice_p, &["send", &group, text, "--json"]).ok_json();
    }
    let seen = wait_updates(&http, &token, 2);
    let texts: Vec<&str> = seen.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(texts, ["/start", "hi @team_bot, a question"], "privacy mode: commands for it and mentions");
    let (_, body) = get(&http, &method("getUpdates"));
    let message = &body["result"][0]["message"];
    assert_eq!((message["chat"]["type"].as_str(), message["chat"]["title"].as_str()), (Some("group"), Some("Team")));
    assert_eq!(message["from"]["id"], alice_id, "{message}");
    let chat = message["chat"]["id"].as_i64().unwrap();
    assert!(chat < 0 && chat > -(1 << 52), "a group's id is negative and fits a double: {chat}");

    // The bot answers in the group; a reply to it is seen, other talk is not.
    let (status, sent) = get(&http, &format!("{}?chat_id={chat}&text=hello%20team", method("sendMessage")));
    assert_eq!(status, 200, "{sent}");
    assert_eq!(sent["result"]["chat"]["id"], chat, "{sent}");
    let confirm = seen[1].0 + 1;
    get(&http, &format!("{}?offset={confirm}", method("getUpdates")));
    let messages =
        crate::wait_chat(&alice_p, &group, "the bot's answer", |m| m.iter().any(|m| m["text"] == "hello team"));
    let answer = messages.iter().find(|m| m["text"] == "hello team").unwrap();
    let answer_id = answer["id"].as_str().unwrap();
    meshgram(&alice_p, &["send", &group, "thanks", "--reply-to", answer_id, "--json"]).ok_json();
    meshgram(&alice_p, &["send", &group, "bye all", "--json"]).ok_json();
    let reply = wait_updates(&http, &token, 1);
    assert_eq!(reply[0].1, "thanks", "{reply:?}");
    std::thread::sleep(std::time::Duration::from_secs(2));
    let (_, body) = get(&http, &method("getUpdates"));
    assert_eq!(body["result"].as_array().map(Vec::len), Some(1), "not the talk that is not for it: {body}");
    assert_eq!(body["result"][0]["message"]["reply_to_message"]["message_id"], sent["result"]["message_id"]);

    // The group's fields and members.
    let (status, info) = get(&http, &format!("{}?chat_id={chat}", method("getChat")));
    assert_eq!((status, info["result"]["title"].as_str()), (200, Some("Team")), "{info}");
    let (_, member) = get(&http, &format!("{}?chat_id={chat}&user_id={alice_id}", method("getChatMember")));
    assert_eq!(member["result"]["status"], "administrator", "the group's creator: {member}");
    let (_, admins) = get(&http, &format!("{}?chat_id={chat}", method("getChatAdministrators")));
    assert_eq!(admins["result"][0]["user"]["id"], alice_id, "{admins}");
    let (_, stranger) = get(&http, &format!("{}?chat_id={chat}&user_id=424242", method("getChatMember")));
    assert_eq!(stranger["result"]["status"], "left", "{stranger}");
    assert_error(
        get(&http, &format!("{}?chat_id=-5&text=x", method("sendMessage"))),
        400,
        "Bad Request: chat not found",
    );
}
