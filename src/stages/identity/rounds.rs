//! Connected components of the identity graph as rounds of SQL (large-star/small-star,
//! Kiveris et al. 2014), for graphs with more links than `run.cluster_identity_above` (unset
//! by default: the driver still holds every identifier and link, so this first step moves the
//! component search to the cluster without lowering the driver's memory).
//!
//! The union-find keeps a few arrays per identifier and walks every link on one core of the
//! driver. Past the limit the links that can join identifiers (those of no blocklisted or
//! shared value: the rules that are plain filters) are written as Parquet into the engine's
//! scratch folder, and each round is a query over the last round's folder: on a cluster
//! (`run.spill_dir` is shared) the executors run them, otherwise this process does, with the
//! same SQL. The rounds find components with no per-type limits; the groups that hold more
//! values of a limited type than allowed are then resolved link by link in time order on the
//! driver, over their own links only ([`Prepared::apply_grouped`]), which gives exactly the
//! single-machine grouping, refusals, profile ids and merges.
//!
//! Each round's result is written by a `COPY` into the next round's folder: on a cluster the
//! executors write it (the cluster planner sends copies into the shared
//! scratch folder), so only the first links and the final labels pass through the driver.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{AsArray, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use futures::StreamExt;

use super::graph::{Node, Prepared, Resolution, Resolver};
use crate::engine::Engine;
use crate::error::{Error, Result};

/// Rounds after which the SQL is taken as broken: the rounds need O(log² n) of them.
const MAX_ROUNDS: usize = 100;

/// Links per Parquet file: several files let the scans of a round run as several tasks.
const FILE_ROWS: usize = 1 << 21;

/// Resolves the links read into `resolver`: by the union-find unless there are more than
/// `run.cluster_identity_above` distinct links (unset: never), else by SQL rounds and the
/// union-find over the groups that reach a per-type limit. Either way the same [`Resolution`].
pub async fn resolve(engine: &Engine, resolver: Resolver) -> Result<Resolution> {
    let Some(above) = engine.project.config.run.cluster_identity_above else {
        return Ok(resolver.resolve());
    };
    let prepared = resolver.prepare();
    if prepared.link_count() as u64 <= above {
        return Ok(prepared.apply());
    }
    let started = std::time::Instant::now();
    let folder = engine.scratch_folder("identity-rounds-")?;
    let limit = Some((
        engine.limits.query_timeout,
        engine.limits.query_timeout_text.as_str(),
    ));
    let (groups, rounds) = components(&engine.ctx, folder.path(), &prepared, limit).await?;
    let (links, identifiers) = (prepared.link_count(), prepared.len());
    let (resolution, over_a_limit) = prepared
        .apply_grouped(&groups)
        .map_err(|e| Error::Internal(format!("identity rounds: {e}")))?;
    // `over_a_limit`: identifiers of groups over a per-type limit, resolved link by link on
    // this machine; when they are most of the graph, the rounds saved little.
    tracing::info!(
        links,
        identifiers,
        over_a_limit,
        rounds,
        ms = started.elapsed().as_millis() as u64,
        "identity: connected components by SQL rounds (more links than run.cluster_identity_above = {above})"
    );
    Ok(resolution)
}

/// The connected component of every node of `prepared` over its joining links, as a node of
/// that component, found by SQL rounds through Parquet folders under `dir`; and how many
/// rounds it took. `limit` is `run.query_timeout` (and its text for the error), which each
/// query of the rounds must finish within.
pub async fn components(
    ctx: &SessionContext,
    dir: &Path,
    prepared: &Prepared,
    limit: Option<(std::time::Duration, &str)>,
) -> Result<(Vec<Node>, usize)> {
    let mut groups: Vec<Node> = (0..prepared.len() as Node).collect();
    let first = dir.join("links");
    let written = write_links(&first, prepared.joining_links())?;
    if written == 0 {
        return Ok((groups, 0));
    }
    let mut current = first;
    let mut rounds = 0;
    loop {
        if rounds == MAX_ROUNDS {
            return Err(Error::Internal(format!(
                "identity rounds: the components did not settle in {MAX_ROUNDS} rounds"
            )));
        }
        rounds += 1;
        let large = dir.join(format!("large-{rounds}"));
        within(
            limit,
            format!("identity rounds: large-star of round {rounds}"),
            Box::pin(query_into(ctx, &current, &large, LARGE_STAR)),
        )
        .await?;
        let small = dir.join(format!("small-{rounds}"));
        within(
            limit,
            format!("identity rounds: small-star of round {rounds}"),
            Box::pin(query_into(ctx, &large, &small, SMALL_STAR)),
        )
        .await?;
        // Each round's input is read by the next queries only.
        let _ = std::fs::remove_dir_all(&large);
        if rounds > 1 {
            let _ = std::fs::remove_dir_all(&current);
        }
        current = small;
        let open = within(
            limit,
            format!("identity rounds: the check of round {rounds}"),
            Box::pin(not_stars(ctx, &current)),
        )
        .await?;
        if open == 0 {
            break;
        }
    }
    let table = register(ctx, &current).await?;
    let mut stream = ctx
        .sql(&format!("SELECT u, v FROM {table}"))
        .await?
        .execute_stream()
        .await?;
    let n = groups.len() as i64;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        let (u, v) = (
            batch.column(0).as_primitive::<Int64Type>(),
            batch.column(1).as_primitive::<Int64Type>(),
        );
        for (u, v) in u.values().iter().zip(v.values()) {
            if !(0..n).contains(u) || !(0..n).contains(v) {
                return Err(Error::Internal(format!(
                    "identity rounds: the edge ({u}, {v}) names no identifier (there are {n})"
                )));
            }
            groups[*u as usize] = *v as Node;
        }
    }
    ctx.deregister_table(&table)?;
    Ok((groups, rounds))
}

type Work<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>> + 'a>>;

/// Runs `work`, the query `what`, within `limit` if there is one: past it the query is dropped
/// (cancelling its streams) and the run fails naming it, as [`Engine::in_time`] does for the
/// run's other queries.
async fn within<T>(
    limit: Option<(std::time::Duration, &str)>,
    what: String,
    work: Work<'_, T>,
) -> Result<T> {
    let Some((limit, text)) = limit else {
        return work.await;
    };
    match tokio::time::timeout(limit, work).await {
        Ok(done) => done,
        Err(_) => Err(Error::QueryTimeout {
            query: what,
            limit: text.to_string(),
            hint: String::new(),
        }),
    }
}

/// Large-star: every node's larger neighbours move to the smallest of the node and its
/// neighbours. Edges are (u, v) with u > v, read both ways.
const LARGE_STAR: &str =
    "WITH n AS (SELECT u, v FROM {input} UNION SELECT v AS u, u AS v FROM {input}), \
     m AS (SELECT u, CASE WHEN min(v) < u THEN min(v) ELSE u END AS m FROM n GROUP BY u) \
     SELECT DISTINCT n.v AS u, m.m AS v FROM n JOIN m ON n.u = m.u WHERE n.v > n.u";

/// Small-star: every node and its smaller neighbours move to the smallest of them.
const SMALL_STAR: &str =
    "WITH n AS (SELECT u, v FROM {input} UNION SELECT v AS u, u AS v FROM {input}), \
     s AS (SELECT u, v FROM n WHERE v < u), \
     m AS (SELECT u, min(v) AS m FROM s GROUP BY u) \
     SELECT DISTINCT s.v AS u, m.m AS v FROM s JOIN m ON s.u = m.u WHERE s.v <> m.m \
     UNION SELECT u, m AS v FROM m";

/// How many edges keep the graph from being stars: a node with two centres, or a centre that
/// is itself a leaf. At zero every component is one star, its centre the label of its nodes.
async fn not_stars(ctx: &SessionContext, folder: &Path) -> Result<i64> {
    let table = register(ctx, folder).await?;
    let sql = format!(
        "SELECT count(*) AS open FROM ( \
           SELECT a.u FROM {table} a JOIN {table} b ON a.v = b.u \
           UNION ALL SELECT u FROM {table} GROUP BY u HAVING count(*) > 1)"
    );
    let batches = ctx.sql(&sql).await?.collect().await?;
    ctx.deregister_table(&table)?;
    Ok(batches
        .iter()
        .find(|b| b.num_rows() > 0)
        .map(|b| b.column(0).as_primitive::<Int64Type>().value(0))
        .unwrap_or(0))
}

fn edge_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        // Nullable although no edge has a null: the rounds' aggregates are nullable, and
        // DataFusion 55 refuses a plan whose physical and logical nullability differ.
        Field::new("u", DataType::Int64, true),
        Field::new("v", DataType::Int64, true),
    ]))
}

/// Registers the Parquet folder `folder` under a name of its own, and returns the name.
async fn register(ctx: &SessionContext, folder: &Path) -> Result<String> {
    let name = format!(
        "identity_rounds_{}",
        folder
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("edges")
            .replace('-', "_")
    );
    let schema = edge_schema();
    let options = ParquetReadOptions {
        schema: Some(&schema),
        ..Default::default()
    };
    ctx.deregister_table(&name)?;
    ctx.register_parquet(&name, &format!("{}/", folder.display()), options)
        .await?;
    Ok(name)
}

/// Runs `sql` (reading `{input}`, the folder `input`) and writes its rows into the Parquet
/// folder `output`: a `COPY`, which on a cluster the executors write (the scratch folder is
/// shared), so a round's edges never pass through the driver.
async fn query_into(ctx: &SessionContext, input: &Path, output: &Path, sql: &str) -> Result<()> {
    let table = register(ctx, input).await?;
    let mut options = datafusion::config::TableParquetOptions::default();
    // Read once by the next query: LZ4 is cheaper than the default zstd for that.
    options.global.compression = Some("lz4_raw".into());
    ctx.sql(&sql.replace("{input}", &table))
        .await?
        .write_parquet(
            &format!("{}/", output.display()),
            datafusion::dataframe::DataFrameWriteOptions::new(),
            Some(options),
        )
        .await?;
    // An empty result may leave no file, and no folder, to list.
    std::fs::create_dir_all(output).map_err(|e| Error::io(output, e))?;
    ctx.deregister_table(&table)?;
    Ok(())
}

/// Writes `links` as (u, v) edges, the larger node first, into the Parquet folder `folder`;
/// returns how many.
fn write_links(folder: &Path, links: impl Iterator<Item = (Node, Node)>) -> Result<usize> {
    let mut out = Files::create(folder)?;
    let (mut u, mut v) = (Vec::new(), Vec::new());
    let mut written = 0;
    for (a, b) in links {
        u.push(a.max(b) as i64);
        v.push(a.min(b) as i64);
        if u.len() == 1 << 16 {
            written += u.len();
            out.write(&edges(&mut u, &mut v)?)?;
        }
    }
    written += u.len();
    out.write(&edges(&mut u, &mut v)?)?;
    out.close()?;
    Ok(written)
}

fn edges(u: &mut Vec<i64>, v: &mut Vec<i64>) -> Result<RecordBatch> {
    Ok(RecordBatch::try_new(
        edge_schema(),
        vec![
            Arc::new(Int64Array::from(std::mem::take(u))),
            Arc::new(Int64Array::from(std::mem::take(v))),
        ],
    )?)
}

/// A Parquet folder of edges written a file at a time: always at least one file, so that an
/// empty result still reads back.
struct Files {
    folder: std::path::PathBuf,
    writer: Option<parquet::arrow::ArrowWriter<std::fs::File>>,
    files: usize,
    rows: usize,
}

impl Files {
    fn create(folder: &Path) -> Result<Files> {
        std::fs::create_dir_all(folder).map_err(|e| Error::io(folder, e))?;
        let mut files = Files {
            folder: folder.to_path_buf(),
            writer: None,
            files: 0,
            rows: 0,
        };
        files.next()?;
        Ok(files)
    }

    fn next(&mut self) -> Result<()> {
        self.close()?;
        let path = self.folder.join(format!("part-{}.parquet", self.files));
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        let props = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::LZ4_RAW)
            .build();
        self.writer = Some(parquet::arrow::ArrowWriter::try_new(
            file,
            edge_schema(),
            Some(props),
        )?);
        self.files += 1;
        self.rows = 0;
        Ok(())
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if self.rows >= FILE_ROWS {
            self.next()?;
        }
        // One schema for every file of a folder, whatever the query named its columns.
        let batch = RecordBatch::try_new(edge_schema(), batch.columns().to_vec())?;
        if let Some(w) = &mut self.writer {
            w.write(&batch)?;
        }
        self.rows += batch.num_rows();
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        if let Some(w) = self.writer.take() {
            w.close()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::graph::tests::rules;
    use super::*;
    use crate::config::Normalize;
    use proptest::prelude::*;

    /// The grouping of a resolution: each identifier's component as the set of values in it.
    fn described(r: &Resolution) -> Vec<String> {
        let mut lines = Vec::new();
        for n in 0..r.len() as Node {
            let group = r.component(n).map(|c| {
                let mut members: Vec<&str> = (0..r.len() as Node)
                    .filter(|&m| r.component(m) == Some(c))
                    .map(|m| r.value(m))
                    .collect();
                members.sort();
                members.join(",")
            });
            lines.push(format!("{} -> {group:?}", r.value(n)));
        }
        for l in &r.accepted {
            lines.push(format!(
                "accepted {} {} {}",
                r.value(l.low),
                r.value(l.top),
                l.seen_at
            ));
        }
        for f in &r.refused {
            lines.push(format!(
                "refused {:?} {:?} {:?}",
                r.side(&f.refused),
                r.side(&f.other),
                f.reason
            ));
        }
        lines
    }

    fn resolver(rows: &[(u8, u8, u8, i64)]) -> Resolver {
        let rules = rules(&[
            ("user_id", Normalize::Trim, Some(1), &[], None),
            ("email", Normalize::Trim, Some(2), &["e0"], None),
            ("anonymous_id", Normalize::Trim, None, &[], Some(4)),
        ]);
        let mut r = Resolver::new(rules);
        let mut nodes = Vec::new();
        for &(u, e, a, t) in rows {
            let (user, email, anon) = (format!("u{u}"), format!("e{e}"), format!("a{a}"));
            let mut row: Vec<(u8, &str)> = Vec::new();
            // Some rows lack a user id or an email.
            if u < 6 {
                row.push((0, &user));
            }
            if e < 8 {
                row.push((1, &email));
            }
            row.push((2, &anon));
            r.add_row(&row, t, 0, &mut nodes);
        }
        r
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// SQL rounds and the union-find over the groups past a limit resolve as the
        /// union-find over every link: same groups, accepted links and refusals.
        #[test]
        fn rounds_resolve_as_the_union_find(
            rows in proptest::collection::vec((0u8..9, 0u8..12, 0u8..30, 0i64..50), 0..120)
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let expected = described(&resolver(&rows).resolve());
            let prepared = resolver(&rows).prepare();
            let dir = tempfile::tempdir().unwrap();
            let ctx = SessionContext::new();
            let (groups, _) = rt.block_on(components(&ctx, dir.path(), &prepared, None)).unwrap();
            let got = described(&prepared.apply_grouped(&groups).unwrap().0);
            prop_assert_eq!(got, expected);
        }
    }

    /// A long chain takes several rounds, and every node ends in one group.
    #[tokio::test]
    async fn a_chain_is_one_component() {
        let rules = rules(&[("anonymous_id", Normalize::Trim, None, &[], None)]);
        let mut r = Resolver::new(rules);
        let mut nodes = Vec::new();
        let values: Vec<String> = (0..200)
            .map(|i| format!("a{:03}", (i * 7919) % 200))
            .collect();
        for (i, w) in values.windows(2).enumerate() {
            // Two values of one type in one row: the first is the row's top.
            r.add_row(&[(0, &w[0]), (0, &w[1])], i as i64, 0, &mut nodes);
        }
        let prepared = r.prepare();
        let dir = tempfile::tempdir().unwrap();
        let (groups, rounds) = components(&SessionContext::new(), dir.path(), &prepared, None)
            .await
            .unwrap();
        assert!(rounds > 1, "{rounds}");
        assert!(groups.iter().all(|&g| g == groups[0]), "{groups:?}");
    }
}
