//! Provider records: which client nodes serve the chunks of which file (named by a key derived
//! from the file key, which relays never see: they cannot tie providers to stored chunks), announced by the nodes themselves (`Provide`) and handed to downloaders
//! (`FindProviders`) when no relay has a chunk. Soft state in memory, like Kademlia's provider
//! records: each lasts `PROVIDER_TTL_SECS` unless announced again, and a restarted relay
//! learns them again within one announcement period.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use meshgram_node::proto::RelayInfo;
use meshgram_node::proto::media::{ChunkHash, PROVIDER_TTL_SECS};

/// Providers kept per file: enough to spread a popular file's downloads, few enough that one
/// file's list stays small.
const MAX_PROVIDERS_PER_FILE: usize = 20;
/// Records kept in all (about 200 bytes each): a bound on what announcements can cost a relay.
const MAX_RECORDS: usize = 200_000;
/// Addresses per announcement, and the longest one accepted.
pub(crate) const MAX_PROVIDER_ADDRS: usize = 8;
pub(crate) const MAX_PROVIDER_ADDR_LEN: usize = 256;

#[derive(Debug)]
struct Provider {
    peer: PeerId,
    addrs: Vec<Multiaddr>,
    until: Instant,
}

/// The provider records this relay keeps.
#[derive(Debug, Default)]
pub(crate) struct Providers {
    by_file: HashMap<ChunkHash, Vec<Provider>>,
    records: usize,
}

impl Providers {
    /// `peer` serves `files` at `addrs` from now on. Returns how many files were recorded (a
    /// full table records no new files, though it renews the ones it has).
    pub(crate) fn provide(&mut self, peer: PeerId, files: &[ChunkHash], addrs: &[Multiaddr], now: Instant) -> usize {
        let until = now + Duration::from_secs(PROVIDER_TTL_SECS);
        let mut recorded = 0;
        for file in files {
            let providers = self.by_file.entry(*file).or_default();
            if let Some(known) = providers.iter_mut().find(|p| p.peer == peer) {
                known.addrs = addrs.to_vec();
                known.until = until;
                recorded += 1;
                continue;
            }
            if self.records >= MAX_RECORDS {
                if providers.is_empty() {
                    self.by_file.remove(file);
                }
                continue;
            }
            if providers.len() >= MAX_PROVIDERS_PER_FILE {
                // The one announced longest ago makes room.
                if let Some(oldest) = providers.iter().enumerate().min_by_key(|(_, p)| p.until).map(|(i, _)| i) {
                    providers.swap_remove(oldest);
                    self.records -= 1;
                }
            }
            providers.push(Provider { peer, addrs: addrs.to_vec(), until });
            self.records += 1;
            recorded += 1;
        }
        recorded
    }

    /// Who serves `file`, most recently announced first, `asking` left out.
    pub(crate) fn find(&self, file: &ChunkHash, asking: &PeerId, now: Instant) -> Vec<RelayInfo> {
        let mut live: Vec<&Provider> =
            self.by_file.get(file).into_iter().flatten().filter(|p| p.until > now && p.peer != *asking).collect();
        live.sort_by_key(|p| std::cmp::Reverse(p.until));
        live.into_iter().map(|p| RelayInfo { peer_id: p.peer, addrs: p.addrs.clone() }).collect()
    }

    /// Drops records past their time.
    pub(crate) fn expire(&mut self, now: Instant) {
        let mut dropped = 0;
        self.by_file.retain(|_, providers| {
            let before = providers.len();
            providers.retain(|p| p.until > now);
            dropped += before - providers.len();
            !providers.is_empty()
        });
        self.records -= dropped;
    }

    /// Records kept now.
    pub(crate) fn len(&self) -> usize {
        self.records
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_renew_expire_and_stay_bounded_per_file() {
        let (mut providers, now) = (Providers::default(), Instant::now());
        let file = ChunkHash::of(b"manifest");
        let (alice, bob) = (PeerId::random(), PeerId::random());
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().unwrap();
        assert_eq!(providers.provide(alice, &[file], std::slice::from_ref(&addr), now), 1);
        assert_eq!(providers.provide(alice, &[file], std::slice::from_ref(&addr), now), 1, "renewed, not doubled");
        assert_eq!(providers.len(), 1);
        assert_eq!(providers.find(&file, &bob, now), vec![RelayInfo { peer_id: alice, addrs: vec![addr.clone()] }]);
        assert!(providers.find(&file, &alice, now).is_empty(), "nobody is told about themselves");

        for _ in 0..MAX_PROVIDERS_PER_FILE + 5 {
            providers.provide(PeerId::random(), &[file], &[], now);
        }
        assert_eq!(providers.len(), MAX_PROVIDERS_PER_FILE);
        let later = now + Duration::from_secs(PROVIDER_TTL_SECS + 1);
        providers.expire(later);
        assert_eq!(providers.len(), 0);
        assert!(providers.find(&file, &bob, later).is_empty());
    }
}
