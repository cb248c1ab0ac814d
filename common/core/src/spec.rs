//! What a user asks for: the render specification, and the checks it must pass before any work
//! starts. Every message says what to change, because it is shown to the user as it is.

use crate::method::params::MethodSpec;
use crate::sched::SchedulerKind;

mod proto;
mod request;

pub use request::{JobRequest, DEFAULT_GUIDANCE, DEFAULT_STEPS};

/// Longest prompt accepted, in characters. CLIP reads 77 tokens; far longer text is a mistake
/// (a pasted file, a runaway script) rather than a prompt.
pub const MAX_PROMPT_CHARS: usize = 2000;
/// Largest side in pixels (a 8192-pixel latent).
pub const MAX_SIDE: u32 = 65536;
/// Smallest side in pixels: one latent pixel per VAE downsampling step.
pub const MIN_SIDE: u32 = 64;
pub const MAX_STEPS: usize = 1000;
/// Pixels per latent pixel (the VAE's downsampling factor).
pub const PIXELS_PER_LATENT: u32 = 8;
/// Sides must be whole multiples of 8 latent pixels (64 pixels): the UNet halves the latent
/// up to three times, and tiles and strided views then line up with its grid.
pub const SIZE_MULTIPLE: u32 = 64;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RenderSpec {
    pub prompt: String,
    /// `None` is different from `Some("")` for SDXL, whose pipeline then uses zero embeddings.
    pub negative_prompt: Option<String>,
    pub width: u32,
    pub height: u32,
    pub steps: usize,
    pub guidance: f64,
    /// `None`: the model's `scheduler_config.json` decides, as in diffusers.
    pub scheduler: Option<SchedulerKind>,
    pub seed: u64,
    /// The cascade: method, stages and their parameters.
    #[serde(default)]
    pub method: MethodSpec,
    /// How the finished picture is written (bit depth); not part of what is computed.
    #[serde(default)]
    pub output: OutputFormat,
    /// LoRAs merged into the model for this job, in order; the workers find them by name in
    /// their `--lora-dir` and check them by hash.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraRef>,
}

/// A LoRA as a job names it: a plain file name (no directory), the weight it is merged at,
/// and `sha256:HEX` of the file's bytes. A job never carries the file itself.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraRef {
    pub name: String,
    pub weight: f64,
    pub sha256: String,
}

impl LoraRef {
    /// Refuses a name that is not a plain file name, a weight that is not finite, or a hash
    /// that is not `sha256:` and 64 lowercase hex digits.
    pub fn check(&self) -> Result<(), SpecError> {
        let plain = !self.name.is_empty()
            && self.name.len() <= 255
            && self.name != "."
            && self.name != ".."
            && !self.name.contains(['/', '\\', '\0']);
        if !plain {
            return Err(SpecError(format!(
                "--lora {:?}: a job names a LoRA by its plain file name in the workers' --lora-dir",
                self.name
            )));
        }
        if !self.weight.is_finite() {
            return Err(SpecError(format!(
                "--lora {}: the weight must be a finite number",
                self.name
            )));
        }
        let hex = self.sha256.strip_prefix("sha256:").unwrap_or_default();
        let hash_ok = hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hash_ok {
            return Err(SpecError(format!(
                "--lora {}: the hash must be sha256: and 64 lowercase hex digits, got {:?}",
                self.name, self.sha256
            )));
        }
        Ok(())
    }
}

/// Sample depth of the output PNG.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum BitDepth {
    #[default]
    #[serde(rename = "8")]
    Eight,
    #[serde(rename = "16")]
    Sixteen,
}

impl BitDepth {
    pub fn bits(self) -> u32 {
        match self {
            BitDepth::Eight => 8,
            BitDepth::Sixteen => 16,
        }
    }
}

impl std::str::FromStr for BitDepth {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        match s.trim() {
            "8" => Ok(BitDepth::Eight),
            "16" => Ok(BitDepth::Sixteen),
            _ => Err(SpecError(format!(
                "bit depth {s:?} is not supported: use 8 or 16"
            ))),
        }
    }
}

impl std::fmt::Display for BitDepth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.bits())
    }
}

/// How the output is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct OutputFormat {
    #[serde(default)]
    pub bit_depth: BitDepth,
    /// Whether a Deep Zoom pyramid is written next to the PNG.
    #[serde(default)]
    pub dzi: DziMode,
}

/// When to write a Deep Zoom (DZI) pyramid beside the PNG.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DziMode {
    /// Only for pictures wider or taller than the threshold (16384 px by default).
    #[default]
    Auto,
    Always,
    Never,
}

impl DziMode {
    pub fn wanted(self, width: u32, height: u32, threshold: u32) -> bool {
        match self {
            DziMode::Always => true,
            DziMode::Never => false,
            DziMode::Auto => width.max(height) > threshold,
        }
    }
}

impl std::str::FromStr for DziMode {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        match s.trim() {
            "auto" => Ok(DziMode::Auto),
            "always" => Ok(DziMode::Always),
            "never" => Ok(DziMode::Never),
            _ => Err(SpecError(format!(
                "deep zoom mode {s:?} is not known: use auto, always or never"
            ))),
        }
    }
}

impl std::fmt::Display for DziMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DziMode::Auto => "auto",
            DziMode::Always => "always",
            DziMode::Never => "never",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

/// A `WIDTHxHEIGHT` size in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Size {
    pub width: u32,
    pub height: u32,
}

impl std::str::FromStr for Size {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        let bad = || {
            SpecError(format!(
                "size {s:?} is not WIDTHxHEIGHT in pixels, e.g. 1024x768"
            ))
        };
        let (w, h) = s.trim().split_once(['x', 'X']).ok_or_else(bad)?;
        let width = w.trim().parse::<u32>().map_err(|_| bad())?;
        let height = h.trim().parse::<u32>().map_err(|_| bad())?;
        Ok(Size { width, height })
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

/// Checks that one side lies in [`MIN_SIDE`, `MAX_SIDE`]. Which multiple of pixels a side must
/// be depends on the method, so the plan checks that (`plan::plan`), with a suggestion that
/// keeps every rule.
pub fn check_side_range(name: &str, value: u32) -> Result<(), SpecError> {
    if value < MIN_SIDE {
        return Err(SpecError(format!(
            "{name} {value} is too small: use at least {MIN_SIDE} pixels"
        )));
    }
    if value > MAX_SIDE {
        return Err(SpecError(format!(
            "{name} {value} is too large: use at most {MAX_SIDE} pixels"
        )));
    }
    Ok(())
}

/// Checks one side against a pixel multiple (a tile size, a stage of `--stages`), suggesting
/// the multiples on either side.
pub fn check_side_multiple(name: &str, value: u32, multiple: u32) -> Result<(), SpecError> {
    check_side_range(name, value)?;
    if !value.is_multiple_of(multiple) {
        let down = value / multiple * multiple;
        let up = down + multiple;
        let hint = if down < MIN_SIDE {
            format!("use {up}")
        } else {
            format!("use {down} or {up}")
        };
        return Err(SpecError(format!(
            "{name} {value} is not a multiple of {multiple} pixels{}: {hint}",
            latent_pixels(multiple)
        )));
    }
    Ok(())
}

/// " (N latent pixels)" for a pixel multiple of more than one latent pixel, else "".
pub fn latent_pixels(multiple: u32) -> String {
    match multiple / PIXELS_PER_LATENT {
        0 | 1 => String::new(),
        n => format!(" ({n} latent pixels)"),
    }
}

impl RenderSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        check_side_range("--size width", self.width)?;
        check_side_range("--size height", self.height)?;
        if self.steps == 0 || self.steps > MAX_STEPS {
            return Err(SpecError(format!(
                "steps {} is out of range: use 1 to {MAX_STEPS}",
                self.steps
            )));
        }
        if !self.guidance.is_finite() || !(0.0..=100.0).contains(&self.guidance) {
            return Err(SpecError(format!(
                "guidance {} is not a number from 0 to 100 (7.5 is typical; 1 or less turns guidance off)",
                self.guidance
            )));
        }
        check_prompt("prompt", &self.prompt)?;
        if let Some(n) = &self.negative_prompt {
            check_prompt("negative prompt", n)?;
        }
        if self.prompt.trim().is_empty() {
            return Err(SpecError(
                "prompt is empty: describe the picture to render".into(),
            ));
        }
        Ok(())
    }
}

fn check_prompt(name: &str, text: &str) -> Result<(), SpecError> {
    let chars = text.chars().count();
    if chars > MAX_PROMPT_CHARS {
        return Err(SpecError(format!(
            "{name} is {chars} characters long: shorten it to at most {MAX_PROMPT_CHARS} \
             (the text encoder reads only the first 77 tokens anyway)"
        )));
    }
    if text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(SpecError(format!(
            "{name} contains control characters: remove them"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RenderSpec {
        RenderSpec {
            loras: Vec::new(),
            prompt: "a lighthouse".into(),
            negative_prompt: None,
            width: 256,
            height: 192,
            steps: 4,
            guidance: 7.5,
            scheduler: None,
            seed: 7,
            method: MethodSpec::default(),
            output: OutputFormat::default(),
        }
    }

    #[test]
    fn sizes_parse_and_print() {
        let s: Size = "1024x768".parse().unwrap();
        assert_eq!((s.width, s.height), (1024, 768));
        assert_eq!(s.to_string(), "1024x768");
        assert!("1024".parse::<Size>().is_err());
        assert!("-8x8".parse::<Size>().is_err());
        assert!("axb".parse::<Size>().is_err());
    }

    #[test]
    fn a_good_spec_passes() {
        assert_eq!(spec().validate(), Ok(()));
    }

    #[test]
    fn bad_specs_say_what_to_change() {
        let cases: Vec<(RenderSpec, &str)> = vec![
            (
                RenderSpec {
                    height: 0,
                    ..spec()
                },
                "too small",
            ),
            (
                RenderSpec {
                    width: 70000,
                    ..spec()
                },
                "at most 65536",
            ),
            (RenderSpec { steps: 0, ..spec() }, "use 1 to 1000"),
            (
                RenderSpec {
                    guidance: f64::NAN,
                    ..spec()
                },
                "guidance",
            ),
            (
                RenderSpec {
                    guidance: f64::INFINITY,
                    ..spec()
                },
                "guidance",
            ),
            (
                RenderSpec {
                    prompt: "  ".into(),
                    ..spec()
                },
                "prompt is empty",
            ),
            (
                RenderSpec {
                    prompt: "x".repeat(10_000),
                    ..spec()
                },
                "shorten it",
            ),
            (
                RenderSpec {
                    negative_prompt: Some("a\u{7}".into()),
                    ..spec()
                },
                "control characters",
            ),
        ];
        for (s, want) in cases {
            let err = s.validate().unwrap_err().0;
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }
}
