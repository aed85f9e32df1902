//! The per-core poll loop (DPDK l3fwd / xsk_fwd.c style).
//!
//! Each iteration: `rx_burst` on both ports → `process_burst` (decide and
//! rewrite in place) → `tx_burst` (hand frames to the egress TX ring) →
//! `flush` (kick the kernel while TX frames are in flight: copy mode sends at
//! most 32 frames per `sendto`, so a half-sent burst is kicked again on the
//! next iteration rather than left waiting) → completions back to the free
//! list → refill both fill rings.
//!
//! The snapshot is loaded once per iteration (one atomic load); counters are
//! this worker's own. An idle worker backs off to `poll(2)` with a 1 ms
//! timeout after a stretch of empty iterations, so an idle l4lb does not
//! burn a core; under load it never sleeps.

use crate::control::snapshot::Snapshot;
use crate::dataplane::counters::{DropReason, Shared, WorkerStats};
use crate::dataplane::pipeline::{Frames, Meta, Port, Processor, Tables, Verdict};
use crate::dataplane::xsk::{self, XskPair};
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use xsk_rs::FrameDesc;

pub const BURST: usize = 64;
/// Empty iterations before the worker sleeps in poll(2).
const IDLE_SPINS: u32 = 20_000;

pub struct Worker {
    pub id: usize,
    pub xsk: XskPair,
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    pub tables: Arc<Tables>,
    pub stats: Arc<WorkerStats>,
    pub shared: Arc<Shared>,
    pub stop: Arc<AtomicBool>,
    pub clock: fn() -> u32,
}

/// The frames of an RX burst, in the UMEM.
struct UmemFrames<'a> {
    umem: &'a xsk_rs::Umem,
    descs: &'a mut [FrameDesc],
}

impl Frames for UmemFrames<'_> {
    #[inline]
    fn len(&self) -> usize {
        self.descs.len()
    }
    #[inline]
    fn with<R>(&mut self, i: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let mut data = xsk::frame_mut(self.umem, &mut self.descs[i]);
        f(data.contents_mut())
    }
    #[inline]
    fn prefetch(&self, i: usize) {
        if let Some(desc) = self.descs.get(i) {
            if let Some(b) = xsk::frame(self.umem, desc).contents().first() {
                crate::util::prefetch(b);
            }
        }
    }
}

/// Frames waiting for one TX ring.
struct TxBuf {
    descs: Box<[FrameDesc]>,
    len: usize,
}

impl Worker {
    pub fn run(mut self) {
        let mut free = self.xsk.prime();
        let mut rx = [FrameDesc::default(); BURST];
        // The burst pipeline's per-frame state: this worker's own.
        let mut metas = vec![Meta::default(); BURST].into_boxed_slice();
        let mut verdicts = [Verdict::Pass; BURST];
        let mut scratch = [FrameDesc::default(); BURST];
        // Room for two full bursts per egress port: what the TX ring did not
        // take this iteration is retried on the next.
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
        while !self.stop.load(Ordering::Relaxed) {
            let snap = self.snapshot.load();
            let proc = Processor {
                snapshot: &snap,
                tables: &self.tables,
                stats: &self.stats,
                shared: &self.shared,
                now: (self.clock)(),
            };
            let mut work = 0usize;

            for port in [Port::Client, Port::Backend] {
                // rx_burst
                let n = xsk::rx_burst(&mut self.xsk.ports[port as usize], &mut rx);
                if n == 0 {
                    continue;
                }
                work += n;
                WorkerStats::add(&self.stats.core.rx, n as u64);
                // process_burst
                proc.process_burst(
                    &mut UmemFrames {
                        umem: &self.xsk.umem,
                        descs: &mut rx[..n],
                    },
                    &mut metas,
                    &mut verdicts,
                );
                for (desc, verdict) in rx.iter().zip(verdicts).take(n) {
                    match verdict {
                        Verdict::Tx(out) => {
                            let q = &mut txq[out as usize];
                            if q.len < q.descs.len() {
                                q.descs[q.len] = *desc;
                                q.len += 1;
                            } else {
                                self.stats.count_drop(DropReason::TxRingFull);
                                free.push(*desc);
                            }
                        }
                        Verdict::Pass => {
                            // The XDP program passes the kernel's frames;
                            // one that got here cannot be handed back.
                            self.stats.count_drop(DropReason::NotOurs);
                            free.push(*desc);
                        }
                        Verdict::Drop(_) => free.push(*desc),
                    }
                }
            }

            // tx_burst + flush
            for (p, q) in txq.iter_mut().enumerate() {
                let port = &mut self.xsk.ports[p];
                if q.len > 0 {
                    let sent = xsk::tx_produce(port, &q.descs[..q.len]);
                    WorkerStats::add(&self.stats.core.tx, sent as u64);
                    q.descs.copy_within(sent..q.len, 0);
                    q.len -= sent;
                }
                if port.in_flight > 0 {
                    work += 1;
                }
                xsk::flush(port, &mut scratch, &mut free);
            }

            // Refill both fill rings from the free list.
            self.xsk.refill(&mut free);

            if work == 0 {
                idle += 1;
                if idle >= IDLE_SPINS {
                    self.xsk.sleep_until_rx();
                }
            } else {
                idle = 0;
            }
        }
    }
}
