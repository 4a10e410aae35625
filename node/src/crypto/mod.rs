//! Keys and signatures: who a device is, what the gateway vouches for, and sealing for one
//! recipient device.
//!
//! - [`backup`]: recovery codes, the argon2id key derived from one, and sealing backups with it.
//! - [`identity`]: the device's ed25519 key (its `PeerId`) and its signed X25519 Noise key.
//! - [`cert`]: gateway-signed session and relay certificates, verified offline.
//! - [`media`]: sealing file parts with a per-file key, so relays only hold ciphertext chunks.
//! - [`secret`]: secret chats' Noise IK handshake, padded transport frames and fingerprints.
//! - [`seal`]: one-way end-to-end sealing with Noise X (`snow`), so relays only hold ciphertext.

pub mod backup;
pub mod cert;
pub mod group;
pub mod identity;
pub mod media;
pub mod seal;
pub mod secret;
