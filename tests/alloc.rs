//! The data plane allocates nothing per packet.
//!
//! A counting global allocator counts the allocations made by the current
//! thread while counting is switched on. The pipeline then processes
//! prebuilt frames for many iterations after a warm-up, alternately in
//! bursts of up to 64 (`Processor::process_burst`, what the AF_XDP worker
//! runs) and one frame at a time (`Processor::process`): forwarded frames (new sessions whenever the clock jumps past the
//! timeouts, established flows otherwise), backends' replies, and frames it
//! drops or passes. The steady state must allocate exactly nothing.
//!
//! `counter_sees_allocations` shows that the counter works: a `Vec` push and
//! a `Box` are counted, so the zero above is a real zero.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;

use l4lb::dataplane::pipeline::Meta;
use l4lb::dataplane::{Port, Verdict};
use l4lb::replay::{Replayer, BACKEND_IF_MAC, CLIENT_IF_MAC};

#[path = "../bench/common.rs"]
mod common;
use common::*;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

/// Counts allocations of threads that asked for it (`count_allocs`), so that
/// the test harness's own threads do not disturb the count.
struct Counting;

fn note_alloc() {
    // try_with: the allocator may run while thread-locals are torn down.
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let _ = ALLOCS.try_with(|n| n.set(n.get() + 1));
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// bookkeeping touches only const-initialised thread-locals, which never
// allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_alloc();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the number of allocations (alloc,
/// alloc_zeroed, realloc) it made on this thread.
fn count_allocs<R>(f: impl FnOnce() -> R) -> (R, u64) {
    ALLOCS.with(|n| n.set(0));
    COUNTING.with(|on| on.set(true));
    let r = f();
    COUNTING.with(|on| on.set(false));
    (r, ALLOCS.with(|n| n.get()))
}

const NOW: u32 = 1_000_000;
const CLIENTS: u32 = 256;

/// A frame and the verdict it must get (checked by kind: the exact drop
/// reason is the replay tests' business).
struct Case {
    frame: Vec<u8>,
    want: Verdict,
}

fn same_kind(a: Verdict, b: Verdict) -> bool {
    match (a, b) {
        (Verdict::Drop(_), Verdict::Drop(_)) => true,
        _ => a == b,
    }
}

/// Forward frames of `CLIENTS` UDP and `CLIENTS` TCP clients, their
/// backends' replies, and frames that are dropped or passed.
fn cases(r: &Replayer) -> Vec<Case> {
    let mut out = Vec::new();
    let mut forwards = Vec::new();
    for proto in [Proto::Udp, Proto::Tcp] {
        for i in 0..CLIENTS {
            let f = client_frame(proto, CLIENT_IF_MAC, client_addr(i), FIRST_CLIENT_PORT);
            forwards.push((proto, f.clone()));
            out.push(Case {
                frame: f,
                want: Verdict::Tx(Port::Backend),
            });
        }
    }
    // Replies: run each forward frame once to learn its backend.
    for (proto, f) in &forwards {
        let mut sent = f.clone();
        assert_eq!(r.process(&mut sent, NOW), Verdict::Tx(Port::Backend));
        out.push(Case {
            frame: reply_frame(*proto, &sent),
            want: Verdict::Tx(Port::Client),
        });
    }
    let drop = Verdict::Drop(l4lb::dataplane::DropReason::Malformed);
    // TTL 1 towards the VIP: would expire.
    let mut ttl1 = client_frame(Proto::Udp, CLIENT_IF_MAC, client_addr(1000), 1);
    ttl1[14 + 8] = 1;
    out.push(Case {
        frame: ttl1,
        want: drop,
    });
    // A backend's packet to a client that has no flow.
    out.push(Case {
        frame: frame(
            Proto::Udp,
            backend_mac(0),
            BACKEND_IF_MAC,
            backend_addr(0),
            UDP_BACKEND_PORT,
            client_addr(2000),
            4242,
        ),
        want: drop,
    });
    // IPv4 total length beyond the frame: malformed.
    let mut long = client_frame(Proto::Udp, CLIENT_IF_MAC, client_addr(1001), 1);
    long[16..18].copy_from_slice(&1000u16.to_be_bytes());
    out.push(Case {
        frame: long,
        want: drop,
    });
    // A first fragment (MF set) to the VIP.
    let mut frag = client_frame(Proto::Udp, CLIENT_IF_MAC, client_addr(1002), 1);
    frag[20] |= 0x20;
    out.push(Case {
        frame: frag,
        want: drop,
    });
    // Not IP (an ARP request): the kernel's.
    let mut arp = client_frame(Proto::Udp, CLIENT_IF_MAC, client_addr(1003), 1);
    arp[0..6].copy_from_slice(&[0xff; 6]);
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    out.push(Case {
        frame: arp,
        want: Verdict::Pass,
    });
    out
}

#[test]
fn steady_state_pipeline_allocates_nothing() {
    let (cfg, _) = offline_config();
    let r = Replayer::new(&cfg).expect("replayer");
    let cases = cases(&r);
    let pristine: Vec<Vec<u8>> = cases.iter().map(|c| c.frame.clone()).collect();
    let mut work = pristine.clone();
    let mut frames: Vec<&mut [u8]> = work.iter_mut().map(|w| w.as_mut_slice()).collect();
    let mut metas = vec![Meta::default(); 64];
    let mut verdicts = vec![Verdict::Pass; 64];
    let mut now = NOW;
    let mut round = 0u32;

    // One pass: processes every case, restoring frames first; returns the
    // number of frames whose verdict was not the expected one. Odd rounds
    // go in bursts, even rounds frame by frame.
    let mut pass = |now: u32| -> u64 {
        round += 1;
        let mut wrong = 0;
        for (f, p) in frames.iter_mut().zip(&pristine) {
            f.copy_from_slice(p);
        }
        let proc = r.processor(now);
        for (at, burst) in (0..).step_by(64).zip(frames.chunks_mut(64)) {
            if round % 2 == 1 {
                proc.process_burst(burst, &mut metas, &mut verdicts);
            } else {
                for (f, v) in burst.iter_mut().zip(verdicts.iter_mut()) {
                    *v = proc.process(f);
                }
            }
            for (v, c) in verdicts.iter().zip(&cases[at..]).take(burst.len()) {
                if !same_kind(*v, c.want) {
                    wrong += 1;
                }
            }
        }
        wrong
    };

    // Warm-up: flows exist, lazily initialised state (if any) is there.
    for _ in 0..3 {
        assert_eq!(pass(now), 0, "warm-up verdicts");
    }

    const ITERATIONS: u32 = 2_000;
    let (wrong, allocs) = count_allocs(|| {
        let mut wrong = 0;
        for i in 0..ITERATIONS {
            // Every 100 iterations the clock jumps past every timeout, so
            // that the next pass creates all its sessions anew.
            if i % 100 == 99 {
                now += 1_000;
            }
            wrong += pass(now);
        }
        wrong
    });
    assert_eq!(wrong, 0, "frames with an unexpected verdict");
    let frames = ITERATIONS as usize * cases.len();
    assert_eq!(
        allocs, 0,
        "the pipeline allocated {allocs} times over {frames} frames in steady state"
    );
}

#[test]
fn counter_sees_allocations() {
    let (_, n) = count_allocs(|| {
        let mut v: Vec<u64> = black_box(Vec::new());
        v.push(1);
        black_box(v)
    });
    assert_eq!(n, 1, "one Vec push is one allocation");
    let (_, n) = count_allocs(|| black_box(Box::new([0u8; 64])));
    assert_eq!(n, 1, "one Box is one allocation");
    let (_, n) = count_allocs(|| black_box(1 + 1));
    assert_eq!(n, 0);
}
