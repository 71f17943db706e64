//! Target `pcie_port`: an emulated PCI Express port (`ioreq_mux_models::port::PciePort`) of
//! any kind, link and slot, driven by arbitrary configuration reads and writes, plugs,
//! unplugs, attention button presses, error messages from below, its own errors and master
//! aborts. After every operation:
//!
//! - nothing panicked, and reads of 1-8 bytes return at most their size's bits;
//! - read-only fields (IDs, class, header type, capability pointers and IDs, Device, Link and
//!   Slot Capabilities, Link Capabilities 2, MSI's capability bits, the extended capability
//!   headers and DSN) and Link Status's speed and width never change;
//! - Presence Detect State and Data Link Layer Link Active follow the port;
//! - the interrupt returned is what the edge rules say, computed here from the registers as
//!   the guest reads them (PCIe base spec 4.0, 6.7.3.4 hot-plug, 6.2.4.1.2 root errors):
//!   an MSI with the programmed address and data exactly when a source's condition (with the
//!   vector unmasked, MSI and bus mastering enabled) rose, `Held` when an event condition rose
//!   that MSI cannot carry now, and the Pending bit set while an event waits behind the mask;
//! - error routes: only Root Ports log, only Switch Ports forward, and only with SERR#;
//! - a master abort sets Received Master Abort.
//!
//! Input: kind, speed, width, slot flags, slot number; then operations, an opcode byte each.

use crate::Bytes;
use ioreq_mux_models::aer::{
    AER_ERROR_SOURCE_ID, AER_HEADER_LOG_DWORDS, AER_ROOT_COMMAND, AER_ROOT_STATUS,
};
use ioreq_mux_models::port::{
    ErrorRoute, Interrupt, LinkConfig, LinkSpeed, LinkWidth, MSI_CAP_OFFSET, MsiMessage, PciePort,
    PortConfig, PortKind, SlotConfig,
};
use ioreq_mux_models::{AER_OFFSET, AerError, DSN_OFFSET, ErrorMessage, PCIE_CAP_OFFSET};
use ioreq_server::pci::{self, idx};
use ioreq_server::size_mask;

const SPEEDS: [LinkSpeed; 4] = [
    LinkSpeed::Gt2_5,
    LinkSpeed::Gt5,
    LinkSpeed::Gt8,
    LinkSpeed::Gt16,
];
const WIDTHS: [LinkWidth; 7] = [
    LinkWidth::X1,
    LinkWidth::X2,
    LinkWidth::X4,
    LinkWidth::X8,
    LinkWidth::X12,
    LinkWidth::X16,
    LinkWidth::X32,
];
const MESSAGES: [ErrorMessage; 3] = [
    ErrorMessage::Correctable,
    ErrorMessage::NonFatal,
    ErrorMessage::Fatal,
];

/// Fields no operation may change: (offset, bytes).
const READ_ONLY: [(usize, usize); 13] = [
    (idx::PCI_VENDOR_ID, 4),
    (idx::PCI_CLASS_REVISION, 4),
    (idx::PCI_HEADER_TYPE, 1),
    (idx::PCI_CAPABILITY_LIST, 1),
    (PCIE_CAP_OFFSET, 4),
    (PCIE_CAP_OFFSET + idx::PCI_EXP_DEVCAP, 4),
    (PCIE_CAP_OFFSET + idx::PCI_EXP_LNKCAP, 4),
    (PCIE_CAP_OFFSET + idx::PCI_EXP_SLTCAP, 4),
    (PCIE_CAP_OFFSET + idx::PCI_EXP_LNKCAP2, 4),
    (MSI_CAP_OFFSET, 2),
    (DSN_OFFSET, 4),
    (DSN_OFFSET + 4, 8),
    (AER_OFFSET, 4),
];

/// Registers the operations aim at, so random offsets find the interesting ones often.
const HOT: [usize; 16] = [
    idx::PCI_COMMAND,
    idx::PCI_SEC_STATUS,
    idx::PCI_BRIDGE_CONTROL,
    PCIE_CAP_OFFSET + idx::PCI_EXP_DEVCTL,
    PCIE_CAP_OFFSET + idx::PCI_EXP_LNKCTL,
    PCIE_CAP_OFFSET + idx::PCI_EXP_SLTCTL,
    PCIE_CAP_OFFSET + idx::PCI_EXP_SLTSTA,
    PCIE_CAP_OFFSET + idx::PCI_EXP_LNKCTL2,
    MSI_CAP_OFFSET + idx::PCI_MSI_FLAGS,
    MSI_CAP_OFFSET + idx::PCI_MSI_ADDRESS_LO,
    MSI_CAP_OFFSET + idx::PCI_MSI_ADDRESS_HI,
    MSI_CAP_OFFSET + idx::PCI_MSI_DATA_64,
    MSI_CAP_OFFSET + idx::PCI_MSI_MASK_64,
    AER_OFFSET + AER_ROOT_COMMAND,
    AER_OFFSET + AER_ROOT_STATUS,
    AER_OFFSET + AER_ERROR_SOURCE_ID,
];

fn config(b: &mut Bytes) -> PortConfig {
    let kind = [
        PortKind::RootPort,
        PortKind::DownstreamPort,
        PortKind::UpstreamPort,
    ][usize::from(b.u8() % 3)];
    let link = LinkConfig {
        speed: SPEEDS[usize::from(b.u8() % 4)],
        width: WIDTHS[usize::from(b.u8() % 7)],
    };
    let flags = b.u8();
    let number = b.u16() & 0x3fff;
    let bit = |n: u8| flags & (1 << n) != 0;
    let slot = (!bit(7)).then_some(SlotConfig {
        number,
        hotplug: !bit(0),
        surprise: bit(1),
        attention_button: !bit(2),
        attention_indicator: !bit(3),
        power_indicator: !bit(4),
        power_controller: bit(5),
        no_command_completed: bit(6),
    });
    PortConfig {
        kind,
        vendor: 0x1b36,
        device: 0x000c,
        revision: 1,
        serial: 0x1122_3344_5566_7788,
        port_number: flags,
        link,
        slot,
    }
}

fn r16(p: &PciePort, at: usize) -> u16 {
    p.read(at, 2) as u16
}

fn r32(p: &PciePort, at: usize) -> u32 {
    p.read(at, 4) as u32
}

fn fields(p: &PciePort) -> Vec<u64> {
    READ_ONLY
        .iter()
        .map(|&(at, n)| (0..n).map(|i| p.read(at + i, 1) << (8 * i)).sum())
        .collect()
}

/// The interrupt conditions as the guest can read them: (hot-plug event, root error event,
/// the message MSI would carry now, MSI enabled but masked).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Oracle {
    hotplug: bool,
    root: bool,
    deliver: Option<MsiMessage>,
    masked: bool,
}

impl Oracle {
    fn read(p: &PciePort) -> Self {
        let exp = |r: usize| PCIE_CAP_OFFSET + r;
        let msi = |r: usize| MSI_CAP_OFFSET + r;
        let ctl = r16(p, exp(idx::PCI_EXP_SLTCTL));
        let sta = r16(p, exp(idx::PCI_EXP_SLTSTA));
        let dllsc = if ctl & pci::PCI_EXP_SLTCTL_DLLSCE != 0 {
            pci::PCI_EXP_SLTSTA_DLLSC
        } else {
            0
        };
        let hotplug = p.config().slot.is_some()
            && ctl & pci::PCI_EXP_SLTCTL_HPIE != 0
            && sta & ((ctl & 0x1f) | dllsc) != 0;
        let cmd = r32(p, AER_OFFSET + AER_ROOT_COMMAND);
        let st = r32(p, AER_OFFSET + AER_ROOT_STATUS);
        let root = p.kind() == PortKind::RootPort
            && ((cmd & 1 != 0 && st & pci::PCI_ERR_ROOT_COR_RCV != 0)
                || (cmd & 2 != 0 && st & pci::PCI_ERR_ROOT_NONFATAL_RCV != 0)
                || (cmd & 4 != 0 && st & pci::PCI_ERR_ROOT_FATAL_RCV != 0));
        let enabled = r16(p, msi(idx::PCI_MSI_FLAGS)) & pci::PCI_MSI_FLAGS_ENABLE != 0
            && r16(p, idx::PCI_COMMAND) & pci::PCI_COMMAND_MASTER != 0;
        let masked = r32(p, msi(idx::PCI_MSI_MASK_64)) & 1 != 0;
        let addr = u64::from(r32(p, msi(idx::PCI_MSI_ADDRESS_LO)))
            | (u64::from(r32(p, msi(idx::PCI_MSI_ADDRESS_HI))) << 32);
        let data = u32::from(r16(p, msi(idx::PCI_MSI_DATA_64)));
        Oracle {
            hotplug,
            root,
            deliver: (enabled && !masked).then_some(MsiMessage { addr, data }),
            masked: enabled && masked,
        }
    }

    fn lines(&self) -> (bool, bool) {
        let on = self.deliver.is_some();
        (self.hotplug && on, self.root && on)
    }

    /// What the edge rules say the change from `self` to `now` calls for.
    fn expect(&self, now: &Oracle) -> Interrupt {
        let (h0, r0) = self.lines();
        let (h1, r1) = now.lines();
        let event_rose = (now.hotplug && !self.hotplug) || (now.root && !self.root);
        match now.deliver {
            Some(m) if (h1 && !h0) || (r1 && !r0) => Interrupt::Msi(m),
            Some(_) => Interrupt::None,
            None if event_rose => Interrupt::Held,
            None => Interrupt::None,
        }
    }
}

fn check_state(p: &PciePort, fixed: &[u64]) {
    for ((&(at, _), want), now) in READ_ONLY.iter().zip(fixed).zip(fields(p)) {
        // Error Source Identification sits outside this list; everything here is fixed.
        assert_eq!(*want, now, "read-only field at {at:#x} changed");
    }
    let cfg = p.config();
    let lnksta = r16(p, PCIE_CAP_OFFSET + idx::PCI_EXP_LNKSTA);
    let speed_width = cfg.link.speed.encoding() | (cfg.link.width.lanes() << 4);
    assert_eq!(lnksta & 0x3ff, speed_width);
    let dllla = lnksta & pci::PCI_EXP_LNKSTA_DLLLA != 0;
    assert_eq!(dllla, cfg.kind.faces_down() && p.link_active());
    if cfg.slot.is_some() {
        let sta = r16(p, PCIE_CAP_OFFSET + idx::PCI_EXP_SLTSTA);
        assert_eq!(sta & pci::PCI_EXP_SLTSTA_PDS != 0, p.is_occupied());
    }
    let o = Oracle::read(p);
    let pending = r32(p, MSI_CAP_OFFSET + idx::PCI_MSI_PENDING_64);
    assert_eq!(pending, u32::from(o.masked && (o.hotplug || o.root)));
}

fn check_route(p: &PciePort, route: ErrorRoute, msg: ErrorMessage) -> Option<Interrupt> {
    match route {
        ErrorRoute::Logged(i) => {
            assert_eq!(p.kind(), PortKind::RootPort);
            Some(i)
        }
        ErrorRoute::Forward(m) => {
            assert_ne!(p.kind(), PortKind::RootPort);
            assert_eq!(m, msg);
            let serr = r16(p, idx::PCI_BRIDGE_CONTROL) & pci::PCI_BRIDGE_CTL_SERR;
            assert_ne!(serr, 0, "forwarded without SERR# Enable");
            None
        }
        ErrorRoute::Dropped => None,
    }
}

/// One operation; returns the interrupt it reported, if it reports one.
fn step(p: &mut PciePort, b: &mut Bytes) -> Option<Interrupt> {
    match b.u8() % 9 {
        0 => {
            let (reg, size) = (usize::from(b.u16() & 0x1fff), usize::from(b.u8() % 10));
            let v = p.read(reg, size);
            if (1..=8).contains(&size) {
                assert_eq!(v & !size_mask(size as u32), 0);
            }
            None
        }
        1 => {
            let (reg, size, data) = (
                usize::from(b.u16() & 0x1fff),
                usize::from(b.u8() % 10),
                b.u64(),
            );
            Some(p.write(reg, size, data))
        }
        2 => {
            let reg = HOT[usize::from(b.u8()) % HOT.len()];
            let size = [1, 2, 4][usize::from(b.u8() % 3)];
            let data = u64::from(b.u32());
            Some(p.write(reg, size, data))
        }
        3 => p.plug().ok(),
        4 => p.unplug().ok(),
        5 => p.press_attention_button().ok(),
        6 => {
            let msg = MESSAGES[usize::from(b.u8() % 3)];
            let route = p.error_from_below(msg, b.u16());
            check_route(p, route, msg)
        }
        7 => {
            let error = AerError::ALL[usize::from(b.u8()) % AerError::ALL.len()];
            let header = [b.u32(); AER_HEADER_LOG_DWORDS];
            match p.report_error(error, Some(header), b.u16()) {
                Ok(ErrorRoute::Logged(i)) => Some(i),
                _ => None,
            }
        }
        _ => {
            p.note_master_abort();
            let ma = pci::PCI_SEC_STATUS_REC_MASTER_ABORT;
            assert_eq!(r16(p, idx::PCI_SEC_STATUS) & ma, ma);
            None
        }
    }
}

pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    let cfg = config(&mut b);
    let Ok(mut p) = PciePort::new(&cfg) else {
        assert!(cfg.check().is_err());
        return;
    };
    let fixed = fields(&p);
    check_state(&p, &fixed);
    let mut before = Oracle::read(&p);
    let mut ops = 0;
    while !b.is_empty() && ops < 4096 {
        ops += 1;
        let got = step(&mut p, &mut b);
        let now = Oracle::read(&p);
        let want = before.expect(&now);
        if let Some(got) = got {
            assert_eq!(got, want, "interrupt ({before:?} -> {now:?})");
        } else {
            assert_eq!(
                want,
                Interrupt::None,
                "an operation without a report changed the lines"
            );
        }
        check_state(&p, &fixed);
        before = now;
    }
}
