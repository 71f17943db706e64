//! Command-line basics, running the binary: a reader that closes the pipe early ends a
//! command quietly, and an empty capture is an error, not a clean import of nothing.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;
use common::{bin, repo};
use std::path::PathBuf;
use std::process::Stdio;

/// The commands a user runs (besides `completions` and `man`).
const PUBLIC_COMMANDS: [&str; 7] = [
    "serve",
    "replay",
    "import-qemu-trace",
    "inspect",
    "bench",
    "dm",
    "acpi-tables",
];

fn temp(name: &str) -> PathBuf {
    common::scratch("cli", name)
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

/// Manual pages and completions come from the command line's own definition: every visible
/// command has a page that documents its options, and the completion scripts know them.
#[test]
fn man_pages_and_completions_cover_every_command() {
    let dir = temp("man");
    let out = bin().args(["man", "--out-dir"]).arg(&dir).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let commands = PUBLIC_COMMANDS.iter().chain(&["completions", "man"]);
    let main = std::fs::read_to_string(dir.join("ioreq-mux.1")).unwrap();
    assert!(main.contains(".TH ioreq-mux 1"), "{main}");
    for c in commands {
        let page = std::fs::read_to_string(dir.join(format!("ioreq-mux-{c}.1"))).unwrap();
        assert!(
            page.contains(&format!(".TH ioreq-mux-{c} 1")),
            "{c}: {page}"
        );
        assert!(
            page.contains("log\\-level"),
            "{c}: the logging options are on every page"
        );
        let roff_name = format!("ioreq-mux-{c}(1)").replace('-', "\\-");
        assert!(main.contains(&roff_name), "main page lists {c}");
    }
    let dm = std::fs::read_to_string(dir.join("ioreq-mux-dm.1")).unwrap();
    assert!(dm.contains("Vendor ID of the function"), "{dm}");
    assert!(
        !dir.join("ioreq-mux-replay-dm.1").exists(),
        "the internal command has no page"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = bin().args(["completions", shell]).output().unwrap();
        assert_eq!(out.status.code(), Some(0));
        let script = String::from_utf8_lossy(&out.stdout);
        for word in ["import-qemu-trace", "acpi-tables", "dm-socket", "topology"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
        assert!(
            !script.contains("replay-dm"),
            "{shell}: the internal command is not offered"
        );
    }
}

/// Every command's --help ends with an example of its use, and a mistyped command is never
/// answered with the internal `replay-dm`.
#[test]
fn help_has_examples_and_typos_suggest_only_public_commands() {
    for c in PUBLIC_COMMANDS {
        let out = bin().args([c, "--help"]).output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            help.contains("Example"),
            "{c} --help has no example:\n{help}"
        );
        assert!(
            help.contains(&format!("ioreq-mux {c} ")),
            "{c}: the example runs {c}"
        );
    }
    let out = bin().arg("replay-dn").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.contains("'replay'") && !err.contains("replay-dm"),
        "{err}"
    );
}
