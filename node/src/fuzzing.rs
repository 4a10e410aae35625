//! Entry points for the fuzz targets (`fuzz/`) and their corpus replay (`tests/fuzz_corpora`):
//! every decoder a peer can reach, fed arbitrary bytes. Each must return (an error is fine);
//! none may panic, hang or allocate by what a header claims.

use std::sync::LazyLock;

use crate::crypto::identity::DeviceIdentity;
use crate::net::codec::PostcardCodec;
use crate::proto::envelope::Envelope;
use crate::proto::{AuthRequest, AuthResponse, MailboxRequest, MailboxResponse, ReplicaRequest};

/// A fuzz target: its name, and the decoder it feeds.
pub type Target = (&'static str, fn(&[u8]));

/// The decoders, by the name of their fuzz target.
pub const TARGETS: [Target; 8] = [
    ("pipe_frames", pipe_frames),
    ("codec_frames", codec_frames),
    ("mailbox_messages", mailbox_messages),
    ("replica_and_media_requests", replica_and_media_requests),
    ("envelopes", envelopes),
    ("certificates", certificates),
    ("auth_messages", auth_messages),
    ("media_messages", media_messages),
];

/// Pipe frames one after another, as a relay's reader takes them, until the bytes end.
pub fn pipe_frames(bytes: &[u8]) {
    crate::net::pipe::fuzz_read_frames::<MailboxRequest>(bytes);
}

/// The gateway protocol's length-prefixed frames (request-response).
pub fn codec_frames(bytes: &[u8]) {
    use libp2p::request_response::Codec;
    let mut codec = PostcardCodec::<AuthRequest, AuthResponse>::new(16 * 1024, 64 * 1024);
    let protocol = libp2p::StreamProtocol::new(crate::proto::AUTH_PROTOCOL);
    futures::executor::block_on(async {
        let _ = codec.read_request(&protocol, &mut futures::io::Cursor::new(bytes)).await;
        let _ = codec.read_response(&protocol, &mut futures::io::Cursor::new(bytes)).await;
    });
}

/// A mailbox request or answer; what decodes must encode again to the same value.
pub fn mailbox_messages(bytes: &[u8]) {
    if let Ok(request) = postcard::from_bytes::<MailboxRequest>(bytes) {
        round_trips(&request);
        if let MailboxRequest::FetchAcked { ack, .. } | MailboxRequest::AckSigned { ack } = &request {
            let _ = ack.verify();
        }
    }
    if let Ok(response) = postcard::from_bytes::<MailboxResponse>(bytes) {
        round_trips(&response);
    }
}

/// A relay's requests to another relay, and a media request.
pub fn replica_and_media_requests(bytes: &[u8]) {
    if let Ok(request) = postcard::from_bytes::<ReplicaRequest>(bytes) {
        round_trips(&request);
        if let ReplicaRequest::DeleteAcked { acks } = &request {
            acks.iter().for_each(|ack| drop(ack.verify()));
        }
    }
    if let Ok(request) = postcard::from_bytes::<crate::proto::media::MediaRequest>(bytes) {
        round_trips(&request);
    }
}

/// An envelope, opened as its recipient would (the sealed payload is the fuzzer's too).
pub fn envelopes(bytes: &[u8]) {
    static RECIPIENT: LazyLock<Option<DeviceIdentity>> = LazyLock::new(|| {
        let dir = std::env::temp_dir().join(format!("meshgram-fuzz-identity-{}", std::process::id()));
        DeviceIdentity::load_or_create(&dir).ok()
    });
    let Ok(mut envelope) = postcard::from_bytes::<Envelope>(bytes) else { return };
    round_trips(&envelope);
    if let Some(recipient) = RECIPIENT.as_ref() {
        envelope.to_device = recipient.peer_id();
        if let Ok(opened) = crate::crypto::seal::open_envelope(recipient, &envelope) {
            let _ = postcard::from_bytes::<crate::proto::payload::Payload>(&opened.payload);
        }
    }
    let _ = crate::proto::group::GroupSeal::verify(&envelope);
}

/// Session and relay certificates, as postcard (in `Hello`) and as JSON (`relay.cert`).
pub fn certificates(bytes: &[u8]) {
    use crate::crypto::cert::{RelayCert, SessionCert};
    static KEYS: LazyLock<(libp2p::identity::ed25519::PublicKey, libp2p::PeerId)> =
        LazyLock::new(|| (libp2p::identity::ed25519::Keypair::generate().public(), libp2p::PeerId::random()));
    let (gateway, presenter) = &*KEYS;
    if let Ok(cert) = postcard::from_bytes::<SessionCert>(bytes) {
        let _ = cert.verify_for(gateway, presenter, 1_800_000_000);
    }
    if let Ok(cert) = serde_json::from_slice::<RelayCert>(bytes) {
        let _ = cert.verify_for(gateway, presenter, 1_800_000_000);
    }
}

/// The gateway's requests and answers.
pub fn auth_messages(bytes: &[u8]) {
    if let Ok(request) = postcard::from_bytes::<AuthRequest>(bytes) {
        round_trips(&request);
    }
    if let Ok(response) = postcard::from_bytes::<AuthResponse>(bytes) {
        round_trips(&response);
    }
}

/// What a downloader decodes of media: a relay's answer, a file reference from a message (its
/// checks and part arithmetic), a stored chunk opened against the reference's hashes, and the
/// manifest it holds.
pub fn media_messages(bytes: &[u8]) {
    use crate::crypto::media::{FileKey, MANIFEST_INDEX};
    use crate::proto::media::{FileRef, Manifest, MediaResponse};
    if let Ok(response) = postcard::from_bytes::<MediaResponse>(bytes) {
        round_trips(&response);
    }
    if let Ok(file) = postcard::from_bytes::<FileRef>(bytes) {
        round_trips(&file);
        if file.check().is_ok() {
            let last = file.data_parts().saturating_sub(1);
            assert!(file.part_len(last) <= u64::from(file.part_size));
            let _ = FileKey(file.key).open_part(MANIFEST_INDEX, &file.manifest, bytes);
        }
    }
    if let Ok(manifest) = postcard::from_bytes::<Manifest>(bytes) {
        round_trips(&manifest);
    }
}

/// Encodes `value` and decodes it again: it must come back equal in its encoding.
fn round_trips<T: serde::Serialize + serde::de::DeserializeOwned>(value: &T) {
    let Ok(encoded) = postcard::to_stdvec(value) else { return };
    let decoded: T = postcard::from_bytes(&encoded).expect("what encodes decodes");
    assert_eq!(postcard::to_stdvec(&decoded).ok(), Some(encoded), "a value changed in a round trip");
}
