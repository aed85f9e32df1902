//! The shared flow table (`l4lb::table::FlowTable`): hit, miss and insert at
//! 50 % and 90 % load, on one thread and on two threads sharing the table.
//!
//! `cargo bench --bench flow_table` (add `-- --quick` for a short run).
//!
//! The table has 2^20 slots (64 MiB, the default `flow_table_capacity`), more
//! than this machine's caches, so every operation pays for its cache misses
//! as in production. Keys are reply-direction flow keys (IPv4 client and
//! backend, ports, protocol), all distinct, built before timing.
//!
//! * `hit_*`: lookups of keys in the table, in insertion order (their slots
//!   are spread by the hash); `miss_*`: lookups of keys never inserted.
//! * `insert_*`: upserts of keys not in the table. Inserting raises the
//!   load, so "insert at 50 %" is measured while the load goes from 45 % to
//!   55 % (90 %: 85 % to 95 %); then, untimed, the clock moves past the idle
//!   timeout and the 45 % (85 %) base entries are written again, so the
//!   inserted ones are dead (free for reuse, as in production) and the next
//!   round starts at the same load. At 90 % some windows are full, and an
//!   insert evicts the least recently used entry; the share is printed.
//! * `*_2t`: a second thread does the same operation, on other keys of the
//!   same table, during the same time; the time is the wall time for both
//!   threads to do one operation each (criterion's throughput is the two
//!   threads' total).

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use l4lb::table::{FlowKey, FlowTable, FlowValue, Upsert};

const CAPACITY: usize = 1 << 20;
const TIMEOUT: u32 = 300;
const NOW: u32 = 1_000_000;
/// Inserts per round: 10 % of the table.
const ROUND: usize = CAPACITY / 10;

/// The one place this file touches the table's API.
mod api {
    use super::*;

    pub fn table() -> FlowTable {
        FlowTable::new(CAPACITY)
    }

    pub fn value() -> FlowValue {
        FlowValue::new(1, 2)
    }

    /// Upsert of a new key: true if it took a slot (free, dead or evicted).
    #[inline]
    pub fn insert(t: &FlowTable, k: &FlowKey, now: u32, evicted: &AtomicU64) -> bool {
        match t.upsert(k, value(), now, TIMEOUT, true) {
            Upsert::Inserted(_) => true,
            Upsert::Evicted(_) => {
                evicted.fetch_add(1, Relaxed);
                true
            }
            _ => false,
        }
    }

    #[inline]
    pub fn lookup(t: &FlowTable, k: &FlowKey, now: u32) -> bool {
        t.lookup(k, now).is_some()
    }

    pub fn live(t: &FlowTable, now: u32) -> usize {
        t.count_live(now)
    }
}

fn key(i: usize) -> FlowKey {
    let client = 0x0a00_0000u32 + i as u32;
    FlowKey {
        proto: 17,
        client: l4lb::util::map_v4(client.to_be_bytes()),
        client_port: 40_000 + (i % 20_000) as u16,
        backend: l4lb::util::map_v4([198, 18, 2, 11]),
        backend_port: 9053,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Hit,
    Miss,
    Insert,
}

/// One load level: the table and every key any operation uses.
struct Fixture {
    table: FlowTable,
    keys: Vec<FlowKey>,
    /// Keys [0, base) are in the table.
    base: usize,
    now: u32,
    /// Inserts (per thread) made in the current round.
    used: usize,
    evicted: AtomicU64,
    inserts: AtomicU64,
}

impl Fixture {
    /// A table holding `base` keys; keys after them are never inserted
    /// except by the insert benchmark.
    fn new(base: usize) -> Fixture {
        let keys: Vec<FlowKey> = (0..base + ROUND).map(key).collect();
        let f = Fixture {
            table: api::table(),
            keys,
            base,
            now: NOW,
            used: 0,
            evicted: AtomicU64::new(0),
            inserts: AtomicU64::new(0),
        };
        f.fill();
        f
    }

    fn fill(&self) {
        let sink = AtomicU64::new(0);
        for k in &self.keys[..self.base] {
            api::insert(&self.table, k, self.now, &sink);
        }
    }

    /// Untimed: makes everything inserted since the last reset dead and puts
    /// the base keys back.
    fn reset(&mut self) {
        self.now += TIMEOUT + 1;
        self.used = 0;
        self.fill();
    }

    /// `count` operations of `op` by thread `thread` of `threads`, starting
    /// at `offset` into its keys. Returns how many found / inserted.
    fn run(&self, op: Op, thread: usize, threads: usize, offset: usize, count: usize) -> usize {
        let mut n = 0;
        match op {
            Op::Hit => {
                let start = thread * self.base / threads;
                for i in 0..count {
                    let k = &self.keys[(start + offset + i) % self.base];
                    n += api::lookup(&self.table, k, self.now) as usize;
                }
            }
            Op::Miss => {
                let keys = &self.keys[self.base..];
                let start = thread * keys.len() / threads;
                for i in 0..count {
                    let k = &keys[(start + offset + i) % keys.len()];
                    n += api::lookup(&self.table, k, self.now) as usize;
                }
            }
            Op::Insert => {
                // Thread t inserts keys base + t, base + t + threads, ...
                for i in 0..count {
                    let k = &self.keys[self.base + (offset + i) * threads + thread];
                    n += api::insert(&self.table, k, self.now, &self.evicted) as usize;
                }
                self.inserts.fetch_add(count as u64, Relaxed);
            }
        }
        n
    }
}

/// Times `iters` operations per thread, in chunks that never take an insert
/// round past [`ROUND`]; resets between rounds are not timed.
fn measure(f: &mut Fixture, op: Op, threads: usize, iters: u64) -> Duration {
    let round = match op {
        Op::Insert => ROUND / threads,
        _ => usize::MAX,
    };
    let mut total = Duration::ZERO;
    let mut left = iters as usize;
    let mut offset = 0usize;
    while left > 0 {
        if op == Op::Insert && f.used >= round {
            f.reset();
        }
        // Hits and misses cycle through their keys; inserts take the next
        // unused keys of the round.
        let c = left.min(round - if op == Op::Insert { f.used } else { 0 });
        let at = if op == Op::Insert { f.used } else { offset };
        total += if threads == 1 {
            let t = Instant::now();
            black_box(f.run(op, 0, 1, at, c));
            t.elapsed()
        } else {
            two_threads(f, op, at, c)
        };
        left -= c;
        offset = offset.wrapping_add(c);
        if op == Op::Insert {
            f.used += c;
        }
    }
    total
}

/// Wall time for two threads to do `count` operations each, concurrently
/// on the same table: from the moment both are released until the later
/// one is done (thread creation is not timed).
fn two_threads(f: &Fixture, op: Op, at: usize, count: usize) -> Duration {
    let go = Barrier::new(2);
    std::thread::scope(|s| {
        let helper = s.spawn(|| {
            go.wait();
            black_box(f.run(op, 1, 2, at, count));
            Instant::now()
        });
        go.wait();
        let t = Instant::now();
        black_box(f.run(op, 0, 2, at, count));
        let mine = Instant::now();
        let theirs = helper.join().expect("helper thread");
        mine.max(theirs) - t
    })
}

fn bench(c: &mut Criterion) {
    for (load_name, load) in [("50", 0.50), ("90", 0.90)] {
        let mut g = c.benchmark_group(format!("flow_table_load{load_name}"));
        g.sample_size(20);
        g.warm_up_time(Duration::from_millis(500));
        g.measurement_time(Duration::from_secs(2));

        // Hits and misses at exactly this load.
        let mut f = Fixture::new((CAPACITY as f64 * load) as usize);
        eprintln!(
            "flow table: {} of {} slots live after inserting {} keys",
            api::live(&f.table, f.now),
            CAPACITY,
            f.base
        );
        for op in [Op::Hit, Op::Miss] {
            for threads in [1usize, 2] {
                g.throughput(Throughput::Elements(threads as u64));
                let name = format!(
                    "{}_{}t",
                    if op == Op::Hit { "hit" } else { "miss" },
                    threads
                );
                g.bench_function(BenchmarkId::from_parameter(name), |b| {
                    b.iter_custom(|iters| measure(&mut f, op, threads, iters))
                });
            }
        }
        drop(f);

        // Inserts while the load goes from load - 5 % to load + 5 %.
        let mut f = Fixture::new((CAPACITY as f64 * (load - 0.05)) as usize);
        for threads in [1usize, 2] {
            f.reset();
            f.evicted.store(0, Relaxed);
            f.inserts.store(0, Relaxed);
            g.throughput(Throughput::Elements(threads as u64));
            g.bench_function(
                BenchmarkId::from_parameter(format!("insert_{threads}t")),
                |b| b.iter_custom(|iters| measure(&mut f, Op::Insert, threads, iters)),
            );
            let (e, n) = (f.evicted.load(Relaxed), f.inserts.load(Relaxed));
            eprintln!(
                "flow table: insert at {load_name}% ({threads} thread(s)): {e} of {n} inserts evicted a live entry ({:.2}%)",
                100.0 * e as f64 / n.max(1) as f64
            );
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
