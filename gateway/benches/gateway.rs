//! Gateway benchmark: `cargo bench -p meshgram-gateway`.
//!
//! Prints, each with a baseline measured in the same run:
//! 1. session certificate verifications per second on one thread, against a bare ed25519
//!    verification of a 32-byte message (the floor any certificate check pays);
//! 2. for one gateway on redb, and one and two gateways on PostgreSQL (a throwaway cluster on a
//!    unix socket, Debian's server), each with an empty database and with 1,000,000 accounts:
//!    full sign-ins per second (SendCode → code delivered to an SMS webhook → SignIn, over real
//!    loopback libp2p connections, durable commits), authenticated `GetMe` round trips, and
//!    lookups by username and by phone, by the same clients over the same connections; every
//!    figure also as a ratio to the same figure for redb with an empty database, this run.
//!
//! `MESHGRAM_BENCH_ACCOUNTS=N` fills N accounts instead of 1,000,000 (0 skips the full runs).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use libp2p::PeerId;
use libp2p::identity::ed25519;
use meshgram_gateway::Gateway;
use meshgram_gateway::config::{Config, Limits};
use meshgram_gateway::store::{Store, StoreError, StoredAccount};
use meshgram_node::client::{Client, GatewayAddr};
use meshgram_node::crypto::cert::{AccountKind, CertBody, SessionCert};
use meshgram_node::ids::{NoiseKey, Phone, SessionId, UserId, Username};
use meshgram_node::proto::{AuthRequest, AuthResponse, LookupQuery};
use meshgram_tests::Postgres;
use tokio::sync::{Mutex, Notify};

const VERIFY_SECS: f64 = 2.0;
const CLIENTS: usize = 8;
const SIGN_INS_PER_CLIENT: usize = 50;
const GET_ME_PER_CLIENT: usize = 200;
const LOOKUPS_PER_CLIENT: usize = 200;
/// Accounts in the "full" database, unless `MESHGRAM_BENCH_ACCOUNTS` says otherwise.
const FULL_ACCOUNTS: usize = 1_000_000;
/// Accounts written per transaction while filling.
const FILL_BATCH: usize = 10_000;
/// Every load loop is bounded in time as well as count.
const LOAD_DEADLINE: Duration = Duration::from_secs(60);

fn per_second(n: u64, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}

/// Runs `f` repeatedly for about `secs` seconds; returns calls per second.
fn rate(secs: f64, mut f: impl FnMut() -> bool) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..256 {
            assert!(f(), "verification must succeed");
        }
        n += 256;
    }
    per_second(n, start.elapsed())
}

fn bench_cert_verification() {
    let gateway = ed25519::Keypair::generate();
    let device = PeerId::random();
    let cert = SessionCert::sign(
        CertBody {
            user_id: UserId(1_000_001),
            device,
            noise_key: NoiseKey([7; 32]),
            session_id: SessionId(42),
            kind: AccountKind::User,
            not_before: 1_000,
            not_after: 4_600,
        },
        &gateway,
    );
    let public = gateway.public();
    let message = [9u8; 32];
    let signature = gateway.sign(&message);
    let raw = rate(VERIFY_SECS, || public.verify(&message, &signature));
    let certs = rate(VERIFY_SECS, || cert.verify_for(&public, &device, 2_000).is_ok());
    println!("certificate verification, 1 thread:");
    println!("  bare ed25519 verify (baseline)  {raw:>10.0} /s");
    println!(
        "  SessionCert::verify_for         {certs:>10.0} /s   ratio {:.2}x of baseline; target >= 20000/s: {}",
        certs / raw,
        if certs >= 20_000.0 { "met" } else { "NOT met" }
    );
}

/// An SMS provider stand-in: records each code and wakes waiters.
#[derive(Default)]
struct Sms {
    codes: Mutex<HashMap<String, String>>,
    arrived: Notify,
}

async fn receive_sms(State(sms): State<Arc<Sms>>, Json(body): Json<serde_json::Value>) -> &'static str {
    let phone = body["phone"].as_str().unwrap_or_default().to_string();
    let code = body["code"].as_str().unwrap_or_default().to_string();
    sms.codes.lock().await.insert(phone, code);
    sms.arrived.notify_waiters();
    "ok"
}

impl Sms {
    async fn take(&self, phone: &str) -> String {
        loop {
            let notified = self.arrived.notified();
            if let Some(code) = self.codes.lock().await.remove(phone) {
                return code;
            }
            // Bounded: the webhook is called before SendCode answers, so this rarely waits.
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
        }
    }
}

/// Where the gateways of one setup keep their accounts.
#[derive(Debug, Clone)]
enum Backend {
    Redb,
    /// A PostgreSQL database, by connection string.
    Postgres(String),
}

/// What one setup measured, per second.
#[derive(Debug, Clone, Copy)]
struct Figures {
    sign_ins: f64,
    get_me: f64,
    by_username: f64,
    by_phone: f64,
}

/// The phone and username of filler account `i`.
fn filler(i: usize) -> (Phone, Username) {
    let phone = format!("+1777{i:07}").parse().expect("invariant: a valid phone");
    let username = format!("filler{i}").parse().expect("invariant: a valid username");
    (phone, username)
}

/// The phone and username bench client `i` signs in and names itself with.
fn bench_client(i: usize) -> (Phone, Username) {
    let phone = format!("+1555900{i:04}").parse().expect("invariant: a valid phone");
    let username = format!("bench{i}").parse().expect("invariant: a valid username");
    (phone, username)
}

/// Writes `n` accounts (each with a phone and a username) straight into `store`.
fn fill_accounts(store: &Store, n: usize) -> Result<(), StoreError> {
    for start in (0..n).step_by(FILL_BATCH) {
        store.write(|t| {
            for i in start..(start + FILL_BATCH).min(n) {
                let (phone, username) = filler(i);
                let user_id = t.next_user_id()?;
                t.put_account(&StoredAccount {
                    user_id,
                    kind: AccountKind::User,
                    phone: Some(phone),
                    username: Some(username),
                    name: format!("Filler {i}"),
                    password_hash: None,
                    owner: None,
                    created_at: 1_800_000_000,
                })?;
            }
            Ok::<_, StoreError>(())
        })?;
    }
    Ok(())
}

/// Runs `per_client` calls of `op(client, client index, call index)` on every client at once;
/// returns calls per second.
async fn load<F>(
    clients: &[Arc<Client>],
    per_client: usize,
    op: impl Fn(Arc<Client>, usize, usize) -> F + Send + Sync + 'static,
) -> anyhow::Result<f64>
where
    F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, client) in clients.iter().enumerate() {
        let (client, op) = (Arc::clone(client), Arc::clone(&op));
        tasks.spawn(async move {
            let mut n = 0u64;
            for j in 0..per_client {
                if start.elapsed() > LOAD_DEADLINE {
                    break;
                }
                op(Arc::clone(&client), i, j).await?;
                n += 1;
            }
            anyhow::Ok(n)
        });
    }
    let mut calls = 0;
    while let Some(done) = tasks.join_next().await {
        calls += done??;
    }
    Ok(per_second(calls, start.elapsed()))
}

/// [`load`] of one gateway request per call (a refusal fails the benchmark).
async fn load_requests(
    clients: &[Arc<Client>],
    per_client: usize,
    request: impl Fn(usize, usize) -> AuthRequest + Send + Sync + 'static,
) -> anyhow::Result<f64> {
    let request = Arc::new(request);
    load(clients, per_client, move |client, i, j| {
        let request = request(i, j);
        async move { client.call(request).await.map(|_| ()).map_err(anyhow::Error::from) }
    })
    .await
}

/// One sign-in of `client` as `phone`, its code taken from the SMS stand-in.
async fn sign_in(client: &Client, phone: Phone, sms: &Sms) -> anyhow::Result<()> {
    client.call(AuthRequest::SendCode { phone: phone.clone() }).await?;
    let code = sms.take(phone.as_str()).await;
    let device = client.identity.device_keys();
    match client.call(AuthRequest::SignIn { phone, code, device, device_name: "bench".into(), password: None }).await? {
        AuthResponse::SignedIn { .. } => Ok(()),
        other => anyhow::bail!("unexpected {other:?}"),
    }
}

/// Starts `gateways` gateways (sharing one signing key) on `backend`, after writing `fill`
/// filler accounts into it, and measures them; lookups ask for the `held` fillers it has.
async fn bench_setup(backend: &Backend, gateways: usize, fill: usize, held: usize) -> anyhow::Result<Figures> {
    let dir = tempfile::tempdir()?;
    let sms = Arc::new(Sms::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sms_url = format!("http://{}/sms", listener.local_addr()?);
    let app = axum::Router::new().route("/sms", axum::routing::post(receive_sms)).with_state(Arc::clone(&sms));
    let sms_server = tokio::spawn(async move { axum::serve(listener, app).await });

    let database = match backend {
        Backend::Redb => None,
        Backend::Postgres(url) => Some(url.clone()),
    };
    let first_data = dir.path().join("gw0");
    if fill > 0 {
        let (database, first_data) = (database.clone(), first_data.clone());
        let filled = Instant::now();
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let store = match database {
                Some(url) => Store::connect(&url, None)?,
                None => {
                    std::fs::create_dir_all(&first_data).map_err(|e| StoreError::Unavailable(e.to_string()))?;
                    Store::open(&first_data.join(meshgram_gateway::DATABASE_FILE))?
                }
            };
            fill_accounts(&store, fill)
        })
        .await??;
        println!("    (filled {fill} accounts in {:.0} s)", filled.elapsed().as_secs_f64());
    }
    let limits = Limits {
        send_code_burst: 1_000_000,
        send_code_device_burst: 1_000_000,
        send_codes_per_second: 1_000_000,
        sign_in_burst: 1_000_000,
        lookup_burst: 1_000_000,
        ..Limits::default()
    };
    let mut running = Vec::new();
    for g in 0..gateways {
        let data_dir = dir.path().join(format!("gw{g}"));
        if g > 0 {
            std::fs::create_dir_all(&data_dir)?;
            let key = meshgram_gateway::GATEWAY_KEY_FILE;
            std::fs::copy(first_data.join(key), data_dir.join(key))?;
        }
        let config = Config {
            data_dir,
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
            http: None,
            code_sink: Some(format!("webhook:{sms_url}")),
            database: database.clone(),
            database_ca: None,
            limits: limits.clone(),
        };
        running.push(Gateway::start(config).await?);
    }

    // Clients spread over the gateways, each signed in and named once before measuring.
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let gateway = &running[i % gateways];
        let addr = GatewayAddr::from_multiaddr(&gateway.ready.listen[0])?;
        let client = Client::open(&dir.path().join(format!("client{i}")), addr)?;
        let (phone, username) = bench_client(i);
        sign_in(&client, phone, &sms).await?;
        client.call(AuthRequest::SetProfile { username: Some(username.as_str().to_string()), name: None }).await?;
        clients.push(Arc::new(client));
    }

    let sign_ins = load(&clients, SIGN_INS_PER_CLIENT, move |client, i, j| {
        let sms = Arc::clone(&sms);
        async move { sign_in(&client, format!("+1555{i:03}{j:05}").parse()?, &sms).await }
    })
    .await?;
    let get_me = load_requests(&clients, GET_ME_PER_CLIENT, |_, _| AuthRequest::GetMe).await?;
    // Spread over the whole table: a filler when there are any, else a bench client.
    let looked_up = move |i: usize, j: usize| match held {
        0 => bench_client(j % CLIENTS),
        _ => filler((i * 7_919 + j * 104_729) % held),
    };
    let by_username = load_requests(&clients, LOOKUPS_PER_CLIENT, move |i, j| {
        AuthRequest::Lookup(LookupQuery::Username(looked_up(i, j).1))
    })
    .await?;
    let by_phone = load_requests(&clients, LOOKUPS_PER_CLIENT, move |i, j| {
        AuthRequest::Lookup(LookupQuery::Phone(looked_up(i, j).0))
    })
    .await?;

    drop(clients);
    for gateway in running {
        gateway.shutdown().await;
    }
    sms_server.abort();
    Ok(Figures { sign_ins, get_me, by_username, by_phone })
}

async fn bench_gateways() -> anyhow::Result<()> {
    let full = std::env::var("MESHGRAM_BENCH_ACCOUNTS").ok().and_then(|n| n.parse().ok()).unwrap_or(FULL_ACCOUNTS);
    let pg = tokio::task::spawn_blocking(Postgres::start_durable).await?;
    let mut databases = 0;
    let mut fresh_database = || {
        databases += 1;
        pg.sql(&format!("CREATE DATABASE bench{databases}"));
        Backend::Postgres(pg.url_of(&format!("bench{databases}")))
    };
    // (database, its backend, gateways, accounts it holds, accounts to fill in first)
    let mut setups = vec![
        ("redb", Backend::Redb, 1, 0, 0),
        ("postgres", fresh_database(), 1, 0, 0),
        ("postgres", fresh_database(), 2, 0, 0),
    ];
    if full > 0 {
        setups.push(("redb", Backend::Redb, 1, full, full));
        // One full database for both PostgreSQL setups: filling it is the slow part.
        let filled = fresh_database();
        setups.push(("postgres", filled.clone(), 1, full, full));
        setups.push(("postgres", filled, 2, full, 0));
    }
    println!(
        "gateways, {CLIENTS} clients over loopback TCP, durable commits (PostgreSQL: fsync and synchronous_commit on):"
    );
    println!(
        "  {:<9} {:>9} {:>8} {:>11} {:>9} {:>14} {:>14}",
        "database", "accounts", "gateways", "sign-ins/s", "GetMe/s", "by username/s", "by phone/s"
    );
    let mut baseline: Option<Figures> = None;
    for (name, backend, gateways, held, fill) in setups {
        let figures = bench_setup(&backend, gateways, fill, held).await?;
        println!(
            "  {name:<9} {held:>9} {gateways:>8} {:>11.0} {:>9.0} {:>14.0} {:>14.0}",
            figures.sign_ins, figures.get_me, figures.by_username, figures.by_phone
        );
        let base = *baseline.get_or_insert(figures);
        println!(
            "  {:<28} {:>10.2}x {:>8.2}x {:>13.2}x {:>13.2}x   (ratio to redb, empty)",
            "",
            figures.sign_ins / base.sign_ins,
            figures.get_me / base.get_me,
            figures.by_username / base.by_username,
            figures.by_phone / base.by_phone
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --benches` would pass nothing and we still run.
    bench_cert_verification();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(bench_gateways())
}
