//! The coordinator: runs jobs (planning, the sampling loop, guidance, assembly) and hosts the
//! `tessera` command line.
pub mod assemble;
pub mod bench;
pub mod cli;
pub mod cluster;
pub mod dashboard;
pub mod dispatch;
pub mod engine;
pub mod image_input;
pub mod latent_file;
pub mod metrics;
pub mod notify;
pub mod preview;
pub mod sync;
