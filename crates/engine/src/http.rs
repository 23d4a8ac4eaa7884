//! The built-in `http` handler: one request per attempt, built from the step's config with
//! `{{ context.x }}` and `{{ steps.name.results.y }}` placeholders filled in. A 2xx answer
//! completes the step (its JSON body becomes the results); 429 and 503 are retried after the
//! server's Retry-After (seconds or an HTTP date); other 4xx fail for good; 5xx, connection
//! errors and timeouts are retried with the step's backoff. Destinations follow the
//! [`OutboundPolicy`]: an internal address fails the step for good, naming the rule.

use crate::handlers::Outcome;
use crate::outbound::{CheckedResolver, OutboundPolicy, refusal_in};
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tasker_store::{ClaimedStep, StepInputs};

/// How long a request may take when the step sets no timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Redirects followed per request, each checked against the policy.
const MAX_REDIRECTS: usize = 10;

/// The shared client and the policy it connects under.
pub(crate) struct Caller {
    client: reqwest::Client,
    policy: Arc<OutboundPolicy>,
}

impl Caller {
    /// Builds the shared client; TLS uses rustls with the ring provider (installed once).
    /// Every address it connects to passes `policy`: names through its resolver, IP addresses
    /// in redirects through its redirect policy (and in the first URL in [`Caller::run`]). It
    /// never uses a proxy from the environment, which would resolve names where the policy
    /// cannot see them.
    pub(crate) fn new(policy: &OutboundPolicy) -> Result<Caller, reqwest::Error> {
        // Another part of the process may have installed it already; either way one is in place.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let policy = Arc::new(policy.clone());
        let client = client(policy.clone())?;
        Ok(Caller { client, policy })
    }

    /// Runs one attempt. `max_duration` bounds the request below the worker's lease.
    pub(crate) async fn run(
        &self,
        claimed: &ClaimedStep,
        inputs: &StepInputs,
        max_duration: Duration,
    ) -> Outcome {
        run(&self.client, &self.policy, claimed, inputs, max_duration).await
    }
}

fn client(policy: Arc<OutboundPolicy>) -> Result<reqwest::Client, reqwest::Error> {
    let redirects = policy.clone();
    reqwest::Client::builder()
        .user_agent(concat!("tasker/", env!("CARGO_PKG_VERSION")))
        .no_proxy()
        .dns_resolver(Arc::new(CheckedResolver { policy }))
        .redirect(reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            match redirects.check_url(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(refusal) => attempt.error(refusal),
            }
        }))
        .build()
}

async fn run(
    client: &reqwest::Client,
    policy: &OutboundPolicy,
    claimed: &ClaimedStep,
    inputs: &StepInputs,
    max_duration: Duration,
) -> Outcome {
    let request = match Request::from_config(&claimed.step.config, inputs) {
        Ok(request) => request,
        Err(message) => return misconfigured(message),
    };
    if let Err(refusal) = policy.check_url(&request.url) {
        return refused(&request, &refusal);
    }
    let timeout = claimed
        .step
        .timeout_seconds
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs_f64)
        .min(max_duration);
    let mut builder = client
        .request(request.method.clone(), request.url.clone())
        .timeout(timeout);
    for (name, value) in &request.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    // The step's trace goes on with the call (W3C `traceparent`), when traces are exported.
    for (name, value) in crate::trace::headers_of(&tracing::Span::current()) {
        builder = builder.header(name, value);
    }
    if let Some(body) = &request.body {
        builder = builder.json(body);
    }
    let response = match builder.send().await {
        Ok(response) => response,
        Err(err) => {
            if let Some(refusal) = refusal_in(&err) {
                return refused(&request, refusal);
            }
            let what = if err.is_timeout() {
                format!("no answer within {} s", timeout.as_secs_f64())
            } else {
                "could not connect".to_owned()
            };
            return retry(
                format!("http: {} {}: {what}", request.method_name, request.url),
                None,
            );
        }
    };
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(parse_retry_after);
    let text = response.text().await.unwrap_or_default();
    let summary = format!(
        "http: {} {} answered {status}",
        request.method_name, request.url
    );
    if status.is_success() {
        let results = serde_json::from_str::<Value>(&text)
            .unwrap_or_else(|_| json!({ "status": status.as_u16(), "body": truncate(&text) }));
        return Outcome::Complete(results);
    }
    let code = status.as_u16();
    if code == 429 || code == 503 {
        return retry(summary, retry_after);
    }
    if status.is_client_error() {
        return Outcome::Fail {
            message: format!("{summary}: {}", truncate(&text)),
            retryable: false,
            retry_after_seconds: None,
        };
    }
    retry(format!("{summary}: {}", truncate(&text)), None)
}

fn retry(message: String, retry_after_seconds: Option<f64>) -> Outcome {
    Outcome::Fail {
        message,
        retryable: true,
        retry_after_seconds,
    }
}

/// A destination the policy refuses: final, since retrying cannot change the answer.
fn refused(request: &Request, refusal: &crate::outbound::Refusal) -> Outcome {
    tracing::warn!(url = %request.url, rule = refusal.rule, "http step refused by the outbound policy");
    Outcome::Fail {
        message: format!("http: {} {}: {refusal}", request.method_name, request.url),
        retryable: false,
        retry_after_seconds: None,
    }
}

fn misconfigured(message: String) -> Outcome {
    Outcome::Fail {
        message: format!("http: {message}"),
        retryable: false,
        retry_after_seconds: None,
    }
}

fn truncate(text: &str) -> String {
    text.chars().take(500).collect()
}

/// `Retry-After`: a number of seconds, or an HTTP date.
fn parse_retry_after(value: &str) -> Option<f64> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(seconds as f64);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .map_or(0.0, |wait| wait.as_secs_f64()),
    )
}

/// A request with every placeholder filled in.
struct Request {
    method: reqwest::Method,
    method_name: String,
    url: reqwest::Url,
    headers: Vec<(String, String)>,
    body: Option<Value>,
}

impl Request {
    fn from_config(config: &Value, inputs: &StepInputs) -> Result<Request, String> {
        let scope = json!({
            "context": inputs.context,
            "steps": inputs
                .parent_results
                .iter()
                .map(|(name, results)| (name.clone(), json!({ "results": results })))
                .collect::<Map<String, Value>>(),
        });
        let url = config
            .get("url")
            .and_then(Value::as_str)
            .ok_or("config.url is required (a string)")?;
        let url = fill_text(url, &scope)?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "config.url must start with http:// or https://, got {url:?}"
            ));
        }
        let url = reqwest::Url::parse(&url)
            .map_err(|err| format!("config.url {url:?} is not a URL: {err}"))?;
        let method_name = config
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or(if config.get("body").is_some() {
                "POST"
            } else {
                "GET"
            })
            .to_ascii_uppercase();
        let method = reqwest::Method::from_bytes(method_name.as_bytes())
            .map_err(|_| format!("config.method {method_name:?} is not an HTTP method"))?;
        let mut headers = Vec::new();
        if let Some(map) = config.get("headers") {
            let map = map.as_object().ok_or("config.headers must be an object")?;
            for (name, value) in map {
                let value = value
                    .as_str()
                    .ok_or_else(|| format!("config.headers.{name} must be a string"))?;
                headers.push((name.clone(), fill_text(value, &scope)?));
            }
        }
        let body = config
            .get("body")
            .map(|body| fill_json(body, &scope))
            .transpose()?;
        Ok(Request {
            method,
            method_name,
            url,
            headers,
            body,
        })
    }
}

/// Replaces every `{{ path }}` in a string with the value's text.
fn fill_text(text: &str, scope: &Value) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| format!("unclosed placeholder in {text:?}"))?;
        let value = lookup(after[..end].trim(), scope)?;
        match value {
            Value::String(s) => out.push_str(s),
            other => out.push_str(&other.to_string()),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Fills placeholders in every string of a JSON body; a string that is exactly one
/// placeholder takes the value itself, keeping its type.
fn fill_json(value: &Value, scope: &Value) -> Result<Value, String> {
    Ok(match value {
        Value::String(text) => {
            let trimmed = text.trim();
            let single = trimmed.starts_with("{{")
                && trimmed.ends_with("}}")
                && trimmed[2..].find("{{").is_none();
            if single {
                lookup(trimmed[2..trimmed.len() - 2].trim(), scope)?.clone()
            } else {
                Value::String(fill_text(text, scope)?)
            }
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|item| fill_json(item, scope))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(key, item)| Ok((key.clone(), fill_json(item, scope)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

/// `context.order.id` or `steps.quote.results.total`.
fn lookup<'a>(path: &str, scope: &'a Value) -> Result<&'a Value, String> {
    if !(path.starts_with("context") || path.starts_with("steps.")) {
        return Err(format!(
            "placeholder {{{{ {path} }}}} must start with context or steps.<name>.results"
        ));
    }
    path.split('.')
        .try_fold(scope, |value, key| match value {
            Value::Object(map) => map.get(key),
            Value::Array(items) => key.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        })
        .ok_or_else(|| format!("placeholder {{{{ {path} }}}} has no value"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> StepInputs {
        let mut parents = Map::new();
        parents.insert("quote".into(), json!({ "total": 42, "currency": "EUR" }));
        StepInputs {
            context: json!({ "order": { "id": 7, "items": ["a", "b"] }, "customer": "ada" }),
            namespace: "shop".into(),
            template: "t".into(),
            parent_results: parents,
        }
    }

    #[test]
    fn placeholders_fill_urls_headers_and_bodies_keeping_types() {
        let config = json!({
            "url": "http://127.0.0.1:1/orders/{{ context.order.id }}?who={{context.customer}}",
            "headers": { "x-total": "{{ steps.quote.results.total }}" },
            "body": { "total": "{{ steps.quote.results.total }}", "note": "for {{ context.customer }}",
                      "first": "{{ context.order.items.0 }}" }
        });
        let request = Request::from_config(&config, &inputs()).unwrap();
        assert_eq!(request.url.as_str(), "http://127.0.0.1:1/orders/7?who=ada");
        assert_eq!(request.method_name, "POST");
        assert_eq!(
            request.headers,
            vec![("x-total".to_owned(), "42".to_owned())]
        );
        assert_eq!(
            request.body,
            Some(json!({ "total": 42, "note": "for ada", "first": "a" }))
        );
    }

    #[test]
    fn bad_configs_are_explained() {
        let err = |config: Value| Request::from_config(&config, &inputs()).err().unwrap();
        assert!(err(json!({})).contains("config.url is required"));
        assert!(err(json!({ "url": "ftp://x" })).contains("http:// or https://"));
        assert!(err(json!({ "url": "http://x/{{ context.nope }}" })).contains("has no value"));
        assert!(err(json!({ "url": "http://x/{{ context.order" })).contains("unclosed"));
        assert!(err(json!({ "url": "http://x/{{ secrets.key }}" })).contains("must start with"));
        assert!(
            err(json!({ "url": "http://x", "method": "NOT A METHOD" }))
                .contains("not an HTTP method")
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(parse_retry_after("120"), Some(120.0));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(0.0)
        );
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3600));
        let wait = parse_retry_after(&later).unwrap();
        assert!((3590.0..=3600.0).contains(&wait), "{wait}");
        assert_eq!(parse_retry_after("soon"), None);
    }
}
