//! Wake-ups for devices that are not connected, through the Web Push endpoint (RFC 8030) each
//! device registered here (`SetPush`).
//!
//! When envelopes land here for a device with no session on this relay, and this relay is the
//! closest live one to its mailbox (so that exactly one of the replicas sends), or a post lands
//! in a group the device reads from this relay and asked to be woken for (`PushGroups`: it reads
//! each group from one relay), [`Pusher::arrived`] hands the device to the dispatcher task and
//! returns at once: the message path never waits on a push service. The dispatcher coalesces
//! (at most one wake-up per device per [`COALESCE_FOR`], none while one is in flight) and sends
//! each on a task of its own:
//! - the body is a fixed, content-free text encrypted to the device's keys as RFC 8291 says
//!   (aes128gcm, RFC 8188), so the push service learns nothing, not even who wrote;
//! - signed with VAPID (RFC 8292) when the operator gives a subject;
//! - retried with backoff on 429, 5xx and network errors; the registration is dropped on
//!   404 or 410 (the endpoint is gone); any other answer fails it.
//!
//! Registrations are kept in `DATA/push.redb` (device → endpoint, watched groups, when renewed),
//! and in memory for the event loop's look-ups; see [`Registry`] for how they are kept small.

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
use tokio::sync::Semaphore;

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
/// POSTs to push services under way at once; the rest wait their turn.
const SENDING_AT_ONCE: usize = 64;
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

/// What a device registered here: its endpoint, the groups whose posts it wants to be woken
/// for (those it reads from this relay), and when it last said so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Registration {
    endpoint: PushEndpoint,
    groups: Vec<GroupId>,
    refreshed_at: u64,
}

/// A registration its device has not renewed for this long is dropped: a device that comes
/// online gives it again at its first greeting, so only abandoned ones go. As long as an
/// envelope waits.
pub(crate) const REGISTRATION_TTL_SECS: u64 = 30 * 24 * 3600;
/// A registration given again unchanged is rewritten (its time renewed) at most this often, so
/// that greetings cost no disk write.
const REFRESH_EVERY_SECS: u64 = 24 * 3600;
/// Registrations a relay keeps at most (a registration is a few hundred bytes; a million
/// devices is far more than one relay serves).
const MAX_REGISTRATIONS: usize = 1_000_000;
/// Gone endpoints remembered at most (each until its device registers another).
const MAX_GONE: usize = 100_000;

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
/// Changes are made one at a time (`changing`), each read, written and applied to memory before
/// the next, so that memory and disk agree; the event loop's look-ups only take `held`, which
/// is never held across a disk write.
#[derive(Debug, Clone)]
pub(crate) struct Registry {
    db: Arc<Database>,
    held: Arc<Mutex<Held>>,
    changing: Arc<Mutex<()>>,
    /// `push_registrations`, kept in step with `held`.
    count: prometheus_client::metrics::gauge::Gauge,
}

/// Why a registration was not kept.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SetError {
    #[error("the push service said this endpoint is gone (404/410); register a new subscription")]
    Gone,
    #[error("this relay keeps as many push registrations as it may; try another relay")]
    Full,
    #[error("the push endpoint could not be kept: {0}")]
    Store(String),
}

/// What a change does to a device's registration.
enum Change {
    /// The endpoint (the groups as they were).
    Endpoint(Option<PushEndpoint>),
    /// The endpoint and the groups.
    Groups(PushEndpoint, Vec<GroupId>),
}

impl Registry {
    fn open(path: &Path, count: prometheus_client::metrics::gauge::Gauge) -> Result<Self, PushOpenError> {
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
        count.set(crate::metrics::gauge_value(held.registrations.len()));
        Ok(Registry { db: Arc::new(db), held: Arc::new(Mutex::new(held)), changing: Arc::default(), count })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn get(&self, device: &PeerId) -> Option<PushEndpoint> {
        self.lock().registrations.get(device).map(|r| r.endpoint.clone())
    }

    pub(crate) fn has(&self, device: &PeerId) -> bool {
        self.lock().registrations.contains_key(device)
    }

    /// The devices to wake for a post in the group whose mailbox this is.
    pub(crate) fn watchers(&self, group_mailbox: &PeerId) -> Vec<PeerId> {
        self.lock().watchers.get(group_mailbox).map(|w| w.iter().copied().collect()).unwrap_or_default()
    }

    pub(crate) fn has_watchers(&self, group_mailbox: &PeerId) -> bool {
        self.lock().watchers.contains_key(group_mailbox)
    }

    /// Keeps (`Some`, with the groups it watched) or drops `device`'s endpoint; refuses one its
    /// push service said is gone. Blocking.
    pub(crate) fn set(&self, device: PeerId, endpoint: Option<PushEndpoint>, now: u64) -> Result<(), SetError> {
        self.change(device, Change::Endpoint(endpoint), now)
    }

    /// Keeps `device`'s endpoint and the groups it reads here. Blocking.
    pub(crate) fn set_groups(
        &self,
        device: PeerId,
        endpoint: PushEndpoint,
        groups: Vec<GroupId>,
        now: u64,
    ) -> Result<(), SetError> {
        self.change(device, Change::Groups(endpoint, groups), now)
    }

    fn change(&self, device: PeerId, change: Change, now: u64) -> Result<(), SetError> {
        let _one_at_a_time = self.changing.lock().unwrap_or_else(PoisonError::into_inner);
        let (old, registration) = {
            let mut held = self.lock();
            let old = held.registrations.get(&device).cloned();
            let registration = match change {
                Change::Endpoint(None) => None,
                Change::Endpoint(Some(endpoint)) => {
                    let groups = old.as_ref().map(|r| r.groups.clone()).unwrap_or_default();
                    Some(Registration { endpoint, groups, refreshed_at: now })
                }
                Change::Groups(endpoint, mut groups) => {
                    groups.sort_unstable();
                    groups.dedup();
                    Some(Registration { endpoint, groups, refreshed_at: now })
                }
            };
            match &registration {
                Some(r) if held.gone.get(&device) == Some(&r.endpoint.url) => return Err(SetError::Gone),
                Some(_) if old.is_none() && held.registrations.len() >= MAX_REGISTRATIONS => {
                    return Err(SetError::Full);
                }
                _ => held.gone.remove(&device),
            };
            (old, registration)
        };
        // The same again, lately written: nothing to write (a greeting costs no disk write).
        let unchanged = match (&old, &registration) {
            (Some(old), Some(new)) => {
                old.endpoint == new.endpoint
                    && old.groups == new.groups
                    && now.saturating_sub(old.refreshed_at) < REFRESH_EVERY_SECS
            }
            (None, None) => true,
            _ => false,
        };
        if unchanged {
            return Ok(());
        }
        self.write(device, registration).map_err(SetError::Store)
    }

    /// Writes `device`'s registration (or its removal), then applies it in memory. Callers hold
    /// `changing`.
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
        let mut held = self.lock();
        held.put(device, registration);
        self.count.set(crate::metrics::gauge_value(held.registrations.len()));
        Ok(())
    }

    /// Drops `device`'s registration if its endpoint is still `url` (the device may have
    /// registered a new one meanwhile), and remembers that `url` is gone. Blocking.
    fn drop_gone(&self, device: PeerId, url: &str) {
        let _one_at_a_time = self.changing.lock().unwrap_or_else(PoisonError::into_inner);
        if self.get(&device).is_none_or(|e| e.url != url) {
            return;
        }
        {
            let mut held = self.lock();
            if held.gone.len() >= MAX_GONE {
                held.gone.clear();
            }
            held.gone.insert(device, url.to_string());
        }
        if let Err(e) = self.write(device, None) {
            tracing::warn!(%device, error = %e, "could not drop a gone push endpoint");
        }
    }

    /// Drops `device`'s registration: its session was revoked. Blocking.
    pub(crate) fn forget(&self, device: PeerId) {
        let _one_at_a_time = self.changing.lock().unwrap_or_else(PoisonError::into_inner);
        if self.has(&device)
            && let Err(e) = self.write(device, None)
        {
            tracing::warn!(%device, error = %e, "could not drop a revoked device's push endpoint");
        }
    }

    /// Drops the registrations not renewed within [`REGISTRATION_TTL_SECS`]; how many. Blocking.
    pub(crate) fn expire(&self, now: u64) -> usize {
        let stale: Vec<PeerId> = self
            .lock()
            .registrations
            .iter()
            .filter(|(_, r)| now.saturating_sub(r.refreshed_at) > REGISTRATION_TTL_SECS)
            .map(|(device, _)| *device)
            .collect();
        let _one_at_a_time = self.changing.lock().unwrap_or_else(PoisonError::into_inner);
        let mut dropped = 0;
        for device in stale {
            // Renewed since the scan: kept.
            let still_stale = self
                .lock()
                .registrations
                .get(&device)
                .is_some_and(|r| now.saturating_sub(r.refreshed_at) > REGISTRATION_TTL_SECS);
            if still_stale && self.write(device, None).is_ok() {
                dropped += 1;
            }
        }
        dropped
    }
}

/// The event loop's side: registrations, and the devices waiting for a wake-up.
#[derive(Debug)]
pub(crate) struct Pusher {
    pub(crate) registry: Registry,
    /// `None` when push is off.
    pending: Option<Arc<Pending>>,
    private_endpoints: bool,
}

/// Devices to wake, as a set: an arrival for a device already waiting costs nothing and is
/// never lost, however many arrive (a post in a channel with many watchers, say).
#[derive(Debug, Default)]
struct Pending {
    devices: Mutex<HashSet<PeerId>>,
    ready: tokio::sync::Notify,
}

impl Pusher {
    /// Opens the registrations in `data_dir` and, if push is on, starts the dispatcher.
    pub(crate) fn start(
        data_dir: &Path,
        settings: &PushSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, PushOpenError> {
        let registry = Registry::open(&data_dir.join(PUSH_DATABASE_FILE), metrics.push_registrations.clone())?;
        let pending = if settings.enabled {
            let vapid = match &settings.vapid_subject {
                Some(subject) => Some(Vapid::load_or_create(&data_dir.join(VAPID_KEY_FILE), subject.clone())?),
                None => None,
            };
            let client = reqwest::Client::builder().timeout(POST_TIMEOUT);
            let client = match settings.private_endpoints {
                true => client.redirect(reqwest::redirect::Policy::none()),
                // Push services answer; they do not redirect.
                false => public_http::public_only(client, 0),
            };
            let client = client.build().map_err(|e| PushOpenError::HttpClient(e.to_string()))?;
            let pending = Arc::new(Pending::default());
            let dispatcher = Dispatcher {
                registry: registry.clone(),
                metrics,
                client,
                vapid,
                private_endpoints: settings.private_endpoints,
                in_flight: Arc::default(),
            };
            tokio::spawn(dispatcher.run(Arc::clone(&pending)));
            Some(pending)
        } else {
            None
        };
        Ok(Pusher { registry, pending, private_endpoints: settings.private_endpoints })
    }

    /// Refuses an endpoint this relay would not send to: one on a non-public address, unless
    /// the operator allowed those (names are checked again when they resolve, at each send).
    pub(crate) fn check(&self, endpoint: &PushEndpoint) -> Result<(), String> {
        endpoint.validate()?;
        sendable(&endpoint.url, self.private_endpoints)
    }

    /// Something arrived here for `devices`, which have no session here (and for which this
    /// relay is the one to wake them): wake those that registered. Never waits.
    pub(crate) fn arrived(&self, devices: impl IntoIterator<Item = PeerId>) {
        let Some(pending) = &self.pending else { return };
        let registered: Vec<PeerId> = devices.into_iter().filter(|d| self.registry.has(d)).collect();
        if registered.is_empty() {
            return;
        }
        pending.devices.lock().unwrap_or_else(PoisonError::into_inner).extend(registered);
        pending.ready.notify_one();
    }
}

/// Whether this relay sends to `url`: a URL, on a public address unless `private_ok`.
fn sendable(url: &str, private_ok: bool) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("the push endpoint is not a URL: {e}"))?;
    if !private_ok && !public_http::host_may_be_public(&parsed) {
        return Err(
            "the push endpoint must be on a public address; this relay does not send into its own network".into()
        );
    }
    Ok(())
}

/// Sends wake-ups, coalesced, each on its own task.
struct Dispatcher {
    registry: Registry,
    metrics: Arc<Metrics>,
    client: reqwest::Client,
    vapid: Option<Arc<Vapid>>,
    private_endpoints: bool,
    /// Devices whose wake-up is being sent or retried: an arrival meanwhile is folded into it.
    in_flight: Arc<Mutex<HashSet<PeerId>>>,
}

impl Dispatcher {
    async fn run(self, pending: Arc<Pending>) {
        // Each POST holds a slot, not a wake-up's whole life: a push service that stalls or
        // asks to retry later costs only its own wake-ups their time.
        let sending = Arc::new(Semaphore::new(SENDING_AT_ONCE));
        let mut last: HashMap<PeerId, Instant> = HashMap::new();
        loop {
            pending.ready.notified().await;
            let devices: Vec<PeerId> = pending.devices.lock().unwrap_or_else(PoisonError::into_inner).drain().collect();
            let now = Instant::now();
            last.retain(|_, at| now.duration_since(*at) < COALESCE_FOR);
            for device in devices {
                let busy = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner).contains(&device);
                if busy || last.contains_key(&device) {
                    self.metrics.push_wakeups_coalesced.inc();
                    continue;
                }
                let Some(endpoint) = self.registry.get(&device) else { continue };
                last.insert(device, now);
                self.in_flight.lock().unwrap_or_else(PoisonError::into_inner).insert(device);
                tokio::spawn(self.wake(device, endpoint, Arc::clone(&sending)));
            }
        }
    }

    /// One wake-up, to its end.
    fn wake(
        &self,
        device: PeerId,
        endpoint: PushEndpoint,
        sending: Arc<Semaphore>,
    ) -> impl Future<Output = ()> + use<> {
        let (registry, metrics, client, vapid) =
            (self.registry.clone(), Arc::clone(&self.metrics), self.client.clone(), self.vapid.clone());
        let (private_ok, in_flight) = (self.private_endpoints, Arc::clone(&self.in_flight));
        async move {
            // Checked at each send too: registrations kept from before the operator changed
            // their mind, and address literals, which no resolver sees.
            let outcome = match sendable(&endpoint.url, private_ok) {
                Ok(()) => send_with_retries(&client, vapid.as_deref(), &endpoint, &sending).await,
                Err(why) => Outcome::Failed(why),
            };
            match outcome {
                Outcome::Sent => {
                    metrics.push_wakeups_sent.inc();
                }
                Outcome::Gone => {
                    tracing::info!(%device, "the push endpoint is gone; dropping it");
                    metrics.push_endpoints_dropped.inc();
                    let (url, held) = (endpoint.url.clone(), registry.clone());
                    if let Err(e) = tokio::task::spawn_blocking(move || held.drop_gone(device, &url)).await {
                        tracing::warn!(error = %e, "dropping a gone push endpoint did not finish");
                    }
                }
                Outcome::Failed(why) => {
                    tracing::warn!(%device, %why, "a wake-up could not be delivered");
                    metrics.push_wakeups_failed.inc();
                }
            }
            in_flight.lock().unwrap_or_else(PoisonError::into_inner).remove(&device);
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

async fn send_with_retries(
    client: &reqwest::Client,
    vapid: Option<&Vapid>,
    endpoint: &PushEndpoint,
    sending: &Semaphore,
) -> Outcome {
    let mut pause = FIRST_PAUSE;
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        let Ok(slot) = sending.acquire().await else { return Outcome::Failed("shutting down".into()) };
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
        drop(slot);
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
                // Whole or not at all (the servers' umask makes it 0600): a key cut short by a
                // crash would keep the relay from starting.
                let tmp = path.with_extension("key.tmp");
                std::fs::write(&tmp, made.as_ref())
                    .and_then(|()| std::fs::rename(&tmp, path))
                    .map_err(|e| err(e.to_string()))?;
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

    fn endpoint(url: &str) -> PushEndpoint {
        PushEndpoint { url: url.into(), p256dh: vec![4; 65], auth: vec![1; 16] }
    }

    #[test]
    fn registrations_keep_their_groups_refuse_gone_endpoints_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PUSH_DATABASE_FILE);
        let registry = Registry::open(&path, Default::default()).unwrap();
        let (device, group) = (PeerId::random(), GroupId([7; 16]));
        registry.set_groups(device, endpoint("https://a.example/1"), vec![group, group], 100).unwrap();
        assert_eq!(registry.watchers(&group.mailbox()), [device]);
        // A new endpoint keeps the groups; the same again writes nothing (and renews nothing).
        registry.set(device, Some(endpoint("https://a.example/2")), 200).unwrap();
        assert!(registry.has_watchers(&group.mailbox()));
        registry.set(device, Some(endpoint("https://a.example/2")), 300).unwrap();
        assert_eq!(registry.lock().registrations[&device].refreshed_at, 200);
        // What is on disk is what is in memory.
        drop(registry);
        let registry = Registry::open(&path, Default::default()).unwrap();
        assert_eq!(registry.get(&device).unwrap().url, "https://a.example/2");
        assert_eq!(registry.watchers(&group.mailbox()), [device]);
        // Gone: dropped, and refused when offered again; another endpoint is taken.
        registry.drop_gone(device, "https://a.example/2");
        assert!(!registry.has(&device) && !registry.has_watchers(&group.mailbox()));
        assert!(matches!(registry.set(device, Some(endpoint("https://a.example/2")), 400), Err(SetError::Gone)));
        registry.set(device, Some(endpoint("https://a.example/3")), 400).unwrap();
        // Not renewed for the TTL: expired; revoked: forgotten.
        let other = PeerId::random();
        registry.set(other, Some(endpoint("https://a.example/4")), 400 + REGISTRATION_TTL_SECS).unwrap();
        assert_eq!(registry.expire(401 + REGISTRATION_TTL_SECS), 1);
        assert!(!registry.has(&device) && registry.has(&other));
        registry.forget(other);
        assert_eq!(registry.count.get(), 0, "the gauge follows");
    }

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
