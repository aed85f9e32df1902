//! The staged burst pipeline (`Processor::process_burst`, what the AF_XDP
//! worker runs) decides exactly what processing one frame at a time
//! (`Processor::process`) decides: same verdicts, same bytes out, same
//! flows and sessions recorded, same counts. Its early stages only
//! prefetch and compute what no earlier frame changes, so a burst holding
//! several frames of one new flow still sends them all to one backend,
//! even with round robin, where each scheduling decision moves a cursor;
//! and a client's second new flow in a burst finds the session its first
//! one recorded, although stage 3 found the client without one.

use l4lb::dataplane::checksum::checksum;
use l4lb::dataplane::pipeline::{Chunks, Meta};
use l4lb::dataplane::{DropReason, Port, Verdict};
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

/// What the worker reports: frames forwarded, replied, passed to the kernel
/// and dropped as TTL-expired.
fn verdict_counts(r: &Replayer) -> [u64; 4] {
    let c = &r.stats.core;
    [
        c.forwarded.load(std::sync::atomic::Ordering::Relaxed),
        c.replied.load(std::sync::atomic::Ordering::Relaxed),
        c.passed.load(std::sync::atomic::Ordering::Relaxed),
        r.stats.drops(DropReason::TtlExceeded),
    ]
}

/// A burst counts its forwarded and replied frames once, at its end, and
/// every other verdict as it comes: the totals are what frame-by-frame
/// processing counts. The second burst mixes replies to the first burst's
/// flows, new clients, frames for the kernel (not IP) and client frames
/// whose TTL runs out.
#[test]
fn bursts_count_every_verdict_as_frame_by_frame_does() {
    let one = replayer("weighted_source_ip");
    let staged = replayer("weighted_source_ip");
    let mut first = client_frames(Proto::Udp, CLIENT_IF_MAC, 64);
    let mut second = Vec::new();
    for (k, f) in client_frames(Proto::Udp, CLIENT_IF_MAC, 128)
        .chunks(FRAME_LEN)
        .skip(64)
        .enumerate()
    {
        let mut f = f.to_vec();
        if (40..50).contains(&k) {
            // ARP's EtherType: not IP.
            f[12..14].copy_from_slice(&[0x08, 0x06]);
        } else if k >= 50 {
            // TTL 1, with the header checksum made right again.
            f[22] = 1;
            f[24..26].copy_from_slice(&[0, 0]);
            let sum = checksum(&f[14..34]);
            f[24..26].copy_from_slice(&sum.to_be_bytes());
        }
        second.extend_from_slice(&f);
    }
    let mut metas = [Meta::default(); 64];
    let mut verdicts = [Verdict::Pass; 64];
    let mut burst = |r: &Replayer, frames: &mut [u8]| {
        r.processor(NOW).process_burst(
            &mut Chunks {
                buf: frames,
                frame_len: FRAME_LEN,
            },
            &mut metas,
            &mut verdicts,
        );
        verdicts
    };
    let mut first_staged = first.clone();
    for f in first.chunks_exact_mut(FRAME_LEN) {
        one.process(f, NOW);
    }
    burst(&staged, &mut first_staged);
    assert!(
        first == first_staged,
        "first burst: rewritten frames differ"
    );
    // Replies to the first 30 flows take the first 30 places; places 30
    // to 39 stay new clients.
    for (k, f) in first.chunks(FRAME_LEN).take(30).enumerate() {
        second[k * FRAME_LEN..(k + 1) * FRAME_LEN].copy_from_slice(&reply_frame(Proto::Udp, f));
    }
    let mut second_staged = second.clone();
    let want: Vec<Verdict> = second
        .chunks_exact_mut(FRAME_LEN)
        .map(|f| one.process(f, NOW))
        .collect();
    let got = burst(&staged, &mut second_staged);
    assert_eq!(got[..], want[..]);
    assert_eq!(verdict_counts(&one), [74, 30, 10, 14]);
    assert_eq!(verdict_counts(&staged), verdict_counts(&one));
}
