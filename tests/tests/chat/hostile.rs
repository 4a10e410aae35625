//! A hostile peer against one relay, with raw frames and raw sockets: each attack is bounded
//! (the relay's memory and descriptors stay within stated limits) and honest clients are served
//! meanwhile.

use std::time::{Duration, Instant};

use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::identity::ed25519;
use meshgram_node::proto::{ErrorCode, MAILBOX_PROTOCOL, MAX_MAILBOX_MESSAGE_SIZE, MailboxRequest, MailboxResponse};
use meshgram_tests::{Gateway, Mesh, RawClient, RawPeer, Server, frame, frame_header, read_answer, relay_metric};

/// What the relay must stay under while attacked, on top of what it held before.
const MEMORY_BOUND: u64 = 160 << 20;
/// The series of what the relay's mailbox pipes hold.
const MAILBOX_PIPE_MEMORY: &str = "meshgram_relay_pipe_memory_bytes{protocol=\"mailbox\"}";

/// An honest device signs in, sends itself an envelope and reads it back.
async fn honest_client_is_served(relay: &Server, signer: &ed25519::Keypair) {
    let honest = RawClient::new(&relay.tcp_addr());
    let now = meshgram_tests::unix_now();
    let hello = honest.call(MailboxRequest::Hello { cert: honest.cert(signer, 11, now - 60, now + 3600) }).await;
    assert!(matches!(hello, MailboxResponse::Welcome { .. }), "{hello:?}");
    let envelope = honest.envelope(11, honest.device(), 100);
    let sent = honest.call(MailboxRequest::Send { envelopes: vec![envelope.clone()] }).await;
    assert!(matches!(sent, MailboxResponse::Stored { .. }), "{sent:?}");
    match honest.call(MailboxRequest::Fetch { max: 10, wait_ms: 0, ack: vec![] }).await {
        MailboxResponse::Envelopes { envelopes, .. } => assert_eq!(envelopes[0].id, envelope.id),
        other => panic!("{other:?}"),
    }
}

/// Says Hello on a raw pipe and checks the welcome.
async fn greet(peer: &RawPeer, pipe: &mut libp2p::Stream, signer: &ed25519::Keypair, user: u64) {
    pipe.write_all(&frame(1, &MailboxRequest::Hello { cert: peer.cert(signer, user) })).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(30), read_answer::<MailboxResponse>(pipe)).await;
    let (_, welcome) = answer.expect("the relay answers Hello within 30 s").expect("an answer to Hello");
    assert!(matches!(welcome, MailboxResponse::Welcome { .. }), "{welcome:?}");
}

/// The most the relay's memory grew above `before` while `attack` ran, sampled every 50 ms.
async fn peak_growth(relay: &Server, before: u64, attack: impl Future<Output = ()>) -> u64 {
    let mut peak = 0;
    tokio::pin!(attack);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            () = &mut attack => return peak,
            _ = tick.tick() => peak = peak.max(relay.rss_bytes().saturating_sub(before)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_reads_no_answers_cannot_grow_the_relay() {
    let signer = ed25519::Keypair::generate();
    let mesh = Mesh::start_with_key(Gateway::start(), &signer, 1, 1);
    let relay = &mesh.relays[0];

    // A signed-in peer fills its own mailbox with 256 envelopes of 60 KiB (15 MiB): each
    // Fetch of it would be a 15 MiB answer.
    let attacker = RawPeer::connect(&relay.tcp_addr());
    let mut pipe = attacker.open(MAILBOX_PROTOCOL).await;
    greet(&attacker, &mut pipe, &signer, 7).await;
    for batch in 0..4u64 {
        let envelopes = (0..64).map(|_| attacker.envelope(7, attacker.peer_id(), 60 * 1024)).collect();
        pipe.write_all(&frame(10 + batch, &MailboxRequest::Send { envelopes })).await.unwrap();
        let (_, stored) = read_answer::<MailboxResponse>(&mut pipe).await.unwrap();
        assert!(matches!(stored, MailboxResponse::Stored { .. }), "{stored:?}");
    }
    let before = relay.rss_bytes();

    // 2,000 Fetches of it (37 GB of answers), none of them read. Before pipes held answers in
    // bytes, the relay built 256 of them at once: 3.8 GiB.
    let fetch = MailboxRequest::Fetch { max: 256, wait_ms: 0, ack: vec![] };
    let fetches: Vec<u8> = (0..2_000).flat_map(|tag| frame(100 + tag, &fetch)).collect();
    let attack = async {
        let _ = tokio::time::timeout(Duration::from_secs(5), pipe.write_all(&fetches)).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    let grew = peak_growth(relay, before, attack).await;
    assert!(grew < MEMORY_BOUND, "the relay grew by {} MiB", grew >> 20);
    let held = relay_metric(relay, MAILBOX_PIPE_MEMORY).expect("the pipe memory gauge");
    assert!(held < 64 << 20, "its mailbox pipes hold {} MiB", held >> 20);

    honest_client_is_served(relay, &signer).await;
    eprintln!("memory growth under unread fetches: {} MiB (bound {} MiB)", grew >> 20, MEMORY_BOUND >> 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_hello_a_pipe_gets_a_greetings_room_and_ten_seconds() {
    let signer = ed25519::Keypair::generate();
    let mesh = Mesh::start_with_key(Gateway::start(), &signer, 1, 1);
    let relay = &mesh.relays[0];
    let stranger = RawPeer::connect(&relay.tcp_addr());

    // A header announcing 16 MiB before Hello: refused at once (as "say Hello first", so that
    // an honest client greets and tries again), and the pipe closes.
    let mut pipe = stranger.open(MAILBOX_PROTOCOL).await;
    pipe.write_all(&frame_header(5, MAX_MAILBOX_MESSAGE_SIZE)).await.unwrap();
    match read_answer::<MailboxResponse>(&mut pipe).await {
        Some((5, MailboxResponse::Error(e))) => {
            assert_eq!(e.code, ErrorCode::CertInvalid, "{e:?}");
            assert!(e.message.contains("say Hello first"), "{}", e.message);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(read_answer::<MailboxResponse>(&mut pipe).await.is_none(), "the pipe closed");

    // A pipe that says nothing is closed after the greeting deadline; one welcomed in time
    // and then quiet (a relay's replica pipe between copies) is not.
    let greeter = RawPeer::connect(&relay.tcp_addr());
    let mut quiet = greeter.open(MAILBOX_PROTOCOL).await;
    greet(&greeter, &mut quiet, &signer, 99).await;
    let mut silent = stranger.open(MAILBOX_PROTOCOL).await;
    let opened = Instant::now();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(30), silent.read(&mut byte)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "closed, not answered: {read:?}");
    let lived = opened.elapsed();
    assert!(lived >= Duration::from_secs(9) && lived < Duration::from_secs(20), "closed after {lived:?}");
    quiet.write_all(&frame(2, &MailboxRequest::Fetch { max: 1, wait_ms: 0, ack: vec![] })).await.unwrap();
    match read_answer::<MailboxResponse>(&mut quiet).await {
        Some((2, MailboxResponse::Envelopes { .. })) => {}
        other => panic!("the welcomed pipe was closed or refused after its quiet spell: {other:?}"),
    }

    // Signed-in peers announcing 16 MiB requests and trickling a KiB of each: the relay holds
    // what arrived, not what was announced, so honest clients are still served.
    let before = relay.rss_bytes();
    let mut tricklers = Vec::new();
    for user in 0..20 {
        let peer = RawPeer::connect(&relay.tcp_addr());
        let mut pipe = peer.open(MAILBOX_PROTOCOL).await;
        greet(&peer, &mut pipe, &signer, 100 + user).await;
        pipe.write_all(&frame_header(2, MAX_MAILBOX_MESSAGE_SIZE)).await.unwrap();
        pipe.write_all(&[0u8; 1024]).await.unwrap();
        tricklers.push((peer, pipe));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = relay_metric(relay, MAILBOX_PIPE_MEMORY).unwrap_or(u64::MAX);
    assert!(held < 8 << 20, "20 × 16 MiB announced, {held} bytes held");
    honest_client_is_served(relay, &signer).await;
    let grew = relay.rss_bytes().saturating_sub(before);
    assert!(grew < MEMORY_BOUND, "the relay grew by {} MiB", grew >> 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_has_one_pipe_per_protocol() {
    let signer = ed25519::Keypair::generate();
    let mesh = Mesh::start_with_key(Gateway::start(), &signer, 1, 1);
    let relay = &mesh.relays[0];
    let peer = RawPeer::connect(&relay.tcp_addr());
    let mut pipes = Vec::new();
    for _ in 0..10 {
        pipes.push(peer.open(MAILBOX_PROTOCOL).await);
    }
    let mut newest = pipes.pop().unwrap();
    // Each new pipe replaced the one before: the older ones are closed.
    for (i, mut old) in pipes.into_iter().enumerate() {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), old.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "pipe {i} still open: {read:?}");
    }
    // The newest one is served (and the pipe it replaced lost nothing it had answered).
    greet(&peer, &mut newest, &signer, 9).await;
    honest_client_is_served(relay, &signer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_connections_from_one_address_is_refused_and_others_are_served() {
    let signer = ed25519::Keypair::generate();
    let args = ["--limit-loopback", "true", "--max-connections-per-ip", "8"];
    let mesh = Mesh::start_with_key_and_args(Gateway::start(), &signer, 1, 1, &args);
    let relay = &mesh.relays[0];
    let files_before = relay.open_files();

    // 1,000 TCP connections from 127.0.0.2 that never handshake. The relay keeps 8 (until
    // their handshake times out) and closes the rest at once, instead of holding a descriptor
    // for each (1,000 would exhaust a default limit of 1,024).
    let target = std::net::SocketAddr::from(([127, 0, 0, 1], relay.tcp_port()));
    let mut flood = Vec::new();
    for _ in 0..1_000 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(std::net::SocketAddr::from(([127, 0, 0, 2], 0))).unwrap();
        if let Ok(stream) = socket.connect(target).await {
            flood.push(stream);
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let files_during = relay.open_files();
    assert!(files_during < files_before + 50, "{files_before} files open before, {files_during} during the flood");
    let mut closed = 0;
    for stream in &mut flood {
        let mut byte = [0u8; 1];
        use tokio::io::AsyncReadExt as _;
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(5), stream.read(&mut byte)).await {
            closed += 1;
        }
    }
    assert!(closed >= 990, "only {closed} of {} flood connections closed", flood.len());

    // A device on another address is served meanwhile.
    honest_client_is_served(relay, &signer).await;
    eprintln!("flood: {closed} of {} connections closed; {files_before} → {files_during} files", flood.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greetings_are_limited_per_connection() {
    let signer = ed25519::Keypair::generate();
    let mesh = Mesh::start_with_key(Gateway::start(), &signer, 1, 1);
    let relay = &mesh.relays[0];
    let checks = || {
        let passed = relay_metric(relay, r#"meshgram_relay_certificate_checks_total{cert="session",outcome="passed"}"#);
        let refused =
            relay_metric(relay, r#"meshgram_relay_certificate_checks_total{cert="session",outcome="refused"}"#);
        passed.unwrap() + refused.unwrap()
    };
    let before = checks();

    // 200 Hellos at once, with forged certificates (each one a signature check): the first 32
    // (and one a second after) are checked, the rest refused with FLOOD_WAIT before any check,
    // on this pipe and on a new one.
    let peer = RawPeer::connect(&relay.tcp_addr());
    let forged = peer.cert(&ed25519::Keypair::generate(), 5);
    let mut refusals = 0;
    for _ in 0..2 {
        let mut pipe = peer.open(MAILBOX_PROTOCOL).await;
        let hellos: Vec<u8> =
            (0..100).flat_map(|tag| frame(tag, &MailboxRequest::Hello { cert: forged.clone() })).collect();
        pipe.write_all(&hellos).await.unwrap();
        for _ in 0..100 {
            match read_answer::<MailboxResponse>(&mut pipe).await {
                Some((_, MailboxResponse::Error(e))) if e.code == ErrorCode::FloodWait => {
                    assert!(e.retry_after_secs.is_some_and(|s| s >= 1), "{e:?}");
                    refusals += 1;
                }
                Some((_, MailboxResponse::Error(e))) => assert_eq!(e.code, ErrorCode::CertInvalid, "{e:?}"),
                other => panic!("{other:?}"),
            }
        }
    }
    let checked = checks() - before;
    assert!(checked <= 40, "{checked} certificates checked for 200 greetings");
    assert_eq!(refusals + checked, 200);

    // The connection may still greet in a while; others may at once.
    honest_client_is_served(relay, &signer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_sender_fills_its_share_of_a_mailbox_and_real_senders_still_get_in() {
    let signer = ed25519::Keypair::generate();
    let args = ["--mailbox-quota", "100", "--mailbox-quota-per-sender", "10"];
    let mesh = Mesh::start_with_key_and_args(Gateway::start(), &signer, 1, 1, &args);
    let relay = &mesh.relays[0];
    let now = meshgram_tests::unix_now();
    let signer = &signer;
    let signed_in = |user: u64| async move {
        let client = RawClient::new(&relay.tcp_addr());
        let hello = client.call(MailboxRequest::Hello { cert: client.cert(signer, user, now - 60, now + 3600) }).await;
        assert!(matches!(hello, MailboxResponse::Welcome { .. }), "{hello:?}");
        client
    };
    let (victim, noisy, friend) = (signed_in(20).await, signed_in(21).await, signed_in(22).await);

    // The noisy sender gets 10 envelopes into the victim's mailbox, then QUOTA_EXCEEDED.
    let mut stored = 0;
    for _ in 0..15 {
        let envelope = noisy.envelope(21, victim.device(), 100);
        match noisy.call(MailboxRequest::Send { envelopes: vec![envelope] }).await {
            MailboxResponse::Stored { .. } => stored += 1,
            MailboxResponse::Error(e) => assert_eq!(e.code, ErrorCode::QuotaExceeded, "{e:?}"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(stored, 10);
    // A real sender still gets in, and the victim reads both.
    let real = friend.envelope(22, victim.device(), 100);
    let sent = friend.call(MailboxRequest::Send { envelopes: vec![real.clone()] }).await;
    assert!(matches!(sent, MailboxResponse::Stored { .. }), "{sent:?}");
    match victim.call(MailboxRequest::Fetch { max: 100, wait_ms: 0, ack: vec![] }).await {
        MailboxResponse::Envelopes { envelopes, .. } => {
            assert_eq!(envelopes.len(), 11);
            assert!(envelopes.iter().any(|e| e.id == real.id));
        }
        other => panic!("{other:?}"),
    }
}
