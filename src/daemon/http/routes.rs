//! What each path answers: `/metrics`, `/healthz`, `/readyz` and a landing page; which
//! paths are open (the health probes: no credentials, no waiting behind a password
//! check), and the answers to a request that is refused.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{ALLOW, CONNECTION, CONTENT_TYPE, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};

use super::State;
use crate::daemon::metrics::{REVISION, VERSION};

/// Paths served without basic auth: the health probes.
pub(super) fn is_open(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz")
}

pub(super) fn unauthorized() -> Response<Full<Bytes>> {
    let mut resp = text(StatusCode::UNAUTHORIZED, "unauthorized\n");
    resp.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"echod\", charset=\"UTF-8\""),
    );
    resp
}

/// The answer when the password checks waiting are at their bound: try again in a
/// second, on a new connection (this one's place goes to someone else).
pub(super) fn too_many_checks() -> Response<Full<Bytes>> {
    let mut resp = text(StatusCode::TOO_MANY_REQUESTS, "too many password checks\n");
    resp.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    resp
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

pub(super) fn route<B>(req: &Request<B>, state: &State) -> Response<Full<Bytes>> {
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

fn landing_page() -> String {
    format!(
        "<!doctype html>\n<html><head><title>echod</title></head><body>\n\
         <h1>echod {VERSION}</h1>\n<p>TCP and UDP echo daemon (RFC 862), revision {REVISION}.</p>\n\
         <ul>\n<li><a href=\"/metrics\">/metrics</a> (Prometheus)</li>\n\
         <li><a href=\"/healthz\">/healthz</a> (liveness)</li>\n\
         <li><a href=\"/readyz\">/readyz</a> (readiness)</li>\n</ul>\n</body></html>\n"
    )
}

#[cfg(test)]
#[path = "routes_tests.rs"]
mod tests;
