//! Conversion of the raw serde structs into the validated model.
//!
//! Every check records a problem at a byte offset and carries on, so one run
//! reports everything wrong with a file. Offsets become `line:col` at the
//! end, and the problems are returned in file order.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::PathBuf;

use toml::Spanned;

use super::raw::{
    HealthCheckTable, Num, RawConfig, RawGroup, RawInstance, RawListener, RawServer, RawService,
    Str,
};
use super::{
    AllDown, AttachMode, BackendService, BindMode, Config, ForwardingMode, HealthCheck,
    HealthCheckKind, Instance, Listener, Located, Protocol, Scheduler, Server, StaticNeighbour,
    WhenFull, MAX_LISTENERS, MAX_SERVERS, MAX_WORKERS,
};

const DEFAULT_WORKERS: [usize; 1] = [0];
const DEFAULT_FLOW_TABLE_CAPACITY: i64 = 1_048_576;
const FLOW_TABLE_CAPACITY_RANGE: (i64, i64) = (1024, 67_108_864);
const DEFAULT_FLOW_IDLE_TIMEOUT: i64 = 300;
const FLOW_IDLE_TIMEOUT_RANGE: (i64, i64) = (10, 86_400);
/// Linux keeps a closed connection's TIME_WAIT state for 60 s
/// (`TCP_TIMEWAIT_LEN`): a client's last ACK, retransmitted within it, still
/// finds its flow.
const DEFAULT_TCP_CLOSED_TIMEOUT: i64 = 60;
const TCP_CLOSED_TIMEOUT_RANGE: (i64, i64) = (1, 86_400);
const DEFAULT_TCP_SYN_TIMEOUT: i64 = 30;
const DEFAULT_PERSISTENCE_CAPACITY: i64 = 262_144;
const PERSISTENCE_CAPACITY_RANGE: (i64, i64) = (1024, 67_108_864);
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// CPU core ids must be below this.
const MAX_CPU: i64 = 1024;
/// Linux IFNAMSIZ (16) less the terminating NUL.
const MAX_IFNAME: usize = 15;
const MAX_NAME: usize = 64;
const MAX_DOMAIN: usize = 253;
/// Longest label of a host name (RFC 1035).
const MAX_LABEL: usize = 63;
const MAX_PATH: usize = 1024;
/// Health check values of absent keys (the batch rules rely on them too).
pub(crate) const DEFAULT_HC_TIMEOUT: u32 = 2;
pub(crate) const DEFAULT_HC_INTERVAL: u32 = 5;
pub(crate) const DEFAULT_HC_UNHEALTHY: u32 = 3;
pub(crate) const DEFAULT_HC_HEALTHY: u32 = 2;
pub(crate) const DEFAULT_HTTP_PATH: &str = "/";
const DEFAULT_WEIGHT: u8 = 100;
const MAX_WEIGHT: i64 = 100;
const PERSISTENCE_RANGE: (i64, i64) = (30, 3600);
/// Status codes `http_codes` may name.
const HTTP_CODE_RANGE: (u16, u16) = (100, 599);
pub(crate) const DEFAULT_HTTP_CODES: [(u16, u16); 1] = [(200, 399)];
pub(crate) const DEFAULT_UDP_PAYLOAD: &str = "l4lb-health";
/// Keeps the probe inside one unfragmented datagram on any path.
const MAX_UDP_PAYLOAD: usize = 512;

/// Maps byte offsets to 1-based line and column (columns count characters).
pub(crate) struct LineIndex<'a> {
    bytes: &'a [u8],
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    pub(crate) fn new(text: &'a str) -> Self {
        let bytes = text.as_bytes();
        let mut starts = vec![0];
        starts.extend(
            bytes
                .iter()
                .enumerate()
                .filter(|(_, &b)| b == b'\n')
                .map(|(i, _)| i + 1),
        );
        LineIndex { bytes, starts }
    }

    /// Line and column of `offset`; offsets past the end clamp to the end.
    pub(crate) fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.bytes.len());
        // starts[0] == 0 <= offset, so the partition point is at least 1.
        let line = self.starts.partition_point(|&s| s <= offset);
        let start = self.starts.get(line - 1).copied().unwrap_or(0);
        let chars = self
            .bytes
            .get(start..offset)
            .map_or(0, |b| b.iter().filter(|&&b| b & 0xC0 != 0x80).count());
        (line, chars + 1)
    }

    fn line(&self, offset: usize) -> usize {
        self.position(offset).0
    }
}

/// Parses and validates `text`; on failure returns every problem found, in
/// file order.
/// With the configuration, its warnings: settings that are valid but
/// probably not what was meant, located like the problems.
pub(crate) fn load(text: &str, file: &str) -> Result<(Config, Vec<Located>), Vec<Located>> {
    let index = LineIndex::new(text);
    let locate = |offset: usize, message: String| {
        let (line, col) = index.position(offset);
        Located {
            file: file.to_string(),
            line,
            col,
            message,
        }
    };
    let raw: RawConfig = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            let offset = e.span().map_or(0, |s| s.start);
            let mut message = tidy_toml_message(e.message());
            if message.ends_with("expected a borrowed string") {
                // The toml crate cannot give the spans the loader keeps for
                // a table written with dotted keys (toml-rs/toml#798), and
                // says so in these words: name the real problem.
                message = dotted_key_message(text, offset);
            }
            if message.is_empty() {
                // toml gives no message for some stray characters (a lone
                // carriage return, for instance): name the character.
                message = match text.get(offset..).and_then(|rest| rest.chars().next()) {
                    Some(c) => format!("invalid TOML: unexpected character {c:?}"),
                    None => "invalid TOML".to_string(),
                };
            }
            return Err(vec![locate(offset, message)]);
        }
    };
    let mut v = Validator {
        index: &index,
        problems: Vec::new(),
        warnings: Vec::new(),
    };
    let config = v.config(&raw);
    let mut problems = v.problems;
    match config {
        Some(config) if problems.is_empty() => {
            let mut warnings = v.warnings;
            warnings.sort_by_key(|w| w.0);
            let warnings = warnings
                .into_iter()
                .map(|(o, m)| locate(o, format!("warning: {m}")))
                .collect();
            Ok((config, warnings))
        }
        _ => {
            if problems.is_empty() {
                // Unreachable by construction: every `None` above records a
                // problem. Still, never report success without a config.
                problems.push((
                    0,
                    "internal error: configuration rejected without a reason".into(),
                ));
            }
            problems.sort_by_key(|p| p.0);
            problems.dedup();
            Err(problems.into_iter().map(|(o, m)| locate(o, m)).collect())
        }
    }
}

/// Where `[instance]`'s `key` is set in `text`: its value's line and
/// column, or the `[instance]` header's when the file leaves the key out.
/// `None` if the text is not a configuration's TOML.
pub(crate) fn instance_key_position(text: &str, key: &str) -> Option<(usize, usize)> {
    let raw: RawConfig = toml::from_str(text).ok()?;
    let i: &RawInstance = raw.instance.get_ref();
    let span = match key {
        "mode" => i.mode.as_ref().map(Spanned::span),
        "client_interface" => Some(i.client_interface.span()),
        "backend_interface" => Some(i.backend_interface.span()),
        "attach" => i.attach.as_ref().map(Spanned::span),
        "bind" => i.bind.as_ref().map(Spanned::span),
        "workers" => i.workers.as_ref().map(Spanned::span),
        "flow_table_capacity" => i.flow_table_capacity.as_ref().map(Spanned::span),
        "flow_idle_timeout" => i.flow_idle_timeout.as_ref().map(Spanned::span),
        "tcp_closed_timeout" => i.tcp_closed_timeout.as_ref().map(Spanned::span),
        "tcp_syn_timeout" => i.tcp_syn_timeout.as_ref().map(Spanned::span),
        "persistence_capacity" => i.persistence_capacity.as_ref().map(Spanned::span),
        "persistence_when_full" => i.persistence_when_full.as_ref().map(Spanned::span),
        "control_socket" => i.control_socket.as_ref().map(Spanned::span),
        _ => None,
    }
    .unwrap_or_else(|| raw.instance.span());
    Some(LineIndex::new(text).position(span.start))
}

/// Makes a toml/serde message fit on one line and speak of keys, not fields.
/// The error for a dotted key (`health_check.type = "http"`) whose last
/// part starts at `offset`.
fn dotted_key_message(text: &str, offset: usize) -> String {
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let key: String = text[line_start..]
        .chars()
        .take_while(|c| *c != '=' && *c != '\n')
        .collect();
    let key = key.trim();
    let (table, leaf) = key.rsplit_once('.').unwrap_or(("", key));
    let header = if table == "health_check" {
        "[backend_service.health_check]".to_string()
    } else {
        format!("a [...{table}] table header")
    };
    format!(
        "dotted key {key} is not supported: write {} = ... under {header} instead",
        leaf.trim()
    )
}

fn tidy_toml_message(message: &str) -> String {
    let one_line = message.trim().replace('\n', ", ");
    if one_line == "missing field `instance`" {
        return "missing required table [instance]".to_string();
    }
    if let Some(rest) = one_line.strip_prefix("missing field ") {
        return format!("missing required key {rest}");
    }
    if let Some(rest) = one_line.strip_prefix("unknown field ") {
        return format!("unknown key {rest}");
    }
    one_line
}

fn list(names: &[&str]) -> String {
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// Why `ip` cannot be used as a unicast endpoint, if it cannot.
fn not_unicast(ip: IpAddr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("the unspecified address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("the broadcast address")
    } else {
        None
    }
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in mac.iter_mut() {
        let part = parts.next()?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// What is wrong with an HTTP check's request path, if anything: the first
/// rule it breaks, named.
pub(crate) fn path_problem(p: &str) -> Option<String> {
    if !p.starts_with('/') {
        return Some(format!("path {p:?} must start with '/'"));
    }
    if let Some(c) = p.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Some(format!(
            "path {p:?} contains {c:?} (no whitespace or control characters: \
             percent-encode them, like %20 for a space)"
        ));
    }
    // A request target is ASCII, and '#' would start a fragment, which a
    // client never sends: servers answer such a request 400.
    if let Some(c) = p.chars().find(|c| !c.is_ascii() || *c == '#') {
        let mut utf8 = [0; 4];
        let encoded: String = c
            .encode_utf8(&mut utf8)
            .bytes()
            .map(|b| format!("%{b:02X}"))
            .collect();
        return Some(format!(
            "path {p:?} contains {c:?} (ASCII only, and no '#': percent-encode it, {encoded})"
        ));
    }
    (p.len() > MAX_PATH).then(|| format!("path is {} bytes long (at most {MAX_PATH})", p.len()))
}

/// What is wrong with an HTTP check's Host header, if anything.
pub(crate) fn domain_problem(d: &str) -> Option<String> {
    // A host name (RFC 1123): labels of letters, digits and '-' that
    // neither start nor end with '-', joined by '.', with an optional
    // final '.'. ("-" alone would also read as "none" in a rules file.)
    let label = |l: &str| {
        (1..=MAX_LABEL).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    // The 253 characters do not count the final '.' (RFC 1035 §3.1: 255
    // octets on the wire are 253 characters of text without it).
    let name = d.strip_suffix('.').unwrap_or(d);
    let ok = (1..=MAX_DOMAIN).contains(&name.len()) && name.split('.').all(label);
    (!ok).then(|| {
        format!(
            "domain {d:?} is invalid (a host name of at most {MAX_DOMAIN} characters: \
             labels of 1-{MAX_LABEL} letters, digits and '-', not starting or ending with '-', \
             joined by '.')"
        )
    })
}

/// Parses `http_codes` ("200-399", "200,204,300-302"; spaces around items
/// are allowed). The error says what is wrong, for the caller to locate.
pub(crate) fn parse_http_codes(text: &str) -> Result<Vec<(u16, u16)>, String> {
    const FORM: &str =
        "expected codes or ranges separated by commas, like \"200-399\" or \"200,204,300-302\"";
    let (lo_ok, hi_ok) = HTTP_CODE_RANGE;
    let code = |item: &str| -> Result<u16, String> {
        if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
            return Err(FORM.to_string());
        }
        match item.parse::<u16>() {
            Ok(c) if (lo_ok..=hi_ok).contains(&c) => Ok(c),
            _ => Err(format!(
                "status code {item} is out of range ({lo_ok}-{hi_ok})"
            )),
        }
    };
    let mut codes = Vec::new();
    for item in text.split(',') {
        let item = item.trim_matches(|c| c == ' ' || c == '\t');
        let (lo, hi) = match item.split_once('-') {
            Some((lo, hi)) => (code(lo.trim_end())?, code(hi.trim_start())?),
            None => {
                let c = code(item)?;
                (c, c)
            }
        };
        if lo > hi {
            return Err(format!(
                "range {lo}-{hi} is backwards (write the lower code first)"
            ));
        }
        codes.push((lo, hi));
    }
    Ok(codes)
}

/// A server as parsed from a `server` table; fields are `None` when invalid.
#[derive(Clone)]
struct ParsedServer {
    address: Option<IpAddr>,
    port: Option<u16>,
    weight: Option<u8>,
    address_span: Range<usize>,
}

impl ParsedServer {
    fn endpoint(&self) -> Option<SocketAddr> {
        Some(SocketAddr::new(self.address?, self.port?))
    }
}

struct GroupInfo<'r> {
    raw: &'r RawGroup,
    servers: Vec<ParsedServer>,
}

/// A server of a service: its own (`group == None`) or one of a group's.
struct Member {
    server: ParsedServer,
    /// Index into the groups.
    group: Option<usize>,
}

struct ServiceInfo<'r> {
    raw: &'r RawService,
    protocol: Option<Protocol>,
    scheduler: Option<Scheduler>,
    health_check: Option<HealthCheck>,
    persistence_timeout: Option<Option<u32>>,
    on_all_down: Option<AllDown>,
    members: Vec<Member>,
}

struct ListenerInfo<'r> {
    raw: &'r RawListener,
    vip: Option<IpAddr>,
    protocol: Option<Protocol>,
    port: Option<u16>,
    service: Option<usize>,
}

struct Validator<'a> {
    index: &'a LineIndex<'a>,
    problems: Vec<(usize, String)>,
    /// Valid, but probably not what was meant (`l4lb check` and `run` say
    /// so; the file is still loaded).
    warnings: Vec<(usize, String)>,
}

impl Validator<'_> {
    fn report(&mut self, span: Range<usize>, message: String) {
        self.problems.push((span.start, message));
    }

    fn warn(&mut self, span: Range<usize>, message: String) {
        self.warnings.push((span.start, message));
    }

    fn line_of<T>(&self, value: &Spanned<T>) -> usize {
        self.index.line(value.span().start)
    }

    // ----- leaf checks -----

    fn int<T: TryFrom<i64>>(&mut self, value: &Num, key: &str, lo: i64, hi: i64) -> Option<T> {
        let n = value.get_ref().0;
        if n < lo || n > hi {
            self.report(
                value.span(),
                format!("{key} {n} is out of range ({lo}-{hi})"),
            );
            return None;
        }
        T::try_from(n).ok()
    }

    fn opt_int<T: TryFrom<i64>>(
        &mut self,
        value: Option<&Num>,
        key: &str,
        (lo, hi): (i64, i64),
        default: i64,
    ) -> Option<T> {
        match value {
            Some(v) => self.int(v, key, lo, hi),
            None => T::try_from(default).ok(),
        }
    }

    fn port(&mut self, value: &Num, key: &str) -> Option<u16> {
        self.int(value, key, 1, 65_535)
    }

    /// An IP address usable as a unicast endpoint.
    fn ip(&mut self, value: &Str, key: &str) -> Option<IpAddr> {
        let text = value.get_ref();
        let Ok(ip) = text.parse::<IpAddr>() else {
            self.report(
                value.span(),
                format!("{key} {text:?} is not a valid IPv4 or IPv6 address"),
            );
            return None;
        };
        if let Some(why) = not_unicast(ip) {
            self.report(
                value.span(),
                format!("{key} {ip} is {why} (must be a unicast address)"),
            );
            return None;
        }
        if let IpAddr::V6(v6) = ip {
            if let Some(v4) = v6.to_ipv4_mapped() {
                // The data plane keys IPv4 by this form; on the wire it is
                // never seen (RFC 4291 §2.5.5.2).
                self.report(
                    value.span(),
                    format!(
                        "{key} {ip} is an IPv4-mapped IPv6 address, which never appears on \
                         the wire (write {v4})"
                    ),
                );
                return None;
            }
        }
        Some(ip)
    }

    /// An address a VIP or a server can have: [`Validator::ip`], and not
    /// IPv6 link-local, which means something only together with an
    /// interface: health checks could not reach such a server (a connect
    /// without a scope fails), and routers forward nothing to or from it.
    fn routable_ip(&mut self, value: &Str, key: &str) -> Option<IpAddr> {
        let ip = self.ip(value, key)?;
        if matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()) {
            self.report(
                value.span(),
                format!("{key} {ip} is an IPv6 link-local address (must be a global or unique local address)"),
            );
            return None;
        }
        Some(ip)
    }

    fn choice<T: Copy>(&mut self, value: &Str, what: &str, options: &[(&str, T)]) -> Option<T> {
        let text = value.get_ref();
        if let Some((_, v)) = options.iter().find(|(name, _)| name == text) {
            return Some(*v);
        }
        let allowed: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
        self.report(
            value.span(),
            format!("unknown {what} {text:?} (allowed: {})", allowed.join(", ")),
        );
        None
    }

    fn opt_choice<T: Copy>(
        &mut self,
        value: Option<&Str>,
        what: &str,
        options: &[(&str, T)],
        default: T,
    ) -> Option<T> {
        match value {
            Some(v) => self.choice(v, what, options),
            None => Some(default),
        }
    }

    fn protocol(&mut self, value: &Str) -> Option<Protocol> {
        let text = value.get_ref();
        if text.eq_ignore_ascii_case("tcp") {
            Some(Protocol::Tcp)
        } else if text.eq_ignore_ascii_case("udp") {
            Some(Protocol::Udp)
        } else {
            self.report(
                value.span(),
                format!("unknown protocol {text:?} (allowed: tcp, udp)"),
            );
            None
        }
    }

    /// Names of the instance, listeners, services and groups.
    fn name(&mut self, value: &Str, what: &str) -> Option<String> {
        let text = value.get_ref();
        let ok = (1..=MAX_NAME).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok {
            self.report(
                value.span(),
                format!(
                    "{what} name {text:?} is invalid (1-{MAX_NAME} characters: letters, digits, '.', '_' and '-')"
                ),
            );
            return None;
        }
        Some(text.clone())
    }

    /// Records a duplicate-name problem; returns whether `value` is the first
    /// definition of its name.
    fn unique_name<'r>(
        &mut self,
        seen: &mut HashMap<&'r str, usize>,
        value: &'r Str,
        what: &str,
    ) -> bool {
        let line = self.line_of(value);
        match seen.get(value.get_ref().as_str()) {
            Some(first) => {
                self.report(
                    value.span(),
                    format!(
                        "duplicate {what} name {:?} (first defined at line {first})",
                        value.get_ref()
                    ),
                );
                false
            }
            None => {
                seen.insert(value.get_ref(), line);
                true
            }
        }
    }

    fn interface(&mut self, value: &Str, key: &str) -> Option<String> {
        let text = value.get_ref();
        let ok = (1..=MAX_IFNAME).contains(&text.len())
            && text != "."
            && text != ".."
            && !text
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
        if !ok {
            self.report(
                value.span(),
                format!(
                    "{key} {text:?} is not a valid interface name (1-{MAX_IFNAME} bytes, no '/', ':' or whitespace)"
                ),
            );
            return None;
        }
        Some(text.clone())
    }

    // ----- sections -----

    fn config(&mut self, raw: &RawConfig) -> Option<Config> {
        let instance = self.instance(raw.instance.get_ref());
        let groups = self.groups(&raw.availability_group.0);
        let services = self.services(&raw.backend_service.0, &groups);
        let listeners = self.listeners(&raw.listener.0, &services);
        self.families(&listeners, &services, &groups);
        self.totals(raw, &services);

        let services = services
            .iter()
            .map(|s| {
                Some(BackendService {
                    name: s.raw.name.get_ref().clone(),
                    protocol: s.protocol?,
                    scheduler: s.scheduler?,
                    health_check: s.health_check.clone()?,
                    persistence_timeout: s.persistence_timeout?,
                    on_all_down: s.on_all_down?,
                    servers: s
                        .members
                        .iter()
                        .map(|m| {
                            Some(Server {
                                address: m.server.address?,
                                port: m.server.port?,
                                weight: m.server.weight?,
                                group: match m.group {
                                    Some(g) => Some(groups.get(g)?.raw.name.get_ref().clone()),
                                    None => None,
                                },
                            })
                        })
                        .collect::<Option<Vec<_>>>()?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let listeners = listeners
            .iter()
            .map(|l| {
                Some(Listener {
                    name: l.raw.name.get_ref().clone(),
                    vip: l.vip?,
                    protocol: l.protocol?,
                    port: l.port?,
                    service: l.service?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Config {
            instance: instance?,
            listeners,
            services,
        })
    }

    fn instance(&mut self, r: &RawInstance) -> Option<Instance> {
        let name = self.name(&r.name, "instance");
        let mode = self.opt_choice(
            r.mode.as_ref(),
            "forwarding mode",
            &[("nat", ForwardingMode::Nat)],
            ForwardingMode::Nat,
        );
        let client_interface = self.interface(&r.client_interface, "client_interface");
        let backend_interface = self.interface(&r.backend_interface, "backend_interface");
        if let (Some(c), Some(b)) = (&client_interface, &backend_interface) {
            if c == b {
                self.report(
                    r.backend_interface.span(),
                    format!(
                        "backend_interface {b:?} is the same as client_interface (they must be different interfaces)"
                    ),
                );
            }
        }
        let client_gateway = self.ip(&r.client_gateway, "client_gateway");
        let attach = self.opt_choice(
            r.attach.as_ref(),
            "attach mode",
            &[("native", AttachMode::Native), ("skb", AttachMode::Skb)],
            AttachMode::Native,
        );
        let bind = self.opt_choice(
            r.bind.as_ref(),
            "bind mode",
            &[
                ("auto", BindMode::Auto),
                ("copy", BindMode::Copy),
                ("zero_copy", BindMode::ZeroCopy),
            ],
            BindMode::Auto,
        );
        let workers = self.workers(r);
        let flow_table_capacity = self.opt_int(
            r.flow_table_capacity.as_ref(),
            "flow_table_capacity",
            FLOW_TABLE_CAPACITY_RANGE,
            DEFAULT_FLOW_TABLE_CAPACITY,
        );
        let flow_idle_timeout = self.opt_int(
            r.flow_idle_timeout.as_ref(),
            "flow_idle_timeout",
            FLOW_IDLE_TIMEOUT_RANGE,
            DEFAULT_FLOW_IDLE_TIMEOUT,
        );
        let tcp_closed_timeout = self.tcp_state_timeout(
            r.tcp_closed_timeout.as_ref(),
            "tcp_closed_timeout",
            DEFAULT_TCP_CLOSED_TIMEOUT,
            flow_idle_timeout,
            "a closed flow cannot outlive an idle one",
        );
        let tcp_syn_timeout = self.tcp_state_timeout(
            r.tcp_syn_timeout.as_ref(),
            "tcp_syn_timeout",
            DEFAULT_TCP_SYN_TIMEOUT,
            flow_idle_timeout,
            "an opening flow cannot outlive an idle one",
        );
        let persistence_capacity = self.opt_int(
            r.persistence_capacity.as_ref(),
            "persistence_capacity",
            PERSISTENCE_CAPACITY_RANGE,
            DEFAULT_PERSISTENCE_CAPACITY,
        );
        let persistence_when_full = self.opt_choice(
            r.persistence_when_full.as_ref(),
            "persistence_when_full policy",
            &[
                ("evict_oldest", WhenFull::EvictOldest),
                ("no_record", WhenFull::NoRecord),
            ],
            WhenFull::EvictOldest,
        );
        let control_socket = self.control_socket(r.control_socket.as_ref());
        let neighbours = self.neighbours(r);
        Some(Instance {
            name: name?,
            mode: mode?,
            client_interface: client_interface?,
            backend_interface: backend_interface?,
            client_gateway: client_gateway?,
            attach: attach?,
            bind: bind?,
            workers: workers?,
            flow_table_capacity: flow_table_capacity?,
            flow_idle_timeout: flow_idle_timeout?,
            tcp_closed_timeout: tcp_closed_timeout?,
            tcp_syn_timeout: tcp_syn_timeout?,
            persistence_capacity: persistence_capacity?,
            persistence_when_full: persistence_when_full?,
            control_socket: control_socket?,
            neighbours: neighbours?,
        })
    }

    /// `tcp_closed_timeout` or `tcp_syn_timeout` (`key`, value `v`): 1 s to
    /// a day and at most `flow_idle_timeout` (`idle`, when that is valid,
    /// else `why` not); absent, `default` or the idle timeout if that is
    /// shorter.
    fn tcp_state_timeout(
        &mut self,
        v: Option<&Num>,
        key: &str,
        default: i64,
        idle: Option<u32>,
        why: &str,
    ) -> Option<u32> {
        let Some(v) = v else {
            return Some(idle.map_or(default as u32, |i| i.min(default as u32)));
        };
        let (lo, hi) = TCP_CLOSED_TIMEOUT_RANGE;
        let n: u32 = self.int(v, key, lo, hi)?;
        if let Some(i) = idle.filter(|&i| n > i) {
            self.report(
                v.span(),
                format!("{key} {n} is longer than flow_idle_timeout {i} ({why})"),
            );
            return None;
        }
        Some(n)
    }

    fn workers(&mut self, r: &RawInstance) -> Option<Vec<usize>> {
        let Some(list) = &r.workers else {
            return Some(DEFAULT_WORKERS.to_vec());
        };
        if list.get_ref().0.is_empty() {
            self.report(
                list.span(),
                "workers must list at least one CPU core id (one worker per entry)".to_string(),
            );
            return None;
        }
        let mut ok = true;
        if let Some(extra) = list.get_ref().0.get(MAX_WORKERS) {
            self.report(
                extra.span(),
                format!(
                    "workers lists {} CPU core ids, at most {MAX_WORKERS} (one worker per queue of the XDP program's socket map)",
                    list.get_ref().0.len()
                ),
            );
            ok = false;
        }
        let mut workers = Vec::new();
        for entry in &list.get_ref().0 {
            let Some(cpu) = self.int::<usize>(entry, "CPU core id", 0, MAX_CPU - 1) else {
                ok = false;
                continue;
            };
            if workers.contains(&cpu) {
                self.report(
                    entry.span(),
                    format!("CPU core id {cpu} is listed twice in workers (one worker per core)"),
                );
                ok = false;
                continue;
            }
            workers.push(cpu);
        }
        ok.then_some(workers)
    }

    fn control_socket(&mut self, value: Option<&Str>) -> Option<PathBuf> {
        let Some(value) = value else {
            return Some(PathBuf::from(super::DEFAULT_CONTROL_SOCKET));
        };
        let text = value.get_ref();
        let problem = if text.is_empty() {
            Some("control_socket must not be empty".to_string())
        } else if text.contains('\0') {
            Some("control_socket must not contain NUL characters".to_string())
        } else if text.len() > MAX_SOCKET_PATH {
            Some(format!(
                "control_socket path is {} bytes long (at most {MAX_SOCKET_PATH})",
                text.len()
            ))
        } else {
            None
        };
        match problem {
            Some(message) => {
                self.report(value.span(), message);
                None
            }
            None => Some(PathBuf::from(text)),
        }
    }

    fn neighbours(&mut self, r: &RawInstance) -> Option<Vec<StaticNeighbour>> {
        let mut ok = true;
        let mut out = Vec::new();
        let mut seen: HashMap<IpAddr, usize> = HashMap::new();
        for n in &r.neighbour.0 {
            let n = n.get_ref();
            let address = self.ip(&n.address, "address");
            if let Some(ip) = address {
                if let Some(first) = seen.get(&ip) {
                    self.report(
                        n.address.span(),
                        format!("static neighbour {ip} is listed twice (first at line {first})"),
                    );
                    ok = false;
                } else {
                    seen.insert(ip, self.line_of(&n.address));
                }
            }
            let text = n.mac.get_ref();
            let mac = match parse_mac(text) {
                None => {
                    self.report(
                        n.mac.span(),
                        format!(
                            "mac {text:?} is not a valid MAC address (expected six hex bytes like \"02:00:00:00:00:01\")"
                        ),
                    );
                    None
                }
                Some(mac) if mac[0] & 1 == 1 || mac == [0; 6] => {
                    self.report(
                        n.mac.span(),
                        format!("mac {text} is not a unicast MAC address"),
                    );
                    None
                }
                Some(mac) => Some(mac),
            };
            match (address, mac) {
                (Some(address), Some(mac)) => out.push(StaticNeighbour { address, mac }),
                _ => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn server(&mut self, raw: &Spanned<RawServer>) -> ParsedServer {
        let raw = raw.get_ref();
        ParsedServer {
            address: self.routable_ip(&raw.address, "server address"),
            port: self.port(&raw.port, "port"),
            weight: match &raw.weight {
                Some(w) => self.int(w, "weight", 0, MAX_WEIGHT),
                None => Some(DEFAULT_WEIGHT),
            },
            address_span: raw.address.span(),
        }
    }

    fn groups<'r>(&mut self, raw: &'r [Spanned<RawGroup>]) -> Vec<GroupInfo<'r>> {
        let mut seen = HashMap::new();
        let mut groups = Vec::new();
        for g in raw {
            let g = g.get_ref();
            self.name(&g.name, "availability group");
            self.unique_name(&mut seen, &g.name, "availability group");
            if g.server.0.is_empty() {
                self.report(
                    g.name.span(),
                    format!(
                        "availability group {:?} has no servers (add [[availability_group.server]] entries)",
                        g.name.get_ref()
                    ),
                );
            }
            let servers: Vec<ParsedServer> = g.server.0.iter().map(|s| self.server(s)).collect();
            let mut endpoints: HashMap<SocketAddr, usize> = HashMap::new();
            for s in &servers {
                let Some(ep) = s.endpoint() else { continue };
                let line = self.index.line(s.address_span.start);
                if let Some(first) = endpoints.get(&ep) {
                    self.report(
                        s.address_span.clone(),
                        format!(
                            "server {ep} is listed twice in availability group {:?} (first at line {first})",
                            g.name.get_ref()
                        ),
                    );
                } else {
                    endpoints.insert(ep, line);
                }
            }
            groups.push(GroupInfo { raw: g, servers });
        }
        groups
    }

    fn services<'r>(
        &mut self,
        raw: &'r [Spanned<RawService>],
        groups: &[GroupInfo<'_>],
    ) -> Vec<ServiceInfo<'r>> {
        let mut by_name: HashMap<&str, usize> = HashMap::new();
        for (i, g) in groups.iter().enumerate() {
            by_name.entry(g.raw.name.get_ref().as_str()).or_insert(i);
        }
        let mut group_names: Vec<&str> = Vec::new();
        for g in groups {
            let name = g.raw.name.get_ref().as_str();
            if !group_names.contains(&name) {
                group_names.push(name);
            }
        }

        let mut seen = HashMap::new();
        let mut services = Vec::new();
        for s in raw {
            let s = s.get_ref();
            let name = s.name.get_ref();
            self.name(&s.name, "backend service");
            self.unique_name(&mut seen, &s.name, "backend service");
            let protocol = self.protocol(&s.protocol);
            let scheduler = self.opt_choice(
                s.scheduler.as_ref(),
                "scheduler",
                &[
                    ("weighted_source_ip", Scheduler::WeightedSourceIp),
                    ("weighted_round_robin", Scheduler::WeightedRoundRobin),
                    (
                        "weighted_least_connections",
                        Scheduler::WeightedLeastConnections,
                    ),
                ],
                Scheduler::WeightedSourceIp,
            );
            let persistence_timeout = match &s.persistence_timeout {
                None => Some(None),
                Some(v) if v.get_ref().0 == 0 => Some(None),
                Some(v) => {
                    let n = v.get_ref().0;
                    let (lo, hi) = PERSISTENCE_RANGE;
                    if (lo..=hi).contains(&n) {
                        u32::try_from(n).ok().map(Some)
                    } else {
                        self.report(
                            v.span(),
                            format!(
                                "persistence_timeout {n} is out of range (0 = off, or {lo}-{hi})"
                            ),
                        );
                        None
                    }
                }
            };
            let on_all_down = self.opt_choice(
                s.on_all_down.as_ref(),
                "on_all_down action",
                &[("drop", AllDown::Drop), ("fail_open", AllDown::FailOpen)],
                AllDown::Drop,
            );
            let health_check = self.health_check(s.health_check.as_ref());
            if protocol == Some(Protocol::Udp) && s.health_check.is_none() {
                self.warn(
                    s.name.span(),
                    format!(
                        "backend service {name:?} is udp but has no [backend_service.health_check]: \
                         the default is a TCP connect to each server's port, and a server that \
                         does not accept TCP there is marked down; add the table (type = \"udp\", \
                         or a tcp or http check on a port the servers listen on)"
                    ),
                );
            }

            // Own servers, then each group's, in order.
            let mut members: Vec<Member> = s
                .server
                .0
                .iter()
                .map(|raw| Member {
                    server: self.server(raw),
                    group: None,
                })
                .collect();
            let mut group_problem = false;
            // (endpoint -> group of the first occurrence, line of it)
            let mut endpoints: HashMap<SocketAddr, (Option<usize>, usize)> = HashMap::new();
            for m in &members {
                let Some(ep) = m.server.endpoint() else {
                    continue;
                };
                let line = self.index.line(m.server.address_span.start);
                if let Some((_, first)) = endpoints.get(&ep) {
                    self.report(
                        m.server.address_span.clone(),
                        format!(
                            "server {ep} is listed twice in backend service {name:?} (first at line {first})"
                        ),
                    );
                } else {
                    endpoints.insert(ep, (None, line));
                }
            }
            let mut used: Vec<usize> = Vec::new();
            if let Some(refs) = &s.availability_groups {
                for r in &refs.get_ref().0 {
                    let gname = r.get_ref();
                    let Some(&gi) = by_name.get(gname.as_str()) else {
                        self.report(
                            r.span(),
                            format!(
                                "unknown availability group {gname:?} (defined: {})",
                                list(&group_names)
                            ),
                        );
                        group_problem = true;
                        continue;
                    };
                    if used.contains(&gi) {
                        self.report(
                            r.span(),
                            format!(
                                "availability group {gname:?} is listed twice in backend service {name:?}"
                            ),
                        );
                        continue;
                    }
                    used.push(gi);
                    let Some(group) = groups.get(gi) else {
                        continue;
                    };
                    if group.servers.is_empty() {
                        group_problem = true;
                    }
                    for server in &group.servers {
                        if let Some(ep) = server.endpoint() {
                            match endpoints.get(&ep) {
                                // Repeated inside the group itself: reported there.
                                Some((Some(g), _)) if *g == gi => {}
                                Some((_, first)) => self.report(
                                    r.span(),
                                    format!(
                                        "server {ep} from availability group {gname:?} is already in backend service {name:?} (line {first})"
                                    ),
                                ),
                                None => {
                                    let line = self.index.line(server.address_span.start);
                                    endpoints.insert(ep, (Some(gi), line));
                                }
                            }
                        }
                        members.push(Member {
                            server: server.clone(),
                            group: Some(gi),
                        });
                    }
                }
            }
            if members.is_empty() && !group_problem {
                self.report(
                    s.name.span(),
                    format!(
                        "backend service {name:?} has no servers (add [[backend_service.server]] entries or availability_groups)"
                    ),
                );
            }
            services.push(ServiceInfo {
                raw: s,
                protocol,
                scheduler,
                health_check,
                persistence_timeout,
                on_all_down,
                members,
            });
        }
        services
    }

    fn health_check(&mut self, raw: Option<&Spanned<HealthCheckTable>>) -> Option<HealthCheck> {
        let Some(raw) = raw else {
            return Some(HealthCheck {
                kind: HealthCheckKind::Tcp,
                port: None,
                timeout: DEFAULT_HC_TIMEOUT,
                interval: DEFAULT_HC_INTERVAL,
                unhealthy_threshold: DEFAULT_HC_UNHEALTHY,
                healthy_threshold: DEFAULT_HC_HEALTHY,
                path: None,
                domain: None,
                http_codes: Vec::new(),
                udp_payload: None,
            });
        };
        let r = raw.get_ref();
        let kind = self.opt_choice(
            r.kind.as_ref(),
            "health check type",
            &[
                ("tcp", HealthCheckKind::Tcp),
                ("http", HealthCheckKind::Http),
                ("udp", HealthCheckKind::Udp),
            ],
            HealthCheckKind::Tcp,
        );
        let port = match &r.port {
            Some(p) => self.port(p, "port").map(Some),
            None => Some(None),
        };
        let timeout: Option<u32> = self.opt_int(
            r.timeout.as_ref(),
            "timeout",
            (1, 300),
            DEFAULT_HC_TIMEOUT.into(),
        );
        let interval: Option<u32> = self.opt_int(
            r.interval.as_ref(),
            "interval",
            (1, 50),
            DEFAULT_HC_INTERVAL.into(),
        );
        if let (Some(t), Some(i)) = (timeout, interval) {
            if t > i {
                match (&r.timeout, &r.interval) {
                    (Some(at), _) => self.report(
                        at.span(),
                        format!("timeout {t}s exceeds interval {i}s (timeout must not exceed interval)"),
                    ),
                    (None, Some(at)) => self.report(
                        at.span(),
                        format!("interval {i}s is shorter than timeout {t}s (timeout must not exceed interval)"),
                    ),
                    // Unreachable: the defaults (2s, 5s) are consistent.
                    (None, None) => self.report(
                        raw.span(),
                        format!("timeout {t}s exceeds interval {i}s"),
                    ),
                }
            }
        }
        let unhealthy_threshold: Option<u32> = self.opt_int(
            r.unhealthy_threshold.as_ref(),
            "unhealthy_threshold",
            (2, 10),
            DEFAULT_HC_UNHEALTHY.into(),
        );
        let healthy_threshold: Option<u32> = self.opt_int(
            r.healthy_threshold.as_ref(),
            "healthy_threshold",
            (2, 10),
            DEFAULT_HC_HEALTHY.into(),
        );

        let mut http_only_ok = true;
        if let Some(kind) = kind {
            let keys = [
                ("path", &r.path, HealthCheckKind::Http),
                ("domain", &r.domain, HealthCheckKind::Http),
                ("http_codes", &r.http_codes, HealthCheckKind::Http),
                ("udp_payload", &r.udp_payload, HealthCheckKind::Udp),
            ];
            for (key, value, only) in keys {
                if let (Some(v), true) = (value, kind != only) {
                    self.report(
                        v.span(),
                        format!(
                            "{key} is only valid for {only} health checks (this check is type \"{kind}\")"
                        ),
                    );
                    http_only_ok = false;
                }
            }
        }
        let is_http = kind == Some(HealthCheckKind::Http);
        let path = match &r.path {
            Some(v) if is_http => match path_problem(v.get_ref()) {
                None => Some(Some(v.get_ref().clone())),
                Some(problem) => {
                    self.report(v.span(), problem);
                    None
                }
            },
            None if is_http => Some(Some(DEFAULT_HTTP_PATH.to_string())),
            _ => Some(None),
        };
        let domain = match &r.domain {
            Some(v) if is_http => match domain_problem(v.get_ref()) {
                None => Some(Some(v.get_ref().clone())),
                Some(problem) => {
                    self.report(v.span(), problem);
                    None
                }
            },
            _ => Some(None),
        };
        let http_codes = match &r.http_codes {
            Some(v) if is_http => self.http_codes(v),
            None if is_http => Some(DEFAULT_HTTP_CODES.to_vec()),
            _ => Some(Vec::new()),
        };
        let is_udp = kind == Some(HealthCheckKind::Udp);
        let udp_payload = match &r.udp_payload {
            Some(v) if is_udp => {
                let len = v.get_ref().len();
                if (1..=MAX_UDP_PAYLOAD).contains(&len) {
                    Some(Some(v.get_ref().clone()))
                } else {
                    self.report(
                        v.span(),
                        format!(
                            "udp_payload is {len} bytes long (must be 1-{MAX_UDP_PAYLOAD} bytes)"
                        ),
                    );
                    None
                }
            }
            None if is_udp => Some(Some(DEFAULT_UDP_PAYLOAD.to_string())),
            _ => Some(None),
        };
        if !http_only_ok {
            return None;
        }
        Some(HealthCheck {
            kind: kind?,
            port: port?,
            timeout: timeout?,
            interval: interval?,
            unhealthy_threshold: unhealthy_threshold?,
            healthy_threshold: healthy_threshold?,
            path: path?,
            domain: domain?,
            http_codes: http_codes?,
            udp_payload: udp_payload?,
        })
        .filter(|hc| hc.timeout <= hc.interval)
    }

    /// `http_codes`: comma-separated codes and inclusive ranges.
    fn http_codes(&mut self, value: &Str) -> Option<Vec<(u16, u16)>> {
        match parse_http_codes(value.get_ref()) {
            Ok(codes) => Some(codes),
            Err(why) => {
                self.report(
                    value.span(),
                    format!("http_codes {:?} is invalid: {why}", value.get_ref()),
                );
                None
            }
        }
    }

    fn listeners<'r>(
        &mut self,
        raw: &'r [Spanned<RawListener>],
        services: &[ServiceInfo<'_>],
    ) -> Vec<ListenerInfo<'r>> {
        let mut by_name: HashMap<&str, usize> = HashMap::new();
        let mut service_names: Vec<&str> = Vec::new();
        for (i, s) in services.iter().enumerate() {
            let name = s.raw.name.get_ref().as_str();
            if !by_name.contains_key(name) {
                by_name.insert(name, i);
                service_names.push(name);
            }
        }

        let mut seen = HashMap::new();
        let mut tuples: HashMap<(IpAddr, Protocol, u16), (&str, usize)> = HashMap::new();
        let mut listeners = Vec::new();
        for l in raw {
            let l = l.get_ref();
            let name = l.name.get_ref().as_str();
            self.name(&l.name, "listener");
            self.unique_name(&mut seen, &l.name, "listener");
            let vip = self.routable_ip(&l.vip, "vip");
            let protocol = self.protocol(&l.protocol);
            let port = self.port(&l.port, "port");
            let target = l.backend_service.get_ref();
            let service = by_name.get(target.as_str()).copied();
            if service.is_none() {
                self.report(
                    l.backend_service.span(),
                    format!(
                        "unknown backend service {target:?} (defined: {})",
                        list(&service_names)
                    ),
                );
            }
            if let (Some(p), Some(svc)) = (protocol, service.and_then(|i| services.get(i))) {
                if let Some(sp) = svc.protocol {
                    if sp != p {
                        self.report(
                            l.protocol.span(),
                            format!(
                                "listener protocol {p} does not match backend service {target:?} protocol {sp} (NAT cannot change the L4 protocol)"
                            ),
                        );
                    }
                }
            }
            if let (Some(vip), Some(p), Some(port)) = (vip, protocol, port) {
                if let Some((other, line)) = tuples.get(&(vip, p, port)) {
                    self.report(
                        l.vip.span(),
                        format!(
                            "listener {name:?} uses {p} {} already taken by listener {other:?} (line {line})",
                            SocketAddr::new(vip, port)
                        ),
                    );
                } else {
                    tuples.insert((vip, p, port), (name, self.line_of(&l.name)));
                }
            }
            listeners.push(ListenerInfo {
                raw: l,
                vip,
                protocol,
                port,
                service,
            });
        }
        listeners
    }

    /// A service's servers must be of the address family of its listeners'
    /// VIPs (NAT does not translate between IPv4 and IPv6).
    fn families(
        &mut self,
        listeners: &[ListenerInfo<'_>],
        services: &[ServiceInfo<'_>],
        groups: &[GroupInfo<'_>],
    ) {
        for (si, service) in services.iter().enumerate() {
            let users: Vec<(&ListenerInfo, IpAddr)> = listeners
                .iter()
                .filter(|l| l.service == Some(si))
                .filter_map(|l| Some((l, l.vip?)))
                .collect();
            let Some(&(first, first_vip)) = users.first() else {
                continue;
            };
            let sname = service.raw.name.get_ref();
            let first_line = self.line_of(&first.raw.name);
            if let Some((other, other_vip)) = users
                .iter()
                .find(|(_, vip)| vip.is_ipv4() != first_vip.is_ipv4())
            {
                self.report(
                    other.raw.backend_service.span(),
                    format!(
                        "backend service {sname:?} is used by {} listener {:?} (line {first_line}) and {} listener {:?}; the listeners of a service must share one address family",
                        family(first_vip),
                        first.raw.name.get_ref(),
                        family(*other_vip),
                        other.raw.name.get_ref(),
                    ),
                );
                continue;
            }
            for m in &service.members {
                let Some(address) = m.server.address else {
                    continue;
                };
                if address.is_ipv4() == first_vip.is_ipv4() {
                    continue;
                }
                let origin = match m.group.and_then(|g| groups.get(g)) {
                    Some(g) => format!(" (from availability group {:?})", g.raw.name.get_ref()),
                    None => String::new(),
                };
                self.report(
                    m.server.address_span.clone(),
                    format!(
                        "server address {address} is of the wrong family{origin}: backend service {sname:?} is used by {} listener {:?} (line {first_line})",
                        family(first_vip),
                        first.raw.name.get_ref(),
                    ),
                );
            }
        }
    }

    fn totals(&mut self, raw: &RawConfig, services: &[ServiceInfo<'_>]) {
        let listeners = &raw.listener.0;
        if let Some(extra) = listeners.get(MAX_LISTENERS) {
            self.report(
                extra.span(),
                format!(
                    "too many listeners: {} (at most {MAX_LISTENERS})",
                    listeners.len()
                ),
            );
        }
        let total: usize = services.iter().map(|s| s.members.len()).sum();
        if total > MAX_SERVERS {
            let mut running = 0;
            for s in services {
                running += s.members.len();
                if running > MAX_SERVERS {
                    self.report(
                        s.raw.name.span(),
                        format!(
                            "too many servers: {total} across all backend services after expanding availability groups (at most {MAX_SERVERS})"
                        ),
                    );
                    break;
                }
            }
        }
    }
}
