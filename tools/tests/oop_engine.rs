//! Device models in their own processes, end to end: a scripted guest on the simulated
//! hypervisor, the engine, the device-model socket, and `ioreq-mux dm` child processes
//! serving a PCIe endpoint. Checks that config, extended config and BAR accesses reach the
//! model; then stops it (deadline), lets it reconnect, kills it mid-stream, and checks that
//! every access still completes in bounded time (all ones), claims are released, a new
//! process can claim again, and the simulated hypervisor's invariants hold.
#![allow(clippy::unwrap_used)]

use bdf_router::Sbdf;
use chipset_intercept::Chipset;
use ioreq_mux::dm_socket::{DmSocket, Policy};
use ioreq_mux::engine::{Engine, EngineConfig, Grant, MUX};
use ioreq_server::bufioreq::BufioreqMode;
use ioreq_server::oop::{RemoteOptions, ServerOptions};
use ioreq_server::sim::{Issued, SimBackend, SimHypervisor};
use ioreq_server::{Dir, IoRange, Ioreq, IoreqType};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_millis(300);

fn bdf(t: &str) -> Sbdf {
    t.parse().unwrap()
}

/// A `ioreq-mux dm` child; killed on drop so a failing test leaves no process behind.
struct Dm {
    child: Option<Child>,
}

impl Dm {
    fn spawn(socket: &Path, server: &str, at: &str, device: &str, extra: &[&str]) -> Dm {
        let mut args = vec![
            "dm",
            "--socket",
            socket.to_str().unwrap(),
            "--server",
            server,
            "--at",
            at,
            "--vendor",
            "0x1af4",
            "--device",
            device,
            "--class",
            "0x020000",
            "--bar",
            "mem32:0x1000",
            "--bar",
            "io:0x20",
            "--serial",
            "0x1122334455667788",
        ];
        args.extend_from_slice(extra);
        let child = Command::new(env!("CARGO_BIN_EXE_ioreq-mux"))
            .args(&args)
            .env("IOREQ_MUX_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Dm { child: Some(child) }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    fn signal(&self, s: Signal) {
        kill(self.pid(), s).unwrap();
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().unwrap().try_wait().unwrap()
    }
}

impl Drop for Dm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The guest, the engine and the socket.
struct Rig {
    hv: SimHypervisor,
    engine: Engine<SimBackend>,
    sock: DmSocket,
    path: PathBuf,
}

impl Rig {
    fn new(tag: &str, policies: Vec<Policy>) -> Rig {
        let hv = SimHypervisor::new(2, Duration::from_secs(5));
        let backend = hv.create_server(BufioreqMode::Atomic).unwrap();
        let cfg = EngineConfig {
            chipset: Some(Chipset::Unknown),
            ..Default::default()
        };
        let mut engine = Engine::new(backend, vec![], &cfg).unwrap();
        engine.backend().set_enabled(true).unwrap();
        let dir = std::env::temp_dir().join(format!("ioreq-mux-oop-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dm.sock");
        let opts = ServerOptions {
            remote: RemoteOptions {
                deadline: DEADLINE,
                ..Default::default()
            },
            op_timeout: Duration::from_secs(2),
            ..Default::default()
        };
        let sock = DmSocket::start(&path, policies, engine.control(), hv.nr_vcpus(), opts).unwrap();
        Rig {
            hv,
            engine,
            sock,
            path,
        }
    }

    /// Polls the engine (it applies control messages at the start of each poll) until `f`.
    fn until(&mut self, what: &str, mut f: impl FnMut(&mut Rig) -> bool) {
        let t = Instant::now();
        while !f(self) {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "timed out waiting for {what}"
            );
            self.engine.poll(Some(Duration::from_millis(1))).unwrap();
        }
    }

    fn owner(&self, sbdf: Sbdf) -> Option<u16> {
        self.engine
            .router()
            .config_owner(sbdf)
            .filter(|o| *o != MUX)
    }

    /// Waits for a dm process to exit, polling the engine meanwhile.
    fn wait_exit(&mut self, mut dm: Dm) -> ExitStatus {
        let mut st = None;
        self.until("the dm process to exit", |_| {
            st = dm.try_wait();
            st.is_some()
        });
        dm.child = None;
        st.unwrap()
    }

    /// Waits for `server` to be enabled and to own `sbdf`; returns its engine index.
    fn ready(&mut self, server: &str, sbdf: Sbdf) -> u16 {
        let mut idx = None;
        self.until(&format!("{server} to be ready"), |r| {
            let st = r.sock.servers();
            idx = st
                .iter()
                .find(|s| s.enabled && s.name.as_deref() == Some(server))
                .and_then(|s| s.id);
            idx.is_some() && r.owner(sbdf) == idx
        });
        idx.unwrap()
    }

    /// One guest access on vCPU 0 through hypervisor -> engine -> model; (value, time).
    fn access(&mut self, req: Ioreq) -> (u64, Duration) {
        let t = Instant::now();
        let v = match self.hv.issue(0, &req, false).unwrap() {
            Issued::Done(v) => v,
            Issued::Pending => {
                self.engine.poll(Some(Duration::ZERO)).unwrap();
                self.hv
                    .collect(0)
                    .unwrap()
                    .expect("the engine completed the access")
            }
        };
        (v, t.elapsed())
    }

    fn out(&mut self, port: u16, size: u32, v: u64) {
        self.access(Ioreq::new(IoreqType::Pio, Dir::Write, port.into(), size, v));
    }

    fn inp(&mut self, port: u16, size: u32) -> u64 {
        self.access(Ioreq::new(IoreqType::Pio, Dir::Read, port.into(), size, 0))
            .0
    }

    fn cf8(sbdf: Sbdf, reg: u16) -> u64 {
        0x8000_0000 | (u64::from(sbdf.bdf()) << 8) | u64::from(reg & 0xfc)
    }

    fn cfg_read(&mut self, sbdf: Sbdf, reg: u16, size: u32) -> u64 {
        self.out(0xcf8, 4, Self::cf8(sbdf, reg));
        self.inp(0xcfc + (reg & 3), size)
    }

    fn cfg_write(&mut self, sbdf: Sbdf, reg: u16, size: u32, v: u64) {
        self.out(0xcf8, 4, Self::cf8(sbdf, reg));
        self.out(0xcfc + (reg & 3), size, v);
    }

    /// Extended config space (no ECAM window without a chipset): a PCI_CONFIG ioreq as Xen
    /// would deliver one, straight to the engine.
    fn ext_read(&mut self, sbdf: Sbdf, reg: u32) -> u64 {
        self.engine
            .handle(0, &Ioreq::pci_config(sbdf.to_xen(), reg, Dir::Read, 4, 0))
    }

    fn mmio_read(&mut self, addr: u64) -> (u64, Duration) {
        self.access(Ioreq::new(IoreqType::Copy, Dir::Read, addr, 4, 0))
    }

    fn mmio_write(&mut self, addr: u64, v: u64) {
        self.access(Ioreq::new(IoreqType::Copy, Dir::Write, addr, 4, v));
    }

    /// Firmware: size BAR0, place BAR0 at `mem` and BAR1 at `io`, enable decoding.
    fn program_bars(&mut self, f: Sbdf, mem: u32, io: u16) {
        self.cfg_write(f, 0x10, 4, 0xffff_ffff);
        assert_eq!(
            self.cfg_read(f, 0x10, 4),
            0xffff_f000,
            "BAR0 sizes as 4 KiB"
        );
        self.cfg_write(f, 0x14, 4, 0xffff_ffff);
        assert_eq!(
            self.cfg_read(f, 0x14, 4),
            0xffff_ffe1,
            "BAR1 sizes as 32 ports"
        );
        self.cfg_write(f, 0x10, 4, mem.into());
        self.cfg_write(f, 0x14, 4, io.into());
        self.cfg_write(f, 0x04, 2, 0x3);
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.path.parent().unwrap());
    }
}

fn policy(name: &str, bdf: &str) -> Policy {
    Policy {
        name: name.into(),
        uid: None,
        deadline: None,
        grant: Grant {
            ranges: vec![
                IoRange::pci(bdf.parse::<Sbdf>().unwrap().to_xen()),
                IoRange::mmio(0xe000_0000, 0x1000_0000),
                IoRange::ports(0xc000, 0xcfff),
            ],
            positions: vec![],
            ..Grant::default()
        },
    }
}

/// Config, extended config and BAR accesses reach the out-of-process endpoint.
fn check_endpoint(r: &mut Rig, f: Sbdf, device: u64) {
    assert_eq!(r.cfg_read(f, 0, 4), (device << 16) | 0x1af4);
    assert_eq!(r.cfg_read(f, 0x08, 4) >> 8, 0x020000, "class");
    assert_eq!(r.cfg_read(f, 0x34, 1), 0x40, "capability pointer");
    assert_eq!(r.cfg_read(f, 0x40, 1), 0x10, "PCI Express capability");
    assert_eq!(
        r.ext_read(f, 0x100),
        0x1401_0003,
        "DSN extended capability, next: AER at 0x140"
    );
    assert_eq!(
        r.ext_read(f, 0x140),
        0x0002_0001,
        "AER, version 2, the last one"
    );
    assert_eq!(r.ext_read(f, 0x104), 0x5566_7788);
    assert_eq!(r.ext_read(f, 0x108), 0x1122_3344);
    r.program_bars(f, 0xe000_0000, 0xc000);
    assert_eq!(r.mmio_read(0xe000_0010).0, 0xcafe_0010);
    r.mmio_write(0xe000_0010, 0x1234_5678);
    assert_eq!(r.mmio_read(0xe000_0010).0, 0x1234_5678);
    assert_eq!(r.inp(0xc004, 2), 0xc004);
    let owner = r.owner(f);
    assert_eq!(
        r.engine.router().mmio_owner(0xe000_0000, 0xe000_0fff),
        owner
    );
    assert_eq!(r.engine.router().port_owner(0xc000, 0xc01f), owner);
}

#[test]
fn out_of_process_endpoint_survives_hangs_crashes_and_reconnects() {
    let f = bdf("00:05.0");
    let mut r = Rig::new("faults", vec![policy("ep", "00:05.0")]);

    // 1. A dm process that reconnects by itself.
    let dm = Dm::spawn(
        &r.path,
        "ep",
        "00:05.0",
        "0x1337",
        &["--reconnect-ms", "20"],
    );
    let first = r.ready("ep", f);
    check_endpoint(&mut r, f, 0x1337);
    // A BAR placed outside the grant is refused to the model: it does not decode.
    r.cfg_write(f, 0x10, 4, 0xd000_0000);
    assert_eq!(r.engine.router().mmio_owner(0xd000_0000, 0xd000_0fff), None);
    assert_eq!(r.mmio_read(0xd000_0000).0, 0xffff_ffff);
    r.cfg_write(f, 0x10, 4, 0xe000_0000);
    assert_eq!(r.mmio_read(0xe000_0010).0, 0x1234_5678);

    // 2. It hangs (SIGSTOP): the access completes as a master abort at the deadline, the
    // model is dropped and its claims released.
    dm.signal(Signal::SIGSTOP);
    let (v, took) = r.mmio_read(0xe000_0010);
    assert_eq!(v, 0xffff_ffff);
    assert!(took >= DEADLINE && took < DEADLINE * 3, "took {took:?}");
    let errors = r.engine.stats().dm_errors;
    assert!(errors >= 1);
    r.until("the hung model's claims to go", |r| r.owner(f).is_none());
    assert_eq!(r.engine.router().mmio_owner(0xe000_0000, 0xe000_0fff), None);
    let (v, took) = r.mmio_read(0xe000_0010);
    assert_eq!(v, 0xffff_ffff, "nobody owns the BAR now");
    assert!(
        took < DEADLINE / 2,
        "no waiting on a removed model: {took:?}"
    );
    assert_eq!(r.cfg_read(f, 0, 4), 0xffff_ffff);

    // 3. It resumes, sees it was dropped, reconnects and claims again (a fresh device).
    dm.signal(Signal::SIGCONT);
    let second = r.ready("ep", f);
    assert_ne!(first, second);
    assert_eq!(r.cfg_read(f, 0, 4), 0x1337_1af4);
    assert_eq!(r.cfg_read(f, 0x10, 4), 0, "the new model starts from reset");
    r.program_bars(f, 0xe000_0000, 0xc000);
    assert_eq!(r.mmio_read(0xe000_0010).0, 0xcafe_0010);

    // 4. Killed mid-stream: every access still completes, promptly, then as a master abort.
    let pid = dm.pid();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        kill(pid, Signal::SIGKILL).unwrap();
    });
    let t = Instant::now();
    let mut answered = 0;
    let mut aborted = 0;
    let mut worst = Duration::ZERO;
    while t.elapsed() < Duration::from_secs(3) && aborted < 200 {
        let (v, took) = r.mmio_read(0xe000_0010);
        worst = worst.max(took);
        match v {
            0xcafe_0010 => {
                assert_eq!(aborted, 0, "an answer after the model died");
                answered += 1;
            }
            0xffff_ffff => aborted += 1,
            other => panic!("unexpected value {other:#x}"),
        }
    }
    killer.join().unwrap();
    assert!(
        answered > 0 && aborted >= 200,
        "{answered} answered, {aborted} aborted"
    );
    assert!(
        worst < DEADLINE,
        "a crash is noticed at once, not at the deadline: {worst:?}"
    );
    assert!(!r.wait_exit(dm).success());
    // The engine drops the model as soon as a request fails, and the socket's thread notices
    // the hang-up on its own: wait for both.
    r.until(
        "the dead model's claims to go and its connection to close",
        |r| r.owner(f).is_none() && r.sock.servers().is_empty(),
    );

    // 5. A new process claims again; SIGTERM stops it cleanly (exit 0, claims released).
    let dm = Dm::spawn(&r.path, "ep", "00:05.0", "0x1338", &[]);
    let third = r.ready("ep", f);
    assert!(third > second);
    check_endpoint(&mut r, f, 0x1338);
    dm.signal(Signal::SIGTERM);
    let st = r.wait_exit(dm);
    assert!(st.success(), "{st:?}");
    r.until("the stopped model's claims to go", |r| r.owner(f).is_none());

    // Nothing lost or completed twice; no vCPU left waiting.
    let stats = r.hv.check().unwrap();
    assert_eq!(stats.completed, stats.sent);
}

/// Two device-model processes: each sees only its own accesses; one that claims a function
/// outside its grant is refused and exits 1 without claiming anything.
#[test]
fn servers_are_isolated_and_held_to_their_grants() {
    let (a, b) = (bdf("00:05.0"), bdf("00:06.0"));
    let mut r = Rig::new(
        "grants",
        vec![policy("a", "00:05.0"), policy("b", "00:06.0")],
    );
    let _da = Dm::spawn(&r.path, "a", "00:05.0", "0xaaaa", &[]);
    let ia = r.ready("a", a);
    // "b" asks for a's function: refused (EPERM), the process gives up.
    let bad = Dm::spawn(&r.path, "b", "00:05.0", "0xbbbb", &["--reconnect-ms", "10"]);
    let st = r.wait_exit(bad);
    assert_eq!(st.code(), Some(1), "{st:?}");
    assert_eq!(r.owner(a), Some(ia));
    assert_eq!(r.owner(b), None);
    let _db = Dm::spawn(&r.path, "b", "00:06.0", "0xbbbb", &[]);
    let ib = r.ready("b", b);
    assert_ne!(ia, ib);
    for _ in 0..20 {
        assert_eq!(r.cfg_read(a, 0, 4), 0xaaaa_1af4);
        assert_eq!(r.cfg_read(b, 0, 4), 0xbbbb_1af4);
    }
    let served: Vec<(Option<String>, u64)> = r
        .sock
        .servers()
        .into_iter()
        .map(|s| (s.name, s.stats.requests))
        .collect();
    assert_eq!(served.len(), 2);
    assert!(served.iter().all(|(_, n)| *n >= 20), "{served:?}");
    r.hv.check().unwrap();
}

/// An MSI a process model injects travels the whole way: the socket, the listener, the
/// engine's control channel, the engine's backend, and the simulated hypervisor records it
/// as the engine's server's. The model claims nothing: no grant is needed.
#[test]
fn an_out_of_process_msi_reaches_the_hypervisor() {
    use ioreq_server::oop::client::Connection;
    let mut r = Rig::new("msi", vec![policy("m", "00:05.0")]);
    // Another server of the domain, so the recorded server id means something.
    let _other = r.hv.create_server(BufioreqMode::Off).unwrap();
    let path = r.path.clone();
    let dm = std::thread::spawn(move || {
        let mut c = Connection::connect(&path).unwrap();
        let (id, _) = c.create("m", BufioreqMode::Off).unwrap();
        c.inject_msi(id, 0xfee0_100c, 0x4071)
    });
    r.until("the MSI", |r| !r.hv.injected_msis().is_empty());
    dm.join().unwrap().unwrap();
    let msis = r.hv.injected_msis();
    assert_eq!(msis.len(), 1);
    assert_eq!(
        (msis[0].server, msis[0].addr, msis[0].data),
        (r.engine.backend().id(), 0xfee0_100c, 0x4071)
    );
    assert_eq!(r.engine.stats().msis_injected, 1);
    r.hv.check().unwrap();
}
