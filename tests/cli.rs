//! The `l4lb` binary as a user runs it: arguments, stdin, files, exit codes
//! (0 ok, 1 runtime failure, 2 invalid config or input) and exact output.

mod common;

use common::*;
use l4lb::config::Config;
use l4lb::control::snapshot::{Links, Snapshot};
use pcap_file::pcap::{PcapPacket, PcapReader, PcapWriter};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const DEMO_CONFIG: &str = "config/l4lb.toml";

/// What `rules import` adds when no instance answers on the config's
/// control socket.
const OLD_SOCKET: &str = "if l4lb was started before that control_socket was set, it \
                          listens on its old one until restarted (reload it with `l4lb \
                          reload --socket`)";

/// Runs `l4lb ARGS` in `dir` with `stdin`, logging off.
fn l4lb_in(dir: &Path, args: &[&str], stdin: impl AsRef<[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_l4lb"))
        .args(args)
        .current_dir(dir)
        .env_remove("L4LB_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start l4lb");
    // A command that fails before reading its input (an unknown listener)
    // may exit before this write: a broken pipe is its outcome, not the
    // test's failure.
    if let Err(e) = child.stdin.take().unwrap().write_all(stdin.as_ref()) {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "write stdin: {e}");
    }
    child.wait_with_output().expect("wait for l4lb")
}

/// Runs `l4lb ARGS` from the crate root (where `config/` and `tests/` are).
fn l4lb(args: &[&str], stdin: impl AsRef<[u8]>) -> Output {
    l4lb_in(Path::new(env!("CARGO_MANIFEST_DIR")), args, stdin)
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("UTF-8 stdout")
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).expect("UTF-8 stderr")
}

/// A user-facing failure: no panic, no `Debug` dump of an error value.
fn assert_clean_failure(o: &Output) {
    let err = stderr(o);
    for debug in ["panicked", "Error {", "Os {", "RUST_BACKTRACE"] {
        assert!(!err.contains(debug), "stderr shows {debug:?}:\n{err}");
    }
}

#[test]
fn help_lists_every_command() {
    let o = l4lb(&["--help"], "");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    let commands: Vec<&str> = out
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for c in ["run", "check", "simulate", "stats", "replay"] {
        assert!(commands.contains(&c), "{c} missing from:\n{out}");
    }
}

#[test]
fn check_prints_a_one_line_summary_of_a_valid_config() {
    let o = l4lb(&["check", "-c", DEMO_CONFIG], "");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "config/l4lb.toml: ok: demo: 3 listeners, 2 backend services, 6 servers, \
         1 worker, nat mode on lb-c/lb-b\n"
    );
    assert_eq!(stderr(&o), "");
}

#[test]
fn the_dual_stack_example_config_is_valid() {
    let o = l4lb(&["check", "-c", "config/dual-stack.toml"], "");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "config/dual-stack.toml: ok: dual-stack: 4 listeners, 3 backend services, 8 servers, \
         1 worker, nat mode on lb-c/lb-b\n"
    );
}

/// Four problems, each on a line of its own: an unknown backend service, a
/// duplicate listener, a weight out of range, a server of the wrong family.
const BROKEN: &str = r#"[instance]
name = "broken"
client_interface = "lb-c"
backend_interface = "lb-b"
client_gateway = "198.18.0.2"

[[listener]]
name = "web"
vip = "198.18.100.1"
protocol = "tcp"
port = 80
backend_service = "nosuch"

[[listener]]
name = "web2"
vip = "198.18.100.1"
protocol = "tcp"
port = 80
backend_service = "web"

[[backend_service]]
name = "web"
protocol = "tcp"

  [[backend_service.server]]
  address = "198.18.2.11"
  port = 8080
  weight = 150

  [[backend_service.server]]
  address = "2001:2::11"
  port = 8080
"#;

#[test]
fn check_reports_every_problem_of_a_broken_config_at_its_line_and_column() {
    let dir = TempDir::new("check");
    std::fs::write(dir.path("broken.toml"), BROKEN).unwrap();
    let o = l4lb_in(&dir.0, &["check", "-c", "broken.toml"], "");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(stdout(&o), "");
    assert_clean_failure(&o);
    // Each position is that of the offending value (line 12 col 19 is the
    // opening quote of "nosuch").
    assert_eq!(
        stderr(&o),
        concat!(
            "broken.toml:12:19: unknown backend service \"nosuch\" (defined: web)\n",
            "broken.toml:16:7: listener \"web2\" uses tcp 198.18.100.1:80 already taken ",
            "by listener \"web\" (line 8)\n",
            "broken.toml:28:12: weight 150 is out of range (0-100)\n",
            "broken.toml:31:13: server address 2001:2::11 is of the wrong family: backend ",
            "service \"web\" is used by IPv4 listener \"web2\" (line 15)\n",
        )
    );
}

#[test]
fn check_locates_a_toml_syntax_error() {
    let dir = TempDir::new("syntax");
    std::fs::write(
        dir.path("syntax.toml"),
        "[instance]\nname = \"x\"\nclient_interface = lb-c\n",
    )
    .unwrap();
    let o = l4lb_in(&dir.0, &["check", "-c", "syntax.toml"], "");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_clean_failure(&o);
    let err = stderr(&o);
    // The unquoted value `lb-c` starts at line 3, column 20.
    assert!(err.starts_with("syntax.toml:3:20: "), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn check_of_a_missing_file_fails_naming_the_path() {
    let dir = TempDir::new("missing");
    let path = dir.path("nope.toml");
    let path = path.to_str().unwrap();
    let o = l4lb(&["check", "-c", path], "");
    // Not an invalid config but a failure to read one: a runtime error.
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(stdout(&o), "");
    assert_clean_failure(&o);
    let err = stderr(&o);
    assert!(
        err.starts_with(&format!("l4lb: {path}: No such file or directory")),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// The OS error of an unreadable config is printed once. (Once a defect:
/// `ConfigError::Io` both printed its source and returned it as its error
/// source, so main's `{:#}` printed it twice.)
#[test]
fn check_of_a_missing_file_names_the_os_error_once() {
    let dir = TempDir::new("missing-once");
    let path = dir.path("nope.toml");
    let path = path.to_str().unwrap();
    let o = l4lb(&["check", "-c", path], "");
    assert_eq!(
        stderr(&o),
        format!("l4lb: {path}: No such file or directory (os error 2)\n")
    );
}

/// The server a client reaches through `listener` of the demo config,
/// computed by the library's scheduler (what the data plane calls).
fn picked(listener: &str, client: [u8; 4]) -> String {
    let cfg = Config::from_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join(DEMO_CONFIG))
        .expect("demo config");
    let snap = Snapshot::offline(&cfg, Links::default(), &|_| None).expect("snapshot");
    let l = snap.listeners.iter().find(|l| l.name == listener).unwrap();
    let be = &snap.backends[snap.pick(l.service, &client).unwrap() as usize];
    std::net::SocketAddr::new(be.address, be.port).to_string()
}

#[test]
fn simulate_prints_one_server_per_client_as_the_data_plane_would_pick() {
    let input = "198.18.4.1\n198.18.4.2:5555\n\n# comment\n";
    let args = ["simulate", "-c", DEMO_CONFIG, "--listener", "web"];
    let first = l4lb(&args, input);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    assert_eq!(stderr(&first), "");
    let out = stdout(&first);

    let expected = format!(
        "198.18.4.1 {}\n198.18.4.2:5555 {}\n",
        picked("web", [198, 18, 4, 1]),
        picked("web", [198, 18, 4, 2])
    );
    assert_eq!(out, expected);
    for line in out.lines() {
        let server = line.split(' ').nth(1).unwrap();
        assert!(
            ["198.18.2.11:8080", "198.18.2.12:8080", "198.18.2.13:8080"].contains(&server),
            "{line}"
        );
    }
    let second = l4lb(&args, input);
    assert_eq!(stdout(&second), out, "same input, same answer");
}

#[test]
fn simulate_reports_bad_lines_by_number_and_exits_2() {
    let o = l4lb(
        &["simulate", "-c", DEMO_CONFIG, "--listener", "web"],
        b"198.18.4.1\nnot-an-address\n2001:2::1\n\xff\xfe\n198.18.4.2\r\n".as_slice(),
    );
    assert_eq!(o.status.code(), Some(2));
    assert_clean_failure(&o);
    assert_eq!(
        stdout(&o),
        format!(
            "198.18.4.1 {}\n198.18.4.2 {}\n",
            picked("web", [198, 18, 4, 1]),
            picked("web", [198, 18, 4, 2])
        ),
        "good lines are still answered"
    );
    assert_eq!(
        stderr(&o),
        "<stdin>:2: \"not-an-address\" is not an address or address:port\n\
         <stdin>:3: 2001:2::1 is not of the family of listener web (198.18.100.1)\n\
         <stdin>:4: the line is not valid UTF-8\n"
    );
}

#[test]
fn simulate_through_an_unknown_listener_lists_the_defined_ones() {
    let o = l4lb(
        &["simulate", "-c", DEMO_CONFIG, "--listener", "nope"],
        "198.18.4.1\n",
    );
    assert_eq!(o.status.code(), Some(2));
    assert_clean_failure(&o);
    assert_eq!(stdout(&o), "");
    assert_eq!(
        stderr(&o),
        "l4lb: no listener \"nope\" (defined: web, web-alt, echo)\n"
    );
}

fn write_pcap(path: &Path, frames: &[(Duration, &[u8], u32)]) {
    let mut w = PcapWriter::new(std::fs::File::create(path).unwrap()).unwrap();
    for (ts, data, orig_len) in frames {
        w.write_packet(&PcapPacket::new(*ts, *orig_len, data))
            .unwrap();
    }
}

fn read_pcap(path: &Path) -> Vec<(Duration, Vec<u8>)> {
    let mut r = PcapReader::new(std::fs::File::open(path).unwrap()).unwrap();
    let mut out = Vec::new();
    while let Some(p) = r.next_packet() {
        let p = p.unwrap();
        out.push((p.timestamp, p.data.to_vec()));
    }
    out
}

#[test]
fn replay_writes_the_rewritten_frames_and_counts_every_verdict() {
    let dir = TempDir::new("replay");
    let (input, output) = (dir.path("in.pcap"), dir.path("out.pcap"));
    let cfg = replay_config();
    let snap = Snapshot::offline(&cfg, Links::default(), &|_| None).unwrap();
    let be = &snap.backends[snap.pick(0, &CLIENT).unwrap() as usize];
    let std::net::IpAddr::V4(server) = be.address else {
        panic!("IPv4 server expected");
    };
    let server = server.octets();

    let c = Hop::from_client(CLIENT, 40000, VIP, 80);
    let s = Hop::from_server(server, 8080, CLIENT, 40000);
    let syn = tcp_syn(&c);
    let syn_ack = tcp_syn_ack(&s);
    let arp = arp_request(VIP);
    // Captured with a short snap length: the TCP header is cut.
    let cut = &syn[..14 + 20 + 10];
    let t = |ms| Duration::from_millis(ms);
    write_pcap(
        &input,
        &[
            (t(1_000), &syn, syn.len() as u32),
            (t(1_001), &syn_ack, syn_ack.len() as u32),
            (t(1_002), &arp, arp.len() as u32),
            (t(1_003), cut, syn.len() as u32),
        ],
    );

    let o = l4lb(
        &[
            "replay",
            "-c",
            REPLAY_CONFIG,
            "--in",
            input.to_str().unwrap(),
            "--out",
            output.to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stderr(&o), "");
    assert_eq!(
        stdout(&o),
        "frames 4\n\
         forwarded to backends 1\n\
         replies to clients 1\n\
         passed to kernel 1\n\
         dropped malformed 1\n"
    );

    let frames = read_pcap(&output);
    let want = [
        (t(1_000), tcp_syn(&c.to_server(server, 8080))),
        (t(1_001), tcp_syn_ack(&s.to_client(VIP, 80))),
    ];
    assert_eq!(frames.len(), want.len(), "only the forwarded frames");
    for (i, ((ts, got), (want_ts, want))) in frames.iter().zip(&want).enumerate() {
        assert_eq!(ts, want_ts, "frame {i}: the input's timestamp");
        assert!(got == want, "frame {i}: {}", first_difference(got, want));
    }
}

#[test]
fn replay_of_a_file_that_is_not_a_pcap_fails_naming_it() {
    let dir = TempDir::new("replay-bad");
    let (input, output) = (dir.path("in.pcap"), dir.path("out.pcap"));
    std::fs::write(&input, "not a capture").unwrap();
    let input = input.to_str().unwrap();
    let o = l4lb(
        &[
            "replay",
            "-c",
            REPLAY_CONFIG,
            "--in",
            input,
            "--out",
            output.to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(o.status.code(), Some(1));
    assert_clean_failure(&o);
    assert_eq!(stdout(&o), "");
    let err = stderr(&o);
    assert!(
        err.starts_with(&format!("l4lb: {input}: not a pcap file")),
        "{err}"
    );
}

/// The demo config with a control socket of its own in `dir` (no instance
/// answers there), written to `dir/name`.
fn demo_config_in(dir: &TempDir, name: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(DEMO_CONFIG).unwrap();
    let sock = dir.path("none.sock");
    let text = text.replacen(
        "# control_socket = \"/run/l4lb/l4lb.sock\"",
        &format!("control_socket = {:?}", sock.to_str().unwrap()),
        1,
    );
    assert!(
        text.contains("none.sock"),
        "the demo config names its socket"
    );
    let path = dir.path(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn rules_import_keeps_the_configs_mode_and_owner_and_writes_through_a_link() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = TempDir::new("import-mode");
    let real = demo_config_in(&dir, "real.toml");
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o600)).unwrap();
    let owner = std::fs::metadata(&real).unwrap();
    let link = dir.path("link.toml");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let rules = dir.path("rules.txt");
    std::fs::write(&rules, "80 TCP 300 HTTP 8080 2 5 3 2 / web.example\n").unwrap();

    let o = l4lb(
        &[
            "rules",
            "import",
            "-c",
            link.to_str().unwrap(),
            rules.to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        format!(
            "{}: applied 1 rule(s)\nno running instance ({} does not exist); {OLD_SOCKET}\n",
            link.display(),
            dir.path("none.sock").display()
        )
    );
    let meta = std::fs::symlink_metadata(&link).unwrap();
    assert!(meta.file_type().is_symlink(), "the link is still a link");
    let after = std::fs::metadata(&real).unwrap();
    assert_eq!(after.permissions().mode() & 0o7777, 0o600, "mode kept");
    assert_eq!((after.uid(), after.gid()), (owner.uid(), owner.gid()));
    let cfg = Config::from_file(&real).unwrap();
    let web = cfg.listeners.iter().find(|l| l.name == "web").unwrap();
    let svc = &cfg.services[web.service];
    assert_eq!(svc.persistence_timeout, Some(300), "the target was updated");
    assert_eq!(svc.health_check.domain.as_deref(), Some("web.example"));
    let names: Vec<String> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.contains("tmp")),
        "no temporary file left: {names:?}"
    );
}

#[test]
fn rules_import_of_a_file_that_is_not_utf8_is_bad_input_located_and_changes_nothing() {
    let dir = TempDir::new("import-utf8");
    let config = demo_config_in(&dir, "l4lb.toml");
    let before = std::fs::read(&config).unwrap();
    let rules = dir.path("rules.txt");
    std::fs::write(&rules, b"# ok\n80 TCP 0 HTTP 8080 2 5 3 2 /\xff -\n").unwrap();
    let (c, r) = (config.to_str().unwrap(), rules.to_str().unwrap());
    let o = l4lb(&["rules", "import", "-c", c, r], "");
    assert_eq!(o.status.code(), Some(2));
    assert_clean_failure(&o);
    assert_eq!(stderr(&o), format!("{r}:2: the file is not valid UTF-8\n"));
    assert_eq!(std::fs::read(&config).unwrap(), before);

    // A config that is not UTF-8: located as `check` locates it.
    let mut broken = before.clone();
    broken.extend_from_slice(b"# caf\xc3\xa9 \xe9\n");
    std::fs::write(&config, &broken).unwrap();
    std::fs::write(&rules, "80 TCP 0 HTTP 8080 2 5 3 2 / -\n").unwrap();
    let o = l4lb(&["rules", "import", "-c", c, r], "");
    assert_eq!(o.status.code(), Some(2));
    assert_clean_failure(&o);
    let last = 1 + before.iter().filter(|&&b| b == b'\n').count();
    let want = format!("{c}:{last}:8: the file is not valid UTF-8\n");
    assert_eq!(stderr(&o), want);
    let check = l4lb(&["check", "-c", c], "");
    assert_eq!(stderr(&check), want, "the same place as `check` names");
    assert_eq!(std::fs::read(&config).unwrap(), broken);
}

/// A UDP service without a health check table gets the default TCP
/// connect check, which marks a UDP-only server down: `check` still
/// accepts the file (exit 0) but warns, at the service's name; with the
/// table written out, there is no warning.
#[test]
fn check_warns_of_a_udp_service_left_with_the_default_tcp_check() {
    let dir = TempDir::new("udpcheck");
    let text = r#"[instance]
name = "u"
client_interface = "lb-c"
backend_interface = "lb-b"
client_gateway = "198.18.0.2"

[[listener]]
name = "dns"
vip = "198.18.100.1"
protocol = "udp"
port = 53
backend_service = "dns"

[[backend_service]]
name = "dns"
protocol = "udp"

  [[backend_service.server]]
  address = "198.18.2.11"
  port = 53
"#;
    std::fs::write(dir.path("u.toml"), text).unwrap();
    let o = l4lb_in(&dir.0, &["check", "-c", "u.toml"], "");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "u.toml: ok: u: 1 listener, 1 backend service, 1 server, 1 worker, nat mode on lb-c/lb-b\n"
    );
    assert_eq!(
        stderr(&o),
        "u.toml:15:8: warning: backend service \"dns\" is udp but has no \
         [backend_service.health_check]: the default is a TCP connect to each server's \
         port, and a server that does not accept TCP there is marked down; add the table \
         (type = \"udp\", or a tcp or http check on a port the servers listen on)\n"
    );
    let checked = text.replace(
        "protocol = \"udp\"\n\n  [[backend_service.server]]",
        "protocol = \"udp\"\n\n  [backend_service.health_check]\n  type = \"udp\"\n\n  [[backend_service.server]]",
    );
    assert_ne!(checked, text);
    std::fs::write(dir.path("u.toml"), checked).unwrap();
    let o = l4lb_in(&dir.0, &["check", "-c", "u.toml"], "");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stderr(&o), "");
}

/// A stand-in for a running instance on the control socket `path`: answers
/// each of `replies` in turn, one per connection, and hands back the
/// request lines it was sent (fewer if no more came within 10 s).
fn fake_instance(path: &Path, replies: &[&str]) -> std::thread::JoinHandle<Vec<String>> {
    use std::io::{BufRead, BufReader};
    let listener = std::os::unix::net::UnixListener::bind(path).expect("bind the fake socket");
    listener.set_nonblocking(true).unwrap();
    let replies: Vec<String> = replies.iter().map(|r| r.to_string()).collect();
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut asked = Vec::new();
        for reply in replies {
            let mut conn = loop {
                match listener.accept() {
                    Ok((conn, _)) => break conn,
                    Err(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(_) => return asked,
                }
            };
            conn.set_nonblocking(false).unwrap();
            let mut line = String::new();
            BufReader::new(&conn).read_line(&mut line).expect("request");
            asked.push(line.trim_end().to_string());
            conn.write_all(reply.as_bytes()).expect("reply");
        }
        asked
    })
}

/// `reload -c FILE` and `stats -c FILE` only look up the control socket in
/// FILE. A FILE that fails validation still names it: the instance is
/// asked, and the reload is refused by the instance itself, which logs the
/// errors (README, "Reload and drain"), rather than by the command alone.
#[test]
fn reload_and_stats_find_the_socket_in_a_config_that_fails_validation() {
    let dir = TempDir::new("ctl-invalid");
    let config = demo_config_in(&dir, "l4lb.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let broken = text.replacen("weight = 50", "weight = 150", 1);
    std::fs::write(&config, &broken).unwrap();
    let line = 1 + broken.lines().position(|l| l.contains("150")).unwrap();
    let c = config.to_str().unwrap();
    let check = l4lb(&["check", "-c", c], "");
    assert_eq!(check.status.code(), Some(2));
    let errors = format!("{c}:{line}:12: weight 150 is out of range (0-100)\n");
    assert_eq!(stderr(&check), errors);

    let refused = format!("error: {errors}");
    let instance = fake_instance(&dir.path("none.sock"), &[&refused, "{\"a\":1}"]);
    let reload = l4lb(&["reload", "-c", c], "");
    let stats = l4lb(&["stats", "--json", "-c", c], "");
    assert_eq!(
        instance.join().unwrap(),
        ["reload", "stats"],
        "the instance was asked"
    );
    assert_eq!(reload.status.code(), Some(2));
    assert_eq!(stderr(&reload), errors);
    assert_eq!(stats.status.code(), Some(0), "{}", stderr(&stats));
    assert_eq!(stdout(&stats), "{\"a\":1}\n");
    std::fs::remove_file(dir.path("none.sock")).unwrap();

    // With no instance there, the file's own errors are the answer.
    let o = l4lb(&["reload", "-c", c], "");
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stderr(&o), errors);
}

/// `control_socket` changes only when l4lb restarts: after it is edited,
/// `reload -c FILE` and `stats -c FILE` ask the new path, where nothing
/// listens yet. The error says why that may be and how to reach the
/// running instance; `--socket` with the old path reaches it.
#[test]
fn a_command_that_finds_no_instance_on_the_configs_socket_says_how_to_reach_one() {
    let dir = TempDir::new("ctl-moved");
    let config = demo_config_in(&dir, "l4lb.toml");
    let c = config.to_str().unwrap();
    let sock = dir.path("none.sock");
    for (args, req) in [
        (vec!["reload", "-c", c], "reload"),
        (vec!["stats", "-c", c], "stats"),
    ] {
        let o = l4lb(&args, "");
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert_eq!(
            stderr(&o),
            format!(
                "l4lb: nothing answers on the control socket {c} names; if l4lb was started \
                 before that control_socket was set, it listens on its old one until restarted \
                 (reach it with --socket): connecting to {} (is l4lb running, and are you root?): \
                 No such file or directory (os error 2)\n",
                sock.display()
            ),
            "{req}"
        );
    }
    // The instance's old socket, named with --socket.
    let old = dir.path("old.sock");
    let instance = fake_instance(&old, &["ok: reloaded\n"]);
    let o = l4lb(&["reload", "--socket", old.to_str().unwrap()], "");
    assert_eq!(instance.join().unwrap(), ["reload"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "reloaded\n");
    // Named with --socket, a missing socket gets no word about configs.
    let o = l4lb(&["stats", "--socket", sock.to_str().unwrap()], "");
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        format!(
            "l4lb: connecting to {} (is l4lb running, and are you root?): \
             No such file or directory (os error 2)\n",
            sock.display()
        )
    );
}

/// An import says how many of its rules changed the file: a rule already
/// in effect is applied, but counted apart.
#[test]
fn rules_import_counts_the_rules_already_in_effect_apart() {
    let dir = TempDir::new("import-count");
    let config = demo_config_in(&dir, "l4lb.toml");
    let c = config.to_str().unwrap();
    let rules = dir.path("rules.txt");
    // The demo's DNS rule as it stands, and its web rule with persistence.
    std::fs::write(
        &rules,
        "53 UDP 0 UDP 9053 2 5 3 2 - -\n80 TCP 300 HTTP 8080 2 5 3 2 / -\n",
    )
    .unwrap();
    let o = l4lb(&["rules", "import", "-c", c, rules.to_str().unwrap()], "");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        format!(
            "{c}: applied 2 rule(s), 1 of them changing it (the others already in effect)\n\
             no running instance ({} does not exist); {OLD_SOCKET}\n",
            dir.path("none.sock").display()
        )
    );
    let export = l4lb(&["rules", "export", "-c", c], "");
    assert!(
        stdout(&export).contains("\n80 TCP 300 HTTP 8080 2 5 3 2 / -\n"),
        "{}",
        stdout(&export)
    );
}

/// The running instance's refusal is quoted once, without the control
/// protocol's `error: ` prefix.
#[test]
fn rules_import_rejected_by_the_running_instance_says_why_and_exits_1() {
    let dir = TempDir::new("import-rejected");
    let config = demo_config_in(&dir, "l4lb.toml");
    let c = config.to_str().unwrap();
    let rules = dir.path("rules.txt");
    std::fs::write(&rules, "80 TCP 300 HTTP 8080 2 5 3 2 / -\n").unwrap();
    let why = format!(
        "{c}: instance.workers cannot change while running (restart l4lb); the running configuration is unchanged"
    );
    let instance = fake_instance(&dir.path("none.sock"), &[&format!("error: {why}\n")]);
    let o = l4lb(&["rules", "import", "-c", c, rules.to_str().unwrap()], "");
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout(&o), format!("{c}: applied 1 rule(s)\n"));
    assert_eq!(
        stderr(&o),
        format!("l4lb: {c} was updated, but the running instance rejected it: {why}\n")
    );
    assert_eq!(instance.join().unwrap(), ["reload"]);
}

/// A user who may write the config but not use the control socket (it is
/// root's, mode 0600) cannot tell whether an instance runs there: the
/// import wrote the file but did not reach the instance, and says so with
/// exit 1, not "no running instance" and 0.
#[test]
fn rules_import_that_may_not_use_the_control_socket_fails() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = TempDir::new("import-denied");
    let config = demo_config_in(&dir, "l4lb.toml");
    let rules = dir.path("rules.txt");
    std::fs::write(&rules, "80 TCP 300 HTTP 8080 2 5 3 2 / -\n").unwrap();
    let sock = dir.path("none.sock");
    let _instance = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let (c, r) = (config.to_str().unwrap(), rules.to_str().unwrap());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_l4lb"));
    cmd.args(["rules", "import", "-c", c, r])
        .env_remove("L4LB_LOG");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // Root may use any socket: the import runs as nobody, who owns
        // the config (and its directory, for the file written beside it).
        const NOBODY: u32 = 65534;
        for p in [&dir.0, &config, &rules] {
            std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
        }
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600)).unwrap();
        cmd.uid(NOBODY).gid(NOBODY);
    } else {
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    let o = cmd.output().unwrap();
    assert_eq!(
        stdout(&o),
        format!("{c}: applied 1 rule(s)\n"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        stderr(&o),
        format!(
            "l4lb: {c} was updated, but the running instance could not be asked to reload it: \
             connecting to {} (is l4lb running, and are you root?): Permission denied (os error 13)\n",
            sock.display()
        )
    );
    assert_eq!(o.status.code(), Some(1));
}
