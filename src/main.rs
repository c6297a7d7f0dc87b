//! The `tessera` binary: parse arguments, run, map errors to exit codes (see README).

// The allocator decides how much of a run is the kernel zeroing fresh pages. glibc's spent
// about a quarter of a 10M-event run on that and on consolidating free lists; mimalloc, next,
// still a fifth (it maps memory for large Arrow buffers, hands it back soon after and
// faults it in again, partly as 2 MiB transparent huge pages) and kept up to 8.0 GiB
// resident. jemalloc reuses freed extents: at 10M events 37.6-39.6 s instead of 41.0-44.4 s,
// system time 9-13 s instead of 15-21 s, peak RSS 2.7 GiB instead of 5.2-8.0 GiB.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

// jemalloc's defaults hand freed pages back to the kernel within seconds, and blocks over
// 8 MiB (large Arrow buffers) at once, so a stage that frees and allocates batch after batch
// kept faulting in and zeroing fresh pages: kernel time was a sixth of a 100M run's CPU.
// Tessera keeps freed pages, and hands them all back (`purge_freed_pages`) whenever more
// than half the memory limit is resident (see `tessera::metrics`). `_RJEM_MALLOC_CONF`
// still overrides the setting here.
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: ConfText = ConfText(c"dirty_decay_ms:-1,muzzy_decay_ms:-1".as_ptr());

/// jemalloc reads `malloc_conf` as a C `const char *`.
#[repr(transparent)]
struct ConfText(*const std::ffi::c_char);

// SAFETY: it points at a string literal, which is never written.
unsafe impl Sync for ConfText {}

/// Returns the pages jemalloc holds free, in every arena, to the kernel.
fn purge_freed_pages() {
    // MALLCTL_ARENAS_ALL (4096) names every arena. A failure only means the pages stay.
    // SAFETY: a documented jemalloc control that reads and writes no value.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            c"arena.4096.purge".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
}

fn main() {
    tessera::metrics::release_freed_memory_with(purge_freed_pages);
    std::process::exit(tessera::cli::main());
}
