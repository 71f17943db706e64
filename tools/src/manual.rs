//! Manual pages and shell completions, made from the command line's own definition (clap's
//! `Command`), so they cannot drift from what the binary accepts: `clap_mangen` writes the
//! roff, `clap_complete` the completion scripts. A distribution package runs
//! `ioreq-mux man --out-dir debian/tmp/usr/share/man/man1` and
//! `ioreq-mux completions bash > .../bash-completion/completions/ioreq-mux` at build time.

use clap::Command;
use clap_complete::Shell;
use std::io;
use std::path::{Path, PathBuf};

/// `ioreq-mux completions SHELL`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
    ioreq-mux completions bash > /etc/bash_completion.d/ioreq-mux\n  \
    ioreq-mux completions zsh > ~/.zfunc/_ioreq-mux")]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// `ioreq-mux man`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
    ioreq-mux man | man -l -\n  \
    ioreq-mux man --out-dir /usr/local/share/man/man1")]
pub struct ManArgs {
    /// Write ioreq-mux.1 and one page per command (ioreq-mux-serve.1, ...) here; without it,
    /// the main page goes to standard output.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

/// The completion script for `shell`.
pub fn completions(cmd: &mut Command, shell: Shell) -> Vec<u8> {
    let mut out = Vec::new();
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, cmd, name, &mut out);
    out
}

/// The roff of one page.
pub fn page(cmd: Command) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd).render(&mut out)?;
    Ok(out)
}

/// Writes the main page and one per visible subcommand (`NAME-SUB.1`) into `dir`; returns
/// the files written.
pub fn write_pages(cmd: &Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd.clone();
    cmd.build();
    let name = cmd.get_name().to_string();
    let mut written = vec![write_page(dir, &name, cmd.clone())?];
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let sub_name = format!("{name}-{}", sub.get_name());
        let page_cmd = sub
            .clone()
            .name(sub_name.clone())
            .bin_name(sub_name.clone());
        written.push(write_page(dir, &sub_name, page_cmd)?);
    }
    Ok(written)
}

fn write_page(dir: &Path, name: &str, cmd: Command) -> io::Result<PathBuf> {
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, page(cmd)?)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    Ok(path)
}
