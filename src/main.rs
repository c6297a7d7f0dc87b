//! The `tessera` binary: parse arguments, run, map errors to exit codes (see README).

// The allocator decides how much of a run is the kernel zeroing fresh pages. glibc's spent
// about a quarter of a 10M-event run on that and on consolidating free lists; mimalloc, next,
// still a fifth (it maps memory for large Arrow buffers, hands it back soon after and
// faults it in again, partly as 2 MiB transparent huge pages) and kept up to 8.0 GiB
// resident. jemalloc reuses freed extents: at 10M events 37.6-39.6 s instead of 41.0-44.4 s,
// system time 9-13 s instead of 15-21 s, peak RSS 2.7 GiB instead of 5.2-8.0 GiB.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    std::process::exit(tessera::cli::main());
}
