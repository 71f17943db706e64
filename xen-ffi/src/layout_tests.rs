//! Layout tests of the bindgen types against the facts of public/hvm/ioreq.h (Xen 4.17), of
//! the hand-written constants in [`crate::abi`] against the generated ones, and of the page
//! views against the generated structs.

use crate::abi;
use crate::pages::{BufferedPageView, PageBuf};
use crate::sys::types as t;
use std::mem::{offset_of, size_of, size_of_val};

/// The memory image of an `ioreq`.
fn ioreq_bytes(r: &t::ioreq) -> [u8; 32] {
    // SAFETY: `ioreq` is 32 bytes (asserted below and by bindgen) with no padding: 8+8+4+4+4+2
    // bytes of fields, one bitfield byte and `type`, so every byte is initialised.
    unsafe { std::mem::transmute::<t::ioreq, [u8; 32]>(*r) }
}

fn ioreq_from_bytes(b: [u8; 32]) -> t::ioreq {
    // SAFETY: every bit pattern is a valid `ioreq` (integers and a bitfield byte only).
    unsafe { std::mem::transmute::<[u8; 32], t::ioreq>(b) }
}

#[test]
fn ioreq_size_and_offsets() {
    assert_eq!(size_of::<t::ioreq>(), 32);
    assert_eq!(size_of::<t::ioreq_t>(), abi::IOREQ_SIZE);
    assert_eq!(offset_of!(t::ioreq, addr), abi::IOREQ_OFFSET_ADDR);
    assert_eq!(offset_of!(t::ioreq, data), abi::IOREQ_OFFSET_DATA);
    assert_eq!(offset_of!(t::ioreq, count), abi::IOREQ_OFFSET_COUNT);
    assert_eq!(offset_of!(t::ioreq, size), abi::IOREQ_OFFSET_SIZE);
    assert_eq!(offset_of!(t::ioreq, vp_eport), abi::IOREQ_OFFSET_VP_EPORT);
    assert_eq!(offset_of!(t::ioreq, _pad0), 28);
    assert_eq!(offset_of!(t::ioreq, _bitfield_1), abi::IOREQ_OFFSET_FLAGS);
    assert_eq!(offset_of!(t::ioreq, type_), abi::IOREQ_OFFSET_TYPE);
}

#[test]
fn ioreq_bitfield_bits() {
    type Case = (fn(&mut t::ioreq), u8);
    let cases: [Case; 6] = [
        (|r| r.set_state(0xf), 0x0f),
        (|r| r.set_state(abi::STATE_IORESP_READY), 0x03),
        (|r| r.set_data_is_ptr(1), 0x10),
        (|r| r.set_dir(1), 0x20),
        (|r| r.set_df(1), 0x40),
        (|r| r.set__pad1(1), 0x80),
    ];
    for (set, byte30) in cases {
        let mut r = t::ioreq::default();
        set(&mut r);
        let b = ioreq_bytes(&r);
        let mut want = [0u8; 32];
        want[30] = byte30;
        assert_eq!(b, want, "byte 30 should be {byte30:#04x}");
    }

    // All fields at once, checked byte by byte and read back through the getters.
    let mut r = t::ioreq {
        addr: 0x1122_3344_5566_7788,
        data: 0x99aa_bbcc_ddee_ff00,
        count: 0x0102_0304,
        size: 4,
        vp_eport: 0x0a0b_0c0d,
        _pad0: 0,
        type_: 0xab,
        ..Default::default()
    };
    r.set_state(abi::STATE_IOREQ_READY);
    r.set_dir(1);
    let b = ioreq_bytes(&r);
    assert_eq!(&b[0..8], &0x1122_3344_5566_7788u64.to_le_bytes());
    assert_eq!(&b[8..16], &0x99aa_bbcc_ddee_ff00u64.to_le_bytes());
    assert_eq!(&b[16..20], &[4, 3, 2, 1]);
    assert_eq!(&b[20..24], &4u32.to_le_bytes());
    assert_eq!(&b[24..28], &0x0a0b_0c0du32.to_le_bytes());
    assert_eq!(&b[28..30], &[0, 0]);
    assert_eq!(b[30], 0x21);
    assert_eq!(b[31], 0xab);

    let mut img = [0u8; 32];
    img[30] = 0x5e; // state 0xe, data_is_ptr 1, dir 0, df 1
    img[31] = 2;
    let r = ioreq_from_bytes(img);
    assert_eq!(
        (
            r.state(),
            r.data_is_ptr(),
            r.dir(),
            r.df(),
            r._pad1(),
            r.type_
        ),
        (0xe, 1, 0, 1, 0, 2)
    );
}

#[test]
fn shared_iopage_element_is_one_ioreq() {
    let p = t::shared_iopage::default();
    assert_eq!(size_of_val(&p.vcpu_ioreq[0]), 32);
    assert_eq!(size_of::<t::shared_iopage>(), 32);
    assert_eq!(
        abi::IOREQ_PAGE_SLOTS * size_of::<t::ioreq>(),
        abi::XEN_PAGE_SIZE
    );
}

#[test]
fn buf_ioreq_layout_and_bits() {
    assert_eq!(size_of::<t::buf_ioreq>(), abi::BUF_IOREQ_SIZE);
    assert_eq!(size_of::<t::buf_ioreq_t>(), 8);
    assert_eq!(std::mem::align_of::<t::buf_ioreq>(), 4);

    let word0 = |b: &t::buf_ioreq| b._bindgen_opaque_blob[0].to_le_bytes();
    type Case = (fn(&mut t::buf_ioreq), u32);
    let cases: [Case; 5] = [
        (|b| b.set_type_(0xff), 0x0000_00ff),
        (|b| b.set_pad(1), 1 << 8),
        (|b| b.set_dir(1), 1 << 9),
        (|b| b.set_size(3), 3 << 10),
        (|b| b.set_addr(0xf_ffff), 0xf_ffff << 12),
    ];
    for (set, want) in cases {
        let mut b = t::buf_ioreq::default();
        set(&mut b);
        assert_eq!(
            word0(&b),
            want.to_le_bytes(),
            "first u32 should be {want:#010x}"
        );
        assert_eq!(b.data(), 0);
    }

    let mut b = t::buf_ioreq::default();
    b.set_type_(1);
    b.set_dir(1);
    b.set_size(2);
    b.set_addr(0x12345);
    b.set_data(0xcafe_f00d);
    // SAFETY: `buf_ioreq` is two initialised u32 words.
    let bytes: [u8; 8] = unsafe { std::mem::transmute(b) };
    let lo = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    assert_eq!(lo, 1 | (1 << 9) | (2 << 10) | (0x12345 << 12));
    assert_eq!(
        &bytes[4..8],
        &0xcafe_f00du32.to_le_bytes(),
        "data is the u32 at offset 4"
    );
    assert_eq!(
        (b.type_(), b.pad(), b.dir(), b.size(), b.addr()),
        (1, 0, 1, 2, 0x12345)
    );
}

#[test]
fn buffered_iopage_layout() {
    assert_eq!(size_of::<t::buffered_iopage>(), 4096);
    assert_eq!(size_of::<t::buffered_iopage_t>(), abi::XEN_PAGE_SIZE);
    assert_eq!(offset_of!(t::buffered_iopage, read_pointer), 0);
    assert_eq!(offset_of!(t::buffered_iopage, write_pointer), 4);
    assert_eq!(offset_of!(t::buffered_iopage, buf_ioreq), 8);
    let p = t::buffered_iopage {
        read_pointer: 0,
        write_pointer: 0,
        buf_ioreq: [t::buf_ioreq::default(); 511],
    };
    assert_eq!(p.buf_ioreq.len(), 511);
    assert_eq!(p.buf_ioreq.len() as u32, t::IOREQ_BUFFER_SLOT_NUM);
}

#[test]
fn hand_written_constants_match_the_headers() {
    assert_eq!(
        u32::from(abi::HVM_IOREQSRV_BUFIOREQ_OFF),
        t::HVM_IOREQSRV_BUFIOREQ_OFF
    );
    assert_eq!(
        u32::from(abi::HVM_IOREQSRV_BUFIOREQ_LEGACY),
        t::HVM_IOREQSRV_BUFIOREQ_LEGACY
    );
    assert_eq!(
        u32::from(abi::HVM_IOREQSRV_BUFIOREQ_ATOMIC),
        t::HVM_IOREQSRV_BUFIOREQ_ATOMIC
    );
    assert_eq!(
        abi::XENMEM_RESOURCE_IOREQ_SERVER,
        t::XENMEM_resource_ioreq_server
    );
    assert_eq!(
        abi::XENMEM_RESOURCE_IOREQ_SERVER_FRAME_BUFIOREQ,
        u64::from(t::XENMEM_resource_ioreq_server_frame_bufioreq)
    );
    assert_eq!(abi::xenmem_resource_ioreq_server_frame_ioreq(0), 1);
    assert_eq!(abi::IOREQ_BUFFER_SLOT_NUM, t::IOREQ_BUFFER_SLOT_NUM);
    assert_eq!(u32::from(abi::STATE_IOREQ_NONE), t::STATE_IOREQ_NONE);
    assert_eq!(u32::from(abi::STATE_IOREQ_READY), t::STATE_IOREQ_READY);
    assert_eq!(
        u32::from(abi::STATE_IOREQ_INPROCESS),
        t::STATE_IOREQ_INPROCESS
    );
    assert_eq!(u32::from(abi::STATE_IORESP_READY), t::STATE_IORESP_READY);
    // A few HVM params, to show the tools-only block of params.h was included.
    assert_eq!(t::HVM_PARAM_IOREQ_PFN, 5);
    assert_eq!(t::HVM_PARAM_BUFIOREQ_PFN, 6);
    assert_eq!(t::HVM_PARAM_BUFIOREQ_EVTCHN, 26);
    assert_eq!(t::HVM_PARAM_NR_IOREQ_SERVER_PAGES, 33);
    assert_eq!(t::XEN_DMOP_IO_RANGE_PORT, 0);
    assert_eq!(t::XEN_DMOP_IO_RANGE_MEMORY, 1);
    assert_eq!(t::XEN_DMOP_IO_RANGE_PCI, 2);
}

/// The device-model protocol's ops that carry Xen's DMOP numbers (docs/dm-protocol.md) do.
#[test]
fn protocol_ops_are_xen_dmop_numbers() {
    use ioreq_server::oop::wire::op;
    for (ours, xen) in [
        (op::CREATE_IOREQ_SERVER, t::XEN_DMOP_create_ioreq_server),
        (op::GET_IOREQ_SERVER_INFO, t::XEN_DMOP_get_ioreq_server_info),
        (
            op::MAP_IO_RANGE_TO_IOREQ_SERVER,
            t::XEN_DMOP_map_io_range_to_ioreq_server,
        ),
        (
            op::UNMAP_IO_RANGE_FROM_IOREQ_SERVER,
            t::XEN_DMOP_unmap_io_range_from_ioreq_server,
        ),
        (
            op::SET_IOREQ_SERVER_STATE,
            t::XEN_DMOP_set_ioreq_server_state,
        ),
        (op::DESTROY_IOREQ_SERVER, t::XEN_DMOP_destroy_ioreq_server),
        (op::INJECT_MSI, t::XEN_DMOP_inject_msi),
    ] {
        assert_eq!(u32::from(ours), xen, "{}", op::name(ours));
    }
    // What `xendevicemodel_inject_msi` sends: data, pad, then the 64-bit address.
    assert_eq!(size_of::<t::xen_dm_op_inject_msi>(), 16);
    assert_eq!(offset_of!(t::xen_dm_op_inject_msi, data), 0);
    assert_eq!(offset_of!(t::xen_dm_op_inject_msi, addr), 8);
}

/// The [`IoreqPage`](crate::IoreqPage) view reads and writes the same bytes as the bindgen
/// struct's fields and bitfield.
#[test]
fn ioreq_page_view_matches_bindgen() {
    let mut page = PageBuf::new_boxed();
    let mut r = t::ioreq {
        addr: 0xfee0_0000,
        data: 0,
        count: 1,
        size: 4,
        vp_eport: 42,
        type_: 1,
        ..Default::default()
    };
    r.set_state(abi::STATE_IOREQ_READY);
    r.set_dir(1);
    r.set_df(1);
    let img = ioreq_bytes(&r);
    page.bytes()[3 * 32..4 * 32].copy_from_slice(&img);
    {
        let v = page.ioreq_page();
        assert_eq!(v.state(3), abi::STATE_IOREQ_READY);
        assert_eq!(v.vp_eport(3), 42);
        assert_eq!(v.load(3), img);
        v.set_data(3, 0x1234_5678_9abc_def0);
        v.set_state(3, abi::STATE_IORESP_READY);
    }
    let mut back = [0u8; 32];
    back.copy_from_slice(&page.bytes()[3 * 32..4 * 32]);
    let back = ioreq_from_bytes(back);
    assert_eq!(back.data, 0x1234_5678_9abc_def0);
    assert_eq!(back.state(), u8::try_from(t::STATE_IORESP_READY).unwrap());
    assert_eq!(
        (back.dir(), back.df(), back.type_),
        (1, 1, 1),
        "other bits kept"
    );
}

/// The [`BufferedPageView`] reads the same pointers and slots as the bindgen struct.
#[test]
fn buffered_view_matches_bindgen() {
    let mut page = PageBuf::new_boxed();
    let mut slot = t::buf_ioreq::default();
    slot.set_type_(0);
    slot.set_dir(0);
    slot.set_size(1);
    slot.set_addr(0x3f8);
    slot.set_data(0x41);
    {
        let b = page.bytes();
        b[0..4].copy_from_slice(&7u32.to_ne_bytes());
        b[4..8].copy_from_slice(&8u32.to_ne_bytes());
        let off = offset_of!(t::buffered_iopage, buf_ioreq) + 7 * size_of::<t::buf_ioreq>();
        // SAFETY: `buf_ioreq` is two initialised u32 words.
        let img: [u8; 8] = unsafe { std::mem::transmute(slot) };
        b[off..off + 8].copy_from_slice(&img);
    }
    let v = page.buffered_page();
    assert_eq!(v.pointers(), (7, 8));
    let raw = v.slot(7 % BufferedPageView::SLOTS);
    let lo = raw as u32;
    assert_eq!(lo, slot._bindgen_opaque_blob[0]);
    assert_eq!((raw >> 32) as u32, 0x41);
    assert_eq!((lo >> 12) & 0xf_ffff, 0x3f8);
    assert_eq!(v.advance_read(1), 8);
}

/// Comparison with `ioreq_server::abi::RawIoreq` (dev-dependency on ../ioreq-server).
mod raw_ioreq {
    use super::*;
    use ioreq_server::abi::RawIoreq;

    #[test]
    fn raw_ioreq_matches_bindgen_layout() {
        assert_eq!(size_of::<RawIoreq>(), size_of::<t::ioreq>());
        assert_eq!(
            std::mem::align_of::<RawIoreq>(),
            std::mem::align_of::<t::ioreq>()
        );
        assert_eq!(offset_of!(RawIoreq, addr), offset_of!(t::ioreq, addr));
        assert_eq!(offset_of!(RawIoreq, data), offset_of!(t::ioreq, data));
        assert_eq!(offset_of!(RawIoreq, count), offset_of!(t::ioreq, count));
        assert_eq!(offset_of!(RawIoreq, size), offset_of!(t::ioreq, size));
        assert_eq!(
            offset_of!(RawIoreq, vp_eport),
            offset_of!(t::ioreq, vp_eport)
        );
        assert_eq!(offset_of!(RawIoreq, pad0), offset_of!(t::ioreq, _pad0));
        assert_eq!(
            offset_of!(RawIoreq, flags),
            offset_of!(t::ioreq, _bitfield_1)
        );
        assert_eq!(offset_of!(RawIoreq, ty), offset_of!(t::ioreq, type_));
    }

    #[test]
    fn raw_ioreq_round_trips_through_bindgen() {
        let mut r = t::ioreq {
            addr: 0x0001_80ff_0000_0ffc,
            data: 0x0123_4567_89ab_cdef,
            count: 3,
            size: 2,
            vp_eport: 9,
            _pad0: 0,
            type_: 2,
            ..Default::default()
        };
        r.set_state(2);
        r.set_data_is_ptr(1);
        r.set_dir(1);
        r.set_df(0);
        let raw = RawIoreq::from_bytes(&ioreq_bytes(&r));
        assert_eq!(raw.addr, r.addr);
        assert_eq!(raw.data, r.data);
        assert_eq!(raw.count, r.count);
        assert_eq!(raw.size, r.size);
        assert_eq!(raw.vp_eport, r.vp_eport);
        assert_eq!(raw.flags, 0x32);
        assert_eq!(raw.ty, 2);
        assert_eq!(raw.state(), r.state());

        // And back: RawIoreq's image read through the bindgen getters.
        let b = ioreq_from_bytes(raw.to_bytes());
        assert_eq!(
            (b.state(), b.data_is_ptr(), b.dir(), b.df(), b.type_),
            (2, 1, 1, 0, 2)
        );
        assert_eq!(ioreq_bytes(&b), raw.to_bytes());
    }
}
