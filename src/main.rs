//! The `deltadrive` binary: parse the command line, set up logging, run, and turn an error
//! into one clear line and a non-zero exit.

use clap::Parser;

fn main() {
    let cli = deltadrive::cli::Cli::parse();
    deltadrive::logging::init();
    if let Err(e) = deltadrive::cli::run(cli) {
        eprintln!("deltadrive: {e:#}");
        std::process::exit(1);
    }
}
