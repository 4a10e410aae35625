//! Webhooks: `setWebhook`, `deleteWebhook`, `getWebhookInfo`, and the task that POSTs a bot's
//! queued updates to its URL.
//!
//! Updates go one at a time, oldest first, so a bot sees them in order; one is confirmed
//! (removed from the queue) only when the bot's server answered 2xx. A failure that may pass
//! (refused, timed out, 5xx, 429) is retried with a growing pause and shown by
//! `getWebhookInfo`; nothing is dropped. Plain HTTP to any host and port is allowed, as a local
//! Bot API server allows it.

use std::sync::Weak;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::api::{Params, TgError, invalid};
use crate::bots::Bot;
use crate::methods::ALLOWED_UPDATES;

/// The store setting holding a bot's [`Webhook`].
const WEBHOOK: &str = "webhook";
/// The store setting holding the last delivery error: `{"date": unix secs, "message": …}`.
const LAST_ERROR: &str = "webhook_last_error";
/// How long a bot's server may take to answer one update.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Pauses between failed deliveries: doubling from the first to the last.
const FIRST_RETRY: Duration = Duration::from_millis(500);
const LAST_RETRY: Duration = Duration::from_secs(60);
/// How often an idle delivery task looks at the queue without being woken (a safety net).
const IDLE_LOOK: Duration = Duration::from_secs(30);
/// The header carrying the secret token, as Telegram sends it.
const SECRET_HEADER: &str = "X-Telegram-Bot-Api-Secret-Token";

/// A bot's webhook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Webhook {
    url: String,
    secret_token: Option<String>,
    max_connections: i64,
}

fn webhook_of(bot: &Bot) -> Result<Option<Webhook>, TgError> {
    let value = bot.store.setting(WEBHOOK).map_err(TgError::internal)?;
    Ok(value.and_then(|v| serde_json::from_value(v).ok()))
}

/// Whether the bot has a webhook (then `getUpdates` is refused with 409).
pub(crate) fn is_set(bot: &Bot) -> Result<bool, TgError> {
    Ok(webhook_of(bot)?.is_some())
}

/// `setWebhook`: an empty URL removes it.
pub(crate) fn set(bot: &Bot, p: &Params) -> Result<Value, TgError> {
    let url = p.str("url").unwrap_or_default();
    if url.is_empty() {
        return delete(bot, p);
    }
    let parsed = reqwest::Url::parse(&url).map_err(|_| TgError::bad_request("bad webhook: invalid URL"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(TgError::bad_request("bad webhook: an HTTP URL must be provided for webhook"));
    }
    let secret_token = p.str("secret_token").filter(|s| !s.is_empty());
    if let Some(secret) = &secret_token
        && (secret.len() > 256 || !secret.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'))
    {
        return Err(TgError::bad_request("secret token contains unallowed characters"));
    }
    let max_connections = p.int("max_connections")?.unwrap_or(40);
    if !(1..=100).contains(&max_connections) {
        return Err(invalid("max_connections"));
    }
    if p.bool("drop_pending_updates")? {
        bot.store.drop_pending().map_err(TgError::internal)?;
    }
    if p.has("allowed_updates") {
        crate::methods::set_allowed_updates(bot, p)?;
    }
    let hook = Webhook { url, secret_token, max_connections };
    let value = serde_json::to_value(&hook).map_err(TgError::internal)?;
    bot.store.set_setting(WEBHOOK, Some(&value)).map_err(TgError::internal)?;
    bot.store.set_setting(LAST_ERROR, None).map_err(TgError::internal)?;
    // The delivery task may be sleeping: what is queued goes now.
    bot.arrived.notify_waiters();
    Ok(true.into())
}

/// `deleteWebhook` (and `setWebhook` with an empty URL): updates wait for `getUpdates` again.
pub(crate) fn delete(bot: &Bot, p: &Params) -> Result<Value, TgError> {
    if p.bool("drop_pending_updates")? {
        bot.store.drop_pending().map_err(TgError::internal)?;
    }
    bot.store.set_setting(WEBHOOK, None).map_err(TgError::internal)?;
    bot.store.set_setting(LAST_ERROR, None).map_err(TgError::internal)?;
    Ok(true.into())
}

pub(crate) fn info(bot: &Bot) -> Result<Value, TgError> {
    let mut info = json!({
        "url": "",
        "has_custom_certificate": false,
        "pending_update_count": bot.store.pending_count().map_err(TgError::internal)?,
    });
    if let Some(hook) = webhook_of(bot)? {
        info["url"] = hook.url.into();
        info["max_connections"] = hook.max_connections.into();
        if let Some(allowed) = bot.store.setting(ALLOWED_UPDATES).map_err(TgError::internal)? {
            info["allowed_updates"] = allowed;
        }
        if let Some(error) = bot.store.setting(LAST_ERROR).map_err(TgError::internal)? {
            info["last_error_date"] = error["date"].clone();
            info["last_error_message"] = error["message"].clone();
        }
    }
    Ok(info)
}

/// Delivers a bot's updates to its webhook while the bot runs (it holds the bot weakly).
pub(crate) async fn deliver(bot: Weak<Bot>) {
    // A redirect would turn the POST into a GET without the update: it is a failed delivery.
    let client = reqwest::Client::builder().timeout(DELIVERY_TIMEOUT).redirect(reqwest::redirect::Policy::none());
    let client = match client.build() {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "no HTTP client for webhooks");
            return;
        }
    };
    let Some(woken) = bot.upgrade().map(|b| b.arrived.clone()) else { return };
    let mut retry = FIRST_RETRY;
    loop {
        let Some(this) = bot.upgrade() else { return };
        let arrived = woken.notified();
        tokio::pin!(arrived);
        arrived.as_mut().enable();
        let next = match next_update(&this) {
            Ok(next) => next,
            Err(e) => {
                tracing::warn!(error = %e.description, "the webhook queue could not be read; retrying");
                None
            }
        };
        let Some((hook, update)) = next else {
            drop(this);
            let _ = tokio::time::timeout(IDLE_LOOK, arrived).await;
            continue;
        };
        let update_id = update["update_id"].as_u64().unwrap_or_default();
        let mut request = client.post(&hook.url).json(&update);
        if let Some(secret) = &hook.secret_token {
            request = request.header(SECRET_HEADER, secret);
        }
        drop(this);
        let outcome = match request.send().await {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => Err(format!("Wrong response from the webhook: {}", response.status())),
            Err(e) if e.is_timeout() => Err("Read timeout expired".to_string()),
            Err(e) if e.is_connect() => Err("Connection refused".to_string()),
            Err(e) => Err(format!("Failed to send the update: {e}")),
        };
        let Some(this) = bot.upgrade() else { return };
        match outcome {
            Ok(()) => {
                retry = FIRST_RETRY;
                if let Err(e) = this.store.confirm(update_id) {
                    // It will come again: not at once, or the bot gets it over and over.
                    tracing::warn!(error = %e, "a delivered update was not confirmed; retrying");
                    drop(this);
                    tokio::time::sleep(LAST_RETRY).await;
                }
            }
            Err(message) => {
                // The host only: a webhook's path often holds a secret (Telegram suggests one).
                let host = url::Url::parse(&hook.url).ok().and_then(|u| u.host_str().map(str::to_owned));
                tracing::info!(host = host.as_deref().unwrap_or("?"), %message, "a webhook delivery failed; retrying");
                let error = json!({ "date": meshgram_node::ids::now_ms() / 1000, "message": message });
                let _ = this.store.set_setting(LAST_ERROR, Some(&error));
                drop(this);
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(LAST_RETRY);
            }
        }
    }
}

/// The oldest update the webhook should get now, if the bot has one.
fn next_update(bot: &Bot) -> Result<Option<(Webhook, Value)>, TgError> {
    let Some(hook) = webhook_of(bot)? else { return Ok(None) };
    let allowed = crate::methods::allowed_updates(bot)?;
    let mut updates = bot.store.updates(None, 1, allowed.as_deref()).map_err(TgError::internal)?;
    Ok(updates.pop().map(|update| (hook, update)))
}
