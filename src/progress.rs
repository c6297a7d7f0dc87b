//! Progress bars for long steps (indicatif), silent under `--quiet`, `--json` or without a terminal.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Hands out progress bars, or hidden ones when progress is off.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    enabled: bool,
}

impl Progress {
    /// Progress shown on stderr when `enabled` (and stderr is a terminal).
    pub fn new(enabled: bool) -> Self {
        Progress { enabled }
    }

    /// No progress at all (for embedding and tests).
    pub fn hidden() -> Self {
        Progress { enabled: false }
    }

    /// A spinner for a step of unknown length.
    pub fn spinner(&self, message: &str) -> ProgressBar {
        let bar = self.make(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("static template"),
        );
        bar.set_message(message.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    }

    /// A bar counting `len` items.
    pub fn bar(&self, message: &str, len: u64) -> ProgressBar {
        let bar = self.make(ProgressBar::new(len));
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({elapsed})")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.set_message(message.to_string());
        bar
    }

    fn make(&self, bar: ProgressBar) -> ProgressBar {
        if self.enabled {
            bar.set_draw_target(ProgressDrawTarget::stderr());
        } else {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        bar
    }
}
