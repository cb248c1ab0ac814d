//! The methods' hooks into the UNet, in one place. The model takes them as data: a
//! [`UNetHooks`] passed to each forward call says what this call does beyond the plain pass,
//! and the model's layers hand over to the code here where a hook applies:
//! - [`scale_fusion`]: FreeScale's scale fusion in every self-attention (`attn1`);
//! - [`freeu`]: FreeU's backbone and skip scaling in the first two up blocks;
//! - [`cross_attention`]: FreCaS's cross-attention (`attn2`) map capture and injection;
//! - dilation (FreeScale's re-dilation): a conv path → dilation map, read by the model's convs
//!   through [`UNetHooks::dilation_of`].

pub mod cross_attention;
pub mod freeu;
pub mod scale_fusion;

use std::collections::HashMap;

use candle_core::Tensor;
use tessera_core::family::Family;
use tessera_core::method::freescale::dilated_layers;
use tessera_core::task::DenoiseTask;

/// What every `attn1` (self-attention) of the UNet computes.
#[derive(Debug, Clone, Default)]
pub enum SelfAttentionMode {
    /// Ordinary attention over all tokens of the layer.
    #[default]
    Plain,
    /// FreeScale's scale fusion (`scale_attention.py`, `scale_forward`).
    ScaleFusion(ScaleFusion),
}

/// Parameters of FreeScale's in-UNet scale fusion.
///
/// At a layer whose token grid is `h × w` while the UNet input latent is `H × W`, the layer's
/// downsampling factor is `f = H / h`; the local windows are `train_latent / f` tokens wide (the
/// training latent size seen at that layer), strided by half a window. The scale count is
/// `s = H / train_latent` per axis (integer, at least 1), as the reference's `current_hw // 1024`.
#[derive(Debug, Clone)]
pub struct ScaleFusion {
    /// Training latent size (height, width) at the UNet input, e.g. (128, 128) for SDXL.
    pub train_latent: (usize, usize),
    /// Fast mode: the global branch attends within the `s_h × s_w` strided sub-grids
    /// `x[i::s_h, j::s_w]` instead of over all tokens.
    pub fast: bool,
    /// Window jitter as in the reference's `get_views`: `None` disables it (every window at its
    /// nominal place); `Some(seed)` draws offsets from a generator seeded by the seed and the
    /// layer's path, so a call is reproducible.
    pub jitter_seed: Option<u64>,
}

/// FreeU factors (diffusers' `enable_freeu(s1, s2, b1, b2)`), as the family table gives them.
pub use tessera_core::family::FreeUFactors as FreeU;

/// One cross-attention layer's head-averaged attention probabilities.
#[derive(Debug, Clone)]
pub struct CapturedMap {
    /// Module path, e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn2".
    pub layer: String,
    /// Spatial size of the layer's token grid.
    pub height: usize,
    pub width: usize,
    /// (B, height·width, n_text) softmax probabilities averaged over heads.
    pub probs: Tensor,
}

/// FreCaS's cross-attention map reuse (`utils/camap_wrapper.py`).
#[derive(Debug, Clone)]
pub struct CrossAttnInjection {
    /// Mixing weight w: out ← (1 − w)·out + w·(map @ V).
    pub weight: f64,
    /// (B, h0, w0, n_text) spatial map of attention probabilities.
    pub map: Tensor,
}

/// Everything a UNet call can be asked to do beyond the plain forward pass.
#[derive(Debug, Clone, Default)]
pub struct UNetHooks {
    /// Applies to every `attn1`.
    pub self_attention: SelfAttentionMode,
    /// Conv parameter path -> dilation; 3×3 convs then pad by the dilation (FreeScale's
    /// re-dilation keeps the output size).
    pub dilation: HashMap<String, usize>,
    /// FreeU in up blocks 0 and 1, as diffusers' `apply_freeu`.
    pub freeu: Option<FreeU>,
    /// When true every `attn2` appends its head-averaged probabilities to `captured`.
    pub capture_cross_attention: bool,
    pub captured: Vec<CapturedMap>,
    /// When set every `attn2` mixes its output with the resized map applied to its values.
    pub inject_cross_attention: Option<CrossAttnInjection>,
}

impl UNetHooks {
    /// The dilation a conv at `path` should use this call (1 when none is set).
    pub fn dilation_of(&self, path: &str) -> usize {
        self.dilation.get(path).copied().unwrap_or(1)
    }
}

/// The hooks a denoise task asks for, on a model of `family`: FreeU with the family's factors,
/// FreeScale's dilated convolutions and scale fusion, and the cross-attention map capture. (The
/// map injection needs the stage map's tensor; the task's runner adds it.)
pub fn for_task(family: Family, d: &DenoiseTask) -> UNetHooks {
    let mut hooks = UNetHooks::default();
    if d.freeu {
        hooks.freeu = family.info().freeu;
    }
    hooks
        .dilation
        .extend(dilated_layers(d.dilation).map(|(path, f)| (path.to_string(), f)));
    if let Some(f) = &d.scale_fusion {
        hooks.self_attention = SelfAttentionMode::ScaleFusion(ScaleFusion {
            train_latent: (f.train_latent[0], f.train_latent[1]),
            fast: f.fast,
            jitter_seed: f.jitter_seed,
        });
    }
    hooks.capture_cross_attention = d.camap_capture.is_some();
    hooks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_hooks_are_plain() {
        let h = UNetHooks::default();
        assert!(matches!(h.self_attention, SelfAttentionMode::Plain));
        assert!(h.dilation.is_empty() && h.freeu.is_none());
        assert!(!h.capture_cross_attention && h.captured.is_empty());
        assert!(h.inject_cross_attention.is_none());
        assert_eq!(h.dilation_of("conv_in"), 1);
    }
}
