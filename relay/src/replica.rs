//! Serving other relays' replica requests: `Hello` (exchange relay certificates), then `Store`
//! and `Delete`, repair's `Digests` and `Reconcile` ([`crate::repair`]), and media's
//! `StoreChunk`, `RecordPart`, `UploadStatus`, `GetChunk` and `HasChunks` ([`crate::media`]),
//! only from relays that showed a gateway-signed relay certificate on their connection
//! ([`crate::relays`] keeps who did). The calling side is [`crate::replicate`]. Nothing a
//! caller says is taken on trust: a chunk's hash and a record's fields are checked again here.

use std::collections::HashSet;

use libp2p::PeerId;
use libp2p::identity::ed25519;
use meshgram_node::crypto::cert::{CERT_CLOCK_SKEW_SECS, RelayCert, unix_now};
use meshgram_node::net::codec::FrameError;
use meshgram_node::net::pipe::Responder;
use meshgram_node::proto::envelope::{Envelope, EnvelopeId};
use meshgram_node::proto::media::{MAX_CHUNK_SIZE, MAX_HASHES_PER_REQUEST};
use meshgram_node::proto::{
    ErrorCode, MAX_ACKS_PER_DELETE, MAX_DIGESTS_PER_REQUEST, ReplicaRequest, ReplicaResponse, WireError,
};
use tokio::task::{JoinError, JoinSet};

use crate::devices::{Sorted, Waiting};
use crate::mailbox::{Mailboxes, store_failed};
use crate::media::MediaStore;
use crate::metrics::CertKind;
use crate::relays::Relays;
use crate::store::{IdState, StoreError, StoreHandle};

/// A finished replica request: answer the relay, first waking the fetches parked on `arrived`
/// (envelopes committed here).
#[derive(Debug)]
pub(crate) struct Done {
    pub(crate) channel: Responder<ReplicaResponse>,
    pub(crate) response: ReplicaResponse,
    pub(crate) arrived: Vec<PeerId>,
}

impl Done {
    fn answer(channel: Responder<ReplicaResponse>, response: ReplicaResponse) -> Self {
        Done { channel, response, arrived: Vec::new() }
    }
}

/// Serves the replica protocol, with the tasks that commit what it is asked to.
#[derive(Debug)]
pub(crate) struct ReplicaServer {
    gateway_key: ed25519::PublicKey,
    /// This relay's certificate, shown in answer to a `Hello`.
    cert: RelayCert,
    store: StoreHandle,
    media: MediaStore,
    tasks: JoinSet<Done>,
}

impl ReplicaServer {
    pub(crate) fn new(gateway_key: ed25519::PublicKey, cert: RelayCert, store: StoreHandle, media: MediaStore) -> Self {
        ReplicaServer { gateway_key, cert, store, media, tasks: JoinSet::new() }
    }

    /// The next request to finish; `None` when none is under way.
    pub(crate) async fn next_done(&mut self) -> Option<Result<Done, JoinError>> {
        self.tasks.join_next().await
    }

    /// Stops and waits for the tasks.
    pub(crate) async fn shutdown(&mut self) {
        self.tasks.shutdown().await;
    }

    /// Serves one replica request from `peer`. A `Store` of envelopes this relay keeps is
    /// queued through `mailboxes`, so that fetches parked here see it at once.
    pub(crate) fn handle(
        &mut self,
        peer: PeerId,
        request: Result<ReplicaRequest, FrameError>,
        channel: Responder<ReplicaResponse>,
        relays: &mut Relays,
        mailboxes: &mut Mailboxes,
    ) {
        let refuse = |code, message: String| ReplicaResponse::Error(WireError::new(code, message));
        let now = unix_now();
        match request {
            Err(e) => channel.respond(ReplicaResponse::Error(WireError::for_frame(&e))),
            Ok(ReplicaRequest::Hello { .. }) if relays.is_revoked(&peer) => channel.respond(refuse(
                ErrorCode::CertInvalid,
                "the gateway revoked this relay's admission; it may not store or delete replicas".into(),
            )),
            Ok(ReplicaRequest::Hello { cert }) => {
                let verified = cert.verify_for(&self.gateway_key, &peer, now);
                self.media.metrics.count_cert_check(CertKind::Relay, verified.is_ok());
                let response = match verified {
                    Ok(body) => {
                        relays.certified(peer, body.not_after.saturating_add(CERT_CLOCK_SKEW_SECS));
                        ReplicaResponse::Welcome { cert: self.cert.clone() }
                    }
                    Err(e) => refuse(ErrorCode::CertInvalid, format!("relay {e}")),
                };
                channel.respond(response);
            }
            Ok(_) if !relays.is_certified(&peer, now) => channel.respond(not_certified()),
            Ok(ReplicaRequest::Store { envelopes }) => self.store(peer, channel, envelopes, None, now, mailboxes),
            Ok(ReplicaRequest::StoreUntil { envelopes, expires_at }) => {
                self.store(peer, channel, envelopes, Some(expires_at), now, mailboxes);
            }
            Ok(ReplicaRequest::Digests { mailboxes }) => {
                if mailboxes.len() > MAX_DIGESTS_PER_REQUEST {
                    return channel.respond(refuse(
                        ErrorCode::BadRequest,
                        format!("at most {MAX_DIGESTS_PER_REQUEST} digests per request"),
                    ));
                }
                let store = self.store.clone();
                self.tasks.spawn_blocking(move || {
                    let differ = mailboxes
                        .into_iter()
                        .filter(|theirs| match store.digest(&theirs.mailbox) {
                            Ok(ours) => ours != theirs.digest,
                            // Unreadable here: say it differs, and the caller asks again in detail.
                            Err(_) => true,
                        })
                        .map(|digest| digest.mailbox)
                        .collect();
                    Done::answer(channel, ReplicaResponse::Differ { mailboxes: differ })
                });
            }
            Ok(ReplicaRequest::Reconcile { mailbox, held }) => self.reconcile(channel, mailbox, held, false),
            Ok(ReplicaRequest::ReconcileProven { mailbox, held }) => self.reconcile(channel, mailbox, held, true),
            Ok(
                request @ (ReplicaRequest::StoreChunk { .. }
                | ReplicaRequest::RecordPart { .. }
                | ReplicaRequest::UploadStatus { .. }
                | ReplicaRequest::GetChunk { .. }
                | ReplicaRequest::HasChunks { .. }
                | ReplicaRequest::CheckPart { .. }
                | ReplicaRequest::DeleteChunks { .. }),
            ) => self.media(channel, request),
            Ok(ReplicaRequest::GroupFetch { groups, max, wait_ms }) => {
                mailboxes.handle_mirror_read(peer, groups, max, wait_ms, channel);
            }
            Ok(ReplicaRequest::Delete { .. }) => channel.respond(refuse(
                ErrorCode::Forbidden,
                "a replica delete must carry the recipient's signed acknowledgement (DeleteAcked)".into(),
            )),
            Ok(ReplicaRequest::DeleteAcked { acks }) => {
                if acks.is_empty() || acks.len() > MAX_ACKS_PER_DELETE {
                    let why = format!("1 to {MAX_ACKS_PER_DELETE} acknowledgements per DeleteAcked");
                    return channel.respond(refuse(ErrorCode::BadRequest, why));
                }
                let store = self.store.clone();
                self.tasks.spawn(async move {
                    // Checked off the event loop; all or nothing, so that a relay passing on a
                    // forged one learns it at once.
                    let checked = tokio::task::spawn_blocking(move || {
                        acks.into_iter().map(|ack| ack.verify().map(|()| ack)).collect::<Result<Vec<_>, _>>()
                    })
                    .await;
                    let acks = match checked {
                        Ok(Ok(acks)) => acks,
                        Ok(Err(e)) => return Done::answer(channel, refuse(ErrorCode::Forbidden, e.to_string())),
                        Err(e) => return Done::answer(channel, refuse(ErrorCode::Internal, e.to_string())),
                    };
                    let mut count = 0;
                    for ack in acks {
                        match store.delete_acked(ack).await {
                            Ok(deleted) => count += deleted,
                            Err(e) => return Done::answer(channel, ReplicaResponse::Error(store_error(&e))),
                        }
                    }
                    Done::answer(channel, ReplicaResponse::Deleted { count })
                });
            }
        }
    }

    /// A media request from another relay, on a task.
    /// `Reconcile`, or with `proven` `ReconcileProven`, on a blocking task: which of `held` this
    /// relay never had, and which it delivered (as the recipients' signed acknowledgements kept
    /// for them, if `proven`).
    fn reconcile(&mut self, channel: Responder<ReplicaResponse>, mailbox: PeerId, held: Vec<EnvelopeId>, proven: bool) {
        let store = self.store.clone();
        self.tasks.spawn_blocking(move || {
            let answer = store.states(&mailbox, &held).and_then(|states| {
                let (mut wanted, mut delivered) = (Vec::new(), Vec::new());
                for (id, state) in held.into_iter().zip(states) {
                    match state {
                        IdState::Unknown => wanted.push(id),
                        IdState::Delivered => delivered.push(id),
                        IdState::Held => {}
                    }
                }
                Ok(if proven {
                    ReplicaResponse::ReconciledProven { wanted, proofs: store.delivery_proofs(&mailbox, &delivered)? }
                } else {
                    ReplicaResponse::Reconciled { wanted, delivered }
                })
            });
            let refusal = |e: StoreError| ReplicaResponse::Error(WireError::new(ErrorCode::Internal, e.to_string()));
            Done::answer(channel, answer.unwrap_or_else(refusal))
        });
    }

    fn media(&mut self, channel: Responder<ReplicaResponse>, request: ReplicaRequest) {
        let media = self.media.clone();
        self.tasks.spawn(async move {
            let response = serve_media(&media, request).await.unwrap_or_else(ReplicaResponse::Error);
            Done::answer(channel, response)
        });
    }

    /// A `Store` that waited for the gateway's word on its mailboxes, served again (the
    /// relay's standing checked anew).
    pub(crate) fn resume_store(
        &mut self,
        peer: PeerId,
        envelopes: Vec<Envelope>,
        until: Option<u64>,
        channel: Responder<ReplicaResponse>,
        relays: &Relays,
        mailboxes: &mut Mailboxes,
    ) {
        let now = unix_now();
        if !relays.is_certified(&peer, now) {
            return channel.respond(not_certified());
        }
        self.store(peer, channel, envelopes, until, now, mailboxes);
    }

    /// A `Store` (or repair's `StoreUntil`, kept no longer than `until`): queued through
    /// `mailboxes`, so that fetches parked here see it at once, and answered once committed.
    fn store(
        &mut self,
        peer: PeerId,
        channel: Responder<ReplicaResponse>,
        envelopes: Vec<Envelope>,
        until: Option<u64>,
        now: u64,
        mailboxes: &mut Mailboxes,
    ) {
        let refuse = |code, message: String| ReplicaResponse::Error(WireError::new(code, message));
        // Checked as a client's send is, but for the sender (which only the entry relay, on its
        // connection, can check).
        if let Err(refusal) = crate::mailbox::check_envelope_shapes(&envelopes) {
            return channel.respond(ReplicaResponse::Error(refusal));
        }
        // The copy it repairs has expired (perhaps while it waited here): nothing to keep.
        if until.is_some_and(|until| until <= now) {
            let duplicates = envelopes.into_iter().map(|e| e.id).collect();
            return channel.respond(ReplicaResponse::Stored { duplicates });
        }
        // A repaired copy lives no longer than a fresh one would.
        let until = until.map(|until| until.min(now.saturating_add(self.store.ttl().as_secs())));
        if let Some(why) = self.store.failure() {
            return channel.respond(refuse(ErrorCode::Unavailable, store_failed(why)));
        }
        // A new group message is checked by each relay that keeps it, against the newest epoch
        // it knows; a repaired one (`until`) was checked when first stored.
        if until.is_none()
            && let Err(refusal) = mailboxes.check_group_posts(&envelopes)
        {
            return channel.respond(ReplicaResponse::Error(refusal));
        }
        // Only for devices that exist.
        let envelopes = match mailboxes.devices.sort(envelopes) {
            Sorted::Unknown { envelopes, devices } => {
                return mailboxes.devices.wait(Waiting::Store { peer, envelopes, until, channel }, devices);
            }
            // Every copy or none: the entry relay found these devices, so this is a race with
            // a sign-out (or its word against the gateway's). Refused, the copy goes to the
            // next relay, or the send is retried, and the race has ended by then.
            Sorted::Known { missing, .. } if !missing.is_empty() => {
                mailboxes.count_missing(missing.len());
                let why = format!("no such device: {} (signed out, or never signed in)", missing[0]);
                return channel.respond(ReplicaResponse::Error(WireError::new(ErrorCode::NotFound, why)));
            }
            Sorted::Known { existing, .. } => existing,
        };
        let (store, put) = (self.store.clone(), mailboxes.put_and_push(&envelopes, now, until));
        self.tasks.spawn(async move {
            let mailboxes: HashSet<PeerId> = envelopes.iter().map(|e| e.to_device).collect();
            let outcome = match put {
                Some(queued) => queued.outcome().await,
                None => store.put(envelopes, now, until).await,
            };
            match outcome {
                Ok(outcome) if !outcome.over_quota.is_empty() => {
                    Done::answer(channel, refuse(ErrorCode::QuotaExceeded, crate::store::OVER_QUOTA.into()))
                }
                Ok(outcome) => Done {
                    channel,
                    response: ReplicaResponse::Stored { duplicates: outcome.duplicates },
                    arrived: mailboxes.into_iter().collect(),
                },
                Err(e) => Done::answer(channel, ReplicaResponse::Error(store_error(&e))),
            }
        });
    }
}

/// The answer to a replica request from a peer that showed no relay certificate here.
fn not_certified() -> ReplicaResponse {
    let why = "say Hello with a gateway-signed relay certificate first";
    ReplicaResponse::Error(WireError::new(ErrorCode::CertInvalid, why))
}

/// A failed write, as a replica request's refusal.
pub(crate) fn store_error(e: &StoreError) -> WireError {
    WireError::new(store_error_code(e), e.to_string())
}

/// How a failed write is answered: a store that takes no more writes is a relay to skip
/// (`UNAVAILABLE`), anything else an internal error.
pub(crate) fn store_error_code(e: &StoreError) -> ErrorCode {
    match e {
        // (The second only comes from opening a store, never from a write.)
        StoreError::Failed(_) | StoreError::DiskTakesNoWrites { .. } => ErrorCode::Unavailable,
        StoreError::Db(_) | StoreError::Log(_) | StoreError::Stopped => ErrorCode::Internal,
    }
}

/// Answers a media request from another relay.
async fn serve_media(media: &MediaStore, request: ReplicaRequest) -> Result<ReplicaResponse, WireError> {
    match request {
        ReplicaRequest::StoreChunk { hash, bytes } => {
            if bytes.is_empty() || bytes.len() > MAX_CHUNK_SIZE {
                let message = format!("a chunk of {} bytes: chunks hold 1 to {MAX_CHUNK_SIZE} bytes", bytes.len());
                return Err(WireError::new(ErrorCode::BadRequest, message));
            }
            media.store_chunk(hash, bytes).await.map(|_| ReplicaResponse::ChunkStored)
        }
        ReplicaRequest::RecordPart { record } => media.record_part(record).await.map(|_| ReplicaResponse::PartRecorded),
        ReplicaRequest::CheckPart { record } => media.uploads.check(record).await.map(|_| ReplicaResponse::PartChecked),
        ReplicaRequest::UploadStatus { file_id } => Ok(match media.uploads.status(file_id).await? {
            Some(status) => ReplicaResponse::UploadStatus {
                owner: Some(status.owner),
                total_parts: status.total_parts,
                saved: status.saved,
                hashes: status.hashes,
            },
            None => {
                ReplicaResponse::UploadStatus { owner: None, total_parts: 0, saved: Vec::new(), hashes: Vec::new() }
            }
        }),
        ReplicaRequest::GetChunk { hash } => match media.chunk(hash).await? {
            Some(bytes) => Ok(ReplicaResponse::Chunk { bytes }),
            None => Err(WireError::new(ErrorCode::NotFound, format!("chunk {hash} is not held here"))),
        },
        ReplicaRequest::HasChunks { hashes } => {
            if hashes.len() > MAX_HASHES_PER_REQUEST {
                let message = format!("at most {MAX_HASHES_PER_REQUEST} hashes per request");
                return Err(WireError::new(ErrorCode::BadRequest, message));
            }
            let missing = media.chunks.missing(hashes).await.map_err(|e| e.wire())?;
            Ok(ReplicaResponse::MissingChunks { hashes: missing })
        }
        ReplicaRequest::DeleteChunks { hashes } => {
            if hashes.len() > MAX_HASHES_PER_REQUEST {
                let message = format!("at most {MAX_HASHES_PER_REQUEST} hashes per request");
                return Err(WireError::new(ErrorCode::BadRequest, message));
            }
            let count = media.delete_unnamed(hashes).await?;
            Ok(ReplicaResponse::ChunksDeleted { count })
        }
        _ => Err(WireError::new(ErrorCode::Internal, "not a media request")),
    }
}
