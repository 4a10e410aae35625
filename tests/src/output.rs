//! Reading what commands printed: JSON fields, message texts, token shapes.

use serde_json::Value;

/// Whether `token` has Telegram's bot token shape: `^\d+:[A-Za-z0-9_-]{35}$`.
pub fn is_bot_token(token: &str) -> bool {
    let Some((id, secret)) = token.split_once(':') else {
        return false;
    };
    !id.is_empty()
        && id.chars().all(|c| c.is_ascii_digit())
        && secret.len() == 35
        && secret.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The elements of a JSON array, panicking with `what` if it is not one.
pub fn array(value: &Value, what: &str) -> Vec<Value> {
    value.as_array().unwrap_or_else(|| panic!("{what} is not a JSON array: {value}")).clone()
}

/// A string field, panicking if absent.
pub fn str_field<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key].as_str().unwrap_or_else(|| panic!("`{key}` is not a string in {value}"))
}

/// A number field, panicking if absent.
pub fn u64_field(value: &Value, key: &str) -> u64 {
    value[key].as_u64().unwrap_or_else(|| panic!("`{key}` is not a non-negative integer in {value}"))
}

/// The texts of a `meshgram messages --json` answer, in order.
pub fn texts(messages: &Value) -> Vec<String> {
    array(messages, "messages").iter().map(|m| str_field(m, "text").to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bot_token_shape() {
        let secret = "A".repeat(35);
        assert!(is_bot_token(&format!("42:{secret}")));
        assert!(is_bot_token(&format!("42:{}", "a_-Z9".repeat(7))));
        for bad in [
            secret.clone(),
            format!(":{secret}"),
            format!("x:{secret}"),
            format!("42:{}", "A".repeat(34)),
            format!("42:{}!", "A".repeat(34)),
        ] {
            assert!(!is_bot_token(&bad), "{bad}");
        }
    }
}
