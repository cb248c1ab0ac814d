//! Bearer tokens: servers configured with a token refuse calls that do not carry it; clients
//! attach theirs to every call. A worker's server takes a token that changes: the call token
//! it gave the coordinator it joined ([`RequireCallToken`]).

use std::sync::{Arc, RwLock};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Server side: checks `authorization: Bearer <token>` when a token is configured.
#[derive(Clone, Default)]
pub struct RequireToken {
    expected: Option<Arc<[u8]>>,
}

impl RequireToken {
    pub fn new(token: Option<&str>) -> Self {
        Self {
            expected: token
                .filter(|t| !t.is_empty())
                .map(|t| Arc::from(format!("Bearer {t}").into_bytes())),
        }
    }
}

impl RequireToken {
    /// Whether an `authorization` header value (any transport: gRPC metadata, an HTTP
    /// header such as the metrics endpoint's) passes: always without a configured token.
    pub fn accepts(&self, given: Option<&[u8]>) -> bool {
        match (&self.expected, given) {
            (None, _) => true,
            (Some(expected), Some(given)) => constant_time_eq(given, expected),
            (Some(_), None) => false,
        }
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(req);
        };
        match req.metadata().get("authorization") {
            None => Err(Status::unauthenticated(
                "this server needs a token: pass --token or set TESSERA_TOKEN",
            )),
            Some(given) if constant_time_eq(given.as_bytes(), expected) => Ok(req),
            Some(_) => Err(Status::unauthenticated(
                "the token is wrong: check --token or TESSERA_TOKEN",
            )),
        }
    }
}

/// Server side for a worker: requires the call token of its current membership, and refuses
/// every call before it has joined a coordinator. Clones share the token, so the join loop sets
/// it and the server's interceptor sees it.
#[derive(Clone, Default)]
pub struct RequireCallToken {
    expected: Arc<RwLock<Option<Arc<[u8]>>>>,
}

impl RequireCallToken {
    /// From now on, only calls carrying `token` are served (the previous one stops working).
    pub fn set(&self, token: &str) {
        let value = Arc::from(format!("Bearer {token}").into_bytes());
        *self.expected.write().unwrap_or_else(|p| p.into_inner()) = Some(value);
    }
}

impl Interceptor for RequireCallToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let expected = self
            .expected
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(expected) = expected else {
            return Err(Status::unavailable(
                "this worker has not joined a coordinator yet",
            ));
        };
        match req.metadata().get("authorization") {
            Some(given) if constant_time_eq(given.as_bytes(), &expected) => Ok(req),
            _ => Err(Status::unauthenticated(
                "only the coordinator this worker joined may call it",
            )),
        }
    }
}

/// Compares without an early exit, so response times do not reveal how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Client side: adds the token to every call.
#[derive(Clone, Default)]
pub struct AttachToken {
    header: Option<MetadataValue<Ascii>>,
}

#[derive(Debug, thiserror::Error)]
#[error("the token holds characters that cannot go in a gRPC header; use printable ASCII")]
pub struct BadToken;

impl AttachToken {
    pub fn new(token: Option<&str>) -> Result<Self, BadToken> {
        let header = match token.filter(|t| !t.is_empty()) {
            None => None,
            Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| BadToken)?),
        };
        Ok(Self { header })
    }
}

impl Interceptor for AttachToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(check: &mut RequireToken, header: Option<&str>) -> Result<(), tonic::Code> {
        let mut req = Request::new(());
        if let Some(h) = header {
            req.metadata_mut()
                .insert("authorization", h.parse().unwrap());
        }
        check.call(req).map(|_| ()).map_err(|s| s.code())
    }

    #[test]
    fn an_http_authorization_header_passes_as_the_grpc_one_does() {
        assert!(RequireToken::new(None).accepts(None));
        let closed = RequireToken::new(Some("s3cret"));
        assert!(closed.accepts(Some(b"Bearer s3cret")));
        assert!(!closed.accepts(Some(b"Bearer s3cre")));
        assert!(!closed.accepts(Some(b"s3cret")));
        assert!(!closed.accepts(None));
    }

    #[test]
    fn tokens_are_checked_only_when_configured() {
        let mut open = RequireToken::new(None);
        assert_eq!(call(&mut open, None), Ok(()));
        let mut closed = RequireToken::new(Some("s3cret"));
        assert_eq!(call(&mut closed, Some("Bearer s3cret")), Ok(()));
        assert_eq!(call(&mut closed, None), Err(tonic::Code::Unauthenticated));
        assert_eq!(
            call(&mut closed, Some("Bearer s3cre")),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            call(&mut closed, Some("s3cret")),
            Err(tonic::Code::Unauthenticated)
        );
    }

    fn with_token(check: &mut RequireCallToken, token: &str) -> Result<(), tonic::Code> {
        let mut attach = AttachToken::new(Some(token)).unwrap();
        let req = attach.call(Request::new(())).unwrap();
        check.call(req).map(|_| ()).map_err(|s| s.code())
    }

    #[test]
    fn a_worker_takes_only_its_current_call_token() {
        let mut check = RequireCallToken::default();
        assert_eq!(with_token(&mut check, "a"), Err(tonic::Code::Unavailable));
        let join = check.clone();
        join.set("first");
        assert_eq!(with_token(&mut check, "first"), Ok(()));
        assert_eq!(
            with_token(&mut check, "other"),
            Err(tonic::Code::Unauthenticated)
        );
        join.set("second");
        assert_eq!(
            with_token(&mut check, "first"),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(with_token(&mut check, "second"), Ok(()));
        let bare = check
            .call(Request::new(()))
            .map(|_| ())
            .map_err(|s| s.code());
        assert_eq!(bare, Err(tonic::Code::Unauthenticated));
    }

    #[test]
    fn clients_attach_what_servers_expect() {
        let mut attach = AttachToken::new(Some("abc")).unwrap();
        let req = attach.call(Request::new(())).unwrap();
        let mut check = RequireToken::new(Some("abc"));
        assert!(check.call(req).is_ok());
        assert!(AttachToken::new(Some("bad\ntoken")).is_err());
    }
}
