//! End-to-end tests in network namespaces: the real `l4lb` binary forwarding
//! real TCP (HTTP) and UDP traffic from 1000 client addresses to three
//! backends. Root required; see tests/harness.

mod harness;

use harness::{backend_addr, in_netns, Topology, N_SOURCES, SOURCES};
use std::collections::{BTreeMap, HashMap};

const WEB: &str = "198.18.100.1:80";
const WEB_ALT: &str = "198.18.100.2:80";
const ECHO: &str = "198.18.100.1:53";

fn shares(per_source: &BTreeMap<String, Vec<String>>) -> HashMap<String, f64> {
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut total = 0;
    for backends in per_source.values() {
        for b in backends {
            *counts.entry(b.clone()).or_default() += 1;
            total += 1;
        }
    }
    counts
        .into_iter()
        .map(|(b, n)| (b, n as f64 / total as f64))
        .collect()
}

fn assert_share(shares: &HashMap<String, f64>, backend: &str, want: f64, what: &str) {
    let got = shares.get(backend).copied().unwrap_or(0.0);
    assert!(
        (got - want).abs() <= 0.05,
        "{what}: backend {backend} got {:.1}% of requests, weight says {:.1}% (±5%)",
        got * 100.0,
        want * 100.0
    );
}

#[test]
fn forwards_tcp_and_udp_from_many_clients_sticky_weighted_and_as_simulated() {
    let mut t = Topology::up("forward", N_SOURCES);
    let cfg = t.config_text(|c| c);
    t.start_lb(&cfg);

    let d = t.drive(&[WEB, WEB_ALT], &[ECHO], SOURCES, 3);

    // Every request answered.
    assert_eq!(d.requests, N_SOURCES * 3 * 3);
    assert_eq!(d.failures, 0, "failed requests:\n{}", d.failures_text());

    for r in &d.results {
        // The reply came from the VIP:port the client addressed.
        assert_eq!(r.reply_from.as_deref(), Some(r.target.as_str()), "{r:?}");
        // The backend saw the client's real address (NAT keeps it).
        let peer_ip = r
            .seen_peer
            .as_deref()
            .and_then(|p| p.rsplit_once(':'))
            .map(|p| p.0);
        assert_eq!(peer_ip, Some(r.source.as_str()), "{r:?}");
    }

    let config = t.config.clone();
    for (target, listener, weights) in [
        (WEB, "web", [0.5, 0.3, 0.2]),
        (WEB_ALT, "web-alt", [0.5, 0.3, 0.2]),
        (ECHO, "echo", [1.0 / 3.0; 3]),
    ] {
        let per_source = d.by_source(target);
        assert_eq!(
            per_source.len(),
            N_SOURCES,
            "{target}: every source was driven"
        );

        // Each source always reached the same backend.
        for (src, seen) in &per_source {
            assert!(
                seen.iter().all(|b| b == &seen[0]),
                "{target}: source {src} reached several backends: {seen:?}"
            );
        }

        // The spread follows the weights.
        let s = shares(&per_source);
        for (b, w) in ["b1", "b2", "b3"].iter().zip(weights) {
            assert_share(&s, b, w, target);
        }

        // The backend observed for every source is what simulate predicts.
        let clients: Vec<String> = per_source.keys().cloned().collect();
        let predicted = t.simulate(&config, listener, &clients);
        let port = if target == ECHO { 9053 } else { 8080 };
        for (src, seen) in &per_source {
            assert_eq!(
                predicted.get(src),
                Some(&backend_addr(&seen[0], port)),
                "{target}: simulate and the live data plane disagree for {src}"
            );
        }
    }

    // Nothing was lost inside l4lb: no drop of any reason, and every frame
    // received was transmitted.
    let st = t.stats();
    for (reason, n) in st["drops"].as_object().expect("drops") {
        assert_eq!(n.as_u64(), Some(0), "drop counter {reason}");
    }
    let w = &st["workers"][0];
    assert_eq!(w["rx"], w["tx"], "every received frame was sent: {w}");
    assert!(w["forwarded"].as_u64().unwrap() > 0);
    let listeners = st["listeners"].as_array().expect("listeners");
    assert_eq!(listeners.len(), 3);
    for l in listeners {
        assert!(
            l["packets"].as_u64().unwrap() > 0,
            "listener saw traffic: {l}"
        );
    }

    // SIGTERM: clean exit, XDP detached from both interfaces.
    let st = t.signal_lb(libc::SIGTERM);
    assert!(st.success(), "l4lb exit status {st}:\n{}", t.lb_log());
    assert!(!Topology::xdp_attached("lb-c"), "XDP left on lb-c");
    assert!(!Topology::xdp_attached("lb-b"), "XDP left on lb-b");
}

#[test]
fn starts_over_a_stale_xdp_program_left_by_a_killed_instance() {
    let mut t = Topology::up("stale", 50);
    let cfg = t.config_text(|c| c);
    t.start_lb(&cfg);
    // SIGKILL: no chance to detach; the program stays on both interfaces.
    let st = t.signal_lb(libc::SIGKILL);
    assert!(!st.success());
    assert!(
        Topology::xdp_attached("lb-c"),
        "precondition: a stale program is left"
    );

    t.start_lb(&cfg);
    let d = t.drive(&[WEB], &[ECHO], "198.18.4.1-198.18.4.50", 2);
    assert_eq!(d.requests, 200);
    assert_eq!(d.failures, 0, "failed requests:\n{}", d.failures_text());
    assert!(
        t.lb_log()
            .contains("replaced an XDP program left on the interface"),
        "the stale program was noticed:\n{}",
        t.lb_log()
    );
    assert!(t.signal_lb(libc::SIGTERM).success());
    assert!(!Topology::xdp_attached("lb-c"));
}

#[test]
fn refuses_to_start_on_a_missing_interface_with_a_clear_error() {
    let t = Topology::up("missing-if", 10);
    let cfg = t.config_text(|c| {
        c.replace(
            "client_interface = \"lb-c\"",
            "client_interface = \"lb-nope\"",
        )
    });
    let out = t.run_lb_expecting_failure(&cfg);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("interface lb-nope not found") && err.contains("instance.client_interface"),
        "stderr: {err}"
    );
    assert!(!err.contains("panicked"), "stderr: {err}");
    assert!(
        !Topology::xdp_attached("lb-b"),
        "nothing attached on failure"
    );
}

/// A second `l4lb run` on the same config (a double start by a script or
/// an operator) must fail before it touches the interfaces: replacing the
/// running instance's XDP program and detaching it on the way out would
/// leave the running instance receiving nothing.
#[test]
fn a_second_instance_fails_without_disturbing_the_running_one() {
    let mut t = Topology::up("second", 10);
    let cfg = t.config_text(|c| c);
    t.start_lb(&cfg);

    let out = t.run_lb_expecting_failure(&cfg);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another l4lb is running with this control socket"),
        "stderr: {err}"
    );
    assert!(
        !err.contains("replaced an XDP program"),
        "the second instance touched XDP: {err}"
    );
    the_running_instance_still_forwards(&mut t);
}

/// The same with a control socket of its own: the XDP program on the
/// interfaces is held by a running process, so it is not a stale one to
/// replace, and the second instance must stop before touching it.
#[test]
fn a_second_instance_with_another_control_socket_leaves_the_running_one_alone() {
    let mut t = Topology::up("second-sock", 10);
    let cfg = t.config_text(|c| c);
    t.start_lb(&cfg);
    let pid = t.lb_pid();

    let other = cfg.replace("ctl.sock", "ctl-second.sock");
    assert_ne!(other, cfg, "the config edit applied");
    let out = t.run_lb_expecting_failure(&other);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("held by running process {pid} (l4lb)"))
            && err.contains("stop it first"),
        "stderr: {err}"
    );
    assert!(!err.contains("replaced an XDP program"), "stderr: {err}");
    the_running_instance_still_forwards(&mut t);
}

/// SIGHUP's default action ends a process. A reload asked for while l4lb
/// is still starting (here: waiting up to 3 s for a server's MAC that never
/// resolves) must not kill it: it is applied once l4lb runs.
#[test]
fn a_sighup_during_start_up_reloads_instead_of_killing_l4lb() {
    let mut t = Topology::up("hup-start", 10);
    let cfg = t.config_text(|c| {
        c.replacen(
            "  [[backend_service.server]]\n  address = \"198.18.2.13\"",
            "  [[backend_service.server]]\n  address = \"198.18.2.99\"\n  port = 9053\n\n  \
             [[backend_service.server]]\n  address = \"198.18.2.13\"",
            1,
        )
    });
    assert!(cfg.contains("198.18.2.99"), "the config edit applied");
    t.spawn_lb(&cfg);
    std::thread::sleep(std::time::Duration::from_millis(700));
    t.kill_lb(libc::SIGHUP);
    assert_eq!(
        t.wait_lb_exit(std::time::Duration::from_secs(5)),
        None,
        "l4lb ended on SIGHUP:\n{}",
        t.lb_log()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !t.lb_log().contains("(via SIGHUP)") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(t.lb_log().contains("(via SIGHUP)"), "{}", t.lb_log());
    let d = t.drive(&[WEB], &[], "198.18.4.1-198.18.4.10", 1);
    assert_eq!(d.failures, 0, "failed requests:\n{}", d.failures_text());
    assert!(t.signal_lb(libc::SIGTERM).success(), "{}", t.lb_log());
}

/// Deleting an interface takes l4lb's AF_XDP sockets and XDP program on it
/// along. l4lb must not carry on looking alive while forwarding nothing:
/// it stops with an error naming the interface, and detaches from the
/// other one.
#[test]
fn an_interface_deleted_while_running_stops_l4lb_with_an_error_naming_it() {
    let mut t = Topology::up("if-gone", 10);
    let cfg = t.config_text(|c| c);
    t.start_lb(&cfg);
    let out = std::process::Command::new("ip")
        .args(["-n", "l4lb-lb", "link", "del", "dev", "lb-c"])
        .status()
        .expect("ip link del");
    assert!(out.success(), "deleting lb-c");
    let st = t.wait_lb_exit(std::time::Duration::from_secs(5));
    assert_eq!(
        st.and_then(|s| s.code()),
        Some(1),
        "l4lb still running or ended otherwise ({st:?}):\n{}",
        t.lb_log()
    );
    let log = t.lb_log();
    assert!(
        log.contains("instance.client_interface = \"lb-c\" disappeared"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    assert!(!Topology::xdp_attached("lb-b"), "XDP left on lb-b");
}

/// Worker `i` binds queue `i` of both interfaces. More workers than an
/// interface has queues is refused at start with a message that says so,
/// not with the kernel's bare EINVAL from the socket bind.
#[test]
fn refuses_more_workers_than_the_interfaces_have_queues() {
    let t = Topology::up("queues", 10);
    let cfg = t.config_text(|c| c.replace("workers = [0]", "workers = [0, 1]"));
    assert!(cfg.contains("workers = [0, 1]"), "the config edit applied");
    let out = t.run_lb_expecting_failure(&cfg);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "2 worker(s) bind queues 0 to 1 of instance.client_interface = \"lb-c\", which has \
             1 RX and 1 TX queue(s); use at most 1 worker(s)"
        ),
        "stderr: {err}"
    );
    assert_nothing_attached();
}

/// A server's packet to one of the host's own addresses is the kernel's,
/// also when the address is on neither of l4lb's interfaces (a management
/// or loopback address): it must not be taken for a reply of a flow.
#[test]
fn a_server_reaches_the_hosts_address_on_another_interface() {
    let mut t = Topology::up("host-addr", 10);
    ip_ok(&["-n", "l4lb-lb", "addr", "add", "198.18.9.1/32", "dev", "lo"]);
    let cfg = t.config_text(|c| c);
    t.start_lb(&cfg);
    b1_pings_the_host(&mut t, &[], "198.18.9.1", "198.18.9.1");
}

/// So is a server's broadcast to its subnet (198.18.2.0/24, whose
/// all-ones address the kernel accepts although the harness sets no
/// `brd`): here a ping, which the host's kernel is told to answer.
#[test]
fn a_servers_subnet_broadcast_reaches_the_hosts_kernel() {
    let mut t = Topology::up("subnet-brd", 10);
    let sysctl = "net.ipv4.icmp_echo_ignore_broadcasts=0";
    ip_ok(&["netns", "exec", "l4lb-lb", "sysctl", "-qw", sysctl]);
    let cfg = t.config_text(|c| c);
    t.start_lb(&cfg);
    b1_pings_the_host(&mut t, &["-b"], "198.18.2.255", "198.18.2.1");
}

/// Runs `ip ARGS`, which must succeed.
fn ip_ok(args: &[&str]) {
    let st = std::process::Command::new("ip")
        .args(args)
        .status()
        .expect("ip");
    assert!(st.success(), "ip {args:?}");
}

/// Server b1 pings `target` (with `flags`) three times; the host answers
/// from `answers_from`, and l4lb counts no drop. Then l4lb is stopped.
fn b1_pings_the_host(t: &mut Topology, flags: &[&str], target: &str, answers_from: &str) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", "l4lb-b1", "ping", "-c", "3", "-i", "0.2"])
        .args(["-W", "1"])
        .args(flags)
        .arg(target)
        .output()
        .expect("ip netns exec ... ping");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("from {answers_from}:")),
        "ping {flags:?} {target} from b1, answered by {answers_from}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = t.stats();
    for (reason, n) in st["drops"].as_object().expect("drops") {
        assert_eq!(n.as_u64(), Some(0), "drop counter {reason}: {st}");
    }
    assert!(t.signal_lb(libc::SIGTERM).success(), "{}", t.lb_log());
}

/// Adds `n` /32 addresses of 198.19.0.0/16, from the `from`th on, to lo in
/// l4lb's namespace.
fn add_lo_addresses(from: u32, n: u32) {
    use std::io::Write;
    let mut child = std::process::Command::new("ip")
        .args(["-n", "l4lb-lb", "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("ip -batch");
    let mut batch = String::new();
    for i in from..from + n {
        batch.push_str(&format!(
            "addr add 198.19.{}.{}/32 dev lo\n",
            i / 256,
            i % 256
        ));
    }
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(batch.as_bytes()).expect("batch");
    drop(stdin);
    assert!(child.wait().expect("ip").success(), "adding addresses");
}

/// Every address of the host goes into the steering program's map of
/// local addresses, and hosts may have many (VIPs of other services on
/// lo, say): 5000 fit. More than the map holds is refused with a message
/// that names the map, not a bare E2BIG.
#[test]
fn a_host_with_thousands_of_addresses_starts_and_too_many_is_a_clear_error() {
    let mut t = Topology::up("many-addrs", 10);
    add_lo_addresses(0, 5000);
    let cfg = t.config_text(|c| c);
    t.start_lb(&cfg);
    let d = t.drive(&[WEB], &[ECHO], "198.18.4.1-198.18.4.10", 1);
    assert_eq!(d.failures, 0, "failed requests:\n{}", d.failures_text());
    assert!(t.signal_lb(libc::SIGTERM).success(), "{}", t.lb_log());

    add_lo_addresses(5000, 11400);
    let out = t.run_lb_expecting_failure(&cfg);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("updating the XDP map l4lb_local of lb-c to ")
            && err.contains("(more than bpf/l4lb_steer.c gives it room for)"),
        "stderr: {err}"
    );
    assert_nothing_attached();
}

/// The kernel drops frames longer than l4lb's AF_XDP sockets receive
/// (1792 bytes) without a trace in l4lb's counters. So l4lb refuses an
/// interface whose MTU lets them through, and at the largest MTU it
/// accepts, datagrams that fill it are forwarded whole.
#[test]
fn refuses_an_mtu_above_what_it_receives_and_forwards_frames_of_the_largest_it_takes() {
    let mut t = Topology::up("mtu", 10);
    let cfg = t.config_text(|c| c);
    Topology::set_mtu("l4lb-lb", "lb-c", 1779);
    let out = t.run_lb_expecting_failure(&cfg);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("instance.client_interface = \"lb-c\"")
            && err.contains("its MTU is 1779, above 1778")
            && err.contains("ip link set dev lb-c mtu 1778"),
        "stderr: {err}"
    );
    assert!(!err.contains("panicked"), "stderr: {err}");
    assert!(
        !Topology::xdp_attached("lb-c"),
        "nothing attached on failure"
    );

    t.set_path_mtu(1778);
    t.start_lb(&cfg);
    // 1750 bytes of payload: 1778-byte IP packets in 1792-byte frames.
    let d = t.drive_with(
        &[],
        &[ECHO],
        "198.18.4.1-198.18.4.10",
        3,
        &["--udp-size", "1750"],
    );
    assert_eq!(d.requests, 30);
    assert_eq!(d.failures, 0, "failed requests:\n{}", d.failures_text());
    let st = t.stats();
    let w = &st["workers"][0];
    assert_eq!(w["forwarded"], 30, "{st}");
    assert_eq!(w["rx"], 60, "requests and replies: {st}");
    let sockets = w["sockets"].as_array().expect("sockets");
    assert_eq!(sockets.len(), 2, "{st}");
    for (sk, name) in sockets.iter().zip(["lb-c", "lb-b"]) {
        assert_eq!(sk["interface"], name, "{st}");
        assert_eq!(sk["rx_dropped"], 0, "{st}");
    }

    // The MTU is checked at start only. Raised under a running l4lb, it
    // lets through frames the socket cannot take: the kernel drops them,
    // and only the socket's own counter shows it.
    t.set_path_mtu(1779);
    let d = t.drive_with(
        &[],
        &[ECHO],
        "198.18.4.1-198.18.4.4",
        1,
        &["--udp-size", "1751", "--timeout-ms", "500"],
    );
    assert_eq!((d.requests, d.failures), (4, 4), "{}", d.failures_text());
    let st = t.stats();
    let w = &st["workers"][0];
    assert_eq!(w["rx"], 60, "nothing more reached l4lb: {st}");
    assert_eq!(w["sockets"][0]["rx_dropped"], 4, "{st}");
    assert_eq!(w["sockets"][1]["rx_dropped"], 0, "{st}");
    // And l4lb says so in its log, once per interface (it looks every
    // second; the driver above took at least 0.5 s).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let warning = "MTU raised above 1778 while running";
    while t.lb_log().matches(warning).count() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let log = t.lb_log();
    for dev in ["lb-c", "lb-b"] {
        let line = format!("{dev}: {warning}");
        assert_eq!(log.matches(&line).count(), 1, "{line:?} once in:\n{log}");
    }
}

/// One worker on two-queue veths: frames that land on queue 1, where no
/// socket is bound, go to the kernel. The steering counters must say so:
/// "redirected" is what reached l4lb's sockets (the worker's rx), and the
/// rest is "passed".
#[test]
fn steering_counts_frames_on_a_queue_without_a_worker_as_passed() {
    let mut t = Topology::up_with_queues("queue-no-worker", 100, 2);
    let cfg = t.config_text(|c| c.replace("attach = \"skb\"", "attach = \"native\""));
    assert!(
        cfg.contains("attach = \"native\""),
        "the config edit applied"
    );
    t.start_lb(&cfg);
    let d = t.drive_with(
        &[],
        &[ECHO],
        "198.18.4.1-198.18.4.100",
        2,
        &["--timeout-ms", "500"],
    );
    assert!(d.failures > 0, "some requests landed on queue 1: {d:?}");
    assert!(d.failures < d.requests, "some landed on queue 0: {d:?}");
    let st = t.stats();
    let rx: u64 = st["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["rx"].as_u64().expect("rx"))
        .sum();
    let redirected: u64 = st["steering"]
        .as_array()
        .expect("steering")
        .iter()
        .map(|s| s["redirected"].as_u64().expect("redirected"))
        .sum();
    assert_eq!(
        redirected, rx,
        "redirected frames are the ones l4lb received: {st}"
    );
    assert!(t.signal_lb(libc::SIGTERM).success(), "{}", t.lb_log());
}

#[test]
fn two_workers_on_two_queue_veths_forward_correctly_whichever_queue_a_packet_lands_on() {
    let mut t = Topology::up_with_queues("two-workers", N_SOURCES, 2);
    // Native attach: a veth with an XDP program has NAPI and receives each
    // frame on the queue its peer sent it from; in SKB mode without NAPI
    // every frame would arrive as queue 0.
    let cfg = t.config_text(|c| {
        c.replace("workers = [0]", "workers = [0, 1]")
            .replace("attach = \"skb\"", "attach = \"native\"")
    });
    assert!(cfg.contains("workers = [0, 1]") && cfg.contains("attach = \"native\""));
    t.start_lb(&cfg);

    let d = t.drive(&[WEB, WEB_ALT], &[ECHO], SOURCES, 3);
    assert_eq!(d.failures, 0, "failed requests:\n{}", d.failures_text());
    let config = t.config.clone();
    for (target, listener) in [(WEB, "web"), (ECHO, "echo")] {
        let per_source = d.by_source(target);
        let clients: Vec<String> = per_source.keys().cloned().collect();
        let predicted = t.simulate(&config, listener, &clients);
        let port = if target == ECHO { 9053 } else { 8080 };
        for (src, seen) in &per_source {
            // A client's connections hash to either queue; the answer is
            // the same on both workers.
            assert!(
                seen.iter().all(|b| b == &seen[0]),
                "{target}: {src} reached {seen:?}"
            );
            assert_eq!(predicted.get(src), Some(&backend_addr(&seen[0], port)));
        }
    }

    let st = t.stats();
    for (reason, n) in st["drops"].as_object().expect("drops") {
        assert_eq!(n.as_u64(), Some(0), "drop counter {reason}");
    }
    let workers = st["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 2);
    for w in workers {
        // Both queues carried traffic: the test exercises two workers, and
        // replies that came back on the other worker's queue still found
        // their flow (no no_flow drops above).
        assert!(w["rx"].as_u64().unwrap() > 1000, "worker idle: {w}");
        assert_eq!(w["rx"], w["tx"], "{w}");
    }
}

/// Closed TCP connections free their flow entries after
/// `tcp_closed_timeout`, while open UDP flows keep theirs for
/// `flow_idle_timeout`.
#[test]
fn closed_tcp_connections_free_their_entries_after_the_closed_timeout() {
    closed_connections_free_their_entries("closed-timeout", false);
}

/// The same with web's servers shared by two listeners (web and web-alt),
/// so that each TCP flow also has a reply entry: it goes with the forward
/// entry, after `tcp_closed_timeout` too.
#[test]
fn closed_tcp_connections_to_shared_servers_free_both_entries_after_the_closed_timeout() {
    closed_connections_free_their_entries("closed-shared", true);
}

/// Half-open connections (SYNs their clients never follow up, as in a SYN
/// flood) free their entries after `tcp_syn_timeout`, while the UDP flows
/// keep theirs for `flow_idle_timeout`. The servers' SYN-ACKs never leave
/// their namespaces here (a blackhole route to the clients), and the
/// clients give up after 500 ms, before their first retransmission,
/// without sending anything more.
#[test]
fn half_open_tcp_connections_free_their_entries_after_the_syn_timeout() {
    let t = with_udp_flows("syn-timeout", false, "tcp_syn_timeout = 3");
    // The servers' answers to these clients go nowhere from now on.
    for b in ["b1", "b2", "b3"] {
        let ns = format!("l4lb-{b}");
        let st = std::process::Command::new("ip")
            .args(["-n", &ns, "route", "add", "blackhole", "198.18.4.0/24"])
            .status()
            .expect("running ip");
        assert!(st.success(), "blackhole route in {ns}: {st}");
    }
    let started = std::time::Instant::now();
    let tcp = t.drive_with(
        &[WEB],
        &[],
        SOURCES_100,
        1,
        &["--timeout-ms", "500", "--parallel", "100"],
    );
    assert_eq!(
        (tcp.requests, tcp.failures),
        (100, 100),
        "every SYN was dropped"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "the SYNs went out within the SYN timeout (took {:?})",
        started.elapsed()
    );
    assert_eq!(
        live_entries(&t),
        200,
        "100 UDP flows and 100 half-open TCP ones"
    );
    // Within 3 s of their SYN (plus a second of clock granularity), the
    // half-open flows are gone; the UDP flows stay.
    wait_for_udp_flows_only(&t, 10);
    assert_eq!(t.stats()["flows"]["tcp_syn_timeout_s"], 3);
}

fn closed_connections_free_their_entries(name: &str, shared: bool) {
    let t = with_udp_flows(name, shared, "tcp_closed_timeout = 5");
    let tcp = t.drive(&[WEB], &[], SOURCES_100, 1);
    assert_eq!(
        (tcp.requests, tcp.failures),
        (100, 0),
        "{}",
        tcp.failures_text()
    );
    // Every connection closed (FIN both ways) less than 5 s ago.
    let tcp_entries = if shared { 200 } else { 100 };
    assert_eq!(
        live_entries(&t),
        100 + tcp_entries,
        "100 UDP flows and 100 closed TCP ones ({tcp_entries} entries)"
    );
    // Within 5 s of their last packet (plus a second of clock
    // granularity), the closed connections are gone; the UDP flows, idle
    // for less than 120 s, stay.
    wait_for_udp_flows_only(&t, 15);
    let flows = &t.stats()["flows"];
    assert_eq!(
        (&flows["idle_timeout_s"], &flows["tcp_closed_timeout_s"]),
        (&serde_json::json!(120), &serde_json::json!(5))
    );
}

/// The clients of the timeout tests.
const SOURCES_100: &str = "198.18.4.1-198.18.4.100";

/// l4lb on the demo config with `flow_idle_timeout = 120` and the
/// instance key `key` (without web-alt unless `shared`: web's servers are
/// then reached by one listener, and each flow takes exactly one entry),
/// after one UDP echo flow from each of [`SOURCES_100`].
fn with_udp_flows(name: &str, shared: bool, key: &str) -> Topology {
    let mut t = Topology::up(name, N_SOURCES);
    let web_alt = "[[listener]]\nname = \"web-alt\"\nvip = \"198.18.100.2\"\nprotocol = \"tcp\"\nport = 80\nbackend_service = \"web\"\n";
    let cfg = t.config_text(|c| {
        assert!(c.contains(web_alt), "the demo config changed");
        let c = if shared {
            c
        } else {
            c.replacen(web_alt, "", 1)
        };
        c.replacen(
            "[instance]\n",
            &format!("[instance]\nflow_idle_timeout = 120\n{key}\n"),
            1,
        )
    });
    t.start_lb(&cfg);
    let udp = t.drive(&[], &[ECHO], SOURCES_100, 1);
    assert_eq!(
        (udp.requests, udp.failures),
        (100, 0),
        "{}",
        udp.failures_text()
    );
    t
}

fn live_entries(t: &Topology) -> u64 {
    t.stats()["flows"]["live_entries"].as_u64().expect("live")
}

/// Waits up to `secs` for the flow table to hold only the 100 UDP flows of
/// [`with_udp_flows`].
fn wait_for_udp_flows_only(t: &Topology, secs: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while live_entries(t) != 100 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    assert_eq!(live_entries(t), 100, "only the UDP flows are left");
}

/// An interface taken down and up again under l4lb (a cable pulled, a
/// driver reset) keeps its XDP program and AF_XDP sockets: forwarding
/// resumes without a restart.
#[test]
fn forwarding_resumes_after_an_interface_goes_down_and_up() {
    let mut t = Topology::up("down-up", 10);
    let cfg = t.config_text(|c| c);
    t.start_lb(&cfg);
    let d = t.drive(&[WEB], &[ECHO], "198.18.4.1-198.18.4.10", 1);
    assert_eq!(d.failures, 0, "before: {}", d.failures_text());
    for dev in ["lb-b", "lb-c"] {
        for state in ["down", "up"] {
            let st = std::process::Command::new("ip")
                .args(["-n", "l4lb-lb", "link", "set", "dev", dev, state])
                .status()
                .expect("ip link set");
            assert!(st.success(), "{dev} {state}");
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    let d = t.drive(&[WEB], &[ECHO], "198.18.4.1-198.18.4.10", 1);
    assert_eq!(d.failures, 0, "after: {}", d.failures_text());
    assert!(t.signal_lb(libc::SIGTERM).success(), "{}", t.lb_log());
}

/// A start that failed left no XDP program on either of l4lb's
/// interfaces.
fn assert_nothing_attached() {
    for dev in ["lb-c", "lb-b"] {
        assert!(
            !Topology::xdp_attached(dev),
            "XDP left on {dev} after a failed start"
        );
    }
}

/// The running instance still has its XDP programs on both interfaces and
/// forwards every request; then it is stopped.
fn the_running_instance_still_forwards(t: &mut Topology) {
    for dev in ["lb-c", "lb-b"] {
        assert!(Topology::xdp_attached(dev), "XDP no longer on {dev}");
    }
    let d = t.drive(&[WEB], &[ECHO], "198.18.4.1-198.18.4.10", 2);
    assert_eq!(d.requests, 40);
    assert_eq!(d.failures, 0, "failed requests:\n{}", d.failures_text());
    assert!(t.signal_lb(libc::SIGTERM).success(), "{}", t.lb_log());
}

/// A frame whose ethertype says IPv4 but whose header is not version 4 is
/// the kernel's (which drops it), as a frame too short for an IPv4 header
/// is: the steering program passes it. (It used to send it to l4lb when
/// the addresses in it were a listener's, and the worker, which cannot
/// hand a frame back, counted it dropped as `not_ours`.)
#[test]
fn a_frame_of_ipv4_ethertype_but_another_ip_version_is_the_kernels() {
    let mut t = Topology::up("ip-version", 1);
    let cfg = t.config_text(|c| c);
    t.start_lb(&cfg);
    let counters = |t: &Topology| -> (u64, u64) {
        let st = t.stats();
        let steering = st["steering"].as_array().expect("steering counters");
        let sum = |k: &str| steering.iter().map(|x| x[k].as_u64().expect(k)).sum();
        (sum("passed"), sum("redirected"))
    };
    let mac = |ns: &str, dev: &str| -> [u8; 6] {
        let out = std::process::Command::new("ip")
            .args(["-n", ns, "-j", "link", "show", dev])
            .output()
            .expect("ip link show");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j");
        let text = v[0]["address"].as_str().expect("address").to_string();
        let mut m = [0u8; 6];
        for (b, h) in m.iter_mut().zip(text.split(':')) {
            *b = u8::from_str_radix(h, 16).expect("hex");
        }
        m
    };
    let (lb, client) = (mac("l4lb-lb", "lb-c"), mac("l4lb-client", "cl0"));
    // UDP from 198.18.4.1:5300 to the ECHO listener, 198.18.100.1:53,
    // with version 6 in the IPv4 header's first nibble.
    let mut frame = Vec::with_capacity(64);
    frame.extend_from_slice(&lb);
    frame.extend_from_slice(&client);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&[0x65, 0, 0, 30, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    frame.extend_from_slice(&[198, 18, 4, 1, 198, 18, 100, 1]);
    frame.extend_from_slice(&[0x14, 0xb4, 0, 53, 0, 10, 0, 0, b'v', b'6']);
    frame.resize(64, 0);
    let (passed, redirected) = counters(&t);
    in_netns("l4lb-client", move || {
        // SAFETY: plain socket calls on a socket this closure owns, with
        // a sockaddr_ll built here.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let name = std::ffi::CString::new("cl0").expect("no NUL");
            let mut to: libc::sockaddr_ll = std::mem::zeroed();
            to.sll_family = libc::AF_PACKET as u16;
            to.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
            to.sll_halen = 6;
            to.sll_addr[..6].copy_from_slice(&lb);
            assert!(to.sll_ifindex > 0, "cl0");
            for _ in 0..5 {
                let n = libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    std::ptr::addr_of!(to).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(n, 64, "sendto: {}", std::io::Error::last_os_error());
            }
            libc::close(fd);
        }
    })
    .join()
    .expect("sender");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (passed_after, redirected_after) = counters(&t);
    assert_eq!(redirected_after, redirected, "none reached l4lb");
    assert!(
        passed_after >= passed + 5,
        "passed {passed} -> {passed_after}"
    );
    let st = t.stats();
    for (reason, n) in st["drops"].as_object().expect("drops") {
        assert_eq!(n.as_u64(), Some(0), "drop counter {reason}: {st}");
    }
    assert!(t.signal_lb(libc::SIGTERM).success(), "{}", t.lb_log());
}
