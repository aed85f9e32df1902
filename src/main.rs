//! l4lb's entry point: parse the command line, set up logging, map errors to
//! exit codes (0 ok, 1 runtime failure, 2 invalid config or input).

mod cli;

use anyhow::{Context, Result};
use clap::Parser;
use cli::{Cli, Command, RulesCommand};
use l4lb::config::{Config, ConfigError, Located, DEFAULT_CONFIG, DEFAULT_CONTROL_SOCKET};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

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
    load_warned(path).map(|(config, _)| config)
}

/// [`load`], with the file's warnings (`FILE:LINE:COL: warning: ...`).
fn load_warned(path: &Path) -> Result<(Config, Vec<Located>), Failure> {
    Config::from_file_warned(path).map_err(|e| match e {
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
        // Colours only for a person at a terminal: a log file or the
        // journal gets plain lines that grep and log tools can match.
        .with_ansi(std::io::stderr().is_terminal())
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
                Some(p) => {
                    let (cfg, warnings) = load_warned(p)?;
                    for w in &warnings {
                        tracing::warn!("{w}");
                    }
                    (cfg, p.display().to_string())
                }
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
            let (cfg, warnings) = load_warned(&config)?;
            for w in &warnings {
                eprintln!("{w}");
            }
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
            let (path, named_by, _) = socket_path(socket, config)?;
            let reply = ask(&path, "stats", named_by.as_deref())?;
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
            // A file that fails validation is refused by the instance, which
            // logs why; with no instance to ask, its errors are the answer.
            let (path, named_by, errors) = socket_path(socket, config)?;
            let reply = match (ask(&path, "reload", named_by.as_deref()), errors) {
                (Ok(reply), _) => reply,
                (Err(_), Some(errors)) => return Err(Failure::Invalid(errors)),
                (Err(e), None) => return Err(e.into()),
            };
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

/// The control socket to ask: `-s`, else the one `-c`'s file names, else
/// the default. With it, the file that named it (`-c`'s, when `-s` was not
/// given) and that file's validation errors, if any.
fn socket_path(
    socket: Option<PathBuf>,
    config: Option<PathBuf>,
) -> Result<(PathBuf, Option<PathBuf>, Option<String>), Failure> {
    Ok(match (socket, config) {
        (Some(s), _) => (s, None, None),
        (None, Some(c)) => match load(&c) {
            Ok(cfg) => (cfg.instance.control_socket, Some(c), None),
            // `-c` only says where the socket is: a file with errors
            // elsewhere still says that.
            Err(Failure::Invalid(errors)) => match control_socket_of(&c) {
                Some(path) => (path, Some(c), Some(errors)),
                None => return Err(Failure::Invalid(errors)),
            },
            Err(e) => return Err(e),
        },
        (None, None) => (PathBuf::from(DEFAULT_CONTROL_SOCKET), None, None),
    })
}

/// What nothing answering on the control socket a config file names may
/// mean: `control_socket` takes effect only on a restart.
const OLD_SOCKET: &str =
    "if l4lb was started before that control_socket was set, it listens on its old one until restarted";

/// Sends `req` to the instance on the control socket `path`, which the
/// config file `named_by` gave, if one did. Nothing listening there may
/// mean an instance started before that file's `control_socket` changed:
/// the key takes effect only on a restart, so such an instance still
/// listens on its old socket, and the error says how to reach it.
fn ask(path: &Path, req: &str, named_by: Option<&Path>) -> anyhow::Result<String> {
    l4lb::control::ctl::request(path, req).map_err(|e| match named_by {
        Some(config) if is_not_listening(&e) => e.context(format!(
            "nothing answers on the control socket {} names; {OLD_SOCKET} (reach it with \
             --socket)",
            config.display()
        )),
        _ => e,
    })
}

/// Whether a request failed because nothing listens on the socket: no
/// such file, or a file no process listens on (left by one that died).
fn is_not_listening(e: &anyhow::Error) -> bool {
    use std::io::ErrorKind::{ConnectionRefused, NotFound};
    io_error_kind(e).is_some_and(|k| matches!(k, NotFound | ConnectionRefused))
}

/// The kind of the first I/O error in `e`'s chain of causes.
fn io_error_kind(e: &anyhow::Error) -> Option<std::io::ErrorKind> {
    e.chain()
        .find_map(|c| c.downcast_ref::<std::io::Error>())
        .map(std::io::Error::kind)
}

/// The control socket a config file names, read as plain TOML without
/// validating the rest: `instance.control_socket`, or the default when the
/// `[instance]` table leaves it out. None if the file does not say (not
/// TOML, no `[instance]` table, or a value that is not a non-empty string).
fn control_socket_of(path: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(path).ok()?;
    let doc: toml::Table = text.parse().ok()?;
    match doc.get("instance")?.as_table()?.get("control_socket") {
        None => Some(PathBuf::from(DEFAULT_CONTROL_SOCKET)),
        Some(v) => v.as_str().filter(|s| !s.is_empty()).map(PathBuf::from),
    }
}

/// `l4lb rules import`: validate every rule, apply all or nothing, then
/// reload a running instance.
fn rules_import(config: &Path, rules: &Path) -> Result<ExitCode, Failure> {
    use l4lb::config::rules;
    let config_text = read_text(config, true)?;
    let rules_text = read_text(rules, false)?;
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
    replace_file(config, &new_text)?;
    // A rule changes the file if applying it alone to the old text does
    // (one that could not be applied alone counts as changing it).
    let changing = parsed
        .iter()
        .filter(|r| {
            rules::apply(
                &config_text,
                &config_name,
                std::slice::from_ref(r),
                &rules_name,
            )
            .map_or(true, |t| t != config_text)
        })
        .count();
    if changing == parsed.len() {
        println!("{config_name}: applied {} rule(s)", parsed.len());
    } else {
        println!(
            "{config_name}: applied {} rule(s), {changing} of them changing it (the others already in effect)",
            parsed.len()
        );
    }
    let cfg = load(config)?;
    let sock = cfg.instance.control_socket;
    let missing = if !sock.exists() {
        format!("({} does not exist)", sock.display())
    } else {
        match l4lb::control::ctl::request(&sock, "reload") {
            Ok(reply) if reply.starts_with("ok") => {
                print!("running instance: {reply}");
                return Ok(ExitCode::SUCCESS);
            }
            Ok(reply) => {
                return Err(Failure::Runtime(anyhow::anyhow!(
                    "{config_name} was updated, but the running instance rejected it: {}",
                    reply.strip_prefix("error: ").unwrap_or(&reply).trim_end()
                )))
            }
            // Not allowed to connect: an instance may well run there, and
            // the command cannot tell, so it has not done its job.
            Err(e) if is_permission_denied(&e) => {
                return Err(Failure::Runtime(anyhow::anyhow!(
                    "{config_name} was updated, but the running instance could not be asked to reload it: {e:#}"
                )))
            }
            Err(e) => format!("answered on {} ({e:#})", sock.display()),
        }
    };
    println!("no running instance {missing}; {OLD_SOCKET} (reload it with `l4lb reload --socket`)");
    Ok(ExitCode::SUCCESS)
}

/// Whether `e` comes from an operation the user is not allowed (EACCES).
fn is_permission_denied(e: &anyhow::Error) -> bool {
    io_error_kind(e) == Some(std::io::ErrorKind::PermissionDenied)
}

/// Reads a text file named on the command line. A file that is not UTF-8
/// is bad input (exit 2), located at its first bad byte: `FILE:LINE:COL`,
/// or `FILE:LINE` (`col` false, as for rules files).
fn read_text(path: &Path, col: bool) -> Result<String, Failure> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = 1 + good.iter().filter(|&&b| b == b'\n').count();
        let at = if col {
            let start = good.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            let chars = good[start..].iter().filter(|&&b| b & 0xC0 != 0x80).count();
            format!("{line}:{}", chars + 1)
        } else {
            line.to_string()
        };
        Failure::Invalid(format!(
            "{}:{at}: the file is not valid UTF-8",
            path.display()
        ))
    })
}

/// Replaces the file at `path` (or, if it is a symbolic link, the file it
/// points to) with `text`: written beside it, synced, then renamed over it,
/// so that a crash leaves either the old file or the new one. The new file
/// keeps the old one's mode and owner (a 0600 config stays private).
fn replace_file(path: &Path, text: &str) -> Result<(), Failure> {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    let target =
        std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
    let meta =
        std::fs::metadata(&target).with_context(|| format!("reading {}", target.display()))?;
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(".l4lb-tmp");
    let tmp = target.with_file_name(name);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        // (Changing the owner takes root: a user who may write the file
        // but does not own it gets an error, not a file of theirs.)
        let now = f.metadata()?;
        if (now.uid(), now.gid()) != (meta.uid(), meta.gid()) {
            std::os::unix::fs::fchown(&f, Some(meta.uid()), Some(meta.gid()))?;
        }
        f.set_permissions(meta.permissions())?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Failure::Runtime(
            anyhow::Error::new(e).context(format!("writing {}", tmp.display())),
        ));
    }
    std::fs::rename(&tmp, &target).with_context(|| format!("replacing {}", target.display()))?;
    // The rename itself is durable once the directory is synced.
    if let Some(dir) = target.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}
