//! `l4lb-bench pipeline-loop`: the pipeline benchmark's workloads in a
//! plain loop, for counting instructions under valgrind
//! (`scripts/bench.sh icount`).
//!
//! Times on this VM move by 10-30 % between runs; the number of
//! instructions a packet takes moves by at most one (the tables' hash is
//! seeded per process), though a change elsewhere in this binary can move
//! it by a few, through inlining. `scripts/bench.sh icount` runs
//! this loop under `valgrind --tool=callgrind` for N and 2N bursts and
//! divides the difference by N × 64 frames, so set-up cancels out.
//!
//! The workloads are those of bench/pipeline.rs: the same config (3
//! backends per service, persistence 300 s), 64-byte IPv4 frames (UDP,
//! but for `new-session-tcp`), 64 per burst through
//! `Processor::process_burst`, each burst restored from a pristine copy
//! first:
//! * `established`: one burst of 64 established flows, over and over
//!   (`pipeline/established_udp_hot`);
//! * `new-session`: 1024 bursts of 65,536 client addresses in turn, the
//!   clock moving past both timeouts after each round, so that every frame
//!   creates its session (`pipeline/new_session_udp`);
//! * `new-session-tcp`: the same with TCP SYNs (`pipeline/new_session_tcp`);
//! * `reply`: the servers' replies to the 64 established flows, over and
//!   over (`pipeline/reply_udp_hot`).

use anyhow::{bail, Result};
use l4lb::dataplane::pipeline::{Chunks, Meta};
use l4lb::dataplane::{Port, Verdict};
use l4lb::replay::{Replayer, CLIENT_IF_MAC};

use crate::common::{self, Proto, FRAME_LEN};

const BURST: usize = 64;

pub fn run(workload: &str, bursts: usize) -> Result<()> {
    let pool = common::MAX_CLIENT_ADDRS as usize / BURST;
    let (pool_bursts, proto) = match workload {
        "established" | "reply" => (1, Proto::Udp),
        "new-session" => (pool, Proto::Udp),
        "new-session-tcp" => (pool, Proto::Tcp),
        other => {
            bail!("unknown workload {other:?}: established, new-session, new-session-tcp or reply")
        }
    };
    let new_session = pool_bursts > 1;
    let (cfg, _) = common::offline_config();
    let r = Replayer::new(&cfg)?;
    let mut metas = [Meta::default(); BURST];
    let mut verdicts = [Verdict::Pass; BURST];
    let mut now = 1_000_000;
    let mut pool = common::client_frames(proto, CLIENT_IF_MAC, pool_bursts * BURST);
    let mut out = Port::Backend;
    if workload == "reply" {
        // The flows first (as in bench/pipeline.rs): the forwarded frames,
        // answered by their servers, are the pool.
        let mut fwd = pool.clone();
        r.processor(now).process_burst(
            &mut Chunks {
                buf: &mut fwd,
                frame_len: FRAME_LEN,
            },
            &mut metas,
            &mut verdicts,
        );
        if verdicts.iter().any(|v| *v != Verdict::Tx(Port::Backend)) {
            bail!("the reply workload's flows were not all forwarded: {verdicts:?}");
        }
        pool = fwd
            .chunks_exact(FRAME_LEN)
            .flat_map(|f| common::reply_frame(Proto::Udp, f))
            .collect();
        out = Port::Client;
    }
    let mut work = vec![0u8; BURST * FRAME_LEN];
    let mut forwarded = 0usize;
    // One untimed round first: the established flows exist, and every
    // later round of new sessions finds its clients expired.
    for i in 0..pool_bursts + bursts {
        let at = (i % pool_bursts) * BURST * FRAME_LEN;
        work.copy_from_slice(&pool[at..at + BURST * FRAME_LEN]);
        r.processor(now).process_burst(
            &mut Chunks {
                buf: &mut work,
                frame_len: FRAME_LEN,
            },
            &mut metas,
            &mut verdicts,
        );
        forwarded += verdicts.iter().filter(|v| **v == Verdict::Tx(out)).count();
        if new_session && (i + 1) % pool_bursts == 0 {
            now += 1000;
        }
    }
    let frames = (pool_bursts + bursts) * BURST;
    if forwarded != frames {
        bail!("{forwarded} of {frames} frames sent on ({out:?}): the workload is broken");
    }
    let created = r
        .stats
        .core
        .flows_created
        .load(std::sync::atomic::Ordering::Relaxed) as usize;
    let want = if new_session { frames } else { BURST };
    if created != want {
        bail!("{created} flows created, expected {want}");
    }
    Ok(())
}
