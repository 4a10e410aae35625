//! Mesh vs mosquitto: one sender → one recipient through three real `meshgram-relay` processes
//! with durable acknowledgements (replication 2), against a mosquitto broker (QoS 1) that this
//! benchmark starts on loopback, in the same run; then relay memory per idle connected client
//! against mosquitto's.
//!
//! Run it with `tests/bench/mesh_vs_mosquitto.sh` (installs mosquitto, builds, raises
//! `ulimit -n`), or once `cargo build --release --workspace --bins` is done:
//! `cargo bench -p meshgram-relay --bench mesh -- --help`.
//!
//! # Layout
//! - `servers`: starts relays and mosquitto as child processes (127.0.0.1, port 0 or a free
//!   port, under `timeout`, in a temp dir, stopped by pid) and reads their `/proc` figures.
//! - `mesh`: three relays, a pipelined sender of pre-sealed envelopes, a long-polling recipient
//!   that acknowledges what it gets; the idle-client swarm; the `e2e` sealing rate.
//! - `mqtt`: the same load through mosquitto with rumqttc; raw idle MQTT connections.
//! - `stats`: one clock, per-message timestamps, percentiles, the pacer.
//!
//! Every phase is bounded in count and time; every server is stopped when the benchmark ends.

mod groups;
mod mesh;
mod mqtt;
mod servers;
mod stats;

use std::future::Future;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;

use crate::mesh::{MemoryFigures, MeshOptions, MeshRig};
use crate::mqtt::MqttRig;
use crate::servers::{MosquittoProcess, cpu_time_of};
use crate::stats::{Percentiles, PhaseFigures, Tracker, fmt_count, fmt_duration, now_ns};

/// Messages sent before the timed phases, to open connections and warm caches and files.
const WARMUP: usize = 1_000;
/// One-at-a-time round trips timed for the latency floor figures.
const PROBES: usize = 200;
/// How long sealing and opening are each timed.
const SEAL_SECS: f64 = 1.0;
/// The aims from the issue.
const AIM_THROUGHPUT_RATIO: f64 = 1.0;
const AIM_PACED_P99: Duration = Duration::from_millis(2);
const AIM_IDLE_KIB: f64 = 64.0;

#[derive(Parser, Debug)]
#[command(name = "mesh", about = "Mesh (3 relays, R=2, durable acks) vs mosquitto (QoS 1), one run")]
struct Args {
    /// Messages in the saturated phase.
    #[arg(long, default_value_t = 50_000)]
    messages: usize,
    /// Envelopes per `Send` in the saturated phase (at most 256, the protocol's batch limit).
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// `Send`s unanswered at once in the saturated phase.
    #[arg(long, default_value_t = 8)]
    inflight: usize,
    /// Messages per second in the paced phase.
    #[arg(long, default_value_t = 1_000.0)]
    paced_rate: f64,
    /// Length of the paced phase.
    #[arg(long, default_value_t = 10)]
    paced_secs: u64,
    /// Longest a saturated phase may run.
    #[arg(long, default_value_t = 60)]
    phase_timeout_secs: u64,
    /// Idle clients connected for the memory figure.
    #[arg(long, default_value_t = 5_000)]
    idle_clients: usize,
    /// Idle clients connecting at once.
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
    /// How long the idle clients stay connected before memory is read.
    #[arg(long, default_value_t = 5)]
    idle_secs: u64,
    /// Where `meshgram-relay` is (default: the workspace's target/release).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The mosquitto binary.
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    mosquitto: PathBuf,
    /// Where servers keep their data (default: a new temp dir, removed at the end).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Every server is killed after this many seconds, whatever happens.
    #[arg(long, default_value_t = 900)]
    server_limit_secs: u64,
    /// Send through a relay that holds neither copy (both copies remote), instead of the
    /// recipient's first mailbox relay as `Messenger` does, to see what the extra hop costs.
    #[arg(long)]
    entry_holds_no_copy: bool,
    #[arg(long)]
    skip_throughput: bool,
    #[arg(long)]
    skip_memory: bool,
    #[arg(long)]
    skip_mosquitto: bool,
    /// Run only the groups comparison: one message to a group of `--group-members` members
    /// against the same as one-to-one envelopes.
    #[arg(long)]
    groups: bool,
    #[arg(long, default_value_t = 1_000)]
    group_members: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// What one system did under the two loads.
#[derive(Debug)]
struct LoadResults {
    saturated: PhaseFigures,
    paced: PhaseFigures,
    /// How late the pacer's ticks fired (should be well under the interval).
    paced_lag: Option<Percentiles>,
    saturated_cpu: Cpu,
    paced_cpu: Cpu,
    /// Mesh only: one `Send` of one envelope at a time, and one empty `Fetch` at a time.
    send_rtt: Option<Percentiles>,
    fetch_rtt: Option<Percentiles>,
    /// Mesh only: the recipient's fetch → ack turns during the saturated and paced phases.
    recipient: Vec<(&'static str, RecipientFigures)>,
}

/// How the recipient's loop spent a phase.
#[derive(Debug)]
struct RecipientFigures {
    cycles: usize,
    envelopes_per_cycle: f64,
    fetch: Option<Percentiles>,
}

impl RecipientFigures {
    fn of(cycles: &[mesh::Cycle], phase: &PhaseFigures) -> Self {
        let end = phase.start + phase.elapsed.as_nanos() as u64;
        let during: Vec<&mesh::Cycle> = cycles.iter().filter(|c| c.start >= phase.start && c.start < end).collect();
        let envelopes: usize = during.iter().map(|c| c.envelopes).sum();
        RecipientFigures {
            cycles: during.len(),
            envelopes_per_cycle: envelopes as f64 / during.len().max(1) as f64,
            fetch: Percentiles::of(during.iter().map(|c| c.fetch).collect()),
        }
    }
}

/// CPU used during a phase.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    /// By the server processes (relays or mosquitto).
    servers: Duration,
    /// By this process: the clients.
    clients: Duration,
}

impl Cpu {
    fn now(server_pids: &[u32]) -> anyhow::Result<Self> {
        let mut servers = Duration::ZERO;
        for pid in server_pids {
            servers += cpu_time_of(&pid.to_string())?;
        }
        Ok(Cpu { servers, clients: cpu_time_of("self")? })
    }

    fn since(self, server_pids: &[u32]) -> anyhow::Result<Self> {
        let now = Cpu::now(server_pids)?;
        Ok(Cpu { servers: now.servers.saturating_sub(self.servers), clients: now.clients.saturating_sub(self.clients) })
    }
}

#[derive(Debug, Default)]
struct Results {
    seal_per_sec: f64,
    open_per_sec: f64,
    /// The relay's store alone, in this process.
    store: mesh::StoreFigures,
    mesh: Option<LoadResults>,
    mqtt: Option<LoadResults>,
    mesh_memory: Option<MemoryFigures>,
    mqtt_memory: Option<MemoryFigures>,
    errors: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!((1..=256).contains(&args.batch), "--batch must be 1 to 256");
    anyhow::ensure!(
        (1..=mesh::MAX_INFLIGHT).contains(&args.inflight),
        "--inflight must be 1 to {} (libp2p request-response streams per connection)",
        mesh::MAX_INFLIGHT
    );
    anyhow::ensure!(args.paced_rate > 0.0, "--paced-rate must be positive");
    now_ns(); // starts the clock
    let temp = match &args.work_dir {
        Some(dir) => tempfile::Builder::new().prefix("mesh-bench-").tempdir_in(dir)?,
        None => tempfile::Builder::new().prefix("mesh-bench-").tempdir()?,
    };
    let bin_dir = args.bin_dir.clone().unwrap_or_else(default_bin_dir);
    let relay_bin = bin_dir.join("meshgram-relay");
    anyhow::ensure!(
        relay_bin.is_file(),
        "{} is missing: run `cargo build --release --workspace --bins`",
        relay_bin.display()
    );
    let options = MeshOptions {
        relay_bin,
        dir: temp.path().to_path_buf(),
        server_limit: Duration::from_secs(args.server_limit_secs),
        entry_holds_no_copy: args.entry_holds_no_copy,
    };

    if args.groups {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        println!(
            "groups: one message to {} members, as a group post and as one-to-one envelopes ...",
            args.group_members
        );
        let figures =
            runtime.block_on(groups::group_vs_direct(&options, args.group_members, args.connect_concurrency))?;
        drop(runtime);
        report_groups(&figures);
        return Ok(());
    }
    let mut results = Results::default();
    println!("e2e sealing (Noise X, 256-byte sealed message, 1 thread, {SEAL_SECS} s each) ...");
    (results.seal_per_sec, results.open_per_sec) = mesh::seal_open_rates(temp.path(), SEAL_SECS)?;

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(&args, &options, &mut results));
    drop(runtime);
    report(&args, &results);
    if let Err(e) = temp.close() {
        eprintln!("could not remove the temp dir: {e}");
    }
    Ok(())
}

fn default_bin_dir() -> PathBuf {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    match std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir.join("release"),
        Some(dir) => workspace.join(dir).join("release"),
        None => workspace.join("target").join("release"),
    }
}

/// Runs each part; a part that fails is reported and the others still run.
async fn run(args: &Args, options: &MeshOptions, results: &mut Results) {
    let mut note = |what: &str, e: anyhow::Error| {
        eprintln!("{what} failed: {e:#}");
        results.errors.push(format!("{what}: {e:#}"));
    };
    let mut loads = (None, None);
    let mut memory = (None, None);
    let mut store = mesh::StoreFigures::default();
    if !args.skip_throughput {
        println!("relay store latency, in this process ...");
        match mesh::store_latency(&options.dir, PROBES).await {
            Ok(r) => store = r,
            Err(e) => note("store commit latency", e),
        }
        println!("mesh throughput and latency ...");
        match mesh_load(args, options).await {
            Ok(r) => loads.0 = Some(r),
            Err(e) => note("mesh load", e),
        }
        if !args.skip_mosquitto {
            println!("mosquitto throughput and latency ...");
            match mqtt_load(args, options).await {
                Ok(r) => loads.1 = Some(r),
                Err(e) => note("mosquitto load", e),
            }
        }
    }
    if !args.skip_memory {
        let idle = Duration::from_secs(args.idle_secs);
        println!("relay memory with {} idle clients ...", args.idle_clients);
        match mesh::idle_clients(options, args.idle_clients, args.connect_concurrency, idle).await {
            Ok(r) => memory.0 = Some(r),
            Err(e) => note("relay idle clients", e),
        }
        if !args.skip_mosquitto {
            println!("mosquitto memory with {} idle clients ...", args.idle_clients);
            match mqtt_memory(args, options, idle).await {
                Ok(r) => memory.1 = Some(r),
                Err(e) => note("mosquitto idle clients", e),
            }
        }
    }
    results.store = store;
    (results.mesh, results.mqtt) = loads;
    (results.mesh_memory, results.mqtt_memory) = memory;
}

/// The message numbers of each phase: warm-up, saturated, paced.
fn phases(args: &Args) -> (Range<usize>, Range<usize>, Range<usize>) {
    let paced = (args.paced_rate * args.paced_secs as f64).round() as usize;
    let saturated = WARMUP..WARMUP + args.messages;
    (0..WARMUP, saturated.clone(), saturated.end..saturated.end + paced)
}

/// Runs `send`, then waits (until `deadline`) for every message of `range` to be received and,
/// for MQTT, acknowledged.
async fn phase(
    tracker: &Arc<Tracker>,
    range: Range<usize>,
    deadline: Instant,
    count_bulk_acks: bool,
    send: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<PhaseFigures> {
    let start = now_ns();
    let acks_before = tracker.bulk_acks();
    let target = tracker.total_received() + range.len() as u64;
    send.await?;
    let done = || {
        tracker.total_received() >= target
            && (!count_bulk_acks || tracker.bulk_acks() - acks_before >= range.len() as u64)
    };
    while !done() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(tracker.summarize(range, start, acks_before))
}

async fn mesh_load(args: &Args, options: &MeshOptions) -> anyhow::Result<LoadResults> {
    let (warmup, saturated, paced) = phases(args);
    let probes = paced.end..paced.end + PROBES;
    let tracker = Arc::new(Tracker::new(probes.end));
    let mut rig = MeshRig::start(options, probes.end).await?;
    println!(
        "  sender → relay {} ({}) → R=2 → recipient fetches from relay {}",
        rig.entry.peer_id,
        if options.entry_holds_no_copy { "not a mailbox relay" } else { "the recipient's first mailbox relay" },
        rig.fetch_from.peer_id
    );
    rig.start_receiving(Arc::clone(&tracker));
    let timeout = Duration::from_secs(args.phase_timeout_secs);

    let deadline = Instant::now() + timeout;
    let warm = phase(
        &tracker,
        warmup.clone(),
        deadline,
        false,
        rig.send_saturated(warmup, args.batch, args.inflight, &tracker, deadline),
    )
    .await?;
    println!("  warm-up: {} of {} delivered", warm.delivered, warm.expected);
    let (send_rtt, fetch_rtt) = rig.round_trips(probes, &tracker).await?;
    let settle = Instant::now() + Duration::from_secs(5);
    while tracker.total_received() < (WARMUP + PROBES) as u64 && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    let pids = rig.relay_pids();
    let before = Cpu::now(&pids)?;
    let deadline = Instant::now() + timeout;
    let saturated_figures = phase(
        &tracker,
        saturated.clone(),
        deadline,
        false,
        rig.send_saturated(saturated, args.batch, args.inflight, &tracker, deadline),
    )
    .await?;
    let saturated_cpu = before.since(&pids)?;
    println!(
        "  saturated: {} of {} delivered in {:.2} s",
        saturated_figures.delivered,
        saturated_figures.expected,
        saturated_figures.elapsed.as_secs_f64()
    );

    let deadline = Instant::now() + Duration::from_secs(args.paced_secs) + timeout;
    let mut lag = None;
    let before = Cpu::now(&pids)?;
    let paced_figures = phase(&tracker, paced.clone(), deadline, false, async {
        lag = rig.send_paced(paced, args.paced_rate, &tracker, deadline).await?;
        Ok(())
    })
    .await?;
    let paced_cpu = before.since(&pids)?;
    println!("  paced: {} of {} delivered", paced_figures.delivered, paced_figures.expected);
    let (opened, cycles) = rig.finish().await?;
    let recipient = vec![
        ("saturated", RecipientFigures::of(&cycles, &saturated_figures)),
        ("paced", RecipientFigures::of(&cycles, &paced_figures)),
    ];
    println!("  opened {opened} sampled envelopes after the run: sender and content verified");
    Ok(LoadResults {
        saturated: saturated_figures,
        paced: paced_figures,
        paced_lag: lag,
        saturated_cpu,
        paced_cpu,
        send_rtt,
        fetch_rtt,
        recipient,
    })
}

async fn mqtt_load(args: &Args, options: &MeshOptions) -> anyhow::Result<LoadResults> {
    let (warmup, saturated, paced) = phases(args);
    let tracker = Arc::new(Tracker::new(paced.end));
    let broker = MosquittoProcess::start(&args.mosquitto, &options.dir.join("mosquitto"), options.server_limit)?;
    let rig = MqttRig::start(broker.port, Arc::clone(&tracker)).await?;
    let timeout = Duration::from_secs(args.phase_timeout_secs);

    let deadline = Instant::now() + timeout;
    let warm = phase(&tracker, warmup.clone(), deadline, true, rig.publish_saturated(warmup, deadline)).await?;
    println!("  warm-up: {} of {} delivered", warm.delivered, warm.expected);

    let pids = [broker.process.pid()];
    let before = Cpu::now(&pids)?;
    let deadline = Instant::now() + timeout;
    let saturated_figures =
        phase(&tracker, saturated.clone(), deadline, true, rig.publish_saturated(saturated, deadline)).await?;
    let saturated_cpu = before.since(&pids)?;
    println!(
        "  saturated: {} of {} delivered in {:.2} s",
        saturated_figures.delivered,
        saturated_figures.expected,
        saturated_figures.elapsed.as_secs_f64()
    );

    let deadline = Instant::now() + Duration::from_secs(args.paced_secs) + timeout;
    let mut lag = None;
    let before = Cpu::now(&pids)?;
    let paced_figures = phase(&tracker, paced.clone(), deadline, true, async {
        lag = rig.publish_paced(paced, args.paced_rate, deadline).await?;
        Ok(())
    })
    .await?;
    let paced_cpu = before.since(&pids)?;
    println!("  paced: {} of {} delivered", paced_figures.delivered, paced_figures.expected);
    anyhow::ensure!(rig.healthy(), "an MQTT connection failed during the run (see above)");
    drop(rig);
    drop(broker);
    Ok(LoadResults {
        saturated: saturated_figures,
        paced: paced_figures,
        paced_lag: lag,
        saturated_cpu,
        paced_cpu,
        send_rtt: None,
        fetch_rtt: None,
        recipient: Vec::new(),
    })
}

async fn mqtt_memory(args: &Args, options: &MeshOptions, idle: Duration) -> anyhow::Result<MemoryFigures> {
    let broker = MosquittoProcess::start(&args.mosquitto, &options.dir.join("mosquitto-idle"), options.server_limit)?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss_before_kib, fds_before) = (broker.process.rss_kib()?, broker.process.open_fds()?);
    let started = Instant::now();
    let streams = mqtt::idle_connections(broker.port, args.idle_clients, args.connect_concurrency).await?;
    let connect_time = started.elapsed();
    tokio::time::sleep(idle).await;
    let (rss_after_kib, fds_after) = (broker.process.rss_kib()?, broker.process.open_fds()?);
    let figures = MemoryFigures {
        clients: streams.len(),
        connections: fds_after.saturating_sub(fds_before),
        rss_before_kib,
        rss_after_kib,
        connect_time,
    };
    drop(streams);
    drop(broker);
    Ok(figures)
}

// ---------------------------------------------------------------------------------------------
// Report

fn report_groups(f: &groups::GroupFigures) {
    println!("\nOne message to {} members, 3 relays (replication 2), same run:", f.members);
    println!("| | delivered | p50 | p99 | all | relays store |");
    println!("|---|---|---|---|---|---|");
    let rows = [
        ("group post (stored once), all reading its relay", &f.group),
        ("channel post, each reading its own relay (mirrored)", &f.channel),
        ("one-to-one envelopes", &f.direct),
    ];
    for (name, d) in rows {
        let (p50, p99) = d.latency.map_or(("-".into(), "-".into()), |p| (fmt_duration(p.p50), fmt_duration(p.p99)));
        println!(
            "| {name} | {}/{} | {p50} | {p99} | {} | {} bytes |",
            d.delivered,
            f.members,
            fmt_duration(d.all),
            fmt_count(d.stored_bytes as f64)
        );
    }
    let per_relay: Vec<String> = f.channel_readers.iter().map(|n| fmt_count(*n as f64)).collect();
    println!(
        "readers per relay: group post {} on its closest relay; channel post {} (the third mirrors it)",
        fmt_count(f.members as f64),
        per_relay.join(" / ")
    );
    println!(
        "relay storage: one-to-one / group = {}; time until all have it: one-to-one / group = {}",
        ratio(f.direct.stored_bytes as f64, f.group.stored_bytes as f64),
        ratio(f.direct.all.as_secs_f64(), f.group.all.as_secs_f64())
    );
}

fn ratio(mesh: f64, baseline: f64) -> String {
    if baseline > 0.0 { format!("{:.2}x", mesh / baseline) } else { "-".into() }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

fn report(args: &Args, r: &Results) {
    println!();
    println!("==== Mesh vs mosquitto — one sender → one recipient, 256-byte payloads, same run ====");
    println!(
        "mesh: 3 relays, replication 2, Stored only after both copies are committed (fsync); sender sends through {}; saturated: {} envelopes per Send, {} Sends in flight; paced: 1 envelope per Send; \
         recipient: long-poll Fetch(max 256), each acknowledging the batch before",
        if args.entry_holds_no_copy { "a relay holding no copy" } else { "the recipient's first mailbox relay" },
        args.batch,
        args.inflight
    );
    println!(
        "mosquitto: QoS 1, persistence on (periodic snapshot, no fsync per message), publisher {} in flight, 1 subscriber",
        mqtt::INFLIGHT
    );
    println!(
        "e2e sealing (pre-sealed before timing; opened only for samples after): seal {}/s, open {}/s on one thread",
        fmt_count(r.seal_per_sec),
        fmt_count(r.open_per_sec)
    );
    println!();
    println!("{:<44} {:>16} {:>16} {:>16}", "", "mesh", "mosquitto", "mesh/mosquitto");
    let lat = |f: Option<&PhaseFigures>, pick: PickPercentile| -> Option<Duration> {
        f.and_then(|f| f.latency.as_ref()).map(pick)
    };
    let row = |what: &str, mesh: Option<f64>, mqtt: Option<f64>, fmt: &dyn Fn(f64) -> String| {
        let cell = |v: Option<f64>| v.map_or_else(|| "-".to_string(), fmt);
        let ratio = match (mesh, mqtt) {
            (Some(m), Some(q)) => ratio(m, q),
            _ => "-".into(),
        };
        println!("{what:<44} {:>16} {:>16} {:>16}", cell(mesh), cell(mqtt), ratio);
    };
    let ms = |v: f64| fmt_duration(Duration::from_secs_f64(v));
    let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    let (mesh, mqtt) = (r.mesh.as_ref(), r.mqtt.as_ref());
    row(
        &format!("saturated throughput, msg/s ({} msgs)", fmt_count(args.messages as f64)),
        sat(mesh).map(PhaseFigures::rate),
        sat(mqtt).map(PhaseFigures::rate),
        &fmt_count,
    );
    row(
        "saturated: accepted (Stored/PUBACK), msg/s",
        sat(mesh).map(PhaseFigures::acked_rate),
        sat(mqtt).map(PhaseFigures::acked_rate),
        &fmt_count,
    );
    for (name, pick) in percentile_picks() {
        row(&format!("saturated latency {name}"), secs(lat(sat(mesh), pick)), secs(lat(sat(mqtt), pick)), &ms);
    }
    for (name, pick) in percentile_picks() {
        row(
            &format!("paced {}/s latency {name}", fmt_count(args.paced_rate)),
            secs(lat(pac(mesh), pick)),
            secs(lat(pac(mqtt), pick)),
            &ms,
        );
    }
    let ack = |f: Option<&PhaseFigures>, pick: PickPercentile| {
        f.and_then(|f| f.ack_latency.as_ref()).map(pick).map(|d| d.as_secs_f64())
    };
    row("saturated durable ack (Send→Stored) p50", ack(sat(mesh), |p| p.p50), None, &ms);
    row("saturated durable ack (Send→Stored) p99", ack(sat(mesh), |p| p.p99), None, &ms);
    row("paced durable ack (Send→Stored) p50", ack(pac(mesh), |p| p.p50), None, &ms);
    row("paced durable ack (Send→Stored) p99", ack(pac(mesh), |p| p.p99), None, &ms);
    let floor = |p: Option<Percentiles>, pick: PickPercentile| p.as_ref().map(pick).map(|d| d.as_secs_f64());
    let send_rtt = mesh.and_then(|l| l.send_rtt);
    let fetch_rtt = mesh.and_then(|l| l.fetch_rtt);
    row("one Send of 1 envelope at a time, RTT p50", floor(send_rtt, |p| p.p50), None, &ms);
    row("one Send of 1 envelope at a time, RTT p99", floor(send_rtt, |p| p.p99), None, &ms);
    row("one empty Fetch at a time, RTT p50", floor(fetch_rtt, |p| p.p50), None, &ms);
    row("one empty Fetch at a time, RTT p99", floor(fetch_rtt, |p| p.p99), None, &ms);
    let batch = mesh::STORE_BATCH;
    for (what, p) in [
        ("store alone: put 1 envelope (synced log append + commit)".to_string(), r.store.put_one),
        (format!("store alone: put {batch} envelopes"), r.store.put_batch),
        (format!("store alone: delete {batch} (an Ack; not synced on its own)"), r.store.delete_batch),
    ] {
        row(&format!("{what} p50"), floor(p, |p| p.p50), None, &ms);
        row(&format!("{what} p99"), floor(p, |p| p.p99), None, &ms);
    }
    // CPU per message delivered: what the hardware pays, whichever process pays it.
    let per_msg = |l: Option<&LoadResults>, pick: fn(&LoadResults) -> (Duration, usize)| {
        l.map(pick).map(|(cpu, n)| cpu.as_secs_f64() * 1e6 / n.max(1) as f64)
    };
    let one_decimal = |v: f64| format!("{v:.1}");
    type Pick = fn(&LoadResults) -> (Duration, usize);
    let picks: [(&str, Pick); 4] = [
        ("server CPU per message, saturated (µs)", |l| (l.saturated_cpu.servers, l.saturated.delivered)),
        ("client CPU per message, saturated (µs)", |l| (l.saturated_cpu.clients, l.saturated.delivered)),
        ("server CPU per message, paced (µs)", |l| (l.paced_cpu.servers, l.paced.delivered)),
        ("client CPU per message, paced (µs)", |l| (l.paced_cpu.clients, l.paced.delivered)),
    ];
    for (what, pick) in picks {
        row(what, per_msg(mesh, pick), per_msg(mqtt, pick), &one_decimal);
    }
    let (mm, qm) = (r.mesh_memory.as_ref(), r.mqtt_memory.as_ref());
    row(
        &format!("idle client memory, KiB each ({} clients)", args.idle_clients),
        mm.map(MemoryFigures::per_client_kib),
        qm.map(MemoryFigures::per_client_kib),
        &|v| format!("{v:.1}"),
    );
    println!();
    for (name, l) in [("mesh", mesh), ("mosquitto", mqtt)] {
        if let Some(l) = l {
            for (phase, f) in [("saturated", &l.saturated), ("paced", &l.paced)] {
                println!(
                    "{name} {phase}: delivered {}/{}, acked {}, duplicates {}, {:.2} s, latency max {}{}",
                    f.delivered,
                    f.expected,
                    f.acked,
                    f.duplicates,
                    f.elapsed.as_secs_f64(),
                    f.latency.map_or_else(|| "-".into(), |p| fmt_duration(p.max)),
                    if f.complete() { "" } else { "  (INCOMPLETE: hit the phase time limit)" }
                );
            }
            for (phase, f) in &l.recipient {
                let p50 = |p: &Option<Percentiles>| p.map_or_else(|| "-".into(), |p| fmt_duration(p.p50));
                println!(
                    "{name} {phase}: recipient made {} Fetch turns (each acknowledging the batch before) of {:.1} \
                     envelopes on average; Fetch RTT p50 {} (includes waiting for mail)",
                    f.cycles,
                    f.envelopes_per_cycle,
                    p50(&f.fetch),
                );
            }
            if let Some(lag) = l.paced_lag {
                println!(
                    "{name} paced: the pacer's ticks fired late by p50 {}, p99 {}, max {}",
                    fmt_duration(lag.p50),
                    fmt_duration(lag.p99),
                    fmt_duration(lag.max)
                );
            }
        }
    }
    for (name, m) in [("relay", mm), ("mosquitto", qm)] {
        if let Some(m) = m {
            println!(
                "{name} memory: {} clients connected in {:.1} s, {} sockets held, VmRSS {} → {} KiB",
                m.clients,
                m.connect_time.as_secs_f64(),
                m.connections,
                m.rss_before_kib,
                m.rss_after_kib
            );
        }
    }
    for e in &r.errors {
        println!("ERROR {e}");
    }

    println!();
    if let (Some(m), Some(q)) = (sat(mesh), sat(mqtt)) {
        println!(
            "SUMMARY saturated throughput: mesh {} msg/s, mosquitto {} msg/s, ratio {} (aim >= {AIM_THROUGHPUT_RATIO:.1}x: {})",
            fmt_count(m.rate()),
            fmt_count(q.rate()),
            ratio(m.rate(), q.rate()),
            verdict(m.rate() >= AIM_THROUGHPUT_RATIO * q.rate() && m.complete())
        );
    }
    for (name, pick) in percentile_picks() {
        if let (Some(m), Some(q)) = (lat(pac(mesh), pick), lat(pac(mqtt), pick)) {
            let aim = if name == "p99" {
                format!(" (aim <= {}: {})", fmt_duration(AIM_PACED_P99), verdict(m <= AIM_PACED_P99))
            } else {
                String::new()
            };
            println!(
                "SUMMARY paced {}/s latency {name}: mesh {}, mosquitto {}, ratio {}{aim}",
                fmt_count(args.paced_rate),
                fmt_duration(m),
                fmt_duration(q),
                ratio(m.as_secs_f64(), q.as_secs_f64())
            );
        }
    }
    for (name, pick) in percentile_picks() {
        if let (Some(m), Some(q)) = (lat(sat(mesh), pick), lat(sat(mqtt), pick)) {
            println!(
                "SUMMARY saturated latency {name}: mesh {}, mosquitto {}, ratio {}",
                fmt_duration(m),
                fmt_duration(q),
                ratio(m.as_secs_f64(), q.as_secs_f64())
            );
        }
    }
    if let (Some(m), Some(q)) = (mm, qm) {
        println!(
            "SUMMARY idle client memory ({} clients): relay {:.1} KiB each, mosquitto {:.1} KiB each, ratio {} (aim < {AIM_IDLE_KIB:.0} KiB: {})",
            m.clients,
            m.per_client_kib(),
            q.per_client_kib(),
            ratio(m.per_client_kib(), q.per_client_kib()),
            verdict(m.per_client_kib() < AIM_IDLE_KIB && m.clients == args.idle_clients)
        );
    }
    println!(
        "SUMMARY e2e sealing, one thread: seal {}/s, open {}/s (not in the timed path; a sender seals once per recipient device)",
        fmt_count(r.seal_per_sec),
        fmt_count(r.open_per_sec)
    );
}

fn sat(l: Option<&LoadResults>) -> Option<&PhaseFigures> {
    l.map(|l| &l.saturated)
}

fn pac(l: Option<&LoadResults>) -> Option<&PhaseFigures> {
    l.map(|l| &l.paced)
}

/// Picks one percentile out of a set.
type PickPercentile = fn(&Percentiles) -> Duration;

fn percentile_picks() -> [(&'static str, PickPercentile); 3] {
    [("p50", |p| p.p50), ("p99", |p| p.p99), ("p99.9", |p| p.p999)]
}
