//! # l4lb: a Layer-4 load balancer on AF_XDP
//!
//! l4lb is a poll-mode forwarder: pinned worker threads read frames from
//! AF_XDP sockets, pick a backend for each new flow by a weighted consistent
//! hash of the client's address, rewrite the frame in place (NAT) and send it
//! out of the other interface, without the kernel's network stack.
//!
//! ## Layers
//! ```text
//!  config ──► control plane ──► immutable Snapshot ◄── data plane workers
//!  (TOML,      (validation,       (published with        (rx_burst →
//!   located     neighbours,        arc-swap; never        process_burst →
//!   errors)     XDP, stats)        mutated)               tx_burst → flush)
//! ```
//! * [`config`]: the TOML model and its validation. Errors carry
//!   `file:line:col`. A config that fails validation changes nothing.
//! * [`control`]: the control plane. Builds [`control::snapshot::Snapshot`]s,
//!   attaches the XDP steering program, resolves next-hop MACs, runs the
//!   health checks (on their own threads), reloads the config, serves the
//!   control socket. May allocate, lock, log and sleep.
//! * [`dataplane`]: the workers. Per packet they allocate nothing, lock
//!   nothing, log nothing and make no syscall; they read the current snapshot
//!   (one atomic load per burst), their own counters, and the shared tables.
//! * [`sched`]: schedulers. Pure functions of the backend set and the client
//!   address: the same answer on every core, process and node.
//! * [`table`]: lock-free fixed-capacity tables shared by workers: flows
//!   (forward and reply entries) and session persistence.
//! * [`replay`] and [`simulate`]: the offline tools, running the data
//!   plane's own code without a kernel.
//!
//! ## Unsafe
//! Only where the OS is touched: AF_XDP rings ([`dataplane::xsk`]), the BPF
//! loader ([`control::xdp`]), netlink/ioctl ([`control::netdev`]), and
//! poll(2) in the worker and the health checker. Each block says why it is
//! sound.

pub mod config;
pub mod control;
pub mod dataplane;
pub mod replay;
pub mod sched;
pub mod simulate;
pub mod table;
pub mod util;
