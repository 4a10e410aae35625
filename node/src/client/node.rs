//! The client node: one signed-in device kept running. It holds the profile (keys, session,
//! history), long-polls its mailbox relays and records what arrives, renews its certificate
//! ahead of expiry, and answers [`Call`]s from its front ends, telling subscribers what changed.
//!
//! Four tasks, owned by the handles (the last [`NodeHandle`] dropped stops them):
//! - the **actor** owns the [`Messenger`] that sends and answers calls, one call at a time, and
//!   retries the outbox while messages wait in it;
//! - the **receiver** owns a fork of it (same network task, same history, its own relay state)
//!   and long-polls, so a message arrives while a send is in flight and a call never waits for
//!   a poll;
//! - the **renewer** renews the certificate at half-life, so no call waits on the gateway;
//! - the **chunk server** hands the chunks of this device's files to signed-in peers and
//!   announces them to the relays (peer-assisted downloads, `client::media`).
//!
//! Uploads and downloads run on tasks of their own, on forks of the actor's messenger.
//!
//! The session is shared through a `watch` channel ([`SharedSession`]): whoever changes it saves
//! it, and each messenger takes the change before its next request. Actor and receiver record
//! into one history, where each envelope's change is applied in the transaction that marks it
//! seen, so every [`Event::Message`] for a received message is sent once.

use std::path::Path;
use std::sync::Arc;

use libp2p::PeerId;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::task::AbortOnDropHandle;

use crate::client::api::{ApiError, Call, ChatSummary, Event, Me, Names, Reply};
use crate::client::backup::{DEFAULT_BACKUPS_KEPT, MIN_BACKUP_EVERY_SECS};
use crate::client::buttons::Pressed;
use crate::client::groups::GroupInfo;
use crate::client::history::{History, StoredMessage};
use crate::client::media::ChunkServer;
use crate::client::messaging::{Draft, Inbox, MessagingError, Messenger};
use crate::client::secret::{SecretChatInfo, SecretError};
use crate::client::session::{Client, ClientError, SavedSession};
use crate::crypto::cert::unix_now;
use crate::defaults::{
    FETCH_WAIT_MS, NODE_BACKUP_CHECK, NODE_CALL_QUEUE, NODE_DEFERRED_BACKOFF_MAX, NODE_EVENT_QUEUE, NODE_OUTBOX_RETRY,
    NODE_RENEW_CHECK, NODE_RETRY_AFTER, PRESS_ANSWER_WAIT,
};
use crate::ids::{UserId, Username};
use crate::proto::payload::{MessageId, Status};
use crate::proto::{AuthRequest, LookupQuery, MAX_BACKUPS_KEPT, UserCard};

/// What a node does besides answering calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeMode {
    /// Receive continuously and renew the certificate: `meshgram node`, the app, each bot.
    Running,
    /// Answer calls only, for one command of a CLI that found no running node.
    OneShot,
}

type Job = (Call, oneshot::Sender<Result<Reply, ApiError>>);

/// Where a running node listens for peers fetching chunks of its files: `MESHGRAM_LISTEN`, by
/// default loopback only. Serving peers beyond this machine shows them this device's address,
/// so it is the user's choice (`MESHGRAM_LISTEN=/ip4/0.0.0.0/tcp/0`), not a default.
fn peer_listen_addr() -> Result<libp2p::Multiaddr, ApiError> {
    let addr = std::env::var("MESHGRAM_LISTEN").unwrap_or_else(|_| "/ip4/127.0.0.1/tcp/0".into());
    addr.parse().map_err(|e| ApiError::usage(format!("MESHGRAM_LISTEN={addr}: {e}")))
}

/// A cheap, cloneable handle to a running client node.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    calls: mpsc::Sender<Job>,
    events: broadcast::Sender<Event>,
    user_id: UserId,
    device: PeerId,
    _tasks: Arc<Vec<AbortOnDropHandle<()>>>,
}

impl NodeHandle {
    /// Opens a signed-in profile and starts its node. A one-shot node renews a certificate that
    /// is about to expire first; a running one starts at once and renews on its own task, so it
    /// starts (and serves from the relays) even while the gateway is away.
    pub async fn start(profile: &Path, mode: NodeMode) -> Result<NodeHandle, ApiError> {
        let running = mode == NodeMode::Running;
        let mut messenger = Messenger::open(profile, !running).await?;
        crate::client::devices::clear_transfers(profile);
        if running {
            // The node's renewal task writes the session too: one writer at a time, through it.
            messenger.leave_session_saving_to_caller();
        }
        let (user_id, device) = (messenger.session.cert.body.user_id, messenger.session.cert.body.device);
        let (events, _) = broadcast::channel(NODE_EVENT_QUEUE);
        let (calls, jobs) = mpsc::channel(NODE_CALL_QUEUE);
        let session =
            SharedSession { tx: Arc::new(watch::channel(messenger.session.clone()).0), profile: profile.into() };
        let mut tasks = Vec::new();
        if running {
            let receiver = Receiver {
                messenger: messenger.fork()?,
                deferred: 0,
                session: session.tx.subscribe(),
                events: events.clone(),
            };
            tasks.push(AbortOnDropHandle::new(tokio::spawn(receiver.run())));
            let groups =
                GroupReceiver { messenger: messenger.fork()?, session: session.tx.subscribe(), events: events.clone() };
            tasks.push(AbortOnDropHandle::new(tokio::spawn(groups.run())));
            tasks.push(AbortOnDropHandle::new(tokio::spawn(renew_loop(messenger.client.clone(), session.clone()))));
            let server = ChunkServer {
                client: messenger.client.clone(),
                history: messenger.history()?.clone(),
                session: session.tx.subscribe(),
                listen: peer_listen_addr()?,
            };
            tasks.push(AbortOnDropHandle::new(tokio::spawn(server.run())));
            let backups = backup_loop(messenger.fork()?, session.tx.subscribe());
            tasks.push(AbortOnDropHandle::new(tokio::spawn(backups)));
        }
        let actor = Actor {
            messenger,
            imports_histories: !running,
            events: events.clone(),
            updates: session.tx.subscribe(),
            session,
            calls: calls.downgrade(),
            transfers: tokio::task::JoinSet::new(),
        };
        tasks.push(AbortOnDropHandle::new(tokio::spawn(actor.run(jobs))));
        Ok(NodeHandle { calls, events, user_id, device, _tasks: Arc::new(tasks) })
    }

    /// Resolves when the node can no longer answer calls (its actor ended).
    pub async fn stopped(&self) {
        self.calls.closed().await;
    }

    /// The signed-in account.
    pub fn user_id(&self) -> UserId {
        self.user_id
    }

    /// This device.
    pub fn device(&self) -> PeerId {
        self.device
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Makes one call and waits for its answer.
    pub async fn call(&self, call: Call) -> Result<Reply, ApiError> {
        let stopped = || ApiError::new("INTERNAL", "the client node has stopped");
        let (reply, answer) = oneshot::channel();
        self.calls.send((call, reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    // ---- typed calls ----

    /// Sends text messages, in order; returns them as recorded.
    pub async fn send_texts(
        &self,
        to: LookupQuery,
        texts: Vec<String>,
        reply_to: Option<MessageId>,
    ) -> Result<Vec<StoredMessage>, ApiError> {
        match self.call(Call::Send { to, texts, reply_to }).await? {
            Reply::Messages { messages, .. } => Ok(messages),
            other => Err(ApiError::unexpected("send", &other)),
        }
    }

    /// A chat's history (reading it), or every chat's, after fetching what is waiting.
    pub async fn messages(&self, chat: Option<LookupQuery>) -> Result<(Vec<StoredMessage>, Names), ApiError> {
        match self.call(Call::Messages { chat, limit: None }).await? {
            Reply::Messages { messages, names, .. } => Ok((messages, names)),
            other => Err(ApiError::unexpected("messages", &other)),
        }
    }

    /// Every chat with its last message.
    pub async fn chats(&self) -> Result<Vec<ChatSummary>, ApiError> {
        match self.call(Call::Chats).await? {
            Reply::Chats { chats, .. } => Ok(chats),
            other => Err(ApiError::unexpected("chats", &other)),
        }
    }

    /// The signed-in account and session.
    pub async fn whoami(&self) -> Result<Me, ApiError> {
        match self.call(Call::Whoami).await? {
            Reply::Me(me) => Ok(me),
            other => Err(ApiError::unexpected("whoami", &other)),
        }
    }
}

/// The profile's session as the node's tasks share it: whoever changes it saves it, and the
/// others pick the change up (and greet the relays again) before their next request.
#[derive(Debug, Clone)]
struct SharedSession {
    tx: Arc<watch::Sender<SavedSession>>,
    profile: std::path::PathBuf,
}

impl SharedSession {
    fn get(&self) -> SavedSession {
        self.tx.borrow().clone()
    }

    /// Changes the session in place (so concurrent changes of other fields survive) and saves it.
    fn modify(&self, change: impl FnOnce(&mut SavedSession)) -> Result<(), ClientError> {
        self.tx.send_modify(change);
        self.get().save(&self.profile)
    }
}

/// Takes the shared session into `messenger` if it changed since `updates` last looked.
fn catch_up(messenger: &mut Messenger, updates: &mut watch::Receiver<SavedSession>) {
    if updates.has_changed().unwrap_or(false) {
        messenger.set_session(updates.borrow_and_update().clone());
    }
}

/// Renews the certificate once half its life has passed, on its own task so that calls never
/// wait for a gateway that is away; retries every check until it works.
async fn renew_loop(client: Client, session: SharedSession) {
    let mut check = tokio::time::interval(NODE_RENEW_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        check.tick().await;
        let b = session.get().cert.body;
        let half_life = b.not_after.saturating_sub(b.not_before) / 2;
        if b.not_after > unix_now() + half_life {
            continue;
        }
        match client.renew_cert().await {
            Ok(cert) => {
                if let Err(e) = session.modify(|s| s.cert = cert) {
                    tracing::warn!(error = %e, "renewed the certificate but could not save it");
                }
            }
            Err(e) => {
                let left = b.not_after.saturating_sub(unix_now());
                tracing::warn!(error = %e, left_secs = left, "could not renew the session certificate; retrying");
            }
        }
    }
}

/// Makes the scheduled backups (`meshgram backup schedule`), on a fork of the messenger; one
/// that fails (relays or gateway away) is tried again at the next check.
async fn backup_loop(mut messenger: Messenger, mut session: watch::Receiver<SavedSession>) {
    let mut wait = NODE_BACKUP_CHECK;
    loop {
        tokio::time::sleep(wait).await;
        catch_up(&mut messenger, &mut session);
        wait = match messenger.backup_if_due().await {
            Ok(_) => NODE_BACKUP_CHECK,
            Err(e) => {
                let again = (wait * 2).min(NODE_DEFERRED_BACKOFF_MAX);
                tracing::warn!(error = %e, retry_in_secs = again.as_secs(), "the scheduled backup failed");
                again
            }
        };
    }
}

/// Sends, and answers calls.
struct Actor {
    messenger: Messenger,
    /// Whether this actor fetches the histories other devices sent (a one-shot node's does;
    /// a running node's receiver does it instead).
    imports_histories: bool,
    events: broadcast::Sender<Event>,
    session: SharedSession,
    updates: watch::Receiver<SavedSession>,
    /// The actor's own queue, for a finished upload's message (weak: the node stops when the
    /// last handle goes, whatever the actor holds).
    calls: mpsc::WeakSender<Job>,
    /// Uploads and downloads under way, each on a fork of the messenger so that calls and
    /// messages are not held up behind a file.
    transfers: tokio::task::JoinSet<()>,
}

impl Actor {
    async fn run(mut self, mut jobs: mpsc::Receiver<Job>) {
        // What an earlier command or node left in the outbox goes first, in order.
        self.flush_outbox().await;
        let mut retry = tokio::time::interval(NODE_OUTBOX_RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                job = jobs.recv() => {
                    let Some(job) = job else { return };
                    // A job that came behind a batch of sends is routed like any other, after it.
                    let mut next = Some(job);
                    while let Some((call, reply)) = next.take() {
                        catch_up(&mut self.messenger, &mut self.updates);
                        if call.is_transfer() {
                            self.start_transfer(call, reply);
                        } else if let Call::Press { message, button } = call {
                            self.press(message, button, reply).await;
                        } else if is_send(&call) {
                            let mut batch = vec![(call, reply)];
                            while batch.len() < MAX_SEND_BATCH {
                                match jobs.try_recv() {
                                    Ok(job) if is_send(&job.0) => batch.push(job),
                                    // Not a send: its turn comes after the sends before it.
                                    Ok(job) => {
                                        next = Some(job);
                                        break;
                                    }
                                    Err(_) => break,
                                }
                            }
                            self.send_batch(batch).await;
                        } else {
                            let answer = self.handle(call).await;
                            // A caller that gave up does not need the answer.
                            let _ = reply.send(answer);
                        }
                    }
                }
                Some(_) = self.transfers.join_next() => {}
                _ = retry.tick() => {
                    // Self-destruct timers: checked as often as the outbox.
                    match self.messenger.secret_sweep() {
                        Ok(0) => {}
                        Ok(destroyed) => tracing::info!(destroyed, "secret messages destroyed on their timers"),
                        Err(e) => tracing::warn!(error = %e, "could not destroy expired secret messages; retrying"),
                    }
                    if self.messenger.outbox_waiting().unwrap_or(false) {
                        catch_up(&mut self.messenger, &mut self.updates);
                        self.flush_outbox().await;
                    }
                    if self.messenger.group_work_waiting().unwrap_or(false) {
                        catch_up(&mut self.messenger, &mut self.updates);
                        self.maintain_groups().await;
                    }
                }
            }
        }
    }

    /// Runs an upload or download on a fork of the messenger, with progress for subscribers.
    /// A finished upload comes back to this actor as a `SendFile`, so that every message is
    /// sent (and the outbox flushed) by the actor alone.
    fn start_transfer(&mut self, call: Call, reply: oneshot::Sender<Result<Reply, ApiError>>) {
        let mut messenger = match self.messenger.fork() {
            Ok(messenger) => messenger,
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                return;
            }
        };
        let (events, calls) = (self.events.clone(), self.calls.clone());
        self.transfers.spawn(async move {
            let progress = |progress| {
                let _ = events.send(Event::Transfer { progress });
            };
            let answer = match call {
                Call::Upload { path, to, caption, part_size } => {
                    let uploaded = match messenger.check_recipient(&to).await {
                        Ok(()) => messenger.upload_file(&path, part_size, &progress).await,
                        Err(e) => Err(e),
                    };
                    match uploaded {
                        Ok(file) => {
                            let send = Call::SendFile { to, file, caption, reply_to: None };
                            if let Some(calls) = calls.upgrade() {
                                let _ = calls.send((send, reply)).await;
                            }
                            return;
                        }
                        Err(e) => Err(e.into()),
                    }
                }
                Call::UploadFile { path, part_size } => messenger
                    .upload_file(&path, part_size, &progress)
                    .await
                    .map(|file| Reply::Uploaded { file })
                    .map_err(Into::into),
                Call::Download { message, out, range } => messenger
                    .download_file(message, out, range, &progress)
                    .await
                    .map(Reply::Downloaded)
                    .map_err(Into::into),
                Call::ApproveDevice { device } => {
                    messenger.approve_device(&device, &progress).await.map(Reply::HistorySent).map_err(Into::into)
                }
                Call::BackupCreate { out, new_code, keep } => messenger
                    .create_backup(out, new_code, keep, &progress)
                    .await
                    .map(Reply::BackupMade)
                    .map_err(Into::into),
                Call::BackupRestore { code, from } => {
                    messenger.restore_backup(&code, from, &progress).await.map(Reply::Restored).map_err(Into::into)
                }
                Call::SecretUpload { chat, path, caption } => {
                    match messenger.upload_secret_file(&path, &progress).await {
                        Ok(file) => {
                            let texts = caption.into_iter().collect();
                            let send = Call::SecretSend { chat, texts, file: Some(file), reply_to: None };
                            if let Some(calls) = calls.upgrade() {
                                let _ = calls.send((send, reply)).await;
                            }
                            return;
                        }
                        Err(e) => Err(e.into()),
                    }
                }
                other => Err(ApiError::new("INTERNAL", format!("{other:?} is not a transfer"))),
            };
            let _ = reply.send(answer);
        });
    }

    /// Presses a button; an inline button's answer is waited for on a task of its own (which
    /// fetches, so that a node answering one command sees it too), not holding calls up.
    async fn press(&mut self, message: MessageId, button: String, reply: oneshot::Sender<Result<Reply, ApiError>>) {
        let pressed = match self.messenger.press(message, &button).await {
            Ok(pressed) => pressed,
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                return;
            }
        };
        if let Pressed::Sent { message } = &pressed {
            self.publish(std::slice::from_ref(message), false);
        }
        let (Pressed::Callback { query, .. }, Ok(mut messenger)) = (&pressed, self.messenger.fork()) else {
            let _ = reply.send(Ok(Reply::Pressed { pressed }));
            return;
        };
        let (query, events) = (*query, self.events.clone());
        self.transfers.spawn(async move {
            let deadline = tokio::time::Instant::now() + PRESS_ANSWER_WAIT;
            let answer = loop {
                match messenger.press_answer(&query) {
                    Ok(None) if tokio::time::Instant::now() < deadline => {}
                    Ok(answer) => break answer,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not read the answer to a press");
                        break None;
                    }
                }
                match messenger.receive(PRESS_POLL_MS).await {
                    Ok(inbox) => {
                        messenger.flush_acks().await;
                        if let Ok(history) = messenger.history() {
                            publish(&events, history, &inbox.messages, true);
                        }
                        publish_inbox(&events, &inbox);
                    }
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(u64::from(PRESS_POLL_MS))).await,
                }
            };
            let _ = reply.send(Ok(Reply::Pressed { pressed: Pressed::Callback { query, answer } }));
        });
    }

    /// Applies members' join and leave requests and delivers states not yet delivered (an
    /// admin's device); a failure waits for the next try.
    async fn maintain_groups(&mut self) {
        match self.messenger.group_maintain().await {
            Ok(changed) => {
                for group in changed {
                    let _ = self.events.send(Event::Group { group });
                }
            }
            Err(e) => tracing::info!(error = %e, "group changes wait for the relays or the gateway"),
        }
    }

    /// Sends the messages of calls that waited together: each call's are queued (on disk),
    /// then one flush sends them all, each recipient's in one batch, and each caller is
    /// answered. A busy sender (a bot) sends many messages per relay round trip this way,
    /// not one.
    async fn send_batch(&mut self, batch: Vec<Job>) {
        let (mut queued, mut records, mut payloads) = (Vec::new(), Vec::new(), Vec::new());
        for (call, reply) in batch {
            if let Err(e) = self.learn_group(&call).await {
                let _ = reply.send(Err(e));
                continue;
            }
            let (to, drafts, reply_to, one) = match call {
                Call::Send { to, texts, reply_to } => {
                    (to, texts.into_iter().map(Draft::text).collect(), reply_to, false)
                }
                Call::SendRich { to, text, file, extras, reply_to } => {
                    (to, vec![Draft { text, file, extras: Some(extras) }], reply_to, true)
                }
                // Only sends are batched (`is_send`).
                _ => {
                    let _ = reply.send(Err(ApiError::new("INTERNAL", "not a send")));
                    continue;
                }
            };
            match self.messenger.prepare_drafts(to, drafts, reply_to).await {
                Ok((made, carrying)) => {
                    queued.push((made.iter().map(|m| m.id).collect::<Vec<_>>(), one, reply));
                    records.extend(made);
                    payloads.extend(carrying);
                }
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                }
            }
        }
        if queued.is_empty() {
            return;
        }
        // One transaction (one sync to disk) for the whole batch.
        if let Err(e) = self.messenger.queue(records, &payloads) {
            let e = ApiError::from(e);
            for (_, _, reply) in queued {
                let _ = reply.send(Err(e.clone()));
            }
            return;
        }
        let refused: Option<ApiError> = self.messenger.flush_queued().await.err().map(Into::into);
        for (ids, one, reply) in queued {
            let _ = reply.send(self.sent_reply(&ids, one, refused.as_ref()));
        }
    }

    /// The answer to a send whose messages were queued and flushed: them as they are now, or
    /// the refusal if the relays refused them (they are taken out, marked deleted).
    fn sent_reply(&mut self, ids: &[MessageId], one: bool, refused: Option<&ApiError>) -> Result<Reply, ApiError> {
        let sent = self.messenger.messages_now(ids)?;
        if let Some(refused) = refused
            && sent.iter().any(|m| m.deleted)
        {
            return Err(refused.clone());
        }
        self.publish(&sent, false);
        if one {
            let message =
                sent.into_iter().next().ok_or_else(|| ApiError::new("INTERNAL", "a queued message is gone"))?;
            return Ok(Reply::Message { message });
        }
        let names = names(self.messenger.history()?, &sent);
        Ok(Reply::Messages { messages: sent, names, secret: Vec::new() })
    }

    /// Sends what waits in the outbox and tells subscribers; a failure waits for the next try.
    async fn flush_outbox(&mut self) {
        match self.messenger.flush_outbox().await {
            Ok(sent) => self.publish(&sent, false),
            Err(e) => tracing::info!(error = %e, "the outbox waits for a relay"),
        }
    }

    /// Applies a change to the shared session (saved) and to this actor's messenger.
    fn change_session(&mut self, change: impl FnOnce(&mut SavedSession)) -> Result<(), ApiError> {
        self.session.modify(change)?;
        catch_up(&mut self.messenger, &mut self.updates);
        Ok(())
    }

    fn me(&self) -> Me {
        let session = &self.messenger.session;
        let b = &session.cert.body;
        Me {
            account: session.account.clone(),
            session_id: b.session_id,
            device: b.device,
            cert_not_after: b.not_after,
            dropped_envelopes: self.messenger.dropped_envelopes().unwrap_or(0),
        }
    }

    fn publish(&mut self, messages: &[StoredMessage], received: bool) {
        if let Ok(history) = self.messenger.history() {
            publish(&self.events, history, messages, received);
        }
    }

    /// A group this account was just added to is known once fetched: fetches if `call` names
    /// a group this device does not know yet.
    async fn learn_group(&mut self, call: &Call) -> Result<(), ApiError> {
        if let Some(group) = call.group()
            && self.messenger.group_info(&group).is_err()
        {
            self.receive_waiting().await?;
        }
        Ok(())
    }

    async fn handle(&mut self, call: Call) -> Result<Reply, ApiError> {
        let client = self.messenger.client.clone();
        if matches!(
            call,
            Call::SecretAccept { .. }
                | Call::SecretDecline { .. }
                | Call::SecretClose { .. }
                | Call::SecretTtl { .. }
                | Call::SecretSend { .. }
                | Call::SecretInfo { .. }
                | Call::SecretList
        ) {
            // A secret chat's state moves with what the other side sent (an accept, a re-key,
            // a close): act on what is known now.
            self.receive_waiting().await?;
        } else {
            self.learn_group(&call).await?;
        }
        Ok(match call {
            Call::Whoami => {
                let account = client.get_me().await?;
                self.change_session(|s| s.account = account)?;
                Reply::Me(self.me())
            }
            Call::Renew => {
                let cert = client.renew_cert().await?;
                self.change_session(|s| s.cert = cert)?;
                Reply::Me(self.me())
            }
            Call::SetProfile { username, name } => {
                self.update_account(AuthRequest::SetProfile { username, name }).await?
            }
            Call::SetPassword { current, new } => {
                self.update_account(AuthRequest::SetPassword { current, new }).await?
            }
            Call::Lookup { query } => Reply::Card { card: client.lookup(query).await? },
            Call::Sessions => Reply::Sessions { sessions: client.sessions().await? },
            Call::RevokeSessions { session_id } => Reply::Revoked { count: client.revoke_sessions(session_id).await? },
            Call::CreateBot { username, name } => {
                let (bot, token) = client.bot_token(AuthRequest::CreateBot { username, name }).await?;
                Reply::BotToken { bot, token }
            }
            Call::RevokeBotToken { bot } => {
                let (bot, token) = client.bot_token(AuthRequest::RevokeBotToken { bot }).await?;
                Reply::BotToken { bot, token }
            }
            Call::ListBots => Reply::Bots { bots: client.bots().await? },
            Call::BotCommands { bot } => {
                let bot = client.lookup(bot).await?.user_id;
                Reply::BotCommands { commands: client.bot_commands(bot).await? }
            }
            Call::SetBotCommands { commands } => {
                client.set_bot_commands(commands).await?;
                Reply::Done
            }
            Call::Messages { chat, limit } => {
                let chat = match chat {
                    Some(query) => Some(self.chat_of(query).await?),
                    None => None,
                };
                self.receive_waiting().await?;
                // Opening a chat reads it, as in any messenger.
                if let Some(chat) = chat {
                    self.messenger.mark_read(chat).await?;
                    self.messenger.secret_read(chat).await?;
                }
                let secret = self.messenger.secret_messages(chat)?;
                let history = self.messenger.history()?;
                let messages = match (chat, limit) {
                    (Some(chat), Some(limit)) => history.messages_before(chat, None, limit as usize),
                    _ => history.messages(chat),
                }
                .map_err(MessagingError::from)?;
                let mut names = names(history, &messages);
                add_names(history, &mut names, secret.iter().map(|m| m.peer));
                Reply::Messages { messages, names, secret }
            }
            Call::History { chat, before, limit } => {
                let chat = self.chat_of(chat).await?;
                let history = self.messenger.history()?;
                let messages =
                    history.messages_before(chat, before.as_ref(), limit as usize).map_err(MessagingError::from)?;
                let names = names(history, &messages);
                Reply::Messages { messages, names, secret: Vec::new() }
            }
            Call::Chats => {
                self.receive_waiting().await?;
                let groups = self.messenger.group_list()?;
                let me = self.messenger.session.account.username.clone();
                let history = self.messenger.history()?;
                let chats = chats(history, &groups, me.as_ref())?;
                let last: Vec<StoredMessage> = chats.iter().map(|c| c.last.clone()).collect();
                Reply::Chats { chats, names: names(history, &last) }
            }
            Call::GroupCreate { title, members } => {
                let group = self.messenger.group_create(title, members).await?;
                self.group_changed(group)
            }
            Call::GroupChange { group, change } => {
                self.receive_waiting().await?;
                let group = self.messenger.group_change(&group, change).await?;
                self.group_changed(group)
            }
            Call::GroupLink { group } => {
                self.receive_waiting().await?;
                Reply::GroupLink { link: self.messenger.group_link(&group).await? }
            }
            Call::Join { link } => {
                let link = self.messenger.group_join(&link).await?;
                Reply::JoinRequested { group: link.group, admin: link.admin }
            }
            Call::GroupLeave { group } => {
                let group = self.messenger.group_leave(&group).await?;
                self.group_changed(group)
            }
            Call::GroupInfo { group } => {
                self.receive_waiting().await?;
                Reply::Group { group: self.messenger.group_info(&group)? }
            }
            Call::ChannelCreate { title, public } => {
                let channel = self.messenger.channel_create(title, public).await?;
                self.group_changed(channel)
            }
            Call::ChannelLink { channel } => Reply::GroupLink { link: self.messenger.channel_link(&channel).await? },
            Call::ChannelName { channel, name, off } => {
                self.messenger.channel_name(&channel, &name, off).await?;
                Reply::Done
            }
            Call::ChannelSubscribe { link, announce } => {
                let channel = self.messenger.channel_subscribe(&link, announce).await?;
                self.group_changed(channel)
            }
            Call::GroupList => {
                self.receive_waiting().await?;
                Reply::Groups { groups: self.messenger.group_list()? }
            }
            Call::Edit { message, text } => {
                let message = self.messenger.edit(message, text).await?;
                self.published(message)
            }
            Call::Delete { message } => {
                let message = self.messenger.delete(message).await?;
                self.published(message)
            }
            Call::Typing { to } => {
                self.messenger.typing(to).await?;
                Reply::Done
            }
            Call::EditRich { message, text, extras } => {
                let message = self.messenger.edit_rich(message, text, extras).await?;
                self.published(message)
            }
            Call::GetMessage { message } => Reply::Message { message: self.messenger.stored_message(message)? },
            Call::FileOf { message } => {
                let (file, serve) = self.messenger.message_file(message)?;
                Reply::FileOf { file: *file, secret: serve == crate::client::media::Serve::No }
            }
            Call::PushRegister { subscription } => {
                let relays = self.messenger.push_register(subscription.clone()).await?;
                Reply::Push { subscription: Some(subscription), relays }
            }
            Call::PushUnregister => Reply::Push { subscription: None, relays: self.messenger.push_unregister().await? },
            Call::PushStatus => {
                let (subscription, relays) = self.messenger.push_status().await?;
                Reply::Push { subscription, relays }
            }
            Call::Presses => {
                self.receive_waiting().await?;
                Reply::Presses { presses: self.messenger.presses()? }
            }
            Call::AnswerPress { query, text, alert } => {
                self.messenger.answer_press(query, text, alert).await?;
                Reply::Done
            }
            Call::Press { .. } => return Err(ApiError::new("INTERNAL", "a press is answered by the node's loop")),
            Call::Send { .. } | Call::SendRich { .. } => {
                return Err(ApiError::new("INTERNAL", "sends are batched by the node's loop"));
            }
            Call::Subscribe => return Err(ApiError::usage("subscribe to a node's events on its control socket")),
            Call::SendFile { to, file, caption, reply_to } => {
                let message = self.messenger.send_file(to, file, caption, reply_to).await?;
                self.published(message)
            }
            Call::Forward { message, to } => {
                if self.messenger.is_secret_message(&message)? {
                    return Err(MessagingError::from(SecretError::NoForwarding).into());
                }
                let message = self.messenger.forward(message, to).await?;
                self.published(message)
            }
            Call::Devices => {
                // Requests from new devices are what the list is looked at for: fetch them.
                self.receive_waiting().await?;
                Reply::Devices { devices: self.messenger.devices().await? }
            }
            Call::BackupList => Reply::Backups { backups: self.messenger.list_backups().await? },
            Call::BackupSchedule { every_secs, keep, off } => {
                let schedule = match (every_secs, off) {
                    (Some(_), true) => return Err(ApiError::usage("give a schedule or turn it off, not both")),
                    (Some(every), _) if every < MIN_BACKUP_EVERY_SECS => {
                        return Err(ApiError::usage(format!("the shortest interval is {MIN_BACKUP_EVERY_SECS} s")));
                    }
                    _ if keep.is_some_and(|k| !(1..=MAX_BACKUPS_KEPT).contains(&k)) => {
                        return Err(ApiError::usage(format!("keep 1 to {MAX_BACKUPS_KEPT} backups")));
                    }
                    (None, false) => self.messenger.history()?.backup_schedule().map_err(MessagingError::from)?,
                    (every, _) => self.messenger.schedule_backups(every, keep.unwrap_or(DEFAULT_BACKUPS_KEPT))?,
                };
                Reply::BackupSchedule { schedule }
            }
            Call::RemoveDevice { device } => {
                Reply::DeviceRemoved { device: self.messenger.remove_device(&device).await? }
            }
            Call::SecretStart { to, device } => {
                let chat = self.messenger.secret_start(to, device).await?;
                secret_changed(&self.events, chat)
            }
            Call::SecretAccept { chat } => {
                let chat = self.messenger.secret_accept(&chat).await?;
                secret_changed(&self.events, chat)
            }
            Call::SecretDecline { chat } => {
                let chat = self.messenger.secret_decline(&chat).await?;
                secret_changed(&self.events, chat)
            }
            Call::SecretClose { chat } => {
                let chat = self.messenger.secret_close(&chat).await?;
                secret_changed(&self.events, chat)
            }
            Call::SecretTtl { chat, secs } => {
                let chat = self.messenger.secret_ttl(&chat, secs).await?;
                secret_changed(&self.events, chat)
            }
            Call::SecretSend { chat, texts, file, reply_to } => {
                let messages = self.messenger.secret_send(&chat, texts, file, reply_to).await?;
                for message in &messages {
                    let _ = self.events.send(Event::SecretMessage { message: message.clone() });
                }
                Reply::SecretMessages { messages }
            }
            Call::SecretInfo { chat } => Reply::SecretChat { chat: self.messenger.secret_get(&chat).await? },
            Call::SecretList => Reply::SecretChats { chats: self.messenger.secret_list()? },
            Call::Upload { .. }
            | Call::UploadFile { .. }
            | Call::Download { .. }
            | Call::ApproveDevice { .. }
            | Call::BackupCreate { .. }
            | Call::BackupRestore { .. }
            | Call::SecretUpload { .. } => {
                return Err(ApiError::new("INTERNAL", "transfers run on their own task"));
            }
        })
    }

    /// The history's chat for a query: a person's user id, or a group's chat number.
    async fn chat_of(&mut self, query: LookupQuery) -> Result<UserId, ApiError> {
        Ok(match query {
            LookupQuery::Group(group) => self.messenger.group_info(&group)?.id.chat_number(),
            query => self.messenger.user_card(query).await?.user_id,
        })
    }

    /// Tells subscribers of a group this node changed, and answers with it.
    fn group_changed(&mut self, group: GroupInfo) -> Reply {
        let _ = self.events.send(Event::Group { group: group.clone() });
        Reply::Group { group }
    }

    /// Tells subscribers of a message this node sent, and answers with it.
    fn published(&mut self, message: StoredMessage) -> Reply {
        self.publish(std::slice::from_ref(&message), false);
        Reply::Message { message }
    }

    async fn update_account(&mut self, request: AuthRequest) -> Result<Reply, ApiError> {
        let account = self.messenger.client.update_account(request).await?;
        self.change_session(|s| s.account = account.clone())?;
        Ok(Reply::Account { account })
    }

    /// Fetches whatever waits now (no long-poll) and acknowledges it, so the answer that follows
    /// is up to date even when the receiver is between polls. With no relay reachable the
    /// history is still worth showing, as it is.
    async fn receive_waiting(&mut self) -> Result<(), ApiError> {
        match self.messenger.receive(0).await {
            Ok(inbox) => {
                self.messenger.flush_acks().await;
                self.publish(&inbox.messages, true);
                publish_inbox(&self.events, &inbox);
            }
            Err(e) if e.may_pass() => tracing::warn!(error = %e, "showing the history without fetching"),
            Err(e) => return Err(e.into()),
        }
        // Join and leave requests just fetched, then the groups' own messages.
        self.maintain_groups().await;
        match self.messenger.receive_groups(0).await {
            Ok(inbox) => {
                self.publish(&inbox.messages, true);
                publish_inbox(&self.events, &inbox);
            }
            Err(e) if e.may_pass() => tracing::warn!(error = %e, "showing the groups without fetching"),
            Err(e) => return Err(e.into()),
        }
        if self.imports_histories {
            import_histories(&mut self.messenger, &self.events).await;
        }
        Ok(())
    }
}

/// How long one fetch of a press's waiting task long-polls (ms).
const PRESS_POLL_MS: u32 = 500;
/// Most send calls that go out in one flush.
const MAX_SEND_BATCH: usize = 256;

/// Calls that send messages, which wait for one another in the queue and go out together.
fn is_send(call: &Call) -> bool {
    matches!(call, Call::Send { .. } | Call::SendRich { .. })
}

/// Long-polls the mailbox relays for as long as the node runs.
struct Receiver {
    messenger: Messenger,
    /// Envelopes the last poll had to leave for later.
    deferred: usize,
    session: watch::Receiver<SavedSession>,
    events: broadcast::Sender<Event>,
}

impl Receiver {
    async fn run(mut self) {
        let mut connected = None;
        let mut deferred_backoff = NODE_RETRY_AFTER;
        // A history left half-imported by a stopped node is looked for at once.
        let mut imports_due = true;
        loop {
            catch_up(&mut self.messenger, &mut self.session);
            let (now_connected, detail) = match self.messenger.receive(FETCH_WAIT_MS).await {
                Ok(inbox) => {
                    self.deferred = inbox.deferred;
                    if let Ok(history) = self.messenger.history() {
                        publish(&self.events, history, &inbox.messages, true);
                    }
                    publish_inbox(&self.events, &inbox);
                    imports_due |= inbox.imports > 0;
                    (true, None)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "receiving failed; retrying");
                    (false, Some(e.to_string()))
                }
            };
            if imports_due && now_connected {
                imports_due = !import_histories(&mut self.messenger, &self.events).await;
            }
            if connected != Some(now_connected) || !now_connected {
                let _ = self.events.send(Event::Connection { connected: now_connected, detail });
                connected = Some(now_connected);
            }
            if !now_connected {
                // Relays come and go: keep trying, without spinning.
                tokio::time::sleep(NODE_RETRY_AFTER).await;
            }
            // Envelopes that cannot be verified yet come straight back from the relays: wait
            // longer each time (up to a limit) rather than spin on them.
            if self.deferred > 0 {
                tokio::time::sleep(deferred_backoff).await;
                deferred_backoff = (deferred_backoff * 2).min(NODE_DEFERRED_BACKOFF_MAX);
            } else {
                deferred_backoff = NODE_RETRY_AFTER;
            }
        }
    }
}

/// Long-polls the relays of this account's groups for as long as the node runs; starts over
/// at once when the set of groups (or their keys) changes.
struct GroupReceiver {
    messenger: Messenger,
    session: watch::Receiver<SavedSession>,
    events: broadcast::Sender<Event>,
}

impl GroupReceiver {
    async fn run(mut self) {
        let changed = Arc::clone(&self.messenger.groups_changed);
        loop {
            catch_up(&mut self.messenger, &mut self.session);
            let read = tokio::select! {
                read = self.messenger.receive_groups(FETCH_WAIT_MS) => read,
                () = changed.notified() => continue,
            };
            match read {
                Ok(inbox) => {
                    if let Ok(history) = self.messenger.history() {
                        publish(&self.events, history, &inbox.messages, true);
                    }
                    publish_inbox(&self.events, &inbox);
                    if inbox.messages.is_empty()
                        && self.messenger.group_list().is_ok_and(|g| g.iter().all(|g| !g.active))
                    {
                        // No group to read: wait to be told of one.
                        let _ = tokio::time::timeout(NODE_RETRY_AFTER * 5, changed.notified()).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the groups failed; retrying");
                    tokio::time::sleep(NODE_RETRY_AFTER).await;
                }
            }
        }
    }
}

/// Tells subscribers about new or changed messages, with the names of the people in them.
fn publish(events: &broadcast::Sender<Event>, history: &History, messages: &[StoredMessage], received: bool) {
    // No subscribers is fine: nobody is watching.
    if events.receiver_count() == 0 {
        return;
    }
    for message in messages {
        let names = names(history, std::slice::from_ref(message));
        let _ = events.send(Event::Message { message: message.clone(), received, names });
    }
}

/// Tells subscribers of a secret chat that changed here, and answers with it.
fn secret_changed(events: &broadcast::Sender<Event>, chat: SecretChatInfo) -> Reply {
    let _ = events.send(Event::SecretChat { chat: chat.clone() });
    Reply::SecretChat { chat }
}

/// Tells subscribers who is typing and which own devices ask for the history.
fn publish_inbox(events: &broadcast::Sender<Event>, inbox: &Inbox) {
    for user in &inbox.typing {
        let _ = events.send(Event::Typing { user: *user });
    }
    for r in &inbox.device_requests {
        let _ = events.send(Event::DeviceRequest { device: r.device, device_name: r.device_name.clone() });
    }
    for chat in &inbox.secret_chats {
        let _ = events.send(Event::SecretChat { chat: chat.clone() });
    }
    for message in &inbox.secret_messages {
        let _ = events.send(Event::SecretMessage { message: message.clone() });
    }
    for group in &inbox.groups {
        let _ = events.send(Event::Group { group: group.clone() });
    }
    for press in &inbox.presses {
        let _ = events.send(Event::Press { press: press.clone() });
    }
    for press in &inbox.press_answers {
        let _ = events.send(Event::PressAnswer { press: press.clone() });
    }
}

/// Fetches and merges the histories other devices sent, with progress for subscribers;
/// returns whether none is left waiting (false: try again later).
async fn import_histories(messenger: &mut Messenger, events: &broadcast::Sender<Event>) -> bool {
    let progress = |progress| {
        let _ = events.send(Event::Transfer { progress });
    };
    match messenger.import_pending(&progress).await {
        Ok(done) => {
            for imported in done {
                let _ = events.send(Event::HistoryImported { imported });
            }
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "a history from another device cannot be fetched yet; retrying");
            false
        }
    }
}

/// How to call a person: name and @username, either alone, else the phone number they were
/// found by, else the user id.
pub fn display_name(card: &UserCard, phone: Option<String>) -> String {
    name_or(&card.name, card.username.as_ref(), || phone.unwrap_or_else(|| card.user_id.to_string()))
}

/// Name and @username, either alone, else `otherwise`.
pub fn name_or(name: &str, username: Option<&Username>, otherwise: impl FnOnce() -> String) -> String {
    match (name.is_empty(), username) {
        (false, Some(u)) => format!("{name} ({u})"),
        (false, None) => name.to_string(),
        (true, Some(u)) => u.to_string(),
        (true, None) => otherwise(),
    }
}

/// A person's display name from the history's cached card (and phone), if it has one.
fn name_from(history: &History, user: UserId) -> Option<String> {
    let card = history.card(user).ok().flatten()?;
    Some(display_name(&card, history.known_phone(user).ok().flatten()))
}

/// Names of everyone these messages involve, from the cards the history has cached.
fn names(history: &History, messages: &[StoredMessage]) -> Names {
    let mut names = Names::new();
    add_names(history, &mut names, messages.iter().flat_map(|m| [m.chat, m.from]));
    names
}

fn add_names(history: &History, names: &mut Names, users: impl Iterator<Item = UserId>) {
    for user in users {
        if !names.contains_key(&user)
            && let Some(name) = name_from(history, user)
        {
            names.insert(user, name);
        }
    }
}

/// Every chat with its message count, unread count and last message, in history order;
/// groups by their title and id.
fn chats(history: &History, groups: &[GroupInfo], me: Option<&Username>) -> Result<Vec<ChatSummary>, ApiError> {
    let mention = me.map(|u| format!("@{}", u.canonical()));
    let mut chats: Vec<ChatSummary> = Vec::new();
    for m in history.messages(None).map_err(MessagingError::from)? {
        let unread = !m.outgoing && !m.notice && m.status < Status::Read;
        let mentions = unread && mention.as_ref().is_some_and(|at| m.text.to_lowercase().contains(at.as_str()));
        match chats.last_mut() {
            Some(summary) if summary.chat == m.chat => {
                summary.messages += 1;
                summary.unread += usize::from(unread);
                summary.mentions += usize::from(mentions);
                summary.last = m;
            }
            _ => chats.push(ChatSummary {
                chat: m.chat,
                name: String::new(),
                messages: 1,
                kind: String::new(),
                id: String::new(),
                unread: usize::from(unread),
                mentions: usize::from(mentions),
                last: m,
            }),
        }
    }
    for summary in &mut chats {
        match groups.iter().find(|g| g.id.chat_number() == summary.chat) {
            Some(group) => {
                summary.name.clone_from(&group.title);
                summary.kind.clone_from(&group.kind);
                summary.id = group.id.to_string();
            }
            None => {
                summary.name = name_from(history, summary.chat).unwrap_or_else(|| summary.chat.to_string());
                summary.kind = "private".into();
                summary.id = summary.chat.to_string();
            }
        }
    }
    Ok(chats)
}
