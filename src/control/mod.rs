//! The control plane: turns a config into a running data plane and keeps it
//! fed. It may allocate, lock, log and sleep; the data plane may not.
//!
//! `run` loads and validates the config, resolves interfaces and next-hop
//! MACs, builds the first [`Snapshot`], attaches the XDP steering program,
//! binds one AF_XDP socket pair per worker and starts the pinned workers.
//! Then, on this thread, until SIGINT/SIGTERM (or, with an error, until a
//! worker ends on its own or an interface is deleted):
//! * serves the control socket (`stats`, `reload`);
//! * reloads the config on SIGHUP or `l4lb reload`: a config that fails
//!   validation changes nothing; a valid one is applied by publishing a new
//!   snapshot (workers keep running; health state and flows are kept);
//! * polls the health checker and publishes a snapshot on every state change;
//! * refreshes next-hop MACs from the kernel's neighbour table;
//! * sweeps the flow table in slices so that flows which ended without a
//!   FIN/RST stop counting as active connections.

pub mod ctl;
pub mod health;
pub mod ids;
pub mod netdev;
pub mod snapshot;
pub mod stats;
pub mod xdp;

use crate::config::{AttachMode, BindMode, Config, HealthCheck, Protocol, WhenFull};
use crate::dataplane::counters::{Shared, WorkerStats};
use crate::dataplane::pipeline::Tables;
use crate::dataplane::worker::Worker;
use crate::dataplane::xsk::{self, Bind, XskPair};
use crate::table::FlowTable;
use crate::util::Mac;
use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use health::{CheckSpec, Endpoint, HealthMonitor, TargetKey, WantedTarget};
use ids::Ids;
use snapshot::{proto_number, Inputs, Links, Snapshot};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use xdp::{Attach, Steering};

/// Seconds on a coarse monotonic clock: the data plane's notion of time.
pub fn coarse_now() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a valid timespec; vDSO, no syscall.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u32
}

/// Next-hop MACs: static entries from the config first, then the kernel's
/// neighbour table.
#[derive(Default)]
struct Neighbours {
    statics: HashMap<IpAddr, Mac>,
    kernel: HashMap<(u32, IpAddr), Mac>,
}

impl Neighbours {
    fn set_statics(&mut self, config: &Config) {
        self.statics = config
            .instance
            .neighbours
            .iter()
            .map(|n| (n.address, n.mac))
            .collect();
    }
    fn refresh(&mut self) {
        match netdev::neighbours() {
            Ok(list) => {
                self.kernel = list
                    .into_iter()
                    .map(|n| ((n.ifindex, n.addr), n.mac))
                    .collect()
            }
            Err(e) => tracing::warn!("reading the neighbour table: {e:#}"),
        }
    }
    fn get(&self, ifindex: u32, ip: &IpAddr) -> Option<Mac> {
        self.statics
            .get(ip)
            .or_else(|| self.kernel.get(&(ifindex, *ip)))
            .copied()
    }
}

/// Instance keys a reload cannot change: they shape sockets, threads and
/// tables that exist for the life of the process.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let (a, b) = (&old.instance, &new.instance);
    let keys = [
        ("mode", a.mode != b.mode),
        ("client_interface", a.client_interface != b.client_interface),
        (
            "backend_interface",
            a.backend_interface != b.backend_interface,
        ),
        ("attach", a.attach != b.attach),
        ("bind", a.bind != b.bind),
        ("workers", a.workers != b.workers),
        (
            "flow_table_capacity",
            a.flow_table_capacity != b.flow_table_capacity,
        ),
        (
            "flow_idle_timeout",
            a.flow_idle_timeout != b.flow_idle_timeout,
        ),
        (
            "tcp_closed_timeout",
            a.tcp_closed_timeout != b.tcp_closed_timeout,
        ),
        ("tcp_syn_timeout", a.tcp_syn_timeout != b.tcp_syn_timeout),
        (
            "persistence_capacity",
            a.persistence_capacity != b.persistence_capacity,
        ),
        (
            "persistence_when_full",
            a.persistence_when_full != b.persistence_when_full,
        ),
        ("control_socket", a.control_socket != b.control_socket),
    ];
    keys.iter()
        .filter(|(_, changed)| *changed)
        .map(|(k, _)| *k)
        .collect()
}

/// The health check targets of a configuration, and each server's distinct
/// checks (see [`Plane::targets`]).
struct Targets {
    /// In configuration order, each server's distinct checks numbered from
    /// 0 ([`TargetKey::check`]), each with the services that use it.
    list: Vec<WantedTarget>,
    /// Endpoint → indices into `list`.
    by_server: HashMap<Endpoint, Vec<usize>>,
}

impl Targets {
    fn of(config: &Config) -> Targets {
        let mut t = Targets {
            list: Vec::new(),
            by_server: HashMap::new(),
        };
        for svc in &config.services {
            let proto = proto_number(svc.protocol);
            for s in &svc.servers {
                let spec = CheckSpec::from_config(&svc.health_check, s.port);
                let known = t.by_server.entry((s.address, s.port, proto)).or_default();
                if let Some(&i) = known.iter().find(|&&i| t.list[i].spec == spec) {
                    let services = &mut t.list[i].services;
                    if !services.contains(&svc.name) {
                        services.push(svc.name.clone());
                    }
                    continue;
                }
                let key = TargetKey {
                    addr: s.address,
                    port: s.port,
                    proto,
                    // One per service using the server with a check of its
                    // own; past 255 (no real configuration) they share the
                    // last key.
                    check: u8::try_from(known.len()).unwrap_or(u8::MAX),
                };
                known.push(t.list.len());
                t.list.push(WantedTarget {
                    key,
                    spec,
                    services: vec![svc.name.clone()],
                });
            }
        }
        t
    }

    /// The target of server `addr`:`port` of a `proto` service checked by
    /// `hc`; check 0 if it is not there.
    fn key(&self, addr: IpAddr, port: u16, proto: Protocol, hc: &HealthCheck) -> TargetKey {
        let proto = proto_number(proto);
        let spec = CheckSpec::from_config(hc, port);
        self.by_server
            .get(&(addr, port, proto))
            .and_then(|known| known.iter().find(|&&i| self.list[i].spec == spec))
            .map_or(
                TargetKey {
                    addr,
                    port,
                    proto,
                    check: 0,
                },
                |&i| self.list[i].key,
            )
    }
}

/// Whether a service's server may take new clients: what the service's own
/// check of it says.
fn up_by_own_check<'a>(
    config: &Config,
    health: &'a HealthMonitor,
) -> impl Fn(&IpAddr, u16, Protocol, &HealthCheck) -> bool + 'a {
    let targets = Targets::of(config);
    move |addr, port, proto, hc| health.is_up(&targets.key(*addr, port, proto, hc))
}

/// `server ADDR:PORT is up|down (REASON)`, as the README promises, with
/// `(check N)` after the port for a server's second and later distinct
/// checks (the numbering of the health log lines).
fn transition_line(t: &health::Transition) -> String {
    let state = if t.up { "up" } else { "down" };
    let server = std::net::SocketAddr::new(t.key.addr, t.key.port);
    let check = match t.key.check {
        0 => String::new(),
        n => format!(" (check {})", u16::from(n) + 1),
    };
    format!("server {server}{check} is {state} ({})", t.reason)
}

/// The control plane's state.
struct Plane {
    config: Config,
    config_path: Option<PathBuf>,
    config_name: String,
    ids: Ids,
    client_idx: u32,
    backend_idx: u32,
    base_links: Links,
    local: Vec<IpAddr>,
    nb: Neighbours,
    health: HealthMonitor,
    /// A health change is not in the published snapshot yet: its publish
    /// failed, and is retried (see [`PUBLISH_RETRY_PERIOD`]).
    health_unpublished: bool,
    /// When a failed health publish was last logged (see
    /// [`PUBLISH_ERROR_LOG_PERIOD`]); `None` after a success.
    publish_error_logged: Option<Instant>,
    /// After a failed publish of a health change: not before then again.
    publish_retry_at: Option<Instant>,
    generation: u64,
}

/// While publishing a health change keeps failing (it is retried every
/// [`PUBLISH_RETRY_PERIOD`]), one error line per this period.
const PUBLISH_ERROR_LOG_PERIOD: Duration = Duration::from_secs(10);

/// Shortest time between two attempts to publish a health change after
/// one failed: each builds a whole snapshot (every service's Maglev
/// tables), too much for every 10 ms turn of the control loop.
const PUBLISH_RETRY_PERIOD: Duration = Duration::from_secs(1);

impl Plane {
    /// Health check targets: one per server endpoint and distinct check.
    /// A server used by two services is checked once if their checks are
    /// the same, and once by each if they differ: each service then takes
    /// the server out on its own check's say.
    fn targets(&self) -> Vec<WantedTarget> {
        Targets::of(&self.config).list
    }

    /// The snapshot of the current config and health; `previous`, the one
    /// it replaces, lends it the Maglev tables that did not change.
    fn build(&mut self, generation: u64, previous: Option<&Snapshot>) -> Result<Snapshot> {
        let mut links = self.base_links;
        links.gateway_mac = self
            .nb
            .get(self.client_idx, &self.config.instance.client_gateway);
        let (b, nb) = (self.backend_idx, &self.nb);
        let is_up = up_by_own_check(&self.config, &self.health);
        Snapshot::build(
            &mut self.ids,
            &Inputs {
                config: &self.config,
                generation,
                links,
                local: &self.local,
                mac_of: &|ip| nb.get(b, ip),
                is_up: &is_up,
                previous,
            },
        )
        .map_err(anyhow::Error::msg)
    }

    /// Builds the next snapshot and publishes it: XDP maps first (new keys
    /// before stale ones go), then the snapshot.
    fn publish(&mut self, shared: &ArcSwap<Snapshot>, steering: &[&Steering]) -> Result<()> {
        let snap = self.build(self.generation + 1, Some(&shared.load()))?;
        let (v, l, b, lo) = snap.steering_sets();
        for s in steering {
            s.sync(&v, &l, &b, &lo)?;
        }
        self.generation += 1;
        shared.store(Arc::new(snap));
        // Built from the health state as it is now: nothing left to publish.
        self.health_unpublished = false;
        Ok(())
    }

    /// Polls the health checker and publishes its changes in a new
    /// snapshot. A change whose publish fails is not lost: the publish is
    /// retried, [`PUBLISH_RETRY_PERIOD`] apart, until one succeeds.
    fn check_health(&mut self, now: Instant, shared: &ArcSwap<Snapshot>, steering: &[&Steering]) {
        // The health checker logs each transition with its counts; this
        // line is the control plane's: the change it is about to publish.
        for t in self.health.poll(now) {
            tracing::warn!("{}", transition_line(&t));
            self.health_unpublished = true;
        }
        if !self.health_unpublished || self.publish_retry_at.is_some_and(|at| now < at) {
            return;
        }
        match self.publish(shared, steering) {
            Ok(()) => {
                self.publish_retry_at = None;
                if self.publish_error_logged.take().is_some() {
                    tracing::info!(
                        "published the health change at snapshot {} after failed attempts",
                        self.generation
                    );
                }
            }
            Err(e) => {
                self.publish_retry_at = Some(now + PUBLISH_RETRY_PERIOD);
                let quiet = self
                    .publish_error_logged
                    .is_some_and(|at| now.saturating_duration_since(at) < PUBLISH_ERROR_LOG_PERIOD);
                if !quiet {
                    self.publish_error_logged = Some(now);
                    tracing::error!("publishing the health change failed: {e:#}; retrying");
                }
            }
        }
    }

    /// Asks the kernel to resolve next hops whose MAC is missing; returns
    /// them.
    fn solicit_missing(&self) -> Vec<IpAddr> {
        let mut wanted = vec![(self.client_idx, self.config.instance.client_gateway)];
        for s in self.config.services.iter().flat_map(|s| &s.servers) {
            wanted.push((self.backend_idx, s.address));
        }
        wanted.sort();
        wanted.dedup();
        let mut missing = Vec::new();
        for (idx, ip) in wanted {
            if self.nb.get(idx, &ip).is_none() {
                missing.push(ip);
                if let Err(e) = netdev::solicit(idx, &ip) {
                    tracing::debug!("{e:#}");
                }
            }
        }
        missing
    }

    /// Re-reads the config file and applies it. On any error the running
    /// configuration is left exactly as it was.
    fn reload(
        &mut self,
        shared: &ArcSwap<Snapshot>,
        steering: &[&Steering],
    ) -> Result<String, String> {
        let Some(path) = self.config_path.clone() else {
            return Err(
                "l4lb was started with the built-in config: there is no file to reload".into(),
            );
        };
        // Read once: a refusal below locates keys in the text it judged.
        let text = Config::read_text(&path).map_err(|e| e.to_string())?;
        let (new, warnings) = Config::from_str_warned(&text, &path.display().to_string())
            .map_err(|e| e.to_string())?;
        for w in &warnings {
            tracing::warn!("{w}");
        }
        let fixed = restart_only_changes(&self.config, &new);
        if !fixed.is_empty() {
            // Each at the line that sets it, as other config errors are.
            let lines: Vec<String> = fixed
                .iter()
                .map(|key| {
                    let at = match Config::instance_key_position(&text, key) {
                        Some((line, col)) => format!("{}:{line}:{col}", path.display()),
                        None => path.display().to_string(),
                    };
                    format!(
                        "{at}: instance.{key} cannot change while running (restart l4lb); \
                         the running configuration is unchanged"
                    )
                })
                .collect();
            return Err(lines.join("\n"));
        }
        let old = std::mem::replace(&mut self.config, new);
        let old_ids = self.ids.clone();
        self.nb.set_statics(&self.config);
        // New servers: give the kernel a moment (bounded) to resolve their
        // MACs, so that their first packets are not no_neighbour drops.
        let deadline = Instant::now() + Duration::from_millis(1000);
        let mut missing = self.solicit_missing();
        while !missing.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            self.nb.refresh();
            missing = self.solicit_missing();
        }
        // The health targets follow the new configuration before the
        // snapshot is built from them: servers that remain keep their
        // state (a check renumbered because another was removed brings its
        // own), new ones start up. If publishing fails they go back.
        let old_targets = self.health.saved_targets();
        self.health.set_targets(self.targets());
        if let Err(e) = self.publish(shared, steering) {
            // Put everything back as it was, XDP maps included (publish may
            // have synced some of them before failing).
            self.config = old;
            self.ids = old_ids;
            self.health.restore_targets(old_targets);
            self.nb.set_statics(&self.config);
            let cur = shared.load();
            let (v, l, b, lo) = cur.steering_sets();
            for s in steering {
                if let Err(e) = s.sync(&v, &l, &b, &lo) {
                    tracing::error!("restoring the XDP maps of {}: {e:#}", s.ifname());
                }
            }
            return Err(format!(
                "{}: {e:#}; the running configuration is unchanged",
                path.display()
            ));
        }
        if !missing.is_empty() {
            // Accepted all the same (a server may come up later), but a
            // mistyped client_gateway would silently drop every reply.
            let list: Vec<String> = missing.iter().map(IpAddr::to_string).collect();
            tracing::warn!(
                "next hop(s) unresolved 1 s after the reload, their packets dropped as \
                 no_neighbour until they resolve: {}",
                list.join(", ")
            );
        }
        Ok(format!(
            "reloaded {}: snapshot {}: {}",
            path.display(),
            self.generation,
            self.config.summary()
        ))
    }
}

/// Reloads and logs; returns the control socket's reply.
fn reload(
    plane: &mut Plane,
    shared: &ArcSwap<Snapshot>,
    steering: &[&Steering],
    via: &str,
) -> String {
    match plane.reload(shared, steering) {
        Ok(msg) => {
            tracing::info!("{msg} (via {via})");
            format!("ok: {msg}\n")
        }
        Err(e) => {
            // A line per problem: each keeps its level and cause in a log
            // that stores lines (the journal), instead of bare follow-ons.
            for problem in e.lines() {
                tracing::error!("reload rejected (via {via}): {problem}");
            }
            format!("error: {e}\n")
        }
    }
}

fn raise_memlock() {
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain setrlimit; failure only matters on old kernels.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) };
}

/// Refuses interface `name` (config key `key`) if its MTU lets through
/// frames longer than the AF_XDP sockets receive: the kernel would drop
/// them, and the clients would see a black hole for their large packets.
fn check_mtu(key: &str, name: &str, config_name: &str) -> Result<()> {
    let mtu = netdev::mtu(name).with_context(|| format!("{key} = {name:?} in {config_name}"))?;
    if mtu > xsk::MAX_MTU {
        anyhow::bail!(
            "{key} = {name:?} in {config_name}: its MTU is {mtu}, above {max}, the largest \
             l4lb forwards whole (its AF_XDP frames are {size} bytes, of which the kernel keeps \
             {headroom}, so frames of at most {frame} bytes with the Ethernet header arrive; the \
             kernel drops longer ones unseen); lower it with `ip link set dev {name} mtu {max}`",
            max = xsk::MAX_MTU,
            size = xsk::FRAME_SIZE,
            headroom = xsk::KERNEL_HEADROOM,
            frame = xsk::MAX_FRAME_LEN,
        );
    }
    Ok(())
}

/// Refuses more workers than interface `name` (config key `key`) has RX or
/// TX queues: worker `i` binds queue `i`. The kernel refuses a socket on a
/// queue beyond both counts only with EINVAL, and one on a queue that
/// receives but cannot transmit is accepted and sends nothing.
/// `queues` is what `netdev::queues` says (None: the driver does not
/// tell, and the bind is left to judge).
fn check_queues(
    key: &str,
    name: &str,
    workers: usize,
    queues: Option<(u32, u32)>,
    config_name: &str,
) -> Result<()> {
    let Some((rx, tx)) = queues else {
        return Ok(());
    };
    if workers > rx.min(tx) as usize {
        anyhow::bail!(
            "instance.workers in {config_name}: {workers} worker(s) bind queues 0 to {last} of \
             {key} = {name:?}, which has {rx} RX and {tx} TX queue(s); use at most {most} \
             worker(s), or give {name} {workers} RX and TX queues (`ethtool -L {name}`)",
            last = workers - 1,
            most = rx.min(tx),
        );
    }
    Ok(())
}

/// The flow table is swept whole at least once per this many seconds.
const SWEEP_PERIOD_S: usize = 64;

/// Slots swept per slice of the sweep (10 slices a second) for a table of
/// `capacity` slots: rounded up, so that a table whose size is not a
/// multiple of 640 is still covered within [`SWEEP_PERIOD_S`].
fn sweep_slice(capacity: usize) -> usize {
    capacity.div_ceil(SWEEP_PERIOD_S * 10).max(1)
}

/// A running worker thread, as the control loop watches it.
struct WorkerThread {
    id: usize,
    core: usize,
    handle: std::thread::JoinHandle<()>,
}

/// Joins a worker; the error says so if it panicked, with the panic's
/// message.
fn join_worker(w: WorkerThread) -> Result<()> {
    w.handle.join().map_err(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_string());
        anyhow::anyhow!("worker {} (core {}) panicked: {msg}", w.id, w.core)
    })
}

/// A worker ends only when told to stop. One that ended on its own (a
/// panic) has closed its queue's AF_XDP sockets, and that queue's traffic
/// goes to the kernel instead of the servers: the instance is broken and
/// must say so. Returns the error for the first worker found ended
/// (joined and removed from `workers`).
fn ended_worker(workers: &mut Vec<WorkerThread>) -> Option<anyhow::Error> {
    let at = workers.iter().position(|w| w.handle.is_finished())?;
    let w = workers.swap_remove(at);
    let (id, core) = (w.id, w.core);
    let e = join_worker(w)
        .err()
        .unwrap_or_else(|| anyhow::anyhow!("worker {id} (core {core}) returned"));
    Some(anyhow::anyhow!(
        "{e}; its queue's traffic no longer reaches l4lb, so l4lb stops (restart it)"
    ))
}

/// An interface l4lb was started on that is gone (deleted, or deleted and
/// created again under another index): its AF_XDP sockets and XDP program
/// went with it, and l4lb would forward nothing while looking alive.
/// `now` is what `netdev::ifindex` says of the name now.
fn interface_gone(
    key: &str,
    name: &str,
    started_as: u32,
    now: Result<u32>,
) -> Option<anyhow::Error> {
    let what = match now {
        Ok(idx) if idx == started_as => return None,
        Ok(idx) => format!("was replaced (index {started_as} at start, now {idx})"),
        Err(_) => format!("disappeared (index {started_as} at start)"),
    };
    Some(anyhow::anyhow!(
        "{key} = {name:?} {what} while l4lb was running: its AF_XDP sockets and XDP program \
         are gone, so l4lb stops (restart it once the interface is back)"
    ))
}

/// Runs an instance until SIGINT or SIGTERM. `path` is the config file (None
/// for the built-in config), re-read on reload.
pub fn run(config: Config, path: Option<PathBuf>, config_name: &str) -> Result<()> {
    let started = Instant::now();
    raise_memlock();
    let inst = config.instance.clone();
    if inst.workers.len() > xdp::MAX_QUEUES {
        anyhow::bail!(
            "instance.workers in {config_name}: {} workers, at most {} (the XDP program's socket map size)",
            inst.workers.len(),
            xdp::MAX_QUEUES
        );
    }
    // The control socket is claimed before anything else: a second
    // instance started on the same config stops here, before it could
    // replace the running instance's XDP program (and detach it on its way
    // out, leaving the running one deaf).
    let mut ctl = ctl::ControlSocket::bind(&inst.control_socket)?;
    // Signals are caught from the start: SIGHUP's default action ends the
    // process, so a reload asked for while l4lb starts would otherwise kill
    // it, and SIGINT/SIGTERM after the XDP program is attached would leave
    // the program behind. A reload asked for during start-up runs once the
    // control loop does.
    let stop = Arc::new(AtomicBool::new(false));
    let hup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))?;
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&hup))?;
    let client_idx = netdev::ifindex(&inst.client_interface).with_context(|| {
        format!(
            "instance.client_interface = {:?} in {config_name}",
            inst.client_interface
        )
    })?;
    let backend_idx = netdev::ifindex(&inst.backend_interface).with_context(|| {
        format!(
            "instance.backend_interface = {:?} in {config_name}",
            inst.backend_interface
        )
    })?;
    check_mtu(
        "instance.client_interface",
        &inst.client_interface,
        config_name,
    )?;
    check_mtu(
        "instance.backend_interface",
        &inst.backend_interface,
        config_name,
    )?;
    for (key, name) in [
        ("instance.client_interface", &inst.client_interface),
        ("instance.backend_interface", &inst.backend_interface),
    ] {
        let queues = netdev::queues(name).with_context(|| format!("{key} = {name:?}"))?;
        check_queues(key, name, inst.workers.len(), queues, config_name)?;
    }
    let base_links = Links {
        client_if_mac: netdev::mac(&inst.client_interface)?,
        backend_if_mac: netdev::mac(&inst.backend_interface)?,
        gateway_mac: None,
    };
    let local = netdev::host_addresses()?;
    let mut plane = Plane {
        config,
        config_path: path,
        config_name: config_name.to_string(),
        ids: Ids::default(),
        client_idx,
        backend_idx,
        base_links,
        local,
        nb: Neighbours::default(),
        health: HealthMonitor::new(health::probe_fd_budget()),
        health_unpublished: false,
        publish_error_logged: None,
        publish_retry_at: None,
        generation: 0,
    };
    plane.nb.set_statics(&plane.config);
    plane.health.set_targets(plane.targets());

    // Resolve next hops before traffic flows (bounded wait: what is still
    // missing is counted as no_neighbour drops until it resolves).
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        plane.nb.refresh();
        let missing = plane.solicit_missing().len();
        if missing == 0 || stop.load(Ordering::Relaxed) {
            break;
        }
        if Instant::now() > deadline {
            tracing::warn!(
                "{missing} next hop(s) unresolved after 3 s; retrying in the background"
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    if stop.load(Ordering::Relaxed) {
        tracing::info!("stopped during start-up, before attaching to the interfaces");
        return Ok(());
    }

    plane.generation = 1;
    let shared = Arc::new(ArcSwap::from_pointee(plane.build(1, None)?));
    let tables = Arc::new(Tables {
        flows: FlowTable::new(inst.flow_table_capacity),
        persist: FlowTable::new(inst.persistence_capacity),
        flow_timeout: inst.flow_idle_timeout,
        closed_timeout: inst.tcp_closed_timeout,
        syn_timeout: inst.tcp_syn_timeout,
        persist_evict: inst.persistence_when_full == WhenFull::EvictOldest,
    });

    let mode = match inst.attach {
        AttachMode::Native => Attach::Native,
        AttachMode::Skb => Attach::Skb,
    };
    let steer_c = Steering::attach(&inst.client_interface, client_idx, mode)?;
    let steer_b = Steering::attach(&inst.backend_interface, backend_idx, mode)?;
    {
        let snap = shared.load();
        let (v, l, b, lo) = snap.steering_sets();
        steer_c.sync(&v, &l, &b, &lo)?;
        steer_b.sync(&v, &l, &b, &lo)?;
    }

    let bind = match inst.bind {
        BindMode::Auto => Bind::Auto,
        BindMode::Copy => Bind::Copy,
        BindMode::ZeroCopy => Bind::ZeroCopy,
    };

    let worker_stats: Vec<Arc<WorkerStats>> = inst
        .workers
        .iter()
        .map(|_| Arc::new(WorkerStats::new()))
        .collect();
    let counters = Arc::new(Shared::new(worker_stats.clone()));
    let mut handles: Vec<WorkerThread> = Vec::new();
    // Each worker's socket fds, for their kernel counters in `stats`: valid
    // until the workers are joined, after the control loop.
    let mut sockets = Vec::new();
    for (i, &core) in inst.workers.iter().enumerate() {
        let queue = i as u32;
        let pair = XskPair::new(&inst.client_interface, &inst.backend_interface, queue, bind)?;
        steer_c.add_socket(queue, pair.ports[0].fd())?;
        steer_b.add_socket(queue, pair.ports[1].fd())?;
        sockets.push([
            (inst.client_interface.as_str(), pair.ports[0].fd()),
            (inst.backend_interface.as_str(), pair.ports[1].fd()),
        ]);
        let w = Worker {
            id: i,
            xsk: pair,
            snapshot: Arc::clone(&shared),
            tables: Arc::clone(&tables),
            stats: Arc::clone(&worker_stats[i]),
            shared: Arc::clone(&counters),
            stop: Arc::clone(&stop),
            clock: coarse_now,
        };
        let h = std::thread::Builder::new()
            .name(format!("l4lb-w{i}"))
            .spawn(move || {
                if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                    tracing::warn!(worker = i, core, "could not pin the worker to its core");
                }
                w.run();
            })?;
        handles.push(WorkerThread {
            id: i,
            core,
            handle: h,
        });
    }
    tracing::info!(
        "l4lb running: {} worker(s), {} listener(s), control socket {}",
        inst.workers.len(),
        plane.config.listeners.len(),
        inst.control_socket.display()
    );

    let steering = [&steer_c, &steer_b];
    let mut last_refresh = Instant::now();
    // Interfaces whose MTU was raised above the limit while running (the
    // start-up check refuses it): warned about once until it is lowered.
    let mut mtu_warned = [false; 2];
    let mut sweep_at = 0usize;
    let slice = sweep_slice(tables.flows.capacity());
    let mut last_sweep = Instant::now();
    // Why the instance stopped on its own, if it did.
    let mut fatal: Option<anyhow::Error> = None;
    while !stop.load(Ordering::Relaxed) {
        if let Some(e) = ended_worker(&mut handles) {
            fatal = Some(e);
            break;
        }
        for req in ctl.pending() {
            let reply = match req.line.as_str() {
                "stats" => {
                    let snap = shared.load();
                    let workers: Vec<(usize, Arc<WorkerStats>)> = inst
                        .workers
                        .iter()
                        .copied()
                        .zip(worker_stats.iter().cloned())
                        .collect();
                    let st = stats::collect(&stats::Sources {
                        instance: &plane.config.instance.name,
                        snapshot: &snap,
                        workers: &workers,
                        sockets: &sockets,
                        shared: &counters,
                        health: &plane.health.states(),
                        steering: &steering,
                        tables: &tables,
                        now: coarse_now(),
                        uptime_s: started.elapsed().as_secs(),
                    });
                    serde_json::to_string(&st).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
                }
                "reload" => reload(&mut plane, &shared, &steering, "control socket"),
                other => format!("error: unknown request {other:?}\n"),
            };
            ctl.reply(req, &reply);
        }
        if hup.swap(false, Ordering::Relaxed) {
            reload(&mut plane, &shared, &steering, "SIGHUP");
        }

        plane.check_health(Instant::now(), &shared, &steering);

        if last_refresh.elapsed() >= Duration::from_secs(1) {
            last_refresh = Instant::now();
            fatal = interface_gone(
                "instance.client_interface",
                &inst.client_interface,
                client_idx,
                netdev::ifindex(&inst.client_interface),
            )
            .or_else(|| {
                interface_gone(
                    "instance.backend_interface",
                    &inst.backend_interface,
                    backend_idx,
                    netdev::ifindex(&inst.backend_interface),
                )
            });
            if fatal.is_some() {
                break;
            }
            let ifaces = [&inst.client_interface, &inst.backend_interface];
            for (name, warned) in ifaces.into_iter().zip(mtu_warned.iter_mut()) {
                let over = netdev::mtu(name).is_ok_and(|m| m > xsk::MAX_MTU);
                if over && !*warned {
                    tracing::warn!(
                        "{name}: MTU raised above {} while running: the kernel drops frames \
                         longer than {} bytes before l4lb sees them (socket rx_dropped in \
                         `l4lb stats`)",
                        xsk::MAX_MTU,
                        xsk::MAX_FRAME_LEN
                    );
                }
                *warned = over;
            }
            plane.nb.refresh();
            plane.solicit_missing();
            let cur = shared.load();
            let gw = plane
                .nb
                .get(client_idx, &plane.config.instance.client_gateway);
            let macs_changed = gw != cur.links.gateway_mac
                || cur
                    .backends
                    .iter()
                    .any(|b| plane.nb.get(backend_idx, &b.address) != b.mac);
            // This host's own addresses decide which replies are the kernel's.
            // (A failed read keeps the last set rather than emptying it.)
            let local = netdev::host_addresses().unwrap_or_else(|_| plane.local.clone());
            let local_changed = local != plane.local;
            plane.local = local;
            if macs_changed || local_changed {
                tracing::info!(
                    "next-hop MACs or local addresses changed: publishing a new snapshot"
                );
                if let Err(e) = plane.publish(&shared, &steering) {
                    tracing::error!("publishing the neighbour change failed: {e:#}");
                }
            }
        }

        if last_sweep.elapsed() >= Duration::from_millis(100) {
            last_sweep = Instant::now();
            let now = coarse_now();
            tables
                .flows
                .sweep_dead_forward(sweep_at, slice, now, &mut |v| {
                    counters.swept[v.backend as usize].fetch_add(1, Ordering::Relaxed);
                });
            sweep_at = (sweep_at + slice) % tables.flows.capacity();
        }
        std::thread::sleep(Duration::from_millis(10));
    }

    stop.store(true, Ordering::Relaxed);
    match &fatal {
        Some(e) => tracing::error!("stopping: {e:#}"),
        None => tracing::info!("stopping"),
    }
    for w in handles {
        if let Err(e) = join_worker(w) {
            // A worker that panicked while stopping: reported, not hidden.
            fatal.get_or_insert(e);
        }
    }
    drop(steer_c);
    drop(steer_b);
    drop(ctl);
    let _ = plane.config_name;
    fatal.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker_thread(id: usize, f: impl FnOnce() + Send + 'static) -> WorkerThread {
        WorkerThread {
            id,
            core: id + 2,
            handle: std::thread::spawn(f),
        }
    }

    /// Every table size the config allows is swept whole within the
    /// period the README promises (1024 slots took 103 s when the slice
    /// was rounded down).
    #[test]
    fn the_sweep_covers_any_table_within_its_period() {
        for capacity in [
            1usize,
            8,
            639,
            640,
            1024,
            4096,
            65_536,
            1 << 20,
            1 << 24,
            1_000_000,
        ] {
            let slices = capacity.div_ceil(sweep_slice(capacity));
            assert!(
                slices <= SWEEP_PERIOD_S * 10,
                "{capacity} slots: {slices} slices of 100 ms"
            );
        }
    }

    #[test]
    fn a_worker_that_panicked_is_reported_with_its_core_and_message() {
        let release = Arc::new(AtomicBool::new(false));
        let r = Arc::clone(&release);
        let mut workers = vec![
            worker_thread(0, move || {
                while !r.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }),
            worker_thread(1, || panic!("ring index out of range")),
        ];
        let deadline = Instant::now() + Duration::from_secs(5);
        while !workers[1].handle.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let e = ended_worker(&mut workers).expect("the panicked worker is found");
        assert_eq!(
            e.to_string(),
            "worker 1 (core 3) panicked: ring index out of range; its queue's traffic no \
             longer reaches l4lb, so l4lb stops (restart it)"
        );
        assert_eq!(workers.len(), 1);
        assert!(ended_worker(&mut workers).is_none(), "worker 0 still runs");
        release.store(true, Ordering::Relaxed);
        assert!(join_worker(workers.pop().expect("worker 0")).is_ok());
    }

    #[test]
    fn more_workers_than_an_interface_has_rx_or_tx_queues_is_refused() {
        let check = |q| check_queues("instance.client_interface", "eth1", 2, q, "l4lb.toml");
        assert!(check(Some((2, 2))).is_ok());
        assert!(check(Some((8, 4))).is_ok());
        assert!(
            check(None).is_ok(),
            "a driver that does not say is not refused"
        );
        // Receives on queue 1 but cannot transmit from it.
        let e = check(Some((2, 1))).expect_err("one TX queue");
        assert_eq!(
            e.to_string(),
            "instance.workers in l4lb.toml: 2 worker(s) bind queues 0 to 1 of \
             instance.client_interface = \"eth1\", which has 2 RX and 1 TX queue(s); use at \
             most 1 worker(s), or give eth1 2 RX and TX queues (`ethtool -L eth1`)"
        );
    }

    #[test]
    fn an_interface_deleted_or_recreated_while_running_is_an_error_naming_it() {
        assert!(interface_gone("instance.client_interface", "lb-c", 5, Ok(5)).is_none());
        let gone = interface_gone(
            "instance.client_interface",
            "lb-c",
            5,
            Err(anyhow::anyhow!("interface lb-c not found")),
        )
        .expect("gone");
        assert!(
            gone.to_string().starts_with(
                "instance.client_interface = \"lb-c\" disappeared (index 5 at start) while \
                 l4lb was running"
            ),
            "{gone}"
        );
        let replaced =
            interface_gone("instance.backend_interface", "lb-b", 5, Ok(9)).expect("replaced");
        assert!(
            replaced.to_string().starts_with(
                "instance.backend_interface = \"lb-b\" was replaced (index 5 at start, now 9)"
            ),
            "{replaced}"
        );
    }

    /// Services that check a shared server the same way share one target;
    /// a service that checks it differently gets a target of its own,
    /// numbered in file order. Protocols are kept apart.
    #[test]
    fn a_server_gets_one_target_per_distinct_check() {
        let service = |name: &str, proto: &str, check: &str| {
            format!(
                "[[backend_service]]\nname = \"{name}\"\nprotocol = \"{proto}\"\n\
                 [backend_service.health_check]\n{check}\n\
                 [[backend_service.server]]\naddress = \"198.18.2.11\"\nport = 8080\n"
            )
        };
        let text = [
            "[instance]\nname = \"t\"\nclient_interface = \"c0\"\nbackend_interface = \"b0\"\nclient_gateway = \"198.18.0.2\"\n".to_string(),
            service("a", "tcp", "type = \"http\"\npath = \"/a\""),
            service("b", "tcp", "type = \"http\"\npath = \"/a\""),
            service("c", "tcp", "type = \"http\"\npath = \"/c\""),
            service("d", "udp", "type = \"udp\""),
        ]
        .concat();
        let config = Config::from_str(&text, "t.toml").expect("valid");
        let targets = Targets::of(&config);
        let keys: Vec<String> = targets.list.iter().map(|w| w.key.to_string()).collect();
        assert_eq!(
            keys,
            [
                "198.18.2.11:8080/tcp",
                "198.18.2.11:8080/tcp (check 2)",
                "198.18.2.11:8080/udp"
            ]
        );
        // Each service finds its own.
        let svc = |name: &str| config.services.iter().find(|s| s.name == name).unwrap();
        let ip = crate::util::v4(198, 18, 2, 11);
        let check_of = |name: &str| {
            let s = svc(name);
            targets.key(ip, 8080, s.protocol, &s.health_check).check
        };
        assert_eq!(
            ["a", "b", "c", "d"].map(check_of),
            [0, 0, 1, 0],
            "a and b share, c has its own, d is UDP"
        );
        let users: Vec<&[String]> = targets.list.iter().map(|w| &w.services[..]).collect();
        assert_eq!(users, [&["a", "b"][..], &["c"], &["d"]]);
    }

    /// End to end, against real HTTP servers on 127.0.0.1 that answer 503
    /// on paths starting with /down and 200 on others: services a1 and b1
    /// share server 1, a2 and b2 server 2. Before the reload server 1 is
    /// down for a1 and up for b1; server 2 is up for a2 and down for b2.
    /// The reload drops a1 and a2 and changes the paths of b1 and b2, whose
    /// checks then take the numbers a1's and a2's had. Each b keeps what
    /// its own check said.
    #[test]
    fn a_reload_keeps_each_services_own_health_state_for_a_shared_server() {
        use std::io::{Read, Write};
        let http_server = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = l.local_addr().unwrap().port();
            std::thread::spawn(move || {
                for mut s in l.incoming().flatten() {
                    let mut buf = [0u8; 2048];
                    let n = s.read(&mut buf).unwrap_or(0);
                    let resp = if buf[..n].starts_with(b"GET /down") {
                        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
                    } else {
                        "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                    };
                    let _ = s.write_all(resp.as_bytes());
                }
            });
            port
        };
        let (port1, port2) = (http_server(), http_server());
        let head = "[instance]\nname = \"t\"\nclient_interface = \"c0\"\nbackend_interface = \"b0\"\nclient_gateway = \"198.18.0.2\"\n";
        // Service `name` on listener port `listen`, checking its one server
        // 127.0.0.1:`port` at `path`.
        let service = |name: &str, listen: u16, path: &str, port: u16| {
            format!(
                "[[listener]]\nname = \"{name}\"\nvip = \"198.18.100.1\"\nprotocol = \"tcp\"\n\
                 port = {listen}\nbackend_service = \"{name}\"\n\
                 [[backend_service]]\nname = \"{name}\"\nprotocol = \"tcp\"\n\
                 [backend_service.health_check]\ntype = \"http\"\npath = \"{path}\"\n\
                 interval = 1\ntimeout = 1\nunhealthy_threshold = 2\nhealthy_threshold = 2\n\
                 [[backend_service.server]]\naddress = \"127.0.0.1\"\nport = {port}\n"
            )
        };
        let old = [
            head.to_string(),
            service("a1", 1, "/down-a1", port1),
            service("a2", 2, "/a2", port2),
            service("b1", 3, "/b1", port1),
            service("b2", 4, "/down-b2", port2),
        ]
        .concat();
        let new = [
            head.to_string(),
            service("b1", 3, "/b1-v2", port1),
            service("b2", 4, "/down-b2-v2", port2),
        ]
        .concat();
        let old = Config::from_str(&old, "old.toml").expect("valid");
        let new = Config::from_str(&new, "new.toml").expect("valid");
        let eligible = |config: &Config, h: &HealthMonitor| -> Vec<(String, usize)> {
            let snap = snapshot::test_snapshot(config, &up_by_own_check(config, h), None);
            let mut e: Vec<(String, usize)> = snap
                .services
                .iter()
                .map(|s| (s.name.clone(), s.eligible.len()))
                .collect();
            e.sort();
            e
        };

        let mut h = HealthMonitor::new(64);
        h.set_targets(Targets::of(&old).list);
        // Offset < 1 s, then 2 probes 1 s apart: settled within 3 s.
        let end = Instant::now() + Duration::from_secs(6);
        let settled = |h: &HealthMonitor| {
            let s = h.states();
            s.len() == 4
                && s.iter()
                    .all(|(_, up, last)| *up == (last == "ok") && last != health::NOT_PROBED)
        };
        while Instant::now() < end && !settled(&h) {
            h.poll(Instant::now());
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(settled(&h), "{:?}", h.states());
        let to_vec = |v: &[(&str, usize)]| -> Vec<(String, usize)> {
            v.iter().map(|(n, c)| (n.to_string(), *c)).collect()
        };
        assert_eq!(
            eligible(&old, &h),
            to_vec(&[("a1", 0), ("a2", 1), ("b1", 1), ("b2", 0)])
        );

        h.set_targets(Targets::of(&new).list);
        assert_eq!(eligible(&new, &h), to_vec(&[("b1", 1), ("b2", 0)]));
    }

    /// A control plane as `run` makes it, minus the interfaces.
    fn plane_of(config: Config) -> Plane {
        Plane {
            config,
            config_path: None,
            config_name: "t.toml".into(),
            ids: Ids::default(),
            client_idx: 1,
            backend_idx: 2,
            base_links: Links::default(),
            local: Vec::new(),
            nb: Neighbours::default(),
            health: HealthMonitor::new(64),
            health_unpublished: false,
            publish_error_logged: None,
            publish_retry_at: None,
            generation: 0,
        }
    }

    /// A health change whose publish fails (here: no listener id left) is
    /// published by a later turn of the control loop, without another
    /// change to set it off.
    /// One TCP service whose one server, 127.0.0.1:`port`, is checked
    /// every second and goes down after 2 failures.
    fn one_server_config(port: u16) -> Config {
        let text = format!(
            "[instance]\nname = \"t\"\nclient_interface = \"c0\"\nbackend_interface = \"b0\"\n\
             client_gateway = \"198.18.0.2\"\n\
             [[listener]]\nname = \"web\"\nvip = \"198.18.100.1\"\nprotocol = \"tcp\"\nport = 80\n\
             backend_service = \"web\"\n\
             [[backend_service]]\nname = \"web\"\nprotocol = \"tcp\"\n\
             [backend_service.health_check]\ninterval = 1\ntimeout = 1\n\
             unhealthy_threshold = 2\nhealthy_threshold = 2\n\
             [[backend_service.server]]\naddress = \"127.0.0.1\"\nport = {port}\n"
        );
        Config::from_str(&text, "t.toml").expect("valid")
    }

    fn closed_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn a_health_change_whose_publish_failed_is_published_by_a_later_turn() {
        let mut plane = plane_of(one_server_config(closed_port()));
        plane.health.set_targets(plane.targets());
        plane.generation = 1;
        let shared = ArcSwap::from_pointee(plane.build(1, None).unwrap());
        assert_eq!(shared.load().services[0].eligible.len(), 1);

        // Every listener id taken by other names: builds fail.
        let mut full = Ids::default();
        for i in 0..ids::MAX_ID {
            full.listener(&format!("other{i}")).unwrap();
        }
        let ids = std::mem::replace(&mut plane.ids, full);
        // The closed port goes down at its second probe, within 2 s.
        let end = Instant::now() + Duration::from_secs(4);
        while Instant::now() < end && plane.health.states()[0].1 {
            plane.check_health(Instant::now(), &shared, &[]);
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!plane.health.states()[0].1, "went down");
        plane.check_health(Instant::now(), &shared, &[]);
        assert_eq!(shared.load().generation, 1, "nothing published");
        assert_eq!(shared.load().services[0].eligible.len(), 1);

        plane.ids = ids;
        plane.check_health(Instant::now(), &shared, &[]);
        assert_eq!(shared.load().generation, 1, "not retried within a second");
        plane.check_health(Instant::now() + PUBLISH_RETRY_PERIOD, &shared, &[]);
        assert_eq!(shared.load().generation, 2);
        assert_eq!(shared.load().services[0].eligible, []);
        // Published: the next turns publish nothing more.
        plane.check_health(Instant::now() + 2 * PUBLISH_RETRY_PERIOD, &shared, &[]);
        assert_eq!(shared.load().generation, 2);
    }

    /// The README's log lines for a server that goes down: the health
    /// checker's, then the control loop's.
    #[test]
    fn a_server_going_down_is_logged_as_the_readme_says() {
        #[derive(Clone, Default)]
        struct Log(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Log {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let log = Log::default();
        let writer = log.clone();
        // The process-wide subscriber, not a scoped one: tracing caches
        // whether a log call is wanted when a thread first reaches it, and
        // with a scoped subscriber it asks that thread's, so a call that
        // another test's thread reached first is lost here. Other tests'
        // lines land in the log too; the port picks out this test's.
        tracing::subscriber::set_global_default(
            tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .with_target(false)
                .without_time()
                .finish(),
        )
        .expect("no other test sets a subscriber");

        let port = closed_port();
        let mut plane = plane_of(one_server_config(port));
        plane.health.set_targets(plane.targets());
        plane.generation = 1;
        let shared = ArcSwap::from_pointee(plane.build(1, None).unwrap());
        let end = Instant::now() + Duration::from_secs(4);
        while Instant::now() < end && plane.generation == 1 {
            plane.check_health(Instant::now(), &shared, &[]);
            std::thread::sleep(Duration::from_millis(10));
        }
        let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(&format!("127.0.0.1:{port}")))
            .collect();
        assert_eq!(
            lines,
            [
                format!(
                    " WARN server 127.0.0.1:{port}/tcp is down: connection refused (2 consecutive failures)"
                ),
                format!(" WARN server 127.0.0.1:{port} is down (connection refused)"),
            ]
        );
        assert_eq!(shared.load().generation, 2);
    }

    #[test]
    fn transition_lines_name_the_server_its_check_its_state_and_the_reason() {
        let t = |addr: &str, check: u8, up: bool, reason: &str| health::Transition {
            key: TargetKey {
                addr: addr.parse().unwrap(),
                port: 53,
                proto: 17,
                check,
            },
            up,
            reason: reason.into(),
        };
        assert_eq!(
            transition_line(&t("198.18.2.11", 0, true, "ok")),
            "server 198.18.2.11:53 is up (ok)"
        );
        assert_eq!(
            transition_line(&t("2001:db8::1", 0, false, "ICMP port unreachable")),
            "server [2001:db8::1]:53 is down (ICMP port unreachable)"
        );
        // A second service checks the same server differently: its own
        // target, which the line must tell apart from the first.
        assert_eq!(
            transition_line(&t("198.18.2.11", 1, false, "timeout")),
            "server 198.18.2.11:53 (check 2) is down (timeout)"
        );
    }

    /// The table sizes and timeouts are fixed when the tables are made: a
    /// reload that changes them is refused, naming each key.
    #[test]
    fn a_reload_may_not_change_the_tables_timeouts() {
        let config = |extra: &str| {
            let text = format!(
                "[instance]\nname = \"t\"\nclient_interface = \"c0\"\nbackend_interface = \"b0\"\nclient_gateway = \"198.18.0.2\"\n{extra}"
            );
            Config::from_str(&text, "t.toml").expect("valid")
        };
        let old = config("");
        let same = config("flow_idle_timeout = 300\ntcp_closed_timeout = 60\n");
        assert!(restart_only_changes(&old, &same).is_empty(), "the defaults");
        let new = config("flow_idle_timeout = 600\ntcp_closed_timeout = 10\n");
        assert_eq!(
            restart_only_changes(&old, &new),
            ["flow_idle_timeout", "tcp_closed_timeout"]
        );
    }

    /// The README's `[instance]` table marks "restart" in its Reload column
    /// exactly the keys a reload refuses to change, and its "Reload and
    /// drain" section lists the same keys.
    #[test]
    fn the_readme_names_exactly_the_keys_a_reload_refuses() {
        const README: &str = include_str!("../../README.md");
        let base = "[instance]\nname = \"t\"\nclient_interface = \"c0\"\nbackend_interface = \"b0\"\nclient_gateway = \"198.18.0.2\"\n";
        let old = Config::from_str(base, "t.toml").expect("valid");
        // Every [instance] key changed, the reloadable ones too.
        const NEW: &str =
            "[instance]\nname = \"u\"\nclient_interface = \"c1\"\nbackend_interface = \"b1\"\n\
             client_gateway = \"198.18.0.3\"\nattach = \"skb\"\nbind = \"copy\"\nworkers = [1]\n\
             flow_table_capacity = 2048\nflow_idle_timeout = 600\ntcp_closed_timeout = 10\n\
             tcp_syn_timeout = 5\npersistence_capacity = 2048\n\
             persistence_when_full = \"no_record\"\ncontrol_socket = \"/tmp/other.sock\"\n\
             [[instance.neighbour]]\naddress = \"198.18.0.3\"\nmac = \"02:00:00:00:00:01\"\n";
        let new = Config::from_str(NEW, "t.toml").expect("valid");
        let mut refused: Vec<&str> = restart_only_changes(&old, &new);
        // A refused reload names each key at the line that sets it: every
        // key restart_only_changes reports has its own position, not the
        // [instance] header's (line 1).
        for key in &refused {
            let (line, col) = Config::instance_key_position(NEW, key).expect("the text parses");
            let set = NEW.lines().nth(line - 1).expect("a line of the text");
            assert!(
                set.starts_with(&format!("{key} = ")) && col == key.len() + 4,
                "{key}: {line}:{col} is {set:?}"
            );
        }
        // `mode` has one value, so no file can change it; it is refused
        // all the same (restart_only_changes compares it).
        refused.push("mode");
        refused.sort_unstable();

        let mut table: Vec<(String, String)> = README
            .lines()
            .skip_while(|l| !l.starts_with("### `[instance]`"))
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .skip(2)
            .map(|row| {
                let cells: Vec<&str> = row.split('|').map(str::trim).collect();
                let key = cells[1].trim_matches('`').to_string();
                (key, cells[cells.len() - 2].to_string())
            })
            .collect();
        assert_eq!(table.len(), 15, "README [instance] table: {table:?}");
        table.retain(|(_, reload)| reload == "restart");
        let mut restart: Vec<&str> = table.iter().map(|(k, _)| k.as_str()).collect();
        restart.sort_unstable();
        assert_eq!(restart, refused, "README [instance] Reload column");

        // The README's words with its line breaks and indents as single
        // spaces, so the list may wrap anywhere.
        let prose = README.split_whitespace().collect::<Vec<_>>().join(" ");
        let (_, after) = prose
            .split_once("The restart-only keys are ")
            .expect("README lists the restart-only keys under Reload and drain");
        let (list, _) = after.split_once(". These").expect("the list ends");
        let mut listed: Vec<&str> = list
            .split(',')
            .map(|k| k.trim().trim_matches('`'))
            .collect();
        listed.sort_unstable();
        assert_eq!(listed, refused, "README Reload and drain list");
    }
}
