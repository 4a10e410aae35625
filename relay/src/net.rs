//! The relay's event loop: owns the `Swarm` and dispatches. Nothing here serves a request
//! itself.
//!
//! Request flow: clients' and relays' requests arrive on pipes (`meshgram_node::net::pipe`), one
//! long-lived stream per connection, whose tasks hand them to this loop. Mailbox requests go to
//! [`Mailboxes`] (sessions, sends, parked fetches), media requests to [`MediaServer`] (uploads,
//! chunks), replica requests to [`ReplicaServer`]; each runs its work on tasks it owns and hands
//! the results back through this loop. Reports on
//! other relays ([`crate::relays::RelayReport`]) come back from replication tasks and from
//! greetings, and go to [`Relays`], which owns every relay's standing. Repair rounds
//! ([`crate::repair`]) run on a task, one at a time, on a timer and soon after the live relays
//! change. Revocations polled from the gateway ([`RevocationPoller`]) go to [`Mailboxes`]
//! (sessions) and [`Relays`] (relays).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::kad;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionError, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm};
use meshgram_node::crypto::cert::{RelayCert, Revoked};
use meshgram_node::net::pipe::{self, Inbound, PipePool, Serving};
use meshgram_node::proto::media::{MEDIA_LIMITS, MEDIA_PROTOCOL, MediaRequest, MediaResponse};
use meshgram_node::proto::{
    MAILBOX_LIMITS, MAILBOX_PROTOCOL, MailboxRequest, MailboxResponse, REPLICA_LIMITS, REPLICA_PROTOCOL,
    ReplicaRequest, ReplicaResponse,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::RelaySettings;
use crate::accept::{Acceptor, ConnectionLimits, Serve};
use crate::behaviour::{RelayBehaviour, RelayBehaviourEvent};
use crate::boxed::Boxed;
use crate::devices::{Released, Waiting, busy_asking_gateway};
use crate::mailbox::Mailboxes;
use crate::media::{MediaServer, MediaStore};
use crate::metrics::{CertKind, Metrics, gauge_value};
use crate::push::Pusher;
use crate::relays::{RelayReport, Relays, Reports, reports};
use crate::repair::{AFTER_MEMBERSHIP_CHANGE, REPAIR_EVERY, RoundReport, repair_round};
use crate::replica::{self, ReplicaServer};
use crate::replicate::{ReplicaCallError, ReplicaClient, ReplicaPipes, Replicas};
use crate::revocations::{self, GatewayEvent, Polled, RevocationPoller};
use crate::store::StoreHandle;

/// How often parked fetches are checked for their deadline.
const PARK_TICK: Duration = Duration::from_millis(250);
/// How often the connection and routing-table gauges are brought up to date.
const GAUGES_EVERY: Duration = Duration::from_secs(2);
/// How often expired envelopes are dropped.
const EXPIRE_EVERY: Duration = Duration::from_secs(600);
/// Requests queued from pipes to the loop; a full queue pushes back on every pipe.
const INBOUND_QUEUE: usize = 4096;
/// Replica requests wait for a commit on a possibly loaded relay; a minute leaves room. A
/// `Store`, which a sender waits on, has a much shorter deadline of its own (`replicate`).
const REPLICA_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

type MailboxInbound = Inbound<MailboxRequest, MailboxResponse>;
type ReplicaInbound = Inbound<ReplicaRequest, ReplicaResponse>;
type MediaInbound = Inbound<MediaRequest, MediaResponse>;

/// This relay greeted `peer` on the replica protocol: did it show a relay certificate?
type Greeted = (PeerId, Result<(), ReplicaCallError>);

pub(crate) struct EventLoop {
    swarm: Swarm<Boxed<RelayBehaviour>>,
    metrics: Arc<Metrics>,
    /// Requests read from clients' and other relays' pipes.
    inbound: InboundPipes,
    /// Every other relay's standing, and the reports on them from tasks.
    relays: Relays,
    reports: Reports,
    /// Clients' mailboxes here.
    mailboxes: Mailboxes,
    /// Clients' uploads and chunk downloads here.
    media: MediaServer,
    /// What this relay keeps of media (repair reads it).
    media_store: MediaStore,
    /// How long an upload may take before it is expired.
    media_upload_grace: Duration,
    /// Other relays' replicas here.
    replica_server: ReplicaServer,
    /// This relay's calls to other relays (here: greetings).
    replica_client: ReplicaPipes,
    greetings: JoinSet<Greeted>,
    /// Where repair copies to, and its round under way (at most one).
    replicas: Replicas,
    repairs: JoinSet<RoundReport>,
    /// When the next repair round starts (sooner after a membership change).
    next_repair: tokio::time::Instant,
    /// Relays dialled back after their connection failed, and when (see `ConnectionClosed`).
    redialled: HashMap<PeerId, Instant>,
    /// Asks the gateway for revocations (with `--gateway`).
    revocations: Option<RevocationPoller>,
}

/// Where requests read from inbound pipes go: the acceptor's side (for the swarm's behaviour)
/// and the loop's side. Each answer's latency goes to `metrics`; each protocol's pipes hold at
/// most `limits.pipe_memory` bytes together.
pub(crate) fn inbound_pipes(metrics: &Arc<Metrics>, limits: ConnectionLimits) -> (Acceptor, InboundPipes) {
    let (mailbox_tx, mailbox) = mpsc::channel(INBOUND_QUEUE);
    let (replica_tx, replica) = mpsc::channel(INBOUND_QUEUE);
    let (media_tx, media) = mpsc::channel(INBOUND_QUEUE);
    let serving = |protocol: &'static str, pipe_limits| {
        let observed = Arc::clone(metrics);
        let observe: pipe::ObserveLatency = Arc::new(move |kind, took| observed.observe_request(protocol, kind, took));
        let serving = Serving::new(pipe_limits).with_memory(limits.pipe_memory).observed(observe);
        metrics.watch_pipe_memory(protocol, Arc::clone(&serving.memory));
        serving
    };
    let mailbox_serving = serving("mailbox", MAILBOX_LIMITS);
    let replica_serving = serving("replica", REPLICA_LIMITS);
    let media_serving = serving("media", MEDIA_LIMITS);
    let routes: Vec<(StreamProtocol, Serve)> = vec![
        (
            StreamProtocol::new(MAILBOX_PROTOCOL),
            Box::new(move |peer, stream, welcome| {
                pipe::serve(peer, stream, &mailbox_serving, welcome, mailbox_tx.clone())
            }),
        ),
        (
            StreamProtocol::new(REPLICA_PROTOCOL),
            Box::new(move |peer, stream, welcome| {
                pipe::serve(peer, stream, &replica_serving, welcome, replica_tx.clone())
            }),
        ),
        (
            StreamProtocol::new(MEDIA_PROTOCOL),
            Box::new(move |peer, stream, welcome| pipe::serve(peer, stream, &media_serving, welcome, media_tx.clone())),
        ),
    ];
    (Acceptor::new(routes, limits), InboundPipes { mailbox, replica, media })
}

/// What the relay keeps on disk.
pub(crate) struct Stores {
    pub(crate) mailboxes: StoreHandle,
    pub(crate) media: MediaStore,
    /// Push registrations, and the wake-up sender.
    pub(crate) pusher: Pusher,
}

/// The loop's side of [`inbound_pipes`].
pub(crate) struct InboundPipes {
    mailbox: mpsc::Receiver<MailboxInbound>,
    replica: mpsc::Receiver<ReplicaInbound>,
    media: mpsc::Receiver<MediaInbound>,
}

impl EventLoop {
    pub(crate) fn new(
        swarm: Swarm<Boxed<RelayBehaviour>>,
        inbound: InboundPipes,
        Stores { mailboxes: store, media: media_store, pusher }: Stores,
        settings: RelaySettings,
        cert: RelayCert,
        metrics: Arc<Metrics>,
        listen: Vec<Multiaddr>,
    ) -> Self {
        let local = *swarm.local_peer_id();
        let (reporter, reports) = reports();
        let streams = swarm.behaviour().stream.new_control();
        let pipes = PipePool::new(REPLICA_PROTOCOL, REPLICA_LIMITS, REPLICA_REQUEST_TIMEOUT, streams);
        let replica_client = Arc::new(ReplicaClient::new(pipes, cert.clone(), settings.gateway_key.clone()));
        let replicas = Replicas {
            metrics: Arc::clone(&metrics),
            local,
            store: store.clone(),
            pipes: Arc::clone(&replica_client),
            reporter,
            replication: settings.replication,
            allow_fewer_replicas: settings.allow_fewer_replicas,
        };
        EventLoop {
            swarm,
            inbound,
            relays: Relays::new(local, listen, settings.placement_lookups),
            reports,
            replica_server: ReplicaServer::new(settings.gateway_key.clone(), cert, store, media_store.clone()),
            media: MediaServer::new(settings.gateway_key.clone(), media_store.clone(), replicas.clone()),
            media_upload_grace: settings.media_upload_grace,
            media_store,
            mailboxes: Mailboxes::new(settings, Arc::clone(&metrics), replicas.clone(), pusher),
            metrics,
            replica_client,
            greetings: JoinSet::new(),
            replicas,
            repairs: JoinSet::new(),
            next_repair: tokio::time::Instant::now() + REPAIR_EVERY,
            redialled: HashMap::new(),
            revocations: None,
        }
    }

    /// Applies the gateway's revocations from now on, asking it every few seconds.
    /// And asks it which devices exist before keeping envelopes for a mailbox not known yet.
    pub(crate) fn ask_gateway(&mut self, poller: RevocationPoller) {
        self.mailboxes.devices.ask(poller.gateway().clone(), poller.cert().clone());
        self.revocations = Some(poller);
    }

    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let mut park_tick = tokio::time::interval(PARK_TICK);
        let mut expire_tick = tokio::time::interval(EXPIRE_EVERY);
        let mut revocation_tick = tokio::time::interval(revocations::POLL_EVERY);
        // Often enough that an upload is expired soon after its grace, never more than a
        // scan of the upload index per second.
        let grace = self.media_upload_grace;
        let mut media_expire_tick = tokio::time::interval((grace / 2).clamp(Duration::from_secs(1), EXPIRE_EVERY));
        let mut gauges_tick = tokio::time::interval(GAUGES_EVERY);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                event = self.swarm.select_next_some() => self.handle_swarm_event(event),
                Some(inbound) = self.inbound.mailbox.recv() => {
                    let known = &mut self.relays.known(&mut self.swarm.behaviour_mut().kad);
                    self.mailboxes.handle(inbound.peer, inbound.request, inbound.responder, known);
                }
                Some(inbound) = self.inbound.media.recv() => {
                    let known = &mut self.relays.known(&mut self.swarm.behaviour_mut().kad);
                    self.media.handle(inbound.peer, inbound.request, inbound.responder, known);
                }
                Some(inbound) = self.inbound.replica.recv() => {
                    let (relays, mailboxes) = (&mut self.relays, &mut self.mailboxes);
                    self.replica_server.handle(inbound.peer, inbound.request, inbound.responder, relays, mailboxes);
                }
                Some((peer, report)) = self.reports.recv() => {
                    self.relays.report(peer, report);
                    // Its mailboxes now go to the next closest relays.
                    if report == RelayReport::Down {
                        self.repair_soon();
                    }
                }
                Some(done) = self.mailboxes.next_done() => match done {
                    Ok(done) => self.mailboxes.finish(done, &mut self.relays.known(&mut self.swarm.behaviour_mut().kad)),
                    Err(e) => tracing::error!(error = %e, "relay task failed"),
                },
                Some(done) = self.media.next_done() => match done {
                    Ok(done) => self.media.finish(done),
                    Err(e) => tracing::error!(error = %e, "relay media task failed"),
                },
                Some(done) = self.replica_server.next_done() => match done {
                    Ok(replica::Done { channel, response, arrived }) => {
                        self.mailboxes.wake(arrived, &mut self.relays.known(&mut self.swarm.behaviour_mut().kad));
                        channel.respond(response);
                    }
                    Err(e) => tracing::error!(error = %e, "relay task failed"),
                },
                Some(greeted) = self.greetings.join_next() => match greeted {
                    Ok((peer, outcome)) => self.greeted(peer, outcome),
                    Err(e) => tracing::error!(error = %e, "relay task failed"),
                },
                () = tokio::time::sleep_until(self.next_repair), if self.repairs.is_empty() => self.start_repair(),
                Some(round) = self.repairs.join_next() => match round {
                    Ok(report) => {
                        let mut known = self.relays.known(&mut self.swarm.behaviour_mut().kad);
                        for mailbox in &report.held {
                            known.look_up_if_needed(mailbox);
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "relay repair task failed"),
                },
                _ = park_tick.tick() => {
                    self.mailboxes.expire_parked();
                    let released = self.mailboxes.devices.tick();
                    self.resume(released);
                }
                _ = gauges_tick.tick() => self.set_gauges(),
                _ = expire_tick.tick() => {
                    self.mailboxes.expire_envelopes();
                    self.media.forget_expired_revocations();
                }
                _ = revocation_tick.tick(), if self.revocations.is_some() => self.poll_gateway(),
                _ = media_expire_tick.tick() => {
                    let known = &mut self.relays.known(&mut self.swarm.behaviour_mut().kad);
                    self.media.expire_uploads(grace, known);
                }
            }
            self.leave_routing();
            if let Some(client) = self.swarm.behaviour_mut().gateway.as_mut() {
                self.mailboxes.devices.send_question(client);
            }
        }
        self.mailboxes.shutdown().await;
        self.media.shutdown().await;
        self.replica_server.shutdown().await;
        self.greetings.shutdown().await;
        self.repairs.shutdown().await;
    }

    fn handle_swarm_event(&mut self, event: SwarmEvent<RelayBehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(RelayBehaviourEvent::Identify(libp2p::identify::Event::Received {
                peer_id,
                info,
                ..
            // Relays speak the replica protocol; clients do not. A peer that says it is one is
            // greeted, and joins the routing table once its certificate checks out (`greeted`).
            })) if info.protocols.iter().any(|p| p.as_ref() == REPLICA_PROTOCOL) => {
                let back = self.relays.is_down(&peer_id);
                if self.relays.identified(peer_id, info.listen_addrs) {
                    self.greet(peer_id);
                } else if self.relays.is_verified(&peer_id) {
                    // It may listen elsewhere now (restarted on other ports).
                    self.route(peer_id);
                }
                if back {
                    self.repair_soon();
                }
            }
            // A placement lookup ended: dial the relays it found that are not known yet; they
            // identify themselves, are greeted, and join placement.
            SwarmEvent::Behaviour(RelayBehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetClosestPeers(result),
                ..
            })) => {
                let found = match result {
                    Ok(kad::GetClosestPeersOk { peers, .. }) => peers,
                    Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                };
                let Some(unknown) = self.relays.looked_up(id, found) else { return };
                self.metrics.placement_lookups.inc();
                for relay in unknown {
                    let dial = DialOpts::peer_id(relay.peer_id).addresses(relay.addrs).build();
                    if let Err(e) = self.swarm.dial(dial) {
                        tracing::debug!(peer = %relay.peer_id, error = %e, "could not dial a relay a lookup found");
                    }
                }
            }
            SwarmEvent::Behaviour(RelayBehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer,
                is_new_peer: true,
                ..
            })) => {
                tracing::info!(%peer, "relay joined the routing table");
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, cause, .. } => {
                self.mailboxes.disconnected(&peer_id);
                self.media.disconnected(&peer_id);
                self.relays.disconnected(&peer_id);
                // A relay's connection failing usually means it died or restarts: dial it
                // back, and if that fails, take it out of placement now (below) rather than
                // when the next copy to it times out. Not after an orderly close (idle), and
                // once per round at most, so a relay that keeps dropping connections costs
                // little.
                let now = Instant::now();
                let redialled_lately =
                    self.redialled.get(&peer_id).is_some_and(|at| now.duration_since(*at) < REPAIR_EVERY);
                let failed = matches!(cause, Some(ConnectionError::IO(_)));
                if failed && self.relays.is_verified(&peer_id) && !redialled_lately {
                    self.redialled.insert(peer_id, now);
                    if let Err(e) = self.swarm.dial(peer_id) {
                        tracing::debug!(peer = %peer_id, error = %e, "could not redial a relay");
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id: Some(peer_id), error, .. }
                if self.relays.is_verified(&peer_id)
                    && !self.swarm.is_connected(&peer_id)
                    && !self.relays.is_down(&peer_id) =>
            {
                tracing::debug!(peer = %peer_id, %error, "dialling a relay failed");
                self.relays.report(peer_id, RelayReport::Down);
                self.repair_soon();
            }
            SwarmEvent::ConnectionEstablished { .. } => {
                self.metrics.connections.inc();
            }
            SwarmEvent::Behaviour(RelayBehaviourEvent::Gateway(event)) => self.gateway_answered(event),
            _ => {}
        }
    }

    fn poll_gateway(&mut self) {
        if let (Some(poller), Some(client)) = (&mut self.revocations, self.swarm.behaviour_mut().gateway.as_mut()) {
            poller.poll(client);
        }
    }

    /// Applies what a poll of the gateway brought: revoked sessions lose their access here,
    /// revoked relays their place in placement (so repair runs soon) and their replica access.
    fn gateway_answered(&mut self, event: GatewayEvent) {
        if let Some(released) = self.mailboxes.devices.answered(&event) {
            return self.resume(released);
        }
        let Some(poller) = &mut self.revocations else { return };
        let Polled { revocations, again, refused } = poller.on_event(event);
        if let Some(why) = refused {
            self.media.no_longer_admitted(why.clone());
            self.mailboxes.no_longer_admitted(why);
        }
        for revocation in revocations {
            match revocation.revoked {
                Revoked::Session(session) => {
                    self.media.revoke_session(revocation.peer, session, revocation.until);
                    self.mailboxes.revoke_session(revocation.peer, session, revocation.until);
                }
                // Its mailboxes have other responsible relays now: repair copies them there.
                Revoked::Relay => {
                    if self.relays.revoke(revocation.peer) {
                        self.repair_soon();
                    }
                }
            }
        }
        self.count_verified();
        self.metrics.relays_revoked.set(gauge_value(self.relays.revoked_count()));
        if again {
            self.poll_gateway();
        }
    }

    /// Serves again the requests that waited for the gateway's word on their mailboxes, and
    /// tells those that waited too long to retry.
    fn resume(&mut self, Released { ready, too_late }: Released) {
        for waiting in too_late {
            waiting.refuse(busy_asking_gateway());
        }
        for waiting in ready {
            match waiting {
                Waiting::Send { peer, envelopes, channel } => {
                    let known = &mut self.relays.known(&mut self.swarm.behaviour_mut().kad);
                    self.mailboxes.resume_send(peer, envelopes, channel, known);
                }
                Waiting::Store { peer, envelopes, until, channel } => {
                    let (relays, mailboxes) = (&self.relays, &mut self.mailboxes);
                    self.replica_server.resume_store(peer, envelopes, until, channel, relays, mailboxes);
                }
            }
        }
    }

    /// Checks the certificate of a relay that identified itself, on a task.
    fn greet(&mut self, peer: PeerId) {
        let client = Arc::clone(&self.replica_client);
        self.greetings.spawn(async move { (peer, client.greet(peer).await) });
    }

    fn greeted(&mut self, peer: PeerId, outcome: Result<(), ReplicaCallError>) {
        // Its certificate was checked if it answered with one (or with something else).
        match &outcome {
            Ok(()) => self.metrics.count_cert_check(CertKind::Relay, true),
            Err(ReplicaCallError::NotARelay { .. }) => self.metrics.count_cert_check(CertKind::Relay, false),
            Err(_) => {}
        }
        let outcome = outcome.map_err(|e| {
            tracing::warn!(%peer, error = %e, "greeting a relay failed");
            e.report()
        });
        if outcome.is_ok() {
            self.repair_soon();
        }
        if self.relays.greeted(peer, outcome) {
            self.route(peer);
        }
        self.count_verified();
    }

    /// Puts a verified relay in the routing table, with the addresses its identify gave.
    fn route(&mut self, relay: PeerId) {
        let kad = &mut self.swarm.behaviour_mut().kad;
        for addr in self.relays.addrs(&relay) {
            kad.add_address(&relay, addr.clone());
        }
    }

    /// Takes the relays that lost their standing out of the routing table.
    fn leave_routing(&mut self) {
        for relay in self.relays.take_unrouted() {
            self.swarm.behaviour_mut().kad.remove_peer(&relay);
        }
    }

    /// Sets the gauges of connected peers (certified relays, and the rest: clients) and of the
    /// routing table.
    fn set_gauges(&mut self) {
        let connected = self.swarm.connected_peers().count();
        let relays = self.swarm.connected_peers().filter(|peer| self.relays.is_verified(peer)).count();
        self.metrics.connected_relays.set(gauge_value(relays));
        self.metrics.connected_clients.set(gauge_value(connected - relays));
        let routing: usize = self.swarm.behaviour_mut().kad.kbuckets().map(|bucket| bucket.num_entries()).sum();
        self.metrics.routing_table_peers.set(gauge_value(routing));
    }

    /// Sets the gauge of relays whose certificate this relay checked.
    fn count_verified(&self) {
        self.metrics.relays_verified.set(gauge_value(self.relays.verified_count()));
    }

    /// Starts a repair round against the relays live now.
    fn start_repair(&mut self) {
        self.next_repair = tokio::time::Instant::now() + REPAIR_EVERY;
        self.redialled.retain(|_, at| at.elapsed() < REPAIR_EVERY);
        // A down relay that answers identifies itself, is live again, and repair follows.
        for relay in self.relays.down_verified() {
            if !self.swarm.is_connected(&relay) {
                let _ = self.swarm.dial(relay);
            }
        }
        let live = self.relays.known(&mut self.swarm.behaviour_mut().kad).live_relays();
        let live = live.into_iter().map(|relay| relay.peer_id).collect();
        // Placing forgets relays down for long: the gauge follows.
        self.count_verified();
        let media = self.media_store.clone();
        self.repairs.spawn(repair_round(self.replicas.clone(), media, live, Arc::clone(&self.metrics)));
    }

    /// The live relays changed: repair soon (after the round under way, if one is).
    fn repair_soon(&mut self) {
        self.relays.membership_changed();
        self.next_repair = self.next_repair.min(tokio::time::Instant::now() + AFTER_MEMBERSHIP_CHANGE);
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
