//! The immutable snapshot: everything the data plane needs to decide, built
//! by the control plane off the hot path and published whole (arc-swap).
//!
//! Workers load the current snapshot once per burst. Nothing in it changes
//! after publication; a config reload or a neighbour change builds a new one.

use crate::config::{Config, Protocol};
use crate::sched::{client_hash_bytes, Maglev, MaglevBackend, DEFAULT_TABLE_SIZE};
use crate::util::{addr16, Addr16, FxMap, FxSet, Mac};
use std::net::IpAddr;

/// (address, port, protocol) in the form used by the data plane's lookups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct L4Key {
    pub addr: Addr16,
    pub port: u16,
    pub proto: u8,
}

pub fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
    }
}

#[derive(Debug, Clone)]
pub struct ListenerEntry {
    pub name: String,
    pub vip: IpAddr,
    pub vip16: Addr16,
    pub port: u16,
    pub protocol: Protocol,
    /// Index into [`Snapshot::services`].
    pub service: u32,
}

#[derive(Debug, Clone)]
pub struct ServiceEntry {
    pub name: String,
    pub maglev: Maglev,
    /// Maglev index → backend id (index into [`Snapshot::backends`]).
    pub backends: Vec<u32>,
}

/// One backend endpoint. Endpoints are de-duplicated across services: the
/// same address:port/protocol is one backend with one id.
#[derive(Debug, Clone)]
pub struct BackendEntry {
    pub address: IpAddr,
    pub addr16: Addr16,
    pub port: u16,
    pub protocol: Protocol,
    pub mac: Option<Mac>,
}

/// Link-layer facts the rewrite needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Links {
    pub client_if_mac: Mac,
    pub backend_if_mac: Mac,
    /// MAC of the client-side next hop (instance.client_gateway).
    pub gateway_mac: Option<Mac>,
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub generation: u64,
    pub listeners: Vec<ListenerEntry>,
    pub services: Vec<ServiceEntry>,
    pub backends: Vec<BackendEntry>,
    pub links: Links,
    listener_index: FxMap<L4Key, u32>,
    backend_index: FxMap<L4Key, u32>,
    vips: FxSet<Addr16>,
    backend_hosts: FxSet<Addr16>,
    local: FxSet<Addr16>,
}

impl Snapshot {
    /// Builds a snapshot from a validated config. `mac_of` resolves a
    /// backend's next-hop MAC (None: not known yet); `local` lists this
    /// host's own addresses on the backend side (replies to them are the
    /// kernel's).
    pub fn build(
        config: &Config,
        generation: u64,
        links: Links,
        local: &[IpAddr],
        mac_of: &dyn Fn(&IpAddr) -> Option<Mac>,
    ) -> Result<Snapshot, String> {
        let mut backends: Vec<BackendEntry> = Vec::new();
        let mut backend_index: FxMap<L4Key, u32> = FxMap::default();
        let mut services = Vec::with_capacity(config.services.len());
        for svc in &config.services {
            let proto = proto_number(svc.protocol);
            let mut ids = Vec::with_capacity(svc.servers.len());
            let mut mag = Vec::with_capacity(svc.servers.len());
            for s in &svc.servers {
                let key = L4Key {
                    addr: addr16(&s.address),
                    port: s.port,
                    proto,
                };
                let id = *backend_index.entry(key).or_insert_with(|| {
                    backends.push(BackendEntry {
                        address: s.address,
                        addr16: key.addr,
                        port: s.port,
                        protocol: svc.protocol,
                        mac: mac_of(&s.address),
                    });
                    (backends.len() - 1) as u32
                });
                ids.push(id);
                mag.push(MaglevBackend::new(s.address, s.port, s.weight));
            }
            let maglev = Maglev::build(&mag, DEFAULT_TABLE_SIZE)
                .map_err(|e| format!("backend service {}: {e}", svc.name))?;
            services.push(ServiceEntry {
                name: svc.name.clone(),
                maglev,
                backends: ids,
            });
        }

        let mut listeners = Vec::with_capacity(config.listeners.len());
        let mut listener_index = FxMap::default();
        let mut vips = FxSet::default();
        for (i, l) in config.listeners.iter().enumerate() {
            let vip16 = addr16(&l.vip);
            listener_index.insert(
                L4Key {
                    addr: vip16,
                    port: l.port,
                    proto: proto_number(l.protocol),
                },
                i as u32,
            );
            vips.insert(vip16);
            listeners.push(ListenerEntry {
                name: l.name.clone(),
                vip: l.vip,
                vip16,
                port: l.port,
                protocol: l.protocol,
                service: l.service as u32,
            });
        }
        let backend_hosts = backends.iter().map(|b| b.addr16).collect();
        Ok(Snapshot {
            generation,
            listeners,
            services,
            backends,
            links,
            listener_index,
            backend_index,
            vips,
            backend_hosts,
            local: local.iter().map(addr16).collect(),
        })
    }

    #[inline]
    pub fn listener(&self, addr: &Addr16, port: u16, proto: u8) -> Option<u32> {
        self.listener_index
            .get(&L4Key {
                addr: *addr,
                port,
                proto,
            })
            .copied()
    }

    #[inline]
    pub fn backend(&self, addr: &Addr16, port: u16, proto: u8) -> Option<u32> {
        self.backend_index
            .get(&L4Key {
                addr: *addr,
                port,
                proto,
            })
            .copied()
    }

    #[inline]
    pub fn is_vip(&self, addr: &Addr16) -> bool {
        self.vips.contains(addr)
    }

    #[inline]
    pub fn is_backend_host(&self, addr: &Addr16) -> bool {
        self.backend_hosts.contains(addr)
    }

    #[inline]
    pub fn is_local(&self, addr: &Addr16) -> bool {
        self.local.contains(addr)
    }

    /// The scheduler: the backend id for a new flow from `client` (address
    /// bytes as on the wire: 4 for IPv4, 16 for IPv6) to `service`. This is
    /// the one function both the data plane and `l4lb simulate` call.
    #[inline]
    pub fn pick(&self, service: u32, client: &[u8]) -> Option<u32> {
        let svc = &self.services[service as usize];
        svc.maglev
            .lookup(client_hash_bytes(client))
            .map(|i| svc.backends[i as usize])
    }

    /// Addresses the XDP program must know: (VIPs, listeners, backend hosts,
    /// local addresses).
    pub fn steering_sets(&self) -> (Vec<Addr16>, Vec<L4Key>, Vec<Addr16>, Vec<Addr16>) {
        (
            self.vips.iter().copied().collect(),
            self.listener_index.keys().copied().collect(),
            self.backend_hosts.iter().copied().collect(),
            self.local.iter().copied().collect(),
        )
    }
}
