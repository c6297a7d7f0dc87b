//! Predictions: who will buy again, who is slipping away and what each buyer is worth.
//!
//! From the purchase events (`[predictions] purchase_event`, value in the `revenue` property)
//! every buyer is summarised the way the buy-till-you-die literature does: purchases on one
//! UTC day count as one transaction; `frequency` x is the number of transaction days after the
//! first, `recency` t_x the time from the first to the last, `age` T the time from the first to
//! the run's as-of time, and `monetary_value` the mean value of the repeat transactions. BG/NBD
//! ([`model::fit_bgnbd`]) is fitted by maximum likelihood on all buyers and Gamma-Gamma
//! ([`model::fit_gamma_gamma`]) on repeat buyers with a positive value; both go to
//! `prediction_models`, and each buyer's expectations to `predictions`.

pub mod model;

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema};
use chrono::{DateTime, Utc};
use datafusion::prelude::SessionContext;
use serde::Serialize;

use crate::config::PredictionsConfig;
use crate::error::{Error, Result};
use model::{BgNbd, Customer, Fit, GammaGamma};

/// Days in the "month" of the lifetime value horizon.
const MONTH_DAYS: f64 = 30.0;

/// Every buyer's summary, in profile_id order.
#[derive(Debug, Default, Clone)]
pub struct Buyers {
    /// The buyers' profiles.
    pub profile_ids: Vec<String>,
    /// x, t_x and T in the configured time unit.
    pub customers: Vec<Customer>,
    /// Mean value of the repeat transactions (None without repeats or without values).
    pub mean_spend: Vec<Option<f64>>,
}

/// The per-buyer summary SQL over a purchases query (`profile_id`, `timestamp`, `value`).
pub fn summary_sql(purchases: &str) -> String {
    format!(
        r#"
WITH days AS (
    SELECT profile_id, date_trunc('day', "timestamp") AS day, sum(value) AS value
    FROM ({purchases}) p
    GROUP BY profile_id, date_trunc('day', "timestamp")
)
SELECT profile_id,
       count(*) AS days,
       CAST(date_part('epoch', min(day)) AS DOUBLE) AS first_day,
       CAST(date_part('epoch', max(day)) AS DOUBLE) AS last_day,
       CAST(sum(value) AS DOUBLE) AS total_value,
       count(value) AS valued_days,
       CAST(first_value(value ORDER BY day) AS DOUBLE) AS first_value
FROM days
GROUP BY profile_id
ORDER BY profile_id
"#
    )
}

/// Reads the summary rows into [`Buyers`]; `as_of` ends the observation period.
pub fn buyers_from(
    batches: &[RecordBatch],
    as_of: DateTime<Utc>,
    unit_days: f64,
) -> Result<Buyers> {
    let end = as_of.timestamp_micros() as f64 / 1e6;
    let unit = 86_400.0 * unit_days;
    let mut out = Buyers::default();
    for b in batches {
        // profile_id may come back as a view type, depending on how events were scanned.
        let ids = arrow::compute::cast(b.column(0), &DataType::Utf8)?;
        let ids = ids.as_string::<i32>();
        let days = b.column(1).as_primitive::<Int64Type>();
        let first = b.column(2).as_primitive::<Float64Type>();
        let last = b.column(3).as_primitive::<Float64Type>();
        let total = b.column(4).as_primitive::<Float64Type>();
        let valued = b.column(5).as_primitive::<Int64Type>();
        let first_value = b.column(6).as_primitive::<Float64Type>();
        for i in 0..b.num_rows() {
            let x = (days.value(i) - 1).max(0) as f64;
            let t_x = ((last.value(i) - first.value(i)) / unit).max(0.0);
            let t = ((end - first.value(i)) / unit).max(t_x);
            // Repeat transactions' mean value: all valued days but the first.
            let first_valued = first_value.is_valid(i);
            let repeats = valued.value(i) - i64::from(first_valued);
            let repeat_total = if total.is_valid(i) {
                total.value(i)
                    - if first_valued {
                        first_value.value(i)
                    } else {
                        0.0
                    }
            } else {
                0.0
            };
            let mean = (x > 0.0 && repeats > 0).then(|| repeat_total / repeats as f64);
            out.profile_ids.push(ids.value(i).to_string());
            out.customers.push(Customer { x, t_x, t });
            out.mean_spend.push(mean);
        }
    }
    Ok(out)
}

/// What a run's prediction step did, for the run report.
#[derive(Debug, Clone, Serialize)]
pub struct PredictionRun {
    /// Buyers summarised (profiles with a purchase up to the as-of time).
    pub buyers: usize,
    /// Milliseconds spent fitting both models.
    pub fit_ms: u64,
    /// Milliseconds spent computing every buyer's predictions.
    pub predict_ms: u64,
    /// The fitted models.
    pub models: Models,
}

/// The fitted models; either may be missing when the data cannot support it.
#[derive(Debug, Clone, Serialize)]
pub struct Models {
    /// BG/NBD, when fitted.
    pub bgnbd: Option<FitSummary<BgNbdParams>>,
    /// Gamma-Gamma, when fitted.
    pub gamma_gamma: Option<FitSummary<GammaGammaParams>>,
    /// Why BG/NBD was not fitted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bgnbd_error: Option<String>,
    /// Why Gamma-Gamma was not fitted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gamma_gamma_error: Option<String>,
}

/// BG/NBD parameters as printed and stored.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BgNbdParams {
    /// Shape of the purchase-rate gamma distribution.
    pub r: f64,
    /// Scale of the purchase-rate gamma distribution (in the time unit).
    pub alpha: f64,
    /// Beta distribution of the drop-out probability: a.
    pub a: f64,
    /// Beta distribution of the drop-out probability: b.
    pub b: f64,
}

/// Gamma-Gamma parameters as printed and stored.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct GammaGammaParams {
    /// Shape of the per-transaction spend.
    pub p: f64,
    /// Shape of the customers' spend scale distribution.
    pub q: f64,
    /// Scale of the customers' spend scale distribution.
    pub gamma: f64,
}

/// One fitted model with its diagnostics.
#[derive(Debug, Clone, Serialize)]
pub struct FitSummary<P> {
    /// The parameters.
    #[serde(flatten)]
    pub params: P,
    /// Log-likelihood at the optimum.
    pub log_likelihood: f64,
    /// Optimiser iterations.
    pub iterations: u32,
    /// Customers the model was fitted on.
    pub customers: usize,
    /// Whether the optimiser met its tolerance and the fit is not degenerate.
    pub converged: bool,
    /// Why the fit is degenerate (a parameter at a bound of the search, or no drop-out at
    /// all), when it is: the optimum exists but the data do not pin the model down.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub degenerate: Option<String>,
}

/// Parameters within this factor of the search's bounds (1e-6 and 1e6) sit at a bound.
const NEAR_BOUND: f64 = 10.0;
/// A mean drop-out probability per purchase below this says nobody ever leaves.
const NO_DROP_OUT: f64 = 1e-4;

/// Names the parameters that sit at a bound of the search.
fn at_bound(named: &[(&str, f64)]) -> Option<String> {
    let (lo, hi) = model::param_bounds();
    let stuck: Vec<String> = named
        .iter()
        .filter(|(_, v)| !v.is_finite() || *v <= lo * NEAR_BOUND || *v >= hi / NEAR_BOUND)
        .map(|(n, v)| format!("{n} = {v:.3e} at a bound of the search"))
        .collect();
    (!stuck.is_empty()).then(|| stuck.join(", "))
}

/// Why a BG/NBD fit is degenerate, if it is.
fn bgnbd_degenerate(p: &BgNbdParams) -> Option<String> {
    let drop_out = p.a / (p.a + p.b);
    let mut why: Vec<String> = at_bound(&[("r", p.r), ("alpha", p.alpha), ("a", p.a), ("b", p.b)])
        .into_iter()
        .collect();
    if drop_out < NO_DROP_OUT {
        why.push(format!(
            "a = {:.3e} and b = {:.3e} give a mean drop-out probability per purchase of {drop_out:.1e}: \
             the model says buyers never leave",
            p.a, p.b
        ));
    }
    (!why.is_empty()).then(|| why.join("; "))
}

/// Why a Gamma-Gamma fit is degenerate, if it is.
fn gamma_gamma_degenerate(p: &GammaGammaParams) -> Option<String> {
    let mut why: Vec<String> = at_bound(&[("p", p.p), ("q", p.q), ("gamma", p.gamma)])
        .into_iter()
        .collect();
    if p.q <= 1.0 {
        why.push(format!(
            "q = {:.3} is at most 1: the mean spend is infinite",
            p.q
        ));
    }
    (!why.is_empty()).then(|| why.join("; "))
}

fn summary<P, Q>(fit: &Fit<P>, params: Q, degenerate: Option<String>) -> FitSummary<Q> {
    FitSummary {
        params,
        log_likelihood: fit.log_likelihood,
        iterations: fit.iterations,
        customers: fit.customers,
        converged: fit.converged && degenerate.is_none(),
        degenerate,
    }
}

/// Fits both models; `mean_spend[i]` belongs to `customers[i]`.
pub fn fit(
    customers: &[Customer],
    mean_spend: &[Option<f64>],
) -> (Option<BgNbd>, Option<GammaGamma>, Models) {
    let (bg, bg_summary) = match model::fit_bgnbd(customers) {
        Ok(f) => {
            let p = BgNbdParams {
                r: f.params.r,
                alpha: f.params.alpha,
                a: f.params.a,
                b: f.params.b,
            };
            let s = summary(&f, p, bgnbd_degenerate(&p));
            (Some(f.params), Ok(s))
        }
        Err(e) => (None, Err(e.to_string())),
    };
    let spend: Vec<(f64, f64)> = customers
        .iter()
        .zip(mean_spend)
        .filter_map(|(c, m)| match m {
            Some(m) if c.x > 0.0 && *m > 0.0 && m.is_finite() => Some((c.x, *m)),
            _ => None,
        })
        .collect();
    let (gg, gg_summary) = match model::fit_gamma_gamma(&spend) {
        Ok(f) => {
            let p = GammaGammaParams {
                p: f.params.p,
                q: f.params.q,
                gamma: f.params.gamma,
            };
            let s = summary(&f, p, gamma_gamma_degenerate(&p));
            (Some(f.params), Ok(s))
        }
        Err(e) => (None, Err(e.to_string())),
    };
    (
        bg,
        gg,
        Models {
            bgnbd: bg_summary.as_ref().ok().cloned(),
            bgnbd_error: bg_summary.err(),
            gamma_gamma: gg_summary.as_ref().ok().cloned(),
            gamma_gamma_error: gg_summary.err(),
        },
    )
}

/// The `predictions` table's schema.
pub fn predictions_schema() -> Schema {
    let f = |name: &str, dt: DataType| Field::new(name, dt, true);
    Schema::new(vec![
        Field::new("profile_id", DataType::Utf8, false),
        f("frequency", DataType::Int64),
        f("recency", DataType::Float64),
        f("age", DataType::Float64),
        f("monetary_value", DataType::Float64),
        f("expected_purchases_30d", DataType::Float64),
        f("expected_purchases_90d", DataType::Float64),
        f("expected_purchases_365d", DataType::Float64),
        f("p_alive", DataType::Float64),
        f("churn_risk", DataType::Float64),
        f("expected_spend", DataType::Float64),
        f("clv", DataType::Float64),
    ])
}

/// One buyer's predictions (columns after the summary ones).
#[derive(Debug, Clone, Copy, Default)]
struct Row {
    expected: [Option<f64>; 3],
    p_alive: Option<f64>,
    spend: Option<f64>,
    clv: Option<f64>,
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

fn predict_one(
    bg: Option<&BgNbd>,
    gg: Option<&GammaGamma>,
    c: &Customer,
    mean: Option<f64>,
    config: &PredictionsConfig,
) -> Row {
    let unit = config.time_unit.days();
    let mut row = Row::default();
    if let Some(bg) = bg {
        for (slot, days) in row.expected.iter_mut().zip([30.0, 90.0, 365.0]) {
            *slot = finite(bg.expected_purchases(c, days / unit));
        }
        row.p_alive = finite(bg.p_alive(c));
    }
    if let Some(gg) = gg {
        // A buyer without valued repeat purchases gets the population's mean spend.
        let spend = match mean {
            Some(m) if c.x > 0.0 && m > 0.0 => gg.expected_spend(c.x, m),
            _ => gg.expected_spend(0.0, 0.0),
        };
        row.spend = finite(spend);
        if let Some(bg) = bg {
            let purchases = model::discounted_purchases(
                bg,
                c,
                config.clv_months,
                MONTH_DAYS / unit,
                config.discount_rate,
            );
            row.clv = finite(purchases * spend);
        }
    }
    row
}

/// Every buyer's predictions, computed on all cores.
pub fn predictions(
    buyers: &Buyers,
    bg: Option<&BgNbd>,
    gg: Option<&GammaGamma>,
    config: &PredictionsConfig,
) -> Result<RecordBatch> {
    let n = buyers.customers.len();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = n.div_ceil(threads).max(1024);
    let mut rows = vec![Row::default(); n];
    std::thread::scope(|scope| {
        for (out, (cs, ms)) in rows.chunks_mut(chunk).zip(
            buyers
                .customers
                .chunks(chunk)
                .zip(buyers.mean_spend.chunks(chunk)),
        ) {
            scope.spawn(move || {
                for ((slot, c), m) in out.iter_mut().zip(cs).zip(ms) {
                    *slot = predict_one(bg, gg, c, *m, config);
                }
            });
        }
    });
    let column = |f: &dyn Fn(&Row) -> Option<f64>| -> ArrayRef {
        Arc::new(rows.iter().map(f).collect::<Float64Array>())
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(&buyers.profile_ids)),
        Arc::new(
            buyers
                .customers
                .iter()
                .map(|c| Some(c.x as i64))
                .collect::<Int64Array>(),
        ),
        Arc::new(
            buyers
                .customers
                .iter()
                .map(|c| Some(c.t_x))
                .collect::<Float64Array>(),
        ),
        Arc::new(
            buyers
                .customers
                .iter()
                .map(|c| Some(c.t))
                .collect::<Float64Array>(),
        ),
        Arc::new(buyers.mean_spend.iter().copied().collect::<Float64Array>()),
        column(&|r| r.expected[0]),
        column(&|r| r.expected[1]),
        column(&|r| r.expected[2]),
        column(&|r| r.p_alive),
        column(&|r| r.p_alive.map(|p| 1.0 - p)),
        column(&|r| r.spend),
        column(&|r| r.clv),
    ];
    Ok(RecordBatch::try_new(
        Arc::new(predictions_schema()),
        columns,
    )?)
}

/// The `prediction_models` table: (model, parameter, value, run_id) rows.
pub fn models_batch(
    models: &Models,
    unit_days: f64,
    buyers: usize,
    run_id: &str,
) -> Result<RecordBatch> {
    let mut rows: Vec<(&str, &str, f64)> = Vec::new();
    match &models.bgnbd {
        Some(s) => {
            rows.extend([
                ("bgnbd", "r", s.params.r),
                ("bgnbd", "alpha", s.params.alpha),
                ("bgnbd", "a", s.params.a),
                ("bgnbd", "b", s.params.b),
            ]);
            push_diagnostics(
                &mut rows,
                "bgnbd",
                s.log_likelihood,
                s.iterations,
                s.customers,
                s.converged,
            );
        }
        None => push_diagnostics(&mut rows, "bgnbd", f64::NAN, 0, buyers, false),
    }
    rows.push(("bgnbd", "time_unit_days", unit_days));
    match &models.gamma_gamma {
        Some(s) => {
            rows.extend([
                ("gamma_gamma", "p", s.params.p),
                ("gamma_gamma", "q", s.params.q),
                ("gamma_gamma", "gamma", s.params.gamma),
            ]);
            push_diagnostics(
                &mut rows,
                "gamma_gamma",
                s.log_likelihood,
                s.iterations,
                s.customers,
                s.converged,
            );
        }
        None => push_diagnostics(&mut rows, "gamma_gamma", f64::NAN, 0, 0, false),
    }
    let schema = Schema::new(vec![
        Field::new("model", DataType::Utf8, false),
        Field::new("parameter", DataType::Utf8, false),
        Field::new("value", DataType::Float64, true),
        Field::new("run_id", DataType::Utf8, false),
    ]);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
        Arc::new(rows.iter().map(|r| finite(r.2)).collect::<Float64Array>()),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|_| run_id))),
    ];
    Ok(RecordBatch::try_new(Arc::new(schema), columns)?)
}

fn push_diagnostics(
    rows: &mut Vec<(&'static str, &'static str, f64)>,
    model: &'static str,
    log_likelihood: f64,
    iterations: u32,
    customers: usize,
    converged: bool,
) {
    rows.extend([
        (model, "log_likelihood", log_likelihood),
        (model, "iterations", f64::from(iterations)),
        (model, "customers", customers as f64),
        (model, "converged", if converged { 1.0 } else { 0.0 }),
    ]);
}

/// `tessera predict fit --summary FILE`: reads per-customer summaries (CSV with a header, or
/// Parquet) with columns `x`, `t_x`, `T` and optionally `zbar`, and fits the models.
pub async fn fit_summary_file(path: &std::path::Path) -> Result<Models> {
    let ctx = SessionContext::new();
    let shown = path.display().to_string();
    if !path.exists() {
        return Err(Error::Usage(format!(
            "{shown}: no such file; pass a CSV or Parquet file with columns x, t_x, T (and optionally zbar)"
        )));
    }
    let is_parquet = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"));
    let location = path.to_string_lossy().to_string();
    let df = if is_parquet {
        ctx.read_parquet(location, Default::default()).await
    } else {
        ctx.read_csv(location, Default::default()).await
    }
    .map_err(|e| Error::Usage(format!("{shown}: cannot read it: {e}")))?;
    let names: Vec<String> = df
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    // An exact name first, else the same name in another case (`t` for `T`).
    let find = |wanted: &str| -> Option<String> {
        names
            .iter()
            .find(|n| n.as_str() == wanted)
            .or_else(|| names.iter().find(|n| n.eq_ignore_ascii_case(wanted)))
            .cloned()
    };
    let mut columns = Vec::new();
    for wanted in ["x", "t_x", "T"] {
        let Some(name) = find(wanted) else {
            return Err(Error::Usage(format!(
                "{shown}: no column `{wanted}` (found: {}); the file needs x (repeat purchases), t_x (time of the last purchase) and T (age), in one time unit",
                names.join(", ")
            )));
        };
        columns.push(name);
    }
    let zbar = find("zbar");
    let mut select = columns.clone();
    select.extend(zbar.clone());
    let exprs: Vec<datafusion::prelude::Expr> = select
        .iter()
        .map(|n| {
            datafusion::logical_expr::cast(
                datafusion::prelude::Expr::Column(datafusion::common::Column::new_unqualified(n)),
                DataType::Float64,
            )
        })
        .collect();
    let batches = df
        .select(exprs)?
        .collect()
        .await
        .map_err(|e| Error::Usage(format!("{shown}: {e}")))?;
    let mut customers = Vec::new();
    let mut mean_spend = Vec::new();
    for b in &batches {
        let col = |i: usize| b.column(i).as_primitive::<Float64Type>();
        let (x, t_x, t) = (col(0), col(1), col(2));
        for i in 0..b.num_rows() {
            let row = customers.len() + 2; // the header is line 1
            if x.is_null(i) || t_x.is_null(i) || t.is_null(i) {
                return Err(Error::Usage(format!(
                    "{shown}: row {row} has an empty or non-numeric x, t_x or T; every customer needs all three"
                )));
            }
            customers.push(Customer {
                x: x.value(i),
                t_x: t_x.value(i),
                t: t.value(i),
            });
            mean_spend.push(if zbar.is_some() && col(3).is_valid(i) {
                Some(col(3).value(i))
            } else {
                None
            });
        }
    }
    let (_, _, mut models) = fit(&customers, &mean_spend);
    if zbar.is_none() {
        models.gamma_gamma = None;
        models.gamma_gamma_error =
            Some("no zbar column: Gamma-Gamma needs the mean spend of repeat purchases".into());
    }
    if let Some(e) = &models.bgnbd_error {
        return Err(Error::Usage(format!("{shown}: {e}")));
    }
    Ok(models)
}
