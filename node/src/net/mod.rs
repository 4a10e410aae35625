//! The libp2p side every role shares: the transport stack, the shared behaviour, framing, pipes
//! and mailbox placement.
//!
//! - [`transport`]: QUIC + TCP/Noise/Yamux and listening helpers.
//! - [`behaviour`]: the `NetworkBehaviour` shared by the gateway and its clients, and the relays'
//!   Kademlia.
//! - [`codec`]: length-prefixed postcard framing with limits (the gateway's request-response).
//! - [`pipe`]: many tagged requests over one long-lived stream (mailbox and replica protocols).
//! - [`memory`]: the byte budgets of served pipes.
//! - [`placement`]: which relays hold a mailbox (Kademlia-closest), computed alike by relays and
//!   clients.

pub mod behaviour;
pub mod codec;
pub mod memory;
pub mod pipe;
pub mod placement;
pub mod transport;
