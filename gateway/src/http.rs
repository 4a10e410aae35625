//! HTTP: `/healthz`, Prometheus `/metrics`, and the operator's admin endpoint for bots
//! (`/admin/bots…`) and relays (`/admin/relays/{peer}/revoke`), with the bearer token from
//! `admin.json` in the data dir. The admin endpoint exists
//! because a running gateway holds its redb file exclusively.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use meshgram_node::crypto::cert::unix_now;
use meshgram_node::ids::UserId;
use meshgram_node::proto::{ErrorCode, WireError};
use serde::Deserialize;

use crate::metrics::Metrics;
use crate::service::AuthService;

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct HttpState {
    pub service: Arc<AuthService>,
    pub metrics: Arc<Metrics>,
    /// The bearer token admin calls must present.
    pub admin_token: Arc<String>,
}

/// Builds the router (no socket), so tests can call it directly.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(get_metrics))
        .route("/admin/bots", get(list_bots).post(create_bot))
        .route("/admin/bots/{bot_id}/revoke-token", post(revoke_bot_token))
        .route("/admin/relays/{relay}/revoke", post(revoke_relay))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", "no such endpoint") })
        .with_state(state)
}

/// The one error shape of this server: `{"error":{"code":…,"message":…}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: String,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiError { status, code: code.into(), message: message.into() }
    }
}

impl From<WireError> for ApiError {
    fn from(e: WireError) -> Self {
        let status = match e.code {
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::FloodWait => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError { status, code: e.code.to_string(), message: e.message }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

/// `GET /metrics`
async fn get_metrics(State(state): State<HttpState>) -> impl IntoResponse {
    let service = Arc::clone(&state.service);
    match tokio::task::spawn_blocking(move || service.counts()).await {
        Ok(Ok((accounts, sessions))) => {
            state.metrics.accounts.set(i64::try_from(accounts).unwrap_or(i64::MAX));
            state.metrics.sessions_active.set(i64::try_from(sessions).unwrap_or(i64::MAX));
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "could not count accounts and sessions for /metrics"),
        Err(e) => tracing::warn!(error = %e, "counting accounts and sessions did not finish"),
    }
    ([(header::CONTENT_TYPE, meshgram_node::server::service::OPENMETRICS_CONTENT_TYPE)], state.metrics.encode())
}

fn check_admin(state: &HttpState, headers: &HeaderMap) -> Result<(), ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Comparing hashes (blake3::Hash's == is constant-time) leaks nothing about the token.
    if blake3::hash(presented.as_bytes()) != blake3::hash(state.admin_token.as_bytes()) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "missing or wrong admin token (see admin.json in the gateway's data dir)",
        ));
    }
    Ok(())
}

/// Runs blocking service work off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, WireError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", format!("handler failed: {e}")))?
        .map_err(ApiError::from)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBotBody {
    username: String,
    name: String,
    owner: Option<UserId>,
}

/// `POST /admin/bots` `{"username":…,"name":…,"owner":user_id?}`
async fn create_bot(
    State(state): State<HttpState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    check_admin(&state, &headers)?;
    let body: CreateBotBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            format!("expected {{\"username\",\"name\",\"owner\"?}}: {e}"),
        )
    })?;
    let service = Arc::clone(&state.service);
    let issued = blocking(move || service.create_bot(body.owner, &body.username, &body.name, unix_now())).await?;
    Ok((StatusCode::CREATED, Json(issued)))
}

/// `GET /admin/bots`
async fn list_bots(State(state): State<HttpState>, headers: HeaderMap) -> Result<impl IntoResponse, ApiError> {
    check_admin(&state, &headers)?;
    let service = Arc::clone(&state.service);
    Ok(Json(blocking(move || service.list_bots(None)).await?))
}

/// `POST /admin/bots/{bot_id}/revoke-token`
async fn revoke_bot_token(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Path(bot_id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    check_admin(&state, &headers)?;
    let bot: UserId = bot_id
        .parse()
        .map_err(|e: meshgram_node::ids::InvalidValue| ApiError::new(StatusCode::BAD_REQUEST, "BAD_REQUEST", e.0))?;
    let service = Arc::clone(&state.service);
    Ok(Json(blocking(move || service.revoke_bot_token(None, bot, unix_now())).await?))
}

/// `POST /admin/relays/{relay}/revoke`
async fn revoke_relay(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Path(relay): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    check_admin(&state, &headers)?;
    let relay: libp2p::PeerId = relay.parse().map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "BAD_REQUEST", format!("{relay} is not a relay's peer id: {e}"))
    })?;
    let service = Arc::clone(&state.service);
    Ok(Json(blocking(move || service.revoke_relay(relay, unix_now())).await?))
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use libp2p::identity::ed25519;
    use tower::ServiceExt;

    use super::*;
    use crate::code_sender::CodeSender;
    use crate::config::Limits;
    use crate::store::Store;

    fn state(dir: &std::path::Path) -> HttpState {
        let metrics = Arc::new(Metrics::new());
        let service = AuthService::new(
            Store::open(&dir.join("gw.redb")).unwrap(),
            ed25519::Keypair::generate(),
            CodeSender::File(dir.join("codes.log")),
            Limits::default(),
            tokio::runtime::Handle::current(),
            Arc::clone(&metrics),
        );
        HttpState { service: Arc::new(service), metrics, admin_token: Arc::new("sesame".into()) }
    }

    async fn call(
        state: &HttpState,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: &str,
    ) -> (StatusCode, serde_json::Value) {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let response =
            router(state.clone()).oneshot(request.body(Body::from(body.to_string())).unwrap()).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn admin_needs_the_token_and_answers_errors_in_one_shape() {
        let dir = tempfile::tempdir().unwrap();
        let s = state(dir.path());
        let create = r#"{"username":"ops_bot","name":"Ops"}"#;
        let (status, body) = call(&s, "POST", "/admin/bots", None, create).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("UNAUTHORIZED")));
        let (status, _) = call(&s, "POST", "/admin/bots", Some("wrong"), create).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);

        let (status, body) = call(&s, "POST", "/admin/bots", Some("sesame"), create).await;
        assert_eq!(status, StatusCode::CREATED);
        assert!(body["token"].as_str().unwrap().starts_with(&format!("{}:", body["bot"]["user_id"])));

        for (bad, code) in [
            ("{", "BAD_REQUEST"),
            (r#"{"username":"ops_bot","name":"Again"}"#, "USERNAME_OCCUPIED"),
            (r#"{"username":"plain","name":"X"}"#, "USERNAME_INVALID"),
        ] {
            let (status, body) = call(&s, "POST", "/admin/bots", Some("sesame"), bad).await;
            assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some(code)), "{bad}");
        }
        let (status, body) = call(&s, "POST", "/admin/bots/notanumber/revoke-token", Some("sesame"), "").await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("BAD_REQUEST")));
        let (status, _) = call(&s, "POST", "/admin/bots/42/revoke-token", Some("sesame"), "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, body) = call(&s, "GET", "/admin/bots", Some("sesame"), "").await;
        assert_eq!((status, body.as_array().map(Vec::len)), (StatusCode::OK, Some(1)));
        let (status, _) = call(&s, "POST", "/admin/relays/notapeer/revoke", Some("sesame"), "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let relay = libp2p::PeerId::random();
        let (status, _) = call(&s, "POST", &format!("/admin/relays/{relay}/revoke"), None, "").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, first) = call(&s, "POST", &format!("/admin/relays/{relay}/revoke"), Some("sesame"), "").await;
        assert_eq!((status, first["relay"].as_str()), (StatusCode::OK, Some(relay.to_string().as_str())));
        let (_, again) = call(&s, "POST", &format!("/admin/relays/{relay}/revoke"), Some("sesame"), "").await;
        assert_eq!(again["revoked_at"], first["revoked_at"], "revoking again changes nothing");
        let (status, body) = call(&s, "GET", "/nope", None, "").await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("NOT_FOUND")));
    }
}
