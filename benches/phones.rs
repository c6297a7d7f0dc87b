//! `cargo bench --bench phones`: how fast the phone normaliser turns typed numbers into E.164.
//!
//! Identity normalises every phone of every event, so this is on the resolver's hot path. Three
//! mixes are timed on one thread, in CPU time (so other work on the machine does not count), each
//! value normalised once:
//! - `e164`: numbers already in E.164 (what most SDKs send; the fast path, no parsing);
//! - `generator`: the mix `tessera generate` writes (a quarter E.164, the rest typed the US way:
//!   `+1 (201) 200-0000`, `201.200.0000`, `(201) 200-0000`), over real area codes, plus 5% typed
//!   internationally (`+44 (0) 20 …`, `0044 …`, `011 44 …`) and 5% junk (`n/a`,
//!   `123-456-7890`, `12345`);
//! - `typed`: the same without the E.164 quarter (every value is parsed).
//!
//! Settings (environment):
//! - TESSERA_BENCH_PHONES: values per mix (default 200000).

use std::hint::black_box;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tessera::config::Normalize;
use tessera::stages::identity::normalize::normalize;

/// Area codes in service in the United States.
const AREAS: &[u32] = &[
    201, 202, 203, 205, 206, 207, 208, 209, 210, 212, 213, 214, 215, 216, 217, 218, 219, 224, 225,
    228, 229, 231, 234, 239, 240, 248, 251, 252, 253, 254, 256, 260, 262, 267, 269, 270, 272, 281,
    301, 312, 415, 503, 510, 512, 617, 646, 702, 718, 773, 818, 917,
];

/// This thread's CPU time in seconds.
fn cpu_seconds() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// A North American number of the generator's shape: a local part from 2000000.
fn e164(rng: &mut ChaCha8Rng) -> String {
    let area = AREAS[rng.gen_range(0..AREAS.len())];
    let local = rng.gen_range(2_000_000..10_000_000);
    format!("+1{area}{local:07}")
}

fn typed(rng: &mut ChaCha8Rng, e164: &str) -> String {
    let d = &e164[2..];
    match rng.gen_range(0..3) {
        0 => format!("+1 ({}) {}-{}", &d[0..3], &d[3..6], &d[6..10]),
        1 => format!("{}.{}.{}", &d[0..3], &d[3..6], &d[6..10]),
        _ => format!("({}) {}-{}", &d[0..3], &d[3..6], &d[6..10]),
    }
}

fn other(rng: &mut ChaCha8Rng) -> String {
    let n: u32 = rng.gen_range(1000..10_000);
    match rng.gen_range(0..6) {
        0 => format!("+44 (0) 20 7946 {n}"),
        1 => format!("0044 20 7946 {n}"),
        2 => format!("011 44 20 7946 {n}"),
        3 => "n/a".to_string(),
        4 => "123-456-7890".to_string(),
        _ => n.to_string(),
    }
}

fn mix(name: &str, count: usize, rng: &mut ChaCha8Rng) -> Vec<String> {
    (0..count)
        .map(|_| {
            let number = e164(rng);
            let roll: f64 = rng.gen();
            match name {
                "e164" => number,
                "generator" if roll < 0.25 => number,
                _ if roll < 0.90 => typed(rng, &number),
                _ => other(rng),
            }
        })
        .collect()
}

fn main() {
    let count: usize = std::env::var("TESSERA_BENCH_PHONES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    println!("mix,values,kept,ns_per_value,values_per_second");
    for name in ["e164", "generator", "typed"] {
        let values = mix(name, count, &mut rng);
        // One untimed pass loads the metadata and warms the caches.
        for v in values.iter().take(1000) {
            black_box(normalize(Normalize::Phone, v, "1").ok());
        }
        let started = cpu_seconds();
        let mut kept = 0usize;
        for v in &values {
            if black_box(normalize(Normalize::Phone, black_box(v), "1")).is_ok() {
                kept += 1;
            }
        }
        let seconds = cpu_seconds() - started;
        println!(
            "{name},{count},{kept},{:.0},{:.0}",
            seconds * 1e9 / count as f64,
            count as f64 / seconds
        );
    }
}
