#!/bin/bash
# Judges one run of the Xen end-to-end test from its console log (run.sh writes
# $W/run.log; this can be re-run on a saved log). One line per check; exit 0 iff all pass.
#
#   usage: check.sh RUN_LOG
#
# What must hold (the model is configs/xen-e2e.toml: 00:05.0 1af4:1337 rev 1 class ff0000,
# subsystem 1af4:0001, one 4 KiB mem32 BAR, registers 0xcafe0000 | (addr & 0xffff) until
# written; ports 0x7700-0x770f likewise):
#   A  the mux claimed exactly its own function and ports from Xen and left 0xcf8-0xcff and
#      the rest of segment 0 to QEMU; hvmloader (guest side) sized and placed 00:05.0's BAR
#      at 4 KiB and routed its INTA; the mux served the IDs, class, BAR sizing and the BAR
#      programming, then claimed the BAR's MMIO; SIGTERM gave a clean stop (exit 0).
#   C  --claim all claimed the whole of segment 0 and 0xcf8-0xcff, stopped on --duration.
#   D  an absent domain is exit code 4 with a one-line error.
#   B  the Linux guest saw 00:05.0 with those IDs, its whole config space as the mux served
#      it, BAR reads/writes (from both vCPUs) and port reads/writes with the model's values;
#      the mux stopped by itself when the guest went away (exit 0).
set -uo pipefail
LOG=${1:?usage: check.sh RUN_LOG}
[ -r "$LOG" ] || { echo "check.sh: cannot read $LOG"; exit 1; }
passed=0
failed=0
ok() { echo "  ok   $*"; passed=$((passed + 1)); }
bad() { echo "  FAIL $*"; failed=$((failed + 1)); }
check() { local what=$1; shift; if "$@"; then ok "$what"; else bad "$what"; fi; }

B=$(mktemp)
trap 'rm -f "$B"' EXIT
# Drop run-xen.sh's timestamps and the console's carriage returns.
sed -E 's/^ *[0-9]+\.[0-9]+ //' "$LOG" | tr -d '\r' > "$B"
has() { grep -q -E -- "$1" "$B"; }
mux() { grep -E "^$1: " "$B" | sed -E "s/^$1: //"; }
# (No `grep -q` after a pipe: with pipefail, the writer's SIGPIPE would fail the pipeline.)
mux_has() { mux "$1" | grep -E -- "$2" >/dev/null; }
guest() { grep -E 'GUEST: ' "$B" | sed -E 's/.*GUEST: //'; }
marker() { grep -E "^E2E: $1" "$B" | head -1; }
exit_code() { marker "$1: ioreq-mux exit code" | sed -E 's/.*exit code ([0-9]+).*/\1/'; }
hex() { printf '0x%x' "$1"; }
quiet_log() { test "$(mux "$1" | grep -c -E ' (ERROR|WARN) ')" = 0; }

echo "phase A (SeaBIOS guest):"
DOMA=$(marker 'phase A: domid' | sed -E 's/.*domid ([0-9]+).*/\1/')
if [ -z "$DOMA" ]; then bad "phase A ran (no 'phase A: domid' marker)"; DOMA=x; fi
READY_A=$(mux MUXA | grep 'ready: serving' | head -1)
check "mux claimed ports 0x7700-0x770f and pci 0000:00:05.0 from Xen, nothing else" \
  grep -q -E 'claimed_from_xen=\["ports 0x7700-0x770f", "pci 0000:00:05\.0"\]' <<< "$READY_A"
left_to_qemu() { ! grep -q -E 'claimed_from_xen=\[[^]]*(ports 0xcf8|0000:00:00\.0-0000:ff:1f\.7)' <<< "$1"; }
check "mux left 0xcf8-0xcff and the rest of segment 0 to QEMU" left_to_qemu "$READY_A"
BARLINE=$(grep -E "\(d$DOMA\) .*pci dev 05:0 bar 10 size" "$B" | head -1)
check "guest (hvmloader): 00:05.0 BAR0 sized 4 KiB and placed: ${BARLINE#*) }" \
  grep -q -E 'pci dev 05:0 bar 10 size 0*1000: 0*[0-9a-f]+' <<< "$BARLINE"
BAR_A=$(sed -E 's/.*size 0*1000: 0*([0-9a-f]+).*/\1/' <<< "$BARLINE")
BAR_A=$(( 16#${BAR_A:-0} & ~0xf ))
check "guest (hvmloader): 00:05.0 INTA routed" has "\(d$DOMA\) .*pci dev 05:0 INTA->IRQ"
# SeaBIOS counts the functions it finds; the Linux guest of phase B lists the same machine's
# functions (QEMU's and ours): the counts must agree, and 00:05.0 must be among them.
NFOUND=$(grep -E "\(d$DOMA\) Found [0-9]+ PCI devices" "$B" | head -1 | sed -E 's/.*Found ([0-9]+) PCI.*/\1/')
NLINUX=$(grep -o -E 'GUEST: pci /sys/bus/pci/devices/[0-9a-f:.]+' "$B" | sort -u | wc -l)
check "guest (SeaBIOS) found ${NFOUND:-?} PCI functions, as many as Linux lists in phase B (with 00:05.0)" \
  test "${NFOUND:-x}" = "$NLINUX"
cfg_served() { # REG SIZE DIR DATA-REGEX
  mux_has MUXA "served config .*sbdf=0000:00:05\.0 reg=$1 size=$2 dir=$3 data=$4( |$)"
}
ids_served() { { cfg_served 0x0 2 read 0x1af4 && cfg_served 0x2 2 read 0x1337; } || cfg_served 0x0 4 read 0x13371af4; }
class_served() { cfg_served 0xa 2 read 0xff00 || cfg_served 0x8 4 read 0xff000001; }
sizing_served() { cfg_served 0x10 4 write 0xffffffff && cfg_served 0x10 4 read 0xfffff000; }
check "mux served vendor 0x1af4 / device 0x1337 of 00:05.0" ids_served
check "mux served class ff0000" class_served
check "mux served BAR0 sizing (write 0xffffffff, read 0xfffff000)" sizing_served
check "mux saw BAR0 programmed to $(hex $BAR_A)" cfg_served 0x10 4 write "$(hex $BAR_A)"
check "mux claimed the BAR's MMIO $(hex $BAR_A)-$(hex $((BAR_A + 0xfff))) from Xen" \
  mux_has MUXA "claimed from Xen range=mmio $(hex $BAR_A)-$(hex $((BAR_A + 0xfff)))"
check "mux stopped on SIGTERM" mux_has MUXA 'shutting down reason=SIGTERM received'
check "mux reported requests served by e2e-dev" mux_has MUXA 'served by model model=e2e-dev requests=[1-9]'
check "mux destroyed its ioreq server" mux_has MUXA 'ioreq server destroyed'
check "mux exit code 0" test "$(exit_code 'phase A')" = 0
check "no ERROR/WARN in the mux log" quiet_log MUXA

echo "phase C (--claim all):"
READY_C=$(mux MUXC | grep 'ready: serving' | head -1)
check "claimed 0xcf8-0xcff, 0x7700-0x770f and all of segment 0 from Xen" \
  grep -q -E 'claimed_from_xen=\["ports 0xcf8-0xcff", "ports 0x7700-0x770f", "pci 0000:00:00\.0-0000:ff:1f\.7"\]' <<< "$READY_C"
stopped_c() { mux_has MUXC 'reason=--duration reached' && mux_has MUXC 'ioreq server destroyed' && test "$(exit_code 'phase C')" = 0; }
check "stopped on --duration, exit code 0, server destroyed" stopped_c
CLAIM=$(mux MUXC | grep -o -E 'range=pci 0000:00:00\.0-0000:ff:1f\.7 functions=65536 runs=1 range_dmop=[a-z]+ took=[^ ]+' | head -1)
CLAIM_TIME=${CLAIM##*took=}
check "segment 0 claimed with one range DMOP (took ${CLAIM_TIME:-?})" grep -q 'range_dmop=true' <<< "$CLAIM"

echo "phase D (absent domain):"
check "exit code 4" test "$(exit_code 'phase D')" = 4
one_line_d() { test "$(mux MUXD | wc -l)" = 1 && mux_has MUXD 'ERROR .*domain 999 does not exist'; }
check "one-line error naming the domain: $(mux MUXD | sed -E 's/^.*(ERROR)/\1/')" one_line_d

echo "phase B (Linux guest):"
DOMB=$(marker 'phase B: domid' | sed -E 's/.*domid ([0-9]+).*/\1/')
[ -n "$DOMB" ] || bad "phase B ran (no 'phase B: domid' marker)"
G=$(guest)
check "guest lists 0000:00:05.0 as 0x1af4 0x1337 0xff0000" \
  grep -q -E '^pci /sys/bus/pci/devices/0000:00:05\.0 0x1af4 0x1337 0xff0000$' <<< "$G"
check "guest sysfs IDs: vendor device class revision subsystem" \
  grep -q -E '^ids 0x1af4 0x1337 0xff0000 0x01 0x1af4 0x0001$' <<< "$G"
# The config space as the guest printed it: 256 bytes.
mapfile -t CFG < <(grep -E '^cfg [0-9a-f]{3}:' <<< "$G" | sed -E 's/^cfg [0-9a-f]{3}://' | tr ' ' '\n' | grep -E '^[0-9a-f]{2}$')
byte() { echo $(( 16#${CFG[$1]:-100} )); }
dword() { echo $(( $(byte $1) | $(byte $(($1 + 1))) << 8 | $(byte $(($1 + 2))) << 16 | $(byte $(($1 + 3))) << 24 )); }
check "guest read 256 bytes of configuration space" test "${#CFG[@]}" = 256
if [ "${#CFG[@]}" = 256 ]; then
  RES=$(grep -E '^resource0 ' <<< "$G" | awk '{print $2}')
  BAR_B=$(( ${RES:-0} ))
  check "config: IDs 1af4:1337, revision 1, class ff0000, header type 0" \
    test "$(hex $(dword 0))/$(hex $(dword 8))/$(byte 0xe)" = "0x13371af4/0xff000001/0"
  check "config: BAR0 = resource0 = $(hex $BAR_B), mem32 non-prefetchable" \
    test "$(dword 0x10)" = "$BAR_B" -a "$BAR_B" != 0
  check "config: subsystem 1af4:0001, interrupt pin A, no capabilities, status 0" \
    test "$(hex $(dword 0x2c))/$(byte 0x3d)/$(byte 0x34)/$(( $(dword 4) >> 16 ))" = "0x11af4/1/0/0"
  check "config: memory decoding enabled" test $(( $(byte 4) & 2 )) = 2
  zero=1
  for o in $(seq $((0x14)) 4 $((0x28))) $(seq $((0x30)) 4 $((0x30))) $(seq $((0x40)) 4 $((0xfc))); do
    [ "$(dword $o)" = 0 ] || { zero=0; echo "       dword $(hex $o) = $(hex $(dword $o))"; }
  done
  check "config: BAR1-5, ROM BAR and 0x40-0xff read as zero" test $zero = 1
  # The guest printed exactly what the mux served: the last 4-byte read of each dword.
  same=0 diff=0
  declare -A SERVED=()
  while read -r reg val; do SERVED[$reg]=$val; done < <(mux MUXB |
    sed -n -E 's/.*served config .*sbdf=0000:00:05\.0 reg=(0x[0-9a-f]+) size=4 dir=read data=(0x[0-9a-f]+).*/\1 \2/p')
  for o in $(seq 0 4 252); do
    s=${SERVED[$(hex $o)]:-}
    if [ -n "$s" ] && [ "$(( s ))" = "$(dword $o)" ]; then same=$((same + 1)); else
      diff=$((diff + 1)); echo "       dword $(hex $o): guest $(hex $(dword $o)), mux served ${s:-nothing}"; fi
  done
  check "config: all 64 dwords the guest printed are what the mux served ($same match)" test $diff = 0
  mmio_expect() { echo $(( 0xcafe0000 | ($1 & 0xffff) )); }
  mmio_ok=1
  while read -r addr val; do
    [ "$(( val ))" = "$(mmio_expect $(( addr )))" ] || { mmio_ok=0; echo "       $addr -> $val"; }
  done < <(grep -E '^mmio read 0x[0-9a-f]+ 32 -> ' <<< "$G" | awk '{print $3, $6}')
  check "BAR reads return 0xcafe0000|(addr & 0xffff) (4 reads)" \
    test $mmio_ok = 1 -a "$(grep -c -E '^mmio read 0x[0-9a-f]+ 32 -> ' <<< "$G")" = 4
  W10=$(grep -E '^mmio read .* after writing 0x12345678 -> ' <<< "$G" | awk '{print $NF}')
  check "BAR write sticks (0x12345678 read back)" test "$(( ${W10:-0} ))" = $((0x12345678))
  Q=$(grep -E '^mmio read 0x[0-9a-f]+ 64 -> ' <<< "$G" | awk '{print $NF}')
  check "8-byte BAR read at +8 = $(printf '0x%X%08X' $(mmio_expect $((BAR_B + 12))) $(mmio_expect $((BAR_B + 8))))" \
    test "$(( ${Q:-0} ))" = "$(( $(mmio_expect $((BAR_B + 12))) << 32 | $(mmio_expect $((BAR_B + 8))) ))"
  C1=$(grep -E '^cpu1 mmio read ' <<< "$G" | awk '{print $NF}')
  check "vCPU 1: BAR read from CPU 1 correct, and served from vCPU 1's slot" \
    test "$(( ${C1:-0} ))" = "$(mmio_expect $((BAR_B + 0x20)))"
  mux_has MUXB "served vcpu=1 kind=mmio addr=$(hex $((BAR_B + 0x20))) size=4" \
    || bad "       (no 'served vcpu=1' line for $(hex $((BAR_B + 0x20))) in the mux log)"
fi
check "ports: 0x7700..0x7703 read 00 77 fe ca" grep -q -E '^port read 0x7700 4 -> 0077feca$' <<< "$G"
check "ports: bytes written at 0x7704 stick (11 22 fe ca)" \
  grep -q -E '^port read 0x7704 4 after writing 11 22 -> 1122feca$' <<< "$G"
check "TIMEOFFSET (the guest set the RTC) arrived through the buffered ring as one 8-byte write" \
  mux_has MUXB 'buffered write kind=timeoffset addr=0x0 size=8 data=0x[0-9a-f]+'
check "guest RTC write: $(grep -E '^rtc set to ' <<< "$G")" grep -q -E '^rtc set to .*2031' <<< "$G"
check "mux stopped by itself: domain $DOMB gone" mux_has MUXB "shutting down reason=domain $DOMB is gone"
check "mux reported requests served by e2e-dev" mux_has MUXB 'served by model model=e2e-dev requests=[1-9]'
check "mux exit code 0" test "$(exit_code 'phase B')" = 0
check "no ERROR/WARN in the mux log" quiet_log MUXB

# ---- QEMU behind the multiplexer ---------------------------------------------------------
qemu_log() { grep -E "^$1: " "$B" | sed -E "s/^$1: //"; }
qemu_has() { qemu_log "$1" | grep -E -- "$2" >/dev/null; }
# hvmloader's "pci dev DD:F" lines of one domain, sorted, as one line.
pci_devs() { grep -E "\(d$1\) .*pci dev [0-9a-f]{2}:[0-7] " "$B" | grep -o -E 'pci dev [0-9a-f]{2}:[0-7]' | sort -u | tr '\n' ' '; }
# served config triples (sbdf reg data) of a phase's mux log
served_cfg() { mux "$1" | sed -n -E 's/.*served config .*sbdf=([0-9a-f:.]+) reg=(0x[0-9a-f]+) size=4 dir=read data=(0x[0-9a-f]+).*/\1 \2 \3/p'; }

echo "phase E (SeaBIOS guest, QEMU behind the mux):"
DOME=$(marker 'phase E: domid' | sed -E 's/.*domid ([0-9]+).*/\1/')
if [ -z "$DOME" ]; then bad "phase E ran (no 'phase E: domid' marker)"; DOME=x; fi
check "QEMU's ioreq server went to the mux through the preload (QEMU's log)" \
  qemu_has QEMUE 'ioreq-mux-preload: .*create.* server id'
check "the mux is Xen's only ioreq server for the guest (server id 0), QEMU attached through the protocol" \
  eval 'mux_has MUXE "ready: serving.* server=0 " && mux_has MUXE "device model attached model=qemu"'
check "the mux detected QEMU's chipset through the protocol: i440FX" mux_has MUXE 'chipset detected chipset=i440'
N_QCLAIMS=$(mux MUXE | grep -c -E 'claimed model="?qemu"? claim=(ports|mmio)')
N_XEN=$(mux MUXE | grep -c -E 'claimed from Xen range=(ports|mmio)')
check "QEMU's port and MMIO claims reached Xen through the mux ($N_QCLAIMS by QEMU, $N_XEN ranges claimed from Xen)" \
  test "$N_QCLAIMS" -ge 5 -a "$N_XEN" -ge "$N_QCLAIMS"
check "QEMU's functions claimed through map_pcidev (00:00.0, 00:01.x)" \
  eval 'mux_has MUXE "claimed model=\"?qemu\"? claim=pci 0000:00:00\.0" && mux_has MUXE "claimed model=\"?qemu\"? claim=pci 0000:00:01\.3"'
pm_order() {
  local l c
  l=$(mux MUXE | grep -n -E 'layout change event=.*(pm|PM).*0xb000' | head -1 | cut -d: -f1)
  c=$(mux MUXE | grep -n -E 'already claimed for it by an intercept model="?qemu"? claim=ports 0xb0' | head -1 | cut -d: -f1)
  [ -n "$l" ] && [ -n "$c" ] && [ "$l" -lt "$c" ]
}
check "hvmloader's PIIX4 PM base reached the intercept before QEMU: block 0xb000 claimed, then QEMU's own maps found it" pm_order
check "the PM block claim reached Xen" mux_has MUXE 'claimed from Xen range=ports 0xb000-0xb03f'
DEVS_A=$(pci_devs "$DOMA")
DEVS_E=$(pci_devs "$DOME")
check "hvmloader enumerated the same functions as with QEMU alone plus the mux's 05:0 (${DEVS_E:-none})" \
  test -n "$DEVS_E" -a "$DEVS_E" = "$DEVS_A"
check "SeaBIOS ran to its boot attempt" has "\(d$DOME\) .*(No bootable device|Booting from|Boot failed)"
check "mux stopped by itself when the domain went away" mux_has MUXE "shutting down reason=domain $DOME is gone"
check "mux exit code 0" mux_has MUXE 'stopped exit_code=0'

echo "phase F (Linux guest, QEMU behind the mux, a process model behind QEMU's bridge):"
DOMF=$(marker 'phase F: domid' | sed -E 's/.*domid ([0-9]+).*/\1/')
[ -n "$DOMF" ] || bad "phase F ran (no 'phase F: domid' marker)"
GF=$(grep -E 'GUESTF: ' "$B" | sed -E 's/.*GUESTF: //')
# every function phase B's guest (QEMU alone) listed, with the same IDs and class
same_fns=1
while read -r path ven dev cls; do
  f=${path##*/}
  grep -q -E "^fn $f $ven $dev $cls " <<< "$GF" || { same_fns=0; echo "       $f ($ven $dev $cls) missing or different"; }
done < <(guest | sed -n -E 's/^pci (\/sys\/bus\/pci\/devices\/[0-9a-f:.]+) (0x[0-9a-f]+) (0x[0-9a-f]+) (0x[0-9a-f]+)$/\1 \2 \3 \4/p')
check "every function of phase B (QEMU's and 00:05.0) is there with the same IDs and class" test $same_fns = 1
check "QEMU's bridge 00:06.0 (1b36:0001, class 060400)" grep -q -E '^fn 0000:00:06\.0 0x1b36 0x0001 0x060400 ' <<< "$GF"
EP=$(grep -E '^fn 0000:[0-9a-f]{2}:01\.0 0x1af4 0x1338 0xff0000 0x02 ' <<< "$GF" | awk '{print $2}')
check "the process model's function behind the bridge: ${EP:-not found} (1af4:1338, rev 2)" \
  eval '[ -n "$EP" ] && [ "${EP:5:2}" != 00 ]'
EPBAR=$(grep -E '^endpoint mmio read 0x[0-9a-f]+ 32 -> ' <<< "$GF" | awk '{print $4, $NF}')
check "the process model's BAR (placed by Linux behind the bridge) answers: ${EPBAR:-no read}" \
  eval 'set -- $EPBAR; [ -n "${2:-}" ] && [ "$(( $2 ))" = "$(( 0xcafe0000 | ($1 & 0xffff) ))" ]'
check "mux: bridge-ep's position resolved when the guest numbered the bridge" \
  mux_has MUXF "device moved with bus numbering model=\"?bridge-ep\"? position=0000:00:06\.0/01\.0 .*to=Some\(\"$EP\"\)"
# The guest's dump of every function: each dword is a value the mux served for it.
declare -A SERVEDF=()
while read -r f reg val; do SERVEDF["$f $((reg))"]+=" $((val))"; done < <(served_cfg MUXF)
cfg_fn_ok() { # BDF: every dword the guest printed was served for that function
  local f=$1 line off bytes i v n=0 bad_n=0
  while read -r off bytes; do
    off=$((16#$off))
    set -- $bytes
    for i in 0 4 8 12; do
      eval "b0=\${$((i+1))} b1=\${$((i+2))} b2=\${$((i+3))} b3=\${$((i+4))}"
      v=$(( 16#$b0 | 16#$b1 << 8 | 16#$b2 << 16 | 16#$b3 << 24 ))
      n=$((n + 1))
      [[ " ${SERVEDF["$f $((off + i))"]:-} " == *" $v "* ]] || { bad_n=$((bad_n + 1)); [ $bad_n -le 3 ] && echo "       $f dword $(hex $((off + i))) = $(hex $v) never served"; }
    done
  done < <(grep -E "^$f cfg [0-9a-f]{3}:" <<< "$GF" | sed -E "s/^$f cfg ([0-9a-f]{3}):/\1/")
  [ $n -ge 64 ] && [ $bad_n = 0 ]
}
if [ ${#SERVEDF[@]} = 0 ]; then
  bad "config of every function: the mux log has no served config reads to compare with"
else
  for f in $(grep -E '^fn ' <<< "$GF" | awk '{print $2}'); do
    check "config of $f: the guest read what its model served" cfg_fn_ok "$f"
  done
fi
SHA_DOM0=$(marker 'phase F: disk image sha256' | sed -E 's/.*sha256 ([0-9a-f]+).*/\1/')
SHA_GUEST=$(grep -E '^disk sha256 ' <<< "$GF" | awk '{print $3}')
check "disk on QEMU's IDE read by the guest with rep insw: sha256 ${SHA_GUEST:0:16}... = dom0's image" \
  test -n "$SHA_DOM0" -a "$SHA_DOM0" = "$SHA_GUEST"
N_PTR=$(mux MUXF | sed -n -E 's/.*rep_ptr_requests=([0-9]+).*/\1/p' | head -1)
check "rep string I/O through a guest buffer (data_is_ptr) reached QEMU through the mux (${N_PTR:-0} requests)" \
  test "${N_PTR:-0}" -ge 128
check "no guest-buffer request was completed without data" eval '! mux_has MUXF "completed without data"'
# ECAM on Xen 4.17 through the mux's window (ACPI tables from `ioreq-mux acpi-tables`)
check "guest accepted the mux's ECAM window from the ACPI tables: $(grep -m1 -o -E '(MMCONFIG|ECAM) for domain 0000 \[bus 00-0f\] at \[mem 0xe0000000-0xe0ffffff\]' <<< "$GF")" \
  eval 'grep -q -E "(MMCONFIG|ECAM) for domain 0000 \[bus 00-0f\] at \[mem 0xe0000000-0xe0ffffff\]" <<< "$GF" && grep -q -E "reserved (as|in) ACPI motherboard resource" <<< "$GF" && ! grep -q -i "not reserved" <<< "$GF"'
PF=0000:00:05.0 # the PCI Express function (configs/xen-e2e-front.toml: e2e-dev, pcie = true)
check "the PCI Express function $PF has 4096 bytes of configuration space" grep -q -E '^dev05 config size 4096$' <<< "$GF"
ext_chain() { # DSN (0x0003) at 0x100 -> AER (0x0001, version 2) at 0x140 -> end
  local d100 d140
  d100=$(grep -E "^$PF cfg 100:" <<< "$GF" | awk '{print $7 $6 $5 $4}')
  d140=$(grep -E "^$PF cfg 140:" <<< "$GF" | awk '{print $7 $6 $5 $4}')
  echo "       0x100: ${d100:-?}  0x140: ${d140:-?}"
  [ "$(( 16#${d100:-0} & 0xffff ))" = 3 ] && [ "$(( 16#${d100:-0} >> 20 ))" = $((0x140)) ] \
    && [ "$(( 16#${d140:-0} & 0xffff ))" = 1 ] && [ "$(( 16#${d140:-0} >> 20 ))" = 0 ]
}
check "its extended capabilities, read through ECAM: Device Serial Number at 0x100, then AER at 0x140" ext_chain
check "an AER mask written through ECAM sticks (0x148 reads 00001000)" \
  grep -q -E '^dev05 aer uncorrectable mask after writing 0x1000: 00001000$' <<< "$GF"
check "the write reached the model through the mux's ECAM decode, and the read back came from it" \
  eval 'mux_has MUXF "served config via ECAM .*sbdf=$PF reg=0x148 size=4 dir=write data=0x1000" && mux_has MUXF "served config sbdf=$PF reg=0x148 size=4 dir=read data=0x1000"'
ecam_same=1
while read -r f ecam cf8 ext; do
  # 00:05.0 is the mux's PCI Express function: its 0x100 is its DSN capability
  [ "$(( ecam ))" = "$(( cf8 ))" ] && { [ "$f" = 00:05.0 ] || [ "$(( ext ))" = $((0xffffffff)) ]; } \
    || { ecam_same=0; echo "       $f: ECAM $ecam, CF8 $cf8, 0x100 $ext"; }
done < <(sed -n -E 's/^ecam ([0-9a-f:.]+) reg 0x0 (0x[0-9a-fA-F]+) cf8 (0x[0-9a-f]+) reg 0x100 (0x[0-9a-fA-F]+)$/\1 \2 \3 \4/p' <<< "$GF")
check "QEMU's functions read through ECAM as through CF8, their extended space all ones (never asked of QEMU)" \
  test $ecam_same = 1 -a "$(grep -c -E '^ecam 00:' <<< "$GF")" -ge 7
check "a function nobody owns reads all ones through ECAM" grep -q -E '^ecam 00:1f\.0 reg 0x0 0xFFFFFFFF$' <<< "$GF"
check "mux counted accesses past QEMU's 256 bytes" mux_has MUXF 'beyond_config_space=[1-9]'
HOP_B=$(guest | sed -n -E 's/^hop cfc-time ([0-9]+) reads ([0-9a-f]+) avg ([0-9]+) ns$/\2 \3/p')
HOP_F=$(sed -n -E 's/^hop cfc-time ([0-9]+) reads ([0-9a-f]+) avg ([0-9]+) ns$/\2 \3/p' <<< "$GF")
if [ -n "$HOP_B" ] && [ -n "$HOP_F" ]; then
  set -- $HOP_B $HOP_F
  echo "       hop: 00:00.0 config read (CF8/CFC) from the guest: QEMU alone $4 ns... " >/dev/null
  RATIO=$(awk -v a="$2" -v b="$4" 'BEGIN { printf "%.2f", b / a }')
  check "hop measured: a config read QEMU serves takes $2 ns alone, $4 ns behind the mux (x$RATIO; nested TCG, no threshold)" \
    test "$1" = 12378086 -a "$3" = 12378086
else
  bad "hop measured in phases B and F (B: ${HOP_B:-none}, F: ${HOP_F:-none})"
fi
check "QEMU killed while the guest was busy: the guest went on, 00:00.0 now master-aborts" \
  grep -q -E '^after the kill: 00:00\.0 reads ffffffff' <<< "$GF"
check "after the kill the mux still serves 00:05.0 (ids and BAR)" \
  grep -q -E '^after the kill: 00:05\.0 ids 0x1af4 0x1337, bar reads 0x[cC][aA][fF][eE]0000' <<< "$GF"
check "mux logged QEMU's end and released its claims" mux_has MUXF 'device model removed model=qemu'
check "mux stopped by itself when the domain went away" mux_has MUXF "shutting down reason=domain $DOMF is gone"
check "mux exit code 0" mux_has MUXF 'stopped exit_code=0'

echo "checks: $passed passed, $failed failed"
[ "$failed" = 0 ]
