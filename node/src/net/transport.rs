//! The libp2p transport stack every role uses: QUIC (quinn) and TCP + Noise + Yamux, with
//! a helper to listen and learn the actual addresses (port 0 works everywhere).

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::identity::Keypair;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, Swarm, noise, tcp, yamux};

/// Why a swarm could not be built or could not listen.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Building the transport or behaviour failed.
    #[error("could not build the libp2p swarm: {0}")]
    Build(String),
    /// A listen address was refused.
    #[error("could not listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
}

/// Builds a swarm with both transports on the tokio runtime.
/// `idle_timeout` keeps quiet connections open that long (libp2p's default of 10 s is too short
/// for a client that talks to its gateway or relay now and then).
pub fn build_swarm<B: NetworkBehaviour>(
    keypair: Keypair,
    idle_timeout: Duration,
    behaviour: impl FnOnce(&Keypair) -> B,
) -> Result<Swarm<B>, TransportError> {
    let build = |e: &dyn std::fmt::Display| TransportError::Build(e.to_string());
    Ok(libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
        .map_err(|e| build(&e))?
        .with_quic()
        .with_behaviour(|key| behaviour(key))
        .map_err(|e| build(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle_timeout))
        .build())
}

/// Starts listening on every address and drives the swarm until each listener has reported
/// the address it actually bound (so `/tcp/0` comes back with its port). Events other than
/// listen addresses cannot happen before anyone knows our address, so none are lost.
pub async fn listen_on_all<B: NetworkBehaviour>(
    swarm: &mut Swarm<B>,
    addrs: &[Multiaddr],
) -> Result<Vec<Multiaddr>, TransportError> {
    let mut waiting: HashSet<ListenerId> = HashSet::new();
    for addr in addrs {
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|e| TransportError::Listen { addr: addr.clone(), reason: e.to_string() })?;
        waiting.insert(id);
    }
    let mut bound = Vec::new();
    while !waiting.is_empty() {
        match swarm.select_next_some().await {
            SwarmEvent::NewListenAddr { listener_id, address } => {
                waiting.remove(&listener_id);
                bound.push(address);
            }
            SwarmEvent::ListenerClosed { addresses, reason, .. } => {
                let reason = reason.err().map(|e| e.to_string()).unwrap_or_else(|| "closed".into());
                let addr = addresses.first().cloned().unwrap_or(Multiaddr::empty());
                return Err(TransportError::Listen { addr, reason });
            }
            SwarmEvent::ListenerError { error, .. } => {
                return Err(TransportError::Listen { addr: Multiaddr::empty(), reason: error.to_string() });
            }
            _ => {}
        }
    }
    Ok(bound)
}

/// The default listen addresses of a server role: QUIC and TCP on loopback, OS-chosen ports.
pub fn default_listen_addrs() -> Vec<Multiaddr> {
    ["/ip4/127.0.0.1/udp/0/quic-v1", "/ip4/127.0.0.1/tcp/0"]
        .iter()
        .map(|a| a.parse().expect("invariant: literal multiaddrs parse"))
        .collect()
}
