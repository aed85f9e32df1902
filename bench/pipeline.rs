//! Per-packet cost of l4lb's data path: parse, decide and NAT-rewrite, over
//! bursts of 64 frames, through the public pipeline API
//! (`Replayer::new(&config)`, then `Replayer::processor(now)
//! .process_burst(..)`: the staged burst pipeline the AF_XDP worker runs).
//! The `*_frame_at_a_time` variants run the same frames through
//! `Processor::process`, one after another, for comparison in the same run.
//!
//! `cargo bench --bench pipeline` (add `-- --quick` for a short run).
//!
//! Every burst is 64 frames of 64 bytes (IPv4, UDP or TCP, valid
//! checksums), built before timing. Processing rewrites a frame in place, so
//! each timed iteration first restores its burst from a pristine copy
//! (4 KiB `copy_from_slice`); the `restore_only` benchmarks time that copy
//! alone, so that it can be subtracted (BENCHMARKS.md does). The
//! pipeline's per-frame state (64 `Meta`s and verdicts) is built once per
//! benchmark and kept across bursts, as the worker keeps it; it used to be
//! built in every timed iteration, which charged each frame with
//! initialising its `Meta` (168 bytes).
//!
//! * `established_*`: frames of flows that already exist (the burst ran once
//!   before timing). `hot`: the same 64 flows each iteration, everything in
//!   cache. `128k`: 2048 different bursts of 131,072 established flows,
//!   taken in turn, so that flow-table lookups (2^20 slots, 64 MiB) miss
//!   the CPU caches. Flows the table evicted and the timed loop had to
//!   create again are counted and printed.
//! * `new_session_*`: every frame is a new client (a new source address:
//!   65,536 clients in 1024 bursts). When all of them have been used, the
//!   clock moves forward by 1000 s, past the flow idle timeout and the
//!   persistence timeout (both 300 s), so every client is new again and
//!   each frame pays for the flow insert(s) and, when the pipeline keeps
//!   persistence, for the persistence insert (the config sets
//!   `persistence_timeout = 300` on both services).
//! * `*_nopersist`: the same with persistence off (only the flow table).
//! * `*_1k`: the same with 1024 clients (16 bursts): their table lines
//!   (4096 with persistence) stay within the L2 cache, so these time the
//!   work of a new session without its wait for memory.
//! * `reply_*_hot`: a backend's reply to an established flow (reverse NAT).
//!
//! Targets (issue 5): established <= 30 ns/packet, new session <= 80
//! ns/packet.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use l4lb::dataplane::pipeline::{Chunks, Meta};
use l4lb::dataplane::{Port, Verdict};
use l4lb::replay::{Replayer, CLIENT_IF_MAC};

#[path = "common.rs"]
mod common;
use common::{reply_frame, Proto, FRAME_LEN};

const BURST: usize = 64;
const BURST_BYTES: usize = BURST * FRAME_LEN;
const NOW: u32 = 1_000_000;

/// `n` bursts of forward frames from clients `0..n * 64`
/// ([`common::client_frames`]).
fn forward_bursts(proto: Proto, n: usize) -> Vec<u8> {
    common::client_frames(proto, CLIENT_IF_MAC, n * BURST)
}

/// The burst pipeline's per-frame state, which the worker allocates once
/// and keeps across bursts: built outside the timed closures too.
struct State {
    metas: [Meta; BURST],
    verdicts: [Verdict; BURST],
}

impl State {
    fn new() -> Self {
        State {
            metas: [Meta::default(); BURST],
            verdicts: [Verdict::Pass; BURST],
        }
    }
}

/// Processes one burst in place, as the worker does
/// (`Processor::process_burst`); returns how many frames went to `port`.
#[inline]
fn process_burst(r: &Replayer, s: &mut State, burst: &mut [u8], now: u32, port: Port) -> usize {
    r.processor(now).process_burst(
        &mut Chunks {
            buf: burst,
            frame_len: FRAME_LEN,
        },
        &mut s.metas,
        &mut s.verdicts,
    );
    s.verdicts
        .iter()
        .filter(|v| **v == Verdict::Tx(port))
        .count()
}

/// The same, one frame at a time (`Processor::process`: the stages back to
/// back, so no frame's cache misses overlap another's): the comparison that
/// shows what the staged burst buys.
#[inline]
fn process_each(r: &Replayer, _: &mut State, burst: &mut [u8], now: u32, port: Port) -> usize {
    let p = r.processor(now);
    let mut n = 0;
    for f in burst.chunks_exact_mut(FRAME_LEN) {
        if p.process(f) == Verdict::Tx(port) {
            n += 1;
        }
    }
    n
}

fn replayer() -> Replayer {
    let (cfg, _) = common::offline_config();
    Replayer::new(&cfg).expect("replayer")
}

/// The same without session persistence (`nopersist` benchmarks): what a
/// packet costs when only the flow table is involved.
fn replayer_without_persistence() -> Replayer {
    let (cfg, _) = common::offline_config_with(false);
    Replayer::new(&cfg).expect("replayer")
}

fn flows_created(r: &Replayer) -> u64 {
    r.stats
        .core
        .flows_created
        .load(std::sync::atomic::Ordering::Relaxed)
}

fn restore_only(c: &mut Criterion) {
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(BURST as u64));
    let one = forward_bursts(Proto::Udp, 1);
    let mut work = one.clone();
    g.bench_function("restore_only_hot", |b| {
        b.iter(|| {
            work.copy_from_slice(black_box(&one));
            black_box(&mut work);
        })
    });
    for (name, bursts) in [("restore_only_65k", 1024), ("restore_only_128k", 2048)] {
        let pool = forward_bursts(Proto::Udp, bursts);
        let mut i = 0usize;
        g.bench_function(name, |b| {
            b.iter(|| {
                let at = (i % bursts) * BURST_BYTES;
                work.copy_from_slice(black_box(&pool[at..at + BURST_BYTES]));
                i += 1;
                black_box(&mut work);
            })
        });
    }
    g.finish();
}

fn established(c: &mut Criterion) {
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(BURST as u64));
    let mut st = State::new();
    for (proto, persist) in [(Proto::Udp, true), (Proto::Tcp, true), (Proto::Udp, false)] {
        let r = if persist {
            replayer()
        } else {
            replayer_without_persistence()
        };
        let pristine = forward_bursts(proto, 1);
        let mut work = pristine.clone();
        assert_eq!(
            process_burst(&r, &mut st, &mut work, NOW, Port::Backend),
            BURST
        );
        let created = flows_created(&r);
        let suffix = if persist { "" } else { "_nopersist" };
        g.bench_function(format!("established_{}_hot{suffix}", proto.name()), |b| {
            b.iter(|| {
                work.copy_from_slice(&pristine);
                process_burst(&r, &mut st, black_box(&mut work), NOW, Port::Backend)
            })
        });
        if proto == Proto::Udp && persist {
            g.bench_function("established_udp_hot_frame_at_a_time", |b| {
                b.iter(|| {
                    work.copy_from_slice(&pristine);
                    process_each(&r, &mut st, black_box(&mut work), NOW, Port::Backend)
                })
            });
        }
        assert_eq!(flows_created(&r), created, "no flow may be created");
    }

    // 131,072 established flows: lookups go to memory.
    let bursts = 2048;
    let r = replayer();
    let pool = forward_bursts(Proto::Udp, bursts);
    let mut work = vec![0u8; BURST_BYTES];
    for at in (0..pool.len()).step_by(BURST_BYTES) {
        work.copy_from_slice(&pool[at..at + BURST_BYTES]);
        assert_eq!(
            process_burst(&r, &mut st, &mut work, NOW, Port::Backend),
            BURST
        );
    }
    let created = flows_created(&r);
    let mut frames = 0u64;
    type Run = fn(&Replayer, &mut State, &mut [u8], u32, Port) -> usize;
    for (name, run) in [
        ("established_udp_128k", process_burst as Run),
        ("established_udp_128k_frame_at_a_time", process_each),
    ] {
        let mut i = 0usize;
        g.bench_function(name, |b| {
            b.iter(|| {
                let at = (i % bursts) * BURST_BYTES;
                i += 1;
                frames += BURST as u64;
                work.copy_from_slice(&pool[at..at + BURST_BYTES]);
                run(&r, &mut st, black_box(&mut work), NOW, Port::Backend)
            })
        });
    }
    let again = flows_created(&r) - created;
    eprintln!(
        "established_udp_128k: {again} of {frames} timed frames ({:.3}%) found their flow evicted and created it again",
        100.0 * again as f64 / frames.max(1) as f64
    );
    g.finish();
}

fn new_session(c: &mut Criterion) {
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(BURST as u64));
    let mut st = State::new();
    // 65,536 clients, each its own source address; or 1024 (`_1k`).
    let full = common::MAX_CLIENT_ADDRS as usize / BURST;
    for (proto, persist, staged, bursts) in [
        (Proto::Udp, true, true, full),
        (Proto::Tcp, true, true, full),
        (Proto::Udp, false, true, full),
        (Proto::Udp, true, false, full),
        (Proto::Udp, true, true, 1024 / BURST),
        (Proto::Udp, false, true, 1024 / BURST),
    ] {
        let r = if persist {
            replayer()
        } else {
            replayer_without_persistence()
        };
        let run = if staged { process_burst } else { process_each };
        let pool = forward_bursts(proto, bursts);
        let mut work = vec![0u8; BURST_BYTES];
        // One full round untimed: every frame must create its flow.
        let before = flows_created(&r);
        for at in (0..pool.len()).step_by(BURST_BYTES) {
            work.copy_from_slice(&pool[at..at + BURST_BYTES]);
            assert_eq!(
                process_burst(&r, &mut st, &mut work, NOW, Port::Backend),
                BURST
            );
        }
        assert_eq!(
            flows_created(&r) - before,
            (bursts * BURST) as u64,
            "each frame of a round must be a new flow"
        );
        let mut now = NOW + 1000;
        let mut i = 0usize;
        let before = flows_created(&r);
        let mut frames = 0u64;
        let suffix = match (persist, staged) {
            (true, true) => "",
            (false, _) => "_nopersist",
            (true, false) => "_frame_at_a_time",
        };
        let pool_size = if bursts == full { "" } else { "_1k" };
        g.bench_function(
            format!("new_session_{}{suffix}{pool_size}", proto.name()),
            |b| {
                b.iter(|| {
                    let at = (i % bursts) * BURST_BYTES;
                    i += 1;
                    work.copy_from_slice(&pool[at..at + BURST_BYTES]);
                    let n = run(&r, &mut st, black_box(&mut work), now, Port::Backend);
                    if i % bursts == 0 {
                        // Every client of this round is now expired.
                        now += 1000;
                    }
                    frames += BURST as u64;
                    n
                })
            },
        );
        assert_eq!(
            flows_created(&r) - before,
            frames,
            "every timed frame must have created a flow"
        );
    }
    g.finish();
}

fn reply(c: &mut Criterion) {
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(BURST as u64));
    let mut st = State::new();
    for proto in [Proto::Udp, Proto::Tcp] {
        let r = replayer();
        let mut fwd = forward_bursts(proto, 1);
        assert_eq!(
            process_burst(&r, &mut st, &mut fwd, NOW, Port::Backend),
            BURST
        );
        let pristine: Vec<u8> = fwd
            .chunks_exact(FRAME_LEN)
            .flat_map(|f| reply_frame(proto, f))
            .collect();
        let mut work = pristine.clone();
        assert_eq!(
            process_burst(&r, &mut st, &mut work, NOW, Port::Client),
            BURST
        );
        g.bench_function(format!("reply_{}_hot", proto.name()), |b| {
            b.iter(|| {
                work.copy_from_slice(&pristine);
                process_burst(&r, &mut st, black_box(&mut work), NOW, Port::Client)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, restore_only, established, new_session, reply);
criterion_main!(benches);
