//! Offline replay: feeds captured frames through the data plane's pipeline
//! over an in-memory ring, with no kernel and no root, and records what it
//! would transmit.
//!
//! The clock is the capture's: each frame is processed at its timestamp, so
//! flow expiry replays as it happened.

use crate::config::Config;
use crate::config::WhenFull;
use crate::control::snapshot::{Links, Snapshot};
use crate::dataplane::counters::{DropReason, Shared, WorkerStats};
use crate::dataplane::pipeline::{Port, Processor, Tables, Verdict};
use crate::table::FlowTable;
use crate::util::Mac;
use anyhow::{Context, Result};
use pcap_file::pcap::{PcapPacket, PcapReader, PcapWriter};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

/// MACs the replay assumes for l4lb's own interfaces (locally administered).
pub const CLIENT_IF_MAC: Mac = [0x02, 0, 0, 0, 0, 0x01];
pub const BACKEND_IF_MAC: Mac = [0x02, 0, 0, 0, 0, 0x02];

/// The pipeline with its state, for replays and table-driven tests.
pub struct Replayer {
    pub snapshot: Snapshot,
    pub tables: Tables,
    pub stats: Arc<WorkerStats>,
    pub shared: Shared,
}

impl Replayer {
    /// A replayer for `config`. Next-hop MACs come from the config's static
    /// neighbours (there is no kernel to ask); a missing one makes frames to
    /// that next hop drop as `no_neighbour`, as live.
    pub fn new(config: &Config) -> Result<Replayer> {
        let mac_of = |ip: &std::net::IpAddr| {
            config
                .instance
                .neighbours
                .iter()
                .find(|n| &n.address == ip)
                .map(|n| n.mac)
        };
        let links = Links {
            client_if_mac: CLIENT_IF_MAC,
            backend_if_mac: BACKEND_IF_MAC,
            gateway_mac: mac_of(&config.instance.client_gateway),
        };
        let snapshot = Snapshot::offline(config, links, &mac_of).map_err(anyhow::Error::msg)?;
        let inst = &config.instance;
        let stats = Arc::new(WorkerStats::new());
        Ok(Replayer {
            snapshot,
            tables: Tables {
                flows: FlowTable::new(inst.flow_table_capacity.min(1 << 20)),
                persist: FlowTable::new(inst.persistence_capacity.min(1 << 20)),
                flow_timeout: inst.flow_idle_timeout,
                closed_timeout: inst.tcp_closed_timeout,
                syn_timeout: inst.tcp_syn_timeout,
                persist_evict: inst.persistence_when_full == WhenFull::EvictOldest,
            },
            shared: Shared::new(vec![Arc::clone(&stats)]),
            stats,
        })
    }

    /// Processes one frame at time `now` (seconds), rewriting it in place.
    pub fn process(&self, frame: &mut [u8], now: u32) -> Verdict {
        self.processor(now).process(frame)
    }

    /// The worker's processor over this replayer's snapshot, tables and
    /// counters at `now`: for burst processing
    /// ([`Processor::process_burst`]), as the worker does it.
    pub fn processor(&self, now: u32) -> Processor<'_> {
        Processor {
            snapshot: &self.snapshot,
            tables: &self.tables,
            stats: &self.stats,
            shared: &self.shared,
            now,
        }
    }
}

/// Verdict counts of a replay.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub frames: u64,
    pub forwarded: u64,
    pub replied: u64,
    pub passed: u64,
    pub dropped: BTreeMap<&'static str, u64>,
}

impl Report {
    pub fn add(&mut self, v: Verdict) {
        self.frames += 1;
        match v {
            Verdict::Tx(Port::Backend) => self.forwarded += 1,
            Verdict::Tx(Port::Client) => self.replied += 1,
            Verdict::Pass => self.passed += 1,
            Verdict::Drop(why) => *self.dropped.entry(why.name()).or_default() += 1,
        }
    }

    pub fn render(&self) -> String {
        let mut s = format!(
            "frames {}\nforwarded to backends {}\nreplies to clients {}\npassed to kernel {}\n",
            self.frames, self.forwarded, self.replied, self.passed
        );
        for r in DropReason::ALL {
            if let Some(n) = self.dropped.get(r.name()) {
                s.push_str(&format!("dropped {} {}\n", r.name(), n));
            }
        }
        s
    }
}

/// Replays `input` into `output` (the frames l4lb would transmit, in order,
/// with their input timestamps).
pub fn replay_file(config: &Config, input: &Path, output: &Path) -> Result<Report> {
    let r = Replayer::new(config)?;
    let f = File::open(input).with_context(|| format!("opening {}", input.display()))?;
    let mut reader =
        PcapReader::new(f).with_context(|| format!("{}: not a pcap file", input.display()))?;
    let header = reader.header();
    let out = File::create(output).with_context(|| format!("creating {}", output.display()))?;
    let mut writer = PcapWriter::with_header(out, header).context("writing the pcap header")?;
    let mut report = Report::default();
    let mut n = 0usize;
    while let Some(pkt) = reader.next_packet() {
        n += 1;
        let pkt =
            pkt.with_context(|| format!("{}: frame {n}: unreadable record", input.display()))?;
        let mut frame = pkt.data.to_vec();
        let v = r.process(&mut frame, pkt.timestamp.as_secs() as u32);
        report.add(v);
        if let Verdict::Tx(_) = v {
            writer
                .write_packet(&PcapPacket::new(pkt.timestamp, frame.len() as u32, &frame))
                .context("writing the output pcap")?;
        }
    }
    Ok(report)
}
