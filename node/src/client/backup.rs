//! Encrypted backups of the history, opened with a recovery code shown once.
//!
//! - **On the relays** (the default): the export is uploaded like any file (random file key,
//!   encrypted chunks), and its reference is sealed under the backup key and kept by the
//!   gateway as an opaque pointer, the newest `keep` per account. A fresh profile signed in to
//!   the account lists the pointers, and the recovery code opens one.
//! - **To a file** (`-o`): the export sealed under the backup key, with the key derivation's
//!   parameters in front.
//!
//! The profile keeps the derived key (mode 0600), so later backups need no code; the code
//! itself is never stored. Secret chats are never in an export, so never in a backup.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::client::history::{BackupSchedule, HistoryExport, Imported};
use crate::client::media::OnProgress;
use crate::client::messaging::{MessagingError, Messenger};
use crate::crypto::backup::{BackupKey, BackupKeyError, RecoveryCode};
use crate::crypto::cert::unix_now;
use crate::proto::media::FileRef;
use crate::proto::{BackupRecord, KdfParams};

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

async fn derive(code: RecoveryCode, kdf: KdfParams) -> Result<BackupKey, MessagingError> {
    tokio::task::spawn_blocking(move || BackupKey::derive(&code, kdf))
        .await
        .map_err(|e| MessagingError::BadBackup(format!("deriving the key: {e}")))?
        .map_err(Into::into)
}

impl Messenger {
    fn backup_key_path(&self) -> PathBuf {
        self.client.profile().join(BACKUP_KEY_FILE)
    }

    /// Backs the history up, to the relays or (`out`) to a file. The first backup (or one with
    /// `new_code`) makes a recovery code, returned once; later ones reuse the profile's key.
    pub async fn create_backup(
        &mut self,
        out: Option<PathBuf>,
        new_code: bool,
        keep: u8,
        progress: OnProgress<'_>,
    ) -> Result<BackupMade, MessagingError> {
        self.history()?;
        let (key, code) = match BackupKey::load(&self.backup_key_path())? {
            Some(key) if !new_code => (key, None),
            _ => {
                let (key, code) = tokio::task::spawn_blocking(BackupKey::generate)
                    .await
                    .map_err(|e| MessagingError::BadBackup(format!("making a key: {e}")))?;
                (key, Some(code))
            }
        };
        let export = self.h().export(self.me(), unix_now())?;
        let messages = export.messages.len() as u64;
        let (bytes, path) = match out {
            Some(path) => (write_local_backup(&path, &key, &export)?, Some(path)),
            None => {
                let (file, bytes) = self.upload_export(&export, "backup", progress).await?;
                let pointer = BackupPointer { file, messages, exported_at: export.exported_at };
                let sealed = key.seal(&postcard::to_stdvec(&pointer).expect("invariant: pointers serialize"));
                self.client.put_backup(BackupRecord { created_at: 0, kdf: key.kdf, sealed }, keep).await?;
                self.h().backup_made(export.exported_at)?;
                (bytes, None)
            }
        };
        // Kept only once a backup made with it exists: a code never shown opens nothing.
        if code.is_some() {
            key.save(&self.backup_key_path())?;
        }
        Ok(BackupMade { recovery_code: code.map(|c| c.shown()), messages, bytes, path, created_at: export.exported_at })
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
        let (key, export) = match from {
            Some(path) => {
                let backup = read_local_backup(&path)?;
                let key = derive(code, backup.kdf).await?;
                let plain = key.open(&backup.sealed)?;
                let export: HistoryExport = postcard::from_bytes(&plain).map_err(|e| {
                    MessagingError::BadBackup(format!("{}: the backup does not parse: {e}", path.display()))
                })?;
                (key, export)
            }
            None => {
                let records = self.client.backups().await?;
                if records.is_empty() {
                    return Err(MessagingError::NoBackup("this account has no backups on the relays".into()));
                }
                let (key, pointer) = open_newest(code, &records).await?;
                (key, self.fetch_export(pointer.file, progress).await?)
            }
        };
        let imported = self.import_export(&export)?;
        if BackupKey::load(&self.backup_key_path())?.is_none() {
            key.save(&self.backup_key_path())?;
        }
        Ok(imported)
    }
}

impl Messenger {
    /// The account's backups on the relays, newest first, and whether this profile's key
    /// opens each (one made with another recovery code does not).
    pub async fn list_backups(&mut self) -> Result<Vec<BackupListed>, MessagingError> {
        let key = BackupKey::load(&self.backup_key_path())?;
        let records = self.client.backups().await?;
        Ok(records
            .iter()
            .map(|r| BackupListed {
                created_at: r.created_at,
                opens_with_this_profile: key.as_ref().is_some_and(|k| k.kdf == r.kdf && k.open(&r.sealed).is_ok()),
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

    /// Makes the scheduled backup if one is due; returns whether it made one.
    pub async fn backup_if_due(&mut self) -> Result<bool, MessagingError> {
        let Some(schedule) = self.history()?.backup_schedule()? else { return Ok(false) };
        if BackupKey::load(&self.backup_key_path())?.is_none() {
            // A key made now would come with a code nobody sees.
            tracing::warn!("backups are scheduled but this profile has no backup key; run `meshgram backup create`");
            return Ok(false);
        }
        if schedule.last_at.is_some_and(|last| unix_now() < last + schedule.every_secs) {
            return Ok(false);
        }
        // The pointer goes to the gateway last: while it is away, upload nothing in vain.
        self.client.backups().await?;
        let made = self.create_backup(None, false, schedule.keep, &|_| {}).await?;
        tracing::info!(messages = made.messages, bytes = made.bytes, "made the scheduled backup");
        Ok(true)
    }
}

/// One backup in `backup list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupListed {
    /// Unix seconds.
    pub created_at: u64,
    pub opens_with_this_profile: bool,
}

/// The newest pointer the code opens (records of an older code may come first).
async fn open_newest(
    code: RecoveryCode,
    records: &[BackupRecord],
) -> Result<(BackupKey, BackupPointer), MessagingError> {
    let mut keys: Vec<BackupKey> = Vec::new();
    for record in records {
        let key = match keys.iter().find(|k| k.kdf == record.kdf) {
            Some(key) => key.clone(),
            None => {
                let key = derive(code.clone(), record.kdf).await?;
                keys.push(key.clone());
                key
            }
        };
        if let Ok(plain) = key.open(&record.sealed) {
            let pointer = postcard::from_bytes(&plain)
                .map_err(|e| MessagingError::BadBackup(format!("the backup pointer does not parse: {e}")))?;
            return Ok((key, pointer));
        }
    }
    Err(BackupKeyError::WrongCode.into())
}

/// Seals an export into a new file at `path` (written whole, then renamed into place);
/// returns the export's plaintext size.
fn write_local_backup(path: &Path, key: &BackupKey, export: &HistoryExport) -> Result<u64, MessagingError> {
    let plain = postcard::to_stdvec(export).expect("invariant: exports serialize");
    let backup = LocalBackup { kdf: key.kdf, sealed: key.seal(&plain) };
    let bytes = [MAGIC.as_slice(), &postcard::to_stdvec(&backup).expect("invariant: backups serialize")].concat();
    crate::crypto::identity::write_secret(path, &bytes)
        .map_err(|e| MessagingError::File(format!("writing the backup: {e}")))?;
    Ok(plain.len() as u64)
}

fn read_local_backup(path: &Path) -> Result<LocalBackup, MessagingError> {
    let bytes = std::fs::read(path).map_err(|e| MessagingError::File(format!("{}: {e}", path.display())))?;
    let not_one = || MessagingError::BadBackup(format!("{} is not a Meshgram backup", path.display()));
    let body = bytes.strip_prefix(MAGIC.as_slice()).ok_or_else(not_one)?;
    postcard::from_bytes(body).map_err(|_| not_one())
}
