//! Journeys: `sessions` (visits cut from each profile's events by inactivity) and `rfm`
//! (recency, frequency and monetary value of each buyer, scored in fifths and named).
//!
//! Both are SQL over the resolved `events`, built here rather than shipped as `queries/` files
//! because their shape is part of Tessera's table contract: segments, traits and reports can
//! rely on them. The SQL adapts to the columns the project's events actually have (a project
//! without `context` gets sessions without a landing page, not an error).

pub mod session_cut;

use datafusion::arrow::datatypes::Schema;
use datafusion::dataframe::DataFrame;

use crate::config::{PredictionsConfig, SessionsConfig};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::output::{Committed, Outputs};
use crate::tables::{self, event};

/// Quotes text as a SQL string literal.
pub fn sql_text(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn has(schema: &Schema, column: &str) -> bool {
    schema.column_with_name(column).is_some()
}

/// The name the session cut being built is registered under (internal).
const SESSION_CUT: &str = "__tessera_session_cut";

/// The `sessions` table of the events in table `source`: a profile's events, in time order,
/// start a new session after more than `gap_minutes` without an event. Sessions do not break
/// at midnight.
///
/// The landing page, referrer and traffic source are those of the session's first event (as
/// web analytics attribute a visit to the hit that opened it): source, medium and campaign
/// come from `context.campaign` (what Segment's libraries send), else from the event's
/// `utm_*` properties, else from the page URL's `utm_*` parameters.
///
/// The sessions are cut on narrow rows (profile, time, id) by one sort and one pass
/// ([`crate::stages::journeys::session_cut`]); JSON is read only for each session's first event, found by its
/// message_id, so the cost of parsing does not grow with the events in a session, and each
/// event's `context` and `properties` are parsed once for all five fields
/// ([`first_touch_udf`]).
pub async fn sessions(
    engine: &Engine,
    schema: &Schema,
    config: &SessionsConfig,
    source: &str,
) -> Result<DataFrame> {
    let page = if has(schema, event::TYPE) {
        "CASE WHEN type = 'page' THEN 1 ELSE 0 END"
    } else {
        "0"
    };
    let events = plan(
        engine,
        tables::SESSIONS,
        &format!(
            r#"SELECT arrow_cast(profile_id, 'Utf8') AS profile_id, "timestamp" AS ts,
                      arrow_cast(message_id, 'Utf8') AS message_id, CAST({page} AS BIGINT) AS page
               FROM {source} WHERE profile_id IS NOT NULL"#
        ),
    )
    .await?;
    // A quarter of the limit for the buckets waiting to be sorted (see `session_cut::cut`).
    let buffers = (engine.limits.memory / 4) as usize;
    let cut = crate::stages::journeys::session_cut::cut(events, config.gap_minutes, buffers)
        .await
        .map_err(|e| Error::Query {
            file: format!("the built-in query of table `{}`", tables::SESSIONS),
            message: e.to_string(),
        })?;
    engine.ctx.deregister_table(SESSION_CUT)?;
    engine.ctx.register_table(SESSION_CUT, cut)?;
    let gap = config.gap_minutes;
    plan(
        engine,
        tables::SESSIONS,
        &format!(
            r#"
WITH landed AS (
    SELECT c.*, {FIRST_TOUCH}(e.context, e.properties) AS touch
    FROM {SESSION_CUT} c LEFT JOIN (SELECT message_id, {context}, {properties} FROM {source} WHERE profile_id IS NOT NULL) e
      ON e.message_id = c.first_message_id
)
SELECT left(md5(concat(profile_id, '|', CAST(started_at AS VARCHAR))), 20) AS session_id,
       profile_id, session_index, started_at, ended_at,
       CAST(date_part('epoch', ended_at) - date_part('epoch', started_at) AS DOUBLE) AS duration_seconds,
       event_count, page_views,
       touch['landing_page'] AS landing_page, touch['referrer'] AS referrer,
       touch['source'] AS source, touch['medium'] AS medium, touch['campaign'] AS campaign,
       CAST({gap} AS BIGINT) AS gap_minutes
FROM landed
"#,
            context = if has(schema, event::CONTEXT) {
                "context"
            } else {
                "CAST(NULL AS VARCHAR) AS context"
            },
            properties = if has(schema, event::PROPERTIES) {
                "properties"
            } else {
                "CAST(NULL AS VARCHAR) AS properties"
            },
        ),
    )
    .await
}

pub use crate::sql::first_touch::{first_touch_udf, FIRST_TOUCH};

/// The purchase rows of `events`: the configured event, with a profile, up to `as_of()`,
/// and their value (`revenue` property, NULL when absent or not a number).
pub fn purchases_sql(schema: &Schema, config: &PredictionsConfig) -> Option<String> {
    if !has(schema, event::EVENT) {
        return None;
    }
    let value = if has(schema, event::PROPERTIES) {
        format!("json_get_float(properties, {})", sql_text(&config.revenue))
    } else {
        "CAST(NULL AS DOUBLE)".into()
    };
    Some(format!(
        r#"SELECT profile_id, "timestamp", {value} AS value FROM events
           WHERE event = {event} AND profile_id IS NOT NULL AND "timestamp" <= as_of()"#,
        event = sql_text(&config.purchase_event)
    ))
}

/// The `rfm` query: per buyer, days since the last purchase, purchases, total value; each
/// scored 1–5 by the fifth of buyers it beats (`1 + floor(5 × percent_rank)`, so ties share
/// a score and one-time buyers all score 1 on frequency), and a named segment from R and F.
pub fn rfm_sql(purchases: &str) -> String {
    format!(
        r#"
WITH bought AS (
    SELECT profile_id,
           min("timestamp") AS first_purchase_at,
           max("timestamp") AS last_purchase_at,
           count(*) AS frequency,
           coalesce(sum(value), 0.0) AS monetary
    FROM ({purchases}) p
    GROUP BY profile_id
), measured AS (
    SELECT *, (date_part('epoch', as_of()) - date_part('epoch', last_purchase_at)) / 86400.0 AS recency_days
    FROM bought
), scored AS (
    SELECT *,
           CAST(least(5, 1 + floor(5 * percent_rank() OVER (ORDER BY recency_days DESC))) AS INT) AS r_score,
           CAST(least(5, 1 + floor(5 * percent_rank() OVER (ORDER BY frequency))) AS INT) AS f_score,
           CAST(least(5, 1 + floor(5 * percent_rank() OVER (ORDER BY monetary))) AS INT) AS m_score
    FROM measured
)
SELECT profile_id, first_purchase_at, last_purchase_at,
       CAST(recency_days AS DOUBLE) AS recency_days, frequency, CAST(monetary AS DOUBLE) AS monetary,
       CAST(monetary AS DOUBLE) / frequency AS average_order_value,
       r_score, f_score, m_score,
       concat(CAST(r_score AS VARCHAR), CAST(f_score AS VARCHAR), CAST(m_score AS VARCHAR)) AS rfm_score,
       CASE
           WHEN r_score = 5 AND f_score >= 4 THEN 'Champions'
           WHEN r_score >= 3 AND f_score >= 4 THEN 'Loyal Customers'
           WHEN r_score <= 2 AND f_score = 5 THEN 'Cannot Lose Them'
           WHEN r_score <= 2 AND f_score >= 3 THEN 'At Risk'
           WHEN r_score <= 2 THEN 'Hibernating'
           WHEN r_score = 3 AND f_score = 3 THEN 'Need Attention'
           WHEN r_score = 3 THEN 'About to Sleep'
           WHEN r_score = 5 AND f_score = 1 THEN 'New Customers'
           WHEN r_score = 4 AND f_score = 1 THEN 'Promising'
           ELSE 'Potential Loyalists'
       END AS rfm_segment
FROM scored
"#
    )
}

/// Tables registered while sessions are rebuilt for changed profiles only.
const PREVIOUS_SESSIONS: &str = "__tessera_previous_sessions";
const NEW_EVENTS: &str = "__tessera_new_events";
const IDENTITY_CHANGED: &str = "__tessera_identity_changed";
const CHANGED_PROFILES: &str = "__tessera_changed_profiles";
const CHANGED_EVENTS: &str = "__tessera_changed_events";

/// What an incremental run changed, for [`incremental_sessions`].
pub struct Changes {
    /// The `message_id`s of the events the run added.
    pub new_events: DataFrame,
    /// Profiles (old and new ids) whose identifiers changed since the published identity
    /// graph ([`crate::stages::identity::IdentityTables::changed_profiles`]).
    pub changed_profiles: Vec<String>,
}

/// Sessions built from the published ones: the sessions of every profile this run could have
/// changed are cut again from its events, the others are kept as they were. `None` when they
/// must be rebuilt for every profile (no published sessions, or sessions cut with another
/// `gap_minutes` or before that column existed). Without a published identity graph the
/// caller has no [`Changes`] to pass and rebuilds every profile itself.
///
/// Sessions depend only on a profile's events, never on the run's time, so a profile's
/// sessions change only when its events do: when a new event belongs to it, or when identity
/// resolution moved an identifier into or out of it (a merge, or a late event that changed
/// which links the limits refuse). Both are known: the new events' profiles, and the profiles
/// identity resolution found changed against the published graph. The result equals a
/// rebuild of every profile (tested).
pub async fn incremental_sessions(engine: &Engine, schema: &Schema) -> Result<Option<DataFrame>> {
    if changed(engine).await?.is_none() {
        return Ok(None);
    }
    let ctx = &engine.ctx;
    let gap = engine.project.config.sessions.gap_minutes;
    let Some(previous) = engine.outputs.read(ctx, tables::SESSIONS).await? else {
        return Ok(None);
    };
    if previous
        .schema()
        .field_with_unqualified_name("gap_minutes")
        .is_err()
    {
        tracing::info!(
            "sessions rebuilt for every profile: the published ones predate gap_minutes"
        );
        return Ok(None);
    }
    let gap_column = datafusion::prelude::col("gap_minutes");
    let cut_otherwise = previous
        .clone()
        .filter(
            gap_column
                .clone()
                .is_null()
                .or(gap_column.not_eq(datafusion::prelude::lit(gap as i64))),
        )?
        .count()
        .await?;
    if cut_otherwise > 0 {
        tracing::info!(
            sessions = cut_otherwise,
            now = gap,
            "sessions rebuilt for every profile: [sessions] gap_minutes changed"
        );
        return Ok(None);
    }
    ctx.deregister_table(PREVIOUS_SESSIONS)?;
    ctx.register_table(PREVIOUS_SESSIONS, previous.into_view())?;
    let fresh = sessions(
        engine,
        schema,
        &engine.project.config.sessions,
        CHANGED_EVENTS,
    )
    .await?;
    // The kept rows take the types the new ones have (the published table has plain types).
    let kept = plan(
        engine,
        tables::SESSIONS,
        &format!(
            "SELECT s.* FROM {PREVIOUS_SESSIONS} s LEFT ANTI JOIN {CHANGED_PROFILES} c ON s.profile_id = c.profile_id"
        ),
    )
    .await?;
    let columns: Vec<_> = fresh
        .schema()
        .fields()
        .iter()
        .map(|f| {
            datafusion::prelude::cast(datafusion::prelude::col(f.name()), f.data_type().clone())
                .alias(f.name())
        })
        .collect();
    Ok(Some(kept.select(columns)?.union(fresh)?))
}

/// Registers the profiles an incremental run changed (those with a new event, and those
/// identity resolution moved an identifier into or out of) and their events, for sessions
/// and the trait files that can be carried over ([`changed`]).
pub async fn register_changes(engine: &Engine, changes: Changes) -> Result<()> {
    let ctx = &engine.ctx;
    release_changed(engine)?;
    let identity_changed = datafusion::arrow::array::RecordBatch::try_new(
        std::sync::Arc::new(Schema::new(vec![datafusion::arrow::datatypes::Field::new(
            "profile_id",
            datafusion::arrow::datatypes::DataType::Utf8,
            false,
        )])),
        vec![std::sync::Arc::new(
            datafusion::arrow::array::StringArray::from(changes.changed_profiles),
        )],
    )?;
    ctx.deregister_table(IDENTITY_CHANGED)?;
    ctx.register_batch(IDENTITY_CHANGED, identity_changed)?;
    ctx.deregister_table(NEW_EVENTS)?;
    ctx.register_table(NEW_EVENTS, changes.new_events.into_view())?;
    let changed = plan(
        engine,
        tables::SESSIONS,
        &format!(
            r#"
SELECT DISTINCT profile_id FROM (
    SELECT e.profile_id FROM {events} e JOIN {NEW_EVENTS} n ON e.message_id = n.message_id
    UNION ALL
    SELECT profile_id FROM {IDENTITY_CHANGED}
) WHERE profile_id IS NOT NULL
"#,
            events = tables::EVENTS,
        ),
    )
    .await?;
    // Collected once: both the cut and the kept rows are filtered by it. (The batches' own
    // schema: the plan's may differ from them in nullability.)
    let planned_schema = std::sync::Arc::new(changed.schema().as_arrow().clone());
    let changed = changed.collect().await?;
    let changed_schema = changed
        .first()
        .map(|b| b.schema())
        .unwrap_or(planned_schema);
    let count: usize = changed.iter().map(|b| b.num_rows()).sum();
    tracing::info!(profiles = count, "sessions: profiles whose events changed");
    ctx.deregister_table(CHANGED_PROFILES)?;
    ctx.register_table(
        CHANGED_PROFILES,
        std::sync::Arc::new(datafusion::datasource::MemTable::try_new(
            changed_schema,
            vec![changed],
        )?),
    )?;
    ctx.deregister_table(CHANGED_EVENTS)?;
    let changed_events = plan(
        engine,
        tables::SESSIONS,
        &format!(
            "SELECT * FROM {events} WHERE profile_id IN (SELECT profile_id FROM {CHANGED_PROFILES})",
            events = tables::EVENTS
        ),
    )
    .await?;
    // Computed once: the sessions and every carried trait file read them. As a view, each of
    // those reads filtered all the events again, and the optimizer moved a trait's own filter
    // below that filter, so its JSON was parsed for every event (at 10M events, 1,733 changed
    // profiles: the campaign trait took 0.76 s). Held in memory when small (a sixteenth of the
    // limit), otherwise written to the scratch folder.
    engine
        .hold_or_write(CHANGED_EVENTS, changed_events, engine.limits.memory / 16)
        .await
}

/// The profiles this run found changed and their events, when it found them (an incremental
/// run whose sessions were cut again for those profiles only).
pub async fn changed(
    engine: &Engine,
) -> Result<
    Option<(
        DataFrame,
        std::sync::Arc<dyn datafusion::datasource::TableProvider>,
    )>,
> {
    let ctx = &engine.ctx;
    if !ctx.table_exist(CHANGED_PROFILES)? || !ctx.table_exist(CHANGED_EVENTS)? {
        return Ok(None);
    }
    Ok(Some((
        ctx.table(CHANGED_PROFILES).await?,
        ctx.table_provider(CHANGED_EVENTS).await?,
    )))
}

/// Forgets the changed profiles and their events (and the memory they held), once the
/// stages that read them are done.
pub fn release_changed(engine: &Engine) -> Result<()> {
    engine.ctx.deregister_table(CHANGED_PROFILES)?;
    engine.release(CHANGED_EVENTS)
}

/// The `events` schema as SQL sees it now.
pub async fn events_schema(engine: &Engine) -> Result<Schema> {
    Ok(engine
        .ctx
        .table(tables::EVENTS)
        .await?
        .schema()
        .as_arrow()
        .clone())
}

/// Plans `sql` (Tessera's own, so an error is a bug or an unusual events schema: say which).
pub async fn plan(engine: &Engine, table: &str, sql: &str) -> Result<DataFrame> {
    engine.ctx.sql(sql).await.map_err(|e| Error::Query {
        file: format!("the built-in query of table `{table}`"),
        message: format!("{e}. The events table lacks a column this table needs or has it with another type; check `tessera query \"DESCRIBE events\"`"),
    })
}

/// Writes `df` to output table `name` and registers the written table under that name.
async fn write_and_register(
    engine: &Engine,
    outputs: &Outputs,
    name: &str,
    df: DataFrame,
    built: &mut Vec<(String, Committed)>,
) -> Result<()> {
    let committed = outputs
        .write_registered(&engine.ctx, name, name.into(), df)
        .await?;
    built.push((name.to_string(), committed));
    Ok(())
}

/// Builds `sessions`, `rfm`, `predictions` and `prediction_models` from the resolved events,
/// writes them and registers them for traits, segments and reports.
///
/// When an incremental run registered what it changed ([`register_changes`]), sessions are
/// cut again only for the profiles they could have changed (see [`incremental_sessions`]).
pub async fn build(
    engine: &Engine,
    outputs: &Outputs,
    run_id: &str,
    as_of: chrono::DateTime<chrono::Utc>,
    which: Which,
) -> Result<(
    Vec<(String, Committed)>,
    Option<crate::stages::predict::PredictionRun>,
)> {
    let config = &engine.project.config;
    let schema = events_schema(engine).await?;
    let mut built = Vec::new();

    if which.sessions {
        let started = std::time::Instant::now();
        let sessions = incremental_sessions(engine, &schema).await?;
        let (sessions, rebuilt) = match sessions {
            Some(sessions) => (sessions, "changed profiles"),
            None => (
                self::sessions(engine, &schema, &config.sessions, tables::EVENTS).await?,
                "every profile",
            ),
        };
        write_and_register(engine, outputs, tables::SESSIONS, sessions, &mut built).await?;
        tracing::info!(
            ms = started.elapsed().as_millis() as u64,
            rebuilt,
            "sessions"
        );
    }
    if !which.rfm && !which.predictions {
        return Ok((built, None));
    }

    // Without an `event` column nothing is a purchase: the tables are written empty.
    let purchases = purchases_sql(&schema, &config.predictions).unwrap_or_else(|| {
        r#"SELECT profile_id, "timestamp", CAST(NULL AS DOUBLE) AS value FROM events WHERE false"#
            .to_string()
    });
    if which.rfm {
        let started = std::time::Instant::now();
        let rfm = plan(engine, tables::RFM, &rfm_sql(&purchases)).await?;
        write_and_register(engine, outputs, tables::RFM, rfm, &mut built).await?;
        tracing::info!(ms = started.elapsed().as_millis() as u64, "rfm");
    }
    if !which.predictions {
        return Ok((built, None));
    }

    let started = std::time::Instant::now();
    let summary = plan(
        engine,
        tables::PREDICTIONS,
        &crate::stages::predict::summary_sql(&purchases),
    )
    .await?
    .collect()
    .await?;
    let unit = config.predictions.time_unit.days();
    let buyers = crate::stages::predict::buyers_from(&summary, as_of, unit)?;
    drop(summary);
    let fitting = std::time::Instant::now();
    // A buyer whose first purchase is at the as-of time itself has no age yet: nothing to
    // learn from, and the likelihood needs T > 0. They still get predictions.
    let (aged, aged_spend): (Vec<_>, Vec<_>) = buyers
        .customers
        .iter()
        .zip(&buyers.mean_spend)
        .filter(|(c, _)| c.t > 0.0)
        .unzip();
    let (bg, gg, models) = crate::stages::predict::fit(&aged, &aged_spend);
    let fit_ms = fitting.elapsed().as_millis() as u64;
    for (model, error) in [
        ("BG/NBD", &models.bgnbd_error),
        ("Gamma-Gamma", &models.gamma_gamma_error),
    ] {
        if let Some(e) = error {
            tracing::warn!(
                model,
                buyers = buyers.customers.len(),
                "{model} not fitted: {e}"
            );
        }
    }
    let predicting = std::time::Instant::now();
    let predictions = crate::stages::predict::predictions(
        &buyers,
        bg.as_ref(),
        gg.as_ref(),
        &config.predictions,
    )?;
    let predict_ms = predicting.elapsed().as_millis() as u64;
    tracing::info!(
        buyers = buyers.customers.len(),
        fit_ms,
        predict_ms,
        ms = started.elapsed().as_millis() as u64,
        "predictions"
    );
    let df = engine.ctx.read_batch(predictions)?;
    write_and_register(engine, outputs, tables::PREDICTIONS, df, &mut built).await?;
    let batch =
        crate::stages::predict::models_batch(&models, unit, buyers.customers.len(), run_id)?;
    let df = engine.ctx.read_batch(batch)?;
    write_and_register(engine, outputs, tables::PREDICTION_MODELS, df, &mut built).await?;
    let run = crate::stages::predict::PredictionRun {
        buyers: buyers.customers.len(),
        fit_ms,
        predict_ms,
        models,
    };
    Ok((built, Some(run)))
}

/// Which of the journeys tables a run computes (the others it keeps, or nothing needs).
#[derive(Debug, Clone, Copy, Default)]
pub struct Which {
    /// `sessions`.
    pub sessions: bool,
    /// `rfm`.
    pub rfm: bool,
    /// `predictions` and `prediction_models`.
    pub predictions: bool,
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use datafusion::arrow::array::{Array, AsArray, RecordBatch, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use proptest::prelude::*;

    /// A row's five attribution fields.
    type Fields = Vec<Option<String>>;

    /// Each row's five fields from `__tessera_first_touch`, and from the `json_get_str`,
    /// `coalesce` and `regexp_match` SQL the sessions query used before it.
    fn both_ways(rows: &[(Option<&str>, Option<&str>)]) -> (Vec<Fields>, Vec<Fields>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let ctx = crate::engine::new_context().unwrap();
            let schema = Arc::new(Schema::new(vec![
                Field::new("context", DataType::Utf8, true),
                Field::new("properties", DataType::Utf8, true),
            ]));
            let context: StringArray = rows.iter().map(|r| r.0).collect();
            let properties: StringArray = rows.iter().map(|r| r.1).collect();
            let batch =
                RecordBatch::try_new(schema, vec![Arc::new(context), Arc::new(properties)]).unwrap();
            ctx.register_batch("e", batch).unwrap();
            let get = |column: &str, path: &[&str]| {
                let path: Vec<String> = path.iter().map(|p| sql_text(p)).collect();
                format!("json_get_str({column}, {})", path.join(", "))
            };
            let url = format!("coalesce({}, {})", get("context", &["page", "url"]), get("properties", &["url"]));
            let referrer = format!(
                "coalesce({}, {})",
                get("context", &["page", "referrer"]),
                get("properties", &["referrer"])
            );
            let campaign = |name: &str| {
                format!(
                    "coalesce({}, {}, regexp_match(landing_page, '[?&]utm_{name}=([^&#]*)')[1])",
                    get("context", &["campaign", name]),
                    get("properties", &[&format!("utm_{name}")]),
                )
            };
            let sql = format!(
                "SELECT t['landing_page'], t['referrer'], t['source'], t['medium'], t['campaign'],
                        landing_page, referrer, {}, {}, {}
                 FROM (SELECT __tessera_first_touch(context, properties) AS t, {url} AS landing_page,
                              {referrer} AS referrer, context, properties FROM e)",
                campaign("source"),
                campaign("medium"),
                campaign("name"),
            );
            let batches = ctx.sql(&sql).await.unwrap().collect().await.unwrap();
            let mut udf = Vec::new();
            let mut reference = Vec::new();
            for batch in &batches {
                let text = |c: usize, r: usize| {
                    let a = datafusion::arrow::compute::cast(batch.column(c), &DataType::Utf8).unwrap();
                    let a = a.as_string::<i32>();
                    a.is_valid(r).then(|| a.value(r).to_string())
                };
                for r in 0..batch.num_rows() {
                    udf.push((0..5).map(|c| text(c, r)).collect());
                    reference.push((5..10).map(|c| text(c, r)).collect());
                }
            }
            (udf, reference)
        })
    }

    #[test]
    fn first_touch_reads_what_json_get_str_and_the_utm_pattern_read() {
        let rows = [
            // Context first, properties second, the landing page's parameters last.
            (
                Some(
                    r#"{"page":{"url":"https://a.example/?utm_source=url&utm_medium=cpc#x","referrer":"r1"},"campaign":{"source":"ctx"}}"#,
                ),
                Some(r#"{"utm_source":"prop","utm_medium":"email","url":"ignored"}"#),
            ),
            (
                None,
                Some(
                    r#"{"url":"https://b.example/p?a=1&utm_sourcex=no&utm_source=yes&utm_name=&z","referrer":"r2"}"#,
                ),
            ),
            // The first occurrence of a key is the one followed, and only strings count.
            (
                Some(
                    r#"{"page":1,"page":{"url":"second"},"campaign":{"source":5,"medium":null,"name":{"x":1}}}"#,
                ),
                None,
            ),
            (
                Some(r#"{"page":{"url":"first","url":"second"}}"#),
                Some("{}"),
            ),
            // Escapes, in values and in keys.
            (
                Some(r#"{"pa\u0067e":{"url":"https://c.example/\u00e9?utm_medium=\"q\""}}"#),
                None,
            ),
            // Broken documents: what comes before the break is still read.
            (
                Some(r#"{"page":{"url":"kept"},"campaign":{"source":"also kept"},"x": tru"#),
                None,
            ),
            (
                Some(r#"{"x": tru, "page":{"url":"lost"}}"#),
                Some(r#"{"url":"from properties"}"#),
            ),
            (Some("not json"), Some("[1,2]")),
            (Some(""), Some(r#""just a string""#)),
            (None, None),
        ];
        let (udf, reference) = both_ways(&rows);
        assert_eq!(udf, reference);
        // And the reference itself says what the comments above claim.
        assert_eq!(
            udf[0][0].as_deref(),
            Some("https://a.example/?utm_source=url&utm_medium=cpc#x")
        );
        assert_eq!(udf[0][2].as_deref(), Some("ctx"));
        assert_eq!(udf[0][3].as_deref(), Some("email"));
        assert_eq!(udf[1][2].as_deref(), Some("yes"));
        assert_eq!(udf[1][4].as_deref(), Some(""));
        assert_eq!(udf[2], vec![None; 5]);
        assert_eq!(udf[3][0].as_deref(), Some("first"));
        assert_eq!(udf[4][3].as_deref(), Some("\"q\""));
        assert_eq!(udf[5][0].as_deref(), Some("kept"));
        assert_eq!(udf[5][2].as_deref(), Some("also kept"));
        assert_eq!(udf[6][0].as_deref(), Some("from properties"));
    }

    /// Documents built from the keys the sessions read, nested objects, other values and
    /// the odd broken token.
    fn document() -> impl Strategy<Value = String> {
        let key = prop::sample::select(vec![
            "page",
            "url",
            "referrer",
            "campaign",
            "source",
            "medium",
            "name",
            "utm_source",
            "utm_medium",
            "utm_name",
            "other",
        ]);
        let leaf = prop_oneof![prop::sample::select(vec![
            "\"https://x.example/?utm_source=s&utm_name=n#f\"",
            "\"v\"",
            "\"\\u00e9\\\"\"",
            "1",
            "null",
            "[\"a\",{}]",
            "tru",
        ])
        .prop_map(str::to_string),];
        let value = leaf.prop_recursive(3, 24, 4, move |inner| {
            prop::collection::vec((key.clone(), inner), 0..4).prop_map(|members| {
                let body: Vec<String> = members
                    .iter()
                    .map(|(k, v)| format!("\"{k}\":{v}"))
                    .collect();
                format!("{{{}}}", body.join(","))
            })
        });
        value
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn first_touch_agrees_with_json_get_str_on_generated_documents(
            rows in prop::collection::vec((prop::option::of(document()), prop::option::of(document())), 1..40)
        ) {
            let rows: Vec<(Option<&str>, Option<&str>)> =
                rows.iter().map(|(c, p)| (c.as_deref(), p.as_deref())).collect();
            let (udf, reference) = both_ways(&rows);
            prop_assert_eq!(udf, reference);
        }
    }
}
