//! Tunables shared by every role, each with the reason for its value.

use std::time::Duration;

/// How long a request may take end to end. Sign-in with a 2FA password runs argon2 (~0.1 s),
/// and a gateway under load queues requests; 30 s is long enough never to fail a slow but
/// healthy call and short enough that a dead peer is reported while the user still waits.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Clients keep an idle connection this long: a CLI command is done in well under a second,
/// while a daemon talks to its gateway every few minutes (certificate renewal).
pub const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Servers keep idle client connections for an hour: reconnecting costs a handshake, an idle
/// yamux connection costs a few KiB.
pub const SERVER_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Commands queued to a swarm's event loop before callers wait: enough for bursts, bounded.
pub const COMMAND_QUEUE: usize = 256;

/// Renew a session certificate once less than this much validity is left (or half its life has
/// passed, if that comes first).
pub const CERT_RENEW_BEFORE_SECS: u64 = 10 * 60;

/// Mailbox requests include long-polls of up to 25 s (`MAX_FETCH_WAIT_MS`) and sends that wait
/// for R durable copies; a minute covers both with room for a loaded relay.
pub const MAILBOX_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A media request moves up to 1 MiB and, for a part, waits for R synced copies of it: 60 s
/// covers a slow disk and a slow link; the client's own deadline per part is shorter
/// (`MEDIA_PART_DEADLINE`), after which it tries another relay.
pub const MEDIA_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a client gives a relay to save a part (R synced copies of up to 1 MiB) or hand over
/// a chunk before it asks another: a hundred times a healthy answer on a slow link.
pub const MEDIA_PART_DEADLINE: Duration = Duration::from_secs(30);

/// Parts a client keeps in flight, uploading or downloading: enough to keep the link and the
/// relays' disks busy while one part waits for its copies, few enough that memory stays a few
/// MiB whatever the file's size.
pub const MEDIA_PARTS_IN_FLIGHT: usize = 8;

/// How long a client gives a relay to answer a request that does not wait for mail (greeting,
/// acknowledging, fetching what is there), on top of a fetch's long-poll: a relay that is
/// stopped or swamped costs this, then the next relay is asked.
pub const RELAY_ANSWER_DEADLINE: Duration = Duration::from_secs(5);

/// How long a client gives a relay to store a `Send` on R relays: a relay gives each replica
/// 3 s before it tries the next one, so two slow replicas and the commits fit; past it the next
/// relay is asked (a resend is safe: relays report duplicates).
pub const SEND_DEADLINE: Duration = Duration::from_secs(10);

/// A relay that failed to answer is asked last for this long: long enough that a stopped relay
/// costs one deadline, not one per request, short enough that one that is back gets its turn
/// again soon.
pub const UNRESPONSIVE_RELAY_LAST_FOR: Duration = Duration::from_secs(30);

/// How long a client's `Fetch` waits for new envelopes before the relay answers empty.
pub const FETCH_WAIT_MS: u32 = 20_000;

/// The gateway's signing key in its data dir (also its libp2p identity). `meshgram up` and
/// `meshgram-gateway relay-cert` read it to admit relays.
pub const GATEWAY_KEY_FILE: &str = "gateway.key";
/// A relay's libp2p identity in its data dir.
pub const RELAY_KEY_FILE: &str = "relay.key";
/// A relay's certificate from the gateway in its data dir (JSON), unless given elsewhere.
pub const RELAY_CERT_FILE: &str = "relay.cert";
/// Relay certificates `meshgram up` and `meshgram-gateway relay-cert` issue last this long.
pub const RELAY_CERT_DAYS: u64 = 365;

/// Calls queued to a client node before callers wait: front ends make a handful at a time.
pub const NODE_CALL_QUEUE: usize = 64;
/// Events a slow subscriber may fall behind by before it is told it lagged (it then reads the
/// history): a burst of a few hundred messages fits.
pub const NODE_EVENT_QUEUE: usize = 1024;
/// How often a client node checks whether its certificate is due for renewal (a comparison of
/// two numbers until it is): far inside the renewal margin, so a renewal that fails is retried
/// many times before the certificate expires.
pub const NODE_RENEW_CHECK: Duration = Duration::from_secs(5);
/// How often a running client node looks whether a scheduled backup is due: a few seconds late
/// costs nothing, and looking costs one read of the history.
pub const NODE_BACKUP_CHECK: Duration = Duration::from_secs(2);
/// How long a client node waits after a failed poll of its relays before polling again.
pub const NODE_RETRY_AFTER: Duration = Duration::from_secs(1);
/// The longest a client node waits between polls while envelopes wait to be verified (the
/// gateway is away): new messages from others are late by at most this much meanwhile.
pub const NODE_DEFERRED_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// The longest call a client node's control socket reads: the largest is `send --lines`, a
/// batch of texts of at most 4,096 characters each; 64 MiB (thousands of full-length messages)
/// bounds memory, not use. Only the profile's owner can connect at all.
pub const CONTROL_MAX_LINE: usize = 64 * 1024 * 1024;

/// A cached directory card younger than this is used as it is when sending; an older one is
/// looked up again (so a contact's new or removed device is picked up within a minute), and
/// used anyway when the gateway cannot be reached.
pub const CARD_FRESH_SECS: u64 = 60;

/// How long a command waits for another process of the same profile (a one-shot command, a
/// node still starting) before it gives up: one-shot commands take well under a second, a node
/// starts in a few.
pub const PROFILE_BUSY_WAIT: Duration = Duration::from_secs(30);
/// How often a command waiting for a busy profile looks again.
pub const PROFILE_BUSY_POLL: Duration = Duration::from_millis(50);

/// A cached card older than this is looked up again before it vouches for a received envelope,
/// so a device its owner removed stops being trusted within ten minutes (the cached card still
/// serves while the gateway cannot be reached).
pub const CARD_TRUST_SECS: u64 = 600;

/// How often a client node tries its outbox again while messages wait there: soon enough that
/// a message goes out within seconds of a relay coming back, rare enough to cost nothing.
pub const NODE_OUTBOX_RETRY: Duration = Duration::from_secs(2);

/// How long pressing a bot's inline button waits for the bot's answer before it returns
/// without one (the answer is still shown when it comes): Telegram's clients wait as long.
pub const PRESS_ANSWER_WAIT: Duration = Duration::from_secs(10);
