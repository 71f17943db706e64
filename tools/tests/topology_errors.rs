//! Errors in a topology, running the binary: each points into the file (`file:line:col`,
//! the offending text, and for a conflict the first claim's line), exit code 2. Before, the
//! semantic ones had no line, and several were accepted silently.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;
use common::{bin, repo};
use ioreq_mux::trace::{
    Access, BarEvent, BarEventKind, ConfigAnnotation, ConfigPath, Dir, Record, Sbdf, Space,
    TraceMeta, TraceWriter,
};
use std::path::{Path, PathBuf};
use std::process::Output;

fn temp(name: &str) -> PathBuf {
    common::scratch("topo", name)
}

fn write(name: &str, text: &str) -> PathBuf {
    let p = temp(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// `ioreq-mux inspect --topology FILE`: exit code and standard error.
fn inspect(topology: &Path) -> (Option<i32>, String) {
    let out = bin()
        .arg("inspect")
        .arg("--topology")
        .arg(topology)
        .output();
    status(out.unwrap())
}

fn replay(trace: &Path, topology: &Path) -> (Option<i32>, String) {
    let out = bin()
        .arg("replay")
        .arg(trace)
        .arg("--topology")
        .arg(topology)
        .output();
    status(out.unwrap())
}

fn status(out: Output) -> (Option<i32>, String) {
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `inspect` on `text` and checks exit code 2, the message and `--> FILE:LINE:COL`.
fn refused(name: &str, text: &str, message: &str, at: &str) -> String {
    let f = write(name, text);
    let (code, err) = inspect(&f);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.starts_with(&format!("ioreq-mux inspect: {message}\n")),
        "{err}"
    );
    assert!(
        err.contains(&format!("--> {}:{at}\n", f.display())),
        "{err}"
    );
    err
}

const QEMU: &str = "\
[[server]]
name = \"qemu\"
kind = \"trace\"
qemu_devices = [\"*\"]
owns.bdf = [\"00:00.0-00:1f.7\"]
";

/// Before: `pci 0000:00:02.1 requested by nvme is already owned by qemu`, no line.
#[test]
fn an_overlapping_claim_points_at_both_claims() {
    let text = format!(
        "{QEMU}\n[[server]]\nname = \"nvme\"\nkind = \"trace\"\nowns.bdf = [\"00:02.1\"]\n"
    );
    let err = refused(
        "overlap.toml",
        &text,
        "server[1] 'nvme': pci 0000:00:02.1 requested by nvme is already owned by qemu",
        "10:13",
    );
    assert!(
        err.contains("5 | owns.bdf = [\"00:00.0-00:1f.7\"]"),
        "{err}"
    );
    assert!(
        err.contains("----------------- first claimed here, line 5, by qemu"),
        "{err}"
    );
    assert!(err.contains("10 | owns.bdf = [\"00:02.1\"]"), "{err}");
    assert!(err.contains("^^^^^^^^^ requested here by nvme"), "{err}");
}

/// Before: "is already owned by nvme", said of nvme's own second listing.
#[test]
fn a_bdf_listed_twice_says_so() {
    let text =
        "[[server]]\nname = \"nvme\"\nkind = \"trace\"\nowns.bdf = [\"00:02.1\", \"00:02.1\"]\n";
    let err = refused(
        "twice.toml",
        text,
        "server[0] 'nvme': pci 0000:00:02.1 is claimed twice by nvme",
        "4:24",
    );
    assert!(err.contains("first claimed here, line 4, by nvme"), "{err}");
}

fn function(fields: &str) -> String {
    format!(
        "[[server]]\nname = \"vgpu\"\n\n[server.function.\"00:05.0\"]\nvendor = 0x1af4\ndevice = 0x1337\n{fields}\n"
    )
}

/// Before: all accepted; the model rounded sizes up, dropped the seventh BAR and truncated
/// the class.
#[test]
fn function_fields_are_checked() {
    let err = refused(
        "bar-size.toml",
        &function("bars = [{ kind = \"mem32\", size = 3000 }]"),
        "server[0] 'vgpu': function \"00:05.0\": BAR 0: size 0xbb8 (3000) is not a power of two",
        "7:9",
    );
    assert!(
        err.contains("7 | bars = [{ kind = \"mem32\", size = 3000 }]"),
        "{err}"
    );
    refused(
        "bar-zero.toml",
        &function("bars = [{ kind = \"io\", size = 0 }]"),
        "server[0] 'vgpu': function \"00:05.0\": BAR 0: size 0: a BAR decodes a power of two of bytes, at least one",
        "7:9",
    );
    let seven = ["{ kind = \"mem32\", size = 4096 }"; 7].join(",\n  ");
    refused(
        "bar-seven.toml",
        &function(&format!("bars = [\n  {seven},\n]")),
        "server[0] 'vgpu': function \"00:05.0\": BAR 6 does not fit: an endpoint (type 0 header) has 6 BAR registers and the BARs before it take 6 (a 64-bit BAR takes two)",
        "14:3",
    );
    refused(
        "class.toml",
        &function("class = 0x1000000"),
        "server[0] 'vgpu': function \"00:05.0\": class 0x1000000 does not fit 24 bits (base class, sub-class, programming interface: at most 0xffffff)",
        "7:9",
    );
}

/// Before: accepted and ignored.
#[test]
fn a_trace_only_field_on_an_emulated_server_is_refused() {
    let err = refused(
        "kind.toml",
        "[[server]]\nname = \"vgpu\"\nkind = \"emulated\"\nqemu_devices = [\"e1000\"]\n",
        "server[0] 'vgpu': qemu_devices applies to kind = \"trace\" servers only",
        "4:16",
    );
    assert!(err.contains("the kind, line 3"), "{err}");
}

/// Before: the windows printed in full, with no line.
#[test]
fn overlapping_ecam_windows_point_at_both() {
    let text = "[[engine.ecam]]\nsegment = 1\nbase = 0xe0000000\nend_bus = 0x3f\n\n\
                [[engine.ecam]]\nsegment = 2\nbase = 0xe2000000\nend_bus = 0x0f\n";
    let err = refused(
        "ecam.toml",
        text,
        "engine.ecam[1] overlaps engine.ecam[0]",
        "6:1",
    );
    assert!(
        err.contains(
            "first claimed here, line 1: segment 0001 buses 00-3f at 0xe0000000-0xe3ffffff (64 MiB)"
        ),
        "{err}"
    );
    assert_eq!(err.matches("segment 0002").count(), 1, "{err}");
}

/// A trace whose accesses are answered by `devices` (one configuration read each).
fn trace(name: &str, devices: &[&str]) -> PathBuf {
    let p = temp(name);
    let f = std::fs::File::create(&p).unwrap();
    let mut w = TraceWriter::new(f, &TraceMeta::default()).unwrap();
    for (i, d) in devices.iter().enumerate() {
        let device = Some(w.intern(d).unwrap());
        let sbdf = Sbdf::new(0, 0, i as u8, 0).unwrap();
        w.write_access(&Access {
            vcpu: 0,
            space: Space::Mmio,
            dir: Dir::Read,
            addr: 0xb000_0000 + ((i as u64) << 15),
            size: 4,
            rep: 1,
            data: 0x1234_8086,
            region: None,
            config: Some(ConfigAnnotation {
                path: ConfigPath::Ecam,
                sbdf,
                reg: 0,
                device,
            }),
        })
        .unwrap();
        w.write(&Record::Bar(BarEvent {
            kind: BarEventKind::Map,
            device,
            sbdf,
            bar: 0,
            space: Space::Mmio,
            base: 0xfe00_0000,
            size: 0x1000,
        }))
        .unwrap();
    }
    w.finish().unwrap();
    p
}

/// Before: accepted, and the replay reported 286 divergences.
#[test]
fn a_misspelt_qemu_device_type_says_what_the_trace_has() {
    let t = trace("devices.trace.zst", &["mch", "nvme", "e1000"]);
    let text = format!(
        "{QEMU}\n[[server]]\nname = \"nvme\"\nkind = \"trace\"\nqemu_devices = [\"nvmme\"]\nowns.position = [\"00:02.1/00.0\"]\n"
    );
    let f = write("typo.toml", &text);
    let (code, err) = replay(&t, &f);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.starts_with(&format!(
            "ioreq-mux replay: server[1] 'nvme': qemu_devices: the trace {} has no device 'nvmme'\n",
            t.display()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("--> {}:10:17\n", f.display())),
        "{err}"
    );
    assert!(
        err.contains("^^^^^^^ not a device type of the trace"),
        "{err}"
    );
    assert!(err.contains("= help: did you mean 'nvme'?"), "{err}");
}

#[test]
fn a_trace_without_accesses_is_refused() {
    let t = trace("empty.trace.zst", &[]);
    let (code, err) = replay(&t, &repo("configs/qemu-q35-trace.toml"));
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(
        err,
        format!(
            "ioreq-mux replay: {}: the trace has no guest access: nothing to replay\n",
            t.display()
        )
    );
}

#[test]
fn a_topology_without_servers_is_warned_about() {
    let f = write(
        "no-servers.toml",
        "[engine.intercepts]\nlow_ram_top = 0x80000000\n",
    );
    let (code, err) = inspect(&f);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("WARN"), "{err}");
    assert!(
        err.contains(&format!(
            "{}: no [[server]]: nothing stands behind",
            f.display()
        )),
        "{err}"
    );
    let (code, err) = inspect(&repo("configs/qemu-q35-trace.toml"));
    assert_eq!((code, err.as_str()), (Some(0), ""));
}

/// Before: `stream did not contain valid UTF-8` for the trace given as topology, and "bad
/// magic bytes" for a topology given as trace.
#[test]
fn files_of_the_wrong_kind_say_so() {
    let t = trace("swapped.trace.zst", &["mch"]);
    let topology = repo("configs/qemu-q35-trace.toml");
    let (code, err) = replay(&topology, &t);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(
        err,
        format!(
            "ioreq-mux replay: {} is not a topology: it is zstd-compressed (an ioreq-mux trace or \
             a compressed QEMU log?); a topology is a TOML text file, given with --topology, the \
             trace goes first\n",
            t.display()
        )
    );
    let (code, err) = replay(&topology, &topology);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(
        err,
        format!(
            "ioreq-mux replay: {}: not an ioreq-mux trace: it is text, not a trace (a topology? \
             the topology is given with --topology, the trace first)\n",
            topology.display()
        )
    );
}
