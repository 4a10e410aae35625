//! Groups from a client's side: end-to-end encrypted for the members, each message stored once
//! per group on the relays (`proto::group`), read by every member from a cursor of its own.
//!
//! - **State.** A group is what its latest [`GroupState`] says: title, description, members
//!   and admins, invite links, the pin. Only admins change it. A change makes a new version
//!   that the admin's device sends whole, pairwise (the ordinary one-to-one seal), to every
//!   member device, with the current epoch key; admins' devices also get the admin key. A device
//!   accepts a version only if it is newer than the one it holds and comes from someone who is
//!   an admin in that one, so a member cannot forge an admin's action.
//! - **Keys.** A change of members starts a new epoch with a fresh random key (`crypto::group`):
//!   removed members are not sent it, so they cannot read what follows; new members get only
//!   it, so they cannot read what came before. Right after, the admin posts a
//!   [`Body::GroupChanged`] under the new epoch: relays learn the epoch from it and refuse posts
//!   under the old one from then on.
//! - **Messages.** Texts, files, replies, edits, deletes and read receipts are [`Body`]s sealed
//!   once for the group and posted to its relays; they go through the same outbox as one-to-one
//!   messages. Received ones land in the same history (under [`GroupId::chat_number`]), so
//!   `messages`, `chats`, edits and the rest work on groups as on people.
//! - **Joining by link.** A link carries the group id, the admin who made it and a secret whose
//!   hash is in the state. `join` asks that admin's devices, pairwise; the admin's device (its
//!   client node, or its next command) checks the secret against the state and adds the user
//!   as any add does. Revoking the link takes its hash out of the state. Leaving asks the admins
//!   the same way; an admin's device then removes the leaver with a re-key.
//! - **Channels** are groups whose post key is the admin key (only admins post) and whose
//!   subscribers are not in the state: the state is posted to the channel itself, a public
//!   channel's link carries its key, a private one's subscribers are let in by an admin's
//!   device, which also counts subscribers (docs/DECISIONS.md, "Channels").
//! - **Concurrency.** The client node's receivers and its call handler share the history; each
//!   change to a group's record is one redb write transaction (read, change, write), and
//!   cursors live in a table of their own, so a cursor moving never undoes a state change.

use std::collections::HashMap;

use libp2p::PeerId;
use libp2p::identity::ed25519;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::client::history::{History, HistoryError, StoredMessage, change_of};
use crate::client::messaging::{Draft, Inbox, MessagingError, Messenger};
use crate::crypto::group::{EpochKey, GroupCryptoError};
use crate::defaults::{CARD_FRESH_SECS, CARD_TRUST_SECS, RELAY_ANSWER_DEADLINE};
use crate::ids::{UserId, now_ms};
use crate::net::placement;
use crate::proto::envelope::{Envelope, EnvelopeId};
use crate::proto::group::{
    GroupBatch, GroupCursor, GroupId, GroupKind, GroupSeal, GroupState, Invite, MAX_GROUP_DESCRIPTION_CHARS,
    MAX_GROUP_INVITES, MAX_GROUP_MEMBERS, MAX_GROUP_TITLE_CHARS, MAX_GROUPS_PER_FETCH, Member, PostCert,
};
use crate::proto::payload::{Body, MessageId, Payload, Seed, Status};
use crate::proto::{LookupQuery, MAX_ENVELOPES_PER_BATCH, MailboxRequest, MailboxResponse, RelayInfo};

/// Chat number → [`GroupRecord`].
const GROUPS: TableDefinition<u64, &[u8]> = TableDefinition::new("groups");
/// (chat number, relay peer id) → the arrival number to read that group from on that relay.
const GROUP_CURSORS: TableDefinition<(u64, &[u8]), u64> = TableDefinition::new("group_cursors");
/// Group messages that could not be opened yet (their epoch's key is on its way; the sender's
/// card could not be fetched): (chat number, envelope id) → the envelope.
const GROUP_WAITING: TableDefinition<(u64, &[u8; 16]), &[u8]> = TableDefinition::new("group_waiting");
/// Waiting messages kept per group at most; the oldest go first.
const MAX_WAITING_PER_GROUP: usize = 2000;
/// Epoch keys kept per group: messages of the epochs before a change may still be in flight.
const KEEP_EPOCHS: usize = 4;
/// What invite links start with.
pub const LINK_PREFIX: &str = "meshgram:join/";
/// Relays a group is read from at most per round (closest first; the first that answers).
const GROUP_RELAYS_TRIED: usize = 3;

/// Why a group operation could not be done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    #[error("no group {0} on this device")]
    Unknown(GroupId),
    #[error("you are not a member of group {0}")]
    NotMember(GroupId),
    #[error("only admins of group {group} may {what}")]
    NotAdmin { group: GroupId, what: &'static str },
    #[error("{0}")]
    Invalid(String),
    #[error("'{0}' is not an invite link (meshgram:join/…)")]
    BadLink(String),
    #[error("that invite link of group {0} is not open (revoked, or never made here)")]
    LinkNotOpen(GroupId),
}

/// A group as this device holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub state: GroupState,
    /// The epoch keys held, oldest first (at most [`KEEP_EPOCHS`]).
    pub keys: Vec<(u64, EpochKey)>,
    /// The admin key's seed, on admins' devices.
    pub admin_seed: Option<Seed>,
    /// The first epoch this device was given: older messages are not for it.
    pub joined_epoch: u64,
    /// False once removed or left.
    pub active: bool,
    /// This device made the current state and has not yet delivered it to every member (it
    /// does so again until it has); removed users to tell.
    pub unpublished: Option<Vec<UserId>>,
    /// Secrets of the invite links this device made (the state holds their hashes).
    pub links: Vec<[u8; 16]>,
    /// Join and leave requests for this admin's device to apply.
    pub requests: Vec<GroupRequest>,
    /// The admin-signed post certificate of the current epoch (see `proto::group`).
    pub cert: Option<PostCert>,
    /// A public channel's subscriber: the admin whose device counts this subscription.
    pub counted_by: Option<UserId>,
}

/// A member's request an admin's device applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupRequest {
    Join(UserId),
    Leave(UserId),
}

impl GroupRecord {
    pub fn current_key(&self) -> Option<&EpochKey> {
        self.keys.iter().find(|(epoch, _)| *epoch == self.state.epoch).map(|(_, key)| key)
    }

    fn key_of(&self, epoch: u64) -> Option<&EpochKey> {
        self.keys.iter().find(|(e, _)| *e == epoch).map(|(_, key)| key)
    }

    fn admin_keypair(&self) -> Option<ed25519::Keypair> {
        let mut seed = self.admin_seed?.0;
        let secret = ed25519::SecretKey::try_from_bytes(&mut seed).ok()?;
        Some(ed25519::Keypair::from(secret))
    }

    fn add_key(&mut self, epoch: u64, key: EpochKey) {
        if self.key_of(epoch).is_none() {
            self.keys.push((epoch, key));
            self.keys.sort_by_key(|(e, _)| *e);
            let extra = self.keys.len().saturating_sub(KEEP_EPOCHS);
            self.keys.drain(..extra);
        }
    }
}

/// A group as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    pub id: GroupId,
    /// "group" or "channel".
    pub kind: String,
    /// A channel anyone with its link reads.
    pub public: bool,
    /// A channel's subscribers, as its admin's device counts them.
    pub subscribers: u64,
    pub title: String,
    pub description: String,
    pub members: Vec<MemberInfo>,
    pub version: u64,
    pub epoch: u64,
    pub pinned: Option<MessageId>,
    /// Whether this account is still in it.
    pub active: bool,
    pub admin: bool,
    /// The open invite links this device made.
    pub links: Vec<String>,
    /// The state is this device's and not yet delivered to every member.
    pub unpublished: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub user: UserId,
    pub name: String,
    pub admin: bool,
}

/// A change an admin makes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum GroupChange {
    Add { users: Vec<LookupQuery> },
    Remove { users: Vec<LookupQuery> },
    Title { title: String },
    Description { description: String },
    Admin { user: LookupQuery, admin: bool },
    Pin { message: Option<MessageId> },
    RevokeLink { link: String },
}

impl GroupChange {
    /// What only admins may do, for refusals.
    fn what(&self) -> &'static str {
        match self {
            GroupChange::Add { .. } => "add members",
            GroupChange::Remove { .. } => "remove members",
            GroupChange::Title { .. } | GroupChange::Description { .. } => "change the group's info",
            GroupChange::Admin { .. } => "make or unmake admins",
            GroupChange::Pin { .. } => "pin messages",
            GroupChange::RevokeLink { .. } => "revoke invite links",
        }
    }
}

/// An invite link, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub group: GroupId,
    pub admin: UserId,
    pub secret: [u8; 16],
}

impl Link {
    fn hash(secret: &[u8; 16]) -> [u8; 32] {
        *blake3::hash(secret).as_bytes()
    }
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{LINK_PREFIX}{}/{}/{}", self.group, self.admin, crate::ids::hex(&self.secret))
    }
}

impl std::str::FromStr for Link {
    type Err = GroupError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || GroupError::BadLink(s.to_string());
        let rest = s.trim().strip_prefix(LINK_PREFIX).ok_or_else(bad)?;
        let mut parts = rest.split('/');
        let (Some(group), Some(admin), Some(secret), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        Ok(Link {
            group: group.parse().map_err(|_| bad())?,
            admin: admin.parse().map_err(|_| bad())?,
            secret: crate::ids::parse_hex::<16>(secret).map_err(|_| bad())?,
        })
    }
}

/// The profile's groups, in its history's database (open for tests and tools to read).
#[derive(Debug, Clone)]
pub struct Groups {
    history: History,
}

impl Groups {
    pub fn open(history: &History) -> Result<Self, HistoryError> {
        let tx = history.db().begin_write()?;
        tx.open_table(GROUPS)?;
        tx.open_table(GROUP_CURSORS)?;
        tx.open_table(GROUP_WAITING)?;
        tx.open_table(CHANNEL_SUBSCRIBERS)?;
        tx.commit()?;
        Ok(Groups { history: history.clone() })
    }

    pub fn get(&self, chat: UserId) -> Result<Option<GroupRecord>, HistoryError> {
        let tx = self.history.db().begin_read()?;
        Ok(tx.open_table(GROUPS)?.get(chat.0)?.and_then(|v| postcard::from_bytes(v.value()).ok()))
    }

    pub fn all(&self) -> Result<Vec<GroupRecord>, HistoryError> {
        let tx = self.history.db().begin_read()?;
        let mut out = Vec::new();
        for entry in tx.open_table(GROUPS)?.iter()? {
            match postcard::from_bytes(entry?.1.value()) {
                Ok(record) => out.push(record),
                Err(e) => tracing::warn!(error = %e, "skipping a corrupt group record"),
            }
        }
        Ok(out)
    }

    /// The account's groups as another of its devices should get them (with a history
    /// export): everything it needs to read and post, and to admin if the account does, but
    /// none of this device's own work in hand (a state to deliver, requests to apply), which
    /// stays with this device.
    pub fn for_another_device(&self) -> Result<Vec<GroupRecord>, HistoryError> {
        let mut records = self.all()?;
        for record in &mut records {
            record.unpublished = None;
            record.requests.clear();
        }
        Ok(records)
    }

    /// Takes the groups another device of the account exported, in one transaction: one not
    /// here is added; for one here, the newer state wins, and the keys, invite links and
    /// admin key either side has are kept. Returns how many records changed.
    pub fn import(&self, records: &[GroupRecord]) -> Result<u64, HistoryError> {
        let tx = self.history.db().begin_write()?;
        let mut changed = 0;
        {
            let mut table = tx.open_table(GROUPS)?;
            for theirs in records {
                if GroupId::of_admin_key(&theirs.state.admin_key) != theirs.state.group {
                    tracing::warn!(group = %theirs.state.group, "an imported group's id is not its admin key's; skipped");
                    continue;
                }
                let chat = theirs.state.group.chat_number();
                let here: Option<GroupRecord> = table.get(chat.0)?.and_then(|v| postcard::from_bytes(v.value()).ok());
                let merged = match here.clone() {
                    None => GroupRecord { unpublished: None, requests: Vec::new(), ..theirs.clone() },
                    // Left here: another device's older record does not bring it back.
                    Some(mine) if !mine.active => continue,
                    Some(mut mine) => {
                        if theirs.state.group != mine.state.group {
                            continue;
                        }
                        if theirs.state.version > mine.state.version {
                            (mine.state, mine.active, mine.cert) =
                                (theirs.state.clone(), theirs.active, theirs.cert.clone());
                        }
                        for (epoch, key) in &theirs.keys {
                            mine.add_key(*epoch, *key);
                        }
                        mine.joined_epoch = mine.joined_epoch.min(theirs.joined_epoch);
                        mine.admin_seed = mine.admin_seed.or(theirs.admin_seed);
                        mine.counted_by = mine.counted_by.or(theirs.counted_by);
                        for link in &theirs.links {
                            if !mine.links.contains(link) {
                                mine.links.push(*link);
                            }
                        }
                        mine
                    }
                };
                if here.as_ref() != Some(&merged) {
                    let bytes = postcard::to_stdvec(&merged).expect("invariant: group records serialize");
                    table.insert(chat.0, bytes.as_slice())?;
                    changed += 1;
                }
            }
        }
        tx.commit()?;
        Ok(changed)
    }

    /// Reads, changes and writes one group's record in one transaction; `change` returns what
    /// the caller wants back, or `None` to write nothing.
    pub(crate) fn update<T>(
        &self,
        chat: UserId,
        change: impl FnOnce(Option<GroupRecord>) -> Option<(GroupRecord, T)>,
    ) -> Result<Option<T>, HistoryError> {
        let tx = self.history.db().begin_write()?;
        let out = {
            let mut table = tx.open_table(GROUPS)?;
            let before = table.get(chat.0)?.and_then(|v| postcard::from_bytes(v.value()).ok());
            match change(before) {
                Some((record, out)) => {
                    let bytes = postcard::to_stdvec(&record).expect("invariant: group records serialize");
                    table.insert(chat.0, bytes.as_slice())?;
                    Some(out)
                }
                None => None,
            }
        };
        tx.commit()?;
        Ok(out)
    }

    fn cursor(&self, chat: UserId, relay: &PeerId) -> Result<u64, HistoryError> {
        let tx = self.history.db().begin_read()?;
        let key = relay.to_bytes();
        Ok(tx.open_table(GROUP_CURSORS)?.get((chat.0, key.as_slice()))?.map(|v| v.value()).unwrap_or(0))
    }

    fn set_cursor(&self, chat: UserId, relay: &PeerId, next: u64) -> Result<(), HistoryError> {
        let tx = self.history.db().begin_write()?;
        let key = relay.to_bytes();
        tx.open_table(GROUP_CURSORS)?.insert((chat.0, key.as_slice()), next)?;
        tx.commit()?;
        Ok(())
    }

    fn wait(&self, chat: UserId, envelope: &Envelope) -> Result<(), HistoryError> {
        let tx = self.history.db().begin_write()?;
        {
            let mut table = tx.open_table(GROUP_WAITING)?;
            let bytes = postcard::to_stdvec(envelope).expect("invariant: envelopes serialize");
            table.insert((chat.0, &envelope.id.0), bytes.as_slice())?;
            let held: Vec<[u8; 16]> = table
                .range((chat.0, &[0u8; 16])..=(chat.0, &[0xffu8; 16]))?
                .filter_map(|e| e.ok().map(|(k, _)| *k.value().1))
                .collect();
            // Ids lead with the sender's clock: the first are the oldest.
            for id in held.iter().take(held.len().saturating_sub(MAX_WAITING_PER_GROUP)) {
                table.remove((chat.0, id))?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The group's messages waiting to be opened; each stays until [`Groups::unwait`].
    fn waiting(&self, chat: UserId) -> Result<Vec<Envelope>, HistoryError> {
        let tx = self.history.db().begin_read()?;
        let table = tx.open_table(GROUP_WAITING)?;
        let mut out = Vec::new();
        for entry in table.range((chat.0, &[0u8; 16])..=(chat.0, &[0xffu8; 16]))? {
            if let Ok(envelope) = postcard::from_bytes::<Envelope>(entry?.1.value()) {
                out.push(envelope);
            }
        }
        Ok(out)
    }

    /// A waiting message was opened (or dropped) at last.
    fn unwait(&self, chat: UserId, id: &EnvelopeId) -> Result<(), HistoryError> {
        let tx = self.history.db().begin_write()?;
        tx.open_table(GROUP_WAITING)?.remove((chat.0, &id.0))?;
        tx.commit()?;
        Ok(())
    }
}

/// What opening one group message gave.
enum Opened {
    /// Verified: apply it.
    Message { plain: Box<crate::crypto::group::GroupPlain> },
    /// Not for this device (from before it joined, or of an epoch whose key is gone): seen.
    NotForUs,
    /// Cannot be opened yet: kept to be tried again.
    Later,
    /// Definitively bad: dropped and counted.
    Bad(String),
}

impl Messenger {
    pub(crate) fn groups(&mut self) -> Result<&Groups, MessagingError> {
        self.history()?;
        Ok(self.g())
    }

    fn group_record(&mut self, group: &GroupId) -> Result<GroupRecord, MessagingError> {
        self.groups()?.get(group.chat_number())?.ok_or_else(|| GroupError::Unknown(*group).into())
    }

    fn active_group(&mut self, group: &GroupId) -> Result<GroupRecord, MessagingError> {
        let record = self.group_record(group)?;
        if !record.active {
            return Err(GroupError::NotMember(*group).into());
        }
        Ok(record)
    }

    /// Whether a chat number is a channel's.
    pub(crate) fn is_channel(&mut self, chat: UserId) -> Result<bool, MessagingError> {
        Ok(crate::proto::group::is_group_chat(chat) && self.groups()?.get(chat)?.is_some_and(|r| r.state.is_channel()))
    }

    /// Checks that this account may post to `group` (before a long upload for it, say).
    pub(crate) fn check_group_member(&mut self, group: &GroupId) -> Result<(), MessagingError> {
        self.active_group(group).map(drop)
    }

    /// Creates a group with this account as its only admin and `members` in it.
    pub async fn group_create(
        &mut self,
        title: String,
        members: Vec<LookupQuery>,
    ) -> Result<GroupInfo, MessagingError> {
        self.create(title, members, GroupKind::Group).await
    }

    /// Creates a channel with this account as its admin: public (its link lets anyone read) or
    /// private (an admin's device lets each subscriber in).
    pub async fn channel_create(&mut self, title: String, public: bool) -> Result<GroupInfo, MessagingError> {
        self.create(title, Vec::new(), GroupKind::Channel { public }).await
    }

    async fn create(
        &mut self,
        title: String,
        members: Vec<LookupQuery>,
        kind: GroupKind,
    ) -> Result<GroupInfo, MessagingError> {
        check_title(&title)?;
        let me = self.me();
        let mut users = vec![Member { user: me, admin: true }];
        for query in members {
            let card = self.card(query, CARD_FRESH_SECS).await?;
            if !users.iter().any(|m| m.user == card.user_id) {
                users.push(Member { user: card.user_id, admin: false });
            }
        }
        if users.len() > MAX_GROUP_MEMBERS {
            return Err(GroupError::Invalid(format!("a group has at most {MAX_GROUP_MEMBERS} members")).into());
        }
        let admin = ed25519::Keypair::generate();
        let admin_key = admin.public().to_bytes();
        let group = GroupId::of_admin_key(&admin_key);
        let state = GroupState {
            group,
            admin_key,
            version: 1,
            epoch: 0,
            title,
            description: String::new(),
            members: users,
            invites: Vec::new(),
            pinned: None,
            changed_by: me,
            kind,
            subscribers: 0,
        };
        let record = GroupRecord {
            state,
            keys: vec![(0, EpochKey::random())],
            admin_seed: Some(Seed(admin.secret().as_ref().try_into().expect("invariant: ed25519 seeds are 32 bytes"))),
            joined_epoch: 0,
            active: true,
            unpublished: Some(Vec::new()),
            links: Vec::new(),
            requests: Vec::new(),
            cert: None,
            counted_by: None,
        };
        self.groups()?.update(group.chat_number(), |_| Some((record.clone(), ())))?;
        self.record_state_notice(None, &record.state)?;
        self.groups_changed.notify_one();
        self.publish_group(&group).await?;
        self.group_info(&group)
    }

    /// An admin's change: a new version of the state (a new epoch when members change),
    /// delivered to every member.
    pub async fn group_change(&mut self, group: &GroupId, change: GroupChange) -> Result<GroupInfo, MessagingError> {
        let record = self.active_group(group)?;
        let me = self.me();
        if !record.state.is_admin(me) {
            return Err(GroupError::NotAdmin { group: *group, what: change.what() }.into());
        }
        let mut state = record.state.clone();
        let mut removed = Vec::new();
        let mut rekey = false;
        if state.is_channel() && matches!(change, GroupChange::Add { .. } | GroupChange::Remove { .. }) {
            let why = "a channel's subscribers come and go by its link, and its admins stay as created";
            return Err(GroupError::Invalid(why.into()).into());
        }
        match change {
            GroupChange::Add { users } => {
                for query in users {
                    let card = self.card(query, CARD_FRESH_SECS).await?;
                    if state.member(card.user_id).is_none() {
                        state.members.push(Member { user: card.user_id, admin: false });
                        rekey = true;
                    }
                }
                if state.members.len() > MAX_GROUP_MEMBERS {
                    return Err(GroupError::Invalid(format!("a group has at most {MAX_GROUP_MEMBERS} members")).into());
                }
            }
            GroupChange::Remove { users } => {
                for query in users {
                    let user = self.user_of(query, &state).await?;
                    if user == me {
                        return Err(GroupError::Invalid("to remove yourself, leave the group".into()).into());
                    }
                    if state.member(user).is_none() {
                        return Err(GroupError::Invalid(format!("{user} is not a member")).into());
                    }
                    state.members.retain(|m| m.user != user);
                    state.invites.retain(|i| i.admin != user);
                    removed.push(user);
                    rekey = true;
                }
            }
            GroupChange::Title { title } => {
                check_title(&title)?;
                state.title = title;
            }
            GroupChange::Description { description } => {
                if description.chars().count() > MAX_GROUP_DESCRIPTION_CHARS {
                    let why = format!("a description is at most {MAX_GROUP_DESCRIPTION_CHARS} characters");
                    return Err(GroupError::Invalid(why).into());
                }
                state.description = description;
            }
            GroupChange::Admin { user, admin } => {
                let user = self.user_of(user, &state).await?;
                let Some(member) = state.members.iter_mut().find(|m| m.user == user) else {
                    return Err(GroupError::Invalid(format!("{user} is not a member")).into());
                };
                member.admin = admin;
                if !state.members.iter().any(|m| m.admin) {
                    return Err(GroupError::Invalid("a group keeps at least one admin".into()).into());
                }
                // The admin key is shared by admins: a demoted admin keeps it, so admins' powers
                // at the relays move on with a re-key of the members' key only (see DECISIONS).
            }
            GroupChange::Pin { message } => {
                if let Some(id) = message
                    && self.h().message(&id)?.is_none_or(|m| m.chat != group.chat_number())
                {
                    return Err(GroupError::Invalid(format!("no message {id} in this group")).into());
                }
                state.pinned = message;
            }
            GroupChange::RevokeLink { link } => {
                let link: Link = link.parse()?;
                let hash = Link::hash(&link.secret);
                if link.group != *group || !state.invites.iter().any(|i| i.hash == hash) {
                    return Err(GroupError::LinkNotOpen(*group).into());
                }
                state.invites.retain(|i| i.hash != hash);
            }
        }
        self.change_state(record, state, rekey, removed).await
    }

    /// Makes a new invite link for the group (admins only).
    pub async fn group_link(&mut self, group: &GroupId) -> Result<String, MessagingError> {
        let record = self.active_group(group)?;
        let me = self.me();
        if !record.state.is_admin(me) {
            return Err(GroupError::NotAdmin { group: *group, what: "make invite links" }.into());
        }
        if record.state.invites.len() >= MAX_GROUP_INVITES {
            let why = format!("a group has at most {MAX_GROUP_INVITES} open links; revoke one first");
            return Err(GroupError::Invalid(why).into());
        }
        let secret: [u8; 16] = rand::random();
        let mut state = record.state.clone();
        state.invites.push(Invite { hash: Link::hash(&secret), admin: me });
        self.groups()?.update(group.chat_number(), |r| {
            let mut r = r?;
            r.links.push(secret);
            Some((r, ()))
        })?;
        // `record`, which `state` comes from: a version that came in meanwhile refuses it.
        self.change_state(record, state, false, Vec::new()).await?;
        Ok(Link { group: *group, admin: me, secret }.to_string())
    }

    /// Asks the admin who made `link` to let this account in; the group appears here once
    /// their device has (see the module's notes).
    pub async fn group_join(&mut self, link: &str) -> Result<Link, MessagingError> {
        let link: Link = link.parse()?;
        self.history()?;
        if self.groups()?.get(link.group.chat_number())?.is_some_and(|r| r.active) {
            return Err(GroupError::Invalid(format!("you are in group {} already", link.group)).into());
        }
        let card = self.card(LookupQuery::UserId(link.admin), CARD_FRESH_SECS).await?;
        let body = Body::GroupJoin { group: link.group, secret: link.secret };
        let payload = Payload { message_id: MessageId::random(), chat_with: link.group.chat_number(), body };
        self.send_sealed(&one_device(card), vec![payload], false).await?;
        Ok(link)
    }

    /// Leaves the group: this device forgets its keys at once; the admins' devices re-key it
    /// without this account. The last admin cannot leave while others remain.
    pub async fn group_leave(&mut self, group: &GroupId) -> Result<GroupInfo, MessagingError> {
        let record = self.active_group(group)?;
        let me = self.me();
        let admins: Vec<UserId> =
            record.state.members.iter().filter(|m| m.admin && m.user != me).map(|m| m.user).collect();
        if admins.is_empty() && record.state.members.len() > 1 {
            let why = "you are the group's only admin: make someone else an admin first";
            return Err(GroupError::Invalid(why.into()).into());
        }
        let public_subscriber = record.counted_by.filter(|_| !record.state.is_admin(me));
        let tell = match public_subscriber {
            Some(admin) => vec![admin],
            None => admins,
        };
        for admin in tell {
            let card = self.card(LookupQuery::UserId(admin), CARD_FRESH_SECS).await?;
            let body = match public_subscriber {
                Some(_) => Body::ChannelSubscribe { channel: *group, on: false },
                None => Body::GroupLeave { group: *group },
            };
            let payload = Payload { message_id: MessageId::random(), chat_with: group.chat_number(), body };
            // Our other devices learn it from the admin's removal, like everyone.
            self.send_sealed(&one_device(card), vec![payload], false).await?;
        }
        self.groups()?.update(group.chat_number(), |r| {
            let mut r = r?;
            r.active = false;
            r.keys.clear();
            r.admin_seed = None;
            Some((r, ()))
        })?;
        self.record_notice(group, "left", "You left the group.".into())?;
        self.groups_changed.notify_one();
        self.group_info(group)
    }

    pub fn group_info(&mut self, group: &GroupId) -> Result<GroupInfo, MessagingError> {
        let record = self.group_record(group)?;
        Ok(self.info_of(&record))
    }

    pub fn group_list(&mut self) -> Result<Vec<GroupInfo>, MessagingError> {
        let records = self.groups()?.all()?;
        Ok(records.iter().map(|r| self.info_of(r)).collect())
    }

    fn info_of(&self, record: &GroupRecord) -> GroupInfo {
        let me = self.me();
        let name = |user: UserId| {
            if user == me {
                let a = &self.session.account;
                return crate::client::node::name_or(&a.name, a.username.as_ref(), || me.to_string());
            }
            self.name(user)
        };
        let s = &record.state;
        GroupInfo {
            id: s.group,
            kind: if s.is_channel() { "channel" } else { "group" }.into(),
            public: matches!(s.kind, GroupKind::Channel { public: true }),
            subscribers: s.subscribers,
            title: s.title.clone(),
            description: s.description.clone(),
            members: s
                .members
                .iter()
                .map(|m| MemberInfo { user: m.user, name: name(m.user), admin: m.admin })
                .collect(),
            version: s.version,
            epoch: s.epoch,
            pinned: s.pinned,
            active: record.active,
            admin: record.active && s.is_admin(me),
            links: record
                .links
                .iter()
                .filter(|secret| s.invites.iter().any(|i| i.hash == Link::hash(secret)))
                .map(|secret| Link { group: s.group, admin: me, secret: *secret }.to_string())
                .collect(),
            unpublished: record.unpublished.is_some(),
        }
    }

    /// The user a query names, found among the members first (no gateway needed for them).
    async fn user_of(&mut self, query: LookupQuery, state: &GroupState) -> Result<UserId, MessagingError> {
        if let LookupQuery::UserId(user) = query
            && state.member(user).is_some()
        {
            return Ok(user);
        }
        Ok(self.card(query, CARD_FRESH_SECS).await?.user_id)
    }

    /// Saves `state` as the group's next version (with a fresh epoch key if `rekey`) and
    /// delivers it.
    async fn change_state(
        &mut self,
        record: GroupRecord,
        mut state: GroupState,
        rekey: bool,
        removed: Vec<UserId>,
    ) -> Result<GroupInfo, MessagingError> {
        let group = state.group;
        let before = record.state.clone();
        let exhausted = || GroupError::Invalid("the group's versions are used up".into());
        state.version = before.version.checked_add(1).ok_or_else(exhausted)?;
        state.changed_by = self.me();
        if rekey {
            state.epoch = before.epoch.checked_add(1).ok_or_else(exhausted)?;
        }
        let new_key = EpochKey::random();
        let saved = self.groups()?.update(group.chat_number(), |r| {
            let mut r = r?;
            // Someone else's newer version came in meanwhile: this change is refused, not merged.
            if r.state.version != before.version || !r.active {
                return None;
            }
            if rekey {
                r.add_key(state.epoch, new_key);
            }
            r.state = state.clone();
            let mut to_tell = r.unpublished.take().unwrap_or_default();
            to_tell.extend(removed.iter().copied());
            r.unpublished = Some(to_tell);
            Some((r, ()))
        })?;
        if saved.is_none() {
            return Err(GroupError::Invalid("the group changed meanwhile; look at it again and retry".into()).into());
        }
        self.record_state_notice(Some(&before), &state)?;
        match self.publish_group(&group).await {
            Ok(()) => {}
            // Saved: the node delivers it when the relays or the gateway are back.
            Err(e) if e.may_pass() => tracing::warn!(%group, error = %e, "the group's new state waits to be delivered"),
            Err(e) => return Err(e),
        }
        self.group_info(&group)
    }

    /// Delivers this device's unpublished state of `group` to every member device, tells removed
    /// users, and posts the change under the new epoch. Safe to repeat.
    async fn publish_group(&mut self, group: &GroupId) -> Result<(), MessagingError> {
        let record = self.group_record(group)?;
        let Some(removed) = record.unpublished.clone() else { return Ok(()) };
        let (Some(key), Some(admin)) = (record.current_key().copied(), record.admin_keypair()) else {
            return Err(GroupError::Invalid(format!("no keys for the current epoch of {group}")).into());
        };
        let post_key = post_key_of(record.state.kind, &record.state.admin_key, &key);
        let cert = PostCert::sign(&admin, record.state.epoch, post_key);
        let chat = group.chat_number();
        self.groups()?.update(chat, |r| {
            let mut r = r?;
            (r.state.version == record.state.version).then(|| {
                r.cert = Some(cert.clone());
                (r, ())
            })
        })?;
        let mut envelopes = Vec::new();
        for member in &record.state.members {
            let card = match self.card(LookupQuery::UserId(member.user), CARD_FRESH_SECS).await {
                Ok(card) => card,
                // An account that is gone is no one to tell; the others still are.
                Err(e) if !e.is_transient() => {
                    tracing::warn!(%group, user = %member.user, error = %e, "a member's card is gone; not telling them");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let body = Body::GroupState {
                state: Box::new(record.state.clone()),
                epoch_key: key.0,
                admin_seed: if member.admin { record.admin_seed } else { None },
                cert: cert.clone(),
            };
            envelopes.extend(
                self.seal_for(&card, vec![Payload { message_id: MessageId::random(), chat_with: chat, body }])?,
            );
        }
        for user in &removed {
            let card = self.card(LookupQuery::UserId(*user), CARD_FRESH_SECS).await?;
            let body = Body::GroupRemoved { group: *group, version: record.state.version };
            envelopes.extend(
                self.seal_for(&card, vec![Payload { message_id: MessageId::random(), chat_with: chat, body }])?,
            );
        }
        for batch in envelopes.chunks(MAX_ENVELOPES_PER_BATCH) {
            self.send_batch(batch.to_vec()).await?;
        }
        let version = record.state.version;
        // A channel's subscribers learn its state from the channel itself.
        let change = match record.state.kind {
            GroupKind::Channel { .. } => Body::ChannelState { state: Box::new(record.state.clone()) },
            GroupKind::Group => Body::GroupChanged { version },
        };
        self.post_bodies(chat, vec![(MessageId::random(), change)]).await?;
        self.groups()?.update(chat, |r| {
            let mut r = r?;
            (r.state.version == version).then(|| {
                r.unpublished = None;
                (r, ())
            })
        })?;
        Ok(())
    }

    /// What an admin's device does on its own: delivers states not yet delivered, and applies
    /// members' join and leave requests. Returns the groups it changed.
    pub async fn group_maintain(&mut self) -> Result<Vec<GroupInfo>, MessagingError> {
        let mut changed = Vec::new();
        for record in self.groups()?.all()? {
            let group = record.state.group;
            // One group that cannot be served now holds up no other.
            match self.maintain(record).await {
                Ok(Some(info)) => changed.push(info),
                Ok(None) => {}
                Err(e) => tracing::info!(%group, error = %e, "the group's pending changes wait"),
            }
        }
        Ok(changed)
    }

    async fn maintain(&mut self, record: GroupRecord) -> Result<Option<GroupInfo>, MessagingError> {
        let me = self.me();
        let group = record.state.group;
        if !record.active {
            return Ok(None);
        }
        if record.unpublished.is_some() {
            self.publish_group(&group).await?;
        }
        if record.requests.is_empty() || !record.state.is_admin(me) {
            return Ok(None);
        }
        if record.state.is_channel() {
            return Ok(self.apply_subscriptions(&record).await?.pop());
        }
        let mut state = record.state.clone();
        let mut removed = Vec::new();
        for request in &record.requests {
            match *request {
                GroupRequest::Join(user) if state.member(user).is_none() && state.members.len() < MAX_GROUP_MEMBERS => {
                    state.members.push(Member { user, admin: false });
                }
                GroupRequest::Leave(user) if state.member(user).is_some() && user != me => {
                    state.members.retain(|m| m.user != user);
                    state.invites.retain(|i| i.admin != user);
                    removed.push(user);
                }
                _ => {}
            }
        }
        let requests = record.requests.clone();
        let changed = match state.members != record.state.members {
            // `record`, which `state` comes from: a version that came in meanwhile refuses it,
            // and the requests wait for the next round.
            true => Some(self.change_state(record, state, true, removed).await?),
            false => None,
        };
        self.groups()?.update(group.chat_number(), |r| {
            let mut r = r?;
            r.requests.retain(|q| !requests.contains(q));
            Some((r, ()))
        })?;
        Ok(changed)
    }

    /// Whether an admin's device has group work waiting (see [`Messenger::group_maintain`]).
    pub fn group_work_waiting(&mut self) -> Result<bool, MessagingError> {
        let me = self.me();
        Ok(self
            .groups()?
            .all()?
            .iter()
            .any(|r| r.active && (r.unpublished.is_some() || (!r.requests.is_empty() && r.state.is_admin(me)))))
    }

    // ---- posting ----

    /// Seals `bodies` for the group (chat number `chat`) and posts them, in order.
    pub(crate) async fn post_bodies(
        &mut self,
        chat: UserId,
        bodies: Vec<(MessageId, Body)>,
    ) -> Result<(), MessagingError> {
        let record = self.groups()?.get(chat)?.ok_or(MessagingError::Group(GroupError::Invalid(
            "a message for a group this device does not have".into(),
        )))?;
        let group = record.state.group;
        if !record.active {
            return Err(GroupError::NotMember(group).into());
        }
        let (Some(key), Some(cert)) = (record.current_key().copied(), record.cert.clone()) else {
            return Err(GroupError::Invalid(format!("no key for the current epoch of {group}")).into());
        };
        if cert.epoch != record.state.epoch {
            return Err(GroupError::Invalid(format!("no post certificate for the current epoch of {group}")).into());
        }
        let post = match (record.state.kind, record.admin_keypair()) {
            (GroupKind::Group, _) => key.post_keypair(),
            (GroupKind::Channel { .. }, Some(admin)) => admin,
            (GroupKind::Channel { .. }, None) => {
                return Err(GroupError::NotAdmin { group, what: "post in a channel" }.into());
            }
        };
        let (me, device, mailbox) = (self.me(), self.client.identity.peer_id(), group.mailbox());
        let first_seq = self.h().reserve_seq(&mailbox, bodies.len() as u64)?;
        let mut envelopes = Vec::new();
        for (i, (message_id, body)) in bodies.into_iter().enumerate() {
            let mut envelope = Envelope {
                id: EnvelopeId::random(),
                from_user: me,
                from_device: device,
                to_user: UserId(0),
                to_device: mailbox,
                sent_at_ms: now_ms(),
                seq: first_seq + i as u64,
                sealed: Vec::new(),
            };
            let ciphertext =
                key.seal(&self.client.identity.keypair, &envelope.id, &group, cert.epoch, message_id, body);
            GroupSeal::seal(&mut envelope, group, cert.clone(), &post, ciphertext);
            envelopes.push(envelope);
        }
        for batch in envelopes.chunks(MAX_ENVELOPES_PER_BATCH) {
            self.post_batch(batch.to_vec()).await?;
            // Our own posts come back with the group's messages: already in the history.
            for envelope in batch {
                self.h().mark_seen(envelope.id)?;
            }
        }
        Ok(())
    }

    /// Sends a group text or file through the outbox, as one-to-one messages go.
    pub(crate) fn group_payloads(
        &mut self,
        group: &GroupId,
        drafts: Vec<Draft>,
        reply_to: Option<MessageId>,
    ) -> Result<(UserId, Vec<StoredMessage>, Vec<Payload>), MessagingError> {
        let record = self.active_group(group)?;
        if record.state.is_channel() && record.admin_seed.is_none() {
            return Err(GroupError::NotAdmin { group: *group, what: "post in a channel" }.into());
        }
        let (me, chat, sent_at_ms) = (self.me(), group.chat_number(), now_ms());
        let (records, payloads) = drafts.into_iter().map(|d| d.into_message(chat, me, sent_at_ms, reply_to)).unzip();
        Ok((chat, records, payloads))
    }

    // ---- receiving ----

    /// Reads every group this account is in from its relays (long-polling up to `wait_ms` for
    /// something new), and applies what is new. Messages waiting for a key are tried first. A
    /// relay that fails is asked last from then on, and the read is tried again on the next.
    pub async fn receive_groups(&mut self, wait_ms: u32) -> Result<Inbox, MessagingError> {
        let mut inbox = Inbox::default();
        let records: Vec<GroupRecord> = self.groups()?.all()?.into_iter().filter(|r| r.active).collect();
        for record in &records {
            let waiting = self.g().waiting(record.state.group.chat_number())?;
            if !waiting.is_empty() {
                self.apply_group_batch(record.state.group, waiting, true, &mut inbox).await?;
            }
        }
        if records.is_empty() {
            return Ok(inbox);
        }
        let (mut wait, mut failures) = (wait_ms, 0);
        loop {
            match self.read_groups_once(&records, wait, &mut inbox).await {
                // Cut short: read on at once.
                Ok(true) => wait = 0,
                Ok(false) => return Ok(inbox),
                Err(e) if e.may_pass() && failures + 1 < GROUP_RELAYS_TRIED => {
                    tracing::info!(error = %e, "a group relay failed; reading from the next");
                    failures += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One read of every group, each from the closest of its relays that answered lately;
    /// returns whether a batch was cut short.
    async fn read_groups_once(
        &mut self,
        records: &[GroupRecord],
        wait_ms: u32,
        inbox: &mut Inbox,
    ) -> Result<bool, MessagingError> {
        let mut plan: HashMap<PeerId, (RelayInfo, Vec<GroupCursor>)> = HashMap::new();
        for record in records.iter().take(MAX_GROUPS_PER_FETCH) {
            let group = record.state.group;
            let key = placement::mailbox_key(&group.mailbox());
            let mut closest: Vec<RelayInfo> = placement::by_closeness(&key, self.session.relays.clone())
                .into_iter()
                .take(GROUP_RELAYS_TRIED)
                .collect();
            if record.state.is_channel() {
                // A channel is read through this device's own mailbox relay, which mirrors it
                // (a channel's readers spread over every relay rather than crowd its own).
                if let Some(home) = self.mailbox_relays.first() {
                    closest.retain(|relay| relay.peer_id != home.peer_id);
                    closest.insert(0, home.clone());
                }
            }
            let Some(relay) = self.answering_first(closest).into_iter().next() else {
                return Err(MessagingError::NoRelay("no relays known; sign in with --network".into()));
            };
            let from = self.g().cursor(group.chat_number(), &relay.peer_id)?;
            plan.entry(relay.peer_id).or_insert_with(|| (relay, Vec::new())).1.push(GroupCursor { group, from });
        }
        for (relay, _) in plan.values() {
            if let Err(e) = self.greet(relay).await {
                self.note_unresponsive(&relay.peer_id);
                return Err(e);
            }
        }
        let reads = plan.values().map(|(relay, cursors)| (relay.clone(), cursors.iter().map(|c| c.group).collect()));
        self.push_groups(reads.collect()).await;
        // One read per relay, all at once. A long-poll applies the first answer and drops the
        // others (the relay answers a dropped one when the next read comes); a read that waits
        // for nothing applies every answer, or the groups on the slower relays would be read
        // only on the next call.
        let reads: Vec<_> = plan
            .into_values()
            .map(|(relay, cursors)| {
                let request =
                    MailboxRequest::GroupFetch { groups: cursors, max: MAX_ENVELOPES_PER_BATCH as u32, wait_ms };
                let client = self.client.clone();
                let deadline = std::time::Duration::from_millis(u64::from(wait_ms)) + RELAY_ANSWER_DEADLINE;
                Box::pin(async move {
                    let answer = tokio::time::timeout(deadline, client.mailbox_request(&relay, request)).await;
                    (relay, answer)
                })
            })
            .collect();
        let answers = match wait_ms {
            0 => futures::future::join_all(reads).await,
            _ => vec![futures::future::select_all(reads).await.0],
        };
        let (mut more, mut applied, mut failed) = (false, false, None);
        for (relay, answer) in answers {
            match self.apply_group_answer(records, &relay, answer, inbox).await {
                Ok(cut) => (more, applied) = (more | cut, true),
                Err(e) => {
                    tracing::info!(relay = %relay.peer_id, error = %e, "a group relay failed; read again next time");
                    failed = failed.or(Some(e));
                }
            }
        }
        // What the others answered is applied (and in `inbox`): the failed relay's groups are
        // read again on the next call, from it or the next closest.
        match failed {
            Some(e) if !applied => Err(e),
            _ => Ok(more),
        }
    }

    /// Applies one relay's answer to a group read; whether a batch was cut short.
    async fn apply_group_answer(
        &mut self,
        records: &[GroupRecord],
        relay: &RelayInfo,
        answer: Result<Result<MailboxResponse, crate::client::net::NetError>, tokio::time::error::Elapsed>,
        inbox: &mut Inbox,
    ) -> Result<bool, MessagingError> {
        let batches = match answer {
            Ok(Ok(MailboxResponse::GroupEnvelopes { groups })) => groups,
            Ok(Ok(MailboxResponse::Error(e))) => {
                self.forget_greeting(&relay.peer_id);
                if e.code == crate::proto::ErrorCode::Unavailable {
                    // Busy (a mirror that follows all it may, say): the next try reads elsewhere.
                    self.note_unresponsive(&relay.peer_id);
                }
                return Err(MessagingError::Refused(e));
            }
            Ok(Ok(_)) => return Err(crate::client::session::ClientError::UnexpectedResponse("GroupFetch").into()),
            Ok(Err(e)) => {
                self.note_unresponsive(&relay.peer_id);
                return Err(e.into());
            }
            Err(_) => {
                self.note_unresponsive(&relay.peer_id);
                return Err(MessagingError::NoRelay(format!("relay {} did not answer a group read", relay.peer_id)));
            }
        };
        let mut more = false;
        for GroupBatch { group, envelopes, next, more: cut } in batches {
            if !records.iter().any(|r| r.state.group == group) {
                continue;
            }
            self.apply_group_batch(group, envelopes, false, inbox).await?;
            // After the history commit: a crash before it reads the batch again (deduplicated).
            self.g().set_cursor(group.chat_number(), &relay.peer_id, next)?;
            more |= cut;
        }
        Ok(more)
    }

    /// Opens, checks and applies one group's messages, each sender's in order.
    async fn apply_group_batch(
        &mut self,
        group: GroupId,
        envelopes: Vec<Envelope>,
        waited: bool,
        inbox: &mut Inbox,
    ) -> Result<(), MessagingError> {
        let chat = group.chat_number();
        for envelope in crate::client::messaging::delivery_order(envelopes) {
            if self.h().seen(&envelope.id)? {
                if waited {
                    self.g().unwait(chat, &envelope.id)?;
                }
                continue;
            }
            // Read again each time: a state change earlier in the batch may bring the key.
            let Some(record) = self.groups()?.get(chat)? else { return Ok(()) };
            match self.open_group_envelope(&record, &envelope).await {
                Opened::Message { plain } => self.apply_group_plain(&record, &envelope, *plain, inbox)?,
                Opened::NotForUs => {
                    self.h().mark_seen(envelope.id)?;
                }
                Opened::Later => {
                    if !waited {
                        self.g().wait(chat, &envelope)?;
                    }
                    continue;
                }
                // Not marked seen: a good copy of the same id may come from another relay.
                Opened::Bad(why) => tracing::warn!(%group, envelope = %envelope.id, %why, "skipping a group message"),
            }
            if waited {
                self.g().unwait(chat, &envelope.id)?;
            }
        }
        Ok(())
    }

    async fn open_group_envelope(&self, record: &GroupRecord, envelope: &Envelope) -> Opened {
        let seal = match GroupSeal::verify(envelope) {
            Ok(seal) => seal,
            Err(e) => return Opened::Bad(e.to_string()),
        };
        let state = &record.state;
        if seal.group != state.group {
            return Opened::Bad("from another group's mailbox".into());
        }
        let epoch = seal.cert.epoch;
        if epoch < record.joined_epoch {
            return Opened::NotForUs;
        }
        let Some(key) = record.key_of(epoch) else {
            return if epoch > state.epoch { Opened::Later } else { Opened::NotForUs };
        };
        // The certificate's admin key is the group's: `verify` checked it against the id.
        if post_key_of(state.kind, &seal.cert.admin_key, key) != seal.cert.post_key {
            return Opened::Bad(format!("posted under a post key that is not epoch {epoch}'s"));
        }
        let plain = match key.open(&envelope.from_device, &envelope.id, &state.group, epoch, &seal.ciphertext) {
            Ok(plain) => plain,
            Err(e @ (GroupCryptoError::Decrypt(_) | GroupCryptoError::Malformed(_) | GroupCryptoError::BadSender)) => {
                return Opened::Bad(e.to_string());
            }
        };
        // The device must be the user's, as the directory says.
        let user = envelope.from_user;
        let listed = |card: &crate::proto::UserCard| card.devices.iter().any(|d| d.peer_id == envelope.from_device);
        let card = match self.card(LookupQuery::UserId(user), CARD_TRUST_SECS).await {
            Ok(card) if listed(&card) => card,
            Ok(_) => match self.lookup(LookupQuery::UserId(user)).await {
                Ok(card) => card,
                Err(e) if e.is_transient() => return Opened::Later,
                Err(e) => return Opened::Bad(e.to_string()),
            },
            Err(e) if e.is_transient() => return Opened::Later,
            Err(e) => return Opened::Bad(e.to_string()),
        };
        if !listed(&card) {
            return Opened::Bad(format!("device {} is not user {user}'s", envelope.from_device));
        }
        // Someone removed since may have posted before; nobody else. (In a channel the post
        // key, the admin key, is what makes an author.)
        let known_admins = state.is_channel() && !state.members.is_empty();
        if known_admins && !state.is_admin(user) {
            return Opened::Bad(format!("{user} is not an admin of the channel"));
        }
        if !state.is_channel() && state.member(user).is_none() && epoch >= state.epoch {
            return Opened::Bad(format!("{user} is not a member"));
        }
        Opened::Message { plain: Box::new(plain) }
    }

    fn apply_group_plain(
        &self,
        record: &GroupRecord,
        envelope: &Envelope,
        plain: crate::crypto::group::GroupPlain,
        inbox: &mut Inbox,
    ) -> Result<(), MessagingError> {
        let (chat, author) = (record.state.group.chat_number(), envelope.from_user);
        let outgoing = author == self.me();
        match plain.body {
            body @ (Body::Text { .. } | Body::File { .. } | Body::Rich { .. }) => {
                self.record_new(envelope, plain.message_id, chat, body, inbox)?;
            }
            body @ (Body::Edit { .. } | Body::EditRich { .. } | Body::Delete { .. }) => {
                if let Some((ids, mut change)) = change_of(&body, author) {
                    let in_group = |m: &mut StoredMessage| m.chat == chat && change(m);
                    inbox.messages.extend(self.h().update(envelope.id, ids, in_group)?);
                }
            }
            // Read by someone: our messages show ✓✓ once anyone in the group read them.
            Body::Receipt { status: Status::Read, messages } if !outgoing => {
                let read = |m: &mut StoredMessage| {
                    m.chat == chat && m.outgoing && m.status < Status::Read && {
                        m.status = Status::Read;
                        true
                    }
                };
                inbox.messages.extend(self.h().update(envelope.id, &messages, read)?);
            }
            Body::Typing => self.note_typing(envelope, inbox)?,
            Body::ChannelState { state } if record.state.is_channel() => {
                self.apply_channel_state(record, *state, inbox)?;
                self.h().mark_seen(envelope.id)?;
            }
            _ => {
                self.h().mark_seen(envelope.id)?;
            }
        }
        Ok(())
    }

    /// A group-control body that came pairwise (from `accept`): a state, a removal, a join or
    /// leave request. Marks the envelope seen, or drops it if it is not to be believed.
    pub(crate) fn apply_group_control(
        &mut self,
        envelope: &Envelope,
        body: Body,
        inbox: &mut Inbox,
    ) -> Result<(), MessagingError> {
        let (me, sender) = (self.me(), envelope.from_user);
        let outcome = match body {
            Body::GroupState { state, epoch_key, admin_seed, cert } => {
                self.apply_state(sender, *state, EpochKey(epoch_key), admin_seed, cert, inbox)
            }
            Body::GroupRemoved { group, version } => {
                let removed = self.groups()?.update(group.chat_number(), |r| {
                    let mut r = r?;
                    (r.active && r.state.is_admin(sender) && version > r.state.version).then(|| {
                        r.active = false;
                        r.keys.clear();
                        r.admin_seed = None;
                        (r, ())
                    })
                })?;
                match removed {
                    Some(()) => {
                        let by = self.name(sender);
                        self.record_notice(
                            &group,
                            &format!("removed{version}"),
                            format!("{by} removed you from the group."),
                        )?;
                        self.groups_changed.notify_one();
                        Ok(())
                    }
                    None => Err(format!("{sender} may not remove us from {group}")),
                }
            }
            Body::GroupJoin { group, secret } => {
                let hash = Link::hash(&secret);
                let asked = self.groups()?.update(group.chat_number(), |r| {
                    let mut r = r?;
                    let open = r.active
                        && r.state.is_admin(me)
                        && r.state.invites.iter().any(|i| i.hash == hash && i.admin == me);
                    (open && !r.requests.contains(&GroupRequest::Join(sender))).then(|| {
                        r.requests.push(GroupRequest::Join(sender));
                        (r, ())
                    })
                })?;
                asked.ok_or_else(|| format!("{sender} asked to join {group} with a link that is not open"))
            }
            Body::ChannelSubscribe { channel, on } => {
                let request = if on { GroupRequest::Join(sender) } else { GroupRequest::Leave(sender) };
                let asked = self.groups()?.update(channel.chat_number(), |r| {
                    let mut r = r?;
                    let public = matches!(r.state.kind, GroupKind::Channel { public: true });
                    (r.active && public && r.state.is_admin(me) && !r.requests.contains(&request)).then(|| {
                        r.requests.push(request);
                        (r, ())
                    })
                })?;
                asked.ok_or_else(|| format!("{sender} (un)subscribed to {channel}, not a public channel of ours"))
            }
            Body::GroupLeave { group } => {
                let asked = self.groups()?.update(group.chat_number(), |r| {
                    let mut r = r?;
                    let theirs = r.state.member(sender).is_some() || r.state.is_channel();
                    let ours = r.active && r.state.is_admin(me);
                    (ours && theirs && !r.requests.contains(&GroupRequest::Leave(sender))).then(|| {
                        r.requests.push(GroupRequest::Leave(sender));
                        (r, ())
                    })
                })?;
                asked.ok_or_else(|| format!("{sender} left {group}, which is not theirs to leave here"))
            }
            _ => Err("not a group-control message".into()),
        };
        match outcome {
            Ok(()) => {
                self.h().mark_seen(envelope.id)?;
            }
            Err(why) => {
                tracing::warn!(envelope = %envelope.id, from = %sender, %why, "refusing a group-control message");
                self.h().drop_envelope(envelope.id)?;
            }
        }
        Ok(())
    }

    /// A state from `sender`: believed if it is newer than ours and `sender` is an admin in ours
    /// (or, for a group new here, in it, which names us).
    fn apply_state(
        &mut self,
        sender: UserId,
        state: GroupState,
        key: EpochKey,
        admin_seed: Option<Seed>,
        cert: PostCert,
        inbox: &mut Inbox,
    ) -> Result<(), String> {
        let me = self.me();
        let group = state.group;
        if GroupId::of_admin_key(&state.admin_key) != group {
            return Err("a state whose admin key is not the group's".into());
        }
        if let Some(seed) = admin_seed {
            let mut bytes = seed.0;
            let ok = ed25519::SecretKey::try_from_bytes(&mut bytes)
                .map(|s| ed25519::Keypair::from(s).public().to_bytes() == state.admin_key)
                .unwrap_or(false);
            if !ok {
                return Err("an admin seed that is not the group's admin key".into());
            }
        }
        // A channel's subscribers are not in its state; a group's members are.
        if state.member(me).is_none() && !state.is_channel() {
            return Err("a state that does not name us".into());
        }
        let post_key = post_key_of(state.kind, &state.admin_key, &key);
        if cert.verify(&group).is_err() || cert.epoch != state.epoch || cert.post_key != post_key {
            return Err("a state whose post certificate is not its epoch's".into());
        }
        if state.members.len() > MAX_GROUP_MEMBERS {
            return Err("a state with too many members".into());
        }
        let state_for_update = state.clone();
        let outcome = self
            .groups()
            .map_err(|e| e.to_string())?
            .update(group.chat_number(), move |before| {
                let state = state_for_update;
                match before {
                    Some(mut r) if r.active => {
                        // Two admins' changes of the same version: every device keeps the one
                        // with the lower hash, so all end up with the same state and key.
                        let newer = state.version > r.state.version
                            || (state.version == r.state.version && tie_break(&state) < tie_break(&r.state));
                        if !newer || !r.state.is_admin(sender) || state.epoch < r.state.epoch {
                            return None;
                        }
                        let old = r.state.clone();
                        r.keys.retain(|(epoch, _)| *epoch != state.epoch);
                        r.add_key(state.epoch, key);
                        r.admin_seed = if state.is_admin(me) { admin_seed.or(r.admin_seed) } else { None };
                        r.state = state;
                        r.cert = Some(cert);
                        // Someone else's newer version replaces ours, delivered or not.
                        r.unpublished = None;
                        Some((r, Some(old)))
                    }
                    before => {
                        // A group we were removed from (or left): its last state says who may
                        // let us back in; a group new here, the state itself.
                        let authority = before.as_ref().map_or(&state, |r| &r.state);
                        if !authority.is_admin(sender) {
                            return None;
                        }
                        let record = GroupRecord {
                            keys: vec![(state.epoch, key)],
                            admin_seed: if state.is_admin(me) { admin_seed } else { None },
                            // A channel's subscribers read what came before them.
                            joined_epoch: if state.is_channel() { 0 } else { state.epoch },
                            active: true,
                            unpublished: None,
                            links: Vec::new(),
                            requests: Vec::new(),
                            cert: Some(cert),
                            counted_by: None,
                            state,
                        };
                        Some((record, None))
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        let Some(before) = outcome else {
            return Err(format!("a state of {group} that is not newer, or not from an admin"));
        };
        if let Err(e) = self.record_state_notice(before.as_ref(), &state) {
            tracing::warn!(error = %e, "could not record a group's change");
        }
        if let Ok(info) = self.group_info(&group) {
            inbox.groups.push(info);
        }
        self.groups_changed.notify_one();
        Ok(())
    }

    // ---- channels ----

    /// A channel's link: for a public one, with its key (anyone with it reads); for a private
    /// one, an invite link (an admin's device lets each subscriber in).
    pub async fn channel_link(&mut self, channel: &GroupId) -> Result<String, MessagingError> {
        let record = self.active_group(channel)?;
        let me = self.me();
        match record.state.kind {
            GroupKind::Channel { public: true } => {
                let key = record.current_key().copied().ok_or(GroupError::NotMember(*channel))?;
                let admin =
                    if record.state.is_admin(me) { me } else { record.counted_by.unwrap_or(record.state.changed_by) };
                Ok(ChannelLink { channel: *channel, admin, epoch: record.state.epoch, key }.to_string())
            }
            GroupKind::Channel { public: false } => self.group_link(channel).await,
            GroupKind::Group => Err(GroupError::Invalid(format!("{channel} is a group: group link")).into()),
        }
    }

    /// Names a public channel of this account's `@name` in the directory (admins only), so
    /// that anyone reads it by name as by its link.
    pub async fn channel_name(&mut self, channel: &GroupId, name: &str, off: bool) -> Result<(), MessagingError> {
        let record = self.active_group(channel)?;
        if !matches!(record.state.kind, GroupKind::Channel { public: true }) {
            return Err(GroupError::Invalid(format!("{channel} is not a public channel: only those have names")).into());
        }
        if !record.state.is_admin(self.me()) {
            return Err(GroupError::NotAdmin { group: *channel, what: "name the channel" }.into());
        }
        // An empty link gives the name up; the gateway reads the name as a username (`@` or not).
        let link = if off { String::new() } else { self.channel_link(channel).await? };
        self.client.set_channel_name(name.to_string(), link).await?;
        Ok(())
    }

    /// Subscribes with a channel's link or `@name`: a public one's opens here at once (and, if `announce`,
    /// the admin's device counts the subscription); a private one's asks its admin's device.
    pub async fn channel_subscribe(&mut self, link: &str, announce: bool) -> Result<GroupInfo, MessagingError> {
        self.history()?;
        let named;
        let link = match link.trim().strip_prefix('@') {
            Some(name) => {
                named = self.client.channel_by_name(name.to_string()).await?;
                named.as_str()
            }
            None => link,
        };
        if link.trim().starts_with(LINK_PREFIX) {
            if !announce {
                let why =
                    "that is an invite link: a private channel is read only by its subscribers (channel subscribe)";
                return Err(GroupError::Invalid(why.into()).into());
            }
            let link = self.group_join(link).await?;
            return Ok(self.group_info(&link.group).unwrap_or_else(|_| placeholder_info(link.group)));
        }
        let link: ChannelLink = link.parse()?;
        let chat = link.channel.chat_number();
        let me = self.me();
        self.groups()?.update(chat, |before| {
            if before.as_ref().is_some_and(|r| r.active) {
                return None;
            }
            let state = GroupState {
                group: link.channel,
                // Learned from the channel's posts, which carry it (checked against the id).
                admin_key: [0; 32],
                version: 0,
                epoch: link.epoch,
                title: String::new(),
                description: String::new(),
                members: Vec::new(),
                invites: Vec::new(),
                pinned: None,
                changed_by: link.admin,
                kind: GroupKind::Channel { public: true },
                subscribers: 0,
            };
            let record = GroupRecord {
                state,
                keys: vec![(link.epoch, link.key)],
                admin_seed: None,
                joined_epoch: 0,
                active: true,
                unpublished: None,
                links: Vec::new(),
                requests: Vec::new(),
                cert: None,
                counted_by: announce.then_some(link.admin),
            };
            Some((record, ()))
        })?;
        if announce && link.admin != me {
            let card = self.card(LookupQuery::UserId(link.admin), CARD_FRESH_SECS).await?;
            let body = Body::ChannelSubscribe { channel: link.channel, on: true };
            let payload = Payload { message_id: MessageId::random(), chat_with: chat, body };
            self.send_sealed(&one_device(card), vec![payload], false).await?;
        }
        self.groups_changed.notify_one();
        // Subscribed either way; the posts come when the relays can be reached.
        match self.receive_groups(0).await {
            Err(e) if !e.may_pass() => return Err(e),
            Err(e) => tracing::info!(error = %e, "subscribed; the channel's posts are fetched later"),
            Ok(_) => {}
        }
        self.group_info(&link.channel)
    }

    /// A channel state posted by its admins: taken if newer than ours and bound to the id.
    fn apply_channel_state(
        &self,
        record: &GroupRecord,
        state: GroupState,
        inbox: &mut Inbox,
    ) -> Result<(), MessagingError> {
        let group = record.state.group;
        if state.group != group || GroupId::of_admin_key(&state.admin_key) != group || !state.is_channel() {
            tracing::warn!(%group, "ignoring a channel state that is not this channel's");
            return Ok(());
        }
        let applied = self.g().update(group.chat_number(), |r| {
            let mut r = r?;
            (state.version > r.state.version).then(|| {
                r.state = state.clone();
                (r.clone(), r)
            })
        })?;
        if let Some(now) = applied {
            let before = record.state.clone();
            self.record_state_notice((before.version > 0).then_some(&before), &state)?;
            inbox.groups.push(self.info_of(&now));
        }
        Ok(())
    }

    /// An admin's device applies a channel's subscriptions: lets private subscribers in (sends
    /// them the state and key), counts everyone, and posts the new count.
    async fn apply_subscriptions(&mut self, record: &GroupRecord) -> Result<Vec<GroupInfo>, MessagingError> {
        let group = record.state.group;
        let chat = group.chat_number();
        let private = matches!(record.state.kind, GroupKind::Channel { public: false });
        for request in &record.requests {
            match *request {
                GroupRequest::Join(user) => {
                    if let (true, Some(key), Some(cert)) = (private, record.current_key().copied(), record.cert.clone())
                    {
                        let card = self.card(LookupQuery::UserId(user), CARD_FRESH_SECS).await?;
                        let state = Box::new(record.state.clone());
                        let body = Body::GroupState { state, epoch_key: key.0, admin_seed: None, cert };
                        let payload = Payload { message_id: MessageId::random(), chat_with: chat, body };
                        self.send_sealed(&card, vec![payload], false).await?;
                    }
                    self.g().set_subscriber(chat, user, true)?;
                }
                GroupRequest::Leave(user) => self.g().set_subscriber(chat, user, false)?,
            }
        }
        let requests = record.requests.clone();
        self.groups()?.update(chat, |r| {
            let mut r = r?;
            r.requests.retain(|q| !requests.contains(q));
            Some((r, ()))
        })?;
        let count = self.g().subscribers(chat)?;
        if count == record.state.subscribers {
            return Ok(Vec::new());
        }
        let record = self.group_record(&group)?;
        let mut state = record.state.clone();
        state.subscribers = count;
        Ok(vec![self.change_state(record, state, false, Vec::new()).await?])
    }

    // ---- notices ----

    fn name(&self, user: UserId) -> String {
        if user == self.me() {
            return "You".into();
        }
        match self.h().card(user) {
            Ok(Some(card)) => crate::client::node::display_name(&card, None),
            _ => user.to_string(),
        }
    }

    /// Records what changed between two versions as notices in the group's chat (the same ids
    /// on every device).
    fn record_state_notice(&self, before: Option<&GroupState>, after: &GroupState) -> Result<(), MessagingError> {
        let by = self.name(after.changed_by);
        let names = |users: Vec<UserId>| users.into_iter().map(|u| self.name(u)).collect::<Vec<_>>().join(", ");
        let mut lines = Vec::new();
        match before {
            None if after.version == 1 => lines.push(format!("{by} created the group «{}».", after.title)),
            None => lines.push(format!("{by} added you to the group «{}».", after.title)),
            Some(before) => {
                let added: Vec<UserId> =
                    after.members.iter().filter(|m| before.member(m.user).is_none()).map(|m| m.user).collect();
                let gone: Vec<UserId> =
                    before.members.iter().filter(|m| after.member(m.user).is_none()).map(|m| m.user).collect();
                if !added.is_empty() {
                    lines.push(format!("{by} added {}.", names(added)));
                }
                if !gone.is_empty() {
                    lines.push(format!("{by} removed {}.", names(gone)));
                }
                if before.title != after.title {
                    lines.push(format!("{by} changed the title to «{}».", after.title));
                }
                if before.description != after.description {
                    lines.push(format!("{by} changed the description."));
                }
                let admins = |s: &GroupState| s.members.iter().filter(|m| m.admin).map(|m| m.user).collect::<Vec<_>>();
                let (was, now) = (admins(before), admins(after));
                let made: Vec<UserId> = now.iter().filter(|u| !was.contains(u)).copied().collect();
                if !made.is_empty() {
                    lines.push(format!("{by} made {} admin.", names(made)));
                }
                if before.pinned != after.pinned {
                    lines.push(match after.pinned {
                        Some(_) => format!("{by} pinned a message."),
                        None => format!("{by} unpinned the message."),
                    });
                }
            }
        }
        if lines.is_empty() {
            return Ok(());
        }
        self.record_notice(&after.group, &format!("v{}", after.version), lines.join(" "))
    }

    fn record_notice(&self, group: &GroupId, what: &str, text: String) -> Result<(), MessagingError> {
        let mut id = [0u8; 16];
        id.copy_from_slice(&blake3::hash([group.0.as_slice(), what.as_bytes()].concat().as_slice()).as_bytes()[..16]);
        let notice = StoredMessage::notice(MessageId(id), group.chat_number(), self.me(), text);
        self.h().record(vec![(None, notice)])?;
        Ok(())
    }
}

/// The card with only the one device of it (the least id) that applies requests to an
/// admin: two devices of one admin applying the same join would make two states of one version.
fn one_device(mut card: crate::proto::UserCard) -> crate::proto::UserCard {
    card.devices.sort_by_key(|d| d.peer_id.to_bytes());
    card.devices.truncate(1);
    card
}

fn check_title(title: &str) -> Result<(), GroupError> {
    let n = title.trim().chars().count();
    if n == 0 || n > MAX_GROUP_TITLE_CHARS || title.chars().any(char::is_control) {
        return Err(GroupError::Invalid(format!(
            "a title is 1-{MAX_GROUP_TITLE_CHARS} characters, no control characters"
        )));
    }
    Ok(())
}

/// A channel's subscribers as an admin's device counts them: (chat number, user) → ().
const CHANNEL_SUBSCRIBERS: TableDefinition<(u64, u64), ()> = TableDefinition::new("channel_subscribers");

impl Groups {
    fn set_subscriber(&self, chat: UserId, user: UserId, on: bool) -> Result<(), HistoryError> {
        let tx = self.history.db().begin_write()?;
        {
            let mut table = tx.open_table(CHANNEL_SUBSCRIBERS)?;
            if on {
                table.insert((chat.0, user.0), ())?;
            } else {
                table.remove((chat.0, user.0))?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn subscribers(&self, chat: UserId) -> Result<u64, HistoryError> {
        let tx = self.history.db().begin_read()?;
        Ok(tx.open_table(CHANNEL_SUBSCRIBERS)?.range((chat.0, 0)..=(chat.0, u64::MAX))?.count() as u64)
    }
}

/// What public channel links start with.
pub const CHANNEL_LINK_PREFIX: &str = "meshgram:channel/";

/// A public channel's link: its id, the admin whose device counts subscribers, the epoch and
/// its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelLink {
    pub channel: GroupId,
    pub admin: UserId,
    pub epoch: u64,
    pub key: EpochKey,
}

impl std::fmt::Display for ChannelLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = crate::ids::hex(&self.key.0);
        write!(f, "{CHANNEL_LINK_PREFIX}{}/{}/{}/{key}", self.channel, self.admin, self.epoch)
    }
}

impl std::str::FromStr for ChannelLink {
    type Err = GroupError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || GroupError::BadLink(s.to_string());
        let rest = s.trim().strip_prefix(CHANNEL_LINK_PREFIX).ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [channel, admin, epoch, key] = parts.as_slice() else { return Err(bad()) };
        Ok(ChannelLink {
            channel: channel.parse().map_err(|_| bad())?,
            admin: admin.parse().map_err(|_| bad())?,
            epoch: epoch.parse().map_err(|_| bad())?,
            key: EpochKey(crate::ids::parse_hex::<32>(key).map_err(|_| bad())?),
        })
    }
}

/// Orders two states of the same version (made by two admins at once): the lower one wins.
fn tie_break(state: &GroupState) -> [u8; 32] {
    *blake3::hash(&postcard::to_stdvec(state).expect("invariant: states serialize")).as_bytes()
}

/// The public key an epoch's posts are signed with: the members' (from the epoch key) in a
/// group, the admin key itself in a channel (so only admins post).
fn post_key_of(kind: GroupKind, admin_key: &[u8; 32], key: &EpochKey) -> [u8; 32] {
    match kind {
        GroupKind::Group => key.post_keypair().public().to_bytes(),
        GroupKind::Channel { .. } => *admin_key,
    }
}

/// What `channel subscribe` shows for a private channel whose admin has not let us in yet.
fn placeholder_info(id: GroupId) -> GroupInfo {
    GroupInfo {
        id,
        kind: "channel".into(),
        public: false,
        subscribers: 0,
        title: String::new(),
        description: String::new(),
        members: Vec::new(),
        version: 0,
        epoch: 0,
        pinned: None,
        active: false,
        admin: false,
        links: Vec::new(),
        unpublished: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::seal::MAX_SEALED_PAYLOAD;
    use crate::proto::MAX_ENVELOPE_SIZE;

    #[test]
    fn the_largest_state_fits_one_sealed_envelope() {
        let admin = ed25519::Keypair::generate();
        let admin_key = admin.public().to_bytes();
        let state = GroupState {
            group: GroupId::of_admin_key(&admin_key),
            admin_key,
            version: u64::MAX,
            epoch: u64::MAX,
            title: "ж".repeat(MAX_GROUP_TITLE_CHARS),
            description: "ж".repeat(MAX_GROUP_DESCRIPTION_CHARS),
            // The largest account numbers, so each takes the most bytes.
            members: (0..MAX_GROUP_MEMBERS as u64)
                .map(|i| Member { user: UserId((1 << 62) + i), admin: true })
                .collect(),
            invites: (0..MAX_GROUP_INVITES).map(|_| Invite { hash: [7; 32], admin: UserId(1 << 62) }).collect(),
            pinned: Some(MessageId::random()),
            changed_by: UserId(1 << 62),
            kind: GroupKind::Group,
            subscribers: u64::MAX,
        };
        let cert = PostCert::sign(&admin, u64::MAX, [1; 32]);
        let body =
            Body::GroupState { state: Box::new(state), epoch_key: [2; 32], admin_seed: Some(Seed([3; 32])), cert };
        let payload = Payload { message_id: MessageId::random(), chat_with: UserId(u64::MAX), body };
        let bytes = postcard::to_stdvec(&payload).unwrap();
        assert!(bytes.len() <= MAX_SEALED_PAYLOAD, "{} bytes", bytes.len());
        assert!(bytes.len() + crate::crypto::seal::SEAL_OVERHEAD + 200 < MAX_ENVELOPE_SIZE);
    }

    #[test]
    fn an_imported_group_takes_the_newer_state_keeps_every_key_and_leaves_this_devices_work() {
        let dir = tempfile::tempdir().unwrap();
        let groups = Groups::open(&History::open(dir.path()).unwrap()).unwrap();
        let admin = ed25519::Keypair::generate();
        let admin_key = admin.public().to_bytes();
        let state = GroupState {
            group: GroupId::of_admin_key(&admin_key),
            admin_key,
            version: 1,
            epoch: 0,
            title: "old".into(),
            description: String::new(),
            members: vec![Member { user: UserId(1), admin: true }],
            invites: Vec::new(),
            pinned: None,
            changed_by: UserId(1),
            kind: GroupKind::Group,
            subscribers: 0,
        };
        let here = GroupRecord {
            state: state.clone(),
            keys: vec![(0, EpochKey([1; 32]))],
            admin_seed: None,
            joined_epoch: 0,
            active: true,
            unpublished: Some(vec![UserId(9)]),
            links: vec![[1; 16]],
            requests: vec![GroupRequest::Join(UserId(5))],
            cert: None,
            counted_by: None,
        };
        let chat = state.group.chat_number();
        groups.update(chat, |_| Some((here.clone(), ()))).unwrap();
        let mut theirs = here.clone();
        theirs.state.version = 2;
        theirs.state.title = "new".into();
        theirs.keys = vec![(1, EpochKey([2; 32]))];
        theirs.admin_seed = Some(Seed([3; 32]));
        theirs.links = vec![[2; 16]];
        theirs.requests = vec![GroupRequest::Leave(UserId(6))];
        assert_eq!(groups.import(std::slice::from_ref(&theirs)).unwrap(), 1);
        let merged = groups.get(chat).unwrap().unwrap();
        assert_eq!(merged.state.title, "new");
        assert_eq!(merged.keys, vec![(0, EpochKey([1; 32])), (1, EpochKey([2; 32]))]);
        assert_eq!((merged.admin_seed, merged.links.len()), (Some(Seed([3; 32])), 2));
        assert_eq!(merged.requests, here.requests, "this device's own work stays as it was");
        assert_eq!(merged.unpublished, here.unpublished);
        assert_eq!(groups.import(std::slice::from_ref(&theirs)).unwrap(), 0, "importing again changes nothing");

        // What another device gets carries none of this device's work in hand.
        let exported = groups.for_another_device().unwrap();
        assert_eq!((exported[0].unpublished.clone(), exported[0].requests.len()), (None, 0));

        // Left here: a newer record from a device that has not heard does not bring it back.
        groups.update(chat, |r| Some((GroupRecord { active: false, ..r.unwrap() }, ()))).unwrap();
        theirs.state.version = 3;
        assert_eq!(groups.import(std::slice::from_ref(&theirs)).unwrap(), 0);
        assert!(!groups.get(chat).unwrap().unwrap().active);
        // A record whose id is not its admin key's is no group of this account's.
        let mut forged = theirs.clone();
        forged.state.group = GroupId([9; 16]);
        assert_eq!(groups.import(&[forged]).unwrap(), 0);
    }

    #[test]
    fn links_read_back_and_garbage_is_refused() {
        let link = Link { group: GroupId([5; 16]), admin: UserId(42), secret: [9; 16] };
        assert_eq!(link.to_string().parse::<Link>().unwrap(), link);
        let channel = ChannelLink { channel: GroupId([6; 16]), admin: UserId(7), epoch: 3, key: EpochKey([8; 32]) };
        assert_eq!(channel.to_string().parse::<ChannelLink>().unwrap(), channel);
        for bad in ["", "meshgram:join/", "meshgram:join/g00/1/2", "https://x", "meshgram:channel/a/b/c/d/e"] {
            assert!(bad.parse::<Link>().is_err() && bad.parse::<ChannelLink>().is_err(), "{bad}");
        }
    }
}
