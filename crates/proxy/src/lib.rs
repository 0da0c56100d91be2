//! meshgate's data path: the egress gateway (and, next, the sidecar).
//! Decisions (authorization, routing) are pure functions over compiled
//! snapshots of the config; the I/O around them is plain async code.

pub mod admin;
pub mod authz;
pub mod decide;
pub mod drain;
pub mod gateway;
pub mod iptables;
pub mod proxy;
pub mod route;
pub mod sidecar;
pub mod standin;
pub mod state;
pub mod tcp;
pub mod upstream;
