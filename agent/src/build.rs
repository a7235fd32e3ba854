//! `fnode build CRATE_DIR`: compiles the guest kernel and a function crate for the guest
//! target and merges them into one bootable PVH image ([`crate::image`]).
//!
//! Both are built by cargo with `--message-format=json-render-diagnostics`: the compiler's
//! messages reach the terminal as it printed them (cargo's stderr is ours), and the JSON on
//! stdout names the executables. The kernel is built from the fnode source tree (found next to
//! this binary's sources, or at `FNODE_SRC`) with that tree's own configuration; the function
//! is built with `-C relocation-model=static` and the SDK's linker script.

use std::{
    ffi::OsString,
    fs,
    io::{self, BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::image::{self, ImageError, ImageInfo};

/// The target every guest crate builds for.
pub const GUEST_TARGET: &str = "x86_64-unknown-none";
/// The kernel's package and binary name in the fnode source tree.
const KERNEL_PACKAGE: &str = "fnode-guest-kernel";
/// The SDK's linker script, found through the link search path the SDK's build script sets.
const USER_LINKER_SCRIPT: &str = "fnode-user.ld";

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0} is not a Rust crate (it has no Cargo.toml): pass the folder of a function crate")]
    NotACrate(PathBuf),
    #[error("{0} is a workspace, not a crate: pass the folder of one function crate in it")]
    Workspace(PathBuf),
    #[error(
        "cannot find the fnode source tree at {0} (fnode build compiles the guest kernel from \
         it): set FNODE_SRC to the fnode repository"
    )]
    NoSource(PathBuf),
    #[error("cannot run cargo: install Rust with rustup (https://rustup.rs)")]
    Spawn(#[source] io::Error),
    #[error("cannot read cargo's output")]
    CargoOutput(#[source] io::Error),
    #[error(
        "building {what} failed ({status}): the compiler's messages are above (if cargo says \
         the target is missing: rustup target add {GUEST_TARGET})"
    )]
    CargoFailed { what: String, status: ExitStatus },
    #[error("cargo built the kernel but reported no {KERNEL_PACKAGE} executable")]
    NoKernel,
    #[error(
        "{0} has no binary target: a function is a `#![no_std]`, `#![no_main]` binary crate \
         (src/main.rs) that calls `fnode_guest::entry!(YourFunction)`"
    )]
    NoBinary(PathBuf),
    #[error("{crate_dir} has several binaries ({names}): choose one with --bin")]
    ManyBinaries { crate_dir: PathBuf, names: String },
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot make an image from {function}")]
    Image {
        function: PathBuf,
        source: ImageError,
    },
}

/// `fnode build` options.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// The function crate's folder (holding its Cargo.toml).
    pub crate_dir: PathBuf,
    /// Where to write the image (default: `<cargo target dir>/fnode/<name>.elf`).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Build the function with the release profile (the default).
    #[arg(long, conflicts_with = "debug")]
    pub release: bool,
    /// Build the function with the dev profile (debug assertions on). The kernel is always
    /// built optimised.
    #[arg(long)]
    pub debug: bool,
    /// The binary target to build, if the crate has several.
    #[arg(long)]
    pub bin: Option<String>,
}

/// What a build made.
#[derive(Debug)]
pub struct Built {
    /// The image written.
    pub image: PathBuf,
    /// The function's binary name.
    pub name: String,
    /// The image's layout.
    pub info: ImageInfo,
    /// Time spent in cargo for the kernel, in cargo for the function, and merging.
    pub timings: [Duration; 3],
}

/// The fnode source tree: `FNODE_SRC`, or the tree this binary was built from.
pub fn source_tree() -> Result<PathBuf, BuildError> {
    let src = std::env::var_os("FNODE_SRC")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    if !src.join("guest-kernel").join("Cargo.toml").is_file() {
        return Err(BuildError::NoSource(src));
    }
    Ok(src.canonicalize().unwrap_or(src))
}

/// An executable cargo reported.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Artifact {
    manifest_path: PathBuf,
    name: String,
    executable: PathBuf,
}

/// Runs `cargo build` with `args` in `dir`, streaming its messages, and returns the
/// executables it reported.
fn cargo_build(
    what: &str,
    dir: &Path,
    args: &[&str],
    rustflags: Option<OsString>,
) -> Result<Vec<Artifact>, BuildError> {
    let cargo = std::env::var_os("FNODE_CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(dir)
        .arg("build")
        .args([
            "--target",
            GUEST_TARGET,
            "--message-format=json-render-diagnostics",
        ])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // Flags from the environment would override the source tree's own configuration (and
    // are meant for the host): the kernel gets none, the function exactly ours.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
    ] {
        cmd.env_remove(var);
    }
    if let Some(flags) = rustflags {
        cmd.env("CARGO_ENCODED_RUSTFLAGS", flags);
    }
    let mut child = cmd.spawn().map_err(BuildError::Spawn)?;
    let mut artifacts = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.map_err(BuildError::CargoOutput)?;
            match parse_artifact(&line) {
                Some(Ok(a)) => artifacts.push(a),
                Some(Err(())) => {}
                // Not a cargo message (a build script's print, say): show it.
                None => eprintln!("{line}"),
            }
        }
    }
    let status = child.wait().map_err(BuildError::CargoOutput)?;
    if !status.success() {
        return Err(BuildError::CargoFailed {
            what: what.to_owned(),
            status,
        });
    }
    Ok(artifacts)
}

/// One line of cargo's JSON output: `Some(Ok)` for an executable artifact, `Some(Err)` for
/// any other cargo message, `None` for a line that is not a cargo message.
fn parse_artifact(line: &str) -> Option<Result<Artifact, ()>> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let reason = v.get("reason")?.as_str()?;
    let artifact = (|| {
        if reason != "compiler-artifact" {
            return None;
        }
        Some(Artifact {
            manifest_path: v.get("manifest_path")?.as_str()?.into(),
            name: v.get("target")?.get("name")?.as_str()?.to_owned(),
            executable: v.get("executable")?.as_str()?.into(),
        })
    })();
    Some(artifact.ok_or(()))
}

/// Whether a manifest declares a package (a virtual workspace manifest does not).
fn has_package(manifest: &str) -> bool {
    manifest.lines().any(|l| l.trim() == "[package]")
}

/// The function's rustflags: static addresses and the SDK's linker script.
fn function_rustflags() -> OsString {
    [
        "-Crelocation-model=static",
        &format!("-Clink-arg=-T{USER_LINKER_SCRIPT}"),
    ]
    .join("\x1f")
    .into()
}

/// The default image path: `<target dir>/fnode/<name>.elf`, the target dir taken from the
/// executable's path (`<target dir>/<target>/<profile>/<name>`).
fn default_output(executable: &Path, crate_dir: &Path, name: &str) -> PathBuf {
    let target_dir = executable
        .parent()
        .and_then(Path::parent)
        .filter(|t| t.file_name().is_some_and(|n| n == GUEST_TARGET))
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| crate_dir.join("target"));
    target_dir.join("fnode").join(format!("{name}.elf"))
}

/// Builds the image for `args`.
pub fn build(args: &BuildArgs) -> Result<Built, BuildError> {
    let manifest = args.crate_dir.join("Cargo.toml");
    let manifest_text =
        fs::read_to_string(&manifest).map_err(|_| BuildError::NotACrate(args.crate_dir.clone()))?;
    if !has_package(&manifest_text) {
        return Err(BuildError::Workspace(args.crate_dir.clone()));
    }
    let crate_dir = args
        .crate_dir
        .canonicalize()
        .unwrap_or_else(|_| args.crate_dir.clone());
    let manifest = crate_dir.join("Cargo.toml");
    let src = source_tree()?;

    let t0 = Instant::now();
    let kernel = cargo_build(
        "the fnode guest kernel",
        &src,
        &["--release", "-p", KERNEL_PACKAGE, "--bin", KERNEL_PACKAGE],
        None,
    )?
    .into_iter()
    .find(|a| a.name == KERNEL_PACKAGE)
    .ok_or(BuildError::NoKernel)?;

    let t1 = Instant::now();
    let manifest_arg = manifest.to_string_lossy();
    let mut cargo_args = vec!["--manifest-path", &manifest_arg];
    if !args.debug {
        cargo_args.push("--release");
    }
    if let Some(bin) = &args.bin {
        cargo_args.extend(["--bin", bin]);
    }
    let what = format!("function crate {}", args.crate_dir.display());
    let artifacts = cargo_build(&what, &crate_dir, &cargo_args, Some(function_rustflags()))?;
    let mut bins: Vec<Artifact> = artifacts
        .into_iter()
        .filter(|a| {
            a.manifest_path == manifest
                || a.manifest_path.canonicalize().is_ok_and(|p| p == manifest)
        })
        .collect();
    bins.dedup();
    let function = match bins.len() {
        0 => return Err(BuildError::NoBinary(args.crate_dir.clone())),
        1 => bins.remove(0),
        _ => {
            let names = bins
                .iter()
                .map(|b| b.name.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(BuildError::ManyBinaries {
                crate_dir: args.crate_dir.clone(),
                names,
            });
        }
    };

    let t2 = Instant::now();
    let read = |path: &Path| {
        fs::read(path).map_err(|source| BuildError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let (image, info) = image::merge(&read(&kernel.executable)?, &read(&function.executable)?)
        .map_err(|source| BuildError::Image {
            function: function.executable.clone(),
            source,
        })?;
    let out = args
        .output
        .clone()
        .unwrap_or_else(|| default_output(&function.executable, &crate_dir, &function.name));
    write_atomically(&out, &image)?;
    let t3 = Instant::now();

    Ok(Built {
        image: out,
        name: function.name,
        info,
        timings: [t1 - t0, t2 - t1, t3 - t2],
    })
}

/// Writes `bytes` to `path` through a temporary file, so a reader never sees half an image.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    let err = |source| BuildError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(err)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    fs::write(&tmp, bytes).map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

/// The `fnode build` command: builds, reports the layout on stderr and prints the image's
/// path as the last line of stdout.
pub fn run(args: BuildArgs) -> anyhow::Result<()> {
    let built = build(&args)?;
    let i = &built.info;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    eprintln!(
        "fnode build: {} in {:.0} ms (kernel {:.0} ms, function {:.0} ms, merge {:.1} ms)",
        built.name,
        ms(built.timings.iter().sum()),
        ms(built.timings[0]),
        ms(built.timings[1]),
        ms(built.timings[2]),
    );
    eprintln!(
        "  kernel   {:#010x}..{:#010x}  PVH entry {:#x}",
        i.kernel.start, i.kernel.end, i.pvh_entry
    );
    for s in &i.function_segments {
        let rwx = |bit, c| if s.flags & bit != 0 { c } else { '-' };
        eprintln!(
            "  function {:#010x}..{:#010x}  {}{}{}",
            s.vaddr,
            s.vaddr + s.memsz,
            rwx(4, 'r'),
            rwx(2, 'w'),
            rwx(1, 'x')
        );
    }
    eprintln!(
        "  entry {:#x}, image end {:#x}; needs at least {} MiB of guest memory",
        i.header.entry,
        i.header.image_end,
        i.min_memory >> 20
    );
    let path = built.image.canonicalize().unwrap_or(built.image);
    println!("{}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cargo_artifacts() {
        let line = r#"{"reason":"compiler-artifact","package_id":"x","manifest_path":"/f/echo/Cargo.toml","target":{"kind":["bin"],"name":"echo"},"executable":"/t/x86_64-unknown-none/release/echo","fresh":true}"#;
        assert_eq!(
            parse_artifact(line),
            Some(Ok(Artifact {
                manifest_path: "/f/echo/Cargo.toml".into(),
                name: "echo".into(),
                executable: "/t/x86_64-unknown-none/release/echo".into(),
            }))
        );
        let lib = r#"{"reason":"compiler-artifact","manifest_path":"/a","target":{"name":"a"},"executable":null}"#;
        assert_eq!(parse_artifact(lib), Some(Err(())));
        assert_eq!(
            parse_artifact(r#"{"reason":"build-finished","success":true}"#),
            Some(Err(()))
        );
        assert_eq!(parse_artifact("warning: plain text"), None);
    }

    #[test]
    fn default_output_is_in_the_target_dir() {
        let exe = Path::new("/w/target/x86_64-unknown-none/release/echo");
        assert_eq!(
            default_output(exe, Path::new("/w/echo"), "echo"),
            Path::new("/w/target/fnode/echo.elf")
        );
        let odd = Path::new("/elsewhere/echo");
        assert_eq!(
            default_output(odd, Path::new("/w/echo"), "echo"),
            Path::new("/w/echo/target/fnode/echo.elf")
        );
    }

    #[test]
    fn workspace_manifests_are_not_crates() {
        assert!(has_package("[package]\nname = \"echo\"\n"));
        assert!(!has_package("[workspace]\nmembers = [\"echo\"]\n"));
    }

    #[test]
    fn rejects_folders_without_a_crate() {
        let dir = std::env::temp_dir().join(format!("fnode-build-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let args = BuildArgs {
            crate_dir: dir.clone(),
            output: None,
            release: false,
            debug: false,
            bin: None,
        };
        match build(&args) {
            Err(BuildError::NotACrate(d)) => assert_eq!(d, dir),
            other => panic!("expected NotACrate, got {other:?}"),
        }
        fs::remove_dir(&dir).unwrap();
    }
}
