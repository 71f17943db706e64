#!/usr/bin/env bash
# Installs what building and testing ioreq-mux needs on Debian 12, if it is missing:
# libclang (bindgen), the Xen headers and libraries (xen-ffi), zstd, acpica-tools (iasl, the
# independent decoder the ACPI table tests use), and for the Xen
# end-to-end test QEMU, busybox and cpio. Needs root (or sudo). Rust itself must already be
# there (rustup; the workspace needs Rust >= 1.85).
set -euo pipefail
need=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for p in libclang-dev libxen-dev clang pkg-config zstd acpica-tools ${IOREQ_MUX_E2E_DEPS:-}; do
  have_pkg "$p" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "deps: installing ${need[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  echo "deps: cargo not found: install Rust >= 1.85 with rustup (https://rustup.rs) first" >&2
  exit 1
fi
