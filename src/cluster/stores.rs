//! The object stores of a scheduler or executor: opened on first use from the URL a plan
//! names.
//!
//! The driver registers a store per location of its project; the servers do not know the
//! project, only the URLs in the plans they receive. An `s3://bucket/` URL opens that bucket
//! the way a project location does (credentials, endpoint and region from the process's
//! `AWS_*` variables, the default retries), so scheduler and executors need the same
//! variables as the driver. `file://` is the local file system: such paths must be the same
//! on every machine (a shared volume).

use std::sync::Arc;

use datafusion::error::{DataFusionError, Result};
use datafusion::execution::object_store::{DefaultObjectStoreRegistry, ObjectStoreRegistry};
use object_store::ObjectStore;
use url::Url;

/// Stores by scheme and bucket, opened when first asked for.
#[derive(Debug, Default)]
pub struct Stores {
    base: DefaultObjectStoreRegistry,
    opened: std::sync::Mutex<std::collections::HashMap<String, Arc<dyn ObjectStore>>>,
}

impl ObjectStoreRegistry for Stores {
    fn register_store(
        &self,
        url: &Url,
        store: Arc<dyn ObjectStore>,
    ) -> Option<Arc<dyn ObjectStore>> {
        self.base.register_store(url, store)
    }

    fn deregister_store(&self, url: &Url) -> Result<Arc<dyn ObjectStore>> {
        self.base.deregister_store(url)
    }

    fn get_store(&self, url: &Url) -> Result<Arc<dyn ObjectStore>> {
        if let Ok(store) = self.base.get_store(url) {
            return Ok(store);
        }
        if url.scheme() != "s3" {
            return self.base.get_store(url);
        }
        let bucket = url.host_str().unwrap_or_default();
        let key = format!("s3://{bucket}/");
        let mut opened = self
            .opened
            .lock()
            .map_err(|_| DataFusionError::Internal("object store list poisoned".into()))?;
        if let Some(store) = opened.get(&key) {
            return Ok(store.clone());
        }
        let place = crate::storage::Place::open(&key, std::path::Path::new("/"), "a plan's table")
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        opened.insert(key, place.store.clone());
        Ok(place.store)
    }
}
