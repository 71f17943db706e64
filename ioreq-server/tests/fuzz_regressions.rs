//! Inputs the fuzz targets (`fuzz/`, `scripts/fuzz.sh`) crashed on, replayed as plain tests.
//! Each test names its target and what went wrong before the fix.

#![allow(clippy::unwrap_used)]

use ioreq_server::abi::{self, IOREQ_BUFFER_SLOT_NUM};
use ioreq_server::bufioreq::{BufSlot, BufferError, BufioreqMode};
use ioreq_server::oop::shm::SharedPages;
use ioreq_server::{Dir, Ioreq, IoreqError, IoreqType};
use std::fs::File;
use std::os::unix::fs::FileExt;

/// A buffered page with the given pointers and slots, as a peer (or a fuzzer) could leave it:
/// written through the shared memory's file, read through `SharedPages::buffered`.
fn page(read: u32, write: u32, slots: &[u64]) -> SharedPages {
    let pages = SharedPages::create("fuzz-regression").unwrap();
    let mut img = vec![0u8; 4096];
    img[0..4].copy_from_slice(&read.to_le_bytes());
    img[4..8].copy_from_slice(&write.to_le_bytes());
    for (i, s) in slots.iter().enumerate() {
        img[8 + 8 * i..16 + 8 * i].copy_from_slice(&s.to_le_bytes());
    }
    let file = File::from(pages.fd().try_clone_to_owned().unwrap());
    file.write_all_at(&img, 0).unwrap();
    pages
}

/// `ioreq_abi` input `ff ffffffff e7 f7 00 00 00 06`: read_pointer 0xffffffff, write_pointer
/// 0xf6 (247 one-byte port writes, pointers wrapped as Xen's 32-bit pointers do). Draining
/// the entry at 0xffffffff carried into write_pointer (one 64-bit add on both pointers), so
/// drain delivered 248 entries, the last one never written.
#[test]
fn ioreq_abi_drain_across_pointer_wrap() {
    let p = page(0xffff_ffff, 0xf6, &[]);
    let ring = p.buffered();
    assert_eq!(ring.pending(), 247);
    let mut got = vec![];
    assert_eq!(ring.drain(|r| got.push(r)), Ok(247));
    assert_eq!(got.len(), 247);
    assert!(got.iter().all(|r| r.ty == IoreqType::Pio && r.size == 1));
    assert_eq!(
        ring.pointers(),
        (0xf6, 0xf6),
        "write_pointer untouched by the consumer"
    );
    // An 8-byte entry straddling the wrap takes its two slots and nothing else.
    let eight = BufSlot {
        ty: abi::IOREQ_TYPE_COPY,
        dir: Dir::Write,
        size_code: 3,
        addr: 0xa0000,
        data: 0x5566_7788,
    };
    let hi = BufSlot {
        data: 0x1122_3344,
        ..eight
    };
    let mut slots = vec![0u64; IOREQ_BUFFER_SLOT_NUM as usize];
    let first = (0xffff_fffe_u32 % IOREQ_BUFFER_SLOT_NUM) as usize;
    slots[first] = eight.encode();
    slots[(first + 1) % IOREQ_BUFFER_SLOT_NUM as usize] = hi.encode();
    let p = page(0xffff_fffe, 0, &slots);
    let mut got = vec![];
    assert_eq!(p.buffered().drain(|r| got.push(r)), Ok(1));
    assert_eq!(got[0].data, 0x1122_3344_5566_7788);
    assert_eq!(p.buffered().pointers(), (0, 0));
}

/// `ioreq_abi`, pointers a corrupt page can have: write_pointer 0x10000 ahead of
/// read_pointer. Drain walked the 511 slots round and round 65536 times (the fuzzer's
/// callback gave up past 4096 entries); now it stops after one ring's worth.
#[test]
fn ioreq_abi_drain_of_a_corrupt_ring_is_bounded() {
    let p = page(0, 0x1_0000, &[]);
    let mut n = 0;
    assert_eq!(p.buffered().drain(|_| n += 1), Ok(511));
    assert_eq!(n, 511);
    assert_eq!(p.buffered().pointers(), (511, 0x1_0000));
}

/// `ioreq_abi`, the producer on a page whose peer set write_pointer just behind
/// read_pointer (`w - r` = 2^32 - 1): `w - r + needed` overflowed (a panic with overflow
/// checks). Such a ring is full.
#[test]
fn ioreq_abi_push_onto_corrupt_pointers() {
    for (r, w) in [(1u32, 0u32), (2, 0), (0, 0xffff_ffff), (7, 5)] {
        let p = page(r, w, &[]);
        for size in [1, 8] {
            let req = Ioreq::new(IoreqType::Copy, Dir::Write, 0xa0000, size, 0);
            for mode in [BufioreqMode::Atomic, BufioreqMode::Legacy] {
                assert_eq!(p.buffered().push(&req, mode), Err(BufferError::Full));
            }
        }
        assert_eq!(p.buffered().pointers(), (r, w));
    }
}

/// `ecam_router` input `0f 00000080 05 80`: `Cf8Latch::decode` of port 0xcfd with size
/// u32::MAX reached `cf8_decode`, whose `(port - 0xcfc) + size` overflowed.
#[test]
fn ecam_router_cf8_decode_of_a_huge_size() {
    let cf8 = abi::CF8_ENABLE;
    for port in 0xcfc..=0xcff {
        for size in [u32::MAX, u32::MAX - 1, u32::MAX - 3, 5] {
            assert_eq!(
                abi::cf8_decode(cf8, port, size),
                None,
                "port {port:#x} size {size}"
            );
        }
    }
    assert_eq!(abi::cf8_decode(cf8, 0xcfd, 3), Some((0, 1)));
}

/// `engine` (a raw PCI_CONFIG ioreq handed to `Engine::handle`): 8 bytes at register 3
/// passed `validate` and made `Router::observe_read` shift a u64 by 64. Xen only makes
/// PCI_CONFIG requests of 1, 2 or 4 bytes inside one dword (from CFC..CFF); the engine's
/// intercept lookup relies on it too, so anything else is malformed.
#[test]
fn engine_pci_config_leaving_its_dword_is_malformed() {
    for (reg, size) in [(3, 8), (0, 8), (0x60, 8), (0x5e, 4), (0x3f, 2), (0xffd, 4)] {
        let r = Ioreq::pci_config(0, reg, Dir::Read, size, 0);
        assert!(
            matches!(
                r.validate(),
                Err(IoreqError::ConfigDword { .. } | IoreqError::ConfigRegister { .. })
            ),
            "reg {reg:#x} size {size}: {:?}",
            r.validate()
        );
    }
    for (reg, size) in [(0, 4), (0x3e, 2), (0x3f, 1), (0xffc, 4), (0x62, 2)] {
        assert_eq!(
            Ioreq::pci_config(0, reg, Dir::Write, size, 0).validate(),
            Ok(())
        );
    }
}
