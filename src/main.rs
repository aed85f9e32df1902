//! l4lb's entry point: parse the command line, set up logging, map errors to
//! exit codes (0 ok, 1 runtime failure, 2 invalid config or input).

mod cli;

use anyhow::{Context, Result};
use clap::Parser;
use cli::{Cli, Command};
use l4lb::config::{Config, ConfigError, DEFAULT_CONFIG};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const DEFAULT_SOCKET: &str = "/run/l4lb/l4lb.sock";

enum Failure {
    Invalid(String),
    Runtime(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Runtime(e)
    }
}

fn load(path: &Path) -> Result<Config, Failure> {
    Config::from_file(path).map_err(|e| match e {
        ConfigError::Invalid(_) => Failure::Invalid(e.to_string()),
        ConfigError::Io { .. } => Failure::Runtime(anyhow::Error::new(e)),
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("L4LB_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match real_main(Cli::parse()) {
        Ok(code) => code,
        Err(Failure::Invalid(msg)) => {
            eprintln!("{msg}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("l4lb: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn real_main(cli: Cli) -> Result<ExitCode, Failure> {
    match cli.command {
        Command::Run { config } => {
            let (cfg, name) = match &config {
                Some(p) => (load(p)?, p.display().to_string()),
                None => (
                    Config::from_str(DEFAULT_CONFIG, "<built-in config/l4lb.toml>")
                        .map_err(|e| Failure::Invalid(e.to_string()))?,
                    "<built-in config/l4lb.toml>".to_string(),
                ),
            };
            l4lb::control::run(cfg, &name)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config } => {
            let cfg = load(&config)?;
            println!("{}: ok: {}", config.display(), cfg.summary());
            Ok(ExitCode::SUCCESS)
        }
        Command::Simulate { config, listener } => {
            let cfg = load(&config)?;
            let stdin = std::io::stdin();
            let bad = l4lb::simulate::simulate(
                &cfg,
                &listener,
                stdin.lock(),
                std::io::stdout().lock(),
                std::io::stderr(),
            )
            .map_err(|e| Failure::Invalid(format!("l4lb: {e:#}")))?;
            Ok(if bad == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        Command::Stats {
            config,
            socket,
            json,
        } => {
            let path = match (socket, config) {
                (Some(s), _) => s,
                (None, Some(c)) => load(&c)?.instance.control_socket,
                (None, None) => PathBuf::from(DEFAULT_SOCKET),
            };
            let reply = l4lb::control::ctl::request(&path, "stats")?;
            if json {
                println!("{reply}");
            } else {
                let st: l4lb::control::stats::Stats = serde_json::from_str(&reply)
                    .with_context(|| format!("unexpected reply from the instance: {reply}"))?;
                print!("{}", l4lb::control::stats::render(&st));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay {
            config,
            input,
            output,
        } => {
            let cfg = load(&config)?;
            let report = l4lb::replay::replay_file(&cfg, &input, &output)?;
            print!("{}", report.render());
            Ok(ExitCode::SUCCESS)
        }
    }
}
