//! What each stage of a run cost: wall time, rows, peak resident memory, bytes read and spill.
//!
//! A [`Meter`] starts with a stage and samples the process every 25 ms on a thread of its own
//! (resident memory from `/proc/self/statm`, the query engine's spill files on disk), so a
//! stage that peaks briefly is still caught. Bytes read come from `/proc/self/io` (`rchar`:
//! every byte the process read from files, page cache included; reads from S3 sockets are not
//! counted). Off Linux the memory and byte figures are 0.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use datafusion::execution::disk_manager::DiskManager;
use serde::{Deserialize, Serialize};

/// One stage's figures, as `tessera run --json` reports them in `stages`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageStats {
    /// Stage name (`ingest`, `events`, `identity`, …).
    pub stage: String,
    /// Wall time in milliseconds.
    pub ms: u64,
    /// Rows the stage worked through (its input; see README "Performance").
    pub rows: u64,
    /// Highest resident memory of the process while the stage ran, in bytes.
    pub peak_rss_bytes: u64,
    /// Bytes read from files during the stage.
    pub bytes_read: u64,
    /// Most bytes the query engine held in spill files at once during the stage.
    pub spill_bytes: u64,
}

static RELEASE_FREED: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();
static KEEP_FREED_UNDER: AtomicU64 = AtomicU64::new(u64::MAX);

/// Registers how to hand memory the allocator keeps free back to the system. The `tessera`
/// binary's allocator keeps freed pages for reuse (a fresh page costs a fault and zeroing);
/// while a stage runs with more than [`keep_freed_memory_under`] resident, the meter's
/// sampler runs this every time it looks. Only the first registration holds.
pub fn release_freed_memory_with(release: fn()) {
    let _ = RELEASE_FREED.set(release);
}

/// Resident memory under which freed memory stays with the allocator. Every query context
/// Tessera makes sets half its memory limit; until one does, nothing is handed back.
pub fn keep_freed_memory_under(bytes: u64) {
    KEEP_FREED_UNDER.store(bytes, Ordering::Relaxed);
}

/// Measures one stage from [`Meter::start`] to [`Meter::finish`].
pub struct Meter {
    started: Instant,
    read_at_start: u64,
    stop: Arc<AtomicBool>,
    peak_rss: Arc<AtomicU64>,
    peak_spill: Arc<AtomicU64>,
    sampler: Option<JoinHandle<()>>,
}

const SAMPLE_EVERY: Duration = Duration::from_millis(25);

impl Meter {
    /// Starts measuring; `disk` is the query engine's spill manager.
    pub fn start(disk: Arc<DiskManager>) -> Meter {
        let keep_under = KEEP_FREED_UNDER.load(Ordering::Relaxed);
        Self::start_releasing(disk, RELEASE_FREED.get().copied(), keep_under)
    }

    /// [`Meter::start`] with the release hook and its threshold given: each time the sampler
    /// finds more than `keep_under` resident, it runs `release`.
    fn start_releasing(disk: Arc<DiskManager>, release: Option<fn()>, keep_under: u64) -> Meter {
        let stop = Arc::new(AtomicBool::new(false));
        let peak_rss = Arc::new(AtomicU64::new(resident_bytes()));
        let peak_spill = Arc::new(AtomicU64::new(disk.used_disk_space()));
        let sampler = {
            let (stop, peak_rss, peak_spill) = (stop.clone(), peak_rss.clone(), peak_spill.clone());
            std::thread::Builder::new()
                .name("tessera-meter".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let resident = resident_bytes();
                        peak_rss.fetch_max(resident, Ordering::Relaxed);
                        if let (Some(release), true) = (release, resident > keep_under) {
                            release();
                        }
                        peak_spill.fetch_max(disk.used_disk_space(), Ordering::Relaxed);
                        std::thread::park_timeout(SAMPLE_EVERY);
                    }
                })
                .ok()
        };
        Meter {
            started: Instant::now(),
            read_at_start: bytes_read(),
            stop,
            peak_rss,
            peak_spill,
            sampler,
        }
    }

    /// Ends the stage: its figures, `rows` being what it worked through.
    pub fn finish(mut self, stage: &str, rows: u64) -> StageStats {
        let ms = self.started.elapsed().as_millis() as u64;
        self.halt();
        self.peak_rss.fetch_max(resident_bytes(), Ordering::Relaxed);
        StageStats {
            stage: stage.to_string(),
            ms,
            rows,
            peak_rss_bytes: self.peak_rss.load(Ordering::Relaxed),
            bytes_read: bytes_read().saturating_sub(self.read_at_start),
            spill_bytes: self.peak_spill.load(Ordering::Relaxed),
        }
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.sampler.take() {
            handle.thread().unpark();
            let _ = handle.join();
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Resident memory of this process now, in bytes (0 when unknown).
pub fn resident_bytes() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * page_size()
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as u64
    } else {
        4096
    }
}

/// Bytes this process has read from files so far (`rchar`, 0 when unknown).
pub fn bytes_read() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("rchar:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One stage that reads a 4 MiB file and touches a 256 MiB block: its figures, and the
    /// resident memory before it.
    fn measure_one_stage() -> (StageStats, u64) {
        let disk = Arc::new(DiskManager::builder().build().unwrap());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("data");
        std::fs::write(&file, vec![7u8; 4 << 20]).unwrap();
        let before = resident_bytes();
        let meter = Meter::start(disk);
        let read = std::fs::read(&file).unwrap();
        // From the system allocator, which maps blocks this large afresh: the process's own
        // allocator could hand back memory that is still resident.
        let layout = std::alloc::Layout::from_size_align(256 << 20, 4096).unwrap();
        let block = unsafe { std::alloc::GlobalAlloc::alloc(&std::alloc::System, layout) };
        assert!(!block.is_null());
        for i in (0..layout.size()).step_by(4096) {
            unsafe { *block.add(i) = read[i % read.len()] };
        }
        let stats = meter.finish("test", 3);
        unsafe { std::alloc::GlobalAlloc::dealloc(&std::alloc::System, block, layout) };
        (stats, before)
    }

    static RELEASES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    fn count_release() {
        RELEASES.fetch_add(1, Ordering::SeqCst);
    }

    #[test]
    fn freed_memory_is_released_while_more_than_the_threshold_is_resident() {
        let disk = Arc::new(DiskManager::builder().build().unwrap());
        let stage = |keep_under| {
            let before = RELEASES.load(Ordering::SeqCst);
            let meter = Meter::start_releasing(disk.clone(), Some(count_release), keep_under);
            std::thread::sleep(SAMPLE_EVERY * 4);
            meter.finish("t", 0);
            RELEASES.load(Ordering::SeqCst) - before
        };
        // No process is resident in 0 bytes; none in u64::MAX.
        assert_eq!(stage(u64::MAX), 0);
        if resident_bytes() == 0 {
            return; // resident memory unknown here
        }
        assert!(stage(0) >= 1);
    }

    #[test]
    fn a_stage_sees_the_memory_and_reads_it_causes() {
        let (stats, before) = measure_one_stage();
        assert_eq!((stats.stage.as_str(), stats.rows), ("test", 3));
        assert_eq!(stats.spill_bytes, 0);
        if !cfg!(target_os = "linux") {
            return;
        }
        assert!(stats.bytes_read >= 4 << 20, "{stats:?}");
        // Resident memory is the whole process's: a test running alongside can free more than
        // this one touches while it runs (seen: 1 run in 20). Of three tries, one must see the
        // block; a meter that misses memory fails all three.
        let grew =
            |(stats, before): &(StageStats, u64)| stats.peak_rss_bytes >= before + (240 << 20);
        let mut tries = vec![(stats, before)];
        while !tries.iter().any(grew) && tries.len() < 3 {
            tries.push(measure_one_stage());
        }
        assert!(tries.iter().any(grew), "{tries:?}");
    }
}
