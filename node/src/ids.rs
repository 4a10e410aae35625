//! Typed identifiers and validated user-facing values.
//!
//! Every id that crosses a boundary is a newtype so that a `UserId` can never be passed where a
//! `SessionId` is meant. Each has `Display`/`FromStr`/serde and, where logs need it, `fmt_short`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a user-supplied value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(pub String);

/// An account's number, assigned by the gateway at first sign-in (users and bots alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UserId(pub u64);

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for UserId {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<u64>().map(UserId).map_err(|_| InvalidValue(format!("'{s}' is not a user id (a positive number)")))
    }
}

/// One signed-in device session. Random, so that ids do not reveal how many sessions exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SessionId(pub u64);

impl SessionId {
    /// A fresh random session id.
    pub fn random() -> Self {
        SessionId(rand::random::<u64>() >> 1)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for SessionId {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<u64>().map(SessionId).map_err(|_| InvalidValue(format!("'{s}' is not a session id (a number)")))
    }
}

/// A phone number in E.164 form: `+` and 7 to 15 digits, the first not zero.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Phone(String);

impl Phone {
    /// The number as `+15550001111`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The number for logs, which may travel further than the server: `+15…11`, enough to tell
    /// a user's reports apart, not to call anyone.
    pub fn masked(&self) -> String {
        let chars: Vec<char> = self.0.chars().collect();
        if chars.len() <= 5 {
            return "…".into();
        }
        let (head, tail): (String, String) = (chars[..3].iter().collect(), chars[chars.len() - 2..].iter().collect());
        format!("{head}…{tail}")
    }
}

impl FromStr for Phone {
    type Err = InvalidValue;
    /// Accepts the usual ways people write numbers (`+1 (555) 000-1111`) and normalizes them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidValue(format!("'{s}' is not a phone number in international form (+15550001111)"));
        let trimmed = s.trim();
        let rest = trimmed.strip_prefix('+').ok_or_else(bad)?;
        let digits: String = rest.chars().filter(|c| !matches!(c, ' ' | '-' | '(' | ')' | '.')).collect();
        if !(7..=15).contains(&digits.len()) || !digits.chars().all(|c| c.is_ascii_digit()) || digits.starts_with('0') {
            return Err(bad());
        }
        Ok(Phone(format!("+{digits}")))
    }
}

impl TryFrom<String> for Phone {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Phone> for String {
    fn from(p: Phone) -> String {
        p.0
    }
}

impl fmt::Display for Phone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A public `@username`: 5–32 characters of `a-z 0-9 _`, starting with a letter, as on Telegram.
/// Compared case-insensitively; stored as the owner typed it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Username(String);

impl Username {
    /// The name without `@`, as its owner spelled it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The key under which uniqueness is enforced.
    pub fn canonical(&self) -> String {
        self.0.to_ascii_lowercase()
    }
    /// Bot usernames end in `bot` (BotFather's rule); user names may not.
    pub fn is_bot_name(&self) -> bool {
        self.canonical().ends_with("bot")
    }
}

impl FromStr for Username {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim().strip_prefix('@').unwrap_or(s.trim());
        let ok_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        let starts_with_letter = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
        if !(5..=32).contains(&name.len()) || !ok_chars || !starts_with_letter || name.ends_with('_') {
            return Err(InvalidValue(format!(
                "'{name}' is not a valid username: use 5-32 characters a-z, 0-9 and _, starting with a letter"
            )));
        }
        Ok(Username(name.to_string()))
    }
}

impl TryFrom<String> for Username {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Username> for String {
    fn from(u: Username) -> String {
        u.0
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "@{}", self.0)
    }
}

/// A device's static X25519 key for end-to-end Noise.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NoiseKey(#[serde(with = "hex_or_bytes")] pub [u8; 32]);

impl NoiseKey {
    /// First 8 hex digits, for logs.
    pub fn fmt_short(&self) -> String {
        hex(&self.0[..4])
    }
}

impl fmt::Display for NoiseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for NoiseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NoiseKey({})", self.fmt_short())
    }
}

/// A bot's token in Telegram's `<bot_id>:<secret>` form.
#[derive(Clone, PartialEq, Eq)]
pub struct BotToken {
    /// The bot account this token signs in.
    pub bot_id: UserId,
    /// The secret part; only its hash is stored by the gateway.
    pub secret: String,
}

/// Length of the secret half of a bot token (Telegram's is 35 characters).
pub const BOT_TOKEN_SECRET_LEN: usize = 35;

impl FromStr for BotToken {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidValue("invalid token specified: expected <bot_id>:<secret>".to_string());
        let (id, secret) = s.trim().split_once(':').ok_or_else(bad)?;
        let bot_id = id.parse::<u64>().map_err(|_| bad())?;
        let ok = secret.len() == BOT_TOKEN_SECRET_LEN
            && secret.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !ok {
            return Err(bad());
        }
        Ok(BotToken { bot_id: UserId(bot_id), secret: secret.to_string() })
    }
}

impl fmt::Display for BotToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.bot_id, self.secret)
    }
}

impl fmt::Debug for BotToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        write!(f, "BotToken({}:…)", self.bot_id)
    }
}

/// Serde for byte strings: hex in human-readable formats (JSON), raw bytes in binary ones
/// (postcard). Works for `[u8; N]` and `Vec<u8>`.
pub mod hex_or_bytes {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes bytes.
    pub fn serialize<S: Serializer, T: AsRef<[u8]>>(bytes: &T, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&super::hex(bytes.as_ref()))
        } else {
            s.serialize_bytes(bytes.as_ref())
        }
    }

    /// Deserializes bytes into anything a `Vec<u8>` converts into (arrays check their length).
    pub fn deserialize<'de, D: Deserializer<'de>, T: TryFrom<Vec<u8>>>(d: D) -> Result<T, D::Error> {
        let bytes: Vec<u8> = if d.is_human_readable() {
            let s = String::deserialize(d)?;
            if s.len() % 2 != 0 || !s.is_ascii() {
                return Err(D::Error::custom("expected an even number of hex digits"));
            }
            (0..s.len() / 2)
                .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16))
                .collect::<Result<_, _>>()
                .map_err(|_| D::Error::custom("invalid hex digit"))?
        } else {
            serde_bytes::ByteBuf::deserialize(d)?.into_vec()
        };
        let len = bytes.len();
        T::try_from(bytes).map_err(|_| D::Error::custom(format!("unexpected length {len}")))
    }
}

/// Lower-case hex of some bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `s` in groups of four characters joined by `separator`, as people read codes out.
pub fn grouped(s: &str, separator: &str) -> String {
    s.as_bytes().chunks(4).map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>().join(separator)
}

/// Parses lower- or upper-case hex into exactly `N` bytes.
pub fn parse_hex<const N: usize>(s: &str) -> Result<[u8; N], InvalidValue> {
    let s = s.trim();
    let bad = || InvalidValue(format!("expected {} hex digits, got '{s}'", N * 2));
    if s.len() != N * 2 || !s.is_ascii() {
        return Err(bad());
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// Defines a 16-byte id whose first 6 bytes are the creator's clock in milliseconds and the rest
/// random (like a UUIDv7), with hex `Display`/`FromStr`, serde (hex in JSON, bytes in postcard)
/// and `fmt_short`. Envelope and message ids share the shape but never stand for each other.
macro_rules! time_ordered_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        pub struct $name(#[serde(with = "crate::ids::hex_or_bytes")] pub [u8; 16]);

        impl $name {
            /// A fresh id: the current time, then randomness.
            pub fn random() -> Self {
                let mut id: [u8; 16] = rand::random();
                id[..6].copy_from_slice(&crate::ids::now_ms().to_be_bytes()[2..]);
                $name(id)
            }
            /// The last 8 hex digits (random, unlike the leading time), for logs and listings.
            pub fn fmt_short(&self) -> String {
                crate::ids::hex(&self.0[12..])
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&crate::ids::hex(&self.0))
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}({})", stringify!($name), self.fmt_short())
            }
        }

        impl std::str::FromStr for $name {
            type Err = crate::ids::InvalidValue;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                crate::ids::parse_hex::<16>(s).map($name)
            }
        }
    };
}
pub(crate) use time_ordered_id;

/// The wall clock in unix milliseconds (0 before 1970): the one clock every timestamp here is
/// read from, in one reading.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_normalize_and_reject_garbage() {
        assert_eq!("+1 (555) 000-1111".parse::<Phone>().unwrap().as_str(), "+15550001111");
        assert_eq!("+15550001111".parse::<Phone>().unwrap().masked(), "+15…11", "logs show no number");
        for bad in ["", "+", "15550001111", "+0555000111", "+12", "+1234567890123456", "+1555abc1111"] {
            assert!(bad.parse::<Phone>().is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn usernames_follow_telegram_rules() {
        assert_eq!("@Alice_1".parse::<Username>().unwrap().canonical(), "alice_1");
        assert!("echo_bot".parse::<Username>().unwrap().is_bot_name());
        for bad in ["abc", "1alice", "alice_", "al ice", "a".repeat(33).as_str(), "ali-ce"] {
            assert!(bad.parse::<Username>().is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn bot_tokens_parse_in_telegram_form() {
        let secret = "A".repeat(BOT_TOKEN_SECRET_LEN);
        let token: BotToken = format!("123:{secret}").parse().unwrap();
        assert_eq!(token.bot_id, UserId(123));
        assert!(!format!("{token:?}").contains(&secret));
        for bad in ["123", "abc:def", &format!("123:{}", "A".repeat(10)), &format!("x:{secret}")] {
            assert!(bad.parse::<BotToken>().is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn byte_fields_are_hex_in_json_and_raw_in_postcard() {
        let key = NoiseKey([0xab; 32]);
        let json = serde_json::to_string(&key).unwrap();
        assert_eq!(json, format!("\"{}\"", "ab".repeat(32)));
        assert_eq!(serde_json::from_str::<NoiseKey>(&json).unwrap(), key);
        let bin = postcard::to_stdvec(&key).unwrap();
        assert_eq!(bin.len(), 33);
        assert_eq!(postcard::from_bytes::<NoiseKey>(&bin).unwrap(), key);
        assert!(serde_json::from_str::<NoiseKey>("\"abcd\"").is_err(), "wrong length");
    }

    #[test]
    fn hex_round_trips() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(parse_hex::<4>(&hex(&bytes)).unwrap(), bytes);
        assert!(parse_hex::<4>("00").is_err());
        assert!(parse_hex::<1>("zz").is_err());
    }
}
