//! The batch rule format: forwarding rules for many listeners, one per line.
//!
//! ```text
//! # port protocol persistence hc_type hc_port timeout interval unhealthy healthy path domain
//! 53 UDP 0 UDP 9053 2 5 3 2 - -
//! 80 TCP 300 HTTP 8080 2 5 3 2 /healthz web.example
//! ```
//!
//! A rule addresses every listener with its port and protocol (several VIPs
//! may share a port) and sets, on the backend service(s) those listeners use,
//! the persistence timeout and the health check. Fields are separated by
//! spaces or tabs; `-` means "none" (hc_port: the server's own port). Lines
//! starting with `#` and blank lines are ignored; CRLF line ends are accepted.
//!
//! [`export`] writes the rules a configuration implies; [`parse`] reads a
//! rules file, reporting every bad line; [`apply`] rewrites a configuration
//! file's text with `toml_edit` so that it carries the rules, touching only the
//! keys whose values change (comments and layout elsewhere are kept, and a
//! rule that changes nothing leaves the text byte for byte as it was). The
//! result is validated like any configuration before it is returned: a rules
//! file with any error changes nothing.

use std::collections::HashMap;
use std::fmt;

use toml_edit::{DocumentMut, InlineTable, Item, Table, TableLike, Value};

use super::validate::{
    domain_problem, path_problem, DEFAULT_HC_HEALTHY, DEFAULT_HC_INTERVAL, DEFAULT_HC_TIMEOUT,
    DEFAULT_HC_UNHEALTHY, DEFAULT_HTTP_CODES, DEFAULT_HTTP_PATH, DEFAULT_UDP_PAYLOAD,
};
use super::{BackendService, Config, ConfigError, HealthCheckKind, Located, Protocol};

/// The comment line [`export`] writes first: the field names, in order.
pub const HEADER: &str =
    "# port protocol persistence hc_type hc_port timeout interval unhealthy healthy path domain";

/// Fields of a rule line.
const FIELDS: usize = 11;
const PERSISTENCE_RANGE: (u64, u64) = (30, 3600);
const TIMEOUT_RANGE: (u64, u64) = (1, 300);
const INTERVAL_RANGE: (u64, u64) = (1, 50);
const THRESHOLD_RANGE: (u64, u64) = (2, 10);

/// One line of a rules file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Listener port, 1..=65535.
    pub port: u16,
    pub protocol: Protocol,
    /// Persistence timeout in seconds: 0 = off, otherwise 30..=3600.
    pub persistence: u32,
    pub check: HealthCheckKind,
    /// Health check port; `None` (`-`) = the server's own port.
    pub check_port: Option<u16>,
    /// Seconds, 1..=300, at most `interval`.
    pub timeout: u32,
    /// Seconds, 1..=50.
    pub interval: u32,
    /// Failed checks in a row before a server is taken out, 2..=10.
    pub unhealthy: u32,
    /// Good checks in a row before it is put back, 2..=10.
    pub healthy: u32,
    /// HTTP only (and required there): the request path.
    pub path: Option<String>,
    /// HTTP only, optional: the Host header.
    pub domain: Option<String>,
    /// 1-based line of the rule in its file; [`apply`] names it in errors.
    /// 0 for a rule that does not come from a file.
    pub line: usize,
}

/// A problem with a rule line (or with the configuration the rules are
/// applied to), printed as `FILE:LINE: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    pub file: String,
    /// 1-based.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.message)
    }
}

impl std::error::Error for RuleError {}

impl From<Located> for RuleError {
    /// Keeps the line; the column is dropped (rule errors are per line).
    fn from(e: Located) -> Self {
        RuleError {
            file: e.file,
            line: e.line,
            message: e.message,
        }
    }
}

impl fmt::Display for Rule {
    /// The rule as a line of a rules file (without the line end).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dash = |v: Option<&str>| v.unwrap_or("-").to_string();
        write!(
            f,
            "{} {} {} {} {} {} {} {} {} {} {}",
            self.port,
            upper(self.protocol.as_str()),
            self.persistence,
            upper(&self.check.to_string()),
            dash(self.check_port.map(|p| p.to_string()).as_deref()),
            self.timeout,
            self.interval,
            self.unhealthy,
            self.healthy,
            dash(self.path.as_deref()),
            dash(self.domain.as_deref()),
        )
    }
}

fn upper(text: &str) -> String {
    text.to_ascii_uppercase()
}

/// `80/TCP`.
fn port_name(port: u16, protocol: Protocol) -> String {
    format!("{port}/{}", upper(protocol.as_str()))
}

/// What a rule sets on a backend service: everything but its address.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Settings {
    persistence: Option<u32>,
    kind: HealthCheckKind,
    port: Option<u16>,
    timeout: u32,
    interval: u32,
    unhealthy: u32,
    healthy: u32,
    path: Option<String>,
    domain: Option<String>,
}

impl Settings {
    fn of_rule(r: &Rule) -> Settings {
        Settings {
            persistence: (r.persistence != 0).then_some(r.persistence),
            kind: r.check,
            port: r.check_port,
            timeout: r.timeout,
            interval: r.interval,
            unhealthy: r.unhealthy,
            healthy: r.healthy,
            path: r.path.clone(),
            domain: r.domain.clone(),
        }
    }

    fn of_service(s: &BackendService) -> Settings {
        let hc = &s.health_check;
        Settings {
            persistence: s.persistence_timeout,
            kind: hc.kind,
            port: hc.port,
            timeout: hc.timeout,
            interval: hc.interval,
            unhealthy: hc.unhealthy_threshold,
            healthy: hc.healthy_threshold,
            path: hc.path.clone(),
            domain: hc.domain.clone(),
        }
    }

    fn rule(&self, port: u16, protocol: Protocol) -> Rule {
        Rule {
            port,
            protocol,
            persistence: self.persistence.unwrap_or(0),
            check: self.kind,
            check_port: self.port,
            timeout: self.timeout,
            interval: self.interval,
            unhealthy: self.unhealthy,
            healthy: self.healthy,
            path: self.path.clone(),
            domain: self.domain.clone(),
            line: 0,
        }
    }

    /// `service` as the configuration will read once the settings are
    /// written: `http_codes` and `udp_payload` stay as they were, or take
    /// their defaults when the check type changes.
    fn apply_to(&self, service: &mut BackendService) {
        service.persistence_timeout = self.persistence;
        let hc = &mut service.health_check;
        if hc.kind != self.kind {
            hc.http_codes = match self.kind {
                HealthCheckKind::Http => DEFAULT_HTTP_CODES.to_vec(),
                _ => Vec::new(),
            };
            hc.udp_payload =
                (self.kind == HealthCheckKind::Udp).then(|| DEFAULT_UDP_PAYLOAD.to_string());
        }
        hc.kind = self.kind;
        hc.port = self.port;
        hc.timeout = self.timeout;
        hc.interval = self.interval;
        hc.unhealthy_threshold = self.unhealthy;
        hc.healthy_threshold = self.healthy;
        hc.path = self.path.clone();
        hc.domain = self.domain.clone();
    }
}

// ----- export -----

/// The rules `config` implies: the header comment, then one line per distinct
/// (port, protocol) of its listeners, by port, TCP before UDP.
///
/// If the listeners of one port and protocol use backend services with
/// different settings, no single rule describes them: that port gets comment
/// lines instead (one commented-out rule per distinct setting), so that
/// applying the export still changes nothing.
pub fn export(config: &Config) -> String {
    let mut keys: Vec<(u16, Protocol)> = config
        .listeners
        .iter()
        .map(|l| (l.port, l.protocol))
        .collect();
    keys.sort_by_key(|&(port, protocol)| (port, protocol == Protocol::Udp));
    keys.dedup();

    let mut out = format!("{HEADER}\n");
    for (port, protocol) in keys {
        let mut services: Vec<usize> = Vec::new();
        let mut settings: Vec<Settings> = Vec::new();
        for l in &config.listeners {
            if (l.port, l.protocol) != (port, protocol) || services.contains(&l.service) {
                continue;
            }
            let Some(service) = config.services.get(l.service) else {
                continue;
            };
            services.push(l.service);
            let s = Settings::of_service(service);
            if !settings.contains(&s) {
                settings.push(s);
            }
        }
        match settings.as_slice() {
            [] => {}
            [only] => out.push_str(&format!("{}\n", only.rule(port, protocol))),
            several => {
                let names: Vec<String> = services
                    .iter()
                    .filter_map(|&i| config.services.get(i))
                    .map(|s| format!("{:?}", s.name))
                    .collect();
                out.push_str(&format!(
                    "# {}: its backend services {} have different settings; one rule would \
                     give them all the same. To do that, uncomment one of these lines:\n",
                    port_name(port, protocol),
                    names.join(", "),
                ));
                for s in several {
                    out.push_str(&format!("# {}\n", s.rule(port, protocol)));
                }
            }
        }
    }
    out
}

// ----- parse -----

/// A rule line's fields after reading: `None` where a field could not be
/// read (already reported). Numbers are kept wide so that range checks can
/// name the value as written.
#[derive(Default)]
struct Draft {
    port: Option<u64>,
    protocol: Option<Protocol>,
    persistence: Option<u64>,
    check: Option<HealthCheckKind>,
    check_port: Option<Option<u64>>,
    timeout: Option<u64>,
    interval: Option<u64>,
    unhealthy: Option<u64>,
    healthy: Option<u64>,
    path: Option<Option<String>>,
    domain: Option<Option<String>>,
}

impl Draft {
    fn of_rule(r: &Rule) -> Draft {
        Draft {
            port: Some(r.port.into()),
            protocol: Some(r.protocol),
            persistence: Some(r.persistence.into()),
            check: Some(r.check),
            check_port: Some(r.check_port.map(u64::from)),
            timeout: Some(r.timeout.into()),
            interval: Some(r.interval.into()),
            unhealthy: Some(r.unhealthy.into()),
            healthy: Some(r.healthy.into()),
            path: Some(r.path.clone()),
            domain: Some(r.domain.clone()),
        }
    }

    /// Reads the 11 fields of a line, reporting what cannot be read.
    fn read(fields: &[&str], problems: &mut Problems) -> Draft {
        let get = |i: usize| fields.get(i).copied().unwrap_or("");
        let dash = |text: &str| (text != "-").then(|| text.to_string());
        let mut d = Draft {
            port: number(get(0), 0, "port", "1-65535", problems),
            ..Draft::default()
        };
        let protocol = get(1);
        d.protocol = if protocol.eq_ignore_ascii_case("tcp") {
            Some(Protocol::Tcp)
        } else if protocol.eq_ignore_ascii_case("udp") {
            Some(Protocol::Udp)
        } else {
            problems.push((
                1,
                format!("unknown protocol {protocol:?} (allowed: TCP, UDP)"),
            ));
            None
        };
        d.persistence = number(get(2), 2, "persistence", "0 = off, or 30-3600", problems);
        let check = get(3);
        d.check = [
            ("tcp", HealthCheckKind::Tcp),
            ("http", HealthCheckKind::Http),
            ("udp", HealthCheckKind::Udp),
        ]
        .iter()
        .find(|(name, _)| check.eq_ignore_ascii_case(name))
        .map(|&(_, kind)| kind);
        if d.check.is_none() {
            problems.push((
                3,
                format!("unknown health check type {check:?} (allowed: TCP, HTTP, UDP)"),
            ));
        }
        d.check_port = match get(4) {
            "-" => Some(None),
            text => number(text, 4, "hc_port", HC_PORT_RANGE, problems).map(Some),
        };
        d.timeout = number(get(5), 5, "timeout", "1-300", problems);
        d.interval = number(get(6), 6, "interval", "1-50", problems);
        d.unhealthy = number(get(7), 7, "unhealthy", "2-10", problems);
        d.healthy = number(get(8), 8, "healthy", "2-10", problems);
        d.path = Some(dash(get(9)));
        d.domain = Some(dash(get(10)));
        d
    }

    /// Checks ranges and the fields that depend on each other; gives the rule
    /// if everything is right.
    /// Problems are tagged with their field's index, so that sorting puts
    /// them in field order.
    fn check(&self, line: usize, problems: &mut Problems) -> Option<Rule> {
        let before = problems.len();
        let mut range =
            |value: Option<u64>, field: usize, name: &str, (lo, hi): (u64, u64), text: &str| {
                match value {
                    Some(n) if !(lo..=hi).contains(&n) => {
                        problems.push((field, format!("{name} {n} is out of range ({text})")));
                        None
                    }
                    other => other,
                }
            };
        let port = range(self.port, 0, "port", (1, 65_535), "1-65535");
        let persistence = match self.persistence {
            Some(0) => Some(0),
            p => range(
                p,
                2,
                "persistence",
                PERSISTENCE_RANGE,
                "0 = off, or 30-3600",
            ),
        };
        let check_port = match self.check_port {
            Some(Some(p)) => range(Some(p), 4, "hc_port", (1, 65_535), HC_PORT_RANGE).map(Some),
            other => other,
        };
        let timeout = range(self.timeout, 5, "timeout", TIMEOUT_RANGE, "1-300");
        let interval = range(self.interval, 6, "interval", INTERVAL_RANGE, "1-50");
        let unhealthy = range(self.unhealthy, 7, "unhealthy", THRESHOLD_RANGE, "2-10");
        let healthy = range(self.healthy, 8, "healthy", THRESHOLD_RANGE, "2-10");
        if let (Some(t), Some(i)) = (timeout, interval) {
            if t > i {
                problems.push((
                    6,
                    format!("timeout {t} exceeds interval {i} (timeout must not exceed interval)"),
                ));
            }
        }
        if let Some(kind) = self.check {
            self.check_http_fields(kind, problems);
        }
        if problems.len() > before {
            return None;
        }
        Some(Rule {
            port: u16::try_from(port?).ok()?,
            protocol: self.protocol?,
            persistence: u32::try_from(persistence?).ok()?,
            check: self.check?,
            check_port: match check_port? {
                Some(p) => Some(u16::try_from(p).ok()?),
                None => None,
            },
            timeout: u32::try_from(timeout?).ok()?,
            interval: u32::try_from(interval?).ok()?,
            unhealthy: u32::try_from(unhealthy?).ok()?,
            healthy: u32::try_from(healthy?).ok()?,
            path: self.path.clone()?,
            domain: self.domain.clone()?,
            line,
        })
    }

    /// PATH and DOMAIN: for HTTP checks only (PATH is required there).
    fn check_http_fields(&self, kind: HealthCheckKind, problems: &mut Problems) {
        let path = self.path.as_ref().and_then(|p| p.as_deref());
        let domain = self.domain.as_ref().and_then(|d| d.as_deref());
        if kind != HealthCheckKind::Http {
            let kind = upper(&kind.to_string());
            for (field, name, value) in [(9, "path", path), (10, "domain", domain)] {
                if let Some(v) = value {
                    problems.push((
                        field,
                        format!(
                            "{name} {v:?} is only valid for HTTP health checks (write - for {kind})"
                        ),
                    ));
                }
            }
            return;
        }
        match path {
            None if self.path.is_some() => problems.push((
                9,
                "path is required for HTTP health checks (it must start with '/')".to_string(),
            )),
            Some(p) => problems.extend(path_problem(p).map(|m| (9, m))),
            None => {}
        }
        if let Some(d) = domain {
            problems.extend(domain_problem(d).map(|m| (10, m)));
        }
    }
}

const HC_PORT_RANGE: &str = "1-65535, or - for the server's port";

/// Problems with one rule, each tagged with the index of its field.
type Problems = Vec<(usize, String)>;

/// The messages of `problems`, in field order.
fn in_field_order(mut problems: Problems) -> impl Iterator<Item = String> {
    problems.sort_by_key(|p| p.0);
    problems.into_iter().map(|p| p.1)
}

/// A decimal number field; `allowed` describes the valid values.
fn number(
    text: &str,
    field: usize,
    name: &str,
    allowed: &str,
    problems: &mut Problems,
) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        problems.push((
            field,
            format!("{name} {text:?} is not a number ({allowed})"),
        ));
        return None;
    }
    match text.parse::<u64>() {
        Ok(n) => Some(n),
        Err(_) => {
            problems.push((field, format!("{name} {text} is out of range ({allowed})")));
            None
        }
    }
}

/// Reads a rules file; `file` names it in errors. Every line is checked and
/// every problem reported (several per line if need be), in line order.
pub fn parse(text: &str, file: &str) -> Result<Vec<Rule>, Vec<RuleError>> {
    let (rules, errors, _) = parse_all(text, file);
    if errors.is_empty() {
        Ok(rules)
    } else {
        Err(errors)
    }
}

/// [`parse`] then [`apply`], reporting everything in one go: the bad lines,
/// and what the good lines do not fit in the configuration (such as a port
/// no listener has). Returns the new configuration text only if there is no
/// problem at all.
pub fn apply_text(
    config_text: &str,
    config_name: &str,
    rules_text: &str,
    rules_name: &str,
) -> Result<String, Vec<RuleError>> {
    let (rules, mut errors, others) = parse_all(rules_text, rules_name);
    // A line bad for another reason still needs a listener on its port.
    if let Ok(config) = Config::from_str(config_text, config_name) {
        for (line, port, protocol) in others {
            if !has_listener(&config, port, protocol) {
                errors.push(RuleError {
                    file: rules_name.to_string(),
                    line,
                    message: no_listener(port, protocol),
                });
            }
        }
    }
    match apply(config_text, config_name, &rules, rules_name) {
        Ok(text) if errors.is_empty() => return Ok(text),
        Ok(_) => {}
        Err(more) => {
            // Duplicates are found by both; report them once.
            for e in more {
                if !errors.contains(&e) {
                    errors.push(e);
                }
            }
        }
    }
    // The rules file's problems by line, then the configuration's.
    errors.sort_by_key(|e| {
        (
            e.file != rules_name,
            if e.file == rules_name { e.line } else { 0 },
        )
    });
    Err(errors)
}

/// A rule line's port and protocol (line, port, protocol): what
/// duplicates are found by, read from bad lines too.
type Key = (usize, u16, Protocol);

/// The rules of the good lines (the first rule of each port and protocol),
/// every problem, and the keys of the bad lines that are the first of their
/// port and protocol (so that whether a listener has that port can be
/// checked too).
fn parse_all(text: &str, file: &str) -> (Vec<Rule>, Vec<RuleError>, Vec<Key>) {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let at = |line: usize, message: String| RuleError {
        file: file.to_string(),
        line,
        message,
    };
    let mut lines: Vec<(Key, Option<Rule>)> = Vec::new();
    let mut errors = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        let content = raw.trim_start_matches([' ', '\t']);
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = raw.split([' ', '\t']).filter(|f| !f.is_empty()).collect();
        if fields.len() != FIELDS {
            errors.push(at(
                line,
                format!(
                    "expected {FIELDS} fields ({}), found {}",
                    HEADER.trim_start_matches("# "),
                    fields.len()
                ),
            ));
            continue;
        }
        let mut problems = Vec::new();
        let draft = Draft::read(&fields, &mut problems);
        let rule = draft.check(line, &mut problems);
        errors.extend(in_field_order(problems).map(|m| at(line, m)));
        let port = draft
            .port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|&p| p > 0);
        if let (Some(port), Some(protocol)) = (port, draft.protocol) {
            lines.push(((line, port, protocol), rule));
        }
    }
    let firsts = duplicates(lines.iter().map(|(key, _)| *key), |l, m| {
        errors.push(at(l, m))
    });
    errors.sort_by_key(|e| e.line);
    let mut rules = Vec::new();
    let mut others = Vec::new();
    for ((key, rule), first) in lines.into_iter().zip(firsts) {
        match rule {
            Some(rule) if first => rules.push(rule),
            None if first => others.push(key),
            _ => {}
        }
    }
    (rules, errors, others)
}

/// Reports the second and later rules for a port and protocol (line,
/// message); returns, for each key in turn, whether it is the first.
fn duplicates(keys: impl Iterator<Item = Key>, mut report: impl FnMut(usize, String)) -> Vec<bool> {
    let mut first: HashMap<(u16, Protocol), usize> = HashMap::new();
    keys.map(
        |(line, port, protocol)| match first.get(&(port, protocol)) {
            Some(at) => {
                report(
                    line,
                    format!(
                        "duplicate rule for port {} (first at line {at})",
                        port_name(port, protocol)
                    ),
                );
                false
            }
            None => {
                first.insert((port, protocol), line);
                true
            }
        },
    )
    .collect()
}

/// Whether some listener of `config` is on `port`/`protocol`.
fn has_listener(config: &Config, port: u16, protocol: Protocol) -> bool {
    config
        .listeners
        .iter()
        .any(|l| (l.port, l.protocol) == (port, protocol))
}

fn no_listener(port: u16, protocol: Protocol) -> String {
    format!("no listener on port {}", port_name(port, protocol))
}

// ----- apply -----

/// Validates `rules` against the configuration `config_text` and, if all is
/// well, returns that text rewritten (with `toml_edit`) so that the backend
/// services of the rules' listeners carry the new settings; comments and
/// layout elsewhere are kept. The caller writes the text. On any error, in
/// the rules or against the configuration, returns every error and no text,
/// so the caller changes nothing. The new text has passed
/// [`Config::from_str`] and reads back as exactly the old configuration with
/// the rules' settings.
///
/// `config_name` and `rules_name` name the two files in errors. Rule errors
/// come first, by line (`RULES:LINE: message`, using [`Rule::line`]), then the
/// configuration's own problems, located in it.
///
/// Only keys whose values change are written: a service that already has a
/// rule's settings is not touched, and when nothing changes at all the
/// original text is returned as it was.
pub fn apply(
    config_text: &str,
    config_name: &str,
    rules: &[Rule],
    rules_name: &str,
) -> Result<String, Vec<RuleError>> {
    let at = |line: usize, message: String| RuleError {
        file: rules_name.to_string(),
        line,
        message,
    };
    let mut errors = Vec::new();
    // The rules themselves (they may not come from `parse`).
    let mut usable = vec![true; rules.len()];
    for (rule, ok) in rules.iter().zip(usable.iter_mut()) {
        let mut problems = Vec::new();
        Draft::of_rule(rule).check(rule.line, &mut problems);
        *ok = problems.is_empty();
        errors.extend(in_field_order(problems).map(|m| at(rule.line, m)));
    }
    let firsts = duplicates(
        rules.iter().map(|r| (r.line, r.port, r.protocol)),
        |l, m| errors.push(at(l, m)),
    );
    for (ok, first) in usable.iter_mut().zip(firsts) {
        *ok &= first;
    }

    let config = match Config::from_str(config_text, config_name) {
        Ok(config) => config,
        Err(e) => {
            errors.sort_by_key(|e| e.line);
            errors.extend(config_errors(e, config_name));
            return Err(errors);
        }
    };

    // Which rule sets each service: (index of the rule, its settings).
    let mut wanted: Vec<Option<(usize, Settings)>> = vec![None; config.services.len()];
    for (ri, rule) in rules.iter().enumerate() {
        if !usable[ri] {
            continue;
        }
        let settings = Settings::of_rule(rule);
        let mut services: Vec<usize> = Vec::new();
        for l in &config.listeners {
            if (l.port, l.protocol) == (rule.port, rule.protocol) && !services.contains(&l.service)
            {
                services.push(l.service);
            }
        }
        if services.is_empty() {
            errors.push(at(rule.line, no_listener(rule.port, rule.protocol)));
            continue;
        }
        for si in services {
            let Some(slot) = wanted.get_mut(si) else {
                continue;
            };
            match slot {
                None => *slot = Some((ri, settings.clone())),
                Some((_, same)) if *same == settings => {}
                Some((other, _)) => {
                    let other = &rules[*other];
                    errors.push(at(
                        rule.line,
                        format!(
                            "conflicts with the rule at line {}: backend service {:?} serves both {} and {}, and the two rules give it different settings",
                            other.line,
                            config.services[si].name,
                            port_name(other.port, other.protocol),
                            port_name(rule.port, rule.protocol),
                        ),
                    ));
                }
            }
        }
    }
    if !errors.is_empty() {
        errors.sort_by_key(|e| e.line);
        return Err(errors);
    }

    let internal = |what: &str| {
        vec![RuleError {
            file: config_name.to_string(),
            line: 1,
            message: format!("internal error: {what}; the configuration was not changed"),
        }]
    };
    let mut doc: DocumentMut = match config_text.parse() {
        Ok(doc) => doc,
        Err(_) => return Err(internal("toml_edit cannot read the configuration")),
    };
    let mut expected = config.clone();
    let mut changed = false;
    for (si, want) in wanted.iter().enumerate() {
        let (Some((_, want)), Some(service)) = (want, expected.services.get_mut(si)) else {
            continue;
        };
        if Settings::of_service(service) == *want {
            continue;
        }
        want.apply_to(service);
        let Some(table) = service_table(&mut doc, si) else {
            return Err(internal("backend service table not found"));
        };
        if let Some(position) = edit_service(table, want) {
            keep_comments_above_new_table(&mut doc, si, position);
        }
        changed = true;
    }
    if !changed {
        return Ok(config_text.to_string());
    }
    let text = same_line_ends(config_text, doc.to_string());
    match Config::from_str(&text, config_name) {
        Ok(result) if result == expected => Ok(text),
        Ok(_) => Err(internal(
            "the rewritten configuration does not read back as the rules say",
        )),
        Err(e) => Err(config_errors(e, config_name)),
    }
}

/// toml_edit writes `\n` line ends: give a CRLF file its CRLFs back.
fn same_line_ends(original: &str, text: String) -> String {
    let crlf = original.matches("\r\n").count();
    if crlf == 0 || crlf != original.matches('\n').count() {
        return text;
    }
    text.replace("\r\n", "\n").replace('\n', "\r\n")
}

fn config_errors(e: ConfigError, config_name: &str) -> Vec<RuleError> {
    match e {
        ConfigError::Invalid(list) => list.into_iter().map(RuleError::from).collect(),
        other => vec![RuleError {
            file: config_name.to_string(),
            line: 1,
            message: other.to_string(),
        }],
    }
}

/// A `[[backend_service]]` table, or an inline table of a
/// `backend_service = [...]` array.
enum ServiceTable<'a> {
    Standard(&'a mut Table),
    Inline(&'a mut InlineTable),
}

/// The table of the `index`-th backend service (config order).
fn service_table(doc: &mut DocumentMut, index: usize) -> Option<ServiceTable<'_>> {
    match doc.get_mut("backend_service")? {
        Item::ArrayOfTables(tables) => tables.get_mut(index).map(ServiceTable::Standard),
        Item::Value(Value::Array(array)) => array
            .get_mut(index)?
            .as_inline_table_mut()
            .map(ServiceTable::Inline),
        _ => None,
    }
}

/// One change to a table.
enum Edit {
    Set(&'static str, Value),
    Remove(&'static str),
}

/// Writes `want` into a service table, changing only keys whose effective
/// value (absent = the default) differs. Returns the document position of
/// the `[backend_service.health_check]` table if it had to create one.
fn edit_service(mut service: ServiceTable<'_>, want: &Settings) -> Option<usize> {
    let inline = matches!(service, ServiceTable::Inline(_));
    let table: &mut dyn TableLike = match &mut service {
        ServiceTable::Standard(t) => &mut **t,
        ServiceTable::Inline(t) => &mut **t,
    };
    let persistence = match int(table.get("persistence_timeout")) {
        None | Some(0) => None,
        Some(n) => Some(n),
    };
    if persistence != want.persistence.map(i64::from) {
        let value = i64::from(want.persistence.unwrap_or(0));
        set(table, inline, "", "persistence_timeout", Value::from(value));
    }

    let edits = health_check_edits(table.get("health_check"), want);
    if edits.is_empty() {
        return None;
    }
    let mut created = None;
    let mut new_indent = String::new();
    if !table.contains_key("health_check") {
        match &mut service {
            ServiceTable::Standard(t) => {
                let mut hc = Table::new();
                // Right after the service's own keys, before its servers
                // (tables render in position order; ties keep tree order).
                if let Some(position) = t.position() {
                    hc.set_position(position);
                    created = Some(position);
                }
                let indent = t
                    .get("server")
                    .and_then(Item::as_array_of_tables)
                    .and_then(|servers| servers.get(0))
                    .and_then(|server| server.decor().prefix())
                    .and_then(|prefix| prefix.as_str())
                    .map(|prefix| indentation(prefix).to_string())
                    .unwrap_or_default();
                hc.decor_mut().set_prefix(format!("\n{indent}"));
                t.insert("health_check", Item::Table(hc));
                new_indent = indent;
            }
            ServiceTable::Inline(t) => {
                let hc = Value::InlineTable(InlineTable::new());
                set(&mut **t, true, "", "health_check", hc);
            }
        }
    }
    let table: &mut dyn TableLike = match &mut service {
        ServiceTable::Standard(t) => &mut **t,
        ServiceTable::Inline(t) => &mut **t,
    };
    let Some(item) = table.get_mut("health_check") else {
        return created;
    };
    let inline = item.is_inline_table();
    let Some(hc) = item.as_table_like_mut() else {
        return created;
    };
    for edit in edits {
        match edit {
            Edit::Set(key, value) => set(hc, inline, &new_indent, key, value),
            Edit::Remove(key) => remove(hc, inline, key),
        }
    }
    created
}

/// A new `[backend_service.health_check]` table goes right after its
/// service's keys, where the next table's header comments begin. Comments
/// separated from that header by a blank line belong to what comes before
/// (a commented-out key, say): move them above the new table.
fn keep_comments_above_new_table(doc: &mut DocumentMut, service: usize, position: usize) {
    let Some(next) = next_table_position(doc.as_table(), position) else {
        return;
    };
    let mut head = String::new();
    with_table_at(doc.as_table_mut(), next, &mut |t| {
        let Some(prefix) = t.decor().prefix().and_then(|p| p.as_str()) else {
            return;
        };
        let bytes = prefix.as_bytes();
        let split = (0..bytes.len()).rev().find(|&i| {
            bytes[i] == b'\n'
                && matches!(
                    bytes.get(i + 1..),
                    Some([b'\n', ..]) | Some([b'\r', b'\n', ..])
                )
        });
        if let Some(split) = split.map(|i| i + 1) {
            if prefix[..split].contains('#') {
                head = prefix[..split].to_string();
                let tail = prefix[split..].to_string();
                t.decor_mut().set_prefix(tail);
            }
        }
    });
    if head.is_empty() {
        return;
    }
    if let Some(ServiceTable::Standard(t)) = service_table(doc, service) {
        if let Some(hc) = t.get_mut("health_check").and_then(Item::as_table_mut) {
            let old = hc.decor().prefix().and_then(|p| p.as_str()).unwrap_or("");
            let prefix = format!("{head}{old}");
            hc.decor_mut().set_prefix(prefix);
        }
    }
}

/// The smallest position of a table header after `after`.
fn next_table_position(table: &Table, after: usize) -> Option<usize> {
    let mut best: Option<usize> = None;
    let mut consider = |t: &Table| {
        let own = t
            .position()
            .filter(|&p| p > after && !t.is_implicit() && !t.is_dotted());
        let nested = next_table_position(t, after);
        for p in [own, nested].into_iter().flatten() {
            best = Some(best.map_or(p, |b| b.min(p)));
        }
    };
    for (_, item) in table.iter() {
        match item {
            Item::Table(t) => consider(t),
            Item::ArrayOfTables(tables) => tables.iter().for_each(&mut consider),
            _ => {}
        }
    }
    best
}

/// Calls `f` on the table whose header is at `position`; whether found.
fn with_table_at(table: &mut Table, position: usize, f: &mut dyn FnMut(&mut Table)) -> bool {
    let mut visit = |t: &mut Table| {
        if t.position() == Some(position) && !t.is_implicit() && !t.is_dotted() {
            f(t);
            true
        } else {
            with_table_at(t, position, f)
        }
    };
    for (_, item) in table.iter_mut() {
        let found = match item {
            Item::Table(t) => visit(t),
            Item::ArrayOfTables(tables) => tables.iter_mut().any(&mut visit),
            _ => false,
        };
        if found {
            return true;
        }
    }
    false
}

/// The changes that make the health check table `hc` (absent: all defaults)
/// read as `want`.
fn health_check_edits(hc: Option<&Item>, want: &Settings) -> Vec<Edit> {
    let get = |key: &str| hc.and_then(|t| t.get(key));
    let mut edits = Vec::new();
    let kind = text(get("type")).unwrap_or("tcp");
    if kind != want.kind.to_string() {
        edits.push(Edit::Set("type", Value::from(want.kind.to_string())));
    }
    let mut optional = |key: &'static str, current: Option<Value>, want: Option<Value>| {
        let same = match (&current, &want) {
            (Some(a), Some(b)) => (a.as_integer(), a.as_str()) == (b.as_integer(), b.as_str()),
            (None, None) => true,
            _ => false,
        };
        if !same {
            edits.push(match want {
                Some(v) => Edit::Set(key, v),
                None => Edit::Remove(key),
            });
        }
    };
    optional(
        "port",
        int(get("port")).map(Value::from),
        want.port.map(|p| Value::from(i64::from(p))),
    );
    for (key, default, value) in [
        ("timeout", DEFAULT_HC_TIMEOUT, want.timeout),
        ("interval", DEFAULT_HC_INTERVAL, want.interval),
        ("unhealthy_threshold", DEFAULT_HC_UNHEALTHY, want.unhealthy),
        ("healthy_threshold", DEFAULT_HC_HEALTHY, want.healthy),
    ] {
        optional(
            key,
            Some(Value::from(int(get(key)).unwrap_or(default.into()))),
            Some(Value::from(i64::from(value))),
        );
    }
    let is_http = want.kind == HealthCheckKind::Http;
    let path = text(get("path")).or(is_http.then_some(DEFAULT_HTTP_PATH));
    optional(
        "path",
        path.map(Value::from),
        want.path.as_deref().map(Value::from),
    );
    optional(
        "domain",
        text(get("domain")).map(Value::from),
        want.domain.as_deref().map(Value::from),
    );
    // Keys of other check types would make the table invalid.
    if !is_http && get("http_codes").is_some() {
        edits.push(Edit::Remove("http_codes"));
    }
    if want.kind != HealthCheckKind::Udp && get("udp_payload").is_some() {
        edits.push(Edit::Remove("udp_payload"));
    }
    edits
}

fn int(item: Option<&Item>) -> Option<i64> {
    item.and_then(Item::as_integer)
}

fn text(item: Option<&Item>) -> Option<&str> {
    item.and_then(Item::as_str)
}

/// The whitespace that indents the last line of a decor prefix.
fn indentation(prefix: &str) -> &str {
    let last = prefix.rsplit('\n').next().unwrap_or("");
    if last.chars().all(|c| c == ' ' || c == '\t') {
        last
    } else {
        ""
    }
}

/// Removes `key`; in an inline table, the space before the closing brace
/// moves to the new last value.
fn remove(table: &mut dyn TableLike, inline: bool, key: &str) {
    let was_last = table.iter().last().is_some_and(|(k, _)| k == key);
    let removed = table.remove(key);
    if !(inline && was_last) {
        return;
    }
    let Some(suffix) = removed
        .as_ref()
        .and_then(Item::as_value)
        .and_then(|v| v.decor().suffix())
        .and_then(|s| s.as_str())
        .filter(|s| !s.is_empty() && s.chars().all(|c| c == ' ' || c == '\t'))
        .map(str::to_string)
    else {
        return;
    };
    let last = table.iter().last().map(|(k, _)| k.to_string());
    if let Some(value) = last
        .and_then(|k| table.get_mut(&k))
        .and_then(Item::as_value_mut)
    {
        if value.decor().suffix().and_then(|s| s.as_str()) == Some("") {
            value.decor_mut().set_suffix(suffix);
        }
    }
}

/// Sets `key`, keeping the formatting (and any trailing comment) of a value
/// it replaces. A new key is indented like the table's other keys (or by
/// `indent` in a table without keys); in an inline table it takes over the
/// space before the closing brace.
fn set(table: &mut dyn TableLike, inline: bool, indent: &str, key: &str, mut value: Value) {
    if let Some(item) = table.get_mut(key) {
        if let Some(old) = item.as_value() {
            *value.decor_mut() = old.decor().clone();
        }
        *item = Item::Value(value);
        return;
    }
    if inline {
        let last = table.iter().last().map(|(k, _)| k.to_string());
        if let Some(old) = last
            .and_then(|k| table.get_mut(&k))
            .and_then(Item::as_value_mut)
        {
            let suffix = old.decor().suffix().and_then(|s| s.as_str()).unwrap_or("");
            if !suffix.is_empty() && suffix.chars().all(|c| c == ' ' || c == '\t') {
                value.decor_mut().set_suffix(suffix.to_string());
                old.decor_mut().set_suffix("");
            }
        }
        table.insert(key, Item::Value(value));
        return;
    }
    let indent = table
        .iter()
        .filter(|(_, item)| item.is_value())
        .find_map(|(k, _)| {
            let prefix = table.key(k)?.leaf_decor().prefix()?.as_str()?;
            Some(indentation(prefix).to_string())
        })
        .unwrap_or_else(|| indent.to_string());
    table.insert(key, Item::Value(value));
    if let Some(mut k) = table.key_mut(key) {
        if !indent.is_empty() {
            k.leaf_decor_mut().set_prefix(indent);
        }
    }
}
