//! Models with random weights, for tests, benchmarks and trials without a download: the real
//! architectures' code, configured and filled with random numbers.
//! - [`tiny`]: tiny SDXL, SD 2.1 and SD3 models written to disk (`tessera model synth`);
//! - [`full_size`]: the published SDXL, SD 2.1 and SD3 medium sizes, weights made on the
//!   device at load (`--model synthetic:sdxl`);
//! - [`diffusers_dir`]: writes a UNet model as a diffusers model directory, [`sd3_dir`] an
//!   SD3 one;
//! - [`streamed`]: either size of SDXL or SD 2.1 written one tensor at a time, as a diffusers
//!   directory or one original-layout file (`model synth --layout`), through
//!   [`safetensors_stream`];
//! - [`tiny_vocab`]: the small CLIP vocabulary both use as their tokenizer.

pub mod diffusers_dir;
pub mod full_size;
pub mod safetensors_stream;
pub mod sd3_dir;
pub mod streamed;
pub mod tiny;
pub mod tiny_vocab;
