//! One test per rule of the port model, each citing the spec section (PCIe base spec 4.0
//! unless named otherwise), and a property test over arbitrary configuration writes.

use super::*;
use crate::aer::{AER_ROOT_STATUS_W1C, AER_UNCOR_MASK};
use crate::{AER_OFFSET, DSN_OFFSET};
use proptest::prelude::*;

const MSI_ADDR: u64 = 0x0000_0001_fee0_100c;
const MSI_DATA: u32 = 0x4071;
const MSI: MsiMessage = MsiMessage {
    addr: MSI_ADDR,
    data: MSI_DATA,
};
/// Requester IDs of functions below the port.
const DEV_A: u16 = 0x0200;
const DEV_B: u16 = 0x0308;

fn r16(p: &PciePort, at: usize) -> u16 {
    p.read(at, 2) as u16
}

fn r32(p: &PciePort, at: usize) -> u32 {
    p.read(at, 4) as u32
}

fn slot_status(p: &PciePort) -> u16 {
    r16(p, exp(idx::PCI_EXP_SLTSTA))
}

fn link_status(p: &PciePort) -> u16 {
    r16(p, exp(idx::PCI_EXP_LNKSTA))
}

fn root_status(p: &PciePort) -> u32 {
    r32(p, AER_OFFSET + AER_ROOT_STATUS)
}

fn write16(p: &mut PciePort, at: usize, v: u16) -> Interrupt {
    p.write(at, 2, u64::from(v))
}

fn write32(p: &mut PciePort, at: usize, v: u32) -> Interrupt {
    p.write(at, 4, u64::from(v))
}

/// Firmware's part, as Linux's port driver does it: bus mastering, MSI programmed and
/// enabled (vector unmasked).
fn program_msi(p: &mut PciePort) {
    let _ = write16(p, idx::PCI_COMMAND, pci::PCI_COMMAND_MASTER);
    let _ = write32(p, msi(idx::PCI_MSI_ADDRESS_LO), MSI_ADDR as u32);
    let _ = write32(p, msi(idx::PCI_MSI_ADDRESS_HI), (MSI_ADDR >> 32) as u32);
    let _ = write16(p, msi(idx::PCI_MSI_DATA_64), MSI_DATA as u16);
    let _ = write16(p, msi(idx::PCI_MSI_FLAGS), pci::PCI_MSI_FLAGS_ENABLE);
}

/// pciehp's enables: Hot-Plug Interrupt, Presence Detect Changed, Data Link Layer State
/// Changed, Attention Button Pressed (Command Completed left out unless asked).
const HP_ENABLES: u16 = pci::PCI_EXP_SLTCTL_HPIE
    | pci::PCI_EXP_SLTCTL_PDCE
    | pci::PCI_EXP_SLTCTL_DLLSCE
    | pci::PCI_EXP_SLTCTL_ABPE;

fn root_port() -> PciePort {
    PciePort::new(&PortConfig::root_port(0x1b36, 0x000c, 7)).unwrap()
}

/// A root port with MSI on, a slot without Command Completed (so Slot Control writes raise
/// no events of their own) and the hot-plug enables set.
fn hotplug_port() -> PciePort {
    let mut cfg = PortConfig::root_port(0x1b36, 0x000c, 7);
    cfg.slot = Some(SlotConfig {
        no_command_completed: true,
        ..SlotConfig::hotplug(7)
    });
    let mut p = PciePort::new(&cfg).unwrap();
    program_msi(&mut p);
    assert_eq!(
        write16(&mut p, exp(idx::PCI_EXP_SLTCTL), HP_ENABLES),
        Interrupt::None
    );
    p
}

/// Clears every Slot Status event (RW1C).
fn clear_slot_events(p: &mut PciePort) -> Interrupt {
    write16(p, exp(idx::PCI_EXP_SLTSTA), SLOT_EVENTS)
}

// ---- slot: 6.7, 7.5.3.9-11 ----

/// 7.5.3.11: the event bits are RW1C (a 1 clears, a 0 leaves, nothing sets them);
/// Presence Detect State is RO.
#[test]
fn slot_status_events_are_rw1c_and_presence_is_read_only() {
    let mut p = hotplug_port();
    let _ = p.plug().unwrap();
    let both = pci::PCI_EXP_SLTSTA_PDC | pci::PCI_EXP_SLTSTA_DLLSC;
    assert_eq!(slot_status(&p), both | pci::PCI_EXP_SLTSTA_PDS);
    let _ = write16(&mut p, exp(idx::PCI_EXP_SLTSTA), 0);
    assert_eq!(slot_status(&p) & both, both, "writing 0 leaves them");
    let _ = write16(&mut p, exp(idx::PCI_EXP_SLTSTA), pci::PCI_EXP_SLTSTA_PDC);
    assert_eq!(slot_status(&p) & both, pci::PCI_EXP_SLTSTA_DLLSC);
    // A 1 to every bit clears the events and leaves Presence Detect State.
    let _ = write16(&mut p, exp(idx::PCI_EXP_SLTSTA), 0xffff);
    assert_eq!(slot_status(&p), pci::PCI_EXP_SLTSTA_PDS);
    let _ = p.unplug().unwrap();
    let _ = write16(&mut p, exp(idx::PCI_EXP_SLTSTA), 0xffff);
    assert_eq!(slot_status(&p), 0, "nothing sets a RW1C or RO bit");
    // A byte write to the status's high byte reaches Data Link Layer State Changed only.
    let _ = p.plug().unwrap();
    let _ = p.write(exp(idx::PCI_EXP_SLTSTA) + 1, 1, 0x01);
    assert_eq!(slot_status(&p) & both, pci::PCI_EXP_SLTSTA_PDC);
}

/// 6.7.3.3 and 7.5.3.8/7.5.3.11: a card arriving sets Presence Detect State and Changed, and
/// the link coming up sets Data Link Layer Link Active and State Changed; leaving clears
/// the states and sets the change bits again.
#[test]
fn plug_and_unplug_set_presence_and_link_changes() {
    let mut p = root_port();
    assert_eq!(slot_status(&p), 0);
    assert_eq!(link_status(&p) & pci::PCI_EXP_LNKSTA_DLLLA, 0);
    assert!(!p.is_occupied() && !p.link_active());
    let _ = p.plug().unwrap();
    assert_eq!(
        slot_status(&p),
        pci::PCI_EXP_SLTSTA_PDS | pci::PCI_EXP_SLTSTA_PDC | pci::PCI_EXP_SLTSTA_DLLSC
    );
    assert_ne!(link_status(&p) & pci::PCI_EXP_LNKSTA_DLLLA, 0);
    assert!(p.is_occupied() && p.link_active());
    assert_eq!(p.plug(), Err(SlotError::Occupied));
    let _ = clear_slot_events(&mut p);
    let _ = p.unplug().unwrap();
    assert_eq!(
        slot_status(&p),
        pci::PCI_EXP_SLTSTA_PDC | pci::PCI_EXP_SLTSTA_DLLSC
    );
    assert_eq!(link_status(&p) & pci::PCI_EXP_LNKSTA_DLLLA, 0);
    assert_eq!(p.unplug(), Err(SlotError::Empty));
}

/// 6.7.3.4: an MSI goes out when "Hot-Plug Interrupt Enable and an enabled event" goes from
/// false to true, not again while an event stays pending, and again after software cleared
/// them all.
#[test]
fn hotplug_interrupts_only_on_a_rising_edge() {
    let mut p = hotplug_port();
    assert_eq!(p.plug(), Ok(Interrupt::Msi(MSI)));
    // Clearing one of two pending events: still pending, no message.
    let pdc = pci::PCI_EXP_SLTSTA_PDC;
    assert_eq!(
        write16(&mut p, exp(idx::PCI_EXP_SLTSTA), pdc),
        Interrupt::None
    );
    // A new event while one is pending: no message either.
    assert_eq!(p.press_attention_button(), Ok(Interrupt::None));
    assert_eq!(clear_slot_events(&mut p), Interrupt::None);
    assert_eq!(p.unplug(), Ok(Interrupt::Msi(MSI)));
    assert_eq!(clear_slot_events(&mut p), Interrupt::None);
    assert_eq!(p.press_attention_button(), Ok(Interrupt::Msi(MSI)));
}

/// 6.7.3.4: an event whose enable is clear, or any event with Hot-Plug Interrupt Enable
/// clear, does not interrupt; setting the enable while the event is pending is a rising edge.
#[test]
fn hotplug_interrupts_need_their_enables() {
    let mut p = hotplug_port();
    let _ = write16(&mut p, exp(idx::PCI_EXP_SLTCTL), pci::PCI_EXP_SLTCTL_HPIE);
    assert_eq!(p.plug(), Ok(Interrupt::None), "PDC and DLLSC not enabled");
    let _ = clear_slot_events(&mut p);
    let enables = HP_ENABLES & !pci::PCI_EXP_SLTCTL_HPIE;
    let _ = write16(&mut p, exp(idx::PCI_EXP_SLTCTL), enables);
    assert_eq!(p.unplug(), Ok(Interrupt::None), "HPIE clear");
    assert_eq!(
        write16(&mut p, exp(idx::PCI_EXP_SLTCTL), HP_ENABLES),
        Interrupt::Msi(MSI),
        "enabling with PDC pending"
    );
    // DLLSC's enable is bit 12, not its status bit 8.
    let _ = clear_slot_events(&mut p);
    let no_dllsc = HP_ENABLES & !pci::PCI_EXP_SLTCTL_DLLSCE;
    let _ = write16(&mut p, exp(idx::PCI_EXP_SLTCTL), no_dllsc);
    let _ = write16(&mut p, exp(idx::PCI_EXP_LNKCTL), pci::PCI_EXP_LNKCTL_LD);
    let _ = p.plug();
    let _ = write16(&mut p, exp(idx::PCI_EXP_SLTSTA), pci::PCI_EXP_SLTSTA_PDC);
    assert_eq!(
        write16(&mut p, exp(idx::PCI_EXP_LNKCTL), 0),
        Interrupt::None,
        "link up, DLLSC set but not enabled"
    );
    assert_ne!(slot_status(&p) & pci::PCI_EXP_SLTSTA_DLLSC, 0);
}

/// 6.7.3.2 and 7.5.3.11: every Slot Control write is a command that sets Command Completed
/// (an interrupt with Command Completed Interrupt Enable); a write to Slot Status alone is
/// none; with No Command Completed Support nothing sets it and its enable is RO 0.
#[test]
fn slot_control_writes_complete_commands() {
    let mut p = root_port();
    program_msi(&mut p);
    let cc = pci::PCI_EXP_SLTSTA_CC;
    let enables = pci::PCI_EXP_SLTCTL_HPIE | pci::PCI_EXP_SLTCTL_CCIE;
    assert_eq!(
        write16(&mut p, exp(idx::PCI_EXP_SLTCTL), enables),
        Interrupt::Msi(MSI)
    );
    assert_eq!(slot_status(&p), cc);
    assert_eq!(
        write16(&mut p, exp(idx::PCI_EXP_SLTSTA), cc),
        Interrupt::None
    );
    assert_eq!(slot_status(&p), 0, "a status write is not a command");
    // A write that changes nothing is still a command.
    assert_eq!(
        write16(&mut p, exp(idx::PCI_EXP_SLTCTL), enables),
        Interrupt::Msi(MSI)
    );
    // A dword write clearing CC and writing Slot Control: cleared, then completed again.
    let both = u32::from(enables) | (u32::from(cc) << 16);
    assert_eq!(
        write32(&mut p, exp(idx::PCI_EXP_SLTCTL), both),
        Interrupt::None,
        "CC stayed pending"
    );
    assert_eq!(slot_status(&p), cc);

    let mut n = hotplug_port();
    let _ = write16(&mut n, exp(idx::PCI_EXP_SLTCTL), 0xffff);
    assert_eq!(slot_status(&n) & cc, 0);
    assert_eq!(
        r16(&n, exp(idx::PCI_EXP_SLTCTL)) & pci::PCI_EXP_SLTCTL_CCIE,
        0
    );
}

/// 7.5.3.9-10: Slot Capabilities as configured; Slot Control writes reach only the
/// controls whose capability is present; indicators start off.
#[test]
fn slot_capabilities_and_control_follow_the_configuration() {
    let p = root_port();
    let cap = r32(&p, exp(idx::PCI_EXP_SLTCAP));
    let expected = pci::PCI_EXP_SLTCAP_ABP
        | pci::PCI_EXP_SLTCAP_AIP
        | pci::PCI_EXP_SLTCAP_PIP
        | pci::PCI_EXP_SLTCAP_HPC
        | (7 << pci::PCI_EXP_SLTCAP_PSN_SHIFT);
    assert_eq!(cap, expected);
    assert_ne!(
        r16(&p, exp(idx::PCI_EXP_FLAGS)) & pci::PCI_EXP_FLAGS_SLOT,
        0
    );
    let state = p.slot_state().unwrap();
    assert_eq!(state.power_indicator, Indicator::Off);
    assert_eq!(state.attention_indicator, Indicator::Off);
    // No power controller: Power Controller Control and Power Fault enable stay 0.
    let mut p = p;
    let _ = write16(&mut p, exp(idx::PCI_EXP_SLTCTL), 0xffff);
    let ctl = r16(&p, exp(idx::PCI_EXP_SLTCTL));
    assert_eq!(
        ctl & (pci::PCI_EXP_SLTCTL_PCC | pci::PCI_EXP_SLTCTL_PFDE),
        0
    );
    assert_eq!(ctl & 0x4, 0, "no MRL sensor: its enable is RO 0");
    // A slot without hot-plug has no hot-plug enables.
    let mut cfg = PortConfig::root_port(1, 2, 3);
    cfg.slot = Some(SlotConfig {
        hotplug: false,
        attention_button: false,
        ..SlotConfig::hotplug(3)
    });
    let mut q = PciePort::new(&cfg).unwrap();
    let _ = write16(&mut q, exp(idx::PCI_EXP_SLTCTL), 0xffff);
    let ctl = r16(&q, exp(idx::PCI_EXP_SLTCTL));
    assert_eq!(ctl & (SLOT_EVENTS_LOW | pci::PCI_EXP_SLTCTL_HPIE), 0);
    assert_eq!(ctl & pci::PCI_EXP_SLTCTL_DLLSCE, 0);
}

/// 7.5.3.10 and 6.7.1.8: with a power controller the link needs the slot powered; the guest
/// switching power on with a card present brings the link up (Data Link Layer State Changed).
#[test]
fn power_controller_gates_the_link() {
    let mut cfg = PortConfig::root_port(1, 2, 3);
    cfg.slot = Some(SlotConfig {
        power_controller: true,
        ..SlotConfig::hotplug(3)
    });
    let mut p = PciePort::new(&cfg).unwrap();
    program_msi(&mut p);
    let off = HP_ENABLES | pci::PCI_EXP_SLTCTL_PCC;
    let _ = write16(&mut p, exp(idx::PCI_EXP_SLTCTL), off);
    let _ = clear_slot_events(&mut p);
    assert_eq!(p.plug(), Ok(Interrupt::Msi(MSI)));
    assert_eq!(
        slot_status(&p),
        pci::PCI_EXP_SLTSTA_PDS | pci::PCI_EXP_SLTSTA_PDC,
        "no link while off"
    );
    assert!(!p.link_active());
    let _ = clear_slot_events(&mut p);
    assert_eq!(
        write16(&mut p, exp(idx::PCI_EXP_SLTCTL), HP_ENABLES),
        Interrupt::Msi(MSI)
    );
    assert!(p.link_active());
    assert_ne!(slot_status(&p) & pci::PCI_EXP_SLTSTA_DLLSC, 0);
}

/// 7.5.3.7: Link Disable takes the link down and its release brings it back, each a Data
/// Link Layer State Changed event.
#[test]
fn link_disable_moves_the_link() {
    let mut p = hotplug_port();
    let _ = p.plug();
    let _ = clear_slot_events(&mut p);
    assert_eq!(
        write16(&mut p, exp(idx::PCI_EXP_LNKCTL), pci::PCI_EXP_LNKCTL_LD),
        Interrupt::Msi(MSI)
    );
    assert!(!p.link_active());
    assert_eq!(
        slot_status(&p) & pci::PCI_EXP_SLTSTA_DLLSC,
        pci::PCI_EXP_SLTSTA_DLLSC
    );
    let _ = clear_slot_events(&mut p);
    assert_eq!(
        write16(&mut p, exp(idx::PCI_EXP_LNKCTL), 0),
        Interrupt::Msi(MSI)
    );
    assert!(p.link_active());
}

/// 6.7.1.5 and 6.7.3.4: the attention button sets Attention Button Pressed (an interrupt
/// with its enable); the guest lets the card go by turning the power indicator off (or the
/// power off); then the card may be unplugged.
#[test]
fn attention_button_asks_for_removal() {
    let mut p = hotplug_port();
    let _ = p.plug();
    let _ = clear_slot_events(&mut p);
    let on = pci::PCI_EXP_SLTCTL_IND_ON << pci::PCI_EXP_SLTCTL_PIC_SHIFT;
    let blink = pci::PCI_EXP_SLTCTL_IND_BLINK << pci::PCI_EXP_SLTCTL_PIC_SHIFT;
    let off = pci::PCI_EXP_SLTCTL_IND_OFF << pci::PCI_EXP_SLTCTL_PIC_SHIFT;
    let _ = write16(&mut p, exp(idx::PCI_EXP_SLTCTL), HP_ENABLES | on);
    assert_eq!(p.press_attention_button(), Ok(Interrupt::Msi(MSI)));
    assert_eq!(
        slot_status(&p) & pci::PCI_EXP_SLTSTA_ABP,
        pci::PCI_EXP_SLTSTA_ABP
    );
    assert_eq!(p.slot_state().unwrap().removal, Removal::Requested);
    let _ = write16(&mut p, exp(idx::PCI_EXP_SLTCTL), HP_ENABLES | blink);
    assert_eq!(p.slot_state().unwrap().power_indicator, Indicator::Blink);
    assert_eq!(p.slot_state().unwrap().removal, Removal::Requested);
    let _ = write16(&mut p, exp(idx::PCI_EXP_SLTCTL), HP_ENABLES | off);
    assert_eq!(p.slot_state().unwrap().removal, Removal::Released);
    let _ = clear_slot_events(&mut p);
    assert_eq!(p.unplug(), Ok(Interrupt::Msi(MSI)));
    assert_eq!(p.slot_state().unwrap().removal, Removal::None);
    // A port without an attention button refuses the press; an upstream port has no slot.
    let mut cfg = PortConfig::root_port(1, 2, 3);
    cfg.slot = Some(SlotConfig {
        attention_button: false,
        ..SlotConfig::hotplug(3)
    });
    let mut q = PciePort::new(&cfg).unwrap();
    assert_eq!(
        q.press_attention_button(),
        Err(SlotError::NoAttentionButton)
    );
    let mut u = PciePort::new(&PortConfig {
        kind: PortKind::UpstreamPort,
        slot: None,
        ..cfg
    })
    .unwrap();
    assert_eq!(u.plug(), Err(SlotError::UpstreamPort));
}

// ---- link: 7.5.3.6-8, 7.5.3.18-19 ----

/// 7.5.3.6, 7.5.3.8, 7.5.3.18, 7.5.3.19: a Gen3 x8 link: Max Link Speed 3 (8 GT/s, bit 2
/// of the vector), Maximum Link Width 8, Data Link Layer Link Active Reporting Capable,
/// Port Number; Supported Link Speeds 2.5/5/8; Target Link Speed 8 GT/s; Link Status the
/// same speed and width, Link Active once a card is in.
#[test]
fn link_registers_of_a_gen3_x8_port() {
    let mut cfg = PortConfig::root_port(1, 2, 3);
    cfg.link = LinkConfig {
        speed: LinkSpeed::Gt8,
        width: LinkWidth::X8,
    };
    cfg.port_number = 5;
    let mut p = PciePort::new(&cfg).unwrap();
    assert_eq!(r32(&p, exp(idx::PCI_EXP_LNKCAP)), 0x0510_0083);
    assert_eq!(r32(&p, exp(idx::PCI_EXP_LNKCAP2)), 0b1110);
    assert_eq!(r16(&p, exp(idx::PCI_EXP_LNKCTL2)), 3);
    assert_eq!(link_status(&p), 0x0083);
    let _ = p.plug();
    assert_eq!(link_status(&p), 0x2083);
    // Read-only: writes to the capabilities and the status change nothing.
    let _ = write32(&mut p, exp(idx::PCI_EXP_LNKCAP), 0);
    let _ = write32(&mut p, exp(idx::PCI_EXP_LNKCAP2), u32::MAX);
    let _ = write16(&mut p, exp(idx::PCI_EXP_LNKSTA), 0);
    assert_eq!(r32(&p, exp(idx::PCI_EXP_LNKCAP)), 0x0510_0083);
    assert_eq!(r32(&p, exp(idx::PCI_EXP_LNKCAP2)), 0b1110);
    assert_eq!(link_status(&p), 0x2083);
    // Gen4 x16 and Gen1 x1 at the ends of the encodings.
    for (speed, width, cap, cap2) in [
        (LinkSpeed::Gt16, LinkWidth::X16, 0x0010_0104, 0b1_1110),
        (LinkSpeed::Gt2_5, LinkWidth::X1, 0x0010_0011, 0b10),
    ] {
        cfg.link = LinkConfig { speed, width };
        cfg.port_number = 0;
        let p = PciePort::new(&cfg).unwrap();
        assert_eq!(r32(&p, exp(idx::PCI_EXP_LNKCAP)), cap);
        assert_eq!(r32(&p, exp(idx::PCI_EXP_LNKCAP2)), cap2);
    }
}

/// 7.5.3.6 and 7.5.3.8: an Upstream Port does not report Data Link Layer Link Active
/// (capability and bit 0); its link is up.
#[test]
fn upstream_ports_do_not_report_link_active() {
    let p = PciePort::new(&PortConfig {
        kind: PortKind::UpstreamPort,
        slot: None,
        link: LinkConfig {
            speed: LinkSpeed::Gt5,
            width: LinkWidth::X4,
        },
        ..PortConfig::root_port(1, 2, 0)
    })
    .unwrap();
    assert_eq!(r32(&p, exp(idx::PCI_EXP_LNKCAP)), 0x42);
    assert_eq!(link_status(&p), 0x42);
    assert!(p.link_active());
    assert_eq!(
        r16(&p, exp(idx::PCI_EXP_FLAGS)) & pci::PCI_EXP_FLAGS_SLOT,
        0
    );
    assert_eq!(p.slot_state(), None);
}

/// 7.5.3.11: a port facing down without a slot has Presence Detect State hard-wired to 1.
#[test]
fn ports_without_a_slot_are_always_present() {
    let mut p = PciePort::new(&PortConfig {
        kind: PortKind::DownstreamPort,
        slot: None,
        ..PortConfig::root_port(1, 2, 0)
    })
    .unwrap();
    assert_eq!(slot_status(&p), pci::PCI_EXP_SLTSTA_PDS);
    assert_eq!(p.plug(), Ok(Interrupt::None));
    assert!(p.link_active());
    assert_eq!(slot_status(&p), pci::PCI_EXP_SLTSTA_PDS);
}

// ---- MSI: 7.7.1 ----

/// 7.7.1: the capability list runs 0x34 -> PCI Express (0x40) -> MSI -> end; MSI is 64-bit
/// with per-vector masking and one vector; the address's two low bits are reserved, the data
/// is 16 bits; the message carries the upper address.
#[test]
fn msi_capability_and_its_message() {
    let mut p = root_port();
    assert_eq!(p.read(idx::PCI_CAPABILITY_LIST, 1), 0x40);
    assert_eq!(p.read(PCIE_CAP_OFFSET + 1, 1), MSI_CAP_OFFSET as u64);
    assert_eq!(p.read(MSI_CAP_OFFSET, 1), u64::from(pci::PCI_CAP_ID_MSI));
    assert_eq!(p.read(MSI_CAP_OFFSET + 1, 1), 0);
    assert_eq!(r16(&p, msi(idx::PCI_MSI_FLAGS)), 0x180);
    let _ = write32(&mut p, msi(idx::PCI_MSI_ADDRESS_LO), 0xfee0_0fff);
    assert_eq!(r32(&p, msi(idx::PCI_MSI_ADDRESS_LO)), 0xfee0_0ffc);
    let _ = write32(&mut p, msi(idx::PCI_MSI_DATA_64), u32::MAX);
    assert_eq!(r32(&p, msi(idx::PCI_MSI_DATA_64)), 0xffff);
    let _ = write32(&mut p, msi(idx::PCI_MSI_MASK_64), u32::MAX);
    assert_eq!(
        r32(&p, msi(idx::PCI_MSI_MASK_64)),
        1,
        "one vector, one mask bit"
    );
    let _ = write16(&mut p, msi(idx::PCI_MSI_FLAGS), 0xffff);
    assert_eq!(
        r16(&p, msi(idx::PCI_MSI_FLAGS)),
        0x1f1,
        "MME and enable writable"
    );
    program_msi(&mut p);
    let _ = write32(&mut p, msi(idx::PCI_MSI_MASK_64), 0);
    assert_eq!(p.msi_message(), Some(MSI));
}

/// 7.7.1.7-8 with 6.7.3.4: while the vector is masked no message goes out and the Pending
/// bit is set; unmasking with the event still pending sends it and clears Pending; an event
/// cleared while masked leaves nothing to send.
#[test]
fn masked_vector_holds_the_message_until_unmasked() {
    let mut p = hotplug_port();
    let mask = msi(idx::PCI_MSI_MASK_64);
    let pending = msi(idx::PCI_MSI_PENDING_64);
    let _ = write32(&mut p, mask, 1);
    assert_eq!(p.plug(), Ok(Interrupt::Held));
    assert_eq!(r32(&p, pending), 1);
    let _ = write32(&mut p, pending, 0);
    assert_eq!(r32(&p, pending), 1, "Pending Bits are read-only");
    assert_eq!(write32(&mut p, mask, 0), Interrupt::Msi(MSI));
    assert_eq!(r32(&p, pending), 0);
    let _ = clear_slot_events(&mut p);
    let _ = write32(&mut p, mask, 1);
    assert_eq!(p.unplug(), Ok(Interrupt::Held));
    assert_eq!(clear_slot_events(&mut p), Interrupt::None);
    assert_eq!(r32(&p, pending), 0, "the event went away");
    assert_eq!(write32(&mut p, mask, 0), Interrupt::None);
}

/// 7.7.1.2 and 7.5.1.1.3: with MSI Enable or Bus Master Enable clear nothing is sent; the
/// message goes out when software enables them while the event is pending.
#[test]
fn msi_needs_enable_and_bus_mastering() {
    let mut p = hotplug_port();
    let _ = write16(&mut p, idx::PCI_COMMAND, 0);
    assert_eq!(p.plug(), Ok(Interrupt::Held));
    assert_eq!(p.msi_message(), None);
    assert_eq!(
        write16(&mut p, idx::PCI_COMMAND, pci::PCI_COMMAND_MASTER),
        Interrupt::Msi(MSI)
    );
    let _ = clear_slot_events(&mut p);
    let _ = write16(&mut p, msi(idx::PCI_MSI_FLAGS), 0);
    assert_eq!(p.unplug(), Ok(Interrupt::Held));
    assert_eq!(
        r32(&p, msi(idx::PCI_MSI_PENDING_64)),
        0,
        "not masked: no Pending"
    );
    assert_eq!(
        write16(&mut p, msi(idx::PCI_MSI_FLAGS), pci::PCI_MSI_FLAGS_ENABLE),
        Interrupt::Msi(MSI)
    );
}

// ---- root errors: 6.2.4.1, 7.8.4.9-11 ----

fn root_port_with_msi() -> PciePort {
    let mut p = root_port();
    program_msi(&mut p);
    p
}

fn receive(p: &mut PciePort, msg: ErrorMessage, source: u16) -> ErrorRoute {
    p.error_from_below(msg, source)
}

/// 7.8.4.10-11: the first ERR_COR sets ERR_COR Received and loads its requester ID; a second
/// sets Multiple ERR_COR Received and keeps the first source; after software clears ERR_COR
/// Received the next one loads its source again.
#[test]
fn root_error_status_records_err_cor_and_multiple() {
    let mut p = root_port_with_msi();
    let src = AER_OFFSET + AER_ERROR_SOURCE_ID;
    let _ = receive(&mut p, ErrorMessage::Correctable, DEV_A);
    assert_eq!(root_status(&p), pci::PCI_ERR_ROOT_COR_RCV);
    assert_eq!(r32(&p, src), u32::from(DEV_A));
    let _ = receive(&mut p, ErrorMessage::Correctable, DEV_B);
    assert_eq!(
        root_status(&p),
        pci::PCI_ERR_ROOT_COR_RCV | pci::PCI_ERR_ROOT_MULTI_COR_RCV
    );
    assert_eq!(r32(&p, src), u32::from(DEV_A), "the first source stays");
    let _ = write32(&mut p, AER_OFFSET + AER_ROOT_STATUS, u32::MAX);
    assert_eq!(root_status(&p), 0, "RW1C");
    let _ = write32(&mut p, src, 0);
    assert_eq!(
        r32(&p, src),
        u32::from(DEV_A),
        "source identification is RO"
    );
    let _ = receive(&mut p, ErrorMessage::Correctable, DEV_B);
    assert_eq!(r32(&p, src), u32::from(DEV_B));
}

/// 7.8.4.10-11: ERR_FATAL/NONFATAL Received with the first uncorrectable message, loading its
/// source in bits 31:16; First Uncorrectable Fatal only when that first one is ERR_FATAL;
/// Multiple ERR_FATAL/NONFATAL for the next; Non-Fatal and Fatal Error Messages Received per
/// kind.
#[test]
fn root_error_status_records_uncorrectable_and_first_fatal() {
    let mut p = root_port_with_msi();
    let src = AER_OFFSET + AER_ERROR_SOURCE_ID;
    let _ = receive(&mut p, ErrorMessage::NonFatal, DEV_A);
    let _ = receive(&mut p, ErrorMessage::Fatal, DEV_B);
    assert_eq!(
        root_status(&p),
        pci::PCI_ERR_ROOT_UNCOR_RCV
            | pci::PCI_ERR_ROOT_MULTI_UNCOR_RCV
            | pci::PCI_ERR_ROOT_NONFATAL_RCV
            | pci::PCI_ERR_ROOT_FATAL_RCV,
        "the first was non-fatal: no First Uncorrectable Fatal"
    );
    assert_eq!(r32(&p, src), u32::from(DEV_A) << 16);
    let _ = write32(&mut p, AER_OFFSET + AER_ROOT_STATUS, u32::MAX);
    let _ = receive(&mut p, ErrorMessage::Correctable, DEV_A);
    let _ = receive(&mut p, ErrorMessage::Fatal, DEV_B);
    assert_eq!(
        root_status(&p),
        pci::PCI_ERR_ROOT_COR_RCV
            | pci::PCI_ERR_ROOT_UNCOR_RCV
            | pci::PCI_ERR_ROOT_FIRST_FATAL
            | pci::PCI_ERR_ROOT_FATAL_RCV
    );
    assert_eq!(r32(&p, src), u32::from(DEV_B) << 16 | u32::from(DEV_A));
    // The bits are exactly the RW1C ones aer.rs declares.
    let all = pci::PCI_ERR_ROOT_COR_RCV
        | pci::PCI_ERR_ROOT_MULTI_COR_RCV
        | pci::PCI_ERR_ROOT_UNCOR_RCV
        | pci::PCI_ERR_ROOT_MULTI_UNCOR_RCV
        | pci::PCI_ERR_ROOT_FIRST_FATAL
        | pci::PCI_ERR_ROOT_NONFATAL_RCV
        | pci::PCI_ERR_ROOT_FATAL_RCV;
    assert_eq!(all, AER_ROOT_STATUS_W1C);
}

/// 6.2.4.1.2 and 7.8.4.9: Root Error Status is recorded whatever Root Error Command says;
/// an interrupt goes out when an enable and its "messages received" bit are both set and
/// were not before: none for a kind not enabled, one when enabling with the status pending,
/// none for another message of a pending kind.
#[test]
fn root_error_command_decides_the_interrupt() {
    let mut p = root_port_with_msi();
    let command = AER_OFFSET + AER_ROOT_COMMAND;
    assert_eq!(
        receive(&mut p, ErrorMessage::Correctable, DEV_A),
        ErrorRoute::Logged(Interrupt::None)
    );
    assert_eq!(
        write32(&mut p, command, pci::PCI_ERR_ROOT_CMD_COR_EN),
        Interrupt::Msi(MSI)
    );
    assert_eq!(
        receive(&mut p, ErrorMessage::Correctable, DEV_A),
        ErrorRoute::Logged(Interrupt::None)
    );
    assert_eq!(
        receive(&mut p, ErrorMessage::Fatal, DEV_A),
        ErrorRoute::Logged(Interrupt::None),
        "fatal reporting not enabled"
    );
    let _ = write32(&mut p, AER_OFFSET + AER_ROOT_STATUS, u32::MAX);
    let _ = write32(&mut p, command, pci::PCI_ERR_ROOT_CMD_NONFATAL_EN);
    assert_eq!(
        receive(&mut p, ErrorMessage::Fatal, DEV_A),
        ErrorRoute::Logged(Interrupt::None),
        "ERR_FATAL goes with the fatal enable, not the non-fatal one"
    );
    assert_eq!(
        receive(&mut p, ErrorMessage::NonFatal, DEV_B),
        ErrorRoute::Logged(Interrupt::Msi(MSI))
    );
    // Hot-plug and root errors share the vector but each has its own edge.
    let _ = write16(&mut p, exp(idx::PCI_EXP_SLTCTL), HP_ENABLES);
    let _ = clear_slot_events(&mut p);
    assert_eq!(p.plug(), Ok(Interrupt::Msi(MSI)));
}

/// 7.5.1.3.13, 7.5.1.3.7, 7.5.1.1.4: a Switch Port forwards error messages from its
/// secondary side only with SERR# Enable; ERR_NONFATAL/FATAL set Received System Error, and
/// Signaled System Error when forwarded.
#[test]
fn switch_ports_forward_errors_with_serr_enable() {
    let mut p = PciePort::new(&PortConfig {
        kind: PortKind::DownstreamPort,
        ..PortConfig::root_port(1, 2, 3)
    })
    .unwrap();
    let sec = idx::PCI_SEC_STATUS;
    assert_eq!(
        receive(&mut p, ErrorMessage::Correctable, DEV_A),
        ErrorRoute::Dropped
    );
    assert_eq!(r16(&p, sec), 0);
    assert_eq!(
        receive(&mut p, ErrorMessage::NonFatal, DEV_A),
        ErrorRoute::Dropped
    );
    assert_eq!(r16(&p, sec), pci::PCI_SEC_STATUS_REC_SYSTEM_ERROR);
    assert_eq!(
        r16(&p, idx::PCI_STATUS) & pci::PCI_STATUS_SIG_SYSTEM_ERROR,
        0
    );
    let _ = write16(&mut p, idx::PCI_BRIDGE_CONTROL, pci::PCI_BRIDGE_CTL_SERR);
    assert_eq!(
        receive(&mut p, ErrorMessage::Fatal, DEV_A),
        ErrorRoute::Forward(ErrorMessage::Fatal)
    );
    let sig = pci::PCI_STATUS_SIG_SYSTEM_ERROR;
    assert_eq!(r16(&p, idx::PCI_STATUS) & sig, sig);
    let _ = write16(&mut p, idx::PCI_STATUS, sig);
    let _ = write16(&mut p, sec, pci::PCI_SEC_STATUS_REC_SYSTEM_ERROR);
    assert_eq!(r16(&p, idx::PCI_STATUS) & sig, 0, "RW1C");
    assert_eq!(r16(&p, sec), 0, "RW1C");
    assert_eq!(
        receive(&mut p, ErrorMessage::Correctable, DEV_A),
        ErrorRoute::Forward(ErrorMessage::Correctable)
    );
}

/// 6.2.5 with 7.5.3.4: the port's own error is recorded in its AER capability and sent only
/// if Device Control enables its kind (or SERR# Enable, for uncorrectable ones) and it is
/// not masked; a Root Port then logs it as received.
#[test]
fn own_errors_follow_device_control_and_masks() {
    let mut p = root_port_with_msi();
    let me = 0x0010;
    assert_eq!(
        p.report_error(AerError::BadTlp, None, me),
        Ok(ErrorRoute::Dropped)
    );
    let _ = write16(&mut p, exp(idx::PCI_EXP_DEVCTL), pci::PCI_EXP_DEVCTL_CERE);
    let _ = write32(&mut p, AER_OFFSET + AER_ROOT_COMMAND, 0x7);
    assert_eq!(
        p.report_error(AerError::BadTlp, None, me),
        Ok(ErrorRoute::Logged(Interrupt::Msi(MSI)))
    );
    assert_eq!(r32(&p, AER_OFFSET + AER_ERROR_SOURCE_ID), u32::from(me));
    assert_eq!(
        p.report_error(AerError::UnsupportedRequest, None, me),
        Ok(ErrorRoute::Dropped),
        "non-fatal reporting off"
    );
    let _ = write32(&mut p, AER_OFFSET + AER_ROOT_STATUS, u32::MAX);
    let _ = write16(
        &mut p,
        idx::PCI_COMMAND,
        pci::PCI_COMMAND_MASTER | pci::PCI_COMMAND_SERR,
    );
    assert_eq!(
        p.report_error(AerError::UnsupportedRequest, None, me),
        Ok(ErrorRoute::Logged(Interrupt::Msi(MSI))),
        "SERR# Enable lets it out"
    );
    let _ = write32(&mut p, AER_OFFSET + AER_UNCOR_MASK, u32::MAX);
    assert_eq!(
        p.report_error(AerError::MalformedTlp, None, me),
        Ok(ErrorRoute::Dropped),
        "masked"
    );
    // A switch port sends its own error upstream.
    let mut d = PciePort::new(&PortConfig {
        kind: PortKind::DownstreamPort,
        ..PortConfig::root_port(1, 2, 3)
    })
    .unwrap();
    let _ = write16(&mut d, exp(idx::PCI_EXP_DEVCTL), pci::PCI_EXP_DEVCTL_FERE);
    assert_eq!(
        d.report_error(AerError::MalformedTlp, None, me),
        Ok(ErrorRoute::Forward(ErrorMessage::Fatal))
    );
}

// ---- bridge status: PCI-to-PCI Bridge spec 1.2, 3.2.5.7 ----

/// PCI-to-PCI Bridge spec 1.2, 3.2.5.7 (PCIe base spec 4.0, 7.5.1.3.7): Received Master Abort
/// is set when an access below the port finds no function, and is RW1C.
#[test]
fn received_master_abort_is_set_and_rw1c() {
    let mut p = root_port();
    let ma = pci::PCI_SEC_STATUS_REC_MASTER_ABORT;
    let _ = write16(&mut p, idx::PCI_SEC_STATUS, 0xffff);
    assert_eq!(r16(&p, idx::PCI_SEC_STATUS), 0, "writing 1 never sets");
    p.note_master_abort();
    assert_eq!(r16(&p, idx::PCI_SEC_STATUS), ma);
    let _ = write16(&mut p, idx::PCI_SEC_STATUS, 0);
    assert_eq!(r16(&p, idx::PCI_SEC_STATUS), ma, "writing 0 leaves it");
    // The byte holding bit 13 is 0x1f; a byte write of 0x20 clears it.
    let _ = p.write(idx::PCI_SEC_STATUS + 1, 1, 0x20);
    assert_eq!(r16(&p, idx::PCI_SEC_STATUS), 0);
}

/// 7.2.2.2 (as PciFunction::read): an access past the 4 KiB space is not claimed and reads
/// all ones of its size, a write there changes nothing (the fuzz target's first find: a
/// 2-byte read at 0xfff read 8 bytes of ones); a size no access has reads all ones.
#[test]
fn accesses_past_the_space_read_all_ones_of_their_size() {
    let mut p = root_port();
    assert_eq!(p.read(0xfff, 2), 0xffff);
    assert_eq!(p.read(0x1000, 4), 0xffff_ffff);
    assert_eq!(p.read(usize::MAX, 4), 0xffff_ffff);
    assert_eq!(p.read(0, 0), u64::MAX);
    assert_eq!(p.read(0, 9), u64::MAX);
    assert_eq!(p.write(usize::MAX, 4, 0), Interrupt::None);
    assert_eq!(
        p.write(exp(idx::PCI_EXP_SLTCTL), 16, u64::MAX),
        Interrupt::None
    );
    assert_eq!(
        r16(&p, exp(idx::PCI_EXP_SLTCTL)),
        SlotConfig::hotplug(7).control_reset()
    );
}

// ---- configuration ----

/// What PortConfig::check refuses, and the serde names of the topology file.
#[test]
fn configurations_that_cannot_be_built() {
    let up = PortConfig {
        kind: PortKind::UpstreamPort,
        ..PortConfig::root_port(1, 2, 3)
    };
    assert_eq!(
        PciePort::new(&up).err(),
        Some(PortConfigError::SlotOnUpstreamPort)
    );
    let mut cfg = PortConfig::root_port(1, 2, 0x2000);
    assert_eq!(
        PciePort::new(&cfg).err(),
        Some(PortConfigError::SlotNumber(0x2000))
    );
    cfg.slot = Some(SlotConfig {
        power_indicator: false,
        ..SlotConfig::hotplug(1)
    });
    assert_eq!(
        PciePort::new(&cfg).err(),
        Some(PortConfigError::NoReleaseSignal)
    );
    cfg.slot = Some(SlotConfig {
        hotplug: false,
        surprise: true,
        ..SlotConfig::hotplug(1)
    });
    assert_eq!(
        PciePort::new(&cfg).err(),
        Some(PortConfigError::SurpriseWithoutHotplug)
    );
    let parsed: PortConfig = toml::from_str(
        r#"
        kind = "root-port"
        vendor = 0x1b36
        device = 0x000c
        link = { speed = "8GT/s", width = "x8" }
        slot = { number = 4, power-controller = true }
        "#,
    )
    .unwrap();
    assert_eq!(parsed.link.speed, LinkSpeed::Gt8);
    assert_eq!(parsed.link.width, LinkWidth::X8);
    let slot = parsed.slot.unwrap();
    assert!(slot.hotplug && slot.power_controller && slot.attention_button);
}

// ---- property: read-only fields stay ----

/// (offset, size) of fields no write may change: IDs, class, header type, capability
/// pointer, the PCI Express capability's header, flags and Device/Link/Slot Capabilities,
/// Link Capabilities 2, the MSI header, the extended capability headers and DSN.
const READ_ONLY: [(usize, usize); 14] = [
    (idx::PCI_VENDOR_ID, 4),
    (idx::PCI_CLASS_REVISION, 4),
    (idx::PCI_HEADER_TYPE, 1),
    (idx::PCI_CAPABILITY_LIST, 1),
    (PCIE_CAP_OFFSET, 4),
    (exp(idx::PCI_EXP_DEVCAP), 4),
    (exp(idx::PCI_EXP_LNKCAP), 4),
    (exp(idx::PCI_EXP_SLTCAP), 4),
    (exp(idx::PCI_EXP_LNKCAP2), 4),
    (MSI_CAP_OFFSET, 2),
    (DSN_OFFSET, 4),
    (DSN_OFFSET + 4, 8),
    (AER_OFFSET, 4),
    (AER_OFFSET + AER_ERROR_SOURCE_ID, 4),
];

/// An operation of the property test.
#[derive(Debug, Clone)]
enum Op {
    Write(usize, usize, u64),
    Plug,
    Unplug,
    Button,
    Error(u8, u16),
    MasterAbort,
}

fn op() -> impl Strategy<Value = Op> {
    let reg = prop_oneof![
        0usize..0x40,
        PCIE_CAP_OFFSET..MSI_CAP_OFFSET + MSI_CAP_SIZE,
        AER_OFFSET..AER_OFFSET + 0x38,
        0usize..0x1004,
    ];
    let size = prop_oneof![Just(1usize), Just(2), Just(4), 0usize..12];
    prop_oneof![
        6 => (reg, size, any::<u64>()).prop_map(|(r, s, d)| Op::Write(r, s, d)),
        1 => Just(Op::Plug),
        1 => Just(Op::Unplug),
        1 => Just(Op::Button),
        1 => (0u8..3, any::<u16>()).prop_map(|(k, s)| Op::Error(k, s)),
        1 => Just(Op::MasterAbort),
    ]
}

fn apply(p: &mut PciePort, op: &Op) {
    match *op {
        Op::Write(r, s, d) => {
            let _ = p.write(r, s, d);
        }
        Op::Plug => {
            let _ = p.plug();
        }
        Op::Unplug => {
            let _ = p.unplug();
        }
        Op::Button => {
            let _ = p.press_attention_button();
        }
        Op::Error(k, s) => {
            let msg = [
                ErrorMessage::Correctable,
                ErrorMessage::NonFatal,
                ErrorMessage::Fatal,
            ][usize::from(k)];
            let _ = p.error_from_below(msg, s);
        }
        Op::MasterAbort => p.note_master_abort(),
    }
}

fn kind_config(kind: u8, power: bool) -> PortConfig {
    let kind = [
        PortKind::RootPort,
        PortKind::DownstreamPort,
        PortKind::UpstreamPort,
    ][usize::from(kind % 3)];
    let slot = kind.faces_down().then_some(SlotConfig {
        power_controller: power,
        ..SlotConfig::hotplug(9)
    });
    PortConfig {
        kind,
        slot,
        link: LinkConfig {
            speed: LinkSpeed::Gt8,
            width: LinkWidth::X8,
        },
        ..PortConfig::root_port(0x8086, 0x1234, 0)
    }
}

proptest! {
    /// Arbitrary writes (any register, any size, in and out of range) and slot and error
    /// operations never panic, never change a read-only field (PCI Local Bus 6.1, 7.5.3.3,
    /// 7.5.3.6, 7.5.3.9, 7.5.3.18, 7.7.1.1-2: the fields are RO or HwInit), never the
    /// speed and width in Link Status; Presence Detect State and Link Active follow the port.
    #[test]
    fn writes_never_break_read_only_fields(
        kind in 0u8..3,
        power in any::<bool>(),
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        let mut p = PciePort::new(&kind_config(kind, power)).unwrap();
        let fields = |p: &PciePort| -> Vec<u64> {
            READ_ONLY
                .iter()
                .map(|&(at, n)| (0..n).map(|i| p.read(at + i, 1) << (8 * i)).sum())
                .collect()
        };
        let msi_ro = r16(&p, msi(idx::PCI_MSI_FLAGS)) & !0x71;
        for op in &ops {
            let before = fields(&p);
            apply(&mut p, op);
            let error = matches!(op, Op::Error(..));
            for ((&(at, _), old), now) in READ_ONLY.iter().zip(before).zip(fields(&p)) {
                // Error Source Identification is loaded by a received error (7.8.4.11).
                let loaded = error && at == AER_OFFSET + AER_ERROR_SOURCE_ID;
                prop_assert!(now == old || loaded, "{:#x} changed by {:?}", at, op);
            }
            prop_assert_eq!(r16(&p, msi(idx::PCI_MSI_FLAGS)) & !0x71, msi_ro);
            prop_assert_eq!(link_status(&p) & 0x3ff, 0x83);
            let dllla = link_status(&p) & pci::PCI_EXP_LNKSTA_DLLLA != 0;
            prop_assert_eq!(dllla, p.kind().faces_down() && p.link_active());
            if p.kind().faces_down() {
                let pds = slot_status(&p) & pci::PCI_EXP_SLTSTA_PDS != 0;
                prop_assert_eq!(pds, p.is_occupied());
            }
        }
    }
}
