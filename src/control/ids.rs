//! Stable ids for listeners, backend services and backends.
//!
//! Flow and persistence entries, and per-worker counters, refer to these ids,
//! so they must mean the same thing across reloads: a name (or a backend's
//! address:port/protocol) keeps its id for the life of the process. Ids start
//! at 1 so that 0 means "none" (Katran's convention) and are never reused,
//! so an entry that outlived its listener or backend can never be mistaken
//! for a new one.

use crate::config::Protocol;
use std::collections::HashMap;
use std::net::IpAddr;

/// Ids are u16: the largest id is 65535.
pub const MAX_ID: usize = u16::MAX as usize;

#[derive(Debug, Default, Clone)]
pub struct Ids {
    listeners: HashMap<String, u16>,
    services: HashMap<String, u16>,
    backends: HashMap<(IpAddr, u16, Protocol), u16>,
}

fn assign<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, u16>,
    key: K,
    what: &str,
) -> Result<u16, String> {
    if let Some(id) = map.get(&key) {
        return Ok(*id);
    }
    let next = map.len() + 1;
    if next > MAX_ID {
        return Err(format!(
            "more than {MAX_ID} distinct {what} since start-up: restart l4lb to renumber"
        ));
    }
    map.insert(key, next as u16);
    Ok(next as u16)
}

impl Ids {
    pub fn listener(&mut self, name: &str) -> Result<u16, String> {
        assign(&mut self.listeners, name.to_string(), "listeners")
    }
    pub fn service(&mut self, name: &str) -> Result<u16, String> {
        assign(&mut self.services, name.to_string(), "backend services")
    }
    pub fn backend(&mut self, addr: IpAddr, port: u16, proto: Protocol) -> Result<u16, String> {
        assign(&mut self.backends, (addr, port, proto), "backends")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_start_at_one_are_stable_and_never_reused() {
        let mut ids = Ids::default();
        assert_eq!(ids.listener("web"), Ok(1));
        assert_eq!(ids.listener("echo"), Ok(2));
        assert_eq!(ids.listener("web"), Ok(1));
        let a: IpAddr = "198.18.2.11".parse().unwrap();
        assert_eq!(ids.backend(a, 8080, Protocol::Tcp), Ok(1));
        assert_eq!(ids.backend(a, 8080, Protocol::Udp), Ok(2));
        assert_eq!(ids.backend(a, 8080, Protocol::Tcp), Ok(1));
        assert_eq!(ids.service("web"), Ok(1));
    }
}
