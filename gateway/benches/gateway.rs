//! Gateway benchmark: `cargo bench -p meshgram-gateway`.
//!
//! Prints, each with a baseline measured in the same run:
//! 1. session certificate verifications per second on one thread, against a bare ed25519
//!    verification of a 32-byte message (the floor any certificate check pays);
//! 2. full sign-ins per second (SendCode → code delivered to an SMS webhook → SignIn, over real
//!    loopback libp2p connections, durable redb commits), against authenticated `GetMe` round
//!    trips by the same clients over the same connections.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use libp2p::PeerId;
use libp2p::identity::ed25519;
use meshgram_gateway::Gateway;
use meshgram_gateway::config::{Config, Limits};
use meshgram_node::client::{Client, GatewayAddr};
use meshgram_node::crypto::cert::{AccountKind, CertBody, SessionCert};
use meshgram_node::ids::{NoiseKey, Phone, SessionId, UserId};
use meshgram_node::proto::{AuthRequest, AuthResponse};
use tokio::sync::{Mutex, Notify};

const VERIFY_SECS: f64 = 2.0;
const CLIENTS: usize = 8;
const SIGN_INS_PER_CLIENT: usize = 50;
const GET_ME_PER_CLIENT: usize = 200;
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

async fn bench_sign_in() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let sms = Arc::new(Sms::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sms_url = format!("http://{}/sms", listener.local_addr()?);
    let app = axum::Router::new().route("/sms", axum::routing::post(receive_sms)).with_state(Arc::clone(&sms));
    let sms_server = tokio::spawn(async move { axum::serve(listener, app).await });

    let limits = Limits { send_code_burst: 1_000_000, sign_in_burst: 1_000_000, ..Limits::default() };
    let config = Config {
        data_dir: dir.path().join("gw"),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
        http: None,
        code_sink: Some(format!("webhook:{sms_url}")),
        database: None,
        limits,
    };
    let gateway = Gateway::start(config).await?;
    let addr = GatewayAddr::from_multiaddr(&gateway.ready.listen[0])?;

    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let profile = dir.path().join(format!("client{i}"));
        clients.push(Arc::new((Client::open(&profile, addr.clone())?, profile)));
    }

    let sign_in = |client: Arc<(Client, std::path::PathBuf)>, phone: Phone, sms: Arc<Sms>| async move {
        let (client, _) = &*client;
        client.call(AuthRequest::SendCode { phone: phone.clone() }).await?;
        let code = sms.take(phone.as_str()).await;
        let device = client.identity.device_keys();
        match client
            .call(AuthRequest::SignIn { phone, code, device, device_name: "bench".into(), password: None })
            .await?
        {
            AuthResponse::SignedIn { .. } => Ok(()),
            other => anyhow::bail!("unexpected {other:?}"),
        }
    };
    // Warm-up: connect and create the accounts.
    for (i, c) in clients.iter().enumerate() {
        sign_in(Arc::clone(c), format!("+1555900{i:04}").parse()?, Arc::clone(&sms)).await?;
    }

    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, c) in clients.iter().enumerate() {
        let (c, sms) = (Arc::clone(c), Arc::clone(&sms));
        tasks.spawn(async move {
            let mut n = 0u64;
            for j in 0..SIGN_INS_PER_CLIENT {
                if start.elapsed() > LOAD_DEADLINE {
                    break;
                }
                let phone: Phone = format!("+1555{i:03}{j:05}").parse()?;
                sign_in(Arc::clone(&c), phone, Arc::clone(&sms)).await?;
                n += 1;
            }
            anyhow::Ok(n)
        });
    }
    let mut sign_ins = 0;
    while let Some(done) = tasks.join_next().await {
        sign_ins += done??;
    }
    let sign_in_rate = per_second(sign_ins, start.elapsed());

    let start = Instant::now();
    for c in &clients {
        let c = Arc::clone(c);
        tasks.spawn(async move {
            let mut n = 0u64;
            for _ in 0..GET_ME_PER_CLIENT {
                if start.elapsed() > LOAD_DEADLINE {
                    break;
                }
                c.0.call(AuthRequest::GetMe).await?;
                n += 1;
            }
            anyhow::Ok(n)
        });
    }
    let mut get_mes = 0;
    while let Some(done) = tasks.join_next().await {
        get_mes += done??;
    }
    let get_me_rate = per_second(get_mes, start.elapsed());

    println!("sign-in round trips, {CLIENTS} clients over loopback TCP, durable commits:");
    println!("  GetMe round trips (baseline)    {get_me_rate:>10.0} /s   ({get_mes} calls)");
    println!(
        "  SendCode+webhook+SignIn         {sign_in_rate:>10.0} /s   ({sign_ins} sign-ins)   ratio {:.2}x of baseline",
        sign_in_rate / get_me_rate
    );
    drop(clients);
    gateway.shutdown().await;
    sms_server.abort();
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --benches` would pass nothing and we still run.
    bench_cert_verification();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(bench_sign_in())
}
