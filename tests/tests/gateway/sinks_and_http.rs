//! The gateway's edges: the ready line, webhook code delivery, and health and metrics over a
//! real HTTP port.

use meshgram_tests::{Gateway, http_get, meshgram, meshgram_stdin, str_field};

use crate::ALICE;

#[test]
fn ready_line_describes_the_gateway() {
    let gw = Gateway::start();
    let ready = &gw.server.ready;
    assert_eq!(ready["role"], "gateway", "{ready}");
    let peer_id = gw.server.peer_id();
    assert!(peer_id.starts_with("12D3Koo"), "{ready}");
    let key = str_field(ready, "public_key");
    assert!(key.len() == 64 && key.chars().all(|c| c.is_ascii_hexdigit()), "{ready}");
    let listen = gw.server.listen_addrs();
    assert!(listen.iter().any(|a| a.starts_with("/ip4/127.0.0.1/tcp/")), "{ready}");
    assert!(listen.iter().any(|a| a.starts_with("/ip4/127.0.0.1/udp/") && a.contains("/quic-v1")), "{ready}");
    for addr in &listen {
        assert!(addr.ends_with(&format!("/p2p/{peer_id}")), "{addr} should end in /p2p/<peer_id>");
        assert!(!addr.contains("/tcp/0/") && !addr.contains("/udp/0/"), "{addr} should name the bound port");
    }
    let http = gw.server.http().expect("ready line has http");
    assert!(http.starts_with("http://127.0.0.1:") && !http.ends_with(":0"), "{ready}");
    assert!(ready["code_sink"].is_string(), "{ready}");
}

#[test]
fn health_and_metrics_over_http() {
    let gw = Gateway::start();
    let base = gw.server.http().expect("ready line has http");

    let (status, body) = http_get(&base, "/healthz").expect("GET /healthz");
    assert_eq!((status, body.trim()), (200, "ok"));

    // Counters with labels only show samples once used, so make some requests first.
    let alice_p = gw.new_profile("alice");
    gw.login(&alice_p, ALICE);
    meshgram(&alice_p, &["whoami"]).ok_json();
    let (status, body) = http_get(&base, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("meshgram_gateway_requests_total"), "metrics lack the request counter:\n{body}");
    assert!(!body.contains(ALICE), "metrics must not leak phone numbers");

    let (status, _) = http_get(&base, "/no-such-page").expect("GET unknown path");
    assert_eq!(status, 404);
}

#[test]
fn webhook_sink_receives_codes() {
    let gw = Gateway::builder().webhook(200).start();
    let alice_p = gw.new_profile("alice");
    let login = gw.login(&alice_p, ALICE);
    assert_eq!(login["new_account"], true, "{login}");

    let posts = gw.webhook().expect("webhook sink").posts();
    assert_eq!(posts.len(), 1, "{posts:?}");
    let post = &posts[0];
    assert_eq!(post["phone"], ALICE, "{post}");
    let code = str_field(post, "code");
    assert!(code.len() == 5 && code.chars().all(|c| c.is_ascii_digit()), "{post}");
    assert_eq!(post["text"], format!("Meshgram code: {code}"), "{post}");
}

#[test]
fn failing_webhook_fails_code_delivery() {
    let gw = Gateway::builder().webhook(500).start();
    let alice_p = gw.new_profile("alice");
    let out = meshgram_stdin(&alice_p, &["login", "--gateway", &gw.addr(), "--phone", ALICE], "");
    out.expect_err(&["CODE_DELIVERY_FAILED"]);
    let posts = gw.webhook().expect("webhook sink").posts();
    assert!(!posts.is_empty(), "the gateway did try the webhook");
    meshgram(&alice_p, &["whoami"]).expect_err(&["NOT_SIGNED_IN"]);
}
