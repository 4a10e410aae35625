//! `meshgram login`: the one command that runs before there is a session, so always on its own
//! (never through a node).

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use libp2p::Multiaddr;
use meshgram_node::client::api::ApiError;
use meshgram_node::client::control::{ControlError, Holder, NodeLock};
use meshgram_node::client::messaging::Messenger;
use meshgram_node::client::session::SignedIn;
use meshgram_node::client::{Client, ClientError, GatewayAddr, SavedSession};
use meshgram_node::crypto::cert::AccountKind;
use meshgram_node::ids::Phone;
use meshgram_node::network_file::NetworkFile;
use meshgram_node::proto::{AuthRequest, ErrorCode, RelayInfo};
use serde_json::json;

use super::output::{describe, emit};
use super::{CliError, CliResult, GatewayArgs};

/// The gateway and the relays to remember, from `--network` or `--gateway` + `--relay`s.
pub(super) fn resolve_gateway(
    args: &GatewayArgs,
    relay_args: &[Multiaddr],
) -> Result<(GatewayAddr, Vec<RelayInfo>), CliError> {
    let mut relays = Vec::new();
    for addr in relay_args {
        let mut addr = addr.clone();
        match addr.pop() {
            Some(libp2p::multiaddr::Protocol::P2p(peer_id)) => relays.push(RelayInfo { peer_id, addrs: vec![addr] }),
            _ => return Err(CliError::usage(format!("--relay {addr} does not end in /p2p/<relay peer id>"))),
        }
    }
    match (args.gateway.as_slice(), &args.network) {
        ([_, ..], _) => Ok((GatewayAddr::from_multiaddrs(&args.gateway)?, relays)),
        ([], Some(file)) => {
            let network = NetworkFile::load(file).map_err(|e| CliError::usage(e.to_string()))?;
            relays.extend(network.relays.into_iter().map(|r| RelayInfo { peer_id: r.peer_id, addrs: r.addrs }));
            Ok((GatewayAddr { peer_id: network.gateway.peer_id, addrs: network.gateway.addrs }, relays))
        }
        ([], None) => Err(CliError::usage("give --gateway MULTIADDR or --network FILE")),
    }
}

pub(super) fn default_device_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let host = host.trim();
    if host.is_empty() { "meshgram CLI".into() } else { format!("meshgram CLI on {host}") }
}

/// Reads one line: prompts on a terminal, otherwise takes the next line of stdin.
pub(super) async fn read_line(prompt: &'static str) -> Result<String, CliError> {
    tokio::task::spawn_blocking(move || {
        let stdin = std::io::stdin();
        if stdin.is_terminal() {
            eprint!("{prompt}");
            let _ = std::io::stderr().flush();
        }
        let mut line = String::new();
        match stdin.lock().read_line(&mut line) {
            Ok(0) => Err(CliError::usage(format!(
                "expected a line on stdin for '{}', got end of input",
                prompt.trim_end_matches([':', ' '])
            ))),
            Ok(_) => Ok(line.trim().to_string()),
            Err(e) => Err(CliError::usage(format!("reading stdin: {e}"))),
        }
    })
    .await
    .map_err(|e| CliError::usage(format!("reading stdin: {e}")))?
}

/// A session saved in the profile, and whether the account's other devices were asked for
/// the history.
pub(crate) struct KeptSession {
    pub(crate) session: SavedSession,
    pub(crate) asks_for_history: bool,
}

/// Saves the session the gateway gave; an account's other devices hold its history, so a
/// user's device that is not the account's first asks them for it (approved by a user there).
pub(crate) async fn keep_session(
    profile: &Path,
    client: &Client,
    signed_in: SignedIn,
    relays: Vec<RelayInfo>,
    device_name: String,
) -> Result<KeptSession, CliError> {
    let new_account = signed_in.new_account;
    let session = client.accept_session(signed_in.account, signed_in.cert, relays)?;
    let asks_for_history = !new_account && session.account.kind == AccountKind::User;
    if asks_for_history {
        let asked = match Messenger::open(profile, false).await {
            Ok(mut messenger) => messenger.request_history(device_name).await,
            Err(e) => Err(e),
        };
        if let Err(e) = asked {
            tracing::warn!(error = %e, "could not ask the other devices for the history");
        }
    }
    Ok(KeptSession { session, asks_for_history })
}

/// How to sign in: the login command's flags.
pub(super) struct LoginWith {
    pub(super) phone: Option<String>,
    pub(super) code: Option<String>,
    pub(super) password: Option<String>,
    pub(super) bot_token: Option<String>,
    pub(super) device_name: Option<String>,
}

pub(super) async fn login(
    profile: &Path,
    json: bool,
    gateway: &GatewayArgs,
    relays: &[Multiaddr],
    how: LoginWith,
) -> CliResult {
    meshgram_node::client::session::keep_private(profile)?;
    // Held for the whole sign-in, so that no node starts on a half-written session.
    let _lock = match NodeLock::acquire_when_free(profile, Holder::OneShot).await {
        Ok(lock) => lock,
        Err(e @ ControlError::AlreadyRunning { .. }) => {
            return Err(CliError(ApiError::new("NODE_RUNNING", format!("{e}; stop it before signing in again"))));
        }
        Err(e) => return Err(e.into()),
    };
    let (gateway, relays) = resolve_gateway(gateway, relays)?;
    let LoginWith { phone, code, password, bot_token, device_name } = how;
    let device_name = device_name.unwrap_or_else(default_device_name);
    let asking_name = device_name.clone();
    let client = Client::open(profile, gateway)?;
    let device = client.identity.device_keys();
    let signed_in = if let Some(token) = bot_token {
        client.sign_in(AuthRequest::BotSignIn { token, device, device_name }).await?
    } else {
        let phone: Phone =
            phone.unwrap_or_default().parse().map_err(|e: meshgram_node::ids::InvalidValue| CliError::usage(e.0))?;
        let code = match code {
            Some(code) => code,
            None => {
                let expires_in_secs = client.send_code(phone.clone()).await?;
                eprintln!("A login code was sent to {phone}; it is valid for {expires_in_secs} s.");
                read_line("Code: ").await?
            }
        };
        let sign_in = |password| AuthRequest::SignIn {
            phone: phone.clone(),
            code: code.clone(),
            device: device.clone(),
            device_name: device_name.clone(),
            password,
        };
        match client.sign_in(sign_in(password.clone())).await {
            Err(ClientError::Gateway(e)) if e.code == ErrorCode::SessionPasswordNeeded && password.is_none() => {
                eprintln!("This account has a password.");
                let password = read_line("Password: ").await?;
                client.sign_in(sign_in(Some(password))).await?
            }
            other => other?,
        }
    };
    let new_account = signed_in.new_account;
    let KeptSession { session, asks_for_history } =
        keep_session(profile, &client, signed_in, relays, asking_name).await?;
    let b = &session.cert.body;
    emit(
        json,
        json!({
            "user_id": b.user_id, "new_account": new_account, "session_id": b.session_id,
            "device": b.device.to_string(), "cert_not_after": b.not_after, "account": session.account,
            "history_requested": asks_for_history,
        }),
        || {
            let verb = if new_account { "Welcome! Account created" } else { "Signed in" };
            let mut text =
                format!("{verb}: {} (user id {}, session {}).", describe(&session.account), b.user_id, b.session_id);
            if asks_for_history {
                text.push_str(&format!(
                    "\nYour other devices were asked for your history: approve this one there with\n  meshgram devices approve {}",
                    b.device
                ));
            }
            text
        },
    );
    Ok(())
}
