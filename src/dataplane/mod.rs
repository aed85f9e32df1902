//! The data plane: per-core workers that move frames between two AF_XDP
//! sockets, deciding and rewriting each one in place.
//!
//! * [`packet`]: zero-copy parse of untrusted frames.
//! * [`pipeline`]: the per-frame decision (classify → schedule → flow →
//!   rewrite); pure apart from the shared flow table; what tests and
//!   `l4lb replay` run is what runs live.
//! * [`nat`], [`checksum`]: the in-place rewrite with RFC 1624 updates.
//! * [`counters`]: per-worker counters, drops by reason.
//! * [`xsk`]: the AF_XDP rings (the only `unsafe` of the data plane).
//! * [`worker`]: the pinned poll loop.

pub mod checksum;
pub mod counters;
pub mod icmp;
pub mod nat;
pub mod packet;
pub mod pipeline;
pub mod worker;
pub mod xsk;

pub use counters::DropReason;
pub use pipeline::{Port, Processor, Verdict};
