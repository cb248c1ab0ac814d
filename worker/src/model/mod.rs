//! Model code: the diffusers components re-implemented in candle (UNet and its blocks, VAE,
//! CLIP text encoder and tokenizer), their loader, what planning reads from a model directory
//! (`arch`) and the UNet's FLOP count (`flops`). Methods plug in through [`crate::hooks`];
//! models with random weights are written by [`crate::random_models`].
pub mod arch;
pub mod attention;
pub mod blocks;
pub mod denoiser;
pub mod diffusion;
pub mod flops;
pub mod loader;
pub mod lora;
pub mod norm;
pub mod resnet;
pub mod sd3;
pub mod single_file;
pub mod t5;
pub mod text;
pub mod tokenizer;
pub mod unet;
pub mod vae;
