//! Configuration: TOML loading and validation into a checked [`Config`].
//!
//! Loading happens in two stages:
//!
//! 1. serde + `toml` parse the text into loosely typed raw structs whose
//!    leaves are [`toml::Spanned`]. Only structural problems stop here (TOML
//!    syntax, unknown keys, missing required keys, wrong value types); such a
//!    problem is reported alone.
//! 2. `validate` converts the raw structs into the model below, checking every
//!    rule and collecting *all* problems.
//!
//! Every problem is a [`Located`] error, printed as `FILE:LINE:COL: message`
//! with 1-based line and column pointing at the offending key or value.
//! Nothing in here panics, whatever the input.
//!
//! [`rules`] is the batch rule format: one line of persistence and health
//! check settings per listener port and protocol, exported from a
//! configuration or applied to its file (rewritten with `toml_edit`, so
//! comments and layout survive).

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

mod raw;
pub mod rules;
mod validate;

#[cfg(test)]
mod tests;

/// Most listeners one instance accepts.
pub const MAX_LISTENERS: usize = 1024;
/// Most servers one instance accepts: the total over all backend services,
/// counted after expanding availability groups.
pub const MAX_SERVERS: usize = 4096;

/// Most workers one instance runs: the XDP program's socket map holds one
/// AF_XDP socket per queue, and worker `i` serves queue `i`
/// (`control::xdp::MAX_QUEUES`, `MAX_QUEUES` in bpf/l4lb_steer.c).
pub const MAX_WORKERS: usize = 64;

/// Where the control socket is when `instance.control_socket` is left
/// out, and where the CLI looks without `-c` or `-s`.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/l4lb/l4lb.sock";

/// The demo configuration (`config/l4lb.toml`), also the built-in default.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/l4lb.toml");

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub instance: Instance,
    /// In config order.
    pub listeners: Vec<Listener>,
    /// In config order; [`Listener::service`] indexes this.
    pub services: Vec<BackendService>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub name: String,
    /// `mode = "nat"` (the default and, for now, the only mode).
    pub mode: ForwardingMode,
    /// Client-facing interface.
    pub client_interface: String,
    /// Backend-facing interface; differs from `client_interface`.
    pub backend_interface: String,
    /// Next hop for replies to clients; its MAC comes from the kernel
    /// neighbour table (or from `neighbours`).
    pub client_gateway: IpAddr,
    /// `attach = "native" | "skb"`, default native.
    pub attach: AttachMode,
    /// `bind = "auto" | "copy" | "zero_copy"`, default auto.
    pub bind: BindMode,
    /// CPU core ids, one worker per entry; worker i serves queue i.
    /// Non-empty, no duplicates, each < 1024. Default `[0]`.
    pub workers: Vec<usize>,
    /// Default 1_048_576; range 1024..=67_108_864.
    pub flow_table_capacity: usize,
    /// Seconds; default 300, range 10..=86400.
    pub flow_idle_timeout: u32,
    /// Seconds a TCP flow lives after its first FIN or RST without further
    /// packets; default 60 (or `flow_idle_timeout` if lower), range
    /// 1..=86400 and at most `flow_idle_timeout`.
    pub tcp_closed_timeout: u32,
    /// Seconds a TCP flow begun by a SYN lives without further packets
    /// until the client's first packet without SYN completes the
    /// handshake; default 30 (or `flow_idle_timeout` if lower), range
    /// 1..=86400 and at most `flow_idle_timeout`.
    pub tcp_syn_timeout: u32,
    /// Entries of the session-persistence table shared by all services;
    /// default 262_144, range 1024..=67_108_864.
    pub persistence_capacity: usize,
    /// `persistence_when_full = "evict_oldest" | "no_record"`, default
    /// evict_oldest.
    pub persistence_when_full: WhenFull,
    /// Default `/run/l4lb/l4lb.sock`.
    pub control_socket: PathBuf,
    /// Static MACs (`[[instance.neighbour]]`) that override the kernel table.
    pub neighbours: Vec<StaticNeighbour>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardingMode {
    Nat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    Native,
    Skb,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindMode {
    Auto,
    Copy,
    ZeroCopy,
}

/// What to do with a new session when the persistence table is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Replace the least recently refreshed session (the default): new
    /// clients keep getting persistence, the idlest old ones lose it early.
    EvictOldest,
    /// Keep the existing sessions and forward the new client without
    /// recording it (it is scheduled afresh on its next flow).
    NoRecord,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StaticNeighbour {
    pub address: IpAddr,
    pub mac: [u8; 6],
}

/// TOML: `"tcp"` or `"udp"` (case-insensitive). Displays lowercase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    pub name: String,
    pub vip: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
    /// Index into [`Config::services`].
    pub service: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BackendService {
    pub name: String,
    /// Equals the protocol of every listener using the service (NAT cannot
    /// change the L4 protocol).
    pub protocol: Protocol,
    pub scheduler: Scheduler,
    pub health_check: HealthCheck,
    /// Seconds; `None` = off (`persistence_timeout = 0` or absent),
    /// otherwise 30..=3600.
    pub persistence_timeout: Option<u32>,
    /// `on_all_down = "drop" | "fail_open"`, default drop.
    pub on_all_down: AllDown,
    /// The service's own servers followed by the servers of each availability
    /// group it uses, in order. Never empty.
    pub servers: Vec<Server>,
}

/// What a backend service does with new flows while every one of its
/// servers is marked down by its health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllDown {
    /// Drop new flows (the default).
    Drop,
    /// Schedule new flows over all servers as if every one were healthy, as
    /// the big cloud balancers do: if the checks are wrong (a firewall, a
    /// broken check port), traffic still flows.
    FailOpen,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduler {
    WeightedSourceIp,
    WeightedRoundRobin,
    WeightedLeastConnections,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    pub address: IpAddr,
    pub port: u16,
    /// 0..=100 (0 = gets no new clients), default 100.
    pub weight: u8,
    /// Name of the availability group the server came from, if any.
    pub group: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    /// `type = "tcp" | "http" | "udp"`, default tcp.
    pub kind: HealthCheckKind,
    /// Check port; `None` = the server's own port.
    pub port: Option<u16>,
    /// Response timeout in seconds: default 2, range 1..=300, at most `interval`.
    pub timeout: u32,
    /// Seconds between checks: default 5, range 1..=50.
    pub interval: u32,
    /// Default 3, range 2..=10.
    pub unhealthy_threshold: u32,
    /// Default 2, range 2..=10.
    pub healthy_threshold: u32,
    /// HTTP only: request path, default "/".
    pub path: Option<String>,
    /// HTTP only: Host header.
    pub domain: Option<String>,
    /// HTTP only: status codes that count as healthy, as inclusive ranges in
    /// the order written (`http_codes = "200,204,300-302"` gives
    /// `[(200, 200), (204, 204), (300, 302)]`); default `[(200, 399)]`.
    /// Empty for other check types.
    pub http_codes: Vec<(u16, u16)>,
    /// UDP only: the probe's payload, 1..=512 bytes; default `"l4lb-health"`.
    /// `None` for other check types.
    pub udp_payload: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthCheckKind {
    Tcp,
    Http,
    Udp,
}

/// One problem in a configuration file, with its 1-based position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.col, self.message
        )
    }
}

impl std::error::Error for Located {}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read. (The I/O error is part of the message,
    /// not a separate `source`, so that `{:#}` prints it once.)
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    /// One line per problem, in file order.
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Located>),
}

impl Config {
    /// Reads and validates the file at `path`; messages name the file as
    /// `path` is written.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        Config::from_file_warned(path).map(|(config, _)| config)
    }

    /// [`Config::from_file`], with the file's warnings: settings that are
    /// valid but probably not what was meant (`FILE:LINE:COL: warning: ...`).
    pub fn from_file_warned(path: &Path) -> Result<(Config, Vec<Located>), ConfigError> {
        let text = Config::read_text(path)?;
        Config::from_str_warned(&text, &path.display().to_string())
    }

    /// A configuration file's text, for [`Config::from_str_warned`]: the
    /// error of a file that cannot be read, or is not UTF-8 (located), is
    /// the one [`Config::from_file`] gives.
    pub fn read_text(path: &Path) -> Result<String, ConfigError> {
        let file_name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|error| ConfigError::Io {
            path: file_name.clone(),
            error,
        })?;
        match String::from_utf8(bytes) {
            Ok(text) => Ok(text),
            Err(e) => {
                let valid = e.utf8_error().valid_up_to();
                let bytes = e.as_bytes();
                let prefix = String::from_utf8_lossy(&bytes[..valid.min(bytes.len())]);
                let (line, col) = validate::LineIndex::new(&prefix).position(prefix.len());
                Err(ConfigError::Invalid(vec![Located {
                    file: file_name,
                    line,
                    col,
                    message: "the file is not valid UTF-8".to_string(),
                }]))
            }
        }
    }

    /// Parses and validates `text`; `file_name` is used in messages.
    pub fn from_str(text: &str, file_name: &str) -> Result<Config, ConfigError> {
        Config::from_str_warned(text, file_name).map(|(config, _)| config)
    }

    /// [`Config::from_str`], with the warnings (see
    /// [`Config::from_file_warned`]).
    pub fn from_str_warned(
        text: &str,
        file_name: &str,
    ) -> Result<(Config, Vec<Located>), ConfigError> {
        validate::load(text, file_name).map_err(ConfigError::Invalid)
    }

    /// Where the `[instance]` key `key` is set in the configuration text
    /// `text`, as (line, column): its value, or the `[instance]` header
    /// when the key is left out. `None` if `text` does not parse.
    pub fn instance_key_position(text: &str, key: &str) -> Option<(usize, usize)> {
        validate::instance_key_position(text, key)
    }

    /// One line, e.g. "demo: 3 listeners, 2 backend services, 6 servers,
    /// 1 worker, nat mode on lb-c/lb-b".
    pub fn summary(&self) -> String {
        fn count(n: usize, what: &str) -> String {
            format!("{n} {what}{}", if n == 1 { "" } else { "s" })
        }
        let servers: usize = self.services.iter().map(|s| s.servers.len()).sum();
        format!(
            "{}: {}, {}, {}, {}, {} mode on {}/{}",
            self.instance.name,
            count(self.listeners.len(), "listener"),
            count(self.services.len(), "backend service"),
            count(servers, "server"),
            count(self.instance.workers.len(), "worker"),
            self.instance.mode,
            self.instance.client_interface,
            self.instance.backend_interface,
        )
    }
}

impl Protocol {
    /// `"tcp"` or `"udp"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The remaining enums display as their TOML spelling.
macro_rules! display_as_toml {
    ($ty:ty { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self {
                    $(<$ty>::$variant => $text),+
                })
            }
        }
    };
}

display_as_toml!(ForwardingMode { Nat => "nat" });
display_as_toml!(AttachMode { Native => "native", Skb => "skb" });
display_as_toml!(BindMode { Auto => "auto", Copy => "copy", ZeroCopy => "zero_copy" });
display_as_toml!(Scheduler {
    WeightedSourceIp => "weighted_source_ip",
    WeightedRoundRobin => "weighted_round_robin",
    WeightedLeastConnections => "weighted_least_connections",
});
display_as_toml!(HealthCheckKind { Tcp => "tcp", Http => "http", Udp => "udp" });
display_as_toml!(AllDown { Drop => "drop", FailOpen => "fail_open" });
display_as_toml!(WhenFull { EvictOldest => "evict_oldest", NoRecord => "no_record" });
