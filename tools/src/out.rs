//! A command's report on standard output. A reader that goes away early (`ioreq-mux replay
//! ... | head -2`) is not our failure: the command stops quietly with exit status 0, as
//! `cat` does. Rust ignores SIGPIPE, so `println!` would panic there instead (exit 101).

use std::io::{ErrorKind, Write};

/// Writes `text` to standard output and flushes it. A closed pipe ends the process quietly
/// (status 0); any other write error ends it with a message and status 1.
pub fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("ioreq-mux: writing to standard output: {e}");
            std::process::exit(1)
        }
    }
}

/// `println!` through [`print`].
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::out::print(&format!("{}\n", format_args!($($arg)*)))
    };
}
