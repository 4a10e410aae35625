//! Group encryption: one symmetric key per epoch, shared by the epoch's members.
//!
//! An admin who changes the membership makes a fresh random epoch key and hands it to every
//! member device pairwise, inside the one-to-one sealed envelopes (Noise X, `crypto::seal`);
//! members who are gone get nothing, members who join get only the new one. Each message is
//! sealed once for everyone: ChaCha20-Poly1305 under a key derived from the epoch key and the
//! envelope id (ids are random, so no key seals twice and a zero nonce is safe), with the group
//! id and epoch as associated data. Inside, the sender's device signs what it says, so that a
//! member cannot put words in another's mouth (a shared key alone would let them).
//!
//! The epoch key also derives the epoch's post key (ed25519), which relays check to keep
//! non-members out without learning who the members are (`proto::group`). Why this and not MLS
//! or Signal's sender keys: see docs/DECISIONS.md ("Groups").

use chacha20poly1305::aead::{Aead, KeyInit, Payload as AeadPayload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey, ed25519};
use serde::{Deserialize, Serialize};

use crate::proto::envelope::EnvelopeId;
use crate::proto::group::GroupId;
use crate::proto::payload::{Body, MessageId};

const MESSAGE_KEY_CONTEXT: &str = "meshgram 2026-12 group message key v1";
const POST_KEY_CONTEXT: &str = "meshgram 2026-12 group post key v1";
const SENDER_CONTEXT: &[u8] = b"meshgram 2026-12 group sender v1";

/// Why a group message does not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupCryptoError {
    #[error("the message does not decrypt with the key of epoch {0}")]
    Decrypt(u64),
    #[error("the message is malformed: {0}")]
    Malformed(String),
    #[error("the message is not signed by the device that sent it")]
    BadSender,
}

/// One epoch's shared secret.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochKey(#[serde(with = "crate::ids::hex_or_bytes")] pub [u8; 32]);

impl std::fmt::Debug for EpochKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EpochKey(..)")
    }
}

/// What a member says, as sealed for the group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPlain {
    pub message_id: MessageId,
    pub body: Body,
    /// By the sending device's key over the envelope id, group, epoch and the rest.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl EpochKey {
    pub fn random() -> Self {
        EpochKey(rand::random())
    }

    /// The epoch's post key, which relays check (see `proto::group::PostCert`).
    pub fn post_keypair(&self) -> ed25519::Keypair {
        let mut seed = blake3::derive_key(POST_KEY_CONTEXT, &self.0);
        let secret = ed25519::SecretKey::try_from_bytes(&mut seed).expect("invariant: 32 bytes are an ed25519 seed");
        ed25519::Keypair::from(secret)
    }

    fn cipher(&self, id: &EnvelopeId) -> ChaCha20Poly1305 {
        let material = [self.0.as_slice(), &id.0].concat();
        ChaCha20Poly1305::new(Key::from_slice(&blake3::derive_key(MESSAGE_KEY_CONTEXT, &material)))
    }

    /// Seals what `device` says in envelope `id` of `group`'s epoch `epoch`.
    pub fn seal(
        &self,
        device: &Keypair,
        id: &EnvelopeId,
        group: &GroupId,
        epoch: u64,
        message_id: MessageId,
        body: Body,
    ) -> Vec<u8> {
        let said = said_bytes(id, group, epoch, &message_id, &body);
        let signature = device.sign(&said).expect("invariant: ed25519 device keys sign");
        let plain = postcard::to_stdvec(&GroupPlain { message_id, body, signature })
            .expect("invariant: group messages serialize");
        let aad = aad(group, epoch);
        self.cipher(id)
            .encrypt(Nonce::from_slice(&[0; 12]), AeadPayload { msg: &plain, aad: &aad })
            .expect("invariant: ChaCha20-Poly1305 seals any message")
    }

    /// Opens envelope `id`'s ciphertext and checks that `sender` (the device the envelope
    /// names) signed it. Whether that device is the named user's is the caller's to check.
    pub fn open(
        &self,
        sender: &PeerId,
        id: &EnvelopeId,
        group: &GroupId,
        epoch: u64,
        ciphertext: &[u8],
    ) -> Result<GroupPlain, GroupCryptoError> {
        let aad = aad(group, epoch);
        let plain = self
            .cipher(id)
            .decrypt(Nonce::from_slice(&[0; 12]), AeadPayload { msg: ciphertext, aad: &aad })
            .map_err(|_| GroupCryptoError::Decrypt(epoch))?;
        let plain: GroupPlain = postcard::from_bytes(&plain).map_err(|e| GroupCryptoError::Malformed(e.to_string()))?;
        let key = device_public_key(sender).ok_or(GroupCryptoError::BadSender)?;
        if !key.verify(&said_bytes(id, group, epoch, &plain.message_id, &plain.body), &plain.signature) {
            return Err(GroupCryptoError::BadSender);
        }
        Ok(plain)
    }
}

fn aad(group: &GroupId, epoch: u64) -> Vec<u8> {
    [group.0.as_slice(), &epoch.to_le_bytes()].concat()
}

fn said_bytes(id: &EnvelopeId, group: &GroupId, epoch: u64, message_id: &MessageId, body: &Body) -> Vec<u8> {
    let body = postcard::to_stdvec(body).expect("invariant: bodies serialize");
    [SENDER_CONTEXT, &id.0, &group.0, &epoch.to_le_bytes(), &message_id.0, &body].concat()
}

/// A device's public key, from its peer id (ed25519 peer ids inline the key).
fn device_public_key(device: &PeerId) -> Option<PublicKey> {
    let hash: &libp2p::multihash::Multihash<64> = device.as_ref();
    (hash.code() == 0).then(|| PublicKey::try_decode_protobuf(hash.digest()).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_opens_with_its_epoch_key_only_and_names_its_signer() {
        let device = Keypair::generate_ed25519();
        let group = GroupId([1; 16]);
        let (key, other) = (EpochKey::random(), EpochKey::random());
        let id = EnvelopeId::random();
        let body = Body::Text { text: "hello group".into(), reply_to: None };
        let sealed = key.seal(&device, &id, &group, 2, MessageId::random(), body.clone());
        let opened = key.open(&device.public().to_peer_id(), &id, &group, 2, &sealed).unwrap();
        assert_eq!(opened.body, body);
        assert_eq!(
            other.open(&device.public().to_peer_id(), &id, &group, 2, &sealed),
            Err(GroupCryptoError::Decrypt(2))
        );
        assert_eq!(key.open(&device.public().to_peer_id(), &id, &group, 3, &sealed), Err(GroupCryptoError::Decrypt(3)));
        let impostor = Keypair::generate_ed25519().public().to_peer_id();
        assert_eq!(key.open(&impostor, &id, &group, 2, &sealed), Err(GroupCryptoError::BadSender));
        assert_ne!(key.post_keypair().public(), other.post_keypair().public());
        assert_eq!(key.post_keypair().public(), key.post_keypair().public(), "derived, the same for every member");
    }
}
