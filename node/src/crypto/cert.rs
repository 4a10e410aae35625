//! Certificates: the gateway's signed statements, verified offline with its public key.
//! - [`SessionCert`]: a device belongs to an account, for a bounded time. Relays serve only
//!   devices that present one.
//! - [`RelayCert`]: a peer is a relay of this network. Relays keep and forward replicas only
//!   for, and through, peers that present one (`meshgram-gateway relay-cert` issues them).
//! - [`Revocation`]: a session, or a relay's admission, ended before its certificates expire.
//!   Relays fetch them from the gateway every few seconds and stop serving what they name.
//!
//! The signature covers a domain-separated postcard encoding of the body (each kind has its own
//! context, so one kind can never pass for another); postcard is deterministic for these
//! types, so signer and verifier encode the same bytes.

use libp2p::PeerId;
use libp2p::identity::ed25519;
use serde::{Deserialize, Serialize};

use std::path::{Path, PathBuf};

use crate::crypto::identity::{KeyFileError, load_or_create_ed25519};
use crate::defaults::{RELAY_CERT_FILE, RELAY_KEY_FILE};
use crate::ids::{NoiseKey, SessionId, UserId};
/// Clock skew tolerated between gateway and verifier, in seconds.
pub const CERT_CLOCK_SKEW_SECS: u64 = 60;

/// Whether an account is a person or a bot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountKind {
    /// A person, signed in by phone.
    User,
    /// A bot, signed in by token.
    Bot,
}

/// What a certificate's body says, as far as checking it goes.
pub trait Statement: Serialize {
    /// Signing context: what kind of statement this is.
    const CONTEXT: &'static [u8];
    /// The peer it is about (who must present it).
    fn subject(&self) -> &PeerId;
    /// Unix seconds from which, and until which, it holds.
    fn valid(&self) -> (u64, u64);
}

/// What the gateway vouches for in a session certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertBody {
    /// The account.
    pub user_id: UserId,
    /// The device (its libp2p identity).
    pub device: PeerId,
    /// The device's end-to-end Noise key.
    pub noise_key: NoiseKey,
    /// The session this certificate belongs to; revoking it stops renewals.
    pub session_id: SessionId,
    /// Person or bot.
    pub kind: AccountKind,
    /// Unix seconds from which the certificate is valid.
    pub not_before: u64,
    /// Unix seconds after which it is not.
    pub not_after: u64,
}

impl Statement for CertBody {
    const CONTEXT: &'static [u8] = b"meshgram/session-cert/1\0";
    fn subject(&self) -> &PeerId {
        &self.device
    }
    fn valid(&self) -> (u64, u64) {
        (self.not_before, self.not_after)
    }
}

/// What the gateway vouches for in a relay certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayCertBody {
    /// The relay (its libp2p identity).
    pub relay: PeerId,
    /// Unix seconds from which the certificate is valid.
    pub not_before: u64,
    /// Unix seconds after which it is not.
    pub not_after: u64,
}

impl Statement for RelayCertBody {
    const CONTEXT: &'static [u8] = b"meshgram/relay-cert/1\0";
    fn subject(&self) -> &PeerId {
        &self.relay
    }
    fn valid(&self) -> (u64, u64) {
        (self.not_before, self.not_after)
    }
}

/// What a [`Revocation`] ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Revoked {
    /// One session of the device: every session certificate naming it.
    Session(SessionId),
    /// A relay's admission: every relay certificate of that peer, for good (a relay that is
    /// admitted again comes back under a new key).
    Relay,
}

/// What the gateway vouches for in a revocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationBody {
    /// The device whose session, or the relay whose admission, ends.
    pub peer: PeerId,
    pub revoked: Revoked,
    /// Unix seconds when the gateway revoked it.
    pub revoked_at: u64,
    /// Unix seconds after which it no longer matters: every certificate it ends has expired
    /// by then (clock skew included). `u64::MAX` for relays.
    pub until: u64,
}

impl Statement for RevocationBody {
    const CONTEXT: &'static [u8] = b"meshgram/revocation/1\0";
    fn subject(&self) -> &PeerId {
        &self.peer
    }
    fn valid(&self) -> (u64, u64) {
        (self.revoked_at, self.until)
    }
}

/// A statement with the gateway's ed25519 signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cert<B> {
    /// The signed statement.
    pub body: B,
    /// ed25519 signature by the gateway key.
    #[serde(with = "crate::ids::hex_or_bytes")]
    pub signature: Vec<u8>,
}

/// A device's session certificate.
pub type SessionCert = Cert<CertBody>;
/// A relay's certificate.
pub type RelayCert = Cert<RelayCertBody>;
/// A revocation, signed like a certificate (so it can be checked wherever it comes from).
pub type Revocation = Cert<RevocationBody>;

impl RelayCert {
    /// A certificate for `relay`, valid from now (less the tolerated skew) for `days`.
    pub fn issue(gateway: &ed25519::Keypair, relay: PeerId, days: u64, now: u64) -> Self {
        let not_before = now.saturating_sub(CERT_CLOCK_SKEW_SECS);
        let not_after = now.saturating_add(days.saturating_mul(24 * 3600));
        Cert::sign(RelayCertBody { relay, not_before, not_after }, gateway)
    }

    /// Admits the relay whose data dir is `relay_dir` before it starts, for whoever holds the
    /// gateway key (`meshgram up`, tests, benchmarks): creates its key if need be and writes
    /// its certificate where it reads it. Returns the relay's peer id.
    pub fn admit(gateway: &ed25519::Keypair, relay_dir: &Path, days: u64, now: u64) -> Result<PeerId, AdmitError> {
        let write = |path: PathBuf| move |source| AdmitError::Write { path, source };
        std::fs::create_dir_all(relay_dir).map_err(write(relay_dir.to_path_buf()))?;
        let relay = load_or_create_ed25519(&relay_dir.join(RELAY_KEY_FILE))?.public().to_peer_id();
        let path = relay_dir.join(RELAY_CERT_FILE);
        let json = serde_json::to_string_pretty(&RelayCert::issue(gateway, relay, days, now))
            .expect("invariant: a certificate serializes to JSON");
        std::fs::write(&path, json + "\n").map_err(write(path.clone()))?;
        Ok(relay)
    }
}

/// Why a relay could not be admitted.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error(transparent)]
    Key(#[from] KeyFileError),
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// Why a certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// Not signed by the expected gateway, or altered after signing.
    #[error("certificate signature is not the gateway's")]
    BadSignature,
    /// Past `not_after`.
    #[error("certificate expired at {not_after} (now {now})")]
    Expired { not_after: u64, now: u64 },
    /// Before `not_before`.
    #[error("certificate is not valid before {not_before} (now {now})")]
    NotYetValid { not_before: u64, now: u64 },
    /// Presented by a peer other than the one it names.
    #[error("certificate names {expected}, presented by {actual}")]
    WrongDevice { expected: PeerId, actual: PeerId },
}

impl<B: Statement> Cert<B> {
    /// Signs `body` with the gateway key.
    pub fn sign(body: B, gateway: &ed25519::Keypair) -> Self {
        let signature = gateway.sign(&signed_bytes(&body));
        Cert { body, signature }
    }

    /// Checks signature and validity window at `now` (unix seconds), allowing
    /// [`CERT_CLOCK_SKEW_SECS`] of skew on both ends.
    pub fn verify(&self, gateway: &ed25519::PublicKey, now: u64) -> Result<&B, CertError> {
        let (not_before, not_after) = self.body.valid();
        if now > not_after.saturating_add(CERT_CLOCK_SKEW_SECS) {
            return Err(CertError::Expired { not_after, now });
        }
        if now.saturating_add(CERT_CLOCK_SKEW_SECS) < not_before {
            return Err(CertError::NotYetValid { not_before, now });
        }
        if !gateway.verify(&signed_bytes(&self.body), &self.signature) {
            return Err(CertError::BadSignature);
        }
        Ok(&self.body)
    }

    /// [`Self::verify`] plus a check that `presenter` is the certified peer.
    pub fn verify_for(&self, gateway: &ed25519::PublicKey, presenter: &PeerId, now: u64) -> Result<&B, CertError> {
        let body = self.verify(gateway, now)?;
        if body.subject() != presenter {
            return Err(CertError::WrongDevice { expected: *body.subject(), actual: *presenter });
        }
        Ok(body)
    }
}

fn signed_bytes<B: Statement>(body: &B) -> Vec<u8> {
    let mut out = B::CONTEXT.to_vec();
    // Serializing plain structs of integers, byte arrays and a PeerId cannot fail.
    out.extend(postcard::to_stdvec(body).expect("invariant: certificate bodies always serialize"));
    out
}

/// Unix time in seconds.
pub fn unix_now() -> u64 {
    crate::ids::now_ms() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(device: PeerId) -> CertBody {
        CertBody {
            user_id: UserId(7),
            device,
            noise_key: NoiseKey([3; 32]),
            session_id: SessionId(9),
            kind: AccountKind::User,
            not_before: 1_000,
            not_after: 4_600,
        }
    }

    #[test]
    fn valid_certificate_verifies() {
        let gw = ed25519::Keypair::generate();
        let device = PeerId::random();
        let cert = SessionCert::sign(body(device), &gw);
        assert_eq!(cert.verify_for(&gw.public(), &device, 2_000).unwrap().user_id, UserId(7));
    }

    #[test]
    fn forged_altered_expired_and_misused_certificates_fail() {
        let gw = ed25519::Keypair::generate();
        let device = PeerId::random();
        let cert = SessionCert::sign(body(device), &gw);

        let forger = ed25519::Keypair::generate();
        let forged = SessionCert::sign(body(device), &forger);
        assert_eq!(forged.verify(&gw.public(), 2_000), Err(CertError::BadSignature));

        let mut altered = cert.clone();
        altered.body.user_id = UserId(8);
        assert_eq!(altered.verify(&gw.public(), 2_000), Err(CertError::BadSignature));

        let mut truncated = cert.clone();
        truncated.signature.truncate(10);
        assert_eq!(truncated.verify(&gw.public(), 2_000), Err(CertError::BadSignature));

        // Boundaries: skew is tolerated, one second past it is not.
        assert!(cert.verify(&gw.public(), 4_600 + CERT_CLOCK_SKEW_SECS).is_ok());
        assert!(matches!(cert.verify(&gw.public(), 4_601 + CERT_CLOCK_SKEW_SECS), Err(CertError::Expired { .. })));
        assert!(cert.verify(&gw.public(), 1_000 - CERT_CLOCK_SKEW_SECS).is_ok());
        assert!(matches!(cert.verify(&gw.public(), 999 - CERT_CLOCK_SKEW_SECS), Err(CertError::NotYetValid { .. })));

        let thief = PeerId::random();
        assert!(matches!(cert.verify_for(&gw.public(), &thief, 2_000), Err(CertError::WrongDevice { .. })));
    }

    #[test]
    fn relay_certificates_verify_for_their_relay_only_and_never_pass_for_session_ones() {
        let gw = ed25519::Keypair::generate();
        let relay = PeerId::random();
        let cert = RelayCert::issue(&gw, relay, 365, 10_000);
        assert_eq!(cert.verify_for(&gw.public(), &relay, 10_000).unwrap().relay, relay);
        assert!(matches!(cert.verify_for(&gw.public(), &PeerId::random(), 10_000), Err(CertError::WrongDevice { .. })));
        assert!(matches!(cert.verify(&gw.public(), 10_000 + 366 * 86_400), Err(CertError::Expired { .. })));
        let forged = RelayCert::issue(&ed25519::Keypair::generate(), relay, 365, 10_000);
        assert_eq!(forged.verify(&gw.public(), 10_000), Err(CertError::BadSignature));
        // The same signature over the same fields under the other kind's context does not verify.
        let session = SessionCert::sign(body(relay), &gw);
        let relabelled = RelayCert {
            body: RelayCertBody { relay, not_before: 1_000, not_after: 4_600 },
            signature: session.signature,
        };
        assert_eq!(relabelled.verify(&gw.public(), 2_000), Err(CertError::BadSignature));
    }
}
