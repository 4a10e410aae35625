//! Where login codes go: the gateway's file code sink, or a local webhook standing in for an
//! SMS provider.

use std::fs;
use std::io::ErrorKind;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use serde_json::Value;

use crate::POLL;

/// How long to wait for a login code to reach a sink after `login` started.
pub const CODE_TIMEOUT: Duration = Duration::from_secs(10);

/// Every `(phone, code)` in a file code sink, oldest first. A missing file has none; a line
/// still being written is skipped.
pub fn read_codes(sink: &Path) -> Vec<(String, String)> {
    let text = match fs::read_to_string(sink) {
        Ok(text) => text,
        Err(e) if e.kind() == ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("reading code sink {}: {e}", sink.display()),
    };
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|entry| Some((entry["phone"].as_str()?.to_string(), entry["code"].as_str()?.to_string())))
        .collect()
}

/// Waits up to [`CODE_TIMEOUT`] for the `nth` (0-based) code sent to `phone`.
pub fn wait_code(sink: &Path, phone: &str, nth: usize) -> String {
    let deadline = Instant::now() + CODE_TIMEOUT;
    loop {
        let codes: Vec<String> = read_codes(sink).into_iter().filter(|(p, _)| p == phone).map(|(_, c)| c).collect();
        if let Some(code) = codes.get(nth) {
            return code.clone();
        }
        if Instant::now() >= deadline {
            let raw = fs::read_to_string(sink).unwrap_or_else(|e| format!("<{e}>"));
            panic!("code #{nth} for {phone} did not reach {} within {CODE_TIMEOUT:?}; file:\n{raw}", sink.display());
        }
        thread::sleep(POLL);
    }
}

/// A code that is certainly not `code`: every digit changed, same length.
pub fn wrong_code(code: &str) -> String {
    code.chars().map(|c| c.to_digit(10).and_then(|d| char::from_digit((d + 1) % 10, 10)).unwrap_or('0')).collect()
}

/// A local HTTP server standing in for an SMS provider: records every JSON body POSTed to
/// `/sms` and answers with a fixed status.
#[derive(Debug)]
pub struct WebhookSink {
    url: String,
    posts: Arc<Mutex<Vec<Value>>>,
    /// Owns the server task; dropping the runtime stops it.
    _runtime: tokio::runtime::Runtime,
}

#[derive(Debug)]
struct WebhookState {
    status: StatusCode,
    /// How long each answer takes (a slow SMS provider).
    delay: Duration,
    posts: Arc<Mutex<Vec<Value>>>,
}

impl WebhookSink {
    /// Serves on `127.0.0.1:0`, answering every POST with `status`.
    pub fn start(status: u16) -> anyhow::Result<WebhookSink> {
        WebhookSink::start_slow(status, Duration::ZERO)
    }

    /// Like [`WebhookSink::start`], each answer taking `delay` (the body is recorded at once).
    pub fn start_slow(status: u16, delay: Duration) -> anyhow::Result<WebhookSink> {
        let status = StatusCode::from_u16(status).context("webhook status")?;
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).context("bind webhook sink")?;
        let url = format!("http://{}/sms", listener.local_addr()?);
        let posts = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(WebhookState { status, delay, posts: posts.clone() });
        let app = Router::new().route("/sms", post(receive_sms)).with_state(state);
        runtime.spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("[webhook sink] server failed: {e}");
            }
        });
        Ok(WebhookSink { url, posts, _runtime: runtime })
    }

    /// The URL to pass as `--code-sink webhook:<url>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Bodies received so far (non-JSON bodies as JSON strings).
    pub fn posts(&self) -> Vec<Value> {
        self.posts.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// `POST /sms`: records the body.
async fn receive_sms(State(state): State<Arc<WebhookState>>, body: Bytes) -> StatusCode {
    let post =
        serde_json::from_slice(&body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    state.posts.lock().unwrap_or_else(PoisonError::into_inner).push(post);
    tokio::time::sleep(state.delay).await;
    state.status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_codes_differ_in_every_digit() {
        for code in ["00000", "12345", "99999", "505050"] {
            let wrong = wrong_code(code);
            assert_eq!(wrong.len(), code.len());
            assert!(wrong.chars().zip(code.chars()).all(|(a, b)| a != b), "{code} → {wrong}");
        }
    }

    #[test]
    fn code_sink_lines_parse_and_partial_lines_are_skipped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sink = dir.path().join("codes.log");
        assert!(read_codes(&sink).is_empty());
        fs::write(&sink, "{\"phone\":\"+15550001111\",\"code\":\"12345\",\"at\":1}\n{\"phone\":\"+1555\"")
            .expect("write");
        assert_eq!(read_codes(&sink), vec![("+15550001111".to_string(), "12345".to_string())]);
        assert_eq!(wait_code(&sink, "+15550001111", 0), "12345");
    }
}
