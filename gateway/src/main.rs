//! `meshgram-gateway`: run the Auth & Session Service, or talk to a running one as its operator.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use meshgram_gateway::config::Config;
use meshgram_gateway::store::{PgStore, RedbStore};
use meshgram_gateway::{AdminFile, Gateway};
use meshgram_node::server::service;

#[derive(Parser, Debug)]
#[command(name = "meshgram-gateway", version, about = "Meshgram gateway: sign-in, sessions, certificates, directory")]
struct Cli {
    /// Data directory (database, gateway key, admin.json, default code sink).
    #[arg(long, env = "MESHGRAM_GATEWAY_DATA")]
    data: Option<PathBuf>,
    /// libp2p listen address (repeatable). Default: QUIC and TCP on 127.0.0.1, port 0.
    #[arg(long)]
    listen: Vec<libp2p::Multiaddr>,
    /// HTTP address for /healthz, /metrics and the admin endpoint (default: the config's
    /// `http`, else 127.0.0.1:0).
    #[arg(long)]
    http: Option<std::net::SocketAddr>,
    /// Where login codes go: file:PATH or webhook:URL. Default: file:DATA/codes.log.
    #[arg(long)]
    code_sink: Option<String>,
    /// A PostgreSQL database instead of the redb file in --data, shared with other gateways:
    /// postgres://user@host1,host2/db?target_session_attrs=read-write (libpq-style; a unix
    /// socket is host=/dir). Default: the config's `database`, else redb.
    #[arg(long, env = "MESHGRAM_GATEWAY_DATABASE")]
    database: Option<String>,
    /// PEM file of the certificate authority the database's TLS certificate must chain to
    /// (default: the config's `database_ca`, else the usual public roots). Add
    /// sslmode=require to the URL to refuse a database without TLS.
    #[arg(long, env = "MESHGRAM_GATEWAY_DATABASE_CA", global = true)]
    database_ca: Option<PathBuf>,
    /// TOML config file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Session certificate lifetime in seconds.
    #[arg(long)]
    cert_ttl_secs: Option<u64>,
    /// Login code lifetime in seconds.
    #[arg(long)]
    code_ttl_secs: Option<u64>,
    /// Exit when standard input closes (used by `meshgram up`, so that roles never outlive it).
    #[arg(long)]
    exit_on_stdin_close: bool,
    /// Log lines on stderr: text, or one JSON object per line for log shippers.
    #[arg(long, env = "MESHGRAM_LOG_FORMAT", value_enum, default_value_t)]
    log_format: service::LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Manage bots on the running gateway of --data (through its admin endpoint).
    #[command(subcommand)]
    Bot(BotCommand),
    /// Admit a relay to this network: sign a certificate for its peer id with the gateway key
    /// of --data (the gateway need not be running). Relays replicate only with relays that
    /// hold one; the relay reads it from its DATA/relay.cert (or --relay-cert).
    RelayCert {
        /// The relay's peer id (a relay without a certificate prints it when refusing to start).
        #[arg(long)]
        relay: libp2p::PeerId,
        /// How long the certificate is valid, in days (1 to 3650).
        #[arg(long, default_value_t = meshgram_node::defaults::RELAY_CERT_DAYS,
              value_parser = clap::value_parser!(u64).range(1..=3650))]
        days: u64,
        /// Write it to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Copy the redb database of --data into an empty PostgreSQL database, to run the gateway
    /// on it from then on (`--database`). The gateway must be stopped.
    Migrate {
        /// postgres://… (as for --database).
        #[arg(long)]
        to: String,
    },
    /// End a relay's admission on the running gateway of --data (through its admin endpoint):
    /// within seconds the other relays give it no copies and refuse its replica requests.
    /// For good: to admit that machine again, give it a new relay key and certificate.
    RelayRevoke {
        /// The relay's peer id.
        #[arg(long)]
        relay: libp2p::PeerId,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum BotCommand {
    /// Create a bot and print its token.
    Create {
        #[arg(long)]
        username: String,
        #[arg(long)]
        name: String,
        /// Make this user the bot's owner.
        #[arg(long)]
        owner: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// List every bot.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Replace a bot's token.
    RevokeToken {
        bot_id: u64,
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    service::init_tracing("info", cli.log_format);
    let mut config = match &cli.config {
        Some(path) => Config::load(path).map_err(anyhow::Error::msg)?,
        None => Config::default(),
    };
    if let Some(data) = cli.data.clone() {
        config.data_dir = data;
    }
    service::keep_private(&config.data_dir).with_context(|| format!("creating {}", config.data_dir.display()))?;
    match cli.command {
        Some(Command::Bot(command)) => admin(&config.data_dir, command).await,
        Some(Command::RelayRevoke { relay, json }) => relay_revoke(&config.data_dir, relay, json).await,
        Some(Command::RelayCert { relay, days, out }) => relay_cert(&config.data_dir, relay, days, out.as_deref()),
        Some(Command::Migrate { to }) => {
            let ca = cli.database_ca.clone().or(config.database_ca.clone());
            migrate(config.data_dir, to, ca).await
        }
        None => run(cli, config).await,
    }
}

async fn run(cli: Cli, mut config: Config) -> anyhow::Result<()> {
    let exit_on_stdin_close = cli.exit_on_stdin_close;
    if !cli.listen.is_empty() {
        config.listen = cli.listen;
    }
    let any_loopback_port = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.http = Some(cli.http.or(config.http).unwrap_or(any_loopback_port));
    config.code_sink = cli.code_sink.or(config.code_sink);
    config.database = cli.database.or(config.database);
    config.database_ca = cli.database_ca.or(config.database_ca);
    if let Some(secs) = cli.cert_ttl_secs {
        config.limits.cert_ttl_secs = secs;
    }
    if let Some(secs) = cli.code_ttl_secs {
        config.limits.code_ttl_secs = secs;
    }
    let mut gateway = Gateway::start(config).await.context("starting the gateway")?;
    service::print_ready("gateway", &gateway.ready)?;
    tracing::info!(peer_id = %gateway.ready.peer_id, "gateway ready");
    tokio::select! {
        why = service::stop_requested(exit_on_stdin_close) => tracing::info!("{}; shutting down", why?),
        () = gateway.wait() => bail!("a gateway task stopped unexpectedly"),
    }
    gateway.shutdown().await;
    Ok(())
}

/// Copies the redb database of `data` into PostgreSQL (see [`Command::Migrate`]).
async fn migrate(data: PathBuf, to: String, ca: Option<PathBuf>) -> anyhow::Result<()> {
    let path = data.join(meshgram_gateway::DATABASE_FILE);
    if !path.exists() {
        bail!("no gateway database at {}: is --data the gateway's data dir?", path.display());
    }
    let copied = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        let source = RedbStore::open(&path)
            .with_context(|| format!("opening {} (is the gateway still running?)", path.display()))?;
        let target = PgStore::connect(&to, ca.as_deref()).context("connecting to PostgreSQL")?;
        Ok(target.migrate_from(&source)?)
    })
    .await??;
    println!("copied {copied} records; start the gateway with --database to use them");
    Ok(())
}

/// Signs a relay certificate with the gateway key (see [`Command::RelayCert`]).
fn relay_cert(
    data: &std::path::Path,
    relay: libp2p::PeerId,
    days: u64,
    out: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let key_file = data.join(meshgram_gateway::GATEWAY_KEY_FILE);
    let Some(key) = meshgram_node::crypto::identity::load_ed25519(&key_file)? else {
        bail!("no gateway key at {}: is --data the gateway's data dir?", key_file.display());
    };
    let cert =
        meshgram_node::crypto::cert::RelayCert::issue(&key, relay, days, meshgram_node::crypto::cert::unix_now());
    let json = serde_json::to_string_pretty(&cert)?;
    match out {
        Some(path) => std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?,
        None => println!("{json}"),
    }
    Ok(())
}

/// Revokes a relay's admission (see [`Command::RelayRevoke`]).
async fn relay_revoke(data: &std::path::Path, relay: libp2p::PeerId, json: bool) -> anyhow::Result<()> {
    let admin = AdminFile::load(data).map_err(anyhow::Error::msg)?;
    let request = reqwest::Client::new().post(format!("{}/admin/relays/{relay}/revoke", admin.url));
    let body = admin_call(&admin, request, json).await?;
    if json {
        println!("{body}");
    } else {
        println!("Relay {relay} revoked (at {}); relays stop using it within seconds", body["revoked_at"]);
    }
    Ok(())
}

/// Sends an admin request with the bearer token; returns the JSON body of a success and turns
/// a refusal into an error (printing its body first under `--json`).
async fn admin_call(
    admin: &AdminFile,
    request: reqwest::RequestBuilder,
    json: bool,
) -> anyhow::Result<serde_json::Value> {
    let response = request
        .bearer_auth(&admin.token)
        .send()
        .await
        .with_context(|| format!("reaching the gateway at {}", admin.url))?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.context("reading the gateway's answer")?;
    if !status.is_success() {
        if json {
            println!("{body}");
        }
        let error = &body["error"];
        bail!(
            "{}: {}",
            error["code"].as_str().unwrap_or("ERROR"),
            error["message"].as_str().unwrap_or("request failed")
        );
    }
    Ok(body)
}

/// Operator commands: HTTP calls to the running gateway's admin endpoint.
async fn admin(data: &std::path::Path, command: BotCommand) -> anyhow::Result<()> {
    let admin = AdminFile::load(data).map_err(anyhow::Error::msg)?;
    let client = reqwest::Client::new();
    let (request, json) = match &command {
        BotCommand::Create { username, name, owner, json } => (
            client
                .post(format!("{}/admin/bots", admin.url))
                .json(&serde_json::json!({"username": username, "name": name, "owner": owner})),
            *json,
        ),
        BotCommand::List { json } => (client.get(format!("{}/admin/bots", admin.url)), *json),
        BotCommand::RevokeToken { bot_id, json } => {
            (client.post(format!("{}/admin/bots/{bot_id}/revoke-token", admin.url)), *json)
        }
    };
    let body = admin_call(&admin, request, json).await?;
    if json {
        println!("{body}");
    } else {
        match command {
            BotCommand::Create { .. } | BotCommand::RevokeToken { .. } => {
                println!("Bot @{} (id {})", body["bot"]["username"].as_str().unwrap_or("?"), body["bot"]["user_id"]);
                println!("Token: {}", body["token"].as_str().unwrap_or("?"));
            }
            BotCommand::List { .. } => {
                for bot in body.as_array().into_iter().flatten() {
                    println!(
                        "{}\t@{}\t{}",
                        bot["user_id"],
                        bot["username"].as_str().unwrap_or("?"),
                        bot["name"].as_str().unwrap_or("")
                    );
                }
            }
        }
    }
    Ok(())
}
