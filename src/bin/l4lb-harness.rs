//! Test and demo helper for the network-namespace harness (`scripts/netns.sh`).
//!
//! * `serve` runs in a backend namespace: a minimal HTTP/1.1 server and a UDP
//!   echo, on IPv4 and IPv6, both answering with the backend's name and the client address the
//!   backend saw, so that a driver can tell which backend a load-balanced
//!   request reached and whether the client address survived the trip.
//! * `drive` runs in the client namespace: it sends requests to the VIPs from
//!   many source addresses and reports, per request, which backend answered,
//!   which peer the backend saw and where the reply came from.
//!
//! Deliberately self-contained (no use of the l4lb library) so that it keeps
//! working while the data plane is broken: it is the tool that finds out.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::{self, BufWriter, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener,
    TcpStream, UdpSocket,
};
use std::os::fd::{AsRawFd, RawFd};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Concurrent TCP connections a backend serves; further ones wait in the
/// listen backlog rather than exhausting threads.
const MAX_CONNS: usize = 512;
/// Per-connection read/write timeout of the backend, so that a half-open
/// client cannot hold one of the connection slots forever. Well above the
/// longest idle hold the tests use (`--hold-ms` up to 5000): at 5 s, a
/// held connection's request raced the backend's timeout, and under load
/// (the netns tests in parallel on 2 CPUs) a CI run saw 23 held
/// connections closed empty.
const SERVE_IO_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest request head the backend accepts.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Small stacks: a connection thread only formats one short reply.
const CONN_THREAD_STACK: usize = 64 * 1024;
/// Largest reply the driver reads; the real one is well under 200 bytes.
const MAX_REPLY: usize = 64 * 1024;
/// Upper bound on the requests of one `drive` run, so that a typo in
/// `--conns` or `--sources` cannot turn into an endless flood.
const MAX_REQUESTS: u64 = 2_000_000;

const HTTP_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: l4lb\r\nConnection: close\r\n\r\n";
const UDP_PING: &[u8] = b"ping";

#[derive(Parser)]
#[command(
    name = "l4lb-harness",
    version,
    about = "Backends and client driver for the l4lb network-namespace harness"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run an HTTP and UDP-echo backend that reports its name and the peer it saw.
    Serve(ServeArgs),
    /// Send requests to VIPs from many source addresses and report the backends reached.
    Drive(DriveArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Backend name put first in every reply (one word).
    #[arg(long)]
    name: String,
    #[arg(long, default_value_t = 8080)]
    tcp_port: u16,
    #[arg(long, default_value_t = 9053)]
    udp_port: u16,
    /// HTTP status of every reply (e.g. 503 to make health checks fail).
    #[arg(long, default_value_t = 200,
          value_parser = clap::value_parser!(u16).range(100..=599))]
    http_status: u16,
}

#[derive(Args)]
struct DriveArgs {
    // (Help as an attribute: in a doc comment, rustdoc reads "[IPV6]" as
    // an intra-doc link.)
    #[arg(
        long,
        value_delimiter = ',',
        help = "TCP targets (HTTP), comma-separated IP:PORT ([IPV6]:PORT for IPv6)"
    )]
    vip_tcp: Vec<SocketAddr>,
    #[arg(
        long,
        value_delimiter = ',',
        help = "UDP targets (echo), comma-separated IP:PORT ([IPV6]:PORT for IPv6)"
    )]
    vip_udp: Vec<SocketAddr>,
    /// Inclusive source address range FIRST-LAST, IPv4 or IPv6 (IPv4
    /// addresses ending in .0 or .255 are skipped); of the targets' family.
    #[arg(long, value_parser = parse_source_range)]
    sources: SourceRange,
    /// Requests per source and target.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    conns: u32,
    /// Worker threads; each takes whole sources.
    #[arg(long, default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    parallel: u32,
    /// Bound on one whole request (connect + send + receive), in milliseconds.
    #[arg(long, default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    timeout_ms: u64,
    /// Hold each connection open this long before using it (TCP: between
    /// connect and request; UDP: between two pings from the same socket, the
    /// second of which must reach the same backend). Keeps flows established
    /// across a reload or drain. Added to the per-request timeout.
    #[arg(long, default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    hold_ms: u64,
    /// UDP: connect the socket to the target, so that an ICMP error about
    /// the request (e.g. port unreachable, translated by l4lb) fails the
    /// receive with its error, "Connection refused", rather than a timeout.
    /// (A connected socket also discards replies from other addresses.)
    #[arg(long, conflicts_with = "udp_send_only")]
    udp_connect: bool,
    /// UDP: send each request and close the socket at once, without waiting
    /// for the reply: the reply then finds no socket, and this host's kernel
    /// answers it with ICMP port unreachable, to the VIP. (The socket is
    /// connected to another port of the target, so that a reply arriving
    /// before the close finds no socket either.) A request counts as done
    /// when sent.
    #[arg(long)]
    udp_send_only: bool,
    /// UDP: bytes of payload per request ("ping", padded with dots): with
    /// 1750, a request is a 1792-byte Ethernet frame.
    #[arg(long, default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(4..=2000))]
    udp_size: u16,
    /// Print one JSON object with every request's result to stdout.
    #[arg(long)]
    json: bool,
    /// Print a per-target table (to stderr when --json is also given).
    #[arg(long)]
    summary: bool,
}

/// An error in what the user asked for: exit status 2, like clap's own.
#[derive(Debug)]
struct UsageError(String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn usage_error(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Serve(args) => serve(args),
        Cmd::Drive(args) => drive(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<UsageError>().is_some() => {
            eprintln!("l4lb-harness: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("l4lb-harness: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------

/// The test ranges, the only addresses the harness may send to or from:
/// 198.18.0.0/15 (RFC 2544) and 2001:2::/48 (RFC 5180).
const TEST_RANGES: &str = "198.18.0.0/15 or 2001:2::/48";

fn in_test_range(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => u32::from(a) & 0xfffe_0000 == u32::from(Ipv4Addr::new(198, 18, 0, 0)),
        IpAddr::V6(a) => a.segments()[..3] == [0x2001, 2, 0],
    }
}

/// Most addresses one source range may hold: netns.sh configures 1016 of
/// each family, and a range is expanded into a list before the run.
const MAX_SOURCES: u128 = 65_536;

#[derive(Clone, Debug, PartialEq)]
struct SourceRange {
    first: IpAddr,
    last: IpAddr,
}

impl SourceRange {
    /// The usable addresses. For IPv4, .0 and .255 are network/broadcast
    /// addresses of the client's /24s and are never configured by netns.sh.
    fn addresses(&self) -> Vec<IpAddr> {
        match (self.first, self.last) {
            (IpAddr::V4(first), IpAddr::V4(last)) => (u32::from(first)..=u32::from(last))
                .map(Ipv4Addr::from)
                .filter(|ip| !matches!(ip.octets()[3], 0 | 255))
                .map(IpAddr::V4)
                .collect(),
            (IpAddr::V6(first), IpAddr::V6(last)) => (u128::from(first)..=u128::from(last))
                .map(|a| IpAddr::V6(Ipv6Addr::from(a)))
                .collect(),
            // parse_source_range accepts one family only.
            _ => Vec::new(),
        }
    }
}

fn parse_source_range(s: &str) -> Result<SourceRange, String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let first: IpAddr = a.trim().parse().map_err(|_| format!("bad address '{a}'"))?;
    let last: IpAddr = b.trim().parse().map_err(|_| format!("bad address '{b}'"))?;
    let count = match (first, last) {
        (IpAddr::V4(f), IpAddr::V4(l)) => u128::from(u32::from(l)).checked_sub(u32::from(f).into()),
        (IpAddr::V6(f), IpAddr::V6(l)) => u128::from(l).checked_sub(u128::from(f)),
        _ => {
            return Err(format!(
                "{first} and {last} are of different address families"
            ))
        }
    };
    match count {
        None => Err(format!("{first} comes after {last}")),
        Some(n) if n >= MAX_SOURCES => Err(format!(
            "{first}-{last} holds more than {MAX_SOURCES} addresses"
        )),
        Some(_) => Ok(SourceRange { first, last }),
    }
}

// ---------------------------------------------------------------------------
// serve
// ---------------------------------------------------------------------------

fn serve(args: ServeArgs) -> Result<()> {
    // The driver splits replies on whitespace: a name with spaces would be
    // misread as name + peer.
    if args.name.is_empty() || args.name.chars().any(char::is_whitespace) {
        return Err(usage_error("--name must be one non-empty word"));
    }
    exit_on_termination_signals()?;

    let name: Arc<str> = Arc::from(args.name.as_str());
    // One socket per family and protocol (IPv6 ones are IPv6-only), so
    // that peers are reported in their own family, never IPv4-mapped.
    let tcp4 = tcp_listener(Domain::IPV4, args.tcp_port)?;
    let tcp6 = tcp_listener(Domain::IPV6, args.tcp_port)?;
    let slots = Arc::new(Slots {
        free: Mutex::new(MAX_CONNS),
        freed: Condvar::new(),
    });
    for (family, domain) in [("4", Domain::IPV4), ("6", Domain::IPV6)] {
        let udp = udp_echo_socket(domain, args.udp_port)?;
        let udp_name = Arc::clone(&name);
        thread::Builder::new()
            .name(format!("udp-echo{family}"))
            .spawn(move || udp_echo_loop(&udp, &udp_name))
            .context("spawning a UDP thread")?;
    }
    {
        let (name, slots) = (Arc::clone(&name), Arc::clone(&slots));
        let status = args.http_status;
        thread::Builder::new()
            .name("accept6".into())
            .spawn(move || accept_loop(&tcp6, &name, &slots, status))
            .context("spawning the IPv6 accept thread")?;
    }

    eprintln!(
        "serving {} on tcp/{} udp/{}, IPv4 and IPv6",
        name, args.tcp_port, args.udp_port
    );
    accept_loop(&tcp4, &name, &slots, args.http_status)
}

/// SIGTERM/SIGINT end the process at once with status 0. The server holds no
/// state worth flushing, and exiting from the handler avoids having to wake
/// threads blocked in accept()/recv().
fn exit_on_termination_signals() -> Result<()> {
    extern "C" fn exit_now(_sig: libc::c_int) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(0) }
    }
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value;
        // the handler only calls an async-signal-safe function.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = exit_now as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("installing signal handler");
        }
    }
    Ok(())
}

/// The wildcard address of `domain`'s family.
fn unspecified(domain: Domain, port: u16) -> SocketAddr {
    if domain == Domain::IPV6 {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))
    } else {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
    }
}

/// A socket of `domain`; IPv6 ones take IPv6 only.
fn server_socket(domain: Domain, ty: Type, proto: Protocol) -> Result<Socket> {
    let sock = Socket::new(domain, ty, Some(proto))?;
    if domain == Domain::IPV6 {
        sock.set_only_v6(true)?;
    }
    Ok(sock)
}

fn tcp_listener(domain: Domain, port: u16) -> Result<TcpListener> {
    let addr = unspecified(domain, port);
    let sock = server_socket(domain, Type::STREAM, Protocol::TCP)?;
    // Restarting a backend must not wait for its old connections' TIME_WAIT.
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())
        .with_context(|| format!("binding tcp/{port}"))?;
    // Bursts of hundreds of sources connect at once.
    sock.listen(4096)?;
    Ok(sock.into())
}

fn udp_echo_socket(domain: Domain, port: u16) -> Result<UdpSocket> {
    let addr = unspecified(domain, port);
    let sock = server_socket(domain, Type::DGRAM, Protocol::UDP)?;
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())
        .with_context(|| format!("binding udp/{addr}"))?;
    let sock: UdpSocket = sock.into();
    if domain == Domain::IPV6 {
        set_int_opt(
            sock.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_RECVPKTINFO,
            1,
        )
        .context("setting IPV6_RECVPKTINFO")?;
    } else {
        set_int_opt(sock.as_raw_fd(), libc::IPPROTO_IP, libc::IP_PKTINFO, 1)
            .context("setting IP_PKTINFO")?;
    }
    Ok(sock)
}

/// A counting semaphore for the connection cap.
struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

/// Gives its slot back when the connection thread ends, however it ends.
struct SlotGuard(Arc<Slots>);

impl Slots {
    fn acquire(self: &Arc<Self>) -> SlotGuard {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= 1;
        SlotGuard(Arc::clone(self))
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut free = self.0.free.lock().unwrap_or_else(|p| p.into_inner());
        *free += 1;
        self.0.freed.notify_one();
    }
}

/// Serves `listener` for ever; the connection cap `slots` is shared by the
/// IPv4 and IPv6 listeners.
fn accept_loop(listener: &TcpListener, name: &Arc<str>, slots: &Arc<Slots>, status: u16) -> ! {
    loop {
        // Take the slot before accepting, so that excess connections wait in
        // the kernel's backlog instead of being accepted and starved.
        let slot = slots.acquire();
        let (stream, peer) = match listener.accept() {
            Ok(conn) => conn,
            Err(e) => {
                // EMFILE, ECONNABORTED and friends are transient; pause so a
                // persistent error does not spin a core.
                eprintln!("serve: accept: {e}");
                thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let name = Arc::clone(name);
        let spawned = thread::Builder::new()
            .stack_size(CONN_THREAD_STACK)
            .spawn(move || {
                let _slot = slot;
                handle_http(stream, peer, &name, status);
            });
        if let Err(e) = spawned {
            // The closure (stream and slot) is dropped: the client sees a
            // reset and the slot is free again.
            eprintln!("serve: cannot spawn connection thread: {e}");
        }
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        404 => "Not Found",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "OK",
    }
}

fn http_response(status: u16, body: &str) -> String {
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        reason_phrase(status),
        body.len()
    )
}

/// The reply names the backend and the client address exactly as this
/// socket sees it: with a NATing balancer that is the balancer's address,
/// with a transparent one it is the real client.
fn identity(name: &str, peer: SocketAddr) -> String {
    format!("{name} {peer}\n")
}

fn handle_http(mut stream: TcpStream, peer: SocketAddr, name: &str, status: u16) {
    // Errors here only concern one client connection: drop it silently
    // rather than flood stderr when a test kills clients mid-request.
    if stream.set_read_timeout(Some(SERVE_IO_TIMEOUT)).is_err()
        || stream.set_write_timeout(Some(SERVE_IO_TIMEOUT)).is_err()
    {
        return;
    }
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 2048];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        // The terminator may straddle two reads: look back 3 bytes.
        let scan_from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        let head_len = find(&head[scan_from..], b"\r\n\r\n").map(|i| scan_from + i + 4);
        if head_len.unwrap_or(head.len()) > MAX_REQUEST_HEAD {
            let _ = stream.write_all(http_response(431, "request head too large\n").as_bytes());
            return;
        }
        if head_len.is_some() {
            break;
        }
    }
    let reply = http_response(status, &identity(name, peer));
    if stream.write_all(reply.as_bytes()).is_ok() {
        let _ = stream.shutdown(Shutdown::Write);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn udp_echo_loop(sock: &UdpSocket, name: &str) {
    let fd = sock.as_raw_fd();
    let mut buf = [0u8; 2048];
    loop {
        let (peer, local) = match recv_with_local_addr(fd, &mut buf) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("serve: udp recv: {e}");
                thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let reply = identity(name, peer);
        // Reply from the address the datagram was sent to: a wildcard-bound
        // socket would otherwise pick a source by routing, and the client
        // rightly rejects a reply that does not come from its target.
        let sent = match local {
            Some(local) => send_from(fd, reply.as_bytes(), peer, local),
            None => sock.send_to(reply.as_bytes(), peer).map(drop),
        };
        if let Err(e) = sent {
            eprintln!("serve: udp reply to {peer}: {e}");
        }
    }
}

fn set_int_opt(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    val: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is a live c_int of the length passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Room for one IP_PKTINFO or IPV6_PKTINFO control message; u64 elements
/// keep it aligned for `cmsghdr`.
type ControlBuf = [u64; 8];

/// A socket address in the kernel's layout, either family.
fn sockaddr_of(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// The socket address the kernel wrote into `storage`, if it is IPv4 or IPv6.
fn sockaddr_from(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((storage as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((storage as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                0,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// recvmsg() with IP_PKTINFO or IPV6_PKTINFO: returns the sender and the
/// local address the datagram was addressed to.
fn recv_with_local_addr(fd: RawFd, buf: &mut [u8]) -> io::Result<(SocketAddr, Option<IpAddr>)> {
    // SAFETY: all-zero is a valid sockaddr_storage and msghdr.
    let mut src: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control: ControlBuf = [0; 8];
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut src as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;

    // SAFETY: every pointer in msg refers to a live local of the stated size.
    if unsafe { libc::recvmsg(fd, &mut msg, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let peer = sockaddr_from(&src)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "sender not IPv4 or IPv6"))?;

    let mut local = None;
    // SAFETY: the CMSG_* walk stays within msg_controllen as set by the
    // kernel; the payload is read unaligned because CMSG_DATA need not be
    // aligned for in_pktinfo / in6_pktinfo.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let (level, ty) = ((*cmsg).cmsg_level, (*cmsg).cmsg_type);
            if level == libc::IPPROTO_IP && ty == libc::IP_PKTINFO {
                let info: libc::in_pktinfo = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                local = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    info.ipi_addr.s_addr,
                ))));
            } else if level == libc::IPPROTO_IPV6 && ty == libc::IPV6_PKTINFO {
                let info: libc::in6_pktinfo =
                    std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                local = Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    // A datagram to a broadcast or multicast address cannot be answered from
    // that address: let routing choose.
    Ok((
        peer,
        local.filter(|ip| !ip.is_multicast() && !matches!(ip, IpAddr::V4(a) if a.is_broadcast())),
    ))
}

/// sendmsg() with IP_PKTINFO's ipi_spec_dst or IPV6_PKTINFO's ipi6_addr
/// set, to fix the reply's source address. `to` and `from` are of the
/// socket's family.
fn send_from(fd: RawFd, payload: &[u8], to: SocketAddr, from: IpAddr) -> io::Result<()> {
    let (dst, dst_len) = sockaddr_of(to);
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    let mut control: ControlBuf = [0; 8];
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&dst as *const libc::sockaddr_storage as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = dst_len;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE of in_pktinfo (12 bytes) or in6_pktinfo (20 bytes)
    // is at most 40 bytes, inside the 64-byte, 8-aligned control buffer; the
    // header and payload are written inside it.
    let info_len = match from {
        IpAddr::V4(_) => std::mem::size_of::<libc::in_pktinfo>(),
        IpAddr::V6(_) => std::mem::size_of::<libc::in6_pktinfo>(),
    } as libc::c_uint;
    let sent = unsafe {
        // CMSG_FIRSTHDR needs the length set to find the first header.
        msg.msg_controllen = libc::CMSG_SPACE(info_len) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_len = libc::CMSG_LEN(info_len) as _;
        match from {
            IpAddr::V4(from) => {
                (*cmsg).cmsg_level = libc::IPPROTO_IP;
                (*cmsg).cmsg_type = libc::IP_PKTINFO;
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(from).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
            }
            IpAddr::V6(from) => {
                (*cmsg).cmsg_level = libc::IPPROTO_IPV6;
                (*cmsg).cmsg_type = libc::IPV6_PKTINFO;
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: from.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
            }
        }
        libc::sendmsg(fd, &msg, 0)
    };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// drive
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl Serialize for Proto {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Target {
    proto: Proto,
    addr: SocketAddr,
}

/// One request's outcome; the JSON output has one per request.
#[derive(Debug, Serialize)]
struct Record {
    source: IpAddr,
    proto: Proto,
    target: SocketAddr,
    /// Name the backend put in its reply.
    backend: Option<String>,
    /// Client address as the backend saw it.
    seen_peer: Option<SocketAddr>,
    /// Where the reply came from (TCP: the connected peer).
    reply_from: Option<SocketAddr>,
    ok: bool,
    error: Option<String>,
}

#[derive(Serialize)]
struct Report<'a> {
    requests: usize,
    failures: usize,
    results: &'a [Record],
}

fn drive(args: DriveArgs) -> Result<()> {
    let targets: Vec<Target> = args
        .vip_tcp
        .iter()
        .map(|&addr| Target {
            proto: Proto::Tcp,
            addr,
        })
        .chain(args.vip_udp.iter().map(|&addr| Target {
            proto: Proto::Udp,
            addr,
        }))
        .collect();
    if targets.is_empty() {
        return Err(usage_error("give at least one of --vip-tcp, --vip-udp"));
    }
    for t in &targets {
        if !in_test_range(t.addr.ip()) || t.addr.port() == 0 {
            return Err(usage_error(format!(
                "target {} must be in {TEST_RANGES} with a non-zero port",
                t.addr
            )));
        }
    }
    let range = &args.sources;
    if !in_test_range(range.first) || !in_test_range(range.last) {
        return Err(usage_error(format!(
            "sources {}-{} are not inside {TEST_RANGES}",
            range.first, range.last
        )));
    }
    if let Some(t) = targets
        .iter()
        .find(|t| t.addr.is_ipv4() != range.first.is_ipv4())
    {
        return Err(usage_error(format!(
            "target {} and sources {}-{} are of different address families",
            t.addr, range.first, range.last
        )));
    }
    let sources = range.addresses();
    if sources.is_empty() {
        return Err(usage_error("the source range holds no usable address"));
    }
    let total = sources.len() as u64 * targets.len() as u64 * u64::from(args.conns);
    if total > MAX_REQUESTS {
        return Err(usage_error(format!(
            "{total} requests requested; at most {MAX_REQUESTS} per run"
        )));
    }

    let timing = Timing {
        timeout: Duration::from_millis(args.timeout_ms),
        hold: Duration::from_millis(args.hold_ms),
        udp: if args.udp_send_only {
            UdpMode::SendOnly
        } else if args.udp_connect {
            UdpMode::Connected
        } else {
            UdpMode::Unconnected
        },
        udp_size: args.udp_size,
    };
    let started = Instant::now();
    let results = run_workers(&sources, &targets, args.conns, args.parallel, timing)?;
    let failures = results.iter().filter(|r| !r.ok).count();
    eprintln!(
        "drive: {} requests, {} failures, {} sources, {:.2}s",
        results.len(),
        failures,
        sources.len(),
        started.elapsed().as_secs_f64()
    );

    let stdout = io::stdout();
    if args.json {
        let mut out = BufWriter::new(stdout.lock());
        let report = Report {
            requests: results.len(),
            failures,
            results: &results,
        };
        serde_json::to_writer(&mut out, &report).context("writing JSON")?;
        writeln!(out)?;
        out.flush()?;
    }
    if args.summary || !args.json {
        let text = summary(&targets, &results);
        // Keep stdout one parseable JSON object when both were asked for.
        if args.json {
            eprint!("{text}");
        } else {
            let mut out = stdout.lock();
            out.write_all(text.as_bytes())?;
            out.flush()?;
        }
    }
    Ok(())
}

/// Runs every request and returns the records in (source, target, n) order,
/// whatever order the workers finished in.
/// Per-request time limits and UDP socket handling.
#[derive(Clone, Copy)]
struct Timing {
    timeout: Duration,
    hold: Duration,
    udp: UdpMode,
    /// UDP payload bytes (`--udp-size`).
    udp_size: u16,
}

/// A UDP request's payload: "ping", padded with dots to `size` bytes.
fn udp_payload(size: u16) -> Vec<u8> {
    let mut p = UDP_PING.to_vec();
    p.resize((size as usize).max(UDP_PING.len()), b'.');
    p
}

/// How a UDP request uses its socket (see `--udp-connect`,
/// `--udp-send-only`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum UdpMode {
    Unconnected,
    Connected,
    SendOnly,
}

fn run_workers(
    sources: &[IpAddr],
    targets: &[Target],
    conns: u32,
    parallel: u32,
    timing: Timing,
) -> Result<Vec<Record>> {
    let next = AtomicUsize::new(0);
    let workers = (parallel as usize).min(sources.len());
    let mut per_source: Vec<(usize, Vec<Record>)> = thread::scope(|scope| -> Result<_> {
        let mut handles = Vec::with_capacity(workers);
        for i in 0..workers {
            let next = &next;
            let handle = thread::Builder::new()
                .name(format!("drive-{i}"))
                .spawn_scoped(scope, move || {
                    let mut done = Vec::new();
                    loop {
                        // Whole sources per worker: one source's requests run
                        // in order, as one client's would.
                        let idx = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&source) = sources.get(idx) else {
                            break;
                        };
                        done.push((idx, requests_from(source, targets, conns, timing)));
                    }
                    done
                })
                .context("spawning worker thread")?;
            handles.push(handle);
        }
        let mut all = Vec::with_capacity(sources.len());
        for handle in handles {
            all.extend(
                handle
                    .join()
                    .map_err(|_| anyhow!("a worker thread panicked"))?,
            );
        }
        Ok(all)
    })?;
    per_source.sort_unstable_by_key(|(idx, _)| *idx);
    Ok(per_source.into_iter().flat_map(|(_, r)| r).collect())
}

fn requests_from(source: IpAddr, targets: &[Target], conns: u32, timing: Timing) -> Vec<Record> {
    let mut out = Vec::with_capacity(targets.len() * conns as usize);
    for target in targets {
        for _ in 0..conns {
            out.push(match target.proto {
                Proto::Tcp => tcp_request(source, target.addr, timing),
                Proto::Udp => udp_request(source, target.addr, timing),
            });
        }
    }
    out
}

impl Record {
    fn new(source: IpAddr, proto: Proto, target: SocketAddr) -> Self {
        Record {
            source,
            proto,
            target,
            backend: None,
            seen_peer: None,
            reply_from: None,
            ok: false,
            error: None,
        }
    }

    fn finish(mut self, body: Result<Vec<u8>, String>) -> Self {
        match body.and_then(|b| parse_identity(&b)) {
            Ok((backend, peer)) => {
                self.backend = Some(backend);
                self.seen_peer = Some(peer);
                self.ok = true;
            }
            Err(e) => self.error = Some(e),
        }
        self
    }
}

/// Short error text for a failed step; timeouts show up as EAGAIN on
/// sockets with SO_RCVTIMEO, so both spellings become "timeout".
fn io_error(step: &str, e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!("{step}: timeout"),
        _ => format!("{step}: {e}"),
    }
}

/// Time left before the request's deadline; an error once it has passed, so
/// that no socket call gets a zero (= infinite) timeout.
fn remaining(deadline: Instant, step: &str) -> Result<Duration, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(format!("{step}: timeout"))
    } else {
        Ok(left)
    }
}

fn bound_socket(source: IpAddr, ty: Type, proto: Protocol) -> Result<Socket, String> {
    let local = SocketAddr::new(source, 0);
    let sock = Socket::new(Domain::for_address(local), ty, Some(proto))
        .map_err(|e| io_error("socket", &e))?;
    sock.bind(&SockAddr::from(local))
        .map_err(|e| io_error("bind", &e))?;
    Ok(sock)
}

fn tcp_request(source: IpAddr, target: SocketAddr, timing: Timing) -> Record {
    let deadline = Instant::now() + timing.timeout + timing.hold;
    let mut rec = Record::new(source, Proto::Tcp, target);
    let reply = tcp_exchange(source, target, deadline, timing.hold, &mut rec.reply_from);
    let body = reply.and_then(|r| http_body(&r).map(<[u8]>::to_vec));
    rec.finish(body)
}

/// Connect, send the request, read the reply to EOF; all within `deadline`.
fn tcp_exchange(
    source: IpAddr,
    target: SocketAddr,
    deadline: Instant,
    hold: Duration,
    reply_from: &mut Option<SocketAddr>,
) -> Result<Vec<u8>, String> {
    let sock = bound_socket(source, Type::STREAM, Protocol::TCP)?;
    sock.connect_timeout(&target.into(), remaining(deadline, "connect")?)
        .map_err(|e| io_error("connect", &e))?;
    *reply_from = sock.peer_addr().ok().and_then(|a| a.as_socket());
    let mut stream: TcpStream = sock.into();
    // An established connection, idle for `hold`, then used.
    thread::sleep(hold);

    stream
        .set_write_timeout(Some(remaining(deadline, "send")?))
        .map_err(|e| io_error("send", &e))?;
    stream
        .write_all(HTTP_REQUEST)
        .map_err(|e| io_error("send", &e))?;

    let mut reply = Vec::with_capacity(256);
    let mut chunk = [0u8; 4096];
    loop {
        stream
            .set_read_timeout(Some(remaining(deadline, "recv")?))
            .map_err(|e| io_error("recv", &e))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(reply),
            Ok(n) => {
                reply.extend_from_slice(&chunk[..n]);
                if reply.len() > MAX_REPLY {
                    return Err("recv: reply too large".into());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error("recv", &e)),
        }
    }
}

/// Checks the status line and Content-Length and returns the body.
fn http_body(reply: &[u8]) -> Result<&[u8], String> {
    if reply.is_empty() {
        return Err("empty reply".into());
    }
    let head_end = find(reply, b"\r\n\r\n").ok_or("truncated reply head")?;
    let head = std::str::from_utf8(&reply[..head_end]).map_err(|_| "reply head not UTF-8")?;
    let body = &reply[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let status: u16 = match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => {
            code.parse().map_err(|_| "bad status line")?
        }
        _ => return Err("bad status line".into()),
    };
    if !(200..300).contains(&status) {
        return Err(format!("http status {status}"));
    }
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                let len: usize = v.trim().parse().map_err(|_| "bad Content-Length")?;
                if len != body.len() {
                    return Err(format!("body {} bytes, Content-Length {len}", body.len()));
                }
            }
        }
    }
    Ok(body)
}

/// Parses "NAME PEER_IP:PEER_PORT".
fn parse_identity(body: &[u8]) -> Result<(String, SocketAddr), String> {
    let text = std::str::from_utf8(body).map_err(|_| "reply not UTF-8")?;
    let mut words = text.split_whitespace();
    let (Some(name), Some(peer)) = (words.next(), words.next()) else {
        return Err(format!("unexpected reply {:?}", truncate(text, 40)));
    };
    let peer = peer
        .parse()
        .map_err(|_| format!("bad peer address {:?}", truncate(peer, 40)))?;
    Ok((name.to_string(), peer))
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn udp_request(source: IpAddr, target: SocketAddr, timing: Timing) -> Record {
    let deadline = Instant::now() + timing.timeout + timing.hold;
    let mut rec = Record::new(source, Proto::Udp, target);
    if timing.udp == UdpMode::SendOnly {
        if let Err(e) = udp_send_and_close(source, target, &udp_payload(timing.udp_size)) {
            rec.error = Some(e);
        } else {
            rec.ok = true;
        }
        return rec;
    }
    let reply = udp_exchange(source, target, deadline, timing);
    let body = match reply {
        Ok((from, payload)) => {
            rec.reply_from = Some(from);
            // A reply from anywhere but VIP:port means the return path was
            // not translated back; the client's stack would drop it.
            if from == target {
                Ok(payload)
            } else {
                Err(format!("reply from {from}, not the target"))
            }
        }
        Err(e) => Err(e),
    };
    rec.finish(body)
}

fn udp_send_and_close(source: IpAddr, target: SocketAddr, payload: &[u8]) -> Result<(), String> {
    let sock: UdpSocket = bound_socket(source, Type::DGRAM, Protocol::UDP)?.into();
    // Connected to a port the reply does not come from: the kernel matches
    // the reply to no socket even while this one is still open, whatever
    // the scheduler does between the send and the close.
    let elsewhere = SocketAddr::new(target.ip(), target.port().checked_sub(1).unwrap_or(1));
    sock.connect(elsewhere)
        .map_err(|e| io_error("connect", &e))?;
    sock.send_to(payload, target)
        .map_err(|e| io_error("send", &e))?;
    Ok(())
}

fn udp_exchange(
    source: IpAddr,
    target: SocketAddr,
    deadline: Instant,
    timing: Timing,
) -> Result<(SocketAddr, Vec<u8>), String> {
    let hold = timing.hold;
    // Not connected unless asked: a connected socket would silently discard
    // a reply from the wrong address, and that is exactly what must be
    // reported.
    let sock: UdpSocket = bound_socket(source, Type::DGRAM, Protocol::UDP)?.into();
    if timing.udp == UdpMode::Connected {
        sock.connect(target).map_err(|e| io_error("connect", &e))?;
    }
    let payload = udp_payload(timing.udp_size);
    let ping = |sock: &UdpSocket| -> Result<(SocketAddr, Vec<u8>), String> {
        sock.send_to(&payload, target)
            .map_err(|e| io_error("send", &e))?;
        let mut buf = [0u8; 2048];
        loop {
            sock.set_read_timeout(Some(remaining(deadline, "recv")?))
                .map_err(|e| io_error("recv", &e))?;
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => return Ok((from, buf[..n].to_vec())),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error("recv", &e)),
            }
        }
    };
    let first = ping(&sock)?;
    if hold.is_zero() {
        return Ok(first);
    }
    // Same socket, same source port: the same flow, which must stay on its
    // backend.
    thread::sleep(hold);
    let second = ping(&sock)?;
    let name = |p: &[u8]| p.split(|b| *b == b' ').next().unwrap_or_default().to_vec();
    if name(&first.1) != name(&second.1) {
        return Err(format!(
            "flow moved from {} to {}",
            String::from_utf8_lossy(&name(&first.1)),
            String::from_utf8_lossy(&name(&second.1))
        ));
    }
    Ok(second)
}

// ---------------------------------------------------------------------------
// summary
// ---------------------------------------------------------------------------

fn pct(n: usize, of: usize) -> f64 {
    if of == 0 {
        0.0
    } else {
        100.0 * n as f64 / of as f64
    }
}

fn summary(targets: &[Target], results: &[Record]) -> String {
    use std::fmt::Write as _;

    let mut by_target: HashMap<Target, Vec<&Record>> = HashMap::new();
    for r in results {
        let t = Target {
            proto: r.proto,
            addr: r.target,
        };
        by_target.entry(t).or_default().push(r);
    }

    let mut out = String::new();
    let mut peer_checked = 0usize;
    let mut peer_mismatch = 0usize;
    let mut mismatch_example = None;
    // A target given twice is reported once.
    let mut seen = HashSet::new();
    for t in targets.iter().filter(|t| seen.insert(**t)) {
        let recs = by_target.get(t).map(Vec::as_slice).unwrap_or_default();
        let failures = recs.iter().filter(|r| !r.ok).count();
        let mut backends: BTreeMap<&str, usize> = BTreeMap::new();
        let mut per_source: HashMap<IpAddr, HashSet<&str>> = HashMap::new();
        let mut sources = HashSet::new();
        let mut errors: HashMap<&str, usize> = HashMap::new();
        let mut target_mismatch = 0usize;
        for r in recs {
            sources.insert(r.source);
            match (&r.backend, r.ok) {
                (Some(b), true) => {
                    *backends.entry(b.as_str()).or_default() += 1;
                    per_source.entry(r.source).or_default().insert(b.as_str());
                }
                _ => {
                    let e = r.error.as_deref().unwrap_or("unknown");
                    *errors.entry(e).or_default() += 1;
                }
            }
            if let (true, Some(peer)) = (r.ok, r.seen_peer) {
                peer_checked += 1;
                if peer.ip() != r.source {
                    peer_mismatch += 1;
                    target_mismatch += 1;
                    mismatch_example.get_or_insert((r.source, peer));
                }
            }
        }
        let n = recs.len();
        let _ = writeln!(
            out,
            "{} {}: {} requests, {} failures ({:.1}%), {} sources",
            t.proto.as_str(),
            t.addr,
            n,
            failures,
            pct(failures, n),
            sources.len()
        );
        for (b, c) in &backends {
            let _ = writeln!(out, "  {b:<16} {c:>8}  {:5.1}%", pct(*c, n));
        }
        if failures > 0 {
            let _ = writeln!(
                out,
                "  {:<16} {failures:>8}  {:5.1}%",
                "(failed)",
                pct(failures, n)
            );
            let mut errors: Vec<_> = errors.into_iter().collect();
            errors.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
            for (e, c) in errors.iter().take(3) {
                let _ = writeln!(out, "    {c:>8} x {e}");
            }
        }
        // Among the sources with at least one successful request.
        let sticky = per_source.values().filter(|b| b.len() == 1).count();
        let _ = writeln!(
            out,
            "  sticky: {sticky}/{} sources always reached the same backend",
            per_source.len()
        );
        if target_mismatch > 0 {
            let _ = writeln!(
                out,
                "  peer: {target_mismatch} replies showed a client address other than the source"
            );
        }
    }

    let total = results.len();
    let failed = results.iter().filter(|r| !r.ok).count();
    let _ = writeln!(out, "total: {total} requests, {failed} failures");
    match mismatch_example {
        None if peer_checked > 0 => {
            let _ = writeln!(out, "peer check: all backends saw the real client address");
        }
        None => {
            let _ = writeln!(out, "peer check: no successful reply to check");
        }
        Some((src, seen)) => {
            let _ = writeln!(
                out,
                "peer check: {peer_mismatch}/{peer_checked} replies showed a client address other than the source (e.g. source {src} seen as {seen})"
            );
        }
    }
    out
}

// ---------------------------------------------------------------------------
// tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_range_skips_network_and_broadcast() {
        let r = parse_source_range("198.18.4.250-198.18.5.2").unwrap();
        let got: Vec<String> = r.addresses().iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "198.18.4.250",
                "198.18.4.251",
                "198.18.4.252",
                "198.18.4.253",
                "198.18.4.254",
                "198.18.5.1",
                "198.18.5.2"
            ]
        );
        assert_eq!(
            parse_source_range("198.18.4.7").unwrap().addresses(),
            [IpAddr::V4(Ipv4Addr::new(198, 18, 4, 7))]
        );
        assert_eq!(
            parse_source_range("198.18.4.9-198.18.4.1").unwrap_err(),
            "198.18.4.9 comes after 198.18.4.1"
        );
        assert!(parse_source_range("198.18.4.1-x").is_err());
    }

    #[test]
    fn ipv6_source_range_keeps_every_address() {
        let r = parse_source_range("2001:2:0:4::fe-2001:2:0:4::101").unwrap();
        let got: Vec<String> = r.addresses().iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "2001:2:0:4::fe",
                "2001:2:0:4::ff",
                "2001:2:0:4::100",
                "2001:2:0:4::101"
            ]
        );
        assert_eq!(
            parse_source_range("198.18.4.1-2001:2:0:4::1").unwrap_err(),
            "198.18.4.1 and 2001:2:0:4::1 are of different address families"
        );
        assert_eq!(
            parse_source_range("2001:2:0:4::1-2001:2:0:5::1").unwrap_err(),
            "2001:2:0:4::1-2001:2:0:5::1 holds more than 65536 addresses"
        );
        assert_eq!(
            parse_source_range("2001:2:0:4::1-2001:2:0:4::1:0")
                .unwrap()
                .addresses()
                .len(),
            65_536
        );
    }

    #[test]
    fn test_ranges_are_198_18_slash_15_and_2001_2_slash_48() {
        let ok = |s: &str| in_test_range(s.parse().unwrap());
        assert!(ok("198.18.0.0"));
        assert!(ok("198.19.255.255"));
        assert!(!ok("198.20.0.1"));
        assert!(!ok("198.17.255.255"));
        assert!(!ok("10.0.0.1"));
        assert!(ok("2001:2::"));
        assert!(ok("2001:2:0:ffff:ffff:ffff:ffff:ffff"));
        assert!(!ok("2001:2:1::1"));
        assert!(!ok("2001:db8::1"));
        assert!(!ok("::ffff:198.18.0.1"));
    }

    #[test]
    fn ipv6_peer_round_trip() {
        let peer: SocketAddr = "[2001:2:0:4::3e8]:40212".parse().unwrap();
        let reply = http_response(200, &identity("b2", peer));
        let body = http_body(reply.as_bytes()).unwrap();
        assert_eq!(parse_identity(body).unwrap(), ("b2".to_string(), peer));
    }

    #[test]
    fn socket_addresses_survive_the_kernel_layout() {
        for s in ["198.18.4.1:53", "[2001:2:0:2::11]:9053"] {
            let a: SocketAddr = s.parse().unwrap();
            let (storage, len) = sockaddr_of(a);
            assert_eq!(sockaddr_from(&storage), Some(a));
            let want = if a.is_ipv4() { 16 } else { 28 };
            assert_eq!(len, want, "{s}");
        }
    }

    #[test]
    fn http_reply_round_trip() {
        let peer: SocketAddr = "198.18.4.1:40212".parse().unwrap();
        let reply = http_response(200, &identity("b1", peer));
        let body = http_body(reply.as_bytes()).unwrap();
        assert_eq!(parse_identity(body).unwrap(), ("b1".to_string(), peer));
    }

    #[test]
    fn http_reply_errors() {
        let reply = http_response(503, "b1 198.18.4.1:1\n");
        assert!(reply.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert_eq!(http_body(reply.as_bytes()).unwrap_err(), "http status 503");
        assert!(http_body(b"").is_err());
        assert!(http_body(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n").is_err());
        assert!(http_body(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nb1 1.2.3.4:5\n").is_err());
        assert!(parse_identity(b"b1\n").is_err());
        assert!(parse_identity(b"b1 nonsense\n").is_err());
    }

    #[test]
    fn summary_counts_stickiness_and_peers() {
        let target: SocketAddr = "198.18.100.1:80".parse().unwrap();
        let rec = |src: [u8; 4], backend: &str, peer: &str| Record {
            source: IpAddr::from(src),
            proto: Proto::Tcp,
            target,
            backend: Some(backend.into()),
            seen_peer: Some(peer.parse().unwrap()),
            reply_from: Some(target),
            ok: true,
            error: None,
        };
        let results = vec![
            rec([198, 18, 4, 1], "b1", "198.18.4.1:1000"),
            rec([198, 18, 4, 1], "b1", "198.18.4.1:1001"),
            rec([198, 18, 4, 2], "b1", "198.18.4.2:1000"),
            rec([198, 18, 4, 2], "b2", "198.18.2.1:1001"),
        ];
        let t = [Target {
            proto: Proto::Tcp,
            addr: target,
        }];
        let text = summary(&t, &results);
        assert!(text.contains("4 requests, 0 failures"), "{text}");
        assert!(text.contains("sticky: 1/2 sources"), "{text}");
        assert!(text.contains("peer check: 1/4 replies"), "{text}");
    }
}
