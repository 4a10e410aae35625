//! Gateway tunables, each with the reason for its default. All can be changed in the config
//! file's `[limits]` table.

/// Login codes live five minutes: long enough to switch apps and type, short enough that a
/// leaked old code is useless.
pub const CODE_TTL_SECS: u64 = 300;
/// Five digits, like Telegram: with the attempt limit below, a guess succeeds with p = 5e-5.
pub const CODE_LENGTH: u8 = 5;
/// Wrong codes one device may try for a number (however many codes it asks for) before it is
/// locked out of that number. Per device: an attacker's guesses lock out the attacker, not the
/// number's owner, whose device guesses at a code of its own.
pub const MAX_CODE_ATTEMPTS: u32 = 5;
/// Wrong codes for a number from every device together (each within a lockout period of the
/// last) before the number takes none for a while: devices are free, so this bounds the
/// guesses at a number, while one address (see `WRONG_CODE_IP_BURST`) cannot reach it alone.
pub const MAX_CODE_ATTEMPTS_PER_PHONE: u32 = 50;
/// How long a device, or a number, is locked out after too many wrong codes.
pub const CODE_LOCKOUT_SECS: u64 = 900;
/// Codes per phone in a burst: a user who mistypes the number or loses an SMS can retry.
pub const SEND_CODE_BURST: u32 = 5;
/// Then one more code per ten minutes, so nobody can use us to spam a number.
pub const SEND_CODE_REFILL_SECS: u64 = 600;
/// Wrong 2FA passwords per account before it takes none for a while. Per account, durably:
/// devices are free, so a limit per device bounds nothing, and a wrong password does not use
/// up the login code. Only someone holding a valid login code gets to guess at all.
pub const MAX_PASSWORD_ATTEMPTS: u32 = 5;
/// How long an account takes no password after that: an hour, so that guessing a password of
/// any strength takes years.
pub const PASSWORD_LOCKOUT_SECS: u64 = 3600;
/// Directory lookups per account in a burst: a new device resolving its contacts and chats.
pub const LOOKUP_BURST: u32 = 600;
/// Then this many per second: enough for any person or bot, and slow to enumerate a directory
/// of sequential user ids and phone numbers with.
pub const LOOKUPS_PER_SECOND: u32 = 10;
/// Codes one device may ask for in a burst, whatever the numbers: a person mistyping theirs a
/// few times, not a script walking a number range.
pub const SEND_CODE_DEVICE_BURST: u32 = 10;
/// Then one more per minute.
pub const SEND_CODE_DEVICE_REFILL_SECS: u64 = 60;
/// Codes one IP address may ask for in a burst: a household or an office signing up, not a
/// farm of devices (which are free; addresses are not).
pub const SEND_CODE_IP_BURST: u32 = 50;
/// Then one more per half minute.
pub const SEND_CODE_IP_REFILL_SECS: u64 = 30;
/// Wrong codes from one IP address in a burst, whatever the numbers and devices: a household
/// mistyping, well under what locks a number out (`MAX_CODE_ATTEMPTS_PER_PHONE`).
pub const WRONG_CODE_IP_BURST: u32 = 20;
/// Then one more per minute.
pub const WRONG_CODE_IP_REFILL_SECS: u64 = 60;
/// Codes handed to an SMS webhook at once: a slow provider then costs this many of the
/// gateway's request threads, not all of them.
pub const MAX_WEBHOOK_DELIVERIES: u32 = 16;
/// What a code request is told to wait when they are all taken.
pub const WEBHOOK_BUSY_RETRY_SECS: u64 = 5;
/// Codes per second from the whole gateway (bursts of ten seconds' worth): far above a
/// community's sign-ups, and a cap on what anyone can cost its operator in SMS.
pub const SEND_CODES_PER_SECOND: u32 = 20;
/// Sign-in and password attempts per device in a burst.
pub const SIGN_IN_BURST: u32 = 20;
/// Then one more every three seconds.
pub const SIGN_IN_REFILL_SECS: u64 = 3;
/// Session certificates live an hour (DESIGN.md), and clients renew well before it. Relays
/// that ask the gateway for revocations cut a revoked session off within seconds; one that does
/// not, within this bound. It also bounds how long a session's revocation is kept.
pub const CERT_TTL_SECS: u64 = 3600;
/// Bots per owner, as BotFather allows.
pub const MAX_BOTS_PER_OWNER: usize = 20;
/// A session's `last_seen` is written at most this often, to spare commits.
pub const LAST_SEEN_RESOLUTION_SECS: u64 = 60;
/// Requests handled at once; further ones get FLOOD_WAIT instead of queueing without bound.
pub const MAX_INFLIGHT_REQUESTS: usize = 1024;
