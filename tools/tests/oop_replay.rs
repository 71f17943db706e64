//! The real OVMF trace with every non-chipset server in its own process (the device-model
//! protocol), and the same with one of them killed in the middle of its work.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use ioreq_mux::qemu_import::{ImportOptions, import_file};
use ioreq_mux::replay::{DmMode, ReplayOptions, replay_with};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The OVMF trace, imported once for the tests of this file.
fn ovmf() -> &'static Path {
    static T: OnceLock<PathBuf> = OnceLock::new();
    T.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ioreq-mux-oop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = dir.join("ovmf.trace.zst");
        import_file(
            &repo().join("traces/q35/ovmf.log.zst"),
            &t,
            &ImportOptions::default(),
        )
        .unwrap();
        t
    })
}

/// The test binary is not ioreq-mux: point the children at the real one.
fn opts(kill: Option<(String, u64)>) -> ReplayOptions {
    ReplayOptions {
        show: 10,
        dm_mode: DmMode::Process,
        kill,
        dm_exe: Some(PathBuf::from(env!("CARGO_BIN_EXE_ioreq-mux"))),
        ..Default::default()
    }
}

#[test]
fn ovmf_replays_with_servers_out_of_process() {
    let topo = repo().join("configs/qemu-q35-trace.toml");
    let (r, _) = replay_with(ovmf(), &topo, &opts(None)).unwrap();
    assert_eq!(r.divergences, 0, "{:#?}", r.first_divergences);
    assert_eq!(r.accesses, 3_568_127);
    for s in ["nvme", "virtio-net", "e1000"] {
        assert!(r.per_server[s] > 0, "{s}: {:?}", r.per_server);
    }
    assert_eq!(r.engine.dm_errors, 0);
}

#[test]
fn a_device_model_killed_mid_replay_is_contained() {
    // The NVMe is busy between accesses 1,205,236 and 1,272,519 of the OVMF boot.
    let kill_at = 1_230_000;
    let topo = repo().join("configs/qemu-q35-trace.toml");
    let (r, engine) = replay_with(ovmf(), &topo, &opts(Some(("nvme".into(), kill_at)))).unwrap();
    // Nothing lost, nothing doubled, nobody left waiting.
    assert!(
        r.invariant_violations.is_empty(),
        "{:?}",
        r.invariant_violations
    );
    assert_eq!(r.sim.sent, r.sim.completed);
    assert_eq!(r.accesses, 3_568_127, "the replay went on to the end");
    // The NVMe's later accesses master-abort: they diverge, and only from the kill on.
    assert!(r.divergences > 0);
    assert!(
        r.first_divergences.iter().all(|d| d.access >= kill_at),
        "{:#?}",
        r.first_divergences
    );
    // Only the NVMe's accesses diverge (the others kept their claims and answers)...
    assert!(
        r.first_divergences.iter().all(|d| d
            .recorded
            .as_ref()
            .is_some_and(|r| r.to_string().contains("nvme"))),
        "{:#?}",
        r.first_divergences
    );
    // ...and the socket's hang-up removed the model (or its next request failed): it is gone
    // from the engine with every claim it had.
    assert!(
        !engine.served().iter().any(|(n, _)| n == "nvme"),
        "{:?}",
        engine.served()
    );
    let names = engine.router().server_names().to_vec();
    assert!(
        engine
            .router()
            .positions()
            .iter()
            .all(|p| names[usize::from(p.owner)] != "nvme")
    );
}
