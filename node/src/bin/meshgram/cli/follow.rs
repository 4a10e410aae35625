//! `messages --follow`: the history, then messages and typing notices as they arrive, from the
//! profile's client node's event stream (pushed, never polled).
//!
//! With no node running this process becomes the profile's node, control socket included, so
//! the profile's other commands (say, `send` in another terminal) keep working beside it,
//! through it. When the node it follows stops, it carries on: it follows the next node, or
//! becomes one.

use std::collections::HashMap;
use std::path::Path;

use meshgram_node::client::api::{ApiError, Call, Event, Names, Reply};
use meshgram_node::client::control::{ControlClient, ControlError, ControlServer, Holder, NodeLock};
use meshgram_node::client::history::StoredMessage;
use meshgram_node::client::node::{NodeHandle, NodeMode};
use meshgram_node::client::secret::SecretMessage;
use meshgram_node::ids::UserId;
use meshgram_node::proto::LookupQuery;
use meshgram_node::proto::payload::MessageId;
use meshgram_node::server::service::stop_requested;
use serde_json::json;
use tokio::sync::broadcast;

use super::CliResult;
use super::calls::parse_query;
use super::output::{message_line, name_of, to_json};

/// How long to wait for a node that holds the profile's lock but has no socket yet (starting).
const NODE_STARTING_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

pub(super) async fn follow(profile: &Path, json: bool, chat: Option<String>) -> CliResult {
    super::require_session(profile)?;
    let query = chat.as_deref().map(parse_query).transpose()?;
    let mut follower = Follower { json, query, chat: None, names: Names::new(), shown: HashMap::new() };
    let stop = stop_requested(false);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            followed = follower.follow_a_node(profile) => followed?,
        }
    }
}

/// Where calls go: the running node's socket, or the node this process runs.
enum Node<'a> {
    Socket(ControlClient),
    Here(&'a NodeHandle),
}

impl Node<'_> {
    async fn call(&mut self, call: Call) -> Result<Reply, ApiError> {
        match self {
            Node::Socket(client) => client.call(&call).await,
            Node::Here(node) => node.call(call).await,
        }
    }
}

struct Follower {
    json: bool,
    query: Option<LookupQuery>,
    /// The chat being followed, once resolved.
    chat: Option<UserId>,
    names: Names,
    /// History entries as printed, until an event about them comes: the history and the first
    /// events never show the same thing twice.
    shown: HashMap<MessageId, StoredMessage>,
}

impl Follower {
    /// Follows one node until it goes away: the running one, or this process as the node.
    async fn follow_a_node(&mut self, profile: &Path) -> CliResult {
        if let Some(subscriber) = ControlClient::connect(profile).await? {
            // Subscribe first, then read the history: nothing falls between the two.
            let mut events = subscriber.subscribe().await?;
            let calls = ControlClient::connect(profile).await?.ok_or_else(gone)?;
            self.show_history(Node::Socket(calls)).await?;
            loop {
                match events.next().await {
                    Ok(event) => self.show(event),
                    Err(e) if e.code == "NODE_GONE" => {
                        eprintln!("warning: {}; following on", e.message);
                        return Ok(());
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let lock = match NodeLock::acquire(profile, Holder::Node) {
            Ok(lock) => lock,
            Err(ControlError::AlreadyRunning { .. }) => {
                tokio::time::sleep(NODE_STARTING_WAIT).await;
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let node = NodeHandle::start(profile, NodeMode::Running).await?;
        let _server = ControlServer::start(&lock, node.clone())?;
        let mut events = node.subscribe();
        self.show_history(Node::Here(&node)).await?;
        loop {
            match events.recv().await {
                Ok(event) => self.show(event),
                Err(broadcast::error::RecvError::Lagged(missed)) => self.show(Event::Lagged { missed }),
                Err(broadcast::error::RecvError::Closed) => return Err(gone().into()),
            }
        }
    }

    /// Prints the history (reading the chat), once; later nodes only add events.
    async fn show_history(&mut self, mut node: Node<'_>) -> CliResult {
        if self.chat.is_none()
            && let Some(query) = self.query.clone()
        {
            self.chat = Some(match query {
                LookupQuery::UserId(id) => id,
                query => match node.call(Call::Lookup { query }).await? {
                    Reply::Card { card } => card.user_id,
                    other => return Err(ApiError::unexpected("lookup", &other).into()),
                },
            });
        }
        match node.call(Call::Messages { chat: self.chat.map(LookupQuery::UserId), limit: None }).await? {
            Reply::Messages { messages, names, secret } => {
                self.names.extend(names);
                for message in messages {
                    self.print(&message);
                    self.shown.insert(message.id, message);
                }
                for message in &secret {
                    self.print_secret(message);
                }
                Ok(())
            }
            other => Err(ApiError::unexpected("messages", &other).into()),
        }
    }

    fn show(&mut self, event: Event) {
        match event {
            Event::Message { message, received: true, names } if self.in_chat(message.chat) => {
                self.names.extend(names);
                self.show_message(message);
            }
            Event::Typing { user } if self.in_chat(user) => {
                if self.json {
                    outln!("{}", json!({ "typing": user }));
                } else {
                    outln!("… {} is typing", name_of(&self.names, user));
                }
            }
            Event::Connection { connected: false, detail } => {
                eprintln!("warning: {}; retrying", detail.as_deref().unwrap_or("the relays cannot be reached"));
            }
            Event::DeviceRequest { device, device_name } if self.chat.is_none() => {
                if self.json {
                    outln!(
                        "{}",
                        json!({ "device_request": { "device": device.to_string(), "device_name": device_name } })
                    );
                } else {
                    outln!(
                        "— your device \"{device_name}\" ({device}) asks for your history: meshgram devices approve {device}"
                    );
                }
            }
            Event::HistoryImported { imported } if self.chat.is_none() => {
                if self.json {
                    outln!("{}", json!({ "history_imported": imported }));
                } else {
                    outln!(
                        "— your history arrived from another device: {} messages in {} chats",
                        imported.new_messages,
                        imported.chats
                    );
                }
            }
            Event::SecretMessage { message } if self.in_chat(message.peer) => self.print_secret(&message),
            Event::SecretChat { chat } if self.in_chat(chat.peer) => {
                if self.json {
                    outln!("{}", json!({ "secret_chat": chat }));
                } else {
                    outln!("— secret chat: {}", super::secret::chat_line(&chat));
                }
            }
            Event::PressAnswer { press } if self.in_chat(press.with) => {
                if self.json {
                    outln!("{}", json!({ "press_answer": press }));
                } else if let Some(text) = press.answer.as_ref().and_then(|a| a.text.as_deref()) {
                    outln!(
                        "— {} answers your press on [{}]: {text}",
                        name_of(&self.names, press.with),
                        press.message.fmt_short()
                    );
                }
            }
            Event::Lagged { missed } => {
                eprintln!(
                    "warning: this terminal fell behind and missed {missed} events; `meshgram messages` has them"
                );
            }
            _ => {}
        }
    }

    fn in_chat(&self, user: UserId) -> bool {
        self.chat.is_none_or(|c| c == user)
    }

    /// Prints a message unless it is what the history printed already.
    fn show_message(&mut self, message: StoredMessage) {
        if self.shown.remove(&message.id).is_some_and(|shown| shown == message) {
            return;
        }
        self.print(&message);
    }

    fn print_secret(&self, message: &SecretMessage) {
        if self.json {
            outln!("{}", super::secret::message_json(message));
        } else {
            outln!("{}", super::secret::message_line(message, &self.names));
        }
    }

    fn print(&self, message: &StoredMessage) {
        if self.json {
            outln!("{}", to_json(message));
        } else {
            outln!("{}", message_line(message, &self.names));
        }
    }
}

fn gone() -> ApiError {
    ApiError::new("NODE_GONE", "the client node stopped")
}
