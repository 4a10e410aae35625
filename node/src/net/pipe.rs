//! Many requests over one long-lived libp2p stream (a "pipe"), answered in any order.
//!
//! Why not libp2p's request-response: it opens a new yamux stream per request (stream set-up,
//! protocol negotiation, a timer, close), and those costs, not the work, dominated a relay's CPU
//! per message. A pipe negotiates once per connection and then only moves frames; several
//! queued frames go out in one write.
//!
//! Frame: a 4-byte big-endian length (of what follows), an 8-byte big-endian tag chosen by the
//! caller, and the postcard-encoded message. The answer carries the request's tag. The tag sits
//! outside the message so that a request whose body is garbage still gets its `BAD_REQUEST`
//! answer and the pipe keeps going; a frame over the size limit gets its answer and then the
//! pipe closes (the rest of the stream cannot be trusted to be framed).
//!
//! Each side runs a reader task and a writer task, so neither direction can block the other.
//! Both are owned ([`PipeTasks`]): a calling pipe stops them when its last clone is dropped, an
//! answering pipe when whoever started serving it drops the handle [`serve`] returns.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::io::{ReadHalf, WriteHalf};
use futures::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use libp2p::{PeerId, Stream, StreamProtocol};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::net::codec::FrameError;
use crate::net::memory::{Held, MemoryBudget};
use crate::server::limits::RateLimiter;

/// Requests one pipe may have unanswered at a relay, by default; further requests wait in the
/// stream (back-pressure), which bounds the memory a single client can tie up. A request counts
/// until its answer is written, so a caller that does not read its answers stops being read.
pub const MAX_IN_FLIGHT: usize = 256;
/// How long a write may make no progress before the pipe is closed: a peer that stops reading
/// must not hold its answers (and their slots) in memory for good.
const WRITE_STALL: Duration = Duration::from_secs(30);
/// Queued frames are folded into one write up to this many bytes.
const WRITE_BATCH_BYTES: usize = 256 * 1024;
/// Frame header: length (4) and tag (8).
const HEADER: usize = 12;
/// Tries of a call whose pipe closed under it (see [`PipePool::call`]), and the pause before
/// the second (growing with each).
const CALL_ATTEMPTS: u32 = 6;
const RETRY_PAUSE: Duration = Duration::from_millis(25);

/// Size limits of one protocol, in message bytes (without the header).
#[derive(Debug, Clone, Copy)]
pub struct PipeLimits {
    pub max_request: usize,
    pub max_response: usize,
    /// Requests a caller may have unanswered (or answered but not yet written) at once.
    pub max_in_flight: usize,
    /// Bytes one served pipe may hold: request bodies and answers not yet written.
    pub max_memory: usize,
}

/// Why a call on a pipe got no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PipeError {
    #[error("could not open a stream: {0}")]
    Open(String),
    #[error("the stream closed: {0}")]
    Closed(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("request not sent: {0}")]
    Encode(String),
    #[error("the answer could not be read: {0}")]
    BadAnswer(String),
}

/// Appends one frame to `out`, the message encoded in place after its header (nothing is
/// appended if it cannot be).
fn encode<M: Serialize>(tag: u64, msg: &M, max: usize, out: &mut Vec<u8>) -> Result<(), FrameError> {
    /// Lets postcard append to a buffer it does not own.
    struct Tail<'a>(&'a mut Vec<u8>);
    impl Extend<u8> for Tail<'_> {
        fn extend<I: IntoIterator<Item = u8>>(&mut self, bytes: I) {
            self.0.extend(bytes);
        }
    }
    let start = out.len();
    out.extend_from_slice(&[0; HEADER]);
    if let Err(e) = postcard::to_extend(msg, Tail(out)) {
        out.truncate(start);
        return Err(FrameError::Malformed(e.to_string()));
    }
    let body_len = out.len() - start - HEADER;
    if body_len > max {
        out.truncate(start);
        return Err(FrameError::TooLarge { len: body_len, max });
    }
    out[start..start + 4].copy_from_slice(&((body_len + 8) as u32).to_be_bytes());
    out[start + 4..start + HEADER].copy_from_slice(&tag.to_be_bytes());
    Ok(())
}

/// One inbound frame: its tag and the decoded message, or why it is not one. `Err(TooLarge)`
/// means the stream can no longer be read.
async fn read_frame<M: DeserializeOwned, R: AsyncRead + Unpin>(
    io: &mut R,
    max: usize,
) -> io::Result<(u64, Result<M, FrameError>)> {
    let (tag, len) = read_header(io).await?;
    if len > max {
        return Ok((tag, Err(FrameError::TooLarge { len, max })));
    }
    let body = read_body(io, len, |_| {}).await?;
    Ok((tag, postcard::from_bytes(&body).map_err(|e| FrameError::Malformed(e.to_string()))))
}

/// Reads frames from `bytes` as a served pipe's reader would (with its limits), until they end
/// or one cannot be framed: the fuzz targets' way in.
#[doc(hidden)]
pub fn fuzz_read_frames<M: DeserializeOwned>(bytes: &[u8]) {
    let mut io = futures::io::Cursor::new(bytes);
    futures::executor::block_on(async {
        while let Ok((_, message)) = read_frame::<M, _>(&mut io, MAX_GREETING).await {
            if matches!(message, Err(FrameError::TooLarge { .. })) {
                break;
            }
        }
    });
}

/// A frame's header: its tag and the length of the message that follows.
async fn read_header<R: AsyncRead + Unpin>(io: &mut R) -> io::Result<(u64, usize)> {
    let mut header = [0u8; HEADER];
    io.read_exact(&mut header).await?;
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let Some(len) = len.checked_sub(8) else {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("frame of {len} bytes has no tag")));
    };
    Ok((u64::from_be_bytes(header[4..].try_into().unwrap_or_default()), len))
}

/// A message of `len` bytes, read in pieces as they arrive (a header alone allocates little);
/// `arriving` is told each piece's size before it is read.
async fn read_body<R: AsyncRead + Unpin>(
    io: &mut R,
    len: usize,
    mut arriving: impl FnMut(usize),
) -> io::Result<Vec<u8>> {
    const PIECE: usize = 64 * 1024;
    let mut body = Vec::with_capacity(len.min(PIECE));
    while body.len() < len {
        let piece = (len - body.len()).min(PIECE);
        arriving(piece);
        let start = body.len();
        body.resize(start + piece, 0);
        io.read_exact(&mut body[start..]).await?;
    }
    Ok(body)
}

/// Writes whatever is queued, in as few writes as it can; ends when the queue closes, the
/// stream fails, or a write makes no progress for [`WRITE_STALL`]. `next` turns a queued item
/// into frame bytes (or skips it), and may hand back something to keep until they are written.
async fn write_loop<T, Keep>(
    mut io: WriteHalf<Stream>,
    mut queue: mpsc::UnboundedReceiver<T>,
    mut next: impl FnMut(T, &mut Vec<u8>) -> Option<Keep>,
    mut written: impl FnMut(Keep),
) -> io::Result<()> {
    let mut buf = Vec::new();
    let mut kept = Vec::new();
    while let Some(item) = queue.recv().await {
        kept.extend(next(item, &mut buf));
        while buf.len() < WRITE_BATCH_BYTES {
            match queue.try_recv() {
                Ok(item) => kept.extend(next(item, &mut buf)),
                Err(_) => break,
            }
        }
        if !buf.is_empty() {
            let write = async {
                io.write_all(&buf).await?;
                io.flush().await
            };
            tokio::time::timeout(WRITE_STALL, write)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the peer reads nothing"))??;
            // An idle pipe holds no buffer (one large answer would otherwise keep its size
            // for the pipe's life); a busy one reuses it.
            if queue.is_empty() {
                buf = Vec::new();
            } else {
                buf.clear();
            }
        }
        kept.drain(..).for_each(&mut written);
    }
    io.close().await
}

// ---- the calling side ----

type Pending<Resp> = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Result<Resp, PipeError>>>>>>;

/// A request on its way to the writer: its frame without the tag (the writer numbers it).
type Queued<Resp> = (Vec<u8>, oneshot::Sender<Result<Resp, PipeError>>);

/// A pipe's reader and writer tasks. Dropping this stops both.
#[derive(Debug)]
#[must_use = "dropping it stops the pipe's tasks"]
pub struct PipeTasks {
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl PipeTasks {
    /// Whether both tasks have ended (the pipe is done).
    pub fn is_finished(&self) -> bool {
        self.reader.is_finished() && self.writer.is_finished()
    }
}

impl Drop for PipeTasks {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// The calling end of a pipe. Cheap to clone (one reference count); the pipe and its tasks
/// stop when every clone is dropped.
#[derive(Debug)]
pub struct PipeClient<Req, Resp> {
    shared: Arc<ClientShared<Resp>>,
    _requests: std::marker::PhantomData<fn(&Req)>,
}

/// What the clones of one [`PipeClient`] share.
#[derive(Debug)]
struct ClientShared<Resp> {
    queue: mpsc::UnboundedSender<Queued<Resp>>,
    limits: PipeLimits,
    timeout: Duration,
    tasks: PipeTasks,
}

impl<Req, Resp> Clone for PipeClient<Req, Resp> {
    fn clone(&self) -> Self {
        PipeClient { shared: Arc::clone(&self.shared), _requests: self._requests }
    }
}

impl<Req, Resp> PipeClient<Req, Resp>
where
    Req: Serialize + Send + 'static,
    Resp: DeserializeOwned + Send + 'static,
{
    /// Starts the pipe's tasks on an opened stream. Each call fails after `timeout`.
    pub fn start(stream: Stream, limits: PipeLimits, timeout: Duration) -> Self {
        let (read, write) = stream.split();
        let (queue, rx) = mpsc::unbounded_channel();
        // `None` once the stream is gone: later calls fail at once instead of waiting forever.
        let pending: Pending<Resp> = Arc::new(Mutex::new(Some(HashMap::new())));
        let reader = tokio::spawn(client_reader(read, limits.max_response, pending.clone()));
        let writer = tokio::spawn(async move {
            let mut next_tag = 0u64;
            let result = write_loop(
                write,
                rx,
                |(mut frame, reply): Queued<Resp>, buf| {
                    next_tag += 1;
                    frame[4..HEADER].copy_from_slice(&next_tag.to_be_bytes());
                    buf.extend_from_slice(&frame);
                    match lock(&pending).as_mut() {
                        Some(waiting) => {
                            waiting.insert(next_tag, reply);
                        }
                        None => {
                            let _ = reply.send(Err(PipeError::Closed("the stream ended".into())));
                        }
                    }
                    None::<()>
                },
                drop,
            )
            .await;
            close_all(&pending, &format!("write failed: {}", result.err().map_or("closed".into(), |e| e.to_string())));
        });
        let shared = ClientShared { queue, limits, timeout, tasks: PipeTasks { reader, writer } };
        PipeClient { shared: Arc::new(shared), _requests: std::marker::PhantomData }
    }

    /// Sends one request and waits for its answer. The request is encoded here, so the caller
    /// keeps it (to send again elsewhere, say) without a copy.
    pub async fn call(&self, request: &Req) -> Result<Resp, PipeError> {
        let mut frame = Vec::new();
        let shared = &*self.shared;
        encode(0, request, shared.limits.max_request, &mut frame).map_err(|e| PipeError::Encode(e.to_string()))?;
        let (reply, answer) = oneshot::channel();
        shared.queue.send((frame, reply)).map_err(|_| PipeError::Closed("the pipe has stopped".into()))?;
        match tokio::time::timeout(shared.timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(PipeError::Closed("the pipe has stopped".into())),
            Err(_) => Err(PipeError::Timeout(shared.timeout)),
        }
    }

    /// Whether the pipe has stopped (its stream ended or failed): its writer has, or its
    /// reader has (the peer closed the stream), so that the next call opens a new pipe.
    pub fn is_closed(&self) -> bool {
        self.shared.queue.is_closed() || self.shared.tasks.reader.is_finished()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn close_all<Resp>(pending: &Pending<Resp>, why: &str) {
    if let Some(waiting) = lock(pending).take() {
        for (_, reply) in waiting {
            let _ = reply.send(Err(PipeError::Closed(why.to_string())));
        }
    }
}

async fn client_reader<Resp: DeserializeOwned>(mut io: ReadHalf<Stream>, max: usize, pending: Pending<Resp>) {
    let why = loop {
        match read_frame::<Resp, _>(&mut io, max).await {
            Ok((tag, response)) => {
                // An oversized answer's body was not read: nothing after it can be framed.
                let fatal = matches!(response, Err(FrameError::TooLarge { .. }));
                let reply = lock(&pending).as_mut().and_then(|waiting| waiting.remove(&tag));
                if let Some(reply) = reply {
                    let _ = reply.send(response.map_err(|e| PipeError::BadAnswer(e.to_string())));
                }
                if fatal {
                    break "an answer exceeded the size limit".to_string();
                }
            }
            Err(e) => break e.to_string(),
        }
    };
    close_all(&pending, &why);
}

/// One peer's pipe, if open; locked while one is being opened.
type PipeSlot<Req, Resp> = Arc<tokio::sync::Mutex<Option<PipeClient<Req, Resp>>>>;

/// Pipes of one protocol to many peers: one each, opened on first use and reopened after it
/// closed. Opening a pipe to one peer never holds up calls to others.
pub struct PipePool<Req, Resp> {
    protocol: StreamProtocol,
    limits: PipeLimits,
    timeout: Duration,
    streams: libp2p_stream::Control,
    pipes: Mutex<HashMap<PeerId, PipeSlot<Req, Resp>>>,
}

impl<Req, Resp> std::fmt::Debug for PipePool<Req, Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipePool").field("protocol", &self.protocol).finish_non_exhaustive()
    }
}

impl<Req, Resp> PipePool<Req, Resp>
where
    Req: Serialize + Send + 'static,
    Resp: DeserializeOwned + Send + 'static,
{
    pub fn new(protocol: &'static str, limits: PipeLimits, timeout: Duration, streams: libp2p_stream::Control) -> Self {
        PipePool {
            protocol: StreamProtocol::new(protocol),
            limits,
            timeout,
            streams,
            pipes: Mutex::new(HashMap::new()),
        }
    }

    /// Sends `request` to `peer` on its pipe. A new pipe first awaits `connect` (which makes
    /// sure there is a connection, or explains why there cannot be one).
    ///
    /// Every request of the protocols on pipes is idempotent (envelopes are deduplicated by
    /// id, deletes and fetches can repeat), so a call whose pipe closed under it is sent again
    /// on a new pipe: a connection may be replaced or closed under it, and a peer may drop a
    /// just-opened stream (libp2p-stream's own accept path does when busy; relays accept
    /// pipes their own way, see `meshgram_relay::accept`).
    pub async fn call(
        &self,
        peer: PeerId,
        request: &Req,
        connect: impl Future<Output = Result<(), String>>,
    ) -> Result<Resp, PipeError> {
        let slot = lock(&self.pipes).entry(peer).or_default().clone();
        let mut connect = Some(connect);
        let mut attempt = 1;
        loop {
            let pipe = {
                let mut slot = slot.lock().await;
                match slot.as_ref().filter(|p| !p.is_closed()) {
                    Some(pipe) => pipe.clone(),
                    None => {
                        if let Some(connect) = connect.take() {
                            connect.await.map_err(PipeError::Open)?;
                        }
                        let stream = self
                            .streams
                            .clone()
                            .open_stream(peer, self.protocol.clone())
                            .await
                            .map_err(|e| PipeError::Open(e.to_string()))?;
                        let pipe = PipeClient::start(stream, self.limits, self.timeout);
                        *slot = Some(pipe.clone());
                        pipe
                    }
                }
            };
            match pipe.call(request).await {
                Err(PipeError::Closed(why)) if attempt < CALL_ATTEMPTS => {
                    tracing::debug!(%peer, %why, attempt, "pipe closed; sending again on a new one");
                    // Jittered, so that callers whose streams were dropped together do not
                    // all come back at once.
                    tokio::time::sleep(RETRY_PAUSE * attempt + Duration::from_millis(rand::random::<u64>() % 25)).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }
}

// ---- the answering side ----

/// Largest request a pipe reads before its peer is welcomed (its `Hello` answered with a
/// welcome): a greeting is a certificate, and nobody unknown gets a 16 MiB buffer.
pub const MAX_GREETING: usize = 16 * 1024;
/// How long a served pipe may go without its peer being welcomed: an unknown peer must not hold
/// a pipe (and so its connection) open for good.
pub const GREETING_DEADLINE: Duration = Duration::from_secs(10);
/// A request's body must arrive within this, plus a second per [`MIN_BODY_RATE`] bytes: a
/// peer trickling a large frame holds its reservation only so long.
const BODY_DEADLINE: Duration = Duration::from_secs(30);
const MIN_BODY_RATE: usize = 64 * 1024;
/// What a served protocol's pipes may hold in memory together, unless told otherwise.
pub const DEFAULT_PROTOCOL_MEMORY: usize = 256 << 20;

/// One request that arrived on a pipe, with the way to answer it.
#[derive(Debug)]
pub struct Inbound<Req, Resp> {
    pub peer: PeerId,
    pub request: Result<Req, FrameError>,
    pub responder: Responder<Resp>,
}

/// Answers one request. Dropping it unanswered frees its slot but leaves the caller to time
/// out, so every path should answer.
#[derive(Debug)]
pub struct Responder<Resp> {
    tag: u64,
    out: mpsc::UnboundedSender<Answer<Resp>>,
    slot: Slot,
    max_response: usize,
    /// Set when this request is a greeting (`Hello`) and its answer welcomes the peer.
    welcomed: Option<Welcome>,
}

/// A request's place in its pipe, freed once its answer is written: its in-flight permit, the
/// memory its body and answer hold, and what its answer's write is timed by.
#[derive(Debug)]
struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    held: Held,
    request_bytes: usize,
    kind: &'static str,
    arrived: Instant,
}

/// An answer on its way to the writer (which encodes it), with its request's tag and slot.
///
/// Boxed: an unbounded channel allocates room for 32 of what it carries up front, and a pipe
/// is open for every connected client (224 bytes each unboxed: 7 KiB per idle client).
type Answer<Resp> = Box<(u64, Resp, Slot)>;

/// Told, for each request answered on a pipe, its kind and the time from its arrival to its
/// answer's write (what the caller waited, but for the network): the relays' latency histograms.
pub type ObserveLatency = Arc<dyn Fn(&'static str, Duration) + Send + Sync>;

/// What a served pipe needs to know of its requests.
pub trait RequestKind {
    /// Its name for [`ObserveLatency`] (`malformed` is used for a frame that was not one).
    fn kind(&self) -> &'static str;
    /// Whether it is the greeting ([`MAX_GREETING`] applies until one is welcomed).
    fn is_greeting(&self) -> bool;
}

/// Whether an answer to a greeting welcomes the peer.
pub trait Greeting {
    fn welcomes(&self) -> bool;
}

impl<Resp: Serialize + Greeting> Responder<Resp> {
    /// Room for an answer of up to `want` bytes: what this pipe's and its protocol's memory
    /// budgets have left, but at least `at_least` (so that an answer always makes progress).
    /// It stays taken until the answer is written (or until the next call, which replaces it:
    /// `room(0, 0)` gives it back); the answer should fit in it. A handler whose answer can be
    /// large (a batch of envelopes) sizes it by this.
    pub fn room(&mut self, want: usize, at_least: usize) -> usize {
        self.slot.held.resize(self.slot.request_bytes);
        let room = want.min(self.slot.held.room().max(at_least)).min(self.max_response);
        self.slot.held.resize(self.slot.request_bytes + room);
        room
    }

    /// Sends the answer (a no-op if the caller has gone). Its slot, and the memory it holds,
    /// stay taken until the answer is written.
    pub fn respond(mut self, response: Resp) {
        if let Some(welcomed) = &self.welcomed
            && response.welcomes()
        {
            welcomed.set();
        }
        // Its size is counted here (a walk of its fields; byte strings by their length), its
        // bytes made by the writer, off the caller's thread.
        let size = postcard::experimental::serialized_size(&response).unwrap_or(self.max_response);
        self.slot.held.resize(self.slot.request_bytes + HEADER + size);
        let _ = self.out.send(Box::new((self.tag, response, self.slot)));
    }
}

/// Whether a connection's peer was welcomed on a protocol, shared by that connection's pipes of
/// it: a pipe opened again on the connection needs no second greeting (the server's session is
/// per connection too). It also limits the connection's greetings, each a signature check.
#[derive(Debug, Clone)]
pub struct Welcome {
    welcomed: Arc<AtomicBool>,
    greetings: Arc<RateLimiter>,
}

/// Greetings one connection may send on a protocol: a burst (a client greets once, and again
/// when its certificate is renewed or the relay forgot it), then one per
/// [`GREETING_REFILL_SECS`]. A pipelined flood of forged certificates costs the relay that many
/// signature checks, not one each.
const GREETING_BURST: u32 = 32;
const GREETING_REFILL_SECS: u64 = 1;

impl Default for Welcome {
    fn default() -> Self {
        Welcome {
            welcomed: Arc::default(),
            greetings: Arc::new(RateLimiter::new(GREETING_BURST, GREETING_REFILL_SECS)),
        }
    }
}

impl Welcome {
    fn is_set(&self) -> bool {
        self.welcomed.load(Ordering::Acquire)
    }

    fn set(&self) {
        self.welcomed.store(true, Ordering::Release);
    }

    /// Takes one greeting, or says in how many seconds one may be sent.
    fn take_greeting(&self) -> Result<(), u64> {
        self.greetings.check("", crate::crypto::cert::unix_now())
    }
}

/// How a server serves one protocol's pipes.
#[derive(Clone)]
pub struct Serving {
    pub limits: PipeLimits,
    /// What all of this protocol's pipes may hold in memory together (see [`MemoryBudget`]).
    pub memory: Arc<MemoryBudget>,
    /// Told each answer's latency, if anyone listens.
    pub observe: Option<ObserveLatency>,
}

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serving").field("limits", &self.limits).field("memory", &self.memory).finish_non_exhaustive()
    }
}

impl Serving {
    /// `limits`, with [`DEFAULT_PROTOCOL_MEMORY`] for all pipes together.
    pub fn new(limits: PipeLimits) -> Self {
        Serving { limits, memory: MemoryBudget::new(DEFAULT_PROTOCOL_MEMORY), observe: None }
    }

    pub fn with_memory(self, bytes: usize) -> Self {
        Serving { memory: MemoryBudget::new(bytes), ..self }
    }

    pub fn observed(self, observe: ObserveLatency) -> Self {
        Serving { observe: Some(observe), ..self }
    }
}

/// Serves one inbound pipe: each request goes to `inbound` (awaited, so a busy handler pushes
/// back on the stream); answers are written as they come. The pipe is served until it ends or
/// the returned tasks are dropped.
///
/// What one pipe can cost is bounded: requests in flight (until their answers are written), the
/// bytes they and their answers hold (its own budget and its protocol's, see [`MemoryBudget`]),
/// [`MAX_GREETING`]-byte requests until its peer is welcomed, which must be within
/// [`GREETING_DEADLINE`], bodies read as they arrive within a deadline, and a writer that must
/// make progress.
pub fn serve<Req, Resp>(
    peer: PeerId,
    stream: Stream,
    serving: &Serving,
    welcome: &Welcome,
    inbound: mpsc::Sender<Inbound<Req, Resp>>,
) -> PipeTasks
where
    Req: DeserializeOwned + RequestKind + Send + 'static,
    Resp: Serialize + Greeting + Send + 'static,
{
    let (mut read, write) = stream.split();
    let Serving { limits, memory: protocol, observe } = serving.clone();
    let (out, rx) = mpsc::unbounded_channel::<Answer<Resp>>();
    let writer = tokio::spawn(async move {
        let take = |answer: Answer<Resp>, buf: &mut Vec<u8>| {
            let (tag, response, slot) = *answer;
            if let Err(e) = encode(tag, &response, limits.max_response, buf) {
                tracing::error!(%peer, error = %e, "an answer could not be encoded; the caller will time out");
            }
            Some(slot)
        };
        let written = |slot: Slot| {
            if let Some(observe) = &observe {
                observe(slot.kind, slot.arrived.elapsed());
            }
        };
        let _ = write_loop(write, rx, take, written).await;
    });
    let welcome = welcome.clone();
    let reader = tokio::spawn(async move {
        let why = serve_requests(peer, &mut read, limits, protocol, welcome, out, inbound).await;
        tracing::debug!(%peer, %why, "pipe closed");
    });
    PipeTasks { reader, writer }
}

/// The reader of a served pipe; gives why it stopped.
async fn serve_requests<Req, Resp>(
    peer: PeerId,
    read: &mut ReadHalf<Stream>,
    limits: PipeLimits,
    protocol: Arc<MemoryBudget>,
    welcomed: Welcome,
    out: mpsc::UnboundedSender<Answer<Resp>>,
    inbound: mpsc::Sender<Inbound<Req, Resp>>,
) -> String
where
    Req: DeserializeOwned + RequestKind,
{
    let slots = Arc::new(Semaphore::new(limits.max_in_flight));
    let pipe = MemoryBudget::new(limits.max_memory);
    let opened = Instant::now();
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return "closed".into() };
        // Nothing new is read while this pipe, or its protocol, holds its whole budget: a peer
        // that reads no answers stops being read (and its writer's stall closes the pipe).
        pipe.wait_below_limit().await;
        protocol.wait_below_limit().await;
        let header = if welcomed.is_set() {
            read_header(read).await
        } else {
            // The greeting just read may be welcomed while this waits for the next request
            // (answers come later): at the deadline, only a peer still not welcomed is cut off,
            // and the header read so far is kept.
            let header = read_header(read);
            tokio::pin!(header);
            tokio::select! {
                header = &mut header => header,
                () = tokio::time::sleep_until((opened + GREETING_DEADLINE).into()) => {
                    if !welcomed.is_set() {
                        return format!("not welcomed within {GREETING_DEADLINE:?}");
                    }
                    header.await
                }
            }
        };
        let (tag, len) = match header {
            Ok(header) => header,
            Err(e) => return e.to_string(),
        };
        // The rest of the request's way lives on the heap while it runs: an idle pipe's
        // reader then holds only what waiting for a header needs (a task per connection).
        let step: Result<(), String> = Box::pin(async {
            let arrived = Instant::now();
            let mut max = if welcomed.is_set() { limits.max_request } else { MAX_GREETING };
            if len > max && max < limits.max_request && slots.available_permits() + 1 < limits.max_in_flight {
                // A large request right behind its greeting: once the greeting is answered, the
                // pipe may be welcomed.
                let others = (limits.max_in_flight - 1) as u32;
                drop(slots.acquire_many(others).await);
                if welcomed.is_set() {
                    max = limits.max_request;
                }
            }
            let mut held = Held::none(&pipe, &protocol);
            let request = if len > limits.max_request {
                Err(FrameError::TooLarge { len, max: limits.max_request })
            } else if len > max {
                Err(FrameError::NotWelcomed { len, max })
            } else {
                // The pipe's own room is taken up front (it waits only on itself); the protocol's
                // is charged as bytes arrive, so a peer trickling a large frame holds only what it
                // sent of the memory every pipe shares.
                held.reserve_pipe(len).await;
                let deadline = BODY_DEADLINE + Duration::from_secs((len / MIN_BODY_RATE) as u64);
                match tokio::time::timeout(deadline, read_body(read, len, |piece| held.charge_protocol(piece))).await {
                    Ok(Ok(body)) => postcard::from_bytes(&body).map_err(|e| FrameError::Malformed(e.to_string())),
                    Ok(Err(e)) => return Err(e.to_string()),
                    Err(_) => return Err(format!("a {len}-byte request took over {deadline:?}")),
                }
            };
            let fatal = matches!(request, Err(FrameError::TooLarge { .. } | FrameError::NotWelcomed { .. }));
            let kind = request.as_ref().map_or("malformed", Req::kind);
            let greets = request.as_ref().is_ok_and(Req::is_greeting);
            // Greetings past the connection's allowance are refused here, without their check.
            let request = match request {
                Ok(_) if greets => match welcomed.take_greeting() {
                    Ok(()) => request,
                    Err(retry_after_secs) => Err(FrameError::TooManyGreetings { retry_after_secs }),
                },
                other => other,
            };
            let slot = Slot { _permit: permit, held, request_bytes: len, kind, arrived };
            let responder = Responder {
                tag,
                out: out.clone(),
                slot,
                max_response: limits.max_response,
                welcomed: greets.then(|| welcomed.clone()),
            };
            // Dropping `out` (by returning) lets the writer send what is queued, this refusal
            // included, and close.
            if inbound.send(Inbound { peer, request, responder }).await.is_err() {
                return Err("the server stopped".into());
            }
            if fatal {
                return Err("a request exceeded the size limit".into());
            }
            Ok(())
        })
        .await;
        if let Err(why) = step {
            return why;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_bad_ones_are_told_apart() {
        let mut buf = Vec::new();
        encode(7, &"hello".to_string(), 100, &mut buf).unwrap();
        // A garbage body with a good header: the tag survives, the message does not.
        buf.extend_from_slice(&9u32.to_be_bytes());
        buf.extend_from_slice(&8u64.to_be_bytes());
        buf.push(0xff);
        // An oversized frame.
        buf.extend_from_slice(&1000u32.to_be_bytes());
        buf.extend_from_slice(&9u64.to_be_bytes());
        let mut io = futures::io::Cursor::new(buf);
        let (tag, msg) = read_frame::<String, _>(&mut io, 100).await.unwrap();
        assert_eq!((tag, msg), (7, Ok("hello".to_string())));
        let (tag, msg) = read_frame::<String, _>(&mut io, 100).await.unwrap();
        assert!(tag == 8 && matches!(msg, Err(FrameError::Malformed(_))));
        let (tag, msg) = read_frame::<String, _>(&mut io, 100).await.unwrap();
        assert!(tag == 9 && matches!(msg, Err(FrameError::TooLarge { len: 992, max: 100 })));
        assert!(read_frame::<String, _>(&mut io, 100).await.is_err(), "end of stream");
        assert!(matches!(encode(1, &"x".repeat(200), 100, &mut Vec::new()), Err(FrameError::TooLarge { .. })));
    }
}
