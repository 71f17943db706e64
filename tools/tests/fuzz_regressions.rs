//! Inputs the fuzz targets (`fuzz/`, `scripts/fuzz.sh`) crashed on, replayed as plain tests.

#![allow(clippy::unwrap_used)]

use ioreq_mux::engine::{Engine, EngineConfig};
use ioreq_mux::models::{DeliveryLog, EmulatedModel, FunctionSpec, Placement};
use ioreq_server::abi::pack_sbdf;
use ioreq_server::bufioreq::BufioreqMode;
use ioreq_server::sim::{SimBackend, SimHypervisor};
use ioreq_server::{DeviceModel, Dir, Ioreq};
use std::time::Duration;

/// A Q35 chipset model (MCH and LPC) behind the engine on the simulated hypervisor.
fn q35(log: &DeliveryLog) -> Engine<SimBackend> {
    let hv = SimHypervisor::new(1, Duration::from_secs(5));
    let backend = hv.create_server(BufioreqMode::Atomic).unwrap();
    let chipset = EmulatedModel::new("chipset")
        .with_function(
            Placement::Bdf(pack_sbdf(0, 0, 0, 0)),
            &FunctionSpec {
                pcie: false,
                ..FunctionSpec::endpoint(0x8086, 0x29c0, 0x060000)
            },
        )
        .with_function(
            Placement::Bdf(pack_sbdf(0, 0, 0x1f, 0)),
            &FunctionSpec {
                pcie: false,
                ..FunctionSpec::endpoint(0x8086, 0x2918, 0x060100)
            },
        )
        .with_log(log.clone());
    let models: Vec<Box<dyn DeviceModel>> = vec![Box::new(chipset)];
    Engine::new(backend, models, &EngineConfig::default()).unwrap()
}

fn pciexbar(e: &Engine<SimBackend>) -> u64 {
    e.intercepts()
        .snapshot()
        .iter()
        .find(|(name, _, _)| *name == "pciexbar")
        .map(|x| x.2)
        .unwrap()
}

/// `engine` input `00 71 00 00 03 03 ...` (Q35; a PCI_CONFIG read of 8 bytes at register 3
/// of 00:00.0 handed to `Engine::handle`): it passed validation and `Router::observe_read`
/// panicked shifting the value by 64 bits to find the class code's second byte. Xen never
/// makes such a request: it is malformed, answered as a master abort.
#[test]
fn engine_eight_byte_pci_config_read() {
    let log = DeliveryLog::default();
    let mut e = q35(&log);
    for reg in [3, 0, 8, 0x0b, 0xff8] {
        let req = Ioreq::pci_config(0, reg, Dir::Read, 8, 0);
        assert_eq!(e.handle(0, &req), u64::MAX, "register {reg:#x}");
    }
    assert_eq!(e.stats().malformed, 5);
}

/// The same root cause on the write side: a PCI_CONFIG write that crosses into PCIEXBAR
/// from the dword below (4 bytes at 0x5e) was looked up in dword 0x5c only, so the bytes of
/// PCIEXBAR, a register the multiplexer owns ("instead" of the model), went to the model and
/// the ECAM window did not follow. Now it is malformed: nobody sees it.
#[test]
fn engine_pci_config_write_across_a_dword_does_not_bypass_pciexbar() {
    let log = DeliveryLog::default();
    let mut e = q35(&log);
    let before = log.lock().unwrap().len();
    let req = Ioreq::pci_config(0, 0x5e, Dir::Write, 4, 0x0001_0000);
    e.handle(0, &req);
    assert_eq!(log.lock().unwrap().len(), before, "the model saw nothing");
    assert_eq!(pciexbar(&e), 0xb000_0000);
    assert!(e.router().windows().is_empty());
    // The well-formed way in still works: one byte at 0x60 enables the window.
    e.handle(0, &Ioreq::pci_config(0, 0x60, Dir::Write, 1, 1));
    assert_eq!(pciexbar(&e), 0xb000_0001);
    assert_eq!(e.router().windows().len(), 1);
}
