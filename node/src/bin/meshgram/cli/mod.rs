//! The `meshgram` command line: flags, one function per command, and output as text or JSON.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use libp2p::Multiaddr;
use meshgram_node::client::history::StoredMessage;
use meshgram_node::client::messaging::{MessagingError, Messenger};
use meshgram_node::client::{Client, ClientError, GatewayAddr, SavedSession};
use meshgram_node::defaults::FETCH_WAIT_MS;
use meshgram_node::ids::{Phone, SessionId, UserId};
use meshgram_node::network_file::NetworkFile;
use meshgram_node::proto::{Account, AuthRequest, AuthResponse, ErrorCode, LookupQuery, RelayInfo};
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(name = "meshgram", version, about = "Meshgram: a peer-assisted P2P messenger")]
pub(crate) struct Cli {
    /// Profile directory: this device's keys and session.
    #[arg(long, global = true, env = "MESHGRAM_PROFILE")]
    profile: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Sign in with a phone number (a code is sent) or a bot token.
    Login {
        #[command(flatten)]
        gateway: GatewayArgs,
        /// Phone number in international form, e.g. +15550001111.
        #[arg(long, required_unless_present = "bot_token", conflicts_with = "bot_token")]
        phone: Option<String>,
        /// A code you already received; skips sending a new one.
        #[arg(long)]
        code: Option<String>,
        /// 2FA password, if the account has one (otherwise asked for).
        #[arg(long)]
        password: Option<String>,
        /// Sign in as a bot with its token.
        #[arg(long)]
        bot_token: Option<String>,
        /// How this device appears in session lists.
        #[arg(long)]
        device_name: Option<String>,
        /// A relay to use, ending in /p2p/<peer id> (repeatable; adds to --network's relays).
        #[arg(long)]
        relay: Vec<Multiaddr>,
    },
    /// Show the signed-in account.
    Whoami,
    /// Get a fresh session certificate now.
    Renew,
    /// Change your profile.
    #[command(subcommand)]
    Profile(ProfileCommand),
    /// Set or remove the 2FA password.
    #[command(subcommand)]
    Password(PasswordCommand),
    /// Find a user by @username, +phone or user id.
    Lookup { query: String },
    /// List this account's sessions, or end some.
    Sessions {
        #[command(subcommand)]
        command: Option<SessionsCommand>,
    },
    /// Create and manage your bots (like BotFather).
    #[command(subcommand)]
    Bot(BotCommand),
    /// Send a message to @username, +phone or user id.
    Send {
        to: String,
        /// The text (omit with --lines).
        #[arg(required_unless_present = "lines")]
        text: Option<String>,
        /// Send each line of stdin as its own message, in order.
        #[arg(long, conflicts_with = "text")]
        lines: bool,
        /// Reply to this message id.
        #[arg(long)]
        reply_to: Option<String>,
    },
    /// Fetch new messages, then show a chat's history (or all chats').
    Messages {
        /// @username, +phone or user id of the chat to show.
        chat: Option<String>,
        /// Keep running and print messages as they arrive.
        #[arg(long)]
        follow: bool,
    },
    /// List chats with their last message.
    Chats,
    /// Change the text of a message you sent.
    Edit { message_id: String, text: String },
    /// Delete a message you sent, for everyone.
    Delete { message_id: String },
    /// Tell someone you are typing.
    Typing { to: String },
    /// Start a whole local network on loopback.
    Up {
        /// Where the network keeps its data; reusing it resumes the same network.
        #[arg(long, default_value = "meshgram-net")]
        data: PathBuf,
        /// How many relays to run.
        #[arg(long, default_value_t = 3)]
        relays: usize,
        /// How many relays keep each message.
        #[arg(long, default_value_t = 2)]
        replication: usize,
    },
}

#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
struct GatewayArgs {
    /// The gateway's multiaddr, ending in /p2p/<peer id>.
    #[arg(long)]
    gateway: Option<Multiaddr>,
    /// A network.json written by `meshgram up` (gateway and relays).
    #[arg(long)]
    network: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum ProfileCommand {
    /// Set username (empty removes it) and/or display name.
    Set {
        #[arg(long)]
        username: Option<String>,
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum PasswordCommand {
    /// Set or change the password.
    Set {
        #[arg(long)]
        new: String,
        #[arg(long)]
        current: Option<String>,
    },
    /// Remove the password.
    Clear {
        #[arg(long)]
        current: String,
    },
}

#[derive(Subcommand, Debug)]
enum SessionsCommand {
    /// List sessions (the default).
    List,
    /// End one session by id, or all but this one.
    Revoke {
        #[arg(required_unless_present = "others", conflicts_with = "others")]
        session_id: Option<String>,
        #[arg(long)]
        others: bool,
    },
}

#[derive(Subcommand, Debug)]
enum BotCommand {
    /// Create a bot; prints its token.
    Create {
        #[arg(long)]
        username: String,
        #[arg(long)]
        name: String,
    },
    /// Your bots.
    List,
    /// Replace a bot's token (the old one stops working).
    RevokeToken { bot_id: String },
}

/// A failed command: a stable code, a message, and for rate limits the wait.
#[derive(Debug)]
pub(crate) struct CliError {
    code: String,
    message: String,
    retry_after: Option<u64>,
}

impl CliError {
    fn usage(message: impl Into<String>) -> Self {
        CliError { code: "USAGE".into(), message: message.into(), retry_after: None }
    }

    /// Prints the error: JSON on stdout with `--json`, text on stderr otherwise.
    pub(crate) fn report(&self, json: bool) {
        if json {
            outln!(
                "{}",
                json!({ "error": { "code": self.code, "message": self.message, "retry_after": self.retry_after } })
            );
        } else {
            eprintln!("error: {}: {}", self.code, self.message);
        }
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        let code = match &e {
            ClientError::Gateway(g) => {
                return CliError {
                    code: g.code.to_string(),
                    message: g.message.clone(),
                    retry_after: g.retry_after_secs,
                };
            }
            ClientError::Net(_) => "NETWORK",
            ClientError::NotSignedIn => "NOT_SIGNED_IN",
            ClientError::GatewayAddress(_) => "USAGE",
            ClientError::Profile { .. } | ClientError::KeyFile(_) => "PROFILE",
            ClientError::Transport(_) => "NETWORK",
            ClientError::BadCert(_) | ClientError::UnexpectedResponse(_) => "BAD_GATEWAY",
        };
        CliError { code: code.into(), message: e.to_string(), retry_after: None }
    }
}

impl From<MessagingError> for CliError {
    fn from(e: MessagingError) -> Self {
        let code = match e {
            MessagingError::Client(e) => return e.into(),
            MessagingError::Refused(w) => {
                return CliError { code: w.code.to_string(), message: w.message, retry_after: w.retry_after_secs };
            }
            MessagingError::Net(_) | MessagingError::NoRelay(_) => "NETWORK",
            MessagingError::History(_) => "PROFILE",
            MessagingError::Seal(_) => "E2E",
            MessagingError::TextTooLong => "USAGE",
            MessagingError::NoDevices(_) => "NO_DEVICES",
            MessagingError::UnknownMessage(_) => "NOT_FOUND",
            MessagingError::NotYours(_) => "FORBIDDEN",
        };
        CliError { code: code.into(), message: e.to_string(), retry_after: None }
    }
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        CliError { code: "ERROR".into(), message: format!("{e:#}"), retry_after: None }
    }
}

type CliResult = Result<(), CliError>;

/// Prints `value` as JSON, or `text` for people.
fn emit(json: bool, value: Value, text: impl FnOnce() -> String) {
    if json {
        outln!("{value}");
    } else {
        outln!("{}", text());
    }
}

fn default_profile() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".")).join(".meshgram")
}

/// Runs one command.
pub(crate) async fn run(cli: Cli) -> CliResult {
    let profile = cli.profile.clone().unwrap_or_else(default_profile);
    let json = cli.json;
    match cli.command {
        Command::Login { gateway, phone, code, password, bot_token, device_name, relay } => {
            let (gateway, relays) = resolve_gateway(&gateway, &relay)?;
            let device_name = device_name.unwrap_or_else(default_device_name);
            let how = LoginWith { phone, code, password, bot_token, device_name };
            login(&profile, json, gateway, relays, how).await
        }
        Command::Send { to, text, lines, reply_to } => send(&profile, json, &to, text, lines, reply_to).await,
        Command::Messages { chat, follow } => messages(&profile, json, chat, follow).await,
        Command::Chats => chats(&profile, json).await,
        Command::Edit { message_id, text } => {
            let id = parse_message_id(&message_id)?;
            let mut messenger = Messenger::open(&profile).await?;
            let message = messenger.edit(id, text).await?;
            emit(json, serde_json::to_value(&message).unwrap_or(Value::Null), || {
                format!("Edited: {}", message_line(&message))
            });
            Ok(())
        }
        Command::Delete { message_id } => {
            let id = parse_message_id(&message_id)?;
            let mut messenger = Messenger::open(&profile).await?;
            let message = messenger.delete(id).await?;
            emit(json, serde_json::to_value(&message).unwrap_or(Value::Null), || format!("Deleted {}.", message.id));
            Ok(())
        }
        Command::Typing { to } => {
            let mut messenger = Messenger::open(&profile).await?;
            messenger.typing(parse_query(&to)?).await?;
            emit(json, json!({ "typing": true }), || "Sent a typing notice.".into());
            Ok(())
        }
        Command::Whoami => whoami(&profile, json).await,
        Command::Renew => {
            let (client, session) = Client::open_signed_in(&profile)?;
            let session = client.renew(session).await?;
            let b = &session.cert.body;
            emit(json, json!({ "session_id": b.session_id, "cert_not_after": b.not_after }), || {
                format!("Certificate renewed; valid until {} (unix).", b.not_after)
            });
            Ok(())
        }
        Command::Profile(ProfileCommand::Set { username, name }) => {
            if username.is_none() && name.is_none() {
                return Err(CliError::usage("give --username and/or --name"));
            }
            update_account(&profile, json, AuthRequest::SetProfile { username, name }).await
        }
        Command::Password(PasswordCommand::Set { new, current }) => {
            update_account(&profile, json, AuthRequest::SetPassword { current, new: Some(new) }).await
        }
        Command::Password(PasswordCommand::Clear { current }) => {
            update_account(&profile, json, AuthRequest::SetPassword { current: Some(current), new: None }).await
        }
        Command::Lookup { query } => lookup(&profile, json, &query).await,
        Command::Sessions { command } => sessions(&profile, json, command.unwrap_or(SessionsCommand::List)).await,
        Command::Bot(command) => bot(&profile, json, command).await,
        Command::Up { data, relays, replication } => {
            crate::up::run(&data, crate::up::UpOptions { relays, replication }, json).await.map_err(CliError::from)
        }
    }
}

/// The gateway and the relays to remember, from `--network` or `--gateway` + `--relay`s.
fn resolve_gateway(args: &GatewayArgs, relay_args: &[Multiaddr]) -> Result<(GatewayAddr, Vec<RelayInfo>), CliError> {
    let mut relays = Vec::new();
    for addr in relay_args {
        let mut addr = addr.clone();
        match addr.pop() {
            Some(libp2p::multiaddr::Protocol::P2p(peer_id)) => relays.push(RelayInfo { peer_id, addrs: vec![addr] }),
            _ => return Err(CliError::usage(format!("--relay {addr} does not end in /p2p/<relay peer id>"))),
        }
    }
    match (&args.gateway, &args.network) {
        (Some(addr), _) => Ok((GatewayAddr::from_multiaddr(addr)?, relays)),
        (None, Some(file)) => {
            let network = NetworkFile::load(file).map_err(|e| CliError::usage(e.to_string()))?;
            relays.extend(network.relays.into_iter().map(|r| RelayInfo { peer_id: r.peer_id, addrs: r.addrs }));
            Ok((GatewayAddr { peer_id: network.gateway.peer_id, addrs: network.gateway.addrs }, relays))
        }
        (None, None) => Err(CliError::usage("give --gateway MULTIADDR or --network FILE")),
    }
}

fn default_device_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let host = host.trim();
    if host.is_empty() { "meshgram CLI".into() } else { format!("meshgram CLI on {host}") }
}

/// Reads one line: prompts on a terminal, otherwise takes the next line of stdin.
async fn read_line(prompt: &'static str) -> Result<String, CliError> {
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

/// How to sign in: the login command's flags.
struct LoginWith {
    phone: Option<String>,
    code: Option<String>,
    password: Option<String>,
    bot_token: Option<String>,
    device_name: String,
}

async fn login(profile: &Path, json: bool, gateway: GatewayAddr, relays: Vec<RelayInfo>, how: LoginWith) -> CliResult {
    let LoginWith { phone, code, password, bot_token, device_name } = how;
    let client = Client::open(profile, gateway)?;
    let device = client.identity.device_keys();
    let response = if let Some(token) = bot_token {
        client.call(AuthRequest::BotSignIn { token, device, device_name }).await?
    } else {
        let phone: Phone =
            phone.unwrap_or_default().parse().map_err(|e: meshgram_node::ids::InvalidValue| CliError::usage(e.0))?;
        let code = match code {
            Some(code) => code,
            None => {
                if let AuthResponse::CodeSent { expires_in_secs, .. } =
                    client.call(AuthRequest::SendCode { phone: phone.clone() }).await?
                {
                    eprintln!("A login code was sent to {phone}; it is valid for {expires_in_secs} s.");
                }
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
        match client.call(sign_in(password.clone())).await {
            Err(ClientError::Gateway(e)) if e.code == ErrorCode::SessionPasswordNeeded && password.is_none() => {
                eprintln!("This account has a password.");
                let password = read_line("Password: ").await?;
                client.call(sign_in(Some(password))).await?
            }
            other => other?,
        }
    };
    let AuthResponse::SignedIn { account, cert, new_account } = response else {
        return Err(ClientError::UnexpectedResponse("SignIn").into());
    };
    let session = client.accept_session(account, cert, relays)?;
    let b = &session.cert.body;
    emit(
        json,
        json!({
            "user_id": b.user_id, "new_account": new_account, "session_id": b.session_id,
            "device": b.device.to_string(), "cert_not_after": b.not_after, "account": session.account,
        }),
        || {
            let verb = if new_account { "Welcome! Account created" } else { "Signed in" };
            format!("{verb}: {} (user id {}, session {}).", describe(&session.account), b.user_id, b.session_id)
        },
    );
    Ok(())
}

fn describe(account: &Account) -> String {
    match (&account.username, account.name.is_empty()) {
        (Some(u), true) => u.to_string(),
        (Some(u), false) => format!("{} ({u})", account.name),
        (None, false) => account.name.clone(),
        (None, true) => account.phone.as_ref().map(|p| p.to_string()).unwrap_or_else(|| account.user_id.to_string()),
    }
}

async fn whoami(profile: &Path, json: bool) -> CliResult {
    let (client, session) = Client::open_signed_in(profile)?;
    let mut session = client.renew_if_due(session).await?;
    let AuthResponse::Me(account) = client.call(AuthRequest::GetMe).await? else {
        return Err(ClientError::UnexpectedResponse("GetMe").into());
    };
    session.account = account;
    session.save(profile)?;
    print_me(&session, json);
    Ok(())
}

fn print_me(session: &SavedSession, json: bool) {
    let b = &session.cert.body;
    let a = &session.account;
    emit(
        json,
        json!({ "account": a, "session_id": b.session_id, "device": b.device.to_string(), "cert_not_after": b.not_after }),
        || {
            let mut lines = vec![
                format!("{} — {:?} account {}", describe(a), a.kind, a.user_id),
                format!("phone: {}", a.phone.as_ref().map(|p| p.to_string()).unwrap_or_else(|| "-".into())),
                format!("username: {}", a.username.as_ref().map(|u| u.to_string()).unwrap_or_else(|| "-".into())),
                format!("2FA password: {}", if a.has_password { "on" } else { "off" }),
                format!("device: {} (session {})", b.device, b.session_id),
            ];
            lines.retain(|l| !l.is_empty());
            lines.join("\n")
        },
    );
}

/// Runs a request answered by `Me(account)` and saves the updated account.
async fn update_account(profile: &Path, json: bool, request: AuthRequest) -> CliResult {
    let (client, mut session) = Client::open_signed_in(profile)?;
    let AuthResponse::Me(account) = client.call(request).await? else {
        return Err(ClientError::UnexpectedResponse("profile update").into());
    };
    session.account = account;
    session.save(profile)?;
    emit(json, serde_json::to_value(&session.account).unwrap_or(Value::Null), || {
        format!("Updated: {}", describe(&session.account))
    });
    Ok(())
}

async fn lookup(profile: &Path, json: bool, query: &str) -> CliResult {
    let query: LookupQuery = query.parse().map_err(|e: meshgram_node::ids::InvalidValue| CliError::usage(e.0))?;
    let (client, _) = Client::open_signed_in(profile)?;
    let AuthResponse::Card(card) = client.call(AuthRequest::Lookup(query)).await? else {
        return Err(ClientError::UnexpectedResponse("Lookup").into());
    };
    emit(json, serde_json::to_value(&card).unwrap_or(Value::Null), || {
        let name = card.username.as_ref().map(|u| u.to_string()).unwrap_or_default();
        let mut out = format!(
            "{} {} — {:?} account {}, {} device(s)",
            card.name,
            name,
            card.kind,
            card.user_id,
            card.devices.len()
        );
        for d in &card.devices {
            out.push_str(&format!("\n  {} noise key {}", d.peer_id, d.noise_key().fmt_short()));
        }
        out
    });
    Ok(())
}

async fn sessions(profile: &Path, json: bool, command: SessionsCommand) -> CliResult {
    let (client, _) = Client::open_signed_in(profile)?;
    match command {
        SessionsCommand::List => {
            let AuthResponse::Sessions(list) = client.call(AuthRequest::ListSessions).await? else {
                return Err(ClientError::UnexpectedResponse("ListSessions").into());
            };
            emit(json, serde_json::to_value(&list).unwrap_or(Value::Null), || {
                list.iter()
                    .map(|s| {
                        format!(
                            "{}{}\t{}\t{}",
                            s.session_id,
                            if s.current { " (this device)" } else { "" },
                            s.device_name,
                            s.device
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        SessionsCommand::Revoke { session_id, others } => {
            let request = if others {
                AuthRequest::RevokeOtherSessions
            } else {
                let id: SessionId = session_id
                    .unwrap_or_default()
                    .parse()
                    .map_err(|e: meshgram_node::ids::InvalidValue| CliError::usage(e.0))?;
                AuthRequest::RevokeSession { session_id: id }
            };
            let AuthResponse::Revoked { count } = client.call(request).await? else {
                return Err(ClientError::UnexpectedResponse("RevokeSession").into());
            };
            emit(json, json!({ "revoked": count }), || format!("Ended {count} session(s)."));
        }
    }
    Ok(())
}

async fn bot(profile: &Path, json: bool, command: BotCommand) -> CliResult {
    let (client, _) = Client::open_signed_in(profile)?;
    let request = match command {
        BotCommand::Create { username, name } => AuthRequest::CreateBot { username, name },
        BotCommand::List => AuthRequest::ListBots,
        BotCommand::RevokeToken { bot_id } => {
            let bot: UserId = bot_id.parse().map_err(|e: meshgram_node::ids::InvalidValue| CliError::usage(e.0))?;
            AuthRequest::RevokeBotToken { bot }
        }
    };
    match client.call(request).await? {
        AuthResponse::BotToken { bot, token } => emit(json, json!({ "bot": bot, "token": token }), || {
            format!(
                "Bot {} (id {}) is ready.\nToken: {token}\nKeep the token secret: anyone with it controls the bot.",
                describe(&bot),
                bot.user_id
            )
        }),
        AuthResponse::Bots(bots) => emit(json, serde_json::to_value(&bots).unwrap_or(Value::Null), || {
            bots.iter().map(|b| format!("{}\t{}", b.user_id, describe(b))).collect::<Vec<_>>().join("\n")
        }),
        _ => return Err(ClientError::UnexpectedResponse("bot").into()),
    }
    Ok(())
}

fn parse_message_id(s: &str) -> Result<meshgram_node::proto::payload::MessageId, CliError> {
    s.parse().map_err(|e: meshgram_node::ids::InvalidValue| CliError::usage(format!("message id: {}", e.0)))
}

fn parse_query(s: &str) -> Result<LookupQuery, CliError> {
    s.parse().map_err(|e: meshgram_node::ids::InvalidValue| CliError::usage(e.0))
}

async fn send(
    profile: &Path,
    json: bool,
    to: &str,
    text: Option<String>,
    lines: bool,
    reply_to: Option<String>,
) -> CliResult {
    let to = parse_query(to)?;
    let reply_to = reply_to
        .map(|id| {
            id.parse().map_err(|e: meshgram_node::ids::InvalidValue| CliError::usage(format!("--reply-to: {}", e.0)))
        })
        .transpose()?;
    let texts = if lines {
        tokio::task::spawn_blocking(|| std::io::stdin().lock().lines().collect::<Result<Vec<String>, _>>())
            .await
            .map_err(|e| CliError::usage(format!("reading stdin: {e}")))?
            .map_err(|e| CliError::usage(format!("reading stdin: {e}")))?
            .into_iter()
            .filter(|l| !l.trim().is_empty())
            .collect()
    } else {
        vec![text.unwrap_or_default()]
    };
    if texts.is_empty() {
        return Err(CliError::usage("nothing to send"));
    }
    let mut messenger = Messenger::open(profile).await?;
    let sent = messenger.send_texts(to, texts, reply_to).await?;
    let ids: Vec<String> = sent.iter().map(|m| m.id.to_string()).collect();
    emit(json, json!({ "sent": sent.len(), "ids": ids }), || match sent.as_slice() {
        [one] => format!("Sent (id {}).", one.id),
        many => format!("Sent {} messages.", many.len()),
    });
    Ok(())
}

fn message_line(m: &StoredMessage) -> String {
    let who = if m.outgoing { "me".to_string() } else { m.from.to_string() };
    let reply = m.reply_to.map(|r| format!(" (reply to {})", r.fmt_short())).unwrap_or_default();
    let text = if m.deleted { "(deleted)" } else { m.text.as_str() };
    let edited = if m.edited { " (edited)" } else { "" };
    let status = if m.outgoing { format!(" [{:?}]", m.status).to_lowercase() } else { String::new() };
    format!("[{}] {who}{reply}: {text}{edited}{status}", m.id.fmt_short())
}

async fn messages(profile: &Path, json: bool, chat: Option<String>, follow: bool) -> CliResult {
    let mut messenger = Messenger::open(profile).await?;
    let chat = match chat {
        Some(c) => Some(messenger.user_card(parse_query(&c)?).await?.user_id),
        None => None,
    };
    messenger.receive(0).await?;
    messenger.flush_acks().await;
    // Opening a chat reads it, as in any messenger.
    if let Some(chat) = chat {
        messenger.mark_read(chat).await?;
    }
    let history = messenger.history()?.messages(chat).map_err(MessagingError::from)?;
    if !follow {
        emit(json, serde_json::to_value(&history).unwrap_or(Value::Null), || {
            history.iter().map(message_line).collect::<Vec<_>>().join("\n")
        });
        return Ok(());
    }
    let print = |m: &StoredMessage| {
        if json {
            outln!("{}", serde_json::to_value(m).unwrap_or(Value::Null));
        } else {
            outln!("{}", message_line(m));
        }
    };
    history.iter().for_each(print);
    loop {
        // Let other commands of this profile (say, `send` in another terminal) use the history
        // while this one waits on the network.
        messenger.release_history();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                messenger.flush_acks().await;
                return Ok(());
            }
            fresh = messenger.receive(FETCH_WAIT_MS) => match fresh {
                Ok(fresh) => {
                    fresh.messages.iter().filter(|m| chat.is_none_or(|c| m.chat == c)).for_each(print);
                    for user in fresh.typing.iter().filter(|u| chat.is_none_or(|c| **u == c)) {
                        if json { outln!("{}", json!({ "typing": user })) } else { outln!("… {user} is typing") }
                    }
                }
                Err(e) => {
                    // Relays come and go; keep following, but say so and do not spin.
                    eprintln!("warning: {e}; retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            },
        }
    }
}

async fn chats(profile: &Path, json: bool) -> CliResult {
    let mut messenger = Messenger::open(profile).await?;
    messenger.receive(0).await?;
    messenger.flush_acks().await;
    let mut chats: Vec<(meshgram_node::ids::UserId, usize, StoredMessage)> = Vec::new();
    for m in messenger.history()?.messages(None).map_err(MessagingError::from)? {
        match chats.last_mut() {
            Some((chat, count, last)) if *chat == m.chat => {
                *count += 1;
                *last = m;
            }
            _ => chats.push((m.chat, 1, m)),
        }
    }
    let value: Vec<Value> =
        chats.iter().map(|(chat, count, last)| json!({ "chat": chat, "messages": count, "last": last })).collect();
    emit(json, Value::Array(value), || {
        chats
            .iter()
            .map(|(chat, count, last)| format!("{chat}\t{count} messages\t{}", message_line(last)))
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(())
}
