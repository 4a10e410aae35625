//! What a load phase records (one clock: nanoseconds since the benchmark started) and the
//! figures it reduces to.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the benchmark started; never 0, so 0 can mean "not yet".
pub(crate) fn now_ns() -> u64 {
    let epoch = *EPOCH.get_or_init(Instant::now);
    (epoch.elapsed().as_nanos() as u64).max(1)
}

/// Per-message timestamps, indexed by message number, shared by the sending and receiving tasks.
#[derive(Debug)]
pub(crate) struct Tracker {
    sent: Vec<AtomicU64>,
    received: Vec<AtomicU64>,
    /// When the sender learnt the message was durable (mesh: `Stored`); 0 where not tracked.
    acked: Vec<AtomicU64>,
    duplicates: AtomicU64,
    /// First receipts so far, over every phase.
    total_received: AtomicU64,
    /// Acknowledgements counted without a message number (MQTT PUBACKs carry packet ids only).
    bulk_acks: AtomicU64,
    last_bulk_ack: AtomicU64,
}

impl Tracker {
    pub(crate) fn new(messages: usize) -> Self {
        let zeros = || (0..messages).map(|_| AtomicU64::new(0)).collect();
        Tracker {
            sent: zeros(),
            received: zeros(),
            acked: zeros(),
            duplicates: AtomicU64::new(0),
            total_received: AtomicU64::new(0),
            bulk_acks: AtomicU64::new(0),
            last_bulk_ack: AtomicU64::new(0),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.sent.len()
    }

    pub(crate) fn sent(&self, i: usize, at: u64) {
        self.sent[i].store(at, Ordering::Relaxed);
    }

    /// Records a receipt; a message seen before counts as a duplicate. Returns false for numbers
    /// out of range (garbage) or duplicates.
    pub(crate) fn received(&self, i: usize, at: u64) -> bool {
        match self.received.get(i) {
            Some(slot) if slot.compare_exchange(0, at, Ordering::Relaxed, Ordering::Relaxed).is_ok() => {
                self.total_received.fetch_add(1, Ordering::Relaxed);
                true
            }
            Some(_) => {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
                false
            }
            None => false,
        }
    }

    pub(crate) fn acked(&self, i: usize, at: u64) {
        self.acked[i].store(at, Ordering::Relaxed);
    }

    pub(crate) fn bulk_ack(&self, at: u64) {
        self.bulk_acks.fetch_add(1, Ordering::Relaxed);
        self.last_bulk_ack.fetch_max(at, Ordering::Relaxed);
    }

    pub(crate) fn bulk_acks(&self) -> u64 {
        self.bulk_acks.load(Ordering::Relaxed)
    }

    pub(crate) fn total_received(&self) -> u64 {
        self.total_received.load(Ordering::Relaxed)
    }

    /// The figures of the messages in `range`, sent from `start` (ns) on.
    pub(crate) fn summarize(&self, range: std::ops::Range<usize>, start: u64, bulk_acks_before: u64) -> PhaseFigures {
        let load =
            |v: &[AtomicU64]| -> Vec<u64> { v[range.clone()].iter().map(|a| a.load(Ordering::Relaxed)).collect() };
        let (sent, received, acked) = (load(&self.sent), load(&self.received), load(&self.acked));
        let mut end = start;
        let mut acked_end = start;
        let mut latencies = Vec::with_capacity(range.len());
        let mut ack_latencies = Vec::new();
        for i in 0..range.len() {
            if received[i] != 0 && sent[i] != 0 {
                latencies.push(received[i].saturating_sub(sent[i]));
                end = end.max(received[i]);
            }
            if acked[i] != 0 && sent[i] != 0 {
                ack_latencies.push(acked[i].saturating_sub(sent[i]));
                end = end.max(acked[i]);
                acked_end = acked_end.max(acked[i]);
            }
        }
        let bulk_acks = self.bulk_acks().saturating_sub(bulk_acks_before);
        if bulk_acks > 0 {
            let last = self.last_bulk_ack.load(Ordering::Relaxed);
            end = end.max(last);
            acked_end = acked_end.max(last);
        }
        let acked_count = if ack_latencies.is_empty() { bulk_acks as usize } else { ack_latencies.len() };
        PhaseFigures {
            expected: range.len(),
            delivered: latencies.len(),
            acked: acked_count,
            start,
            elapsed: Duration::from_nanos(end - start),
            acked_elapsed: Duration::from_nanos(acked_end - start),
            latency: Percentiles::of(latencies),
            ack_latency: Percentiles::of(ack_latencies),
            duplicates: self.duplicates.load(Ordering::Relaxed),
        }
    }
}

/// Ticks at a fixed rate on an absolute schedule (tick `k` is due at `start + k / rate`), so a
/// late tick does not delay the ones after it; remembers how late the ticks ran.
///
/// Latency is measured from when a tick fires, not when it was due: tokio's timer fires on
/// millisecond boundaries, and that slop (up to 1 ms) would otherwise count against whichever
/// system is measured. A sender held back by its window still counts (the stamp is taken before
/// waiting for the window); a pacer starved of CPU shows in the lag figures.
#[derive(Debug)]
pub(crate) struct Pacer {
    start: tokio::time::Instant,
    interval: Duration,
    ticks: u32,
    lags: Vec<u64>,
}

impl Pacer {
    pub(crate) fn new(per_second: f64) -> Self {
        Pacer {
            start: tokio::time::Instant::now(),
            interval: Duration::from_secs_f64(1.0 / per_second),
            ticks: 0,
            lags: Vec::new(),
        }
    }

    /// Waits for the next tick; returns the time it fired on the [`now_ns`] clock.
    pub(crate) async fn tick(&mut self) -> u64 {
        let due = self.start + self.interval * self.ticks;
        tokio::time::sleep_until(due).await;
        self.lags.push((tokio::time::Instant::now() - due).as_nanos() as u64);
        self.ticks += 1;
        now_ns()
    }

    /// How late the ticks fired.
    pub(crate) fn lag(self) -> Option<Percentiles> {
        Percentiles::of(self.lags)
    }
}

/// Latency percentiles of one phase.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Percentiles {
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) p999: Duration,
    pub(crate) max: Duration,
}

impl Percentiles {
    pub(crate) fn of(mut ns: Vec<u64>) -> Option<Self> {
        if ns.is_empty() {
            return None;
        }
        ns.sort_unstable();
        let at = |q: f64| Duration::from_nanos(ns[((ns.len() as f64 * q).ceil() as usize).clamp(1, ns.len()) - 1]);
        Some(Percentiles { p50: at(0.50), p99: at(0.99), p999: at(0.999), max: at(1.0) })
    }
}

/// What one load phase measured.
#[derive(Debug, Clone)]
pub(crate) struct PhaseFigures {
    pub(crate) expected: usize,
    pub(crate) delivered: usize,
    /// Acknowledged to the sender as durable (mesh) or received by the broker (MQTT PUBACK).
    pub(crate) acked: usize,
    /// When the phase started ([`now_ns`] clock).
    pub(crate) start: u64,
    /// From the first send to the last receipt or acknowledgement.
    pub(crate) elapsed: Duration,
    /// From the first send to the last acknowledgement: the sender's view.
    pub(crate) acked_elapsed: Duration,
    /// Sender's send time → recipient's receipt.
    pub(crate) latency: Option<Percentiles>,
    /// Sender's send time → durable acknowledgement (mesh only).
    pub(crate) ack_latency: Option<Percentiles>,
    pub(crate) duplicates: u64,
}

impl PhaseFigures {
    /// Messages delivered (and acknowledged) per second.
    pub(crate) fn rate(&self) -> f64 {
        let done = self.delivered.min(self.acked) as f64;
        if self.elapsed.is_zero() { 0.0 } else { done / self.elapsed.as_secs_f64() }
    }

    /// Messages acknowledged to the sender per second (durably stored, for the mesh).
    pub(crate) fn acked_rate(&self) -> f64 {
        if self.acked_elapsed.is_zero() { 0.0 } else { self.acked as f64 / self.acked_elapsed.as_secs_f64() }
    }

    pub(crate) fn complete(&self) -> bool {
        self.delivered == self.expected && self.acked == self.expected
    }
}

/// `1.23 ms` / `456 µs`.
pub(crate) fn fmt_duration(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1_000.0 { format!("{us:.0} µs") } else { format!("{:.2} ms", us / 1_000.0) }
}

/// `12,345`.
pub(crate) fn fmt_count(n: f64) -> String {
    let s = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
