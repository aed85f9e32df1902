//! The network-namespace harness for integration tests: builds the topology
//! of scripts/netns.sh, runs the real `l4lb` binary in the load balancer's
//! namespace and the harness's backends and client driver in theirs, and
//! tears everything down on drop, even when a test fails.
//!
//! These tests need root. Without it they fail with a clear message; they
//! never pass by skipping.

#![allow(dead_code)]

use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub const L4LB: &str = env!("CARGO_BIN_EXE_l4lb");
pub const HARNESS: &str = env!("CARGO_BIN_EXE_l4lb-harness");
pub const SOURCES: &str = "198.18.4.1-198.18.7.238";
/// The same 1000 clients' IPv6 addresses (scripts/netns.sh numbers them
/// 2001:2:0:4::1 up, in hex).
pub const SOURCES6: &str = "2001:2:0:4::1-2001:2:0:4::3e8";
pub const N_SOURCES: usize = 1000;

/// The namespaces are global: one test at a time uses them.
static NETNS: Mutex<()> = Mutex::new(());

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[derive(Debug, Clone, Deserialize)]
pub struct DriveResult {
    pub source: String,
    pub proto: String,
    pub target: String,
    pub backend: Option<String>,
    pub seen_peer: Option<String>,
    pub reply_from: Option<String>,
    pub ok: bool,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Drive {
    pub requests: usize,
    pub failures: usize,
    pub results: Vec<DriveResult>,
}

impl Drive {
    /// source → backends seen, for one target.
    pub fn by_source(&self, target: &str) -> BTreeMap<String, Vec<String>> {
        let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in self.results.iter().filter(|r| r.target == target) {
            m.entry(r.source.clone())
                .or_default()
                .push(r.backend.clone().unwrap_or_else(|| "(failed)".into()));
        }
        m
    }

    pub fn failures_text(&self) -> String {
        self.results
            .iter()
            .filter(|r| !r.ok)
            .take(10)
            .map(|r| format!("{} -> {}: {:?}", r.source, r.target, r.error))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

pub struct Topology {
    _guard: MutexGuard<'static, ()>,
    backends: HashMap<String, Child>,
    lb: Option<Child>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
}

fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Topology {
    /// Builds the topology with `clients` source addresses and starts the
    /// three backends.
    pub fn up(test: &str, clients: usize) -> Topology {
        Self::up_with_queues(test, clients, 1)
    }

    /// Like [`Topology::up`], with `queues` RX/TX queues on every veth.
    pub fn up_with_queues(test: &str, clients: usize, queues: u32) -> Topology {
        let guard = NETNS.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "the netns tests need root (network namespaces, XDP): run `sudo scripts/test.sh`"
        );
        let dir = std::env::temp_dir().join(format!("l4lb-test-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let socket = dir.join("ctl.sock");
        let mut t = Topology {
            _guard: guard,
            backends: HashMap::new(),
            lb: None,
            config: dir.join("l4lb.toml"),
            dir,
            socket,
        };
        run_ok(
            Command::new(root().join("scripts/netns.sh")).args([
                "up",
                "--clients",
                &clients.to_string(),
                "--queues",
                &queues.to_string(),
            ]),
            "scripts/netns.sh up",
        );
        for b in ["b1", "b2", "b3"] {
            t.start_backend(b, &[]);
        }
        t
    }

    /// Stops backend `name`'s server process (its namespace stays).
    pub fn stop_backend(&mut self, name: &str) {
        if let Some(mut c) = self.backends.remove(name) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts (or restarts) backend `name` (b1..b3) with extra serve args.
    pub fn start_backend(&mut self, name: &str, extra: &[&str]) {
        self.stop_backend(name);
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &format!("l4lb-{name}"),
                HARNESS,
                "serve",
                "--name",
                name,
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting a backend");
        self.backends.insert(name.to_string(), child);
        // Wait until it listens (bounded).
        let deadline = Instant::now() + Duration::from_secs(5);
        let addr = format!("198.18.2.1{}:8080", &name[1..]);
        while Instant::now() < deadline {
            let ok = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &format!("l4lb-{name}"),
                    "ss",
                    "-ltnH",
                    "sport",
                    "= :8080",
                ])
                .output()
                .map(|o| !o.stdout.is_empty())
                .unwrap_or(false);
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("backend {name} ({addr}) did not start listening");
    }

    /// The demo config with this test's control socket, plus `edit`.
    pub fn config_text(&self, edit: impl Fn(String) -> String) -> String {
        self.config_file_text("l4lb.toml", edit)
    }

    /// `config/<file>` with this test's control socket, plus `edit`.
    pub fn config_file_text(&self, file: &str, edit: impl Fn(String) -> String) -> String {
        let path = root().join("config").join(file);
        let base =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let with_socket = base.replacen(
            "[instance]\n",
            &format!(
                "[instance]\ncontrol_socket = \"{}\"\n",
                self.socket.display()
            ),
            1,
        );
        edit(with_socket)
    }

    /// Starts l4lb on `config` and waits until its control socket answers.
    pub fn start_lb(&mut self, config: &str) {
        self.spawn_lb(config);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(st) = self.lb.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("l4lb exited during start-up ({st}):\n{}", self.lb_log());
            }
            if self.socket.exists() && self.try_stats().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("l4lb did not come up within 15 s:\n{}", self.lb_log());
    }

    /// Starts l4lb on `config`, logging to `l4lb.log`, without waiting.
    pub fn spawn_lb(&mut self, config: &str) {
        std::fs::write(&self.config, config).expect("writing the config");
        let log = std::fs::File::create(self.dir.join("l4lb.log")).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", "l4lb-lb", L4LB, "run", "-c"])
            .arg(&self.config)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting l4lb");
        self.lb = Some(child);
    }

    /// The running l4lb's pid (`ip netns exec` execs it).
    pub fn lb_pid(&self) -> u32 {
        self.lb.as_ref().expect("l4lb running").id()
    }

    /// Sends `sig` to the running l4lb and leaves it running.
    pub fn kill_lb(&self, sig: i32) {
        let child = self.lb.as_ref().expect("l4lb running");
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
    }

    /// Waits up to `limit` for l4lb to exit on its own; its exit status, or
    /// None if it is still running (it is then left running).
    pub fn wait_lb_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            let child = self.lb.as_mut().expect("l4lb running");
            if let Some(st) = child.try_wait().expect("wait") {
                self.lb = None;
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sets the MTU of link `dev` in namespace `ns`.
    pub fn set_mtu(ns: &str, dev: &str, mtu: u32) {
        let mtu = mtu.to_string();
        run_ok(
            Command::new("ip").args(["-n", ns, "link", "set", "dev", dev, "mtu", &mtu]),
            &format!("ip -n {ns} link set dev {dev} mtu {mtu}"),
        );
    }

    /// Sets the MTU of every link a flow crosses: the client's veth,
    /// both of l4lb's, the switch's ports and bridge, and the backends'.
    pub fn set_path_mtu(&self, mtu: u32) {
        let mut links = vec![
            ("l4lb-client", "cl0".to_string()),
            ("l4lb-lb", "lb-c".to_string()),
            ("l4lb-lb", "lb-b".to_string()),
            ("l4lb-sw", "sw-lb".to_string()),
        ];
        for k in 1..=3 {
            links.push(("l4lb-sw", format!("sw-b{k}")));
        }
        links.push(("l4lb-sw", "br0".to_string()));
        for ns in ["l4lb-b1", "l4lb-b2", "l4lb-b3"] {
            links.push((ns, "eth0".to_string()));
        }
        for (ns, dev) in links {
            Self::set_mtu(ns, &dev, mtu);
        }
    }

    /// Runs l4lb on `config`, which must make it fail at start-up, and
    /// returns its exit status and output. Bounded: an l4lb still running
    /// after 10 s is killed and the test fails.
    pub fn run_lb_expecting_failure(&self, config: &str) -> std::process::Output {
        std::fs::write(&self.config, config).expect("writing the config");
        let mut child = Command::new("ip")
            .args(["netns", "exec", "l4lb-lb", L4LB, "run", "-c"])
            .arg(&self.config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting l4lb");
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("l4lb started, and was expected to fail");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().expect("l4lb output")
    }

    pub fn lb_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("l4lb.log")).unwrap_or_default()
    }

    /// Sends `sig` to l4lb and waits (bounded) for it to exit; returns its
    /// exit status.
    pub fn signal_lb(&mut self, sig: i32) -> std::process::ExitStatus {
        let mut child = self.lb.take().expect("l4lb running");
        // `ip netns exec` execs l4lb, so the child pid is l4lb's.
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("l4lb did not exit within 10 s of signal {sig}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn try_stats(&self) -> Option<serde_json::Value> {
        let out = Command::new(L4LB)
            .args(["stats", "--json", "-s"])
            .arg(&self.socket)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn stats(&self) -> serde_json::Value {
        self.try_stats()
            .unwrap_or_else(|| panic!("l4lb stats failed; log:\n{}", self.lb_log()))
    }

    /// Runs the client driver in the client namespace.
    pub fn drive(&self, tcp: &[&str], udp: &[&str], sources: &str, conns: u32) -> Drive {
        self.drive_with(tcp, udp, sources, conns, &[])
    }

    /// Spawns the driver (for traffic that runs while the test acts).
    pub fn drive_spawn(
        &self,
        tcp: &[&str],
        udp: &[&str],
        sources: &str,
        conns: u32,
        extra: &[&str],
    ) -> Child {
        drive_cmd_in(CLIENT_NS, tcp, udp, sources, conns, extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning l4lb-harness drive")
    }

    /// Waits for a spawned driver and parses its report.
    pub fn drive_wait(child: Child) -> Drive {
        let out = child.wait_with_output().expect("drive output");
        assert!(
            out.status.success(),
            "l4lb-harness drive failed: {}",
            out.status
        );
        serde_json::from_slice(&out.stdout).expect("drive output is JSON")
    }

    pub fn drive_with(
        &self,
        tcp: &[&str],
        udp: &[&str],
        sources: &str,
        conns: u32,
        extra: &[&str],
    ) -> Drive {
        run_drive(&mut drive_cmd_in(
            CLIENT_NS, tcp, udp, sources, conns, extra,
        ))
    }

    /// [`Topology::drive_with`] from namespace `ns` instead of the client's
    /// (the load balancer's host itself, say).
    pub fn drive_in(&self, ns: &str, udp: &[&str], sources: &str, extra: &[&str]) -> Drive {
        run_drive(&mut drive_cmd_in(ns, &[], udp, sources, 1, extra))
    }

    /// Runs `l4lb reload` against this instance: (exit code, stdout, stderr).
    pub fn reload(&self) -> (i32, String, String) {
        let out = Command::new(L4LB)
            .args(["reload", "-s"])
            .arg(&self.socket)
            .output()
            .expect("l4lb reload");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Writes `text` as the running instance's config and reloads it;
    /// panics unless the reload succeeds.
    pub fn apply(&self, text: &str) {
        std::fs::write(&self.config, text).expect("writing the config");
        let (code, out, err) = self.reload();
        assert_eq!(code, 0, "reload failed:\nstdout: {out}\nstderr: {err}");
    }

    /// The stats entry of backend `name` (e.g. "198.18.2.12:8080/tcp").
    pub fn backend_stats(&self, name: &str) -> serde_json::Value {
        let st = self.stats();
        st["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .find(|b| b["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no backend {name} in stats: {st}"))
    }

    /// Waits (bounded) until backend `name`'s `up` is `up`; returns how long
    /// it took.
    pub fn wait_backend_up(&self, name: &str, up: bool, limit: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let b = self.backend_stats(name);
            if b["up"].as_bool() == Some(up) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "backend {name} not {} within {limit:?}: {b}",
                if up { "up" } else { "down" }
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `l4lb simulate` for these clients: client → backend address:port.
    pub fn simulate(
        &self,
        config: &Path,
        listener: &str,
        clients: &[String],
    ) -> HashMap<String, String> {
        use std::io::Write;
        let mut child = Command::new(L4LB)
            .args(["simulate", "-c"])
            .arg(config)
            .args(["--listener", listener])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("l4lb simulate");
        {
            let mut stdin = child.stdin.take().expect("stdin");
            for c in clients {
                writeln!(stdin, "{c}").expect("write");
            }
        }
        let out = child.wait_with_output().expect("simulate output");
        assert!(out.status.success(), "l4lb simulate failed");
        String::from_utf8(out.stdout)
            .expect("utf8")
            .lines()
            .map(|l| {
                let (c, b) = l.split_once(' ').expect("CLIENT BACKEND");
                (c.to_string(), b.to_string())
            })
            .collect()
    }

    /// Whether an XDP program is attached to `dev` in the lb namespace.
    pub fn xdp_attached(dev: &str) -> bool {
        let out = run_ok(
            Command::new("ip").args(["-n", "l4lb-lb", "link", "show", "dev", dev]),
            "ip link show",
        );
        out.contains("xdp")
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Some(mut c) = self.lb.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for c in self.backends.values_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new(root().join("scripts/netns.sh"))
            .arg("down")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `f` on a thread of its own inside network namespace `ns`.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    use std::os::fd::AsRawFd;
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on an open namespace file; it moves only this
        // thread, which ends with `f`.
        let ret = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(ret, 0, "setns {path}");
        f()
    })
}

/// Backend name (b1..b3) → its address in the harness.
pub fn backend_addr(name: &str, port: u16) -> String {
    format!("198.18.2.1{}:{port}", &name[1..])
}

/// Backend name (b1..b3) → its IPv6 address in the harness.
pub fn backend_addr6(name: &str, port: u16) -> String {
    format!("[2001:2:0:2::1{}]:{port}", &name[1..])
}

/// Where the clients are.
const CLIENT_NS: &str = "l4lb-client";

/// Runs a driver to the end and reads its report.
fn run_drive(cmd: &mut Command) -> Drive {
    let out = run_ok(cmd, "l4lb-harness drive");
    serde_json::from_str(&out).expect("drive output is JSON")
}

/// The `l4lb-harness drive` command, run in namespace `ns`.
fn drive_cmd_in(
    ns: &str,
    tcp: &[&str],
    udp: &[&str],
    sources: &str,
    conns: u32,
    extra: &[&str],
) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, HARNESS, "drive", "--json"]);
    if !tcp.is_empty() {
        cmd.args(["--vip-tcp", &tcp.join(",")]);
    }
    if !udp.is_empty() {
        cmd.args(["--vip-udp", &udp.join(",")]);
    }
    cmd.args(["--sources", sources, "--conns", &conns.to_string()]);
    if !extra.contains(&"--parallel") {
        cmd.args(["--parallel", "64"]);
    }
    cmd.args(extra);
    cmd
}
