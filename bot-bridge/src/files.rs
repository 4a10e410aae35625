//! Files: what a `photo`/`document`/… parameter names (a multipart upload, an `attach://`
//! part, a `file_id` sent again without uploading, or an http(s) URL fetched here), `getFile`,
//! and the file route `/file/bot<token>/<file_id>/<name>`.
//!
//! A `file_id` is the id of a message carrying the file in the bot's history: its file
//! reference is sent again as it is (the same chunks on the relays, the same
//! `file_unique_id`). Files a bot asks for are downloaded into its `files/<file_id>/` and
//! served from there; files it uploads stay in `sent/`, whose chunks its node serves to peers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use meshgram_node::client::api::{ApiError, Call, Reply};
use meshgram_node::client::history::StoredMessage;
use meshgram_node::client::media::safe_name;
use meshgram_node::proto::media::FileRef;
use meshgram_node::proto::payload::MessageId;
use meshgram_node::server::public_http;
use serde_json::{Value, json};

use crate::api::{Params, TgError, disk_error};
use crate::bots::{Bot, node_error};

/// Largest file fetched from a URL (Telegram's limit for files sent by URL).
const MAX_URL_FILE: u64 = 20 * 1024 * 1024;
/// How long fetching a file from a URL may take.
const URL_TIMEOUT: Duration = Duration::from_secs(60);

fn wrong_file() -> TgError {
    TgError::bad_request("wrong file identifier/HTTP URL specified")
}

/// The file a media parameter names, uploaded to the relays if it is new. `None` if the
/// parameter is absent.
pub(crate) async fn input_file(bot: &Bot, p: &Params, field: &str) -> Result<Option<FileRef>, TgError> {
    if let Some(path) = p.files().uploaded.get(field) {
        return upload(bot, p, path).await.map(Some);
    }
    let Some(value) = p.str(field).filter(|v| !v.is_empty()) else { return Ok(None) };
    named_file(bot, p, &value).await.map(Some)
}

/// A file by `attach://<part>`, URL or `file_id`.
pub(crate) async fn named_file(bot: &Bot, p: &Params, value: &str) -> Result<FileRef, TgError> {
    if let Some(part) = value.strip_prefix("attach://") {
        let path = p.files().uploaded.get(part).ok_or_else(wrong_file)?;
        return upload(bot, p, path).await;
    }
    if value.starts_with("http://") || value.starts_with("https://") {
        let path = fetch_url(bot, p, value).await?;
        return upload(bot, p, &path).await;
    }
    let message = file_message(bot, value).await?;
    message.file.map(|f| *f).ok_or_else(wrong_file)
}

/// Uploads a file of this request; it is kept from then on (the node serves its chunks).
async fn upload(bot: &Bot, p: &Params, path: &Path) -> Result<FileRef, TgError> {
    if std::fs::metadata(path).map_err(TgError::internal)?.len() == 0 {
        return Err(TgError::bad_request("file must be non-empty"));
    }
    match bot.node.call(Call::UploadFile { path: path.to_path_buf(), part_size: None }).await {
        Ok(Reply::Uploaded { file }) => {
            p.files().keep(path);
            Ok(file)
        }
        Ok(other) => Err(TgError::internal(ApiError::unexpected("upload_file", &other))),
        Err(e) => Err(node_error(&e)),
    }
}

/// Downloads an http(s) URL into a directory of this request, bounded in size and time.
/// Unless the bridge runs with `--fetch-private-urls`, only public addresses are fetched: a
/// bot must not reach the bridge's own network (loopback, private, link-local) by a URL, nor
/// by a redirect, nor by a name that resolves there.
async fn fetch_url(bot: &Bot, p: &Params, url: &str) -> Result<PathBuf, TgError> {
    let failed = || TgError::bad_request("failed to get HTTP URL content");
    // No proxy: it would resolve names itself, past the check below.
    let mut client = reqwest::Client::builder().timeout(URL_TIMEOUT).no_proxy();
    if !bot.fetch_private_urls {
        let parsed = reqwest::Url::parse(url).map_err(|_| wrong_file())?;
        if !public_http::host_may_be_public(&parsed) {
            return Err(failed());
        }
        client = public_http::public_only(client, MAX_REDIRECTS);
    }
    let client = client.build().map_err(TgError::internal)?;
    let mut response = client.get(url).send().await.map_err(|_| failed())?;
    if !response.status().is_success() {
        return Err(failed());
    }
    if response.content_length().is_some_and(|n| n > MAX_URL_FILE) {
        return Err(TgError::bad_request("file is too big"));
    }
    let name = url.split(['?', '#']).next().unwrap_or_default();
    let name = safe_name(name);
    let path = p.files().new_dir().map_err(disk_error)?.join(name);
    let mut out = tokio::fs::File::create(&path).await.map_err(disk_error)?;
    let mut written = 0u64;
    while let Some(chunk) = response.chunk().await.map_err(|_| failed())? {
        written += chunk.len() as u64;
        if written > MAX_URL_FILE {
            return Err(TgError::bad_request("file is too big"));
        }
        tokio::io::AsyncWriteExt::write_all(&mut out, &chunk).await.map_err(disk_error)?;
    }
    tokio::io::AsyncWriteExt::flush(&mut out).await.map_err(disk_error)?;
    Ok(path)
}

/// Redirects followed when fetching a URL.
const MAX_REDIRECTS: usize = 5;

/// The message of the bot's history a `file_id` names, with its file.
async fn file_message(bot: &Bot, file_id: &str) -> Result<StoredMessage, TgError> {
    let id: MessageId = file_id.parse().map_err(|_| wrong_file())?;
    match bot.node.call(Call::GetMessage { message: id }).await {
        Ok(Reply::Message { message }) if message.file.is_some() && !message.deleted => Ok(message),
        Ok(_) => Err(wrong_file()),
        Err(e) if e.code == "NOT_FOUND" || e.code == "USAGE" => Err(wrong_file()),
        Err(e) => Err(node_error(&e)),
    }
}

/// `getFile`: downloads the file here (once), and answers where the file route serves it.
pub(crate) async fn get_file(bot: &Bot, p: &Params) -> Result<Value, TgError> {
    let file_id = p.required_str("file_id")?;
    let message = file_message(bot, &file_id).await?;
    let path = downloaded(bot, &message).await?;
    let file = message.file.as_deref().ok_or_else(wrong_file)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(json!({
        "file_id": file_id,
        "file_unique_id": file.file_id.to_string(),
        "file_size": file.size,
        "file_path": format!("{file_id}/{name}"),
    }))
}

/// The file of `message` on this disk, downloaded (and checked part by part) if it is not.
async fn downloaded(bot: &Bot, message: &StoredMessage) -> Result<PathBuf, TgError> {
    let dir = bot.dir.join("files").join(message.id.to_string());
    if let Some(found) = only_file(&dir) {
        return Ok(found);
    }
    std::fs::create_dir_all(&dir).map_err(disk_error)?;
    let call = Call::Download { message: message.id, out: Some(dir), range: None };
    match bot.node.call(call).await {
        Ok(Reply::Downloaded(downloaded)) => Ok(downloaded.path),
        Ok(other) => Err(TgError::internal(ApiError::unexpected("download", &other))),
        Err(e) if e.code == "NOT_FOUND" => Err(wrong_file()),
        Err(e) => Err(node_error(&e)),
    }
}

/// The one complete file in `dir` (downloads appear only complete; partial ones are hidden).
fn only_file(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
}

/// The file route: `<file_id>/<name>` as `getFile` gave it; only the `file_id` counts.
pub(crate) async fn serve(bot: &Bot, file_path: &str) -> Response {
    let not_found = || TgError::new(404, "Not Found: file not found").into_response();
    let Some(file_id) = file_path.split('/').next() else { return not_found() };
    let message = match file_message(bot, file_id).await {
        Ok(message) => message,
        Err(_) => return not_found(),
    };
    let path = match downloaded(bot, &message).await {
        Ok(path) => path,
        Err(e) => return e.into_response(),
    };
    let file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(_) => return not_found(),
    };
    let size = file.metadata().await.map(|m| m.len()).unwrap_or_default();
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    let mime = message.file.as_ref().map(|f| f.mime.clone()).unwrap_or_default();
    (StatusCode::OK, [(header::CONTENT_TYPE, mime), (header::CONTENT_LENGTH, size.to_string())], body).into_response()
}
