//! Secret chats' cryptography: a Noise `IK` handshake between two devices (`snow`), then
//! transport frames with explicit nonces, padded to size buckets.
//!
//! - **Handshake.** The initiator knows the responder device's static key from its directory
//!   card, so `IK` takes one message each way: `-> e, es, s, ss` and `<- e, ee, se`. Both carry
//!   no payload: what the handshake is for (chat id, generation, the two devices) is its
//!   prologue, so a message moved to another chat, generation or device pair does not complete.
//!   The responder may be offline for days, so the initiator cannot keep snow's
//!   `HandshakeState` in memory until the reply comes: it keeps its ephemeral private key
//!   instead (random, for this handshake alone, wiped when the reply is read) and rebuilds the
//!   same state with it when the reply arrives.
//! - **Transport.** The split keys seal frames with an explicit 64-bit nonce each, as snow's
//!   stateless transport does and byte for byte what it would make ([`SessionCipher`]); unlike
//!   that state the keys can be stored, so a session outlives the process. The envelope's
//!   routing fields (id, sender, recipient, send time, `seq`) are the associated data, so a
//!   relay that re-dates or re-addresses a frame makes it not open ([`SessionCipher::seal_frame`]).
//!   Replays are refused by a sliding window of nonces; gaps are fine.
//! - **Padding.** Every frame is padded (Padmé: at most 12 % larger, leaking only the order of
//!   magnitude of the length) with a 256-byte floor, so relays see size buckets, not lengths.

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};
use snow::resolvers::{BoxedCryptoResolver, DefaultResolver, FallbackResolver, RingResolver};
use snow::{Builder, HandshakeState};

use crate::crypto::identity::DeviceIdentity;
use crate::crypto::seal::{E2eError, bound_fields};
use crate::ids::NoiseKey;
use crate::proto::envelope::Envelope;

/// What a frame's associated data starts with, before its envelope's routing fields.
const FRAME_CONTEXT: &[u8] = b"meshgram/secret-frame/2\0";

/// The handshake: static keys known to the initiator (from the responder's card), one message
/// each way. Ring-backed where ring has the primitive (see [`resolver`]).
pub const SECRET_PARAMS: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
const PROLOGUE_CONTEXT: &[u8] = b"meshgram/secret/1\0";
/// `IK`'s first message without payload: e (32) + encrypted s (32 + 16) + empty payload tag (16).
pub const INITIATION_LEN: usize = 96;
/// `IK`'s reply without payload: e (32) + empty payload tag (16).
pub const REPLY_LEN: usize = 48;
const NONCE_LEN: usize = 8;
const TAG_LEN: usize = 16;
/// Every frame is at least this long, so short messages (most of them) all look alike.
pub const MIN_FRAME: usize = 256;
/// Nonces this far below the highest one seen are refused as too old to tell from a replay.
pub const REPLAY_WINDOW: u64 = 4096;

/// snow with ring for what ring has (ChaCha20-Poly1305, the RNG), snow's own crates for the rest.
fn resolver() -> BoxedCryptoResolver {
    Box::new(FallbackResolver::new(Box::new(RingResolver), Box::new(DefaultResolver)))
}

fn noise(e: snow::Error) -> E2eError {
    E2eError::Noise(e.to_string())
}

fn does_not_open(e: snow::Error) -> E2eError {
    E2eError::Open(e.to_string())
}

/// What a handshake is for, hashed into it as the prologue.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeContext<'a> {
    /// The secret chat's id.
    pub chat: &'a [u8; 16],
    /// 0 for the first handshake, then one more for each re-key.
    pub generation: u32,
    /// The initiator's and responder's devices (their libp2p peer ids, as bytes).
    pub initiator: &'a [u8],
    pub responder: &'a [u8],
}

impl HandshakeContext<'_> {
    fn prologue(&self) -> Vec<u8> {
        let mut p = PROLOGUE_CONTEXT.to_vec();
        p.extend_from_slice(self.chat);
        p.extend_from_slice(&self.generation.to_be_bytes());
        for device in [self.initiator, self.responder] {
            p.extend_from_slice(&(device.len() as u16).to_be_bytes());
            p.extend_from_slice(device);
        }
        p
    }
}

/// The keys one handshake gave one side. Never leaves the device.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionKeys {
    pub send: [u8; 32],
    pub recv: [u8; 32],
    /// The Noise handshake hash: the same on both sides exactly when no one stood between them.
    pub handshake_hash: [u8; 32],
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(..)")
    }
}

/// A handshake this device started: its first message, and the ephemeral private key that
/// completes it when the reply comes.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Initiation {
    pub message: Vec<u8>,
    pub ephemeral: [u8; 32],
}

impl std::fmt::Debug for Initiation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Initiation(..)")
    }
}

fn initiator_state(
    me: &DeviceIdentity,
    peer: &NoiseKey,
    prologue: &[u8],
    ephemeral: &[u8; 32],
) -> Result<(HandshakeState, Vec<u8>), E2eError> {
    let params = SECRET_PARAMS.parse().map_err(noise)?;
    // The fixed ephemeral key is how a pending handshake is restored after a restart: it is
    // random, used for this one handshake, and wiped once the reply is read.
    let mut state = Builder::with_resolver(params, resolver())
        .prologue(prologue)
        .and_then(|b| b.local_private_key(me.noise_private()))
        .and_then(|b| b.remote_public_key(&peer.0))
        .map(|b| b.fixed_ephemeral_key_for_testing_only(ephemeral))
        .and_then(|b| b.build_initiator())
        .map_err(noise)?;
    let mut message = vec![0u8; INITIATION_LEN];
    let len = state.write_message(&[], &mut message).map_err(noise)?;
    message.truncate(len);
    Ok((state, message))
}

fn finish(mut state: HandshakeState, initiator: bool) -> Result<SessionKeys, E2eError> {
    let handshake_hash = <[u8; 32]>::try_from(state.get_handshake_hash())
        .map_err(|_| E2eError::Noise("handshake hash is not 32 bytes".into()))?;
    let (initiator_to_responder, responder_to_initiator) = state.dangerously_get_raw_split();
    let (send, recv) = if initiator {
        (initiator_to_responder, responder_to_initiator)
    } else {
        (responder_to_initiator, initiator_to_responder)
    };
    Ok(SessionKeys { send, recv, handshake_hash })
}

/// Starts a handshake with the device whose static key is `peer`.
pub fn initiate(me: &DeviceIdentity, peer: &NoiseKey, context: &HandshakeContext) -> Result<Initiation, E2eError> {
    let ephemeral: [u8; 32] = rand::random();
    let (_, message) = initiator_state(me, peer, &context.prologue(), &ephemeral)?;
    Ok(Initiation { message, ephemeral })
}

/// Completes a handshake this device started, with the responder's reply.
pub fn complete(
    me: &DeviceIdentity,
    peer: &NoiseKey,
    context: &HandshakeContext,
    started: &Initiation,
    reply: &[u8],
) -> Result<SessionKeys, E2eError> {
    let (mut state, message) = initiator_state(me, peer, &context.prologue(), &started.ephemeral)?;
    if message != started.message {
        return Err(E2eError::Noise("the restored handshake differs from the one sent".into()));
    }
    if reply.len() != REPLY_LEN {
        return Err(E2eError::Open(format!("a handshake reply is {REPLY_LEN} bytes, not {}", reply.len())));
    }
    let mut payload = [0u8; REPLY_LEN];
    let len = state.read_message(reply, &mut payload).map_err(does_not_open)?;
    if len != 0 || !state.is_handshake_finished() {
        return Err(E2eError::Open("a handshake reply carries nothing".into()));
    }
    finish(state, true)
}

fn responder_state(
    me: &DeviceIdentity,
    prologue: &[u8],
    message: &[u8],
) -> Result<(HandshakeState, NoiseKey), E2eError> {
    if message.len() != INITIATION_LEN {
        return Err(E2eError::Open(format!("a handshake is {INITIATION_LEN} bytes, not {}", message.len())));
    }
    let params = SECRET_PARAMS.parse().map_err(noise)?;
    let mut state = Builder::with_resolver(params, resolver())
        .prologue(prologue)
        .and_then(|b| b.local_private_key(me.noise_private()))
        .and_then(|b| b.build_responder())
        .map_err(noise)?;
    let mut payload = [0u8; INITIATION_LEN];
    let len = state.read_message(message, &mut payload).map_err(does_not_open)?;
    if len != 0 {
        return Err(E2eError::Open("a handshake carries nothing".into()));
    }
    let initiator = state
        .get_remote_static()
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .ok_or_else(|| E2eError::Open("no initiator key in the handshake".into()))?;
    Ok((state, NoiseKey(initiator)))
}

/// Checks a handshake sent to this device and returns the initiator's static key, without
/// answering it (the user accepts or declines later).
pub fn read_initiation(me: &DeviceIdentity, context: &HandshakeContext, message: &[u8]) -> Result<NoiseKey, E2eError> {
    responder_state(me, &context.prologue(), message).map(|(_, key)| key)
}

/// Answers a handshake: the initiator's static key, the reply to send, and this side's keys.
pub fn respond(
    me: &DeviceIdentity,
    context: &HandshakeContext,
    message: &[u8],
) -> Result<(NoiseKey, Vec<u8>, SessionKeys), E2eError> {
    let (mut state, initiator) = responder_state(me, &context.prologue(), message)?;
    let mut reply = vec![0u8; REPLY_LEN];
    let len = state.write_message(&[], &mut reply).map_err(noise)?;
    reply.truncate(len);
    Ok((initiator, reply, finish(state, false)?))
}

/// The length of a frame carrying `plaintext_len` bytes: Padmé over the unpadded frame length
/// (nonce + plaintext + its end marker + tag), at least [`MIN_FRAME`].
pub fn frame_len(plaintext_len: usize) -> usize {
    let unpadded = (NONCE_LEN + plaintext_len + 1 + TAG_LEN).max(MIN_FRAME);
    let exponent = unpadded.ilog2();
    // Keep the top ilog2(exponent) + 1 bits of the length, round the rest up.
    let mask = (1usize << (exponent - (exponent.ilog2() + 1))) - 1;
    (unpadded + mask) & !mask
}

/// Ciphers for one session, built from its keys: ChaCha20-Poly1305 with Noise's nonce layout
/// (4 zero bytes, the 64-bit counter little-endian), so a frame is exactly what snow's own
/// ring-backed cipher makes of the same key, nonce and data (a test checks it). It runs on
/// ring in place: snow's `Cipher` trait copies every message into a separate output first.
pub struct SessionCipher {
    send: LessSafeKey,
    recv: LessSafeKey,
}

impl std::fmt::Debug for SessionCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionCipher(..)")
    }
}

fn noise_nonce(n: u64) -> Nonce {
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&n.to_le_bytes());
    Nonce::assume_unique_for_key(nonce)
}

impl SessionCipher {
    pub fn new(keys: &SessionKeys) -> Result<Self, E2eError> {
        let key = |k: &[u8; 32]| {
            UnboundKey::new(&CHACHA20_POLY1305, k).map(LessSafeKey::new).map_err(|_| E2eError::Noise("key".into()))
        };
        Ok(SessionCipher { send: key(&keys.send)?, recv: key(&keys.recv)? })
    }

    /// A frame: the nonce, then `plaintext` padded and sealed under it with `ad`.
    pub fn seal(&self, nonce: u64, ad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, E2eError> {
        if nonce == u64::MAX {
            // Noise reserves the last nonce; a session this long re-keyed long ago.
            return Err(E2eError::Noise("nonces exhausted".into()));
        }
        let len = frame_len(plaintext.len());
        let mut frame = Vec::with_capacity(len);
        frame.extend_from_slice(&nonce.to_le_bytes());
        frame.extend_from_slice(plaintext);
        frame.push(0x80);
        frame.resize(len - TAG_LEN, 0);
        let tag = self
            .send
            .seal_in_place_separate_tag(noise_nonce(nonce), Aad::from(ad), &mut frame[NONCE_LEN..])
            .map_err(|_| E2eError::Noise("seal".into()))?;
        frame.extend_from_slice(tag.as_ref());
        Ok(frame)
    }

    /// `plaintext` as the frame of `envelope` (its routing fields set, `sealed` still to
    /// fill), bound to those fields.
    pub fn seal_frame(&self, nonce: u64, envelope: &Envelope, plaintext: &[u8]) -> Result<Vec<u8>, E2eError> {
        self.seal(nonce, &bound_fields(FRAME_CONTEXT, envelope), plaintext)
    }

    /// Opens `envelope`'s frame, bound to its routing fields as they were sealed. A frame bound
    /// to its id alone (from a client before the fields were) opens too, as ordinary envelopes
    /// do (`seal::open_envelope`): a relay cannot turn a bound frame into one of those.
    pub fn open_frame(&self, envelope: &Envelope) -> Result<(u64, Vec<u8>), E2eError> {
        self.open(&bound_fields(FRAME_CONTEXT, envelope), &envelope.sealed)
            .or_else(|bound| self.open(&envelope.id.0, &envelope.sealed).map_err(|_| bound))
    }

    /// Opens a frame sealed by the other side; returns its nonce and plaintext. Whether the
    /// nonce is fresh is the caller's to check ([`ReplayWindow`]).
    pub fn open(&self, ad: &[u8], frame: &[u8]) -> Result<(u64, Vec<u8>), E2eError> {
        if frame.len() < MIN_FRAME {
            return Err(E2eError::Open(format!("a frame is at least {MIN_FRAME} bytes, not {}", frame.len())));
        }
        let (nonce, sealed) = frame.split_at(NONCE_LEN);
        let nonce = u64::from_le_bytes(nonce.try_into().map_err(|_| E2eError::Open("no nonce".into()))?);
        let mut padded = sealed.to_vec();
        let len = self
            .recv
            .open_in_place(noise_nonce(nonce), Aad::from(ad), &mut padded)
            .map_err(|_| E2eError::Open("decryption failed".into()))?
            .len();
        padded.truncate(len);
        let end = padded.iter().rposition(|b| *b != 0).filter(|i| padded[*i] == 0x80);
        let end = end.ok_or_else(|| E2eError::Open("padding".into()))?;
        padded.truncate(end);
        Ok((nonce, padded))
    }
}

/// The nonces a session has received: the highest, and a bitmap of the [`REPLAY_WINDOW`] below
/// it (bit `n % REPLAY_WINDOW` for nonce `n`), so each check and mark is O(1).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayWindow {
    highest: Option<u64>,
    bits: Vec<u64>,
    received: u64,
}

impl ReplayWindow {
    fn bit(n: u64) -> (usize, u64) {
        let slot = n % REPLAY_WINDOW;
        ((slot / 64) as usize, 1 << (slot % 64))
    }

    fn seen(&self, n: u64) -> bool {
        let (word, mask) = Self::bit(n);
        self.bits.get(word).is_some_and(|w| w & mask != 0)
    }

    /// Whether `nonce` is new: not seen, and not too far below the highest.
    pub fn is_fresh(&self, nonce: u64) -> bool {
        match self.highest {
            None => true,
            Some(h) => nonce > h || (h - nonce < REPLAY_WINDOW && !self.seen(nonce)),
        }
    }

    pub fn mark(&mut self, nonce: u64) {
        if self.bits.len() != (REPLAY_WINDOW / 64) as usize {
            self.bits = vec![0; (REPLAY_WINDOW / 64) as usize];
        }
        match self.highest {
            // The window moves up: the slots it takes over held nonces now too old.
            Some(h) if nonce > h && nonce - h >= REPLAY_WINDOW => self.bits.fill(0),
            Some(h) if nonce > h => {
                for n in h + 1..nonce {
                    let (word, mask) = Self::bit(n);
                    self.bits[word] &= !mask;
                }
            }
            _ => {}
        }
        if self.highest.is_none_or(|h| nonce > h) {
            self.highest = Some(nonce);
        }
        let (word, mask) = Self::bit(nonce);
        self.bits[word] |= mask;
        self.received += 1;
    }

    /// How many frames the session has received.
    pub fn received(&self) -> u64 {
        self.received
    }
}

/// What two people compare to know that no one stands between their devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// 32 bytes as 16 groups of 4 hex digits.
    pub hex: String,
    /// 8 emoji, 6 bits each: easier to compare aloud.
    pub emoji: String,
}

const EMOJI: [&str; 64] = [
    "🐶", "🐱", "🦊", "🐻", "🐼", "🐨", "🐯", "🦁", "🐮", "🐷", "🐸", "🐵", "🐔", "🐧", "🐦", "🦆", "🦉", "🐴", "🦄",
    "🐝", "🦋", "🐌", "🐞", "🐢", "🐍", "🐙", "🦀", "🐠", "🐬", "🐳", "🦈", "🐊", "🦒", "🦘", "🐘", "🦔", "🌵", "🌲",
    "🌴", "🍀", "🍁", "🍄", "🌻", "🌙", "⭐", "🔥", "🌈", "❄", "🍎", "🍋", "🍌", "🍉", "🍇", "🍓", "🍒", "🥕", "🌽",
    "🍕", "🎸", "🎈", "🚀", "⚓", "🔑", "🎲",
];

/// The fingerprint of a handshake: both sides derive the same one exactly when their handshake
/// hashes match.
pub fn fingerprint(handshake_hash: &[u8; 32]) -> Fingerprint {
    let digest = blake3::derive_key("meshgram 2026 secret chat fingerprint", handshake_hash);
    let hex = digest.chunks(2).map(crate::ids::hex).collect::<Vec<_>>().join(" ");
    let bits = u64::from_be_bytes([0, 0, digest[0], digest[1], digest[2], digest[3], digest[4], digest[5]]);
    let emoji = (0..8).map(|i| EMOJI[((bits >> (42 - 6 * i)) & 63) as usize]).collect::<Vec<_>>().join(" ");
    Fingerprint { hex, emoji }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (DeviceIdentity, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        (DeviceIdentity::load_or_create(dir.path()).unwrap(), dir)
    }

    const CHAT: [u8; 16] = [7; 16];

    fn context(generation: u32) -> HandshakeContext<'static> {
        HandshakeContext { chat: &CHAT, generation, initiator: b"alice-device", responder: b"bob-device" }
    }

    fn handshake(alice: &DeviceIdentity, bob: &DeviceIdentity) -> (SessionKeys, SessionKeys) {
        let started = initiate(alice, &bob.noise_public, &context(0)).unwrap();
        assert_eq!(started.message.len(), INITIATION_LEN);
        assert_eq!(read_initiation(bob, &context(0), &started.message).unwrap(), alice.noise_public);
        let (initiator, reply, bob_keys) = respond(bob, &context(0), &started.message).unwrap();
        assert_eq!(initiator, alice.noise_public);
        let alice_keys = complete(alice, &bob.noise_public, &context(0), &started, &reply).unwrap();
        (alice_keys, bob_keys)
    }

    #[test]
    fn a_handshake_restored_from_its_ephemeral_key_completes_with_matching_keys() {
        let ((alice, _a), (bob, _b)) = (device(), device());
        let (a, b) = handshake(&alice, &bob);
        assert_eq!((a.send, a.recv, a.handshake_hash), (b.recv, b.send, b.handshake_hash));
        assert_eq!(fingerprint(&a.handshake_hash), fingerprint(&b.handshake_hash));
        assert_eq!(fingerprint(&a.handshake_hash).emoji.split(' ').count(), 8);
        // Fresh ephemeral keys every time: a second handshake shares nothing with the first.
        let (again, _) = handshake(&alice, &bob);
        assert_ne!(again.send, a.send);
        assert_ne!(fingerprint(&again.handshake_hash), fingerprint(&a.handshake_hash));
    }

    #[test]
    fn handshakes_for_another_chat_generation_device_or_key_do_not_complete() {
        let ((alice, _a), (bob, _b), (eve, _e)) = (device(), device(), device());
        let started = initiate(&alice, &bob.noise_public, &context(0)).unwrap();
        assert!(read_initiation(&eve, &context(0), &started.message).is_err());
        assert!(read_initiation(&bob, &context(1), &started.message).is_err());
        let moved = HandshakeContext { responder: b"bob-laptop", ..context(0) };
        assert!(read_initiation(&bob, &moved, &started.message).is_err());
        let mut tampered = started.message.clone();
        tampered[40] ^= 1;
        assert!(read_initiation(&bob, &context(0), &tampered).is_err());
        assert!(read_initiation(&bob, &context(0), &started.message[..50]).is_err());

        let (_, reply, _) = respond(&bob, &context(0), &started.message).unwrap();
        let mut bad = reply.clone();
        bad[47] ^= 1;
        assert!(complete(&alice, &bob.noise_public, &context(0), &started, &bad).is_err());
        let other = initiate(&alice, &bob.noise_public, &context(0)).unwrap();
        assert!(complete(&alice, &bob.noise_public, &context(0), &other, &reply).is_err());
        assert!(complete(&alice, &bob.noise_public, &context(0), &started, &reply).is_ok());
    }

    #[test]
    fn frames_open_in_any_order_once_and_only_unaltered() {
        let ((alice, _a), (bob, _b)) = (device(), device());
        let (a, b) = handshake(&alice, &bob);
        let (a, b) = (SessionCipher::new(&a).unwrap(), SessionCipher::new(&b).unwrap());
        let frames: Vec<Vec<u8>> =
            (0..5u64).map(|n| a.seal(n, b"envelope", format!("m{n}").as_bytes()).unwrap()).collect();
        let mut window = ReplayWindow::default();
        for n in [3usize, 0, 4, 1] {
            let (nonce, plain) = b.open(b"envelope", &frames[n]).unwrap();
            assert_eq!((nonce, plain), (n as u64, format!("m{n}").into_bytes()));
            assert!(window.is_fresh(nonce));
            window.mark(nonce);
        }
        assert!(!window.is_fresh(3), "a replay is refused");
        assert!(window.is_fresh(2), "a gap is filled late");
        assert!(b.open(b"another envelope", &frames[2]).is_err(), "bound to its envelope");
        let mut tampered = frames[2].clone();
        tampered[20] ^= 1;
        assert!(b.open(b"envelope", &tampered).is_err());
        assert!(a.open(b"envelope", &frames[2]).is_err(), "one direction's key does not open the other");
        assert!(b.open(b"envelope", &frames[2][..100]).is_err());
        assert!(b.open(b"envelope", &[0u8; MIN_FRAME]).is_err());

        window.mark(10_000);
        assert!(!window.is_fresh(10_000 - REPLAY_WINDOW), "too old to tell from a replay");
        assert!(window.is_fresh(10_000 - REPLAY_WINDOW + 1));
        assert!(window.is_fresh(10_000 - 5) && !window.is_fresh(3), "older nonces are cleared as the window moves");
        window.mark(10_000 - 5);
        assert!(!window.is_fresh(10_000 - 5));
        assert_eq!(window.received(), 6);
    }

    #[test]
    fn a_frame_whose_routing_fields_were_changed_does_not_open() {
        use crate::ids::UserId;
        use crate::proto::envelope::EnvelopeId;
        let ((alice, _a), (bob, _b)) = (device(), device());
        let (a, b) = handshake(&alice, &bob);
        let (a, b) = (SessionCipher::new(&a).unwrap(), SessionCipher::new(&b).unwrap());
        let mut envelope = Envelope {
            id: EnvelopeId::random(),
            from_user: UserId(1),
            from_device: alice.peer_id(),
            to_user: UserId(2),
            to_device: bob.peer_id(),
            sent_at_ms: 1_000,
            seq: 7,
            sealed: Vec::new(),
        };
        envelope.sealed = a.seal_frame(3, &envelope, b"hi").unwrap();
        assert_eq!(b.open_frame(&envelope).unwrap(), (3, b"hi".to_vec()));
        let altered: [fn(&mut Envelope); 5] = [
            |e| e.sent_at_ms += 1,
            |e| e.seq += 1,
            |e| e.id = EnvelopeId::random(),
            |e| e.to_user = UserId(3),
            |e| e.from_user = UserId(4),
        ];
        for alter in altered {
            let mut moved = envelope.clone();
            alter(&mut moved);
            assert!(b.open_frame(&moved).is_err(), "{moved:?}");
        }
        // A frame from before bound only its id; it still opens (re-dating it went unseen then).
        let mut legacy = envelope.clone();
        legacy.sealed = a.seal(4, &legacy.id.0, b"old").unwrap();
        legacy.sent_at_ms += 1;
        assert_eq!(b.open_frame(&legacy).unwrap(), (4, b"old".to_vec()));
    }

    #[test]
    fn frames_are_what_snows_own_cipher_makes() {
        use snow::params::CipherChoice;
        use snow::resolvers::CryptoResolver;
        let ((alice, _a), (bob, _b)) = (device(), device());
        let (a, b) = handshake(&alice, &bob);
        let frame = SessionCipher::new(&a).unwrap().seal(41, b"envelope", b"hello").unwrap();
        let mut snow_cipher = RingResolver.resolve_cipher(&CipherChoice::ChaChaPoly).unwrap();
        snow_cipher.set(&b.recv);
        let mut out = vec![0u8; frame.len()];
        let len = snow_cipher.decrypt(41, b"envelope", &frame[NONCE_LEN..], &mut out).unwrap();
        assert_eq!(&out[..6], b"hello\x80");
        assert_eq!(len, frame.len() - NONCE_LEN - TAG_LEN);
        let mut default = DefaultResolver.resolve_cipher(&CipherChoice::ChaChaPoly).unwrap();
        default.set(&b.recv);
        assert!(default.decrypt(41, b"envelope", &frame[NONCE_LEN..], &mut out).is_ok(), "and snow's pure-Rust one");
    }

    #[test]
    fn frames_come_in_padme_buckets() {
        assert_eq!(frame_len(0), MIN_FRAME);
        assert_eq!(frame_len(200), MIN_FRAME);
        for len in [0usize, 1, 300, 1000, 4096, 10_000, 65_000, 1 << 20] {
            let frame = frame_len(len);
            assert!(frame >= len + 25, "{len} fits");
            assert!(frame as f64 <= ((len + 25).max(MIN_FRAME) as f64) * 1.12, "{len}: at most 12 % padding");
        }
        // Lengths near each other share a bucket.
        assert_eq!(frame_len(4200), frame_len(4300));
        let ((alice, _a), (bob, _b)) = (device(), device());
        let (a, b) = handshake(&alice, &bob);
        let (a, b) = (SessionCipher::new(&a).unwrap(), SessionCipher::new(&b).unwrap());
        for len in [0usize, 231, 232, 4096, 70_000] {
            let plain = vec![0u8; len]; // zeros end the plaintext: the marker still finds its end
            let frame = a.seal(1, &[], &plain).unwrap();
            assert_eq!(frame.len(), frame_len(len));
            assert_eq!(b.open(&[], &frame).unwrap().1, plain);
        }
        assert!(a.seal(u64::MAX, &[], b"x").is_err());
    }
}
