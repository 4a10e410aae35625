//! `meshgram group …` and `meshgram join`: the calls, and how groups print.

use meshgram_node::client::api::{Call, Reply};
use meshgram_node::client::groups::{GroupChange, GroupInfo};
use meshgram_node::ids::InvalidValue;
use meshgram_node::proto::group::GroupId;
use serde_json::json;

use super::calls::parse_query;
use super::output::{emit, to_json};
use super::{ChannelCommand, CliError, CliResult, GroupCommand};

fn parse_group(s: &str) -> Result<GroupId, CliError> {
    s.parse().map_err(|e: InvalidValue| CliError::usage(e.0))
}

fn parse_users(users: &[String]) -> Result<Vec<meshgram_node::proto::LookupQuery>, CliError> {
    users.iter().map(|u| parse_query(u)).collect()
}

/// The call a `group` command makes.
pub(super) fn call_for(command: GroupCommand) -> Result<Call, CliError> {
    let change = |group: &str, change| Ok::<_, CliError>(Call::GroupChange { group: parse_group(group)?, change });
    Ok(match command {
        GroupCommand::Create { title, members } => Call::GroupCreate { title, members: parse_users(&members)? },
        GroupCommand::Add { chat, users } => change(&chat, GroupChange::Add { users: parse_users(&users)? })?,
        GroupCommand::Remove { chat, users } => change(&chat, GroupChange::Remove { users: parse_users(&users)? })?,
        GroupCommand::Title { chat, title } => change(&chat, GroupChange::Title { title })?,
        GroupCommand::Description { chat, description } => change(&chat, GroupChange::Description { description })?,
        GroupCommand::Admin { chat, user, off } => {
            change(&chat, GroupChange::Admin { user: parse_query(&user)?, admin: !off })?
        }
        GroupCommand::Pin { chat, message_id } => {
            let message = message_id
                .map(|id| id.parse().map_err(|e: InvalidValue| CliError::usage(format!("message id: {}", e.0))))
                .transpose()?;
            change(&chat, GroupChange::Pin { message })?
        }
        GroupCommand::Link { chat } => Call::GroupLink { group: parse_group(&chat)? },
        GroupCommand::RevokeLink { chat, link } => change(&chat, GroupChange::RevokeLink { link })?,
        GroupCommand::Leave { chat } => Call::GroupLeave { group: parse_group(&chat)? },
        GroupCommand::Info { chat } => Call::GroupInfo { group: parse_group(&chat)? },
        GroupCommand::List => Call::GroupList,
    })
}

/// The call a `channel` command makes (`read` is two: see [`read_channel`]).
pub(super) fn channel_call_for(command: ChannelCommand) -> Result<Call, CliError> {
    Ok(match command {
        ChannelCommand::Create { title, private } => Call::ChannelCreate { title, public: !private },
        ChannelCommand::Post { chat, text } => Call::Send {
            to: meshgram_node::proto::LookupQuery::Group(parse_group(&chat)?),
            texts: vec![text],
            reply_to: None,
        },
        ChannelCommand::Subscribe { link } => Call::ChannelSubscribe { link, announce: true },
        ChannelCommand::Unsubscribe { chat } => Call::GroupLeave { group: parse_group(&chat)? },
        ChannelCommand::Link { chat } => Call::ChannelLink { channel: parse_group(&chat)? },
        ChannelCommand::Name { chat, name, off } => Call::ChannelName { channel: parse_group(&chat)?, name, off },
        ChannelCommand::Info { chat } => Call::GroupInfo { group: parse_group(&chat)? },
        ChannelCommand::Read { .. } => return Err(CliError::usage("channel read is two calls")),
    })
}

/// `channel read LINK`: opens a public channel from its link without subscribing, then shows
/// its posts.
pub(super) async fn read_channel(profile: &std::path::Path, json: bool, link: String) -> CliResult {
    let opened = super::calls::call_node(profile, Call::ChannelSubscribe { link, announce: false }).await?;
    let Reply::Group { group } = opened else { return Err(CliError::usage("not a public channel's link")) };
    let call = Call::Messages { chat: Some(meshgram_node::proto::LookupQuery::Group(group.id)), limit: None };
    let reply = super::calls::call_node(profile, call.clone()).await?;
    super::calls::print(json, &call, reply)
}

fn info_lines(g: &GroupInfo) -> String {
    let mut out = format!("{} «{}»", g.id, g.title);
    if g.kind == "channel" {
        let public = if g.public { "public" } else { "private" };
        out.push_str(&format!(" — {public} channel, {} subscribers", g.subscribers));
    }
    if !g.active {
        out.push_str(" (you are no longer a member)");
    }
    if !g.description.is_empty() {
        out.push_str(&format!("\n{}", g.description));
    }
    out.push_str(&format!("\n{} members (epoch {}, version {}):", g.members.len(), g.epoch, g.version));
    for m in &g.members {
        out.push_str(&format!("\n  {}{}", m.name, if m.admin { "\tadmin" } else { "" }));
    }
    if let Some(pinned) = g.pinned {
        out.push_str(&format!("\npinned: {pinned}"));
    }
    for link in &g.links {
        out.push_str(&format!("\ninvite link: {link}"));
    }
    if g.unpublished {
        out.push_str("\n(the last change waits to reach every member: it goes out when the relays can take it)");
    }
    out
}

/// Prints a group reply; hands back any other.
pub(super) fn print(json: bool, call: &Call, reply: Reply) -> Option<Reply> {
    match (call, reply) {
        (Call::GroupCreate { .. } | Call::ChannelCreate { .. }, Reply::Group { group }) => {
            emit(json, to_json(&group), || format!("Created {} «{}»: {}", group.kind, group.title, group.id));
        }
        (_, Reply::Group { group }) => {
            emit(json, to_json(&group), || info_lines(&group));
        }
        (_, Reply::Groups { groups }) => emit(json, to_json(&groups), || {
            if groups.is_empty() {
                return "No groups yet: meshgram group create \"Title\" @someone".into();
            }
            groups
                .iter()
                .map(|g| {
                    format!(
                        "{}\t«{}»\t{} members{}",
                        g.id,
                        g.title,
                        g.members.len(),
                        if g.active { "" } else { "\t(left)" }
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        }),
        (_, Reply::GroupLink { link }) => emit(json, json!({ "link": link }), || {
            format!("Invite link (anyone with it may join; revoke with meshgram group revoke-link):\n{link}")
        }),
        (_, Reply::JoinRequested { group, admin }) => emit(json, json!({ "group": group, "admin": admin }), || {
            format!("Asked to join {group}; it appears in `meshgram chats` once admin {admin}'s device lets you in.")
        }),
        (_, other) => return Some(other),
    }
    None
}
