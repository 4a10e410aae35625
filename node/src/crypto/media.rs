//! Sealing file parts with a per-file key.
//!
//! Each part gets a key of its own, derived from the file key, the part's index and the blake3
//! hash of its plaintext: `derive_key(CONTEXT, file_key ‖ index ‖ blake3(part))`, used with
//! ChaCha20-Poly1305 and a zero nonce. Why derived per part and content:
//!
//! - **Resumable without state.** Sealing the same part of the same file again gives the same
//!   chunk, byte for byte, so a client killed mid-upload re-reads the file, asks which parts
//!   are saved, and sends only the others: nothing but the file key needs saving.
//! - **No nonce reuse, ever.** A key seals one plaintext only: if the file changed between two
//!   attempts, the changed part gets another key. A fixed nonce is then safe.
//! - **Integrity end to end.** The manifest lists each part's plaintext hash; the reader checks
//!   it after decrypting, on top of the AEAD tag and the relays' check of the chunk hash.
//!
//! The manifest itself is the part at index [`MANIFEST_INDEX`], sealed the same way.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};

use crate::proto::media::{ChunkHash, PartHashes};

/// The derivation context (blake3's `derive_key`): fixed for this format.
const CONTEXT: &str = "meshgram 2026-12 media part key v1";
/// The index the manifest is sealed under (data parts have smaller ones).
pub const MANIFEST_INDEX: u32 = u32::MAX;

/// Why a chunk could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MediaCryptoError {
    #[error("the chunk's blake3 hash is {got}, not {expected}: corrupt or substituted")]
    WrongChunkHash { expected: ChunkHash, got: ChunkHash },
    #[error("part {0} does not decrypt with this file's key")]
    Decrypt(u32),
    #[error("part {0} decrypted to other bytes than the manifest names")]
    WrongPlaintext(u32),
}

/// A file's key: random per upload, shared only inside end-to-end encrypted messages.
#[derive(Clone, PartialEq, Eq)]
pub struct FileKey(pub [u8; 32]);

impl std::fmt::Debug for FileKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileKey(..)")
    }
}

impl FileKey {
    pub fn random() -> Self {
        FileKey(rand::random())
    }

    fn part_cipher(&self, index: u32, plain: &[u8; 32]) -> ChaCha20Poly1305 {
        let mut material = [0u8; 68];
        material[..32].copy_from_slice(&self.0);
        material[32..36].copy_from_slice(&index.to_le_bytes());
        material[36..].copy_from_slice(plain);
        ChaCha20Poly1305::new(Key::from_slice(&blake3::derive_key(CONTEXT, &material)))
    }

    /// Seals part `index`: the chunk to store and the hashes the manifest lists for it.
    pub fn seal_part(&self, index: u32, plaintext: &[u8]) -> (Vec<u8>, PartHashes) {
        let plain = *blake3::hash(plaintext).as_bytes();
        let aad = index.to_le_bytes();
        let chunk = self
            .part_cipher(index, &plain)
            .encrypt(Nonce::from_slice(&[0; 12]), Payload { msg: plaintext, aad: &aad })
            .expect("invariant: ChaCha20-Poly1305 seals any part below 256 GiB");
        let hashes = PartHashes { chunk: ChunkHash::of(&chunk), plain };
        (chunk, hashes)
    }

    /// Opens part `index` after checking the chunk is the one named.
    pub fn open_part(&self, index: u32, expected: &PartHashes, chunk: &[u8]) -> Result<Vec<u8>, MediaCryptoError> {
        let got = ChunkHash::of(chunk);
        if got != expected.chunk {
            return Err(MediaCryptoError::WrongChunkHash { expected: expected.chunk, got });
        }
        let aad = index.to_le_bytes();
        let plaintext = self
            .part_cipher(index, &expected.plain)
            .decrypt(Nonce::from_slice(&[0; 12]), Payload { msg: chunk, aad: &aad })
            .map_err(|_| MediaCryptoError::Decrypt(index))?;
        if *blake3::hash(&plaintext).as_bytes() != expected.plain {
            return Err(MediaCryptoError::WrongPlaintext(index));
        }
        Ok(plaintext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_seal_the_same_twice_and_open_only_as_named() {
        let key = FileKey::random();
        let (chunk, hashes) = key.seal_part(3, b"part three");
        assert_eq!(key.seal_part(3, b"part three"), (chunk.clone(), hashes), "resealing gives the same chunk");
        assert_ne!(key.seal_part(4, b"part three").1.chunk, hashes.chunk, "the index is bound in");
        assert_eq!(key.open_part(3, &hashes, &chunk).unwrap(), b"part three");
        assert!(!chunk.windows(10).any(|w| w == b"part three"), "no plaintext in the chunk");

        let mut corrupt = chunk.clone();
        corrupt[0] ^= 1;
        assert!(matches!(key.open_part(3, &hashes, &corrupt), Err(MediaCryptoError::WrongChunkHash { .. })));
        let other = FileKey::random();
        assert_eq!(other.open_part(3, &hashes, &chunk), Err(MediaCryptoError::Decrypt(3)));
        assert_eq!(
            key.open_part(4, &PartHashes { chunk: hashes.chunk, ..hashes }, &chunk),
            Err(MediaCryptoError::Decrypt(4))
        );
    }
}
