//! Timing helpers, the machine description and child processes of the benchmark.

use serde::Serialize;
use std::process::Child;
use std::time::{Duration, Instant};

/// Median of a non-empty list (mean of the middle two for an even count); 0 when empty.
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// An iteration count for which `f` takes about `round`.
pub fn calibrate(round: Duration, f: &mut impl FnMut(u64)) -> u64 {
    let mut iters = 1u64;
    loop {
        let t = Instant::now();
        f(iters);
        let e = t.elapsed();
        if e >= round / 8 || iters >= 1 << 40 {
            let scale = round.as_secs_f64() / e.as_secs_f64().max(1e-9);
            return ((iters as f64 * scale) as u64).max(1);
        }
        iters *= 2;
    }
}

/// What the benchmark ran on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel: String,
    /// 1-minute load average when the benchmark started.
    pub loadavg_1m: f64,
}

impl Machine {
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let loadavg_1m = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
            .unwrap_or(0.0);
        Machine {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            kernel,
            loadavg_1m,
        }
    }
}

/// A child process killed and reaped when dropped (unless it was waited for).
#[derive(Debug)]
pub struct Reaped(pub Option<Child>);

impl Reaped {
    /// Waits up to `timeout` for the child to exit; kills it past that.
    pub fn finish(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.0.take()?;
        let t = Instant::now();
        loop {
            match c.try_wait() {
                Ok(Some(s)) => return Some(s),
                Ok(None) if t.elapsed() < timeout => std::thread::sleep(Duration::from_millis(5)),
                _ => {
                    let _ = c.kill();
                    return c.wait().ok();
                }
            }
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A private temporary directory, removed when dropped.
#[derive(Debug)]
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(what: &str) -> std::io::Result<Self> {
        let p = std::env::temp_dir().join(format!("ioreq-mux-bench-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }

    #[test]
    fn calibration_scales_to_the_round() {
        let mut f = |n: u64| {
            let mut x = 0u64;
            for i in 0..n {
                x = std::hint::black_box(x.wrapping_add(i));
            }
        };
        let iters = calibrate(Duration::from_millis(5), &mut f);
        assert!(iters > 1000);
    }
}
