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
//! owns.bdf = ["00:00.0-00:1f.7"]    # a function or an inclusive range (map_pcidev)
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

use crate::engine::EngineConfig;
use crate::models::{EmulatedModel, FunctionSpec, Placement};
use bdf_router::Sbdf;
use ioreq_server::{Claim, IoRange, Position, RangeKind};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
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
    #[error("{file}: {msg}")]
    Syntax { file: PathBuf, msg: String },
    #[error("{file}:{line}: {field}: {msg}")]
    Field {
        file: PathBuf,
        line: usize,
        field: String,
        msg: String,
    },
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

/// What a server owns, as written in the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Owns {
    pub bdf: Vec<Spanned<String>>,
    pub position: Vec<Spanned<String>>,
    pub ports: Vec<Spanned<String>>,
    pub mmio: Vec<Spanned<String>>,
}

/// One `[[server]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub name: String,
    #[serde(default)]
    pub kind: ServerKind,
    #[serde(default)]
    pub owns: Owns,
    /// Built-in functions by placement (a BDF or a position).
    #[serde(default, rename = "function")]
    pub functions: BTreeMap<String, FunctionSpec>,
    /// The Unix user a process server must run as (out-of-process servers).
    #[serde(default)]
    pub uid: Option<u32>,
    /// Command line that starts a process server (optional).
    #[serde(default)]
    pub command: Vec<String>,
    /// A process server that maps guest memory itself (QEMU does, through Xen's foreign
    /// mappings): rep accesses through a guest buffer (`data_is_ptr`) reach it unchanged.
    #[serde(default)]
    pub guest_memory: bool,
    /// A process server's deadline per request (`500ms`, `30s`; default 1 s): past it the
    /// request completes as a master abort and the server is dropped. QEMU copies whole
    /// files in one request (fw_cfg DMA) and wants minutes.
    #[serde(default)]
    pub deadline: Option<Spanned<String>>,
    /// A process server's functions have this many bytes of configuration space: 256 or
    /// 4096 (default). Past it the multiplexer answers all ones itself: QEMU 7.2 in Xen mode
    /// knows only conventional PCI's 256 bytes and must not be asked for more.
    #[serde(default)]
    pub config_space: Option<Spanned<u16>>,
    /// Replay (`kind = "trace"`): the QEMU device types (as QEMU's trace names them, e.g.
    /// "nvme") this server stands for; `"*"` = every device no other server lists. Replay checks
    /// each access reached the server standing for the device QEMU routed it to.
    #[serde(default)]
    pub qemu_devices: Vec<String>,
    /// Replay: configuration dwords (at register 0) a trace server answers when asked outside
    /// the trace, e.g. by chipset detection: `{ "00:00.0" = 0x29c08086 }`.
    #[serde(default)]
    pub ids: BTreeMap<String, u32>,
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub engine: EngineConfig,
    #[serde(default, rename = "server")]
    pub servers: Vec<ServerConfig>,
}

/// A configuration with every claim parsed.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub engine: EngineConfig,
    pub servers: Vec<Server>,
}

/// A server with its claims parsed.
#[derive(Debug, Clone)]
pub struct Server {
    pub name: String,
    pub kind: ServerKind,
    pub claims: Vec<Claim>,
    pub functions: Vec<(Placement, FunctionSpec)>,
    pub uid: Option<u32>,
    pub command: Vec<String>,
    /// See [`ServerConfig::guest_memory`].
    pub guest_memory: bool,
    /// See [`ServerConfig::deadline`].
    pub deadline: Option<std::time::Duration>,
    /// See [`ServerConfig::config_space`].
    pub config_space: Option<u16>,
    pub qemu_devices: Vec<String>,
    /// (function, dword 0) pairs.
    pub ids: Vec<(Sbdf, u32)>,
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

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl Config {
    /// Reads and checks a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            file: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses text that came from `path` (used in messages).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: ConfigFile = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            let msg = e.message().to_string();
            match line {
                Some(line) => ConfigError::Field {
                    file: path.to_path_buf(),
                    line,
                    field: "syntax".into(),
                    msg,
                },
                None => ConfigError::Syntax {
                    file: path.to_path_buf(),
                    msg,
                },
            }
        })?;
        let field_err = |s: &Spanned<String>, field: String, msg: String| ConfigError::Field {
            file: path.to_path_buf(),
            line: line_of(text, s.span().start),
            field,
            msg,
        };
        let mut servers = vec![];
        let mut names = vec![];
        for (i, s) in raw.servers.iter().enumerate() {
            let who = format!("server[{i}] '{}'", s.name);
            if s.name.is_empty() || names.contains(&s.name) {
                return Err(ConfigError::Syntax {
                    file: path.to_path_buf(),
                    msg: format!("{who}: names must be unique and not empty"),
                });
            }
            names.push(s.name.clone());
            let mut claims = vec![];
            for (j, b) in s.owns.bdf.iter().enumerate() {
                let r = parse_bdf_range(b.get_ref())
                    .map_err(|m| field_err(b, format!("{who}: owns.bdf[{j}]"), m))?;
                claims.push(Claim::Range(r));
            }
            for (j, p) in s.owns.position.iter().enumerate() {
                let pos = parse_position(p.get_ref())
                    .map_err(|m| field_err(p, format!("{who}: owns.position[{j}]"), m))?;
                claims.push(Claim::Position(pos));
            }
            for (field, kind, list) in [
                ("ports", RangeKind::Port, &s.owns.ports),
                ("mmio", RangeKind::Mmio, &s.owns.mmio),
            ] {
                for (j, v) in list.iter().enumerate() {
                    let r = parse_range(kind, v.get_ref())
                        .map_err(|m| field_err(v, format!("{who}: owns.{field}[{j}]"), m))?;
                    claims.push(Claim::Range(r));
                }
            }
            let mut functions = vec![];
            for (at, spec) in &s.functions {
                let p = parse_placement(at).map_err(|m| ConfigError::Syntax {
                    file: path.to_path_buf(),
                    msg: format!("{who}: function \"{at}\": {m}"),
                })?;
                functions.push((p, spec.clone()));
            }
            if s.kind == ServerKind::Trace && !functions.is_empty() {
                return Err(ConfigError::Syntax {
                    file: path.to_path_buf(),
                    msg: format!("{who}: a trace server has no built-in functions"),
                });
            }
            let deadline = match &s.deadline {
                Some(d) => Some(
                    crate::serve::parse_duration(d.get_ref())
                        .map_err(|m| field_err(d, format!("{who}: deadline"), m))?,
                ),
                None => None,
            };
            if s.kind != ServerKind::Process
                && (s.guest_memory || deadline.is_some() || s.config_space.is_some())
            {
                return Err(ConfigError::Syntax {
                    file: path.to_path_buf(),
                    msg: format!(
                        "{who}: guest_memory, deadline and config_space apply to kind = \"process\" servers only"
                    ),
                });
            }
            if let Some(c) = &s.config_space {
                if ![0x100, 0x1000].contains(c.get_ref()) {
                    return Err(ConfigError::Field {
                        file: path.to_path_buf(),
                        line: line_of(text, c.span().start),
                        field: format!("{who}: config_space"),
                        msg: format!(
                            "{} is neither 256 (conventional PCI) nor 4096 (PCI Express)",
                            c.get_ref()
                        ),
                    });
                }
            }
            let mut ids = vec![];
            for (at, v) in &s.ids {
                let f: Sbdf = at.parse().map_err(|e| ConfigError::Syntax {
                    file: path.to_path_buf(),
                    msg: format!("{who}: ids.\"{at}\": {e}"),
                })?;
                ids.push((f, *v));
            }
            servers.push(Server {
                name: s.name.clone(),
                kind: s.kind,
                claims,
                functions,
                uid: s.uid,
                command: s.command.clone(),
                guest_memory: s.guest_memory,
                deadline,
                config_space: s.config_space.as_ref().map(|c| *c.get_ref()),
                qemu_devices: s.qemu_devices.clone(),
                ids,
            });
        }
        check_windows(path, &raw.engine.ecam)?;
        Ok(Config {
            path: path.to_path_buf(),
            engine: raw.engine,
            servers,
        })
    }
}

/// Refuses `[[engine.ecam]]` windows that collide: in address, or in buses of one segment
/// (an MCFG table may not list either, PCI Firmware spec 3.0, 4.1.2), naming both.
fn check_windows(path: &Path, windows: &[bdf_router::EcamWindow]) -> Result<(), ConfigError> {
    let mut layout = bdf_router::McfgLayout::default();
    for (i, w) in windows.iter().enumerate() {
        if let Err(other) = layout.insert(*w) {
            let j = windows.iter().position(|o| *o == other).unwrap_or(i);
            return Err(ConfigError::Syntax {
                file: path.to_path_buf(),
                msg: format!("engine.ecam[{i}] ({w}) overlaps engine.ecam[{j}] ({other})"),
            });
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("t.toml"), t)
    }

    #[test]
    fn guest_memory_and_deadline_are_for_process_servers() {
        let e = parse("[[server]]\nname = \"a\"\nguest_memory = true\n").unwrap_err();
        assert!(e.to_string().contains("apply to kind = \"process\""), "{e}");
        let e =
            parse("[[server]]\nname = \"a\"\nkind = \"process\"\ndeadline = \"5x\"\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("t.toml:4: server[0] 'a': deadline"),
            "{e}"
        );
        let c = parse("[[server]]\nname = \"q\"\nkind = \"process\"\nguest_memory = true\ndeadline = \"90s\"\n")
            .unwrap();
        assert!(c.servers[0].guest_memory);
        assert_eq!(
            c.servers[0].deadline,
            Some(std::time::Duration::from_secs(90))
        );
        let e = parse("[[server]]\nname = \"q\"\nkind = \"process\"\nconfig_space = 512\n")
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("t.toml:4: server[0] 'q': config_space: 512 is neither"),
            "{e}"
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
[server.function."00:05.0"]
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
        let e = parse("[[server]]\nname = \"a\"\nowns.bdf = [\"00:00.0\",\n \"00:99.0\"]\n")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.toml:4: server[0] 'a': owns.bdf[1]: device 0x99 is out of range (0 to 0x1f)"
        );
        let e = parse("[[server]]\nname = \"a\"\nownz = 1\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("t.toml:3: syntax: unknown field `ownz`"),
            "{e}"
        );
        let e = parse("[[server]]\nname = \"a\"\nowns.ports = [\"0x10000\"]\n").unwrap_err();
        assert!(e.to_string().contains("owns.ports[0]"), "{e}");
        let e = parse("[[server]]\nname = \"a\"\n[[server]]\nname = \"a\"\n").unwrap_err();
        assert!(e.to_string().contains("unique"), "{e}");
        let e = parse("[[server]]\nname = \"a\"\nowns.position = [\"00:02.0\"]\n").unwrap_err();
        assert!(e.to_string().contains("owns.bdf"), "{e}");
    }

    #[test]
    fn overlapping_windows_are_refused_naming_both() {
        let e = parse(
            "[[engine.ecam]]\nsegment = 1\nbase = 0xe0000000\nend_bus = 0x3f\n\
             [[engine.ecam]]\nsegment = 2\nbase = 0xe2000000\nend_bus = 0x0f\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("t.toml: engine.ecam[1] (segment 0002")
                && e.contains("engine.ecam[0] (segment 0001"),
            "{e}"
        );
        // Same segment, same buses, different addresses: an MCFG cannot list both either.
        let e = parse(
            "[[engine.ecam]]\nbase = 0xe0000000\nend_bus = 0x3f\n\
             [[engine.ecam]]\nbase = 0xf0000000\nstart_bus = 0x3f\nend_bus = 0x40\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("overlaps engine.ecam[0]"), "{e}");
        let c = parse(
            "[[engine.ecam]]\nbase = 0xe0000000\nend_bus = 0x3f\n\
             [[engine.ecam]]\nsegment = 1\nbase = 0xe4000000\nend_bus = 0x3f\n",
        )
        .unwrap();
        assert_eq!(c.engine.ecam.len(), 2);
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
        let f: Vec<crate::models::PciFunction> = c.servers[0]
            .functions
            .iter()
            .map(|(_, spec)| crate::models::PciFunction::new(spec))
            .collect();
        assert_eq!(f[0].config_size(), 0x100, "conventional unless pcie = true");
        assert_eq!(f[1].config_size(), 0x1000);
        assert_eq!(f[1].aer_offset(), Some(crate::models::AER_OFFSET));
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
