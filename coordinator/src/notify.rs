//! Notifications for overnight work: when a job finishes, fails or is cancelled, the
//! coordinator POSTs a JSON message to the job's `submit --notify` URL and to its own
//! `--notify` URL (a chat webhook, an alerting relay).
//!
//! Delivery runs on its own task, off the job's thread: a notification never delays or fails
//! a job. Each URL gets a bounded number of attempts with exponential backoff (a 5xx, 429, a
//! refused or timed-out connection is retried; another 4xx is not); every outcome is logged
//! and counted (`tessera_notifications_total`).

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::Serialize;

use crate::cluster::jobs::{JobRecord, JobState};

/// One attempt's limit: connecting, the TLS handshake, sending and the answer's head.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The wait before the second attempt; it doubles with each further one, up to [`MAX_WAIT`].
const FIRST_WAIT: Duration = Duration::from_millis(500);
const MAX_WAIT: Duration = Duration::from_secs(60);
/// Attempts per URL unless `--notify-attempts` says otherwise.
pub const DEFAULT_ATTEMPTS: u32 = 6;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum NotifyUrlError {
    #[error("--notify {0:?} is not a URL ({1}): give an http:// or https:// URL")]
    Parse(String, String),
    #[error(
        "--notify {0:?}: only http:// and https:// URLs are accepted (a webhook's URL), not {1}://"
    )]
    Scheme(String, String),
    #[error("--notify {0:?}: the URL names no host")]
    NoHost(String),
}

/// Checks a notification URL: http or https, with a host. Returns it parsed.
pub fn check_url(text: &str) -> Result<url::Url, NotifyUrlError> {
    let url = url::Url::parse(text.trim())
        .map_err(|e| NotifyUrlError::Parse(text.into(), e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(NotifyUrlError::Scheme(text.into(), url.scheme().into()));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(NotifyUrlError::NoHost(text.into()));
    }
    Ok(url)
}

/// The message posted: what a person needs to know in the morning.
#[derive(Debug, Clone, Serialize)]
pub struct JobMessage {
    pub job_id: String,
    /// `succeeded`, `failed` or `cancelled`.
    pub state: String,
    pub error: Option<String>,
    /// Where the images are on the coordinator (and the client's copy, if one was asked for),
    /// and the command that downloads them.
    pub outputs: Vec<String>,
    pub fetch: Option<String>,
    pub elapsed_seconds: f64,
    pub model: String,
    /// The spec in words: size, steps, method, seed, prompt.
    pub summary: String,
    /// A line for a chat webhook that shows `text` (Slack, Mattermost, Rocket.Chat).
    pub text: String,
}

impl JobMessage {
    /// The message for a job that ended, its images kept under `images` (one per image, for
    /// a job that succeeded).
    pub fn ended(record: &JobRecord, images: Vec<String>) -> Self {
        let state = record.state.to_string();
        let spec = &record.spec;
        let elapsed_ms = record.finished_ms - record.started_ms.max(record.created_ms);
        let summary = format!(
            "{}x{}, {} steps, {} over {} stage(s), seed {}, {} image(s), prompt {:?}",
            spec.width,
            spec.height,
            spec.steps,
            record.plan.method,
            record.plan.stages.len(),
            spec.seed,
            record.count,
            spec.prompt
        );
        let succeeded = record.state == JobState::Succeeded;
        let mut text = format!("Tessera job {} {state}: {summary}", record.id);
        if let Some(e) = &record.error {
            text.push_str(&format!(" — {e}"));
        }
        let mut outputs = images;
        if let (true, Some(dir)) = (succeeded, &record.output_dir) {
            outputs.push(format!("copied under {dir}"));
        }
        JobMessage {
            job_id: record.id.clone(),
            state,
            error: record.error.clone(),
            outputs,
            fetch: succeeded.then(|| format!("tessera fetch {}", record.id)),
            elapsed_seconds: elapsed_ms.max(0) as f64 / 1e3,
            model: record.model.clone(),
            summary,
            text,
        }
    }
}

/// How notifications are delivered.
#[derive(Debug, Clone)]
pub struct Notifier {
    /// The coordinator's own `--notify` URL, for every job.
    pub everyone: Option<url::Url>,
    pub attempts: u32,
}

impl Notifier {
    /// Posts `message` to the job's URL (when it has one) and the coordinator's, each on its
    /// own task of `runtime`; returns at once.
    pub fn send(&self, runtime: &tokio::runtime::Handle, job_url: Option<&str>, m: JobMessage) {
        let mut urls: Vec<url::Url> = self.everyone.iter().cloned().collect();
        if let Some(text) = job_url.filter(|u| !u.is_empty()) {
            match check_url(text) {
                Ok(u) if !urls.contains(&u) => urls.push(u),
                Ok(_) => {}
                // Checked at submission; a record from elsewhere is logged, not trusted.
                Err(e) => tracing::warn!(job = %m.job_id, "no notification: {e}"),
            }
        }
        let body = match serde_json::to_vec(&m) {
            Ok(b) => Bytes::from(b),
            Err(e) => return tracing::warn!(job = %m.job_id, "cannot encode the notification: {e}"),
        };
        for url in urls {
            let (body, job, attempts) = (body.clone(), m.job_id.clone(), self.attempts.max(1));
            runtime.spawn(async move { deliver(url, body, &job, attempts).await });
        }
    }
}

/// Tries `url` up to `attempts` times, waiting longer after each failure.
async fn deliver(url: url::Url, body: Bytes, job: &str, attempts: u32) {
    let shown = redacted(&url);
    let mut wait = FIRST_WAIT;
    for attempt in 1..=attempts {
        let outcome = tokio::time::timeout(ATTEMPT_TIMEOUT, post(&url, body.clone())).await;
        let why = match outcome {
            Ok(Ok(status)) if status.is_success() => {
                tracing::info!(job, url = %shown, attempt, "notification delivered");
                super::metrics::coordinator().notification("delivered");
                return;
            }
            Ok(Ok(status)) if !retryable(status) => {
                tracing::warn!(job, url = %shown, "notification refused with {status}; not retried");
                super::metrics::coordinator().notification("failed");
                return;
            }
            Ok(Ok(status)) => format!("answered {status}"),
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs()),
        };
        if attempt == attempts {
            tracing::warn!(job, url = %shown, "notification not delivered after {attempts} attempts: {why}; giving up");
            tessera_worker::status!(
                "job {job}: notification to {shown} not delivered after {attempts} attempts: {why}"
            );
            super::metrics::coordinator().notification("failed");
            return;
        }
        tracing::info!(job, url = %shown, attempt, "notification failed ({why}); retrying in {wait:?}");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(MAX_WAIT);
    }
}

/// Server trouble and rate limits pass; other refusals would only repeat.
fn retryable(status: hyper::StatusCode) -> bool {
    status.is_server_error()
        || status == hyper::StatusCode::TOO_MANY_REQUESTS
        || status == hyper::StatusCode::REQUEST_TIMEOUT
}

/// The URL for logs: without a password or query (a webhook's secret often sits in either).
fn redacted(url: &url::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_password(None);
    u.set_query(None);
    u.to_string()
}

/// One POST of `body` as JSON; returns the answer's status.
async fn post(url: &url::Url, body: Bytes) -> Result<hyper::StatusCode, String> {
    let host = url.host_str().unwrap_or_default().to_string();
    let port = url.port_or_known_default().unwrap_or(80);
    let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
    let request = request(url, &host, body)?;
    if url.scheme() == "https" {
        let tls = tls_connect(&host, tcp).await?;
        send(TokioIo::new(tls), request).await
    } else {
        send(TokioIo::new(tcp), request).await
    }
}

fn request(url: &url::Url, host: &str, body: Bytes) -> Result<hyper::Request<Full<Bytes>>, String> {
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    let authority = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    let mut req = hyper::Request::post(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("tessera/", env!("CARGO_PKG_VERSION")),
        );
    if !url.username().is_empty() {
        let password = url.password().unwrap_or("");
        let credentials = basic_auth(url.username(), password);
        req = req.header(hyper::header::AUTHORIZATION, credentials);
    }
    req.body(Full::new(body)).map_err(|e| e.to_string())
}

async fn send<IO>(io: IO, request: hyper::Request<Full<Bytes>>) -> Result<hyper::StatusCode, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("sending: {e}"))?;
    let status = response.status();
    // Read the answer to its end so the server sees a clean exchange; its content is unused.
    let _ = response.into_body().collect().await;
    Ok(status)
}

/// A TLS client over `tcp`, checking the server against the system's root certificates.
async fn tls_connect(
    host: &str,
    tcp: tokio::net::TcpStream,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_string())
        .map_err(|e| format!("{host}: not a server name: {e}"))?;
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {host}: {e}"))
}

/// HTTP basic credentials from a URL's user info (`https://user:pass@host/…`).
fn basic_auth(user: &str, password: &str) -> String {
    use base64::Engine;
    let pair = format!("{user}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_and_https_urls_with_a_host_are_accepted() {
        assert!(check_url("https://hooks.example.com/services/T0/B0/x").is_ok());
        assert!(check_url("http://127.0.0.1:9000/hook").is_ok());
        let e = check_url("ftp://example.com/x").unwrap_err();
        assert!(e.to_string().contains("only http:// and https://"), "{e}");
        assert!(check_url("file:///etc/passwd").is_err());
        assert!(check_url("not a url")
            .unwrap_err()
            .to_string()
            .contains("not a URL"));
        assert!(check_url("http://").is_err());
    }

    #[test]
    fn logs_never_show_a_webhooks_secret() {
        let u = check_url("https://user:secret@example.com/hook?token=abc").unwrap();
        let shown = redacted(&u);
        assert!(
            !shown.contains("secret") && !shown.contains("abc"),
            "{shown}"
        );
    }

    #[test]
    fn credentials_in_the_url_become_basic_authorization() {
        let expected = "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==";
        assert_eq!(basic_auth("Aladdin", "open sesame"), expected);
    }

    /// A listener answering every request with `status`; counts the requests.
    fn answering(status: &'static str) -> (String, std::sync::Arc<std::sync::atomic::AtomicU32>) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let count = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let seen = count.clone();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = write!(conn, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
            }
        });
        (url, count)
    }

    #[test]
    fn a_refusal_is_not_retried_and_server_trouble_is_until_the_attempts_run_out() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let body = Bytes::from_static(b"{}");
        let (url, refused) = answering("404 Not Found");
        rt.block_on(deliver(check_url(&url).unwrap(), body.clone(), "j", 3));
        assert_eq!(refused.load(std::sync::atomic::Ordering::SeqCst), 1);
        let (url, troubled) = answering("502 Bad Gateway");
        rt.block_on(deliver(check_url(&url).unwrap(), body, "j", 2));
        assert_eq!(troubled.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn server_trouble_is_retried_and_refusals_are_not() {
        assert!(retryable(hyper::StatusCode::BAD_GATEWAY));
        assert!(retryable(hyper::StatusCode::TOO_MANY_REQUESTS));
        assert!(!retryable(hyper::StatusCode::NOT_FOUND));
    }
}
