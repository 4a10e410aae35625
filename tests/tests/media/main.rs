//! Cross-process tests of files: real gateway, real relays, real `meshgram` CLI.
//!
//! - `transfer`: a 256 MiB file uploaded by one user and downloaded by another is byte-identical;
//!   the upload SIGKILLed halfway resumes without sending a saved part again; a relay holding
//!   chunks SIGKILLed, and a chunk corrupted on a relay's disk, and the download still succeeds;
//!   no relay's files hold a window of the plaintext; a forward reuses the chunks; a peer that
//!   downloaded a file serves it when every relay holding it is down, and one serving corrupt
//!   chunks is caught; ranges; thumbnails; bad input at the CLI.
//! - `wire`: bad input straight at a relay's media protocol (wrong hash, part out of range,
//!   oversized part, total changing, someone else's upload, over quota, no Hello): each a clear
//!   refusal, nothing stored; an upload not finished within its grace is expired.

// A failed unwrap here is a failed test, which is what it should be.
#![allow(clippy::unwrap_used)]

mod transfer;
mod wire;

const ALICE: &str = "+15550001111";
const BOB: &str = "+15550002222";
const CAROL: &str = "+15550003333";
