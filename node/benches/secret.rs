//! Secret chats on one core: handshakes per second, and 4 KiB messages per second sealed and
//! opened, against raw ChaCha20-Poly1305 from ring (the fastest AEAD in the process) measured
//! in the same run as the baseline. Run: `cargo bench -p meshgram-node --bench secret`.
//!
//! A secret message here is what the client does per message besides storage: pad the
//! plaintext to its bucket, seal it under an explicit nonce with the envelope id as associated
//! data, and on the other side open it, check the nonce against the replay window, unpad. The
//! plaintext is 4 KiB of text plus the ~40 bytes its body encoding adds.

// A failed unwrap in a benchmark is a broken benchmark.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use meshgram_node::crypto::identity::DeviceIdentity;
use meshgram_node::crypto::secret::{
    HandshakeContext, ReplayWindow, SessionCipher, SessionKeys, complete, frame_len, initiate, respond,
};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use snow::params::CipherChoice;
use snow::resolvers::{CryptoResolver, DefaultResolver};

const MESSAGE: usize = 4096;
const BODY_OVERHEAD: usize = 40;
const RUN_FOR: Duration = Duration::from_secs(2);

/// Calls `f` for about [`RUN_FOR`]; returns calls per second.
fn rate(mut f: impl FnMut(u64)) -> f64 {
    for i in 0..100 {
        f(i); // warm up
    }
    let (started, mut n) = (Instant::now(), 0u64);
    while started.elapsed() < RUN_FOR {
        for _ in 0..64 {
            f(n);
            n += 1;
        }
    }
    n as f64 / started.elapsed().as_secs_f64()
}

fn handshake(alice: &DeviceIdentity, bob: &DeviceIdentity, context: &HandshakeContext) -> (SessionKeys, SessionKeys) {
    let started = initiate(alice, &bob.noise_public, context).unwrap();
    let (_, reply, bob_keys) = respond(bob, context, &started.message).unwrap();
    (complete(alice, &bob.noise_public, context, &started, &reply).unwrap(), bob_keys)
}

fn main() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let alice = DeviceIdentity::load_or_create(a.path()).unwrap();
    let bob = DeviceIdentity::load_or_create(b.path()).unwrap();
    let chat = [7u8; 16];
    let context = HandshakeContext {
        chat: &chat,
        generation: 0,
        initiator: &alice.peer_id().to_bytes(),
        responder: &bob.peer_id().to_bytes(),
    };

    let handshakes = rate(|_| {
        black_box(handshake(&alice, &bob, &context));
    });

    let (alice_keys, bob_keys) = handshake(&alice, &bob, &context);
    let (sender, receiver) = (SessionCipher::new(&alice_keys).unwrap(), SessionCipher::new(&bob_keys).unwrap());
    let plain = vec![b'x'; MESSAGE + BODY_OVERHEAD];
    let envelope_id = [9u8; 16];
    let seal = rate(|n| {
        black_box(sender.seal(n, &envelope_id, &plain).unwrap());
    });
    // A few frames, so that they are in cache as a frame just read from the network is.
    let frames: Vec<Vec<u8>> = (0..16).map(|n| sender.seal(n, &envelope_id, &plain).unwrap()).collect();
    let mut window = ReplayWindow::default();
    let open = rate(|n| {
        let frame = &frames[(n % 16) as usize];
        let (nonce, opened) = receiver.open(&envelope_id, frame).unwrap();
        // Every frame is "new" here: the window's cost is what is measured, not its verdict.
        black_box(window.is_fresh(nonce + n));
        window.mark(nonce + n);
        black_box(opened);
    });

    // Baseline: ring's ChaCha20-Poly1305 on the bare 4 KiB, in place, no padding, no framing.
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[3u8; 32]).unwrap());
    let mut buffer = vec![b'x'; MESSAGE];
    let ring_seal = rate(|n| {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&n.to_le_bytes());
        let tag =
            key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&envelope_id), &mut buffer);
        let _ = black_box(tag.unwrap());
    });
    // For context: the pure-Rust cipher snow uses by default.
    let mut default = DefaultResolver.resolve_cipher(&CipherChoice::ChaChaPoly).unwrap();
    default.set(&[3u8; 32]);
    let mut out = vec![0u8; MESSAGE + 16];
    let default_seal = rate(|n| {
        black_box(default.encrypt(n, &envelope_id, &buffer, &mut out));
    });

    let gbps = |per_sec: f64| per_sec * MESSAGE as f64 / 1e9;
    println!("secret chats on one core ({} s per figure)", RUN_FOR.as_secs());
    println!("  handshakes (IK, both sides, restored initiator): {handshakes:>10.0} /s");
    println!(
        "  4 KiB messages sealed (frame {} B):            {seal:>10.0} /s  {:.2} GB/s",
        frame_len(plain.len()),
        gbps(seal)
    );
    println!("  4 KiB messages opened + replay check:           {open:>10.0} /s  {:.2} GB/s", gbps(open));
    println!("  baseline ring ChaCha20-Poly1305, 4 KiB seal:     {ring_seal:>10.0} /s  {:.2} GB/s", gbps(ring_seal));
    println!(
        "  snow's default (pure Rust) ChaChaPoly, 4 KiB:    {default_seal:>10.0} /s  {:.2} GB/s",
        gbps(default_seal)
    );
    println!("  ratio sealed / ring: {:.2}   opened / ring: {:.2}", seal / ring_seal, open / ring_seal);
}
