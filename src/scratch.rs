//! A run's local scratch folder, and the sweep that removes those of runs that died.
//!
//! A run writes a copy of its resolved events (and DataFusion its spill files) under one
//! folder, `tessera-XXXXXX` in `run.spill_dir` or the system's temporary folder. A run that
//! ends removes it; one killed with SIGKILL (OOM killer, a scheduler's timeout) cannot, and at
//! 100M events it leaves gigabytes. So each folder holds `.lock`, locked by its process for
//! as long as it lives; the kernel drops the lock when the process dies, however it dies.
//! Before a run makes its own folder it removes every `tessera-*` folder beside it whose lock
//! it can take. The lock is made before the folder gets its final name, so no other run ever
//! sees a live folder without a held lock.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};

/// Names of scratch folders start with this.
const PREFIX: &str = "tessera-";
/// Names of scratch folders while they are being made, before their lock is held.
const STAGING: &str = ".tessera-new-";
/// The lock file inside a scratch folder.
const LOCK: &str = ".lock";
/// A folder named like a scratch folder but without a lock file (made by an older Tessera, or
/// a staging folder of a process killed before it was named) is removed once this old.
const UNLOCKED_AGE: Duration = Duration::from_secs(24 * 3600);

/// A scratch folder this process holds; removed when dropped.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
    _lock: File,
}

impl Scratch {
    /// Removes dead runs' folders in `parent`, then makes and locks this run's.
    pub fn create(parent: &Path) -> Result<Scratch> {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        let removed = sweep(parent);
        if removed > 0 {
            tracing::info!(folder = %parent.display(), removed,
                "removed the scratch folders of runs that did not finish");
        }
        let staging = tempfile::Builder::new()
            .prefix(STAGING)
            .tempdir_in(parent)
            .map_err(|e| Error::io(parent, e))?
            .keep();
        let lock_path = staging.join(LOCK);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, e))?;
        lock.lock().map_err(|e| Error::io(&lock_path, e))?;
        let suffix = staging
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(STAGING))
            .expect("named by the builder above")
            .to_string();
        let path = parent.join(format!("{PREFIX}{suffix}"));
        std::fs::rename(&staging, &path).map_err(|e| Error::io(&path, e))?;
        Ok(Scratch { path, _lock: lock })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(folder = %self.path.display(), error = %e,
                "could not remove the run's scratch folder");
        }
    }
}

/// Removes the scratch folders in `parent` that no live process holds; returns how many.
///
/// A folder is another run's while its lock is held. One this process cannot inspect (no
/// permission, gone meanwhile) is left alone.
pub fn sweep(parent: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let staging = name.starts_with(STAGING);
        if !name.starts_with(PREFIX) && !staging {
            continue;
        }
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir = entry.path();
        // A staging folder gets its lock file a moment before the lock itself: judged by its
        // lock, a live one could be taken in that moment. Staging lasts microseconds, so only
        // one left by a process killed while naming its folder is old, and goes by age.
        let lock = if staging {
            Err(std::io::ErrorKind::NotFound.into())
        } else {
            OpenOptions::new().write(true).open(dir.join(LOCK))
        };
        let dead = match lock {
            // Held while the lock is taken here, so no other sweeper removes it meanwhile
            // and its owner, were it alive, could not have held it.
            Ok(lock) => match lock.try_lock() {
                Ok(()) => remove(&dir),
                Err(_) => false,
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .is_some_and(|age| age >= UNLOCKED_AGE);
                old && remove(&dir)
            }
            Err(_) => false,
        };
        removed += usize::from(dead);
    }
    removed
}

fn remove(dir: &Path) -> bool {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(folder = %dir.display(), error = %e,
                "could not remove a dead run's scratch folder");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(parent: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(parent)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn age(dir: &Path, by: Duration) {
        let f = File::open(dir).unwrap();
        f.set_modified(SystemTime::now() - by).unwrap();
    }

    #[test]
    fn a_live_folder_is_kept_and_dead_ones_are_removed() {
        let parent = tempfile::tempdir().unwrap();
        let live = Scratch::create(parent.path()).unwrap();
        std::fs::write(live.path().join("events.parquet"), b"x").unwrap();
        // A run that died: its lock file is there, and nobody holds it.
        let dead = parent.path().join("tessera-dead01");
        std::fs::create_dir_all(dead.join("events")).unwrap();
        std::fs::write(dead.join(LOCK), b"").unwrap();
        std::fs::write(dead.join("events/part-0.parquet"), vec![0u8; 1000]).unwrap();
        // Folders without a lock: an old one goes, a fresh one (maybe being made) stays.
        let old = parent.path().join("tessera-old001");
        std::fs::create_dir_all(&old).unwrap();
        age(&old, UNLOCKED_AGE + Duration::from_secs(60));
        let fresh = parent.path().join("tessera-fresh1");
        std::fs::create_dir_all(&fresh).unwrap();
        // A staging folder is judged by age alone: its lock file can exist unlocked for a
        // moment while its process is alive. An old one goes.
        let staging = parent.path().join(".tessera-new-abc123");
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::write(staging.join(LOCK), b"").unwrap();
        let old_staging = parent.path().join(".tessera-new-old123");
        std::fs::create_dir_all(&old_staging).unwrap();
        std::fs::write(old_staging.join(LOCK), b"").unwrap();
        age(&old_staging, UNLOCKED_AGE + Duration::from_secs(60));
        // Not ours at all, however old.
        let other = parent.path().join("other-tool");
        std::fs::create_dir_all(&other).unwrap();
        age(&other, UNLOCKED_AGE * 2);

        assert_eq!(sweep(parent.path()), 3);
        let live_name = live
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        let mut expected = vec![
            ".tessera-new-abc123".to_string(),
            "other-tool".to_string(),
            "tessera-fresh1".to_string(),
            live_name,
        ];
        expected.sort();
        assert_eq!(names(parent.path()), expected);
        assert!(live.path().join("events.parquet").exists());

        // A second run beside it keeps the live folder; dropping removes each one's own.
        let second = Scratch::create(parent.path()).unwrap();
        assert!(live.path().exists() && second.path().exists());
        let first_path = live.path().to_path_buf();
        drop(live);
        assert!(!first_path.exists());
        assert!(second.path().exists());
    }
}
