//! 3. Out-of-process round trip (docs/dm-protocol.md): one configuration read through the
//!    engine to an `ioreq-mux dm` child process and back, busy-polling and blocking, against
//!    two floors measured here: a cache-line ping-pong between two threads (the best a
//!    busy-polling round trip can do) and an eventfd ping-pong between two processes with
//!    blocking reads (the best a blocking round trip can do).
//!
//! Each round trip is measured in chunks alternating with chunks of its floor, so both see
//! the same machine: on this VM the two vCPUs are sometimes siblings of one core and
//! sometimes not, which moves the cache-line floor between ~0.12 and ~0.45 us from one
//! second to the next. For busy-polling, the engine's thread is pinned to one CPU and the
//! peer (the floor's thread, the device-model process) to another, so the floor and the
//! round trips spin on the same pair of CPUs (the way busy-polling is deployed: a core each).
//! The blocking parts are left to the scheduler: pinned sleepers on a busy machine wait for
//! whatever else runs on their CPU, which measures the neighbours, not the protocol.
//! Every sample is one round trip timed with `Instant` (the floors too, so the clock's own
//! cost is in both); percentiles come from HDR histograms.
//!
//! Under CPU pressure ([`loaded`]): the default settings' round trip with no other load and
//! with one busy-loop thread per CPU the bench may use (started and stopped by the bench,
//! [`Hogs`]), in alternating chunks, for the adaptive spin policy and for the fixed spin
//! it replaced; the ratios loaded / unloaded say how gracefully each degrades.

use super::util::{Reaped, TempDir};
use super::{Effort, progress};
use crate::dm_socket::{DmSocket, Policy};
use crate::engine::{Engine, EngineConfig, Grant, MUX};
use bdf_router::Sbdf;
use chipset_intercept::Chipset;
use hdrhistogram::Histogram;
use ioreq_server::bufioreq::BufioreqMode;
use ioreq_server::oop::spin::SPIN_ENV;
use ioreq_server::oop::{RemoteOptions, RemoteStats, ServerOptions, SpinMode};
use ioreq_server::sim::{SimBackend, SimHypervisor};
use ioreq_server::{Dir, IoRange, Ioreq};
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::unistd::Pid;
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
    /// p50 of the thread-to-thread cache-line ping-pong (measured between the busy-polling
    /// chunks).
    pub spin_floor_ns: u64,
    /// p50 of the process-to-process eventfd ping-pong (measured between the blocking
    /// chunks).
    pub eventfd_floor_ns: u64,
    /// poll_p50_ns / spin_floor_ns.
    pub poll_vs_floor: f64,
    /// block_p50_ns / eventfd_floor_ns.
    pub block_vs_floor: f64,
    /// The defaults (the engine spins 50 us, the device model sleeps), on two CPUs: p50, p99.
    pub default_p50_ns: u64,
    pub default_p99_ns: u64,
    /// The same read served by the same model inside the engine (no process in the way).
    pub inprocess_p50_ns: u64,
    /// The defaults (adaptive spinning), no other load: p50, p99.
    pub unloaded_p50_ns: u64,
    pub unloaded_p99_ns: u64,
    /// The defaults with one busy-loop thread per CPU: p50, p99.
    pub loaded_p50_ns: u64,
    pub loaded_p99_ns: u64,
    /// loaded_p50_ns / unloaded_p50_ns, and the same for p99.
    pub loaded_vs_unloaded_p50: f64,
    pub loaded_vs_unloaded_p99: f64,
    /// The same two ratios with the engine spinning a fixed 50 us (the policy before
    /// adaptive spinning), measured in the same chunks.
    pub fixed_loaded_vs_unloaded_p50: f64,
    pub fixed_loaded_vs_unloaded_p99: f64,
    /// One system call here: a non-blocking read of an empty eventfd (EAGAIN), mean ns.
    pub syscall_ns: f64,
    pub detail: OopDetail,
}

#[derive(Debug, Clone, Serialize)]
pub struct OopDetail {
    /// CPUs the engine and its peer were pinned to for busy-polling (none with fewer than
    /// two CPUs).
    pub cpus: Option<(usize, usize)>,
    pub spin_floor: Lat,
    pub eventfd_floor: Lat,
    pub poll: Lat,
    pub block: Lat,
    /// Blocking with the engine and the peers on two CPUs (the targets use one CPU, where
    /// a wake-up is a context switch; here it is a cross-CPU wake-up, on this VM dominated
    /// by the host waking an idle vCPU).
    pub eventfd_floor_two_cpus: Lat,
    pub block_two_cpus: Lat,
    pub default: Lat,
    pub inprocess: Lat,
    /// Under CPU pressure: adaptive and fixed spinning, without and with the busy loops.
    pub unloaded: Lat,
    pub loaded: Lat,
    pub fixed_unloaded: Lat,
    pub fixed_loaded: Lat,
    /// Busy-loop threads started for the loaded chunks (one per CPU allowed).
    pub hogs: usize,
    /// How the engine's waits ended in the loaded part, adaptive and fixed: (spun, blocked).
    pub loaded_waits: (u64, u64),
    pub fixed_loaded_waits: (u64, u64),
    /// Chunks each round trip and its floor were split into.
    pub chunks: u64,
    /// How many round trips the engine answered while spinning / after blocking.
    pub poll_spun: u64,
    pub poll_blocked: u64,
    pub block_spun: u64,
    pub block_blocked: u64,
}

/// Parts of the section (all by default; one alone for profiling).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Busy-polling round trips and the cache-line floor.
    Poll,
    /// Blocking round trips and the eventfd floor.
    Block,
    /// Round trips with the default options.
    Default,
    /// The same model in process.
    Inprocess,
    /// The defaults with and without one busy loop per CPU.
    Loaded,
}

fn histogram() -> Result<Histogram<u64>, String> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| e.to_string())
}

/// A measurement that did not run.
const NO_LAT: Lat = Lat {
    p50_ns: 0,
    p99_ns: 0,
    p999_ns: 0,
    mean_ns: 0.0,
    samples: 0,
};

fn lat(h: &Histogram<u64>) -> Lat {
    if h.is_empty() {
        return NO_LAT;
    }
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

/// The two CPUs the section runs on: (the engine's, the peers'). `None` with fewer than two
/// CPUs allowed, in which case nothing is pinned.
fn cpu_pair() -> Option<(usize, usize)> {
    let set = sched_getaffinity(Pid::from_raw(0)).ok()?;
    let mut it = (0..CpuSet::count()).filter(|&i| set.is_set(i).unwrap_or(false));
    Some((it.next()?, it.next()?))
}

/// Pins a process (or, with pid 0, the calling thread) to one CPU; best effort.
fn pin(pid: Pid, cpu: Option<usize>) {
    let Some(cpu) = cpu else { return };
    let mut set = CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = sched_setaffinity(pid, &set);
    }
}

/// The calling thread's CPU mask, restored when dropped.
struct PinGuard(Option<CpuSet>);

impl PinGuard {
    fn pin_self(cpu: Option<usize>) -> Self {
        let old = sched_getaffinity(Pid::from_raw(0)).ok();
        pin(Pid::from_raw(0), cpu);
        PinGuard(old)
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = sched_setaffinity(Pid::from_raw(0), old);
        }
    }
}

fn child_pid(c: &std::process::Child) -> Pid {
    Pid::from_raw(i32::try_from(c.id()).unwrap_or(0))
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

/// Thread ping-pong through one cache line: this thread writes an odd value, a peer thread
/// answers with the next even one. `warmup` round trips first (not recorded).
pub fn spin_floor_into(
    h: &mut Histogram<u64>,
    samples: u64,
    warmup: u64,
    peer_cpu: Option<usize>,
) -> Result<(), String> {
    let line = Arc::new(Line::default());
    let abort = Arc::new(AtomicBool::new(false));
    let total = samples + warmup;
    let (l2, a2) = (line.clone(), abort.clone());
    let peer = std::thread::Builder::new()
        .name("bench-spin-peer".into())
        .spawn(move || {
            pin(Pid::from_raw(0), peer_cpu);
            for i in 0..total {
                if !spin_until(&l2, 2 * i + 1, &a2) {
                    return;
                }
                l2.0.store(2 * i + 2, Ordering::Release);
            }
        })
        .map_err(|e| e.to_string())?;
    let before = h.len();
    for i in 0..total {
        let t = Instant::now();
        line.0.store(2 * i + 1, Ordering::Release);
        if !spin_until(&line, 2 * i + 2, &abort) {
            break;
        }
        if i >= warmup {
            record(h, t.elapsed());
        }
    }
    abort.store(true, Ordering::Relaxed);
    let _ = peer.join();
    if h.len() - before < samples {
        return Err("the spin peer thread stopped answering".into());
    }
    Ok(())
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

/// Mean cost of one system call: a non-blocking read of an empty eventfd.
pub fn syscall_cost(n: u64) -> Result<f64, String> {
    let fd: OwnedFd =
        EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map(OwnedFd::from)
            .map_err(|e| format!("eventfd: {e}"))?;
    let mut b = [0u8; 8];
    let t = Instant::now();
    for _ in 0..n {
        let _ = std::hint::black_box(nix::unistd::read(fd.as_raw_fd(), &mut b));
    }
    Ok(t.elapsed().as_nanos() as f64 / n.max(1) as f64)
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

/// This binary as the far end of a blocking eventfd ping-pong.
struct EventfdPeer {
    ping: OwnedFd,
    pong: OwnedFd,
    child: Reaped,
    /// Round trips done (the watchdog's progress mark) and whether it had to step in.
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    stuck: Arc<AtomicBool>,
    dog: Option<std::thread::JoinHandle<()>>,
}

impl EventfdPeer {
    fn start(exe: &Path, cpu: Option<usize>) -> Result<Self, String> {
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
        pin(child_pid(&child), cpu);
        // A watchdog unblocks our read if the peer stops answering while we wait.
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let stuck = Arc::new(AtomicBool::new(false));
        let pong_dog = pong.try_clone().map_err(|e| e.to_string())?;
        let (d2, st2, s2) = (done.clone(), stop.clone(), stuck.clone());
        let dog = std::thread::Builder::new()
            .name("bench-efd-watchdog".into())
            .spawn(move || {
                let mut last = (u64::MAX, Instant::now());
                while !st2.load(Ordering::Acquire) {
                    let now = d2.load(Ordering::Acquire);
                    if now != last.0 {
                        last = (now, Instant::now());
                    } else if last.1.elapsed() > STUCK {
                        s2.store(true, Ordering::Release);
                        let _ = efd_write(&pong_dog, 1);
                        last.1 = Instant::now();
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(EventfdPeer {
            ping,
            pong,
            child: Reaped(Some(child)),
            done,
            stop,
            stuck,
            dog: Some(dog),
        })
    }

    fn chunk(&mut self, h: &mut Histogram<u64>, samples: u64, warmup: u64) -> Result<(), String> {
        for i in 0..samples + warmup {
            let t = Instant::now();
            efd_write(&self.ping, 1)?;
            efd_read(&self.pong)?;
            let el = t.elapsed();
            self.done.fetch_add(1, Ordering::Release);
            if self.stuck.load(Ordering::Acquire) {
                return Err("the eventfd peer stopped answering".into());
            }
            if i >= warmup {
                record(h, el);
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(), String> {
        self.stop.store(true, Ordering::Release);
        if let Some(d) = self.dog.take() {
            let _ = d.join();
        }
        let _ = efd_write(&self.ping, STOP);
        let status = self.child.finish(Duration::from_secs(5));
        if status.is_some_and(|s| s.success()) {
            Ok(())
        } else {
            Err(format!("the eventfd peer exited with {status:?}"))
        }
    }
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

/// Times configuration reads straight into the engine (no hypervisor in the way, so the
/// device-model path is all that is measured).
fn measure_into(
    e: &mut Engine<SimBackend>,
    f: Sbdf,
    h: &mut Histogram<u64>,
    samples: u64,
    warmup: u64,
) -> Result<(), String> {
    let req = Ioreq::pci_config(f.to_xen(), 0, Dir::Read, 4, 0);
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
            record(h, el);
        }
    }
    Ok(())
}

/// The same function served inside the engine.
fn inprocess(samples: u64) -> Result<Lat, String> {
    let f: Sbdf = FUNCTION.parse().map_err(|e| format!("{e}"))?;
    let spec = crate::models::FunctionSpec::endpoint(0x1af4, 0x1337, 0xff0000);
    let local = crate::models::EmulatedModel::new("local")
        .with_function(crate::models::Placement::Bdf(f.to_xen()), &spec);
    let mut e = engine(vec![Box::new(local)])?;
    let mut h = histogram()?;
    measure_into(&mut e, f, &mut h, samples, samples / 10)?;
    Ok(lat(&h))
}

/// An engine with one `ioreq-mux dm` child connected through a device-model socket.
struct Dm {
    e: Engine<SimBackend>,
    sock: Option<DmSocket>,
    child: Reaped,
    f: Sbdf,
    _dir: TempDir,
}

impl Dm {
    fn start(
        exe: &Path,
        label: &str,
        mux_spin: Duration,
        dm_spin_us: u64,
        cpu: Option<usize>,
    ) -> Result<Self, String> {
        Self::start_with(exe, label, (mux_spin, SpinMode::Fixed), dm_spin_us, cpu)
    }

    /// [`Self::start`] with the engine's spin mode; the device model gets the same one.
    fn start_with(
        exe: &Path,
        label: &str,
        (mux_spin, mode): (Duration, SpinMode),
        dm_spin_us: u64,
        cpu: Option<usize>,
    ) -> Result<Self, String> {
        let f: Sbdf = FUNCTION.parse().map_err(|e| format!("{e}"))?;
        let mut e = engine(vec![])?;
        let dir = TempDir::new(label).map_err(|e| e.to_string())?;
        let path = dir.0.join("dm.sock");
        let policy = Policy {
            name: "ep".into(),
            uid: None,
            deadline: None,
            grant: Grant {
                ranges: vec![IoRange::pci(f.to_xen())],
                positions: vec![],
                ..Grant::default()
            },
        };
        let opts = ServerOptions {
            remote: RemoteOptions {
                spin: mux_spin,
                spin_mode: mode,
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
            .env(
                SPIN_ENV,
                if mode == SpinMode::Fixed {
                    "fixed"
                } else {
                    "adaptive"
                },
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", exe.display()))?;
        pin(child_pid(&child), cpu);
        let mut dm = Dm {
            e,
            sock: Some(sock),
            child: Reaped(Some(child)),
            f,
            _dir: dir,
        };
        let t = Instant::now();
        while dm
            .e
            .router()
            .config_owner(f)
            .filter(|o| *o != MUX)
            .is_none()
            || !dm
                .sock
                .as_ref()
                .is_some_and(|s| s.servers().iter().any(|s| s.enabled))
        {
            if t.elapsed() > Duration::from_secs(20) {
                return Err("the device model did not connect within 20 s".into());
            }
            if let Ok(Some(s)) = dm.child.0.as_mut().map_or(Ok(None), |c| c.try_wait()) {
                return Err(format!("the device model exited early: {s}"));
            }
            dm.e.poll(Some(Duration::from_millis(1)))
                .map_err(|e| e.to_string())?;
        }
        Ok(dm)
    }

    fn chunk(&mut self, h: &mut Histogram<u64>, samples: u64, warmup: u64) -> Result<(), String> {
        measure_into(&mut self.e, self.f, h, samples, warmup)
    }

    fn stats(&self) -> RemoteStats {
        self.sock
            .as_ref()
            .and_then(|s| s.servers().first().map(|s| s.stats))
            .unwrap_or_default()
    }

    fn finish(mut self) -> Result<(), String> {
        if let Some(s) = self.sock.take() {
            s.stop();
        }
        let status = self.child.finish(Duration::from_secs(5));
        if status.is_some_and(|s| s.success()) {
            Ok(())
        } else {
            Err(format!("the device model exited with {status:?}"))
        }
    }
}

/// Blocking round trips and the eventfd floor in alternating chunks, the engine's thread on
/// CPU `mine` and the peers on `theirs`.
fn blocking(
    e: &Effort,
    exe: &Path,
    mine: Option<usize>,
    theirs: Option<usize>,
) -> Result<(Lat, Lat, RemoteStats), String> {
    let chunks = e.oop_chunks.max(1);
    let per = |n: u64| (n / chunks).max(1);
    let (mut efd_h, mut block_h) = (histogram()?, histogram()?);
    let _pinned = PinGuard::pin_self(mine);
    let mut peer = EventfdPeer::start(exe, theirs)?;
    let mut dm = Dm::start(exe, "block", Duration::ZERO, 0, theirs)?;
    dm.chunk(&mut block_h, 0, 500)?;
    peer.chunk(&mut efd_h, 0, 500)?;
    let r = (0..chunks).try_for_each(|_| {
        peer.chunk(&mut efd_h, per(e.eventfd_samples), 50)?;
        dm.chunk(&mut block_h, per(e.block_samples), 50)
    });
    let st = dm.stats();
    let (a, b) = (dm.finish(), peer.finish());
    r.and(a).and(b)?;
    Ok((lat(&efd_h), lat(&block_h), st))
}

pub fn run(e: &Effort, exe: &Path) -> Result<Oop, String> {
    let want = |p: Part| e.oop_parts.is_empty() || e.oop_parts.contains(&p);
    let pair = cpu_pair();
    let syscall_ns = syscall_cost(100_000)?;
    progress(&format!(
        "one system call (empty eventfd read): {syscall_ns:.0} ns"
    ));
    let local = if want(Part::Inprocess) {
        inprocess(e.poll_samples)?
    } else {
        NO_LAT
    };
    let polled = if want(Part::Poll) {
        busy_polling(e, exe, pair)?
    } else {
        Polled::default()
    };
    let blocked = if want(Part::Block) {
        blocking_both(e, exe, pair)?
    } else {
        Blocked::default()
    };
    let dflt = if want(Part::Default) {
        defaults(e, exe, pair)?
    } else {
        NO_LAT
    };
    let none = || Pressure {
        unloaded: NO_LAT,
        loaded: NO_LAT,
        loaded_waits: (0, 0),
    };
    let (ad, fx, hogs) = if want(Part::Loaded) {
        loaded(e, exe)?
    } else {
        (none(), none(), 0)
    };
    for (name, p) in [("adaptive", &ad), ("fixed", &fx)] {
        progress(&format!(
            "defaults, {name} spin, unloaded / with {hogs} busy loops: p50 {} / {} ns, p99 {} / {} ns (loaded: spun {}, blocked {})",
            p.unloaded.p50_ns,
            p.loaded.p50_ns,
            p.unloaded.p99_ns,
            p.loaded.p99_ns,
            p.loaded_waits.0,
            p.loaded_waits.1
        ));
    }
    let measured = Measured {
        pair,
        chunks: e.oop_chunks.max(1),
        syscall_ns,
        local,
        polled,
        blocked,
        dflt,
        ad,
        fx,
        hogs,
    };
    Ok(measured.report())
}

/// Busy-polling round trips and the cache-line floor they are compared with.
#[derive(Debug, Clone, Copy)]
struct Polled {
    spin: Lat,
    poll: Lat,
    stats: RemoteStats,
}

impl Default for Polled {
    fn default() -> Self {
        Polled {
            spin: NO_LAT,
            poll: NO_LAT,
            stats: RemoteStats::default(),
        }
    }
}

/// Busy-polling: the engine spins up to 500 ms, the device model 1 ms after each request.
/// Between chunks the model goes to sleep while the floor runs; a short warm-up wakes it.
/// The floor's warm-up outlasts the model's 1 ms of spinning after the last request.
fn busy_polling(e: &Effort, exe: &Path, pair: Option<(usize, usize)>) -> Result<Polled, String> {
    let chunks = e.oop_chunks.max(1);
    let per = |n: u64| (n / chunks).max(1);
    let (me, them) = (pair.map(|p| p.0), pair.map(|p| p.1));
    let (mut spin_h, mut poll_h) = (histogram()?, histogram()?);
    let _pinned = PinGuard::pin_self(me);
    let mut dm = Dm::start(exe, "poll", Duration::from_millis(500), 1000, them)?;
    dm.chunk(&mut poll_h, 0, 2000)?;
    for _ in 0..chunks {
        spin_floor_into(&mut spin_h, per(e.spin_samples), 20_000, them)?;
        dm.chunk(&mut poll_h, per(e.poll_samples), 200)?;
    }
    let stats = dm.stats();
    dm.finish()?;
    let (spin, poll) = (lat(&spin_h), lat(&poll_h));
    progress(&format!(
        "busy-polling: p50 {} ns, p99 {} ns (spun {}, blocked {}); cache-line floor p50 {} ns, p99 {} ns",
        poll.p50_ns, poll.p99_ns, stats.spun, stats.blocked, spin.p50_ns, spin.p99_ns
    ));
    Ok(Polled { spin, poll, stats })
}

/// Blocking round trips and the eventfd floor, on one CPU and on two.
#[derive(Debug, Clone, Copy)]
struct Blocked {
    efd: Lat,
    block: Lat,
    stats: RemoteStats,
    efd_two_cpus: Lat,
    block_two_cpus: Lat,
}

impl Default for Blocked {
    fn default() -> Self {
        Blocked {
            efd: NO_LAT,
            block: NO_LAT,
            stats: RemoteStats::default(),
            efd_two_cpus: NO_LAT,
            block_two_cpus: NO_LAT,
        }
    }
}

/// Blocking: both sleep on their eventfds; the floor's peer sleeps between its chunks.
/// Everything on one CPU (the figures the targets use), then engine and peers on two.
fn blocking_both(e: &Effort, exe: &Path, pair: Option<(usize, usize)>) -> Result<Blocked, String> {
    let (me, them) = (pair.map(|p| p.0), pair.map(|p| p.1));
    let (efd, block, stats) = blocking(e, exe, me, me)?;
    progress(&format!(
        "blocking, one CPU: p50 {} ns, p99 {} ns (spun {}, blocked {}); eventfd floor p50 {} ns, p99 {} ns",
        block.p50_ns, block.p99_ns, stats.spun, stats.blocked, efd.p50_ns, efd.p99_ns
    ));
    let mut b = Blocked {
        efd,
        block,
        stats,
        efd_two_cpus: NO_LAT,
        block_two_cpus: NO_LAT,
    };
    if pair.is_some() {
        let (f, k, _) = blocking(e, exe, me, them)?;
        (b.efd_two_cpus, b.block_two_cpus) = (f, k);
        progress(&format!(
            "blocking, two CPUs: p50 {} ns, p99 {} ns; eventfd floor p50 {} ns, p99 {} ns",
            k.p50_ns, k.p99_ns, f.p50_ns, f.p99_ns
        ));
    }
    Ok(b)
}

/// The default settings: the engine's default spin, the model sleeping.
fn defaults(e: &Effort, exe: &Path, pair: Option<(usize, usize)>) -> Result<Lat, String> {
    let def = RemoteOptions::default();
    let mut h = histogram()?;
    let _pinned = PinGuard::pin_self(pair.map(|p| p.0));
    let mut dm = Dm::start_with(
        exe,
        "default",
        (def.spin, def.spin_mode),
        0,
        pair.map(|p| p.1),
    )?;
    dm.chunk(&mut h, e.block_samples, 1000)?;
    dm.finish()?;
    let dflt = lat(&h);
    progress(&format!(
        "defaults (engine spins up to {:?}, {:?}, model sleeps): p50 {} ns, p99 {} ns",
        def.spin, def.spin_mode, dflt.p50_ns, dflt.p99_ns
    ));
    Ok(dflt)
}

/// Everything the section measured, before it becomes the report.
struct Measured {
    pair: Option<(usize, usize)>,
    chunks: u64,
    syscall_ns: f64,
    local: Lat,
    polled: Polled,
    blocked: Blocked,
    dflt: Lat,
    ad: Pressure,
    fx: Pressure,
    hogs: usize,
}

impl Measured {
    fn report(self) -> Oop {
        let Measured {
            pair,
            chunks,
            syscall_ns,
            local,
            polled:
                Polled {
                    spin,
                    poll,
                    stats: ps,
                },
            blocked: b,
            dflt,
            ad,
            fx,
            hogs,
        } = self;
        Oop {
            poll_p50_ns: poll.p50_ns,
            poll_p99_ns: poll.p99_ns,
            block_p50_ns: b.block.p50_ns,
            block_p99_ns: b.block.p99_ns,
            spin_floor_ns: spin.p50_ns,
            eventfd_floor_ns: b.efd.p50_ns,
            poll_vs_floor: poll.p50_ns as f64 / spin.p50_ns.max(1) as f64,
            block_vs_floor: b.block.p50_ns as f64 / b.efd.p50_ns.max(1) as f64,
            default_p50_ns: dflt.p50_ns,
            default_p99_ns: dflt.p99_ns,
            inprocess_p50_ns: local.p50_ns,
            unloaded_p50_ns: ad.unloaded.p50_ns,
            unloaded_p99_ns: ad.unloaded.p99_ns,
            loaded_p50_ns: ad.loaded.p50_ns,
            loaded_p99_ns: ad.loaded.p99_ns,
            loaded_vs_unloaded_p50: ratio(ad.loaded.p50_ns, ad.unloaded.p50_ns),
            loaded_vs_unloaded_p99: ratio(ad.loaded.p99_ns, ad.unloaded.p99_ns),
            fixed_loaded_vs_unloaded_p50: ratio(fx.loaded.p50_ns, fx.unloaded.p50_ns),
            fixed_loaded_vs_unloaded_p99: ratio(fx.loaded.p99_ns, fx.unloaded.p99_ns),
            syscall_ns,
            detail: OopDetail {
                cpus: pair,
                spin_floor: spin,
                eventfd_floor: b.efd,
                poll,
                block: b.block,
                eventfd_floor_two_cpus: b.efd_two_cpus,
                block_two_cpus: b.block_two_cpus,
                default: dflt,
                inprocess: local,
                unloaded: ad.unloaded,
                loaded: ad.loaded,
                fixed_unloaded: fx.unloaded,
                fixed_loaded: fx.loaded,
                hogs,
                loaded_waits: ad.loaded_waits,
                fixed_loaded_waits: fx.loaded_waits,
                chunks,
                poll_spun: ps.spun,
                poll_blocked: ps.blocked,
                block_spun: b.stats.spun,
                block_blocked: b.stats.blocked,
            },
        }
    }
}

/// Longest the busy loops run, whatever happens to the bench: a loaded chunk takes well
/// under a second, so this only matters if the bench is stuck or its guard was leaked.
const HOG_LIMIT: Duration = Duration::from_secs(20);

/// Longest one loaded or unloaded chunk measures: under the fixed spin policy a loaded
/// round trip can take milliseconds, and the quick run must stay under a minute.
const LOADED_CHUNK_LIMIT: Duration = Duration::from_secs(2);

/// Busy-loop threads, one pinned to each CPU allowed, running until dropped (or for
/// [`HOG_LIMIT`] at most).
struct Hogs {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Hogs {
    /// The CPUs this process may use (one hog each); empty if the mask cannot be read.
    fn cpus() -> Vec<usize> {
        sched_getaffinity(Pid::from_raw(0))
            .map(|set| {
                (0..CpuSet::count())
                    .filter(|&i| set.is_set(i).unwrap_or(false))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn start(cpus: &[usize]) -> Result<Self, String> {
        let mut h = Hogs {
            stop: Arc::new(AtomicBool::new(false)),
            threads: vec![],
        };
        for &cpu in cpus {
            let stop = h.stop.clone();
            let t = std::thread::Builder::new()
                .name(format!("bench-hog-{cpu}"))
                .spawn(move || hog(cpu, &stop))
                .map_err(|e| format!("busy-loop thread: {e}"))?; // `h` stops those started
            h.threads.push(t);
        }
        Ok(h)
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One busy loop on `cpu` until `stop` or [`HOG_LIMIT`].
fn hog(cpu: usize, stop: &AtomicBool) {
    pin(Pid::from_raw(0), Some(cpu));
    let t = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n = std::hint::black_box(n.wrapping_add(1));
        if n % (1 << 16) == 0 && t.elapsed() > HOG_LIMIT {
            return;
        }
    }
}

/// Like [`measure_into`], but stops after [`LOADED_CHUNK_LIMIT`].
fn measure_for(dm: &mut Dm, h: &mut Histogram<u64>, samples: u64) -> Result<(), String> {
    let req = Ioreq::pci_config(dm.f.to_xen(), 0, Dir::Read, 4, 0);
    let t0 = Instant::now();
    for i in 0..samples {
        let t = Instant::now();
        let v = dm.e.handle(0, &req);
        record(h, t.elapsed());
        if v != VENDOR_DEVICE {
            return Err(format!(
                "round trip {i} read {v:#x}, not {VENDOR_DEVICE:#x}"
            ));
        }
        if t0.elapsed() > LOADED_CHUNK_LIMIT {
            break;
        }
    }
    Ok(())
}

/// What one spin mode measured under CPU pressure.
struct Pressure {
    unloaded: Lat,
    loaded: Lat,
    /// The engine's waits in the loaded chunks: (answered spinning, after blocking).
    loaded_waits: (u64, u64),
}

/// The default settings (the engine's default spin, the model sleeping), adaptive and
/// fixed, each without and with one busy loop per CPU, in alternating chunks so that all
/// four see the same machine. Nothing is pinned but the busy loops: the scheduler places
/// the engine and the model, as it would in a dom0.
fn loaded(e: &Effort, exe: &Path) -> Result<(Pressure, Pressure, usize), String> {
    let cpus = Hogs::cpus();
    let spin = RemoteOptions::default().spin;
    let mut dms = [
        Dm::start_with(exe, "adaptive", (spin, SpinMode::Adaptive), 0, None)?,
        Dm::start_with(exe, "fixed", (spin, SpinMode::Fixed), 0, None)?,
    ];
    let mut h: Vec<[Histogram<u64>; 2]> = (0..2)
        .map(|_| Ok([histogram()?, histogram()?]))
        .collect::<Result<_, String>>()?;
    let per = (e.loaded_samples / e.oop_chunks.max(1)).max(1);
    let mut waits = [(0u64, 0u64); 2];
    for dm in &mut dms {
        dm.chunk(&mut histogram()?, 0, 1000)?; // warm-up
    }
    for _ in 0..e.oop_chunks.max(1) {
        for (i, dm) in dms.iter_mut().enumerate() {
            measure_for(dm, &mut h[i][0], per)?;
        }
        let _hogs = Hogs::start(&cpus)?;
        for (i, dm) in dms.iter_mut().enumerate() {
            let before = dm.stats();
            measure_for(dm, &mut h[i][1], per)?;
            let st = dm.stats();
            waits[i].0 += st.spun - before.spun;
            waits[i].1 += st.blocked - before.blocked;
        }
    }
    let [a, f] = dms;
    let (ra, rf) = (a.finish(), f.finish());
    ra.and(rf)?;
    let p = |i: usize| Pressure {
        unloaded: lat(&h[i][0]),
        loaded: lat(&h[i][1]),
        loaded_waits: waits[i],
    };
    Ok((p(0), p(1), cpus.len()))
}

fn ratio(a: u64, b: u64) -> f64 {
    a as f64 / b.max(1) as f64
}
