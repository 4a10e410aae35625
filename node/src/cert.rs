//! Session certificates: the gateway's signed statement that a device belongs to an account
//! for a bounded time. Relays verify them offline with the gateway's public key.
//!
//! The signature covers a domain-separated postcard encoding of [`CertBody`]; postcard is
//! deterministic for these types, so signer and verifier encode the same bytes.

use libp2p::PeerId;
use libp2p::identity::ed25519;
use serde::{Deserialize, Serialize};

use crate::ids::{NoiseKey, SessionId, UserId};

const CERT_SIGNING_CONTEXT: &[u8] = b"meshgram/session-cert/1\0";
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

/// What the gateway vouches for.
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

/// A [`CertBody`] with the gateway's ed25519 signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionCert {
    /// The signed statement.
    pub body: CertBody,
    /// ed25519 signature by the gateway key.
    #[serde(with = "crate::ids::hex_or_bytes")]
    pub signature: Vec<u8>,
}

/// Why a certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// Not signed by the expected gateway, or altered after signing.
    #[error("session certificate signature is not the gateway's")]
    BadSignature,
    /// Past `not_after`.
    #[error("session certificate expired at {not_after} (now {now})")]
    Expired { not_after: u64, now: u64 },
    /// Before `not_before`.
    #[error("session certificate is not valid before {not_before} (now {now})")]
    NotYetValid { not_before: u64, now: u64 },
    /// Presented by a device other than the one it names.
    #[error("session certificate names device {expected}, presented by {actual}")]
    WrongDevice { expected: PeerId, actual: PeerId },
}

impl SessionCert {
    /// Signs `body` with the gateway key.
    pub fn sign(body: CertBody, gateway: &ed25519::Keypair) -> Self {
        let signature = gateway.sign(&signed_bytes(&body));
        SessionCert { body, signature }
    }

    /// Checks signature and validity window at `now` (unix seconds), allowing
    /// [`CERT_CLOCK_SKEW_SECS`] of skew on both ends.
    pub fn verify(&self, gateway: &ed25519::PublicKey, now: u64) -> Result<&CertBody, CertError> {
        let b = &self.body;
        if now > b.not_after.saturating_add(CERT_CLOCK_SKEW_SECS) {
            return Err(CertError::Expired { not_after: b.not_after, now });
        }
        if now.saturating_add(CERT_CLOCK_SKEW_SECS) < b.not_before {
            return Err(CertError::NotYetValid { not_before: b.not_before, now });
        }
        if !gateway.verify(&signed_bytes(b), &self.signature) {
            return Err(CertError::BadSignature);
        }
        Ok(b)
    }

    /// [`Self::verify`] plus a check that `presenter` is the certified device.
    pub fn verify_for(
        &self,
        gateway: &ed25519::PublicKey,
        presenter: &PeerId,
        now: u64,
    ) -> Result<&CertBody, CertError> {
        let body = self.verify(gateway, now)?;
        if &body.device != presenter {
            return Err(CertError::WrongDevice { expected: body.device, actual: *presenter });
        }
        Ok(body)
    }
}

fn signed_bytes(body: &CertBody) -> Vec<u8> {
    let mut out = CERT_SIGNING_CONTEXT.to_vec();
    // Serializing plain structs of integers, byte arrays and a PeerId cannot fail.
    out.extend(postcard::to_stdvec(body).expect("invariant: CertBody always serializes"));
    out
}

/// Unix time in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
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
}
