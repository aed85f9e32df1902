//! The control plane: turns a config into a running data plane and keeps it
//! fed. It may allocate, lock, log and sleep; the data plane may not.
//!
//! `run` loads and validates the config, resolves interfaces and next-hop
//! MACs, builds the first [`Snapshot`], attaches the XDP steering program,
//! binds one AF_XDP socket pair per worker, starts the pinned workers, then
//! serves the control socket and refreshes neighbours until SIGINT/SIGTERM,
//! when it stops the workers and detaches XDP.

pub mod ctl;
pub mod netdev;
pub mod snapshot;
pub mod stats;
pub mod xdp;

use crate::config::{AttachMode, BindMode, Config};
use crate::dataplane::counters::WorkerStats;
use crate::dataplane::worker::Worker;
use crate::dataplane::xsk::{Bind, XskPair};
use crate::table::FlowTable;
use crate::util::Mac;
use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use snapshot::{Links, Snapshot};
use std::collections::HashMap;
use std::net::IpAddr;
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
struct Neighbours {
    statics: HashMap<IpAddr, Mac>,
    kernel: HashMap<(u32, IpAddr), Mac>,
}

impl Neighbours {
    fn new(config: &Config) -> Self {
        Neighbours {
            statics: config
                .instance
                .neighbours
                .iter()
                .map(|n| (n.address, n.mac))
                .collect(),
            kernel: HashMap::new(),
        }
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

struct Plane {
    config: Config,
    client_idx: u32,
    backend_idx: u32,
    base_links: Links,
    local: Vec<IpAddr>,
}

impl Plane {
    fn build(&self, nb: &Neighbours, generation: u64) -> Result<Snapshot> {
        let mut links = self.base_links;
        links.gateway_mac = nb.get(self.client_idx, &self.config.instance.client_gateway);
        let b = self.backend_idx;
        Snapshot::build(&self.config, generation, links, &self.local, &|ip| {
            nb.get(b, ip)
        })
        .map_err(anyhow::Error::msg)
    }

    /// Addresses whose MAC is missing: asks the kernel to resolve them.
    fn solicit_missing(&self, nb: &Neighbours) -> usize {
        let mut missing = 0;
        let gw = self.config.instance.client_gateway;
        let mut wanted = vec![(self.client_idx, gw)];
        for s in self.config.services.iter().flat_map(|s| &s.servers) {
            wanted.push((self.backend_idx, s.address));
        }
        wanted.sort();
        wanted.dedup();
        for (idx, ip) in wanted {
            if nb.get(idx, &ip).is_none() {
                missing += 1;
                if let Err(e) = netdev::solicit(idx, &ip) {
                    tracing::debug!("{e:#}");
                }
            }
        }
        missing
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

/// Runs an instance until SIGINT or SIGTERM.
pub fn run(config: Config, config_name: &str) -> Result<()> {
    let started = Instant::now();
    raise_memlock();
    let inst = config.instance.clone();
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
    let base_links = Links {
        client_if_mac: netdev::mac(&inst.client_interface)?,
        backend_if_mac: netdev::mac(&inst.backend_interface)?,
        gateway_mac: None,
    };
    let mut local = netdev::addresses(&inst.backend_interface)?;
    local.extend(netdev::addresses(&inst.client_interface)?);
    let plane = Plane {
        config,
        client_idx,
        backend_idx,
        base_links,
        local,
    };

    // Resolve next hops before traffic flows (bounded wait: what is still
    // missing is counted as no_neighbour drops until it resolves).
    let mut nb = Neighbours::new(&plane.config);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        nb.refresh();
        let missing = plane.solicit_missing(&nb);
        if missing == 0 {
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

    let mut generation = 1;
    let first = plane.build(&nb, generation)?;
    let shared = Arc::new(ArcSwap::from_pointee(first));
    let flows = Arc::new(FlowTable::new(
        inst.flow_table_capacity,
        inst.flow_idle_timeout,
    ));

    let mode = match inst.attach {
        AttachMode::Native => Attach::Native,
        AttachMode::Skb => Attach::Skb,
    };
    let steer_c = Steering::attach(&inst.client_interface, client_idx, mode)?;
    let steer_b = Steering::attach(&inst.backend_interface, backend_idx, mode)?;
    let sync = |snap: &Snapshot| -> Result<()> {
        let (v, l, b, lo) = snap.steering_sets();
        steer_c.sync(&v, &l, &b, &lo)?;
        steer_b.sync(&v, &l, &b, &lo)
    };
    sync(&shared.load())?;

    let bind = match inst.bind {
        BindMode::Auto => Bind::Auto,
        BindMode::Copy => Bind::Copy,
        BindMode::ZeroCopy => Bind::ZeroCopy,
    };
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))?;

    let max_listeners = crate::config::MAX_LISTENERS;
    let max_backends = crate::config::MAX_SERVERS;
    let mut worker_stats = Vec::new();
    let mut handles = Vec::new();
    for (i, &core) in inst.workers.iter().enumerate() {
        let queue = i as u32;
        let pair = XskPair::new(&inst.client_interface, &inst.backend_interface, queue, bind)?;
        steer_c.add_socket(queue, pair.ports[0].fd())?;
        steer_b.add_socket(queue, pair.ports[1].fd())?;
        let stats = Arc::new(WorkerStats::new(max_listeners, max_backends));
        worker_stats.push((core, Arc::clone(&stats)));
        let w = Worker {
            id: i,
            xsk: pair,
            snapshot: Arc::clone(&shared),
            flows: Arc::clone(&flows),
            stats,
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
        handles.push(h);
    }
    let ctl = ctl::ControlSocket::bind(&inst.control_socket)?;
    tracing::info!(
        "l4lb running: {} worker(s), {} listener(s), control socket {}",
        inst.workers.len(),
        plane.config.listeners.len(),
        inst.control_socket.display()
    );

    let mut last_refresh = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        ctl.serve_pending(&mut |req| match req {
            "stats" => {
                let snap = shared.load();
                let s = stats::collect(&stats::Sources {
                    instance: &inst.name,
                    snapshot: &snap,
                    workers: &worker_stats,
                    steering: &[&steer_c, &steer_b],
                    flows: &flows,
                    now: coarse_now(),
                    uptime_s: started.elapsed().as_secs(),
                });
                serde_json::to_string(&s).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
            }
            other => format!("{{\"error\":\"unknown request {other:?}\"}}"),
        });
        if last_refresh.elapsed() >= Duration::from_secs(1) {
            last_refresh = Instant::now();
            nb.refresh();
            plane.solicit_missing(&nb);
            let cur = shared.load();
            let gw = nb.get(client_idx, &plane.config.instance.client_gateway);
            let changed = gw != cur.links.gateway_mac
                || cur
                    .backends
                    .iter()
                    .any(|b| nb.get(backend_idx, &b.address) != b.mac);
            if changed {
                generation += 1;
                tracing::info!(
                    generation,
                    "next-hop MACs changed: publishing a new snapshot"
                );
                shared.store(Arc::new(plane.build(&nb, generation)?));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    tracing::info!("stopping");
    for h in handles {
        let _ = h.join();
    }
    drop(steer_c);
    drop(steer_b);
    drop(ctl);
    Ok(())
}
