//! Model code: the diffusers components re-implemented in candle, their loader and the
//! tiny-model synthesizer used by tests.
pub mod loader;
pub mod diffusion;
pub mod synth;
