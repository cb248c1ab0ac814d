//! Tessera's wire contract: the code generated from `tessera.proto`, and what every connection
//! shares — the bearer token ([`auth`]), TLS and channel settings ([`net`]) and the health and reflection
//! services every server runs ([`server`]).

pub mod auth;
pub mod net;
pub mod server;

/// Generated messages, clients and servers of package `tessera.v1`.
pub mod v1 {
    tonic::include_proto!("tessera.v1");
}

/// The encoded descriptors of `tessera.proto`, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tessera_descriptor");
