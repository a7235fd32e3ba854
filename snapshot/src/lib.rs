//! `fnode-snapshot`: the snapshot format (state file + sparse memory file) and restore.
//!
//! Not yet implemented: see the "Snapshots" work in the README's roadmap.
