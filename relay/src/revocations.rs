//! Revocations from the gateway: sessions signed out and relays whose admission ended, applied
//! within seconds instead of at certificate expiry.
//!
//! Relays check certificates offline, once per connection, so on its own a relay would serve a
//! revoked session until its certificate expired (up to an hour). Instead every relay started
//! with `--gateway` asks the gateway every [`POLL_EVERY`] for the revocations since the last
//! sequence number it saw (`AuthRequest::Revocations`, on the gateway's `/meshgram/auth/1`),
//! showing its relay certificate. Each revocation is signed by the gateway key and checked here
//! before it is believed. The event loop hands what a poll brought to [`crate::mailbox`]
//! (sessions) and [`crate::relays`] (relays).
//!
//! A failed poll is retried at the next tick, never taken as a verdict: with the gateway away
//! the relay keeps serving with what it knows, and catches up when the gateway is back.

use std::time::{Duration, Instant};

use libp2p::identity::ed25519;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use meshgram_node::crypto::cert::{RelayCert, RevocationBody, unix_now};
use meshgram_node::net::codec::FrameError;
use meshgram_node::proto::{AUTH_PROTOCOL, AuthCodec, AuthRequest, AuthResponse, ErrorCode, auth_codec};
use prometheus_client::metrics::counter::Counter;

/// How often the gateway is asked. A revocation reaches every relay within about this long
/// (plus a round trip); at 0.5 requests per second per relay the gateway hardly notices.
pub(crate) const POLL_EVERY: Duration = Duration::from_secs(2);
/// A poll not answered by then has failed, and the next tick asks again (a late answer to it
/// is ignored): a gateway that was stopped and is back is asked anew within seconds, whatever
/// became of the request it was sent while away.
const POLL_TIMEOUT: Duration = Duration::from_secs(5);

/// The relay's side of `/meshgram/auth/1`: it only asks.
pub(crate) type GatewayClient = request_response::Behaviour<AuthCodec>;

/// A gateway client, for the relay's behaviour.
pub(crate) fn gateway_client() -> GatewayClient {
    request_response::Behaviour::with_codec(
        auth_codec(),
        [(StreamProtocol::new(AUTH_PROTOCOL), ProtocolSupport::Outbound)],
        request_response::Config::default().with_request_timeout(POLL_TIMEOUT),
    )
}

/// What the gateway client reports to the event loop.
pub(crate) type GatewayEvent = request_response::Event<Result<AuthRequest, FrameError>, AuthResponse>;

/// Where the gateway is and what to show it.
#[derive(Debug, Clone)]
pub(crate) struct GatewayAddr {
    pub(crate) peer: PeerId,
    pub(crate) addrs: Vec<Multiaddr>,
}

/// Asks the gateway for revocations, one request at a time, and checks what it answers.
#[derive(Debug)]
pub(crate) struct RevocationPoller {
    gateway: GatewayAddr,
    gateway_key: ed25519::PublicKey,
    /// This relay's certificate: the gateway gives the list only to relays of its network.
    cert: RelayCert,
    /// The sequence number to ask from.
    since: u64,
    /// The poll under way, and when it was sent.
    in_flight: Option<(OutboundRequestId, Instant)>,
    /// Failed polls in a row, so that the log says so once per outage, not every tick.
    failures: u32,
    /// Every failed poll, for `/metrics`.
    failed_total: Counter,
}

impl RevocationPoller {
    /// A poller that counts its failed polls in `failed_total`.
    pub(crate) fn new(
        gateway: GatewayAddr,
        gateway_key: ed25519::PublicKey,
        cert: RelayCert,
        failed_total: Counter,
    ) -> Self {
        RevocationPoller { gateway, gateway_key, cert, since: 0, in_flight: None, failures: 0, failed_total }
    }

    /// Where the gateway is.
    pub(crate) fn gateway(&self) -> &GatewayAddr {
        &self.gateway
    }

    /// The certificate shown to it.
    pub(crate) fn cert(&self) -> &RelayCert {
        &self.cert
    }

    /// Asks the gateway, unless a poll is under way and not yet past its deadline.
    pub(crate) fn poll(&mut self, client: &mut GatewayClient) {
        if let Some((_, sent)) = self.in_flight {
            if sent.elapsed() < POLL_TIMEOUT {
                return;
            }
            self.failed(format!("no answer within {POLL_TIMEOUT:?}"));
        }
        let request = AuthRequest::Revocations { since: self.since, relay_cert: self.cert.clone() };
        let id = client.send_request_with_addresses(&self.gateway.peer, Ok(request), self.gateway.addrs.clone());
        self.in_flight = Some((id, Instant::now()));
    }

    /// Takes an event of the gateway client: the revocations an answer brought (checked), and
    /// whether to ask again at once (the answer said there is more).
    pub(crate) fn on_event(&mut self, event: GatewayEvent) -> Polled {
        let (request_id, outcome) = match event {
            request_response::Event::Message {
                message: request_response::Message::Response { request_id, response },
                ..
            } => (request_id, Ok(response)),
            request_response::Event::OutboundFailure { request_id, error, .. } => (request_id, Err(error.to_string())),
            _ => return Polled::default(),
        };
        // An answer to a poll given up on: the next one asks from the same place.
        if self.in_flight.map(|(id, _)| id) != Some(request_id) {
            return Polled::default();
        }
        self.in_flight = None;
        match outcome {
            Ok(AuthResponse::Revocations { revocations, next, more }) => {
                if self.failures > 0 {
                    tracing::info!(failed = self.failures, "the gateway answers again; catching up on revocations");
                }
                self.failures = 0;
                self.since = next;
                Polled { revocations: self.checked(revocations), again: more, refused: None }
            }
            // The gateway refuses this relay's own certificate (revoked, or expired): it is no
            // longer a relay of this network, and says so to clients that greet it.
            Ok(AuthResponse::Error(e)) if e.code == ErrorCode::CertInvalid => {
                Polled { refused: Some(e.message.clone()), ..self.failed(e.to_string()) }
            }
            Ok(AuthResponse::Error(e)) => self.failed(e.to_string()),
            Ok(other) => self.failed(format!("unexpected answer {other:?}")),
            Err(e) => self.failed(e),
        }
    }

    /// The revocations whose signature is the gateway's and that still matter; others are
    /// logged and dropped (a relay acts only on what the gateway signed).
    fn checked(&self, revocations: Vec<meshgram_node::crypto::cert::Revocation>) -> Vec<RevocationBody> {
        let now = unix_now();
        revocations
            .into_iter()
            .filter_map(|revocation| match revocation.verify(&self.gateway_key, now) {
                Ok(body) => Some(body.clone()),
                Err(e) => {
                    tracing::debug!(error = %e, "a revocation from the gateway does not check out; ignored");
                    None
                }
            })
            .collect()
    }

    fn failed(&mut self, why: String) -> Polled {
        self.in_flight = None;
        self.failed_total.inc();
        if self.failures == 0 {
            tracing::warn!(
                gateway = %self.gateway.peer,
                error = %why,
                "asking the gateway for revocations failed; serving with what is known and retrying every {POLL_EVERY:?}"
            );
        }
        self.failures += 1;
        Polled::default()
    }
}

/// What one poll brought.
#[derive(Debug, Default)]
pub(crate) struct Polled {
    /// Checked revocations, to apply.
    pub(crate) revocations: Vec<RevocationBody>,
    /// The gateway has more right now: ask again without waiting for the tick.
    pub(crate) again: bool,
    /// The gateway refused this relay's certificate, saying why.
    pub(crate) refused: Option<String>,
}

#[cfg(test)]
mod tests {
    use meshgram_node::crypto::cert::{Revocation, Revoked};
    use meshgram_node::ids::SessionId;

    use super::*;

    #[test]
    fn only_revocations_the_gateway_signed_and_still_in_force_are_applied() {
        let gateway = ed25519::Keypair::generate();
        let relay = PeerId::random();
        let addr = GatewayAddr { peer: PeerId::random(), addrs: Vec::new() };
        let cert = RelayCert::issue(&gateway, relay, 1, unix_now());
        let poller = RevocationPoller::new(addr, gateway.public(), cert, Counter::default());
        let now = unix_now();
        let body = |session, until| RevocationBody {
            peer: PeerId::random(),
            revoked: Revoked::Session(SessionId(session)),
            revoked_at: now - 10,
            until,
        };
        let in_force = Revocation::sign(body(1, now + 3600), &gateway);
        let forged = Revocation::sign(body(2, now + 3600), &ed25519::Keypair::generate());
        let mut altered = Revocation::sign(body(3, now + 3600), &gateway);
        altered.body.revoked = Revoked::Relay;
        let expired = Revocation::sign(body(4, now - 3600), &gateway);
        let applied = poller.checked(vec![in_force.clone(), forged, altered, expired]);
        assert_eq!(applied, vec![in_force.body]);
    }
}
