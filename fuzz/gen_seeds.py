#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets into fuzz/corpus-seed/<target>/.

The structured targets read their input as operations with a byte encoding of their own
(see the `run` function of each module in fuzz/src/); the helpers below follow it. Seeds are
firmware-like: what SeaBIOS/OVMF do to the chipset and the bridges, real ioreq slots, real
QEMU log lines, a trace made by the importer, valid control messages.

Run from the repository root:  python3 fuzz/gen_seeds.py
(the trace_reader seeds need target/release/ioreq-mux or target/debug/ioreq-mux, e.g.
`cargo build --release -p ioreq-mux --no-default-features`; they are skipped without it).
"""

import os
import shutil
import struct
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fuzz", "corpus-seed")


def u8(v):
    return struct.pack("<B", v & 0xFF)


def u16(v):
    return struct.pack("<H", v & 0xFFFF)


def u32(v):
    return struct.pack("<I", v & 0xFFFFFFFF)


def u64(v):
    return struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF)


def write(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- ioreq_abi ----

def ioreq(addr, data, count, size, eport, state, ptr, read, df, ty):
    flags = state | (0x10 if ptr else 0) | (0x20 if read else 0) | (0x40 if df else 0)
    return u64(addr) + u64(data) + u32(count) + u32(size) + u32(eport) + u16(0) + u8(flags) + u8(ty)


def sbdf(seg, bus, dev, fn):
    return (seg << 16) | (bus << 8) | (dev << 3) | fn


def bufslot(ty, read, size_code, addr, data):
    lo = ty | (int(read) << 9) | ((size_code & 3) << 10) | ((addr & 0xFFFFF) << 12)
    return lo | (data << 32)


def ioreq_abi():
    # PCI_CONFIG read of PMBASE (00:1f.0 @0x40, 4 bytes), as Xen converts CFC; READY.
    cfg = ioreq(sbdf(0, 0, 0x1F, 0) << 32 | 0x40, 0, 1, 4, 1000, 1, False, True, False, 2)
    # The CF8 write before it; an 8-byte ECAM read; INVALIDATE; a rep MMIO write through a
    # guest buffer (df set); a completed slot (IORESP_READY).
    cf8 = ioreq(0xCF8, 0x8000F840, 1, 4, 1000, 1, False, False, False, 0)
    ecam = ioreq(0xB00F8040, 0, 1, 8, 1001, 1, False, True, False, 1)
    inval = ioreq(0, 0, 1, 0, 1000, 1, False, False, False, 8)
    rep = ioreq(0xA0000, 0x7000, 16, 4, 1000, 2, True, False, True, 1)
    done = ioreq(sbdf(0, 0, 0, 0) << 32 | 0x60, 0xB0000001, 1, 4, 1000, 3, False, True, False, 2)
    write("ioreq_abi", "pci-config-read", b"\x00" + cfg)
    write("ioreq_abi", "cf8-write", b"\x00" + cf8)
    write("ioreq_abi", "ecam-8-byte-read", b"\x00" + ecam)
    write("ioreq_abi", "page", b"\x00" + cf8 + cfg + ecam + inval + rep + done)
    # Buffered rings: three entries (a port write, an 8-byte MMIO write in two slots), then
    # drain, push an 8-byte write, drain, check.
    slots = [
        bufslot(0, False, 0, 0x80, 0x12),
        bufslot(1, False, 3, 0xA0000, 0x55667788),
        bufslot(1, False, 3, 0xA0000, 0x11223344),
    ]
    ops = b"\x00" + b"\x01" + u8(0x02) + u32(0xA0000) + u8(0) + u8(7) + u64(0x0102030405060708) + u8(2) + b"\x00\x02"
    ring = u32(0) + u8(0) + u8(3) + u8(2) + b"".join(u64(s) for s in slots) + u64(0) + ops
    write("ioreq_abi", "ring", b"\x01" + ring)
    # Pointers about to wrap (Legacy rings grow for ever).
    ring = u32(0xFFFFFFFE) + u8(0) + u8(3) + u8(2) + b"".join(u64(s) for s in slots) + u64(0) + ops
    write("ioreq_abi", "ring-wrapping", b"\x01" + ring)
    # Found by fuzzing: 247 entries from read_pointer 0xffffffff (the consumer's add carried
    # into write_pointer); and a write_pointer just behind read_pointer, then a push.
    write("ioreq_abi", "ring-read-pointer-wrap", bytes.fromhex("ffffffffffe7f700000006"))
    push = b"\x01" + u8(0x02) + u32(0xA0000) + u8(0) + u8(7) + u64(1) + u8(2)
    write("ioreq_abi", "ring-corrupt-pointers", b"\x01" + u32(1) + u8(0xE9) + u8(0) + b"\x00" + push)


# ---- ecam_router ----

DEVFNS = [0x00, 0x08, 0x10, 0x11, 0x18, 0x19, 0xF8, 0x01]
REGS = [0x00, 0x08, 0x0A, 0x0B, 0x0C, 0x0E, 0x18, 0x19, 0x1A, 0x1B, 0x17, 0x16, 0x0D, 0x04, 0x3C, 0x100]


def r_sbdf(seg, bus, devfn):
    """pick_sbdf: (segment selector, bus, devfn selector)."""
    d = DEVFNS.index(devfn) if devfn in DEVFNS else devfn
    assert d < 0xC0 or devfn == d
    return u8(seg) + u8(bus) + u8(d)


def r_acc(op, bus, devfn, reg, size, value):
    k = REGS.index(reg)
    return u8(op) + r_sbdf(0, bus, devfn) + u8(k) + u8({1: 0, 2: 1, 4: 2}[size]) + u8(0) + u32(value)


def ecam_router():
    s = b""
    s += u8(0) + u8(0) + r_sbdf(0, 0, 0x00) + u8(0x3F)        # s0 claims 00:00.0-00:07.7
    s += u8(7) + u8(1) + u8(2) + u8(0) + u8(2) + u8(0)          # s1 claims 00:02.0/00.0
    s += u8(7) + u8(2) + u8(3) + u8(0) + u8(2) + u8(0) + u8(1)  # s2 claims 00:02.0/00.0/01.0
    s += u8(10) + u8(0) + u8(0) + u8(44)                        # window at 44 MiB, buses 0-ff
    s += u8(3) + u8(0) + u8(0) + u8(0x60) + u8(0x7F)            # s0 ports 0x600-0x67f
    s += u8(5) + u8(3) + u8(0) + u8(60) + u8(0) + u16(0x10) + u8(12)  # s3 MMIO at 60 MiB
    s += r_acc(11, 0, 0x10, 0x0A, 2, 0x0604)                    # class code: a bridge
    s += r_acc(11, 0, 0x10, 0x0E, 1, 0x81)                      # header type 0x81
    s += r_acc(12, 0, 0x10, 0x19, 1, 1)                         # secondary bus 1
    s += r_acc(12, 0, 0x10, 0x1A, 1, 0xFF)                      # subordinate 0xff
    s += r_acc(11, 1, 0x00, 0x0E, 1, 0x01)                      # switch upstream port
    s += r_acc(12, 1, 0x00, 0x18, 4, 0x00030201)                # 1 -> 2..3
    s += r_acc(12, 0, 0x10, 0x18, 4, 0x00050500)                # renumber the root port
    s += u8(14) + u8(1) + u8(0) + u8(0) + u32(0x1008) + u8(2) + u64(0x1234)  # decode
    s += u8(15) + u32(0x8000F840) + u8(0x04) + u8(2)            # CF8 decode
    s += u8(8) + u8(1) + u8(0)                                  # s1 releases its position
    s += u8(9) + u8(2)                                          # s2 goes away
    s += u8(16) + r_sbdf(0, 2, 0x00) + u64(0x2C00000) + u8(44) + u16(0)
    write("ecam_router", "firmware", s)
    # Windows of two segments, a refused move, release and re-claim.
    s = b""
    s += u8(10) + u8(0) + u8(3 << 1) + u8(16)                   # bus 0 only, at 16 MiB
    s += u8(10) + u8(0) + u8(1 | 2 << 1) + u8(32)               # segment 1, buses 0x40-0x7f
    s += u8(10) + u8(1) + u8(0) + u8(3 << 1) + u8(8)            # move the first to 8 MiB
    s += u8(5) + u8(0) + u8(0) + u8(20) + u8(0) + u16(0x100) + u8(8)
    s += u8(10) + u8(1) + u8(0) + u8(3 << 1) + u8(20)           # refused: over MMIO
    s += u8(6) + u8(0) + u8(0) + u8(20) + u8(0) + u16(0x100) + u8(8)
    s += u8(0) + u8(1) + r_sbdf(1, 0x40, 0x00) + u8(7)
    s += u8(2) + u8(1) + r_sbdf(1, 0x40, 0x00) + u8(7)
    write("ecam_router", "windows", s)
    # Found by fuzzing: CF8 decode of port 0xcfd with size u32::MAX (overflowed).
    write("ecam_router", "cf8-huge-size", bytes.fromhex("0f0000008005800f0000008007810100"))


# ---- chipset_intercept ----

def ci_acc(func, dword_idx, off, size_code, read, data, ecam=False):
    sel = (func << 1) | int(read)
    s = off | (size_code << 2) | (0x80 if ecam else 0)
    return u8(sel) + u8(dword_idx) + u8(s) + u32(data)


def chipset_intercept():
    # Q35, PCIEXBAR instead, PM and TOLUD after; low RAM up to 2 GiB.
    setup = u8(0) + u8(3) + u8(2) + u8(2) + u8(0) + u8(1) + u16(0x8000) + u8(0)
    ops = b""
    ops += ci_acc(0, 0, 0, 2, False, 0xB0000001)   # PCIEXBAR: 256 MiB at 0xb0000000
    ops += ci_acc(0, 0, 0, 2, True, 0)
    ops += ci_acc(0, 1, 0, 2, False, 0)            # high dword
    ops += ci_acc(0, 0, 0, 0, False, 0x05)         # 64 MiB, one byte
    ops += ci_acc(0, 0, 3, 0, False, 0xE0)
    ops += ci_acc(1, 2, 0, 2, False, 0x601)        # PMBASE 0x600
    ops += ci_acc(1, 3, 0, 0, False, 0x80)         # ACPI_EN
    ops += ci_acc(1, 2, 0, 2, True, 0x601)
    ops += ci_acc(0, 6, 0, 1, False, 0x8000)       # TOLUD 2 GiB
    ops += ci_acc(0, 6, 0, 1, True, 0)             # QEMU reads 0: unknown again
    ops += ci_acc(0, 5, 2, 1, False, 0x1400)       # TOUUD
    write("chipset_intercept", "q35", setup + ops)
    setup = u8(2) + u8(0) + u8(2) + u8(0) + u8(0) + u8(0) + u8(0)
    ops = ci_acc(2, 2, 0, 2, False, 0xB001) + ci_acc(2, 4, 0, 0, False, 1) + ci_acc(2, 2, 0, 2, True, 0)
    write("chipset_intercept", "piix4", setup + ops)


# ---- engine ----

E_FUNCS = [(0, 0x00), (0, 0xF8), (0, 0x08), (0, 0x0B), (0, 0x10), (0, 0x11), (0, 0x18), (1, 0x00),
           (2, 0x00), (3, 0x00), (4, 0x00), (5, 0x00), (6, 0x00), (3, 0x08), (4, 0x08), (2, 0x01),
           (0xFF, 0x00), (0, 0x20)]
E_REGS = [0x00, 0x04, 0x08, 0x0C, 0x0E, 0x10, 0x14, 0x18, 0x19, 0x1A, 0x1C, 0x20, 0x24, 0x3C, 0x40,
          0x44, 0x60, 0x61, 0x63, 0x64, 0x80, 0xA0, 0xA2, 0xB0, 0x100, 0x104, 0x0A, 0x42]


def e_cfg(write, ecam, func, reg, size, data=0, vcpu=0):
    op = (0 if write else 1) | (2 if ecam else 0) | (vcpu << 7)
    sz = {1: 0, 2: 1, 4: 2, 8: 7}[size]
    b = u8(op) + u8(E_FUNCS.index(func)) + u8(E_REGS.index(reg)) + u8(sz)
    return b + (u64(data) if write else b"")


def q35_to_bar(bar):
    """Q35: ECAM at 0xb0000000, the bridges to the vgpu numbered, its BAR placed at `bar`."""
    mch, rp0 = (0, 0x00), (0, 0x10)
    s = u8(0x00)                                         # Q35, whole segments
    s += u8(0x7A) + u32(0xB0000000)                      # PCIEXBAR (| 1) through CF8
    s += e_cfg(False, True, mch, 0x00, 4)                # vendor/device through ECAM
    s += e_cfg(False, False, rp0, 0x0A, 2)               # class code, then header type
    s += e_cfg(False, False, rp0, 0x0E, 1)
    s += e_cfg(True, True, rp0, 0x18, 4, 0x00FF0100)     # root port: 1..0xff
    s += e_cfg(False, True, (1, 0x00), 0x0E, 1)          # the switch's upstream port
    s += e_cfg(True, True, (1, 0x00), 0x19, 1, 2)
    s += e_cfg(True, True, (1, 0x00), 0x1A, 1, 4)
    s += e_cfg(False, True, (2, 0x00), 0x0E, 1)
    s += e_cfg(True, True, (2, 0x00), 0x19, 1, 3)
    s += e_cfg(True, True, (2, 0x00), 0x1A, 1, 3)
    s += e_cfg(False, True, (3, 0x00), 0x00, 4)          # the vgpu
    s += e_cfg(True, True, (3, 0x00), 0x10, 4, 0xFFFFFFFF)  # BAR sizing, then placement
    s += e_cfg(False, True, (3, 0x00), 0x10, 4)
    s += e_cfg(True, True, (3, 0x00), 0x10, 8, bar | 4)
    s += e_cfg(True, True, (3, 0x00), 0x04, 2, 0x0006)
    return s


def engine():
    mch, lpc, rp0, rp1 = (0, 0x00), (0, 0xF8), (0, 0x10), (0, 0x11)
    # Found by fuzzing (a harness fix): PCIEXBAR moves the window over the vgpu's BAR; the
    # router refuses it.
    write("engine", "q35-window-over-bar", q35_to_bar(0xF9000000) + u8(0x7A) + u32(0xF8000004))
    s = q35_to_bar(0xFE000000)
    s += e_cfg(True, False, lpc, 0x40, 4, 0x601)         # PMBASE, ACPI_EN
    s += e_cfg(True, False, lpc, 0x44, 1, 0x80)
    s += u8(0x41) + u8(0xC0) + u16(0x608) + u8(2) + u32(0) + u8(0)   # PM timer read
    s += u8(0x30) + u8(E_FUNCS.index(rp1)) + u8(E_REGS.index(0x00))  # CF8 vs ECAM
    s += u8(0x60) + u32(0x80) + u8(0) + u64(0x12)        # buffered port write
    s += u8(0x71) + u8(0) + u8(0) + u8(0) + u8(2) + u64(0)  # PCI_CONFIG straight in
    s += u8(0x78) + u8(0x79) + u64(12345)                # broadcasts
    s += e_cfg(True, False, mch, 0x60, 4, 0xE0000005)    # move and shrink the window
    s += e_cfg(False, True, rp0, 0x18, 4)
    write("engine", "q35-firmware", s)
    s = u8(0x02) + u8(0x7A) + u32(0xB0000000) + e_cfg(False, True, (2, 0x00), 0x00, 4)
    s += e_cfg(False, False, rp0, 0x0E, 1) + e_cfg(True, False, rp0, 0x19, 1, 1)
    s += e_cfg(True, False, rp0, 0x1A, 1, 1) + e_cfg(False, False, (1, 0x00), 0x00, 4)
    write("engine", "q35-functions-mode", s)
    s = u8(0x01)                                         # i440FX
    s += e_cfg(True, False, (0, 0x0B), 0x40, 4, 0xB001) + e_cfg(True, False, (0, 0x0B), 0x80, 1, 1)
    s += u8(0x41) + u8(0xC0) + u16(0xB008) + u8(2) + u32(0) + u8(0)
    s += e_cfg(False, False, (0, 0x18), 0x0E, 1) + e_cfg(True, False, (0, 0x18), 0x18, 4, 0x00010100)
    write("engine", "i440fx", s)
    # Found by fuzzing: an 8-byte PCI_CONFIG read at register 3 straight into the engine
    # (panicked in Router::observe_read), and a 4-byte write across into PCIEXBAR.
    write("engine", "pci-config-8-bytes", u8(0) + u8(0x71) + u8(0) + u8(0) + u8(3) + u8(3) + u64(0))
    write("engine", "pci-config-across-dwords",
          u8(0) + u8(0x70) + u8(0) + u8(0xFF) + u16(0x5C) + u8(2) + u8(2) + u64(0x00010000))


# ---- wire ----

def packet(op, tag, body, version=2):
    return b"IOMX" + u16(version) + u16(op) + u32(tag) + u32(len(body)) + body


def wire():
    msgs = {
        "create": packet(1, 1, u8(2) + u8(0) + u16(6) + b"vgpu-0"),
        "get-info": packet(2, 2, u16(1) + u16(0)),
        "map-range": packet(3, 3, u16(1) + u16(0) + u32(1) + u64(0xFE000000) + u64(0xFE000FFF)),
        "unmap-ports": packet(4, 4, u16(1) + u16(0) + u32(0) + u64(0x600) + u64(0x67F)),
        "set-state": packet(5, 5, u16(1) + u8(1) + u8(0)),
        "map-pcidev": packet(0x101, 6, u16(1) + u16(0) + u8(2) + u8(0) + u8(0) + u8(0)),
        "map-position": packet(0x103, 7, u16(1) + u16(0) + u8(0) + u8(3) + u16(0) + bytes([0x10, 0x00, 0x08])),
        "inject-msi": packet(0x000E, 8, u16(1) + u16(0) + u32(0x4071) + u64(0xFEE0100C)),
        "reply-inject-msi": packet(0x800E, 8, b""),
        "reply-created": packet(0x8001, 1, u16(1) + u16(0) + u32(2)),
        "reply-info": packet(0x8002, 2, u16(1) + u8(2) + u8(0) + u32(2) + u32(12288) + u32(0) + u32(4096) + u32(8192)),
        # A version-1 peer's CREATE (refused with EPROTONOSUPPORT).
        "create-v1": packet(1, 1, u8(2) + u8(0) + u16(6) + b"vgpu-0", version=1),
        "reply-done": packet(0x8005, 5, b""),
        "reply-error": packet(0xFFFF, 3, u32(22) + u16(3) + u16(0) + b"invalid range"),
        "position-moved": packet(0x4001, 0, u16(1) + u8(1) + u8(0) + u32(0x0300) + u16(0) + u8(0) + u8(2) + bytes([0x10, 0x00])),
        "goodbye": packet(0x4002, 0, u32(108) + b"shutting down"),
    }
    for name, p in msgs.items():
        write("wire", name, b"\x00" + p)
    # Structured mode: a MapPosition request, an Error reply and an InjectMsi request.
    write("wire", "built-position", b"\x01" + u32(9) + u16(1) + u8(8) + u8(3) + u16(0) + u8(0) + bytes([0x10, 0, 8]))
    write("wire", "built-error", b"\x01" + u32(9) + u16(1) + u8(13) + u16(3) + u32(22) + u16(5) + b"nope!")
    write("wire", "built-inject-msi", b"\x01" + u32(9) + u16(1) + u8(16) + u64(0xFEE0100C) + u32(0x4071))


# ---- pcie_port ----

# Indices into HOT in fuzz/src/pcie_port.rs.
HOT_COMMAND, HOT_SEC_STATUS, HOT_BRIDGE_CONTROL, HOT_DEVCTL, HOT_LNKCTL = 0, 1, 2, 3, 4
HOT_SLTCTL, HOT_SLTSTA, HOT_LNKCTL2, HOT_MSI_FLAGS, HOT_MSI_LO = 5, 6, 7, 8, 9
HOT_MSI_HI, HOT_MSI_DATA, HOT_MSI_MASK, HOT_ROOT_CMD, HOT_ROOT_STATUS = 10, 11, 12, 13, 14


def p_config(kind, speed, width, flags, number):
    """kind 0 root / 1 downstream / 2 upstream; speed 0-3 (2.5-16 GT/s); width 0-6 (x1-x32);
    flags: bit 7 no slot, bit 5 power controller, bit 6 no command completed..."""
    return u8(kind) + u8(speed) + u8(width) + u8(flags) + u16(number)


def p_hot(reg, size_sel, data):
    return u8(2) + u8(reg) + u8(size_sel) + u32(data)


def p_msi_on():
    """What Linux's port driver does: bus master, MSI address/data, MSI enable."""
    return (p_hot(HOT_COMMAND, 1, 0x4) + p_hot(HOT_MSI_LO, 2, 0xFEE0100C)
            + p_hot(HOT_MSI_HI, 2, 0) + p_hot(HOT_MSI_DATA, 1, 0x4071)
            + p_hot(HOT_MSI_FLAGS, 1, 0x1))


def pcie_port():
    plug, unplug, button, abort = u8(3), u8(4), u8(5), u8(8)
    enables = 0x1000 | 0x20 | 0x10 | 0x8 | 0x1   # DLLSCE HPIE CCIE PDCE ABPE
    pic_off = 0x300
    clear = p_hot(HOT_SLTSTA, 1, 0x11F)
    write("pcie_port", "pciehp-add-remove",
          p_config(0, 2, 3, 0, 7) + p_msi_on() + p_hot(HOT_SLTCTL, 1, enables) + clear
          + plug + clear + button + p_hot(HOT_SLTCTL, 1, enables | pic_off) + clear + unplug
          + clear + u8(0) + u16(0x5A) + u8(2))
    write("pcie_port", "power-controller",
          p_config(1, 3, 5, 0x20, 12) + p_msi_on() + p_hot(HOT_SLTCTL, 1, enables | 0x400)
          + plug + clear + p_hot(HOT_SLTCTL, 1, enables) + p_hot(HOT_LNKCTL, 1, 0x10)
          + p_hot(HOT_LNKCTL, 1, 0) + unplug)
    write("pcie_port", "masked-msi",
          p_config(0, 0, 0, 0x40, 1) + p_msi_on() + p_hot(HOT_MSI_MASK, 2, 1)
          + p_hot(HOT_SLTCTL, 1, enables) + plug + p_hot(HOT_MSI_MASK, 2, 0) + clear + unplug)
    errors = b"".join(u8(6) + u8(k) + u16(0x0200 + k) for k in (0, 0, 1, 2, 2))
    write("pcie_port", "root-errors",
          p_config(0, 1, 2, 0, 3) + p_msi_on() + p_hot(HOT_ROOT_CMD, 2, 0x7) + errors
          + p_hot(HOT_ROOT_STATUS, 2, 0x7F) + p_hot(HOT_DEVCTL, 1, 0x7)
          + u8(7) + u8(12) + u32(0x4A000001) + u16(0x10) + abort
          + p_hot(HOT_SEC_STATUS, 1, 0x2000))
    write("pcie_port", "switch-forwarding",
          p_config(1, 2, 3, 0x80, 0) + errors + p_hot(HOT_BRIDGE_CONTROL, 1, 0x2) + errors
          + u8(7) + u8(7) + u32(0) + u16(0x18))
    write("pcie_port", "upstream-port",
          p_config(2, 3, 4, 0x80, 0) + plug + u8(1) + u16(0x4C) + u8(2) + u64(0)
          + u8(1) + u16(0xFFE) + u8(8) + u64(~0) + errors)


# ---- qemu_import / trace_reader ----

SNIPPET = """\
memory_region_ops_write cpu -1 mr 0x1 addr 0xfee00000 value 0x0 size 4 name 'apic-msi'
memory_region_ops_write cpu 0 mr 0x2 addr 0xcf8 value 0x80000000 size 4 name 'pci-conf-idx'
pci_cfg_read mch 00:00.0 @0x0 -> 0x8086
memory_region_ops_read cpu 0 mr 0x3 addr 0xcfc value 0x8086 size 2 name 'pci-conf-data'
memory_region_ops_write cpu 0 mr 0x2 addr 0xcf8 value 0x80000060 size 4 name 'pci-conf-idx'
memory_region_ops_write cpu 0 mr 0x3 addr 0xcfc value 0xb0000001 size 4 name 'pci-conf-data'
pci_cfg_write mch 00:00.0 @0x60 <- 0xb0000001
memory_region_ops_read cpu 1 mr 0x4 addr 0x608 value 0x1234 size 4 name 'acpi-tmr'
memory_region_ops_read cpu 1 mr 0x4 addr 0x608 value 0x1234 size 4 name 'acpi-tmr'
pci_cfg_read e1000 08:01.0 @0x14 -> 0xc001
memory_region_ops_read cpu 0 mr 0x5 addr 0xb0808014 value 0xc001 size 4 name 'pcie-mmcfg-mmio'
memory_region_ops_write cpu 0 mr 0x5 addr 0xb0808004 value 0x7 size 2 name 'pcie-mmcfg-mmio'
pci_cfg_write e1000 08:01.0 @0x4 <- 0x7
pci_update_mappings_add e1000 08:01.0 1,0xc000+0x40
pci_update_mappings_add e1000 08:01.0 0,0xfce40000+0x20000
memory_region_ops_read cpu 0 mr 0x6 addr 0xc008 value 0xffffffffffffffff size 1 name 'e1000-io'
12345@1700000000.123456:memory_region_ops_write cpu 0 mr 0x2 addr 0xcf8 value 0x0 size 4 name 'pci-conf-idx'

memory_region_ops_read cpu 0 mr 0x3 addr 0xcfc value 0xffffffff size 4 name 'pci-conf-data'
pci_update_mappings_del e1000 08:01.0 1,0xc000+0x40
"""


def qemu_log_lines():
    log = os.path.join(ROOT, "traces", "q35", "seabios.log.zst")
    out = subprocess.run(["zstd", "-dc", "--long=31", log], capture_output=True, check=False).stdout
    return out.splitlines(keepends=True)


def qemu_import(lines):
    write("qemu_import", "snippet", SNIPPET.encode())
    # Real SeaBIOS lines (QEMU 7.2, Q35): the start, CF8 probing, PCIEXBAR and ECAM, BARs.
    for name, start, n in [("seabios-start", 0, 60), ("seabios-cf8", 148, 60),
                           ("seabios-pciexbar", 5350, 70), ("seabios-bars", 10480, 60),
                           ("seabios-unmap", 13640, 40)]:
        write("qemu_import", name, b"".join(lines[start:start + n]))


def trace_reader(lines):
    tool = None
    for p in ("target/release/ioreq-mux", "target/debug/ioreq-mux"):
        if os.access(os.path.join(ROOT, p), os.X_OK):
            tool = os.path.join(ROOT, p)
            break
    if tool is None:
        print("no ioreq-mux binary: trace_reader seeds skipped", file=sys.stderr)
        return
    tmp = os.path.join(ROOT, "target", "fuzz-seeds")
    os.makedirs(tmp, exist_ok=True)
    for name, text in [("snippet", SNIPPET.encode()), ("seabios", b"".join(lines[5350:5420] + lines[10480:10520]))]:
        log = os.path.join(tmp, name + ".log")
        trace = os.path.join(tmp, name + ".trace.zst")
        with open(log, "wb") as f:
            f.write(text)
        subprocess.run([tool, "import-qemu-trace", log, "-o", trace], check=True, capture_output=True)
        data = open(trace, "rb").read()
        write("trace_reader", name + "-file", b"\x00" + data)
        # The record stream alone (zstd skips the header's skippable frame).
        stream = subprocess.run(["zstd", "-dc", trace], capture_output=True, check=True).stdout
        write("trace_reader", name + "-stream", b"\x01" + stream)
    # Writer/reader round trip: two names, an access twice (folded), a config access, a BAR.
    rt = b"\x02" + u8(4) + b"seed"
    rt += u8(0) + u8(3) + b"rtc" + u8(0) + u8(6) + b"e1000e"
    acc = u8(1) + u8(0x04) + u64(0x70) + u8(0) + u8(0) + u64(0x8F) + u8(0)
    rt += acc + acc
    rt += u8(1) + u8(0x36) + u64(0xB0010004) + u8(0) + u8(1) + u64(0x103) + u8(1) + u8(1) + u8(0x10) + u8(0) + u16(4) + u8(1)
    rt += u8(3) + u8(0) + u8(1) + u8(0) + u8(0) + u64(0xFE000000) + u64(0x1000)
    write("trace_reader", "round-trip", rt)


def main():
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    lines = qemu_log_lines()
    ioreq_abi()
    ecam_router()
    chipset_intercept()
    engine()
    wire()
    pcie_port()
    qemu_import(lines)
    trace_reader(lines)
    for t in sorted(os.listdir(OUT)):
        print(t, len(os.listdir(os.path.join(OUT, t))), "seeds")


if __name__ == "__main__":
    main()
