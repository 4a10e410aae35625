//! What a message can carry besides its text, as bots send it: formatting (entities) and a
//! keyboard (inline buttons under the message, or a keyboard that replaces the user's). Sealed
//! inside payloads like any text; relays never see it. Bounded like Telegram's: a receiver
//! drops a message whose extras do not [`Extras::check`].

use serde::{Deserialize, Serialize};

/// Most buttons in one keyboard, and longest button text and callback data (Telegram's).
pub const MAX_BUTTONS: usize = 100;
pub const MAX_BUTTON_TEXT_CHARS: usize = 128;
pub const MAX_CALLBACK_DATA_BYTES: usize = 64;
/// Most entities in one message, and longest URL or language in one.
pub const MAX_ENTITIES: usize = 100;
pub const MAX_ENTITY_EXTRA_CHARS: usize = 2048;
/// Longest entity type name (Telegram's are at most 21 bytes).
const MAX_ENTITY_KIND_BYTES: usize = 32;
/// Longest input field placeholder (Telegram's).
const MAX_PLACEHOLDER_CHARS: usize = 64;
/// Longest answer to a button press shown to the user (Telegram's).
pub const MAX_ANSWER_CHARS: usize = 200;

/// Formatting and keyboard of one message.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Extras {
    #[serde(default)]
    pub entities: Vec<Entity>,
    #[serde(default)]
    pub markup: Option<Markup>,
}

impl Extras {
    pub fn is_empty(&self) -> bool {
        self.entities.is_empty() && self.markup.is_none()
    }

    /// Whether these extras are within bounds; the reason if not.
    pub fn check(&self) -> Result<(), String> {
        if self.entities.len() > MAX_ENTITIES {
            return Err(format!("{} entities, more than {MAX_ENTITIES}", self.entities.len()));
        }
        if self.entities.iter().any(|e| e.extra.as_ref().is_some_and(|x| x.chars().count() > MAX_ENTITY_EXTRA_CHARS)) {
            return Err("an entity's URL or language is too long".into());
        }
        if self.entities.iter().any(|e| e.kind.is_empty() || e.kind.len() > MAX_ENTITY_KIND_BYTES) {
            return Err("an entity's type must be 1 to 32 bytes".into());
        }
        match &self.markup {
            Some(m) => m.check(),
            None => Ok(()),
        }
    }

    /// The inline button with this text, if the message has one.
    pub fn inline_button(&self, text: &str) -> Option<&InlineButton> {
        match &self.markup {
            Some(Markup::Inline { rows }) => rows.iter().flatten().find(|b| b.text == text),
            _ => None,
        }
    }

    /// Whether the message has an inline button that sends this data.
    pub fn has_callback(&self, data: &str) -> bool {
        match &self.markup {
            Some(Markup::Inline { rows }) => {
                rows.iter().flatten().any(|b| matches!(&b.action, ButtonAction::Callback { data: d } if d == data))
            }
            _ => false,
        }
    }

    /// Whether the message's reply keyboard has a button with this text.
    pub fn has_keyboard_button(&self, text: &str) -> bool {
        matches!(&self.markup, Some(Markup::Keyboard { rows, .. }) if rows.iter().flatten().any(|b| b == text))
    }
}

/// A formatted span of a message's text, in UTF-16 code units as Telegram counts them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entity {
    /// Telegram's entity type: `bold`, `italic`, `code`, `pre`, `text_link`, `mention`, ….
    pub kind: String,
    pub offset: u32,
    pub length: u32,
    /// A `text_link`'s URL or a `pre`'s language.
    #[serde(default)]
    pub extra: Option<String>,
}

/// A message's keyboard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Externally tagged: postcard, which carries this on the wire, cannot read internal tags.
#[serde(rename_all = "snake_case")]
pub enum Markup {
    /// Buttons under the message.
    Inline { rows: Vec<Vec<InlineButton>> },
    /// A keyboard in place of the user's: pressing a button sends its text.
    Keyboard { rows: Vec<Vec<String>>, resize: bool, one_time: bool, placeholder: Option<String> },
    /// Takes the last reply keyboard away.
    RemoveKeyboard,
    /// Asks the user to reply to this message.
    ForceReply { placeholder: Option<String> },
}

impl Markup {
    fn check(&self) -> Result<(), String> {
        let texts: Vec<&str> = match self {
            Markup::Inline { rows } => {
                for b in rows.iter().flatten() {
                    if let ButtonAction::Callback { data } = &b.action
                        && (data.is_empty() || data.len() > MAX_CALLBACK_DATA_BYTES)
                    {
                        return Err(format!("callback data must be 1 to {MAX_CALLBACK_DATA_BYTES} bytes"));
                    }
                    if let ButtonAction::Url { url } = &b.action
                        && url.chars().count() > MAX_ENTITY_EXTRA_CHARS
                    {
                        return Err("a button's URL is too long".into());
                    }
                }
                rows.iter().flatten().map(|b| b.text.as_str()).collect()
            }
            Markup::Keyboard { rows, .. } => rows.iter().flatten().map(String::as_str).collect(),
            Markup::RemoveKeyboard | Markup::ForceReply { .. } => Vec::new(),
        };
        let rows = match self {
            Markup::Inline { rows } => rows.len(),
            Markup::Keyboard { rows, .. } => rows.len(),
            Markup::RemoveKeyboard | Markup::ForceReply { .. } => 0,
        };
        if rows > MAX_BUTTONS {
            return Err(format!("{rows} rows of buttons, more than {MAX_BUTTONS}"));
        }
        let placeholder = match self {
            Markup::Keyboard { placeholder, .. } | Markup::ForceReply { placeholder } => placeholder.as_deref(),
            Markup::Inline { .. } | Markup::RemoveKeyboard => None,
        };
        if placeholder.is_some_and(|p| p.chars().count() > MAX_PLACEHOLDER_CHARS) {
            return Err(format!("a placeholder must be at most {MAX_PLACEHOLDER_CHARS} characters"));
        }
        if texts.len() > MAX_BUTTONS {
            return Err(format!("{} buttons, more than {MAX_BUTTONS}", texts.len()));
        }
        if texts.iter().any(|t| t.is_empty() || t.chars().count() > MAX_BUTTON_TEXT_CHARS) {
            return Err(format!("a button's text must be 1 to {MAX_BUTTON_TEXT_CHARS} characters"));
        }
        Ok(())
    }
}

/// One button under a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InlineButton {
    pub text: String,
    pub action: ButtonAction,
}

/// What pressing an inline button does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ButtonAction {
    /// Tells the message's sender (a bot), which answers.
    Callback { data: String },
    /// Opens a link.
    Url { url: String },
}

crate::ids::time_ordered_id! {
    /// One press of an inline button, answered once by the bot.
    CallbackId
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inline(data: &str, text: &str) -> Extras {
        let button = InlineButton { text: text.into(), action: ButtonAction::Callback { data: data.into() } };
        Extras { entities: vec![], markup: Some(Markup::Inline { rows: vec![vec![button]] }) }
    }

    #[test]
    fn bounds_are_checked() {
        assert!(inline("yes", "Yes").check().is_ok());
        assert!(inline("", "Yes").check().is_err());
        assert!(inline(&"x".repeat(65), "Yes").check().is_err());
        assert!(inline("yes", "").check().is_err());
        let many = Markup::Keyboard {
            rows: vec![vec!["a".to_string(); 101]],
            resize: false,
            one_time: false,
            placeholder: None,
        };
        assert!(Extras { entities: vec![], markup: Some(many) }.check().is_err());
    }

    #[test]
    fn every_markup_survives_the_wire_format() {
        let link =
            InlineButton { text: "Docs".into(), action: ButtonAction::Url { url: "https://example.org".into() } };
        let keyboard = Markup::Keyboard {
            rows: vec![vec!["a".into(), "b".into()]],
            resize: true,
            one_time: false,
            placeholder: Some("pick".into()),
        };
        let markups = [
            inline("yes", "Yes").markup.unwrap(),
            Markup::Inline { rows: vec![vec![link]] },
            keyboard,
            Markup::RemoveKeyboard,
            Markup::ForceReply { placeholder: None },
        ];
        for markup in markups {
            let entity = Entity { kind: "text_link".into(), offset: 1, length: 2, extra: Some("https://x".into()) };
            let extras = Extras { entities: vec![entity], markup: Some(markup) };
            let bytes = postcard::to_stdvec(&extras).unwrap();
            assert_eq!(postcard::from_bytes::<Extras>(&bytes).unwrap(), extras);
        }
    }

    #[test]
    fn buttons_are_found_by_text() {
        let extras = inline("yes", "Yes");
        assert!(extras.inline_button("Yes").is_some());
        assert!(extras.inline_button("No").is_none());
        assert!(!extras.has_keyboard_button("Yes"));
    }
}
