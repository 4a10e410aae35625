//! Repair: every envelope this relay holds goes back to the `R` relays now responsible for its
//! mailbox, after a relay died, came back or joined, and a delete that missed a replica catches
//! up with it.
//!
//! A round, every [`REPAIR_EVERY`] and [`AFTER_MEMBERSHIP_CHANGE`] after the live relays changed:
//! 1. Read which envelope ids this relay holds, per mailbox, and place each mailbox on the live
//!    relays (the same rule as a `Send`, [`crate::placement`]).
//! 2. To each other relay responsible for some of them: `Digests` (32 bytes per mailbox, in
//!    batches); it answers with the mailboxes whose digest differs from its own.
//! 3. For each of those: `Reconcile` with the ids held here; it answers which it lacks
//!    (`wanted`: sent with a plain `Store`, so its dedup and quota apply) and which it has
//!    *delivered* (the copies here are stale: deleted, never sent back).
//!
//! Every relay runs rounds for what it holds, so a pair of replicas converges from both sides:
//! what one lacks the other pushes, what one delivered the other deletes. A relay that is no
//! longer responsible for a mailbox (a closer one joined) still pushes to the responsible ones,
//! and drops its copies once they are delivered, as any replica does. Deletes are not brought
//! back because a store keeps the id of a delivered envelope until its TTL (`store`: the id
//! record outlives the mailbox entry) and answers it as `delivered`, and `Store` of such an id is
//! a duplicate. A relay that does not answer within [`REPAIR_CALL_DEADLINE`] is reported down
//! (`relays`), which makes placement skip it and starts the next round soon: its mailboxes then
//! go to the next closest relays. So a dead relay's copies are back on `R` live relays within
//! about `REPAIR_EVERY + REPAIR_CALL_DEADLINE + AFTER_MEMBERSHIP_CHANGE` (17 s) plus the copying.
//!
//! What a round costs when everything is in sync: one read of the mailbox table and one small
//! request per peer relay per 4,096 mailboxes holding undelivered envelopes; mailboxes whose
//! owner is online are usually empty and cost nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::PeerId;
use libp2p::kad::KBucketKey;
use meshgram_node::proto::envelope::EnvelopeId;
use meshgram_node::proto::{
    ErrorCode, MAX_DIGESTS_PER_REQUEST, MAX_ENVELOPES_PER_BATCH, MailboxDigest, ReplicaRequest, ReplicaResponse,
    WireError,
};

use crate::metrics::Metrics;
use crate::placement::{closest_relay_keys, mailbox_key};
use crate::replicate::{Replicas, unexpected};

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
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RoundReport {
    /// Mailboxes with envelopes held here.
    pub(crate) mailboxes: usize,
    /// Envelopes copied to responsible relays that lacked them.
    pub(crate) copied: u64,
    /// Copies deleted here because a replica had delivered them.
    pub(crate) stale_deleted: u64,
    /// Relays the round could not finish with (down, refusing, or a failing store).
    pub(crate) unfinished: usize,
}

/// One round: see the module's description. `live` are the relays placement may choose from,
/// this one included.
pub(crate) async fn repair_round(replicas: Replicas, live: Vec<PeerId>, metrics: Arc<Metrics>) -> RoundReport {
    let store = replicas.store.clone();
    let held = match tokio::task::spawn_blocking(move || store.held()).await {
        Ok(Ok(held)) => held,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "repair could not read the store");
            return RoundReport { unfinished: 1, ..RoundReport::default() };
        }
        Err(e) => {
            tracing::error!(error = %e, "repair's store read failed");
            return RoundReport { unfinished: 1, ..RoundReport::default() };
        }
    };
    let held = Arc::new(held);
    let keys: Vec<KBucketKey<PeerId>> = live.into_iter().map(KBucketKey::from).collect();
    let mut plan: HashMap<PeerId, Vec<usize>> = HashMap::new();
    for (index, (mailbox, _)) in held.iter().enumerate() {
        for relay in closest_relay_keys(&mailbox_key(mailbox), &keys, replicas.replication) {
            if relay != replicas.local {
                plan.entry(relay).or_default().push(index);
            }
        }
    }
    let mut report = RoundReport { mailboxes: held.len(), ..RoundReport::default() };
    let mut pending = plan.into_iter();
    let mut running = FuturesUnordered::new();
    loop {
        while running.len() < RELAYS_AT_ONCE
            && let Some((relay, mailboxes)) = pending.next()
        {
            running.push(repair_relay(&replicas, relay, Arc::clone(&held), mailboxes));
        }
        let Some((relay, outcome)) = running.next().await else { break };
        let RelayRepair { copied, stale_deleted, error } = outcome;
        report.copied += copied;
        report.stale_deleted += stale_deleted;
        if let Some(error) = error {
            report.unfinished += 1;
            tracing::warn!(%relay, %error, "repair could not finish with a relay; the next round tries again");
        }
    }
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

/// What repairing with one relay did, up to its first failure.
#[derive(Debug, Default)]
struct RelayRepair {
    copied: u64,
    stale_deleted: u64,
    error: Option<WireError>,
}

/// Brings `relay` up to date with the mailboxes of `held` at `mailboxes` (indices).
async fn repair_relay(
    replicas: &Replicas,
    relay: PeerId,
    held: Arc<Vec<(PeerId, Vec<EnvelopeId>)>>,
    mailboxes: Vec<usize>,
) -> (PeerId, RelayRepair) {
    let mut done = RelayRepair::default();
    for batch in mailboxes.chunks(MAX_DIGESTS_PER_REQUEST) {
        if let Err(e) = repair_batch(replicas, relay, &held, batch, &mut done).await {
            done.error = Some(e);
            break;
        }
    }
    (relay, done)
}

async fn repair_batch(
    replicas: &Replicas,
    relay: PeerId,
    held: &[(PeerId, Vec<EnvelopeId>)],
    batch: &[usize],
    done: &mut RelayRepair,
) -> Result<(), WireError> {
    let by_mailbox: HashMap<PeerId, &[EnvelopeId]> = batch.iter().map(|&i| (held[i].0, held[i].1.as_slice())).collect();
    let digests = by_mailbox.iter().map(|(mailbox, ids)| MailboxDigest::of(*mailbox, ids)).collect();
    let differ = match call(replicas, relay, ReplicaRequest::Digests { mailboxes: digests }).await? {
        ReplicaResponse::Differ { mailboxes } => mailboxes,
        other => return Err(unexpected(&other)),
    };
    for mailbox in differ {
        // Only mailboxes it was asked about: a relay that names others gets nothing for them.
        let Some(ids) = by_mailbox.get(&mailbox) else { continue };
        let request = ReplicaRequest::Reconcile { mailbox, held: ids.to_vec() };
        let (wanted, delivered) = match call(replicas, relay, request).await? {
            ReplicaResponse::Reconciled { wanted, delivered } => (wanted, delivered),
            other => return Err(unexpected(&other)),
        };
        if !delivered.is_empty() {
            done.stale_deleted += u64::from(replicas.store.delete(mailbox, delivered).await.map_err(store_error)?);
        }
        if wanted.is_empty() {
            continue;
        }
        let envelopes = replicas.store.held_envelopes(&mailbox, &wanted).map_err(store_error)?;
        for envelopes in envelopes.chunks(MAX_ENVELOPES_PER_BATCH) {
            let sent = envelopes.len() as u64;
            match call(replicas, relay, ReplicaRequest::Store { envelopes: envelopes.to_vec() }).await {
                Ok(ReplicaResponse::Stored { duplicates }) => done.copied += sent - duplicates.len() as u64,
                // Its owner's mailbox is full there: the copies here stay until delivered.
                Err(e) if e.code == ErrorCode::QuotaExceeded => {
                    tracing::warn!(%relay, %mailbox, "repair: the mailbox is full on a replica");
                    break;
                }
                Ok(other) => return Err(unexpected(&other)),
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

async fn call(replicas: &Replicas, relay: PeerId, request: ReplicaRequest) -> Result<ReplicaResponse, WireError> {
    replicas.call_within(relay, &request, REPAIR_CALL_DEADLINE).await
}

fn store_error(e: crate::store::StoreError) -> WireError {
    WireError::new(crate::replica::store_error_code(&e), format!("this relay's store: {e}"))
}
