//! Prometheus metrics served at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    kind: String,
    outcome: String,
}

/// The gateway's counters and the registry that exports them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    /// Login codes handed to the code sender.
    pub codes_sent: Counter,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meshgram_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "Auth requests by kind and outcome (ok or error code)", requests.clone());
        let codes_sent = Counter::default();
        registry.register("codes_sent", "Login codes delivered", codes_sent.clone());
        Metrics { registry, requests, codes_sent }
    }

    /// Counts one answered request.
    pub fn count_request(&self, kind: &str, outcome: &str) {
        self.requests.get_or_create(&RequestLabels { kind: kind.into(), outcome: outcome.into() }).inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
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
