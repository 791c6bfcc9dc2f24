//! Serving HTTP with limits a slow or hostile client cannot get around (review S3): a request
//! head must arrive within `header_timeout` and its body within `body_timeout`; at most
//! `max_connections` are open at once (more wait in the kernel's backlog); and a stopping
//! server waits at most `drain_timeout` for requests under way before it closes what is left
//! and shuts the hub down.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// How long clients may take and how many may be connected.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClientLimits {
    /// The longest a request head (request line and headers) may take to arrive.
    #[serde(
        with = "destinations::config::duration_text",
        default = "default_header_timeout"
    )]
    pub(crate) header_timeout: Duration,
    /// The longest a request body may take to arrive, from the end of the head.
    #[serde(
        with = "destinations::config::duration_text",
        default = "default_body_timeout"
    )]
    pub(crate) body_timeout: Duration,
    /// Connections open at once; more wait to be accepted.
    #[serde(default = "default_max_connections")]
    pub(crate) max_connections: usize,
    /// How long a stopping server lets requests under way finish before it closes their
    /// connections (status waits and SSE streams included).
    #[serde(
        with = "destinations::config::duration_text",
        default = "default_drain_timeout"
    )]
    pub(crate) drain_timeout: Duration,
}

impl Default for ClientLimits {
    fn default() -> Self {
        Self {
            header_timeout: default_header_timeout(),
            body_timeout: default_body_timeout(),
            max_connections: default_max_connections(),
            drain_timeout: default_drain_timeout(),
        }
    }
}

fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_body_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_max_connections() -> usize {
    4096
}

fn default_drain_timeout() -> Duration {
    Duration::from_secs(5)
}

impl ClientLimits {
    /// Why these limits cannot be used, if they cannot.
    pub(crate) fn check(&self) -> Result<(), String> {
        for (name, value) in [
            ("header_timeout", self.header_timeout),
            ("body_timeout", self.body_timeout),
        ] {
            if value.is_zero() {
                return Err(format!("`clients.{name}` must be above 0"));
            }
        }
        if self.max_connections == 0 {
            return Err("`clients.max_connections` must be at least 1".to_owned());
        }
        Ok(())
    }
}

/// Give every request body a deadline, `limit` from the end of its head: a client that
/// trickles its body gets a [`BodyTimedOut`] error where the body is read (the API answers
/// 408) instead of holding a task and a connection for as long as it likes.
pub(crate) async fn bodies_within(
    State(limit): State<Duration>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let body = Body::new(DeadlineBody {
        inner: body,
        deadline: Box::pin(tokio::time::sleep(limit)),
        limit,
    });
    next.run(Request::from_parts(parts, body)).await
}

/// A request body that fails once its deadline passes.
struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
}

/// A request body did not arrive within `clients.body_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {} (`clients.body_timeout`)", humantime::format_duration(*.0))]
pub(crate) struct BodyTimedOut(pub(crate) Duration);

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        match this.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut(this.limit))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Serve `app` on `listener` until `stop` resolves, then drain as the limits say. Returns
/// how many connections were still open at the drain deadline (and were closed).
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ClientLimits,
    stop: impl Future<Output = ()>,
) -> usize {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    tokio::pin!(stop);
    loop {
        // Reap connections that ended, so the set holds only open ones.
        while connections.try_join_next().is_some() {}
        let slot = tokio::select! {
            () = &mut stop => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, most likely: wait for some to close.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let connection =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            let _ = connection.await;
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown())
        .await
        .is_ok()
    {
        return 0;
    }
    let left = connections.len();
    connections.shutdown().await;
    left
}
