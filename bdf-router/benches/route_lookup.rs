//! Route lookup (ECAM decode + owner) with criterion: the multiplexer's flat table against
//! Xen 4.17-style server selection (linear range-set walks, newest server first).
//!
//! `cargo bench -p bdf-router` (add `-- --quick` for a short run). The workload is the one
//! `ioreq-mux bench` measures (tools/src/bench/route_setup.rs, included here), so the two
//! agree; `ioreq-mux bench` covers the whole grid, this bench a few corners of it.

#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../../tools/src/bench/route_setup.rs"]
mod route_setup;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use route_setup::RouteSetup;
use std::time::Duration;

/// (servers, mapped functions): one server, Xen's maximum (8 x 256 ranges), and the largest
/// grid corner.
const CONFIGS: [(usize, usize); 4] = [(1, 256), (8, 2048), (64, 4096), (256, 65536)];

fn route_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_lookup");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        .throughput(Throughput::Elements(1));
    for (servers, bdfs) in CONFIGS {
        let s = RouteSetup::new(servers, bdfs, 16384, 0x005e_ed0f_1053).unwrap();
        let id = format!("{servers}x{bdfs}");
        g.bench_function(BenchmarkId::new("mux", &id), |b| {
            b.iter_custom(|n| {
                let t = std::time::Instant::now();
                s.run_mux(n);
                t.elapsed()
            })
        });
        g.bench_function(BenchmarkId::new("xen_style", &id), |b| {
            b.iter_custom(|n| {
                let t = std::time::Instant::now();
                s.run_xen(n);
                t.elapsed()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, route_lookup);
criterion_main!(benches);
