//! The warnings a run gives about its results, beside its errors: things that did not fail the
//! run but make a table mean something other than what its user expects. An as-of far after the
//! newest event empties every "last N days" segment; a model fit that ran into its parameter
//! bounds gives every buyer the same P(alive); a segment that empties or halves in one run is
//! more often a broken input than a real change. They go in the run summary, the `--json`
//! report and `runs.warnings` (JSON text), where the HTML report shows them.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::WarningsConfig;
use crate::stages::predict::Models;

/// One warning of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Warning {
    /// What kind: `as_of_after_events`, `model_degenerate`, `segment_empty`, `segment_changed`.
    pub kind: &'static str,
    /// What it is about: `events`, `bgnbd`, `gamma_gamma`, `segments.<name>`.
    pub subject: String,
    /// What happened and what it means, for a person.
    pub message: String,
}

/// Warns when the as-of is more than the configured days after the newest event: every window
/// measured back from the as-of then finds nothing, and recency grows for everyone.
pub fn as_of_gap(
    newest: Option<DateTime<Utc>>,
    as_of: DateTime<Utc>,
    config: &WarningsConfig,
) -> Option<Warning> {
    let newest = newest?;
    let gap = as_of - newest;
    if gap <= chrono::Duration::days(i64::from(config.as_of_gap_days)) {
        return None;
    }
    Some(Warning {
        kind: "as_of_after_events",
        subject: "events".into(),
        message: format!(
            "the as-of {} is {} days after the newest event ({}): windows counted back from the as-of \
             (\"the last 30 days\") find no events and every buyer looks lapsed; pass the time the data \
             ends with `tessera run --as-of {}` when working on a sample or a late export",
            as_of.format("%Y-%m-%d %H:%M:%SZ"),
            gap.num_days(),
            newest.format("%Y-%m-%d %H:%M:%SZ"),
            (newest + chrono::Duration::days(1)).format("%Y-%m-%d"),
        ),
    })
}

/// Warns about a recomputed segment that is empty, or whose size moved by more than the
/// configured share since the published version; `before` is `None` for a segment that had no
/// published version (a new file), which cannot have changed.
pub fn segment_size(
    name: &str,
    before: Option<usize>,
    after: usize,
    config: &WarningsConfig,
) -> Option<Warning> {
    let subject = format!("segments.{name}");
    if after == 0 {
        return Some(Warning {
            kind: "segment_empty",
            subject,
            message: format!(
                "segment `{name}` has no members{}: check its conditions against the data and the as-of",
                match before {
                    Some(b) if b > 0 => format!(" (it had {b})"),
                    _ => String::new(),
                }
            ),
        });
    }
    let before = before.filter(|b| *b > 0)?;
    let change = (after as f64 - before as f64) / before as f64 * 100.0;
    if change.abs() <= config.segment_change_percent {
        return None;
    }
    Some(Warning {
        kind: "segment_changed",
        subject,
        message: format!(
            "segment `{name}` went from {before} to {after} members ({change:+.0}%, more than the {}% of \
             warnings.segment_change_percent) in one run",
            config.segment_change_percent
        ),
    })
}

/// A warning for each fitted model whose fit was found degenerate (see
/// [`crate::stages::predict`]): its columns are computed but say little.
pub fn models(models: &Models) -> Vec<Warning> {
    let mut found = Vec::new();
    if let Some(why) = models.bgnbd.as_ref().and_then(|m| m.degenerate.clone()) {
        found.push(Warning {
            kind: "model_degenerate",
            subject: "bgnbd".into(),
            message: format!(
                "BG/NBD fit is degenerate ({why}); it is marked not converged. `p_alive` is close to 1 \
                 for every buyer and `expected_purchases` only follows past frequency, so segments on \
                 P(alive) (such as valuable_at_risk) find nobody. More history (buyers with a longer \
                 gap since their last purchase) or time_unit = \"days\" may give a usable fit"
            ),
        });
    }
    if let Some(why) = models
        .gamma_gamma
        .as_ref()
        .and_then(|m| m.degenerate.clone())
    {
        found.push(Warning {
            kind: "model_degenerate",
            subject: "gamma_gamma".into(),
            message: format!(
                "Gamma-Gamma fit is degenerate ({why}); it is marked not converged. \
                 The data show no spread in spend between buyers: `expected_spend` is about the \
                 population's mean spend for every buyer, so `clv` ranks buyers only by their \
                 expected purchases"
            ),
        });
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_as_of_long_after_the_events_warns_and_a_close_one_does_not() {
        let config = WarningsConfig::default();
        let newest = "2026-10-30T12:00:00Z".parse::<DateTime<Utc>>().unwrap();
        let close = "2026-11-05T00:00:00Z".parse().unwrap();
        assert_eq!(as_of_gap(Some(newest), close, &config), None);
        let far = "2026-12-07T00:00:00Z".parse().unwrap();
        let w = as_of_gap(Some(newest), far, &config).unwrap();
        assert!(w.message.contains("37 days"), "{}", w.message);
        assert!(w.message.contains("--as-of 2026-10-31"), "{}", w.message);
        assert_eq!(as_of_gap(None, far, &config), None);
    }

    #[test]
    fn segments_warn_when_empty_or_changed_past_the_threshold() {
        let config = WarningsConfig::default();
        assert_eq!(
            segment_size("a", None, 0, &config).unwrap().kind,
            "segment_empty"
        );
        assert_eq!(segment_size("a", None, 5, &config), None);
        assert_eq!(segment_size("a", Some(100), 150, &config), None);
        assert_eq!(
            segment_size("a", Some(100), 151, &config).unwrap().kind,
            "segment_changed"
        );
        assert_eq!(
            segment_size("a", Some(100), 49, &config).unwrap().kind,
            "segment_changed"
        );
        assert_eq!(segment_size("a", Some(0), 49, &config), None);
    }
}
