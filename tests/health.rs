//! Health checks against real sockets on 127.0.0.1 (loopback only).
//!
//! Every check here uses interval 1 s, timeout 1 s and thresholds of 2, and
//! every wait is a bounded poll loop, so each test takes a few seconds.

use l4lb::control::health::{
    first_probe_offset, probe_fd_budget, CheckSpec, HealthMonitor, Probe, TargetKey, Transition,
    WantedTarget,
};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const INTERVAL: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_secs(1);
/// Scheduling and loopback latency allowed on top of the exact times.
const SLACK: Duration = Duration::from_millis(400);

fn key(port: u16, proto: u8) -> TargetKey {
    TargetKey {
        addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
        port,
        proto,
        check: 0,
    }
}

/// A target of one service, "web".
fn target(key: TargetKey, spec: CheckSpec) -> WantedTarget {
    WantedTarget {
        key,
        spec,
        services: vec!["web".to_string()],
    }
}

fn spec(probe: Probe, port: u16) -> CheckSpec {
    CheckSpec {
        probe,
        port,
        timeout: TIMEOUT,
        interval: INTERVAL,
        unhealthy_threshold: 2,
        healthy_threshold: 2,
    }
}

fn http(path: &str, host: Option<&str>) -> Probe {
    Probe::Http {
        path: path.to_string(),
        host: host.map(str::to_string),
        codes: vec![(200, 399)],
    }
}

/// Polls every 10 ms until a transition arrives or `limit` passes; returns
/// it with the time it arrived.
fn next_transition(m: &mut HealthMonitor, limit: Duration) -> Option<(Instant, Transition)> {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        let mut t = m.poll(Instant::now());
        assert!(t.len() <= 1, "one target, one change at a time: {t:?}");
        if let Some(t) = t.pop() {
            return Some((Instant::now(), t));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Polls until the target's last result is `want`; fails on any transition.
fn wait_for_result(m: &mut HealthMonitor, k: &TargetKey, want: &str, limit: Duration) -> Instant {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        let t = m.poll(Instant::now());
        assert!(t.is_empty(), "unexpected transition: {t:?}");
        let states = m.states();
        let (_, _, last) = states.iter().find(|(kk, _, _)| kk == k).expect("target");
        if last == want {
            return Instant::now();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!(
        "no {want:?} result for {k} within {limit:?}: {:?}",
        m.states()
    );
}

/// A port that nothing listens on (bound, then released).
fn closed_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn closed_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A thread serving a non-blocking listener until its flag is cleared.
struct Server {
    port: u16,
    run: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn tcp(on_conn: impl Fn(TcpStream) + Send + 'static) -> Server {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let run = Arc::new(AtomicBool::new(true));
        let r = Arc::clone(&run);
        let thread = std::thread::spawn(move || {
            while r.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        on_conn(s);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Server {
            port,
            run,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.run.store(false, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads an HTTP request head (bounded by a read timeout and 8 KiB).
fn read_head(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Waits for `k`'s first result, "ok", then two more probes: no
/// transition, and `k` is up.
fn stays_up(m: &mut HealthMonitor, k: &TargetKey) {
    let first = wait_for_result(m, k, "ok", INTERVAL + SLACK);
    let end = first + 2 * INTERVAL;
    while Instant::now() < end {
        assert_eq!(m.poll(Instant::now()), vec![]);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(m.states(), vec![(*k, true, "ok".to_string())]);
}

#[test]
fn a_listening_tcp_server_stays_up() {
    let server = Server::tcp(drop);
    let k = key(server.port, 6);
    let mut m = HealthMonitor::new(64);
    m.set_targets(vec![target(k, spec(Probe::Tcp, server.port))]);
    assert!(m.is_up(&k), "a new target starts up");
    stays_up(&mut m, &k);
}

#[test]
fn a_closed_tcp_port_goes_down_after_exactly_unhealthy_threshold_probes() {
    let port = closed_tcp_port();
    let k = key(port, 6);
    let mut m = HealthMonitor::new(64);
    let t0 = Instant::now();
    m.set_targets(vec![target(k, spec(Probe::Tcp, port))]);
    let (at, t) = next_transition(&mut m, 3 * INTERVAL).expect("goes down");
    assert_eq!(
        t,
        Transition {
            key: k,
            up: false,
            reason: "connection refused".into()
        }
    );
    assert!(!m.is_up(&k));
    // The second probe starts one interval after the first; one probe less
    // would be a whole interval earlier, one more a whole interval later.
    let second_probe = t0 + first_probe_offset(&k, INTERVAL) + INTERVAL;
    assert!(at >= second_probe, "down {:?} early", second_probe - at);
    assert!(
        at < second_probe + SLACK,
        "down {:?} late",
        at - second_probe
    );
}

#[test]
fn http_goes_down_on_503_and_back_up_after_healthy_threshold_200s() {
    let status = Arc::new(AtomicU16::new(200));
    let heads = Arc::new(Mutex::new(Vec::<(u16, String)>::new()));
    let (st, hd) = (Arc::clone(&status), Arc::clone(&heads));
    let server = Server::tcp(move |mut s| {
        let head = read_head(&mut s);
        let code = st.load(Ordering::SeqCst);
        let reason = if code == 200 {
            "OK"
        } else {
            "Service Unavailable"
        };
        let _ = write!(
            s,
            "HTTP/1.1 {code} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        hd.lock().unwrap().push((code, head));
    });
    let k = key(server.port, 6);
    let mut m = HealthMonitor::new(64);
    m.set_targets(vec![target(
        k,
        spec(http("/healthz?deep=1", Some("health.example")), server.port),
    )]);
    wait_for_result(&mut m, &k, "ok", INTERVAL + SLACK);
    {
        let heads = heads.lock().unwrap();
        assert_eq!(
            heads[0].1,
            "GET /healthz?deep=1 HTTP/1.1\r\nHost: health.example\r\n\
             User-Agent: l4lb-health\r\nConnection: close\r\n\r\n"
        );
    }

    status.store(503, Ordering::SeqCst);
    let (_, t) = next_transition(&mut m, 2 * INTERVAL + SLACK).expect("goes down");
    assert_eq!((t.up, t.reason.as_str()), (false, "status 503"));
    let served_503 = heads.lock().unwrap().iter().filter(|h| h.0 == 503).count();
    assert_eq!(served_503, 2, "down after exactly two 503s");

    status.store(200, Ordering::SeqCst);
    let (_, t) = next_transition(&mut m, 2 * INTERVAL + SLACK).expect("comes back");
    assert_eq!((t.up, t.reason.as_str()), (true, "ok"));
    assert!(m.is_up(&k));
    let heads = heads.lock().unwrap();
    let after: Vec<u16> = heads
        .iter()
        .rev()
        .take_while(|h| h.0 == 200)
        .map(|h| h.0)
        .collect();
    assert_eq!(after.len(), 2, "up after exactly two 200s: {heads:?}");
}

/// A server that sends 103 Early Hints before its 200 is healthy: the
/// interim response is skipped and the final status judged.
#[test]
fn http_with_an_early_hints_response_first_stays_up() {
    let server = Server::tcp(|mut s| {
        read_head(&mut s);
        let _ = s.write_all(
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n\
              HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    });
    let k = key(server.port, 6);
    let mut m = HealthMonitor::new(64);
    m.set_targets(vec![target(k, spec(http("/", None), server.port))]);
    stays_up(&mut m, &k);
}

/// A 103 Early Hints response padded so that the final status line after
/// it, `HTTP/1.1 200 OK`, ends with byte `ends_at` of the response.
fn early_hints_then_200(ends_at: usize) -> Vec<u8> {
    let (head, tail) = (
        "HTTP/1.1 103 Early Hints\r\nLink: <",
        ">\r\n\r\nHTTP/1.1 200 OK\r\n",
    );
    let pad = "a".repeat(ends_at - head.len() - tail.len());
    let mut r = format!("{head}{pad}{tail}").into_bytes();
    assert_eq!(r.len(), ends_at);
    r.extend_from_slice(b"Content-Length: 0\r\nConnection: close\r\n\r\n");
    r
}

/// README: "at most 1 KiB is read". A final status line that ends within
/// the first 1024 bytes of the response is judged; one that ends after
/// them is a bad response, even when the server sends it all at once.
#[test]
fn http_judges_a_final_status_line_within_the_first_kib_only() {
    for (ends_at, want) in [(1024, "ok"), (1100, "bad response")] {
        let server = Server::tcp(move |mut s| {
            read_head(&mut s);
            let _ = s.write_all(&early_hints_then_200(ends_at));
        });
        let k = key(server.port, 6);
        let mut m = HealthMonitor::new(64);
        m.set_targets(vec![target(k, spec(http("/", None), server.port))]);
        wait_for_result(&mut m, &k, want, INTERVAL + SLACK);
    }
}

#[test]
fn http_without_a_domain_sends_the_server_address_as_host() {
    let heads = Arc::new(Mutex::new(Vec::<String>::new()));
    let hd = Arc::clone(&heads);
    let server = Server::tcp(move |mut s| {
        let head = read_head(&mut s);
        let _ = s.write_all(b"HTTP/1.0 204 No Content\r\n\r\n");
        hd.lock().unwrap().push(head);
    });
    let k = key(server.port, 6);
    let mut m = HealthMonitor::new(64);
    m.set_targets(vec![target(k, spec(http("/", None), server.port))]);
    wait_for_result(&mut m, &k, "ok", INTERVAL + SLACK);
    let heads = heads.lock().unwrap();
    assert!(
        heads[0].starts_with("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n"),
        "{heads:?}"
    );
}

#[test]
fn http_that_accepts_but_never_answers_times_out() {
    let accepted = Arc::new(Mutex::new(Vec::<(Instant, TcpStream)>::new()));
    let acc = Arc::clone(&accepted);
    let server = Server::tcp(move |s| acc.lock().unwrap().push((Instant::now(), s)));
    let k = key(server.port, 6);
    let mut m = HealthMonitor::new(64);
    m.set_targets(vec![target(k, spec(http("/", None), server.port))]);
    let failed = wait_for_result(&mut m, &k, "timeout", INTERVAL + TIMEOUT + SLACK);
    let first_accept = accepted.lock().unwrap()[0].0;
    let took = failed - first_accept;
    assert!(took >= TIMEOUT - Duration::from_millis(50), "{took:?}");
    assert!(took < TIMEOUT + SLACK, "{took:?}");
    let (_, t) = next_transition(&mut m, INTERVAL + TIMEOUT + SLACK).expect("goes down");
    assert_eq!((t.up, t.reason.as_str()), (false, "timeout"));
}

/// An echo server on a UDP socket; stops when dropped.
struct Echo {
    port: u16,
    run: Arc<AtomicBool>,
    got: Arc<Mutex<Vec<Vec<u8>>>>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    fn start() -> Echo {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let port = sock.local_addr().unwrap().port();
        let run = Arc::new(AtomicBool::new(true));
        let got = Arc::new(Mutex::new(Vec::new()));
        let (r, g) = (Arc::clone(&run), Arc::clone(&got));
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while r.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    g.lock().unwrap().push(buf[..n].to_vec());
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        Echo {
            port,
            run,
            got,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.run.store(false, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_udp_echo_server_stays_up_and_gets_the_payload() {
    let echo = Echo::start();
    let k = key(echo.port, 17);
    let mut m = HealthMonitor::new(64);
    let probe = Probe::Udp {
        payload: b"l4lb-health".to_vec(),
    };
    m.set_targets(vec![target(k, spec(probe, echo.port))]);
    wait_for_result(&mut m, &k, "ok", INTERVAL + SLACK);
    assert!(m.is_up(&k));
    assert_eq!(echo.got.lock().unwrap()[0], b"l4lb-health");
}

#[test]
fn a_closed_udp_port_goes_down_on_icmp_port_unreachable() {
    let port = closed_udp_port();
    let k = key(port, 17);
    let mut m = HealthMonitor::new(64);
    let t0 = Instant::now();
    let probe = Probe::Udp {
        payload: b"l4lb-health".to_vec(),
    };
    m.set_targets(vec![target(k, spec(probe, port))]);
    let (at, t) = next_transition(&mut m, 3 * INTERVAL).expect("goes down");
    assert_eq!(
        t,
        Transition {
            key: k,
            up: false,
            reason: "ICMP port unreachable".into()
        }
    );
    // Not a timeout: the second probe fails as soon as it starts.
    let second_probe = t0 + first_probe_offset(&k, INTERVAL) + INTERVAL;
    assert!(at >= second_probe);
    assert!(at < second_probe + SLACK, "{:?} late", at - second_probe);
}

#[test]
fn a_server_that_comes_back_is_up_after_healthy_threshold_probes() {
    let port = closed_tcp_port();
    let k = key(port, 6);
    let mut m = HealthMonitor::new(64);
    m.set_targets(vec![target(k, spec(Probe::Tcp, port))]);
    let (_, t) = next_transition(&mut m, 3 * INTERVAL).expect("goes down");
    assert!(!t.up);
    // std sets SO_REUSEADDR on listeners, so the port can be taken again.
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let (_, t) = next_transition(&mut m, 2 * INTERVAL + SLACK).expect("comes back");
    assert_eq!((t.up, t.reason.as_str()), (true, "ok"));
    drop(listener);
}

/// 300 UDP servers that never answer each keep a probe in flight for its
/// whole timeout, all the time, far more than 64 at once. Every probe must
/// still start on schedule: each target goes down within the README's bound
/// for a dead new server, offset + (unhealthy_threshold − 1) × interval +
/// timeout, and so does a closed port among them (whose probes fail at
/// once, so without the timeout).
#[test]
fn three_hundred_silent_udp_servers_all_go_down_within_the_detection_bound() {
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let closed = key(closed_udp_port(), 17);
    let udp = || Probe::Udp {
        payload: b"ping".to_vec(),
    };
    // The silent targets' own ports are below the ephemeral range, so none
    // is the closed port; all of them are probed at the silent socket.
    let mut targets: Vec<WantedTarget> = (1..=300)
        .map(|p| target(key(p, 17), spec(udp(), silent_port)))
        .collect();
    targets.push(target(closed, spec(udp(), closed.port)));
    let bound = |k: &TargetKey| {
        let fails_at_once = if *k == closed {
            Duration::ZERO
        } else {
            TIMEOUT
        };
        first_probe_offset(k, INTERVAL) + INTERVAL + fails_at_once
    };

    let mut m = HealthMonitor::new(probe_fd_budget());
    let t0 = Instant::now();
    m.set_targets(targets);
    let mut down_at: HashMap<TargetKey, Instant> = HashMap::new();
    while t0.elapsed() < 10 * INTERVAL && down_at.len() < 301 {
        for t in m.poll(Instant::now()) {
            assert!(!t.up, "{t:?}");
            down_at.insert(t.key, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(down_at.len(), 301, "down within 10 intervals");
    assert_eq!(
        m.states().iter().filter(|(_, _, r)| r == "timeout").count(),
        300
    );
    let (worst, late) = down_at
        .iter()
        .map(|(k, at)| {
            let due = t0 + bound(k);
            assert!(*at >= due, "{k} down before its second probe ended");
            (*k, *at - due)
        })
        .max_by_key(|(_, late)| *late)
        .unwrap();
    // More slack than one target needs: 301 probes share two threads and
    // the test's own 10 ms polling.
    assert!(
        late < 2 * SLACK,
        "{worst} went down {late:?} after its bound"
    );
}
