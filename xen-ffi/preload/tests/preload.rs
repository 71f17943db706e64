//! The preload in a real process, without Xen: `tests/c/qemu_like.c` makes QEMU 7.2's Xen
//! library calls in QEMU's order and serves requests as QEMU does; it runs with
//! `LD_PRELOAD=libioreq_mux_preload.so` against an in-test multiplexer (a `DmListener` with
//! a fake engine), which posts real requests through the `RemoteModel` the listener made.
//!
//! The C program links Debian's libxen-dev libraries; without them these tests fail (they
//! are not skipped): `scripts/deps.sh` installs libxen-dev.
#![allow(clippy::unwrap_used)]

#[path = "../../../ioreq-server/tests/oop_support/mod.rs"]
mod oop_support;

use ioreq_server::abi::pack_sbdf;
use ioreq_server::{Claim, Dir, IoRange, Ioreq, IoreqType};
use oop_support::{FakeHost, my_uid, opts, start, until};
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const EP: u32 = pack_sbdf(0, 0, 5, 0);
/// The fake remote ports the preload issues (`src/ports.rs`).
const FAKE_REMOTE_BASE: i64 = 0x7e00_0000;
const FAKE_REMOTE_BUFFERED: i64 = FAKE_REMOTE_BASE + 0xffff;
const FAKE_LOCAL_BASE: i64 = 0x0100_0000;
const ENOENT: i64 = 2;
const EPERM: i64 = 1;
const EINVAL: i64 = 22;
const EAGAIN: i64 = 11;
const EOPNOTSUPP: i64 = 95;

fn grant() -> Vec<Claim> {
    vec![
        Claim::Range(IoRange::pci(EP)),
        Claim::Range(IoRange::ports(0x90, 0x9f)),
        Claim::Range(IoRange::mmio(0xa0000, 0x20000)),
        Claim::Range(IoRange::mmio(0xfe00_0000, 0x100_0000)),
    ]
}

/// What the C program answers to a read (its `answer()`).
fn answer(addr: u64, size: u32) -> u64 {
    let v = 0xc0de_0000 | (addr & 0xffff);
    if size >= 8 {
        v
    } else {
        v & ((1u64 << (8 * size)) - 1)
    }
}

fn pio(dir: Dir, port: u64, size: u32, data: u64) -> Ioreq {
    Ioreq::new(IoreqType::Pio, dir, port, size, data)
}

/// The built preload: next to this test binary (`target/<profile>/deps`), where cargo puts
/// the cdylib it builds for this crate's integration tests, or one level up.
fn preload() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    for dir in [Some(deps), deps.parent()].into_iter().flatten() {
        let p = dir.join("libioreq_mux_preload.so");
        if p.exists() {
            return p;
        }
    }
    panic!(
        "libioreq_mux_preload.so not found next to {} (is the crate's cdylib built?)",
        exe.display()
    );
}

/// The C program, compiled once per test run.
fn helper() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/qemu_like.c");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("qemu_like");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let o = Command::new(&cc)
            .args(["-Wall", "-Wextra", "-Werror", "-O1", "-o"])
            .arg(&out)
            .arg(&src)
            .args([
                "-ldl",
                "-lxendevicemodel",
                "-lxenforeignmemory",
                "-lxenevtchn",
            ])
            .env_remove("LD_PRELOAD")
            .output()
            .unwrap_or_else(|e| panic!("cannot run the C compiler {cc:?}: {e}"));
        assert!(
            o.status.success(),
            "cannot build {}: these tests need a C compiler and Debian's libxen-dev (the Xen \
             headers and libxendevicemodel, libxenforeignmemory, libxenevtchn; \
             scripts/deps.sh installs it).\n{}",
            src.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        out
    })
}

/// The C program running under the preload.
struct Dm {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
}

impl Dm {
    /// `socket`: `IOREQ_MUX_SOCKET` (`None`: unset, the preload is inert).
    fn spawn(args: &[&str], socket: Option<&Path>, env: &[(&str, &str)]) -> Dm {
        let mut cmd = Command::new(helper());
        cmd.args(args)
            .env("LD_PRELOAD", preload())
            .env("IOREQ_MUX_PRELOAD_LOG", "debug")
            .env_remove("IOREQ_MUX_SOCKET")
            .env_remove("IOREQ_MUX_SERVER")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(s) = socket {
            cmd.env("IOREQ_MUX_SOCKET", s);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let (tx, lines) = channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let (mut err, s2) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                s2.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let stdin = child.stdin.take();
        Dm {
            child,
            stdin,
            lines,
            seen: vec![],
            stderr,
        }
    }

    fn context(&self) -> String {
        format!(
            "stdout so far:\n{}\nstderr:\n{}",
            self.seen.join("\n"),
            self.stderr.lock().unwrap()
        )
    }

    /// The next line starting with `prefix` (earlier lines are skipped); its index in
    /// `seen`.
    fn expect_at(&mut self, prefix: &str) -> (usize, String) {
        let t = Instant::now() + Duration::from_secs(20);
        loop {
            let left = t.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.starts_with(prefix) {
                        return (self.seen.len() - 1, l);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no line {prefix:?} within 20 s\n{}", self.context())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("the program ended before {prefix:?}\n{}", self.context())
                }
            }
        }
    }

    fn expect(&mut self, prefix: &str) -> String {
        self.expect_at(prefix).1
    }

    /// Lets the program go past "vcpus-bound".
    fn go(&mut self) {
        let s = self.stdin.as_mut().unwrap();
        s.write_all(b"go\n").unwrap();
        s.flush().unwrap();
    }

    /// Waits for the exit (20 s at most); the rest of stdout is in `seen`.
    fn wait(&mut self) -> ExitStatus {
        let t = Instant::now();
        let st = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if t.elapsed() > Duration::from_secs(20) {
                let _ = self.child.kill();
                panic!("the program did not exit\n{}", self.context());
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(l);
        }
        // The stderr reader finishes at end of file.
        std::thread::sleep(Duration::from_millis(50));
        st
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Dm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The integer after `key=` in `line`.
fn kv(line: &str, key: &str) -> i64 {
    let pat = format!("{key}=");
    let at = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&pat))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"));
    match at.strip_prefix("0x") {
        Some(h) => i64::from_str_radix(h, 16).unwrap(),
        None => at.parse().unwrap(),
    }
}

/// Runs QEMU's setup sequence up to "ready" and returns the server id. Checks on the way
/// that the enable QEMU asked for reached the multiplexer only once every port was bound.
fn setup(dm: &mut Dm, l: &ioreq_server::oop::DmListener, nr: usize) -> u16 {
    assert_eq!(dm.expect("evtchn_open"), "evtchn_open ok");
    let id = kv(&dm.expect("create rc=0"), "id") as u16;
    dm.expect("map_resource ok");
    let bad = dm.expect("map_resource frames 1..3");
    assert_eq!(kv(&bad, "errno"), EINVAL, "{bad}");
    let info = dm.expect("get_info rc=0");
    assert_eq!(kv(&info, "bufport"), FAKE_REMOTE_BUFFERED);
    assert_eq!(
        kv(&dm.expect("get_info with gfns rc=-1"), "errno"),
        EOPNOTSUPP
    );
    dm.expect("set_state rc=0");
    // Another domain's port is not ours: the real path (no Xen here: ENOENT).
    let other = dm.expect("bind for another domain");
    assert_eq!((kv(&other, "rc"), kv(&other, "errno")), (-1, ENOENT));
    let mut locals = HashSet::new();
    for i in 0..nr {
        let b = dm.expect(&format!("bound vcpu={i} "));
        // The page held vCPU i's fake port when map_resource returned.
        assert_eq!(kv(&b, "remote"), FAKE_REMOTE_BASE + i as i64, "{b}");
        let local = kv(&b, "local");
        assert!(local >= FAKE_LOCAL_BASE, "{b}");
        assert!(locals.insert(local), "local ports are distinct: {b}");
    }
    dm.expect("vcpus-bound");
    // QEMU enabled before its binds; the multiplexer has the server, still disabled, because
    // the buffered port is not bound yet.
    let s = l.servers();
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].id, Some(id));
    assert_eq!(s[0].name.as_deref(), Some("qemu"));
    assert!(
        !s[0].enabled,
        "enable forwarded before every port was bound"
    );
    std::thread::sleep(Duration::from_millis(50));
    assert!(!l.servers()[0].enabled);
    dm.go();
    let b = dm.expect("bound buffered");
    assert_eq!(kv(&b, "remote"), FAKE_REMOTE_BUFFERED);
    assert!(locals.insert(kv(&b, "local")));
    // The bind returned after the multiplexer acknowledged the enable.
    assert!(
        l.servers()[0].enabled,
        "enable not forwarded after the binds"
    );
    for what in ["map ports", "map mmio", "map vga", "map pcidev"] {
        assert_eq!(kv(&dm.expect(&format!("{what} rc=")), "rc"), 0, "{what}");
    }
    // The multiplexer's refusals are errno values.
    let refused = dm.expect("map pcidev outside grant");
    assert_eq!((kv(&refused, "rc"), kv(&refused, "errno")), (-1, EPERM));
    assert_eq!(kv(&dm.expect("map ports 98 rc="), "rc"), 0);
    assert_eq!(kv(&dm.expect("unmap ports 98 rc="), "rc"), 0);
    let again = dm.expect("unmap ports 98 again");
    assert_eq!((kv(&again, "rc"), kv(&again, "errno")), (-1, ENOENT));
    id
}

#[test]
fn qemu_sequence_is_served_through_the_multiplexer() {
    let host = Arc::new(FakeHost::new(2).allow("qemu", my_uid(), grant()));
    let l = start(host.clone(), "pre-full", opts(2000));
    let mut dm = Dm::spawn(&["qemu", "2", "7", "5", "5"], Some(l.path()), &[]);
    let id = setup(&mut dm, &l, 2);
    dm.expect("ready");

    // QEMU's claims arrived.
    let owned = host.owned(id);
    for c in [
        Claim::Range(IoRange::ports(0x90, 0x9f)),
        Claim::Range(IoRange::mmio(0xfe00_0000, 0x1000)),
        Claim::Range(IoRange::mmio(0xa0000, 0x20000)),
        Claim::Range(IoRange::pci(EP)),
    ] {
        assert!(owned.contains(&c), "{c} not claimed: {owned:?}");
    }
    assert_eq!(owned.len(), 4, "{owned:?}");

    // Requests on both vCPUs, answered by the program through the slots.
    assert_eq!(
        host.call(id, 0, &pio(Dir::Read, 0x94, 4, 0)).unwrap(),
        answer(0x94, 4)
    );
    let s = dm.expect("served vcpu=0 type=0 dir=1");
    assert_eq!(kv(&s, "addr"), 0x94);
    let cfg = Ioreq::pci_config(EP, 0x10, Dir::Read, 4, 0);
    assert_eq!(host.call(id, 1, &cfg).unwrap(), answer(cfg.addr, 4));
    let s = dm.expect("served vcpu=1 type=2 dir=1");
    assert_eq!(kv(&s, "addr"), cfg.addr as i64);
    assert_eq!(
        host.call(id, 0, &pio(Dir::Write, 0x90, 1, 0x42)).unwrap(),
        0
    );
    assert_eq!(kv(&dm.expect("served vcpu=0 type=0 dir=0"), "data"), 0x42);
    // A VGA write goes through the buffered ring; the next request finds it applied first.
    let w = Ioreq::new(IoreqType::Copy, Dir::Write, 0xa0010, 2, 0x1234);
    assert_eq!(host.call(id, 0, &w).unwrap(), 0);
    let r = Ioreq::new(IoreqType::Copy, Dir::Read, 0xfe00_0010, 4, 0);
    assert_eq!(host.call(id, 1, &r).unwrap(), answer(0xfe00_0010, 4));
    let (bi, b) = dm.expect_at("buffered type=1 addr=0xa0010 size=2");
    assert_eq!(kv(&b, "data"), 0x1234);
    let (si, _) = dm.expect_at("served vcpu=1 type=1 dir=1 addr=0xfe000010");
    assert!(bi < si, "the ring is drained before the request is served");
    assert_eq!(
        host.call(id, 1, &pio(Dir::Read, 0x9c, 1, 0)).unwrap(),
        answer(0x9c, 1)
    );
    dm.expect("served vcpu=1 type=0 dir=1 addr=0x9c");
    // Every port taken: the descriptor is quiet again.
    assert_eq!(kv(&dm.expect("drained"), "readable"), 0);

    // QEMU's exit: disable, destroy, unmap, close, all completed.
    for what in ["disable", "destroy", "unmap_resource", "close"] {
        assert_eq!(kv(&dm.expect(&format!("{what} rc=")), "rc"), 0, "{what}");
    }
    let st = dm.wait();
    assert!(st.success(), "{st}\n{}", dm.context());
    assert!(
        !dm.seen.iter().any(|l| l.starts_with("spurious")),
        "{}",
        dm.context()
    );
    until("removal", || host.removed.lock().unwrap().contains(&id));
    assert!(host.owned(id).is_empty());

    let log = dm.stderr();
    for want in [
        "ioreq-mux-preload: connecting to the multiplexer at ",
        "ioreq-mux-preload: created ioreq server for domain 7: multiplexer server id ",
        "2 vCPUs, buffered ring Atomic, name \"qemu\"",
        "ioreq-mux-preload: map_resource: server ",
        "ioreq-mux-preload: enable deferred until QEMU has bound every port (0 of 2",
        "ioreq-mux-preload: bound vCPU 0 (remote port 0x7e000000) -> local port 0x1000000",
        "ioreq-mux-preload: bound vCPU 1 (remote port 0x7e000001) -> local port 0x1000001",
        "ioreq-mux-preload: bound the buffered ring (remote port 0x7e00ffff)",
        "ioreq-mux-preload: enable forwarded to the multiplexer",
        "ioreq-mux-preload: disable forwarded",
        "destroyed",
    ] {
        assert!(log.contains(want), "log lacks {want:?}:\n{log}");
    }
    // Debug: every map and unmap with its result.
    assert!(log.contains(": ok"), "{log}");
    assert!(log.contains("unmap_resource("), "{log}");
    // The enable came after the vCPU binds in the log too.
    let deferred = log.find("enable deferred").unwrap();
    let bound1 = log.find("bound vCPU 1").unwrap();
    let fwd = log.find("enable forwarded").unwrap();
    assert!(deferred < bound1 && bound1 < fwd, "{log}");
    l.stop();
}

#[test]
fn pending_returns_one_port_per_call_and_the_fd_follows_the_queue() {
    let host = Arc::new(FakeHost::new(1).allow("qemu", my_uid(), grant()));
    let l = start(host.clone(), "pre-queue", opts(5000));
    let mut dm = Dm::spawn(&["queue", "1", "3", "2", "2"], Some(l.path()), &[]);
    let id = setup(&mut dm, &l, 1);
    dm.expect("ready");
    // A buffered write, then a request on vCPU 0 while the write is still queued: two
    // ports pending at once.
    let w = Ioreq::new(IoreqType::Copy, Dir::Write, 0xa0000, 4, 7);
    assert_eq!(host.call(id, 0, &w).unwrap(), 0);
    let h2 = host.clone();
    let t = std::thread::spawn(move || h2.call(id, 0, &pio(Dir::Read, 0x91, 1, 0)));
    let q = dm.expect("queue ");
    let (buf, v0) = (kv(&q, "buflocal"), kv(&q, "local0"));
    assert_eq!(kv(&q, "r0"), 1, "readable with two ports pending: {q}");
    let got: HashSet<i64> = [kv(&q, "p1"), kv(&q, "p2")].into();
    assert_eq!(got, [buf, v0].into(), "each pending port exactly once: {q}");
    assert_eq!(kv(&q, "r1"), 1, "still readable with one port queued: {q}");
    assert_eq!(kv(&q, "r2"), 0, "not readable once drained: {q}");
    assert_eq!((kv(&q, "p3"), kv(&q, "errno")), (-1, EAGAIN), "{q}");
    assert_eq!(kv(&dm.expect("buffered type=1 addr=0xa0000"), "data"), 7);
    dm.expect("served vcpu=0 type=0 dir=1 addr=0x91");
    assert_eq!(t.join().unwrap().unwrap(), answer(0x91, 1));
    // And the ordinary path afterwards.
    assert_eq!(
        host.call(id, 0, &pio(Dir::Read, 0x92, 1, 0)).unwrap(),
        answer(0x92, 1)
    );
    dm.expect("served vcpu=0 type=0 dir=1 addr=0x92");
    assert_eq!(kv(&dm.expect("drained"), "readable"), 0);
    assert!(dm.wait().success(), "{}", dm.context());
    assert!(
        !dm.seen.iter().any(|l| l.starts_with("spurious")),
        "{}",
        dm.context()
    );
    l.stop();
}

#[test]
fn a_second_handle_is_not_confused_with_the_one_holding_the_fake_ports() {
    let host = Arc::new(FakeHost::new(2).allow("qemu", my_uid(), grant()));
    let l = start(host.clone(), "pre-handles", opts(5000));
    let mut dm = Dm::spawn(&["handles", "2", "4", "1", "1"], Some(l.path()), &[]);
    let id = setup(&mut dm, &l, 2);
    let open = dm.expect("B open");
    assert!(open.starts_with("B open ok"), "{open}");
    let (fa, fb) = (kv(&open, "fdA"), kv(&open, "fdB"));
    assert!(fa >= 0 && fb >= 0 && fa != fb, "{open}");
    // On B, vCPU 0's fake remote port (bound on A) and A's local port numbers mean nothing:
    // each call takes the real path, which without Xen fails as the real open did.
    for what in [
        "B bind vcpu0 again",
        "B bind real",
        "B notify",
        "B unmask",
        "B unbind",
        "B pending",
    ] {
        let line = dm.expect(what);
        assert_eq!(
            (kv(&line, "rc"), kv(&line, "errno")),
            (-1, ENOENT),
            "{line}"
        );
    }
    dm.expect("ready");
    // A's ports still work (B's unbind did not touch A's port of the same number).
    assert_eq!(
        host.call(id, 0, &pio(Dir::Read, 0x93, 1, 0)).unwrap(),
        answer(0x93, 1)
    );
    // While A has a port pending, B's descriptor is not readable.
    let r = dm.expect("readable B=");
    assert_eq!((kv(&r, "B"), kv(&r, "A")), (0, 1), "{r}");
    dm.expect("served vcpu=0 type=0 dir=1 addr=0x93");
    for what in ["disable", "destroy", "unmap_resource", "B close", "close"] {
        assert_eq!(kv(&dm.expect(&format!("{what} rc=")), "rc"), 0, "{what}");
    }
    assert!(dm.wait().success(), "{}", dm.context());
    l.stop();
}

/// Without `IOREQ_MUX_SOCKET` every call reaches the real libraries: the real
/// `xenevtchn_open` fails as it does without Xen (the active preload would have returned a
/// handle), and the real create runs (and, with no devicemodel handle to use, crashes inside
/// libxendevicemodel: the crash says where the call went).
#[test]
fn without_a_socket_every_call_goes_to_the_real_libraries() {
    let mut dm = Dm::spawn(&["inert", "1", "1", "0", "0"], None, &[]);
    let open = dm.expect("evtchn_open");
    assert_eq!(open, format!("evtchn_open failed errno={ENOENT}"));
    let crash = dm.expect("crashed in ");
    assert!(
        crash.contains("libxendevicemodel.so"),
        "{crash}\n{}",
        dm.context()
    );
    assert!(dm.wait().success());
    assert!(!dm.seen.iter().any(|l| l.starts_with("create returned")));
    let log = dm.stderr();
    // The preload was loaded (its one debug line) and did nothing else.
    assert!(
        log.contains("ioreq-mux-preload: IOREQ_MUX_SOCKET is not set: inert"),
        "{log}"
    );
    assert_eq!(log.matches("ioreq-mux-preload:").count(), 1, "{log}");
}

/// The multiplexer going away (GOODBYE then end of file) ends the process with status 1
/// and a message naming the reason.
#[test]
fn the_multiplexer_shutting_down_ends_the_process_with_status_1() {
    let host = Arc::new(FakeHost::new(1).allow("qemu", my_uid(), grant()));
    let l = start(host.clone(), "pre-bye", opts(5000));
    let mut dm = Dm::spawn(&["qemu", "1", "9", "1000", "1000"], Some(l.path()), &[]);
    let id = setup(&mut dm, &l, 1);
    dm.expect("ready");
    assert_eq!(
        host.call(id, 0, &pio(Dir::Read, 0x95, 1, 0)).unwrap(),
        answer(0x95, 1)
    );
    dm.expect("served vcpu=0");
    l.stop();
    let st = dm.wait();
    assert_eq!(st.code(), Some(1), "{}", dm.context());
    let log = dm.stderr();
    assert!(
        log.contains(
            "ioreq-mux-preload: the connection to the multiplexer ended: the multiplexer said goodbye (ESHUTDOWN"
        ),
        "{log}"
    );
    assert!(log.contains("exiting with status 1"), "{log}");
    assert!(!dm.seen.iter().any(|l| l == "timeout"), "{}", dm.context());
}

/// A request left unanswered past the deadline: the multiplexer says goodbye (ETIMEDOUT),
/// and the process ends with status 1 the next time it looks at its event channels.
#[test]
fn a_missed_deadline_ends_the_process_with_status_1() {
    let host = Arc::new(FakeHost::new(1).allow("qemu", my_uid(), grant()));
    let l = start(host.clone(), "pre-late", opts(300));
    let mut dm = Dm::spawn(&["qemu", "1", "9", "1000", "1"], Some(l.path()), &[]);
    let id = setup(&mut dm, &l, 1);
    dm.expect("ready");
    assert_eq!(
        host.call(id, 0, &pio(Dir::Read, 0x95, 1, 0)).unwrap(),
        answer(0x95, 1)
    );
    assert!(host.call(id, 0, &pio(Dir::Read, 0x96, 1, 0)).is_err());
    dm.expect("stalled vcpu=0");
    let st = dm.wait();
    assert_eq!(st.code(), Some(1), "{}", dm.context());
    let log = dm.stderr();
    assert!(
        log.contains(
            "the connection to the multiplexer ended: the multiplexer said goodbye (ETIMEDOUT"
        ),
        "{log}"
    );
    l.stop();
}

/// A create the multiplexer cannot serve is fatal, never a silent fallback to QEMU's own
/// Xen ioreq server: no socket, or a name it does not know.
#[test]
fn a_create_that_cannot_reach_the_multiplexer_is_fatal() {
    let missing =
        std::env::temp_dir().join(format!("ioreq-preload-{}-none.sock", std::process::id()));
    let mut dm = Dm::spawn(&["qemu", "1", "5", "1", "1"], Some(&missing), &[]);
    let st = dm.wait();
    assert_eq!(st.code(), Some(1), "{}", dm.context());
    assert!(
        !dm.seen.iter().any(|l| l.starts_with("create rc=")),
        "{}",
        dm.context()
    );
    let log = dm.stderr();
    assert!(
        log.contains(&format!(
            "ioreq-mux-preload: cannot serve this guest through the multiplexer: cannot connect to the multiplexer's device-model socket {}",
            missing.display()
        )),
        "{log}"
    );
    assert!(log.contains("Not falling back"), "{log}");

    let host = Arc::new(FakeHost::new(1).allow("qemu", my_uid(), grant()));
    let l = start(host, "pre-name", opts(2000));
    let mut dm = Dm::spawn(
        &["qemu", "1", "5", "1", "1"],
        Some(l.path()),
        &[("IOREQ_MUX_SERVER", "vgpu")],
    );
    let st = dm.wait();
    assert_eq!(st.code(), Some(1), "{}", dm.context());
    let log = dm.stderr();
    assert!(
        log.contains("did not create server \"vgpu\"") && log.contains("ENOENT"),
        "{log}"
    );
    l.stop();
}
