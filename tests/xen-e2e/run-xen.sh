#!/bin/bash
# Boots Xen 4.17 + the Linux dom0 (busybox initramfs $W/initrd.img) in QEMU TCG with emulated
# AMD SVM + NPT. The serial console (Xen, dom0's hvc0, guests' debug output) goes to stdout,
# each line prefixed with the seconds since QEMU started.
#   +npt: Debian's Xen has no shadow paging, so no HVM without emulated NPT.
#   -monitor: TCG's MWAIT faults Xen's idle loop.  -smap: a PV dom0 crashes early with it.
set -euo pipefail
: "${W:?W (work dir) must be set}"
KV=${KV:-6.1.0-56-amd64}
CPU=${CPU:-EPYC,+svm,+npt,-monitor,-smap}
SMP=${SMP:-1}
XENARGS=${XENARGS:-"console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M dom0_max_vcpus=1 loglvl=all guest_loglvl=all noreboot iommu=0"}
DOM0ARGS=${DOM0ARGS:-"console=hvc0 earlyprintk=xen"}
cd "$W"
nice -n 10 qemu-system-x86_64 -accel tcg,thread=multi -M pc -cpu "$CPU" -smp "$SMP" -m 3G \
  -kernel "$W/xen.elf" -append "$XENARGS" \
  -initrd "$W/x/boot/vmlinuz-$KV $DOM0ARGS,$W/initrd.img" \
  -display none -serial stdio -monitor none -no-reboot -nic none </dev/null \
  | perl -MTime::HiRes=time -ne 'BEGIN{$|=1;$t0=time} printf "%7.2f %s", time-$t0, $_'
