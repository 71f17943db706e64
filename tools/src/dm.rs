//! Placeholder (being written).
#[derive(clap::Args, Debug)]
pub struct DmArgs {}
pub fn run(_a: &DmArgs) -> std::process::ExitCode {
    std::process::ExitCode::from(2)
}
