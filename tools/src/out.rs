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

/// `12345678` -> `12,345,678`.
/// Every count in a text report is written this way (JSON keeps plain numbers).
#[derive(Debug, Clone, Copy)]
pub struct Thousands(pub u64);

impl std::fmt::Display for Thousands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.0.to_string();
        let mut out = String::with_capacity(s.len() + s.len() / 3);
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        f.pad(&out)
    }
}

/// A progress display on stderr, ticking on its own: a bar with `with_total` as its template
/// when the total is known, else a spinner with `without_total` (indicatif template syntax).
/// Callers show one only when stderr is a terminal.
pub fn progress(
    total: Option<u64>,
    with_total: &str,
    without_total: &str,
) -> indicatif::ProgressBar {
    let (bar, template) = match total {
        Some(n) => (indicatif::ProgressBar::new(n), with_total),
        None => (indicatif::ProgressBar::new_spinner(), without_total),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

#[cfg(test)]
mod tests {
    use super::Thousands;

    #[test]
    fn thousands_separate_every_three_digits() {
        assert_eq!(Thousands(0).to_string(), "0");
        assert_eq!(Thousands(999).to_string(), "999");
        assert_eq!(Thousands(1000).to_string(), "1,000");
        assert_eq!(Thousands(13_768_544).to_string(), "13,768,544");
        assert_eq!(format!("{:>8}", Thousands(1234)), "   1,234");
    }
}
