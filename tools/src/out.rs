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

pub use ioreq_mux_trace::Thousands;
use ioreq_mux_trace::{Progress, ProgressHandle};

fn style(bar: &indicatif::ProgressBar, total: Option<u64>, with_total: &str, without_total: &str) {
    let template = match total {
        Some(n) => {
            bar.set_length(n);
            with_total
        }
        None => {
            bar.unset_length();
            without_total
        }
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
}

/// The libraries' [`Progress`] drawn by indicatif with one command's templates.
struct Bar {
    bar: indicatif::ProgressBar,
    with_total: &'static str,
    without_total: &'static str,
}

impl Progress for Bar {
    fn begin(&self, total: Option<u64>) {
        style(&self.bar, total, self.with_total, self.without_total);
        self.bar
            .set_draw_target(indicatif::ProgressDrawTarget::stderr());
        self.bar
            .enable_steady_tick(std::time::Duration::from_millis(200));
    }
    fn advance(&self, done: u64, note: &str) {
        self.bar.set_position(done);
        if !note.is_empty() {
            self.bar.set_message(note.to_owned());
        }
    }
    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// A progress display for a library pass, drawn only when stderr is a terminal.
pub fn progress_handle(
    with_total: &'static str,
    without_total: &'static str,
) -> Option<ProgressHandle> {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal().then(|| {
        ProgressHandle(std::sync::Arc::new(Bar {
            bar: indicatif::ProgressBar::hidden(),
            with_total,
            without_total,
        }))
    })
}
