//! The engine on its own thread serving several vCPU threads at once, while one vCPU moves
//! and disables PCIEXBAR: every access completes exactly once, within the deadline, and a
//! configuration read returns either the right function's value or a master abort, never
//! another function's value.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use ioreq_mux_engine::{Engine, EngineConfig};
use ioreq_mux_models::DeliveryLog;
use ioreq_mux_tests::{bdf, topology};
use ioreq_server::bufioreq::BufioreqMode;
use ioreq_server::sim::SimHypervisor;
use ioreq_server::{Dir, Ioreq, IoreqType};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn cf8_read(hv: &SimHypervisor, vcpu: u32, sbdf: bdf_router::Sbdf, reg: u16) -> u64 {
    // CF8 is one latch per domain (Xen keeps it in the domain): another vCPU may change it
    // between our two accesses, exactly as on real hardware. Only ECAM is race-free.
    let cf8 = 0x8000_0000 | (u64::from(sbdf.bdf()) << 8) | u64::from(reg & 0xfc);
    hv.access(vcpu, &Ioreq::new(IoreqType::Pio, Dir::Write, 0xcf8, 4, cf8))
        .unwrap();
    hv.access(vcpu, &Ioreq::new(IoreqType::Pio, Dir::Read, 0xcfc, 4, 0))
        .unwrap()
}

#[test]
fn vcpus_race_a_moving_ecam_window() {
    let log: DeliveryLog = Arc::new(Mutex::new(vec![]));
    let hv = SimHypervisor::new(4, Duration::from_secs(5));
    let backend = hv.create_server(BufioreqMode::Atomic).unwrap();
    let cfg = EngineConfig {
        intercepts: chipset_intercept::InterceptConfig {
            low_ram_top: Some(0x8000_0000),
            ..Default::default()
        },
        chipset: None,
        ..Default::default()
    };
    let mut engine = Engine::new(backend, topology(&log), &cfg).unwrap();
    engine.backend().set_enabled(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let server = std::thread::spawn(move || {
        while !s2.load(Ordering::Relaxed) {
            engine.poll(Some(Duration::from_millis(2))).unwrap();
        }
        engine
    });
    // vCPU 0 programs PCIEXBAR once so the others have a window to start with.
    cf8_write(&hv, 0, bdf("00:00.0"), 0x60, 0xb000_0001);
    let bases = [0xb000_0000u64, 0xe000_0000];
    let readers: Vec<_> = (1..4u32)
        .map(|v| {
            let hv = hv.clone();
            std::thread::spawn(move || {
                let (mut ok, mut aborted) = (0, 0);
                for i in 0..3000u64 {
                    // LPC function 00:1f.0, vendor/device, through whichever window may exist.
                    let base = bases[(i % 2) as usize];
                    let a = base + (0x1f << 15);
                    let got = hv
                        .access(v, &Ioreq::new(IoreqType::Copy, Dir::Read, a, 4, 0))
                        .unwrap();
                    match got {
                        0x2918_8086 => ok += 1,
                        0xffff_ffff => aborted += 1,
                        other => panic!("vCPU {v} read {other:#x} through {base:#x}"),
                    }
                }
                (ok, aborted)
            })
        })
        .collect();
    // Meanwhile vCPU 0 moves the window between the two bases and disables it now and then.
    for i in 0..600u64 {
        let v = match i % 3 {
            0 => 0xe000_0001,
            1 => 0xb000_0001,
            _ => 0xb000_0000,
        };
        cf8_write(&hv, 0, bdf("00:00.0"), 0x60, v);
    }
    let mut total_ok = 0;
    for r in readers {
        let (ok, aborted) = r.join().unwrap();
        assert_eq!(ok + aborted, 3000);
        total_ok += ok;
    }
    assert!(total_ok > 0, "some reads went through a live window");
    // CF8 still reaches the right function afterwards.
    assert_eq!(cf8_read(&hv, 1, bdf("00:1f.0"), 0), 0x2918_8086);
    stop.store(true, Ordering::Relaxed);
    let engine = server.join().unwrap();
    let st = hv.check().expect("no ioreq lost, doubled or late");
    assert_eq!(st.sent, st.completed);
    assert_eq!(engine.stats().completion_errors, 0);
    assert!(
        engine.layout_history().len() >= 600,
        "{}",
        engine.layout_history().len()
    );
}

fn cf8_write(hv: &SimHypervisor, vcpu: u32, sbdf: bdf_router::Sbdf, reg: u16, v: u64) {
    let cf8 = 0x8000_0000 | (u64::from(sbdf.bdf()) << 8) | u64::from(reg & 0xfc);
    hv.access(vcpu, &Ioreq::new(IoreqType::Pio, Dir::Write, 0xcf8, 4, cf8))
        .unwrap();
    hv.access(vcpu, &Ioreq::new(IoreqType::Pio, Dir::Write, 0xcfc, 4, v))
        .unwrap();
}
