//! The chat page `serve` answers at `/`: three files embedded in the binary (no network at run time, no CDN, no
//! build step), talking to the same API as every other client (`POST /v1/images`, `POST /v1/chat/completions`
//! with streaming, `GET /v1/models`). The page references everything by relative URL, so it works unchanged
//! behind a reverse proxy that serves it under a path (`https://host/asagi/` -> `http://127.0.0.1:8080/`).
//!
//! The files are static and hold no secret, so they are served without the API key (the page asks for the key
//! when the API answers 401 and keeps it in the tab's session storage). Their headers confine the page to this
//! server (CSP: scripts, styles and requests from this origin only, images also from `data:`/`blob:` URLs of
//! attached files) and keep other sites from framing it.

use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const INDEX: &str = include_str!("index.html");

/// (route, file, content type): the page and what it loads.
const FILES: &[(&str, &str, &str)] = &[
    ("/", INDEX, "text/html; charset=utf-8"),
    ("/index.html", INDEX, "text/html; charset=utf-8"),
    ("/app.js", include_str!("app.js"), "text/javascript; charset=utf-8"),
    ("/app.css", include_str!("app.css"), "text/css; charset=utf-8"),
];

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The page's routes, merged into the server's router (no state: the files are constants).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    FILES
        .iter()
        .fold(Router::new(), |r, &(path, body, kind)| r.route(path, get(move || async move { file(body, kind) })))
}

fn file(body: &'static str, kind: &'static str) -> Response {
    let headers: [(HeaderName, HeaderValue); 5] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(kind)),
        (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP)),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
        // Revalidated on every load, so an upgraded server never runs against an old page.
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    (headers, body).into_response()
}
