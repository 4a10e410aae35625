//! The `meshgram` command line: flags, one function per command, and output as text or JSON.
//!
//! - this file: the flags and the dispatch;
//! - [`calls`]: the commands that are calls to the profile's client node (through its control
//!   socket when one runs, else on a node opened for the one command), and how each reply prints;
//! - [`follow`]: `messages --follow`, which subscribes to the node's events (becoming the node
//!   when none runs);
//! - [`login`]: signing in, the one command that works before there is a session;
//! - [`node`]: `meshgram node`, the client node in the foreground;
//! - [`transfer`]: `upload` and `download`, with their progress;
//! - [`history`]: `devices approve` and `backup`, which move the history, with their progress;
//! - [`output`]: text and JSON output shared by all of them.

mod calls;
mod follow;
mod group;
mod history;
mod login;
mod node;
mod output;
mod secret;
mod transfer;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use libp2p::Multiaddr;
use meshgram_node::client::api::ApiError;
use meshgram_node::client::{ClientError, messaging::MessagingError};

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
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
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
        /// 2FA password, if the account has one (otherwise asked for). Prefer the prompt or the
        /// environment: other users on the machine can read a command line.
        #[arg(long, env = "MESHGRAM_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        /// Sign in as a bot with its token (better from the environment than on the command line).
        #[arg(long, env = "MESHGRAM_BOT_TOKEN", hide_env_values = true)]
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
    /// Press a button (by its text) under a bot's message; an inline button waits briefly
    /// for the bot's answer.
    Press { message_id: String, button: String },
    /// Delete a message you sent, for everyone.
    Delete { message_id: String },
    /// Tell someone you are typing.
    Typing { to: String },
    /// Upload a file and send it, resuming an upload of the same file that was interrupted.
    Upload {
        file: PathBuf,
        /// @username, +phone or user id.
        #[arg(long)]
        to: String,
        #[arg(long)]
        caption: Option<String>,
        /// Part size in KiB (4 to 1024).
        #[arg(long, default_value_t = 512)]
        part_size_kib: u32,
    },
    /// Download the file of a message, checking every part.
    Download {
        message_id: String,
        /// Where to write it: a file, or a directory (default: the current one).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Only bytes START-END (both included), fetching only the parts that cover them.
        #[arg(long)]
        range: Option<String>,
    },
    /// Send a message on to someone else (a file is not uploaded again).
    Forward {
        message_id: String,
        #[arg(long)]
        to: String,
    },
    /// List this account's devices, send one of them the history, or sign one out.
    Devices {
        #[command(subcommand)]
        command: Option<DevicesCommand>,
    },
    /// Encrypted backups of the history, opened with a recovery code.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Secret chats: end to end between one device on each side, forward secret, never on
    /// your other devices, with self-destruct timers.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Groups: end-to-end encrypted for their members, each message stored once on the relays.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Join a group with an invite link (an admin's device lets you in).
    Join { link: String },
    /// Channels: one-to-many, only admins post; public ones are read by anyone with the link.
    #[command(subcommand)]
    Channel(ChannelCommand),
    /// Push notifications: relays wake this device through a Web Push / UnifiedPush endpoint
    /// when something arrives while it is not connected (encrypted; the push service learns
    /// nothing of who wrote or what).
    #[command(subcommand)]
    Push(PushCommand),
    /// Run this profile's client node until Ctrl-C: it receives as messages arrive, renews the
    /// session, and other commands of the profile go through it.
    Node,
    /// Run this profile's client node with the desktop app, a web UI on 127.0.0.1, and open it
    /// in the browser (a second `app` on the profile opens the running one).
    App {
        /// The port to listen on (0: any free one).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Print the address without opening a browser.
        #[arg(long)]
        no_open: bool,
        /// Where to sign in, for a profile not signed in yet.
        #[command(flatten)]
        gateway: GatewayArgs,
        /// A relay to use, ending in /p2p/<peer id> (repeatable; adds to --network's relays).
        #[arg(long)]
        relay: Vec<Multiaddr>,
        /// How this device appears in session lists.
        #[arg(long)]
        device_name: Option<String>,
        /// Exit when stdin closes (how `meshgram up` runs its roles).
        #[arg(long, hide = true)]
        exit_on_stdin_close: bool,
    },
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
#[group(multiple = false)]
pub(crate) struct GatewayArgs {
    /// The gateway's multiaddr, ending in /p2p/<peer id>; repeat it for each gateway of the
    /// network (the one that answers is used).
    #[arg(long)]
    gateway: Vec<Multiaddr>,
    /// A network.json written by `meshgram up` (gateway and relays).
    #[arg(long)]
    network: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub(crate) enum ProfileCommand {
    /// Set username (empty removes it) and/or display name.
    Set {
        #[arg(long)]
        username: Option<String>,
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum PasswordCommand {
    /// Set or change the password (asked for on standard input unless given).
    Set {
        #[arg(long, env = "MESHGRAM_NEW_PASSWORD", hide_env_values = true)]
        new: Option<String>,
        /// The password now, if the account has one.
        #[arg(long, env = "MESHGRAM_PASSWORD", hide_env_values = true)]
        current: Option<String>,
    },
    /// Remove the password (asked for on standard input unless given).
    Clear {
        #[arg(long, env = "MESHGRAM_PASSWORD", hide_env_values = true)]
        current: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum SessionsCommand {
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
pub(crate) enum DevicesCommand {
    /// List devices with their keys' fingerprints (the default).
    List,
    /// Send the history to a device of yours (by its id, session id, or a part of its id).
    Approve { device: String },
    /// Sign a device of yours out.
    Remove { device: String },
}

#[derive(Subcommand, Debug)]
pub(crate) enum BackupCommand {
    /// Back the history up to the relays (or to a file with -o). The first backup shows a
    /// recovery code, once: keep it, it is the only way to restore.
    Create {
        /// Write the backup to this file instead.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Make a new recovery code (later backups open only with it).
        #[arg(long)]
        new_code: bool,
        /// How many backups the relays keep (1 to 20; default 3).
        #[arg(long)]
        keep: Option<u8>,
    },
    /// Restore a backup into this profile (signed in to the same account).
    Restore {
        /// The recovery code (asked for when left out).
        #[arg(long)]
        code: Option<String>,
        /// Restore from this file instead of the relays.
        #[arg(long)]
        from: Option<PathBuf>,
    },
    /// The account's backups on the relays.
    List,
    /// Have the client node (`meshgram node`) back up on its own; without flags, show when.
    Schedule {
        /// How often: 90s, 30m, 6h, 1d.
        #[arg(long, conflicts_with = "off")]
        every: Option<String>,
        /// How many backups the relays keep (1 to 20; default 3).
        #[arg(long)]
        keep: Option<u8>,
        /// Stop the periodic backups.
        #[arg(long)]
        off: bool,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum PushCommand {
    /// Register a subscription (as the push service or browser hands it out) with the relays
    /// holding this device's mailbox.
    Register {
        /// The endpoint URL.
        url: String,
        /// The subscription's P-256 public key, base64url (which may start with '-').
        #[arg(long, allow_hyphen_values = true)]
        p256dh: String,
        /// The subscription's auth secret, base64url (which may start with '-').
        #[arg(long, allow_hyphen_values = true)]
        auth: String,
    },
    /// The subscription, and whether each mailbox relay holds it.
    Status,
    /// Remove the subscription from the relays and this profile.
    Unregister,
}

/// `CHAT` below: a secret chat's id (or a unique part of it, as `secret list` shows), or
/// `@username` / `+phone` for your open secret chat with that person.
#[derive(Subcommand, Debug)]
pub(crate) enum SecretCommand {
    /// Start a secret chat with @username, +phone or user id; it opens when they accept.
    Start {
        to: String,
        /// Which of their devices (its id or a part of it; default: the one that signed in last).
        #[arg(long)]
        device: Option<String>,
    },
    /// Accept a secret chat someone started.
    Accept { chat: String },
    /// Decline a secret chat someone started.
    Decline { chat: String },
    /// Send a message, each line of stdin (--lines), or a file (--file) in a secret chat.
    Send {
        chat: String,
        #[arg(required_unless_present_any = ["lines", "file"])]
        text: Option<String>,
        #[arg(long, conflicts_with_all = ["text", "file"])]
        lines: bool,
        /// A file to send (the text, if any, is its caption).
        #[arg(long)]
        file: Option<PathBuf>,
        #[arg(long)]
        reply_to: Option<String>,
    },
    /// Your secret chats: state, timer, session (generation, messages), fingerprint.
    List,
    /// Close a secret chat: keys and messages are wiped on both devices.
    Close { chat: String },
    /// The key fingerprint to compare with the other person (hex and emoji).
    Fingerprint { chat: String },
    /// Set the self-destruct timer for new messages: 30s, 5m, 1h, 1d, or off.
    Ttl { chat: String, timer: String },
}

/// `CHAT` below: a group's id, `g` and 32 hex digits (as `group create` and `chats` print).
#[derive(Subcommand, Debug)]
pub(crate) enum GroupCommand {
    /// Create a group with the given members (@username, +phone or user id); prints its id.
    Create { title: String, members: Vec<String> },
    /// Add members (admins).
    Add {
        chat: String,
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Remove members (admins); they cannot read what is sent after.
    Remove {
        chat: String,
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Leave the group.
    Leave { chat: String },
    /// The group's title, description, members, admins, pin and your invite links.
    Info { chat: String },
    /// Your groups.
    List,
    /// Change the title (admins).
    Title { chat: String, title: String },
    /// Change the description (admins).
    Description { chat: String, description: String },
    /// Make a member an admin, or (--off) no longer one (admins).
    Admin {
        chat: String,
        user: String,
        #[arg(long)]
        off: bool,
    },
    /// Pin a message, or unpin with no message id (admins).
    Pin { chat: String, message_id: Option<String> },
    /// Make an invite link (admins).
    Link { chat: String },
    /// Revoke an invite link (admins).
    RevokeLink { chat: String, link: String },
}

/// `CHAT` below: a channel's id (`g` and 32 hex digits).
#[derive(Subcommand, Debug)]
pub(crate) enum ChannelCommand {
    /// Create a channel (public unless --private); prints its id.
    Create {
        title: String,
        #[arg(long)]
        private: bool,
    },
    /// Post to a channel (admins).
    Post { chat: String, text: String },
    /// Subscribe with a channel's link or @name (a private one's: its admin's device lets you in).
    Subscribe { link: String },
    /// Read a public channel from its link or @name without subscribing.
    Read { link: String },
    /// Leave a channel.
    Unsubscribe { chat: String },
    /// The channel's link: a public one's lets anyone read; a private one's is an invite.
    Link { chat: String },
    /// Name a public channel @name (admins): anyone reads and subscribes by it, as by its link.
    Name {
        chat: String,
        name: String,
        /// Give the name up: anyone may take it again, as a username or a channel's name.
        #[arg(long)]
        off: bool,
    },
    /// The channel's title, description, admins and subscriber count.
    Info { chat: String },
}

#[derive(Subcommand, Debug)]
pub(crate) enum BotCommand {
    /// Create a bot; prints its token.
    Create {
        #[arg(long)]
        username: String,
        #[arg(long)]
        name: String,
    },
    /// Your bots.
    List,
    /// The commands a bot lists (its /commands menu).
    Commands {
        /// @username or user id of the bot.
        bot: String,
    },
    /// Replace a bot's token (the old one stops working).
    RevokeToken { bot_id: String },
}

/// A failed command: the node's error shape, printed as text or JSON.
#[derive(Debug)]
pub(crate) struct CliError(pub(crate) ApiError);

impl CliError {
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        CliError(ApiError::usage(message))
    }

    /// Prints the error: JSON on stdout with `--json`, text on stderr otherwise.
    pub(crate) fn report(&self, json: bool) {
        let e = &self.0;
        if json {
            outln!(
                "{}",
                serde_json::json!({ "error": { "code": e.code, "message": e.message, "retry_after": e.retry_after } })
            );
        } else {
            eprintln!("error: {}: {}", e.code, e.message);
        }
    }
}

impl From<ApiError> for CliError {
    fn from(e: ApiError) -> Self {
        CliError(e)
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        CliError(e.into())
    }
}

impl From<MessagingError> for CliError {
    fn from(e: MessagingError) -> Self {
        CliError(e.into())
    }
}

impl From<meshgram_node::client::control::ControlError> for CliError {
    fn from(e: meshgram_node::client::control::ControlError) -> Self {
        CliError(e.into())
    }
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        CliError(ApiError::new("ERROR", format!("{e:#}")))
    }
}

pub(crate) type CliResult = Result<(), CliError>;

pub(crate) use login::keep_session;

/// A clear `NOT_SIGNED_IN` before a command that would otherwise trip over a missing profile.
fn require_session(profile: &std::path::Path) -> CliResult {
    match profile.join(meshgram_node::client::SESSION_FILE).exists() {
        true => Ok(()),
        false => Err(ClientError::NotSignedIn.into()),
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
            let how = login::LoginWith { phone, code, password, bot_token, device_name };
            login::login(&profile, json, &gateway, &relay, how).await
        }
        Command::Node => node::run(&profile, json).await,
        Command::App { port, no_open, gateway, relay, device_name, exit_on_stdin_close } => {
            let given = !gateway.gateway.is_empty() || gateway.network.is_some();
            let gateway = given.then(|| login::resolve_gateway(&gateway, &relay)).transpose()?;
            let device_name = device_name.unwrap_or_else(|| login::default_device_name().replace("CLI", "app"));
            let options = crate::app::AppOptions { port, open: !no_open, gateway, device_name, exit_on_stdin_close };
            crate::app::run(&profile, json, options).await
        }
        Command::Messages { chat, follow: true } => follow::follow(&profile, json, chat).await,
        Command::Up { data, relays, replication } => {
            crate::up::run(&data, crate::up::UpOptions { relays, replication }, json).await.map_err(CliError::from)
        }
        Command::Upload { file, to, caption, part_size_kib } => {
            transfer::upload(&profile, json, &file, &to, caption, part_size_kib).await
        }
        Command::Download { message_id, output, range } => {
            transfer::download(&profile, json, &message_id, output.as_deref(), range.as_deref()).await
        }
        Command::Devices { command: Some(DevicesCommand::Approve { device }) } => {
            history::approve(&profile, json, device).await
        }
        Command::Backup(command @ (BackupCommand::Create { .. } | BackupCommand::Restore { .. })) => {
            history::backup(&profile, json, command).await
        }
        Command::Channel(ChannelCommand::Read { link }) => group::read_channel(&profile, json, link).await,
        command => calls::run(&profile, json, command).await,
    }
}
