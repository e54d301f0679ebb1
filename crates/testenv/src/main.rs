//! `testenv`: run the test control plane by hand, e.g. for the demo.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use testenv::{Binaries, CrdSource, Options, Startup, StateDir};

/// Runs a real Kubernetes control plane (etcd, kube-apiserver,
/// kube-controller-manager) on loopback ports, with Fleet's CRDs installed.
#[derive(Debug, Parser)]
#[command(name = "testenv", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a control plane that keeps running until `testenv down`, and
    /// return once it is ready. Does nothing if one is already running.
    Up {
        /// Where to write the admin kubeconfig [default: <state-dir>/kubeconfig].
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Directory for the control plane's state and logs
        /// [default: $XDG_STATE_HOME/fleet-handshake/testenv].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Stay in the foreground (logs to stderr) until Ctrl-C or SIGTERM.
        #[arg(long)]
        foreground: bool,
        /// Additional CRD manifest file to install (repeatable). The
        /// project's deploy/crd.yaml is installed when present.
        #[arg(long = "crd", value_name = "FILE")]
        crds: Vec<PathBuf>,
        /// Seconds to wait for readiness, not counting a binary build.
        #[arg(long, default_value_t = 180)]
        timeout: u64,
    },
    /// Stop the control plane started by `testenv up` and remove its data.
    Down {
        /// State directory given to `testenv up`.
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Build the control-plane binaries if needed and print their directory.
    Build,
    /// Print the path of Fleet's CRD file.
    Crds,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `up` forks before anything else starts threads (logging, runtimes):
    // forking a multi-threaded process is unsound.
    let result = match cli.command {
        Command::Up {
            kubeconfig,
            state_dir,
            foreground,
            crds,
            timeout,
        } => up(
            state_dir,
            kubeconfig,
            crds,
            Duration::from_secs(timeout),
            foreground,
        ),
        Command::Down { state_dir } => {
            init_logging();
            down(state_dir)
        }
        Command::Build => {
            init_logging();
            Binaries::locate_or_build().map(|binaries| println!("{}", binaries.dir().display()))
        }
        Command::Crds => testenv::fleet_crd_file().map(|path| println!("{}", path.display())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("testenv: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    use std::io::IsTerminal;
    // The client logs every failed request as an error, which during
    // readiness polling is expected noise; failures that matter surface in
    // this program's own error messages.
    let default_filter = "info,kube_client::client::builder=off";
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn state_dir(explicit: Option<PathBuf>) -> Result<StateDir> {
    match explicit {
        Some(dir) => Ok(StateDir::new(absolute(&dir)?)),
        None => StateDir::default_location(),
    }
}

/// Paths are recorded for a process with another working directory later.
fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}

fn up(
    state_dir_arg: Option<PathBuf>,
    kubeconfig: Option<PathBuf>,
    crds: Vec<PathBuf>,
    timeout: Duration,
    foreground: bool,
) -> Result<()> {
    let state = state_dir(state_dir_arg)?;
    if let Some(pid) = state.running_pid()? {
        if let Startup::Ready(kubeconfig) = state.startup() {
            println!("already running (supervisor pid {pid})");
            print_usage(&state, &kubeconfig);
            return Ok(());
        }
        bail!(
            "a control plane (supervisor pid {pid}) is starting in {}",
            state.path().display()
        );
    }
    state.clean()?;

    let kubeconfig = absolute(&kubeconfig.unwrap_or_else(|| state.default_kubeconfig()))?;
    let mut options = Options {
        kubeconfig_path: Some(kubeconfig.clone()),
        startup_timeout: timeout,
        ..Options::default()
    };
    for crd in &crds {
        options = options.with_crd(CrdSource::File(absolute(crd)?));
    }

    if foreground {
        init_logging();
        return supervise(&state, options, || print_usage(&state, &kubeconfig));
    }

    std::fs::create_dir_all(state.path())
        .with_context(|| format!("creating {}", state.path().display()))?;
    let log_path = state.log_path();
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;

    // SAFETY: no other thread exists yet (see main), so the child may run
    // arbitrary code after fork.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()).context("fork"),
        0 => {
            let code = match detach(&log).and_then(|()| {
                init_logging();
                supervise(&state, options, || {})
            }) {
                Ok(()) => 0,
                Err(err) => {
                    eprintln!("testenv: {err:#}");
                    1
                }
            };
            std::process::exit(code);
        }
        child => wait_ready(&state, child, &log_path, &kubeconfig),
    }
}

/// Makes the forked supervisor independent of the terminal: own session (no
/// SIGHUP or Ctrl-C from the shell), stdin from /dev/null, output to `log`.
fn detach(log: &std::fs::File) -> Result<()> {
    let null = std::fs::File::open("/dev/null")?;
    // SAFETY: setsid and dup2 on descriptors this process owns.
    unsafe {
        if libc::setsid() < 0
            || libc::dup2(null.as_raw_fd(), 0) < 0
            || libc::dup2(log.as_raw_fd(), 1) < 0
            || libc::dup2(log.as_raw_fd(), 2) < 0
        {
            return Err(std::io::Error::last_os_error()).context("detaching the supervisor");
        }
    }
    Ok(())
}

fn supervise(state: &StateDir, options: Options, on_ready: impl FnOnce()) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let supervised = state.supervise(options);
        tokio::pin!(supervised);
        // Report readiness while the supervisor keeps running.
        let mut on_ready = Some(on_ready);
        loop {
            tokio::select! {
                result = &mut supervised => return result,
                _ = tokio::time::sleep(Duration::from_millis(200)), if on_ready.is_some() => {
                    if matches!(state.startup(), Startup::Ready(_))
                        && let Some(report) = on_ready.take()
                    {
                        report();
                    }
                }
            }
        }
    })
}

/// Waits until the forked supervisor reports readiness or dies.
fn wait_ready(state: &StateDir, child: libc::pid_t, log: &Path, kubeconfig: &Path) -> Result<()> {
    eprintln!(
        "starting the control plane (log: {}; a first run builds the binaries, \
         which can take about 8 minutes)",
        log.display()
    );
    loop {
        match state.startup() {
            Startup::Ready(_) => {
                print_usage(state, kubeconfig);
                return Ok(());
            }
            Startup::Failed(error) => bail!("startup failed:\n{error}"),
            Startup::Pending => {}
        }
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        if unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) } == child {
            let log_text = std::fs::read_to_string(log).unwrap_or_default();
            bail!("the supervisor exited before the control plane was ready:\n{log_text}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn print_usage(state: &StateDir, kubeconfig: &Path) {
    let state_arg = state.path().display();
    println!(
        "control plane ready\n\
         kubeconfig: {kubeconfig}\n\
         \n\
         use it:             export KUBECONFIG={kubeconfig}\n\
         reuse it in tests:  export FLEET_HANDSHAKE_TEST_KUBECONFIG={kubeconfig}\n\
         logs:               {run}\n\
         stop it:            cargo run -p testenv -- down --state-dir {state_arg}",
        kubeconfig = kubeconfig.display(),
        run = state.run_dir().display(),
    );
}

fn down(state_dir_arg: Option<PathBuf>) -> Result<()> {
    let state = state_dir(state_dir_arg)?;
    if state.stop(Duration::from_secs(30))? {
        println!("control plane stopped; unset FLEET_HANDSHAKE_TEST_KUBECONFIG if you exported it");
    } else {
        println!("no control plane was running in {}", state.path().display());
    }
    Ok(())
}
