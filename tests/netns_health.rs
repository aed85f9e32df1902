//! Health checks, hot reload and draining, end to end in the namespaces:
//! the real l4lb, real backends that die, return, answer 503, real traffic.
//! Root required; see tests/harness.

mod harness;

use harness::{Drive, Topology, N_SOURCES, SOURCES};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const WEB: &str = "198.18.100.1:80";
const ECHO: &str = "198.18.100.1:53";
const FAST: &str =
    "  interval = 1\n  timeout = 1\n  unhealthy_threshold = 2\n  healthy_threshold = 2\n";

/// The demo config with 1 s checks, thresholds 2.
fn fast_checks(c: String) -> String {
    c.replace(
        "  type = \"http\"\n  port = 8080\n",
        &format!("  type = \"http\"\n  port = 8080\n{FAST}"),
    )
    .replace(
        "  type = \"udp\"\n  port = 9053\n",
        &format!("  type = \"udp\"\n  port = 9053\n{FAST}"),
    )
}

/// source → the one backend it reached (asserts it reached only one, and
/// that nothing failed).
fn assignment(d: &Drive, target: &str) -> BTreeMap<String, String> {
    assert_eq!(d.failures, 0, "failed requests:\n{}", d.failures_text());
    d.by_source(target)
        .into_iter()
        .map(|(s, seen)| {
            assert!(seen.iter().all(|b| *b == seen[0]), "{s} reached {seen:?}");
            (s, seen[0].clone())
        })
        .collect()
}

fn assert_no_drops(t: &Topology) {
    let st = t.stats();
    for (reason, n) in st["drops"].as_object().expect("drops") {
        assert_eq!(n.as_u64(), Some(0), "l4lb dropped packets: {reason}");
    }
}

#[test]
fn a_killed_server_is_marked_down_in_time_only_its_clients_move_and_it_comes_back() {
    let mut t = Topology::up("health-kill", N_SOURCES);
    let cfg = t.config_text(fast_checks);
    t.start_lb(&cfg);
    let before = assignment(&t.drive(&[WEB], &[], SOURCES, 1), WEB);
    assert!(before.values().any(|b| b == "b2"));

    // Traffic keeps running while the server dies.
    let background = t.drive_spawn(
        &[WEB],
        &[ECHO],
        "198.18.4.1-198.18.4.200",
        5,
        &["--timeout-ms", "1000"],
    );
    let killed = Instant::now();
    t.stop_backend("b2");
    // Marked down within interval x unhealthy threshold + timeout = 3 s
    // (plus up to 1 s for the control loop and this poll).
    let took = t.wait_backend_up("198.18.2.12:8080/tcp", false, Duration::from_secs(10));
    assert!(
        took <= Duration::from_secs(4),
        "took {took:?} to notice (bound 3 s + 1 s)"
    );
    assert_eq!(
        t.backend_stats("198.18.2.12:8080/tcp")["health"],
        "connection refused"
    );
    let udp = t.wait_backend_up("198.18.2.12:9053/udp", false, Duration::from_secs(10));
    assert!(udp <= Duration::from_secs(4), "udp check took {udp:?}");
    assert!(killed.elapsed() < Duration::from_secs(10));
    let _ = Topology::drive_wait(background);

    // Afterwards every request succeeds; only b2's clients moved.
    let during = assignment(&t.drive(&[WEB], &[], SOURCES, 1), WEB);
    for (src, b) in &before {
        if b == "b2" {
            assert_ne!(during[src], "b2");
        } else {
            assert_eq!(
                &during[src], b,
                "{src} was on {b}, a healthy server, and moved"
            );
        }
    }

    // Restarted: up after the healthy threshold (2 x 1 s, plus slack), and
    // its clients return.
    t.start_backend("b2", &[]);
    let up = t.wait_backend_up("198.18.2.12:8080/tcp", true, Duration::from_secs(10));
    assert!(
        up <= Duration::from_secs(4),
        "took {up:?} to come back (bound 2 s + 2 s)"
    );
    let after = assignment(&t.drive(&[WEB], &[], SOURCES, 1), WEB);
    assert_eq!(
        after, before,
        "with b2 back, every client is where it started"
    );
}

#[test]
fn http_503_and_a_closed_udp_port_take_servers_out() {
    let mut t = Topology::up("health-503", N_SOURCES);
    let cfg = t.config_text(fast_checks);
    t.start_lb(&cfg);
    t.start_backend("b1", &["--http-status", "503"]);
    t.wait_backend_up("198.18.2.11:8080/tcp", false, Duration::from_secs(8));
    assert_eq!(
        t.backend_stats("198.18.2.11:8080/tcp")["health"],
        "status 503"
    );
    // b1's UDP echo still answers: its UDP backend stays up.
    assert_eq!(t.backend_stats("198.18.2.11:9053/udp")["up"], true);

    // b3 stops serving both: each check finds out on its own schedule, so
    // wait for both before sending traffic (CI once drove web while b3's
    // HTTP check was one interval behind its UDP check, and 29 clients hit
    // b3's closed port).
    t.stop_backend("b3");
    t.wait_backend_up("198.18.2.13:9053/udp", false, Duration::from_secs(8));
    assert_eq!(
        t.backend_stats("198.18.2.13:9053/udp")["health"],
        "ICMP port unreachable"
    );
    t.wait_backend_up("198.18.2.13:8080/tcp", false, Duration::from_secs(8));
    assert_eq!(
        t.backend_stats("198.18.2.13:8080/tcp")["health"],
        "connection refused"
    );

    let d = t.drive(&[WEB], &[ECHO], SOURCES, 1);
    let web = assignment(&d, WEB);
    assert!(web.values().all(|b| b == "b2"), "only b2 serves web now");
    let echo = assignment(&d, ECHO);
    assert!(echo.values().all(|b| b == "b1" || b == "b2"));
    assert_no_drops(&t);
}

/// Two services share the three web servers and check them differently:
/// `web` over HTTP, `web-tcp` by a TCP connect. b1 answers HTTP with 503:
/// it leaves `web` only, and `web-tcp` keeps sending it clients (who get
/// b1's 503). Each service decides on its own check.
#[test]
fn a_shared_server_is_out_only_of_the_service_whose_check_fails() {
    const WEB_TCP: &str = "198.18.100.3:80";
    let mut t = Topology::up("health-per-service", N_SOURCES);
    let cfg = t.config_text(|c| {
        fast_checks(c)
            + &format!(
                r#"
[[listener]]
name = "web-tcp"
vip = "198.18.100.3"
protocol = "tcp"
port = 80
backend_service = "web-tcp"

[[backend_service]]
name = "web-tcp"
protocol = "tcp"
  [backend_service.health_check]
  type = "tcp"
{FAST}
  [[backend_service.server]]
  address = "198.18.2.11"
  port = 8080
  [[backend_service.server]]
  address = "198.18.2.12"
  port = 8080
  [[backend_service.server]]
  address = "198.18.2.13"
  port = 8080
"#
            )
    });
    t.start_lb(&cfg);
    t.start_backend("b1", &["--http-status", "503"]);
    t.wait_backend_up("198.18.2.11:8080/tcp", false, Duration::from_secs(8));
    assert_eq!(
        t.backend_stats("198.18.2.11:8080/tcp")["health"],
        "check 1: status 503; check 2: ok"
    );

    let web = assignment(&t.drive(&[WEB], &[], SOURCES, 1), WEB);
    assert!(web.values().all(|b| b != "b1"), "web no longer uses b1");
    let d = t.drive(&[WEB_TCP], &[], SOURCES, 1);
    let mut on_b1 = 0;
    for r in d.results.iter().filter(|r| r.target == WEB_TCP) {
        match r.error.as_deref() {
            // Only b1 answers 503: the client reached it.
            Some("http status 503") => on_b1 += 1,
            None => assert_ne!(r.backend.as_deref(), Some("b1")),
            Some(e) => panic!("{WEB_TCP}: {r:?}: {e}"),
        }
    }
    // web-tcp weighs its servers equally: about a third of its clients.
    assert!(
        (250..=420).contains(&on_b1),
        "{WEB_TCP}: {on_b1} of {N_SOURCES} clients on b1"
    );
    assert_no_drops(&t);
}

/// The demo config with b3's weight in the web service set, or b3 removed.
fn web_variant(base: &str, b3: Option<u8>) -> String {
    let spare = "[[availability_group]]\nname = \"web-spare\"\n\n  [[availability_group.server]]\n  address = \"198.18.2.13\"\n  port = 8080\n  weight = 20";
    assert!(base.contains(spare), "demo config layout changed");
    match b3 {
        Some(w) => base.replace(
            spare,
            &spare.replace("weight = 20", &format!("weight = {w}")),
        ),
        None => base
            .replace("availability_groups = [\"web-spare\"]\n", "")
            // An unused group is allowed; keep it with another server.
            .replace(
                spare,
                &spare
                    .replace("198.18.2.13", "198.18.2.12")
                    .replace("weight = 20", "weight = 1"),
            ),
    }
}

#[test]
fn twenty_reloads_under_traffic_lose_nothing_and_keep_established_flows() {
    let mut t = Topology::up("reload", N_SOURCES);
    let base = t.config_text(fast_checks);
    t.start_lb(&base);
    let before = assignment(&t.drive(&[WEB], &[], SOURCES, 1), WEB);
    let gen0 = t.stats()["generation"].as_u64().unwrap();

    // Established flows (TCP connected, UDP pinged once) that stay idle
    // across all reloads, then are used again.
    let held = t.drive_spawn(
        &[WEB],
        &[ECHO],
        "198.18.4.1-198.18.4.250",
        1,
        &["--hold-ms", "5000", "--parallel", "600"],
    );
    std::thread::sleep(Duration::from_millis(700));

    let mut traffic = Vec::new();
    for i in 0..20 {
        let text = match i % 4 {
            0 => web_variant(&base, Some(40)),
            1 => web_variant(&base, None),
            2 => web_variant(&base, Some(60)),
            _ => base.clone(),
        };
        t.apply(&text);
        // New connections keep arriving between reloads.
        traffic.push(t.drive(&[WEB], &[ECHO], "198.18.5.1-198.18.5.40", 1));
    }
    let held = Topology::drive_wait(held);
    assert_eq!(
        held.failures,
        0,
        "held flows broke:\n{}",
        held.failures_text()
    );
    for d in &traffic {
        assert_eq!(
            d.failures,
            0,
            "failed during reloads:\n{}",
            d.failures_text()
        );
    }
    assert_eq!(t.stats()["generation"].as_u64().unwrap(), gen0 + 20);
    assert_no_drops(&t);

    // Back on the original config: every client where it started.
    let after = assignment(&t.drive(&[WEB], &[], SOURCES, 1), WEB);
    assert_eq!(after, before);
}

/// A reload that puts a second listener in front of a service in use: its
/// servers become shared, and their flows then need reply entries, which
/// flows begun before the reload do not have. Held UDP flows are answered
/// after the reload, and the new listener answers from its own VIP. (Here
/// the client speaks first after the hold, which records the reply entry;
/// a server speaking first is covered by the pipeline's unit test
/// `a_flow_begun_before_its_server_was_shared_is_answered_after_the_reload`.)
#[test]
fn flows_survive_a_reload_that_shares_their_servers_with_a_new_listener() {
    const ECHO_ALT: &str = "198.18.100.2:53";
    let mut t = Topology::up("share", N_SOURCES);
    let base = t.config_text(fast_checks);
    t.start_lb(&base);
    let held = t.drive_spawn(
        &[],
        &[ECHO],
        "198.18.4.1-198.18.4.200",
        1,
        &["--hold-ms", "3000", "--parallel", "200"],
    );
    std::thread::sleep(Duration::from_millis(700));
    let shared = format!(
        "{base}\n[[listener]]\nname = \"echo-alt\"\nvip = \"198.18.100.2\"\nprotocol = \"udp\"\nport = 53\nbackend_service = \"echo\"\n"
    );
    t.apply(&shared);
    let held = Topology::drive_wait(held);
    assert_eq!(
        held.failures,
        0,
        "held flows broke:\n{}",
        held.failures_text()
    );
    assert_eq!(held.results.len(), 200);

    let d = t.drive(&[], &[ECHO, ECHO_ALT], "198.18.5.1-198.18.5.40", 2);
    assert_eq!(d.failures, 0, "failed:\n{}", d.failures_text());
    assert_eq!(d.results.len(), 2 * 2 * 40);
    for r in &d.results {
        assert_eq!(r.reply_from.as_deref(), Some(r.target.as_str()), "{r:?}");
    }
    assert_no_drops(&t);
}

#[test]
fn an_invalid_reload_changes_nothing_and_names_the_line() {
    let mut t = Topology::up("reload-bad", 200);
    let base = t.config_text(fast_checks);
    t.start_lb(&base);
    let before = assignment(&t.drive(&[WEB], &[ECHO], "198.18.4.1-198.18.4.200", 1), WEB);
    let gen = t.stats()["generation"].clone();

    let bad = base.replacen("weight = 50", "weight = 150", 1);
    let line = bad
        .lines()
        .position(|l| l.contains("weight = 150"))
        .unwrap()
        + 1;
    std::fs::write(&t.config, &bad).unwrap();
    let (code, _, err) = t.reload();
    assert_eq!(code, 2);
    let want = format!(
        "{}:{line}:12: weight 150 is out of range (0-100)",
        t.config.display()
    );
    assert!(err.contains(&want), "stderr {err:?} lacks {want:?}");
    assert_eq!(t.stats()["generation"], gen, "nothing was published");

    let moved = base.replace("workers = [0]", "workers = [1]");
    std::fs::write(&t.config, &moved).unwrap();
    let (code, _, err) = t.reload();
    assert_eq!(code, 2);
    assert!(
        err.contains("instance.workers cannot change while running"),
        "{err}"
    );
    assert_eq!(t.stats()["generation"], gen);

    let after = assignment(&t.drive(&[WEB], &[ECHO], "198.18.4.1-198.18.4.200", 1), WEB);
    assert_eq!(after, before, "the running state is unchanged");
}

#[test]
fn weight_zero_drains_a_server_open_connections_finish_new_clients_avoid_it() {
    let mut t = Topology::up("drain", N_SOURCES);
    let base = t.config_text(fast_checks);
    t.start_lb(&base);
    let before = assignment(&t.drive(&[WEB], &[], SOURCES, 1), WEB);
    let on_b1: Vec<&String> = before
        .iter()
        .filter(|(_, b)| *b == "b1")
        .map(|(s, _)| s)
        .collect();
    assert!(on_b1.len() > 300);

    // Open connections (TCP and UDP flows), idle while b1 is drained.
    let held = t.drive_spawn(
        &[WEB],
        &[ECHO],
        "198.18.4.1-198.18.4.250",
        1,
        &["--hold-ms", "3000", "--parallel", "600"],
    );
    std::thread::sleep(Duration::from_millis(700));
    let drained = base
        .replace(
            "address = \"198.18.2.11\"\n  port = 8080\n  weight = 50",
            "address = \"198.18.2.11\"\n  port = 8080\n  weight = 0",
        )
        .replace(
            "address = \"198.18.2.11\"\n  port = 9053\n  weight = 100",
            "address = \"198.18.2.11\"\n  port = 9053\n  weight = 0",
        );
    assert_ne!(drained, base);
    t.apply(&drained);

    let held = Topology::drive_wait(held);
    assert_eq!(
        held.failures,
        0,
        "open connections broke:\n{}",
        held.failures_text()
    );
    let held_web = assignment(&held, WEB);
    assert!(
        held_web.values().any(|b| b == "b1"),
        "some open connections were on b1 and finished there"
    );
    for (src, b) in &held_web {
        assert_eq!(&before[src], b, "an open connection moved");
    }

    let d = t.drive(&[WEB], &[ECHO], SOURCES, 1);
    assert!(
        assignment(&d, WEB).values().all(|b| b != "b1"),
        "a new client reached the drained b1"
    );
    assert!(assignment(&d, ECHO).values().all(|b| b != "b1"));
    assert_no_drops(&t);
}

/// Runs `l4lb ARGS`: (exit code, stdout, stderr).
fn l4lb(args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(harness::L4LB)
        .args(args)
        .output()
        .expect("running l4lb");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every way an operator can have a change refused, one after another,
/// while clients hold connections open and persisted clients sit on
/// servers the plain hash would no longer give them: a SIGHUP and an
/// `l4lb reload -c` of an invalid file, a reload of a restart-only change,
/// a rules file with a broken line, and rules the file takes but the
/// running instance refuses. Nothing is published, the open connections
/// finish on their servers, every client comes back to its server, and
/// the log says why each was refused, as plain lines.
#[test]
fn refused_reloads_and_imports_keep_open_connections_and_persisted_clients() {
    let mut t = Topology::up("refused", 200);
    const CLIENTS: &str = "198.18.4.1-198.18.4.200";
    let persisted = t.config_text(|c| {
        fast_checks(c).replace(
            "scheduler = \"weighted_source_ip\"\n# Servers",
            "scheduler = \"weighted_source_ip\"\npersistence_timeout = 300\n# Servers",
        )
    });
    assert!(persisted.contains("persistence_timeout = 300\n# Servers"));
    t.start_lb(&persisted);
    let before = assignment(&t.drive(&[WEB], &[], CLIENTS, 1), WEB);
    // b1 from 50 to 5: the hash alone would now move many of b1's clients.
    let good = persisted.replacen("weight = 50", "weight = 5", 1);
    t.apply(&good);
    let clients: Vec<String> = before.keys().cloned().collect();
    let by_hash = t.simulate(&t.config, "web", &clients);
    let hash_moves = before
        .iter()
        .filter(|(s, b)| by_hash[*s] != harness::backend_addr(b, 8080))
        .count();
    assert!(hash_moves > 30, "only {hash_moves} clients would move");
    let gen = t.stats()["generation"].as_u64().unwrap();

    let held = t.drive_spawn(
        &[WEB],
        &[ECHO],
        CLIENTS,
        1,
        &["--hold-ms", "6000", "--parallel", "400"],
    );
    std::thread::sleep(Duration::from_millis(700));
    let c = t.config.display().to_string();
    let generation = |t: &Topology| t.stats()["generation"].as_u64().unwrap();

    // An invalid file (two errors), by SIGHUP and by `l4lb reload -c`.
    let invalid = good.replacen("weight = 5\n", "weight = 150\n", 1).replacen(
        "weight = 30\n",
        "weight = 130\n",
        1,
    );
    let why: Vec<String> = [150, 130]
        .iter()
        .map(|w| {
            let at = format!("weight = {w}");
            let line = 1 + invalid.lines().position(|l| l.contains(&at)).unwrap();
            format!("{c}:{line}:12: weight {w} is out of range (0-100)")
        })
        .collect();
    std::fs::write(&t.config, &invalid).unwrap();
    t.kill_lb(libc::SIGHUP);
    // (Handled before the file changes again.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while !t.lb_log().contains("(via SIGHUP)") {
        assert!(
            Instant::now() < deadline,
            "no SIGHUP reload:\n{}",
            t.lb_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, _, err) = l4lb(&["reload", "-c", &c]);
    assert_eq!((code, err.trim_end()), (Some(2), why.join("\n").as_str()));
    assert_eq!(generation(&t), gen);

    // A restart-only key.
    std::fs::write(&t.config, good.replace("workers = [0]", "workers = [0, 1]")).unwrap();
    let (code, _, err) = t.reload();
    // Located at the value that changed, as other config errors are.
    let workers_line = good
        .lines()
        .position(|l| l.starts_with("workers = [0]"))
        .expect("the config sets workers")
        + 1;
    let restart = format!("{c}:{workers_line}:11: instance.workers cannot change while running (restart l4lb); the running configuration is unchanged");
    assert_eq!((code, err.trim_end()), (2, restart.as_str()));
    assert_eq!(generation(&t), gen);

    // A rules file with a broken line changes neither file nor instance.
    std::fs::write(&t.config, &good).unwrap();
    let rules = t.dir.join("rules.txt");
    let r = rules.display().to_string();
    std::fs::write(
        &rules,
        "80 TCP 0 HTTP 8080 1 1 2 2 / -\n53 UDP 0 UDP 9053 1 1 2\n",
    )
    .unwrap();
    let (code, _, err) = l4lb(&["rules", "import", "-c", &c, &r]);
    assert_eq!(code, Some(2));
    assert!(
        err.starts_with(&format!("{r}:2: expected 11 fields")),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&t.config).unwrap(), good);
    assert_eq!(generation(&t), gen);

    // Rules the file takes (persistence off), but a restart-only key
    // waiting in the file makes the running instance refuse them.
    std::fs::write(&t.config, good.replace("workers = [0]", "workers = [0, 1]")).unwrap();
    std::fs::write(&rules, "80 TCP 0 HTTP 8080 1 1 2 2 / -\n").unwrap();
    let (code, out, err) = l4lb(&["rules", "import", "-c", &c, &r]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert_eq!(
        err.trim_end(),
        format!("l4lb: {c} was updated, but the running instance rejected it: {restart}")
    );
    assert_eq!(generation(&t), gen);
    std::fs::write(&t.config, &good).unwrap();

    let held = Topology::drive_wait(held);
    assert_eq!(
        held.failures,
        0,
        "open connections broke:\n{}",
        held.failures_text()
    );
    for (src, b) in assignment(&held, WEB) {
        assert_eq!(before[&src], b, "{src}'s open connection moved");
    }
    let hits = t.stats()["persistence"]["hits"].as_u64().unwrap();
    let after = assignment(&t.drive(&[WEB], &[], CLIENTS, 1), WEB);
    assert_eq!(
        after, before,
        "every persisted client is back on its server"
    );
    assert_eq!(
        t.stats()["persistence"]["hits"].as_u64().unwrap(),
        hits + 200,
        "each came back through its session"
    );
    assert_no_drops(&t);

    // The log says why, a plain line per problem of each refusal.
    let log = t.lb_log();
    assert!(!log.contains('\u{1b}'), "escape codes in the log:\n{log:?}");
    let rejected: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split_once(" ERROR l4lb::control: reload rejected (via "))
        .map(|(_, rest)| rest)
        .collect();
    let mut want = Vec::new();
    for via in ["SIGHUP", "control socket"] {
        want.extend(why.iter().map(|w| format!("{via}): {w}")));
    }
    want.extend(vec![format!("control socket): {restart}"); 2]);
    assert_eq!(rejected, want, "{log}");
}

/// An availability group is used as a whole by every service that lists
/// it, and its members stay servers of their own: here `web-spare` holds
/// b2 and b3, and serves `web` (after web's own b1) and `web2` (alone).
/// When b3 dies, it leaves both services, only its clients move (in
/// `web2`, to the group's other member), and when it comes back they
/// return.
#[test]
fn a_group_member_that_goes_down_leaves_every_service_of_the_group_alone() {
    const WEB2: &str = "198.18.100.3:80";
    let mut t = Topology::up("group", N_SOURCES);
    let b2_own =
        "  [[backend_service.server]]\n  address = \"198.18.2.12\"\n  port = 8080\n  weight = 30\n";
    let b3_in_group = "  [[availability_group.server]]\n  address = \"198.18.2.13\"\n  port = 8080\n  weight = 20";
    let cfg = t.config_text(|c| {
        assert!(c.contains(b2_own) && c.contains(b3_in_group), "demo layout");
        fast_checks(c).replace(b2_own, "").replace(
            b3_in_group,
            &format!(
                "{}\n\n{b3_in_group}",
                b2_own
                    .replace("backend_service", "availability_group")
                    .trim_end()
            ),
        ) + &format!(
            r#"
[[listener]]
name = "web2"
vip = "198.18.100.3"
protocol = "tcp"
port = 80
backend_service = "web2"

[[backend_service]]
name = "web2"
protocol = "tcp"
availability_groups = ["web-spare"]
  [backend_service.health_check]
  type = "http"
  port = 8080
{FAST}"#
        )
    });
    t.start_lb(&cfg);
    let (code, out, err) = l4lb(&["check", "-c", &t.config.display().to_string()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("4 listeners, 3 backend services, 8 servers"),
        "{out}"
    );

    let d = t.drive(&[WEB, WEB2], &[], SOURCES, 1);
    let (web, web2) = (assignment(&d, WEB), assignment(&d, WEB2));
    for (name, a, want) in [
        ("web", &web, &["b1", "b2", "b3"][..]),
        ("web2", &web2, &["b2", "b3"]),
    ] {
        let mut seen: Vec<&str> = a.values().map(String::as_str).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(
            seen, want,
            "{name} uses its own servers and the whole group"
        );
    }

    t.stop_backend("b3");
    t.wait_backend_up("198.18.2.13:8080/tcp", false, Duration::from_secs(10));
    let d = t.drive(&[WEB, WEB2], &[], SOURCES, 1);
    for (name, before, during) in [
        ("web", &web, assignment(&d, WEB)),
        ("web2", &web2, assignment(&d, WEB2)),
    ] {
        for (src, b) in before {
            if b == "b3" {
                assert_ne!(during[src], "b3", "{name}: {src} stayed on the down b3");
            } else {
                assert_eq!(&during[src], b, "{name}: {src} moved off a healthy server");
            }
        }
    }
    assert!(assignment(&d, WEB2).values().all(|b| b == "b2"));

    t.start_backend("b3", &[]);
    t.wait_backend_up("198.18.2.13:8080/tcp", true, Duration::from_secs(10));
    let d = t.drive(&[WEB, WEB2], &[], SOURCES, 1);
    assert_eq!(assignment(&d, WEB), web, "web's clients are back");
    assert_eq!(assignment(&d, WEB2), web2, "web2's clients are back");
    assert_no_drops(&t);
}

/// A reload is accepted with a next hop whose MAC does not resolve (here a
/// mistyped `client_gateway`: every reply is dropped as `no_neighbour`),
/// and the log names it, as start-up does, rather than saying nothing.
#[test]
fn a_reload_with_a_next_hop_that_does_not_resolve_names_it_in_the_log() {
    let mut t = Topology::up("reload-nexthop", 10);
    let base = t.config_text(fast_checks);
    t.start_lb(&base);
    let typo = base.replace(
        "client_gateway = \"198.18.0.2\"",
        "client_gateway = \"198.18.0.99\"",
    );
    assert_ne!(typo, base);
    t.apply(&typo);
    let warning = "WARN l4lb::control: next hop(s) unresolved 1 s after the reload, \
                   their packets dropped as no_neighbour until they resolve: 198.18.0.99";
    let log = t.lb_log();
    assert_eq!(log.matches(warning).count(), 1, "{log}");
    // Put right: nothing more to say, and replies flow again.
    t.apply(&base);
    assert_eq!(
        t.lb_log().matches("unresolved").count(),
        1,
        "{}",
        t.lb_log()
    );
    let d = t.drive(&[WEB], &[ECHO], "198.18.4.1-198.18.4.10", 1);
    assert_eq!(d.failures, 0, "{}", d.failures_text());
}
