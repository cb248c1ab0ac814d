//! The worker side of Tessera: model code (UNet, VAE, CLIP), devices, and the tasks a worker runs.
pub mod device;
pub mod model;
pub mod service;
pub mod simulate;
pub mod tasks;
pub mod unet_bench;
