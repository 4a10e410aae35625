//! Running relays and the gateway as their operators do (docs/relay.md, docs/gateway.md):
//! `meshgram-relay init` and a relay started from the config it wrote alone; every documented
//! metric present and valid OpenMetrics (a real parser), moving with traffic; JSON logs; bad
//! configs refused with the key named; the systemd unit checked by `systemd-analyze`.

// A failed unwrap here is a failed test, which is what it should be.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use meshgram_tests::{
    GATEWAY_BIN, Gateway, Mesh, RELAY_BIN, Scrape, Server, array, bin_path, documented_metrics, meshgram, run, texts,
};
use serde_json::Value;

const ALICE: &str = "+15550001111";
const BOB: &str = "+15550002222";
const DASHBOARD: &str = "deploy/grafana/meshgram.json";
const ALERTS: &str = "deploy/prometheus/meshgram-alerts.yml";
/// How long gauges set on a timer (connections, routing table) may take to show.
const GAUGE_WAIT: Duration = Duration::from_secs(15);

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// `meshgram-relay <args…> init --json`, then the `relay-cert` command it printed, run on the
/// gateway's data dir: what an operator does to set a relay up. Returns what init printed.
fn init_and_admit(gateway: &Gateway, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["init", "--json"]);
    let init = run(&bin_path(RELAY_BIN), &all, None);
    assert!(init.status.success(), "init failed: {}", init.stderr);
    let printed: Value = serde_json::from_str(&init.stdout).expect("init --json prints JSON");
    let admit = printed["admit"].as_str().unwrap().replace("GATEWAY_DATA", &gateway.data_dir().display().to_string());
    let words: Vec<&str> = admit.split_whitespace().collect();
    assert_eq!(words[0], "meshgram-gateway", "{admit}");
    let admitted = run(&bin_path(GATEWAY_BIN), &words[1..], None);
    assert!(admitted.status.success(), "{admit}: {}", admitted.stderr);
    printed
}

/// Starts the relay exactly as init said to.
fn start_as_printed(printed: &Value) -> Server {
    let start = printed["start"].as_str().unwrap();
    let words: Vec<&str> = start.split_whitespace().collect();
    assert_eq!(words[0], "meshgram-relay", "{start}");
    Server::start(&bin_path(RELAY_BIN), &words[1..]).unwrap_or_else(|e| panic!("{start}: {e:#}"))
}

/// Whether `documented` (as a doc writes it: `x_total`, `x_bucket`, a gauge `x`) is among what
/// the parser read.
fn exported(names: &std::collections::BTreeSet<String>, documented: &str) -> bool {
    let family = ["_total", "_info", "_bucket", "_count", "_sum"]
        .iter()
        .find_map(|suffix| documented.strip_suffix(suffix))
        .unwrap_or(documented);
    names.contains(documented) || names.contains(family)
}

/// Sums `sample{labels}` over every relay's `/metrics` until `until` holds of it (bounded);
/// returns the last sum.
fn wait_sum(https: &[String], sample: &str, labels: &[(&str, &str)], until: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + GAUGE_WAIT;
    loop {
        let sum: f64 = https.iter().map(|http| Scrape::of(http).sum(sample, labels)).sum();
        if until(sum) || Instant::now() > deadline {
            return sum;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_relay_set_up_with_init_runs_from_its_config_alone_and_its_metrics_follow_the_traffic() {
    let gateway = Gateway::start();
    let key = gateway.server.ready["public_key"].as_str().unwrap().to_string();
    let gateway_addr = gateway.addr();
    let mut relays: Vec<Server> = Vec::new();
    for i in 0..2 {
        let dir = gateway.tmp().join(format!("relay-{i}")).display().to_string();
        let mut args = vec!["--data", &dir, "--gateway-key", &key, "--gateway", &gateway_addr];
        args.extend(["--listen", "/ip4/127.0.0.1/tcp/0", "--http", "127.0.0.1:0"]);
        let bootstrap = relays.first().map(Server::tcp_addr);
        if let Some(bootstrap) = &bootstrap {
            args.extend(["--bootstrap", bootstrap]);
        }
        let printed = init_and_admit(&gateway, &args);
        let config = PathBuf::from(printed["config"].as_str().unwrap());
        assert_eq!(config, Path::new(&dir).join("relay.toml"));
        if i == 1 {
            // The second one logs for a log shipper.
            let text = std::fs::read_to_string(&config).unwrap();
            std::fs::write(&config, text.replace("log_format = \"text\"", "log_format = \"json\"")).unwrap();
        }
        relays.push(start_as_printed(&printed));
    }
    let mesh = Mesh { gateway, more_gateways: Vec::new(), relays };
    mesh.wait_until_verified();
    let https: Vec<String> = mesh.relays.iter().map(|r| r.http().expect("relays serve HTTP")).collect();

    let (alice, bob) = (mesh.new_profile("alice"), mesh.new_profile("bob"));
    mesh.login(&alice, ALICE);
    mesh.login(&bob, BOB);
    for text in ["one", "two", "three"] {
        meshgram(&alice, &["send", BOB, text]).ok_json();
    }
    // Held for Bob on both relays (R = 2) until he reads them.
    let held = wait_sum(&https, "meshgram_relay_envelopes_stored", &[], |n| n >= 6.0);
    assert_eq!(held, 6.0, "3 envelopes × 2 copies");
    assert_eq!(wait_sum(&https, "meshgram_relay_mailboxes_stored", &[], |n| n >= 2.0), 2.0);
    assert_eq!(texts(&meshgram(&bob, &["messages"]).ok_json()), ["one", "two", "three"]);

    let scrapes: Vec<Scrape> = https.iter().map(|http| Scrape::of(http)).collect();
    let sum = |sample: &str, labels: &[(&str, &str)]| -> f64 { scrapes.iter().map(|s| s.sum(sample, labels)).sum() };
    // Every metric docs/relay.md lists is there, and every one the dashboard and alerts use.
    let documented = documented_metrics(&repo_file("docs/relay.md"), "meshgram_relay_");
    assert!(documented.len() >= 30, "docs/relay.md lists {} metrics", documented.len());
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(repo_file(DASHBOARD)).unwrap()).unwrap();
    assert!(array(&dashboard["panels"], "panels").len() >= 10, "{dashboard}");
    let mut documented = documented;
    for file in [DASHBOARD, ALERTS] {
        let used = documented_metrics(&repo_file(file), "meshgram_relay_");
        assert!(used.len() >= 8, "{file} uses {used:?}");
        documented.extend(used);
    }
    for scrape in &scrapes {
        let names = scrape.names();
        let missing: Vec<&String> = documented.iter().filter(|d| !exported(&names, d)).collect();
        assert!(missing.is_empty(), "documented but not exported: {missing:?}\nexported: {names:?}");
        assert_eq!(scrape.type_of("meshgram_relay_request_duration_seconds").as_deref(), Some("histogram"));
        assert_eq!(scrape.sum("meshgram_relay_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    }
    // They moved with the traffic.
    assert!(sum("meshgram_relay_requests_total", &[("kind", "send")]) >= 3.0);
    assert!(sum("meshgram_relay_envelopes_received_total", &[]) >= 3.0);
    let latency = |protocol, kind| {
        sum("meshgram_relay_request_duration_seconds_count", &[("protocol", protocol), ("kind", kind)])
    };
    assert!(latency("mailbox", "send") >= 3.0, "sends timed");
    assert!(latency("mailbox", "fetch") >= 1.0, "fetches timed");
    assert!(latency("replica", "store") >= 3.0, "copies to the other relay timed");
    assert!(
        sum(
            "meshgram_relay_request_duration_seconds_bucket",
            &[("protocol", "mailbox"), ("kind", "send"), ("le", "+Inf")]
        ) >= 3.0
    );
    assert!(sum("meshgram_relay_replica_copies_total", &[("outcome", "written")]) >= 6.0);
    assert_eq!(sum("meshgram_relay_replication_unavailable_total", &[]), 0.0);
    assert!(sum("meshgram_relay_certificate_checks_total", &[("cert", "session"), ("outcome", "passed")]) >= 2.0);
    assert!(sum("meshgram_relay_certificate_checks_total", &[("cert", "relay"), ("outcome", "passed")]) >= 2.0);
    assert!(sum("meshgram_relay_disk_bytes", &[("part", "mailbox_store")]) > 0.0);
    assert!(sum("meshgram_relay_connections_total", &[]) >= 3.0);
    assert_eq!(wait_sum(&https, "meshgram_relay_connected_relays", &[], |n| n >= 2.0), 2.0, "each sees the other");
    assert!(wait_sum(&https, "meshgram_relay_connected_clients", &[], |n| n >= 1.0) >= 1.0, "the gateway at least");
    assert_eq!(wait_sum(&https, "meshgram_relay_routing_table_peers", &[], |n| n >= 2.0), 2.0);
    assert!(wait_sum(&https, "meshgram_relay_repair_rounds_total", &[], |n| n >= 1.0) >= 1.0);
    // Bob read them, and Alice her read receipts: nothing waits on either relay any more.
    meshgram(&alice, &["messages"]).ok_json();
    assert_eq!(wait_sum(&https, "meshgram_relay_envelopes_stored", &[], |n| n == 0.0), 0.0);

    // The gateway's, likewise.
    let gateway = Scrape::of(&mesh.gateway.server.http().expect("the gateway serves HTTP"));
    let names = gateway.names();
    let mut documented = documented_metrics(&repo_file("docs/gateway.md"), "meshgram_gateway_");
    assert!(documented.len() >= 7, "docs/gateway.md lists {} metrics", documented.len());
    documented
        .extend([DASHBOARD, ALERTS].iter().flat_map(|file| documented_metrics(&repo_file(file), "meshgram_gateway_")));
    let missing: Vec<&String> = documented.iter().filter(|d| !exported(&names, d)).collect();
    assert!(missing.is_empty(), "documented but not exported: {missing:?}\nexported: {names:?}");
    assert_eq!(gateway.sum("meshgram_gateway_codes_sent_total", &[("sink", "file")]), 2.0);
    assert_eq!(gateway.sum("meshgram_gateway_requests_total", &[("kind", "sign_in"), ("outcome", "ok")]), 2.0);
    assert!(gateway.sum("meshgram_gateway_request_duration_seconds_count", &[("kind", "sign_in")]) >= 2.0);
    assert!(gateway.sum("meshgram_gateway_sessions_active", &[]) >= 2.0);
    assert!(gateway.sum("meshgram_gateway_accounts", &[]) >= 2.0);

    // The relay told to log JSON wrote nothing else.
    let log = mesh.relays[1].stderr();
    assert!(!log.is_empty(), "the relay logged nothing");
    for line in &log {
        let entry: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(entry["timestamp"].is_string() && entry["level"].is_string(), "{line}");
    }
}

#[test]
fn bad_relay_configs_are_refused_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let key = meshgram_node::ids::hex(&libp2p::identity::ed25519::Keypair::generate().public().to_bytes());
    let data = dir.path().join("data").display().to_string();
    let good = format!("data_dir = {data:?}\ngateway_key = {key:?}\n");
    let cases = [
        (format!("{good}replicaton = 3\n"), "replicaton"),
        (format!("{good}[limits]\nsend_rate = 1\n"), "limits"),
        (format!("{good}listen = [\"/ip4/127.0.0.1/tcp/abc\"]\n"), "listen"),
        (format!("{good}bootstrap = [\"relay-1.example:4001\"]\n"), "bootstrap"),
        (format!("{good}http = 8080\n"), "http"),
        (format!("{good}http = \"localhost\"\n"), "http"),
        (format!("{good}replication = 0\n"), "replication"),
        (format!("{good}ttl_days = -1\n"), "ttl_days"),
        (format!("{good}log_format = \"xml\"\n"), "log_format"),
        (format!("data_dir = {data:?}\n"), "gateway_key"),
        (format!("data_dir = {data:?}\ngateway_key = \"00\"\n"), "gateway_key"),
    ];
    let relay = bin_path(RELAY_BIN);
    for (i, (text, key)) in cases.iter().enumerate() {
        let config = dir.path().join(format!("bad-{i}.toml"));
        std::fs::write(&config, text).unwrap();
        let out = run(&relay, &["--config", &config.display().to_string()], None);
        assert!(!out.status.success(), "{text} was taken");
        assert!(out.stderr.contains(key), "refusing\n{text}\nnames no `{key}`: {}", out.stderr);
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    }
    // Flags override the file, and are checked the same way.
    let config = dir.path().join("good.toml");
    std::fs::write(&config, &good).unwrap();
    let out = run(&relay, &["--config", &config.display().to_string(), "--replication", "0"], None);
    assert!(!out.status.success() && out.stderr.contains("replication"), "{}", out.stderr);
    // A good config with no certificate yet says how to get one.
    let out = run(&relay, &["--config", &config.display().to_string()], None);
    assert!(!out.status.success() && out.stderr.contains("relay-cert"), "{}", out.stderr);

    // init writes a config once, and never over one.
    let fresh = dir.path().join("fresh").display().to_string();
    let first = run(&relay, &["--data", &fresh, "--gateway-key", &key, "init"], None);
    assert!(first.status.success(), "{}", first.stderr);
    assert!(first.stdout.contains("relay-cert --relay 12D3KooW"), "{}", first.stdout);
    let written = std::fs::read_to_string(Path::new(&fresh).join("relay.toml")).unwrap();
    let again = run(&relay, &["--data", &fresh, "init"], None);
    assert!(!again.status.success() && again.stderr.contains("exists"), "{}", again.stderr);
    assert_eq!(std::fs::read_to_string(Path::new(&fresh).join("relay.toml")).unwrap(), written);
    let bad =
        run(&relay, &["--data", &dir.path().join("other").display().to_string(), "--gateway-key", "zz", "init"], None);
    assert!(!bad.status.success() && bad.stderr.contains("gateway_key"), "{}", bad.stderr);
}

#[test]
fn the_relays_systemd_unit_passes_systemd_analyze() {
    if run(Path::new("systemd-analyze"), &["--version"], None).status.code() != Some(0) {
        // ./tests/run installs systemd where it is missing; a machine without it cannot check.
        eprintln!("skipped: no systemd-analyze");
        return;
    }
    let unit = std::fs::read_to_string(repo_file("deploy/systemd/meshgram-relay.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/meshgram-relay --config "), "{unit}");
    // verify checks that ExecStart's binary exists: point it at the one built here.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meshgram-relay.service");
    let built = bin_path(RELAY_BIN).display().to_string();
    std::fs::write(&path, unit.replace("/usr/local/bin/meshgram-relay", &built)).unwrap();
    let path = path.display().to_string();
    let verify = run(Path::new("systemd-analyze"), &["verify", &path], None);
    assert!(verify.status.success(), "{}{}", verify.stdout, verify.stderr);
    // Unknown keys and bad values are only warnings to verify: there must be none.
    assert!(!verify.stderr.contains(&path) && !verify.stdout.contains(&path), "{}{}", verify.stdout, verify.stderr);
    // Its own measure of the hardening: 0 (locked down) to 10 (none); "OK" is below 4.
    let security = run(Path::new("systemd-analyze"), &["security", "--offline=yes", &path], None);
    let exposure = security
        .stdout
        .lines()
        .find_map(|line| line.split("Overall exposure level for").nth(1))
        .and_then(|rest| rest.split(':').nth(1))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|value| value.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {}{}", security.stdout, security.stderr));
    assert!(exposure <= 2.0, "exposure {exposure}:\n{}", security.stdout);
}
