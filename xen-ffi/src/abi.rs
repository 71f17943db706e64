//! The few ABI constants the safe layer needs, available with or without the `bindgen`
//! feature. Each value is from the Xen 4.17 public headers named beside it; with the feature
//! on, the layout tests check them against the bindgen-generated constants.

/// Size of a Xen frame (`XEN_PAGE_SIZE`), which is what a resource frame maps.
pub const XEN_PAGE_SIZE: usize = 4096;

/// Size of one `ioreq_t` (public/hvm/ioreq.h).
pub const IOREQ_SIZE: usize = 32;

/// Slots in the synchronous ioreq page: one `ioreq_t` per vCPU. `HVM_MAX_VCPUS` is 128
/// (public/hvm/hvm_info_table.h), and 128 * 32 bytes is exactly one page.
pub const IOREQ_PAGE_SLOTS: usize = XEN_PAGE_SIZE / IOREQ_SIZE;

/// `IOREQ_BUFFER_SLOT_NUM` (public/hvm/ioreq.h): 8-byte slots after the two 32-bit pointers.
pub const IOREQ_BUFFER_SLOT_NUM: u32 = 511;

/// Size of one `buf_ioreq_t` (public/hvm/ioreq.h).
pub const BUF_IOREQ_SIZE: usize = 8;

/// Byte offsets inside `ioreq_t` (public/hvm/ioreq.h).
pub const IOREQ_OFFSET_ADDR: usize = 0;
/// Offset of `data`.
pub const IOREQ_OFFSET_DATA: usize = 8;
/// Offset of `count`.
pub const IOREQ_OFFSET_COUNT: usize = 16;
/// Offset of `size`.
pub const IOREQ_OFFSET_SIZE: usize = 20;
/// Offset of `vp_eport`.
pub const IOREQ_OFFSET_VP_EPORT: usize = 24;
/// Offset of the bitfield byte: bits 3:0 `state`, 4 `data_is_ptr`, 5 `dir`, 6 `df`, 7 `_pad1`.
pub const IOREQ_OFFSET_FLAGS: usize = 30;
/// Offset of `type`.
pub const IOREQ_OFFSET_TYPE: usize = 31;

/// Mask of the 4-bit `state` field in the bitfield byte.
pub const IOREQ_STATE_MASK: u8 = 0x0f;

/// `STATE_IOREQ_NONE` (public/hvm/ioreq.h).
pub const STATE_IOREQ_NONE: u8 = 0;
/// `STATE_IOREQ_READY`.
pub const STATE_IOREQ_READY: u8 = 1;
/// `STATE_IOREQ_INPROCESS`.
pub const STATE_IOREQ_INPROCESS: u8 = 2;
/// `STATE_IORESP_READY`.
pub const STATE_IORESP_READY: u8 = 3;

/// `HVM_IOREQSRV_BUFIOREQ_OFF` (public/hvm/hvm_op.h, under `__XEN_TOOLS__`).
pub const HVM_IOREQSRV_BUFIOREQ_OFF: u8 = 0;
/// `HVM_IOREQSRV_BUFIOREQ_LEGACY`.
pub const HVM_IOREQSRV_BUFIOREQ_LEGACY: u8 = 1;
/// `HVM_IOREQSRV_BUFIOREQ_ATOMIC`: Xen also folds both ring pointers below 511 with a 64-bit
/// compare-and-exchange, so the consumer must advance `read_pointer` atomically.
pub const HVM_IOREQSRV_BUFIOREQ_ATOMIC: u8 = 2;

/// `XENMEM_resource_ioreq_server` (public/memory.h): resource type of an ioreq server's pages.
pub const XENMEM_RESOURCE_IOREQ_SERVER: u32 = 0;

/// `XENMEM_resource_ioreq_server_frame_bufioreq` (public/memory.h): frame 0 is the buffered page.
pub const XENMEM_RESOURCE_IOREQ_SERVER_FRAME_BUFIOREQ: u64 = 0;

/// `XENMEM_resource_ioreq_server_frame_ioreq(n)` (public/memory.h): the n-th synchronous ioreq
/// page is frame `1 + n`. (A function-like macro, so bindgen does not emit it.)
pub const fn xenmem_resource_ioreq_server_frame_ioreq(n: u64) -> u64 {
    1 + n
}
