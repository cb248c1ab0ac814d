//! The flags that say how to read a model file: `--prediction-type` for single-file
//! checkpoints (diffusers' `prediction_type` argument of `from_single_file`).

use clap::builder::PossibleValuesParser;
use clap::Args;
use tessera_worker::model::single_file::Prediction;

#[derive(Debug, Clone, Args)]
pub struct ModelFlags {
    /// What a single-file checkpoint's UNet predicts, where the file cannot tell: SD 2.x
    /// files default to v_prediction (the 768 models; pass epsilon for 512 "base" fine-tunes),
    /// SDXL files to epsilon. Not for diffusers directories, whose scheduler config says.
    #[arg(long, value_parser = PossibleValuesParser::new(["epsilon", "v_prediction"]))]
    pub prediction_type: Option<String>,
}

impl ModelFlags {
    pub fn prediction(&self) -> Option<Prediction> {
        self.prediction_type.as_deref().and_then(Prediction::parse)
    }
}
