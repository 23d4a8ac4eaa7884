//! What a web browser may do. A page open on the user's machine is an attacker: it can send
//! requests to the server from the user's browser. CORS keeps it from *reading* the answers of
//! plain requests but not from *sending* them, and does not cover WebSockets at all; DNS
//! rebinding lets a page on an attacker's domain reach the server under that domain's name.
//! So, before anything runs:
//! - a request that carries `Origin` (every browser request to `/graphql`, POST or WebSocket
//!   upgrade) is served only from the server's own origin or an allowlisted one;
//! - without authentication (or when hosts are configured), only `Host` values that cannot come
//!   from a rebinding attack are served: `localhost`, an IP address, or a configured name.
//!   A rebinding attack always arrives under the attacker's domain name. With authentication on
//!   the check is not needed: a page cannot present a bearer token it does not have (the
//!   server never accepts cookies), so all it could reach is the open health checks.
//!
//! Requests without `Origin` (curl, scripts, workers) are unaffected by the origin rule.

use crate::ApiError;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use std::sync::Arc;
use std::time::Duration;
use tasker_domain::HostPattern;
use tower_http::cors::{AllowOrigin, CorsLayer};

/// Settings that open the server to more origins and host names.
pub const ORIGINS_SETTING: &str =
    "--allowed-origins (TASKER_ALLOWED_ORIGINS, allowed_origins in the TOML file)";
pub const HOSTS_SETTING: &str =
    "--allowed-hosts (TASKER_ALLOWED_HOSTS, allowed_hosts in the TOML file)";

/// Which web origins and host names the server answers. Whether `Host` is checked follows
/// from the authentication mode, set when the router is built.
#[derive(Debug, Clone)]
pub struct BrowserPolicy {
    /// Origins besides the server's own whose pages may call the API, normalized
    /// (`https://dash.example.com`, `http://localhost:3000`).
    origins: Vec<String>,
    /// Host names served besides `localhost` and IP addresses (`*.example.com` for every
    /// subdomain).
    hosts: Vec<HostPattern>,
    /// Whether `Host` is checked: always without authentication, and with it when host names
    /// are configured (see [`BrowserPolicy::authenticated`]).
    check_host: bool,
}

impl BrowserPolicy {
    /// The policy of these allowlists, for a server without authentication.
    pub fn new<S: AsRef<str>>(origins: &[S], hosts: &[S]) -> Result<BrowserPolicy, ApiError> {
        let origins = parse_entries(
            origins,
            "allowed_origins",
            parse_origin,
            "an origin: write scheme://host[:port], e.g. https://dash.example.com",
        )?;
        let hosts = parse_entries(
            hosts,
            "allowed_hosts",
            HostPattern::parse,
            "a host name (no scheme, no port)",
        )?;
        Ok(BrowserPolicy {
            origins,
            hosts,
            check_host: true,
        }
        .authenticated(false))
    }

    /// The default: the server's own pages only, and only local host names and addresses.
    pub fn local() -> BrowserPolicy {
        BrowserPolicy {
            origins: Vec::new(),
            hosts: Vec::new(),
            check_host: true,
        }
    }

    /// The same allowlists for a server whose callers need tokens (`true`) or not. Without
    /// authentication `Host` is always checked (DNS rebinding); with it, only when host names
    /// are configured, since a rebinding page has no token to send.
    pub fn authenticated(self, authenticated: bool) -> BrowserPolicy {
        let check_host = !authenticated || !self.hosts.is_empty();
        BrowserPolicy { check_host, ..self }
    }

    /// Why this request must not be served, if it must not.
    fn refusal(&self, headers: &HeaderMap) -> Option<Refusal> {
        let host = headers
            .get(header::HOST)
            .map(|value| value.to_str().unwrap_or("\u{fffd}"));
        if self.check_host
            && let Some(host) = host
            && !self.host_allowed(host)
        {
            return Some(Refusal::Host(host.to_owned()));
        }
        let origin = headers.get(header::ORIGIN)?;
        let origin = origin.to_str().unwrap_or("\u{fffd}");
        let allowed = parse_origin(origin).is_some_and(|normalized| {
            self.origins.contains(&normalized)
                || host.is_some_and(|host| same_host(&normalized, host))
        });
        (!allowed).then(|| Refusal::Origin(origin.to_owned()))
    }

    fn host_allowed(&self, host: &str) -> bool {
        let Some(name) = host_name(host) else {
            return false;
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if name == "localhost" || tasker_domain::host::ip_literal(&name).is_some() {
            return true;
        }
        self.hosts.iter().any(|pattern| pattern.matches(&name))
    }

    /// CORS answers for the allowlisted origins only (the server's own pages need none).
    pub(crate) fn cors(&self) -> CorsLayer {
        let origins: Vec<HeaderValue> = self
            .origins
            .iter()
            .filter_map(|origin| HeaderValue::from_str(origin).ok())
            .collect();
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION, header::ACCEPT])
            .max_age(Duration::from_secs(600))
    }
}

/// Every non-empty entry parsed, or the first that does not parse, with its place.
fn parse_entries<S: AsRef<str>, T>(
    entries: &[S],
    key: &str,
    parse: impl Fn(&str) -> Option<T>,
    expected: &str,
) -> Result<Vec<T>, ApiError> {
    entries
        .iter()
        .map(|entry| entry.as_ref().trim())
        .enumerate()
        .filter(|(_, entry)| !entry.is_empty())
        .map(|(i, entry)| {
            parse(entry).ok_or_else(|| {
                ApiError::invalid(
                    &format!("{key}[{i}]"),
                    format!("{entry:?} is not {expected}"),
                )
            })
        })
        .collect()
}

enum Refusal {
    Host(String),
    Origin(String),
}

/// The middleware: refuses with 403 before anything runs, and says so in the log.
pub(crate) async fn guard(
    State(policy): State<Arc<BrowserPolicy>>,
    request: Request,
    next: Next,
) -> Response {
    match policy.refusal(request.headers()) {
        None => next.run(request).await,
        Some(Refusal::Host(host)) => {
            tracing::warn!(%host, path = %request.uri().path(), "refused a request for an unknown host name (DNS rebinding?)");
            crate::error::error_response(
                StatusCode::FORBIDDEN,
                "HOST_NOT_ALLOWED",
                &format!(
                    "this server does not answer to the host name {host:?}; if it should, add it to {HOSTS_SETTING}"
                ),
            )
        }
        Some(Refusal::Origin(origin)) => {
            tracing::warn!(%origin, path = %request.uri().path(), "refused a request from another web origin");
            crate::error::error_response(
                StatusCode::FORBIDDEN,
                "ORIGIN_NOT_ALLOWED",
                &format!(
                    "requests from pages of {origin:?} are refused; to let that site use this server, add it to {ORIGINS_SETTING}"
                ),
            )
        }
    }
}

/// `scheme://host[:port]` in lower case without the scheme's default port; `None` for anything
/// else (paths, `null`, other schemes, user info).
fn parse_origin(origin: &str) -> Option<String> {
    let origin = origin.trim_end_matches('/').to_ascii_lowercase();
    let (scheme, authority) = origin.split_once("://")?;
    if !matches!(scheme, "http" | "https")
        || authority.is_empty()
        || authority.contains(['/', '@', '?', '#', ' '])
    {
        return None;
    }
    let name = host_name(authority)?;
    let port = &authority[name.len()..];
    let port = match port.strip_prefix(':') {
        None if port.is_empty() => None,
        Some(digits) if !digits.is_empty() && digits.parse::<u16>().is_ok() => Some(digits),
        _ => return None,
    };
    Some(match port {
        Some(port) if !is_default_port(scheme, port) => format!("{scheme}://{name}:{port}"),
        _ => format!("{scheme}://{name}"),
    })
}

fn is_default_port(scheme: &str, port: &str) -> bool {
    (scheme == "http" && port == "80") || (scheme == "https" && port == "443")
}

/// Whether an origin is the server's own: `http` (the scheme it serves), and the host and
/// port the request was sent to. Behind a TLS proxy the pages are `https://`: list them.
fn same_host(origin: &str, host: &str) -> bool {
    let Some(authority) = origin.strip_prefix("http://") else {
        return false;
    };
    let scheme = "http";
    let host = host.to_ascii_lowercase();
    let host = match host.rsplit_once(':') {
        Some((name, port)) if !name.ends_with(':') && is_default_port(scheme, port) => {
            name.to_owned()
        }
        _ => host,
    };
    authority == host
}

/// The name part of a `Host` value (`[::1]` keeps its brackets); `None` when malformed.
fn host_name(host: &str) -> Option<&str> {
    let name = if host.starts_with('[') {
        &host[..=host.find(']')?]
    } else {
        host.split(':').next()?
    };
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(host: Option<&str>, origin: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(host) = host {
            headers.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        }
        if let Some(origin) = origin {
            headers.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
        }
        headers
    }

    fn served(policy: &BrowserPolicy, host: Option<&str>, origin: Option<&str>) -> bool {
        policy.refusal(&headers(host, origin)).is_none()
    }

    #[test]
    fn without_authentication_only_local_names_and_addresses_are_served() {
        let policy = BrowserPolicy::local();
        for host in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST",
            "[::1]:8080",
            "10.0.0.5:8080",
        ] {
            assert!(served(&policy, Some(host), None), "{host}");
        }
        for host in [
            "evil.example:8080",
            "evil.example",
            "localhost.evil.example",
            "[::1",
            "",
        ] {
            assert!(!served(&policy, Some(host), None), "{host}");
        }
        assert!(served(&policy, None, None), "no Host: not a browser");
        let listed = BrowserPolicy::new(&[], &["tasker.internal", "*.corp.example"]).unwrap();
        assert!(served(&listed, Some("tasker.internal:8080"), None));
        assert!(served(&listed, Some("a.corp.example"), None));
        assert!(!served(&listed, Some("corp.example"), None));
        // With authentication the check is off unless hosts are configured.
        let secured = BrowserPolicy::local().authenticated(true);
        assert!(served(&secured, Some("evil.example"), None));
        let secured = BrowserPolicy::new(&[], &["tasker.example.com"])
            .map(|p| p.authenticated(true))
            .unwrap();
        assert!(!served(&secured, Some("evil.example"), None));
    }

    #[test]
    fn only_the_servers_own_and_listed_origins_are_served() {
        let policy = BrowserPolicy::new(&["https://Dash.example.com:443/"], &[]).unwrap();
        let host = Some("127.0.0.1:8080");
        assert!(served(&policy, host, None));
        assert!(served(&policy, host, Some("http://127.0.0.1:8080")));
        assert!(served(&policy, host, Some("https://dash.example.com")));
        for origin in [
            "http://evil.example",
            "http://127.0.0.1:8081",
            "http://localhost:8080",
            "null",
            "file://",
            "http://127.0.0.1:8080@evil.example",
            "https://dash.example.com:8443",
        ] {
            assert!(!served(&policy, host, Some(origin)), "{origin}");
        }
        assert!(served(
            &policy,
            Some("localhost"),
            Some("http://localhost:80")
        ));
        assert!(
            !served(&policy, Some("localhost:443"), Some("https://localhost")),
            "the server speaks http: an https page is another origin"
        );
        assert!(!served(&policy, host, Some("https://127.0.0.1:8080")));
    }

    #[test]
    fn bad_entries_are_refused_with_their_place() {
        for bad in [
            "dash.example.com",
            "ftp://x",
            "https://x/path",
            "http://x:99999",
        ] {
            let err = BrowserPolicy::new(&[bad], &[]).unwrap_err();
            assert!(err.to_string().contains("allowed_origins[0]"), "{err}");
        }
        let err = BrowserPolicy::new(&[], &["http://x"]).unwrap_err();
        assert!(err.to_string().contains("allowed_hosts[0]"), "{err}");
    }
}
