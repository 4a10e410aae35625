//! One bot's persistent Bot API state (redb, next to its client profile): the update queue with
//! increasing `update_id`s, the Bot API's small per-chat message numbers for Meshgram's message
//! ids, and which received messages (and which versions of them) became updates already.
//!
//! An update is written in the same transaction that marks its message as turned into one, so a
//! SIGKILL at any moment neither loses an update (the history still has the message, and the
//! bridge looks again at start) nor makes one twice.

use std::path::Path;

use meshgram_node::proto::payload::MessageId;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde_json::Value;

/// update_id → the Update as JSON.
const UPDATES: TableDefinition<u64, &[u8]> = TableDefinition::new("updates");
/// Message id → (chat id, Bot API message number).
const NUMBERS: TableDefinition<&[u8; 16], (i64, i32)> = TableDefinition::new("message_numbers");
/// (chat id, message number) → message id.
const MESSAGES: TableDefinition<(i64, i32), &[u8; 16]> = TableDefinition::new("numbered_messages");
/// Chat id → the last message number given in it.
const LAST_NUMBER: TableDefinition<i64, i32> = TableDefinition::new("last_message_number");
/// Received message id → the hash of the version last turned into an update.
const OFFERED: TableDefinition<&[u8; 16], u64> = TableDefinition::new("offered_messages");
/// Small settings: the next update id (8 bytes), and JSON ones (see [`BotStore::setting`]).
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// A group's chat number (in the bot's history) → its Bot API chat id, and back.
const GROUP_CHAT_IDS: TableDefinition<u64, i64> = TableDefinition::new("group_chat_ids");
const GROUP_CHATS: TableDefinition<i64, u64> = TableDefinition::new("group_chats");

const NEXT_UPDATE: &str = "next_update_id";
const NEXT_GROUP: &str = "next_group";
/// Groups' Bot API ids count down from here, shaped like Telegram's supergroup ids and far
/// inside the 52 bits a JavaScript bot reads exactly.
const FIRST_GROUP_CHAT_ID: i64 = -1_000_000_000_001;

/// The store failed (disk, corruption): the request is answered with a server error and
/// nothing is confirmed.
#[derive(Debug, thiserror::Error)]
#[error("bot store: {0}")]
pub(crate) struct StoreError(String);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// What a received message version is, compared with what was offered before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offer {
    /// First seen: a `message` update.
    New,
    /// Seen before with other content: an `edited_message` update.
    Edited,
    /// Already turned into an update.
    Known,
}

/// One bot's store.
#[derive(Debug)]
pub(crate) struct BotStore {
    db: Database,
}

impl BotStore {
    pub(crate) fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(err)?;
        let tx = db.begin_write().map_err(err)?;
        tx.open_table(UPDATES).map_err(err)?;
        tx.open_table(NUMBERS).map_err(err)?;
        tx.open_table(MESSAGES).map_err(err)?;
        tx.open_table(LAST_NUMBER).map_err(err)?;
        tx.open_table(OFFERED).map_err(err)?;
        tx.open_table(META).map_err(err)?;
        tx.open_table(GROUP_CHAT_IDS).map_err(err)?;
        tx.open_table(GROUP_CHATS).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(BotStore { db })
    }

    /// The message numbers of these messages, each in its chat, given now (in one
    /// transaction) to those that have none.
    pub(crate) fn numbers(&self, wanted: &[(i64, MessageId)]) -> Result<Vec<i32>, StoreError> {
        {
            // Most are numbered already (a reply's message, a message shown again): no write.
            let tx = self.db.begin_read().map_err(err)?;
            let numbers = tx.open_table(NUMBERS).map_err(err)?;
            let mut found = Vec::with_capacity(wanted.len());
            for (_, id) in wanted {
                match numbers.get(&id.0).map_err(err)? {
                    Some(v) => found.push(v.value().1),
                    None => break,
                }
            }
            if found.len() == wanted.len() {
                return Ok(found);
            }
        }
        let tx = self.db.begin_write().map_err(err)?;
        let numbers = wanted.iter().map(|(chat, id)| number_in(&tx, *chat, *id)).collect::<Result<Vec<_>, _>>()?;
        tx.commit().map_err(err)?;
        Ok(numbers)
    }

    /// The message numbered `number` in `chat`.
    pub(crate) fn message_id(&self, chat: i64, number: i32) -> Result<Option<MessageId>, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let table = tx.open_table(MESSAGES).map_err(err)?;
        Ok(table.get((chat, number)).map_err(err)?.map(|v| MessageId(*v.value())))
    }

    /// Whether this version of a received message became an update already.
    pub(crate) fn offered(&self, id: MessageId, version: u64) -> Result<bool, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let offered = tx.open_table(OFFERED).map_err(err)?;
        Ok(offered.get(&id.0).map_err(err)?.is_some_and(|v| v.value() == version))
    }

    /// Turns a received message version into an update unless it was already: `build` makes
    /// the update's body from the offer and the message number. Returns whether one was queued.
    pub(crate) fn offer(
        &self,
        chat: i64,
        id: MessageId,
        version: u64,
        build: impl FnOnce(Offer, i32) -> Option<Value>,
    ) -> Result<bool, StoreError> {
        let tx = self.db.begin_write().map_err(err)?;
        let offer = {
            let offered = tx.open_table(OFFERED).map_err(err)?;
            match offered.get(&id.0).map_err(err)?.map(|v| v.value()) {
                None => Offer::New,
                Some(seen) if seen != version => Offer::Edited,
                Some(_) => Offer::Known,
            }
        };
        if offer == Offer::Known {
            return Ok(false);
        }
        let number = number_in(&tx, chat, id)?;
        tx.open_table(OFFERED).map_err(err)?.insert(&id.0, version).map_err(err)?;
        let queued = match build(offer, number) {
            Some(update) => {
                queue(&tx, update)?;
                true
            }
            None => false,
        };
        tx.commit().map_err(err)?;
        Ok(queued)
    }

    /// Queues the update of an event that happens once (a button press, by its id) unless it
    /// was queued already. Returns whether it was queued now.
    pub(crate) fn offer_once(&self, id: [u8; 16], update: Value) -> Result<bool, StoreError> {
        let tx = self.db.begin_write().map_err(err)?;
        // Press ids and message ids are random 128-bit ids: they share the table.
        if tx.open_table(OFFERED).map_err(err)?.insert(&id, 0).map_err(err)?.is_some() {
            return Ok(false);
        }
        queue(&tx, update)?;
        tx.commit().map_err(err)?;
        Ok(true)
    }

    /// Confirms (deletes) every update below `offset`; a negative offset keeps only the last
    /// `-offset` updates. Then returns up to `limit` of those left, oldest first, of the
    /// allowed kinds (`None`: all).
    pub(crate) fn updates(
        &self,
        offset: Option<i64>,
        limit: usize,
        allowed: Option<&[String]>,
    ) -> Result<Vec<Value>, StoreError> {
        let tx = self.db.begin_write().map_err(err)?;
        let mut found = Vec::new();
        {
            let mut table = tx.open_table(UPDATES).map_err(err)?;
            let below = match offset {
                Some(offset) if offset >= 0 => Some(offset as u64),
                Some(offset) => {
                    // The last |offset| updates stay: confirm everything before them.
                    let keep = offset.unsigned_abs();
                    let mut newest = table.iter().map_err(err)?.rev();
                    let mut cut = None;
                    for _ in 0..keep {
                        match newest.next() {
                            Some(entry) => cut = Some(entry.map_err(err)?.0.value()),
                            None => break,
                        }
                    }
                    cut
                }
                None => None,
            };
            if let Some(below) = below {
                table.retain_in(..below, |_, _| false).map_err(err)?;
            }
            for entry in table.iter().map_err(err)? {
                if found.len() >= limit {
                    break;
                }
                let (_, json) = entry.map_err(err)?;
                let update: Value = serde_json::from_slice(json.value()).map_err(err)?;
                if allowed.is_none_or(|allowed| allowed.iter().any(|kind| update.get(kind).is_some())) {
                    found.push(update);
                }
            }
        }
        tx.commit().map_err(err)?;
        Ok(found)
    }

    /// The Bot API chat id of a group, by its chat number, given now (the next one down) if it
    /// has none: sequential, so two groups never share one.
    pub(crate) fn group_chat_id(&self, chat_number: u64) -> Result<i64, StoreError> {
        {
            let tx = self.db.begin_read().map_err(err)?;
            if let Some(id) = tx.open_table(GROUP_CHAT_IDS).map_err(err)?.get(chat_number).map_err(err)? {
                return Ok(id.value());
            }
        }
        let tx = self.db.begin_write().map_err(err)?;
        let id = {
            let mut ids = tx.open_table(GROUP_CHAT_IDS).map_err(err)?;
            if let Some(id) = ids.get(chat_number).map_err(err)?.map(|v| v.value()) {
                id
            } else {
                let mut meta = tx.open_table(META).map_err(err)?;
                let given = match meta.get(NEXT_GROUP).map_err(err)? {
                    Some(v) => {
                        u64::from_le_bytes(v.value().try_into().map_err(|_| StoreError("bad next group".into()))?)
                    }
                    None => 0,
                };
                meta.insert(NEXT_GROUP, given.saturating_add(1).to_le_bytes().as_slice()).map_err(err)?;
                let id = FIRST_GROUP_CHAT_ID.saturating_sub(i64::try_from(given).unwrap_or(i64::MAX));
                ids.insert(chat_number, id).map_err(err)?;
                tx.open_table(GROUP_CHATS).map_err(err)?.insert(id, chat_number).map_err(err)?;
                id
            }
        };
        tx.commit().map_err(err)?;
        Ok(id)
    }

    /// The chat number of the group with this Bot API chat id, if it has been given.
    pub(crate) fn group_chat_number(&self, chat_id: i64) -> Result<Option<u64>, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        Ok(tx.open_table(GROUP_CHATS).map_err(err)?.get(chat_id).map_err(err)?.map(|v| v.value()))
    }

    /// Confirms (deletes) the update `update_id` and every one before it, as a `getUpdates`
    /// with the next offset would.
    pub(crate) fn confirm(&self, update_id: u64) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(err)?;
        tx.open_table(UPDATES).map_err(err)?.retain_in(..=update_id, |_, _| false).map_err(err)?;
        tx.commit().map_err(err)
    }

    /// Drops every pending update (`deleteWebhook` with `drop_pending_updates`).
    pub(crate) fn drop_pending(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(err)?;
        tx.open_table(UPDATES).map_err(err)?.retain(|_, _| false).map_err(err)?;
        tx.commit().map_err(err)
    }

    pub(crate) fn pending_count(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        tx.open_table(UPDATES).map_err(err)?.len().map_err(err)
    }

    /// A small setting (JSON), e.g. the allowed update kinds or a scope's commands.
    pub(crate) fn setting(&self, key: &str) -> Result<Option<Value>, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let table = tx.open_table(META).map_err(err)?;
        match table.get(key).map_err(err)? {
            Some(v) => serde_json::from_slice(v.value()).map(Some).map_err(err),
            None => Ok(None),
        }
    }

    /// Sets (or, with `None`, removes) a setting.
    pub(crate) fn set_setting(&self, key: &str, value: Option<&Value>) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(err)?;
        {
            let mut table = tx.open_table(META).map_err(err)?;
            match value {
                Some(value) => {
                    let json = serde_json::to_vec(value).map_err(err)?;
                    table.insert(key, json.as_slice()).map_err(err)?;
                }
                None => {
                    table.remove(key).map_err(err)?;
                }
            }
        }
        tx.commit().map_err(err)
    }
}

fn number_in(tx: &redb::WriteTransaction, chat: i64, id: MessageId) -> Result<i32, StoreError> {
    let mut numbers = tx.open_table(NUMBERS).map_err(err)?;
    if let Some(found) = numbers.get(&id.0).map_err(err)? {
        return Ok(found.value().1);
    }
    let mut last = tx.open_table(LAST_NUMBER).map_err(err)?;
    let number = last.get(chat).map_err(err)?.map_or(0, |v| v.value()).saturating_add(1);
    last.insert(chat, number).map_err(err)?;
    numbers.insert(&id.0, (chat, number)).map_err(err)?;
    tx.open_table(MESSAGES).map_err(err)?.insert((chat, number), &id.0).map_err(err)?;
    Ok(number)
}

fn queue(tx: &redb::WriteTransaction, mut update: Value) -> Result<(), StoreError> {
    let update_id = next_update_id(tx)?;
    update["update_id"] = update_id.into();
    let json = serde_json::to_vec(&update).map_err(err)?;
    tx.open_table(UPDATES).map_err(err)?.insert(update_id, json.as_slice()).map_err(err)?;
    Ok(())
}

fn next_update_id(tx: &redb::WriteTransaction) -> Result<u64, StoreError> {
    let mut meta = tx.open_table(META).map_err(err)?;
    let next = match meta.get(NEXT_UPDATE).map_err(err)? {
        Some(v) => u64::from_le_bytes(v.value().try_into().map_err(|_| StoreError("bad next update id".into()))?),
        None => 1,
    };
    meta.insert(NEXT_UPDATE, next.saturating_add(1).to_le_bytes().as_slice()).map_err(err)?;
    Ok(next)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn updates_are_confirmed_by_offset_and_never_made_twice() {
        let dir = tempfile::tempdir().unwrap();
        let store = BotStore::open(&dir.path().join("bot.redb")).unwrap();
        let (a, b) = (MessageId::random(), MessageId::random());
        let update = |offer: Offer, n: i32| Some(serde_json::json!({ format!("{offer:?}"): n }));
        assert!(store.offer(7, a, 1, update).unwrap());
        assert!(!store.offer(7, a, 1, update).unwrap(), "the same version again is no update");
        assert!(store.offer(7, a, 2, update).unwrap(), "an edit is one");
        assert!(store.offer(7, b, 1, update).unwrap());
        let all = store.updates(None, 100, None).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0]["New"], 1);
        assert_eq!(all[1]["Edited"], 1);
        assert_eq!(all[2]["New"], 2, "the chat's second message");
        let first = all[0]["update_id"].as_u64().unwrap();
        assert_eq!(store.updates(Some(first as i64 + 1), 100, None).unwrap().len(), 2);
        assert_eq!(store.updates(Some(-1), 100, None).unwrap().len(), 1, "only the last one stays");
        drop(store);
        let store = BotStore::open(&dir.path().join("bot.redb")).unwrap();
        assert_eq!(store.pending_count().unwrap(), 1);
        let c = MessageId::random();
        assert_eq!(store.numbers(&[(7, b), (7, c), (8, c)]).unwrap(), [2, 3, 3], "given once, in its first chat");
        assert_eq!(store.message_id(7, 2).unwrap(), Some(b));
        assert!(store.offer(7, MessageId::random(), 0, update).unwrap());
        let newest = store.updates(None, 100, None).unwrap().pop().unwrap();
        assert!(newest["update_id"].as_u64().unwrap() > first + 2, "update ids keep growing across restarts");
        let (g1, g2) = (store.group_chat_id(1 << 63 | 5).unwrap(), store.group_chat_id(1 << 63 | 6).unwrap());
        assert_eq!((g1, g2), (FIRST_GROUP_CHAT_ID, FIRST_GROUP_CHAT_ID - 1), "one id each, in order");
        assert_eq!(store.group_chat_id(1 << 63 | 5).unwrap(), g1);
        assert_eq!(store.group_chat_number(g2).unwrap(), Some(1 << 63 | 6));
        let press = [9; 16];
        assert!(store.offer_once(press, serde_json::json!({"callback_query": {}})).unwrap());
        assert!(!store.offer_once(press, serde_json::json!({"callback_query": {}})).unwrap(), "once");
    }
}
