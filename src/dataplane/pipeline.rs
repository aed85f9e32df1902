//! The per-frame decision: classify, schedule, record the flow, rewrite.
//!
//! [`Processor::process`] is the whole data path for one frame; the AF_XDP
//! worker, the in-memory ring of the tests and `l4lb replay` all call it, so
//! what is tested offline is what runs live. It allocates nothing, takes no
//! lock, makes no syscall and logs nothing.

use crate::config::Scheduler;
use crate::control::snapshot::{
    BackendEntry, ListenerEntry, ListenerRef, SchedState, ServiceEntry, Snapshot,
};
use crate::dataplane::counters::{DropReason, Shared, WorkerStats};
use crate::dataplane::icmp::{self, Icmp, Toward};
use crate::dataplane::nat::{rewrite, Side};
use crate::dataplane::packet::{is_martian_source, parse_into, Frame, Parsed, PROTO_TCP};
use crate::sched::client_hash_bytes;
use crate::table::{
    Displaced, FlowKey, FlowTable, FlowValue, ForwardKey, Hint, PersistKey, Probe, TableKey, Upsert,
};
use crate::util::prefetch;

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
    /// Idle seconds before a TCP flow seen closing (FIN or RST) is
    /// forgotten (at most `flow_timeout`).
    pub closed_timeout: u32,
    /// Idle seconds before a TCP flow begun by a SYN, whose client has not
    /// completed the handshake yet, is forgotten (at most `flow_timeout`).
    pub syn_timeout: u32,
    /// Whether a full persistence window evicts its oldest entry (else the
    /// client is scheduled without being recorded).
    pub persist_evict: bool,
}

impl Tables {
    /// The idle timeout of a flow whose entry holds `v`: the SYN timeout
    /// while it is opening, at most the closed timeout once it has been
    /// seen closing. (A reply entry is written with its forward entry's
    /// value, so both expire together.)
    #[inline]
    pub fn flow_timeout_of(&self, v: FlowValue) -> u32 {
        let t = if v.opening {
            self.syn_timeout
        } else {
            self.flow_timeout
        };
        if v.closed {
            t.min(self.closed_timeout)
        } else {
            t
        }
    }
}

/// How many frames ahead of the one being classified the burst pipeline
/// prefetches.
const FRAME_AHEAD: usize = 8;

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

/// What the first stage of the burst pipeline learned about a frame, kept
/// for the last stage: the parse, the listener, and the hashes of the table
/// keys the frame will look up (whose buckets were prefetched).
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    frame: Frame,
    class: Class,
    /// Forward: the forward key and its hash; reverse: the key of the entry
    /// the reply looks up (the forward entry's, or the reply entry's).
    flow: Probe,
    /// Forward: stage 2 found no live entry with the flow's tag (probably
    /// new).
    new: bool,
    /// Forward, new, and no earlier frame of the burst can record the flow
    /// before this one: stage 5 need not look it up again (see
    /// [`Recorded`]).
    fresh: bool,
    /// Forward, probably new, with persistence: stage 3 found no live entry
    /// with the session's tag, and no earlier frame of the burst can record
    /// it: stage 5 need not look the session up.
    no_session: bool,
    /// Forward, probably new, with persistence: the persistence key's
    /// (established packets do not need it, so it is hashed only then).
    persist: Option<Hint>,
    /// Forward, probably new: the reply key's for the backend the
    /// scheduler probably picks (a prefetch target only).
    reply: Option<Hint>,
    /// Forward, probably new, source-IP scheduler: the client's hash, whose
    /// Maglev slot stage 2 prefetched for stage 3's guess.
    client_hash: Option<u64>,
    /// The backend stage 3 picked for that hash: the scheduler's choice,
    /// which stage 5 takes unless the client has a session.
    pick: Option<u32>,
}

/// What the frames of a burst seen so far by stages 2 and 3 may record in
/// stage 5, for the frames after them: a new flow's forward entry and its
/// client's session are looked up again in stage 5 only if an earlier frame
/// may have recorded them since stages 2 and 3 found them absent, as
/// [`Processor::process`] frame after frame would have found them:
/// * a forward entry is recorded only by a frame of its flow, which stage 2
///   found new as well (a frame of a flow found live has its tag, so would
///   see it live too): noted in `flows`;
/// * a session, by a new flow of its client (noted in `sessions`), or by a
///   frame whose flow was found live but whose backend no longer keeps it
///   (or a SYN reopening it), which stage 5 alone can tell: so after any
///   frame of a live flow (`found`), every session is looked up.
///
/// Nothing else brings an absent forward entry or session into the table:
/// reply frames record reply entries only, and a lookup never brings an
/// expired entry back. Another worker recording the same key meanwhile is
/// seen by the insert, as it is when it races the lookup.
#[derive(Default)]
struct Recorded {
    flows: Buckets,
    sessions: Buckets,
    found: bool,
}

/// A set of buckets, by bucket number modulo [`Buckets::BITS`]: one
/// burst's few dozen rarely share a bit (the 64th frame's bucket shares
/// one with an earlier frame's 6 % of the time, and its key is then looked
/// up for nothing).
#[derive(Default)]
struct Buckets([u64; Buckets::WORDS]);

impl Buckets {
    const WORDS: usize = 16;
    const BITS: usize = 64 * Buckets::WORDS;

    /// Adds `h`'s bucket; whether it was not in the set before.
    #[inline(always)]
    fn add(&mut self, h: Hint) -> bool {
        let n = h.bucket() % Buckets::BITS;
        let (word, bit) = (&mut self.0[n / 64], 1u64 << (n % 64));
        let first = *word & bit == 0;
        *word |= bit;
        first
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// To a listener (and its service).
    Forward(ListenerRef),
    /// From a backend (dense index).
    Reverse(u32),
    Other,
}

impl Default for Meta {
    fn default() -> Self {
        Meta {
            frame: Frame::NotIp,
            class: Class::Other,
            flow: Probe::default(),
            new: false,
            fresh: false,
            no_session: false,
            persist: None,
            reply: None,
            client_hash: None,
            pick: None,
        }
    }
}

/// A burst of frames the pipeline rewrites in place: the worker's UMEM
/// descriptors, or a buffer of the benchmarks and tests.
pub trait Frames {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Runs `f` on frame `i`'s bytes.
    fn with<R>(&mut self, i: usize, f: impl FnOnce(&mut [u8]) -> R) -> R;
    /// Starts loading the first cache line of frame `i` (which holds every
    /// header the pipeline reads). A hint: never faults.
    fn prefetch(&self, i: usize);
}

/// Equal-length frames back to back in one buffer.
pub struct Chunks<'a> {
    pub buf: &'a mut [u8],
    pub frame_len: usize,
}

impl Frames for Chunks<'_> {
    #[inline]
    fn len(&self) -> usize {
        self.buf.len() / self.frame_len
    }
    #[inline]
    fn with<R>(&mut self, i: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let at = i * self.frame_len;
        f(&mut self.buf[at..at + self.frame_len])
    }
    #[inline]
    fn prefetch(&self, i: usize) {
        if let Some(b) = self.buf.get(i * self.frame_len) {
            prefetch(b);
        }
    }
}

impl Frames for [&mut [u8]] {
    #[inline]
    fn len(&self) -> usize {
        <[&mut [u8]]>::len(self)
    }
    #[inline]
    fn with<R>(&mut self, i: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        f(self[i])
    }
    #[inline]
    fn prefetch(&self, i: usize) {
        if let Some(b) = self.get(i).and_then(|f| f.first()) {
            prefetch(b);
        }
    }
}

#[inline(always)]
fn forward_key(p: &Parsed) -> ForwardKey {
    ForwardKey {
        proto: p.proto,
        client: p.src,
        client_port: p.sport,
        vip: p.dst,
        vip_port: p.dport,
    }
}

#[inline(always)]
fn persist_key(se: &ServiceEntry, p: &Parsed) -> PersistKey {
    PersistKey {
        service: se.id,
        client: p.src,
    }
}

/// The reply entry of the forward packet `p` once sent to `be`.
#[inline(always)]
fn backend_reply_key(p: &Parsed, be: &BackendEntry) -> FlowKey {
    FlowKey {
        proto: p.proto,
        client: p.src,
        client_port: p.sport,
        backend: be.addr16,
        backend_port: be.port,
    }
}

/// The forward entry a backend's reply `p` belongs to, when `l` is the only
/// listener that reaches the backend ([`Snapshot::sole_listener`]).
#[inline(always)]
fn reply_forward_key(p: &Parsed, l: &ListenerEntry) -> ForwardKey {
    ForwardKey {
        proto: p.proto,
        client: p.dst,
        client_port: p.dport,
        vip: l.vip16,
        vip_port: l.port,
    }
}

#[inline(always)]
fn reply_key(p: &Parsed) -> FlowKey {
    FlowKey {
        proto: p.proto,
        client: p.dst,
        client_port: p.dport,
        backend: p.src,
        backend_port: p.sport,
    }
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
    /// be forwarded. Counts the outcome. (One frame: the burst pipeline's
    /// stages back to back.)
    #[inline]
    pub fn process(&self, frame: &mut [u8]) -> Verdict {
        let mut m = Meta::default();
        self.classify(frame, &mut m);
        self.finish(frame, &m)
    }

    /// Processes a burst in stages, DPDK style, so that the table cache
    /// misses of different frames overlap instead of queueing:
    /// 1. parse and classify every frame (prefetching frames 8 ahead),
    ///    hash its table keys, prefetch their bucket headers;
    /// 2. from each header, prefetch the slot the key is probably in (and
    ///    remember it for the lookup), or the slot its insert will take
    ///    (remembered for the insert);
    ///    for a probably new flow, hash its persistence key and prefetch
    ///    that bucket, and under the source-IP scheduler hash the client
    ///    and prefetch its Maglev slot;
    /// 3. prefetch the persistence slot; unless the client is probably a
    ///    returning one, ask the source-IP scheduler (kept for stage 5:
    ///    its answer depends only on the snapshot and the client) and, if
    ///    that backend's flows keep reply entries, prefetch the reply
    ///    key's bucket;
    /// 4. prefetch the reply entry's slot (3 and 4 only run when stage 2
    ///    found a probably new flow in the burst);
    /// 5. decide, record and rewrite each frame, in arrival order.
    ///
    /// Only stage 5 decides anything, frame after frame, so the outcome is
    /// exactly [`Processor::process`] on each frame in turn (two frames of
    /// one new flow in a burst get one backend); stages 1-4 warm the cache
    /// and compute nothing that depends on an earlier frame's outcome. One
    /// thing they do know ahead: which keys stages 2 and 3 found absent
    /// that no earlier frame of the burst can record ([`Recorded`]). Stage
    /// 5 does not look for those again (a lookup that would miss: 5 % of
    /// a new session's instructions). `metas` and `verdicts` hold at least
    /// `frames.len()` entries.
    #[inline]
    pub fn process_burst<F: Frames + ?Sized>(
        &self,
        frames: &mut F,
        metas: &mut [Meta],
        verdicts: &mut [Verdict],
    ) {
        let n = frames.len();
        let metas = &mut metas[..n];
        // The kernel wrote the frames on another CPU (copy mode): each
        // frame's first read is a miss. Keep FRAME_AHEAD of them in flight.
        for i in 0..n.min(FRAME_AHEAD) {
            frames.prefetch(i);
        }
        for (i, m) in metas.iter_mut().enumerate() {
            frames.prefetch(i + FRAME_AHEAD);
            frames.with(i, |f| self.classify(f, m));
        }
        let mut new = 0;
        let mut rec = Recorded::default();
        for m in metas.iter_mut() {
            self.lookahead(m, &mut rec);
            new += m.new as usize;
        }
        // Stages 3 and 4 are for new flows only: a burst of established
        // flows skips their passes.
        if new > 0 {
            for m in metas.iter_mut() {
                if m.new {
                    self.guess(m, &mut rec);
                }
            }
            for m in metas.iter() {
                if let Some(mut h) = m.reply {
                    self.tables.flows.prefetch_slot(&mut h, self.now);
                }
            }
        }
        // Forwarded frames are counted once per burst, in registers
        // meanwhile; every other verdict as it comes.
        let (mut forwarded, mut replied) = (0, 0);
        for (i, (m, v)) in metas.iter().zip(verdicts.iter_mut()).enumerate() {
            *v = frames.with(i, |f| self.decide(f, m));
            match *v {
                Verdict::Tx(Port::Backend) => forwarded += 1,
                Verdict::Tx(Port::Client) => replied += 1,
                other => self.count(other),
            }
        }
        let c = &self.stats.core;
        WorkerStats::add(&c.forwarded, forwarded);
        WorkerStats::add(&c.replied, replied);
    }

    /// Stage 1: parse, find the listener, hash the keys, prefetch. Writes
    /// `m` in place: returned by value, the `Meta` (100 bytes then) was copied out
    /// with wide loads right after being written with narrow stores, which
    /// stalls store forwarding (measured: a third of the stage).
    #[inline]
    pub fn classify(&self, frame: &[u8], m: &mut Meta) {
        let snap = self.snapshot;
        let t = self.tables;
        parse_into(frame, &mut m.frame);
        m.class = Class::Other;
        m.new = false;
        m.fresh = false;
        m.no_session = false;
        m.persist = None;
        m.reply = None;
        m.client_hash = None;
        m.pick = None;
        if let Frame::L4(p) = &m.frame {
            if let Some(l) = snap.listener(&p.dst, p.dport, p.proto) {
                m.class = Class::Forward(l);
                m.flow = t.flows.probe(&forward_key(p));
                t.flows.prefetch(m.flow.hint);
            } else if let Some(b) = snap.backend(&p.src, p.sport, p.proto) {
                m.class = Class::Reverse(b);
                m.flow = self.reply_probe(p, b);
                t.flows.prefetch(m.flow.hint);
            }
        }
    }

    /// Stage 2: prefetch slots; hash a new flow's persistence key and
    /// client. `rec`: what the burst's earlier frames may record.
    #[inline]
    fn lookahead(&self, m: &mut Meta, rec: &mut Recorded) {
        let t = self.tables;
        match (m.class, &m.frame) {
            (Class::Forward(l), Frame::L4(p)) => {
                if t.flows.prefetch_slot(&mut m.flow.hint, self.now) {
                    rec.found = true;
                    return;
                }
                m.new = true;
                m.fresh = rec.flows.add(m.flow.hint);
                // Settled by stage 3 (with persistence).
                m.no_session = !rec.found;
                let snap = self.snapshot;
                let svc = l.service();
                let se = &snap.services[svc as usize];
                if se.persistence_timeout > 0 {
                    let h = t.persist.hint(&persist_key(se, p).words());
                    t.persist.prefetch(h);
                    m.persist = Some(h);
                }
                // Only the source-IP scheduler can be asked ahead without
                // side effects (round robin moves a cursor).
                if se.scheduler == Scheduler::WeightedSourceIp {
                    let h = client_hash_bytes(p.src_wire());
                    snap.prefetch_pick(svc, h);
                    m.client_hash = Some(h);
                }
            }
            (Class::Reverse(_), _) => {
                t.flows.prefetch_slot(&mut m.flow.hint, self.now);
            }
            _ => {}
        }
    }

    /// Stage 3, for probably new flows: prefetch the persistence slot, and
    /// unless the client probably has a session, guess its backend.
    #[inline]
    fn guess(&self, m: &mut Meta, rec: &mut Recorded) {
        let t = self.tables;
        let (Class::Forward(l), Frame::L4(p)) = (m.class, &m.frame) else {
            return;
        };
        if let Some(h) = &mut m.persist {
            let first = rec.sessions.add(*h);
            if t.persist.prefetch_slot(h, self.now) {
                // A returning client: its backend is in the slot being
                // loaded; no guess.
                m.no_session = false;
                return;
            }
            m.no_session &= first;
        } else {
            m.no_session = false;
        }
        let snap = self.snapshot;
        let svc = l.service();
        if let Some(h) = m.client_hash {
            m.pick = snap.pick_hashed(svc, h);
            // Only a backend that several listeners share gets a reply
            // entry.
            if let Some(b) = m.pick.filter(|&b| snap.sole_listener(b).is_none()) {
                let be = &snap.backends[b as usize];
                let rkey = backend_reply_key(p, be);
                let h = t.flows.hint(&rkey.words());
                t.flows.prefetch(h);
                m.reply = Some(h);
            }
        }
    }

    /// Stage 5 for one frame: decides what to do with it, rewrites it in
    /// place when it is to be forwarded, and counts the outcome.
    #[inline]
    pub fn finish(&self, frame: &mut [u8], m: &Meta) -> Verdict {
        let v = self.decide(frame, m);
        self.count(v);
        v
    }

    /// Counts a verdict.
    #[inline(always)]
    fn count(&self, v: Verdict) {
        let c = &self.stats.core;
        match v {
            Verdict::Tx(Port::Backend) => WorkerStats::add(&c.forwarded, 1),
            Verdict::Tx(Port::Client) => WorkerStats::add(&c.replied, 1),
            Verdict::Pass => WorkerStats::add(&c.passed, 1),
            Verdict::Drop(why) => self.stats.count_drop(why),
        }
    }

    /// The two directions of a flow, inlined into the burst loop; every
    /// other frame goes to [`Processor::decide_other`], out of line.
    #[inline(always)]
    fn decide(&self, frame: &mut [u8], m: &Meta) -> Verdict {
        match (&m.frame, m.class) {
            (Frame::L4(p), Class::Forward(l)) => self.forward(frame, p, l, m),
            (Frame::L4(p), Class::Reverse(b)) if !self.snapshot.is_for_host(&p.dst) => {
                self.reverse(frame, p, b, m)
            }
            _ => self.decide_other(frame, m),
        }
    }

    #[inline(never)]
    fn decide_other(&self, frame: &mut [u8], m: &Meta) -> Verdict {
        let snap = self.snapshot;
        match m.frame {
            Frame::NotIp | Frame::Truncated => Verdict::Pass,
            Frame::OtherProto { src, dst } => {
                // ICMP errors about flows are translated both ways; other
                // ICMP to a VIP is the kernel's.
                if snap.is_vip(&dst) {
                    self.icmp(frame, Toward::Server)
                } else if snap.is_backend_host(&src) && !snap.is_for_host(&dst) {
                    self.icmp(frame, Toward::Client)
                } else {
                    Verdict::Pass
                }
            }
            Frame::Unusable { src, dst, why } => {
                if snap.is_vip(&dst) || (snap.is_backend_host(&src) && !snap.is_for_host(&dst)) {
                    Verdict::Drop(why)
                } else {
                    Verdict::Pass
                }
            }
            Frame::L4(ref p) => match m.class {
                // A server's traffic to this host (its health check
                // answers, say) is the kernel's.
                Class::Reverse(_) => Verdict::Pass,
                Class::Other if snap.is_backend_host(&p.src) && !snap.is_for_host(&p.dst) => {
                    // A backend host talking to a client from a port
                    // that is no backend: not a flow of ours.
                    Verdict::Drop(DropReason::NoFlow)
                }
                _ => Verdict::Pass,
            },
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
    fn forward(&self, frame: &mut [u8], p: &Parsed, l: ListenerRef, m: &Meta) -> Verdict {
        let snap = self.snapshot;
        let t = self.tables;
        if p.ttl <= 1 {
            return Verdict::Drop(DropReason::TtlExceeded);
        }
        let le = &snap.listeners[l.index() as usize];
        let svc = l.service();
        let flags = tcp_flags(frame, p);
        let fprobe = &m.flow;

        // An established flow keeps its backend while that backend is up
        // and still in the service (whatever its weight: 0 drains). A flow
        // stage 2 found new, that no earlier frame of the burst records,
        // is not looked for again.
        let b = 'kept: {
            let found = if m.fresh {
                None
            } else {
                t.flows.lookup_probe(fprobe, self.now)
            };
            if let Some((v, touched)) = found {
                if let Some(b) = snap.backend_of_id(v.backend) {
                    if v.listener == le.id && snap.keeps(svc, b) {
                        if !(v.closed || v.opening) {
                            if touched {
                                self.refresh(p, svc, b, v);
                            }
                            break 'kept b;
                        }
                        if self.settle(p, fprobe, svc, b, v, flags, touched) {
                            break 'kept b;
                        }
                    }
                }
            }
            // A SYN without ACK opens a TCP flow.
            match self.open(p, le, m, flags & (TCP_SYN | TCP_ACK) == TCP_SYN) {
                Ok(b) => b,
                Err(why) => return Verdict::Drop(why),
            }
        };
        let be = &snap.backends[b as usize];
        if flags & (TCP_FIN | TCP_RST) != 0 {
            self.closing(p, fprobe, b);
        }
        let Some(mac) = &be.mac else {
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
            mac,
        );
        self.stats.listener(le.id, len);
        self.stats.backend(be.id, len);
        Verdict::Tx(Port::Backend)
    }

    /// A FIN or RST from the client of the flow `fprobe` to backend `b`:
    /// marks the forward entry closed (counted once, for
    /// least-connections) and, if the backend is shared, the reply entry
    /// too, so that both live only `tcp_closed_timeout` from now on. Out
    /// of line: once or twice per connection.
    #[cold]
    #[inline(never)]
    fn closing(&self, p: &Parsed, fprobe: &Probe, b: u32) {
        let snap = self.snapshot;
        let t = self.tables;
        let be = &snap.backends[b as usize];
        if t.flows
            .mark_closed_probe(fprobe, be.id, self.now, t.closed_timeout)
        {
            self.stats.conn_closed(be.id);
        }
        if snap.sole_listener(b).is_none() {
            let rkey = backend_reply_key(p, be);
            t.flows
                .mark_closed(&rkey, be.id, self.now, t.closed_timeout);
        }
    }

    /// A client packet (TCP `flags`) on a flow that is closed or still
    /// opening (`v`, to backend `b` of service `svc`, which keeps it):
    /// whether the flow keeps its backend. A SYN without ACK reopens a
    /// closed flow as a new one (false). The client's first packet after
    /// its SYN that has no SYN, FIN or RST (the ACK completing the
    /// handshake) gives an opening flow the full idle timeout. Out of line:
    /// a few packets per connection.
    #[cold]
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn settle(
        &self,
        p: &Parsed,
        fprobe: &Probe,
        svc: u32,
        b: u32,
        v: FlowValue,
        flags: u8,
        touched: bool,
    ) -> bool {
        if v.closed && flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            return false;
        }
        if v.opening && !v.closed && flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 {
            self.handshake_done(p, fprobe, b, v);
        } else if touched {
            self.refresh(p, svc, b, v);
        }
        true
    }

    /// The client completed the handshake of the opening flow `v` to
    /// backend `b`: from now on the flow and its reply entry (if the
    /// backend is shared) have the full idle timeout.
    fn handshake_done(&self, p: &Parsed, fprobe: &Probe, b: u32, v: FlowValue) {
        let snap = self.snapshot;
        let t = self.tables;
        let v = FlowValue {
            opening: false,
            ..v
        };
        let timeout = t.flow_timeout_of(v);
        // The entry is there (just looked up): this replaces its value,
        // unless it left the table in between (another worker evicted it,
        // or the sweep found it expired), its flow then counted closed.
        // Written anew, the flow is open again, and is counted so: its
        // close counts it closed once more.
        let u = t.flows.upsert_probe(fprobe, v, self.now, timeout, true);
        if matches!(u, Upsert::Inserted(_) | Upsert::Evicted(_)) {
            self.stats.conn_opened(v.backend);
        }
        self.displaced(u);
        if snap.sole_listener(b).is_none() {
            let rkey = backend_reply_key(p, &snap.backends[b as usize]);
            self.displaced(t.flows.upsert(&rkey, v, self.now, timeout, true));
        }
    }

    /// Accounts for the entry an upsert took the slot of, if it took
    /// another's: an eviction is counted, and a forward entry lost (live
    /// or expired unseen by the sweep) ends its flow for
    /// least-connections, whatever kind of entry took its slot. (A reply
    /// entry taking a forward entry's slot, or the other way round, is
    /// common in a full bucket: counting by the new entry's kind lost
    /// closes and invented others.)
    #[inline]
    fn displaced(&self, u: Upsert) {
        match u {
            Upsert::Evicted(old) => {
                WorkerStats::add(&self.stats.core.flows_evicted, 1);
                self.ended(old);
            }
            Upsert::Inserted(Some(old)) => self.ended(old),
            _ => {}
        }
    }

    /// A flow whose entry `d` left the table ended (if it was a forward
    /// entry: a flow is counted by that one).
    #[inline]
    fn ended(&self, d: Displaced) {
        if d.forward {
            self.closed(d.value);
        }
    }

    /// An established flow's timer moved to a new second (once a second
    /// per flow): keep what lives alongside it alive too. Out of line, so
    /// that the established path it branches off stays short.
    #[cold]
    #[inline(never)]
    fn refresh(&self, p: &Parsed, svc: u32, b: u32, v: FlowValue) {
        let snap = self.snapshot;
        let t = self.tables;
        let se = &snap.services[svc as usize];
        let be = &snap.backends[b as usize];
        if snap.sole_listener(b).is_none() {
            // The reply entry (or bring it back if it was evicted), so that
            // a server silent for a while can still answer. (A backend of
            // one listener has none: its replies use the forward entry.)
            // It holds the forward entry's value, closed or not, and so
            // its timeout.
            let rkey = backend_reply_key(p, be);
            self.displaced(
                t.flows
                    .upsert(&rkey, v, self.now, t.flow_timeout_of(v), true),
            );
        }
        if se.persistence_timeout > 0 {
            // The client's persistence lives as long as its flows:
            // refreshed whenever a flow's timer moves to a new second (the
            // clock's resolution, so no packet in between could move it
            // further).
            t.persist.lookup(&persist_key(se, p), self.now);
        }
    }

    /// A new flow (or one whose backend may no longer keep it) to listener
    /// `le`: chooses its backend and records it (the recording out of
    /// line). `syn`: the packet is a SYN without ACK, so the flow is
    /// recorded as opening.
    #[inline(always)]
    fn open(&self, p: &Parsed, le: &ListenerEntry, m: &Meta, syn: bool) -> Result<u32, DropReason> {
        // No flow (nor session, nor least-connections count) for a source
        // no router would forward from: only here, since every flow
        // starts here.
        if is_martian_source(&p.src, p.v6) {
            return Err(DropReason::BadSource);
        }
        let snap = self.snapshot;
        let t = self.tables;
        let svc = le.service;
        let se = &snap.services[svc as usize];
        // Hashed in stage 2 for probably new flows.
        let pprobe = match m.persist {
            Some(h) => Probe::new(&persist_key(se, p), h),
            None => t.persist.probe(&persist_key(se, p)),
        };
        let Some((b, persisted)) = self.choose(p, svc, &pprobe, m) else {
            return Err(DropReason::NoBackend);
        };
        // Nothing is recorded for a flow that cannot be sent.
        if snap.backends[b as usize].mac.is_none() {
            return Err(DropReason::NoNeighbour);
        }
        self.record_new(p, se, le.id, syn, b, m, &pprobe, persisted);
        Ok(b)
    }

    /// Chooses a backend for a new flow: the client's persisted backend if
    /// it may still take clients, else the scheduler's choice (stage 3's
    /// pick when it made one). Returns the backend index and whether it
    /// came from persistence. A session stages 2 and 3 found absent (and
    /// no earlier frame of the burst records) is not looked for again.
    #[inline]
    fn choose(&self, p: &Parsed, svc: u32, pprobe: &Probe, m: &Meta) -> Option<(u32, bool)> {
        let snap = self.snapshot;
        let se = &snap.services[svc as usize];
        if se.persistence_timeout > 0 && !m.no_session {
            if let Some((v, _)) = self.tables.persist.lookup_probe(pprobe, self.now) {
                // Persistence ends when its backend is removed, down or
                // drained; the client is then scheduled afresh.
                if let Some(b) = snap.backend_of_id(v.backend) {
                    if snap.eligible(svc, b) {
                        WorkerStats::add(&self.stats.core.persist_hits, 1);
                        return Some((b, true));
                    }
                }
            }
        }
        if let Some(b) = m.pick {
            return Some((b, false));
        }
        snap.schedule_with(svc, p.src_wire(), m.client_hash, self)
            .map(|b| (b, false))
    }

    /// Records a new flow to backend `b`: persistence (when newly
    /// scheduled), the forward and reply entries (for listener
    /// `listener_id`, `opening` if the packet was a SYN without ACK, with
    /// the timeout that implies; `m`: the frame's probes and hints), and
    /// the opened connection. The session and the forward entry are
    /// inserted without a search for them first
    /// ([`FlowTable::insert_probe`]): their lookups almost always just
    /// missed. (When one found an entry that no longer holds, a backend
    /// gone down say, the insert finds that entry and replaces it, as an
    /// upsert does, at the cost of one more try.)
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn record_new(
        &self,
        p: &Parsed,
        se: &ServiceEntry,
        listener_id: u16,
        opening: bool,
        b: u32,
        m: &Meta,
        pprobe: &Probe,
        persisted: bool,
    ) {
        let t = self.tables;
        let c = &self.stats.core;
        let be = &self.snapshot.backends[b as usize];
        if se.persistence_timeout > 0 && !persisted {
            let v = FlowValue::new(0, be.id);
            match t.persist.insert_probe(
                pprobe,
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
        let value = FlowValue {
            opening,
            ..FlowValue::new(listener_id, be.id)
        };
        let timeout = t.flow_timeout_of(value);
        let stored = t
            .flows
            .insert_probe(&m.flow, value, self.now, timeout, true);
        self.record(stored);
        if !matches!(stored, Upsert::Full | Upsert::Existing) {
            // Only a stored flow can later be counted closed; one found
            // already stored (another worker recorded it a moment ago,
            // while this one scheduled it) was counted by that worker.
            self.stats.conn_opened(be.id);
        }
        if self.snapshot.sole_listener(b).is_some() {
            // Its replies find the forward entry.
            return;
        }
        let rkey = backend_reply_key(p, be);
        // Stage 3 hashed the reply key of the backend it picked.
        let rprobe = match m.reply {
            Some(h) if m.pick == Some(b) => Probe::new(&rkey, h),
            _ => t.flows.probe(&rkey),
        };
        match t
            .flows
            .upsert_probe(&rprobe, value, self.now, timeout, true)
        {
            // The client reused its source port towards another listener of
            // the same service, so the backend sees the same 4-tuple: it can
            // hold only one such connection, and the newest one wins. (Not
            // a SYN reopening this very flow after it closed.)
            Upsert::Replaced(old) if !old.same_target(value) => {
                WorkerStats::add(&c.flows_rebound, 1)
            }
            u => self.displaced(u),
        }
    }

    /// Accounts for what a forward-entry upsert displaced.
    #[inline]
    fn record(&self, u: Upsert) {
        let c = &self.stats.core;
        match u {
            Upsert::Inserted(_) | Upsert::Evicted(_) => {
                WorkerStats::add(&c.flows_created, 1);
                self.displaced(u);
            }
            // The flow's own entry, to another listener or backend.
            Upsert::Replaced(old) => {
                WorkerStats::add(&c.flows_created, 1);
                self.closed(old);
            }
            // Forward anyway: the client's next packet records the flow.
            Upsert::Existing | Upsert::Full => {}
        }
    }

    #[inline]
    fn reverse(&self, frame: &mut [u8], p: &Parsed, b: u32, m: &Meta) -> Verdict {
        let snap = self.snapshot;
        let t = self.tables;
        let be = &snap.backends[b as usize];
        let Some((l, touched)) = self.reply_listener(p, b, &m.flow) else {
            return Verdict::Drop(DropReason::NoFlow);
        };
        if p.ttl <= 1 {
            return Verdict::Drop(DropReason::TtlExceeded);
        }
        let Some(gw) = &snap.links.gateway_mac else {
            return Verdict::Drop(DropReason::NoNeighbour);
        };
        if tcp_flags(frame, p) & (TCP_FIN | TCP_RST) != 0 {
            // A backend of one listener: the frame's probe is the forward
            // entry's already. A shared one: the probe is the reply
            // entry's, which closes with the forward entry.
            let closed = if snap.sole_listener(b).is_some() {
                t.flows
                    .mark_closed_probe(&m.flow, be.id, self.now, t.closed_timeout)
            } else {
                t.flows
                    .mark_closed_probe(&m.flow, be.id, self.now, t.closed_timeout);
                t.flows
                    .mark_closed(&reply_forward_key(p, l), be.id, self.now, t.closed_timeout)
            };
            if closed {
                self.stats.conn_closed(be.id);
            }
        } else if touched {
            self.reply_refresh(p, b, l);
        }
        rewrite(
            frame,
            p,
            Side::Src,
            &l.vip16,
            l.port,
            &snap.links.client_if_mac,
            gw,
        );
        Verdict::Tx(Port::Client)
    }
}

impl Processor<'_> {
    /// Backend `b`'s reply `p` moved its flow's timer to a new second (once
    /// a second per flow): the idle timeouts count silence in both
    /// directions, so a flow whose server keeps talking stays on that
    /// server, and its client keeps its session. `l`: the flow's listener.
    /// Out of line, as [`Processor::refresh`].
    #[cold]
    #[inline(never)]
    fn reply_refresh(&self, p: &Parsed, b: u32, l: &ListenerEntry) {
        let snap = self.snapshot;
        let t = self.tables;
        if snap.sole_listener(b).is_none() {
            // The reply named the reply entry; the forward entry is
            // refreshed here. (A backend of one listener's reply found
            // the forward entry itself.)
            t.flows.lookup(&reply_forward_key(p, l), self.now);
        }
        let se = &snap.services[l.service as usize];
        if se.persistence_timeout > 0 {
            let key = PersistKey {
                service: se.id,
                client: p.dst,
            };
            t.persist.lookup(&key, self.now);
        }
    }

    /// The probe of the flow-table entry that backend `b`'s reply `p`
    /// names: the forward entry when one listener alone reaches `b`, else
    /// the reply entry.
    #[inline(always)]
    fn reply_probe(&self, p: &Parsed, b: u32) -> Probe {
        let snap = self.snapshot;
        match snap.sole_listener(b) {
            Some(l) => self
                .tables
                .flows
                .probe(&reply_forward_key(p, &snap.listeners[l as usize])),
            None => self.tables.flows.probe(&reply_key(p)),
        }
    }

    /// The listener whose flow backend `b`'s reply `p` belongs to (`probe`
    /// from [`Processor::reply_probe`]), and whether the entry found moved
    /// its timer to a new second (see [`Processor::reply_refresh`]); `None`
    /// if there is no such flow.
    #[inline(always)]
    fn reply_listener(&self, p: &Parsed, b: u32, probe: &Probe) -> Option<(&ListenerEntry, bool)> {
        let snap = self.snapshot;
        let t = self.tables;
        let be = &snap.backends[b as usize];
        match snap.sole_listener(b) {
            // The backend's only listener: the reply names its forward
            // entry, and looking it up refreshes it.
            Some(l) => {
                let l = &snap.listeners[l as usize];
                let (v, touched) = t.flows.lookup_probe(probe, self.now)?;
                // The flow must be this backend's (it moves to another
                // while its backend is down) and this listener's.
                (v.backend == be.id && v.listener == l.id).then_some((l, touched))
            }
            // Shared by several listeners: the reply entry says which.
            None => match t.flows.lookup_probe(probe, self.now) {
                Some((v, touched)) => {
                    let l = snap.listener_of_id(v.listener)?;
                    Some((&snap.listeners[l as usize], touched))
                }
                None => self.reply_without_entry(p, b, probe).map(|l| (l, false)),
            },
        }
    }

    /// An ICMP message to a VIP (`Toward::Server`) or from a server host to
    /// a client (`Toward::Client`). Errors about a live flow are translated
    /// (see `dataplane::icmp`) and sent on; errors about a listener's
    /// packet with no flow are dropped; other messages to a VIP (errors
    /// about the host's own traffic included) are the kernel's; other
    /// messages from a server to a client are dropped.
    #[cold]
    #[inline(never)]
    fn icmp(&self, frame: &mut [u8], toward: Toward) -> Verdict {
        let e = match icmp::parse(frame) {
            Icmp::Error(e) => e,
            Icmp::NotError => {
                return match toward {
                    Toward::Server => Verdict::Pass,
                    Toward::Client => Verdict::Drop(DropReason::Unsupported),
                }
            }
            // A quote of neither TCP nor UDP sent from a VIP is the host's
            // own (its ICMP, say): as the steering program decides.
            Icmp::Bad(DropReason::Unsupported) if toward == Toward::Server => return Verdict::Pass,
            Icmp::Bad(why) => return Verdict::Drop(why),
        };
        if e.ttl <= 1 {
            return Verdict::Drop(DropReason::TtlExceeded);
        }
        let snap = self.snapshot;
        let verdict = match toward {
            Toward::Server => {
                // The quote is a reply, VIP:port -> client; its flow's
                // forward entry is client -> VIP:port. From a port no
                // listener has, it is the host's own traffic (the kernel's,
                // as the steering program decides).
                let Some(l) = snap.listener(&e.src, e.sport, e.proto) else {
                    return Verdict::Pass;
                };
                let le = &snap.listeners[l.index() as usize];
                let key = ForwardKey {
                    proto: e.proto,
                    client: e.dst,
                    client_port: e.dport,
                    vip: e.src,
                    vip_port: e.sport,
                };
                // Peeked: anyone on the client's path may send an error
                // to a VIP, and that must not keep the flow alive. (An
                // error from the server itself refreshes the flow below,
                // as any packet of the server's does.)
                let Some(b) = self
                    .tables
                    .flows
                    .peek(&key, self.now)
                    .filter(|v| v.listener == le.id)
                    .and_then(|v| snap.backend_of_id(v.backend))
                else {
                    return Verdict::Drop(DropReason::NoFlow);
                };
                let be = &snap.backends[b as usize];
                let Some(mac) = &be.mac else {
                    return Verdict::Drop(DropReason::NoNeighbour);
                };
                let links = &snap.links;
                icmp::translate(
                    frame,
                    &e,
                    toward,
                    &be.addr16,
                    be.port,
                    &links.backend_if_mac,
                    mac,
                );
                Verdict::Tx(Port::Backend)
            }
            Toward::Client => {
                // The quote is the client's packet, client -> server:port:
                // the flow is the one the server's reply would belong to.
                let Some(b) = snap.backend(&e.dst, e.dport, e.proto) else {
                    return Verdict::Drop(DropReason::NoFlow);
                };
                let reply = Parsed {
                    v6: e.v6,
                    l3: 0,
                    l4: 0,
                    proto: e.proto,
                    src: e.dst,
                    dst: e.src,
                    sport: e.dport,
                    dport: e.sport,
                    ttl: e.ttl,
                };
                let probe = self.reply_probe(&reply, b);
                let Some((l, _)) = self.reply_listener(&reply, b, &probe) else {
                    return Verdict::Drop(DropReason::NoFlow);
                };
                let Some(gw) = &snap.links.gateway_mac else {
                    return Verdict::Drop(DropReason::NoNeighbour);
                };
                let links = &snap.links;
                icmp::translate(
                    frame,
                    &e,
                    toward,
                    &l.vip16,
                    l.port,
                    &links.client_if_mac,
                    gw,
                );
                Verdict::Tx(Port::Client)
            }
        };
        WorkerStats::add(&self.stats.core.icmp, 1);
        verdict
    }

    /// A reply of a backend that several listeners share, without a reply
    /// entry: it was evicted, or the flow began while the backend had one
    /// listener (before a reload), when flows record no reply entry. The
    /// forward entries decide: the first listener reaching the backend
    /// whose forward entry for this client holds a live flow to it. Found,
    /// the reply entry is recorded again. (Only this miss path pays for
    /// the extra lookups, one per listener of the backend.)
    #[inline(never)]
    fn reply_without_entry(&self, p: &Parsed, b: u32, reply: &Probe) -> Option<&ListenerEntry> {
        let snap = self.snapshot;
        let t = self.tables;
        let be = &snap.backends[b as usize];
        for &l in snap.listeners_reaching(b) {
            let l = &snap.listeners[l as usize];
            let key = reply_forward_key(p, l);
            // Peeked, not refreshed: this client's flow on another
            // listener, or on another server, must not be kept alive by
            // this server's packet.
            let Some(v) = t.flows.peek(&key, self.now) else {
                continue;
            };
            if v.backend == be.id && v.listener == l.id {
                t.flows.lookup(&key, self.now);
                // The forward entry's value, closed or not, and its timeout.
                self.displaced(t.flows.upsert_probe(
                    reply,
                    v,
                    self.now,
                    t.flow_timeout_of(v),
                    true,
                ));
                return Some(l);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    //! The decisions the offline fixtures (tests/replay.rs) cannot reach with
    //! the demo config: IPv6 listeners, this host's own addresses, an unknown
    //! gateway MAC, and flow expiry on the caller's clock.

    use super::*;
    use crate::config::Config;
    use crate::control::ids::Ids;
    use crate::control::snapshot::{Inputs, Links};
    use crate::dataplane::packet::parse;
    use crate::util::{map_v4, Mac};
    use etherparse::{Icmpv6Type, PacketBuilder};
    use std::net::{IpAddr, Ipv6Addr};
    use std::sync::Arc;

    const CLIENT_IF: Mac = [0x02, 0, 0, 0, 0, 0x01];
    const BACKEND_IF: Mac = [0x02, 0, 0, 0, 0, 0x02];
    const GATEWAY: Mac = [0x02, 0, 0, 0, 0x0c, 0x01];
    const SERVER_MAC: Mac = [0x02, 0, 0, 0, 0x0b, 0x01];

    const CONFIG: &str = r#"
[instance]
name = "unit"
client_interface = "c0"
backend_interface = "b0"
client_gateway = "198.18.0.2"
flow_idle_timeout = 10
tcp_closed_timeout = 3
tcp_syn_timeout = 2

[[listener]]
name = "web"
vip = "198.18.100.1"
protocol = "tcp"
port = 80
backend_service = "web"

[[listener]]
name = "web6"
vip = "2001:2::100"
protocol = "tcp"
port = 80
backend_service = "web6"

[[listener]]
name = "dns6"
vip = "2001:2::100"
protocol = "udp"
port = 53
backend_service = "dns6"

[[backend_service]]
name = "web"
protocol = "tcp"

  [[backend_service.server]]
  address = "198.18.2.11"
  port = 8080

[[backend_service]]
name = "web6"
protocol = "tcp"

  [[backend_service.server]]
  address = "2001:2::11"
  port = 8080

[[backend_service]]
name = "dns6"
protocol = "udp"

  [[backend_service.server]]
  address = "2001:2::11"
  port = 9053
"#;

    /// This host's own address on the backend side (health checks come
    /// from it, so the servers answer it).
    const LOCAL: &str = "198.18.2.1";

    /// A data plane of one worker over `CONFIG`.
    struct Rig {
        snapshot: Snapshot,
        tables: Tables,
        stats: Arc<WorkerStats>,
        shared: Shared,
    }

    /// The snapshot of config `text`, with ids from `ids` (kept across
    /// reloads, as the control plane does).
    fn snapshot(text: &str, ids: &mut Ids, gateway_known: bool) -> (Snapshot, Config) {
        snapshot_with_down(text, ids, gateway_known, &[])
    }

    /// [`snapshot`] with the servers at the addresses `down` failing their
    /// health checks.
    fn snapshot_with_down(
        text: &str,
        ids: &mut Ids,
        gateway_known: bool,
        down: &[&str],
    ) -> (Snapshot, Config) {
        let config = Config::from_str(text, "unit.toml").expect("valid config");
        let local: [IpAddr; 1] = [LOCAL.parse().unwrap()];
        let snapshot = Snapshot::build(
            ids,
            &Inputs {
                config: &config,
                generation: 1,
                links: Links {
                    client_if_mac: CLIENT_IF,
                    backend_if_mac: BACKEND_IF,
                    gateway_mac: gateway_known.then_some(GATEWAY),
                },
                local: &local,
                mac_of: &|_| Some(SERVER_MAC),
                is_up: &|a, _, _, _| !down.iter().any(|d| d.parse::<IpAddr>().unwrap() == *a),
                previous: None,
            },
        )
        .expect("snapshot");
        (snapshot, config)
    }

    impl Rig {
        fn new(gateway_known: bool) -> Rig {
            Rig::with_ids(gateway_known, &mut Ids::default())
        }

        /// A rig whose snapshot takes its ids from `ids`, so that a test
        /// can build the next snapshot of a reload with the same ids.
        fn with_ids(gateway_known: bool, ids: &mut Ids) -> Rig {
            Rig::with_config(CONFIG, gateway_known, ids)
        }

        fn with_config(text: &str, gateway_known: bool, ids: &mut Ids) -> Rig {
            let (snapshot, config) = snapshot(text, ids, gateway_known);
            let stats = Arc::new(WorkerStats::new());
            Rig {
                snapshot,
                tables: Tables {
                    flows: FlowTable::new(1024),
                    persist: FlowTable::new(1024),
                    flow_timeout: config.instance.flow_idle_timeout,
                    closed_timeout: config.instance.tcp_closed_timeout,
                    syn_timeout: config.instance.tcp_syn_timeout,
                    persist_evict: true,
                },
                shared: Shared::new(vec![Arc::clone(&stats)]),
                stats,
            }
        }

        /// The same rig with a flow table of one bucket (eight slots), so
        /// that a ninth entry has to evict one.
        fn one_bucket(mut self) -> Rig {
            self.tables.flows = FlowTable::new(crate::table::flow::WINDOW);
            self
        }

        fn process(&self, frame: &mut [u8], now: u32) -> Verdict {
            Processor {
                snapshot: &self.snapshot,
                tables: &self.tables,
                stats: &self.stats,
                shared: &self.shared,
                now,
            }
            .process(frame)
        }
    }

    /// A TCP (SYN-ACK) or UDP packet between two endpoints of one family.
    #[derive(Clone, Copy)]
    struct Pkt {
        eth: (Mac, Mac),
        src: (&'static str, u16),
        dst: (&'static str, u16),
        ttl: u8,
        udp: bool,
    }

    impl Pkt {
        fn build(&self) -> Vec<u8> {
            let payload = b"odd-length payload";
            let eth = PacketBuilder::ethernet2(self.eth.0, self.eth.1);
            let ip = match (
                self.src.0.parse::<IpAddr>().unwrap(),
                self.dst.0.parse::<IpAddr>().unwrap(),
            ) {
                (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), self.ttl),
                (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), self.ttl),
                _ => panic!("mixed families"),
            };
            let mut out = Vec::new();
            if self.udp {
                ip.udp(self.src.1, self.dst.1)
                    .write(&mut out, payload)
                    .unwrap();
            } else {
                ip.tcp(self.src.1, self.dst.1, 7, 1000)
                    .syn()
                    .ack(1)
                    .write(&mut out, payload)
                    .unwrap();
            }
            out
        }

        /// [`Pkt::build`] of an IPv4 TCP packet with its flags replaced by
        /// `flags` (the checksum is left stale: it is not looked at).
        fn build_with_flags(&self, flags: u8) -> Vec<u8> {
            let mut f = self.build();
            f[14 + 20 + 13] = flags;
            f
        }

        fn from_client(src: (&'static str, u16), dst: (&'static str, u16)) -> Pkt {
            Pkt {
                eth: (GATEWAY, CLIENT_IF),
                src,
                dst,
                ttl: 64,
                udp: false,
            }
        }

        fn from_server(src: (&'static str, u16), dst: (&'static str, u16)) -> Pkt {
            Pkt {
                eth: (SERVER_MAC, BACKEND_IF),
                src,
                dst,
                ttl: 64,
                udp: false,
            }
        }

        fn udp(self) -> Pkt {
            Pkt { udp: true, ..self }
        }

        /// After the forward NAT to `server`.
        fn to_server(self, server: (&'static str, u16)) -> Pkt {
            Pkt {
                eth: (BACKEND_IF, SERVER_MAC),
                dst: server,
                ttl: self.ttl - 1,
                ..self
            }
        }

        /// After the reverse NAT from `vip`.
        fn to_client(self, vip: (&'static str, u16)) -> Pkt {
            Pkt {
                eth: (CLIENT_IF, GATEWAY),
                src: vip,
                ttl: self.ttl - 1,
                ..self
            }
        }
    }

    /// Processes `input` and checks the verdict and the resulting frame
    /// (`None`: unchanged).
    fn expect(rig: &Rig, now: u32, input: Pkt, verdict: Verdict, output: Option<Pkt>) {
        let mut frame = input.build();
        assert_eq!(rig.process(&mut frame, now), verdict);
        let want = output.unwrap_or(input).build();
        assert!(frame == want, "\n got  {frame:02x?}\n want {want:02x?}");
    }

    /// Processes each IPv4 TCP packet, with its flags replaced, at its time
    /// and checks its verdict: `(now, packet, flags, verdict)`.
    fn expect_with_flags(rig: &Rig, steps: &[(u32, Pkt, u8, Verdict)]) {
        for &(now, pkt, flags, verdict) in steps {
            let mut frame = pkt.build_with_flags(flags);
            assert_eq!(rig.process(&mut frame, now), verdict, "{now} {flags:#x}");
        }
    }

    /// `server`'s reply to each client at its time: sent on from `vip` when
    /// the verdict is a reply, else left as it was: `(now, client,
    /// verdict)`.
    fn expect_replies(
        rig: &Rig,
        server: (&'static str, u16),
        vip: (&'static str, u16),
        steps: &[(u32, (&'static str, u16), Verdict)],
    ) {
        let rev = Verdict::Tx(Port::Client);
        for &(now, client, verdict) in steps {
            let reply = Pkt::from_server(server, client);
            let out = (verdict == rev).then(|| reply.to_client(vip));
            expect(rig, now, reply, verdict, out);
        }
    }

    const VIP6: (&str, u16) = ("2001:2::100", 80);
    const SERVER6: (&str, u16) = ("2001:2::11", 8080);
    const CLIENT6: (&str, u16) = ("2001:2::7", 40000);

    #[test]
    fn ipv6_tcp_flow_is_rewritten_both_ways_with_the_hop_limit_decremented() {
        let rig = Rig::new(true);
        let syn = Pkt::from_client(CLIENT6, VIP6);
        let reply = Pkt::from_server(SERVER6, CLIENT6);
        let to_server = Some(syn.to_server(SERVER6));
        expect(&rig, 1, syn, Verdict::Tx(Port::Backend), to_server);
        let to_client = Some(reply.to_client(VIP6));
        expect(&rig, 1, reply, Verdict::Tx(Port::Client), to_client);
    }

    #[test]
    fn ipv6_udp_flow_is_rewritten_both_ways() {
        let rig = Rig::new(true);
        let vip = ("2001:2::100", 53);
        let server = ("2001:2::11", 9053);
        let query = Pkt::from_client(CLIENT6, vip).udp();
        let answer = Pkt::from_server(server, CLIENT6).udp();
        let forwarded = Some(query.to_server(server));
        expect(&rig, 1, query, Verdict::Tx(Port::Backend), forwarded);
        let replied = Some(answer.to_client(vip));
        expect(&rig, 1, answer, Verdict::Tx(Port::Client), replied);
    }

    #[test]
    fn a_client_address_no_router_forwards_from_opens_no_flow() {
        let rig = Rig::new(true);
        let v4 = ("198.18.100.1", 80);
        let martians4 = [
            "0.1.2.3",
            "127.0.0.1",
            "169.254.1.1",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
        ];
        let martians6 = ["::", "::1", "fe80::7", "ff02::1"];
        // TCP to both web listeners, UDP to dns6.
        let tries = (martians4.iter().map(|&a| (a, v4, false)))
            .chain(martians6.iter().map(|&a| (a, VIP6, false)))
            .chain(martians6.iter().map(|&a| (a, ("2001:2::100", 53), true)));
        for (src, vip, udp) in tries {
            let p = Pkt {
                udp,
                ..Pkt::from_client((src, 40000), vip)
            };
            expect(&rig, 1, p, Verdict::Drop(DropReason::BadSource), None);
        }
        assert_eq!(rig.stats.drops(DropReason::BadSource), 14);
        assert_eq!(rig.tables.flows.count_live(1), 0, "no flow recorded");
        assert_eq!(rig.tables.persist.count_live(1), 0, "no session either");
        // Ordinary clients of both families still get through.
        for (client, vip, server) in [
            (("198.18.4.7", 40000), v4, ("198.18.2.11", 8080)),
            (CLIENT6, VIP6, SERVER6),
        ] {
            let syn = Pkt::from_client(client, vip);
            let forwarded = Some(syn.to_server(server));
            expect(&rig, 1, syn, Verdict::Tx(Port::Backend), forwarded);
        }
    }

    #[test]
    fn ipv6_hop_limit_1_to_the_vip_is_dropped() {
        let rig = Rig::new(true);
        let syn = Pkt {
            ttl: 1,
            ..Pkt::from_client(CLIENT6, VIP6)
        };
        expect(&rig, 1, syn, Verdict::Drop(DropReason::TtlExceeded), None);
    }

    #[test]
    fn ipv6_extension_header_to_the_vip_is_dropped_as_unsupported() {
        let rig = Rig::new(true);
        let mut frame = Pkt::from_client(CLIENT6, VIP6).build();
        frame[14 + 6] = 0; // next header: hop-by-hop options
        let before = frame.clone();
        let v = rig.process(&mut frame, 1);
        assert_eq!(v, Verdict::Drop(DropReason::Unsupported));
        assert_eq!(frame, before);
        assert_eq!(rig.stats.drops(DropReason::Unsupported), 1);
    }

    #[test]
    fn ipv6_with_an_ipv4_mapped_address_or_udp_without_checksum_is_malformed() {
        let rig = Rig::new(true);
        // To the IPv4 VIP in its mapped form, and from an IPv4 client's
        // mapped form to the IPv6 VIP: neither may pass for the other
        // family's traffic.
        let to_mapped = Pkt::from_client(CLIENT6, ("::ffff:198.18.100.1", 80));
        let from_mapped = Pkt::from_client(("::ffff:198.18.4.7", 40000), VIP6);
        let mut no_sum = Pkt::from_client(CLIENT6, ("2001:2::100", 53)).udp().build();
        no_sum[14 + 40 + 6..14 + 40 + 8].fill(0);
        for mut frame in [to_mapped.build(), from_mapped.build(), no_sum] {
            let before = frame.clone();
            let v = rig.process(&mut frame, 1);
            assert_eq!(v, Verdict::Drop(DropReason::Malformed));
            assert_eq!(frame, before);
        }
        assert_eq!(rig.stats.drops(DropReason::Malformed), 3);
        assert_eq!(rig.tables.flows.count_live(1), 0);
    }

    /// A FIN or RST closes a connection for least-connections exactly once,
    /// whichever side sends it first (here: to a server of one listener,
    /// whose replies use the forward entry's probe).
    #[test]
    fn fin_or_rst_from_either_side_closes_a_connection_once() {
        let rig = Rig::new(true);
        let server = ("198.18.2.11", 8080);
        let vip = ("198.18.100.1", 80);
        let id = rig.snapshot.backends[0].id;
        for (port, closer_is_client, flags) in [
            (40000, true, TCP_FIN | TCP_ACK),
            (40001, false, TCP_FIN | TCP_ACK),
            (40002, false, TCP_RST),
        ] {
            let client = ("198.18.4.7", port);
            let syn = Pkt::from_client(client, vip);
            assert_eq!(rig.process(&mut syn.build(), 1), Verdict::Tx(Port::Backend));
            assert_eq!(rig.shared.active(id), 1, "{port}: open");
            let closer = if closer_is_client {
                syn
            } else {
                Pkt::from_server(server, client)
            };
            for _ in 0..2 {
                let v = rig.process(&mut closer.build_with_flags(flags), 1);
                assert!(matches!(v, Verdict::Tx(_)), "{port}: {v:?}");
                assert_eq!(rig.shared.active(id), 0, "{port}: closed once");
            }
        }
    }

    /// ICMP errors about a flow are translated both ways, byte for byte as
    /// if the endpoint had sent them through the VIP; about no flow they
    /// are dropped; an echo request to a VIP is the kernel's.
    #[test]
    fn icmp_errors_about_a_flow_are_translated_both_ways() {
        let v4 = (
            ("198.18.4.7", 40000),
            ("198.18.100.1", 80),
            ("198.18.2.11", 8080),
        );
        let v6 = (CLIENT6, ("2001:2::100", 53), ("2001:2::11", 9053));
        for ((client, vip, server), udp, router) in
            [(v4, false, "198.18.0.9"), (v6, true, "2001:2::9")]
        {
            let rig = Rig::new(true);
            let pkt = |p: Pkt| if udp { p.udp() } else { p };
            let ip_of = |p: Pkt| p.build()[14..].to_vec();
            let first = pkt(Pkt::from_client(client, vip));
            let reply = pkt(Pkt::from_server(server, client));

            // The server refuses the client's packet as it received it.
            let refused = |quote: &[u8]| {
                icmp::error_frame(
                    (SERVER_MAC, BACKEND_IF),
                    server.0,
                    client.0,
                    64,
                    false,
                    quote,
                )
            };
            let mut early = refused(&ip_of(first.to_server(server)));
            assert_eq!(
                rig.process(&mut early, 1),
                Verdict::Drop(DropReason::NoFlow),
                "no flow yet"
            );

            expect(
                &rig,
                1,
                first,
                Verdict::Tx(Port::Backend),
                Some(first.to_server(server)),
            );
            let mut f = refused(&ip_of(first.to_server(server)));
            assert_eq!(rig.process(&mut f, 1), Verdict::Tx(Port::Client));
            // The client hears it from the VIP, about the packet it sent
            // (as the server saw it: TTL 63).
            let sent = Pkt { ttl: 63, ..first };
            let want = icmp::error_frame(
                (CLIENT_IF, GATEWAY),
                vip.0,
                client.0,
                63,
                false,
                &ip_of(sent),
            );
            assert!(f == want, "\n got  {f:02x?}\n want {want:02x?}");

            // A router on the client's side cannot forward the server's
            // reply as the client would have received it.
            let mut too_big = icmp::error_frame(
                (GATEWAY, CLIENT_IF),
                router,
                vip.0,
                64,
                true,
                &ip_of(reply.to_client(vip)),
            );
            assert_eq!(rig.process(&mut too_big, 1), Verdict::Tx(Port::Backend));
            let sent = Pkt { ttl: 63, ..reply };
            let want = icmp::error_frame(
                (BACKEND_IF, SERVER_MAC),
                router,
                server.0,
                63,
                true,
                &ip_of(sent),
            );
            assert!(too_big == want, "\n got  {too_big:02x?}\n want {want:02x?}");
            assert_eq!(
                rig.stats
                    .core
                    .icmp
                    .load(std::sync::atomic::Ordering::Relaxed),
                2
            );

            // About another client port: no flow.
            let other = pkt(Pkt::from_client((client.0, 40001), vip));
            let mut f = refused(&ip_of(other.to_server(server)));
            assert_eq!(rig.process(&mut f, 1), Verdict::Drop(DropReason::NoFlow));

            // To the VIP about a listener's reply of no flow: dropped. About
            // the host's own traffic from the VIP (a port no listener has,
            // or its ICMP): the kernel's, untouched.
            let too_big_about = |quote: &[u8]| {
                icmp::error_frame((GATEWAY, CLIENT_IF), router, vip.0, 64, true, quote)
            };
            let stray = pkt(Pkt::from_server(server, (client.0, 40001)));
            let mut f = too_big_about(&ip_of(stray.to_client(vip)));
            assert_eq!(rig.process(&mut f, 1), Verdict::Drop(DropReason::NoFlow));
            let own = pkt(Pkt::from_client((vip.0, 22), client));
            let mut f = too_big_about(&ip_of(own));
            let before = f.clone();
            assert_eq!(rig.process(&mut f, 1), Verdict::Pass, "the host's port 22");
            assert_eq!(f, before);
            // The same quote made ICMP (its protocol / next header field).
            let v6 = vip.0.contains(':');
            let mut echo_reply = ip_of(own);
            echo_reply[if v6 { 6 } else { 9 }] = if v6 { 58 } else { 1 };
            let mut f = too_big_about(&echo_reply);
            assert_eq!(rig.process(&mut f, 1), Verdict::Pass, "the host's ICMP");
        }

        // An echo request to a VIP stays the kernel's.
        let rig = Rig::new(true);
        let mut echo = Vec::new();
        PacketBuilder::ethernet2(GATEWAY, CLIENT_IF)
            .ipv4([198, 18, 4, 7], [198, 18, 100, 1], 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut echo, b"ping")
            .unwrap();
        assert_eq!(rig.process(&mut echo, 1), Verdict::Pass);
    }

    /// A server resolving this host's IPv6 address sends a neighbour
    /// solicitation from its own address to a solicited-node multicast
    /// group: the kernel's, or the server can never answer anything.
    #[test]
    fn server_traffic_to_a_group_address_is_the_kernels() {
        let rig = Rig::new(true);
        let mut ns = Vec::new();
        let server: Ipv6Addr = SERVER6.0.parse().unwrap();
        let group: Ipv6Addr = "ff02::1:ff00:1".parse().unwrap();
        PacketBuilder::ethernet2(SERVER_MAC, [0x33, 0x33, 0xff, 0, 0, 1])
            .ipv6(server.octets(), group.octets(), 255)
            .icmpv6(Icmpv6Type::Unknown {
                type_u8: 135,
                code_u8: 0,
                bytes5to8: [0; 4],
            })
            .write(&mut ns, &[0; 16])
            .unwrap();
        assert_eq!(rig.process(&mut ns, 1), Verdict::Pass);
        // From a server's port, to a group: not a reply of a flow.
        for dst in [
            ("ff02::fb", 5353),
            ("224.0.0.251", 5353),
            ("255.255.255.255", 68),
        ] {
            let src = if dst.0.contains(':') {
                SERVER6
            } else {
                ("198.18.2.11", 8080)
            };
            expect(
                &rig,
                1,
                Pkt::from_server(src, dst).udp(),
                Verdict::Pass,
                None,
            );
        }
        // The same to a client is still dropped.
        let mut to_client = ns.clone();
        to_client[38..54].copy_from_slice(&CLIENT6.0.parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(
            rig.process(&mut to_client, 1),
            Verdict::Drop(DropReason::Unsupported)
        );
        assert_eq!(rig.stats.drops(DropReason::Unsupported), 1);
    }

    #[test]
    fn server_traffic_to_this_host_is_the_kernels() {
        let rig = Rig::new(true);
        let server = ("198.18.2.11", 8080);
        let to_local = Pkt::from_server(server, (LOCAL, 45000));
        expect(&rig, 1, to_local, Verdict::Pass, None);
        let other_port = Pkt::from_server(("198.18.2.11", 22), (LOCAL, 45000));
        expect(&rig, 1, other_port, Verdict::Pass, None);
        // The same from another port to a client is no flow of ours.
        let to_client = Pkt::from_server(("198.18.2.11", 22), ("198.18.4.7", 45000));
        expect(&rig, 1, to_client, Verdict::Drop(DropReason::NoFlow), None);

        // ICMP: to this host the kernel's, to a client untranslatable.
        let mut icmp = Vec::new();
        PacketBuilder::ethernet2(SERVER_MAC, BACKEND_IF)
            .ipv4([198, 18, 2, 11], [198, 18, 2, 1], 64)
            .icmpv4_echo_reply(1, 1)
            .write(&mut icmp, b"")
            .unwrap();
        assert_eq!(rig.process(&mut icmp.clone(), 1), Verdict::Pass);
        icmp[30..34].copy_from_slice(&[198, 18, 4, 7]);
        assert_eq!(
            rig.process(&mut icmp, 1),
            Verdict::Drop(DropReason::Unsupported)
        );

        // A broken frame: to this host the kernel's, to a client dropped.
        let mut cut = to_local.build();
        cut.truncate(14 + 20 + 10);
        cut[17] = 30; // total length: the TCP header is cut
        assert_eq!(rig.process(&mut cut.clone(), 1), Verdict::Pass);
        cut[30..34].copy_from_slice(&[198, 18, 4, 7]);
        assert_eq!(
            rig.process(&mut cut, 1),
            Verdict::Drop(DropReason::Malformed)
        );
    }

    /// A flow to a server of one listener records no reply entry. When a
    /// reload puts a second listener in front of that server's service, the
    /// server's replies still find the flow (through its forward entry), and
    /// the reply entry is recorded then.
    #[test]
    fn a_flow_begun_before_its_server_was_shared_is_answered_after_the_reload() {
        let mut ids = Ids::default();
        let mut rig = Rig::with_ids(true, &mut ids);
        let client = ("198.18.4.7", 40000);
        let vip = ("198.18.100.1", 80);
        let server = ("198.18.2.11", 8080);
        let syn = Pkt::from_client(client, vip);
        expect(
            &rig,
            1,
            syn,
            Verdict::Tx(Port::Backend),
            Some(syn.to_server(server)),
        );
        assert_eq!(rig.tables.flows.count_live(1), 1, "no reply entry");

        (rig.snapshot, _) = snapshot(&shared_config(), &mut ids, true);
        let web = rig
            .snapshot
            .backend(&map_v4([198, 18, 2, 11]), 8080, PROTO_TCP);
        assert_eq!(rig.snapshot.sole_listener(web.unwrap()), None, "now shared");
        let reply = Pkt::from_server(server, client);
        expect(
            &rig,
            2,
            reply,
            Verdict::Tx(Port::Client),
            Some(reply.to_client(vip)),
        );
        assert_eq!(rig.tables.flows.count_live(2), 2, "the reply entry is back");
        // A client with no flow still gets nothing.
        let stranger = Pkt::from_server(server, ("198.18.4.8", 40000));
        expect(&rig, 2, stranger, Verdict::Drop(DropReason::NoFlow), None);
    }

    /// Opens `n` TCP flows at `now` (SYNs from 198.18.4.7, ports 40000
    /// on, to the web VIP), each forwarded to 198.18.2.11:8080; returns
    /// the clients.
    fn open_flows(rig: &Rig, n: u16, now: u32) -> Vec<(&'static str, u16)> {
        let clients: Vec<_> = (0..n).map(|i| ("198.18.4.7", 40000 + i)).collect();
        for &client in &clients {
            let syn = Pkt::from_client(client, ("198.18.100.1", 80));
            let out = syn.to_server(("198.18.2.11", 8080));
            expect(rig, now, syn, Verdict::Tx(Port::Backend), Some(out));
        }
        clients
    }

    /// A full flow table makes room by evicting the entry closest to
    /// expiry, and every eviction is counted: here the table is one bucket
    /// of eight slots. A flow begun before its server was shared brings its
    /// reply entry back (refresh) by evicting one; a new flow to the shared
    /// server evicts two (its forward and reply entries).
    #[test]
    fn every_entry_evicted_from_a_full_flow_table_is_counted() {
        use std::sync::atomic::Ordering::Relaxed;
        let mut ids = Ids::default();
        let mut rig = Rig::with_ids(true, &mut ids).one_bucket();
        let vip = ("198.18.100.1", 80);
        let server = ("198.18.2.11", 8080);
        let fwd = Verdict::Tx(Port::Backend);
        // Eight flows, one entry each (the server is not shared yet).
        let clients = open_flows(&rig, 8, 100);
        let c = &rig.stats.core;
        assert_eq!(rig.tables.flows.count_live(100), 8);
        assert_eq!(c.flows_created.load(Relaxed), 8);
        assert_eq!(c.flows_evicted.load(Relaxed), 0);

        (rig.snapshot, _) = snapshot(&shared_config(), &mut ids, true);
        // The first flow's timer moves to a new second: its reply entry is
        // brought back, over the second flow's entry (the one closest to
        // expiry, first in the bucket).
        let first = Pkt::from_client(clients[0], vip);
        expect(&rig, 101, first, fwd, Some(first.to_server(server)));
        let c = &rig.stats.core;
        assert_eq!(
            c.flows_evicted.load(Relaxed),
            1,
            "the reply entry's eviction"
        );
        assert_eq!(c.flows_created.load(Relaxed), 8, "no new flow");
        let reply = Pkt::from_server(server, clients[0]);
        expect(
            &rig,
            101,
            reply,
            Verdict::Tx(Port::Client),
            Some(reply.to_client(vip)),
        );
        // A new flow to the now shared server takes two entries, both by
        // eviction.
        let new = Pkt::from_client(("198.18.4.8", 40000), vip);
        expect(&rig, 101, new, fwd, Some(new.to_server(server)));
        assert_eq!(c.flows_evicted.load(Relaxed), 3);
        assert_eq!(c.flows_created.load(Relaxed), 9);
        assert_eq!(rig.tables.flows.count_live(101), 8, "still full");
        // The second flow's entry was the one evicted first: its next
        // packet is a new flow again (and evicts in turn).
        let second = Pkt::from_client(clients[1], vip);
        expect(&rig, 101, second, fwd, Some(second.to_server(server)));
        assert_eq!(c.flows_created.load(Relaxed), 10);
        assert_eq!(c.flows_evicted.load(Relaxed), 5);
    }

    /// [`CONFIG`] with a second listener in front of service `web`: its
    /// server is shared, and its flows take a reply entry too.
    fn shared_config() -> String {
        format!(
            "{CONFIG}
[[listener]]
name = \"web-alt\"
vip = \"198.18.100.2\"
protocol = \"tcp\"
port = 80
backend_service = \"web\"
"
        )
    }

    /// Least-connections count of the server at `addr`.
    fn active(rig: &Rig, addr: &str) -> i64 {
        let a: IpAddr = addr.parse().unwrap();
        let b = rig
            .snapshot
            .backends
            .iter()
            .find(|b| b.address == a)
            .unwrap();
        rig.shared.active(b.id)
    }

    /// The control plane's sweep over the whole flow table at `now`.
    fn sweep_all(rig: &Rig, now: u32) {
        use std::sync::atomic::Ordering::Relaxed;
        let n = rig.tables.flows.capacity();
        rig.tables.flows.sweep_dead_forward(0, n, now, &mut |v| {
            rig.shared.swept[v.backend as usize].fetch_add(1, Relaxed);
        });
    }

    /// A reply entry that evicts another flow's forward entry ends that
    /// flow for least-connections: once every flow has expired and been
    /// swept, the server counts no connection.
    #[test]
    fn a_reply_entry_evicting_a_flow_counts_that_flow_closed() {
        let mut ids = Ids::default();
        let mut rig = Rig::with_ids(true, &mut ids).one_bucket();
        let vip = ("198.18.100.1", 80);
        let server = ("198.18.2.11", 8080);
        let fwd = Verdict::Tx(Port::Backend);
        let clients = open_flows(&rig, 8, 100);
        assert_eq!(active(&rig, server.0), 8);
        (rig.snapshot, _) = snapshot(&shared_config(), &mut ids, true);
        // The first flow's reply entry comes back over the second flow's
        // forward entry: the second flow is gone.
        let first = Pkt::from_client(clients[0], vip);
        expect(&rig, 101, first, fwd, Some(first.to_server(server)));
        assert_eq!(active(&rig, server.0), 7, "seven flows left");
        sweep_all(&rig, 200);
        assert_eq!(active(&rig, server.0), 0, "every flow ended");
    }

    /// A new flow's forward entry written over an expired reply entry
    /// ends no flow: the reply entry's flow is counted by its forward
    /// entry alone.
    #[test]
    fn a_flow_written_over_a_dead_reply_entry_counts_no_flow_closed() {
        let mut ids = Ids::default();
        let mut rig = Rig::with_config(&shared_config(), true, &mut ids).one_bucket();
        let vip = ("198.18.100.1", 80);
        let server = ("198.18.2.11", 8080);
        let fwd = Verdict::Tx(Port::Backend);
        let clients = open_flows(&rig, 4, 100);
        assert_eq!(rig.tables.flows.count_live(100), 8, "two entries a flow");
        // The server is no longer shared: the flows live on by their
        // forward entries, and their reply entries expire at 110.
        (rig.snapshot, _) = snapshot(CONFIG, &mut ids, true);
        for &client in &clients {
            let p = Pkt::from_client(client, vip);
            expect(&rig, 105, p, fwd, Some(p.to_server(server)));
        }
        let new = Pkt::from_client(("198.18.4.8", 40000), vip);
        expect(&rig, 111, new, fwd, Some(new.to_server(server)));
        assert_eq!(rig.tables.flows.count_live(111), 5);
        assert_eq!(active(&rig, server.0), 5, "five flows open");
        sweep_all(&rig, 300);
        assert_eq!(active(&rig, server.0), 0, "every flow ended");
    }

    /// Two workers that see the first packets of the same new flows at
    /// the same time (one client's SYN retransmitted onto another queue,
    /// say) record each flow once, and least-connections counts it once:
    /// the worker that finds the flow already recorded by the other one
    /// opened nothing.
    #[test]
    fn a_flow_two_workers_open_at_once_is_counted_once() {
        let mut rig = Rig::new(true);
        rig.tables.flows = FlowTable::new(1 << 16);
        let other = Arc::new(WorkerStats::new());
        rig.shared = Shared::new(vec![Arc::clone(&rig.stats), Arc::clone(&other)]);
        let vip = ("198.18.100.1", 80);
        let flows = 3000u16;
        let frames: Vec<Vec<u8>> = (0..flows)
            .map(|i| Pkt::from_client(("198.18.4.7", 10000 + i), vip).build())
            .collect();
        let barrier = std::sync::Barrier::new(2);
        let start = std::time::Instant::now();
        std::thread::scope(|s| {
            for stats in [&rig.stats, &other] {
                let (rig, frames, barrier) = (&rig, &frames, &barrier);
                s.spawn(move || {
                    let p = Processor {
                        snapshot: &rig.snapshot,
                        tables: &rig.tables,
                        stats,
                        shared: &rig.shared,
                        now: 100,
                    };
                    for f in frames {
                        // Both at the same flow at once; bounded in time.
                        barrier.wait();
                        if start.elapsed().as_secs() < 20 {
                            p.process(&mut f.clone());
                        }
                    }
                });
            }
        });
        let live = rig.tables.flows.count_live(100) as i64;
        assert!(live > 0);
        assert_eq!(active(&rig, "198.18.2.11"), live, "one count a flow");
    }

    /// A flow whose forward entry another worker evicts (counting it
    /// closed) between the lookup of the client's handshake-completing ACK
    /// and its write-back is recorded again by that write-back, and counted
    /// opened again: once every flow has closed, the server counts none
    /// active (not fewer than none).
    #[test]
    fn a_handshake_completed_while_another_worker_evicts_its_flow_is_counted_once() {
        // One bucket: the other worker's every insert evicts a live entry.
        let mut rig = Rig::new(true).one_bucket();
        let other = Arc::new(WorkerStats::new());
        rig.shared = Shared::new(vec![Arc::clone(&rig.stats), Arc::clone(&other)]);
        let vip = ("198.18.100.1", 80);
        let flows = 50_000u32;
        let pkt = |i: u32| Pkt::from_client(("198.18.4.7", 1024 + i as u16), vip);
        let done = std::sync::atomic::AtomicBool::new(false);
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        let start = std::time::Instant::now();
        let worker = |stats| Processor {
            snapshot: &rig.snapshot,
            tables: &rig.tables,
            stats,
            shared: &rig.shared,
            now: 100,
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                let p = worker(&rig.stats);
                for i in 0..flows {
                    // Bounded in time too: a loaded machine ends it early.
                    if start.elapsed().as_secs() >= 5 {
                        break;
                    }
                    p.process(&mut pkt(i).build_with_flags(TCP_SYN));
                    p.process(&mut pkt(i).build_with_flags(TCP_ACK));
                }
                done.store(true, relaxed);
            });
            s.spawn(|| {
                // Entries of other clients, closed (so counted neither
                // opened nor closed) and outliving the opening flows, which
                // are thus the ones evicted, each counted closed.
                let p = worker(&other);
                let value = FlowValue {
                    closed: true,
                    ..FlowValue::new(1, 1)
                };
                let mut key = ForwardKey {
                    proto: 6,
                    client: map_v4([198, 18, 5, 1]),
                    client_port: 0,
                    vip: map_v4([198, 18, 100, 1]),
                    vip_port: 80,
                };
                while !done.load(relaxed) {
                    key.client_port = key.client_port.wrapping_add(1);
                    p.displaced(rig.tables.flows.upsert(&key, value, 100, 60, true));
                }
            });
        });
        for i in 0..flows {
            rig.process(&mut pkt(i).build_with_flags(TCP_FIN | TCP_ACK), 100);
        }
        assert_eq!(active(&rig, "198.18.2.11"), 0, "every flow closed");
    }

    /// A burst in which a client's live flow is moved off its server that
    /// went down (recording the client's session anew: it had lost its
    /// session) and then the client opens a new flow: the new flow follows
    /// the session just recorded, as frame after frame, although stage 3
    /// found the client without a session. (Round robin: scheduled again,
    /// the new flow would take the next server.)
    #[test]
    fn a_burst_sends_a_new_flow_to_the_session_an_earlier_frame_recorded() {
        let config = format!(
            "{CONFIG}
[[listener]]
name = \"rr\"
vip = \"198.18.100.3\"
protocol = \"udp\"
port = 53
backend_service = \"rr\"

[[backend_service]]
name = \"rr\"
protocol = \"udp\"
scheduler = \"weighted_round_robin\"
persistence_timeout = 300
{}",
            ["198.18.2.21", "198.18.2.22", "198.18.2.23"]
                .map(|a| format!(
                    "  [[backend_service.server]]\n  address = \"{a}\"\n  port = 9053\n"
                ))
                .concat()
        );
        let vip = ("198.18.100.3", 53);
        let old = Pkt::from_client(("198.18.4.7", 40000), vip).udp();
        let new = Pkt::from_client(("198.18.4.7", 40001), vip).udp();
        // Frame after frame (`process`), then as one burst.
        let mut outs = Vec::new();
        for burst in [false, true] {
            let mut ids = Ids::default();
            let mut rig = Rig::with_config(&config, true, &mut ids);
            let mut first = old.build();
            assert_eq!(rig.process(&mut first, 100), Verdict::Tx(Port::Backend));
            let server = match parse(&first) {
                Frame::L4(p) => p.dst,
                _ => unreachable!(),
            };
            let down = IpAddr::from(Ipv6Addr::from(server).to_ipv4_mapped().unwrap()).to_string();
            (rig.snapshot, _) = snapshot_with_down(&config, &mut ids, true, &[down.as_str()]);
            // The client's session is lost (evicted, say); its flow lives.
            rig.tables.persist = FlowTable::new(1024);
            let mut frames = [old.build(), new.build()];
            let p = Processor {
                snapshot: &rig.snapshot,
                tables: &rig.tables,
                stats: &rig.stats,
                shared: &rig.shared,
                now: 101,
            };
            let verdicts = if burst {
                let mut metas = [Meta::default(); 2];
                let mut verdicts = [Verdict::Pass; 2];
                let mut refs = frames.each_mut().map(|f| f.as_mut_slice());
                p.process_burst(&mut refs[..], &mut metas, &mut verdicts);
                verdicts
            } else {
                frames.each_mut().map(|f| p.process(f))
            };
            assert_eq!(verdicts, [Verdict::Tx(Port::Backend); 2]);
            let to = frames.each_ref().map(|f| match parse(f) {
                Frame::L4(p) => p.dst,
                _ => unreachable!(),
            });
            assert_ne!(to[0], server, "moved off the down server");
            assert_eq!(to[0], to[1], "burst {burst}: one client, one server");
            outs.push(frames);
        }
        assert_eq!(
            outs[0], outs[1],
            "the burst rewrote what frame after frame did"
        );
    }

    /// A FIN that a down server still sends through its reply entry, after
    /// its client's flow moved to another server, neither closes the moved
    /// flow nor counts the down server's flow closed a second time.
    #[test]
    fn a_down_servers_fin_leaves_the_flow_that_moved_away_open() {
        let config = shared_config().replace(
            "  address = \"198.18.2.11\"\n  port = 8080\n",
            "  address = \"198.18.2.11\"\n  port = 8080\n\n  [[backend_service.server]]\n  address = \"198.18.2.12\"\n  port = 8080\n",
        );
        let mut ids = Ids::default();
        let mut rig = Rig::with_config(&config, true, &mut ids);
        (rig.snapshot, _) = snapshot_with_down(&config, &mut ids, true, &["198.18.2.12"]);
        let vip = ("198.18.100.1", 80);
        let (old, new) = (("198.18.2.11", 8080), ("198.18.2.12", 8080));
        let client = ("198.18.4.7", 40000);
        let fwd = Verdict::Tx(Port::Backend);
        let p = Pkt::from_client(client, vip);
        expect(&rig, 100, p, fwd, Some(p.to_server(old)));
        (rig.snapshot, _) = snapshot_with_down(&config, &mut ids, true, &["198.18.2.11"]);
        expect(&rig, 101, p, fwd, Some(p.to_server(new)));
        assert_eq!((active(&rig, old.0), active(&rig, new.0)), (0, 1));
        expect_with_flags(
            &rig,
            &[(
                102,
                Pkt::from_server(old, client),
                TCP_FIN | TCP_ACK,
                Verdict::Tx(Port::Client),
            )],
        );
        assert_eq!((active(&rig, old.0), active(&rig, new.0)), (0, 1));
        let key = forward_key(&match parse(&p.build()) {
            Frame::L4(p) => p,
            _ => unreachable!(),
        });
        let v = rig.tables.flows.peek(&key, 102).expect("the flow");
        assert!(!v.closed, "the moved flow is open");
    }

    /// A flow to a shared server has a reply entry besides its forward
    /// entry. Once the flow is seen closing (a FIN from either side), both
    /// live by the closed timeout: the client's last ACK does not stretch
    /// the reply entry back to the idle timeout, and a late reply finds
    /// nothing. A SYN reopening a closed flow brings the idle timeout back
    /// to both, and is no rebound.
    #[test]
    fn a_closing_flow_to_a_shared_server_frees_both_its_entries_by_the_closed_timeout() {
        let rig = Rig::with_config(&shared_config(), true, &mut Ids::default());
        let server = ("198.18.2.11", 8080);
        let vip = ("198.18.100.1", 80);
        let (fwd, rev) = (Verdict::Tx(Port::Backend), Verdict::Tx(Port::Client));
        let client_closes = ("198.18.4.7", 40000);
        let server_closes = ("198.18.4.7", 40001);
        let reopened = ("198.18.4.7", 40002);
        let open = ("198.18.4.7", 40003);
        for client in [client_closes, server_closes, reopened, open] {
            let syn = Pkt::from_client(client, vip);
            expect(&rig, 100, syn, fwd, Some(syn.to_server(server)));
        }
        assert_eq!(rig.tables.flows.count_live(100), 8, "two entries a flow");
        expect_with_flags(
            &rig,
            &[
                (
                    101,
                    Pkt::from_client(client_closes, vip),
                    TCP_FIN | TCP_ACK,
                    fwd,
                ),
                (
                    101,
                    Pkt::from_server(server, server_closes),
                    TCP_FIN | TCP_ACK,
                    rev,
                ),
                (101, Pkt::from_client(reopened, vip), TCP_RST, fwd),
                // The last ACKs, a second later: the forward entries' timers
                // move, and the reply entries are refreshed along with them.
                (102, Pkt::from_client(client_closes, vip), TCP_ACK, fwd),
                (102, Pkt::from_client(server_closes, vip), TCP_ACK, fwd),
                (102, Pkt::from_client(reopened, vip), TCP_SYN, fwd),
                (102, Pkt::from_client(reopened, vip), TCP_ACK, fwd),
            ],
        );
        let c = &rig.stats.core;
        let rebound = c.flows_rebound.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(rebound, 0, "a flow reopened is no rebound");
        // tcp_closed_timeout = 3 s: the closed flows' four entries last
        // until 105; flow_idle_timeout = 10 s: the others' until 110 and
        // (reopened at 102) 112.
        assert_eq!(rig.tables.flows.count_live(105), 8);
        assert_eq!(rig.tables.flows.count_live(106), 4);
        let no_flow = Verdict::Drop(DropReason::NoFlow);
        expect_replies(
            &rig,
            server,
            vip,
            &[
                (106, client_closes, no_flow),
                (106, server_closes, no_flow),
                (106, reopened, rev),
                (106, open, rev),
            ],
        );
    }

    /// A TCP flow begun by a SYN lives by the SYN timeout (both its
    /// entries: here its server is shared) until the client's first packet
    /// without SYN completes the handshake; retransmitted SYNs and the
    /// server's SYN-ACKs keep it that long again. A flow first seen
    /// mid-stream (no SYN) has the idle timeout from the start.
    #[test]
    fn a_tcp_flow_lives_by_the_syn_timeout_until_its_handshake_completes() {
        let rig = Rig::with_config(&shared_config(), true, &mut Ids::default());
        let server = ("198.18.2.11", 8080);
        let vip = ("198.18.100.1", 80);
        let (fwd, rev) = (Verdict::Tx(Port::Backend), Verdict::Tx(Port::Client));
        let half_open = ("198.18.4.7", 40000);
        let completed = ("198.18.4.7", 40001);
        let mid_stream = ("198.18.4.7", 40002);
        expect_with_flags(
            &rig,
            &[
                (100, Pkt::from_client(half_open, vip), TCP_SYN, fwd),
                (100, Pkt::from_client(completed, vip), TCP_SYN, fwd),
                (100, Pkt::from_client(mid_stream, vip), TCP_ACK, fwd),
                (101, Pkt::from_client(half_open, vip), TCP_SYN, fwd),
                (
                    101,
                    Pkt::from_server(server, half_open),
                    TCP_SYN | TCP_ACK,
                    rev,
                ),
                (
                    101,
                    Pkt::from_server(server, completed),
                    TCP_SYN | TCP_ACK,
                    rev,
                ),
                (101, Pkt::from_client(completed, vip), TCP_ACK, fwd),
            ],
        );
        assert_eq!(rig.tables.flows.count_live(101), 6, "two entries a flow");
        // tcp_syn_timeout = 2 s: the half-open flow's entries last until
        // 103; flow_idle_timeout = 10 s: the others' until 110 and 111.
        assert_eq!(rig.tables.flows.count_live(103), 6);
        assert_eq!(rig.tables.flows.count_live(104), 4);
        expect_replies(
            &rig,
            server,
            vip,
            &[
                (104, half_open, Verdict::Drop(DropReason::NoFlow)),
                (104, completed, rev),
                (104, mid_stream, rev),
            ],
        );
        let c = &rig.stats.core;
        let created = c.flows_created.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(created, 3, "completing a handshake creates no flow");
    }

    #[test]
    fn reply_without_a_known_gateway_mac_is_dropped_as_no_neighbour() {
        let rig = Rig::new(false);
        let client = ("198.18.4.7", 40000);
        let syn = Pkt::from_client(client, ("198.18.100.1", 80));
        let server = ("198.18.2.11", 8080);
        let to_server = Some(syn.to_server(server));
        expect(&rig, 1, syn, Verdict::Tx(Port::Backend), to_server);
        let reply = Pkt::from_server(server, client);
        let v = Verdict::Drop(DropReason::NoNeighbour);
        expect(&rig, 1, reply, v, None);
    }

    #[test]
    fn a_tcp_flow_seen_closing_lives_by_the_closed_timeout() {
        let rig = Rig::new(true);
        let server = ("198.18.2.11", 8080);
        let vip = ("198.18.100.1", 80);
        let (fwd, rev) = (Verdict::Tx(Port::Backend), Verdict::Tx(Port::Client));
        let fin = |p: Pkt| p.build_with_flags(TCP_FIN | TCP_ACK);
        let (open, closing) = (("198.18.4.7", 40000), ("198.18.4.7", 40001));
        for client in [open, closing] {
            let syn = Pkt::from_client(client, vip);
            expect(&rig, 100, syn, fwd, Some(syn.to_server(server)));
        }
        assert_eq!(
            rig.process(&mut fin(Pkt::from_client(closing, vip)), 101),
            fwd
        );
        // flow_idle_timeout = 10 s, tcp_closed_timeout = 3 s: the server's
        // last ACK at 104 finds the closing flow and keeps it 3 s more.
        expect_replies(
            &rig,
            server,
            vip,
            &[
                (104, closing, rev),
                (107, closing, rev),
                (108, open, rev),
                (111, closing, Verdict::Drop(DropReason::NoFlow)),
                (118, open, rev),
            ],
        );
    }

    #[test]
    fn flow_lives_while_used_within_the_idle_timeout_and_then_expires() {
        let rig = Rig::new(true);
        let client = ("198.18.4.7", 40000);
        let server = ("198.18.2.11", 8080);
        let vip = ("198.18.100.1", 80);
        let syn = Pkt::from_client(client, vip);
        let reply = Pkt::from_server(server, client);
        let (fwd, rev) = (Verdict::Tx(Port::Backend), Verdict::Tx(Port::Client));
        let replied = Some(reply.to_client(vip));
        // flow_idle_timeout = 10 s.
        expect(&rig, 100, syn, fwd, Some(syn.to_server(server)));
        expect(&rig, 110, reply, rev, replied);
        expect(&rig, 120, reply, rev, replied);
        expect(&rig, 131, reply, Verdict::Drop(DropReason::NoFlow), None);
        // The client's next packet schedules it afresh.
        expect(&rig, 131, syn, fwd, Some(syn.to_server(server)));
        expect(&rig, 131, reply, rev, replied);
        assert_eq!(
            rig.stats
                .core
                .flows_created
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
    }
}
