//! The device-model protocol end to end inside one process: the listener and a fake engine
//! on one side, `client::serve` (or a hand-written device model on the raw protocol) on
//! the other, over a real socket, shared memory and eventfds.
#![allow(clippy::unwrap_used)]

mod oop_support;

use ioreq_server::abi::{self, pack_sbdf};
use ioreq_server::bufioreq::BufioreqMode;
use ioreq_server::oop::client::Connection;
use ioreq_server::oop::sys::{Doorbell, wait_readable};
use ioreq_server::oop::wire::{self, Code, Message, Reply};
use ioreq_server::oop::{ClientError, ClientOptions, Ended, Stopper, serve_with};
use ioreq_server::{
    BackendError, Claim, ClaimError, DeviceModel, Dir, DmControl, DmError, IoRange, Ioreq,
    IoreqType, MsiError, Position, RangeKind,
};
use oop_support::{FakeHost, my_uid, opts, start, until};
use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const EP: u32 = pack_sbdf(0, 0, 5, 0);

fn pos() -> Position {
    Position {
        segment: 0,
        root_bus: 0,
        path: vec![2 << 3, 0],
    }
}

fn grant() -> Vec<Claim> {
    vec![
        Claim::Range(IoRange::pci(EP)),
        Claim::Range(IoRange::ports(0x90, 0x9f)),
        Claim::Range(IoRange::mmio(0xa0000, 0x20000)),
        Claim::Range(IoRange::mmio(0xfe00_0000, 0x100_0000)),
        Claim::Position(pos()),
    ]
}

/// A test model: config reads return `0x1234_0000 | reg`; port 0x98 writes claim 4 KiB of
/// MMIO at the written address (a DMOP in the middle of a request); port 0x97 reads say
/// where the claimed position is; port 0x99 reads sleep while `slow` is set; port 0x9a
/// reads busy-wait as many µs as the request's `data` says and answer `data + 1`; port 0x9b
/// writes inject an MSI whose data is the written value (the answers are kept in `msis`);
/// MMIO is a word store.
struct Probe {
    name: String,
    claims: Vec<Claim>,
    slow: Arc<AtomicBool>,
    seen: Arc<AtomicU64>,
    broadcasts: Arc<Mutex<Vec<IoreqType>>>,
    msis: Arc<Mutex<Vec<Result<(), MsiError>>>>,
    mem: HashMap<u64, u64>,
}

/// The Message Address Probe's MSIs go to.
const MSI_ADDR: u64 = 0xfee0_100c;

impl Probe {
    fn new(name: &str, claims: Vec<Claim>) -> Self {
        Probe {
            name: name.into(),
            claims,
            slow: Arc::new(AtomicBool::new(false)),
            seen: Arc::new(AtomicU64::new(0)),
            broadcasts: Arc::new(Mutex::new(vec![])),
            msis: Arc::new(Mutex::new(vec![])),
            mem: HashMap::new(),
        }
    }
}

impl DeviceModel for Probe {
    fn name(&self) -> &str {
        &self.name
    }

    fn attach(&mut self, ctl: &mut dyn DmControl) -> Result<(), ClaimError> {
        ctl.map_all(&self.claims)
    }

    fn handle(&mut self, _vcpu: u32, req: &Ioreq, ctl: &mut dyn DmControl) -> Result<u64, DmError> {
        self.seen.fetch_add(1, Ordering::Relaxed);
        Ok(match (req.ty, req.dir, req.addr) {
            (IoreqType::PciConfig, Dir::Read, a) => 0x1234_0000 | (a & 0xfff),
            (IoreqType::Pio, Dir::Write, 0x98) => {
                ctl.map(Claim::Range(IoRange::mmio(req.data, 0x1000)))
                    .map_err(|e| DmError::Failed {
                        name: self.name.clone(),
                        msg: e.to_string(),
                    })?;
                0
            }
            (IoreqType::Pio, Dir::Read, 0x97) => ctl.locate(&pos()).map_or(0xdead, u64::from),
            (IoreqType::Pio, Dir::Write, 0x9b) => {
                let r = ctl.inject_msi(MSI_ADDR, req.data as u32);
                self.msis.lock().unwrap().push(r);
                0
            }
            (IoreqType::Pio, Dir::Read, 0x99) => {
                while self.slow.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                0x99
            }
            (IoreqType::Pio, Dir::Read, 0x9a) => {
                let t = Instant::now();
                while t.elapsed() < Duration::from_micros(req.data) {
                    std::hint::spin_loop();
                }
                req.data + 1
            }
            (IoreqType::Copy, Dir::Write, a) => {
                self.mem.insert(a, req.data);
                0
            }
            (IoreqType::Copy, Dir::Read, a) => self.mem.get(&a).copied().unwrap_or(0),
            _ => 0,
        })
    }

    fn broadcast(&mut self, req: &Ioreq) -> Result<(), DmError> {
        self.broadcasts.lock().unwrap().push(req.ty);
        Ok(())
    }
}

fn spawn_dm(
    path: std::path::PathBuf,
    mut model: Probe,
    stop: Option<Stopper>,
) -> JoinHandle<Result<Ended, ClientError>> {
    std::thread::spawn(move || {
        let opts = ClientOptions {
            stop,
            ..Default::default()
        };
        serve_with(&path, &mut model, &opts)
    })
}

fn cfg_read(reg: u32) -> Ioreq {
    Ioreq::pci_config(EP, reg, Dir::Read, 4, 0)
}

fn pio(dir: Dir, port: u64, data: u64) -> Ioreq {
    Ioreq::new(IoreqType::Pio, dir, port, 4, data)
}

/// Waits until the listener shows an enabled server and returns its id.
fn enabled_id(l: &ioreq_server::oop::DmListener) -> u16 {
    let mut id = None;
    until("an enabled server", || {
        id = l.servers().iter().find(|s| s.enabled).and_then(|s| s.id);
        id.is_some()
    });
    id.unwrap()
}

#[test]
fn requests_claims_in_request_dmops_and_position_notices() {
    let host = Arc::new(FakeHost::new(2).allow("probe", my_uid(), grant()));
    let l = start(host.clone(), "rt", opts(2000));
    let stop = Stopper::new().unwrap();
    let probe = Probe::new(
        "probe",
        vec![
            Claim::Range(IoRange::pci(EP)),
            Claim::Range(IoRange::ports(0x90, 0x9f)),
            Claim::Position(pos()),
        ],
    );
    let broadcasts = probe.broadcasts.clone();
    let dm = spawn_dm(l.path().to_path_buf(), probe, Some(stop.clone()));
    let id = enabled_id(&l);
    assert_eq!(host.owned(id).len(), 3);

    // Both vCPUs' slots work, and sequence numbers keep them apart.
    for i in 0..50u32 {
        assert_eq!(
            host.call(id, i % 2, &cfg_read(4 * (i % 64))).unwrap(),
            0x1234_0000 | u64::from(4 * (i % 64))
        );
    }
    // A DMOP during a request is applied with the request's ctl.
    host.call(id, 0, &pio(Dir::Write, 0x98, 0xfe00_1000))
        .unwrap();
    assert!(
        host.owned(id)
            .contains(&Claim::Range(IoRange::mmio(0xfe00_1000, 0x1000)))
    );
    // ... and one outside the grant is refused to the model; the write itself completes
    // (a model's failure is a master abort: there is no error channel in an ioreq).
    assert_eq!(
        host.call(id, 0, &pio(Dir::Write, 0x98, 0x1000_0000))
            .unwrap(),
        0
    );
    assert!(
        !host
            .owned(id)
            .contains(&Claim::Range(IoRange::mmio(0x1000_0000, 0x1000)))
    );
    assert_eq!(host.call(id, 1, &cfg_read(0)).unwrap(), 0x1234_0000);
    // Positions: the model learns where its function is before the request that needs it.
    assert_eq!(host.call(id, 0, &pio(Dir::Read, 0x97, 0)).unwrap(), 0xdead);
    host.located
        .lock()
        .unwrap()
        .insert(pos(), pack_sbdf(0, 3, 0, 0));
    assert_eq!(
        host.call(id, 0, &pio(Dir::Read, 0x97, 0)).unwrap(),
        u64::from(pack_sbdf(0, 3, 0, 0))
    );
    host.located
        .lock()
        .unwrap()
        .insert(pos(), pack_sbdf(0, 4, 0, 0));
    assert_eq!(
        host.call(id, 1, &pio(Dir::Read, 0x97, 0)).unwrap(),
        u64::from(pack_sbdf(0, 4, 0, 0))
    );
    host.located.lock().unwrap().clear();
    assert_eq!(host.call(id, 0, &pio(Dir::Read, 0x97, 0)).unwrap(), 0xdead);
    // Broadcasts: TIMEOFFSET through the ring, INVALIDATE synchronously.
    {
        let mut st = host.state.lock().unwrap();
        let m = st.models[usize::from(id)].as_mut().unwrap();
        m.broadcast(&Ioreq::new(IoreqType::TimeOffset, Dir::Write, 0, 8, 77))
            .unwrap();
        m.broadcast(&Ioreq::new(IoreqType::Invalidate, Dir::Write, 0, 0, 0))
            .unwrap();
    }
    until("two broadcasts", || broadcasts.lock().unwrap().len() == 2);
    assert_eq!(
        *broadcasts.lock().unwrap(),
        vec![IoreqType::TimeOffset, IoreqType::Invalidate]
    );

    let st = &l.servers()[0];
    assert_eq!(st.name.as_deref(), Some("probe"));
    assert!(st.stats.requests >= 58, "{st:?}");
    assert_eq!(
        st.stats.spun + st.stats.blocked,
        st.stats.requests,
        "{st:?}"
    );
    assert_eq!(st.stats.dmops_in_request, 2);

    stop.stop();
    assert_eq!(dm.join().unwrap().unwrap(), Ended::Stopped);
    until("removal", || host.removed.lock().unwrap().contains(&id));
    assert!(host.owned(id).is_empty(), "claims released");
    assert!(!host.live(id));
    l.stop();
}

/// MSIs through a real socket: one a model sends while it serves a request is applied with
/// that request's ctl; one sent outside a request goes to the host; a refusal comes back as
/// the errno of an error reply, typed again on the model's side; a malformed or misaddressed
/// INJECT_MSI is refused and the connection lives on. No grant is needed.
#[test]
fn a_remote_model_injects_msis() {
    use wire::op::INJECT_MSI;
    let host = Arc::new(FakeHost::new(1).allow("probe", my_uid(), grant()).allow(
        "raw",
        my_uid(),
        vec![],
    ));
    let l = start(host.clone(), "msi", opts(2000));
    let stop = Stopper::new().unwrap();
    let probe = Probe::new("probe", vec![Claim::Range(IoRange::ports(0x90, 0x9f))]);
    let msis = probe.msis.clone();
    let dm = spawn_dm(l.path().to_path_buf(), probe, Some(stop.clone()));
    let id = enabled_id(&l);

    // During a request.
    host.call(id, 0, &pio(Dir::Write, 0x9b, 0x4071)).unwrap();
    assert_eq!(*host.msis.lock().unwrap(), vec![(id, MSI_ADDR, 0x4071)]);
    assert_eq!(msis.lock().unwrap().pop(), Some(Ok(())));
    // Refused: "not supported" stays typed across the socket (EOPNOTSUPP) ...
    *host.msi_refusal.lock().unwrap() = Some(MsiError::Unsupported {
        why: "no interrupts here".into(),
    });
    host.call(id, 0, &pio(Dir::Write, 0x9b, 0x4072)).unwrap();
    let r = msis.lock().unwrap().pop().unwrap();
    assert!(
        matches!(&r, Err(MsiError::Unsupported { why }) if why.contains("EOPNOTSUPP")),
        "{r:?}"
    );
    // ... and a hypervisor's refusal is the backend's error (EIO), with the host's text.
    *host.msi_refusal.lock().unwrap() = Some(MsiError::Backend {
        addr: MSI_ADDR,
        data: 0x4073,
        source: BackendError::Disconnected,
    });
    host.call(id, 0, &pio(Dir::Write, 0x9b, 0x4073)).unwrap();
    let r = msis.lock().unwrap().pop().unwrap();
    assert!(
        matches!(&r, Err(MsiError::Backend { addr: MSI_ADDR, data: 0x4073, source: BackendError::Other(m) })
            if m.starts_with("EIO(5)") && m.contains("the hypervisor is gone")),
        "{r:?}"
    );
    *host.msi_refusal.lock().unwrap() = None;
    assert_eq!(l.servers()[0].stats.dmops_in_request, 3);

    // Outside a request, from a server that claims nothing at all.
    let mut c = Connection::connect(l.path()).unwrap();
    let (raw_id, _) = c.create("raw", BufioreqMode::Off).unwrap();
    c.inject_msi(raw_id, 0x1_fee0_0000, 0x22).unwrap();
    assert_eq!(
        host.msis.lock().unwrap().last(),
        Some(&(raw_id, 0x1_fee0_0000, 0x22))
    );
    // Malformed (short, reserved byte set) or for another server's id.
    let body = |id: u16, pad: u8| {
        let mut b = id.to_le_bytes().to_vec();
        b.extend_from_slice(&[0, pad]);
        b.extend_from_slice(&0x4041u32.to_le_bytes());
        b.extend_from_slice(&MSI_ADDR.to_le_bytes());
        b
    };
    expect_error(
        &mut c,
        &packet(INJECT_MSI, 21, &body(raw_id, 0)[..12]),
        21,
        Code::EINVAL,
    );
    expect_error(
        &mut c,
        &packet(INJECT_MSI, 22, &body(raw_id, 1)),
        22,
        Code::EINVAL,
    );
    expect_error(
        &mut c,
        &packet(INJECT_MSI, 23, &body(id, 0)),
        23,
        Code::ENOENT,
    );
    assert_eq!(
        raw(&mut c, &packet(INJECT_MSI, 24, &body(raw_id, 0))),
        (24, Reply::Done { op: INJECT_MSI })
    );
    assert_eq!(host.msis.lock().unwrap().len(), 3);
    c.destroy(raw_id).unwrap();

    stop.stop();
    assert_eq!(dm.join().unwrap().unwrap(), Ended::Stopped);
    l.stop();
}

#[test]
fn buffered_writes_go_through_the_ring_in_order() {
    let host = Arc::new(FakeHost::new(1).allow("probe", my_uid(), grant()));
    let l = start(host.clone(), "buf", opts(2000));
    let stop = Stopper::new().unwrap();
    let probe = Probe::new("probe", vec![Claim::Range(IoRange::mmio(0xa0000, 0x20000))]);
    let seen = probe.seen.clone();
    let dm = spawn_dm(l.path().to_path_buf(), probe, Some(stop.clone()));
    let id = enabled_id(&l);
    for i in 0..600u64 {
        let w = Ioreq::new(IoreqType::Copy, Dir::Write, 0xa0000 + 4 * (i % 16), 4, i);
        assert_eq!(host.call(id, 0, &w).unwrap(), 0);
    }
    // A synchronous read after buffered writes sees all of them (the ring is drained first).
    let r = Ioreq::new(IoreqType::Copy, Dir::Read, 0xa0000 + 4 * (599 % 16), 4, 0);
    assert_eq!(host.call(id, 0, &r).unwrap(), 599);
    assert_eq!(seen.load(Ordering::Relaxed), 601);
    let st = l.servers()[0].stats;
    assert!(
        st.buffered > 0 && st.buffered + st.requests == 601,
        "{st:?}"
    );
    stop.stop();
    dm.join().unwrap().unwrap();
}

#[test]
fn claim_outside_the_grant_is_refused() {
    let host = Arc::new(FakeHost::new(1).allow("probe", my_uid(), grant()));
    let l = start(host.clone(), "grant", opts(2000));
    let other = pack_sbdf(0, 0, 6, 0);
    let probe = Probe::new(
        "probe",
        vec![
            Claim::Range(IoRange::pci(EP)),
            Claim::Range(IoRange::pci(other)),
        ],
    );
    let r = spawn_dm(l.path().to_path_buf(), probe, None)
        .join()
        .unwrap();
    match r {
        Err(ClientError::Attach(ClaimError::NotGranted { claim, requester })) => {
            assert_eq!(claim.to_string(), "pci 0000:00:06.0");
            assert_eq!(requester, "probe");
        }
        other => panic!("{other:?}"),
    }
    // The server was destroyed: nothing stays claimed.
    until("removal", || host.removed.lock().unwrap().len() == 1);
    assert!(host.claims.lock().unwrap().is_empty());
    // On the raw protocol: EPERM, and the connection goes on.
    let mut c = Connection::connect(l.path()).unwrap();
    let (id, _) = c.create("probe", BufioreqMode::Off).unwrap();
    let e = c
        .map(id, Claim::Range(IoRange::ports(0x60, 0x60)))
        .unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Refused {
                code: Code::EPERM,
                ..
            }
        ),
        "{e}"
    );
    let e = c
        .map(id, Claim::Range(IoRange::ports(0x90, 0xa0)))
        .unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Refused {
                code: Code::EPERM,
                ..
            }
        ),
        "straddles the grant: {e}"
    );
    c.map(id, Claim::Range(IoRange::ports(0x90, 0x9f))).unwrap();
    let e = c
        .map(id, Claim::Range(IoRange::ports(0x90, 0x9f)))
        .unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Refused {
                code: Code::EBUSY,
                ..
            }
        ),
        "{e}"
    );
    let e = c
        .unmap(id, Claim::Range(IoRange::ports(0x91, 0x91)))
        .unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Refused {
                code: Code::ENOENT,
                ..
            }
        ),
        "{e}"
    );
    c.unmap(id, Claim::Range(IoRange::ports(0x90, 0x9f)))
        .unwrap();
    c.map(id, Claim::Position(pos())).unwrap();
    c.destroy(id).unwrap();
}

/// Sends raw bytes, returns the (tag, reply).
fn raw(c: &mut Connection, bytes: &[u8]) -> (u32, Reply) {
    c.socket().send(bytes, &[]).unwrap();
    match c.recv(true).unwrap() {
        Some((Message::Reply { tag, reply }, _)) => (tag, reply),
        other => panic!("{other:?}"),
    }
}

fn packet(op: u16, tag: u32, body: &[u8]) -> Vec<u8> {
    let mut b = wire::MAGIC.to_vec();
    b.extend_from_slice(&wire::VERSION.to_le_bytes());
    b.extend_from_slice(&op.to_le_bytes());
    b.extend_from_slice(&tag.to_le_bytes());
    b.extend_from_slice(&(body.len() as u32).to_le_bytes());
    b.extend_from_slice(body);
    b
}

#[track_caller]
fn expect_error(c: &mut Connection, bytes: &[u8], want_tag: u32, want: Code) {
    match raw(c, bytes) {
        (tag, Reply::Error { code, message, .. }) => {
            assert_eq!((tag, code), (want_tag, want), "{message}");
            assert!(!message.is_empty());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_messages_get_error_replies_and_the_connection_survives() {
    use wire::op::*;
    let host = Arc::new(FakeHost::new(2).allow("probe", my_uid(), grant()).allow(
        "root-only",
        my_uid() + 1,
        vec![],
    ));
    let l = start(host.clone(), "bad", opts(2000));
    let mut c = Connection::connect(l.path()).unwrap();
    expect_error(&mut c, b"IOMX\x01\x00", 0, Code::EPROTO);
    let mut p = packet(SET_IOREQ_SERVER_STATE, 5, &[0, 0, 1, 0]);
    p[0] = b'J';
    expect_error(&mut c, &p, 5, Code::EPROTO);
    let mut p = packet(SET_IOREQ_SERVER_STATE, 6, &[0, 0, 1, 0]);
    p[4] = 9;
    expect_error(&mut c, &p, 6, Code::EPROTONOSUPPORT);
    expect_error(&mut c, &packet(0x0077, 7, &[]), 7, Code::ENOSYS);
    expect_error(
        &mut c,
        &packet(SET_IOREQ_SERVER_STATE, 8, &[0, 0, 3, 0]),
        8,
        Code::EINVAL,
    );
    expect_error(
        &mut c,
        &packet(MAP_IO_RANGE_TO_IOREQ_SERVER, 9, &[0; 7]),
        9,
        Code::EINVAL,
    );
    expect_error(
        &mut c,
        &packet(GET_IOREQ_SERVER_INFO, 10, &[0, 0, 0, 0]),
        10,
        Code::ENOENT,
    );
    expect_error(
        &mut c,
        &vec![0u8; wire::MAX_MESSAGE + 10],
        0,
        Code::EMSGSIZE,
    );
    expect_error(
        &mut c,
        &packet(SET_IOREQ_SERVER_STATE | REPLY, 11, &[]),
        11,
        Code::EPROTO,
    );
    expect_error(&mut c, &packet(GOODBYE, 0, &[0, 0, 0, 0]), 0, Code::EPROTO);
    // Descriptors attached to a request are closed and refused.
    let bell = Doorbell::new().unwrap();
    c.socket()
        .send(
            &packet(DESTROY_IOREQ_SERVER, 12, &[0, 0, 0, 0]),
            &[bell.as_fd()],
        )
        .unwrap();
    match c.recv(true).unwrap() {
        Some((
            Message::Reply {
                tag: 12,
                reply: Reply::Error { code, .. },
            },
            _,
        )) => assert_eq!(code, Code::EPROTO),
        other => panic!("{other:?}"),
    }
    // Names and credentials.
    let e = c.create("nobody", BufioreqMode::Atomic).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Refused {
                code: Code::ENOENT,
                ..
            }
        ),
        "{e}"
    );
    let e = c.create("root-only", BufioreqMode::Atomic).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Refused {
                code: Code::EACCES,
                ..
            }
        ),
        "{e}"
    );
    // The state machine.
    let (id, nr) = c.create("probe", BufioreqMode::Atomic).unwrap();
    assert_eq!(nr, 2);
    let e = c.create("probe", BufioreqMode::Atomic).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Refused {
                code: Code::EEXIST,
                ..
            }
        ),
        "{e}"
    );
    let mut c2 = Connection::connect(l.path()).unwrap();
    let e = c2.create("probe", BufioreqMode::Atomic).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Refused {
                code: Code::EBUSY,
                ..
            }
        ),
        "{e}"
    );
    let e = c.set_state(id + 1, true).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Refused {
                code: Code::ENOENT,
                ..
            }
        ),
        "{e}"
    );
    let sp = c.get_info(id).unwrap();
    assert_eq!(sp.vcpu_bells.len(), 2);
    assert_eq!(sp.info.bufioreq, BufioreqMode::Atomic);
    c.set_state(id, true).unwrap();
    c.destroy(id).unwrap();
    let e = c.set_state(id, true).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Refused {
                code: Code::ENOENT,
                ..
            }
        ),
        "after destroy: {e}"
    );
    // The name is free again, for this connection or another.
    let (id2, _) = c2.create("probe", BufioreqMode::Off).unwrap();
    assert_ne!(id, id2);
    drop(c2);
    until("removal", || host.removed.lock().unwrap().contains(&id2));
    let (id3, _) = c.create("probe", BufioreqMode::Off).unwrap();
    c.destroy(id3).unwrap();
}

/// A hand-written device model on the raw protocol takes a request and dies without
/// answering: the request completes at once (not at the deadline), the claims go.
#[test]
fn a_crash_mid_request_completes_it_promptly_and_releases_claims() {
    let host = Arc::new(FakeHost::new(1).allow("probe", my_uid(), grant()));
    let l = start(host.clone(), "crash", opts(5000));
    let mut c = Connection::connect(l.path()).unwrap();
    let (id, _) = c.create("probe", BufioreqMode::Off).unwrap();
    let sp = c.get_info(id).unwrap();
    c.map(id, Claim::Range(IoRange::pci(EP))).unwrap();
    c.set_state(id, true).unwrap();
    let dm = std::thread::spawn(move || {
        let slot = sp.pages.slot(0).unwrap();
        loop {
            wait_readable(&[sp.vcpu_bells[0].as_fd()], None).unwrap();
            sp.vcpu_bells[0].clear().unwrap();
            if let Some(t) = slot.take() {
                assert_eq!(t.req.unwrap().addr, abi::pci_config_addr(EP, 0));
                break;
            }
        }
        drop(c); // "crash": the connection and every descriptor go away
        drop(sp);
    });
    let t = Instant::now();
    let r = host.call(id, 0, &cfg_read(0));
    let took = t.elapsed();
    dm.join().unwrap();
    assert!(matches!(r, Err(DmError::Disconnected(_))), "{r:?}");
    assert!(took < Duration::from_millis(500), "took {took:?}");
    until("removal", || host.removed.lock().unwrap().contains(&id));
    assert!(host.owned(id).is_empty());
    // Gone for good: later calls fail at once.
    assert!(host.call(id, 0, &cfg_read(0)).is_err());
}

/// A model that exceeds the deadline is dropped: the request fails at the deadline, the
/// model gets a goodbye (ETIMEDOUT) and its late answer is never taken; it can reconnect.
#[test]
fn a_model_past_its_deadline_is_dropped_and_may_reconnect() {
    let host = Arc::new(FakeHost::new(1).allow("probe", my_uid(), grant()));
    let l = start(host.clone(), "deadline", opts(100));
    let probe = Probe::new("probe", vec![Claim::Range(IoRange::ports(0x90, 0x9f))]);
    let slow = probe.slow.clone();
    let dm = spawn_dm(l.path().to_path_buf(), probe, None);
    let id = enabled_id(&l);
    slow.store(true, Ordering::Relaxed);
    let t = Instant::now();
    let r = host.call(id, 0, &pio(Dir::Read, 0x99, 0));
    let took = t.elapsed();
    assert!(matches!(r, Err(DmError::Timeout { .. })), "{r:?}");
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_millis(1000),
        "took {took:?}"
    );
    slow.store(false, Ordering::Relaxed); // the late answer is written into abandoned memory
    match dm.join().unwrap() {
        Err(ClientError::Disconnected {
            goodbye: Some((code, msg)),
        }) => {
            assert_eq!(code, Code::ETIMEDOUT, "{msg}");
        }
        other => panic!("{other:?}"),
    }
    until("removal", || host.removed.lock().unwrap().contains(&id));
    assert!(host.owned(id).is_empty());
    assert!(host.call(id, 0, &pio(Dir::Read, 0x99, 0)).is_err());
    // Reconnect and claim again.
    let stop = Stopper::new().unwrap();
    let dm = spawn_dm(
        l.path().to_path_buf(),
        Probe::new("probe", vec![Claim::Range(IoRange::ports(0x90, 0x9f))]),
        Some(stop.clone()),
    );
    let id2 = enabled_id(&l);
    assert_ne!(id, id2);
    assert_eq!(host.call(id2, 0, &pio(Dir::Read, 0x99, 0)).unwrap(), 0x99);
    assert_eq!(
        host.owned(id2),
        vec![Claim::Range(IoRange::ports(0x90, 0x9f))]
    );
    stop.stop();
    dm.join().unwrap().unwrap();
}

/// A model whose slot answer carries the wrong sequence number broke the protocol.
#[test]
fn a_stale_sequence_number_is_a_protocol_violation() {
    let host = Arc::new(FakeHost::new(1).allow("probe", my_uid(), grant()));
    let l = start(host.clone(), "seq", opts(2000));
    let mut c = Connection::connect(l.path()).unwrap();
    let (id, _) = c.create("probe", BufioreqMode::Off).unwrap();
    let sp = c.get_info(id).unwrap();
    c.set_state(id, true).unwrap();
    let dm = std::thread::spawn(move || {
        let slot = sp.pages.slot(0).unwrap();
        let t = loop {
            if let Some(t) = slot.take() {
                break t;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        slot.force_control(t.seq.wrapping_sub(1), abi::STATE_IORESP_READY);
        sp.resp_bell.ring().unwrap();
        // The multiplexer says why before it closes.
        let t = Instant::now();
        while c.pump().is_ok() && c.goodbye().is_none() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        c.goodbye().cloned()
    });
    let r = host.call(id, 0, &cfg_read(0));
    assert!(matches!(r, Err(DmError::Failed { .. })), "{r:?}");
    let goodbye = dm.join().unwrap();
    assert_eq!(goodbye.map(|g| g.0), Some(Code::EPROTO));
    until("removal", || host.removed.lock().unwrap().contains(&id));
}

#[test]
fn disabled_server_gets_no_requests() {
    let host = Arc::new(FakeHost::new(1).allow("probe", my_uid(), grant()));
    let l = start(host.clone(), "dis", opts(2000));
    let mut c = Connection::connect(l.path()).unwrap();
    let (id, _) = c.create("probe", BufioreqMode::Off).unwrap();
    let _sp = c.get_info(id).unwrap();
    c.map(
        id,
        Claim::Range(IoRange::new(RangeKind::Pci, u64::from(EP), u64::from(EP))),
    )
    .unwrap();
    let r = host.call(id, 0, &cfg_read(0));
    assert!(matches!(r, Err(DmError::Failed { .. })), "{r:?}");
    assert_eq!(l.servers()[0].stats.refused, 1);
    c.set_state(id, true).unwrap();
    c.set_state(id, false).unwrap();
    assert!(host.call(id, 0, &cfg_read(0)).is_err());
}

/// Held by the tests that spin on both sides, so they do not compete with each other for
/// the CPUs (the harness runs tests in parallel).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A pseudo-random sequence (xorshift): every run mixes the same way.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Doorbell suppression (docs/dm-protocol.md, 7): whatever each side spins, and with both
/// switching between polling and sleeping (spins of a few µs, random gaps between requests,
/// requests that take a while), no wake-up is lost. A lost one would leave a side asleep
/// until its `poll` times out: the model's after 1 s (the multiplexer's 500 ms deadline
/// passes first: a `Timeout` here), the multiplexer's at its deadline (where it finds the
/// answer, so the request took 500 ms). Every request must take less than 300 ms. Buffered
/// writes, whose eventfd is suppressed the same way, are mixed in and read back.
#[test]
fn no_wakeup_is_lost_whatever_each_side_spins() {
    const N: u64 = 2500;
    // (multiplexer spin, model spin), µs.
    let configs = [
        (0, 0),
        (0, 3),
        (3, 0),
        (3, 3),
        (2, 1000),
        (3, 20),
        (100_000, 2),
        (100_000, 20),
        (100_000, 1000),
        (100_000, 0),
    ];
    let _serial = serial();
    for (mux_us, dm_us) in configs {
        let host = Arc::new(FakeHost::new(2).allow("probe", my_uid(), grant()));
        let mut o = opts(500);
        o.remote.spin = Duration::from_micros(mux_us);
        let l = start(host.clone(), &format!("mix-{mux_us}-{dm_us}"), o);
        let stop = Stopper::new().unwrap();
        let path = l.path().to_path_buf();
        let stop2 = stop.clone();
        let dm = std::thread::spawn(move || {
            let mut probe = Probe::new(
                "probe",
                vec![
                    Claim::Range(IoRange::ports(0x90, 0x9f)),
                    Claim::Range(IoRange::mmio(0xa0000, 0x20000)),
                ],
            );
            let o = ClientOptions {
                spin: Duration::from_micros(dm_us),
                stop: Some(stop2),
                ..Default::default()
            };
            serve_with(&path, &mut probe, &o)
        });
        let id = enabled_id(&l);
        let mut rng = Rng(0x1234_5678_9abc_def1 ^ (mux_us << 20) ^ dm_us);
        let mut last_write = None;
        for i in 0..N {
            let r = rng.next();
            let vcpu = (r & 1) as u32;
            let what = format!("mux spin {mux_us} µs, model spin {dm_us} µs, request {i}");
            let t = Instant::now();
            if r >> 4 & 7 == 0 {
                let w = Ioreq::new(IoreqType::Copy, Dir::Write, 0xa0040, 4, i);
                host.call(id, vcpu, &w).expect(&what);
                last_write = Some(i);
            } else {
                // The model answers at once, or after up to 15 µs (past a short spin).
                let dawdle = if r >> 8 & 3 == 0 { r >> 12 & 15 } else { 0 };
                let got = host.call(id, vcpu, &pio(Dir::Read, 0x9a, dawdle));
                assert_eq!(got.expect(&what), dawdle + 1, "{what}");
            }
            let took = t.elapsed();
            assert!(
                took < Duration::from_millis(300),
                "{what} took {took:?}: a lost wake-up"
            );
            match r >> 16 & 7 {
                // Back to back, a few µs (inside or past a short spin), or a sleep.
                0..=3 => {}
                4 | 5 => {
                    let t = Instant::now();
                    let gap = Duration::from_micros(r >> 24 & 7);
                    while t.elapsed() < gap {
                        std::hint::spin_loop();
                    }
                }
                _ => std::thread::sleep(Duration::from_micros(50)),
            }
        }
        if let Some(w) = last_write {
            let r = Ioreq::new(IoreqType::Copy, Dir::Read, 0xa0040, 4, 0);
            assert_eq!(
                host.call(id, 0, &r).unwrap(),
                w,
                "buffered writes all arrived"
            );
        }
        let st = l.servers()[0].stats;
        eprintln!("mux spin {mux_us} µs, model spin {dm_us} µs: {st:?}");
        assert_eq!(st.spun + st.blocked, st.requests, "{st:?}");
        assert_eq!(st.bells_rung + st.bells_skipped, st.requests + st.buffered);
        if dm_us == 0 {
            assert_eq!(
                st.bells_skipped, 0,
                "a model that never polls is always rung"
            );
        }
        // How often each side found the other polling depends on whether the scheduler ran
        // the two threads on one CPU or two (on one, a side that polls holds the CPU until
        // its spin ends), so the mix is printed, not checked; `notify`'s unit test checks
        // that both paths are taken.
        stop.stop();
        assert_eq!(dm.join().unwrap().unwrap(), Ended::Stopped);
        l.stop();
    }
}

/// A model that never sleeps reads its socket only when the notification page's counter
/// moves: it still learns where its position is before the request that needs it, and it
/// still sees the goodbye when the multiplexer shuts down.
#[test]
fn a_polling_model_reads_notices_when_the_counter_moves() {
    let _serial = serial();
    let host = Arc::new(FakeHost::new(1).allow("probe", my_uid(), grant()));
    let mut o = opts(2000);
    o.remote.spin = Duration::from_millis(100);
    let l = start(host.clone(), "notices", o);
    let path = l.path().to_path_buf();
    let dm = std::thread::spawn(move || {
        let mut probe = Probe::new(
            "probe",
            vec![
                Claim::Range(IoRange::ports(0x90, 0x9f)),
                Claim::Position(pos()),
            ],
        );
        let o = ClientOptions {
            spin: Duration::from_secs(60),
            ..Default::default()
        };
        serve_with(&path, &mut probe, &o)
    });
    let id = enabled_id(&l);
    for round in 0..50u8 {
        let want = match round % 3 {
            0 => None,
            n => Some(pack_sbdf(0, 3 + n, 0, 0)),
        };
        match want {
            Some(s) => host.located.lock().unwrap().insert(pos(), s),
            None => host.located.lock().unwrap().remove(&pos()),
        };
        let got = host.call(id, 0, &pio(Dir::Read, 0x97, 0)).unwrap();
        assert_eq!(got, want.map_or(0xdead, u64::from), "round {round}");
    }
    let st = l.servers()[0].stats;
    assert!(st.bells_skipped > 0, "{st:?}");
    let t = Instant::now();
    l.stop();
    match dm.join().unwrap() {
        Ok(Ended::Closed { code, .. }) => assert_eq!(code, Code::ESHUTDOWN),
        other => panic!("{other:?}"),
    }
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the goodbye was seen through the counter, not after the model's 60 s spin"
    );
}

/// A device model speaking version 1 (no notification page) is refused with an ERROR it can
/// decode: framed in version 1, EPROTONOSUPPORT, naming both versions. The connection stays
/// usable in version 2.
#[test]
fn a_version_1_device_model_is_refused_in_a_reply_it_can_read() {
    let host = Arc::new(FakeHost::new(1).allow("probe", my_uid(), grant()));
    let l = start(host.clone(), "v1", opts(2000));
    let mut c = Connection::connect(l.path()).unwrap();
    let mut body = vec![2, 0, 5, 0];
    body.extend_from_slice(b"probe");
    let mut p = packet(wire::op::CREATE_IOREQ_SERVER, 3, &body);
    p[4..6].copy_from_slice(&1u16.to_le_bytes());
    c.socket().send(&p, &[]).unwrap();
    let mut buf = vec![0u8; wire::MAX_MESSAGE + 1];
    let r = c.socket().recv(&mut buf, true).unwrap();
    let b = &buf[..r.len];
    assert_eq!(&b[0..4], b"IOMX");
    assert_eq!(&b[4..6], &[1, 0], "framed in the peer's version");
    assert_eq!(&b[6..8], &[0xff, 0xff], "ERROR");
    assert_eq!(&b[8..12], &3u32.to_le_bytes(), "the request's tag");
    assert_eq!(&b[16..20], &Code::EPROTONOSUPPORT.0.to_le_bytes());
    assert_eq!(&b[20..22], &wire::op::CREATE_IOREQ_SERVER.to_le_bytes());
    let text = String::from_utf8_lossy(&b[24..]);
    assert!(
        text.contains("version 1") && text.contains("version 2"),
        "{text}"
    );
    assert!(l.servers()[0].name.is_none(), "no server was created");
    let (id, _) = c.create("probe", BufioreqMode::Off).unwrap();
    c.destroy(id).unwrap();
}
