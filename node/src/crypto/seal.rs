//! End-to-end sealing with `snow`: one-way Noise `X` (`Noise_X_25519_ChaChaPoly_BLAKE2s`).
//!
//! The sender knows the recipient device's static key from the directory; each message is a
//! complete one-message handshake carrying the sender's static key (encrypted and
//! authenticated) and the payload. No state is shared between messages, so store-and-forward
//! reordering, loss or duplication never breaks decryption. What the envelope says outside the
//! seal and its recipient relies on (its id, sender and recipient, send time and `seq`) is the
//! Noise prologue: a relay that moves a sealed message under another id, re-dates or reorders
//! it makes it not open ([`seal_envelope`], [`open_envelope`]).
//!
//! Forward secrecy is that of Noise X (ephemeral-static); the secret chat protocol adds IK
//! sessions with re-keying on top.

use snow::Builder;

use crate::crypto::identity::{DeviceIdentity, NOISE_PARAMS};
use crate::ids::NoiseKey;
use crate::proto::envelope::{Envelope, EnvelopeId};

/// Noise X overhead per message: e (32) + encrypted s (32+16) + payload tag (16).
pub const SEAL_OVERHEAD: usize = 96;
/// Longest payload that fits one Noise message.
pub const MAX_SEALED_PAYLOAD: usize = 65_535 - SEAL_OVERHEAD;
/// The prologue of envelopes sealed before their routing fields were bound: the id alone.
const PROLOGUE_CONTEXT: &[u8] = b"meshgram/e2e/1\0";
/// The prologue of envelopes with their routing fields bound.
const ENVELOPE_CONTEXT: &[u8] = b"meshgram/e2e/2\0";

/// Why a message could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum E2eError {
    /// The payload is larger than one Noise message.
    #[error("payload of {0} bytes exceeds the {MAX_SEALED_PAYLOAD}-byte limit")]
    TooLarge(usize),
    /// Not for this device, altered, or moved under another envelope id.
    #[error("message does not open: {0}")]
    Open(String),
    /// snow refused to build a handshake (an invariant; reported rather than panicking).
    #[error("noise: {0}")]
    Noise(String),
}

/// A message opened by its recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The sender device's Noise key, authenticated by the handshake.
    pub sender_key: NoiseKey,
    pub payload: Vec<u8>,
}

fn prologue(id: &EnvelopeId) -> Vec<u8> {
    [PROLOGUE_CONTEXT, &id.0].concat()
}

/// An envelope's routing fields after `context`, as its seal binds them (postcard:
/// unambiguous): the Noise prologue of an ordinary envelope, the associated data of a secret
/// chat's frame (`crypto::secret`).
pub fn bound_fields(context: &[u8], e: &Envelope) -> Vec<u8> {
    let fields = (&e.id, e.from_user, &e.from_device, e.to_user, &e.to_device, e.sent_at_ms, e.seq);
    let mut bound = context.to_vec();
    bound.extend(postcard::to_stdvec(&fields).unwrap_or_default());
    bound
}

fn envelope_prologue(e: &Envelope) -> Vec<u8> {
    bound_fields(ENVELOPE_CONTEXT, e)
}

/// Seals `payload` into `envelope` (its routing fields as they are now bound to it) from
/// `sender` to the device whose Noise key is `recipient`.
pub fn seal_envelope(
    sender: &DeviceIdentity,
    recipient: &NoiseKey,
    envelope: &mut Envelope,
    payload: &[u8],
) -> Result<(), E2eError> {
    envelope.sealed = seal_with(sender, recipient, &envelope_prologue(envelope), payload)?;
    Ok(())
}

/// Opens an envelope sealed to `recipient`, its routing fields as they were sealed. One sealed
/// with its id alone (by a client from before the fields were bound) opens too, until such
/// envelopes have expired from the relays: failing it would lose what was in flight across
/// an upgrade. A relay cannot turn a bound envelope into one of those.
pub fn open_envelope(recipient: &DeviceIdentity, envelope: &Envelope) -> Result<Opened, E2eError> {
    open_with(recipient, &envelope_prologue(envelope), &envelope.sealed)
        .or_else(|bound| open(recipient, &envelope.id, &envelope.sealed).map_err(|_| bound))
}

fn builder<'a>(prologue: &'a [u8], private: &'a [u8]) -> Result<Builder<'a>, E2eError> {
    let params = NOISE_PARAMS.parse().map_err(|e: snow::Error| E2eError::Noise(e.to_string()))?;
    Builder::new(params)
        .prologue(prologue)
        .and_then(|b| b.local_private_key(private))
        .map_err(|e| E2eError::Noise(e.to_string()))
}

/// Seals `payload` from `sender` to the device whose Noise key is `recipient`.
pub fn seal(
    sender: &DeviceIdentity,
    recipient: &NoiseKey,
    id: &EnvelopeId,
    payload: &[u8],
) -> Result<Vec<u8>, E2eError> {
    seal_with(sender, recipient, &prologue(id), payload)
}

fn seal_with(
    sender: &DeviceIdentity,
    recipient: &NoiseKey,
    prologue: &[u8],
    payload: &[u8],
) -> Result<Vec<u8>, E2eError> {
    if payload.len() > MAX_SEALED_PAYLOAD {
        return Err(E2eError::TooLarge(payload.len()));
    }
    let mut state = builder(prologue, sender.noise_private())?
        .remote_public_key(&recipient.0)
        .and_then(|b| b.build_initiator())
        .map_err(|e| E2eError::Noise(e.to_string()))?;
    let mut out = vec![0u8; payload.len() + SEAL_OVERHEAD];
    let len = state.write_message(payload, &mut out).map_err(|e| E2eError::Noise(e.to_string()))?;
    out.truncate(len);
    Ok(out)
}

/// Opens a message sealed to `recipient`, returning the authenticated sender key.
pub fn open(recipient: &DeviceIdentity, id: &EnvelopeId, sealed: &[u8]) -> Result<Opened, E2eError> {
    open_with(recipient, &prologue(id), sealed)
}

fn open_with(recipient: &DeviceIdentity, prologue: &[u8], sealed: &[u8]) -> Result<Opened, E2eError> {
    let mut state =
        builder(prologue, recipient.noise_private())?.build_responder().map_err(|e| E2eError::Noise(e.to_string()))?;
    let mut payload = vec![0u8; sealed.len()];
    let len = state.read_message(sealed, &mut payload).map_err(|e| E2eError::Open(e.to_string()))?;
    payload.truncate(len);
    let sender_key = state
        .get_remote_static()
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .ok_or_else(|| E2eError::Open("no sender key in the handshake".into()))?;
    Ok(Opened { sender_key: NoiseKey(sender_key), payload })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (DeviceIdentity, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        (DeviceIdentity::load_or_create(dir.path()).unwrap(), dir)
    }

    #[test]
    fn an_envelope_whose_routing_fields_were_changed_does_not_open() {
        let ((alice, _a), (bob, _b)) = (device(), device());
        let mut envelope = Envelope {
            id: EnvelopeId::random(),
            from_user: crate::ids::UserId(1),
            from_device: alice.peer_id(),
            to_user: crate::ids::UserId(2),
            to_device: bob.peer_id(),
            sent_at_ms: 1_000,
            seq: 7,
            sealed: Vec::new(),
        };
        seal_envelope(&alice, &bob.noise_public, &mut envelope, b"in order").unwrap();
        assert_eq!(open_envelope(&bob, &envelope).unwrap().payload, b"in order");
        // A relay re-dating, reordering, or re-addressing it: each makes it not open.
        let changes: [fn(&mut Envelope); 4] = [
            |e| e.seq = 3,
            |e| e.sent_at_ms = 5_000,
            |e| e.to_user = crate::ids::UserId(9),
            |e| e.id = EnvelopeId::random(),
        ];
        for change in changes {
            let mut changed = envelope.clone();
            change(&mut changed);
            assert!(matches!(open_envelope(&bob, &changed), Err(E2eError::Open(_))), "{changed:?}");
        }
        // An envelope sealed the old way (its id alone) still opens, fields and all.
        let old = Envelope { sealed: seal(&alice, &bob.noise_public, &envelope.id, b"old").unwrap(), ..envelope };
        assert_eq!(open_envelope(&bob, &old).unwrap().payload, b"old");
    }

    #[test]
    fn sealed_messages_open_only_for_their_recipient_and_id() {
        let ((alice, _a), (bob, _b), (eve, _e)) = (device(), device(), device());
        let id = EnvelopeId::random();
        let sealed = seal(&alice, &bob.noise_public, &id, b"hi bob").unwrap();
        assert_eq!(sealed.len(), 6 + SEAL_OVERHEAD);
        assert!(!sealed.windows(6).any(|w| w == b"hi bob"), "ciphertext must not contain the plaintext");

        let opened = open(&bob, &id, &sealed).unwrap();
        assert_eq!(opened.payload, b"hi bob");
        assert_eq!(opened.sender_key, alice.noise_public);

        assert!(matches!(open(&eve, &id, &sealed), Err(E2eError::Open(_))));
        assert!(matches!(open(&bob, &EnvelopeId::random(), &sealed), Err(E2eError::Open(_))));
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(matches!(open(&bob, &id, &tampered), Err(E2eError::Open(_))));
        assert!(open(&bob, &id, &[]).is_err());
        assert!(open(&bob, &id, &[0u8; 10]).is_err());
    }

    #[test]
    fn payload_sizes_at_the_limit() {
        let ((alice, _a), (bob, _b)) = (device(), device());
        let id = EnvelopeId::random();
        for len in [0, 1, MAX_SEALED_PAYLOAD] {
            let sealed = seal(&alice, &bob.noise_public, &id, &vec![7u8; len]).unwrap();
            assert_eq!(open(&bob, &id, &sealed).unwrap().payload.len(), len);
        }
        assert_eq!(
            seal(&alice, &bob.noise_public, &id, &vec![0; MAX_SEALED_PAYLOAD + 1]),
            Err(E2eError::TooLarge(MAX_SEALED_PAYLOAD + 1))
        );
    }
}
