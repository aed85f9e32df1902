//! The command line.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "l4lb", version, about = "Layer-4 load balancer on AF_XDP")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the load balancer (root). Stops on SIGINT/SIGTERM, detaching XDP.
    Run {
        /// Config file; without it, the built-in default (config/l4lb.toml).
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Validate a config: prints a summary, or FILE:LINE:COL errors and exits 2.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Print the backend each client (read from stdin, one ADDR or ADDR:PORT
    /// per line) would reach through a listener, all servers up.
    Simulate {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(short, long)]
        listener: String,
    },
    /// Show a running instance's counters (over its control socket).
    Stats {
        /// Config of the instance (to find its control socket).
        #[arg(short, long, conflicts_with = "socket")]
        config: Option<PathBuf>,
        /// Control socket path (default /run/l4lb/l4lb.sock).
        #[arg(short, long)]
        socket: Option<PathBuf>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Replay a pcap through the data-plane pipeline offline (no root).
    Replay {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long = "in")]
        input: PathBuf,
        #[arg(long = "out")]
        output: PathBuf,
    },
}
