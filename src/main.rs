//! The `tessera` binary: parse arguments, run, map errors to exit codes (see README).

fn main() {
    std::process::exit(tessera::cli::main());
}
