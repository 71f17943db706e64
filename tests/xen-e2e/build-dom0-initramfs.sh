#!/bin/bash
# Busybox initramfs for the Xen dom0: Xen's tools and QEMU from the unpacked Debian debs
# ($W/x), ioreq-mux ($IOREQ_MUX) with its configuration, the phase B guest's kernel and
# initramfs, and the test script. Shared libraries are the ones ldd finds, resolved against
# the unpacked debs first. Output: $W/initrd.img
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
: "${W:?W (work dir) must be set}"
: "${IOREQ_MUX:?IOREQ_MUX (the ioreq-mux binary) must be set}"
: "${MUX_CONFIG:?MUX_CONFIG (configs/xen-e2e.toml) must be set}"
: "${MUX_PRELOAD:?MUX_PRELOAD (libioreq_mux_preload.so) must be set}"
: "${ECAM_TABLES:?ECAM_TABLES (ioreq-mux acpi-tables output) must be set}"
ROOT=$(cd "$HERE/../.." && pwd)
KV=${KV:-6.1.0-56-amd64}
X=$W/x
R=$W/rootfs
rm -rf "$R"
mkdir -p "$R"/{bin,sbin,etc,proc,sys,dev,run,tmp,root,var/lib/xen,var/log/xen,lib/modules,usr/lib/xen-4.17,usr/libexec,usr/share,usr/local/bin}
ln -s ../run "$R/var/run"

cp /bin/busybox "$R/bin/busybox"
for a in $("$R/bin/busybox" --list); do [ -e "$R/bin/$a" ] || ln -s busybox "$R/bin/$a"; done

# Xen drivers (no depmod: /init insmods them in order).
for m in xen-evtchn.ko xenfs/xenfs.ko xen-privcmd.ko xen-gntdev.ko xen-gntalloc.ko; do
  cp "$X/lib/modules/$KV/kernel/drivers/xen/$m" "$R/lib/modules/"
done

# Xen tools, hvmloader, Xen's QEMU and what it loads.
cp -a "$X/usr/lib/xen-4.17/bin" "$R/usr/lib/xen-4.17/"
cp -a "$X/usr/lib/xen-4.17/boot" "$R/usr/lib/xen-4.17/"
cp -a "$X/usr/libexec/xen-qemu-system-i386" "$R/usr/libexec/"
mkdir -p "$R/usr/share/seabios" "$R/usr/share/qemu"
cp /usr/share/seabios/bios-256k.bin "$R/usr/share/seabios/"
cp /usr/share/qemu/linuxboot_dma.bin /usr/share/qemu/linuxboot.bin "$R/usr/share/qemu/"
cp -a /usr/share/qemu/keymaps "$R/usr/share/qemu/" 2>/dev/null || true
cp -a "$X/etc/xen" "$R/etc/" 2>/dev/null || true

# ioreq-mux, its configuration, the test.
cp "$IOREQ_MUX" "$R/usr/local/bin/ioreq-mux"
strip "$R/usr/local/bin/ioreq-mux" 2>/dev/null || true
mkdir -p "$R/etc/ioreq-mux" "$R/e2e/guest"
cp "$MUX_CONFIG" "$R/etc/ioreq-mux/xen-e2e.toml"
# QEMU behind the mux (phases E, F): the xl wrapper, the preload library, the wrapper's
# default configuration.
mkdir -p "$R/usr/lib/ioreq-mux"
cp "$ROOT/contrib/xen/ioreq-mux-qemu" "$MUX_PRELOAD" "$R/usr/lib/ioreq-mux/"
strip --strip-debug "$R/usr/lib/ioreq-mux/$(basename "$MUX_PRELOAD")" 2>/dev/null || true
cp "$ROOT/configs/xen-e2e-front.toml" "$R/etc/ioreq-mux/qemu.toml"
cp "$ECAM_TABLES" "$R/e2e/ecam.aml"
cp "$HERE/dom0-test.sh" "$HERE/seabios.cfg" "$HERE/linux.cfg" "$HERE/seabios-front.cfg" \
  "$HERE/linux-front.cfg" "$R/e2e/"
chmod +x "$R/e2e/dom0-test.sh"
cp "$X/boot/vmlinuz-$KV" "$R/e2e/guest/vmlinuz"
cp "$W/guest-initrd.gz" "$R/e2e/guest/initrd.gz"

# Shared libraries. ioreq-mux loads libxendevicemodel, libxenforeignmemory and libxenevtchn
# with dlopen, so ldd does not see them: list them (and what they need) explicitly.
XL=$R/usr/lib/xen-4.17/bin
LIBX=$X/usr/lib/x86_64-linux-gnu
BINS="$XL/xl $XL/xenstored $XL/xenconsoled $XL/libxl-save-helper $XL/xen-init-dom0 $XL/xenstore-control
  $R/usr/libexec/xen-qemu-system-i386 $R/usr/local/bin/ioreq-mux $R/usr/lib/ioreq-mux/libioreq_mux_preload.so
  $LIBX/libxendevicemodel.so.1 $LIBX/libxenforeignmemory.so.1 $LIBX/libxenevtchn.so.1"
export LD_LIBRARY_PATH=$LIBX
mkdir -p "$R/lib/x86_64-linux-gnu" "$R/lib64"
for b in $BINS; do
  [ -e "$b" ] || { echo "build-dom0-initramfs: missing $b" >&2; exit 1; }
  echo "$b"
  ldd "$b" | awk '/=>/ {print $3} /ld-linux/ {print $1}' | grep '^/' || true
done | grep '\.so' | sort -u | while read -r lib; do
  cp -L "$lib" "$R/lib/x86_64-linux-gnu/"
done
cp -L /lib64/ld-linux-x86-64.so.2 "$R/lib64/"
ln -s lib "$R/usr/lib64" 2>/dev/null || true
ln -s ../../lib/x86_64-linux-gnu "$R/usr/lib/x86_64-linux-gnu"

cp "$HERE/dom0-init" "$R/init"
chmod +x "$R/init"
echo "root:x:0:0:root:/root:/bin/sh" > "$R/etc/passwd"
echo "root:x:0:" > "$R/etc/group"
(cd "$R" && find . | cpio -o -H newc --quiet) | gzip -1 > "$W/initrd.img"
