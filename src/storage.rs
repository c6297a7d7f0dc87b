//! Locations (local folders, `file://`, `s3://`, `memory://`) → object stores that DataFusion
//! and delta-rs share.
//!
//! S3 settings come only from the standard `AWS_*` variables. Nothing here keeps or prints a
//! credential: a [`Place`] displays as its location, and object_store redacts its own `Debug`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::prelude::SessionContext;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::ClientConfigKey;
use object_store::ObjectStore;
use url::Url;

use crate::config::RetryConfig;
use crate::error::{Error, Result};

/// Where something lives, parsed from a config value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local folder or file (absolute).
    Local(PathBuf),
    /// `s3://bucket/prefix`
    S3 {
        /// The bucket.
        bucket: String,
        /// The key prefix, without leading or trailing `/` (may be empty).
        prefix: String,
    },
    /// `memory://prefix`: a process-wide in-memory store, for embedding and tests.
    Memory {
        /// The key prefix inside the store.
        prefix: String,
    },
}

impl Location {
    /// Parses `value`; relative paths resolve against `base`. `key` names the config key in errors.
    pub fn parse(value: &str, base: &Path, key: &str) -> Result<Location> {
        let bad = |message: String| Error::Location {
            key: key.to_string(),
            location: value.to_string(),
            message,
        };
        let value = value.trim();
        if let Some(rest) = value.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad(
                    "an S3 location needs a bucket: s3://bucket/prefix".into()
                ));
            }
            return Ok(Location::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
            });
        }
        if let Some(rest) = value.strip_prefix("memory://") {
            return Ok(Location::Memory {
                prefix: rest.trim_matches('/').to_string(),
            });
        }
        if value.starts_with("file://") {
            let url = Url::parse(value).map_err(|e| bad(format!("not a valid file URL: {e}")))?;
            let path = url.to_file_path().map_err(|_| {
                bad("a file:// URL needs an absolute path, e.g. file:///data/events".into())
            })?;
            return Ok(Location::Local(path));
        }
        if let Some((scheme, _)) = value.split_once("://") {
            return Err(bad(format!(
                "storage scheme `{scheme}://` is not supported; use a folder, file://, s3:// or memory://"
            )));
        }
        let path = Path::new(value);
        let path = if path.is_absolute() {
            path.to_path_buf()
        } else {
            base.join(path)
        };
        Ok(Location::Local(normalize_path(&path)))
    }
}

impl Location {
    /// Whether one of the two locations lies inside the other (or they are the same).
    ///
    /// Local folders are compared with symbolic links resolved as far as the folders exist,
    /// so a link to the events folder counts as the events folder.
    pub fn overlaps(&self, other: &Location) -> bool {
        match (self, other) {
            (Location::Local(a), Location::Local(b)) => {
                let (a, b) = (resolve_existing(a), resolve_existing(b));
                a.starts_with(&b) || b.starts_with(&a)
            }
            (
                Location::S3 {
                    bucket: a,
                    prefix: pa,
                },
                Location::S3 {
                    bucket: b,
                    prefix: pb,
                },
            ) => a == b && key_prefix_overlaps(pa, pb),
            (Location::Memory { prefix: pa }, Location::Memory { prefix: pb }) => {
                key_prefix_overlaps(pa, pb)
            }
            _ => false,
        }
    }
}

/// Whether two key prefixes (no leading or trailing `/`) nest, folder by folder.
fn key_prefix_overlaps(a: &str, b: &str) -> bool {
    let parts = |p: &str| -> Vec<String> {
        p.split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    };
    let (a, b) = (parts(a), parts(b));
    a.iter().zip(&b).all(|(x, y)| x == y)
}

/// `path` made absolute (against the current folder), `.` and `..` resolved, and then its
/// longest existing ancestor resolved through symbolic links (the rest need not exist yet):
/// what decides whether one local path lies inside another.
pub fn resolved_local(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    resolve_existing(&normalize_path(&absolute))
}

/// `path` with its longest existing ancestor canonicalised (links resolved), the rest kept.
fn resolve_existing(path: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut head = path.to_path_buf();
    loop {
        if let Ok(real) = head.canonicalize() {
            return rest.iter().rev().fold(real, |p, part| p.join(part));
        }
        match (head.file_name().map(|n| n.to_os_string()), head.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                head = parent.to_path_buf();
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// The object path of an absolute local path: one part per folder name, taken as it is,
/// which is what the local store maps back to this very folder. (`from_absolute_path` goes
/// through a URL and decodes `%` escapes on the way: a folder named `100%25` became `100%`,
/// which is another folder.)
pub fn local_object_path(path: &Path) -> std::result::Result<ObjectPath, String> {
    let mut out = ObjectPath::default();
    for part in path.components() {
        match part {
            std::path::Component::Normal(name) => {
                let name = name.to_str().ok_or_else(|| {
                    format!(
                        "the folder name `{}` is not valid UTF-8; rename it",
                        name.to_string_lossy()
                    )
                })?;
                let part = object_store::path::PathPart::parse(name)
                    .map_err(|e| format!("not a usable path: {e}; rename the folder"))?;
                out = out.join(part);
            }
            std::path::Component::RootDir | std::path::Component::Prefix(_) => {}
            std::path::Component::CurDir | std::path::Component::ParentDir => {
                return Err("not a usable path: it must be absolute, without `.` or `..`".into())
            }
        }
    }
    Ok(out)
}

/// Removes `.` and resolves `..` without touching the file system (the folder may not exist yet).
fn normalize_path(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// A location opened as an object store: where reads and writes go.
#[derive(Clone)]
pub struct Place {
    /// The config key it came from, for error messages.
    pub key: String,
    /// The parsed location.
    pub location: Location,
    /// The store, rooted at the scheme and host (bucket); `prefix` locates this place inside it.
    pub store: Arc<dyn ObjectStore>,
    /// Where this place starts inside `store`.
    pub prefix: ObjectPath,
}

impl std::fmt::Debug for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Place({} = {})", self.key, self.url())
    }
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.url())
    }
}

impl Place {
    /// Opens `value` (from config key `key`), resolving relative paths against `base`, with
    /// the default request retries and timeouts.
    pub fn open(value: &str, base: &Path, key: &str) -> Result<Place> {
        Self::open_with(value, base, key, &RetryConfig::default())
    }

    /// [`Place::open`] with the project's `[storage.retry]` settings for S3.
    pub fn open_with(value: &str, base: &Path, key: &str, retry: &RetryConfig) -> Result<Place> {
        let location = Location::parse(value, base, key)?;
        let (store, prefix): (Arc<dyn ObjectStore>, ObjectPath) = match &location {
            Location::Local(path) => {
                let prefix = local_object_path(path).map_err(|message| Error::Location {
                    key: key.to_string(),
                    location: value.to_string(),
                    message,
                })?;
                (Arc::new(LocalFileSystem::new()), prefix)
            }
            Location::S3 { bucket, prefix } => {
                let store = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(object_store::RetryConfig {
                        backoff: object_store::BackoffConfig {
                            init_backoff: Duration::from_millis(retry.initial_backoff_ms),
                            max_backoff: Duration::from_millis(retry.max_backoff_ms),
                            base: 2.0,
                        },
                        max_retries: retry.max_retries,
                        retry_timeout: Duration::from_secs(retry.retry_timeout_secs),
                    })
                    // Set one by one: a whole ClientOptions would drop AWS_ALLOW_HTTP & co.
                    .with_config(
                        AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                        format!("{}s", retry.request_timeout_secs),
                    )
                    .with_config(
                        AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                        format!("{}s", retry.connect_timeout_secs),
                    )
                    .build()
                    .map_err(|e| Error::Location {
                        key: key.to_string(),
                        location: value.to_string(),
                        message: format!(
                            "cannot configure S3 from the AWS_* variables: {e}; set AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL, AWS_ALLOW_HTTP for a non-AWS server)"
                        ),
                    })?;
                (Arc::new(store), ObjectPath::from(prefix.as_str()))
            }
            Location::Memory { prefix } => (memory_store(), ObjectPath::from(prefix.as_str())),
        };
        Ok(Place {
            key: key.to_string(),
            location,
            store,
            prefix,
        })
    }

    /// The URL of the store's root (scheme and bucket), as DataFusion registers stores.
    pub fn store_url(&self) -> Url {
        match &self.location {
            Location::Local(_) => Url::parse("file:///").expect("static URL"),
            Location::S3 { bucket, .. } => {
                Url::parse(&format!("s3://{bucket}/")).expect("bucket names are URL-safe")
            }
            Location::Memory { .. } => Url::parse("memory:///").expect("static URL"),
        }
    }

    /// The DataFusion name of this place's store.
    pub fn object_store_url(&self) -> ObjectStoreUrl {
        ObjectStoreUrl::parse(self.store_url().as_str()).expect("store URLs are valid")
    }

    /// The URL of this place itself, ending in `/`.
    pub fn url(&self) -> Url {
        self.url_of(&self.prefix)
    }

    /// The URL of an object path inside this place's store, with a trailing `/`.
    pub fn url_of(&self, path: &ObjectPath) -> Url {
        let mut url = self.store_url();
        let mut text = url.path().to_string();
        if !path.as_ref().is_empty() {
            text.push_str(path.as_ref());
            text.push('/');
        }
        url.set_path(&text);
        url
    }

    /// The object path of a child (e.g. a table folder, or `segments/high_value`) of this place.
    pub fn child(&self, name: &str) -> ObjectPath {
        name.split('/')
            .filter(|part| !part.is_empty())
            .fold(self.prefix.clone(), |path, part| path.join(part))
    }

    /// Registers the store with a DataFusion context so SQL and scans can read it.
    pub fn register(&self, ctx: &SessionContext) {
        ctx.register_object_store(&self.store_url(), self.store.clone());
    }

    /// True for S3 locations.
    pub fn is_remote(&self) -> bool {
        matches!(self.location, Location::S3 { .. })
    }
}

/// Tries a write up to `tries` times, waiting a little longer after each failure.
///
/// object_store retries server errors and dropped connections itself, but not a write that
/// timed out (it may have landed). The writes Tessera repeats this way are safe to repeat:
/// conditional creates and updates (whose callers check what a `Precondition` or
/// `AlreadyExists` answer means), and data files under names no one else writes. Those two
/// answers, and `NotFound`, are results, not failures: they return at once. `attempt`
/// (1, 2, …) lets the write know it is a repeat.
pub async fn retry_write<T, F, Fut>(what: &str, tries: u64, mut write: F) -> object_store::Result<T>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = object_store::Result<T>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match write(attempt).await {
            Err(e)
                if attempt < tries
                    && !matches!(
                        e,
                        object_store::Error::AlreadyExists { .. }
                            | object_store::Error::Precondition { .. }
                            | object_store::Error::NotFound { .. }
                    ) =>
            {
                tracing::warn!(%what, error = %e, attempt, "write failed; trying again");
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
            done => return done,
        }
    }
}

/// The one in-memory store of this process, shared by every `memory://` location.
fn memory_store() -> Arc<dyn ObjectStore> {
    static STORE: OnceLock<Arc<InMemory>> = OnceLock::new();
    STORE.get_or_init(|| Arc::new(InMemory::new())).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_kind() {
        let base = Path::new("/proj");
        assert_eq!(
            Location::parse("data/events", base, "k").unwrap(),
            Location::Local("/proj/data/events".into())
        );
        assert_eq!(
            Location::parse("./a/../b", base, "k").unwrap(),
            Location::Local("/proj/b".into())
        );
        assert_eq!(
            Location::parse("/abs/x", base, "k").unwrap(),
            Location::Local("/abs/x".into())
        );
        assert_eq!(
            Location::parse("file:///abs/y", base, "k").unwrap(),
            Location::Local("/abs/y".into())
        );
        assert_eq!(
            Location::parse("s3://bkt/a/b/", base, "k").unwrap(),
            Location::S3 {
                bucket: "bkt".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            Location::parse("s3://bkt", base, "k").unwrap(),
            Location::S3 {
                bucket: "bkt".into(),
                prefix: "".into()
            }
        );
        assert_eq!(
            Location::parse("memory://t1", base, "k").unwrap(),
            Location::Memory {
                prefix: "t1".into()
            }
        );
    }

    #[test]
    fn unsupported_scheme_names_the_key() {
        let e = Location::parse("gs://b/x", Path::new("/"), "storage.events").unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("storage.events") && text.contains("gs://"),
            "{text}"
        );
        let e = Location::parse("s3:///x", Path::new("/"), "storage.output").unwrap_err();
        assert!(e.to_string().contains("bucket"), "{e}");
    }

    #[test]
    fn urls_of_places() {
        let p = Place::open("/tmp/out", Path::new("/"), "k").unwrap();
        assert_eq!(p.url().as_str(), "file:///tmp/out/");
        assert_eq!(p.url_of(&p.child("runs")).as_str(), "file:///tmp/out/runs/");
        let m = Place::open("memory://x", Path::new("/"), "k").unwrap();
        assert_eq!(m.url_of(&m.child("runs")).as_str(), "memory:///x/runs/");
    }
}

/// A place whose files are read as events, and the producer layout they are in.
#[derive(Clone, Debug)]
pub struct EventPlace {
    /// Where the files are.
    pub place: Place,
    /// How they map onto Tessera's event columns.
    pub format: crate::config::EventFormat,
}
