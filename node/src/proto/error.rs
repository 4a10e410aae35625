//! Refusals on every protocol: a stable machine code and a human message.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A refusal with a stable machine code (Telegram's RPC error names) and a human message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
    /// For [`ErrorCode::FloodWait`]: seconds to wait before trying again.
    pub retry_after_secs: Option<u64>,
}

impl WireError {
    /// An error without retry-after.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError { code, message: message.into(), retry_after_secs: None }
    }
    /// The answer to a frame that was not a request: `CERT_INVALID` for one too large before
    /// the greeting (the caller greets again and retries), `FLOOD_WAIT` for greetings past a
    /// connection's allowance, else `BAD_REQUEST`.
    pub fn for_frame(e: &crate::net::codec::FrameError) -> Self {
        use crate::net::codec::FrameError;
        match e {
            FrameError::NotWelcomed { .. } => WireError::new(ErrorCode::CertInvalid, e.to_string()),
            FrameError::TooManyGreetings { retry_after_secs } => WireError {
                code: ErrorCode::FloodWait,
                message: e.to_string(),
                retry_after_secs: Some(*retry_after_secs),
            },
            FrameError::TooLarge { .. } | FrameError::Malformed(_) => {
                WireError::new(ErrorCode::BadRequest, e.to_string())
            }
        }
    }

    /// A rate-limit refusal.
    pub fn flood_wait(retry_after_secs: u64, what: &str) -> Self {
        WireError {
            code: ErrorCode::FloodWait,
            message: format!("too many {what}; retry after {retry_after_secs} s"),
            retry_after_secs: Some(retry_after_secs),
        }
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.retry_after_secs {
            Some(secs) => write!(f, "{}_{secs}: {}", self.code, self.message),
            None => write!(f, "{}: {}", self.code, self.message),
        }
    }
}

/// Machine-readable refusal reasons. Append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request could not be decoded, was too large, or a field is out of range.
    BadRequest,
    PhoneNumberInvalid,
    PhoneCodeInvalid,
    PhoneCodeExpired,
    /// The account has a 2FA password and none was given.
    SessionPasswordNeeded,
    PasswordHashInvalid,
    /// Rate limited; see `retry_after_secs`.
    FloodWait,
    /// This device has no session: sign in first.
    AuthKeyUnregistered,
    SessionRevoked,
    UsernameOccupied,
    UsernameInvalid,
    NameInvalid,
    /// No such user, session or bot.
    NotFound,
    /// Bot token malformed, unknown or revoked.
    AccessTokenInvalid,
    /// The caller may not do this (e.g. a bot creating bots, someone else's bot).
    Forbidden,
    /// The device keys do not verify or do not belong to the connection's peer.
    DeviceKeysInvalid,
    /// The code could not be delivered; try again later.
    CodeDeliveryFailed,
    /// The server failed; nothing the client did.
    Internal,
    /// A relay needs a valid session certificate (`Hello`) on this connection first.
    CertInvalid,
    /// An envelope's sender is not the connection's device or account.
    SenderMismatch,
    /// This relay does not hold that mailbox; ask one of the relays named in the message.
    NotResponsible,
    /// Not enough relays could store the data durably; nothing was acknowledged.
    Unavailable,
    /// A per-user quota (stored envelopes or bytes) is full.
    QuotaExceeded,
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::PhoneNumberInvalid => "PHONE_NUMBER_INVALID",
            ErrorCode::PhoneCodeInvalid => "PHONE_CODE_INVALID",
            ErrorCode::PhoneCodeExpired => "PHONE_CODE_EXPIRED",
            ErrorCode::SessionPasswordNeeded => "SESSION_PASSWORD_NEEDED",
            ErrorCode::PasswordHashInvalid => "PASSWORD_HASH_INVALID",
            ErrorCode::FloodWait => "FLOOD_WAIT",
            ErrorCode::AuthKeyUnregistered => "AUTH_KEY_UNREGISTERED",
            ErrorCode::SessionRevoked => "SESSION_REVOKED",
            ErrorCode::UsernameOccupied => "USERNAME_OCCUPIED",
            ErrorCode::UsernameInvalid => "USERNAME_INVALID",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::AccessTokenInvalid => "ACCESS_TOKEN_INVALID",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::DeviceKeysInvalid => "DEVICE_KEYS_INVALID",
            ErrorCode::CodeDeliveryFailed => "CODE_DELIVERY_FAILED",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::CertInvalid => "CERT_INVALID",
            ErrorCode::SenderMismatch => "SENDER_MISMATCH",
            ErrorCode::NotResponsible => "NOT_RESPONSIBLE",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::QuotaExceeded => "QUOTA_EXCEEDED",
        };
        f.write_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flood_wait_displays_like_telegram() {
        assert_eq!(
            WireError::flood_wait(42, "code requests").to_string(),
            "FLOOD_WAIT_42: too many code requests; retry after 42 s"
        );
    }
}
