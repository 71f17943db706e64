//! Trace servers in their own processes (`replay --dm-mode process`).
//!
//! Each non-chipset trace server runs as `ioreq-mux replay-dm`, a child process that connects
//! to the multiplexer's device-model socket like any out-of-process device model and replays
//! its own device's side of the trace: it walks the trace, answers each request it receives
//! with the next record QEMU routed to one of its devices, checks that the request is the one
//! recorded, and claims and releases its BARs itself when the configuration write that placed
//! them is handled, as a real device model does. At the end it prints a JSON summary.

use crate::{ClaimFailure, REPLAY_VCPUS, ReplayError};
use ioreq_mux_config::dm_socket::{DmSocket, Policy};
use ioreq_mux_config::{Config, Server, ServerKind};
use ioreq_mux_engine::{Engine, Grant};
use ioreq_mux_trace::{Access, BarEventKind, Record, Space, StrId, TraceReader};
use ioreq_server::oop::server::ServerOptions;
use ioreq_server::oop::{ClientOptions, serve_with};
use ioreq_server::sim::SimBackend;
use ioreq_server::{
    Claim, ClaimError, DeviceModel, Dir, DmControl, DmError, IoRange, Ioreq, IoreqType, RangeKind,
    abi, size_mask,
};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// What a trace server process reports when it ends.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DmSummary {
    pub server: String,
    /// Requests answered.
    pub served: u64,
    /// Requests that were not what the next record of its devices said.
    pub mismatches: u64,
    /// The first few mismatches.
    pub examples: Vec<String>,
    /// BAR claims the multiplexer refused (the in-process replay reports the same ones).
    #[serde(default)]
    pub claim_failures: Vec<ClaimFailure>,
}

/// The running trace-server processes and the socket they connect to.
pub(crate) struct Children {
    socket: Option<DmSocket>,
    dir: PathBuf,
    procs: Vec<(String, Child)>,
}

impl std::fmt::Debug for Children {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Children")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Everything a replayed device model may claim: its own claims, and any port or MMIO range
/// (firmware decides where its BARs go).
fn replay_policy(s: &Server) -> Policy {
    let mut p = Policy::from_server(s);
    p.grant = Grant {
        ranges: p
            .grant
            .ranges
            .into_iter()
            .chain([
                IoRange::new(RangeKind::Port, 0, 0xffff),
                IoRange::new(RangeKind::Mmio, 0, u64::MAX),
            ])
            .collect(),
        positions: p.grant.positions,
        ..p.grant
    };
    p
}

impl Children {
    /// Starts the socket and one process per remote server, and waits until every one has
    /// joined the engine and enabled its server (so its claims are made: a device model
    /// enables only after its initial claims are answered).
    pub(crate) fn start(
        engine: &mut Engine<SimBackend>,
        cfg: &Config,
        trace: &Path,
        topology: &Path,
        exe: Option<&Path>,
    ) -> Result<Self, ReplayError> {
        let remote: Vec<&Server> = cfg
            .servers
            .iter()
            .filter(|s| s.kind == ServerKind::Trace && !s.qemu_devices.iter().any(|d| d == "*"))
            .collect();
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ioreq-mux-replay-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| ReplayError::Topology(format!("{}: {e}", dir.display())))?;
        let path = dir.join("dm.sock");
        let _ = std::fs::remove_file(&path);
        let policies = remote.iter().map(|s| replay_policy(s)).collect();
        let socket = DmSocket::start(
            &path,
            policies,
            engine.control(),
            REPLAY_VCPUS,
            ServerOptions::default(),
        )
        .map_err(|e| {
            ReplayError::Topology(format!("device-model socket {}: {e}", path.display()))
        })?;
        let exe = match exe {
            Some(e) => e.to_path_buf(),
            None => std::env::current_exe()
                .map_err(|e| ReplayError::Topology(format!("own executable: {e}")))?,
        };
        let mut procs = vec![];
        for s in &remote {
            let child = Command::new(&exe)
                .arg("replay-dm")
                .arg("--socket")
                .arg(&path)
                .arg("--trace")
                .arg(trace)
                .arg("--topology")
                .arg(topology)
                .arg("--server")
                .arg(&s.name)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|e| ReplayError::Topology(format!("starting {}: {e}", s.name)))?;
            procs.push((s.name.clone(), child));
        }
        let mut c = Children {
            socket: Some(socket),
            dir,
            procs,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            engine
                .poll(Some(Duration::from_millis(5)))
                .map_err(|e| ReplayError::Topology(e.to_string()))?;
            let names = engine.router().server_names();
            // Joined is not enough: a server joins at CREATE, before its claims and
            // SET_STATE, and the replay's first accesses would find it disabled (master
            // aborts, then divergences).
            let enabled = c.socket.as_ref().map(DmSocket::servers).unwrap_or_default();
            let ready = |name: &str| {
                enabled
                    .iter()
                    .any(|st| st.enabled && st.name.as_deref() == Some(name))
            };
            if remote
                .iter()
                .all(|s| names.contains(&s.name) && ready(&s.name))
            {
                info!(
                    servers = remote.len(),
                    "every trace server joined from its own process"
                );
                return Ok(c);
            }
            for (name, p) in &mut c.procs {
                if let Ok(Some(st)) = p.try_wait() {
                    return Err(ReplayError::Topology(format!(
                        "trace server {name} exited before joining: {st}"
                    )));
                }
            }
            if Instant::now() > deadline {
                return Err(ReplayError::Topology(
                    "trace servers did not join within 30 s".into(),
                ));
            }
        }
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.procs.iter().any(|(n, _)| n == name)
    }

    /// Kills a server's process (fault injection).
    pub(crate) fn kill(&mut self, name: &str) {
        for (n, p) in &mut self.procs {
            if n == name {
                warn!(server = %name, "killing the trace server's process");
                let _ = p.kill();
                let _ = p.wait();
            }
        }
    }

    /// Closes the socket, lets the processes finish and collects their summaries.
    pub(crate) fn finish(
        mut self,
        engine: &mut Engine<SimBackend>,
    ) -> Vec<(String, Option<DmSummary>)> {
        if let Some(s) = self.socket.take() {
            s.stop();
        }
        let _ = engine.poll(Some(Duration::ZERO));
        let mut out = vec![];
        for (name, child) in std::mem::take(&mut self.procs) {
            let summary = child.wait_with_output().ok().and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .rev()
                    .find_map(|l| serde_json::from_str::<DmSummary>(l).ok())
            });
            out.push((name, summary));
        }
        out
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, p) in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What one trace server in its own process serves: its `server` of `topology`, from
/// `trace`, connected to the multiplexer at `socket`.
#[derive(Debug, Clone)]
pub struct ReplayDmArgs {
    pub socket: PathBuf,
    pub trace: PathBuf,
    pub topology: PathBuf,
    pub server: String,
}

/// How a trace server's run ended: what it served, and the error that ended it early.
#[derive(Debug)]
pub struct DmOutcome {
    pub summary: DmSummary,
    pub error: Option<String>,
}

/// One device model's side of a trace.
struct DeviceSide {
    name: String,
    claims: Vec<Claim>,
    devices: Vec<String>,
    reader: TraceReader<File>,
    /// Per string id: is it one of our devices (resolved as strings appear).
    mine: Vec<bool>,
    current: Option<(Access, u64)>,
    peeked: Option<Record>,
    bars: Vec<(Space, u64, u64)>,
    summary: DmSummary,
}

impl DeviceSide {
    fn is_mine_device(&mut self, id: StrId) -> bool {
        let i = id.0 as usize;
        while self.mine.len() < self.reader.strings().len() {
            let n = self.mine.len();
            let s = self.reader.strings().get(StrId(n as u32)).unwrap_or("");
            self.mine.push(self.devices.iter().any(|d| d == s));
        }
        self.mine.get(i).copied().unwrap_or(false)
    }

    fn next_record(&mut self) -> Option<Record> {
        if let Some(r) = self.peeked.take() {
            return Some(r);
        }
        match self.reader.next_record() {
            Ok(r) => r,
            Err(e) => {
                warn!(server = %self.name, error = %e, "trace unreadable");
                None
            }
        }
    }

    fn bar(&mut self, ev: &ioreq_mux_trace::BarEvent, ctl: &mut dyn DmControl) {
        let Some(d) = ev.device else { return };
        if !self.is_mine_device(d) {
            return;
        }
        let kind = if ev.space == Space::Port {
            RangeKind::Port
        } else {
            RangeKind::Mmio
        };
        let last = ev.base.saturating_add(ev.size.max(1) - 1);
        let r = IoRange::new(kind, ev.base, last);
        match ev.kind {
            BarEventKind::Map => {
                self.bars.push((ev.space, ev.base, last));
                if let Err(e) = ctl.map(Claim::Range(r)) {
                    info!(server = %self.name, error = %e, "BAR not claimed");
                    let device = self.reader.strings().get(d).unwrap_or("?").to_string();
                    self.summary.claim_failures.push(ClaimFailure {
                        server: self.name.clone(),
                        device,
                        range: r.to_string(),
                        op: "map".into(),
                        error: e.to_string(),
                        sizing: ClaimFailure::is_sizing(ev.space, last),
                    });
                }
            }
            BarEventKind::Unmap => {
                self.bars.retain(|b| *b != (ev.space, ev.base, last));
                let _ = ctl.unmap(Claim::Range(r));
            }
        }
    }

    fn is_mine(&mut self, a: &Access) -> bool {
        match a.config {
            Some(c) => c.device.is_some_and(|d| self.is_mine_device(d)),
            None => self
                .bars
                .iter()
                .any(|&(sp, b, l)| sp == a.space && b <= a.addr && a.addr <= l),
        }
    }

    fn next_own(&mut self, ctl: &mut dyn DmControl) -> Option<Access> {
        if let Some((a, left)) = &mut self.current {
            if *left > 0 {
                *left -= 1;
                return Some(*a);
            }
        }
        loop {
            match self.next_record()? {
                Record::Bar(ev) => self.bar(&ev, ctl),
                Record::Access { access, repeat } => {
                    if self.is_mine(&access) {
                        self.current = Some((access, repeat.saturating_sub(1)));
                        return Some(access);
                    }
                }
            }
        }
    }

    /// BAR events right after the access just served happened because of it.
    fn after(&mut self, ctl: &mut dyn DmControl) {
        if self.current.is_some_and(|(_, left)| left > 0) {
            return;
        }
        loop {
            match self.next_record() {
                Some(Record::Bar(ev)) => self.bar(&ev, ctl),
                Some(other) => {
                    self.peeked = Some(other);
                    return;
                }
                None => return,
            }
        }
    }

    fn mismatch(&mut self, msg: String) {
        self.summary.mismatches += 1;
        if self.summary.examples.len() < 5 {
            self.summary.examples.push(msg);
        }
    }
}

fn matches(req: &Ioreq, a: &Access) -> bool {
    let dir = a.dir;
    if req.dir != dir || req.size != u32::from(a.size) {
        return false;
    }
    if dir == Dir::Write && req.data & size_mask(req.size) != a.data & size_mask(req.size) {
        return false;
    }
    match (req.ty, a.config) {
        (IoreqType::PciConfig, Some(c)) => {
            let (sbdf, reg) = abi::split_pci_config_addr(req.addr);
            sbdf == c.sbdf.to_xen() && reg == u32::from(c.reg)
        }
        (IoreqType::Pio, None) => a.space == Space::Port && req.addr == a.addr,
        (IoreqType::Copy, None) => a.space == Space::Mmio && req.addr == a.addr,
        _ => false,
    }
}

impl DeviceModel for DeviceSide {
    fn name(&self) -> &str {
        &self.name
    }

    fn attach(&mut self, ctl: &mut dyn DmControl) -> Result<(), ClaimError> {
        ctl.map_all(&self.claims)
    }

    fn handle(&mut self, _vcpu: u32, req: &Ioreq, ctl: &mut dyn DmControl) -> Result<u64, DmError> {
        self.summary.served += 1;
        let Some(a) = self.next_own(ctl) else {
            self.mismatch(format!("{req:?} after the end of the trace"));
            return Ok(size_mask(req.size));
        };
        if !matches(req, &a) {
            self.mismatch(format!("got {req:?}, next record {a:?}"));
        }
        let v = a.data;
        self.after(ctl);
        Ok(v)
    }
}

/// `ioreq-mux replay-dm`: one trace server in its own process. `Err`: it could not start
/// (the topology or the trace cannot be read, or names no such server).
pub fn run(a: &ReplayDmArgs) -> Result<DmOutcome, String> {
    let cfg = Config::load(&a.topology).map_err(|e| e.to_string())?;
    let Some(s) = cfg.servers.iter().find(|s| s.name == a.server) else {
        return Err(format!(
            "no server {} in {}",
            a.server,
            a.topology.display()
        ));
    };
    let reader = TraceReader::open(&a.trace).map_err(|e| format!("{}: {e}", a.trace.display()))?;
    let mut model = DeviceSide {
        name: s.name.clone(),
        claims: s.claims.clone(),
        devices: s.qemu_devices.clone(),
        reader,
        mine: vec![],
        current: None,
        peeked: None,
        bars: vec![],
        summary: DmSummary {
            server: s.name.clone(),
            ..Default::default()
        },
    };
    // Busy-poll between requests: a replay sends millions back to back.
    let opts = ClientOptions {
        spin: Duration::from_micros(500),
        ..Default::default()
    };
    let r = serve_with(&a.socket, &mut model, &opts);
    Ok(DmOutcome {
        summary: model.summary,
        error: r.err().map(|e| e.to_string()),
    })
}
