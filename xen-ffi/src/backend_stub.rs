//! The backend without the `bindgen` feature: nothing can be loaded, so every type is
//! uninhabited and [`load`] is the only function that can actually run.

use crate::error::XenError;
use std::ptr::NonNull;

/// Uninhabited: without bindings there are no libraries.
pub(crate) enum Libs {}
pub(crate) enum DmRaw {}
pub(crate) enum FmRaw {}
pub(crate) enum ResRaw {}
pub(crate) enum MapAddr {}
pub(crate) enum EvRaw {}

pub(crate) fn load(_sonames: [&'static str; 3]) -> Result<Libs, XenError> {
    Err(XenError::NotBuilt)
}

pub(crate) fn dm_open(l: &Libs) -> Result<DmRaw, XenError> {
    match *l {}
}
pub(crate) fn dm_close(l: &Libs, _: &DmRaw) -> Result<(), XenError> {
    match *l {}
}
pub(crate) fn dm_nr_vcpus(l: &Libs, _: &DmRaw, _: u16) -> Result<u32, XenError> {
    match *l {}
}
pub(crate) fn dm_create_ioreq_server(l: &Libs, _: &DmRaw, _: u16, _: u8) -> Result<u16, XenError> {
    match *l {}
}
pub(crate) fn dm_get_ioreq_server_info(
    l: &Libs,
    _: &DmRaw,
    _: u16,
    _: u16,
) -> Result<u32, XenError> {
    match *l {}
}
pub(crate) fn dm_io_range(
    l: &Libs,
    _: &DmRaw,
    _: u16,
    _: u16,
    _: bool,
    _: (u64, u64),
    _: bool,
) -> Result<(), XenError> {
    match *l {}
}
pub(crate) fn dm_pcidev(
    l: &Libs,
    _: &DmRaw,
    _: u16,
    _: u16,
    _: (u16, u8, u8, u8),
    _: bool,
) -> Result<(), XenError> {
    match *l {}
}
pub(crate) fn dm_set_ioreq_server_state(
    l: &Libs,
    _: &DmRaw,
    _: u16,
    _: u16,
    _: bool,
) -> Result<(), XenError> {
    match *l {}
}
pub(crate) fn dm_destroy_ioreq_server(l: &Libs, _: &DmRaw, _: u16, _: u16) -> Result<(), XenError> {
    match *l {}
}
pub(crate) fn dm_inject_msi(l: &Libs, _: &DmRaw, _: u16, _: u64, _: u32) -> Result<(), XenError> {
    match *l {}
}

pub(crate) fn fm_open(l: &Libs) -> Result<FmRaw, XenError> {
    match *l {}
}
pub(crate) fn fm_close(l: &Libs, _: &FmRaw) -> Result<(), XenError> {
    match *l {}
}
pub(crate) fn fm_map_resource(
    l: &Libs,
    _: &FmRaw,
    _: u16,
    _: u32,
    _: u32,
    _: u64,
    _: u64,
) -> Result<(ResRaw, MapAddr), XenError> {
    match *l {}
}
pub(crate) fn fm_unmap_resource(l: &Libs, _: &FmRaw, _: &ResRaw) -> Result<(), XenError> {
    match *l {}
}
pub(crate) fn map_addr(a: &MapAddr) -> NonNull<u8> {
    match *a {}
}

pub(crate) fn ev_open(l: &Libs) -> Result<EvRaw, XenError> {
    match *l {}
}
pub(crate) fn ev_close(l: &Libs, _: &EvRaw) -> Result<(), XenError> {
    match *l {}
}
pub(crate) fn ev_fd(l: &Libs, _: &EvRaw) -> Result<i32, XenError> {
    match *l {}
}
pub(crate) fn ev_bind_interdomain(l: &Libs, _: &EvRaw, _: u16, _: u32) -> Result<u32, XenError> {
    match *l {}
}
pub(crate) fn ev_unbind(l: &Libs, _: &EvRaw, _: u32) -> Result<(), XenError> {
    match *l {}
}
pub(crate) fn ev_notify(l: &Libs, _: &EvRaw, _: u32) -> Result<(), XenError> {
    match *l {}
}
pub(crate) fn ev_pending(l: &Libs, _: &EvRaw) -> Result<u32, XenError> {
    match *l {}
}
pub(crate) fn ev_unmask(l: &Libs, _: &EvRaw, _: u32) -> Result<(), XenError> {
    match *l {}
}
