//! `tessera explain TYPE:VALUE`: why an identifier is in its profile, as a readable tree.
//!
//! Reads the published tables only (`identity_graph`, `identity_links`, `identity_conflicts`),
//! so it answers for what BI users see, not for a run in progress.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use arrow::array::{Array, AsArray, RecordBatch, TimestampMicrosecondArray};
use arrow::datatypes::DataType;
use arrow::datatypes::Float64Type;
use chrono::DateTime;
use datafusion::dataframe::DataFrame;
use datafusion::logical_expr::{cast, col, lit, Expr};
use serde::Serialize;

use super::graph::{Reason, Rules};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::tables;
use crate::tables::timestamp_type;

/// An identifier in an explanation.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identifier {
    /// Its type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its normalised value.
    pub value: String,
}

impl std::fmt::Display for Identifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// A member of the profile.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    /// The identifier.
    #[serde(flatten)]
    pub id: Identifier,
    /// First seen (RFC 3339).
    pub first_seen: Option<String>,
    /// Last seen (RFC 3339).
    pub last_seen: Option<String>,
}

/// A link, applied or refused.
#[derive(Debug, Clone, Serialize)]
pub struct Link {
    /// The identifier that linked (or was refused).
    pub from: Identifier,
    /// The identifier it linked to.
    pub to: Identifier,
    /// When first seen (RFC 3339).
    pub seen_at: Option<String>,
    /// The identity query file it came from.
    pub query: String,
    /// Why it was refused (refused links only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How a probabilistic link was weighed (its `match_scores` row).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub match_weights: Option<MatchWeights>,
}

/// A probabilistic link's evidence: the prior, then each comparison's weight (log2 of m/u),
/// adding up to the match weight.
#[derive(Debug, Clone, Serialize)]
pub struct MatchWeights {
    /// The pair's match probability.
    pub probability: f64,
    /// The sum of the prior and comparison weights.
    pub match_weight: f64,
    /// log2 of the prior odds.
    pub prior_weight: f64,
    /// Each comparison: column, level reached (none when a side was null) and weight.
    pub comparisons: Vec<ComparisonWeight>,
}

/// One comparison's part of a [`MatchWeights`].
#[derive(Debug, Clone, Serialize)]
pub struct ComparisonWeight {
    /// The compared column.
    pub column: String,
    /// The level the pair reached; none when either side was null.
    pub level: Option<String>,
    /// Its weight (0 for nulls).
    pub weight: f64,
}

/// The label prefix of probabilistic links in `identity_links.query`.
const PROBABILISTIC: &str = "<probabilistic: ";

/// Fills in the weights of the probabilistic links among `links` from `match_scores`.
async fn add_match_weights(engine: &Engine, links: &mut [Link]) -> Result<()> {
    let wanted: Vec<Expr> = links
        .iter()
        .filter(|l| l.query.starts_with(PROBABILISTIC))
        .flat_map(|l| [lit(l.from.to_string()), lit(l.to.to_string())])
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let Some(df) = table(engine, tables::MATCH_SCORES).await? else {
        return Ok(());
    };
    let mut exprs = Vec::new();
    let mut comparisons = Vec::new();
    for field in df.schema().fields() {
        let name = field.name().as_str();
        if ["block", "left_identifier", "right_identifier"].contains(&name) {
            exprs.push(cast(col(name), DataType::Utf8).alias(name));
        } else if name == "match_probability" || name == "match_weight" {
            exprs.push(cast(col(name), DataType::Float64).alias(name));
        } else if let Some(column) = name.strip_suffix("_level") {
            comparisons.push(column.to_string());
            exprs.push(cast(col(name), DataType::Utf8).alias(name));
            let weight = format!("{column}_weight");
            exprs.push(cast(col(weight.as_str()), DataType::Float64).alias(weight));
        }
    }
    let found = df
        .select(exprs)?
        .filter(
            col("left_identifier")
                .in_list(wanted.clone(), false)
                .and(col("right_identifier").in_list(wanted, false)),
        )?
        .collect()
        .await?;
    let number = |b: &RecordBatch, name: &str, r: usize| -> Option<f64> {
        let a = b.column_by_name(name)?.as_primitive_opt::<Float64Type>()?;
        a.is_valid(r).then(|| a.value(r))
    };
    let text = |b: &RecordBatch, name: &str, r: usize| -> Option<String> {
        let a = b.column_by_name(name)?.as_string_opt::<i32>()?;
        a.is_valid(r).then(|| a.value(r).to_string())
    };
    for b in &found {
        for r in 0..b.num_rows() {
            let (Some(block), Some(left), Some(right)) = (
                text(b, "block", r),
                text(b, "left_identifier", r),
                text(b, "right_identifier", r),
            ) else {
                continue;
            };
            let query = format!("{PROBABILISTIC}{block}>");
            let mut parts = Vec::new();
            for c in &comparisons {
                // Columns of other blocks are null in this block's rows.
                if !block_compares(engine, &block, c) {
                    continue;
                }
                parts.push(ComparisonWeight {
                    column: c.clone(),
                    level: text(b, &format!("{c}_level"), r),
                    weight: number(b, &format!("{c}_weight"), r).unwrap_or(0.0),
                });
            }
            let total = number(b, "match_weight", r).unwrap_or_default();
            let weights = MatchWeights {
                probability: number(b, "match_probability", r).unwrap_or_default(),
                match_weight: total,
                prior_weight: total - parts.iter().map(|p| p.weight).sum::<f64>(),
                comparisons: parts,
            };
            for l in links.iter_mut() {
                let (from, to) = (l.from.to_string(), l.to.to_string());
                if l.query == query
                    && ((from == left && to == right) || (from == right && to == left))
                {
                    l.match_weights = Some(weights.clone());
                }
            }
        }
    }
    Ok(())
}

/// Whether block `block` of the config compares `column`.
fn block_compares(engine: &Engine, block: &str, column: &str) -> bool {
    engine
        .project
        .config
        .identity
        .probabilistic
        .iter()
        .any(|b| b.name == block && b.comparisons.iter().any(|c| c.column == column))
}

/// Everything `explain` knows about one identifier.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// The identifier asked about, normalised.
    pub identifier: Identifier,
    /// Its profile, when it has one.
    pub profile_id: Option<String>,
    /// Why it has none, when it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_profile_reason: Option<String>,
    /// All identifiers of the profile, oldest first.
    pub identifiers: Vec<Member>,
    /// The links that joined them.
    pub links: Vec<Link>,
    /// Links refused that touch the profile or the identifier.
    pub refused: Vec<Link>,
}

fn text_col(batch: &RecordBatch, i: usize, r: usize) -> Option<String> {
    let a = batch.column(i).as_string::<i32>();
    a.is_valid(r).then(|| a.value(r).to_string())
}

fn ident_at(batch: &RecordBatch, kind: usize, value: usize, r: usize) -> Identifier {
    Identifier {
        kind: text_col(batch, kind, r).unwrap_or_default(),
        value: text_col(batch, value, r).unwrap_or_default(),
    }
}

fn time_col(batch: &RecordBatch, i: usize, r: usize) -> Option<String> {
    let a = batch
        .column(i)
        .as_any()
        .downcast_ref::<TimestampMicrosecondArray>()
        .expect("cast to µs");
    a.is_valid(r)
        .then(|| DateTime::from_timestamp_micros(a.value(r)))
        .flatten()
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
}

async fn table(engine: &Engine, name: &str) -> Result<Option<DataFrame>> {
    engine.outputs.read(&engine.ctx, name).await
}

/// Casts named columns to plain types so rows can be read the same way from any version.
fn plain(df: DataFrame, text: &[&str], times: &[&str]) -> Result<DataFrame> {
    let mut exprs: Vec<Expr> = text
        .iter()
        .map(|c| cast(col(*c), DataType::Utf8).alias(*c))
        .collect();
    exprs.extend(
        times
            .iter()
            .map(|c| cast(col(*c), timestamp_type()).alias(*c)),
    );
    Ok(df.select(exprs)?)
}

/// Parses `TYPE:VALUE` and normalises the value with the type's rules.
pub fn parse_spec(rules: &Rules, spec: &str) -> Result<(Identifier, Option<Reason>)> {
    let names: Vec<&str> = rules.types.iter().map(|t| t.name.as_str()).collect();
    let Some((kind, raw)) = spec.split_once(':') else {
        return Err(Error::Usage(format!(
            "`{spec}` is not TYPE:VALUE; e.g. email:alice@example.com (types: {})",
            names.join(", ")
        )));
    };
    let Some(t) = rules.type_index(kind) else {
        return Err(Error::Usage(format!(
            "`{kind}` is not an identifier type in [identity] (configured: {})",
            names.join(", ")
        )));
    };
    let (value, dropped) = match rules.clean(t, raw) {
        Ok(v) => (v.into_owned(), None),
        Err(reason) => (raw.trim().to_lowercase(), Some(reason)),
    };
    Ok((
        Identifier {
            kind: kind.to_string(),
            value,
        },
        dropped,
    ))
}

/// Explains `spec` (`TYPE:VALUE`) from the published identity tables.
pub async fn explain(engine: &Engine, spec: &str) -> Result<Explanation> {
    let rules = Rules::from_config(&engine.project.config.identity);
    let (asked, dropped) = parse_spec(&rules, spec)?;
    let Some(graph) = table(engine, tables::IDENTITY_GRAPH).await? else {
        return Err(Error::Usage(format!(
            "no identity_graph in {} yet; run `tessera run` first",
            engine.outputs.place()
        )));
    };
    let graph = plain(
        graph,
        &["identifier_type", "identifier_value", "profile_id"],
        &["first_seen", "last_seen"],
    )?;
    let found = graph
        .clone()
        .filter(
            col("identifier_type")
                .eq(lit(asked.kind.as_str()))
                .and(col("identifier_value").eq(lit(asked.value.as_str()))),
        )?
        .collect()
        .await?;
    let profile_id = found
        .iter()
        .find(|b| b.num_rows() > 0)
        .and_then(|b| text_col(b, 2, 0));

    let mut identifiers = Vec::new();
    if let Some(p) = &profile_id {
        for b in graph
            .filter(col("profile_id").eq(lit(p.as_str())))?
            .collect()
            .await?
        {
            for r in 0..b.num_rows() {
                identifiers.push(Member {
                    id: ident_at(&b, 0, 1, r),
                    first_seen: time_col(&b, 3, r),
                    last_seen: time_col(&b, 4, r),
                });
            }
        }
    }
    let priority = |k: &str| rules.type_index(k).unwrap_or(u8::MAX);
    identifiers.sort_by(|a, b| {
        (
            a.first_seen.is_none(),
            &a.first_seen,
            priority(&a.id.kind),
            &a.id.value,
        )
            .cmp(&(
                b.first_seen.is_none(),
                &b.first_seen,
                priority(&b.id.kind),
                &b.id.value,
            ))
    });

    let mut links = Vec::new();
    if let (Some(p), Some(df)) = (&profile_id, table(engine, tables::IDENTITY_LINKS).await?) {
        let df = plain(
            df,
            &[
                "identifier_type",
                "identifier_value",
                "linked_type",
                "linked_value",
                "profile_id",
                "query",
            ],
            &["seen_at"],
        )?;
        for b in df
            .filter(col("profile_id").eq(lit(p.as_str())))?
            .collect()
            .await?
        {
            for r in 0..b.num_rows() {
                links.push(Link {
                    from: ident_at(&b, 0, 1, r),
                    to: ident_at(&b, 2, 3, r),
                    seen_at: time_col(&b, 6, r),
                    query: text_col(&b, 5, r).unwrap_or_default(),
                    reason: None,
                    match_weights: None,
                });
            }
        }
    }
    links.sort_by(|a, b| (&a.seen_at, &a.to, &a.from).cmp(&(&b.seen_at, &b.to, &b.from)));
    add_match_weights(engine, &mut links).await?;

    let mut around: HashSet<Identifier> = identifiers.iter().map(|m| m.id.clone()).collect();
    around.insert(asked.clone());
    let mut refused = Vec::new();
    if let Some(df) = table(engine, tables::IDENTITY_CONFLICTS).await? {
        let df = plain(
            df,
            &[
                "identifier_type",
                "identifier_value",
                "other_type",
                "other_value",
                "reason",
                "query",
            ],
            &["seen_at"],
        )?;
        let values: Vec<Expr> = around.iter().map(|i| lit(i.value.clone())).collect();
        let filter = col("identifier_value")
            .in_list(values.clone(), false)
            .or(col("other_value").in_list(values, false));
        for b in df.filter(filter)?.collect().await? {
            for r in 0..b.num_rows() {
                let from = ident_at(&b, 0, 1, r);
                let to = ident_at(&b, 2, 3, r);
                if around.contains(&from) || around.contains(&to) {
                    refused.push(Link {
                        from,
                        to,
                        seen_at: time_col(&b, 6, r),
                        query: text_col(&b, 5, r).unwrap_or_default(),
                        reason: text_col(&b, 4, r),
                        match_weights: None,
                    });
                }
            }
        }
    }
    refused.sort_by(|a, b| (&a.seen_at, &a.from, &a.to).cmp(&(&b.seen_at, &b.from, &b.to)));

    let no_profile_reason = if profile_id.is_some() {
        None
    } else if let Some(reason) = dropped {
        Some(format!("{}: it links nothing", reason.describe(&rules)))
    } else if refused
        .iter()
        .any(|l| l.from == asked && l.reason.as_deref() == Some("max_links exceeded"))
    {
        Some("max_links exceeded: a value shared by this many identifiers links nothing".into())
    } else {
        Some("not seen by any identity query".into())
    };
    Ok(Explanation {
        identifier: asked,
        profile_id,
        no_profile_reason,
        identifiers,
        links,
        refused,
    })
}

impl Explanation {
    /// The explanation as an indented tree for people.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let Some(profile) = &self.profile_id else {
            out.push_str(&format!(
                "{} has no profile: {}\n",
                self.identifier,
                self.no_profile_reason.as_deref().unwrap_or("unknown")
            ));
            self.render_refused(&mut out);
            return out;
        };
        let first = self
            .identifiers
            .first()
            .and_then(|m| m.first_seen.clone())
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{} belongs to profile {profile} ({} identifiers, first seen {first})\n\n",
            self.identifier,
            self.identifiers.len()
        ));
        // A spanning tree of the applied links, from the oldest identifier.
        let mut adjacent: HashMap<&Identifier, Vec<&Link>> = HashMap::new();
        for l in &self.links {
            adjacent.entry(&l.from).or_default().push(l);
            adjacent.entry(&l.to).or_default().push(l);
        }
        let members: BTreeMap<&Identifier, &Member> =
            self.identifiers.iter().map(|m| (&m.id, m)).collect();
        let mut seen: HashSet<&Identifier> = HashSet::new();
        let mut children: HashMap<&Identifier, Vec<(&Identifier, &Link)>> = HashMap::new();
        let mut roots = Vec::new();
        for m in &self.identifiers {
            if seen.contains(&m.id) {
                continue;
            }
            roots.push(&m.id);
            seen.insert(&m.id);
            let mut queue = VecDeque::from([&m.id]);
            while let Some(id) = queue.pop_front() {
                for l in adjacent.get(id).map(Vec::as_slice).unwrap_or(&[]) {
                    let next = if &l.from == id { &l.to } else { &l.from };
                    if seen.insert(next) {
                        children.entry(id).or_default().push((next, l));
                        queue.push_back(next);
                    }
                }
            }
        }
        fn walk(
            out: &mut String,
            id: &Identifier,
            prefix: &str,
            children: &HashMap<&Identifier, Vec<(&Identifier, &Link)>>,
            asked: &Identifier,
        ) {
            let kids = children.get(id).map(Vec::as_slice).unwrap_or(&[]);
            for (i, (child, link)) in kids.iter().enumerate() {
                let last = i + 1 == kids.len();
                let mark = if *child == asked { "  ◀" } else { "" };
                out.push_str(&format!(
                    "{prefix}{} {child}{mark}   linked {} by {}\n",
                    if last { "└──" } else { "├──" },
                    link.seen_at.as_deref().unwrap_or("-"),
                    link.query
                ));
                let deeper = format!("{prefix}{}", if last { "    " } else { "│   " });
                if let Some(w) = &link.match_weights {
                    out.push_str(&format!(
                        "{deeper}    match probability {:.4}, weight {:+.2} = prior {:+.2}\n",
                        w.probability, w.match_weight, w.prior_weight
                    ));
                    for c in &w.comparisons {
                        out.push_str(&format!(
                            "{deeper}      {:+7.2}  {} {}\n",
                            c.weight,
                            c.column,
                            c.level.as_deref().unwrap_or("(null: no evidence)")
                        ));
                    }
                }
                walk(out, child, &deeper, children, asked);
            }
        }
        for root in roots {
            let m = members[root];
            let mark = if root == &self.identifier {
                "  ◀"
            } else {
                ""
            };
            out.push_str(&format!(
                "{root}{mark}   first seen {}, last seen {}\n",
                m.first_seen.as_deref().unwrap_or("-"),
                m.last_seen.as_deref().unwrap_or("-")
            ));
            walk(&mut out, root, "", &children, &self.identifier);
        }
        self.render_refused(&mut out);
        out
    }

    fn render_refused(&self, out: &mut String) {
        if self.refused.is_empty() {
            return;
        }
        out.push_str(&format!("\nrefused links ({}):\n", self.refused.len()));
        for l in &self.refused {
            out.push_str(&format!(
                "  ✗ {} → {}   {}   {} by {}\n",
                l.from,
                l.to,
                l.reason.as_deref().unwrap_or("-"),
                l.seen_at.as_deref().unwrap_or("-"),
                l.query
            ));
        }
    }
}
