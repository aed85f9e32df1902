//! The staged burst pipeline (`Processor::process_burst`, what the AF_XDP
//! worker runs) decides exactly what processing one frame at a time
//! (`Processor::process`) decides: same verdicts, same bytes out, same
//! flows and sessions recorded. Its early stages only prefetch and compute
//! what no earlier frame changes, so a burst holding several frames of one
//! new flow still sends them all to one backend, even with round robin,
//! where each scheduling decision moves a cursor; and a client's second new
//! flow in a burst finds the session its first one recorded, although stage
//! 3 found the client without one.

use l4lb::dataplane::pipeline::{Chunks, Meta};
use l4lb::dataplane::{Port, Verdict};
use l4lb::replay::{Replayer, CLIENT_IF_MAC};

#[path = "../bench/common.rs"]
mod common;
use common::*;

const NOW: u32 = 1_000;

fn replayer(scheduler: &str) -> Replayer {
    let (_, text) = offline_config();
    let text = text.replace("weighted_source_ip", scheduler);
    let cfg = l4lb::config::Config::from_str(&text, "<test>").expect("config");
    Replayer::new(&cfg).expect("replayer")
}

/// 640 frames: 10 bursts of 64, in which every new flow shows up three
/// times (UDP and TCP alike), each client opens two flows in a row (with
/// persistence, the second must follow the session the first recorded
/// earlier in the burst), and clients return in later bursts.
fn stream() -> Vec<u8> {
    let mut out = Vec::new();
    for burst in 0..10u32 {
        for k in 0..64u32 {
            let flow = burst * 21 + k / 3 % 21;
            let proto = if flow % 4 < 2 { Proto::Udp } else { Proto::Tcp };
            let (pair, second) = (flow / 2, flow % 2);
            let client = client_addr(pair % 40);
            let port = FIRST_CLIENT_PORT + (2 * (pair / 40) + second) as u16;
            out.extend_from_slice(&client_frame(proto, CLIENT_IF_MAC, client, port));
        }
    }
    out
}

/// The counters of what was recorded: flows, sessions, and new flows sent
/// to a session's backend.
fn counts(r: &Replayer) -> [u64; 4] {
    let c = &r.stats.core;
    [
        &c.flows_created,
        &c.flows_evicted,
        &c.persist_hits,
        &c.persist_recorded,
    ]
    .map(|n| n.load(std::sync::atomic::Ordering::Relaxed))
}

fn dst_of(frame: &[u8]) -> ([u8; 4], u16) {
    (
        frame[30..34].try_into().unwrap(),
        u16::from_be_bytes([frame[36], frame[37]]),
    )
}

#[test]
fn bursts_decide_what_frame_by_frame_decides() {
    for scheduler in [
        "weighted_source_ip",
        "weighted_round_robin",
        "weighted_least_connections",
    ] {
        let one = replayer(scheduler);
        let staged = replayer(scheduler);
        let mut a = stream();
        let mut b = a.clone();

        let want: Vec<Verdict> = a
            .chunks_exact_mut(FRAME_LEN)
            .map(|f| one.process(f, NOW))
            .collect();
        let mut got = Vec::new();
        let mut metas = [Meta::default(); 64];
        let mut verdicts = [Verdict::Pass; 64];
        for burst in b.chunks_mut(64 * FRAME_LEN) {
            staged.processor(NOW).process_burst(
                &mut Chunks {
                    buf: burst,
                    frame_len: FRAME_LEN,
                },
                &mut metas,
                &mut verdicts,
            );
            got.extend_from_slice(&verdicts);
        }
        assert_eq!(got, want, "{scheduler}: verdicts");
        assert_eq!(counts(&staged), counts(&one), "{scheduler}: counters");
        assert!(want.iter().all(|v| *v == Verdict::Tx(Port::Backend)));
        assert!(a == b, "{scheduler}: rewritten frames differ");

        // Each flow's three frames went to one backend.
        let original = stream();
        let mut seen = std::collections::HashMap::new();
        for (orig, out) in original.chunks(FRAME_LEN).zip(b.chunks(FRAME_LEN)) {
            let flow = (orig[23], orig[26..30].to_vec(), orig[34..36].to_vec());
            let to = dst_of(out);
            assert_eq!(
                *seen.entry(flow).or_insert(to),
                to,
                "{scheduler}: one flow, two backends"
            );
        }
        let backends: std::collections::HashSet<_> = seen.values().collect();
        assert!(backends.len() >= 3, "{scheduler}: spread over {backends:?}");
    }
}
