//! Prometheus metrics served at `/metrics` (OpenMetrics text). docs/gateway.md lists them; a
//! test checks that the two agree.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    kind: String,
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabel {
    /// `file` or `webhook`.
    sink: &'static str,
}

/// The gateway's metrics and the registry that exports them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<KindLabel, Histogram>,
    codes_sent: Family<SinkLabel, Counter>,
    codes_failed: Family<SinkLabel, Counter>,
    /// Accounts (users and bots) and active sessions, as of the last scrape.
    pub accounts: Gauge,
    pub sessions_active: Gauge,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meshgram_gateway");
        registry.register("build", "The gateway's version", Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]));
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Auth requests by kind (send_code, sign_in, bot_sign_in, renew_cert, ...) and outcome (ok or error code)",
            requests.clone(),
        );
        // 0.5 ms to about 8 s: a sign-in hashes a 2FA password (argon2) and a code may wait on a
        // slow SMS webhook.
        let request_duration = Family::<KindLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_5, 2.0, 15))
        });
        registry.register(
            "request_duration_seconds",
            "Time to answer an auth request, by kind",
            request_duration.clone(),
        );
        let codes_sent = Family::<SinkLabel, Counter>::default();
        registry.register("codes_sent", "Login codes delivered, by sink (file, webhook)", codes_sent.clone());
        let codes_failed = Family::<SinkLabel, Counter>::default();
        registry.register(
            "codes_failed",
            "Login codes the sink did not take, by sink (the user was told to ask again)",
            codes_failed.clone(),
        );
        let accounts = Gauge::default();
        registry.register("accounts", "Accounts (users and bots)", accounts.clone());
        let sessions_active = Gauge::default();
        registry.register("sessions_active", "Sessions signed in and not revoked", sessions_active.clone());
        // At 0 from the start, so that they are exported (and `rate()` works) before the first.
        for sink in ["file", "webhook"] {
            let _ = codes_sent.get_or_create(&SinkLabel { sink });
            let _ = codes_failed.get_or_create(&SinkLabel { sink });
        }
        Metrics { registry, requests, request_duration, codes_sent, codes_failed, accounts, sessions_active }
    }

    /// Counts one answered request and the time it took.
    pub fn count_request(&self, kind: &'static str, outcome: &str, took: Duration) {
        self.requests.get_or_create(&RequestLabels { kind: kind.into(), outcome: outcome.into() }).inc();
        self.request_duration.get_or_create(&KindLabel { kind }).observe(took.as_secs_f64());
    }

    /// Counts one login code handed to `sink` (`file` or `webhook`), taken or not.
    pub fn count_code(&self, sink: &'static str, delivered: bool) {
        let family = if delivered { &self.codes_sent } else { &self.codes_failed };
        family.get_or_create(&SinkLabel { sink }).inc();
    }

    /// The OpenMetrics text exposition.
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
