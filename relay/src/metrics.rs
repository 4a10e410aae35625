//! Prometheus metrics served at `/metrics` (OpenMetrics text). Every one is listed, with what it
//! means to an operator, in docs/relay.md; a test checks that the two agree.

use std::time::Duration;

use meshgram_node::net::memory::MemoryBudget;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Metric, Registry};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    protocol: &'static str,
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabels {
    /// `session` (a client's) or `relay` (another relay's).
    cert: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartLabel {
    part: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabel {
    protocol: &'static str,
}

/// A certificate this relay checked.
#[derive(Debug, Clone, Copy)]
pub(crate) enum CertKind {
    Session,
    Relay,
}

/// What a relay keeps on disk, for `disk_bytes{part}`.
#[derive(Debug, Clone, Copy, Default)]
pub struct DiskUse {
    pub mailbox_store: u64,
    pub mailbox_log: u64,
    pub media_index: u64,
    pub push_registrations: u64,
}

/// Request latency buckets, in seconds: 0.25 ms to about 33 s, doubling. Long-polls (a
/// `fetch` or `group_fetch` that waits for something to arrive) land in the top buckets.
fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.000_25, 2.0, 18)
}

/// The relay's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<KindLabel, Counter>,
    errors: Family<CodeLabel, Counter>,
    request_duration: Family<RequestLabels, Histogram>,
    replica_copies: Family<OutcomeLabel, Counter>,
    certificate_checks: Family<CertLabels, Counter>,
    disk_bytes: Family<PartLabel, Gauge>,
    pipe_memory: Family<ProtocolLabel, Gauge>,
    /// What `pipe_memory_bytes` reads at each scrape: each client protocol's pipe budget.
    pipe_budgets: std::sync::Mutex<Vec<(&'static str, std::sync::Arc<MemoryBudget>)>>,
    /// Envelopes accepted from clients for replication.
    pub envelopes_received: Counter,
    /// Devices named by sends and replica stores that the gateway says do not exist (their
    /// envelopes were dropped or refused).
    pub mailboxes_missing: Counter,
    /// Connections opened (clients and relays).
    pub connections: Counter,
    /// Peers connected now: other relays (their certificate checked) and the rest (clients).
    pub connected_relays: Gauge,
    pub connected_clients: Gauge,
    /// Relays in the Kademlia routing table.
    pub routing_table_peers: Gauge,
    /// Mailboxes with envelopes waiting here, and those envelopes (as of the last scrape).
    pub mailboxes_stored: Gauge,
    pub envelopes_stored: Gauge,
    /// Other relays whose certificate this relay checked: those it may store copies on.
    pub relays_verified: Gauge,
    /// 1 once a store write failed: the relay then takes no writes (see `/healthz`).
    pub store_failed: Gauge,
    /// Sends, uploads and posts answered `UNAVAILABLE` because fewer than `R` durable copies
    /// could be made: nothing was acknowledged, and the client sends again.
    pub replication_unavailable: Counter,
    /// Requests refused because their sender went over its rate.
    pub rate_limited: Counter,
    /// Session revocations from the gateway taken in.
    pub sessions_revoked: Counter,
    /// Relays whose admission the gateway revoked.
    pub relays_revoked: Gauge,
    /// Polls of the gateway for revocations that failed (retried at the next tick).
    pub gateway_polls_failed: Counter,
    /// Kademlia lookups of a mailbox's closest relays finished (`relays`).
    pub placement_lookups: Counter,
    /// Repair rounds finished (`repair`), and how long the last one took.
    pub repair_rounds: Counter,
    pub repair_last_round_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Mailboxes the round under way (or the last one) has yet to compare with a responsible
    /// relay; what a round could not finish stays here until the next one.
    pub repair_backlog: Gauge,
    /// Envelopes repair copied to responsible relays that lacked them.
    pub repair_copied: Counter,
    /// Stale copies repair deleted here because a replica had delivered them.
    pub repair_stale_deleted: Counter,
    media_requests: Family<KindLabel, Counter>,
    media_refusals: Family<CodeLabel, Counter>,
    /// Parts acknowledged to clients (`PartSaved`) by this relay.
    pub media_parts_saved: Counter,
    /// Chunks written to this relay's disk (duplicates not counted), and their bytes.
    pub chunks_stored: Counter,
    pub chunk_bytes_stored: Counter,
    /// Bytes of the chunks held here, as of the last repair round.
    pub chunk_bytes_held: Gauge,
    pub media_provider_records: Gauge,
    pub media_uploads_expired: Counter,
    pub chunks_deleted: Counter,
    /// Chunks repair copied to responsible relays that lacked them.
    pub chunk_repair_copies: Counter,
    /// Part records repair copied to responsible relays that lacked them.
    pub part_record_repair_copies: Counter,
    /// Groups this relay mirrors for its readers (`mirror`), and its reads of their relays
    /// that failed (tried again).
    pub groups_mirrored: Gauge,
    pub mirror_reads_failed: Counter,
    /// Devices with a push endpoint registered here, and the wake-ups sent to them (`push`):
    /// delivered, given up, folded into one already sent or queued, and endpoints dropped
    /// because the push service said they are gone.
    pub push_registrations: Gauge,
    pub push_wakeups_sent: Counter,
    pub push_wakeups_failed: Counter,
    pub push_wakeups_coalesced: Counter,
    pub push_endpoints_dropped: Counter,
}

/// Registers `metric` under `name` and hands it back (metrics are shared handles).
fn register<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("meshgram_relay");
        let info = Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]);
        r.register("build", "The relay's version", info);
        let histograms =
            Family::<RequestLabels, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()) as Histogram);
        let metrics = Metrics {
            requests: register(&mut r, "requests", "Mailbox requests by kind", Family::default()),
            errors: register(&mut r, "errors", "Mailbox requests refused, by error code", Family::default()),
            request_duration: register(
                &mut r,
                "request_duration_seconds",
                "Time from a request's arrival to its answer's write, by protocol and kind (long-polls include their wait)",
                histograms,
            ),
            replica_copies: register(
                &mut r,
                "replica_copies",
                "Copies of envelopes, chunks and part records made for a sender, by outcome (written, failed)",
                Family::default(),
            ),
            certificate_checks: register(
                &mut r,
                "certificate_checks",
                "Certificates checked, by kind (session, relay) and outcome (passed, refused)",
                Family::default(),
            ),
            disk_bytes: register(
                &mut r,
                "disk_bytes",
                "Bytes on disk, by part (mailbox_store, mailbox_log, media_index, push_registrations; chunks: chunk_bytes_held)",
                Family::default(),
            ),
            pipe_memory: register(
                &mut r,
                "pipe_memory_bytes",
                "Bytes held by pipes, by protocol (mailbox, media, replica): requests being read or handled, answers not yet written",
                Family::default(),
            ),
            pipe_budgets: std::sync::Mutex::default(),
            envelopes_received: register(
                &mut r,
                "envelopes_received",
                "Envelopes accepted from clients",
                Counter::default(),
            ),
            mailboxes_missing: register(
                &mut r,
                "mailboxes_missing",
                "Devices named by sends or replica stores that have no session at the gateway (their envelopes not kept)",
                Counter::default(),
            ),
            connections: register(&mut r, "connections", "Connections opened", Counter::default()),
            connected_relays: register(&mut r, "connected_relays", "Certified relays connected now", Gauge::default()),
            connected_clients: register(
                &mut r,
                "connected_clients",
                "Other peers (clients) connected now",
                Gauge::default(),
            ),
            routing_table_peers: register(
                &mut r,
                "routing_table_peers",
                "Relays in the Kademlia routing table",
                Gauge::default(),
            ),
            mailboxes_stored: register(
                &mut r,
                "mailboxes_stored",
                "Mailboxes with envelopes waiting here",
                Gauge::default(),
            ),
            envelopes_stored: register(&mut r, "envelopes_stored", "Envelopes waiting here", Gauge::default()),
            relays_verified: register(
                &mut r,
                "relays_verified",
                "Other relays whose certificate this relay checked",
                Gauge::default(),
            ),
            store_failed: register(
                &mut r,
                "store_failed",
                "1 once a store write failed and the relay takes no writes",
                Gauge::default(),
            ),
            replication_unavailable: register(
                &mut r,
                "replication_unavailable",
                "Requests answered UNAVAILABLE for want of R durable copies (nothing acknowledged)",
                Counter::default(),
            ),
            rate_limited: register(
                &mut r,
                "rate_limited",
                "Requests refused over their sender's rate",
                Counter::default(),
            ),
            sessions_revoked: register(
                &mut r,
                "sessions_revoked",
                "Session revocations from the gateway taken in",
                Counter::default(),
            ),
            relays_revoked: register(
                &mut r,
                "relays_revoked",
                "Relays whose admission the gateway revoked",
                Gauge::default(),
            ),
            gateway_polls_failed: register(
                &mut r,
                "gateway_polls_failed",
                "Polls of the gateway for revocations that failed (retried)",
                Counter::default(),
            ),
            placement_lookups: register(
                &mut r,
                "placement_lookups",
                "Kademlia lookups of a mailbox's closest relays finished",
                Counter::default(),
            ),
            repair_rounds: register(&mut r, "repair_rounds", "Repair rounds finished", Counter::default()),
            repair_last_round_seconds: register(
                &mut r,
                "repair_last_round_seconds",
                "How long the last repair round took",
                Gauge::default(),
            ),
            repair_backlog: register(
                &mut r,
                "repair_backlog",
                "Mailboxes repair has yet to compare with a responsible relay",
                Gauge::default(),
            ),
            repair_copied: register(
                &mut r,
                "repair_copied",
                "Envelopes repair copied to responsible relays that lacked them",
                Counter::default(),
            ),
            repair_stale_deleted: register(
                &mut r,
                "repair_stale_deleted",
                "Stale copies deleted because a replica had delivered them",
                Counter::default(),
            ),
            media_requests: register(&mut r, "media_requests", "Media requests by kind", Family::default()),
            media_refusals: register(
                &mut r,
                "media_refusals",
                "Media requests refused, by error code",
                Family::default(),
            ),
            media_parts_saved: register(
                &mut r,
                "media_parts_saved",
                "File parts acknowledged to clients",
                Counter::default(),
            ),
            chunks_stored: register(
                &mut r,
                "chunks_stored",
                "Media chunks written to this relay's disk",
                Counter::default(),
            ),
            chunk_bytes_stored: register(
                &mut r,
                "chunk_bytes_stored",
                "Bytes of media chunks written to disk",
                Counter::default(),
            ),
            chunk_bytes_held: register(&mut r, "chunk_bytes_held", "Bytes of media chunks held here", Gauge::default()),
            media_provider_records: register(
                &mut r,
                "media_provider_records",
                "Client nodes serving files, as they announced (file, node) here",
                Gauge::default(),
            ),
            media_uploads_expired: register(
                &mut r,
                "media_uploads_expired",
                "Uploads not finished within the grace period, expired here",
                Counter::default(),
            ),
            chunks_deleted: register(
                &mut r,
                "chunks_deleted",
                "Chunks of expired uploads deleted here",
                Counter::default(),
            ),
            chunk_repair_copies: register(
                &mut r,
                "chunk_repair_copies",
                "Media chunks repair copied to responsible relays that lacked them",
                Counter::default(),
            ),
            part_record_repair_copies: register(
                &mut r,
                "part_record_repair_copies",
                "Part records repair copied to responsible relays that lacked them",
                Counter::default(),
            ),
            groups_mirrored: register(
                &mut r,
                "groups_mirrored",
                "Groups this relay mirrors for its readers",
                Gauge::default(),
            ),
            mirror_reads_failed: register(
                &mut r,
                "mirror_reads_failed",
                "Reads of mirrored groups from their relays that failed (tried again)",
                Counter::default(),
            ),
            push_registrations: register(
                &mut r,
                "push_registrations",
                "Devices with a push endpoint registered here",
                Gauge::default(),
            ),
            push_wakeups_sent: register(
                &mut r,
                "push_wakeups_sent",
                "Wake-ups the push services took",
                Counter::default(),
            ),
            push_wakeups_failed: register(
                &mut r,
                "push_wakeups_failed",
                "Wake-ups given up (after retries, or refused)",
                Counter::default(),
            ),
            push_wakeups_coalesced: register(
                &mut r,
                "push_wakeups_coalesced",
                "Arrivals folded into a wake-up already sent or queued",
                Counter::default(),
            ),
            push_endpoints_dropped: register(
                &mut r,
                "push_endpoints_dropped",
                "Push endpoints dropped because the push service said they are gone (404, 410)",
                Counter::default(),
            ),
            registry: r,
        };
        metrics.start_at_zero();
        metrics
    }

    /// Creates the labelled series a relay is sure to have at 0, so that they are exported
    /// (and `rate()` works) before the first of each happens.
    fn start_at_zero(&self) {
        use meshgram_node::proto::ErrorCode;
        let codes = [
            ErrorCode::BadRequest,
            ErrorCode::CertInvalid,
            ErrorCode::SessionRevoked,
            ErrorCode::FloodWait,
            ErrorCode::QuotaExceeded,
            ErrorCode::Forbidden,
            ErrorCode::NotFound,
            ErrorCode::Unavailable,
            ErrorCode::Internal,
        ];
        for code in codes {
            let code = CodeLabel { code: code.to_string() };
            let _ = self.errors.get_or_create(&code);
            let _ = self.media_refusals.get_or_create(&code);
        }
        let kinds = ["hello", "send", "fetch", "ack", "post", "group_fetch", "mirror_group_fetch"];
        for kind in kinds.into_iter().chain(["set_push", "get_push", "push_groups"]) {
            let _ = self.requests.get_or_create(&KindLabel { kind: kind.into() });
        }
        for kind in ["hello", "save_file_part", "get_upload_status", "get_chunk", "provide", "find_providers"] {
            let _ = self.media_requests.get_or_create(&KindLabel { kind: kind.into() });
        }
        for outcome in ["written", "failed"] {
            let _ = self.replica_copies.get_or_create(&OutcomeLabel { outcome });
        }
        for cert in ["session", "relay"] {
            for outcome in ["passed", "refused"] {
                let _ = self.certificate_checks.get_or_create(&CertLabels { cert, outcome });
            }
        }
        self.set_disk_use(DiskUse::default());
    }

    pub(crate) fn count_request(&self, kind: &str) {
        self.requests.get_or_create(&KindLabel { kind: kind.into() }).inc();
    }

    pub(crate) fn count_error(&self, code: &str) {
        self.errors.get_or_create(&CodeLabel { code: code.into() }).inc();
    }

    pub(crate) fn count_media_request(&self, kind: &str) {
        self.media_requests.get_or_create(&KindLabel { kind: kind.into() }).inc();
    }

    /// A media request refused (the same labels as the mailbox's `errors`).
    pub(crate) fn count_media_refusal(&self, code: &str) {
        self.media_refusals.get_or_create(&CodeLabel { code: code.into() }).inc();
    }

    /// One request of `protocol` answered after `took` (see `pipe::ObserveLatency`).
    pub(crate) fn observe_request(&self, protocol: &'static str, kind: &'static str, took: Duration) {
        self.request_duration.get_or_create(&RequestLabels { protocol, kind }).observe(took.as_secs_f64());
    }

    /// One copy made (`written`) or not (`failed`, replaced by the next closest relay).
    pub(crate) fn count_copy(&self, written: bool) {
        let outcome = if written { "written" } else { "failed" };
        self.replica_copies.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// A certificate checked.
    pub(crate) fn count_cert_check(&self, cert: CertKind, passed: bool) {
        let cert = match cert {
            CertKind::Session => "session",
            CertKind::Relay => "relay",
        };
        let outcome = if passed { "passed" } else { "refused" };
        self.certificate_checks.get_or_create(&CertLabels { cert, outcome }).inc();
    }

    /// The sizes of what the relay keeps on disk, as of now.
    pub fn set_disk_use(&self, disk: DiskUse) {
        let parts = [
            ("mailbox_store", disk.mailbox_store),
            ("mailbox_log", disk.mailbox_log),
            ("media_index", disk.media_index),
            ("push_registrations", disk.push_registrations),
        ];
        for (part, bytes) in parts {
            self.disk_bytes.get_or_create(&PartLabel { part }).set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }

    /// Reports what the pipes of `protocol` hold in `pipe_memory_bytes`.
    pub fn watch_pipe_memory(&self, protocol: &'static str, budget: std::sync::Arc<MemoryBudget>) {
        let _ = self.pipe_memory.get_or_create(&ProtocolLabel { protocol });
        self.pipe_budgets.lock().unwrap_or_else(|p| p.into_inner()).push((protocol, budget));
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        for (protocol, budget) in self.pipe_budgets.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let used = i64::try_from(budget.used()).unwrap_or(i64::MAX);
            self.pipe_memory.get_or_create(&ProtocolLabel { protocol }).set(used);
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A gauge's value from a count (saturating: gauges are `i64`).
pub(crate) fn gauge_value(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}
