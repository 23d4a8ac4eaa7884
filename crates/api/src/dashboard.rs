//! The live dashboard (`/dashboard`): a page and its script and style, embedded in the binary
//! as written in `dashboard/` (plain JavaScript, no build step), so it works offline.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// Only the server's own scripts, styles and connections: the page runs nothing else, and no
/// other page may frame it.
const POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                      img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'";

/// A dashboard file by name (`index.html`, `app.js`, `app.css`), with its content type.
fn asset(file: &str) -> Option<(&'static str, &'static str)> {
    Some(match file {
        "index.html" => (
            "text/html; charset=utf-8",
            include_str!("../../../dashboard/index.html"),
        ),
        "app.js" => (
            "text/javascript; charset=utf-8",
            include_str!("../../../dashboard/app.js"),
        ),
        "app.css" => (
            "text/css; charset=utf-8",
            include_str!("../../../dashboard/app.css"),
        ),
        _ => return None,
    })
}

/// Answers a dashboard file, or 404.
pub(crate) fn serve(file: &str) -> Response {
    match asset(file) {
        Some((content_type, body)) => (
            [
                (header::CONTENT_TYPE, content_type),
                (header::CONTENT_SECURITY_POLICY, POLICY),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            body,
        )
            .into_response(),
        None => (axum::http::StatusCode::NOT_FOUND, "no such file").into_response(),
    }
}
