//! Gateway configuration: a TOML file whose every field has a default, overridden by flags.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::defaults;

/// Everything a gateway needs to start.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the database, key and admin file live.
    pub data_dir: PathBuf,
    /// libp2p listen addresses.
    pub listen: Vec<libp2p::Multiaddr>,
    /// HTTP address for `/healthz`, `/metrics` and the operator's admin endpoint.
    pub http: Option<std::net::SocketAddr>,
    /// Where login codes go: `file:PATH` or `webhook:URL`.
    pub code_sink: Option<String>,
    /// A PostgreSQL database (`postgres://…`, several hosts allowed) instead of the redb file
    /// in the data dir: gateways that share one serve the same accounts.
    pub database: Option<String>,
    /// PEM file of the certificate authority the database's TLS certificate must chain to
    /// (default: the usual public roots).
    pub database_ca: Option<PathBuf>,
    /// Rate limits and lifetimes.
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("meshgram-gateway-data"),
            listen: meshgram_node::net::transport::default_listen_addrs(),
            http: None,
            code_sink: None,
            database: None,
            database_ca: None,
            limits: Limits::default(),
        }
    }
}

/// Lifetimes and rate limits; see `defaults` for why each default is what it is.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub code_ttl_secs: u64,
    pub code_length: u8,
    pub max_code_attempts: u32,
    pub max_code_attempts_per_phone: u32,
    pub code_lockout_secs: u64,
    pub send_code_burst: u32,
    pub send_code_refill_secs: u64,
    pub sign_in_burst: u32,
    pub sign_in_refill_secs: u64,
    pub cert_ttl_secs: u64,
    pub max_password_attempts: u32,
    pub password_lockout_secs: u64,
    pub lookup_burst: u32,
    pub lookups_per_second: u32,
    pub send_code_device_burst: u32,
    pub send_code_device_refill_secs: u64,
    pub send_codes_per_second: u32,
    pub send_code_ip_burst: u32,
    pub send_code_ip_refill_secs: u64,
    pub wrong_code_ip_burst: u32,
    pub wrong_code_ip_refill_secs: u64,
    /// Whether loopback addresses count for `send_code_ip_*` and `wrong_code_ip_*`: off by default, since the
    /// gateway's own machine (local tools, `meshgram up`, tests) signs in from there.
    pub limit_loopback: bool,
    pub max_webhook_deliveries: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            code_ttl_secs: defaults::CODE_TTL_SECS,
            code_length: defaults::CODE_LENGTH,
            max_code_attempts: defaults::MAX_CODE_ATTEMPTS,
            max_code_attempts_per_phone: defaults::MAX_CODE_ATTEMPTS_PER_PHONE,
            code_lockout_secs: defaults::CODE_LOCKOUT_SECS,
            send_code_burst: defaults::SEND_CODE_BURST,
            send_code_refill_secs: defaults::SEND_CODE_REFILL_SECS,
            sign_in_burst: defaults::SIGN_IN_BURST,
            sign_in_refill_secs: defaults::SIGN_IN_REFILL_SECS,
            cert_ttl_secs: defaults::CERT_TTL_SECS,
            max_password_attempts: defaults::MAX_PASSWORD_ATTEMPTS,
            password_lockout_secs: defaults::PASSWORD_LOCKOUT_SECS,
            lookup_burst: defaults::LOOKUP_BURST,
            lookups_per_second: defaults::LOOKUPS_PER_SECOND,
            send_code_device_burst: defaults::SEND_CODE_DEVICE_BURST,
            send_code_device_refill_secs: defaults::SEND_CODE_DEVICE_REFILL_SECS,
            send_codes_per_second: defaults::SEND_CODES_PER_SECOND,
            send_code_ip_burst: defaults::SEND_CODE_IP_BURST,
            send_code_ip_refill_secs: defaults::SEND_CODE_IP_REFILL_SECS,
            wrong_code_ip_burst: defaults::WRONG_CODE_IP_BURST,
            wrong_code_ip_refill_secs: defaults::WRONG_CODE_IP_REFILL_SECS,
            limit_loopback: false,
            max_webhook_deliveries: defaults::MAX_WEBHOOK_DELIVERIES,
        }
    }
}

impl Limits {
    /// Refuses values that would make the gateway unusable or insecure.
    pub fn validate(&self) -> Result<(), String> {
        if !(4..=8).contains(&self.code_length) {
            return Err(format!("code_length must be 4..=8, not {}", self.code_length));
        }
        if self.max_code_attempts == 0 || self.code_ttl_secs == 0 || self.cert_ttl_secs < 60 {
            return Err("max_code_attempts and code_ttl_secs must be > 0 and cert_ttl_secs >= 60".into());
        }
        if self.max_password_attempts == 0
            || self.lookup_burst == 0
            || self.lookups_per_second == 0
            || self.send_code_device_burst == 0
            || self.send_codes_per_second == 0
            || self.send_code_ip_burst == 0
            || self.max_webhook_deliveries == 0
            || self.max_code_attempts_per_phone == 0
            || self.wrong_code_ip_burst == 0
        {
            return Err("max_password_attempts, lookup_burst, lookups_per_second, send_code_device_burst, \
                        send_codes_per_second, send_code_ip_burst, max_webhook_deliveries, \
                        max_code_attempts_per_phone and wrong_code_ip_burst must be > 0"
                .into());
        }
        // Every duration is added to the clock: bounded, no sum can overflow.
        let durations = [
            ("code_ttl_secs", self.code_ttl_secs),
            ("code_lockout_secs", self.code_lockout_secs),
            ("send_code_refill_secs", self.send_code_refill_secs),
            ("sign_in_refill_secs", self.sign_in_refill_secs),
            ("cert_ttl_secs", self.cert_ttl_secs),
            ("password_lockout_secs", self.password_lockout_secs),
            ("send_code_device_refill_secs", self.send_code_device_refill_secs),
            ("send_code_ip_refill_secs", self.send_code_ip_refill_secs),
            ("wrong_code_ip_refill_secs", self.wrong_code_ip_refill_secs),
        ];
        if let Some((name, secs)) = durations.iter().find(|(_, secs)| *secs > MAX_DURATION_SECS) {
            return Err(format!("{name} must be at most {MAX_DURATION_SECS} (ten years), not {secs}"));
        }
        Ok(())
    }
}

/// The longest duration a setting may have: ten years.
const MAX_DURATION_SECS: u64 = 10 * 365 * 24 * 3600;

impl Config {
    /// Reads a TOML config file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}
