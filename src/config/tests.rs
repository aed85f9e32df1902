use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::*;

const MINIMAL: &str = include_str!("../../tests/fixtures/config/minimal.toml");
const FULL: &str = include_str!("../../tests/fixtures/config/full.toml");
const MANY_ERRORS: &str = include_str!("../../tests/fixtures/config/many-errors.toml");

/// Lines 1-5: a valid instance; line 6 is blank.
const INSTANCE: &str = "[instance]
name = \"t\"
client_interface = \"c0\"
backend_interface = \"b0\"
client_gateway = \"10.0.0.1\"

";

/// A valid listener + service, to follow other sections (9 and 7 lines).
const WEB: &str = "[[listener]]
name = \"web\"
vip = \"192.0.2.1\"
protocol = \"tcp\"
port = 80
backend_service = \"web\"

[[backend_service]]
name = \"web\"
protocol = \"tcp\"
[[backend_service.server]]
address = \"192.0.2.11\"
port = 8080
";

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_str(text, "t.toml")
}

fn ok(text: &str) -> Config {
    match load(text) {
        Ok(c) => c,
        Err(e) => panic!("expected a valid config, got:\n{e}"),
    }
}

/// All problems, one `file:line:col: message` string each.
fn errors(text: &str) -> Vec<String> {
    match load(text) {
        Ok(c) => panic!("expected errors, got a config: {c:?}"),
        Err(ConfigError::Invalid(list)) => {
            assert!(!list.is_empty());
            list.iter().map(|e| e.to_string()).collect()
        }
        Err(e) => panic!("expected Invalid, got {e:?}"),
    }
}

/// The single problem of `text`.
fn error(text: &str) -> String {
    let mut list = errors(text);
    assert_eq!(list.len(), 1, "expected one error, got {list:#?}");
    list.remove(0)
}

/// INSTANCE + `rest`.
fn with_instance(rest: &str) -> String {
    format!("{INSTANCE}{rest}")
}

// ----- the demo / default configuration -----

#[test]
fn default_config_is_the_demo() {
    let c = ok(DEFAULT_CONFIG);
    let i = &c.instance;
    assert_eq!(i.name, "demo");
    assert_eq!(i.mode, ForwardingMode::Nat);
    assert_eq!(i.client_interface, "lb-c");
    assert_eq!(i.backend_interface, "lb-b");
    assert_eq!(i.client_gateway, ip("198.18.0.2"));
    assert_eq!(i.attach, AttachMode::Skb);
    assert_eq!(i.bind, BindMode::Auto);
    assert_eq!(i.workers, vec![0]);
    assert_eq!(i.flow_table_capacity, 1_048_576);
    assert_eq!(i.flow_idle_timeout, 300);
    assert_eq!(i.tcp_closed_timeout, 60);
    assert_eq!(i.tcp_syn_timeout, 30);
    assert_eq!(i.persistence_capacity, 262_144);
    assert_eq!(i.persistence_when_full, WhenFull::EvictOldest);
    assert_eq!(i.control_socket, PathBuf::from("/run/l4lb/l4lb.sock"));
    assert!(i.neighbours.is_empty());

    let listener = |name: &str, vip: &str, protocol, port, service| Listener {
        name: name.to_string(),
        vip: ip(vip),
        protocol,
        port,
        service,
    };
    assert_eq!(
        c.listeners,
        vec![
            listener("web", "198.18.100.1", Protocol::Tcp, 80, 0),
            listener("web-alt", "198.18.100.2", Protocol::Tcp, 80, 0),
            listener("echo", "198.18.100.1", Protocol::Udp, 53, 1),
        ]
    );

    let server = |address: &str, port, weight, group: Option<&str>| Server {
        address: ip(address),
        port,
        weight,
        group: group.map(str::to_string),
    };
    assert_eq!(c.services.len(), 2);
    let web = &c.services[0];
    assert_eq!(web.name, "web");
    assert_eq!(web.protocol, Protocol::Tcp);
    assert_eq!(web.scheduler, Scheduler::WeightedSourceIp);
    assert_eq!(web.persistence_timeout, None);
    assert_eq!(
        web.health_check,
        HealthCheck {
            kind: HealthCheckKind::Http,
            port: Some(8080),
            timeout: 2,
            interval: 5,
            unhealthy_threshold: 3,
            healthy_threshold: 2,
            path: Some("/".to_string()),
            domain: None,
            http_codes: vec![(200, 399)],
            udp_payload: None,
        }
    );
    assert_eq!(web.on_all_down, AllDown::Drop);
    assert_eq!(
        web.servers,
        vec![
            server("198.18.2.11", 8080, 50, None),
            server("198.18.2.12", 8080, 30, None),
            server("198.18.2.13", 8080, 20, Some("web-spare")),
        ]
    );
    let echo = &c.services[1];
    assert_eq!(echo.name, "echo");
    assert_eq!(echo.protocol, Protocol::Udp);
    assert_eq!(echo.scheduler, Scheduler::WeightedSourceIp);
    assert_eq!(echo.persistence_timeout, None);
    assert_eq!(
        echo.health_check,
        HealthCheck {
            kind: HealthCheckKind::Udp,
            port: Some(9053),
            timeout: 2,
            interval: 5,
            unhealthy_threshold: 3,
            healthy_threshold: 2,
            path: None,
            domain: None,
            http_codes: Vec::new(),
            udp_payload: Some("l4lb-health".to_string()),
        }
    );
    assert_eq!(echo.on_all_down, AllDown::Drop);
    assert_eq!(
        echo.servers,
        vec![
            server("198.18.2.11", 9053, 100, None),
            server("198.18.2.12", 9053, 100, None),
            server("198.18.2.13", 9053, 100, None),
        ]
    );
    assert_eq!(
        c.summary(),
        "demo: 3 listeners, 2 backend services, 6 servers, 1 worker, nat mode on lb-c/lb-b"
    );
}

#[test]
fn default_config_commented_examples_are_valid() {
    // Uncommenting every `# key = value` example line must still give a valid
    // configuration: the comments document real keys with valid values.
    let uncommented: String = DEFAULT_CONFIG
        .lines()
        .map(|line| {
            let trimmed = line.trim_start();
            match trimmed.strip_prefix("# ") {
                Some(rest)
                    if rest.starts_with('[') && rest.ends_with(']')
                        || rest.contains(" = ") && !rest.contains("  ") =>
                {
                    rest.to_string()
                }
                _ => line.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let c = ok(&uncommented);
    assert_eq!(
        c.instance.neighbours,
        vec![StaticNeighbour {
            address: ip("198.18.0.2"),
            mac: [2, 0, 0, 0, 0, 1]
        }]
    );
    assert_eq!(
        c.services[0].health_check.domain.as_deref(),
        Some("web.example")
    );
    // The documented defaults, written out, change nothing else.
    let mut expected = ok(DEFAULT_CONFIG);
    expected.instance.neighbours = c.instance.neighbours.clone();
    expected.services[0].health_check.domain = Some("web.example".to_string());
    assert_eq!(c, expected);
}

// ----- valid configurations and defaults -----

#[test]
fn minimal_config_gets_defaults() {
    let c = ok(MINIMAL);
    let i = &c.instance;
    assert_eq!(i.name, "min");
    assert_eq!(i.mode, ForwardingMode::Nat);
    assert_eq!(i.attach, AttachMode::Native);
    assert_eq!(i.bind, BindMode::Auto);
    assert_eq!(i.workers, vec![0]);
    assert_eq!(i.flow_table_capacity, 1_048_576);
    assert_eq!(i.flow_idle_timeout, 300);
    assert_eq!(i.tcp_closed_timeout, 60);
    assert_eq!(i.tcp_syn_timeout, 30);
    assert_eq!(i.persistence_capacity, 262_144);
    assert_eq!(i.persistence_when_full, WhenFull::EvictOldest);
    assert_eq!(i.control_socket, PathBuf::from("/run/l4lb/l4lb.sock"));
    assert!(i.neighbours.is_empty());
    let s = &c.services[0];
    assert_eq!(s.scheduler, Scheduler::WeightedSourceIp);
    assert_eq!(s.persistence_timeout, None);
    assert_eq!(
        s.health_check,
        HealthCheck {
            kind: HealthCheckKind::Tcp,
            port: None,
            timeout: 2,
            interval: 5,
            unhealthy_threshold: 3,
            healthy_threshold: 2,
            path: None,
            domain: None,
            http_codes: Vec::new(),
            udp_payload: None,
        }
    );
    assert_eq!(s.on_all_down, AllDown::Drop);
    assert_eq!(
        s.servers,
        vec![Server {
            address: ip("192.0.2.11"),
            port: 8080,
            weight: 100,
            group: None
        }]
    );
    assert_eq!(
        c.summary(),
        "min: 1 listener, 1 backend service, 1 server, 1 worker, nat mode on eth0/eth1"
    );
}

#[test]
fn full_config_reads_every_key() {
    let c = ok(FULL);
    let i = &c.instance;
    assert_eq!(i.client_gateway, ip("2001:db8::fffe"));
    assert_eq!(i.attach, AttachMode::Native);
    assert_eq!(i.bind, BindMode::ZeroCopy);
    assert_eq!(i.workers, vec![2, 3, 5]);
    assert_eq!(i.flow_table_capacity, 4096);
    assert_eq!(i.flow_idle_timeout, 60);
    assert_eq!(i.tcp_closed_timeout, 20);
    assert_eq!(i.tcp_syn_timeout, 15);
    assert_eq!(i.persistence_capacity, 1024);
    assert_eq!(i.persistence_when_full, WhenFull::NoRecord);
    assert_eq!(i.control_socket, PathBuf::from("/tmp/l4lb-test.sock"));
    assert_eq!(
        i.neighbours,
        vec![
            StaticNeighbour {
                address: ip("2001:db8::fffe"),
                mac: [2, 0, 0, 0, 0, 1]
            },
            StaticNeighbour {
                address: ip("192.0.2.254"),
                mac: [0x0a, 0xbc, 0xde, 0xf0, 0x12, 0x34]
            },
        ]
    );
    assert_eq!(c.listeners[0].protocol, Protocol::Tcp);
    assert_eq!(c.listeners[0].vip, ip("2001:db8::1"));
    assert_eq!(c.listeners[1].protocol, Protocol::Udp);
    assert_eq!(c.listeners[1].service, 1);

    let web6 = &c.services[0];
    assert_eq!(web6.scheduler, Scheduler::WeightedLeastConnections);
    assert_eq!(web6.persistence_timeout, Some(600));
    assert_eq!(
        web6.health_check,
        HealthCheck {
            kind: HealthCheckKind::Http,
            port: Some(8443),
            timeout: 3,
            interval: 10,
            unhealthy_threshold: 5,
            healthy_threshold: 4,
            path: Some("/health?full=1".to_string()),
            domain: Some("www.example.com".to_string()),
            http_codes: vec![(200, 200), (204, 204), (300, 302)],
            udp_payload: None,
        }
    );
    assert_eq!(web6.on_all_down, AllDown::FailOpen);
    let servers: Vec<(IpAddr, u8, Option<&str>)> = web6
        .servers
        .iter()
        .map(|s| (s.address, s.weight, s.group.as_deref()))
        .collect();
    assert_eq!(
        servers,
        vec![
            (ip("2001:db8:1::1"), 0, None),
            (ip("2001:db8:2::1"), 100, Some("six-a")),
            (ip("2001:db8:2::2"), 1, Some("six-b")),
        ]
    );
    let dns = &c.services[1];
    assert_eq!(dns.scheduler, Scheduler::WeightedRoundRobin);
    assert_eq!(dns.persistence_timeout, Some(30));
    assert_eq!(dns.on_all_down, AllDown::Drop);
    assert_eq!(dns.health_check.kind, HealthCheckKind::Udp);
    assert_eq!(dns.health_check.udp_payload.as_deref(), Some("ping?"));
    assert!(dns.health_check.http_codes.is_empty());
    assert_eq!(
        c.summary(),
        "full: 2 listeners, 2 backend services, 4 servers, 3 workers, nat mode on ens1f0/ens1f1"
    );
}

#[test]
fn service_without_listener_and_unused_group_are_allowed() {
    let c = ok(&with_instance(
        "[[backend_service]]
name = \"idle\"
protocol = \"udp\"
[[backend_service.server]]
address = \"192.0.2.11\"
port = 53

[[availability_group]]
name = \"spare\"
[[availability_group.server]]
address = \"192.0.2.12\"
port = 53
",
    ));
    assert!(c.listeners.is_empty());
    assert_eq!(c.services.len(), 1);
    assert_eq!(
        c.summary(),
        "t: 0 listeners, 1 backend service, 1 server, 1 worker, nat mode on c0/b0"
    );
}

#[test]
fn a_service_may_consist_of_groups_only_and_share_them() {
    let c = ok(&with_instance(
        "[[backend_service]]
name = \"a\"
protocol = \"tcp\"
availability_groups = [\"g1\", \"g2\"]

[[backend_service]]
name = \"b\"
protocol = \"tcp\"
availability_groups = [\"g2\"]

[[availability_group]]
name = \"g1\"
[[availability_group.server]]
address = \"192.0.2.1\"
port = 80

[[availability_group]]
name = \"g2\"
[[availability_group.server]]
address = \"192.0.2.2\"
port = 80
[[availability_group.server]]
address = \"192.0.2.3\"
port = 80
weight = 0
",
    ));
    let groups = |i: usize| -> Vec<Option<&str>> {
        c.services[i]
            .servers
            .iter()
            .map(|s| s.group.as_deref())
            .collect()
    };
    assert_eq!(groups(0), vec![Some("g1"), Some("g2"), Some("g2")]);
    assert_eq!(groups(1), vec![Some("g2"), Some("g2")]);
    assert_eq!(c.services[1].servers[1].weight, 0);
}

#[test]
fn same_server_in_two_services_is_fine() {
    // The demo does this (198.18.2.11 serves web and echo); with the same
    // port in two services too.
    ok(&with_instance(
        "[[backend_service]]
name = \"a\"
protocol = \"tcp\"
[[backend_service.server]]
address = \"192.0.2.1\"
port = 80

[[backend_service]]
name = \"b\"
protocol = \"tcp\"
[[backend_service.server]]
address = \"192.0.2.1\"
port = 80
",
    ));
}

#[test]
fn ipv6_listener_and_servers() {
    let c = ok(&with_instance(
        "[[listener]]
name = \"v6\"
vip = \"2001:db8::1\"
protocol = \"tcp\"
port = 80
backend_service = \"v6\"

[[backend_service]]
name = \"v6\"
protocol = \"tcp\"
[[backend_service.server]]
address = \"2001:db8::11\"
port = 80
",
    ));
    assert_eq!(c.listeners[0].vip, ip("2001:db8::1"));
}

#[test]
fn inline_tables_and_crlf_work() {
    let text = "[instance]\r\nname = \"t\"\r\nclient_interface = \"c0\"\r\n\
        backend_interface = \"b0\"\r\nclient_gateway = \"10.0.0.1\"\r\n\
        listener = [{ name = \"l\", vip = \"192.0.2.1\", protocol = \"udp\", port = 1, backend_service = \"s\" }]\r\n";
    // `listener = [...]` inside [instance] is an unknown instance key.
    assert_eq!(
        error(text),
        "t.toml:6:1: unknown key `listener`, expected one of `name`, `mode`, `client_interface`, \
         `backend_interface`, `client_gateway`, `attach`, `bind`, `workers`, \
         `flow_table_capacity`, `flow_idle_timeout`, `tcp_closed_timeout`, `tcp_syn_timeout`, \
         `persistence_capacity`, \
         `persistence_when_full`, `control_socket`, `neighbour`"
    );
    let text = "listener = [{ name = \"l\", vip = \"192.0.2.1\", protocol = \"udp\", port = 1, backend_service = \"s\" }]\r\n\
        backend_service = [{ name = \"s\", protocol = \"udp\", server = [{ address = \"192.0.2.2\", port = 7 }] }]\r\n\
        [instance]\r\nname = \"t\"\r\nclient_interface = \"c0\"\r\n\
        backend_interface = \"b0\"\r\nclient_gateway = \"10.0.0.1\"\r\nworkers = [1, 7]\r\n";
    let c = ok(text);
    assert_eq!(c.listeners[0].port, 1);
    assert_eq!(c.services[0].servers[0].port, 7);
    assert_eq!(c.instance.workers, vec![1, 7]);

    // Positions on CRLF files.
    let text = "[instance]\r\nname = \"t\"\r\nclient_interface = \"c0\"\r\n\
        backend_interface = \"b0\"\r\nclient_gateway = \"10.0.0.1\"\r\nworkers = [1, 7, 1]\r\n";
    assert_eq!(
        error(text),
        "t.toml:6:18: CPU core id 1 is listed twice in workers (one worker per core)"
    );
}

/// Worker `i` serves queue `i`, and the XDP program's socket map has
/// `MAX_WORKERS` queues: `check` refuses more workers, at the first one too
/// many, rather than `run` failing at start without a location.
#[test]
fn more_workers_than_the_socket_map_has_queues_are_refused_at_the_first_extra() {
    let workers = |n: usize| {
        let ids: Vec<String> = (0..n).map(|i| i.to_string()).collect();
        format!(
            "[instance]\nname = \"t\"\nclient_interface = \"c0\"\n\
             backend_interface = \"b0\"\nclient_gateway = \"10.0.0.1\"\nworkers = [{}]\n",
            ids.join(", ")
        )
    };
    assert_eq!(
        ok(&workers(MAX_WORKERS)).instance.workers.len(),
        MAX_WORKERS
    );
    let text = workers(MAX_WORKERS + 1);
    let line6 = text.lines().nth(5).unwrap();
    let col = line6.rfind(&format!(" {MAX_WORKERS}]")).unwrap() + 2;
    assert_eq!(
        error(&text),
        format!(
            "t.toml:6:{col}: workers lists {} CPU core ids, at most {MAX_WORKERS} \
             (one worker per queue of the XDP program's socket map)",
            MAX_WORKERS + 1
        )
    );
}

// ----- structural errors (reported alone) -----

#[test]
fn syntax_error_is_reported_alone_with_its_location() {
    // Line 15 is bad; the weight on line 14 would be a validation error, but
    // syntax errors stop everything.
    let text = with_instance(
        "[[backend_service]]
name = \"web\"
protocol = \"tcp\"
[[backend_service.server]]
address = \"192.0.2.11\"
port = 8080
weight = 150
name = oops
",
    );
    assert_eq!(
        error(&text),
        "t.toml:14:8: invalid string, expected `\"`, `'`"
    );
    assert_eq!(
        error("[instance\nname = \"x\"\n"),
        "t.toml:1:10: invalid table header, expected `.`, `]`"
    );
    assert_eq!(
        error("\n\n\n\r\r\r\t\t\t"),
        "t.toml:4:1: invalid TOML: unexpected character '\\r'"
    );
    assert_eq!(
        error("[instance]\nname = \"x\"\nname = \"y\"\n"),
        "t.toml:3:1: duplicate key `name` in table `instance`"
    );
}

#[test]
fn unknown_keys_are_located() {
    assert_eq!(
        error(&with_instance("[[listener]]\nname = \"web\"\nvipp = \"192.0.2.1\"\n")),
        "t.toml:9:1: unknown key `vipp`, expected one of `name`, `vip`, `protocol`, `port`, `backend_service`"
    );
    assert_eq!(
        error(&format!("{INSTANCE}{WEB}wieght = 5\n")),
        "t.toml:20:1: unknown key `wieght`, expected one of `address`, `port`, `weight`"
    );
    assert_eq!(
        error(&format!(
            "{INSTANCE}{WEB}[backend_service.health_check]\nkind = \"tcp\"\n"
        )),
        "t.toml:21:1: unknown key `kind`, expected one of `type`, `port`, `timeout`, `interval`, \
         `unhealthy_threshold`, `healthy_threshold`, `path`, `domain`, `http_codes`, `udp_payload`"
    );
    assert_eq!(
        error(&format!("{INSTANCE}[listeners]\n")),
        "t.toml:7:2: unknown key `listeners`, expected one of `instance`, `listener`, \
         `backend_service`, `availability_group`"
    );
}

/// The toml crate cannot give a dotted-key table the spans the loader
/// keeps, and says "expected a borrowed string": the loader names the
/// dotted key and the way to write it.
#[test]
fn dotted_keys_are_located_and_named() {
    let dotted = WEB.replace(
        "protocol = \"tcp\"\n[[backend_service.server]]",
        "protocol = \"tcp\"\nhealth_check.type = \"http\"\n[[backend_service.server]]",
    );
    assert_ne!(dotted, WEB);
    assert_eq!(
        error(&format!("{INSTANCE}{dotted}")),
        "t.toml:17:14: dotted key health_check.type is not supported: \
         write type = ... under [backend_service.health_check] instead"
    );
}

/// `[[backend_service.health_check]]`, written like the server tables
/// next to it, is an array: the loader says the check is one table.
/// (Serde reads a struct from an array of its values too, which made
/// this "invalid type: map, expected a string".)
#[test]
fn a_health_check_written_as_an_array_of_tables_is_named() {
    let want = "a table (written as a [backend_service.health_check] header)";
    assert_eq!(
        error(&format!(
            "{INSTANCE}{WEB}[[backend_service.health_check]]\ntype = \"http\"\n"
        )),
        format!("t.toml:20:1: invalid type: sequence, expected {want}")
    );
    let inline = WEB.replace(
        "protocol = \"tcp\"\n[[backend_service.server]]",
        "protocol = \"tcp\"\nhealth_check = [\"http\", 8080]\n[[backend_service.server]]",
    );
    assert_ne!(inline, WEB);
    assert_eq!(
        error(&format!("{INSTANCE}{inline}")),
        format!("t.toml:17:16: invalid type: sequence, expected {want}")
    );
}

/// The same mistake with `[[instance]]`.
#[test]
fn an_instance_written_as_an_array_of_tables_is_named() {
    let text = format!("{INSTANCE}{WEB}").replacen("[instance]", "[[instance]]", 1);
    assert!(text.starts_with("[[instance]]\n"), "{text}");
    assert_eq!(
        error(&text),
        "t.toml:1:1: invalid type: sequence, expected a table (written as an [instance] header)"
    );
}

#[test]
fn missing_keys_are_located_at_their_table() {
    assert_eq!(error(""), "t.toml:1:1: missing required table [instance]");
    assert_eq!(
        error("# nothing\n\n"),
        "t.toml:1:1: missing required table [instance]"
    );
    assert_eq!(
        error("[instance]\nname = \"x\"\nclient_interface = \"a\"\nbackend_interface = \"b\"\n"),
        "t.toml:1:1: missing required key `client_gateway`"
    );
    assert_eq!(
        error(&format!(
            "{INSTANCE}{WEB}\n[[backend_service]]\nname = \"x\"\n"
        )),
        "t.toml:21:1: missing required key `protocol`"
    );
    assert_eq!(
        error(&format!(
            "{INSTANCE}{WEB}[[backend_service.server]]\naddress = \"192.0.2.12\"\n"
        )),
        "t.toml:20:1: missing required key `port`"
    );
}

#[test]
fn wrong_value_types_are_located() {
    assert_eq!(
        error(&with_instance(
            "[[listener]]\nname = \"web\"\nport = \"80\"\n"
        )),
        "t.toml:9:8: invalid type: string \"80\", expected an integer"
    );
    assert_eq!(
        error(&with_instance(
            "[[listener]]\nname = \"web\"\nport = 80.5\n"
        )),
        "t.toml:9:8: invalid type: floating point `80.5`, expected an integer"
    );
    assert_eq!(
        error("[instance]\nname = 7\n"),
        "t.toml:2:8: invalid type: integer `7`, expected a string"
    );
    assert_eq!(
        error(&format!("{INSTANCE}[listener]\nname = \"web\"\n")),
        "t.toml:7:1: invalid type: map, expected an array of tables (written as [[...]] headers)"
    );
    assert_eq!(
        error("instance = 5\n"),
        "t.toml:1:12: invalid type: integer `5`, expected a table (written as an [instance] header)"
    );
    assert_eq!(
        error(&INSTANCE.replace("name = \"t\"", "name = \"t\"\nworkers = 3")),
        "t.toml:3:11: invalid type: integer `3`, expected an array"
    );
}

#[test]
fn garbage_never_panics() {
    let mut inputs: Vec<String> = [
        "",
        "\0",
        "\u{feff}",
        "\u{feff}[instance]",
        "[",
        "]]]]",
        "[[instance]]\nname = 1",
        "=",
        "a = [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]",
        "a = {{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{",
        "instance = []",
        "instance = [{}]",
        "listener = 1\n[instance]",
        "[instance]\nworkers = [[1]]",
        "[instance]\nworkers = [-1, 99999999999, 1.5]",
        "[instance]\nname = \"\u{1F600}\"\nclient_interface = \"\u{1F600}\u{1F600}\u{1F600}\u{1F600}\"",
        "\u{1F600} = \u{1F600}",
        "x = 1979-05-27T07:32:00Z",
        "[instance]\nflow_table_capacity = 9223372036854775807",
        "[instance]\nflow_table_capacity = -9223372036854775808",
        "[instance]\nflow_table_capacity = 9223372036854775808",
        "\n\n\n\r\r\r\t\t\t",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Every prefix of the demo config, and the demo with each line removed.
    let demo = DEFAULT_CONFIG;
    for (i, _) in demo.char_indices().step_by(7) {
        inputs.push(demo[..i].to_string());
    }
    let lines: Vec<&str> = demo.lines().collect();
    for skip in 0..lines.len() {
        let text: Vec<&str> = lines
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != skip)
            .map(|(_, l)| *l)
            .collect();
        inputs.push(text.join("\n"));
    }
    // Pseudo-random TOML-ish noise.
    let alphabet: Vec<char> = "[]{}=\",.\n #'\\0123456789abcdeinlstv:-_\u{e9}\u{1F600}\t\r"
        .chars()
        .collect();
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..300 {
        let mut s = String::new();
        for _ in 0..(seed % 200) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            s.push(alphabet[(seed % alphabet.len() as u64) as usize]);
        }
        inputs.push(format!("{INSTANCE}{s}"));
        inputs.push(s);
    }
    for text in &inputs {
        match load(text) {
            Ok(_) => {}
            Err(ConfigError::Invalid(list)) => {
                assert!(!list.is_empty(), "no problems for {text:?}");
                for e in &list {
                    assert!(e.line >= 1 && e.col >= 1, "{e} for {text:?}");
                    assert!(
                        e.line <= text.lines().count().max(1) + 1,
                        "{e} for {text:?}"
                    );
                    assert!(
                        !e.message.is_empty() && !e.message.contains('\n'),
                        "{e:?} for {text:?}"
                    );
                }
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
}

// ----- instance -----

#[test]
fn tcp_closed_timeout_is_at_most_the_idle_timeout() {
    // The keys start on line 7.
    let config = |keys: &str| format!("{INSTANCE}{keys}\n{WEB}");
    // Absent: 60 s, or the idle timeout when that is shorter.
    let c = ok(&config("flow_idle_timeout = 30"));
    assert_eq!(c.instance.tcp_closed_timeout, 30);
    let c = ok(&config("flow_idle_timeout = 300\ntcp_closed_timeout = 300"));
    assert_eq!(c.instance.tcp_closed_timeout, 300);
    assert_eq!(
        errors(&config("flow_idle_timeout = 30\ntcp_closed_timeout = 31")),
        vec![
            "t.toml:8:22: tcp_closed_timeout 31 is longer than flow_idle_timeout 30 (a closed flow cannot outlive an idle one)"
        ]
    );
    assert_eq!(
        errors(&config("tcp_closed_timeout = 0")),
        vec!["t.toml:7:22: tcp_closed_timeout 0 is out of range (1-86400)"]
    );
}

#[test]
fn tcp_syn_timeout_is_at_most_the_idle_timeout() {
    // The keys start on line 7.
    let config = |keys: &str| format!("{INSTANCE}{keys}\n{WEB}");
    // Absent: 30 s, or the idle timeout when that is shorter.
    let c = ok(&config("flow_idle_timeout = 20"));
    assert_eq!(c.instance.tcp_syn_timeout, 20);
    let c = ok(&config("tcp_syn_timeout = 5"));
    assert_eq!(c.instance.tcp_syn_timeout, 5);
    assert_eq!(
        errors(&config("flow_idle_timeout = 30\ntcp_syn_timeout = 31")),
        vec![
            "t.toml:8:19: tcp_syn_timeout 31 is longer than flow_idle_timeout 30 (an opening flow cannot outlive an idle one)"
        ]
    );
    assert_eq!(
        errors(&config("tcp_syn_timeout = 86401")),
        vec!["t.toml:7:19: tcp_syn_timeout 86401 is out of range (1-86400)"]
    );
}

#[test]
fn instance_errors() {
    let text = "[instance]
name = \"my instance\"
mode = \"dsr\"
client_interface = \"a-very-long-interface-name\"
backend_interface = \"eth/1\"
client_gateway = \"10.0.0\"
attach = \"xdp\"
bind = \"zerocopy\"
workers = [1, 1024, 1, -1]
flow_table_capacity = 100
flow_idle_timeout = 86401
control_socket = \"\"
";
    assert_eq!(
        errors(text),
        vec![
            "t.toml:2:8: instance name \"my instance\" is invalid (1-64 characters: letters, digits, '.', '_' and '-')",
            "t.toml:3:8: unknown forwarding mode \"dsr\" (allowed: nat)",
            "t.toml:4:20: client_interface \"a-very-long-interface-name\" is not a valid interface name (1-15 bytes, no '/', ':' or whitespace)",
            "t.toml:5:21: backend_interface \"eth/1\" is not a valid interface name (1-15 bytes, no '/', ':' or whitespace)",
            "t.toml:6:18: client_gateway \"10.0.0\" is not a valid IPv4 or IPv6 address",
            "t.toml:7:10: unknown attach mode \"xdp\" (allowed: native, skb)",
            "t.toml:8:8: unknown bind mode \"zerocopy\" (allowed: auto, copy, zero_copy)",
            "t.toml:9:15: CPU core id 1024 is out of range (0-1023)",
            "t.toml:9:21: CPU core id 1 is listed twice in workers (one worker per core)",
            "t.toml:9:24: CPU core id -1 is out of range (0-1023)",
            "t.toml:10:23: flow_table_capacity 100 is out of range (1024-67108864)",
            "t.toml:11:21: flow_idle_timeout 86401 is out of range (10-86400)",
            "t.toml:12:18: control_socket must not be empty",
        ]
    );
}

#[test]
fn interfaces_must_differ() {
    assert_eq!(
        error(&INSTANCE.replace("\"b0\"", "\"c0\"")),
        "t.toml:4:21: backend_interface \"c0\" is the same as client_interface (they must be different interfaces)"
    );
}

#[test]
fn interface_name_rules() {
    for bad in [
        "",
        "has space",
        "a:b",
        ".",
        "..",
        "sixteen-chars-xx",
        "tab\t",
    ] {
        let text = INSTANCE.replace("\"c0\"", &format!("{bad:?}"));
        assert_eq!(
            error(&text),
            format!(
                "t.toml:3:20: client_interface {bad:?} is not a valid interface name (1-15 bytes, no '/', ':' or whitespace)"
            )
        );
    }
    for good in ["fifteen-chars-x", "veth0@if3", "lb-c", "e"] {
        ok(&INSTANCE.replace("\"c0\"", &format!("{good:?}")));
    }
}

#[test]
fn workers_must_not_be_empty() {
    assert_eq!(
        error(&INSTANCE.replace("name = \"t\"", "name = \"t\"\nworkers = []")),
        "t.toml:3:11: workers must list at least one CPU core id (one worker per entry)"
    );
    let c = ok(&INSTANCE.replace("name = \"t\"", "name = \"t\"\nworkers = [1023, 0]"));
    assert_eq!(c.instance.workers, vec![1023, 0]);
}

#[test]
fn instance_range_limits_are_inclusive() {
    let c = ok(&INSTANCE.replace(
        "name = \"t\"",
        "name = \"t\"\nflow_table_capacity = 67108864\nflow_idle_timeout = 10",
    ));
    assert_eq!(c.instance.flow_table_capacity, 67_108_864);
    assert_eq!(c.instance.flow_idle_timeout, 10);
    let c = ok(&INSTANCE.replace(
        "name = \"t\"",
        "name = \"t\"\nflow_table_capacity = 1024\nflow_idle_timeout = 86400",
    ));
    assert_eq!(c.instance.flow_table_capacity, 1024);
    assert_eq!(c.instance.flow_idle_timeout, 86_400);
    assert_eq!(
        errors(&INSTANCE.replace(
            "name = \"t\"",
            "name = \"t\"\nflow_table_capacity = 1023\nflow_idle_timeout = 9"
        )),
        vec![
            "t.toml:3:23: flow_table_capacity 1023 is out of range (1024-67108864)",
            "t.toml:4:21: flow_idle_timeout 9 is out of range (10-86400)",
        ]
    );
}

#[test]
fn gateway_must_be_unicast() {
    for (bad, why) in [
        ("0.0.0.0", "the unspecified address"),
        ("::", "the unspecified address"),
        ("224.0.0.1", "a multicast address"),
        ("ff02::1", "a multicast address"),
        ("255.255.255.255", "the broadcast address"),
    ] {
        assert_eq!(
            error(&INSTANCE.replace("10.0.0.1", bad)),
            format!("t.toml:5:18: client_gateway {bad} is {why} (must be a unicast address)")
        );
    }
}

#[test]
fn control_socket_length() {
    let long = format!("/{}", "s".repeat(107));
    assert_eq!(
        error(&INSTANCE.replace(
            "name = \"t\"",
            &format!("name = \"t\"\ncontrol_socket = \"{long}\"")
        )),
        "t.toml:3:18: control_socket path is 108 bytes long (at most 107)"
    );
    let fits = &long[..107];
    let c = ok(&INSTANCE.replace(
        "name = \"t\"",
        &format!("name = \"t\"\ncontrol_socket = \"{fits}\""),
    ));
    assert_eq!(c.instance.control_socket, PathBuf::from(fits));
}

#[test]
fn neighbour_errors() {
    let text = with_instance(
        "[[instance.neighbour]]
address = \"10.0.0.1\"
mac = \"02:00:00:00:00:01\"

[[instance.neighbour]]
address = \"10.0.0.1\"
mac = \"02-00-00-00-00-02\"

[[instance.neighbour]]
address = \"10.0.0.2\"
mac = \"01:00:5e:00:00:01\"

[[instance.neighbour]]
address = \"ff02::1\"
mac = \"02:00:00:00:00:0g\"

[[instance.neighbour]]
address = \"10.0.0.3\"
mac = \"00:00:00:00:00:00\"

[[instance.neighbour]]
address = \"10.0.0.4\"
mac = \"02:00:00:00:00:01:02\"
",
    );
    assert_eq!(
        errors(&text),
        vec![
            "t.toml:12:11: static neighbour 10.0.0.1 is listed twice (first at line 8)",
            "t.toml:13:7: mac \"02-00-00-00-00-02\" is not a valid MAC address (expected six hex bytes like \"02:00:00:00:00:01\")",
            "t.toml:17:7: mac 01:00:5e:00:00:01 is not a unicast MAC address",
            "t.toml:20:11: address ff02::1 is a multicast address (must be a unicast address)",
            "t.toml:21:7: mac \"02:00:00:00:00:0g\" is not a valid MAC address (expected six hex bytes like \"02:00:00:00:00:01\")",
            "t.toml:25:7: mac 00:00:00:00:00:00 is not a unicast MAC address",
            "t.toml:29:7: mac \"02:00:00:00:00:01:02\" is not a valid MAC address (expected six hex bytes like \"02:00:00:00:00:01\")",
        ]
    );
}

// ----- listeners -----

#[test]
fn listener_errors() {
    // Lines 7-19: WEB, line 20 blank, then more listeners.
    let text = format!(
        "{INSTANCE}{WEB}
[[listener]]
name = \"web\"
vip = \"192.0.2.2\"
protocol = \"tcp\"
port = 0
backend_service = \"wbe\"

[[listener]]
name = \"web-again\"
vip = \"192.0.2.1\"
protocol = \"tcp\"
port = 80
backend_service = \"web\"

[[listener]]
name = \"web-udp\"
vip = \"192.0.2.1\"
protocol = \"udp\"
port = 80
backend_service = \"web\"

[[listener]]
name = \"bad-vip\"
vip = \"224.1.2.3\"
protocol = \"sctp\"
port = 65536
backend_service = \"web\"
"
    );
    assert_eq!(
        errors(&text),
        vec![
            "t.toml:22:8: duplicate listener name \"web\" (first defined at line 8)",
            "t.toml:25:8: port 0 is out of range (1-65535)",
            "t.toml:26:19: unknown backend service \"wbe\" (defined: web)",
            "t.toml:30:7: listener \"web-again\" uses tcp 192.0.2.1:80 already taken by listener \"web\" (line 8)",
            "t.toml:38:12: listener protocol udp does not match backend service \"web\" protocol tcp (NAT cannot change the L4 protocol)",
            "t.toml:44:7: vip 224.1.2.3 is a multicast address (must be a unicast address)",
            "t.toml:45:12: unknown protocol \"sctp\" (allowed: tcp, udp)",
            "t.toml:46:8: port 65536 is out of range (1-65535)",
        ]
    );
}

#[test]
fn unknown_backend_service_lists_defined_ones() {
    let text = format!(
        "{INSTANCE}{WEB}
[[backend_service]]
name = \"echo\"
protocol = \"udp\"
[[backend_service.server]]
address = \"192.0.2.11\"
port = 7
"
    )
    .replace("backend_service = \"web\"", "backend_service = \"wbe\"");
    assert_eq!(
        error(&text),
        "t.toml:12:19: unknown backend service \"wbe\" (defined: web, echo)"
    );
    let text = with_instance(
        "[[listener]]\nname = \"l\"\nvip = \"192.0.2.1\"\nprotocol = \"tcp\"\nport = 1\nbackend_service = \"x\"\n",
    );
    assert_eq!(
        error(&text),
        "t.toml:12:19: unknown backend service \"x\" (defined: none)"
    );
}

#[test]
fn vip_rules() {
    for (vip, why) in [
        ("0.0.0.0", "the unspecified address"),
        ("::", "the unspecified address"),
        ("ff05::2", "a multicast address"),
    ] {
        let text = format!("{INSTANCE}{WEB}").replace("\"192.0.2.1\"", &format!("{vip:?}"));
        assert_eq!(
            error(&text),
            format!("t.toml:9:7: vip {vip} is {why} (must be a unicast address)")
        );
    }
    let text = format!("{INSTANCE}{WEB}").replace("\"192.0.2.1\"", "\"192.0.2.1/32\"");
    assert_eq!(
        error(&text),
        "t.toml:9:7: vip \"192.0.2.1/32\" is not a valid IPv4 or IPv6 address"
    );
}

#[test]
fn protocol_is_case_insensitive_and_displays_lowercase() {
    let text = format!("{INSTANCE}{WEB}").replace("protocol = \"tcp\"", "protocol = \"TCP\"");
    let c = ok(&text);
    assert_eq!(c.listeners[0].protocol, Protocol::Tcp);
    assert_eq!(c.services[0].protocol, Protocol::Tcp);
    assert_eq!(Protocol::Tcp.to_string(), "tcp");
    assert_eq!(Protocol::Udp.to_string(), "udp");
    assert_eq!(BindMode::ZeroCopy.to_string(), "zero_copy");
    assert_eq!(
        Scheduler::WeightedLeastConnections.to_string(),
        "weighted_least_connections"
    );
}

#[test]
fn same_port_on_other_protocol_or_vip_is_fine() {
    let c = ok(&format!(
        "{INSTANCE}{WEB}
[[listener]]
name = \"other-vip\"
vip = \"192.0.2.2\"
protocol = \"tcp\"
port = 80
backend_service = \"web\"

[[listener]]
name = \"dns\"
vip = \"192.0.2.1\"
protocol = \"udp\"
port = 80
backend_service = \"dns\"

[[backend_service]]
name = \"dns\"
protocol = \"udp\"
[[backend_service.server]]
address = \"192.0.2.11\"
port = 80
"
    ));
    assert_eq!(c.listeners.len(), 3);
    assert_eq!(c.listeners[2].service, 1);
}

#[test]
fn server_family_must_match_listener_vips() {
    // Line 22: the service's own server; line 28: the group's.
    let text = format!(
        "{INSTANCE}{WEB}[[backend_service.server]]
address = \"2001:db8::12\"
port = 8080

[[availability_group]]
name = \"g\"
[[availability_group.server]]
address = \"2001:db8::13\"
port = 8080
"
    )
    .replace(
        "protocol = \"tcp\"\n[[",
        "protocol = \"tcp\"\navailability_groups = [\"g\"]\n[[",
    );
    assert_eq!(
        errors(&text),
        vec![
            "t.toml:22:11: server address 2001:db8::12 is of the wrong family: backend service \"web\" is used by IPv4 listener \"web\" (line 8)",
            "t.toml:28:11: server address 2001:db8::13 is of the wrong family (from availability group \"g\"): backend service \"web\" is used by IPv4 listener \"web\" (line 8)",
        ]
    );
}

#[test]
fn listeners_of_one_service_share_a_family() {
    let text = format!(
        "{INSTANCE}{WEB}
[[listener]]
name = \"web6\"
vip = \"2001:db8::1\"
protocol = \"tcp\"
port = 80
backend_service = \"web\"
"
    );
    assert_eq!(
        error(&text),
        "t.toml:26:19: backend service \"web\" is used by IPv4 listener \"web\" (line 8) and IPv6 listener \"web6\"; the listeners of a service must share one address family"
    );
}

#[test]
fn too_many_listeners() {
    let mut text = format!(
        "{INSTANCE}[[backend_service]]
name = \"s\"
protocol = \"udp\"
[[backend_service.server]]
address = \"192.0.2.11\"
port = 7
"
    );
    // Lines 7-12 above; each listener takes one line from line 13 on.
    for port in 1..=MAX_LISTENERS {
        text.push_str(&format!("[[listener]]\nname = \"l{port}\"\nvip = \"192.0.2.1\"\nprotocol = \"udp\"\nport = {port}\nbackend_service = \"s\"\n"));
    }
    assert_eq!(ok(&text).listeners.len(), MAX_LISTENERS);
    text.push_str("[[listener]]\nname = \"one-too-many\"\nvip = \"192.0.2.1\"\nprotocol = \"udp\"\nport = 9999\nbackend_service = \"s\"\n");
    let line = 13 + 6 * MAX_LISTENERS;
    assert_eq!(
        error(&text),
        format!("t.toml:{line}:1: too many listeners: 1025 (at most 1024)")
    );
}

// ----- backend services -----

#[test]
fn backend_service_errors() {
    let text = with_instance(
        "[[backend_service]]
name = \"web\"
protocol = \"tcp\"
scheduler = \"round_robin\"
persistence_timeout = 10
availability_groups = [\"g\", \"nope\"]
[[backend_service.server]]
address = \"192.0.2.11\"
port = 0
weight = 150
[[backend_service.server]]
address = \"192.0.2.12\"
port = 80
[[backend_service.server]]
address = \"192.0.2.12\"
port = 80
weight = 101

[[backend_service]]
name = \"web\"
protocol = \"tcp\"

[[availability_group]]
name = \"g\"
[[availability_group.server]]
address = \"192.0.2.12\"
port = 80
",
    );
    assert_eq!(
        errors(&text),
        vec![
            "t.toml:10:13: unknown scheduler \"round_robin\" (allowed: weighted_source_ip, weighted_round_robin, weighted_least_connections)",
            "t.toml:11:23: persistence_timeout 10 is out of range (0 = off, or 30-3600)",
            "t.toml:12:24: server 192.0.2.12:80 from availability group \"g\" is already in backend service \"web\" (line 18)",
            "t.toml:12:29: unknown availability group \"nope\" (defined: g)",
            "t.toml:15:8: port 0 is out of range (1-65535)",
            "t.toml:16:10: weight 150 is out of range (0-100)",
            "t.toml:21:11: server 192.0.2.12:80 is listed twice in backend service \"web\" (first at line 18)",
            "t.toml:23:10: weight 101 is out of range (0-100)",
            "t.toml:26:8: duplicate backend service name \"web\" (first defined at line 8)",
            "t.toml:26:8: backend service \"web\" has no servers (add [[backend_service.server]] entries or availability_groups)",
        ]
    );
}

#[test]
fn weight_out_of_range_example() {
    // The example from the interface description: weight on line 14, col 10.
    let text = with_instance(
        "[[backend_service]]
name = \"web\"
protocol = \"tcp\"
[[backend_service.server]]
address = \"192.0.2.11\"
port = 8080
weight = 150
",
    );
    let err = Config::from_str(&text, "bad.toml").unwrap_err();
    assert_eq!(
        err.to_string(),
        "bad.toml:13:10: weight 150 is out of range (0-100)"
    );
    let text = text.replace("weight = 150", "weight = 100\nweight2 = 1");
    assert_eq!(
        Config::from_str(&text, "bad.toml").unwrap_err().to_string(),
        "bad.toml:14:1: unknown key `weight2`, expected one of `address`, `port`, `weight`"
    );
}

#[test]
fn persistence_timeout_values() {
    for (value, expect) in [("0", None), ("30", Some(30)), ("3600", Some(3600))] {
        let text = format!("{INSTANCE}{WEB}").replace(
            "protocol = \"tcp\"\n[[",
            &format!("protocol = \"tcp\"\npersistence_timeout = {value}\n[["),
        );
        assert_eq!(ok(&text).services[0].persistence_timeout, expect, "{value}");
    }
    for value in ["29", "3601", "-1"] {
        let text = format!("{INSTANCE}{WEB}").replace(
            "protocol = \"tcp\"\n[[",
            &format!("protocol = \"tcp\"\npersistence_timeout = {value}\n[["),
        );
        assert_eq!(
            error(&text),
            format!(
                "t.toml:17:23: persistence_timeout {value} is out of range (0 = off, or 30-3600)"
            )
        );
    }
}

#[test]
fn unknown_group_does_not_also_report_no_servers() {
    let text = with_instance(
        "[[backend_service]]
name = \"s\"
protocol = \"tcp\"
availability_groups = [\"nope\"]
",
    );
    assert_eq!(
        error(&text),
        "t.toml:10:24: unknown availability group \"nope\" (defined: none)"
    );
}

#[test]
fn group_listed_twice_in_a_service() {
    let text = with_instance(
        "[[backend_service]]
name = \"s\"
protocol = \"tcp\"
availability_groups = [\"g\", \"g\"]

[[availability_group]]
name = \"g\"
[[availability_group.server]]
address = \"192.0.2.12\"
port = 80
",
    );
    assert_eq!(
        error(&text),
        "t.toml:10:29: availability group \"g\" is listed twice in backend service \"s\""
    );
}

#[test]
fn duplicate_server_across_two_groups() {
    let text = with_instance(
        "[[backend_service]]
name = \"s\"
protocol = \"tcp\"
availability_groups = [\"a\", \"b\"]

[[availability_group]]
name = \"a\"
[[availability_group.server]]
address = \"192.0.2.12\"
port = 80

[[availability_group]]
name = \"b\"
[[availability_group.server]]
address = \"192.0.2.12\"
port = 80
",
    );
    assert_eq!(
        error(&text),
        "t.toml:10:29: server 192.0.2.12:80 from availability group \"b\" is already in backend service \"s\" (line 15)"
    );
}

#[test]
fn too_many_servers() {
    // One group of 2049 servers used by two services: 4098 servers.
    let mut text = with_instance(
        "[[backend_service]]
name = \"a\"
protocol = \"tcp\"
availability_groups = [\"big\"]

[[backend_service]]
name = \"b\"
protocol = \"tcp\"
availability_groups = [\"big\"]

[[availability_group]]
name = \"big\"
",
    );
    for i in 0..2049u32 {
        text.push_str(&format!(
            "[[availability_group.server]]\naddress = \"10.1.{}.{}\"\nport = 80\n",
            i / 256,
            i % 256
        ));
    }
    assert_eq!(
        error(&text),
        "t.toml:13:8: too many servers: 4098 across all backend services after expanding availability groups (at most 4096)"
    );
    // 2048 servers twice is exactly the limit.
    let cut = text.rfind("[[availability_group.server]]").unwrap();
    let c = ok(&text[..cut]);
    let total: usize = c.services.iter().map(|s| s.servers.len()).sum();
    assert_eq!(total, MAX_SERVERS);
}

#[test]
fn server_address_rules() {
    let text = format!("{INSTANCE}{WEB}").replace("\"192.0.2.11\"", "\"192.0.2.256\"");
    assert_eq!(
        error(&text),
        "t.toml:18:11: server address \"192.0.2.256\" is not a valid IPv4 or IPv6 address"
    );
    let text = format!("{INSTANCE}{WEB}").replace("\"192.0.2.11\"", "\"0.0.0.0\"");
    assert_eq!(
        error(&text),
        "t.toml:18:11: server address 0.0.0.0 is the unspecified address (must be a unicast address)"
    );
    let text = format!("{INSTANCE}{WEB}").replace("\"192.0.2.11\"", "\"::ffff:192.0.2.11\"");
    assert_eq!(
        error(&text),
        "t.toml:18:11: server address ::ffff:192.0.2.11 is an IPv4-mapped IPv6 address, \
         which never appears on the wire (write 192.0.2.11)"
    );
    let text = format!("{INSTANCE}{WEB}").replace("\"192.0.2.11\"", "\"fe80::11\"");
    assert_eq!(
        error(&text),
        "t.toml:18:11: server address fe80::11 is an IPv6 link-local address \
         (must be a global or unique local address)"
    );
}

#[test]
fn a_vip_cannot_be_ipv4_mapped_or_link_local_but_a_gateway_may_be_link_local() {
    let vip = |addr: &str| {
        format!("{INSTANCE}{WEB}").replacen("vip = \"192.0.2.1\"", &format!("vip = \"{addr}\""), 1)
    };
    assert!(vip("192.0.2.1").contains("192.0.2.1"));
    let text = vip("::ffff:192.0.2.1");
    assert!(text.contains("::ffff:192.0.2.1"), "the test edits the VIP");
    assert_eq!(
        errors(&text)[0],
        "t.toml:9:7: vip ::ffff:192.0.2.1 is an IPv4-mapped IPv6 address, \
         which never appears on the wire (write 192.0.2.1)"
    );
    assert_eq!(
        errors(&vip("fe80::1"))[0],
        "t.toml:9:7: vip fe80::1 is an IPv6 link-local address \
         (must be a global or unique local address)"
    );
    // An IPv6 default gateway is usually link-local: that is fine.
    let text = format!("{INSTANCE}{WEB}")
        .replace(
            "client_gateway = \"10.0.0.1\"",
            "client_gateway = \"fe80::1\"",
        )
        .replace("\"192.0.2.1\"", "\"2001:2::1\"")
        .replace("\"192.0.2.11\"", "\"2001:2::11\"");
    assert_eq!(ok(&text).instance.client_gateway, ip("fe80::1"));
}

// ----- health checks -----

/// How a path message ends when the path has a blank or control character.
const NO_BLANKS: &str =
    "(no whitespace or control characters: percent-encode them, like %20 for a space)";

fn with_health_check(lines: &str) -> String {
    // WEB ends on line 19; the [backend_service.health_check] header is
    // line 20, so the first check key is on line 21.
    format!("{INSTANCE}{WEB}[backend_service.health_check]\n{lines}")
}

#[test]
fn health_check_ranges() {
    let text = with_health_check(
        "type = \"ping\"
port = 0
timeout = 0
interval = 51
unhealthy_threshold = 1
healthy_threshold = 11
",
    );
    assert_eq!(
        errors(&text),
        vec![
            "t.toml:21:8: unknown health check type \"ping\" (allowed: tcp, http, udp)",
            "t.toml:22:8: port 0 is out of range (1-65535)",
            "t.toml:23:11: timeout 0 is out of range (1-300)",
            "t.toml:24:12: interval 51 is out of range (1-50)",
            "t.toml:25:23: unhealthy_threshold 1 is out of range (2-10)",
            "t.toml:26:21: healthy_threshold 11 is out of range (2-10)",
        ]
    );
    assert_eq!(
        error(&with_health_check("timeout = 301\n")),
        "t.toml:21:11: timeout 301 is out of range (1-300)"
    );
    let c = ok(&with_health_check(
        "timeout = 50\ninterval = 50\nunhealthy_threshold = 10\nhealthy_threshold = 10\nport = 65535\n",
    ));
    let hc = &c.services[0].health_check;
    assert_eq!((hc.timeout, hc.interval), (50, 50));
    assert_eq!((hc.unhealthy_threshold, hc.healthy_threshold), (10, 10));
    assert_eq!(hc.port, Some(65535));
    assert_eq!(hc.kind, HealthCheckKind::Tcp);
}

#[test]
fn timeout_must_not_exceed_interval() {
    assert_eq!(
        error(&with_health_check("timeout = 6\n")),
        "t.toml:21:11: timeout 6s exceeds interval 5s (timeout must not exceed interval)"
    );
    assert_eq!(
        error(&with_health_check("interval = 10\ntimeout = 11\n")),
        "t.toml:22:11: timeout 11s exceeds interval 10s (timeout must not exceed interval)"
    );
    assert_eq!(
        error(&with_health_check("interval = 1\n")),
        "t.toml:21:12: interval 1s is shorter than timeout 2s (timeout must not exceed interval)"
    );
}

#[test]
fn http_only_keys() {
    let text = with_health_check("type = \"udp\"\npath = \"/\"\ndomain = \"x.example\"\n");
    assert_eq!(
        errors(&text),
        vec![
            "t.toml:22:8: path is only valid for http health checks (this check is type \"udp\")",
            "t.toml:23:10: domain is only valid for http health checks (this check is type \"udp\")",
        ]
    );
    // The default type is tcp.
    assert_eq!(
        error(&with_health_check("path = \"/x\"\n")),
        "t.toml:21:8: path is only valid for http health checks (this check is type \"tcp\")"
    );
    let c = ok(&with_health_check("type = \"http\"\n"));
    assert_eq!(c.services[0].health_check.path.as_deref(), Some("/"));
    assert_eq!(c.services[0].health_check.domain, None);
}

#[test]
fn http_path_and_domain_rules() {
    // Each message names what is wrong with the path. (Once a bug: a
    // control character got "must start with '/', at most 1024 bytes, no
    // whitespace", three rules the path kept.)
    let long = format!("/{}", "a".repeat(1024));
    for (bad, why) in [
        (
            "healthz",
            "path \"healthz\" must start with '/'".to_string(),
        ),
        ("", "path \"\" must start with '/'".to_string()),
        ("/a b", format!("path \"/a b\" contains ' ' {NO_BLANKS}")),
        ("/\t", format!("path \"/\\t\" contains '\\t' {NO_BLANKS}")),
        (
            "/a\u{7f}b",
            format!("path \"/a\\u{{7f}}b\" contains '\\u{{7f}}' {NO_BLANKS}"),
        ),
        (
            "/\u{a0}",
            format!("path {:?} contains {:?} {NO_BLANKS}", "/\u{a0}", '\u{a0}'),
        ),
        (&long, "path is 1025 bytes long (at most 1024)".to_string()),
        (
            "/caf\u{e9}",
            "path \"/caf\u{e9}\" contains '\u{e9}' (ASCII only, and no '#': \
             percent-encode it, %C3%A9)"
                .to_string(),
        ),
        (
            "/a#b",
            "path \"/a#b\" contains '#' (ASCII only, and no '#': percent-encode it, %23)"
                .to_string(),
        ),
    ] {
        let value = toml_edit::Value::from(bad).to_string();
        assert_eq!(
            error(&with_health_check(&format!(
                "type = \"http\"\npath = {value}\n"
            ))),
            format!("t.toml:22:8: {why}")
        );
    }
    let long_label = "a".repeat(64);
    let long_name = ["a".repeat(63).as_str(); 4].join("."); // 255 characters
    for bad in [
        "",
        "a b",
        "under_score",
        "x/y",
        "\u{e9}.example",
        "-",
        "-web.example",
        "web-.example",
        "web..example",
        ".example",
        "example..",
        &long_label,
        &long_name,
    ] {
        assert_eq!(
            error(&with_health_check(&format!("type = \"http\"\ndomain = {bad:?}\n"))),
            format!(
                "t.toml:22:10: domain {bad:?} is invalid (a host name of at most 253 characters: \
                 labels of 1-63 letters, digits and '-', not starting or ending with '-', joined by '.')"
            )
        );
    }
    // The longest name and label, a final dot (also after the longest
    // name: the 253 characters do not count it), digits only (an IPv4
    // address): all valid.
    let longest = ["a".repeat(63).as_str(); 4].join(".")[..253].to_string();
    let longest_dot = format!("{longest}.");
    for good in [
        longest.as_str(),
        longest_dot.as_str(),
        "web.example.",
        "198.18.2.11",
        "x",
        "a-b.c-d",
    ] {
        let c = ok(&with_health_check(&format!(
            "type = \"http\"\ndomain = {good:?}\n"
        )));
        assert_eq!(c.services[0].health_check.domain.as_deref(), Some(good));
    }
    let c = ok(&with_health_check(
        "type = \"http\"\npath = \"/status?x=1&y=%20\"\ndomain = \"Web-1.example.COM\"\n",
    ));
    assert_eq!(
        c.services[0].health_check.path.as_deref(),
        Some("/status?x=1&y=%20")
    );
    assert_eq!(
        c.services[0].health_check.domain.as_deref(),
        Some("Web-1.example.COM")
    );
}

#[test]
fn http_codes_default_and_forms() {
    let codes = |lines: &str| {
        ok(&with_health_check(lines)).services[0]
            .health_check
            .http_codes
            .clone()
    };
    assert_eq!(codes("type = \"http\"\n"), vec![(200, 399)]);
    assert_eq!(
        codes("type = \"http\"\nhttp_codes = \"200,204,300-302\"\n"),
        vec![(200, 200), (204, 204), (300, 302)]
    );
    assert_eq!(
        codes("type = \"http\"\nhttp_codes = \" 200 , 301 - 302 \"\n"),
        vec![(200, 200), (301, 302)]
    );
    assert_eq!(
        codes("type = \"http\"\nhttp_codes = \"100-599,200\"\n"),
        vec![(100, 599), (200, 200)]
    );
    // Other check types have none.
    assert_eq!(codes("type = \"tcp\"\n"), Vec::<(u16, u16)>::new());
    assert_eq!(codes("type = \"udp\"\n"), Vec::<(u16, u16)>::new());
}

#[test]
fn http_codes_errors() {
    const FORM: &str =
        "expected codes or ranges separated by commas, like \"200-399\" or \"200,204,300-302\"";
    for (bad, why) in [
        ("", FORM.to_string()),
        ("2xx", FORM.to_string()),
        ("200,", FORM.to_string()),
        ("200;204", FORM.to_string()),
        ("200-", FORM.to_string()),
        ("-200", FORM.to_string()),
        ("200-300-400", FORM.to_string()),
        ("+200", FORM.to_string()),
        (
            "99-200",
            "status code 99 is out of range (100-599)".to_string(),
        ),
        (
            "200,600",
            "status code 600 is out of range (100-599)".to_string(),
        ),
        (
            "200,99999",
            "status code 99999 is out of range (100-599)".to_string(),
        ),
        (
            "399-200",
            "range 399-200 is backwards (write the lower code first)".to_string(),
        ),
    ] {
        assert_eq!(
            error(&with_health_check(&format!(
                "type = \"http\"\nhttp_codes = {bad:?}\n"
            ))),
            format!("t.toml:22:14: http_codes {bad:?} is invalid: {why}"),
            "{bad}"
        );
    }
}

#[test]
fn http_codes_only_for_http_checks() {
    assert_eq!(
        error(&with_health_check("http_codes = \"200\"\n")),
        "t.toml:21:14: http_codes is only valid for http health checks (this check is type \"tcp\")"
    );
    assert_eq!(
        error(&with_health_check("type = \"udp\"\nhttp_codes = \"200\"\n")),
        "t.toml:22:14: http_codes is only valid for http health checks (this check is type \"udp\")"
    );
    // An unknown type reports the type only.
    assert_eq!(
        error(&with_health_check("type = \"icmp\"\nhttp_codes = \"x\"\n")),
        "t.toml:21:8: unknown health check type \"icmp\" (allowed: tcp, http, udp)"
    );
}

#[test]
fn udp_payload_default_and_limits() {
    let payload = |lines: &str| {
        ok(&with_health_check(lines)).services[0]
            .health_check
            .udp_payload
            .clone()
    };
    assert_eq!(payload("type = \"udp\"\n").as_deref(), Some("l4lb-health"));
    assert_eq!(
        payload("type = \"udp\"\nudp_payload = \"PING\\n\"\n").as_deref(),
        Some("PING\n")
    );
    let max = "x".repeat(512);
    assert_eq!(
        payload(&format!("type = \"udp\"\nudp_payload = \"{max}\"\n")),
        Some(max)
    );
    assert_eq!(payload("type = \"tcp\"\n"), None);
    assert_eq!(payload("type = \"http\"\n"), None);

    assert_eq!(
        error(&with_health_check("type = \"udp\"\nudp_payload = \"\"\n")),
        "t.toml:22:15: udp_payload is 0 bytes long (must be 1-512 bytes)"
    );
    let long = "x".repeat(513);
    assert_eq!(
        error(&with_health_check(&format!(
            "type = \"udp\"\nudp_payload = \"{long}\"\n"
        ))),
        "t.toml:22:15: udp_payload is 513 bytes long (must be 1-512 bytes)"
    );
    // Bytes, not characters: 257 two-byte characters.
    let wide = "\u{e9}".repeat(257);
    assert_eq!(
        error(&with_health_check(&format!(
            "type = \"udp\"\nudp_payload = \"{wide}\"\n"
        ))),
        "t.toml:22:15: udp_payload is 514 bytes long (must be 1-512 bytes)"
    );
}

#[test]
fn udp_payload_only_for_udp_checks() {
    assert_eq!(
        error(&with_health_check("udp_payload = \"x\"\n")),
        "t.toml:21:15: udp_payload is only valid for udp health checks (this check is type \"tcp\")"
    );
    assert_eq!(
        errors(&with_health_check(
            "type = \"http\"\nudp_payload = \"x\"\nhttp_codes = \"200\"\n"
        )),
        vec!["t.toml:22:15: udp_payload is only valid for udp health checks (this check is type \"http\")"]
    );
}

#[test]
fn on_all_down_values() {
    let with = |value: &str| {
        format!("{INSTANCE}{WEB}").replace(
            "protocol = \"tcp\"\n[[",
            &format!("protocol = \"tcp\"\non_all_down = {value:?}\n[["),
        )
    };
    assert_eq!(ok(&with("drop")).services[0].on_all_down, AllDown::Drop);
    assert_eq!(
        ok(&with("fail_open")).services[0].on_all_down,
        AllDown::FailOpen
    );
    for bad in ["fail-open", "Drop", ""] {
        assert_eq!(
            error(&with(bad)),
            format!("t.toml:17:15: unknown on_all_down action {bad:?} (allowed: drop, fail_open)")
        );
    }
    assert_eq!(AllDown::Drop.to_string(), "drop");
    assert_eq!(AllDown::FailOpen.to_string(), "fail_open");
}

#[test]
fn persistence_table_settings() {
    let with = |lines: &str| INSTANCE.replace("name = \"t\"", &format!("name = \"t\"\n{lines}"));
    let c = ok(&with(
        "persistence_capacity = 1024\npersistence_when_full = \"no_record\"",
    ));
    assert_eq!(c.instance.persistence_capacity, 1024);
    assert_eq!(c.instance.persistence_when_full, WhenFull::NoRecord);
    let c = ok(&with(
        "persistence_capacity = 67108864\npersistence_when_full = \"evict_oldest\"",
    ));
    assert_eq!(c.instance.persistence_capacity, 67_108_864);
    assert_eq!(c.instance.persistence_when_full, WhenFull::EvictOldest);
    assert_eq!(
        errors(&with(
            "persistence_capacity = 1023\npersistence_when_full = \"lru\""
        )),
        vec![
            "t.toml:3:24: persistence_capacity 1023 is out of range (1024-67108864)",
            "t.toml:4:25: unknown persistence_when_full policy \"lru\" (allowed: evict_oldest, no_record)",
        ]
    );
    assert_eq!(
        error(&with("persistence_capacity = 67108865")),
        "t.toml:3:24: persistence_capacity 67108865 is out of range (1024-67108864)"
    );
    assert_eq!(
        error(&with("persistence_capacity = \"big\"")),
        "t.toml:3:24: invalid type: string \"big\", expected an integer"
    );
    assert_eq!(WhenFull::EvictOldest.to_string(), "evict_oldest");
    assert_eq!(WhenFull::NoRecord.to_string(), "no_record");
}

// ----- availability groups -----

#[test]
fn availability_group_errors() {
    let text = with_instance(
        "[[availability_group]]
name = \"g\"
[[availability_group.server]]
address = \"192.0.2.1\"
port = 80
[[availability_group.server]]
address = \"192.0.2.1\"
port = 80
weight = 200

[[availability_group]]
name = \"g\"

[[availability_group]]
name = \"bad name\"
[[availability_group.server]]
address = \"192.0.2.2\"
port = 80
",
    );
    assert_eq!(
        errors(&text),
        vec![
            "t.toml:13:11: server 192.0.2.1:80 is listed twice in availability group \"g\" (first at line 10)",
            "t.toml:15:10: weight 200 is out of range (0-100)",
            "t.toml:18:8: duplicate availability group name \"g\" (first defined at line 8)",
            "t.toml:18:8: availability group \"g\" has no servers (add [[availability_group.server]] entries)",
            "t.toml:21:8: availability group name \"bad name\" is invalid (1-64 characters: letters, digits, '.', '_' and '-')",
        ]
    );
}

#[test]
fn a_group_with_internal_duplicates_is_reported_once() {
    let text = with_instance(
        "[[backend_service]]
name = \"s\"
protocol = \"tcp\"
availability_groups = [\"g\"]

[[availability_group]]
name = \"g\"
[[availability_group.server]]
address = \"192.0.2.1\"
port = 80
[[availability_group.server]]
address = \"192.0.2.1\"
port = 80
",
    );
    assert_eq!(
        error(&text),
        "t.toml:18:11: server 192.0.2.1:80 is listed twice in availability group \"g\" (first at line 15)"
    );
}

#[test]
fn service_using_an_empty_group_reports_the_group_only() {
    let text = with_instance(
        "[[backend_service]]
name = \"s\"
protocol = \"tcp\"
availability_groups = [\"g\"]

[[availability_group]]
name = \"g\"
",
    );
    assert_eq!(
        error(&text),
        "t.toml:13:8: availability group \"g\" has no servers (add [[availability_group.server]] entries)"
    );
}

// ----- reporting -----

#[test]
fn all_problems_are_reported_in_file_order() {
    let err = Config::from_str(MANY_ERRORS, "many.toml").unwrap_err();
    assert_eq!(
        err.to_string(),
        "many.toml:4:21: backend_interface \"lb-c\" is the same as client_interface (they must be different interfaces)
many.toml:12:19: unknown backend service \"wbe\" (defined: web, echo)
many.toml:21:10: weight 150 is out of range (0-100)
many.toml:24:8: backend service \"echo\" has no servers (add [[backend_service.server]] entries or availability_groups)"
    );
    let ConfigError::Invalid(list) = err else {
        panic!("not Invalid")
    };
    assert_eq!(
        list[2],
        Located {
            file: "many.toml".to_string(),
            line: 21,
            col: 10,
            message: "weight 150 is out of range (0-100)".to_string(),
        }
    );
}

#[test]
fn columns_count_characters_not_bytes() {
    let text = with_instance(
        "[[backend_service]]
name = \"s\"
protocol = \"tcp\"
availability_groups = [\"\u{e9}t\u{e9}\", \"\u{1F600}\", \"nope\"]
[[backend_service.server]]
address = \"192.0.2.1\"
port = 80
",
    );
    assert_eq!(
        errors(&text),
        vec![
            "t.toml:10:24: unknown availability group \"\u{e9}t\u{e9}\" (defined: none)",
            "t.toml:10:31: unknown availability group \"\u{1F600}\" (defined: none)",
            "t.toml:10:36: unknown availability group \"nope\" (defined: none)",
        ]
    );
}

// ----- files -----

/// A file in a directory of its own, both removed when dropped (even when
/// the test fails).
struct TempFile {
    dir: PathBuf,
    path: PathBuf,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn temp_file(name: &str, contents: &[u8]) -> TempFile {
    let dir = std::env::temp_dir().join(format!("l4lb-config-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    TempFile { dir, path }
}

#[test]
fn from_file_reads_and_names_the_file() {
    let good = temp_file("good.toml", DEFAULT_CONFIG.as_bytes());
    assert_eq!(Config::from_file(&good.path).unwrap(), ok(DEFAULT_CONFIG));

    let bad = temp_file("bad.toml", MANY_ERRORS.as_bytes());
    let path = &bad.path;
    let err = Config::from_file(path).unwrap_err();
    let first = err.to_string().lines().next().unwrap().to_string();
    assert_eq!(
        first,
        format!(
            "{}:4:21: backend_interface \"lb-c\" is the same as client_interface (they must be different interfaces)",
            path.display()
        )
    );
}

#[test]
fn from_file_io_errors() {
    let path = Path::new("/nonexistent/l4lb/config.toml");
    let err = Config::from_file(path).unwrap_err();
    assert!(matches!(err, ConfigError::Io { .. }));
    assert!(
        err.to_string()
            .starts_with("/nonexistent/l4lb/config.toml: "),
        "{err}"
    );
}

#[test]
fn from_file_rejects_invalid_utf8_with_location() {
    let mut bytes = b"[instance]\nname = \"a".to_vec();
    bytes.extend_from_slice(&[0xff, b'"', b'\n']);
    let file = temp_file("latin1.toml", &bytes);
    let path = &file.path;
    let err = Config::from_file(path).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{}:2:10: the file is not valid UTF-8", path.display())
    );
}

/// A reload that changes a restart-only key names the line that sets it:
/// the value's position, or the `[instance]` header's for a key the file
/// leaves out.
#[test]
fn instance_key_positions_point_at_the_value_or_the_header() {
    let text = format!("# a comment\n{INSTANCE}workers = [0, 1]\n\n{WEB}");
    let workers_line = text.lines().position(|l| l.starts_with("workers")).unwrap() + 1;
    assert_eq!(
        Config::instance_key_position(&text, "workers"),
        Some((workers_line, 11))
    );
    assert_eq!(
        Config::instance_key_position(&text, "client_interface"),
        Some((4, 20))
    );
    // Left out: the header.
    assert_eq!(
        Config::instance_key_position(&text, "flow_table_capacity"),
        Some((2, 1))
    );
    assert_eq!(
        Config::instance_key_position("not = [toml", "workers"),
        None
    );
}
