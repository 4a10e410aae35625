//! The mesh side: three real relays (replication 2), one sender and one recipient speaking
//! `/meshgram/mailbox/1` through `ClientNet`, and a swarm of idle clients for the memory figure.
//!
//! The benchmark holds the gateway key, so it signs session certificates itself; no gateway runs.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use libp2p::PeerId;
use libp2p::identity::ed25519;
use meshgram_node::client::net::ClientNet;
use meshgram_node::crypto::cert::{AccountKind, CertBody, SessionCert, unix_now};
use meshgram_node::crypto::identity::DeviceIdentity;
use meshgram_node::crypto::seal;
use meshgram_node::ids::{SessionId, UserId};
use meshgram_node::proto::envelope::{Envelope, EnvelopeId};
use meshgram_node::proto::{MailboxRequest, MailboxResponse, RelayInfo, SignedAck};
use meshgram_relay::store::{Quota, StoreHandle, StoreLimits};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::servers::{RelayOptions, RelayProcess};
use crate::stats::{Pacer, Percentiles, Tracker, now_ns};

/// Sealed size of every envelope's content, like the 256-byte MQTT payloads.
pub(crate) const SEALED_LEN: usize = 256;
/// Plaintext that seals to [`SEALED_LEN`]: the message number, then padding.
const PLAINTEXT_LEN: usize = SEALED_LEN - seal::SEAL_OVERHEAD;
/// How long the recipient's long-poll waits before asking again; short, so that it notices the
/// end of the run quickly (an answer comes at once whenever something arrives).
const FETCH_WAIT_MS: u32 = 500;
/// Largest `Fetch` the protocol allows (`MAX_ENVELOPES_PER_BATCH`).
const FETCH_MAX: u32 = 256;
/// How long the relays may take to find each other through Kademlia and identify.
const MESH_FORM_TIMEOUT: Duration = Duration::from_secs(20);
/// Received envelopes kept to open after the run (proves they are the sender's, intact).
const SAMPLE_EVERY: usize = 997;
/// Requests one client connection may have unanswered: libp2p request-response allows 100
/// streams per connection (`max_concurrent_streams`) and fails the 101st at once ("max
/// sub-streams reached") rather than queueing it; a few are left for other requests.
pub(crate) const MAX_INFLIGHT: usize = 96;

/// A device the benchmark drives: keys, network task, certificate.
#[derive(Debug)]
pub(crate) struct Device {
    pub(crate) identity: DeviceIdentity,
    pub(crate) net: Arc<ClientNet>,
    pub(crate) user: UserId,
    cert: SessionCert,
}

impl Device {
    pub(crate) fn create(dir: &Path, user: u64, gateway: &ed25519::Keypair) -> anyhow::Result<Self> {
        let identity = DeviceIdentity::load_or_create(dir).with_context(|| format!("identity in {}", dir.display()))?;
        Self::of(identity, user, gateway)
    }

    /// A device with its network task for keys made already.
    pub(crate) fn of(identity: DeviceIdentity, user: u64, gateway: &ed25519::Keypair) -> anyhow::Result<Self> {
        let net = Arc::new(ClientNet::spawn(&identity)?);
        let cert = certify(&identity, user, gateway);
        Ok(Device { identity, net, user: UserId(user), cert })
    }

    pub(crate) async fn call(&self, relay: &RelayInfo, request: MailboxRequest) -> anyhow::Result<MailboxResponse> {
        Ok(self.net.mailbox_request(relay.peer_id, relay.addrs.clone(), request).await?)
    }

    /// Presents the certificate; returns `(mailbox_relays, relays)` from the Welcome.
    pub(crate) async fn hello(&self, relay: &RelayInfo) -> anyhow::Result<(Vec<RelayInfo>, Vec<RelayInfo>)> {
        match self.call(relay, MailboxRequest::Hello { cert: self.cert.clone() }).await? {
            MailboxResponse::Welcome { mailbox_relays, relays, .. } => Ok((mailbox_relays, relays)),
            other => bail!("Hello to {} answered {other:?}", relay.peer_id),
        }
    }
}

/// Starts relay 1, then relays 2 and 3 bootstrapping through it (replication 2), and waits
/// until `device` hears from each that it knows all three (placement is stable then).
pub(crate) async fn start_three_relays(
    options: &MeshOptions,
    gateway: &ed25519::Keypair,
    device: &Device,
) -> anyhow::Result<Vec<RelayProcess>> {
    let mut relays: Vec<RelayProcess> = Vec::new();
    for i in 1..=3 {
        let relay = RelayProcess::start(
            &format!("relay-{i}"),
            RelayOptions {
                bin: &options.relay_bin,
                dir: options.dir.join(format!("relay-{i}")),
                gateway,
                replication: 2,
                bootstrap: relays.first().map(|r| r.bootstrap_addr.clone()).into_iter().collect(),
                limit: options.server_limit,
            },
        )?;
        relays.push(relay);
    }
    let deadline = Instant::now() + MESH_FORM_TIMEOUT;
    for relay in &relays {
        loop {
            let (_, known) = device.hello(&relay.info).await?;
            if known.len() == relays.len() {
                break;
            }
            if Instant::now() > deadline {
                bail!("relay {} knows {} of 3 relays after {MESH_FORM_TIMEOUT:?}", relay.peer_id(), known.len());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(relays)
}

/// A one-hour certificate for `identity`, signed with the benchmark's gateway key.
pub(crate) fn certify(identity: &DeviceIdentity, user: u64, gateway: &ed25519::Keypair) -> SessionCert {
    let now = unix_now();
    let body = CertBody {
        user_id: UserId(user),
        device: identity.peer_id(),
        noise_key: identity.noise_public,
        session_id: SessionId(user),
        kind: AccountKind::User,
        not_before: now.saturating_sub(60),
        not_after: now + 3600,
    };
    SessionCert::sign(body, gateway)
}

/// How the mesh is started.
#[derive(Debug, Clone)]
pub(crate) struct MeshOptions {
    pub(crate) relay_bin: PathBuf,
    pub(crate) dir: PathBuf,
    /// Every server is killed by `timeout` after this long, whatever happens.
    pub(crate) server_limit: Duration,
    /// Send through a relay holding no copy rather than the recipient's first mailbox relay.
    pub(crate) entry_holds_no_copy: bool,
}

/// Three relays, a sender, a recipient, and the pre-sealed envelopes (message `i` has `seq = i`).
#[derive(Debug)]
pub(crate) struct MeshRig {
    relays: Vec<RelayProcess>,
    sender: Device,
    recipient: Device,
    /// Where the sender sends: the recipient's first mailbox relay, as `Messenger` does (one
    /// copy local, one remote), or with `entry_holds_no_copy` a relay with neither copy.
    pub(crate) entry: RelayInfo,
    /// Where the recipient fetches: the first of its mailbox relays.
    pub(crate) fetch_from: RelayInfo,
    envelopes: Vec<Envelope>,
    receiver: Option<tokio::task::JoinHandle<anyhow::Result<Received>>>,
    stop_receiving: Arc<AtomicBool>,
}

impl MeshRig {
    /// Starts relay 1, then relays 2 and 3 bootstrapping through it; greets them; pre-seals
    /// `messages` envelopes (on every core, before anything is timed).
    pub(crate) async fn start(options: &MeshOptions, messages: usize) -> anyhow::Result<Self> {
        let gateway = ed25519::Keypair::generate();
        let sender = Device::create(&options.dir.join("sender"), 1, &gateway)?;
        let relays = start_three_relays(options, &gateway, &sender).await?;
        let recipient = Device::create(&options.dir.join("recipient"), 2, &gateway)?;
        let (mailbox_relays, _) = recipient.hello(&relays[0].info).await?;
        let fetch_from = mailbox_relays.first().context("the recipient has no mailbox relays")?.clone();
        recipient.hello(&fetch_from).await?;
        let entry = if options.entry_holds_no_copy {
            relays
                .iter()
                .map(|r| r.info.clone())
                .find(|r| mailbox_relays.iter().all(|m| m.peer_id != r.peer_id))
                .context("every relay holds the recipient's mailbox; expected R=2 of 3")?
        } else {
            fetch_from.clone()
        };

        let envelopes = tokio::task::block_in_place(|| preseal(&sender, &recipient, messages))?;
        Ok(MeshRig {
            relays,
            sender,
            recipient,
            entry,
            fetch_from,
            envelopes,
            receiver: None,
            stop_receiving: Arc::new(AtomicBool::new(false)),
        })
    }

    pub(crate) fn relay_pids(&self) -> Vec<u32> {
        self.relays.iter().map(|r| r.process.pid()).collect()
    }

    /// Starts the recipient's fetch → ack loop; it runs until [`MeshRig::finish`].
    pub(crate) fn start_receiving(&mut self, tracker: Arc<Tracker>) {
        let net = Arc::clone(&self.recipient.net);
        let keys = self.recipient.identity.keypair.clone();
        let relay = self.fetch_from.clone();
        let stop = Arc::clone(&self.stop_receiving);
        self.receiver = Some(tokio::spawn(receive_loop(net, keys, relay, tracker, stop)));
    }

    /// Sends `range` as fast as the window allows: `batch` envelopes per `Send`, at most
    /// `inflight` `Send`s unanswered. Stops issuing new ones at `deadline`.
    pub(crate) async fn send_saturated(
        &self,
        range: Range<usize>,
        batch: usize,
        inflight: usize,
        tracker: &Arc<Tracker>,
        deadline: Instant,
    ) -> anyhow::Result<()> {
        let window = Arc::new(Semaphore::new(inflight));
        let mut tasks = JoinSet::new();
        let mut next = range.start;
        while next < range.end && Instant::now() < deadline {
            let permit = Arc::clone(&window).acquire_owned().await?;
            let ids = next..(next + batch).min(range.end);
            next = ids.end;
            tasks.spawn(self.send(ids, tracker, permit, None));
            while let Some(done) = tasks.try_join_next() {
                done??;
            }
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        Ok(())
    }

    /// Sends `range` one envelope per `Send` at `per_second`, as an app sends messages as they
    /// are written. Returns how late the pacer ran.
    pub(crate) async fn send_paced(
        &self,
        range: Range<usize>,
        per_second: f64,
        tracker: &Arc<Tracker>,
        deadline: Instant,
    ) -> anyhow::Result<Option<Percentiles>> {
        let window = Arc::new(Semaphore::new(MAX_INFLIGHT));
        let mut tasks = JoinSet::new();
        let mut pacer = Pacer::new(per_second);
        for i in range {
            let due = pacer.tick().await;
            if Instant::now() >= deadline {
                break;
            }
            let permit = Arc::clone(&window).acquire_owned().await?;
            tasks.spawn(self.send(i..i + 1, tracker, permit, Some(due)));
            while let Some(done) = tasks.try_join_next() {
                done??;
            }
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        Ok(pacer.lag())
    }

    /// One `Send` of `ids`, stamped `sent_at` (default: now); marks them acknowledged when
    /// `Stored` comes back.
    pub(crate) fn send<P: Send + 'static>(
        &self,
        ids: Range<usize>,
        tracker: &Arc<Tracker>,
        permit: P,
        sent_at: Option<u64>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send + 'static {
        let sent_at_ms = unix_ms();
        let envelopes: Vec<Envelope> =
            self.envelopes[ids.clone()].iter().cloned().map(|e| Envelope { sent_at_ms, ..e }).collect();
        let at = sent_at.unwrap_or_else(now_ns);
        for i in ids.clone() {
            tracker.sent(i, at);
        }
        let (net, entry, tracker) = (Arc::clone(&self.sender.net), self.entry.clone(), Arc::clone(tracker));
        async move {
            let response = net.mailbox_request(entry.peer_id, entry.addrs, MailboxRequest::Send { envelopes }).await;
            let at = now_ns();
            drop(permit);
            match response? {
                MailboxResponse::Stored { stored, duplicates } if stored.len() + duplicates.len() == ids.len() => {
                    for i in ids {
                        tracker.acked(i, at);
                    }
                    Ok(())
                }
                other => bail!("Send of {} envelopes answered {other:?}", ids.len()),
            }
        }
    }

    /// Round trips one at a time, nothing else in flight: `Send`s of one envelope from `range`
    /// (two remote commits each), and `Fetch`es of the sender's own empty mailbox (no commit).
    pub(crate) async fn round_trips(
        &self,
        range: Range<usize>,
        tracker: &Arc<Tracker>,
    ) -> anyhow::Result<(Option<Percentiles>, Option<Percentiles>)> {
        let mut sends = Vec::with_capacity(range.len());
        let mut fetches = Vec::with_capacity(range.len());
        for i in range {
            let start = now_ns();
            self.send(i..i + 1, tracker, (), None).await?;
            sends.push(now_ns() - start);
            let start = now_ns();
            match self.sender.call(&self.entry, MailboxRequest::Fetch { max: 1, wait_ms: 0, ack: vec![] }).await? {
                MailboxResponse::Envelopes { .. } => fetches.push(now_ns() - start),
                other => bail!("Fetch answered {other:?}"),
            }
        }
        Ok((Percentiles::of(sends), Percentiles::of(fetches)))
    }

    /// Stops the recipient, opens the envelopes it kept, and stops the relays. Returns how many
    /// were opened and the recipient's fetch → ack cycles.
    pub(crate) async fn finish(mut self) -> anyhow::Result<(usize, Vec<Cycle>)> {
        self.stop_receiving.store(true, Ordering::Relaxed);
        let Received { samples, cycles } = match self.receiver.take() {
            Some(task) => {
                tokio::time::timeout(Duration::from_secs(10), task).await.context("the recipient did not stop")???
            }
            None => Received::default(),
        };
        for envelope in &samples {
            let opened = seal::open(&self.recipient.identity, &envelope.id, &envelope.sealed)
                .with_context(|| format!("envelope {} does not open", envelope.seq))?;
            let number = opened.payload.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_le_bytes);
            if opened.sender_key != self.sender.identity.noise_public || number != Some(envelope.seq) {
                bail!("envelope {} opened to the wrong sender or content", envelope.seq);
            }
        }
        for relay in &mut self.relays {
            relay.process.stop();
        }
        Ok((samples.len(), cycles))
    }
}

/// Seals message `i` (its number in the first 8 bytes) to the recipient, on every core.
fn preseal(sender: &Device, recipient: &Device, messages: usize) -> anyhow::Result<Vec<Envelope>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = messages.div_ceil(threads).max(1);
    let chunks: Vec<Range<usize>> =
        (0..messages).step_by(per_thread).map(|start| start..(start + per_thread).min(messages)).collect();
    let sealed: Vec<anyhow::Result<Vec<Envelope>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|range| scope.spawn(move || range.map(|i| seal_one(sender, recipient, i)).collect()))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("sealing thread panicked"))))
            .collect()
    });
    let mut out = Vec::with_capacity(messages);
    for part in sealed {
        out.extend(part?);
    }
    Ok(out)
}

fn seal_one(sender: &Device, recipient: &Device, i: usize) -> anyhow::Result<Envelope> {
    let id = EnvelopeId::random();
    let sealed = seal::seal(&sender.identity, &recipient.identity.noise_public, &id, &plaintext(i as u64))?;
    Ok(Envelope {
        id,
        from_user: sender.user,
        from_device: sender.identity.peer_id(),
        to_user: recipient.user,
        to_device: recipient.identity.peer_id(),
        sent_at_ms: 0,
        seq: i as u64,
        sealed,
    })
}

fn plaintext(number: u64) -> Vec<u8> {
    let mut text = vec![0x5a; PLAINTEXT_LEN];
    text[..8].copy_from_slice(&number.to_le_bytes());
    text
}

pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// One turn of the recipient's loop that got envelopes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cycle {
    /// When the `Fetch` was sent ([`now_ns`] clock).
    pub(crate) start: u64,
    /// `Fetch` round trip, including any time parked waiting for envelopes.
    pub(crate) fetch: u64,
    pub(crate) envelopes: usize,
}

/// What the recipient kept.
#[derive(Debug, Default)]
struct Received {
    /// Envelopes to open after the run.
    samples: Vec<Envelope>,
    cycles: Vec<Cycle>,
}

/// The recipient: long-poll `Fetch`, note each arrival; the next `Fetch` acknowledges the batch
/// (as `Messenger` does, signed, so that the other replicas delete their copies), and a last
/// `Ack` the final one.
async fn receive_loop(
    net: Arc<ClientNet>,
    keys: libp2p::identity::Keypair,
    relay: RelayInfo,
    tracker: Arc<Tracker>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Received> {
    let mut received = Received::default();
    let mut ack = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let start = now_ns();
        let fetch = match std::mem::take(&mut ack) {
            ack if ack.is_empty() => MailboxRequest::Fetch { max: FETCH_MAX, wait_ms: FETCH_WAIT_MS, ack },
            ack => {
                MailboxRequest::FetchAcked { max: FETCH_MAX, wait_ms: FETCH_WAIT_MS, ack: SignedAck::sign(&keys, ack) }
            }
        };
        let envelopes = match net.mailbox_request(relay.peer_id, relay.addrs.clone(), fetch).await? {
            MailboxResponse::Envelopes { envelopes, .. } => envelopes,
            other => bail!("Fetch answered {other:?}"),
        };
        if envelopes.is_empty() {
            continue;
        }
        let at = now_ns();
        for envelope in &envelopes {
            let number = envelope.seq as usize;
            if tracker.received(number, at) && number.is_multiple_of(SAMPLE_EVERY) {
                received.samples.push(envelope.clone());
            }
        }
        ack = envelopes.iter().map(|e| e.id).collect();
        received.cycles.push(Cycle { start, fetch: at - start, envelopes: envelopes.len() });
    }
    if !ack.is_empty() {
        let ack = MailboxRequest::AckSigned { ack: SignedAck::sign(&keys, ack) };
        match net.mailbox_request(relay.peer_id, relay.addrs.clone(), ack).await? {
            MailboxResponse::Acked { .. } => {}
            other => bail!("Ack answered {other:?}"),
        }
    }
    Ok(received)
}

// ---------------------------------------------------------------------------------------------
// Idle clients

/// Relay memory with many idle clients connected.
#[derive(Debug, Clone)]
pub(crate) struct MemoryFigures {
    pub(crate) clients: usize,
    /// Connected sockets the server holds at the end (open fds after − before).
    pub(crate) connections: usize,
    pub(crate) rss_before_kib: u64,
    pub(crate) rss_after_kib: u64,
    pub(crate) connect_time: Duration,
}

impl MemoryFigures {
    /// KiB per connected client.
    pub(crate) fn per_client_kib(&self) -> f64 {
        self.rss_after_kib.saturating_sub(self.rss_before_kib) as f64 / self.connections.max(1) as f64
    }
}

/// One relay, `clients` devices each with its own key and certificate that connect, say Hello
/// and idle; the relay's `VmRSS` before and after.
pub(crate) async fn idle_clients(
    options: &MeshOptions,
    clients: usize,
    concurrency: usize,
    idle: Duration,
) -> anyhow::Result<MemoryFigures> {
    let gateway = ed25519::Keypair::generate();
    let relay = RelayProcess::start(
        "relay-idle",
        RelayOptions {
            bin: &options.relay_bin,
            dir: options.dir.join("relay-idle"),
            gateway: &gateway,
            replication: 1,
            bootstrap: Vec::new(),
            limit: options.server_limit,
        },
    )?;
    let identities = tokio::task::block_in_place(|| make_identities(&options.dir.join("idle-clients"), clients))?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss_before_kib, fds_before) = (relay.process.rss_kib()?, relay.process.open_fds()?);

    let started = Instant::now();
    let info = relay.info.clone();
    let gateway = &gateway;
    let connected: Vec<anyhow::Result<ClientNet>> = futures::stream::iter(identities.into_iter().enumerate())
        .map(|(i, identity)| {
            let info = info.clone();
            async move {
                let net = ClientNet::spawn(&identity)?;
                let cert = certify(&identity, 10_000 + i as u64, gateway);
                match net.mailbox_request(info.peer_id, info.addrs.clone(), MailboxRequest::Hello { cert }).await? {
                    MailboxResponse::Welcome { .. } => Ok(net),
                    other => bail!("Hello answered {other:?}"),
                }
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let connect_time = started.elapsed();
    let mut nets = Vec::with_capacity(clients);
    let mut first_error = None;
    for result in connected {
        match result {
            Ok(net) => nets.push(net),
            Err(e) => first_error = first_error.or(Some(e)),
        }
    }
    if let Some(e) = first_error {
        eprintln!("  {} of {clients} idle clients failed to connect; first error: {e:#}", clients - nets.len());
    }
    tokio::time::sleep(idle).await;
    let (rss_after_kib, fds_after) = (relay.process.rss_kib()?, relay.process.open_fds()?);
    let figures = MemoryFigures {
        clients: nets.len(),
        connections: fds_after.saturating_sub(fds_before),
        rss_before_kib,
        rss_after_kib,
        connect_time,
    };
    drop(nets);
    drop(relay);
    Ok(figures)
}

/// `n` device identities in `dir/<i>`, written by every core (each key file is fsynced).
pub(crate) fn make_identities(dir: &Path, n: usize) -> anyhow::Result<Vec<DeviceIdentity>> {
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()) * 2;
    let per_thread = n.div_ceil(threads).max(1);
    let parts: Vec<anyhow::Result<Vec<DeviceIdentity>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .step_by(per_thread)
            .map(|start| {
                scope.spawn(move || {
                    (start..(start + per_thread).min(n))
                        .map(|i| Ok(DeviceIdentity::load_or_create(&dir.join(i.to_string()))?))
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("identity thread panicked"))))
            .collect()
    });
    let mut out = Vec::with_capacity(n);
    for part in parts {
        out.extend(part?);
    }
    Ok(out)
}

/// The relay's store on its own, in this process, one request at a time.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StoreFigures {
    /// `put` of one envelope: a synced log append and an unsynced redb commit, the floor under
    /// every durable ack.
    pub(crate) put_one: Option<Percentiles>,
    /// `put` of a full batch of [`STORE_BATCH`] envelopes.
    pub(crate) put_batch: Option<Percentiles>,
    /// `delete` of a full batch (what an `Ack` of a full `Fetch` costs the mailbox relay).
    pub(crate) delete_batch: Option<Percentiles>,
}

/// A full `Fetch`/`Ack` batch.
pub(crate) const STORE_BATCH: usize = 256;
/// Full batches put, then deleted, for the batch figures.
const STORE_BATCHES: usize = 40;

pub(crate) async fn store_latency(dir: &Path, singles: usize) -> anyhow::Result<StoreFigures> {
    let limits = StoreLimits { ttl: Duration::from_secs(3600), quota: Quota::UNLIMITED };
    let store = StoreHandle::open(&dir.join("store-probe.redb"), limits)?;
    let (alice, bob) = (DeviceIdentity::load_or_create(&dir.join("seal-alice"))?, PeerId::random());
    let envelope = |i: usize| Envelope {
        id: EnvelopeId::random(),
        from_user: UserId(1),
        from_device: alice.peer_id(),
        to_user: UserId(2),
        to_device: bob,
        sent_at_ms: 0,
        seq: i as u64,
        sealed: vec![0x5a; SEALED_LEN],
    };
    let mut put_one = Vec::with_capacity(singles);
    for i in 0..singles {
        let start = now_ns();
        store.put(vec![envelope(i)], unix_now(), None).await?;
        put_one.push(now_ns() - start);
    }
    let (mut put_batch, mut delete_batch, mut batches) = (Vec::new(), Vec::new(), Vec::new());
    for b in 0..STORE_BATCHES {
        let batch: Vec<Envelope> = (0..STORE_BATCH).map(|i| envelope(b * STORE_BATCH + i)).collect();
        batches.push(batch.iter().map(|e| e.id).collect::<Vec<_>>());
        let start = now_ns();
        store.put(batch, unix_now(), None).await?;
        put_batch.push(now_ns() - start);
    }
    for ids in batches {
        let start = now_ns();
        store.delete(bob, ids).await?;
        delete_batch.push(now_ns() - start);
    }
    Ok(StoreFigures {
        put_one: Percentiles::of(put_one),
        put_batch: Percentiles::of(put_batch),
        delete_batch: Percentiles::of(delete_batch),
    })
}

/// `seal::seal` and `seal::open` of a 256-byte sealed message, per second on one thread.
pub(crate) fn seal_open_rates(dir: &Path, secs: f64) -> anyhow::Result<(f64, f64)> {
    let alice = DeviceIdentity::load_or_create(&dir.join("seal-alice"))?;
    let bob = DeviceIdentity::load_or_create(&dir.join("seal-bob"))?;
    let id = EnvelopeId::random();
    let text = plaintext(7);
    let sealed = seal::seal(&alice, &bob.noise_public, &id, &text)?;
    if sealed.len() != SEALED_LEN {
        bail!("sealed {} bytes, expected {SEALED_LEN}", sealed.len());
    }
    let seal = rate(secs, || seal::seal(&alice, &bob.noise_public, &id, &text).is_ok());
    let open = rate(secs, || seal::open(&bob, &id, &sealed).is_ok());
    Ok((seal, open))
}

fn rate(secs: f64, mut f: impl FnMut() -> bool) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..64 {
            assert!(f(), "sealing and opening a valid message must succeed");
        }
        n += 64;
    }
    n as f64 / start.elapsed().as_secs_f64()
}
