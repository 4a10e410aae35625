//! Entry points for the fuzz targets (`fuzz/`): what a relay decodes from its own disk after a
//! crash, fed arbitrary bytes. It must skip or refuse damage, never panic.

use std::sync::atomic::{AtomicU64, Ordering};

/// The write-ahead log's decoders, by the name of their fuzz target.
pub const TARGETS: [meshgram_node::fuzzing::Target; 1] = [("wal_records", wal_records)];

/// Replays a write-ahead log holding `bytes`, record by record, as a restart would.
pub fn wal_records(bytes: &[u8]) {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("meshgram-fuzz-{}-{run}.wal", std::process::id()));
    if std::fs::write(&path, bytes).is_err() {
        return;
    }
    if let Ok(mut replay) = crate::wal::Replay::open(&path) {
        while let Ok(Some(batch)) = replay.next_batch() {
            drop(batch.effects);
        }
    }
    let _ = std::fs::remove_file(&path);
}
