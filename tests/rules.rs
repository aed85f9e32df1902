//! The batch rule format through the library API: export, parse, apply.

use l4lb::config::rules::{self, Rule, RuleError};
use l4lb::config::{Config, HealthCheckKind, Protocol, DEFAULT_CONFIG};

const DEMO: &str = DEFAULT_CONFIG;
const RICH: &str = include_str!("fixtures/config/rules-rich.toml");
const FULL: &str = include_str!("fixtures/config/full.toml");
const EXAMPLE_RULES: &str = include_str!("../config/rules.example.txt");

const HEADER: &str =
    "# port protocol persistence hc_type hc_port timeout interval unhealthy healthy path domain\n";

fn config(text: &str) -> Config {
    match Config::from_str(text, "l4lb.toml") {
        Ok(c) => c,
        Err(e) => panic!("expected a valid config, got:\n{e}"),
    }
}

fn parse(text: &str) -> Vec<Rule> {
    match rules::parse(text, "rules.txt") {
        Ok(r) => r,
        Err(e) => panic!("expected valid rules, got:\n{}", show(&e)),
    }
}

fn show(errors: &[RuleError]) -> String {
    errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Parses `rules_text` and applies it to `config_text`; the new text.
fn apply(config_text: &str, rules_text: &str) -> String {
    match rules::apply(config_text, "l4lb.toml", &parse(rules_text), "rules.txt") {
        Ok(text) => text,
        Err(e) => panic!("expected the rules to apply, got:\n{}", show(&e)),
    }
}

/// The errors of applying `rules` to `config_text` (there must be some).
fn apply_errors(config_text: &str, rules: &[Rule]) -> Vec<String> {
    match rules::apply(config_text, "l4lb.toml", rules, "rules.txt") {
        Ok(text) => panic!("expected errors, got a new config:\n{text}"),
        Err(e) => e.iter().map(|e| e.to_string()).collect(),
    }
}

/// The errors of parsing `text` (there must be some).
fn parse_errors(text: &str) -> Vec<String> {
    match rules::parse(text, "rules.txt") {
        Ok(r) => panic!("expected errors, got {r:#?}"),
        Err(e) => e.iter().map(|e| e.to_string()).collect(),
    }
}

/// `text` with `from` (which must occur exactly once) replaced by `to`.
fn edit(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "{from:?}");
    text.replacen(from, to, 1)
}

fn rule(port: u16, protocol: Protocol, line: usize) -> Rule {
    Rule {
        port,
        protocol,
        persistence: 0,
        check: HealthCheckKind::Tcp,
        check_port: None,
        timeout: 2,
        interval: 5,
        unhealthy: 3,
        healthy: 2,
        path: None,
        domain: None,
        line,
    }
}

// ----- export -----

#[test]
fn export_of_the_demo() {
    assert_eq!(
        rules::export(&config(DEMO)),
        format!("{HEADER}53 UDP 0 UDP 9053 2 5 3 2 - -\n80 TCP 0 HTTP 8080 2 5 3 2 / -\n")
    );
}

#[test]
fn export_has_one_line_per_port_and_protocol_sorted_tcp_before_udp() {
    assert_eq!(
        rules::export(&config(RICH)),
        format!(
            "{HEADER}22 TCP 3600 TCP - 2 5 3 2 - -
53 TCP 0 TCP 53 50 50 3 2 - -
53 UDP 0 UDP - 2 5 2 3 - -
80 TCP 120 HTTP 8080 3 10 3 2 /status www.example.com
443 TCP 0 TCP - 2 5 3 2 - -
8443 TCP 0 TCP - 2 5 3 2 - -
"
        )
    );
    assert_eq!(
        rules::export(&config(FULL)),
        format!(
            "{HEADER}53 UDP 30 UDP - 2 5 3 2 - -
443 TCP 600 HTTP 8443 3 10 5 4 /health?full=1 www.example.com
"
        )
    );
}

#[test]
fn export_comments_out_a_port_whose_services_differ() {
    // www-b gets another persistence: 80/tcp has no single rule any more.
    let text = edit(
        RICH,
        "persistence_timeout = 120\nhealth_check",
        "persistence_timeout = 60\nhealth_check",
    );
    let exported = rules::export(&config(&text));
    assert_eq!(
        exported
            .lines()
            .filter(|l| l.contains("80/TCP") || l.contains("80 TCP"))
            .collect::<Vec<_>>(),
        vec![
            "# 80/TCP: its backend services \"www-a\", \"www-b\" have different settings; one rule would give them all the same. To do that, uncomment one of these lines:",
            "# 80 TCP 120 HTTP 8080 3 10 3 2 /status www.example.com",
            "# 80 TCP 60 HTTP 8080 3 10 3 2 /status www.example.com",
        ]
    );
    // Applying it still changes nothing.
    assert_eq!(apply(&text, &exported), text);
}

#[test]
fn export_with_no_listeners_is_the_header_alone() {
    let (head, _) = RICH.split_once("[[listener]]").unwrap();
    let (_, tail) = RICH.split_once("# --- backend services").unwrap();
    let text = format!("{head}# --- backend services{tail}");
    assert_eq!(rules::export(&config(&text)), HEADER);
}

// ----- round trip -----

#[test]
fn export_then_apply_is_a_no_op_byte_for_byte() {
    for (name, text) in [("demo", DEMO), ("rich", RICH), ("full", FULL)] {
        let exported = rules::export(&config(text));
        assert_eq!(apply(text, &exported), text, "{name}");
    }
}

#[test]
fn round_trip_keeps_crlf_configs_as_they_are() {
    let crlf = RICH.replace('\n', "\r\n");
    let exported = rules::export(&config(&crlf));
    assert_eq!(apply(&crlf, &exported), crlf);
    // A real change keeps every line end a CRLF.
    let changed = apply(&crlf, "22 TCP 30 TCP 2222 2 5 3 2 - -\n");
    assert_eq!(
        changed,
        apply(RICH, "22 TCP 30 TCP 2222 2 5 3 2 - -\n").replace('\n', "\r\n")
    );
    assert_eq!(
        changed.matches('\n').count(),
        changed.matches("\r\n").count()
    );
}

#[test]
fn a_rule_that_changes_nothing_leaves_the_text_alone() {
    // 80/tcp and 53/udp as they are, written differently.
    let rules = "80\ttcp  0 http 8080 2 5 3 2 / -\n53 udp 0 udp 9053 2 5 3 2 - -\n";
    assert_eq!(apply(DEMO, rules), DEMO);
    // Explicit defaults equal absent keys: "/" is the default path.
    let min = "[instance]\nname = \"m\"\nclient_interface = \"a\"\nbackend_interface = \"b\"\n\
               client_gateway = \"192.0.2.254\"\n[[listener]]\nname = \"l\"\nvip = \"192.0.2.1\"\n\
               protocol = \"tcp\"\nport = 80\nbackend_service = \"s\"\n[[backend_service]]\n\
               name = \"s\"\nprotocol = \"tcp\"\n[[backend_service.server]]\naddress = \"192.0.2.2\"\nport = 80\n";
    assert_eq!(apply(min, "80 TCP 0 TCP - 2 5 3 2 - -\n"), min);
    let http = edit(
        min,
        "protocol = \"tcp\"\n[[",
        "protocol = \"tcp\"\nhealth_check = { type = \"http\" }\n[[",
    );
    assert_eq!(apply(&http, "80 TCP 0 HTTP - 2 5 3 2 / -\n"), http);
}

// ----- apply: what changes -----

#[test]
fn apply_changes_persistence_and_health_check_of_the_right_service_only() {
    let before = config(DEMO);
    let text = apply(DEMO, "80 TCP 300 HTTP 8081 3 10 4 5 /healthz web.example\n");

    let mut expected = before.clone();
    let web = &mut expected.services[0];
    web.persistence_timeout = Some(300);
    web.health_check.port = Some(8081);
    web.health_check.timeout = 3;
    web.health_check.interval = 10;
    web.health_check.unhealthy_threshold = 4;
    web.health_check.healthy_threshold = 5;
    web.health_check.path = Some("/healthz".to_string());
    web.health_check.domain = Some("web.example".to_string());
    let after = config(&text);
    assert_eq!(after, expected);
    assert_eq!(after.services[1], before.services[1]);
    assert_eq!(after.instance, before.instance);
    assert_eq!(after.listeners, before.listeners);

    // Byte for byte: values replaced in place, new keys indented like their
    // neighbours, comments kept.
    let mut want = edit(
        DEMO,
        "availability_groups = [\"web-spare\"]\n",
        "availability_groups = [\"web-spare\"]\npersistence_timeout = 300\n",
    );
    want = edit(
        &want,
        "  port = 8080\n  path = \"/\"\n",
        "  port = 8081\n  path = \"/healthz\"\n  timeout = 3\n  interval = 10\n  unhealthy_threshold = 4\n  healthy_threshold = 5\n  domain = \"web.example\"\n",
    );
    assert_eq!(text, want);
}

#[test]
fn apply_sets_every_service_behind_a_port() {
    // 80/tcp: www-a (a [[backend_service]] table) and www-b (inline tables).
    let before = config(RICH);
    let text = apply(RICH, "80 TCP 60 HTTP 8080 3 10 3 2 /ready -\n");
    let mut want = edit(
        RICH,
        "persistence_timeout = 120 # two minutes",
        "persistence_timeout = 60 # two minutes",
    );
    want = edit(
        &want,
        "    path = \"/status\"\n    domain = \"www.example.com\"\n",
        "    path = \"/ready\"\n",
    );
    want = edit(
        &want,
        "persistence_timeout = 120\nhealth_check = { type = \"http\", port = 8080, timeout = 3, interval = 10, path = \"/status\", domain = \"www.example.com\" }",
        "persistence_timeout = 60\nhealth_check = { type = \"http\", port = 8080, timeout = 3, interval = 10, path = \"/ready\" }",
    );
    assert_eq!(text, want);

    let mut expected = before.clone();
    for i in [0, 1] {
        let s = &mut expected.services[i];
        s.persistence_timeout = Some(60);
        s.health_check.path = Some("/ready".to_string());
        s.health_check.domain = None;
    }
    assert_eq!(config(&text), expected);
    // www-a keeps its http_codes, scheduler and fail-open policy.
    assert_eq!(
        config(&text).services[0].health_check.http_codes,
        vec![(200, 200), (204, 204)]
    );
}

#[test]
fn changing_the_check_type_drops_keys_of_the_old_type_and_defaults_the_new() {
    let before = config(RICH);
    let text = apply(
        RICH,
        "80 TCP 120 TCP - 3 10 3 2 - -\n53 UDP 0 TCP - 2 5 2 3 - -\n53 TCP 0 UDP 53 50 50 3 2 - -\n",
    );
    let after = config(&text);
    let mut expected = before.clone();
    for i in [0, 1] {
        let hc = &mut expected.services[i].health_check;
        hc.kind = HealthCheckKind::Tcp;
        hc.port = None;
        hc.path = None;
        hc.domain = None;
        hc.http_codes = Vec::new();
    }
    let dns_udp = &mut expected.services[3].health_check;
    dns_udp.kind = HealthCheckKind::Tcp;
    dns_udp.udp_payload = None;
    let dns_tcp = &mut expected.services[4].health_check;
    dns_tcp.kind = HealthCheckKind::Udp;
    dns_tcp.udp_payload = Some("l4lb-health".to_string());
    assert_eq!(after, expected);
    // The old type's keys are gone from the text, the trailing comment stays.
    assert!(!text.contains("http_codes"), "{text}");
    assert!(!text.contains("udp_payload"), "{text}");
    assert!(
        text.contains("    type = \"tcp\"        # checks the application, not just the port\n")
    );
    assert!(text.contains("health_check = { type = \"tcp\", timeout = 3, interval = 10 }\n"));

    // To http: http_codes take their default.
    let text = apply(RICH, "22 TCP 3600 HTTP - 2 5 3 2 /ping -\n");
    let ssh = &config(&text).services[5];
    assert_eq!(ssh.health_check.kind, HealthCheckKind::Http);
    assert_eq!(ssh.health_check.http_codes, vec![(200, 399)]);
    assert_eq!(ssh.health_check.path.as_deref(), Some("/ping"));
}

#[test]
fn a_service_without_health_check_table_gets_one() {
    let text = apply(
        RICH,
        "443 TCP 30 HTTP - 2 5 3 2 / -\n8443 TCP 30 HTTP - 2 5 3 2 / -\n",
    );
    // The new table follows the service's keys; the comment after them
    // stays with them, above the new table.
    let want = edit(
        RICH,
        "availability_groups = [\"tls-pool\"]\n# No health_check table: a TCP connect to each server's port every 5s.\n\n",
        "availability_groups = [\"tls-pool\"]\npersistence_timeout = 30\n# No health_check table: a TCP connect to each server's port every 5s.\n\n[backend_service.health_check]\ntype = \"http\"\n\n",
    );
    assert_eq!(text, want);
    // Inside an indented service, the new table is indented like its servers.
    let min = DEMO.replace(
        "  [backend_service.health_check]\n  type = \"udp\"\n  port = 9053\n  # udp_payload = \"l4lb-health\"\n\n",
        "",
    );
    let text = apply(&min, "53 UDP 0 UDP 9053 2 5 3 2 - -\n");
    assert_eq!(
        text,
        edit(
            &min,
            "# on_all_down = \"drop\"\n\n  [[backend_service.server]]\n  address = \"198.18.2.11\"\n  port = 9053",
            "# on_all_down = \"drop\"\n\n  [backend_service.health_check]\n  type = \"udp\"\n  port = 9053\n\n  [[backend_service.server]]\n  address = \"198.18.2.11\"\n  port = 9053",
        )
    );
}

#[test]
fn persistence_off_is_written_as_zero_where_it_was_set() {
    let text = apply(RICH, "22 TCP 0 TCP - 2 5 3 2 - -\n");
    assert_eq!(
        text,
        edit(
            RICH,
            "persistence_timeout = 3600\n",
            "persistence_timeout = 0\n"
        )
    );
    assert_eq!(config(&text).services[5].persistence_timeout, None);
}

#[test]
fn same_settings_for_two_ports_of_one_service_is_fine() {
    let text = apply(
        RICH,
        "443 TCP 45 TCP - 2 5 3 2 - -\n8443 TCP 45 TCP - 2 5 3 2 - -\n",
    );
    assert_eq!(config(&text).services[2].persistence_timeout, Some(45));
}

// ----- apply: errors -----

#[test]
fn unknown_port_is_an_error() {
    assert_eq!(
        apply_errors(DEMO, &parse("# web\n\n8081 TCP 0 TCP - 2 5 3 2 - -\n")),
        vec!["rules.txt:3: no listener on port 8081/TCP"]
    );
    // The port exists, but for the other protocol.
    assert_eq!(
        apply_errors(
            DEMO,
            &parse("80 UDP 0 UDP - 2 5 3 2 - -\n53 TCP 0 TCP - 2 5 3 2 - -\n")
        ),
        vec![
            "rules.txt:1: no listener on port 80/UDP",
            "rules.txt:2: no listener on port 53/TCP",
        ]
    );
}

#[test]
fn rules_of_one_service_that_disagree_are_an_error_naming_both_lines() {
    let rules = parse("443 TCP 0 TCP - 2 5 3 2 - -\n# alt\n8443 TCP 30 TCP - 2 5 3 2 - -\n");
    assert_eq!(
        apply_errors(RICH, &rules),
        vec!["rules.txt:3: conflicts with the rule at line 1: backend service \"tls\" serves both 443/TCP and 8443/TCP, and the two rules give it different settings"]
    );
}

#[test]
fn duplicate_rules_are_an_error() {
    let text =
        "80 TCP 0 TCP - 2 5 3 2 - -\n53 UDP 0 UDP - 2 5 3 2 - -\n80 tcp 0 TCP - 2 5 3 2 - -\n";
    assert_eq!(
        parse_errors(text),
        vec!["rules.txt:3: duplicate rule for port 80/TCP (first at line 1)"]
    );
    let rules = vec![
        rule(80, Protocol::Tcp, 1),
        rule(53, Protocol::Udp, 2),
        rule(80, Protocol::Tcp, 3),
    ];
    assert_eq!(
        apply_errors(DEMO, &rules),
        vec!["rules.txt:3: duplicate rule for port 80/TCP (first at line 1)"]
    );
}

#[test]
fn every_kind_of_bad_line_is_reported_with_its_line() {
    let text = "\
# every line below but the first is wrong
80 TCP 0 HTTP 8080 2 5 3 2 / -
80 TCP 0 HTTP 8080 2 5 3 2 /
80 TCP 0 HTTP 8080 2 5 3 2 / - extra
x TCP 0 TCP - 2 5 3 2 - -
0 TCP 0 TCP - 2 5 3 2 - -
65536 TCP 0 TCP - 2 5 3 2 - -
99999999999999999999999 TCP 0 TCP - 2 5 3 2 - -
81 SCTP 0 TCP - 2 5 3 2 - -
82 TCP 29 TCP - 2 5 3 2 - -
83 TCP 3601 TCP - 2 5 3 2 - -
84 TCP -1 TCP - 2 5 3 2 - -
85 TCP 0 ICMP - 2 5 3 2 - -
86 TCP 0 TCP 0 2 5 3 2 - -
87 TCP 0 TCP 70000 2 5 3 2 - -
88 TCP 0 TCP - 0 5 3 2 - -
89 TCP 0 TCP - 301 5 3 2 - -
90 TCP 0 TCP - 2 0 3 2 - -
91 TCP 0 TCP - 2 51 3 2 - -
92 TCP 0 TCP - 6 5 3 2 - -
93 TCP 0 TCP - 2 5 1 2 - -
94 TCP 0 TCP - 2 5 3 11 - -
95 TCP 0 TCP - 2 5 3 2 /x -
96 UDP 0 UDP - 2 5 3 2 - x.example
97 TCP 0 HTTP - 2 5 3 2 - -
98 TCP 0 HTTP - 2 5 3 2 healthz -
99 TCP 0 HTTP - 2 5 3 2 / a_b
100 tcp 10 icmp 0 0 51 1 11 /x y
101 TCP 0 HTTP - 2 5 3 2 /a\u{7f}b -
";
    assert_eq!(
        parse_errors(text),
        vec![
            "rules.txt:3: expected 11 fields (port protocol persistence hc_type hc_port timeout interval unhealthy healthy path domain), found 10",
            "rules.txt:4: expected 11 fields (port protocol persistence hc_type hc_port timeout interval unhealthy healthy path domain), found 12",
            "rules.txt:5: port \"x\" is not a number (1-65535)",
            "rules.txt:6: port 0 is out of range (1-65535)",
            "rules.txt:7: port 65536 is out of range (1-65535)",
            "rules.txt:8: port 99999999999999999999999 is out of range (1-65535)",
            "rules.txt:9: unknown protocol \"SCTP\" (allowed: TCP, UDP)",
            "rules.txt:10: persistence 29 is out of range (0 = off, or 30-3600)",
            "rules.txt:11: persistence 3601 is out of range (0 = off, or 30-3600)",
            "rules.txt:12: persistence \"-1\" is not a number (0 = off, or 30-3600)",
            "rules.txt:13: unknown health check type \"ICMP\" (allowed: TCP, HTTP, UDP)",
            "rules.txt:14: hc_port 0 is out of range (1-65535, or - for the server's port)",
            "rules.txt:15: hc_port 70000 is out of range (1-65535, or - for the server's port)",
            "rules.txt:16: timeout 0 is out of range (1-300)",
            "rules.txt:17: timeout 301 is out of range (1-300)",
            "rules.txt:18: interval 0 is out of range (1-50)",
            "rules.txt:19: interval 51 is out of range (1-50)",
            "rules.txt:20: timeout 6 exceeds interval 5 (timeout must not exceed interval)",
            "rules.txt:21: unhealthy 1 is out of range (2-10)",
            "rules.txt:22: healthy 11 is out of range (2-10)",
            "rules.txt:23: path \"/x\" is only valid for HTTP health checks (write - for TCP)",
            "rules.txt:24: domain \"x.example\" is only valid for HTTP health checks (write - for UDP)",
            "rules.txt:25: path is required for HTTP health checks (it must start with '/')",
            "rules.txt:26: path \"healthz\" must start with '/'",
            "rules.txt:27: domain \"a_b\" is invalid (a host name of at most 253 characters: labels of 1-63 letters, digits and '-', not starting or ending with '-', joined by '.')",
            // Several problems on one line are all reported.
            "rules.txt:28: persistence 10 is out of range (0 = off, or 30-3600)",
            "rules.txt:28: unknown health check type \"icmp\" (allowed: TCP, HTTP, UDP)",
            "rules.txt:28: hc_port 0 is out of range (1-65535, or - for the server's port)",
            "rules.txt:28: timeout 0 is out of range (1-300)",
            "rules.txt:28: interval 51 is out of range (1-50)",
            "rules.txt:28: unhealthy 1 is out of range (2-10)",
            "rules.txt:28: healthy 11 is out of range (2-10)",
            "rules.txt:29: path \"/a\\u{7f}b\" contains '\\u{7f}' (no whitespace or control characters: percent-encode them, like %20 for a space)",
        ]
    );
}

#[test]
fn apply_rejects_bad_rules_with_every_error_and_no_text() {
    // Rules built by hand are checked like parsed ones.
    let mut bad_port = rule(0, Protocol::Tcp, 2);
    bad_port.persistence = 10;
    let mut bad_check = rule(80, Protocol::Tcp, 4);
    bad_check.timeout = 6;
    bad_check.path = Some("/x".to_string());
    let mut bad_http = rule(53, Protocol::Udp, 7);
    bad_http.check = HealthCheckKind::Http;
    bad_http.check_port = Some(0);
    bad_http.path = Some("/a b".to_string());
    bad_http.domain = Some(String::new());
    let unknown = rule(8081, Protocol::Tcp, 9);
    let rules = vec![bad_port, bad_check, bad_http, unknown];
    assert_eq!(
        apply_errors(DEMO, &rules),
        vec![
            "rules.txt:2: port 0 is out of range (1-65535)",
            "rules.txt:2: persistence 10 is out of range (0 = off, or 30-3600)",
            "rules.txt:4: timeout 6 exceeds interval 5 (timeout must not exceed interval)",
            "rules.txt:4: path \"/x\" is only valid for HTTP health checks (write - for TCP)",
            "rules.txt:7: hc_port 0 is out of range (1-65535, or - for the server's port)",
            "rules.txt:7: path \"/a b\" contains ' ' (no whitespace or control characters: percent-encode them, like %20 for a space)",
            "rules.txt:7: domain \"\" is invalid (a host name of at most 253 characters: labels of 1-63 letters, digits and '-', not starting or ending with '-', joined by '.')",
            "rules.txt:9: no listener on port 8081/TCP",
        ]
    );
    // One bad rule among good ones: nothing is applied.
    let mut rules = parse("80 TCP 300 TCP - 2 5 3 2 - -\n");
    rules.push(rule(8081, Protocol::Tcp, 2));
    assert_eq!(
        apply_errors(DEMO, &rules),
        vec!["rules.txt:2: no listener on port 8081/TCP"]
    );
}

#[test]
fn apply_text_reports_bad_lines_and_config_problems_together() {
    let text = "80 TCP 300 TCP - 2 5 3 2 - -\n8081 TCP 0 TCP - 2 5 3 2 - -\n53 UDP 0 UDP - 9 5 3 2 - -\n80 TCP 300 TCP - 2 5 3 2 - -\n";
    let errors = rules::apply_text(DEMO, "l4lb.toml", text, "rules.txt").unwrap_err();
    assert_eq!(
        show(&errors),
        "rules.txt:2: no listener on port 8081/TCP
rules.txt:3: timeout 9 exceeds interval 5 (timeout must not exceed interval)
rules.txt:4: duplicate rule for port 80/TCP (first at line 1)"
    );
    assert_eq!(
        rules::apply_text(
            DEMO,
            "l4lb.toml",
            "80 TCP 300 HTTP 8080 2 5 3 2 / -\n",
            "r.txt"
        )
        .map(|t| config(&t).services[0].persistence_timeout),
        Ok(Some(300))
    );
}

#[test]
fn a_bad_lines_port_is_checked_for_duplicates_and_a_listener_in_the_same_run() {
    // Lines 1 and 3 are bad for other reasons; their ports still count.
    let text = "80 TCP 29 HTTP 8080 2 5 3 2 / -\n\
                80 TCP 300 HTTP 8080 2 5 3 2 / -\n\
                81 TCP 0 TCP - 2 5 3 1 - -\n\
                81 tcp 0 TCP - 2 5 3 2 - -\n";
    let errors = rules::apply_text(DEMO, "l4lb.toml", text, "rules.txt").unwrap_err();
    assert_eq!(
        show(&errors),
        "rules.txt:1: persistence 29 is out of range (0 = off, or 30-3600)
rules.txt:2: duplicate rule for port 80/TCP (first at line 1)
rules.txt:3: healthy 1 is out of range (2-10)
rules.txt:3: no listener on port 81/TCP
rules.txt:4: duplicate rule for port 81/TCP (first at line 3)"
    );
    assert_eq!(
        parse_errors(text),
        vec![
            "rules.txt:1: persistence 29 is out of range (0 = off, or 30-3600)",
            "rules.txt:2: duplicate rule for port 80/TCP (first at line 1)",
            "rules.txt:3: healthy 1 is out of range (2-10)",
            "rules.txt:4: duplicate rule for port 81/TCP (first at line 3)",
        ]
    );
}

#[test]
fn an_invalid_config_is_reported_in_the_configs_own_terms() {
    let broken = edit(DEMO, "weight = 50", "weight = 500");
    let rules = parse("80 TCP 0 HTTP 8080 2 5 3 2 / -\n");
    let errors = rules::apply(&broken, "l4lb.toml", &rules, "rules.txt").unwrap_err();
    let line = broken
        .lines()
        .position(|l| l.contains("weight = 500"))
        .unwrap()
        + 1;
    assert_eq!(
        errors,
        vec![RuleError {
            file: "l4lb.toml".to_string(),
            line,
            message: "weight 500 is out of range (0-100)".to_string(),
        }]
    );
    assert_eq!(
        errors[0].to_string(),
        format!("l4lb.toml:{line}: weight 500 is out of range (0-100)")
    );
}

// ----- parse -----

#[test]
fn parse_reads_every_field() {
    let rules =
        parse("80 TCP 300 HTTP 8081 3 10 4 5 /healthz web.example\n53 udp 0 udp - 2 5 3 2 - -");
    assert_eq!(
        rules,
        vec![
            Rule {
                port: 80,
                protocol: Protocol::Tcp,
                persistence: 300,
                check: HealthCheckKind::Http,
                check_port: Some(8081),
                timeout: 3,
                interval: 10,
                unhealthy: 4,
                healthy: 5,
                path: Some("/healthz".to_string()),
                domain: Some("web.example".to_string()),
                line: 1,
            },
            Rule {
                check: HealthCheckKind::Udp,
                ..rule(53, Protocol::Udp, 2)
            },
        ]
    );
    // Printed back upper-case, single-spaced.
    let lines: Vec<String> = rules.iter().map(|r| r.to_string()).collect();
    assert_eq!(
        lines,
        vec![
            "80 TCP 300 HTTP 8081 3 10 4 5 /healthz web.example",
            "53 UDP 0 UDP - 2 5 3 2 - -",
        ]
    );
}

#[test]
fn range_limits_are_inclusive() {
    let rules = parse("65535 UDP 3600 HTTP 65535 50 50 10 10 / -\n1 tcp 30 Tcp 1 1 1 2 2 - -\n");
    assert_eq!(rules[0].port, 65535);
    assert_eq!(rules[0].persistence, 3600);
    assert_eq!((rules[0].timeout, rules[0].interval), (50, 50));
    assert_eq!((rules[0].unhealthy, rules[0].healthy), (10, 10));
    assert_eq!(rules[1].check_port, Some(1));
    assert_eq!(rules[1].persistence, 30);
}

#[test]
fn comments_and_blank_lines_are_ignored() {
    let text = "# header\n\n   \t\n  # indented comment\n\t# tab comment\n80 TCP 0 TCP - 2 5 3 2 - -\n   \n53\tUDP\t0\tUDP\t-\t2\t5\t3\t2\t-\t-\n# trailing";
    let rules = parse(text);
    assert_eq!(
        rules.iter().map(|r| (r.port, r.line)).collect::<Vec<_>>(),
        vec![(80, 6), (53, 8)]
    );
    // Leading and repeated blanks between fields are fine.
    assert_eq!(parse("   80  \t TCP 0 TCP - 2 5 3 2 - -   \n")[0].port, 80);
    // Only comments: no rules, no error.
    assert_eq!(parse("# nothing\n\n"), vec![]);
    assert_eq!(parse(""), vec![]);
}

#[test]
fn crlf_rules_are_accepted() {
    let lf =
        "# c\n80 TCP 300 HTTP 8081 3 10 4 5 /healthz web.example\n\n53 UDP 0 UDP - 2 5 3 2 - -\n";
    let crlf = lf.replace('\n', "\r\n");
    assert_eq!(parse(&crlf), parse(lf));
    assert_eq!(apply(DEMO, &crlf), apply(DEMO, lf));
    // Errors on CRLF files point at the same lines, without the CR.
    assert_eq!(
        parse_errors("# c\r\n80 TCP 0 TCP - 2 5 3 2 - x\r\n"),
        vec!["rules.txt:2: domain \"x\" is only valid for HTTP health checks (write - for TCP)"]
    );
    // A byte-order mark is skipped.
    assert_eq!(parse("\u{feff}80 TCP 0 TCP - 2 5 3 2 - -\r\n").len(), 1);
}

#[test]
fn rule_errors_display_as_file_line_message() {
    let e = RuleError {
        file: "rules.txt".to_string(),
        line: 12,
        message: "no listener on port 8081/TCP".to_string(),
    };
    assert_eq!(e.to_string(), "rules.txt:12: no listener on port 8081/TCP");
}

// ----- the shipped example -----

#[test]
fn example_rules_file_parses_and_applies_to_the_demo() {
    let rules = parse(EXAMPLE_RULES);
    assert_eq!(rules.len(), 2);
    let text = apply(DEMO, EXAMPLE_RULES);
    let before = config(DEMO);
    let after = config(&text);
    let mut expected = before.clone();
    let web = &mut expected.services[0];
    web.persistence_timeout = Some(300);
    web.health_check.timeout = 3;
    web.health_check.interval = 10;
    web.health_check.path = Some("/healthz".to_string());
    web.health_check.domain = Some("web.example".to_string());
    assert_eq!(after, expected);
    // Applying it again changes nothing, and exporting gives its rules back.
    assert_eq!(apply(&text, EXAMPLE_RULES), text);
    assert_eq!(parse(&rules::export(&after)), {
        let mut r = rules.clone();
        r.sort_by_key(|r| r.port);
        r.iter_mut().zip([2, 3]).for_each(|(r, line)| r.line = line);
        r
    });
}

#[test]
fn noise_never_panics_and_errors_stay_on_their_lines() {
    let alphabet: Vec<char> = "0123456789 \t\r\n#-/.TCPUDPHTtcpudphx_\u{e9}\u{1F600}"
        .chars()
        .collect();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let demo = config(DEMO);
    let mut texts: Vec<String> = Vec::new();
    for _ in 0..500 {
        let mut s = String::new();
        for _ in 0..(seed % 120) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            s.push(alphabet[(seed % alphabet.len() as u64) as usize]);
        }
        texts.push(s);
    }
    // Mutations of a valid export: a digit or a blank inserted everywhere.
    let good = rules::export(&demo);
    for (i, _) in good.char_indices().step_by(3) {
        texts.push(format!("{}7{}", &good[..i], &good[i..]));
        texts.push(format!("{} {}", &good[..i], &good[i..]));
    }
    for text in &texts {
        let lines = text.split('\n').count();
        match rules::apply_text(DEMO, "l4lb.toml", text, "rules.txt") {
            Ok(new) => assert!(Config::from_str(&new, "l4lb.toml").is_ok(), "{text:?}"),
            Err(errors) => {
                assert!(!errors.is_empty());
                for e in &errors {
                    assert_eq!(e.file, "rules.txt", "{e} for {text:?}");
                    assert!(e.line >= 1 && e.line <= lines, "{e} for {text:?}");
                    assert!(!e.message.contains('\n'), "{e:?} for {text:?}");
                }
            }
        }
    }
}
