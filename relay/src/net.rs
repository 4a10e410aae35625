//! The relay's event loop: owns the `Swarm`, keeps per-connection sessions (verified
//! certificates), hands storage and replication to tasks, and parks long-poll fetches until
//! something arrives for them.
//!
//! Request flow: clients' and relays' requests arrive on pipes (`meshgram_node::net::pipe`), one
//! long-lived stream per connection, whose tasks hand them to this loop. `Hello` is checked
//! here (one signature check per connection, not per envelope). `Send` is checked here (sender
//! = connection, sizes, rate) and then replicated by a task ([`crate::replicate`]) that calls
//! other relays on pipes of its own and reports dead ones back as [`Command`]s. Answers come
//! back through the `tasks` join set.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::identity::ed25519;
use libp2p::kad;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm};
use meshgram_node::crypto::cert::{CERT_CLOCK_SKEW_SECS, CertBody, RelayCert, unix_now};
use meshgram_node::net::codec::FrameError;
use meshgram_node::net::pipe::{self, Inbound, PipePool, Responder};
use meshgram_node::proto::envelope::{Envelope, EnvelopeId};
use meshgram_node::proto::{
    ErrorCode, MAILBOX_LIMITS, MAILBOX_PROTOCOL, MAX_ENVELOPE_SIZE, MAX_ENVELOPES_PER_BATCH, MAX_FETCH_WAIT_MS,
    MailboxRequest, MailboxResponse, REPLICA_LIMITS, REPLICA_PROTOCOL, RelayInfo, ReplicaRequest, ReplicaResponse,
    WireError,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::accept::{Acceptor, Serve};
use crate::behaviour::{RelayBehaviour, RelayBehaviourEvent};
use crate::metrics::Metrics;
use crate::placement::{closest_relays, mailbox_key};
use crate::replicate::{
    Group, ReplicaCallError, ReplicaClient, ReplicaDelete, ReplicaPipes, Replicas, spawn_delete_forwarder,
    store_replicated,
};
use crate::store::{QueuedPut, StoreError, StoreHandle};
use meshgram_node::server::limits::RateLimiter;

/// How often parked fetches are checked for their deadline.
const PARK_TICK: Duration = Duration::from_millis(250);
/// How often expired envelopes are dropped.
const EXPIRE_EVERY: Duration = Duration::from_secs(600);
/// A relay whose replica request failed is skipped in placement for this long.
const DOWN_FOR: Duration = Duration::from_secs(30);
/// A peer that showed no valid relay certificate is skipped in placement for this long.
const NOT_A_RELAY_FOR: Duration = Duration::from_secs(600);
/// Commands queued from tasks to the loop.
const COMMAND_QUEUE: usize = 1024;
/// Requests queued from pipes to the loop; a full queue pushes back on every pipe.
const INBOUND_QUEUE: usize = 4096;
/// Replica requests wait for a commit on a possibly loaded relay; a minute leaves room.
const REPLICA_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

type MailboxInbound = Inbound<MailboxRequest, MailboxResponse>;
type ReplicaInbound = Inbound<ReplicaRequest, ReplicaResponse>;

/// What a relay is configured with.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub gateway_key: ed25519::PublicKey,
    pub replication: usize,
    /// Envelopes per second a user may send, in a burst of `send_burst`.
    pub send_rate: u32,
    pub send_burst: u32,
}

/// Requests from tasks to the loop.
pub(crate) enum Command {
    /// This relay did not answer a replica request: leave it out of placement for a while.
    Down(PeerId),
    /// This peer speaks the replica protocol but showed no valid relay certificate: leave it
    /// out of placement (until its identify says it is a relay again after a while).
    NotARelay(PeerId),
}

/// What a finished task hands back to the loop.
enum Done {
    /// Answer a client; first wake the fetches parked on `arrived` (envelopes committed here).
    Mailbox { channel: Responder<MailboxResponse>, response: MailboxResponse, arrived: Vec<PeerId> },
    /// Answer a relay, likewise.
    Replica { channel: Responder<ReplicaResponse>, response: ReplicaResponse, arrived: Vec<PeerId> },
    /// A fetch found nothing: park it until something arrives or its deadline, unless
    /// something arrived since it looked (`arrivals` then differs from the session's count).
    Park { peer: PeerId, channel: Responder<MailboxResponse>, max: u32, deadline: Instant, arrivals: u64 },
    /// These acknowledged envelopes are deleted here (or failed to be, and will come again).
    AcksApplied { peer: PeerId, ids: Vec<EnvelopeId> },
    /// This relay greeted `peer` on the replica protocol: did it show a relay certificate?
    Greeted { peer: PeerId, outcome: Result<(), ReplicaCallError> },
    /// Background work that answers nobody.
    Nothing,
}

impl Done {
    fn mailbox(channel: Responder<MailboxResponse>, response: MailboxResponse) -> Self {
        Done::Mailbox { channel, response, arrived: Vec::new() }
    }
    fn replica(channel: Responder<ReplicaResponse>, response: ReplicaResponse) -> Self {
        Done::Replica { channel, response, arrived: Vec::new() }
    }
}

struct Parked {
    channel: Responder<MailboxResponse>,
    max: u32,
    deadline: Instant,
}

/// A client that said Hello on a live connection.
struct Session {
    cert: CertBody,
    /// Counts commits into this client's mailbox here, so a fetch that read an empty mailbox
    /// just before an arrival is not parked past it.
    arrivals: u64,
    /// Acknowledged by a `Fetch` but maybe not yet deleted: fetches skip them rather than wait
    /// for the delete, which may queue behind other commits.
    acks_in_flight: HashSet<EnvelopeId>,
}

pub(crate) struct EventLoop {
    swarm: Swarm<RelayBehaviour>,
    store: StoreHandle,
    settings: RelaySettings,
    metrics: Arc<Metrics>,
    listen: Vec<Multiaddr>,
    /// Clients that said Hello, with their certificate.
    sessions: HashMap<PeerId, Session>,
    parked: HashMap<PeerId, Parked>,
    /// Requests read from clients' and other relays' pipes.
    mailbox_rx: mpsc::Receiver<MailboxInbound>,
    replica_rx: mpsc::Receiver<ReplicaInbound>,
    replicas: ReplicaPipes,
    replica_deletes: mpsc::Sender<ReplicaDelete>,
    /// Relays that failed recently, until when.
    down: HashMap<PeerId, Instant>,
    /// Peers that failed to show a relay certificate, until when they are asked again.
    not_relays: HashMap<PeerId, Instant>,
    /// Relays in the routing table whose certificate this relay checked: only they are given
    /// mailboxes (and named to clients), so an uncertified peer that joins Kademlia gets
    /// nothing to keep.
    verified: HashSet<PeerId>,
    /// Greetings under way.
    greeting: HashSet<PeerId>,
    /// Relays that showed a valid certificate on a live connection, until it expires (unix s).
    certified: HashMap<PeerId, u64>,
    cert: RelayCert,
    send_limiter: RateLimiter,
    commands_tx: mpsc::Sender<Command>,
    commands_rx: mpsc::Receiver<Command>,
    tasks: JoinSet<Done>,
}

/// Where requests read from inbound pipes go: the acceptor's side (for the swarm's behaviour)
/// and the loop's side.
pub(crate) fn inbound_pipes() -> (Acceptor, InboundPipes) {
    let (mailbox_tx, mailbox) = mpsc::channel(INBOUND_QUEUE);
    let (replica_tx, replica) = mpsc::channel(INBOUND_QUEUE);
    let routes: Vec<(StreamProtocol, Serve)> = vec![
        (
            StreamProtocol::new(MAILBOX_PROTOCOL),
            Box::new(move |peer, stream| pipe::serve(peer, stream, MAILBOX_LIMITS, mailbox_tx.clone())),
        ),
        (
            StreamProtocol::new(REPLICA_PROTOCOL),
            Box::new(move |peer, stream| pipe::serve(peer, stream, REPLICA_LIMITS, replica_tx.clone())),
        ),
    ];
    (Acceptor::new(routes), InboundPipes { mailbox, replica })
}

/// The loop's side of [`inbound_pipes`].
pub(crate) struct InboundPipes {
    mailbox: mpsc::Receiver<MailboxInbound>,
    replica: mpsc::Receiver<ReplicaInbound>,
}

impl EventLoop {
    pub(crate) fn new(
        swarm: Swarm<RelayBehaviour>,
        inbound: InboundPipes,
        store: StoreHandle,
        settings: RelaySettings,
        cert: RelayCert,
        metrics: Arc<Metrics>,
        listen: Vec<Multiaddr>,
    ) -> Self {
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        let send_limiter = RateLimiter::per_second(settings.send_burst, settings.send_rate);
        let streams = swarm.behaviour().stream.new_control();
        let pipes = PipePool::new(REPLICA_PROTOCOL, REPLICA_LIMITS, REPLICA_REQUEST_TIMEOUT, streams);
        let replicas = Arc::new(ReplicaClient::new(pipes, cert.clone(), settings.gateway_key.clone()));
        EventLoop {
            swarm,
            store,
            settings,
            metrics,
            listen,
            sessions: HashMap::new(),
            parked: HashMap::new(),
            mailbox_rx: inbound.mailbox,
            replica_rx: inbound.replica,
            replica_deletes: spawn_delete_forwarder(Arc::clone(&replicas)),
            replicas,
            down: HashMap::new(),
            not_relays: HashMap::new(),
            verified: HashSet::new(),
            greeting: HashSet::new(),
            certified: HashMap::new(),
            cert,
            send_limiter,
            commands_tx,
            commands_rx,
            tasks: JoinSet::new(),
        }
    }

    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let mut park_tick = tokio::time::interval(PARK_TICK);
        let mut expire_tick = tokio::time::interval(EXPIRE_EVERY);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                event = self.swarm.select_next_some() => self.handle_swarm_event(event),
                Some(inbound) = self.mailbox_rx.recv() => {
                    self.handle_mailbox_request(inbound.peer, inbound.request, inbound.responder);
                }
                Some(inbound) = self.replica_rx.recv() => {
                    self.handle_replica_request(inbound.peer, inbound.request, inbound.responder);
                }
                Some(command) = self.commands_rx.recv() => self.handle_command(command),
                Some(done) = self.tasks.join_next() => match done {
                    Ok(done) => self.handle_done(done),
                    Err(e) => tracing::error!(error = %e, "relay task failed"),
                },
                _ = park_tick.tick() => self.expire_parked(),
                _ = expire_tick.tick() => {
                    let store = self.store.clone();
                    self.tasks.spawn(async move {
                        match store.expire(unix_now()).await {
                            Ok(n) if n > 0 => tracing::info!(dropped = n, "expired undelivered envelopes"),
                            Ok(_) => {}
                            Err(e) => tracing::error!(error = %e, "expiring envelopes failed"),
                        }
                        Done::Nothing
                    });
                }
            }
        }
        self.tasks.shutdown().await;
    }

    // ---- relays and placement ----

    /// Every relay we know (ourselves included) with addresses, skipping those down recently.
    fn live_relays(&mut self) -> Vec<RelayInfo> {
        let now = Instant::now();
        self.down.retain(|_, until| *until > now);
        self.not_relays.retain(|_, until| *until > now);
        let mut relays = vec![RelayInfo { peer_id: *self.swarm.local_peer_id(), addrs: self.listen.clone() }];
        for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
            for entry in bucket.iter() {
                let peer_id = *entry.node.key.preimage();
                if self.verified.contains(&peer_id)
                    && !self.down.contains_key(&peer_id)
                    && !self.not_relays.contains_key(&peer_id)
                {
                    relays.push(RelayInfo { peer_id, addrs: entry.node.value.iter().cloned().collect() });
                }
            }
        }
        relays
    }

    /// Every live relay, closest to `device`'s mailbox first.
    fn mailbox_relays(&mut self, device: &PeerId) -> Vec<RelayInfo> {
        let relays = self.live_relays();
        let order = closest_relays(&mailbox_key(device), relays.iter().map(|r| r.peer_id), relays.len());
        let mut by_id: HashMap<PeerId, RelayInfo> = relays.into_iter().map(|r| (r.peer_id, r)).collect();
        order.into_iter().filter_map(|id| by_id.remove(&id)).collect()
    }

    // ---- swarm events ----

    fn handle_swarm_event(&mut self, event: SwarmEvent<RelayBehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(RelayBehaviourEvent::Identify(libp2p::identify::Event::Received {
                peer_id,
                info,
                ..
            // Relays speak the replica protocol; clients do not. Only relays join the table.
            })) if info.protocols.iter().any(|p| p.as_ref() == REPLICA_PROTOCOL) => {
                for addr in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
                self.down.remove(&peer_id);
                self.greet(peer_id);
            }
            SwarmEvent::Behaviour(RelayBehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer,
                is_new_peer: true,
                ..
            })) => {
                tracing::info!(%peer, "relay joined the routing table");
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                self.sessions.remove(&peer_id);
                self.parked.remove(&peer_id);
                self.certified.remove(&peer_id);
            }
            SwarmEvent::ConnectionEstablished { .. } => {
                self.metrics.connections.inc();
            }
            _ => {}
        }
    }

    fn respond(&mut self, channel: Responder<MailboxResponse>, response: MailboxResponse) {
        if let MailboxResponse::Error(e) = &response {
            self.metrics.count_error(&e.code.to_string());
        }
        channel.respond(response);
    }

    fn handle_mailbox_request(
        &mut self,
        peer: PeerId,
        request: Result<MailboxRequest, FrameError>,
        channel: Responder<MailboxResponse>,
    ) {
        let request = match request {
            Ok(request) => request,
            Err(e) => return self.respond(channel, refuse(ErrorCode::BadRequest, e.to_string())),
        };
        self.metrics.count_request(request.kind());
        let now = unix_now();
        if let MailboxRequest::Hello { cert } = request {
            let response = match cert.verify_for(&self.settings.gateway_key, &peer, now) {
                Ok(body) => {
                    let session = Session { cert: body.clone(), arrivals: 0, acks_in_flight: HashSet::new() };
                    self.sessions.insert(peer, session);
                    let mut mailbox_relays = self.mailbox_relays(&peer);
                    mailbox_relays.truncate(self.settings.replication);
                    MailboxResponse::Welcome {
                        relay: *self.swarm.local_peer_id(),
                        mailbox_relays,
                        relays: self.live_relays(),
                    }
                }
                Err(e) => refuse(ErrorCode::CertInvalid, e.to_string()),
            };
            return self.respond(channel, response);
        }
        let cert = match self.sessions.get(&peer) {
            None => {
                return self
                    .respond(channel, refuse(ErrorCode::CertInvalid, "say Hello with your session certificate first"));
            }
            Some(session) if now > session.cert.not_after + CERT_CLOCK_SKEW_SECS => {
                self.sessions.remove(&peer);
                return self.respond(
                    channel,
                    refuse(ErrorCode::CertInvalid, "your certificate expired; renew it and say Hello again"),
                );
            }
            Some(session) => session.cert.clone(),
        };
        match request {
            MailboxRequest::Hello { .. } => unreachable!("handled above"),
            MailboxRequest::Send { envelopes } => self.handle_send(peer, &cert, envelopes, channel, now),
            MailboxRequest::Fetch { max, wait_ms, ack } => {
                if ack.len() > MAX_ENVELOPES_PER_BATCH {
                    return self.respond(channel, too_many_acks());
                }
                let max = max.clamp(1, MAX_ENVELOPES_PER_BATCH as u32);
                let deadline = Instant::now() + Duration::from_millis(u64::from(wait_ms.min(MAX_FETCH_WAIT_MS)));
                if !ack.is_empty() {
                    if let Some(session) = self.sessions.get_mut(&peer) {
                        session.acks_in_flight.extend(ack.iter().copied());
                    }
                    let deleted = self.delete_delivered(peer, ack.clone());
                    self.tasks.spawn(async move {
                        if let Err(e) = deleted.await {
                            tracing::error!(%peer, error = %e, "deleting acknowledged envelopes failed");
                        }
                        Done::AcksApplied { peer, ids: ack }
                    });
                }
                self.spawn_fetch(peer, channel, max, deadline);
            }
            MailboxRequest::Ack { ids } => {
                if ids.len() > MAX_ENVELOPES_PER_BATCH {
                    return self.respond(channel, too_many_acks());
                }
                let deleted = self.delete_delivered(peer, ids);
                self.tasks.spawn(async move {
                    let response = match deleted.await {
                        Ok(count) => MailboxResponse::Acked { count },
                        Err(e) => internal(e),
                    };
                    Done::mailbox(channel, response)
                });
            }
        }
    }

    /// Deletes envelopes the owner of `mailbox` has received: here (the returned future, done
    /// once the delete is committed) and on the other replicas (best effort, gathered with
    /// other deletes and not waited for: a replica that misses it still holds a copy, which the
    /// recipient drops by id when it sees it again, and acknowledges there).
    fn delete_delivered(
        &mut self,
        mailbox: PeerId,
        ids: Vec<EnvelopeId>,
    ) -> impl Future<Output = Result<u32, StoreError>> + Send + 'static {
        let local = *self.swarm.local_peer_id();
        let others: Vec<PeerId> = if ids.is_empty() {
            Vec::new()
        } else {
            let mut relays = self.mailbox_relays(&mailbox);
            relays.truncate(self.settings.replication + 1);
            relays.into_iter().map(|r| r.peer_id).filter(|id| *id != local).collect()
        };
        for relay in others {
            let delete = ReplicaDelete { relay, mailbox, ids: ids.clone() };
            if self.replica_deletes.try_send(delete).is_err() {
                tracing::debug!(%relay, "too many replica deletes queued; this one is dropped");
            }
        }
        let store = self.store.clone();
        async move { if ids.is_empty() { Ok(0) } else { store.delete(mailbox, ids).await } }
    }

    /// Checks a `Send` and starts its replication.
    fn handle_send(
        &mut self,
        peer: PeerId,
        cert: &CertBody,
        envelopes: Vec<Envelope>,
        channel: Responder<MailboxResponse>,
        now: u64,
    ) {
        if let Err(refusal) = check_envelopes(&peer, cert, &envelopes) {
            return self.respond(channel, MailboxResponse::Error(refusal));
        }
        if let Err(wait) = self.send_limiter.check_n(&cert.user_id.to_string(), envelopes.len() as u32, now) {
            return self.respond(channel, MailboxResponse::Error(WireError::flood_wait(wait, "messages")));
        }
        let mut groups: HashMap<PeerId, Vec<Envelope>> = HashMap::new();
        for envelope in envelopes {
            groups.entry(envelope.to_device).or_default().push(envelope);
        }
        let local = *self.swarm.local_peer_id();
        let groups: Vec<Group> = groups
            .into_iter()
            .map(|(device, batch)| {
                let targets: Vec<PeerId> = self.mailbox_relays(&device).into_iter().map(|r| r.peer_id).collect();
                let local_put = if targets.iter().take(self.settings.replication).any(|t| *t == local) {
                    self.put_and_push(&batch, now)
                } else {
                    None
                };
                Group { batch, targets, local_put }
            })
            .collect();
        let replicas = Replicas {
            local,
            store: self.store.clone(),
            pipes: self.replicas.clone(),
            commands: self.commands_tx.clone(),
            replication: self.settings.replication,
        };
        self.metrics.envelopes_received.inc_by(groups.iter().map(|g| g.batch.len() as u64).sum());
        self.tasks.spawn(async move {
            let (response, arrived) = store_replicated(&replicas, groups, now).await;
            Done::Mailbox { channel, response, arrived }
        });
    }

    fn handle_replica_request(
        &mut self,
        peer: PeerId,
        request: Result<ReplicaRequest, FrameError>,
        channel: Responder<ReplicaResponse>,
    ) {
        let refuse = |code, message: String| ReplicaResponse::Error(WireError::new(code, message));
        let now = unix_now();
        match request {
            Err(e) => channel.respond(refuse(ErrorCode::BadRequest, e.to_string())),
            Ok(ReplicaRequest::Hello { cert }) => {
                let response = match cert.verify_for(&self.settings.gateway_key, &peer, now) {
                    Ok(body) => {
                        self.certified.insert(peer, body.not_after.saturating_add(CERT_CLOCK_SKEW_SECS));
                        ReplicaResponse::Welcome { cert: self.cert.clone() }
                    }
                    Err(e) => refuse(ErrorCode::CertInvalid, format!("relay {e}")),
                };
                channel.respond(response);
            }
            Ok(_) if self.certified.get(&peer).is_none_or(|until| now > *until) => channel.respond(refuse(
                ErrorCode::CertInvalid,
                "say Hello with a gateway-signed relay certificate first".into(),
            )),
            Ok(ReplicaRequest::Store { envelopes }) => {
                if let Some(bad) = envelopes.iter().find(|e| e.encoded_len() > MAX_ENVELOPE_SIZE) {
                    return channel.respond(refuse(ErrorCode::BadRequest, format!("envelope {} is too large", bad.id)));
                }
                let (store, put) = (self.store.clone(), self.put_and_push(&envelopes, now));
                self.tasks.spawn(async move {
                    let mailboxes: HashSet<PeerId> = envelopes.iter().map(|e| e.to_device).collect();
                    let outcome = match put {
                        Some(queued) => queued.outcome().await,
                        None => store.put(envelopes, now).await,
                    };
                    match outcome {
                        Ok(outcome) if !outcome.over_quota.is_empty() => Done::replica(
                            channel,
                            refuse(ErrorCode::QuotaExceeded, "the recipient's mailbox is full".into()),
                        ),
                        Ok(outcome) => Done::Replica {
                            channel,
                            response: ReplicaResponse::Stored { duplicates: outcome.duplicates },
                            arrived: mailboxes.into_iter().collect(),
                        },
                        Err(e) => Done::replica(channel, refuse(ErrorCode::Internal, e.to_string())),
                    }
                });
            }
            Ok(ReplicaRequest::Delete { mailbox, ids }) => {
                let store = self.store.clone();
                self.tasks.spawn(async move {
                    let response = match store.delete(mailbox, ids).await {
                        Ok(count) => ReplicaResponse::Deleted { count },
                        Err(e) => refuse(ErrorCode::Internal, e.to_string()),
                    };
                    Done::replica(channel, response)
                });
            }
        }
    }

    fn handle_command(&mut self, command: Command) {
        match command {
            Command::Down(peer) => {
                tracing::warn!(%peer, "a relay did not answer a replica request; skipping it for a while");
                self.down.insert(peer, Instant::now() + DOWN_FOR);
            }
            Command::NotARelay(peer) => {
                tracing::warn!(%peer, "a peer showed no valid relay certificate; it gets no replicas");
                self.not_relays.insert(peer, Instant::now() + NOT_A_RELAY_FOR);
            }
        }
    }

    fn handle_done(&mut self, done: Done) {
        match done {
            Done::Mailbox { channel, response, arrived } => {
                self.wake(arrived);
                self.respond(channel, response);
            }
            Done::Replica { channel, response, arrived } => {
                self.wake(arrived);
                channel.respond(response);
            }
            Done::Park { peer, channel, max, deadline, arrivals } => {
                match self.sessions.get(&peer) {
                    // Something arrived while the fetch was reading: read again.
                    Some(session) if session.arrivals != arrivals => {
                        return self.spawn_fetch(peer, channel, max, deadline);
                    }
                    Some(_) => {}
                    // The client is gone; nobody to answer.
                    None => return,
                }
                // A newer fetch from the same device replaces an older one, which answers empty.
                if let Some(old) = self.parked.insert(peer, Parked { channel, max, deadline }) {
                    self.respond(old.channel, MailboxResponse::Envelopes { envelopes: Vec::new(), more: false });
                }
            }
            Done::AcksApplied { peer, ids } => {
                if let Some(session) = self.sessions.get_mut(&peer) {
                    for id in &ids {
                        session.acks_in_flight.remove(id);
                    }
                }
            }
            Done::Greeted { peer, outcome } => {
                self.greeting.remove(&peer);
                match outcome {
                    Ok(()) => {
                        self.verified.insert(peer);
                    }
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "greeting a relay failed");
                        if let Some(command) = e.command(peer) {
                            self.handle_command(command);
                        }
                    }
                }
            }
            Done::Nothing => {}
        }
    }

    /// Reads `peer`'s mailbox on a task; answers, or parks until `deadline` if it is empty.
    fn spawn_fetch(&mut self, peer: PeerId, channel: Responder<MailboxResponse>, max: u32, deadline: Instant) {
        // The client is gone: nobody to answer.
        let Some(session) = self.sessions.get(&peer) else { return };
        let (arrivals, skip) = (session.arrivals, session.acks_in_flight.clone());
        let store = self.store.clone();
        self.tasks.spawn(async move {
            let read = store.fetch(peer, max as usize + skip.len()).map(|(mut envelopes, more)| {
                envelopes.retain(|e| !skip.contains(&e.id));
                let more = more || envelopes.len() > max as usize;
                envelopes.truncate(max as usize);
                (envelopes, more)
            });
            match read {
                Ok((envelopes, more)) if !envelopes.is_empty() || Instant::now() >= deadline => {
                    Done::mailbox(channel, MailboxResponse::Envelopes { envelopes, more })
                }
                Ok(_) => Done::Park { peer, channel, max, deadline, arrivals },
                Err(e) => Done::mailbox(channel, internal(e)),
            }
        });
    }

    /// Answers the fetches parked on these mailboxes with what has just arrived.
    fn wake(&mut self, mailboxes: Vec<PeerId>) {
        for mailbox in mailboxes {
            if let Some(session) = self.sessions.get_mut(&mailbox) {
                session.arrivals += 1;
            }
            if let Some(parked) = self.parked.remove(&mailbox) {
                self.spawn_fetch(mailbox, parked.channel, parked.max, parked.deadline);
            }
        }
    }

    /// For envelopes this relay keeps a copy of: queues their put now, so that fetches see them
    /// at once (see `store::Queued`) and an acknowledgement of them can only be applied after
    /// it, and hands them over to a recipient of theirs who waits here, while they are being
    /// made durable (the sender still hears "stored" only after that). `None` (nothing queued,
    /// nothing pushed) when the store's queue is full: the put is then made by the task.
    fn put_and_push(&mut self, envelopes: &[Envelope], now: u64) -> Option<QueuedPut> {
        let queued = self.store.put_in_order(envelopes.to_vec(), now)?;
        self.push_to_parked(envelopes);
        Some(queued)
    }

    /// Answers the fetches parked on the mailboxes of these envelopes with them.
    fn push_to_parked(&mut self, envelopes: &[Envelope]) {
        let mut answers: HashMap<PeerId, (Parked, Vec<Envelope>)> = HashMap::new();
        for envelope in envelopes {
            let mailbox = envelope.to_device;
            let (parked, batch) = match answers.entry(mailbox) {
                std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::hash_map::Entry::Vacant(entry) => {
                    let Some(parked) = self.parked.remove(&mailbox) else { continue };
                    entry.insert((parked, Vec::new()))
                }
            };
            if batch.len() < parked.max as usize {
                batch.push(envelope.clone());
            }
        }
        for (_, (parked, envelopes)) in answers {
            // `more`: the rest (if any) is in the store once committed.
            let more = envelopes.len() == parked.max as usize;
            self.respond(parked.channel, MailboxResponse::Envelopes { envelopes, more });
        }
    }

    fn expire_parked(&mut self) {
        let now = Instant::now();
        let expired: Vec<PeerId> = self.parked.iter().filter(|(_, p)| p.deadline <= now).map(|(id, _)| *id).collect();
        for peer in expired {
            if let Some(parked) = self.parked.remove(&peer) {
                self.respond(parked.channel, MailboxResponse::Envelopes { envelopes: Vec::new(), more: false });
            }
        }
    }

    /// Checks the certificate of a relay that identified itself, unless that is done or under
    /// way (or it recently failed to show one).
    fn greet(&mut self, peer: PeerId) {
        let refused_lately = self.not_relays.get(&peer).is_some_and(|until| *until > Instant::now());
        if self.verified.contains(&peer) || refused_lately || !self.greeting.insert(peer) {
            return;
        }
        let replicas = Arc::clone(&self.replicas);
        self.tasks.spawn(async move { Done::Greeted { peer, outcome: replicas.greet(peer).await } });
    }

    /// Dials the bootstrap relays and starts a Kademlia bootstrap.
    pub(crate) fn bootstrap(&mut self, peers: &[(PeerId, Multiaddr)]) {
        for (peer, addr) in peers {
            self.swarm.behaviour_mut().kad.add_address(peer, addr.clone());
            if let Err(e) = self.swarm.dial(addr.clone()) {
                tracing::warn!(%addr, error = %e, "could not dial bootstrap relay");
            }
        }
        if !peers.is_empty()
            && let Err(e) = self.swarm.behaviour_mut().kad.bootstrap()
        {
            tracing::warn!(error = %e, "kademlia bootstrap could not start");
        }
    }
}

/// Each envelope must come from the connection's device and account, fit the size limit, and
/// the batch must fit the batch limit.
fn check_envelopes(peer: &PeerId, cert: &CertBody, envelopes: &[Envelope]) -> Result<(), WireError> {
    if envelopes.is_empty() || envelopes.len() > MAX_ENVELOPES_PER_BATCH {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            format!("send 1 to {MAX_ENVELOPES_PER_BATCH} envelopes at a time"),
        ));
    }
    for e in envelopes {
        if &e.from_device != peer || e.from_user != cert.user_id {
            return Err(WireError::new(
                ErrorCode::SenderMismatch,
                format!(
                    "envelope {} claims sender {}/{}, but this connection is {}/{}",
                    e.id, e.from_user, e.from_device, cert.user_id, peer
                ),
            ));
        }
        let len = e.encoded_len();
        if len > MAX_ENVELOPE_SIZE {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!("envelope {} is {len} bytes; the limit is {MAX_ENVELOPE_SIZE}", e.id),
            ));
        }
        if e.sealed.is_empty() {
            return Err(WireError::new(ErrorCode::BadRequest, format!("envelope {} has no content", e.id)));
        }
    }
    Ok(())
}

/// Starts serving each new pipe. A task of its own, never the busy event loop: libp2p-stream
/// hands over inbound streams through a one-slot channel and drops those that find it full.
fn too_many_acks() -> MailboxResponse {
    refuse(ErrorCode::BadRequest, format!("at most {MAX_ENVELOPES_PER_BATCH} ids per acknowledgement"))
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> MailboxResponse {
    MailboxResponse::Error(WireError::new(code, message))
}

fn internal(e: impl std::fmt::Display) -> MailboxResponse {
    tracing::error!(error = %e, "relay store failure");
    refuse(ErrorCode::Internal, "internal error; try again later")
}
