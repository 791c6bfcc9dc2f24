//! `destinations`: the server and its command line.

mod api;
mod client;
mod config;
mod error;
mod receive;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
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
}

#[derive(clap::Args)]
struct ServerArg {
    /// The server's base URL.
    #[arg(
        long,
        env = "DESTINATIONS_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    server: String,
    /// API token, if the server requires one.
    #[arg(long, env = "DESTINATIONS_API_TOKEN", hide_env_values = true)]
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
    /// List the most recent dead letters.
    List {
        /// How many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Send dead letters again (all, or those named).
    Replay {
        /// Ids to replay; all when none is given.
        ids: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Serve { config, listen } => serve(config.config, listen).await,
            Command::Send {
                destination,
                payload,
                server,
            } => {
                client::send(
                    &server.server,
                    server.token.as_deref(),
                    &destination,
                    &payload,
                )
                .await
            }
            Command::Status { id, wait, server } => {
                client::status(
                    &server.server,
                    server.token.as_deref(),
                    &id,
                    wait.as_deref(),
                )
                .await
            }
            Command::List => {
                for plugin in destinations::registry().plugins() {
                    println!("{:<8} {}", plugin.kind, plugin.describe);
                }
                Ok(())
            }
            Command::Check { config } => check(config.config.as_deref()),
            Command::Dlq { action, server } => match action {
                DlqAction::List { limit } => {
                    client::dlq_list(&server.server, server.token.as_deref(), limit).await
                }
                DlqAction::Replay { ids } => {
                    client::dlq_replay(&server.server, server.token.as_deref(), &ids).await
                }
            },
            Command::Receive { listen, status } => receive::run(listen, status).await,
        }
    })
}

fn check(path: Option<&Path>) -> anyhow::Result<()> {
    let (config, source) = ServerConfig::load(path)?;
    let registry = destinations::registry();
    println!("config: {source}");
    println!("listen: {}", config.listen);
    println!(
        "api token: {}",
        if config.api_token.is_some() {
            "required"
        } else {
            "none"
        }
    );
    for (name, instance) in config.instances()? {
        // Build each instance to run its own strict checks, without starting anything.
        registry.build(&instance.kind, &name, instance.options.clone())?;
        println!("destination {name}: kind {}", instance.kind);
    }
    println!("ok");
    Ok(())
}

async fn serve(path: Option<PathBuf>, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    let (config, source) = ServerConfig::load(path.as_deref())?;
    // The recorder must exist before the hub resolves its metric handles.
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| tracing::warn!("metrics disabled: {e}"))
        .ok();
    let hub = config.build_hub(&destinations::registry())?;
    let listen = listen.unwrap_or(config.listen);
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
        max_request_bytes: config.max_request_bytes,
    });
    // SSE streams are served beside the API, with their own read tokens, not the API token.
    let streams = destinations::sse::routes(&hub).map_err(anyhow::Error::msg)?;
    // The subscriptions API is part of the API, behind its token.
    let subscriptions = destinations::emit::routes(&hub).map_err(anyhow::Error::msg)?;
    let app = api::router(state, subscriptions).merge(streams);
    let stopping = hub.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            // Subscribers never hang up by themselves: end their responses so the server can stop.
            destinations::sse::close(&stopping);
        })
        .await
        .context("the server failed")?;
    tracing::info!("stopped taking requests; delivering what is pending");
    let report = hub.shutdown().await;
    if report.abandoned > 0 {
        anyhow::bail!(
            "{} sends were still pending at the shutdown deadline and were dead-lettered (hub.shutdown_timeout)",
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
