//! The Bot API's `entities` and `reply_markup` as Meshgram's message extras, and back.
//!
//! What Meshgram cannot do for the user (log-in links, inline-query switches, web apps,
//! payments, asking for a contact or location) is refused before anything is sent, so a bot
//! never believes a button works that its users cannot press.

use meshgram_node::proto::rich::{ButtonAction, Entity, Extras, InlineButton, Markup};
use serde_json::{Value, json};

/// Telegram's name for a button this bridge cannot offer.
const BUTTON_TYPE_INVALID: &str = "BUTTON_TYPE_INVALID";

/// Entity fields beyond type, offset and length, one of which an entity may carry.
const ENTITY_EXTRAS: [&str; 3] = ["url", "language", "custom_emoji_id"];

/// Extras from a request's entities (already parsed from its `parse_mode`) and `reply_markup`.
/// Errors are the detail of a 400.
pub(crate) fn extras(entities: &[Value], markup: Option<&Value>) -> Result<Extras, String> {
    let entities = entities.iter().map(entity).collect::<Result<Vec<_>, _>>()?;
    let markup = markup.map(self::markup).transpose()?;
    let extras = Extras { entities, markup };
    extras.check()?;
    Ok(extras)
}

fn entity(e: &Value) -> Result<Entity, String> {
    let bad = || "can't parse entities: an entity needs a type, an offset and a length".to_string();
    let kind = e["type"].as_str().filter(|k| !k.is_empty()).ok_or_else(bad)?;
    let number = |field: &str| e[field].as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(bad);
    let extra = ENTITY_EXTRAS.iter().find_map(|field| e[field].as_str().map(str::to_string));
    // A mention by user (not by @name) keeps the user's id.
    let extra = extra.or_else(|| e["user"]["id"].as_u64().map(|id| id.to_string()));
    Ok(Entity { kind: kind.to_string(), offset: number("offset")?, length: number("length")?, extra })
}

fn markup(m: &Value) -> Result<Markup, String> {
    let invalid = || "can't parse reply keyboard markup JSON object".to_string();
    if let Some(rows) = m.get("inline_keyboard") {
        let rows = rows_of(rows).ok_or_else(invalid)?;
        let rows = rows.iter().map(|row| row.iter().map(inline_button).collect()).collect::<Result<_, _>>()?;
        return Ok(Markup::Inline { rows });
    }
    let placeholder = m["input_field_placeholder"].as_str().map(str::to_string);
    if let Some(rows) = m.get("keyboard") {
        let rows = rows_of(rows).ok_or_else(invalid)?;
        let rows = rows.iter().map(|row| row.iter().map(keyboard_button).collect()).collect::<Result<_, _>>()?;
        let flag = |name: &str| m[name].as_bool().unwrap_or(false);
        return Ok(Markup::Keyboard {
            rows,
            resize: flag("resize_keyboard"),
            one_time: flag("one_time_keyboard"),
            placeholder,
        });
    }
    if m["remove_keyboard"].as_bool() == Some(true) {
        return Ok(Markup::RemoveKeyboard);
    }
    if m["force_reply"].as_bool() == Some(true) {
        return Ok(Markup::ForceReply { placeholder });
    }
    Err(invalid())
}

fn rows_of(rows: &Value) -> Option<Vec<&Vec<Value>>> {
    rows.as_array()?.iter().map(Value::as_array).collect()
}

fn inline_button(b: &Value) -> Result<InlineButton, String> {
    let text = b["text"]
        .as_str()
        .ok_or("can't parse inline keyboard button: Text buttons are unallowed in the inline keyboard")?;
    let action = match (b["callback_data"].as_str(), b["url"].as_str()) {
        (Some(data), None) if !data.is_empty() && data.len() <= 64 => ButtonAction::Callback { data: data.to_string() },
        (Some(_), None) => return Err("BUTTON_DATA_INVALID".into()),
        (None, Some(url)) if url.contains(':') => ButtonAction::Url { url: url.to_string() },
        (None, Some(_)) => return Err("BUTTON_URL_INVALID".into()),
        _ => return Err(BUTTON_TYPE_INVALID.into()),
    };
    Ok(InlineButton { text: text.to_string(), action })
}

fn keyboard_button(b: &Value) -> Result<String, String> {
    match b {
        Value::String(text) => Ok(text.clone()),
        // Requests for a contact, a location, a poll, …, unless they are all explicitly off.
        Value::Object(fields) if fields.iter().all(|(k, v)| k == "text" || *v == Value::Bool(false)) => {
            b["text"].as_str().map(str::to_string).ok_or_else(|| "can't parse keyboard button".to_string())
        }
        // request_contact, request_location, web_app, …: nothing here could answer them.
        _ => Err(BUTTON_TYPE_INVALID.into()),
    }
}

/// A stored entity as the Bot API's `MessageEntity`.
pub(crate) fn entity_json(e: &Entity) -> Value {
    let mut json = json!({ "type": e.kind, "offset": e.offset, "length": e.length });
    if let Some(extra) = &e.extra {
        match e.kind.as_str() {
            "text_link" => json["url"] = extra.clone().into(),
            "pre" => json["language"] = extra.clone().into(),
            "custom_emoji" => json["custom_emoji_id"] = extra.clone().into(),
            "text_mention" => {
                json["user"] = json!({ "id": extra.parse::<u64>().unwrap_or(0), "is_bot": false, "first_name": "" })
            }
            _ => {}
        }
    }
    json
}

/// A message's inline keyboard as its `reply_markup` (the Bot API shows no other markup on a
/// message).
pub(crate) fn inline_keyboard_json(markup: &Markup) -> Option<Value> {
    let Markup::Inline { rows } = markup else { return None };
    let rows: Vec<Vec<Value>> = rows
        .iter()
        .map(|row| {
            row.iter()
                .map(|b| match &b.action {
                    ButtonAction::Callback { data } => json!({ "text": b.text, "callback_data": data }),
                    ButtonAction::Url { url } => json!({ "text": b.text, "url": url }),
                })
                .collect()
        })
        .collect();
    Some(json!({ "inline_keyboard": rows }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn inline_keyboards_round_trip_and_unservable_buttons_are_refused() {
        let markup = json!({"inline_keyboard": [[{"text": "Yes", "callback_data": "y"}, {"text": "Docs", "url": "https://x.org"}]]});
        let entities = [json!({"type": "text_link", "offset": 0, "length": 2, "url": "https://x.org"})];
        let extras = extras(&entities, Some(&markup)).unwrap();
        assert_eq!(inline_keyboard_json(extras.markup.as_ref().unwrap()).unwrap(), markup);
        assert_eq!(entity_json(&extras.entities[0]), entities[0]);

        let login = json!({"inline_keyboard": [[{"text": "Log in", "login_url": {"url": "https://x.org"}}]]});
        assert_eq!(super::extras(&[], Some(&login)).unwrap_err(), BUTTON_TYPE_INVALID);
        let long = json!({"inline_keyboard": [[{"text": "x", "callback_data": "d".repeat(65)}]]});
        assert_eq!(super::extras(&[], Some(&long)).unwrap_err(), "BUTTON_DATA_INVALID");
        let contact = json!({"keyboard": [[{"text": "Share", "request_contact": true}]]});
        assert_eq!(super::extras(&[], Some(&contact)).unwrap_err(), BUTTON_TYPE_INVALID);
        assert!(super::extras(&[], Some(&json!({"keyboard": "no"}))).is_err());
    }

    #[test]
    fn reply_keyboards_take_strings_or_text_buttons() {
        let markup =
            json!({"keyboard": [["A", {"text": "B"}]], "resize_keyboard": true, "input_field_placeholder": "pick"});
        let extras = extras(&[], Some(&markup)).unwrap();
        let want = Markup::Keyboard {
            rows: vec![vec!["A".into(), "B".into()]],
            resize: true,
            one_time: false,
            placeholder: Some("pick".into()),
        };
        assert_eq!(extras.markup, Some(want));
        assert_eq!(
            super::extras(&[], Some(&json!({"remove_keyboard": true}))).unwrap().markup,
            Some(Markup::RemoveKeyboard)
        );
    }
}
