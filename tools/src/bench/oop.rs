//! 3. Out-of-process round trip (docs/dm-protocol.md): one configuration read through the
//!    engine to an `ioreq-mux dm` child process and back, busy-polling and blocking, against
//!    two floors measured here: a cache-line ping-pong between two threads (the best a
//!    busy-polling round trip can do) and an eventfd ping-pong between two processes with
//!    blocking reads (the best a blocking round trip can do).
//!
//! Every sample is one round trip timed with `Instant` (the floors too, so the clock's own
//! cost is in both); percentiles come from an HDR histogram.

use super::util::{Reaped, TempDir};
use super::{Effort, progress};
use crate::dm_socket::{DmSocket, Policy};
use crate::engine::{Engine, EngineConfig, Grant, MUX};
use bdf_router::Sbdf;
use chipset_intercept::Chipset;
use hdrhistogram::Histogram;
use ioreq_server::bufioreq::BufioreqMode;
use ioreq_server::oop::{RemoteOptions, RemoteStats, ServerOptions};
use ioreq_server::sim::{SimBackend, SimHypervisor};
use ioreq_server::{Dir, IoRange, Ioreq};
use nix::sys::eventfd::{EfdFlags, EventFd};
use serde::Serialize;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Latency percentiles of one measurement.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Lat {
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub mean_ns: f64,
    pub samples: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Oop {
    pub poll_p50_ns: u64,
    pub poll_p99_ns: u64,
    pub block_p50_ns: u64,
    pub block_p99_ns: u64,
    /// p50 of the thread-to-thread cache-line ping-pong.
    pub spin_floor_ns: u64,
    /// p50 of the process-to-process eventfd ping-pong.
    pub eventfd_floor_ns: u64,
    /// poll_p50_ns / spin_floor_ns.
    pub poll_vs_floor: f64,
    /// block_p50_ns / eventfd_floor_ns.
    pub block_vs_floor: f64,
    /// The defaults (the engine spins 50 us, the device model sleeps): p50, p99.
    pub default_p50_ns: u64,
    pub default_p99_ns: u64,
    /// The same read served by the same model inside the engine (no process in the way).
    pub inprocess_p50_ns: u64,
    pub detail: OopDetail,
}

#[derive(Debug, Clone, Serialize)]
pub struct OopDetail {
    pub spin_floor: Lat,
    pub eventfd_floor: Lat,
    pub poll: Lat,
    pub block: Lat,
    pub default: Lat,
    pub inprocess: Lat,
    /// How many round trips the engine answered while spinning / after blocking.
    pub poll_spun: u64,
    pub poll_blocked: u64,
    pub block_spun: u64,
    pub block_blocked: u64,
}

fn histogram() -> Result<Histogram<u64>, String> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| e.to_string())
}

fn lat(h: &Histogram<u64>) -> Lat {
    Lat {
        p50_ns: h.value_at_quantile(0.5),
        p99_ns: h.value_at_quantile(0.99),
        p999_ns: h.value_at_quantile(0.999),
        mean_ns: h.mean(),
        samples: h.len(),
    }
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
    h.saturating_record(ns);
}

/// Longest any single wait of a floor may take before the bench gives up.
const STUCK: Duration = Duration::from_secs(30);

/// One cache line two threads bounce a counter through.
#[repr(align(128))]
#[derive(Debug, Default)]
struct Line(AtomicU64);

/// Spins until `line` holds `want`; false if that takes longer than [`STUCK`] or `abort`.
fn spin_until(line: &Line, want: u64, abort: &AtomicBool) -> bool {
    let mut n = 0u32;
    let mut since: Option<Instant> = None;
    while line.0.load(Ordering::Acquire) != want {
        std::hint::spin_loop();
        n = n.wrapping_add(1);
        if n % 4096 == 0 {
            if abort.load(Ordering::Relaxed) {
                return false;
            }
            let s = *since.get_or_insert_with(Instant::now);
            if s.elapsed() > STUCK {
                abort.store(true, Ordering::Relaxed);
                return false;
            }
        }
    }
    true
}

/// Thread ping-pong through one cache line: the main thread writes an odd value, the peer
/// answers with the next even one.
pub fn spin_floor(samples: u64, warmup: u64) -> Result<Lat, String> {
    let line = Arc::new(Line::default());
    let abort = Arc::new(AtomicBool::new(false));
    let total = samples + warmup;
    let (l2, a2) = (line.clone(), abort.clone());
    let peer = std::thread::Builder::new()
        .name("bench-spin-peer".into())
        .spawn(move || {
            for i in 0..total {
                if !spin_until(&l2, 2 * i + 1, &a2) {
                    return;
                }
                l2.0.store(2 * i + 2, Ordering::Release);
            }
        })
        .map_err(|e| e.to_string())?;
    let mut h = histogram()?;
    for i in 0..total {
        let t = Instant::now();
        line.0.store(2 * i + 1, Ordering::Release);
        if !spin_until(&line, 2 * i + 2, &abort) {
            break;
        }
        if i >= warmup {
            record(&mut h, t.elapsed());
        }
    }
    abort.store(true, Ordering::Relaxed);
    let _ = peer.join();
    if h.len() < samples {
        return Err("the spin peer thread stopped answering".into());
    }
    Ok(lat(&h))
}

/// What the eventfd peer is told to stop with.
const STOP: u64 = 1 << 40;

fn efd_write(fd: impl AsFd, v: u64) -> Result<(), String> {
    nix::unistd::write(fd, &v.to_ne_bytes())
        .map(|_| ())
        .map_err(|e| format!("eventfd write: {e}"))
}

fn efd_read(fd: &impl AsRawFd) -> Result<u64, String> {
    let mut b = [0u8; 8];
    match nix::unistd::read(fd.as_raw_fd(), &mut b) {
        Ok(8) => Ok(u64::from_ne_bytes(b)),
        Ok(n) => Err(format!("eventfd read of {n} bytes")),
        Err(e) => Err(format!("eventfd read: {e}")),
    }
}

/// The child side of the eventfd floor (`ioreq-mux bench --peer eventfd`): its stdin is the
/// eventfd the parent rings, its stdout the one it answers on; both blocking.
pub fn eventfd_peer() -> ExitCode {
    let input = std::io::stdin();
    let output = std::io::stdout();
    loop {
        match efd_read(&input) {
            Ok(v) if v >= STOP => return ExitCode::SUCCESS,
            Ok(_) => {}
            Err(e) => {
                eprintln!("ioreq-mux bench eventfd peer: {e}");
                return ExitCode::from(1);
            }
        }
        if let Err(e) = efd_write(output.as_fd(), 1) {
            eprintln!("ioreq-mux bench eventfd peer: {e}");
            return ExitCode::from(1);
        }
    }
}

/// Process ping-pong over two blocking eventfds (this binary as the peer).
pub fn eventfd_floor(exe: &Path, samples: u64, warmup: u64) -> Result<Lat, String> {
    let mk = || -> Result<OwnedFd, String> {
        EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)
            .map(OwnedFd::from)
            .map_err(|e| format!("eventfd: {e}"))
    };
    let (ping, pong) = (mk()?, mk()?);
    let ping_child = ping.try_clone().map_err(|e| e.to_string())?;
    let pong_child = pong.try_clone().map_err(|e| e.to_string())?;
    let child = Command::new(exe)
        .args(["bench", "--peer", "eventfd"])
        .stdin(Stdio::from(ping_child))
        .stdout(Stdio::from(pong_child))
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("{}: {e}", exe.display()))?;
    let mut child = Reaped(Some(child));
    // A watchdog unblocks our read if the peer dies.
    let done = Arc::new(AtomicBool::new(false));
    let stuck = Arc::new(AtomicBool::new(false));
    let pong_dog = pong.try_clone().map_err(|e| e.to_string())?;
    let (d2, s2) = (done.clone(), stuck.clone());
    let dog = std::thread::spawn(move || {
        let total = STUCK * 4;
        let t = Instant::now();
        while !d2.load(Ordering::Acquire) {
            if t.elapsed() > total {
                s2.store(true, Ordering::Release);
                let _ = efd_write(&pong_dog, 1);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let mut h = histogram()?;
    let mut err = None;
    for i in 0..samples + warmup {
        let t = Instant::now();
        if let Err(e) = efd_write(&ping, 1).and_then(|()| efd_read(&pong)) {
            err = Some(e);
            break;
        }
        let el = t.elapsed();
        if stuck.load(Ordering::Acquire) {
            err = Some("the eventfd peer stopped answering".into());
            break;
        }
        if i >= warmup {
            record(&mut h, el);
        }
    }
    done.store(true, Ordering::Release);
    let _ = dog.join();
    let _ = efd_write(&ping, STOP);
    let status = child.finish(Duration::from_secs(5));
    if let Some(e) = err {
        return Err(e);
    }
    if !status.is_some_and(|s| s.success()) {
        return Err(format!("the eventfd peer exited with {status:?}"));
    }
    Ok(lat(&h))
}

const FUNCTION: &str = "00:05.0";
const VENDOR_DEVICE: u64 = 0x1337_1af4;

fn engine(models: Vec<Box<dyn ioreq_server::DeviceModel>>) -> Result<Engine<SimBackend>, String> {
    let hv = SimHypervisor::new(1, Duration::from_secs(5));
    let backend = hv
        .create_server(BufioreqMode::Atomic)
        .map_err(|e| e.to_string())?;
    let cfg = EngineConfig {
        chipset: Some(Chipset::Unknown),
        ..Default::default()
    };
    Engine::new(backend, models, &cfg).map_err(|e| e.to_string())
}

/// Times `samples` configuration reads straight into the engine (no hypervisor in the way,
/// so the device-model path is all that is measured).
fn measure(e: &mut Engine<SimBackend>, f: Sbdf, samples: u64, warmup: u64) -> Result<Lat, String> {
    let req = Ioreq::pci_config(f.to_xen(), 0, Dir::Read, 4, 0);
    let mut h = histogram()?;
    for i in 0..samples + warmup {
        let t = Instant::now();
        let v = e.handle(0, &req);
        let el = t.elapsed();
        if v != VENDOR_DEVICE {
            return Err(format!(
                "round trip {i} read {v:#x}, not {VENDOR_DEVICE:#x}"
            ));
        }
        if i >= warmup {
            record(&mut h, el);
        }
    }
    Ok(lat(&h))
}

/// The same function served inside the engine.
fn inprocess(samples: u64) -> Result<Lat, String> {
    let f: Sbdf = FUNCTION.parse().map_err(|e| format!("{e}"))?;
    let spec = crate::models::FunctionSpec::endpoint(0x1af4, 0x1337, 0xff0000);
    let local = crate::models::EmulatedModel::new("local")
        .with_function(crate::models::Placement::Bdf(f.to_xen()), &spec);
    let mut e = engine(vec![Box::new(local)])?;
    measure(&mut e, f, samples, samples / 10)
}

/// One `ioreq-mux dm` child connected to a fresh engine, `samples` round trips.
fn round_trip(
    exe: &Path,
    label: &str,
    mux_spin: Duration,
    dm_spin_us: u64,
    samples: u64,
) -> Result<(Lat, RemoteStats), String> {
    let f: Sbdf = FUNCTION.parse().map_err(|e| format!("{e}"))?;
    let mut e = engine(vec![])?;
    let dir = TempDir::new(label).map_err(|e| e.to_string())?;
    let path = dir.0.join("dm.sock");
    let policy = Policy {
        name: "ep".into(),
        uid: None,
        grant: Grant {
            ranges: vec![IoRange::pci(f.to_xen())],
            positions: vec![],
        },
    };
    let opts = ServerOptions {
        remote: RemoteOptions {
            spin: mux_spin,
            deadline: Duration::from_secs(5),
            ..Default::default()
        },
        ..Default::default()
    };
    let sock = DmSocket::start(&path, vec![policy], e.control(), 1, opts)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let path_s = path.to_str().ok_or("temporary path is not UTF-8")?;
    let child = Command::new(exe)
        .args(["dm", "--socket", path_s, "--server", "ep", "--at", FUNCTION])
        .args(["--vendor", "0x1af4", "--device", "0x1337"])
        .args(["--spin-us", &dm_spin_us.to_string()])
        .env("IOREQ_MUX_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", exe.display()))?;
    let mut child = Reaped(Some(child));
    let t = Instant::now();
    while e.router().config_owner(f).filter(|o| *o != MUX).is_none()
        || !sock.servers().iter().any(|s| s.enabled)
    {
        if t.elapsed() > Duration::from_secs(20) {
            return Err("the device model did not connect within 20 s".into());
        }
        if let Ok(Some(s)) = child.0.as_mut().map_or(Ok(None), |c| c.try_wait()) {
            return Err(format!("the device model exited early: {s}"));
        }
        e.poll(Some(Duration::from_millis(1)))
            .map_err(|e| e.to_string())?;
    }
    let r = measure(&mut e, f, samples, samples / 10 + 1000);
    let stats = sock.servers().first().map(|s| s.stats).unwrap_or_default();
    sock.stop();
    let status = child.finish(Duration::from_secs(5));
    let l = r?;
    if !status.is_some_and(|s| s.success()) {
        return Err(format!("the device model exited with {status:?}"));
    }
    Ok((l, stats))
}

pub fn run(e: &Effort, exe: &Path) -> Result<Oop, String> {
    let spin = spin_floor(e.spin_samples, e.spin_samples / 10)?;
    progress(&format!(
        "floor: cache-line ping-pong between threads p50 {} ns, p99 {} ns",
        spin.p50_ns, spin.p99_ns
    ));
    let efd = eventfd_floor(exe, e.eventfd_samples, e.eventfd_samples / 10)?;
    progress(&format!(
        "floor: eventfd ping-pong between processes p50 {} ns, p99 {} ns",
        efd.p50_ns, efd.p99_ns
    ));
    let local = inprocess(e.poll_samples)?;
    // Busy-polling: the engine spins up to 500 ms, the device model 1 ms after each request.
    let (poll, ps) = round_trip(
        exe,
        "poll",
        Duration::from_millis(500),
        1000,
        e.poll_samples,
    )?;
    progress(&format!(
        "out of process, busy-polling: p50 {} ns, p99 {} ns (spun {}, blocked {})",
        poll.p50_ns, poll.p99_ns, ps.spun, ps.blocked
    ));
    let (block, bs) = round_trip(exe, "block", Duration::ZERO, 0, e.block_samples)?;
    progress(&format!(
        "out of process, blocking: p50 {} ns, p99 {} ns (spun {}, blocked {})",
        block.p50_ns, block.p99_ns, bs.spun, bs.blocked
    ));
    let def = RemoteOptions::default().spin;
    let (dflt, _) = round_trip(exe, "default", def, 0, e.block_samples)?;
    progress(&format!(
        "out of process, defaults (engine spins {def:?}, model sleeps): p50 {} ns, p99 {} ns",
        dflt.p50_ns, dflt.p99_ns
    ));
    Ok(Oop {
        poll_p50_ns: poll.p50_ns,
        poll_p99_ns: poll.p99_ns,
        block_p50_ns: block.p50_ns,
        block_p99_ns: block.p99_ns,
        spin_floor_ns: spin.p50_ns,
        eventfd_floor_ns: efd.p50_ns,
        poll_vs_floor: poll.p50_ns as f64 / spin.p50_ns.max(1) as f64,
        block_vs_floor: block.p50_ns as f64 / efd.p50_ns.max(1) as f64,
        default_p50_ns: dflt.p50_ns,
        default_p99_ns: dflt.p99_ns,
        inprocess_p50_ns: local.p50_ns,
        detail: OopDetail {
            spin_floor: spin,
            eventfd_floor: efd,
            poll,
            block,
            default: dflt,
            inprocess: local,
            poll_spun: ps.spun,
            poll_blocked: ps.blocked,
            block_spun: bs.spun,
            block_blocked: bs.blocked,
        },
    })
}
