//! `meshgram-bot-bridge`: the Telegram Bot API over HTTP, so that unmodified bot libraries run
//! on Meshgram (the library, `meshgram_bot_bridge`, says how).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use libp2p::Multiaddr;
use meshgram_bot_bridge::{Bots, Network, router};
use meshgram_node::client::session::GatewayAddr;
use meshgram_node::network_file::NetworkFile;
use meshgram_node::proto::RelayInfo;
use meshgram_node::server::service;

#[derive(Parser, Debug)]
#[command(name = "meshgram-bot-bridge", version, about = "Meshgram bot bridge: the Telegram Bot API over HTTP")]
struct Cli {
    /// Data directory: one client profile and update queue per bot.
    #[arg(long, env = "MESHGRAM_BOT_BRIDGE_DATA", default_value = "meshgram-bot-bridge-data")]
    data: PathBuf,
    /// HTTP address of the Bot API.
    #[arg(long, default_value = "127.0.0.1:8081")]
    http: std::net::SocketAddr,
    /// Where to serve HTTP as a multiaddr (`/ip4/127.0.0.1/tcp/PORT`, as `meshgram up` passes
    /// every role its ports); the first TCP one wins over --http, others are ignored.
    #[arg(long)]
    listen: Vec<Multiaddr>,
    /// The network (gateway and relays) from `meshgram up`'s network.json.
    #[arg(long, conflicts_with = "gateway")]
    network: Option<PathBuf>,
    /// The gateway's address, ending in /p2p/<peer id>.
    #[arg(long)]
    gateway: Option<Multiaddr>,
    /// A relay to use, ending in /p2p/<peer id> (repeatable; with --gateway).
    #[arg(long)]
    relay: Vec<Multiaddr>,
    /// Fetch files that bots send by URL from loopback and private addresses too (only for
    /// a network of your own: otherwise a bot could read what the bridge's host can reach).
    #[arg(long)]
    fetch_private_urls: bool,
    /// Exit when standard input closes (for a supervising parent such as `meshgram up`).
    #[arg(long)]
    exit_on_stdin_close: bool,
    /// Log lines on stderr: text, or one JSON object per line for log shippers.
    #[arg(long, env = "MESHGRAM_LOG_FORMAT", value_enum, default_value_t)]
    log_format: service::LogFormat,
}

#[derive(serde::Serialize)]
struct Ready {
    peer_id: Option<String>,
    listen: Vec<String>,
    http: String,
    bot_api: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?.block_on(run(cli))
}

fn network_of(cli: &Cli) -> anyhow::Result<Network> {
    let mut relays = Vec::new();
    for addr in &cli.relay {
        let mut addr = addr.clone();
        match addr.pop() {
            Some(libp2p::multiaddr::Protocol::P2p(peer_id)) => relays.push(RelayInfo { peer_id, addrs: vec![addr] }),
            _ => bail!("--relay {addr} does not end in /p2p/<relay peer id>"),
        }
    }
    let gateway = match (&cli.gateway, &cli.network) {
        (Some(addr), _) => GatewayAddr::from_multiaddr(addr)?,
        (None, Some(file)) => {
            let network = NetworkFile::load(file)?;
            relays.extend(network.relays.into_iter().map(|r| RelayInfo { peer_id: r.peer_id, addrs: r.addrs }));
            GatewayAddr { peer_id: network.gateway.peer_id, addrs: network.gateway.addrs }
        }
        (None, None) => bail!("give --network FILE or --gateway MULTIADDR"),
    };
    Ok(Network { gateway, relays })
}

/// `/ip4/A/tcp/P` as a socket address.
fn tcp_socket(addr: &Multiaddr) -> Option<std::net::SocketAddr> {
    use libp2p::multiaddr::Protocol;
    let mut parts = addr.iter();
    match (parts.next(), parts.next()) {
        (Some(Protocol::Ip4(ip)), Some(Protocol::Tcp(port))) => Some((ip, port).into()),
        (Some(Protocol::Ip6(ip)), Some(Protocol::Tcp(port))) => Some((ip, port).into()),
        _ => None,
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    service::init_tracing("info", cli.log_format);
    let network = network_of(&cli)?;
    service::keep_private(&cli.data).with_context(|| format!("creating {}", cli.data.display()))?;
    let bots = Arc::new(Bots::new(&cli.data, network, cli.fetch_private_urls).context("opening the bots' data")?);
    let addr = cli.listen.iter().find_map(tcp_socket).unwrap_or(cli.http);
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?;
    let bound = listener.local_addr()?;
    let listen = format!("/ip4/{}/tcp/{}", bound.ip(), bound.port());
    let http = format!("http://{bound}");
    let server = axum::serve(listener, router(bots.clone()));
    let starting = bots.clone();
    tokio::spawn(async move { starting.start_known().await });
    let bot_api = format!("{http}/bot");
    service::print_ready("bot-bridge", &Ready { peer_id: None, listen: vec![listen], http, bot_api })?;
    tokio::select! {
        why = service::stop_requested(cli.exit_on_stdin_close) => tracing::info!("{}; shutting down", why?),
        served = server => served.context("serving HTTP")?,
    }
    Ok(())
}
