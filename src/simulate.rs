//! `l4lb simulate`: which backend each client would reach, computed by the
//! data plane's own scheduler code ([`Snapshot::pick`]) with every server up.

use crate::config::Config;
use crate::control::snapshot::{Links, Snapshot};
use anyhow::{anyhow, Result};
use std::io::{BufRead, Write};
use std::net::{IpAddr, SocketAddr};

fn parse_client(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip()))
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
        Snapshot::build(config, 0, Links::default(), &[], &|_| None).map_err(anyhow::Error::msg)?;
    let l = &snap.listeners[li];
    let mut bad = 0;
    for (n, line) in input.lines().enumerate() {
        let line = line?;
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
        match snap.pick(l.service, &wire(&ip)) {
            Some(b) => {
                let be = &snap.backends[b as usize];
                writeln!(out, "{t} {}", SocketAddr::new(be.address, be.port))?;
            }
            None => writeln!(out, "{t} none")?,
        }
    }
    Ok(bad)
}
