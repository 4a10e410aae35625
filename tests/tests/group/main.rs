//! Cross-process tests of groups: real gateway, relays, client nodes and CLI.
//!
//! - `members`: five members across three relays (one SIGKILLed midway) each get every message
//!   once, in each sender's order, and the relays' files hold no plaintext; a removed member's
//!   client cannot open (or post) what follows, even restored with every key it ever had; a
//!   member who joins by link reads from the join on, a revoked link lets nobody in, and
//!   admin-only actions are refused to the others.
//! - `forgery`: posts to a group by a non-member (a certificate not by the group's admin key,
//!   garbage, a one-to-one `Send` to a group mailbox) are refused and nothing is stored; a
//!   state forged by a member who is no admin is refused by the others.
//! - `channels`: a public channel read from its link by someone not subscribed, posts only by
//!   its admin (a subscriber's refused by its client and by the relays), subscribers counted; a
//!   private channel lets subscribers in by invite, shows them its history, and no link reads it;
//!   a relay that holds none of a channel mirrors it for its readers (a subscriber's client reads
//!   through its own relay), from the history on, through the SIGKILL of the relay it mirrors.

// A failed unwrap here is a failed test, which is what it should be.
#![allow(clippy::unwrap_used)]

mod channels;
mod forgery;
mod members;

use std::path::Path;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::identity::ed25519;
use libp2p::kad::KBucketKey;
use meshgram_node::crypto::identity::load_or_create_ed25519;
use meshgram_node::proto::group::{GroupCursor, GroupId};
use meshgram_node::proto::{MailboxRequest, MailboxResponse};
use meshgram_tests::{Mesh, RawClient, array, meshgram, str_field, unix_now};
use serde_json::Value;

/// A group's messages as `profile` shows them (reading the group), notices left out.
fn group_messages(profile: &Path, group: &str) -> Vec<Value> {
    let shown = meshgram(profile, &["messages", group]).ok_json();
    array(&shown, "messages").into_iter().filter(|m| m["notice"] != true).collect()
}

fn group_texts(profile: &Path, group: &str) -> Vec<String> {
    group_messages(profile, group).iter().map(|m| str_field(m, "text").to_string()).collect()
}

/// Waits (bounded) until `profile` shows at least `want` messages in the group; returns the texts.
fn wait_for_texts(profile: &Path, group: &str, want: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let texts = group_texts(profile, group);
        if texts.len() >= want || Instant::now() > deadline {
            return texts;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Creates a group on `admin`'s profile with `members` (phones); returns its id.
fn create_group(admin: &Path, title: &str, members: &[&str]) -> String {
    let mut args = vec!["group", "create", title];
    args.extend_from_slice(members);
    let created = meshgram(admin, &args).ok_json();
    str_field(&created, "id").to_string()
}

/// The relays' indexes, closest to the group's mailbox first (the first R hold its messages).
fn relays_by_group_distance(mesh: &Mesh, group: &str) -> Vec<usize> {
    let mailbox = group.parse::<GroupId>().unwrap().mailbox();
    let distance = |i: &usize| {
        let relay: PeerId = mesh.relays[*i].peer_id().parse().unwrap();
        KBucketKey::from(mailbox).distance(&KBucketKey::from(relay))
    };
    let mut order: Vec<usize> = (0..mesh.relays.len()).collect();
    order.sort_by_key(distance);
    order
}

/// How many messages each relay holds in the group's mailbox, read as a member's device reads
/// them (a `GroupFetch` from the start), with a certificate the test signs. Every relay must be up.
fn held_by_relays(mesh: &Mesh, group: &str) -> Vec<usize> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(held_by_relays_now(mesh, group))
}

async fn held_by_relays_now(mesh: &Mesh, group: &str) -> Vec<usize> {
    let group: GroupId = group.parse().unwrap();
    let key = gateway_key(mesh);
    let mut held = Vec::new();
    for relay in &mesh.relays {
        let raw = RawClient::new(&relay.tcp_addr());
        let cert = raw.cert(&key, 999_999, unix_now() - 60, unix_now() + 3600);
        assert!(matches!(raw.call(MailboxRequest::Hello { cert }).await, MailboxResponse::Welcome { .. }));
        let (mut count, mut from) = (0, 0);
        loop {
            let fetch = MailboxRequest::GroupFetch { groups: vec![GroupCursor { group, from }], max: 256, wait_ms: 0 };
            match raw.call(fetch).await {
                MailboxResponse::GroupEnvelopes { groups } if !groups.is_empty() => {
                    count += groups[0].envelopes.len();
                    from = groups[0].next;
                    if !groups[0].more {
                        break;
                    }
                }
                MailboxResponse::GroupEnvelopes { .. } => break,
                other => panic!("group fetch: {other:?}"),
            }
        }
        held.push(count);
    }
    held
}

/// The gateway's own key: certificates the test signs with it are as good as the gateway's.
fn gateway_key(mesh: &Mesh) -> ed25519::Keypair {
    let key_file = mesh.gateway.data_dir().join(meshgram_node::defaults::GATEWAY_KEY_FILE);
    load_or_create_ed25519(&key_file).unwrap().try_into_ed25519().unwrap()
}

/// A group message from `user`'s `device` to `group`'s mailbox, not yet sealed.
fn unsealed_post(user: u64, device: PeerId, group: GroupId) -> meshgram_node::proto::envelope::Envelope {
    meshgram_node::proto::envelope::Envelope {
        id: meshgram_node::proto::envelope::EnvelopeId::random(),
        from_user: meshgram_node::ids::UserId(user),
        from_device: device,
        to_user: meshgram_node::ids::UserId(0),
        to_device: group.mailbox(),
        sent_at_ms: meshgram_node::ids::now_ms(),
        seq: 0,
        sealed: Vec::new(),
    }
}
