//! What the tests that run the `ioreq-mux` binary share: the binary, the repository's files,
//! and a scratch directory of their own. (Each test file is its own crate and uses only some
//! of these.)

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ioreq-mux"))
}

/// A file of the repository (configs/, traces/, ...).
pub fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
}

/// `name` in a scratch directory of this test process (`what` tells the test files apart).
pub fn scratch(what: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ioreq-mux-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}
