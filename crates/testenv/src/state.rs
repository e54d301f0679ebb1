//! A control plane that outlives the command that started it, tracked in a
//! state directory (what `testenv up` and `testenv down` use).
//!
//! One supervisor process owns the control plane; it holds
//! `supervisor.lock` for its whole life, which makes "is it running?" a
//! question the kernel answers correctly even after a crash (a pid file alone
//! can point at a recycled pid).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::control_plane::{ControlPlane, Options};
use crate::fsutil::{self, FileLock};

/// Files of a supervised control plane:
///
/// - `supervisor.lock`, `supervisor.pid`: the supervisor's liveness and pid;
/// - `ready`: written once the control plane is ready, holds the kubeconfig path;
/// - `failed`: written if startup failed, holds the error;
/// - `run/`: data, certificates and component logs;
/// - `kubeconfig`: the admin kubeconfig unless another path was chosen.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

/// Progress of a supervisor's startup, see [`StateDir::startup`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    /// Still starting (or building binaries).
    Pending,
    /// Ready; the admin kubeconfig is at this path.
    Ready(PathBuf),
    /// Startup failed with this error.
    Failed(String),
}

impl StateDir {
    /// A state directory at `dir` (created when a supervisor starts).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// `$XDG_STATE_HOME/fleet-handshake/testenv` (default `~/.local/state/…`).
    pub fn default_location() -> Result<Self> {
        Ok(Self::new(fsutil::default_state_dir()?))
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Where the control plane keeps data, certificates and component logs.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// Default location of the admin kubeconfig.
    pub fn default_kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// Suggested log file for the supervisor's own output.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("supervisor.log")
    }

    fn lock_path(&self) -> PathBuf {
        self.dir.join("supervisor.lock")
    }

    fn pid_path(&self) -> PathBuf {
        self.dir.join("supervisor.pid")
    }

    fn ready_path(&self) -> PathBuf {
        self.dir.join("ready")
    }

    fn failed_path(&self) -> PathBuf {
        self.dir.join("failed")
    }

    /// Pid of the live supervisor, or `None` if none is running.
    pub fn running_pid(&self) -> Result<Option<i32>> {
        if !self.lock_path().exists() {
            return Ok(None);
        }
        if FileLock::try_acquire(&self.lock_path())?.is_some() {
            return Ok(None);
        }
        let pid = std::fs::read_to_string(self.pid_path())
            .ok()
            .and_then(|text| text.trim().parse().ok());
        match pid {
            Some(pid) => Ok(Some(pid)),
            // Locked but no pid yet: a supervisor is just starting.
            None => bail!(
                "a supervisor holds {} but has not written its pid yet",
                self.lock_path().display()
            ),
        }
    }

    /// Startup progress of the current supervisor.
    pub fn startup(&self) -> Startup {
        if let Ok(text) = std::fs::read_to_string(self.failed_path()) {
            return Startup::Failed(text);
        }
        match std::fs::read_to_string(self.ready_path()) {
            Ok(text) if !text.trim().is_empty() => Startup::Ready(PathBuf::from(text.trim())),
            _ => Startup::Pending,
        }
    }

    /// Becomes the supervisor: starts a control plane with `options` (its
    /// run directory forced to [`StateDir::run_dir`]), reports readiness
    /// through the state directory, and keeps it running until SIGTERM or
    /// SIGINT. Fails at once if another supervisor owns this directory.
    pub async fn supervise(&self, mut options: Options) -> Result<()> {
        use tokio::signal::unix::{SignalKind, signal};

        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let Some(_lock) = FileLock::try_acquire(&self.lock_path())? else {
            bail!(
                "a control plane is already supervised in {}",
                self.dir.display()
            );
        };
        for stale in [self.ready_path(), self.failed_path()] {
            remove_if_exists(&stale)?;
        }
        std::fs::write(self.pid_path(), std::process::id().to_string())?;

        // Installed before starting so a `down` during startup is not lost.
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;

        options.run_dir = Some(self.run_dir());
        let kubeconfig = options
            .kubeconfig_path
            .get_or_insert_with(|| self.default_kubeconfig())
            .clone();
        let started = tokio::select! {
            started = ControlPlane::start(options) => started,
            _ = terminate.recv() => Err(anyhow::anyhow!("stopped by SIGTERM during startup")),
            _ = interrupt.recv() => Err(anyhow::anyhow!("stopped by SIGINT during startup")),
        };
        let control_plane = match started {
            Ok(control_plane) => control_plane,
            Err(err) => {
                std::fs::write(self.failed_path(), format!("{err:#}\n"))?;
                remove_if_exists(&self.pid_path())?;
                return Err(err);
            }
        };
        std::fs::write(self.ready_path(), kubeconfig.display().to_string())?;
        tracing::info!(
            server = control_plane.server_url(),
            kubeconfig = %kubeconfig.display(),
            "supervising the control plane until SIGTERM"
        );

        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::info!("stopping the control plane");
        control_plane.stop()?;
        self.remove_files()
    }

    /// Stops the supervisor (SIGTERM, then SIGKILL after `timeout`; its
    /// components die with it) and removes the run directory. Returns whether
    /// one was running.
    pub fn stop(&self, timeout: Duration) -> Result<bool> {
        let Some(pid) = self.running_pid()? else {
            self.remove_files()?;
            return Ok(false);
        };
        send_signal(pid, libc::SIGTERM)?;
        if !self.wait_stopped(timeout)? {
            tracing::warn!(pid, "supervisor ignored SIGTERM; killing it");
            send_signal(pid, libc::SIGKILL)?;
            if !self.wait_stopped(Duration::from_secs(10))? {
                bail!("supervisor {pid} survived SIGKILL");
            }
        }
        self.remove_files()?;
        // The default kubeconfig points at a server that is gone now; one
        // written to a path the user chose is theirs to remove.
        remove_if_exists(&self.default_kubeconfig())?;
        Ok(true)
    }

    fn wait_stopped(&self, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if FileLock::try_acquire(&self.lock_path())?.is_some() {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Removes what a stopped supervisor left behind (run directory,
    /// readiness and failure notes), so a new start cannot be mistaken for the
    /// previous one. Refuses while a supervisor runs.
    pub fn clean(&self) -> Result<()> {
        if let Some(pid) = self.running_pid()? {
            bail!("supervisor {pid} is still running");
        }
        self.remove_files()
    }

    fn remove_files(&self) -> Result<()> {
        for file in [self.ready_path(), self.failed_path(), self.pid_path()] {
            remove_if_exists(&file)?;
        }
        match std::fs::remove_dir_all(self.run_dir()) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                Err(err).with_context(|| format!("removing {}", self.run_dir().display()))
            }
            _ => Ok(()),
        }
    }
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

fn send_signal(pid: i32, signal: libc::c_int) -> Result<()> {
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid, signal) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ESRCH) {
            return Err(err).with_context(|| format!("signalling supervisor {pid}"));
        }
    }
    Ok(())
}
