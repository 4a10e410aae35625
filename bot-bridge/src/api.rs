//! The HTTP side: `/bot<token>/<method>` and `/file/bot<token>/<path>`, parameters from the
//! query string, an urlencoded form or a JSON body, and Telegram's response envelope and errors
//! (`../shared/botapi/RULES.md`): the HTTP status is the `error_code`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use meshgram_node::client::media::safe_name;

use crate::bots::Bots;
use crate::methods;

/// Largest request body read (JSON and forms; uploads come with multipart).
const MAX_BODY: usize = 1 << 20;
/// Largest file uploaded in one request, as a local Bot API server takes.
pub(crate) const MAX_UPLOAD: u64 = 2000 * 1024 * 1024;
/// Most files and fields in one multipart request (an album has ten).
const MAX_PARTS: usize = 64;

/// A Bot API failure: its `error_code` (= HTTP status), description and, for 429, how long to
/// wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TgError {
    pub(crate) code: u16,
    pub(crate) description: String,
    pub(crate) retry_after: Option<u64>,
}

impl TgError {
    pub(crate) fn new(code: u16, description: impl Into<String>) -> Self {
        TgError { code, description: description.into(), retry_after: None }
    }

    /// 400 with Telegram's prefix.
    pub(crate) fn bad_request(detail: &str) -> Self {
        TgError::new(400, format!("Bad Request: {detail}"))
    }

    pub(crate) fn flood(retry_after: u64) -> Self {
        TgError {
            code: 429,
            description: format!("Too Many Requests: retry after {retry_after}"),
            retry_after: Some(retry_after),
        }
    }

    /// The bridge failed (its store, a node of another version): logged, answered as 500.
    pub(crate) fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "bot API request failed inside the bridge");
        TgError::new(500, "Internal Server Error: restart")
    }
}

impl IntoResponse for TgError {
    fn into_response(self) -> Response {
        let mut body = json!({ "ok": false, "error_code": self.code, "description": self.description });
        if let Some(retry_after) = self.retry_after {
            body["parameters"] = json!({ "retry_after": retry_after });
        }
        let status = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after
            && let Ok(value) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

/// A method's parameters, whichever way they came: JSON values, or strings from a query or a
/// form (where objects and arrays are JSON text, as bot libraries send them).
#[derive(Debug, Default)]
pub(crate) struct Params(HashMap<String, Value>, Files);

/// The files of a request: those uploaded with it (multipart, by field name), each in a
/// directory of its own (as are files fetched by URL). A file the node uploaded is kept (the
/// node serves its chunks to peers from there); every other one is removed with the request,
/// whether it failed, was cancelled or did not use it.
#[derive(Debug, Default)]
pub(crate) struct Files {
    pub(crate) uploaded: HashMap<String, PathBuf>,
    /// Directories written, and whether each is kept.
    written: std::sync::Mutex<Vec<(PathBuf, bool)>>,
    root: PathBuf,
}

impl Files {
    fn written(&self) -> std::sync::MutexGuard<'_, Vec<(PathBuf, bool)>> {
        self.written.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A new directory for one file of this request.
    pub(crate) fn new_dir(&self) -> std::io::Result<PathBuf> {
        let dir = self.root.join(meshgram_node::ids::hex(&rand_id()));
        std::fs::create_dir_all(&dir)?;
        self.written().push((dir.clone(), false));
        Ok(dir)
    }

    /// Keeps the file at `path` (in a directory of this request) after the request.
    pub(crate) fn keep(&self, path: &std::path::Path) {
        for (dir, keep) in self.written().iter_mut() {
            if path.starts_with(dir) {
                *keep = true;
            }
        }
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        for (dir, keep) in self.written().drain(..) {
            if !keep {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

fn rand_id() -> [u8; 16] {
    meshgram_node::proto::payload::MessageId::random().0
}

impl Params {
    fn raw(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.raw(name).is_some() || self.1.uploaded.contains_key(name)
    }

    pub(crate) fn files(&self) -> &Files {
        &self.1
    }

    /// A string parameter (numbers are taken as their text).
    pub(crate) fn str(&self, name: &str) -> Option<String> {
        match self.raw(name)? {
            Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        }
    }

    pub(crate) fn required_str(&self, name: &str) -> Result<String, TgError> {
        self.str(name).filter(|s| !s.is_empty()).ok_or_else(|| missing(name))
    }

    /// An integer parameter; a value that is no integer is Telegram's "… is not a number"-kind
    /// error rather than ignored.
    pub(crate) fn int(&self, name: &str) -> Result<Option<i64>, TgError> {
        match self.raw(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n.as_i64().map(Some).ok_or_else(|| invalid(name)),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => s.trim().parse().map(Some).map_err(|_| invalid(name)),
            Some(_) => Err(invalid(name)),
        }
    }

    pub(crate) fn required_int(&self, name: &str) -> Result<i64, TgError> {
        self.int(name)?.ok_or_else(|| missing(name))
    }

    pub(crate) fn bool(&self, name: &str) -> Result<bool, TgError> {
        match self.raw(name) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::String(s)) => match s.as_str() {
                "true" | "True" | "1" => Ok(true),
                "false" | "False" | "0" | "" => Ok(false),
                _ => Err(invalid(name)),
            },
            Some(Value::Number(n)) => Ok(n.as_i64() != Some(0)),
            Some(_) => Err(invalid(name)),
        }
    }

    /// An object or array parameter, given as JSON or as JSON text.
    pub(crate) fn json(&self, name: &str) -> Result<Option<Value>, TgError> {
        match self.raw(name) {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => serde_json::from_str(s)
                .map(Some)
                .map_err(|_| TgError::bad_request(&format!("can't parse {name} JSON object"))),
            Some(other) => Ok(Some(other.clone())),
        }
    }
}

pub(crate) fn missing(name: &str) -> TgError {
    TgError::bad_request(&format!("{name} is empty"))
}

pub(crate) fn invalid(name: &str) -> TgError {
    TgError::bad_request(&format!("invalid {name} specified"))
}

/// The router: everything goes through one handler, which reads the path the way Telegram's
/// server does (so a bad path is Telegram's 404, not the framework's).
pub fn router(bots: Arc<Bots>) -> axum::Router {
    // Bodies are bounded here, by kind: forms and JSON in `read_params`, files in
    // `read_multipart`.
    axum::Router::new().fallback(handle).with_state(bots).layer(axum::extract::DefaultBodyLimit::disable())
}

async fn handle(State(bots): State<Arc<Bots>>, request: Request) -> Response {
    // Clients may percent-encode the path (the token's ':' as %3A, say).
    let path = percent_encoding::percent_decode_str(request.uri().path()).decode_utf8_lossy().into_owned();
    if let Some(rest) = path.strip_prefix("/file/bot") {
        let Some((token, file_path)) = rest.split_once('/') else { return not_found("Not Found") };
        return match bots.get(token).await {
            Ok(bot) => crate::files::serve(&bot, file_path).await,
            Err(e) => e.into_response(),
        };
    }
    let Some(rest) = path.strip_prefix("/bot") else {
        return not_found("Not Found");
    };
    let Some((token, method)) = rest.split_once('/') else {
        return not_found("Not Found");
    };
    let (token, method) = (token.to_string(), method.to_ascii_lowercase());
    if method.is_empty() || method.contains('/') {
        return not_found("Not Found: method not found");
    }
    let bot = match bots.get(&token).await {
        Ok(bot) => bot,
        Err(e) => return e.into_response(),
    };
    let params = match read_params(request, bot.sent_files_dir()).await {
        Ok(params) => params,
        Err(e) => return e.into_response(),
    };
    match methods::call(&bot, &method, &params).await {
        Ok(result) => axum::Json(json!({ "ok": true, "result": result })).into_response(),
        Err(e) => e.into_response(),
    }
}

fn not_found(description: &str) -> Response {
    TgError::new(404, description).into_response()
}

/// Reads the parameters from the query string and the body (JSON, an urlencoded form, or
/// multipart with files, which are written under `files_root`).
pub(crate) async fn read_params(request: Request, files_root: PathBuf) -> Result<Params, TgError> {
    let files = Files { uploaded: HashMap::new(), written: std::sync::Mutex::default(), root: files_root };
    let mut params = Params(HashMap::new(), files);
    read_params_into(request, &mut params).await?;
    Ok(params)
}

async fn read_params_into(request: Request, params: &mut Params) -> Result<(), TgError> {
    if let Some(query) = request.uri().query() {
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            params.0.insert(key.into_owned(), Value::String(value.into_owned()));
        }
    }
    let content_type =
        request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    if content_type.starts_with("multipart/form-data") {
        return read_multipart(request, params).await;
    }
    let body = axum::body::to_bytes(request.into_body(), MAX_BODY)
        .await
        .map_err(|_| TgError::new(413, "Request Entity Too Large"))?;
    if body.is_empty() {
        return Ok(());
    }
    if content_type.starts_with("application/json") {
        let value: Value =
            serde_json::from_slice(&body).map_err(|_| TgError::bad_request("can't parse JSON object"))?;
        let Value::Object(map) = value else {
            return Err(TgError::bad_request("can't parse JSON object"));
        };
        params.0.extend(map);
    } else if content_type.starts_with("application/x-www-form-urlencoded") || content_type.is_empty() {
        for (key, value) in form_urlencoded::parse(&body) {
            params.0.insert(key.into_owned(), Value::String(value.into_owned()));
        }
    } else {
        return Err(TgError::bad_request(&format!("unsupported Content-Type {content_type}")));
    }
    Ok(())
}

/// A multipart body: fields with a file name are files, streamed to disk (each in a
/// directory of its own, under the name the client gave, made safe), the others parameters.
async fn read_multipart(request: Request, params: &mut Params) -> Result<(), TgError> {
    use axum::extract::FromRequest;
    let malformed = |_| TgError::bad_request("can't parse multipart/form-data body");
    let mut multipart = axum::extract::Multipart::from_request(request, &())
        .await
        .map_err(|_| TgError::bad_request("can't parse multipart/form-data body: no boundary"))?;
    // Bounded per request, not only per part: texts together as one form, files together as
    // one upload.
    let (mut parts, mut text_bytes, mut file_bytes) = (0, 0usize, 0u64);
    while let Some(mut field) = multipart.next_field().await.map_err(malformed)? {
        parts += 1;
        if parts > MAX_PARTS {
            return Err(TgError::bad_request("too many parts in the request"));
        }
        let name = field.name().unwrap_or_default().to_string();
        let Some(file_name) = field.file_name().map(safe_name) else {
            let mut text = Vec::new();
            while let Some(chunk) = field.chunk().await.map_err(malformed)? {
                text_bytes += chunk.len();
                if text_bytes > MAX_BODY {
                    return Err(TgError::new(413, "Request Entity Too Large"));
                }
                text.extend_from_slice(&chunk);
            }
            let text = String::from_utf8(text).map_err(|_| TgError::bad_request(&format!("{name} is not UTF-8")))?;
            params.0.insert(name, Value::String(text));
            continue;
        };
        let dir = params.1.new_dir().map_err(TgError::internal)?;
        let path = dir.join(&file_name);
        let mut out = tokio::fs::File::create(&path).await.map_err(TgError::internal)?;
        while let Some(chunk) = field.chunk().await.map_err(malformed)? {
            file_bytes += chunk.len() as u64;
            if file_bytes > MAX_UPLOAD {
                return Err(TgError::new(413, "Request Entity Too Large"));
            }
            tokio::io::AsyncWriteExt::write_all(&mut out, &chunk).await.map_err(disk_error)?;
        }
        tokio::io::AsyncWriteExt::flush(&mut out).await.map_err(disk_error)?;
        params.1.uploaded.insert(name, path);
    }
    Ok(())
}

/// A full disk is the server's trouble, not the bot's: 500, and the bot retries.
pub(crate) fn disk_error(e: std::io::Error) -> TgError {
    tracing::warn!(error = %e, "an uploaded file could not be written");
    TgError::new(500, "Internal Server Error: the bridge could not store the file; retry")
}
