//! Gateways on PostgreSQL (a real server, a throwaway cluster per test): two gateways on one
//! database serve the same accounts, and what must be unique or single-use stays so across
//! them; a redb gateway moves over with `migrate` and its users stay signed in.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use meshgram_node::ids::Phone;
use meshgram_node::proto::{AuthRequest, AuthResponse, ErrorCode};
use meshgram_tests::{CODE_TIMEOUT, Gateway, Mesh, Postgres, RawClient, meshgram, relay_metric, run, str_field};

use crate::durability::kill_9_and_restart_keeps_accounts_sessions_and_identity_of;
use crate::{ALICE, BOB, lookup, sessions};

/// Two gateways of one network (one signing key) on one database.
fn two_gateways(pg: &Postgres) -> (Gateway, Gateway) {
    let a = Gateway::builder().database(&pg.url()).start();
    let b = Gateway::builder().database(&pg.url()).same_key_as(&a).start();
    (a, b)
}

fn phone(number: &str) -> Phone {
    number.parse().unwrap()
}

/// Asks `gw` (`client`'s gateway) for a code for `number` and returns it, from the gateway's sink.
async fn code_from(gw: &Gateway, client: &RawClient, number: &str) -> String {
    let before = gw.codes_for(number).len();
    let sent = client.auth(AuthRequest::SendCode { phone: phone(number) }).await;
    assert!(matches!(sent, AuthResponse::CodeSent { .. }), "{sent:?}");
    let deadline = Instant::now() + CODE_TIMEOUT;
    loop {
        if let Some(code) = gw.codes_for(number).get(before) {
            return code.clone();
        }
        assert!(Instant::now() < deadline, "no code for {number} reached the sink");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sign_in(client: &RawClient, number: &str, code: &str) -> AuthRequest {
    AuthRequest::SignIn {
        phone: phone(number),
        code: code.to_string(),
        device: client.device_keys(),
        device_name: "raw".into(),
        password: None,
    }
}

fn error_code(response: &AuthResponse) -> Option<ErrorCode> {
    match response {
        AuthResponse::Error(e) => Some(e.code),
        _ => None,
    }
}

#[test]
fn a_gateway_on_postgres_survives_kill_9_like_one_on_redb() {
    let pg = Postgres::start();
    kill_9_and_restart_keeps_accounts_sessions_and_identity_of(Gateway::builder().database(&pg.url()).start());
}

#[test]
fn two_gateways_on_one_database_serve_the_same_accounts_and_exactly_one_wins_a_username() {
    let pg = Postgres::start();
    let (a, b) = two_gateways(&pg);
    let (alice_p, bob_p) = (a.new_profile("alice"), b.new_profile("bob"));
    let alice = a.login(&alice_p, ALICE);
    let bob = b.login(&bob_p, BOB);
    assert_ne!(alice["user_id"], bob["user_id"], "user ids come from one sequence");

    // A profile set through one gateway is what the other looks up.
    meshgram(&alice_p, &["profile", "set", "--username", "alice", "--name", "Alice"]).ok_json();
    let card = lookup(&bob_p, "@alice");
    assert_eq!(card["user_id"], alice["user_id"], "{card}");
    assert_eq!(card["name"], "Alice", "{card}");
    // Alice's second device signs in at the other gateway: the same account, two sessions.
    let alice2_p = b.new_profile("alice2");
    let alice2 = b.login(&alice2_p, ALICE);
    assert_eq!(alice2["user_id"], alice["user_id"], "{alice2}");
    assert_eq!(alice2["new_account"], false, "{alice2}");
    assert_eq!(sessions(&alice_p).len(), 2);

    // Both ask for the same free username at the same moment, each at its own gateway.
    for round in 0..6 {
        let name = format!("race{round}");
        let (mine, theirs) = std::thread::scope(|s| {
            let mine = s.spawn(|| meshgram(&alice_p, &["profile", "set", "--username", &name]));
            let theirs = s.spawn(|| meshgram(&bob_p, &["profile", "set", "--username", &name]));
            (mine.join().unwrap(), theirs.join().unwrap())
        });
        let won: Vec<_> = [&mine, &theirs].into_iter().filter(|out| out.status.success()).collect();
        assert_eq!(won.len(), 1, "exactly one wins @{name}:\n{mine}\n{theirs}");
        let lost = if mine.status.success() { &theirs } else { &mine };
        lost.expect_err(&["USERNAME_OCCUPIED"]);
        let winner = if mine.status.success() { &alice } else { &bob };
        let card = lookup(&alice_p, &format!("@{name}"));
        assert_eq!(card["user_id"], winner["user_id"], "{card}");
    }
    assert_eq!(pg.sql("SELECT count(*) FROM accounts"), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_sent_through_one_gateway_is_accepted_once_then_refused_at_the_other() {
    let pg = Postgres::start();
    let (a, b) = two_gateways(&pg);
    let at_a = RawClient::new(&a.addr());
    let at_b = at_a.same_device_at(&b.addr());
    let code = code_from(&a, &at_a, ALICE).await;

    let signed_in = at_b.auth(sign_in(&at_b, ALICE, &code)).await;
    assert!(matches!(signed_in, AuthResponse::SignedIn { new_account: true, .. }), "{signed_in:?}");
    for device in [&at_a, &at_b] {
        let again = device.auth(sign_in(device, ALICE, &code)).await;
        assert_eq!(error_code(&again), Some(ErrorCode::PhoneCodeExpired), "{again:?}");
    }

    // Both gateways asked at once: one code, one sign-in, whatever the race.
    let racer_a = RawClient::new(&a.addr());
    let racer_b = racer_a.same_device_at(&b.addr());
    let code = code_from(&b, &racer_b, BOB).await;
    let (won_a, won_b) =
        tokio::join!(racer_a.auth(sign_in(&racer_a, BOB, &code)), racer_b.auth(sign_in(&racer_b, BOB, &code)));
    let won = [&won_a, &won_b].iter().filter(|r| matches!(r, AuthResponse::SignedIn { .. })).count();
    assert_eq!(won, 1, "{won_a:?}\n{won_b:?}");
    assert_eq!(pg.sql("SELECT count(*) FROM sessions WHERE active"), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_requests_for_a_number_are_limited_across_gateways() {
    let pg = Postgres::start();
    let (a, b) = two_gateways(&pg);
    let at_a = RawClient::new(&a.addr());
    let at_b = at_a.same_device_at(&b.addr());
    // The default allows 5 codes per number at once: 3 through one gateway, 2 through the other.
    for (gw, device) in [(&a, &at_a), (&a, &at_a), (&a, &at_a), (&b, &at_b), (&b, &at_b)] {
        code_from(gw, device, ALICE).await;
    }
    for device in [&at_a, &at_b] {
        let refused = device.auth(AuthRequest::SendCode { phone: phone(ALICE) }).await;
        let AuthResponse::Error(e) = &refused else { panic!("a sixth code was sent: {refused:?}") };
        assert_eq!(e.code, ErrorCode::FloodWait, "{e:?}");
        assert!(e.message.contains("this number"), "{e:?}");
    }
    // Other numbers are not held up.
    code_from(&b, &at_b, BOB).await;
}

#[test]
fn a_session_revoked_at_one_gateway_cannot_renew_at_the_other() {
    let pg = Postgres::start();
    let (a, b) = two_gateways(&pg);
    let (phone_p, laptop_p) = (a.new_profile("phone"), b.new_profile("laptop"));
    a.login(&phone_p, ALICE);
    b.login(&laptop_p, ALICE);
    meshgram(&phone_p, &["renew"]).ok_json();

    let revoked = meshgram(&laptop_p, &["sessions", "revoke", "--others"]).ok_json();
    assert_eq!(revoked["revoked"], 1, "{revoked}");
    meshgram(&phone_p, &["renew"]).expect_err(&["SESSION_REVOKED"]);
    meshgram(&phone_p, &["whoami"]).expect_err(&["SESSION_REVOKED"]);
    meshgram(&laptop_p, &["renew"]).ok_json();

    // A gateway on PostgreSQL shuts down cleanly (closing its connections off the async threads).
    let (mut a, mut b) = (a, b);
    for gw in [&mut a, &mut b] {
        let status = gw.server.terminate();
        assert!(status.is_some_and(|s| s.success()), "{status:?}\n{:?}", gw.server.stderr());
    }
}

#[test]
fn a_gateway_killed_under_a_sign_in_loop_leaves_every_client_to_the_other() {
    const CLIENTS: usize = 4;
    const SIGN_INS: usize = 5;
    let pg = Postgres::start();
    let mut a = Gateway::builder().database(&pg.url()).start();
    let b = Gateway::builder().database(&pg.url()).same_key_as(&a).same_code_sink_as(&a).start();
    let (addr_a, addr_b) = (a.addr(), b.addr());
    let both = ["--gateway", addr_a.as_str(), "--gateway", addr_b.as_str()];
    let signed_in = AtomicUsize::new(0);
    let tries = AtomicUsize::new(0);

    let profiles = std::thread::scope(|s| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (b, both, signed_in, tries) = (&b, &both, &signed_in, &tries);
                s.spawn(move || {
                    let mut profiles = Vec::new();
                    for k in 0..SIGN_INS {
                        let phone = format!("+1555{c:03}{k:04}");
                        // A sign-in caught by the kill (its code used at the dying gateway just
                        // before) fails as such; the user asks for a new code, at most twice.
                        let mut done = None;
                        for attempt in 0..3 {
                            tries.fetch_add(1, Ordering::SeqCst);
                            let profile = b.new_profile(&format!("c{c}-{k}-{attempt}"));
                            let login = b.login_via(both, &profile, &phone, &[], |code| vec![code.to_string()]);
                            if login.status.success() {
                                done = Some((profile, login.ok_json()));
                                break;
                            }
                        }
                        let (profile, login) = done.unwrap_or_else(|| panic!("{phone} never signed in"));
                        signed_in.fetch_add(1, Ordering::SeqCst);
                        profiles.push((profile, login));
                    }
                    profiles
                })
            })
            .collect();
        // Kill one gateway once a few sign-ins are through, with the rest still to come.
        let deadline = Instant::now() + Duration::from_secs(60);
        while signed_in.load(Ordering::SeqCst) < CLIENTS && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        a.kill9();
        let before_kill = signed_in.load(Ordering::SeqCst);
        assert!(before_kill < CLIENTS * SIGN_INS, "the loop was over before the kill");
        println!("{before_kill} of {} sign-ins were through when one gateway was killed", CLIENTS * SIGN_INS);
        clients.into_iter().flat_map(|c| c.join().unwrap()).collect::<Vec<_>>()
    });

    assert_eq!(profiles.len(), CLIENTS * SIGN_INS, "every client finished every sign-in");
    let retries = tries.load(Ordering::SeqCst) - CLIENTS * SIGN_INS;
    println!("{retries} sign-ins were asked again");
    assert!(retries <= CLIENTS, "{retries} sign-ins had to be asked again: more than the kill can explain");
    // Every session works through the gateway that is left.
    for (profile, login) in profiles.iter().step_by(3) {
        let me = meshgram(profile, &["whoami"]).ok_json();
        assert_eq!(me["account"]["user_id"], login["user_id"], "{me}");
    }
    assert_eq!(pg.sql("SELECT count(*) FROM accounts"), (CLIENTS * SIGN_INS).to_string());
}

#[test]
fn with_one_gateway_dead_relays_learn_revocations_from_the_other_and_messages_flow() {
    let pg = Postgres::start();
    let a = Gateway::builder().database(&pg.url()).start();
    let b = Gateway::builder().database(&pg.url()).same_key_as(&a).same_code_sink_as(&a).start();
    let mut mesh = Mesh::start_on_gateways(vec![a, b], 1, 1);
    let (phone_p, laptop_p, bob_p) = (mesh.new_profile("phone"), mesh.new_profile("laptop"), mesh.new_profile("bob"));
    mesh.login(&phone_p, ALICE);
    mesh.login(&laptop_p, ALICE);
    mesh.login(&bob_p, BOB);
    meshgram(&bob_p, &["send", ALICE, "before"]).ok_json();

    mesh.gateway.kill9();
    meshgram(&bob_p, &["send", ALICE, "after"]).ok_json();
    let revoked = meshgram(&laptop_p, &["sessions", "revoke", "--others"]).ok_json();
    assert_eq!(revoked["revoked"], 1, "{revoked}");
    // The relay polls for revocations every 2 s, now answered by the gateway that is left.
    let relay = &mesh.relays[0];
    let deadline = Instant::now() + Duration::from_secs(15);
    while relay_metric(relay, "meshgram_relay_sessions_revoked_total").unwrap_or(0) < 1 {
        assert!(Instant::now() < deadline, "the relay never learned of the revocation");
        std::thread::sleep(Duration::from_millis(100));
    }
    let texts = meshgram_tests::texts(&meshgram(&laptop_p, &["messages", BOB]).ok_json());
    assert_eq!(texts, ["before", "after"], "both reached the device that is still signed in");
}

#[test]
fn a_database_restart_under_a_running_gateway_is_waited_out_not_an_error() {
    let mut pg = Postgres::start();
    let gw = Gateway::builder().database(&pg.url()).start();
    let alice_p = gw.new_profile("alice");
    let alice = gw.login(&alice_p, ALICE);
    meshgram(&alice_p, &["renew"]).ok_json();

    // Every connection the gateway holds breaks; a request made while the database is down
    // waits (up to 10 s) and goes on once it is back, on new connections.
    pg.stop();
    let (renewed, took) = std::thread::scope(|s| {
        let renew = s.spawn(|| {
            let started = Instant::now();
            (meshgram(&alice_p, &["renew"]), started.elapsed())
        });
        std::thread::sleep(Duration::from_secs(2));
        pg.start_again();
        renew.join().unwrap()
    });
    assert_eq!(renewed.ok_json()["session_id"], alice["session_id"], "{renewed}");
    assert!(took >= Duration::from_millis(1500), "renewed in {took:?}: before the database was back?");
    // And the gateway goes on as before, without a restart of its own.
    let bob = gw.login(&gw.new_profile("bob"), BOB);
    assert_eq!(bob["new_account"], true, "{bob}");
    assert_eq!(lookup(&alice_p, BOB)["user_id"], bob["user_id"]);
}

#[test]
fn migrate_moves_a_redb_gateway_to_postgres_and_its_users_stay_signed_in() {
    let pg = Postgres::start();
    let mut gw = Gateway::start();
    let (alice_p, bob_p) = (gw.new_profile("alice"), gw.new_profile("bob"));
    let alice = gw.login(&alice_p, ALICE);
    let bob = gw.login(&bob_p, BOB);
    meshgram(&alice_p, &["profile", "set", "--username", "alice", "--name", "Alice"]).ok_json();
    let created = meshgram(&alice_p, &["bot", "create", "--username", "echo_bot", "--name", "Echo"]).ok_json();
    let token = str_field(&created, "token").to_string();
    let before = sessions(&alice_p);

    // The gateway holds its database open: migrate refuses while it runs.
    let busy = gw.operator(&["migrate", "--to", &pg.url()]);
    assert!(!busy.status.success(), "migrated from a running gateway:\n{busy}");
    assert!(busy.stderr.contains("still running"), "{busy}");

    gw.kill9();
    let migrated = gw.operator(&["migrate", "--to", &pg.url()]);
    assert!(migrated.status.success(), "{migrated}");
    assert!(migrated.stdout.contains("copied"), "{migrated}");
    // A second run would mix two gateways' data: refused, and nothing changes.
    let again = gw.operator(&["migrate", "--to", &pg.url()]);
    assert!(!again.status.success() && again.stderr.contains("already holds gateway data"), "{again}");
    assert_eq!(pg.sql("SELECT count(*) FROM accounts"), "3");

    // The redb file is set aside so that only PostgreSQL can be answering.
    let redb = gw.data_dir().join("gateway.redb");
    std::fs::rename(&redb, redb.with_extension("redb.migrated")).unwrap();
    gw.restart_same_port_with(&["--database", &pg.url()]);
    assert!(!redb.exists(), "the gateway on PostgreSQL made no new redb file");

    for (profile, login) in [(&alice_p, &alice), (&bob_p, &bob)] {
        let me = meshgram(profile, &["whoami"]).ok_json();
        assert_eq!(me["account"]["user_id"], login["user_id"], "{me}");
        assert_eq!(me["session_id"], login["session_id"], "{me}");
        meshgram(profile, &["renew"]).ok_json();
    }
    assert_eq!(sessions(&alice_p).len(), before.len());
    assert_eq!(lookup(&bob_p, "@alice")["name"], "Alice");
    let bot = gw.login_bot(&gw.new_profile("echo"), &token).ok_json();
    assert_eq!(bot["user_id"], created["bot"]["user_id"], "{bot}");
    // Ids go on from where redb left them.
    let carol = gw.login(&gw.new_profile("carol"), "+15550003333");
    let carol_id = carol["user_id"].as_u64().unwrap();
    let bot_id = created["bot"]["user_id"].as_u64().unwrap();
    assert_eq!(carol_id, bot_id + 1, "{carol}");
}

#[test]
fn over_tcp_the_database_is_reached_with_tls_and_a_certificate_it_cannot_show_is_refused() {
    let pg = Postgres::start_tls();
    let ca = pg.ca_file().display().to_string();
    let gw = Gateway::builder().database(&pg.tcp_url("require")).arg("--database-ca").arg(&ca).start();
    let profile = gw.new_profile("alice");
    gw.login(&profile, ALICE);
    let encrypted = pg.sql(
        "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = 'meshgram-gateway'",
    );
    assert_eq!(encrypted, "t", "every gateway connection is TLS");

    // Without the authority, the server's certificate is nobody's the gateway trusts.
    let gateway = meshgram_tests::bin_path(meshgram_tests::GATEWAY_BIN);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let url = pg.tcp_url("require");
    let out = run(&gateway, &["--data", &data, "--database", &url, "--http", "127.0.0.1:0"], None);
    assert!(!out.status.success(), "{out}");
    assert!(out.stderr.contains("certificate"), "{out}");
}

#[test]
fn a_bad_database_url_or_an_unreachable_database_is_a_clear_error() {
    let gateway = meshgram_tests::bin_path(meshgram_tests::GATEWAY_BIN);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let nowhere = format!("host={} user=meshgram dbname=postgres connect_timeout=1", dir.path().display());
    for (url, says) in [("postgres://[::1", "does not parse"), (nowhere.as_str(), "database unavailable")] {
        let out = run(&gateway, &["--data", &data, "--database", url, "--http", "127.0.0.1:0"], None);
        assert!(!out.status.success(), "{out}");
        assert!(out.stderr.contains(says), "expected {says:?}:\n{out}");
    }
    assert!(!Path::new(&dir.path().join("gateway.redb")).exists());
}
