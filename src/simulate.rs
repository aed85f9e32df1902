//! `l4lb simulate`: which backend each client would reach, computed by the
//! data plane's own scheduler code ([`Snapshot::schedule`]) with every
//! server up.
//!
//! The stateful schedulers need assumptions, stated in `--help` and here:
//! * weighted round robin: one worker, starting at the beginning of its
//!   sequence, each input line one new connection, in input order;
//! * weighted least connections: no connection is open at the start, and
//!   every input line opens one connection that stays open.
//!
//! Persistence does not change the first answer for a client; a client
//! listed twice gets its persisted backend the second time, as live.

/// Scheduler state of a simulation: one cursor, connections never close.
#[derive(Default)]
struct SimState {
    cursor: RefCell<HashMap<u16, u32>>,
    active: RefCell<HashMap<u16, i64>>,
}

impl SchedState for SimState {
    fn wrr_next(&self, service_id: u16) -> u32 {
        let mut c = self.cursor.borrow_mut();
        let n = c.entry(service_id).or_default();
        let out = *n;
        *n = n.wrapping_add(1);
        out
    }
    fn active(&self, backend_id: u16) -> i64 {
        self.active.borrow().get(&backend_id).copied().unwrap_or(0)
    }
}

use crate::config::Config;
use crate::config::Scheduler;
use crate::control::snapshot::{Links, SchedState, Snapshot};
use crate::dataplane::packet::{is_martian_source, is_v4_mapped};
use crate::util::addr16;
use anyhow::{anyhow, Result};
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::net::{IpAddr, SocketAddr};

fn parse_client(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

/// Why the data plane drops every packet from `ip`, if it does: a source
/// no router forwards from (`bad_source`), or an IPv4-mapped IPv6 address,
/// which never appears on the wire (`malformed`).
fn never_a_client(ip: &IpAddr) -> Option<&'static str> {
    let a = addr16(ip);
    if ip.is_ipv6() && is_v4_mapped(&a) {
        Some(
            "is an IPv4-mapped address, never seen on the wire: l4lb drops its packets (malformed)",
        )
    } else if is_martian_source(&a, ip.is_ipv6()) {
        Some("is a source no router forwards from: l4lb drops its packets (bad_source)")
    } else {
        None
    }
}

fn wire(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Reads clients from `input` (one `ADDR` or `ADDR:PORT` per line; blank
/// lines and `#` comments skipped) and writes `CLIENT BACKEND_ADDR:PORT` (or
/// `CLIENT none`) per client. Bad lines are reported on `errors` as
/// `<stdin>:LINE: ...`; returns how many there were.
pub fn simulate(
    config: &Config,
    listener: &str,
    input: impl BufRead,
    mut out: impl Write,
    mut errors: impl Write,
) -> Result<usize> {
    let li = config
        .listeners
        .iter()
        .position(|l| l.name == listener)
        .ok_or_else(|| {
            let names: Vec<&str> = config.listeners.iter().map(|l| l.name.as_str()).collect();
            anyhow!("no listener {listener:?} (defined: {})", names.join(", "))
        })?;
    let snap =
        Snapshot::offline(config, Links::default(), &|_| None).map_err(anyhow::Error::msg)?;
    let l = &snap.listeners[li];
    let svc = &snap.services[l.service as usize];
    let state = SimState::default();
    let mut persisted: HashMap<IpAddr, u32> = HashMap::new();
    let mut bad = 0;
    for (n, line) in input.split(b'\n').enumerate() {
        let line = line?;
        let Ok(line) = std::str::from_utf8(&line) else {
            bad += 1;
            writeln!(errors, "<stdin>:{}: the line is not valid UTF-8", n + 1)?;
            continue;
        };
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let Some(ip) = parse_client(t) else {
            bad += 1;
            writeln!(
                errors,
                "<stdin>:{}: {t:?} is not an address or address:port",
                n + 1
            )?;
            continue;
        };
        if ip.is_ipv4() != l.vip.is_ipv4() {
            bad += 1;
            writeln!(
                errors,
                "<stdin>:{}: {ip} is not of the family of listener {listener} ({})",
                n + 1,
                l.vip
            )?;
            continue;
        }
        // The data plane opens no flow for these (`Processor::open`,
        // `parse`): no connection to answer, and no scheduler state moves.
        if let Some(why) = never_a_client(&ip) {
            bad += 1;
            writeln!(errors, "<stdin>:{}: {ip} {why}", n + 1)?;
            continue;
        }
        let choice = match persisted.get(&ip) {
            Some(b) => Some(*b),
            None => snap.schedule(l.service, &wire(&ip), &state),
        };
        if let Some(b) = choice {
            if svc.persistence_timeout > 0 {
                persisted.insert(ip, b);
            }
            if svc.scheduler == Scheduler::WeightedLeastConnections {
                *state
                    .active
                    .borrow_mut()
                    .entry(snap.backends[b as usize].id)
                    .or_default() += 1;
            }
        }
        match choice {
            Some(b) => {
                let be = &snap.backends[b as usize];
                writeln!(out, "{t} {}", SocketAddr::new(be.address, be.port))?;
            }
            None => writeln!(out, "{t} none")?,
        }
    }
    Ok(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IPv6 sources the data plane drops are reported, not answered: the
    /// IPv4-mapped form (`malformed`) and the martians (`bad_source`).
    #[test]
    fn ipv6_sources_the_data_plane_drops_are_reported() {
        let text = include_str!("../config/dual-stack.toml");
        let config = Config::from_str(text, "dual-stack.toml").expect("valid");
        let input = "2001:2:0:4::1\n::ffff:198.18.4.1\n::1\n[fe80::1]:80\nff02::1\n::\n";
        let (mut out, mut errors) = (Vec::new(), Vec::new());
        let bad = simulate(&config, "web6", input.as_bytes(), &mut out, &mut errors).unwrap();
        assert_eq!(bad, 5);
        let out = String::from_utf8(out).unwrap();
        assert!(out.starts_with("2001:2:0:4::1 [2001:2:"), "{out}");
        assert_eq!(out.lines().count(), 1, "{out}");
        let martian = "is a source no router forwards from: l4lb drops its packets (bad_source)";
        assert_eq!(
            String::from_utf8(errors).unwrap(),
            format!(
                "<stdin>:2: ::ffff:198.18.4.1 is an IPv4-mapped address, never seen on the wire: \
                 l4lb drops its packets (malformed)\n\
                 <stdin>:3: ::1 {martian}\n<stdin>:4: fe80::1 {martian}\n\
                 <stdin>:5: ff02::1 {martian}\n<stdin>:6: :: {martian}\n"
            )
        );
    }
}
