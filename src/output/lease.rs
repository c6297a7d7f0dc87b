//! The run lease: one run at a time per output.
//!
//! On object stores the lease is `<output>/_state/lease`, a small JSON object created with a
//! conditional create, renewed with a compare-and-swap on its ETag every third of its
//! lifetime, and taken over once expired only by a compare-and-swap as well. A run whose
//! renewal fails has lost the lease and cannot publish ([`Lease::confirm`]): that is the
//! fencing. A local output folder uses an operating-system lock on `_state/lease.lock`
//! instead (the local object store has no compare-and-swap; the kernel drops the lock when
//! the process dies, even by SIGKILL), and writes the same JSON for `tessera status`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, UpdateVersion};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::faults;
use crate::storage::{retry_write, Location, Place};

/// Where the lease lives under the output.
pub const LEASE: &str = "_state/lease";

/// What the lease object says.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LeaseBody {
    /// Host and process holding it.
    pub owner: String,
    /// The run holding it.
    pub run_id: String,
    /// When that run took it.
    pub acquired_at: DateTime<Utc>,
    /// When it lapses unless renewed.
    pub expires_at: DateTime<Utc>,
    /// True once the run finished and let it go.
    #[serde(default)]
    pub released: bool,
}

impl LeaseBody {
    /// True when another run may take the lease now.
    pub fn is_free(&self, now: DateTime<Utc>) -> bool {
        self.released || self.expires_at <= now
    }
}

/// A lease this process holds.
pub struct Lease {
    place: Place,
    path: Path,
    ttl: Duration,
    body: tokio::sync::Mutex<(LeaseBody, Option<UpdateVersion>)>,
    lost: AtomicBool,
    local: Option<std::fs::File>,
    renewer: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn owner() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{host}:{}", std::process::id())
}

fn version_of(done: object_store::PutResult) -> UpdateVersion {
    UpdateVersion {
        e_tag: done.e_tag,
        version: done.version,
    }
}

fn encode(body: &LeaseBody) -> Bytes {
    Bytes::from(serde_json::to_vec_pretty(body).expect("lease bodies serialise"))
}

/// Reads the lease object, if there is one, with its version.
pub async fn read(place: &Place) -> Result<Option<(LeaseBody, UpdateVersion)>> {
    let path = place.child(LEASE);
    let got = match place.store.get(&path).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let version = UpdateVersion {
        e_tag: got.meta.e_tag.clone(),
        version: got.meta.version.clone(),
    };
    let bytes = got.bytes().await?;
    let body = serde_json::from_slice(&bytes).map_err(|e| {
        Error::Usage(format!(
            "{}: not a Tessera lease ({e}); if no run is active, delete it",
            place.url_of(&path).as_str().trim_end_matches('/')
        ))
    })?;
    Ok(Some((body, version)))
}

/// When a lease taken at `now` for `ttl` ends; a lifetime past what a timestamp can hold is
/// an error (config bounds `run.lease_seconds`, so only an embedding caller can reach it).
fn expiry(now: DateTime<Utc>, ttl: Duration) -> Result<DateTime<Utc>> {
    chrono::Duration::from_std(ttl)
        .ok()
        .and_then(|ttl| now.checked_add_signed(ttl))
        .ok_or_else(|| {
            Error::Usage(format!(
                "a lease of {} seconds ends past the last representable time; set run.lease_seconds to at most a week",
                ttl.as_secs()
            ))
        })
}

impl Lease {
    /// Takes the lease for `run_id`, or fails with [`Error::Locked`] while another run holds it.
    pub async fn acquire(place: &Place, run_id: &str, ttl: Duration) -> Result<Arc<Lease>> {
        let now = Utc::now();
        let body = LeaseBody {
            owner: owner(),
            run_id: run_id.to_string(),
            acquired_at: now,
            expires_at: expiry(now, ttl)?,
            released: false,
        };
        let path = place.child(LEASE);
        let (local, version) = if let Location::Local(dir) = &place.location {
            (Some(lock_local(place, dir)?), None)
        } else {
            (None, Some(take(place, &path, &body).await?))
        };
        if local.is_some() {
            place.store.put(&path, encode(&body).into()).await?;
        }
        faults::wrote(path.as_ref());
        let lease = Arc::new(Lease {
            place: place.clone(),
            path,
            ttl,
            body: tokio::sync::Mutex::new((body, version)),
            lost: AtomicBool::new(false),
            local,
            renewer: std::sync::Mutex::new(None),
        });
        let weak = Arc::downgrade(&lease);
        let every = ttl / 3;
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(lease) = weak.upgrade() else { return };
                if let Err(e) = lease.renew().await {
                    tracing::error!(error = %e, "could not renew the run lease");
                    if lease.lost.load(Ordering::SeqCst) {
                        return;
                    }
                }
            }
        });
        *lease.renewer.lock().expect("not poisoned") = Some(task);
        Ok(lease)
    }

    /// Extends the lease by its lifetime with a compare-and-swap; losing the swap loses it.
    pub async fn renew(&self) -> Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(self.fenced());
        }
        let mut guard = self.body.lock().await;
        let mut body = guard.0.clone();
        body.expires_at = expiry(Utc::now(), self.ttl)?;
        if self.local.is_some() {
            self.place
                .store
                .put(&self.path, encode(&body).into())
                .await?;
            guard.0 = body;
            return Ok(());
        }
        let version = guard.1.clone().expect("remote leases have a version");
        match self.swap(&body, version).await {
            Ok(new) => {
                *guard = (body, Some(new));
                Ok(())
            }
            Err(Swap::Lost) => {
                self.lost.store(true, Ordering::SeqCst);
                Err(self.fenced())
            }
            Err(Swap::Failed(e)) => Err(e),
        }
    }

    /// Confirms, right before publishing, that this run still holds the lease (renewing it).
    pub async fn confirm(&self) -> Result<()> {
        self.renew().await
    }

    /// Lets the lease go so the next run need not wait for it to expire.
    pub async fn release(&self) {
        // The renewer holds the body lock across its write: taking the lock first means no
        // renewal is in flight when the task is stopped. Stopping it mid-write could land a
        // renewal whose new version this lease never learns.
        let mut guard = self.body.lock().await;
        if let Some(task) = self.renewer.lock().expect("not poisoned").take() {
            task.abort();
        }
        if self.lost.load(Ordering::SeqCst) {
            return;
        }
        let mut body = guard.0.clone();
        body.released = true;
        body.expires_at = Utc::now();
        let done = if self.local.is_some() {
            self.place
                .store
                .put(&self.path, encode(&body).into())
                .await
                .map(|_| ())
                .map_err(Error::from)
        } else {
            let version = guard.1.clone().expect("remote leases have a version");
            match self.swap(&body, version).await {
                Ok(new) => {
                    guard.1 = Some(new);
                    Ok(())
                }
                Err(Swap::Lost) => Err(self.fenced()),
                Err(Swap::Failed(e)) => Err(e),
            }
        };
        match done {
            Ok(()) => {
                faults::wrote(self.path.as_ref());
                guard.0 = body;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not release the run lease; it lapses on its own")
            }
        }
    }

    /// True once a renewal found another run holding the lease.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    fn fenced(&self) -> Error {
        Error::Fenced(format!(
            "this run's lease on {} was taken over by another run (it was not renewed within \
             run.lease_seconds = {}); nothing of this run is published",
            self.place,
            self.ttl.as_secs()
        ))
    }

    async fn swap(&self, body: &LeaseBody, version: UpdateVersion) -> Result<UpdateVersion, Swap> {
        let bytes = encode(body);
        let mut version = version;
        for _ in 0..3 {
            let swapped = retry_write(self.path.as_ref(), 4, |_| {
                let opts = PutOptions::from(PutMode::Update(version.clone()));
                self.place
                    .store
                    .put_opts(&self.path, bytes.clone().into(), opts)
            })
            .await;
            match swapped {
                Ok(done) => return Ok(version_of(done)),
                Err(object_store::Error::Precondition { .. }) => {
                    match read(&self.place).await {
                        // A timed-out attempt landed: the lease says what we wrote (the body
                        // carries an expiry to the nanosecond, so no one else wrote it).
                        Ok(Some((there, v))) if &there == body => return Ok(v),
                        // An earlier write of ours landed after its answer was lost (a timed-out
                        // renewal): the lease is still ours, at a version we did not see.
                        Ok(Some((there, v)))
                            if !there.released
                                && there.run_id == body.run_id
                                && there.owner == body.owner =>
                        {
                            version = v
                        }
                        _ => return Err(Swap::Lost),
                    }
                }
                Err(e) => return Err(Swap::Failed(e.into())),
            }
        }
        Err(Swap::Lost)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(task) = self.renewer.lock().expect("not poisoned").take() {
            task.abort();
        }
    }
}

enum Swap {
    Lost,
    Failed(Error),
}

/// Creates the lease object, or takes over an expired one by compare-and-swap.
async fn take(place: &Place, path: &Path, body: &LeaseBody) -> Result<UpdateVersion> {
    let bytes = encode(body);
    let created = retry_write(path.as_ref(), 4, |_| {
        place
            .store
            .put_opts(path, bytes.clone().into(), PutMode::Create.into())
    })
    .await;
    match created {
        Ok(done) => return Ok(version_of(done)),
        Err(object_store::Error::AlreadyExists { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let Some((held, version)) = read(place).await? else {
        return Err(Error::Locked(format!(
            "the lease on {place} changed hands while this run tried to take it; try again"
        )));
    };
    if held.run_id == body.run_id && held.owner == body.owner {
        // Our own create timed out after it landed.
        return Ok(version);
    }
    if !held.is_free(Utc::now()) {
        return Err(Error::Locked(format!(
            "another run ({}, on {}) holds the lease on {place} until {}; this run did nothing. \
             Wait for it to finish; a lease of a run that died lapses at that time",
            held.run_id,
            held.owner,
            held.expires_at.to_rfc3339()
        )));
    }
    match place
        .store
        .put_opts(path, bytes.into(), PutMode::Update(version).into())
        .await
    {
        Ok(done) => {
            if !held.released {
                tracing::warn!(previous = %held.run_id, owner = %held.owner,
                    "took over the expired lease of a run that did not finish");
            }
            Ok(version_of(done))
        }
        Err(object_store::Error::Precondition { .. }) => Err(Error::Locked(format!(
            "another run took the lease on {place} at the same moment; this run did nothing"
        ))),
        Err(e) => Err(e.into()),
    }
}

fn lock_local(place: &Place, dir: &std::path::Path) -> Result<std::fs::File> {
    let state = dir.join("_state");
    std::fs::create_dir_all(&state).map_err(|e| Error::io(&state, e))?;
    let path = state.join("lease.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Locked(format!(
            "another run holds the lease on {place} (lock file {}); this run did nothing. \
             Wait for it to finish",
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&path, e)),
    }
}

/// For a local output: whether a live process holds the lock (the lease JSON of a killed
/// run still shows its expiry, but the kernel has released its lock). `None` for other stores.
pub fn local_lock_held(place: &Place) -> Option<bool> {
    let Location::Local(dir) = &place.location else {
        return None;
    };
    let path = dir.join("_state").join("lease.lock");
    let file = std::fs::OpenOptions::new().write(true).open(&path).ok()?;
    Some(matches!(
        file.try_lock(),
        Err(std::fs::TryLockError::WouldBlock)
    ))
}

/// Checks that the store refuses a second conditional create of one object. Stores that
/// ignore the condition would let two runs both "win" the lease, so Tessera refuses them.
pub async fn check_conditional_writes(place: &Place) -> Result<()> {
    if matches!(place.location, Location::Local(_)) {
        return Ok(());
    }
    let path = place
        .child("_state/checks")
        .join(format!("conditional-{}", uuid::Uuid::new_v4()));
    let first = place
        .store
        .put_opts(
            &path,
            Bytes::from_static(b"1").into(),
            PutMode::Create.into(),
        )
        .await;
    let second = place
        .store
        .put_opts(
            &path,
            Bytes::from_static(b"2").into(),
            PutMode::Create.into(),
        )
        .await;
    let _ = place.store.delete(&path).await;
    first?;
    match second {
        Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
        Ok(_) => Err(Error::Location {
            key: "storage.output".into(),
            location: place.to_string(),
            message: "this store accepted a second create of the same object: it ignores \
                      conditional writes (If-None-Match), so leases and commits would not be \
                      safe. Use a store that honours them (AWS S3, MinIO, SeaweedFS, R2)"
                .into(),
        }),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place() -> Place {
        let prefix = format!("lease-{}", uuid::Uuid::new_v4().simple());
        Place::open(
            &format!("memory://{prefix}"),
            std::path::Path::new("/"),
            "storage.output",
        )
        .unwrap()
    }

    /// Writes `body` over the lease at `version`, as a write of some run would.
    async fn overwrite(place: &Place, body: &LeaseBody, version: UpdateVersion) {
        place
            .store
            .put_opts(
                &place.child(LEASE),
                encode(body).into(),
                PutMode::Update(version).into(),
            )
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_renewal_that_landed_unseen_does_not_keep_the_lease_from_being_released() {
        let place = place();
        let lease = Lease::acquire(&place, "r1", Duration::from_secs(60))
            .await
            .unwrap();
        // A renewal whose answer was lost (or whose task was stopped mid-write) landed:
        // the object moved on to a version this lease never saw.
        let (mut body, version) = read(&place).await.unwrap().unwrap();
        body.expires_at += chrono::Duration::seconds(5);
        overwrite(&place, &body, version).await;

        lease.renew().await.unwrap();
        lease.release().await;
        let (now, _) = read(&place).await.unwrap().unwrap();
        assert!(now.released, "released: {now:?}");
        assert_eq!(now.run_id, "r1");
        // The next run takes it at once instead of waiting for the expiry.
        let next = Lease::acquire(&place, "r2", Duration::from_secs(60)).await;
        assert!(next.is_ok(), "{:?}", next.err());
    }

    #[tokio::test]
    async fn a_lease_another_run_wrote_over_is_lost_and_stays_theirs() {
        let place = place();
        let lease = Lease::acquire(&place, "r1", Duration::from_secs(60))
            .await
            .unwrap();
        let (mut body, version) = read(&place).await.unwrap().unwrap();
        body.run_id = "other".into();
        overwrite(&place, &body, version).await;

        assert!(matches!(lease.renew().await, Err(Error::Fenced(_))));
        assert!(lease.is_lost());
        lease.release().await;
        let (now, _) = read(&place).await.unwrap().unwrap();
        assert_eq!(now, body, "the other run's lease is untouched");
    }
}
