//! l4lb's entry point: parse the command line, set up logging, map errors to
//! exit codes (0 ok, 1 runtime failure, 2 invalid config or input).

mod cli;

use anyhow::{Context, Result};
use clap::Parser;
use cli::{Cli, Command, RulesCommand};
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
            l4lb::control::run(cfg, config.clone(), &name)?;
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
            let path = socket_path(socket, config)?;
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
        Command::Reload { config, socket } => {
            let path = socket_path(socket, config)?;
            let reply = l4lb::control::ctl::request(&path, "reload")?;
            if let Some(ok) = reply.strip_prefix("ok: ") {
                print!("{ok}");
                Ok(ExitCode::SUCCESS)
            } else {
                Err(Failure::Invalid(
                    reply
                        .strip_prefix("error: ")
                        .unwrap_or(&reply)
                        .trim_end()
                        .to_string(),
                ))
            }
        }
        Command::Rules {
            command: RulesCommand::Export { config },
        } => {
            let cfg = load(&config)?;
            print!("{}", l4lb::config::rules::export(&cfg));
            Ok(ExitCode::SUCCESS)
        }
        Command::Rules {
            command: RulesCommand::Import { config, rules },
        } => rules_import(&config, &rules),
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

fn socket_path(socket: Option<PathBuf>, config: Option<PathBuf>) -> Result<PathBuf, Failure> {
    Ok(match (socket, config) {
        (Some(s), _) => s,
        (None, Some(c)) => load(&c)?.instance.control_socket,
        (None, None) => PathBuf::from(DEFAULT_SOCKET),
    })
}

/// `l4lb rules import`: validate every rule, apply all or nothing, then
/// reload a running instance.
fn rules_import(config: &Path, rules: &Path) -> Result<ExitCode, Failure> {
    use l4lb::config::rules;
    let config_text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let rules_text =
        std::fs::read_to_string(rules).with_context(|| format!("reading {}", rules.display()))?;
    let rules_name = rules.display().to_string();
    let config_name = config.display().to_string();
    let join = |errs: Vec<rules::RuleError>| {
        errs.iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    // Every problem at once: bad lines, and lines the config cannot take.
    let new_text = rules::apply_text(&config_text, &config_name, &rules_text, &rules_name)
        .map_err(|e| Failure::Invalid(join(e)))?;
    let parsed = rules::parse(&rules_text, &rules_name).map_err(|e| Failure::Invalid(join(e)))?;
    if new_text == config_text {
        println!(
            "{config_name}: unchanged ({} rule(s) already in effect)",
            parsed.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    // Write beside the file and rename: a crash never leaves half a config.
    let tmp = config.with_extension("toml.l4lb-tmp");
    std::fs::write(&tmp, &new_text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, config).with_context(|| format!("replacing {}", config.display()))?;
    println!("{config_name}: applied {} rule(s)", parsed.len());
    let cfg = load(config)?;
    let sock = cfg.instance.control_socket;
    if sock.exists() {
        match l4lb::control::ctl::request(&sock, "reload") {
            Ok(reply) if reply.starts_with("ok") => print!("running instance: {reply}"),
            Ok(reply) => {
                return Err(Failure::Runtime(anyhow::anyhow!(
                    "{config_name} was updated, but the running instance rejected it: {}",
                    reply.trim_end()
                )))
            }
            Err(e) => println!("no running instance answered on {} ({e:#})", sock.display()),
        }
    } else {
        println!("no running instance ({} does not exist)", sock.display());
    }
    Ok(ExitCode::SUCCESS)
}
