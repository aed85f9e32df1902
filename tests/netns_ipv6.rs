//! IPv6 end to end in network namespaces: the real `l4lb` binary on
//! `config/dual-stack.toml` forwards IPv6 TCP (HTTP) and UDP from 1000
//! client addresses in 2001:2:0:4::/64 to three servers, while IPv4
//! clients use the same instance. Root required; see tests/harness.

mod harness;

use harness::{backend_addr6, in_netns, Drive, Topology, N_SOURCES, SOURCES, SOURCES6};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

const WEB6: &str = "[2001:2:0:100::1]:80";
const WEB6_ALT: &str = "[2001:2:0:100::2]:80";
const ECHO6: &str = "[2001:2:0:100::1]:53";
const WEB4: &str = "198.18.100.1:80";

/// Every request answered, from the address the client sent to, and the
/// server saw the client's own address.
fn assert_all_answered_through_nat(d: &Drive, want: usize, what: &str) {
    assert_eq!(d.requests, want, "{what}: requests");
    assert_eq!(
        d.failures,
        0,
        "{what}: failed requests:\n{}",
        d.failures_text()
    );
    for r in &d.results {
        assert_eq!(r.reply_from.as_deref(), Some(r.target.as_str()), "{r:?}");
        let source: IpAddr = r.source.parse().expect("source address");
        let peer: SocketAddr = r
            .seen_peer
            .as_deref()
            .expect("peer")
            .parse()
            .expect("peer address");
        assert_eq!(peer.ip(), source, "{what}: the server saw {peer}: {r:?}");
    }
}

/// backend → share of all requests.
fn shares(per_source: &BTreeMap<String, Vec<String>>) -> HashMap<String, f64> {
    let total: usize = per_source.values().map(Vec::len).sum();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for b in per_source.values().flatten() {
        *counts.entry(b.clone()).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|(b, n)| (b, n as f64 / total as f64))
        .collect()
}

/// Every source reached one backend only; returns source → backend.
fn sticky(d: &Drive, target: &str) -> BTreeMap<String, String> {
    let per_source = d.by_source(target);
    assert_eq!(per_source.len(), N_SOURCES, "{target}: every source driven");
    per_source
        .into_iter()
        .map(|(src, seen)| {
            assert!(
                seen.iter().all(|b| b == &seen[0]),
                "{target}: source {src} reached several backends: {seen:?}"
            );
            (src, seen[0].clone())
        })
        .collect()
}

fn assert_shares(d: &Drive, target: &str, want: [f64; 3]) {
    let s = shares(&d.by_source(target));
    for (b, w) in ["b1", "b2", "b3"].iter().zip(want) {
        let got = s.get(*b).copied().unwrap_or(0.0);
        assert!(
            (got - w).abs() <= 0.05,
            "{target}: {b} got {:.1}% of requests, want {:.1}% (±5%)",
            got * 100.0,
            w * 100.0
        );
    }
}

/// No drop of any reason, and every worker sent every frame it received.
fn assert_no_drops(t: &Topology) -> serde_json::Value {
    let st = t.stats();
    for (reason, n) in st["drops"].as_object().expect("drops") {
        assert_eq!(n.as_u64(), Some(0), "drop counter {reason}: {st}");
    }
    for w in st["workers"].as_array().expect("workers") {
        assert_eq!(w["rx"], w["tx"], "every received frame was sent: {w}");
    }
    st
}

#[test]
fn forwards_ipv6_tcp_and_udp_next_to_ipv4_and_fails_over() {
    let mut t = Topology::up("ipv6", N_SOURCES);
    let cfg = t.config_file_text("dual-stack.toml", |c| c);
    t.start_lb(&cfg);
    // The health checks reached every IPv6 server: they answer only once
    // their neighbour solicitations for l4lb's host reach its kernel.
    for b in ["b1", "b2", "b3"] {
        t.wait_backend_up(
            &format!("{}/tcp", backend_addr6(b, 8080)),
            true,
            Duration::from_secs(10),
        );
    }

    // Both families at once, through one worker.
    let v4 = t.drive_spawn(&[WEB4], &[], SOURCES, 1, &[]);
    let d = t.drive(&[WEB6, WEB6_ALT], &[ECHO6], SOURCES6, 3);
    let d4 = Topology::drive_wait(v4);
    assert_all_answered_through_nat(&d, N_SOURCES * 3 * 3, "IPv6");
    assert_all_answered_through_nat(&d4, N_SOURCES, "IPv4 next to IPv6");

    // Weighted source-IP hashing of IPv6 clients: sticky, weighted, and
    // exactly what `l4lb simulate` predicts for every client.
    let config = t.config.clone();
    for (target, listener) in [(WEB6, "web6"), (WEB6_ALT, "web6-alt")] {
        let got = sticky(&d, target);
        assert_shares(&d, target, [0.5, 0.3, 0.2]);
        let clients: Vec<String> = got.keys().cloned().collect();
        let predicted = t.simulate(&config, listener, &clients);
        for (src, b) in &got {
            assert_eq!(
                predicted.get(src),
                Some(&backend_addr6(b, 8080)),
                "{target}: simulate and the live data plane disagree for {src}"
            );
        }
    }
    // Round robin with persistence: each client's three datagrams (three
    // sockets, three flows) went to the server its first one was given.
    let echo_before = sticky(&d, ECHO6);
    assert_shares(&d, ECHO6, [1.0 / 3.0; 3]);

    let st = assert_no_drops(&t);
    assert_eq!(st["persistence"]["live"], 1000, "{}", st["persistence"]);
    let listeners: Vec<&str> = st["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .map(|l| l["name"].as_str().expect("name"))
        .collect();
    assert_eq!(
        listeners,
        [
            "web4 198.18.100.1:80/tcp",
            "web6 [2001:2:0:100::1]:80/tcp",
            "web6-alt [2001:2:0:100::2]:80/tcp",
            "echo6 [2001:2:0:100::1]:53/udp"
        ]
    );

    // b1 fails: its IPv6 health checks take it out, and new requests,
    // including those of clients persisted to it, go to b2 and b3.
    t.stop_backend("b1");
    for name in ["[2001:2:0:2::11]:8080/tcp", "[2001:2:0:2::11]:9053/udp"] {
        t.wait_backend_up(name, false, Duration::from_secs(10));
    }
    let d = t.drive(&[WEB6], &[ECHO6], SOURCES6, 1);
    assert_all_answered_through_nat(&d, N_SOURCES * 2, "IPv6 after b1 failed");
    for target in [WEB6, ECHO6] {
        let after = sticky(&d, target);
        assert!(
            after.values().all(|b| b != "b1"),
            "{target}: a request reached the failed b1"
        );
        if target == ECHO6 {
            // Clients persisted to b2 or b3 kept their server.
            for (src, b) in echo_before.iter().filter(|(_, b)| *b != "b1") {
                assert_eq!(&after[src], b, "{src} kept its persisted server");
            }
        }
    }
    assert_no_drops(&t);
}

/// Two workers in native attach mode on two-queue veths: an IPv6 client's
/// packets and its server's replies hash to either queue, and whichever
/// worker gets them finds the flow.
#[test]
fn ipv6_on_two_workers_whichever_queue_a_packet_lands_on() {
    let mut t = Topology::up_with_queues("ipv6-two-workers", N_SOURCES, 2);
    let cfg = t.config_file_text("dual-stack.toml", |c| {
        c.replace("workers = [0]", "workers = [0, 1]")
            .replace("attach = \"skb\"", "attach = \"native\"")
    });
    assert!(cfg.contains("workers = [0, 1]") && cfg.contains("attach = \"native\""));
    t.start_lb(&cfg);

    let d = t.drive(&[WEB6], &[ECHO6], SOURCES6, 3);
    assert_all_answered_through_nat(&d, N_SOURCES * 2 * 3, "IPv6 on two workers");
    let got = sticky(&d, WEB6);
    let clients: Vec<String> = got.keys().cloned().collect();
    let predicted = t.simulate(&t.config, "web6", &clients);
    for (src, b) in &got {
        assert_eq!(predicted.get(src), Some(&backend_addr6(b, 8080)), "{src}");
    }
    sticky(&d, ECHO6);

    let st = assert_no_drops(&t);
    let workers = st["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 2);
    for w in workers {
        assert!(w["rx"].as_u64().unwrap() > 1000, "worker idle: {w}");
        assert_eq!(w["rx"], w["tx"], "{w}");
    }
}

/// An IPv6 packet of another protocol than TCP, UDP or ICMPv6 to a VIP,
/// with no extension header (here OSPF, protocol 89), is the kernel's, as
/// the same packet over IPv4 is: the steering program passes it, rather
/// than sending it to l4lb as an unreadable extension header to be
/// dropped.
#[test]
fn ipv6_of_another_protocol_to_a_vip_reaches_the_hosts_kernel() {
    use socket2::{Domain, Protocol, Socket, Type};
    const OSPF: i32 = 89;
    let mut t = Topology::up("ipv6-proto", 1);
    let cfg = t.config_file_text("dual-stack.toml", |c| c);
    t.start_lb(&cfg);
    let st = std::process::Command::new("ip")
        .args([
            "-n",
            "l4lb-lb",
            "addr",
            "add",
            "2001:2:0:100::1/128",
            "dev",
            "lo",
        ])
        .status()
        .expect("ip addr add");
    assert!(st.success(), "the VIP as an address of the host");
    std::thread::sleep(Duration::from_millis(1500)); // l4lb re-reads them each second

    let receiver = in_netns("l4lb-lb", || {
        let s = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::from(OSPF))).expect("raw");
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 256];
        let n = s.recv(&mut buf).unwrap_or(0);
        // SAFETY: recv initialised the first n bytes.
        buf[..n]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect::<Vec<u8>>()
    });
    std::thread::sleep(Duration::from_millis(300));
    in_netns("l4lb-client", || {
        let s = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::from(OSPF))).expect("raw");
        let to: SocketAddr = "[2001:2:0:100::1]:0".parse().expect("address");
        for _ in 0..3 {
            s.send_to(b"l4lb-proto-89", &to.into()).expect("send");
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .join()
    .expect("sender");
    let got = receiver.join().expect("receiver");
    assert_eq!(got, b"l4lb-proto-89", "the host's kernel received it");
    assert_no_drops(&t);
    assert!(t.signal_lb(libc::SIGTERM).success(), "{}", t.lb_log());
}
