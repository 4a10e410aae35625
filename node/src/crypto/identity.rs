//! Device identity: the ed25519 device key (its libp2p `PeerId`) and the X25519 static key used
//! for end-to-end Noise, signed by the device key so that a directory cannot swap it unnoticed.
//!
//! Both private keys live in the profile directory, in files readable only by their owner.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use libp2p::PeerId;
use libp2p::identity::{Keypair, ed25519};
use serde::{Deserialize, Serialize};

use crate::ids::NoiseKey;

/// File in a profile or data dir holding the ed25519 device (or node) key.
pub const DEVICE_KEY_FILE: &str = "device.key";
/// File in a profile dir holding the X25519 Noise private key.
pub const NOISE_KEY_FILE: &str = "noise.key";
/// Domain separation for the device key's signature over its Noise key.
const NOISE_KEY_SIGNING_CONTEXT: &[u8] = b"meshgram/noise-key/1\0";
/// The end-to-end Noise suite whose DH the static key is for.
pub const NOISE_PARAMS: &str = "Noise_X_25519_ChaChaPoly_BLAKE2s";

/// Failure to load or store a key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file exists but could not be read or written.
    #[error("key file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The file's contents are not a key of the expected kind.
    #[error("key file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// The public half of a device's keys, as published in the directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceKeys {
    /// ed25519 public key; its libp2p `PeerId` is the device id.
    #[serde(with = "crate::ids::hex_or_bytes")]
    pub ed25519: [u8; 32],
    /// X25519 static key for end-to-end Noise.
    pub noise_key: NoiseKey,
    /// The device key's signature over `noise_key`.
    #[serde(with = "crate::ids::hex_or_bytes")]
    pub noise_sig: Vec<u8>,
}

/// Why a `DeviceKeys` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceKeysError {
    /// The ed25519 bytes are not a valid public key.
    #[error("device public key is not a valid ed25519 key")]
    BadPublicKey,
    /// The Noise key's signature does not verify.
    #[error("the device key's signature over its Noise key does not verify")]
    BadNoiseSignature,
}

impl DeviceKeys {
    /// What users compare to tell devices apart and spot a stranger's: the first 80 bits of
    /// blake3 over both public keys, as five groups of four hex digits.
    pub fn fingerprint(&self) -> String {
        let hash = blake3::Hasher::new().update(&self.ed25519).update(&self.noise_key.0).finalize();
        crate::ids::grouped(&crate::ids::hex(&hash.as_bytes()[..10]), " ")
    }

    /// Checks the signature and returns the device's `PeerId`.
    pub fn verify(&self) -> Result<PeerId, DeviceKeysError> {
        let public = ed25519::PublicKey::try_from_bytes(&self.ed25519).map_err(|_| DeviceKeysError::BadPublicKey)?;
        if !public.verify(&noise_key_message(&self.noise_key), &self.noise_sig) {
            return Err(DeviceKeysError::BadNoiseSignature);
        }
        Ok(libp2p::identity::PublicKey::from(public).to_peer_id())
    }
}

fn noise_key_message(key: &NoiseKey) -> Vec<u8> {
    [NOISE_KEY_SIGNING_CONTEXT, &key.0].concat()
}

/// A device's private keys.
pub struct DeviceIdentity {
    /// The ed25519 device key; also the libp2p identity.
    pub keypair: Keypair,
    /// X25519 private key for end-to-end Noise.
    noise_private: [u8; 32],
    /// Matching public key.
    pub noise_public: NoiseKey,
}

impl std::fmt::Debug for DeviceIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceIdentity")
            .field("peer_id", &self.peer_id())
            .field("noise_public", &self.noise_public)
            .finish_non_exhaustive()
    }
}

impl DeviceIdentity {
    /// Loads the device's keys from `dir`, creating them (mode 0600) on first use.
    pub fn load_or_create(dir: &Path) -> Result<Self, KeyFileError> {
        let keypair = load_or_create_ed25519(&dir.join(DEVICE_KEY_FILE))?;
        let noise_path = dir.join(NOISE_KEY_FILE);
        // The file holds private || public: snow can generate a pair but not derive one half.
        let noise_pair = match read_secret(&noise_path)? {
            Some(bytes) => bytes,
            None => {
                let fresh = generate_noise_pair();
                write_secret(&noise_path, &fresh)?;
                fresh.to_vec()
            }
        };
        let corrupt = || KeyFileError::Corrupt { path: noise_path.clone(), reason: "expected 64 bytes".into() };
        let (private, public) = noise_pair.split_at_checked(32).ok_or_else(corrupt)?;
        let noise_private: [u8; 32] = private.try_into().map_err(|_| corrupt())?;
        let noise_public = NoiseKey(public.try_into().map_err(|_| corrupt())?);
        Ok(DeviceIdentity { keypair, noise_private, noise_public })
    }

    /// The device id.
    pub fn peer_id(&self) -> PeerId {
        self.keypair.public().to_peer_id()
    }

    /// The keys to publish, with the Noise key signed by the device key.
    pub fn device_keys(&self) -> DeviceKeys {
        let ed = self.keypair.clone().try_into_ed25519().expect("invariant: device keys are always ed25519");
        DeviceKeys {
            ed25519: ed.public().to_bytes(),
            noise_key: self.noise_public,
            noise_sig: ed.sign(&noise_key_message(&self.noise_public)),
        }
    }

    /// The X25519 private key, for building Noise handshakes.
    pub fn noise_private(&self) -> &[u8; 32] {
        &self.noise_private
    }
}

/// Loads an ed25519 keypair from `path`, creating it (mode 0600) if the file does not exist.
/// Used for device keys and for server node keys alike.
pub fn load_or_create_ed25519(path: &Path) -> Result<Keypair, KeyFileError> {
    match load_ed25519(path)? {
        Some(kp) => Ok(kp.into()),
        None => {
            let kp = ed25519::Keypair::generate();
            write_secret(path, &kp.to_bytes())?;
            Ok(kp.into())
        }
    }
}

/// Loads an ed25519 key file written by [`load_or_create_ed25519`]; `None` if there is none.
pub fn load_ed25519(path: &Path) -> Result<Option<ed25519::Keypair>, KeyFileError> {
    let Some(mut bytes) = read_secret(path)? else { return Ok(None) };
    let kp = ed25519::Keypair::try_from_bytes(&mut bytes)
        .map_err(|e| KeyFileError::Corrupt { path: path.to_path_buf(), reason: e.to_string() })?;
    Ok(Some(kp))
}

fn generate_noise_pair() -> [u8; 64] {
    let builder = snow::Builder::new(NOISE_PARAMS.parse().expect("invariant: NOISE_PARAMS is a valid pattern"));
    let kp = builder.generate_keypair().expect("invariant: the default resolver generates X25519 keys");
    let mut pair = [0u8; 64];
    pair[..32].copy_from_slice(&kp.private);
    pair[32..].copy_from_slice(&kp.public);
    pair
}

/// Reads a secret file; `None` when it does not exist yet. Refuses files others can read.
pub fn read_secret(path: &Path) -> Result<Option<Vec<u8>>, KeyFileError> {
    let io = |source| KeyFileError::Io { path: path.to_path_buf(), source };
    match fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
        Ok(meta) if meta.permissions().mode() & 0o077 != 0 => {
            return Err(KeyFileError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("mode {:o} lets others read it; expected 0600", meta.permissions().mode() & 0o777),
            });
        }
        Ok(_) => {}
    }
    fs::read(path).map(Some).map_err(io)
}

/// Writes a secret file with mode 0600 atomically (temp file, fsync, rename).
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), KeyFileError> {
    let io = |source| KeyFileError::Io { path: path.to_path_buf(), source };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io)?;
    }
    // A fresh name, created new: never through a link someone left beside the target.
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", crate::ids::hex(&rand::random::<[u8; 8]>())));
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io)?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all()).and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map_err(io)?;
    // The rename itself is durable only once the directory is synced.
    match path.parent() {
        Some(dir) => fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_persists_with_private_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = DeviceIdentity::load_or_create(dir.path()).unwrap();
        let b = DeviceIdentity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.peer_id(), b.peer_id());
        assert_eq!(a.noise_public, b.noise_public);
        for f in [DEVICE_KEY_FILE, NOISE_KEY_FILE] {
            let mode = fs::metadata(dir.path().join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
    }

    #[test]
    fn device_keys_verify_and_forgeries_fail() {
        let dir = tempfile::tempdir().unwrap();
        let id = DeviceIdentity::load_or_create(dir.path()).unwrap();
        let keys = id.device_keys();
        assert_eq!(keys.verify().unwrap(), id.peer_id());

        let mut swapped = keys.clone();
        swapped.noise_key.0[0] ^= 1;
        assert_eq!(swapped.verify(), Err(DeviceKeysError::BadNoiseSignature));

        let other = tempfile::tempdir().unwrap();
        let mut stolen = DeviceIdentity::load_or_create(other.path()).unwrap().device_keys();
        stolen.noise_key = keys.noise_key;
        assert_eq!(stolen.verify(), Err(DeviceKeysError::BadNoiseSignature));
    }

    #[test]
    fn world_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        DeviceIdentity::load_or_create(dir.path()).unwrap();
        fs::set_permissions(dir.path().join(DEVICE_KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(DeviceIdentity::load_or_create(dir.path()), Err(KeyFileError::Corrupt { .. })));
    }
}
