//! How a pass over a trace (an import, a replay) shows what it counted: the one number format
//! of every text report, and a progress seam the command-line tool draws on a terminal.
//!
//! The libraries only report progress through [`Progress`]; drawing it (indicatif, on stderr,
//! only when stderr is a terminal) is the binary's job, so a test or another tool that links
//! the importer or the replay does not link a terminal UI.

use std::fmt;
use std::sync::Arc;

/// `12345678` -> `12,345,678`.
/// Every count in a text report is written this way (JSON keeps plain numbers).
#[derive(Debug, Clone, Copy)]
pub struct Thousands(pub u64);

impl fmt::Display for Thousands {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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

/// Where a long pass reports how far it got. `units` are whatever the pass counts (bytes of
/// log text for an import, accesses for a replay); the caller that made the display knows.
pub trait Progress: Send + Sync {
    /// The pass starts; `total` units when known (a bar with a percentage), else `None` (a
    /// spinner).
    fn begin(&self, total: Option<u64>);
    /// `done` units so far, and a short note to show beside them ("12,345 lines").
    fn advance(&self, done: u64, note: &str);
    /// The pass ended (successfully or not): remove the display.
    fn finish(&self);
}

/// A progress display handed to a library: cloned into the pass that uses it.
#[derive(Clone)]
pub struct ProgressHandle(pub Arc<dyn Progress>);

impl fmt::Debug for ProgressHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProgressHandle")
    }
}

impl std::ops::Deref for ProgressHandle {
    type Target = dyn Progress;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
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
