//! Backup keys: a recovery code shown once, a key derived from it with argon2id, and sealing
//! under that key.
//!
//! The code carries 100 bits (20 characters of Crockford's base32), enough on its own; argon2id
//! (64 MiB, 3 passes) makes each guess cost as much again, for whoever holds a sealed backup
//! (a relay, the gateway, a thief of the file). The key seals each backup under a subkey of its
//! own, derived from the key and a random 16-byte id that travels with it, with
//! ChaCha20-Poly1305 and a zero nonce: one subkey seals one plaintext, so the nonce never
//! repeats under a key.

use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use serde::{Deserialize, Serialize};

use crate::crypto::identity::{KeyFileError, read_secret, write_secret};
use crate::proto::KdfParams;

/// The subkey derivation context (blake3's `derive_key`): fixed for this format.
const CONTEXT: &str = "meshgram 2026-12 backup subkey v1";
/// Characters of a recovery code (grouped by 4 with dashes when shown).
const CODE_CHARS: usize = 20;
/// Crockford's base32: no I, L, O or U, so nothing reads as another character.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// argon2id cost for new keys: OWASP's first recommendation.
const M_KIB: u32 = 64 * 1024;
const PASSES: u32 = 3;
/// The costliest derivation accepted from a record (what an attacker-chosen record could ask):
/// four times our own memory, a few more passes.
const MAX_M_KIB: u32 = 256 * 1024;
const MAX_PASSES: u32 = 4;
/// A sealed blob: the subkey id, then ciphertext with its 16-byte tag.
const ID_LEN: usize = 16;
const TAG_LEN: usize = 16;

/// Backup key failures.
#[derive(Debug, thiserror::Error)]
pub enum BackupKeyError {
    #[error("a recovery code has {CODE_CHARS} letters and digits (dashes and spaces are ignored)")]
    BadCode,
    #[error("the recovery code does not open this backup")]
    WrongCode,
    #[error("the backup's key derivation asks for {0}; refused")]
    BadParams(String),
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    #[error("the backup key file {0} is damaged")]
    Damaged(String),
}

/// A recovery code, normalized: upper case, no separators.
#[derive(Clone, PartialEq, Eq)]
pub struct RecoveryCode(String);

impl std::fmt::Debug for RecoveryCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecoveryCode(..)")
    }
}

impl RecoveryCode {
    fn random() -> Self {
        let bytes: [u8; CODE_CHARS] = rand::random();
        RecoveryCode(bytes.iter().map(|b| ALPHABET[usize::from(b & 31)] as char).collect())
    }

    /// The code as shown to the user: `XXXX-XXXX-XXXX-XXXX-XXXX`.
    pub fn shown(&self) -> String {
        crate::ids::grouped(&self.0, "-")
    }
}

impl std::str::FromStr for RecoveryCode {
    type Err = BackupKeyError;
    /// Any case, dashes and spaces anywhere; O, I and L read as 0, 1 and 1 (Crockford).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut code = String::new();
        for c in s.chars().filter(|c| !matches!(c, '-' | ' ')) {
            let c = match c.to_ascii_uppercase() {
                'O' => '0',
                'I' | 'L' => '1',
                c => c,
            };
            if !ALPHABET.contains(&(c as u8)) || !c.is_ascii() {
                return Err(BackupKeyError::BadCode);
            }
            code.push(c);
        }
        if code.len() != CODE_CHARS {
            return Err(BackupKeyError::BadCode);
        }
        Ok(RecoveryCode(code))
    }
}

/// The key backups are sealed under, with how it was derived (so the code finds it again).
#[derive(Clone, Serialize, Deserialize)]
pub struct BackupKey {
    pub kdf: KdfParams,
    key: [u8; 32],
}

impl std::fmt::Debug for BackupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackupKey(..)")
    }
}

impl BackupKey {
    /// A new recovery code and the key derived from it.
    pub fn generate() -> (BackupKey, RecoveryCode) {
        let code = RecoveryCode::random();
        let kdf = KdfParams { salt: rand::random(), m_kib: M_KIB, t: PASSES, p: 1 };
        let key = BackupKey::derive(&code, kdf).expect("invariant: our own parameters are valid");
        (key, code)
    }

    /// The key a code gives with these parameters (which come from a backup, so are bounded).
    pub fn derive(code: &RecoveryCode, kdf: KdfParams) -> Result<BackupKey, BackupKeyError> {
        if kdf.m_kib > MAX_M_KIB || kdf.t > MAX_PASSES || kdf.p == 0 || kdf.p > 4 {
            return Err(BackupKeyError::BadParams(format!("{} KiB, {} passes, {} lanes", kdf.m_kib, kdf.t, kdf.p)));
        }
        let params = argon2::Params::new(kdf.m_kib, kdf.t, kdf.p, Some(32))
            .map_err(|e| BackupKeyError::BadParams(e.to_string()))?;
        let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut key = [0u8; 32];
        argon
            .hash_password_into(code.0.as_bytes(), &kdf.salt, &mut key)
            .map_err(|e| BackupKeyError::BadParams(e.to_string()))?;
        Ok(BackupKey { kdf, key })
    }

    fn cipher(&self, id: &[u8]) -> ChaCha20Poly1305 {
        let mut material = [0u8; 32 + ID_LEN];
        material[..32].copy_from_slice(&self.key);
        material[32..].copy_from_slice(id);
        ChaCha20Poly1305::new(Key::from_slice(&blake3::derive_key(CONTEXT, &material)))
    }

    /// Seals `plain` under a fresh subkey, bound to `aad` (what it is, whose it is).
    pub fn seal(&self, plain: &[u8], aad: &[u8]) -> Vec<u8> {
        let id: [u8; ID_LEN] = rand::random();
        let sealed = self
            .cipher(&id)
            .encrypt(Nonce::from_slice(&[0u8; 12]), Payload { msg: plain, aad })
            .expect("invariant: sealing works");
        [id.as_slice(), &sealed].concat()
    }

    /// Opens what [`BackupKey::seal`] sealed with the same `aad`; any other key (a wrong
    /// code), or another `aad`, is refused.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, BackupKeyError> {
        if sealed.len() < ID_LEN + TAG_LEN {
            return Err(BackupKeyError::WrongCode);
        }
        let (id, body) = sealed.split_at(ID_LEN);
        self.cipher(id)
            .decrypt(Nonce::from_slice(&[0u8; 12]), Payload { msg: body, aad })
            .map_err(|_| BackupKeyError::WrongCode)
    }

    /// The profile's backup key, if one was made (the code itself is never kept).
    pub fn load(path: &Path) -> Result<Option<BackupKey>, BackupKeyError> {
        match read_secret(path)? {
            None => Ok(None),
            Some(bytes) => {
                postcard::from_bytes(&bytes).map(Some).map_err(|_| BackupKeyError::Damaged(path.display().to_string()))
            }
        }
    }

    /// Keeps the key in the profile (mode 0600), for backups made later without the code.
    pub fn save(&self, path: &Path) -> Result<(), BackupKeyError> {
        Ok(write_secret(path, &postcard::to_stdvec(self).expect("invariant: keys serialize"))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap(code: &RecoveryCode) -> BackupKey {
        BackupKey::derive(code, KdfParams { salt: [7; 16], m_kib: 64, t: 1, p: 1 }).expect("derive")
    }

    #[test]
    fn a_code_reads_back_however_it_is_typed() {
        let code = RecoveryCode::random();
        let shown = code.shown();
        assert_eq!(shown.len(), CODE_CHARS + 4);
        assert_eq!(shown.parse::<RecoveryCode>().expect("shown form"), code);
        assert_eq!(shown.to_lowercase().replace('-', " ").parse::<RecoveryCode>().expect("typed form"), code);
        assert!("too-short".parse::<RecoveryCode>().is_err());
        assert!("UUUU-UUUU-UUUU-UUUU-UUUU".parse::<RecoveryCode>().is_err(), "U is not in the alphabet");
    }

    #[test]
    fn only_the_right_code_opens_a_sealed_backup() {
        let code = RecoveryCode::random();
        let sealed = cheap(&code).seal(b"history", b"user 7");
        assert_eq!(cheap(&code).open(&sealed, b"user 7").expect("opens"), b"history");
        let other = RecoveryCode::random();
        assert!(matches!(cheap(&other).open(&sealed, b"user 7"), Err(BackupKeyError::WrongCode)));
        assert!(matches!(cheap(&code).open(&sealed, b"user 8"), Err(BackupKeyError::WrongCode)), "another account's");
        assert!(matches!(cheap(&code).open(&sealed[..20], b"user 7"), Err(BackupKeyError::WrongCode)));
        let mut flipped = sealed.clone();
        flipped[30] ^= 1;
        assert!(matches!(cheap(&code).open(&flipped, b"user 7"), Err(BackupKeyError::WrongCode)));
    }

    #[test]
    fn a_record_cannot_ask_for_an_unbounded_derivation() {
        let code = RecoveryCode::random();
        let greedy = KdfParams { salt: [0; 16], m_kib: u32::MAX, t: 1, p: 1 };
        assert!(matches!(BackupKey::derive(&code, greedy), Err(BackupKeyError::BadParams(_))));
    }
}
