//! Crash-test hooks, off unless their environment variables are set.
//!
//! - `TESSERA_TEST_KILL_AFTER_WRITE=N` sends SIGKILL to this process right after its N-th
//!   write to the output store (data files, log entries, manifests, lease, state), so tests
//!   can stop a real run at every point where a write lands.
//! - `TESSERA_TEST_TRACE_WRITES=1` prints each write, numbered, to stderr.
//! - `TESSERA_TEST_EVENTS_ON_DISK=1` writes the resolved events to the scratch folder even
//!   when they would fit in memory, so small test runs take the path large runs take.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

static WRITES: AtomicU64 = AtomicU64::new(0);

struct Hooks {
    kill_after: Option<u64>,
    trace: bool,
}

fn hooks() -> &'static Hooks {
    static HOOKS: OnceLock<Hooks> = OnceLock::new();
    HOOKS.get_or_init(|| Hooks {
        kill_after: std::env::var("TESSERA_TEST_KILL_AFTER_WRITE")
            .ok()
            .and_then(|v| v.parse().ok()),
        trace: std::env::var_os("TESSERA_TEST_TRACE_WRITES").is_some(),
    })
}

/// Whether the resolved events must go to the scratch folder whatever their size.
pub fn events_on_disk() -> bool {
    std::env::var_os("TESSERA_TEST_EVENTS_ON_DISK").is_some()
}

/// Records one completed write to `what`.
pub fn wrote(what: &str) {
    let hooks = hooks();
    if hooks.kill_after.is_none() && !hooks.trace {
        return;
    }
    let n = WRITES.fetch_add(1, Ordering::SeqCst) + 1;
    if hooks.trace {
        eprintln!("tessera-write {n} {what}");
    }
    if hooks.kill_after == Some(n) {
        eprintln!("tessera-killed after write {n} {what}");
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
