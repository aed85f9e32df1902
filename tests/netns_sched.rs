//! Session persistence, the stateful schedulers and the batch rule format,
//! end to end in the namespaces with the real l4lb. Root required.

mod harness;

use harness::{backend_addr, Drive, Topology, N_SOURCES, SOURCES};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

const WEB: &str = "198.18.100.1:80";
const ECHO: &str = "198.18.100.1:53";

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

fn counts(a: &BTreeMap<String, String>) -> HashMap<String, usize> {
    let mut c = HashMap::new();
    for b in a.values() {
        *c.entry(b.clone()).or_default() += 1;
    }
    c
}

const SPARE_GROUP: &str = "availability_groups = [\"web-spare\"]\n";

#[test]
fn persisted_clients_stay_when_a_server_is_added_and_weights_change_and_move_when_it_goes_down() {
    let mut t = Topology::up("persist", N_SOURCES);
    let fast =
        "  interval = 1\n  timeout = 1\n  unhealthy_threshold = 2\n  healthy_threshold = 2\n";
    let full = t.config_text(|c| {
        c.replace(
            "scheduler = \"weighted_source_ip\"\n# Servers",
            "scheduler = \"weighted_source_ip\"\npersistence_timeout = 300\n# Servers",
        )
        .replace(
            "  type = \"http\"\n  port = 8080\n",
            &format!("  type = \"http\"\n  port = 8080\n{fast}"),
        )
    });
    assert!(full.contains("persistence_timeout = 300\n# Servers"));
    // Start with b1 and b2 only.
    let small = full.replace(SPARE_GROUP, "");
    t.start_lb(&small);
    let before = assignment(&t.drive(&[WEB], &[], SOURCES, 1), WEB);
    assert!(before.values().all(|b| b == "b1" || b == "b2"));

    // Add b3 (the web-spare group) and change b1's weight from 50 to 20.
    let grown = full.replacen("weight = 50", "weight = 20", 1);
    t.apply(&grown);
    let after = assignment(&t.drive(&[WEB], &[], SOURCES, 1), WEB);
    assert_eq!(after, before, "persistence kept every client on its server");

    // The plain hash alone would have moved many of them.
    let clients: Vec<String> = before.keys().cloned().collect();
    let hash_only = t.simulate(&t.config, "web", &clients);
    let would_move = before
        .iter()
        .filter(|(s, b)| hash_only[*s] != backend_addr(b, 8080))
        .count();
    assert!(
        would_move > 200,
        "only {would_move} clients would have moved without persistence"
    );
    assert!(t.stats()["persistence"]["hits"].as_u64().unwrap() >= N_SOURCES as u64);

    // Persistence ends when its server goes down: b1's clients move, the
    // others stay.
    t.stop_backend("b1");
    t.wait_backend_up("198.18.2.11:8080/tcp", false, Duration::from_secs(8));
    let down = assignment(&t.drive(&[WEB], &[], SOURCES, 1), WEB);
    for (s, b) in &before {
        if b == "b1" {
            assert_ne!(down[s], "b1");
        } else {
            assert_eq!(&down[s], b);
        }
    }
}

#[test]
fn weighted_round_robin_splits_new_flows_exactly_by_weight() {
    let mut t = Topology::up("wrr", N_SOURCES);
    let cfg = t.config_text(|c| c.replace("weighted_source_ip", "weighted_round_robin"));
    t.start_lb(&cfg);
    let d = t.drive(&[WEB], &[ECHO], SOURCES, 1);
    // One worker, 1000 new flows, a 10-step sequence (5/3/2): exact.
    let web = counts(&assignment(&d, WEB));
    assert_eq!((web["b1"], web["b2"], web["b3"]), (500, 300, 200));
    let echo = counts(&assignment(&d, ECHO));
    let mut e: Vec<usize> = echo.values().copied().collect();
    e.sort();
    assert_eq!(e, vec![333, 333, 334]);

    // simulate states its assumption (one worker, one flow per line) and
    // predicts the same split.
    let out = std::process::Command::new(harness::L4LB)
        .args(["simulate", "-c"])
        .arg(&t.config)
        .args(["--listener", "web"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            let mut stdin = c.stdin.take().unwrap();
            for i in 0..1000 {
                writeln!(stdin, "198.18.{}.{}", 4 + i / 250, 1 + i % 250)?;
            }
            drop(stdin);
            c.wait_with_output()
        })
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let n = |b: &str| text.lines().filter(|l| l.ends_with(b)).count();
    assert_eq!(
        (
            n("198.18.2.11:8080"),
            n("198.18.2.12:8080"),
            n("198.18.2.13:8080")
        ),
        (500, 300, 200)
    );
}

#[test]
fn least_connections_balances_open_connections_by_weight_and_counts_closes() {
    let mut t = Topology::up("wlc", 400);
    let cfg = t.config_text(|c| {
        c.replace(
            "scheduler = \"weighted_source_ip\"\n# Servers",
            "scheduler = \"weighted_least_connections\"\n# Servers",
        )
    });
    assert!(cfg.contains("weighted_least_connections\"\n# Servers"));
    t.start_lb(&cfg);
    // 300 connections opened one after another and held open together.
    let held = t.drive_spawn(
        &[WEB],
        &[],
        "198.18.4.1-198.18.5.46",
        1,
        &["--hold-ms", "4000", "--parallel", "300"],
    );
    std::thread::sleep(Duration::from_millis(2500));
    let active: Vec<i64> = [
        "198.18.2.11:8080/tcp",
        "198.18.2.12:8080/tcp",
        "198.18.2.13:8080/tcp",
    ]
    .iter()
    .map(|b| t.backend_stats(b)["active"].as_i64().unwrap())
    .collect();
    assert_eq!(
        active.iter().sum::<i64>(),
        300,
        "active connections {active:?}"
    );
    // Weights 50/30/20: least active/weight keeps 150/90/60 (within one).
    for (a, want) in active.iter().zip([150i64, 90, 60]) {
        assert!((a - want).abs() <= 1, "active {active:?}, want 150/90/60");
    }
    let d = Topology::drive_wait(held);
    let c = counts(&assignment(&d, WEB));
    assert!(
        (c["b1"] as i64 - 150).abs() <= 1 && (c["b2"] as i64 - 90).abs() <= 1,
        "{c:?}"
    );

    // Every connection closed with FIN: none counts as active any more.
    std::thread::sleep(Duration::from_millis(500));
    for b in [
        "198.18.2.11:8080/tcp",
        "198.18.2.12:8080/tcp",
        "198.18.2.13:8080/tcp",
    ] {
        assert_eq!(
            t.backend_stats(b)["active"],
            0,
            "{b} after all connections closed"
        );
    }
}

#[test]
fn rules_import_validates_everything_then_updates_the_file_and_the_running_instance() {
    let mut t = Topology::up("rules", 50);
    let cfg = t.config_text(|c| c);
    t.start_lb(&cfg);
    let gen = t.stats()["generation"].as_u64().unwrap();
    let rules = t.dir.join("rules.txt");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(harness::L4LB)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let c = t.config.display().to_string();
    let r = rules.display().to_string();

    // A bad line: nothing changes, the line is named.
    std::fs::write(
        &rules,
        "80 TCP 300 HTTP 8080 2 5 3 2 / -\n8081 TCP 0 TCP - 2 5 3 2 - -\n",
    )
    .unwrap();
    let (code, _, err) = run(&["rules", "import", "-c", &c, &r]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains(&format!("{r}:2: no listener on port 8081/TCP")),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&t.config).unwrap(),
        cfg,
        "config untouched"
    );
    assert_eq!(t.stats()["generation"].as_u64().unwrap(), gen);

    // Good rules: the file and the running instance change.
    std::fs::write(
        &rules,
        "# web sticks for 5 minutes\n80 TCP 300 HTTP 8080 2 5 3 2 / -\n",
    )
    .unwrap();
    let (code, out, err) = run(&["rules", "import", "-c", &c, &r]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("running instance: ok: reloaded"), "{out}");
    assert_eq!(t.stats()["generation"].as_u64().unwrap(), gen + 1);
    let (_, exported, _) = run(&["rules", "export", "-c", &c]);
    assert!(
        exported
            .lines()
            .any(|l| l == "80 TCP 300 HTTP 8080 2 5 3 2 / -"),
        "{exported}"
    );

    // Export then import is a no-op, byte for byte.
    let before = std::fs::read_to_string(&t.config).unwrap();
    std::fs::write(&rules, &exported).unwrap();
    let (code, out, _) = run(&["rules", "import", "-c", &c, &r]);
    assert_eq!(code, Some(0));
    assert!(out.contains("unchanged"), "{out}");
    assert_eq!(std::fs::read_to_string(&t.config).unwrap(), before);

    // Persistence is now live: a client comes back to its server.
    let d = t.drive(&[WEB], &[], "198.18.4.1-198.18.4.50", 2);
    assert_eq!(d.failures, 0);
    assert!(t.stats()["persistence"]["recorded"].as_u64().unwrap() >= 50);
}
