//! The relay's config file (`relay.toml`): every key has a default, so a file may hold only what
//! an operator changes; flags and `MESHGRAM_RELAY_*` variables override it (see `main.rs`).
//! [`template`] writes the commented file `meshgram-relay init` starts an operator with.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use libp2p::Multiaddr;
use libp2p::identity::ed25519;
use meshgram_node::ids::parse_hex;
use meshgram_node::server::service::LogFormat;
use serde::Deserialize;

use crate::store::Quota;
use crate::{ConnectionLimits, DEFAULT_MEDIA_QUOTA_MIB, RelayConfig};

/// The config file's name in a data dir, as `init` writes it.
pub const CONFIG_FILE: &str = "relay.toml";

/// What `relay.toml` holds; see [`template`] for why each default is what it is.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayFile {
    pub data_dir: PathBuf,
    pub gateway_key: Option<String>,
    pub gateway: Option<String>,
    pub relay_cert: Option<PathBuf>,
    pub listen: Vec<String>,
    pub bootstrap: Vec<String>,
    pub http: String,
    pub replication: usize,
    pub allow_fewer_replicas: bool,
    pub ttl_days: u64,
    pub mailbox_quota: u64,
    pub mailbox_quota_per_sender: u64,
    pub sender_quota_mib: u64,
    pub media_quota_mib: u64,
    pub media_upload_grace_secs: u64,
    pub send_rate: u32,
    pub worker_threads: usize,
    pub log_format: LogFormat,
    pub push: bool,
    pub push_vapid_subject: Option<String>,
    pub push_private_endpoints: bool,
    pub max_connections: u32,
    pub max_connections_per_ip: u32,
    pub limit_loopback: bool,
    pub pipe_memory_mib: usize,
}

impl Default for RelayFile {
    fn default() -> Self {
        RelayFile {
            data_dir: PathBuf::from("meshgram-relay-data"),
            gateway_key: None,
            gateway: None,
            relay_cert: None,
            listen: Vec::new(),
            bootstrap: Vec::new(),
            http: "127.0.0.1:0".into(),
            replication: 2,
            allow_fewer_replicas: false,
            ttl_days: 30,
            mailbox_quota: Quota::DEFAULT.per_mailbox,
            mailbox_quota_per_sender: Quota::DEFAULT.per_sender_in_mailbox,
            sender_quota_mib: Quota::DEFAULT.bytes_per_sender >> 20,
            media_quota_mib: DEFAULT_MEDIA_QUOTA_MIB,
            media_upload_grace_secs: 24 * 3600,
            send_rate: 5_000,
            worker_threads: 0,
            log_format: LogFormat::Text,
            push: true,
            push_vapid_subject: None,
            push_private_endpoints: false,
            max_connections: ConnectionLimits::default().max_connections,
            max_connections_per_ip: ConnectionLimits::default().max_per_ip,
            limit_loopback: false,
            pipe_memory_mib: ConnectionLimits::default().pipe_memory >> 20,
        }
    }
}

/// A setting that cannot be used, named by its key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("relay setting `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, reason: reason.into() }
}

impl RelayFile {
    /// Reads a TOML config file. Relative paths in it are taken from the file's directory, so
    /// that a config works wherever the relay is started from.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let err = |reason: String| ConfigError::File { path: path.to_path_buf(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut file: RelayFile = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        file.data_dir = base.join(&file.data_dir);
        file.relay_cert = file.relay_cert.map(|cert| base.join(cert));
        Ok(file)
    }

    /// The relay's configuration, every value checked.
    pub fn to_config(&self) -> Result<RelayConfig, ConfigError> {
        let key = self.gateway_key.as_deref().ok_or_else(|| {
            invalid("gateway_key", "required: the gateway's public key (hex), from its ready line or network.json")
        })?;
        let key = parse_hex::<32>(key).map_err(|e| invalid("gateway_key", e.to_string()))?;
        let gateway_key = ed25519::PublicKey::try_from_bytes(&key)
            .map_err(|_| invalid("gateway_key", "not an ed25519 public key"))?;
        let mut config = RelayConfig::new(self.data_dir.clone(), gateway_key);
        if !self.listen.is_empty() {
            config.listen = addrs("listen", &self.listen)?;
        }
        config.bootstrap = addrs("bootstrap", &self.bootstrap)?;
        // Comma-separated: the gateways of one network share one key, any of them answers.
        config.gateway = match self.gateway.as_deref() {
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(|a| parse_addr("gateway", a))
                .collect::<Result<_, _>>()?,
            None => Vec::new(),
        };
        config.cert_file = self.relay_cert.clone();
        config.http = Some(
            self.http
                .parse::<SocketAddr>()
                .map_err(|_| invalid("http", format!("{:?} is not an IP:port address", self.http)))?,
        );
        config.settings.replication = at_least_one("replication", self.replication)?;
        config.settings.allow_fewer_replicas = self.allow_fewer_replicas;
        config.settings.send_rate = at_least_one("send_rate", self.send_rate)?;
        // Bursts of ten seconds' worth, as the template says.
        config.settings.send_burst = self.send_rate.saturating_mul(10);
        let days = at_least_one("ttl_days", self.ttl_days)?;
        config.store.ttl =
            Duration::from_secs(days.checked_mul(24 * 3600).ok_or_else(|| invalid("ttl_days", "too large"))?);
        config.store.quota = Quota {
            per_mailbox: at_least_one("mailbox_quota", self.mailbox_quota)?,
            per_sender_in_mailbox: at_least_one("mailbox_quota_per_sender", self.mailbox_quota_per_sender)?,
            bytes_per_sender: at_least_one("sender_quota_mib", self.sender_quota_mib)?
                .checked_mul(1 << 20)
                .ok_or_else(|| invalid("sender_quota_mib", "too large"))?,
        };
        config.settings.media_quota = self.media_quota_mib.saturating_mul(1 << 20);
        config.settings.media_upload_grace =
            Duration::from_secs(at_least_one("media_upload_grace_secs", self.media_upload_grace_secs)?);
        if let Some(subject) = &self.push_vapid_subject
            && !(subject.starts_with("mailto:") || subject.starts_with("https://"))
        {
            return Err(invalid("push_vapid_subject", "must be a mailto: or https:// URL (RFC 8292)"));
        }
        config.settings.push = crate::push::PushSettings {
            enabled: self.push,
            vapid_subject: self.push_vapid_subject.clone(),
            private_endpoints: self.push_private_endpoints,
        };
        config.connections = ConnectionLimits {
            max_connections: at_least_one("max_connections", self.max_connections)?,
            max_per_ip: at_least_one("max_connections_per_ip", self.max_connections_per_ip)?,
            limit_loopback: self.limit_loopback,
            pipe_memory: at_least_one("pipe_memory_mib", self.pipe_memory_mib)?
                .checked_mul(1 << 20)
                .ok_or_else(|| invalid("pipe_memory_mib", "too large"))?,
        };
        Ok(config)
    }
}

fn at_least_one<T: PartialEq + Default>(key: &'static str, value: T) -> Result<T, ConfigError> {
    if value == T::default() {
        return Err(invalid(key, "must be at least 1"));
    }
    Ok(value)
}

fn parse_addr(key: &'static str, addr: &str) -> Result<Multiaddr, ConfigError> {
    addr.parse().map_err(|e| invalid(key, format!("{addr:?} is not a libp2p address: {e}")))
}

fn addrs(key: &'static str, addrs: &[String]) -> Result<Vec<Multiaddr>, ConfigError> {
    addrs.iter().map(|addr| parse_addr(key, addr)).collect()
}

/// What `init` knows to write into the template (the rest stays at its default).
#[derive(Debug, Clone, Default)]
pub struct InitValues {
    pub data_dir: PathBuf,
    pub gateway_key: Option<String>,
    pub gateway: Option<String>,
    pub listen: Vec<String>,
    pub bootstrap: Vec<String>,
    pub http: Option<String>,
}

/// A commented `relay.toml`: every key, its default, and why; the keys `init` was given are set,
/// the others are left at their default (those without one commented out).
pub fn template(values: &InitValues) -> String {
    let d = RelayFile::default();
    let quoted = |s: &str| toml::Value::String(s.to_string()).to_string();
    let list = |items: &[String]| format!("[{}]", items.iter().map(|s| quoted(s)).collect::<Vec<_>>().join(", "));
    let optional = |key: &str, value: &Option<String>, example: &str| match value {
        Some(value) => format!("{key} = {}", quoted(value)),
        None => format!("# {key} = {}", quoted(example)),
    };
    let listen = if values.listen.is_empty() {
        "# listen = [\"/ip4/0.0.0.0/udp/4001/quic-v1\", \"/ip4/0.0.0.0/tcp/4001\"]".to_string()
    } else {
        format!("listen = {}", list(&values.listen))
    };
    format!(
        r#"# meshgram-relay configuration. Every key has a default; environment variables and flags
# override what is here (`meshgram-relay --help` lists both). docs/relay.md explains running a
# relay.

# Where the relay key (relay.key), its certificate (relay.cert) and its stores live. Back up
# relay.key and relay.cert; the stores are rebuilt by repair from the other relays.
data_dir = {data_dir}

# The gateway's public key (hex, from its ready line or network.json). Only session and relay
# certificates it signed are accepted here: required.
{gateway_key}

# The gateway's libp2p address (several gateways of one network: comma-separated), asked every
# 2 s for revoked sessions and relays. Without it a revoked session keeps access here until its
# certificate expires (up to an hour).
{gateway}

# The gateway's certificate admitting this relay (default: DATA/relay.cert), issued by
# `meshgram-gateway relay-cert`; relays replicate only with certified relays.
# relay_cert = "relay.cert"

# libp2p listen addresses (QUIC and TCP). Default: 127.0.0.1 on any free port, which only suits
# a relay for this machine; a community relay listens on a public address and a fixed port.
{listen}

# Relays to join the mesh through, each ending in /p2p/<peer id>. Any one live relay will do;
# the rest are found through it.
bootstrap = {bootstrap}

# HTTP address for /healthz and /metrics. Keep it on loopback or behind a firewall: metrics
# are for the operator's Prometheus.
http = {http}

# Relays that must hold a copy of an envelope before its sender hears "stored" (R, this relay
# included): one more than the relays that may die at once without losing anything.
replication = {replication}

# Acknowledge with fewer copies than `replication` when fewer relays are live. Only for a
# network knowingly smaller than `replication`: otherwise a relay that just restarted would
# acknowledge with one copy.
allow_fewer_replicas = {allow_fewer_replicas}

# Days an undelivered envelope is kept: a device offline longer loses it, as in Telegram's
# secret chats. A month covers holidays.
ttl_days = {ttl_days}

# Envelopes one mailbox may hold: enough for a month of a busy account, small enough that one
# mailbox cannot fill the disk.
mailbox_quota = {mailbox_quota}

# Envelopes one sender may have waiting in one mailbox: a tenth of it, so that a noisy sender
# fills its share and real senders still get through.
mailbox_quota_per_sender = {mailbox_quota_per_sender}

# MiB one sender may have waiting here in all mailboxes together: any device id can be a
# mailbox, so the per-mailbox limits alone do not bound what one account stores.
sender_quota_mib = {sender_quota_mib}

# MiB of file chunks one user may have recorded here: room for many photos and a few films,
# small beside a relay's disk (uploads spread over the relays closest to each file).
media_quota_mib = {media_quota_mib}

# Seconds an upload may take from its first part to its last; an unfinished one is expired and
# its bytes given back to its owner's quota. A day covers a slow link.
media_upload_grace_secs = {media_upload_grace_secs}

# Envelopes per second one user may send, sustained (bursts of ten times as many): far above a
# person's rate, low enough that one account cannot flood the mesh.
send_rate = {send_rate}

# Threads for networking and request handling; 0 = one per core. Relays that share a machine do
# better with 1.
worker_threads = {worker_threads}

# Log lines on stderr: "text", or "json" (one object per line) for log shippers.
log_format = {log_format}

# Wake devices that are not connected through the push endpoint they registered here (Web Push,
# encrypted so the push service learns nothing). Off: no wake-ups leave this relay.
push = {push}

# A contact for push services that ask relays to identify themselves (VAPID, RFC 8292):
# "mailto:…" or "https://…". Without it wake-ups are not signed.
# push_vapid_subject = "mailto:relay-operator@example.org"

# Send wake-ups to endpoints on loopback, private or link-local addresses: only for a push service
# on this machine or network. Off, a device cannot make the relay POST into its own network.
push_private_endpoints = {push_private_endpoints}

# Connections this relay takes in all (clients and relays). Each costs a file descriptor and
# some memory; the relay raises its descriptor limit as far as the system allows at start.
max_connections = {max_connections}

# Connections from one IP address: a household or an office behind one address fits, one
# machine opening thousands does not.
max_connections_per_ip = {max_connections_per_ip}

# Whether `max_connections_per_ip` also counts loopback addresses (off: a local network, or a
# proxy on this machine, connects everything from 127.0.0.1).
limit_loopback = {limit_loopback}

# MiB that each client protocol's pipes (mailbox, media, replica) may hold together: requests
# being read or handled and answers not yet written. Past it, pipes stop reading new requests
# until answers drain; one pipe holds at most about 33 MiB of it.
pipe_memory_mib = {pipe_memory_mib}
"#,
        data_dir = quoted(&values.data_dir.display().to_string()),
        gateway_key = optional("gateway_key", &values.gateway_key, "<64 hex digits>"),
        gateway = optional("gateway", &values.gateway, "/ip4/GATEWAY_IP/udp/4001/quic-v1/p2p/<gateway peer id>"),
        bootstrap = list(&values.bootstrap),
        http = quoted(values.http.as_deref().unwrap_or(&d.http)),
        replication = d.replication,
        allow_fewer_replicas = d.allow_fewer_replicas,
        ttl_days = d.ttl_days,
        mailbox_quota = d.mailbox_quota,
        mailbox_quota_per_sender = d.mailbox_quota_per_sender,
        sender_quota_mib = d.sender_quota_mib,
        media_quota_mib = d.media_quota_mib,
        media_upload_grace_secs = d.media_upload_grace_secs,
        send_rate = d.send_rate,
        worker_threads = d.worker_threads,
        log_format = quoted("text"),
        push = d.push,
        push_private_endpoints = d.push_private_endpoints,
        max_connections = d.max_connections,
        max_connections_per_ip = d.max_connections_per_ip,
        limit_loopback = d.limit_loopback,
        pipe_memory_mib = d.pipe_memory_mib,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_holds_every_default() {
        let values = InitValues { data_dir: PathBuf::from("meshgram-relay-data"), ..InitValues::default() };
        let parsed: RelayFile = toml::from_str(&template(&values)).unwrap();
        assert_eq!(parsed, RelayFile::default());
        let key = "ab".repeat(32);
        let values = InitValues {
            data_dir: PathBuf::from("/var/lib/meshgram-relay"),
            gateway_key: Some(key.clone()),
            listen: vec!["/ip4/0.0.0.0/tcp/4001".into()],
            ..InitValues::default()
        };
        let parsed: RelayFile = toml::from_str(&template(&values)).unwrap();
        assert_eq!(parsed.gateway_key, Some(key));
        assert_eq!(parsed.listen, values.listen);
    }

    #[test]
    fn several_gateways_are_comma_separated() {
        let key = meshgram_node::ids::hex(&ed25519::Keypair::generate().public().to_bytes());
        let gateway = Some(" /ip4/127.0.0.1/tcp/4001, /ip4/127.0.0.2/tcp/4001 ,".into());
        let config = RelayFile { gateway_key: Some(key), gateway, ..RelayFile::default() }.to_config().unwrap();
        let expected: Vec<Multiaddr> =
            vec!["/ip4/127.0.0.1/tcp/4001".parse().unwrap(), "/ip4/127.0.0.2/tcp/4001".parse().unwrap()];
        assert_eq!(config.gateway, expected);
    }

    #[test]
    fn bad_values_are_refused_with_their_key() {
        let key = meshgram_node::ids::hex(&ed25519::Keypair::generate().public().to_bytes());
        let good = RelayFile { gateway_key: Some(key), ..RelayFile::default() };
        assert!(good.to_config().is_ok());
        let cases: Vec<(&str, RelayFile)> = vec![
            ("gateway_key", RelayFile::default()),
            ("gateway_key", RelayFile { gateway_key: Some("zz".into()), ..good.clone() }),
            ("replication", RelayFile { replication: 0, ..good.clone() }),
            ("listen", RelayFile { listen: vec!["/ip4/127.0.0.1/tcp/x".into()], ..good.clone() }),
            ("bootstrap", RelayFile { bootstrap: vec!["relay-1:4001".into()], ..good.clone() }),
            ("gateway", RelayFile { gateway: Some("nowhere".into()), ..good.clone() }),
            ("http", RelayFile { http: "localhost".into(), ..good.clone() }),
            ("ttl_days", RelayFile { ttl_days: 0, ..good.clone() }),
            ("ttl_days", RelayFile { ttl_days: u64::MAX, ..good.clone() }),
            ("mailbox_quota", RelayFile { mailbox_quota: 0, ..good.clone() }),
            ("mailbox_quota_per_sender", RelayFile { mailbox_quota_per_sender: 0, ..good.clone() }),
            ("sender_quota_mib", RelayFile { sender_quota_mib: u64::MAX, ..good.clone() }),
            ("send_rate", RelayFile { send_rate: 0, ..good.clone() }),
            ("media_upload_grace_secs", RelayFile { media_upload_grace_secs: 0, ..good.clone() }),
            ("max_connections", RelayFile { max_connections: 0, ..good.clone() }),
            ("max_connections_per_ip", RelayFile { max_connections_per_ip: 0, ..good.clone() }),
            ("pipe_memory_mib", RelayFile { pipe_memory_mib: usize::MAX, ..good.clone() }),
            ("push_vapid_subject", RelayFile { push_vapid_subject: Some("ops@example.org".into()), ..good }),
        ];
        for (key, file) in cases {
            match file.to_config() {
                Err(ConfigError::Invalid { key: named, .. }) => assert_eq!(named, key),
                other => panic!("{key}: {other:?}"),
            }
        }
    }
}
