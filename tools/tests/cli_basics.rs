//! Command-line basics, running the binary: a reader that closes the pipe early ends a
//! command quietly, and an empty capture is an error, not a clean import of nothing.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ioreq-mux"))
}

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ioreq-mux-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// `ioreq-mux inspect ... | head -0`: standard output is a pipe whose reader is gone before
/// the first write. Before, `println!` panicked ("failed printing to stdout: Broken pipe",
/// exit 101).
#[test]
fn a_closed_pipe_ends_a_command_quietly() {
    let (r, w) = nix::unistd::pipe().unwrap();
    drop(r);
    let out = bin()
        .args(["inspect", "--topology"])
        .arg(repo("configs/qemu-q35-trace.toml"))
        .stdout(Stdio::from(w))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains("Broken pipe"), "{err}");
}

/// An empty QEMU log (trace events off, say) used to import and replay with exit 0 and
/// `divergences: 0`.
#[test]
fn an_empty_log_is_refused() {
    let log = temp("empty.log");
    std::fs::write(&log, b"").unwrap();
    let out_trace = temp("empty.trace.zst");
    let out = bin()
        .arg("import-qemu-trace")
        .arg(&log)
        .arg("-o")
        .arg(&out_trace)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("empty.log: it has no guest access"), "{err}");
    assert!(!out_trace.exists(), "a trace was written");
}
