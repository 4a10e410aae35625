//! Which device mailboxes exist: a relay keeps envelopes only for devices the gateway has a
//! session for, so nobody can make a relay hold data for made-up mailboxes (any peer id would
//! otherwise do, and fill disks no real device ever drains).
//!
//! A relay learns that a device exists when it greets it (`Hello` with a valid session
//! certificate) or when it asks the gateway (`AuthRequest::DevicesExist`, showing its relay
//! certificate), before the first envelope for a mailbox it knows nothing of. A request with
//! such envelopes waits here until the answer comes, then is served again from the start
//! (its session and everything else checked anew). Answers are kept for a while
//! ([`EXISTS_FOR`], [`MISSING_FOR`]); a revoked session's device is forgotten at once.
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
use meshgram_node::proto::{AuthRequest, AuthResponse, MAX_DEVICES_PER_QUESTION, MailboxResponse, ReplicaResponse};

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
/// Requests waiting for an answer; past it, new ones are told to retry (`FLOOD_WAIT`).
const MAX_WAITING: usize = 4096;
/// Devices remembered; past it the memory starts over (and asks again).
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
    fn envelopes(&self) -> &[Envelope] {
        match self {
            Waiting::Send { envelopes, .. } | Waiting::Store { envelopes, .. } => envelopes,
        }
    }
}

/// Envelopes sorted by whether their mailbox exists.
#[derive(Debug)]
pub(crate) enum Sorted {
    /// Every mailbox is known: those of devices that exist (and groups', which are checked
    /// otherwise), and the devices that do not.
    Known { existing: Vec<Envelope>, missing: Vec<PeerId> },
    /// Some mailboxes are not known yet: the gateway is being asked; wait with them.
    Unknown(Vec<Envelope>),
}

/// The relay's knowledge of which devices exist, and its questions to the gateway.
#[derive(Debug)]
pub(crate) struct Devices {
    /// Whom to ask, and with what certificate; `None` without `--gateway`.
    gateway: Option<(GatewayAddr, RelayCert)>,
    known: HashMap<PeerId, (Standing, Instant)>,
    /// Devices to ask about, in order, without repeats.
    wanted: Vec<PeerId>,
    wanted_set: HashSet<PeerId>,
    /// The question under way, the devices it asks about, and when it was sent.
    in_flight: Option<(OutboundRequestId, Vec<PeerId>, Instant)>,
    /// Until when the gateway is taken for away (a question failed).
    away_until: Option<Instant>,
    waiting: Vec<Waiting>,
}

impl Devices {
    /// Takes every mailbox until [`Devices::ask`] is given a gateway.
    pub(crate) fn new() -> Self {
        Devices {
            gateway: None,
            known: HashMap::new(),
            wanted: Vec::new(),
            wanted_set: HashSet::new(),
            in_flight: None,
            away_until: None,
            waiting: Vec::new(),
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
    }

    /// Sorts `envelopes` by whether their mailboxes exist; unknown ones are queued for the
    /// next question.
    pub(crate) fn sort(&mut self, envelopes: Vec<Envelope>) -> Sorted {
        if self.gateway.is_none() {
            return Sorted::Known { existing: envelopes, missing: Vec::new() };
        }
        let now = Instant::now();
        let away = self.away_until.is_some_and(|until| now < until);
        let mut unknown = false;
        for envelope in envelopes.iter().filter(|e| !is_group_mailbox(&e.to_device)) {
            if self.standing(&envelope.to_device, now).is_some() {
                continue;
            }
            if away {
                self.remember(envelope.to_device, Standing::Unverified, now);
            } else {
                unknown = true;
                if self.wanted_set.insert(envelope.to_device) {
                    self.wanted.push(envelope.to_device);
                }
            }
        }
        if unknown {
            return Sorted::Unknown(envelopes);
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

    /// Keeps `request` until its mailboxes are known; gives it back when too many wait.
    pub(crate) fn wait(&mut self, request: Waiting) -> Result<(), Waiting> {
        if self.waiting.len() >= MAX_WAITING {
            return Err(request);
        }
        self.waiting.push(request);
        Ok(())
    }

    /// Sends the next question, if devices are wanted and none is under way.
    pub(crate) fn send_question(&mut self, client: &mut GatewayClient) {
        if self.in_flight.is_some() {
            return;
        }
        let Some(devices) = self.next_question() else { return };
        let Some((gateway, cert)) = &self.gateway else { return };
        let request = AuthRequest::DevicesExist { devices: devices.clone(), relay_cert: cert.clone() };
        let id = client.send_request_with_addresses(&gateway.peer, Ok(request), gateway.addrs.clone());
        self.in_flight = Some((id, devices, Instant::now()));
    }

    /// The devices to ask about next, taken off the wanted list.
    fn next_question(&mut self) -> Option<Vec<PeerId>> {
        if self.gateway.is_none() || self.wanted.is_empty() {
            return None;
        }
        let take = self.wanted.len().min(MAX_DEVICES_PER_QUESTION);
        let devices: Vec<PeerId> = self.wanted.drain(..take).collect();
        for device in &devices {
            self.wanted_set.remove(device);
        }
        Some(devices)
    }

    /// Takes the gateway's answer to the question under way (or its failure): the requests
    /// that can now be served again. `None`: the event is not about the question.
    pub(crate) fn answered(&mut self, event: &GatewayEvent) -> Option<Vec<Waiting>> {
        let (request_id, outcome) = match event {
            request_response::Event::Message {
                message: request_response::Message::Response { request_id, response },
                ..
            } => (*request_id, Ok(response)),
            request_response::Event::OutboundFailure { request_id, error, .. } => (*request_id, Err(error.to_string())),
            _ => return None,
        };
        if self.in_flight.as_ref().map(|(id, ..)| *id) != Some(request_id) {
            return None;
        }
        let (_, asked, _) = self.in_flight.take().expect("invariant: matched just above");
        Some(self.settle(asked, outcome, Instant::now()))
    }

    /// Takes what the gateway said about `asked` (or why it could not); returns the requests
    /// that can now be served again.
    fn settle(&mut self, asked: Vec<PeerId>, outcome: Result<&AuthResponse, String>, now: Instant) -> Vec<Waiting> {
        match outcome {
            Ok(AuthResponse::Devices { existing }) => {
                self.away_until = None;
                let existing: HashSet<&PeerId> = existing.iter().collect();
                for device in asked {
                    let standing = if existing.contains(&device) { Standing::Exists } else { Standing::Missing };
                    self.remember(device, standing, now);
                }
            }
            Ok(other) => self.failed(asked, &format!("unexpected answer {other:?}"), now),
            Err(e) => self.failed(asked, &e, now),
        }
        self.ready(now)
    }

    /// Gives up on a question past its deadline (a late answer is then ignored); returns the
    /// requests that can now be served again.
    pub(crate) fn tick(&mut self) -> Vec<Waiting> {
        let now = Instant::now();
        match self.in_flight.take() {
            Some((_, asked, sent)) if now.duration_since(sent) >= QUESTION_DEADLINE => {
                self.failed(asked, &format!("no answer within {QUESTION_DEADLINE:?}"), now);
                self.ready(now)
            }
            in_flight => {
                self.in_flight = in_flight;
                Vec::new()
            }
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

    /// The waiting requests whose mailboxes are all known now.
    fn ready(&mut self, now: Instant) -> Vec<Waiting> {
        let (ready, still): (Vec<Waiting>, Vec<Waiting>) =
            std::mem::take(&mut self.waiting).into_iter().partition(|w| self.all_known(w.envelopes(), now));
        self.waiting = still;
        ready
    }

    fn all_known(&self, envelopes: &[Envelope], now: Instant) -> bool {
        envelopes.iter().all(|e| is_group_mailbox(&e.to_device) || self.standing(&e.to_device, now).is_some())
    }

    fn standing(&self, device: &PeerId, now: Instant) -> Option<Standing> {
        self.known.get(device).filter(|(_, until)| now < *until).map(|(standing, _)| *standing)
    }

    fn remember(&mut self, device: PeerId, standing: Standing, now: Instant) {
        if self.known.len() >= MAX_REMEMBERED {
            self.known.retain(|_, (_, until)| now < *until);
            if self.known.len() >= MAX_REMEMBERED {
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

    #[test]
    fn without_a_gateway_every_mailbox_is_taken() {
        let mut devices = Devices::new();
        let Sorted::Known { existing, missing } = devices.sort(vec![envelope(PeerId::random())]) else {
            panic!("nothing to ask without a gateway")
        };
        assert_eq!((existing.len(), missing.len()), (1, 0));
    }

    #[test]
    fn unknown_mailboxes_wait_for_the_gateway_and_missing_ones_are_sorted_out() {
        let mut devices = asking();
        let (real, made_up, greeted) = (PeerId::random(), PeerId::random(), PeerId::random());
        devices.greeted(greeted);
        let batch = vec![envelope(real), envelope(made_up), envelope(real), envelope(greeted)];
        let Sorted::Unknown(batch) = devices.sort(batch) else { panic!("two mailboxes are unknown") };
        assert!(!devices.all_known(&batch, Instant::now()));
        // One question, each device once; the greeted one is known already.
        let asked = devices.next_question().unwrap();
        assert_eq!(asked, vec![real, made_up]);
        assert_eq!(devices.next_question(), None);
        let answer = AuthResponse::Devices { existing: vec![real] };
        devices.settle(asked, Ok(&answer), Instant::now());
        assert!(devices.all_known(&batch, Instant::now()), "the waiting request is served again");
        let Sorted::Known { existing, missing } = devices.sort(batch) else { panic!("all known now") };
        assert_eq!(existing.iter().map(|e| e.to_device).collect::<Vec<_>>(), vec![real, real, greeted]);
        assert_eq!(missing, vec![made_up]);
        // A revoked device is asked about again.
        devices.forget(&real);
        assert!(matches!(devices.sort(vec![envelope(real)]), Sorted::Unknown(_)));
    }

    #[test]
    fn a_gateway_that_cannot_answer_is_no_verdict() {
        let mut devices = asking();
        let (first, later) = (PeerId::random(), PeerId::random());
        let Sorted::Unknown(batch) = devices.sort(vec![envelope(first)]) else { panic!("unknown") };
        let asked = devices.next_question().unwrap();
        devices.settle(asked, Err("dial failure".into()), Instant::now());
        assert!(devices.all_known(&batch, Instant::now()), "served once the question failed");
        let Sorted::Known { existing, missing } = devices.sort(batch) else { panic!("taken for now") };
        assert_eq!((existing.len(), missing.len()), (1, 0));
        // While the gateway is away, new mailboxes are taken without a wait.
        assert!(matches!(devices.sort(vec![envelope(later)]), Sorted::Known { .. }));
        assert_eq!(devices.next_question(), None);
    }
}
