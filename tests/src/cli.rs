//! One-shot commands under a hard timeout, and the `meshgram` CLI driven through them.

use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::server::{join_bounded, wait_exit};
use crate::{CLI_BIN, bin_path};

/// How long one CLI command may take; the CLI's own request timeout is 30 s, so a command that
/// is still running after this is hung.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// What a finished command printed.
#[derive(Debug)]
pub struct CliOutput {
    /// The command line, for failure messages.
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// Asserts success and parses stdout as one JSON document.
    pub fn ok_json(&self) -> Value {
        assert!(self.status.success(), "expected success:\n{self}");
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{self}"))
    }

    /// Asserts success and parses each line of stdout as JSON: the events a command printed
    /// while it ran (`upload --json`, say), its result last.
    pub fn ok_json_lines(&self) -> Vec<Value> {
        assert!(self.status.success(), "expected success:\n{self}");
        json_lines(&self.stdout)
    }

    /// Asserts exit status 1 with a `{"error":{"code":..,"message":..}}` document on stdout (its
    /// last line: a transfer prints progress events before it), and returns the `error` object.
    pub fn err_json(&self) -> Value {
        assert_eq!(self.status.code(), Some(1), "expected exit status 1 (an error):\n{self}");
        let last = self.stdout.trim().lines().last().unwrap_or_default();
        let doc: Value =
            serde_json::from_str(last).unwrap_or_else(|e| panic!("error output is not JSON ({e}):\n{self}"));
        let error = doc.get("error").cloned().unwrap_or_else(|| panic!("stdout has no `error` object:\n{self}"));
        assert!(error["code"].is_string(), "error has no string `code`:\n{self}");
        assert!(
            error["message"].as_str().is_some_and(|m| !m.trim().is_empty()),
            "error has no human-readable `message`:\n{self}"
        );
        error
    }

    /// Asserts the command failed with one of `codes`, returning the `error` object.
    pub fn expect_err(&self, codes: &[&str]) -> Value {
        let error = self.err_json();
        let code = error["code"].as_str().unwrap_or_default();
        assert!(codes.contains(&code), "expected error code {codes:?}, got {code}:\n{self}");
        error
    }

    /// Asserts a `FLOOD_WAIT` error with `0 < retry_after <= max_secs`; returns `retry_after`.
    pub fn expect_flood_wait(&self, max_secs: u64) -> u64 {
        let error = self.expect_err(&["FLOOD_WAIT"]);
        let retry = error["retry_after"].as_u64().unwrap_or_else(|| panic!("FLOOD_WAIT without retry_after:\n{self}"));
        assert!(retry > 0 && retry <= max_secs, "retry_after {retry} not in 1..={max_secs}:\n{self}");
        retry
    }
}

impl fmt::Display for CliOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "$ {}\n{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command, self.status, self.stdout, self.stderr
        )
    }
}

/// A command still running, with its stdin open for answering prompts.
#[derive(Debug)]
pub struct CliChild {
    pub(crate) command: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
    deadline: Instant,
    reaped: bool,
}

impl CliChild {
    /// Starts `bin args…` with piped stdin, stdout and stderr; it must end within [`CLI_TIMEOUT`].
    pub fn spawn(bin: &Path, args: &[&str]) -> CliChild {
        let command =
            format!("{} {}", bin.display(), args.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(" "));
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn `{command}`: {e}"));
        let stdout = child.stdout.take().map(|out| thread::spawn(move || read_all(out)));
        let stderr = child.stderr.take().map(|err| thread::spawn(move || read_all(err)));
        let stdin = child.stdin.take();
        CliChild { command, child, stdin, stdout, stderr, deadline: Instant::now() + CLI_TIMEOUT, reaped: false }
    }

    /// Whether the process has ended.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Writes `line` and a newline to stdin. A process that already exited (broken pipe) is
    /// not an error here: [`CliChild::finish`] reports what it said.
    pub fn write_line(&mut self, line: &str) {
        let Some(stdin) = self.stdin.as_mut() else {
            return;
        };
        match writeln!(stdin, "{line}").and_then(|()| stdin.flush()) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::BrokenPipe => {}
            Err(e) => panic!("writing to stdin of `{}`: {e}", self.command),
        }
    }

    /// Gives the process up to `timeout` from now (instead of [`CLI_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.deadline = Instant::now() + timeout;
        self
    }

    /// Kills the process with SIGKILL and returns what it printed until then.
    pub fn kill(mut self) -> CliOutput {
        let _ = self.child.kill();
        let status = self.child.wait().unwrap_or_else(|e| panic!("waiting for `{}`: {e}", self.command));
        self.reaped = true;
        let (stdout, stderr) = self.collect();
        CliOutput { command: self.command.clone(), status, stdout, stderr }
    }

    /// Closes stdin and waits for the exit (killing the process and panicking on timeout).
    pub fn finish(mut self) -> CliOutput {
        drop(self.stdin.take());
        let status = wait_exit(&mut self.child, self.deadline.saturating_duration_since(Instant::now()));
        let Some(status) = status else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.reaped = true;
            let (stdout, stderr) = self.collect();
            panic!(
                "`{}` did not finish within {CLI_TIMEOUT:?}; killed it\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
                self.command
            );
        };
        self.reaped = true;
        let (stdout, stderr) = self.collect();
        CliOutput { command: self.command.clone(), status, stdout, stderr }
    }

    fn collect(&mut self) -> (String, String) {
        let text =
            |h: Option<JoinHandle<String>>| h.and_then(join_bounded).unwrap_or_else(|| "<pipe still open>".into());
        (text(self.stdout.take()), text(self.stderr.take()))
    }
}

impl Drop for CliChild {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Each non-empty line of `text` as JSON; lines that are not JSON are skipped.
pub fn json_lines(text: &str) -> Vec<Value> {
    text.lines().filter_map(|line| serde_json::from_str(line.trim()).ok()).collect()
}

fn read_all(mut from: impl Read) -> String {
    let mut bytes = Vec::new();
    // A read error ends the capture; whatever arrived is still worth showing.
    let _ = from.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Runs `bin args…` to completion under [`CLI_TIMEOUT`], feeding it `stdin` (then EOF).
pub fn run(bin: &Path, args: &[&str], stdin: Option<&str>) -> CliOutput {
    let mut child = CliChild::spawn(bin, args);
    if let Some(text) = stdin
        && let Some(pipe) = child.stdin.as_mut()
    {
        match pipe.write_all(text.as_bytes()) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::BrokenPipe => {}
            Err(e) => panic!("writing to stdin of `{}`: {e}", child.command),
        }
    }
    child.finish()
}

/// `meshgram --profile <profile> --json <args…>` prefixed argument list.
fn cli_args<'a>(profile: &'a Path, args: &[&'a str]) -> Vec<&'a str> {
    let profile = profile.to_str().unwrap_or_else(|| panic!("profile path {} is not UTF-8", profile.display()));
    let mut all = vec!["--profile", profile, "--json"];
    all.extend_from_slice(args);
    all
}

/// Runs `meshgram --profile <profile> --json <args…>` with an empty stdin.
pub fn meshgram(profile: &Path, args: &[&str]) -> CliOutput {
    run(&bin_path(CLI_BIN), &cli_args(profile, args), None)
}

/// The account number of the profile's account (`whoami`).
pub fn whoami_user_id(profile: &Path) -> u64 {
    crate::u64_field(&meshgram(profile, &["whoami"]).ok_json()["account"], "user_id")
}

/// How many envelopes the profile's client dropped as forged or unopenable (`whoami`).
pub fn dropped_envelopes(profile: &Path) -> u64 {
    crate::u64_field(&meshgram(profile, &["whoami"]).ok_json(), "dropped_envelopes")
}

/// Like [`meshgram`], writing `stdin_text` to its stdin first.
pub fn meshgram_stdin(profile: &Path, args: &[&str], stdin_text: &str) -> CliOutput {
    run(&bin_path(CLI_BIN), &cli_args(profile, args), Some(stdin_text))
}

/// Starts `meshgram --profile <profile> --json <args…>` for a test that answers its prompts.
pub fn spawn_meshgram(profile: &Path, args: &[&str]) -> CliChild {
    CliChild::spawn(&bin_path(CLI_BIN), &cli_args(profile, args))
}
