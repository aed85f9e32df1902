//! `l4lb-bench`: l4lb's end-to-end benchmark driver (scripts/bench.sh runs
//! it; root only).
//!
//! One topology, one generator, one sink, for every case (see
//! `e2e/netns.rs`):
//! * the generator is an XDP program run with `BPF_PROG_RUN` in live-frames
//!   mode (bpf/bench_gen.c): 64-byte IPv4 UDP or TCP frames to the VIP from
//!   a configurable number of clients, put on the wire with XDP_TX (alone
//!   it makes about 10 Mpps; here its CPU also runs the kernel's receive
//!   path into the forwarder and the sink, and the report says, per case,
//!   whether the forwarder or the generator was the bottleneck);
//! * the sink is a BPF program on the backends' veth that counts and drops
//!   (bpf/bench_sink.c), by default at tc ingress in the softirq of the
//!   CPU that sent the frame (`--sink`: where a veth sink's cost lands);
//! * the forwarders: l4lb itself (1 and 2 workers, native and SKB attach),
//!   the bare AF_XDP ceiling (`l4lb-bench fwd`, e2e/fwd.rs: l4lb's sockets
//!   and loop without the packet processing), and nftables DNAT by jhash of
//!   the source address with kernel forwarding.
//!
//! The figure of merit is the rate at which frames reach the sink, measured
//! over each run. Every run also accounts for every frame: sent by the
//! generator, seen by the forwarder's interface, received and transmitted by
//! the forwarder, dropped by l4lb (by reason), received by the sink; a run
//! in which transmitted frames did not arrive, or arrived un-NAT'ed, is
//! marked void in the report.
//!
//! Output: a markdown block on stdout (progress on stderr), to paste into
//! BENCHMARKS.md.

#[path = "e2e/bpf.rs"]
mod bpf;
#[path = "common.rs"]
mod common;
#[path = "e2e/fwd.rs"]
mod fwd;
#[path = "e2e/icount.rs"]
mod icount;
#[path = "e2e/micro.rs"]
mod micro;
#[path = "e2e/netns.rs"]
mod netns;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use common::Proto;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "l4lb-bench",
    about = "l4lb's end-to-end benchmark (root; network namespaces l4lb-bench-*)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the benchmark and print a markdown report on stdout.
    Run(RunArgs),
    /// The bare AF_XDP forwarder (started by `run` inside l4lb's namespace).
    #[command(hide = true)]
    Fwd(FwdArgs),
    /// Remove the benchmark's namespaces (after an interrupted run).
    Down,
    /// Criterion's results (cargo bench) as a markdown table.
    MicroReport {
        /// Criterion's output directory.
        #[arg(default_value = "target/criterion")]
        dir: PathBuf,
        /// Only results written at or after this time (seconds since the
        /// epoch, with a fraction: `date +%s.%N`): those of the current
        /// run. Whole seconds would also take in results written earlier
        /// in the second the run began.
        #[arg(long, default_value_t = 0.0)]
        since: f64,
        /// Print `benchmark nanoseconds-per-element` lines instead (only
        /// benchmarks with a throughput in elements), for micro-repeated.
        #[arg(long)]
        samples: bool,
    },
    /// The median and min–max per benchmark over several runs' samples
    /// (`micro-report --samples` outputs, concatenated in FILE), as a
    /// markdown table.
    MicroRepeated {
        /// The concatenated samples.
        file: PathBuf,
    },
    /// The pipeline benchmark's workloads in a plain loop, for counting
    /// instructions per packet under valgrind (`scripts/bench.sh icount`).
    PipelineLoop {
        /// "established", "new-session", "new-session-tcp" or "reply".
        #[arg(long)]
        workload: String,
        /// Bursts of 64 frames, after one untimed round.
        #[arg(long)]
        bursts: usize,
    },
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Measured runs per case (the median is reported). The cases take
    /// turns: each round runs every case once, so that a slow spell of
    /// the machine falls on all of them rather than on one case's runs,
    /// and every other round runs each l4lb case before its bare twin
    /// instead of after it (an even number balances the two orders).
    #[arg(long, default_value_t = 4)]
    runs: usize,
    /// Seconds per run.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Seconds of traffic before each run, its forwarder just started (not
    /// measured).
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Client source addresses (198.19.0.0 upwards, at most 65536).
    #[arg(long, default_value_t = 1000)]
    clients: u32,
    /// Source ports per client address.
    #[arg(long, default_value_t = 1)]
    ports: u32,
    /// Backends (198.18.2.11 upwards; all behind the one sink).
    #[arg(long, default_value_t = 3)]
    backends: usize,
    /// Only the cases whose name contains one of these (comma-separated),
    /// e.g. "l4lb/native,nft". Names: bare|l4lb/native|skb/1w|2w/udp|tcp,
    /// nft/1cpu|2cpu/udp|tcp. One that matches no case, e.g. "memory", runs
    /// only the memory measurement.
    #[arg(long)]
    cases: Option<String>,
    /// Pace each generator thread to this many frames/s (0: flat out).
    #[arg(long, default_value_t = 0)]
    gen_pps: u64,
    /// CPU that runs the sink with `--sink xdp` or `--sink tc`.
    #[arg(long, default_value_t = 0)]
    sink_cpu: usize,
    /// Where the sink program sits, and so which CPU pays for it (on veth
    /// it cannot be free; see BENCHMARKS.md):
    /// "tc-local": tc ingress, run in the softirq of the CPU that
    /// transmitted the frame (the forwarder's, as a NIC's TX completion
    /// would be). "xdp": native XDP, its NAPI in kernel threads pinned to
    /// --sink-cpu at real-time priority; veth copies every frame for it,
    /// and that CPU is the generator's, which then cannot saturate the
    /// forwarder on a 2-CPU machine. "tc": tc ingress behind RPS to
    /// --sink-cpu (RPS hashing and IPIs then cost the forwarder more than
    /// "tc-local").
    #[arg(long, default_value = "tc-local")]
    sink: String,
    /// l4lb's flow_table_capacity in the throughput cases.
    #[arg(long, default_value_t = 1 << 20)]
    flow_table_capacity: usize,
    /// persistence_timeout of the benchmark's services (0: off).
    #[arg(long, default_value_t = 0)]
    persistence: u32,
    /// Skip the memory measurement.
    #[arg(long)]
    no_memory: bool,
    /// The l4lb binary (default: next to this one).
    #[arg(long)]
    l4lb: Option<PathBuf>,
    /// The command line to print in the report (scripts/bench.sh passes its
    /// own).
    #[arg(long)]
    command: Option<String>,
}

#[derive(Args)]
struct FwdArgs {
    #[arg(long)]
    client: String,
    #[arg(long)]
    backend: String,
    /// CPU per queue: queue i is served by a thread on the i-th CPU listed.
    #[arg(long, value_delimiter = ',')]
    cores: Vec<usize>,
    #[arg(long)]
    attach: String,
    #[arg(long)]
    src_mac: String,
    #[arg(long)]
    dst_mac: String,
    #[arg(long)]
    backends: usize,
    #[arg(long)]
    stats: PathBuf,
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Fwd(a) => fwd_main(a),
        Cmd::Down => {
            netns::down();
            Ok(())
        }
        Cmd::MicroReport {
            dir,
            since,
            samples,
        } => if samples {
            micro::samples(&dir, since)
        } else {
            micro::report(&dir, since)
        }
        .map(|r| print!("{r}")),
        Cmd::MicroRepeated { file } => std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))
            .and_then(|t| micro::repeated(&file.display().to_string(), &t))
            .map(|r| print!("{r}")),
        Cmd::PipelineLoop { workload, bursts } => icount::run(&workload, bursts),
    };
    if let Err(e) = r {
        eprintln!("l4lb-bench: {e:#}");
        std::process::exit(1);
    }
}

fn parse_mac(s: &str) -> Result<common::Mac> {
    l4lb::util::parse_mac(s).with_context(|| format!("bad MAC {s:?}"))
}

fn attach_mode(s: &str) -> Result<l4lb::control::xdp::Attach> {
    Ok(match s {
        "native" => l4lb::control::xdp::Attach::Native,
        "skb" => l4lb::control::xdp::Attach::Skb,
        _ => bail!("attach must be native or skb, not {s:?}"),
    })
}

fn fwd_main(a: FwdArgs) -> Result<()> {
    fwd::run(fwd::Options {
        client_if: a.client,
        backend_if: a.backend,
        cores: a.cores,
        attach: attach_mode(&a.attach)?,
        src_mac: parse_mac(&a.src_mac)?,
        dst_mac: parse_mac(&a.dst_mac)?,
        backends: a.backends,
        stats_file: a.stats,
    })
}

// ---------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The bare AF_XDP forwarder.
    Bare,
    L4lb,
    /// nftables DNAT with kernel forwarding.
    Nft,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Case {
    kind: Kind,
    /// "native" or "skb" (AF_XDP cases).
    attach: &'static str,
    /// Forwarding CPUs: workers (AF_XDP) or CPUs doing the kernel's
    /// forwarding (nftables).
    workers: usize,
    proto: Proto,
}

impl Case {
    fn name(&self) -> String {
        match self.kind {
            Kind::Bare => format!(
                "bare/{}/{}w/{}",
                self.attach,
                self.workers,
                self.proto.name()
            ),
            Kind::L4lb => format!(
                "l4lb/{}/{}w/{}",
                self.attach,
                self.workers,
                self.proto.name()
            ),
            Kind::Nft => format!("nft/{}cpu/{}", self.workers, self.proto.name()),
        }
    }

    fn describe(&self) -> String {
        let w = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        match self.kind {
            Kind::Bare => format!(
                "bare AF_XDP forwarder, {} attach, {}, {}",
                self.attach,
                w(self.workers, "worker"),
                self.proto.name().to_uppercase()
            ),
            Kind::L4lb => format!(
                "l4lb, {} attach, {}, {}",
                self.attach,
                w(self.workers, "worker"),
                self.proto.name().to_uppercase()
            ),
            Kind::Nft => format!(
                "nftables jhash DNAT, {}, {}",
                w(self.workers, "CPU"),
                self.proto.name().to_uppercase()
            ),
        }
    }
}

/// Every case, in the order a round runs them (but see `round_order`): each
/// l4lb case right after the bare forwarder with the same attach mode,
/// workers and protocol, and nftables with as many CPUs and that protocol
/// after the native pair, so that the runs a ratio compares are minutes
/// apart at most.
fn all_cases() -> Vec<Case> {
    let mut v = Vec::new();
    let c = |kind, attach, workers, proto| Case {
        kind,
        attach,
        workers,
        proto,
    };
    for attach in ["native", "skb"] {
        for (w, proto) in [(1, Proto::Udp), (1, Proto::Tcp), (2, Proto::Udp)] {
            v.push(c(Kind::Bare, attach, w, proto));
            v.push(c(Kind::L4lb, attach, w, proto));
            if attach == "native" {
                v.push(c(Kind::Nft, "", w, proto));
            }
        }
    }
    v
}

// ---------------------------------------------------------------------------
// Forwarders under test
// ---------------------------------------------------------------------------

/// A forwarder's own counters, cumulative.
#[derive(Debug, Clone, Default)]
struct FwdCounters {
    /// Frames that reached the forwarder's client interface: redirected by
    /// the XDP steering program (AF_XDP) or received by the kernel (nft).
    lb_in: u64,
    /// Frames the forwarder received (AF_XDP sockets); None for nftables.
    rx: Option<u64>,
    /// Frames it transmitted towards the backends.
    tx: u64,
    /// l4lb's drop counters by reason (non-zero only), or the kernel's
    /// interface drop counters for nftables.
    drops: BTreeMap<String, u64>,
}

impl FwdCounters {
    fn delta(&self, before: &FwdCounters) -> FwdCounters {
        FwdCounters {
            lb_in: self.lb_in - before.lb_in,
            rx: self.rx.zip(before.rx).map(|(a, b)| a - b),
            tx: self.tx - before.tx,
            drops: self
                .drops
                .iter()
                .map(|(k, v)| (k.clone(), v - before.drops.get(k).copied().unwrap_or(0)))
                .filter(|(_, v)| *v > 0)
                .collect(),
        }
    }
    fn add(&mut self, o: &FwdCounters) {
        self.lb_in += o.lb_in;
        self.rx = match (self.rx, o.rx) {
            (Some(a), Some(b)) => Some(a + b),
            (None, b) => b,
            (a, None) => a,
        };
        self.tx += o.tx;
        for (k, v) in &o.drops {
            *self.drops.entry(k.clone()).or_default() += v;
        }
    }
}

enum Forwarder {
    L4lb(L4lbProcess),
    Bare { child: Child, stats: PathBuf },
    Nft,
}

struct L4lbProcess {
    child: Child,
    bin: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

impl L4lbProcess {
    fn start(bin: &Path, dir: &Path, tag: &str, config: &str) -> Result<L4lbProcess> {
        let cfg = dir.join(format!("{tag}.toml"));
        std::fs::write(&cfg, config)?;
        let log = dir.join(format!("{tag}.log"));
        let logf = std::fs::File::create(&log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", netns::NS_LB])
            .arg(bin)
            .args(["run", "-c"])
            .arg(&cfg)
            .env("L4LB_LOG", "info")
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .context("starting l4lb")?;
        let mut p = L4lbProcess {
            child,
            bin: bin.to_path_buf(),
            socket: dir.join("ctl.sock"),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = p.child.try_wait()? {
                bail!("l4lb exited during start-up ({st}):\n{}", p.log_text());
            }
            if p.socket.exists() && p.stats().is_ok() {
                return Ok(p);
            }
            if Instant::now() > deadline {
                bail!("l4lb did not come up in 20 s:\n{}", p.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `l4lb stats --json`.
    fn stats(&self) -> Result<Value> {
        let out = netns::run(
            Command::new(&self.bin)
                .args(["stats", "--json", "-s"])
                .arg(&self.socket),
        )?;
        serde_json::from_str(&out).context("l4lb stats --json output")
    }

    fn counters(&self) -> Result<FwdCounters> {
        let s = self.stats()?;
        let workers = s["workers"].as_array().cloned().unwrap_or_default();
        let sum = |k: &str| workers.iter().map(|w| u(&w[k])).sum::<u64>();
        let lb_in = s["steering"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|x| x["interface"] == netns::LB_CLIENT_IF)
            .map(|x| u(&x["redirected"]))
            .sum();
        let drops = s["drops"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), u(v)))
            .collect();
        Ok(FwdCounters {
            lb_in,
            rx: Some(sum("rx")),
            tx: sum("tx"),
            drops,
        })
    }

    /// Resident and peak resident set (kB) of the l4lb process.
    fn memory_kb(&self) -> Result<(u64, u64)> {
        // `ip netns exec` execs l4lb: the child's pid is l4lb's.
        let st = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let field = |name: &str| -> u64 {
            st.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok((field("VmRSS:"), field("VmHWM:")))
    }

    fn stop(mut self) -> Result<()> {
        stop_child(&mut self.child, "l4lb")
    }
}

fn stop_child(child: &mut Child, what: &str) -> Result<()> {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = child.try_wait()? {
            if !st.success() {
                eprintln!("l4lb-bench: {what} exited with {st}");
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not stop within 10 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Forwarder {
    fn counters(&self) -> Result<FwdCounters> {
        match self {
            Forwarder::L4lb(p) => p.counters(),
            Forwarder::Bare { stats, .. } => {
                let v: Value = serde_json::from_str(&std::fs::read_to_string(stats)?)?;
                let mut drops = BTreeMap::new();
                drops.insert("tx_buffer_full".to_string(), u(&v["dropped"]));
                Ok(FwdCounters {
                    lb_in: u(&v["redirected"]),
                    rx: Some(u(&v["rx"])),
                    tx: u(&v["tx"]),
                    drops,
                })
            }
            Forwarder::Nft => {
                let c = netns::link_counters(netns::NS_LB, netns::LB_CLIENT_IF)?;
                let b = netns::link_counters(netns::NS_LB, netns::LB_BACKEND_IF)?;
                let mut drops = BTreeMap::new();
                drops.insert(format!("{}_rx_dropped", netns::LB_CLIENT_IF), c[2]);
                drops.insert(format!("{}_tx_dropped", netns::LB_BACKEND_IF), b[3]);
                Ok(FwdCounters {
                    lb_in: c[0],
                    rx: None,
                    tx: b[1],
                    drops,
                })
            }
        }
    }

    fn stop(self) -> Result<()> {
        match self {
            Forwarder::L4lb(p) => p.stop(),
            Forwarder::Bare { mut child, .. } => stop_child(&mut child, "the bare forwarder"),
            Forwarder::Nft => nft_down(),
        }
    }
}

const NFT_TABLE: &str = "l4lb_bench";

fn nft_up(backends: usize, rps_cpu: Option<usize>, dir: &Path) -> Result<()> {
    let mut rules = format!(
        "table ip {NFT_TABLE} {{\n  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n"
    );
    for proto in [Proto::Udp, Proto::Tcp] {
        let map = (0..backends)
            .map(|i| {
                format!(
                    "{i} : {} . {}",
                    common::fmt_ip(common::backend_addr(i)),
                    proto.backend_port()
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            rules,
            "    ip daddr {} {} dport {} dnat ip to jhash ip saddr mod {backends} map {{ {map} }}",
            common::fmt_ip(common::VIP),
            proto.name(),
            proto.vip_port()
        );
    }
    rules.push_str("  }\n}\n");
    let f = dir.join("nft.rules");
    std::fs::write(&f, &rules)?;
    netns::ns_exec(netns::NS_LB, &["nft", "-f", &f.to_string_lossy()])?;
    // Conntrack's TCP window tracking would mark mid-stream segments of a
    // connection it never saw open as invalid (and then not NAT them).
    netns::sysctl(
        netns::NS_LB,
        "net.netfilter.nf_conntrack_tcp_be_liberal",
        "1",
    )?;
    netns::sysctl(netns::NS_LB, "net.ipv4.ip_forward", "1")?;
    // With one generator thread, the client veth's frames all arrive on
    // the generator's CPU; RPS hands them to the forwarding CPU, as l4lb's
    // single worker has a CPU of its own.
    let mask = rps_cpu.map_or("0".to_string(), |c| format!("{:x}", 1u64 << c));
    netns::write_sys(
        netns::NS_LB,
        &format!(
            "/sys/class/net/{}/queues/rx-0/rps_cpus",
            netns::LB_CLIENT_IF
        ),
        &mask,
    )?;
    Ok(())
}

fn nft_down() -> Result<()> {
    netns::sysctl(netns::NS_LB, "net.ipv4.ip_forward", "0")?;
    netns::write_sys(
        netns::NS_LB,
        &format!(
            "/sys/class/net/{}/queues/rx-0/rps_cpus",
            netns::LB_CLIENT_IF
        ),
        "0",
    )?;
    netns::ns_exec(netns::NS_LB, &["nft", "delete", "table", "ip", NFT_TABLE])?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------

struct Ctx {
    args: RunArgs,
    l4lb: PathBuf,
    me: PathBuf,
    dir: PathBuf,
    nproc: usize,
    gen: bpf::Generator,
    sink: bpf::Sink,
    stop: Arc<AtomicBool>,
    /// `[instance]` lines this l4lb accepts for persistence (memory case).
    persistence_lines: String,
}

#[derive(Debug, Clone, Default)]
struct Run {
    /// The round it ran in, from 0.
    round: usize,
    pps: f64,
    sent: u64,
    elapsed: Duration,
    sink: bpf::SinkCount,
    fwd: FwdCounters,
}

#[derive(Debug, Clone)]
struct CaseResult {
    case: Case,
    runs: Vec<Run>,
    error: Option<String>,
}

/// The median of `v` (NaN if empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

impl CaseResult {
    fn median(&self) -> f64 {
        median(self.runs.iter().map(|r| r.pps).collect())
    }

    /// This case's rate over `other`'s, round by round (only the rounds
    /// both ran in): runs of one round are minutes apart at most, so a
    /// slow spell of the host falls on both.
    fn ratios(&self, other: &CaseResult) -> Vec<f64> {
        self.runs
            .iter()
            .filter_map(|a| {
                let b = other.runs.iter().find(|b| b.round == a.round)?;
                Some(a.pps / b.pps)
            })
            .collect()
    }
    fn min(&self) -> f64 {
        self.runs
            .iter()
            .map(|r| r.pps)
            .fold(f64::INFINITY, f64::min)
    }
    fn max(&self) -> f64 {
        self.runs.iter().map(|r| r.pps).fold(0.0, f64::max)
    }
    fn totals(&self) -> (u64, f64, bpf::SinkCount, FwdCounters) {
        let mut sent = 0;
        let mut secs = 0.0;
        let mut sink = bpf::SinkCount::default();
        let mut fwd = FwdCounters::default();
        for r in &self.runs {
            sent += r.sent;
            secs += r.elapsed.as_secs_f64();
            sink.frames += r.sink.frames;
            sink.to_vip += r.sink.to_vip;
            sink.bytes += r.sink.bytes;
            fwd.add(&r.fwd);
        }
        (sent, secs, sink, fwd)
    }

    /// Share of the frames that reached the forwarder that it did not
    /// forward (the kernel dropped them at full rings or queues, or l4lb at
    /// its full TX ring).
    fn not_forwarded(&self) -> f64 {
        let (_, _, _, fwd) = self.totals();
        fwd.lb_in.saturating_sub(fwd.tx) as f64 / fwd.lb_in.max(1) as f64
    }

    /// Whether the forwarder was the bottleneck: at least 5 % of what
    /// reached it was not forwarded. If not, the generator's CPU was, and
    /// the rate is only a lower bound of the forwarder's.
    fn saturated(&self) -> bool {
        self.not_forwarded() >= 0.05
    }

    /// Problems that make the figures void; empty if every frame is
    /// accounted for.
    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(e) = &self.error {
            p.push(format!("failed: {e}"));
            return p;
        }
        let (_, _, sink, fwd) = self.totals();
        let tol = |n: u64| (n / 1000).max(64);
        // Frames the forwarder sent that the sink never saw.
        if fwd.tx > sink.frames + tol(fwd.tx) {
            p.push(format!(
                "{} frames sent towards the backends never reached them",
                fwd.tx - sink.frames
            ));
        }
        if sink.frames > fwd.tx + tol(fwd.tx) {
            p.push(format!(
                "the sink saw {} frames more than were sent",
                sink.frames - fwd.tx
            ));
        }
        if self.case.kind != Kind::Bare && sink.to_vip > 0 {
            p.push(format!("{} frames reached the sink un-NAT'ed", sink.to_vip));
        }
        if self.case.kind == Kind::L4lb {
            // tx_ring_full is the overload signal (the kernel's copy-mode TX
            // is slower than the worker): counted, expected at saturation.
            // Any other reason means the set-up is wrong.
            let unexpected: Vec<String> = fwd
                .drops
                .iter()
                .filter(|(k, _)| k.as_str() != "tx_ring_full")
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            if !unexpected.is_empty() {
                p.push(format!("l4lb dropped {}", unexpected.join(", ")));
            }
            let dropped: u64 = fwd.drops.values().sum();
            if let Some(rx) = fwd.rx {
                if rx > fwd.tx + dropped + tol(rx) {
                    p.push(format!(
                        "{} frames received by l4lb were neither sent nor counted as dropped",
                        rx - fwd.tx - dropped
                    ));
                }
            }
        }
        p
    }
}

fn interrupted(ctx: &Ctx) -> Result<()> {
    if ctx.stop.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

fn l4lb_config(
    ctx: &Ctx,
    attach: &str,
    workers: &[usize],
    extra: &str,
    cap: usize,
    persistence: Option<u32>,
    memory_services: u16,
) -> String {
    let sock = ctx.dir.join("ctl.sock").to_string_lossy().into_owned();
    let mac = |_| netns::SINK_MAC;
    common::ConfigSpec {
        name: "bench",
        client_interface: netns::LB_CLIENT_IF,
        backend_interface: netns::LB_BACKEND_IF,
        attach,
        workers,
        flow_table_capacity: cap,
        control_socket: Some(&sock),
        backends: ctx.args.backends,
        backend_mac: &mac,
        persistence_timeout: persistence,
        extra_instance: extra,
        memory_services,
    }
    .render()
}

fn start_forwarder(ctx: &Ctx, case: &Case, cores: &[usize]) -> Result<Forwarder> {
    match case.kind {
        Kind::L4lb => {
            let text = l4lb_config(
                ctx,
                case.attach,
                cores,
                "",
                ctx.args.flow_table_capacity,
                (ctx.args.persistence > 0).then_some(ctx.args.persistence),
                0,
            );
            l4lb::config::Config::from_str(&text, "<benchmark config>")
                .map_err(|e| anyhow::anyhow!("the benchmark's l4lb config is invalid:\n{e}"))?;
            let tag = case.name().replace('/', "-");
            Ok(Forwarder::L4lb(L4lbProcess::start(
                &ctx.l4lb, &ctx.dir, &tag, &text,
            )?))
        }
        Kind::Bare => {
            let stats = ctx.dir.join("fwd.json");
            let _ = std::fs::remove_file(&stats);
            let cores_s = cores
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(",");
            let log = std::fs::File::create(ctx.dir.join("fwd.log"))?;
            let mut child = Command::new("ip")
                .args(["netns", "exec", netns::NS_LB])
                .arg(&ctx.me)
                .args([
                    "fwd",
                    "--client",
                    netns::LB_CLIENT_IF,
                    "--backend",
                    netns::LB_BACKEND_IF,
                    "--cores",
                    &cores_s,
                    "--attach",
                    case.attach,
                    "--src-mac",
                    &common::fmt_mac(&netns::LB_BACKEND_MAC),
                    "--dst-mac",
                    &common::fmt_mac(&netns::SINK_MAC),
                    "--backends",
                    &ctx.args.backends.to_string(),
                    "--stats",
                ])
                .arg(&stats)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting the bare forwarder")?;
            let deadline = Instant::now() + Duration::from_secs(15);
            while !stats.exists() {
                if let Some(st) = child.try_wait()? {
                    bail!(
                        "the bare forwarder exited ({st}):\n{}",
                        std::fs::read_to_string(ctx.dir.join("fwd.log")).unwrap_or_default()
                    );
                }
                if Instant::now() > deadline {
                    let _ = stop_child(&mut child, "the bare forwarder");
                    bail!("the bare forwarder did not come up in 15 s");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(Forwarder::Bare { child, stats })
        }
        Kind::Nft => {
            let rps = (case.workers == 1).then(|| ctx.nproc - 1);
            nft_up(ctx.args.backends, rps, &ctx.dir)?;
            Ok(Forwarder::Nft)
        }
    }
}

/// One measured run of a case: its forwarder started, warmed up, measured
/// once, stopped.
fn run_case(ctx: &Ctx, case: &Case, round: usize) -> Result<Run> {
    let w = case.workers.min(ctx.nproc);
    // Generator threads on the first CPUs (thread i feeds RX queue i of
    // l4lb's client veth: veth picks the queue by the sending CPU),
    // forwarders on the last.
    let gen_cpus: Vec<usize> = (0..w).collect();
    let cores: Vec<usize> = (ctx.nproc - w..ctx.nproc).collect();
    ctx.gen
        .configure(ctx.args.clients, ctx.args.ports, gen_cpus.len())?;
    let frame = common::client_frame(
        case.proto,
        netns::LB_CLIENT_MAC,
        common::client_addr(0),
        common::FIRST_CLIENT_PORT,
    );
    let fwd = start_forwarder(ctx, case, &cores)?;
    let result = (|| -> Result<Run> {
        let go = |secs: Duration| {
            ctx.gen.run(
                netns::NS_GEN,
                netns::GEN_IF,
                &frame,
                &gen_cpus,
                secs,
                ctx.args.gen_pps,
            )
        };
        go(Duration::from_secs(ctx.args.warmup))?;
        std::thread::sleep(Duration::from_millis(300));
        interrupted(ctx)?;
        let s0 = ctx.sink.read();
        let f0 = fwd.counters()?;
        let g = go(Duration::from_secs(ctx.args.secs))?;
        let s1 = ctx.sink.read();
        // Let the rings drain before the loss accounting.
        std::thread::sleep(Duration::from_millis(300));
        let s2 = ctx.sink.read();
        let f1 = fwd.counters()?;
        let run = Run {
            round,
            pps: (s1.frames - s0.frames) as f64 / g.elapsed.as_secs_f64(),
            sent: g.sent,
            elapsed: g.elapsed,
            sink: s2 - s0,
            fwd: f1.delta(&f0),
        };
        eprintln!(
            "  run {}: {:.3} Mpps at the sink (offered {:.2} Mpps)",
            round + 1,
            run.pps / 1e6,
            g.sent as f64 / g.elapsed.as_secs_f64() / 1e6
        );
        Ok(run)
    })();
    let stopped = fwd.stop();
    let run = result?;
    stopped?;
    if ctx.gen.rejected() > 0 {
        bail!("the generator rejected its template frame");
    }
    Ok(run)
}

#[derive(Debug, Default)]
struct Memory {
    config_lines: String,
    idle_kb: (u64, u64),
    load_kb: (u64, u64),
    flows: String,
    persistence: String,
    offered: u64,
    error: Option<String>,
}

/// Seconds of flat-out traffic in the memory test: the generator cycles
/// through the 2^20 flows about 25 times, and l4lb takes about a quarter
/// of the frames, so nearly every flow gets through (the report gives the
/// live counts).
const MEMORY_LOAD_SECS: u64 = 16;
/// Listeners (one service each) of the memory test: 65,536 client
/// addresses × 16 services = 2^20 sessions and 2^20 flows.
const MEMORY_SERVICES: u16 = 16;

/// l4lb's resident memory, idle and after 2^20 sessions and 2^20 flows
/// (65,536 client addresses, each to 16 listeners of a service of its own,
/// persistence 300 s) went through it, with tables of 2^21 slots: at about
/// 83 % the most a table keeps live (BENCHMARKS.md), 2^20 slots would
/// evict.
fn memory(ctx: &Ctx) -> Memory {
    let cap = 1usize << 21;
    // Older l4lb builds (A/B runs) have no persistence_capacity key.
    let extra = if ctx.persistence_lines.is_empty() {
        String::new()
    } else {
        format!("persistence_capacity = {cap}\n")
    };
    let mut m = Memory {
        config_lines: format!("flow_table_capacity = {cap}\n{extra}persistence_timeout = 300"),
        ..Default::default()
    };
    if let Err(e) = (|| -> Result<()> {
        let cores = [ctx.nproc - 1];
        // Persistence on (300 s), so that the persistence table is used.
        let text = l4lb_config(
            ctx,
            "native",
            &cores,
            &extra,
            cap,
            Some(300),
            MEMORY_SERVICES,
        );
        l4lb::config::Config::from_str(&text, "<memory config>")
            .map_err(|e| anyhow::anyhow!("memory config invalid:\n{e}"))?;
        let p = L4lbProcess::start(&ctx.l4lb, &ctx.dir, "memory", &text)?;
        let r = (|| -> Result<()> {
            std::thread::sleep(Duration::from_secs(2));
            m.idle_kb = p.memory_kb()?;
            ctx.gen.configure_dst_ports(
                common::MAX_CLIENT_ADDRS,
                common::MEMORY_FIRST_VIP_PORT,
                MEMORY_SERVICES as u32,
                1,
            )?;
            let frame = common::client_frame(
                Proto::Udp,
                netns::LB_CLIENT_MAC,
                common::client_addr(0),
                common::FIRST_CLIENT_PORT,
            );
            let g = ctx.gen.run(
                netns::NS_GEN,
                netns::GEN_IF,
                &frame,
                &[0],
                Duration::from_secs(MEMORY_LOAD_SECS),
                0,
            )?;
            m.offered = g.sent;
            std::thread::sleep(Duration::from_secs(1));
            m.load_kb = p.memory_kb()?;
            let s = p.stats()?;
            m.flows = s["flows"].to_string();
            m.persistence = s
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| k.contains("persist"))
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join("; ");
            Ok(())
        })();
        p.stop()?;
        r
    })() {
        m.error = Some(format!("{e:#}"));
    }
    m
}

fn machine() -> (usize, String, String) {
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown".to_string(), |s| s.trim().to_string());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    (nproc, cpu, kernel)
}

fn now_utc() -> String {
    netns::run(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// `[instance]` keys for 2^20 persistence entries, if this l4lb has them.
fn persistence_lines() -> String {
    let mac = |_| netns::SINK_MAC;
    for lines in ["persistence_capacity = 1048576\n", ""] {
        let text = common::ConfigSpec {
            name: "probe",
            client_interface: "a",
            backend_interface: "b",
            attach: "native",
            workers: &[0],
            flow_table_capacity: 1 << 20,
            control_socket: None,
            backends: 1,
            backend_mac: &mac,
            persistence_timeout: Some(300),
            extra_instance: lines,
            memory_services: 0,
        }
        .render();
        if l4lb::config::Config::from_str(&text, "<probe>").is_ok() {
            return lines.to_string();
        }
    }
    String::new()
}

fn run(args: RunArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run as root (network namespaces, XDP, BPF_PROG_RUN)");
    }
    if args.runs == 0 || args.secs == 0 {
        bail!("--runs and --secs must be at least 1");
    }
    if args.clients == 0 || args.clients > common::MAX_CLIENT_ADDRS || args.ports == 0 {
        bail!("--clients must be 1..=65536 and --ports at least 1");
    }
    let me = std::env::current_exe()?;
    let l4lb = match &args.l4lb {
        Some(p) => p.clone(),
        None => me.with_file_name("l4lb"),
    };
    if !l4lb.exists() {
        bail!(
            "{} not found: build it (cargo build --release) or pass --l4lb",
            l4lb.display()
        );
    }
    let (nproc, cpu, kernel) = machine();
    let filters: Vec<String> = args
        .cases
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let cases: Vec<Case> = all_cases()
        .into_iter()
        .filter(|c| filters.is_empty() || filters.iter().any(|f| c.name().contains(f.as_str())))
        .collect();
    if cases.is_empty() && args.no_memory {
        bail!("no case matches --cases");
    }
    let command = args
        .command
        .clone()
        .unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" "));
    let started = Instant::now();
    let date = now_utc();

    let dir = std::env::temp_dir().join(format!("l4lb-bench.{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))?;

    eprintln!("l4lb-bench: building the topology");
    let topo = netns::Topology::up(args.backends)?;
    let sink = setup_sink(&args)?;
    let health = HealthListener::start(netns::NS_SINK, common::HEALTH_PORT)?;
    let ctx = Ctx {
        persistence_lines: persistence_lines(),
        args: args.clone(),
        l4lb,
        me,
        dir: dir.clone(),
        nproc,
        gen: bpf::Generator::load()?,
        sink,
        stop,
    };

    // The cases take turns, one run each per round: rates here drift by
    // up to 20 % over minutes, and run back to back, one case's three runs
    // could all fall in a slow spell that another case's missed, which
    // skewed their ratio.
    let mut results: Vec<CaseResult> = cases
        .iter()
        .map(|case| CaseResult {
            case: *case,
            error: None,
            runs: Vec::new(),
        })
        .collect();
    'rounds: for round in 0..args.runs {
        for i in round_order(&cases, round) {
            let r = &mut results[i];
            if r.error.is_some() {
                continue;
            }
            if ctx.stop.load(Ordering::Relaxed) {
                break 'rounds;
            }
            let case = r.case;
            eprintln!(
                "l4lb-bench: round {} of {}: {} ({})",
                round + 1,
                args.runs,
                case.name(),
                case.describe()
            );
            let run = netns::check_alive().and_then(|_| run_case(&ctx, &case, round));
            let run = match (run, netns::check_alive()) {
                (Err(e), Err(gone)) => Err(e.context(format!("{gone:#}"))),
                (run, _) => run,
            };
            match run {
                Ok(run) => r.runs.push(run),
                Err(e) => {
                    // A case that failed is void, and not run again.
                    eprintln!("l4lb-bench: {}: {e:#}", case.name());
                    r.error = Some(format!("{e:#}"));
                    r.runs.clear();
                }
            }
        }
    }
    let mem = if args.no_memory || ctx.stop.load(Ordering::Relaxed) {
        None
    } else {
        eprintln!("l4lb-bench: memory");
        Some(memory(&ctx))
    };
    let wall = started.elapsed();
    health.stop();
    drop(ctx);
    drop(topo);
    let _ = std::fs::remove_dir_all(&dir);

    print!(
        "{}",
        report(
            &args,
            &command,
            &date,
            (nproc, &cpu, &kernel),
            &results,
            mem.as_ref(),
            wall
        )
    );
    Ok(())
}

/// The order in which round `round` (from 0) runs `cases`, as indexes:
/// their own order, except that in odd rounds each l4lb case runs before
/// the bare forwarder case just ahead of it. Whichever of the two runs
/// second follows the other's teardown, and in a hand-run ABBA sequence
/// (2026-11-22 15:33 UTC) the second of a pair tended to be the slower.
fn round_order(cases: &[Case], round: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..cases.len()).collect();
    if round % 2 == 1 {
        let mut i = 0;
        while i + 1 < cases.len() {
            let (a, b) = (&cases[i], &cases[i + 1]);
            if a.kind == Kind::Bare
                && b.kind == Kind::L4lb
                && (a.attach, a.workers, a.proto) == (b.attach, b.workers, b.proto)
            {
                order.swap(i, i + 1);
                i += 2;
            } else {
                i += 1;
            }
        }
    }
    order
}

/// Attaches the sink and moves its work to `--sink-cpu`.
fn setup_sink(args: &RunArgs) -> Result<bpf::Sink> {
    let (ns, dev) = (netns::NS_SINK, netns::SINK_IF);
    let hook = match args.sink.as_str() {
        "xdp" => bpf::SinkHook::Xdp,
        "tc" | "tc-local" => bpf::SinkHook::Tc,
        s => bail!("--sink must be xdp, tc or tc-local, not {s:?}"),
    };
    if hook == bpf::SinkHook::Xdp {
        // NAPI in kernel threads, pinned and real-time, rather than in the
        // softirq of whoever transmits to the sink (the forwarder's CPU).
        netns::ns_exec(ns, &["ethtool", "-K", dev, "gro", "on"])?;
        netns::write_sys(ns, &format!("/sys/class/net/{dev}/threaded"), "1")
            .context("threaded NAPI on the sink")?;
    } else if args.sink == "tc-local" {
        // NAPI (GRO on, no XDP program: no copy) run in the softirq of the
        // transmitting CPU, so that the sink's frames do not queue in that
        // CPU's backlog, which RPS fills in the nftables case. veth only
        // hands a frame to its peer's NAPI if the sending device does no
        // TSO (veth_skb_is_eligible_for_gro); 64-byte frames need none.
        netns::ns_exec(ns, &["ethtool", "-K", dev, "gro", "on"])?;
        netns::ns_exec(
            netns::NS_LB,
            &["ethtool", "-K", netns::LB_BACKEND_IF, "tso", "off"],
        )?;
    } else {
        // No NAPI: frames go through the backlog of the CPU RPS picks.
        let mask = format!("{:x}", 1u64 << args.sink_cpu);
        for q in 0..2 {
            netns::write_sys(
                ns,
                &format!("/sys/class/net/{dev}/queues/rx-{q}/rps_cpus"),
                &mask,
            )?;
        }
    }
    let sink = bpf::Sink::attach(ns, dev, hook, common::VIP, common::LB_BACKEND_ADDR)?;
    if hook == bpf::SinkHook::Xdp {
        let napi = netns::napi_threads(dev);
        if napi.is_empty() {
            bail!("no NAPI threads for {dev}: threaded NAPI did not take");
        }
        for pid in &napi {
            netns::pin_task(*pid, args.sink_cpu)?;
            netns::realtime(*pid)?;
        }
    }
    Ok(sink)
}

/// A TCP listener in the sink namespace for l4lb's health checks.
struct HealthListener {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl HealthListener {
    fn start(ns: &str, port: u16) -> Result<HealthListener> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let ns = ns.to_string();
        let st = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let l = (|| -> Result<std::net::TcpListener> {
                netns::enter(&ns)?;
                let l = std::net::TcpListener::bind(("0.0.0.0", port))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })();
            let l = match l {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while !st.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((conn, _)) => drop(conn),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        rx.recv().context("health listener thread")??;
        Ok(HealthListener { stop, thread })
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

fn mpps(x: f64) -> String {
    if x.is_finite() {
        format!("{:.3}", x / 1e6)
    } else {
        "—".to_string()
    }
}

fn find(rs: &[CaseResult], f: impl Fn(&Case) -> bool) -> Option<&CaseResult> {
    rs.iter()
        .find(|r| f(&r.case) && r.error.is_none() && !r.runs.is_empty())
}

fn report(
    a: &RunArgs,
    command: &str,
    date: &str,
    (nproc, cpu, kernel): (usize, &str, &str),
    rs: &[CaseResult],
    mem: Option<&Memory>,
    wall: Duration,
) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "### End-to-end: 64-byte IPv4 frames through the load balancer\n"
    );
    let _ = writeln!(o, "- Command: `{command}`");
    let _ = writeln!(
        o,
        "- Machine: {nproc} × {cpu}, Linux {kernel}; {date}; the whole run took {:.0} s",
        wall.as_secs_f64()
    );
    let _ = writeln!(
        o,
        "- Traffic: BPF live-frame generator (XDP_TX) → veth → forwarder → veth → BPF sink ({}; counts, drops); \
         {} client address(es) × {} port(s), {} backends; median of {} runs of {} s, each after {} s of warm-up, \
         the cases taking turns (one run of each per round; l4lb right after its bare twin, or right \
         before it in every other round); \
         generator {}",
        match a.sink.as_str() {
            "xdp" => "native XDP, NAPI threads on the generator's CPU",
            "tc" => "tc ingress, RPS to the generator's CPU",
            _ => "tc ingress, in the transmitting CPU's softirq",
        },
        a.clients,
        a.ports,
        a.backends,
        a.runs,
        a.secs,
        a.warmup,
        if a.gen_pps > 0 {
            format!("paced at {} frames/s per thread", a.gen_pps)
        } else {
            "flat out".to_string()
        }
    );
    let _ = writeln!(
        o,
        "- CPUs: 1 worker/CPU = forwarder on CPU {}, generator (and the kernel's receive path into the forwarder) on CPU 0; 2 = both share CPUs 0-1.\n",
        nproc - 1,
    );

    if !rs.is_empty() {
        throughput(&mut o, rs);
    }
    if let Some(m) = mem {
        memory_report(&mut o, m);
    }
    o
}

fn throughput(o: &mut String, rs: &[CaseResult]) {
    // Ratios.
    let _ = writeln!(o, "| l4lb case | l4lb Mpps | / bare AF_XDP | / nftables |");
    let _ = writeln!(o, "|---|---:|---:|---:|");
    for r in rs.iter().filter(|r| r.case.kind == Kind::L4lb) {
        let c = r.case;
        let bare = find(rs, |x| {
            x.kind == Kind::Bare
                && x.attach == c.attach
                && x.workers == c.workers
                && x.proto == c.proto
        });
        let nft = find(rs, |x| {
            x.kind == Kind::Nft && x.workers == c.workers && x.proto == c.proto
        });
        let ratio = |other: Option<&CaseResult>| match other {
            Some(b) if r.error.is_none() && !r.runs.is_empty() => {
                let v = r.ratios(b);
                let (lo, hi) = v.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &x| {
                    (lo.min(x), hi.max(x))
                });
                format!(
                    "{:.2} ({:.2}–{:.2}; {} Mpps)",
                    median(v),
                    lo,
                    hi,
                    mpps(b.median())
                )
            }
            _ => "—".to_string(),
        };
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} |",
            c.describe(),
            mpps(r.median()),
            ratio(bare),
            ratio(nft)
        );
    }

    let _ = writeln!(
        o,
        "\nRatios: the median of l4lb's rate over the other forwarder's, taken round by round \
         (each round runs every case once, an l4lb case next to the bare forwarder with the same \
         attach mode, workers and protocol: after it, or before it in every other round), then their min–max and the other forwarder's median rate."
    );

    // Everything, with the frame accounting.
    let _ = writeln!(
        o,
        "\n| case | median Mpps | min–max | offered Mpps | in | rx | tx | sink | drops | bound by | check |"
    );
    let _ = writeln!(o, "|---|---:|---|---:|---:|---:|---:|---:|---|---|---|");
    for r in rs {
        let (sent, secs, sink, fwd) = r.totals();
        let m = |n: u64| format!("{:.1}M", n as f64 / 1e6);
        let drops = if fwd.drops.is_empty() {
            "0".to_string()
        } else {
            fwd.drops
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let problems = r.problems();
        let _ = writeln!(
            o,
            "| {} | {} | {}–{} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.case.name(),
            mpps(r.median()),
            mpps(r.min()),
            mpps(r.max()),
            if secs > 0.0 {
                mpps(sent as f64 / secs)
            } else {
                "—".into()
            },
            m(fwd.lb_in),
            fwd.rx.map_or("—".to_string(), m),
            m(fwd.tx),
            m(sink.frames),
            drops,
            if r.runs.is_empty() {
                "—".to_string()
            } else {
                format!(
                    "{} ({:.1} % of in not forwarded)",
                    if r.saturated() {
                        "forwarder"
                    } else {
                        "generator: a lower bound"
                    },
                    100.0 * r.not_forwarded()
                )
            },
            if problems.is_empty() {
                "ok".to_string()
            } else {
                format!("VOID: {}", problems.join("; "))
            }
        );
    }
    let _ = writeln!(
        o,
        "\nColumns (frame counts summed over the runs): offered = frames the generator put on its veth; \
         in = frames that reached the forwarder's client interface (XDP steering redirects for AF_XDP, \
         interface RX for nftables); rx/tx = the forwarder's own counters; sink = frames that reached the \
         backends (drained 0.3 s after each run); drops = l4lb's drop counters (nftables: interface drop \
         counters). Frames lost between offered, in and rx are the kernel discarding what the forwarder \
         could not take (full veth and AF_XDP RX rings, full backlog queues). Bound by: \"forwarder\" if at \
         least 5 % of the frames that reached it were not forwarded (it was saturated), else \"generator\" \
         (the generator's CPU, which also runs the kernel's receive path into the forwarder and the sink, \
         could not offer more, and the rate is only a lower bound). A run is void if frames sent were not received, reached the backends \
         un-NAT'ed, or l4lb dropped any for a reason other than `tx_ring_full` (the overload signal: \
         copy-mode TX on veth sends at most 32 frames per `sendto()`, and the kernel's TX path is slower \
         than the worker)."
    );
}

fn memory_report(o: &mut String, m: &Memory) {
    {
        let _ = writeln!(o, "\n#### l4lb memory (VmRSS)\n");
        let _ = writeln!(
            o,
            "Config: the benchmark config with 1 worker, native attach, `{}`, and {MEMORY_SERVICES} more UDP listeners (VIP ports {}–{}), each with a backend service of its own (servers on ports {}–{}).",
            m.config_lines.trim().replace('\n', "`, `"),
            common::MEMORY_FIRST_VIP_PORT,
            common::MEMORY_FIRST_VIP_PORT + MEMORY_SERVICES - 1,
            common::MEMORY_FIRST_BACKEND_PORT,
            common::MEMORY_FIRST_BACKEND_PORT + MEMORY_SERVICES - 1,
        );
        if let Some(e) = &m.error {
            let _ = writeln!(o, "\nFAILED: {e}");
        } else {
            let _ = writeln!(o, "\n| state | VmRSS | VmHWM |\n|---|---:|---:|");
            let mb = |kb: u64| format!("{:.1} MiB", kb as f64 / 1024.0);
            let _ = writeln!(
                o,
                "| idle, 2 s after start | {} | {} |",
                mb(m.idle_kb.0),
                mb(m.idle_kb.1)
            );
            let _ = writeln!(
                o,
                "| after {MEMORY_LOAD_SECS} s of traffic from 65,536 client addresses to each of those {MEMORY_SERVICES} listeners: 1,048,576 flows and 1,048,576 sessions ({:.1}M frames offered) | {} | {} |",
                m.offered as f64 / 1e6,
                mb(m.load_kb.0),
                mb(m.load_kb.1)
            );
            let _ = write!(o, "\n`l4lb stats` after the load: flows {}", m.flows);
            if !m.persistence.is_empty() {
                let _ = write!(o, "; {}", m.persistence);
            }
            let _ = writeln!(o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_rounds_run_each_l4lb_case_before_its_bare_twin() {
        let cases = all_cases();
        let names = |round| -> Vec<String> {
            round_order(&cases, round)
                .into_iter()
                .map(|i| cases[i].name())
                .collect()
        };
        let even: Vec<String> = cases.iter().map(Case::name).collect();
        assert_eq!(names(0), even);
        assert_eq!(names(2), even);
        assert_eq!(
            names(1)[..6],
            [
                "l4lb/native/1w/udp",
                "bare/native/1w/udp",
                "nft/1cpu/udp",
                "l4lb/native/1w/tcp",
                "bare/native/1w/tcp",
                "nft/1cpu/tcp",
            ]
        );
        assert_eq!(
            names(1)[9..],
            [
                "l4lb/skb/1w/udp",
                "bare/skb/1w/udp",
                "l4lb/skb/1w/tcp",
                "bare/skb/1w/tcp",
                "l4lb/skb/2w/udp",
                "bare/skb/2w/udp",
            ]
        );
        // Only filtered-in pairs swap: an l4lb case without its twin keeps
        // its place.
        let some: Vec<Case> = cases
            .iter()
            .copied()
            .filter(|c| c.kind != Kind::Bare || c.proto == Proto::Tcp)
            .collect();
        let odd: Vec<String> = round_order(&some, 1)
            .into_iter()
            .map(|i| some[i].name())
            .collect();
        assert_eq!(
            odd[..5],
            [
                "l4lb/native/1w/udp",
                "nft/1cpu/udp",
                "l4lb/native/1w/tcp",
                "bare/native/1w/tcp",
                "nft/1cpu/tcp",
            ]
        );
    }
}
