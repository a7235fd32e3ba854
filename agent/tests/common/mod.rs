//! Helpers shared by the `fnode` integration tests: example function images built once per
//! test binary with `fnode build`.
#![allow(dead_code)] // each test binary uses a different part

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, OnceLock},
};

/// The test binary's scratch folder.
pub fn tmp() -> &'static Path {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
}

/// `functions/<name>` built into an image with `fnode build`, once per test binary run.
pub fn function_image(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    // One build at a time: they share cargo's target dir.
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let out = tmp().join("function-images").join(format!("{name}.elf"));
    if built.contains(name) {
        return out;
    }
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../functions")
        .join(name);
    let result = Command::new(env!("CARGO_BIN_EXE_fnode"))
        // A target dir of the tests' own: the outer cargo may hold the workspace's lock.
        .env("CARGO_TARGET_DIR", tmp().join("fnode-build"))
        .arg("build")
        .arg(&crate_dir)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "fnode build {name} failed:\n{}",
        String::from_utf8_lossy(&result.stderr)
    );
    built.insert(name.to_owned());
    out
}
