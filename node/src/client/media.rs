//! Files from a client's side: upload in parts (resumable), send the reference in a message,
//! download from any holder, verifying every part before it is written.
//!
//! Upload: the file is read part by part, each part sealed with the file's key
//! (`crypto::media`) and sent with `SaveFilePart` to the relay closest to the file id (the next
//! one if it fails), [`MEDIA_PARTS_IN_FLIGHT`] at a time; memory stays a few parts whatever the
//! file's size. The file id and key are saved in the history before the first part leaves, so
//! an upload killed halfway resumes: the relays say which parts they have, and only the others
//! are sent. The encrypted manifest goes last; then the reference travels sealed in a message.
//!
//! Download: the manifest first, then the parts in parallel, each from the relays closest to its
//! chunk (then every other relay), the first copy whose hash matches; a corrupt or missing copy
//! means the next holder, never a byte written. The output appears (renamed from a temporary
//! file beside it) only once every part is in.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::client::history::History;
use crate::client::history::{ServedFile, StoredMessage, UploadState};
use crate::client::messaging::{MessagingError, Messenger};
use crate::client::session::{Client, SavedSession};
use crate::crypto::cert::SessionCert;
use crate::crypto::media::{FileKey, MANIFEST_INDEX};
use crate::defaults::{MEDIA_PART_DEADLINE, MEDIA_PARTS_IN_FLIGHT, RELAY_ANSWER_DEADLINE};
use crate::net::placement;
use crate::proto::media::{
    ChunkHash, DEFAULT_PART_SIZE, FileId, FileRef, MAX_PART_SIZE, MAX_PARTS, MAX_PROVIDED_PER_REQUEST, MEDIA_LIMITS,
    MIN_PART_SIZE, Manifest, MediaRequest, MediaResponse, PROVIDER_RELAYS, PROVIDER_TTL_SECS, PartHashes,
};
use crate::proto::payload::MessageId;
use crate::proto::{ErrorCode, LookupQuery, RelayInfo, WireError};

/// Which way a transfer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Upload,
    Download,
}

/// How far a transfer is, reported after every part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub direction: Direction,
    pub file_id: FileId,
    pub name: String,
    /// Plaintext bytes done (sent, or fetched and written), of `total_bytes`.
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Parts done of `total_parts` (data parts; the manifest not counted).
    pub done_parts: u32,
    pub total_parts: u32,
    /// Parts a resumed upload found saved already, and did not send again.
    pub resumed_parts: u32,
}

/// Where progress reports go.
pub type OnProgress<'a> = &'a (dyn Fn(Progress) + Send + Sync);

/// A finished download.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Downloaded {
    pub path: PathBuf,
    pub size: u64,
    pub name: String,
    pub mime: String,
}

/// Media calls to relays (and serving peers) on behalf of one device: greets each once per
/// connection, and again when it forgot us. Shared by the parts in flight.
struct MediaLink<'a> {
    client: &'a Client,
    cert: &'a SessionCert,
    greeted: Mutex<HashSet<PeerId>>,
}

impl<'a> MediaLink<'a> {
    fn new(client: &'a Client, cert: &'a SessionCert) -> Self {
        MediaLink { client, cert, greeted: Mutex::new(HashSet::new()) }
    }

    fn greeted(&self) -> std::sync::MutexGuard<'_, HashSet<PeerId>> {
        self.greeted.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One request, given up after `deadline`; refusals come back as `Err(Refused)`.
    async fn call(
        &self,
        peer: &RelayInfo,
        request: &MediaRequest,
        deadline: std::time::Duration,
    ) -> Result<MediaResponse, MessagingError> {
        let answer = tokio::time::timeout(deadline, self.call_unbounded(peer, request)).await;
        let answer = answer.unwrap_or_else(|_| {
            let reason = format!("no answer within {} s", deadline.as_secs());
            Err(crate::client::net::NetError::RequestFailed { peer: peer.peer_id, reason }.into())
        });
        if answer.is_err() {
            self.greeted().remove(&peer.peer_id);
        }
        answer
    }

    async fn call_unbounded(&self, peer: &RelayInfo, request: &MediaRequest) -> Result<MediaResponse, MessagingError> {
        let mut greeted_now = false;
        loop {
            if !self.greeted().contains(&peer.peer_id) {
                let hello = MediaRequest::Hello { cert: self.cert.clone() };
                match self.client.media_request(peer, &hello).await? {
                    MediaResponse::Welcome { .. } => {
                        self.greeted().insert(peer.peer_id);
                        greeted_now = true;
                    }
                    MediaResponse::Error(e) => return Err(MessagingError::Refused(e)),
                    _ => return Err(crate::client::ClientError::UnexpectedResponse("Hello").into()),
                }
            }
            match self.client.media_request(peer, request).await? {
                // It forgot us (it restarted, or the connection was replaced): greet again, once.
                MediaResponse::Error(e) if e.code == ErrorCode::CertInvalid && !greeted_now => {
                    self.greeted().remove(&peer.peer_id);
                }
                MediaResponse::Error(e) => return Err(MessagingError::Refused(e)),
                answer => return Ok(answer),
            }
        }
    }
}

/// Whether a refusal from one relay says nothing about the request, so another relay may do.
fn another_relay_may_do(e: &MessagingError) -> bool {
    match e {
        MessagingError::Refused(w) => {
            matches!(
                w.code,
                ErrorCode::Unavailable | ErrorCode::CertInvalid | ErrorCode::Internal | ErrorCode::FloodWait
            )
        }
        MessagingError::Net(_) | MessagingError::Client(_) => true,
        _ => false,
    }
}

fn file_error(path: &Path, e: impl std::fmt::Display) -> MessagingError {
    MessagingError::File(format!("{}: {e}", path.display()))
}

impl Messenger {
    /// Uploads a file (or resumes its upload) and returns its reference, ready to send. From
    /// then on this device serves its chunks to peers.
    pub async fn upload_file(
        &mut self,
        path: &Path,
        part_size: Option<u32>,
        progress: OnProgress<'_>,
    ) -> Result<FileRef, MessagingError> {
        self.upload(path, part_size, progress, Serve::Peers, Resume::Yes).await
    }

    /// Uploads a file; `serve`: whether this device hands its chunks to peers afterwards (not
    /// for a file that is deleted once uploaded, such as a history export).
    pub(crate) async fn upload(
        &mut self,
        path: &Path,
        part_size: Option<u32>,
        progress: OnProgress<'_>,
        serve: Serve,
        resume: Resume,
    ) -> Result<FileRef, MessagingError> {
        let history = self.history()?.clone();
        let put_upload = |key: &str, state: &UploadState| match resume {
            Resume::Yes => history.put_upload(key, state),
            Resume::No => Ok(()),
        };
        let part_size = part_size.unwrap_or(DEFAULT_PART_SIZE);
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&part_size) {
            return Err(MessagingError::File(format!(
                "a part must be {} KiB to {} KiB",
                MIN_PART_SIZE / 1024,
                MAX_PART_SIZE / 1024
            )));
        }
        let path = std::fs::canonicalize(path).map_err(|e| file_error(path, e))?;
        let meta = std::fs::metadata(&path).map_err(|e| file_error(&path, e))?;
        if !meta.is_file() {
            return Err(file_error(&path, "not a regular file"));
        }
        let size = meta.len();
        let modified_ns =
            meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
        let data_parts = size.div_ceil(u64::from(part_size));
        if data_parts + 1 > u64::from(MAX_PARTS) {
            let max = u64::from(MAX_PARTS - 1) * u64::from(part_size);
            return Err(MessagingError::File(format!(
                "{} is {size} bytes; with {} KiB parts a file may have at most {max} bytes (use larger parts)",
                path.display(),
                part_size / 1024
            )));
        }
        let (data_parts, total_parts) = (data_parts as u32, data_parts as u32 + 1);
        let key_name = path.to_string_lossy().into_owned();
        let fresh =
            || UploadState { file_id: FileId::random(), key: FileKey::random().0, part_size, size, modified_ns };
        let earlier = if resume == Resume::Yes { history.upload(&key_name)? } else { None };
        let mut state = match earlier {
            Some(s) if s.size == size && s.modified_ns == modified_ns && s.part_size == part_size => s,
            _ => fresh(),
        };
        put_upload(&key_name, &state)?;
        let relays = self.session.relays.clone();
        let link = MediaLink::new(&self.client, &self.session.cert);
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
        let part_len = |i: u32| (size - u64::from(i) * u64::from(part_size)).min(u64::from(part_size));
        let mut attempt = 0;
        let (state, saved, manifest) = 'upload: loop {
            attempt += 1;
            let targets = placement::by_closeness(&placement::file_key(&state.file_id), relays.clone());
            let saved = match upload_status(&link, &targets, state.file_id).await? {
                (total, saved) if total == total_parts => saved,
                (0, _) => HashMap::new(),
                // Begun with another layout (another part size): start afresh.
                _ => {
                    state = fresh();
                    put_upload(&key_name, &state)?;
                    continue 'upload;
                }
            };
            let (file_id, key) = (state.file_id, FileKey(state.key));
            let resumed_parts = saved.keys().filter(|p| **p < data_parts).count() as u32;
            let mut report = Progress {
                direction: Direction::Upload,
                file_id,
                name: name.clone(),
                done_bytes: 0,
                total_bytes: size,
                done_parts: 0,
                total_parts: data_parts,
                resumed_parts,
            };
            let mut file = tokio::fs::File::open(&path).await.map_err(|e| file_error(&path, e))?;
            let mut manifest = Vec::with_capacity(data_parts as usize);
            let mut inflight = FuturesUnordered::new();
            for part in 0..data_parts {
                let mut plain = vec![0u8; part_len(part) as usize];
                file.read_exact(&mut plain).await.map_err(|e| file_error(&path, e))?;
                let sealing = key.clone();
                let (chunk, hashes) = tokio::task::spawn_blocking(move || sealing.seal_part(part, &plain))
                    .await
                    .map_err(|e| MessagingError::File(format!("sealing part {part}: {e}")))?;
                manifest.push(hashes);
                match saved.get(&part) {
                    Some(saved) if *saved == hashes.chunk => {
                        report.done_parts += 1;
                        report.done_bytes += part_len(part);
                        progress(report.clone());
                        continue;
                    }
                    // The file changed in a way its size and time do not show (copied with its
                    // times kept, say): the parts saved are another file's. Start afresh, once.
                    Some(_) if attempt == 1 => {
                        tracing::warn!(file = %path.display(), "the file changed since its upload began; uploading it afresh");
                        state = fresh();
                        put_upload(&key_name, &state)?;
                        continue 'upload;
                    }
                    Some(_) => return Err(file_error(&path, "changes while it is being uploaded")),
                    None => {}
                }
                if inflight.len() >= MEDIA_PARTS_IN_FLIGHT
                    && let Some(done) = inflight.next().await
                {
                    report.done_bytes += part_len(done?);
                    report.done_parts += 1;
                    progress(report.clone());
                }
                inflight.push(save_part(&link, &targets, file_id, part, total_parts, hashes.chunk, chunk));
            }
            while let Some(done) = inflight.next().await {
                report.done_bytes += part_len(done?);
                report.done_parts += 1;
                progress(report.clone());
            }
            break (state, saved, manifest);
        };
        let (file_id, key) = (state.file_id, FileKey(state.key));
        let targets = placement::by_closeness(&placement::file_key(&file_id), relays.clone());
        let listing = Manifest { size, part_size, parts: manifest };
        let listing = postcard::to_stdvec(&listing).expect("invariant: manifests serialize");
        let (manifest_chunk, manifest) = key.seal_part(MANIFEST_INDEX, &listing);
        if saved.get(&data_parts) != Some(&manifest.chunk) {
            save_part(&link, &targets, file_id, data_parts, total_parts, manifest.chunk, manifest_chunk.clone())
                .await?;
        }
        let file = FileRef {
            file_id,
            manifest,
            size,
            part_size,
            mime: mime_of(&name).into(),
            thumbnail: thumbnail_of(&path, mime_of(&name), size).await,
            name,
            key: key.0,
        };
        if serve == Serve::Peers {
            let parts: Manifest = postcard::from_bytes(&listing).expect("invariant: the manifest just made parses");
            let served = ServedFile { path: key_name, file: file.clone(), manifest_chunk };
            history.put_served(&served, &parts.parts)?;
        }
        Ok(file)
    }

    /// Sends a message again to someone else: a file by its reference (nothing is uploaded
    /// again), a text as a new message.
    pub async fn forward(&mut self, message: MessageId, to: LookupQuery) -> Result<StoredMessage, MessagingError> {
        let original = self.history()?.message(&message)?.ok_or(MessagingError::UnknownMessage(message))?;
        if original.deleted {
            return Err(MessagingError::UnknownMessage(message));
        }
        match original.file {
            Some(file) => {
                let caption = (!original.text.is_empty()).then_some(original.text);
                self.send_file(to, *file, caption, None).await
            }
            None => {
                let mut sent = self.send_texts(to, vec![original.text], None).await?;
                sent.pop().ok_or(MessagingError::UnknownMessage(message))
            }
        }
    }

    /// Downloads the file of a message to `out` (a file, or a directory to put it in; default:
    /// the file's own name in the current directory). With `range`, only those bytes
    /// (`start..=end`, as HTTP ranges count), fetching only the parts that cover them: for
    /// playing audio and video from the middle.
    pub async fn download_file(
        &mut self,
        message: MessageId,
        out: Option<PathBuf>,
        range: Option<ByteRange>,
        progress: OnProgress<'_>,
    ) -> Result<Downloaded, MessagingError> {
        let (file, serve) = self.message_file(message)?;
        let name = safe_name(&file.name);
        let out = match out {
            Some(out) if out.is_dir() => out.join(&name),
            Some(out) => out,
            None => PathBuf::from(&name),
        };
        self.fetch_file(*file, &out, range, progress, serve).await
    }

    /// The file of a message, cloud or secret, and whether this device serves its chunks to
    /// peers (a secret chat's file is not: nothing of it stays in the history).
    pub(crate) fn message_file(&mut self, message: MessageId) -> Result<(Box<FileRef>, Serve), MessagingError> {
        match self.history()?.message(&message)? {
            Some(found) => {
                Ok((found.file.filter(|_| !found.deleted).ok_or(MessagingError::NoFile(message))?, Serve::Peers))
            }
            None => {
                let file = self.secret_file(&message)?.ok_or(MessagingError::UnknownMessage(message))?;
                Ok((Box::new(file), Serve::No))
            }
        }
    }

    /// Fetches a file by its reference to `out`, verifying every part; the file appears only
    /// complete. With `Serve::Peers` this device hands its chunks to peers afterwards.
    pub(crate) async fn fetch_file(
        &mut self,
        file: FileRef,
        out: &Path,
        range: Option<ByteRange>,
        progress: OnProgress<'_>,
        serve: Serve,
    ) -> Result<Downloaded, MessagingError> {
        file.check().map_err(MessagingError::BadFile)?;
        let range = match range {
            Some(r) if r.start > r.end || r.end >= file.size => {
                return Err(MessagingError::File(format!(
                    "bytes {}-{} are not within the file's {} bytes",
                    r.start, r.end, file.size
                )));
            }
            Some(r) => r,
            None if file.size == 0 => ByteRange { start: 0, end: 0 },
            None => ByteRange { start: 0, end: file.size - 1 },
        };
        let name = safe_name(&file.name);
        let history = self.history()?.clone();
        let holders = Holders::new(self.session.relays.clone(), file.provider_key());
        let link = MediaLink::new(&self.client, &self.session.cert);
        let key = FileKey(file.key);
        let manifest_chunk = fetch_chunk(&link, &holders, &file.manifest).await?;
        let listing = key.open_part(MANIFEST_INDEX, &file.manifest, &manifest_chunk)?;
        let manifest: Manifest = postcard::from_bytes(&listing)
            .map_err(|e| MessagingError::BadFile(format!("the manifest does not parse: {e}")))?;
        if manifest.size != file.size
            || manifest.part_size != file.part_size
            || manifest.parts.len() as u32 != file.data_parts()
        {
            return Err(MessagingError::BadFile("the manifest does not match the file reference".into()));
        }
        let whole = range.start == 0 && range.end + 1 >= file.size;
        let len = if file.size == 0 { 0 } else { range.end - range.start + 1 };
        let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        // A fresh name, created new (never through a link someone left there).
        let temp = dir.join(format!(".{name}.{}.part", crate::ids::hex(&rand::random::<[u8; 8]>())));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .and_then(|f| f.set_len(len).map(|()| f));
        let written = Arc::new(written.map_err(|e| file_error(&temp, e))?);
        let fetch = Fetch { link: &link, holders: &holders, key: &key, file: &file, range, out: &written };
        let result = fetch.parts(&manifest, progress).await.and_then(|()| {
            written.sync_all().map_err(|e| file_error(&temp, e))?;
            std::fs::rename(&temp, out).map_err(|e| file_error(out, e))
        });
        if let Err(e) = result {
            let _ = std::fs::remove_file(&temp);
            return Err(e);
        }
        let path = std::fs::canonicalize(out).unwrap_or_else(|_| out.to_path_buf());
        let done = Downloaded { path, size: len, name: file.name.clone(), mime: file.mime.clone() };
        if whole && serve == Serve::Peers {
            // From now on this device can hand the file's chunks to peers.
            let served = ServedFile { path: done.path.to_string_lossy().into_owned(), file, manifest_chunk };
            history.put_served(&served, &manifest.parts)?;
        }
        Ok(done)
    }
}

/// Whether an upload keeps a resume record (with the file key) in the history, and picks up
/// an earlier upload of the same file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resume {
    Yes,
    /// A secret chat's file or a history export: a fresh key every time, nothing recorded.
    No,
}

/// Whether a device hands a file's chunks to peers once it has the whole file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Serve {
    Peers,
    /// Not: the file is deleted soon (a history export on its way to another device).
    No,
}

/// A byte range of a file, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl std::str::FromStr for ByteRange {
    type Err = String;
    /// `START-END`, both included, as in HTTP's `Range: bytes=START-END`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("'{s}' is not a byte range START-END (both included, e.g. 0-1048575)");
        let (start, end) = s.split_once('-').ok_or_else(bad)?;
        let range =
            ByteRange { start: start.trim().parse().map_err(|_| bad())?, end: end.trim().parse().map_err(|_| bad())? };
        if range.start > range.end {
            return Err(bad());
        }
        Ok(range)
    }
}

/// One download's parts: where they come from and where their bytes go.
struct Fetch<'a> {
    link: &'a MediaLink<'a>,
    holders: &'a Holders,
    key: &'a FileKey,
    file: &'a FileRef,
    /// The bytes wanted; the output file holds exactly these.
    range: ByteRange,
    out: &'a Arc<std::fs::File>,
}

impl Fetch<'_> {
    /// Fetches, checks, decrypts and writes the data parts covering the range, several at a
    /// time.
    async fn parts(&self, manifest: &Manifest, progress: OnProgress<'_>) -> Result<(), MessagingError> {
        let part_size = u64::from(self.file.part_size.max(1));
        let (first, last) = ((self.range.start / part_size) as usize, (self.range.end / part_size) as usize);
        let wanted: Vec<(usize, PartHashes)> =
            manifest.parts.iter().copied().enumerate().skip(first).take(last + 1 - first).collect();
        let mut report = Progress {
            direction: Direction::Download,
            file_id: self.file.file_id,
            name: self.file.name.clone(),
            done_bytes: 0,
            total_bytes: if self.file.size == 0 { 0 } else { self.range.end - self.range.start + 1 },
            done_parts: 0,
            total_parts: wanted.len() as u32,
            resumed_parts: 0,
        };
        let mut parts = wanted.into_iter();
        let mut inflight = FuturesUnordered::new();
        loop {
            while inflight.len() < MEDIA_PARTS_IN_FLIGHT
                && let Some((part, hashes)) = parts.next()
            {
                inflight.push(self.part(part as u32, hashes));
            }
            let Some(done) = inflight.next().await else { return Ok(()) };
            report.done_bytes += done?;
            report.done_parts += 1;
            progress(report.clone());
        }
    }

    /// One part: fetched from a holder, checked, decrypted, and the bytes of it inside the
    /// range written at their place. Returns how many bytes were written.
    async fn part(&self, part: u32, hashes: PartHashes) -> Result<u64, MessagingError> {
        let chunk = fetch_chunk(self.link, self.holders, &hashes).await?;
        let key = self.key.clone();
        let plain = tokio::task::spawn_blocking(move || key.open_part(part, &hashes, &chunk))
            .await
            .map_err(|e| MessagingError::File(format!("opening part {part}: {e}")))??;
        if plain.len() as u64 != self.file.part_len(part) {
            return Err(MessagingError::BadFile(format!(
                "part {part} holds {} bytes, not the {} its file reference says",
                plain.len(),
                self.file.part_len(part)
            )));
        }
        let part_start = u64::from(part) * u64::from(self.file.part_size);
        let from = self.range.start.saturating_sub(part_start) as usize;
        let to = ((self.range.end + 1).saturating_sub(part_start) as usize).min(plain.len());
        let bytes = plain.get(from..to).unwrap_or_default().to_vec();
        let offset = (part_start + from as u64) - self.range.start;
        let (out, len) = (Arc::clone(self.out), bytes.len() as u64);
        tokio::task::spawn_blocking(move || std::os::unix::fs::FileExt::write_all_at(&*out, &bytes, offset))
            .await
            .map_err(|e| MessagingError::File(e.to_string()))?
            .map_err(|e| MessagingError::File(format!("writing the download: {e}")))?;
        Ok(len)
    }
}

/// Which parts of an upload the relays have: the first relay that answers says.
async fn upload_status(
    link: &MediaLink<'_>,
    relays: &[RelayInfo],
    file_id: FileId,
) -> Result<(u32, HashMap<u32, ChunkHash>), MessagingError> {
    let mut last = String::from("no relays known; sign in with --network");
    for relay in relays {
        match link.call(relay, &MediaRequest::GetUploadStatus { file_id }, RELAY_ANSWER_DEADLINE).await {
            Ok(MediaResponse::UploadStatus { total_parts, saved, hashes }) => {
                return Ok((total_parts, saved.into_iter().zip(hashes).collect()));
            }
            Ok(other) => last = format!("unexpected answer {}", other.kind()),
            Err(e) if another_relay_may_do(&e) => last = e.to_string(),
            Err(e) => return Err(e),
        }
    }
    Err(MessagingError::NoRelay(last))
}

/// Saves one part through the first relay (of `relays`, in order) that takes it; returns the
/// part's index.
async fn save_part(
    link: &MediaLink<'_>,
    relays: &[RelayInfo],
    file_id: FileId,
    part: u32,
    total_parts: u32,
    hash: ChunkHash,
    bytes: Vec<u8>,
) -> Result<u32, MessagingError> {
    let request = MediaRequest::SaveFilePart { file_id, part, total_parts, hash, bytes };
    let mut last = String::from("no relays known; sign in with --network");
    for relay in relays {
        match link.call(relay, &request, MEDIA_PART_DEADLINE).await {
            Ok(MediaResponse::PartSaved { .. }) => return Ok(part),
            Ok(other) => last = format!("unexpected answer {}", other.kind()),
            Err(e) if another_relay_may_do(&e) => {
                tracing::warn!(relay = %relay.peer_id, part, error = %e, "part not saved there; trying another relay");
                last = e.to_string();
            }
            Err(e) => return Err(e),
        }
    }
    Err(MessagingError::NoRelay(format!("part {part} of {file_id} was not saved: {last}")))
}

/// Where a file's chunks may be: the relays, then the client nodes that announced they serve
/// the file (asked for once, when a chunk is on no relay that answers).
struct Holders {
    relays: Vec<RelayInfo>,
    /// The file, by its provider key (`FileRef::provider_key`).
    file: ChunkHash,
    providers: tokio::sync::OnceCell<Vec<RelayInfo>>,
}

impl Holders {
    fn new(relays: Vec<RelayInfo>, file: ChunkHash) -> Self {
        Holders { relays, file, providers: tokio::sync::OnceCell::new() }
    }

    /// The client nodes serving the file, from the relays its provider records live on.
    async fn providers(&self, link: &MediaLink<'_>) -> &[RelayInfo] {
        self.providers
            .get_or_init(|| async {
                let mut found: Vec<RelayInfo> = Vec::new();
                let request = MediaRequest::FindProviders { file: self.file };
                let asked = placement::by_closeness(&placement::chunk_key(&self.file), self.relays.clone());
                for relay in asked.iter().take(PROVIDER_RELAYS) {
                    match link.call(relay, &request, RELAY_ANSWER_DEADLINE).await {
                        Ok(MediaResponse::Providers { peers }) => {
                            for peer in peers {
                                if !found.iter().any(|p| p.peer_id == peer.peer_id) {
                                    found.push(peer);
                                }
                            }
                        }
                        Ok(other) => tracing::debug!(relay = %relay.peer_id, answer = ?other, "no providers"),
                        Err(e) => tracing::debug!(relay = %relay.peer_id, error = %e, "could not ask for providers"),
                    }
                }
                found
            })
            .await
    }
}

/// One chunk from the first holder that has a copy matching its hash: the relays closest to
/// it first, then every other relay, then the client nodes serving its file.
async fn fetch_chunk(link: &MediaLink<'_>, holders: &Holders, hashes: &PartHashes) -> Result<Vec<u8>, MessagingError> {
    let request = MediaRequest::GetChunk { hash: hashes.chunk };
    let mut tried = Vec::new();
    let relays = placement::by_closeness(&placement::chunk_key(&hashes.chunk), holders.relays.clone());
    for peers_asked in 0..2 {
        let candidates = if peers_asked == 0 { relays.as_slice() } else { holders.providers(link).await };
        for holder in candidates {
            match link.call(holder, &request, MEDIA_PART_DEADLINE).await {
                Ok(MediaResponse::Chunk { bytes }) if ChunkHash::of(&bytes) == hashes.chunk => return Ok(bytes),
                Ok(MediaResponse::Chunk { .. }) => {
                    tracing::warn!(holder = %holder.peer_id, chunk = %hashes.chunk, "a holder served a corrupt chunk; trying another");
                    tried.push(format!("{}: corrupt copy", holder.peer_id));
                }
                Ok(other) => tried.push(format!("{}: unexpected answer {}", holder.peer_id, other.kind())),
                Err(e) => tried.push(format!("{}: {e}", holder.peer_id)),
            }
        }
    }
    Err(MessagingError::ChunkUnavailable(format!(
        "no holder had a good copy of chunk {} ({})",
        hashes.chunk,
        if tried.is_empty() { "no relays known".into() } else { tried.join("; ") }
    )))
}

// ---- serving peers ----

/// How often a serving node looks for files it has newly completed, to announce them.
const ANNOUNCE_CHECK: std::time::Duration = std::time::Duration::from_secs(2);
/// How often it announces everything again: well inside a provider record's life on a relay.
const ANNOUNCE_EVERY: std::time::Duration = std::time::Duration::from_secs(PROVIDER_TTL_SECS / 3);
/// Peers' pipes served at once; more wait until one ends.
const MAX_SERVED_PIPES: usize = 256;
/// Peers remembered as greeted (until their certificate expires); past this, new ones are
/// refused until some expire.
const MAX_GREETED_PEERS: usize = 10_000;
/// Chunks read and sealed again at once for peers: each is a part in memory.
const CHUNK_READS: usize = 8;

/// What a serving node needs: its device, and its session as it changes (renewals, relays).
pub struct ChunkServer {
    pub client: Client,
    pub history: History,
    pub session: tokio::sync::watch::Receiver<SavedSession>,
    /// Where to listen for peers.
    pub listen: libp2p::Multiaddr,
}

impl std::fmt::Debug for ChunkServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkServer").field("listen", &self.listen).finish_non_exhaustive()
    }
}

impl ChunkServer {
    /// Serves the chunks of this device's complete files (downloaded or uploaded here) to
    /// signed-in peers of the same network, and announces them to the relays, until dropped.
    pub async fn run(mut self) {
        let addr = match self.client.listen(self.listen.clone()).await {
            Ok(addr) => addr,
            Err(e) => return tracing::warn!(error = %e, "not serving chunks to peers: cannot listen"),
        };
        let mut incoming = match self.client.accept_media() {
            Ok(incoming) => incoming,
            Err(e) => return tracing::warn!(error = %e, "not serving chunks to peers"),
        };
        tracing::info!(%addr, "serving chunks of this device's files to peers");
        let announcer = Announcer { client: self.client.clone(), history: self.history.clone(), addr };
        let _announcing = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(announcer.run(self.session.clone())));
        let (tx, mut requests) = tokio::sync::mpsc::channel(64);
        let mut pipes: Vec<crate::net::pipe::PipeTasks> = Vec::new();
        let mut greeted = HashMap::new();
        let reads = Arc::new(tokio::sync::Semaphore::new(CHUNK_READS));
        let serving = crate::net::pipe::Serving::new(MEDIA_LIMITS);
        loop {
            tokio::select! {
                Some((peer, stream)) = incoming.next() => {
                    pipes.retain(|p| !p.is_finished());
                    if pipes.len() < MAX_SERVED_PIPES {
                        pipes.push(crate::net::pipe::serve(peer, stream, &serving, &Default::default(), tx.clone()));
                    }
                }
                Some(inbound) = requests.recv() => self.answer(inbound, &mut greeted, &reads),
            }
        }
    }

    /// Answers one peer's request: `Hello` (a session certificate of this network), then
    /// `GetChunk`; nothing else is served by a client node.
    fn answer(
        &mut self,
        inbound: crate::net::pipe::Inbound<MediaRequest, MediaResponse>,
        greeted: &mut HashMap<PeerId, u64>,
        reads: &Arc<tokio::sync::Semaphore>,
    ) {
        let crate::net::pipe::Inbound { peer, request, responder } = inbound;
        let refuse = |code, message: String| MediaResponse::Error(WireError::new(code, message));
        match request {
            Err(e) => responder.respond(MediaResponse::Error(WireError::for_frame(&e))),
            Ok(MediaRequest::Hello { cert }) => {
                let gateway = self.session.borrow().gateway.public_key();
                let checked = gateway.map_err(|e| e.to_string()).and_then(|key| {
                    let body = cert.verify_for(&key, &peer, crate::crypto::cert::unix_now());
                    body.map(|b| b.not_after).map_err(|e| e.to_string())
                });
                match checked {
                    Ok(not_after) => {
                        if greeted.len() >= MAX_GREETED_PEERS {
                            let now = crate::crypto::cert::unix_now();
                            greeted.retain(|_, until| *until >= now);
                        }
                        if greeted.len() < MAX_GREETED_PEERS {
                            greeted.insert(peer, not_after);
                        }
                        responder.respond(MediaResponse::Welcome { relay: self.client.identity.peer_id() });
                    }
                    Err(e) => responder.respond(refuse(ErrorCode::CertInvalid, e)),
                }
            }
            Ok(_) if greeted.get(&peer).is_none_or(|until| *until < crate::crypto::cert::unix_now()) => responder
                .respond(refuse(ErrorCode::CertInvalid, "say Hello with a valid session certificate first".into())),
            Ok(MediaRequest::GetChunk { hash }) => {
                let (history, reads) = (self.history.clone(), Arc::clone(reads));
                tokio::spawn(async move {
                    // A few reads at a time: each is a part in memory, read and sealed again.
                    let Ok(_reading) = reads.acquire_owned().await else { return };
                    let answer = tokio::task::spawn_blocking(move || served_chunk(&history, &hash)).await;
                    responder.respond(match answer {
                        Ok(Some(bytes)) => MediaResponse::Chunk { bytes },
                        _ => refuse(ErrorCode::NotFound, format!("this device does not have chunk {hash}")),
                    });
                });
            }
            Ok(other) => responder.respond(refuse(
                ErrorCode::BadRequest,
                format!("a client node serves chunks only (GetChunk), not {}", other.kind()),
            )),
        }
    }
}

/// A chunk of a file this device serves, sealed again from the file; `None` if it has none, or
/// the file changed since (its chunk would not match).
fn served_chunk(history: &History, hash: &ChunkHash) -> Option<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let (served, part) = history.served_chunk(hash).ok()??;
    if part == MANIFEST_INDEX {
        return Some(served.manifest_chunk);
    }
    let file = &served.file;
    file.check().ok()?;
    let offset = u64::from(part) * u64::from(file.part_size);
    let len = file.part_len(part);
    let mut plain = vec![0u8; len as usize];
    let mut on_disk = std::fs::File::open(&served.path).ok()?;
    on_disk.seek(SeekFrom::Start(offset)).ok()?;
    on_disk.read_exact(&mut plain).ok()?;
    let (chunk, hashes) = FileKey(file.key).seal_part(part, &plain);
    (hashes.chunk == *hash).then_some(chunk)
}

/// Announces this device's files to the relays now and then, on a task of its own so that
/// serving never waits for a relay.
struct Announcer {
    client: Client,
    history: History,
    /// Where this device serves.
    addr: libp2p::Multiaddr,
}

impl Announcer {
    async fn run(self, mut session: tokio::sync::watch::Receiver<SavedSession>) {
        let mut check = tokio::time::interval(ANNOUNCE_CHECK);
        let mut announced: (Vec<ChunkHash>, Option<std::time::Instant>) = (Vec::new(), None);
        loop {
            check.tick().await;
            let history = self.history.clone();
            let files = tokio::task::spawn_blocking(move || history.served_files()).await;
            let files = files.ok().and_then(Result::ok).unwrap_or_default();
            let due = announced.1.is_none_or(|at| at.elapsed() >= ANNOUNCE_EVERY);
            if !files.is_empty() && (files != announced.0 || due) {
                let session = session.borrow_and_update().clone();
                self.announce(&session, &files).await;
                announced = (files, Some(std::time::Instant::now()));
            }
        }
    }

    /// Tells the relays that keep each file's provider records that this device serves it.
    async fn announce(&self, session: &SavedSession, files: &[ChunkHash]) {
        let mut by_relay: HashMap<PeerId, (RelayInfo, Vec<ChunkHash>)> = HashMap::new();
        for file in files {
            for relay in placement::by_closeness(&placement::chunk_key(file), session.relays.clone())
                .into_iter()
                .take(PROVIDER_RELAYS)
            {
                by_relay.entry(relay.peer_id).or_insert_with(|| (relay, Vec::new())).1.push(*file);
            }
        }
        let link = MediaLink::new(&self.client, &session.cert);
        for (relay, files) in by_relay.into_values() {
            for batch in files.chunks(MAX_PROVIDED_PER_REQUEST) {
                let request = MediaRequest::Provide { files: batch.to_vec(), addrs: vec![self.addr.clone()] };
                if let Err(e) = link.call(&relay, &request, RELAY_ANSWER_DEADLINE).await {
                    tracing::debug!(relay = %relay.peer_id, error = %e, "could not announce files to a relay");
                }
            }
        }
    }
}

/// A file name from a reference, safe to create: its last path component, without leading dots,
/// at most [`SAFE_NAME_CHARS`] characters. A long name keeps its extension (what the file's type
/// is told by) and loses the end of its stem.
pub fn safe_name(name: &str) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or_default().trim_start_matches('.');
    let cleaned: Vec<char> = last.chars().filter(|c| !c.is_control() && !is_bidi_control(*c)).collect();
    if cleaned.iter().collect::<String>().trim().is_empty() {
        return "download".into();
    }
    if cleaned.len() <= SAFE_NAME_CHARS {
        return cleaned.into_iter().collect();
    }
    let ext_at = cleaned.iter().rposition(|c| *c == '.').filter(|at| cleaned.len() - at <= 11 && *at > 0);
    let ext: String = ext_at.map(|at| cleaned[at..].iter().collect()).unwrap_or_default();
    let stem: String = cleaned.iter().take(SAFE_NAME_CHARS - ext.chars().count()).collect();
    stem + &ext
}

/// Short enough for any file system's name limit, in bytes, whatever the characters.
const SAFE_NAME_CHARS: usize = 60;

/// The largest image a thumbnail is made of: decoding costs memory and time in proportion.
const MAX_THUMBNAIL_SOURCE: u64 = 32 * 1024 * 1024;
/// A thumbnail's longest side, in pixels: enough for a preview in a chat, as Telegram's.
const THUMBNAIL_SIDE: u32 = 90;

/// A small JPEG preview of an image file, made here so that chats can show it before the
/// download; empty for other files, or when the image cannot be read (it is only a preview).
async fn thumbnail_of(path: &Path, mime: &str, size: u64) -> Vec<u8> {
    if !matches!(mime, "image/jpeg" | "image/png") || size > MAX_THUMBNAIL_SOURCE {
        return Vec::new();
    }
    let path = path.to_path_buf();
    let made = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
        let mut reader = image::ImageReader::open(&path).map_err(|e| e.to_string())?;
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(16_384);
        limits.max_image_height = Some(16_384);
        limits.max_alloc = Some(512 * 1024 * 1024);
        reader.limits(limits);
        let small = reader.with_guessed_format().map_err(|e| e.to_string())?.decode().map_err(|e| e.to_string())?;
        let small = small.thumbnail(THUMBNAIL_SIDE, THUMBNAIL_SIDE).to_rgb8();
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 60)
            .encode_image(&small)
            .map_err(|e| e.to_string())?;
        Ok(jpeg)
    })
    .await;
    match made {
        Ok(Ok(jpeg)) if jpeg.len() <= crate::proto::media::MAX_THUMBNAIL_BYTES => jpeg,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "no thumbnail: the image could not be read");
            Vec::new()
        }
        _ => Vec::new(),
    }
}

/// Unicode's bidirectional controls, which make a name read otherwise than it is
/// ("photo\u{202e}gpj.exe" shows as "photoexe.jpg").
pub fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A MIME type from a file name's extension, for the common kinds a chat shows.
fn mime_of(name: &str) -> &'static str {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mp3" => "audio/mpeg",
        "ogg" | "oga" => "audio/ogg",
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        "zip" => "application/zip",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_references_stay_in_their_directory() {
        assert_eq!(safe_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_name(".bashrc"), "bashrc");
        assert_eq!(safe_name("a\\b\\photo.jpg"), "photo.jpg");
        assert_eq!(safe_name(""), "download");
        assert_eq!(safe_name("photo\u{202e}gpj.exe"), "photogpj.exe");
        let long = format!("{}.jpeg", "a".repeat(100));
        assert_eq!(safe_name(&long), format!("{}.jpeg", "a".repeat(55)));
        assert_eq!(safe_name(&"b".repeat(100)), "b".repeat(60));
        assert_eq!(safe_name(&format!("{}.not-an-extension-at-all", "c".repeat(80))).chars().count(), 60);
        assert_eq!(mime_of("Photo.JPG"), "image/jpeg");
        assert_eq!(mime_of("noext"), "application/octet-stream");
    }
}
