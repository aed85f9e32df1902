//! The per-frame decision: classify, schedule, record the flow, rewrite.
//!
//! [`Processor::process`] is the whole data path for one frame; the AF_XDP
//! worker, the in-memory ring of the tests and `l4lb replay` all call it, so
//! what is tested offline is what runs live. It allocates nothing, takes no
//! lock, makes no syscall and logs nothing.

use crate::control::snapshot::{SchedState, Snapshot};
use crate::dataplane::counters::{DropReason, Shared, WorkerStats};
use crate::dataplane::nat::{rewrite, Side};
use crate::dataplane::packet::{parse, Frame, Parsed, PROTO_TCP};
use crate::table::{FlowKey, FlowTable, FlowValue, ForwardKey, PersistKey, Upsert};

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

/// The tables every worker shares, and how entries are written to them.
pub struct Tables {
    pub flows: FlowTable,
    /// Session persistence: (service, client address) → backend.
    pub persist: FlowTable,
    /// Idle seconds before a flow is forgotten.
    pub flow_timeout: u32,
    /// Whether a full persistence window evicts its oldest entry (else the
    /// client is scheduled without being recorded).
    pub persist_evict: bool,
}

/// What one burst needs: the snapshot loaded for it, the shared tables,
/// this worker's counters (and, for least-connections, every worker's), and
/// the coarse clock (seconds).
pub struct Processor<'a> {
    pub snapshot: &'a Snapshot,
    pub tables: &'a Tables,
    pub stats: &'a WorkerStats,
    pub shared: &'a Shared,
    pub now: u32,
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

#[inline]
fn tcp_flags(frame: &[u8], p: &Parsed) -> u8 {
    if p.proto == PROTO_TCP {
        frame[p.l4 + 13]
    } else {
        0
    }
}

impl SchedState for Processor<'_> {
    #[inline]
    fn wrr_next(&self, service_id: u16) -> u32 {
        self.stats.wrr_next(service_id)
    }
    fn active(&self, backend_id: u16) -> i64 {
        self.shared.active(backend_id)
    }
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
                } else if snap.backend(&p.src, p.sport, p.proto).is_some() {
                    if snap.is_local(&p.dst) {
                        Verdict::Pass
                    } else {
                        self.reverse(frame, &p)
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

    /// Counts a flow as closed for least-connections (once per flow).
    #[inline]
    fn closed(&self, v: FlowValue) {
        if !v.closed {
            self.stats.conn_closed(v.backend);
        }
    }

    #[inline]
    fn forward(&self, frame: &mut [u8], p: &Parsed, l: u32) -> Verdict {
        let snap = self.snapshot;
        let t = self.tables;
        if p.ttl <= 1 {
            return Verdict::Drop(DropReason::TtlExceeded);
        }
        let le = &snap.listeners[l as usize];
        let svc = le.service;
        let se = &snap.services[svc as usize];
        let flags = tcp_flags(frame, p);
        let fkey = ForwardKey {
            proto: p.proto,
            client: p.src,
            client_port: p.sport,
            vip: p.dst,
            vip_port: p.dport,
        };
        let pkey = PersistKey {
            service: se.id,
            client: p.src,
        };

        // An established flow keeps its backend while that backend is up
        // and still in the service (whatever its weight: 0 drains).
        let mut chosen = None;
        if let Some(v) = t.flows.lookup(&fkey, self.now) {
            let reopened = v.closed && flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            if let Some(b) = snap.backend_of_id(v.backend) {
                if v.listener == le.id && snap.keeps(svc, b) && !reopened {
                    chosen = Some(b);
                }
            }
        }
        let b = match chosen {
            Some(b) => {
                if se.persistence_timeout > 0 {
                    // Every packet refreshes the client's persistence.
                    t.persist.lookup(&pkey, self.now);
                }
                b
            }
            None => match self.new_flow(p, svc, le.id, &fkey, &pkey) {
                Some(b) => b,
                None => return Verdict::Drop(DropReason::NoBackend),
            },
        };
        let be = &snap.backends[b as usize];
        if flags & (TCP_FIN | TCP_RST) != 0 && t.flows.mark_closed(&fkey, self.now) {
            self.stats.conn_closed(be.id);
        }
        let Some(mac) = be.mac else {
            return Verdict::Drop(DropReason::NoNeighbour);
        };
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
        self.stats.listener(le.id, len);
        self.stats.backend(be.id, len);
        Verdict::Tx(Port::Backend)
    }

    /// Chooses a backend for a new flow (persistence first, then the
    /// scheduler) and records the flow. Returns the backend index.
    #[inline(never)]
    fn new_flow(
        &self,
        p: &Parsed,
        svc: u32,
        listener_id: u16,
        fkey: &ForwardKey,
        pkey: &PersistKey,
    ) -> Option<u32> {
        let snap = self.snapshot;
        let t = self.tables;
        let se = &snap.services[svc as usize];
        let c = &self.stats.core;
        let mut chosen = None;
        if se.persistence_timeout > 0 {
            if let Some(v) = t.persist.lookup(pkey, self.now) {
                // Persistence ends when its backend is removed, down or
                // drained; the client is then scheduled afresh.
                if let Some(b) = snap.backend_of_id(v.backend) {
                    if snap.eligible(svc, b) {
                        WorkerStats::add(&c.persist_hits, 1);
                        chosen = Some(b);
                    }
                }
            }
        }
        let b = match chosen {
            Some(b) => b,
            None => {
                let b = snap.schedule(svc, p.src_wire(), self)?;
                if se.persistence_timeout > 0 {
                    let v = FlowValue::new(0, snap.backends[b as usize].id);
                    match t.persist.upsert(
                        pkey,
                        v,
                        self.now,
                        se.persistence_timeout,
                        t.persist_evict,
                    ) {
                        Upsert::Full => WorkerStats::add(&c.persist_full, 1),
                        Upsert::Evicted(_) => {
                            WorkerStats::add(&c.persist_recorded, 1);
                            WorkerStats::add(&c.persist_evicted, 1);
                        }
                        _ => WorkerStats::add(&c.persist_recorded, 1),
                    }
                }
                b
            }
        };
        let be = &snap.backends[b as usize];
        let value = FlowValue::new(listener_id, be.id);
        self.record(t.flows.upsert(fkey, value, self.now, t.flow_timeout, true));
        self.stats.conn_opened(be.id);
        let rkey = FlowKey {
            proto: p.proto,
            client: p.src,
            client_port: p.sport,
            backend: be.addr16,
            backend_port: be.port,
        };
        match t.flows.upsert(&rkey, value, self.now, t.flow_timeout, true) {
            // The client reused its source port towards another listener of
            // the same service, so the backend sees the same 4-tuple: it can
            // hold only one such connection, and the newest one wins.
            Upsert::Replaced(_) => WorkerStats::add(&c.flows_rebound, 1),
            Upsert::Evicted(_) => WorkerStats::add(&c.flows_evicted, 1),
            _ => {}
        }
        Some(b)
    }

    /// Accounts for what a forward-entry upsert displaced.
    #[inline]
    fn record(&self, u: Upsert) {
        let c = &self.stats.core;
        match u {
            Upsert::Inserted(dead) => {
                WorkerStats::add(&c.flows_created, 1);
                if let Some(d) = dead {
                    self.closed(d);
                }
            }
            Upsert::Evicted(old) => {
                WorkerStats::add(&c.flows_created, 1);
                WorkerStats::add(&c.flows_evicted, 1);
                self.closed(old);
            }
            Upsert::Replaced(old) => {
                WorkerStats::add(&c.flows_created, 1);
                self.closed(old);
            }
            // Forward anyway: the client's next packet records the flow.
            Upsert::Existing | Upsert::Full => {}
        }
    }

    #[inline]
    fn reverse(&self, frame: &mut [u8], p: &Parsed) -> Verdict {
        let snap = self.snapshot;
        let key = FlowKey {
            proto: p.proto,
            client: p.dst,
            client_port: p.dport,
            backend: p.src,
            backend_port: p.sport,
        };
        let Some(v) = self.tables.flows.lookup(&key, self.now) else {
            return Verdict::Drop(DropReason::NoFlow);
        };
        let Some(l) = snap.listener_of_id(v.listener) else {
            return Verdict::Drop(DropReason::NoFlow);
        };
        let l = &snap.listeners[l as usize];
        if p.ttl <= 1 {
            return Verdict::Drop(DropReason::TtlExceeded);
        }
        let Some(gw) = snap.links.gateway_mac else {
            return Verdict::Drop(DropReason::NoNeighbour);
        };
        if tcp_flags(frame, p) & (TCP_FIN | TCP_RST) != 0 {
            let fkey = ForwardKey {
                proto: p.proto,
                client: p.dst,
                client_port: p.dport,
                vip: l.vip16,
                vip_port: l.port,
            };
            if self.tables.flows.mark_closed(&fkey, self.now) {
                self.stats.conn_closed(v.backend);
            }
        }
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
