//! What every long-running role's `main` shares: logging to stderr, the JSON ready line on
//! stdout, and waiting for the signal to stop.

use serde::Serialize;

/// Makes what a server writes its owner's alone: the data directory (created if need be) 0700,
/// and every file or directory the process creates from now on 0600 / 0700 (the process's
/// file-creation mask). Its stores hold phone numbers, login codes, sessions and envelopes,
/// which nobody else on the machine should read.
pub fn keep_private(data_dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    rustix::process::umask(rustix::fs::Mode::from_bits_truncate(0o077));
    std::fs::create_dir_all(data_dir)?;
    std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))
}

/// Raises this process's open-file limit to the most the system allows it (each connection is a
/// descriptor, and the usual soft limit of 1,024 is a few hundred clients), and gives it.
pub fn raise_open_file_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(error = %e, "could not raise the open-file limit");
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// How a server writes its log to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Lines for people, coloured on a terminal.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields), for log shippers.
    Json,
}

/// Logs to stderr (stdout carries the ready line), filtered by `RUST_LOG`, as text (colour only
/// on a terminal) or JSON lines.
pub fn init_tracing(default_filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
}

/// The content type of the servers' `/metrics` (prometheus-client writes OpenMetrics text).
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Prints the one ready line: `ready`'s fields plus `"event":"ready"` and `"role"`.
pub fn print_ready(role: &str, ready: &impl Serialize) -> Result<(), serde_json::Error> {
    let mut line = serde_json::to_value(ready)?;
    line["event"] = "ready".into();
    line["role"] = role.into();
    println!("{line}");
    Ok(())
}

/// Waits for Ctrl-C, SIGTERM, or (with `exit_on_stdin_close`) the end of stdin; says which.
pub async fn stop_requested(exit_on_stdin_close: bool) -> std::io::Result<&'static str> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let parent_gone = async {
        if exit_on_stdin_close {
            stdin_closed().await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    Ok(tokio::select! {
        () = parent_gone => "stdin closed",
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = terminate.recv() => "terminated",
    })
}

/// Resolves when standard input reaches end of file. A parent that starts a role with a pipe
/// as its stdin (like `meshgram up`) thereby stops it even when the parent is SIGKILLed.
///
/// The read runs on a plain OS thread, not tokio's blocking pool: runtime shutdown waits for
/// blocking-pool tasks, and a read of an open pipe never finishes. The thread ends with the
/// process.
pub async fn stdin_closed() {
    let (closed, rx) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new().name("stdin-watch".into()).spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        let _ = closed.send(());
    });
    match spawned {
        Ok(_) => {
            let _ = rx.await;
        }
        // Without the watch the role still stops on SIGTERM; never stop it for this.
        Err(_) => std::future::pending().await,
    }
}
