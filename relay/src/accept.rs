//! Accepts the relay's inbound pipes (clients' mailbox pipes, other relays' replica pipes) and
//! starts serving each one right where libp2p hands it over.
//!
//! Why not libp2p-stream's `Control::accept`: it passes every inbound stream through one
//! channel with a single slot and drops a stream that finds the slot taken. Under a burst of
//! connecting clients, or on a single-threaded runtime where the accepting task runs late, that
//! dropped up to a fifth of new pipes. Here the connection handler that negotiated the stream
//! starts the pipe's tasks itself, so there is no queue to overflow. libp2p-stream still opens
//! this relay's outbound pipes to other relays.
//!
//! Each connection's handler owns the tasks of the pipes it started: when the connection
//! closes, they stop with it. A connection has at most one pipe per protocol (a new stream
//! replaces the one before, as a client reopening its pipe does), so a peer cannot multiply
//! its pipes on one connection. The acceptor also limits established connections per remote
//! IP address ([`ConnectionLimits`]); libp2p's `connection_limits` holds the other counts.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{Ready, ready};
use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use libp2p::PeerId;
use libp2p::core::multiaddr::Protocol;
use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::DeniedUpgrade;
use libp2p::core::{Endpoint, InboundUpgrade, Multiaddr, UpgradeInfo};
use libp2p::swarm::handler::{ConnectionEvent, FullyNegotiatedInbound};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm, NetworkBehaviour, Stream,
    StreamProtocol, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use meshgram_node::net::pipe::{PipeTasks, Welcome};

/// Starts serving a negotiated inbound stream of one protocol; the pipe is served while its
/// tasks are kept.
pub(crate) type Serve = Box<dyn Fn(PeerId, Stream, &Welcome) -> PipeTasks + Send + Sync>;

/// The protocols this relay accepts pipes on, and what serves each.
struct Routes(Vec<(StreamProtocol, Serve)>);

impl Routes {
    fn serve(&self, peer: PeerId, protocol: &StreamProtocol, stream: Stream, welcome: &Welcome) -> Option<PipeTasks> {
        self.0.iter().find(|(p, _)| p == protocol).map(|(_, serve)| serve(peer, stream, welcome))
    }
}

/// How many connections a relay takes: from everyone, from one IP address, from one peer, and
/// still handshaking. One address could otherwise exhaust the relay's file descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Established connections in all (clients and relays).
    pub max_connections: u32,
    /// Inbound connections from one IP address, handshaking or established.
    pub max_per_ip: u32,
    /// Whether `max_per_ip` applies to loopback addresses too (off: a local network or a
    /// benchmark connects everything from 127.0.0.1).
    pub limit_loopback: bool,
    /// Bytes each client protocol's pipes (mailbox, media, replica) may hold together: request
    /// bodies and answers not yet written.
    pub pipe_memory: usize,
}

/// Connections from one peer: a client needs one, a relay pair may have two while both dial.
pub(crate) const MAX_CONNECTIONS_PER_PEER: u32 = 4;
/// Inbound connections still in their handshake.
pub(crate) const MAX_PENDING_INBOUND: u32 = 256;

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits { max_connections: 20_000, max_per_ip: 64, limit_loopback: false, pipe_memory: 256 << 20 }
    }
}

impl ConnectionLimits {
    /// libp2p's limits for everything but the per-address count.
    pub(crate) fn libp2p(&self) -> libp2p::connection_limits::ConnectionLimits {
        libp2p::connection_limits::ConnectionLimits::default()
            .with_max_established(Some(self.max_connections))
            .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
            .with_max_pending_incoming(Some(MAX_PENDING_INBOUND))
    }
}

/// The behaviour: one [`Handler`] per connection, all sharing the routes.
pub(crate) struct Acceptor {
    routes: Arc<Routes>,
    limits: ConnectionLimits,
    /// Inbound connections (handshaking or established) by remote address, and each counted
    /// one's address.
    per_ip: HashMap<IpAddr, u32>,
    counted: HashMap<ConnectionId, IpAddr>,
}

impl Acceptor {
    pub(crate) fn new(routes: Vec<(StreamProtocol, Serve)>, limits: ConnectionLimits) -> Self {
        Acceptor { routes: Arc::new(Routes(routes)), limits, per_ip: HashMap::new(), counted: HashMap::new() }
    }

    fn handler(&self, peer: PeerId) -> Handler {
        Handler { peer, routes: Arc::clone(&self.routes), pipes: Vec::new(), welcomes: Vec::new() }
    }

    /// The address `remote` comes from, if the per-address limit applies to it.
    fn limited_ip(&self, remote: &Multiaddr) -> Option<IpAddr> {
        let ip = remote.iter().find_map(|p| match p {
            Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
            Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
            _ => None,
        })?;
        (self.limits.limit_loopback || !ip.is_loopback()).then_some(ip)
    }
}

/// Why an inbound connection was refused.
#[derive(Debug, thiserror::Error)]
#[error("{ip} already has {max} connections here")]
pub(crate) struct TooManyFromAddress {
    ip: IpAddr,
    max: u32,
}

impl NetworkBehaviour for Acceptor {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        // Counted from the first byte: a handshake in progress holds a descriptor too.
        let Some(ip) = self.limited_ip(remote) else { return Ok(()) };
        let count = self.per_ip.entry(ip).or_default();
        if *count >= self.limits.max_per_ip {
            return Err(ConnectionDenied::new(TooManyFromAddress { ip, max: self.limits.max_per_ip }));
        }
        *count += 1;
        self.counted.insert(id, ip);
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        let ended = match event {
            FromSwarm::ConnectionClosed(closed) => closed.connection_id,
            FromSwarm::ListenFailure(failed) => failed.connection_id,
            _ => return,
        };
        if let Some(ip) = self.counted.remove(&ended)
            && let Some(count) = self.per_ip.get_mut(&ip)
        {
            *count -= 1;
            if *count == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }

    fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, event: THandlerOutEvent<Self>) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

/// Listens for the routed protocols on one connection; opens nothing. It does not keep the
/// connection alive by itself: an open pipe does (libp2p keeps connections with open streams).
pub(crate) struct Handler {
    peer: PeerId,
    routes: Arc<Routes>,
    /// The pipe served on this connection for each protocol; dropped (stopped) with it.
    pipes: Vec<(StreamProtocol, PipeTasks)>,
    /// Whether the peer was welcomed on each protocol, kept across its pipes of it.
    welcomes: Vec<(StreamProtocol, Welcome)>,
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Infallible;
    type ToBehaviour = Infallible;
    type InboundProtocol = Upgrade;
    type OutboundProtocol = DeniedUpgrade;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<Upgrade> {
        SubstreamProtocol::new(Upgrade(Arc::clone(&self.routes)), ())
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ConnectionHandlerEvent<DeniedUpgrade, (), Infallible>> {
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, event: Infallible) {
        match event {}
    }

    fn on_connection_event(&mut self, event: ConnectionEvent<Upgrade, DeniedUpgrade>) {
        if let ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
            protocol: (stream, protocol), ..
        }) = event
        {
            // One pipe per protocol: the new stream replaces an older one (dropping it stops it).
            self.pipes.retain(|(p, pipe)| *p != protocol && !pipe.is_finished());
            let welcome = match self.welcomes.iter().find(|(p, _)| *p == protocol) {
                Some((_, welcome)) => welcome.clone(),
                None => {
                    let welcome = Welcome::default();
                    self.welcomes.push((protocol.clone(), welcome.clone()));
                    welcome
                }
            };
            if let Some(pipe) = self.routes.serve(self.peer, &protocol, stream, &welcome) {
                self.pipes.push((protocol, pipe));
            }
        }
    }
}

/// Negotiates any routed protocol and hands back the stream as it is.
pub(crate) struct Upgrade(Arc<Routes>);

impl UpgradeInfo for Upgrade {
    type Info = StreamProtocol;
    type InfoIter = std::vec::IntoIter<StreamProtocol>;

    fn protocol_info(&self) -> Self::InfoIter {
        self.0.0.iter().map(|(protocol, _)| protocol.clone()).collect::<Vec<_>>().into_iter()
    }
}

impl InboundUpgrade<Stream> for Upgrade {
    type Output = (Stream, StreamProtocol);
    type Error = Infallible;
    type Future = Ready<Result<Self::Output, Infallible>>;

    fn upgrade_inbound(self, stream: Stream, protocol: StreamProtocol) -> Self::Future {
        ready(Ok((stream, protocol)))
    }
}
