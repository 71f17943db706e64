//! `ioreq-mux acpi-tables` as a command: exit codes and messages.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ioreq-mux-acpi-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn acpi_tables(config: &Path, out: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ioreq-mux"))
        .arg("acpi-tables")
        .arg("--config")
        .arg(config)
        .arg("-o")
        .arg(out)
        .output()
        .unwrap()
}

#[test]
fn a_configuration_without_windows_is_refused_naming_the_file() {
    let d = scratch("none");
    let conf = d.join("no-windows.toml");
    std::fs::write(&conf, "[[server]]\nname = \"qemu\"\nkind = \"process\"\n").unwrap();
    let out = d.join("t.aml");
    let r = acpi_tables(&conf, &out);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("{}: no [[engine.ecam]] window", conf.display())),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written on error");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn overlapping_windows_are_refused_naming_both() {
    let d = scratch("overlap");
    let conf = d.join("overlap.toml");
    std::fs::write(
        &conf,
        "[[engine.ecam]]\nsegment = 1\nbase = 0xe0000000\nend_bus = 0x3f\n\
         [[engine.ecam]]\nsegment = 2\nbase = 0xe3f00000\nend_bus = 0\n",
    )
    .unwrap();
    let r = acpi_tables(&conf, &d.join("t.aml"));
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(
        err.starts_with("ioreq-mux acpi-tables: engine.ecam[1] overlaps engine.ecam[0]\n"),
        "{err}"
    );
    assert!(
        err.contains(&format!("--> {}:5:1\n", conf.display())),
        "{err}"
    );
    assert!(
        err.contains("first claimed here, line 1: segment 0001") && err.contains("^ segment 0002"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn writes_mcfg_then_ssdt() {
    let d = scratch("ok");
    let conf = d.join("ok.toml");
    std::fs::write(
        &conf,
        "[[engine.ecam]]\nsegment = 1\nbase = 0xe0000000\nend_bus = 0x3f\n",
    )
    .unwrap();
    let out = d.join("t.aml");
    let r = acpi_tables(&conf, &out);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let bytes = std::fs::read(&out).unwrap();
    let tables = ioreq_mux::acpi::split_tables(&bytes).unwrap();
    assert_eq!(tables.len(), 2);
    assert_eq!(&tables[0][..4], b"MCFG");
    assert_eq!(&tables[1][..4], b"SSDT");
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(
        text.starts_with("segment 0001 buses 00-3f at 0xe0000000-0xe3ffffff (64 MiB)\n")
            && text.contains("wrote MCFG and SSDT for 1 window(s)"),
        "{text}"
    );
    // --json: one object with a schema, the file and each window with its MCFG base.
    let j = Command::new(env!("CARGO_BIN_EXE_ioreq-mux"))
        .args(["acpi-tables", "--json", "--config"])
        .arg(&conf)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&j.stdout).unwrap();
    assert_eq!(v["schema"], "ioreq-mux.acpi-tables/1");
    assert_eq!(v["windows"][0]["segment"], 1);
    assert_eq!(v["windows"][0]["end_bus"], 0x3f);
    assert_eq!(v["windows"][0]["mcfg_base"], 0xe000_0000_u64);
    // An unwritable output is an error naming it.
    let bad = d.join("missing-dir").join("t.aml");
    let r = acpi_tables(&conf, &bad);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("{}: cannot write", bad.display())),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&d);
}
