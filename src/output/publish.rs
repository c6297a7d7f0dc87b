//! All-or-nothing publishing of a run's tables.
//!
//! During a run, delta-rs writes table data files straight to the output store (under unique
//! names, invisible until a log entry names them) but every `_delta_log/` entry goes to an
//! in-memory overlay ([`StagedStore`]): delta-rs believes it committed, reads its own commits
//! back, and nobody else sees anything. When every table is written, [`Stage::publish`]
//! checks the lease, writes a manifest with every staged log entry to
//! `<output>/_state/publish/<run_id>.json` in one PUT, then creates each log entry with a
//! conditional PUT (the `runs` table's last) and deletes the manifest.
//!
//! Besides log entries, a publish can replace or delete named files ([`Stage::replace_on_publish`],
//! [`Stage::delete_on_publish`]): the current-files manifests of plain-Parquet readers
//! ([`crate::output::manifest`]) change in the same publish as the tables they list.
//!
//! A run that dies before its manifest exists published nothing. One that dies after it is
//! finished by the next run ([`roll_forward`]): re-creating an entry that already landed finds
//! the same bytes there and moves on, so publishing twice is harmless.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::faults;
use crate::output::lease::Lease;
use crate::storage::{retry_write, Place};

/// The folder under the output that holds manifests of publishes in progress.
pub const PUBLISH_DIR: &str = "_state/publish";

fn is_log(path: &Path) -> bool {
    path.parts().any(|part| part.as_ref() == "_delta_log")
}

/// An object store that keeps Delta log entries in memory and passes everything else through.
#[derive(Debug)]
pub struct StagedStore {
    inner: Arc<dyn ObjectStore>,
    staged: Arc<InMemory>,
}

impl fmt::Display for StagedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Staged({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for StagedStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        if !is_log(location) {
            // Data files have unique names, so writing one again is safe: a PUT that timed
            // out (which object_store does not retry) gets two more tries.
            let tries = if matches!(opts.mode, PutMode::Overwrite) {
                3
            } else {
                1
            };
            let result = retry_write(location.as_ref(), tries, |_| {
                self.inner.put_opts(location, payload.clone(), opts.clone())
            })
            .await;
            faults::wrote(location.as_ref());
            return result;
        }
        if matches!(opts.mode, PutMode::Create) {
            match self.inner.head(location).await {
                Ok(_) => {
                    return Err(object_store::Error::AlreadyExists {
                        path: location.to_string(),
                        source: "published by another writer".into(),
                    })
                }
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        self.staged.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        if is_log(location) {
            self.staged.put_multipart_opts(location, opts).await
        } else {
            self.inner.put_multipart_opts(location, opts).await
        }
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        if is_log(location) && self.staged.head(location).await.is_ok() {
            return self.staged.get_opts(location, options).await;
        }
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.merged(prefix, None)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.merged(prefix, Some(offset.clone()))
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let mut inner = self.inner.list_with_delimiter(prefix).await?;
        let staged = self.staged.list_with_delimiter(prefix).await?;
        let mut prefixes: HashSet<Path> = inner.common_prefixes.drain(..).collect();
        prefixes.extend(staged.common_prefixes);
        let shadowed: HashSet<Path> = staged.objects.iter().map(|m| m.location.clone()).collect();
        inner.objects.retain(|m| !shadowed.contains(&m.location));
        inner.objects.extend(staged.objects);
        inner.common_prefixes = prefixes.into_iter().collect();
        inner.common_prefixes.sort();
        Ok(inner)
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

impl StagedStore {
    /// The store's objects and the staged entries (which shadow same-named objects), sorted by
    /// path as S3 lists them: the Delta kernel expects log listings in version order.
    fn merged(
        &self,
        prefix: Option<&Path>,
        offset: Option<Path>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let inner = self.inner.clone();
        let staged = self.staged.clone();
        let prefix = prefix.cloned();
        stream::once(async move {
            let staged: Vec<ObjectMeta> = staged.list(prefix.as_ref()).try_collect().await?;
            let rest = match &offset {
                Some(o) => inner.list_with_offset(prefix.as_ref(), o),
                None => inner.list(prefix.as_ref()),
            };
            let after = move |m: &ObjectMeta| offset.as_ref().is_none_or(|o| &m.location > o);
            if staged.is_empty() {
                return Ok::<_, object_store::Error>(rest);
            }
            let shadowed: HashSet<Path> = staged.iter().map(|m| m.location.clone()).collect();
            let mut all: Vec<ObjectMeta> = rest
                .try_filter(|m| futures::future::ready(!shadowed.contains(&m.location)))
                .try_collect()
                .await?;
            all.extend(staged.into_iter().filter(after));
            all.sort_by(|a, b| a.location.cmp(&b.location));
            Ok(stream::iter(all.into_iter().map(Ok)).boxed())
        })
        .try_flatten()
        .boxed()
    }
}

/// One run's staged log entries, and the way to publish them.
pub struct Stage {
    real: Place,
    staged: Arc<InMemory>,
    place: Place,
    /// Files replaced or deleted by the publish, beside the log entries.
    others: std::sync::Mutex<Vec<Entry>>,
}

/// What a publish manifest holds: each log entry to create, in order.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    run_id: String,
    created_at: chrono::DateTime<chrono::Utc>,
    entries: Vec<Entry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    /// The object path inside the output store.
    path: String,
    /// The log entry (Delta commits are JSON text), or the file's new text.
    body: String,
    /// What to do with `path`; log entries are created once.
    #[serde(default, skip_serializing_if = "Op::is_create")]
    op: Op,
}

/// How an entry is applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Op {
    /// Created unless the same bytes are there (a Delta log entry).
    #[default]
    Create,
    /// Written over whatever is there (a manifest that names the current files).
    Replace,
    /// Deleted if there.
    Delete,
}

impl Op {
    fn is_create(&self) -> bool {
        *self == Op::Create
    }
}

impl Stage {
    /// A stage over the output `place`.
    pub fn new(place: &Place) -> Stage {
        let staged = Arc::new(InMemory::new());
        let store = Arc::new(StagedStore {
            inner: place.store.clone(),
            staged: staged.clone(),
        });
        let mut staged_place = place.clone();
        staged_place.store = store;
        Stage {
            real: place.clone(),
            staged,
            place: staged_place,
            others: Default::default(),
        }
    }

    /// Has the publish write `body` to `path` (overwriting it), after the log entries of the
    /// table `path` lies in.
    pub fn replace_on_publish(&self, path: &Path, body: String) {
        self.push_other(Entry {
            path: path.to_string(),
            body,
            op: Op::Replace,
        });
    }

    /// Has the publish delete `path` (if it is there).
    pub fn delete_on_publish(&self, path: &Path) {
        self.push_other(Entry {
            path: path.to_string(),
            body: String::new(),
            op: Op::Delete,
        });
    }

    fn push_other(&self, entry: Entry) {
        match self.others.lock() {
            Ok(mut others) => others.push(entry),
            Err(poisoned) => poisoned.into_inner().push(entry),
        }
    }

    /// The output as the run sees it: its own staged commits included.
    pub fn place(&self) -> &Place {
        &self.place
    }

    /// Publishes every staged log entry; entries of `last` (the `runs` table) go last.
    ///
    /// The lease is confirmed first: a run whose lease was taken over publishes nothing.
    pub async fn publish(&self, run_id: &str, lease: &Lease, last: &str) -> Result<usize> {
        let mut entries = Vec::new();
        let mut listing = self.staged.list(None);
        while let Some(meta) = listing.next().await {
            let meta = meta?;
            let body = self.staged.get(&meta.location).await?.bytes().await?;
            let body = String::from_utf8(body.to_vec()).map_err(|_| {
                Error::Usage(format!(
                    "staged log entry {} is not text; checkpoints are written after publishing",
                    meta.location
                ))
            })?;
            entries.push(Entry {
                path: meta.location.to_string(),
                body,
                op: Op::Create,
            });
        }
        entries.extend(match self.others.lock() {
            Ok(others) => others.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        });
        if entries.is_empty() {
            return Ok(0);
        }
        // `last`'s log entries (then its manifest) go after every other table's.
        let runs_folder = self.real.child(last);
        entries.sort_by_key(|e| {
            let path = Path::from(e.path.as_str());
            (path.prefix_matches(&runs_folder), e.path.clone())
        });
        let manifest = Manifest {
            run_id: run_id.to_string(),
            created_at: chrono::Utc::now(),
            entries,
        };
        let body = serde_json::to_vec(&manifest)
            .map_err(|e| Error::Usage(format!("cannot encode the publish manifest: {e}")))?;
        lease.confirm().await?;
        let path = self.real.child(PUBLISH_DIR).join(format!("{run_id}.json"));
        create_once(&self.real, &path, Bytes::from(body)).await?;
        apply(&self.real, &manifest).await?;
        // Published. A manifest left behind is harmless: the next run re-applies it (finding
        // every entry in place) and deletes it.
        if let Err(e) = delete_with_retry(&self.real, &path).await {
            tracing::warn!(manifest = %path, error = %e, "could not delete the publish manifest; the next run will");
        }
        faults::wrote(path.as_ref());
        Ok(manifest.entries.len())
    }
}

/// Creates `path` holding `body` unless it exists; a timed-out attempt is retried, and finding
/// the same bytes already there counts as success (the earlier attempt landed).
pub async fn create_once(place: &Place, path: &Path, body: Bytes) -> Result<()> {
    let created = retry_write(path.as_ref(), 4, |_| {
        place
            .store
            .put_opts(path, body.clone().into(), PutMode::Create.into())
    })
    .await;
    match created {
        Ok(_) => {
            faults::wrote(path.as_ref());
            Ok(())
        }
        Err(object_store::Error::AlreadyExists { .. }) => {
            let there = place.store.get(path).await?.bytes().await?;
            if there == body {
                return Ok(());
            }
            Err(Error::Conflict(format!(
                "{} was written by another run; another writer is publishing to {place} \
                 (two deployments sharing one output, or a run that outlived its lease)",
                place.url_of(path).as_str().trim_end_matches('/')
            )))
        }
        Err(e) => Err(e.into()),
    }
}

async fn delete_with_retry(place: &Place, path: &Path) -> Result<()> {
    match retry_write(path.as_ref(), 4, |_| place.store.delete(path)).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn apply(place: &Place, manifest: &Manifest) -> Result<()> {
    for entry in &manifest.entries {
        let path = Path::from(entry.path.as_str());
        let body = Bytes::from(entry.body.clone());
        match entry.op {
            Op::Create => create_once(place, &path, body).await?,
            // Applying again (a roll-forward) writes the same bytes: harmless.
            Op::Replace => {
                retry_write(path.as_ref(), 4, |_| {
                    place
                        .store
                        .put_opts(&path, body.clone().into(), PutMode::Overwrite.into())
                })
                .await?;
                faults::wrote(path.as_ref());
            }
            Op::Delete => delete_with_retry(place, &path).await?,
        }
    }
    Ok(())
}

/// Finishes publishes that a dead run left half done; returns the run ids finished.
pub async fn roll_forward(place: &Place) -> Result<Vec<String>> {
    let folder = place.child(PUBLISH_DIR);
    let mut manifests: Vec<ObjectMeta> = place.store.list(Some(&folder)).try_collect().await?;
    manifests.sort_by_key(|m| m.last_modified);
    let mut finished = Vec::new();
    for meta in manifests {
        let body = place.store.get(&meta.location).await?.bytes().await?;
        let manifest: Manifest = serde_json::from_slice(&body).map_err(|e| {
            Error::Usage(format!(
                "{}: not a publish manifest ({e}); delete it if nothing else writes to this output",
                meta.location
            ))
        })?;
        tracing::warn!(run_id = %manifest.run_id, entries = manifest.entries.len(),
            "finishing the publish of a run that stopped part way");
        apply(place, &manifest).await?;
        delete_with_retry(place, &meta.location).await?;
        finished.push(manifest.run_id);
    }
    Ok(finished)
}

/// Publish manifests waiting to be finished (for `tessera status`).
pub async fn pending(place: &Place) -> Result<Vec<String>> {
    let folder = place.child(PUBLISH_DIR);
    let found: Vec<ObjectMeta> = place.store.list(Some(&folder)).try_collect().await?;
    Ok(found
        .into_iter()
        .filter_map(|m| {
            m.location
                .filename()
                .map(|f| f.trim_end_matches(".json").to_string())
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(name: &str) -> Place {
        let prefix = format!("publish-{name}-{}", uuid::Uuid::new_v4().simple());
        Place::open(
            &format!("memory://{prefix}"),
            std::path::Path::new("/"),
            "storage.output",
        )
        .unwrap()
    }

    async fn exists(place: &Place, path: &Path) -> bool {
        place.store.head(path).await.is_ok()
    }

    #[tokio::test]
    async fn staged_log_entries_are_invisible_until_published_and_listed_in_order() {
        let real = place("stage");
        let stage = Stage::new(&real);
        let staged = stage.place();
        let log = real.child("t/_delta_log");
        let data = real.child("t").join("part-1.parquet");
        // A data file goes straight through; log entries stay in the stage.
        staged.store.put(&data, "rows".into()).await.unwrap();
        for v in [1u64, 0] {
            let entry = log.clone().join(format!("{v:020}.json"));
            staged
                .store
                .put_opts(&entry, format!("commit {v}").into(), PutMode::Create.into())
                .await
                .unwrap();
        }
        assert!(exists(&real, &data).await);
        assert!(!exists(&real, &log.clone().join(format!("{:020}.json", 0))).await);
        // The stage lists its entries with the store's objects, sorted by path.
        let listed: Vec<ObjectMeta> = staged
            .store
            .list(Some(&real.child("t")))
            .try_collect()
            .await
            .unwrap();
        let names: Vec<String> = listed.iter().map(|m| m.location.to_string()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        assert_eq!(names.len(), 3);
        // A staged create of an entry the real log already has is refused, as on S3.
        let taken = log.clone().join(format!("{:020}.json", 7));
        real.store.put(&taken, "theirs".into()).await.unwrap();
        let again = staged
            .store
            .put_opts(&taken, "ours".into(), PutMode::Create.into())
            .await;
        assert!(matches!(
            again,
            Err(object_store::Error::AlreadyExists { .. })
        ));

        let lease = Lease::acquire(&real, "r1", std::time::Duration::from_secs(30))
            .await
            .unwrap();
        let published = stage.publish("r1", &lease, "runs").await.unwrap();
        assert_eq!(published, 2);
        for v in [0u64, 1] {
            let entry = log.clone().join(format!("{v:020}.json"));
            let body = real.store.get(&entry).await.unwrap().bytes().await.unwrap();
            assert_eq!(body, format!("commit {v}").as_bytes());
        }
        assert!(pending(&real).await.unwrap().is_empty(), "manifest removed");
        lease.release().await;
    }

    #[tokio::test]
    async fn files_replaced_or_deleted_by_a_publish_change_only_when_it_publishes() {
        let real = place("others");
        let manifest = real.child("t/_symlink_format_manifest/manifest");
        let gone = real.child("old/_symlink_format_manifest/manifest");
        real.store.put(&manifest, "v1\n".into()).await.unwrap();
        real.store.put(&gone, "old\n".into()).await.unwrap();
        let stage = Stage::new(&real);
        let entry = real.child("t/_delta_log").join(format!("{:020}.json", 1));
        stage
            .place()
            .store
            .put_opts(&entry, "commit".into(), PutMode::Create.into())
            .await
            .unwrap();
        stage.replace_on_publish(&manifest, "v2\n".into());
        stage.delete_on_publish(&gone);
        let body = real
            .store
            .get(&manifest)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(
            body,
            "v1\n".as_bytes(),
            "nothing changes before the publish"
        );
        assert!(exists(&real, &gone).await);

        let lease = Lease::acquire(&real, "r2", std::time::Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(stage.publish("r2", &lease, "runs").await.unwrap(), 3);
        let body = real
            .store
            .get(&manifest)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(body, "v2\n".as_bytes());
        assert!(!exists(&real, &gone).await);
        lease.release().await;
    }

    #[tokio::test]
    async fn a_half_done_publish_is_finished_once_and_a_foreign_entry_is_a_conflict() {
        let real = place("roll");
        let entry = |table: &str, v: u64| Entry {
            path: real
                .child(table)
                .join("_delta_log")
                .join(format!("{v:020}.json"))
                .to_string(),
            body: format!("{table} {v}"),
            op: Op::Create,
        };
        let manifest = Manifest {
            run_id: "dead".into(),
            created_at: chrono::Utc::now(),
            entries: vec![entry("profiles", 3), entry("runs", 9)],
        };
        // The run died after publishing its first entry.
        let first = Path::from(manifest.entries[0].path.as_str());
        real.store
            .put(&first, manifest.entries[0].body.clone().into())
            .await
            .unwrap();
        let path = real.child(PUBLISH_DIR).join("dead.json");
        real.store
            .put(&path, serde_json::to_vec(&manifest).unwrap().into())
            .await
            .unwrap();
        assert_eq!(pending(&real).await.unwrap(), vec!["dead".to_string()]);
        assert_eq!(roll_forward(&real).await.unwrap(), vec!["dead".to_string()]);
        let runs = Path::from(manifest.entries[1].path.as_str());
        assert!(exists(&real, &runs).await);
        assert!(
            roll_forward(&real).await.unwrap().is_empty(),
            "nothing left"
        );

        // Someone else's entry where ours should go: refused, not overwritten.
        let other = Manifest {
            run_id: "late".into(),
            created_at: chrono::Utc::now(),
            entries: vec![Entry {
                path: manifest.entries[1].path.clone(),
                body: "different".into(),
                op: Op::Create,
            }],
        };
        let path = real.child(PUBLISH_DIR).join("late.json");
        real.store
            .put(&path, serde_json::to_vec(&other).unwrap().into())
            .await
            .unwrap();
        let err = roll_forward(&real).await.unwrap_err();
        assert!(matches!(err, Error::Conflict(_)), "{err}");
        let body = real.store.get(&runs).await.unwrap().bytes().await.unwrap();
        assert_eq!(body, "runs 9".as_bytes());
    }
}
