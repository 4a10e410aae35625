//! The bots this bridge runs: each is a client node of its own (its own device keys, session
//! and history, in `DATA/bots/<token hash>/`), signed in with its token on first use and
//! started again at every start of the bridge, and a task that turns what its node receives
//! into Bot API updates.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshgram_node::client::api::{ApiError, Call, Event, Reply};
use meshgram_node::client::groups::GroupInfo;
use meshgram_node::client::history::{Press, StoredMessage};
use meshgram_node::client::node::{NodeHandle, NodeMode};
use meshgram_node::client::session::{Client, ClientError, GatewayAddr};
use meshgram_node::ids::UserId;
use meshgram_node::proto::error::ErrorCode;
use meshgram_node::proto::group::is_group_chat;
use meshgram_node::proto::payload::MessageId;
use meshgram_node::proto::{Account, AuthRequest, LookupQuery, RelayInfo, UserCard};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::task::AbortOnDropHandle;

use crate::api::TgError;
use crate::convert;
use crate::store::{BotStore, Offer};

/// How long a looked-up user's card serves for `from` fields before it is looked up again.
const CARD_CACHE: Duration = Duration::from_secs(300);

/// Where the network is, for signing bots in.
#[derive(Debug, Clone)]
pub struct Network {
    pub gateway: GatewayAddr,
    pub relays: Vec<RelayInfo>,
}

/// Every bot of this bridge, by the hash of its token.
#[derive(Debug)]
pub struct Bots {
    dir: PathBuf,
    network: Network,
    fetch_private_urls: bool,
    running: Mutex<HashMap<[u8; 32], Running>>,
    /// One sign-in or start at a time: two requests with a new token make one session.
    starting: tokio::sync::Mutex<()>,
}

impl Bots {
    pub fn new(data: &Path, network: Network, fetch_private_urls: bool) -> std::io::Result<Self> {
        let dir = data.join("bots");
        std::fs::create_dir_all(&dir)?;
        let starting = tokio::sync::Mutex::new(());
        Ok(Bots { dir, network, fetch_private_urls, running: Mutex::default(), starting })
    }

    /// Starts every bot that signed in before (so that their updates keep coming in); a bot
    /// that cannot start is logged and tried again at its next request.
    pub async fn start_known(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(hash) = parse_hash(&name) else { continue };
            if let Err(e) = self.start(hash, None).await {
                tracing::warn!(bot = %name, error = %e.description, "a bot of this bridge did not start");
            }
        }
    }

    /// The bot a token names: running, started from its profile, or signed in now.
    pub(crate) async fn get(&self, token: &str) -> Result<Arc<Bot>, TgError> {
        if token.parse::<meshgram_node::ids::BotToken>().is_err() {
            return Err(TgError::new(401, "Unauthorized: invalid token specified"));
        }
        let hash = *blake3::hash(token.as_bytes()).as_bytes();
        if let Some(running) = self.running().get(&hash) {
            return Ok(running.bot.clone());
        }
        self.start(hash, Some(token)).await
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Running>> {
        self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn start(&self, hash: [u8; 32], token: Option<&str>) -> Result<Arc<Bot>, TgError> {
        let _one = self.starting.lock().await;
        if let Some(running) = self.running().get(&hash) {
            return Ok(running.bot.clone());
        }
        let dir = self.dir.join(meshgram_node::ids::hex(&hash));
        let profile = dir.join("profile");
        let signed_in = profile.join("session.json").exists();
        if !signed_in {
            let Some(token) = token else { return Err(TgError::new(401, "Unauthorized")) };
            self.sign_in(&profile, token).await?;
        }
        let node = NodeHandle::start(&profile, NodeMode::Running).await.map_err(|e| node_error(&e))?;
        let store = BotStore::open(&dir.join("bot-api.redb")).map_err(TgError::internal)?;
        let me = match node.call(Call::Whoami).await.map_err(|e| node_error(&e))? {
            Reply::Me(me) => me,
            other => return Err(TgError::internal(ApiError::unexpected("whoami", &other))),
        };
        let events = node.subscribe();
        let (numbering, numbering_jobs) = tokio::sync::mpsc::channel(MAX_NUMBERING_BATCH);
        let bot = Arc::new(Bot {
            numbering,
            account: me.account,
            node,
            store,
            dir,
            fetch_private_urls: self.fetch_private_urls,
            arrived: Arc::default(),
            users: Mutex::default(),
            groups: Mutex::default(),
        });
        let feeder = AbortOnDropHandle::new(tokio::spawn(feed(Arc::downgrade(&bot), events)));
        let webhook = AbortOnDropHandle::new(tokio::spawn(crate::webhook::deliver(Arc::downgrade(&bot))));
        let numberer = AbortOnDropHandle::new(tokio::spawn(number_messages(Arc::downgrade(&bot), numbering_jobs)));
        tracing::info!(bot = %bot.account.user_id, "bot started");
        self.running().insert(hash, Running { bot: bot.clone(), _tasks: [feeder, webhook, numberer] });
        Ok(bot)
    }

    async fn sign_in(&self, profile: &Path, token: &str) -> Result<(), TgError> {
        std::fs::create_dir_all(profile).map_err(TgError::internal)?;
        meshgram_node::client::session::keep_private(profile).map_err(|e| TgError::internal(ApiError::from(e)))?;
        let client = Client::open(profile, self.network.gateway.clone()).map_err(client_error)?;
        let request = AuthRequest::BotSignIn {
            token: token.to_string(),
            device: client.identity.device_keys(),
            device_name: "Meshgram bot bridge".into(),
        };
        let signed_in = client.sign_in(request).await.map_err(client_error)?;
        client.accept_session(signed_in.account, signed_in.cert, self.network.relays.clone()).map_err(client_error)?;
        Ok(())
    }
}

/// Whether `text` mentions `@name` (lower case), as a whole username: `@name_two` is not it.
fn mentions(text: &str, name: &str) -> bool {
    let text = text.to_ascii_lowercase();
    let wanted = format!("@{name}");
    text.match_indices(&wanted).any(|(at, _)| {
        let after = text[at + wanted.len()..].chars().next();
        !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// How long the list of the bot's groups serves before it is asked for again.
const GROUPS_CACHE: Duration = Duration::from_secs(5);

/// A press's key among the offered message ids.
fn press_key(press: &Press) -> [u8; 16] {
    let hash = blake3::Hasher::new_derive_key("meshgram bot bridge press key").update(&press.id.0).finalize();
    let mut key = [0; 16];
    key.copy_from_slice(&hash.as_bytes()[..16]);
    key
}

fn parse_hash(name: &str) -> Option<[u8; 32]> {
    meshgram_node::ids::parse_hex::<32>(name).ok()
}

/// A gateway refusal of a sign-in is the token's fault; anything else may pass.
fn client_error(e: ClientError) -> TgError {
    match &e {
        ClientError::Gateway(g) if g.code == ErrorCode::AccessTokenInvalid => TgError::new(401, "Unauthorized"),
        ClientError::Gateway(g) if g.code == ErrorCode::FloodWait => TgError::flood(g.retry_after_secs.unwrap_or(5)),
        _ if e.is_transient() => TgError::new(500, "Internal Server Error: the gateway is unreachable; retry"),
        _ => TgError::internal(e),
    }
}

/// A node's error as the Bot API says it.
pub(crate) fn node_error(e: &ApiError) -> TgError {
    match e.code.as_str() {
        "FLOOD_WAIT" => TgError::flood(e.retry_after.unwrap_or(5)),
        "NOT_FOUND" | "NO_DEVICES" => TgError::new(400, "Bad Request: chat not found"),
        "ACCESS_TOKEN_INVALID" | "SESSION_REVOKED" | "AUTH_KEY_UNREGISTERED" => TgError::new(401, "Unauthorized"),
        "FORBIDDEN" => TgError::new(403, format!("Forbidden: {}", e.message)),
        "USAGE" => TgError::bad_request(&e.message),
        "NETWORK" | "UNAVAILABLE" => TgError::new(500, "Internal Server Error: the network is unreachable; retry"),
        _ => TgError::internal(e),
    }
}

/// One running bot.
#[derive(Debug)]
pub(crate) struct Bot {
    pub(crate) account: Account,
    pub(crate) node: NodeHandle,
    pub(crate) store: BotStore,
    /// Its data directory: profile, store, and the files it sent and fetched.
    pub(crate) dir: PathBuf,
    /// Whether files sent by URL may come from loopback and private addresses.
    pub(crate) fetch_private_urls: bool,
    /// Where messages are numbered (see [`number_messages`]).
    numbering: tokio::sync::mpsc::Sender<NumberJob>,
    /// Woken when updates were queued.
    pub(crate) arrived: Arc<Notify>,
    users: Mutex<HashMap<UserId, (Value, std::time::Instant)>>,
    groups: Mutex<Option<(Vec<GroupInfo>, std::time::Instant)>>,
}

/// A started bot and its tasks, which hold it only weakly: the one feeding its updates, the
/// one delivering them to its webhook, and the one numbering its messages.
#[derive(Debug)]
struct Running {
    bot: Arc<Bot>,
    _tasks: [AbortOnDropHandle<()>; 3],
}

/// A message to number (chat, id), and where its number goes.
type NumberJob = ((i64, MessageId), tokio::sync::oneshot::Sender<Result<i32, String>>);
/// Most messages numbered in one transaction.
const MAX_NUMBERING_BATCH: usize = 512;

/// Numbers messages for many requests in one transaction: concurrent sends each need a
/// number before they answer, and a transaction each would cost each a sync to disk.
async fn number_messages(bot: std::sync::Weak<Bot>, mut jobs: tokio::sync::mpsc::Receiver<NumberJob>) {
    while let Some(first) = jobs.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_NUMBERING_BATCH
            && let Ok(job) = jobs.try_recv()
        {
            batch.push(job);
        }
        let Some(this) = bot.upgrade() else { return };
        let wanted: Vec<(i64, MessageId)> = batch.iter().map(|(w, _)| *w).collect();
        match this.store.numbers(&wanted) {
            Ok(numbers) => {
                for ((_, reply), number) in batch.into_iter().zip(numbers) {
                    let _ = reply.send(Ok(number));
                }
            }
            Err(e) => {
                for (_, reply) in batch {
                    let _ = reply.send(Err(e.to_string()));
                }
            }
        }
    }
}

impl Bot {
    /// Where the files of the bot's requests are written (kept once sent: the node serves
    /// their chunks to peers from there).
    pub(crate) fn sent_files_dir(&self) -> PathBuf {
        self.dir.join("sent")
    }

    /// The bot itself as a Bot API `User`.
    pub(crate) fn me(&self) -> Value {
        json!({
            "id": self.account.user_id.0,
            "is_bot": true,
            "first_name": self.account.name,
            "username": self.account.username.as_ref().map(|u| u.as_str().to_string()),
            "can_join_groups": true,
            "can_read_all_group_messages": false,
            "supports_inline_queries": false,
            "can_connect_to_business": false,
            "has_main_web_app": false,
        })
    }

    /// A user as a Bot API `User`, from the directory (cached); only the id when the gateway
    /// cannot be asked now.
    pub(crate) async fn user(&self, user: UserId) -> Value {
        match self.known_user(user).await {
            Ok(found) => found,
            Err(_) => json!({ "id": user.0, "is_bot": false, "first_name": format!("User {}", user.0) }),
        }
    }

    /// A user as a Bot API `User`, from the directory, cached: every request names its chat,
    /// and asking the gateway each time would put a round trip to it in every request. An
    /// error if the directory has no such user (`chat not found`) or cannot be asked now.
    pub(crate) async fn known_user(&self, user: UserId) -> Result<Value, TgError> {
        if user == self.account.user_id {
            let mut me = json!({ "id": user.0, "is_bot": true, "first_name": self.account.name });
            if let Some(username) = &self.account.username {
                me["username"] = username.as_str().into();
            }
            return Ok(me);
        }
        if let Some((found, at)) = self.users_cache().get(&user)
            && at.elapsed() < CARD_CACHE
        {
            return Ok(found.clone());
        }
        Ok(convert::user(&self.card(LookupQuery::UserId(user)).await?))
    }

    /// A user's card by @username, user id or phone, from the directory (and kept in the cache).
    pub(crate) async fn card(&self, query: LookupQuery) -> Result<UserCard, TgError> {
        match self.node.call(Call::Lookup { query }).await {
            Ok(Reply::Card { card }) => {
                self.users_cache().insert(card.user_id, (convert::user(&card), std::time::Instant::now()));
                Ok(card)
            }
            Ok(other) => Err(TgError::internal(ApiError::unexpected("lookup", &other))),
            Err(e) => Err(node_error(&e)),
        }
    }

    fn users_cache(&self) -> std::sync::MutexGuard<'_, HashMap<UserId, (Value, std::time::Instant)>> {
        self.users.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A message of the bot's history as a Bot API `Message`.
    pub(crate) async fn message_json(&self, m: &StoredMessage) -> Result<Value, TgError> {
        let chat = self.chat_id(m.chat)?;
        let number = self.number(chat, m.id).await?;
        let reply_to = match m.reply_to {
            Some(id) => Some(self.number(chat, id).await?),
            None => None,
        };
        let chat_json = if is_group_chat(m.chat) {
            let title = self.group_of_chat(m.chat).await?.map(|g| g.title).unwrap_or_default();
            convert::group_chat(chat, &title)
        } else {
            convert::private_chat(&self.user(m.chat).await)
        };
        Ok(convert::message(m, number, reply_to, self.user(m.from).await, chat_json))
    }

    /// The Bot API chat id of a chat of the bot's history: a user's id, or a group's negative
    /// id, given in order as the bridge first meets the group (see `BotStore::group_chat_id`).
    pub(crate) fn chat_id(&self, chat: UserId) -> Result<i64, TgError> {
        if is_group_chat(chat) {
            return self.store.group_chat_id(chat.0).map_err(TgError::internal);
        }
        Ok(chat.0 as i64)
    }

    /// The Bot API number of message `id` in `chat`, given now if it has none.
    pub(crate) async fn number(&self, chat: i64, id: MessageId) -> Result<i32, TgError> {
        let stopped = || TgError::internal("the numbering task stopped");
        let (reply, number) = tokio::sync::oneshot::channel();
        self.numbering.send(((chat, id), reply)).await.map_err(|_| stopped())?;
        number.await.map_err(|_| stopped())?.map_err(TgError::internal)
    }

    /// The group (not channel) the bot is in that `which` picks. The list is cached for a
    /// few seconds (asking the node for it also fetches from the relays); one not in the cache
    /// is looked for again in a fresh list, so a group the bot was just added to is found.
    pub(crate) async fn group(&self, which: impl Fn(&GroupInfo) -> bool) -> Result<Option<GroupInfo>, TgError> {
        let cached = self.groups_cache().as_ref().filter(|(_, at)| at.elapsed() < GROUPS_CACHE).map(|(g, _)| g.clone());
        if let Some(found) = cached.into_iter().flatten().find(&which) {
            return Ok(Some(found));
        }
        let groups: Vec<GroupInfo> = match self.node.call(Call::GroupList).await {
            Ok(Reply::Groups { groups }) => groups.into_iter().filter(|g| g.kind == "group" && g.active).collect(),
            Ok(other) => return Err(TgError::internal(ApiError::unexpected("group_list", &other))),
            Err(e) => return Err(node_error(&e)),
        };
        let found = groups.iter().find(|g| which(g)).cloned();
        *self.groups_cache() = Some((groups, std::time::Instant::now()));
        Ok(found)
    }

    fn groups_cache(&self) -> std::sync::MutexGuard<'_, Option<(Vec<GroupInfo>, std::time::Instant)>> {
        self.groups.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The group whose chat this is in the bot's history.
    async fn group_of_chat(&self, chat: UserId) -> Result<Option<GroupInfo>, TgError> {
        self.group(|g| g.id.chat_number() == chat).await
    }

    /// Whether the bot sees a group message, in privacy mode as Telegram's: commands for every
    /// bot or for this one, mentions of it, replies to its messages; everything when it is an
    /// admin of the group.
    /// Other bots' messages are never seen, so that two bots cannot answer each other forever.
    async fn sees_in_group(&self, m: &StoredMessage) -> Result<bool, TgError> {
        let Some(group) = self.group_of_chat(m.chat).await? else { return Ok(false) };
        if self.user(m.from).await["is_bot"] == true {
            return Ok(false);
        }
        if group.admin {
            return Ok(true);
        }
        let me = self.account.username.as_ref().map(|u| u.as_str().to_ascii_lowercase());
        if let Some(command) = m.text.split_whitespace().next().filter(|w| w.starts_with('/')) {
            match command.split_once('@') {
                None => return Ok(true),
                Some((_, to)) if Some(to.to_ascii_lowercase()) == me => return Ok(true),
                Some(_) => {}
            }
        }
        if let Some(me) = &me
            && mentions(&m.text, me)
        {
            return Ok(true);
        }
        let Some(replied) = m.reply_to else { return Ok(false) };
        match self.node.call(Call::GetMessage { message: replied }).await {
            Ok(Reply::Message { message }) => Ok(message.outgoing && message.chat == m.chat),
            Err(e) if e.code == "NOT_FOUND" => Ok(false),
            Ok(other) => Err(TgError::internal(ApiError::unexpected("get_message", &other))),
            Err(e) => Err(node_error(&e)),
        }
    }

    /// Turns a received message into an update unless it was already (or, in a group, the bot
    /// does not see it).
    async fn offer(&self, m: &StoredMessage) -> Result<bool, TgError> {
        if m.outgoing || m.notice || m.deleted {
            return Ok(false);
        }
        // Checked first: looking the whole history over at start costs a read per message.
        if self.store.offered(m.id, convert::version(m)).map_err(TgError::internal)? {
            return Ok(false);
        }
        if is_group_chat(m.chat) && !self.sees_in_group(m).await? {
            return Ok(false);
        }
        let message = self.message_json(m).await?;
        let queued = self
            .store
            .offer(self.chat_id(m.chat)?, m.id, convert::version(m), |offer, _| {
                let kind = if offer == Offer::Edited { "edited_message" } else { "message" };
                Some(json!({ kind: message }))
            })
            .map_err(TgError::internal)?;
        Ok(queued)
    }

    /// Turns a press of one of the bot's inline buttons into a `callback_query` update unless
    /// it was already (or the bot answered it: then it had it).
    async fn offer_press(&self, press: &Press) -> Result<bool, TgError> {
        // Press ids are the presser's choice: keyed apart from message ids, which share the table.
        let key = press_key(press);
        if press.answer.is_some() || self.store.offered(MessageId(key), 0).map_err(TgError::internal)? {
            return Ok(false);
        }
        let mut query = json!({
            "id": press.id.to_string(),
            "from": self.user(press.with).await,
            // The same for every press in this chat, and nothing else: what Telegram promises.
            "chat_instance": press.with.0.to_string(),
            "data": press.data,
        });
        match self.node.call(Call::GetMessage { message: press.message }).await {
            Ok(Reply::Message { message }) => query["message"] = self.message_json(&message).await?,
            // Deleted since: the query comes without it, as Telegram's for a message too old.
            Err(e) if e.code == "NOT_FOUND" => {}
            Ok(other) => return Err(TgError::internal(ApiError::unexpected("get_message", &other))),
            Err(e) => return Err(node_error(&e)),
        }
        self.store.offer_once(key, json!({ "callback_query": query })).map_err(TgError::internal)
    }
}

/// What the bot's node received that may become an update.
enum Arrival {
    Message(StoredMessage),
    Press(Press),
}

impl Bot {
    /// Queues the update of an arrival unless it was queued already; whether it was now.
    async fn offer_arrival(&self, arrival: &Arrival) -> Result<bool, TgError> {
        match arrival {
            Arrival::Message(m) => self.offer(m).await,
            Arrival::Press(press) => self.offer_press(press).await,
        }
    }

    /// Everything the history holds that may become an update: messages in the order they were
    /// sent, across chats, as updates would have come, then the presses waiting.
    async fn all_arrivals(&self) -> Result<Vec<Arrival>, TgError> {
        let (mut messages, _) = self.node.messages(None).await.map_err(|e| node_error(&e))?;
        messages.sort_by_key(|m| (m.sent_at_ms, m.id));
        let mut arrivals: Vec<Arrival> = messages.into_iter().map(Arrival::Message).collect();
        match self.node.call(Call::Presses).await {
            Ok(Reply::Presses { presses }) => arrivals.extend(presses.into_iter().map(Arrival::Press)),
            Ok(other) => return Err(TgError::internal(ApiError::unexpected("presses", &other))),
            Err(e) => return Err(node_error(&e)),
        }
        Ok(arrivals)
    }
}

/// Turns what the bot's node receives into updates: first what its history holds and was not
/// offered yet (the bridge may have died after the node stored it), then each event.
async fn feed(bot: std::sync::Weak<Bot>, mut events: tokio::sync::broadcast::Receiver<Event>) {
    let mut look_again = true;
    loop {
        let Some(this) = bot.upgrade() else { return };
        if look_again {
            let arrivals = match this.all_arrivals().await {
                Ok(arrivals) => arrivals,
                Err(e) => {
                    tracing::info!(error = %e.description, "the bot's history could not be read yet; retrying");
                    drop(this);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let (mut queued, mut failed) = (false, false);
            for arrival in &arrivals {
                match this.offer_arrival(arrival).await {
                    Ok(q) => queued |= q,
                    Err(e) => {
                        tracing::warn!(error = %e.description, "an update was not queued; retrying");
                        failed = true;
                    }
                }
            }
            if queued {
                this.arrived.notify_waiters();
            }
            look_again = failed;
            if failed {
                drop(this);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        }
        drop(this);
        let event = events.recv().await;
        let Some(this) = bot.upgrade() else { return };
        let arrival = match event {
            Ok(Event::Message { message, received: true, .. }) => Arrival::Message(message),
            Ok(Event::Press { press }) => Arrival::Press(press),
            Ok(_) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                look_again = true;
                continue;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        match this.offer_arrival(&arrival).await {
            Ok(true) => this.arrived.notify_waiters(),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e.description, "an update was not queued; looking again");
                look_again = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_mention_is_of_the_whole_username() {
        assert!(super::mentions("hi @Team_Bot, a question", "team_bot"));
        assert!(super::mentions("@team_bot", "team_bot"));
        assert!(!super::mentions("ask @team_bot_two", "team_bot"));
        assert!(!super::mentions("no mention", "team_bot"));
    }
}
