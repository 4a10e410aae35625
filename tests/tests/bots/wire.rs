//! The Bot API's errors for bad input, and the update queue across a SIGKILL.

use meshgram_tests::{Mesh, http_get, http_post, meshgram};
use serde_json::Value;

use crate::{ALICE, create_bot, start_bridge};

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

/// Long-polls until `n` updates are pending (bounded by the poll timeouts).
fn wait_updates(http: &str, token: &str, n: usize) -> Vec<(u64, String)> {
    for _ in 0..6 {
        let found = updates(get(http, &format!("/bot{token}/getUpdates?timeout=10")));
        if found.len() >= n {
            return found;
        }
    }
    panic!("{n} updates did not arrive within a minute");
}

#[test]
fn bad_input_gets_telegrams_errors_and_updates_survive_sigkill() {
    let mesh = Mesh::start(3, 2);
    let alice_p = mesh.new_profile("alice");
    let alice_id = mesh.login(&alice_p, ALICE)["user_id"].as_u64().unwrap();
    let token = create_bot(&alice_p, "wire_bot");
    let data = mesh.gateway.tmp().join("bridge");
    let mut bridge = start_bridge(&mesh, &data);
    let http = bridge.http().unwrap();

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

    let bridge = start_bridge(&mesh, &data);
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
