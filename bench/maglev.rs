//! Maglev table build and lookup benchmarks.
//!
//! `cargo bench --bench maglev` (add `-- --quick` for a short run).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use l4lb::sched::{client_hash, Maglev, MaglevBackend, DEFAULT_TABLE_SIZE};

/// `n` equal-weight backends 10.0.x.y:80.
fn backends(n: u32) -> Vec<MaglevBackend> {
    (0..n)
        .map(|i| MaglevBackend::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0001 + i)), 80, 100))
        .collect()
}

fn build(c: &mut Criterion) {
    let mut g = c.benchmark_group("maglev_build");
    g.sample_size(20);
    for n in [10u32, 100, 1000] {
        let bs = backends(n);
        g.throughput(Throughput::Elements(u64::from(DEFAULT_TABLE_SIZE)));
        g.bench_with_input(BenchmarkId::from_parameter(n), &bs, |b, bs| {
            b.iter(|| Maglev::build(black_box(bs), DEFAULT_TABLE_SIZE).unwrap())
        });
    }
    g.finish();
}

fn lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("maglev_lookup");
    let bs = backends(100);
    let m = Maglev::build(&bs, DEFAULT_TABLE_SIZE).unwrap();
    // A burst of 64 client hashes, as the data plane sees per RX batch.
    let hashes: Vec<u64> = (0..64u32)
        .map(|i| client_hash(&IpAddr::V4(Ipv4Addr::from(0xac10_0000 + i * 7919))))
        .collect();
    g.throughput(Throughput::Elements(hashes.len() as u64));
    g.bench_function("burst64", |b| {
        b.iter(|| {
            let mut acc = 0u32;
            for &h in black_box(&hashes) {
                acc = acc.wrapping_add(m.lookup(h).unwrap_or(u32::MAX));
            }
            acc
        })
    });
    g.finish();
}

criterion_group!(benches, build, lookup);
criterion_main!(benches);
