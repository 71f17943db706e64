//! 4. Replay: the bundled OVMF log imported to a temporary trace, then in one run the
//!    decode-only rate of that file (TraceReader, repeats expanded), the replay rate through
//!    the simulated hypervisor, the engine and the trace servers (`configs/qemu-q35-trace.toml`)
//!    -- in rounds of one decode and one replay back to back, alternating which goes first,
//!    the ratio being the median of the rounds' ratios -- and the peak RSS of a replay alone, in a child process (`ioreq-mux replay`), measured by
//!    an intermediate child (`bench --peer rss`) so no other child of the bench counts.

use super::util::{TempDir, median};
use super::{Effort, progress};
use crate::qemu_import::{ImportOptions, import_file};
use crate::trace::{Record, TraceReader};
use serde::Serialize;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct ReplayBench {
    /// Accesses in the trace (repeats expanded).
    pub accesses: u64,
    /// Replay: accesses per second (median of the rounds, in this process).
    pub accesses_per_s: f64,
    /// Reading the same trace without replaying it.
    pub decode_only_per_s: f64,
    /// Replay time / decode-only time: the median of the ratios measured in each round, the
    /// two measured back to back (target: <= 2).
    pub replay_vs_decode: f64,
    /// Rounds (each: decode the trace once and replay it once).
    pub rounds: usize,
    /// Peak RSS of `ioreq-mux replay` on the trace, in its own process.
    pub peak_rss_mb: f64,
    /// Peak RSS of `ioreq-mux --version` (the binary doing nothing), for comparison.
    pub baseline_rss_mb: f64,
    /// The replay's own rate as the child reported it (accesses over its elapsed_s, which
    /// includes loading the topology).
    pub child_accesses_per_s: f64,
    pub import_s: f64,
    pub trace_bytes: u64,
}

/// `bench --peer rss -- ARGS`: runs this binary with ARGS, and prints one JSON object with
/// its exit code, peak RSS (KiB, from getrusage of the children: the only one) and stdout.
pub fn rss_peer(args: &[String]) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("ioreq-mux bench rss peer: {e}");
            return ExitCode::from(1);
        }
    };
    let out = match Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("ioreq-mux bench rss peer: {e}");
            return ExitCode::from(1);
        }
    };
    let max_rss_kb = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .map(|u| u.max_rss())
        .unwrap_or(-1);
    let j = serde_json::json!({
        "exit_code": out.status.code(),
        "max_rss_kb": max_rss_kb,
        "stdout": String::from_utf8_lossy(&out.stdout),
    });
    crate::outln!("{j}");
    ExitCode::SUCCESS
}

/// Peak RSS (MiB) of `exe ARGS` and what it printed.
fn child_rss(exe: &Path, args: &[&str]) -> Result<(f64, String), String> {
    let out = Command::new(exe)
        .args(["bench", "--peer", "rss", "--"])
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("{}: {e}", exe.display()))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("rss peer printed no JSON ({e})"))?;
    if v["exit_code"].as_i64() != Some(0) {
        return Err(format!("`ioreq-mux {}` failed: {v}", args.join(" ")));
    }
    let kb = v["max_rss_kb"]
        .as_f64()
        .filter(|k| *k > 0.0)
        .ok_or("no RSS")?;
    Ok((
        kb / 1024.0,
        v["stdout"].as_str().unwrap_or_default().to_string(),
    ))
}

/// Reads the whole trace; returns (accesses, seconds).
fn decode_only(trace: &Path) -> Result<(u64, f64), String> {
    let t = Instant::now();
    let mut r = TraceReader::open(trace).map_err(|e| e.to_string())?;
    let mut n = 0u64;
    while let Some(rec) = r.next_record().map_err(|e| e.to_string())? {
        if let Record::Access { access, repeat } = rec {
            for _ in 0..repeat {
                std::hint::black_box(&access);
                n += 1;
            }
        }
    }
    Ok((n, t.elapsed().as_secs_f64()))
}

/// Replays the trace once in this process; returns the seconds it took. `expect` is the
/// number of accesses decoding found (0: not known yet).
fn replay_once(trace: &Path, topology: &Path, expect: u64) -> Result<f64, String> {
    let t = Instant::now();
    let r = crate::replay::replay(trace, topology, 0, None).map_err(|e| format!("replay: {e}"))?;
    let s = t.elapsed().as_secs_f64();
    if r.divergences != 0 {
        return Err(format!("replay diverged {} times", r.divergences));
    }
    if expect != 0 && r.accesses != expect {
        return Err(format!(
            "replay saw {} accesses, decode {expect}",
            r.accesses
        ));
    }
    Ok(s)
}

pub fn run(e: &Effort, exe: &Path, log: &Path, topology: &Path) -> Result<ReplayBench, String> {
    let dir = TempDir::new("replay").map_err(|e| e.to_string())?;
    let trace = dir.0.join("ovmf.trace.zst");
    let t = Instant::now();
    import_file(log, &trace, &ImportOptions::default())
        .map_err(|e| format!("import {}: {e}", log.display()))?;
    let import_s = t.elapsed().as_secs_f64();
    let trace_bytes = std::fs::metadata(&trace).map(|m| m.len()).unwrap_or(0);
    let (mut dec, mut rep, mut ratios) = (vec![], vec![], vec![]);
    let mut accesses = 0;
    for round in 0..e.replay_rounds {
        // Alternate which goes first, so a slow patch of the machine hits both alike.
        let (n, d, r) = if round % 2 == 0 {
            let (n, d) = decode_only(&trace)?;
            (n, d, replay_once(&trace, topology, n)?)
        } else {
            let r = replay_once(&trace, topology, accesses)?;
            let (n, d) = decode_only(&trace)?;
            (n, d, r)
        };
        accesses = n;
        dec.push(d);
        rep.push(r);
        ratios.push(r / d.max(1e-9));
    }
    let dec_s = median(&mut dec);
    let rep_s = median(&mut rep);
    let trace_s = trace.to_str().ok_or("temporary path is not UTF-8")?;
    let topo_s = topology.to_str().ok_or("topology path is not UTF-8")?;
    let (peak_rss_mb, out) = child_rss(exe, &["replay", trace_s, "--topology", topo_s, "--json"])?;
    let report: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| format!("replay --json output: {e}"))?;
    if report["divergences"].as_u64() != Some(0) {
        return Err("the child replay diverged".into());
    }
    let child_accesses_per_s = report["accesses"].as_f64().unwrap_or(0.0)
        / report["elapsed_s"].as_f64().unwrap_or(f64::INFINITY);
    let (baseline_rss_mb, _) = child_rss(exe, &["--version"])?;
    let r = ReplayBench {
        accesses,
        accesses_per_s: accesses as f64 / rep_s.max(1e-9),
        decode_only_per_s: accesses as f64 / dec_s.max(1e-9),
        replay_vs_decode: median(&mut ratios),
        rounds: e.replay_rounds,
        peak_rss_mb,
        baseline_rss_mb,
        child_accesses_per_s,
        import_s,
        trace_bytes,
    };
    progress(&format!(
        "replay of {} accesses: {:.0}/s, decode only {:.0}/s ({:.1}x the decode time), peak RSS {:.1} MiB (binary alone {:.1} MiB)",
        r.accesses,
        r.accesses_per_s,
        r.decode_only_per_s,
        r.replay_vs_decode,
        r.peak_rss_mb,
        r.baseline_rss_mb
    ));
    Ok(r)
}
