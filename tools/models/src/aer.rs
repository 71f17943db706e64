//! The Advanced Error Reporting extended capability of a built-in PCIe function (PCIe base
//! spec 4.0, 7.8.4): register layout, which bits are implemented, writable or write-1-to-clear,
//! their reset values, and what recording an error does (6.2.5, 7.8.4.7-8).
//!
//! Which optional errors are implemented: every error a function without a link of its own
//! to manage can meet (the Data Link and Physical Layer ones included, so a model can inject
//! them), not Surprise Down (downstream ports that report it only), ACS Violation, MC Blocked,
//! AtomicOp Egress Blocked, TLP Prefix Blocked, Poisoned TLP Egress Blocked, Corrected
//! Internal Error nor Header Log Overflow. Bits of errors not implemented read 0 and ignore
//! writes in every register (status, mask, severity), as the spec allows for optional errors.
//!
//! "Sticky" (S) attributes keep their value across a reset that is not a cold one; the
//! built-in models have no reset but creation, so here RWS is RW and RW1CS is RW1C.

use std::fmt;

/// Extended capability ID of AER (7.8.4.1).
pub const PCI_EXT_CAP_ID_AER: u16 = 0x0001;
/// Capability version (7.8.4.1): 2h, as for functions that may implement the TLP Prefix Log.
pub const AER_CAP_VERSION: u32 = 2;

/// Uncorrectable Error Status, RW1CS (7.8.4.2).
pub const AER_UNCOR_STATUS: usize = 0x04;
/// Uncorrectable Error Mask, RWS (7.8.4.3).
pub const AER_UNCOR_MASK: usize = 0x08;
/// Uncorrectable Error Severity, RWS (7.8.4.4): 1 = fatal.
pub const AER_UNCOR_SEVERITY: usize = 0x0c;
/// Correctable Error Status, RW1CS (7.8.4.5).
pub const AER_COR_STATUS: usize = 0x10;
/// Correctable Error Mask, RWS (7.8.4.6).
pub const AER_COR_MASK: usize = 0x14;
/// Advanced Error Capabilities and Control (7.8.4.7).
pub const AER_CAP_CONTROL: usize = 0x18;
/// Header Log, four dwords (7.8.4.8): the header of the TLP of the first error. ROS; read-only
/// to software here too, filled by [`super::PciFunction::report_error`].
pub const AER_HEADER_LOG: usize = 0x1c;
pub const AER_HEADER_LOG_DWORDS: usize = 4;
/// Root Error Command, RW (7.8.4.9), Root Ports only.
pub const AER_ROOT_COMMAND: usize = 0x2c;
/// Root Error Status (7.8.4.10), Root Ports only.
pub const AER_ROOT_STATUS: usize = 0x30;
/// Error Source Identification, ROS (7.8.4.11), Root Ports only.
pub const AER_ERROR_SOURCE_ID: usize = 0x34;
/// Size of the capability: up to the Header Log for functions that are not Root Ports
/// (no TLP Prefix Log, 7.8.4.12: the function supports no End-End TLP Prefix).
pub const AER_SIZE: usize = 0x2c;
/// Size with the Root Port registers.
pub const AER_SIZE_ROOT_PORT: usize = 0x38;

// ---- Uncorrectable errors: bit positions in the status, mask and severity registers
// (7.8.4.2-4) ----

/// Data Link Protocol Error.
pub const AER_UNC_DLP: u32 = 1 << 4;
/// Surprise Down Error (downstream ports that report it; not implemented here).
pub const AER_UNC_SURPRISE_DOWN: u32 = 1 << 5;
/// Poisoned TLP Received.
pub const AER_UNC_POISONED_TLP: u32 = 1 << 12;
/// Flow Control Protocol Error.
pub const AER_UNC_FCP: u32 = 1 << 13;
/// Completion Timeout.
pub const AER_UNC_COMP_TIMEOUT: u32 = 1 << 14;
/// Completer Abort.
pub const AER_UNC_COMP_ABORT: u32 = 1 << 15;
/// Unexpected Completion.
pub const AER_UNC_UNEXP_COMP: u32 = 1 << 16;
/// Receiver Overflow.
pub const AER_UNC_RX_OVERFLOW: u32 = 1 << 17;
/// Malformed TLP.
pub const AER_UNC_MALFORMED_TLP: u32 = 1 << 18;
/// ECRC Error.
pub const AER_UNC_ECRC: u32 = 1 << 19;
/// Unsupported Request Error.
pub const AER_UNC_UNSUP_REQ: u32 = 1 << 20;
/// ACS Violation (not implemented).
pub const AER_UNC_ACS_VIOLATION: u32 = 1 << 21;
/// Uncorrectable Internal Error.
pub const AER_UNC_INTERNAL: u32 = 1 << 22;
/// The uncorrectable errors this function implements.
pub const AER_UNC_IMPLEMENTED: u32 = AER_UNC_DLP
    | AER_UNC_POISONED_TLP
    | AER_UNC_FCP
    | AER_UNC_COMP_TIMEOUT
    | AER_UNC_COMP_ABORT
    | AER_UNC_UNEXP_COMP
    | AER_UNC_RX_OVERFLOW
    | AER_UNC_MALFORMED_TLP
    | AER_UNC_ECRC
    | AER_UNC_UNSUP_REQ
    | AER_UNC_INTERNAL;
/// The spec's default severities (7.8.4.4): Data Link Protocol, Surprise Down, Flow Control
/// Protocol, Receiver Overflow, Malformed TLP and Uncorrectable Internal errors are fatal.
pub const AER_UNC_SEVERITY_SPEC_DEFAULT: u32 = AER_UNC_DLP
    | AER_UNC_SURPRISE_DOWN
    | AER_UNC_FCP
    | AER_UNC_RX_OVERFLOW
    | AER_UNC_MALFORMED_TLP
    | AER_UNC_INTERNAL;
/// The severity register's reset value here: the spec's defaults of the implemented errors.
pub const AER_UNC_SEVERITY_DEFAULT: u32 = AER_UNC_SEVERITY_SPEC_DEFAULT & AER_UNC_IMPLEMENTED;
/// The mask register's reset value (7.8.4.3): Uncorrectable Internal Error is masked.
pub const AER_UNC_MASK_DEFAULT: u32 = AER_UNC_INTERNAL;

// ---- Correctable errors (7.8.4.5-6) ----

/// Receiver Error.
pub const AER_COR_RECEIVER: u32 = 1 << 0;
/// Bad TLP.
pub const AER_COR_BAD_TLP: u32 = 1 << 6;
/// Bad DLLP.
pub const AER_COR_BAD_DLLP: u32 = 1 << 7;
/// REPLAY_NUM Rollover.
pub const AER_COR_REPLAY_ROLLOVER: u32 = 1 << 8;
/// Replay Timer Timeout.
pub const AER_COR_REPLAY_TIMEOUT: u32 = 1 << 12;
/// Advisory Non-Fatal Error.
pub const AER_COR_ADVISORY_NON_FATAL: u32 = 1 << 13;
/// The correctable errors this function implements.
pub const AER_COR_IMPLEMENTED: u32 = AER_COR_RECEIVER
    | AER_COR_BAD_TLP
    | AER_COR_BAD_DLLP
    | AER_COR_REPLAY_ROLLOVER
    | AER_COR_REPLAY_TIMEOUT
    | AER_COR_ADVISORY_NON_FATAL;
/// The mask register's reset value (7.8.4.6): Advisory Non-Fatal Error is masked.
pub const AER_COR_MASK_DEFAULT: u32 = AER_COR_ADVISORY_NON_FATAL;

// ---- Advanced Error Capabilities and Control (7.8.4.7) ----

/// First Error Pointer, bits 4:0 (ROS): the status bit of the first uncorrectable error
/// recorded; valid while that status bit is set.
pub const AER_CAP_FIRST_ERR_PTR_MASK: u32 = 0x1f;
/// ECRC Generation Capable (RO).
pub const AER_CAP_ECRC_GEN_CAPABLE: u32 = 1 << 5;
/// ECRC Generation Enable (RWS).
pub const AER_CAP_ECRC_GEN_ENABLE: u32 = 1 << 6;
/// ECRC Check Capable (RO).
pub const AER_CAP_ECRC_CHECK_CAPABLE: u32 = 1 << 7;
/// ECRC Check Enable (RWS).
pub const AER_CAP_ECRC_CHECK_ENABLE: u32 = 1 << 8;
/// The register's reset value: ECRC generation and checking capable, both disabled (the
/// function implements ECRC Error, so it checks ECRC).
pub const AER_CAP_CONTROL_DEFAULT: u32 = AER_CAP_ECRC_GEN_CAPABLE | AER_CAP_ECRC_CHECK_CAPABLE;
/// Its writable bits: the two enables (Multiple Header Recording is not capable, so its
/// enable is read-only 0).
pub const AER_CAP_CONTROL_WMASK: u32 = AER_CAP_ECRC_GEN_ENABLE | AER_CAP_ECRC_CHECK_ENABLE;

// ---- Root Port registers (7.8.4.9-10) ----

/// Root Error Command: Correctable, Non-Fatal and Fatal Error Reporting Enable (bits 2:0, RW).
pub const AER_ROOT_COMMAND_WMASK: u32 = 0x7;
/// Root Error Status bits 6:0 (RW1CS): ERR_COR received, multiple ERR_COR received,
/// ERR_FATAL/NONFATAL received, multiple of those, first uncorrectable fatal, non-fatal and
/// fatal error messages received. Bits 31:27 (interrupt message number) are RO 0 here.
pub const AER_ROOT_STATUS_W1C: u32 = 0x7f;

/// An error a function can record in its AER capability (6.2.7, table 6-5 lists them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AerError {
    DataLinkProtocol,
    PoisonedTlp,
    FlowControlProtocol,
    CompletionTimeout,
    CompleterAbort,
    UnexpectedCompletion,
    ReceiverOverflow,
    MalformedTlp,
    Ecrc,
    UnsupportedRequest,
    UncorrectableInternal,
    Receiver,
    BadTlp,
    BadDllp,
    ReplayNumRollover,
    ReplayTimerTimeout,
    AdvisoryNonFatal,
}

impl AerError {
    /// Every error, uncorrectable ones first.
    pub const ALL: [AerError; 17] = [
        AerError::DataLinkProtocol,
        AerError::PoisonedTlp,
        AerError::FlowControlProtocol,
        AerError::CompletionTimeout,
        AerError::CompleterAbort,
        AerError::UnexpectedCompletion,
        AerError::ReceiverOverflow,
        AerError::MalformedTlp,
        AerError::Ecrc,
        AerError::UnsupportedRequest,
        AerError::UncorrectableInternal,
        AerError::Receiver,
        AerError::BadTlp,
        AerError::BadDllp,
        AerError::ReplayNumRollover,
        AerError::ReplayTimerTimeout,
        AerError::AdvisoryNonFatal,
    ];

    /// True for an uncorrectable error (recorded in 7.8.4.2), false for a correctable one
    /// (7.8.4.5).
    pub fn is_uncorrectable(self) -> bool {
        !matches!(
            self,
            AerError::Receiver
                | AerError::BadTlp
                | AerError::BadDllp
                | AerError::ReplayNumRollover
                | AerError::ReplayTimerTimeout
                | AerError::AdvisoryNonFatal
        )
    }

    /// Its bit in the status, mask (and, uncorrectable, severity) registers.
    pub fn bit(self) -> u32 {
        match self {
            AerError::DataLinkProtocol => AER_UNC_DLP,
            AerError::PoisonedTlp => AER_UNC_POISONED_TLP,
            AerError::FlowControlProtocol => AER_UNC_FCP,
            AerError::CompletionTimeout => AER_UNC_COMP_TIMEOUT,
            AerError::CompleterAbort => AER_UNC_COMP_ABORT,
            AerError::UnexpectedCompletion => AER_UNC_UNEXP_COMP,
            AerError::ReceiverOverflow => AER_UNC_RX_OVERFLOW,
            AerError::MalformedTlp => AER_UNC_MALFORMED_TLP,
            AerError::Ecrc => AER_UNC_ECRC,
            AerError::UnsupportedRequest => AER_UNC_UNSUP_REQ,
            AerError::UncorrectableInternal => AER_UNC_INTERNAL,
            AerError::Receiver => AER_COR_RECEIVER,
            AerError::BadTlp => AER_COR_BAD_TLP,
            AerError::BadDllp => AER_COR_BAD_DLLP,
            AerError::ReplayNumRollover => AER_COR_REPLAY_ROLLOVER,
            AerError::ReplayTimerTimeout => AER_COR_REPLAY_TIMEOUT,
            AerError::AdvisoryNonFatal => AER_COR_ADVISORY_NON_FATAL,
        }
    }
}

/// The error message (6.2.3.1) AER decides a recorded error calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorMessage {
    /// ERR_COR.
    Correctable,
    /// ERR_NONFATAL.
    NonFatal,
    /// ERR_FATAL.
    Fatal,
}

/// What recording an error did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AerOutcome {
    /// The status bit is set; the error is masked, so nothing is signalled (and for an
    /// uncorrectable error neither the First Error Pointer nor the Header Log changed).
    Masked,
    /// The status bit is set and the error is to be signalled with this message. Whether the
    /// message leaves the function is the Device Control reporting enables' and SERR#
    /// Enable's business (6.2.5), which is the caller's.
    Signal(ErrorMessage),
}

/// The function has no AER capability (a conventional function, or one built without it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoAer;

impl fmt::Display for NoAer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the function has no Advanced Error Reporting capability")
    }
}

impl std::error::Error for NoAer {}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{
        AER_OFFSET, DSN_OFFSET, FunctionKind, FunctionSpec, PCI_EXT_CAP_ID_DSN, PciFunction,
    };
    use proptest::prelude::*;

    fn endpoint() -> PciFunction {
        PciFunction::new(&FunctionSpec {
            serial: 0x1122_3344_5566_7788,
            ..FunctionSpec::endpoint(0x1af4, 0x1337, 0xff0000)
        })
    }

    fn reg(f: &PciFunction, r: usize) -> u32 {
        f.read(AER_OFFSET + r, 4) as u32
    }

    /// Walks the extended capability chain from 0x100: (ID, version, offset) per capability.
    fn chain(f: &PciFunction) -> Vec<(u16, u32, usize)> {
        let mut out = vec![];
        let mut at = 0x100;
        while at != 0 {
            assert!(
                out.len() < 64 && at >= 0x100 && at % 4 == 0,
                "bad next {at:#x}"
            );
            let h = f.read(at, 4) as u32;
            if h == 0 {
                break;
            }
            out.push((h as u16, (h >> 16) & 0xf, at));
            at = (h >> 20) as usize;
        }
        out
    }

    #[test]
    fn chain_is_dsn_then_aer_then_the_end() {
        let f = endpoint();
        assert_eq!(
            chain(&f),
            [
                (PCI_EXT_CAP_ID_DSN, 1, DSN_OFFSET),
                (PCI_EXT_CAP_ID_AER, AER_CAP_VERSION, AER_OFFSET)
            ]
        );
        assert_eq!(f.read(DSN_OFFSET + 4, 4), 0x5566_7788);
        assert_eq!(f.read(DSN_OFFSET + 8, 4), 0x1122_3344);
        // Past the last capability and up to 0xfff: zeros; past the space: all ones.
        assert!(
            (AER_OFFSET + AER_SIZE..0x1000)
                .step_by(4)
                .all(|r| f.read(r, 4) == 0)
        );
        assert_eq!(f.read(0xffc, 4), 0);
        assert_eq!(f.read(0xffe, 4), 0xffff_ffff);
        // Without AER, DSN ends the chain.
        let g = PciFunction::new(&FunctionSpec {
            aer: false,
            ..FunctionSpec::endpoint(1, 2, 0)
        });
        assert_eq!(chain(&g), [(PCI_EXT_CAP_ID_DSN, 1, DSN_OFFSET)]);
        assert_eq!(g.aer_offset(), None);
        assert_eq!(g.clone().report_error(AerError::BadTlp, None), Err(NoAer));
        // A conventional function has no extended space at all.
        let h = PciFunction::new(&FunctionSpec {
            pcie: false,
            ..FunctionSpec::endpoint(1, 2, 0)
        });
        assert_eq!(h.read(0x100, 4), 0xffff_ffff);
        assert_eq!(h.clone().report_error(AerError::BadTlp, None), Err(NoAer));
    }

    #[test]
    fn reset_values_are_the_specs() {
        let f = endpoint();
        assert_eq!(reg(&f, AER_UNCOR_STATUS), 0);
        assert_eq!(reg(&f, AER_UNCOR_MASK), AER_UNC_INTERNAL);
        // 0x00462030 without Surprise Down (not implemented by an endpoint).
        assert_eq!(AER_UNC_SEVERITY_SPEC_DEFAULT, 0x0046_2030);
        assert_eq!(reg(&f, AER_UNCOR_SEVERITY), 0x0046_2010);
        assert_eq!(reg(&f, AER_COR_STATUS), 0);
        assert_eq!(reg(&f, AER_COR_MASK), AER_COR_ADVISORY_NON_FATAL);
        assert_eq!(
            reg(&f, AER_CAP_CONTROL),
            0xa0,
            "ECRC generation and check capable"
        );
        assert!((0..AER_HEADER_LOG_DWORDS).all(|i| reg(&f, AER_HEADER_LOG + 4 * i) == 0));
    }

    #[test]
    fn masks_severity_and_control_write_only_their_writable_bits() {
        let mut f = endpoint();
        for r in [
            AER_UNCOR_MASK,
            AER_UNCOR_SEVERITY,
            AER_COR_MASK,
            AER_CAP_CONTROL,
        ] {
            f.write(AER_OFFSET + r, 4, 0xffff_ffff);
        }
        assert_eq!(reg(&f, AER_UNCOR_MASK), AER_UNC_IMPLEMENTED);
        assert_eq!(reg(&f, AER_UNCOR_SEVERITY), AER_UNC_IMPLEMENTED);
        assert_eq!(reg(&f, AER_COR_MASK), AER_COR_IMPLEMENTED);
        assert_eq!(reg(&f, AER_CAP_CONTROL), 0x1e0);
        for r in [
            AER_UNCOR_MASK,
            AER_UNCOR_SEVERITY,
            AER_COR_MASK,
            AER_CAP_CONTROL,
        ] {
            f.write(AER_OFFSET + r, 4, 0);
        }
        assert_eq!(reg(&f, AER_UNCOR_MASK), 0);
        assert_eq!(reg(&f, AER_UNCOR_SEVERITY), 0);
        assert_eq!(reg(&f, AER_COR_MASK), 0);
        assert_eq!(
            reg(&f, AER_CAP_CONTROL),
            AER_CAP_CONTROL_DEFAULT,
            "capable bits are RO"
        );
        // A byte write reaches only its byte.
        f.write(AER_OFFSET + AER_UNCOR_MASK + 2, 1, 0x40);
        assert_eq!(reg(&f, AER_UNCOR_MASK), AER_UNC_INTERNAL);
        // Headers and the header log are read-only.
        f.write(AER_OFFSET, 4, 0);
        f.write(DSN_OFFSET, 4, 0);
        f.write(AER_OFFSET + AER_HEADER_LOG, 4, 0xffff_ffff);
        assert_eq!(chain(&f).len(), 2);
        assert_eq!(reg(&f, AER_HEADER_LOG), 0);
    }

    #[test]
    fn status_bits_are_write_one_to_clear() {
        let mut f = endpoint();
        f.write(AER_OFFSET + AER_UNCOR_STATUS, 4, 0xffff_ffff);
        f.write(AER_OFFSET + AER_COR_STATUS, 4, 0xffff_ffff);
        assert_eq!(reg(&f, AER_UNCOR_STATUS), 0, "writing 1 never sets");
        assert_eq!(reg(&f, AER_COR_STATUS), 0);
        f.report_error(AerError::UnsupportedRequest, None).unwrap();
        f.report_error(AerError::CompleterAbort, None).unwrap();
        f.report_error(AerError::BadTlp, None).unwrap();
        f.report_error(AerError::Receiver, None).unwrap();
        let unc = AER_UNC_UNSUP_REQ | AER_UNC_COMP_ABORT;
        assert_eq!(reg(&f, AER_UNCOR_STATUS), unc);
        // Writing 0 leaves; writing 1 clears only that bit.
        f.write(AER_OFFSET + AER_UNCOR_STATUS, 4, 0);
        assert_eq!(reg(&f, AER_UNCOR_STATUS), unc);
        f.write(
            AER_OFFSET + AER_UNCOR_STATUS,
            4,
            u64::from(AER_UNC_COMP_ABORT),
        );
        assert_eq!(reg(&f, AER_UNCOR_STATUS), AER_UNC_UNSUP_REQ);
        // Byte 2 of the status holds bit 20 (UR): a byte write of 0x10 clears it.
        f.write(AER_OFFSET + AER_UNCOR_STATUS + 2, 1, 0x10);
        assert_eq!(reg(&f, AER_UNCOR_STATUS), 0);
        f.write(AER_OFFSET + AER_COR_STATUS, 2, u64::from(AER_COR_BAD_TLP));
        assert_eq!(reg(&f, AER_COR_STATUS), AER_COR_RECEIVER);
    }

    #[test]
    fn first_error_and_header_log() {
        let mut f = endpoint();
        let hdr = [0x4a00_0001, 0x0100_0004, 0x0000_0010, 0xdead_beef];
        assert_eq!(
            f.report_error(AerError::UnsupportedRequest, Some(hdr)),
            Ok(AerOutcome::Signal(ErrorMessage::NonFatal))
        );
        assert_eq!(reg(&f, AER_CAP_CONTROL) & AER_CAP_FIRST_ERR_PTR_MASK, 20);
        let log: Vec<u32> = (0..4).map(|i| reg(&f, AER_HEADER_LOG + 4 * i)).collect();
        assert_eq!(log, hdr);
        // A second error while the first is pending: status only.
        assert_eq!(
            f.report_error(AerError::MalformedTlp, Some([1, 2, 3, 4])),
            Ok(AerOutcome::Signal(ErrorMessage::Fatal))
        );
        assert_eq!(reg(&f, AER_CAP_CONTROL) & AER_CAP_FIRST_ERR_PTR_MASK, 20);
        assert_eq!(reg(&f, AER_HEADER_LOG + 12), 0xdead_beef);
        // Software clears the first error: the next one is recorded.
        f.write(
            AER_OFFSET + AER_UNCOR_STATUS,
            4,
            u64::from(AER_UNC_UNSUP_REQ),
        );
        f.report_error(AerError::CompletionTimeout, None).unwrap();
        assert_eq!(reg(&f, AER_CAP_CONTROL) & AER_CAP_FIRST_ERR_PTR_MASK, 14);
        assert_eq!(reg(&f, AER_HEADER_LOG + 12), 0);
        // Writes to the control register keep the pointer (ROS).
        f.write(AER_OFFSET + AER_CAP_CONTROL, 4, 0);
        assert_eq!(reg(&f, AER_CAP_CONTROL) & AER_CAP_FIRST_ERR_PTR_MASK, 14);
    }

    #[test]
    fn masked_errors_set_status_but_signal_and_log_nothing() {
        let mut f = endpoint();
        assert_eq!(
            f.report_error(AerError::UncorrectableInternal, Some([9; 4])),
            Ok(AerOutcome::Masked)
        );
        assert_eq!(reg(&f, AER_UNCOR_STATUS), AER_UNC_INTERNAL);
        assert_eq!(reg(&f, AER_CAP_CONTROL) & AER_CAP_FIRST_ERR_PTR_MASK, 0);
        assert_eq!(reg(&f, AER_HEADER_LOG), 0);
        assert_eq!(
            f.report_error(AerError::AdvisoryNonFatal, None),
            Ok(AerOutcome::Masked)
        );
        assert_eq!(reg(&f, AER_COR_STATUS), AER_COR_ADVISORY_NON_FATAL);
        assert_eq!(
            f.report_error(AerError::ReplayTimerTimeout, None),
            Ok(AerOutcome::Signal(ErrorMessage::Correctable))
        );
        // Unmask the internal error, make UR fatal: the outcome follows the registers.
        f.write(AER_OFFSET + AER_UNCOR_MASK, 4, 0);
        f.write(
            AER_OFFSET + AER_UNCOR_SEVERITY,
            4,
            u64::from(AER_UNC_SEVERITY_DEFAULT | AER_UNC_UNSUP_REQ),
        );
        assert_eq!(
            f.report_error(AerError::UncorrectableInternal, None),
            Ok(AerOutcome::Signal(ErrorMessage::Fatal))
        );
        assert_eq!(
            f.report_error(AerError::UnsupportedRequest, None),
            Ok(AerOutcome::Signal(ErrorMessage::Fatal))
        );
        // Every error maps to one implemented bit of its register.
        for e in AerError::ALL {
            let implemented = if e.is_uncorrectable() {
                AER_UNC_IMPLEMENTED
            } else {
                AER_COR_IMPLEMENTED
            };
            assert_eq!(e.bit().count_ones(), 1);
            assert_ne!(e.bit() & implemented, 0, "{e:?}");
        }
    }

    #[test]
    fn root_ports_have_the_root_error_registers() {
        let mut f = PciFunction::new(&FunctionSpec::bridge(
            0x1b36,
            0x000c,
            FunctionKind::RootPort,
        ));
        f.write(AER_OFFSET + AER_ROOT_COMMAND, 4, 0xffff_ffff);
        assert_eq!(reg(&f, AER_ROOT_COMMAND), AER_ROOT_COMMAND_WMASK);
        f.write(AER_OFFSET + AER_ROOT_STATUS, 4, 0xffff_ffff);
        assert_eq!(reg(&f, AER_ROOT_STATUS), 0);
        f.write(AER_OFFSET + AER_ERROR_SOURCE_ID, 4, 0xffff_ffff);
        assert_eq!(reg(&f, AER_ERROR_SOURCE_ID), 0);
        // An endpoint has no such registers: they are past its capability and read 0.
        let mut e = endpoint();
        e.write(AER_OFFSET + AER_ROOT_COMMAND, 4, 0xffff_ffff);
        assert_eq!(reg(&e, AER_ROOT_COMMAND), 0);
    }

    fn snapshot(f: &PciFunction) -> Vec<u8> {
        (0..0x1000).map(|r| f.read(r, 1) as u8).collect()
    }

    /// (register, size, data) with the register aligned to its size, as the ioreq ABI has it.
    fn access() -> impl Strategy<Value = (usize, usize, u64)> {
        (
            prop_oneof![
                AER_OFFSET..AER_OFFSET + AER_SIZE_ROOT_PORT,
                DSN_OFFSET..DSN_OFFSET + 0x10,
                0usize..0x1000
            ],
            prop_oneof![Just(1usize), Just(2), Just(4)],
            any::<u64>(),
        )
            .prop_map(|(r, s, d)| (r & !(s - 1), s, d))
    }

    fn check_writes(
        mut f: PciFunction,
        writes: &[(usize, usize, u64)],
        errors: &[(usize, AerError)],
    ) -> Result<(), TestCaseError> {
        for (i, &(r, s, d)) in writes.iter().enumerate() {
            for (_, e) in errors.iter().filter(|(at, _)| *at == i) {
                let _ = f.report_error(*e, Some([d as u32; 4]));
            }
            let before = snapshot(&f);
            f.write(r, s, d);
            let after = snapshot(&f);
            for a in 0..0x1000 {
                let (old, new) = (before[a], after[a]);
                let set = new & !old;
                let cleared = old & !new;
                // No write sets a bit software cannot write (RO, RW1C, reserved).
                prop_assert_eq!(set & !f.wmask[a], 0, "set at {:#x}", a);
                // A bit clears only if writable, or RW1C and written 1.
                let in_access = a >= r && a < r + s;
                let ones = if in_access {
                    (d >> (8 * (a - r))) as u8
                } else {
                    0
                };
                prop_assert_eq!(
                    cleared & !(f.wmask[a] | (f.w1c[a] & ones)),
                    0,
                    "cleared at {:#x}",
                    a
                );
                if !in_access {
                    prop_assert_eq!(old, new, "byte {:#x} outside the access changed", a);
                }
            }
            // The chain stays intact.
            prop_assert_eq!(chain(&f).len(), 2);
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn writes_never_set_read_only_bits_and_rw1c_never_sets(
            writes in proptest::collection::vec(access(), 1..40),
            errors in proptest::collection::vec(
                (0usize..40, proptest::sample::select(AerError::ALL.to_vec())), 0..10),
            root in any::<bool>(),
        ) {
            let f = if root {
                PciFunction::new(&FunctionSpec::bridge(0x1b36, 0x000c, FunctionKind::RootPort))
            } else {
                endpoint()
            };
            check_writes(f, &writes, &errors)?;
        }
    }
}
