#!/bin/bash
# Busybox initramfs of the phase B Linux guest. Output: $W/guest-initrd.gz
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
: "${W:?W (work dir) must be set}"
R=$W/guest-rootfs
rm -rf "$R"
mkdir -p "$R"/{bin,proc,sys,dev}
cp /bin/busybox "$R/bin/busybox"
for a in $("$R/bin/busybox" --list); do [ -e "$R/bin/$a" ] || ln -s busybox "$R/bin/$a"; done
mknod "$R/dev/console" c 5 1
cp "$HERE/guest-init" "$R/init"
chmod +x "$R/init"
(cd "$R" && find . | cpio -o -H newc --quiet) | gzip -9 > "$W/guest-initrd.gz"
