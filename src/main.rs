//! The `apilb` command: parses the command line, sets up logging and signals,
//! and calls the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use apilb::config::{self, ConfigError};
use apilb::handover::{self, Startup};
use clap::{Parser, Subcommand, ValueEnum};

/// mimalloc: per-thread free lists instead of glibc's arenas (the L7 path
/// allocates per request; see docs/performance.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

const DEFAULT_CONFIG: &str = "/etc/apilb/apilb.yaml";

/// A load balancer for highly available Kubernetes control planes.
///
/// apilb runs on each control-plane node, spreads kubectl, kubelet and
/// controller connections over the active/active kube-apiservers, drops a
/// server the moment its /readyz fails, reloads its YAML config in place and
/// is scraped by Prometheus.
#[derive(Parser)]
#[command(name = "apilb", version, about, long_about)]
struct Cli {
    /// Log format: text for people, json for log shippers.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Log filter (error, warn, info, debug, or a tracing directive such as
    /// `apilb=debug`); RUST_LOG overrides it. Closed connections log at debug.
    #[arg(long, default_value = "info", global = true)]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: listen on every frontend, probe backends, serve admin.
    /// SIGHUP reloads the config; SIGTERM/SIGINT stop accepting and drain open
    /// connections for up to shutdown_grace, then exit 0; SIGUSR2 starts the
    /// binary on disk again, hands it every listening socket, and drains once
    /// it serves (a failed start changes nothing).
    Run {
        /// The YAML config file.
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Do not watch the config file; reload only on SIGHUP.
        #[arg(long)]
        no_watch: bool,
    },
    /// Validate a config file: prints "ok: N frontends, M pools, K servers" and
    /// exits 0, or prints every error with its field path and exits 78.
    Check {
        /// The YAML config file.
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Remove the VIP of the config's `vip` section from its interface if it is
    /// there (systemd's ExecStopPost, so a crash does not leave it behind).
    VipDown {
        /// The YAML config file.
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Start three local fake kube-apiservers behind apilb on 127.0.0.1 and
    /// print curl and kubectl commands to try; needs no file and no root.
    /// Ctrl-C stops it.
    Demo,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat, level: &str) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => tracing_subscriber::EnvFilter::new(v),
        _ => tracing_subscriber::EnvFilter::try_new(level)
            .with_context(|| format!("invalid --log-level {level:?}"))?,
    };
    // Colour only for a person at a terminal: never in files, pipes or
    // journald, and never when NO_COLOR is set to anything (no-color.org).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
    Ok(())
}

fn print_config_errors(path: &Path, e: &ConfigError) {
    for fe in &e.errors {
        eprintln!("error: {fe}");
    }
    eprintln!(
        "{}: {} error(s); nothing was started",
        path.display(),
        e.errors.len()
    );
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(cli.log_format, &cli.log_level) {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    let r = match cli.command {
        Command::Check { config } => return check(&config),
        Command::Run { config, no_watch } => run(&config, !no_watch),
        Command::Demo => demo(),
        Command::VipDown { config } => vip_down(&config),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn vip_down(path: &Path) -> anyhow::Result<ExitCode> {
    let cfg = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            print_config_errors(path, &e);
            return Ok(ExitCode::from(apilb::EXIT_CONFIG as u8));
        }
    };
    let Some(v) = cfg.vip else {
        println!("no vip section: nothing to remove");
        return Ok(ExitCode::SUCCESS);
    };
    let removed = apilb::vip::remove_address(&v)?;
    println!(
        "{} {} {}",
        v.cidr(),
        if removed {
            "removed from"
        } else {
            "was not on"
        },
        v.interface
    );
    Ok(ExitCode::SUCCESS)
}

fn check(path: &Path) -> ExitCode {
    match config::load(path) {
        Ok(cfg) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            for w in cfg.expiry_warnings(now) {
                eprintln!("warning: {w}");
            }
            println!("{}", cfg.summary());
            ExitCode::SUCCESS
        }
        Err(e) => {
            print_config_errors(path, &e);
            ExitCode::from(apilb::EXIT_CONFIG as u8)
        }
    }
}

/// Tasks the runtime polls between two looks for I/O (tokio's default: 61).
/// Under L7 load hundreds of stream and connection tasks are ready at once;
/// at 61, bytes that arrived wait behind up to 61 polls, and each turn of a
/// client flush's gather (`proxy::coalesce`) lasts as long. At 3, apilb's
/// p99 in a closed loop of 16 connections × 32 streams fell by a fifth for
/// about 3 % of its req/s, and L4 at c=64 did not move (docs/performance.md, round 19).
const EVENT_INTERVAL: u32 = 3;

fn runtime(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = if workers == Some(1) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if let Some(w) = workers.filter(|w| *w > 1) {
        b.worker_threads(w);
    }
    b.event_interval(EVENT_INTERVAL)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run(path: &Path, watch_config: bool) -> anyhow::Result<ExitCode> {
    // Before any thread starts: it reads and unsets LISTEN_FDS and the
    // re-exec variables and adopts the sockets they name.
    let Startup {
        process,
        inherited,
        mut readiness,
    } = Startup::from_env();
    let vip_inherit_lease = handover::take_vip_lease();
    let cfg = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            print_config_errors(path, &e);
            readiness.failed(&e.errors.iter().map(|f| f.to_string()).collect::<Vec<_>>());
            return Ok(ExitCode::from(apilb::EXIT_CONFIG as u8));
        }
    };
    let rt = match runtime(cfg.workers) {
        Ok(rt) => rt,
        Err(e) => {
            readiness.failed(&[format!("{e:#}")]);
            return Err(e);
        }
    };
    rt.block_on(async move {
        let signals = Signals::new()?;
        info!(
            version = env!("CARGO_PKG_VERSION"),
            config = %path.display(),
            pid = std::process::id(),
            generation = process.generation,
            inherited_sockets = inherited.len(),
            "apilb starting"
        );
        let options = apilb::Options {
            watch_config,
            process,
            inherited: Arc::new(inherited),
            vip_inherit_lease,
        };
        let handle = match apilb::start_with(cfg, options).await {
            Ok(h) => h,
            Err(e) => {
                readiness.failed(&e.lines());
                return Err(anyhow::Error::new(e).context("cannot start"));
            }
        };
        readiness.ready();
        handover::notify(&format!(
            "READY=1\nMAINPID={}\nSTATUS=serving",
            std::process::id()
        ));
        let task = tokio::spawn(signals.handle(handle.reloader(), handle.shared().clone()));
        handle.wait().await;
        task.abort();
        Ok(ExitCode::SUCCESS)
    })
}

/// The daemon's signal handlers, installed before it starts serving.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
            usr2: signal(SignalKind::user_defined2()).context("SIGUSR2 handler")?,
        })
    }

    /// SIGHUP reloads; SIGUSR2 re-executes (one at a time); the first
    /// SIGTERM/SIGINT drains, the second closes every connection.
    async fn handle(
        mut self,
        reloader: apilb::runtime::Reloader,
        shared: Arc<apilb::snapshot::Shared>,
    ) {
        let mut stopping = false;
        let reexec_busy = Arc::new(AtomicBool::new(false));
        loop {
            tokio::select! {
                _ = self.hup.recv() => {
                    info!("SIGHUP: reloading config");
                    reloader.reload().await;
                }
                _ = self.usr2.recv() => {
                    if shared.shutdown.is_cancelled() {
                        info!("SIGUSR2 ignored: this process is draining (stopping, or handed over)");
                        continue;
                    }
                    if reexec_busy.swap(true, Ordering::AcqRel) {
                        info!("SIGUSR2 ignored: a re-exec is already in progress");
                        continue;
                    }
                    info!("SIGUSR2: re-executing");
                    let (reloader, busy) = (reloader.clone(), reexec_busy.clone());
                    tokio::spawn(async move {
                        // The control task logs and counts the outcome.
                        let _ = reloader.reexec().await;
                        busy.store(false, Ordering::Release);
                    });
                }
                _ = self.term.recv() => Self::stop(&shared, &mut stopping),
                _ = self.int.recv() => Self::stop(&shared, &mut stopping),
            }
        }
    }

    fn stop(shared: &apilb::snapshot::Shared, stopping: &mut bool) {
        if *stopping {
            info!("second stop signal: closing every connection now");
            shared.hard_stop.cancel();
        } else {
            info!("stop signal: draining");
            *stopping = true;
            shared.shutdown.cancel();
        }
    }
}

fn demo() -> anyhow::Result<ExitCode> {
    let rt = runtime(None)?;
    rt.block_on(async {
        let stop = async {
            let mut term = match signal(SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        apilb::demo::run(stop).await.context("demo failed")?;
        Ok(ExitCode::SUCCESS)
    })
}
