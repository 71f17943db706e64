//! Errors that point into a text file, rendered the way rustc and cargo render theirs:
//! the message, `--> file:line:col`, the lines involved with the offending text underlined,
//! and labels on them (where a conflicting claim was made first, say). The rendering is
//! `annotate-snippets`, the crate rustc's and cargo's own diagnostics use.

use annotate_snippets::{AnnotationKind, Level, Renderer, Snippet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A place in the text with what to say about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    /// Byte range in the file's text.
    pub span: Range<usize>,
    pub label: String,
}

impl Mark {
    pub fn new(span: Range<usize>, label: impl Into<String>) -> Self {
        Mark {
            span,
            label: label.into(),
        }
    }
}

/// One problem in a file: what is wrong, where (the primary mark), and the other places
/// that explain it (context marks).
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// The whole file, to show the lines marked.
    text: String,
    pub message: String,
    pub primary: Mark,
    pub context: Vec<Mark>,
    /// A last line of advice (`help: ...`).
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn new(file: &Path, text: &str, message: impl Into<String>, primary: Mark) -> Self {
        Diagnostic {
            file: file.to_path_buf(),
            text: text.to_string(),
            message: message.into(),
            primary,
            context: vec![],
            help: None,
        }
    }

    /// Adds a place that explains the problem.
    pub fn with_context(mut self, mark: Mark) -> Self {
        self.context.push(mark);
        self
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// Line (from 1) of the primary mark.
    pub fn line(&self) -> usize {
        line_col(&self.text, self.primary.span.start).0
    }

    /// Column (from 1, in characters) of the primary mark.
    pub fn column(&self) -> usize {
        line_col(&self.text, self.primary.span.start).1
    }

    /// The text the primary mark underlines.
    pub fn marked_text(&self) -> &str {
        self.text.get(self.primary.span.clone()).unwrap_or("")
    }
}

/// Line and column (both from 1, the column in characters) of a byte offset in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut at = offset.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

/// Line (from 1) of a byte offset in `text`.
pub fn line_of(text: &str, offset: usize) -> usize {
    line_col(text, offset).0
}

/// A span cut to its first line: a table's span covers the whole table, its header says
/// enough.
pub fn first_line(text: &str, span: Range<usize>) -> Range<usize> {
    let end = text
        .get(span.clone())
        .and_then(|t| t.find('\n'))
        .map_or(span.end, |i| span.start + i);
    span.start..end
}

/// An underline, labelled unless the label is empty.
fn annotation(kind: AnnotationKind, m: &Mark) -> annotate_snippets::Annotation<'_> {
    let a = kind.span(m.span.clone());
    if m.label.is_empty() {
        a
    } else {
        a.label(m.label.as_str())
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.file.display().to_string();
        let mut snippet = Snippet::source(self.text.as_str())
            .path(path.as_str())
            .line_start(1)
            .fold(true)
            .annotation(annotation(AnnotationKind::Primary, &self.primary));
        for m in &self.context {
            snippet = snippet.annotation(annotation(AnnotationKind::Context, m));
        }
        let mut group = Level::ERROR
            .no_name()
            .primary_title(self.message.as_str())
            .element(snippet);
        if let Some(h) = &self.help {
            group = group.element(Level::HELP.message(h.as_str()));
        }
        f.write_str(&Renderer::plain().render(&[group]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_columns_count_from_one() {
        let t = "a = 1\nbé = [\"x\"]\n";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 6), (2, 1));
        // After the two-byte 'é': the column counts characters.
        assert_eq!(line_col(t, t.find('[').unwrap()), (2, 6));
        assert_eq!(first_line(t, 0..t.len()), 0..5);
    }

    #[test]
    fn renders_the_place_and_the_other_place() {
        let t = "[[server]]\nname = \"a\"\nowns.bdf = [\"00:02.0\"]\n[[server]]\nname = \"b\"\nowns.bdf = [\"00:02.0\"]\n";
        let second = t.rfind("\"00:02.0\"").unwrap();
        let first = t.find("\"00:02.0\"").unwrap();
        let d = Diagnostic::new(
            Path::new("t.toml"),
            t,
            "taken twice",
            Mark::new(second..second + 9, "claimed again here"),
        )
        .with_context(Mark::new(first..first + 9, "first claimed here, line 3"));
        assert_eq!((d.line(), d.column()), (6, 13));
        assert_eq!(d.marked_text(), "\"00:02.0\"");
        let r = d.to_string();
        assert!(r.starts_with("taken twice\n"), "{r}");
        assert!(r.contains("--> t.toml:6:13"), "{r}");
        assert!(r.contains("3 | owns.bdf = [\"00:02.0\"]"), "{r}");
        assert!(r.contains("first claimed here, line 3"), "{r}");
        assert!(r.contains("^^^^^^^^^ claimed again here"), "{r}");
    }
}
