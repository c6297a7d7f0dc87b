//! A process's local scratch folder, and the sweep that removes those of runs that died.
//!
//! An engine writes a copy of its resolved events (and DataFusion its spill files) under one
//! folder, `tessera-XXXXXX` in `run.spill_dir` or the system's temporary folder. An engine
//! that ends removes it; one killed with SIGKILL (OOM killer, a scheduler's timeout) cannot,
//! and at 100M events it leaves gigabytes. So `tessera run` sweeps such leftovers first.
//!
//! The sweep must never touch a folder that is not Tessera's, whatever its name or age, so
//! ownership is proved, never guessed: each scratch folder holds a marker file,
//! `.tessera-scratch`, naming the process that owns it and locked by that process for as long
//! as it lives (the kernel drops the lock when the process dies, however it dies). The marker
//! is created and locked under a temporary name and only then renamed into place, and the
//! folder gets its final name after that, so a marker never exists unlocked while its owner
//! lives. The sweep removes a folder only when it carries the marker and the marker's lock
//! can be taken. A folder without a marker is left alone, however it is named.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Names of scratch folders start with this.
const PREFIX: &str = "tessera-";
/// Names of scratch folders while they are being made, before they carry their marker.
const STAGING: &str = ".tessera-new-";
/// The marker file: its presence says the folder is Tessera's scratch, its lock that the
/// owner is alive.
const MARKER: &str = ".tessera-scratch";
/// The marker's name while it is being made and locked.
const MARKER_NEW: &str = ".tessera-scratch-new";

/// A scratch folder this process holds; removed when dropped.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
    _lock: File,
}

impl Scratch {
    /// Makes and locks a scratch folder in `parent` (sweeping is [`sweep`]'s, and only a run's).
    pub fn create(parent: &Path) -> Result<Scratch> {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        let staging = tempfile::Builder::new()
            .prefix(STAGING)
            .tempdir_in(parent)
            .map_err(|e| Error::io(parent, e))?
            .keep();
        let new_marker = staging.join(MARKER_NEW);
        let mut lock = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&new_marker)
            .map_err(|e| Error::io(&new_marker, e))?;
        lock.lock().map_err(|e| Error::io(&new_marker, e))?;
        let owner = format!(
            "{{\"owner\":\"tessera\",\"pid\":{},\"started_at\":\"{}\"}}\n",
            std::process::id(),
            chrono::Utc::now().to_rfc3339()
        );
        lock.write_all(owner.as_bytes())
            .map_err(|e| Error::io(&new_marker, e))?;
        let marker = staging.join(MARKER);
        std::fs::rename(&new_marker, &marker).map_err(|e| Error::io(&marker, e))?;
        let suffix = staging
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(STAGING))
            .ok_or_else(|| Error::Usage(format!("unexpected scratch name {}", staging.display())))?
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

/// Removes the scratch folders in `parent` whose owner is gone; returns how many.
///
/// Only folders named like scratch folders that carry the marker are considered, and of
/// those only the ones whose marker lock is free. One this process cannot inspect (no
/// permission, gone meanwhile) is left alone.
pub fn sweep(parent: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with(PREFIX) && !name.starts_with(STAGING) {
            continue;
        }
        // Not followed through a symbolic link: a link to another folder is not ours.
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir = entry.path();
        let Ok(marker) = OpenOptions::new().write(true).open(dir.join(MARKER)) else {
            continue;
        };
        // Held while the folder is removed, so no other sweeper races this one, and the
        // owner, were it alive, would hold it.
        if marker.try_lock().is_ok() && remove(&dir) {
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(folder = %parent.display(), removed,
            "removed the scratch folders of runs that did not finish");
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

    #[test]
    fn only_marked_folders_of_dead_owners_are_removed() {
        let parent = tempfile::tempdir().unwrap();
        let live = Scratch::create(parent.path()).unwrap();
        std::fs::write(live.path().join("events.parquet"), b"x").unwrap();
        // A run that died: its marker is there, and nobody holds its lock.
        let dead = parent.path().join("tessera-dead01");
        std::fs::create_dir_all(dead.join("events")).unwrap();
        std::fs::write(dead.join(MARKER), b"{}").unwrap();
        std::fs::write(dead.join("events/part-0.parquet"), vec![0u8; 1000]).unwrap();
        // A staging folder of a process killed after its marker was in place.
        let staging = parent.path().join(".tessera-new-abc123");
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::write(staging.join(MARKER), b"{}").unwrap();
        // Folders named like ours but without a marker are a user's or another tool's,
        // however old: an older Tessera's `.lock`, a notes folder, a marker still being made.
        let notes = parent.path().join("tessera-notes");
        std::fs::create_dir_all(&notes).unwrap();
        std::fs::write(notes.join("todo.txt"), b"keep me").unwrap();
        let old_style = parent.path().join("tessera-old001");
        std::fs::create_dir_all(&old_style).unwrap();
        std::fs::write(old_style.join(".lock"), b"").unwrap();
        let half_made = parent.path().join(".tessera-new-half01");
        std::fs::create_dir_all(&half_made).unwrap();
        std::fs::write(half_made.join(MARKER_NEW), b"").unwrap();
        // A marker file in a folder not named like ours.
        let other = parent.path().join("other-tool");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join(MARKER), b"{}").unwrap();

        assert_eq!(sweep(parent.path()), 2);
        let live_name = live
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        let mut expected = vec![
            ".tessera-new-half01".to_string(),
            "other-tool".to_string(),
            "tessera-notes".to_string(),
            "tessera-old001".to_string(),
            live_name,
        ];
        expected.sort();
        assert_eq!(names(parent.path()), expected);
        assert!(live.path().join("events.parquet").exists());
        assert_eq!(
            std::fs::read(notes.join("todo.txt")).unwrap(),
            b"keep me".to_vec()
        );
        let marker = std::fs::read_to_string(live.path().join(MARKER)).unwrap();
        assert!(
            marker.contains(&format!("\"pid\":{}", std::process::id())),
            "{marker}"
        );

        // A second engine beside it keeps the live folder; dropping removes each one's own.
        let second = Scratch::create(parent.path()).unwrap();
        assert_eq!(sweep(parent.path()), 0);
        assert!(live.path().exists() && second.path().exists());
        let first_path = live.path().to_path_buf();
        drop(live);
        assert!(!first_path.exists());
        assert!(second.path().exists());
    }
}
