//! The UI's files, compiled into the binary: the app needs no network and no build step.

use axum::extract::Path;
use axum::http::header;
use axum::response::{IntoResponse, Response};

/// Each file: its name under `/assets/`, its type, its bytes.
const FILES: &[(&str, &str, &str)] = &[
    ("app.js", "text/javascript; charset=utf-8", include_str!("ui/app.js")),
    ("style.css", "text/css; charset=utf-8", include_str!("ui/style.css")),
    ("icon.svg", "image/svg+xml", include_str!("ui/icon.svg")),
];

pub(super) async fn index() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("ui/index.html")).into_response()
}

pub(super) async fn file(Path(name): Path<String>) -> Response {
    match FILES.iter().find(|(file, _, _)| *file == name) {
        Some((_, mime, body)) => ([(header::CONTENT_TYPE, *mime)], *body).into_response(),
        None => (axum::http::StatusCode::NOT_FOUND, "no such file").into_response(),
    }
}
