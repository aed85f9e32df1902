//! The immutable snapshot: everything the data plane needs to decide, built
//! by the control plane off the hot path and published whole (arc-swap).
//!
//! Workers load the current snapshot once per burst. Nothing in it changes
//! after publication; a reload, a health change or a neighbour change builds
//! a new one. Vectors are dense (indexed 0..n); each entry also carries its
//! stable id (see [`crate::control::ids`]), which is what flow entries and
//! counters hold.

use crate::config::{AllDown, Config, HealthCheck, Protocol, Scheduler};
use crate::control::ids::{Ids, MAX_ID};
use crate::sched::{client_hash_bytes, Maglev, MaglevBackend, DEFAULT_TABLE_SIZE};
use crate::util::{addr16, addr_words, is_group, Addr16, FxMap, Mac, WordIndex};
use std::collections::HashMap;
use std::net::IpAddr;

/// 1 + a dense index, per stable id (0: no such id): one entry for every
/// possible id, so a `u16` index needs no bounds check on the packet path.
type IdMap = Box<[u32; MAX_ID + 1]>;

fn id_map() -> IdMap {
    vec![0u32; MAX_ID + 1]
        .into_boxed_slice()
        .try_into()
        .unwrap_or_else(|_| unreachable!("MAX_ID + 1 entries"))
}

/// (address, port, protocol) in the form used by the data plane's lookups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct L4Key {
    pub addr: Addr16,
    pub port: u16,
    pub proto: u8,
}

impl L4Key {
    /// The key as [`WordIndex`] compares it.
    #[inline(always)]
    pub fn words(addr: &Addr16, port: u16, proto: u8) -> [u64; 3] {
        let [a, b] = addr_words(addr);
        [a, b, 1 << 32 | (port as u64) << 8 | proto as u64]
    }
}

/// An address as a [`WordIndex`] key.
#[inline(always)]
fn addr_key(addr: &Addr16) -> [u64; 3] {
    let [a, b] = addr_words(addr);
    [a, b, 1]
}

fn addr_set<'a>(addrs: impl Iterator<Item = &'a Addr16>) -> WordIndex {
    let entries: Vec<([u64; 3], u32)> = addrs.map(|a| (addr_key(a), 0)).collect();
    WordIndex::build(&entries)
}

pub fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
    }
}

#[derive(Debug, Clone)]
pub struct ListenerEntry {
    pub id: u16,
    pub name: String,
    pub vip: IpAddr,
    pub vip16: Addr16,
    pub port: u16,
    pub protocol: Protocol,
    /// Index into [`Snapshot::services`].
    pub service: u32,
}

/// A listener's dense index and its service's, in one word: the listener
/// index holds both, so that the burst pipeline's stages that need only the
/// service (2 and 3, for a new flow) do not load the listener's entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerRef(u32);

impl ListenerRef {
    fn pack(listener: u32, service: u32) -> u32 {
        assert!(
            listener <= 0xffff && service <= 0xffff,
            "dense indices fit 16 bits (one u16 id each)"
        );
        listener | service << 16
    }
    /// Index into [`Snapshot::listeners`].
    #[inline(always)]
    pub fn index(self) -> u32 {
        self.0 & 0xffff
    }
    /// Index into [`Snapshot::services`] (the listener's `service`).
    #[inline(always)]
    pub fn service(self) -> u32 {
        self.0 >> 16
    }
}

#[derive(Debug, Clone)]
pub struct ServiceEntry {
    pub id: u16,
    pub name: String,
    pub scheduler: Scheduler,
    /// Seconds; 0 = persistence off.
    pub persistence_timeout: u32,
    /// Servers that may take new clients: (backend index, weight > 0), up
    /// (or all of them when every server is down and the service fails
    /// open). In the service's order: its own servers as the file lists
    /// them, then each group's.
    pub eligible: Vec<(u32, u8)>,
    /// Backend indices whose established flows continue: members that are
    /// up, whatever their weight (weight 0 drains). Sorted.
    pub keep: Vec<u32>,
    /// `keep` and `eligible` as bitmaps over backend indices (bit `b` of
    /// word `b / 64`): the packet path's membership tests.
    keep_bits: Box<[u64]>,
    eligible_bits: Box<[u64]>,
    /// Whether every member is down (and the service failed open or drops).
    pub all_down: bool,
    /// Maglev over every member with weight > 0, up or not: health changes
    /// never reshuffle it, so a server going down moves only its own
    /// clients.
    pub maglev: Maglev,
    /// Maglev index → backend index.
    pub maglev_backends: Vec<u32>,
    /// Maglev over the eligible members only: where the clients of a down
    /// server go (spread by weight) while it is down.
    pub fallback: Maglev,
    pub fallback_backends: Vec<u32>,
    /// What `maglev` and `fallback` were built from, in order (the build
    /// is a function of exactly this): how the next snapshot finds a table
    /// it can share.
    maglev_input: Vec<MaglevBackend>,
    fallback_input: Vec<MaglevBackend>,
    /// Smooth weighted round robin sequence of backend indices.
    pub wrr: Box<[u32]>,
}

/// One backend endpoint. Endpoints are de-duplicated across services: the
/// same address:port/protocol is one backend with one id.
#[derive(Debug, Clone)]
pub struct BackendEntry {
    pub id: u16,
    pub address: IpAddr,
    pub addr16: Addr16,
    pub port: u16,
    pub protocol: Protocol,
    pub mac: Option<Mac>,
    pub up: bool,
}

/// Link-layer facts the rewrite needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Links {
    pub client_if_mac: Mac,
    pub backend_if_mac: Mac,
    /// MAC of the client-side next hop (instance.client_gateway).
    pub gateway_mac: Option<Mac>,
}

/// What the scheduler needs to know about the world beyond the snapshot:
/// the stateful schedulers' state. The data plane answers from its
/// counters; `l4lb simulate` from its own bookkeeping.
pub trait SchedState {
    /// The next position of this worker's round-robin cursor for a service
    /// (post-increment).
    fn wrr_next(&self, service_id: u16) -> u32;
    /// Active connections to a backend (opened − closed, all workers).
    fn active(&self, backend_id: u16) -> i64;
}

/// Everything needed to build a snapshot.
pub struct Inputs<'a> {
    pub config: &'a Config,
    pub generation: u64,
    pub links: Links,
    /// This host's own addresses: replies to them are the kernel's.
    pub local: &'a [IpAddr],
    pub mac_of: &'a dyn Fn(&IpAddr) -> Option<Mac>,
    /// Health: whether (address, port, protocol) is up.
    pub is_up: &'a dyn Fn(&IpAddr, u16, Protocol, &HealthCheck) -> bool,
    /// The snapshot this one replaces, if any: its Maglev tables are
    /// shared where a table's servers and weights are the same (a health
    /// change then builds only the affected service's fallback table, not
    /// two tables for every service).
    pub previous: Option<&'a Snapshot>,
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub generation: u64,
    pub listeners: Vec<ListenerEntry>,
    pub services: Vec<ServiceEntry>,
    pub backends: Vec<BackendEntry>,
    pub links: Links,
    listener_index: WordIndex,
    backend_index: WordIndex,
    /// Stable id → dense index + 1 (0: not in this snapshot).
    listener_by_id: IdMap,
    backend_by_id: IdMap,
    /// Per backend index: the only listener whose service has it as a
    /// member (any weight, any health), or [`NO_LISTENER`] when several
    /// listeners share it. See [`Snapshot::sole_listener`]. Derived from
    /// `reaching` at build time and kept flat for the packet path (one
    /// load, where `reaching` takes two).
    sole_listener: Box<[u32]>,
    /// Per backend index: every listener whose service has it as a member.
    reaching: Box<[Box<[u32]>]>,
    vips: WordIndex,
    backend_hosts: WordIndex,
    local: WordIndex,
    /// The same sets as lists, for the XDP maps.
    listener_keys: Vec<L4Key>,
    vip_list: Vec<Addr16>,
    backend_host_list: Vec<Addr16>,
    local_list: Vec<Addr16>,
}

/// Smooth weighted round robin (the nginx algorithm): each step every
/// server gains its weight, the largest current value is chosen and loses
/// the total. The sequence spreads a heavy server's turns instead of
/// bunching them. Weights are divided by their gcd first, so the sequence
/// is as short as the ratios allow (at most 100 × servers).
/// A bitmap of backend indices.
fn bitmap(indices: impl Iterator<Item = u32> + Clone) -> Box<[u64]> {
    let words = indices.clone().max().map_or(0, |m| m as usize / 64 + 1);
    let mut bits = vec![0u64; words].into_boxed_slice();
    for i in indices {
        bits[i as usize / 64] |= 1 << (i % 64);
    }
    bits
}

#[inline(always)]
fn has_bit(bits: &[u64], i: u32) -> bool {
    bits.get(i as usize / 64)
        .is_some_and(|w| w >> (i % 64) & 1 == 1)
}

/// The smooth weighted round robin sequence (nginx's) of `eligible`'s
/// backend indices, with weights reduced by their greatest common divisor:
/// at each step every server's current value grows by its weight, the
/// first server (in `eligible`'s order) with the highest value is picked
/// and its value drops by the total weight.
///
/// Computed per weight class rather than per server, which gives the same
/// sequence: within a class (servers of one weight) the highest value is
/// held by the servers picked least often, the first of which is taken, so
/// a class's picks go round its members in order, and only each class's
/// next member can win a step. That is steps × classes work (at most 100
/// classes) instead of steps × servers: 4096 servers of weights 1-100 took
/// about a second the other way, on every snapshot build.
fn smooth_wrr(eligible: &[(u32, u8)]) -> Box<[u32]> {
    fn gcd(a: u32, b: u32) -> u32 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let g = eligible
        .iter()
        .fold(0, |g, (_, w)| gcd(g, *w as u32))
        .max(1);
    // (reduced weight, positions in `eligible` of the class's members).
    let mut classes: Vec<(i64, Vec<usize>)> = Vec::new();
    for (pos, (_, w)) in eligible.iter().enumerate() {
        let w = (*w as u32 / g) as i64;
        match classes.iter_mut().find(|(cw, _)| *cw == w) {
            Some((_, members)) => members.push(pos),
            None => classes.push((w, vec![pos])),
        }
    }
    let total: i64 = classes.iter().map(|(w, m)| w * m.len() as i64).sum();
    let mut picks = vec![0usize; classes.len()];
    let mut seq = Vec::with_capacity(total as usize);
    for step in 1..=total {
        // (value, position, class) of the best class candidate so far.
        let mut best: Option<(i64, usize, usize)> = None;
        for (k, (w, members)) in classes.iter().enumerate() {
            let m = members.len();
            // Before this step's pick, a member picked c times holds
            // step × w - total × c.
            let value = step * w - total * (picks[k] / m) as i64;
            let pos = members[picks[k] % m];
            if best.is_none_or(|(v, p, _)| value > v || (value == v && pos < p)) {
                best = Some((value, pos, k));
            }
        }
        let (_, pos, k) = best.expect("a step has a class");
        picks[k] += 1;
        seq.push(eligible[pos].0);
    }
    seq.into_boxed_slice()
}

/// `sole_listener`'s marker: several listeners (or none) reach the backend.
const NO_LISTENER: u32 = u32::MAX;

impl Snapshot {
    /// Builds a snapshot from a validated config, assigning stable ids.
    pub fn build(ids: &mut Ids, inp: &Inputs) -> Result<Snapshot, String> {
        let config = inp.config;
        let mut backends: Vec<BackendEntry> = Vec::new();
        let mut backend_index: FxMap<L4Key, u32> = FxMap::default();
        let mut services = Vec::with_capacity(config.services.len());
        // The previous snapshot's tables by what they were built from.
        let mut built: HashMap<Vec<MaglevBackend>, Maglev> = HashMap::new();
        for svc in inp.previous.map_or(&[][..], |p| &p.services[..]) {
            built.insert(svc.maglev_input.clone(), svc.maglev.clone());
            built.insert(svc.fallback_input.clone(), svc.fallback.clone());
        }
        // Per service: its members' backend indices (for `sole_listener`).
        let mut service_members: Vec<Vec<u32>> = Vec::with_capacity(config.services.len());
        for svc in &config.services {
            let proto = proto_number(svc.protocol);
            let mut members: Vec<(u32, u8)> = Vec::with_capacity(svc.servers.len());
            // Whether each member passes this service's health check.
            let mut member_up: Vec<bool> = Vec::with_capacity(svc.servers.len());
            for s in &svc.servers {
                let up = (inp.is_up)(&s.address, s.port, svc.protocol, &svc.health_check);
                let key = L4Key {
                    addr: addr16(&s.address),
                    port: s.port,
                    proto,
                };
                let idx = match backend_index.get(&key) {
                    Some(i) => *i,
                    None => {
                        backends.push(BackendEntry {
                            id: ids.backend(s.address, s.port, svc.protocol)?,
                            address: s.address,
                            addr16: key.addr,
                            port: s.port,
                            protocol: svc.protocol,
                            mac: (inp.mac_of)(&s.address),
                            up,
                        });
                        let i = (backends.len() - 1) as u32;
                        backend_index.insert(key, i);
                        i
                    }
                };
                // Up for the endpoint: by every service's check.
                backends[idx as usize].up &= up;
                members.push((idx, s.weight));
                member_up.push(up);
            }
            service_members.push(members.iter().map(|(i, _)| *i).collect());
            let any_up = member_up.iter().any(|&up| up);
            let fail_open = !any_up && svc.on_all_down == AllDown::FailOpen;
            let usable = |k: usize| fail_open || member_up[k];
            // In the service's own order (not by backend index, which is
            // the order the whole file first names each server in): round
            // robin's sequence and least connections' ties follow it.
            let eligible: Vec<(u32, u8)> = members
                .iter()
                .enumerate()
                .filter(|&(k, (_, w))| *w > 0 && usable(k))
                .map(|(_, m)| *m)
                .collect();
            let mut keep: Vec<u32> = members
                .iter()
                .enumerate()
                .filter(|&(k, _)| usable(k))
                .map(|(_, (i, _))| *i)
                .collect();
            keep.sort_unstable();
            keep.dedup();
            let mut table = |set: &[(u32, u8)]| {
                let mag: Vec<MaglevBackend> = set
                    .iter()
                    .map(|(i, w)| {
                        let b = &backends[*i as usize];
                        MaglevBackend::new(b.address, b.port, *w)
                    })
                    .collect();
                let table = match built.get(&mag) {
                    Some(t) => t.clone(),
                    None => {
                        let t = Maglev::build(&mag, DEFAULT_TABLE_SIZE)
                            .map_err(|e| format!("backend service {}: {e}", svc.name))?;
                        built.insert(mag.clone(), t.clone());
                        t
                    }
                };
                Ok::<_, String>((table, mag))
            };
            // In the same order as `eligible`, so that with every member
            // up the two are one table. (Validation allows no member
            // twice; the Maglev build would refuse one.)
            let weighted: Vec<(u32, u8)> =
                members.iter().copied().filter(|(_, w)| *w > 0).collect();
            let (maglev, maglev_input) = table(&weighted)?;
            let (fallback, fallback_input) = table(&eligible)?;
            let keep_bits = bitmap(keep.iter().copied());
            let eligible_bits = bitmap(eligible.iter().map(|(i, _)| *i));
            services.push(ServiceEntry {
                keep_bits,
                eligible_bits,
                id: ids.service(&svc.name)?,
                name: svc.name.clone(),
                scheduler: svc.scheduler,
                persistence_timeout: svc.persistence_timeout.unwrap_or(0),
                // Only round robin reads it.
                wrr: if svc.scheduler == Scheduler::WeightedRoundRobin {
                    smooth_wrr(&eligible)
                } else {
                    Box::default()
                },
                maglev_backends: weighted.iter().map(|(i, _)| *i).collect(),
                fallback_backends: eligible.iter().map(|(i, _)| *i).collect(),
                fallback,
                eligible,
                keep,
                all_down: !any_up,
                maglev,
                maglev_input,
                fallback_input,
            });
        }

        let mut listeners = Vec::with_capacity(config.listeners.len());
        let mut listener_keys = Vec::with_capacity(config.listeners.len());
        let mut vip_list: Vec<Addr16> = Vec::new();
        for l in &config.listeners {
            let vip16 = addr16(&l.vip);
            listener_keys.push(L4Key {
                addr: vip16,
                port: l.port,
                proto: proto_number(l.protocol),
            });
            if !vip_list.contains(&vip16) {
                vip_list.push(vip16);
            }
            listeners.push(ListenerEntry {
                id: ids.listener(&l.name)?,
                name: l.name.clone(),
                vip: l.vip,
                vip16,
                port: l.port,
                protocol: l.protocol,
                service: l.service as u32,
            });
        }
        let mut listener_by_id = id_map();
        for (i, l) in listeners.iter().enumerate() {
            listener_by_id[l.id as usize] = i as u32 + 1;
        }
        // A backend reached from one listener only needs no reply entries:
        // its replies name the forward entry's key (see `sole_listener`).
        let mut reaching: Vec<Vec<u32>> = vec![Vec::new(); backends.len()];
        for (li, l) in listeners.iter().enumerate() {
            for &b in &service_members[l.service as usize] {
                let r = &mut reaching[b as usize];
                if !r.contains(&(li as u32)) {
                    r.push(li as u32);
                }
            }
        }
        let sole_listener = reaching
            .iter()
            .map(|r| match r[..] {
                [l] => l,
                _ => NO_LISTENER,
            })
            .collect();
        let reaching = reaching.into_iter().map(Vec::into_boxed_slice).collect();
        let mut backend_by_id = id_map();
        for (i, b) in backends.iter().enumerate() {
            backend_by_id[b.id as usize] = i as u32 + 1;
        }
        let index = |keys: &mut dyn Iterator<Item = (&L4Key, u32)>| {
            let entries: Vec<([u64; 3], u32)> = keys
                .map(|(k, i)| (L4Key::words(&k.addr, k.port, k.proto), i))
                .collect();
            WordIndex::build(&entries)
        };
        // Both indices are below 2^16 (one stable u16 id each).
        let listener_index = index(
            &mut listener_keys
                .iter()
                .zip(listeners.iter().enumerate())
                .map(|(k, (i, le))| (k, ListenerRef::pack(i as u32, le.service))),
        );
        let backend_index = index(&mut backend_index.iter().map(|(k, i)| (k, *i)));
        let mut backend_host_list: Vec<Addr16> = backends.iter().map(|b| b.addr16).collect();
        backend_host_list.sort_unstable();
        backend_host_list.dedup();
        let mut local_list: Vec<Addr16> = inp.local.iter().map(addr16).collect();
        local_list.sort_unstable();
        local_list.dedup();
        Ok(Snapshot {
            generation: inp.generation,
            listeners,
            services,
            backends,
            links: inp.links,
            listener_index,
            backend_index,
            listener_by_id,
            backend_by_id,
            sole_listener,
            reaching,
            vips: addr_set(vip_list.iter()),
            backend_hosts: addr_set(backend_host_list.iter()),
            local: addr_set(local_list.iter()),
            listener_keys,
            vip_list,
            backend_host_list,
            local_list,
        })
    }

    /// A snapshot for offline use (simulate, replay, tests): fresh ids, all
    /// servers up, MACs from `mac_of`.
    pub fn offline(
        config: &Config,
        links: Links,
        mac_of: &dyn Fn(&IpAddr) -> Option<Mac>,
    ) -> Result<Snapshot, String> {
        Snapshot::build(
            &mut Ids::default(),
            &Inputs {
                config,
                generation: 1,
                links,
                local: &[],
                mac_of,
                is_up: &|_, _, _, _| true,
                previous: None,
            },
        )
    }

    /// The listener on `addr`:`port`/`proto`, with its service.
    #[inline]
    pub fn listener(&self, addr: &Addr16, port: u16, proto: u8) -> Option<ListenerRef> {
        self.listener_index
            .get(&L4Key::words(addr, port, proto))
            .map(ListenerRef)
    }

    #[inline]
    pub fn backend(&self, addr: &Addr16, port: u16, proto: u8) -> Option<u32> {
        self.backend_index.get(&L4Key::words(addr, port, proto))
    }

    /// Dense index of the listener with stable id `id`.
    #[inline]
    pub fn listener_of_id(&self, id: u16) -> Option<u32> {
        self.listener_by_id[id as usize].checked_sub(1)
    }

    /// The dense index of the one listener whose traffic can reach backend
    /// `b`, if only one can. Such a backend's replies need no reply entry:
    /// (client, client port, that listener's VIP and port) is the forward
    /// entry's key. Backends that several listeners share (one service
    /// behind two listeners, or one server in two services) have none, and
    /// their flows keep a reply entry as well.
    #[inline]
    pub fn sole_listener(&self, b: u32) -> Option<u32> {
        match self.sole_listener.get(b as usize) {
            Some(&l) if l != NO_LISTENER => Some(l),
            _ => None,
        }
    }

    /// The dense indices of every listener whose traffic can reach backend
    /// `b` (its services' listeners).
    #[inline]
    pub fn listeners_reaching(&self, b: u32) -> &[u32] {
        self.reaching.get(b as usize).map_or(&[], |r| &r[..])
    }

    /// Dense index of the backend with stable id `id`.
    #[inline]
    pub fn backend_of_id(&self, id: u16) -> Option<u32> {
        self.backend_by_id[id as usize].checked_sub(1)
    }

    #[inline]
    pub fn is_vip(&self, addr: &Addr16) -> bool {
        self.vips.get(&addr_key(addr)).is_some()
    }

    #[inline]
    pub fn is_backend_host(&self, addr: &Addr16) -> bool {
        self.backend_hosts.get(&addr_key(addr)).is_some()
    }

    #[inline]
    pub fn is_local(&self, addr: &Addr16) -> bool {
        self.local.get(&addr_key(addr)).is_some()
    }

    /// Whether a packet to `addr` from a server host is the kernel's: to one
    /// of this host's addresses (health check replies, ssh, ...) or to a
    /// group address (neighbour discovery, ...). The steering program
    /// decides the same way.
    #[inline]
    pub fn is_for_host(&self, addr: &Addr16) -> bool {
        is_group(addr) || self.is_local(addr)
    }

    /// The weighted source-IP scheduler: the backend index for a new flow
    /// from `client` (address bytes as on the wire: 4 for IPv4, 16 for IPv6)
    /// to `service`. The client's slot in the table of all weighted members
    /// decides; if that server is down, the table of eligible members does.
    #[inline]
    pub fn pick(&self, service: u32, client: &[u8]) -> Option<u32> {
        self.pick_hashed(service, client_hash_bytes(client))
    }

    /// [`Snapshot::pick`] for a client whose hash
    /// ([`client_hash_bytes`]) is known.
    #[inline]
    pub fn pick_hashed(&self, service: u32, h: u64) -> Option<u32> {
        let svc = &self.services[service as usize];
        if let Some(i) = svc.maglev.lookup(h) {
            let b = svc.maglev_backends[i as usize];
            // Up by this service's check, or every member down and the
            // service failing open: the members it keeps.
            if has_bit(&svc.keep_bits, b) {
                return Some(b);
            }
        }
        svc.fallback
            .lookup(h)
            .map(|i| svc.fallback_backends[i as usize])
    }

    /// Starts loading the table slot [`Snapshot::pick_hashed`] will read
    /// first.
    #[inline]
    pub fn prefetch_pick(&self, service: u32, h: u64) {
        self.services[service as usize].maglev.prefetch(h);
    }

    /// The service's scheduler: the backend index for a new flow. This is
    /// the one function both the data plane and `l4lb simulate` call.
    #[inline]
    pub fn schedule(&self, service: u32, client: &[u8], st: &dyn SchedState) -> Option<u32> {
        self.schedule_with(service, client, None, st)
    }

    /// [`Snapshot::schedule`], given the client's hash
    /// ([`client_hash_bytes`] of `client`) when it is already known (the
    /// burst pipeline computes it a stage ahead).
    #[inline]
    pub fn schedule_with(
        &self,
        service: u32,
        client: &[u8],
        client_hash: Option<u64>,
        st: &dyn SchedState,
    ) -> Option<u32> {
        let svc = &self.services[service as usize];
        match svc.scheduler {
            Scheduler::WeightedSourceIp => self.pick_hashed(
                service,
                client_hash.unwrap_or_else(|| client_hash_bytes(client)),
            ),
            Scheduler::WeightedRoundRobin => {
                if svc.wrr.is_empty() {
                    return None;
                }
                let n = st.wrr_next(svc.id) as usize;
                Some(svc.wrr[n % svc.wrr.len()])
            }
            Scheduler::WeightedLeastConnections => {
                // Least active/weight, compared as active_a × w_b < active_b × w_a
                // to stay in integers; ties go to the server the service
                // lists first.
                let mut best: Option<(u32, i64, i64)> = None;
                for &(b, w) in &svc.eligible {
                    let a = st.active(self.backends[b as usize].id).max(0);
                    let w = w as i64;
                    match best {
                        Some((_, ba, bw)) if a * bw >= ba * w => {}
                        _ => best = Some((b, a, w)),
                    }
                }
                best.map(|(b, _, _)| b)
            }
        }
    }

    /// Whether an established flow of `service` to backend `b` continues.
    #[inline]
    pub fn keeps(&self, service: u32, b: u32) -> bool {
        has_bit(&self.services[service as usize].keep_bits, b)
    }

    /// Whether backend `b` may take new clients of `service` (persistence).
    #[inline]
    pub fn eligible(&self, service: u32, b: u32) -> bool {
        has_bit(&self.services[service as usize].eligible_bits, b)
    }

    /// Addresses the XDP program must know: (VIPs, listeners, backend hosts,
    /// local addresses).
    pub fn steering_sets(&self) -> (Vec<Addr16>, Vec<L4Key>, Vec<Addr16>, Vec<Addr16>) {
        (
            self.vip_list.clone(),
            self.listener_keys.clone(),
            self.backend_host_list.clone(),
            self.local_list.clone(),
        )
    }
}

/// For the control plane's tests: the snapshot of `config` with health as
/// `is_up` says, after `previous`; fresh ids, no links, MACs or local
/// addresses.
#[cfg(test)]
pub(crate) fn test_snapshot(
    config: &Config,
    is_up: &dyn Fn(&IpAddr, u16, Protocol, &HealthCheck) -> bool,
    previous: Option<&Snapshot>,
) -> Snapshot {
    Snapshot::build(
        &mut Ids::default(),
        &Inputs {
            config,
            generation: 1,
            links: Links::default(),
            local: &[],
            mac_of: &|_| None,
            is_up,
            previous,
        },
    )
    .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_wrr_interleaves_in_weight_proportion() {
        // Weights 50/30/20 reduce to 5/3/2: worked by hand, step by step,
        // the current values pick 0,1,2,0,0,1,0,2,1,0.
        let seq = smooth_wrr(&[(0, 50), (1, 30), (2, 20)]);
        assert_eq!(&*seq, &[0, 1, 2, 0, 0, 1, 0, 2, 1, 0]);
        for (b, n) in [(0, 5), (1, 3), (2, 2)] {
            assert_eq!(seq.iter().filter(|x| **x == b).count(), n);
        }
        let seq = smooth_wrr(&[(4, 100), (7, 100)]);
        assert_eq!(&*seq, &[4, 7]);
        assert!(smooth_wrr(&[]).is_empty());
    }

    /// nginx's smooth weighted round robin as written: every server's
    /// value grows by its weight, the first highest is picked.
    fn smooth_wrr_per_server(eligible: &[(u32, u8)]) -> Vec<u32> {
        let g = (1..=100u32)
            .rev()
            .find(|d| eligible.iter().all(|(_, w)| *w as u32 % d == 0))
            .unwrap_or(1);
        let weights: Vec<i64> = eligible
            .iter()
            .map(|(_, w)| (*w as u32 / g) as i64)
            .collect();
        let total: i64 = weights.iter().sum();
        let mut current = vec![0i64; eligible.len()];
        let mut seq = Vec::new();
        for _ in 0..total {
            let mut best = 0;
            for i in 0..current.len() {
                current[i] += weights[i];
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            seq.push(eligible[best].0);
        }
        seq
    }

    /// The per-class computation gives exactly nginx's per-server
    /// sequence: for 2000 random services (1-40 servers, weights 1-100,
    /// few or many distinct, backend indices in any order).
    #[test]
    fn smooth_wrr_by_weight_class_is_the_per_server_sequence() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for case in 0..2000 {
            let n = 1 + next(40) as usize;
            let distinct = 1 + next(6);
            let palette: Vec<u8> = (0..distinct).map(|_| 1 + next(100) as u8).collect();
            let eligible: Vec<(u32, u8)> = (0..n)
                .map(|_| {
                    let w = if case % 2 == 0 {
                        palette[next(distinct) as usize]
                    } else {
                        1 + next(100) as u8
                    };
                    (next(1000) as u32, w)
                })
                .collect();
            assert_eq!(
                &*smooth_wrr(&eligible),
                &smooth_wrr_per_server(&eligible)[..],
                "{eligible:?}"
            );
        }
    }

    use crate::config::Config;

    fn cfg(on_all_down: &str, weights: [u8; 3]) -> Config {
        Config::from_str(&cfg_text(on_all_down, weights), "t.toml").expect("valid")
    }

    /// [`cfg`] as text: one service, "web", of three servers.
    fn cfg_text(on_all_down: &str, weights: [u8; 3]) -> String {
        format!(
            r#"
[instance]
name = "t"
client_interface = "c"
backend_interface = "b"
client_gateway = "198.18.0.2"
[[listener]]
name = "web"
vip = "198.18.100.1"
protocol = "tcp"
port = 80
backend_service = "web"
[[backend_service]]
name = "web"
protocol = "tcp"
on_all_down = "{on_all_down}"
  [[backend_service.server]]
  address = "198.18.2.11"
  port = 8080
  weight = {}
  [[backend_service.server]]
  address = "198.18.2.12"
  port = 8080
  weight = {}
  [[backend_service.server]]
  address = "198.18.2.13"
  port = 8080
  weight = {}
"#,
            weights[0], weights[1], weights[2]
        )
    }

    /// The snapshot of `config` with servers 198.18.2.`down` down.
    fn snap(config: &Config, down: &[u8]) -> Snapshot {
        let down: Vec<IpAddr> = down
            .iter()
            .map(|d| crate::util::v4(198, 18, 2, *d))
            .collect();
        snap_with(config, &|a, _, _, _| !down.contains(a))
    }

    /// The snapshot of `config` with health as `is_up` says.
    fn snap_with(
        config: &Config,
        is_up: &dyn Fn(&IpAddr, u16, Protocol, &HealthCheck) -> bool,
    ) -> Snapshot {
        test_snapshot(config, is_up, None)
    }

    fn assignment(s: &Snapshot) -> Vec<Option<u8>> {
        (0..20_000u32)
            .map(|i| {
                let c = (0xc612_0000u32 + i).to_be_bytes();
                s.pick(0, &c).map(|b| match s.backends[b as usize].address {
                    IpAddr::V4(a) => a.octets()[3],
                    IpAddr::V6(_) => 0,
                })
            })
            .collect()
    }

    /// Two services share a server and check it differently: the server is
    /// out of the service whose check fails, and still in the other. Its
    /// endpoint counts as up only when every check passes.
    #[test]
    fn a_shared_server_is_up_or_down_per_service_check() {
        let text = r#"
[instance]
name = "t"
client_interface = "c0"
backend_interface = "b0"
client_gateway = "198.18.0.2"
[[listener]]
name = "a"
vip = "198.18.100.1"
protocol = "tcp"
port = 80
backend_service = "a"
[[listener]]
name = "b"
vip = "198.18.100.2"
protocol = "tcp"
port = 80
backend_service = "b"
[[backend_service]]
name = "a"
protocol = "tcp"
  [backend_service.health_check]
  type = "http"
  path = "/a"
  [[backend_service.server]]
  address = "198.18.2.11"
  port = 8080
  [[backend_service.server]]
  address = "198.18.2.12"
  port = 8080
[[backend_service]]
name = "b"
protocol = "tcp"
  [backend_service.health_check]
  type = "http"
  path = "/b"
  [[backend_service.server]]
  address = "198.18.2.11"
  port = 8080
  [[backend_service.server]]
  address = "198.18.2.12"
  port = 8080
"#;
        let config = Config::from_str(text, "t.toml").expect("valid");
        let eleven = crate::util::v4(198, 18, 2, 11);
        // .11 fails service b's check (/b) only.
        let is_up = |a: &IpAddr, _: u16, _: Protocol, hc: &HealthCheck| {
            !(*a == eleven && hc.path.as_deref() == Some("/b"))
        };
        let s = snap_with(&config, &is_up);
        let b11 = s.backend(&addr16(&eleven), 8080, 6).unwrap();
        let b12 = s
            .backend(&addr16(&crate::util::v4(198, 18, 2, 12)), 8080, 6)
            .unwrap();
        let (a, b) = (0, 1);
        assert_eq!(s.services[a].eligible, [(b11, 100), (b12, 100)]);
        assert_eq!(s.services[b].eligible, [(b12, 100)]);
        assert!(s.keeps(a as u32, b11) && !s.keeps(b as u32, b11));
        assert!(!s.backends[b11 as usize].up && s.backends[b12 as usize].up);
        // Service b's clients all go to .12; service a's are split.
        let picks = |svc: u32| {
            let mut n = [0; 2];
            for i in 0..1000u32 {
                let c = (0xc612_0400u32 + i).to_be_bytes();
                let p = s.pick(svc, &c).unwrap();
                n[usize::from(p == b12)] += 1;
            }
            n
        };
        assert_eq!(picks(b as u32), [0, 1000]);
        let [on11, on12] = picks(a as u32);
        assert!(on11 > 400 && on12 > 400, "{on11} / {on12}");
    }

    /// A backend has a sole listener only when one listener alone can send
    /// to it: a server in two services, or a service behind two listeners,
    /// is shared (its flows keep reply entries).
    #[test]
    fn sole_listener_is_the_one_listener_reaching_a_backend() {
        let text = r#"
[instance]
name = "t"
client_interface = "c"
backend_interface = "b"
client_gateway = "198.18.0.2"
[[listener]]
name = "a"
vip = "198.18.100.1"
protocol = "tcp"
port = 80
backend_service = "a"
[[listener]]
name = "b"
vip = "198.18.100.2"
protocol = "tcp"
port = 80
backend_service = "b"
[[listener]]
name = "b-alt"
vip = "198.18.100.3"
protocol = "tcp"
port = 80
backend_service = "b"
[[backend_service]]
name = "a"
protocol = "tcp"
  [[backend_service.server]]
  address = "198.18.2.11"
  port = 8080
  [[backend_service.server]]
  address = "198.18.2.12"
  port = 8080
  weight = 0
[[backend_service]]
name = "b"
protocol = "tcp"
  [[backend_service.server]]
  address = "198.18.2.13"
  port = 8080
  [[backend_service.server]]
  address = "198.18.2.11"
  port = 8081
[[backend_service]]
name = "unused"
protocol = "tcp"
  [[backend_service.server]]
  address = "198.18.2.14"
  port = 8080
  [[backend_service.server]]
  address = "198.18.2.11"
  port = 8080
"#;
        let c = Config::from_str(text, "t.toml").expect("valid");
        let s = snap(&c, &[]);
        let backend = |d: u8, port: u16| {
            s.backend(&addr16(&crate::util::v4(198, 18, 2, d)), port, 6)
                .expect("a backend")
        };
        let sole = |d: u8, port: u16| {
            s.sole_listener(backend(d, port))
                .map(|l| s.listeners[l as usize].name.as_str())
        };
        // In "a" and in "unused" (which no listener uses): "a" alone.
        assert_eq!(sole(11, 8080), Some("a"));
        // Weight 0 (draining) still has flows: still "a"'s.
        assert_eq!(sole(12, 8080), Some("a"));
        // "b" is behind two listeners.
        assert_eq!(sole(13, 8080), None);
        assert_eq!(sole(11, 8081), None);
        // No listener reaches it.
        assert_eq!(sole(14, 8080), None);
        let reaching = |d: u8, port: u16| {
            s.listeners_reaching(backend(d, port))
                .iter()
                .map(|&l| s.listeners[l as usize].name.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(reaching(11, 8080), ["a"]);
        assert_eq!(reaching(11, 8081), ["b", "b-alt"]);
        assert!(reaching(14, 8080).is_empty());
    }

    #[test]
    fn a_health_change_shares_every_maglev_table_whose_servers_did_not_change() {
        let text = cfg_text("drop", [50, 30, 20])
            + "[[listener]]\nname = \"alt\"\nvip = \"198.18.100.2\"\nprotocol = \"tcp\"\n\
               port = 80\nbackend_service = \"alt\"\n\
               [[backend_service]]\nname = \"alt\"\nprotocol = \"tcp\"\n\
               [[backend_service.server]]\naddress = \"198.18.2.14\"\nport = 8080\n\
               [[backend_service.server]]\naddress = \"198.18.2.15\"\nport = 8080\n";
        let config = Config::from_str(&text, "t.toml").expect("valid");
        let build = |down: Option<u8>, previous: Option<&Snapshot>| {
            let down = down.map(|d| crate::util::v4(198, 18, 2, d));
            test_snapshot(&config, &|a, _, _, _| Some(*a) != down, previous)
        };
        let all_up = build(None, None);
        let (web, alt) = (&all_up.services[0], &all_up.services[1]);
        assert!(
            web.fallback.shares_table(&web.maglev),
            "all up: the two tables are one"
        );
        let one_down = build(Some(12), Some(&all_up));
        let (web2, alt2) = (&one_down.services[0], &one_down.services[1]);
        assert!(web2.maglev.shares_table(&web.maglev), "weights unchanged");
        assert!(!web2.fallback.shares_table(&web.fallback), "built anew");
        assert!(alt2.maglev.shares_table(&alt.maglev));
        assert!(alt2.fallback.shares_table(&alt.fallback));
        // Exactly what a snapshot built from nothing decides.
        let fresh = build(Some(12), None);
        for service in [0, 1] {
            for i in 0..20_000u32 {
                let c = (0xc612_0000u32 + i).to_be_bytes();
                assert_eq!(
                    one_down.pick(service, &c),
                    fresh.pick(service, &c),
                    "service {service}, client {c:?}"
                );
            }
        }
        // And back up: the first snapshot's tables again.
        let back = build(None, Some(&one_down));
        assert!(back.services[0].fallback.shares_table(&web.maglev));
    }

    #[test]
    fn a_server_going_down_moves_only_its_own_clients() {
        let c = cfg("drop", [50, 30, 20]);
        let before = assignment(&snap(&c, &[]));
        let after = assignment(&snap(&c, &[12]));
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if *b == Some(12) {
                assert_ne!(*a, Some(12));
                assert!(a.is_some());
                moved += 1;
            } else {
                assert_eq!(a, b, "a client of a healthy server moved");
            }
        }
        assert!(moved > 4000, "b2 had about 30% of clients: {moved}");
        // Back up: everyone returns.
        assert_eq!(assignment(&snap(&c, &[])), before);
    }

    #[test]
    fn weight_zero_drains_new_clients_but_keeps_established_flows() {
        let c = cfg("drop", [50, 0, 20]);
        let s = snap(&c, &[]);
        assert!(assignment(&s).iter().all(|b| *b != Some(12) && b.is_some()));
        let b2 = s
            .backend(&addr16(&crate::util::v4(198, 18, 2, 12)), 8080, 6)
            .unwrap();
        assert!(
            s.keeps(0, b2),
            "established flows to a drained server continue"
        );
        assert!(!s.eligible(0, b2), "a drained server takes no new clients");
    }

    #[test]
    fn all_servers_down_drops_or_fails_open_as_configured() {
        let s = snap(&cfg("drop", [50, 30, 20]), &[11, 12, 13]);
        assert!(assignment(&s).iter().all(|b| b.is_none()));
        let open = snap(&cfg("fail_open", [50, 30, 20]), &[11, 12, 13]);
        let healthy = assignment(&snap(&cfg("fail_open", [50, 30, 20]), &[]));
        assert_eq!(assignment(&open), healthy, "fail open: as if all were up");
    }
}
