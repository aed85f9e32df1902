//! The end-to-end benchmark's network namespaces, and running things in them.
//!
//! ```text
//!  l4lb-bench-gen          l4lb-bench-lb                        l4lb-bench-sink
//!  gen0 198.18.0.2 ─────── lbc 198.18.0.1    lbb 198.18.2.1 ─── sink0 198.18.2.2
//!  (BPF live-frame          (l4lb, the bare AF_XDP forwarder,     + backends 198.18.2.11..
//!   generator: XDP_TX)       or nftables)                         (XDP: count and drop)
//! ```
//! Both veth pairs have two queues. Everything is in namespaces named
//! `l4lb-bench-*` on 198.18.0.0/15; nothing in the host's namespace is
//! created or changed. IPv6 is off in the three namespaces, so that no
//! neighbour discovery frame reaches the sink's counters.

use anyhow::{bail, Context, Result};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{self, fmt_ip, fmt_mac, Mac};

pub const PREFIX: &str = "l4lb-bench-";
pub const NS_GEN: &str = "l4lb-bench-gen";
pub const NS_LB: &str = "l4lb-bench-lb";
pub const NS_SINK: &str = "l4lb-bench-sink";

pub const GEN_IF: &str = "gen0";
pub const LB_CLIENT_IF: &str = "lbc";
pub const LB_BACKEND_IF: &str = "lbb";
pub const SINK_IF: &str = "sink0";

pub const GEN_MAC: Mac = common::GATEWAY_MAC;
pub const LB_CLIENT_MAC: Mac = [0x02, 0xb0, 0, 0, 0, 0x02];
pub const LB_BACKEND_MAC: Mac = [0x02, 0xb0, 0, 0, 0, 0x03];
pub const SINK_MAC: Mac = [0x02, 0xb0, 0, 0, 0, 0x04];
pub const SINK_ADDR: [u8; 4] = [198, 18, 2, 2];

/// Runs a command; its stdout if it succeeds, an error with its stderr if
/// not.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS...`
/// Creates veth `name` in namespace `ns` with its peer `peer` in
/// `peer_ns`, both ends with 2 TX and 2 RX queues.
fn veth_pair(ns: &str, name: &str, peer: &str, peer_ns: &str) -> Result<String> {
    let queues = ["numtxqueues", "2", "numrxqueues", "2"];
    let mut args = vec!["-n", ns, "link", "add", name];
    args.extend(queues);
    args.extend(["type", "veth", "peer", "name", peer]);
    args.extend(queues);
    args.extend(["netns", peer_ns]);
    ip(&args)
}

pub fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// `ip netns exec NS ARGS...`
pub fn ns_exec(ns: &str, args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(["netns", "exec", ns]).args(args))
}

pub fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    ns_exec(ns, &["sysctl", "-qw", &format!("{key}={value}")]).map(|_| ())
}

/// Writes a sysfs file as seen from inside `ns` (`ip netns exec` mounts
/// that namespace's /sys).
pub fn write_sys(ns: &str, path: &str, value: &str) -> Result<()> {
    ns_exec(ns, &["sh", "-c", &format!("echo {value} > {path}")]).map(|_| ())
}

fn list_ns() -> Vec<String> {
    ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .map(str::to_string)
        .collect()
}

/// Stops the processes running in our namespaces (this driver started them:
/// l4lb, the bare forwarder), then deletes the namespaces. Their veths go
/// with them.
pub fn down() {
    let me = std::process::id().to_string();
    for ns in list_ns() {
        let pids: Vec<String> = ip(&["netns", "pids", &ns])
            .unwrap_or_default()
            .split_whitespace()
            .filter(|p| *p != me)
            .map(str::to_string)
            .collect();
        for p in &pids {
            if let Ok(pid) = p.parse::<i32>() {
                // SAFETY: plain kill(2) of a process in our own namespace.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for p in &pids {
            let path = format!("/proc/{p}");
            while std::path::Path::new(&path).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if std::path::Path::new(&path).exists() {
                if let Ok(pid) = p.parse::<i32>() {
                    // SAFETY: as above; it ignored SIGTERM for 5 s.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = ip(&["netns", "delete", &ns]);
    }
}

/// The topology; deleted on drop, even when the benchmark fails.
pub struct Topology {
    pub backends: usize,
}

impl Topology {
    pub fn up(backends: usize) -> Result<Topology> {
        down();
        let t = Topology { backends };
        t.build().context("building the benchmark's namespaces")?;
        Ok(t)
    }

    fn build(&self) -> Result<()> {
        for ns in [NS_GEN, NS_LB, NS_SINK] {
            ip(&["netns", "add", ns])?;
            // Before any link exists, so that new links inherit it.
            sysctl(ns, "net.ipv6.conf.all.disable_ipv6", "1")?;
            sysctl(ns, "net.ipv6.conf.default.disable_ipv6", "1")?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        // Each veth pair is created inside a namespace (never in the host's).
        veth_pair(NS_GEN, GEN_IF, LB_CLIENT_IF, NS_LB)?;
        veth_pair(NS_LB, LB_BACKEND_IF, SINK_IF, NS_SINK)?;
        let links = [
            (NS_GEN, GEN_IF, GEN_MAC, common::GATEWAY),
            (NS_LB, LB_CLIENT_IF, LB_CLIENT_MAC, common::LB_CLIENT_ADDR),
            (
                NS_LB,
                LB_BACKEND_IF,
                LB_BACKEND_MAC,
                common::LB_BACKEND_ADDR,
            ),
            (NS_SINK, SINK_IF, SINK_MAC, SINK_ADDR),
        ];
        for (ns, dev, mac, addr) in links {
            ip(&[
                "-n",
                ns,
                "link",
                "set",
                "dev",
                dev,
                "address",
                &fmt_mac(&mac),
            ])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", fmt_ip(addr)),
                "dev",
                dev,
            ])?;
        }
        // The sink holds the backends' addresses: its kernel answers l4lb's
        // health checks (the sink's XDP program passes them up).
        for i in 0..self.backends {
            let a = format!("{}/24", fmt_ip(common::backend_addr(i)));
            ip(&["-n", NS_SINK, "addr", "add", &a, "dev", SINK_IF])?;
        }

        // Frames sent by XDP (the generator's XDP_TX) reach a veth only if
        // its peer has NAPI: an XDP program or GRO. l4lb's native XDP gives
        // lbc NAPI; SKB-mode XDP and nftables need GRO.
        ns_exec(NS_LB, &["ethtool", "-K", LB_CLIENT_IF, "gro", "on"])?;

        for (ns, dev, _, _) in links {
            ip(&["-n", ns, "link", "set", "dev", dev, "up"])?;
        }

        // l4lb's namespace: no reverse-path filter (replies to the clients
        // would go back the way they came anyway), kernel forwarding off
        // (only the nftables case turns it on).
        for key in [
            "net.ipv4.conf.all.rp_filter",
            "net.ipv4.conf.default.rp_filter",
            &format!("net.ipv4.conf.{LB_CLIENT_IF}.rp_filter"),
            &format!("net.ipv4.conf.{LB_BACKEND_IF}.rp_filter"),
        ] {
            sysctl(NS_LB, key, "0")?;
        }
        sysctl(NS_LB, "net.ipv4.ip_forward", "0")?;
        ip(&[
            "-n",
            NS_LB,
            "route",
            "add",
            "198.19.0.0/16",
            "via",
            &fmt_ip(common::GATEWAY),
        ])?;

        // Static neighbours everywhere: the sink never answers ARP for
        // benchmark traffic, and no resolution may happen mid-run.
        let neigh = |ns: &str, addr: [u8; 4], mac: &Mac, dev: &str| {
            ip(&[
                "-n",
                ns,
                "neigh",
                "replace",
                &fmt_ip(addr),
                "lladdr",
                &fmt_mac(mac),
                "dev",
                dev,
                "nud",
                "permanent",
            ])
        };
        neigh(NS_LB, common::GATEWAY, &GEN_MAC, LB_CLIENT_IF)?;
        for i in 0..self.backends {
            neigh(NS_LB, common::backend_addr(i), &SINK_MAC, LB_BACKEND_IF)?;
        }
        neigh(NS_SINK, common::LB_BACKEND_ADDR, &LB_BACKEND_MAC, SINK_IF)?;
        neigh(NS_GEN, common::LB_CLIENT_ADDR, &LB_CLIENT_MAC, GEN_IF)?;

        for (ns, dev) in [(NS_LB, LB_CLIENT_IF), (NS_LB, LB_BACKEND_IF)] {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !ip(&["-n", ns, "link", "show", "dev", dev])?.contains("LOWER_UP") {
                if Instant::now() > deadline {
                    bail!("{ns}/{dev} is not up after 10 s");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        down();
    }
}

/// Fails if one of our namespaces has gone. scripts/netns.sh (the test
/// harness) removes every namespace whose name starts with `l4lb-`, ours
/// included: running the netns tests during a benchmark ends it.
pub fn check_alive() -> Result<()> {
    for ns in [NS_GEN, NS_LB, NS_SINK] {
        if !std::path::Path::new(&format!("/run/netns/{ns}")).exists() {
            bail!(
                "namespace {ns} was removed under the benchmark (scripts/netns.sh down, \
                 run by the netns tests and the demo, removes every l4lb-* namespace: \
                 do not run them during a benchmark)"
            );
        }
    }
    Ok(())
}

/// Moves the calling thread into network namespace `ns` (for good).
pub fn enter(ns: &str) -> Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("opening /run/netns/{ns}"))?;
    // SAFETY: setns on a valid namespace fd; it only affects this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns({ns}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a thread inside network namespace `ns` (interface indexes,
/// netlink and sockets are then that namespace's).
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(ns)?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("a thread in {ns} panicked"))?
    })
}

/// Pins the calling thread to `cpu`.
pub fn pin(cpu: usize) -> Result<()> {
    if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
        bail!("cannot pin a thread to CPU {cpu}");
    }
    Ok(())
}

/// Pins task `pid` (any thread, e.g. a kernel NAPI thread) to `cpu`.
pub fn pin_task(pid: i32, cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: cpu is below CPU_SETSIZE on any machine this runs on.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: valid pointer and size.
    let r = unsafe { libc::sched_setaffinity(pid, std::mem::size_of_val(&set), &set) };
    if r != 0 {
        bail!(
            "sched_setaffinity({pid}, CPU {cpu}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Gives task `pid` a real-time priority (SCHED_FIFO 50): it then runs as
/// soon as it is woken, ahead of the busy-looping generator that shares its
/// CPU, so that the veth ring in front of it (256 frames) never overflows
/// while it waits for a time slice.
pub fn realtime(pid: i32) -> Result<()> {
    let p = libc::sched_param { sched_priority: 50 };
    // SAFETY: valid pointer to a sched_param.
    if unsafe { libc::sched_setscheduler(pid, libc::SCHED_FIFO, &p) } != 0 {
        bail!(
            "sched_setscheduler({pid}, SCHED_FIFO): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Kernel threads polling `dev`'s NAPI instances (threaded NAPI).
pub fn napi_threads(dev: &str) -> Vec<i32> {
    let want = format!("napi/{dev}-");
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) {
                if comm.trim_end().starts_with(&want) {
                    out.push(pid);
                }
            }
        }
    }
    out
}

/// `ip -s -j link show` counters of `dev` in `ns`: (rx packets, tx packets,
/// rx dropped, tx dropped).
pub fn link_counters(ns: &str, dev: &str) -> Result<[u64; 4]> {
    let out = ip(&["-n", ns, "-s", "-j", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("ip -j output")?;
    let s = &v[0]["stats64"];
    let g = |a: &str, b: &str| s[a][b].as_u64().unwrap_or(0);
    Ok([
        g("rx", "packets"),
        g("tx", "packets"),
        g("rx", "dropped"),
        g("tx", "dropped"),
    ])
}
