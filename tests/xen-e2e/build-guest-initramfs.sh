#!/bin/bash
# Busybox initramfs of the phase B and F Linux guest, with guest-io (guest-io.c). Output: $W/guest-initrd.gz
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
# guest-io: ATA PIO with rep insw, timed CF8/CFC reads (busybox has neither).
gcc -static -O2 -Wall -o "$R/bin/guest-io" "$HERE/guest-io.c"
chmod +x "$R/init"
(cd "$R" && find . | cpio -o -H newc --quiet) | gzip -9 > "$W/guest-initrd.gz"
