//! The account's devices, and the history moving to a new one.
//!
//! ```text
//! new device                      relays / chunk store                old device
//! login ── HistoryRequest{name} ─▶ (sealed to each own device) ─────▶ recorded, "asks for history"
//!                                                                     user: devices approve ID
//!                                  ◀── export uploaded as a file ──── (random file key)
//!        ◀── History{file ref} ──── (sealed to the new device only) ─
//! fetch, verify, merge ◀─────────── chunks
//! ```
//!
//! Nothing moves without a user's approval on a device that has the history: a stolen SIM
//! signs in, but reads nothing old. What does move is sealed to the new device's Noise key
//! alone (the file reference carries the export's key), so relays hold ciphertext only.

use std::path::{Path, PathBuf};

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::client::history::{EXPORT_FORMAT, HistoryExport, Imported, PendingImport};
use crate::client::media::{OnProgress, Resume, Serve};
use crate::client::messaging::{MessagingError, Messenger};
use crate::crypto::cert::{AccountKind, unix_now};
use crate::defaults::CARD_FRESH_SECS;
use crate::ids::SessionId;
use crate::proto::LookupQuery;
use crate::proto::UserCard;
use crate::proto::payload::{Body, MessageId, Payload};

/// Largest history export a device sends or takes: it is read whole into memory to merge
/// (10,000 messages make about 1 MB).
pub(crate) const MAX_EXPORT_BYTES: u64 = 256 << 20;
/// Where exports and imports are written while they move (inside the profile, which only its
/// owner may enter: `session::keep_private`).
const TRANSFER_DIR: &str = "transfers";
/// The shortest part of a device id that may name it.
const MIN_DEVICE_ID_PART: usize = 6;

/// One device of the account, as `meshgram devices` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub device: PeerId,
    pub name: String,
    /// Of its public keys ([`crate::crypto::identity::DeviceKeys::fingerprint`]).
    pub fingerprint: String,
    pub session_id: SessionId,
    /// Unix seconds.
    pub created_at: u64,
    pub last_seen: u64,
    /// This device.
    pub current: bool,
    /// It asked this device for the history.
    pub asked_for_history: bool,
    /// When this device sent it the history (unix seconds).
    pub history_sent_at: Option<u64>,
}

/// What `devices approve` sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistorySent {
    pub device: PeerId,
    pub messages: u64,
    /// Size of the export, before encryption.
    pub bytes: u64,
}

/// A directory for files on their way in or out, created if need be.
pub(crate) fn transfer_dir(profile: &Path) -> Result<PathBuf, MessagingError> {
    let dir = profile.join(TRANSFER_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| MessagingError::File(format!("{}: {e}", dir.display())))?;
    Ok(dir)
}

/// Removes what a stopped process left in the transfer directory (plaintext exports among
/// them). Only the profile's one node uses it, so whatever is there when it starts is stale.
pub fn clear_transfers(profile: &Path) {
    let Ok(entries) = std::fs::read_dir(profile.join(TRANSFER_DIR)) else { return };
    for entry in entries.flatten() {
        if let Err(e) = std::fs::remove_file(entry.path()) {
            tracing::warn!(file = %entry.path().display(), error = %e, "cannot remove a stale transfer file");
        }
    }
}

/// A fresh file name in the transfer directory.
pub(crate) fn transfer_file(profile: &Path, what: &str) -> Result<PathBuf, MessagingError> {
    Ok(transfer_dir(profile)?.join(format!("{what}-{}", crate::ids::hex(&rand::random::<[u8; 8]>()))))
}

/// An export as it travels, refused when larger than a device takes.
pub(crate) fn encode_export(export: &HistoryExport) -> Result<Vec<u8>, MessagingError> {
    let bytes = postcard::to_stdvec(export).expect("invariant: exports serialize");
    if bytes.len() as u64 > MAX_EXPORT_BYTES {
        return Err(MessagingError::BadBackup(format!(
            "the history is {} bytes, more than the {MAX_EXPORT_BYTES} a device takes in one piece",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// An export as written by [`encode_export`], of this build's layout or an earlier one.
pub(crate) fn decode_export(bytes: &[u8]) -> Result<HistoryExport, MessagingError> {
    HistoryExport::decode(bytes)
        .map_err(|e| MessagingError::BadBackup(format!("the history does not parse: {e}")))?
        .map_err(|format| {
            MessagingError::BadBackup(format!("the history is in format {format}; this build reads {EXPORT_FORMAT}"))
        })
}

/// The device `id` names: its whole id or session id, or a part of its id that only it has.
fn find_device<'a>(devices: &'a [DeviceInfo], id: &str) -> Result<&'a DeviceInfo, MessagingError> {
    let id = id.trim();
    if let Some(d) = devices.iter().find(|d| d.device.to_string() == id || d.session_id.to_string() == id) {
        return Ok(d);
    }
    let matching: Vec<&DeviceInfo> = if id.len() >= MIN_DEVICE_ID_PART {
        devices.iter().filter(|d| d.device.to_string().contains(id)).collect()
    } else {
        Vec::new()
    };
    match matching.as_slice() {
        [one] => Ok(one),
        [] => Err(MessagingError::UnknownDevice(format!(
            "no device of this account matches '{id}'; `meshgram devices` lists them"
        ))),
        _ => Err(MessagingError::UnknownDevice(format!(
            "'{id}' matches {} devices; give more of its id",
            matching.len()
        ))),
    }
}

impl Messenger {
    /// Asks the account's other devices for the history (a device that just signed in). Goes
    /// through the outbox, so it is sent later if no relay can take it now.
    pub async fn request_history(&mut self, device_name: String) -> Result<(), MessagingError> {
        self.history()?;
        let payload = Payload {
            message_id: MessageId::random(),
            chat_with: self.me(),
            body: Body::HistoryRequest { device_name },
        };
        self.h().want_history(unix_now())?;
        self.h().queue(Vec::new(), &[payload])?;
        match self.flush_outbox().await {
            Err(e) if !e.may_pass() => Err(e),
            _ => Ok(()),
        }
    }

    /// The account's signed-in devices (not its bots'), oldest first.
    pub async fn devices(&mut self) -> Result<Vec<DeviceInfo>, MessagingError> {
        self.history()?;
        let sessions = self.client.sessions().await?;
        let card = self.lookup(LookupQuery::UserId(self.me())).await?;
        let requests = self.h().device_requests()?;
        Ok(sessions
            .into_iter()
            .filter(|s| s.kind == AccountKind::User)
            .map(|s| {
                let request = requests.iter().find(|r| r.device == s.device);
                DeviceInfo {
                    device: s.device,
                    name: s.device_name,
                    fingerprint: card
                        .devices
                        .iter()
                        .find(|d| d.peer_id == s.device)
                        .map(|d| d.keys.fingerprint())
                        .unwrap_or_default(),
                    session_id: s.session_id,
                    created_at: s.created_at,
                    last_seen: s.last_seen,
                    current: s.current,
                    asked_for_history: request.is_some_and(|r| r.sent_at.is_none()),
                    history_sent_at: request.and_then(|r| r.sent_at),
                }
            })
            .collect())
    }

    /// Sends the history to one of the account's other devices: exported, uploaded to the chunk
    /// store as an encrypted file, and its reference sealed to that device alone.
    pub async fn approve_device(&mut self, id: &str, progress: OnProgress<'_>) -> Result<HistorySent, MessagingError> {
        let devices = self.devices().await?;
        let target = find_device(&devices, id)?.clone();
        if target.current {
            return Err(MessagingError::UnknownDevice("that is this device; approve a new one".into()));
        }
        let me = self.me();
        let card =
            self.h().card(me)?.ok_or_else(|| MessagingError::UnknownDevice("no card for this account".into()))?;
        let Some(keys) = card.devices.iter().find(|d| d.peer_id == target.device).cloned() else {
            return Err(MessagingError::UnknownDevice(format!("device {} is not signed in", target.device)));
        };
        let export = self.export_now().await?;
        let messages = export.messages.len() as u64;
        let (file, bytes) = self.upload_export(&export, "history", progress).await?;
        let to_that_device_only = UserCard { devices: vec![keys], ..card };
        let payload =
            Payload { message_id: MessageId::random(), chat_with: me, body: Body::History { file, messages } };
        self.send_sealed(&to_that_device_only, vec![payload], false).await?;
        self.h().history_sent(target.device, &target.name, unix_now())?;
        tracing::info!(device = %target.device, messages, bytes, "sent the history to a new device");
        Ok(HistorySent { device: target.device, messages, bytes })
    }

    /// Writes an export to a file, uploads it (not served to peers: it is deleted at once) and
    /// returns its reference and plaintext size.
    pub(crate) async fn upload_export(
        &mut self,
        export: &HistoryExport,
        what: &str,
        progress: OnProgress<'_>,
    ) -> Result<(crate::proto::media::FileRef, u64), MessagingError> {
        let bytes = encode_export(export)?;
        let path = transfer_file(self.client.profile(), what)?;
        crate::crypto::identity::write_secret(&path, &bytes)
            .map_err(|e| MessagingError::File(format!("writing the export: {e}")))?;
        let uploaded = self.upload(&path, None, progress, Serve::No, Resume::No).await;
        let _ = std::fs::remove_file(&path);
        Ok((uploaded?, bytes.len() as u64))
    }

    /// Ends another device's session; its contacts are told to look the card up again.
    pub async fn remove_device(&mut self, id: &str) -> Result<DeviceInfo, MessagingError> {
        let devices = self.devices().await?;
        let target = find_device(&devices, id)?.clone();
        if target.current {
            return Err(MessagingError::UnknownDevice(
                "that is this device; sign it out with `meshgram sessions revoke` from another".into(),
            ));
        }
        self.client.revoke_sessions(Some(target.session_id)).await?;
        self.lookup(LookupQuery::UserId(self.me())).await?;
        self.announce_devices_changed().await;
        Ok(target)
    }

    /// Tells every contact this account's devices changed (best effort: each looks the card up
    /// again before its next send anyway).
    pub(crate) async fn announce_devices_changed(&mut self) {
        let contacts = match self.h().chats() {
            Ok(chats) => chats,
            Err(e) => return tracing::warn!(error = %e, "cannot list contacts to tell of the device change"),
        };
        let me = self.me();
        for contact in contacts.into_iter().filter(|c| *c != me) {
            let sent = match self.card(LookupQuery::UserId(contact), CARD_FRESH_SECS).await {
                Ok(card) => {
                    let payload =
                        Payload { message_id: MessageId::random(), chat_with: contact, body: Body::DevicesChanged };
                    self.send_sealed(&card, vec![payload], false).await.map(drop)
                }
                Err(e) => Err(e),
            };
            if let Err(e) = sent {
                tracing::info!(%contact, error = %e, "could not tell a contact of the device change");
            }
        }
    }

    /// Fetches and merges each history sent to this device. One that is bad (does not parse,
    /// does not decrypt, another account's) is dropped; any other failure (relays away, the
    /// disk full) leaves it waiting for the next call, and is returned once the rest are done.
    pub async fn import_pending(&mut self, progress: OnProgress<'_>) -> Result<Vec<Imported>, MessagingError> {
        let (mut done, mut failed) = (Vec::new(), None);
        for (key, job) in self.history()?.pending_imports()? {
            match self.import_from(&job, progress).await {
                Ok(imported) => {
                    tracing::info!(from = %job.from_device, sent = job.messages, ?imported, "imported the history from another device");
                    self.h().remove_pending_import(&key)?;
                    self.h().history_received()?;
                    done.push(imported);
                }
                Err(
                    e @ (MessagingError::BadBackup(_) | MessagingError::BadFile(_) | MessagingError::MediaCrypto(_)),
                ) => {
                    tracing::warn!(from = %job.from_device, error = %e, "dropping a history that cannot be imported");
                    self.h().remove_pending_import(&key)?;
                }
                Err(e) => failed = Some(e),
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }

    async fn import_from(&mut self, job: &PendingImport, progress: OnProgress<'_>) -> Result<Imported, MessagingError> {
        let export = self.fetch_export(job.file.clone(), progress).await?;
        self.import_export(export).await
    }

    /// Fetches an uploaded export by its reference and parses it.
    pub(crate) async fn fetch_export(
        &mut self,
        file: crate::proto::media::FileRef,
        progress: OnProgress<'_>,
    ) -> Result<HistoryExport, MessagingError> {
        if file.size > MAX_EXPORT_BYTES {
            return Err(MessagingError::BadBackup(format!(
                "an export of {} bytes is more than this device takes",
                file.size
            )));
        }
        let path = transfer_file(self.client.profile(), "import")?;
        let fetched = self.fetch_file(file, &path, None, progress, Serve::No).await;
        let bytes = fetched.and_then(|_| std::fs::read(&path).map_err(|e| MessagingError::File(e.to_string())));
        let _ = std::fs::remove_file(&path);
        decode_export(&bytes?)
    }

    /// Merges an export of this account's history into this device's (off the async
    /// workers: one transaction over the whole history), then applies the changes that
    /// arrived before their messages.
    pub(crate) async fn import_export(&mut self, export: HistoryExport) -> Result<Imported, MessagingError> {
        if export.user_id != self.me() {
            return Err(MessagingError::BadBackup(format!(
                "this history is account {}'s, not {}'s",
                export.user_id,
                self.me()
            )));
        }
        let (history, groups) = (self.history()?.clone(), self.groups()?.clone());
        let changed_groups = std::sync::Arc::clone(&self.groups_changed);
        let imported = tokio::task::spawn_blocking(move || {
            let imported = history.import(&export)?;
            history.replay_parked(unix_now())?;
            if groups.import(&export.groups)? > 0 {
                // The node's group reader reads the new set at once.
                changed_groups.notify_one();
            }
            Ok::<_, MessagingError>(imported)
        })
        .await
        .map_err(|e| MessagingError::BadBackup(format!("importing: {e}")))??;
        Ok(imported)
    }

    /// The history as of now, exported off the async workers.
    pub(crate) async fn export_now(&mut self) -> Result<HistoryExport, MessagingError> {
        let (history, groups, me) = (self.history()?.clone(), self.groups()?.clone(), self.me());
        tokio::task::spawn_blocking(move || {
            let mut export = history.export(me, unix_now())?;
            export.groups = groups.for_another_device()?;
            Ok::<_, crate::client::history::HistoryError>(export)
        })
        .await
        .map_err(|e| MessagingError::BadBackup(format!("exporting: {e}")))?
        .map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(current: bool) -> DeviceInfo {
        DeviceInfo {
            device: PeerId::random(),
            name: "laptop".into(),
            fingerprint: String::new(),
            session_id: SessionId(rand::random()),
            created_at: 0,
            last_seen: 0,
            current,
            asked_for_history: false,
            history_sent_at: None,
        }
    }

    #[test]
    fn a_device_is_named_by_its_id_its_session_or_a_part_only_it_has() {
        let devices = vec![device(true), device(false)];
        let id = devices[1].device.to_string();
        assert_eq!(find_device(&devices, &id).expect("whole id").device, devices[1].device);
        let session = devices[1].session_id.to_string();
        assert_eq!(find_device(&devices, &session).expect("session id").device, devices[1].device);
        assert_eq!(find_device(&devices, &id[id.len() - 8..]).expect("its tail").device, devices[1].device);
        assert!(find_device(&devices, "12D3KooW").is_err(), "every id starts so: ambiguous");
        assert!(find_device(&devices, "abc").is_err(), "too short to name anything");
        assert!(find_device(&devices, "zzzzzzzzzz").is_err());
    }
}
