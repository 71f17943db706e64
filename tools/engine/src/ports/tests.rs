//! Hosted ports through the simulated hypervisor: the guest enumerates a root port, enables
//! its hot-plug interrupts, and a model joining or leaving below it plugs or unplugs the slot
//! with an MSI (PCIe Base 4.0, 6.7.3); accesses to an empty slot master-abort and the port
//! records it (PCI-to-PCI Bridge 1.2, 3.2.5.7).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
use crate::{Engine, EngineConfig, HostedPortSpec};
use bdf_router::Sbdf;
use chipset_intercept::Chipset;
use ioreq_mux_models::port::{MSI_CAP_OFFSET, PortConfig};
use ioreq_mux_models::{EmulatedModel, FunctionSpec, PCIE_CAP_OFFSET, Placement};
use ioreq_server::bufioreq::BufioreqMode;
use ioreq_server::pci::{self, idx};
use ioreq_server::sim::{InjectedMsi, SimBackend, SimHypervisor};
use ioreq_server::{Dir, Ioreq, Position};
use std::time::Duration;

const PORT: &str = "0000:00:07.0";
const BELOW: &str = "0000:01:00.0";
const MSI_ADDR: u64 = 0xfee0_1000;
const MSI_DATA: u32 = 0x4041;

fn port_position() -> Position {
    Position {
        segment: 0,
        root_bus: 0,
        path: vec![7 << 3],
    }
}

fn engine() -> (SimHypervisor, Engine<SimBackend>) {
    let hv = SimHypervisor::new(2, Duration::from_secs(5));
    let backend = hv.create_server(BufioreqMode::Off).unwrap();
    let cfg = EngineConfig {
        chipset: Some(Chipset::Unknown),
        ports: vec![HostedPortSpec {
            name: "slot7".into(),
            at: port_position(),
            config: PortConfig::root_port(0x1b36, 0x000c, 7),
        }],
        ..EngineConfig::default()
    };
    let e = Engine::new(backend, vec![], &cfg).unwrap();
    hv.set_server_enabled(e.backend().id(), true).unwrap();
    (hv, e)
}

fn sbdf(s: &str) -> u32 {
    s.parse::<Sbdf>().unwrap().to_xen()
}

fn read(e: &mut Engine<SimBackend>, f: &str, reg: usize, size: u32) -> u64 {
    e.handle(
        0,
        &Ioreq::pci_config(sbdf(f), reg as u32, Dir::Read, size, 0),
    )
}

fn write(e: &mut Engine<SimBackend>, f: &str, reg: usize, size: u32, v: u64) {
    e.handle(
        0,
        &Ioreq::pci_config(sbdf(f), reg as u32, Dir::Write, size, v),
    );
    e.sync_slots();
}

/// What firmware and the guest's pciehp do before a card can arrive: bus numbers, bus
/// mastering, the port's MSI, and the slot's hot-plug interrupt enables.
fn enumerate_and_enable(e: &mut Engine<SimBackend>) {
    write(e, PORT, idx::PCI_PRIMARY_BUS, 4, 0x0001_0100);
    write(e, PORT, idx::PCI_COMMAND, 2, pci::PCI_COMMAND_MASTER.into());
    let msi = MSI_CAP_OFFSET;
    write(e, PORT, msi + idx::PCI_MSI_ADDRESS_LO, 4, MSI_ADDR);
    write(e, PORT, msi + idx::PCI_MSI_ADDRESS_HI, 4, 0);
    write(e, PORT, msi + idx::PCI_MSI_DATA_64, 2, MSI_DATA.into());
    let flags = read(e, PORT, msi + idx::PCI_MSI_FLAGS, 2);
    write(
        e,
        PORT,
        msi + idx::PCI_MSI_FLAGS,
        2,
        flags | u64::from(pci::PCI_MSI_FLAGS_ENABLE),
    );
    let enables = pci::PCI_EXP_SLTCTL_HPIE | pci::PCI_EXP_SLTCTL_PDCE | pci::PCI_EXP_SLTCTL_DLLSCE;
    write(
        e,
        PORT,
        PCIE_CAP_OFFSET + idx::PCI_EXP_SLTCTL,
        2,
        enables.into(),
    );
}

fn slot_status(e: &mut Engine<SimBackend>) -> u16 {
    read(e, PORT, PCIE_CAP_OFFSET + idx::PCI_EXP_SLTSTA, 2) as u16
}

/// The guest's pciehp acknowledges the slot's events (RW1C).
fn acknowledge(e: &mut Engine<SimBackend>) {
    let events = pci::PCI_EXP_SLTSTA_PDC | pci::PCI_EXP_SLTSTA_DLLSC | pci::PCI_EXP_SLTSTA_CC;
    write(
        e,
        PORT,
        PCIE_CAP_OFFSET + idx::PCI_EXP_SLTSTA,
        2,
        events.into(),
    );
}

fn endpoint_below() -> EmulatedModel {
    let at = Position {
        path: vec![7 << 3, 0],
        ..port_position()
    };
    EmulatedModel::new("hotplugged").with_function(
        Placement::Position(at),
        &FunctionSpec::endpoint(0x1af4, 0x1338, 0xff0000),
    )
}

fn msi(server: u16) -> InjectedMsi {
    InjectedMsi {
        server,
        addr: MSI_ADDR,
        data: MSI_DATA,
    }
}

/// The port answers as a root port with an empty hot-plug slot; an access below it finds
/// nothing, master-aborts, and the port's Secondary Status says so (RW1C).
#[test]
fn an_empty_slot_master_aborts_and_the_port_records_it() {
    let (hv, mut e) = engine();
    assert_eq!(read(&mut e, PORT, idx::PCI_VENDOR_ID, 4), 0x000c_1b36);
    enumerate_and_enable(&mut e);
    assert_eq!(slot_status(&mut e) & pci::PCI_EXP_SLTSTA_PDS, 0, "empty");
    assert_eq!(read(&mut e, BELOW, 0, 4), 0xffff_ffff);
    let sec = read(&mut e, PORT, idx::PCI_SEC_STATUS, 2) as u16;
    assert_ne!(sec & pci::PCI_SEC_STATUS_REC_MASTER_ABORT, 0);
    write(
        &mut e,
        PORT,
        idx::PCI_SEC_STATUS,
        2,
        pci::PCI_SEC_STATUS_REC_MASTER_ABORT.into(),
    );
    let sec = read(&mut e, PORT, idx::PCI_SEC_STATUS, 2) as u16;
    assert_eq!(
        sec & pci::PCI_SEC_STATUS_REC_MASTER_ABORT,
        0,
        "cleared by writing 1"
    );
    // An access on the root bus is not below the port.
    read(&mut e, "0000:00:09.0", 0, 4);
    let sec = read(&mut e, PORT, idx::PCI_SEC_STATUS, 2) as u16;
    assert_eq!(sec & pci::PCI_SEC_STATUS_REC_MASTER_ABORT, 0);
    assert!(hv.injected_msis().is_empty());
}

/// A model that joins with a function below the port plugs the slot: presence, link up,
/// one MSI; the guest then reads the function's IDs through the port. When it leaves, the
/// slot empties with one more MSI, and the function master-aborts again.
#[test]
fn a_model_joining_and_leaving_below_the_port_is_hot_plugged() {
    let (hv, mut e) = engine();
    let id = e.backend().id();
    enumerate_and_enable(&mut e);
    let ep = e.add_model(Box::new(endpoint_below())).unwrap();
    assert_eq!(hv.injected_msis(), vec![msi(id)]);
    let status = slot_status(&mut e);
    assert_ne!(status & pci::PCI_EXP_SLTSTA_PDS, 0, "present: {status:#x}");
    assert_ne!(status & pci::PCI_EXP_SLTSTA_PDC, 0);
    assert_ne!(status & pci::PCI_EXP_SLTSTA_DLLSC, 0);
    assert_eq!(read(&mut e, BELOW, 0, 4), 0x1338_1af4);
    acknowledge(&mut e);
    assert_eq!(e.stats().msis_injected, 1);

    e.remove_model(ep);
    assert_eq!(hv.injected_msis(), vec![msi(id), msi(id)]);
    let status = slot_status(&mut e);
    assert_eq!(status & pci::PCI_EXP_SLTSTA_PDS, 0, "gone: {status:#x}");
    assert_ne!(status & pci::PCI_EXP_SLTSTA_PDC, 0);
    assert_eq!(read(&mut e, BELOW, 0, 4), 0xffff_ffff);
    assert!(hv.check().is_ok());
}

/// A card present before the guest enabled anything sends nothing; the guest finds it by
/// reading Presence Detect State when it enumerates (no interrupt is lost: none was due).
#[test]
fn a_model_present_at_boot_sends_no_interrupt() {
    let (hv, mut e) = engine();
    e.add_model(Box::new(endpoint_below())).unwrap();
    assert!(hv.injected_msis().is_empty());
    assert_ne!(slot_status(&mut e) & pci::PCI_EXP_SLTSTA_PDS, 0);
    write(&mut e, PORT, idx::PCI_PRIMARY_BUS, 4, 0x0001_0100);
    assert_eq!(read(&mut e, BELOW, 0, 4), 0x1338_1af4);
}

/// Hot-add and hot-remove while three vCPUs read the function below the port through ECAM:
/// every read completes exactly once (the simulation's invariants), each answers either the
/// function's IDs or a master abort, both happen, and every slot change the guest
/// acknowledged sent exactly one MSI.
#[test]
fn hot_plug_under_traffic_on_several_vcpus_loses_and_doubles_nothing() {
    const VCPUS: u32 = 3;
    const READS: u32 = 1500;
    const TOGGLE_EVERY: u64 = 150;
    let hv = SimHypervisor::new(VCPUS, Duration::from_secs(10));
    let window = bdf_router::EcamWindow::new(0, 0xe000_0000, 0, 0x3f).unwrap();
    let cfg = EngineConfig {
        chipset: Some(Chipset::Unknown),
        ecam: vec![window],
        ports: vec![HostedPortSpec {
            name: "slot7".into(),
            at: port_position(),
            config: PortConfig::root_port(0x1b36, 0x000c, 7),
        }],
        ..EngineConfig::default()
    };
    let mut e = Engine::new(hv.create_server(BufioreqMode::Off).unwrap(), vec![], &cfg).unwrap();
    hv.set_server_enabled(e.backend().id(), true).unwrap();
    enumerate_and_enable(&mut e);
    let below = window.address_of(BELOW.parse().unwrap(), 0).unwrap();
    let guests: Vec<_> = (0..VCPUS)
        .map(|vcpu| {
            let hv = hv.clone();
            std::thread::spawn(move || {
                let req = Ioreq::new(ioreq_server::IoreqType::Copy, Dir::Read, below, 4, 0);
                (0..READS)
                    .map(|_| hv.access(vcpu, &req).unwrap())
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let mut present = None;
    let mut toggles = 0;
    let mut next = TOGGLE_EVERY;
    while !guests.iter().all(|g| g.is_finished()) {
        e.poll(Some(Duration::from_millis(1))).unwrap();
        if e.stats().requests >= next {
            next += TOGGLE_EVERY;
            toggles += 1;
            present = match present.take() {
                None => Some(e.add_model(Box::new(endpoint_below())).unwrap()),
                Some(m) => {
                    e.remove_model(m);
                    None
                }
            };
            acknowledge(&mut e);
        }
    }
    let seen: Vec<u64> = guests.into_iter().flat_map(|g| g.join().unwrap()).collect();
    assert_eq!(seen.len(), (VCPUS * READS) as usize);
    let found = seen.iter().filter(|&&v| v == 0x1338_1af4).count();
    let aborted = seen.iter().filter(|&&v| v == 0xffff_ffff).count();
    assert_eq!(
        found + aborted,
        seen.len(),
        "only the IDs or a master abort"
    );
    assert!(found > 0 && aborted > 0, "{found} found, {aborted} aborted");
    assert!(toggles >= 4, "{toggles} slot changes");
    assert_eq!(
        hv.injected_msis().len(),
        toggles,
        "one MSI per acknowledged change"
    );
    let stats = hv.check().unwrap();
    assert_eq!(stats.completed, stats.sent);
}
