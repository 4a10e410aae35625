//! Bots' messages from both sides: a bot sends and edits messages with formatting and
//! keyboards; a user presses an inline button, the bot hears of the press and answers it once,
//! and the user sees the answer. Presses and answers travel sealed, pairwise, like typing
//! notices (never through the outbox: a press is worth nothing an hour later); each side keeps
//! them in its history for an hour (see `history::Press`).

use serde::{Deserialize, Serialize};

use crate::client::history::{Press, PressAnswer, StoredMessage, change_of};
use crate::client::messaging::{Inbox, MessagingError, Messenger};
use crate::crypto::cert::AccountKind;
use crate::defaults::CARD_FRESH_SECS;
use crate::ids::now_ms;
use crate::proto::LookupQuery;
use crate::proto::envelope::Envelope;
use crate::proto::payload::{Body, MAX_TEXT_CHARS, MessageId};
use crate::proto::rich::{ButtonAction, CallbackId, Extras, MAX_ANSWER_CHARS};

/// What pressing a button did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Pressed {
    /// An inline button: the bot was told; its answer, if it came in time.
    Callback { query: CallbackId, answer: Option<PressAnswer> },
    /// A link button: nothing is sent; open the link.
    Url { url: String },
    /// A reply keyboard's button: its text was sent as a message.
    Sent { message: StoredMessage },
}

impl Messenger {
    /// Presses the button with text `button` of message `id`: an inline button's press goes
    /// to the bot (its answer comes later: [`Messenger::press_answer`]); a reply keyboard's
    /// button sends its text.
    pub async fn press(&mut self, id: MessageId, button: &str) -> Result<Pressed, MessagingError> {
        self.history()?;
        let message = self.h().message(&id)?.ok_or(MessagingError::UnknownMessage(id))?;
        let extras = message.extras.as_deref().filter(|_| !message.outgoing && !message.deleted);
        let no_button = || MessagingError::NoButton { message: id, button: button.to_string() };
        if extras.is_some_and(|e| e.has_keyboard_button(button)) {
            let mut sent = self.send_texts(LookupQuery::UserId(message.chat), vec![button.to_string()], None).await?;
            return sent.pop().map(|message| Pressed::Sent { message }).ok_or_else(no_button);
        }
        let data = match extras.and_then(|e| e.inline_button(button)).map(|b| &b.action) {
            Some(ButtonAction::Url { url }) => return Ok(Pressed::Url { url: url.clone() }),
            Some(ButtonAction::Callback { data }) => data.clone(),
            None => return Err(no_button()),
        };
        let query = CallbackId::random();
        let press =
            Press { id: query, with: message.from, message: id, data: data.clone(), at_ms: now_ms(), answer: None };
        let card = self.card(LookupQuery::UserId(message.from), CARD_FRESH_SECS).await?;
        // Buttons that tell their sender are bots' (as in Telegram): a person's are not pressed.
        if card.kind != AccountKind::Bot {
            return Err(no_button());
        }
        if card.devices.is_empty() {
            return Err(MessagingError::NoDevices(card.user_id));
        }
        // Kept before it goes, so that an answer coming at once finds it.
        self.h().put_press_out(&press)?;
        self.send_payloads(&card, vec![Body::Callback { query, message: id, data }], false).await?;
        Ok(Pressed::Callback { query, answer: None })
    }

    /// The bot's answer to one of our presses, once it came.
    pub fn press_answer(&mut self, query: &CallbackId) -> Result<Option<PressAnswer>, MessagingError> {
        Ok(self.history()?.press_out(query)?.and_then(|p| p.answer))
    }

    /// The presses of our buttons not answered yet (a bot's), oldest first.
    pub fn presses(&mut self) -> Result<Vec<Press>, MessagingError> {
        Ok(self.history()?.presses_in()?)
    }

    /// Answers a press of one of our buttons, once: the presser's devices show `text` (a
    /// notice, or an alert).
    pub async fn answer_press(
        &mut self,
        query: CallbackId,
        text: Option<String>,
        alert: bool,
    ) -> Result<(), MessagingError> {
        self.history()?;
        if text.as_ref().is_some_and(|t| t.chars().count() > MAX_ANSWER_CHARS) {
            return Err(MessagingError::BadExtras(format!("an answer must be at most {MAX_ANSWER_CHARS} characters")));
        }
        let press = self.h().press_in(&query)?.ok_or(MessagingError::NoCallback(query))?;
        let card = self.card(LookupQuery::UserId(press.with), CARD_FRESH_SECS).await?;
        self.send_payloads(&card, vec![Body::CallbackAnswer { query, text, alert }], false).await?;
        self.h().answered_press_in(&query)?;
        Ok(())
    }

    /// Changes one of our messages as bots do: its text and formatting (when `text` is
    /// given) and its keyboard (always; none takes it away).
    pub async fn edit_rich(
        &mut self,
        id: MessageId,
        text: Option<String>,
        extras: Extras,
    ) -> Result<StoredMessage, MessagingError> {
        self.history()?;
        if text.as_ref().is_some_and(|t| t.is_empty() || t.chars().count() > MAX_TEXT_CHARS) {
            return Err(MessagingError::TextTooLong);
        }
        extras.check().map_err(MessagingError::BadExtras)?;
        let original = self.own_message(&id)?;
        let body = Body::EditRich { message: id, text, extras: Box::new(extras) };
        self.send_to_chat(original.chat, vec![body.clone()], true).await?;
        let changed = match change_of(&body, self.me()) {
            Some((_, change)) => self.h().update_own(&[id], change)?,
            None => Vec::new(),
        };
        Ok(changed.into_iter().next().unwrap_or(original))
    }

    /// A press or an answer from `envelope` (already opened): kept once; one that names no
    /// button of ours, or answers no press of ours, is dropped.
    pub(crate) fn apply_press(&self, envelope: &Envelope, body: Body, inbox: &mut Inbox) -> Result<(), MessagingError> {
        let author = envelope.from_user;
        match body {
            Body::Callback { query, message, data } => {
                let ours = self.h().message(&message)?.is_some_and(|m| {
                    m.outgoing
                        && !m.deleted
                        && m.chat == author
                        && m.extras.as_deref().is_some_and(|e| e.has_callback(&data))
                });
                if !ours {
                    tracing::warn!(envelope = %envelope.id, from = %author, "dropping a press of no button of ours");
                    return Ok(self.h().drop_envelope(envelope.id)?);
                }
                let press = Press { id: query, with: author, message, data, at_ms: now_ms(), answer: None };
                if self.h().put_press_in(envelope.id, &press)? {
                    inbox.presses.push(press);
                }
            }
            Body::CallbackAnswer { query, text, alert } => {
                let text = text.map(|t| t.chars().filter(|c| !c.is_control()).take(MAX_ANSWER_CHARS).collect());
                // An answer to a press another device of ours made is only marked seen.
                inbox.press_answers.extend(self.h().answer_press_out(
                    envelope.id,
                    &query,
                    author,
                    PressAnswer { text, alert },
                )?);
            }
            _ => {}
        }
        Ok(())
    }
}
