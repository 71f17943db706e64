#!/bin/sh
# Runs in dom0 (started by /init), one boot of Xen for everything:
#   A  SeaBIOS guest: `xl create -p`, `ioreq-mux serve` (ready), `xl unpause`; firmware
#      enumerates PCI and sizes/places 00:05.0's BAR; then SIGTERM to the mux.
#   C  `serve --claim all` on the same (idle) domain for 3 s: whole segment 0 and 0xcf8-0xcff
#      claimed from Xen, then a clean stop on --duration.
#   D  `serve` for a domain that does not exist: exit code 4.
#   B  Linux guest: reads 00:05.0 through sysfs, its BAR from both vCPUs and the port range,
#      times config reads QEMU serves, powers off; the mux notices the domain is gone and
#      stops by itself.
#   E  SeaBIOS guest with QEMU BEHIND the mux (device_model_override = the ioreq-mux-qemu
#      wrapper, which starts the mux and QEMU with the preload library).
#   F  Linux guest with QEMU behind the mux, a process model (`ioreq-mux dm`) behind QEMU's
#      PCI-PCI bridge and the built-in 00:05.0; reads every function, a disk on QEMU's IDE
#      with rep string I/O, times the hop; then QEMU is killed while the guest is busy.
# Markers are "E2E: ..." lines; mux logs are printed prefixed "MUXA:", "MUXC:", "MUXD:",
# "MUXB:", "MUXE:", "MUXF:" (QEMU's own logs "QEMUE:", "QEMUF:", the process model's "DMF:"); the guests' own output reaches the Xen console as "(dN)" lines. The host side
# (tests/xen-e2e/check.sh) judges all of it.
CFG=/etc/ioreq-mux/xen-e2e.toml
# Which phases run: all, unless the dom0 command line says `e2e.phases=EF` (for working on
# some; check.sh then reports the others as missing).
PHASES=$(sed -n 's/.*e2e\.phases=\([A-Z]*\).*/\1/p' /proc/cmdline)
PHASES=${PHASES:-ACDBEF}
phase() { case "$PHASES" in *$1*) return 0 ;; esac; return 1; }
# try 'COMMANDS': their output, run again (at most twice more) if they failed. Under the
# nested emulation a busybox applet crashes now and then (a segfault, in dom0 and in this
# guest alike, also before ioreq-mux is involved); a lost line would fail a check for nothing.
set -o pipefail
try() {
  n=0
  while :; do
    out=$(eval "$1") && break
    n=$((n + 1))
    [ $n -ge 3 ] && break
  done
  [ -n "$out" ] && printf '%s\n' "$out"
  return 0
}
up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "E2E: $* [dom0 uptime $(up)s]"; }
# wait_until SECONDS STEP 'CONDITION': polls CONDITION every STEP seconds until it holds or
# SECONDS of dom0 time (the clock, not a count of polls: under a loaded host one poll of
# `xl dmesg` can take seconds) have passed. WAITED: the whole seconds it took. Status:
# whether CONDITION held.
wait_until() {
  t0=$(cut -d. -f1 /proc/uptime)
  while :; do
    WAITED=$(( $(cut -d. -f1 /proc/uptime) - t0 ))
    eval "$3" && return 0
    [ "$WAITED" -ge "$1" ] && return 1
    sleep "$2"
  done
}
# alive PID: PID runs (a zombie, killed but not yet reaped by its parent, does not).
alive() { [ -r "/proc/$1/stat" ] && ! grep -q ') Z ' "/proc/$1/stat" 2>/dev/null; }
# wait_gone PID SECONDS: until PID exits; says whether it did.
wait_gone() { wait_until "$2" 0.1 "! alive $1"; }
# guest_said DOMID TEXT: the guest's console (through Xen's) has a line with TEXT.
guest_said() { xl dmesg | grep "(d$1)" | grep -q -- "$2"; }
dump() { try "sed 's/^/$1: /' '$2'"; }

# start_mux NAME LOG [ARGS...]: `ioreq-mux serve` for domain NAME in the background ($MUX),
# returns once it logged that it is ready.
start_mux() {
  name=$1; log=$2; shift 2
  dom=$(xl domid "$name")
  ioreq-mux serve --domid "$dom" --config $CFG "$@" > "$log" 2>&1 &
  MUX=$!
  if wait_until 60 0.1 "grep -q 'ready: serving' '$log' || ! kill -0 $MUX 2>/dev/null" \
    && grep -q 'ready: serving' "$log"; then
    say "ioreq-mux ready for $name (domid $dom)"
    return 0
  fi
  say "FAIL: ioreq-mux did not become ready for $name"
  cat "$log"
  return 1
}

create() { # CFGFILE LOG
  if ! xl create -p "$1" > "$2" 2>&1; then say "FAIL: xl create -p $1"; tail -30 "$2"; return 1; fi
}

# ---- phase A: SeaBIOS guest ------------------------------------------------------------
if phase A; then
say "phase A: xl create -p seabios.cfg"
create /e2e/seabios.cfg /tmp/xl-a.log
DOMA=$(xl domid e2e-seabios)
say "phase A: domid $DOMA"
start_mux e2e-seabios /tmp/mux-a.log --log-level debug
say "phase A: unpause"
xl unpause e2e-seabios
wait_until 300 1 "xl dmesg | grep -q -E 'No bootable device|Booting from|Boot failed'"
say "phase A: firmware finished (waited ${WAITED}s)"
kill -TERM $MUX
wait $MUX
say "phase A: ioreq-mux exit code $?"
dump MUXA /tmp/mux-a.log

# ---- phase C: claim everything on the idle phase A domain --------------------------------
say "phase C: serve --claim all --duration 3s on domid $DOMA"
ioreq-mux serve --domid "$DOMA" --config $CFG --claim all --duration 3s \
  --log-level info,xen_backend=debug > /tmp/mux-c.log 2>&1
say "phase C: ioreq-mux exit code $?"
dump MUXC /tmp/mux-c.log
xl destroy e2e-seabios
fi

# ---- phase D: a domain that does not exist -----------------------------------------------
if phase D; then
  ioreq-mux serve --domid 999 --config $CFG > /tmp/mux-d.log 2>&1
  say "phase D: ioreq-mux exit code $?"
  dump MUXD /tmp/mux-d.log
fi

# ---- phase B: Linux guest ----------------------------------------------------------------
if phase B; then
say "phase B: xl create -p linux.cfg"
create /e2e/linux.cfg /tmp/xl-b.log
DOMB=$(xl domid e2e-linux)
say "phase B: domid $DOMB"
start_mux e2e-linux /tmp/mux-b.log --log-level debug
say "phase B: unpause"
xl unpause e2e-linux
wait_until 900 1 "! xl domid e2e-linux >/dev/null 2>&1"
say "phase B: guest domain gone (waited ${WAITED}s)"
if ! wait_gone $MUX 30; then
  say "FAIL: ioreq-mux still running 30s after the domain went away"
  kill -TERM $MUX
fi
wait $MUX
say "phase B: ioreq-mux exit code $?"
dump MUXB /tmp/mux-b.log
fi

# ---- phases E and F: QEMU behind the multiplexer ------------------------------------------
# The wrapper starts `ioreq-mux serve` for the domain with /etc/ioreq-mux/qemu.toml
# (configs/xen-e2e-front.toml) and logs it to /var/log/xen/ioreq-mux-DOMID.log.
export IOREQ_MUX_LOG_LEVEL="info,ioreq_mux_engine=debug,xen_backend=debug"
export IOREQ_MUX_PRELOAD_LOG=info

# mux_of DOMID: pid of the multiplexer the wrapper started for the domain.
mux_of() { cat /run/ioreq-mux/$1.pid 2>/dev/null; }
# qemu_of DOMID: pid of the QEMU serving DOMID (its command line has "-xen-domid DOMID").
# A busybox applet crashing under the nested emulation must not lose it: looked up again.
qemu_of() {
  for attempt in 1 2 3; do
    for p in /proc/[0-9]*; do
      tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep -q -- "-xen-domid $1 " && { echo "${p#/proc/}"; return 0; }
    done
  done
  return 1
}
# the mux log without the per-access lines (they are many; the checks need few of them)
dump_mux() { try "grep -v -E ' served (vcpu|config)| buffered write ' '$2' | sed 's/^/$1: /'"; }
dump_mux_config() { try "grep -E ' served config ' '$2' | grep -E '$3' | sed 's/^/$1: /'"; }
# every distinct 4-byte config read the mux served (function, register, value)
dump_mux_reads() {
  try "grep -E ' served config .* size=4 dir=read ' '$2' \
    | sed -E 's/.*(served config) .*(sbdf=[^ ]+ reg=[^ ]+ size=4 dir=read data=[^ ]+).*/\1 \2/' \
    | sort -u | sed 's/^/$1: /'"
}

if phase E; then
say "phase E: xl create -p seabios-front.cfg"
if create /e2e/seabios-front.cfg /tmp/xl-e.log; then
  DOME=$(xl domid e2e-seabios-front)
  MUXE=$(mux_of $DOME)
  say "phase E: domid $DOME, ioreq-mux pid $MUXE"
  say "phase E: unpause"
  xl unpause e2e-seabios-front
  wait_until 300 1 "xl dmesg | grep '(d$DOME)' | grep -q -E 'No bootable device|Booting from|Boot failed'"
  say "phase E: firmware finished (waited ${WAITED}s)"
  xl destroy e2e-seabios-front
  if wait_gone "$MUXE" 30; then say "phase E: ioreq-mux stopped after the domain went away"; else
    say "FAIL: phase E: ioreq-mux still running 30s after the domain went away"; kill -TERM "$MUXE"; fi
  dump_mux MUXE /var/log/xen/ioreq-mux-$DOME.log
  dump_mux_config MUXE /var/log/xen/ioreq-mux-$DOME.log 'sbdf=0000:00:01\.3 reg=0x(40|80) .*dir=write'
fi
for f in /var/log/xen/ioreq-mux-*.log; do [ -f "$f" ] && [ -z "${DOME:-}" ] && dump MUXE "$f"; done
sed 's/^/QEMUE: /' /var/log/xen/qemu-dm-e2e-seabios-front.log
rm -f /var/log/xen/ioreq-mux-*.log
fi

if phase F; then
say "phase F: xl create -p linux-front.cfg"
dd if=/dev/urandom of=/e2e/disk.img bs=1024 count=64 2>/dev/null
say "phase F: disk image sha256 $(sha256sum /e2e/disk.img | cut -d' ' -f1)"
if create /e2e/linux-front.cfg /tmp/xl-f.log; then
  DOMF=$(xl domid e2e-linux-front)
  MUXF=$(mux_of $DOMF)
  say "phase F: domid $DOMF, ioreq-mux pid $MUXF"
  ioreq-mux dm --socket /run/ioreq-mux/$DOMF.sock --server bridge-ep --at 00:06.0/01.0 \
    --vendor 0x1af4 --device 0x1338 --class 0xff0000 --revision 2 --bar mem64:4096:prefetch \
    > /tmp/dm-f.log 2>&1 &
  DMF=$!
  wait_until 60 0.1 "grep -q 'device model attached model=bridge-ep' /var/log/xen/ioreq-mux-$DOMF.log"
  say "phase F: process model bridge-ep joined (waited ${WAITED}s)"
  say "phase F: unpause"
  xl unpause e2e-linux-front
  # The kill must come after the guest's reads (the checks compare them with what QEMU
  # served): a guest that is not ready in time is a failure of its own, not a reason to kill.
  if wait_until 900 2 "guest_said $DOMF 'GUESTF: ready for the QEMU kill'"; then
    QPID=$(qemu_of "$DOMF")
    say "phase F: guest ready for the QEMU kill (waited ${WAITED}s); killing QEMU pid ${QPID:-none found}"
    if [ -n "$QPID" ] && kill -KILL "$QPID" && wait_gone "$QPID" 30; then
      say "phase F: QEMU pid $QPID is gone"
    else
      say "FAIL: phase F: QEMU (pid ${QPID:-none found}) still there after SIGKILL"
    fi
    wait_until 600 2 "guest_said $DOMF 'GUESTF: done after the kill'"
    say "phase F: guest went on after the kill (waited ${WAITED}s)"
  else
    say "FAIL: phase F: the guest was not ready for the QEMU kill after ${WAITED}s"
  fi
  if kill -0 "$MUXF" 2>/dev/null; then say "phase F: ioreq-mux still serving after QEMU died"; fi
  xl destroy e2e-linux-front
  if wait_gone "$MUXF" 30; then say "phase F: ioreq-mux stopped after the domain went away"; else
    say "FAIL: phase F: ioreq-mux still running 30s after the domain went away"; kill -TERM "$MUXF"; fi
  wait_gone "$DMF" 5 || kill -TERM "$DMF"
  dump_mux MUXF /var/log/xen/ioreq-mux-$DOMF.log
  dump_mux_reads MUXF /var/log/xen/ioreq-mux-$DOMF.log
  dump_mux_config MUXF /var/log/xen/ioreq-mux-$DOMF.log 'via ECAM .* dir=write'
  sed 's/^/DMF: /' /tmp/dm-f.log
fi
for f in /var/log/xen/ioreq-mux-*.log; do [ -f "$f" ] && [ -z "${DOMF:-}" ] && dump MUXF "$f"; done
sed 's/^/QEMUF: /' /var/log/xen/qemu-dm-e2e-linux-front.log
fi
xl list
