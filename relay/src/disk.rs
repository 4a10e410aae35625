//! Whether the disk under the data dir takes writes: checked before the store opens, and, once a
//! write failed, every few seconds until it does again (see `Relay::wait`).

use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::Path;

/// The probe's file in the data dir; a fixed name, so that one a crash left is written over.
const PROBE_FILE: &str = "disk-probe";
/// What a probe writes and syncs: room for a few full batches of envelopes (a send of
/// 256 × 64 KiB is ~16 MiB, but a typical batch is a few KiB), so that a disk with just a page
/// or two free, which would fail again at once, does not pass.
const PROBE_BYTES: usize = 1 << 20;

/// Writes, syncs and removes a [`PROBE_BYTES`] file in `dir`: `Ok` if the disk took it.
pub(crate) fn probe(dir: &Path) -> io::Result<()> {
    let path = dir.join(PROBE_FILE);
    let written = write_synced(&path);
    // Removed whatever happened: a probe on a full disk must not hold what little is free.
    let removed = match fs::remove_file(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    };
    written.and(removed)
}

fn write_synced(path: &Path) -> io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(&vec![0u8; PROBE_BYTES])?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        probe(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(probe(&dir.path().join("missing")).is_err(), "a dir that is not there takes no writes");
    }
}
