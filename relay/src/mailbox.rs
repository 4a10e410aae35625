//! Serving clients' mailbox requests: `Hello` (one session-certificate check per connection,
//! not per envelope), `Send` (sender = connection, sizes, rate; then replicated by
//! [`crate::replicate`]), `Fetch` (long-polls parked until something arrives or their deadline)
//! and `Ack`.
//!
//! [`Mailboxes`] keeps the sessions and parked fetches and runs the store and replication work
//! on tasks of its own; the event loop hands it each request and each finished task, and the
//! session revocations the gateway publishes ([`Mailboxes::revoke_session`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use meshgram_node::crypto::cert::{CertBody, unix_now};
use meshgram_node::ids::SessionId;
use meshgram_node::net::codec::FrameError;
use meshgram_node::net::pipe::Responder;
use meshgram_node::proto::envelope::{Envelope, EnvelopeId};
use meshgram_node::proto::group::{
    GroupBatch, GroupCursor, GroupId, GroupSeal, GroupWireError, MAX_GROUPS_PER_FETCH, is_group_mailbox,
};
use meshgram_node::proto::mailbox::PushEndpoint;
use meshgram_node::proto::{
    ErrorCode, MAX_ENVELOPE_SIZE, MAX_ENVELOPES_PER_BATCH, MAX_FETCH_WAIT_MS, MAX_MAILBOX_MESSAGE_SIZE, MailboxRequest,
    MailboxResponse, ReplicaRequest, ReplicaResponse, SignedAck, WireError,
};
use meshgram_node::server::limits::RateLimiter;
use tokio::task::{JoinError, JoinSet};

use crate::RelaySettings;
use crate::devices::{Devices, Sorted, Waiting};
use crate::metrics::{CertKind, Metrics, gauge_value};
use crate::mirror::{self, Answered, Kept, Mirrors, PlannedRead, ReadId, Want};
use crate::push::{Pusher, SetError};
use crate::relays::KnownRelays;
use crate::replicate::{
    DeleteForwarder, Group, REPLICA_STORE_DEADLINE, ReplicaDelete, Replicas, store_replicated, unexpected,
};
use crate::sessions::Sessions;
use crate::store::{QueuedPut, StoreError, StoreHandle};

/// What a finished mailbox task hands back, through [`Mailboxes::finish`].
#[derive(Debug)]
pub(crate) enum Done {
    /// Answer a client; first wake the fetches parked on `arrived` (envelopes committed here).
    Answer { channel: Responder<MailboxResponse>, response: MailboxResponse, arrived: Vec<PeerId> },
    /// A fetch found nothing: park it until something arrives or its deadline, unless
    /// something arrived since it looked (`arrivals` then differs from the session's count).
    Park { peer: PeerId, channel: Responder<MailboxResponse>, max: u32, deadline: Instant, arrivals: u64 },
    /// These acknowledged envelopes are deleted here (or failed to be, and will come again);
    /// `then` is the fetch that waited for it, if it did (else the delete ran detached).
    AcksApplied { peer: PeerId, ids: Vec<EnvelopeId>, then: Option<FetchAfterAcks> },
    /// A group fetch found nothing new: park it, unless a group message arrived since it
    /// looked (`arrivals` then differs from [`Mailboxes::group_arrivals`]).
    ParkGroups { peer: PeerId, fetch: GroupRead, arrivals: u64 },
    /// Answer a group read (a member's or a mirroring relay's).
    Groups { channel: GroupReader, answer: Result<Vec<GroupBatch>, WireError> },
    /// A mirror's read of an origin relay finished: what it answered (envelopes kept here) and
    /// the group mailboxes that got something, or why it failed.
    Mirrored { read: ReadId, cursors: Vec<GroupCursor>, outcome: Result<(Answered, Kept), String> },
    /// Background work that answers nobody.
    Nothing,
    /// What one task did for several readers (a group message pushed to all its readers).
    Many(Vec<Done>),
}

impl Done {
    fn answer(channel: Responder<MailboxResponse>, response: MailboxResponse) -> Self {
        Done::Answer { channel, response, arrived: Vec::new() }
    }
}

#[derive(Debug)]
struct Parked {
    channel: Responder<MailboxResponse>,
    max: u32,
    deadline: Instant,
}

/// A `GroupFetch` being served (or parked until something arrives in one of its groups).
#[derive(Debug)]
pub(crate) struct GroupRead {
    channel: GroupReader,
    cursors: Vec<GroupCursor>,
    max: u32,
    /// When it asked to be answered by, at the latest.
    deadline: Instant,
    /// Its place in the order reads arrived here: of two reads from the same reader, the later
    /// one is kept parked, however their store reads finished.
    order: u64,
    /// When it is answered empty: its deadline, or later while a group it reads is being
    /// caught up by this relay's mirror (see [`crate::mirror`]).
    hold_until: Instant,
}

/// Who a group read answers: a member's device, or a relay mirroring the groups.
#[derive(Debug)]
pub(crate) enum GroupReader {
    Device(Responder<MailboxResponse>),
    Mirror(Responder<ReplicaResponse>),
}

/// What the mailbox protocol keeps per session.
#[derive(Debug, Default)]
struct FetchState {
    /// Counts commits into this client's mailbox here, so a fetch that read an empty mailbox
    /// just before an arrival is not parked past it.
    arrivals: u64,
    /// Acknowledged by a `Fetch` but maybe not yet deleted: fetches skip them rather than wait
    /// for the delete, which may queue behind other commits.
    acks_in_flight: HashSet<EnvelopeId>,
    /// Deletes of acknowledgements running without a fetch waiting for them.
    detached_deletes: usize,
}

/// Deletes of acknowledgements one client may have running detached (see `handle_fetch`).
const MAX_DETACHED_DELETES: usize = 4;

/// Acknowledged ids as a request brings them: bare (`Fetch`, `Ack` of older clients: deleted
/// on this relay only, the connection being the device's), or with the device's signature,
/// which is passed on to the other replicas.
#[derive(Debug)]
struct Acked {
    ids: Vec<EnvelopeId>,
    proof: Option<SignedAck>,
}

impl Acked {
    fn bare(ids: Vec<EnvelopeId>) -> Self {
        Acked { ids, proof: None }
    }

    fn signed(ack: SignedAck) -> Self {
        Acked { ids: ack.ids.clone(), proof: Some(ack) }
    }
}

/// A fetch waiting for its acknowledgements' delete before it reads.
#[derive(Debug)]
pub(crate) struct FetchAfterAcks {
    channel: Responder<MailboxResponse>,
    max: u32,
    deadline: Instant,
}

/// The clients' mailboxes on this relay: sessions, parked fetches, and the tasks serving them.
#[derive(Debug)]
pub(crate) struct Mailboxes {
    store: StoreHandle,
    settings: RelaySettings,
    metrics: Arc<Metrics>,
    /// Clients that said Hello, revoked sessions, whether the gateway admits this relay.
    sessions: Sessions<FetchState>,
    parked: HashMap<PeerId, Parked>,
    /// Group fetches waiting for a message, per device, and the devices waiting on each group
    /// mailbox: who reads which group is what this relay learns of a group's members.
    parked_groups: HashMap<PeerId, GroupRead>,
    group_readers: HashMap<PeerId, HashSet<PeerId>>,
    /// Counts the messages committed here per group mailbox, so a group fetch that read just
    /// before one is not parked past it (only its own groups' counts matter).
    group_arrivals: HashMap<PeerId, u64>,
    /// The newest epoch seen per group: posts of older epochs (by members removed since) are
    /// refused. Filled from posts here and, for a group not seen since start, from the newest
    /// message the store holds.
    group_epochs: HashMap<GroupId, u64>,
    /// Groups this relay reads from their own relays for the readers it serves.
    mirrors: Mirrors,
    /// Numbers the group reads as they arrive ([`GroupRead::order`]).
    group_reads: u64,
    send_limiter: RateLimiter,
    /// Where a `Send`'s copies go.
    replicas: Replicas,
    /// Deletes of acknowledged envelopes on the other replicas.
    replica_deletes: DeleteForwarder,
    /// Devices' push endpoints, and the wake-ups sent to them.
    pusher: Pusher,
    /// Which devices' mailboxes exist (sends and replica stores to others are refused).
    pub(crate) devices: Devices,
    tasks: JoinSet<Done>,
}

impl Mailboxes {
    pub(crate) fn new(settings: RelaySettings, metrics: Arc<Metrics>, replicas: Replicas, pusher: Pusher) -> Self {
        let send_limiter = RateLimiter::per_second(settings.send_burst, settings.send_rate);
        Mailboxes {
            store: replicas.store.clone(),
            sessions: Sessions::new(settings.gateway_key.clone()),
            settings,
            metrics,
            parked: HashMap::new(),
            parked_groups: HashMap::new(),
            group_readers: HashMap::new(),
            group_arrivals: HashMap::new(),
            group_epochs: HashMap::new(),
            mirrors: Mirrors::default(),
            group_reads: 0,
            send_limiter,
            replica_deletes: DeleteForwarder::start(Arc::clone(&replicas.pipes)),
            replicas,
            pusher,
            devices: Devices::new(),
            tasks: JoinSet::new(),
        }
    }

    /// The next task to finish, for [`Mailboxes::finish`]; `None` when none runs.
    pub(crate) async fn next_done(&mut self) -> Option<Result<Done, JoinError>> {
        self.tasks.join_next().await
    }

    /// Stops and waits for the tasks.
    pub(crate) async fn shutdown(&mut self) {
        self.tasks.shutdown().await;
    }

    /// Serves one mailbox request from `peer`.
    pub(crate) fn handle(
        &mut self,
        peer: PeerId,
        request: Result<MailboxRequest, FrameError>,
        channel: Responder<MailboxResponse>,
        known: &mut KnownRelays<'_>,
    ) {
        let request = match request {
            Ok(request) => request,
            Err(e) => return self.respond(channel, MailboxResponse::Error(WireError::for_frame(&e))),
        };
        self.metrics.count_request(request.kind());
        let now = unix_now();
        if let MailboxRequest::Hello { cert } = request {
            let hello = self.sessions.hello(peer, &cert, now, FetchState::default());
            self.metrics.count_cert_check(CertKind::Session, hello.is_ok());
            let response = match hello {
                Ok(_) => {
                    self.devices.greeted(peer);
                    let mut mailbox_relays = known.mailbox_relays(&peer);
                    mailbox_relays.truncate(self.settings.replication);
                    MailboxResponse::Welcome { relay: known.local(), mailbox_relays, relays: known.live_relays() }
                }
                Err(refusal) => MailboxResponse::Error(refusal),
            };
            return self.respond(channel, response);
        }
        let cert = match self.sessions.check(&peer, now) {
            Ok(session) => session.cert.clone(),
            Err(refusal) => return self.respond(channel, MailboxResponse::Error(refusal)),
        };
        match request {
            MailboxRequest::Hello { .. } => unreachable!("handled above"),
            MailboxRequest::Send { envelopes } => self.handle_send(peer, &cert, envelopes, false, channel, now, known),
            MailboxRequest::Post { envelopes } => self.handle_send(peer, &cert, envelopes, true, channel, now, known),
            MailboxRequest::GroupFetch { groups, max, wait_ms } => {
                self.handle_group_fetch(peer, groups, max, wait_ms, GroupReader::Device(channel), Some(known))
            }
            MailboxRequest::Fetch { max, wait_ms, ack } => {
                self.handle_fetch(peer, max, wait_ms, Acked::bare(ack), channel, known);
            }
            MailboxRequest::FetchAcked { max, wait_ms, ack } => match checked_ack(&peer, ack) {
                Ok(ack) => self.handle_fetch(peer, max, wait_ms, Acked::signed(ack), channel, known),
                Err(refusal) => self.respond(channel, MailboxResponse::Error(refusal)),
            },
            MailboxRequest::AckSigned { ack } => match checked_ack(&peer, ack) {
                Ok(ack) => self.handle_ack(peer, Acked::signed(ack), channel, known),
                Err(refusal) => self.respond(channel, MailboxResponse::Error(refusal)),
            },
            MailboxRequest::SetPush { push } => self.set_push(peer, push, None, channel),
            MailboxRequest::PushGroups { push, groups } => {
                if groups.len() > MAX_GROUPS_PER_FETCH {
                    let message = format!("at most {MAX_GROUPS_PER_FETCH} groups per PushGroups");
                    return self.respond(channel, refuse(ErrorCode::BadRequest, message));
                }
                self.set_push(peer, Some(push), Some(groups), channel);
            }
            MailboxRequest::GetPush => {
                let push = self.pusher.registry.get(&peer);
                self.respond(channel, MailboxResponse::Push { push });
            }
            MailboxRequest::Ack { ids } => self.handle_ack(peer, Acked::bare(ids), channel, known),
        }
    }

    /// `Ack` or `AckSigned`; answered once deleted here.
    fn handle_ack(
        &mut self,
        peer: PeerId,
        acked: Acked,
        channel: Responder<MailboxResponse>,
        known: &mut KnownRelays<'_>,
    ) {
        if acked.ids.len() > MAX_ENVELOPES_PER_BATCH {
            return self.respond(channel, too_many_acks());
        }
        let deleted = self.delete_delivered(peer, acked, known);
        self.tasks.spawn(async move {
            let response = match deleted.await {
                Ok(count) => MailboxResponse::Acked { count },
                Err(e) => internal(e),
            };
            Done::answer(channel, response)
        });
    }

    /// `SetPush` (`groups: None`) or `PushGroups` from `device` (the session's own: nobody
    /// registers for another device): kept durably before the answer.
    fn set_push(
        &mut self,
        device: PeerId,
        push: Option<PushEndpoint>,
        groups: Option<Vec<GroupId>>,
        channel: Responder<MailboxResponse>,
    ) {
        if let Some(Err(why)) = push.as_ref().map(|push| self.pusher.check(push)) {
            return self.respond(channel, refuse(ErrorCode::BadRequest, why));
        }
        let registry = self.pusher.registry.clone();
        self.tasks.spawn(async move {
            let response = match tokio::task::spawn_blocking(move || {
                let now = unix_now();
                match (push, groups) {
                    (Some(push), Some(groups)) => registry.set_groups(device, push, groups, now),
                    (push, _) => registry.set(device, push, now),
                }
            })
            .await
            {
                Ok(Ok(())) => MailboxResponse::PushSet,
                Ok(Err(e @ SetError::Gone)) => refuse(ErrorCode::NotFound, e.to_string()),
                Ok(Err(e @ SetError::Full)) => refuse(ErrorCode::Unavailable, e.to_string()),
                Ok(Err(e @ SetError::Store(_))) => refuse(ErrorCode::Internal, e.to_string()),
                Err(e) => refuse(ErrorCode::Internal, format!("the push endpoint could not be kept: {e}")),
            };
            Done::answer(channel, response)
        });
    }

    /// Serves a mirroring relay's `GroupFetch` (`relay` showed its relay certificate) as a
    /// member's, except that it starts no mirroring of its own: the caller took this relay for
    /// one of the groups' own.
    pub(crate) fn handle_mirror_read(
        &mut self,
        relay: PeerId,
        groups: Vec<GroupCursor>,
        max: u32,
        wait_ms: u32,
        channel: Responder<ReplicaResponse>,
    ) {
        self.metrics.count_request("mirror_group_fetch");
        self.handle_group_fetch(relay, groups, max, wait_ms, GroupReader::Mirror(channel), None);
    }

    /// Takes a finished task's result.
    pub(crate) fn finish(&mut self, done: Done, known: &mut KnownRelays<'_>) {
        match done {
            Done::Answer { channel, response, arrived } => {
                self.wake(arrived, known);
                self.respond(channel, response);
            }
            Done::Park { peer, channel, max, deadline, arrivals } => {
                match self.sessions.get(&peer) {
                    // Something arrived while the fetch was reading: read again.
                    Some(session) if session.state.arrivals != arrivals => {
                        return self.spawn_fetch(peer, channel, max, deadline);
                    }
                    Some(_) => {}
                    // Its session was revoked while the fetch was reading.
                    None if self.sessions.is_signed_out(&peer) => return self.respond(channel, session_revoked()),
                    // The client is gone; nobody to answer.
                    None => return,
                }
                // A newer fetch from the same device replaces an older one, which answers empty.
                if let Some(old) = self.parked.insert(peer, Parked { channel, max, deadline }) {
                    self.respond(old.channel, MailboxResponse::Envelopes { envelopes: Vec::new(), more: false });
                }
            }
            Done::ParkGroups { peer, fetch, arrivals } => {
                if matches!(fetch.channel, GroupReader::Device(_)) && self.sessions.get(&peer).is_none() {
                    if self.sessions.is_signed_out(&peer) {
                        self.respond_groups(fetch.channel, Err(crate::sessions::session_revoked()));
                    }
                    return;
                }
                if arrivals != self.arrivals_in(&fetch.cursors) {
                    return self.spawn_group_fetch(peer, fetch);
                }
                self.park_groups(peer, fetch);
            }
            Done::AcksApplied { peer, ids, then } => {
                if let Some(session) = self.sessions.get_mut(&peer) {
                    for id in &ids {
                        session.state.acks_in_flight.remove(id);
                    }
                    if then.is_none() {
                        session.state.detached_deletes = session.state.detached_deletes.saturating_sub(1);
                    }
                }
                if let Some(FetchAfterAcks { channel, max, deadline }) = then {
                    self.spawn_fetch(peer, channel, max, deadline);
                }
            }
            Done::Groups { channel, answer } => self.respond_groups(channel, answer),
            Done::Mirrored { read, cursors, outcome } => {
                let (answered, Kept { mut arrived, not_channels }) = match outcome {
                    Ok((groups, kept)) => (Some(groups), kept),
                    Err(_) => {
                        self.metrics.mirror_reads_failed.inc();
                        (None, Kept::default())
                    }
                };
                let now = Instant::now();
                for group in &not_channels {
                    self.mirrors.not_a_channel(*group, now);
                }
                let caught_up = self.mirrors.read_done(read, &cursors, answered.as_ref());
                for group in caught_up.into_iter().chain(not_channels) {
                    // Its readers held for the catch-up wait no longer than they asked to.
                    let mailbox = group.mailbox();
                    for reader in self.group_readers.get(&mailbox).into_iter().flatten() {
                        if let Some(read) = self.parked_groups.get_mut(reader) {
                            read.hold_until = read.deadline;
                        }
                    }
                    arrived.push(mailbox);
                }
                arrived.sort();
                arrived.dedup();
                self.wake(arrived, known);
                self.start_mirror_reads(known);
            }
            Done::Nothing => {}
            Done::Many(done) => {
                for one in done {
                    self.finish(one, known);
                }
            }
        }
    }

    /// The gateway refused this relay's certificate: greet no more clients.
    pub(crate) fn no_longer_admitted(&mut self, why: String) {
        if self.sessions.no_longer_admitted(why.clone()) {
            tracing::error!(reason = %why, "the gateway no longer admits this relay; refusing new clients");
        }
    }

    /// `peer`'s last connection closed: its session and parked fetch go.
    pub(crate) fn disconnected(&mut self, peer: &PeerId) {
        self.sessions.disconnected(peer);
        self.parked.remove(peer);
        self.unpark_groups(peer);
    }

    /// The gateway revoked `device`'s session `session`: if that is the session it said Hello
    /// with here, it goes (a parked fetch is answered `SESSION_REVOKED`, as is every later
    /// request until a valid Hello), and certificates of that session are refused until
    /// `until`, when they have expired anyway.
    pub(crate) fn revoke_session(&mut self, device: PeerId, session: SessionId, until: u64) {
        self.devices.forget(&device);
        let Some(ended) = self.sessions.revoke(device, session, until) else { return };
        self.metrics.sessions_revoked.inc();
        // A signed-out device is woken no more (connected or not).
        if self.pusher.registry.has(&device) {
            let registry = self.pusher.registry.clone();
            self.tasks.spawn(async move {
                let _ = tokio::task::spawn_blocking(move || registry.forget(device)).await;
                Done::Nothing
            });
        }
        if !ended {
            return;
        }
        tracing::info!(%device, %session, "session revoked by the gateway; its access here ends");
        if let Some(parked) = self.parked.remove(&device) {
            self.respond(parked.channel, session_revoked());
        }
        if let Some(read) = self.unpark_groups(&device) {
            self.respond_groups(read.channel, Err(crate::sessions::session_revoked()));
        }
    }

    /// Drops envelopes past their TTL and push registrations not renewed (on a task), and
    /// revocations that no longer matter.
    pub(crate) fn expire_envelopes(&mut self) {
        let now = unix_now();
        self.sessions.forget_expired_revocations(now);
        let store = self.store.clone();
        let registry = self.pusher.registry.clone();
        self.tasks.spawn(async move {
            match store.expire(now).await {
                Ok(n) if n > 0 => tracing::info!(dropped = n, "expired undelivered envelopes"),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "expiring envelopes failed"),
            }
            // Push registrations their devices stopped renewing.
            if let Ok(dropped) = tokio::task::spawn_blocking(move || registry.expire(now)).await
                && dropped > 0
            {
                tracing::info!(dropped, "expired push registrations not renewed");
            }
            Done::Nothing
        });
    }

    /// Answers the parked fetches whose deadline has passed, empty.
    pub(crate) fn expire_parked(&mut self) {
        let now = Instant::now();
        let expired: Vec<PeerId> = self.parked.iter().filter(|(_, p)| p.deadline <= now).map(|(id, _)| *id).collect();
        for peer in expired {
            if let Some(parked) = self.parked.remove(&peer) {
                self.respond(parked.channel, MailboxResponse::Envelopes { envelopes: Vec::new(), more: false });
            }
        }
        let expired: Vec<PeerId> =
            self.parked_groups.iter().filter(|(_, p)| p.hold_until <= now).map(|(id, _)| *id).collect();
        for peer in expired {
            if let Some(read) = self.unpark_groups(&peer) {
                self.respond_groups(read.channel, Ok(Vec::new()));
            }
        }
    }

    /// Envelopes were committed here for `mailboxes`: their parked fetches answer, and a device
    /// that is not connected here is woken through its push endpoint if this relay is the
    /// closest live one to its mailbox (one of its replicas, and only one, sends).
    pub(crate) fn wake(&mut self, mailboxes: Vec<PeerId>, known: &mut KnownRelays<'_>) {
        for mailbox in mailboxes {
            if is_group_mailbox(&mailbox) {
                if self.group_arrivals.len() >= MAX_GROUP_EPOCHS_KEPT && !self.group_arrivals.contains_key(&mailbox) {
                    // Only parked reads compare counts; they re-read once at worst.
                    self.group_arrivals.clear();
                }
                *self.group_arrivals.entry(mailbox).or_default() += 1;
                let readers: Vec<(PeerId, GroupRead)> = self
                    .group_readers
                    .get(&mailbox)
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|reader| self.unpark_groups(&reader).map(|read| (reader, read)))
                    .collect();
                if !readers.is_empty() {
                    self.spawn_group_push(mailbox, readers);
                }
                // Members who read the group here and are not connected: woken by push.
                let watchers = self.pusher.registry.watchers(&mailbox);
                self.pusher.arrived(watchers.into_iter().filter(|device| self.sessions.get(device).is_none()));
                continue;
            }
            match self.sessions.get_mut(&mailbox) {
                Some(session) => session.state.arrivals += 1,
                None if self.pusher.registry.has(&mailbox) => {
                    let closest = known.mailbox_relays(&mailbox).first().map(|relay| relay.peer_id);
                    if closest == Some(known.local()) {
                        self.pusher.arrived([mailbox]);
                    }
                }
                None => {}
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
    pub(crate) fn put_and_push(&mut self, envelopes: &[Envelope], now: u64, until: Option<u64>) -> Option<QueuedPut> {
        let queued = self.store.put_in_order(envelopes.to_vec(), now, until)?;
        self.push_to_parked(envelopes);
        Some(queued)
    }

    fn respond(&mut self, channel: Responder<MailboxResponse>, response: MailboxResponse) {
        if let MailboxResponse::Error(e) = &response {
            self.metrics.count_error(&e.code.to_string());
        }
        channel.respond(response);
    }

    fn respond_groups(&mut self, channel: GroupReader, answer: Result<Vec<GroupBatch>, WireError>) {
        match channel {
            GroupReader::Device(channel) => {
                let response =
                    answer.map_or_else(MailboxResponse::Error, |groups| MailboxResponse::GroupEnvelopes { groups });
                self.respond(channel, response);
            }
            GroupReader::Mirror(channel) => {
                if let Err(e) = &answer {
                    self.metrics.count_error(&e.code.to_string());
                }
                channel.respond(
                    answer.map_or_else(ReplicaResponse::Error, |groups| ReplicaResponse::GroupEnvelopes { groups }),
                );
            }
        }
    }

    /// Checks a `Send` (`post: false`, to devices' mailboxes) or a `Post` (to groups', each
    /// checked as [`Mailboxes::check_group_posts`] says; refused as a whole if one is bad: a
    /// member's client sends none) and starts its replication.
    #[allow(clippy::too_many_arguments)]
    fn handle_send(
        &mut self,
        peer: PeerId,
        cert: &CertBody,
        envelopes: Vec<Envelope>,
        post: bool,
        channel: Responder<MailboxResponse>,
        now: u64,
        known: &mut KnownRelays<'_>,
    ) {
        if let Err(refusal) = check_envelopes(&peer, cert, &envelopes) {
            return self.respond(channel, MailboxResponse::Error(refusal));
        }
        if let Some(e) = envelopes.iter().find(|e| is_group_mailbox(&e.to_device) != post) {
            let why = match post {
                true => format!("envelope {} is addressed to a device: send it with Send", e.id),
                false => format!("envelope {} is addressed to a group's mailbox: post it with Post", e.id),
            };
            return self.respond(channel, refuse(ErrorCode::BadRequest, why));
        }
        if let Err(refusal) = self.check_group_posts(&envelopes) {
            return self.respond(channel, MailboxResponse::Error(refusal));
        }
        let envelopes = match self.devices.sort(envelopes) {
            Sorted::Unknown { envelopes, devices } => {
                return self.devices.wait(Waiting::Send { peer, envelopes, channel }, devices);
            }
            Sorted::Known { existing, missing } => match self.without_missing(existing, &missing) {
                Ok(existing) => existing,
                Err(refusal) => return self.respond(channel, MailboxResponse::Error(refusal)),
            },
        };
        self.replicate(cert, envelopes, channel, now, known);
    }

    /// A `Send` that waited for the gateway's word on its mailboxes, served again (its
    /// session checked anew).
    pub(crate) fn resume_send(
        &mut self,
        peer: PeerId,
        envelopes: Vec<Envelope>,
        channel: Responder<MailboxResponse>,
        known: &mut KnownRelays<'_>,
    ) {
        let now = unix_now();
        match self.sessions.check(&peer, now) {
            Ok(session) => {
                let cert = session.cert.clone();
                self.handle_send(peer, &cert, envelopes, false, channel, now, known);
            }
            Err(refusal) => self.respond(channel, MailboxResponse::Error(refusal)),
        }
    }

    /// The envelopes of `existing` (sorted by [`Devices::sort`]), or a refusal when every one
    /// was for a device in `missing`: the others are stored, and those dropped (a stale card
    /// may name a device signed out since; a made-up mailbox is refused).
    fn without_missing(&self, existing: Vec<Envelope>, missing: &[PeerId]) -> Result<Vec<Envelope>, WireError> {
        if missing.is_empty() {
            return Ok(existing);
        }
        self.count_missing(missing.len());
        let names: Vec<String> = missing.iter().take(3).map(PeerId::to_string).collect();
        let more = if missing.len() > 3 { format!(" and {} more", missing.len() - 3) } else { String::new() };
        if existing.is_empty() {
            let why = format!("no such device: {}{more} (signed out, or never signed in)", names.join(", "));
            return Err(WireError::new(ErrorCode::NotFound, why));
        }
        tracing::debug!(devices = %names.join(", "), "dropped envelopes to devices that do not exist");
        Ok(existing)
    }

    /// Counts devices named by envelopes that the gateway says do not exist.
    pub(crate) fn count_missing(&self, devices: usize) {
        self.metrics.mailboxes_missing.inc_by(devices as u64);
    }

    /// Checks the group messages among `envelopes` as a relay can (see [`GroupSeal::verify`]),
    /// and that each is of the newest epoch this relay knows for its group, which it then
    /// remembers. Each copy's relay checks again (`replica::store`), so a removed member cannot
    /// post through a relay that holds no copy and so knows no newer epoch.
    pub(crate) fn check_group_posts(&mut self, envelopes: &[Envelope]) -> Result<(), WireError> {
        let mut newest: HashMap<GroupId, u64> = HashMap::new();
        for envelope in envelopes.iter().filter(|e| is_group_mailbox(&e.to_device)) {
            let checked = GroupSeal::verify(envelope).and_then(|seal| {
                let current = self.group_epoch(&seal.group);
                if seal.cert.epoch < current {
                    return Err(GroupWireError::OldEpoch { group: seal.group, epoch: seal.cert.epoch, current });
                }
                Ok(seal)
            });
            match checked {
                Ok(seal) => {
                    let epoch = newest.entry(seal.group).or_default();
                    *epoch = (*epoch).max(seal.cert.epoch);
                }
                Err(e) => {
                    let code = match e {
                        GroupWireError::Malformed(_) => ErrorCode::BadRequest,
                        _ => ErrorCode::Forbidden,
                    };
                    return Err(WireError::new(code, format!("envelope {}: {e}", envelope.id)));
                }
            }
        }
        // Relearned from the store when dropped: a bound on what group ids cost in memory.
        if self.group_epochs.len() > MAX_GROUP_EPOCHS_KEPT {
            self.group_epochs.clear();
        }
        for (group, epoch) in newest {
            let known_epoch = self.group_epochs.entry(group).or_default();
            *known_epoch = (*known_epoch).max(epoch);
        }
        Ok(())
    }

    /// The newest epoch of `group` this relay knows of.
    fn group_epoch(&mut self, group: &GroupId) -> u64 {
        if let Some(epoch) = self.group_epochs.get(group) {
            return *epoch;
        }
        let stored = match self.store.last_in(group.mailbox()) {
            Ok(last) => last.and_then(|e| GroupSeal::epoch_of(&e)).map(|(_, epoch)| epoch).unwrap_or(0),
            Err(e) => {
                tracing::warn!(%group, error = %e, "could not read a group's newest message");
                0
            }
        };
        self.group_epochs.insert(*group, stored);
        stored
    }

    /// Starts replicating checked envelopes to their mailboxes' relays; answers once durable.
    fn replicate(
        &mut self,
        cert: &CertBody,
        envelopes: Vec<Envelope>,
        channel: Responder<MailboxResponse>,
        now: u64,
        known: &mut KnownRelays<'_>,
    ) {
        // Not even through other relays: a relay whose disk failed acknowledges nothing.
        if let Some(why) = self.store.failure() {
            return self.respond(channel, refuse(ErrorCode::Unavailable, store_failed(why)));
        }
        if let Err(wait) = self.send_limiter.check_n(&cert.user_id.to_string(), envelopes.len() as u32, now) {
            self.metrics.rate_limited.inc();
            return self.respond(channel, MailboxResponse::Error(WireError::flood_wait(wait, "messages")));
        }
        let mut groups: HashMap<PeerId, Vec<Envelope>> = HashMap::new();
        for envelope in envelopes {
            groups.entry(envelope.to_device).or_default().push(envelope);
        }
        let local = known.local();
        let groups: Vec<Group> = groups
            .into_iter()
            .map(|(device, batch)| {
                let targets: Vec<PeerId> = known.mailbox_relays(&device).into_iter().map(|r| r.peer_id).collect();
                let local_put = if targets.iter().take(self.settings.replication).any(|t| *t == local) {
                    self.put_and_push(&batch, now, None)
                } else {
                    None
                };
                Group { batch, targets, local_put }
            })
            .collect();
        let replicas = self.replicas.clone();
        self.metrics.envelopes_received.inc_by(groups.iter().map(|g| g.batch.len() as u64).sum());
        self.tasks.spawn(async move {
            let (response, arrived) = store_replicated(&replicas, groups, now).await;
            Done::Answer { channel, response, arrived }
        });
    }

    /// Applies a `Fetch`'s acknowledgements and reads (or parks) it.
    fn handle_fetch(
        &mut self,
        peer: PeerId,
        max: u32,
        wait_ms: u32,
        acked: Acked,
        channel: Responder<MailboxResponse>,
        known: &mut KnownRelays<'_>,
    ) {
        if acked.ids.len() > MAX_ENVELOPES_PER_BATCH {
            return self.respond(channel, too_many_acks());
        }
        let max = max.clamp(1, MAX_ENVELOPES_PER_BATCH as u32);
        let deadline = Instant::now() + Duration::from_millis(u64::from(wait_ms.min(MAX_FETCH_WAIT_MS)));
        if acked.ids.is_empty() {
            return self.spawn_fetch(peer, channel, max, deadline);
        }
        // A fetch does not wait for its acknowledgements to be deleted (they may queue behind
        // other commits), but only a few deletes per client run detached: past those, the
        // fetch waits for its own, holding its request's slot, so a client sending fetches
        // full of acknowledgements is slowed down instead of piling up delete tasks.
        let detached = match self.sessions.get_mut(&peer) {
            Some(session) => {
                session.state.acks_in_flight.extend(acked.ids.iter().copied());
                let detached = session.state.detached_deletes < MAX_DETACHED_DELETES;
                session.state.detached_deletes += usize::from(detached);
                detached
            }
            None => false,
        };
        let ids = acked.ids.clone();
        let deleted = self.delete_delivered(peer, acked, known);
        let then = if detached {
            self.spawn_fetch(peer, channel, max, deadline);
            None
        } else {
            Some(FetchAfterAcks { channel, max, deadline })
        };
        self.tasks.spawn(async move {
            if let Err(e) = deleted.await {
                tracing::error!(%peer, error = %e, "deleting acknowledged envelopes failed");
            }
            Done::AcksApplied { peer, ids, then }
        });
    }

    /// Deletes envelopes the owner of `mailbox` has received: here (the returned future, done
    /// once the delete is committed) and, given the owner's signed acknowledgement, on the
    /// other replicas (best effort, gathered with other deletes and not waited for: a
    /// replica that misses it still holds a copy, which the recipient drops by id when it sees
    /// it again, and acknowledges there). Without a proof the other replicas keep their copies
    /// the same way: they delete nothing on another relay's word alone.
    fn delete_delivered(
        &mut self,
        mailbox: PeerId,
        Acked { ids, proof }: Acked,
        known: &mut KnownRelays<'_>,
    ) -> impl Future<Output = Result<u32, StoreError>> + Send + 'static {
        let proof = proof.filter(|_| !ids.is_empty());
        if let Some(ack) = &proof {
            let local = known.local();
            let mut relays = known.mailbox_relays(&mailbox);
            relays.truncate(self.settings.replication + 1);
            for relay in relays.into_iter().map(|r| r.peer_id).filter(|id| *id != local) {
                if !self.replica_deletes.try_send(ReplicaDelete { relay, ack: ack.clone() }) {
                    tracing::debug!(%relay, "too many replica deletes queued; this one is dropped");
                }
            }
        }
        let store = self.store.clone();
        async move {
            match proof {
                // Kept as the proof of delivery that repair shows other relays.
                Some(ack) => store.delete_acked(ack).await,
                None if ids.is_empty() => Ok(0),
                None => store.delete(mailbox, ids).await,
            }
        }
    }

    /// Reads `peer`'s mailbox on a task; answers, or parks until `deadline` if it is empty.
    fn spawn_fetch(&mut self, peer: PeerId, mut channel: Responder<MailboxResponse>, max: u32, deadline: Instant) {
        // The client is gone: nobody to answer.
        let Some(session) = self.sessions.get(&peer) else { return };
        let (arrivals, skip) = (session.state.arrivals, session.state.acks_in_flight.clone());
        let store = self.store.clone();
        self.tasks.spawn(async move {
            // The answer fits what the pipe may hold (a caller that reads no answers gets small
            // ones, then none). Read on this task: a hand-off to a blocking thread per fetch
            // cost more than the read, which the room bounds.
            let room = channel.room(MAX_MAILBOX_MESSAGE_SIZE, MAX_ENVELOPE_SIZE + 1024);
            let read = store.fetch_within(peer, max as usize + skip.len(), room).map(|(mut envelopes, more)| {
                envelopes.retain(|e| !skip.contains(&e.id));
                let more = more || envelopes.len() > max as usize;
                envelopes.truncate(max as usize);
                (envelopes, more)
            });
            match read {
                Ok((envelopes, more)) if !envelopes.is_empty() || Instant::now() >= deadline => {
                    Done::answer(channel, MailboxResponse::Envelopes { envelopes, more })
                }
                Ok(_) => {
                    // Parked: it holds no room while it waits.
                    channel.room(0, 0);
                    Done::Park { peer, channel, max, deadline, arrivals }
                }
                Err(e) => Done::answer(channel, internal(e)),
            }
        });
    }

    /// Serves a `GroupFetch`: reads (or parks) it. A member's (`known` given) of a group this
    /// relay is not one of the `R` relays of is served from this relay's mirror of it, which
    /// the read starts (or keeps) following.
    fn handle_group_fetch(
        &mut self,
        peer: PeerId,
        cursors: Vec<GroupCursor>,
        max: u32,
        wait_ms: u32,
        channel: GroupReader,
        known: Option<&mut KnownRelays<'_>>,
    ) {
        if cursors.is_empty() || cursors.len() > MAX_GROUPS_PER_FETCH {
            let why = format!("read 1 to {MAX_GROUPS_PER_FETCH} groups at a time");
            return self.respond_groups(channel, Err(WireError::new(ErrorCode::BadRequest, why)));
        }
        let max = max.clamp(1, MAX_ENVELOPES_PER_BATCH as u32);
        let now = Instant::now();
        let deadline = now + Duration::from_millis(u64::from(wait_ms.min(MAX_FETCH_WAIT_MS)));
        let mut hold_until = deadline;
        if let Some(known) = known {
            match self.mirror_for_reader(&cursors, now, known) {
                Ok(true) => hold_until = hold_until.max(now + mirror::CATCH_UP_WAIT),
                Ok(false) => {}
                Err(refusal) => return self.respond_groups(channel, Err(refusal)),
            }
        }
        // A newer read from the same device replaces an older one, which answers empty.
        if let Some(old) = self.unpark_groups(&peer) {
            self.respond_groups(old.channel, Ok(Vec::new()));
        }
        self.group_reads += 1;
        let order = self.group_reads;
        self.spawn_group_fetch(peer, GroupRead { channel, cursors, max, deadline, order, hold_until });
    }

    /// Follows the groups of a member's read that this relay is not one of the `R` relays of;
    /// gives whether one of them is still being caught up (the read then waits for it).
    fn mirror_for_reader(
        &mut self,
        cursors: &[GroupCursor],
        now: Instant,
        known: &mut KnownRelays<'_>,
    ) -> Result<bool, WireError> {
        let (mut new, mut catching_up) = (false, false);
        for cursor in cursors {
            if mirror_origin(known, self.settings.replication, &cursor.group).is_none() {
                continue;
            }
            match self.mirrors.want(cursor.group, now) {
                Want::Followed | Want::NotAChannel => {}
                Want::New => new = true,
                Want::Full => {
                    let why = format!(
                        "this relay mirrors as many groups as it may; read {} from its own relays",
                        cursor.group
                    );
                    return Err(WireError::new(ErrorCode::Unavailable, why));
                }
            }
            catching_up |= self.mirrors.catching_up(&cursor.group);
        }
        if new {
            self.start_mirror_reads(known);
        }
        Ok(catching_up)
    }

    /// Starts the mirror's reads of origin relays that need one (see [`Mirrors::plan`]).
    fn start_mirror_reads(&mut self, known: &mut KnownRelays<'_>) {
        let replication = self.settings.replication;
        let now = Instant::now();
        // A channel whose subscribers' apps are closed has no readers here, but devices to wake
        // for its posts: it stays followed.
        let registry = &self.pusher.registry;
        self.mirrors.keep_wanted(now, |group| registry.has_watchers(&group.mailbox()));
        let reads = self.mirrors.plan(now, |group| mirror_origin(known, replication, group));
        for read in reads {
            self.spawn_mirror_read(read);
        }
        self.metrics.groups_mirrored.set(gauge_value(self.mirrors.followed()));
    }

    /// Reads an origin relay for the mirror and keeps what it answers, on a task.
    fn spawn_mirror_read(&mut self, read: PlannedRead) {
        let (replicas, store) = (self.replicas.clone(), self.store.clone());
        self.tasks.spawn(async move {
            let PlannedRead { id, cursors, wait_ms } = read;
            let request =
                ReplicaRequest::GroupFetch { groups: cursors.clone(), max: MAX_ENVELOPES_PER_BATCH as u32, wait_ms };
            let deadline = Duration::from_millis(u64::from(wait_ms)) + REPLICA_STORE_DEADLINE;
            let outcome = match replicas.call_within(id.origin, &request, deadline).await {
                Ok(ReplicaResponse::GroupEnvelopes { groups }) => match mirror::keep(&store, &groups, unix_now()).await
                {
                    Ok(kept) => Ok((Answered::of(&groups, MAX_ENVELOPES_PER_BATCH), kept)),
                    Err(e) => Err(format!("keeping them failed: {e}")),
                },
                Ok(other) => Err(unexpected(&other).to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(why) = &outcome {
                tracing::info!(origin = %id.origin, %why, "reading mirrored groups failed; reading again soon");
                tokio::time::sleep(mirror::RETRY_PAUSE).await;
            }
            Done::Mirrored { read: id, cursors, outcome }
        });
    }

    /// Reads a group fetch's cursors on a task; answers, or parks until its deadline if
    /// nothing is new.
    fn spawn_group_fetch(&mut self, peer: PeerId, read: GroupRead) {
        let (store, arrivals) = (self.store.clone(), self.arrivals_in(&read.cursors));
        self.tasks.spawn(async move {
            let mut left = read.max as usize;
            let mut groups = Vec::new();
            for cursor in &read.cursors {
                if left == 0 {
                    break;
                }
                match store.fetch_from(cursor.group.mailbox(), cursor.from, left) {
                    Ok((found, more)) if !found.is_empty() => {
                        left -= found.len();
                        let next = found.last().map_or(cursor.from, |(arrival, _)| arrival + 1);
                        let envelopes = found.into_iter().map(|(_, e)| e).collect();
                        groups.push(GroupBatch { group: cursor.group, envelopes, next, more });
                    }
                    Ok(_) => {}
                    Err(e) => return Done::Groups { channel: read.channel, answer: Err(internal_error(e)) },
                }
            }
            if groups.is_empty() && Instant::now() < read.hold_until {
                return Done::ParkGroups { peer, fetch: read, arrivals };
            }
            Done::Groups { channel: read.channel, answer: Ok(groups) }
        });
    }

    /// What has arrived in these groups here, summed: changes when any of them gets a message.
    fn arrivals_in(&self, cursors: &[GroupCursor]) -> u64 {
        cursors
            .iter()
            .map(|c| self.group_arrivals.get(&c.group.mailbox()).copied().unwrap_or(0))
            .fold(0, u64::wrapping_add)
    }

    /// Answers the reads parked on one group mailbox with what just arrived there, from one
    /// store read for all of them (a channel's thousands of readers cost one read, not one each).
    /// Their other groups had nothing: they were parked.
    fn spawn_group_push(&mut self, mailbox: PeerId, readers: Vec<(PeerId, GroupRead)>) {
        let store = self.store.clone();
        let arrivals: Vec<u64> = readers.iter().map(|(_, read)| self.arrivals_in(&read.cursors)).collect();
        self.tasks.spawn(async move {
            let cursor_of = |read: &GroupRead| read.cursors.iter().find(|c| c.group.mailbox() == mailbox).copied();
            let from = readers.iter().filter_map(|(_, read)| cursor_of(read)).map(|c| c.from).min().unwrap_or(0);
            let (found, more) = match store.fetch_from(mailbox, from, MAX_ENVELOPES_PER_BATCH) {
                Ok(found) => found,
                Err(e) => {
                    let refusal = internal_error(&e);
                    return Done::Many(
                        readers
                            .into_iter()
                            .map(|(_, read)| Done::Groups { channel: read.channel, answer: Err(refusal.clone()) })
                            .collect(),
                    );
                }
            };
            let mut done = Vec::with_capacity(readers.len());
            for ((peer, read), arrivals) in readers.into_iter().zip(arrivals) {
                let Some(cursor) = cursor_of(&read) else { continue };
                let mine: Vec<&(u64, Envelope)> = found.iter().filter(|(arrival, _)| *arrival >= cursor.from).collect();
                if mine.is_empty() {
                    done.push(Done::ParkGroups { peer, fetch: read, arrivals });
                    continue;
                }
                let take = mine.len().min(read.max as usize);
                let next = mine[take - 1].0 + 1;
                let envelopes = mine[..take].iter().map(|(_, e)| e.clone()).collect();
                let batch = GroupBatch { group: cursor.group, envelopes, next, more: more || take < mine.len() };
                done.push(Done::Groups { channel: read.channel, answer: Ok(vec![batch]) });
            }
            Done::Many(done)
        });
    }

    fn park_groups(&mut self, peer: PeerId, read: GroupRead) {
        // A newer read from the same device replaces an older one, which answers empty; an
        // older one whose store read finished last is that one.
        if self.parked_groups.get(&peer).is_some_and(|parked| parked.order > read.order) {
            return self.respond_groups(read.channel, Ok(Vec::new()));
        }
        if let Some(old) = self.unpark_groups(&peer) {
            self.respond_groups(old.channel, Ok(Vec::new()));
        }
        for cursor in &read.cursors {
            self.group_readers.entry(cursor.group.mailbox()).or_default().insert(peer);
        }
        self.parked_groups.insert(peer, read);
    }

    /// Takes `peer`'s parked group fetch out, if it has one, and forgets it as a reader.
    fn unpark_groups(&mut self, peer: &PeerId) -> Option<GroupRead> {
        let read = self.parked_groups.remove(peer)?;
        for cursor in &read.cursors {
            let mailbox = cursor.group.mailbox();
            if let Some(readers) = self.group_readers.get_mut(&mailbox) {
                readers.remove(peer);
                if readers.is_empty() {
                    self.group_readers.remove(&mailbox);
                }
            }
        }
        Some(read)
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
}

/// The relay a mirror of `group` reads it from: the closest of its `R` relays, or `None` when
/// this relay is one of them (it serves the group from its own copies).
fn mirror_origin(known: &mut KnownRelays<'_>, replication: usize, group: &GroupId) -> Option<PeerId> {
    let mut relays = known.mailbox_relays(&group.mailbox());
    relays.truncate(replication);
    if relays.iter().any(|r| r.peer_id == known.local()) { None } else { relays.first().map(|r| r.peer_id) }
}

/// Groups whose newest epoch a relay keeps in memory at most (more are read from the store again).
const MAX_GROUP_EPOCHS_KEPT: usize = 100_000;

/// Each envelope must come from the connection's device and account, fit the size limit, and
/// the batch must fit the batch limit.
fn check_envelopes(peer: &PeerId, cert: &CertBody, envelopes: &[Envelope]) -> Result<(), WireError> {
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
    }
    check_envelope_shapes(envelopes)
}

/// What every batch of envelopes must be, from a client or from another relay: 1 to
/// [`MAX_ENVELOPES_PER_BATCH`] of them, each with content and within [`MAX_ENVELOPE_SIZE`].
pub(crate) fn check_envelope_shapes(envelopes: &[Envelope]) -> Result<(), WireError> {
    if envelopes.is_empty() || envelopes.len() > MAX_ENVELOPES_PER_BATCH {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            format!("send 1 to {MAX_ENVELOPES_PER_BATCH} envelopes at a time"),
        ));
    }
    for e in envelopes {
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

/// A client's signed acknowledgement, of its own mailbox. Its signature is checked by the
/// relays it is passed on to, where it matters, not here on the event loop: this relay deletes
/// on the connection's word, which is the device's.
fn checked_ack(peer: &PeerId, ack: SignedAck) -> Result<SignedAck, WireError> {
    if ack.mailbox != *peer {
        let why = format!("an acknowledgement is of the connection's own mailbox ({peer}), not {}", ack.mailbox);
        return Err(WireError::new(ErrorCode::Forbidden, why));
    }
    Ok(ack)
}

/// The refusal of a relay whose store takes no more writes.
pub(crate) fn store_failed(why: &str) -> String {
    format!(
        "this relay's store failed ({why}) and takes no writes until its disk takes writes again and the relay \
         restarts; send through another relay"
    )
}

/// The answer to a device whose session the gateway revoked.
fn session_revoked() -> MailboxResponse {
    MailboxResponse::Error(crate::sessions::session_revoked())
}

fn too_many_acks() -> MailboxResponse {
    refuse(ErrorCode::BadRequest, format!("at most {MAX_ENVELOPES_PER_BATCH} ids per acknowledgement"))
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> MailboxResponse {
    MailboxResponse::Error(WireError::new(code, message))
}

fn internal(e: impl std::fmt::Display) -> MailboxResponse {
    MailboxResponse::Error(internal_error(e))
}

fn internal_error(e: impl std::fmt::Display) -> WireError {
    tracing::error!(error = %e, "relay store failure");
    WireError::new(ErrorCode::Internal, "internal error; try again later")
}
