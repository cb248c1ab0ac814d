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
    /// Per-call limit for unary calls; streams are not limited.
    pub connect_timeout: Option<Duration>,
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
}
