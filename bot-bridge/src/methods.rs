//! The Bot API methods, each turned into calls on the bot's client node.

use std::time::Duration;

use meshgram_node::client::api::{ApiError, Call, Reply};
use meshgram_node::client::history::StoredMessage;
use meshgram_node::client::messaging::MAX_CAPTION_CHARS;
use meshgram_node::ids::{UserId, Username};
use meshgram_node::proto::media::FileRef;
use meshgram_node::proto::payload::MessageId;
use meshgram_node::proto::rich::{CallbackId, Extras, MAX_ANSWER_CHARS, Markup};
use meshgram_node::proto::{BotCommandInfo, LookupQuery};
use serde_json::{Value, json};

use crate::api::{Params, TgError, invalid, missing};
use crate::bots::{Bot, node_error};
use crate::{convert, files, rich, webhook};

/// Every method of the Bot API spec (10.1), lower-cased names: those not served here answer
/// as a method that exists but is not available, never as an unknown one.
const SPEC_METHODS: &str = include_str!("spec_methods.txt");

/// `getUpdates` waits at most this long (Telegram's cap).
const MAX_POLL: Duration = Duration::from_secs(50);
/// Longest text (or caption) with its markup, in bytes, that is parsed at all.
const MAX_MARKED_UP_BYTES: usize = 64 * 1024;
pub(crate) const ALLOWED_UPDATES: &str = "allowed_updates";

pub(crate) async fn call(bot: &Bot, method: &str, p: &Params) -> Result<Value, TgError> {
    match method {
        "getme" => Ok(bot.me()),
        "logout" | "close" => Ok(true.into()),
        "getupdates" => get_updates(bot, p).await,
        "deletewebhook" => webhook::delete(bot, p),
        "getwebhookinfo" => webhook::info(bot),
        "setwebhook" => webhook::set(bot, p),
        "sendmessage" => send_message(bot, p).await,
        "sendphoto" => send_media(bot, p, "photo").await,
        "senddocument" => send_media(bot, p, "document").await,
        "sendvideo" => send_media(bot, p, "video").await,
        "sendanimation" => send_media(bot, p, "animation").await,
        "sendaudio" => send_media(bot, p, "audio").await,
        "sendvoice" => send_media(bot, p, "voice").await,
        "sendmediagroup" => send_media_group(bot, p).await,
        "getfile" => files::get_file(bot, p).await,
        "editmessagetext" => edit_message(bot, p, true).await,
        "editmessagereplymarkup" => edit_message(bot, p, false).await,
        "answercallbackquery" => answer_callback_query(bot, p).await,
        "deletemessage" => {
            let (_, chat, _) = chat_of(bot, p, "chat_id").await?;
            let id = message_of(bot, chat, p.required_int("message_id")?, "message to delete not found")?;
            match bot.node.call(Call::Delete { message: id }).await {
                Ok(_) => Ok(true.into()),
                Err(e) if e.code == "NOT_FOUND" || e.code == "FORBIDDEN" => {
                    Err(TgError::bad_request("message can't be deleted"))
                }
                Err(e) => Err(node_error(&e)),
            }
        }
        "forwardmessage" => forward(bot, p).await,
        "copymessage" => copy(bot, p).await,
        "sendchataction" => {
            let (to, ..) = chat_of(bot, p, "chat_id").await?;
            let action = p.required_str("action")?;
            const ACTIONS: &[&str] = &[
                "typing",
                "upload_photo",
                "record_video",
                "upload_video",
                "record_voice",
                "upload_voice",
                "upload_document",
                "choose_sticker",
                "find_location",
                "record_video_note",
                "upload_video_note",
            ];
            if !ACTIONS.contains(&action.as_str()) {
                return Err(TgError::bad_request("wrong parameter action in request"));
            }
            bot.node.call(Call::Typing { to }).await.map_err(|e| node_error(&e))?;
            Ok(true.into())
        }
        "getchat" => {
            let (_, _, mut chat) = chat_of(bot, p, "chat_id").await?;
            chat["accent_color_id"] = 0.into();
            chat["max_reaction_count"] = 11.into();
            chat["accepted_gift_types"] = json!({"unlimited_gifts": false, "limited_gifts": false, "unique_gifts": false, "premium_subscription": false});
            Ok(chat)
        }
        "setmycommands" => {
            let commands = p.json("commands")?.ok_or_else(|| missing("commands"))?;
            let invalid = || TgError::bad_request("BOT_COMMAND_INVALID");
            let commands: Vec<BotCommandInfo> = commands
                .as_array()
                .ok_or_else(invalid)?
                .iter()
                .map(|c| match (c["command"].as_str(), c["description"].as_str()) {
                    (Some(command), Some(description)) => {
                        Ok(BotCommandInfo { command: command.to_string(), description: description.to_string() })
                    }
                    _ => Err(invalid()),
                })
                .collect::<Result<_, _>>()?;
            BotCommandInfo::check_all(&commands).map_err(|_| invalid())?;
            set_commands(bot, p, commands).await
        }
        "getmycommands" => Ok(bot.store.setting(&commands_key(p)?).map_err(TgError::internal)?.unwrap_or(json!([]))),
        "deletemycommands" => set_commands(bot, p, Vec::new()).await,
        "getchatmember" => get_chat_member(bot, p).await,
        "getchatadministrators" => get_chat_administrators(bot, p).await,
        "getchatmembercount" => {
            let (to, chat, _) = chat_of(bot, p, "chat_id").await?;
            Ok(members_of(bot, &to, chat).await?.len().into())
        }
        "getuserprofilephotos" => {
            p.required_int("user_id")?;
            Ok(json!({"total_count": 0, "photos": []}))
        }
        other if SPEC_METHODS.lines().any(|m| m.eq_ignore_ascii_case(other)) => {
            Err(TgError::bad_request("method is not available on this server"))
        }
        _ => Err(TgError::new(404, "Not Found: method not found")),
    }
}

/// Keeps a scope's commands; the default ones (every chat, any language) are what users see
/// with `meshgram bot commands`, so the gateway keeps them too (first: if it cannot be told
/// now, the call fails and the bot retries).
async fn set_commands(bot: &Bot, p: &Params, commands: Vec<BotCommandInfo>) -> Result<Value, TgError> {
    let key = commands_key(p)?;
    if key == commands_key(&Params::default())? {
        bot.node.call(Call::SetBotCommands { commands: commands.clone() }).await.map_err(|e| node_error(&e))?;
    }
    let value =
        (!commands.is_empty()).then(|| serde_json::to_value(&commands)).transpose().map_err(TgError::internal)?;
    bot.store.set_setting(&key, value.as_ref()).map_err(TgError::internal)?;
    Ok(true.into())
}

/// Commands are kept per scope and language, as Telegram keeps them.
fn commands_key(p: &Params) -> Result<String, TgError> {
    let scope = p.json("scope")?.unwrap_or(json!({"type": "default"}));
    let language = p.str("language_code").unwrap_or_default();
    Ok(format!("commands/{scope}/{language}"))
}

async fn get_updates(bot: &Bot, p: &Params) -> Result<Value, TgError> {
    let offset = p.int("offset")?;
    let limit = p.int("limit")?.unwrap_or(100).clamp(1, 100) as usize;
    let timeout = Duration::from_secs(p.int("timeout")?.unwrap_or(0).max(0) as u64).min(MAX_POLL);
    if webhook::is_set(bot)? {
        return Err(TgError::new(
            409,
            "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete the webhook first",
        ));
    }
    if p.has("allowed_updates") {
        set_allowed_updates(bot, p)?;
    }
    let allowed = allowed_updates(bot)?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut offset = offset;
    loop {
        let arrived = bot.arrived.notified();
        tokio::pin!(arrived);
        arrived.as_mut().enable();
        let updates = bot.store.updates(offset, limit, allowed.as_deref()).map_err(TgError::internal)?;
        if !updates.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(updates.into());
        }
        // Confirmed already: the next look only reads.
        offset = offset.filter(|o| *o >= 0);
        if tokio::time::timeout_at(deadline, arrived).await.is_err() {
            return Ok(json!([]));
        }
    }
}

/// Keeps a request's `allowed_updates` for the next ones (an empty list: all kinds again).
pub(crate) fn set_allowed_updates(bot: &Bot, p: &Params) -> Result<(), TgError> {
    let allowed = p.json(ALLOWED_UPDATES)?.unwrap_or(json!([]));
    let list: Vec<Value> = allowed.as_array().cloned().ok_or_else(|| invalid(ALLOWED_UPDATES))?;
    let setting = (!list.is_empty()).then_some(Value::Array(list));
    bot.store.set_setting(ALLOWED_UPDATES, setting.as_ref()).map_err(TgError::internal)
}

/// The update kinds the bot asked for (`None`: all).
pub(crate) fn allowed_updates(bot: &Bot) -> Result<Option<Vec<String>>, TgError> {
    let setting = bot.store.setting(ALLOWED_UPDATES).map_err(TgError::internal)?;
    Ok(setting.and_then(|v| serde_json::from_value(v).ok()))
}

/// The chat a `chat_id` names: what the node takes, the Bot API chat id, and the Bot API
/// `Chat`. A group is one the bot is in (negative ids); channels are not served yet.
async fn chat_of(bot: &Bot, p: &Params, name: &str) -> Result<(LookupQuery, i64, Value), TgError> {
    let not_found = || TgError::bad_request("chat not found");
    let raw = p.required_str(name)?;
    let query = if let Some(username) = raw.strip_prefix('@') {
        let username: Username = username.parse().map_err(|_| not_found())?;
        LookupQuery::Username(username)
    } else {
        let id: i64 = raw.trim().parse().map_err(|_| not_found())?;
        if id < 0 {
            let chat = bot.store.group_chat_number(id).map_err(TgError::internal)?.ok_or_else(not_found)?;
            let group = bot.group(|g| g.id.chat_number().0 == chat).await?.ok_or_else(not_found)?;
            return Ok((LookupQuery::Group(group.id), id, convert::group_chat(id, &group.title)));
        }
        if id == 0 {
            return Err(not_found());
        }
        let user = bot.known_user(UserId(id as u64)).await?;
        return Ok((LookupQuery::UserId(UserId(id as u64)), id, convert::private_chat(&user)));
    };
    let card = bot.card(query).await?;
    let chat = convert::private_chat(&convert::user(&card));
    Ok((LookupQuery::UserId(card.user_id), card.user_id.0 as i64, chat))
}

/// A chat's members as the Bot API's `ChatMember`s: a group's from its state; a private
/// chat's are its two ends.
async fn members_of(bot: &Bot, to: &LookupQuery, chat: i64) -> Result<Vec<(UserId, &'static str)>, TgError> {
    let LookupQuery::Group(group) = to else {
        return Ok(vec![(UserId(chat as u64), "member"), (bot.account.user_id, "member")]);
    };
    let group = bot.group(|g| g.id == *group).await?.ok_or_else(|| TgError::bad_request("chat not found"))?;
    Ok(group.members.iter().map(|m| (m.user, if m.admin { "administrator" } else { "member" })).collect())
}

async fn chat_member_json(bot: &Bot, user: UserId, status: &str) -> Value {
    let mut member = json!({ "status": status, "user": bot.user(user).await });
    if status == "administrator" {
        member["can_be_edited"] = false.into();
        member["is_anonymous"] = false.into();
        for right in [
            "can_manage_chat",
            "can_delete_messages",
            "can_manage_video_chats",
            "can_restrict_members",
            "can_promote_members",
            "can_change_info",
            "can_invite_users",
            "can_post_stories",
            "can_edit_stories",
            "can_delete_stories",
        ] {
            member[right] = true.into();
        }
    }
    member
}

/// `getChatMember`: a user who is not in the chat has left it.
async fn get_chat_member(bot: &Bot, p: &Params) -> Result<Value, TgError> {
    let (to, chat, _) = chat_of(bot, p, "chat_id").await?;
    let user = p.required_int("user_id")?;
    let user = u64::try_from(user).ok().filter(|u| *u > 0).map(UserId).ok_or_else(|| invalid("user_id"))?;
    let members = members_of(bot, &to, chat).await?;
    let status = members.iter().find(|(u, _)| *u == user).map_or("left", |(_, status)| status);
    Ok(chat_member_json(bot, user, status).await)
}

async fn get_chat_administrators(bot: &Bot, p: &Params) -> Result<Value, TgError> {
    let (to, chat, _) = chat_of(bot, p, "chat_id").await?;
    if !matches!(to, LookupQuery::Group(_)) {
        return Err(TgError::bad_request("there are no administrators in the private chat"));
    }
    let mut admins = Vec::new();
    for (user, status) in members_of(bot, &to, chat).await? {
        if status == "administrator" {
            admins.push(chat_member_json(bot, user, status).await);
        }
    }
    Ok(admins.into())
}

fn message_of(bot: &Bot, chat: i64, number: i64, not_found: &str) -> Result<MessageId, TgError> {
    let number = i32::try_from(number).map_err(|_| TgError::bad_request(not_found))?;
    bot.store.message_id(chat, number).map_err(TgError::internal)?.ok_or_else(|| TgError::bad_request(not_found))
}

/// `reply_parameters` (or the older `reply_to_message_id`): the message replied to, if it is
/// known in this chat; an unknown one is an error unless the bot allows sending without it.
fn reply_of(bot: &Bot, chat: i64, p: &Params) -> Result<Option<MessageId>, TgError> {
    let (number, allow_without) = match p.json("reply_parameters")? {
        Some(reply) => {
            let number = reply["message_id"].as_i64().ok_or_else(|| invalid("reply_parameters"))?;
            (number, reply["allow_sending_without_reply"].as_bool().unwrap_or(false))
        }
        None => match p.int("reply_to_message_id")? {
            Some(number) => (number, p.bool("allow_sending_without_reply")?),
            None => return Ok(None),
        },
    };
    match message_of(bot, chat, number, "message to be replied not found") {
        Ok(id) => Ok(Some(id)),
        Err(_) if allow_without => Ok(None),
        Err(e) => Err(e),
    }
}

/// Text and entities of a `text` (or caption) with its `parse_mode` or explicit entities.
fn formatted(p: &Params, field: &str, mode_field: &str, entities_field: &str) -> Result<convert::Formatted, TgError> {
    let text = p.str(field).unwrap_or_default();
    // Markup may make the text longer than the message, but not by this much: the parsers'
    // work stays small.
    if text.len() > MAX_MARKED_UP_BYTES {
        return Err(TgError::bad_request("message is too long"));
    }
    let mode = p.str(mode_field);
    let mut formatted = convert::parse(&text, mode.as_deref())
        .map_err(|why| TgError::bad_request(&format!("can't parse entities: {why}")))?;
    if let Some(entities) = p.json(entities_field)? {
        formatted.entities = entities.as_array().cloned().ok_or_else(|| invalid(entities_field))?;
    }
    Ok(formatted)
}

fn check_text(text: &str) -> Result<(), TgError> {
    if text.trim().is_empty() {
        return Err(TgError::bad_request("message text is empty"));
    }
    if text.chars().count() > meshgram_node::proto::payload::MAX_TEXT_CHARS {
        return Err(TgError::bad_request("message is too long"));
    }
    Ok(())
}

/// A request's formatting and `reply_markup` as message extras: read before anything is
/// sent, so that a bad one fails the call and a retry sends nothing twice.
fn extras_of(p: &Params, entities: &[Value]) -> Result<Extras, TgError> {
    let markup = p.json("reply_markup")?;
    rich::extras(entities, markup.as_ref()).map_err(|why| TgError::bad_request(&why))
}

/// Sends one message (a text, or a file with its caption) with its extras.
async fn send_rich(
    bot: &Bot,
    to: LookupQuery,
    text: String,
    file: Option<FileRef>,
    extras: Extras,
    reply_to: Option<MessageId>,
) -> Result<StoredMessage, TgError> {
    match bot.node.call(Call::SendRich { to, text, file, extras, reply_to }).await {
        Ok(Reply::Message { message }) => Ok(message),
        Ok(other) => Err(TgError::internal(ApiError::unexpected("send_rich", &other))),
        Err(e) => Err(node_error(&e)),
    }
}

/// A `sendMessage`'s text and extras, read and checked before anything is sent.
pub(crate) fn message_of_params(p: &Params) -> Result<(convert::Formatted, Extras), TgError> {
    let text = formatted(p, "text", "parse_mode", "entities")?;
    check_text(&text.text)?;
    let extras = extras_of(p, &text.entities)?;
    Ok((text, extras))
}

/// A file's caption and extras, likewise.
pub(crate) fn caption_of_params(p: &Params) -> Result<(String, Extras), TgError> {
    caption_of(formatted(p, "caption", "parse_mode", "caption_entities")?, p)
}

async fn send_message(bot: &Bot, p: &Params) -> Result<Value, TgError> {
    let (to, chat, _) = chat_of(bot, p, "chat_id").await?;
    let (text, extras) = message_of_params(p)?;
    let reply_to = reply_of(bot, chat, p)?;
    let m = send_rich(bot, to, text.text, None, extras, reply_to).await?;
    bot.message_json(&m).await
}

/// A caption and its extras, checked before any upload.
fn caption_of(caption: convert::Formatted, p: &Params) -> Result<(String, Extras), TgError> {
    check_caption(&caption.text)?;
    let extras = extras_of(p, &caption.entities)?;
    Ok((caption.text, extras))
}

fn check_caption(caption: &str) -> Result<(), TgError> {
    if caption.chars().count() > MAX_CAPTION_CHARS {
        return Err(TgError::bad_request("message caption is too long"));
    }
    Ok(())
}

/// The sent message shown as the method sent it (`sendDocument` of a picture answers with a
/// `document`, as Telegram's does).
async fn sent_as(bot: &Bot, m: &StoredMessage, kind: &str) -> Result<Value, TgError> {
    let mut json = bot.message_json(m).await?;
    if let (Some(file), Some(object)) = (&m.file, json.as_object_mut()) {
        for field in convert::MEDIA_KINDS {
            object.remove(field);
        }
        object.insert(kind.to_string(), convert::media(m, file, kind));
    }
    Ok(json)
}

/// `sendPhoto`, `sendDocument`, …: the file in the parameter named after its kind.
async fn send_media(bot: &Bot, p: &Params, kind: &str) -> Result<Value, TgError> {
    let (to, chat, _) = chat_of(bot, p, "chat_id").await?;
    let (caption, extras) = caption_of_params(p)?;
    let reply_to = reply_of(bot, chat, p)?;
    let file = files::input_file(bot, p, kind)
        .await?
        .ok_or_else(|| TgError::bad_request(&format!("there is no {kind} in the request")))?;
    let m = send_rich(bot, to, caption, Some(file), extras, reply_to).await?;
    sent_as(bot, &m, kind).await
}

/// `sendMediaGroup`: 2 to 10 files, each with its caption, sent in order as one album.
async fn send_media_group(bot: &Bot, p: &Params) -> Result<Value, TgError> {
    let (to, chat, _) = chat_of(bot, p, "chat_id").await?;
    let media = p.json("media")?.ok_or_else(|| missing("media"))?;
    let items = media.as_array().filter(|m| (2..=10).contains(&m.len()));
    let items = items.ok_or_else(|| TgError::bad_request("wrong number of media specified"))?;
    let reply_to = reply_of(bot, chat, p)?;
    // Everything is read and checked before the first upload.
    let mut album = Vec::with_capacity(items.len());
    for item in items {
        let kind = item["type"].as_str().filter(|k| ["photo", "video", "audio", "document"].contains(k));
        let kind = kind.ok_or_else(|| TgError::bad_request("unsupported media type"))?;
        let source = item["media"].as_str().ok_or_else(|| TgError::bad_request("media is empty"))?;
        let text = item["caption"].as_str().unwrap_or_default();
        let mut caption = convert::parse(text, item["parse_mode"].as_str())
            .map_err(|why| TgError::bad_request(&format!("can't parse entities: {why}")))?;
        if let Some(entities) = item["caption_entities"].as_array() {
            caption.entities = entities.clone();
        }
        check_caption(&caption.text)?;
        let extras = rich::extras(&caption.entities, None).map_err(|why| TgError::bad_request(&why))?;
        album.push((kind, source, caption.text, extras));
    }
    let mut files = Vec::with_capacity(album.len());
    for (_, source, ..) in &album {
        files.push(files::named_file(bot, p, source).await?);
    }
    let group_id = MessageId::random().to_string();
    let mut sent = Vec::with_capacity(album.len());
    for ((kind, _, caption, extras), file) in album.into_iter().zip(files) {
        let reply_to = if sent.is_empty() { reply_to } else { None };
        let m = send_rich(bot, to.clone(), caption, Some(file), extras, reply_to).await?;
        let mut json = sent_as(bot, &m, kind).await?;
        json["media_group_id"] = group_id.clone().into();
        sent.push(json);
    }
    Ok(sent.into())
}

/// Changes a message of the bot: its text and entities (`text` given) and always its inline
/// keyboard, which an edit without `reply_markup` takes away, as Telegram's does.
async fn edit_message(bot: &Bot, p: &Params, with_text: bool) -> Result<Value, TgError> {
    if p.has("inline_message_id") {
        return Err(TgError::bad_request("inline messages are not supported"));
    }
    let (_, chat, _) = chat_of(bot, p, "chat_id").await?;
    let id = message_of(bot, chat, p.required_int("message_id")?, "message to edit not found")?;
    let (text, extras) = if with_text {
        let (text, extras) = message_of_params(p)?;
        (Some(text.text), extras)
    } else {
        (None, extras_of(p, &[])?)
    };
    if extras.markup.as_ref().is_some_and(|m| !matches!(m, Markup::Inline { .. })) {
        return Err(TgError::bad_request("REPLY_MARKUP_INVALID"));
    }
    match bot.node.call(Call::EditRich { message: id, text, extras }).await {
        Ok(Reply::Message { message }) => bot.message_json(&message).await,
        Ok(other) => Err(TgError::internal(ApiError::unexpected("edit", &other))),
        Err(e) if e.code == "FORBIDDEN" => Err(TgError::bad_request("message can't be edited")),
        Err(e) if e.code == "NOT_FOUND" => Err(TgError::bad_request("message to edit not found")),
        Err(e) => Err(node_error(&e)),
    }
}

/// Answers a user's press of one of the bot's inline buttons; the answer shows at the user's
/// side once, as a notice or an alert.
async fn answer_callback_query(bot: &Bot, p: &Params) -> Result<Value, TgError> {
    let too_old = || TgError::bad_request("query is too old and response timeout expired or query ID is invalid");
    let query: CallbackId = p.required_str("callback_query_id")?.parse().map_err(|_| too_old())?;
    let text = p.str("text").filter(|t| !t.is_empty());
    if text.as_ref().is_some_and(|t| t.chars().count() > MAX_ANSWER_CHARS) {
        return Err(TgError::bad_request("MESSAGE_TOO_LONG"));
    }
    if p.has("url") {
        return Err(TgError::bad_request("URL_INVALID"));
    }
    match bot.node.call(Call::AnswerPress { query, text, alert: p.bool("show_alert")? }).await {
        Ok(_) => Ok(true.into()),
        Err(e) if e.code == "QUERY_TOO_OLD" => Err(too_old()),
        Err(e) => Err(node_error(&e)),
    }
}

/// The message `message_id` of `from_chat_id`, as the bot's history has it.
async fn source_message(bot: &Bot, p: &Params) -> Result<(LookupQuery, i64, StoredMessage), TgError> {
    let (to, to_chat, _) = chat_of(bot, p, "chat_id").await?;
    let (from, from_chat, _) = chat_of(bot, p, "from_chat_id").await?;
    let id = message_of(bot, from_chat, p.required_int("message_id")?, "message to forward not found")?;
    let (messages, _) = bot.node.messages(Some(from)).await.map_err(|e| node_error(&e))?;
    let found = messages.into_iter().find(|m| m.id == id && !m.deleted);
    let found = found.ok_or_else(|| TgError::bad_request("message to forward not found"))?;
    Ok((to, to_chat, found))
}

async fn forward(bot: &Bot, p: &Params) -> Result<Value, TgError> {
    let (to, _, original) = source_message(bot, p).await?;
    match bot.node.call(Call::Forward { message: original.id, to }).await {
        Ok(Reply::Message { message }) => {
            let mut json = bot.message_json(&message).await?;
            json["forward_origin"] = json!({"type": "user", "sender_user": bot.user(original.from).await, "date": original.sent_at_ms / 1000});
            Ok(json)
        }
        Ok(other) => Err(TgError::internal(ApiError::unexpected("forward", &other))),
        Err(e) => Err(node_error(&e)),
    }
}

async fn copy(bot: &Bot, p: &Params) -> Result<Value, TgError> {
    let (to, to_chat, original) = source_message(bot, p).await?;
    let reply_to = reply_of(bot, to_chat, p)?;
    // The copy keeps the original's formatting unless a file's caption is replaced (a text
    // has no caption to replace), never its keyboard: `reply_markup` gives it one.
    let original_entities = || original.extras.iter().flat_map(|e| &e.entities).map(rich::entity_json).collect();
    let (text, entities) = match &original.file {
        Some(_) if p.has("caption") => {
            let caption = formatted(p, "caption", "parse_mode", "caption_entities")?;
            (caption.text, caption.entities)
        }
        _ => (original.text.clone(), original_entities()),
    };
    if original.file.is_none() {
        check_text(&text)?;
    }
    let extras = extras_of(p, &entities)?;
    let file = original.file.map(|f| *f);
    let sent_now = send_rich(bot, to, text, file, extras, reply_to).await?;
    let number = bot.number(to_chat, sent_now.id).await?;
    Ok(json!({ "message_id": number }))
}
