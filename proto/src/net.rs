//! Channels and server TLS: how clients, the coordinator and workers reach each other.
//! Plain HTTP/2 by default; rustls when a CA (clients) or a certificate and key (servers)
//! are given.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{url:?} is not a usable address ({message}); write it like http://host:7070")]
    BadUrl { url: String, message: String },
    #[error("TLS settings for {url}: {message}")]
    Tls { url: String, message: String },
    #[error(
        "{url} is plaintext http://, but a CA certificate ({flag}) was given for TLS: write \
         https://{rest} to use TLS, or drop {flag} to connect without it"
    )]
    PlaintextWithTls {
        url: String,
        rest: String,
        flag: &'static str,
    },
    #[error(
        "{url} is https:// but no CA certificate was given: pass {flag} with the CA (PEM) that \
         signed the server's certificate"
    )]
    TlsWithoutCa { url: String, flag: &'static str },
    #[error("setting up the gRPC server: {0}")]
    Server(String),
}

fn read(path: &Path) -> Result<Vec<u8>, NetError> {
    std::fs::read(path).map_err(|source| NetError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The server's TLS identity from PEM files.
pub fn server_tls(cert: &Path, key: &Path) -> Result<ServerTlsConfig, NetError> {
    let identity = Identity::from_pem(read(cert)?, read(key)?);
    Ok(ServerTlsConfig::new().identity(identity))
}

/// Client settings: the CA that signed the servers' certificates, when TLS is on.
#[derive(Debug, Clone, Default)]
pub struct ClientNet {
    pub ca: Option<PathBuf>,
    /// How long connecting may take.
    pub connect_timeout: Option<Duration>,
    /// How long a call may wait for its answer (a stream's first message, not the whole
    /// stream); `None`: no limit.
    pub call_timeout: Option<Duration>,
    /// The flag that sets `ca`, for messages (`--tls-ca` when empty).
    pub ca_flag: &'static str,
}

impl ClientNet {
    fn flag(&self) -> &'static str {
        if self.ca_flag.is_empty() {
            "--tls-ca"
        } else {
            self.ca_flag
        }
    }
}

/// Whether `url` names the scheme `scheme` (`http`, `https`), whatever its case.
fn has_scheme(url: &str, scheme: &str) -> bool {
    url.split_once("://")
        .is_some_and(|(s, _)| s.eq_ignore_ascii_case(scheme))
}

/// Refuses TLS settings with a plaintext URL and an https URL without a CA: never a silent
/// plaintext connection, and never a TLS one that cannot check the server.
pub fn check_scheme(url: &str, net: &ClientNet) -> Result<(), NetError> {
    let full = normalize_url(url, net.ca.is_some());
    if net.ca.is_some() && has_scheme(&full, "http") {
        let rest = full.split_once("://").map_or("", |(_, r)| r).to_string();
        return Err(NetError::PlaintextWithTls {
            url: url.to_string(),
            rest,
            flag: net.flag(),
        });
    }
    if net.ca.is_none() && has_scheme(&full, "https") {
        return Err(NetError::TlsWithoutCa {
            url: url.to_string(),
            flag: net.flag(),
        });
    }
    Ok(())
}

/// Accepts `host:port` as well as full URLs; `https://` is implied when a CA is given.
pub fn normalize_url(url: &str, tls: bool) -> String {
    if url.contains("://") {
        url.to_string()
    } else if tls {
        format!("https://{url}")
    } else {
        format!("http://{url}")
    }
}

/// An endpoint for `url`, lazily connected (the first call connects, and a broken connection
/// is re-established by the next call).
pub fn endpoint(url: &str, net: &ClientNet) -> Result<Endpoint, NetError> {
    check_scheme(url, net)?;
    let full = normalize_url(url, net.ca.is_some());
    let mut ep = Endpoint::from_shared(full.clone()).map_err(|e| NetError::BadUrl {
        url: url.to_string(),
        message: e.to_string(),
    })?;
    ep = ep
        .connect_timeout(net.connect_timeout.unwrap_or(Duration::from_secs(5)))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    if let Some(limit) = net.call_timeout {
        ep = ep.timeout(limit);
    }
    if let Some(ca) = &net.ca {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        ep = ep.tls_config(tls).map_err(|e| NetError::Tls {
            url: full,
            message: e.to_string(),
        })?;
    }
    Ok(ep)
}

/// A lazily connected channel to `url`.
pub fn channel(url: &str, net: &ClientNet) -> Result<Channel, NetError> {
    Ok(endpoint(url, net)?.connect_lazy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_get_a_scheme() {
        assert_eq!(normalize_url("host:1", false), "http://host:1");
        assert_eq!(normalize_url("host:1", true), "https://host:1");
        assert_eq!(normalize_url("http://h:2", true), "http://h:2");
    }

    #[test]
    fn bad_urls_and_missing_files_are_named() {
        let err = endpoint("http://bad host", &ClientNet::default()).unwrap_err();
        assert!(err.to_string().contains("bad host"), "{err}");
        let net = ClientNet {
            ca: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let err = endpoint("h:1", &net).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn tls_settings_never_fall_back_to_plaintext() {
        let tls = ClientNet {
            ca: Some("/ca.pem".into()),
            ..Default::default()
        };
        let err = endpoint("http://h:7070", &tls).unwrap_err().to_string();
        assert!(
            err.contains("https://h:7070") && err.contains("--tls-ca"),
            "{err}"
        );
        let err = endpoint("HTTP://h:7070", &tls).unwrap_err().to_string();
        assert!(err.contains("plaintext"), "{err}");
        let err = endpoint("https://h:7070", &ClientNet::default()).unwrap_err();
        assert!(err.to_string().contains("no CA certificate"), "{err}");
        let worker = ClientNet {
            ca_flag: "--worker-ca",
            ..tls
        };
        let err = check_scheme("http://w:1", &worker).unwrap_err().to_string();
        assert!(err.contains("--worker-ca"), "{err}");
        assert!(check_scheme("w:1", &worker).is_ok());
        assert!(check_scheme("http://w:1", &ClientNet::default()).is_ok());
    }
}
