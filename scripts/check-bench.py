#!/usr/bin/env python3
"""Checks the output of `ioreq-mux bench --json` (docs/performance.md).

Only ratios of figures measured side by side in the same run are checked, never absolute
times, with margins wide enough for a loaded 2-core VM. Each check prints one line; the
script exits 1 if any check fails (or a section is missing or reported an error), 0 otherwise.

    ioreq-mux bench --quick --json > bench.json
    scripts/check-bench.py bench.json            # or: ... | scripts/check-bench.py -

A check that is known to miss (its fix is elsewhere) can be reported without failing the run:
`--allow-miss oop_poll` (repeatable; `--list` shows the check ids).
"""

import argparse
import json
import sys

# (id, what, bound) -- the margins, next to the targets the bench itself reports.
ROUTE_SPEEDUP_MIN = 5.0  # target 10x at 8 servers x 256 ranges (Xen's maximum)
ROUTE_FLAT_MAX = 3.0  # slowest / fastest multiplexer cell over the grid; target: flat
INPROCESS_MIN = 0.6  # target 0.8x the direct path
OOP_FLOOR_MAX = 3.0  # target: p50 within 1.5x of the matching floor
OOP_LOADED_MAX = 4.0  # target 2.5x: defaults' p50 with a busy loop per CPU / without (issue 14)
REPLAY_VS_DECODE_MAX = 7.0  # target 2x: replay / decode-only time, OVMF trace (now 4.1-4.2x idle, up to 6.2x loaded)

CHECK_IDS = {
    "errors": "the bench reported no errors",
    "route_speedup": f"route lookup >= {ROUTE_SPEEDUP_MIN}x the Xen-style baseline at 8 servers x 256 ranges",
    "route_flat": f"route lookup flat: slowest / fastest grid cell <= {ROUTE_FLAT_MAX}x",
    "route_grid": "route lookup covers 1-256 servers x 256-65536 functions",
    "inprocess": f"in-process path >= {INPROCESS_MIN}x the direct path",
    "oop_poll": f"busy-polling round trip p50 <= {OOP_FLOOR_MAX}x the cache-line floor",
    "oop_block": f"blocking round trip p50 <= {OOP_FLOOR_MAX}x the eventfd floor",
    "oop_loaded": f"defaults' round trip p50 with a busy loop per CPU <= {OOP_LOADED_MAX}x without",
    "replay": f"replay time <= {REPLAY_VS_DECODE_MAX}x decode-only time (OVMF trace)",
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="?", default="-", help="bench --json output (default: stdin)")
    ap.add_argument("--allow-miss", action="append", default=[], metavar="ID",
                    help="report this check but do not fail on it")
    ap.add_argument("--list", action="store_true", help="list the check ids and exit")
    a = ap.parse_args()
    if a.list:
        for k, v in CHECK_IDS.items():
            print(f"{k:14} {v}")
        return 0
    unknown = [x for x in a.allow_miss if x not in CHECK_IDS]
    if unknown:
        ap.error(f"unknown check id(s) {unknown}; --list shows them")
    text = sys.stdin.read() if a.json == "-" else open(a.json).read()
    try:
        r = json.loads(text)
    except json.JSONDecodeError as e:
        print(f"FAIL  bench output is not JSON: {e}")
        return 1

    failed, passed, allowed = [], [], []

    def check(cid, ok, detail):
        if ok:
            status = "ok  "
            passed.append(cid)
        elif cid in a.allow_miss:
            status = "MISS"  # known miss, allowed
            allowed.append(cid)
        else:
            status = "FAIL"
            failed.append(cid)
        print(f"{status}  {cid:13} {CHECK_IDS[cid]}: {detail}")

    def missing(cid, section):
        check(cid, False, f"section '{section}' missing from the bench output")

    errs = r.get("errors") or []
    check("errors", not errs, "; ".join(errs) if errs else "none")

    cells = r.get("route_lookup")
    if cells:
        grid = {(c["servers"], c["bdfs"]) for c in cells if c.get("grid", True)}
        want = {(s, b) for s in (1, 8, 64, 256) for b in (256, 4096, 65536)}
        check("route_grid", want <= grid, f"{len(grid)} grid cells" + (
            "" if want <= grid else f", missing {sorted(want - grid)}"))
        xm = [c for c in cells if c["servers"] == 8 and c.get("ranges_per_server") == 256]
        if xm:
            c = xm[0]
            sp = c["xen_style_ns"] / max(c["mux_ns"], 1e-9)
            check("route_speedup", sp >= ROUTE_SPEEDUP_MIN,
                  f"{sp:.1f}x ({c['xen_style_ns']:.0f} ns vs {c['mux_ns']:.1f} ns)")
        else:
            check("route_speedup", False, "no 8-server x 256-range cell")
        gc = [c for c in cells if c.get("grid", True)]
        best = [c.get("mux_best_ns", c["mux_ns"]) for c in gc]
        ratio = max(best) / max(min(best), 1e-9)
        lo = min(gc, key=lambda c: c.get("mux_best_ns", c["mux_ns"]))
        hi = max(gc, key=lambda c: c.get("mux_best_ns", c["mux_ns"]))
        check("route_flat", ratio <= ROUTE_FLAT_MAX,
              f"{ratio:.2f}x (fastest {lo['servers']}x{lo['bdfs']} {min(best):.1f} ns, "
              f"slowest {hi['servers']}x{hi['bdfs']} {max(best):.1f} ns)")
    else:
        for cid in ("route_grid", "route_speedup", "route_flat"):
            missing(cid, "route_lookup")

    p = r.get("inprocess")
    if p:
        ratio = p["mux_per_s"] / max(p["direct_per_s"], 1e-9)
        check("inprocess", ratio >= INPROCESS_MIN,
              f"{ratio:.2f}x ({p['mux_per_s']:.0f} vs {p['direct_per_s']:.0f} ioreqs/s)")
    else:
        missing("inprocess", "inprocess")

    o = r.get("oop")
    if o:
        pr = o["poll_p50_ns"] / max(o["spin_floor_ns"], 1)
        check("oop_poll", 0 < pr <= OOP_FLOOR_MAX,
              f"{pr:.2f}x ({o['poll_p50_ns']} ns vs {o['spin_floor_ns']} ns)")
        br = o["block_p50_ns"] / max(o["eventfd_floor_ns"], 1)
        check("oop_block", 0 < br <= OOP_FLOOR_MAX,
              f"{br:.2f}x ({o['block_p50_ns']} ns vs {o['eventfd_floor_ns']} ns)")
        if "loaded_p50_ns" in o:
            lr = o["loaded_p50_ns"] / max(o["unloaded_p50_ns"], 1)
            check("oop_loaded", 0 < lr <= OOP_LOADED_MAX,
                  f"{lr:.2f}x ({o['loaded_p50_ns']} ns vs {o['unloaded_p50_ns']} ns; p99 "
                  f"{o['loaded_vs_unloaded_p99']:.2f}x; fixed 50 us spin: p50 "
                  f"{o['fixed_loaded_vs_unloaded_p50']:.2f}x, p99 {o['fixed_loaded_vs_unloaded_p99']:.2f}x)")
        else:
            check("oop_loaded", False, "no loaded / unloaded figures in the oop section")
    else:
        missing("oop_poll", "oop")
        missing("oop_block", "oop")
        missing("oop_loaded", "oop")

    rp = r.get("replay")
    if rp:
        # The bench's own ratio: the median of rounds that each decode and replay back to back.
        ratio = rp.get("replay_vs_decode") or rp["decode_only_per_s"] / max(rp["accesses_per_s"], 1e-9)
        check("replay", 0 < ratio <= REPLAY_VS_DECODE_MAX,
              f"{ratio:.2f}x ({rp['accesses_per_s']:.0f} vs {rp['decode_only_per_s']:.0f} accesses/s, "
              f"{rp.get('rounds', 1)} rounds; target 2x)")
    else:
        missing("replay", "replay")

    if failed:
        print(f"failed: {', '.join(failed)}")
    if allowed:
        print(f"allowed misses: {', '.join(allowed)}")
    print(f"check-bench: {len(passed)} passed, {len(failed)} failed, {len(allowed)} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
