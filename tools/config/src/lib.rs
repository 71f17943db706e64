//! The configuration file (TOML) shared by `serve`, `replay` and `inspect`: the engine's
//! intercepts and the servers behind the multiplexer with what each owns.
//!
//! ```toml
//! [engine.intercepts]
//! low_ram_top = 0x80000000          # for a model without TOLUD
//!
//! [[engine.ecam]]                   # a window the toolstack sets up (any segment)
//! segment = 1
//! base = 0xe0000000
//! end_bus = 0x3f
//!
//! [[server]]
//! name = "qemu"
//! kind = "trace"                    # replay: answers with the recorded values
//! owns.bdf = ["00:00.0-00:04.7"]    # a function or an inclusive range (map_pcidev)
//! owns.position = ["00:02.0/00.0"]  # behind bridges: root function, then dev.fn per hop
//! owns.ports = ["0x60", "0x70-0x71"]
//! owns.mmio = ["0xfed00000+0x400"]  # start-end or start+length
//!
//! [[server]]
//! name = "vgpu"
//! kind = "emulated"
//! [server.function."00:05.0"]       # a built-in PCI function at a BDF or a position
//! vendor = 0x1af4
//! device = 0x1337
//! class = 0xff0000
//! bars = [{ kind = "mem32", size = 4096 }]
//! ```
//!
//! Also here: [`diagnostic`], how an error points into the file, and [`dm_socket`], the
//! device-model socket's policy (who may connect and claim what) taken from this file.

pub mod diagnostic;
pub mod dm_socket;
pub mod ports;

use crate::diagnostic::{Diagnostic, Mark, first_line, line_of};
use bdf_router::Sbdf;
use ioreq_mux_engine::{EngineConfig, HostedPortSpec};
use ioreq_mux_models::{EmulatedModel, FunctionSpec, Placement, SpecError};
use ioreq_server::{Claim, IoRange, Position, RangeKind};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;
use toml::Spanned;

/// A configuration problem, with where it is.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{file}: {source}")]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is something else (a trace, a binary): nothing in it to point at.
    #[error("{file} is not a topology: {why}")]
    NotATopology { file: PathBuf, why: String },
    /// A problem at a place in the file, shown with the line (and, for a conflict, where
    /// the other claim is).
    #[error("{0}")]
    At(Box<Diagnostic>),
    /// A problem the TOML parser could not place.
    #[error("{file}: {msg}")]
    Syntax { file: PathBuf, msg: String },
}

impl ConfigError {
    /// The diagnostic of an error at a place in the file.
    pub fn diagnostic(&self) -> Option<&Diagnostic> {
        match self {
            ConfigError::At(d) => Some(d),
            _ => None,
        }
    }
}

/// What kind of server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ServerKind {
    /// Built-in emulated functions (`[server.function."..."]`).
    #[default]
    Emulated,
    /// Replay only: a model that answers with what the trace recorded.
    Trace,
    /// A device model in its own process, connecting over the control socket.
    Process,
}

impl fmt::Display for ServerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServerKind::Emulated => "emulated",
            ServerKind::Trace => "trace",
            ServerKind::Process => "process",
        })
    }
}

/// What a server owns, as written in the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Owns {
    bdf: Vec<Spanned<String>>,
    position: Vec<Spanned<String>>,
    ports: Vec<Spanned<String>>,
    mmio: Vec<Spanned<String>>,
}

/// One `[[server]]` as written; [`Server`] documents the fields.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerConfig {
    name: Spanned<String>,
    #[serde(default)]
    kind: Option<Spanned<ServerKind>>,
    #[serde(default)]
    owns: Owns,
    #[serde(default, rename = "function")]
    functions: BTreeMap<Spanned<String>, FunctionSpec>,
    #[serde(default)]
    uid: Option<Spanned<u32>>,
    #[serde(default)]
    command: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    guest_memory: Option<Spanned<bool>>,
    #[serde(default)]
    deadline: Option<Spanned<String>>,
    #[serde(default)]
    config_space: Option<Spanned<u16>>,
    #[serde(default)]
    qemu_devices: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    ids: Option<Spanned<BTreeMap<Spanned<String>, u32>>>,
}

impl ServerConfig {
    fn kind(&self) -> ServerKind {
        self.kind.as_ref().map(|k| *k.get_ref()).unwrap_or_default()
    }
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    engine: EngineConfig,
    #[serde(default, rename = "server")]
    servers: Vec<ServerConfig>,
    /// `[[port]]`: module [`ports`].
    #[serde(default, rename = "port")]
    ports: Vec<Spanned<toml::Table>>,
}

/// Where the parts of the file are that types of other modules ([`EngineConfig`]'s windows,
/// [`FunctionSpec`]) keep no place for, read from the same text in a second pass.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Places {
    engine: EnginePlaces,
    server: Vec<ServerPlaces>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct EnginePlaces {
    ecam: Vec<Spanned<IgnoredAny>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ServerPlaces {
    function: BTreeMap<String, FunctionPlaces>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FunctionPlaces {
    class: Option<Spanned<IgnoredAny>>,
    bars: Vec<Spanned<IgnoredAny>>,
}

/// A configuration with every claim parsed.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub engine: EngineConfig,
    pub servers: Vec<Server>,
    /// The file's text, for errors found after loading (see [`Config::check_qemu_devices`]).
    pub text: String,
}

/// A server with its claims parsed.
#[derive(Debug, Clone)]
pub struct Server {
    pub name: String,
    pub kind: ServerKind,
    /// What `owns` lists: claims made at start (emulated and trace servers) or the grant
    /// (process servers).
    pub claims: Vec<Claim>,
    /// Built-in functions by placement (a BDF or a position).
    pub functions: Vec<(Placement, FunctionSpec)>,
    /// The Unix user a process server must run as (out-of-process servers).
    pub uid: Option<u32>,
    /// Command line that starts a process server (optional).
    pub command: Vec<String>,
    /// A process server that maps guest memory itself (QEMU does, through Xen's foreign
    /// mappings): rep accesses through a guest buffer (`data_is_ptr`) reach it unchanged.
    pub guest_memory: bool,
    /// A process server's deadline per request (`500ms`, `30s`; default 1 s): past it the
    /// request completes as a master abort and the server is dropped. QEMU copies whole
    /// files in one request (fw_cfg DMA) and wants minutes.
    pub deadline: Option<std::time::Duration>,
    /// A process server's functions have this many bytes of configuration space: 256 or
    /// 4096 (default). Past it the multiplexer answers all ones itself: QEMU 7.2 in Xen mode
    /// knows only conventional PCI's 256 bytes and must not be asked for more.
    pub config_space: Option<u16>,
    /// Replay (`kind = "trace"`): the QEMU device types (as QEMU's trace names them, e.g.
    /// "nvme") this server stands for; `"*"` = every device no other server lists. Replay checks
    /// each access reached the server standing for the device QEMU routed it to.
    pub qemu_devices: Vec<String>,
    /// Replay: configuration dwords (at register 0) a trace server answers when asked outside
    /// the trace, e.g. by chipset detection: `{ "00:00.0" = 0x29c08086 }` as (function, dword).
    pub ids: Vec<(Sbdf, u32)>,
    /// Where in the file each claim, function and QEMU device type is.
    places: Spans,
}

/// Byte ranges in the file, one for each of a [`Server`]'s claims, functions and QEMU
/// device types, in the same order.
#[derive(Debug, Clone, Default)]
struct Spans {
    claims: Vec<Range<usize>>,
    functions: Vec<Range<usize>>,
    qemu_devices: Vec<Range<usize>>,
}

impl Server {
    /// The built-in model for an `emulated` server.
    pub fn emulated_model(&self) -> EmulatedModel {
        let mut m = EmulatedModel::new(&self.name);
        for (p, spec) in &self.functions {
            m = m.with_function(p.clone(), spec);
        }
        for c in &self.claims {
            if let Claim::Range(r) = c {
                if r.kind != RangeKind::Pci {
                    m = m.with_range(*r);
                }
            }
        }
        m
    }
}

fn parse_u64(t: &str) -> Result<u64, String> {
    let t = t.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(&h.replace('_', ""), 16),
        None => t.replace('_', "").parse(),
    };
    r.map_err(|_| format!("'{t}' is not a number"))
}

/// `A`, `A-B` (inclusive) or `A+LEN`.
pub fn parse_range(kind: RangeKind, t: &str) -> Result<IoRange, String> {
    let r = if let Some((a, b)) = t.split_once('-') {
        IoRange::new(kind, parse_u64(a)?, parse_u64(b)?)
    } else if let Some((a, l)) = t.split_once('+') {
        let (a, l) = (parse_u64(a)?, parse_u64(l)?);
        if l == 0 {
            return Err("zero length".into());
        }
        let end = a.checked_add(l - 1).ok_or("range wraps")?;
        IoRange::new(kind, a, end)
    } else {
        let a = parse_u64(t)?;
        IoRange::new(kind, a, a)
    };
    if !r.is_valid() {
        return Err(format!("'{t}' is empty or beyond the space"));
    }
    Ok(r)
}

/// `BB:DD.F` or `SSSS:BB:DD.F`, or an inclusive range `X-Y` of either.
pub fn parse_bdf_range(t: &str) -> Result<IoRange, String> {
    let (a, b) = match t.split_once('-') {
        Some((a, b)) => (a.trim(), b.trim()),
        None => (t.trim(), t.trim()),
    };
    let a: Sbdf = a.parse().map_err(|e| format!("{e}"))?;
    let b: Sbdf = b.parse().map_err(|e| format!("{e}"))?;
    if b.to_xen() < a.to_xen() {
        return Err(format!("'{t}': end before start"));
    }
    Ok(IoRange::new(
        RangeKind::Pci,
        a.to_xen().into(),
        b.to_xen().into(),
    ))
}

/// `[SSSS:]BB:DD.F/DD.F/...`: the first function is on the root bus, each later hop is on
/// the secondary bus of the bridge before it.
pub fn parse_position(t: &str) -> Result<Position, String> {
    let mut parts = t.split('/');
    let first: Sbdf = parts
        .next()
        .unwrap_or_default()
        .trim()
        .parse()
        .map_err(|e| format!("{e}"))?;
    let mut path = vec![first.devfn()];
    for hop in parts {
        let (d, f) = hop
            .trim()
            .split_once('.')
            .ok_or_else(|| format!("hop '{hop}' is not DD.F"))?;
        let d = u8::from_str_radix(d, 16).map_err(|_| format!("hop '{hop}': bad device"))?;
        let f = u8::from_str_radix(f, 16).map_err(|_| format!("hop '{hop}': bad function"))?;
        if d >= 32 || f >= 8 {
            return Err(format!("hop '{hop}' is out of range"));
        }
        path.push(d << 3 | f);
    }
    if path.len() < 2 {
        return Err(format!(
            "'{t}' has no hop behind a bridge; use owns.bdf for a function on the root bus"
        ));
    }
    Ok(Position {
        segment: first.segment,
        root_bus: first.bus,
        path,
    })
}

/// A BDF or a position, for `[server.function."..."]`.
pub fn parse_placement(t: &str) -> Result<Placement, String> {
    if t.contains('/') {
        Ok(Placement::Position(parse_position(t)?))
    } else {
        let s: Sbdf = t.trim().parse().map_err(|e| format!("{e}"))?;
        Ok(Placement::Bdf(s.to_xen()))
    }
}

/// Things parsed from the file, and the place of each.
type Placed<T> = (Vec<T>, Vec<Range<usize>>);

/// The file a topology comes from and its text, for errors that point into it.
struct Source<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn at(&self, span: Range<usize>, message: impl Into<String>, label: &str) -> Diagnostic {
        Diagnostic::new(self.file, self.text, message, Mark::new(span, label))
    }

    fn error(&self, span: Range<usize>, message: impl Into<String>, label: &str) -> ConfigError {
        ConfigError::At(Box::new(self.at(span, message, label)))
    }

    fn line(&self, span: &Range<usize>) -> usize {
        line_of(self.text, span.start)
    }

    /// The text as `T`; a TOML or type error points at its place.
    fn deserialize<T: serde::de::DeserializeOwned>(&self) -> Result<T, ConfigError> {
        toml::from_str(self.text).map_err(|e| match e.span() {
            Some(span) => self.error(span, e.message(), ""),
            None => ConfigError::Syntax {
                file: self.file.to_path_buf(),
                msg: e.message().to_string(),
            },
        })
    }
}

/// The file's bytes as text, or why it is not a topology at all.
fn topology_text(file: &Path, bytes: Vec<u8>) -> Result<String, ConfigError> {
    let not = |why: String| ConfigError::NotATopology {
        file: file.to_path_buf(),
        why,
    };
    if ioreq_mux_trace::looks_like_zstd(&bytes) {
        return Err(not(
            "it is zstd-compressed (an ioreq-mux trace or a compressed QEMU log?); a topology \
             is a TOML text file, given with --topology, the trace goes first"
                .into(),
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        not(format!(
            "it is not text (byte {at} is not UTF-8); a topology is a TOML text file"
        ))
    })
}

impl Config {
    /// Reads and checks a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let bytes = std::fs::read(path).map_err(|source| ConfigError::Io {
            file: path.to_path_buf(),
            source,
        })?;
        let cfg = Self::parse(path, &topology_text(path, bytes)?)?;
        if cfg.servers.is_empty() {
            tracing::warn!(
                "{}: no [[server]]: nothing stands behind the multiplexer, every access it \
                 does not answer itself master-aborts",
                path.display()
            );
        }
        Ok(cfg)
    }

    /// Parses text that came from `path` (used in messages).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let src = Source { file: path, text };
        let raw: ConfigFile = src.deserialize()?;
        let places: Places = src.deserialize()?;
        check_names(&src, &raw.servers)?;
        let servers = raw
            .servers
            .iter()
            .enumerate()
            .map(|(i, s)| src.server(i, s, places.server.get(i)))
            .collect::<Result<Vec<_>, _>>()?;
        let windows: Vec<(bdf_router::EcamWindow, Range<usize>)> = raw
            .engine
            .ecam
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let span = places.engine.ecam.get(i).map_or(0..0, Spanned::span);
                (*w, first_line(text, span))
            })
            .collect();
        check_windows(&src, &windows)?;
        check_qemu_device_lists(&src, &servers)?;
        let ports = ports::parse_ports(&src, &raw.ports)?;
        check_claims(&src, &servers, &windows, &ports)?;
        let mut engine = raw.engine;
        engine.ports = ports.into_iter().map(|(p, _)| p).collect();
        Ok(Config {
            path: path.to_path_buf(),
            engine,
            servers,
            text: text.to_string(),
        })
    }

    /// The 1-based line in the file of each of a server's `qemu_devices`, in order (empty
    /// for a configuration not read from a file).
    pub fn qemu_device_lines(&self, s: &Server) -> Vec<usize> {
        s.places
            .qemu_devices
            .iter()
            .map(|r| line_of(&self.text, r.start))
            .collect()
    }

    /// The 1-based line in the file of each of a server's `owns` claims, in the order of
    /// [`Server::claims`] (empty for a configuration not read from a file).
    pub fn claim_lines(&self, s: &Server) -> Vec<usize> {
        s.places
            .claims
            .iter()
            .map(|r| line_of(&self.text, r.start))
            .collect()
    }

    /// Checks each server's `qemu_devices` against the device types a trace names (`known`):
    /// a type the trace does not have is an error, with the nearest one it has.
    pub fn check_qemu_devices(
        &self,
        trace: &Path,
        known: &BTreeSet<String>,
    ) -> Result<(), ConfigError> {
        let src = Source {
            file: &self.path,
            text: &self.text,
        };
        for (i, s) in self.servers.iter().enumerate() {
            for (d, span) in s.qemu_devices.iter().zip(&s.places.qemu_devices) {
                if d == "*" || known.contains(d) {
                    continue;
                }
                let msg = format!(
                    "server[{i}] '{}': qemu_devices: the trace {} has no device '{d}'",
                    s.name,
                    trace.display()
                );
                let help = match nearest(d, known) {
                    Some(n) => format!("did you mean '{n}'?"),
                    None => format!("the trace's device types: {}", list(known)),
                };
                let d = src.at(span.clone(), msg, "not a device type of the trace");
                return Err(ConfigError::At(Box::new(d.with_help(help))));
            }
        }
        Ok(())
    }
}

/// The known name nearest to `name`, if it is near enough to be a misspelling of it.
fn nearest<'a>(name: &str, known: &'a BTreeSet<String>) -> Option<&'a str> {
    let most = (name.chars().count() / 3).max(1);
    known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(name, k), k))
        .filter(|(d, _)| *d <= most)
        .min()
        .map(|(_, k)| k.as_str())
}

fn list(names: &BTreeSet<String>) -> String {
    if names.is_empty() {
        return "none".into();
    }
    names
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Refuses an empty name and a name used twice, pointing at the first use.
fn check_names(src: &Source<'_>, servers: &[ServerConfig]) -> Result<(), ConfigError> {
    let mut seen: BTreeMap<&str, Range<usize>> = BTreeMap::new();
    for (i, s) in servers.iter().enumerate() {
        let (name, span) = (s.name.get_ref().as_str(), s.name.span());
        if name.is_empty() {
            let msg = format!("server[{i}]: the name is empty");
            return Err(src.error(span, msg, "logs, errors and reports need a name"));
        }
        if let Some(first) = seen.get(name) {
            let msg = format!("server[{i}]: the name '{name}' is taken: names must be unique");
            let first = Mark::new(
                first.clone(),
                format!("first used here, line {}", src.line(first)),
            );
            let d = src.at(span, msg, "used again here").with_context(first);
            return Err(ConfigError::At(Box::new(d)));
        }
        seen.insert(name, span);
    }
    Ok(())
}

/// Refuses `[[engine.ecam]]` windows that collide: in address, or in buses of one segment
/// (an MCFG table may not list either, PCI Firmware spec 3.0, 4.1.2), pointing at both.
fn check_windows(
    src: &Source<'_>,
    windows: &[(bdf_router::EcamWindow, Range<usize>)],
) -> Result<(), ConfigError> {
    let mut layout = bdf_router::McfgLayout::default();
    for (i, (w, span)) in windows.iter().enumerate() {
        let Err(other) = layout.insert(*w) else {
            continue;
        };
        let j = windows.iter().position(|(o, _)| *o == other).unwrap_or(i);
        let there = windows[j].1.clone();
        let first = Mark::new(
            there.clone(),
            format!("first claimed here, line {}: {other}", src.line(&there)),
        );
        let msg = format!("engine.ecam[{i}] overlaps engine.ecam[{j}]");
        let d = src.at(span.clone(), msg, &w.to_string());
        return Err(ConfigError::At(Box::new(d.with_context(first))));
    }
    Ok(())
}

/// Refuses a QEMU device type two trace servers stand for (or one server twice), and more
/// than one `"*"`: replay could not tell which server an access should reach.
fn check_qemu_device_lists(src: &Source<'_>, servers: &[Server]) -> Result<(), ConfigError> {
    let mut seen: BTreeMap<&str, (&str, Range<usize>)> = BTreeMap::new();
    for s in servers {
        for (d, span) in s.qemu_devices.iter().zip(&s.places.qemu_devices) {
            if let Some((owner, first)) = seen.get(d.as_str()) {
                let msg = if d == "*" {
                    format!(
                        "more than one server has qemu_devices = [\"*\"] ({owner} and {})",
                        s.name
                    )
                } else {
                    format!("QEMU device type '{d}' is listed by {owner} already")
                };
                let first = Mark::new(
                    first.clone(),
                    format!("first listed here, line {}, by {owner}", src.line(first)),
                );
                let d = src.at(span.clone(), msg, &format!("listed again by {}", s.name));
                return Err(ConfigError::At(Box::new(d.with_context(first))));
            }
            seen.insert(d, (&s.name, span.clone()));
        }
    }
    Ok(())
}

/// A claim a server makes when it starts, where the file asks for it.
struct Asked {
    server: usize,
    claim: Claim,
    span: Range<usize>,
}

/// Makes every claim the servers make when they start, in the order the engine makes them,
/// on a router like the engine's: a claim it refuses (taken by another server, listed
/// twice, over a configured ECAM window or the multiplexer's own ports) points at the claim
/// and at the one it collides with.
fn check_claims(
    src: &Source<'_>,
    servers: &[Server],
    windows: &[(bdf_router::EcamWindow, Range<usize>)],
    ports: &[(HostedPortSpec, Range<usize>)],
) -> Result<(), ConfigError> {
    let mut router = bdf_router::Router::new();
    let mux = router.add_server(ioreq_mux_engine::MUX_NAME);
    let _ = router.claim(mux, &Claim::Range(ioreq_mux_engine::config_ports()));
    for (w, _) in windows {
        let _ = router.replace_window(None, Some(*w));
    }
    ports::check_port_claims(src, &mut router, ports)?;
    let mut asked: Vec<Asked> = vec![];
    for (i, s) in servers.iter().enumerate() {
        let idx = router.add_server(&s.name);
        for (claim, span) in s.initial_claims() {
            if let Err(e) = router.claim(idx, &claim) {
                let this = Asked {
                    server: i,
                    claim,
                    span,
                };
                return Err(claim_refused(src, servers, &this, &asked, windows, &e));
            }
            asked.push(Asked {
                server: i,
                claim,
                span,
            });
        }
    }
    Ok(())
}

/// The error for a claim the router refused.
fn claim_refused(
    src: &Source<'_>,
    servers: &[Server],
    this: &Asked,
    asked: &[Asked],
    windows: &[(bdf_router::EcamWindow, Range<usize>)],
    e: &ioreq_server::ClaimError,
) -> ConfigError {
    let (name, claim) = (&servers[this.server].name, &this.claim);
    let who = format!("server[{}] '{name}'", this.server);
    let earlier = asked.iter().find(|a| a.claim.overlaps(claim));
    let window = windows.iter().find(|(w, _)| match claim {
        Claim::Range(r) => r.kind == RangeKind::Mmio && w.overlaps(r.start, r.end),
        Claim::Position(_) => false,
    });
    let d = match (e, earlier, window) {
        (ioreq_server::ClaimError::Conflict { .. }, Some(first), _) => {
            let owner = &servers[first.server].name;
            let (msg, label) = if first.server == this.server {
                (
                    format!("{who}: {claim} is claimed twice by {name}"),
                    "claimed again here".to_string(),
                )
            } else {
                (
                    format!("{who}: {claim} requested by {name} is already owned by {owner}"),
                    format!("requested here by {name}"),
                )
            };
            let line = src.line(&first.span);
            let mark = Mark::new(
                first.span.clone(),
                format!("first claimed here, line {line}, by {owner}"),
            );
            src.at(this.span.clone(), msg, &label).with_context(mark)
        }
        (ioreq_server::ClaimError::Invalid { why, .. }, _, Some((w, span))) => {
            let line = src.line(span);
            let mark = Mark::new(span.clone(), format!("the window, line {line}: {w}"));
            src.at(this.span.clone(), format!("{who}: {claim}: {why}"), "")
                .with_context(mark)
        }
        (ioreq_server::ClaimError::Conflict { owner, .. }, None, _) => {
            let msg = format!("{who}: {claim} requested by {name} is already owned by {owner}");
            let help = if owner == ioreq_mux_engine::PORTS_NAME {
                "a PCI Express port the multiplexer hosts ([[port]]) is there".to_string()
            } else {
                format!(
                    "{} is the multiplexer's own (configuration ports)",
                    ioreq_mux_engine::config_ports()
                )
            };
            src.at(this.span.clone(), msg, "").with_help(help)
        }
        _ => src.at(this.span.clone(), format!("{who}: {e}"), ""),
    };
    ConfigError::At(Box::new(d))
}

impl Server {
    /// The claims the server makes when it starts, in the order it makes them, with their
    /// places: an emulated server claims its functions, then its fixed ranges; a trace
    /// server what it owns; a process server makes its own (its `owns` is a grant).
    fn initial_claims(&self) -> Vec<(Claim, Range<usize>)> {
        let owns = self
            .claims
            .iter()
            .cloned()
            .zip(self.places.claims.iter().cloned());
        match self.kind {
            ServerKind::Process => vec![],
            ServerKind::Trace => owns.collect(),
            ServerKind::Emulated => self
                .functions
                .iter()
                .map(|(p, _)| p.claim())
                .zip(self.places.functions.iter().cloned())
                .chain(owns)
                .collect(),
        }
    }
}

/// Fields that apply to some kinds of server only.
const TRACE_ONLY: &[ServerKind] = &[ServerKind::Trace];
const PROCESS_ONLY: &[ServerKind] = &[ServerKind::Process];
const WITH_FUNCTIONS: &[ServerKind] = &[ServerKind::Emulated, ServerKind::Process];
const BY_ADDRESS: &[ServerKind] = &[ServerKind::Trace, ServerKind::Process];

/// The fields a server has that apply to some kinds only: name, place, kinds.
fn kind_fields(s: &ServerConfig) -> Vec<(&'static str, Range<usize>, &'static [ServerKind])> {
    fn span<T>(v: &Option<Spanned<T>>) -> Option<Range<usize>> {
        v.as_ref().map(Spanned::span)
    }
    [
        ("qemu_devices", span(&s.qemu_devices), TRACE_ONLY),
        ("ids", span(&s.ids), TRACE_ONLY),
        ("uid", span(&s.uid), PROCESS_ONLY),
        ("command", span(&s.command), PROCESS_ONLY),
        ("guest_memory", span(&s.guest_memory), PROCESS_ONLY),
        ("deadline", span(&s.deadline), PROCESS_ONLY),
        ("config_space", span(&s.config_space), PROCESS_ONLY),
        (
            "[server.function]",
            s.functions.keys().next().map(Spanned::span),
            WITH_FUNCTIONS,
        ),
        (
            "owns.bdf",
            s.owns.bdf.first().map(Spanned::span),
            BY_ADDRESS,
        ),
        (
            "owns.position",
            s.owns.position.first().map(Spanned::span),
            BY_ADDRESS,
        ),
    ]
    .into_iter()
    .filter_map(|(f, span, kinds)| Some((f, span?, kinds)))
    .collect()
}

/// Where a function's problem is: its class, the BAR, or (without a place) its header.
fn spec_span(e: &SpecError, places: Option<&FunctionPlaces>) -> Option<Range<usize>> {
    let places = places?;
    match e {
        SpecError::Class(_) => places.class.as_ref().map(Spanned::span),
        SpecError::Bar { bar, .. } | SpecError::TooManyBars { bar, .. } => {
            places.bars.get(*bar).map(Spanned::span)
        }
    }
}

impl Source<'_> {
    /// Checks one `[[server]]` and parses what it owns.
    fn server(
        &self,
        i: usize,
        s: &ServerConfig,
        places: Option<&ServerPlaces>,
    ) -> Result<Server, ConfigError> {
        let who = format!("server[{i}] '{}'", s.name.get_ref());
        self.check_kind_fields(&who, s)?;
        let (claims, claim_spans) = self.owns(&who, &s.owns)?;
        let (functions, function_spans) = self.functions(&who, s, places)?;
        let deadline = self.deadline(&who, s)?;
        self.check_config_space(&who, s)?;
        let ids = self.ids(&who, s)?;
        let devices = s.qemu_devices.as_ref().map(|d| d.get_ref().as_slice());
        let devices = devices.unwrap_or_default();
        Ok(Server {
            name: s.name.get_ref().clone(),
            kind: s.kind(),
            claims,
            functions,
            uid: s.uid.as_ref().map(|u| *u.get_ref()),
            command: s
                .command
                .as_ref()
                .map(|c| c.get_ref().clone())
                .unwrap_or_default(),
            guest_memory: s.guest_memory.as_ref().is_some_and(|g| *g.get_ref()),
            deadline,
            config_space: s.config_space.as_ref().map(|c| *c.get_ref()),
            qemu_devices: devices.iter().map(|d| d.get_ref().clone()).collect(),
            ids,
            places: Spans {
                claims: claim_spans,
                functions: function_spans,
                qemu_devices: devices.iter().map(Spanned::span).collect(),
            },
        })
    }

    /// Refuses a field the server's kind does not use (it would be ignored).
    fn check_kind_fields(&self, who: &str, s: &ServerConfig) -> Result<(), ConfigError> {
        let kind = s.kind();
        let Some((field, span, kinds)) = kind_fields(s)
            .into_iter()
            .find(|(_, _, kinds)| !kinds.contains(&kind))
        else {
            return Ok(());
        };
        let allowed: Vec<String> = kinds.iter().map(|k| format!("kind = \"{k}\"")).collect();
        let msg = format!(
            "{who}: {field} applies to {} servers only",
            allowed.join(" and ")
        );
        let d = self.at(span, msg, &format!("on a kind = \"{kind}\" server"));
        let d = match &s.kind {
            Some(k) => {
                let line = self.line(&k.span());
                d.with_context(Mark::new(k.span(), format!("the kind, line {line}")))
            }
            None => d.with_help("a server without `kind` is kind = \"emulated\""),
        };
        Err(ConfigError::At(Box::new(d)))
    }

    /// The claims `owns` lists, each with its place.
    fn owns(&self, who: &str, owns: &Owns) -> Result<Placed<Claim>, ConfigError> {
        let mut claims = vec![];
        let mut spans = vec![];
        let mut add = |field: &str,
                       list: &[Spanned<String>],
                       parse: &dyn Fn(&str) -> Result<Claim, String>| {
            for (j, v) in list.iter().enumerate() {
                let c = parse(v.get_ref())
                    .map_err(|m| self.error(v.span(), format!("{who}: {field}[{j}]: {m}"), ""))?;
                claims.push(c);
                spans.push(v.span());
            }
            Ok::<(), ConfigError>(())
        };
        add("owns.bdf", &owns.bdf, &|t| {
            parse_bdf_range(t).map(Claim::Range)
        })?;
        add("owns.position", &owns.position, &|t| {
            parse_position(t).map(Claim::Position)
        })?;
        add("owns.ports", &owns.ports, &|t| {
            parse_range(RangeKind::Port, t).map(Claim::Range)
        })?;
        add("owns.mmio", &owns.mmio, &|t| {
            parse_range(RangeKind::Mmio, t).map(Claim::Range)
        })?;
        Ok((claims, spans))
    }

    /// The built-in functions, each checked (class, BARs) and with the place of its header.
    fn functions(
        &self,
        who: &str,
        s: &ServerConfig,
        places: Option<&ServerPlaces>,
    ) -> Result<Placed<(Placement, FunctionSpec)>, ConfigError> {
        let mut functions = vec![];
        let mut spans = vec![];
        for (at, spec) in &s.functions {
            let field = format!("{who}: function \"{}\"", at.get_ref());
            let p = parse_placement(at.get_ref())
                .map_err(|m| self.error(at.span(), format!("{field}: {m}"), ""))?;
            spec.check().map_err(|e| {
                let fields = places.and_then(|p| p.function.get(at.get_ref()));
                let span = spec_span(&e, fields).unwrap_or_else(|| at.span());
                self.error(span, format!("{field}: {e}"), "")
            })?;
            functions.push((p, spec.clone()));
            spans.push(at.span());
        }
        Ok((functions, spans))
    }

    fn deadline(
        &self,
        who: &str,
        s: &ServerConfig,
    ) -> Result<Option<std::time::Duration>, ConfigError> {
        let Some(d) = &s.deadline else {
            return Ok(None);
        };
        parse_duration(d.get_ref())
            .map(Some)
            .map_err(|m| self.error(d.span(), format!("{who}: deadline: {m}"), ""))
    }

    fn check_config_space(&self, who: &str, s: &ServerConfig) -> Result<(), ConfigError> {
        match &s.config_space {
            Some(c) if ![0x100, 0x1000].contains(c.get_ref()) => Err(self.error(
                c.span(),
                format!(
                    "{who}: config_space: {} is neither 256 (conventional PCI) nor 4096 (PCI \
                     Express)",
                    c.get_ref()
                ),
                "",
            )),
            _ => Ok(()),
        }
    }

    fn ids(&self, who: &str, s: &ServerConfig) -> Result<Vec<(Sbdf, u32)>, ConfigError> {
        let Some(ids) = &s.ids else {
            return Ok(vec![]);
        };
        ids.get_ref()
            .iter()
            .map(|(at, v)| {
                let f: Sbdf = at.get_ref().parse().map_err(|e| {
                    self.error(
                        at.span(),
                        format!("{who}: ids.\"{}\": {e}", at.get_ref()),
                        "",
                    )
                })?;
                Ok((f, *v))
            })
            .collect()
    }
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:?})", self.name, self.kind)?;
        for c in &self.claims {
            write!(f, "\n  {c}")?;
        }
        Ok(())
    }
}

/// `90`, `90s`, `500ms`, `5m`, `1h`.
pub fn parse_duration(t: &str) -> Result<Duration, String> {
    let t = t.trim();
    let (num, unit) = t
        .find(|c: char| !c.is_ascii_digit())
        .map_or((t, ""), |i| t.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{t}' is not a duration (e.g. 90s, 500ms, 5m)"))?;
    Ok(match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        other => return Err(format!("unknown unit '{other}' in '{t}' (ms, s, m, h)")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("s").is_err());
    }

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("t.toml"), t)
    }

    /// The error `t` gives, as (line, column, message, underlined text, context labels).
    fn located(t: &str) -> (usize, usize, String, String, Vec<String>) {
        let e = parse(t).unwrap_err();
        let d = e.diagnostic().unwrap_or_else(|| panic!("no place: {e}"));
        let labels = d.context.iter().map(|m| m.label.clone()).collect();
        (
            d.line(),
            d.column(),
            d.message.clone(),
            d.marked_text().to_string(),
            labels,
        )
    }

    #[test]
    fn guest_memory_and_deadline_are_for_process_servers() {
        let (line, col, msg, text, _) = located("[[server]]\nname = \"a\"\nguest_memory = true\n");
        assert_eq!((line, col, text.as_str()), (3, 16, "true"));
        assert_eq!(
            msg,
            "server[0] 'a': guest_memory applies to kind = \"process\" servers only"
        );
        let e =
            parse("[[server]]\nname = \"a\"\nkind = \"process\"\ndeadline = \"5x\"\n").unwrap_err();
        assert!(e.to_string().contains("--> t.toml:4:12"), "{e}");
        assert!(e.to_string().starts_with("server[0] 'a': deadline"), "{e}");
        let c = parse("[[server]]\nname = \"q\"\nkind = \"process\"\nguest_memory = true\ndeadline = \"90s\"\n")
            .unwrap();
        assert!(c.servers[0].guest_memory);
        assert_eq!(
            c.servers[0].deadline,
            Some(std::time::Duration::from_secs(90))
        );
        let (line, _, msg, _, _) =
            located("[[server]]\nname = \"q\"\nkind = \"process\"\nconfig_space = 512\n");
        assert_eq!(line, 4);
        assert!(
            msg.starts_with("server[0] 'q': config_space: 512 is neither"),
            "{msg}"
        );
    }

    /// Before, `qemu_devices`, `ids`, `uid` and `command` on a server of another kind were
    /// accepted and ignored, as were `owns.bdf` and `owns.position` on an emulated server.
    #[test]
    fn fields_of_one_kind_of_server_only() {
        for (field, value, kinds) in [
            ("qemu_devices", "[\"nvme\"]", "kind = \"trace\""),
            ("ids", "{ \"00:00.0\" = 1 }", "kind = \"trace\""),
            ("uid", "1000", "kind = \"process\""),
            ("command", "[\"qemu\"]", "kind = \"process\""),
            (
                "owns.bdf",
                "[\"00:05.0\"]",
                "kind = \"trace\" and kind = \"process\"",
            ),
            (
                "owns.position",
                "[\"00:02.0/00.0\"]",
                "kind = \"trace\" and kind = \"process\"",
            ),
        ] {
            let t = format!("[[server]]\nname = \"v\"\nkind = \"emulated\"\n{field} = {value}\n");
            let (line, _, msg, _, labels) = located(&t);
            assert_eq!(line, 4, "{field}");
            assert_eq!(
                msg,
                format!("server[0] 'v': {field} applies to {kinds} servers only")
            );
            assert_eq!(labels, ["the kind, line 3"], "{field}");
        }
        let t = "[[server]]\nname = \"t\"\nkind = \"trace\"\n[server.function.\"00:05.0\"]\nvendor = 1\ndevice = 2\n";
        let (line, col, msg, text, _) = located(t);
        assert_eq!((line, col, text.as_str()), (4, 18, "\"00:05.0\""));
        assert!(
            msg.contains("[server.function] applies to kind = \"emulated\""),
            "{msg}"
        );
    }

    #[test]
    fn full_example_parses() {
        let c = parse(
            r#"
[engine.intercepts]
low_ram_top = 0x80000000

[[server]]
name = "qemu"
kind = "trace"
owns.bdf = ["00:00.0-00:1f.7"]
owns.position = ["00:02.2/00.0/01.0"]
owns.ports = ["0x60", "0x70-0x71"]
owns.mmio = ["0xfed00000+0x400"]

[[server]]
name = "vgpu"
[server.function."01:05.0"]
vendor = 0x1af4
device = 0x1337
class = 0xff0000
bars = [{ kind = "mem32", size = 4096 }]
"#,
        )
        .unwrap();
        assert_eq!(c.engine.intercepts.low_ram_top, Some(0x8000_0000));
        let q = &c.servers[0];
        assert_eq!(q.claims.len(), 5);
        assert_eq!(
            q.claims[0],
            Claim::Range(IoRange::new(RangeKind::Pci, 0, 0xff))
        );
        assert_eq!(
            q.claims[1],
            Claim::Position(Position {
                segment: 0,
                root_bus: 0,
                path: vec![0x12, 0x00, 0x08]
            })
        );
        assert_eq!(
            q.claims[4],
            Claim::Range(IoRange::new(RangeKind::Mmio, 0xfed0_0000, 0xfed0_03ff))
        );
        assert_eq!(c.servers[1].functions.len(), 1);
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let e = parse(
            "[[server]]\nname = \"a\"\nkind = \"trace\"\nowns.bdf = [\"00:00.0\",\n \"00:99.0\"]\n",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "server[0] 'a': owns.bdf[1]: device 0x99 is out of range (0 to 0x1f)\n \
             --> t.toml:5:2\n  |\n5 |  \"00:99.0\"]\n  |  ^^^^^^^^^"
        );
        let (line, col, msg, _, _) = located("[[server]]\nname = \"a\"\nownz = 1\n");
        assert_eq!((line, col), (3, 1));
        assert!(msg.starts_with("unknown field `ownz`"), "{msg}");
        let (line, _, msg, _, _) =
            located("[[server]]\nname = \"a\"\nowns.ports = [\"0x10000\"]\n");
        assert_eq!(line, 3);
        assert!(msg.contains("owns.ports[0]"), "{msg}");
        let (line, _, msg, _, _) =
            located("[[server]]\nname = \"a\"\nkind = \"trace\"\nowns.position = [\"00:02.0\"]\n");
        assert_eq!(line, 4);
        assert!(msg.contains("owns.bdf"), "{msg}");
    }

    /// Before, a name used twice said only "names must be unique", with no line.
    #[test]
    fn a_name_used_twice_points_at_both() {
        let (line, col, msg, text, labels) =
            located("[[server]]\nname = \"a\"\n\n[[server]]\nname = \"a\"\n");
        assert_eq!((line, col, text.as_str()), (5, 8, "\"a\""));
        assert!(msg.contains("'a' is taken: names must be unique"), "{msg}");
        assert_eq!(labels, ["first used here, line 2"]);
    }

    /// Before, the engine refused these when it started, with no place in the file; a BDF
    /// listed twice by one server said it was "already owned" by that server.
    #[test]
    fn claims_that_collide_point_at_the_first_claim() {
        let t = "[[server]]\nname = \"qemu\"\nkind = \"trace\"\nowns.bdf = [\"00:00.0-00:1f.7\"]\n\
                 [[server]]\nname = \"nvme\"\nkind = \"trace\"\nowns.bdf = [\"00:02.1\"]\n";
        let (line, col, msg, text, labels) = located(t);
        assert_eq!((line, col, text.as_str()), (8, 13, "\"00:02.1\""));
        assert_eq!(
            msg,
            "server[1] 'nvme': pci 0000:00:02.1 requested by nvme is already owned by qemu"
        );
        assert_eq!(labels, ["first claimed here, line 4, by qemu"]);
        let t = "[[server]]\nname = \"nvme\"\nkind = \"trace\"\nowns.position = [\"00:02.1/00.0\",\n  \"00:02.1/00.0\"]\n";
        let (line, col, msg, _, labels) = located(t);
        assert_eq!((line, col), (5, 3));
        assert_eq!(
            msg,
            "server[0] 'nvme': pci position 0000:00:02.1/00.0 is claimed twice by nvme"
        );
        assert_eq!(labels, ["first claimed here, line 4, by nvme"]);
        // An emulated function's BDF is a claim too, and ports overlap in part.
        let t = "[[server]]\nname = \"a\"\nowns.ports = [\"0x7700-0x770f\"]\n\
                 [server.function.\"00:05.0\"]\nvendor = 1\ndevice = 2\n\
                 [[server]]\nname = \"b\"\nkind = \"trace\"\nowns.ports = [\"0x7708+8\"]\n";
        let (line, _, msg, _, labels) = located(t);
        assert_eq!(line, 10);
        assert!(msg.ends_with("ports 0x7708-0x770f requested by b is already owned by a"));
        assert_eq!(labels, ["first claimed here, line 3, by a"]);
        let (line, _, msg, _, labels) = located(
            "[[server]]\nname = \"a\"\n[server.function.\"00:05.0\"]\nvendor = 1\ndevice = 2\n\
             [[server]]\nname = \"b\"\nkind = \"trace\"\nowns.bdf = [\"00:04.0-00:06.7\"]\n",
        );
        assert_eq!(line, 9);
        assert!(
            msg.contains("requested by b is already owned by a"),
            "{msg}"
        );
        assert_eq!(labels, ["first claimed here, line 3, by a"]);
    }

    #[test]
    fn claims_on_what_the_multiplexer_keeps_are_refused_in_place() {
        let (line, _, msg, _, _) =
            located("[[server]]\nname = \"a\"\nkind = \"trace\"\nowns.ports = [\"0xcf8\"]\n");
        assert_eq!(line, 4);
        assert!(msg.ends_with("already owned by ioreq-mux"), "{msg}");
        let (line, _, msg, _, labels) = located(
            "[[engine.ecam]]\nbase = 0xe0000000\nend_bus = 0x3f\n\
             [[server]]\nname = \"a\"\nkind = \"trace\"\nowns.mmio = [\"0xe0100000+0x1000\"]\n",
        );
        assert_eq!(line, 7);
        assert!(msg.contains("overlaps ECAM window"), "{msg}");
        assert_eq!(labels.len(), 1);
        assert!(labels[0].starts_with("the window, line 1: "), "{labels:?}");
    }

    /// Before, these were accepted: the model rounded the size up, dropped the seventh BAR
    /// and truncated the class.
    #[test]
    fn functions_are_checked_where_they_are_written() {
        let f = |fields: &str| {
            format!(
                "[[server]]\nname = \"v\"\n[server.function.\"00:05.0\"]\nvendor = 1\ndevice = 2\n{fields}\n"
            )
        };
        let bar = |size: &str| format!("{{ kind = \"mem32\", size = {size} }}");
        let (line, col, msg, text, _) = located(&f(&format!("bars = [{}]", bar("0x3000"))));
        assert_eq!((line, col), (6, 9));
        assert_eq!(text, "{ kind = \"mem32\", size = 0x3000 }");
        assert_eq!(
            msg,
            "server[0] 'v': function \"00:05.0\": BAR 0: size 0x3000 (12288) is not a power of two"
        );
        let (line, _, msg, _, _) = located(&f(&format!(
            "bars = [\n  {},\n  {}]",
            bar("4096"),
            bar("0")
        )));
        assert_eq!(line, 8);
        assert!(
            msg.ends_with("BAR 1: size 0: a BAR decodes a power of two of bytes, at least one")
        );
        let seven = vec![bar("4096"); 7].join(",\n ");
        let (line, _, msg, _, _) = located(&f(&format!("bars = [{seven}]")));
        assert_eq!(line, 12);
        assert!(
            msg.contains("BAR 6 does not fit: an endpoint (type 0 header) has 6 BAR registers"),
            "{msg}"
        );
        let mem64 = "{ kind = \"mem64\", size = 4096 }";
        let (_, _, msg, _, _) = located(&f(&format!(
            "bars = [{mem64}, {mem64}, {mem64}, {}]",
            bar("16")
        )));
        assert!(msg.contains("BAR 3 does not fit"), "{msg}");
        let (line, col, msg, text, _) = located(&f("class = 0x1000000"));
        assert_eq!((line, col, text.as_str()), (6, 9, "0x1000000"));
        assert!(msg.ends_with("class 0x1000000 does not fit 24 bits (base class, sub-class, programming interface: at most 0xffffff)"), "{msg}");
        let (line, _, msg, _, _) = located(&f(
            "bars = [{ kind = \"io\", size = 16, prefetchable = true }]",
        ));
        assert_eq!(line, 6);
        assert!(msg.ends_with("an I/O BAR cannot be prefetchable"), "{msg}");
        let (_, _, msg, _, _) = located(&f("bars = [{ kind = \"io\", size = 0x200 }]"));
        assert!(
            msg.ends_with("size 0x200 is more than an I/O BAR decodes (0x100)"),
            "{msg}"
        );
        parse(&f(&format!("bars = [{mem64}, {mem64}, {mem64}]"))).unwrap();
    }

    #[test]
    fn qemu_device_types_are_listed_once() {
        let t = "[[server]]\nname = \"a\"\nkind = \"trace\"\nqemu_devices = [\"*\"]\n\
                 [[server]]\nname = \"b\"\nkind = \"trace\"\nqemu_devices = [\"nvme\", \"*\"]\n";
        let (line, col, msg, _, labels) = located(t);
        assert_eq!((line, col), (8, 25));
        assert_eq!(
            msg,
            "more than one server has qemu_devices = [\"*\"] (a and b)"
        );
        assert_eq!(labels, ["first listed here, line 4, by a"]);
        let t = "[[server]]\nname = \"a\"\nkind = \"trace\"\nqemu_devices = [\"e1000\"]\n\
                 [[server]]\nname = \"b\"\nkind = \"trace\"\nqemu_devices = [\"e1000\"]\n";
        let (line, _, msg, _, _) = located(t);
        assert_eq!(line, 8);
        assert_eq!(msg, "QEMU device type 'e1000' is listed by a already");
    }

    #[test]
    fn qemu_device_types_are_checked_against_the_trace() {
        let c = parse(
            "[[server]]\nname = \"q\"\nkind = \"trace\"\nqemu_devices = [\"*\"]\n\
             [[server]]\nname = \"n\"\nkind = \"trace\"\nqemu_devices = [\"nvmme\"]\n",
        )
        .unwrap();
        let known: BTreeSet<String> = ["nvme", "e1000", "virtio-net-pci"].map(String::from).into();
        let e = c
            .check_qemu_devices(Path::new("x.trace.zst"), &known)
            .unwrap_err();
        let d = e.diagnostic().unwrap();
        assert_eq!((d.line(), d.column()), (8, 17));
        assert_eq!(
            d.message,
            "server[1] 'n': qemu_devices: the trace x.trace.zst has no device 'nvmme'"
        );
        assert_eq!(d.help.as_deref(), Some("did you mean 'nvme'?"));
        let known: BTreeSet<String> = ["e1000"].map(String::from).into();
        let e = c.check_qemu_devices(Path::new("x"), &known).unwrap_err();
        let help = e.diagnostic().and_then(|d| d.help.clone());
        assert_eq!(help.as_deref(), Some("the trace's device types: 'e1000'"));
        let known: BTreeSet<String> = ["nvmme"].map(String::from).into();
        c.check_qemu_devices(Path::new("x"), &known).unwrap();
    }

    #[test]
    fn overlapping_windows_are_refused_pointing_at_both() {
        let (line, col, msg, text, labels) = located(
            "[[engine.ecam]]\nsegment = 1\nbase = 0xe0000000\nend_bus = 0x3f\n\
             [[engine.ecam]]\nsegment = 2\nbase = 0xe2000000\nend_bus = 0x0f\n",
        );
        assert_eq!((line, col, text.as_str()), (5, 1, "[[engine.ecam]]"));
        assert_eq!(msg, "engine.ecam[1] overlaps engine.ecam[0]");
        assert_eq!(
            labels,
            [
                "first claimed here, line 1: segment 0001 buses 00-3f at 0xe0000000-0xe3ffffff (64 MiB)"
            ]
        );
        // Same segment, same buses, different addresses: an MCFG cannot list both either.
        let (line, _, msg, _, _) = located(
            "[[engine.ecam]]\nbase = 0xe0000000\nend_bus = 0x3f\n\
             [[engine.ecam]]\nbase = 0xf0000000\nstart_bus = 0x3f\nend_bus = 0x40\n",
        );
        assert_eq!(line, 4);
        assert!(msg.contains("overlaps engine.ecam[0]"), "{msg}");
        let c = parse(
            "[[engine.ecam]]\nbase = 0xe0000000\nend_bus = 0x3f\n\
             [[engine.ecam]]\nsegment = 1\nbase = 0xe4000000\nend_bus = 0x3f\n",
        )
        .unwrap();
        assert_eq!(c.engine.ecam.len(), 2);
    }

    /// Before, a trace given as the topology said "stream did not contain valid UTF-8".
    #[test]
    fn a_file_of_another_kind_is_not_a_topology() {
        let f = Path::new("x.zst");
        let e = topology_text(f, vec![0x28, 0xb5, 0x2f, 0xfd, 0, 0]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("x.zst is not a topology: it is zstd-compressed"),
            "{e}"
        );
        let e = topology_text(f, vec![0x5f, 0x2a, 0x4d, 0x18, 0x20, 0, 0, 0]).unwrap_err();
        assert!(e.to_string().contains("zstd-compressed"), "{e}");
        let e = topology_text(f, b"ab\xffcd".to_vec()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "x.zst is not a topology: it is not text (byte 2 is not UTF-8); a topology is a \
             TOML text file"
        );
        assert_eq!(
            topology_text(f, b"[[server]]".to_vec()).unwrap(),
            "[[server]]"
        );
    }

    #[test]
    fn function_pcie_and_aer_defaults() {
        let c = parse(
            "[[server]]\nname = \"a\"\n\
             [server.function.\"00:05.0\"]\nvendor = 1\ndevice = 2\n\
             [server.function.\"00:06.0\"]\nvendor = 1\ndevice = 2\npcie = true\n\
             [server.function.\"00:07.0\"]\nvendor = 1\ndevice = 2\npcie = true\naer = false\n",
        )
        .unwrap();
        let f: Vec<ioreq_mux_models::PciFunction> = c.servers[0]
            .functions
            .iter()
            .map(|(_, spec)| ioreq_mux_models::PciFunction::new(spec))
            .collect();
        assert_eq!(f[0].config_size(), 0x100, "conventional unless pcie = true");
        assert_eq!(f[1].config_size(), 0x1000);
        assert_eq!(f[1].aer_offset(), Some(ioreq_mux_models::AER_OFFSET));
        assert_eq!(f[2].aer_offset(), None);
    }

    #[test]
    fn ranges() {
        assert_eq!(
            parse_range(RangeKind::Port, "0x600+0x80").unwrap(),
            IoRange::ports(0x600, 0x67f)
        );
        assert!(parse_range(RangeKind::Port, "0x10-0x5").is_err());
        assert!(parse_range(RangeKind::Mmio, "0x10+0").is_err());
        assert!(parse_range(RangeKind::Mmio, "zz").is_err());
        assert!(parse_bdf_range("00:02.0-00:01.0").is_err());
        assert!(parse_position("00:02.0/00").is_err());
        assert!(parse_position("00:02.0/20.0").is_err());
    }
}
