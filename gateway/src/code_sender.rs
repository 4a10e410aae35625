//! Delivering login codes: to a file (the embedded default, for tests and local networks) or
//! to an SMS provider's HTTP webhook (an external service).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use meshgram_node::ids::Phone;

/// A webhook that takes longer than this is treated as failed; the user may ask again.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a code could not be delivered.
#[derive(Debug, thiserror::Error)]
pub enum CodeSendError {
    /// The sink file could not be written.
    #[error("code sink {path}: {source}")]
    File { path: PathBuf, source: std::io::Error },
    /// The webhook did not accept the code.
    #[error("SMS webhook {url}: {reason}")]
    Webhook { url: String, reason: String },
    /// The `--code-sink` value is not understood.
    #[error("code sink '{0}' is neither file:PATH nor webhook:URL")]
    BadSpec(String),
}

/// Where codes go.
#[derive(Debug, Clone)]
pub enum CodeSender {
    /// Append one JSON line per code to this file.
    File(PathBuf),
    /// POST `{phone, code, text}` as JSON to this URL.
    Webhook { url: String, client: reqwest::Client },
}

impl CodeSender {
    /// Parses `file:PATH` or `webhook:URL`.
    pub fn parse(spec: &str) -> Result<Self, CodeSendError> {
        if let Some(path) = spec.strip_prefix("file:") {
            Ok(CodeSender::File(PathBuf::from(path)))
        } else if let Some(url) = spec.strip_prefix("webhook:") {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(CodeSendError::BadSpec(spec.into()));
            }
            let client = reqwest::Client::builder()
                .timeout(WEBHOOK_TIMEOUT)
                .build()
                .map_err(|e| CodeSendError::Webhook { url: url.into(), reason: e.to_string() })?;
            Ok(CodeSender::Webhook { url: url.into(), client })
        } else {
            Err(CodeSendError::BadSpec(spec.into()))
        }
    }

    /// The sink's kind, for metrics: `file` or `webhook`.
    pub fn kind(&self) -> &'static str {
        match self {
            CodeSender::File(_) => "file",
            CodeSender::Webhook { .. } => "webhook",
        }
    }

    /// How the sink is described in the ready line and network.json.
    pub fn describe(&self) -> String {
        match self {
            CodeSender::File(path) => path.display().to_string(),
            CodeSender::Webhook { url, .. } => url.clone(),
        }
    }

    /// Delivers one code. Blocking: called from the service's blocking worker threads.
    pub fn deliver(
        &self,
        runtime: &tokio::runtime::Handle,
        phone: &Phone,
        code: &str,
        now: u64,
    ) -> Result<(), CodeSendError> {
        match self {
            CodeSender::File(path) => {
                let line = serde_json::json!({ "phone": phone.as_str(), "code": code, "at": now });
                let err = |source| CodeSendError::File { path: path.clone(), source };
                let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(err)?;
                writeln!(file, "{line}").map_err(err)?;
                file.sync_data().map_err(err)
            }
            CodeSender::Webhook { url, client } => {
                let body = serde_json::json!({
                    "phone": phone.as_str(),
                    "code": code,
                    "text": format!("Meshgram code: {code}"),
                });
                let fail = |reason: String| CodeSendError::Webhook { url: url.clone(), reason };
                let response =
                    runtime.block_on(client.post(url).json(&body).send()).map_err(|e| fail(e.to_string()))?;
                if !response.status().is_success() {
                    return Err(fail(format!("answered {}", response.status())));
                }
                Ok(())
            }
        }
    }
}
