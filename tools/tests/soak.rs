//! Soak: 8 vCPUs of mixed traffic (ECAM, CF8, ports, MMIO) against a chipset model in process
//! and a device model in its own process that is killed and restarted over and over, while
//! vCPU 0 moves and disables PCIEXBAR. Every access must complete once, within the deadline,
//! with either the right value or a master abort.
//!
//! Bounded: `SOAK_SECONDS` (default 10; CI runs 60). Run with
//! `cargo test --release -p ioreq-mux --test soak -- --ignored --nocapture`.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use ioreq_mux::config::Config;
use ioreq_mux::dm_socket::DmSocket;
use ioreq_mux::engine::{Engine, EngineConfig};
use ioreq_mux::models::{EmulatedModel, FunctionSpec, Placement};
use ioreq_server::bufioreq::BufioreqMode;
use ioreq_server::oop::server::ServerOptions;
use ioreq_server::sim::SimHypervisor;
use ioreq_server::{Dir, IoRange, Ioreq, IoreqType, abi};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const VCPUS: u32 = 8;
const BAR: u64 = 0xc000_0000;

const CONFIG: &str = r#"
[[server]]
name = "vgpu"
kind = "process"
owns.bdf = ["00:05.0"]
owns.mmio = ["0xc0000000+0x100000"]
"#;

fn chipset() -> EmulatedModel {
    let f = |s: &str| Placement::Bdf(s.parse::<bdf_router::Sbdf>().unwrap().to_xen());
    EmulatedModel::new("chipset")
        .with_function(
            f("00:00.0"),
            &FunctionSpec {
                pcie: false,
                ..FunctionSpec::endpoint(0x8086, 0x29c0, 0x060000)
            },
        )
        .with_function(
            f("00:1f.0"),
            &FunctionSpec {
                pcie: false,
                ..FunctionSpec::endpoint(0x8086, 0x2918, 0x060100)
            },
        )
        .with_range(IoRange::ports(0x70, 0x71))
}

fn start_dm(socket: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ioreq-mux"))
        .args([
            "dm", "--server", "vgpu", "--at", "00:05.0", "--vendor", "0x1af4", "--device", "0x1337",
        ])
        .args([
            "--class",
            "0xff0000",
            "--bar",
            "mem32:0x1000",
            "--spin-us",
            "50",
            "--socket",
        ])
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
#[ignore = "soak: run explicitly (CI does, for 60 s)"]
fn soak() {
    let secs: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let dir = std::env::temp_dir().join(format!("ioreq-mux-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg_path = dir.join("soak.toml");
    std::fs::write(&cfg_path, CONFIG).unwrap();
    let cfg = Config::load(&cfg_path).unwrap();
    let socket = dir.join("dm.sock");

    let hv = SimHypervisor::new(VCPUS, Duration::from_secs(5));
    let backend = hv.create_server(BufioreqMode::Atomic).unwrap();
    let ecfg = EngineConfig {
        chipset: Some(chipset_intercept::Chipset::Q35),
        intercepts: chipset_intercept::InterceptConfig {
            low_ram_top: Some(0x8000_0000),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut engine = Engine::new(backend, vec![Box::new(chipset())], &ecfg).unwrap();
    engine.backend().set_enabled(true).unwrap();
    let dm = DmSocket::from_config(
        &socket,
        &cfg,
        engine.control(),
        VCPUS,
        ServerOptions::default(),
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let server = std::thread::spawn(move || {
        while !s2.load(Ordering::Relaxed) {
            engine.poll(Some(Duration::from_millis(2))).unwrap();
        }
        engine
    });

    let deadline = Instant::now() + Duration::from_secs(secs);
    let wrong = Arc::new(AtomicU64::new(0));
    let aborted = Arc::new(AtomicU64::new(0));
    let mut child = start_dm(&socket);
    let faults = Arc::new(AtomicU64::new(0));

    // vCPU 0: the firmware. Moves PCIEXBAR, (re)programs the device's BAR after every restart.
    let fw = {
        let hv = hv.clone();
        std::thread::spawn(move || {
            let cf8 = |hv: &SimHypervisor, sbdf: u32, reg: u64, size: u32, v: u64| {
                let a = 0x8000_0000 | (u64::from(sbdf & 0xffff) << 8) | (reg & 0xfc);
                hv.access(0, &Ioreq::new(IoreqType::Pio, Dir::Write, 0xcf8, 4, a))
                    .unwrap();
                hv.access(
                    0,
                    &Ioreq::new(IoreqType::Pio, Dir::Write, 0xcfc + (reg & 3), size, v),
                )
                .unwrap();
            };
            let dev = abi::pack_sbdf(0, 0, 5, 0);
            let mut i = 0u64;
            while Instant::now() < deadline {
                let v = [0xb000_0001u64, 0xe000_0005, 0xb000_0000][(i % 3) as usize];
                cf8(&hv, 0, 0x60, 4, v);
                cf8(&hv, dev, 0x10, 4, BAR);
                cf8(&hv, dev, 0x04, 2, 2);
                i += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            i
        })
    };
    let readers: Vec<_> = (1..VCPUS)
        .map(|v| {
            let hv = hv.clone();
            let wrong = wrong.clone();
            let aborted = aborted.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let pick = (n + u64::from(v)) % 5;
                    let (req, want) = match pick {
                        // The MCH's IDs through either possible window.
                        0 => (
                            Ioreq::new(IoreqType::Copy, Dir::Read, 0xb000_0000, 4, 0),
                            0x29c0_8086,
                        ),
                        1 => (
                            Ioreq::new(IoreqType::Copy, Dir::Read, 0xe000_0000, 4, 0),
                            0x29c0_8086,
                        ),
                        // The out-of-process function's IDs through ECAM.
                        2 => (
                            Ioreq::new(IoreqType::Copy, Dir::Read, 0xb000_0000 + (5 << 15), 4, 0),
                            0x1337_1af4,
                        ),
                        // Its BAR.
                        3 => (
                            Ioreq::new(IoreqType::Copy, Dir::Read, BAR + 0x10, 4, 0),
                            0xcafe_0010,
                        ),
                        // A chipset port.
                        _ => (Ioreq::new(IoreqType::Pio, Dir::Read, 0x70, 1, 0), 0x70),
                    };
                    match hv.access(v, &req) {
                        Ok(got) if got == want => {}
                        Ok(got) if got == ioreq_server::size_mask(req.size) => {
                            aborted.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(got) => {
                            eprintln!("vCPU {v}: {req:?} -> {got:#x}, want {want:#x}");
                            wrong.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("vCPU {v}: {e}"),
                    }
                    n += 1;
                }
                n
            })
        })
        .collect();

    // The fault injector: kill the device model every 500 ms, restart it 100 ms later.
    while Instant::now() + Duration::from_millis(600) < deadline {
        std::thread::sleep(Duration::from_millis(500));
        let _ = child.kill();
        let _ = child.wait();
        faults.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(100));
        child = start_dm(&socket);
    }
    let moves = fw.join().unwrap();
    let accesses: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    let _ = child.kill();
    let _ = child.wait();
    dm.stop();
    stop.store(true, Ordering::Relaxed);
    let engine = server.join().unwrap();
    let st = hv.check();
    let stats = hv.stats();
    let lost_or_doubled = stats.sent.abs_diff(stats.completed);
    println!(
        "soak: {secs} s, {} ioreqs served, {accesses} reader accesses ({} master aborts), {moves} PCIEXBAR moves, {} faults injected, {} wrong values, lost/doubled = {lost_or_doubled}, model errors {}",
        stats.completed,
        aborted.load(Ordering::Relaxed),
        faults.load(Ordering::Relaxed),
        wrong.load(Ordering::Relaxed),
        engine.stats().dm_errors,
    );
    assert!(st.is_ok(), "{st:?}");
    assert_eq!(lost_or_doubled, 0);
    assert_eq!(wrong.load(Ordering::Relaxed), 0);
    assert!(
        faults.load(Ordering::Relaxed) >= secs.min(10) as u64,
        "faults were injected"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
