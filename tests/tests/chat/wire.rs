//! Bad input straight at a real relay, from a raw client whose certificates the test signs:
//! the relays are started trusting a gateway key the test holds.

use libp2p::PeerId;
use libp2p::identity::ed25519;
use meshgram_node::crypto::cert::unix_now;
use meshgram_node::proto::envelope::Envelope;
use meshgram_node::proto::{ErrorCode, MAX_ENVELOPE_SIZE, MailboxRequest, MailboxResponse};
pub(super) use meshgram_tests::RawClient;
use meshgram_tests::{Gateway, Mesh};

fn refused(response: &MailboxResponse) -> ErrorCode {
    match response {
        MailboxResponse::Error(e) => e.code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_refuse_bad_certificates_spoofed_senders_oversized_and_replayed_envelopes() {
    let gateway_key = ed25519::Keypair::generate();
    let mesh = Mesh::start_with_key(Gateway::start(), &gateway_key, 2, 2);
    let relay = mesh.relays[0].tcp_addr();
    let now = unix_now();
    let mallory = RawClient::new(&relay);
    let bob = PeerId::random();

    // Nothing before Hello.
    let send = |_: &RawClient, e: Envelope| MailboxRequest::Send { envelopes: vec![e] };
    assert_eq!(refused(&mallory.call(send(&mallory, mallory.envelope(1, bob, 10))).await), ErrorCode::CertInvalid);

    // Forged (other signer), expired, not yet valid, and someone else's certificate.
    let forger = ed25519::Keypair::generate();
    for cert in [
        mallory.cert(&forger, 1, now, now + 3600),
        mallory.cert(&gateway_key, 1, now - 7200, now - 3600),
        mallory.cert(&gateway_key, 1, now + 3600, now + 7200),
        RawClient::new(&relay).cert(&gateway_key, 1, now, now + 3600),
    ] {
        assert_eq!(refused(&mallory.call(MailboxRequest::Hello { cert }).await), ErrorCode::CertInvalid);
    }

    // A valid certificate: welcome.
    let cert = mallory.cert(&gateway_key, 1, now, now + 3600);
    assert!(matches!(mallory.call(MailboxRequest::Hello { cert }).await, MailboxResponse::Welcome { .. }));

    // Spoofed sender account, spoofed device, empty and oversized envelopes.
    assert_eq!(refused(&mallory.call(send(&mallory, mallory.envelope(99, bob, 10))).await), ErrorCode::SenderMismatch);
    let mut spoofed = mallory.envelope(1, bob, 10);
    spoofed.from_device = PeerId::random();
    assert_eq!(refused(&mallory.call(send(&mallory, spoofed)).await), ErrorCode::SenderMismatch);
    assert_eq!(refused(&mallory.call(send(&mallory, mallory.envelope(1, bob, 0))).await), ErrorCode::BadRequest);
    let huge = mallory.envelope(1, bob, MAX_ENVELOPE_SIZE);
    assert_eq!(refused(&mallory.call(send(&mallory, huge)).await), ErrorCode::BadRequest);
    assert_eq!(refused(&mallory.call(MailboxRequest::Send { envelopes: vec![] }).await), ErrorCode::BadRequest);

    // A good envelope is stored; the same one again is reported as a duplicate, not stored twice.
    let good = mallory.envelope(1, bob, 100);
    match mallory.call(send(&mallory, good.clone())).await {
        MailboxResponse::Stored { stored, duplicates } => assert_eq!((stored, duplicates), (vec![good.id], vec![])),
        other => panic!("expected Stored, got {other:?}"),
    }
    match mallory.call(send(&mallory, good.clone())).await {
        MailboxResponse::Stored { stored, duplicates } => assert_eq!((stored, duplicates), (vec![], vec![good.id])),
        other => panic!("expected Stored with a duplicate, got {other:?}"),
    }

    // Mallory's own mailbox is empty: she cannot read or acknowledge Bob's.
    match mallory.call(MailboxRequest::Fetch { max: 10, wait_ms: 0, ack: vec![] }).await {
        MailboxResponse::Envelopes { envelopes, .. } => assert!(envelopes.is_empty()),
        other => panic!("expected Envelopes, got {other:?}"),
    }
    assert!(matches!(
        mallory.call(MailboxRequest::Ack { ids: vec![good.id] }).await,
        MailboxResponse::Acked { count: 0 }
    ));

    // The relay still serves an honest client, on the same relay.
    let honest = RawClient::new(&relay);
    let cert = honest.cert(&gateway_key, 2, now, now + 3600);
    assert!(matches!(honest.call(MailboxRequest::Hello { cert }).await, MailboxResponse::Welcome { .. }));
    let to_mallory = honest.envelope(2, mallory.device(), 50);
    assert!(matches!(honest.call(send(&honest, to_mallory.clone())).await, MailboxResponse::Stored { .. }));
    // And the long-poll hands it over.
    match mallory.call(MailboxRequest::Fetch { max: 10, wait_ms: 5_000, ack: vec![] }).await {
        MailboxResponse::Envelopes { envelopes, .. } => assert_eq!(envelopes, vec![to_mallory]),
        other => panic!("expected Envelopes, got {other:?}"),
    }
}

/// Reads one pipe frame: (tag, answer).
async fn read_answer(stream: &mut libp2p::Stream) -> std::io::Result<(u64, MailboxResponse)> {
    use futures::AsyncReadExt;
    let mut header = [0u8; 12];
    stream.read_exact(&mut header).await?;
    let len = u32::from_be_bytes(header[..4].try_into().unwrap()) as usize - 8;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok((u64::from_be_bytes(header[4..].try_into().unwrap()), postcard::from_bytes(&body).unwrap()))
}

/// A frame header: length of what follows (tag included), then the tag.
fn header(body_len: usize, tag: u64) -> Vec<u8> {
    let mut frame = ((body_len + 8) as u32).to_be_bytes().to_vec();
    frame.extend(tag.to_be_bytes());
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_a_relay_pipe_gets_bad_request_and_the_relay_keeps_serving() {
    use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
    use meshgram_node::proto::{MAILBOX_PROTOCOL, MAX_MAILBOX_MESSAGE_SIZE};

    let gateway_key = ed25519::Keypair::generate();
    let mesh = Mesh::start_with_key(Gateway::start(), &gateway_key, 1, 1);
    let relay_addr: libp2p::Multiaddr = mesh.relays[0].tcp_addr().parse().unwrap();
    let relay: PeerId = mesh.relays[0].peer_id().parse().unwrap();

    // A bare libp2p node that speaks raw bytes on the mailbox protocol.
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let mut swarm = meshgram_node::net::transport::build_swarm(keypair, std::time::Duration::from_secs(60), |_| {
        libp2p_stream::Behaviour::new()
    })
    .unwrap();
    let control = swarm.behaviour().new_control();
    swarm.dial(relay_addr).unwrap();
    tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    let open = |mut control: libp2p_stream::Control| async move {
        for _ in 0..100 {
            if let Ok(stream) = control.open_stream(relay, libp2p::StreamProtocol::new(MAILBOX_PROTOCOL)).await {
                return stream;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("no stream to the relay");
    };
    let mut stream = open(control.clone()).await;

    // A body that is not a request: BAD_REQUEST on its tag, and the pipe goes on.
    let mut frame = header(3, 7);
    frame.extend([0xff, 0xff, 0xff]);
    stream.write_all(&frame).await.unwrap();
    let (tag, answer) = read_answer(&mut stream).await.unwrap();
    assert_eq!((tag, refused(&answer)), (7, ErrorCode::BadRequest));
    // A well-formed request still works on the same pipe (and is refused for want of Hello).
    let request = postcard::to_stdvec(&MailboxRequest::Fetch { max: 1, wait_ms: 0, ack: vec![] }).unwrap();
    let mut frame = header(request.len(), 8);
    frame.extend(&request);
    stream.write_all(&frame).await.unwrap();
    let (tag, answer) = read_answer(&mut stream).await.unwrap();
    assert_eq!((tag, refused(&answer)), (8, ErrorCode::CertInvalid));

    // An oversized frame: BAD_REQUEST, then the relay closes the pipe (the rest of the stream
    // cannot be trusted to be framed); its body is never read.
    stream.write_all(&header(MAX_MAILBOX_MESSAGE_SIZE + 1, 9)).await.unwrap();
    let (tag, answer) = read_answer(&mut stream).await.unwrap();
    assert_eq!((tag, refused(&answer)), (9, ErrorCode::BadRequest));
    let mut rest = Vec::new();
    assert_eq!(stream.read_to_end(&mut rest).await.unwrap_or(0), 0, "the pipe is closed");

    // A frame too short to hold a tag, and a pipe cut mid-frame: closed without an answer.
    let mut stream = open(control.clone()).await;
    stream.write_all(&[0, 0, 0, 3, 1, 2, 3]).await.unwrap();
    assert_eq!(stream.read_to_end(&mut rest).await.unwrap_or(0), 0);
    let mut stream = open(control.clone()).await;
    stream.write_all(&header(100, 1)[..10]).await.unwrap();
    stream.close().await.unwrap();
    assert_eq!(stream.read_to_end(&mut rest).await.unwrap_or(0), 0);

    // The relay serves an honest client as before.
    let honest = RawClient::new(&mesh.relays[0].tcp_addr());
    let cert = honest.cert(&gateway_key, 2, unix_now(), unix_now() + 3600);
    assert!(matches!(honest.call(MailboxRequest::Hello { cert }).await, MailboxResponse::Welcome { .. }));
    // And a new pipe from the same node still works.
    let mut stream = open(control).await;
    stream.write_all(&frame).await.unwrap();
    assert_eq!(read_answer(&mut stream).await.unwrap().0, 8);
}
