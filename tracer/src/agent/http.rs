//! The agent's HTTP endpoints, served with hyper on the session's runtime: `GET /metrics` (the Prometheus
//! text exposition, OpenMetrics), `GET /debug/pprof/heap` (a gzipped pprof profile of what the watched
//! processes' pages hold, by stack) and `GET /healthz`. Each connection is a task of its own; a request only
//! locks the metrics or the profile long enough to encode them.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::CONTENT_TYPE,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::metrics::Metrics;
use crate::output::{pprof, profile::Profile};

/// How long to wait after a failed accept before the next.
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves connections until the runtime stops.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Mutex<Metrics>>,
    heap_profile: Arc<Mutex<Profile>>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors, say: the next accept is tried a little later, not at once for ever.
            tokio::time::sleep(ACCEPT_RETRY).await;
            continue;
        };
        let (metrics, heap_profile) = (Arc::clone(&metrics), Arc::clone(&heap_profile));
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let (metrics, heap_profile) = (Arc::clone(&metrics), Arc::clone(&heap_profile));
                async move { Ok::<_, Infallible>(respond(&request, &metrics, &heap_profile)) }
            });
            // A client that goes away mid-request is its own business.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond(
    request: &Request<Incoming>,
    metrics: &Mutex<Metrics>,
    heap_profile: &Mutex<Profile>,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, content_type: &str, body: Vec<u8>| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = content_type.parse() {
            response.headers_mut().insert(CONTENT_TYPE, value);
        }
        response
    };
    if request.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            b"GET only\n".to_vec(),
        );
    }
    match request.uri().path() {
        "/metrics" => match metrics.lock().unwrap_or_else(|e| e.into_inner()).encode() {
            Ok(body) => text(StatusCode::OK, OPENMETRICS, body.into_bytes()),
            Err(_) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                b"cannot encode the metrics\n".to_vec(),
            ),
        },
        "/debug/pprof/heap" => {
            let mut body = Vec::new();
            let profile = heap_profile.lock().unwrap_or_else(|e| e.into_inner());
            match pprof::write(&profile, &mut body) {
                Ok(()) => text(StatusCode::OK, "application/octet-stream", body),
                Err(_) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    b"cannot encode the profile\n".to_vec(),
                ),
            }
        }
        "/healthz" => text(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            b"not found: /metrics, /debug/pprof/heap, /healthz\n".to_vec(),
        ),
    }
}
