//! The snapshot directory: where a snapshot's files are.
//!
//! ```text
//! DIR/state    the state file (state_file): vCPUs, VM, devices, and what describes `memory`
//! DIR/memory   the memory file (memory_file): guest memory, sparse
//! DIR/working-set  optional (working_set): the pages a restored VM touches first
//! ```
//! The state file records the format version, so there is no separate version file. Files
//! are written under a `.tmp` name and renamed into place, the memory file first: a state file
//! that is present always describes a complete memory file.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

/// Name of the state file in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// Name of the memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// Name of the (optional) working-set file in a snapshot directory.
pub const WORKING_SET_FILE: &str = "working-set";

/// A snapshot directory (which may not exist yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotDir {
    path: PathBuf,
}

impl SnapshotDir {
    /// The snapshot directory at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SnapshotDir { path: path.into() }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `DIR/state`.
    pub fn state_path(&self) -> PathBuf {
        self.path.join(STATE_FILE)
    }

    /// `DIR/memory`.
    pub fn memory_path(&self) -> PathBuf {
        self.path.join(MEMORY_FILE)
    }

    /// `DIR/working-set`.
    pub fn working_set_path(&self) -> PathBuf {
        self.path.join(WORKING_SET_FILE)
    }

    /// Creates the directory (and its parents) if it does not exist.
    pub fn create(&self) -> io::Result<()> {
        fs::create_dir_all(&self.path)
    }

    /// Syncs the directory itself, so the renames of its files are durable.
    pub fn sync(&self) -> io::Result<()> {
        File::open(&self.path)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    #[test]
    fn paths_and_creation() {
        let tmp = TempDir::new().unwrap();
        let dir = SnapshotDir::new(tmp.as_path().join("a/b"));
        assert_eq!(dir.state_path(), tmp.as_path().join("a/b/state"));
        assert_eq!(dir.memory_path(), tmp.as_path().join("a/b/memory"));
        dir.create().unwrap();
        dir.create().unwrap();
        dir.sync().unwrap();
        assert!(dir.path().is_dir());
    }
}
