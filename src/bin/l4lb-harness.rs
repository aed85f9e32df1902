//! Test and demo helper for the network-namespace harness (`scripts/netns.sh`).
//!
//! * `serve` runs in a backend namespace: a minimal HTTP/1.1 server and a UDP
//!   echo, both answering with the backend's name and the client address the
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
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
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
    /// TCP targets (HTTP), comma-separated IP:PORT.
    #[arg(long, value_delimiter = ',')]
    vip_tcp: Vec<SocketAddrV4>,
    /// UDP targets (echo), comma-separated IP:PORT.
    #[arg(long, value_delimiter = ',')]
    vip_udp: Vec<SocketAddrV4>,
    /// Inclusive source address range FIRST-LAST (addresses ending in .0 or .255 are skipped).
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

/// 198.18.0.0/15 (RFC 2544): the only range the harness may send to or from.
fn in_test_range(ip: Ipv4Addr) -> bool {
    u32::from(ip) & 0xfffe_0000 == u32::from(Ipv4Addr::new(198, 18, 0, 0))
}

#[derive(Clone, Debug, PartialEq)]
struct SourceRange {
    first: Ipv4Addr,
    last: Ipv4Addr,
}

impl SourceRange {
    /// The usable addresses: .0 and .255 are network/broadcast addresses of
    /// the client's /24s and are never configured by netns.sh.
    fn addresses(&self) -> Vec<Ipv4Addr> {
        (u32::from(self.first)..=u32::from(self.last))
            .map(Ipv4Addr::from)
            .filter(|ip| !matches!(ip.octets()[3], 0 | 255))
            .collect()
    }
}

fn parse_source_range(s: &str) -> Result<SourceRange, String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let first: Ipv4Addr = a.trim().parse().map_err(|_| format!("bad address '{a}'"))?;
    let last: Ipv4Addr = b.trim().parse().map_err(|_| format!("bad address '{b}'"))?;
    if first > last {
        return Err(format!("{first} comes after {last}"));
    }
    Ok(SourceRange { first, last })
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

    let listener = tcp_listener(args.tcp_port)?;
    let udp = udp_echo_socket(args.udp_port)?;
    let name: Arc<str> = Arc::from(args.name.as_str());

    let udp_name = Arc::clone(&name);
    thread::Builder::new()
        .name("udp-echo".into())
        .spawn(move || udp_echo_loop(&udp, &udp_name))
        .context("spawning the UDP thread")?;

    eprintln!(
        "serving {} on tcp/{} udp/{}",
        name, args.tcp_port, args.udp_port
    );
    accept_loop(&listener, &name, args.http_status)
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

fn tcp_listener(port: u16) -> Result<TcpListener> {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    // Restarting a backend must not wait for its old connections' TIME_WAIT.
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())
        .with_context(|| format!("binding tcp/{port}"))?;
    // Bursts of hundreds of sources connect at once.
    sock.listen(4096)?;
    Ok(sock.into())
}

fn udp_echo_socket(port: u16) -> Result<UdpSocket> {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())
        .with_context(|| format!("binding udp/{port}"))?;
    let sock: UdpSocket = sock.into();
    set_int_opt(sock.as_raw_fd(), libc::IPPROTO_IP, libc::IP_PKTINFO, 1)
        .context("setting IP_PKTINFO")?;
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

fn accept_loop(listener: &TcpListener, name: &Arc<str>, status: u16) -> Result<()> {
    let slots = Arc::new(Slots {
        free: Mutex::new(MAX_CONNS),
        freed: Condvar::new(),
    });
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
        let reply = identity(name, SocketAddr::V4(peer));
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

fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Room for one IP_PKTINFO control message; u64 elements keep it aligned
/// for `cmsghdr`.
type ControlBuf = [u64; 8];

/// recvmsg() with IP_PKTINFO: returns the sender and the local address the
/// datagram was addressed to.
fn recv_with_local_addr(fd: RawFd, buf: &mut [u8]) -> io::Result<(SocketAddrV4, Option<Ipv4Addr>)> {
    // SAFETY: all-zero is a valid sockaddr_in and msghdr.
    let mut src: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control: ControlBuf = [0; 8];
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut src as *mut libc::sockaddr_in).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;

    // SAFETY: every pointer in msg refers to a live local of the stated size.
    if unsafe { libc::recvmsg(fd, &mut msg, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if libc::c_int::from(src.sin_family) != libc::AF_INET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "non-IPv4 sender",
        ));
    }
    let peer = SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(src.sin_addr.s_addr)),
        u16::from_be(src.sin_port),
    );

    let mut local = None;
    // SAFETY: the CMSG_* walk stays within msg_controllen as set by the
    // kernel; the payload is read unaligned because CMSG_DATA need not be
    // aligned for in_pktinfo.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::IPPROTO_IP && (*cmsg).cmsg_type == libc::IP_PKTINFO {
                let info: libc::in_pktinfo = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                local = Some(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    // A datagram to a broadcast or multicast address cannot be answered from
    // that address: let routing choose.
    Ok((
        peer,
        local.filter(|ip| !ip.is_broadcast() && !ip.is_multicast()),
    ))
}

/// sendmsg() with IP_PKTINFO's ipi_spec_dst set, to fix the reply's source
/// address.
fn send_from(fd: RawFd, payload: &[u8], to: SocketAddrV4, from: Ipv4Addr) -> io::Result<()> {
    let dst = sockaddr_in(to);
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    let mut control: ControlBuf = [0; 8];
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&dst as *const libc::sockaddr_in as *mut libc::sockaddr_in).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    let info_len = std::mem::size_of::<libc::in_pktinfo>() as libc::c_uint;
    // SAFETY: CMSG_SPACE(in_pktinfo) = 32 bytes fits the 64-byte, 8-aligned
    // control buffer; the header and payload are written inside it.
    let sent = unsafe {
        msg.msg_controllen = libc::CMSG_SPACE(info_len) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::IPPROTO_IP;
        (*cmsg).cmsg_type = libc::IP_PKTINFO;
        (*cmsg).cmsg_len = libc::CMSG_LEN(info_len) as _;
        let info = libc::in_pktinfo {
            ipi_ifindex: 0,
            ipi_spec_dst: libc::in_addr {
                s_addr: u32::from(from).to_be(),
            },
            ipi_addr: libc::in_addr { s_addr: 0 },
        };
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
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
    addr: SocketAddrV4,
}

/// One request's outcome; the JSON output has one per request.
#[derive(Debug, Serialize)]
struct Record {
    source: Ipv4Addr,
    proto: Proto,
    target: SocketAddrV4,
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
        if !in_test_range(*t.addr.ip()) || t.addr.port() == 0 {
            return Err(usage_error(format!(
                "target {} must be in 198.18.0.0/15 with a non-zero port",
                t.addr
            )));
        }
    }
    let range = &args.sources;
    if !in_test_range(range.first) || !in_test_range(range.last) {
        return Err(usage_error(format!(
            "sources {}-{} are not inside 198.18.0.0/15",
            range.first, range.last
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
/// Per-request time limits.
#[derive(Clone, Copy)]
struct Timing {
    timeout: Duration,
    hold: Duration,
}

fn run_workers(
    sources: &[Ipv4Addr],
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

fn requests_from(source: Ipv4Addr, targets: &[Target], conns: u32, timing: Timing) -> Vec<Record> {
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
    fn new(source: Ipv4Addr, proto: Proto, target: SocketAddrV4) -> Self {
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

fn bound_socket(source: Ipv4Addr, ty: Type, proto: Protocol) -> Result<Socket, String> {
    let sock = Socket::new(Domain::IPV4, ty, Some(proto)).map_err(|e| io_error("socket", &e))?;
    sock.bind(&SockAddr::from(SocketAddrV4::new(source, 0)))
        .map_err(|e| io_error("bind", &e))?;
    Ok(sock)
}

fn tcp_request(source: Ipv4Addr, target: SocketAddrV4, timing: Timing) -> Record {
    let deadline = Instant::now() + timing.timeout + timing.hold;
    let mut rec = Record::new(source, Proto::Tcp, target);
    let reply = tcp_exchange(source, target, deadline, timing.hold, &mut rec.reply_from);
    let body = reply.and_then(|r| http_body(&r).map(<[u8]>::to_vec));
    rec.finish(body)
}

/// Connect, send the request, read the reply to EOF; all within `deadline`.
fn tcp_exchange(
    source: Ipv4Addr,
    target: SocketAddrV4,
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

fn udp_request(source: Ipv4Addr, target: SocketAddrV4, timing: Timing) -> Record {
    let deadline = Instant::now() + timing.timeout + timing.hold;
    let mut rec = Record::new(source, Proto::Udp, target);
    let reply = udp_exchange(source, target, deadline, timing.hold);
    let body = match reply {
        Ok((from, payload)) => {
            rec.reply_from = Some(from);
            // A reply from anywhere but VIP:port means the return path was
            // not translated back; the client's stack would drop it.
            if from == SocketAddr::V4(target) {
                Ok(payload)
            } else {
                Err(format!("reply from {from}, not the target"))
            }
        }
        Err(e) => Err(e),
    };
    rec.finish(body)
}

fn udp_exchange(
    source: Ipv4Addr,
    target: SocketAddrV4,
    deadline: Instant,
    hold: Duration,
) -> Result<(SocketAddr, Vec<u8>), String> {
    // Not connected: a connected socket would silently discard a reply from
    // the wrong address, and that is exactly what must be reported.
    let sock: UdpSocket = bound_socket(source, Type::DGRAM, Protocol::UDP)?.into();
    let ping = |sock: &UdpSocket| -> Result<(SocketAddr, Vec<u8>), String> {
        sock.send_to(UDP_PING, target)
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
        let mut per_source: HashMap<Ipv4Addr, HashSet<&str>> = HashMap::new();
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
                if peer.ip() != std::net::IpAddr::V4(r.source) {
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
            [Ipv4Addr::new(198, 18, 4, 7)]
        );
        assert!(parse_source_range("198.18.4.9-198.18.4.1").is_err());
        assert!(parse_source_range("198.18.4.1-x").is_err());
    }

    #[test]
    fn test_range_is_198_18_slash_15() {
        assert!(in_test_range(Ipv4Addr::new(198, 18, 0, 0)));
        assert!(in_test_range(Ipv4Addr::new(198, 19, 255, 255)));
        assert!(!in_test_range(Ipv4Addr::new(198, 20, 0, 1)));
        assert!(!in_test_range(Ipv4Addr::new(198, 17, 255, 255)));
        assert!(!in_test_range(Ipv4Addr::new(10, 0, 0, 1)));
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
        let target: SocketAddrV4 = "198.18.100.1:80".parse().unwrap();
        let rec = |src: [u8; 4], backend: &str, peer: &str| Record {
            source: Ipv4Addr::from(src),
            proto: Proto::Tcp,
            target,
            backend: Some(backend.into()),
            seen_peer: Some(peer.parse().unwrap()),
            reply_from: Some(SocketAddr::V4(target)),
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
