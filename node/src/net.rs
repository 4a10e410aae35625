//! The client's network actor: one task owns the client's `Swarm`; the rest of the program holds
//! a [`ClientNet`] handle and sends it commands with a oneshot for the reply.

use std::collections::HashMap;

use futures::StreamExt;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::behaviour::{AuthBehaviour, AuthBehaviourEvent};
use crate::defaults::{CLIENT_IDLE_TIMEOUT, COMMAND_QUEUE};
use crate::identity::DeviceIdentity;
use crate::protocol::{AuthRequest, AuthResponse};
use crate::transport::{TransportError, build_swarm};

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
}

enum Command {
    Auth {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: AuthRequest,
        reply: oneshot::Sender<Result<AuthResponse, NetError>>,
    },
}

/// Handle to the client's network task. Dropping the last handle stops the task.
#[derive(Debug)]
pub struct ClientNet {
    commands: mpsc::Sender<Command>,
    task: JoinHandle<()>,
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
            AuthBehaviour::new(key, ProtocolSupport::Outbound, concat!("meshgram/", env!("CARGO_PKG_VERSION")))
        })?;
        let (commands, rx) = mpsc::channel(COMMAND_QUEUE);
        let task =
            tokio::spawn(EventLoop { swarm, commands: rx, pending: HashMap::new(), dial_errors: HashMap::new() }.run());
        Ok(ClientNet { commands, task })
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
}

struct PendingRequest {
    peer: PeerId,
    addrs: Vec<Multiaddr>,
    reply: oneshot::Sender<Result<AuthResponse, NetError>>,
}

struct EventLoop {
    swarm: Swarm<AuthBehaviour>,
    commands: mpsc::Receiver<Command>,
    pending: HashMap<OutboundRequestId, PendingRequest>,
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
                self.pending.insert(id, PendingRequest { peer, addrs, reply });
            }
        }
    }

    fn handle_event(&mut self, event: SwarmEvent<AuthBehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(AuthBehaviourEvent::Auth(event)) => self.handle_auth_event(event),
            SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } => {
                self.dial_errors.insert(peer, error.to_string());
            }
            _ => {}
        }
    }

    fn handle_auth_event(
        &mut self,
        event: request_response::Event<Result<AuthRequest, crate::codec::FrameError>, AuthResponse>,
    ) {
        match event {
            request_response::Event::Message {
                message: request_response::Message::Response { request_id, response },
                ..
            } => {
                if let Some(p) = self.pending.remove(&request_id) {
                    let _ = p.reply.send(Ok(response));
                }
            }
            request_response::Event::OutboundFailure { request_id, error, .. } => {
                if let Some(p) = self.pending.remove(&request_id) {
                    let err = match error {
                        request_response::OutboundFailure::DialFailure => NetError::Unreachable {
                            peer: p.peer,
                            addrs: p.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", "),
                            reason: self.dial_errors.remove(&p.peer).unwrap_or_else(|| "dial failed".into()),
                        },
                        other => NetError::RequestFailed { peer: p.peer, reason: other.to_string() },
                    };
                    let _ = p.reply.send(Err(err));
                }
            }
            _ => {}
        }
    }
}
