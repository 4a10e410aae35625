//! Bad input straight at a relay's media protocol, and the expiry of unfinished uploads, from raw clients whose certificates the test
//! signs (the relay trusts a gateway key the test holds).

use libp2p::identity::ed25519;
use meshgram_node::crypto::cert::unix_now;
use meshgram_node::proto::ErrorCode;
use meshgram_node::proto::media::{ChunkHash, FileId, MAX_CHUNK_SIZE, MAX_PARTS, MediaRequest, MediaResponse};
use meshgram_tests::{Gateway, Mesh, RawClient, files_under};

/// Says Hello on the media protocol as `user`, with a certificate `signer` signed.
async fn hello(client: &RawClient, signer: &ed25519::Keypair, user: u64) {
    let now = unix_now();
    let hello = MediaRequest::Hello { cert: client.cert(signer, user, now, now + 3600) };
    assert!(matches!(client.media_call(hello).await, MediaResponse::Welcome { .. }));
}

fn save(file_id: FileId, part: u32, total_parts: u32, bytes: &[u8]) -> MediaRequest {
    MediaRequest::SaveFilePart { file_id, part, total_parts, hash: ChunkHash::of(bytes), bytes: bytes.to_vec() }
}

/// The refusal's code, and its message for checks on what it says.
fn refused(response: MediaResponse) -> (ErrorCode, String) {
    match response {
        MediaResponse::Error(e) => (e.code, e.message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn saved(response: MediaResponse) {
    assert!(matches!(response, MediaResponse::PartSaved { .. }), "expected PartSaved, got {response:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_refuses_bad_parts_with_clear_errors_and_stores_nothing_of_them() {
    let gateway_key = ed25519::Keypair::generate();
    let mesh = Mesh::start_with_key_and_args(Gateway::start(), &gateway_key, 1, 1, &["--media-quota-mib", "1"]);
    let relay = mesh.relays[0].tcp_addr();
    let chunk_files = || {
        files_under(&mesh.relays[0].data_dir.join("chunks"))
            .into_iter()
            .filter(|f| f.file_name().is_some_and(|n| n.len() == 64))
            .count()
    };
    let (alice, bob) = (RawClient::new(&relay), RawClient::new(&relay));
    let file = FileId::random();
    let part = vec![7u8; 1000];

    // Nothing before Hello.
    assert_eq!(refused(alice.media_call(save(file, 0, 2, &part)).await).0, ErrorCode::CertInvalid);
    hello(&alice, &gateway_key, 1).await;

    // A hash that is not the bytes', parts out of range, empty and oversized parts.
    let mut wrong = save(file, 0, 2, &part);
    if let MediaRequest::SaveFilePart { hash, .. } = &mut wrong {
        *hash = ChunkHash::of(b"something else");
    }
    let (code, message) = refused(alice.media_call(wrong).await);
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.contains("checksum"), "{message}");
    for bad in [save(file, 2, 2, &part), save(file, 0, 0, &part), save(file, 0, MAX_PARTS + 1, &part)] {
        assert_eq!(refused(alice.media_call(bad).await).0, ErrorCode::BadRequest);
    }
    assert_eq!(refused(alice.media_call(save(file, 0, 2, &[])).await).0, ErrorCode::BadRequest);
    let huge = vec![1u8; MAX_CHUNK_SIZE + 1];
    assert_eq!(refused(alice.media_call(save(file, 0, 2, &huge)).await).0, ErrorCode::BadRequest);
    assert_eq!(chunk_files(), 0, "nothing refused was stored");

    // A good part is saved, and saving it again is no error.
    saved(alice.media_call(save(file, 0, 2, &part)).await);
    saved(alice.media_call(save(file, 0, 2, &part)).await);
    assert_eq!(chunk_files(), 1);
    // The same part with other bytes, and the upload's size changing: refused.
    assert_eq!(refused(alice.media_call(save(file, 0, 2, &[8u8; 1000])).await).0, ErrorCode::BadRequest);
    let (code, message) = refused(alice.media_call(save(file, 1, 3, &[9u8; 1000])).await);
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.contains('2') && message.contains('3'), "says both totals: {message}");
    match alice.media_call(MediaRequest::GetUploadStatus { file_id: file }).await {
        MediaResponse::UploadStatus { total_parts, saved, hashes } => {
            assert_eq!((total_parts, saved, hashes), (2, vec![0], vec![ChunkHash::of(&part)]));
        }
        other => panic!("expected UploadStatus, got {other:?}"),
    }

    // Someone else's upload: neither added to nor read.
    hello(&bob, &gateway_key, 2).await;
    assert_eq!(refused(bob.media_call(save(file, 1, 2, &[9u8; 1000])).await).0, ErrorCode::Forbidden);
    assert_eq!(refused(bob.media_call(MediaRequest::GetUploadStatus { file_id: file }).await).0, ErrorCode::Forbidden);

    // Over quota (1 MiB per user here), with the figures in the message.
    let big = FileId::random();
    saved(alice.media_call(save(big, 0, 3, &vec![1u8; 600 * 1024])).await);
    let (code, message) = refused(alice.media_call(save(big, 1, 3, &vec![2u8; 600 * 1024])).await);
    assert_eq!(code, ErrorCode::QuotaExceeded);
    assert!(message.contains("MiB"), "the quota's figure is in the message: {message}");
    assert_eq!(chunk_files(), 2, "the part over quota was not stored");

    // Chunks by hash: the saved one, byte for byte; an unknown one is not found.
    match bob.media_call(MediaRequest::GetChunk { hash: ChunkHash::of(&part) }).await {
        MediaResponse::Chunk { bytes } => assert_eq!(bytes, part),
        other => panic!("expected the chunk, got {other:?}"),
    }
    let unknown = MediaRequest::GetChunk { hash: ChunkHash::of(b"never stored") };
    assert_eq!(refused(bob.media_call(unknown).await).0, ErrorCode::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_not_finished_within_its_grace_is_expired_and_its_chunks_deleted() {
    let gateway_key = ed25519::Keypair::generate();
    let extra = ["--media-upload-grace-secs", "2"];
    let mesh = Mesh::start_with_key_and_args(Gateway::start(), &gateway_key, 2, 2, &extra);
    let chunk_files = |relay: &meshgram_tests::Server| {
        files_under(&relay.data_dir.join("chunks"))
            .iter()
            .filter(|f| f.file_name().is_some_and(|n| n.len() == 64))
            .count()
    };
    let alice = RawClient::new(&mesh.relays[0].tcp_addr());
    hello(&alice, &gateway_key, 1).await;
    let (finished, unfinished) = (FileId::random(), FileId::random());
    let kept = vec![1u8; 5000];
    saved(alice.media_call(save(finished, 0, 1, &kept)).await);
    saved(alice.media_call(save(unfinished, 0, 2, &[2u8; 5000])).await);
    assert!(mesh.relays.iter().all(|r| chunk_files(r) == 2), "both chunks on both relays");

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while mesh.relays.iter().any(|r| chunk_files(r) != 1) {
        assert!(std::time::Instant::now() < deadline, "the unfinished upload's chunk is still there after 30 s");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    match alice.media_call(MediaRequest::GetUploadStatus { file_id: unfinished }).await {
        MediaResponse::UploadStatus { total_parts, saved, .. } => assert_eq!((total_parts, saved), (0, vec![])),
        other => panic!("expected UploadStatus, got {other:?}"),
    }
    match alice.media_call(MediaRequest::GetChunk { hash: ChunkHash::of(&kept) }).await {
        MediaResponse::Chunk { bytes } => assert_eq!(bytes, kept, "a finished upload stays"),
        other => panic!("expected the chunk, got {other:?}"),
    }
}
