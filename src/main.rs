//! The `deltadrive` binary: parse the command line, set up logging, run, and turn an error
//! into one clear line and a non-zero exit.

use clap::Parser;

/// mimalloc keeps freed memory for reuse: sealing and uploading a big file allocates tens of
/// MiB at a time, which glibc's per-thread arenas give back to the kernel and fault in again.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = deltadrive::cli::Cli::parse();
    deltadrive::logging::init();
    if let Err(e) = deltadrive::cli::run(cli) {
        eprintln!("deltadrive: {e:#}");
        std::process::exit(1);
    }
}
