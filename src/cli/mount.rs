//! `deltadrive mount`, `unmount` and `status`.

use std::path::PathBuf;

use clap::Args;

use super::{HomeArg, StatusArgs};

#[derive(Args, Debug)]
pub struct MountArgs {
    /// An existing empty folder to mount the synced folder on
    pub mountpoint: PathBuf,
    #[command(flatten)]
    pub home: HomeArg,
    /// Stay in the foreground instead of returning once the mount is ready
    #[arg(long)]
    pub foreground: bool,
}

#[derive(Args, Debug)]
pub struct UnmountArgs {
    /// The mounted folder
    pub mountpoint: PathBuf,
}

pub fn mount(_args: MountArgs) -> anyhow::Result<()> {
    anyhow::bail!("mount: being written (issue #2)")
}

pub fn unmount(_args: UnmountArgs) -> anyhow::Result<()> {
    anyhow::bail!("unmount: being written (issue #2)")
}

pub fn status(_args: StatusArgs) -> anyhow::Result<()> {
    anyhow::bail!("status: being written (issue #2)")
}
