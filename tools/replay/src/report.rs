//! What `replay` reports: [`ReplayReport`], its text (`Display`) and its JSON (schema
//! [`SCHEMA`], docs/trace-format.md). Divergences carry their cause, so the text groups them
//! ("402 divergences, 1 cause: ...") and the JSON lists each cause with its count.

use chipset_intercept::LayoutEvent;
use ioreq_mux_engine::EngineStats;
use ioreq_mux_trace::Thousands;
use ioreq_mux_trace::{ConfigPath, Sbdf, Space};
use ioreq_server::Dir;
use ioreq_server::sim::{SimStats, Violation};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// The `schema` value of `replay --json`. Bumped when a key changes meaning or goes away.
/// /2: `invariant_violations` are objects (kind, fields, message), no longer strings.
pub const SCHEMA: &str = "ioreq-mux.replay/2";

/// What kind of difference from the recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CauseKind {
    /// The access reached another server than the one standing for QEMU's device.
    Misrouted,
    /// A read returned another value than the recorded one.
    WrongValue,
    /// The right server got the configuration access, for another function or register.
    WrongFunction,
    /// A register the multiplexer intercepts reached a device model.
    InterceptReachedModel,
    /// The ioreq was never completed.
    NotCompleted,
    /// A server in its own process received an access its record did not expect.
    OutOfProcess,
    /// The simulated hypervisor's checks failed (an ioreq completed twice, or never).
    Invariant,
}

/// A place in the topology file: an `owns` entry that routed an access, or the
/// `qemu_devices` entry that made a server stand for QEMU's device.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ConfigPlace {
    /// The key: `owns.bdf`, `owns.position`, `owns.ports`, `owns.mmio` or `qemu_devices`.
    pub key: &'static str,
    /// 1-based line in the topology file.
    pub line: usize,
}

/// Why an access diverged: divergences with the same cause are counted together.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Cause {
    pub kind: CauseKind,
    /// What was accessed: `config of 05:00.0`, `mmio region 'e1000-mmio'`, `port 0x61`.
    pub target: String,
    /// The server that answered (`ioreq-mux` = the multiplexer itself).
    pub answered_by: Option<String>,
    /// The server that stands for the device QEMU routed the access to.
    pub expected: Option<String>,
    /// The topology line responsible: the `owns` entry of `answered_by` that routed the
    /// access there; when none did (nobody answered, or a BAR the server claimed), the
    /// `qemu_devices` entry that made `expected` stand for QEMU's device.
    pub config: Option<ConfigPlace>,
    /// When `config` is an `owns` entry: the `qemu_devices` entry that made `expected` stand
    /// for QEMU's device (the other side of the disagreement).
    pub expected_by: Option<ConfigPlace>,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let by = self.answered_by.as_deref().unwrap_or("nobody");
        let want = self.expected.as_deref().unwrap_or("nobody");
        let t = &self.target;
        match self.kind {
            CauseKind::Misrouted => write!(f, "{t} answered by {by}, expected {want}")?,
            CauseKind::WrongValue => write!(f, "{t}: {by} returned another value than recorded")?,
            CauseKind::WrongFunction => {
                write!(f, "{t} reached {by} as another function or register")?
            }
            CauseKind::InterceptReachedModel => {
                write!(f, "{t}: intercepted register reached {by}")?
            }
            CauseKind::NotCompleted => write!(f, "{t}: the ioreq was never completed")?,
            CauseKind::Invariant => write!(f, "{t}: invariant violated")?,
            CauseKind::OutOfProcess => write!(
                f,
                "{by} (own process) received accesses its record did not expect"
            )?,
        }
        if let Some(p) = &self.config {
            write!(f, " ({}, line {})", p.key, p.line)?;
        }
        if let Some(p) = &self.expected_by {
            write!(f, "; {want} expected by {}, line {}", p.key, p.line)?;
        }
        Ok(())
    }
}

/// How often one cause occurred.
#[derive(Debug, Clone, Serialize)]
pub struct CauseCount {
    pub cause: Cause,
    pub count: u64,
    /// The first access (1-based) with this cause; 0 when not known (out-of-process servers).
    pub first_access: u64,
}

/// The recorded access a divergence is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordedAccess {
    pub vcpu: u16,
    pub space: Space,
    pub dir: Dir,
    pub addr: u64,
    pub size: u8,
    pub value: u64,
    /// QEMU's memory region that answered.
    pub region: Option<String>,
    pub config: Option<RecordedConfig>,
}

/// The configuration access part of a [`RecordedAccess`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordedConfig {
    pub path: ConfigPath,
    /// Printed (and in the JSON) in the short form, `05:00.0` ([`Sbdf::short`]).
    #[serde(serialize_with = "short")]
    pub bdf: Sbdf,
    pub reg: u16,
    /// QEMU's device that answered.
    pub device: Option<String>,
}

fn short<S: serde::Serializer>(v: &Sbdf, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&v.short())
}

impl fmt::Display for RecordedAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "vcpu {} {} {} {:#x} size {} value {:#x} region '{}'",
            self.vcpu,
            self.space,
            self.dir,
            self.addr,
            self.size,
            self.value,
            self.region.as_deref().unwrap_or("-")
        )?;
        if let Some(c) = &self.config {
            let dev = c.device.as_deref().unwrap_or("none");
            write!(
                f,
                " [config {} {} @{:#x} -> {dev}]",
                c.path,
                c.bdf.short(),
                c.reg
            )?;
        }
        Ok(())
    }
}

/// One way the replay differed from the recording.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Divergence {
    /// Index (1-based) of the access among all accesses; 0 when not known.
    pub access: u64,
    pub cause: Cause,
    /// What happened, in full.
    pub what: String,
    pub recorded: Option<RecordedAccess>,
}

/// A broken rule of the ioreq protocol the simulated hypervisor saw: in the JSON its `kind`
/// and facts (as [`Violation`] names them) and `message`, the sentence the text report prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InvariantViolation {
    #[serde(flatten)]
    pub violation: Violation,
    pub message: String,
}

impl From<Violation> for InvariantViolation {
    fn from(violation: Violation) -> Self {
        InvariantViolation {
            message: violation.to_string(),
            violation,
        }
    }
}

/// A BAR claim the multiplexer refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimFailure {
    /// The server that asked.
    pub server: String,
    /// QEMU's device whose BAR it is.
    pub device: String,
    pub range: String,
    /// `map` or `unmap`.
    pub op: String,
    pub error: String,
    /// The BAR sat at the top of its address space: the guest sized it (wrote all ones) with
    /// decoding on, as iPXE does, and QEMU mapped it there for a moment. Harmless: no access
    /// goes there, and the real placement that follows is claimed.
    pub sizing: bool,
}

impl ClaimFailure {
    /// Whether a BAR ending at `last` in `space` is where a BAR being sized sits.
    pub fn is_sizing(space: Space, last: u64) -> bool {
        match space {
            Space::Port => last == 0xffff,
            Space::Mmio => last == u64::from(u32::MAX) || last == u64::MAX,
        }
    }
}

/// A change of the chipset's layout.
#[derive(Debug, Clone, Serialize)]
pub struct LayoutChange {
    /// `ecam`, `pm_block`, `mmio_hole` or `refused`.
    pub kind: &'static str,
    pub description: String,
}

impl From<&LayoutEvent> for LayoutChange {
    fn from(e: &LayoutEvent) -> Self {
        let kind = match e {
            LayoutEvent::Ecam { .. } => "ecam",
            LayoutEvent::PmBlock { .. } => "pm_block",
            LayoutEvent::MmioHole { .. } => "mmio_hole",
            LayoutEvent::Refused { .. } => "refused",
        };
        LayoutChange {
            kind,
            description: e.to_string(),
        }
    }
}

/// The outcome.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    /// [`SCHEMA`].
    pub schema: &'static str,
    pub trace: String,
    pub topology: String,
    /// Guest accesses replayed (repeats counted one by one).
    pub accesses: u64,
    /// Trace records read.
    pub records: u64,
    pub divergences: u64,
    /// Every cause, most frequent first.
    pub divergence_causes: Vec<CauseCount>,
    pub first_divergences: Vec<Divergence>,
    /// Accesses each server answered (`ioreq-mux` = the multiplexer itself: CF8, intercepted
    /// registers, master aborts).
    pub per_server: BTreeMap<String, u64>,
    /// Accesses by kind and configuration path.
    pub by_kind: BTreeMap<String, u64>,
    pub layout_events: Vec<LayoutChange>,
    /// BAR claims that could not be made (a range someone already had).
    pub claim_failures: Vec<ClaimFailure>,
    pub chipset: String,
    pub engine: EngineStats,
    pub sim: SimStats,
    pub invariant_violations: Vec<InvariantViolation>,
    pub elapsed_s: f64,
    /// Divergences per cause while replaying (then [`Self::divergence_causes`]).
    #[serde(skip)]
    tally: BTreeMap<Cause, (u64, u64)>,
    /// Divergences shown in full.
    #[serde(skip)]
    show: usize,
}

/// Claim failures kept in the report (the count of the rest is lost).
const MAX_CLAIM_FAILURES: usize = 50;

impl ReplayReport {
    /// An empty report.
    pub fn new(trace: String, topology: String, chipset: String, show: usize) -> Self {
        ReplayReport {
            schema: SCHEMA,
            trace,
            topology,
            accesses: 0,
            records: 0,
            divergences: 0,
            divergence_causes: vec![],
            first_divergences: vec![],
            per_server: BTreeMap::new(),
            by_kind: BTreeMap::new(),
            layout_events: vec![],
            claim_failures: vec![],
            chipset,
            engine: EngineStats::default(),
            sim: SimStats::default(),
            invariant_violations: vec![],
            elapsed_s: 0.0,
            tally: BTreeMap::new(),
            show,
        }
    }

    /// Counts a divergence under its cause; the first [`Self::show`] are kept in full.
    pub fn diverge(&mut self, d: Divergence) {
        self.add_divergences(&d.cause, d.access, 1);
        if self.first_divergences.len() < self.show {
            self.first_divergences.push(d);
        }
    }

    /// Counts `n` divergences of one cause.
    pub fn add_divergences(&mut self, cause: &Cause, first_access: u64, n: u64) {
        self.divergences += n;
        let e = self.tally.entry(cause.clone()).or_insert((0, first_access));
        e.0 += n;
    }

    /// Keeps a refused claim.
    pub fn claim_failed(&mut self, c: ClaimFailure) {
        if self.claim_failures.len() < MAX_CLAIM_FAILURES {
            self.claim_failures.push(c);
        }
    }

    /// Turns the tally into [`Self::divergence_causes`], most frequent first.
    pub fn finish_causes(&mut self) {
        let mut v: Vec<CauseCount> = std::mem::take(&mut self.tally)
            .into_iter()
            .map(|(cause, (count, first_access))| CauseCount {
                cause,
                count,
                first_access,
            })
            .collect();
        v.sort_by(|a, b| b.count.cmp(&a.count).then(a.cause.cmp(&b.cause)));
        self.divergence_causes = v;
    }

    fn fmt_counts(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} accesses ({} records) in {:.2} s: {} accesses/s",
            Thousands(self.accesses),
            Thousands(self.records),
            self.elapsed_s,
            Thousands((self.accesses as f64 / self.elapsed_s.max(1e-9)) as u64)
        )?;
        writeln!(f, "by kind:")?;
        for (k, v) in &self.by_kind {
            writeln!(f, "  {k:12} {:>12}", Thousands(*v))?;
        }
        writeln!(f, "per server:")?;
        for (k, v) in &self.per_server {
            writeln!(f, "  {k:12} {:>12}", Thousands(*v))?;
        }
        writeln!(f, "layout changes, in order:")?;
        for e in &self.layout_events {
            writeln!(f, "  {}", e.description)?;
        }
        let e = &self.engine;
        writeln!(
            f,
            "engine: {} requests, {} master aborts, {} ECAM rejects, {} intercepted, {} model errors",
            Thousands(e.requests),
            Thousands(e.master_aborts),
            Thousands(e.ecam_rejects),
            Thousands(e.intercepted),
            Thousands(e.dm_errors)
        )?;
        let s = &self.sim;
        writeln!(
            f,
            "hypervisor: {} sent, {} completed, {} unclaimed, {} CF8 conversions",
            Thousands(s.sent),
            Thousands(s.completed),
            Thousands(s.unclaimed),
            Thousands(s.cf8_converted)
        )
    }

    /// Refused claims, the same ones counted together, harmless ones said to be.
    fn fmt_claim_failures(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.claim_failures.is_empty() {
            return Ok(());
        }
        let harmless = self.claim_failures.iter().filter(|c| c.sizing).count();
        let n = self.claim_failures.len();
        let verdict = match harmless {
            h if h == n => ", all harmless (BAR sizing, see below)".to_string(),
            0 => String::new(),
            h => format!(", {h} harmless (BAR sizing, see below)"),
        };
        writeln!(f, "BAR claims refused: {}{verdict}", Thousands(n as u64))?;
        let mut groups: Vec<(&ClaimFailure, u64)> = vec![];
        for c in &self.claim_failures {
            match groups.iter_mut().find(|(g, _)| {
                g.device == c.device && g.range == c.range && g.error == c.error && g.op == c.op
            }) {
                Some((_, k)) => *k += 1,
                None => groups.push((c, 1)),
            }
        }
        for (c, k) in groups {
            let op = if c.op == "unmap" { "unmap " } else { "" };
            writeln!(f, "  {k}x {} {op}{}: {}", c.device, c.range, c.error)?;
            if c.sizing {
                writeln!(
                    f,
                    "     harmless: the guest sized this BAR with decoding on (all ones written, \
                     as iPXE does); QEMU mapped it at the top of the address space for a moment"
                )?;
            }
        }
        Ok(())
    }

    fn fmt_divergences(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for v in &self.invariant_violations {
            writeln!(f, "invariant violated: {}", v.message)?;
        }
        for d in &self.first_divergences {
            write!(
                f,
                "divergence at access {}: {}",
                Thousands(d.access),
                d.what
            )?;
            match &d.recorded {
                Some(r) => writeln!(f, "\n    recorded: {r}")?,
                None => writeln!(f)?,
            }
        }
        let causes = &self.divergence_causes;
        write!(f, "divergences: {}", Thousands(self.divergences))?;
        if causes.is_empty() {
            return Ok(());
        }
        let s = if causes.len() == 1 { "" } else { "s" };
        write!(f, ", {} cause{s}:", Thousands(causes.len() as u64))?;
        for c in causes {
            write!(
                f,
                "\n  {:>10}  {} (first at access {})",
                Thousands(c.count),
                c.cause,
                Thousands(c.first_access)
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "replay of {} with {}", self.trace, self.topology)?;
        writeln!(f, "chipset: {}", self.chipset)?;
        self.fmt_counts(f)?;
        self.fmt_claim_failures(f)?;
        self.fmt_divergences(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ioreq_server::IoreqState;
    use serde_json::json;

    /// Before: `invariant_violations` were plain strings in the JSON.
    #[test]
    fn invariant_violations_are_structured_in_json_and_sentences_in_text() {
        let mut r = ReplayReport::new("t".into(), "topo".into(), "chip".into(), 0);
        r.invariant_violations = vec![
            Violation::StillWaiting {
                vcpu: 1,
                servers: vec![2],
            }
            .into(),
            Violation::BadIoState {
                server: 0,
                vcpu: 3,
                state: IoreqState::InProcess,
            }
            .into(),
        ];
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["schema"], "ioreq-mux.replay/2");
        assert_eq!(
            j["invariant_violations"][0],
            json!({
                "kind": "still_waiting",
                "vcpu": 1,
                "servers": [2],
                "message": "vCPU 1 still waits on servers [2]",
            })
        );
        let bad = &j["invariant_violations"][1];
        assert_eq!(bad["kind"], "bad_io_state");
        assert_eq!(
            (bad["server"].as_u64(), bad["vcpu"].as_u64()),
            (Some(0), Some(3))
        );
        assert_eq!(
            bad["message"],
            "server 0 left vCPU 3's slot in InProcess (bad IO state)"
        );
        let text = r.to_string();
        assert!(
            text.contains("invariant violated: vCPU 1 still waits on servers [2]\n"),
            "{text}"
        );
    }

    /// The claim that routed an access is the place named; the `qemu_devices` line of the
    /// server expected comes after it.
    #[test]
    fn a_cause_names_the_claim_that_routed_the_access() {
        let cause = Cause {
            kind: CauseKind::Misrouted,
            target: "config of 05:00.0".into(),
            answered_by: Some("e1000".into()),
            expected: Some("virtio-net".into()),
            config: Some(ConfigPlace {
                key: "owns.position",
                line: 67,
            }),
            expected_by: Some(ConfigPlace {
                key: "qemu_devices",
                line: 60,
            }),
        };
        assert_eq!(
            cause.to_string(),
            "config of 05:00.0 answered by e1000, expected virtio-net (owns.position, line 67); \
             virtio-net expected by qemu_devices, line 60"
        );
        let j = serde_json::to_value(&cause).unwrap();
        assert_eq!(j["config"], json!({"key": "owns.position", "line": 67}));
        assert_eq!(j["expected_by"], json!({"key": "qemu_devices", "line": 60}));
    }
}
