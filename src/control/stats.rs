//! The stats report served on the control socket and printed by
//! `l4lb stats`.

use crate::control::health::TargetKey;
use crate::control::snapshot::{proto_number, Snapshot};
use crate::control::xdp::Steering;
use crate::dataplane::counters::{DropReason, Shared, WorkerStats};
use crate::dataplane::pipeline::Tables;
use crate::dataplane::xsk::{self, SocketStats};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    pub instance: String,
    pub generation: u64,
    pub uptime_s: u64,
    pub workers: Vec<WorkerReport>,
    /// Drops summed over workers, by reason (every reason listed).
    pub drops: BTreeMap<String, u64>,
    pub listeners: Vec<CounterReport>,
    pub backends: Vec<BackendReport>,
    pub steering: Vec<SteerReport>,
    pub flows: FlowReport,
    pub persistence: PersistReport,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackendReport {
    /// `ADDR:PORT/PROTO`
    pub name: String,
    /// Up by every check of it (services may check one server differently,
    /// and each decides on its own).
    pub up: bool,
    /// The last health check result; with several checks, each one's,
    /// as `check N: RESULT` joined by `; `.
    pub health: String,
    /// Active connections (opened − closed) for least-connections.
    pub active: i64,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PersistReport {
    pub capacity: usize,
    pub live: usize,
    pub hits: u64,
    pub recorded: u64,
    pub evicted: u64,
    pub not_recorded_full: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerReport {
    pub worker: usize,
    pub core: usize,
    pub rx: u64,
    pub tx: u64,
    pub forwarded: u64,
    pub replied: u64,
    /// ICMP errors translated (part of forwarded and replied).
    pub icmp: u64,
    pub flows_created: u64,
    pub flows_evicted: u64,
    pub flows_rebound: u64,
    pub drops: u64,
    /// The kernel's counters of the worker's two AF_XDP sockets (client
    /// side, then backend side).
    pub sockets: Vec<SocketReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SocketReport {
    pub interface: String,
    #[serde(flatten)]
    pub kernel: SocketStats,
    /// Why the counters could not be read (they are then 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CounterReport {
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SteerReport {
    pub interface: String,
    pub redirected: u64,
    pub passed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FlowReport {
    /// Slots; each flow uses one (its forward entry), or two (and a reply
    /// entry) if several listeners share its server.
    pub capacity: usize,
    pub live_entries: usize,
    pub idle_timeout_s: u32,
    pub tcp_closed_timeout_s: u32,
    pub tcp_syn_timeout_s: u32,
    pub memory_bytes: usize,
}

pub struct Sources<'a> {
    pub instance: &'a str,
    pub snapshot: &'a Snapshot,
    pub workers: &'a [(usize, std::sync::Arc<WorkerStats>)],
    /// Each worker's AF_XDP sockets: (interface, fd), client side first.
    pub sockets: &'a [[(&'a str, std::os::fd::RawFd); 2]],
    pub shared: &'a Shared,
    /// Health check states: (target, up, last result).
    pub health: &'a [(TargetKey, bool, String)],
    pub steering: &'a [&'a Steering],
    pub tables: &'a Tables,
    pub now: u32,
    pub uptime_s: u64,
}

pub fn collect(s: &Sources) -> Stats {
    let mut drops: BTreeMap<String, u64> = DropReason::ALL
        .iter()
        .map(|r| (r.name().to_string(), 0))
        .collect();
    let mut workers = Vec::new();
    for (i, (core, w)) in s.workers.iter().enumerate() {
        let c = &w.core;
        let mut total = 0;
        for r in DropReason::ALL {
            let n = w.drops(r);
            total += n;
            *drops.get_mut(r.name()).expect("all reasons present") += n;
        }
        workers.push(WorkerReport {
            worker: i,
            core: *core,
            rx: c.rx.load(Relaxed),
            tx: c.tx.load(Relaxed),
            forwarded: c.forwarded.load(Relaxed),
            replied: c.replied.load(Relaxed),
            icmp: c.icmp.load(Relaxed),
            flows_created: c.flows_created.load(Relaxed),
            flows_evicted: c.flows_evicted.load(Relaxed),
            flows_rebound: c.flows_rebound.load(Relaxed),
            drops: total,
            sockets: s
                .sockets
                .get(i)
                .into_iter()
                .flatten()
                .map(|&(interface, fd)| {
                    let (kernel, error) = match xsk::socket_stats(fd) {
                        Ok(k) => (k, None),
                        Err(e) => (SocketStats::default(), Some(e.to_string())),
                    };
                    SocketReport {
                        interface: interface.to_string(),
                        kernel,
                        error,
                    }
                })
                .collect(),
        });
    }
    let sum = |pick: &dyn Fn(&WorkerStats) -> (u64, u64)| {
        s.workers.iter().fold((0, 0), |(p, b), (_, w)| {
            let (wp, wb) = pick(w);
            (p + wp, b + wb)
        })
    };
    let listeners = s
        .snapshot
        .listeners
        .iter()
        .map(|l| {
            let (packets, bytes) = sum(&|w| w.listeners[l.id as usize].read());
            CounterReport {
                name: format!(
                    "{} {}/{}",
                    l.name,
                    std::net::SocketAddr::new(l.vip, l.port),
                    l.protocol
                ),
                packets,
                bytes,
            }
        })
        .collect();
    let backends = s
        .snapshot
        .backends
        .iter()
        .map(|b| {
            let (packets, bytes) = sum(&|w| w.backends[b.id as usize].read());
            let addr = std::net::SocketAddr::new(b.address, b.port);
            let proto = proto_number(b.protocol);
            // The last result of each of the server's checks (one unless
            // services using it check it differently), in check order.
            let results: Vec<(u8, &str)> = s
                .health
                .iter()
                .filter(|(k, _, _)| k.endpoint() == (b.address, b.port, proto))
                .map(|(k, _, r)| (k.check, r.as_str()))
                .collect();
            let health = match results.as_slice() {
                [] => "not checked".to_string(),
                [(_, r)] => r.to_string(),
                several => several
                    .iter()
                    .map(|(c, r)| format!("check {}: {r}", u16::from(*c) + 1))
                    .collect::<Vec<_>>()
                    .join("; "),
            };
            BackendReport {
                name: format!("{addr}/{}", b.protocol),
                up: b.up,
                health,
                active: s.shared.active(b.id),
                packets,
                bytes,
            }
        })
        .collect();
    let steering = s
        .steering
        .iter()
        .map(|st| {
            let (redirected, passed) = st.counters();
            SteerReport {
                interface: st.ifname().to_string(),
                redirected,
                passed,
            }
        })
        .collect();
    Stats {
        instance: s.instance.to_string(),
        generation: s.snapshot.generation,
        uptime_s: s.uptime_s,
        workers,
        drops,
        listeners,
        backends,
        steering,
        flows: FlowReport {
            capacity: s.tables.flows.capacity(),
            live_entries: s.tables.flows.count_live(s.now),
            idle_timeout_s: s.tables.flow_timeout,
            tcp_closed_timeout_s: s.tables.closed_timeout,
            tcp_syn_timeout_s: s.tables.syn_timeout,
            memory_bytes: s.tables.flows.memory(),
        },
        persistence: {
            let total = |f: &dyn Fn(&crate::dataplane::counters::Core) -> u64| {
                s.workers.iter().map(|(_, w)| f(&w.core)).sum::<u64>()
            };
            PersistReport {
                capacity: s.tables.persist.capacity(),
                live: s.tables.persist.count_live(s.now),
                hits: total(&|c| c.persist_hits.load(Relaxed)),
                recorded: total(&|c| c.persist_recorded.load(Relaxed)),
                evicted: total(&|c| c.persist_evicted.load(Relaxed)),
                not_recorded_full: total(&|c| c.persist_full.load(Relaxed)),
            }
        },
    }
}

/// The human-readable form printed by `l4lb stats`.
pub fn render(st: &Stats) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "instance {} (snapshot {}), up {} s",
        st.instance, st.generation, st.uptime_s
    );
    let _ = writeln!(o, "workers:");
    for w in &st.workers {
        let _ = writeln!(
            o,
            "  {} (core {}): rx {} tx {} forwarded {} replied {} (icmp {}) drops {} flows created {} evicted {} rebound {}",
            w.worker,
            w.core,
            w.rx,
            w.tx,
            w.forwarded,
            w.replied,
            w.icmp,
            w.drops,
            w.flows_created,
            w.flows_evicted,
            w.flows_rebound
        );
        for sk in &w.sockets {
            let k = &sk.kernel;
            let _ = write!(
                o,
                "    socket {}: rx_dropped {} rx_ring_full {} fill_ring_empty {} tx_ring_empty {} invalid rx {} tx {}",
                sk.interface,
                k.rx_dropped,
                k.rx_ring_full,
                k.rx_fill_ring_empty,
                k.tx_ring_empty,
                k.rx_invalid_descs,
                k.tx_invalid_descs
            );
            match &sk.error {
                Some(e) => {
                    let _ = writeln!(o, " (unreadable: {e})");
                }
                None => o.push('\n'),
            }
        }
    }
    let _ = writeln!(o, "listeners (client -> backend packets):");
    for l in &st.listeners {
        let _ = writeln!(
            o,
            "  {:<40} {:>12} pkts {:>14} bytes",
            l.name, l.packets, l.bytes
        );
    }
    let _ = writeln!(o, "backends (client -> backend packets):");
    for b in &st.backends {
        let _ = writeln!(
            o,
            "  {:<28} {:<4} {:>12} pkts {:>14} bytes {:>8} active  ({})",
            b.name,
            if b.up { "up" } else { "DOWN" },
            b.packets,
            b.bytes,
            b.active,
            b.health
        );
    }
    let _ = writeln!(o, "drops:");
    for (k, v) in &st.drops {
        let _ = writeln!(o, "  {k:<16} {v}");
    }
    for s in &st.steering {
        let _ = writeln!(
            o,
            "xdp {}: redirected {} passed {}",
            s.interface, s.redirected, s.passed
        );
    }
    let _ = writeln!(
        o,
        "flows: {} live entries of {} ({} MiB), idle timeout {} s ({} s once TCP closes, {} s until its handshake completes)",
        st.flows.live_entries,
        st.flows.capacity,
        st.flows.memory_bytes >> 20,
        st.flows.idle_timeout_s,
        st.flows.tcp_closed_timeout_s,
        st.flows.tcp_syn_timeout_s
    );
    let p = &st.persistence;
    let _ = writeln!(
        o,
        "persistence: {} live of {}, hits {}, recorded {}, evicted {}, not recorded (full) {}",
        p.live, p.capacity, p.hits, p.recorded, p.evicted, p.not_recorded_full
    );
    o
}
