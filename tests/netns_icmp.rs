//! ICMP errors about NAT'ed flows, end to end in network namespaces, over
//! IPv4 and IPv6: a server's "port unreachable" reaches the client's
//! connected socket as "connection refused", and a client's "port
//! unreachable" about a reply reaches the server, whose kernel accepts it.
//! Root required; see tests/harness.

mod harness;

use harness::{Topology, N_SOURCES};
use std::process::Command;
use std::time::{Duration, Instant};

/// Listeners on port 54 whose servers' port 9999 is closed, checked on the
/// echo port (9053), so they stay up: every datagram is refused.
const CLOSED: &str = r#"
[[listener]]
name = "closed4"
vip = "198.18.100.1"
protocol = "udp"
port = 54
backend_service = "closed4"

[[listener]]
name = "closed6"
vip = "2001:2:0:100::1"
protocol = "udp"
port = 54
backend_service = "closed6"

[[listener]]
name = "echo4"
vip = "198.18.100.1"
protocol = "udp"
port = 53
backend_service = "echo4"

[[backend_service]]
name = "closed4"
protocol = "udp"
  [backend_service.health_check]
  type = "udp"
  port = 9053
  [[backend_service.server]]
  address = "198.18.2.11"
  port = 9999
  [[backend_service.server]]
  address = "198.18.2.12"
  port = 9999

[[backend_service]]
name = "closed6"
protocol = "udp"
  [backend_service.health_check]
  type = "udp"
  port = 9053
  [[backend_service.server]]
  address = "2001:2:0:2::11"
  port = 9999
  [[backend_service.server]]
  address = "2001:2:0:2::12"
  port = 9999

[[backend_service]]
name = "echo4"
protocol = "udp"
  [[backend_service.server]]
  address = "198.18.2.11"
  port = 9053
  [[backend_service.server]]
  address = "198.18.2.12"
  port = 9053
  [[backend_service.server]]
  address = "198.18.2.13"
  port = 9053
"#;

const SOURCES4: &str = "198.18.4.1-198.18.4.100";
const SOURCES6: &str = "2001:2:0:4::1-2001:2:0:4::64";
const N: usize = 100;

fn in_ns(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip netns exec {ns} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip netns exec {ns} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Turns off ICMP error rate limiting in `ns`, so that every refused
/// datagram is answered (the kernel otherwise lets about 50 through at
/// once, and one per second per peer after a short burst).
fn no_icmp_rate_limit(ns: &str) {
    in_ns(
        ns,
        &[
            "sysctl",
            "-qw",
            "net.ipv4.icmp_ratemask=0",
            "net.ipv6.icmp.ratemask=",
        ],
    );
}

/// The ICMP counters `names` of namespace `ns`, IPv4 (`/proc/net/snmp`,
/// "Icmp:" lines) then IPv6 (`/proc/net/snmp6`), summed over the backends.
fn icmp_counters(names4: &[&str], names6: &[&str]) -> Vec<u64> {
    let mut total = vec![0u64; names4.len() + names6.len()];
    for b in ["b1", "b2", "b3"] {
        let ns = format!("l4lb-{b}");
        let snmp = in_ns(&ns, &["cat", "/proc/net/snmp"]);
        let mut icmp = snmp.lines().filter(|l| l.starts_with("Icmp: "));
        let (head, values) = (
            icmp.next().expect("Icmp header"),
            icmp.next().expect("Icmp values"),
        );
        let head: Vec<&str> = head.split_whitespace().collect();
        let values: Vec<&str> = values.split_whitespace().collect();
        for (i, n) in names4.iter().enumerate() {
            let at = head
                .iter()
                .position(|h| h == n)
                .unwrap_or_else(|| panic!("no {n}"));
            total[i] += values[at].parse::<u64>().expect("number");
        }
        let snmp6 = in_ns(&ns, &["cat", "/proc/net/snmp6"]);
        for (i, n) in names6.iter().enumerate() {
            let v = snmp6
                .lines()
                .find_map(|l| l.strip_prefix(n).map(str::trim))
                .unwrap_or_else(|| panic!("no {n}"));
            total[names4.len() + i] += v.parse::<u64>().expect("number");
        }
    }
    total
}

#[test]
fn icmp_errors_about_flows_reach_the_other_end_translated() {
    let mut t = Topology::up("icmp", N_SOURCES);
    for ns in ["l4lb-client", "l4lb-b1", "l4lb-b2", "l4lb-b3"] {
        no_icmp_rate_limit(ns);
    }
    let cfg = t.config_file_text("dual-stack.toml", |c| c + CLOSED);
    t.start_lb(&cfg);

    // 1. Server to client: each datagram to a closed server port is
    //    refused, and the refusal reaches the client's connected socket,
    //    from the VIP, about the datagram it sent. (Untranslated, it would
    //    be dropped and the client would time out.)
    for (vip, sources) in [
        ("198.18.100.1:54", SOURCES4),
        ("[2001:2:0:100::1]:54", SOURCES6),
    ] {
        let d = t.drive_with(
            &[],
            &[vip],
            sources,
            1,
            &["--udp-connect", "--timeout-ms", "3000"],
        );
        assert_eq!(d.requests, N, "{vip}");
        for r in &d.results {
            assert_eq!(
                r.error.as_deref(),
                Some("recv: Connection refused (os error 111)"),
                "{vip}: {r:?}"
            );
        }
    }

    // 2. Client to server: clients send and close at once; the servers'
    //    echoes find no socket, and the clients' kernels answer with port
    //    unreachable, to the VIP, about the echo they received. l4lb sends
    //    each to its server, about the echo the server sent: the server's
    //    kernel counts it, with a valid checksum.
    let names4 = ["InDestUnreachs", "InCsumErrors", "InErrors"];
    let names6 = ["Icmp6InDestUnreachs", "Icmp6InCsumErrors", "Icmp6InErrors"];
    let before = icmp_counters(&names4, &names6);
    for (vip, sources) in [
        ("198.18.100.1:53", SOURCES4),
        ("[2001:2:0:100::1]:53", SOURCES6),
    ] {
        let d = t.drive_with(&[], &[vip], sources, 1, &["--udp-send-only"]);
        assert_eq!(
            (d.requests, d.failures),
            (N, 0),
            "{vip}: {}",
            d.failures_text()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let delta = loop {
        let now = icmp_counters(&names4, &names6);
        let delta: Vec<u64> = now.iter().zip(&before).map(|(a, b)| a - b).collect();
        if (delta[0] >= N as u64 && delta[3] >= N as u64) || Instant::now() > deadline {
            break delta;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        delta,
        [N as u64, 0, 0, N as u64, 0, 0],
        "servers' ICMP counters ({names4:?}, {names6:?}) moved by"
    );

    // Every error was translated; nothing was dropped.
    let st = t.stats();
    for (reason, n) in st["drops"].as_object().expect("drops") {
        assert_eq!(n.as_u64(), Some(0), "drop counter {reason}: {st}");
    }
    assert_eq!(
        st["workers"][0]["icmp"],
        4 * N as u64,
        "{}",
        st["workers"][0]
    );
}

/// The host itself may use a VIP address for traffic of its own. An error
/// about that traffic (here: a client's "port unreachable" about a datagram
/// the host sent from the VIP) is the kernel's: the steering program leaves
/// it to the kernel, whose connected socket then hears "connection
/// refused", instead of sending it to l4lb, which could only drop it.
#[test]
fn icmp_errors_about_the_hosts_own_traffic_on_a_vip_reach_its_kernel() {
    let mut t = Topology::up("icmp-host", 1);
    no_icmp_rate_limit("l4lb-client");
    let cfg = t.config_file_text("dual-stack.toml", |c| c);
    t.start_lb(&cfg);
    // The VIPs as addresses of the host itself.
    in_ns(
        "l4lb-lb",
        &["ip", "addr", "add", "198.18.100.1/32", "dev", "lo"],
    );
    in_ns(
        "l4lb-lb",
        &["ip", "addr", "add", "2001:2:0:100::1/128", "dev", "lo"],
    );
    let passed = |t: &Topology| -> u64 {
        let st = t.stats();
        st["steering"]
            .as_array()
            .expect("steering counters")
            .iter()
            .map(|x| x["passed"].as_u64().expect("passed"))
            .sum()
    };
    let passed_before = passed(&t);
    // From the VIP to a client's closed port: the client's kernel refuses.
    for (target, source) in [
        ("198.18.4.1:9", "198.18.100.1"),
        ("[2001:2:0:4::1]:9", "2001:2:0:100::1"),
    ] {
        let d = t.drive_in(
            "l4lb-lb",
            &[target],
            source,
            &["--udp-connect", "--timeout-ms", "3000", "--parallel", "1"],
        );
        assert_eq!(d.requests, 1, "{target}");
        assert_eq!(
            d.results[0].error.as_deref(),
            Some("recv: Connection refused (os error 111)"),
            "{target}: {:?}",
            d.results[0]
        );
    }
    let st = t.stats();
    for (reason, n) in st["drops"].as_object().expect("drops") {
        assert_eq!(n.as_u64(), Some(0), "drop counter {reason}: {st}");
    }
    assert_eq!(st["workers"][0]["icmp"], 0, "nothing translated");
    assert!(
        passed(&t) >= passed_before + 2,
        "both errors passed to the kernel by the steering program"
    );
}
