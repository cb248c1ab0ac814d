//! Per-call extension points of the UNet, passed as plain data (no trait objects): the
//! self-attention mode (FreeScale's scale fusion), per-conv dilation (FreeScale), FreeU, and
//! cross-attention map capture / injection (FreCaS).

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};

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

/// FreeU factors (diffusers' `enable_freeu(s1, s2, b1, b2)`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FreeU {
    pub b1: f64,
    pub b2: f64,
    pub s1: f64,
    pub s2: f64,
}

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

/// Real and imaginary parts of the n×n operator that keeps only the DFT frequencies {0, n−1}
/// of a length-n signal: P = F⁻¹·D·F with D the indicator of those frequencies. Those are the
/// two rows/cols the FreeU mask box `[c−1, c+1)` selects after `fftshift` (c = n/2); for n = 1
/// torch's slice `[-1:1]` keeps just frequency 0. `transpose` returns Pᵀ (for right products).
fn low_frequency_projector(n: usize, transpose: bool, device: &Device) -> Result<(Tensor, Tensor)> {
    let mut re = vec![0f32; n * n];
    let mut im = vec![0f32; n * n];
    for row in 0..n {
        for col in 0..n {
            let (a, b) = if transpose { (col, row) } else { (row, col) };
            let (r, i) = if n == 1 {
                (1.0, 0.0)
            } else {
                // (1/n)(e^{0} + e^{2πi(n−1)(a−b)/n}) = (1/n)(1 + e^{−2πi(a−b)/n})
                let theta = 2.0 * std::f64::consts::PI * (a as f64 - b as f64) / n as f64;
                ((1.0 + theta.cos()) / n as f64, -theta.sin() / n as f64)
            };
            re[row * n + col] = r as f32;
            im[row * n + col] = i as f32;
        }
    }
    Ok((
        Tensor::from_vec(re, (n, n), device)?,
        Tensor::from_vec(im, (n, n), device)?,
    ))
}

/// diffusers' `fourier_filter(x, threshold=1, scale)` without an FFT: with threshold 1 the mask
/// only rescales the 2×2 frequency block {0, −1}², so the result is
/// `x + (scale − 1)·Re(P_h · x · P_wᵀ)`, a few small real matmuls. Computed in f32 (diffusers
/// upcasts too) and returned in the input dtype.
pub fn fourier_filter(x: &Tensor, scale: f64) -> Result<Tensor> {
    let (_b, _c, h, w) = x.dims4()?;
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let (ar, ai) = low_frequency_projector(h, false, x.device())?;
    let (br, bi) = low_frequency_projector(w, true, x.device())?;
    // Re(A·X·B) = Ar·(X·Br) − Ai·(X·Bi) since X is real.
    let xr = xf.broadcast_matmul(&br)?;
    let xi = xf.broadcast_matmul(&bi)?;
    let low = (ar.broadcast_matmul(&xr)? - ai.broadcast_matmul(&xi)?)?;
    (xf + (low * (scale - 1.0))?)?.to_dtype(dtype)
}

/// diffusers' `apply_freeu`: in up block 0 (1) scale the first half of the backbone channels by
/// b1 (b2) and damp the skip's lowest frequencies by s1 (s2); other blocks are untouched.
pub fn apply_freeu(
    resolution_idx: usize,
    hidden: &Tensor,
    skip: &Tensor,
    freeu: &FreeU,
) -> Result<(Tensor, Tensor)> {
    let (b, s) = match resolution_idx {
        0 => (freeu.b1, freeu.s1),
        1 => (freeu.b2, freeu.s2),
        _ => return Ok((hidden.clone(), skip.clone())),
    };
    let channels = hidden.dim(1)?;
    let half = channels / 2;
    let hidden = if half == 0 {
        hidden.clone()
    } else {
        let scaled = (hidden.narrow(1, 0, half)? * b)?;
        Tensor::cat(&[&scaled, &hidden.narrow(1, half, channels - half)?], 1)?
    };
    Ok((hidden, fourier_filter(skip, s)?))
}

/// The reference's `gaussian_kernel` 1-D factor: exp(−(x − (k−1)/2)² / 2σ²), normalized.
fn gaussian_1d(kernel: usize, sigma: f64) -> Vec<f64> {
    let c = (kernel as f64 - 1.0) / 2.0;
    let g: Vec<f64> = (0..kernel)
        .map(|i| (-((i as f64 - c).powi(2)) / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f64 = g.iter().sum();
    g.into_iter().map(|v| v / sum).collect()
}

/// FreeScale's `gaussian_filter` on a (B, h, w, d) tensor: the reference convolves each batch
/// item with a separable 3-D Gaussian (kernel `kernel`, σ) over (h, w, d) with zero padding, so
/// the blur runs along the feature axis too and borders lose mass; we do the same as three 1-D
/// passes.
pub fn gaussian_blur_3d(x: &Tensor, kernel: usize, sigma: f64) -> Result<Tensor> {
    if kernel <= 1 {
        return Ok(x.clone());
    }
    let g = gaussian_1d(kernel, sigma);
    let r = kernel / 2;
    let mut out = x.clone();
    for axis in 1..4 {
        let n = out.dim(axis)?;
        let padded = out.pad_with_zeros(axis, r, r)?;
        let mut acc: Option<Tensor> = None;
        for (j, gj) in g.iter().enumerate() {
            let term = (padded.narrow(axis, j, n)? * *gj)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
        out = acc.unwrap_or(out);
    }
    Ok(out)
}

/// Mean over the head axis of (B, heads, N, T) probabilities.
pub(crate) fn head_mean(probs: &Tensor) -> Result<Tensor> {
    probs.mean(1)
}

/// The injected map resized spatially to the layer's (h, w) and flattened to (B, h·w, T).
/// FreCaS resizes its map along the flattened token axis; we resize in 2-D (bilinear,
/// align_corners = false) because a tile's map must keep its spatial layout.
pub(crate) fn resized_injection_map(map: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _h0, _w0, t) = map.dims4()?;
    let m = map.permute((0, 3, 1, 2))?.contiguous()?;
    let m = m.upsample_bilinear2d(h, w, false)?;
    m.reshape((b, t, h * w))?.transpose(1, 2)?.contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct O(n⁴) DFT → mask → inverse DFT, as torch's fftshift/ifftshift pipeline.
    fn reference_filter(x: &[f64], h: usize, w: usize, scale: f64) -> Vec<f64> {
        use std::f64::consts::PI;
        let mut fr = vec![0.0; h * w];
        let mut fi = vec![0.0; h * w];
        for k1 in 0..h {
            for k2 in 0..w {
                for n1 in 0..h {
                    for n2 in 0..w {
                        let a =
                            -2.0 * PI * ((k1 * n1) as f64 / h as f64 + (k2 * n2) as f64 / w as f64);
                        fr[k1 * w + k2] += x[n1 * w + n2] * a.cos();
                        fi[k1 * w + k2] += x[n1 * w + n2] * a.sin();
                    }
                }
            }
        }
        // fftshift index j holds frequency (j − n/2) mod n; the box is j ∈ [n/2 − 1, n/2 + 1)
        // clipped like a Python slice (a start of −1 means n − 1).
        let in_box = |k: usize, n: usize| -> bool {
            let c = n as i64 / 2;
            let (mut lo, hi) = (c - 1, (c + 1).min(n as i64));
            if lo < 0 {
                lo += n as i64;
            }
            (lo..hi).any(|j| ((j - c).rem_euclid(n as i64)) as usize == k)
        };
        for k1 in 0..h {
            for k2 in 0..w {
                if in_box(k1, h) && in_box(k2, w) {
                    fr[k1 * w + k2] *= scale;
                    fi[k1 * w + k2] *= scale;
                }
            }
        }
        let mut out = vec![0.0; h * w];
        for n1 in 0..h {
            for n2 in 0..w {
                let mut s = 0.0;
                for k1 in 0..h {
                    for k2 in 0..w {
                        let a =
                            2.0 * PI * ((k1 * n1) as f64 / h as f64 + (k2 * n2) as f64 / w as f64);
                        s += fr[k1 * w + k2] * a.cos() - fi[k1 * w + k2] * a.sin();
                    }
                }
                out[n1 * w + n2] = s / (h * w) as f64;
            }
        }
        out
    }

    #[test]
    fn fourier_filter_matches_direct_dft() -> Result<()> {
        for &(h, w) in &[(4usize, 4usize), (5, 6), (1, 3), (2, 7), (3, 1)] {
            let x = Tensor::randn(0f32, 1.0, (1, 2, h, w), &Device::Cpu)?;
            let got = fourier_filter(&x, 0.6)?;
            let xs = x.flatten_all()?.to_vec1::<f32>()?;
            let gs = got.flatten_all()?.to_vec1::<f32>()?;
            for c in 0..2 {
                let plane: Vec<f64> = xs[c * h * w..(c + 1) * h * w]
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                let want = reference_filter(&plane, h, w, 0.6);
                for i in 0..h * w {
                    let d = (gs[c * h * w + i] as f64 - want[i]).abs();
                    assert!(
                        d < 1e-5,
                        "({h},{w}) c{c} i{i}: {} vs {}",
                        gs[c * h * w + i],
                        want[i]
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn default_hooks_are_plain() {
        let h = UNetHooks::default();
        assert!(matches!(h.self_attention, SelfAttentionMode::Plain));
        assert!(h.dilation.is_empty() && h.freeu.is_none());
        assert!(!h.capture_cross_attention && h.captured.is_empty());
        assert!(h.inject_cross_attention.is_none());
        assert_eq!(h.dilation_of("conv_in"), 1);
    }

    #[test]
    fn blur_kernel_one_is_identity_and_mass_is_kept_inside() -> Result<()> {
        let x = Tensor::ones((1, 5, 5, 5), DType::F32, &Device::Cpu)?;
        let y = gaussian_blur_3d(&x, 1, 1.0)?;
        assert_eq!(y.sum_all()?.to_scalar::<f32>()?, 125.0);
        let y = gaussian_blur_3d(&x, 3, 1.0)?;
        let centre = y.get(0)?.get(2)?.get(2)?.get(2)?.to_scalar::<f32>()?;
        assert!((centre - 1.0).abs() < 1e-6);
        Ok(())
    }
}
