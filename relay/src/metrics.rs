//! Prometheus metrics served at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: String,
}

/// The relay's counters and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<KindLabel, Counter>,
    errors: Family<CodeLabel, Counter>,
    /// Envelopes accepted from clients for replication.
    pub envelopes_received: Counter,
    /// Connections opened (clients and relays).
    pub connections: Counter,
    /// Other relays whose certificate this relay checked: those it may store copies on.
    pub relays_verified: Gauge,
    /// 1 once a store write failed: the relay then takes no writes (see `/healthz`).
    pub store_failed: Gauge,
    /// Session revocations from the gateway taken in.
    pub sessions_revoked: Counter,
    /// Relays whose admission the gateway revoked.
    pub relays_revoked: Gauge,
    /// Polls of the gateway for revocations that failed (retried at the next tick).
    pub gateway_polls_failed: Counter,
    /// Kademlia lookups of a mailbox's closest relays finished (`relays`).
    pub placement_lookups: Counter,
    /// Repair rounds finished (`repair`).
    pub repair_rounds: Counter,
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
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meshgram_relay");
        let requests = Family::<KindLabel, Counter>::default();
        registry.register("requests", "Mailbox requests by kind", requests.clone());
        let errors = Family::<CodeLabel, Counter>::default();
        registry.register("errors", "Mailbox requests refused, by error code", errors.clone());
        let envelopes_received = Counter::default();
        registry.register("envelopes_received", "Envelopes accepted from clients", envelopes_received.clone());
        let connections = Counter::default();
        registry.register("connections", "Connections opened", connections.clone());
        let relays_verified = Gauge::default();
        registry.register(
            "relays_verified",
            "Other relays whose certificate this relay checked",
            relays_verified.clone(),
        );
        let store_failed = Gauge::default();
        registry.register(
            "store_failed",
            "1 once a store write failed and the relay takes no writes",
            store_failed.clone(),
        );
        let sessions_revoked = Counter::default();
        registry.register(
            "sessions_revoked",
            "Session revocations from the gateway taken in",
            sessions_revoked.clone(),
        );
        let relays_revoked = Gauge::default();
        registry.register("relays_revoked", "Relays whose admission the gateway revoked", relays_revoked.clone());
        let gateway_polls_failed = Counter::default();
        registry.register(
            "gateway_polls_failed",
            "Polls of the gateway for revocations that failed (retried)",
            gateway_polls_failed.clone(),
        );
        let placement_lookups = Counter::default();
        registry.register(
            "placement_lookups",
            "Kademlia lookups of a mailbox's closest relays finished",
            placement_lookups.clone(),
        );
        let repair_rounds = Counter::default();
        registry.register("repair_rounds", "Repair rounds finished", repair_rounds.clone());
        let repair_copied = Counter::default();
        registry.register(
            "repair_copied",
            "Envelopes repair copied to responsible relays that lacked them",
            repair_copied.clone(),
        );
        let repair_stale_deleted = Counter::default();
        registry.register(
            "repair_stale_deleted",
            "Stale copies deleted because a replica had delivered them",
            repair_stale_deleted.clone(),
        );
        let media_requests = Family::<KindLabel, Counter>::default();
        registry.register("media_requests", "Media requests by kind", media_requests.clone());
        let media_refusals = Family::<CodeLabel, Counter>::default();
        registry.register("media_refusals", "Media requests refused, by error code", media_refusals.clone());
        let media_parts_saved = Counter::default();
        registry.register("media_parts_saved", "File parts acknowledged to clients", media_parts_saved.clone());
        let chunks_stored = Counter::default();
        registry.register("chunks_stored", "Media chunks written to this relay's disk", chunks_stored.clone());
        let chunk_bytes_stored = Counter::default();
        registry.register("chunk_bytes_stored", "Bytes of media chunks written to disk", chunk_bytes_stored.clone());
        let chunk_bytes_held = Gauge::default();
        registry.register("chunk_bytes_held", "Bytes of media chunks held here", chunk_bytes_held.clone());
        let media_uploads_expired = Counter::default();
        registry.register(
            "media_uploads_expired",
            "Uploads not finished within the grace period, expired here",
            media_uploads_expired.clone(),
        );
        let chunks_deleted = Counter::default();
        registry.register("chunks_deleted", "Chunks of expired uploads deleted here", chunks_deleted.clone());
        let media_provider_records = Gauge::default();
        registry.register(
            "media_provider_records",
            "Client nodes serving files, as they announced (file, node) here",
            media_provider_records.clone(),
        );
        let chunk_repair_copies = Counter::default();
        registry.register(
            "chunk_repair_copies",
            "Media chunks repair copied to responsible relays that lacked them",
            chunk_repair_copies.clone(),
        );
        let part_record_repair_copies = Counter::default();
        registry.register(
            "part_record_repair_copies",
            "Part records repair copied to responsible relays that lacked them",
            part_record_repair_copies.clone(),
        );
        let groups_mirrored = Gauge::default();
        registry.register("groups_mirrored", "Groups this relay mirrors for its readers", groups_mirrored.clone());
        let mirror_reads_failed = Counter::default();
        registry.register(
            "mirror_reads_failed",
            "Reads of mirrored groups from their relays that failed (tried again)",
            mirror_reads_failed.clone(),
        );
        Metrics {
            registry,
            requests,
            errors,
            envelopes_received,
            connections,
            relays_verified,
            store_failed,
            sessions_revoked,
            relays_revoked,
            gateway_polls_failed,
            placement_lookups,
            repair_rounds,
            repair_copied,
            repair_stale_deleted,
            media_requests,
            media_refusals,
            media_parts_saved,
            chunks_stored,
            chunk_bytes_stored,
            chunk_bytes_held,
            media_provider_records,
            media_uploads_expired,
            chunks_deleted,
            chunk_repair_copies,
            part_record_repair_copies,
            groups_mirrored,
            mirror_reads_failed,
        }
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

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
