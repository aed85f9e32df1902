//! Health checks: decides which servers receive new clients.
//!
//! The control plane owns one [`HealthMonitor`], hands it the set of targets
//! (one per server, service protocol and distinct check) with
//! [`HealthMonitor::set_targets`]
//! on start and on every reload, and calls [`HealthMonitor::poll`] from its
//! loop. `poll` never blocks: it starts the probes that are due, collects the
//! ones that finished and returns the state changes, which the control plane
//! turns into a new snapshot. Nothing here runs on the data path.
//!
//! ## Probes
//! A small fixed pool of probe threads ([`PROBE_THREADS`]) runs the probes.
//! Each thread multiplexes its probes over non-blocking sockets with poll(2),
//! so a dead server costs a file descriptor for `timeout`, not a thread. The
//! cap on outstanding probes follows the targets ([`probes_needed`]): a probe
//! that waits for a free slot starts late and stretches its target's
//! interval, so the cap leaves room for every target's probes, within the
//! file descriptors the process may open ([`probe_fd_budget`]). Each probe has one
//! deadline, `timeout` after it starts, covering connect, request and reply.
//! * `tcp`: the connect completes → success.
//! * `http`: connect, send one `GET` with `Connection: close`, read the status
//!   line (RFC 9112 §4), skipping interim 1xx responses (RFC 9110 §15.2);
//!   success iff its code is in one of the ranges.
//! * `udp`: a connected UDP socket sends the payload; any reply → success. A
//!   connected UDP socket receives the kernel's report of an ICMP port
//!   unreachable as `ECONNREFUSED` on `recv` (udp(7)), hence the failure
//!   "ICMP port unreachable"; no reply → "timeout".
//!
//! ## State
//! A server goes down after `unhealthy_threshold` consecutive failures and
//! comes back after `healthy_threshold` consecutive successes, so one lost
//! probe never flips it ([`TargetState::record`], pure and clock-free). A
//! target seen for the first time starts **up**: servers are assumed healthy
//! until proven otherwise, so that a start or reload does not black-hole a
//! service while its first probes run. The price is that a dead new server
//! gets clients for up to `offset + (unhealthy_threshold - 1) * interval +
//! timeout`.
//!
//! ## Schedule
//! `interval` is the time between the starts of two probes of one target. The
//! first probe of a target comes at [`first_probe_offset`] into its interval,
//! a fixed hash of its key, so a thousand servers are spread over the interval
//! instead of probed in one burst, the same way on every node and restart. A
//! probe still running when the next one is due delays it instead of running
//! beside it.

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Probe threads. Each multiplexes many probes, so two are plenty; a second
/// keeps probing if one is stalled by a slow `socket`/`connect` call.
pub const PROBE_THREADS: usize = 2;

/// Most bytes of an HTTP response read for its final status line: the line
/// itself and any interim 1xx responses before it (RFC 9112 §4 sets no
/// limit; a status line is ~20 bytes and a 103 Early Hints a few hundred,
/// so 1 KiB only guards against a server streaming garbage).
const MAX_STATUS_READ: usize = 1024;

/// The floor of the in-flight cap: small configurations get room for a
/// burst of probes that the hash happened to place close together.
const MIN_IN_FLIGHT: usize = 64;

/// File descriptors kept for the rest of l4lb when sizing the probes'
/// share: 2 AF_XDP sockets for each of up to 64 workers (128), the XDP
/// programs and maps of two interfaces, the control socket and its waiting
/// clients, netlink, the probe threads' wake-up sockets and stdio; 256
/// covers them with room to spare.
const RESERVED_FDS: u64 = 256;

/// Shortest time between two "probes deferred" warnings: the condition
/// lasts as long as the configuration does, one line a minute says so.
const DEFERRED_WARNING_PERIOD: Duration = Duration::from_secs(60);

/// Seed of the XXH3 hash that spreads first probes ("l4lb-hc0").
const OFFSET_SEED: u64 = 0x6c34_6c62_2d68_6330;

/// `last result` of a target that has not completed a probe yet.
pub const NOT_PROBED: &str = "not probed yet";

/// How one target is probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Tcp,
    /// `codes`: inclusive ranges of status codes that count as healthy.
    Http {
        path: String,
        host: Option<String>,
        codes: Vec<(u16, u16)>,
    },
    Udp {
        payload: Vec<u8>,
    },
}

/// A resolved health check for one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSpec {
    pub probe: Probe,
    /// Port probed (the check port, or the server's port).
    pub port: u16,
    /// Deadline of one probe, connect to reply.
    pub timeout: Duration,
    /// Time between the starts of two probes of one target.
    pub interval: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

// Validation fills in the config's defaults; these only cover a
// `HealthCheck` built by hand with the fields left empty.
const FALLBACK_HTTP_CODES: (u16, u16) = (200, 399);
const FALLBACK_UDP_PAYLOAD: &str = "l4lb-health";

impl CheckSpec {
    /// The check of `hc` for a server listening on `server_port`.
    pub fn from_config(hc: &crate::config::HealthCheck, server_port: u16) -> CheckSpec {
        use crate::config::HealthCheckKind;
        let probe = match hc.kind {
            HealthCheckKind::Tcp => Probe::Tcp,
            HealthCheckKind::Http => Probe::Http {
                path: hc.path.clone().unwrap_or_else(|| "/".to_string()),
                host: hc.domain.clone(),
                codes: if hc.http_codes.is_empty() {
                    vec![FALLBACK_HTTP_CODES]
                } else {
                    hc.http_codes.clone()
                },
            },
            HealthCheckKind::Udp => Probe::Udp {
                payload: hc
                    .udp_payload
                    .as_deref()
                    .unwrap_or(FALLBACK_UDP_PAYLOAD)
                    .as_bytes()
                    .to_vec(),
            },
        };
        CheckSpec {
            probe,
            port: hc.port.unwrap_or(server_port),
            timeout: Duration::from_secs(hc.timeout.into()),
            interval: Duration::from_secs(hc.interval.into()),
            unhealthy_threshold: hc.unhealthy_threshold,
            healthy_threshold: hc.healthy_threshold,
        }
    }
}

/// One checked server: its address, its own port, the service protocol
/// (6 = TCP, 17 = UDP) and which of its checks. The same server in a TCP
/// and a UDP service is two targets; so is the same server in two services
/// whose checks differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetKey {
    pub addr: IpAddr,
    /// The server's port (not the check port).
    pub port: u16,
    /// IP protocol number of the service: 6 or 17.
    pub proto: u8,
    /// Which of the distinct checks of this server (address, port,
    /// protocol), in the order the configuration first uses them: 0 for
    /// the first. Services whose checks are identical share one target.
    pub check: u8,
}

/// A server endpoint: address, its own port, IP protocol number.
pub type Endpoint = (IpAddr, u16, u8);

impl TargetKey {
    /// The server this target checks, whichever check it is.
    pub fn endpoint(&self) -> Endpoint {
        (self.addr, self.port, self.proto)
    }
}

impl fmt::Display for TargetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            6 => "tcp".to_string(),
            17 => "udp".to_string(),
            p => format!("proto {p}"),
        };
        write!(f, "{}/{proto}", SocketAddr::new(self.addr, self.port))?;
        if self.check > 0 {
            write!(f, " (check {})", u16::from(self.check) + 1)?;
        }
        Ok(())
    }
}

/// One target as a configuration asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedTarget {
    pub key: TargetKey,
    pub spec: CheckSpec,
    /// Names of the backend services that check the server this way. A
    /// reload that changes a service's check hands the new target the
    /// up/down state that this service had for the server.
    pub services: Vec<String>,
}

/// A server changed state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub key: TargetKey,
    pub up: bool,
    /// The result of the probe that flipped it: "ok", "timeout",
    /// "connection refused", "status 503", "ICMP port unreachable", ...
    pub reason: String,
}

/// How many probes may need to be in flight at once to start every probe of
/// `specs` on time: a target has at most one probe running, for at most
/// `timeout` of every `interval`, so on average the sum of timeout/interval
/// (at most 1 each) are running. The phases are spread by a hash, so the
/// count at any moment varies around that mean; half again on top covers
/// the variation (its standard deviation is at most half the square root of
/// the mean), and `MIN_IN_FLIGHT` (64) covers small configurations.
pub fn probes_needed<'a>(specs: impl IntoIterator<Item = &'a CheckSpec>) -> usize {
    let busy: f64 = specs
        .into_iter()
        .map(|s| {
            if s.interval.is_zero() {
                1.0
            } else {
                (s.timeout.as_secs_f64() / s.interval.as_secs_f64()).min(1.0)
            }
        })
        .sum();
    // Saturating float-to-int cast; busy is at most the number of targets.
    ((busy * 1.5).ceil() as usize).max(MIN_IN_FLIGHT)
}

/// The most probes that may be in flight at once, one socket each: the
/// soft RLIMIT_NOFILE less `RESERVED_FDS` (256). First raises the soft limit
/// to the hard one, as the Go runtime does at start since Go 1.19: l4lb
/// uses poll(2), never select(2), so descriptors above 1024 are fine. Call
/// it once at start; if the limits cannot be read, 64 probes.
pub fn probe_fd_budget() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return MIN_IN_FLIGHT;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: plain setrlimit on a valid rlimit. A hard limit above
        // the kernel's nr_open fails with EPERM; the soft limit then stays.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    let budget = lim.rlim_cur.saturating_sub(RESERVED_FDS).max(1);
    usize::try_from(budget).unwrap_or(usize::MAX)
}

/// Where the first probe of `key` falls within its interval: a fixed hash
/// (XXH3-64 over the 16-byte IPv6 or IPv4-mapped address, the port in
/// network order and the protocol) modulo the interval. Deterministic, and
/// below `interval` (zero if `interval` is zero).
pub fn first_probe_offset(key: &TargetKey, interval: Duration) -> Duration {
    let span = interval.as_nanos();
    if span == 0 {
        return Duration::ZERO;
    }
    let mut bytes = [0u8; 20];
    let v6 = match key.addr {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    };
    bytes[..16].copy_from_slice(&v6.octets());
    bytes[16..18].copy_from_slice(&key.port.to_be_bytes());
    bytes[18] = key.proto;
    bytes[19] = key.check;
    // A server's first check hashes 19 bytes, as before checks were told
    // apart: its offset did not move.
    let len = if key.check == 0 { 19 } else { 20 };
    let h = xxhash_rust::xxh3::xxh3_64_with_seed(&bytes[..len], OFFSET_SEED);
    // span < 2^64 ns (584 years) for any sane interval; the u128 keeps the
    // modulo exact anyway.
    Duration::from_nanos((u128::from(h) % span) as u64)
}

/// The up/down state machine of one target. Pure: no clock, no I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetState {
    up: bool,
    successes: u32,
    failures: u32,
    last: String,
    unhealthy_threshold: u32,
    healthy_threshold: u32,
}

impl TargetState {
    /// A target starts up (see the module docs); thresholds below 1 count
    /// as 1.
    pub fn new(unhealthy_threshold: u32, healthy_threshold: u32) -> Self {
        TargetState {
            up: true,
            successes: 0,
            failures: 0,
            last: NOT_PROBED.to_string(),
            unhealthy_threshold: unhealthy_threshold.max(1),
            healthy_threshold: healthy_threshold.max(1),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// The reason of the last recorded probe.
    pub fn last_result(&self) -> &str {
        &self.last
    }

    /// Consecutive successes and failures so far (one of them is zero).
    pub fn counters(&self) -> (u32, u32) {
        (self.successes, self.failures)
    }

    /// Records one probe result; returns the new state if it flipped.
    pub fn record(&mut self, success: bool, reason: &str) -> Option<bool> {
        if self.last != reason {
            self.last = reason.to_string();
        }
        if success {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if !self.up && self.successes >= self.healthy_threshold {
                self.up = true;
                return Some(true);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.up && self.failures >= self.unhealthy_threshold {
                self.up = false;
                return Some(false);
            }
        }
        None
    }

    /// A changed check: keeps up/down, forgets the runs counted under the
    /// old one.
    fn reset_counters(&mut self, unhealthy_threshold: u32, healthy_threshold: u32) {
        self.successes = 0;
        self.failures = 0;
        self.unhealthy_threshold = unhealthy_threshold.max(1);
        self.healthy_threshold = healthy_threshold.max(1);
    }
}

#[derive(Clone)]
struct Target {
    spec: Arc<CheckSpec>,
    state: TargetState,
    /// Start of the next probe; `None` until the next `poll` places it at
    /// [`first_probe_offset`].
    next_due: Option<Instant>,
    /// Id of the probe in flight. A result whose id does not match (the
    /// target was replaced or its check changed meanwhile) is dropped.
    running: Option<u64>,
}

impl Target {
    fn new(spec: CheckSpec) -> Self {
        Target {
            state: TargetState::new(spec.unhealthy_threshold, spec.healthy_threshold),
            spec: Arc::new(spec),
            next_due: None,
            running: None,
        }
    }
}

/// Handle on one probe thread.
struct ProbeThread {
    jobs: Option<Sender<Job>>,
    /// Write end of a socket pair in the thread's poll set: a byte after new
    /// jobs wakes it; closing it tells the thread to exit.
    wake: Option<UnixStream>,
    outstanding: usize,
    handle: Option<JoinHandle<()>>,
}

struct Job {
    id: u64,
    key: TargetKey,
    thread: usize,
    addr: SocketAddr,
    spec: Arc<CheckSpec>,
}

struct Done {
    id: u64,
    key: TargetKey,
    thread: usize,
    success: bool,
    reason: String,
}

/// How many removed (service, server) pairs keep their last state: a few
/// hundred bytes each, so a bounded few MiB at most however often reloads
/// add and remove servers.
const REMEMBERED_REMOVALS: usize = 4096;

/// The last state of servers that reloads removed from services, so that
/// one added back later does not start up as if never checked. Bounded:
/// past `capacity` pairs the oldest removal is forgotten first.
#[derive(Clone)]
struct Removed {
    capacity: usize,
    /// Pair → (removal number, its state then).
    states: HashMap<(String, Endpoint), (u64, TargetState)>,
    /// Removal number → pair, oldest first.
    order: BTreeMap<u64, (String, Endpoint)>,
    next: u64,
}

impl Removed {
    fn new(capacity: usize) -> Self {
        Removed {
            capacity,
            states: HashMap::new(),
            order: BTreeMap::new(),
            next: 0,
        }
    }

    fn get(&self, user: &(String, Endpoint)) -> Option<&TargetState> {
        self.states.get(user).map(|(_, s)| s)
    }

    fn insert(&mut self, user: (String, Endpoint), state: TargetState) {
        self.remove(&user);
        self.order.insert(self.next, user.clone());
        self.states.insert(user, (self.next, state));
        self.next += 1;
        while self.states.len() > self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.states.remove(&oldest);
        }
    }

    fn remove(&mut self, user: &(String, Endpoint)) {
        if let Some((n, _)) = self.states.remove(user) {
            self.order.remove(&n);
        }
    }
}

/// The targets as they were; see [`HealthMonitor::saved_targets`].
pub struct SavedTargets {
    targets: BTreeMap<TargetKey, Target>,
    users: BTreeMap<(String, Endpoint), TargetKey>,
    removed: Removed,
}

/// Health checks of a set of targets. See the module docs.
pub struct HealthMonitor {
    targets: BTreeMap<TargetKey, Target>,
    /// The target each backend service uses for each of its servers.
    users: BTreeMap<(String, Endpoint), TargetKey>,
    removed: Removed,
    threads: Vec<ProbeThread>,
    done: Receiver<Done>,
    /// The most probes in flight the file descriptor limit allows.
    fd_limit: usize,
    /// The cap on probes in flight: what the targets need, within
    /// `fd_limit`; set with the targets.
    max_in_flight: usize,
    in_flight: usize,
    /// When due probes last had to wait for a slot and said so.
    deferred_warned: Option<Instant>,
    next_id: u64,
    /// Probes started, ever (for tests and stats).
    started: u64,
}

impl HealthMonitor {
    /// Starts [`PROBE_THREADS`] probe threads. `fd_limit` is the most
    /// probes that may ever be in flight at once, one socket each (see
    /// [`probe_fd_budget`]; 0 counts as 1); within it, the cap follows the
    /// targets ([`probes_needed`]).
    ///
    /// # Panics
    /// If the OS refuses a thread or a socket pair (out of processes or
    /// file descriptors at start-up).
    pub fn new(fd_limit: usize) -> Self {
        let (done_tx, done) = mpsc::channel();
        let threads = (0..PROBE_THREADS)
            .map(|i| {
                let (jobs_tx, jobs_rx) = mpsc::channel();
                let (wake_tx, wake_rx) =
                    UnixStream::pair().expect("creating a health probe wake-up socket pair");
                wake_tx
                    .set_nonblocking(true)
                    .expect("setting the wake-up socket non-blocking");
                wake_rx
                    .set_nonblocking(true)
                    .expect("setting the wake-up socket non-blocking");
                let done_tx = done_tx.clone();
                let handle = std::thread::Builder::new()
                    .name(format!("l4lb-health{i}"))
                    .spawn(move || probe_thread(jobs_rx, wake_rx, done_tx))
                    .expect("starting a health probe thread");
                ProbeThread {
                    jobs: Some(jobs_tx),
                    wake: Some(wake_tx),
                    outstanding: 0,
                    handle: Some(handle),
                }
            })
            .collect();
        HealthMonitor {
            targets: BTreeMap::new(),
            users: BTreeMap::new(),
            removed: Removed::new(REMEMBERED_REMOVALS),
            threads,
            done,
            fd_limit: fd_limit.max(1),
            max_in_flight: fd_limit.clamp(1, MIN_IN_FLIGHT),
            in_flight: 0,
            deferred_warned: None,
            next_id: 1,
            started: 0,
        }
    }

    /// A copy of every target's state, for [`HealthMonitor::restore_targets`]
    /// (a reload that fails after [`HealthMonitor::set_targets`]).
    pub fn saved_targets(&self) -> SavedTargets {
        SavedTargets {
            targets: self.targets.clone(),
            users: self.users.clone(),
            removed: self.removed.clone(),
        }
    }

    /// Puts the targets back as [`HealthMonitor::saved_targets`] found them.
    /// Probes started since report under ids the saved targets do not
    /// wait for, and are dropped.
    pub fn restore_targets(&mut self, saved: SavedTargets) {
        self.targets = saved.targets;
        self.users = saved.users;
        self.removed = saved.removed;
        self.size_in_flight_cap();
    }

    /// Replaces the set of targets (a duplicate key: the last one counts).
    /// * A target whose server and spec are unchanged keeps its state,
    ///   counters and schedule: a reload does not re-probe from zero. This
    ///   holds even if its [`TargetKey::check`] number changed (a reload
    ///   removed another check of the same server); a probe then in flight
    ///   reports under the old key and is dropped, and the target is probed
    ///   again at the next `poll`.
    /// * Otherwise, a target whose services checked the server before
    ///   (with another spec) keeps the up/down state those services had
    ///   for it, resets its consecutive counters and is scheduled like a
    ///   new one; the result of a probe of the old spec still in flight is
    ///   dropped. The state goes by service name, not by check number:
    ///   check numbers are positions in the file, and a reload that removes
    ///   or reorders services gives them to other services' checks. If the
    ///   services had different states (a reload gave two of them the same
    ///   check), down wins: one of them saw the server fail.
    /// * A server that an earlier reload removed from a service and this
    ///   one adds back takes the state it had then, counters reset (the
    ///   last `REMEMBERED_REMOVALS` (4096) removals are remembered).
    /// * A target that none of its services checked before starts **up**
    ///   (optimistic: it is taken out after `unhealthy_threshold`
    ///   failures) and is first probed at [`first_probe_offset`] after the
    ///   next `poll`.
    /// * Targets not in the new set are dropped; what their services knew
    ///   of their servers is remembered as above.
    pub fn set_targets(&mut self, targets: Vec<WantedTarget>) {
        let wanted: BTreeMap<TargetKey, WantedTarget> =
            targets.into_iter().map(|w| (w.key, w)).collect();
        let mut old = std::mem::take(&mut self.targets);
        let old_users = std::mem::take(&mut self.users);
        // What each service knew about each server, taken before any
        // target moves.
        let known: BTreeMap<&(String, Endpoint), TargetState> = old_users
            .iter()
            .filter_map(|(user, k)| Some((user, old.get(k)?.state.clone())))
            .collect();
        // First, every target whose server and spec are unchanged, whatever
        // its number; then the rest.
        let mut rest = Vec::new();
        for (key, w) in wanted {
            for service in &w.services {
                self.users.insert((service.clone(), key.endpoint()), key);
            }
            let same = old
                .iter()
                .find(|(k, t)| k.endpoint() == key.endpoint() && *t.spec == w.spec)
                .map(|(k, _)| *k);
            match same.and_then(|k| old.remove(&k).map(|t| (k, t))) {
                Some((k, mut t)) => {
                    if k != key {
                        t.running = None;
                    }
                    self.targets.insert(key, t);
                }
                None => rest.push(w),
            }
        }
        for w in rest {
            let mut target = Target::new(w.spec);
            let before: Vec<&TargetState> = w
                .services
                .iter()
                .filter_map(|s| {
                    let user = (s.clone(), w.key.endpoint());
                    known.get(&user).or_else(|| self.removed.get(&user))
                })
                .collect();
            if let Some(state) = before.iter().find(|s| !s.is_up()).or(before.first()) {
                let spec = &target.spec;
                target.state = (*state).clone();
                target
                    .state
                    .reset_counters(spec.unhealthy_threshold, spec.healthy_threshold);
            }
            self.targets.insert(w.key, target);
        }
        for (user, state) in known {
            if !self.users.contains_key(user) {
                self.removed.insert(user.clone(), state);
            }
        }
        for user in self.users.keys() {
            self.removed.remove(user);
        }
        self.size_in_flight_cap();
    }

    /// Sets the in-flight cap from the targets, within the file descriptor
    /// limit; warns if the limit is the lower.
    fn size_in_flight_cap(&mut self) {
        let needed = probes_needed(self.targets.values().map(|t| &*t.spec));
        if needed > self.fd_limit {
            tracing::warn!(
                "health checks of {} targets need up to {needed} probes in flight to keep \
                 their intervals, but the file descriptor limit leaves room for {}: probes \
                 will start late (raise RLIMIT_NOFILE, e.g. LimitNOFILE= in the systemd unit)",
                self.targets.len(),
                self.fd_limit
            );
        }
        self.max_in_flight = needed.min(self.fd_limit);
    }

    /// The cap on probes in flight now.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    /// Collects finished probes, starts the ones that are due (oldest due
    /// first, at most `max_in_flight` outstanding) and returns the state
    /// changes since the last call, each also logged once. Never blocks: it
    /// only polls a channel and hands jobs to the probe threads.
    pub fn poll(&mut self, now: Instant) -> Vec<Transition> {
        let mut changes = Vec::new();
        while let Ok(done) = self.done.try_recv() {
            self.in_flight -= 1;
            self.threads[done.thread].outstanding -= 1;
            if let Some(t) = self.apply(&done.key, done.id, done.success, &done.reason) {
                changes.push(t);
            }
        }

        let mut due: Vec<(Instant, TargetKey)> = Vec::new();
        for (key, t) in self.targets.iter_mut() {
            let at = *t
                .next_due
                .get_or_insert_with(|| now + first_probe_offset(key, t.spec.interval));
            if t.running.is_none() && at <= now {
                due.push((at, *key));
            }
        }
        due.sort_unstable();
        let room = self.max_in_flight.saturating_sub(self.in_flight);
        let deferred = due.len().saturating_sub(room);
        if deferred > 0
            && self
                .deferred_warned
                .is_none_or(|at| now.saturating_duration_since(at) >= DEFERRED_WARNING_PERIOD)
        {
            self.deferred_warned = Some(now);
            tracing::warn!(
                "{deferred} due health probe(s) wait: all {} probe slots are busy, so checks \
                 run later than their interval",
                self.max_in_flight
            );
        }
        let mut woken = [false; PROBE_THREADS];
        for (at, key) in due.into_iter().take(room) {
            let Some(thread) = self.pick_thread() else {
                break;
            };
            let t = self.targets.get_mut(&key).expect("due target exists");
            let id = self.next_id;
            let job = Job {
                id,
                key,
                thread,
                addr: SocketAddr::new(key.addr, t.spec.port),
                spec: Arc::clone(&t.spec),
            };
            let sent = self.threads[thread]
                .jobs
                .as_ref()
                .is_some_and(|tx| tx.send(job).is_ok());
            if !sent {
                tracing::error!("health probe thread {thread} has exited; not using it");
                self.threads[thread].jobs = None;
                continue;
            }
            self.next_id += 1;
            self.started += 1;
            self.in_flight += 1;
            self.threads[thread].outstanding += 1;
            woken[thread] = true;
            t.running = Some(id);
            // Keep the phase; re-phase only if we fell a whole interval
            // behind (the previous probe ran long or all slots were busy).
            let mut next = at + t.spec.interval;
            if next <= now {
                next = now + t.spec.interval;
            }
            t.next_due = Some(next);
        }
        for (i, th) in self.threads.iter().enumerate() {
            if woken[i] {
                if let Some(w) = &th.wake {
                    // Full buffer (WouldBlock): the thread has wake-ups
                    // pending anyway.
                    let _ = io::Write::write(&mut &*w, &[1]);
                }
            }
        }
        changes
    }

    /// Whether `key` should receive new clients; unknown keys are up.
    pub fn is_up(&self, key: &TargetKey) -> bool {
        self.targets.get(key).is_none_or(|t| t.state.is_up())
    }

    /// Every target, in key order, with its state and its last probe result
    /// ([`NOT_PROBED`] before the first).
    pub fn states(&self) -> Vec<(TargetKey, bool, String)> {
        self.targets
            .iter()
            .map(|(k, t)| (*k, t.state.is_up(), t.state.last_result().to_string()))
            .collect()
    }

    /// The live probe thread with the fewest probes outstanding.
    fn pick_thread(&self) -> Option<usize> {
        self.threads
            .iter()
            .enumerate()
            .filter(|(_, t)| t.jobs.is_some())
            .min_by_key(|(_, t)| t.outstanding)
            .map(|(i, _)| i)
    }

    /// Records the result of probe `id` of `key`, if the target is still
    /// waiting for it.
    fn apply(
        &mut self,
        key: &TargetKey,
        id: u64,
        success: bool,
        reason: &str,
    ) -> Option<Transition> {
        let t = self.targets.get_mut(key)?;
        if t.running != Some(id) {
            return None;
        }
        t.running = None;
        let up = t.state.record(success, reason)?;
        let (ok_run, fail_run) = t.state.counters();
        if up {
            tracing::info!("server {key} is up: {reason} ({ok_run} consecutive successes)");
        } else {
            tracing::warn!("server {key} is down: {reason} ({fail_run} consecutive failures)");
        }
        Some(Transition {
            key: *key,
            up,
            reason: reason.to_string(),
        })
    }
}

impl Drop for HealthMonitor {
    /// Stops the probe threads: closing the job channel and the wake-up
    /// socket ends their poll(2) at once; probes in flight are abandoned.
    fn drop(&mut self) {
        for th in &mut self.threads {
            th.jobs = None;
            th.wake = None;
        }
        for th in &mut self.threads {
            if let Some(h) = th.handle.take() {
                let _ = h.join();
            }
        }
    }
}

// ----- probe threads -----

enum Step {
    /// TCP connect in progress.
    Connect,
    /// HTTP request partly written.
    Send { request: Vec<u8>, sent: usize },
    /// Waiting for the HTTP status line.
    Read { buf: Vec<u8> },
    /// UDP payload sent, waiting for any reply.
    Reply,
}

struct Active {
    id: u64,
    key: TargetKey,
    thread: usize,
    sock: Socket,
    addr: SocketAddr,
    spec: Arc<CheckSpec>,
    deadline: Instant,
    step: Step,
}

type Outcome = (bool, String);

fn failure(e: &io::Error) -> Outcome {
    (false, describe(e))
}

/// Short, stable reasons for the errors a probe meets.
fn describe(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::TimedOut => "timeout".into(),
        io::ErrorKind::ConnectionReset => "connection reset".into(),
        io::ErrorKind::HostUnreachable => "host unreachable".into(),
        io::ErrorKind::NetworkUnreachable => "network unreachable".into(),
        _ => e.to_string(),
    }
}

/// `GET {path}` with the Host header named by the check, or the server's
/// address (RFC 9110 §7.2; an IPv6 literal in brackets, RFC 3986 §3.2.2).
fn http_request(path: &str, host: Option<&str>, addr: IpAddr) -> Vec<u8> {
    let host = match (host, addr) {
        (Some(h), _) => h.to_string(),
        (None, IpAddr::V4(a)) => a.to_string(),
        (None, IpAddr::V6(a)) => format!("[{a}]"),
    };
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: l4lb-health\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

/// The status code of an HTTP/1.x status line (RFC 9112 §4:
/// `HTTP-version SP status-code SP [ reason-phrase ]`, where HTTP-version
/// is `HTTP/` DIGIT `.` DIGIT, §2.3).
fn status_code(line: &[u8]) -> Option<u16> {
    let rest = line.strip_prefix(b"HTTP/")?;
    match rest.get(..4)? {
        [major, b'.', minor, b' '] if major.is_ascii_digit() && minor.is_ascii_digit() => {}
        _ => return None,
    }
    let code = rest.get(4..7)?;
    if !code.iter().all(u8::is_ascii_digit) {
        return None;
    }
    match rest.get(7) {
        None | Some(b' ') | Some(b'\r') => {}
        Some(_) => return None,
    }
    code.iter()
        .try_fold(0u16, |n, d| Some(n * 10 + u16::from(d - b'0')))
}

fn judge_status(line: &[u8], codes: &[(u16, u16)]) -> Outcome {
    match status_code(line) {
        Some(c) if codes.iter().any(|&(lo, hi)| lo <= c && c <= hi) => (true, "ok".into()),
        Some(c) => (false, format!("status {c}")),
        None => (false, "bad response".into()),
    }
}

/// Judges the start of an HTTP response once its final status line has
/// arrived; `None` until then. A server may send any number of interim
/// 1xx responses first, each a status line and a header block ending in an
/// empty line (RFC 9110 §15.2, e.g. 103 Early Hints); they are skipped.
/// Not 101 Switching Protocols: it is final for this connection, and the
/// probe asked for no upgrade, so it is judged (and fails).
fn judge_response(buf: &[u8], codes: &[(u16, u16)]) -> Option<Outcome> {
    let mut rest = buf;
    loop {
        let end = rest.iter().position(|&b| b == b'\n')?;
        let line = &rest[..end];
        match status_code(line) {
            Some(c) if (100..200).contains(&c) && c != 101 => {
                rest = &rest[end + 1..];
                loop {
                    let end = rest.iter().position(|&b| b == b'\n')?;
                    let field = &rest[..end];
                    rest = &rest[end + 1..];
                    if field.is_empty() || field == b"\r" {
                        break;
                    }
                }
            }
            _ => return Some(judge_status(line, codes)),
        }
    }
}

impl Active {
    /// Opens the socket and starts the exchange; `Err` if it is over already.
    fn start(job: Job) -> Result<Active, Outcome> {
        let udp = matches!(job.spec.probe, Probe::Udp { .. });
        let (ty, proto) = if udp {
            (Type::DGRAM, Protocol::UDP)
        } else {
            (Type::STREAM, Protocol::TCP)
        };
        let sock =
            Socket::new(Domain::for_address(job.addr), ty, Some(proto)).map_err(|e| failure(&e))?;
        sock.set_nonblocking(true).map_err(|e| failure(&e))?;
        match sock.connect(&SockAddr::from(job.addr)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(failure(&e)),
        }
        let step = match &job.spec.probe {
            Probe::Udp { payload } => {
                match sock.send_with_flags(payload, libc::MSG_NOSIGNAL) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        return Err((false, "ICMP port unreachable".into()))
                    }
                    Err(e) => return Err(failure(&e)),
                }
                Step::Reply
            }
            _ => Step::Connect,
        };
        Ok(Active {
            id: job.id,
            key: job.key,
            thread: job.thread,
            sock,
            addr: job.addr,
            deadline: Instant::now() + job.spec.timeout,
            spec: job.spec,
            step,
        })
    }

    fn events(&self) -> libc::c_short {
        match self.step {
            Step::Connect | Step::Send { .. } => libc::POLLOUT,
            Step::Read { .. } | Step::Reply => libc::POLLIN,
        }
    }

    /// Goes as far as the socket allows without blocking; `Some` when the
    /// probe is over.
    fn advance(&mut self) -> Option<Outcome> {
        const CHUNK: usize = 512;
        let mut chunk = [0u8; CHUNK];
        loop {
            match &mut self.step {
                Step::Connect => {
                    match self.sock.take_error() {
                        Ok(Some(e)) | Err(e) => return Some(failure(&e)),
                        Ok(None) => {}
                    }
                    // SO_ERROR is clear and getpeername works only once
                    // the handshake is done (connect(2), EINPROGRESS).
                    match self.sock.peer_addr() {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => return None,
                        Err(e) => return Some(failure(&e)),
                    }
                    match &self.spec.probe {
                        Probe::Http { path, host, .. } => {
                            self.step = Step::Send {
                                request: http_request(path, host.as_deref(), self.addr.ip()),
                                sent: 0,
                            }
                        }
                        _ => return Some((true, "ok".into())),
                    }
                }
                Step::Send { request, sent } => {
                    match self
                        .sock
                        .send_with_flags(&request[*sent..], libc::MSG_NOSIGNAL)
                    {
                        Ok(n) => {
                            *sent += n;
                            if *sent == request.len() {
                                self.step = Step::Read { buf: Vec::new() };
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Some(failure(&e)),
                    }
                }
                // Never past MAX_STATUS_READ: whether a status line just
                // after it counts must not depend on how the reads split.
                Step::Read { buf } => match (&self.sock)
                    .read(&mut chunk[..(MAX_STATUS_READ - buf.len()).min(CHUNK)])
                {
                    Ok(0) if buf.is_empty() => return Some((false, "connection closed".into())),
                    Ok(0) => return Some((false, "bad response".into())),
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        let codes = match &self.spec.probe {
                            Probe::Http { codes, .. } => codes.as_slice(),
                            _ => &[],
                        };
                        if let Some(outcome) = judge_response(buf, codes) {
                            return Some(outcome);
                        }
                        if buf.len() >= MAX_STATUS_READ {
                            return Some((false, "bad response".into()));
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Some(failure(&e)),
                },
                Step::Reply => match (&self.sock).read(&mut chunk) {
                    Ok(_) => return Some((true, "ok".into())),
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        return Some((false, "ICMP port unreachable".into()))
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Some(failure(&e)),
                },
            }
        }
    }
}

/// One probe thread: takes jobs, drives their sockets with poll(2), reports
/// each outcome. Exits when the monitor closes the wake-up socket.
fn probe_thread(jobs: Receiver<Job>, wake: UnixStream, done: Sender<Done>) {
    let mut active: Vec<Active> = Vec::new();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    let report = |id: u64, key: TargetKey, thread: usize, (success, reason): Outcome| {
        // The monitor is gone if this fails; the wake-up socket says so next.
        let _ = done.send(Done {
            id,
            key,
            thread,
            success,
            reason,
        });
    };
    loop {
        loop {
            match jobs.try_recv() {
                Ok(job) => {
                    let (id, key, thread) = (job.id, job.key, job.thread);
                    match Active::start(job) {
                        Ok(a) => active.push(a),
                        Err(outcome) => report(id, key, thread, outcome),
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }

        let now = Instant::now();
        let mut i = 0;
        while i < active.len() {
            if active[i].deadline <= now {
                let a = active.swap_remove(i);
                report(a.id, a.key, a.thread, (false, "timeout".into()));
            } else {
                i += 1;
            }
        }
        // Wait for the nearest deadline at most, rounded up so that we do
        // not wake just before it and spin.
        let timeout_ms = active
            .iter()
            .map(|a| a.deadline - now)
            .min()
            .map_or(-1, |d| {
                d.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int
            });

        fds.clear();
        fds.push(libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        fds.extend(active.iter().map(|a| libc::pollfd {
            fd: a.sock.as_raw_fd(),
            events: a.events(),
            revents: 0,
        }));
        // SAFETY: `fds` is a valid, exclusively borrowed array of
        // `fds.len()` pollfd structs for the duration of the call, and every
        // fd in it is owned by `wake` or an `Active` that outlives the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::error!("health probe poll(2): {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            continue;
        }

        if fds[0].revents != 0 {
            let mut sink = [0u8; 64];
            loop {
                match (&wake).read(&mut sink) {
                    Ok(0) => return, // the monitor was dropped
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break, // WouldBlock: drained
                }
            }
        }
        // Back to front, so that swap_remove only moves entries already seen.
        for i in (0..active.len()).rev() {
            if fds[i + 1].revents == 0 {
                continue;
            }
            if let Some(outcome) = active[i].advance() {
                let a = active.swap_remove(i);
                report(a.id, a.key, a.thread, outcome);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr, UdpSocket};

    fn key(last: u8, port: u16) -> TargetKey {
        TargetKey {
            addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, last)),
            port,
            proto: 6,
            check: 0,
        }
    }

    /// Targets that one service, "web", uses.
    fn web(targets: Vec<(TargetKey, CheckSpec)>) -> Vec<WantedTarget> {
        targets
            .into_iter()
            .map(|(key, spec)| wanted(key, spec, &["web"]))
            .collect()
    }

    fn wanted(key: TargetKey, spec: CheckSpec, services: &[&str]) -> WantedTarget {
        WantedTarget {
            key,
            spec,
            services: services.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn tcp_spec(unhealthy: u32, healthy: u32) -> CheckSpec {
        CheckSpec {
            probe: Probe::Tcp,
            port: 80,
            timeout: Duration::from_secs(2),
            interval: Duration::from_secs(5),
            unhealthy_threshold: unhealthy,
            healthy_threshold: healthy,
        }
    }

    #[test]
    fn three_failures_take_a_server_down_and_two_failures_do_not() {
        let mut s = TargetState::new(3, 2);
        assert_eq!(s.record(false, "timeout"), None);
        assert_eq!(s.record(false, "timeout"), None);
        assert!(s.is_up());
        assert_eq!(s.record(false, "connection refused"), Some(false));
        assert!(!s.is_up());
        assert_eq!(s.last_result(), "connection refused");
        // Further failures do not report again.
        assert_eq!(s.record(false, "timeout"), None);
    }

    #[test]
    fn a_single_failure_between_successes_does_not_flip() {
        let mut s = TargetState::new(3, 2);
        for _ in 0..5 {
            assert_eq!(s.record(true, "ok"), None);
            assert_eq!(s.record(false, "timeout"), None);
            assert_eq!(s.record(false, "timeout"), None);
            assert_eq!(s.record(true, "ok"), None);
        }
        assert!(s.is_up());
    }

    #[test]
    fn two_successes_bring_a_down_server_back() {
        let mut s = TargetState::new(2, 2);
        s.record(false, "timeout");
        assert_eq!(s.record(false, "timeout"), Some(false));
        assert_eq!(s.record(true, "ok"), None);
        assert!(!s.is_up());
        assert_eq!(s.record(true, "ok"), Some(true));
        assert!(s.is_up());
        assert_eq!(s.record(true, "ok"), None);
    }

    #[test]
    fn alternating_results_never_flip_either_way() {
        for start_down in [false, true] {
            let mut s = TargetState::new(2, 2);
            if start_down {
                s.record(false, "x");
                s.record(false, "x");
                assert!(!s.is_up());
            }
            for i in 0..100 {
                assert_eq!(s.record(i % 2 == 0, "r"), None, "step {i}");
            }
            assert_eq!(s.is_up(), !start_down);
        }
    }

    #[test]
    fn first_probe_offsets_are_deterministic_within_the_interval_and_spread() {
        let interval = Duration::from_secs(5);
        let mut offsets = Vec::new();
        for i in 0..1000u32 {
            let k = TargetKey {
                addr: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)),
                port: 80,
                proto: 6,
                check: 0,
            };
            let o = first_probe_offset(&k, interval);
            assert_eq!(o, first_probe_offset(&k, interval));
            assert!(o < interval, "{k}: {o:?}");
            offsets.push(o);
        }
        // Spread: every fifth of the interval gets a fair share.
        let mut buckets = [0u32; 5];
        for o in &offsets {
            buckets[o.as_secs() as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&b| (150..=250).contains(&b)),
            "{buckets:?}"
        );
        // Port, protocol and check are part of the key.
        let a = key(1, 80);
        for other in [
            TargetKey { proto: 17, ..a },
            TargetKey { port: 81, ..a },
            TargetKey { check: 1, ..a },
        ] {
            assert_ne!(
                first_probe_offset(&a, interval),
                first_probe_offset(&other, interval),
                "{other:?}"
            );
        }
        let v6 = TargetKey {
            addr: IpAddr::V6(Ipv6Addr::LOCALHOST),
            ..a
        };
        assert!(first_probe_offset(&v6, interval) < interval);
        assert_eq!(first_probe_offset(&a, Duration::ZERO), Duration::ZERO);
    }

    /// Stands in for a finished probe of `k`.
    fn finish(
        m: &mut HealthMonitor,
        k: TargetKey,
        success: bool,
        reason: &str,
    ) -> Option<Transition> {
        let id = m.next_id;
        m.next_id += 1;
        m.targets.get_mut(&k).unwrap().running = Some(id);
        m.apply(&k, id, success, reason)
    }

    #[test]
    fn set_targets_keeps_unchanged_targets_and_resets_counters_of_changed_ones() {
        let mut m = HealthMonitor::new(4);
        let (a, b, c) = (key(1, 80), key(2, 80), key(3, 80));
        m.set_targets(web(vec![
            (a, tcp_spec(2, 2)),
            (b, tcp_spec(2, 2)),
            (c, tcp_spec(3, 2)),
        ]));
        let t0 = Instant::now();
        m.targets.get_mut(&a).unwrap().next_due = Some(t0);
        assert_eq!(finish(&mut m, a, false, "timeout"), None);
        assert_eq!(
            finish(&mut m, a, false, "timeout"),
            Some(Transition {
                key: a,
                up: false,
                reason: "timeout".into()
            })
        );
        assert_eq!(finish(&mut m, a, true, "ok"), None); // a: down, 1 success
        assert_eq!(finish(&mut m, b, false, "connection refused"), None); // b: up, 1 failure
        assert_eq!(finish(&mut m, c, false, "timeout"), None);
        m.targets.get_mut(&b).unwrap().running = Some(99); // b: a probe in flight
        let a_before = m.targets[&a].state.clone();

        let mut b_spec = tcp_spec(2, 2);
        b_spec.port = 8080;
        let d = key(4, 80);
        m.set_targets(web(vec![
            (a, tcp_spec(2, 2)),
            (b, b_spec.clone()),
            (d, tcp_spec(2, 2)),
        ]));
        // a: unchanged: state, counters and schedule kept.
        assert_eq!(m.targets[&a].state, a_before);
        assert_eq!(m.targets[&a].state.counters(), (1, 0));
        assert_eq!(m.targets[&a].next_due, Some(t0));
        assert!(!m.is_up(&a));
        // b: changed: still up, counters reset, rescheduled.
        assert!(m.is_up(&b));
        assert_eq!(m.targets[&b].state.counters(), (0, 0));
        assert_eq!(*m.targets[&b].spec, b_spec);
        assert_eq!(m.targets[&b].next_due, None);
        // The result of the probe of b's old spec is dropped.
        assert_eq!(m.apply(&b, 99, false, "timeout"), None);
        assert_eq!(m.targets[&b].state.counters(), (0, 0));
        // c: forgotten; d: new and up.
        assert!(!m.targets.contains_key(&c));
        assert!(m.is_up(&c), "unknown keys are up");
        assert!(m.is_up(&d));
        assert_eq!(
            m.states(),
            vec![
                (a, false, "ok".to_string()),
                (b, true, "connection refused".to_string()),
                (d, true, NOT_PROBED.to_string()),
            ]
        );
    }

    /// A reload that drops the first of two checks of a server renumbers
    /// the second; it keeps its own state (here: down), not the dropped
    /// one's (up).
    #[test]
    fn a_renumbered_check_keeps_its_own_state() {
        let mut m = HealthMonitor::new(4);
        let first = key(1, 80);
        let second = TargetKey { check: 1, ..first };
        let mut http = tcp_spec(2, 2);
        http.probe = Probe::Http {
            path: "/b".into(),
            host: None,
            codes: vec![(200, 399)],
        };
        m.set_targets(vec![
            wanted(first, tcp_spec(2, 2), &["a"]),
            wanted(second, http.clone(), &["b"]),
        ]);
        finish(&mut m, second, false, "status 503");
        assert_eq!(
            finish(&mut m, second, false, "status 503").map(|t| t.up),
            Some(false)
        );
        m.targets.get_mut(&second).unwrap().running = Some(77);
        assert!(m.is_up(&first));

        m.set_targets(vec![wanted(first, http.clone(), &["b"])]);
        assert!(
            !m.is_up(&first),
            "the HTTP check's down state moved with it"
        );
        assert_eq!(*m.targets[&first].spec, http);
        assert_eq!(m.targets[&first].state.counters(), (0, 2));
        assert_eq!(
            m.targets[&first].running, None,
            "probed again at the next poll"
        );
        assert_eq!(m.apply(&second, 77, true, "ok"), None);
        assert_eq!(m.targets.len(), 1);
    }

    fn http_spec(path: &str) -> CheckSpec {
        CheckSpec {
            probe: Probe::Http {
                path: path.into(),
                host: None,
                codes: vec![(200, 399)],
            },
            ..tcp_spec(2, 2)
        }
    }

    /// Services a and b check one server with their own HTTP paths; the
    /// server is `a_up` for a and `b_up` for b (a's target is check 0, b's
    /// check 1).
    fn two_services_on_one_server(a_up: bool, b_up: bool) -> (HealthMonitor, TargetKey) {
        let mut m = HealthMonitor::new(4);
        let k0 = key(1, 80);
        let k1 = TargetKey { check: 1, ..k0 };
        m.set_targets(vec![
            wanted(k0, http_spec("/a"), &["a"]),
            wanted(k1, http_spec("/b"), &["b"]),
        ]);
        for (k, up) in [(k0, a_up), (k1, b_up)] {
            if !up {
                finish(&mut m, k, false, "status 503");
                assert_eq!(
                    finish(&mut m, k, false, "status 503").map(|t| t.up),
                    Some(false)
                );
            } else {
                assert_eq!(finish(&mut m, k, true, "ok"), None);
            }
        }
        (m, k0)
    }

    /// The reviewer's case: a reload drops service a and changes b's path.
    /// b's new check is check 0, the number a's had; it keeps b's state.
    #[test]
    fn a_changed_check_keeps_its_own_services_up_state_not_another_services_down() {
        let (mut m, k0) = two_services_on_one_server(false, true);
        m.set_targets(vec![wanted(k0, http_spec("/b2"), &["b"])]);
        assert_eq!(m.states(), vec![(k0, true, "ok".to_string())]);
        assert_eq!(m.targets[&k0].state.counters(), (0, 0));
    }

    #[test]
    fn a_changed_check_keeps_its_own_services_down_state_not_another_services_up() {
        let (mut m, k0) = two_services_on_one_server(true, false);
        m.set_targets(vec![wanted(k0, http_spec("/b2"), &["b"])]);
        assert_eq!(m.states(), vec![(k0, false, "status 503".to_string())]);
        // Back up after healthy_threshold successes of the new check.
        assert_eq!(finish(&mut m, k0, true, "ok"), None);
        assert_eq!(finish(&mut m, k0, true, "ok").map(|t| t.up), Some(true));
    }

    /// Both services change their checks and swap places in the file, so
    /// their check numbers swap too.
    #[test]
    fn reordered_services_with_changed_checks_keep_their_own_states() {
        let (mut m, k0) = two_services_on_one_server(false, true);
        let k1 = TargetKey { check: 1, ..k0 };
        m.set_targets(vec![
            wanted(k0, http_spec("/b2"), &["b"]),
            wanted(k1, http_spec("/a2"), &["a"]),
        ]);
        assert!(m.is_up(&k0), "b's server, up for b");
        assert!(!m.is_up(&k1), "a's server, down for a");
    }

    /// A reload changes a's check to the one b already runs on the server:
    /// the check is b's, unchanged, so one target for both with b's state
    /// and counters, whatever a's old check said.
    #[test]
    fn a_check_changed_to_one_another_service_runs_takes_that_checks_state() {
        let (mut m, k0) = two_services_on_one_server(false, true);
        m.set_targets(vec![wanted(k0, http_spec("/b"), &["a", "b"])]);
        assert_eq!(m.states(), vec![(k0, true, "ok".to_string())]);
        assert_eq!(m.targets[&k0].state.counters(), (1, 0));
        let (mut m, k0) = two_services_on_one_server(true, false);
        m.set_targets(vec![wanted(k0, http_spec("/b"), &["a", "b"])]);
        assert_eq!(m.states(), vec![(k0, false, "status 503".to_string())]);
    }

    /// A reload gives a and b the same new check: one target for both. a
    /// saw the server fail, so it stays down until the new check passes.
    #[test]
    fn services_merged_onto_one_changed_check_keep_the_server_down_if_either_had_it_down() {
        for (a_up, b_up) in [(false, true), (true, false)] {
            let (mut m, k0) = two_services_on_one_server(a_up, b_up);
            m.set_targets(vec![wanted(k0, http_spec("/ready"), &["a", "b"])]);
            assert!(!m.is_up(&k0), "a up {a_up}, b up {b_up}");
        }
        let (mut m, k0) = two_services_on_one_server(true, true);
        m.set_targets(vec![wanted(k0, http_spec("/ready"), &["a", "b"])]);
        assert!(m.is_up(&k0));
    }

    /// A service that did not use the server before gets a new target,
    /// up, even where another service's check of it was down.
    #[test]
    fn a_service_new_to_a_server_starts_it_up() {
        let (mut m, k0) = two_services_on_one_server(false, false);
        m.set_targets(vec![wanted(k0, http_spec("/c"), &["c"])]);
        assert_eq!(m.states(), vec![(k0, true, NOT_PROBED.to_string())]);
    }

    /// A down server removed by one reload and added back by the next
    /// comes back down: l4lb has checked it before.
    #[test]
    fn a_down_server_removed_and_added_back_comes_back_down() {
        let mut m = HealthMonitor::new(4);
        let (a, b) = (key(1, 80), key(2, 80));
        m.set_targets(web(vec![(a, tcp_spec(2, 2)), (b, tcp_spec(2, 2))]));
        finish(&mut m, a, false, "connection refused");
        assert_eq!(
            finish(&mut m, a, false, "connection refused").map(|t| t.up),
            Some(false)
        );
        m.set_targets(web(vec![(b, tcp_spec(2, 2))]));
        m.set_targets(web(vec![(a, tcp_spec(2, 2)), (b, tcp_spec(2, 2))]));
        assert_eq!(
            m.states(),
            vec![
                (a, false, "connection refused".to_string()),
                (b, true, NOT_PROBED.to_string()),
            ]
        );
        // Counters restart: healthy_threshold successes bring it back.
        assert_eq!(finish(&mut m, a, true, "ok"), None);
        assert_eq!(finish(&mut m, a, true, "ok").map(|t| t.up), Some(true));
        // Back in the configuration, it is no longer a removal: removed
        // again while up, it comes back up.
        m.set_targets(web(vec![(b, tcp_spec(2, 2))]));
        m.set_targets(web(vec![(a, tcp_spec(2, 3))]));
        assert!(m.is_up(&a));
    }

    /// What one service saw is not another's: the server added to another
    /// service starts up there.
    #[test]
    fn a_removed_server_added_to_another_service_starts_up() {
        let mut m = HealthMonitor::new(4);
        let a = key(1, 80);
        m.set_targets(vec![wanted(a, tcp_spec(2, 2), &["old"])]);
        finish(&mut m, a, false, "timeout");
        finish(&mut m, a, false, "timeout");
        m.set_targets(vec![]);
        m.set_targets(vec![wanted(a, tcp_spec(2, 2), &["new"])]);
        assert!(m.is_up(&a));
    }

    #[test]
    fn removals_past_the_capacity_forget_the_oldest_first() {
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let user = |n: u16| ("web".to_string(), (ip, n, 6));
        let down = {
            let mut s = TargetState::new(1, 1);
            s.record(false, "timeout");
            s
        };
        let mut r = Removed::new(2);
        r.insert(user(1), down.clone());
        r.insert(user(2), down.clone());
        r.insert(user(1), down.clone()); // removed again: now the newest
        r.insert(user(3), down.clone());
        assert_eq!(r.get(&user(2)), None);
        assert_eq!(r.get(&user(1)), Some(&down));
        assert_eq!(r.get(&user(3)), Some(&down));
        r.remove(&user(1));
        assert_eq!((r.states.len(), r.order.len()), (1, 1));
    }

    /// A reload that fails after setting the new targets puts the old ones
    /// back, state and probe in flight included.
    #[test]
    fn restored_targets_are_as_they_were() {
        let mut m = HealthMonitor::new(4);
        let (a, b) = (key(1, 80), key(2, 80));
        m.set_targets(web(vec![(a, tcp_spec(2, 2))]));
        finish(&mut m, a, false, "timeout");
        finish(&mut m, a, false, "timeout");
        m.targets.get_mut(&a).unwrap().running = Some(5);
        let saved = m.saved_targets();
        m.set_targets(web(vec![(b, tcp_spec(2, 2))]));
        assert!(m.is_up(&a), "a forgotten, so unknown, so up");
        m.restore_targets(saved);
        assert!(!m.is_up(&a));
        assert_eq!(m.states(), vec![(a, false, "timeout".to_string())]);
        // The probe that was in flight still counts.
        assert_eq!(m.apply(&a, 5, true, "ok"), None);
        assert_eq!(m.targets[&a].state.counters(), (1, 0));
    }

    #[test]
    fn a_changed_spec_keeps_a_down_server_down() {
        let mut m = HealthMonitor::new(4);
        let a = key(1, 80);
        m.set_targets(web(vec![(a, tcp_spec(2, 2))]));
        finish(&mut m, a, false, "timeout");
        assert_eq!(
            finish(&mut m, a, false, "timeout").map(|t| t.up),
            Some(false)
        );
        m.set_targets(web(vec![(a, tcp_spec(2, 3))]));
        assert!(!m.is_up(&a));
        assert_eq!(finish(&mut m, a, true, "ok"), None);
        assert_eq!(finish(&mut m, a, true, "ok"), None);
        assert_eq!(finish(&mut m, a, true, "ok").map(|t| t.up), Some(true));
    }

    /// A UDP "server" that never answers keeps each probe running for its
    /// whole timeout, so the schedule can be driven with made-up times.
    #[test]
    fn probes_start_at_the_offset_then_every_interval_and_are_never_doubled() {
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        let k = TargetKey {
            addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port,
            proto: 17,
            check: 0,
        };
        let spec = CheckSpec {
            probe: Probe::Udp {
                payload: b"ping".to_vec(),
            },
            port,
            timeout: Duration::from_secs(30),
            interval: Duration::from_secs(1),
            unhealthy_threshold: 2,
            healthy_threshold: 2,
        };
        let mut m = HealthMonitor::new(8);
        m.set_targets(web(vec![(k, spec)]));
        let t0 = Instant::now();
        let offset = first_probe_offset(&k, Duration::from_secs(1));
        m.poll(t0);
        if offset > Duration::ZERO {
            assert_eq!(m.started, 0);
            m.poll(t0 + offset - Duration::from_nanos(1));
            assert_eq!(m.started, 0);
        }
        m.poll(t0 + offset);
        assert_eq!(m.started, 1);
        // Due again, but the first probe is still waiting for its reply.
        m.poll(t0 + offset + Duration::from_secs(1));
        m.poll(t0 + offset + Duration::from_secs(5));
        assert_eq!(m.started, 1);
        assert_eq!(m.in_flight, 1);
        // The probe really reached the server.
        silent
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 16];
        let (n, _) = silent.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"ping");
        // Dropping the monitor stops its threads without waiting for the
        // 30 s timeout.
        let t = Instant::now();
        drop(m);
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn the_in_flight_cap_covers_every_targets_share_of_its_interval() {
        let spec = |timeout: u64, interval: u64| CheckSpec {
            timeout: Duration::from_secs(timeout),
            interval: Duration::from_secs(interval),
            ..tcp_spec(2, 2)
        };
        let many = |n: usize, s: CheckSpec| vec![s; n];
        assert_eq!(probes_needed(&[]), MIN_IN_FLIGHT);
        assert_eq!(probes_needed(&many(10, spec(1, 1))), MIN_IN_FLIGHT);
        // 301 targets busy all the time: 301 × 1.5, rounded up.
        assert_eq!(probes_needed(&many(301, spec(1, 1))), 452);
        // The defaults, 2 s of every 5 s: 1000 × 0.4 × 1.5.
        assert_eq!(probes_needed(&many(1000, spec(2, 5))), 600);
        // A timeout longer than the interval still runs one probe at a
        // time; a zero interval counts as busy all the time.
        assert_eq!(probes_needed(&many(100, spec(30, 1))), 150);
        assert_eq!(probes_needed(&many(100, spec(0, 0))), 150);

        let mut m = HealthMonitor::new(1000);
        let targets = (0..301u16)
            .map(|i| (key(1, 1000 + i), spec(1, 1)))
            .collect();
        m.set_targets(web(targets));
        assert_eq!(m.max_in_flight(), 452);
        let mut m = HealthMonitor::new(100);
        m.set_targets(web(vec![(key(1, 80), spec(1, 1))]));
        assert_eq!(m.max_in_flight(), 64);
        m.set_targets(web((0..301u16)
            .map(|i| (key(1, 1000 + i), spec(1, 1)))
            .collect()));
        assert_eq!(m.max_in_flight(), 100, "the file descriptor limit");
    }

    #[test]
    fn max_in_flight_bounds_outstanding_probes() {
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        let spec = CheckSpec {
            probe: Probe::Udp {
                payload: b"ping".to_vec(),
            },
            port,
            timeout: Duration::from_secs(30),
            interval: Duration::from_secs(1),
            unhealthy_threshold: 2,
            healthy_threshold: 2,
        };
        let targets = (0..10u16)
            .map(|i| {
                let k = TargetKey {
                    addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
                    port: 1000 + i,
                    proto: 17,
                    check: 0,
                };
                (k, spec.clone())
            })
            .collect();
        let mut m = HealthMonitor::new(3);
        m.set_targets(web(targets));
        let t0 = Instant::now();
        m.poll(t0);
        m.poll(t0 + Duration::from_secs(1));
        assert_eq!(m.started, 3);
        assert_eq!(m.in_flight, 3);
    }

    #[test]
    fn from_config_takes_the_check_port_codes_payload_and_times() {
        use crate::config::{HealthCheck, HealthCheckKind};
        let hc = HealthCheck {
            kind: HealthCheckKind::Http,
            port: Some(8081),
            timeout: 2,
            interval: 5,
            unhealthy_threshold: 3,
            healthy_threshold: 2,
            path: Some("/ready".into()),
            domain: Some("www.example.com".into()),
            http_codes: vec![(200, 200), (204, 204)],
            udp_payload: None,
        };
        assert_eq!(
            CheckSpec::from_config(&hc, 80),
            CheckSpec {
                probe: Probe::Http {
                    path: "/ready".into(),
                    host: Some("www.example.com".into()),
                    codes: vec![(200, 200), (204, 204)],
                },
                port: 8081,
                timeout: Duration::from_secs(2),
                interval: Duration::from_secs(5),
                unhealthy_threshold: 3,
                healthy_threshold: 2,
            }
        );
        let udp = HealthCheck {
            kind: HealthCheckKind::Udp,
            port: None,
            path: None,
            domain: None,
            http_codes: vec![],
            udp_payload: Some("ping".into()),
            ..hc.clone()
        };
        let s = CheckSpec::from_config(&udp, 53);
        assert_eq!(s.port, 53);
        assert_eq!(
            s.probe,
            Probe::Udp {
                payload: b"ping".to_vec()
            }
        );
        let bare_http = HealthCheck {
            path: None,
            http_codes: vec![],
            ..hc
        };
        assert_eq!(
            CheckSpec::from_config(&bare_http, 80).probe,
            Probe::Http {
                path: "/".into(),
                host: Some("www.example.com".into()),
                codes: vec![(200, 399)],
            }
        );
    }

    #[test]
    fn status_lines_are_parsed_strictly() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r"), Some(200));
        assert_eq!(status_code(b"HTTP/1.0 503 Service Unavailable"), Some(503));
        assert_eq!(status_code(b"HTTP/1.1 204"), Some(204));
        assert_eq!(status_code(b"HTTP/1.1 204\r"), Some(204));
        assert_eq!(status_code(b"HTTP/1.1 2000 OK"), None);
        assert_eq!(status_code(b"HTTP/1.1 20 OK"), None);
        assert_eq!(status_code(b"SSH-2.0-OpenSSH_9.6"), None);
        assert_eq!(status_code(b"HTTP/1.1 abc OK"), None);
        // HTTP-version is "HTTP/" DIGIT "." DIGIT (RFC 9112 §2.3).
        assert_eq!(status_code(b"HTTP/1.0 200 OK"), Some(200));
        assert_eq!(status_code(b"HTTP/ 200 OK"), None);
        assert_eq!(status_code(b"HTTP/x.y 200 OK"), None);
        assert_eq!(status_code(b"HTTP/11 200 OK"), None);
        assert_eq!(status_code(b"HTTP/1.1.1 200 OK"), None);
        let codes = [(200, 299), (301, 302)];
        assert_eq!(
            judge_status(b"HTTP/1.1 302 Found\r", &codes),
            (true, "ok".into())
        );
        assert_eq!(
            judge_status(b"HTTP/1.1 304 Not Modified\r", &codes),
            (false, "status 304".into())
        );
        assert_eq!(
            judge_status(b"hello", &codes),
            (false, "bad response".into())
        );
    }

    #[test]
    fn interim_1xx_responses_are_skipped_and_the_final_status_is_judged() {
        let codes = [(200, 399)];
        let ok = Some((true, "ok".to_string()));
        let table: [(&str, &[u8], Option<Outcome>); 9] = [
            ("final at once", b"HTTP/1.1 200 OK\r\n", ok.clone()),
            (
                "103 Early Hints, then 200",
                b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\n",
                ok.clone(),
            ),
            (
                "100 Continue with no fields, then 503",
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Unavailable\r\n",
                Some((false, "status 503".into())),
            ),
            (
                "two interim responses, bare LF line ends",
                b"HTTP/1.1 100 Continue\n\nHTTP/1.1 103 Early Hints\nLink: <a>\n\nHTTP/1.1 204\n",
                ok.clone(),
            ),
            (
                "101 is final",
                b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
                Some((false, "status 101".into())),
            ),
            (
                "garbage after an interim response",
                b"HTTP/1.1 103 Early Hints\r\n\r\nhello\n",
                Some((false, "bad response".into())),
            ),
            ("status line incomplete", b"HTTP/1.1 20", None),
            (
                "interim header block incomplete",
                b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n",
                None,
            ),
            (
                "final status line incomplete",
                b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 200 O",
                None,
            ),
        ];
        for (what, response, want) in table {
            assert_eq!(judge_response(response, &codes), want, "{what}");
        }
    }

    #[test]
    fn the_http_request_names_the_configured_host_or_the_address() {
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(
            http_request("/health?x=1", Some("www.example.com"), v4),
            b"GET /health?x=1 HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: l4lb-health\r\nConnection: close\r\n\r\n"
        );
        let req =
            String::from_utf8(http_request("/", None, IpAddr::V6(Ipv6Addr::LOCALHOST))).unwrap();
        assert!(req.contains("\r\nHost: [::1]\r\n"), "{req}");
        let req = String::from_utf8(http_request("/", None, v4)).unwrap();
        assert!(req.contains("\r\nHost: 10.0.0.1\r\n"), "{req}");
    }

    #[test]
    fn target_keys_display_address_port_and_protocol() {
        assert_eq!(key(1, 80).to_string(), "10.0.0.1:80/tcp");
        let k = TargetKey {
            addr: IpAddr::V6(Ipv6Addr::LOCALHOST),
            port: 53,
            proto: 17,
            check: 0,
        };
        assert_eq!(k.to_string(), "[::1]:53/udp");
        let second = TargetKey { check: 1, ..k };
        assert_eq!(second.to_string(), "[::1]:53/udp (check 2)");
    }
}
