//! Groups: one message to an N-member group, stored once on the group's relays and pushed to
//! every member's parked `GroupFetch`, against the same message sent as N one-to-one envelopes
//! (sealed per member device, as a client without groups would), in the same run, on the same
//! three relays (replication 2). Members are simulated devices: their own keys, certificates
//! and connections, one long-poll each, opening what they get.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use libp2p::identity::ed25519;
use meshgram_node::crypto::group::EpochKey;
use meshgram_node::crypto::seal;
use meshgram_node::ids::UserId;
use meshgram_node::net::placement;
use meshgram_node::proto::envelope::{Envelope, EnvelopeId};
use meshgram_node::proto::group::{GroupCursor, GroupId, GroupSeal, PostCert};
use meshgram_node::proto::payload::{Body, MessageId};
use meshgram_node::proto::{MAX_ENVELOPES_PER_BATCH, MailboxRequest, MailboxResponse, RelayInfo};

use crate::mesh::{Device, MeshOptions, make_identities, start_three_relays, unix_ms};
use crate::servers::RelayProcess;
use crate::stats::{Percentiles, now_ns};

/// How long a member's read waits for the message.
const READ_WAIT_MS: u32 = 25_000;
/// Long-polls a member makes at most for the one-to-one copy.
const READS_PER_MEMBER: usize = 4;
const TEXT: &str = "one message for the whole group: 0123456789 abcdefghij 0123456789 abcdefghij";

/// What one delivery to every member cost.
#[derive(Debug)]
pub(crate) struct Delivery {
    /// From the send to each member's answer, ns.
    pub(crate) latency: Option<Percentiles>,
    /// From the send to the last member's answer.
    pub(crate) all: Duration,
    /// Members that got it (and opened it).
    pub(crate) delivered: usize,
    /// Encoded envelope bytes the relays keep for it: copies × sizes.
    pub(crate) stored_bytes: usize,
}

#[derive(Debug)]
pub(crate) struct GroupFigures {
    pub(crate) members: usize,
    pub(crate) group: Delivery,
    /// A channel post, its subscribers reading their own relays (mirrors).
    pub(crate) channel: Delivery,
    /// The channel's readers on each relay.
    pub(crate) channel_readers: Vec<usize>,
    pub(crate) direct: Delivery,
}

pub(crate) async fn group_vs_direct(
    options: &MeshOptions,
    members: usize,
    concurrency: usize,
) -> anyhow::Result<GroupFigures> {
    let gateway = ed25519::Keypair::generate();
    let sender = Device::create(&options.dir.join("group-sender"), 1, &gateway)?;
    let relays = start_three_relays(options, &gateway, &sender).await?;

    let admin = ed25519::Keypair::generate();
    let group = GroupId::of_admin_key(&admin.public().to_bytes());
    let epoch_key = EpochKey::random();
    let cert = PostCert::sign(&admin, 0, epoch_key.post_keypair().public().to_bytes());
    let group_relay = closest_relay(&relays, group)?;

    // The members: keys, connections, a Hello to the group's relay and to their mailbox's.
    let identities = tokio::task::block_in_place(|| make_identities(&options.dir.join("members"), members))?;
    let gateway = &gateway;
    let connected: Vec<anyhow::Result<(Device, RelayInfo)>> = futures::stream::iter(identities.into_iter().enumerate())
        .map(|(i, identity)| {
            let group_relay = group_relay.clone();
            async move {
                let device = Device::of(identity, 100_000 + i as u64, gateway)?;
                let (mailbox_relays, _) = device.hello(&group_relay).await?;
                let mailbox = mailbox_relays.first().context("no mailbox relay")?.clone();
                device.hello(&mailbox).await?;
                Ok((device, mailbox))
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let members: Vec<Arc<(Device, RelayInfo)>> =
        connected.into_iter().collect::<anyhow::Result<Vec<_>>>()?.into_iter().map(Arc::new).collect();
    let count = members.len();

    // One group post, every member reading the group's closest relay.
    let reads = park_group_reads(&members, group, |_| group_relay.clone());
    settle(count).await;
    let post = group_post(&sender, group, cert, &epoch_key.post_keypair(), &epoch_key);
    let (group_delivery, received) = post_and_collect(&sender, &group_relay, post, reads, 2).await?;
    // Opened after the clock stops: on one machine, 10,000 members' signature checks would
    // otherwise queue behind each other on two cores, which separate devices do not.
    for envelope in &received {
        let seal = GroupSeal::verify(envelope)?;
        epoch_key.open(&envelope.from_device, &envelope.id, &group, 0, &seal.ciphertext)?;
    }

    // One channel post, every subscriber reading its own mailbox relay: those that are not the
    // channel's relays mirror it (`relay::mirror`), so the readers spread over all three.
    let channel_admin = ed25519::Keypair::generate();
    let channel = GroupId::of_admin_key(&channel_admin.public().to_bytes());
    let channel_cert = PostCert::sign(&channel_admin, 0, channel_admin.public().to_bytes());
    let channel_relay = closest_relay(&relays, channel)?;
    let reads = park_group_reads(&members, channel, |m| m.1.clone());
    let channel_readers: Vec<usize> =
        relays.iter().map(|r| members.iter().filter(|m| m.1.peer_id == r.info.peer_id).count()).collect();
    settle(count).await;
    let post = group_post(&sender, channel, channel_cert, &channel_admin, &epoch_key);
    // Kept on its two relays and by the third, which mirrors it.
    let (channel_delivery, received) = post_and_collect(&sender, &channel_relay, post, reads, 3).await?;
    for envelope in &received {
        let seal = GroupSeal::verify(envelope)?;
        epoch_key.open(&envelope.from_device, &envelope.id, &channel, 0, &seal.ciphertext)?;
    }

    // The same message as one envelope per member, each to its own mailbox.
    let parked = members
        .iter()
        .map(|m| {
            let m = Arc::clone(m);
            async move {
                // Sending 10,000 envelopes can outlast one long-poll: ask again (bounded).
                for _ in 0..READS_PER_MEMBER {
                    let fetch = MailboxRequest::Fetch { max: 16, wait_ms: READ_WAIT_MS, ack: Vec::new() };
                    let answer = m.0.call(&m.1, fetch).await?;
                    let at = now_ns();
                    let MailboxResponse::Envelopes { envelopes, .. } = answer else {
                        bail!("Fetch answered {answer:?}")
                    };
                    if let Some(envelope) = envelopes.first() {
                        return Ok((at, envelope.clone()));
                    }
                }
                bail!("nothing arrived within {READS_PER_MEMBER} long-polls")
            }
        })
        .collect::<Vec<_>>();
    let reads = tokio::spawn(futures::future::join_all(parked.into_iter().map(tokio::spawn)));
    settle(count).await;
    let start = now_ns();
    let mut envelopes = Vec::with_capacity(count);
    for m in &members {
        let id = EnvelopeId::random();
        envelopes.push(Envelope {
            id,
            from_user: sender.user,
            from_device: sender.identity.peer_id(),
            to_user: m.0.user,
            to_device: m.0.identity.peer_id(),
            sent_at_ms: unix_ms(),
            seq: 0,
            sealed: seal::seal(&sender.identity, &m.0.identity.noise_public, &id, TEXT.as_bytes())?,
        });
    }
    let stored_bytes = 2 * envelopes.iter().map(Envelope::encoded_len).sum::<usize>();
    for batch in envelopes.chunks(MAX_ENVELOPES_PER_BATCH) {
        match sender.call(&relays[0].info, MailboxRequest::Send { envelopes: batch.to_vec() }).await? {
            MailboxResponse::Stored { .. } => {}
            other => bail!("Send answered {other:?}"),
        }
    }
    let (direct_delivery, received) = collect(start, reads.await?, stored_bytes);
    let by_device: std::collections::HashMap<_, _> = members.iter().map(|m| (m.0.identity.peer_id(), m)).collect();
    for envelope in &received {
        let member = by_device.get(&envelope.to_device).context("delivered to a stranger")?;
        seal::open(&member.0.identity, &envelope.id, &envelope.sealed)?;
    }
    drop(relays);
    Ok(GroupFigures {
        members: count,
        group: group_delivery,
        channel: channel_delivery,
        channel_readers,
        direct: direct_delivery,
    })
}

/// The relay closest to `group`'s mailbox (the first of its `R`).
fn closest_relay(relays: &[RelayProcess], group: GroupId) -> anyhow::Result<RelayInfo> {
    let ids = relays.iter().map(|r| r.info.peer_id);
    let closest = placement::closest_relays(&placement::mailbox_key(&group.mailbox()), ids, 1);
    let relay = relays.iter().find(|r| Some(&r.info.peer_id) == closest.first()).context("no group relay")?;
    Ok(relay.info.clone())
}

/// Each member's long-poll of `group` from its start, on the relay `relay_of` names.
fn park_group_reads(
    members: &[Arc<(Device, RelayInfo)>],
    group: GroupId,
    relay_of: impl Fn(&(Device, RelayInfo)) -> RelayInfo,
) -> tokio::task::JoinHandle<Reads> {
    let parked = members
        .iter()
        .map(|m| {
            let (m, relay) = (Arc::clone(m), relay_of(m));
            async move {
                let read = MailboxRequest::GroupFetch {
                    groups: vec![GroupCursor { group, from: 0 }],
                    max: 16,
                    wait_ms: READ_WAIT_MS,
                };
                let answer = m.0.call(&relay, read).await?;
                let at = now_ns();
                let MailboxResponse::GroupEnvelopes { groups } = answer else {
                    bail!("GroupFetch answered {answer:?}")
                };
                let envelope = groups.first().and_then(|g| g.envelopes.first()).context("an empty answer")?;
                Ok((at, envelope.clone()))
            }
        })
        .collect::<Vec<_>>();
    tokio::spawn(futures::future::join_all(parked.into_iter().map(tokio::spawn)))
}

/// The message, sealed for `group` under `cert` and signed with `post_key`.
fn group_post(
    sender: &Device,
    group: GroupId,
    cert: PostCert,
    post_key: &ed25519::Keypair,
    key: &EpochKey,
) -> Envelope {
    let mut post = Envelope {
        id: EnvelopeId::random(),
        from_user: sender.user,
        from_device: sender.identity.peer_id(),
        to_user: UserId(0),
        to_device: group.mailbox(),
        sent_at_ms: unix_ms(),
        seq: 0,
        sealed: Vec::new(),
    };
    let body = Body::Text { text: TEXT.into(), reply_to: None };
    let ciphertext = key.seal(&sender.identity.keypair, &post.id, &group, 0, MessageId::random(), body);
    GroupSeal::seal(&mut post, group, cert, post_key, ciphertext);
    post
}

/// Posts through `relay` and times the parked reads' answers from the send on; `copies` relays
/// keep the post.
async fn post_and_collect(
    sender: &Device,
    relay: &RelayInfo,
    post: Envelope,
    reads: tokio::task::JoinHandle<Reads>,
    copies: usize,
) -> anyhow::Result<(Delivery, Vec<Envelope>)> {
    let start = now_ns();
    let stored_bytes = copies * post.encoded_len();
    match sender.call(relay, MailboxRequest::Post { envelopes: vec![post] }).await? {
        MailboxResponse::Stored { .. } => {}
        other => bail!("Post answered {other:?}"),
    }
    Ok(collect(start, reads.await?, stored_bytes))
}

/// Gives the members' reads time to reach the relays and park (a read that has not will find
/// the message when it comes; it only counts as later).
async fn settle(members: usize) {
    tokio::time::sleep(Duration::from_millis(1_000 + members as u64)).await;
}

type Reads = Vec<Result<anyhow::Result<(u64, Envelope)>, tokio::task::JoinError>>;

/// The delivery figures, and what was delivered (to be opened).
fn collect(start: u64, reads: Reads, stored_bytes: usize) -> (Delivery, Vec<Envelope>) {
    let (mut latencies, mut received) = (Vec::new(), Vec::new());
    for read in reads {
        match read {
            Ok(Ok((at, envelope))) => {
                latencies.push(at.saturating_sub(start));
                received.push(envelope);
            }
            Ok(Err(e)) => eprintln!("  a member's read failed: {e:#}"),
            Err(e) => eprintln!("  a member's read task failed: {e}"),
        }
    }
    let all = Duration::from_nanos(latencies.iter().copied().max().unwrap_or(0));
    (Delivery { delivered: latencies.len(), latency: Percentiles::of(latencies), all, stored_bytes }, received)
}
