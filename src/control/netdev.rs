//! What the control plane asks the kernel about interfaces: index, MAC,
//! addresses, and next-hop MACs from the neighbour table (rtnetlink).

use crate::util::Mac;
use anyhow::{bail, Context, Result};
use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub fn ifindex(name: &str) -> Result<u32> {
    let c = CString::new(name).context("interface name contains NUL")?;
    // SAFETY: valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        bail!("interface {name} not found in this network namespace");
    }
    Ok(idx)
}

/// Runs the interface ioctl `request` on `name`, with an `ifreq` naming
/// the interface and then set up by `prepare`, and returns it as the
/// kernel filled it, or the ioctl's error. The outer error is the socket
/// to ask with failing; `what` names the value read.
fn ifreq_ioctl(
    name: &str,
    request: libc::c_ulong,
    what: &str,
    prepare: impl FnOnce(&mut libc::ifreq),
) -> Result<std::io::Result<libc::ifreq>> {
    // SAFETY: a plain datagram socket used for one ioctl, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("socket for reading the {what} of {name}"));
    }
    // SAFETY: ifreq is plain data; zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = s as libc::c_char;
    }
    prepare(&mut req);
    // SAFETY: fd is valid and req is an initialised ifreq, which the
    // request reads or fills (any buffer `prepare` pointed it at is the
    // caller's, alive across this call).
    let ret = unsafe { libc::ioctl(fd, request, &mut req) };
    let err = std::io::Error::last_os_error();
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    Ok(if ret < 0 { Err(err) } else { Ok(req) })
}

/// Runs the interface ioctl `request` (a `SIOCGIF*` read) on `name` and
/// returns the filled `ifreq`; `what` names the value for errors.
fn ifreq_get(name: &str, request: libc::c_ulong, what: &str) -> Result<libc::ifreq> {
    ifreq_ioctl(name, request, what, |_| {})?
        .with_context(|| format!("reading the {what} of {name}"))
}

pub fn mac(name: &str) -> Result<Mac> {
    let req = ifreq_get(name, libc::SIOCGIFHWADDR, "MAC address")?;
    // SAFETY: SIOCGIFHWADDR filled the hwaddr member of the union.
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut m = [0u8; 6];
    for (d, s) in m.iter_mut().zip(sa.sa_data.iter()) {
        *d = *s as u8;
    }
    Ok(m)
}

/// The interface's MTU (bytes of IP packet, Ethernet header not counted).
pub fn mtu(name: &str) -> Result<u32> {
    let req = ifreq_get(name, libc::SIOCGIFMTU, "MTU")?;
    // SAFETY: SIOCGIFMTU filled the mtu member of the union.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };
    u32::try_from(mtu).with_context(|| format!("{name} reports a negative MTU ({mtu})"))
}

/// `struct ethtool_channels` (linux/ethtool.h).
#[repr(C)]
#[derive(Default)]
struct EthtoolChannels {
    cmd: u32,
    max_rx: u32,
    max_tx: u32,
    max_other: u32,
    max_combined: u32,
    rx_count: u32,
    tx_count: u32,
    other_count: u32,
    combined_count: u32,
}

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GCHANNELS: u32 = 0x3c;

/// The RX and TX queues `name` has now (`ethtool -l`: combined channels
/// count for both), or None if its driver does not say.
pub fn queues(name: &str) -> Result<Option<(u32, u32)>> {
    let mut ch = EthtoolChannels {
        cmd: ETHTOOL_GCHANNELS,
        ..Default::default()
    };
    let ch_ptr: *mut EthtoolChannels = &mut ch;
    // `ch` lives across the call and is what ETHTOOL_GCHANNELS fills.
    let got = ifreq_ioctl(name, SIOCETHTOOL, "queues", |req| {
        req.ifr_ifru.ifru_data = ch_ptr.cast();
    })?;
    match got {
        Ok(_) => Ok(Some((
            ch.rx_count + ch.combined_count,
            ch.tx_count + ch.combined_count,
        ))),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading the queues of {name}")),
    }
}

/// The broadcast addresses the kernel accepts for IPv4 address `addr` with
/// netmask `mask` on an interface with broadcast address `brd` (if set):
/// `brd`, and the prefix's all-ones address, which the kernel adds for
/// prefixes shorter than /31 even when no `brd` was given.
fn broadcasts(addr: Ipv4Addr, mask: Option<Ipv4Addr>, brd: Option<Ipv4Addr>) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    if let Some(mask) = mask {
        let m = u32::from(mask);
        if m.count_ones() < 31 {
            out.push(Ipv4Addr::from(u32::from(addr) | !m));
        }
    }
    if let Some(b) = brd {
        if !b.is_unspecified() && !b.is_broadcast() && !out.contains(&b) {
            out.push(b);
        }
    }
    out
}

/// The IPv4 and IPv6 addresses of this host: of every interface in the
/// network namespace, not only l4lb's two, with the IPv4 subnets'
/// broadcast addresses (a server's broadcast to its subnet reaches this
/// host's kernel too). A server's packet to any of
/// them (a management address on another interface, a loopback /32) is
/// for this host's kernel, not a reply to forward.
pub fn host_addresses() -> Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getifaddrs");
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr is non-null and its family tells its type.
        unsafe {
            match (*ifa.ifa_addr).sa_family as i32 {
                libc::AF_INET => {
                    let v4 = |sa: *const libc::sockaddr| {
                        (!sa.is_null() && (*sa).sa_family as i32 == libc::AF_INET).then(|| {
                            let sin = &*(sa as *const libc::sockaddr_in);
                            Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))
                        })
                    };
                    let Some(addr) = v4(ifa.ifa_addr) else {
                        continue;
                    };
                    out.push(IpAddr::V4(addr));
                    let brd = if ifa.ifa_flags & libc::IFF_BROADCAST as u32 != 0 {
                        v4(ifa.ifa_ifu)
                    } else {
                        None
                    };
                    out.extend(
                        broadcasts(addr, v4(ifa.ifa_netmask), brd)
                            .into_iter()
                            .map(IpAddr::V4),
                    );
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                }
                _ => {}
            }
        }
    }
    // SAFETY: head came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    // Addresses of one subnet share its broadcast address: listed once.
    out.sort();
    out.dedup();
    Ok(out)
}

const RTM_NEWNEIGH: u16 = 28;
const RTM_GETNEIGH: u16 = 30;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const NTF_USE: u8 = 0x01;
/// Entry states with a usable link-layer address.
const NUD_USABLE: u16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80;

/// A neighbour table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub addr: IpAddr,
    pub mac: Mac,
}

struct Netlink(i32);

impl Netlink {
    fn open() -> Result<Netlink> {
        // SAFETY: creating a netlink socket.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("opening an rtnetlink socket");
        }
        let tv = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: setting a receive timeout on our socket.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        Ok(Netlink(fd))
    }

    fn send(&self, msg: &[u8]) -> Result<()> {
        // SAFETY: msg is a valid buffer.
        let n = unsafe { libc::send(self.0, msg.as_ptr() as *const libc::c_void, msg.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error()).context("sending to rtnetlink");
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> Result<usize> {
        // SAFETY: buf is a valid writable buffer.
        let n = unsafe { libc::recv(self.0, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error()).context("reading from rtnetlink");
        }
        Ok(n as usize)
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        // SAFETY: our fd.
        unsafe { libc::close(self.0) };
    }
}

fn nl_header(buf: &mut Vec<u8>, ty: u16, flags: u16) {
    buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched later
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&1u32.to_ne_bytes()); // seq
    buf.extend_from_slice(&0u32.to_ne_bytes()); // pid: kernel assigns
}

fn ndmsg(buf: &mut Vec<u8>, family: u8, ifindex: u32, state: u16, flags: u8) {
    buf.push(family);
    buf.extend_from_slice(&[0, 0, 0]);
    buf.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    buf.extend_from_slice(&state.to_ne_bytes());
    buf.push(flags);
    buf.push(0);
}

fn finish(buf: &mut [u8]) {
    let len = buf.len() as u32;
    buf[..4].copy_from_slice(&len.to_ne_bytes());
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Dumps the neighbour table (both families).
pub fn neighbours() -> Result<Vec<Neighbour>> {
    let nl = Netlink::open()?;
    let mut req = Vec::with_capacity(32);
    nl_header(&mut req, RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP);
    ndmsg(&mut req, libc::AF_UNSPEC as u8, 0, 0, 0);
    finish(&mut req);
    nl.send(&req)?;

    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = nl.recv(&mut buf)?;
        let mut off = 0;
        while off + 16 <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4")) as usize;
            let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().expect("2"));
            if len < 16 || off + len > n {
                bail!("malformed rtnetlink reply");
            }
            match ty {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => bail!("rtnetlink refused the neighbour dump"),
                _ => {
                    if let Some(nb) = parse_neigh(&buf[off + 16..off + len]) {
                        out.push(nb);
                    }
                }
            }
            off += align4(len);
        }
    }
}

fn parse_neigh(m: &[u8]) -> Option<Neighbour> {
    if m.len() < 12 {
        return None;
    }
    let family = m[0] as i32;
    let ifindex = i32::from_ne_bytes(m[4..8].try_into().ok()?) as u32;
    let state = u16::from_ne_bytes(m[8..10].try_into().ok()?);
    if state & NUD_USABLE == 0 {
        return None;
    }
    let mut addr = None;
    let mut mac = None;
    let mut off = 12;
    while off + 4 <= m.len() {
        let alen = u16::from_ne_bytes(m[off..off + 2].try_into().ok()?) as usize;
        let aty = u16::from_ne_bytes(m[off + 2..off + 4].try_into().ok()?);
        if alen < 4 || off + alen > m.len() {
            break;
        }
        let payload = &m[off + 4..off + alen];
        match (aty, family, payload.len()) {
            (NDA_DST, libc::AF_INET, 4) => {
                addr = Some(IpAddr::V4(Ipv4Addr::new(
                    payload[0], payload[1], payload[2], payload[3],
                )))
            }
            (NDA_DST, libc::AF_INET6, 16) => {
                let b: [u8; 16] = payload.try_into().ok()?;
                addr = Some(IpAddr::V6(Ipv6Addr::from(b)));
            }
            (NDA_LLADDR, _, 6) => mac = Some(payload.try_into().ok()?),
            _ => {}
        }
        off += align4(alen);
    }
    Some(Neighbour {
        ifindex,
        addr: addr?,
        mac: mac?,
    })
}

/// Asks the kernel to resolve `addr` on `ifindex` (ARP / neighbour
/// solicitation), without sending anything to the address itself: an
/// RTM_NEWNEIGH with NTF_USE triggers the kernel's own resolution.
pub fn solicit(ifindex: u32, addr: &IpAddr) -> Result<()> {
    let nl = Netlink::open()?;
    let (family, bytes): (u8, Vec<u8>) = match addr {
        IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
    };
    let mut req = Vec::with_capacity(48);
    nl_header(
        &mut req,
        RTM_NEWNEIGH,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
    );
    ndmsg(&mut req, family, ifindex, 0, NTF_USE);
    let alen = 4 + bytes.len();
    req.extend_from_slice(&(alen as u16).to_ne_bytes());
    req.extend_from_slice(&NDA_DST.to_ne_bytes());
    req.extend_from_slice(&bytes);
    req.resize(align4(req.len()), 0);
    finish(&mut req);
    nl.send(&req)?;
    let mut buf = [0u8; 1024];
    let n = nl.recv(&mut buf)?;
    if n >= 20 && u16::from_ne_bytes(buf[4..6].try_into().expect("2")) == NLMSG_ERROR {
        let code = i32::from_ne_bytes(buf[16..20].try_into().expect("4"));
        if code != 0 {
            return Err(std::io::Error::from_raw_os_error(-code))
                .with_context(|| format!("asking the kernel to resolve {addr}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn a_subnets_broadcast_is_the_hosts_even_without_brd() {
        let mask = Some(ip("255.255.255.0"));
        assert_eq!(
            broadcasts(ip("198.18.2.1"), mask, None),
            [ip("198.18.2.255")]
        );
        // `ip addr add ... brd +` sets the same one: listed once.
        let brd = Some(ip("198.18.2.255"));
        assert_eq!(
            broadcasts(ip("198.18.2.1"), mask, brd),
            [ip("198.18.2.255")]
        );
        // An explicit broadcast of another value is accepted too.
        let odd = Some(ip("198.18.2.127"));
        assert_eq!(
            broadcasts(ip("198.18.2.1"), mask, odd),
            [ip("198.18.2.255"), ip("198.18.2.127")]
        );
    }

    #[test]
    fn point_to_point_and_host_prefixes_have_no_broadcast() {
        for (addr, mask) in [
            ("198.18.9.1", "255.255.255.255"),
            ("198.18.9.0", "255.255.255.254"),
        ] {
            assert_eq!(
                broadcasts(ip(addr), Some(ip(mask)), None),
                Vec::<Ipv4Addr>::new()
            );
        }
        assert_eq!(
            broadcasts(ip("198.18.9.1"), None, None),
            Vec::<Ipv4Addr>::new()
        );
        // 0.0.0.0 and the limited broadcast are not subnet broadcasts.
        for b in ["0.0.0.0", "255.255.255.255"] {
            let m = Some(ip("255.255.255.255"));
            assert_eq!(
                broadcasts(ip("198.18.9.1"), m, Some(ip(b))),
                Vec::<Ipv4Addr>::new()
            );
        }
    }
}
