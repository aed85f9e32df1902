//! What the README and the reference config tell users, checked against the
//! code: every config key the loader accepts is documented (and every
//! documented key is accepted), every drop reason is in the README's table,
//! and `l4lb stats` prints lines of the shape the README shows.

use l4lb::config::Config;
use l4lb::control::stats::{
    render, BackendReport, CounterReport, FlowReport, PersistReport, SocketReport, Stats,
    SteerReport, WorkerReport,
};
use l4lb::dataplane::counters::DropReason;
use l4lb::dataplane::xsk::SocketStats;
use std::collections::BTreeSet;

const README: &str = include_str!("../README.md");
const REFERENCE: &str = include_str!("../config/l4lb.toml");

/// A valid config with every kind of table, and a slot in each for a key.
const TEMPLATE: &str = r#"
[instance]
name = "docs"
client_interface = "eth0"
backend_interface = "eth1"
client_gateway = "192.0.2.254"
{instance}
[[instance.neighbour]]
address = "192.0.2.254"
mac = "02:00:00:00:00:01"
{neighbour}
[[listener]]
name = "web"
vip = "192.0.2.1"
protocol = "tcp"
port = 80
backend_service = "web"
{listener}
[[backend_service]]
name = "web"
protocol = "tcp"
availability_groups = ["spare"]
{service}
[backend_service.health_check]
type = "tcp"
{health_check}
[[backend_service.server]]
address = "192.0.2.11"
port = 8080
{server}
[[availability_group]]
name = "spare"
{group}
[[availability_group.server]]
address = "192.0.2.12"
port = 8080
{group_server}
"#;

const SLOTS: [&str; 8] = [
    "instance",
    "neighbour",
    "listener",
    "service",
    "health_check",
    "server",
    "group",
    "group_server",
];

/// The template with `line` in slot `slot` (if any) and the others empty.
fn config_text(slot: Option<&str>, line: &str) -> String {
    let mut text = TEMPLATE.to_string();
    for s in SLOTS {
        let fill = if Some(s) == slot { line } else { "" };
        text = text.replace(&format!("{{{s}}}"), fill);
    }
    text
}

/// The keys the loader accepts in one table, from its "unknown key"
/// message (serde lists every field it expected).
fn accepted_keys(slot: &str) -> BTreeSet<String> {
    let text = config_text(Some(slot), "zz_no_such_key = 1");
    let err = match Config::from_str(&text, "docs.toml") {
        Ok(_) => panic!("an unknown key in {slot} was accepted"),
        Err(e) => e.to_string(),
    };
    let (_, expected) = err
        .split_once("expected ")
        .unwrap_or_else(|| panic!("no list of expected keys in: {err}"));
    let keys: BTreeSet<String> = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    assert!(!keys.is_empty(), "no keys in: {err}");
    keys
}

/// The lines of the README section under the heading that contains
/// `heading`, up to the next heading.
fn section(heading: &str) -> Vec<&'static str> {
    let mut lines = README
        .lines()
        .skip_while(|l| !(l.starts_with('#') && l.contains(heading)));
    assert!(
        lines.next().is_some(),
        "README has no heading with {heading}"
    );
    lines.take_while(|l| !l.starts_with('#')).collect()
}

/// The first cells (backticks removed) of the body rows of the `n`-th
/// table of a section.
fn table_keys(lines: &[&str], n: usize) -> BTreeSet<String> {
    let mut tables: Vec<Vec<&str>> = Vec::new();
    let mut in_table = false;
    for l in lines {
        if l.starts_with('|') {
            if !in_table {
                tables.push(Vec::new());
            }
            tables.last_mut().unwrap().push(l);
            in_table = true;
        } else {
            in_table = false;
        }
    }
    let table = tables
        .get(n)
        .unwrap_or_else(|| panic!("section has no table {n}: {lines:?}"));
    // Skip the header row and the |---| row.
    table[2..]
        .iter()
        .map(|row| {
            row.split('|')
                .nth(1)
                .unwrap()
                .trim()
                .trim_matches('`')
                .to_string()
        })
        .collect()
}

fn set(keys: &[&str]) -> BTreeSet<String> {
    keys.iter().map(|k| k.to_string()).collect()
}

#[test]
fn the_template_config_is_valid() {
    if let Err(e) = Config::from_str(&config_text(None, ""), "docs.toml") {
        panic!("{e}");
    }
}

#[test]
fn readme_config_reference_documents_exactly_the_keys_the_loader_accepts() {
    // (slot, README heading, table in that section, sub-tables of the
    // table, which have their own heading or row)
    let cases: [(&str, &str, usize, &[&str]); 7] = [
        ("instance", "### `[instance]`", 0, &["neighbour"]),
        ("neighbour", "### `[instance]`", 1, &[]),
        ("listener", "### `[[listener]]`", 0, &[]),
        (
            "service",
            "### `[[backend_service]]`",
            0,
            &["health_check", "server"],
        ),
        (
            "health_check",
            "#### `[backend_service.health_check]`",
            0,
            &[],
        ),
        ("server", "#### `[[backend_service.server]]`", 0, &[]),
        ("group", "### `[[availability_group]]`", 0, &[]),
    ];
    for (slot, heading, table, subtables) in cases {
        let mut accepted = accepted_keys(slot);
        for sub in subtables {
            assert!(accepted.remove(*sub), "{slot} has no sub-table {sub}");
        }
        let mut documented = table_keys(&section(heading), table);
        if slot == "group" {
            // The group's servers are a row of its table.
            assert!(documented.remove("[[availability_group.server]]"));
            documented.insert("server".into());
        }
        assert_eq!(documented, accepted, "README {heading} table {table}");
    }
    for sub in [
        "`[[instance.neighbour]]`",
        "`[backend_service.health_check]`",
        "`[[backend_service.server]]`",
    ] {
        assert!(README.contains(sub), "README never names {sub}");
    }
    // "same keys as [[backend_service.server]]"
    assert_eq!(accepted_keys("group_server"), accepted_keys("server"));
}

#[test]
fn the_reference_config_describes_every_key_the_loader_accepts() {
    let described = |key: &str| {
        REFERENCE.lines().any(|l| {
            let l = l.trim_start_matches(|c: char| c == '#' || c.is_whitespace());
            l.strip_prefix(key)
                .is_some_and(|rest| rest.starts_with([' ', '=']))
        })
    };
    let subtables = set(&["neighbour", "health_check", "server"]);
    for slot in SLOTS {
        for key in accepted_keys(slot) {
            if !subtables.contains(&key) {
                assert!(
                    described(&key),
                    "config/l4lb.toml never describes {slot} key {key}"
                );
            }
        }
    }
}

#[test]
fn readme_drop_table_lists_every_drop_reason_once() {
    let lines = section("## Counters");
    let documented = table_keys(&lines, 0);
    let rows = lines.iter().filter(|l| l.starts_with("| `")).count();
    let names: BTreeSet<String> = DropReason::ALL
        .iter()
        .map(|r| r.name().to_string())
        .collect();
    assert_eq!(documented, names);
    assert_eq!(rows, names.len(), "a reason is listed twice");
}

/// One element of a README output template.
#[derive(Debug)]
enum Pat {
    Lit(char),
    /// One or more whitespace characters.
    Space,
    /// `<placeholder>`: one or more characters.
    Any,
    /// `a|b`: one of the words.
    OneOf(Vec<String>),
}

fn compile(template: &str) -> Vec<Pat> {
    let mut out = Vec::new();
    for (i, word) in template.split_whitespace().enumerate() {
        if i > 0 {
            out.push(Pat::Space);
        }
        if word.contains('|') && !word.contains('<') {
            out.push(Pat::OneOf(word.split('|').map(str::to_string).collect()));
            continue;
        }
        let mut rest = word;
        while let Some(start) = rest.find('<') {
            out.extend(rest[..start].chars().map(Pat::Lit));
            let end = start + rest[start..].find('>').expect("unclosed <");
            out.push(Pat::Any);
            rest = &rest[end + 1..];
        }
        out.extend(rest.chars().map(Pat::Lit));
    }
    out
}

fn matches(p: &[Pat], s: &[char]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((Pat::Lit(c), rest)) => s.first() == Some(c) && matches(rest, &s[1..]),
        Some((Pat::Space, rest)) => {
            let n = s.iter().take_while(|c| c.is_whitespace()).count();
            n > 0 && matches(rest, &s[n..])
        }
        Some((Pat::Any, rest)) => (1..=s.len()).any(|n| matches(rest, &s[n..])),
        Some((Pat::OneOf(words), rest)) => words.iter().any(|w| {
            let w: Vec<char> = w.chars().collect();
            s.starts_with(&w) && matches(rest, &s[w.len()..])
        }),
    }
}

#[test]
fn stats_output_has_the_lines_the_readme_shows_in_its_order() {
    let lines = section("## Counters");
    let block: Vec<&str> = lines
        .iter()
        .skip_while(|l| **l != "```text")
        .skip(1)
        .take_while(|l| **l != "```")
        .copied()
        .collect();
    assert!(!block.is_empty(), "no ```text block under ## Counters");
    let templates: Vec<Vec<Pat>> = block.iter().map(|l| compile(l)).collect();

    let socket = |interface: &str| SocketReport {
        interface: interface.into(),
        kernel: SocketStats::default(),
        error: None,
    };
    let backend = |name: &str, up: bool, health: &str| BackendReport {
        name: name.into(),
        up,
        health: health.into(),
        active: 3,
        packets: 10,
        bytes: 640,
    };
    let st = Stats {
        instance: "demo".into(),
        generation: 2,
        uptime_s: 60,
        workers: vec![WorkerReport {
            worker: 0,
            core: 1,
            rx: 1,
            tx: 2,
            forwarded: 3,
            replied: 4,
            icmp: 5,
            flows_created: 6,
            flows_evicted: 7,
            flows_rebound: 8,
            drops: 9,
            sockets: vec![socket("lb-c"), socket("lb-b")],
        }],
        drops: DropReason::ALL
            .iter()
            .map(|r| (r.name().to_string(), 0))
            .collect(),
        listeners: vec![CounterReport {
            name: "web 198.18.100.1:80/tcp".into(),
            packets: 10,
            bytes: 640,
        }],
        backends: vec![
            backend("198.18.2.11:8080/tcp", true, "ok"),
            backend(
                "198.18.2.12:8080/tcp",
                false,
                "check 1: status 503; check 2: ok",
            ),
        ],
        steering: vec![SteerReport {
            interface: "lb-c".into(),
            redirected: 10,
            passed: 2,
        }],
        flows: FlowReport {
            capacity: 1024,
            live_entries: 1,
            idle_timeout_s: 300,
            tcp_closed_timeout_s: 60,
            tcp_syn_timeout_s: 30,
            memory_bytes: 73728,
        },
        persistence: PersistReport {
            capacity: 1024,
            live: 1,
            hits: 2,
            recorded: 3,
            evicted: 4,
            not_recorded_full: 5,
        },
    };
    let out = render(&st);

    // Every printed line is one of the README's, in the README's order,
    // and every README line is printed.
    let mut used = vec![false; templates.len()];
    let mut at = 0;
    for line in out.lines() {
        let chars: Vec<char> = line.trim().chars().collect();
        let found = (at..templates.len()).find(|&i| matches(&templates[i], &chars));
        let Some(i) = found else {
            panic!(
                "README shows no line like {line:?} (at or after {:?})",
                block[at]
            );
        };
        used[i] = true;
        at = i;
    }
    for (i, u) in used.iter().enumerate() {
        assert!(u, "l4lb stats prints no line like README's {:?}", block[i]);
    }
}
