//! The `tessera` binary: parse arguments, run, map errors to exit codes (see README).

// glibc's allocator spent about a quarter of a 10M-event run zeroing fresh pages and
// consolidating free lists (perf); mimalloc reuses memory across Arrow batches.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(tessera::cli::main());
}
