//! The dashboard's HTTP server: its listener (plain, or TLS with the coordinator's
//! certificate), its routes, and the headers every answer carries.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;

use super::{api, assets, auth, events, files, tls, views, Dash, DashboardConfig};
use crate::cluster::lock::Leadership;
use crate::cluster::membership::Members;
use crate::cluster::service::CoordinatorService;
use crate::cluster::{CoordinatorConfig, CoordinatorError};

/// How long open requests (event streams included) may run once the coordinator stops.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// The running dashboard, until [`Dashboard::stop`].
pub struct Dashboard {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    pub local: std::net::SocketAddr,
}

impl Dashboard {
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let mut task = self.task;
        if tokio::time::timeout(STOP_GRACE, &mut task).await.is_err() {
            task.abort();
        }
    }
}

fn listen_error(addr: &str, e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Listen {
        addr: format!("{addr} (--http)"),
        message: e.to_string(),
    }
}

/// Starts serving the dashboard on `http.listen`, with the coordinator's token and TLS.
pub async fn start(
    cfg: &CoordinatorConfig,
    http: &DashboardConfig,
    leader: Arc<Leadership>,
    members: Members,
) -> Result<Dashboard, CoordinatorError> {
    let addr = http.listen.to_string();
    let tcp = tokio::net::TcpListener::bind(http.listen)
        .await
        .map_err(|e| listen_error(&addr, e))?;
    let local = tcp.local_addr().map_err(|e| listen_error(&addr, e))?;
    let tls_files = cfg.tls_cert.as_deref().zip(cfg.tls_key.as_deref());
    let dash = Arc::new(Dash {
        service: CoordinatorService {
            leader: leader.clone(),
            max_queued: cfg.max_queued,
        },
        leader,
        members,
        token: cfg.token.clone().filter(|t| !t.is_empty()),
        max_queued: cfg.max_queued,
        parse_submit: http.parse_submit,
        tls: tls_files.is_some(),
        seen: Mutex::new(views::SeenWorkers::default()),
        changed: tokio::sync::watch::channel(0).0,
    });
    let app = router(dash);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let stopped = async move {
        let _ = stopped.await;
    };
    let task = match tls_files {
        Some((cert, key)) => {
            let acceptor = tls::acceptor(cert, key).map_err(CoordinatorError::Config)?;
            let listener = tls::TlsListener::new(tcp, acceptor, local);
            tokio::spawn(async move {
                let served = axum::serve(listener, app).with_graceful_shutdown(stopped);
                if let Err(e) = served.await {
                    tracing::error!("the dashboard stopped: {e}");
                }
            })
        }
        None => tokio::spawn(async move {
            let served = axum::serve(tcp, app).with_graceful_shutdown(stopped);
            if let Err(e) = served.await {
                tracing::error!("the dashboard stopped: {e}");
            }
        }),
    };
    let scheme = if tls_files.is_some() { "https" } else { "http" };
    tessera_worker::status!("dashboard on {scheme}://{local}/");
    Ok(Dashboard { stop, task, local })
}

/// Every route. Only `/`, `/login`, `/logout` and the login page's own files are served
/// without the token; `/` answers the login page until the token is given.
fn router(dash: Arc<Dash>) -> Router {
    let guarded = Router::new()
        .route("/app.js", get(assets::app_js))
        .route("/viewer.js", get(assets::viewer_js))
        .route("/api/overview", get(api::overview))
        .route("/api/jobs", get(api::jobs).post(api::submit))
        .route("/api/jobs/{id}", get(api::job))
        .route("/api/jobs/{id}/cancel", post(api::cancel))
        .route("/api/jobs/{id}/priority", post(api::priority))
        .route("/api/jobs/{id}/requeue", post(api::requeue))
        .route("/api/jobs/{id}/preview.png", get(files::preview))
        .route("/api/jobs/{id}/images/{n}", get(files::image))
        .route("/api/jobs/{id}/images/{n}/dzi", get(files::dzi))
        .route(
            "/api/jobs/{id}/images/{n}/tiles/{level}/{tile}",
            get(files::tile),
        )
        .route("/api/workers", get(api::workers))
        .route("/api/events", get(events::stream))
        .route_layer(middleware::from_fn_with_state(dash.clone(), auth::require));
    // Prometheus scrapes `/metrics` with `Authorization: Bearer` (its own check, the same
    // token), so it sits beside the cookie-guarded routes rather than behind them.
    let metrics = crate::metrics::router(dash.token.as_deref());
    Router::new()
        .route("/", get(assets::index))
        .route("/login", post(auth::login))
        .route("/logout", post(auth::logout))
        .route("/login.js", get(assets::login_js))
        .route("/style.css", get(assets::style_css))
        .merge(guarded)
        .layer(middleware::from_fn(headers))
        .with_state(dash)
        .merge(metrics)
}

/// Headers on every answer: no framing by other sites, no content sniffing, scripts and
/// styles from this server only, nothing cached unless the handler says otherwise.
async fn headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    let fixed = [
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; \
             frame-ancestors 'none'; form-action 'self'",
        ),
    ];
    for (name, value) in fixed {
        h.insert(name, HeaderValue::from_static(value));
    }
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    res
}
