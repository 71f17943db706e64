//! Round-trip latency of one request through `RemoteModel` to an `ioreq-mux dm` process,
//! spinning versus blocking, against the same model in process. A measurement, not a
//! check: run it with
//!
//! ```text
//! cargo test --release -p ioreq-mux --test oop_latency -- --ignored --nocapture
//! ```
#![allow(clippy::unwrap_used)]

use bdf_router::Sbdf;
use chipset_intercept::Chipset;
use ioreq_mux::dm_socket::{DmSocket, Policy};
use ioreq_mux::engine::{Engine, EngineConfig, Grant, MUX};
use ioreq_mux::models::{EmulatedModel, FunctionSpec, Placement};
use ioreq_server::bufioreq::BufioreqMode;
use ioreq_server::oop::{RemoteOptions, ServerOptions};
use ioreq_server::sim::{SimBackend, SimHypervisor};
use ioreq_server::{DeviceModel, Dir, IoRange, Ioreq};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const N: usize = 20_000;

fn engine(models: Vec<Box<dyn DeviceModel>>) -> Engine<SimBackend> {
    let hv = SimHypervisor::new(1, Duration::from_secs(5));
    let backend = hv.create_server(BufioreqMode::Atomic).unwrap();
    let cfg = EngineConfig {
        chipset: Some(Chipset::Unknown),
        ..Default::default()
    };
    Engine::new(backend, models, &cfg).unwrap()
}

/// Times `N` config reads of 00:05.0 straight into the engine (no hypervisor in the way).
fn measure(e: &mut Engine<SimBackend>, f: Sbdf) -> Vec<Duration> {
    let req = Ioreq::pci_config(f.to_xen(), 0, Dir::Read, 4, 0);
    for _ in 0..1000 {
        assert_eq!(e.handle(0, &req), 0x1337_1af4);
    }
    let mut t = Vec::with_capacity(N);
    for _ in 0..N {
        let s = Instant::now();
        let v = e.handle(0, &req);
        t.push(s.elapsed());
        assert_eq!(v, 0x1337_1af4);
    }
    t.sort();
    t
}

fn report(what: &str, t: &[Duration], extra: &str) {
    let mean = t.iter().sum::<Duration>() / t.len() as u32;
    let p = |q: f64| t[((t.len() - 1) as f64 * q) as usize];
    println!(
        "{what:<44} mean {:>8.2?}  p50 {:>8.2?}  p99 {:>8.2?}  p99.9 {:>8.2?}  max {:>8.2?} {extra}",
        mean,
        p(0.5),
        p(0.99),
        p(0.999),
        t[t.len() - 1]
    );
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "measurement; run with --release --ignored --nocapture"]
fn round_trip_latency() {
    let f: Sbdf = "00:05.0".parse().unwrap();
    let spec = FunctionSpec::endpoint(0x1af4, 0x1337, 0xff0000);
    let local = EmulatedModel::new("local").with_function(Placement::Bdf(f.to_xen()), &spec);
    let mut e = engine(vec![Box::new(local)]);
    report(
        "in process (EmulatedModel in the engine)",
        &measure(&mut e, f),
        "",
    );

    for (mux_spin, dm_spin) in [
        (0u64, 0u64),
        (20, 0),
        (50, 0),
        (100, 0),
        (100, 200),
        (0, 200),
    ] {
        let mut e = engine(vec![]);
        let dir = std::env::temp_dir().join(format!("ioreq-mux-lat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("dm-{mux_spin}-{dm_spin}.sock"));
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
                spin: Duration::from_micros(mux_spin),
                deadline: Duration::from_secs(2),
                ..Default::default()
            },
            ..Default::default()
        };
        let sock = DmSocket::start(&path, vec![policy], e.control(), 1, opts).unwrap();
        let _dm = Kill(
            Command::new(env!("CARGO_BIN_EXE_ioreq-mux"))
                .args(["dm", "--socket", path.to_str().unwrap(), "--server", "ep"])
                .args([
                    "--at", "00:05.0", "--vendor", "0x1af4", "--device", "0x1337",
                ])
                .args(["--spin-us", &dm_spin.to_string()])
                .env("IOREQ_MUX_LOG", "warn")
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let t = Instant::now();
        while e.router().config_owner(f).filter(|o| *o != MUX).is_none()
            || !sock.servers().iter().any(|s| s.enabled)
        {
            assert!(t.elapsed() < Duration::from_secs(20));
            e.poll(Some(Duration::from_millis(1))).unwrap();
        }
        let times = measure(&mut e, f);
        let st = sock.servers()[0].stats;
        report(
            &format!("out of process, mux spin {mux_spin} us, dm spin {dm_spin} us"),
            &times,
            &format!("(answered spinning {}, blocked {})", st.spun, st.blocked),
        );
        sock.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
