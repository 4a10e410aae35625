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
//! closes, they stop with it.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::DeniedUpgrade;
use libp2p::core::{Endpoint, InboundUpgrade, Multiaddr, UpgradeInfo};
use libp2p::swarm::handler::{ConnectionEvent, FullyNegotiatedInbound};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm, NetworkBehaviour, Stream,
    StreamProtocol, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use meshgram_node::net::pipe::PipeTasks;

/// Starts serving a negotiated inbound stream of one protocol; the pipe is served while its
/// tasks are kept.
pub(crate) type Serve = Box<dyn Fn(PeerId, Stream) -> PipeTasks + Send + Sync>;

/// The protocols this relay accepts pipes on, and what serves each.
struct Routes(Vec<(StreamProtocol, Serve)>);

impl Routes {
    fn serve(&self, peer: PeerId, protocol: &StreamProtocol, stream: Stream) -> Option<PipeTasks> {
        self.0.iter().find(|(p, _)| p == protocol).map(|(_, serve)| serve(peer, stream))
    }
}

/// The behaviour: one [`Handler`] per connection, all sharing the routes.
pub(crate) struct Acceptor {
    routes: Arc<Routes>,
}

impl Acceptor {
    pub(crate) fn new(routes: Vec<(StreamProtocol, Serve)>) -> Self {
        Acceptor { routes: Arc::new(Routes(routes)) }
    }

    fn handler(&self, peer: PeerId) -> Handler {
        Handler { peer, routes: Arc::clone(&self.routes), pipes: Vec::new() }
    }
}

impl NetworkBehaviour for Acceptor {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

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

    fn on_swarm_event(&mut self, _: FromSwarm) {}

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
    /// The tasks of the pipes served on this connection; dropped (stopped) with it.
    pipes: Vec<PipeTasks>,
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
            self.pipes.retain(|pipe| !pipe.is_finished());
            self.pipes.extend(self.routes.serve(self.peer, &protocol, stream));
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
