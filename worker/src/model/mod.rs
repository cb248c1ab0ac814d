//! Model code: the diffusers components re-implemented in candle, their loader and the
//! tiny-model synthesizer used by tests.
pub mod arch;
pub mod attention;
pub mod blocks;
pub mod denoiser;
pub mod diffusion;
pub mod flops;
pub mod hooks;
pub mod loader;
pub mod norm;
pub mod resnet;
pub mod synth;
pub mod synthetic;
pub mod text;
pub mod tokenizer;
pub mod unet;
pub mod vae;
