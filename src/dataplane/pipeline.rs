//! The per-frame decision: classify, schedule, record the flow, rewrite.
//!
//! [`Processor::process`] is the whole data path for one frame; the AF_XDP
//! worker, the in-memory ring of the tests and `l4lb replay` all call it, so
//! what is tested offline is what runs live. It allocates nothing, takes no
//! lock, makes no syscall and logs nothing.

use crate::control::snapshot::Snapshot;
use crate::dataplane::counters::{DropReason, WorkerStats};
use crate::dataplane::nat::{rewrite, Side};
use crate::dataplane::packet::{parse, Frame, Parsed};
use crate::table::{FlowKey, FlowTable, FlowValue, Upsert};

/// The two ports of a two-arm (NAT) load balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Port {
    Client = 0,
    Backend = 1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Rewritten in place; transmit on this port.
    Tx(Port),
    /// The kernel's frame (ARP, other ports, the host's own traffic).
    Pass,
    Drop(DropReason),
}

/// What one burst needs: the snapshot loaded for it, the shared flow table,
/// this worker's counters and the coarse clock (seconds).
pub struct Processor<'a> {
    pub snapshot: &'a Snapshot,
    pub flows: &'a FlowTable,
    pub stats: &'a WorkerStats,
    pub now: u32,
}

impl Processor<'_> {
    /// Decides what to do with `frame`, rewriting it in place when it is to
    /// be forwarded. Counts the outcome.
    #[inline]
    pub fn process(&self, frame: &mut [u8]) -> Verdict {
        let v = self.decide(frame);
        let c = &self.stats.core;
        match v {
            Verdict::Tx(Port::Backend) => WorkerStats::add(&c.forwarded, 1),
            Verdict::Tx(Port::Client) => WorkerStats::add(&c.replied, 1),
            Verdict::Pass => WorkerStats::add(&c.passed, 1),
            Verdict::Drop(why) => self.stats.count_drop(why),
        }
        v
    }

    #[inline]
    fn decide(&self, frame: &mut [u8]) -> Verdict {
        let snap = self.snapshot;
        match parse(frame) {
            Frame::NotIp | Frame::Truncated => Verdict::Pass,
            Frame::OtherProto { src, dst } => {
                // ICMP to a VIP is the kernel's; from a backend to a client
                // (an error about a NAT'ed flow) it would need its inner
                // header translated, which l4lb does not do.
                if !snap.is_vip(&dst) && snap.is_backend_host(&src) && !snap.is_local(&dst) {
                    Verdict::Drop(DropReason::Unsupported)
                } else {
                    Verdict::Pass
                }
            }
            Frame::Unusable { src, dst, why } => {
                if snap.is_vip(&dst) || (snap.is_backend_host(&src) && !snap.is_local(&dst)) {
                    Verdict::Drop(why)
                } else {
                    Verdict::Pass
                }
            }
            Frame::L4(p) => {
                if let Some(l) = snap.listener(&p.dst, p.dport, p.proto) {
                    self.forward(frame, &p, l)
                } else if let Some(b) = snap.backend(&p.src, p.sport, p.proto) {
                    if snap.is_local(&p.dst) {
                        Verdict::Pass
                    } else {
                        self.reverse(frame, &p, b)
                    }
                } else if snap.is_backend_host(&p.src) && !snap.is_local(&p.dst) {
                    // A backend host talking to a client from a port that is
                    // no backend: not a flow of ours.
                    Verdict::Drop(DropReason::NoFlow)
                } else {
                    Verdict::Pass
                }
            }
        }
    }

    #[inline]
    fn forward(&self, frame: &mut [u8], p: &Parsed, listener: u32) -> Verdict {
        let snap = self.snapshot;
        if p.ttl <= 1 {
            return Verdict::Drop(DropReason::TtlExceeded);
        }
        let svc = snap.listeners[listener as usize].service;
        let Some(b) = snap.pick(svc, p.src_wire()) else {
            return Verdict::Drop(DropReason::NoBackend);
        };
        let be = &snap.backends[b as usize];
        let Some(mac) = be.mac else {
            return Verdict::Drop(DropReason::NoNeighbour);
        };
        let key = FlowKey {
            proto: p.proto,
            client: p.src,
            client_port: p.sport,
            backend: be.addr16,
            backend_port: be.port,
        };
        let value = FlowValue {
            listener,
            backend: b,
        };
        let c = &self.stats.core;
        match self.flows.upsert(&key, value, self.now) {
            Upsert::Existing => {}
            // The client reused its source port towards another listener of
            // the same service, so the backend sees the same 4-tuple: it can
            // hold only one such connection, and the newest one wins.
            Upsert::Replaced(_) => WorkerStats::add(&c.flows_rebound, 1),
            Upsert::Inserted => WorkerStats::add(&c.flows_created, 1),
            Upsert::Evicted => {
                WorkerStats::add(&c.flows_created, 1);
                WorkerStats::add(&c.flows_evicted, 1);
            }
            // Forward anyway: the client's next packet records the flow.
            Upsert::Busy => {}
        }
        let len = frame.len();
        rewrite(
            frame,
            p,
            Side::Dst,
            &be.addr16,
            be.port,
            &snap.links.backend_if_mac,
            &mac,
        );
        self.stats.listener(listener, len);
        self.stats.backend(b, len);
        Verdict::Tx(Port::Backend)
    }

    #[inline]
    fn reverse(&self, frame: &mut [u8], p: &Parsed, _backend: u32) -> Verdict {
        let snap = self.snapshot;
        let key = FlowKey {
            proto: p.proto,
            client: p.dst,
            client_port: p.dport,
            backend: p.src,
            backend_port: p.sport,
        };
        let Some(v) = self.flows.lookup(&key, self.now) else {
            return Verdict::Drop(DropReason::NoFlow);
        };
        let Some(l) = snap.listeners.get(v.listener as usize) else {
            return Verdict::Drop(DropReason::NoFlow);
        };
        if p.ttl <= 1 {
            return Verdict::Drop(DropReason::TtlExceeded);
        }
        let Some(gw) = snap.links.gateway_mac else {
            return Verdict::Drop(DropReason::NoNeighbour);
        };
        rewrite(
            frame,
            p,
            Side::Src,
            &l.vip16,
            l.port,
            &snap.links.client_if_mac,
            &gw,
        );
        Verdict::Tx(Port::Client)
    }
}
