//! Cloud chats from a client's side: seal a message once per recipient device (and per own
//! other device, for sync), send it through any relay, fetch the own mailbox from every relay
//! that holds a copy, open and verify each envelope, record it exactly once, acknowledge it.

use std::collections::{HashMap, HashSet};

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::cert::unix_now;
use crate::client::{Client, ClientError, SavedSession};
use crate::e2e::{self, E2eError};
use crate::envelope::{Envelope, EnvelopeId};
use crate::history::{History, HistoryError, MessageId, StoredMessage};
use crate::ids::UserId;
use crate::protocol::{
    AuthRequest, AuthResponse, ErrorCode, LookupQuery, MAX_ENVELOPES_PER_BATCH, MailboxRequest, MailboxResponse,
    RelayInfo, UserCard, WireError,
};

/// Longest message text, in characters (Telegram's limit).
pub const MAX_TEXT_CHARS: usize = 4096;

/// What travels sealed inside an envelope. Append-only, like every wire enum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    /// Shared by every device's copy of the message.
    pub message_id: MessageId,
    /// The other person in the conversation, from the sender's side (for sync copies).
    pub chat_with: UserId,
    pub body: Body,
}

/// Message kinds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    Text { text: String, reply_to: Option<MessageId> },
}

/// Messaging failures.
#[derive(Debug, thiserror::Error)]
pub enum MessagingError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error(transparent)]
    Seal(#[from] E2eError),
    /// No relay could take or give the messages.
    #[error("no relay could be used: {0}")]
    NoRelay(String),
    #[error("{0}")]
    Refused(WireError),
    #[error("a message must be 1-{MAX_TEXT_CHARS} characters")]
    TextTooLong,
    #[error("{0} has no signed-in devices to send to")]
    NoDevices(UserId),
}

/// A signed-in device that sends and receives.
#[derive(Debug)]
pub struct Messenger {
    pub client: Client,
    pub session: SavedSession,
    pub history: History,
    /// Relays that accepted our Hello on the current connection.
    greeted: HashSet<PeerId>,
    /// From the last Welcome: the relays holding our mailbox.
    mailbox_relays: Vec<RelayInfo>,
}

impl Messenger {
    /// Opens a signed-in profile, renewing its certificate if due.
    pub async fn open(profile: &std::path::Path) -> Result<Self, MessagingError> {
        let (client, session) = Client::open_signed_in(profile)?;
        let session = client.renew_if_due(session).await?;
        let history = History::open(profile)?;
        Ok(Messenger { client, session, history, greeted: HashSet::new(), mailbox_relays: Vec::new() })
    }

    fn me(&self) -> UserId {
        self.session.cert.body.user_id
    }

    /// A user's card, asking the gateway when not cached or when `refresh`.
    pub async fn card(&self, query: LookupQuery, refresh: bool) -> Result<UserCard, MessagingError> {
        if let (LookupQuery::UserId(id), false) = (&query, refresh)
            && let Some(card) = self.history.card(*id)?
        {
            return Ok(card);
        }
        match self.client.call(AuthRequest::Lookup(query)).await? {
            AuthResponse::Card(card) => {
                self.history.put_card(&card)?;
                Ok(card)
            }
            _ => Err(ClientError::UnexpectedResponse("Lookup").into()),
        }
    }

    // ---- relays ----

    async fn relay_call(
        &mut self,
        relay: &RelayInfo,
        request: MailboxRequest,
    ) -> Result<MailboxResponse, MessagingError> {
        if !self.greeted.contains(&relay.peer_id) {
            let hello = MailboxRequest::Hello { cert: self.session.cert.clone() };
            match self.client.mailbox_request(relay, hello).await? {
                MailboxResponse::Welcome { mailbox_relays, relays, .. } => {
                    self.greeted.insert(relay.peer_id);
                    self.mailbox_relays = mailbox_relays;
                    if !relays.is_empty() && relays != self.session.relays {
                        self.session.relays = relays;
                        self.session.save(self.client.profile())?;
                    }
                }
                MailboxResponse::Error(e) => return Err(MessagingError::Refused(e)),
                _ => return Err(ClientError::UnexpectedResponse("Hello").into()),
            }
        }
        match self.client.mailbox_request(relay, request).await {
            Ok(MailboxResponse::Error(e)) if e.code == ErrorCode::CertInvalid => {
                // The relay forgot us (restart, expiry): greet again once.
                self.greeted.remove(&relay.peer_id);
                Err(MessagingError::Refused(e))
            }
            Ok(response) => Ok(response),
            Err(e) => {
                self.greeted.remove(&relay.peer_id);
                Err(e.into())
            }
        }
    }

    fn known_relays(&self) -> Vec<RelayInfo> {
        self.session.relays.clone()
    }

    // ---- sending ----

    /// Sends text messages, in order, to `to`; returns them as recorded.
    pub async fn send_texts(
        &mut self,
        to: LookupQuery,
        texts: Vec<String>,
        reply_to: Option<MessageId>,
    ) -> Result<Vec<StoredMessage>, MessagingError> {
        if texts.iter().any(|t| t.is_empty() || t.chars().count() > MAX_TEXT_CHARS) {
            return Err(MessagingError::TextTooLong);
        }
        let card = self.card(to, true).await?;
        if card.devices.is_empty() {
            return Err(MessagingError::NoDevices(card.user_id));
        }
        let me = self.me();
        let my_device = self.client.identity.peer_id();
        let mine = if card.user_id == me { None } else { Some(self.card(LookupQuery::UserId(me), true).await?) };
        let devices: Vec<_> = card
            .devices
            .iter()
            .chain(mine.iter().flat_map(|c| c.devices.iter()))
            .filter(|d| d.peer_id != my_device)
            .cloned()
            .collect();
        let owner: HashMap<PeerId, UserId> = card
            .devices
            .iter()
            .map(|d| (d.peer_id, card.user_id))
            .chain(mine.iter().flat_map(|c| c.devices.iter().map(|d| (d.peer_id, me))))
            .collect();

        let mut records = Vec::new();
        let mut envelopes = Vec::new();
        let mut first_seq = HashMap::new();
        for device in &devices {
            first_seq.insert(device.peer_id, self.history.reserve_seq(&device.peer_id, texts.len() as u64)?);
        }
        for (i, text) in texts.into_iter().enumerate() {
            let payload = Payload {
                message_id: MessageId::random(),
                chat_with: card.user_id,
                body: Body::Text { text: text.clone(), reply_to },
            };
            let bytes = postcard::to_stdvec(&payload).expect("invariant: payloads serialize");
            let sent_at_ms = now_ms();
            for device in &devices {
                let id = EnvelopeId::random();
                envelopes.push(Envelope {
                    id,
                    from_user: me,
                    from_device: my_device,
                    to_user: owner[&device.peer_id],
                    to_device: device.peer_id,
                    sent_at_ms,
                    seq: first_seq[&device.peer_id] + i as u64,
                    sealed: e2e::seal(&self.client.identity, &device.noise_key(), &id, &bytes)?,
                });
            }
            records.push((
                None,
                StoredMessage {
                    id: payload.message_id,
                    chat: card.user_id,
                    from: me,
                    outgoing: true,
                    text,
                    reply_to,
                    sent_at_ms,
                },
            ));
        }
        for batch in envelopes.chunks(MAX_ENVELOPES_PER_BATCH) {
            self.send_batch(batch.to_vec()).await?;
        }
        Ok(self.history.record(records)?)
    }

    /// One batch through the first relay that stores it; a relay that fails or cannot reach
    /// enough replicas is skipped. Resending is safe: relays report duplicates, not errors.
    async fn send_batch(&mut self, envelopes: Vec<Envelope>) -> Result<(), MessagingError> {
        let mut last = String::from("no relays known; sign in with --network");
        for relay in self.known_relays() {
            match self.relay_call(&relay, MailboxRequest::Send { envelopes: envelopes.clone() }).await {
                Ok(MailboxResponse::Stored { .. }) => return Ok(()),
                Ok(MailboxResponse::Error(e))
                    if matches!(e.code, ErrorCode::Unavailable | ErrorCode::CertInvalid | ErrorCode::Internal) =>
                {
                    last = e.to_string();
                }
                Ok(MailboxResponse::Error(e)) => return Err(MessagingError::Refused(e)),
                Ok(_) => last = "unexpected answer to Send".into(),
                Err(MessagingError::Refused(e)) if e.code == ErrorCode::CertInvalid => last = e.to_string(),
                Err(MessagingError::Net(e)) => last = e.to_string(),
                Err(e) => return Err(e),
            }
        }
        Err(MessagingError::NoRelay(last))
    }

    // ---- receiving ----

    /// Fetches from every relay holding our mailbox (waiting up to `wait_ms` on the first for
    /// something to arrive), records what is new, acknowledges everything fetched.
    pub async fn receive(&mut self, wait_ms: u32) -> Result<Vec<StoredMessage>, MessagingError> {
        if self.mailbox_relays.is_empty() {
            self.greet_any().await?;
        }
        let mut fresh = Vec::new();
        let mut reached = 0;
        let mut last = String::from("no mailbox relay known");
        for (i, relay) in self.mailbox_relays.clone().into_iter().enumerate() {
            let wait = if i == 0 { wait_ms } else { 0 };
            match self.drain(&relay, wait).await {
                Ok(messages) => {
                    reached += 1;
                    fresh.extend(messages);
                }
                Err(e) => {
                    tracing::warn!(relay = %relay.peer_id, error = %e, "mailbox relay unavailable");
                    last = e.to_string();
                }
            }
        }
        if reached == 0 {
            // Placement may have changed (a relay died): ask again next time.
            self.mailbox_relays.clear();
            return Err(MessagingError::NoRelay(last));
        }
        Ok(fresh)
    }

    async fn greet_any(&mut self) -> Result<(), MessagingError> {
        let mut last = String::from("no relays known; sign in with --network");
        for relay in self.known_relays() {
            self.greeted.remove(&relay.peer_id);
            let hello = MailboxRequest::Fetch { max: 1, wait_ms: 0 };
            match self.relay_call(&relay, hello).await {
                Ok(_) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
        }
        Err(MessagingError::NoRelay(last))
    }

    /// Everything waiting on one relay, batch by batch.
    async fn drain(&mut self, relay: &RelayInfo, wait_ms: u32) -> Result<Vec<StoredMessage>, MessagingError> {
        let mut fresh = Vec::new();
        let mut wait = wait_ms;
        loop {
            let fetch = MailboxRequest::Fetch { max: MAX_ENVELOPES_PER_BATCH as u32, wait_ms: wait };
            let (envelopes, more) = match self.relay_call(relay, fetch).await? {
                MailboxResponse::Envelopes { envelopes, more } => (envelopes, more),
                MailboxResponse::Error(e) => return Err(MessagingError::Refused(e)),
                _ => return Err(ClientError::UnexpectedResponse("Fetch").into()),
            };
            if envelopes.is_empty() {
                return Ok(fresh);
            }
            let ids: Vec<EnvelopeId> = envelopes.iter().map(|e| e.id).collect();
            fresh.extend(self.accept(envelopes).await?);
            // Acknowledge only after the history commit: a crash before it means a redelivery,
            // which the seen-set absorbs; never a loss.
            match self.relay_call(relay, MailboxRequest::Ack { ids }).await? {
                MailboxResponse::Acked { .. } => {}
                MailboxResponse::Error(e) => return Err(MessagingError::Refused(e)),
                _ => return Err(ClientError::UnexpectedResponse("Ack").into()),
            }
            if !more {
                return Ok(fresh);
            }
            wait = 0;
        }
    }

    /// Opens, verifies and records envelopes; drops (and logs) those that fail.
    async fn accept(&mut self, envelopes: Vec<Envelope>) -> Result<Vec<StoredMessage>, MessagingError> {
        let envelopes = delivery_order(envelopes);
        let me = self.me();
        let mut records = Vec::new();
        for envelope in envelopes {
            if self.history.seen(&envelope.id)? {
                continue;
            }
            match self.open_envelope(&envelope).await {
                Ok(payload) => {
                    let Body::Text { text, reply_to } = payload.body;
                    let outgoing = envelope.from_user == me;
                    let chat = if outgoing { payload.chat_with } else { envelope.from_user };
                    records.push((
                        Some(envelope.id),
                        StoredMessage {
                            id: payload.message_id,
                            chat,
                            from: envelope.from_user,
                            outgoing,
                            text,
                            reply_to,
                            sent_at_ms: envelope.sent_at_ms,
                        },
                    ));
                }
                Err(e) => {
                    tracing::warn!(envelope = %envelope.id, error = %e, "dropping an envelope that does not verify")
                }
            }
        }
        Ok(self.history.record(records)?)
    }

    /// Opens an envelope and checks that the key that sealed it belongs to the device it names.
    async fn open_envelope(&self, envelope: &Envelope) -> Result<Payload, MessagingError> {
        if envelope.to_device != self.client.identity.peer_id() {
            return Err(E2eError::Open("addressed to another device".into()).into());
        }
        let opened = e2e::open(&self.client.identity, &envelope.id, &envelope.sealed)?;
        let matches = |card: &UserCard| {
            card.devices.iter().any(|d| d.peer_id == envelope.from_device && d.noise_key() == opened.sender_key)
        };
        let cached = self.card(LookupQuery::UserId(envelope.from_user), false).await?;
        if !matches(&cached) && !matches(&self.card(LookupQuery::UserId(envelope.from_user), true).await?) {
            return Err(E2eError::Open(format!(
                "sealed by a key that is not device {} of user {}",
                envelope.from_device, envelope.from_user
            ))
            .into());
        }
        postcard::from_bytes(&opened.payload).map_err(|e| E2eError::Open(format!("payload: {e}")).into())
    }
}

/// Interleaves senders by their send time, while each sender's own envelopes keep their `seq`
/// order (a sender's clock may step back; its counter does not).
fn delivery_order(mut envelopes: Vec<Envelope>) -> Vec<Envelope> {
    envelopes.sort_by_key(|e| (e.sent_at_ms, e.from_device.to_bytes(), e.seq));
    let mut slots: HashMap<PeerId, Vec<usize>> = HashMap::new();
    for (i, e) in envelopes.iter().enumerate() {
        slots.entry(e.from_device).or_default().push(i);
    }
    let mut ordered: Vec<Option<Envelope>> = vec![None; envelopes.len()];
    let mut by_sender: HashMap<PeerId, Vec<Envelope>> = HashMap::new();
    for e in envelopes {
        by_sender.entry(e.from_device).or_default().push(e);
    }
    for (sender, mut own) in by_sender {
        own.sort_by_key(|e| e.seq);
        for (slot, e) in slots[&sender].iter().zip(own) {
            ordered[*slot] = Some(e);
        }
    }
    ordered.into_iter().flatten().collect()
}

fn now_ms() -> u64 {
    unix_now() * 1000
        + u64::from(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_millis()).unwrap_or(0),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(from: PeerId, seq: u64, sent_at_ms: u64) -> Envelope {
        Envelope {
            id: EnvelopeId::random(),
            from_user: UserId(1),
            from_device: from,
            to_user: UserId(2),
            to_device: PeerId::random(),
            sent_at_ms,
            seq,
            sealed: vec![1],
        }
    }

    #[test]
    fn senders_interleave_by_time_and_each_keeps_its_own_order() {
        let (a, b) = (PeerId::random(), PeerId::random());
        // a's clock stepped back between its seq 1 and 2.
        let input =
            vec![envelope(b, 0, 15), envelope(a, 2, 5), envelope(a, 0, 10), envelope(a, 1, 20), envelope(b, 1, 25)];
        let order: Vec<(bool, u64)> = delivery_order(input).iter().map(|e| (e.from_device == a, e.seq)).collect();
        assert_eq!(order, [(true, 0), (true, 1), (false, 0), (true, 2), (false, 1)]);
    }
}
