//! Wake-ups for devices that are not connected, through the Web Push endpoint (RFC 8030) each
//! device registered here (`SetPush`).
//!
//! When envelopes land here for a device with no session on this relay, and this relay is the
//! closest live one to its mailbox (so that exactly one of the replicas sends), or a post lands
//! in a group the device reads from this relay and asked to be woken for (`PushGroups`: it reads
//! each group from one relay), [`Pusher::arrived`] hands the device to the dispatcher task and
//! returns at once: the message path never waits on a push service. The dispatcher coalesces (at most one wake-up per device per
//! [`COALESCE_FOR`]) and sends each on a task of its own:
//! - the body is a fixed, content-free text encrypted to the device's keys as RFC 8291 says
//!   (aes128gcm, RFC 8188), so the push service learns nothing, not even who wrote;
//! - signed with VAPID (RFC 8292) when the operator gives a subject;
//! - retried with backoff on 429, 5xx and network errors; the registration is dropped on
//!   404 or 410 (the endpoint is gone); any other answer fails it.
//!
//! Registrations are kept in `DATA/push.redb` (device → endpoint and watched groups), and in
//! memory for the event loop's look-ups.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use libp2p::PeerId;
use meshgram_node::crypto::cert::unix_now;
use meshgram_node::proto::group::GroupId;
use meshgram_node::proto::mailbox::PushEndpoint;
use meshgram_node::server::public_http;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::KeyPair;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};

use crate::metrics::Metrics;

/// The registrations' database inside the data dir.
pub const PUSH_DATABASE_FILE: &str = "push.redb";
/// The relay's VAPID key (PKCS#8), made on first use when a VAPID subject is configured.
pub const VAPID_KEY_FILE: &str = "push-vapid.key";
/// Device peer id → its [`Registration`] (postcard).
const REGISTRATIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("push_registrations");
/// At most one wake-up per device this often: a burst of messages wakes the app once, and it
/// fetches them all.
pub(crate) const COALESCE_FOR: Duration = Duration::from_secs(5);
/// Wake-ups queued for the dispatcher; beyond it, arrivals are coalesced into those queued.
const QUEUE: usize = 4096;
/// Wake-ups being sent at once; the rest wait their turn (a slow push service slows only them).
const SENDING_AT_ONCE: usize = 64;
/// Wake-ups waiting for a sending slot at most; past it a wake-up is given up (counted failed).
const WAITING_AT_MOST: usize = 4096;
/// One POST to a push service.
const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// Tries per wake-up, and the first pause between them (doubling, or the service's Retry-After
/// up to [`MAX_PAUSE`]).
const ATTEMPTS: u32 = 5;
const FIRST_PAUSE: Duration = Duration::from_secs(1);
const MAX_PAUSE: Duration = Duration::from_secs(60);
/// How long a wake-up may wait at the push service for the device (RFC 8030 `TTL`): a day, as a
/// message waits far longer on the relays.
const PUSH_TTL_SECS: u64 = 24 * 3600;
/// The whole plaintext of every wake-up: it says only "look at your mailbox".
pub const WAKE_UP_TEXT: &[u8] = b"{\"meshgram\":\"wake\"}";
/// RFC 8188 record size written in the header (the body is one record, far smaller).
const RECORD_SIZE: u32 = 4096;

/// What the operator chose.
#[derive(Debug, Clone, Default)]
pub struct PushSettings {
    /// Off: no wake-ups are sent (registrations are still taken, so that turning it on works).
    pub enabled: bool,
    /// `mailto:…` or `https://…` for VAPID's `sub`; without it wake-ups are not signed.
    pub vapid_subject: Option<String>,
    /// Whether endpoints on loopback, private or link-local addresses are taken (a push
    /// service on this machine or network). Off, a device cannot make the relay POST into its
    /// own network.
    pub private_endpoints: bool,
}

/// Why the registrations could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum PushOpenError {
    #[error("{path}: {reason}")]
    Database { path: String, reason: String },
    #[error("VAPID key {path}: {reason}")]
    VapidKey { path: String, reason: String },
    #[error("the push HTTP client: {0}")]
    HttpClient(String),
}

/// What a device registered here: its endpoint, and the groups whose posts it wants to be woken
/// for (those it reads from this relay).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Registration {
    endpoint: PushEndpoint,
    groups: Vec<GroupId>,
}

/// The registrations in memory, with the index from a group's mailbox to its watchers, and the
/// endpoints push services said are gone (a device offering one again on its next greeting is
/// told instead).
#[derive(Debug, Default)]
struct Held {
    registrations: HashMap<PeerId, Registration>,
    watchers: HashMap<PeerId, HashSet<PeerId>>,
    gone: HashMap<PeerId, String>,
}

impl Held {
    fn put(&mut self, device: PeerId, registration: Option<Registration>) {
        if let Some(old) = self.registrations.remove(&device) {
            for group in old.groups {
                let mailbox = group.mailbox();
                if let Some(watchers) = self.watchers.get_mut(&mailbox) {
                    watchers.remove(&device);
                    if watchers.is_empty() {
                        self.watchers.remove(&mailbox);
                    }
                }
            }
        }
        if let Some(registration) = registration {
            for group in &registration.groups {
                self.watchers.entry(group.mailbox()).or_default().insert(device);
            }
            self.registrations.insert(device, registration);
        }
    }
}

/// Device → registration, durable (`push.redb`), with the in-memory copy the event loop reads.
#[derive(Debug, Clone)]
pub(crate) struct Registry {
    db: Arc<Database>,
    held: Arc<Mutex<Held>>,
}

/// Why a registration was not kept.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SetError {
    #[error("the push service said this endpoint is gone (404/410); register a new subscription")]
    Gone,
    #[error("the push endpoint could not be kept: {0}")]
    Store(String),
}

impl Registry {
    fn open(path: &Path) -> Result<Self, PushOpenError> {
        let err = |e: &dyn std::fmt::Display| PushOpenError::Database {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let db = Database::create(path).map_err(|e| err(&e))?;
        let tx = db.begin_write().map_err(|e| err(&e))?;
        tx.open_table(REGISTRATIONS).map_err(|e| err(&e))?;
        tx.commit().map_err(|e| err(&e))?;
        let mut held = Held::default();
        let tx = db.begin_read().map_err(|e| err(&e))?;
        for entry in tx.open_table(REGISTRATIONS).map_err(|e| err(&e))?.iter().map_err(|e| err(&e))? {
            let (device, registration) = entry.map_err(|e| err(&e))?;
            match (PeerId::from_bytes(device.value()), postcard::from_bytes::<Registration>(registration.value())) {
                (Ok(device), Ok(registration)) => held.put(device, Some(registration)),
                _ => tracing::error!("skipping a corrupt push registration"),
            }
        }
        Ok(Registry { db: Arc::new(db), held: Arc::new(Mutex::new(held)) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn get(&self, device: &PeerId) -> Option<PushEndpoint> {
        self.lock().registrations.get(device).map(|r| r.endpoint.clone())
    }

    /// The devices to wake for a post in the group whose mailbox this is.
    pub(crate) fn watchers(&self, group_mailbox: &PeerId) -> Vec<PeerId> {
        self.lock().watchers.get(group_mailbox).map(|w| w.iter().copied().collect()).unwrap_or_default()
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().registrations.len()
    }

    /// Keeps (`Some`, with the groups it watched) or drops `device`'s endpoint, durably, then in
    /// memory; refuses one its push service said is gone. Blocking.
    pub(crate) fn set(&self, device: PeerId, endpoint: Option<PushEndpoint>) -> Result<(), SetError> {
        let registration = endpoint.map(|endpoint| {
            let groups = self.lock().registrations.get(&device).map(|r| r.groups.clone()).unwrap_or_default();
            Registration { endpoint, groups }
        });
        self.keep(device, registration)
    }

    /// Keeps `device`'s endpoint and the groups it reads here, durably, then in memory. Blocking.
    pub(crate) fn set_groups(
        &self,
        device: PeerId,
        endpoint: PushEndpoint,
        groups: Vec<GroupId>,
    ) -> Result<(), SetError> {
        self.keep(device, Some(Registration { endpoint, groups }))
    }

    fn keep(&self, device: PeerId, registration: Option<Registration>) -> Result<(), SetError> {
        {
            let mut held = self.lock();
            match &registration {
                Some(r) if held.gone.get(&device) == Some(&r.endpoint.url) => return Err(SetError::Gone),
                _ => held.gone.remove(&device),
            };
        }
        self.write(device, registration).map_err(SetError::Store)
    }

    fn write(&self, device: PeerId, registration: Option<Registration>) -> Result<(), String> {
        let key = device.to_bytes();
        let tx = self.db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut table = tx.open_table(REGISTRATIONS).map_err(|e| e.to_string())?;
            match &registration {
                Some(registration) => {
                    let bytes = postcard::to_stdvec(registration).map_err(|e| e.to_string())?;
                    table.insert(key.as_slice(), bytes.as_slice()).map_err(|e| e.to_string())?;
                }
                None => {
                    table.remove(key.as_slice()).map_err(|e| e.to_string())?;
                }
            }
        }
        tx.commit().map_err(|e| e.to_string())?;
        self.lock().put(device, registration);
        Ok(())
    }

    /// Drops `device`'s registration if its endpoint is still `url` (the device may have
    /// registered a new one meanwhile), and remembers that `url` is gone. Blocking.
    fn drop_gone(&self, device: PeerId, url: &str) {
        if self.get(&device).is_some_and(|e| e.url == url) {
            self.lock().gone.insert(device, url.to_string());
            if let Err(e) = self.write(device, None) {
                tracing::warn!(%device, error = %e, "could not drop a gone push endpoint");
            }
        }
    }
}

/// The event loop's side: registrations, and the queue to the dispatcher.
#[derive(Debug)]
pub(crate) struct Pusher {
    pub(crate) registry: Registry,
    wake: Option<mpsc::Sender<PeerId>>,
    metrics: Arc<Metrics>,
    private_endpoints: bool,
}

impl Pusher {
    /// Opens the registrations in `data_dir` and, if push is on, starts the dispatcher.
    pub(crate) fn start(
        data_dir: &Path,
        settings: &PushSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, PushOpenError> {
        let registry = Registry::open(&data_dir.join(PUSH_DATABASE_FILE))?;
        metrics.push_registrations.set(crate::metrics::gauge_value(registry.len()));
        let wake = if settings.enabled {
            let vapid = match &settings.vapid_subject {
                Some(subject) => Some(Vapid::load_or_create(&data_dir.join(VAPID_KEY_FILE), subject.clone())?),
                None => None,
            };
            let (tx, rx) = mpsc::channel(QUEUE);
            let client = reqwest::Client::builder().timeout(POST_TIMEOUT);
            let client = match settings.private_endpoints {
                true => client.redirect(reqwest::redirect::Policy::none()),
                // Push services answer; they do not redirect.
                false => public_http::public_only(client, 0),
            };
            let client = client.build().map_err(|e| PushOpenError::HttpClient(e.to_string()))?;
            let dispatcher = Dispatcher { registry: registry.clone(), metrics: Arc::clone(&metrics), client, vapid };
            tokio::spawn(dispatcher.run(rx));
            Some(tx)
        } else {
            None
        };
        Ok(Pusher { registry, wake, metrics, private_endpoints: settings.private_endpoints })
    }

    /// Refuses an endpoint this relay would not send to: one on a non-public address, unless
    /// the operator allowed those (names are checked again when they resolve, at each send).
    pub(crate) fn check(&self, endpoint: &PushEndpoint) -> Result<(), String> {
        endpoint.validate()?;
        let url = reqwest::Url::parse(&endpoint.url).map_err(|e| format!("the push endpoint is not a URL: {e}"))?;
        if !self.private_endpoints && !public_http::host_may_be_public(&url) {
            return Err(
                "the push endpoint must be on a public address; this relay does not send into its own network".into()
            );
        }
        Ok(())
    }

    /// Envelopes arrived here for `device`, which has no session here, and this relay is the
    /// closest live one to its mailbox: wake it up, if it registered. Never waits.
    pub(crate) fn arrived(&self, device: PeerId) {
        let Some(wake) = &self.wake else { return };
        if self.registry.get(&device).is_none() {
            return;
        }
        if wake.try_send(device).is_err() {
            // The dispatcher is that far behind: this device's wake-up, if queued, covers it.
            self.metrics.push_wakeups_coalesced.inc();
        }
    }
}

/// Sends wake-ups, coalesced, each on its own task.
struct Dispatcher {
    registry: Registry,
    metrics: Arc<Metrics>,
    client: reqwest::Client,
    vapid: Option<Arc<Vapid>>,
}

impl Dispatcher {
    async fn run(self, mut wake: mpsc::Receiver<PeerId>) {
        let sending = Arc::new(Semaphore::new(SENDING_AT_ONCE));
        let waiting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut last: HashMap<PeerId, Instant> = HashMap::new();
        let mut swept = Instant::now();
        while let Some(device) = wake.recv().await {
            let now = Instant::now();
            if now.duration_since(swept) > COALESCE_FOR {
                last.retain(|_, at| now.duration_since(*at) < COALESCE_FOR);
                swept = now;
            }
            if last.get(&device).is_some_and(|at| now.duration_since(*at) < COALESCE_FOR) {
                self.metrics.push_wakeups_coalesced.inc();
                continue;
            }
            let Some(endpoint) = self.registry.get(&device) else { continue };
            if waiting.load(std::sync::atomic::Ordering::Relaxed) >= WAITING_AT_MOST {
                tracing::warn!(%device, "too many wake-ups waiting for the push services; giving this one up");
                self.metrics.push_wakeups_failed.inc();
                continue;
            }
            last.insert(device, now);
            waiting.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (sending, waiting) = (Arc::clone(&sending), Arc::clone(&waiting));
            let (registry, metrics, client, vapid) =
                (self.registry.clone(), Arc::clone(&self.metrics), self.client.clone(), self.vapid.clone());
            tokio::spawn(async move {
                let Ok(_slot) = sending.acquire_owned().await else { return };
                waiting.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                let outcome = send_with_retries(&client, vapid.as_deref(), &endpoint).await;
                match outcome {
                    Outcome::Sent => {
                        metrics.push_wakeups_sent.inc();
                    }
                    Outcome::Gone => {
                        tracing::info!(%device, "the push endpoint is gone; dropping it");
                        metrics.push_endpoints_dropped.inc();
                        let (url, held) = (endpoint.url.clone(), registry.clone());
                        let dropped = tokio::task::spawn_blocking(move || held.drop_gone(device, &url)).await;
                        if let Err(e) = dropped {
                            tracing::warn!(error = %e, "dropping a gone push endpoint did not finish");
                        }
                        metrics.push_registrations.set(crate::metrics::gauge_value(registry.len()));
                    }
                    Outcome::Failed(why) => {
                        tracing::warn!(%device, %why, "a wake-up could not be delivered");
                        metrics.push_wakeups_failed.inc();
                    }
                }
            });
        }
    }
}

/// How a wake-up ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Sent,
    /// 404 or 410: the subscription no longer exists.
    Gone,
    Failed(String),
}

async fn send_with_retries(client: &reqwest::Client, vapid: Option<&Vapid>, endpoint: &PushEndpoint) -> Outcome {
    let mut pause = FIRST_PAUSE;
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        let body = match encrypt(endpoint, WAKE_UP_TEXT) {
            Ok(body) => body,
            // A key that is not a curve point: no attempt can succeed.
            Err(e) => return Outcome::Failed(e),
        };
        let mut request = client
            .post(&endpoint.url)
            .header("Content-Encoding", "aes128gcm")
            .header("Content-Type", "application/octet-stream")
            .header("TTL", PUSH_TTL_SECS.to_string())
            .header("Urgency", "high")
            .body(body);
        if let Some(vapid) = vapid {
            match vapid.authorization(&endpoint.url) {
                Ok(header) => request = request.header("Authorization", header),
                Err(e) => return Outcome::Failed(e),
            }
        }
        let retry_after = match request.send().await {
            Ok(answer) if answer.status().is_success() => return Outcome::Sent,
            Ok(answer) if matches!(answer.status().as_u16(), 404 | 410) => return Outcome::Gone,
            Ok(answer) if answer.status().as_u16() == 429 || answer.status().is_server_error() => {
                last = format!("answered {}", answer.status());
                answer
                    .headers()
                    .get("Retry-After")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs)
            }
            Ok(answer) => return Outcome::Failed(format!("answered {}", answer.status())),
            Err(e) => {
                last = e.to_string();
                None
            }
        };
        if attempt < ATTEMPTS {
            tokio::time::sleep(retry_after.unwrap_or(pause).min(MAX_PAUSE)).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }
    Outcome::Failed(format!("gave up after {ATTEMPTS} tries: {last}"))
}

/// An HKDF output length for ring.
struct Len(usize);

impl ring::hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn hkdf(salt: &[u8], ikm: &[u8], info: &[u8], len: usize) -> Result<Vec<u8>, String> {
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, salt).extract(ikm);
    let info = [info];
    let okm = prk.expand(&info, Len(len)).map_err(|_| "HKDF output too long".to_string())?;
    let mut out = vec![0; len];
    okm.fill(&mut out).map_err(|_| "HKDF output too long".to_string())?;
    Ok(out)
}

/// Encrypts `plaintext` to `endpoint`'s keys as RFC 8291 says (one aes128gcm record, RFC 8188):
/// `salt(16) ‖ rs(4) ‖ idlen(1) ‖ keyid (our ephemeral public key, 65) ‖ ciphertext`.
pub fn encrypt(endpoint: &PushEndpoint, plaintext: &[u8]) -> Result<Vec<u8>, String> {
    use ring::agreement::{ECDH_P256, EphemeralPrivateKey, UnparsedPublicKey, agree_ephemeral};
    let rng = SystemRandom::new();
    let ours = EphemeralPrivateKey::generate(&ECDH_P256, &rng).map_err(|_| "no randomness".to_string())?;
    let our_public = ours.compute_public_key().map_err(|_| "no public key".to_string())?.as_ref().to_vec();
    let theirs = UnparsedPublicKey::new(&ECDH_P256, endpoint.p256dh.as_slice());
    let shared = agree_ephemeral(ours, &theirs, |secret| secret.to_vec())
        .map_err(|_| "p256dh is not a P-256 public key".to_string())?;
    // RFC 8291 §3.4: the input key material, bound to both public keys and the auth secret.
    let mut key_info = b"WebPush: info\0".to_vec();
    key_info.extend_from_slice(&endpoint.p256dh);
    key_info.extend_from_slice(&our_public);
    let ikm = hkdf(&endpoint.auth, &shared, &key_info, 32)?;
    let mut salt = [0u8; 16];
    rng.fill(&mut salt).map_err(|_| "no randomness".to_string())?;
    let cek = hkdf(&salt, &ikm, b"Content-Encoding: aes128gcm\0", 16)?;
    let nonce = hkdf(&salt, &ikm, b"Content-Encoding: nonce\0", 12)?;
    let key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_128_GCM, &cek).map_err(|_| "bad content key".to_string())?,
    );
    let nonce = ring::aead::Nonce::try_assume_unique_for_key(&nonce).map_err(|_| "bad nonce".to_string())?;
    // The last (only) record ends with its delimiter, 2.
    let mut record = plaintext.to_vec();
    record.push(2);
    key.seal_in_place_append_tag(nonce, ring::aead::Aad::empty(), &mut record)
        .map_err(|_| "sealing failed".to_string())?;
    let mut body = salt.to_vec();
    body.extend_from_slice(&RECORD_SIZE.to_be_bytes());
    body.push(our_public.len() as u8);
    body.extend_from_slice(&our_public);
    body.extend_from_slice(&record);
    Ok(body)
}

/// The relay's VAPID identity (RFC 8292): an ES256 key and the contact it names.
#[derive(Debug)]
struct Vapid {
    key: ring::signature::EcdsaKeyPair,
    subject: String,
}

impl Vapid {
    fn load_or_create(path: &Path, subject: String) -> Result<Arc<Self>, PushOpenError> {
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
        let err = |reason: String| PushOpenError::VapidKey { path: path.display().to_string(), reason };
        let rng = SystemRandom::new();
        let pkcs8 = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let made = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                    .map_err(|_| err("could not make a key".into()))?;
                std::fs::write(path, made.as_ref()).map_err(|e| err(e.to_string()))?;
                made.as_ref().to_vec()
            }
            Err(e) => return Err(err(e.to_string())),
        };
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
            .map_err(|e| err(format!("not a P-256 PKCS#8 key: {e}")))?;
        Ok(Arc::new(Vapid { key, subject }))
    }

    /// `vapid t=<JWT>, k=<public key>` for a POST to `url`.
    fn authorization(&self, url: &str) -> Result<String, String> {
        let url = reqwest::Url::parse(url).map_err(|e| format!("push endpoint {url}: {e}"))?;
        let audience = url.origin().ascii_serialization();
        let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ES256"}"#);
        let claims = serde_json::json!({ "aud": audience, "exp": unix_now() + 12 * 3600, "sub": self.subject });
        let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signed = format!("{header}.{claims}");
        let signature =
            self.key.sign(&SystemRandom::new(), signed.as_bytes()).map_err(|_| "VAPID signing failed".to_string())?;
        let public = URL_SAFE_NO_PAD.encode(self.key.public_key().as_ref());
        Ok(format!("vapid t={signed}.{}, k={public}", URL_SAFE_NO_PAD.encode(signature.as_ref())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Decryption is checked end to end by an independent implementation (Python's http_ece) in
    // tests/tests/push.rs; ring's ephemeral keys cannot be used twice to decrypt here.
    #[test]
    fn a_wake_up_is_one_record_under_the_rfc_8188_header() {
        let rng = SystemRandom::new();
        let device = ring::agreement::EphemeralPrivateKey::generate(&ring::agreement::ECDH_P256, &rng).unwrap();
        let p256dh = device.compute_public_key().unwrap().as_ref().to_vec();
        let endpoint = PushEndpoint { url: "https://push.invalid/x".into(), p256dh, auth: vec![7; 16] };
        let body = encrypt(&endpoint, WAKE_UP_TEXT).unwrap();
        assert_eq!(u32::from_be_bytes(body[16..20].try_into().unwrap()), RECORD_SIZE);
        assert_eq!(body[20], 65);
        assert_eq!(body[21], 4, "the key id is an uncompressed point");
        // The text, its delimiter and the 16-byte tag.
        assert_eq!(body.len(), 16 + 4 + 1 + 65 + WAKE_UP_TEXT.len() + 1 + 16);
        assert!(!body.windows(WAKE_UP_TEXT.len()).any(|w| w == WAKE_UP_TEXT));
        let bad = PushEndpoint { p256dh: vec![4; 65], ..endpoint };
        assert!(encrypt(&bad, WAKE_UP_TEXT).is_err(), "a key off the curve");
    }
}
