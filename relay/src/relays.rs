//! Which other relays this relay trusts and thinks alive: the one owner of that standing.
//!
//! A relay earns a place in mailbox placement by showing a gateway-signed relay certificate
//! when greeted (`verified`), and loses it for a while when a replica call to it fails
//! ([`RelayReport::Down`]) or it shows no valid certificate ([`RelayReport::NotARelay`]).
//! Separately, a relay that greeted *us* with a valid certificate may store and delete replicas
//! here until the certificate expires or its connection closes (`certified`). A relay whose
//! admission the gateway revoked ([`Relays::revoke`]) loses both, for good.
//!
//! Tasks report on relays with a [`RelayReport`] sent through a [`Reporter`]; the event loop
//! hands each to [`Relays::report`]. Nothing else edits these sets.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::kad::{self, store::MemoryStore};
use libp2p::{Multiaddr, PeerId};
use meshgram_node::proto::RelayInfo;
use tokio::sync::mpsc;

use crate::placement::{closest_relays, mailbox_key};

/// A relay whose replica request failed is skipped in placement for this long.
const DOWN_FOR: Duration = Duration::from_secs(30);
/// A peer that showed no valid relay certificate is skipped in placement for this long.
const NOT_A_RELAY_FOR: Duration = Duration::from_secs(600);
/// Reports queued from tasks to the event loop.
const REPORT_QUEUE: usize = 1024;

/// What a task found out about another relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RelayReport {
    /// It did not answer a replica request: leave it out of placement for a while.
    Down,
    /// It speaks the replica protocol but showed no valid relay certificate: leave it out of
    /// placement (until its identify says it is a relay again after a while).
    NotARelay,
}

/// Where tasks send their [`RelayReport`]s; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Reporter(mpsc::Sender<(PeerId, RelayReport)>);

impl Reporter {
    /// Tells the event loop about `relay` (waits if its queue is full).
    pub(crate) async fn report(&self, relay: PeerId, report: RelayReport) {
        let _ = self.0.send((relay, report)).await;
    }
}

/// The event loop's side of the [`Reporter`]s.
pub(crate) type Reports = mpsc::Receiver<(PeerId, RelayReport)>;

/// A reporter and the receiver of its reports.
pub(crate) fn reports() -> (Reporter, Reports) {
    let (tx, rx) = mpsc::channel(REPORT_QUEUE);
    (Reporter(tx), rx)
}

/// This relay's standing of the other relays.
#[derive(Debug)]
pub(crate) struct Relays {
    /// This relay, as placement lists it.
    local: RelayInfo,
    /// Relays that failed recently, until when.
    down: HashMap<PeerId, Instant>,
    /// Peers that failed to show a relay certificate, until when they are asked again.
    not_relays: HashMap<PeerId, Instant>,
    /// Relays in the routing table whose certificate this relay checked: only they are given
    /// mailboxes (and named to clients), so an uncertified peer that joins Kademlia gets
    /// nothing to keep.
    verified: HashSet<PeerId>,
    /// Greetings under way.
    greeting: HashSet<PeerId>,
    /// Relays that showed a valid certificate on a live connection, until it expires (unix s).
    certified: HashMap<PeerId, u64>,
    /// Relays whose admission the gateway revoked: never verified or certified again.
    revoked: HashSet<PeerId>,
}

impl Relays {
    pub(crate) fn new(local: PeerId, listen: Vec<Multiaddr>) -> Self {
        Relays {
            local: RelayInfo { peer_id: local, addrs: listen },
            down: HashMap::new(),
            not_relays: HashMap::new(),
            verified: HashSet::new(),
            greeting: HashSet::new(),
            certified: HashMap::new(),
            revoked: HashSet::new(),
        }
    }

    /// This relay's peer id.
    pub(crate) fn local(&self) -> PeerId {
        self.local.peer_id
    }

    /// Takes a task's report on `relay`.
    pub(crate) fn report(&mut self, relay: PeerId, report: RelayReport) {
        match report {
            RelayReport::Down => {
                tracing::warn!(peer = %relay, "a relay did not answer; skipping it in placement for a while");
                self.down.insert(relay, Instant::now() + DOWN_FOR);
            }
            RelayReport::NotARelay => {
                tracing::warn!(peer = %relay, "a peer showed no valid relay certificate; it gets no replicas");
                self.not_relays.insert(relay, Instant::now() + NOT_A_RELAY_FOR);
            }
        }
    }

    /// Whether `relay` showed a valid relay certificate when greeted.
    pub(crate) fn is_verified(&self, relay: &PeerId) -> bool {
        self.verified.contains(relay)
    }

    /// Certified relays reported down lately: dialled now and then, so that one that is back
    /// is seen (and identified) again before its time out of placement is over.
    pub(crate) fn down_verified(&self) -> Vec<PeerId> {
        self.down.keys().filter(|relay| self.verified.contains(relay)).copied().collect()
    }

    /// Whether `relay` was reported down lately (it is left out of placement).
    pub(crate) fn is_down(&self, relay: &PeerId) -> bool {
        self.down.contains_key(relay)
    }

    /// `relay` identified itself as a relay, so it is up. Returns whether to greet it now (its
    /// certificate is not checked yet, no greeting is under way, and it did not recently fail
    /// to show one); if so, the greeting counts as under way until [`Relays::greeted`].
    pub(crate) fn identified(&mut self, relay: PeerId) -> bool {
        self.down.remove(&relay);
        let refused_lately = self.not_relays.get(&relay).is_some_and(|until| *until > Instant::now());
        !self.verified.contains(&relay)
            && !refused_lately
            && !self.revoked.contains(&relay)
            && self.greeting.insert(relay)
    }

    /// A greeting of `relay` ended: it showed a valid certificate (`Ok`), or failed, with what
    /// that failure says about it.
    pub(crate) fn greeted(&mut self, relay: PeerId, outcome: Result<(), Option<RelayReport>>) {
        self.greeting.remove(&relay);
        match outcome {
            // Revoked while the greeting was under way: its certificate no longer counts.
            Ok(()) if self.revoked.contains(&relay) => {}
            Ok(()) => {
                self.verified.insert(relay);
            }
            Err(Some(report)) => self.report(relay, report),
            Err(None) => {}
        }
    }

    /// How many other relays showed a valid certificate when greeted.
    pub(crate) fn verified_count(&self) -> usize {
        self.verified.len()
    }

    /// `relay` greeted us with a certificate valid until `until` (unix s, skew included).
    pub(crate) fn certified(&mut self, relay: PeerId, until: u64) {
        if !self.revoked.contains(&relay) {
            self.certified.insert(relay, until);
        }
    }

    /// The gateway revoked `relay`'s admission: it gets no more copies (placement, and the
    /// relay lists clients are given, leave it out) and its replica requests are refused.
    /// Returns whether that is news (the live relays changed).
    pub(crate) fn revoke(&mut self, relay: PeerId) -> bool {
        self.certified.remove(&relay);
        self.greeting.remove(&relay);
        let was_live = self.verified.remove(&relay);
        if self.revoked.insert(relay) {
            tracing::warn!(peer = %relay, "the gateway revoked this relay's admission; it gets no more copies");
        }
        was_live
    }

    /// Whether the gateway revoked `relay`'s admission.
    pub(crate) fn is_revoked(&self, relay: &PeerId) -> bool {
        self.revoked.contains(relay)
    }

    /// How many relays' admissions the gateway revoked.
    pub(crate) fn revoked_count(&self) -> usize {
        self.revoked.len()
    }

    /// Whether `relay` showed a certificate still valid at `now` (unix s) on a live connection.
    pub(crate) fn is_certified(&self, relay: &PeerId, now: u64) -> bool {
        self.certified.get(relay).is_some_and(|until| now <= *until)
    }

    /// `relay`'s last connection closed: it has to greet again.
    pub(crate) fn disconnected(&mut self, relay: &PeerId) {
        self.certified.remove(relay);
    }

    /// The relays placement may choose from, as seen through `kad`'s routing table.
    pub(crate) fn known<'a>(&'a mut self, kad: &'a mut kad::Behaviour<MemoryStore>) -> KnownRelays<'a> {
        KnownRelays { relays: self, kad }
    }

    /// Whether `relay` may be given mailboxes (after [`Relays::forget_expired`]).
    fn is_live(&self, relay: &PeerId) -> bool {
        self.verified.contains(relay) && !self.down.contains_key(relay) && !self.not_relays.contains_key(relay)
    }

    fn forget_expired(&mut self, now: Instant) {
        self.down.retain(|_, until| *until > now);
        self.not_relays.retain(|_, until| *until > now);
    }
}

/// The relays placement may choose from: the routing table, filtered by their standing.
pub(crate) struct KnownRelays<'a> {
    relays: &'a mut Relays,
    kad: &'a mut kad::Behaviour<MemoryStore>,
}

impl KnownRelays<'_> {
    /// This relay's peer id.
    pub(crate) fn local(&self) -> PeerId {
        self.relays.local()
    }

    /// Every relay we know (ourselves included) with addresses, skipping those down recently.
    pub(crate) fn live_relays(&mut self) -> Vec<RelayInfo> {
        self.relays.forget_expired(Instant::now());
        let mut relays = vec![self.relays.local.clone()];
        for bucket in self.kad.kbuckets() {
            for entry in bucket.iter() {
                let peer_id = *entry.node.key.preimage();
                if self.relays.is_live(&peer_id) {
                    relays.push(RelayInfo { peer_id, addrs: entry.node.value.iter().cloned().collect() });
                }
            }
        }
        relays
    }

    /// Every live relay, closest to `device`'s mailbox first.
    pub(crate) fn mailbox_relays(&mut self, device: &PeerId) -> Vec<RelayInfo> {
        let relays = self.live_relays();
        let order = closest_relays(&mailbox_key(device), relays.iter().map(|r| r.peer_id), relays.len());
        let mut by_id: HashMap<PeerId, RelayInfo> = relays.into_iter().map(|r| (r.peer_id, r)).collect();
        order.into_iter().filter_map(|id| by_id.remove(&id)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_is_greeted_once_and_a_refusal_holds_until_it_expires() {
        let mut relays = Relays::new(PeerId::random(), Vec::new());
        let other = PeerId::random();
        assert!(relays.identified(other), "first sight: greet");
        assert!(!relays.identified(other), "greeting under way");
        relays.greeted(other, Err(Some(RelayReport::NotARelay)));
        assert!(!relays.identified(other), "refused lately");
        assert!(!relays.is_live(&other));

        let good = PeerId::random();
        assert!(relays.identified(good));
        relays.greeted(good, Ok(()));
        assert!(!relays.identified(good), "already verified");
        assert!(relays.is_live(&good));
        relays.report(good, RelayReport::Down);
        assert!(!relays.is_live(&good));
        relays.identified(good);
        assert!(relays.is_live(&good), "identify says it is up again");
    }

    #[test]
    fn a_revoked_relay_loses_placement_and_replica_access_for_good() {
        let mut relays = Relays::new(PeerId::random(), Vec::new());
        let other = PeerId::random();
        assert!(relays.identified(other));
        relays.greeted(other, Ok(()));
        relays.certified(other, 100);
        assert!(relays.is_live(&other) && relays.is_certified(&other, 10));

        assert!(relays.revoke(other), "it was live: placement changes");
        assert!(!relays.revoke(other), "once");
        assert!(!relays.is_live(&other), "no copies for it");
        assert!(!relays.is_certified(&other, 10), "its replica requests are refused");
        assert!(!relays.identified(other), "never greeted again");
        relays.greeted(other, Ok(()));
        relays.certified(other, 100);
        assert!(
            !relays.is_live(&other) && !relays.is_certified(&other, 10),
            "a later certificate check does not undo it"
        );
        assert!(relays.is_revoked(&other));
        assert_eq!(relays.revoked_count(), 1);
    }

    #[test]
    fn certified_until_expiry_or_disconnect() {
        let mut relays = Relays::new(PeerId::random(), Vec::new());
        let other = PeerId::random();
        assert!(!relays.is_certified(&other, 10));
        relays.certified(other, 100);
        assert!(relays.is_certified(&other, 100));
        assert!(!relays.is_certified(&other, 101));
        relays.disconnected(&other);
        assert!(!relays.is_certified(&other, 10));
    }
}
