//! The gateway's event loop: owns the `Swarm`, hands each request to the service on a blocking
//! thread, and sends the answer back on the request's channel when it is ready.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::behaviour::{GatewayBehaviour, GatewayBehaviourEvent};
use futures::StreamExt;
use libp2p::Swarm;
use libp2p::request_response::{self, ResponseChannel};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use meshgram_node::crypto::cert::unix_now;
use meshgram_node::proto::{AuthResponse, WireError};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::defaults::MAX_INFLIGHT_REQUESTS;
use crate::service::AuthService;

/// Runs until `shutdown` is cancelled.
pub(crate) async fn run(mut swarm: Swarm<GatewayBehaviour>, service: Arc<AuthService>, shutdown: CancellationToken) {
    let mut inflight: JoinSet<(ResponseChannel<AuthResponse>, AuthResponse)> = JoinSet::new();
    // Where each connection comes from, for limits per address.
    let mut sources: HashMap<ConnectionId, IpAddr> = HashMap::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            event = swarm.select_next_some() => match event {
                SwarmEvent::Behaviour(GatewayBehaviourEvent::Auth(event)) => {
                    handle_auth_event(&mut swarm, &service, &mut inflight, &sources, event);
                }
                SwarmEvent::ConnectionEstablished { connection_id, endpoint, .. } => {
                    if let Some(ip) = ip_of(endpoint.get_remote_address()) {
                        sources.insert(connection_id, ip);
                    }
                }
                SwarmEvent::ConnectionClosed { connection_id, .. } => {
                    sources.remove(&connection_id);
                }
                _ => {}
            },
            Some(done) = inflight.join_next() => match done {
                Ok((channel, response)) => {
                    // Fails only if the client has gone away; nothing to do then.
                    let _ = swarm.behaviour_mut().auth.send_response(channel, response);
                }
                Err(e) => tracing::error!(error = %e, "auth request handler failed"),
            },
        }
    }
    inflight.shutdown().await;
}

/// The IP address in a connection's remote multiaddr.
fn ip_of(addr: &libp2p::Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|part| match part {
        libp2p::multiaddr::Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        libp2p::multiaddr::Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

fn handle_auth_event(
    swarm: &mut Swarm<GatewayBehaviour>,
    service: &Arc<AuthService>,
    inflight: &mut JoinSet<(ResponseChannel<AuthResponse>, AuthResponse)>,
    sources: &HashMap<ConnectionId, IpAddr>,
    event: request_response::Event<
        Result<meshgram_node::proto::AuthRequest, meshgram_node::net::codec::FrameError>,
        AuthResponse,
    >,
) {
    match event {
        request_response::Event::Message {
            peer,
            connection_id,
            message: request_response::Message::Request { request, channel, .. },
        } => {
            if inflight.len() >= MAX_INFLIGHT_REQUESTS {
                let busy = AuthResponse::Error(WireError::flood_wait(1, "requests in flight at this gateway"));
                let _ = swarm.behaviour_mut().auth.send_response(channel, busy);
                return;
            }
            let service = Arc::clone(service);
            let ip = sources.get(&connection_id).copied();
            inflight.spawn_blocking(move || {
                let response = service.handle_from(peer, ip, request, unix_now());
                (channel, response)
            });
        }
        request_response::Event::InboundFailure { peer, error, .. } => {
            tracing::debug!(%peer, %error, "inbound auth request failed");
        }
        _ => {}
    }
}
