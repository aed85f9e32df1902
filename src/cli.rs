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
    /// Print the backend each client on stdin would reach through a listener.
    ///
    /// Reads one ADDR or ADDR:PORT per line and prints `CLIENT BACKEND:PORT`,
    /// all servers up, using the data plane's scheduler code. For
    /// weighted_round_robin it assumes one
    /// worker starting its sequence and one new connection per line; for
    /// weighted_least_connections, no open connection at the start and one
    /// more per line, never closed. A client listed twice under persistence
    /// gets its persisted backend.
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
    /// Make a running instance re-read its config file (like SIGHUP).
    ///
    /// An invalid file changes nothing; its errors are printed and the exit
    /// status is 2.
    Reload {
        /// Config of the instance (to find its control socket).
        #[arg(short, long, conflicts_with = "socket")]
        config: Option<PathBuf>,
        /// Control socket path (default /run/l4lb/l4lb.sock).
        #[arg(short, long)]
        socket: Option<PathBuf>,
    },
    /// Export or import forwarding rules in the batch text format.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
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

#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Print the config's forwarding rules, one per line.
    Export {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Apply RULES to the config file and to a running instance.
    ///
    /// Every line is validated first; on any error nothing is changed. Then
    /// the config file is rewritten and a running instance reloads it.
    Import {
        #[arg(short, long)]
        config: PathBuf,
        rules: PathBuf,
    },
}
