//! Which other relays this relay trusts and thinks alive: the one owner of that standing.
//!
//! A relay earns a place in mailbox placement by showing a gateway-signed relay certificate
//! when greeted (`verified`), and loses it for a while when a replica call to it fails
//! ([`RelayReport::Down`]) or it shows no valid certificate ([`RelayReport::NotARelay`]).
//! Separately, a relay that greeted *us* with a valid certificate may store and delete replicas
//! here until the certificate expires or its connection closes (`certified`). A relay whose
//! admission the gateway revoked ([`Relays::revoke`]) loses both, for good.
//!
//! Placement chooses from every verified relay that is not down, with the listen addresses its
//! identify gave, not only those in Kademlia's routing table: past a few dozen relays the far
//! k-buckets keep only k of the relays they cover, and the closest relays of most mailboxes
//! are then missing from it (docs/SIMULATION.md). When the table may be incomplete (a k-bucket
//! is full), placing a mailbox also starts a Kademlia lookup of its closest relays
//! ([`KnownRelays::mailbox_relays`]); the event loop dials the relays it finds, which identify
//! themselves, are greeted, and so join placement. A relay down for [`FORGET_AFTER`] is
//! forgotten until it identifies itself again.
//!
//! Kademlia's routing table holds only relays whose certificate checked out: the event loop
//! adds a relay to it when [`Relays::greeted`] says it is newly verified, with at most
//! [`MAX_ADDRS_PER_RELAY`] addresses, and takes it out when it shows no valid certificate, is
//! revoked or is forgotten ([`Relays::take_unrouted`]). Other relays' lookups are thus never
//! answered with peers that merely claimed to be relays.
//!
//! Tasks report on relays with a [`RelayReport`] sent through a [`Reporter`]; the event loop
//! hands each to [`Relays::report`]. Nothing else edits these sets.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::kad::{self, store::MemoryStore};
use libp2p::{Multiaddr, PeerId};
use meshgram_node::proto::RelayInfo;
use tokio::sync::mpsc;

use crate::placement::{by_closeness, mailbox_key};

/// A relay whose replica request failed is skipped in placement for this long.
const DOWN_FOR: Duration = Duration::from_secs(30);
/// A peer that showed no valid relay certificate is skipped in placement for this long.
const NOT_A_RELAY_FOR: Duration = Duration::from_secs(600);
/// A relay reported down again and again for this long is forgotten (no longer verified):
/// placement would otherwise keep trying a relay that is gone for good.
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// A mailbox's closest relays are looked up again after this long (or when the relays change).
const LOOKUP_FRESH_FOR: Duration = Duration::from_secs(600);
/// Lookups under way at most; beyond that, placement uses what it knows.
const MAX_LOOKUPS: usize = 64;
/// Reports queued from tasks to the event loop.
const REPORT_QUEUE: usize = 1024;
/// Listen addresses kept per relay (from its identify, which it fills as it likes): enough for
/// TCP and QUIC on IPv4 and IPv6 and a few more.
const MAX_ADDRS_PER_RELAY: usize = 8;

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
    /// Listen addresses relays gave in their identify.
    addrs: HashMap<PeerId, Vec<Multiaddr>>,
    /// Relays taken out of standing since the event loop last asked: to leave the routing table.
    unrouted: Vec<PeerId>,
    /// Since when a relay has been reported down without identifying itself in between.
    down_since: HashMap<PeerId, Instant>,
    /// Whether to look mailboxes' closest relays up with Kademlia (see the module).
    lookups: PlacementLookups,
    /// Mailboxes looked up lately, and when.
    looked_up: HashMap<PeerId, Instant>,
    /// Lookups under way, by query.
    looking_up: HashMap<kad::QueryId, PeerId>,
}

/// When placement looks a mailbox's closest relays up with Kademlia.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PlacementLookups {
    /// When the routing table may be incomplete (a k-bucket is full).
    #[default]
    WhenNeeded,
    /// Always (tests, so that the lookup path runs on a small mesh).
    Always,
}

impl Relays {
    pub(crate) fn new(local: PeerId, listen: Vec<Multiaddr>, lookups: PlacementLookups) -> Self {
        Relays {
            local: RelayInfo { peer_id: local, addrs: listen },
            down: HashMap::new(),
            not_relays: HashMap::new(),
            verified: HashSet::new(),
            greeting: HashSet::new(),
            certified: HashMap::new(),
            revoked: HashSet::new(),
            addrs: HashMap::new(),
            unrouted: Vec::new(),
            down_since: HashMap::new(),
            lookups,
            looked_up: HashMap::new(),
            looking_up: HashMap::new(),
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
                let now = Instant::now();
                self.down.insert(relay, now + DOWN_FOR);
                self.down_since.entry(relay).or_insert(now);
            }
            RelayReport::NotARelay => {
                tracing::warn!(peer = %relay, "a peer showed no valid relay certificate; it gets no replicas");
                self.not_relays.insert(relay, Instant::now() + NOT_A_RELAY_FOR);
                self.verified.remove(&relay);
                self.unrouted.push(relay);
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
    /// Keeps at most [`MAX_ADDRS_PER_RELAY`] distinct addresses.
    pub(crate) fn identified(&mut self, relay: PeerId, addrs: Vec<Multiaddr>) -> bool {
        self.down.remove(&relay);
        self.down_since.remove(&relay);
        let mut kept: Vec<Multiaddr> = Vec::with_capacity(addrs.len().min(MAX_ADDRS_PER_RELAY));
        for addr in addrs {
            if kept.len() == MAX_ADDRS_PER_RELAY {
                break;
            }
            if !kept.contains(&addr) {
                kept.push(addr);
            }
        }
        if !kept.is_empty() {
            self.addrs.insert(relay, kept);
        }
        let refused_lately = self.not_relays.get(&relay).is_some_and(|until| *until > Instant::now());
        !self.verified.contains(&relay)
            && !refused_lately
            && !self.revoked.contains(&relay)
            && self.greeting.insert(relay)
    }

    /// A greeting of `relay` ended: it showed a valid certificate (`Ok`), or failed, with what
    /// that failure says about it. Returns whether it is newly verified (and so joins the
    /// routing table).
    pub(crate) fn greeted(&mut self, relay: PeerId, outcome: Result<(), Option<RelayReport>>) -> bool {
        self.greeting.remove(&relay);
        match outcome {
            // Revoked while the greeting was under way: its certificate no longer counts.
            Ok(()) if self.revoked.contains(&relay) => false,
            Ok(()) => self.verified.insert(relay),
            Err(Some(report)) => {
                self.report(relay, report);
                false
            }
            Err(None) => false,
        }
    }

    /// The listen addresses `relay`'s identify gave (at most [`MAX_ADDRS_PER_RELAY`]).
    pub(crate) fn addrs(&self, relay: &PeerId) -> &[Multiaddr] {
        self.addrs.get(relay).map_or(&[], Vec::as_slice)
    }

    /// Relays that lost their standing since the last call: the event loop takes them out of
    /// the routing table.
    pub(crate) fn take_unrouted(&mut self) -> Vec<PeerId> {
        std::mem::take(&mut self.unrouted)
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
        self.unrouted.push(relay);
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
        let gone: Vec<PeerId> = self
            .down_since
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= FORGET_AFTER)
            .map(|(relay, _)| *relay)
            .collect();
        for relay in gone {
            tracing::info!(peer = %relay, "forgetting a relay that has been down for long");
            self.down_since.remove(&relay);
            self.verified.remove(&relay);
            self.addrs.remove(&relay);
            self.unrouted.push(relay);
        }
        self.looked_up.retain(|_, at| now.duration_since(*at) < LOOKUP_FRESH_FOR);
    }

    /// The relays changed: mailboxes are looked up afresh when next placed.
    pub(crate) fn membership_changed(&mut self) {
        self.looked_up.clear();
    }

    /// A lookup ended with these relays: those not yet known, to dial (so that they identify
    /// themselves and are greeted), with their addresses; `None` if it was not a placement
    /// lookup.
    pub(crate) fn looked_up(&mut self, query: kad::QueryId, found: Vec<kad::PeerInfo>) -> Option<Vec<kad::PeerInfo>> {
        self.looking_up.remove(&query)?;
        let unknown = found
            .into_iter()
            .filter(|p| {
                p.peer_id != self.local.peer_id
                    && !self.verified.contains(&p.peer_id)
                    && !self.revoked.contains(&p.peer_id)
                    && !self.greeting.contains(&p.peer_id)
            })
            .collect();
        Some(unknown)
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

    /// Every verified relay (ourselves included) with addresses, skipping those down recently.
    pub(crate) fn live_relays(&mut self) -> Vec<RelayInfo> {
        self.relays.forget_expired(Instant::now());
        let mut relays = vec![self.relays.local.clone()];
        let mut live: Vec<PeerId> = self.relays.verified.iter().filter(|r| self.relays.is_live(r)).copied().collect();
        live.sort_unstable();
        for peer_id in live {
            // Identify gives a relay's addresses before it is greeted; the routing table's
            // serve if it gave none.
            let addrs = match self.relays.addrs.get(&peer_id) {
                Some(addrs) => addrs.clone(),
                None => self
                    .kad
                    .kbucket(peer_id)
                    .and_then(|bucket| {
                        bucket
                            .iter()
                            .find(|e| *e.node.key.preimage() == peer_id)
                            .map(|e| e.node.value.iter().cloned().collect())
                    })
                    .unwrap_or_default(),
            };
            relays.push(RelayInfo { peer_id, addrs });
        }
        relays
    }

    /// Every live relay, closest to `device`'s mailbox first. Starts a lookup of its closest
    /// relays when the routing table may not hold them (see the module).
    pub(crate) fn mailbox_relays(&mut self, device: &PeerId) -> Vec<RelayInfo> {
        self.look_up_if_needed(device);
        by_closeness(&mailbox_key(device), self.live_relays())
    }

    /// Starts a lookup of `device`'s closest relays if the routing table may not hold them and
    /// none was made lately (see the module).
    pub(crate) fn look_up_if_needed(&mut self, device: &PeerId) {
        let relays = &mut *self.relays;
        let needed = match relays.lookups {
            PlacementLookups::Always => true,
            PlacementLookups::WhenNeeded => self.kad.kbuckets().any(|b| b.num_entries() >= kad::K_VALUE.get()),
        };
        if !needed || relays.looked_up.contains_key(device) || relays.looking_up.len() >= MAX_LOOKUPS {
            return;
        }
        relays.looked_up.insert(*device, Instant::now());
        let query = self.kad.get_closest_peers(*device);
        relays.looking_up.insert(query, *device);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_is_greeted_once_and_a_refusal_holds_until_it_expires() {
        let mut relays = Relays::new(PeerId::random(), Vec::new(), PlacementLookups::WhenNeeded);
        let other = PeerId::random();
        assert!(relays.identified(other, Vec::new()), "first sight: greet");
        assert!(!relays.identified(other, Vec::new()), "greeting under way");
        relays.greeted(other, Err(Some(RelayReport::NotARelay)));
        assert!(!relays.identified(other, Vec::new()), "refused lately");
        assert!(!relays.is_live(&other));

        let good = PeerId::random();
        assert!(relays.identified(good, Vec::new()));
        relays.greeted(good, Ok(()));
        assert!(!relays.identified(good, Vec::new()), "already verified");
        assert!(relays.is_live(&good));
        relays.report(good, RelayReport::Down);
        assert!(!relays.is_live(&good));
        relays.identified(good, Vec::new());
        assert!(relays.is_live(&good), "identify says it is up again");
    }

    #[test]
    fn a_revoked_relay_loses_placement_and_replica_access_for_good() {
        let mut relays = Relays::new(PeerId::random(), Vec::new(), PlacementLookups::WhenNeeded);
        let other = PeerId::random();
        assert!(relays.identified(other, Vec::new()));
        relays.greeted(other, Ok(()));
        relays.certified(other, 100);
        assert!(relays.is_live(&other) && relays.is_certified(&other, 10));

        assert!(relays.revoke(other), "it was live: placement changes");
        assert!(!relays.revoke(other), "once");
        assert!(!relays.is_live(&other), "no copies for it");
        assert!(!relays.is_certified(&other, 10), "its replica requests are refused");
        assert!(!relays.identified(other, Vec::new()), "never greeted again");
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
    fn a_relay_down_for_long_is_forgotten_until_it_identifies_again() {
        let mut relays = Relays::new(PeerId::random(), Vec::new(), PlacementLookups::WhenNeeded);
        let gone = PeerId::random();
        relays.identified(gone, Vec::new());
        relays.greeted(gone, Ok(()));
        relays.report(gone, RelayReport::Down);
        relays.forget_expired(Instant::now());
        assert!(relays.is_verified(&gone), "down a while: still known");
        relays.forget_expired(Instant::now() + FORGET_AFTER);
        assert!(!relays.is_verified(&gone), "down for long: forgotten");
        assert!(relays.identified(gone, Vec::new()), "back: greeted again");
    }

    #[test]
    fn certified_until_expiry_or_disconnect() {
        let mut relays = Relays::new(PeerId::random(), Vec::new(), PlacementLookups::WhenNeeded);
        let other = PeerId::random();
        assert!(!relays.is_certified(&other, 10));
        relays.certified(other, 100);
        assert!(relays.is_certified(&other, 100));
        assert!(!relays.is_certified(&other, 101));
        relays.disconnected(&other);
        assert!(!relays.is_certified(&other, 10));
    }

    #[test]
    fn only_verified_relays_are_routed_and_with_few_addresses() {
        let mut relays = Relays::new(PeerId::random(), Vec::new(), PlacementLookups::WhenNeeded);
        let claimer = PeerId::random();
        let many: Vec<Multiaddr> =
            (0..1000u16).map(|port| format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap()).collect();
        assert!(relays.identified(claimer, many.iter().chain(&many).cloned().collect()));
        assert_eq!(relays.addrs(&claimer), &many[..MAX_ADDRS_PER_RELAY], "distinct, and a few");
        assert!(!relays.greeted(claimer, Err(Some(RelayReport::NotARelay))), "refused: not routed");
        assert_eq!(relays.take_unrouted(), [claimer], "and taken out if it was (a bootstrap address)");

        let relay = PeerId::random();
        relays.identified(relay, Vec::new());
        assert!(relays.greeted(relay, Ok(())), "verified: routed");
        assert!(relays.take_unrouted().is_empty());
        relays.revoke(relay);
        assert_eq!(relays.take_unrouted(), [relay], "revoked: out");

        let gone = PeerId::random();
        relays.identified(gone, Vec::new());
        relays.greeted(gone, Ok(()));
        relays.report(gone, RelayReport::Down);
        relays.forget_expired(Instant::now());
        assert!(relays.take_unrouted().is_empty(), "down a while: still routed");
        relays.forget_expired(Instant::now() + FORGET_AFTER);
        assert_eq!(relays.take_unrouted(), [gone], "forgotten: out");
    }
}
