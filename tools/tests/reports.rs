//! What `replay` and `import-qemu-trace` report, running the binary (issue #13): one number
//! format, `--json` with a schema and the same key names, divergences grouped by cause, BAR
//! sizing said to be harmless, the same claim failures in process mode, and honest progress.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;
use common::{bin, repo};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn temp(name: &str) -> PathBuf {
    common::scratch("reports", name)
}

fn run(cmd: &mut Command) -> (Output, String, String) {
    let out = cmd.output().unwrap();
    let o = String::from_utf8_lossy(&out.stdout).into_owned();
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, o, e)
}

/// The SeaBIOS trace imported once (`--json`, whose output is kept).
fn seabios() -> &'static (PathBuf, Value) {
    static T: OnceLock<(PathBuf, Value)> = OnceLock::new();
    T.get_or_init(|| {
        let t = temp("seabios.trace.zst");
        let (out, o, e) = run(bin()
            .arg("import-qemu-trace")
            .arg(repo("traces/q35/seabios.log.zst"))
            .arg("-o")
            .arg(&t)
            .arg("--json"));
        assert!(out.status.success(), "{e}");
        (t, serde_json::from_str(&o).unwrap())
    })
}

fn replay(trace: &Path, topology: &Path, extra: &[&str]) -> (Output, String, String) {
    run(bin()
        .arg("replay")
        .arg(trace)
        .arg("--topology")
        .arg(topology)
        .args(extra))
}

/// Before: no schema; import said `elapsed_secs` where replay says `elapsed_s`.
#[test]
fn import_json_has_a_schema_and_elapsed_s() {
    let j = &seabios().1;
    assert_eq!(j["schema"], "ioreq-mux.import/1");
    assert!(j["elapsed_s"].as_f64().is_some(), "{j}");
    assert!(j.get("elapsed_secs").is_none());
    assert_eq!(j["accesses"]["total"], 13_768_544);
}

/// Before: `13768544 accesses`, where import prints `13,768,544`; five "BAR claims refused"
/// lines that looked like failures; events and claim failures as plain strings in the JSON.
#[test]
fn replay_counts_with_separators_and_explains_bar_sizing() {
    let topo = repo("configs/qemu-q35-trace.toml");
    let (out, text, e) = replay(&seabios().0, &topo, &[]);
    assert!(out.status.success(), "{text}{e}");
    assert!(
        text.contains("13,768,544 accesses (386,630 records)"),
        "{text}"
    );
    assert!(
        text.contains("BAR claims refused: 5, all harmless"),
        "{text}"
    );
    assert!(
        text.contains("5x virtio-net-pci mmio 0xffffc000-0xffffffff"),
        "{text}"
    );
    assert!(text.contains("sized this BAR with decoding on"), "{text}");
    assert!(text.ends_with("divergences: 0\n"), "{text}");

    let (out, j, e) = replay(&seabios().0, &topo, &["--json"]);
    assert!(out.status.success(), "{e}");
    let j: Value = serde_json::from_str(&j).unwrap();
    assert_eq!(j["schema"], "ioreq-mux.replay/2");
    assert_eq!(j["invariant_violations"], Value::Array(vec![]));
    assert_eq!(j["accesses"], 13_768_544);
    let claims = j["claim_failures"].as_array().unwrap();
    assert_eq!(claims.len(), 5);
    assert_eq!(claims[0]["sizing"], true, "{}", claims[0]);
    assert_eq!(claims[0]["server"], "virtio-net");
    assert_eq!(
        j["layout_events"][0]["kind"], "ecam",
        "{}",
        j["layout_events"]
    );
    assert_eq!(j["divergence_causes"], Value::Array(vec![]));
}

/// Before: each divergence a line of its own, the JSON strings. Now grouped by cause, with
/// the `owns` entry that routed the access and the topology line that made the expected
/// server stand for the device.
#[test]
fn divergences_are_grouped_by_cause() {
    let text = std::fs::read_to_string(repo("configs/qemu-q35-trace.toml")).unwrap();
    // virtio-net and e1000 swap the devices they stand for (not the functions they own).
    let swapped = text
        .replace(
            "qemu_devices = [\"virtio-net-pci\"]",
            "qemu_devices = [\"@E\"]",
        )
        .replace(
            "qemu_devices = [\"e1000\"]",
            "qemu_devices = [\"virtio-net-pci\"]",
        )
        .replace("qemu_devices = [\"@E\"]", "qemu_devices = [\"e1000\"]");
    assert_ne!(swapped, text);
    let topo = temp("swapped.toml");
    std::fs::write(&topo, swapped).unwrap();
    let (out, text, e) = replay(&seabios().0, &topo, &["--limit", "200000"]);
    assert_eq!(out.status.code(), Some(1), "{text}{e}");
    assert!(
        text.contains(
            "config of 05:00.0 answered by virtio-net, expected e1000 (owns.position, line 61); \
             e1000 expected by qemu_devices, line 66"
        ),
        "{text}"
    );
    let summary = text
        .lines()
        .find(|l| l.starts_with("divergences: "))
        .unwrap();
    assert!(summary.contains(" cause"), "{summary}");

    let (_, j, _) = replay(&seabios().0, &topo, &["--limit", "200000", "--json"]);
    let j: Value = serde_json::from_str(&j).unwrap();
    let causes = j["divergence_causes"].as_array().unwrap();
    let total: u64 = causes.iter().map(|c| c["count"].as_u64().unwrap()).sum();
    assert_eq!(total, j["divergences"].as_u64().unwrap());
    let d = &j["first_divergences"][0];
    assert!(d["cause"]["kind"].is_string(), "{d}");
    assert!(d["recorded"]["addr"].is_u64(), "{d}");
}

/// `text` with `from` replaced by `to` once per pair, in order (each must be there).
fn edited(text: &str, edits: &[(&str, &str)]) -> String {
    let mut t = text.to_string();
    for (from, to) in edits {
        assert_eq!(t.matches(from).count(), 1, "{from}");
        t = t.replacen(from, to, 1);
    }
    t
}

/// The example: a topology that gives e1000 the function of virtio-net (and the
/// other way round). Before, the cause named only the `qemu_devices` line of the server
/// expected (line 60), where nothing is wrong; now it names the `owns.position` entry that
/// routed the access (line 67), then the other side. A function nobody claims points at `qemu_devices`: no
/// claim routed it.
#[test]
fn a_cause_points_at_the_claim_that_routed_the_access() {
    let text = std::fs::read_to_string(repo("configs/qemu-q35-trace.toml")).unwrap();
    let net = "owns.position = [\"00:02.2/00.0/00.0/00.0\"]";
    let e1000 = "owns.position = [\"00:02.3/00.0/01.0\"]";
    let misassigned = edited(&text, &[(net, "@NET"), (e1000, net), ("@NET", e1000)]);
    let topo = temp("misassigned.toml");
    std::fs::write(&topo, misassigned).unwrap();
    let (out, text, e) = replay(&seabios().0, &topo, &["--limit", "200000"]);
    assert_eq!(out.status.code(), Some(1), "{text}{e}");
    assert!(
        text.contains(
            "config of 05:00.0 answered by e1000, expected virtio-net (owns.position, line 67); \
             virtio-net expected by qemu_devices, line 60"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "config of 08:01.0 answered by virtio-net, expected e1000 (owns.position, line 61)"
        ),
        "{text}"
    );
    let (_, j, _) = replay(&seabios().0, &topo, &["--limit", "200000", "--json"]);
    let j: Value = serde_json::from_str(&j).unwrap();
    let cause = j["divergence_causes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["cause"])
        .find(|c| c["target"] == "config of 05:00.0")
        .unwrap();
    assert_eq!(cause["config"]["key"], "owns.position", "{cause}");
    assert_eq!(cause["config"]["line"], 67, "{cause}");
    assert_eq!(cause["expected_by"]["key"], "qemu_devices", "{cause}");
    assert_eq!(cause["expected_by"]["line"], 60, "{cause}");

    let nvme = "owns.position = [\"00:02.1/00.0\"]";
    let unclaimed = edited(
        &std::fs::read_to_string(repo("configs/qemu-q35-trace.toml")).unwrap(),
        &[(nvme, "# owns nothing")],
    );
    let topo = temp("unclaimed.toml");
    std::fs::write(&topo, unclaimed).unwrap();
    let (out, text, e) = replay(&seabios().0, &topo, &["--limit", "200000"]);
    assert_eq!(out.status.code(), Some(1), "{text}{e}");
    assert!(
        text.contains(
            "config of 02:00.0 answered by ioreq-mux, expected nvme (qemu_devices, line 54) \
             (first at"
        ),
        "{text}"
    );
}

/// Before: `claim_failures: 0` out of process where in process reports 5, and the refusal
/// said "... already owned by mmio ... requested by virtio-net is already owned by qemu".
#[test]
fn process_mode_reports_the_same_claim_failures() {
    let topo = repo("configs/qemu-q35-trace.toml");
    let (out, j, e) = replay(
        &seabios().0,
        &topo,
        &["--dm-mode", "process", "--limit", "6000000", "--json"],
    );
    assert!(out.status.success(), "{e}");
    let j: Value = serde_json::from_str(&j).unwrap();
    let claims = j["claim_failures"].as_array().unwrap();
    assert_eq!(claims.len(), 5, "{j}");
    let err = claims[0]["error"].as_str().unwrap();
    assert_eq!(
        err,
        "mmio 0xffffc000-0xffffffff requested by virtio-net is already owned by qemu"
    );
}

/// Runs `args` with a terminal as stderr (`script`), returning what the terminal showed.
fn on_a_terminal(args: &str) -> Option<String> {
    let cmd = format!("{} {args}", env!("CARGO_BIN_EXE_ioreq-mux"));
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Before: the import bar counted compressed bytes (100%, "eta 0s" all along) and replay's
/// spinner had no total. Now both show a percentage of a real total.
#[test]
fn progress_counts_against_the_real_total() {
    let out = temp("progress.trace.zst");
    let log = repo("traces/q35/seabios.log.zst");
    // `script` is util-linux's (Debian's bsdutils, an Essential package): always there.
    let shown = on_a_terminal(&format!(
        "import-qemu-trace {} -o {}",
        log.display(),
        out.display()
    ))
    .expect("`script` (bsdutils) runs the command on a terminal");
    assert!(shown.contains("/1.32 GiB of log text"), "{shown}");
    let partial = (1..100).any(|p| shown.contains(&format!(" {p}% ")));
    assert!(partial, "no percentage below 100: {shown}");

    let topo = repo("configs/qemu-q35-trace.toml");
    let shown = on_a_terminal(&format!(
        "replay {} --topology {}",
        out.display(),
        topo.display()
    ))
    .unwrap();
    assert!(shown.contains("/13,768,544 accesses"), "{shown}");
    // Never with --json: stdout stays one JSON object and stderr stays quiet.
    let shown = on_a_terminal(&format!(
        "replay {} --topology {} --json --limit 100000",
        out.display(),
        topo.display()
    ))
    .unwrap();
    assert!(!shown.contains("accesses ("), "{shown}");
    assert!(shown.trim_start().starts_with('{'), "{shown}");
}
