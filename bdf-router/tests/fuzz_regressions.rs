//! Inputs the fuzz targets (`fuzz/`, `scripts/fuzz.sh`) crashed on, replayed as plain tests.

#![allow(clippy::unwrap_used)]

use bdf_router::{Cf8Latch, EcamWindow, Router};
use ioreq_server::{Claim, Dir, IoRange};

/// `ecam_router`: `replace_window(Some(old), Some(new))` where `old` was never a window and
/// `new` is refused (it overlaps claimed MMIO) put `old` in "back": a window appeared that
/// nobody asked for, possibly over claimed MMIO. The model's windows were `[]`, the router's
/// `[segment 0 buses 00-00 at 0x0]`.
#[test]
fn ecam_router_refused_replace_adds_no_window() {
    let mut r = Router::new();
    let q = r.add_server("qemu");
    r.claim(q, &Claim::Range(IoRange::mmio(0x100_0000, 0x1000)))
        .unwrap();
    let never = EcamWindow::new(0, 0, 0, 0).unwrap();
    let clashing = EcamWindow::new(0, 0x100_0000, 0, 0).unwrap();
    assert!(r.replace_window(Some(never), Some(clashing)).is_err());
    assert_eq!(r.windows(), &[], "no window out of nowhere");
    // A window that is there is still kept when its replacement is refused.
    let w = EcamWindow::new(0, 0xb000_0000, 0, 0xff).unwrap();
    r.replace_window(None, Some(w)).unwrap();
    assert!(r.replace_window(Some(w), Some(clashing)).is_err());
    assert_eq!(r.windows(), &[w]);
    // And an old window over claimed MMIO never comes back through this path.
    let over_mmio = EcamWindow::new(1, 0x100_0000, 0, 0).unwrap();
    let other = EcamWindow::new(0, 0xb800_0000, 0, 0).unwrap();
    assert!(r.replace_window(Some(over_mmio), Some(other)).is_err());
    assert_eq!(r.windows(), &[w]);
}

/// `ecam_router` input `0f 00000080 05 80`: CF8 enabled, a decode of port 0xcfd with size
/// u32::MAX overflowed in `cf8_decode` instead of saying "not a config access".
#[test]
fn ecam_router_cf8_latch_decode_of_a_huge_size() {
    let l = Cf8Latch { value: 0x8000_0000 };
    assert_eq!(l.decode(0xcfd, u32::MAX, Dir::Read), None);
    assert_eq!(l.decode(0xcfc, u32::MAX - 3, Dir::Write), None);
    assert!(l.decode(0xcfd, 1, Dir::Read).is_some());
}
