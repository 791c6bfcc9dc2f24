//! The `destinations` server and its command line, as a library: a program of your own that is
//! the stock `destinations` (`serve`, `send`, `status`, `list`, `check`, `dlq`, `queue`,
//! `receive`) with destination kinds of your own added.
//!
//! ```no_run
//! # mod my_destination { pub const PLUGIN: destinations::DestinationPlugin = destinations::DestinationPlugin {
//! #     kind: "demo", describe: "", build: |_, _| unimplemented!() }; }
//! fn main() -> anyhow::Result<()> {
//!     destinations_server::Server::new()
//!         .register(my_destination::PLUGIN)
//!         .run()
//! }
//! ```
//!
//! [`Server::new`] has every kind linked into the program: the stock ones and any crate's
//! `register_destination!` — but a linker keeps a crate's link-time registration only if the
//! program uses something of that crate, so register yours explicitly as above.

mod api;
mod client;
mod config;
mod dashboard;
mod error;
mod listener;
#[cfg(test)]
mod openapi_tests;
mod receive;
mod request_guard;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use destinations::{DestinationPlugin, Registry};
use tracing_subscriber::EnvFilter;

use crate::config::ServerConfig;

#[derive(Parser)]
#[command(
    name = "destinations",
    version,
    about = "Asynchronous, batched, at-least-once event delivery"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// Config file (TOML). Without one, the embedded defaults are used.
    #[arg(long, env = "DESTINATIONS_CONFIG")]
    config: Option<PathBuf>,
    /// Where the server keeps its data (the queue, the embedded defaults' outbox and objects);
    /// default: the config's `data_dir`, `./data`.
    #[arg(long, env = "DESTINATIONS_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

impl ConfigArg {
    fn load(&self) -> anyhow::Result<(ServerConfig, config::Source)> {
        ServerConfig::load(self.config.as_deref(), self.data_dir.as_deref())
    }
}

/// Which dead letters.
#[derive(clap::Args)]
struct DeadLetterSelection {
    /// Only those of this destination instance.
    #[arg(long)]
    destination: Option<String>,
    /// Only those that died at or after this time (RFC 3339, e.g. 2026-12-01T10:00:00Z).
    #[arg(long)]
    since: Option<String>,
    /// Only those that died before this time.
    #[arg(long)]
    until: Option<String>,
}

#[derive(clap::Args)]
struct ServerArg {
    /// The server's base URL.
    #[arg(
        long,
        global = true,
        env = "DESTINATIONS_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    server: String,
    /// API token, if the server requires one.
    #[arg(
        long,
        global = true,
        env = "DESTINATIONS_API_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        #[command(flatten)]
        config: ConfigArg,
        /// Listen here instead of the config's `listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// What this server does: take sends and answer the API (`api`), deliver (`worker`),
        /// or both (`all`). `api` and `worker` need a shared queue (`kind = "nats"`), so the
        /// two tiers scale apart.
        #[arg(long, value_enum, default_value_t = Role::All, env = "DESTINATIONS_ROLE")]
        role: Role,
    },
    /// Send one payload to a destination instance through a running server.
    Send {
        /// The destination instance (`http`, ...).
        destination: String,
        /// The payload, as JSON.
        payload: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Show the status of a send.
    Status {
        /// The send id.
        id: String,
        /// Wait up to this long for it to be delivered or dead (e.g. `10s`).
        #[arg(long)]
        wait: Option<String>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List the destination kinds this build can run.
    List,
    /// Validate a config and print what would run.
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Dead letters on a running server.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
        #[command(flatten)]
        server: ServerArg,
    },
    /// The queue file (kind = "sqlite"), read-only: while a server runs on it, or after it
    /// refused to start.
    Queue {
        #[command(subcommand)]
        action: QueueAction,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// A debug receiver that prints every request it gets (for the tour and local testing).
    Receive {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        /// The status to answer with.
        #[arg(long, default_value_t = 200)]
        status: u16,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    /// List dead letters, newest first.
    List {
        /// How many (every one with --all).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Every page.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        selection: DeadLetterSelection,
    },
    /// Send dead letters again with a fresh retry budget: those named, or those selected, or
    /// all of them.
    Replay {
        /// Ids to replay.
        ids: Vec<String>,
        #[command(flatten)]
        selection: DeadLetterSelection,
    },
}

#[derive(Subcommand)]
enum QueueAction {
    /// Verify the queue file: its kind, schema, SQLite's integrity check, and what it holds.
    Check {
        /// The file (default: the config's queue path).
        #[arg(long)]
        path: Option<PathBuf>,
    },
    /// Write every pending send as NDJSON, one `{"id", "destination", "payload", ...}` a line,
    /// so nothing is stranded in a file the server cannot use.
    Export {
        /// The file (default: the config's queue path).
        #[arg(long)]
        path: Option<PathBuf>,
        /// Write here instead of standard output.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Dead letters too.
        #[arg(long)]
        dead: bool,
    },
}

/// The `destinations` program with the destination kinds of your choice.
pub struct Server {
    registry: Registry,
}

impl Default for Server {
    fn default() -> Self {
        Self::new()
    }
}

impl Server {
    /// The stock program: every destination kind linked in (the `destinations` crate's enabled
    /// features, and each crate whose `register_destination!` the linker kept).
    pub fn new() -> Self {
        Self::with_registry(destinations::registry())
    }

    /// Exactly these destination kinds.
    pub fn with_registry(registry: Registry) -> Self {
        Self { registry }
    }

    /// Add a destination kind (replacing a linked one of the same name). Explicit
    /// registration is what makes a kind certain to be there: a linker drops a crate's
    /// link-time registration when the program uses nothing else of it.
    #[must_use]
    pub fn register(mut self, plugin: DestinationPlugin) -> Self {
        self.registry.register(plugin);
        self
    }

    /// The destination kinds this program runs.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Read the command line and do what it says (`serve`, `send`, `list`, ...).
    pub fn run(self) -> anyhow::Result<()> {
        self.run_from(std::env::args_os())
    }

    /// Do what these arguments say; the first is the program's name, as in `std::env::args_os`.
    /// `--help` and bad arguments print and exit, as the stock program does.
    pub fn run_from<I, T>(self, args: I) -> anyhow::Result<()>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let cli = Cli::parse_from(args);
        // A program that set up its own logging keeps it.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
            )
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init();
        let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
        runtime.block_on(self.command(cli.command))
    }

    async fn command(self, command: Command) -> anyhow::Result<()> {
        let registry = &self.registry;
        match command {
            Command::Serve {
                config,
                listen,
                role,
            } => serve(registry, &config, listen, role).await,
            Command::Send {
                destination,
                payload,
                server,
            } => {
                client::Api::new(&server.server, server.token.as_deref())?
                    .send(&destination, &payload)
                    .await
            }
            Command::Status { id, wait, server } => {
                client::Api::new(&server.server, server.token.as_deref())?
                    .status(&id, wait.as_deref())
                    .await
            }
            Command::List => {
                for plugin in registry.plugins() {
                    println!("{:<8} {}", plugin.kind, plugin.describe);
                }
                Ok(())
            }
            Command::Check { config } => check(registry, &config).await,
            Command::Dlq { action, server } => {
                let api = client::Api::new(&server.server, server.token.as_deref())?;
                match action {
                    DlqAction::List {
                        limit,
                        all,
                        selection,
                    } => api.dlq_list(&selection.into(), limit, all).await,
                    DlqAction::Replay { ids, selection } => {
                        api.dlq_replay(&ids, &selection.into()).await
                    }
                }
            }
            Command::Queue { action, config } => queue(action, &config),
            Command::Receive { listen, status } => receive::run(listen, status).await,
        }
    }
}

impl From<DeadLetterSelection> for client::Selection {
    fn from(s: DeadLetterSelection) -> Self {
        Self {
            destination: s.destination,
            since: s.since,
            until: s.until,
        }
    }
}

async fn check(registry: &Registry, config: &ConfigArg) -> anyhow::Result<()> {
    let (config, source) = config.load()?;
    println!("config: {source}");
    println!("listen: {}", config.listen);
    config.check_exposure(config.listen)?;
    println!(
        "api token: {}",
        if config.api_token.is_some() {
            "required"
        } else {
            "none"
        }
    );
    println!("data directory: {}", config.data_dir.display());
    match config.queue_path() {
        Some(path) if path.exists() => {
            let report = destinations::sqlite::check(&path)?;
            let pending: u64 = report
                .sends
                .values()
                .flat_map(|states| {
                    states
                        .iter()
                        .filter(|(state, _)| matches!(state.as_str(), "queued" | "retrying"))
                        .map(|(_, n)| *n)
                })
                .sum();
            println!(
                "queue: sqlite {} (ok, {pending} sends pending{})",
                path.display(),
                if report.in_use {
                    ", in use by a running server"
                } else {
                    ""
                }
            );
        }
        Some(path) => println!(
            "queue: sqlite {} (created at the first start)",
            path.display()
        ),
        None if config.hub.queue.kind == "memory" => {
            println!("queue: memory (lost when the process ends)");
        }
        None => {
            // A shared queue: connecting checks the server and creates or checks its streams.
            let queue = destinations::open_queue(&config.hub).await?;
            let waiting: usize = queue.backlog()?.iter().map(|(_, d)| d.events).sum();
            println!("queue: {} (ok, {waiting} sends waiting)", queue.describe());
        }
    }
    for (name, instance) in config.instances()? {
        // Build each instance to run its own strict checks, without starting anything.
        registry.build(&instance.kind, &name, instance.options.clone())?;
        println!("destination {name}: kind {}", instance.kind);
    }
    println!("ok");
    Ok(())
}

/// `destinations queue check|export`.
fn queue(action: QueueAction, config: &ConfigArg) -> anyhow::Result<()> {
    let file = |path: Option<PathBuf>| -> anyhow::Result<PathBuf> {
        if let Some(path) = path {
            return Ok(path);
        }
        let (config, source) = config.load()?;
        config.queue_path().ok_or_else(|| {
            anyhow::anyhow!(
                "{source} has a `{}` queue, which keeps no file; give --path",
                config.hub.queue.kind
            )
        })
    };
    match action {
        QueueAction::Check { path } => {
            let path = file(path)?;
            let report = destinations::sqlite::check(&path)?;
            println!("{}: ok", path.display());
            println!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            );
        }
        QueueAction::Export { path, output, dead } => {
            let path = file(path)?;
            let summary = match &output {
                Some(out) => {
                    let file = std::fs::File::create(out)
                        .with_context(|| format!("cannot write {}", out.display()))?;
                    destinations::sqlite::export(&path, dead, &mut std::io::BufWriter::new(file))?
                }
                None => destinations::sqlite::export(
                    &path,
                    dead,
                    &mut std::io::BufWriter::new(std::io::stdout().lock()),
                )?,
            };
            eprintln!(
                "exported {} sends from {}{}",
                summary.exported,
                path.display(),
                if summary.unreadable > 0 {
                    format!(
                        "; {} rows could not be read (damage) and were skipped",
                        summary.unreadable
                    )
                } else {
                    String::new()
                }
            );
        }
    }
    Ok(())
}

/// What a server does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Role {
    /// Take sends and answer the API; deliver them too.
    All,
    /// Take sends and answer the API; workers deliver them.
    Api,
    /// Deliver what the API servers took; serve only /healthz, /readyz and /metrics.
    Worker,
}

async fn serve(
    registry: &Registry,
    config: &ConfigArg,
    listen: Option<SocketAddr>,
    role: Role,
) -> anyhow::Result<()> {
    let (config, source) = config.load()?;
    // The recorder must exist before the hub resolves its metric handles.
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| tracing::warn!("metrics disabled: {e}"))
        .ok();
    let hub = config.build_hub(registry, role).await?;
    let waiting = hub.queue_depth().events;
    tracing::info!(queue = %hub.queue_description(), waiting, "queue open");
    let listen = listen.unwrap_or(config.listen);
    config.check_exposure(listen)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let local = listener.local_addr()?;
    let names: Vec<String> = hub
        .destinations()
        .into_iter()
        .map(|(n, k)| format!("{n} ({k})"))
        .collect();
    tracing::info!(config = %source, destinations = %names.join(", "), "destinations serving on http://{local}");
    // One machine-readable line on stdout, for scripts and tests that listen on port 0.
    println!("listening on {local}");
    let state = Arc::new(api::AppState {
        hub: hub.clone(),
        prometheus,
        api_token: config.api_token.clone(),
        readiness: api::Readiness::new(config.readiness_cache),
        max_request_bytes: config.max_request_bytes,
        openapi: std::sync::OnceLock::new(),
        sessions: dashboard::Sessions::default(),
        stopping: tokio::sync::watch::Sender::new(false),
    });
    // SSE streams are served beside the API, with their own read tokens, not the API token.
    let streams = destinations::sse::routes(&hub).map_err(anyhow::Error::msg)?;
    // The subscriptions API is part of the API, behind its token.
    let subscriptions = destinations::emit::routes(&hub).map_err(anyhow::Error::msg)?;
    let guard = Arc::new(request_guard::RequestGuard::new(
        local,
        &config.allowed_hosts,
    ));
    let serves_api = role != Role::Worker;
    let app = api::router(&state, subscriptions, streams, serves_api)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(axum::middleware::from_fn(api::errors_as_json))
        .layer(axum::middleware::from_fn_with_state(
            config.clients.body_timeout,
            listener::bodies_within,
        ))
        .layer(axum::middleware::from_fn_with_state(
            guard,
            request_guard::guard_requests,
        ));
    let stopping = hub.clone();
    let live = state.stopping.clone();
    let closed = listener::serve(listener, app, config.clients, async move {
        shutdown_signal().await;
        tracing::info!("stopping: no new connections; letting requests under way finish");
        // Subscribers never hang up by themselves: end their responses so the server can stop.
        destinations::sse::close(&stopping);
        live.send_replace(true);
    })
    .await;
    if closed > 0 {
        tracing::warn!(
            closed,
            "closed connections still busy at the drain deadline (clients.drain_timeout)"
        );
    }
    tracing::info!("stopped taking requests; finishing what is under way");
    let report = hub.shutdown().await;
    if report.kept > 0 {
        tracing::info!(
            kept = report.kept,
            queue = %hub.queue_description(),
            "sends stay queued for the next start"
        );
    }
    if report.abandoned > 0 {
        anyhow::bail!(
            "{} sends were still pending at the shutdown deadline and were given up on (hub.shutdown_timeout)",
            report.abandoned
        );
    }
    tracing::info!("shut down cleanly");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
