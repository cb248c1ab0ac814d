//! Real local processes for the cross-process tests and `tessera bench`: a scratch
//! `redis-server` (with AOF, a password or TLS) that can be killed and restarted, and the
//! certificates for TLS tests. Nothing here is linked into a worker or the maths.
mod redis_server;

pub use redis_server::{make_certificates, RedisServer, RedisServerOptions};
