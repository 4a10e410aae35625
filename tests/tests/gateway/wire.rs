//! Bytes a well-behaved client never sends, straight at a real gateway: each gets a clear
//! `BAD_REQUEST` on the same stream, and the gateway keeps serving everyone.

use std::io::Write;
use std::time::Duration;

use futures::StreamExt;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, StreamProtocol};
use meshgram_node::crypto::identity::DeviceIdentity;
use meshgram_node::net::codec::PostcardCodec;
use meshgram_node::net::transport::build_swarm;
use meshgram_node::proto::{AUTH_PROTOCOL, AuthResponse, ErrorCode, MAX_AUTH_REQUEST_SIZE};
use meshgram_tests::{Gateway, meshgram};
use serde_bytes::ByteBuf;

/// Sends arbitrary byte payloads as `/meshgram/auth/1` requests (each framed with a length
/// prefix, like real ones) and returns what the gateway answered to each.
async fn send_raw(gateway: &str, payloads: Vec<Vec<u8>>) -> Vec<AuthResponse> {
    let dir = tempfile::tempdir().unwrap();
    let identity = DeviceIdentity::load_or_create(dir.path()).unwrap();
    // Our side allows big requests, so the gateway's own limit is what gets tested.
    let codec = PostcardCodec::<ByteBuf, AuthResponse>::new(1 << 20, 1 << 20);
    let mut swarm = build_swarm(identity.keypair.clone(), Duration::from_secs(30), |_| {
        request_response::Behaviour::with_codec(
            codec,
            [(StreamProtocol::new(AUTH_PROTOCOL), ProtocolSupport::Outbound)],
            request_response::Config::default(),
        )
    })
    .unwrap();
    let mut addr: Multiaddr = gateway.parse().unwrap();
    let Some(libp2p::multiaddr::Protocol::P2p(peer)) = addr.pop() else { panic!("no /p2p in {gateway}") };
    let mut pending = Vec::new();
    for payload in payloads {
        pending.push(swarm.behaviour_mut().send_request_with_addresses(
            &peer,
            Ok(ByteBuf::from(payload)),
            vec![addr.clone()],
        ));
    }
    let mut answers: Vec<Option<AuthResponse>> = vec![None; pending.len()];
    tokio::time::timeout(Duration::from_secs(30), async {
        while answers.iter().any(Option::is_none) {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message: request_response::Message::Response { request_id, response },
                    ..
                }) => {
                    let i = pending.iter().position(|id| *id == request_id).unwrap();
                    answers[i] = Some(response);
                }
                SwarmEvent::Behaviour(request_response::Event::OutboundFailure { error, .. }) => {
                    panic!("the gateway dropped a bad request instead of answering it: {error}")
                }
                _ => {}
            }
        }
    })
    .await
    .expect("the gateway answered every bad request within 30 s");
    answers.into_iter().map(Option::unwrap).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_requests_get_bad_request_and_the_gateway_keeps_serving() {
    let gw = Gateway::start();
    let alice = gw.new_profile("alice");
    gw.login(&alice, super::ALICE);

    // Bytes that are not a libp2p handshake at all, on the TCP port.
    let mut junk = std::net::TcpStream::connect(("127.0.0.1", gw_tcp_port(&gw.addr()))).unwrap();
    junk.write_all(&[0xde, 0xad, 0xbe, 0xef].repeat(1000)).unwrap();
    drop(junk);

    let answers = send_raw(
        &gw.addr(),
        vec![
            vec![0xff; 50],                                 // an unknown request variant
            vec![],                                         // nothing at all
            vec![0x00],                                     // SendCode with its phone missing
            vec![0x00, 0x05, b'+', b'1', 0xff, 0xfe, 0x00], // SendCode with a non-UTF-8 phone
            vec![0x01; MAX_AUTH_REQUEST_SIZE + 1],          // over the request size limit
        ],
    )
    .await;
    for (i, answer) in answers.iter().enumerate() {
        match answer {
            AuthResponse::Error(e) => assert_eq!(e.code, ErrorCode::BadRequest, "payload {i}: {e}"),
            other => panic!("payload {i}: expected BAD_REQUEST, got {other:?}"),
        }
    }
    match &answers[4] {
        AuthResponse::Error(e) => assert!(e.message.contains("exceeds"), "{}", e.message),
        _ => unreachable!(),
    }

    // Everyone else is still served.
    let me = meshgram(&alice, &["whoami"]).ok_json();
    assert_eq!(me["account"]["phone"], super::ALICE);
}

fn gw_tcp_port(addr: &str) -> u16 {
    let parts: Vec<&str> = addr.split('/').collect();
    let i = parts.iter().position(|p| *p == "tcp").expect("a TCP gateway address");
    parts[i + 1].parse().unwrap()
}
