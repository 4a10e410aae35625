//! A throwaway PostgreSQL cluster for one test: Debian's server binaries, `initdb` into a temp
//! dir, listening only on a unix socket there. `initdb` refuses root, so as root the cluster
//! runs as the `postgres` user. It can be stopped and started again; shut down and deleted on
//! drop.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tempfile::TempDir;

/// How long a new cluster may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running PostgreSQL server on a unix socket in its own temp dir.
#[derive(Debug)]
pub struct Postgres {
    server: Child,
    dir: TempDir,
    bin: PathBuf,
    /// Its port: of the socket file, and with [`Postgres::start_tls`] of loopback TCP too.
    port: u16,
    tls: bool,
    /// The server's command line, to start it again.
    args: Vec<std::ffi::OsString>,
}

impl Postgres {
    /// Creates and starts a cluster, panicking if it cannot. It does not fsync: tests kill
    /// gateways, not the database, and its own syncs would only slow them down.
    pub fn start() -> Postgres {
        Self::try_start(false, false).unwrap_or_else(|e| panic!("PostgreSQL did not start: {e:#}"))
    }

    /// [`Postgres::start`] with fsync on, as in production: for benchmarks.
    pub fn start_durable() -> Postgres {
        Self::try_start(true, false).unwrap_or_else(|e| panic!("PostgreSQL did not start: {e:#}"))
    }

    /// [`Postgres::start`], also listening on a loopback TCP port with TLS: a certificate
    /// for 127.0.0.1 from a throwaway certificate authority ([`Postgres::ca_file`]).
    pub fn start_tls() -> Postgres {
        Self::try_start(false, true).unwrap_or_else(|e| panic!("PostgreSQL did not start: {e:#}"))
    }

    fn try_start(fsync: bool, tls: bool) -> anyhow::Result<Postgres> {
        let bin = server_bin_dir()?;
        let dir = tempfile::Builder::new().prefix("meshgram-pg-").tempdir()?;
        // The server's user must be able to write there.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
        let data = dir.path().join("data");
        let initdb = as_server_user(Command::new(bin.join("initdb")))
            .args(["--auth=trust", "--username=meshgram", "--no-sync", "--encoding=UTF8", "-D"])
            .arg(&data)
            .current_dir(dir.path())
            .output()
            .context("running initdb")?;
        if !initdb.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&initdb.stderr));
        }
        let mut args: Vec<std::ffi::OsString> = vec!["-D".into(), data.into(), "-k".into(), dir.path().into()];
        let mut set = |setting: String| args.extend(["-c".into(), setting.into()]);
        set("max_connections=200".into());
        set(format!("fsync={}", if fsync { "on" } else { "off" }));
        // The socket file is in the test's own dir, so the default port is free there.
        let port = if tls { free_port()? } else { 5432 };
        set(format!("port={port}"));
        if tls {
            make_certificates(dir.path())?;
            set("listen_addresses=127.0.0.1".into());
            set("ssl=on".into());
            set(format!("ssl_cert_file={}", dir.path().join("server.pem").display()));
            set(format!("ssl_key_file={}", dir.path().join("server.key").display()));
        } else {
            // No TCP at all: the socket file is the only way in.
            set("listen_addresses=".into());
        }
        let server = spawn_server(&bin, dir.path(), &args)?;
        let pg = Postgres { server, dir, bin, port, tls, args };
        pg.wait_ready()?;
        Ok(pg)
    }

    /// Shuts the server down (fast: SIGINT), as an operator restarting it would; connections
    /// break. SIGKILL if it hangs.
    pub fn stop(&mut self) {
        let _ = Command::new("kill").args(["-INT", &self.server.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.server.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.server.kill();
        let _ = self.server.wait();
    }

    /// Starts the stopped server again on the same data, waiting until it takes connections.
    pub fn start_again(&mut self) {
        self.server = spawn_server(&self.bin, self.dir.path(), &self.args).expect("postgres starts again");
        self.wait_ready().unwrap_or_else(|e| panic!("PostgreSQL did not start again: {e:#}"));
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .arg("-h")
                .arg(self.dir.path())
                .args(["-p", &self.port.to_string(), "-U", "meshgram", "-d", "postgres", "-q"])
                .status()?;
            if ready.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("not accepting connections after {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A connection string for database `postgres` (what `--database` takes).
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    /// A connection string for database `name` (made with `CREATE DATABASE`).
    pub fn url_of(&self, name: &str) -> String {
        format!("host={} port={} user=meshgram dbname={name}", self.dir.path().display(), self.port)
    }

    /// With [`Postgres::start_tls`]: a connection string over loopback TCP with `sslmode`.
    pub fn tcp_url(&self, sslmode: &str) -> String {
        assert!(self.tls, "started with start_tls");
        format!("host=127.0.0.1 port={} user=meshgram dbname=postgres sslmode={sslmode}", self.port)
    }

    /// With [`Postgres::start_tls`]: the PEM certificate of the authority that signed the
    /// server's.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Runs one SQL command with `psql` and returns its unaligned output.
    pub fn sql(&self, command: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .arg("-h")
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-U", "meshgram", "-d", "postgres", "-XAtq", "-v", "ON_ERROR_STOP=1"])
            .args(["-c", command])
            .output()
            .expect("run psql");
        assert!(out.status.success(), "psql -c {command:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Postgres {
    /// So that no server process outlives the test.
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `postgres` server with `args`, as the server's user, its output discarded.
fn spawn_server(bin: &Path, dir: &Path, args: &[std::ffi::OsString]) -> anyhow::Result<Child> {
    as_server_user(Command::new(bin.join("postgres")))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting postgres")
}

/// Writes `ca.pem` and, signed by it, `server.pem` and `server.key` for 127.0.0.1 into `dir`,
/// with openssl; the key readable by the server's user alone, as PostgreSQL demands.
fn make_certificates(dir: &Path) -> anyhow::Result<()> {
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("openssl").args(args).current_dir(dir).output().context("running openssl")?;
        if !out.status.success() {
            bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n")?;
    let key = ["-newkey", "rsa:2048", "-nodes"];
    openssl(
        &[
            &["req", "-x509"],
            &key[..],
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=meshgram test CA"],
        ]
        .concat(),
    )?;
    openssl(
        &[&["req"], &key[..], &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]].concat(),
    )?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ])?;
    let server_key = dir.join("server.key");
    std::fs::set_permissions(&server_key, std::fs::Permissions::from_mode(0o600))?;
    if is_root()
        && let Some((uid, gid)) = postgres_user()
    {
        std::os::unix::fs::chown(&server_key, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// A loopback TCP port nobody listens on just now.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Debian's PostgreSQL server binaries (`/usr/lib/postgresql/<version>/bin`), newest first.
fn server_bin_dir() -> anyhow::Result<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("no /usr/lib/postgresql: install Debian's postgresql package (./tests/run does)")?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).context("no initdb under /usr/lib/postgresql/*/bin")
}

/// As root, runs `command` as the `postgres` user (initdb and postgres refuse root).
fn as_server_user(mut command: Command) -> Command {
    if is_root()
        && let Some((uid, gid)) = postgres_user()
    {
        command.uid(uid).gid(gid);
    }
    command
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|out| out.stdout.trim_ascii() == b"0")
}

/// The `postgres` user's uid and gid, from /etc/passwd.
fn postgres_user() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let line = passwd.lines().find(|line| line.starts_with("postgres:"))?;
    let mut fields = line.split(':').skip(2);
    Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}
