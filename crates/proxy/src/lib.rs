//! meshgate's data path: the sidecar and the egress gateway.
//!
//! Decisions are pure functions over a compiled snapshot of the config
//! (`snapshot`): `plan` decides everything about a connection and each of
//! its requests (with `route` and `authz`), and the I/O around it only acts
//! on the plan (`connection`, `http`, `tcp`). `app` builds and runs a whole
//! proxy, for the `meshgate` binary and for tests.

pub mod admin;
pub mod app;
pub mod authz;
pub mod body;
pub mod bound;
pub mod conn;
pub mod connection;
pub mod cors;
pub mod drain;
pub mod error;
pub mod exec;
pub mod gateway;
pub mod http;
pub mod idle;
pub mod inspect;
pub mod iptables;
pub mod labels;
pub mod listener;
pub mod normalize;
pub mod plan;
pub mod proxy;
pub mod report;
pub mod route;
pub mod sidecar;
pub mod snapshot;
pub mod standin;
pub mod tcp;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls_hello;
pub mod unix;
pub mod upstream;
