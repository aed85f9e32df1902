//! Loading and attaching l4lb's XDP steering program (bpf/l4lb_steer.c,
//! compiled by build.rs and embedded in the binary), and keeping its maps in
//! step with the snapshot.
//!
//! One program object is loaded per interface, each with its own maps, so
//! that each interface's XSKMAP holds that interface's sockets.

use crate::control::snapshot::L4Key;
use crate::util::Addr16;
use anyhow::{bail, Context, Result};
use libbpf_sys as bpf;
use std::ffi::CString;
use std::os::raw::c_void;

static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/l4lb_steer.o"));

/// Size of the XSKMAP in bpf/l4lb_steer.c (MAX_QUEUES): the most workers.
pub const MAX_QUEUES: usize = 64;
// The config loader refuses more workers than the socket map has queues.
const _: () = assert!(MAX_QUEUES == crate::config::MAX_WORKERS);

const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    Native,
    Skb,
}

impl Attach {
    fn flags(self) -> u32 {
        match self {
            Attach::Native => XDP_FLAGS_DRV_MODE,
            Attach::Skb => XDP_FLAGS_SKB_MODE,
        }
    }
}

fn errno_err(ret: i32, what: &str) -> anyhow::Error {
    let code = if ret < 0 { -ret } else { ret };
    anyhow::anyhow!("{what}: {}", std::io::Error::from_raw_os_error(code))
}

/// The steering program attached to one interface.
pub struct Steering {
    obj: *mut bpf::bpf_object,
    ifindex: u32,
    ifname: String,
    mode: Attach,
    vips: i32,
    listeners: i32,
    backends: i32,
    local: i32,
    xsks: i32,
    stats: i32,
    attached: bool,
}

// SAFETY: the bpf_object is only used through map fds and libbpf calls that
// are thread-safe for distinct objects; Steering is owned by one thread at a
// time (moved into the control thread).
unsafe impl Send for Steering {}

#[repr(C)]
struct L4KeyC {
    addr: [u8; 16],
    port: u16,
    proto: u8,
    pad: u8,
}

fn map_fd(obj: *mut bpf::bpf_object, name: &str) -> Result<i32> {
    let c = CString::new(name).expect("no NUL");
    // SAFETY: obj is a loaded object; the name is a valid C string.
    let fd = unsafe { bpf::bpf_object__find_map_fd_by_name(obj, c.as_ptr()) };
    if fd < 0 {
        bail!("XDP object has no map {name}");
    }
    Ok(fd)
}

/// Opens (does not load) a BPF object embedded in the binary; `what` names
/// it in the error. The caller closes it with `bpf_object__close`.
pub fn open_embedded(image: &'static [u8], what: &str) -> Result<*mut bpf::bpf_object> {
    // SAFETY: a static ELF image; libbpf copies what it needs.
    let obj = unsafe {
        bpf::bpf_object__open_mem(
            image.as_ptr() as *const c_void,
            image.len() as _,
            std::ptr::null(),
        )
    };
    // SAFETY: libbpf_get_error understands libbpf's pointer encoding.
    let err = unsafe { bpf::libbpf_get_error(obj as *const c_void) };
    if obj.is_null() || err != 0 {
        bail!("opening the embedded {what} object failed ({err})");
    }
    Ok(obj)
}

impl Steering {
    /// Loads the program and attaches it to `ifname` in `mode`, replacing
    /// any XDP program a previous run left behind.
    pub fn attach(ifname: &str, ifindex: u32, mode: Attach) -> Result<Steering> {
        let name = CString::new("l4lb_steer").expect("no NUL");
        let obj = open_embedded(OBJECT, "XDP")?;
        let mut s = Steering {
            obj,
            ifindex,
            ifname: ifname.to_string(),
            mode,
            vips: -1,
            listeners: -1,
            backends: -1,
            local: -1,
            xsks: -1,
            stats: -1,
            attached: false,
        };
        // SAFETY: obj is a freshly opened object.
        let ret = unsafe { bpf::bpf_object__load(obj) };
        if ret != 0 {
            return Err(errno_err(ret, "loading the XDP program into the kernel"))
                .context("is this kernel built with CONFIG_BPF_SYSCALL and are we root?");
        }
        // SAFETY: obj is loaded; the name is valid.
        let prog = unsafe { bpf::bpf_object__find_program_by_name(obj, name.as_ptr()) };
        if prog.is_null() {
            bail!("XDP object has no program l4lb_steer");
        }
        // SAFETY: prog belongs to the loaded obj.
        let prog_fd = unsafe { bpf::bpf_program__fd(prog) };
        s.vips = map_fd(obj, "l4lb_vips")?;
        s.listeners = map_fd(obj, "l4lb_listeners")?;
        s.backends = map_fd(obj, "l4lb_backends")?;
        s.local = map_fd(obj, "l4lb_local")?;
        s.xsks = map_fd(obj, "l4lb_xsks")?;
        s.stats = map_fd(obj, "l4lb_steer_stats")?;

        // A program held open by a running process is not stale: it is
        // another l4lb's (or another XDP user's) on this interface, and
        // replacing it would silently cut that instance off.
        for id in attached_ids(ifindex) {
            if let Some((pid, comm)) = program_holder(id) {
                bail!(
                    "{ifname} already has XDP program {id}, held by running process {pid} \
                     ({comm}): another l4lb (or another XDP user) serves this interface; stop \
                     it first"
                );
            }
        }
        let stale = detach_any(ifindex);
        if stale {
            tracing::warn!(
                interface = ifname,
                "replaced an XDP program left on the interface"
            );
        }
        // SAFETY: valid ifindex and program fd; no options.
        let ret =
            unsafe { bpf::bpf_xdp_attach(ifindex as i32, prog_fd, mode.flags(), std::ptr::null()) };
        if ret != 0 {
            return Err(errno_err(
                ret,
                &format!("attaching XDP to {ifname} in {mode:?} mode"),
            ))
            .context(match mode {
                Attach::Native => "the driver may not support native XDP: try attach = \"skb\"",
                Attach::Skb => "is the interface up and not enslaved elsewhere?",
            });
        }
        s.attached = true;
        Ok(s)
    }

    /// Puts an AF_XDP socket into the XSKMAP for `queue`.
    pub fn add_socket(&self, queue: u32, fd: i32) -> Result<()> {
        let key = queue;
        let val = fd as u32;
        // SAFETY: key/value have the map's declared sizes (u32, u32).
        let ret = unsafe {
            bpf::bpf_map_update_elem(
                self.xsks,
                &key as *const u32 as *const c_void,
                &val as *const u32 as *const c_void,
                0,
            )
        };
        if ret != 0 {
            return Err(errno_err(
                ret,
                &format!(
                    "adding queue {queue}'s socket to the XSKMAP of {}",
                    self.ifname
                ),
            ));
        }
        Ok(())
    }

    /// Makes the XDP maps hold exactly these sets: new keys are added before
    /// stale ones are removed, so a reload never opens a gap.
    pub fn sync(
        &self,
        vips: &[Addr16],
        listeners: &[L4Key],
        backends: &[Addr16],
        local: &[Addr16],
    ) -> Result<()> {
        sync_map(self.vips, vips, "l4lb_vips", &self.ifname)?;
        let lk: Vec<L4KeyC> = listeners
            .iter()
            .map(|k| L4KeyC {
                addr: k.addr,
                port: k.port.to_be(),
                proto: k.proto,
                pad: 0,
            })
            .collect();
        sync_map(self.listeners, &lk, "l4lb_listeners", &self.ifname)?;
        sync_map(self.backends, backends, "l4lb_backends", &self.ifname)?;
        sync_map(self.local, local, "l4lb_local", &self.ifname)?;
        Ok(())
    }

    /// (redirected, passed) frames summed over CPUs.
    pub fn counters(&self) -> (u64, u64) {
        // SAFETY: plain sysconf query.
        let ncpu = unsafe { bpf::libbpf_num_possible_cpus() }.max(1) as usize;
        let mut out = [0u64; 2];
        for (idx, o) in out.iter_mut().enumerate() {
            let key = idx as u32;
            let mut vals = vec![0u64; ncpu];
            // SAFETY: a per-CPU array lookup writes one u64 per possible CPU.
            let ret = unsafe {
                bpf::bpf_map_lookup_elem(
                    self.stats,
                    &key as *const u32 as *const c_void,
                    vals.as_mut_ptr() as *mut c_void,
                )
            };
            if ret == 0 {
                *o = vals.iter().sum();
            }
        }
        (out[0], out[1])
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }
}

/// The ids of the XDP programs attached to `ifindex`, in SKB and driver
/// mode (0 for none).
fn attached_ids(ifindex: u32) -> Vec<u32> {
    let mut ids = Vec::new();
    for flags in [XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE] {
        let mut id: u32 = 0;
        // SAFETY: queries into a valid u32.
        let ret = unsafe { bpf::bpf_xdp_query_id(ifindex as i32, flags as i32, &mut id) };
        if ret == 0 && id != 0 {
            ids.push(id);
        }
    }
    ids
}

/// A process other than this one that holds a file descriptor of BPF
/// program `id` (its pid and command name), found through /proc. A
/// program attached by a process that has exited (killed, say) is held
/// by none: that one is stale.
fn program_holder(id: u32) -> Option<(u32, String)> {
    let me = std::process::id();
    let want = id.to_string();
    for proc_dir in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_dir
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(proc_dir.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let is_prog =
                std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:bpf-prog");
            if !is_prog {
                continue;
            }
            let info = std::fs::read_to_string(proc_dir.path().join("fdinfo").join(fd.file_name()))
                .unwrap_or_default();
            let held = info
                .lines()
                .any(|l| l.strip_prefix("prog_id:").map(str::trim) == Some(want.as_str()));
            if held {
                let comm = std::fs::read_to_string(proc_dir.path().join("comm"))
                    .map(|c| c.trim_end().to_string())
                    .unwrap_or_default();
                return Some((pid, comm));
            }
        }
    }
    None
}

/// Removes whatever XDP program is attached in either mode. True if one was.
pub fn detach_any(ifindex: u32) -> bool {
    let mut found = false;
    for flags in [XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE] {
        let mut id: u32 = 0;
        // SAFETY: queries into a valid u32.
        let ret = unsafe { bpf::bpf_xdp_query_id(ifindex as i32, flags as i32, &mut id) };
        if ret == 0 && id != 0 {
            found = true;
            // SAFETY: valid ifindex; no options.
            unsafe { bpf::bpf_xdp_detach(ifindex as i32, flags, std::ptr::null()) };
        }
    }
    found
}

/// Key/value-as-u32 map made to hold exactly `keys`. `map` and `ifname`
/// name it in errors.
fn sync_map<K>(fd: i32, keys: &[K], map: &str, ifname: &str) -> Result<()> {
    let ksz = std::mem::size_of::<K>();
    let one: u32 = 1;
    for k in keys {
        // SAFETY: K matches the map's key layout (repr(C) / byte arrays).
        let ret = unsafe {
            bpf::bpf_map_update_elem(
                fd,
                k as *const K as *const c_void,
                &one as *const u32 as *const c_void,
                0,
            )
        };
        if ret != 0 {
            let full = if ret == -libc::E2BIG {
                " (more than bpf/l4lb_steer.c gives it room for)"
            } else {
                ""
            };
            return Err(errno_err(
                ret,
                &format!(
                    "updating the XDP map {map} of {ifname} to {} key(s){full}",
                    keys.len()
                ),
            ));
        }
    }
    let wanted: std::collections::HashSet<Vec<u8>> = keys
        .iter()
        // SAFETY: reading K's bytes; K is plain data.
        .map(|k| unsafe { std::slice::from_raw_parts(k as *const K as *const u8, ksz) }.to_vec())
        .collect();
    let mut present = Vec::new();
    let mut cur: Option<Vec<u8>> = None;
    loop {
        let mut next = vec![0u8; ksz];
        let prev = cur
            .as_ref()
            .map_or(std::ptr::null(), |c| c.as_ptr() as *const c_void);
        // SAFETY: key buffers have the map's key size.
        let ret = unsafe { bpf::bpf_map_get_next_key(fd, prev, next.as_mut_ptr() as *mut c_void) };
        if ret != 0 {
            break;
        }
        present.push(next.clone());
        cur = Some(next);
    }
    for k in present {
        if !wanted.contains(&k) {
            // SAFETY: k has the map's key size.
            unsafe { bpf::bpf_map_delete_elem(fd, k.as_ptr() as *const c_void) };
        }
    }
    Ok(())
}

impl Drop for Steering {
    fn drop(&mut self) {
        if self.attached {
            // SAFETY: valid ifindex; detaches what we attached.
            let ret = unsafe {
                bpf::bpf_xdp_detach(self.ifindex as i32, self.mode.flags(), std::ptr::null())
            };
            // ENODEV: the interface is gone, and its program with it.
            if ret != 0 && ret != -libc::ENODEV {
                tracing::warn!(interface = %self.ifname, "detaching XDP failed: {}", std::io::Error::from_raw_os_error(-ret));
            }
        }
        // SAFETY: obj was opened by us and is closed once.
        unsafe { bpf::bpf_object__close(self.obj) };
    }
}
