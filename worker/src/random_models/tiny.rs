//! `tessera model synth`: tiny models of the real architectures (SDXL, SD 2.1, SD3) with random
//! weights, written to disk for tests, benchmarks and trials without a download. Training size
//! 128 px; the weights are drawn from a seed, so the same seed writes the same bytes.

use std::fs;
use std::path::Path;

use serde_json::json;
use tessera_core::family::{Family, NamedModel, TINY_MODELS};

use super::diffusers_dir::{io_err, pretty, write_file, write_model, Size, SYNTH_MARKER};
use super::sd3_dir::write_sd3_model;
use crate::model::loader::{ModelError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyArch {
    SdxlTiny,
    Sd21Tiny,
    Sd3Tiny,
}

impl TinyArch {
    /// The tiny model of `family` in the family table.
    pub fn of_family(family: Family) -> Self {
        match family {
            Family::Sdxl => TinyArch::SdxlTiny,
            Family::Sd2 => TinyArch::Sd21Tiny,
            Family::Sd3 => TinyArch::Sd3Tiny,
        }
    }

    pub fn family(&self) -> Family {
        match self {
            TinyArch::SdxlTiny => Family::Sdxl,
            TinyArch::Sd21Tiny => Family::Sd2,
            TinyArch::Sd3Tiny => Family::Sd3,
        }
    }

    /// Its name in the family table (`model synth --arch NAME`).
    pub fn name(&self) -> &'static str {
        NamedModel::of_family(&TINY_MODELS, self.family())
            .map(|m| m.name)
            .expect("every family has a tiny model")
    }
}

/// Training size of the tiny models, in latent pixels (128 pixels).
pub const TINY_SAMPLE_SIZE: usize = 16;

/// Writes a complete tiny model into `out`, which must be absent, empty, or an earlier
/// synthesized model (replaced).
pub fn synthesize(arch: TinyArch, out: &Path, seed: u64) -> Result<()> {
    prepare_dir(out)?;
    // The marker goes first, so an interrupted synthesis can still be replaced.
    write_file(
        &out.join(SYNTH_MARKER),
        &pretty(&json!({ "arch": arch.name(), "seed": seed })),
    )?;
    match arch.family() {
        Family::Sd3 => write_sd3_model(Size::Tiny, out, Some(seed), true),
        family => write_model(family == Family::Sdxl, Size::Tiny, out, Some(seed)),
    }
}

pub(super) fn prepare_dir(out: &Path) -> Result<()> {
    if out.exists() {
        let non_empty = fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true);
        if non_empty && !out.join(SYNTH_MARKER).is_file() {
            return Err(ModelError::Other(format!(
                "{} exists and is not empty: choose a new directory",
                out.display()
            )));
        }
        if non_empty {
            fs::remove_dir_all(out).map_err(|source| io_err(out, source))?;
        }
    }
    fs::create_dir_all(out).map_err(|source| io_err(out, source))
}
