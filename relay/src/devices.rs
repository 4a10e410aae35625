//! Which device mailboxes exist: a relay keeps envelopes only for devices the gateway has a
//! session for, so nobody can make a relay hold data for made-up mailboxes (any peer id would
//! otherwise do, and fill disks no real device ever drains).
//!
//! A relay learns that a device exists when it greets it (`Hello` with a valid session
//! certificate) or when it asks the gateway (`AuthRequest::DevicesExist`, showing its relay
//! certificate), before the first envelope for a mailbox it knows nothing of. A request with
//! such envelopes waits here until the answer comes, then is served again from the start
//! (its session and everything else checked anew); waiting is bounded in requests, devices
//! and time ([`MAX_WAITING`], [`MAX_WANTED`], [`MAX_WAIT`]), past which a request is told to
//! retry. Answers are kept for a while ([`EXISTS_FOR`], [`MISSING_FOR`]); a revoked session's
//! device is forgotten at once.
//!
//! The gateway may be away: a question it cannot answer is not a verdict. Its devices are then
//! taken as existing for [`UNVERIFIED_FOR`] and asked about again after, so messaging never
//! stops with the gateway (quotas per sender still bound what that lets through). A relay
//! started without `--gateway` has no one to ask and takes every mailbox.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::request_response::{self, OutboundRequestId};
use meshgram_node::crypto::cert::RelayCert;
use meshgram_node::net::pipe::Responder;
use meshgram_node::proto::envelope::Envelope;
use meshgram_node::proto::group::is_group_mailbox;
use meshgram_node::proto::{
    AuthRequest, AuthResponse, MAX_DEVICES_PER_QUESTION, MailboxResponse, ReplicaResponse, WireError,
};

use crate::revocations::{GatewayAddr, GatewayClient, GatewayEvent};

/// How long the gateway's "it exists" holds here. A revoked session's device is forgotten when
/// the revocation arrives, so this only bounds what a missed revocation costs.
const EXISTS_FOR: Duration = Duration::from_secs(6 * 3600);
/// How long "no such device" holds: a device that signs in just after is served this much
/// later at worst, and a sender repeating made-up mailboxes costs the gateway one question
/// per mailbox per this long.
const MISSING_FOR: Duration = Duration::from_secs(30);
/// How long devices the gateway could not be asked about are taken as existing.
const UNVERIFIED_FOR: Duration = Duration::from_secs(60);
/// A question not answered by then has failed. Well under the 3 s another relay gives a
/// replica `Store` (`replicate::REPLICA_STORE_DEADLINE`) before taking this relay for down;
/// the gateway answers in milliseconds when it is up.
const QUESTION_DEADLINE: Duration = Duration::from_secs(1);
/// After a failed question, new mailboxes are taken without asking for this long, so that a
/// gateway that is away costs one wait, not one per new mailbox.
const AWAY_FOR: Duration = Duration::from_secs(10);
/// A request that waited this long is told to retry (`FLOOD_WAIT`): only a backlog of
/// questions makes one wait this long, and no request waits for good.
const MAX_WAIT: Duration = Duration::from_secs(2);
/// Requests waiting at once, in all and from one client; past either, new ones are told to
/// retry.
const MAX_WAITING: usize = 4096;
const MAX_WAITING_PER_PEER: usize = 16;
/// Devices waiting to be asked about; past it, requests that would add more are told to retry.
const MAX_WANTED: usize = 8192;
/// Devices remembered; past it, expired ones are dropped, and if that leaves the memory more
/// than three quarters full it starts over (and asks again).
const MAX_REMEMBERED: usize = 1_000_000;

/// What is known of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    Exists,
    Missing,
    /// The gateway could not be asked: taken as existing for now.
    Unverified,
}

/// A request that waits for the gateway's answer about its envelopes' mailboxes, to be served
/// again once it came.
#[derive(Debug)]
pub(crate) enum Waiting {
    /// A client's `Send`.
    Send { peer: PeerId, envelopes: Vec<Envelope>, channel: Responder<MailboxResponse> },
    /// Another relay's `Store` (`until: None`) or `StoreUntil`.
    Store { peer: PeerId, envelopes: Vec<Envelope>, until: Option<u64>, channel: Responder<ReplicaResponse> },
}

impl Waiting {
    fn peer(&self) -> PeerId {
        match self {
            Waiting::Send { peer, .. } | Waiting::Store { peer, .. } => *peer,
        }
    }

    /// Answers it with `refusal`, in its protocol.
    pub(crate) fn refuse(self, refusal: WireError) {
        match self {
            Waiting::Send { channel, .. } => channel.respond(MailboxResponse::Error(refusal)),
            Waiting::Store { channel, .. } => channel.respond(ReplicaResponse::Error(refusal)),
        }
    }
}

/// Too many requests wait for the gateway's word on their mailboxes: retry in a second.
pub(crate) fn busy_asking_gateway() -> WireError {
    WireError::flood_wait(1, "requests waiting on new mailboxes")
}

/// Envelopes sorted by whether their mailboxes exist.
#[derive(Debug)]
pub(crate) enum Sorted {
    /// Every mailbox is known: those of devices that exist (and groups', which are checked
    /// otherwise), and the devices that do not.
    Known { existing: Vec<Envelope>, missing: Vec<PeerId> },
    /// Some mailboxes (`devices`) are not known yet: wait with them ([`Devices::wait`]).
    Unknown { envelopes: Vec<Envelope>, devices: Vec<PeerId> },
}

/// A waiting request, the devices it waits on, and since when.
#[derive(Debug)]
struct Parked {
    request: Waiting,
    devices: Vec<PeerId>,
    since: Instant,
}

/// The question under way.
#[derive(Debug)]
struct Question {
    id: OutboundRequestId,
    devices: Vec<PeerId>,
    sent: Instant,
}

/// The relay's knowledge of which devices exist, and its questions to the gateway.
#[derive(Debug)]
pub(crate) struct Devices {
    /// Whom to ask, and with what certificate; `None` without `--gateway`.
    gateway: Option<(GatewayAddr, RelayCert)>,
    known: HashMap<PeerId, (Standing, Instant)>,
    /// Devices to ask about, in order, without repeats (nor any of the question under way).
    wanted: Vec<PeerId>,
    /// `wanted`, and the devices of the question under way: a request waiting on any of
    /// these waits on.
    pending: HashSet<PeerId>,
    asking: Option<Question>,
    /// Pending devices whose session was revoked since they were queued: the answer may
    /// predate the revocation.
    revoked_while_asking: HashSet<PeerId>,
    /// Until when the gateway is taken for away (a question failed).
    away_until: Option<Instant>,
    waiting: Vec<Parked>,
    waiting_per_peer: HashMap<PeerId, usize>,
}

/// Requests to serve again, and requests that waited too long (to refuse, retryable).
#[derive(Debug, Default)]
pub(crate) struct Released {
    pub(crate) ready: Vec<Waiting>,
    pub(crate) too_late: Vec<Waiting>,
}

impl Devices {
    /// Takes every mailbox until [`Devices::ask`] is given a gateway.
    pub(crate) fn new() -> Self {
        Devices {
            gateway: None,
            known: HashMap::new(),
            wanted: Vec::new(),
            pending: HashSet::new(),
            asking: None,
            revoked_while_asking: HashSet::new(),
            away_until: None,
            waiting: Vec::new(),
            waiting_per_peer: HashMap::new(),
        }
    }

    /// Asks `gateway` about unknown mailboxes from now on, showing `cert`.
    pub(crate) fn ask(&mut self, gateway: GatewayAddr, cert: RelayCert) {
        self.gateway = Some((gateway, cert));
    }

    /// `device` greeted this relay with a valid session certificate.
    pub(crate) fn greeted(&mut self, device: PeerId) {
        self.remember(device, Standing::Exists, Instant::now());
    }

    /// `device`'s session was revoked: ask about it again before its next envelope.
    pub(crate) fn forget(&mut self, device: &PeerId) {
        self.known.remove(device);
        if self.pending.contains(device) {
            self.revoked_while_asking.insert(*device);
        }
    }

    /// Sorts `envelopes` by whether their mailboxes exist.
    pub(crate) fn sort(&mut self, envelopes: Vec<Envelope>) -> Sorted {
        if self.gateway.is_none() {
            return Sorted::Known { existing: envelopes, missing: Vec::new() };
        }
        let now = Instant::now();
        let away = self.away_until.is_some_and(|until| now < until);
        let mut unknown = Vec::new();
        for envelope in envelopes.iter().filter(|e| !is_group_mailbox(&e.to_device)) {
            let device = envelope.to_device;
            if self.standing(&device, now).is_some() || unknown.contains(&device) {
                continue;
            }
            if away && !self.pending.contains(&device) {
                self.remember(device, Standing::Unverified, now);
            } else {
                unknown.push(device);
            }
        }
        if !unknown.is_empty() {
            return Sorted::Unknown { envelopes, devices: unknown };
        }
        let mut missing = Vec::new();
        let existing = envelopes
            .into_iter()
            .filter(|e| match self.standing(&e.to_device, now) {
                Some(Standing::Missing) if !is_group_mailbox(&e.to_device) => {
                    if !missing.contains(&e.to_device) {
                        missing.push(e.to_device);
                    }
                    false
                }
                _ => true,
            })
            .collect();
        Sorted::Known { existing, missing }
    }

    /// Keeps `request` until the gateway said whether `devices` (from [`Sorted::Unknown`])
    /// exist, queueing them to be asked about; refuses it (retryable) when too many requests
    /// or devices wait, in all or from its peer.
    pub(crate) fn wait(&mut self, request: Waiting, devices: Vec<PeerId>) {
        let peer = request.peer();
        // A client is held to its share; relays pass on what their clients sent.
        let from_peer = self.waiting_per_peer.get(&peer).copied().unwrap_or(0);
        let over_share = matches!(request, Waiting::Send { .. }) && from_peer >= MAX_WAITING_PER_PEER;
        if self.waiting.len() >= MAX_WAITING || over_share || !self.queue(&devices) {
            return request.refuse(busy_asking_gateway());
        }
        *self.waiting_per_peer.entry(peer).or_default() += 1;
        self.waiting.push(Parked { request, devices, since: Instant::now() });
    }

    /// Queues those of `devices` not pending yet to be asked about; `false` (and nothing
    /// queued) when that would make too many.
    fn queue(&mut self, devices: &[PeerId]) -> bool {
        let new: Vec<PeerId> = devices.iter().filter(|d| !self.pending.contains(d)).copied().collect();
        if self.wanted.len() + new.len() > MAX_WANTED {
            return false;
        }
        self.pending.extend(new.iter().copied());
        self.wanted.extend(new);
        true
    }

    /// Sends the next question, if devices are wanted and none is under way.
    pub(crate) fn send_question(&mut self, client: &mut GatewayClient) {
        if self.asking.is_some() {
            return;
        }
        let Some(devices) = self.next_question() else { return };
        let Some((gateway, cert)) = &self.gateway else { return };
        let request = AuthRequest::DevicesExist { devices: devices.clone(), relay_cert: cert.clone() };
        let id = client.send_request_with_addresses(&gateway.peer, Ok(request), gateway.addrs.clone());
        self.asking = Some(Question { id, devices, sent: Instant::now() });
    }

    /// The devices to ask about next, taken off the wanted list (they stay pending).
    fn next_question(&mut self) -> Option<Vec<PeerId>> {
        if self.gateway.is_none() || self.wanted.is_empty() {
            return None;
        }
        let take = self.wanted.len().min(MAX_DEVICES_PER_QUESTION);
        Some(self.wanted.drain(..take).collect())
    }

    /// Takes the gateway's answer to the question under way (or its failure): the requests
    /// that can now be served again. `None`: the event is not about the question.
    pub(crate) fn answered(&mut self, event: &GatewayEvent) -> Option<Released> {
        let (request_id, outcome) = match event {
            request_response::Event::Message {
                message: request_response::Message::Response { request_id, response },
                ..
            } => (*request_id, Ok(response)),
            request_response::Event::OutboundFailure { request_id, error, .. } => (*request_id, Err(error.to_string())),
            _ => return None,
        };
        if self.asking.as_ref().map(|q| q.id) != Some(request_id) {
            return None;
        }
        let question = self.asking.take().expect("invariant: matched just above");
        let now = Instant::now();
        self.settle(question.devices, outcome, now);
        Some(self.release(now))
    }

    /// Gives up on a question past its deadline (a late answer is then ignored), and on
    /// requests that waited too long.
    pub(crate) fn tick(&mut self) -> Released {
        let now = Instant::now();
        if let Some(question) = self.asking.take_if(|q| now.duration_since(q.sent) >= QUESTION_DEADLINE) {
            self.settle(question.devices, Err(format!("no answer within {QUESTION_DEADLINE:?}")), now);
        }
        self.release(now)
    }

    /// Takes what the gateway said about `asked` (or why it could not).
    fn settle(&mut self, asked: Vec<PeerId>, outcome: Result<&AuthResponse, String>, now: Instant) {
        for device in &asked {
            self.pending.remove(device);
        }
        let revoked: HashSet<PeerId> = asked.iter().filter(|d| self.revoked_while_asking.remove(d)).copied().collect();
        match outcome {
            Ok(AuthResponse::Devices { existing }) => {
                self.away_until = None;
                let existing: HashSet<&PeerId> = existing.iter().collect();
                for device in asked {
                    let exists = existing.contains(&device) && !revoked.contains(&device);
                    self.remember(device, if exists { Standing::Exists } else { Standing::Missing }, now);
                }
            }
            Ok(other) => self.failed(asked, &format!("unexpected answer {other:?}"), now),
            Err(e) => self.failed(asked, &e, now),
        }
    }

    /// The gateway could not say: `asked` are taken as existing for now, and so is every new
    /// mailbox for a while.
    fn failed(&mut self, asked: Vec<PeerId>, why: &str, now: Instant) {
        if self.away_until.is_none_or(|until| now >= until) {
            tracing::warn!(
                error = %why,
                "could not ask the gateway which devices exist; taking new mailboxes unchecked for {AWAY_FOR:?}"
            );
        }
        self.away_until = Some(now + AWAY_FOR);
        for device in asked {
            self.remember(device, Standing::Unverified, now);
        }
    }

    /// The waiting requests none of whose devices is still to be asked about (to serve again
    /// from the start, which asks anew about any whose standing has lapsed meanwhile), and
    /// those that waited too long.
    fn release(&mut self, now: Instant) -> Released {
        let mut released = Released::default();
        for parked in std::mem::take(&mut self.waiting) {
            let done = !parked.devices.iter().any(|d| self.pending.contains(d));
            if !done && now.duration_since(parked.since) < MAX_WAIT {
                self.waiting.push(parked);
                continue;
            }
            let peer = parked.request.peer();
            if let Some(count) = self.waiting_per_peer.get_mut(&peer) {
                *count -= 1;
                if *count == 0 {
                    self.waiting_per_peer.remove(&peer);
                }
            }
            match done {
                true => released.ready.push(parked.request),
                false => released.too_late.push(parked.request),
            }
        }
        released
    }

    fn standing(&self, device: &PeerId, now: Instant) -> Option<Standing> {
        self.known.get(device).filter(|(_, until)| now < *until).map(|(standing, _)| *standing)
    }

    fn remember(&mut self, device: PeerId, standing: Standing, now: Instant) {
        if self.known.len() >= MAX_REMEMBERED {
            self.known.retain(|_, (_, until)| now < *until);
            if self.known.len() > MAX_REMEMBERED / 4 * 3 {
                self.known.clear();
            }
        }
        let lasts = match standing {
            Standing::Exists => EXISTS_FOR,
            Standing::Missing => MISSING_FOR,
            Standing::Unverified => UNVERIFIED_FOR,
        };
        self.known.insert(device, (standing, now + lasts));
    }
}

#[cfg(test)]
mod tests {
    use libp2p::identity::ed25519;
    use meshgram_node::crypto::cert::unix_now;

    use super::*;

    fn envelope(to: PeerId) -> Envelope {
        crate::store::tests::envelope(to, 0)
    }

    fn asking() -> Devices {
        let gateway = ed25519::Keypair::generate();
        let cert = RelayCert::issue(&gateway, PeerId::random(), 1, unix_now());
        let mut devices = Devices::new();
        devices.ask(GatewayAddr { peer: PeerId::random(), addrs: Vec::new() }, cert);
        devices
    }

    /// Sorts `batch`, expecting unknown mailboxes, and queues them as [`Devices::wait`] does.
    fn unknown(devices: &mut Devices, batch: Vec<Envelope>) -> (Vec<Envelope>, Vec<PeerId>) {
        let Sorted::Unknown { envelopes, devices: unknown } = devices.sort(batch) else { panic!("unknown mailboxes") };
        assert!(devices.queue(&unknown));
        (envelopes, unknown)
    }

    fn known(devices: &mut Devices, batch: Vec<Envelope>) -> (Vec<PeerId>, Vec<PeerId>) {
        let Sorted::Known { existing, missing } = devices.sort(batch) else { panic!("every mailbox known") };
        (existing.iter().map(|e| e.to_device).collect(), missing)
    }

    #[test]
    fn without_a_gateway_every_mailbox_is_taken() {
        let mut devices = Devices::new();
        assert_eq!(known(&mut devices, vec![envelope(PeerId::random())]).1, vec![]);
    }

    #[test]
    fn unknown_mailboxes_wait_for_the_gateway_and_missing_ones_are_sorted_out() {
        let mut devices = asking();
        let (real, made_up, greeted) = (PeerId::random(), PeerId::random(), PeerId::random());
        devices.greeted(greeted);
        let batch = vec![envelope(real), envelope(made_up), envelope(real), envelope(greeted)];
        let (batch, waits_on) = unknown(&mut devices, batch);
        assert_eq!(waits_on, vec![real, made_up], "each unknown device once; the greeted one is known");
        // One question; a request for a device under question waits on it, not on another one.
        let asked = devices.next_question().unwrap();
        assert_eq!(asked, vec![real, made_up]);
        let (_, again) = unknown(&mut devices, vec![envelope(real)]);
        assert_eq!(again, vec![real]);
        assert_eq!(devices.next_question(), None, "not asked twice");
        devices.settle(asked, Ok(&AuthResponse::Devices { existing: vec![real] }), Instant::now());
        assert!(devices.pending.is_empty());
        assert_eq!(known(&mut devices, batch), (vec![real, real, greeted], vec![made_up]));
        // A revoked device is asked about again.
        devices.forget(&real);
        unknown(&mut devices, vec![envelope(real)]);
    }

    #[test]
    fn a_revocation_while_asking_outweighs_the_answer() {
        let mut devices = asking();
        let device = PeerId::random();
        unknown(&mut devices, vec![envelope(device)]);
        let asked = devices.next_question().unwrap();
        devices.forget(&device);
        devices.settle(asked, Ok(&AuthResponse::Devices { existing: vec![device] }), Instant::now());
        assert_eq!(known(&mut devices, vec![envelope(device)]), (vec![], vec![device]));
    }

    #[test]
    fn a_gateway_that_cannot_answer_is_no_verdict() {
        let mut devices = asking();
        let (first, later) = (PeerId::random(), PeerId::random());
        let (batch, _) = unknown(&mut devices, vec![envelope(first)]);
        let asked = devices.next_question().unwrap();
        devices.settle(asked, Err("dial failure".into()), Instant::now());
        assert_eq!(known(&mut devices, batch), (vec![first], vec![]), "taken for now");
        // While the gateway is away, new mailboxes are taken without a wait.
        assert_eq!(known(&mut devices, vec![envelope(later)]), (vec![later], vec![]));
        assert_eq!(devices.next_question(), None);
    }

    #[test]
    fn devices_to_ask_about_are_bounded() {
        let mut devices = asking();
        let many: Vec<PeerId> = (0..MAX_WANTED).map(|_| PeerId::random()).collect();
        assert!(devices.queue(&many));
        assert!(!devices.queue(&[PeerId::random()]), "one more is refused");
        assert!(devices.queue(&many[..10]), "those already pending cost nothing");
    }
}
