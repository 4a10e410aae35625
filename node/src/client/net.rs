//! The client's network actor: one task owns the client's `Swarm`; the rest of the program holds
//! a [`ClientNet`] handle and sends it requests with a oneshot for the reply. Mailbox requests
//! travel on one pipe per relay (`crate::net::pipe`), opened once the event loop has a connection.

use std::collections::HashMap;

use futures::StreamExt;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{DialError, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::crypto::identity::DeviceIdentity;
use crate::defaults::{CLIENT_IDLE_TIMEOUT, COMMAND_QUEUE, MAILBOX_REQUEST_TIMEOUT, MEDIA_REQUEST_TIMEOUT};
use crate::net::behaviour::{ClientBehaviour, ClientBehaviourEvent};
use crate::net::codec::FrameError;
use crate::net::pipe::PipePool;
use crate::net::transport::{TransportError, build_swarm};
use crate::proto::media::{MEDIA_LIMITS, MEDIA_PROTOCOL, MediaRequest, MediaResponse};
use crate::proto::{AuthRequest, AuthResponse, MAILBOX_LIMITS, MAILBOX_PROTOCOL, MailboxRequest, MailboxResponse};

/// Why a request to a peer got no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NetError {
    /// No connection could be made.
    #[error("could not reach {peer} at {addrs}: {reason}")]
    Unreachable { peer: PeerId, addrs: String, reason: String },
    /// Connected, but the request failed (timeout, connection closed, protocol error).
    #[error("request to {peer} failed: {reason}")]
    RequestFailed { peer: PeerId, reason: String },
    /// The network task has stopped.
    #[error("the client's network task has stopped")]
    Stopped,
    /// The connection closed while the request was out: it may or may not have been served.
    #[error("the connection to {peer} closed before it answered")]
    ConnectionClosed { peer: PeerId },
}

type Reply<T> = oneshot::Sender<Result<T, NetError>>;

enum Command {
    Auth {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: AuthRequest,
        reply: Reply<AuthResponse>,
    },
    /// Answer once connected to `peer`, dialing `addrs` if need be.
    Connect {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        reply: Reply<()>,
    },
    /// Listen on `addr`; answer with the address once bound.
    Listen {
        addr: Multiaddr,
        reply: Reply<Multiaddr>,
    },
}

/// Handle to the client's network task. Dropping it stops the task.
pub struct ClientNet {
    commands: mpsc::Sender<Command>,
    task: JoinHandle<()>,
    /// One pipe per relay.
    relays: PipePool<MailboxRequest, MailboxResponse>,
    /// One media pipe per relay (or peer): a part in flight never holds up a message.
    media: PipePool<MediaRequest, MediaResponse>,
    /// For accepting peers' media pipes, when this device serves chunks.
    streams: libp2p_stream::Control,
}

impl std::fmt::Debug for ClientNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientNet").finish_non_exhaustive()
    }
}

impl Drop for ClientNet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ClientNet {
    /// Builds the client's swarm and starts its event loop.
    pub fn spawn(identity: &DeviceIdentity) -> Result<Self, TransportError> {
        let swarm = build_swarm(identity.keypair.clone(), CLIENT_IDLE_TIMEOUT, |key| {
            ClientBehaviour::new(key, concat!("meshgram/", env!("CARGO_PKG_VERSION")))
        })?;
        let streams = swarm.behaviour().stream.new_control();
        let (commands, rx) = mpsc::channel(COMMAND_QUEUE);
        let event_loop = EventLoop {
            swarm,
            commands: rx,
            auth: HashMap::new(),
            listening: HashMap::new(),
            connecting: HashMap::new(),
            dial_errors: HashMap::new(),
        };
        let relays = PipePool::new(MAILBOX_PROTOCOL, MAILBOX_LIMITS, MAILBOX_REQUEST_TIMEOUT, streams.clone());
        let media = PipePool::new(MEDIA_PROTOCOL, MEDIA_LIMITS, MEDIA_REQUEST_TIMEOUT, streams.clone());
        Ok(ClientNet { commands, task: tokio::spawn(event_loop.run()), relays, media, streams })
    }

    /// Sends an auth request to the gateway `peer`, dialing `addrs` if not connected.
    pub async fn auth_request(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: AuthRequest,
    ) -> Result<AuthResponse, NetError> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command::Auth { peer, addrs, request, reply }).await.map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)?
    }

    /// Sends a mailbox request to the relay `peer`, dialing `addrs` if not connected.
    pub async fn mailbox_request(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: MailboxRequest,
    ) -> Result<MailboxResponse, NetError> {
        self.relays
            .call(peer, &request, self.connect(peer, addrs))
            .await
            .map_err(|e| NetError::RequestFailed { peer, reason: e.to_string() })
    }

    /// Sends a media request to `peer` (a relay, or a client node serving chunks), dialing
    /// `addrs` if not connected.
    pub async fn media_request(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: &MediaRequest,
    ) -> Result<MediaResponse, NetError> {
        self.media
            .call(peer, request, self.connect(peer, addrs))
            .await
            .map_err(|e| NetError::RequestFailed { peer, reason: e.to_string() })
    }

    /// Listens on `addr` (so that peers can reach this device); returns the bound address.
    pub async fn listen(&self, addr: Multiaddr) -> Result<Multiaddr, NetError> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command::Listen { addr, reply }).await.map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)?
    }

    /// Peers' media pipes to this device, from now on (once per network task).
    pub fn accept_media(&self) -> Result<libp2p_stream::IncomingStreams, NetError> {
        self.streams
            .clone()
            .accept(libp2p::StreamProtocol::new(MEDIA_PROTOCOL))
            .map_err(|_| NetError::RequestFailed { peer: PeerId::random(), reason: "already accepting".into() })
    }

    /// Makes sure there is a connection to `peer`, dialing `addrs` if need be.
    async fn connect(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Result<(), String> {
        let stopped = NetError::Stopped.to_string();
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command::Connect { peer, addrs, reply }).await.map_err(|_| stopped.clone())?;
        rx.await.map_err(|_| stopped)?.map_err(|e| e.to_string())
    }
}

/// A caller waiting for a connection, and the addresses dialed for it.
type Dialing = (Vec<Multiaddr>, Reply<()>);

struct Pending<T> {
    peer: PeerId,
    addrs: Vec<Multiaddr>,
    reply: Reply<T>,
}

struct EventLoop {
    swarm: Swarm<ClientBehaviour>,
    commands: mpsc::Receiver<Command>,
    auth: HashMap<OutboundRequestId, Pending<AuthResponse>>,
    /// Callers waiting for a listener to bind.
    listening: HashMap<libp2p::core::transport::ListenerId, Reply<Multiaddr>>,
    /// Callers waiting for a connection to a peer, with the addresses dialed.
    connecting: HashMap<PeerId, Vec<Dialing>>,
    /// The last dial error per peer, so a dial failure is reported with its cause.
    dial_errors: HashMap<PeerId, String>,
}

impl EventLoop {
    async fn run(mut self) {
        loop {
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(command) => self.handle_command(command),
                    None => return,
                },
                event = self.swarm.select_next_some() => self.handle_event(event),
            }
        }
    }

    fn handle_command(&mut self, command: Command) {
        match command {
            Command::Auth { peer, addrs, request, reply } => {
                let id = self.swarm.behaviour_mut().auth.send_request_with_addresses(&peer, Ok(request), addrs.clone());
                self.auth.insert(id, Pending { peer, addrs, reply });
            }
            Command::Listen { addr, reply } => match self.swarm.listen_on(addr.clone()) {
                Ok(id) => {
                    self.listening.insert(id, reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(NetError::Unreachable {
                        peer: *self.swarm.local_peer_id(),
                        addrs: addr.to_string(),
                        reason: e.to_string(),
                    }));
                }
            },
            Command::Connect { peer, addrs, reply } => {
                if self.swarm.is_connected(&peer) {
                    let _ = reply.send(Ok(()));
                    return;
                }
                match self.swarm.dial(DialOpts::peer_id(peer).addresses(addrs.clone()).build()) {
                    // Already dialing: wait for that attempt.
                    Ok(()) | Err(DialError::DialPeerConditionFalse(_)) => {
                        self.connecting.entry(peer).or_default().push((addrs, reply));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(unreachable(peer, &addrs, e.to_string())));
                    }
                }
            }
        }
    }

    fn handle_event(&mut self, event: SwarmEvent<ClientBehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(ClientBehaviourEvent::Auth(event)) => {
                settle(&mut self.auth, &mut self.dial_errors, event);
            }
            SwarmEvent::NewListenAddr { listener_id, address } => {
                if let Some(reply) = self.listening.remove(&listener_id) {
                    let _ = reply.send(Ok(address));
                }
            }
            SwarmEvent::ListenerClosed { listener_id, reason, .. } => {
                if let Some(reply) = self.listening.remove(&listener_id) {
                    let peer = *self.swarm.local_peer_id();
                    let reason = reason.err().map_or("closed".into(), |e| e.to_string());
                    let _ = reply.send(Err(NetError::Unreachable { peer, addrs: "listener".into(), reason }));
                }
            }
            SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                for (_, reply) in self.connecting.remove(&peer_id).unwrap_or_default() {
                    let _ = reply.send(Ok(()));
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } => {
                for (addrs, reply) in self.connecting.remove(&peer).unwrap_or_default() {
                    let _ = reply.send(Err(unreachable(peer, &addrs, error.to_string())));
                }
                self.dial_errors.insert(peer, error.to_string());
            }
            _ => {}
        }
    }
}

/// Hands a response or failure to whoever is waiting for that request.
fn settle<Req, Resp>(
    pending: &mut HashMap<OutboundRequestId, Pending<Resp>>,
    dial_errors: &mut HashMap<PeerId, String>,
    event: request_response::Event<Result<Req, FrameError>, Resp>,
) {
    match event {
        request_response::Event::Message {
            message: request_response::Message::Response { request_id, response },
            ..
        } => {
            if let Some(p) = pending.remove(&request_id) {
                let _ = p.reply.send(Ok(response));
            }
        }
        request_response::Event::OutboundFailure { request_id, error, .. } => {
            if let Some(p) = pending.remove(&request_id) {
                let err = match error {
                    request_response::OutboundFailure::DialFailure => unreachable(
                        p.peer,
                        &p.addrs,
                        dial_errors.remove(&p.peer).unwrap_or_else(|| "dial failed".into()),
                    ),
                    request_response::OutboundFailure::ConnectionClosed => NetError::ConnectionClosed { peer: p.peer },
                    other => NetError::RequestFailed { peer: p.peer, reason: other.to_string() },
                };
                let _ = p.reply.send(Err(err));
            }
        }
        _ => {}
    }
}

fn unreachable(peer: PeerId, addrs: &[Multiaddr], reason: String) -> NetError {
    NetError::Unreachable { peer, addrs: addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", "), reason }
}
