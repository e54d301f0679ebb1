//! Finding or building the control-plane executables.
//!
//! The executables are built from the repository's `testenv/` Go module, which
//! pins the Kubernetes and etcd releases. Builds land in a per-user cache
//! keyed by a hash of that module, so every clone and worktree with the same
//! pins shares one build, and changing a pin triggers a rebuild.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::fsutil::{self, FileLock};

/// Environment variable naming a directory that already holds `etcd`,
/// `kube-apiserver` and `kube-controller-manager`; skips the cache and Go.
pub const BIN_DIR_ENV: &str = "FLEET_HANDSHAKE_CONTROLPLANE_BIN";

/// Go packages built into the cache, relative to the Go module.
const GO_PACKAGES: &[&str] = &[
    "k8s.io/kubernetes/cmd/kube-apiserver",
    "k8s.io/kubernetes/cmd/kube-controller-manager",
    "./cmd/etcd",
];

/// Flags passed to `go build`; part of the cache key so changing them
/// invalidates old builds. Stripped, path-independent binaries keep the cache
/// small and identical across clones.
const GO_BUILD_FLAGS: &[&str] = &[
    "-trimpath",
    // The version stamp Kubernetes' own release build sets: without it the
    // apiserver reports v0.0.0-master+$Format:%H$, which clients such as
    // kubectl cannot parse. It must match the k8s.io/kubernetes pin in
    // testenv/go.mod.
    "-ldflags=-s -w \
     -X k8s.io/component-base/version.gitVersion=v1.36.3 \
     -X k8s.io/component-base/version.gitMajor=1 \
     -X k8s.io/component-base/version.gitMinor=36 \
     -X k8s.io/component-base/version.gitTreeState=clean",
];

/// Executable names, as `go build` names them after their package directory.
const EXECUTABLES: [&str; 3] = ["etcd", "kube-apiserver", "kube-controller-manager"];

/// The repository's Go module that pins the control-plane versions.
pub fn go_module_dir() -> PathBuf {
    crate::repository_root().join("testenv")
}

/// A directory holding the three control-plane executables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    /// Uses `dir` as is, after checking that all three executables exist.
    pub fn from_dir(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        let missing: Vec<&str> = EXECUTABLES
            .iter()
            .copied()
            .filter(|exe| !is_executable(&dir.join(exe)))
            .collect();
        if !missing.is_empty() {
            bail!(
                "{} lacks executable(s) {}",
                dir.display(),
                missing.join(", ")
            );
        }
        Ok(Self { dir })
    }

    /// Returns the binaries named by `FLEET_HANDSHAKE_CONTROLPLANE_BIN`, or
    /// the cached build for the current pins, building it with `go` first if
    /// it is missing. Concurrent callers (several test binaries) wait for one
    /// build instead of racing.
    ///
    /// Blocks for the whole build (about 8 minutes on 2 cores with a cold Go
    /// build cache, under a minute on a warm one); call it from a blocking
    /// context.
    pub fn locate_or_build() -> Result<Self> {
        if let Some(dir) = std::env::var_os(BIN_DIR_ENV).filter(|v| !v.is_empty()) {
            return Self::from_dir(PathBuf::from(dir))
                .with_context(|| format!("{BIN_DIR_ENV} is set but unusable"));
        }
        let module = go_module_dir();
        let key = cache_key(&module)?;
        let root = cache_root()?;
        let dir = root.join(&key);
        if let Ok(found) = Self::from_dir(&dir) {
            return Ok(found);
        }

        fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let _lock = FileLock::acquire(&root.join(format!("{key}.lock")))?;
        // Another process may have finished the build while we waited.
        if let Ok(found) = Self::from_dir(&dir) {
            return Ok(found);
        }
        build(&module, &root, &key)?;
        Self::from_dir(&dir)
    }

    /// The directory holding the executables.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of `etcd`.
    pub fn etcd(&self) -> PathBuf {
        self.dir.join("etcd")
    }

    /// Path of `kube-apiserver`.
    pub fn kube_apiserver(&self) -> PathBuf {
        self.dir.join("kube-apiserver")
    }

    /// Path of `kube-controller-manager`.
    pub fn kube_controller_manager(&self) -> PathBuf {
        self.dir.join("kube-controller-manager")
    }
}

/// `$XDG_CACHE_HOME/fleet-handshake/controlplane` (default `~/.cache/…`):
/// outside the clone so `cargo clean` and fresh worktrees keep the build.
pub fn cache_root() -> Result<PathBuf> {
    Ok(fsutil::xdg_cache_home()?
        .join("fleet-handshake")
        .join("controlplane"))
}

/// Hash of everything that determines the build output: `go.mod`, `go.sum`,
/// every `.go` file of the module, the build flags and the target platform.
/// The Go toolchain version is left out on purpose: the pins decide what is
/// built, and rebuilding after every toolchain patch release would cost a
/// full build for nothing.
pub fn cache_key(module: &Path) -> Result<String> {
    let mut files = vec![module.join("go.mod"), module.join("go.sum")];
    collect_go_files(module, &mut files)?;
    files.sort();
    files.dedup();

    let mut hasher = Sha256::new();
    for file in &files {
        let rel = file.strip_prefix(module).unwrap_or(file);
        let contents =
            fs::read(file).with_context(|| format!("reading {} for cache key", file.display()))?;
        hasher.update(rel.to_string_lossy().as_bytes());
        hasher.update([0]);
        hasher.update((contents.len() as u64).to_le_bytes());
        hasher.update(&contents);
    }
    for part in GO_BUILD_FLAGS.iter().chain(GO_PACKAGES) {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    hasher.update(std::env::consts::OS.as_bytes());
    hasher.update(std::env::consts::ARCH.as_bytes());
    let digest = hasher.finalize();
    Ok(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
}

fn collect_go_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = fs::read_dir(dir).with_context(|| {
        format!(
            "reading {} (the Go module that pins the control plane)",
            dir.display()
        )
    })?;
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let file_type = entry.file_type()?;
        if file_type.is_dir() {
            collect_go_files(&path, out)?;
        } else if file_type.is_file() && path.extension().is_some_and(|ext| ext == "go") {
            out.push(path);
        }
    }
    Ok(())
}

/// Runs `go build` into a scratch directory next to the cache entry and
/// renames it into place, so readers never see a half-written build.
fn build(module: &Path, root: &Path, key: &str) -> Result<()> {
    let go_version = go_version(&format!(
        "to build etcd, kube-apiserver and kube-controller-manager from {} \
         (or set {BIN_DIR_ENV} to a directory holding the three)",
        module.display()
    ))?;
    let scratch = root.join(format!(".build-{key}-{}", std::process::id()));
    if scratch.exists() {
        fs::remove_dir_all(&scratch)
            .with_context(|| format!("removing stale {}", scratch.display()))?;
    }
    fs::create_dir_all(&scratch)?;
    let log_path = scratch.join("build.log");
    let log = fs::File::create(&log_path)?;

    notice(&format!(
        "building etcd, kube-apiserver and kube-controller-manager with {go_version} \
         into {} (about 8 minutes with a cold Go build cache; log: {})",
        root.join(key).display(),
        log_path.display()
    ));
    let started = Instant::now();
    let status = Command::new("go")
        .arg("build")
        .args(GO_BUILD_FLAGS)
        .arg("-o")
        // A trailing separator makes `go build` treat the target as a
        // directory for several packages.
        .arg(format!("{}/", scratch.display()))
        .args(GO_PACKAGES)
        .current_dir(module)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("running go build")?;
    if !status.success() {
        bail!(
            "go build of the control plane failed ({status}); log {}:\n{}",
            log_path.display(),
            fsutil::tail(&log_path, 40)
        );
    }
    Binaries::from_dir(&scratch).context("go build succeeded but produced incomplete output")?;
    fs::rename(&scratch, root.join(key))
        .with_context(|| format!("moving build into {}", root.join(key).display()))?;
    notice(&format!(
        "control-plane binaries built in {}s",
        started.elapsed().as_secs()
    ));
    Ok(())
}

/// Tells whoever watches that a long build is running. Writes to the stderr
/// handle directly because the test harness swallows `eprintln!` output of
/// passing tests, and a silent 20-minute test looks hung.
fn notice(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "testenv: {message}");
}

/// `go version` output, or an error that says how to get Go and why
/// (`purpose` completes "it is needed …").
pub(crate) fn go_version(purpose: &str) -> Result<String> {
    match Command::new("go")
        .arg("version")
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        }
        Ok(out) => bail!(
            "`go version` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(err) if err.kind() == ErrorKind::NotFound => bail!(
            "the Go toolchain (`go`) is not on PATH; it is needed {purpose}. \
             Install Go 1.21 or newer (it fetches the exact toolchain the module asks \
             for through the Go module proxy; Debian 12's golang-go is 1.19, too old)"
        ),
        Err(err) => Err(err).context("running `go version`"),
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_is_stable_and_sensitive_to_sources() {
        let dir = std::env::temp_dir().join(format!(
            "testenv-key-{}-{}",
            std::process::id(),
            crate::pki::random_suffix().unwrap()
        ));
        fs::create_dir_all(dir.join("cmd/etcd")).unwrap();
        fs::write(dir.join("go.mod"), "module x\n").unwrap();
        fs::write(dir.join("go.sum"), "").unwrap();
        fs::write(dir.join("cmd/etcd/main.go"), "package main\n").unwrap();
        fs::write(dir.join("README.md"), "not a build input\n").unwrap();

        let first = cache_key(&dir).unwrap();
        assert_eq!(first, cache_key(&dir).unwrap());
        fs::write(dir.join("README.md"), "changed\n").unwrap();
        assert_eq!(first, cache_key(&dir).unwrap());
        fs::write(dir.join("cmd/etcd/main.go"), "package main // changed\n").unwrap();
        assert_ne!(first, cache_key(&dir).unwrap());

        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn repository_module_is_found() {
        assert!(go_module_dir().join("go.mod").is_file());
        assert_eq!(cache_key(&go_module_dir()).unwrap().len(), 16);
    }
}
