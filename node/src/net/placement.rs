//! Which relays hold a mailbox or a media chunk.
//!
//! The `R` relays responsible for a key are the `R` relays closest to it in Kademlia's key space
//! (SHA-256 of the id, XOR metric), the same rule Kademlia uses to place records. Two properties
//! make this the right rule for a relay mesh without a coordinator:
//!
//! - **Everyone agrees without talking.** The answer depends only on the key and the set of
//!   relays, so every relay (and every client) that knows the relay set computes the same
//!   replicas; a relay that does not know the whole set finds them with a Kademlia
//!   `get_closest_peers` lookup in O(log N) hops.
//! - **Membership changes move little.** A key's replicas change only when a relay joins or
//!   leaves among its `R` closest, so adding or removing one relay of `N` moves about `R/N` of the
//!   mailboxes, and only to or from that relay (consistent hashing, not `hash mod N`).
//!
//! Distances come from libp2p's [`KBucketKey::distance`], so the placement here is exactly what a
//! Kademlia lookup converges to. This module is pure: no I/O, no state.

use libp2p::{
    PeerId,
    kad::{KBucketDistance, KBucketKey},
};

use crate::proto::RelayInfo;
use crate::proto::media::{ChunkHash, FileId};

/// The key of a device's mailbox: the device's `PeerId` in Kademlia's key space.
///
/// The same key that `kad::Behaviour::get_closest_peers(device)` looks up.
pub fn mailbox_key(device: &PeerId) -> KBucketKey<PeerId> {
    KBucketKey::from(*device)
}

/// The key of a media chunk: its hash in Kademlia's key space (as a provider record's key).
pub fn chunk_key(hash: &ChunkHash) -> KBucketKey<[u8; 32]> {
    KBucketKey::new(hash.0)
}

/// The key of an upload's records: its file id in Kademlia's key space.
pub fn file_key(file: &FileId) -> KBucketKey<[u8; 16]> {
    KBucketKey::new(file.0)
}

/// The `r` relays closest to `key`, closest first; fewer if there are fewer distinct relays.
///
/// Duplicates in `relays` count once. The result does not depend on the order of `relays`.
pub fn closest_relays<T>(key: &KBucketKey<T>, relays: impl IntoIterator<Item = PeerId>, r: usize) -> Vec<PeerId> {
    closest_relay_keys(key, relays.into_iter().map(KBucketKey::from), r)
}

/// [`closest_relays`] for relays whose keys are already hashed.
///
/// A relay places every envelope and chunk against the same relay set; hashing the set once and
/// reusing the keys saves one SHA-256 per relay per placement.
pub fn closest_relay_keys<T, K>(key: &KBucketKey<T>, relays: impl IntoIterator<Item = K>, r: usize) -> Vec<PeerId>
where
    K: std::borrow::Borrow<KBucketKey<PeerId>>,
{
    if r == 0 {
        return Vec::new();
    }
    // The best `r` so far, sorted by distance. A linear pass with a small sorted buffer beats
    // sorting the whole set, since `r` (the replication factor) is tiny next to the relay count.
    let mut best: Vec<(KBucketDistance, PeerId)> = Vec::with_capacity(r + 1);
    for relay in relays {
        let relay = relay.borrow();
        let distance = key.distance(relay);
        if best.len() == r && best.last().is_some_and(|(worst, _)| distance >= *worst) {
            continue;
        }
        match best.binary_search_by(|(d, _)| d.cmp(&distance)) {
            // Equal distance means equal SHA-256, i.e. the same relay listed twice.
            Ok(_) => {}
            Err(at) => {
                best.insert(at, (distance, *relay.preimage()));
                best.truncate(r);
            }
        }
    }
    best.into_iter().map(|(_, relay)| relay).collect()
}

/// Every relay of `relays`, closest to `key` first (a relay listed twice, once).
pub fn by_closeness<T>(key: &KBucketKey<T>, relays: Vec<RelayInfo>) -> Vec<RelayInfo> {
    let order = closest_relays(key, relays.iter().map(|r| r.peer_id), relays.len());
    let mut by_id: std::collections::HashMap<PeerId, RelayInfo> = relays.into_iter().map(|r| (r.peer_id, r)).collect();
    order.into_iter().filter_map(|id| by_id.remove(&id)).collect()
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, seq::SliceRandom};

    use super::*;

    fn relays(n: usize) -> Vec<PeerId> {
        (0..n).map(|_| PeerId::random()).collect()
    }

    /// The definition, spelled out: sort everything by distance, drop repeats, take `r`.
    fn brute_force(key: &KBucketKey<PeerId>, relays: &[PeerId], r: usize) -> Vec<PeerId> {
        let mut all: Vec<PeerId> = relays.to_vec();
        all.sort_by_key(|relay| key.distance(&KBucketKey::from(*relay)));
        all.dedup();
        all.truncate(r);
        all
    }

    #[test]
    fn mailbox_key_is_kademlias_key_for_the_peer() {
        let device = PeerId::random();
        let key = mailbox_key(&device);
        assert_eq!(key, KBucketKey::from(device));
        assert_eq!(key.preimage(), &device);
        assert_eq!(key.distance(&KBucketKey::from(device)), KBucketDistance::default());
    }

    #[test]
    fn matches_brute_force_sort_by_distance() {
        let set = relays(50);
        for _ in 0..200 {
            let key = mailbox_key(&PeerId::random());
            for r in [1, 2, 3, 20, 50] {
                assert_eq!(closest_relays(&key, set.iter().copied(), r), brute_force(&key, &set, r), "r = {r}");
            }
        }
    }

    #[test]
    fn deterministic_and_independent_of_input_order() {
        let mut set = relays(100);
        let key = mailbox_key(&PeerId::random());
        let expected = closest_relays(&key, set.iter().copied(), 3);
        assert_eq!(closest_relays(&key, set.iter().copied(), 3), expected);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..20 {
            set.shuffle(&mut rng);
            assert_eq!(closest_relays(&key, set.iter().copied(), 3), expected);
        }
    }

    #[test]
    fn r_larger_than_the_set_returns_every_relay_closest_first() {
        let set = relays(5);
        let key = mailbox_key(&PeerId::random());
        let got = closest_relays(&key, set.iter().copied(), 10);
        assert_eq!(got.len(), 5);
        assert_eq!(got, brute_force(&key, &set, 5));
        let distances: Vec<_> = got.iter().map(|p| key.distance(&KBucketKey::from(*p))).collect();
        assert!(distances.is_sorted());
    }

    #[test]
    fn r_zero_and_empty_set_return_nothing() {
        let key = mailbox_key(&PeerId::random());
        assert!(closest_relays(&key, relays(10), 0).is_empty());
        assert!(closest_relays(&key, std::iter::empty(), 2).is_empty());
    }

    #[test]
    fn duplicates_count_once() {
        let set = relays(4);
        let key = mailbox_key(&PeerId::random());
        let repeated: Vec<PeerId> = set.iter().chain(&set).chain(&set).copied().collect();
        let got = closest_relays(&key, repeated.iter().copied(), 10);
        assert_eq!(got, brute_force(&key, &set, 10));
        assert_eq!(got.len(), 4);
        let only_one = vec![set[0]; 5];
        assert_eq!(closest_relays(&key, only_one, 2), vec![set[0]]);
    }

    #[test]
    fn the_key_itself_is_its_own_closest_relay() {
        let mut set = relays(30);
        let target = set[17];
        set.shuffle(&mut rand::thread_rng());
        assert_eq!(closest_relays(&mailbox_key(&target), set, 1), vec![target]);
    }

    #[test]
    fn prehashed_keys_give_the_same_answer() {
        let set = relays(40);
        let keys: Vec<KBucketKey<PeerId>> = set.iter().copied().map(KBucketKey::from).collect();
        let key = mailbox_key(&PeerId::random());
        assert_eq!(closest_relay_keys(&key, &keys, 2), closest_relays(&key, set, 2));
    }
}
