//! Clients' sessions on one client protocol (mailbox, media): the session certificate checked
//! once per connection (`Hello`), sessions the gateway revoked, and whether the gateway still
//! admits this relay. [`crate::mailbox`] and [`crate::media`] each keep one, with state of
//! their own per session (`S`); the event loop hands both every revocation and disconnection.

use std::collections::{HashMap, HashSet};

use libp2p::PeerId;
use libp2p::identity::ed25519;
use meshgram_node::crypto::cert::{CERT_CLOCK_SKEW_SECS, CertBody, SessionCert};
use meshgram_node::ids::SessionId;
use meshgram_node::proto::{ErrorCode, WireError};

/// A client that said Hello on a live connection, with what its protocol keeps for it.
#[derive(Debug)]
pub(crate) struct Session<S> {
    pub(crate) cert: CertBody,
    pub(crate) state: S,
}

/// The sessions of one client protocol on this relay.
#[derive(Debug)]
pub(crate) struct Sessions<S> {
    gateway_key: ed25519::PublicKey,
    /// Clients that said Hello, with their certificate.
    live: HashMap<PeerId, Session<S>>,
    /// Sessions the gateway revoked, until their certificates have expired anyway (unix s):
    /// a `Hello` with one of their certificates is refused.
    revoked: HashMap<SessionId, u64>,
    /// Connected devices whose session was revoked under them: told so (`SESSION_REVOKED`)
    /// until they say Hello with a valid certificate or disconnect.
    signed_out: HashSet<PeerId>,
    /// Why the gateway no longer admits this relay, once it said so: new greetings are then
    /// refused, so clients go to other relays (those already here keep their sessions).
    not_admitted: Option<String>,
}

impl<S> Sessions<S> {
    pub(crate) fn new(gateway_key: ed25519::PublicKey) -> Self {
        Sessions {
            gateway_key,
            live: HashMap::new(),
            revoked: HashMap::new(),
            signed_out: HashSet::new(),
            not_admitted: None,
        }
    }

    /// `Hello{cert}` from `peer`: checks the certificate (the gateway's, for this connection's
    /// device, valid now, its session not revoked, this relay still admitted) and starts a
    /// session with `state`, replacing the one before.
    pub(crate) fn hello(
        &mut self,
        peer: PeerId,
        cert: &SessionCert,
        now: u64,
        state: S,
    ) -> Result<&mut Session<S>, WireError> {
        if let Some(why) = &self.not_admitted {
            let message = format!("the gateway no longer admits this relay ({why}); use another relay");
            return Err(WireError::new(ErrorCode::Unavailable, message));
        }
        let body = cert
            .verify_for(&self.gateway_key, &peer, now)
            .map_err(|e| WireError::new(ErrorCode::CertInvalid, e.to_string()))?;
        if self.revoked.contains_key(&body.session_id) {
            return Err(session_revoked());
        }
        self.signed_out.remove(&peer);
        self.live.insert(peer, Session { cert: body.clone(), state });
        Ok(self.live.get_mut(&peer).expect("inserted just above"))
    }

    /// The session of `peer` for any request but `Hello`: refused if there is none, it was
    /// revoked, or its certificate expired (the session then ends).
    pub(crate) fn check(&mut self, peer: &PeerId, now: u64) -> Result<&mut Session<S>, WireError> {
        match self.live.get(peer) {
            None if self.signed_out.contains(peer) => Err(session_revoked()),
            None => Err(WireError::new(ErrorCode::CertInvalid, "say Hello with your session certificate first")),
            Some(session) if now > session.cert.not_after + CERT_CLOCK_SKEW_SECS => {
                self.live.remove(peer);
                Err(WireError::new(ErrorCode::CertInvalid, "your certificate expired; renew it and say Hello again"))
            }
            Some(_) => Ok(self.live.get_mut(peer).expect("present just above")),
        }
    }

    /// `peer`'s live session, if any.
    pub(crate) fn get(&self, peer: &PeerId) -> Option<&Session<S>> {
        self.live.get(peer)
    }

    /// `peer`'s live session, if any.
    pub(crate) fn get_mut(&mut self, peer: &PeerId) -> Option<&mut Session<S>> {
        self.live.get_mut(peer)
    }

    /// Whether `peer`'s session was revoked under it (it is answered `SESSION_REVOKED`).
    pub(crate) fn is_signed_out(&self, peer: &PeerId) -> bool {
        self.signed_out.contains(peer)
    }

    /// `peer`'s last connection closed: its session goes.
    pub(crate) fn disconnected(&mut self, peer: &PeerId) {
        self.live.remove(peer);
        self.signed_out.remove(peer);
    }

    /// The gateway revoked `device`'s session `session`: certificates of that session are
    /// refused until `until` (unix s), when they have expired anyway. Returns `None` if the
    /// revocation was known already, else whether it ended `device`'s live session here.
    pub(crate) fn revoke(&mut self, device: PeerId, session: SessionId, until: u64) -> Option<bool> {
        if self.revoked.insert(session, until).is_some() {
            return None;
        }
        if self.live.get(&device).is_none_or(|s| s.cert.session_id != session) {
            return Some(false);
        }
        self.live.remove(&device);
        self.signed_out.insert(device);
        Some(true)
    }

    /// Forgets revocations whose certificates have all expired by `now`.
    pub(crate) fn forget_expired_revocations(&mut self, now: u64) {
        self.revoked.retain(|_, until| *until >= now);
    }

    /// The gateway refused this relay's certificate: greet no more clients. Returns whether
    /// that is news.
    pub(crate) fn no_longer_admitted(&mut self, why: String) -> bool {
        self.not_admitted.replace(why).is_none()
    }
}

/// The answer to a device whose session the gateway revoked.
pub(crate) fn session_revoked() -> WireError {
    WireError::new(ErrorCode::SessionRevoked, "this session was revoked (signed out); sign in again")
}

#[cfg(test)]
mod tests {
    use meshgram_node::crypto::cert::AccountKind;
    use meshgram_node::ids::{NoiseKey, UserId};

    use super::*;

    fn cert(gateway: &ed25519::Keypair, device: PeerId, session: u64) -> SessionCert {
        let body = CertBody {
            user_id: UserId(1),
            device,
            noise_key: NoiseKey([0; 32]),
            session_id: SessionId(session),
            kind: AccountKind::User,
            not_before: 0,
            not_after: 1000,
        };
        SessionCert::sign(body, gateway)
    }

    #[test]
    fn a_request_before_hello_is_refused_and_one_after_it_is_not() {
        let gateway = ed25519::Keypair::generate();
        let mut sessions: Sessions<()> = Sessions::new(gateway.public());
        let (peer, other) = (PeerId::random(), PeerId::random());
        assert_eq!(sessions.check(&peer, 10).unwrap_err().code, ErrorCode::CertInvalid);
        let refused = sessions.hello(peer, &cert(&gateway, other, 1), 10, ()).unwrap_err();
        assert_eq!(refused.code, ErrorCode::CertInvalid, "another device's certificate");
        sessions.hello(peer, &cert(&gateway, peer, 1), 10, ()).unwrap();
        assert_eq!(sessions.check(&peer, 10).unwrap().cert.user_id, UserId(1));
        assert_eq!(sessions.check(&peer, 2000).unwrap_err().code, ErrorCode::CertInvalid, "expired");
    }

    #[test]
    fn a_revoked_session_loses_access_and_may_not_greet_again() {
        let gateway = ed25519::Keypair::generate();
        let mut sessions: Sessions<()> = Sessions::new(gateway.public());
        let peer = PeerId::random();
        sessions.hello(peer, &cert(&gateway, peer, 1), 10, ()).unwrap();
        assert_eq!(sessions.revoke(peer, SessionId(2), 500), Some(false), "another session");
        assert_eq!(sessions.revoke(peer, SessionId(1), 500), Some(true));
        assert_eq!(sessions.revoke(peer, SessionId(1), 500), None, "known already");
        assert_eq!(sessions.check(&peer, 10).unwrap_err().code, ErrorCode::SessionRevoked);
        let again = sessions.hello(peer, &cert(&gateway, peer, 1), 10, ()).unwrap_err();
        assert_eq!(again.code, ErrorCode::SessionRevoked);
        sessions.hello(peer, &cert(&gateway, peer, 3), 10, ()).unwrap();
        sessions.forget_expired_revocations(501);
        sessions.hello(peer, &cert(&gateway, peer, 1), 10, ()).unwrap();
    }

    #[test]
    fn a_relay_the_gateway_no_longer_admits_greets_nobody() {
        let gateway = ed25519::Keypair::generate();
        let mut sessions: Sessions<()> = Sessions::new(gateway.public());
        let peer = PeerId::random();
        assert!(sessions.no_longer_admitted("revoked".into()));
        assert!(!sessions.no_longer_admitted("revoked".into()));
        assert_eq!(sessions.hello(peer, &cert(&gateway, peer, 1), 10, ()).unwrap_err().code, ErrorCode::Unavailable);
    }
}
