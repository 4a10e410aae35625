//! The gateway's event loop: owns the `Swarm`, hands each request to the service on a blocking
//! thread, and sends the answer back on the request's channel when it is ready.

use std::sync::Arc;

use crate::behaviour::{GatewayBehaviour, GatewayBehaviourEvent};
use futures::StreamExt;
use libp2p::Swarm;
use libp2p::request_response::{self, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use meshgram_node::crypto::cert::unix_now;
use meshgram_node::proto::{AuthResponse, WireError};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::defaults::MAX_INFLIGHT_REQUESTS;
use crate::service::AuthService;

/// Runs until `shutdown` is cancelled.
pub(crate) async fn run(mut swarm: Swarm<GatewayBehaviour>, service: Arc<AuthService>, shutdown: CancellationToken) {
    let mut inflight: JoinSet<(ResponseChannel<AuthResponse>, AuthResponse)> = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            event = swarm.select_next_some() => {
                if let SwarmEvent::Behaviour(GatewayBehaviourEvent::Auth(event)) = event {
                    handle_auth_event(&mut swarm, &service, &mut inflight, event);
                }
            }
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

fn handle_auth_event(
    swarm: &mut Swarm<GatewayBehaviour>,
    service: &Arc<AuthService>,
    inflight: &mut JoinSet<(ResponseChannel<AuthResponse>, AuthResponse)>,
    event: request_response::Event<
        Result<meshgram_node::proto::AuthRequest, meshgram_node::net::codec::FrameError>,
        AuthResponse,
    >,
) {
    match event {
        request_response::Event::Message {
            peer,
            message: request_response::Message::Request { request, channel, .. },
            ..
        } => {
            if inflight.len() >= MAX_INFLIGHT_REQUESTS {
                let busy = AuthResponse::Error(WireError::flood_wait(1, "requests in flight at this gateway"));
                let _ = swarm.behaviour_mut().auth.send_response(channel, busy);
                return;
            }
            let service = Arc::clone(service);
            inflight.spawn_blocking(move || {
                let response = service.handle(peer, request, unix_now());
                (channel, response)
            });
        }
        request_response::Event::InboundFailure { peer, error, .. } => {
            tracing::debug!(%peer, %error, "inbound auth request failed");
        }
        _ => {}
    }
}
