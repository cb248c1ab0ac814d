//! Who may use the dashboard: with `--token`, whoever shows it — the cookie the login form
//! sets (so the page, its event stream and its images carry it), or `Authorization: Bearer`
//! (scripts, Prometheus). Compared in constant time. Changes (POST) also need the header
//! `X-Tessera-Dashboard`, which another site's form cannot send, and the cookie is
//! `SameSite=Strict` and `HttpOnly`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::api::{json, ApiError};
use super::Dash;

const COOKIE: &str = "tessera_dashboard";
/// The header every change must carry (see the module doc).
pub const CHANGE_HEADER: &str = "x-tessera-dashboard";
/// A wrong token waits this long before its answer, so guessing is slow.
const WRONG_TOKEN_WAIT: Duration = Duration::from_millis(300);
/// How long a login lasts in the browser.
const LOGIN_SECONDS: u64 = 7 * 24 * 3600;

/// Compares without an early exit, so timing does not tell how much of a guess was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token as it travels in the cookie: hex, so any printable token fits a cookie.
fn cookie_value(token: &str) -> String {
    token.bytes().map(|b| format!("{b:02x}")).collect()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

impl Dash {
    /// Whether a request carries the token (always, when there is none).
    pub fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let by_header = bearer(headers).is_some_and(|t| same(t.as_bytes(), token.as_bytes()));
        let by_cookie =
            cookie(headers).is_some_and(|c| same(c.as_bytes(), cookie_value(token).as_bytes()));
        by_header || by_cookie
    }
}

/// The guard in front of everything but the login page: 401 without the token, 403 for a
/// change without [`CHANGE_HEADER`].
pub async fn require(State(dash): State<Arc<Dash>>, req: Request, next: Next) -> Response {
    if !dash.authorized(req.headers()) {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "the dashboard needs the coordinator's --token: log in at /",
        )
        .into_response();
    }
    if req.method() != Method::GET && !req.headers().contains_key(CHANGE_HEADER) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            format!("changes must come from the dashboard's page (header {CHANGE_HEADER})"),
        )
        .into_response();
    }
    next.run(req).await
}

/// `POST /login` with `{"token": "…"}` (the page's script), or the login form itself as a
/// browser sends it without the script (`token=…`, form-encoded): sets the login cookie when
/// the token is right. The form posts, so the token never travels in an address; a form's
/// login answers with a redirect to the dashboard, the script's with JSON.
pub async fn login(State(dash): State<Arc<Dash>>, headers: HeaderMap, body: Bytes) -> Response {
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/x-www-form-urlencoded"));
    let given = if form {
        url::form_urlencoded::parse(&body)
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned())
    } else {
        serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("token")?.as_str().map(str::to_string))
    }
    .unwrap_or_default();
    let Some(token) = &dash.token else {
        if form {
            return to_dashboard(None);
        }
        return json(
            StatusCode::OK,
            &serde_json::json!({"ok": true, "open": true}),
        );
    };
    if !same(given.as_bytes(), token.as_bytes()) {
        tokio::time::sleep(WRONG_TOKEN_WAIT).await;
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "that is not the coordinator's --token",
        )
        .into_response();
    }
    let secure = if dash.tls { "; Secure" } else { "" };
    let set = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={LOGIN_SECONDS}{secure}",
        cookie_value(token)
    );
    if form {
        to_dashboard(Some(set))
    } else {
        with_cookie(set)
    }
}

/// 303 to the dashboard (`GET /`), setting the cookie `set` on the way.
fn to_dashboard(set: Option<String>) -> Response {
    let mut res = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    if let Some(v) = set.and_then(|s| HeaderValue::from_str(&s).ok()) {
        res.headers_mut().insert(header::SET_COOKIE, v);
    }
    res
}

/// `POST /logout`: forgets the login cookie.
pub async fn logout() -> Response {
    with_cookie(format!(
        "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
    ))
}

fn with_cookie(set: String) -> Response {
    let mut res = json(StatusCode::OK, &serde_json::json!({"ok": true}));
    match HeaderValue::from_str(&set) {
        Ok(v) => {
            res.headers_mut().insert(header::SET_COOKIE, v);
            res
        }
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_token_is_found_in_the_bearer_header_or_the_login_cookie() {
        let h = headers(&[(header::AUTHORIZATION, "Bearer s3cret")]);
        assert_eq!(bearer(&h), Some("s3cret"));
        let c = format!("a=b; {COOKIE}={}; c=d", cookie_value("s3 cret;"));
        let h = headers(&[(header::COOKIE, &c)]);
        assert_eq!(cookie(&h), Some(cookie_value("s3 cret;").as_str()));
        assert_eq!(cookie(&headers(&[(header::COOKIE, "x=1")])), None);
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"abc", b"ab"));
    }
}
