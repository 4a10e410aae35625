//! The bot bridge (`meshgram-bot-bridge`): the Telegram Bot API over HTTP, so that unmodified
//! bot libraries run on Meshgram. Each bot is a client node inside this process ([`bots`]); its updates wait in a
//! redb queue ([`store`]); the HTTP side ([`api`]) and the methods ([`methods`]) turn requests
//! into calls on the bot's node.

mod api;
mod bots;
mod convert;
mod files;
mod methods;
mod rich;
mod store;
mod webhook;

pub mod fuzzing;

pub use api::router;
pub use bots::{Bots, Network};
