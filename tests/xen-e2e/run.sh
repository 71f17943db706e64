#!/bin/bash
# End-to-end test of `ioreq-mux serve` on real Xen 4.17: boots Debian's Xen + a busybox
# Linux dom0 in QEMU (TCG, emulated AMD SVM + NPT), and in dom0 runs HVM guests with Xen's
# QEMU as device model and `ioreq-mux serve` beside it serving PCI 00:05.0 and ports
# 0x7700-0x770f (configs/xen-e2e.toml). See docs/xen.md ("What the end-to-end test proves").
#
#   sudo tests/xen-e2e/run.sh          # exit 0 and a last line PASS on success
#
# Needs root and apt (Debian 12): installs qemu-system-x86, busybox-static, cpio (and, to
# build ioreq-mux with Xen support, libxen-dev and libclang-dev) if missing, and
# `apt-get download`s Debian's Xen 4.17, Xen's QEMU and the 6.1 kernel (cached in $W/debs).
# A missing prerequisite fails loudly; nothing is skipped.
#
# Environment:
#   W          work directory (default /tmp/ioreq-mux-xen-e2e): downloads, initramfs, logs
#   IOREQ_MUX  use this ioreq-mux binary instead of building it (cargo build --release)
#   IOREQ_MUX_PRELOAD_SO  and this preload library (with IOREQ_MUX; else built beside it)
#   CARGO      cargo to build with (default: cargo on PATH, else ~/.cargo/bin/cargo)
#   TIMEOUT    seconds the whole QEMU run may take (default 1500; a normal run takes 200-300,
#              a loaded host three times that)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
export W=${W:-/tmp/ioreq-mux-xen-e2e}
export KV=6.1.0-56-amd64
TIMEOUT=${TIMEOUT:-1500}
T0=$(date +%s)

fail() {
  echo "xen-e2e: $*" >&2
  echo "FAIL"
  exit 1
}
step() { echo "== $* ($(( $(date +%s) - T0 ))s)"; }

# ---- prerequisites -----------------------------------------------------------------------
[ "$(id -u)" = 0 ] || fail "must run as root (apt-get, mknod for the guest's /dev/console)"
command -v apt-get >/dev/null || fail "needs apt-get (a Debian 12 host): the Xen binaries are Debian's"
static_busybox() { [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; }
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
static_busybox || missing+=(busybox-static)
command -v cpio >/dev/null || missing+=(cpio)
command -v perl >/dev/null || missing+=(perl)
command -v gcc >/dev/null || missing+=(gcc)
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || missing+=(libc6-dev)
if [ -z "${IOREQ_MUX:-}" ]; then
  [ -f /usr/include/xendevicemodel.h ] || missing+=(libxen-dev)
  ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1 \
    || missing+=(libclang-dev)
fi
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]}"
  apt-get update -qq || fail "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || fail "apt-get install ${missing[*]} failed"
fi
command -v qemu-system-x86_64 >/dev/null || fail "qemu-system-x86_64 still missing"
static_busybox || fail "/bin/busybox is not the static busybox (install busybox-static)"
[ -f /usr/share/seabios/bios-256k.bin ] || fail "/usr/share/seabios/bios-256k.bin missing (package seabios)"
[ -f /usr/share/qemu/linuxboot_dma.bin ] || fail "/usr/share/qemu/linuxboot_dma.bin missing (package qemu-system-data)"

# ---- Debian's Xen 4.17, Xen's QEMU and kernel 6.1 (downloaded once, unpacked, not installed)
DEBS="xen-hypervisor-4.17-amd64 xen-utils-4.17 xen-utils-common libxenmisc4.17 libxenstore4
  libxentoolcore1 libxentoollog1 libxencall1 libxenevtchn1 libxenforeignmemory1 libxendevicemodel1
  libxengnttab1 libxenhypfs1 linux-image-$KV libyajl2 qemu-system-xen"
mkdir -p "$W/debs"
if [ ! -f "$W/debs/.done" ]; then
  step "downloading the Xen debs into $W/debs"
  (cd "$W/debs" && apt-get download -qq $DEBS 2>&1 | grep -v "couldn't be accessed by user '_apt'" || true)
  for p in $DEBS; do
    ls "$W/debs/${p}_"*.deb >/dev/null 2>&1 || fail "apt-get download $p failed (is Debian's archive reachable?)"
  done
  touch "$W/debs/.done"
fi
if [ ! -f "$W/x/.done" ]; then
  step "unpacking the debs into $W/x"
  rm -rf "$W/x"
  mkdir -p "$W/x"
  for d in "$W"/debs/*.deb; do dpkg-deb -x "$d" "$W/x"; done
  touch "$W/x/.done"
fi
[ -f "$W/x/boot/xen-4.17-amd64.gz" ] && [ -f "$W/x/boot/vmlinuz-$KV" ] || fail "Xen or the kernel is missing in $W/x"
zcat "$W/x/boot/xen-4.17-amd64.gz" > "$W/xen.elf" # multiboot ELF that QEMU -kernel loads

# ---- ioreq-mux -------------------------------------------------------------------------
if [ -z "${IOREQ_MUX:-}" ]; then
  CARGO=${CARGO:-$(command -v cargo || echo "$HOME/.cargo/bin/cargo")}
  [ -x "$CARGO" ] || fail "cargo not found (set CARGO=/path/to/cargo, or IOREQ_MUX=/path/to/ioreq-mux)"
  step "building ioreq-mux and the preload library (release, with Xen support)"
  (cd "$ROOT" && "$CARGO" build --release -p ioreq-mux -p ioreq-mux-preload) \
    || fail "cargo build --release -p ioreq-mux -p ioreq-mux-preload failed"
  TARGET=$(cd "$ROOT" && "$CARGO" metadata --format-version 1 --no-deps \
    | perl -ne 'print $1 if /"target_directory":"([^"]+)"/')
  IOREQ_MUX=$TARGET/release/ioreq-mux
  IOREQ_MUX_PRELOAD_SO=${IOREQ_MUX_PRELOAD_SO:-$TARGET/release/libioreq_mux_preload.so}
fi
IOREQ_MUX_PRELOAD_SO=${IOREQ_MUX_PRELOAD_SO:-$(dirname "$IOREQ_MUX")/libioreq_mux_preload.so}
export IOREQ_MUX MUX_CONFIG=$ROOT/configs/xen-e2e.toml MUX_PRELOAD=$IOREQ_MUX_PRELOAD_SO
[ -x "$IOREQ_MUX" ] || fail "no ioreq-mux binary at $IOREQ_MUX"
[ -f "$MUX_PRELOAD" ] || fail "no preload library at $MUX_PRELOAD"
"$IOREQ_MUX" serve --help >/dev/null 2>&1 || fail "$IOREQ_MUX has no working 'serve' subcommand"

# On this (non-Xen) host `serve` must fail with exit code 3 and one line.
HOST_CHECK=skipped
if [ ! -e /dev/xen/privcmd ]; then
  set +e
  out=$("$IOREQ_MUX" serve --domid 1 --config "$MUX_CONFIG" 2>&1)
  rc=$?
  set -e
  if [ $rc = 3 ] && [ "$(printf '%s\n' "$out" | wc -l)" = 1 ] && [[ "$out" == *"not a Xen host"* ]]; then
    HOST_CHECK=ok
  else
    HOST_CHECK="FAIL (exit code $rc, output: $out)"
  fi
fi

# The ACPI tables of phase F's ECAM window, made by the binary under test on this host.
"$IOREQ_MUX" acpi-tables --config "$ROOT/configs/xen-e2e-front.toml" -o "$W/ecam.aml" \
  || fail "ioreq-mux acpi-tables failed"
export ECAM_TABLES=$W/ecam.aml

# ---- initramfs: guest, then dom0 --------------------------------------------------------
step "building the guest and dom0 initramfs"
bash "$HERE/build-guest-initramfs.sh"
bash "$HERE/build-dom0-initramfs.sh"
T1=$(date +%s)

# ---- boot -------------------------------------------------------------------------------
step "booting Xen in QEMU (log: $W/run.log)"
set +e
timeout "$TIMEOUT" bash "$HERE/run-xen.sh" | tee "$W/run.log" \
  | grep --line-buffered -E 'E2E:|GUESTF?: (init|done|pci .*00:05\.0|ready|after|disk|hop|endpoint)|Kernel panic|MUX[ABCDEF]: .*( ERROR | WARN |ready: serving|shutting down|chipset|device model .* (attached|removed))|ioreq-mux-preload: .*(connected|created|ERROR|exit)|\(d[0-9]+\) .*pci dev 05:0'
set -e
T2=$(date +%s)
grep -q 'E2E: dom0 test script done' "$W/run.log" || echo "xen-e2e: the dom0 test script did not finish (timeout $TIMEOUT s?)"

# diagnose: what a failed run's log says about why, in a few lines (CI shows the tail of the
# output): whether dom0's script finished, its FAIL markers, each phase's milestones with
# their times, and how much of each mux log reached the console.
diagnose() {
  echo "---- diagnosis (whole log: $W/run.log) ----"
  grep -q 'E2E: dom0 test script done' "$W/run.log" || echo "  dom0's test script did not finish (QEMU ran $(( ${T2:-0} - ${T1:-0} )) s, timeout $TIMEOUT s)"
  grep -E 'E2E: (FAIL|phase [A-F]: (domid|unpause|firmware|guest|QEMU|ioreq-mux (exit|still|stopped)))' "$W/run.log" \
    | sed -E 's/^ *([0-9.]+) E2E: /  \1 s: /; s/ \[dom0 uptime [0-9.]+s\]//' | tail -24
  for m in MUXA MUXB MUXE MUXF QEMUF DMF; do printf '  %s: %s lines' "$m" "$(grep -c -E "^ *[0-9.]+ $m: " "$W/run.log")"; done
  echo
  grep -E 'GUESTF: ' "$W/run.log" | grep -v -E 'GUESTF: [0-9a-f:.]+ cfg ' | tail -4 | sed -E 's/^ *([0-9.]+) .*GUESTF: /  \1 s: guest F: /'
}

# ---- report -----------------------------------------------------------------------------
echo
echo "---- what the guests printed ----"
echo "phase A (hvmloader/SeaBIOS, Xen console):"
grep -E '\(d[0-9]+\) .*(pci dev|Found [0-9]+ PCI|PCI: |No bootable device|Booting from)' "$W/run.log" \
  | grep -v GUEST | sed -E 's/^ *[0-9.]+ /  /' || true
echo "phase B (Linux guest /init, via earlyprintk=xen):"
grep -E 'GUEST: ' "$W/run.log" | sed -E 's/.*GUEST: /  /' || true
echo
echo "---- timings (seconds since QEMU started) ----"
ts() { grep -m1 -E "$1" "$W/run.log" | awk '{print $1}'; }
printf '  %-34s %s\n' \
  "dom0 userspace ready" "$(ts 'E2E: dom0 userspace ready')" \
  "A: guest unpaused" "$(ts 'E2E: phase A: unpause')" \
  "A: firmware finished" "$(ts 'E2E: phase A: firmware finished')" \
  "C: --claim all done" "$(ts 'E2E: phase C: ioreq-mux exit code')" \
  "B: guest unpaused" "$(ts 'E2E: phase B: unpause')" \
  "B: guest /init started" "$(ts 'GUEST: init at')" \
  "B: guest /init done" "$(ts 'GUEST: done at')" \
  "B: domain gone, mux stopped" "$(ts 'E2E: phase B: ioreq-mux exit code')" \
  "QEMU exited" "$(tail -1 "$W/run.log" | awk '{print $1}')"
echo "  setup $((T1 - T0)) s, QEMU run $((T2 - T1)) s, total $((T2 - T0)) s"
echo
echo "---- checks ----"
echo "host (no Xen): serve exits 3 with a one-line error: $HOST_CHECK"
set +e
bash "$HERE/check.sh" "$W/run.log"
rc=$?
set -e
if [ $rc = 0 ] && { [ "$HOST_CHECK" = ok ] || [ "$HOST_CHECK" = skipped ]; }; then
  echo "PASS"
  exit 0
fi
diagnose
echo "FAIL"
exit 1
