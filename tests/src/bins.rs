//! Finding the workspace's built binaries: `cargo build` puts them in `target/<profile>/`.

use std::path::{Path, PathBuf};

/// The gateway binary's name.
pub const GATEWAY_BIN: &str = "meshgram-gateway";
/// The user CLI's name.
pub const CLI_BIN: &str = "meshgram";
/// The relay binary's name.
pub const RELAY_BIN: &str = "meshgram-relay";
/// The bot bridge's name.
pub const BRIDGE_BIN: &str = "meshgram-bot-bridge";

/// The cargo target directory: `$CARGO_TARGET_DIR` (relative to the workspace root when
/// relative) or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = manifest.parent().unwrap_or(manifest);
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if Path::new(&dir).is_absolute() => PathBuf::from(dir),
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    }
}

/// Path of a built workspace binary in `target/<profile>/`, where `<profile>` is `debug` unless
/// `MESHGRAM_PROFILE_DIR_NAME` names another (e.g. `release`).
///
/// `CARGO_BIN_EXE_*` is only set inside a binary's own package, hence this lookup.
pub fn bin_path(name: &str) -> PathBuf {
    let profile = std::env::var("MESHGRAM_PROFILE_DIR_NAME").unwrap_or_else(|_| "debug".to_string());
    let path = target_dir().join(profile).join(name);
    assert!(
        path.is_file(),
        "{} does not exist: run `cargo build --workspace --bins` first \
         (set MESHGRAM_PROFILE_DIR_NAME=release to test a release build)",
        path.display()
    );
    path
}
