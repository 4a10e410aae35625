//! The baseline of `tests/bench/bot_bridge.sh`: an axum hello-world handler, built like the
//! bridge (same axum, same runtime), answering every path with a Bot API-shaped JSON body.
//!
//!   cargo run --release -p meshgram-bot-bridge --example hello -- 127.0.0.1:0

use serde_json::json;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("{}", json!({ "event": "ready", "http": format!("http://{}", listener.local_addr()?) }));
    let app = axum::Router::new().fallback(|| async { axum::Json(json!({ "ok": true, "result": true })) });
    axum::serve(listener, app).await
}
