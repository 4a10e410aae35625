//! Encrypted backups of the history, opened with a recovery code shown once.
//!
//! - **On the relays** (the default): the export is uploaded like any file (random file key,
//!   encrypted chunks), and its reference is sealed under the backup key and kept by the
//!   gateway as an opaque pointer, the newest `keep` per account. A fresh profile signed in to
//!   the account lists the pointers, and the recovery code opens one.
//! - **To a file** (`-o`): the export sealed under the backup key, with the key derivation's
//!   parameters in front.
//!
//! Both are sealed with the account's user id as associated data, so a backup of one account
//! never restores as another's. The profile keeps the derived key (mode 0600), so later
//! backups need no code; the code itself is never stored. Secret chats are never in an export,
//! so never in a backup.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::client::devices::{MAX_EXPORT_BYTES, decode_export, encode_export};
use crate::client::history::{BackupSchedule, HistoryExport, Imported};
use crate::client::media::OnProgress;
use crate::client::messaging::{MessagingError, Messenger};
use crate::crypto::backup::{BackupKey, BackupKeyError, RecoveryCode};
use crate::crypto::cert::unix_now;
use crate::ids::UserId;
use crate::proto::media::FileRef;
use crate::proto::{BackupRecord, KdfParams, MAX_BACKUPS_KEPT};

/// The profile's backup key.
pub const BACKUP_KEY_FILE: &str = "backup.key";
/// What a local backup file starts with.
const MAGIC: &[u8; 9] = b"MGBACKUP1";
/// Backups kept on the relays unless the user says otherwise.
pub const DEFAULT_BACKUPS_KEPT: u8 = 3;
/// The shortest interval between scheduled backups.
pub const MIN_BACKUP_EVERY_SECS: u64 = 5;

/// A backup made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupMade {
    /// Shown once, when a new code was made: the only way to open this and later backups.
    pub recovery_code: Option<String>,
    pub messages: u64,
    /// Size of the export, before encryption.
    pub bytes: u64,
    /// The file written, or none when the backup went to the relays.
    pub path: Option<PathBuf>,
    /// Unix seconds.
    pub created_at: u64,
}

/// One backup in `backup list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupListed {
    /// Unix seconds, as the gateway stamped it.
    pub created_at: u64,
    pub opens_with_this_profile: bool,
}

/// What the gateway's pointer holds, sealed.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BackupPointer {
    file: FileRef,
    messages: u64,
    exported_at: u64,
}

/// A backup written to a file: the key derivation's parameters, and the sealed export.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LocalBackup {
    kdf: KdfParams,
    #[serde(with = "serde_bytes")]
    sealed: Vec<u8>,
}

/// What a backup of `user`'s history is sealed with, besides the key.
fn associated_data(user: UserId) -> Vec<u8> {
    [b"meshgram backup of user ".as_slice(), &user.0.to_le_bytes()].concat()
}

fn join_error(what: &str, e: tokio::task::JoinError) -> MessagingError {
    MessagingError::BadBackup(format!("{what}: {e}"))
}

async fn derive(code: RecoveryCode, kdf: KdfParams) -> Result<BackupKey, MessagingError> {
    tokio::task::spawn_blocking(move || BackupKey::derive(&code, kdf))
        .await
        .map_err(|e| join_error("deriving the key", e))?
        .map_err(Into::into)
}

/// The export's content, whenever it was made: equal for an unchanged history.
fn content_hash(export: &mut HistoryExport) -> Result<u64, MessagingError> {
    let at = std::mem::take(&mut export.exported_at);
    let bytes = encode_export(export);
    export.exported_at = at;
    let hash = blake3::hash(&bytes?);
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    Ok(u64::from_le_bytes(first))
}

/// Checks a number of backups to keep.
pub fn check_keep(keep: u8) -> Result<u8, MessagingError> {
    match keep {
        1..=MAX_BACKUPS_KEPT => Ok(keep),
        _ => Err(MessagingError::BadBackup(format!("keep 1 to {MAX_BACKUPS_KEPT} backups, not {keep}"))),
    }
}

impl Messenger {
    fn backup_key_path(&self) -> PathBuf {
        self.client.profile().join(BACKUP_KEY_FILE)
    }

    /// Backs the history up, to the relays or (`out`) to a file. The first backup (or one with
    /// `new_code`) makes a recovery code, returned once; later ones reuse the profile's key.
    /// `keep`: backups the relays keep (default: the schedule's, else 3).
    pub async fn create_backup(
        &mut self,
        out: Option<PathBuf>,
        new_code: bool,
        keep: Option<u8>,
        progress: OnProgress<'_>,
    ) -> Result<BackupMade, MessagingError> {
        let scheduled = self.history()?.backup_schedule()?.map(|s| s.keep);
        let keep = check_keep(keep.or(scheduled).unwrap_or(DEFAULT_BACKUPS_KEPT))?;
        let (key, code) = match BackupKey::load(&self.backup_key_path())? {
            Some(key) if !new_code => (key, None),
            _ => {
                let (key, code) = tokio::task::spawn_blocking(BackupKey::generate)
                    .await
                    .map_err(|e| join_error("making a key", e))?;
                (key, Some(code))
            }
        };
        let mut export = self.export_now().await?;
        let hash = content_hash(&mut export)?;
        let made = self.back_up(export, &key, out, keep, progress).await?;
        if made.path.is_none() {
            self.h().set_backup_hash(hash)?;
        }
        // Kept only once a backup made with it exists: a code never shown opens nothing.
        if code.is_some() {
            key.save(&self.backup_key_path())?;
        }
        Ok(BackupMade { recovery_code: code.map(|c| c.shown()), ..made })
    }

    async fn back_up(
        &mut self,
        export: HistoryExport,
        key: &BackupKey,
        out: Option<PathBuf>,
        keep: u8,
        progress: OnProgress<'_>,
    ) -> Result<BackupMade, MessagingError> {
        let (messages, created_at) = (export.messages.len() as u64, export.exported_at);
        let aad = associated_data(self.me());
        let (bytes, path) = match out {
            Some(path) => {
                let (key, at) = (key.clone(), path.clone());
                let bytes = tokio::task::spawn_blocking(move || write_local_backup(&at, &key, &export, &aad))
                    .await
                    .map_err(|e| join_error("writing the backup", e))??;
                (bytes, Some(path))
            }
            None => {
                let (file, bytes) = self.upload_export(&export, "backup", progress).await?;
                let pointer = BackupPointer { file, messages, exported_at: created_at };
                let sealed = key.seal(&postcard::to_stdvec(&pointer).expect("invariant: pointers serialize"), &aad);
                self.client.put_backup(BackupRecord { created_at: 0, kdf: key.kdf, sealed }, keep).await?;
                self.h().backup_made(created_at)?;
                (bytes, None)
            }
        };
        Ok(BackupMade { recovery_code: None, messages, bytes, path, created_at })
    }

    /// Restores a backup (the newest on the relays that the code opens, or the file `from`)
    /// into this profile's history, and keeps its key for later backups.
    pub async fn restore_backup(
        &mut self,
        code: &str,
        from: Option<PathBuf>,
        progress: OnProgress<'_>,
    ) -> Result<Imported, MessagingError> {
        self.history()?;
        let code: RecoveryCode = code.parse()?;
        let aad = associated_data(self.me());
        let (key, export) = match from {
            Some(path) => {
                let backup = read_local_backup(&path)?;
                let key = derive(code, backup.kdf).await?;
                let plain = key.open(&backup.sealed, &aad)?;
                (key, decode_export(&plain)?)
            }
            None => {
                let records = self.client.backups().await?;
                if records.is_empty() {
                    return Err(MessagingError::NoBackup("this account has no backups on the relays".into()));
                }
                let (key, pointer) = open_newest(code, &records, &aad).await?;
                (key, self.fetch_export(pointer.file, progress).await?)
            }
        };
        let imported = self.import_export(export).await?;
        if BackupKey::load(&self.backup_key_path())?.is_none() {
            key.save(&self.backup_key_path())?;
        }
        Ok(imported)
    }

    /// The account's backups on the relays, newest first, and whether this profile's key
    /// opens each (one made with another recovery code does not).
    pub async fn list_backups(&mut self) -> Result<Vec<BackupListed>, MessagingError> {
        let key = BackupKey::load(&self.backup_key_path())?;
        let aad = associated_data(self.me());
        let records = self.client.backups().await?;
        Ok(records
            .iter()
            .map(|r| BackupListed {
                created_at: r.created_at,
                opens_with_this_profile: key
                    .as_ref()
                    .is_some_and(|k| k.kdf == r.kdf && k.open(&r.sealed, &aad).is_ok()),
            })
            .collect())
    }

    /// Sets the client node's periodic backups to the relays (`every_secs: None` ends them).
    /// They use the profile's backup key, so a first backup (which shows the code) must exist.
    pub fn schedule_backups(
        &mut self,
        every_secs: Option<u64>,
        keep: u8,
    ) -> Result<Option<BackupSchedule>, MessagingError> {
        let keep = check_keep(keep)?;
        if every_secs.is_some() && BackupKey::load(&self.backup_key_path())?.is_none() {
            return Err(MessagingError::NoBackup(
                "make a first backup with `meshgram backup create` (it shows your recovery code), then schedule more"
                    .into(),
            ));
        }
        let history = self.history()?;
        history.set_backup_schedule(every_secs.map(|every| (every, keep)))?;
        Ok(history.backup_schedule()?)
    }

    /// Makes the scheduled backup if one is due and the history changed since the last one;
    /// returns whether it made one.
    pub async fn backup_if_due(&mut self) -> Result<bool, MessagingError> {
        let Some(schedule) = self.history()?.backup_schedule()? else { return Ok(false) };
        if schedule.last_at.is_some_and(|last| unix_now() < last.saturating_add(schedule.every_secs)) {
            return Ok(false);
        }
        let Some(key) = BackupKey::load(&self.backup_key_path())? else {
            // A key made now would come with a code nobody sees.
            tracing::warn!("backups are scheduled but this profile has no backup key; run `meshgram backup create`");
            return Ok(false);
        };
        let mut export = self.export_now().await?;
        let hash = content_hash(&mut export)?;
        if self.h().backup_hash()? == Some(hash) {
            // The newest backup holds all of it: it is as good as made now.
            self.h().backup_made(unix_now())?;
            return Ok(false);
        }
        // The pointer goes to the gateway last: while it is away, upload nothing in vain.
        self.client.backups().await?;
        let made = self.back_up(export, &key, None, schedule.keep, &|_| {}).await?;
        self.h().set_backup_hash(hash)?;
        tracing::info!(messages = made.messages, bytes = made.bytes, "made the scheduled backup");
        Ok(true)
    }
}

/// The newest backup the code opens, by the time sealed inside it (the gateway's order and
/// stamps are not trusted); records it cannot open (another code, a forged or damaged record)
/// are skipped.
async fn open_newest(
    code: RecoveryCode,
    records: &[BackupRecord],
    aad: &[u8],
) -> Result<(BackupKey, BackupPointer), MessagingError> {
    let mut keys: Vec<BackupKey> = Vec::new();
    let mut newest: Option<(BackupKey, BackupPointer)> = None;
    for record in records {
        let key = match keys.iter().find(|k| k.kdf == record.kdf) {
            Some(key) => key.clone(),
            None => match derive(code.clone(), record.kdf).await {
                Ok(key) => {
                    keys.push(key.clone());
                    key
                }
                Err(e) => {
                    tracing::warn!(error = %e, "skipping a backup record");
                    continue;
                }
            },
        };
        let Some(pointer) =
            key.open(&record.sealed, aad).ok().and_then(|p| postcard::from_bytes::<BackupPointer>(&p).ok())
        else {
            continue;
        };
        if newest.as_ref().is_none_or(|(_, n)| pointer.exported_at > n.exported_at) {
            newest = Some((key, pointer));
        }
    }
    newest.ok_or_else(|| BackupKeyError::WrongCode.into())
}

/// Seals an export into a new file at `path`; returns the export's plaintext size.
fn write_local_backup(path: &Path, key: &BackupKey, export: &HistoryExport, aad: &[u8]) -> Result<u64, MessagingError> {
    let plain = encode_export(export)?;
    let backup = LocalBackup { kdf: key.kdf, sealed: key.seal(&plain, aad) };
    let bytes = [MAGIC.as_slice(), &postcard::to_stdvec(&backup).expect("invariant: backups serialize")].concat();
    crate::crypto::identity::write_secret(path, &bytes)
        .map_err(|e| MessagingError::File(format!("writing the backup: {e}")))?;
    Ok(plain.len() as u64)
}

fn read_local_backup(path: &Path) -> Result<LocalBackup, MessagingError> {
    let not_one = || MessagingError::BadBackup(format!("{} is not a Meshgram backup", path.display()));
    let size = std::fs::metadata(path).map_err(|e| MessagingError::File(format!("{}: {e}", path.display())))?.len();
    if size > MAX_EXPORT_BYTES + 4096 {
        return Err(not_one());
    }
    let bytes = std::fs::read(path).map_err(|e| MessagingError::File(format!("{}: {e}", path.display())))?;
    let body = bytes.strip_prefix(MAGIC.as_slice()).ok_or_else(not_one)?;
    postcard::from_bytes(body).map_err(|_| not_one())
}
