//! A whole mesh on loopback: one gateway and N relays.

use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::identity::ed25519;
use libp2p::kad::KBucketKey;
use meshgram_node::crypto::cert::{RelayCert, unix_now};
use meshgram_node::crypto::identity::load_or_create_ed25519;
use meshgram_node::defaults::{RELAY_CERT_FILE, RELAY_KEY_FILE};
use serde_json::Value;

use crate::{GATEWAY_BIN, Gateway, RELAY_BIN, Server, bin_path, http_get, run};

/// How long relays may take to check each other's certificates after they start.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(20);

/// Waits (bounded) until every relay has checked every other relay's certificate, as its
/// `/metrics` reports: relays acknowledge a message only with `R` durable copies, so one that
/// does not know its peers yet would refuse sends.
fn wait_until_relays_verified(relays: &[Server]) {
    let others = relays.len().saturating_sub(1);
    let deadline = Instant::now() + VERIFY_TIMEOUT;
    for (i, relay) in relays.iter().enumerate() {
        loop {
            let verified = relay_metric(relay, "meshgram_relay_relays_verified");
            if verified.is_some_and(|n| n >= others as u64) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "relay {i} verified {verified:?} of {others} relays in {VERIFY_TIMEOUT:?}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Issues a certificate for the relay whose key is in `dir` (made there if missing) with the
/// gateway whose data dir is `gateway_dir`.
fn admit_relay(gateway_dir: &Path, dir: &Path) {
    let relay = load_or_create_ed25519(&dir.join(RELAY_KEY_FILE)).expect("relay key").public().to_peer_id();
    let (relay, out) = (relay.to_string(), dir.join(RELAY_CERT_FILE).display().to_string());
    let gateway_dir = gateway_dir.display().to_string();
    let args = ["--data", &gateway_dir, "relay-cert", "--relay", &relay, "--out", &out];
    let issued = run(&bin_path(GATEWAY_BIN), &args, None);
    assert!(issued.status.success(), "relay-cert failed: {}", issued.stderr);
}

/// A counter or gauge from a relay's `/metrics` (`name` without labels); `None` if the relay
/// does not answer or has no such metric.
pub fn relay_metric(relay: &Server, name: &str) -> Option<u64> {
    relay_metric_at(&relay.http()?, name)
}

/// [`relay_metric`] from the relay serving HTTP at `http` (`http://HOST:PORT`).
fn relay_metric_at(http: &str, name: &str) -> Option<u64> {
    let (_, body) = http_get(http, "/metrics").ok()?;
    // Counters are exported with a `_total` suffix.
    body.lines().find_map(|line| {
        let value = line.strip_prefix(name)?;
        let value = value.strip_prefix("_total").unwrap_or(value);
        value.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// Waits (bounded by `within`) until repair has settled on the relays serving HTTP at `https`:
/// each has finished two rounds since it last copied anything, so one whole round found every
/// replica in sync. Returns how long that took.
pub fn wait_repair_settled(https: &[String], within: Duration) -> Duration {
    let started = Instant::now();
    let read = |http: &String| {
        let rounds = relay_metric_at(http, "meshgram_relay_repair_rounds")?;
        Some((rounds, relay_metric_at(http, "meshgram_relay_repair_copied")?))
    };
    let mut since: Vec<Option<(u64, u64)>> = https.iter().map(read).collect();
    loop {
        thread::sleep(Duration::from_millis(500));
        let now: Vec<Option<(u64, u64)>> = https.iter().map(read).collect();
        let mut settled = true;
        for (base, now) in since.iter_mut().zip(&now) {
            match (*base, *now) {
                (Some((rounds, copied)), Some((rounds_now, copied_now))) if copied == copied_now => {
                    settled &= rounds_now >= rounds + 2;
                }
                _ => {
                    *base = *now;
                    settled = false;
                }
            }
        }
        if settled {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "repair did not settle within {within:?}: {now:?}");
    }
}

/// What a stopped relay's store on `data` holds: mailbox peer id → ids of the envelopes waiting
/// there (`meshgram-relay inspect`).
pub fn inspect_relay(data: &Path) -> std::collections::HashMap<String, Vec<String>> {
    let out = std::process::Command::new(bin_path(RELAY_BIN))
        .args(["--data", &data.display().to_string(), "inspect"])
        .output()
        .expect("run meshgram-relay inspect");
    assert!(out.status.success(), "inspect failed: {}", String::from_utf8_lossy(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).expect("inspect prints JSON");
    let mailboxes = json["mailboxes"].as_array().expect("inspect lists mailboxes");
    mailboxes
        .iter()
        .map(|m| {
            let ids = m["held"].as_array().expect("held ids").iter().map(|id| id.as_str().unwrap_or("").to_string());
            (m["mailbox"].as_str().expect("mailbox").to_string(), ids.collect())
        })
        .collect()
}

/// Every file under `dir`, at any depth.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => dirs.push(entry.path()),
                Ok(t) if t.is_file() => files.push(entry.path()),
                _ => {}
            }
        }
    }
    files
}

/// Starts `meshgram-relay` on `data`, trusting `gateway_key` (hex), keeping `replication`
/// copies, on TCP port `tcp_port` of 127.0.0.1 (0 = any) and HTTP on any port, with `extra`
/// arguments after those.
pub fn start_relay(
    data: &Path,
    gateway_key: &str,
    replication: usize,
    tcp_port: u16,
    extra: &[&str],
) -> anyhow::Result<Server> {
    let (data, replication) = (data.display().to_string(), replication.to_string());
    let listen = format!("/ip4/127.0.0.1/tcp/{tcp_port}");
    let mut args = vec!["--data", &data, "--gateway-key", gateway_key, "--replication", &replication];
    args.extend(["--listen", &listen, "--http", "127.0.0.1:0"]);
    args.extend_from_slice(extra);
    Server::start(&bin_path(RELAY_BIN), &args)
}

/// A gateway and `N` relays on loopback, each relay joining through the ones before it.
#[derive(Debug)]
pub struct Mesh {
    pub gateway: Gateway,
    /// Other gateways of the network (same key, one database), after `gateway`.
    pub more_gateways: Vec<Gateway>,
    pub relays: Vec<Server>,
}

impl Mesh {
    /// Starts a gateway and `relays` relays with replication `replication`. Each relay is
    /// admitted as an operator would: `meshgram-gateway relay-cert` signs its certificate.
    pub fn start(relays: usize, replication: usize) -> Mesh {
        Mesh::start_on(Gateway::start(), relays, replication)
    }

    /// Like [`Mesh::start`], on a gateway the test started (say, with short certificates).
    pub fn start_on(gateway: Gateway, relays: usize, replication: usize) -> Mesh {
        Mesh::start_on_with_args(gateway, relays, replication, &[])
    }

    /// Like [`Mesh::start_on`], with several gateways of one network (sharing a key and a
    /// database): relays and logins are given all their addresses.
    pub fn start_on_gateways(mut gateways: Vec<Gateway>, relays: usize, replication: usize) -> Mesh {
        let gateway = gateways.remove(0);
        let key = gateway.server.ready["public_key"].as_str().expect("gateway ready line has public_key").to_string();
        let gateway_dir = gateway.data_dir().to_path_buf();
        let addrs = std::iter::once(&gateway).chain(&gateways).map(Gateway::addr).collect::<Vec<_>>().join(",");
        let mut mesh = Mesh::start_relays(gateway, &key, Some(&addrs), relays, replication, &[], |dir| {
            admit_relay(&gateway_dir, dir)
        });
        mesh.more_gateways = gateways;
        mesh
    }

    /// Like [`Mesh::start`], each relay started with `extra` arguments too.
    pub fn start_with_relay_args(relays: usize, replication: usize, extra: &[&str]) -> Mesh {
        Mesh::start_on_with_args(Gateway::start(), relays, replication, extra)
    }

    fn start_on_with_args(gateway: Gateway, relays: usize, replication: usize, extra: &[&str]) -> Mesh {
        let key = gateway.server.ready["public_key"].as_str().expect("gateway ready line has public_key").to_string();
        let gateway_dir = gateway.data_dir().to_path_buf();
        // Relays ask this gateway for revocations.
        let gateway_addr = gateway.addr();
        Mesh::start_relays(gateway, &key, Some(&gateway_addr), relays, replication, extra, |dir| {
            admit_relay(&gateway_dir, dir)
        })
    }

    /// Admits the relay whose key is in `dir` (made there if missing) with this mesh's gateway,
    /// as its operator would (`meshgram-gateway relay-cert`).
    pub fn admit_relay(&self, dir: &Path) {
        admit_relay(self.gateway.data_dir(), dir);
    }

    /// Waits (bounded) until every relay has checked every other relay's certificate.
    pub fn wait_until_verified(&self) {
        wait_until_relays_verified(&self.relays);
    }

    /// Like [`Mesh::start`], but relays trust `gateway` (a key the test holds, which also signs
    /// their certificates) instead of the gateway's own key.
    pub fn start_with_key(gateway: Gateway, signer: &ed25519::Keypair, relays: usize, replication: usize) -> Mesh {
        Mesh::start_with_key_and_args(gateway, signer, relays, replication, &[])
    }

    /// Like [`Mesh::start_with_key`], each relay started with `extra` arguments too.
    pub fn start_with_key_and_args(
        gateway: Gateway,
        signer: &ed25519::Keypair,
        relays: usize,
        replication: usize,
        extra: &[&str],
    ) -> Mesh {
        let key = meshgram_node::ids::hex(&signer.public().to_bytes());
        // The gateway's revocations are signed by its own key, not this one: none to ask for.
        Mesh::start_relays(gateway, &key, None, relays, replication, extra, |dir| {
            RelayCert::admit(signer, dir, 1, unix_now()).expect("admit the relay");
        })
    }

    /// Starts the relays, each after `admit` gave its data dir a key and a certificate, asking
    /// `gateway_addr` (if any) for revocations, with `more` arguments.
    fn start_relays(
        gateway: Gateway,
        gateway_key: &str,
        gateway_addr: Option<&str>,
        relays: usize,
        replication: usize,
        more: &[&str],
        admit: impl Fn(&Path),
    ) -> Mesh {
        let mut servers: Vec<Server> = Vec::new();
        for i in 0..relays {
            let dir = gateway.tmp().join(format!("relay-{i}"));
            fs::create_dir_all(&dir).expect("relay data dir");
            admit(&dir);
            let mut extra: Vec<String> =
                servers.iter().flat_map(|s| ["--bootstrap".to_string(), s.tcp_addr()]).collect();
            extra.extend(gateway_addr.iter().flat_map(|addr| ["--gateway".to_string(), addr.to_string()]));
            extra.extend(more.iter().map(|arg| arg.to_string()));
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            let server = start_relay(&dir, gateway_key, replication, 0, &extra)
                .unwrap_or_else(|e| panic!("relay {i} did not start: {e:#}"));
            servers.push(server);
        }
        wait_until_relays_verified(&servers);
        Mesh { gateway, more_gateways: Vec::new(), relays: servers }
    }

    /// `--gateway ADDR … --relay R1 --relay R2 …` for `meshgram login`.
    pub fn login_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for gateway in std::iter::once(&self.gateway).chain(&self.more_gateways) {
            args.extend(["--gateway".to_string(), gateway.addr()]);
        }
        for relay in &self.relays {
            args.extend(["--relay".to_string(), relay.tcp_addr()]);
        }
        args
    }

    /// Starts a bot bridge on `data` for this mesh, HTTP on a free port; it may fetch files by
    /// URL from loopback (all the tests have).
    pub fn start_bridge(&self, data: &Path) -> Server {
        let mut args = vec!["--data".to_string(), data.display().to_string(), "--http".into(), "127.0.0.1:0".into()];
        args.push("--fetch-private-urls".into());
        args.extend(self.login_args());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Server::start(&bin_path(crate::BRIDGE_BIN), &args).expect("the bot bridge starts")
    }

    /// Starts `meshgram app` on `profile` (signed in or not) for this mesh, on a free port,
    /// without a browser; its ready line has the `url` (with the token) and `port`.
    pub fn start_app(&self, profile: &Path) -> Server {
        let mut args = vec!["--profile".to_string(), profile.display().to_string(), "app".into(), "--no-open".into()];
        args.extend(self.login_args());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Server::start(&bin_path(crate::CLI_BIN), &args).expect("the app starts")
    }

    /// Signs `phone` in on `profile`, remembering this mesh's relays; returns the login JSON.
    pub fn login(&self, profile: &Path, phone: &str) -> Value {
        let args = self.login_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.gateway.login_via(&args, profile, phone, &[], |code| vec![code.to_string()]).ok_json()
    }

    /// Indexes of the relays, closest to the mailbox of the device signed in on `profile`
    /// first (Kademlia distance from its device key: the first R hold its copies).
    pub fn relays_by_mailbox_distance(&self, profile: &Path) -> Vec<usize> {
        let whoami = crate::meshgram(profile, &["whoami"]).ok_json();
        let device: PeerId = whoami["device"].as_str().and_then(|d| d.parse().ok()).expect("whoami names the device");
        let distance = |relay: &Server| {
            let relay: PeerId = relay.peer_id().parse().expect("relays have peer ids");
            KBucketKey::from(device).distance(&KBucketKey::from(relay))
        };
        let mut order: Vec<usize> = (0..self.relays.len()).collect();
        order.sort_by_key(|&i| distance(&self.relays[i]));
        order
    }

    /// A fresh profile dir under the mesh's temp dir.
    pub fn new_profile(&self, name: &str) -> PathBuf {
        self.gateway.new_profile(name)
    }

    /// Every file under every relay's data dir, concatenated: what a relay operator can read.
    pub fn relay_disk_bytes(&self) -> Vec<u8> {
        let mut all = Vec::new();
        for relay in &self.relays {
            for file in files_under(&relay.data_dir) {
                if let Ok(bytes) = fs::read(file) {
                    all.extend(bytes);
                }
            }
        }
        all
    }

    /// The files under any relay's data dir (chunk files included) that contain `needle`.
    pub fn relay_files_containing(&self, needle: &[u8]) -> Vec<PathBuf> {
        let finder = memchr::memmem::Finder::new(needle);
        self.relays
            .iter()
            .flat_map(|relay| files_under(&relay.data_dir))
            .filter(|file| fs::read(file).is_ok_and(|bytes| finder.find(&bytes).is_some()))
            .collect()
    }
}
