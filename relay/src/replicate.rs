//! Storing a `Send` durably on the `R` relays closest to each recipient's mailbox before the
//! sender hears "stored". The first `R` copies are written in parallel; a relay that fails is
//! replaced by the next closest one, so one dead relay costs a retry, not the message.
//! Deleting what a recipient acknowledged from the other copies, gathered over a short while.
//! Every call to another relay goes through [`ReplicaClient`], which first exchanges relay
//! certificates with it. What a call finds out about the relay it called goes to
//! [`crate::relays`] as a [`RelayReport`].

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::PeerId;
use libp2p::identity::ed25519;
use meshgram_node::crypto::cert::{RelayCert, unix_now};
use meshgram_node::net::pipe::{PipeError, PipePool};
use meshgram_node::proto::envelope::{Envelope, EnvelopeId};
use meshgram_node::proto::{
    ErrorCode, MAX_ACKS_PER_DELETE, MailboxResponse, ReplicaRequest, ReplicaResponse, SignedAck, WireError,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::metrics::Metrics;
use crate::relays::{RelayReport, Reporter};
use crate::store::{QueuedPut, StoreHandle};

/// Where copies go: this relay's own store, or other relays on their pipes.
#[derive(Debug, Clone)]
pub(crate) struct Replicas {
    /// Copies made and refused for want of copies are counted here.
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) local: PeerId,
    pub(crate) store: StoreHandle,
    pub(crate) pipes: ReplicaPipes,
    /// To tell the event loop about relays that did not answer, or are not relays.
    pub(crate) reporter: Reporter,
    pub(crate) replication: usize,
    /// Whether fewer than `replication` copies may do when fewer relays are live.
    pub(crate) allow_fewer_replicas: bool,
}

impl Replicas {
    /// Calls another relay, giving up after `deadline`. A relay that did not answer (or showed
    /// no relay certificate) is reported, so placement skips it for a while; its refusals come
    /// back as they are.
    pub(crate) async fn call_within(
        &self,
        relay: PeerId,
        request: &ReplicaRequest,
        deadline: Duration,
    ) -> Result<ReplicaResponse, WireError> {
        // libp2p-stream dials the relay if need be, with the addresses Kademlia knows.
        match tokio::time::timeout(deadline, self.pipes.call(relay, request)).await {
            Ok(Ok(ReplicaResponse::Error(e))) => Err(e),
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => {
                if let Some(report) = e.report() {
                    self.reporter.report(relay, report).await;
                }
                Err(WireError::new(ErrorCode::Unavailable, e.to_string()))
            }
            // Given up on, not cancelled: a `Store` may still be committed there, which is
            // harmless (a spare copy, deduplicated by id, deleted with the others or expired).
            Err(_) => {
                self.reporter.report(relay, RelayReport::Down).await;
                Err(WireError::new(ErrorCode::Unavailable, format!("{relay} did not answer within {deadline:?}")))
            }
        }
    }

    /// Durable copies a `Send` (or a media part) needs before it is acknowledged, with `live`
    /// relays (this one included) to choose from: always `R`, unless the operator allowed fewer.
    pub(crate) fn copies_needed(&self, live: usize) -> usize {
        if self.allow_fewer_replicas { self.replication.min(live).max(1) } else { self.replication }
    }
}

/// One mailbox's envelopes of a `Send`, and where they go.
#[derive(Debug)]
pub(crate) struct Group {
    pub(crate) batch: Vec<Envelope>,
    /// Live relays, closest to the mailbox first.
    pub(crate) targets: Vec<PeerId>,
    /// The local copy, when it was already queued (so that it precedes a push to the recipient).
    pub(crate) local_put: Option<QueuedPut>,
}

/// Stores each mailbox's batch on its closest relays. Returns the answer for the sender and
/// the mailboxes that now have new envelopes on this relay.
pub(crate) async fn store_replicated(
    replicas: &Replicas,
    groups: Vec<Group>,
    now: u64,
) -> (MailboxResponse, Vec<PeerId>) {
    let (mut stored, mut duplicates, mut arrived) = (Vec::new(), Vec::new(), Vec::new());
    for Group { batch, targets, local_put } in groups {
        let Some(mailbox) = batch.first().map(|e| e.to_device) else { continue };
        match store_group(replicas, &batch, &targets, local_put, now).await {
            Ok((dups, on_local)) => {
                stored.extend(batch.iter().map(|e| e.id).filter(|id| !dups.contains(id)));
                duplicates.extend(dups);
                if on_local {
                    arrived.push(mailbox);
                }
            }
            // Earlier groups stay stored; the sender retries and gets them back as duplicates.
            Err(refusal) => return (MailboxResponse::Error(refusal), arrived),
        }
    }
    (MailboxResponse::Stored { stored, duplicates }, arrived)
}

/// Returns the ids every copy already had, and whether a copy went to the local store.
async fn store_group(
    replicas: &Replicas,
    batch: &[Envelope],
    targets: &[PeerId],
    mut local_put: Option<QueuedPut>,
    now: u64,
) -> Result<(HashSet<EnvelopeId>, bool), WireError> {
    let need = replicas.copies_needed(targets.len());
    let copy_to = |target: PeerId| {
        let queued = if target == replicas.local { local_put.take() } else { None };
        store_on(replicas, target, batch.to_vec(), queued, now)
    };
    // A full mailbox, or a group message a copy's relay refuses (an epoch over): every relay would.
    let final_codes = [ErrorCode::QuotaExceeded, ErrorCode::Forbidden];
    let copies = copy_to_closest(&replicas.metrics, "an envelope", targets, need, &final_codes, copy_to).await?;
    let on_local = copies.iter().any(|(target, _)| *target == replicas.local);
    let mut duplicates: Option<HashSet<EnvelopeId>> = None;
    for (_, dups) in copies {
        let dups: HashSet<EnvelopeId> = dups.into_iter().collect();
        duplicates = Some(match duplicates {
            None => dups,
            Some(seen) => seen.intersection(&dups).copied().collect(),
        });
    }
    Ok((duplicates.unwrap_or_default(), on_local))
}

/// Makes `need` copies of something on `targets` (live relays, closest to its key first):
/// the first `need` in parallel, each one that fails replaced by the next closest. `copy`
/// makes one copy and says where. A refusal whose code is in `final_codes` (one every relay
/// would give, such as a full quota) ends it at once and is returned as it is; otherwise,
/// fewer than `need` copies is `UNAVAILABLE` (nothing is acknowledged). Returns each copy's
/// relay and answer. `what` names the thing in refusals ("an envelope").
pub(crate) async fn copy_to_closest<T, Fut>(
    metrics: &Metrics,
    what: &str,
    targets: &[PeerId],
    need: usize,
    final_codes: &[ErrorCode],
    mut copy: impl FnMut(PeerId) -> Fut,
) -> Result<Vec<(PeerId, T)>, WireError>
where
    Fut: Future<Output = (PeerId, Result<T, WireError>)>,
{
    if targets.len() < need {
        metrics.replication_unavailable.inc();
        return Err(WireError::new(
            ErrorCode::Unavailable,
            format!(
                "this relay knows {} live relays (itself included) and {what} needs {need} durable copies; \
                 nothing is acknowledged, send again",
                targets.len()
            ),
        ));
    }
    let mut next = 0;
    let mut inflight = FuturesUnordered::new();
    while inflight.len() < need && next < targets.len() {
        inflight.push(copy(targets[next]));
        next += 1;
    }
    let mut copies = Vec::with_capacity(need);
    let mut last_error = String::from("no relay is known");
    while let Some((target, result)) = inflight.next().await {
        match result {
            Ok(answer) => copies.push((target, answer)),
            Err(e) if final_codes.contains(&e.code) => return Err(e),
            Err(e) => {
                tracing::warn!(relay = %target, error = %e, "replica failed; trying the next closest relay");
                last_error = e.message;
                if next < targets.len() {
                    inflight.push(copy(targets[next]));
                    next += 1;
                }
            }
        }
    }
    if copies.len() < need {
        metrics.replication_unavailable.inc();
        return Err(WireError::new(
            ErrorCode::Unavailable,
            format!("stored on {} of {need} relays ({last_error}); nothing is acknowledged, send again", copies.len()),
        ));
    }
    Ok(copies)
}

/// One copy, on this relay (`queued` if already in the store's queue) or another; returns the
/// ids it already had.
async fn store_on(
    replicas: &Replicas,
    target: PeerId,
    batch: Vec<Envelope>,
    queued: Option<QueuedPut>,
    now: u64,
) -> (PeerId, Result<Vec<EnvelopeId>, WireError>) {
    let result = if target == replicas.local {
        let outcome = match queued {
            Some(queued) => queued.outcome().await,
            None => replicas.store.put(batch, now, None).await,
        };
        match outcome {
            Ok(outcome) if !outcome.over_quota.is_empty() => {
                Err(WireError::new(ErrorCode::QuotaExceeded, crate::store::OVER_QUOTA))
            }
            Ok(outcome) => Ok(outcome.duplicates),
            Err(e) => Err(crate::replica::store_error(&e)),
        }
    } else {
        match replicas.call_within(target, &ReplicaRequest::Store { envelopes: batch }, REPLICA_STORE_DEADLINE).await {
            Ok(ReplicaResponse::Stored { duplicates }) => Ok(duplicates),
            Ok(other) => Err(unexpected(&other)),
            Err(e) => Err(e),
        }
    };
    replicas.metrics.count_copy(result.is_ok());
    (target, result)
}

/// The error for an answer of the wrong kind.
pub(crate) fn unexpected(answer: &ReplicaResponse) -> WireError {
    WireError::new(ErrorCode::Internal, format!("unexpected replica answer {answer:?}"))
}

/// How long a replica `Store` may take before the next closest relay is asked instead (and the
/// slow one is reported down, so following sends skip it for a while). A healthy relay answers
/// in milliseconds: a batch is durable after one small synced append (`store`, `wal`), so 3 s
/// is a thousand times a normal answer, and a relay that has not answered by then is hung,
/// stopped or cut off while the sender waits. Without this deadline one such relay held every
/// send that picked it for the replica pipe's 60 s timeout, as long as the client's own. A
/// relay taken for slow by mistake costs only placement: the next closest relay keeps the copy.
pub(crate) const REPLICA_STORE_DEADLINE: Duration = Duration::from_secs(3);

/// How long deletes for other replicas gather before going out. A recipient acknowledges every
/// batch it gets, at a steady trickle often a single envelope, and each would otherwise cost
/// every other replica a request and a commit of its own. A late or lost delete loses nothing:
/// the copy stays until its TTL, and a recipient that sees it again drops it by id.
const DELETE_GATHER: Duration = Duration::from_millis(20);
/// Deletes waiting to be gathered; when full, more are dropped (see above).
const DELETE_QUEUE: usize = 4096;
/// Delete calls under way at once; past them, gathering waits (and the queue fills).
const MAX_DELETE_CALLS: usize = 64;

/// A recipient's signed acknowledgement to pass on to one other relay.
#[derive(Debug)]
pub(crate) struct ReplicaDelete {
    pub(crate) relay: PeerId,
    pub(crate) ack: SignedAck,
}

/// Sends [`ReplicaDelete`]s, gathered per relay and mailbox over [`DELETE_GATHER`]; nothing
/// waits for their answers. Dropping it stops its task and the deletes still under way.
#[derive(Debug)]
pub(crate) struct DeleteForwarder {
    queue: mpsc::Sender<ReplicaDelete>,
    task: tokio::task::JoinHandle<()>,
}

impl DeleteForwarder {
    /// Starts the forwarding task.
    pub(crate) fn start(pipes: ReplicaPipes) -> Self {
        let (queue, rx) = mpsc::channel::<ReplicaDelete>(DELETE_QUEUE);
        DeleteForwarder { queue, task: tokio::spawn(forward_deletes(pipes, rx)) }
    }

    /// Queues a delete; `false` (and it is dropped) if too many are queued.
    pub(crate) fn try_send(&self, delete: ReplicaDelete) -> bool {
        self.queue.try_send(delete).is_ok()
    }
}

impl Drop for DeleteForwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward_deletes(pipes: ReplicaPipes, mut rx: mpsc::Receiver<ReplicaDelete>) {
    let mut gathered: HashMap<PeerId, Vec<SignedAck>> = HashMap::new();
    // The calls under way; their answers are only logged.
    let mut calls = JoinSet::new();
    loop {
        let first = tokio::select! {
            first = rx.recv() => match first {
                Some(first) => first,
                None => break,
            },
            Some(_) = calls.join_next() => continue,
        };
        let mut add = |d: ReplicaDelete| gathered.entry(d.relay).or_default().push(d.ack);
        add(first);
        let until = tokio::time::Instant::now() + DELETE_GATHER;
        while let Ok(Some(more)) = tokio::time::timeout_at(until, rx.recv()).await {
            add(more);
        }
        for (relay, acks) in gathered.drain() {
            for chunk in acks.chunks(MAX_ACKS_PER_DELETE) {
                while calls.len() >= MAX_DELETE_CALLS {
                    calls.join_next().await;
                }
                let (pipes, request) = (pipes.clone(), ReplicaRequest::DeleteAcked { acks: chunk.to_vec() });
                calls.spawn(async move {
                    if let Err(e) = pipes.call(relay, &request).await {
                        tracing::debug!(%relay, error = %e, "replica delete failed");
                    }
                });
            }
        }
    }
    while calls.join_next().await.is_some() {}
}

/// This relay's calls to other relays.
pub(crate) type ReplicaPipes = std::sync::Arc<ReplicaClient>;

/// Calls other relays on replica pipes. Greets each one once per connection with this relay's
/// certificate, and checks the one it answers with: a peer that cannot show a gateway-signed
/// relay certificate is never given a copy (it could acknowledge one and drop it).
#[derive(Debug)]
pub(crate) struct ReplicaClient {
    pipes: PipePool<ReplicaRequest, ReplicaResponse>,
    cert: RelayCert,
    gateway_key: ed25519::PublicKey,
    /// Relays that accepted our `Hello` and showed a valid certificate.
    greeted: Mutex<HashSet<PeerId>>,
}

/// Why a call to another relay failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReplicaCallError {
    #[error(transparent)]
    Pipe(#[from] PipeError),
    /// It showed no valid relay certificate.
    #[error("{relay} is not a certified relay: {reason}")]
    NotARelay { relay: PeerId, reason: String },
    /// It refused our certificate.
    #[error("{relay} refused this relay's certificate: {error}")]
    Refused { relay: PeerId, error: WireError },
}

impl ReplicaCallError {
    /// What this failure says about the relay called, if anything.
    pub(crate) fn report(&self) -> Option<RelayReport> {
        match self {
            ReplicaCallError::Pipe(PipeError::Open(_) | PipeError::Closed(_) | PipeError::Timeout(_)) => {
                Some(RelayReport::Down)
            }
            ReplicaCallError::NotARelay { .. } => Some(RelayReport::NotARelay),
            _ => None,
        }
    }
}

impl ReplicaClient {
    pub(crate) fn new(
        pipes: PipePool<ReplicaRequest, ReplicaResponse>,
        cert: RelayCert,
        gateway_key: ed25519::PublicKey,
    ) -> Self {
        ReplicaClient { pipes, cert, gateway_key, greeted: Mutex::new(HashSet::new()) }
    }

    /// Sends `request` to `relay`, greeting it first if need be.
    pub(crate) async fn call(
        &self,
        relay: PeerId,
        request: &ReplicaRequest,
    ) -> Result<ReplicaResponse, ReplicaCallError> {
        let mut greeted_now = false;
        loop {
            if !self.greeted().contains(&relay) {
                self.greet(relay).await?;
                greeted_now = true;
            }
            match self.pipes.call(relay, request, async { Ok(()) }).await? {
                // It forgot us (it restarted, or the connection was replaced): greet again, once.
                ReplicaResponse::Error(e) if e.code == ErrorCode::CertInvalid && !greeted_now => {
                    self.greeted().remove(&relay);
                }
                response => return Ok(response),
            }
        }
    }

    /// Says `Hello` to `relay` and checks the certificate it answers with.
    pub(crate) async fn greet(&self, relay: PeerId) -> Result<(), ReplicaCallError> {
        let hello = ReplicaRequest::Hello { cert: self.cert.clone() };
        match self.pipes.call(relay, &hello, async { Ok(()) }).await? {
            ReplicaResponse::Welcome { cert } => {
                cert.verify_for(&self.gateway_key, &relay, unix_now())
                    .map_err(|e| ReplicaCallError::NotARelay { relay, reason: e.to_string() })?;
                self.greeted().insert(relay);
                Ok(())
            }
            ReplicaResponse::Error(error) => Err(ReplicaCallError::Refused { relay, error }),
            other => Err(ReplicaCallError::NotARelay { relay, reason: format!("it answered Hello with {other:?}") }),
        }
    }

    fn greeted(&self) -> std::sync::MutexGuard<'_, HashSet<PeerId>> {
        self.greeted.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
