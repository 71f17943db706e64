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

/// One set of logging options for every command, before or after the subcommand: `-v`
/// turns on info lines, `-q` silences `$IOREQ_MUX_LOG`, and a filter that does not parse is
/// exit 2 naming where it came from.
#[test]
fn logging_options_are_the_same_for_every_command() {
    let stderr = |args: &[&str], env: Option<&str>| {
        let mut c = bin();
        c.args(args).env_remove("IOREQ_MUX_LOG");
        if let Some(e) = env {
            c.env("IOREQ_MUX_LOG", e);
        }
        let out = c.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let topo = repo("configs/qemu-q35-trace.toml");
    let topo = topo.to_str().unwrap();
    let (code, err) = stderr(&["inspect", "--topology", topo], None);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains(" INFO "), "warn by default: {err}");
    for args in [
        ["-v", "inspect", "--topology", topo],
        ["inspect", "--topology", topo, "-v"],
    ] {
        let (code, err) = stderr(&args, None);
        assert_eq!(code, Some(0), "{err}");
        assert!(err.contains(" INFO "), "-v logs info ({args:?}): {err}");
    }
    let (_, err) = stderr(&["inspect", "--topology", topo], Some("info"));
    assert!(err.contains(" INFO "), "$IOREQ_MUX_LOG is read: {err}");
    let (code, err) = stderr(&["inspect", "--topology", topo, "-q"], Some("info"));
    assert_eq!(code, Some(0), "{err}");
    assert!(
        !err.contains(" INFO "),
        "-q wins over $IOREQ_MUX_LOG: {err}"
    );
    let (code, err) = stderr(
        &["replay", "t", "--topology", topo, "--log-level", "x[="],
        None,
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.starts_with("ioreq-mux replay: --log-level 'x[=': "),
        "{err}"
    );
    let (code, err) = stderr(&["inspect", "--topology", topo], Some("x[="));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.starts_with("ioreq-mux inspect: IOREQ_MUX_LOG 'x[=': "),
        "{err}"
    );
}
