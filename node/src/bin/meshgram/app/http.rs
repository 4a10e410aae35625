//! The app's local API, for its UI (and anything of the user's that holds the token).
//!
//! Every request first passes [`check_origin`]: the Host must be this app's own address (a
//! DNS-rebinding page reaches us under its own name) and an Origin, when the browser sends
//! one, must be too (another site's page may send requests, never with our origin). Then
//! every `/api/` route but `/api/auth` needs the run's session from the cookie `/api/auth`
//! sets (HttpOnly, SameSite=Strict: another site's requests never carry it), or the token in
//! an `Authorization: Bearer` header. Answers are JSON: `{"ok": …}` or `{"error": {code,
//! message, retry_after}}` with an HTTP status that fits the code.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use meshgram_node::client::api::{ApiError, Call, Reply};
use meshgram_node::client::control::next_event;
use meshgram_node::client::media::{ByteRange, safe_name};
use meshgram_node::ids::Phone;
use meshgram_node::proto::media::{DEFAULT_PART_SIZE, FileRef, MAX_PART_SIZE, MAX_PARTS};
use meshgram_node::proto::payload::MessageId;
use meshgram_node::proto::{AuthRequest, ErrorCode, LookupQuery};
use serde::Deserialize;
use serde_json::json;
use tokio::io::AsyncWriteExt;

use super::{App, DOWNLOADS_DIR, FILES_DIR, UPLOADS_DIR, assets};

/// The largest request body but uploads': calls are small.
const MAX_CALL_BYTES: usize = 1024 * 1024;
/// The largest file the node can send (every part at the largest size).
const MAX_UPLOAD_BYTES: u64 = MAX_PARTS as u64 * MAX_PART_SIZE as u64;
/// The most bytes one ranged media answer carries: a player asks for the rest as it plays,
/// so playback starts after the first window's parts, not the whole file.
const MEDIA_WINDOW: u64 = 2 * 1024 * 1024;

pub(super) fn router(app: Arc<App>) -> Router {
    let api = Router::new()
        .route("/api/state", get(state))
        .route("/api/login/code", post(login_code))
        .route("/api/login/sign_in", post(login_sign_in))
        .route("/api/call", post(call))
        .route("/api/upload", post(upload).layer(DefaultBodyLimit::disable()))
        .route("/api/media/{message}", get(media))
        .route("/api/thumb/{message}", get(thumbnail))
        .route("/api/events", get(events))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_token));
    Router::new()
        .route("/", get(assets::index))
        .route("/assets/{name}", get(assets::file))
        .route("/api/auth", post(auth))
        .merge(api)
        .fallback(|| async { Failure(ApiError::new("NOT_FOUND", "no such page")) })
        .layer(DefaultBodyLimit::max(MAX_CALL_BYTES))
        .layer(middleware::from_fn_with_state(app.clone(), check_origin))
        .with_state(app)
}

/// A failed request, answered as JSON with a status that fits its code.
#[derive(Debug)]
struct Failure(ApiError);

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure(e)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let e = self.0;
        let status = match e.code.as_str() {
            _ if e.retry_after.is_some() => StatusCode::TOO_MANY_REQUESTS,
            "UNAUTHORIZED" => StatusCode::UNAUTHORIZED,
            "FORBIDDEN" => StatusCode::FORBIDDEN,
            "NOT_FOUND" => StatusCode::NOT_FOUND,
            "NOT_SIGNED_IN" | "ALREADY_SIGNED_IN" | "SECRET_STATE" => StatusCode::CONFLICT,
            "FILE_TOO_BIG" => StatusCode::PAYLOAD_TOO_LARGE,
            "RANGE_NOT_SATISFIABLE" => StatusCode::RANGE_NOT_SATISFIABLE,
            "NETWORK" | "NODE_GONE" => StatusCode::SERVICE_UNAVAILABLE,
            "INTERNAL" | "PROFILE" => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        };
        (status, axum::Json(json!({ "error": e }))).into_response()
    }
}

type Answer = Result<Response, Failure>;

fn ok(value: impl serde::Serialize) -> Answer {
    Ok(axum::Json(json!({ "ok": value })).into_response())
}

// --- guards ----------------------------------------------------------------------------------

/// Refuses requests to another name than ours and requests from another origin, and puts the
/// security headers on every answer.
async fn check_origin(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let ours = [format!("127.0.0.1:{}", app.port), format!("localhost:{}", app.port)];
    let host = request.headers().get(header::HOST).and_then(|h| h.to_str().ok());
    if !host.is_some_and(|host| ours.iter().any(|o| o == host)) {
        let message =
            format!("this app answers only as http://127.0.0.1:{} (the request names another host)", app.port);
        return Failure(ApiError::new("FORBIDDEN", message)).into_response();
    }
    if let Some(origin) = request.headers().get(header::ORIGIN) {
        let same =
            origin.to_str().ok().is_some_and(|o| ours.iter().any(|ours| o.strip_prefix("http://") == Some(ours)));
        if !same {
            let message = "requests from another site's pages are refused".to_string();
            return Failure(ApiError::new("FORBIDDEN", message)).into_response();
        }
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    let csp = "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; object-src 'none'; \
               base-uri 'none'; form-action 'self'; frame-ancestors 'none'";
    headers.entry(header::CONTENT_SECURITY_POLICY).or_insert(HeaderValue::from_static(csp));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    response
}

fn cookie_name(app: &App) -> String {
    // Cookies do not tell ports apart: two apps on one machine must not share one.
    format!("meshgram_app_{}", app.port)
}

/// The token from the cookie or a bearer header, compared in constant time.
async fn require_token(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::to_string);
    let name = cookie_name(&app);
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|h| h.to_str().ok())
        .flat_map(|h| h.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.to_string());
    let allowed =
        bearer.is_some_and(|b| same_secret(&b, &app.token)) || cookie.is_some_and(|c| same_secret(&c, &app.session));
    if !allowed {
        let message = "open the app with the address `meshgram app` printed (it carries the token)";
        return Failure(ApiError::new("UNAUTHORIZED", message)).into_response();
    }
    next.run(request).await
}

fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Deserialize)]
struct AuthBody {
    #[serde(default)]
    token: Option<String>,
    /// The one-time code of the address the app opened in the browser itself.
    #[serde(default)]
    launch: Option<String>,
}

/// Trades the token (or a launch code) from the URL's fragment for the cookie. The cookie
/// holds this run's session, not the token: cookies go to every port of 127.0.0.1, so a
/// cookie another local server was sent opens nothing once the app restarts.
async fn auth(State(app): State<Arc<App>>, body: Bytes) -> Answer {
    let body: AuthBody = parse(&body)?;
    let by_token = body.token.is_some_and(|t| same_secret(&t, &app.token));
    if !by_token && !body.launch.is_some_and(|code| app.take_launch_code(&code)) {
        return Err(ApiError::new("UNAUTHORIZED", "wrong or used token").into());
    }
    let cookie = format!("{}={}; HttpOnly; SameSite=Strict; Path=/", cookie_name(&app), app.session);
    let cookie = HeaderValue::from_str(&cookie).map_err(|e| ApiError::new("INTERNAL", e.to_string()))?;
    let mut response = axum::Json(json!({ "ok": true })).into_response();
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    Ok(response)
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(body).map_err(|e| ApiError::new("BAD_REQUEST", format!("the request body: {e}")).into())
}

// --- signing in ------------------------------------------------------------------------------

async fn state(State(app): State<Arc<App>>) -> Answer {
    let node = app.node().await.ok();
    ok(json!({
        "signed_in": node.is_some(),
        "can_sign_in": app.gateway.is_some(),
        "user_id": node.as_ref().map(|n| n.user_id()),
        "device": node.as_ref().map(|n| n.device().to_string()),
    }))
}

#[derive(Deserialize)]
struct CodeBody {
    phone: String,
}

#[derive(Deserialize)]
struct SignInBody {
    phone: String,
    code: String,
    #[serde(default)]
    password: Option<String>,
}

/// The device's client for signing in, made once (its keys become the session's), in the
/// sign-in slot the caller holds.
async fn sign_in_client(
    app: &App,
    slot: &mut Option<meshgram_node::client::Client>,
) -> Result<meshgram_node::client::Client, Failure> {
    if app.node().await.is_ok() {
        return Err(ApiError::new("ALREADY_SIGNED_IN", "this profile is signed in").into());
    }
    let Some((gateway, _)) = &app.gateway else {
        let message = "this app does not know the network: start it with --network FILE (or --gateway)";
        return Err(ApiError::new("USAGE", message).into());
    };
    if slot.is_none() {
        *slot = Some(meshgram_node::client::Client::open(&app.profile, gateway.clone()).map_err(ApiError::from)?);
    }
    slot.clone().ok_or_else(|| ApiError::new("INTERNAL", "no client").into())
}

fn phone_of(text: &str) -> Result<Phone, Failure> {
    text.trim().parse().map_err(|e: meshgram_node::ids::InvalidValue| ApiError::new("PHONE_NUMBER_INVALID", e.0).into())
}

async fn login_code(State(app): State<Arc<App>>, body: Bytes) -> Answer {
    let body: CodeBody = parse(&body)?;
    let phone = phone_of(&body.phone)?;
    let client = sign_in_client(&app, &mut *app.signing_in.lock().await).await?;
    let expires_in_secs = client.send_code(phone).await.map_err(ApiError::from)?;
    ok(json!({ "expires_in_secs": expires_in_secs }))
}

async fn login_sign_in(State(app): State<Arc<App>>, body: Bytes) -> Answer {
    let body: SignInBody = parse(&body)?;
    let phone = phone_of(&body.phone)?;
    // One sign-in at a time, to its end: another waits, then finds the profile signed in.
    let mut slot = app.signing_in.lock().await;
    let client = sign_in_client(&app, &mut slot).await?;
    let device = client.identity.device_keys();
    let request = AuthRequest::SignIn {
        phone,
        code: body.code.trim().to_string(),
        device,
        device_name: app.device_name.clone(),
        password: body.password.filter(|p| !p.is_empty()),
    };
    let signed_in = client.sign_in(request).await.map_err(|e| match e {
        meshgram_node::client::ClientError::Gateway(g) if g.code == ErrorCode::SessionPasswordNeeded => {
            ApiError::new("SESSION_PASSWORD_NEEDED", "this account has a password")
        }
        other => other.into(),
    })?;
    let new_account = signed_in.new_account;
    let relays = app.gateway.as_ref().map(|(_, relays)| relays.clone()).unwrap_or_default();
    let kept = super::super::cli::keep_session(&app.profile, &client, signed_in, relays, app.device_name.clone())
        .await
        .map_err(|e| e.0)?;
    // The node runs the device's network from here on: one swarm per device.
    *slot = None;
    drop(client);
    let node = app.start_node().await?;
    drop(slot);
    ok(json!({
        "user_id": node.user_id(),
        "new_account": new_account,
        "history_requested": kept.asks_for_history,
        "account": kept.session.account,
    }))
}

// --- calls -----------------------------------------------------------------------------------

/// One call to the node, as the control socket takes it, but for calls that name paths on
/// this machine (the browser sends and gets files through `/api/upload` and `/api/media`).
async fn call(State(app): State<Arc<App>>, body: Bytes) -> Answer {
    let call: Call = parse(&body)?;
    let takes_path = match &call {
        Call::Upload { .. } | Call::UploadFile { .. } | Call::Download { .. } | Call::SecretUpload { .. } => true,
        Call::BackupCreate { out, .. } => out.is_some(),
        Call::BackupRestore { from, .. } => from.is_some(),
        _ => false,
    };
    if takes_path {
        let message = "calls naming files on this machine are not taken here: use /api/upload and /api/media";
        return Err(ApiError::usage(message).into());
    }
    if call == Call::Subscribe {
        return Err(ApiError::usage("events come on the WebSocket /api/events").into());
    }
    ok(app.node().await?.call(call).await?)
}

#[derive(Deserialize)]
struct UploadQuery {
    /// A chat as the CLI takes it: @username, +phone, user id or group id.
    #[serde(default)]
    to: Option<String>,
    /// Or a secret chat (its id).
    #[serde(default)]
    secret: Option<String>,
    name: String,
    #[serde(default)]
    caption: Option<String>,
}

/// The request body becomes a file in the profile, which the node uploads and sends.
async fn upload(
    State(app): State<Arc<App>>,
    Query(query): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Answer {
    let too_big = || ApiError::new("FILE_TOO_BIG", format!("a file may have at most {MAX_UPLOAD_BYTES} bytes"));
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_UPLOAD_BYTES) {
        return Err(too_big().into());
    }
    let node = app.node().await?;
    let to = match (&query.to, &query.secret) {
        (Some(to), None) => Some(to.parse::<LookupQuery>().map_err(|e| ApiError::usage(e.0))?),
        (None, Some(_)) => None,
        _ => return Err(ApiError::usage("give one of to= (a chat) and secret= (a secret chat)").into()),
    };
    let name = meshgram_node::ids::hex(&rand::random::<[u8; 8]>());
    let receiving = RemoveOnDrop(app.profile.join(UPLOADS_DIR).join(&name));
    let written = receive_file(body, &receiving.0, &receiving.0.join(safe_name(&query.name))).await;
    let kept = app.profile.join(FILES_DIR).join(format!("sent-{name}"));
    let result = match written {
        Ok(size) if size > MAX_UPLOAD_BYTES => Err(too_big()),
        Ok(size) => {
            let moved = tokio::fs::create_dir_all(app.profile.join(FILES_DIR)).await;
            moved.and(tokio::fs::rename(&receiving.0, &kept).await).map_err(profile_io)?;
            let path = kept.join(safe_name(&query.name));
            // Big files need bigger parts: a file has at most MAX_PARTS of them.
            let part_size = (size > MAX_PARTS as u64 * DEFAULT_PART_SIZE as u64).then_some(MAX_PART_SIZE);
            let call = match to {
                Some(to) => Call::Upload { path: path.clone(), to, caption: query.caption, part_size },
                None => Call::SecretUpload {
                    chat: query.secret.clone().unwrap_or_default(),
                    path: path.clone(),
                    caption: query.caption,
                },
            };
            let sent = node.call(call).await;
            if sent.is_err() || query.secret.is_some() {
                // Nothing to serve from it: a failed upload, or a secret chat's file.
                let _ = tokio::fs::remove_dir_all(&kept).await;
            }
            sent
        }
        Err(e) => Err(e),
    };
    ok(result?)
}

/// A file of the profile that could not be read or written.
fn profile_io(e: std::io::Error) -> ApiError {
    ApiError::new("PROFILE", e.to_string())
}

/// A path removed when dropped: what a request leaves half written goes with it, even when
/// the browser goes away in the middle.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0).or_else(|_| std::fs::remove_file(&self.0));
    }
}

/// Writes the body to `path`, stopping past the largest file; the bytes written.
async fn receive_file(body: Body, dir: &std::path::Path, path: &std::path::Path) -> Result<u64, ApiError> {
    let io = |e: std::io::Error| ApiError::new("PROFILE", format!("{}: {e}", path.display()));
    tokio::fs::create_dir_all(dir).await.map_err(io)?;
    let mut file = tokio::fs::File::create(path).await.map_err(io)?;
    let mut stream = body.into_data_stream();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::usage(format!("the upload broke off: {e}")))?;
        size += chunk.len() as u64;
        if size > MAX_UPLOAD_BYTES {
            return Ok(size);
        }
        file.write_all(&chunk).await.map_err(io)?;
    }
    file.sync_all().await.map_err(io)?;
    Ok(size)
}

// --- media -----------------------------------------------------------------------------------

/// A message's file, and whether it is a secret chat's.
async fn message_file(app: &App, message: &str) -> Result<(MessageId, FileRef, bool), Failure> {
    let id: MessageId = message.parse().map_err(|e: meshgram_node::ids::InvalidValue| ApiError::usage(e.0))?;
    match app.node().await?.call(Call::FileOf { message: id }).await? {
        Reply::FileOf { file, secret } => Ok((id, file, secret)),
        other => Err(ApiError::unexpected("file_of", &other).into()),
    }
}

/// How long the browser may keep an answer: a secret chat's never (its messages destroy
/// themselves), a cloud file's for a day (a message's file never changes).
fn cache_control(secret: bool) -> &'static str {
    if secret { "no-store" } else { "private, max-age=86400" }
}

async fn thumbnail(State(app): State<Arc<App>>, UrlPath(message): UrlPath<String>) -> Answer {
    let (_, file, secret) = message_file(&app, &message).await?;
    if file.thumbnail.is_empty() {
        return Err(ApiError::new("NOT_FOUND", "this file has no preview").into());
    }
    let headers = [(header::CONTENT_TYPE, "image/jpeg"), (header::CACHE_CONTROL, cache_control(secret))];
    Ok((headers, file.thumbnail).into_response())
}

#[derive(Deserialize)]
struct MediaQuery {
    /// Save rather than show.
    #[serde(default)]
    download: bool,
}

/// A message's file, whole or (with `Range`) one window of it. A cloud file asked for whole
/// (or small enough for one window) is fetched once into the profile and served from there
/// after; a window of a bigger one not fetched yet is fetched for this answer alone, so a
/// player streams a video window by window; a secret chat's file is fetched for each answer
/// and never kept.
async fn media(
    State(app): State<Arc<App>>,
    UrlPath(message): UrlPath<String>,
    Query(query): Query<MediaQuery>,
    headers: HeaderMap,
) -> Answer {
    let (id, file, secret) = message_file(&app, &message).await?;
    let requested = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).filter(|r| r.trim().starts_with("bytes="));
    let range = match requested {
        Some(text) if file.size > 0 => match parse_range(text, file.size) {
            Some(r) => Some(ByteRange { start: r.start, end: r.end.min(r.start + MEDIA_WINDOW - 1) }),
            None => {
                let mut refused = Failure(ApiError::new(
                    "RANGE_NOT_SATISFIABLE",
                    format!("{text} is not within the file's {} bytes", file.size),
                ))
                .into_response();
                let whole = HeaderValue::from_str(&format!("bytes */{}", file.size));
                refused
                    .headers_mut()
                    .insert(header::CONTENT_RANGE, whole.map_err(|e| ApiError::new("INTERNAL", e.to_string()))?);
                return Ok(refused);
            }
        },
        _ => None,
    };
    let node = app.node().await?;
    let kept = app.profile.join(FILES_DIR).join(id.to_string());
    let keep = !secret && (range.is_none() || file.size <= MEDIA_WINDOW);
    if keep && !tokio::fs::try_exists(&kept).await.unwrap_or(false) {
        tokio::fs::create_dir_all(app.profile.join(FILES_DIR)).await.map_err(profile_io)?;
        // Run to the end even if the browser goes: the file is written whole or not at all.
        let call = Call::Download { message: id, out: Some(kept.clone()), range: None };
        let node = node.clone();
        let fetch = tokio::spawn(async move { node.call(call).await });
        fetch.await.map_err(|e| ApiError::new("INTERNAL", e.to_string()))??;
    }
    let (mut opened, offset) = if tokio::fs::try_exists(&kept).await.unwrap_or(false) {
        let opened = tokio::fs::File::open(&kept).await.map_err(profile_io)?;
        (opened, range.map_or(0, |r| r.start))
    } else {
        let dir = app.profile.join(DOWNLOADS_DIR);
        tokio::fs::create_dir_all(&dir).await.map_err(profile_io)?;
        let out = dir.join(meshgram_node::ids::hex(&rand::random::<[u8; 8]>()));
        // Fetched, opened and unlinked on a task of its own: if the browser goes away in the
        // middle (players drop ranges all the time), nothing stays behind.
        let window = tokio::spawn(async move {
            let fetched = node.call(Call::Download { message: id, out: Some(out.clone()), range }).await;
            let opened = match fetched {
                Ok(_) => tokio::fs::File::open(&out).await.map_err(profile_io),
                Err(e) => Err(e),
            };
            let _ = tokio::fs::remove_file(&out).await;
            opened
        });
        (window.await.map_err(|e| ApiError::new("INTERNAL", e.to_string()))??, 0)
    };
    let length = match range {
        Some(r) => r.end - r.start + 1,
        None => opened.metadata().await.map_err(profile_io)?.len(),
    };
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    opened.seek(std::io::SeekFrom::Start(offset)).await.map_err(profile_io)?;
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(opened.take(length)));
    let shown = inline_type(&file.mime).filter(|_| !query.download);
    let disposition = format!(
        "{}; filename*=UTF-8''{}",
        if shown.is_some() { "inline" } else { "attachment" },
        percent_encode(&safe_name(&file.name))
    );
    let mut response = Response::builder()
        .header(header::CONTENT_TYPE, shown.unwrap_or("application/octet-stream"))
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_DISPOSITION, disposition)
        .header(header::CACHE_CONTROL, cache_control(secret))
        .header(header::CONTENT_LENGTH, length)
        // A file is the sender's: never a page that could run in the app's origin.
        .header(header::CONTENT_SECURITY_POLICY, "sandbox; default-src 'none'; media-src 'self'; img-src 'self'");
    if let Some(r) = range {
        response = response
            .status(StatusCode::PARTIAL_CONTENT)
            .header(header::CONTENT_RANGE, format!("bytes {}-{}/{}", r.start, r.end, file.size));
    }
    response.body(body).map_err(|e| ApiError::new("INTERNAL", e.to_string()).into())
}

/// The types shown in the page (pictures, sound, video), by the sender's type: anything else
/// (a page, a script, an SVG that could carry one) is only saved.
const INLINE_TYPES: &[&str] = &[
    "image/jpeg",
    "image/png",
    "image/gif",
    "image/webp",
    "video/mp4",
    "video/webm",
    "video/quicktime",
    "audio/mpeg",
    "audio/ogg",
    "audio/mp4",
    "audio/webm",
    "audio/wav",
    "audio/flac",
];

/// The type to show a file as in the page, if it is one of [`INLINE_TYPES`] (whatever the
/// sender's case and parameters).
fn inline_type(mime: &str) -> Option<&'static str> {
    let bare = mime.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    INLINE_TYPES.iter().copied().find(|t| *t == bare)
}

/// One `bytes=` range of a file of `size` (> 0) bytes, as RFC 9110 reads it; several ranges
/// are answered with the first.
fn parse_range(text: &str, size: u64) -> Option<ByteRange> {
    let spec = text.trim().strip_prefix("bytes=")?.split(',').next()?.trim();
    let (start, end) = spec.split_once('-')?;
    let last = size - 1;
    let range = if start.is_empty() {
        let suffix: u64 = end.parse().ok()?;
        if suffix == 0 {
            return None;
        }
        ByteRange { start: size.saturating_sub(suffix), end: last }
    } else {
        let start: u64 = start.parse().ok()?;
        let end = if end.is_empty() { last } else { end.parse::<u64>().ok()?.min(last) };
        ByteRange { start, end }
    };
    (range.start <= range.end && range.start <= last).then_some(range)
}

fn percent_encode(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// --- events ----------------------------------------------------------------------------------

/// The node's events as JSON text messages, as the control socket sends them, until the page
/// goes; before sign-in the socket waits for the node.
async fn events(State(app): State<Arc<App>>, upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(move |socket| forward_events(app, socket))
}

async fn forward_events(app: Arc<App>, mut socket: WebSocket) {
    let node = loop {
        if let Ok(node) = app.node().await {
            break node;
        }
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_millis(300)) => {}
            incoming = socket.recv() => if !matches!(incoming, Some(Ok(_))) { return },
        }
    };
    let mut events = node.subscribe();
    let hello = json!({ "event": "hello", "user_id": node.user_id() });
    if socket.send(Message::Text(hello.to_string().into())).await.is_err() {
        return;
    }
    loop {
        let event = tokio::select! {
            event = next_event(&mut events) => match event {
                Some(event) => event,
                None => return,
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(_)) => continue,
                _ => return,
            },
        };
        let Ok(text) = serde_json::to_string(&event) else { continue };
        if socket.send(Message::Text(text.into())).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_read_as_rfc_9110_says() {
        let r = |text| parse_range(text, 1000).map(|r| (r.start, r.end));
        assert_eq!(r("bytes=0-"), Some((0, 999)));
        assert_eq!(r("bytes=10-19"), Some((10, 19)));
        assert_eq!(r("bytes=990-5000"), Some((990, 999)));
        assert_eq!(r("bytes=-100"), Some((900, 999)));
        assert_eq!(r("bytes=-5000"), Some((0, 999)));
        assert_eq!(r("bytes=5-1,7-8"), None);
        assert_eq!(r("bytes=1000-"), None);
        assert_eq!(r("bytes=-0"), None);
        assert_eq!(r("items=0-1"), None);
        assert_eq!(r("bytes=a-b"), None);
    }

    #[test]
    fn only_media_shows_inline() {
        assert_eq!(inline_type("image/jpeg"), Some("image/jpeg"));
        assert_eq!(inline_type("Video/MP4; codecs=avc1"), Some("video/mp4"));
        assert_eq!(inline_type("image/svg+xml"), None);
        assert_eq!(inline_type("IMAGE/SVG+XML"), None);
        assert_eq!(inline_type("video/x,text/html"), None);
        assert_eq!(inline_type("text/html"), None);
        assert_eq!(inline_type("application/pdf"), None);
    }
}
