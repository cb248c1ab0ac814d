//! Models with random weights, for tests, benchmarks and trials without a download: the real
//! architectures' code, configured and filled with random numbers.
//! - [`tiny`]: tiny SDXL and SD 2.1 models written to disk (`tessera model synth`);
//! - [`full_size`]: the published SDXL and SD 2.1 sizes, weights made on the device at load
//!   (`--model synthetic:sdxl`);
//! - [`diffusers_dir`]: writes either as a diffusers model directory;
//! - [`tiny_vocab`]: the small CLIP vocabulary both use as their tokenizer.

pub mod diffusers_dir;
pub mod full_size;
pub mod tiny;
pub mod tiny_vocab;
