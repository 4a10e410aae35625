//! The client's network actor: one task owns the client's `Swarm`; the rest of the program holds
//! a [`ClientNet`] handle and sends it requests with a oneshot for the reply.

use std::collections::HashMap;

use futures::StreamExt;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::behaviour::{ClientBehaviour, ClientBehaviourEvent};
use crate::codec::FrameError;
use crate::defaults::{CLIENT_IDLE_TIMEOUT, COMMAND_QUEUE};
use crate::identity::DeviceIdentity;
use crate::protocol::{AuthRequest, AuthResponse, MailboxRequest, MailboxResponse};
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

type Reply<T> = oneshot::Sender<Result<T, NetError>>;

enum Command {
    Auth { peer: PeerId, addrs: Vec<Multiaddr>, request: AuthRequest, reply: Reply<AuthResponse> },
    Mailbox { peer: PeerId, addrs: Vec<Multiaddr>, request: MailboxRequest, reply: Reply<MailboxResponse> },
}

/// Handle to the client's network task. Dropping it stops the task.
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
            ClientBehaviour::new(key, concat!("meshgram/", env!("CARGO_PKG_VERSION")))
        })?;
        let (commands, rx) = mpsc::channel(COMMAND_QUEUE);
        let event_loop = EventLoop {
            swarm,
            commands: rx,
            auth: HashMap::new(),
            mailbox: HashMap::new(),
            dial_errors: HashMap::new(),
        };
        Ok(ClientNet { commands, task: tokio::spawn(event_loop.run()) })
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
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command::Mailbox { peer, addrs, request, reply }).await.map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)?
    }
}

struct Pending<T> {
    peer: PeerId,
    addrs: Vec<Multiaddr>,
    reply: Reply<T>,
}

struct EventLoop {
    swarm: Swarm<ClientBehaviour>,
    commands: mpsc::Receiver<Command>,
    auth: HashMap<OutboundRequestId, Pending<AuthResponse>>,
    mailbox: HashMap<OutboundRequestId, Pending<MailboxResponse>>,
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
            Command::Mailbox { peer, addrs, request, reply } => {
                let id =
                    self.swarm.behaviour_mut().mailbox.send_request_with_addresses(&peer, Ok(request), addrs.clone());
                self.mailbox.insert(id, Pending { peer, addrs, reply });
            }
        }
    }

    fn handle_event(&mut self, event: SwarmEvent<ClientBehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(ClientBehaviourEvent::Auth(event)) => {
                settle(&mut self.auth, &mut self.dial_errors, event);
            }
            SwarmEvent::Behaviour(ClientBehaviourEvent::Mailbox(event)) => {
                settle(&mut self.mailbox, &mut self.dial_errors, event);
            }
            SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } => {
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
                    request_response::OutboundFailure::DialFailure => NetError::Unreachable {
                        peer: p.peer,
                        addrs: p.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", "),
                        reason: dial_errors.remove(&p.peer).unwrap_or_else(|| "dial failed".into()),
                    },
                    other => NetError::RequestFailed { peer: p.peer, reason: other.to_string() },
                };
                let _ = p.reply.send(Err(err));
            }
        }
        _ => {}
    }
}
