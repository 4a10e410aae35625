//! Mirrors: the channels this relay reads from their own relays for the readers it serves, so
//! that a channel's 100,000 readers spread over every relay while the channel's `R` relays
//! answer one read per mirroring relay, not one per reader.
//!
//! A subscriber's client reads a channel from its own mailbox relay. When that relay is not one
//! of the channel's `R` relays, it follows the channel: it reads it from the closest of them with
//! the replica protocol's `GroupFetch` (the same cursors and long-poll as a member's read; one
//! read per origin relay for all the groups followed there), checks every post as it would a
//! member's (`GroupSeal::verify`: a lying origin cannot make it serve forged posts), keeps them
//! in its store (deduplicated by id, under the group's mailbox, with its own arrival numbers),
//! and wakes its parked readers. Copies kept this way expire no later than the original
//! would (see [`expiry_of`]), so repair, which pushes what any relay holds to the responsible
//! relays, never brings an expired post back.
//!
//! Only channels are mirrored: a group's members (at most a few thousand) read it from its own
//! relays, which answer them all in tens of milliseconds, and its messages stay on exactly `R`
//! relays. A relay tells a group from a channel by the first post it reads (a channel's post
//! certificate names the admin key itself as the post key), stores none of a group's, and
//! leaves the group alone for a while ([`IDLE_AFTER`]).
//!
//! A group is followed while readers ask for it ([`IDLE_AFTER`]); a reader's first read of a
//! group waits (up to [`CATCH_UP_WAIT`]) for the mirror to have read the origin once, so that
//! "read it now" finds what was posted before the mirror started. When placement moves the
//! group's relays, the mirror reads the new closest one from its start (deduplicated here).
//!
//! What a mirroring relay learns is what the group's own relays learn: which devices read
//! which group id, and the posts' sizes and times (docs/SECURITY.md).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use meshgram_node::proto::envelope::Envelope;
use meshgram_node::proto::group::{GroupBatch, GroupCursor, GroupId, GroupSeal, MAX_GROUPS_PER_FETCH};

use crate::store::{StoreError, StoreHandle};

/// A group nobody has asked this relay for in this long is no longer followed.
pub(crate) const IDLE_AFTER: Duration = Duration::from_secs(180);
/// How long a reader's read waits for the mirror's first read of a group it starts following:
/// well inside the few seconds a client gives a relay beyond the wait it asked for.
pub(crate) const CATCH_UP_WAIT: Duration = Duration::from_secs(3);
/// How long a mirror's read of an origin long-polls there.
pub(crate) const FOLLOW_WAIT_MS: u32 = 20_000;
/// After a failed read of an origin, the next waits this long (the origin is reported down, so
/// placement may name another by then).
pub(crate) const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// Groups followed at most: as many as one read of an origin carries, so that however they fall
/// on the origins, every one is in its origin's read.
const MAX_FOLLOWED: usize = MAX_GROUPS_PER_FETCH;
/// Copies are kept to the hour before their original expires, never after it.
const EXPIRY_ROUNDING_SECS: u64 = 3600;

/// One followed group.
#[derive(Debug)]
struct Followed {
    wanted_at: Instant,
    /// The relay it is read from, and the cursor there (arrival numbers are each relay's own).
    origin: Option<PeerId>,
    from: u64,
    /// The origin has been read up to its newest once.
    caught_up: bool,
    /// The origin answered posts of it: a channel that exists. Until then (an id nobody posts
    /// to, say) it is the first to make room for another.
    posts_seen: bool,
}

/// A read of one origin under way: which generation of its group set it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReadId {
    pub(crate) origin: PeerId,
    generation: u64,
}

/// A read to start: from `id.origin`, these cursors, long-polling `wait_ms`.
#[derive(Debug)]
pub(crate) struct PlannedRead {
    pub(crate) id: ReadId,
    pub(crate) cursors: Vec<GroupCursor>,
    pub(crate) wait_ms: u32,
}

/// What [`Mirrors::want`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    /// It was followed already.
    Followed,
    /// It is followed from now on: plan the reads.
    New,
    /// This relay follows as many groups as it may.
    Full,
    /// It is a group, not a channel: read from this relay's store as any group.
    NotAChannel,
}

/// The groups this relay follows and the reads of their origins under way.
#[derive(Debug, Default)]
pub(crate) struct Mirrors {
    followed: HashMap<GroupId, Followed>,
    /// Origins with a read under way, and the generation it was started for.
    reading: HashMap<PeerId, u64>,
    /// Set anew (from `next_generation`, never reused) when an origin's set of groups changes,
    /// so that a read covering the old set is replaced by one covering the new (the origin
    /// answers the older one empty).
    generations: HashMap<PeerId, u64>,
    next_generation: u64,
    /// Groups found not to be channels, and when.
    not_channels: HashMap<GroupId, Instant>,
}

impl Mirrors {
    /// A reader asked for `group`: follow it, or keep following it.
    pub(crate) fn want(&mut self, group: GroupId, now: Instant) -> Want {
        if let Some(found_at) = self.not_channels.get(&group) {
            if now.duration_since(*found_at) < IDLE_AFTER {
                return Want::NotAChannel;
            }
            self.not_channels.remove(&group);
        }
        if let Some(followed) = self.followed.get_mut(&group) {
            followed.wanted_at = now;
            return Want::Followed;
        }
        if self.followed.len() >= MAX_FOLLOWED {
            // Ids nobody posts to (made up, say) make room for this one; real channels do not.
            let unproven = self.followed.iter().filter(|(_, f)| !f.posts_seen).min_by_key(|(_, f)| f.wanted_at);
            let Some((&evicted, _)) = unproven else { return Want::Full };
            self.followed.remove(&evicted);
        }
        let followed = Followed { wanted_at: now, origin: None, from: 0, caught_up: false, posts_seen: false };
        self.followed.insert(group, followed);
        Want::New
    }

    /// Keeps following the groups `wanted` says are still wanted without a read (devices to wake
    /// for their posts), as if a reader had asked now. Only groups followed already: this never
    /// starts following one.
    pub(crate) fn keep_wanted(&mut self, now: Instant, wanted: impl Fn(&GroupId) -> bool) {
        for (group, followed) in &mut self.followed {
            if wanted(group) {
                followed.wanted_at = now;
            }
        }
    }

    /// `group`'s posts show it is a group, not a channel: it is no longer followed.
    pub(crate) fn not_a_channel(&mut self, group: GroupId, now: Instant) {
        self.followed.remove(&group);
        if self.not_channels.len() >= MAX_FOLLOWED {
            self.not_channels.retain(|_, found_at| now.duration_since(*found_at) < IDLE_AFTER);
        }
        self.not_channels.insert(group, now);
    }

    /// Whether a read of `group` here should wait for the mirror's first read of it.
    pub(crate) fn catching_up(&self, group: &GroupId) -> bool {
        self.followed.get(group).is_some_and(|f| !f.caught_up)
    }

    pub(crate) fn followed(&self) -> usize {
        self.followed.len()
    }

    /// Drops groups nobody asked for lately, places each on its origin (`origin_of`: `None`
    /// when this relay is one of the group's own relays, or knows none, which ends the
    /// following), and gives the reads to start: one per origin without a read under way for
    /// its current groups.
    pub(crate) fn plan(
        &mut self,
        now: Instant,
        mut origin_of: impl FnMut(&GroupId) -> Option<PeerId>,
    ) -> Vec<PlannedRead> {
        self.followed.retain(|_, f| now.duration_since(f.wanted_at) < IDLE_AFTER);
        let mut changed = HashSet::new();
        let mut by_origin: HashMap<PeerId, Vec<GroupCursor>> = HashMap::new();
        self.followed.retain(|group, followed| {
            let Some(origin) = origin_of(group) else {
                changed.extend(followed.origin);
                return false;
            };
            if followed.origin != Some(origin) {
                changed.extend(followed.origin);
                changed.insert(origin);
                // Arrival numbers are the old origin's: read the new one from its start.
                (followed.origin, followed.from) = (Some(origin), 0);
            }
            by_origin.entry(origin).or_default().push(GroupCursor { group: *group, from: followed.from });
            true
        });
        for origin in changed {
            self.next_generation += 1;
            self.generations.insert(origin, self.next_generation);
        }
        self.generations.retain(|origin, _| by_origin.contains_key(origin) || self.reading.contains_key(origin));
        let mut reads = Vec::new();
        for (origin, mut cursors) in by_origin {
            let generation = self.generations.get(&origin).copied().unwrap_or(0);
            if self.reading.get(&origin) == Some(&generation) {
                continue;
            }
            cursors.sort_by_key(|c| c.group);
            cursors.truncate(MAX_GROUPS_PER_FETCH);
            let catching_up = cursors.iter().any(|c| self.catching_up(&c.group));
            self.reading.insert(origin, generation);
            let wait_ms = if catching_up { 0 } else { FOLLOW_WAIT_MS };
            reads.push(PlannedRead { id: ReadId { origin, generation }, cursors, wait_ms });
        }
        reads
    }

    /// A read finished: what the origin answered (`None`: it failed). Moves the cursors on and
    /// gives the groups now read up to the origin's newest for the first time, whose waiting
    /// readers may be answered.
    pub(crate) fn read_done(
        &mut self,
        id: ReadId,
        cursors: &[GroupCursor],
        answered: Option<&Answered>,
    ) -> Vec<GroupId> {
        // A replaced read was answered empty by the origin: it says nothing of being caught up.
        let current = self.reading.get(&id.origin) == Some(&id.generation);
        if current {
            self.reading.remove(&id.origin);
        }
        let Some(answered) = answered else { return Vec::new() };
        let mut caught_up = Vec::new();
        for cursor in cursors {
            let Some(followed) = self.followed.get_mut(&cursor.group) else { continue };
            if followed.origin != Some(id.origin) {
                continue;
            }
            let batch = answered.batches.iter().find(|b| b.group == cursor.group);
            if let Some(batch) = batch {
                // An older read's answer may come after a newer one's: cursors only go on.
                followed.from = followed.from.max(batch.next);
                followed.posts_seen |= batch.posts > 0;
            }
            // A group left out of a full answer may have posts the answer had no room for.
            let read_to_the_end = batch.map_or(answered.complete, |b| !b.more);
            if current && !followed.caught_up && read_to_the_end {
                followed.caught_up = true;
                caught_up.push(cursor.group);
            }
        }
        caught_up
    }
}

/// What an origin answered a mirror's read, once its posts are kept: where each group's read
/// got to.
#[derive(Debug, Default)]
pub(crate) struct Answered {
    batches: Vec<AnsweredGroup>,
    /// The answer held fewer posts than it could: a group it left out has nothing new.
    complete: bool,
}

#[derive(Debug)]
struct AnsweredGroup {
    group: GroupId,
    next: u64,
    more: bool,
    posts: usize,
}

impl Answered {
    /// Of an answer to a read of at most `max` posts.
    pub(crate) fn of(batches: &[GroupBatch], max: usize) -> Self {
        let total: usize = batches.iter().map(|b| b.envelopes.len()).sum();
        let batches = batches
            .iter()
            .map(|b| AnsweredGroup { group: b.group, next: b.next, more: b.more, posts: b.envelopes.len() })
            .collect();
        Answered { batches, complete: total < max }
    }
}

/// What [`keep`] kept.
#[derive(Debug, Default)]
pub(crate) struct Kept {
    /// Group mailboxes that got something.
    pub(crate) arrived: Vec<PeerId>,
    /// Groups whose posts show they are not channels (nothing of theirs is kept).
    pub(crate) not_channels: Vec<GroupId>,
}

/// Checks and keeps what an origin answered. A post that fails the check is dropped (and
/// logged): readers check again, but a relay serving many readers should not hand them what it
/// can tell is forged.
pub(crate) async fn keep(store: &StoreHandle, batches: &[GroupBatch], now: u64) -> Result<Kept, StoreError> {
    let mut kept = Kept::default();
    for batch in batches {
        let mailbox = batch.group.mailbox();
        let mut by_expiry: HashMap<u64, Vec<Envelope>> = HashMap::new();
        for envelope in &batch.envelopes {
            let seal = GroupSeal::verify(envelope).ok().filter(|seal| seal.group == batch.group);
            let Some(seal) = seal else {
                tracing::warn!(group = %batch.group, envelope = %envelope.id, "an origin relay answered a post that fails its check; dropped");
                continue;
            };
            if !seal.cert.is_a_channels() {
                kept.not_channels.push(batch.group);
                by_expiry.clear();
                break;
            }
            let expires_at = expiry_of(envelope, now, store.ttl());
            if expires_at > now {
                by_expiry.entry(expires_at).or_default().push(envelope.clone());
            }
        }
        if by_expiry.is_empty() {
            continue;
        }
        for (expires_at, envelopes) in by_expiry {
            store.put(envelopes, now, Some(expires_at)).await?;
        }
        kept.arrived.push(mailbox);
    }
    Ok(kept)
}

/// When a mirrored copy expires: the TTL from when it was sent (or from now, if its sender's
/// clock is ahead), rounded down to the hour. The original was stored when it was sent, so
/// the copy goes first, and repair never pushes it back to a relay that expired the original.
fn expiry_of(envelope: &Envelope, now: u64, ttl: Duration) -> u64 {
    let sent = (envelope.sent_at_ms / 1000).min(now);
    let expires_at = sent.saturating_add(ttl.as_secs());
    expires_at - expires_at % EXPIRY_ROUNDING_SECS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(n: u8) -> GroupId {
        GroupId([n; 16])
    }

    fn answered(batches: Vec<GroupBatch>) -> Answered {
        Answered::of(&batches, 256)
    }

    #[test]
    fn made_up_ids_make_room_for_real_channels_and_a_full_answer_catches_up_only_what_it_holds() {
        let (mut mirrors, now) = (Mirrors::default(), Instant::now());
        let origin = PeerId::random();
        // A real channel, with posts.
        let mut real = GroupId([0; 16]);
        real.0[..8].copy_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(mirrors.want(real, now), Want::New);
        let read = mirrors.plan(now, |_| Some(origin)).remove(0);
        let post = Envelope {
            id: meshgram_node::proto::envelope::EnvelopeId::random(),
            from_user: meshgram_node::ids::UserId(1),
            from_device: PeerId::random(),
            to_user: meshgram_node::ids::UserId(0),
            to_device: real.mailbox(),
            sent_at_ms: 0,
            seq: 0,
            sealed: vec![1],
        };
        let with_post = answered(vec![GroupBatch { group: real, envelopes: vec![post.clone()], next: 1, more: false }]);
        assert_eq!(mirrors.read_done(read.id, &read.cursors, Some(&with_post)), vec![real]);
        // A reader names made-up ids until the mirror is full, and then more: they replace each
        // other, never the real channel.
        for n in 0..(MAX_FOLLOWED as u32 + 50) {
            let mut fake = GroupId([0; 16]);
            fake.0[..4].copy_from_slice(&n.to_be_bytes());
            assert_eq!(mirrors.want(fake, now), Want::New);
        }
        assert_eq!(mirrors.followed(), MAX_FOLLOWED);
        assert_eq!(mirrors.want(real, now), Want::Followed, "the real channel is still followed");

        // An answer cut at its limit leaves the groups it had no room for catching up.
        let reads = mirrors.plan(now, |_| Some(origin));
        let mut cut = answered(vec![GroupBatch { group: real, envelopes: vec![post], next: 2, more: false }]);
        cut.complete = false;
        mirrors.read_done(reads[0].id, &reads[0].cursors, Some(&cut));
        assert!(reads[0].cursors.iter().filter(|c| c.group != real).all(|c| mirrors.catching_up(&c.group)));
    }

    #[test]
    fn one_read_per_origin_replaced_when_its_groups_change_and_idle_groups_dropped() {
        let (mut mirrors, start) = (Mirrors::default(), Instant::now());
        let (a, b) = (PeerId::random(), PeerId::random());
        assert_eq!(mirrors.want(group(1), start), Want::New);
        assert_eq!(mirrors.want(group(2), start), Want::New);
        let origin = |g: &GroupId| Some(if g.0[0] == 3 { b } else { a });
        let reads = mirrors.plan(start, origin);
        assert_eq!(reads.len(), 1);
        assert_eq!(reads[0].wait_ms, 0, "nothing read yet: a catch-up read, not a long-poll");
        assert_eq!(reads[0].cursors.len(), 2);
        assert!(mirrors.plan(start, origin).is_empty(), "a read of that origin is under way");

        // The catch-up answered: cursors move, both groups are caught up, the next read long-polls.
        let answer = answered(vec![GroupBatch { group: group(1), envelopes: Vec::new(), next: 7, more: false }]);
        let caught = mirrors.read_done(reads[0].id, &reads[0].cursors, Some(&answer));
        assert_eq!(caught.len(), 2);
        let reads = mirrors.plan(start, origin);
        assert_eq!(reads[0].wait_ms, FOLLOW_WAIT_MS);
        assert!(reads[0].cursors.contains(&GroupCursor { group: group(1), from: 7 }));

        // A new group on the same origin replaces the parked read; one on another gets its own.
        mirrors.want(group(1), start);
        mirrors.want(group(3), start);
        assert!(mirrors.plan(start, origin).iter().all(|r| r.id.origin == b), "group 3 is new, on b");
        mirrors.want(group(4), start);
        let replaced = mirrors.plan(start, origin);
        assert_eq!(replaced.len(), 1);
        assert_eq!(replaced[0].cursors.len(), 3, "a's read now covers groups 1, 2 and 4");
        // The replaced read's late answer moves nothing back.
        let late = answered(vec![GroupBatch { group: group(1), envelopes: Vec::new(), next: 3, more: false }]);
        mirrors.read_done(reads[0].id, &reads[0].cursors, Some(&late));
        assert!(mirrors.plan(start, origin).is_empty(), "the newer read is still under way");

        // Nobody asks for a while: the groups go, but for one read and one with devices to
        // wake for its posts.
        let later = start + IDLE_AFTER + Duration::from_secs(1);
        mirrors.want(group(1), later);
        mirrors.keep_wanted(later, |g| *g == group(2) || *g == group(9));
        mirrors.plan(later, origin);
        assert_eq!(mirrors.followed(), 2, "groups 1 and 2; 9 was never followed, and is not now");
    }

    #[test]
    fn a_group_placed_here_or_moved_is_dropped_or_read_from_the_start_of_its_new_origin() {
        let (mut mirrors, now) = (Mirrors::default(), Instant::now());
        let (a, b) = (PeerId::random(), PeerId::random());
        mirrors.want(group(1), now);
        let read = mirrors.plan(now, |_| Some(a)).remove(0);
        let answer = answered(vec![GroupBatch { group: group(1), envelopes: Vec::new(), next: 9, more: false }]);
        mirrors.read_done(read.id, &read.cursors, Some(&answer));
        let moved = mirrors.plan(now, |_| Some(b));
        assert_eq!(moved[0].cursors, vec![GroupCursor { group: group(1), from: 0 }]);
        assert!(mirrors.plan(now, |_| None).is_empty());
        assert_eq!(mirrors.followed(), 0, "this relay became one of the group's own");
    }

    #[test]
    fn a_copy_expires_before_its_original() {
        let ttl = Duration::from_secs(7 * 86_400);
        let mut envelope = Envelope {
            id: meshgram_node::proto::envelope::EnvelopeId::random(),
            from_user: meshgram_node::ids::UserId(1),
            from_device: PeerId::random(),
            to_user: meshgram_node::ids::UserId(0),
            to_device: group(1).mailbox(),
            sent_at_ms: 1_000_000_000_000,
            seq: 0,
            sealed: vec![1],
        };
        let now = 1_000_000_500;
        let expires = expiry_of(&envelope, now, ttl);
        assert!(
            expires <= 1_000_000_000 + ttl.as_secs() && expires + EXPIRY_ROUNDING_SECS > 1_000_000_000 + ttl.as_secs()
        );
        envelope.sent_at_ms = u64::MAX;
        assert!(expiry_of(&envelope, now, ttl) <= now + ttl.as_secs(), "a sender clock ahead gives no longer life");
    }
}
