//! The bare AF_XDP ceiling: l4lb's socket set-up and poll loop with the
//! packet processing taken out.
//!
//! Same XDP steering program (l4lb's own, with the benchmark's listeners in
//! its maps), same sockets (`l4lb::dataplane::xsk::XskPair`: one UMEM shared
//! by a client-side and a backend-side socket per queue, same ring and UMEM
//! sizes, copy mode), same loop structure as `l4lb::dataplane::worker`
//! (`rx_burst` on both ports, a per-port TX buffer of two bursts, kick the
//! kernel while frames are in flight, completions to the free list, refill
//! both fill rings, back off to poll(2) when idle). Per frame it only sets
//! the two MAC addresses and sends every client-side frame out of the
//! backend side: the difference between this and l4lb is the cost of
//! parsing, deciding, the flow table and the NAT rewrite.

use anyhow::{Context, Result};
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use l4lb::control::snapshot::L4Key;
use l4lb::control::xdp::{Attach, Steering};
use l4lb::dataplane::xsk::{self, Bind, XskPair};
use l4lb::util::map_v4;
use xsk_rs::FrameDesc;

use crate::common::{self, Mac, Proto};

/// As `l4lb::dataplane::worker`.
const BURST: usize = 64;
const IDLE_SPINS: u32 = 20_000;

#[derive(Default)]
pub struct FwdStats {
    pub rx: AtomicU64,
    pub tx: AtomicU64,
    /// Frames recycled because the TX buffer was full.
    pub dropped: AtomicU64,
}

/// Single-writer counter bump, as l4lb's worker counters do it.
#[inline]
fn add(c: &AtomicU64, n: u64) {
    c.store(c.load(Relaxed) + n, Relaxed);
}

pub struct Options {
    pub client_if: String,
    pub backend_if: String,
    pub cores: Vec<usize>,
    pub attach: Attach,
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub backends: usize,
    pub stats_file: std::path::PathBuf,
}

/// Runs until SIGTERM/SIGINT, writing `{"rx":..,"tx":..,"dropped":..,
/// "redirected":..}` to the stats file every 100 ms (and once at the end).
pub fn run(o: Options) -> Result<()> {
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain setrlimit.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) };

    let ci = l4lb::control::netdev::ifindex(&o.client_if)?;
    let bi = l4lb::control::netdev::ifindex(&o.backend_if)?;
    let steer_c = Steering::attach(&o.client_if, ci, o.attach)?;
    let steer_b = Steering::attach(&o.backend_if, bi, o.attach)?;
    let vips = vec![map_v4(common::VIP)];
    let listeners: Vec<L4Key> = [(Proto::Udp, 17u8), (Proto::Tcp, 6u8)]
        .iter()
        .map(|&(p, n)| L4Key {
            addr: map_v4(common::VIP),
            port: p.vip_port(),
            proto: n,
        })
        .collect();
    let backends: Vec<_> = (0..o.backends)
        .map(|i| map_v4(common::backend_addr(i)))
        .collect();
    let local = vec![
        map_v4(common::LB_CLIENT_ADDR),
        map_v4(common::LB_BACKEND_ADDR),
    ];
    for s in [&steer_c, &steer_b] {
        s.sync(&vips, &listeners, &backends, &local)?;
    }

    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))?;
    let stats: Vec<Arc<FwdStats>> = o.cores.iter().map(|_| Arc::default()).collect();
    let mut handles = Vec::new();
    for (q, &core) in o.cores.iter().enumerate() {
        let pair = XskPair::new(&o.client_if, &o.backend_if, q as u32, Bind::Copy)
            .with_context(|| format!("queue {q}"))?;
        steer_c.add_socket(q as u32, pair.ports[0].fd())?;
        steer_b.add_socket(q as u32, pair.ports[1].fd())?;
        let (stop, st) = (Arc::clone(&stop), Arc::clone(&stats[q]));
        let (src, dst) = (o.src_mac, o.dst_mac);
        handles.push(
            std::thread::Builder::new()
                .name(format!("bench-fwd{q}"))
                .spawn(move || {
                    if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                        eprintln!("l4lb-bench fwd: could not pin queue {q} to CPU {core}");
                    }
                    forward(pair, &stop, &st, src, dst);
                })?,
        );
    }

    let write = || -> Result<()> {
        let sum = |f: &dyn Fn(&FwdStats) -> &AtomicU64| -> u64 {
            stats.iter().map(|s| f(s).load(Relaxed)).sum()
        };
        let json = serde_json::json!({
            "rx": sum(&|s| &s.rx),
            "tx": sum(&|s| &s.tx),
            "dropped": sum(&|s| &s.dropped),
            "redirected": steer_c.counters().0,
        });
        let tmp = o.stats_file.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{json}")?;
        std::fs::rename(&tmp, &o.stats_file)?;
        Ok(())
    };
    while !stop.load(Relaxed) {
        write()?;
        std::thread::sleep(Duration::from_millis(100));
    }
    for h in handles {
        let _ = h.join();
    }
    write()?;
    drop(steer_c);
    drop(steer_b);
    Ok(())
}

/// Frames waiting for one TX ring.
struct TxBuf {
    descs: Box<[FrameDesc]>,
    len: usize,
}

/// The worker loop of `l4lb::dataplane::worker::Worker::run`, step for step,
/// with `process_burst` reduced to "set the MACs, send to the backend side".
/// Priming, flush, refill and the idle sleep are the worker's own
/// (`XskPair::prime`, `xsk::flush`, `XskPair::refill`,
/// `XskPair::sleep_until_rx`).
fn forward(mut x: XskPair, stop: &AtomicBool, stats: &FwdStats, src: Mac, dst: Mac) {
    let mut free = x.prime();
    let mut rx = [FrameDesc::default(); BURST];
    let mut scratch = [FrameDesc::default(); BURST];
    let mut txq = [
        TxBuf {
            descs: vec![FrameDesc::default(); 2 * BURST].into_boxed_slice(),
            len: 0,
        },
        TxBuf {
            descs: vec![FrameDesc::default(); 2 * BURST].into_boxed_slice(),
            len: 0,
        },
    ];

    let mut idle: u32 = 0;
    while !stop.load(Relaxed) {
        let mut work = 0usize;
        for port in 0..2 {
            // rx_burst
            let n = xsk::rx_burst(&mut x.ports[port], &mut rx);
            if n == 0 {
                continue;
            }
            work += n;
            add(&stats.rx, n as u64);
            // process_burst: client side → backend side, MACs set.
            for desc in rx.iter_mut().take(n) {
                if port == 1 {
                    free.push(*desc);
                    continue;
                }
                {
                    let mut data = xsk::frame_mut(&x.umem, desc);
                    let b = data.contents_mut();
                    if b.len() >= 12 {
                        b[0..6].copy_from_slice(&dst);
                        b[6..12].copy_from_slice(&src);
                    }
                }
                let q = &mut txq[1];
                if q.len < q.descs.len() {
                    q.descs[q.len] = *desc;
                    q.len += 1;
                } else {
                    add(&stats.dropped, 1);
                    free.push(*desc);
                }
            }
        }

        // tx_burst + flush
        for (p, q) in txq.iter_mut().enumerate() {
            let port = &mut x.ports[p];
            if q.len > 0 {
                let sent = xsk::tx_produce(port, &q.descs[..q.len]);
                add(&stats.tx, sent as u64);
                q.descs.copy_within(sent..q.len, 0);
                q.len -= sent;
            }
            // flush: the worker's own (dataplane::xsk::flush).
            if port.in_flight > 0 {
                work += 1;
            }
            xsk::flush(port, &mut scratch, &mut free);
        }

        // Refill both fill rings.
        x.refill(&mut free);

        if work == 0 {
            idle += 1;
            if idle >= IDLE_SPINS {
                x.sleep_until_rx();
            }
        } else {
            idle = 0;
        }
    }
}
