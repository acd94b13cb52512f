//! The `kurz` command line: parse arguments, build a configuration, call into the library.

use clap::Parser;

/// kurz: a URL shortener built as a high-performance redirect front tier.
#[derive(Parser)]
#[command(version, about)]
struct Cli {}

fn main() {
    Cli::parse();
}
