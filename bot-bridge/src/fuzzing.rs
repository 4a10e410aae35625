//! Entry points for the fuzz targets (`fuzz/`) and their corpus replay (`tests/fuzz_corpora`):
//! what the bridge parses of a bot's HTTP request, fed arbitrary bytes. It must answer with an
//! error, never panic.

use std::sync::LazyLock;

use meshgram_node::fuzzing::Target;

use crate::api::read_params;
use crate::methods::{caption_of_params, message_of_params};

/// The parsers, by the name of their fuzz target.
pub const TARGETS: [Target; 1] = [("bot_api_requests", bot_api_requests)];

/// The boundary of the multipart bodies the target builds.
const BOUNDARY: &str = "meshgramfuzz";

/// A Bot API request: the first byte picks the body's content type (JSON, an urlencoded form,
/// multipart, or none given), the bytes up to the first newline are the query string, the rest
/// the body. Its parameters are read as `/bot<token>/<method>` reads them, then taken as a
/// message and as a caption are: text with `parse_mode` (HTML, Markdown, MarkdownV2),
/// `entities` and `reply_markup`.
pub fn bot_api_requests(bytes: &[u8]) {
    static RUNTIME: LazyLock<Option<tokio::runtime::Runtime>> =
        LazyLock::new(|| tokio::runtime::Builder::new_current_thread().build().ok());
    let Some(runtime) = RUNTIME.as_ref() else { return };
    let Some((&kind, rest)) = bytes.split_first() else { return };
    let (query, body) = match rest.iter().position(|b| *b == b'\n') {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (&[][..], rest),
    };
    let content_type = match kind % 4 {
        0 => "application/json".to_string(),
        1 => "application/x-www-form-urlencoded".to_string(),
        2 => format!("multipart/form-data; boundary={BOUNDARY}"),
        _ => String::new(),
    };
    // A query the URI parser refuses never reaches the bridge (hyper answers 400 first).
    let query: String = query.iter().map(|b| char::from(*b)).filter(|c| c.is_ascii_graphic()).collect();
    let mut request = axum::http::Request::builder().method("POST").uri(format!("/bot1:x/sendMessage?{query}"));
    if !content_type.is_empty() {
        request = request.header("content-type", content_type);
    }
    let Ok(request) = request.body(axum::body::Body::from(body.to_vec())) else { return };
    let files = std::env::temp_dir().join(format!("meshgram-fuzz-bot-api-{}", std::process::id()));
    runtime.block_on(async {
        if let Ok(params) = read_params(request, files).await {
            let _ = message_of_params(&params);
            let _ = caption_of_params(&params);
            for name in ["chat_id", "message_id", "reply_to_message_id", "offset", "limit", "timeout"] {
                let _ = params.int(name);
            }
            let _ = params.bool("disable_notification");
            let _ = params.json("allowed_updates");
        }
    });
}
