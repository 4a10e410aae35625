//! Groups on the wire: what relays store once per group and check before they store it.
//!
//! A group message is an [`Envelope`] addressed to the group's mailbox ([`GroupId::mailbox`])
//! instead of a device's, whose `sealed` bytes are a [`GroupSeal`]: the ciphertext (sealed by
//! the members' shared epoch key, see `crypto::group`), the epoch's [`PostCert`] and a
//! signature by the epoch's post key over the envelope. The relays hold it in the group's
//! mailbox on the `R` relays closest to it, exactly as they hold a device's (the same log,
//! replication, repair and dedup), but never delete it on anyone's acknowledgement: members
//! read it with `GroupFetch` from a cursor of their own, until it expires.
//!
//! What the relay checks, without learning who the members are:
//! - the post certificate is signed by the group's admin key, whose hash is the group id: only
//!   someone given the admin key (the group's admins) can say which post key an epoch has;
//! - the envelope is signed by that epoch's post key: only someone given the epoch key (the
//!   members of that epoch) can post;
//! - the epoch is not older than the newest this relay has seen for the group: members removed
//!   by a re-key cannot post with the key they kept.
//!
//! Relays learn which group ids exist, how big and when their messages are, which device posts
//! and which devices read each group (`docs/SECURITY.md`). Members' clients check everything
//! again (relays are not trusted with it) and more: the sender's own device signature, and the
//! state of the group that says who may do what.

use libp2p::PeerId;
use libp2p::identity::ed25519;
use libp2p::multihash::Multihash;
use serde::{Deserialize, Serialize};

use crate::ids::{InvalidValue, UserId};
use crate::proto::envelope::Envelope;

/// The multihash code group mailboxes are named with (SHA2-256's; a device's peer id is an
/// identity multihash of its public key), so that no device key can name a group's mailbox and
/// relays tell the two apart by the id alone.
const GROUP_MAILBOX_CODE: u64 = 0x12;
const GROUP_ID_CONTEXT: &str = "meshgram 2026-12 group id v1";
const GROUP_MAILBOX_CONTEXT: &str = "meshgram 2026-12 group mailbox v1";
const POST_CERT_CONTEXT: &[u8] = b"meshgram 2026-12 group post cert v1";
const POST_CONTEXT: &[u8] = b"meshgram 2026-12 group post v1";
/// Chat numbers of groups have this bit set; account numbers never reach it.
const GROUP_CHAT_BIT: u64 = 1 << 63;

/// A group (or channel): the hash of its admin public key, so that the key is bound to the id
/// and a relay checks an admin's signature with no record of the group.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(pub [u8; 16]);

/// As text (JSON) the id reads as it prints, `g…`; on the wire, 16 bytes.
impl Serialize for GroupId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() { s.collect_str(self) } else { self.0.serialize(s) }
    }
}

impl<'de> Deserialize<'de> for GroupId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; 16]>::deserialize(d).map(GroupId)
        }
    }
}

impl GroupId {
    /// The id of the group whose admin key is `admin_key`.
    pub fn of_admin_key(admin_key: &[u8; 32]) -> Self {
        let mut id = [0; 16];
        id.copy_from_slice(&blake3::derive_key(GROUP_ID_CONTEXT, admin_key)[..16]);
        GroupId(id)
    }

    /// The mailbox its messages are stored in: a peer id no device has, placed on the relays
    /// like any mailbox.
    pub fn mailbox(&self) -> PeerId {
        let digest = blake3::derive_key(GROUP_MAILBOX_CONTEXT, &self.0);
        let hash = Multihash::<64>::wrap(GROUP_MAILBOX_CODE, &digest).expect("invariant: 32 bytes fit a multihash");
        PeerId::from_multihash(hash).expect("invariant: SHA2-256-coded multihashes are peer ids")
    }

    /// The number its chat is kept under in a client's history: account numbers with the top
    /// bit set (the gateway hands out small ones), so one table holds every chat.
    pub fn chat_number(&self) -> UserId {
        let mut first = [0; 8];
        first.copy_from_slice(&self.0[..8]);
        UserId(GROUP_CHAT_BIT | (u64::from_be_bytes(first) >> 1))
    }

    /// The last 8 hex digits, for logs.
    pub fn fmt_short(&self) -> String {
        crate::ids::hex(&self.0[12..])
    }
}

/// Whether `chat` (a chat number in a history) is a group's rather than a person's.
pub fn is_group_chat(chat: UserId) -> bool {
    chat.0 & GROUP_CHAT_BIT != 0
}

/// Whether `mailbox` is a group's (see [`GroupId::mailbox`]) rather than a device's.
pub fn is_group_mailbox(mailbox: &PeerId) -> bool {
    let hash: &Multihash<64> = mailbox.as_ref();
    hash.code() == GROUP_MAILBOX_CODE
}

impl std::fmt::Display for GroupId {
    /// `g` and 32 hex digits: told apart from user ids, phones and usernames on a command line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "g{}", crate::ids::hex(&self.0))
    }
}

impl std::fmt::Debug for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GroupId({})", self.fmt_short())
    }
}

impl std::str::FromStr for GroupId {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s
            .strip_prefix('g')
            .ok_or_else(|| InvalidValue(format!("'{s}' is not a group id (g and 32 hex digits)")))?;
        crate::ids::parse_hex::<16>(hex).map(GroupId)
    }
}

/// Why a group message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupWireError {
    #[error("not a group message: {0}")]
    Malformed(String),
    #[error("the post certificate is not signed by the admin key of group {0}")]
    BadCert(GroupId),
    #[error("the message is not signed by the post key of epoch {epoch} of group {group}")]
    BadPostSignature { group: GroupId, epoch: u64 },
    #[error("group {group} is at epoch {current}; epoch {epoch} is over (its members changed)")]
    OldEpoch { group: GroupId, epoch: u64, current: u64 },
}

/// An admin's statement that `post_key` may post to the group in `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostCert {
    /// The group's admin public key (ed25519); its hash is the group id.
    #[serde(with = "crate::ids::hex_or_bytes")]
    pub admin_key: [u8; 32],
    pub epoch: u64,
    /// Ed25519 public key every member of the epoch can sign with.
    #[serde(with = "crate::ids::hex_or_bytes")]
    pub post_key: [u8; 32],
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl PostCert {
    fn signed_bytes(admin_key: &[u8; 32], epoch: u64, post_key: &[u8; 32]) -> Vec<u8> {
        [POST_CERT_CONTEXT, admin_key, &epoch.to_le_bytes(), post_key].concat()
    }

    /// Signs `post_key` for `epoch` with the group's admin key.
    pub fn sign(admin: &ed25519::Keypair, epoch: u64, post_key: [u8; 32]) -> Self {
        let admin_key = admin.public().to_bytes();
        let signature = admin.sign(&Self::signed_bytes(&admin_key, epoch, &post_key));
        PostCert { admin_key, epoch, post_key, signature }
    }

    /// A channel's: only its admin key posts (a group's members share an epoch's post key).
    pub fn is_a_channels(&self) -> bool {
        self.post_key == self.admin_key
    }

    /// Checks it speaks for `group`.
    pub fn verify(&self, group: &GroupId) -> Result<(), GroupWireError> {
        let admin = ed25519::PublicKey::try_from_bytes(&self.admin_key).map_err(|_| GroupWireError::BadCert(*group))?;
        if GroupId::of_admin_key(&self.admin_key) != *group
            || !admin.verify(&Self::signed_bytes(&self.admin_key, self.epoch, &self.post_key), &self.signature)
        {
            return Err(GroupWireError::BadCert(*group));
        }
        Ok(())
    }
}

/// What a group message's envelope carries in place of a one-to-one seal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSeal {
    pub group: GroupId,
    pub cert: PostCert,
    /// Sealed with the epoch key (`crypto::group`); only members of the epoch open it.
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
    /// By the epoch's post key over the envelope's routing fields and the ciphertext's hash.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl GroupSeal {
    /// What the post key signs: everything a relay could otherwise change unnoticed.
    fn signed_bytes(envelope: &Envelope, group: &GroupId, epoch: u64, ciphertext: &[u8]) -> Vec<u8> {
        [
            POST_CONTEXT,
            &envelope.id.0,
            &envelope.from_user.0.to_le_bytes(),
            &envelope.from_device.to_bytes(),
            &envelope.sent_at_ms.to_le_bytes(),
            &envelope.seq.to_le_bytes(),
            &group.0,
            &epoch.to_le_bytes(),
            blake3::hash(ciphertext).as_bytes(),
        ]
        .concat()
    }

    /// Fills in `envelope.sealed` (whose other fields are set) with a seal signed by `post`.
    pub fn seal(envelope: &mut Envelope, group: GroupId, cert: PostCert, post: &ed25519::Keypair, ciphertext: Vec<u8>) {
        let signature = post.sign(&Self::signed_bytes(envelope, &group, cert.epoch, &ciphertext));
        let seal = GroupSeal { group, cert, ciphertext, signature };
        envelope.sealed = postcard::to_stdvec(&seal).expect("invariant: group seals serialize");
    }

    /// Reads a group message's seal and checks what a relay can check: addressed to the group's
    /// mailbox, an admin-signed post certificate, a post signature by it. The epoch's freshness
    /// is the caller's to check ([`GroupWireError::OldEpoch`]).
    pub fn verify(envelope: &Envelope) -> Result<GroupSeal, GroupWireError> {
        let seal: GroupSeal =
            postcard::from_bytes(&envelope.sealed).map_err(|e| GroupWireError::Malformed(e.to_string()))?;
        if envelope.to_device != seal.group.mailbox() {
            return Err(GroupWireError::Malformed(format!(
                "envelope {} is addressed to {}, not to the mailbox of group {}",
                envelope.id, envelope.to_device, seal.group
            )));
        }
        seal.cert.verify(&seal.group)?;
        let post = ed25519::PublicKey::try_from_bytes(&seal.cert.post_key)
            .map_err(|_| GroupWireError::BadPostSignature { group: seal.group, epoch: seal.cert.epoch })?;
        if !post.verify(&Self::signed_bytes(envelope, &seal.group, seal.cert.epoch, &seal.ciphertext), &seal.signature)
        {
            return Err(GroupWireError::BadPostSignature { group: seal.group, epoch: seal.cert.epoch });
        }
        Ok(seal)
    }

    /// The epoch it was posted in, read from an envelope that was verified when stored.
    pub fn epoch_of(envelope: &Envelope) -> Option<(GroupId, u64)> {
        postcard::from_bytes::<GroupSeal>(&envelope.sealed).ok().map(|s| (s.group, s.cert.epoch))
    }
}

/// Where a member reads a group from on one relay: the arrival number there to start at (0: from
/// the oldest message the relay holds). Arrival numbers are each relay's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupCursor {
    pub group: GroupId,
    pub from: u64,
}

/// One group's messages in a `GroupFetch` answer, in arrival order on the answering relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupBatch {
    pub group: GroupId,
    pub envelopes: Vec<Envelope>,
    /// The cursor to read on from, on this relay.
    pub next: u64,
    /// Cut short: more wait.
    pub more: bool,
}

/// Members a group may have: its state (see [`GroupState`]) travels whole in one sealed
/// envelope to each member (a unit test checks a full one fits).
pub const MAX_GROUP_MEMBERS: usize = 4000;
/// Invite links a group may have open at once.
pub const MAX_GROUP_INVITES: usize = 100;
/// Longest title and description, in characters (Telegram's limits).
pub const MAX_GROUP_TITLE_CHARS: usize = 128;
pub const MAX_GROUP_DESCRIPTION_CHARS: usize = 255;

/// A member and whether they are an admin (may add and remove members, change the title, the
/// description and the pin, make invite links and other admins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub user: UserId,
    pub admin: bool,
}

/// An open invite link: the hash of its secret (the link carries the secret), and the admin
/// whose devices admit those who present it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invite {
    #[serde(with = "crate::ids::hex_or_bytes")]
    pub hash: [u8; 32],
    pub admin: UserId,
}

/// What a group is, as its admins say (each version sent whole, pairwise, to every member
/// device): who is in it and who may do what. Members accept a version only from someone who is
/// an admin in the version they hold, and only a newer one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    pub group: GroupId,
    /// The admin public key (its hash is the group id).
    #[serde(with = "crate::ids::hex_or_bytes")]
    pub admin_key: [u8; 32],
    /// Goes up by one with every change.
    pub version: u64,
    /// Goes up by one with every change of members; each epoch has its own key.
    pub epoch: u64,
    pub title: String,
    pub description: String,
    pub members: Vec<Member>,
    pub invites: Vec<Invite>,
    pub pinned: Option<crate::proto::payload::MessageId>,
    /// Who made this version.
    pub changed_by: UserId,
    pub kind: GroupKind,
    /// Channels: subscribers as the admins' device counts them (members are the admins).
    pub subscribers: u64,
}

/// A group, or a channel: one-to-many, where only admins post (their post key is the admin
/// key itself, so relays refuse anyone else's posts) and subscribers are not in the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupKind {
    Group,
    /// `public`: the epoch key is in the channel's link, so anyone with the link reads (and
    /// checks each post against the channel id, offline); otherwise it is handed to each
    /// subscriber an admin's device lets in.
    Channel {
        public: bool,
    },
}

impl GroupState {
    pub fn member(&self, user: UserId) -> Option<&Member> {
        self.members.iter().find(|m| m.user == user)
    }

    pub fn is_admin(&self, user: UserId) -> bool {
        self.member(user).is_some_and(|m| m.admin)
    }

    pub fn is_channel(&self) -> bool {
        matches!(self.kind, GroupKind::Channel { .. })
    }
}

/// Groups per `GroupFetch`: a user in more reads them in several requests.
pub const MAX_GROUPS_PER_FETCH: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::envelope::EnvelopeId;

    fn envelope(group: GroupId) -> Envelope {
        Envelope {
            id: EnvelopeId::random(),
            from_user: UserId(7),
            from_device: PeerId::random(),
            to_user: UserId(0),
            to_device: group.mailbox(),
            sent_at_ms: 1,
            seq: 0,
            sealed: Vec::new(),
        }
    }

    #[test]
    fn group_mailboxes_are_told_apart_from_devices_and_chat_numbers_from_accounts() {
        let admin = ed25519::Keypair::generate();
        let group = GroupId::of_admin_key(&admin.public().to_bytes());
        assert!(is_group_mailbox(&group.mailbox()));
        assert!(!is_group_mailbox(&libp2p::identity::Keypair::generate_ed25519().public().to_peer_id()));
        assert!(is_group_chat(group.chat_number()) && !is_group_chat(UserId(12345)));
        assert_eq!(group.to_string().parse::<GroupId>().unwrap(), group);
        assert!("12".parse::<GroupId>().is_err());
        let json = serde_json::to_string(&group).unwrap();
        assert_eq!(json, format!("\"{group}\""));
        assert_eq!(serde_json::from_str::<GroupId>(&json).unwrap(), group);
        assert_eq!(postcard::from_bytes::<GroupId>(&postcard::to_stdvec(&group).unwrap()).unwrap(), group);
    }

    #[test]
    fn only_the_admin_key_certifies_and_only_the_post_key_posts() {
        let (admin, post, stranger) =
            (ed25519::Keypair::generate(), ed25519::Keypair::generate(), ed25519::Keypair::generate());
        let group = GroupId::of_admin_key(&admin.public().to_bytes());
        let cert = PostCert::sign(&admin, 3, post.public().to_bytes());
        let mut e = envelope(group);
        GroupSeal::seal(&mut e, group, cert.clone(), &post, b"ciphertext".to_vec());
        assert_eq!(GroupSeal::verify(&e).unwrap().cert.epoch, 3);

        let mut rewritten = e.clone();
        rewritten.from_user = UserId(8);
        assert!(matches!(GroupSeal::verify(&rewritten), Err(GroupWireError::BadPostSignature { .. })));

        let mut by_stranger = envelope(group);
        GroupSeal::seal(&mut by_stranger, group, cert, &stranger, b"x".to_vec());
        assert!(matches!(GroupSeal::verify(&by_stranger), Err(GroupWireError::BadPostSignature { .. })));

        let forged = PostCert::sign(&stranger, 4, stranger.public().to_bytes());
        let mut forged_e = envelope(group);
        GroupSeal::seal(&mut forged_e, group, forged, &stranger, b"x".to_vec());
        assert_eq!(GroupSeal::verify(&forged_e), Err(GroupWireError::BadCert(group)));

        let mut elsewhere = e.clone();
        elsewhere.to_device = PeerId::random();
        assert!(matches!(GroupSeal::verify(&elsewhere), Err(GroupWireError::Malformed(_))));
        elsewhere.to_device = group.mailbox();
        elsewhere.sealed = vec![1, 2, 3];
        assert!(matches!(GroupSeal::verify(&elsewhere), Err(GroupWireError::Malformed(_))));
    }
}
