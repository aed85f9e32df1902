//! l4lb's AF_XDP ring I/O (`dataplane::xsk`) on real sockets: a veth pair
//! in a network namespace of this test's own, no XDP program and no
//! traffic. Root required; the namespace is deleted on drop.

use l4lb::dataplane::xsk::{self, Bind, XskPair, RING_SIZE};
use std::os::fd::AsRawFd;
use std::process::Command;

const NS: &str = "l4lb-xsk-test";

/// The namespace with a veth pair `xa`/`xb`, both up; deleted on drop.
struct Netns;

impl Netns {
    fn up() -> Netns {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root");
        let _ = Command::new("ip").args(["netns", "del", NS]).status();
        let ns = Netns;
        for args in [
            vec!["netns", "add", NS],
            vec![
                "-n", NS, "link", "add", "xa", "type", "veth", "peer", "name", "xb",
            ],
            vec!["-n", NS, "link", "set", "xa", "up"],
            vec!["-n", NS, "link", "set", "xb", "up"],
        ] {
            let st = Command::new("ip").args(&args).status().expect("ip");
            assert!(st.success(), "ip {args:?}");
        }
        ns
    }

    /// Runs `f` on a thread inside the namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            let path = format!("/var/run/netns/{NS}");
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on an open namespace file; it moves only this
            // thread, which ends with `f`.
            let ret = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(ret, 0, "setns {path}");
            f()
        })
        .join()
        .expect("test thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", NS]).status();
    }
}

/// xsk-rs hands a TX ring all of a slice or none of it. `tx_produce` must
/// give the ring what it has room for: a burst that does not fit whole
/// would otherwise wait while the ring has room, and be dropped as
/// `tx_ring_full` when more frames arrive behind it.
#[test]
fn tx_produce_fills_the_ring_to_the_last_free_slot() {
    let ns = Netns::up();
    let (first, second, third, in_flight) = ns.run(|| {
        let mut pair = XskPair::new("xa", "xb", 0, Bind::Copy).expect("AF_XDP sockets");
        let free = pair.prime();
        let port = &mut pair.ports[0];
        // Nothing kicks the kernel, so nothing leaves the ring.
        let first = xsk::tx_produce(port, &free[..2000]);
        let second = xsk::tx_produce(port, &free[2000..2064]);
        let third = xsk::tx_produce(port, &free[2064..2070]);
        (first, second, third, port.in_flight)
    });
    assert_eq!(first, 2000);
    assert_eq!(
        second,
        RING_SIZE as usize - 2000,
        "the ring's last free slots"
    );
    assert_eq!(third, 0, "a full ring takes nothing");
    assert_eq!(in_flight, RING_SIZE);
}
