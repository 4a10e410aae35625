//! Big test files: pseudo-random (blake3's output stream, seeded), written and hashed in
//! bounded memory.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

/// Writes `size` pseudo-random bytes (the same for the same `seed`) to `path`.
pub fn random_file(path: &Path, size: u64, seed: &str) {
    let mut stream = blake3::Hasher::new().update(seed.as_bytes()).finalize_xof();
    let mut out = BufWriter::new(File::create(path).expect("create the test file"));
    let mut block = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        stream.fill(&mut block[..n]);
        out.write_all(&block[..n]).expect("write the test file");
        left -= n as u64;
    }
    out.flush().expect("flush the test file");
}

/// The blake3 hash of a file's bytes, in hex.
pub fn blake3_of_file(path: &Path) -> String {
    let mut hasher = blake3::Hasher::new();
    let mut file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut block = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut block).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        hasher.update(&block[..n]);
    }
    hasher.finalize().to_hex().to_string()
}
