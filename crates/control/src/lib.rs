//! meshgate's control plane on Kubernetes (the istiod role): watches the
//! cluster's Istio and Kubernetes objects into the same config model and
//! validation as files, and publishes each good config as a new version.

pub mod ca;
pub mod client;
pub mod compile;
pub mod debug;
pub mod events;
pub mod push;
pub mod run;
pub mod scope;
pub mod watch;
pub mod webhook;

pub use compile::{Snapshot, compile};
pub use watch::{Key, Objects, WATCHED};
