//! Child processes of the control plane.
//!
//! All children are spawned from one process-wide thread that never exits.
//! Each child asks the kernel (`PR_SET_PDEATHSIG`) to SIGKILL it when its
//! parent goes away, and Linux ties that to the *thread* that forked it: a
//! child forked from a test thread or a tokio worker would be killed as soon
//! as that thread ends, while one forked from the immortal spawner thread lives
//! exactly as long as the process — and dies with it even on SIGKILL or abort,
//! when no destructor runs.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::{Sender, channel};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};

use crate::fsutil;

type SpawnJob = (Command, Sender<std::io::Result<Child>>);

/// Spawns `command` from the process-wide spawner thread.
fn spawn_from_immortal_thread(mut command: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Sender<SpawnJob>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("testenv-spawner".into())
            .spawn(move || {
                // The sender lives in a static, so this loop runs until the
                // process exits.
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("starting the process spawner thread");
        tx
    });

    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe system calls (prctl, getppid, _exit).
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect; then no
            // signal will ever come, so leave now instead of leaking.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }

    let (reply_tx, reply_rx) = channel();
    spawner
        .send((command, reply_tx))
        .map_err(|_| std::io::Error::other("process spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| std::io::Error::other("process spawner thread is gone"))?
}

/// A running control-plane component whose output goes to a log file.
#[derive(Debug)]
pub(crate) struct ManagedProcess {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl ManagedProcess {
    /// Starts `program args…` with stdin closed and stdout/stderr appended to
    /// `log`.
    pub(crate) fn spawn(
        name: &'static str,
        program: &Path,
        args: &[String],
        log: PathBuf,
    ) -> Result<Self> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = spawn_from_immortal_thread(command)
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        tracing::debug!(name, pid = child.id(), log = %log.display(), "started");
        Ok(Self { name, child, log })
    }

    /// Component name, e.g. `etcd`.
    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    /// Path of the component's log file.
    pub(crate) fn log(&self) -> &Path {
        &self.log
    }

    /// Fails with the tail of the log if the process has exited.
    pub(crate) fn ensure_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(self.exited_error(status)),
            Err(err) => Err(anyhow!(err).context(format!("checking on {}", self.name))),
        }
    }

    fn exited_error(&self, status: ExitStatus) -> anyhow::Error {
        anyhow!(
            "{} exited unexpectedly ({status}); last lines of {}:\n{}",
            self.name,
            self.log.display(),
            fsutil::tail(&self.log, 30)
        )
    }

    /// SIGKILLs the process and reaps it. Nothing of a test control plane's
    /// state is worth a graceful shutdown, and SIGKILL cannot hang.
    pub(crate) fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Distinct loopback TCP ports that were free a moment ago. All listeners are
/// held until every port is picked, so the kernel cannot hand out one twice.
/// Another process can still grab a port before the component binds it;
/// startup is retried on bind errors.
pub(crate) fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<std::io::Result<Vec<_>>>()
        .context("finding free loopback ports")?;
    let mut ports = [0u16; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

/// Whether etcd's `/health` endpoint on `port` reports healthy. A raw
/// HTTP/1.0 exchange keeps this free of an HTTP client dependency.
pub(crate) fn etcd_healthy(port: u16) -> bool {
    let probe = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect_timeout(
            &(Ipv4Addr::LOCALHOST, port).into(),
            Duration::from_secs(1),
        )?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let status_ok =
            response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200");
        Ok(status_ok && response.contains("\"health\":\"true\""))
    };
    probe().unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports::<4>().unwrap();
        for (i, a) in ports.iter().enumerate() {
            assert!(ports[i + 1..].iter().all(|b| a != b), "{ports:?}");
        }
    }

    #[test]
    fn reports_early_exit_with_log_tail() {
        let dir = std::env::temp_dir().join(format!(
            "testenv-proc-{}-{}",
            std::process::id(),
            crate::pki::random_suffix().unwrap()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut process = ManagedProcess::spawn(
            "sh",
            Path::new("/bin/sh"),
            &["-c".into(), "echo boom-marker; exit 3".into()],
            dir.join("sh.log"),
        )
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let err = loop {
            if let Err(err) = process.ensure_running() {
                break err;
            }
            assert!(std::time::Instant::now() < deadline, "sh did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        let message = format!("{err:#}");
        assert!(message.contains("boom-marker"), "{message}");
        assert!(message.contains("exit status: 3"), "{message}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn kill_stops_a_running_child() {
        let dir = std::env::temp_dir().join(format!(
            "testenv-kill-{}-{}",
            std::process::id(),
            crate::pki::random_suffix().unwrap()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut process = ManagedProcess::spawn(
            "sleep",
            Path::new("/bin/sleep"),
            &["600".into()],
            dir.join("sleep.log"),
        )
        .unwrap();
        process.ensure_running().unwrap();
        process.kill();
        assert!(process.ensure_running().is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
