//! The page's files, embedded in the binary: nothing is loaded from elsewhere.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};

use super::Dash;

const INDEX: &str = include_str!("assets/index.html");
const LOGIN: &str = include_str!("assets/login.html");
const APP_JS: &str = include_str!("assets/app.js");
const VIEWER_JS: &str = include_str!("assets/viewer.js");
const LOGIN_JS: &str = include_str!("assets/login.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

fn file(kind: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}

/// `GET /`: the dashboard, or the login page until the token is given.
pub async fn index(State(dash): State<Arc<Dash>>, headers: HeaderMap) -> Response {
    let page = if dash.authorized(&headers) {
        INDEX
    } else {
        LOGIN
    };
    file("text/html; charset=utf-8", page)
}

pub async fn app_js() -> Response {
    file("text/javascript; charset=utf-8", APP_JS)
}

pub async fn viewer_js() -> Response {
    file("text/javascript; charset=utf-8", VIEWER_JS)
}

pub async fn login_js() -> Response {
    file("text/javascript; charset=utf-8", LOGIN_JS)
}

pub async fn style_css() -> Response {
    file("text/css; charset=utf-8", STYLE_CSS)
}
