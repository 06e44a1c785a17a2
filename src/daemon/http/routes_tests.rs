//! What each route answers in each phase of the daemon's life: `/readyz` says
//! `starting` until the server has bound every listener and called `set_ready`, and
//! `draining` from the stop on, while `/healthz` answers throughout.

use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::{Method, Request, StatusCode};

use super::route;
use crate::daemon::http::{Health, State};
use crate::daemon::http_guard::WebEndpoint;
use crate::daemon::metrics::Metrics;

fn state() -> State {
    let metrics = Arc::new(Metrics::new());
    // Plain HTTP without basic auth, as with no web config file.
    let (_, web) = tokio::sync::watch::channel(Arc::new(WebEndpoint::new(None)));
    State {
        health: Arc::new(Health::new(&metrics)),
        metrics,
        web,
        access: tokio::sync::watch::channel(Arc::default()).1,
    }
}

/// Status and body of `GET path`.
fn get(state: &State, path: &str) -> (StatusCode, String) {
    let request = Request::builder()
        .method(Method::GET)
        .uri(path)
        .body(())
        .expect("request");
    let response = route(&request, state);
    let status = response.status();
    let body = body_text(response.into_body());
    (status, body)
}

fn body_text(body: http_body_util::Full<bytes::Bytes>) -> String {
    let collected = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(body.collect())
        .expect("a full body cannot fail");
    String::from_utf8(collected.to_bytes().to_vec()).expect("UTF-8 body")
}

#[test]
fn readyz_says_starting_until_ready_then_draining_while_healthz_stays_ok() {
    let state = state();
    let phases = [
        (
            "before the listeners are bound",
            StatusCode::SERVICE_UNAVAILABLE,
            "starting\n",
        ),
        ("serving", StatusCode::OK, "ready\n"),
        ("draining", StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
    ];
    for (i, (phase, status, body)) in phases.into_iter().enumerate() {
        match i {
            1 => state.health.set_ready(),
            2 => state.health.set_draining(),
            _ => {}
        }
        assert_eq!(
            get(&state, "/readyz"),
            (status, body.to_string()),
            "{phase}"
        );
        assert_eq!(
            get(&state, "/healthz"),
            (StatusCode::OK, "ok\n".to_string()),
            "{phase}"
        );
        let exposition = String::from_utf8(state.metrics.encode()).expect("exposition");
        let gauge = format!("\nechod_ready {}\n", u8::from(status == StatusCode::OK));
        assert!(
            exposition.contains(&gauge),
            "{phase}: echod_ready disagrees with /readyz:\n{exposition}"
        );
    }
}
