//! The worker side of Tessera: model code (UNet, VAE, CLIP), the methods' hooks into the UNet,
//! models with random weights, devices, and the tasks a worker runs.
pub mod device;
pub mod fingerprint;
pub mod gpu;
pub mod hooks;
pub mod lora_models;
pub mod metrics;
pub mod model;
pub mod random_models;
pub mod service;
pub mod simulate;
pub mod status;
pub mod tasks;
pub mod unet_bench;
