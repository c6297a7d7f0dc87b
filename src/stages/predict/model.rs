//! Buy-till-you-die models for customer lifetime value: the BG/NBD model of
//! repeat-purchase counts and the Gamma-Gamma model of spend per purchase,
//! both fitted by maximum likelihood. Only `std` is used.
//!
//! # Data and time units
//!
//! Each customer is summarised over an observation window by
//!
//! * `x`: number of *repeat* purchases (all purchases after the first one),
//!   a whole number;
//! * `t_x`: time of the last repeat purchase, measured from the first
//!   purchase (0 when `x` = 0);
//! * `T` (field `t`): age of the customer, the time from the first purchase
//!   to the end of the window.
//!
//! `t_x`, `T`, prediction horizons and period lengths must all use one time
//! unit (days, weeks, ...). The BG/NBD scale parameter `alpha` carries that
//! unit: the same data in days instead of weeks gives `alpha` seven times
//! larger and the same `r`, `a`, `b`. `p` and `q` are unitless, `gamma` is in
//! money units.
//!
//! # BG/NBD
//!
//! Fader, P. S., Hardie, B. G. S. and Lee, K. L. (2005), "'Counting Your
//! Customers' the Easy Way: An Alternative to the Pareto/NBD Model",
//! *Marketing Science* 24(2), 275-284. While alive a customer buys as a
//! Poisson process with rate `λ ~ Gamma(r, alpha)`; after each repeat
//! purchase the customer drops out for good with probability
//! `p ~ Beta(a, b)`. With `B` the beta function and `2F1` Gauss's
//! hypergeometric function, the formulas of the paper used here are:
//!
//! * likelihood of one customer:
//!   `L = B(a, b+x)/B(a, b) · Γ(r+x) α^r / (Γ(r) (α+T)^(r+x))
//!      + [x > 0] · B(a+1, b+x-1)/B(a, b) · Γ(r+x) α^r / (Γ(r) (α+t_x)^(r+x))`;
//! * probability of being alive at `T`:
//!   `P(alive) = 1 / (1 + [x > 0] · a/(b+x-1) · ((α+T)/(α+t_x))^(r+x))`;
//! * expected purchases in `(T, T+t]` (the conditional expectation):
//!   `E[Y(t) | x, t_x, T] = P(alive) · (a+b+x-1)/(a-1)
//!      · (1 - ((α+T)/(α+T+t))^(r+x) · 2F1(r+x, b+x; a+b+x-1; t/(α+T+t)))`;
//! * expected purchases of a new customer in `(0, t]`, the same with
//!   `x = 0, T = 0`:
//!   `E[X(t)] = (a+b-1)/(a-1) · (1 - (α/(α+t))^r · 2F1(r, b; a+b-1; t/(α+t)))`.
//!
//! The `1/(a-1)` factor is only apparent: the bracket vanishes with it. The
//! expectation is evaluated with Euler's transformation
//! `(1-z)^(r+x) 2F1(r+x, b+x; c; z) = (1-z)^(a-1) 2F1(a+b-1-r, a-1; c; z)`
//! (`c = a+b+x-1`) and split as
//! `c·(1 - (1-z)^(a-1))/(a-1) - (1-z)^(a-1)·S`, where
//! `S = c/(a-1) · (2F1 - 1)` is summed term by term without dividing by
//! `a-1` or `c`. So `a = 1` and `a+b+x = 1` are ordinary points, and no
//! intermediate value grows like `(1-z)^-(r+x)` for long horizons. (When
//! `a > 2+r+x` the untransformed function is the tamer one and is used
//! instead, with the same splitting.)
//!
//! # Gamma-Gamma
//!
//! Fader, P. S., Hardie, B. G. S. and Lee, K. L. (2005), "RFM and CLV: Using
//! Iso-Value Curves for Customer Base Analysis", *Journal of Marketing
//! Research* 42(4), 415-430; and Fader & Hardie (2013), "The Gamma-Gamma
//! Model of Monetary Value" (note). The value of each transaction is
//! `Gamma(p, ν)` with `ν ~ Gamma(q, gamma)` across customers. The mean `m` of
//! a customer's `x` repeat transactions has density
//! `f(m | x) = Γ(px+q)/(Γ(px) Γ(q)) · gamma^q · m^(px-1) · x^(px) / (gamma + m·x)^(px+q)`
//! and the expected value of a future transaction is
//! `E[Z | x, m] = (gamma + m·x) · p / (p·x + q - 1)`.
//! The model assumes spend per transaction is independent of purchase
//! frequency; only customers with `x > 0` carry information.
//!
//! # Fitting
//!
//! Parameters are estimated on the log scale (so they stay positive) inside
//! the box `[1e-6, 1e6]`, maximising the summed log-likelihood with BFGS on
//! analytic gradients, then restarting BFGS from the optimum with a fresh
//! Hessian estimate to confirm it; if BFGS does not converge, Nelder–Mead
//! takes over and BFGS polishes its result. Identical rows are merged into
//! weighted rows first. With many distinct rows the likelihood is summed on
//! `available_parallelism` threads over fixed-size chunks that are added in a
//! fixed order, so results do not depend on the number of threads.
//!
//! # Special functions
//!
//! [`ln_gamma`] (series about 2 built on zeta values, recurrences and
//! Stirling's series), a private digamma, and [`hyp2f1`]: power series for
//! `|z| <= 1/2`, Pfaff's transformation for `z < -1/2`, and for `z > 1/2`
//! Euler's transformation (when `c-a-b < 0`) followed by analytic
//! continuation along `[1/2, z]` with Taylor steps of the hypergeometric
//! differential equation, each reaching half way to the singular point
//! `z = 1`. This keeps full accuracy up to `z` very close to 1 without the
//! gamma-function connection formulas, which break down when `c-a-b` is close
//! to an integer.

use std::fmt;
use std::thread;

// ---------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------

/// One customer's purchase summary (see the module documentation for units).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Customer {
    /// Number of repeat purchases (purchases after the first), a whole number >= 0.
    pub x: f64,
    /// Time of the last repeat purchase since the first purchase; 0 when `x` = 0.
    pub t_x: f64,
    /// Customer age `T`: time from the first purchase to the end of observation.
    pub t: f64,
}

impl Customer {
    /// Builds a customer summary (not validated; see [`Customer::validate`]).
    pub fn new(x: f64, t_x: f64, t: f64) -> Self {
        Customer { x, t_x, t }
    }

    /// Checks that the summary can be used for fitting; `index` is the
    /// position reported in the error.
    ///
    /// Rules: all values finite; `x` a whole number >= 0; `T > 0`;
    /// `0 <= t_x <= T`; `t_x > 0` when `x > 0` and `t_x = 0` when `x = 0`.
    pub fn validate(&self, index: usize) -> Result<(), ModelError> {
        let bad = |field: &'static str, value: f64, reason: String| {
            Err(ModelError::InvalidCustomer {
                index,
                field,
                value,
                reason,
            })
        };
        let Customer { x, t_x, t } = *self;
        for (field, value) in [("x", x), ("t_x", t_x), ("T", t)] {
            if !value.is_finite() {
                return bad(
                    field,
                    value,
                    "every value must be a finite number; drop or repair this row".into(),
                );
            }
        }
        if x < 0.0 {
            return bad(
                "x",
                x,
                "the number of repeat purchases cannot be negative".into(),
            );
        }
        if x.fract() != 0.0 {
            return bad(
                "x",
                x,
                "x counts repeat purchases and must be a whole number".into(),
            );
        }
        if t <= 0.0 {
            return bad(
                "T",
                t,
                "the customer age T (time from the first purchase to the end of \
                 observation) must be > 0; drop customers whose first purchase is at \
                 the end of the window"
                    .into(),
            );
        }
        if t_x < 0.0 {
            return bad(
                "t_x",
                t_x,
                "the time of the last purchase is measured from the first purchase \
                 and cannot be negative"
                    .into(),
            );
        }
        if t_x > t {
            return bad(
                "t_x",
                t_x,
                format!(
                    "the last purchase lies after the end of observation T = {t}; \
                     measure t_x and T from the first purchase, in the same time unit"
                ),
            );
        }
        if x > 0.0 && t_x == 0.0 {
            return bad(
                "t_x",
                t_x,
                format!(
                    "the customer has x = {x} repeat purchases, so t_x (time of the last \
                     repeat purchase since the first purchase) must be > 0"
                ),
            );
        }
        if x == 0.0 && t_x != 0.0 {
            return bad(
                "t_x",
                t_x,
                "with no repeat purchases (x = 0) the last purchase is the first one, \
                 so t_x must be 0"
                    .into(),
            );
        }
        Ok(())
    }
}

/// BG/NBD parameters: purchase rate `λ ~ Gamma(r, alpha)` (`alpha` in the
/// data's time unit), drop-out probability `p ~ Beta(a, b)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BgNbd {
    /// Shape of the gamma distribution of purchase rates.
    pub r: f64,
    /// Scale of the purchase-rate distribution, in the data's time unit
    /// (mean rate `r/alpha` purchases per time unit).
    pub alpha: f64,
    /// First shape of the beta distribution of drop-out probabilities.
    pub a: f64,
    /// Second shape of the drop-out distribution (mean drop-out
    /// probability `a/(a+b)`).
    pub b: f64,
}

/// Gamma-Gamma parameters: transaction value `~ Gamma(p, ν)`,
/// `ν ~ Gamma(q, gamma)` (`gamma` in money units).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GammaGamma {
    /// Shape of the gamma distribution of one transaction's value.
    pub p: f64,
    /// Shape of the gamma distribution of the customers' rate `ν`.
    pub q: f64,
    /// Scale of that distribution, in money units (population mean
    /// transaction value `p·gamma/(q-1)`).
    pub gamma: f64,
}

/// Result of a maximum-likelihood fit.
#[derive(Debug, Clone, PartialEq)]
pub struct Fit<P> {
    /// Estimated parameters.
    pub params: P,
    /// Log-likelihood at `params`, summed over all customers used.
    pub log_likelihood: f64,
    /// Optimiser iterations (BFGS iterations plus any Nelder–Mead iterations).
    pub iterations: u32,
    /// Number of customers the fit used.
    pub customers: usize,
    /// Whether the optimiser met its tolerances (gradient, or change of the
    /// log-likelihood together with change of the log-parameters). A parameter
    /// at the edge of the box `[1e-6, 1e6]` means the data do not pin it down.
    pub converged: bool,
}

/// Why a model could not be fitted.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelError {
    /// The input held no customers.
    NoCustomers {
        /// Model being fitted ("BG/NBD" or "Gamma-Gamma").
        model: &'static str,
    },
    /// A customer row is invalid.
    InvalidCustomer {
        /// Position of the row in the input slice.
        index: usize,
        /// Offending field (`x`, `t_x`, `T`, `mean_spend`).
        field: &'static str,
        /// Offending value.
        value: f64,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// Nobody made a repeat purchase, so the model has no estimate.
    NoRepeatPurchases {
        /// Model being fitted.
        model: &'static str,
        /// Number of customers given.
        customers: usize,
    },
    /// The likelihood could not be evaluated (should not happen with valid
    /// data; please report with the data that caused it).
    Numerical {
        /// Model being fitted.
        model: &'static str,
        /// What failed.
        detail: String,
    },
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelError::NoCustomers { model } => write!(
                f,
                "{model}: no customers were given; pass at least one customer summary"
            ),
            ModelError::InvalidCustomer {
                index,
                field,
                value,
                reason,
            } => write!(
                f,
                "invalid customer at index {index}: {field} = {value}: {reason}"
            ),
            ModelError::NoRepeatPurchases {
                model: MODEL_GG,
                customers,
            } => write!(
                f,
                "{MODEL_GG}: none of the {customers} customers has a repeat purchase \
                 (x > 0); spend can only be modelled from customers with at least one \
                 repeat purchase, so use a longer observation window or more customers"
            ),
            ModelError::NoRepeatPurchases { model, customers } => write!(
                f,
                "{model}: none of the {customers} customers has a repeat purchase (all \
                 x = 0), so purchase rates and drop-out cannot be estimated; use a \
                 longer observation window or check how x was computed"
            ),
            ModelError::Numerical { model, detail } => write!(
                f,
                "{model}: the likelihood could not be evaluated ({detail}); check the \
                 input for extreme values"
            ),
        }
    }
}

impl std::error::Error for ModelError {}

const MODEL_BG: &str = "BG/NBD";
const MODEL_GG: &str = "Gamma-Gamma";

// ---------------------------------------------------------------------------
// BG/NBD
// ---------------------------------------------------------------------------

/// Terms of the BG/NBD log-likelihood that depend on `x` only (given the
/// parameters), shared by all rows with that `x`.
#[derive(Clone, Copy)]
struct BgGroupTerms {
    /// `r + x`.
    rx: f64,
    /// `ln a - ln(b+x-1)` for `x > 0`.
    ln_ratio: f64,
    /// `1/(b+x-1)` for `x > 0`.
    inv_bx1: f64,
    /// `x > 0`.
    repeat: bool,
}

impl BgGroupTerms {
    fn new(p: &BgNbd, x: f64) -> Self {
        let repeat = x > 0.0;
        let bx1 = p.b + x - 1.0;
        BgGroupTerms {
            rx: p.r + x,
            ln_ratio: if repeat { p.a.ln() - bx1.ln() } else { 0.0 },
            inv_bx1: if repeat { 1.0 / bx1 } else { 0.0 },
            repeat,
        }
    }
}

/// `x`-dependent part of the log-likelihood and its derivatives with respect
/// to (r, alpha, a, b): `ln Γ(r+x) - ln Γ(r) + r ln α + ln B(a, b+x) - ln B(a, b)`.
fn bg_group_part(p: &BgNbd, x: f64) -> [f64; 5] {
    let (r, a, b) = (p.r, p.a, p.b);
    let ll = ln_gamma(r + x) - ln_gamma(r) + r * p.alpha.ln() + ln_gamma(a + b) + ln_gamma(b + x)
        - ln_gamma(b)
        - ln_gamma(a + b + x);
    let psi_abx = digamma(a + b + x);
    let psi_ab = digamma(a + b);
    [
        ll,
        digamma(r + x) - digamma(r) + p.alpha.ln(),
        r / p.alpha,
        psi_ab - psi_abx,
        psi_ab + digamma(b + x) - digamma(b) - psi_abx,
    ]
}

/// Row-dependent part of the log-likelihood,
/// `ln((α+T)^-(r+x) + [x>0] a/(b+x-1) (α+t_x)^-(r+x))`, and its derivatives
/// with respect to (r, alpha, a, b).
#[inline]
fn bg_row_part(g: &BgGroupTerms, p: &BgNbd, t_x: f64, t: f64) -> [f64; 5] {
    let at = p.alpha + t;
    let ln_at = at.ln();
    let l1 = -g.rx * ln_at;
    if !g.repeat {
        return [l1, -ln_at, -g.rx / at, 0.0, 0.0];
    }
    let atx = p.alpha + t_x;
    let ln_atx = atx.ln();
    let l2 = g.ln_ratio - g.rx * ln_atx;
    let d = l1 - l2;
    let e = (-d.abs()).exp();
    let inv = 1.0 / (1.0 + e);
    // w1, w2: shares of the two terms of the likelihood.
    let (top, w1, w2) = if d >= 0.0 {
        (l1, inv, e * inv)
    } else {
        (l2, e * inv, inv)
    };
    [
        top + e.ln_1p(),
        -w1 * ln_at - w2 * ln_atx,
        -g.rx * (w1 / at + w2 / atx),
        w2 / p.a,
        -w2 * g.inv_bx1,
    ]
}

impl BgNbd {
    /// Log-likelihood of one customer's summary (not validated; invalid
    /// input gives NaN or a meaningless number).
    pub fn log_likelihood(&self, c: &Customer) -> f64 {
        let g = BgGroupTerms::new(self, c.x);
        bg_group_part(self, c.x)[0] + bg_row_part(&g, self, c.t_x, c.t)[0]
    }

    /// Probability that the customer is still alive at the end of
    /// observation, `P(alive | x, t_x, T)`.
    pub fn p_alive(&self, c: &Customer) -> f64 {
        if c.x <= 0.0 {
            return 1.0;
        }
        // ln of a/(b+x-1) · ((α+T)/(α+t_x))^(r+x)
        let u = self.a.ln() - (self.b + c.x - 1.0).ln()
            + (self.r + c.x) * ((c.t - c.t_x) / (self.alpha + c.t_x)).ln_1p();
        1.0 / (1.0 + u.exp())
    }

    /// Expected number of purchases in `(T, T + horizon]` for this customer,
    /// `E[Y(horizon) | x, t_x, T]` (`horizon` in the data's time unit).
    /// Returns 0 for `horizon = 0`, NaN for a negative or NaN horizon; an
    /// infinite horizon gives the limit (infinite when `a <= 1`).
    ///
    /// Accuracy: relative error about 1e-13 for fitted-looking parameters
    /// (checked against 100-digit references for r in [1e-3, 100],
    /// a, b in [1e-3, 1e3], x up to 500, horizons up to 1e5 time units).
    /// Far outside that (e.g. `r` in the thousands with `a + b` near 0, or
    /// `b` near the optimiser's bound 1e6 with horizons thousands of times
    /// `alpha + T`) the result may be accurate to only 1e-6, and is NaN when
    /// no estimate can be trusted. Cost: about 1-2 µs typically, bounded by
    /// about 2 ms in the worst cases.
    pub fn expected_purchases(&self, c: &Customer, horizon: f64) -> f64 {
        self.p_alive(c) * self.alive_expectation(c.x, c.t, horizon)
    }

    /// Expected number of purchases of a newly acquired customer in
    /// `(0, horizon]`, `E[X(horizon)]` (repeat purchases, not counting the
    /// first one).
    pub fn expected_purchases_new(&self, horizon: f64) -> f64 {
        self.alive_expectation(0.0, 0.0, horizon)
    }

    /// `(a+b+x-1)/(a-1) · (1 - ((α+T)/(α+T+t))^(r+x) 2F1(r+x, b+x; a+b+x-1; z))`
    /// with `z = t/(α+T+t)`: expected purchases in `(T, T+t]` of a customer
    /// known to be alive at `T`.
    fn alive_expectation(&self, x: f64, age: f64, horizon: f64) -> f64 {
        let BgNbd { r, alpha, a, b } = *self;
        if horizon.is_nan() || horizon < 0.0 {
            return f64::NAN;
        }
        if horizon == 0.0 {
            return 0.0;
        }
        let c = a + b + x - 1.0;
        let k = horizon / (alpha + age);
        let z = k / (1.0 + k);
        if z.is_nan() || z >= 1.0 {
            // Infinite horizon: (a+b+x-1)/(a-1) for a > 1, else unbounded.
            return if a > 1.0 {
                c / (a - 1.0)
            } else {
                f64::INFINITY
            };
        }
        let ln1mz = -k.ln_1p(); // ln(1 - z)
        let m = r + x;
        // Euler-transformed form; exact at a = 1 and c = 0. Its series
        // alternates when a+b-1-r is very negative (r much larger than a+b).
        let euler = || {
            let bb = a - 1.0;
            let e1 = if bb == 0.0 {
                -ln1mz
            } else {
                -(bb * ln1mz).exp_m1() / bb
            };
            let s = hyp_eval(Kind::Scaled, a + b - 1.0 - r, bb, c, z);
            c * e1 - (bb * ln1mz).exp() * s
        };
        // Untransformed form: positive series, but divides by a-1.
        let original = || {
            let beta = b + x;
            let s = hyp_eval(Kind::Scaled, m, beta, c, z);
            (c * -(m * ln1mz).exp_m1() - beta * (m * ln1mz).exp() * s) / (a - 1.0)
        };
        let alternation = -(a + b - 1.0 - r) * z.ln_1p(); // ln of the series' swing
        let prefer_original = a > 2.0 + r + x || ((a - 1.0).abs() > 0.1 && alternation > 7.0);
        // The expectation is E[(1 - (1+pk)^-m)/p] over p ~ Beta(a, b+x), and
        // (1 - (1+pk)^-m)/p falls from m·k at p = 0 to 1 - (1+k)^-m at p = 1.
        // A result outside those bounds has lost its accuracy; then the other
        // form is tried, and if both fail the bounds themselves are used when
        // they pin the value down to 1e-6.
        let lower = -(-m * k.ln_1p()).exp_m1();
        let upper = m * k;
        let accept = |v: f64| {
            (v >= lower * (1.0 - 1e-6) && v <= upper * (1.0 + 1e-6)).then(|| v.clamp(lower, upper))
        };
        let value = if prefer_original {
            accept(original()).or_else(|| accept(euler()))
        } else {
            accept(euler()).or_else(|| accept(original()))
        };
        match value {
            Some(v) => v,
            None if upper - lower <= 2e-6 * upper => 0.5 * (lower + upper),
            None => f64::NAN,
        }
    }
}

/// BG/NBD rows merged by (x, t_x, T), sorted by x, with weights.
struct BgRows {
    /// Distinct x values and their total weights.
    groups: Vec<(f64, f64)>,
    /// Group index of each row.
    group: Vec<u32>,
    t_x: Vec<f64>,
    t: Vec<f64>,
    weight: Vec<f64>,
    total_weight: f64,
}

fn prepare_bgnbd(data: &[Customer]) -> Result<BgRows, ModelError> {
    if data.is_empty() {
        return Err(ModelError::NoCustomers { model: MODEL_BG });
    }
    let mut keys = Vec::with_capacity(data.len());
    let mut any_repeat = false;
    for (i, c) in data.iter().enumerate() {
        c.validate(i)?;
        any_repeat |= c.x > 0.0;
        // `+ 0.0` turns -0.0 into +0.0; for non-negative floats the bit
        // patterns sort like the numbers.
        keys.push([
            (c.x + 0.0).to_bits(),
            (c.t + 0.0).to_bits(),
            (c.t_x + 0.0).to_bits(),
        ]);
    }
    if !any_repeat {
        return Err(ModelError::NoRepeatPurchases {
            model: MODEL_BG,
            customers: data.len(),
        });
    }
    keys.sort_unstable();
    let mut rows = BgRows {
        groups: Vec::new(),
        group: Vec::new(),
        t_x: Vec::new(),
        t: Vec::new(),
        weight: Vec::new(),
        total_weight: data.len() as f64,
    };
    for key in keys {
        let [x, t, t_x] = key.map(f64::from_bits);
        let same_row = rows.weight.last().is_some()
            && rows.groups.last().map(|g| g.0) == Some(x)
            && rows.t.last() == Some(&t)
            && rows.t_x.last() == Some(&t_x);
        if same_row {
            *rows.weight.last_mut().expect("checked above") += 1.0;
            rows.groups.last_mut().expect("checked above").1 += 1.0;
            continue;
        }
        if rows.groups.last().map(|g| g.0) != Some(x) {
            rows.groups.push((x, 0.0));
        }
        rows.groups.last_mut().expect("pushed above").1 += 1.0;
        rows.group.push((rows.groups.len() - 1) as u32);
        rows.t_x.push(t_x);
        rows.t.push(t);
        rows.weight.push(1.0);
    }
    Ok(rows)
}

/// Mean negative log-likelihood per customer at log-parameters `theta`
/// (ln r, ln alpha, ln a, ln b), with its gradient in `grad`.
fn bg_objective(rows: &BgRows, theta: &[f64], grad: &mut [f64], threads: usize) -> f64 {
    let p = BgNbd {
        r: theta[0].exp(),
        alpha: theta[1].exp(),
        a: theta[2].exp(),
        b: theta[3].exp(),
    };
    let mut total = [0.0; 5];
    let mut terms = Vec::with_capacity(rows.groups.len());
    for &(x, w) in &rows.groups {
        let part = bg_group_part(&p, x);
        for (acc, v) in total.iter_mut().zip(part) {
            *acc += w * v;
        }
        terms.push(BgGroupTerms::new(&p, x));
    }
    let row_sum = chunked_sum(rows.weight.len(), threads, &|start, end| {
        let mut acc = [0.0; 5];
        for i in start..end {
            let part = bg_row_part(&terms[rows.group[i] as usize], &p, rows.t_x[i], rows.t[i]);
            let w = rows.weight[i];
            for (a, v) in acc.iter_mut().zip(part) {
                *a += w * v;
            }
        }
        acc
    });
    for (acc, v) in total.iter_mut().zip(row_sum) {
        *acc += v;
    }
    let scale = -1.0 / rows.total_weight;
    let values = [p.r, p.alpha, p.a, p.b];
    for (k, g) in grad.iter_mut().enumerate() {
        // d/d ln θ = θ · d/dθ
        *g = scale * values[k] * total[k + 1];
    }
    scale * total[0]
}

/// Fits the BG/NBD model by maximum likelihood.
///
/// Every customer is validated (see [`Customer::validate`]); at least one
/// must have `x > 0`. Identical summaries are merged before fitting, so data
/// with day-resolution times fit much faster than all-distinct rows.
pub fn fit_bgnbd(data: &[Customer]) -> Result<Fit<BgNbd>, ModelError> {
    let rows = prepare_bgnbd(data)?;
    let threads = worker_threads(rows.weight.len());
    // Start: r = 1 with alpha matching the observed purchase rate, a = 1, b = 3.
    let (mut sum_x, mut sum_t) = (0.0, 0.0);
    for (i, &w) in rows.weight.iter().enumerate() {
        sum_x += w * rows.groups[rows.group[i] as usize].0;
        sum_t += w * rows.t[i];
    }
    let start = [0.0, (sum_t / sum_x).ln(), 0.0, 3f64.ln()];
    let mut objective = |theta: &[f64], grad: &mut [f64]| bg_objective(&rows, theta, grad, threads);
    let opt = minimize(&mut objective, &start);
    if !opt.f.is_finite() {
        return Err(ModelError::Numerical {
            model: MODEL_BG,
            detail: format!("log-likelihood is {} at the optimum", -opt.f),
        });
    }
    Ok(Fit {
        params: BgNbd {
            r: opt.x[0].exp(),
            alpha: opt.x[1].exp(),
            a: opt.x[2].exp(),
            b: opt.x[3].exp(),
        },
        log_likelihood: -opt.f * rows.total_weight,
        iterations: opt.iterations,
        customers: data.len(),
        converged: opt.converged,
    })
}

// ---------------------------------------------------------------------------
// Gamma-Gamma
// ---------------------------------------------------------------------------

impl GammaGamma {
    /// Expected value of a future transaction of a customer with `x` repeat
    /// purchases of mean value `mean_spend`:
    /// `(gamma + mean_spend·x)·p / (p·x + q - 1)`. With `x = 0` this is the
    /// population mean `p·gamma/(q-1)`. NaN when `p·x + q <= 1` (infinite mean).
    pub fn expected_spend(&self, x: f64, mean_spend: f64) -> f64 {
        let denom = self.p * x + self.q - 1.0;
        if denom.is_nan() || denom <= 0.0 {
            return f64::NAN;
        }
        let weighted = if x == 0.0 { 0.0 } else { mean_spend * x };
        (self.gamma + weighted) * self.p / denom
    }

    /// Log-density of the mean value `m` of `x` repeat transactions (the
    /// Jacobian included, so it is comparable across data sets).
    pub fn log_likelihood(&self, x: f64, m: f64) -> f64 {
        gg_group_part(self, x)[0] + gg_row_part(self, x, m.ln(), m)[0]
    }
}

/// `x`-dependent part of the Gamma-Gamma log-density and its derivatives with
/// respect to (p, q, gamma).
fn gg_group_part(g: &GammaGamma, x: f64) -> [f64; 5] {
    let px = g.p * x;
    let psi_pxq = digamma(px + g.q);
    [
        ln_gamma(px + g.q) - ln_gamma(px) - ln_gamma(g.q) + g.q * g.gamma.ln() + px * x.ln(),
        x * (psi_pxq - digamma(px) + x.ln()),
        psi_pxq - digamma(g.q) + g.gamma.ln(),
        g.q / g.gamma,
        0.0,
    ]
}

/// Row-dependent part: `(px-1) ln m - (px+q) ln(gamma + m x)` and derivatives.
#[inline]
fn gg_row_part(g: &GammaGamma, x: f64, ln_m: f64, m: f64) -> [f64; 5] {
    let px = g.p * x;
    let s = g.gamma + m * x;
    let ln_s = s.ln();
    [
        (px - 1.0) * ln_m - (px + g.q) * ln_s,
        x * (ln_m - ln_s),
        -ln_s,
        -(px + g.q) / s,
        0.0,
    ]
}

/// Gamma-Gamma rows merged by (x, m), with weights.
struct GgRows {
    x: Vec<f64>,
    m: Vec<f64>,
    ln_m: Vec<f64>,
    weight: Vec<f64>,
    /// Distinct x values and their total weights.
    groups: Vec<(f64, f64)>,
    total_weight: f64,
}

fn prepare_gamma_gamma(data: &[(f64, f64)]) -> Result<GgRows, ModelError> {
    if data.is_empty() {
        return Err(ModelError::NoCustomers { model: MODEL_GG });
    }
    let mut keys = Vec::with_capacity(data.len());
    for (i, &(x, m)) in data.iter().enumerate() {
        let bad = |field: &'static str, value: f64, reason: &str| {
            Err(ModelError::InvalidCustomer {
                index: i,
                field,
                value,
                reason: reason.to_string(),
            })
        };
        if !x.is_finite() || x < 0.0 || x.fract() != 0.0 {
            return bad(
                "x",
                x,
                "x counts repeat purchases and must be a whole number >= 0",
            );
        }
        if x == 0.0 {
            continue; // no repeat purchase: carries no spend information
        }
        if !m.is_finite() || m <= 0.0 {
            return bad(
                "mean_spend",
                m,
                "the mean value of the repeat purchases must be a finite number > 0; \
                 drop customers with zero or negative spend (returns, free orders) \
                 or model them separately",
            );
        }
        keys.push([x.to_bits(), m.to_bits()]);
    }
    if keys.is_empty() {
        return Err(ModelError::NoRepeatPurchases {
            model: MODEL_GG,
            customers: data.len(),
        });
    }
    keys.sort_unstable();
    let mut rows = GgRows {
        x: Vec::new(),
        m: Vec::new(),
        ln_m: Vec::new(),
        weight: Vec::new(),
        groups: Vec::new(),
        total_weight: keys.len() as f64,
    };
    for key in keys {
        let [x, m] = key.map(f64::from_bits);
        if rows.groups.last().map(|g| g.0) != Some(x) {
            rows.groups.push((x, 0.0));
        }
        rows.groups.last_mut().expect("pushed above").1 += 1.0;
        if rows.x.last() == Some(&x) && rows.m.last() == Some(&m) {
            *rows.weight.last_mut().expect("checked above") += 1.0;
            continue;
        }
        rows.x.push(x);
        rows.m.push(m);
        rows.ln_m.push(m.ln());
        rows.weight.push(1.0);
    }
    Ok(rows)
}

/// Mean negative log-likelihood at log-parameters (ln p, ln q, ln gamma).
fn gg_objective(rows: &GgRows, theta: &[f64], grad: &mut [f64], threads: usize) -> f64 {
    let g = GammaGamma {
        p: theta[0].exp(),
        q: theta[1].exp(),
        gamma: theta[2].exp(),
    };
    let mut total = [0.0; 5];
    for &(x, w) in &rows.groups {
        for (acc, v) in total.iter_mut().zip(gg_group_part(&g, x)) {
            *acc += w * v;
        }
    }
    let row_sum = chunked_sum(rows.weight.len(), threads, &|start, end| {
        let mut acc = [0.0; 5];
        for i in start..end {
            let part = gg_row_part(&g, rows.x[i], rows.ln_m[i], rows.m[i]);
            let w = rows.weight[i];
            for (a, v) in acc.iter_mut().zip(part) {
                *a += w * v;
            }
        }
        acc
    });
    for (acc, v) in total.iter_mut().zip(row_sum) {
        *acc += v;
    }
    let scale = -1.0 / rows.total_weight;
    let values = [g.p, g.q, g.gamma];
    for (k, d) in grad.iter_mut().enumerate() {
        *d = scale * values[k] * total[k + 1];
    }
    scale * total[0]
}

/// Fits the Gamma-Gamma spend model by maximum likelihood.
///
/// `data` holds `(x, mean_spend)` per customer: `x` repeat purchases (a whole
/// number) and the mean value of those repeat purchases. Rows with `x = 0`
/// carry no information on spend and are skipped (so the whole customer
/// table can be passed); rows with `x > 0` need a finite `mean_spend > 0`.
/// `Fit::customers` counts the rows used.
pub fn fit_gamma_gamma(data: &[(f64, f64)]) -> Result<Fit<GammaGamma>, ModelError> {
    let rows = prepare_gamma_gamma(data)?;
    let threads = worker_threads(rows.weight.len());
    let mut sum_m = 0.0;
    for (w, m) in rows.weight.iter().zip(&rows.m) {
        sum_m += w * m;
    }
    // Start: p = 1, q = 3 and gamma so that the population mean p·gamma/(q-1)
    // equals the observed mean spend.
    let start = [0.0, 3f64.ln(), (2.0 * sum_m / rows.total_weight).ln()];
    let mut objective = |theta: &[f64], grad: &mut [f64]| gg_objective(&rows, theta, grad, threads);
    let opt = minimize(&mut objective, &start);
    if !opt.f.is_finite() {
        return Err(ModelError::Numerical {
            model: MODEL_GG,
            detail: format!("log-likelihood is {} at the optimum", -opt.f),
        });
    }
    Ok(Fit {
        params: GammaGamma {
            p: opt.x[0].exp(),
            q: opt.x[1].exp(),
            gamma: opt.x[2].exp(),
        },
        log_likelihood: -opt.f * rows.total_weight,
        iterations: opt.iterations,
        customers: rows.total_weight as usize,
        converged: opt.converged,
    })
}

// ---------------------------------------------------------------------------
// Customer lifetime value
// ---------------------------------------------------------------------------

/// Discounted lifetime value over `periods` periods of `period_length` time
/// units (the data's unit) with `discount_rate` per period:
/// `Σ_{i=1..periods} (E[Y(i·len)] - E[Y((i-1)·len)]) · E[spend] / (1+d)^i`,
/// where `E[Y(t)]` is [`BgNbd::expected_purchases`] for `c` and `E[spend]`
/// is [`GammaGamma::expected_spend`]`(c.x, mean_spend)`; that is
/// [`discounted_purchases`] times the expected spend.
///
/// `mean_spend` must be the mean value of the customer's `c.x` repeat
/// purchases; for a customer whose spend is unknown use
/// `discounted_purchases(..) * gg.expected_spend(0.0, 0.0)` (the population
/// mean) instead. Returns NaN for a negative or non-finite `period_length`
/// or a `discount_rate <= -1`.
pub fn lifetime_value(
    bg: &BgNbd,
    gg: &GammaGamma,
    c: &Customer,
    mean_spend: f64,
    periods: u32,
    period_length: f64,
    discount_rate: f64,
) -> f64 {
    discounted_purchases(bg, c, periods, period_length, discount_rate)
        * gg.expected_spend(c.x, mean_spend)
}

/// Discounted expected number of purchases over `periods` periods of
/// `period_length` time units:
/// `Σ_{i=1..periods} (E[Y(i·len)] - E[Y((i-1)·len)]) / (1+d)^i`.
/// Returns NaN for a negative or non-finite `period_length` or a
/// `discount_rate <= -1`; 0 for `periods = 0`.
pub fn discounted_purchases(
    bg: &BgNbd,
    c: &Customer,
    periods: u32,
    period_length: f64,
    discount_rate: f64,
) -> f64 {
    let valid = period_length >= 0.0 && period_length.is_finite() && discount_rate > -1.0;
    if !valid {
        return f64::NAN;
    }
    let step = 1.0 / (1.0 + discount_rate);
    let mut discount = 1.0;
    let mut before = 0.0;
    let mut value = 0.0;
    for i in 1..=periods {
        let cumulative = bg.expected_purchases(c, f64::from(i) * period_length);
        discount *= step;
        value += (cumulative - before) * discount;
        before = cumulative;
    }
    value
}

// ---------------------------------------------------------------------------
// Parallel summation
// ---------------------------------------------------------------------------

/// Rows per chunk; partial sums are formed per chunk and added in chunk order.
const CHUNK_ROWS: usize = 16_384;
/// Below this many rows the sum runs on the calling thread.
const PARALLEL_MIN_ROWS: usize = 4 * CHUNK_ROWS;

fn worker_threads(rows: usize) -> usize {
    if rows < PARALLEL_MIN_ROWS {
        return 1;
    }
    thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(rows.div_ceil(CHUNK_ROWS))
}

/// Sums `eval(start, end)` over fixed-size chunks of `0..rows`. Threads take
/// chunks round-robin; the chunk results are added in chunk order, so the
/// result is the same for any thread count.
fn chunked_sum(
    rows: usize,
    threads: usize,
    eval: &(dyn Fn(usize, usize) -> [f64; 5] + Sync),
) -> [f64; 5] {
    let chunks = rows.div_ceil(CHUNK_ROWS);
    let range = |k: usize| (k * CHUNK_ROWS, ((k + 1) * CHUNK_ROWS).min(rows));
    let mut parts: Vec<Option<[f64; 5]>> = vec![None; chunks];
    if threads > 1 {
        thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|first| {
                    thread::Builder::new().spawn_scoped(scope, move || {
                        (first..chunks)
                            .step_by(threads)
                            .map(|k| {
                                let (s, e) = range(k);
                                (k, eval(s, e))
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for handle in handles.into_iter().flatten() {
                if let Ok(done) = handle.join() {
                    for (k, v) in done {
                        parts[k] = Some(v);
                    }
                }
            }
        });
    }
    // Chunks not computed by a thread (single thread, or a thread that could
    // not be started) are computed here.
    let mut total = [0.0; 5];
    for (k, part) in parts.into_iter().enumerate() {
        let v = part.unwrap_or_else(|| {
            let (s, e) = range(k);
            eval(s, e)
        });
        for (t, x) in total.iter_mut().zip(v) {
            *t += x;
        }
    }
    total
}

// ---------------------------------------------------------------------------
// Optimisation (log-parameters in a box)
// ---------------------------------------------------------------------------

/// Smallest and largest parameter value the optimiser may use.
const PARAM_MIN: f64 = 1e-6;
const PARAM_MAX: f64 = 1e6;
/// Converged when the projected gradient of the mean negative log-likelihood
/// (per customer, with respect to log-parameters) is below this...
const GRAD_TOL: f64 = 1e-9;
/// ...or when one iteration changes it by less than this (relative) while
/// moving no log-parameter by more than `STEP_TOL`.
const VALUE_TOL: f64 = 1e-13;
const STEP_TOL: f64 = 1e-8;
/// Largest move of a log-parameter in one BFGS step.
const MAX_STEP: f64 = 2.0;
const BFGS_MAX_ITER: u32 = 500;
const NELDER_MEAD_MAX_ITER: u32 = 5_000;

type Objective<'a> = dyn FnMut(&[f64], &mut [f64]) -> f64 + 'a;

struct OptResult {
    x: Vec<f64>,
    f: f64,
    iterations: u32,
    converged: bool,
}

/// The box the fits search parameters in: a parameter found at an edge is not pinned down.
pub fn param_bounds() -> (f64, f64) {
    (PARAM_MIN, PARAM_MAX)
}

fn log_bounds() -> (f64, f64) {
    (PARAM_MIN.ln(), PARAM_MAX.ln())
}

fn clamp_box(x: &mut [f64]) {
    let (lo, hi) = log_bounds();
    for v in x.iter_mut() {
        *v = if v.is_nan() { 0.0 } else { v.clamp(lo, hi) };
    }
}

/// Minimises `f` (value and gradient) over log-parameters in the box:
/// BFGS, Nelder–Mead if BFGS does not converge, then a BFGS restart from the
/// best point with a fresh Hessian estimate to confirm the optimum.
fn minimize(f: &mut Objective<'_>, start: &[f64]) -> OptResult {
    let mut best = bfgs(f, start);
    if !best.converged {
        let from = if best.f.is_finite() {
            best.x.clone()
        } else {
            start.to_vec()
        };
        let nm = nelder_mead(f, &from);
        let polished = bfgs(f, &nm.x);
        let iterations = best.iterations + nm.iterations + polished.iterations;
        best = if polished.f <= nm.f || !nm.f.is_finite() {
            polished
        } else {
            nm
        };
        best.iterations = iterations;
    }
    let again = bfgs(f, &best.x);
    let iterations = best.iterations + again.iterations;
    if again.f <= best.f || !best.f.is_finite() {
        best = again;
    } else {
        best.converged = best.converged && again.converged;
    }
    best.iterations = iterations;
    best
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Projected BFGS on the box of log-parameters with a backtracking
/// (Armijo) line search.
fn bfgs(f: &mut Objective<'_>, start: &[f64]) -> OptResult {
    let n = start.len();
    let (lo, hi) = log_bounds();
    let mut x = start.to_vec();
    clamp_box(&mut x);
    let mut g = vec![0.0; n];
    let mut fx = f(&x, &mut g);
    let identity = |h: &mut Vec<f64>| {
        h.iter_mut().for_each(|v| *v = 0.0);
        (0..n).for_each(|i| h[i * n + i] = 1.0);
    };
    let mut h = vec![0.0; n * n]; // inverse Hessian estimate, row-major
    identity(&mut h);
    let mut fresh = true;
    let result = |x: Vec<f64>, f: f64, iterations: u32, converged: bool| OptResult {
        x,
        f,
        iterations,
        converged,
    };
    if !fx.is_finite() || g.iter().any(|v| !v.is_finite()) {
        return result(x, f64::INFINITY, 0, false);
    }
    let mut d = vec![0.0; n];
    let mut x_new = vec![0.0; n];
    let mut g_new = vec![0.0; n];
    for iter in 1..=BFGS_MAX_ITER {
        // Parameters held at a bound the gradient pushes against are frozen.
        let free: Vec<bool> = (0..n)
            .map(|i| !((x[i] <= lo && g[i] > 0.0) || (x[i] >= hi && g[i] < 0.0)))
            .collect();
        let proj_grad = (0..n)
            .filter(|&i| free[i])
            .map(|i| g[i].abs())
            .fold(0.0, f64::max);
        if proj_grad <= GRAD_TOL {
            return result(x, fx, iter - 1, true);
        }
        for i in 0..n {
            d[i] = if free[i] {
                -(0..n)
                    .filter(|&j| free[j])
                    .map(|j| h[i * n + j] * g[j])
                    .sum::<f64>()
            } else {
                0.0
            };
        }
        if dot(&d, &g) >= 0.0 {
            identity(&mut h);
            fresh = true;
            for i in 0..n {
                d[i] = if free[i] { -g[i] } else { 0.0 };
            }
        }
        let longest = d.iter().fold(0.0, |m: f64, v| m.max(v.abs()));
        let mut step = (MAX_STEP / longest).min(1.0);
        let mut accepted = false;
        let mut f_new = f64::INFINITY;
        for _ in 0..60 {
            for i in 0..n {
                x_new[i] = x[i] + step * d[i];
            }
            clamp_box(&mut x_new);
            let slope: f64 = (0..n).map(|i| g[i] * (x_new[i] - x[i])).sum();
            if x_new == x {
                break;
            }
            f_new = f(&x_new, &mut g_new);
            if f_new.is_finite()
                && g_new.iter().all(|v| v.is_finite())
                && f_new <= fx + 1e-4 * slope
            {
                accepted = true;
                break;
            }
            // Quadratic interpolation of the step, kept within [0.1, 0.5] of it.
            let shrink = if f_new.is_finite() && slope < 0.0 {
                (-slope / (2.0 * (f_new - fx - slope))).clamp(0.1, 0.5)
            } else {
                0.25
            };
            step *= shrink;
        }
        if !accepted {
            if !fresh {
                identity(&mut h);
                fresh = true;
                continue;
            }
            // No descent possible along the gradient: at the optimum up to
            // rounding if the gradient is small.
            return result(x, fx, iter, proj_grad <= 1e-6);
        }
        let s: Vec<f64> = (0..n).map(|i| x_new[i] - x[i]).collect();
        let y: Vec<f64> = (0..n).map(|i| g_new[i] - g[i]).collect();
        let sy = dot(&s, &y);
        let yy = dot(&y, &y);
        if sy > 1e-12 * dot(&s, &s).sqrt() * yy.sqrt() {
            if fresh {
                // Scale the first estimate to the observed curvature.
                let scale = sy / yy;
                h.iter_mut().for_each(|v| *v *= scale);
                fresh = false;
            }
            // H <- (I - ρ s yᵀ) H (I - ρ y sᵀ) + ρ s sᵀ
            let rho = 1.0 / sy;
            let hy: Vec<f64> = (0..n)
                .map(|i| (0..n).map(|j| h[i * n + j] * y[j]).sum())
                .collect();
            let yhy = dot(&y, &hy);
            for i in 0..n {
                for j in 0..n {
                    h[i * n + j] += -rho * (hy[i] * s[j] + s[i] * hy[j])
                        + (rho * rho * yhy + rho) * s[i] * s[j];
                }
            }
        }
        let small_change = (fx - f_new).abs() <= VALUE_TOL * (1.0 + fx.abs())
            && s.iter().all(|v| v.abs() <= STEP_TOL);
        x.copy_from_slice(&x_new);
        g.copy_from_slice(&g_new);
        fx = f_new;
        if small_change {
            return result(x, fx, iter, true);
        }
    }
    result(x, fx, BFGS_MAX_ITER, false)
}

/// Nelder–Mead simplex search on the box of log-parameters (a fallback for
/// when BFGS fails).
fn nelder_mead(f: &mut Objective<'_>, start: &[f64]) -> OptResult {
    let n = start.len();
    let mut scratch = vec![0.0; n];
    let mut eval = |x: &[f64]| {
        let v = f(x, &mut scratch);
        if v.is_finite() {
            v
        } else {
            f64::INFINITY
        }
    };
    let mut first = start.to_vec();
    clamp_box(&mut first);
    let mut simplex: Vec<(Vec<f64>, f64)> = Vec::with_capacity(n + 1);
    simplex.push((first.clone(), eval(&first)));
    for i in 0..n {
        let mut v = first.clone();
        v[i] += if v[i] > 0.0 { -0.5 } else { 0.5 };
        let fv = eval(&v);
        simplex.push((v, fv));
    }
    let point = |centroid: &[f64], worst: &[f64], t: f64| {
        let mut p: Vec<f64> = centroid
            .iter()
            .zip(worst)
            .map(|(c, w)| c + t * (w - c))
            .collect();
        clamp_box(&mut p);
        p
    };
    let mut iterations = 0;
    let mut converged = false;
    while iterations < NELDER_MEAD_MAX_ITER {
        simplex.sort_by(|a, b| a.1.total_cmp(&b.1));
        let (best, worst) = (simplex[0].1, simplex[n].1);
        let size = simplex[1..]
            .iter()
            .flat_map(|(v, _)| v.iter().zip(&simplex[0].0).map(|(a, b)| (a - b).abs()))
            .fold(0.0, f64::max);
        if (worst - best).abs() <= VALUE_TOL * (1.0 + best.abs()) && size <= 1e-7 {
            converged = true;
            break;
        }
        iterations += 1;
        let mut centroid = vec![0.0; n];
        for (v, _) in &simplex[..n] {
            for (c, x) in centroid.iter_mut().zip(v) {
                *c += x / n as f64;
            }
        }
        let reflected = point(&centroid, &simplex[n].0, -1.0);
        let fr = eval(&reflected);
        if fr < simplex[0].1 {
            let expanded = point(&centroid, &simplex[n].0, -2.0);
            let fe = eval(&expanded);
            simplex[n] = if fe < fr {
                (expanded, fe)
            } else {
                (reflected, fr)
            };
        } else if fr < simplex[n - 1].1 {
            simplex[n] = (reflected, fr);
        } else {
            let t = if fr < simplex[n].1 { -0.5 } else { 0.5 };
            let contracted = point(&centroid, &simplex[n].0, t);
            let fc = eval(&contracted);
            if fc < fr.min(simplex[n].1) {
                simplex[n] = (contracted, fc);
            } else {
                // Shrink towards the best point.
                let anchor = simplex[0].0.clone();
                for entry in simplex.iter_mut().skip(1) {
                    let mut v: Vec<f64> = anchor
                        .iter()
                        .zip(&entry.0)
                        .map(|(a, x)| a + 0.5 * (x - a))
                        .collect();
                    clamp_box(&mut v);
                    let fv = eval(&v);
                    *entry = (v, fv);
                }
            }
        }
    }
    simplex.sort_by(|a, b| a.1.total_cmp(&b.1));
    let (x, f) = simplex.swap_remove(0);
    OptResult {
        x,
        f,
        iterations,
        converged,
    }
}

// ---------------------------------------------------------------------------
// Special functions
// ---------------------------------------------------------------------------

/// `ζ(k) - 1` for k = 2..=30: coefficients of the series of ln Γ about 2,
/// `ln Γ(2+ε) = (1-γ)ε + Σ_{k≥2} (-1)^k (ζ(k)-1)/k · ε^k`.
const ZETA_MINUS_ONE: [f64; 29] = [
    0.6449340668482264,
    0.2020569031595943,
    0.08232323371113819,
    0.03692775514336993,
    0.01734306198444914,
    0.008349277381922827,
    0.00407735619794434,
    0.0020083928260822143,
    0.0009945751278180853,
    0.0004941886041194645,
    0.0002460865533080483,
    0.00012271334757848915,
    6.124813505870483e-05,
    3.058823630702049e-05,
    1.528225940865187e-05,
    7.637197637899763e-06,
    3.81729326499984e-06,
    1.908212716553939e-06,
    9.539620338727962e-07,
    4.769329867878064e-07,
    2.38450502727733e-07,
    1.1921992596531106e-07,
    5.960818905125948e-08,
    2.980350351465228e-08,
    1.4901554828365043e-08,
    7.45071178983543e-09,
    3.725334024788457e-09,
    1.862659723513049e-09,
    9.313274324196682e-10,
];
/// Euler–Mascheroni constant γ.
const EULER_GAMMA: f64 = 0.5772156649015329;
/// `ln(2π)/2`.
const HALF_LN_2PI: f64 = 0.9189385332046728;

/// `ln Γ(2+ε)` for `|ε| <= 1/2` from the zeta series (Horner form).
fn ln_gamma_near_two(eps: f64) -> f64 {
    let mut acc = 0.0;
    for (i, z) in ZETA_MINUS_ONE.iter().enumerate().rev() {
        let k = (i + 2) as f64;
        let coeff = if i % 2 == 0 { z / k } else { -z / k };
        acc = (acc + coeff) * eps;
    }
    (acc + (1.0 - EULER_GAMMA)) * eps
}

/// Natural logarithm of the gamma function for `x > 0`, accurate to a few
/// units in the last place (relative). `ln_gamma(0) = +inf`; NaN for `x < 0`
/// or NaN.
pub fn ln_gamma(x: f64) -> f64 {
    if x.is_nan() || x < 0.0 {
        return f64::NAN;
    }
    if x == 0.0 || x == f64::INFINITY {
        return f64::INFINITY;
    }
    if x < 0.5 {
        // ln Γ(x) = ln Γ(x+2) - ln(x+1) - ln x, with x+2 = 2 + ε, ε = x exact.
        return ln_gamma_near_two(x) - x.ln_1p() - x.ln();
    }
    if x < 1.5 {
        // ln Γ(x) = ln Γ(x+1) - ln x; x - 1 is exact here.
        let eps = x - 1.0;
        return ln_gamma_near_two(eps) - eps.ln_1p();
    }
    if x <= 2.5 {
        return ln_gamma_near_two(x - 2.0);
    }
    if x < 13.0 {
        // Recur down into [1.5, 2.5): ln Γ(x) = ln Γ(x-n) + ln((x-1)...(x-n)).
        let n = (x - 1.5).floor();
        let mut product = 1.0;
        let mut k = 1.0;
        while k <= n {
            product *= x - k;
            k += 1.0;
        }
        return ln_gamma_near_two(x - n - 2.0) + product.ln();
    }
    // Stirling's series with terms B_2k / (2k (2k-1) x^(2k-1)), k = 1..8.
    let r = 1.0 / x;
    let r2 = r * r;
    let series = r
        * (1.0 / 12.0
            + r2 * (-1.0 / 360.0
                + r2 * (1.0 / 1260.0
                    + r2 * (-1.0 / 1680.0
                        + r2 * (1.0 / 1188.0
                            + r2 * (-691.0 / 360360.0
                                + r2 * (1.0 / 156.0 + r2 * (-3617.0 / 122400.0))))))));
    (x - 0.5) * x.ln() - x + HALF_LN_2PI + series
}

/// Digamma function ψ(x) = d/dx ln Γ(x) for `x > 0` (recurrence up to 10,
/// then the asymptotic series); absolute accuracy about 1e-15.
fn digamma(x: f64) -> f64 {
    let mut x = x;
    let mut acc = 0.0;
    while x < 10.0 {
        acc -= 1.0 / x;
        x += 1.0;
    }
    let r2 = 1.0 / (x * x);
    acc + x.ln()
        - 0.5 / x
        - r2 * (1.0 / 12.0
            - r2 * (1.0 / 120.0
                - r2 * (1.0 / 252.0
                    - r2 * (1.0 / 240.0
                        - r2 * (1.0 / 132.0 - r2 * (691.0 / 32760.0 - r2 / 12.0))))))
}

/// Which hypergeometric sum to compute.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `2F1(a, b; c; z) = Σ_{n≥0} (a)_n (b)_n / ((c)_n n!) z^n`.
    Full,
    /// `S(a, b, c; z) = Σ_{n≥1} (a)_n (b+1)_(n-1) / ((c+1)_(n-1) n!) z^n`,
    /// equal to `c/b · (2F1(a, b; c; z) - 1)` when `b, c != 0` and finite
    /// at `b = 0` or `c = 0`. It solves the hypergeometric equation with
    /// right-hand side `c·a`.
    Scaled,
}

/// Relative size of the neglected tail of a sum.
const SUM_TOL: f64 = 1e-17;
/// Largest `|z|` summed by the power series about 0 without a term limit.
const SERIES_MAX_Z: f64 = 0.5;
/// A Taylor step of the continuation covers at most this fraction of the
/// distance to the nearer singular point (0 or 1).
const STEP_FRACTION: f64 = 0.5;
/// Work limits for `1/2 < z < 1` (about 1 ms each): beyond them the value is
/// NaN. They are reached only when `c` or `|c-a-b|` is in the tens of
/// thousands and `z` is very close to 1 (in BG/NBD: `b` near the optimiser's
/// bound 1e6 with horizons far beyond `alpha + T`).
const MAX_SERIES_TERMS_NEAR_ONE: f64 = 200_000.0;
const MAX_TAYLOR_STEPS: u32 = 20_000;

fn is_nonpositive_integer(v: f64) -> bool {
    v <= 0.0 && v.fract() == 0.0
}

/// Power series about 0 of `kind` at `z`: returns the sum and its derivative
/// with respect to `z`, or `None` if it did not converge within `max_terms`.
fn hyp_series(kind: Kind, a: f64, b: f64, c: f64, z: f64, max_terms: u32) -> Option<(f64, f64)> {
    if z == 0.0 {
        return Some(match kind {
            Kind::Full => (1.0, a * b / c),
            Kind::Scaled => (0.0, a),
        });
    }
    let (mut n, mut term) = match kind {
        Kind::Full => (0.0, 1.0),
        Kind::Scaled => (1.0, a * z),
    };
    let mut sum = term;
    let mut weighted = n * term; // Σ n t_n = z · derivative
                                 // Beyond this index no factor (a+n), (b+n), (c+n) changes sign, so the
                                 // term ratio varies smoothly and the tail can be bounded from it.
    let settled = 1.0 + (-a).max(-b).max(-c).max(0.0);
    for _ in 0..max_terms {
        if term == 0.0 {
            return Some((sum, weighted / z));
        }
        let ratio = (a + n) * (b + n) / ((c + n) * (n + 1.0)) * z;
        term *= ratio;
        n += 1.0;
        sum += term;
        weighted += n * term;
        if !sum.is_finite() || !weighted.is_finite() {
            return None;
        }
        if n > settled {
            let rho = ratio.abs().max(z.abs());
            if rho < 1.0 {
                let tail = term.abs() * rho / (1.0 - rho);
                let weighted_tail = tail * (n + 1.0 / (1.0 - rho));
                if tail <= SUM_TOL * sum.abs()
                    && weighted_tail <= SUM_TOL * (weighted.abs() + sum.abs())
                {
                    return Some((sum, weighted / z));
                }
            }
        }
    }
    None
}

/// One Taylor step of a solution `w` of
/// `z(1-z) w'' + (c - (a+b+1) z) w' - a b w = rhs` from `z0` (given `w`, `w'`
/// there) to `z0 + h`; returns `w` and `w'` at `z0 + h`.
#[allow(clippy::too_many_arguments)]
fn taylor_step(a: f64, b: f64, c: f64, rhs: f64, z0: f64, w: f64, dw: f64, h: f64) -> (f64, f64) {
    // With u_n = w^(n)(z0)/n! · h^n the equation gives
    // u_{n+2} = (h² ((n+a)(n+b) u_n + [n=0] rhs) - h (e n + q) (n+1) u_{n+1})
    //           / (p (n+1)(n+2)),  p = z0(1-z0), e = 1-2 z0, q = c - (a+b+1) z0.
    let p = z0 * (1.0 - z0);
    let e = 1.0 - 2.0 * z0;
    let q = c - (a + b + 1.0) * z0;
    let mut u0 = w;
    let mut u1 = dw * h;
    let mut sum = u0 + u1;
    let mut weighted = u1; // Σ n u_n = h · derivative
    let mut n = 0.0;
    for _ in 0..100_000 {
        let forcing = if n == 0.0 { rhs } else { 0.0 };
        let u2 = (h * h * ((n + a) * (n + b) * u0 + forcing) - h * (e * n + q) * (n + 1.0) * u1)
            / (p * (n + 1.0) * (n + 2.0));
        sum += u2;
        weighted += (n + 2.0) * u2;
        let last = u1.abs() + u2.abs();
        if n >= 2.0
            && last <= SUM_TOL * sum.abs()
            && (n + 2.0) * last <= SUM_TOL * (weighted.abs() + sum.abs())
        {
            break;
        }
        if !sum.is_finite() {
            break;
        }
        u0 = u1;
        u1 = u2;
        n += 1.0;
    }
    (sum, weighted / h)
}

/// Evaluates `kind` for `0 <= z < 1` without transformations: the power
/// series, or for `z > 1/2` when that converges slowly, the series at 1/2
/// continued to `z` along the differential equation.
///
/// Step sizes: the equation has local exponents `0, 1-c` at `z = 0` and
/// `0, c-a-b` at `z = 1`. A Taylor step of length `h` sums the series of the
/// local solution `(1-z)^(c-a-b)` with terms up to `((1+u)/(1-u))^|c-a-b|`
/// times its value (`u = h/(1-z0)`), and likewise for `z^(1-c)`; rounding
/// errors are magnified by that much. Keeping `u <= 1/|c-a-b|` and
/// `h/z0 <= 1/|c-1|` bounds the magnification by about `e^2`.
fn hyp_eval(kind: Kind, a: f64, b: f64, c: f64, z: f64) -> f64 {
    if z <= SERIES_MAX_Z {
        return hyp_series(kind, a, b, c, z, 2_000_000).map_or(f64::NAN, |v| v.0);
    }
    let (exponent_one, exponent_zero) = ((c - a - b).abs(), (c - 1.0).abs());
    // Give the series about as many terms as the continuation would take
    // (some 20 terms per step); large exponents mean short steps, but then
    // the series usually converges fast.
    let steps = exponent_zero.max(2.0) * (z / SERIES_MAX_Z).ln()
        + exponent_one.max(2.0) * (SERIES_MAX_Z / (1.0 - z)).ln();
    let budget = (20.0 * steps).clamp(500.0, MAX_SERIES_TERMS_NEAR_ONE) as u32;
    if let Some((v, _)) = hyp_series(kind, a, b, c, z, budget) {
        return v;
    }
    let Some((mut w, mut dw)) = hyp_series(kind, a, b, c, SERIES_MAX_Z, 2_000_000) else {
        return f64::NAN;
    };
    let rhs = match kind {
        Kind::Full => 0.0,
        Kind::Scaled => c * a,
    };
    let near_one = STEP_FRACTION.min(1.0 / exponent_one);
    let near_zero = STEP_FRACTION.min(1.0 / exponent_zero);
    let mut at = SERIES_MAX_Z;
    for _ in 0..MAX_TAYLOR_STEPS {
        let room = (near_one * (1.0 - at)).min(near_zero * at);
        let last = z - at <= room;
        // `next - at` is exact, so the steps add up to exactly `z`.
        let next = if last { z } else { at + room };
        (w, dw) = taylor_step(a, b, c, rhs, at, w, dw, next - at);
        if !w.is_finite() {
            return f64::NAN;
        }
        if last {
            return w;
        }
        at = next;
    }
    f64::NAN
}

/// Gauss hypergeometric function `2F1(a, b; c; z)` for real `z < 1`.
///
/// Power series for `|z| <= 1/2`; Pfaff's transformation for `z < -1/2`;
/// for `1/2 < z < 1`, Euler's transformation when `c-a-b < 0` and then
/// analytic continuation along the hypergeometric equation (see the module
/// documentation). Relative accuracy is about 1e-13 for the parameters met
/// in BG/NBD (checked against mpmath up to `z = 0.999999`). Polynomial cases
/// (`a` or `b` a non-positive integer) are summed directly for any finite
/// `z`. Returns NaN for `z >= 1`, for `c` a non-positive integer (a pole),
/// for NaN input, and when `c` or `|c-a-b|` is in the tens of thousands with
/// `z` very close to 1 (a work limit of about 1 ms); the value itself may
/// overflow to infinity.
pub fn hyp2f1(a: f64, b: f64, c: f64, z: f64) -> f64 {
    if a.is_nan() || b.is_nan() || c.is_nan() || z.is_nan() {
        return f64::NAN;
    }
    if a == 0.0 || b == 0.0 || z == 0.0 {
        return 1.0;
    }
    let degree = [a, b]
        .iter()
        .filter(|v| is_nonpositive_integer(**v))
        .map(|v| -v)
        .fold(f64::INFINITY, f64::min);
    if is_nonpositive_integer(c) && degree > -c {
        return f64::NAN;
    }
    if degree.is_finite() && z.is_finite() {
        // Terminating series: a polynomial of degree `degree`.
        let terms = (degree + 2.0).min(u32::MAX as f64) as u32;
        return hyp_series(Kind::Full, a, b, c, z, terms).map_or(f64::NAN, |v| v.0);
    }
    if z >= 1.0 || !z.is_finite() {
        return f64::NAN;
    }
    if z < -SERIES_MAX_Z {
        // Pfaff: 2F1(a, b; c; z) = (1-z)^-a 2F1(a, c-b; c; z/(z-1)).
        let w = z / (z - 1.0);
        return (-a * (-z).ln_1p()).exp() * hyp2f1(a, c - b, c, w);
    }
    if z > SERIES_MAX_Z && c - a - b < 0.0 {
        // Euler: 2F1(a, b; c; z) = (1-z)^(c-a-b) 2F1(c-a, c-b; c; z).
        return ((c - a - b) * (-z).ln_1p()).exp() * hyp_eval(Kind::Full, c - a, c - b, c, z);
    }
    hyp_eval(Kind::Full, a, b, c, z)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/cdnow");

    /// Reads a fixture CSV (header skipped) into rows of numbers.
    fn read_csv(name: &str) -> Vec<Vec<f64>> {
        let path = format!("{FIXTURES}/{name}");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        text.lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.split(',').map(|v| v.trim().parse().expect(l)).collect())
            .collect()
    }

    fn cdnow_customers() -> Vec<Customer> {
        read_csv("summary.csv")
            .iter()
            .map(|v| Customer::new(v[0], v[1], v[2]))
            .collect()
    }

    fn assert_rel(got: f64, want: f64, tol: f64, what: &str) {
        let err = if want == 0.0 {
            got.abs()
        } else {
            ((got - want) / want).abs()
        };
        assert!(
            err <= tol,
            "{what}: got {got:e}, want {want:e}, relative error {err:e} > {tol:e}"
        );
    }

    /// Parameters of the paper's CDNOW fit (rounded as published).
    const PAPER: BgNbd = BgNbd {
        r: 0.243,
        alpha: 4.414,
        a: 0.793,
        b: 2.426,
    };

    // ----- CDNOW acceptance -------------------------------------------------

    #[test]
    fn cdnow_bgnbd_fit_matches_paper() {
        let data = cdnow_customers();
        assert_eq!(data.len(), 2357);
        let fit = fit_bgnbd(&data).unwrap();
        let p = fit.params;
        assert_rel(p.r, 0.243, 0.005, "r");
        assert_rel(p.alpha, 4.414, 0.005, "alpha");
        assert_rel(p.a, 0.793, 0.005, "a");
        assert_rel(p.b, 2.426, 0.005, "b");
        assert!(
            (fit.log_likelihood - -9582.4).abs() <= 0.1,
            "log-likelihood {}",
            fit.log_likelihood
        );
        assert!(fit.converged);
        assert_eq!(fit.customers, 2357);
        assert!(
            fit.iterations > 0 && fit.iterations < 200,
            "{}",
            fit.iterations
        );
        // The summed per-customer log-likelihood agrees with the fit's.
        let total: f64 = data.iter().map(|c| p.log_likelihood(c)).sum();
        assert!((total - fit.log_likelihood).abs() < 1e-6, "{total}");
    }

    #[test]
    fn cdnow_customer_predictions() {
        let fit = fit_bgnbd(&cdnow_customers()).unwrap().params;
        let c = Customer::new(2.0, 30.43, 38.86);
        let e = fit.expected_purchases(&c, 39.0);
        assert!((e - 1.2259).abs() <= 0.001, "E[Y(39)] = {e}");
        let alive = fit.p_alive(&c);
        assert!((alive - 0.7266).abs() <= 0.001, "P(alive) = {alive}");
    }

    #[test]
    fn cdnow_calibration_and_holdout_totals() {
        let data = cdnow_customers();
        let model = fit_bgnbd(&data).unwrap().params;
        // Calibration: expected repeat purchases in (0, T] summed over
        // customers against the observed total.
        let observed: f64 = data.iter().map(|c| c.x).sum();
        assert_eq!(observed, 2457.0);
        let expected: f64 = data.iter().map(|c| model.expected_purchases_new(c.t)).sum();
        assert_rel(
            expected,
            observed,
            0.03,
            "calibration-period repeat purchases",
        );
        // Holdout: repeat purchases (distinct days) from 1997-10-01 to
        // 1998-06-30, 39 weeks, counted from the raw transactions.
        let raw = std::fs::read_to_string(format!("{FIXTURES}/CDNOW_sample.txt")).unwrap();
        let mut days: Vec<(u32, u32)> = raw
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[1].parse().unwrap(), f[2].parse().unwrap())
            })
            .collect();
        days.sort_unstable();
        days.dedup();
        let holdout = days.iter().filter(|(_, d)| *d > 19970930).count() as f64;
        assert_eq!(holdout, 1882.0);
        let predicted: f64 = data.iter().map(|c| model.expected_purchases(c, 39.0)).sum();
        // The BG/NBD under-forecasts this holdout by about 12%.
        assert_rel(predicted, holdout, 0.15, "holdout repeat purchases");
        assert!(predicted > 1600.0 && predicted < 1700.0, "{predicted}");
    }

    #[test]
    fn cdnow_gamma_gamma_fit() {
        let rows = read_csv("summary_with_spend.csv");
        let spend: Vec<(f64, f64)> = rows
            .iter()
            .filter(|v| v[0] > 0.0)
            .map(|v| (v[0], v[3]))
            .collect();
        assert_eq!(spend.len(), 946);
        let fit = fit_gamma_gamma(&spend).unwrap();
        assert_rel(fit.params.p, 6.25, 0.005, "p");
        assert_rel(fit.params.q, 3.74, 0.005, "q");
        assert_rel(fit.params.gamma, 15.44, 0.005, "gamma");
        assert!(fit.converged);
        assert_eq!(fit.customers, 946);
        let total: f64 = spend
            .iter()
            .map(|&(x, m)| fit.params.log_likelihood(x, m))
            .sum();
        assert!((total - fit.log_likelihood).abs() < 1e-6);
        // All rows, x = 0 included: those are skipped, same fit.
        let all: Vec<(f64, f64)> = rows.iter().map(|v| (v[0], v[3])).collect();
        let again = fit_gamma_gamma(&all).unwrap();
        assert_eq!(again.customers, 946);
        assert_rel(again.params.p, fit.params.p, 1e-9, "p with x = 0 rows");
    }

    #[test]
    fn merged_rows_and_time_units_do_not_change_the_optimum() {
        let data = cdnow_customers();
        let base = fit_bgnbd(&data).unwrap();
        // Every customer twice: same parameters, twice the log-likelihood.
        let doubled: Vec<Customer> = data.iter().chain(&data).copied().collect();
        let fit = fit_bgnbd(&doubled).unwrap();
        assert_eq!(fit.customers, 2 * data.len());
        assert_rel(
            fit.log_likelihood,
            2.0 * base.log_likelihood,
            1e-10,
            "doubled LL",
        );
        assert_rel(fit.params.r, base.params.r, 1e-6, "doubled r");
        assert_rel(fit.params.b, base.params.b, 1e-6, "doubled b");
        // Days instead of weeks: alpha scales by 7, r, a, b stay, and the
        // log-likelihood moves by -ln 7 per repeat purchase.
        let days: Vec<Customer> = data
            .iter()
            .map(|c| Customer::new(c.x, c.t_x * 7.0, c.t * 7.0))
            .collect();
        let fit = fit_bgnbd(&days).unwrap();
        assert_rel(
            fit.params.alpha,
            7.0 * base.params.alpha,
            1e-6,
            "alpha in days",
        );
        assert_rel(fit.params.r, base.params.r, 1e-6, "r in days");
        assert_rel(fit.params.a, base.params.a, 1e-6, "a in days");
        assert_rel(fit.params.b, base.params.b, 1e-6, "b in days");
        let repeat: f64 = data.iter().map(|c| c.x).sum();
        assert!((fit.log_likelihood - (base.log_likelihood - repeat * 7f64.ln())).abs() < 1e-6);
    }

    // ----- BG/NBD formulas ----------------------------------------------------

    /// (r, alpha, a, b, x, t_x, T, horizon, E[Y(horizon) | x, t_x, T]) from mpmath.
    const EXPECTED_PURCHASES_REFERENCE: [[f64; 9]; 13] = [
        [
            0.243,
            4.414,
            0.793,
            2.426,
            2.0,
            30.43,
            38.86,
            39.0,
            1.2260281747671444,
        ],
        [
            0.243,
            4.414,
            0.793,
            2.426,
            0.0,
            0.0,
            38.86,
            39.0,
            0.19509805201126262,
        ],
        [
            0.243,
            4.414,
            0.793,
            2.426,
            1.0,
            1.71,
            38.86,
            1e-06,
            6.09237702869695e-09,
        ],
        [
            0.243,
            4.414,
            0.793,
            2.426,
            300.0,
            350.0,
            365.0,
            100000.0,
            4.766212282643021,
        ],
        [
            0.243,
            4.414,
            0.793,
            2.426,
            300.0,
            350.0,
            365.0,
            10000000.0,
            15.826295232601275,
        ],
        [
            0.243,
            4.414,
            0.793,
            2.426,
            0.0,
            0.0,
            0.0,
            39.0,
            1.196723193320817,
        ],
        [
            0.243,
            4.414,
            0.793,
            2.426,
            0.0,
            0.0,
            0.0,
            78.0,
            1.8605190579427686,
        ],
        [
            5.0,
            10.0,
            1.0,
            0.8,
            2.0,
            10.0,
            20.0,
            100.0,
            0.6202018705136665,
        ],
        [
            5.0,
            10.0,
            1.000000001,
            0.8,
            2.0,
            10.0,
            20.0,
            100.0,
            0.6202018693799825,
        ],
        [
            0.5,
            2.0,
            0.25,
            0.75,
            0.0,
            0.0,
            10.0,
            50.0,
            1.4825456737567486,
        ],
        [
            0.5,
            60.0,
            8.0,
            40.0,
            0.0,
            0.0,
            5.0,
            10000.0,
            5.280089649128554,
        ],
        [
            0.5,
            60.0,
            8.0,
            40.0,
            3.0,
            4.0,
            5.0,
            10000.0,
            5.946620021075881,
        ],
        [
            2.0,
            1.0,
            1.3,
            0.2,
            12.0,
            40.0,
            41.0,
            2000.0,
            25.045994599731934,
        ],
    ];
    /// (r, alpha, a, b, x, t_x, T, log-likelihood) from mpmath.
    const BGNBD_LOG_LIKELIHOOD_REFERENCE: [[f64; 8]; 5] = [
        [
            0.243,
            4.414,
            0.793,
            2.426,
            2.0,
            30.43,
            38.86,
            -9.45860630706627,
        ],
        [
            0.243,
            4.414,
            0.793,
            2.426,
            0.0,
            0.0,
            38.86,
            -0.5547132764381585,
        ],
        [
            0.243,
            4.414,
            0.793,
            2.426,
            29.0,
            38.0,
            38.86,
            -44.442068525079065,
        ],
        [
            1.7,
            30.0,
            3.5,
            12.0,
            150.0,
            300.0,
            310.0,
            -277.53730020831694,
        ],
        [1.7, 30.0, 3.5, 12.0, 1.0, 0.01, 310.0, -4.354674341981481],
    ];
    /// (x, ln Γ(x)) from mpmath.
    const LN_GAMMA_REFERENCE: [[f64; 2]; 27] = [
        [1e-300, 690.7755278982137],
        [1e-10, 23.025850929882736],
        [0.001, 6.907178885383853],
        [0.1, 2.252712651734206],
        [0.4999, 0.5725613186041184],
        [0.5, 0.5723649429247001],
        [0.9, 0.06637623973474295],
        [0.999, 0.0005780385328913802],
        [1.0001, -5.771334222047127e-05],
        [1.2, -0.08537409000331583],
        [1.4999, -0.12078588195849393],
        [1.5, -0.12078223763524522],
        [1.9999, -4.227520877215346e-05],
        [2.0001, 4.2281658112919945e-05],
        [2.5, 0.2846828704729192],
        [2.5001, 0.2847531885887332],
        [3.0, std::f64::consts::LN_2],
        [3.7, 1.428072326665388],
        [7.3, 7.147892523022248],
        [12.99, 19.96195854446561],
        [13.0, 19.987214495661885],
        [20.5, 40.8315009745308],
        [100.0, 359.1342053695754],
        [1234.5, 7550.550901077895],
        [1000000.0, 12815504.569147611],
        [1000000000000000.0, 3.3538776394910668e+16],
        [1e+300, 6.897755278982137e+302],
    ];
    /// (x, ψ(x)) from mpmath.
    const DIGAMMA_REFERENCE: [[f64; 2]; 11] = [
        [1e-08, -100000000.57721564],
        [0.01, -100.56088545786868],
        [0.3, -3.502524222200133],
        [1.0, -0.5772156649015329],
        [1.4616321449683622, -9.241265521729427e-17],
        [2.5, 0.7031566406452432],
        [7.0, 1.8727843350984672],
        [9.99, 2.250700372831201],
        [10.01, 2.2528037003181356],
        [150.0, 5.007298257075679],
        [100000000.0, 18.420680738952367],
    ];

    #[test]
    fn bgnbd_log_likelihood_reference() {
        for v in BGNBD_LOG_LIKELIHOOD_REFERENCE {
            let m = BgNbd {
                r: v[0],
                alpha: v[1],
                a: v[2],
                b: v[3],
            };
            let got = m.log_likelihood(&Customer::new(v[4], v[5], v[6]));
            assert_rel(got, v[7], 1e-12, &format!("log-likelihood {v:?}"));
        }
    }

    #[test]
    fn expected_purchases_reference() {
        for v in EXPECTED_PURCHASES_REFERENCE {
            let m = BgNbd {
                r: v[0],
                alpha: v[1],
                a: v[2],
                b: v[3],
            };
            let c = Customer::new(v[4], v[5], v[6]);
            let got = m.expected_purchases(&c, v[7]);
            assert_rel(got, v[8], 1e-11, &format!("E[Y(t)] {v:?}"));
            if v[4] == 0.0 && v[6] == 0.0 {
                let new = m.expected_purchases_new(v[7]);
                assert_rel(new, v[8], 1e-11, &format!("E[X(t)] {v:?}"));
            }
        }
    }

    #[test]
    fn expected_purchases_new_behaviour() {
        // Slope at 0 is the mean purchase rate r/alpha.
        let h = 1e-7;
        assert_rel(
            PAPER.expected_purchases_new(h) / h,
            PAPER.r / PAPER.alpha,
            1e-6,
            "slope",
        );
        // Increasing in the horizon, 0 at 0.
        assert_eq!(PAPER.expected_purchases_new(0.0), 0.0);
        let mut last = 0.0;
        for i in 1..=60 {
            let e = PAPER.expected_purchases_new(f64::from(i) * 13.0);
            assert!(e > last, "not increasing at {i}: {e} <= {last}");
            last = e;
        }
        // a > 1: bounded by E[1/p] - 1 = (a+b-1)/(a-1), reached at infinity.
        let m = BgNbd {
            r: 0.5,
            alpha: 10.0,
            a: 3.0,
            b: 4.0,
        };
        let limit = (m.a + m.b - 1.0) / (m.a - 1.0);
        assert_eq!(m.expected_purchases_new(f64::INFINITY), limit);
        let far = m.expected_purchases_new(1e12);
        assert!(far < limit && far > 0.999 * limit, "{far} vs {limit}");
        // a <= 1: no bound.
        assert_eq!(PAPER.expected_purchases_new(f64::INFINITY), f64::INFINITY);
        assert!(PAPER.expected_purchases_new(1e9) > 100.0);
        assert!(PAPER.expected_purchases_new(-1.0).is_nan());
        assert!(PAPER.expected_purchases_new(f64::NAN).is_nan());
    }

    #[test]
    fn expected_purchases_smooth_through_a_equal_one() {
        // a = 1 is a removable singularity of the closed form.
        let c = Customer::new(3.0, 20.0, 30.0);
        let at = |a: f64| {
            BgNbd {
                r: 0.7,
                alpha: 5.0,
                a,
                b: 2.0,
            }
            .expected_purchases(&c, 80.0)
        };
        let mid = at(1.0);
        assert!(mid.is_finite() && mid > 0.0);
        for d in [1e-12, 1e-9, 1e-6] {
            let (lo, hi) = (at(1.0 - d), at(1.0 + d));
            assert!(
                lo > mid && mid > hi,
                "not monotone in a near 1: {lo} {mid} {hi}"
            );
            assert!(
                (hi - lo).abs() < 10.0 * d * mid,
                "jump near a = 1: {lo} {hi}"
            );
        }
    }

    #[test]
    fn p_alive_behaviour() {
        assert_eq!(PAPER.p_alive(&Customer::new(0.0, 0.0, 30.0)), 1.0);
        // Same frequency and age, older last purchase: less likely alive.
        let mut last = 1.0;
        for t_x in [38.0, 30.0, 20.0, 10.0, 1.0] {
            let p = PAPER.p_alive(&Customer::new(4.0, t_x, 38.86));
            assert!(p < last && p > 0.0, "{t_x}: {p}");
            last = p;
        }
        // A purchase at the end of observation: a/(b+x-1) odds of having died.
        let p = PAPER.p_alive(&Customer::new(2.0, 38.86, 38.86));
        assert_rel(
            p,
            1.0 / (1.0 + PAPER.a / (PAPER.b + 1.0)),
            1e-14,
            "P(alive) at t_x = T",
        );
    }

    #[test]
    fn predictions_stay_finite_over_wide_parameter_ranges() {
        let customers = [
            Customer::new(0.0, 0.0, 1e-3),
            Customer::new(1.0, 0.5, 1.0),
            Customer::new(50.0, 300.0, 365.0),
            Customer::new(400.0, 1000.0, 1000.0),
        ];
        let horizons = [0.5, 30.0, 1e4];
        for r in [0.01, 1.0, 10.0] {
            for alpha in [0.01, 1.0, 1e4] {
                for a in [0.01, 0.999, 1.0, 3.0, 100.0] {
                    for b in [0.01, 1.0, 100.0, 1e4] {
                        let m = BgNbd { r, alpha, a, b };
                        for c in &customers {
                            for t in horizons {
                                let e = m.expected_purchases(c, t);
                                // At most the purchases of a customer who never drops out.
                                let bound = m.p_alive(c) * (r + c.x) * t / (alpha + c.t);
                                assert!(
                                    e.is_finite() && e >= 0.0 && e <= bound * (1.0 + 1e-9),
                                    "{m:?} {c:?} t={t}: {e} (bound {bound})"
                                );
                            }
                        }
                    }
                }
            }
        }
        // At the corners of the optimiser's box: never negative or infinite
        // (NaN where nothing can be trusted), P(alive) a probability.
        for r in [PARAM_MIN, 1.0, PARAM_MAX] {
            for alpha in [PARAM_MIN, 1.0, PARAM_MAX] {
                for a in [PARAM_MIN, 1.0, PARAM_MAX] {
                    for b in [PARAM_MIN, 1.0, PARAM_MAX] {
                        let m = BgNbd { r, alpha, a, b };
                        for c in &customers {
                            let alive = m.p_alive(c);
                            assert!((0.0..=1.0).contains(&alive), "{m:?} {c:?}: {alive}");
                            assert!(m.log_likelihood(c).is_finite(), "{m:?} {c:?}");
                            for t in horizons {
                                let e = m.expected_purchases(c, t);
                                assert!(
                                    e.is_nan() || (e.is_finite() && e >= 0.0),
                                    "{m:?} {c:?}: {e}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    // ----- Gamma-Gamma formulas -----------------------------------------------

    #[test]
    fn gamma_gamma_density_integrates_to_one() {
        let g = GammaGamma {
            p: 6.25,
            q: 3.74,
            gamma: 15.44,
        };
        for x in [1.0, 3.0, 12.0] {
            // Midpoint rule in u = ln m over [-10, 15].
            let (lo, hi, n) = (-10.0, 15.0, 200_000);
            let du = (hi - lo) / f64::from(n);
            let total: f64 = (0..n)
                .map(|i| {
                    let u = lo + (f64::from(i) + 0.5) * du;
                    (g.log_likelihood(x, u.exp()) + u).exp() * du
                })
                .sum();
            assert_rel(total, 1.0, 1e-8, &format!("density mass at x = {x}"));
        }
    }

    #[test]
    fn expected_spend_shrinks_towards_population_mean() {
        let g = GammaGamma {
            p: 6.25,
            q: 3.74,
            gamma: 15.44,
        };
        let population = g.p * g.gamma / (g.q - 1.0);
        assert_rel(g.expected_spend(0.0, 123.0), population, 1e-15, "x = 0");
        for (x, m) in [(1.0, 10.0), (2.0, 22.35), (10.0, 80.0), (1000.0, 5.0)] {
            let e = g.expected_spend(x, m);
            let (lo, hi) = if m < population {
                (m, population)
            } else {
                (population, m)
            };
            assert!(e > lo && e < hi, "x = {x}, m = {m}: {e}");
        }
        // More purchases, more weight on the customer's own mean.
        let few = g.expected_spend(1.0, 80.0);
        let many = g.expected_spend(50.0, 80.0);
        assert!(many > few && 80.0 - many < 1.0, "{few} {many}");
        // Infinite population mean: no finite expectation.
        assert!(GammaGamma {
            p: 1.0,
            q: 0.5,
            gamma: 1.0
        }
        .expected_spend(0.0, 10.0)
        .is_nan());
    }

    // ----- Lifetime value -----------------------------------------------------

    #[test]
    fn lifetime_value_behaviour() {
        let g = GammaGamma {
            p: 6.25,
            q: 3.74,
            gamma: 15.44,
        };
        let c = Customer::new(2.0, 30.43, 38.86);
        let spend = g.expected_spend(c.x, 22.35);
        // Zero discount: the sum telescopes to E[Y(n·len)] · spend.
        for n in [1, 6, 24] {
            let ltv = lifetime_value(&PAPER, &g, &c, 22.35, n, 4.0, 0.0);
            let want = PAPER.expected_purchases(&c, f64::from(n) * 4.0) * spend;
            assert_rel(ltv, want, 1e-12, &format!("undiscounted, {n} periods"));
        }
        // Non-decreasing in the number of periods; discounting lowers it.
        let mut last = 0.0;
        for n in 0..=36 {
            let ltv = lifetime_value(&PAPER, &g, &c, 22.35, n, 4.0, 0.01);
            assert!(ltv >= last, "{n}: {ltv} < {last}");
            if n > 0 {
                let undiscounted = lifetime_value(&PAPER, &g, &c, 22.35, n, 4.0, 0.0);
                assert!(ltv < undiscounted, "{n}: {ltv} >= {undiscounted}");
            }
            last = ltv;
        }
        assert_eq!(lifetime_value(&PAPER, &g, &c, 22.35, 0, 4.0, 0.01), 0.0);
        let purchases = discounted_purchases(&PAPER, &c, 12, 4.0, 0.02);
        assert!(purchases > 0.0 && purchases < PAPER.expected_purchases(&c, 48.0));
        let ltv = lifetime_value(&PAPER, &g, &c, 22.35, 12, 4.0, 0.02);
        assert_rel(
            ltv,
            purchases * spend,
            1e-15,
            "lifetime value = purchases × spend",
        );
        // One period: the first period's purchases discounted once.
        let one = lifetime_value(&PAPER, &g, &c, 22.35, 1, 4.0, 0.25);
        assert_rel(
            one,
            PAPER.expected_purchases(&c, 4.0) * spend / 1.25,
            1e-14,
            "one period",
        );
        assert!(lifetime_value(&PAPER, &g, &c, 22.35, 3, -1.0, 0.01).is_nan());
        assert!(lifetime_value(&PAPER, &g, &c, 22.35, 3, 4.0, -1.0).is_nan());
        assert!(lifetime_value(&PAPER, &g, &c, 22.35, 3, f64::NAN, 0.0).is_nan());
    }

    // ----- Input validation and errors ----------------------------------------

    #[test]
    fn invalid_customers_are_reported_with_index_and_field() {
        let good = Customer::new(1.0, 2.0, 3.0);
        let cases = [
            (Customer::new(f64::NAN, 0.0, 3.0), "x"),
            (Customer::new(1.0, f64::INFINITY, 3.0), "t_x"),
            (Customer::new(1.0, 1.0, f64::NEG_INFINITY), "T"),
            (Customer::new(-1.0, 0.0, 3.0), "x"),
            (Customer::new(1.5, 1.0, 3.0), "x"),
            (Customer::new(1.0, -0.5, 3.0), "t_x"),
            (Customer::new(1.0, 4.0, 3.0), "t_x"),
            (Customer::new(0.0, 0.0, 0.0), "T"),
            (Customer::new(0.0, 0.0, -2.0), "T"),
            (Customer::new(2.0, 0.0, 3.0), "t_x"),
            (Customer::new(0.0, 1.0, 3.0), "t_x"),
        ];
        for (bad, field) in cases {
            let data = [good, good, bad, good];
            match fit_bgnbd(&data) {
                Err(ModelError::InvalidCustomer {
                    index,
                    field: f,
                    reason,
                    ..
                }) => {
                    assert_eq!((index, f), (2, field), "{bad:?}: {reason}");
                }
                other => panic!("{bad:?}: expected InvalidCustomer, got {other:?}"),
            }
            let message = fit_bgnbd(&data).unwrap_err().to_string();
            assert!(
                message.contains("index 2") && message.contains(field),
                "{message}"
            );
        }
        assert!(good.validate(0).is_ok());
        assert!(Customer::new(0.0, 0.0, 5.0).validate(0).is_ok());
        assert!(Customer::new(3.0, 5.0, 5.0).validate(0).is_ok());
    }

    #[test]
    fn empty_and_no_repeat_inputs_are_errors() {
        assert_eq!(
            fit_bgnbd(&[]).unwrap_err(),
            ModelError::NoCustomers { model: MODEL_BG }
        );
        assert_eq!(
            fit_gamma_gamma(&[]).unwrap_err(),
            ModelError::NoCustomers { model: MODEL_GG }
        );
        let zeros = vec![Customer::new(0.0, 0.0, 10.0); 5];
        let err = fit_bgnbd(&zeros).unwrap_err();
        assert_eq!(
            err,
            ModelError::NoRepeatPurchases {
                model: MODEL_BG,
                customers: 5
            }
        );
        assert!(err.to_string().contains("x = 0"), "{err}");
        let err = fit_gamma_gamma(&[(0.0, 0.0), (0.0, 12.0)]).unwrap_err();
        assert_eq!(
            err,
            ModelError::NoRepeatPurchases {
                model: MODEL_GG,
                customers: 2
            }
        );
        assert!(err.to_string().contains("x > 0"), "{err}");
        let boxed: Box<dyn std::error::Error> = Box::new(err);
        assert!(!boxed.to_string().is_empty());
    }

    #[test]
    fn invalid_spend_rows_are_reported() {
        let cases = [
            ((1.0, 0.0), "mean_spend"),
            ((2.0, -3.0), "mean_spend"),
            ((2.0, f64::NAN), "mean_spend"),
            ((2.0, f64::INFINITY), "mean_spend"),
            ((-1.0, 5.0), "x"),
            ((0.5, 5.0), "x"),
            ((f64::NAN, 5.0), "x"),
        ];
        for (bad, field) in cases {
            let data = [(1.0, 10.0), bad];
            match fit_gamma_gamma(&data) {
                Err(ModelError::InvalidCustomer {
                    index: 1, field: f, ..
                }) => {
                    assert_eq!(f, field, "{bad:?}");
                }
                other => panic!("{bad:?}: expected InvalidCustomer at 1, got {other:?}"),
            }
        }
    }

    #[test]
    fn odd_but_valid_inputs_do_not_panic() {
        let datasets: Vec<Vec<Customer>> = vec![
            vec![Customer::new(1.0, 1.0, 2.0)],
            vec![Customer::new(5.0, 10.0, 10.0); 50],
            {
                let mut v = vec![Customer::new(0.0, 0.0, 100.0); 1000];
                v.push(Customer::new(1.0, 3.0, 100.0));
                v
            },
            vec![
                Customer::new(1e6, 1e-300, 1e300),
                Customer::new(0.0, 0.0, 1e-300),
                Customer::new(3.0, 1e300, 1e300),
            ],
        ];
        for data in datasets {
            match fit_bgnbd(&data) {
                Ok(fit) => {
                    let p = fit.params;
                    for v in [p.r, p.alpha, p.a, p.b] {
                        assert!((PARAM_MIN..=PARAM_MAX).contains(&v), "{fit:?}");
                    }
                    assert!(fit.log_likelihood.is_finite(), "{fit:?}");
                }
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        }
        for data in [
            vec![(1.0, 5.0)],
            vec![(3.0, 1e-300), (1e6, 1e300)],
            vec![(2.0, 7.0); 20],
        ] {
            if let Ok(fit) = fit_gamma_gamma(&data) {
                assert!(fit.log_likelihood.is_finite(), "{fit:?}");
            }
        }
    }

    // ----- Parallel sum and optimiser -----------------------------------------

    #[test]
    fn parallel_sum_is_independent_of_thread_count() {
        // 70k distinct customers: enough rows for several chunks.
        let data: Vec<Customer> = (0..70_000u32)
            .map(|i| {
                let t = 20.0 + f64::from(i % 977) * 0.37 + f64::from(i) * 1e-6;
                let x = f64::from(i % 7);
                let t_x = if x > 0.0 {
                    t * f64::from(1 + i % 13) / 14.0
                } else {
                    0.0
                };
                Customer::new(x, t_x, t)
            })
            .collect();
        let rows = prepare_bgnbd(&data).unwrap();
        assert_eq!(rows.weight.len(), data.len());
        let theta = [0.3f64.ln(), 5.0f64.ln(), 0.8f64.ln(), 2.0f64.ln()];
        let mut g1 = [0.0; 4];
        let f1 = bg_objective(&rows, &theta, &mut g1, 1);
        for threads in [2, 3] {
            let mut g = [0.0; 4];
            let f = bg_objective(&rows, &theta, &mut g, threads);
            assert_eq!(f.to_bits(), f1.to_bits(), "{threads} threads");
            assert_eq!(g, g1, "{threads} threads");
        }
        // The analytic gradient matches central differences.
        for k in 0..4 {
            let h = 1e-6;
            let (mut up, mut down) = (theta, theta);
            up[k] += h;
            down[k] -= h;
            let mut scratch = [0.0; 4];
            let numeric = (bg_objective(&rows, &up, &mut scratch, 2)
                - bg_objective(&rows, &down, &mut scratch, 2))
                / (2.0 * h);
            assert!(
                (numeric - g1[k]).abs() < 1e-7,
                "d/dθ{k}: {numeric} vs {}",
                g1[k]
            );
        }
    }

    #[test]
    fn gamma_gamma_gradient_matches_differences() {
        let data: Vec<(f64, f64)> = (1..500u32)
            .map(|i| (f64::from(1 + i % 9), 5.0 + f64::from(i % 37) * 1.3))
            .collect();
        let rows = prepare_gamma_gamma(&data).unwrap();
        let theta = [2.0f64.ln(), 4.0f64.ln(), 20.0f64.ln()];
        let mut g = [0.0; 3];
        bg_free_check(&rows, &theta, &mut g);
        for k in 0..3 {
            let h = 1e-6;
            let (mut up, mut down) = (theta, theta);
            up[k] += h;
            down[k] -= h;
            let mut scratch = [0.0; 3];
            let numeric = (gg_objective(&rows, &up, &mut scratch, 1)
                - gg_objective(&rows, &down, &mut scratch, 1))
                / (2.0 * h);
            assert!(
                (numeric - g[k]).abs() < 1e-7,
                "d/dθ{k}: {numeric} vs {}",
                g[k]
            );
        }
    }

    fn bg_free_check(rows: &GgRows, theta: &[f64], g: &mut [f64]) {
        let f = gg_objective(rows, theta, g, 1);
        assert!(f.is_finite());
    }

    #[test]
    fn optimisers_find_known_minima() {
        // Rosenbrock valley, minimum 0 at (1, 1).
        let mut rosen = |v: &[f64], g: &mut [f64]| {
            let (x, y) = (v[0], v[1]);
            g[0] = -2.0 * (1.0 - x) - 400.0 * x * (y - x * x);
            g[1] = 200.0 * (y - x * x);
            (1.0 - x).powi(2) + 100.0 * (y - x * x).powi(2)
        };
        let r = bfgs(&mut rosen, &[-1.2, 1.0]);
        assert!(r.converged, "BFGS did not converge");
        assert!(
            (r.x[0] - 1.0).abs() < 1e-6 && (r.x[1] - 1.0).abs() < 1e-6,
            "{:?}",
            r.x
        );
        let r = nelder_mead(&mut rosen, &[-1.2, 1.0]);
        assert!(
            (r.x[0] - 1.0).abs() < 1e-4 && (r.x[1] - 1.0).abs() < 1e-4,
            "{:?}",
            r.x
        );
        // A minimum outside the box ends on the bound.
        let (_, hi) = log_bounds();
        let mut outside = |v: &[f64], g: &mut [f64]| {
            g[0] = 2.0 * (v[0] - 20.0);
            (v[0] - 20.0).powi(2)
        };
        let r = minimize(&mut outside, &[0.0]);
        assert!((r.x[0] - hi).abs() < 1e-12 && r.converged, "{:?}", r.x);
    }

    // ----- Special functions --------------------------------------------------

    /// (a, b, c, z, 2F1) with reference values from mpmath (60 digits).
    const HYP2F1_REFERENCE: [[f64; 5]; 67] = [
        [0.243, 2.426, 2.2190000000000003, 0.3, 1.100518533085473],
        [0.243, 2.426, 2.2190000000000003, 0.95, 2.446186677030991],
        [0.243, 2.426, 2.2190000000000003, 0.999, 11.096504288680475],
        [2.243, 4.426, 4.219, 0.3, 2.3210724757825294],
        [2.243, 4.426, 4.219, 0.95, 1344.3402781759899],
        [2.243, 4.426, 4.219, 0.999, 19296250.906926643],
        [30.243, 32.426, 32.219, 0.3, 51890.68352582847],
        [30.243, 32.426, 32.219, 0.95, 4.082269370127819e+39],
        [30.243, 32.426, 32.219, 0.999, 2.2092428218421384e+91],
        [300.243, 302.426, 302.219, 0.3, 3.4683051392515024e+46],
        [1.7, 12.0, 14.5, 0.3, 1.6297191318347517],
        [1.7, 12.0, 14.5, 0.95, 21.276018415686885],
        [1.7, 12.0, 14.5, 0.999, 62.28663418339571],
        [3.7, 14.0, 16.5, 0.3, 2.9944163326926483],
        [3.7, 14.0, 16.5, 0.95, 1951.2422150048822],
        [3.7, 14.0, 16.5, 0.999, 677007.3218541766],
        [31.7, 42.0, 44.5, 0.3, 41884.31075383831],
        [31.7, 42.0, 44.5, 0.95, 2.250622606015876e+38],
        [31.7, 42.0, 44.5, 0.999, 9.682565800882594e+87],
        [301.7, 312.0, 314.5, 0.3, 2.2910071996551143e+46],
        [0.05, 0.4, -0.3, 0.3, 0.9711375823558589],
        [0.05, 0.4, -0.3, 0.95, 0.019513052341154545],
        [0.05, 0.4, -0.3, 0.999, -20.616452586676196],
        [2.05, 2.4, 1.7, 0.3, 2.783365021594439],
        [2.05, 2.4, 1.7, 0.95, 4323.796593058577],
        [2.05, 2.4, 1.7, 0.999, 204647098.05895352],
        [30.05, 30.4, 29.7, 0.3, 58117.87673750494],
        [30.05, 30.4, 29.7, 0.95, 1.0234649000651278e+40],
        [30.05, 30.4, 29.7, 0.999, 1.792981644349951e+92],
        [300.05, 300.4, 299.7, 0.3, 3.862522049793936e+46],
        [5.0, 0.8, 0.8, 0.3, 5.94990182661986],
        [5.0, 0.8, 0.8, 0.95, 3199999.9999999856],
        [5.0, 0.8, 0.8, 0.999, 999999999999995.5],
        [7.0, 2.8, 2.8, 0.3, 12.142656789020123],
        [7.0, 2.8, 2.8, 0.95, 1279999999.9999921],
        [7.0, 2.8, 2.8, 0.999, 9.999999999999938e+20],
        [35.0, 30.8, 30.8, 0.3, 263978.5259853813],
        [35.0, 30.8, 30.8, 0.95, 3.4359738367998934e+45],
        [35.0, 30.8, 30.8, 0.999, 9.999999999999689e+104],
        [305.0, 300.8, 300.8, 0.3, 1.7583195127104147e+47],
        [0.5, 40.0, 47.0, 0.3, 1.1590017660787348],
        [0.5, 40.0, 47.0, 0.95, 2.34186216662957],
        [0.5, 40.0, 47.0, 0.999, 2.7094091512520886],
        [2.5, 42.0, 49.0, 0.3, 2.1061249074142845],
        [2.5, 42.0, 49.0, 0.95, 89.59100810090808],
        [2.5, 42.0, 49.0, 0.999, 240.64088770121623],
        [30.5, 70.0, 77.0, 0.3, 17898.997568978106],
        [30.5, 70.0, 77.0, 0.95, 2.3458285066532273e+33],
        [30.5, 70.0, 77.0, 0.999, 3.817912792402282e+73],
        [300.5, 340.0, 347.0, 0.3, 3.8802826438390304e+45],
        [1.5, 2.5, 3.7, -0.3, 0.7624783151494755],
        [0.7, 1.3, 2.2, -5.0, 0.4222844120986473],
        [0.7, 1.3, 2.2, -0.6, 0.8161924664590109],
        [-3.0, 2.5, 1.5, 0.7, -0.09900000000000002],
        [-3.0, 2.5, 1.5, -7.5, 1697.875],
        [2.0, 3.0, 5.0, 0.999, 53.295718788451865],
        [2.5, 1.5, 4.0, 0.9999, 37.27717771546119],
        [0.1, 0.2, 0.3, 0.8, 1.1083476692891436],
        [0.3, 0.7, 1.0, 0.999, 2.6981440420562968],
        [-0.5, 0.25, 1.75, 0.97, 0.9186358928733926],
        [3.0, 3.0, 6.0, 0.999999, 324.4685969395771],
        [46.5, 7.0, 77.0, 0.99, 1062.3079945868417],
        [300.0, 300.0, 600.5, 0.999, 2.30026150346409e+172],
        [5.5, 45.0, 52.0, 0.999, 1761542.9283511855],
        [1.5, 100.0, 101.0, 0.99, 487.37725794303066],
        [0.25, 0.75, -0.5, 0.6, -0.2991684506062879],
        [0.2, 0.3, -0.4, 0.95, -2.7032979324609543],
    ];

    #[test]
    fn hyp2f1_reference_values() {
        for v in HYP2F1_REFERENCE {
            let got = hyp2f1(v[0], v[1], v[2], v[3]);
            assert_rel(got, v[4], 1e-11, &format!("2F1{:?}", &v[..4]));
        }
    }

    #[test]
    fn hyp2f1_identities_and_edge_cases() {
        // 2F1(1, 1; 2; z) = -ln(1-z)/z.
        for z in [-50.0f64, -0.9, 0.2, 0.75, 0.999, 0.999_999, 1.0 - 1e-12] {
            let want = -(-z).ln_1p() / z;
            assert_rel(hyp2f1(1.0, 1.0, 2.0, z), want, 1e-12, &format!("z = {z}"));
        }
        // 2F1(a, b; b; z) = (1-z)^-a.
        assert_rel(
            hyp2f1(2.5, 3.25, 3.25, 0.9),
            0.1f64.powf(-2.5),
            1e-13,
            "(1-z)^-a",
        );
        // Polynomial: 2F1(-2, b; c; z) = 1 - 2bz/c + b(b+1)z²/(c(c+1)).
        let (b, c, z) = (1.5, 2.5, 3.0);
        let want = 1.0 - 2.0 * b * z / c + b * (b + 1.0) * z * z / (c * (c + 1.0));
        assert_rel(hyp2f1(-2.0, b, c, z), want, 1e-14, "polynomial");
        // A polynomial that stops before the pole of c is fine.
        assert_rel(
            hyp2f1(-1.0, 2.0, -3.0, 0.5),
            1.0 + 2.0 * 0.5 / 3.0,
            1e-15,
            "c = -3",
        );
        assert_eq!(hyp2f1(0.3, 0.4, 0.5, 0.0), 1.0);
        assert!(hyp2f1(0.3, 0.4, -2.0, 0.5).is_nan());
        assert!(hyp2f1(0.3, 0.4, 0.5, 1.0).is_nan());
        assert!(hyp2f1(0.3, 0.4, 0.5, 1.5).is_nan());
        assert!(hyp2f1(f64::NAN, 0.4, 0.5, 0.5).is_nan());
    }

    #[test]
    fn ln_gamma_reference_values() {
        assert_eq!(ln_gamma(1.0), 0.0);
        assert_eq!(ln_gamma(2.0), 0.0);
        for v in LN_GAMMA_REFERENCE {
            assert_rel(ln_gamma(v[0]), v[1], 1e-14, &format!("ln Γ({})", v[0]));
        }
        // ln Γ(x+1) - ln Γ(x) = ln x across the branch boundaries.
        for x in [0.3, 0.5, 0.75, 1.25, 1.5, 2.5, 3.3, 11.9, 12.5, 13.0, 40.0] {
            assert_rel(
                ln_gamma(x + 1.0) - ln_gamma(x),
                f64::ln(x),
                1e-13,
                &format!("x = {x}"),
            );
        }
        assert_eq!(ln_gamma(0.0), f64::INFINITY);
        assert!(ln_gamma(-1.5).is_nan());
        assert!(ln_gamma(f64::NAN).is_nan());
    }

    #[test]
    fn digamma_reference_values() {
        for v in DIGAMMA_REFERENCE {
            let got = digamma(v[0]);
            assert!(
                (got - v[1]).abs() <= 1e-14 * v[1].abs().max(1.0),
                "ψ({}) = {got}, want {}",
                v[0],
                v[1]
            );
        }
    }
}
