//! A PCI Express port the multiplexer hosts: a Root Port, or a Switch's Upstream or
//! Downstream Port, built on [`PciFunction`] (type-1 header, PCI Express capability at
//! [`PCIE_CAP_OFFSET`], Device Serial Number and AER extended capabilities) with what makes it
//! a port:
//!
//! - **Link** (PCIe base spec 4.0, 7.5.3.6-8, 7.5.3.18-19): Link Capabilities, Status,
//!   Capabilities 2 and Control 2 from a configured speed (2.5 to 16 GT/s) and width (x1 to
//!   x32); on ports facing a link downwards (Root and Downstream Ports), Data Link Layer Link
//!   Active Reporting and the Data Link Layer Link Active bit, which follows the slot: up while
//!   a card is present, the slot powered and Link Disable clear.
//! - **Slot** (7.5.3.9-11) and the native hot-plug model (6.7): Slot Capabilities as
//!   configured, Slot Control with the enables each capability allows, Slot Status with its
//!   RW1C events. [`PciePort::plug`], [`PciePort::unplug`] and
//!   [`PciePort::press_attention_button`] are the card and the operator; a Slot Control write
//!   is a command that completes at once (6.7.3.2, Command Completed unless "No Command
//!   Completed Support").
//! - **MSI** (7.7.1): a 64-bit capability with per-vector masking and one vector, chained from
//!   the PCI Express capability; the port's hot-plug and root error interrupts use it
//!   (Interrupt Message Number 0, 7.5.3.2 and 7.8.4.10).
//! - **Root error reporting** (Root Ports, 6.2.4.1, 7.8.4.9-11): error messages from below
//!   update Root Error Status and Error Source Identification
//!   ([`PciePort::error_from_below`]); Switch Ports forward them when SERR# Enable is set.
//! - **Received Master Abort** (PCI-to-PCI Bridge spec 1.2, 3.2.5.7): set by
//!   [`PciePort::note_master_abort`] when a configuration access below the port finds no
//!   function.
//!
//! Interrupts follow the edge rules of 6.7.3.4 (hot-plug) and 6.2.4.1.2 (root errors): a
//! message goes out each time "the vector is unmasked, the source's interrupt enable is set
//! and one of its event bits is set with its enable" goes from false to true, so no new
//! message while an event is pending and not cleared. INTx is not modelled: with MSI
//! disabled (or Bus Master Enable clear, 7.5.1.1.3) the condition counts as false, and the
//! message goes out when software enables MSI while an event is still pending. Every call
//! that can change the condition returns an [`Interrupt`]: what to send now.
//!
//! The layout: PCI Express capability at 0x40 (0x3c bytes), MSI right after it at
//! [`MSI_CAP_OFFSET`] (the end of the capability list), DSN at 0x100, AER at 0x140.

use super::aer::{
    AER_ERROR_SOURCE_ID, AER_HEADER_LOG_DWORDS, AER_ROOT_COMMAND, AER_ROOT_STATUS, AerError,
    AerOutcome, ErrorMessage, NoAer,
};
use super::{
    FunctionKind, FunctionSpec, PCIE_CAP_OFFSET, PCIE_CAP_SIZE, PciFunction, get32, put16, put32,
};
use ioreq_server::pci::{self, idx};
use serde::{Deserialize, Serialize};

/// Where the MSI capability is: right after the PCI Express capability.
pub const MSI_CAP_OFFSET: usize = PCIE_CAP_OFFSET + PCIE_CAP_SIZE;
/// Size of a 64-bit MSI capability with per-vector masking (7.7.1: up to Pending Bits).
pub const MSI_CAP_SIZE: usize = 0x18;

/// The Slot Status events that have an enable bit of the same position in Slot Control
/// (7.5.3.10-11): Attention Button Pressed, Power Fault Detected, MRL Sensor Changed, Presence
/// Detect Changed, Command Completed (bits 4:0).
const SLOT_EVENTS_LOW: u16 = 0x1f;
/// Every Slot Status event bit: the low five and Data Link Layer State Changed.
const SLOT_EVENTS: u16 = SLOT_EVENTS_LOW | pci::PCI_EXP_SLTSTA_DLLSC;

/// An offset in the PCI Express capability as a configuration-space index.
const fn exp(reg: usize) -> usize {
    PCIE_CAP_OFFSET + reg
}

/// An offset in the MSI capability as a configuration-space index.
const fn msi(reg: usize) -> usize {
    MSI_CAP_OFFSET + reg
}

/// Which port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PortKind {
    RootPort,
    /// A Switch's Upstream Port: its link is the one above the switch.
    UpstreamPort,
    /// A Switch's Downstream Port.
    DownstreamPort,
}

impl PortKind {
    pub fn function_kind(self) -> FunctionKind {
        match self {
            PortKind::RootPort => FunctionKind::RootPort,
            PortKind::UpstreamPort => FunctionKind::UpstreamPort,
            PortKind::DownstreamPort => FunctionKind::DownstreamPort,
        }
    }

    /// Root and Downstream Ports: the link is below them, and they may have a slot.
    pub fn faces_down(self) -> bool {
        self != PortKind::UpstreamPort
    }
}

/// A link speed (7.5.3.18, Supported Link Speeds Vector).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LinkSpeed {
    #[serde(rename = "2.5GT/s")]
    Gt2_5,
    #[serde(rename = "5GT/s")]
    Gt5,
    #[serde(rename = "8GT/s")]
    Gt8,
    #[serde(rename = "16GT/s")]
    Gt16,
}

impl LinkSpeed {
    /// The encoding of Max Link Speed, Current Link Speed and Target Link Speed: the number of
    /// the speed's bit in the Supported Link Speeds Vector, 1 for 2.5 GT/s (7.5.3.6).
    pub fn encoding(self) -> u16 {
        match self {
            LinkSpeed::Gt2_5 => 1,
            LinkSpeed::Gt5 => 2,
            LinkSpeed::Gt8 => 3,
            LinkSpeed::Gt16 => 4,
        }
    }

    /// Supported Link Speeds Vector (Link Capabilities 2 bits 7:1, 7.5.3.18): this speed and
    /// every lower one (a port supporting a speed supports all below it, 8.2).
    pub fn supported_vector(self) -> u32 {
        ((1u32 << self.encoding()) - 1) << pci::PCI_EXP_LNKCAP2_SLS_SHIFT
    }
}

/// A link width: the lanes (Maximum / Negotiated Link Width, 7.5.3.6 and 7.5.3.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkWidth {
    X1,
    X2,
    X4,
    X8,
    X12,
    X16,
    X32,
}

impl LinkWidth {
    pub fn lanes(self) -> u16 {
        match self {
            LinkWidth::X1 => 1,
            LinkWidth::X2 => 2,
            LinkWidth::X4 => 4,
            LinkWidth::X8 => 8,
            LinkWidth::X12 => 12,
            LinkWidth::X16 => 16,
            LinkWidth::X32 => 32,
        }
    }
}

/// The link: the same speed and width are the maximum (Link Capabilities) and what the link
/// trains to (Link Status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    pub speed: LinkSpeed,
    pub width: LinkWidth,
}

impl Default for LinkConfig {
    /// 2.5 GT/s x1, what QEMU's root ports say by default.
    fn default() -> Self {
        LinkConfig {
            speed: LinkSpeed::Gt2_5,
            width: LinkWidth::X1,
        }
    }
}

/// A slot's capabilities (Slot Capabilities, 7.5.3.9). No MRL sensor, no electromechanical
/// interlock, no power fault detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SlotConfig {
    /// Physical Slot Number, unique in the chassis (13 bits).
    pub number: u16,
    /// Hot-Plug Capable.
    #[serde(default = "yes")]
    pub hotplug: bool,
    /// Hot-Plug Surprise: the card may leave without notice.
    #[serde(default)]
    pub surprise: bool,
    /// Attention Button Present: [`PciePort::press_attention_button`] is the operator's
    /// request to remove the card (6.7.1.5).
    #[serde(default = "yes")]
    pub attention_button: bool,
    /// Attention Indicator Present.
    #[serde(default = "yes")]
    pub attention_indicator: bool,
    /// Power Indicator Present.
    #[serde(default = "yes")]
    pub power_indicator: bool,
    /// Power Controller Present: software switches the slot's power (Slot Control bit 10);
    /// the link is down while it is off.
    #[serde(default)]
    pub power_controller: bool,
    /// No Command Completed Support: Slot Control writes do not set Command Completed.
    #[serde(default)]
    pub no_command_completed: bool,
}

fn yes() -> bool {
    true
}

impl SlotConfig {
    /// A hot-plug slot with attention button and both indicators, no power controller.
    pub fn hotplug(number: u16) -> Self {
        SlotConfig {
            number,
            hotplug: true,
            surprise: false,
            attention_button: true,
            attention_indicator: true,
            power_indicator: true,
            power_controller: false,
            no_command_completed: false,
        }
    }

    /// Slot Capabilities (7.5.3.9).
    fn capabilities(&self) -> u32 {
        let bit = |on: bool, b: u32| if on { b } else { 0 };
        bit(self.attention_button, pci::PCI_EXP_SLTCAP_ABP)
            | bit(self.power_controller, pci::PCI_EXP_SLTCAP_PCP)
            | bit(self.attention_indicator, pci::PCI_EXP_SLTCAP_AIP)
            | bit(self.power_indicator, pci::PCI_EXP_SLTCAP_PIP)
            | bit(self.surprise, pci::PCI_EXP_SLTCAP_HPS)
            | bit(self.hotplug, pci::PCI_EXP_SLTCAP_HPC)
            | bit(self.no_command_completed, pci::PCI_EXP_SLTCAP_NCCS)
            | (u32::from(self.number) << pci::PCI_EXP_SLTCAP_PSN_SHIFT)
    }

    /// Slot Control's writable bits (7.5.3.10): an enable or control whose capability is
    /// absent is read-only 0, as the spec permits.
    fn control_wmask(&self) -> u16 {
        let bit = |on: bool, b: u16| if on { b } else { 0 };
        let hp = self.hotplug;
        bit(self.attention_button, pci::PCI_EXP_SLTCTL_ABPE)
            | bit(
                self.power_controller,
                pci::PCI_EXP_SLTCTL_PFDE | pci::PCI_EXP_SLTCTL_PCC,
            )
            | bit(hp, pci::PCI_EXP_SLTCTL_PDCE)
            | bit(hp && !self.no_command_completed, pci::PCI_EXP_SLTCTL_CCIE)
            | bit(hp, pci::PCI_EXP_SLTCTL_HPIE | pci::PCI_EXP_SLTCTL_DLLSCE)
            | bit(self.attention_indicator, pci::PCI_EXP_SLTCTL_AIC)
            | bit(self.power_indicator, pci::PCI_EXP_SLTCTL_PIC)
    }

    /// Slot Control's reset value: indicators present are off, the power on.
    fn control_reset(&self) -> u16 {
        let off = |on: bool, field: u16| {
            if on {
                pci::PCI_EXP_SLTCTL_IND_OFF << field.trailing_zeros()
            } else {
                0
            }
        };
        off(self.attention_indicator, pci::PCI_EXP_SLTCTL_AIC)
            | off(self.power_indicator, pci::PCI_EXP_SLTCTL_PIC)
    }

    /// Whether a Slot Control write is a command that sets Command Completed (6.7.3.2).
    fn completes_commands(&self) -> bool {
        self.hotplug && !self.no_command_completed
    }
}

/// Everything needed to build a port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PortConfig {
    pub kind: PortKind,
    pub vendor: u16,
    pub device: u16,
    #[serde(default)]
    pub revision: u8,
    /// Serial number for the DSN capability.
    #[serde(default)]
    pub serial: u64,
    /// Port Number (Link Capabilities bits 31:24, 7.5.3.6).
    #[serde(default)]
    pub port_number: u8,
    #[serde(default)]
    pub link: LinkConfig,
    /// The slot, for Root and Downstream Ports; without one, Presence Detect State is
    /// hard-wired to 1 (7.5.3.11) and [`PciePort::plug`] only brings the link up.
    #[serde(default)]
    pub slot: Option<SlotConfig>,
}

impl PortConfig {
    /// A root port with a hot-plug slot ([`SlotConfig::hotplug`]) and a 2.5 GT/s x1 link.
    pub fn root_port(vendor: u16, device: u16, slot: u16) -> Self {
        PortConfig {
            kind: PortKind::RootPort,
            vendor,
            device,
            revision: 0,
            serial: 0,
            port_number: 0,
            link: LinkConfig::default(),
            slot: Some(SlotConfig::hotplug(slot)),
        }
    }

    /// Checks what the registers cannot express or what would leave a slot unusable.
    pub fn check(&self) -> Result<(), PortConfigError> {
        let Some(s) = &self.slot else {
            return Ok(());
        };
        if !self.kind.faces_down() {
            return Err(PortConfigError::SlotOnUpstreamPort);
        }
        if s.number > pci::PCI_EXP_SLTCAP_PSN_MAX {
            return Err(PortConfigError::SlotNumber(s.number));
        }
        if s.surprise && !s.hotplug {
            return Err(PortConfigError::SurpriseWithoutHotplug);
        }
        if s.attention_button && !s.power_indicator && !s.power_controller {
            return Err(PortConfigError::NoReleaseSignal);
        }
        Ok(())
    }

    fn function_spec(&self) -> FunctionSpec {
        FunctionSpec {
            revision: self.revision,
            serial: self.serial,
            ..FunctionSpec::bridge(self.vendor, self.device, self.kind.function_kind())
        }
    }
}

/// Why a port cannot be built as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PortConfigError {
    #[error("a switch upstream port has no slot (slots are below root and downstream ports)")]
    SlotOnUpstreamPort,
    #[error(
        "physical slot number {0} does not fit Slot Capabilities' 13 bits (at most {max})",
        max = pci::PCI_EXP_SLTCAP_PSN_MAX
    )]
    SlotNumber(u16),
    #[error("hot-plug surprise needs a hot-plug capable slot")]
    SurpriseWithoutHotplug,
    #[error(
        "an attention button needs a power indicator or a power controller: the guest turns \
         one of them off to say the card may go"
    )]
    NoReleaseSignal,
}

/// Why a slot operation cannot be done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    #[error("a switch upstream port has no link below it to plug a card into")]
    UpstreamPort,
    #[error("the slot already holds a card")]
    Occupied,
    #[error("the slot is empty")]
    Empty,
    #[error("the port has no slot with an attention button")]
    NoAttentionButton,
}

/// An MSI as the port sends it: a write of `data` to `addr` (7.7.1.3-5). Hand it to
/// `Backend::inject_msi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    pub addr: u64,
    pub data: u32,
}

/// What an operation on the port asks of the caller.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    /// Nothing to send: no interrupt condition went from false to true.
    None,
    /// Send this message now.
    Msi(MsiMessage),
    /// An interrupt event is pending but MSI cannot carry it now: the vector is masked (its
    /// Pending bit is set, 7.7.1.8), MSI is disabled or Bus Master Enable is clear. A later
    /// call returns the message when software allows it and the event is still pending.
    Held,
}

/// Where an error message from below goes next (6.2.4.1, 6.2.6).
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorRoute {
    /// A Switch Port passed it to its primary side: give it to the port above.
    Forward(ErrorMessage),
    /// Not forwarded or not sent: SERR# Enable clear on a Switch Port (7.5.1.3.13), or the
    /// port's own error masked or its reporting disabled.
    Dropped,
    /// A Root Port logged it in Root Error Status; the interrupt Root Error Command asks for.
    Logged(Interrupt),
}

/// An indicator as Slot Control sets it (7.5.3.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Indicator {
    /// Not present, or the reserved value 00b.
    Absent,
    On,
    Blink,
    Off,
}

impl Indicator {
    fn from_field(v: u16) -> Self {
        match v {
            pci::PCI_EXP_SLTCTL_IND_ON => Indicator::On,
            pci::PCI_EXP_SLTCTL_IND_BLINK => Indicator::Blink,
            pci::PCI_EXP_SLTCTL_IND_OFF => Indicator::Off,
            _ => Indicator::Absent,
        }
    }
}

/// Where an orderly removal (attention button, 6.7.1.5) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Removal {
    /// None asked for.
    None,
    /// The button was pressed with a card in the slot; the guest has not let it go yet.
    Requested,
    /// The guest let the card go: it switched the slot's power off (power controller) or
    /// turned the power indicator off. The card may be unplugged now.
    Released,
}

/// The slot as `inspect` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SlotState {
    pub present: bool,
    pub link_active: bool,
    pub powered: bool,
    pub power_indicator: Indicator,
    pub attention_indicator: Indicator,
    pub removal: Removal,
    /// Slot Status, Slot Control (7.5.3.10-11).
    pub status: u16,
    pub control: u16,
}

/// The interrupt conditions of the port's two sources (6.7.3.4, 6.2.4.1.2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Lines {
    hotplug: bool,
    root_error: bool,
}

impl Lines {
    fn any(self) -> bool {
        self.hotplug || self.root_error
    }

    /// True if a source went from false (in `before`) to true.
    fn rose_from(self, before: Lines) -> bool {
        (self.hotplug && !before.hotplug) || (self.root_error && !before.root_error)
    }
}

/// What MSI does with an interrupt now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MsiRoute {
    /// MSI Enable or Bus Master Enable clear.
    Disabled,
    /// Enabled, vector 0 masked.
    Masked,
    Deliver(MsiMessage),
}

/// An emulated PCI Express port (see the module documentation).
#[derive(Debug, Clone)]
pub struct PciePort {
    function: PciFunction,
    config: PortConfig,
    /// A card is in the slot (or, without a slot, something is connected below).
    present: bool,
    removal: Removal,
    /// The interrupt events as last evaluated, and those conditions with MSI able to carry
    /// them (the edge detectors of 6.7.3.4 and 6.2.4.1.2).
    events: Lines,
    lines: Lines,
}

/// Sets a 16-bit register's reset value, writable bits and write-1-to-clear bits.
fn define16(f: &mut PciFunction, at: usize, value: u16, wmask: u16, w1c: u16) {
    put16(&mut f.config, at, value);
    put16(&mut f.wmask, at, wmask);
    put16(&mut f.w1c, at, w1c);
}

/// Sets a 32-bit register's reset value, writable bits and write-1-to-clear bits.
fn define32(f: &mut PciFunction, at: usize, value: u32, wmask: u32, w1c: u32) {
    put32(&mut f.config, at, value);
    put32(&mut f.wmask, at, wmask);
    put32(&mut f.w1c, at, w1c);
}

fn get16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// The port's registers on top of what [`PciFunction::new`] lays out for a bridge.
mod layout {
    use super::*;

    /// PCI Express Capabilities (Slot Implemented, 7.5.3.2), Device Capabilities
    /// (Role-Based Error Reporting, 7.5.3.3), the next capability (MSI), Root Control
    /// (7.5.3.12) on Root Ports.
    pub(super) fn express(f: &mut PciFunction, cfg: &PortConfig) {
        f.config[PCIE_CAP_OFFSET + idx::PCI_CAP_LIST_NEXT] = MSI_CAP_OFFSET as u8;
        if cfg.slot.is_some() {
            let flags = get16(&f.config, exp(idx::PCI_EXP_FLAGS)) | pci::PCI_EXP_FLAGS_SLOT;
            put16(&mut f.config, exp(idx::PCI_EXP_FLAGS), flags);
        }
        let devcap = get32(&f.config, exp(idx::PCI_EXP_DEVCAP)) | pci::PCI_EXP_DEVCAP_RBER;
        put32(&mut f.config, exp(idx::PCI_EXP_DEVCAP), devcap);
        if cfg.kind == PortKind::RootPort {
            define16(f, exp(idx::PCI_EXP_RTCTL), 0, pci::PCI_EXP_RTCTL_WMASK, 0);
        }
    }

    /// Link Capabilities, Control and Status, Link Capabilities 2 and Control 2 (7.5.3.6-8,
    /// 7.5.3.18-19). Data Link Layer Link Active starts clear on ports facing down (no card
    /// yet) and reads 0 on Upstream Ports, which do not report it.
    pub(super) fn link(f: &mut PciFunction, cfg: &PortConfig) {
        let (speed, lanes) = (cfg.link.speed.encoding(), cfg.link.width.lanes());
        let down = cfg.kind.faces_down();
        let reporting = if down { pci::PCI_EXP_LNKCAP_DLLLARC } else { 0 };
        let cap = u32::from(speed)
            | (u32::from(lanes) << pci::PCI_EXP_LNKCAP_MLW_SHIFT)
            | reporting
            | (u32::from(cfg.port_number) << pci::PCI_EXP_LNKCAP_PN_SHIFT);
        define32(f, exp(idx::PCI_EXP_LNKCAP), cap, 0, 0);
        let disable = if down { pci::PCI_EXP_LNKCTL_LD } else { 0 };
        let ctl_wmask =
            pci::PCI_EXP_LNKCTL_ASPMC | pci::PCI_EXP_LNKCTL_CCC | pci::PCI_EXP_LNKCTL_ES | disable;
        define16(f, exp(idx::PCI_EXP_LNKCTL), 0, ctl_wmask, 0);
        let status = speed | (lanes << pci::PCI_EXP_LNKSTA_NLW_SHIFT);
        define16(f, exp(idx::PCI_EXP_LNKSTA), status, 0, 0);
        let cap2 = cfg.link.speed.supported_vector();
        define32(f, exp(idx::PCI_EXP_LNKCAP2), cap2, 0, 0);
        let ctl2_wmask = pci::PCI_EXP_LNKCTL2_TLS | pci::PCI_EXP_LNKCTL2_HASD;
        define16(f, exp(idx::PCI_EXP_LNKCTL2), speed, ctl2_wmask, 0);
    }

    /// Slot Capabilities, Control and Status (7.5.3.9-11); without a slot, Presence Detect
    /// State hard-wired to 1 (7.5.3.11) on ports facing down.
    pub(super) fn slot(f: &mut PciFunction, cfg: &PortConfig) {
        let Some(s) = &cfg.slot else {
            if cfg.kind.faces_down() {
                define16(f, exp(idx::PCI_EXP_SLTSTA), pci::PCI_EXP_SLTSTA_PDS, 0, 0);
            }
            return;
        };
        define32(f, exp(idx::PCI_EXP_SLTCAP), s.capabilities(), 0, 0);
        let (reset, wmask) = (s.control_reset(), s.control_wmask());
        define16(f, exp(idx::PCI_EXP_SLTCTL), reset, wmask, 0);
        define16(f, exp(idx::PCI_EXP_SLTSTA), 0, 0, SLOT_EVENTS);
    }

    /// The MSI capability (7.7.1): 64-bit address, per-vector masking, one vector (Multiple
    /// Message Capable 0); MSI Enable and Multiple Message Enable writable, the address
    /// without its two reserved low bits, 16 bits of data (no Extended Message Data), mask
    /// bit 0; Pending Bits read-only.
    pub(super) fn msi_capability(f: &mut PciFunction) {
        f.config[MSI_CAP_OFFSET] = pci::PCI_CAP_ID_MSI;
        f.config[MSI_CAP_OFFSET + idx::PCI_CAP_LIST_NEXT] = 0;
        let flags = pci::PCI_MSI_FLAGS_64BIT | pci::PCI_MSI_FLAGS_MASKBIT;
        let wmask = pci::PCI_MSI_FLAGS_ENABLE | pci::PCI_MSI_FLAGS_QSIZE;
        define16(f, msi(idx::PCI_MSI_FLAGS), flags, wmask, 0);
        let lo = pci::PCI_MSI_ADDRESS_LO_MASK;
        define32(f, msi(idx::PCI_MSI_ADDRESS_LO), 0, lo, 0);
        define32(f, msi(idx::PCI_MSI_ADDRESS_HI), 0, u32::MAX, 0);
        define32(f, msi(idx::PCI_MSI_DATA_64), 0, 0xffff, 0);
        define32(f, msi(idx::PCI_MSI_MASK_64), 0, 1, 0);
        define32(f, msi(idx::PCI_MSI_PENDING_64), 0, 0, 0);
    }

    /// The bridge's status bits the port sets: Received Master Abort and Received System
    /// Error in Secondary Status (7.5.1.3.7), Signaled System Error in Status on Switch
    /// Ports (7.5.1.1.4), each RW1C.
    pub(super) fn status(f: &mut PciFunction, cfg: &PortConfig) {
        let secondary = pci::PCI_SEC_STATUS_REC_MASTER_ABORT | pci::PCI_SEC_STATUS_REC_SYSTEM_ERROR;
        put16(&mut f.w1c, idx::PCI_SEC_STATUS, secondary);
        if cfg.kind != PortKind::RootPort {
            put16(
                &mut f.w1c,
                idx::PCI_STATUS,
                pci::PCI_STATUS_SIG_SYSTEM_ERROR,
            );
        }
    }
}

impl PciePort {
    /// Builds the port with an empty slot, the link down (ports facing down) and MSI
    /// disabled.
    pub fn new(cfg: &PortConfig) -> Result<Self, PortConfigError> {
        cfg.check()?;
        let mut function = PciFunction::new(&cfg.function_spec());
        layout::express(&mut function, cfg);
        layout::link(&mut function, cfg);
        layout::slot(&mut function, cfg);
        layout::msi_capability(&mut function);
        layout::status(&mut function, cfg);
        Ok(PciePort {
            function,
            config: cfg.clone(),
            present: false,
            removal: Removal::None,
            events: Lines::default(),
            lines: Lines::default(),
        })
    }

    pub fn config(&self) -> &PortConfig {
        &self.config
    }

    pub fn kind(&self) -> PortKind {
        self.config.kind
    }

    /// The function underneath, read-only (its AER offset, configuration size...).
    pub fn function(&self) -> &PciFunction {
        &self.function
    }

    /// A configuration read; past the space it reads all ones (of its size; of 8 bytes for a
    /// size other than 1 to 8).
    pub fn read(&self, reg: usize, size: usize) -> u64 {
        if !(1..=8).contains(&size) {
            return u64::MAX;
        }
        if !self.fits(reg, size) {
            return ioreq_server::size_mask(size as u32);
        }
        self.function.read(reg, size)
    }

    /// An access of 1 to 8 bytes inside the configuration space.
    fn fits(&self, reg: usize, size: usize) -> bool {
        let end = reg.checked_add(size);
        (1..=8).contains(&size) && end.is_some_and(|e| e <= self.function.config_size())
    }

    /// A configuration write through the write masks, then what it sets off: a Slot Control
    /// write is a command (Command Completed, power, indicators); Link Disable and the slot's
    /// power move the link; MSI and enable changes may release an interrupt.
    pub fn write(&mut self, reg: usize, size: usize, data: u64) -> Interrupt {
        if !self.fits(reg, size) {
            return Interrupt::None;
        }
        let control_before = self.slot_control();
        self.function.write(reg, size, data);
        let slot_control = exp(idx::PCI_EXP_SLTCTL);
        if self.config.slot.is_some() && reg < slot_control + 2 && slot_control < reg + size {
            self.slot_command(control_before);
        }
        self.update_link();
        self.update_interrupts()
    }

    /// A card arrives (6.7.3.3, 6.7.3.1): Presence Detect State and Changed; the link comes
    /// up if the slot is powered (Data Link Layer Link Active, State Changed).
    pub fn plug(&mut self) -> Result<Interrupt, SlotError> {
        self.check_faces_down()?;
        if self.present {
            return Err(SlotError::Occupied);
        }
        self.present = true;
        self.removal = Removal::None;
        self.presence_changed(true);
        self.update_link();
        Ok(self.update_interrupts())
    }

    /// The card leaves (after the guest released it, or by surprise): Presence Detect State
    /// clears, Presence Detect Changed; the link goes down (Data Link Layer State Changed).
    pub fn unplug(&mut self) -> Result<Interrupt, SlotError> {
        self.check_faces_down()?;
        if !self.present {
            return Err(SlotError::Empty);
        }
        self.present = false;
        self.removal = Removal::None;
        self.presence_changed(false);
        self.update_link();
        Ok(self.update_interrupts())
    }

    /// The operator presses the attention button (6.7.1.5): Attention Button Pressed. With a
    /// card in the slot this asks the guest to let it go ([`Removal::Requested`]).
    pub fn press_attention_button(&mut self) -> Result<Interrupt, SlotError> {
        match self.config.slot {
            Some(s) if s.attention_button => {}
            _ => return Err(SlotError::NoAttentionButton),
        }
        if self.present && self.removal == Removal::None {
            self.removal = Removal::Requested;
        }
        self.set_slot_events(pci::PCI_EXP_SLTSTA_ABP);
        Ok(self.update_interrupts())
    }

    /// A configuration request the port sent on its secondary side found no function (the
    /// engine's master abort below this port): Received Master Abort (PCI-to-PCI Bridge spec
    /// 1.2, 3.2.5.7; PCIe base spec 4.0, 7.5.1.3.7).
    pub fn note_master_abort(&mut self) {
        self.set16(
            idx::PCI_SEC_STATUS,
            pci::PCI_SEC_STATUS_REC_MASTER_ABORT,
            true,
        );
    }

    /// An error message (from a function below, 6.2.4.1) arrives on the secondary side.
    /// ERR_NONFATAL and ERR_FATAL set Received System Error (7.5.1.3.7). A Switch Port
    /// forwards it upstream if SERR# Enable is set in Bridge Control (7.5.1.3.13), setting
    /// Signaled System Error for the uncorrectable ones (7.5.1.1.4); a Root Port logs it
    /// (7.8.4.10-11) with `source`, the requester ID of the function that sent it.
    pub fn error_from_below(&mut self, msg: ErrorMessage, source: u16) -> ErrorRoute {
        let uncorrectable = msg != ErrorMessage::Correctable;
        if uncorrectable {
            self.set16(
                idx::PCI_SEC_STATUS,
                pci::PCI_SEC_STATUS_REC_SYSTEM_ERROR,
                true,
            );
        }
        if self.config.kind == PortKind::RootPort {
            self.log_root_error(msg, source);
            return ErrorRoute::Logged(self.update_interrupts());
        }
        let serr = self.r16(idx::PCI_BRIDGE_CONTROL) & pci::PCI_BRIDGE_CTL_SERR != 0;
        if !serr {
            return ErrorRoute::Dropped;
        }
        if uncorrectable {
            self.set16(idx::PCI_STATUS, pci::PCI_STATUS_SIG_SYSTEM_ERROR, true);
        }
        ErrorRoute::Forward(msg)
    }

    /// An error the port itself detected: recorded in its own AER capability
    /// ([`PciFunction::report_error`]); if it calls for a message and Device Control (or,
    /// uncorrectable, SERR# Enable in Command) lets it out (6.2.5), a Root Port logs it as
    /// received from itself (`requester_id`, its own) and a Switch Port sends it upstream.
    pub fn report_error(
        &mut self,
        error: AerError,
        header: Option<[u32; AER_HEADER_LOG_DWORDS]>,
        requester_id: u16,
    ) -> Result<ErrorRoute, NoAer> {
        let AerOutcome::Signal(msg) = self.function.report_error(error, header)? else {
            return Ok(ErrorRoute::Dropped);
        };
        if !self.reports(msg) {
            return Ok(ErrorRoute::Dropped);
        }
        if self.config.kind != PortKind::RootPort {
            return Ok(ErrorRoute::Forward(msg));
        }
        self.log_root_error(msg, requester_id);
        Ok(ErrorRoute::Logged(self.update_interrupts()))
    }

    /// The message MSI would send now, if it may (enabled, bus master, unmasked).
    pub fn msi_message(&self) -> Option<MsiMessage> {
        match self.msi_route() {
            MsiRoute::Deliver(m) => Some(m),
            _ => None,
        }
    }

    /// Whether the link below (ports facing down) or above (Upstream Ports) is up.
    pub fn link_active(&self) -> bool {
        !self.config.kind.faces_down() || self.link_up()
    }

    pub fn is_occupied(&self) -> bool {
        self.present
    }

    /// The slot for `inspect`; `None` without one.
    pub fn slot_state(&self) -> Option<SlotState> {
        let s = self.config.slot.as_ref()?;
        let control = self.slot_control();
        let field = |mask: u16| (control & mask) >> mask.trailing_zeros();
        let indicator = |on: bool, mask: u16| match on {
            true => Indicator::from_field(field(mask)),
            false => Indicator::Absent,
        };
        Some(SlotState {
            present: self.present,
            link_active: self.link_up(),
            powered: self.powered(),
            power_indicator: indicator(s.power_indicator, pci::PCI_EXP_SLTCTL_PIC),
            attention_indicator: indicator(s.attention_indicator, pci::PCI_EXP_SLTCTL_AIC),
            removal: self.removal,
            status: self.r16(exp(idx::PCI_EXP_SLTSTA)),
            control,
        })
    }

    // ---- slot and link ----

    fn check_faces_down(&self) -> Result<(), SlotError> {
        if self.config.kind.faces_down() {
            Ok(())
        } else {
            Err(SlotError::UpstreamPort)
        }
    }

    fn slot_control(&self) -> u16 {
        self.r16(exp(idx::PCI_EXP_SLTCTL))
    }

    /// A Slot Control write (6.7.3.2): the command completes at once, setting Command
    /// Completed when the slot supports it; the guest switching the power off or the power
    /// indicator to off after an attention button press lets the card go.
    fn slot_command(&mut self, before: u16) {
        let Some(s) = self.config.slot else {
            return;
        };
        if s.completes_commands() {
            self.set_slot_events(pci::PCI_EXP_SLTSTA_CC);
        }
        let after = self.slot_control();
        let changed_to = |mask: u16, value: u16| before & mask != value && after & mask == value;
        let power_off =
            s.power_controller && changed_to(pci::PCI_EXP_SLTCTL_PCC, pci::PCI_EXP_SLTCTL_PCC);
        let off = pci::PCI_EXP_SLTCTL_IND_OFF << pci::PCI_EXP_SLTCTL_PIC_SHIFT;
        let indicator_off = s.power_indicator && changed_to(pci::PCI_EXP_SLTCTL_PIC, off);
        if self.removal == Removal::Requested && (power_off || indicator_off) {
            self.removal = Removal::Released;
        }
    }

    /// Presence Detect State follows the card; Presence Detect Changed (7.5.3.11).
    fn presence_changed(&mut self, present: bool) {
        if self.config.slot.is_none() {
            return;
        }
        self.set16(exp(idx::PCI_EXP_SLTSTA), pci::PCI_EXP_SLTSTA_PDS, present);
        self.set_slot_events(pci::PCI_EXP_SLTSTA_PDC);
    }

    /// The slot's power: on unless a power controller switched it off (Slot Control bit 10,
    /// 7.5.3.10).
    fn powered(&self) -> bool {
        let controlled = self.config.slot.is_some_and(|s| s.power_controller);
        !controlled || self.slot_control() & pci::PCI_EXP_SLTCTL_PCC == 0
    }

    /// The link below a port facing down: a card, power, and Link Disable clear (7.5.3.7).
    fn link_up(&self) -> bool {
        let disabled = self.r16(exp(idx::PCI_EXP_LNKCTL)) & pci::PCI_EXP_LNKCTL_LD != 0;
        self.present && self.powered() && !disabled
    }

    /// Brings Data Link Layer Link Active (7.5.3.8) in line with the link; a change sets Data
    /// Link Layer State Changed (7.5.3.11). Upstream Ports do not report it.
    fn update_link(&mut self) {
        if !self.config.kind.faces_down() {
            return;
        }
        let up = self.link_up();
        let was = self.r16(exp(idx::PCI_EXP_LNKSTA)) & pci::PCI_EXP_LNKSTA_DLLLA != 0;
        if up != was {
            self.set16(exp(idx::PCI_EXP_LNKSTA), pci::PCI_EXP_LNKSTA_DLLLA, up);
            if self.config.slot.is_some() {
                self.set_slot_events(pci::PCI_EXP_SLTSTA_DLLSC);
            }
        }
    }

    fn set_slot_events(&mut self, events: u16) {
        self.set16(exp(idx::PCI_EXP_SLTSTA), events, true);
    }

    // ---- errors ----

    /// Whether the function sends `msg` for its own error: Device Control's reporting enables,
    /// or SERR# Enable for the uncorrectable ones (6.2.5, 7.5.3.4, 7.5.1.1.3).
    fn reports(&self, msg: ErrorMessage) -> bool {
        let devctl = self.r16(exp(idx::PCI_EXP_DEVCTL));
        let serr = self.r16(idx::PCI_COMMAND) & pci::PCI_COMMAND_SERR != 0;
        match msg {
            ErrorMessage::Correctable => devctl & pci::PCI_EXP_DEVCTL_CERE != 0,
            ErrorMessage::NonFatal => devctl & pci::PCI_EXP_DEVCTL_NFERE != 0 || serr,
            ErrorMessage::Fatal => devctl & pci::PCI_EXP_DEVCTL_FERE != 0 || serr,
        }
    }

    /// Root Error Status and Error Source Identification for a received message (7.8.4.10-11):
    /// the first ERR_COR sets ERR_COR Received and loads its source, a later one sets
    /// Multiple ERR_COR Received; likewise ERR_FATAL/NONFATAL Received (with First
    /// Uncorrectable Fatal when the first is ERR_FATAL) and its Multiple bit; Non-Fatal and
    /// Fatal Error Messages Received record each kind.
    fn log_root_error(&mut self, msg: ErrorMessage, source: u16) {
        let Some(aer) = self.function.aer_offset() else {
            return;
        };
        let (status_at, source_at) = (aer + AER_ROOT_STATUS, aer + AER_ERROR_SOURCE_ID);
        let mut status = get32(&self.function.config, status_at);
        let mut sources = get32(&self.function.config, source_at);
        let (received, multiple, shift) = match msg {
            ErrorMessage::Correctable => (
                pci::PCI_ERR_ROOT_COR_RCV,
                pci::PCI_ERR_ROOT_MULTI_COR_RCV,
                0,
            ),
            _ => (
                pci::PCI_ERR_ROOT_UNCOR_RCV,
                pci::PCI_ERR_ROOT_MULTI_UNCOR_RCV,
                pci::PCI_ERR_SRC_UNCOR_SHIFT,
            ),
        };
        if status & received != 0 {
            status |= multiple;
        } else {
            status |= received;
            sources = (sources & !(0xffff << shift)) | (u32::from(source) << shift);
            if msg == ErrorMessage::Fatal {
                status |= pci::PCI_ERR_ROOT_FIRST_FATAL;
            }
        }
        status |= match msg {
            ErrorMessage::Correctable => 0,
            ErrorMessage::NonFatal => pci::PCI_ERR_ROOT_NONFATAL_RCV,
            ErrorMessage::Fatal => pci::PCI_ERR_ROOT_FATAL_RCV,
        };
        put32(&mut self.function.config, status_at, status);
        put32(&mut self.function.config, source_at, sources);
    }

    // ---- interrupts ----

    /// 6.7.3.4: Hot-Plug Interrupt Enable and at least one Slot Status event with its enable
    /// set (Data Link Layer State Changed's enable is bit 12, the others share their bit).
    fn hotplug_event(&self) -> bool {
        if self.config.slot.is_none() {
            return false;
        }
        let control = self.slot_control();
        let status = self.r16(exp(idx::PCI_EXP_SLTSTA));
        let mut enabled = control & SLOT_EVENTS_LOW;
        if control & pci::PCI_EXP_SLTCTL_DLLSCE != 0 {
            enabled |= pci::PCI_EXP_SLTSTA_DLLSC;
        }
        control & pci::PCI_EXP_SLTCTL_HPIE != 0 && status & enabled != 0
    }

    /// 6.2.4.1.2 (and 7.8.4.9): a Root Error Command enable with its "messages received" bit
    /// in Root Error Status: Correctable with ERR_COR Received, Non-Fatal with Non-Fatal
    /// Error Messages Received, Fatal with Fatal Error Messages Received.
    fn root_error_event(&self) -> bool {
        let aer = match (self.config.kind, self.function.aer_offset()) {
            (PortKind::RootPort, Some(aer)) => aer,
            _ => return false,
        };
        let command = get32(&self.function.config, aer + AER_ROOT_COMMAND);
        let status = get32(&self.function.config, aer + AER_ROOT_STATUS);
        [
            (pci::PCI_ERR_ROOT_CMD_COR_EN, pci::PCI_ERR_ROOT_COR_RCV),
            (
                pci::PCI_ERR_ROOT_CMD_NONFATAL_EN,
                pci::PCI_ERR_ROOT_NONFATAL_RCV,
            ),
            (pci::PCI_ERR_ROOT_CMD_FATAL_EN, pci::PCI_ERR_ROOT_FATAL_RCV),
        ]
        .iter()
        .any(|&(enable, received)| command & enable != 0 && status & received != 0)
    }

    /// What MSI does with an interrupt now (7.7.1.2, 7.7.1.7; Bus Master Enable, 7.5.1.1.3).
    fn msi_route(&self) -> MsiRoute {
        let flags = self.r16(msi(idx::PCI_MSI_FLAGS));
        let master = self.r16(idx::PCI_COMMAND) & pci::PCI_COMMAND_MASTER != 0;
        if flags & pci::PCI_MSI_FLAGS_ENABLE == 0 || !master {
            return MsiRoute::Disabled;
        }
        if get32(&self.function.config, msi(idx::PCI_MSI_MASK_64)) & 1 != 0 {
            return MsiRoute::Masked;
        }
        let lo = get32(&self.function.config, msi(idx::PCI_MSI_ADDRESS_LO));
        let hi = get32(&self.function.config, msi(idx::PCI_MSI_ADDRESS_HI));
        let data = u32::from(self.r16(msi(idx::PCI_MSI_DATA_64)));
        MsiRoute::Deliver(MsiMessage {
            addr: (u64::from(hi) << 32) | u64::from(lo),
            data,
        })
    }

    /// Re-evaluates both interrupt conditions after a change: a message for each one that
    /// went from false to true with MSI able to carry it (6.7.3.4, 6.2.4.1.2; one vector, so
    /// one message); the Pending bit (7.7.1.8) while an event waits behind the mask.
    fn update_interrupts(&mut self) -> Interrupt {
        let events = Lines {
            hotplug: self.hotplug_event(),
            root_error: self.root_error_event(),
        };
        let route = self.msi_route();
        let lines = match route {
            MsiRoute::Deliver(_) => events,
            _ => Lines::default(),
        };
        let (line_rose, event_rose) = (lines.rose_from(self.lines), events.rose_from(self.events));
        (self.lines, self.events) = (lines, events);
        let pending = route == MsiRoute::Masked && events.any();
        put32(
            &mut self.function.config,
            msi(idx::PCI_MSI_PENDING_64),
            u32::from(pending),
        );
        match route {
            MsiRoute::Deliver(m) if line_rose => Interrupt::Msi(m),
            MsiRoute::Deliver(_) => Interrupt::None,
            _ if event_rose => Interrupt::Held,
            _ => Interrupt::None,
        }
    }

    // ---- register access ----

    fn r16(&self, at: usize) -> u16 {
        get16(&self.function.config, at)
    }

    /// Sets (`on`) or clears `bits` of a 16-bit register, as the hardware does.
    fn set16(&mut self, at: usize, bits: u16, on: bool) {
        let v = self.r16(at);
        let v = if on { v | bits } else { v & !bits };
        put16(&mut self.function.config, at, v);
    }
}

#[cfg(test)]
mod tests;
