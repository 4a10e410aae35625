//! The two storage backends answer alike: one script of writes and reads through `Tables`, run
//! on redb and on a real PostgreSQL (a throwaway cluster, Debian's server), must read back the
//! same; and a redb database copied with `migrate_from` reads back the same from PostgreSQL.

// A failed unwrap here is a failed test, which is what it should be.
#![allow(clippy::unwrap_used)]

use libp2p::PeerId;
use libp2p::identity::ed25519;
use meshgram_gateway::store::{
    ChannelName, CodeRecord, PasswordGuard, PgStore, PhoneGuard, RedbStore, Store, StoreError, StoredAccount,
    StoredSession,
};
use meshgram_node::crypto::cert::{AccountKind, Revocation, RevocationBody, Revoked};
use meshgram_node::crypto::identity::DeviceIdentity;
use meshgram_node::ids::{Phone, SessionId, UserId, Username};
use meshgram_node::proto::{BackupRecord, BotCommandInfo, KdfParams};
use meshgram_tests::Postgres;

const T0: u64 = 1_800_000_000;

/// Fixed inputs, so that both backends get the very same ones.
struct Inputs {
    devices: Vec<(PeerId, meshgram_node::crypto::identity::DeviceKeys)>,
    relay: PeerId,
    signer: ed25519::Keypair,
    _dirs: Vec<tempfile::TempDir>,
}

fn inputs() -> Inputs {
    let mut dirs = Vec::new();
    let mut devices = Vec::new();
    for _ in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let identity = DeviceIdentity::load_or_create(dir.path()).unwrap();
        devices.push((identity.peer_id(), identity.device_keys()));
        dirs.push(dir);
    }
    Inputs { devices, relay: PeerId::random(), signer: ed25519::Keypair::generate(), _dirs: dirs }
}

fn phone(s: &str) -> Phone {
    s.parse().unwrap()
}

fn name(s: &str) -> Username {
    s.parse().unwrap()
}

fn account(user_id: UserId, phone_number: Option<&str>, username: Option<&str>, kind: AccountKind) -> StoredAccount {
    StoredAccount {
        user_id,
        kind,
        phone: phone_number.map(phone),
        username: username.map(name),
        name: format!("account {}", user_id.0),
        password_hash: None,
        owner: None,
        created_at: T0,
    }
}

fn session(inputs: &Inputs, device: usize, id: u64, user: UserId) -> StoredSession {
    let (peer, keys) = inputs.devices[device].clone();
    StoredSession {
        session_id: SessionId(id),
        user_id: user,
        device: peer,
        keys,
        device_name: format!("device {device}"),
        kind: AccountKind::User,
        created_at: T0,
        last_seen: T0,
        revoked_at: None,
    }
}

fn revocation(inputs: &Inputs, device: usize, until: u64) -> Revocation {
    let body = RevocationBody {
        peer: inputs.devices[device].0,
        revoked: Revoked::Session(SessionId(device as u64)),
        revoked_at: T0,
        until,
    };
    Revocation::sign(body, &inputs.signer)
}

/// Writes through every accessor, returning what the reads said, line by line.
fn script(store: &Store, inputs: &Inputs) -> Vec<String> {
    let mut said = Vec::new();
    let mut say = |what: &str, value: String| said.push(format!("{what}: {value}"));
    store
        .write(|t| {
            let alice = t.next_user_id()?;
            let bob = t.next_user_id()?;
            let bot = t.next_user_id()?;
            t.put_account(&account(alice, Some("+15550001111"), Some("Alice"), AccountKind::User))?;
            t.put_account(&account(bob, Some("+15550002222"), None, AccountKind::User))?;
            let mut echo = account(bot, None, Some("echo_bot"), AccountKind::Bot);
            echo.owner = Some(alice);
            t.put_account(&echo)?;
            t.put_bot_secret(bot, Some(alice), &[7; 32])?;
            t.put_session(&session(inputs, 0, 10, alice))?;
            t.put_session(&session(inputs, 1, 11, alice))?;
            t.put_session(&session(inputs, 2, 12, bob))?;
            // Ids are random u64s: one from 2^63 up must sort as redb sorts it, last.
            let mut high = session(inputs, 2, u64::MAX - 1, alice);
            high.device = PeerId::random();
            t.put_session(&high)?;
            Ok::<_, StoreError>(())
        })
        .unwrap();
    store
        .write(|t| {
            let (alice, bob, bot) = (UserId(1_000_001), UserId(1_000_002), UserId(1_000_003));
            // A username moves: the old one is free again, lookups are case-insensitive.
            let mut renamed = t.account(alice)?.unwrap();
            renamed.username = Some(name("alice_w"));
            t.put_account(&renamed)?;
            // A session ends: it stays the device's latest, and leaves the active ones.
            let mut ended = t.session(SessionId(11))?.unwrap();
            ended.revoked_at = Some(T0 + 5);
            t.put_session(&ended)?;
            t.put_password_guard(alice, &PasswordGuard { wrong: 2, locked_until: 0 })?;
            t.put_password_guard(bob, &PasswordGuard { wrong: 1, locked_until: 9 })?;
            t.put_password_guard(bob, &PasswordGuard::default())?;
            t.put_phone_guard(&phone("+15550001111"), &PhoneGuard { wrong: 3, last_wrong_at: T0, locked_until: 0 })?;
            for (device, expires_at) in [(0, T0 + 300), (1, T0 - 5000), (2, T0 - 10)] {
                let record =
                    CodeRecord { code_hash: [device as u8; 32], expires_at, wrong_attempts: 1, locked_until: 0 };
                t.put_code(&phone("+15550001111"), &inputs.devices[device].0, &record)?;
            }
            t.put_code(
                &phone("+15550002222"),
                &inputs.devices[0].0,
                &CodeRecord { code_hash: [9; 32], expires_at: 0, wrong_attempts: 0, locked_until: 0 },
            )?;
            t.remove_stale_codes(&phone("+15550001111"), &|c| c.expires_at + 1000 < T0)?;
            t.remove_code(&phone("+15550001111"), &inputs.devices[2].0)?;
            for i in 0..5u8 {
                let record = BackupRecord {
                    created_at: T0 + u64::from(i),
                    kdf: KdfParams { salt: [i; 16], m_kib: 8, t: 1, p: 1 },
                    sealed: vec![i; 4],
                };
                t.put_backup(alice, &record, 3)?;
            }
            let commands = vec![BotCommandInfo { command: "start".into(), description: "Start".into() }];
            t.put_bot_commands(bot, &commands)?;
            t.put_bot_commands(bob, &commands)?;
            t.put_bot_commands(bob, &[])?;
            t.put_channel_name(&name("News_room"), &ChannelName { owner: alice, link: "link-1".into() })?;
            t.put_channel_name(&name("gone_room"), &ChannelName { owner: bob, link: "link-2".into() })?;
            t.remove_channel_name(&name("gone_room"))?;
            t.put_bot_secret(bot, None, &[8; 32])?;
            for (device, until) in [(0, T0 - 1), (1, T0 + 3600), (2, u64::MAX)] {
                t.add_revocation(&revocation(inputs, device, until))?;
            }
            t.put_revoked_relay(&inputs.relay, T0)?;
            t.put_revoked_relay(&inputs.relay, T0 + 99)?;
            Ok::<_, StoreError>(())
        })
        .unwrap();
    // What a read transaction writes is discarded.
    store
        .read(|t| {
            t.put_account(&account(UserId(1_000_009), Some("+15559999999"), Some("ghost"), AccountKind::User))?;
            Ok::<_, StoreError>(())
        })
        .unwrap();
    store
        .write(|t| {
            let pruned = t.prune_revocations(T0)?;
            say("pruned", pruned.to_string());
            Ok::<_, StoreError>(())
        })
        .unwrap();
    let said_reads = store
        .read(|t| {
            let mut out = Vec::new();
            let (alice, bob, bot) = (UserId(1_000_001), UserId(1_000_002), UserId(1_000_003));
            out.push(format!("alice: {:?}", t.account(alice)?));
            out.push(format!("by phone: {:?}", t.account_by_phone(&phone("+15550002222"))?.map(|a| a.user_id)));
            out.push(format!("by new name: {:?}", t.account_by_username(&name("ALICE_W"))?.map(|a| a.user_id)));
            out.push(format!("old name: {:?}", t.username_holder(&name("alice"))?));
            out.push(format!("ghost: {:?}", t.account_by_username(&name("ghost"))?));
            out.push(format!("next id: {:?}", t.next_user_id()?));
            out.push(format!("session 11: {:?}", t.session(SessionId(11))?.map(|s| s.revoked_at)));
            let latest = t.session_of_device(&inputs.devices[1].0)?.map(|s| (s.session_id, s.revoked_at));
            out.push(format!("device 1: {latest:?}"));
            let active: Vec<u64> = t.active_sessions(alice)?.iter().map(|s| s.session_id.0).collect();
            out.push(format!("alice active: {active:?}"));
            out.push(format!("bob active: {}", t.active_sessions(bob)?.len()));
            out.push(format!("guards: {:?} {:?}", t.password_guard(alice)?, t.password_guard(bob)?));
            out.push(format!("phone guard: {:?}", t.phone_guard(&phone("+15550001111"))?));
            for device in 0..3 {
                let code = t.code(&phone("+15550001111"), &inputs.devices[device].0)?.map(|c| c.code_hash[0]);
                out.push(format!("code {device}: {code:?}"));
            }
            out.push(format!(
                "other phone's code: {:?}",
                t.code(&phone("+15550002222"), &inputs.devices[0].0)?.is_some()
            ));
            let backups: Vec<u64> = t.backups(alice)?.iter().map(|b| b.created_at - T0).collect();
            out.push(format!("backups: {backups:?} / {}", t.backups(bob)?.len()));
            out.push(format!("commands: {:?} / {:?}", t.bot_commands(bot)?, t.bot_commands(bob)?));
            out.push(format!(
                "channels: {:?} {:?}",
                t.channel_name(&name("news_ROOM"))?,
                t.channel_name(&name("gone_room"))?
            ));
            out.push(format!("secret: {:?}", t.bot_secret(bot)?.map(|h| h[0])));
            let owned: Vec<u64> = t.bots_of(alice)?.iter().map(|a| a.user_id.0).collect();
            let all: Vec<u64> = t.all_bots()?.iter().map(|a| a.user_id.0).collect();
            out.push(format!("bots: {owned:?} {all:?} {}", t.bots_of(bob)?.len()));
            out.push(format!("next revocation: {}", t.next_revocation_seq()?));
            let since: Vec<(u64, u64)> = t.revocations_since(0, 10)?.iter().map(|(s, r)| (*s, r.body.until)).collect();
            out.push(format!("revocations: {since:?}"));
            out.push(format!("revocations from 2: {}", t.revocations_since(2, 10)?.len()));
            out.push(format!(
                "relay: {:?} {:?}",
                t.relay_revoked_at(&inputs.relay)?,
                t.relay_revoked_at(&PeerId::random())?
            ));
            Ok::<_, StoreError>(out)
        })
        .unwrap();
    said.extend(said_reads);
    said.push(format!("counts: {:?}", store.counts().unwrap()));
    said
}

#[test]
fn redb_and_postgres_read_back_the_same_and_migrate_copies_everything() {
    let pg = Postgres::start();
    let inputs = inputs();
    let dir = tempfile::tempdir().unwrap();
    let redb_path = dir.path().join("gateway.redb");

    let on_redb = script(&Store::open(&redb_path).unwrap(), &inputs);
    let on_postgres = script(&Store::connect(&pg.url(), None).unwrap(), &inputs);
    assert_eq!(on_redb, on_postgres);
    // The script's reads say what they should (not just the same wrong thing twice).
    let expect = |line: &str| assert!(on_redb.iter().any(|said| said == line), "no {line:?} in {on_redb:#?}");
    expect("pruned: 1");
    expect("old name: None");
    expect("by new name: Some(UserId(1000001))");
    expect("ghost: None");
    expect(&format!("alice active: [10, {}]", u64::MAX - 1));
    expect("code 1: None");
    expect("code 2: None");
    expect("backups: [4, 3, 2] / 0");
    expect("bots: [1000003] [1000003] 0");
    expect("counts: (3, 3)");
    expect("next revocation: 3");
    expect(&format!("revocations: [(1, {}), (2, {})]", T0 + 3600, u64::MAX));
    expect(&format!("relay: Some({}) None", T0 + 99));

    // A copy of the redb database reads back the same from PostgreSQL; ids carry on.
    pg.sql("CREATE DATABASE copy");
    let copy = PgStore::connect(&pg.url_of("copy"), None).unwrap();
    let copied = copy.migrate_from(&RedbStore::open(&redb_path).unwrap()).unwrap();
    assert!(copied > 20, "{copied}");
    let redb = Store::open(&redb_path).unwrap();
    let copy = Store::connect(&pg.url_of("copy"), None).unwrap();
    let read_all = |store: &Store| {
        store
            .read(|t| {
                let alice = t.account(UserId(1_000_001))?;
                let sessions: Vec<u64> = t.active_sessions(UserId(1_000_001))?.iter().map(|s| s.session_id.0).collect();
                let latest = t.session_of_device(&inputs.devices[1].0)?.map(|s| s.session_id);
                let code = t.code(&phone("+15550001111"), &inputs.devices[0].0)?.map(|c| c.expires_at);
                let backups = t.backups(UserId(1_000_001))?.len();
                let bots = t.bots_of(UserId(1_000_001))?.len();
                let revocations = t.revocations_since(0, 10)?.len();
                let next = (t.next_user_id()?, t.next_revocation_seq()?);
                Ok::<_, StoreError>(format!(
                    "{alice:?} {sessions:?} {latest:?} {code:?} {backups} {bots} {revocations} {next:?}"
                ))
            })
            .unwrap()
    };
    assert_eq!(read_all(&redb), read_all(&copy));
    drop(redb);
    let again = PgStore::connect(&pg.url_of("copy"), None).unwrap().migrate_from(&RedbStore::open(&redb_path).unwrap());
    assert!(matches!(again, Err(StoreError::NotEmpty { .. })), "{again:?}");
}
