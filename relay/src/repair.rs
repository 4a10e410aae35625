//! Repair: every envelope this relay holds goes back to the `R` relays now responsible for its
//! mailbox, after a relay died, came back or joined, and a delete that missed a replica catches
//! up with it.
//!
//! A round, every [`REPAIR_EVERY`] and [`AFTER_MEMBERSHIP_CHANGE`] after the live relays changed:
//! 1. Read the digest of each mailbox this relay holds envelopes for (the store keeps them up to
//!    date, so this reads one small row per such mailbox) and place each mailbox on the live
//!    relays (the same rule as a `Send`, [`crate::placement`]).
//! 2. To each other relay responsible for some of them: `Digests` (4,096 mailboxes per
//!    request); it answers with the mailboxes whose digest differs from its own.
//! 3. For each of those: `ReconcileProven` with the ids held here; it answers which it lacks
//!    (`wanted`: sent with `StoreUntil`, so its dedup and quota apply and the copy expires with
//!    the original) and, for those it has *delivered*, the recipient's signed acknowledgements
//!    it kept. Each is checked against the mailbox's device key; the copies it covers are stale
//!    and deleted here (and the acknowledgement kept, as proof for the next relay). A relay's
//!    word that an envelope was delivered, without the recipient's signature, deletes nothing:
//!    that copy waits for its recipient (who drops it by id) or its expiry.
//!
//! Every relay runs rounds for what it holds, so a pair of replicas converges from both sides:
//! what one lacks the other pushes, what one proves delivered the other deletes. A relay that is no
//! longer responsible for a mailbox (a closer one joined) still pushes to the responsible ones,
//! and drops its copies once they are delivered, as any replica does. Deletes are not brought
//! back because a store keeps the id of a delivered envelope until its TTL (`store`: the id
//! record outlives the mailbox entry) and does not want it again, and `Store` of such an id is
//! a duplicate; a repaired copy expires when its original does, so it cannot outlive that
//! record. A relay that does not answer within [`REPAIR_CALL_DEADLINE`] is reported down
//! (`relays`), which makes placement skip it and starts the next round soon: its mailboxes then
//! go to the next closest relays. So a dead relay's copies are back on `R` live relays within
//! about `REPAIR_EVERY + REPAIR_CALL_DEADLINE + AFTER_MEMBERSHIP_CHANGE` (17 s) plus the copying.
//!
//! What a round costs when everything is in sync: one read of the digest table and one small
//! request per peer relay per 4,096 mailboxes holding undelivered envelopes (answered from that
//! relay's digest table); mailboxes whose owner is online are usually empty and cost nothing.
//! What a peer answers is checked against what it was asked: a relay that names mailboxes or
//! ids it was not asked about gets nothing for them.
//!
//! Each round also repairs media chunks and part records, alongside ([`crate::media::repair`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::PeerId;
use libp2p::kad::KBucketKey;
use meshgram_node::proto::envelope::{Envelope, EnvelopeId};
use meshgram_node::proto::{
    ErrorCode, MAX_DIGESTS_PER_REQUEST, MAX_ENVELOPES_PER_BATCH, MAX_IDS_PER_RECONCILE, MailboxDigest, ReplicaRequest,
    ReplicaResponse, SignedAck, WireError,
};

use crate::media::MediaStore;
use crate::media::repair::repair_media;
use crate::metrics::{Metrics, gauge_value};
use crate::placement::{closest_relay_keys, mailbox_key};
use crate::replica::store_error;
use crate::replicate::{Replicas, unexpected};
use crate::store::{StoreError, StoreHandle};

/// How often a round runs when nothing changes.
pub(crate) const REPAIR_EVERY: Duration = Duration::from_secs(10);
/// How soon a round runs after a relay joined, came back or was reported down; short, and long
/// enough that relays starting together are greeted before their mailboxes are placed.
pub(crate) const AFTER_MEMBERSHIP_CHANGE: Duration = Duration::from_secs(2);
/// How long one repair request may take before its relay is taken for down.
const REPAIR_CALL_DEADLINE: Duration = Duration::from_secs(5);
/// Relays repaired at once in a round.
const RELAYS_AT_ONCE: usize = 4;

/// What a round did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct RoundReport {
    /// Mailboxes with envelopes held here.
    pub(crate) mailboxes: usize,
    /// Envelopes copied to responsible relays that lacked them.
    pub(crate) copied: u64,
    /// Copies deleted here because a replica had delivered them.
    pub(crate) stale_deleted: u64,
    /// Relays the round could not finish with (down, refusing, or a failing store).
    pub(crate) unfinished: usize,
    /// Mailboxes held here: the event loop looks up their closest relays when its routing
    /// table may not hold them, so that the next round places them right.
    pub(crate) held: Vec<PeerId>,
}

/// One round: see the module's description. `live` are the relays placement may choose from,
/// this one included.
pub(crate) async fn repair_round(
    replicas: Replicas,
    media: MediaStore,
    live: Vec<PeerId>,
    metrics: Arc<Metrics>,
) -> RoundReport {
    let started = std::time::Instant::now();
    let (report, _) =
        tokio::join!(repair_mailboxes(&replicas, live.clone(), &metrics), repair_media(&replicas, &media, &live));
    metrics.repair_last_round_seconds.set(started.elapsed().as_secs_f64());
    report
}

/// The mailboxes' part of a round.
async fn repair_mailboxes(replicas: &Replicas, live: Vec<PeerId>, metrics: &Metrics) -> RoundReport {
    let replicas = replicas.clone();
    let digests = match read(&replicas, StoreHandle::digests).await {
        Ok(digests) => digests,
        Err(e) => {
            tracing::error!(error = %e.message, "repair could not read the store");
            return RoundReport { unfinished: 1, ..RoundReport::default() };
        }
    };
    let keys: Vec<KBucketKey<PeerId>> = live.into_iter().map(KBucketKey::from).collect();
    let digests: Vec<MailboxDigest> =
        digests.into_iter().map(|(mailbox, digest)| MailboxDigest { mailbox, digest }).collect();
    let plan = plan(&replicas, &keys, &digests, |d| mailbox_key(&d.mailbox));
    let held = digests.iter().map(|d| d.mailbox).collect();
    let mut report = RoundReport { mailboxes: digests.len(), held, ..RoundReport::default() };
    // Each (relay, mailbox) to compare is backlog until its relay is done with.
    metrics.repair_backlog.set(gauge_value(plan.values().map(Vec::len).sum()));
    let repair = |relay, mailboxes: Vec<MailboxDigest>| {
        let planned = mailboxes.len();
        let repaired = repair_relay(&replicas, relay, mailboxes);
        async move { (planned, repaired.await) }
    };
    per_relay(plan, repair, |relay, (planned, done): (usize, RelayRepair)| {
        if done.error.is_none() {
            metrics.repair_backlog.dec_by(gauge_value(planned));
        }
        report.copied += done.copied;
        report.stale_deleted += done.stale_deleted;
        if let Some(error) = done.error {
            report.unfinished += 1;
            tracing::warn!(%relay, %error, "repair could not finish with a relay; the next round tries again");
        }
    })
    .await;
    metrics.repair_rounds.inc();
    metrics.repair_copied.inc_by(report.copied);
    metrics.repair_stale_deleted.inc_by(report.stale_deleted);
    if report.copied > 0 || report.stale_deleted > 0 {
        tracing::info!(
            mailboxes = report.mailboxes,
            copied = report.copied,
            stale_deleted = report.stale_deleted,
            "repair round"
        );
    }
    report
}

/// For each of `items`, the other relays among the `R` of `live` closest to its key: which
/// items each other relay is responsible for with this one.
pub(crate) fn plan<T: Clone, K>(
    replicas: &Replicas,
    live: &[KBucketKey<PeerId>],
    items: &[T],
    key_of: impl Fn(&T) -> KBucketKey<K>,
) -> HashMap<PeerId, Vec<T>> {
    let mut plan: HashMap<PeerId, Vec<T>> = HashMap::new();
    for item in items {
        for relay in closest_relay_keys(&key_of(item), live, replicas.replication) {
            if relay != replicas.local {
                plan.entry(relay).or_default().push(item.clone());
            }
        }
    }
    plan
}

/// Runs `repair` for each relay of `plan`, [`RELAYS_AT_ONCE`] at a time, handing each one's
/// outcome to `take` as it ends.
pub(crate) async fn per_relay<K, R, Fut>(
    plan: HashMap<PeerId, K>,
    repair: impl Fn(PeerId, K) -> Fut,
    mut take: impl FnMut(PeerId, R),
) where
    Fut: Future<Output = R>,
{
    let mut pending = plan.into_iter();
    let mut running = FuturesUnordered::new();
    loop {
        while running.len() < RELAYS_AT_ONCE
            && let Some((relay, keys)) = pending.next()
        {
            let repaired = repair(relay, keys);
            running.push(async move { (relay, repaired.await) });
        }
        let Some((relay, outcome)) = running.next().await else { break };
        take(relay, outcome);
    }
}

/// What repairing with one relay did; `error` if it had to stop early.
#[derive(Debug, Default)]
struct RelayRepair {
    copied: u64,
    stale_deleted: u64,
    error: Option<WireError>,
}

/// Brings `relay` up to date with what this relay holds of `mailboxes`.
async fn repair_relay(replicas: &Replicas, relay: PeerId, mailboxes: Vec<MailboxDigest>) -> RelayRepair {
    let mut done = RelayRepair::default();
    for batch in mailboxes.chunks(MAX_DIGESTS_PER_REQUEST) {
        let asked: HashSet<PeerId> = batch.iter().map(|d| d.mailbox).collect();
        let differ = match call(replicas, relay, ReplicaRequest::Digests { mailboxes: batch.to_vec() }).await {
            Ok(ReplicaResponse::Differ { mailboxes }) => mailboxes,
            Ok(other) => return RelayRepair { error: Some(unexpected(&other)), ..done },
            Err(e) => return RelayRepair { error: Some(e), ..done },
        };
        // Only mailboxes it was asked about, each once: a relay that names others gets nothing.
        let differ: HashSet<PeerId> = differ.into_iter().filter(|m| asked.contains(m)).collect();
        for mailbox in differ {
            match repair_mailbox(replicas, relay, mailbox, &mut done).await {
                Ok(()) => {}
                // It is down or its store failed: nothing more to do with it this round.
                Err(e) if e.code == ErrorCode::Unavailable => return RelayRepair { error: Some(e), ..done },
                Err(e) => {
                    tracing::warn!(%relay, %mailbox, error = %e, "repair of a mailbox failed; the next round tries again")
                }
            }
        }
    }
    done
}

/// Reconciles one mailbox with `relay`: sends what it lacks, deletes here what it delivered.
async fn repair_mailbox(
    replicas: &Replicas,
    relay: PeerId,
    mailbox: PeerId,
    done: &mut RelayRepair,
) -> Result<(), WireError> {
    let held = read(replicas, move |store| store.held_in(&mailbox)).await?;
    for ids in held.chunks(MAX_IDS_PER_RECONCILE) {
        let request = ReplicaRequest::ReconcileProven { mailbox, held: ids.to_vec() };
        let (wanted, proofs) = match call(replicas, relay, request).await? {
            ReplicaResponse::ReconciledProven { wanted, proofs } => (wanted, proofs),
            other => return Err(unexpected(&other)),
        };
        // Only ids it was asked about, each once, whatever it answered.
        let sent: HashSet<EnvelopeId> = ids.iter().copied().collect();
        let wanted: Vec<EnvelopeId> =
            wanted.into_iter().filter(|id| sent.contains(id)).collect::<HashSet<_>>().into_iter().collect();
        // Its copies are stale only where the recipient's own signature says it received them.
        for ack in proven_deliveries(&mailbox, proofs, relay).await {
            let deleted = replicas.store.delete_acked(ack).await.map_err(|e| store_error(&e))?;
            done.stale_deleted += u64::from(deleted);
        }
        for wanted in wanted.chunks(MAX_ENVELOPES_PER_BATCH) {
            let wanted = wanted.to_vec();
            let mut envelopes = read(replicas, move |store| store.held_envelopes(&mailbox, &wanted)).await?;
            envelopes.sort_by_key(|(_, expires_at)| *expires_at);
            for copies in expiring_together(&envelopes) {
                let expires_at = copies.last().map_or(0, |(_, expires_at)| *expires_at);
                let sent = copies.len() as u64;
                let envelopes = copies.iter().map(|(envelope, _)| envelope.clone()).collect();
                match call(replicas, relay, ReplicaRequest::StoreUntil { envelopes, expires_at }).await? {
                    ReplicaResponse::Stored { duplicates } => {
                        done.copied += sent.saturating_sub(duplicates.len() as u64);
                    }
                    other => return Err(unexpected(&other)),
                }
            }
        }
    }
    Ok(())
}

/// Of the acknowledgements another relay showed as proof of delivery, those of `mailbox` that
/// its device signed (checked off the runtime; at most as many as a reconcile names ids).
async fn proven_deliveries(mailbox: &PeerId, proofs: Vec<SignedAck>, relay: PeerId) -> Vec<SignedAck> {
    let mailbox = *mailbox;
    let proofs: Vec<SignedAck> =
        proofs.into_iter().filter(|ack| ack.mailbox == mailbox).take(MAX_IDS_PER_RECONCILE).collect();
    if proofs.is_empty() {
        return proofs;
    }
    let checked = tokio::task::spawn_blocking(move || {
        let (good, bad): (Vec<_>, Vec<_>) = proofs.into_iter().partition(|ack| ack.verify().is_ok());
        if !bad.is_empty() {
            tracing::warn!(%relay, %mailbox, forged = bad.len(), "a relay showed delivery proofs that do not check out; those copies stay");
        }
        good
    });
    checked.await.unwrap_or_default()
}

/// Envelopes sorted by expiry, in runs that expire within [`EXPIRY_SPREAD`] of each other: a
/// repaired copy is kept until the run's last expiry, so it may outlive its original by that
/// much at most (and a recipient drops a second delivery by id).
fn expiring_together(sorted: &[(Envelope, u64)]) -> impl Iterator<Item = &[(Envelope, u64)]> {
    sorted.chunk_by(|(_, first), (_, next)| next.saturating_sub(*first) <= EXPIRY_SPREAD_SECS)
}

/// See [`expiring_together`].
const EXPIRY_SPREAD_SECS: u64 = 60;

async fn call(replicas: &Replicas, relay: PeerId, request: ReplicaRequest) -> Result<ReplicaResponse, WireError> {
    replicas.call_within(relay, &request, REPAIR_CALL_DEADLINE).await
}

/// Runs a store read on a blocking thread: a mailbox can be large, and a relay's event loop may
/// share its one thread with this task.
async fn read<T: Send + 'static>(
    replicas: &Replicas,
    f: impl FnOnce(&StoreHandle) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, WireError> {
    let store = replicas.store.clone();
    match tokio::task::spawn_blocking(move || f(&store)).await {
        Ok(result) => result.map_err(|e| store_error(&e)),
        Err(e) => Err(WireError::new(ErrorCode::Internal, format!("a store read failed: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_recipients_own_acknowledgements_prove_a_delivery() {
        let key = libp2p::identity::Keypair::generate_ed25519();
        let mailbox = key.public().to_peer_id();
        let ids = vec![EnvelopeId::random(), EnvelopeId::random()];
        let good = SignedAck::sign(&key, ids.clone());
        let other = libp2p::identity::Keypair::generate_ed25519();
        let forged = SignedAck { mailbox, ids: ids.clone(), signature: other.sign(b"anything").unwrap() };
        let tampered = SignedAck { ids: vec![EnvelopeId::random()], ..good.clone() };
        let elsewhere = SignedAck::sign(&other, ids);
        let proofs = vec![forged, good.clone(), tampered, elsewhere];
        assert_eq!(proven_deliveries(&mailbox, proofs, PeerId::random()).await, [good]);
    }
}
