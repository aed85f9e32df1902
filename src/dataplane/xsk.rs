//! AF_XDP ring I/O: the one place in the data plane with `unsafe`.
//!
//! # Frame ownership
//! Each worker owns one UMEM shared by its two sockets (client side and
//! backend side, same queue id), so a frame received on one port can be
//! transmitted on the other without a copy. A frame is, at any moment, in
//! exactly one of: the worker's free list, a fill ring, an RX ring (kernel
//! wrote it, we have not consumed it), the worker's hands (between
//! `rx_burst` and `tx_burst`), a TX ring, or a completion ring. Every
//! `unsafe` call below relies on that invariant: a descriptor is only
//! touched while the worker holds it.

use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, RawFd};
use xsk_rs::config::{
    BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig,
};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, TxQueue, Umem};

/// Ring sizes (descriptors). 2048 keeps a 64-frame burst far from the ring
/// limits while the UMEM stays small (8192 frames of 2 KiB = 16 MiB).
pub const RING_SIZE: u32 = 2048;
pub const FRAME_COUNT: u32 = 4 * RING_SIZE;
pub const FRAME_SIZE: u32 = 2048;
/// The kernel keeps `XDP_PACKET_HEADROOM` (256 bytes) of every UMEM frame
/// for itself: the longest frame a socket receives is 1792 bytes, Ethernet
/// header included. Longer ones are dropped by the kernel (counted only in
/// the socket's `rx_dropped`), in native and SKB attach alike (measured on
/// veth: a 1792-byte UDP frame forwarded, 1793 bytes lost).
pub const MAX_FRAME_LEN: u32 = FRAME_SIZE - KERNEL_HEADROOM;
/// `XDP_PACKET_HEADROOM`: the bytes of each UMEM frame the kernel keeps.
pub const KERNEL_HEADROOM: u32 = 256;
/// The largest interface MTU whose every frame l4lb receives whole (no
/// VLAN tags: see `packet.rs`).
pub const MAX_MTU: u32 = MAX_FRAME_LEN - crate::dataplane::packet::ETH_LEN as u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bind {
    Auto,
    Copy,
    ZeroCopy,
}

/// One AF_XDP socket with its rings.
pub struct XskPort {
    pub tx: TxQueue,
    pub rx: RxQueue,
    pub fq: FillQueue,
    pub cq: CompQueue,
    /// Frames handed to the TX ring and not yet completed.
    pub in_flight: u32,
}

impl XskPort {
    pub fn fd(&self) -> RawFd {
        self.rx.fd().as_raw_fd()
    }
}

/// A worker's UMEM, its two ports and the descriptors of all its frames.
pub struct XskPair {
    pub umem: Umem,
    pub ports: [XskPort; 2],
    pub frames: Vec<FrameDesc>,
}

fn socket_config(bind: Bind) -> anyhow::Result<SocketConfig> {
    let mut flags = BindFlags::XDP_USE_NEED_WAKEUP;
    match bind {
        Bind::Auto => {}
        Bind::Copy => flags |= BindFlags::XDP_COPY,
        Bind::ZeroCopy => flags |= BindFlags::XDP_ZEROCOPY,
    }
    Ok(SocketConfig::builder()
        .rx_queue_size(QueueSize::new(RING_SIZE)?)
        .tx_queue_size(QueueSize::new(RING_SIZE)?)
        // l4lb loads its own XDP program and puts the socket into its map.
        .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
        .bind_flags(flags)
        .build())
}

impl XskPair {
    /// Creates the UMEM and binds one socket per interface on `queue`.
    /// Sockets are created one after the other (concurrent creation on one
    /// interface races in libxdp and fails with EBUSY).
    pub fn new(client_if: &str, backend_if: &str, queue: u32, bind: Bind) -> anyhow::Result<Self> {
        use anyhow::Context;
        let umem_cfg = UmemConfig::builder()
            .frame_size(FrameSize::new(FRAME_SIZE)?)
            .fill_queue_size(QueueSize::new(RING_SIZE)?)
            .comp_queue_size(QueueSize::new(RING_SIZE)?)
            .build()?;
        let count = NonZeroU32::new(FRAME_COUNT).expect("non-zero");
        let (umem, frames) = Umem::new(umem_cfg, count, false)
            .map_err(anyhow::Error::new)
            .context("creating the UMEM (is RLIMIT_MEMLOCK too low?)")?;
        let cfg = socket_config(bind)?;
        let open = |ifname: &str| -> anyhow::Result<XskPort> {
            let iface: Interface = ifname
                .parse()
                .map_err(|e| anyhow::anyhow!("interface name {ifname:?}: {e}"))?;
            // SAFETY: each (interface, queue) pair is bound once from this
            // UMEM, so libxdp hands back fresh fill/completion rings; the
            // INHIBIT_PROG_LOAD flag is set, as xsk-rs requires for shared
            // UMEMs.
            // (The error's source is the errno: kept, so that the message
            // says EBUSY or EINVAL rather than just "non-zero error code".)
            let (tx, rx, rings) = unsafe { xsk_rs::Socket::new(cfg, &umem, &iface, queue) }
                .map_err(anyhow::Error::new)
                .with_context(|| {
                    format!("binding an AF_XDP socket to {ifname} queue {queue} ({bind:?} mode)")
                })?;
            let (fq, cq) = rings.ok_or_else(|| {
                anyhow::anyhow!("{ifname} queue {queue}: no fill/completion rings returned")
            })?;
            Ok(XskPort {
                tx,
                rx,
                fq,
                cq,
                in_flight: 0,
            })
        };
        let client = open(client_if)?;
        let backend = open(backend_if)?;
        Ok(XskPair {
            umem,
            ports: [client, backend],
            frames,
        })
    }
}

impl XskPair {
    /// Takes the UMEM's frames, gives each port's fill ring a ring's worth,
    /// and returns the rest: the worker's free list. Its capacity is every
    /// frame of the UMEM, so pushing completed frames back never
    /// reallocates.
    pub fn prime(&mut self) -> Vec<FrameDesc> {
        let mut free = std::mem::take(&mut self.frames);
        debug_assert_eq!(free.len(), FRAME_COUNT as usize);
        for port in self.ports.iter_mut() {
            let take = (RING_SIZE as usize).min(free.len());
            let at = free.len() - take;
            let n = fill(port, &free[at..]);
            free.truncate(free.len() - n);
        }
        free
    }

    /// The refill stage: tops up both fill rings from the free list (the
    /// most recently freed frames first), then wakes the driver of a port
    /// whose fill ring asks for it.
    #[inline]
    pub fn refill(&mut self, free: &mut Vec<FrameDesc>) {
        for port in self.ports.iter_mut() {
            if !free.is_empty() {
                let want = port.fq.nb_free(free.len() as u32) as usize;
                if want > 0 {
                    let at = free.len() - want.min(free.len());
                    let n = fill(port, &free[at..]);
                    free.truncate(free.len() - n);
                }
            }
            // A zero-copy driver that found the fill ring empty stops
            // receiving and sets the ring's need-wakeup flag; it resumes
            // only when the socket is polled (libxdp's and the kernel's
            // xdpsock do this after every fill). Without this, the queue
            // stalled until the loop had idled 20,000 times. Copy mode
            // never sets the flag: one load per port and loop.
            if port.fq.needs_wakeup() {
                wake(port.fd());
            }
        }
    }

    /// Blocks up to 1 ms in poll(2) on both RX rings: what an idle loop
    /// does. Also serves as the fill-ring wakeup the kernel asks for with
    /// `needs_wakeup`.
    pub fn sleep_until_rx(&self) {
        let mut fds = self.ports.each_ref().map(|p| libc::pollfd {
            fd: p.fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: `fds` is a valid array of two pollfd for the duration of
        // the call.
        unsafe {
            libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1);
        }
    }
}

/// poll(2) on one socket without waiting: how the kernel is told that a
/// fill ring it flagged has frames again.
#[cold]
fn wake(fd: RawFd) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe {
        libc::poll(&mut p, 1, 0);
    }
}

/// The kernel's counters of one AF_XDP socket (`XDP_STATISTICS`): what it
/// dropped or could not do on the socket's behalf, which l4lb's own
/// counters never see.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SocketStats {
    /// Frames dropped on receive: longer than a UMEM frame takes, or no
    /// frame to put them in.
    pub rx_dropped: u64,
    /// Frames dropped because the RX ring was full (the worker fell
    /// behind).
    pub rx_ring_full: u64,
    /// Times the kernel found the fill ring empty.
    pub rx_fill_ring_empty: u64,
    pub rx_invalid_descs: u64,
    pub tx_invalid_descs: u64,
    /// Times the kernel was asked to send and found the TX ring empty:
    /// normal (an idle worker's `poll(2)` asks too, about 1000 times a
    /// second).
    pub tx_ring_empty: u64,
}

/// Reads the `XDP_STATISTICS` of the AF_XDP socket `fd`. Any thread may:
/// the kernel sums its counters under the socket's lock.
pub fn socket_stats(fd: RawFd) -> std::io::Result<SocketStats> {
    // SAFETY: xdp_statistics is plain data; zero is a valid value.
    let mut st: libc::xdp_statistics = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::xdp_statistics>() as libc::socklen_t;
    // SAFETY: `st` and `len` are live and `len` is `st`'s size; the kernel
    // writes at most `len` bytes.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_XDP,
            libc::XDP_STATISTICS,
            (&mut st as *mut libc::xdp_statistics).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(SocketStats {
        rx_dropped: st.rx_dropped,
        rx_ring_full: st.rx_ring_full,
        rx_fill_ring_empty: st.rx_fill_ring_empty_descs,
        rx_invalid_descs: st.rx_invalid_descs,
        tx_invalid_descs: st.tx_invalid_descs,
        tx_ring_empty: st.tx_ring_empty_descs,
    })
}

/// Receives up to `out.len()` descriptors.
#[inline]
pub fn rx_burst(port: &mut XskPort, out: &mut [FrameDesc]) -> usize {
    // SAFETY: descriptors written into `out` are handed over by the kernel;
    // the worker holds them until it puts them into a TX, fill or free list.
    unsafe { port.rx.consume(out) }
}

/// The frame bytes of a descriptor the worker holds, read-only.
#[inline]
pub fn frame<'a>(umem: &'a Umem, desc: &'a FrameDesc) -> xsk_rs::umem::frame::Data<'a> {
    // SAFETY: as for `frame_mut`; nothing writes the frame while this
    // shared view lives (the worker only prefetches through it).
    unsafe { umem.data(desc) }
}

/// The frame bytes of a descriptor the worker holds.
#[inline]
pub fn frame_mut<'a>(umem: &'a Umem, desc: &'a mut FrameDesc) -> xsk_rs::umem::frame::DataMut<'a> {
    // SAFETY: `desc` came from this UMEM's RX ring and is held by the worker
    // alone (see the module comment), so nothing else accesses its memory.
    unsafe { umem.data_mut(desc) }
}

/// Hands descriptors to the TX ring, as many as it has room for (the
/// first ones); returns how many it took. xsk-rs takes a slice whole or
/// not at all, so a burst longer than the free slots would otherwise wait
/// while the ring has room.
#[inline]
pub fn tx_produce(port: &mut XskPort, descs: &[FrameDesc]) -> usize {
    let room = port.tx.nb_free(descs.len() as u32) as usize;
    let take = room.min(descs.len());
    if take == 0 {
        return 0;
    }
    // SAFETY: the worker holds these frames and gives them up here; it gets
    // them back through the completion ring.
    let n = unsafe { port.tx.produce(&descs[..take]) };
    port.in_flight += n as u32;
    n
}

/// Collects completed TX descriptors.
#[inline]
pub fn complete(port: &mut XskPort, out: &mut [FrameDesc]) -> usize {
    // SAFETY: completed frames are back in the worker's hands. Their length
    // is reset to 0 by xsk-rs, which does not matter: they go to a fill ring,
    // where the kernel sets the length of what it writes.
    let n = unsafe { port.cq.consume(out) };
    port.in_flight -= n as u32;
    n
}

/// Gives free frames to the fill ring; returns how many it took.
#[inline]
pub fn fill(port: &mut XskPort, descs: &[FrameDesc]) -> usize {
    // SAFETY: free frames are held by no one; the kernel owns them until
    // they come back through RX.
    unsafe { port.fq.produce(descs) }
}

/// Kicks of one TX ring per flush at most: 8 x 32 frames (the copy-mode
/// batch) covers two full RX bursts.
pub const MAX_KICKS: usize = 8;

/// The `flush` stage: copy mode sends at most 32 frames per `sendto()`, so
/// one kick per loop iteration would let the TX ring fill up (and frames be
/// dropped) while RX takes 64. Kicks until what is in flight has gone,
/// moving completed frames to `free` as they come; bounded, and stopping as
/// soon as a round completes nothing (zero-copy drivers complete later).
/// `free` has room for every frame of the UMEM, so it never reallocates.
#[inline]
pub fn flush(port: &mut XskPort, scratch: &mut [FrameDesc], free: &mut Vec<FrameDesc>) {
    for _ in 0..MAX_KICKS {
        if port.in_flight > 0 && port.tx.needs_wakeup() {
            // EAGAIN/EBUSY/ENOBUFS are absorbed by xsk-rs; other errors leave
            // frames in flight, retried on the next flush.
            let _ = port.tx.wakeup();
        }
        let done = complete(port, scratch);
        free.extend_from_slice(&scratch[..done]);
        if done == 0 || port.in_flight == 0 {
            break;
        }
    }
}
