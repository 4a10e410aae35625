//! Media uploads through real relays in this process: three relays (replication 2) and a bare
//! client speaking `/meshgram/media/1` on a pipe. The test holds the gateway key, so it signs
//! the relays' and the client's certificates itself.

// A test's helpers panic on what the test did not expect, like the test itself.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::identity::{Keypair, ed25519};
use libp2p::{Multiaddr, PeerId};
use meshgram_node::crypto::cert::{AccountKind, CertBody, RelayCert, SessionCert, unix_now};
use meshgram_node::ids::{NoiseKey, SessionId, UserId};
use meshgram_node::net::pipe::PipePool;
use meshgram_node::net::transport::build_swarm;
use meshgram_node::proto::ErrorCode;
use meshgram_node::proto::media::{ChunkHash, FileId, MEDIA_LIMITS, MEDIA_PROTOCOL, MediaRequest, MediaResponse};
use meshgram_relay::placement::{chunk_key, closest_relays, file_key};
use meshgram_relay::{Relay, RelayConfig, held_chunks, held_uploads};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Mesh {
    _dir: tempfile::TempDir,
    gateway: ed25519::Keypair,
    relays: Vec<(Relay, PathBuf)>,
}

impl Mesh {
    async fn start(n: usize) -> Mesh {
        let mut mesh =
            Mesh { _dir: tempfile::tempdir().unwrap(), gateway: ed25519::Keypair::generate(), relays: Vec::new() };
        for i in 0..n {
            let (_, data) = mesh.admit(i);
            mesh.start_relay(data).await;
        }
        mesh
    }

    /// Creates relay `i`'s data dir with its key and certificate.
    fn admit(&self, i: usize) -> (PeerId, PathBuf) {
        let data = self._dir.path().join(format!("relay-{i}"));
        (RelayCert::admit(&self.gateway, &data, 1, unix_now()).unwrap(), data)
    }

    /// Starts a relay on `data`, joining through the first one.
    async fn start_relay(&mut self, data: PathBuf) {
        let mut config = RelayConfig::new(data.clone(), self.gateway.public());
        config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
        config.http = Some("127.0.0.1:0".parse().unwrap());
        if let Some((first, _)) = self.relays.first() {
            config.bootstrap = first.ready.listen.clone();
        }
        self.relays.push((Relay::start(config).await.unwrap(), data));
    }

    /// A counter summed over the relays' `/metrics`.
    async fn metric(&self, name: &str) -> u64 {
        let mut sum = 0;
        for (relay, _) in &self.relays {
            let addr = relay.ready.http.as_ref().unwrap().trim_start_matches("http://").to_string();
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
            let mut text = String::new();
            stream.read_to_string(&mut text).await.unwrap();
            let line = text.lines().find(|l| l.starts_with(&format!("meshgram_relay_{name}_total ")));
            sum += line.and_then(|l| l.split(' ').nth(1)).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
        sum
    }

    /// Stops the relays; their data dirs stay until the mesh is dropped.
    async fn shutdown(&mut self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        for (relay, dir) in self.relays.drain(..) {
            relay.shutdown().await;
            dirs.push(dir);
        }
        dirs
    }

    fn peer(&self, i: usize) -> PeerId {
        self.relays[i].0.ready.peer_id
    }

    fn addrs(&self) -> Vec<Multiaddr> {
        self.relays.iter().flat_map(|(r, _)| r.ready.listen.clone()).collect()
    }

    /// Which relays hold chunk `hash` on disk.
    fn holders(&self, hash: &ChunkHash) -> Vec<usize> {
        (0..self.relays.len()).filter(|i| held_chunks(&self.relays[*i].1).unwrap().contains(hash)).collect()
    }
}

/// A device: a swarm that only opens streams, its pipes on the media protocol, a certificate.
struct Client {
    pipes: PipePool<MediaRequest, MediaResponse>,
    cert: SessionCert,
    _driver: tokio::task::JoinHandle<()>,
}

impl Client {
    fn new(mesh: &Mesh, user: u64) -> Client {
        let keypair = Keypair::generate_ed25519();
        let device = keypair.public().to_peer_id();
        let mut swarm = build_swarm(keypair, Duration::from_secs(60), |_| libp2p_stream::Behaviour::new()).unwrap();
        for addr in mesh.addrs() {
            swarm.dial(addr).unwrap();
        }
        let control = swarm.behaviour().new_control();
        let driver = tokio::spawn(async move {
            loop {
                swarm.select_next_some().await;
            }
        });
        let now = unix_now();
        let body = CertBody {
            user_id: UserId(user),
            device,
            noise_key: NoiseKey([7; 32]),
            session_id: SessionId(user),
            kind: AccountKind::User,
            not_before: now - 60,
            not_after: now + 3600,
        };
        let cert = SessionCert::sign(body, &mesh.gateway);
        let pipes = PipePool::new(MEDIA_PROTOCOL, MEDIA_LIMITS, Duration::from_secs(30), control);
        Client { pipes, cert, _driver: driver }
    }

    async fn call(&self, relay: PeerId, request: MediaRequest) -> MediaResponse {
        self.pipes.call(relay, &request, async { Ok(()) }).await.unwrap()
    }

    async fn hello(&self, relay: PeerId) {
        match self.call(relay, MediaRequest::Hello { cert: self.cert.clone() }).await {
            MediaResponse::Welcome { relay: welcomed } => assert_eq!(welcomed, relay),
            other => panic!("Hello answered {other:?}"),
        }
    }

    /// Saves a part, again while the relays are still finding each other (`UNAVAILABLE`).
    async fn save(&self, relay: PeerId, file_id: FileId, part: u32, total_parts: u32, bytes: &[u8]) -> MediaResponse {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let hash = ChunkHash::of(bytes);
            let request = MediaRequest::SaveFilePart { file_id, part, total_parts, hash, bytes: bytes.to_vec() };
            match self.call(relay, request).await {
                MediaResponse::Error(e) if e.code == ErrorCode::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                answer => return answer,
            }
        }
    }
}

fn code(response: MediaResponse) -> ErrorCode {
    match response {
        MediaResponse::Error(e) => e.code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_are_stored_on_two_relays_recorded_and_repaired() {
    let mut mesh = Mesh::start(3).await;
    let alice = Client::new(&mesh, 1);
    let entry = mesh.peer(0);

    let early = alice.call(entry, MediaRequest::GetChunk { hash: ChunkHash::of(b"x") }).await;
    assert_eq!(code(early), ErrorCode::CertInvalid, "nothing before Hello");
    alice.hello(entry).await;

    let file_id = FileId::random();
    let bytes: Vec<u8> = (0..600 * 1024).map(|i| (i % 251) as u8).collect();
    let hash = ChunkHash::of(&bytes);
    match alice.save(entry, file_id, 0, 2, &bytes).await {
        MediaResponse::PartSaved { part: 0, copies: 2 } => {}
        other => panic!("SaveFilePart answered {other:?}"),
    }
    let holders = mesh.holders(&hash);
    assert_eq!(holders.len(), 2, "the chunk is on R = 2 relays: {holders:?}");

    // Saving it again is a no-op; a wrong checksum or another total is refused.
    assert!(matches!(alice.save(entry, file_id, 0, 2, &bytes).await, MediaResponse::PartSaved { .. }));
    let bad = MediaRequest::SaveFilePart { file_id, part: 1, total_parts: 2, hash, bytes: b"other".to_vec() };
    let refusal = alice.call(entry, bad).await;
    assert!(matches!(&refusal, MediaResponse::Error(e) if e.message.starts_with("checksum mismatch")), "{refusal:?}");
    assert_eq!(code(alice.save(entry, file_id, 1, 3, b"part one").await), ErrorCode::BadRequest);

    // Any relay answers the status (from its index or the file's closest relays).
    for i in 0..3 {
        alice.hello(mesh.peer(i)).await;
        match alice.call(mesh.peer(i), MediaRequest::GetUploadStatus { file_id }).await {
            MediaResponse::UploadStatus { total_parts: 2, saved, .. } => assert_eq!(saved, vec![0], "relay {i}"),
            other => panic!("relay {i} answered GetUploadStatus with {other:?}"),
        }
        let chunk = alice.call(mesh.peer(i), MediaRequest::GetChunk { hash }).await;
        match chunk {
            MediaResponse::Chunk { bytes: got } => assert!(holders.contains(&i) && got == bytes),
            other => assert!(!holders.contains(&i) && code(other) == ErrorCode::NotFound),
        }
    }
    let unknown = alice.call(entry, MediaRequest::GetUploadStatus { file_id: FileId::random() }).await;
    assert!(matches!(unknown, MediaResponse::UploadStatus { total_parts: 0, ref saved, .. } if saved.is_empty()));

    // Another user may neither see nor extend the upload.
    let mallory = Client::new(&mesh, 2);
    mallory.hello(entry).await;
    let status = mallory.call(entry, MediaRequest::GetUploadStatus { file_id }).await;
    assert_eq!(code(status), ErrorCode::Forbidden);
    assert_eq!(code(mallory.save(entry, file_id, 1, 2, b"not yours").await), ErrorCode::Forbidden);

    // A holder that loses the chunk gets it back from the other one at the next repair round.
    let lost = holders[0];
    let hex = hash.to_string();
    std::fs::remove_file(mesh.relays[lost].1.join("chunks").join(&hex[..2]).join(&hex)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while mesh.holders(&hash) != holders {
        assert!(Instant::now() < deadline, "repair did not bring the chunk back to relay {lost}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let relays: Vec<PeerId> = (0..3).map(|i| mesh.peer(i)).collect();
    let dirs = mesh.shutdown().await;

    // The part is recorded on the R = 2 relays closest to the file id, as `inspect` shows.
    let closest = closest_relays(&file_key(&file_id), relays.iter().copied(), 2);
    for (i, dir) in dirs.iter().enumerate() {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshgram-relay"))
            .args(["--data", &dir.display().to_string(), "inspect"])
            .output()
            .unwrap();
        assert!(out.status.success(), "inspect failed: {}", String::from_utf8_lossy(&out.stderr));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let chunks = json["chunks"].as_array().unwrap();
        assert_eq!(chunks.contains(&serde_json::json!(hash.to_string())), holders.contains(&i), "relay {i}: {json}");
        let uploads = json["uploads"].as_array().unwrap();
        if closest.contains(&relays[i]) {
            assert_eq!(uploads.len(), 1, "relay {i}: {json}");
            assert_eq!(uploads[0]["file_id"], serde_json::json!(file_id.to_string()));
            assert_eq!(uploads[0]["owner"], serde_json::json!(1));
            assert_eq!(uploads[0]["total_parts"], serde_json::json!(2));
            assert_eq!(uploads[0]["saved"], serde_json::json!([0]));
        } else {
            assert!(uploads.is_empty(), "relay {i} is not among the file's closest: {json}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closer_relay_that_joins_gets_the_chunks_and_records() {
    let mut mesh = Mesh::start(3).await;
    let (late, late_dir) = mesh.admit(3);
    let all: Vec<PeerId> = (0..3).map(|i| mesh.peer(i)).chain([late]).collect();
    // An upload and a chunk the relay that joins later is among the two closest to.
    let file_id = std::iter::repeat_with(FileId::random)
        .find(|f| closest_relays(&file_key(f), all.iter().copied(), 2).contains(&late))
        .unwrap();
    let bytes = (0u32..)
        .map(|n| n.to_be_bytes().repeat(1000))
        .find(|b| closest_relays(&chunk_key(&ChunkHash::of(b)), all.iter().copied(), 2).contains(&late))
        .unwrap();
    let alice = Client::new(&mesh, 1);
    alice.hello(mesh.peer(0)).await;
    assert!(matches!(
        alice.save(mesh.peer(0), file_id, 0, 1, &bytes).await,
        MediaResponse::PartSaved { copies: 2, .. }
    ));

    mesh.start_relay(late_dir.clone()).await;
    let hash = ChunkHash::of(&bytes);
    let deadline = Instant::now() + Duration::from_secs(40);
    while !mesh.holders(&hash).contains(&3) || mesh.metric("part_record_repair_copies").await == 0 {
        assert!(Instant::now() < deadline, "repair did not copy the chunk and the record to the relay that joined");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(mesh.metric("chunk_repair_copies").await >= 1);
    mesh.shutdown().await;
    let uploads = held_uploads(&late_dir).unwrap();
    assert_eq!(uploads.len(), 1);
    assert_eq!((uploads[0].total_parts, uploads[0].saved.clone()), (1, vec![0]));
}
