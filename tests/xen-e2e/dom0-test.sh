#!/bin/sh
# Runs in dom0 (started by /init), one boot of Xen for everything:
#   A  SeaBIOS guest: `xl create -p`, `ioreq-mux serve` (ready), `xl unpause`; firmware
#      enumerates PCI and sizes/places 00:05.0's BAR; then SIGTERM to the mux.
#   C  `serve --claim all` on the same (idle) domain for 3 s: whole segment 0 and 0xcf8-0xcff
#      claimed from Xen, then a clean stop on --duration.
#   D  `serve` for a domain that does not exist: exit code 4.
#   B  Linux guest: reads 00:05.0 through sysfs, its BAR from both vCPUs and the port range,
#      powers off; the mux notices the domain is gone and stops by itself.
# Markers are "E2E: ..." lines; mux logs are printed prefixed "MUXA:", "MUXC:", "MUXD:",
# "MUXB:"; the guests' own output reaches the Xen console as "(dN)" lines. The host side
# (tests/xen-e2e/check.sh) judges all of it.
CFG=/etc/ioreq-mux/xen-e2e.toml
up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "E2E: $* [dom0 uptime $(up)s]"; }
dump() { sed "s/^/$1: /" "$2"; }

# start_mux NAME LOG [ARGS...]: `ioreq-mux serve` for domain NAME in the background ($MUX),
# returns once it logged that it is ready.
start_mux() {
  name=$1; log=$2; shift 2
  dom=$(xl domid "$name")
  ioreq-mux serve --domid "$dom" --config $CFG "$@" > "$log" 2>&1 &
  MUX=$!
  i=0
  while [ $i -lt 300 ]; do
    if grep -q 'ready: serving' "$log"; then say "ioreq-mux ready for $name (domid $dom)"; return 0; fi
    kill -0 $MUX 2>/dev/null || break
    sleep 0.1; i=$((i+1))
  done
  say "FAIL: ioreq-mux did not become ready for $name"
  cat "$log"
  return 1
}

create() { # CFGFILE LOG
  if ! xl create -p "$1" > "$2" 2>&1; then say "FAIL: xl create -p $1"; tail -30 "$2"; return 1; fi
}

# ---- phase A: SeaBIOS guest ------------------------------------------------------------
say "phase A: xl create -p seabios.cfg"
create /e2e/seabios.cfg /tmp/xl-a.log
DOMA=$(xl domid e2e-seabios)
say "phase A: domid $DOMA"
start_mux e2e-seabios /tmp/mux-a.log --log-level debug
say "phase A: unpause"
xl unpause e2e-seabios
i=0
while [ $i -lt 120 ]; do
  xl dmesg | grep -q -E 'No bootable device|Booting from|Boot failed' && break
  sleep 1; i=$((i+1))
done
say "phase A: firmware finished (waited ${i}s)"
kill -TERM $MUX
wait $MUX
say "phase A: ioreq-mux exit code $?"
dump MUXA /tmp/mux-a.log

# ---- phase C: claim everything on the idle phase A domain --------------------------------
say "phase C: serve --claim all --duration 3s on domid $DOMA"
ioreq-mux serve --domid "$DOMA" --config $CFG --claim all --duration 3s \
  --log-level info,ioreq_mux::xen_backend=debug > /tmp/mux-c.log 2>&1
say "phase C: ioreq-mux exit code $?"
dump MUXC /tmp/mux-c.log
xl destroy e2e-seabios

# ---- phase D: a domain that does not exist -----------------------------------------------
ioreq-mux serve --domid 999 --config $CFG > /tmp/mux-d.log 2>&1
say "phase D: ioreq-mux exit code $?"
dump MUXD /tmp/mux-d.log

# ---- phase B: Linux guest ----------------------------------------------------------------
say "phase B: xl create -p linux.cfg"
create /e2e/linux.cfg /tmp/xl-b.log
DOMB=$(xl domid e2e-linux)
say "phase B: domid $DOMB"
start_mux e2e-linux /tmp/mux-b.log --log-level debug
say "phase B: unpause"
xl unpause e2e-linux
i=0
while [ $i -lt 300 ] && xl domid e2e-linux >/dev/null 2>&1; do sleep 1; i=$((i+1)); done
say "phase B: guest domain gone (waited ${i}s)"
i=0
while [ $i -lt 50 ] && kill -0 $MUX 2>/dev/null; do sleep 0.1; i=$((i+1)); done
if kill -0 $MUX 2>/dev/null; then
  say "FAIL: ioreq-mux still running 5s after the domain went away"
  kill -TERM $MUX
fi
wait $MUX
say "phase B: ioreq-mux exit code $?"
dump MUXB /tmp/mux-b.log
xl list
