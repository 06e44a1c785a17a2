//! The HTTP endpoint: Prometheus metrics and health probes.
//!
//! `/healthz` is liveness (the runtime answers), `/readyz` is readiness (every listener
//! is bound and echod is not draining — it fails *first* on a stop, so load balancers
//! move traffic away before connections are drained). The server has its own small
//! connection limit and header timeout, so a flood or a half-sent request on the HTTP
//! port cannot take the probes down.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus::IntGauge;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::accept::Acceptor;
use super::logging::RateLimitedLog;
use super::metrics::{Metrics, REVISION, VERSION};
use super::reasons::AcceptErrorKind;

static ACCEPT_ERROR_LOG: RateLimitedLog = RateLimitedLog::new(Duration::from_secs(5));

/// HTTP connections served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 64;
/// A client must send its request headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Readiness, stored once: in the `echod_ready` and `echod_draining` gauges that
/// Prometheus scrapes, so `/readyz` and the metrics can never disagree.
pub(crate) struct Health {
    ready: IntGauge,
    draining: IntGauge,
}

impl Health {
    pub(crate) fn new(metrics: &Metrics) -> Self {
        Self {
            ready: metrics.ready.clone(),
            draining: metrics.draining.clone(),
        }
    }

    /// Every listener is bound and serving.
    pub(crate) fn set_ready(&self) {
        self.ready.set(1);
    }

    /// A stop has begun: readiness fails from now on.
    pub(crate) fn set_draining(&self) {
        self.ready.set(0);
        self.draining.set(1);
    }

    fn is_ready(&self) -> bool {
        self.ready.get() == 1 && !self.is_draining()
    }

    fn is_draining(&self) -> bool {
        self.draining.get() == 1
    }
}

/// What the endpoint serves from.
pub(crate) struct State {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) health: Arc<Health>,
}

/// Serves HTTP on `listener` until `stop`; open requests get a short grace period.
pub(crate) async fn serve(listener: TcpListener, state: Arc<State>, stop: CancellationToken) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    let mut acceptor = Acceptor::default();
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = Arc::clone(&limit).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let on_error = |kind: AcceptErrorKind, e: &io::Error| {
            if let Some(suppressed) = ACCEPT_ERROR_LOG.allow() {
                warn!(error = %e, kind = kind.label(), suppressed, "HTTP accept failed");
            }
        };
        let Some((stream, _)) = acceptor.next(&listener, &stop, on_error).await else {
            break;
        };
        let state = Arc::clone(&state);
        let service = hyper::service::service_fn(move |req| {
            let state = Arc::clone(&state);
            async move { Ok::<_, Infallible>(route(&req, &state)) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(1), graceful.shutdown()).await;
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn route<B>(req: &Request<B>, state: &State) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !matches!(path, "/" | "/metrics" | "/healthz" | "/readyz") {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    match path {
        "/metrics" => {
            let mut resp = text(StatusCode::OK, state.metrics.encode());
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if state.health.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" if state.health.is_draining() => {
            text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        }
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
        _ => {
            let mut resp = text(StatusCode::OK, landing_page());
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            resp
        }
    }
}

#[cfg(test)]
#[path = "http_tests.rs"]
mod route_tests;

fn landing_page() -> String {
    format!(
        "<!doctype html>\n<html><head><title>echod</title></head><body>\n\
         <h1>echod {VERSION}</h1>\n<p>TCP and UDP echo daemon (RFC 862), revision {REVISION}.</p>\n\
         <ul>\n<li><a href=\"/metrics\">/metrics</a> (Prometheus)</li>\n\
         <li><a href=\"/healthz\">/healthz</a> (liveness)</li>\n\
         <li><a href=\"/readyz\">/readyz</a> (readiness)</li>\n</ul>\n</body></html>\n"
    )
}
