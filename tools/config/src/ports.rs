//! `[[port]]`: PCI Express ports the multiplexer hosts (the engine's `ports` module), for
//! functions that device models serve below them.
//!
//! ```toml
//! [[port]]
//! name = "slot7"                     # for logs and inspect
//! at = "00:07.0"                     # a function on the root bus, or a position
//! kind = "root-port"                 # root-port | upstream-port | downstream-port
//! vendor = 0x1b36
//! device = 0x000c
//! link = { speed = "8GT/s", width = "x8" }
//! slot = { number = 7 }              # a hot-plug slot (attention button, indicators)
//! ```
//!
//! Everything but `name` and `at` is the port's [`PortConfig`], checked as the port would be
//! built ([`PortConfig::check`]); an error points at the entry.

use crate::diagnostic::Mark;
use crate::{ConfigError, Source, parse_position};
use bdf_router::Router;
use bdf_router::Sbdf;
use ioreq_mux_engine::HostedPortSpec;
use ioreq_mux_engine::PORTS_NAME;
use ioreq_mux_models::port::PortConfig;
use ioreq_server::Position;
use std::collections::BTreeMap;
use std::ops::Range;
use toml::Spanned;

/// Where a port is: `BB:DD.F` (a function on the root bus) or a position through bridges.
pub fn parse_port_place(t: &str) -> Result<Position, String> {
    if t.contains('/') {
        return parse_position(t);
    }
    let s: Sbdf = t.trim().parse().map_err(|e| format!("{e}"))?;
    Ok(Position {
        segment: s.segment,
        root_bus: s.bus,
        path: vec![s.devfn()],
    })
}

/// The `[[port]]` entries as the engine takes them, each with its place in the file.
pub(crate) fn parse_ports(
    src: &Source<'_>,
    entries: &[Spanned<toml::Table>],
) -> Result<Vec<(HostedPortSpec, Range<usize>)>, ConfigError> {
    let mut names: BTreeMap<String, Range<usize>> = BTreeMap::new();
    let mut out = vec![];
    for (i, entry) in entries.iter().enumerate() {
        let span = crate::first_line(src.text, entry.span());
        let spec = parse_port(i, entry.get_ref().clone())
            .map_err(|msg| src.error(span.clone(), msg, "in this [[port]]"))?;
        if let Some(first) = names.get(&spec.name) {
            let msg = format!("port[{i}]: the name '{}' is taken", spec.name);
            let line = src.line(first);
            let first = Mark::new(first.clone(), format!("first used here, line {line}"));
            let d = src.at(span, msg, "used again here").with_context(first);
            return Err(ConfigError::At(Box::new(d)));
        }
        names.insert(spec.name.clone(), span.clone());
        out.push((spec, span));
    }
    Ok(out)
}

fn parse_port(i: usize, mut t: toml::Table) -> Result<HostedPortSpec, String> {
    let mut text = |key: &str| match t.remove(key) {
        Some(toml::Value::String(s)) if !s.is_empty() => Ok(s),
        Some(other) => Err(format!("port[{i}]: `{key}` must be a string, not {other}")),
        None => Err(format!("port[{i}]: `{key}` is missing")),
    };
    let name = text("name")?;
    let at = text("at")?;
    let at =
        parse_port_place(&at).map_err(|e| format!("port[{i}] '{name}': at = \"{at}\": {e}"))?;
    let config: PortConfig = toml::Value::Table(t)
        .try_into()
        .map_err(|e| format!("port[{i}] '{name}': {}", e.message()))?;
    config
        .check()
        .map_err(|e| format!("port[{i}] '{name}': {e}"))?;
    Ok(HostedPortSpec { name, at, config })
}

/// The ports' claims, made first as the engine makes them: a port over another port (or
/// over the multiplexer's own ports) points at the entry.
pub(crate) fn check_port_claims(
    src: &Source<'_>,
    router: &mut Router,
    ports: &[(HostedPortSpec, Range<usize>)],
) -> Result<(), ConfigError> {
    if ports.is_empty() {
        return Ok(());
    }
    let idx = router.add_server(PORTS_NAME);
    for (i, (p, span)) in ports.iter().enumerate() {
        if let Err(e) = router.claim(idx, &p.claim()) {
            let msg = format!("port[{i}] '{}': {e}", p.name);
            return Err(src.error(span.clone(), msg, "this port"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
    use crate::{Config, ConfigError};
    use ioreq_mux_models::port::{LinkSpeed, LinkWidth, PortKind};
    use std::path::Path;

    const PORT: &str = r#"
[[port]]
name = "slot7"
at = "00:07.0"
kind = "root-port"
vendor = 0x1b36
device = 0x000c
link = { speed = "8GT/s", width = "x8" }
slot = { number = 7 }
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("ports.toml"), text)
    }

    #[test]
    fn a_port_reaches_the_engine_as_configured() {
        let c = parse(PORT).unwrap();
        let [p] = c.engine.ports.as_slice() else {
            panic!("{:?}", c.engine.ports)
        };
        assert_eq!(p.name, "slot7");
        assert_eq!(p.at.path, vec![7 << 3]);
        assert_eq!(p.config.kind, PortKind::RootPort);
        assert_eq!(p.config.link.speed, LinkSpeed::Gt8);
        assert_eq!(p.config.link.width, LinkWidth::X8);
        assert_eq!(p.config.slot.map(|s| s.number), Some(7));
    }

    /// Each mistake points at the entry, with what is wrong.
    #[test]
    fn bad_ports_are_errors_at_their_line() {
        let cases = [
            (PORT.replace("at = \"00:07.0\"\n", ""), "`at` is missing", 2),
            (PORT.replace("00:07.0", "00:20.0"), "at = \"00:20.0\"", 2),
            (PORT.replace("x8", "x3"), "port[0] 'slot7'", 2),
            (PORT.replace("vendor", "vendr"), "vendr", 2),
            (format!("{PORT}{PORT}"), "the name 'slot7' is taken", 11),
        ];
        for (text, want, line) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "want {want:?} in:\n{e}");
            let at = format!("ports.toml:{line}:");
            assert!(e.contains(&at), "no {at} in:\n{e}");
        }
    }

    /// A server that claims the port's own function is refused, naming the port.
    #[test]
    fn a_server_over_a_port_is_refused() {
        let text = format!(
            "{PORT}\n[[server]]\nname = \"q\"\nkind = \"trace\"\nowns.bdf = [\"00:07.0\"]\n"
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("already owned by ioreq-mux ports"), "{e}");
        assert!(e.contains("[[port]]"), "{e}");
    }
}
