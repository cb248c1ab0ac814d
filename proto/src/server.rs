//! What every Tessera server runs beside its own service: TLS when configured, gRPC health
//! (left open for load balancers and probes) and reflection (behind the token, like the
//! service itself), so `grpcurl` works against coordinator and workers alike.

use std::path::Path;

use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::Router;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::auth::RequireToken;
use crate::net::{server_tls, NetError};

/// A router serving health and reflection; the caller adds `S`. Health reports `S` (and the
/// server as a whole, the empty service name that probes ask about) as serving when `serving`,
/// else as NOT_SERVING until the caller says otherwise through the returned reporter (a
/// standby coordinator).
pub async fn router<S: NamedService>(
    tls: Option<(&Path, &Path)>,
    token: &RequireToken,
    serving: bool,
) -> Result<(Router, HealthReporter), NetError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    set_serving::<S>(&health, serving).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| NetError::Server(e.to_string()))?;
    let mut server = Server::builder();
    if let Some((cert, key)) = tls {
        server = server
            .tls_config(server_tls(cert, key)?)
            .map_err(|e| NetError::Server(e.to_string()))?;
    }
    let router = server
        .add_service(health_service)
        .add_service(InterceptedService::new(reflection, token.clone()));
    Ok((router, health))
}

/// Reports `S` and the server as a whole as serving or not.
pub async fn set_serving<S: NamedService>(health: &HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health.set_service_status("", status).await;
    health.set_service_status(S::NAME, status).await;
}
