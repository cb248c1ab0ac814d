//! Model code: the diffusers components re-implemented in candle, their loader and the
//! tiny-model synthesizer used by tests.
pub mod loader;
pub mod diffusion;
pub mod synth;
pub mod vae;
pub mod text;
pub mod tokenizer;
pub mod resnet;
pub mod attention;
pub mod blocks;
pub mod unet;
pub mod hooks;
