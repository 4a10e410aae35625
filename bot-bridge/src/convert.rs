//! Meshgram's messages and users as the Bot API's JSON objects, and formatted text (`parse_mode`)
//! as plain text plus entities with UTF-16 offsets, as Telegram counts them.

use meshgram_node::client::history::StoredMessage;
use meshgram_node::crypto::cert::AccountKind;
use meshgram_node::proto::UserCard;
use meshgram_node::proto::media::FileRef;
use serde_json::{Value, json};

/// A directory card as a Bot API `User`. Meshgram has one display name: it is `first_name`.
pub(crate) fn user(card: &UserCard) -> Value {
    let mut user = json!({
        "id": card.user_id.0,
        "is_bot": card.kind == AccountKind::Bot,
        "first_name": if card.name.is_empty() { format!("User {}", card.user_id.0) } else { card.name.clone() },
    });
    if let Some(username) = &card.username {
        user["username"] = username.as_str().into();
    }
    user
}

/// The private chat with a user (a Bot API `Chat`).
pub(crate) fn private_chat(user: &Value) -> Value {
    let mut chat = json!({ "id": user["id"], "type": "private", "first_name": user["first_name"] });
    if let Some(username) = user.get("username") {
        chat["username"] = username.clone();
    }
    chat
}

/// A group as a Bot API `Chat`.
pub(crate) fn group_chat(id: i64, title: &str) -> Value {
    json!({ "id": id, "type": "group", "title": title })
}

/// Which version of a message this is: an edit is a new version.
pub(crate) fn version(m: &StoredMessage) -> u64 {
    if !m.edited {
        return 0;
    }
    let hash = blake3::hash(m.text.as_bytes());
    u64::from_le_bytes(hash.as_bytes()[..8].try_into().unwrap_or_default()) | 1
}

/// A message as a Bot API `Message`.
pub(crate) fn message(m: &StoredMessage, number: i32, reply_to: Option<i32>, from: Value, chat: Value) -> Value {
    let mut message = json!({
        "message_id": number,
        "from": from,
        "chat": chat.clone(),
        "date": m.sent_at_ms / 1000,
    });
    let text_field = if m.file.is_some() { "caption" } else { "text" };
    if !m.text.is_empty() || m.file.is_none() {
        message[text_field] = m.text.clone().into();
        // Commands are marked in every text, formatted or not: bot libraries route on them.
        let mut entities = commands(&m.text);
        entities.extend(m.extras.iter().flat_map(|e| &e.entities).map(crate::rich::entity_json));
        entities.sort_by_key(|e| (e["offset"].as_u64(), e["type"].as_str().map(str::to_string)));
        entities.dedup();
        if !entities.is_empty() {
            message[if m.file.is_some() { "caption_entities" } else { "entities" }] = entities.into();
        }
    }
    if let Some(file) = &m.file {
        let kind = media_kind(&file.mime);
        message[kind] = media(m, file, kind);
    }
    if let Some(keyboard) =
        m.extras.as_ref().and_then(|e| e.markup.as_ref()).and_then(crate::rich::inline_keyboard_json)
    {
        message["reply_markup"] = keyboard;
    }
    if m.edited {
        message["edit_date"] = (m.sent_at_ms / 1000).into();
    }
    if let Some(reply_to) = reply_to {
        message["reply_to_message"] = json!({ "message_id": reply_to, "chat": chat, "date": m.sent_at_ms / 1000 });
    }
    message
}

/// The Bot API fields a message's file may show under.
pub(crate) const MEDIA_KINDS: [&str; 6] = ["photo", "video", "animation", "audio", "voice", "document"];

/// The field a file shows under. How it was sent is not recorded with it, so its type says.
pub(crate) fn media_kind(mime: &str) -> &'static str {
    match mime {
        "image/jpeg" | "image/png" | "image/webp" => "photo",
        "image/gif" => "animation",
        "audio/ogg" => "voice",
        m if m.starts_with("video/") => "video",
        m if m.starts_with("audio/") => "audio",
        _ => "document",
    }
}

/// A message's file as the Bot API object of `kind` (for `photo`, a list of sizes). The
/// `file_id` is the message's id: sent again, it sends the same file reference. Dimensions
/// and durations are not recorded with a file: they are 0.
pub(crate) fn media(m: &StoredMessage, file: &FileRef, kind: &str) -> Value {
    let mut object = json!({
        "file_id": m.id.to_string(),
        "file_unique_id": file.file_id.to_string(),
        "file_size": file.size,
    });
    let (name, mime) = (json!(file.name), json!(file.mime));
    match kind {
        "photo" => {
            object["width"] = 0.into();
            object["height"] = 0.into();
            return json!([object]);
        }
        "video" | "animation" => {
            for field in ["width", "height", "duration"] {
                object[field] = 0.into();
            }
            object["file_name"] = name;
            object["mime_type"] = mime;
        }
        "voice" => {
            object["duration"] = 0.into();
            object["mime_type"] = mime;
        }
        "audio" => {
            object["duration"] = 0.into();
            object["file_name"] = name;
            object["mime_type"] = mime;
        }
        _ => {
            object["file_name"] = name;
            object["mime_type"] = mime;
        }
    }
    object
}

/// UTF-16 length, as the Bot API counts offsets.
fn utf16_len(s: &str) -> usize {
    s.encode_utf16().count()
}

/// `bot_command` entities: Telegram marks `/start` and `/help@name_bot` in incoming texts, and
/// bot libraries route on them.
pub(crate) fn commands(text: &str) -> Vec<Value> {
    let mut found = Vec::new();
    let mut offset = 0;
    for word in text.split_inclusive(char::is_whitespace) {
        let trimmed = word.trim_end();
        if trimmed.len() > 1
            && trimmed.starts_with('/')
            && trimmed[1..].chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '@')
            && trimmed[1..].chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            found.push(json!({ "type": "bot_command", "offset": offset, "length": utf16_len(trimmed) }));
        }
        offset += utf16_len(word);
    }
    found
}

/// What a `parse_mode` text says: plain text and its entities.
#[derive(Debug, PartialEq)]
pub(crate) struct Formatted {
    pub(crate) text: String,
    pub(crate) entities: Vec<Value>,
}

/// Parses `text` in a `parse_mode` ("HTML", "MarkdownV2", "Markdown"; none: as it is). Errors
/// are Telegram's "can't parse entities" detail.
pub(crate) fn parse(text: &str, mode: Option<&str>) -> Result<Formatted, String> {
    match mode.map(str::to_ascii_lowercase).as_deref() {
        None | Some("") => Ok(Formatted { text: text.to_string(), entities: Vec::new() }),
        Some("html") => parse_html(text),
        Some("markdownv2") => parse_markdown(text, true),
        Some("markdown") => parse_markdown(text, false),
        Some(_) => Err("unsupported parse_mode".into()),
    }
}

fn entity(kind: &str, offset: usize, length: usize, extra: Option<(&str, String)>) -> Value {
    let mut e = json!({ "type": kind, "offset": offset, "length": length });
    if let Some((key, value)) = extra {
        e[key] = value.into();
    }
    e
}

/// An HTML tag not closed yet: its name, entity type, UTF-16 start and extra field (a link's url).
type OpenTag = (String, &'static str, usize, Option<(&'static str, String)>);

fn parse_html(text: &str) -> Result<Formatted, String> {
    let (mut out, mut entities) = (String::new(), Vec::new());
    // Open tags: (entity type, UTF-16 offset where it starts, extra field).
    let mut open: Vec<OpenTag> = Vec::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if c == '&' {
            let end = rest.find(';').filter(|&e| e <= 10).ok_or("unsupported start tag or entity")?;
            let decoded = match &rest[1..end] {
                "lt" => '<',
                "gt" => '>',
                "amp" => '&',
                "quot" => '"',
                other => {
                    let code = match other.strip_prefix('#') {
                        Some(hex) if hex.starts_with(['x', 'X']) => u32::from_str_radix(&hex[1..], 16).ok(),
                        Some(decimal) => decimal.parse::<u32>().ok(),
                        None => None,
                    };
                    let code = code.and_then(char::from_u32);
                    code.ok_or_else(|| format!("unsupported entity &{other};"))?
                }
            };
            out.push(decoded);
            rest = &rest[end + 1..];
        } else if c == '<' {
            let end = rest.find('>').ok_or("unclosed start tag")?;
            let tag = &rest[1..end];
            rest = &rest[end + 1..];
            let offset = utf16_len(&out);
            if let Some(name) = tag.strip_prefix('/') {
                let name = name.trim().to_ascii_lowercase();
                let (open_name, kind, start, extra) =
                    open.pop().ok_or_else(|| format!("unmatched end tag </{name}>"))?;
                if open_name != name {
                    return Err(format!("can't find end tag corresponding to start tag \"{open_name}\""));
                }
                if offset > start {
                    entities.push(entity(kind, start, offset - start, extra));
                }
            } else {
                let (name, attrs) = tag.split_once(char::is_whitespace).unwrap_or((tag, ""));
                let name = name.to_ascii_lowercase();
                let attr = |key: &str| {
                    attrs.split_once(&format!("{key}=")).map(|(_, v)| {
                        let v = v.trim_start();
                        let quote = v.chars().next().filter(|q| *q == '"' || *q == '\'');
                        match quote {
                            Some(q) => v[1..].split(q).next().unwrap_or("").to_string(),
                            None => v.split_whitespace().next().unwrap_or("").to_string(),
                        }
                    })
                };
                let (kind, extra): (&'static str, Option<(&'static str, String)>) = match name.as_str() {
                    "b" | "strong" => ("bold", None),
                    "i" | "em" => ("italic", None),
                    "u" | "ins" => ("underline", None),
                    "s" | "strike" | "del" => ("strikethrough", None),
                    "tg-spoiler" => ("spoiler", None),
                    "span" if attrs.contains("tg-spoiler") => ("spoiler", None),
                    "code" => ("code", None),
                    "pre" => ("pre", None),
                    "blockquote" => ("blockquote", None),
                    "a" => ("text_link", Some(("url", attr("href").ok_or("the a tag needs href")?))),
                    other => return Err(format!("unsupported start tag \"{other}\"")),
                };
                open.push((name, kind, offset, extra));
            }
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    if let Some((name, ..)) = open.last() {
        return Err(format!("can't find end tag corresponding to start tag \"{name}\""));
    }
    entities.sort_by_key(|e| e["offset"].as_u64());
    Ok(Formatted { text: out, entities })
}

fn parse_markdown(text: &str, v2: bool) -> Result<Formatted, String> {
    let (mut out, mut entities) = (String::new(), Vec::new());
    let mut open: Vec<(&'static str, &'static str, usize)> = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let in_code = open.last().is_some_and(|(_, kind, _)| *kind == "code" || *kind == "pre");
        if c == '\\' && (v2 || !in_code) {
            match chars.next() {
                Some((_, escaped)) if v2 || "_*`[".contains(escaped) => out.push(escaped),
                Some((_, other)) => {
                    out.push('\\');
                    out.push(other);
                }
                None => return Err("the text ends with a lone backslash".into()),
            }
            continue;
        }
        let marker: Option<(&'static str, &'static str)> = match c {
            '`' if text[i..].starts_with("```") => Some(("```", "pre")),
            '`' => Some(("`", "code")),
            _ if in_code => None,
            '*' => Some(("*", "bold")),
            '_' if v2 && text[i..].starts_with("__") => Some(("__", "underline")),
            '_' => Some(("_", "italic")),
            '~' if v2 => Some(("~", "strikethrough")),
            '|' if v2 && text[i..].starts_with("||") => Some(("||", "spoiler")),
            _ => None,
        };
        if let Some((mark, kind)) = marker {
            for _ in 1..mark.chars().count() {
                chars.next();
            }
            let offset = utf16_len(&out);
            if open.last().is_some_and(|(m, ..)| *m == mark) {
                let (_, kind, start) = open.pop().unwrap_or((mark, kind, offset));
                if offset > start {
                    entities.push(entity(kind, start, offset - start, None));
                }
            } else {
                open.push((mark, kind, offset));
            }
            continue;
        }
        if v2 && !in_code && "[]()>#+-=|{}.!".contains(c) && c != '[' {
            return Err(format!("character '{c}' is reserved and must be escaped with the preceding '\\'"));
        }
        if c == '[' && !in_code {
            // [text](url): a text link.
            let close = text[i..].find("](").map(|p| i + p);
            let end = close.and_then(|p| text[p..].find(')').map(|e| p + e));
            if let (Some(close), Some(end)) = (close, end) {
                let inner = parse_markdown(&text[i + 1..close], v2)?;
                let offset = utf16_len(&out);
                let url = text[close + 2..end].to_string();
                entities.push(entity("text_link", offset, utf16_len(&inner.text), Some(("url", url))));
                for mut e in inner.entities {
                    e["offset"] = (e["offset"].as_u64().unwrap_or(0) as usize + offset).into();
                    entities.push(e);
                }
                out.push_str(&inner.text);
                while chars.peek().is_some_and(|(j, _)| *j <= end) {
                    chars.next();
                }
                continue;
            }
            if v2 {
                return Err("character '[' is reserved and must be escaped with the preceding '\\'".into());
            }
        }
        out.push(c);
    }
    if let Some((mark, ..)) = open.last() {
        return Err(format!("can't find end of the entity starting with '{mark}'"));
    }
    entities.sort_by_key(|e| e["offset"].as_u64());
    Ok(Formatted { text: out, entities })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn html_entities_count_utf16_units() {
        let f = parse("😀 <b>bold</b> &amp; <a href=\"https://x.org\">link</a>&#x27;", Some("HTML")).unwrap();
        assert_eq!(f.text, "😀 bold & link'");
        assert_eq!(f.entities[0], json!({"type": "bold", "offset": 3, "length": 4}));
        assert_eq!(f.entities[1], json!({"type": "text_link", "offset": 10, "length": 4, "url": "https://x.org"}));
        assert!(parse("<b>open", Some("HTML")).unwrap_err().contains("end tag"));
        assert!(parse("<blink>x</blink>", Some("HTML")).unwrap_err().contains("unsupported start tag"));
    }

    #[test]
    fn markdown_v2_needs_escapes_and_nests() {
        let f = parse("*bold _it_* \\. `a*b`", Some("MarkdownV2")).unwrap();
        assert_eq!(f.text, "bold it . a*b");
        assert!(f.entities.contains(&json!({"type": "bold", "offset": 0, "length": 7})));
        assert!(f.entities.contains(&json!({"type": "italic", "offset": 5, "length": 2})));
        assert!(f.entities.contains(&json!({"type": "code", "offset": 10, "length": 3})));
        assert!(parse("1.5", Some("MarkdownV2")).unwrap_err().contains("reserved"));
        assert_eq!(parse("1.5 *b*", Some("Markdown")).unwrap().text, "1.5 b");
        let link = parse("[site](https://x.org)", Some("MarkdownV2")).unwrap();
        assert_eq!(link.entities, vec![json!({"type": "text_link", "offset": 0, "length": 4, "url": "https://x.org"})]);
    }

    #[test]
    fn commands_are_marked() {
        assert_eq!(commands("/start now"), vec![json!({"type": "bot_command", "offset": 0, "length": 6})]);
        assert!(commands("not /a command?").len() == 1);
        assert!(commands("/").is_empty());
    }
}
