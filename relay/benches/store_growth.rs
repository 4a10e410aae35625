//! The relay's store as it grows (issue 18, item 3): put, fetch and delete latency, and the
//! process CPU each costs, with an empty store and with 1,000,000 envelopes held across
//! 100,000 mailboxes; and how long opening that store takes (a restart), in one run.
//!
//! ```text
//! cargo bench -p meshgram-relay --bench store_growth [-- --envelopes N --mailboxes M --samples S]
//! ```
//! The store is the relay's own (`meshgram_relay::store`, redb and its write-ahead log) in a
//! temp dir on this machine's disk. Each sample puts one envelope into a mailbox (a synced
//! log append, as a `Send` is), reads that mailbox and deletes the envelope, timing each.

use std::path::Path;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use meshgram_node::ids::UserId;
use meshgram_node::proto::envelope::{Envelope, EnvelopeId};
use meshgram_relay::store::{Quota, StoreHandle, StoreLimits};

/// Envelopes per put while filling (the protocol's batch limit).
const FILL_BATCH: usize = 256;
/// Sealed bytes per envelope: a short text message.
const SEALED_BYTES: usize = 256;

struct Args {
    envelopes: usize,
    mailboxes: usize,
    samples: usize,
}

fn args() -> Args {
    let mut args = Args { envelopes: 1_000_000, mailboxes: 100_000, samples: 500 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().and_then(|v| v.replace('_', "").parse().ok()).expect("a number after the flag");
        match flag.as_str() {
            "--envelopes" => args.envelopes = value(),
            "--mailboxes" => args.mailboxes = value(),
            "--samples" => args.samples = value(),
            _ => {} // `--bench`, passed by cargo
        }
    }
    args
}

fn envelope(to: PeerId, from: u64) -> Envelope {
    Envelope {
        id: EnvelopeId::random(),
        from_user: UserId(from),
        from_device: PeerId::random(),
        to_user: UserId(2),
        to_device: to,
        sent_at_ms: 0,
        seq: 0,
        sealed: vec![0xab; SEALED_BYTES],
    }
}

fn open(path: &Path) -> StoreHandle {
    let limits = StoreLimits { ttl: Duration::from_secs(7 * 24 * 3600), quota: Quota::UNLIMITED };
    // A store just dropped may hold its file for a moment while its thread ends.
    for _ in 0..100 {
        if let Ok(store) = StoreHandle::open(path, limits) {
            return store;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the store at {} does not open", path.display())
}

/// This process's CPU time so far (user + system), from `/proc/self/stat` (10 ms ticks).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // After the comm field: state is 0, utime 11, stime 12.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Latencies of one operation, and the CPU the samples took in all.
#[derive(Default)]
struct Timed {
    took: Vec<Duration>,
}

impl Timed {
    fn pct(&self, p: f64) -> Duration {
        let mut sorted = self.took.clone();
        sorted.sort();
        sorted.get(((sorted.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or_default()
    }
}

struct Sample {
    put: Timed,
    fetch: Timed,
    delete: Timed,
    cpu_per_round: Duration,
}

/// Puts one envelope into each of `targets` in turn, reads that mailbox, deletes it.
async fn sample(store: &StoreHandle, targets: &[PeerId]) -> Sample {
    let (mut put, mut fetch, mut delete) = (Timed::default(), Timed::default(), Timed::default());
    let cpu = cpu_time();
    for (i, mailbox) in targets.iter().enumerate() {
        let e = envelope(*mailbox, 1_000_000 + i as u64);
        let id = e.id;
        let t = Instant::now();
        store.put(vec![e], 0, None).await.expect("put");
        put.took.push(t.elapsed());
        let t = Instant::now();
        let (held, _) = store.fetch(*mailbox, 256).expect("fetch");
        fetch.took.push(t.elapsed());
        assert!(held.iter().any(|e| e.id == id), "the envelope just put is read back");
        let t = Instant::now();
        store.delete(*mailbox, vec![id]).await.expect("delete");
        delete.took.push(t.elapsed());
    }
    let cpu_per_round = (cpu_time().saturating_sub(cpu)) / targets.len().max(1) as u32;
    Sample { put, fetch, delete, cpu_per_round }
}

fn main() {
    let args = args();
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("relay.redb");
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async {
        let store = open(&path);
        let fresh: Vec<PeerId> = (0..args.samples).map(|_| PeerId::random()).collect();
        let empty = sample(&store, &fresh).await;

        println!("filling: {} envelopes across {} mailboxes ...", args.envelopes, args.mailboxes);
        let mailboxes: Vec<PeerId> = (0..args.mailboxes).map(|_| PeerId::random()).collect();
        let started = Instant::now();
        let mut n = 0;
        while n < args.envelopes {
            let batch: Vec<Envelope> = (n..(n + FILL_BATCH).min(args.envelopes))
                .map(|i| envelope(mailboxes[i % mailboxes.len()], (i % 1000) as u64 + 1))
                .collect();
            n += batch.len();
            store.put(batch, 0, None).await.expect("fill");
        }
        let filled_in = started.elapsed();
        let held: Vec<PeerId> = (0..args.samples).map(|i| mailboxes[(i * 7919) % mailboxes.len()]).collect();
        let full = sample(&store, &held).await;
        let (_, stored) = store.counts().expect("counts");
        drop(store);

        let started = Instant::now();
        let reopened = open(&path);
        let opened_in = started.elapsed();
        let started = Instant::now();
        let (first, _) = reopened.fetch(held[0], 256).expect("a fetch after reopening");
        let first_fetch = started.elapsed();
        assert!(!first.is_empty(), "the mailbox still holds its envelopes after reopening");
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);

        println!();
        println!("store with {stored} envelopes ({} MiB on disk), filled in {filled_in:.1?}", size >> 20);
        println!("{:<44}{:>14}{:>14}{:>10}", "what", "empty", "full", "ratio");
        let row = |what: &str, a: Duration, b: Duration| {
            let ratio = b.as_secs_f64() / a.as_secs_f64().max(1e-9);
            println!("{what:<44}{:>14}{:>14}{:>9.2}x", format!("{a:.1?}"), format!("{b:.1?}"), ratio);
        };
        for (what, e, f) in [
            ("put 1 envelope", &empty.put, &full.put),
            ("fetch a mailbox", &empty.fetch, &full.fetch),
            ("delete 1 envelope", &empty.delete, &full.delete),
        ] {
            row(&format!("{what} p50"), e.pct(0.5), f.pct(0.5));
            row(&format!("{what} p99"), e.pct(0.99), f.pct(0.99));
        }
        row("process CPU per put + fetch + delete", empty.cpu_per_round, full.cpu_per_round);
        println!("{:<44}{:>14}", "open the full store (a restart)", format!("{opened_in:.1?}"));
        println!("{:<44}{:>14}", "first fetch after it", format!("{first_fetch:.1?}"));
    });
}
