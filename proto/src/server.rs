//! What every Tessera server runs beside its own service: TLS when configured, gRPC health
//! (left open for load balancers and probes) and reflection (behind the token, like the
//! service itself), so `grpcurl` works against coordinator and workers alike.

use std::path::Path;

use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::Router;
use tonic::transport::Server;

use crate::auth::RequireToken;
use crate::net::{server_tls, NetError};

/// A router serving health (reporting `S` as serving) and reflection; the caller adds `S`.
pub async fn router<S: NamedService>(
    tls: Option<(&Path, &Path)>,
    token: &RequireToken,
) -> Result<Router, NetError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<S>().await;
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
    Ok(server
        .add_service(health_service)
        .add_service(InterceptedService::new(reflection, token.clone())))
}
