//! Hidden commands for packaging: `deltadrive man OUTDIR` writes the man pages generated
//! from the clap definitions, `deltadrive completions SHELL` prints a completion script.
//! The package build (`packaging/build-deb.sh`) runs them on the binary it packages, so the
//! pages always match the flags of that binary.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, CommandFactory};

use super::Cli;

#[derive(Args, Debug)]
pub struct ManArgs {
    /// Folder to write deltadrive.1 and deltadrive-SUBCOMMAND.1 into (created if missing)
    pub outdir: PathBuf,
}

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell
    pub shell: clap_complete::Shell,
}

/// Writes one page for the whole program and one for each visible subcommand, nested
/// ones included (`deltadrive-admin-user-add.1`).
pub fn man(args: ManArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.outdir)
        .with_context(|| format!("cannot create {}", args.outdir.display()))?;
    let cmd = Cli::command();
    clap_mangen::generate_to(cmd, &args.outdir)
        .with_context(|| format!("writing man pages into {}", args.outdir.display()))?;
    Ok(())
}

pub fn completions(args: CompletionsArgs) -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "deltadrive", &mut std::io::stdout());
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap's own consistency checks over every subcommand (duplicate flags and the like),
    /// which otherwise fire only when that subcommand's help or man page is rendered.
    #[test]
    fn the_command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
