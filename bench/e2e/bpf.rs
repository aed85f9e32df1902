//! The benchmark's two BPF programs, compiled by build.rs and embedded:
//! the backend sink (bpf/bench_sink.c) and the live-frame traffic generator
//! (bpf/bench_gen.c).

use anyhow::{bail, Context, Result};
use libbpf_sys as bpf;
use std::ffi::CString;
use std::os::raw::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use crate::netns;

static GEN_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/bench_gen.o"));
static SINK_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/bench_sink.o"));

const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

fn errno(ret: i32, what: &str) -> anyhow::Error {
    anyhow::anyhow!("{what}: {}", std::io::Error::from_raw_os_error(ret.abs()))
}

/// A loaded BPF object.
struct Object {
    obj: *mut bpf::bpf_object,
}

// SAFETY: used through fds and libbpf calls that are safe from any thread;
// the object is only closed on drop.
unsafe impl Send for Object {}
// SAFETY: as above; nothing mutates the object after loading.
unsafe impl Sync for Object {}

impl Object {
    fn load(image: &'static [u8], what: &str) -> Result<Object> {
        let obj = l4lb::control::xdp::open_embedded(image, what)?;
        let o = Object { obj };
        // SAFETY: freshly opened object.
        let ret = unsafe { bpf::bpf_object__load(obj) };
        if ret != 0 {
            return Err(errno(ret, &format!("loading the {what} program")));
        }
        Ok(o)
    }

    fn prog_fd(&self, name: &str) -> Result<i32> {
        let c = CString::new(name).expect("no NUL");
        // SAFETY: loaded object, valid C string.
        let prog = unsafe { bpf::bpf_object__find_program_by_name(self.obj, c.as_ptr()) };
        if prog.is_null() {
            bail!("no program {name}");
        }
        // SAFETY: prog belongs to the loaded object.
        Ok(unsafe { bpf::bpf_program__fd(prog) })
    }

    fn map_fd(&self, name: &str) -> Result<i32> {
        let c = CString::new(name).expect("no NUL");
        // SAFETY: loaded object, valid C string.
        let fd = unsafe { bpf::bpf_object__find_map_fd_by_name(self.obj, c.as_ptr()) };
        if fd < 0 {
            bail!("no map {name}");
        }
        Ok(fd)
    }
}

impl Drop for Object {
    fn drop(&mut self) {
        // SAFETY: opened by us, closed once.
        unsafe { bpf::bpf_object__close(self.obj) };
    }
}

fn possible_cpus() -> usize {
    // SAFETY: plain query.
    (unsafe { bpf::libbpf_num_possible_cpus() }).max(1) as usize
}

/// Entry `idx` of a per-CPU array of u64, summed over CPUs.
fn percpu_sum(fd: i32, idx: u32) -> u64 {
    let mut vals = vec![0u64; possible_cpus()];
    // SAFETY: a per-CPU array lookup writes one 8-byte value per possible CPU.
    let ret = unsafe {
        bpf::bpf_map_lookup_elem(
            fd,
            &idx as *const u32 as *const c_void,
            vals.as_mut_ptr() as *mut c_void,
        )
    };
    if ret != 0 {
        return 0;
    }
    vals.iter().sum()
}

fn update<V>(fd: i32, key: u32, value: &V) -> Result<()> {
    // SAFETY: V is the map's declared value type (repr(C)), key a u32.
    let ret = unsafe {
        bpf::bpf_map_update_elem(
            fd,
            &key as *const u32 as *const c_void,
            value as *const V as *const c_void,
            0,
        )
    };
    if ret != 0 {
        return Err(errno(ret, "updating a BPF map"));
    }
    Ok(())
}

fn ifindex(dev: &str) -> Result<u32> {
    let c = CString::new(dev).expect("no NUL");
    // SAFETY: valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {dev}");
    }
    Ok(i)
}

/// What reached the backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SinkCount {
    pub frames: u64,
    /// IPv4 frames still addressed to the VIP (not NAT'ed).
    pub to_vip: u64,
    pub bytes: u64,
}

impl std::ops::Sub for SinkCount {
    type Output = SinkCount;
    fn sub(self, o: SinkCount) -> SinkCount {
        SinkCount {
            frames: self.frames - o.frames,
            to_vip: self.to_vip - o.to_vip,
            bytes: self.bytes - o.bytes,
        }
    }
}

#[repr(C)]
struct SinkCfg {
    vip: u32,
    lb_addr: u32,
}

/// bench_sink attached (native mode) to the sink namespace's veth.
pub struct Sink {
    /// Owns the program and its maps.
    _obj: Object,
    counts: i32,
}

/// Where the sink program sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkHook {
    /// Native XDP on the sink's veth.
    Xdp,
    /// tc ingress (direct action).
    Tc,
}

impl Sink {
    pub fn attach(
        ns: &str,
        dev: &str,
        hook: SinkHook,
        vip: [u8; 4],
        lb_addr: [u8; 4],
    ) -> Result<Sink> {
        let obj = Object::load(SINK_OBJECT, "sink")?;
        let counts = obj.map_fd("bench_sink_count")?;
        let cfg = SinkCfg {
            vip: u32::from_ne_bytes(vip),
            lb_addr: u32::from_ne_bytes(lb_addr),
        };
        update(obj.map_fd("bench_sink_cfg")?, 0, &cfg)?;
        let prog = obj.prog_fd(match hook {
            SinkHook::Xdp => "bench_sink",
            SinkHook::Tc => "bench_sink_tc",
        })?;
        netns::in_netns(ns, || {
            let idx = ifindex(dev)?;
            let what = format!("attaching the sink to {ns}/{dev} ({hook:?})");
            match hook {
                SinkHook::Xdp => {
                    // SAFETY: valid ifindex and program fd; no options.
                    let ret = unsafe {
                        bpf::bpf_xdp_attach(idx as i32, prog, XDP_FLAGS_DRV_MODE, std::ptr::null())
                    };
                    if ret != 0 {
                        return Err(errno(ret, &what));
                    }
                }
                SinkHook::Tc => {
                    let hook = bpf::bpf_tc_hook {
                        sz: std::mem::size_of::<bpf::bpf_tc_hook>() as _,
                        ifindex: idx as i32,
                        attach_point: bpf::BPF_TC_INGRESS,
                        ..Default::default()
                    };
                    // SAFETY: a valid hook description; EEXIST is fine.
                    let ret = unsafe { bpf::bpf_tc_hook_create(&hook as *const _ as *mut _) };
                    if ret != 0 && ret != -libc::EEXIST {
                        return Err(errno(ret, &what));
                    }
                    let mut opts = bpf::bpf_tc_opts {
                        sz: std::mem::size_of::<bpf::bpf_tc_opts>() as _,
                        prog_fd: prog,
                        ..Default::default()
                    };
                    // SAFETY: valid hook and options.
                    let ret = unsafe { bpf::bpf_tc_attach(&hook, &mut opts) };
                    if ret != 0 {
                        return Err(errno(ret, &what));
                    }
                }
            }
            Ok(())
        })?;
        Ok(Sink { _obj: obj, counts })
    }

    pub fn read(&self) -> SinkCount {
        SinkCount {
            frames: percpu_sum(self.counts, 0),
            to_vip: percpu_sum(self.counts, 1),
            bytes: percpu_sum(self.counts, 2),
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct GenCfg {
    first_client: u32,
    addrs: u32,
    ports: u32,
    stride: u32,
    first_port: u16,
    /// 0: the ports vary the source port; 1: the destination port.
    dst_ports: u16,
}

/// One generator run.
#[derive(Debug, Clone, Copy, Default)]
pub struct GenRun {
    /// Frames the program returned as XDP_TX (put on the generator's veth).
    pub sent: u64,
    pub elapsed: Duration,
}

/// bench_gen, loaded once, run with BPF_PROG_RUN in live-frames mode.
pub struct Generator {
    /// Owns the program and its maps.
    _obj: Object,
    prog: i32,
    cfg: i32,
    template: i32,
    counts: i32,
}

/// Frames per BPF_PROG_RUN call: about 25 ms at the generator's speed, so
/// that a run ends close to its deadline.
const CHUNK: u32 = 1 << 18;

impl Generator {
    pub fn load() -> Result<Generator> {
        let obj = Object::load(GEN_OBJECT, "generator")?;
        let prog = obj.prog_fd("bench_gen")?;
        let cfg = obj.map_fd("bench_gen_cfg")?;
        let template = obj.map_fd("bench_gen_template")?;
        let counts = obj.map_fd("bench_gen_count")?;
        Ok(Generator {
            _obj: obj,
            prog,
            cfg,
            template,
            counts,
        })
    }

    /// Clients: `addrs` source addresses from 198.19.0.0, `ports` source
    /// ports each; `threads` generator threads on CPUs 0..threads.
    pub fn configure(&self, addrs: u32, ports: u32, threads: usize) -> Result<()> {
        let c = GenCfg {
            first_client: u32::from_be_bytes(crate::common::FIRST_CLIENT),
            addrs,
            ports,
            stride: threads as u32,
            first_port: crate::common::FIRST_CLIENT_PORT,
            dst_ports: 0,
        };
        update(self.cfg, 0, &c)
    }

    /// Like [`Generator::configure`], but client `i` sends to destination
    /// port `first_port + i / addrs` (from the template's source port):
    /// one listener per port.
    pub fn configure_dst_ports(
        &self,
        addrs: u32,
        first_port: u16,
        ports: u32,
        threads: usize,
    ) -> Result<()> {
        let c = GenCfg {
            first_client: u32::from_be_bytes(crate::common::FIRST_CLIENT),
            addrs,
            ports,
            stride: threads as u32,
            first_port,
            dst_ports: 1,
        };
        update(self.cfg, 0, &c)
    }

    /// The frame every generated frame starts from (exactly 64 bytes:
    /// bpf/bench_gen.c copies it over each frame before rewriting the
    /// client).
    pub fn set_template(&self, frame: &[u8]) -> Result<()> {
        let t: [u8; 64] = frame
            .try_into()
            .map_err(|_| anyhow::anyhow!("the template frame must be 64 bytes"))?;
        update(self.template, 0, &t)
    }

    /// Frames the program rejected (not a usable template): must stay 0.
    pub fn rejected(&self) -> u64 {
        percpu_sum(self.counts, 2)
    }

    /// Sends `frame` (rewritten per client) out of `dev` in `ns` from one
    /// thread per CPU in `cpus`, for `duration`. `pps`: per-thread pace
    /// (0: as fast as possible).
    pub fn run(
        &self,
        ns: &str,
        dev: &str,
        frame: &[u8],
        cpus: &[usize],
        duration: Duration,
        pps: u64,
    ) -> Result<GenRun> {
        self.set_template(frame)?;
        let before = percpu_sum(self.counts, 1);
        let go = Barrier::new(cpus.len() + 1);
        let failed = AtomicBool::new(false);
        let prog = self.prog;
        let elapsed = std::thread::scope(|s| -> Result<Duration> {
            let handles: Vec<_> = cpus
                .iter()
                .map(|&cpu| {
                    let go = &go;
                    let failed = &failed;
                    s.spawn(move || -> Result<()> {
                        let setup = (|| {
                            netns::enter(ns)?;
                            netns::pin(cpu)?;
                            ifindex(dev)
                        })();
                        go.wait();
                        let idx = setup?;
                        let r = live_frames(prog, idx, frame, duration, pps, failed);
                        if r.is_err() {
                            failed.store(true, Ordering::Relaxed);
                        }
                        r
                    })
                })
                .collect();
            go.wait();
            let t0 = Instant::now();
            for h in handles {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a generator thread panicked"))??;
            }
            Ok(t0.elapsed())
        })?;
        Ok(GenRun {
            sent: percpu_sum(self.counts, 1) - before,
            elapsed,
        })
    }
}

/// One thread's generator loop: BPF_PROG_RUN with live frames, CHUNK frames
/// per call, until the deadline.
fn live_frames(
    prog: i32,
    ifindex: u32,
    frame: &[u8],
    duration: Duration,
    pps: u64,
    failed: &AtomicBool,
) -> Result<()> {
    let ctx = bpf::xdp_md {
        data: 0,
        data_end: frame.len() as u32,
        data_meta: 0,
        ingress_ifindex: ifindex,
        rx_queue_index: 0,
        egress_ifindex: 0,
    };
    let chunk = if pps > 0 {
        // About 100 calls per second when paced.
        ((pps / 100).max(64) as u32).min(CHUNK)
    } else {
        CHUNK
    };
    let start = Instant::now();
    let deadline = start + duration;
    let mut done: u64 = 0;
    while Instant::now() < deadline && !failed.load(Ordering::Relaxed) {
        let mut opts = bpf::bpf_test_run_opts {
            sz: std::mem::size_of::<bpf::bpf_test_run_opts>() as _,
            data_in: frame.as_ptr() as *const c_void,
            data_size_in: frame.len() as u32,
            ctx_in: &ctx as *const bpf::xdp_md as *const c_void,
            ctx_size_in: std::mem::size_of::<bpf::xdp_md>() as u32,
            repeat: chunk as i32,
            flags: bpf::BPF_F_TEST_XDP_LIVE_FRAMES,
            batch_size: 64,
            ..Default::default()
        };
        // SAFETY: opts points at live buffers (frame, ctx) for the call.
        let ret = unsafe { bpf::bpf_prog_test_run_opts(prog, &mut opts) };
        if ret != 0 {
            return Err(errno(ret, "BPF_PROG_RUN (live frames)"))
                .context("the generator needs Linux 5.18+ and a test frame of 64 bytes or more");
        }
        done += u64::from(chunk);
        if pps > 0 {
            let due = start + Duration::from_secs_f64(done as f64 / pps as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
    }
    Ok(())
}
