//! FreeScale's scale fusion inside the UNet (`scale_forward` in `scale_attention.py`): each
//! self-attention `attn1` runs over local windows of the training size (averaged where they
//! overlap) and over a global branch (all tokens, or in fast mode the strided sub-grids), and
//! the two are fused as `G(local) + (global − G(global))`, G the reference's 3-D Gaussian
//! (kernel 2s − 1, σ 1) over (h, w, features).
//!
//! The windows and their jitter are the ones the latent views use
//! ([`tessera_core::tiling::windows`]), laid over the layer's tokens. G is the fusion of
//! [`tessera_core::method::fusion`], applied here with tensor ops on the model's device and in
//! its dtype rather than on the CPU in f32 ([`blur_features`], pinned to it by a test).

use candle_core::{Device, Result, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tessera_core::method::fusion::gaussian_kernel_1d_f64;
use tessera_core::tiling::windows::{jittered_corners, window_starts};

use super::ScaleFusion;
use crate::model::attention::{Attention, LayerGrid};

/// The local windows of one layer, in its tokens: the training size seen at the layer, strided
/// by half of it, jittered by up to an eighth of it when jitter is on.
struct LayerWindows {
    win: (usize, usize),
    rows: Vec<usize>,
    cols: Vec<usize>,
    jitter: (usize, usize),
}

impl LayerWindows {
    fn new(grid: LayerGrid, train_latent: (usize, usize), jitter: bool) -> Self {
        let (h, w) = grid.hw;
        let (ih, iw) = grid.input_hw;
        let (th, tw) = train_latent;
        // Training size seen at this layer: the UNet input is `ih / h` times larger.
        let win = (
            ((th * h) / ih.max(1)).clamp(1, h),
            ((tw * w) / iw.max(1)).clamp(1, w),
        );
        let stride = (
            ((th / 2) * h / ih.max(1)).max(1),
            ((tw / 2) * w / iw.max(1)).max(1),
        );
        Self {
            win,
            rows: window_starts(h, win.0, stride.0),
            cols: window_starts(w, win.1, stride.1),
            jitter: if jitter {
                (win.0 / 8, win.1 / 8)
            } else {
                (0, 0)
            },
        }
    }
}

/// FreeScale's scale fusion for one self-attention `attn` of `x` (B, h·w, C) at a layer of
/// `grid`.
pub fn fused_self_attention(
    attn: &Attention,
    x: &Tensor,
    grid: LayerGrid,
    sf: &ScaleFusion,
) -> Result<Tensor> {
    let attend = |t: &Tensor| attn.forward_self(t);
    fused_attention(&attend, attn.path(), x, grid, sf, None)
}

/// An attention over a batch of token sets (B', N', C) → (B', N', C): a self-attention, or
/// SD3's joint attention's image part with the text tokens beside each set.
pub type TokenAttention<'a> = dyn Fn(&Tensor) -> Result<Tensor> + 'a;

/// FreeScale's scale fusion of `attend` over `x` (B, h·w, C) at the layer at `path` of
/// `grid`; `global` is `attend(x)` when the caller has it already.
pub fn fused_attention(
    attend: &TokenAttention,
    path: &str,
    x: &Tensor,
    grid: LayerGrid,
    sf: &ScaleFusion,
    global: Option<Tensor>,
) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    let (h, w) = grid.hw;
    let (ih, iw) = grid.input_hw;
    let (th, tw) = sf.train_latent;
    if h * w != n || h == 0 || w == 0 || th == 0 || tw == 0 {
        candle_core::bail!(
            "scale fusion at {path}: bad grid {h}x{w} for {n} tokens or training size {th}x{tw}"
        );
    }
    let strides = ((ih / th).max(1), (iw / tw).max(1));
    let s = strides.0.max(strides.1);
    let grid4 = x.reshape((b, h, w, c))?;
    let windows = LayerWindows::new(grid, sf.train_latent, sf.jitter_seed.is_some());
    let mut rng = ChaCha8Rng::seed_from_u64(sf.jitter_seed.unwrap_or(0) ^ path_hash(path));
    let local = local_branch(attend, &grid4, &windows, &mut rng)?;
    let global = if sf.fast && (strides.0 > 1 || strides.1 > 1) {
        strided_global_branch(attend, &grid4, strides)?
    } else {
        match global {
            Some(g) => g,
            None => attend(x)?,
        }
        .reshape((b, h, w, c))?
    };
    let kernel = 2 * s - 1;
    let fused = (blur_features(&local, kernel)? + (&global - blur_features(&global, kernel)?)?)?;
    fused.reshape((b, n, c))
}

/// FNV-1a, to give each layer its own jitter stream from one seed.
fn path_hash(path: &str) -> u64 {
    path.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// The local branch on `grid4` (B, h, w, C): every window through `attn` in one batch, the
/// outputs averaged where windows overlap. As the reference, windows live in coordinates
/// padded by the jitter range with zeros, and positions no window covers stay zero.
fn local_branch(
    attend: &TokenAttention,
    grid4: &Tensor,
    windows: &LayerWindows,
    rng: &mut ChaCha8Rng,
) -> Result<Tensor> {
    let (b, h, w, c) = grid4.dims4()?;
    let (jr_h, jr_w) = windows.jitter;
    let (ph, pw) = (h + 2 * jr_h, w + 2 * jr_w);
    let padded = grid4
        .pad_with_zeros(1, jr_h, jr_h)?
        .pad_with_zeros(2, jr_w, jr_w)?;
    let (lh, lw) = windows.win;
    let corners = jittered_corners(
        &windows.rows,
        &windows.cols,
        windows.win,
        (h, w),
        windows.jitter,
        rng,
    );
    let mut count = vec![0f32; ph * pw];
    let mut pieces = Vec::with_capacity(corners.len());
    let mut positions: Vec<u32> = Vec::new();
    for (top, left) in corners {
        let hs = (top + jr_h as i64) as usize;
        let ws = (left + jr_w as i64) as usize;
        pieces.push(
            padded
                .narrow(1, hs, lh)?
                .narrow(2, ws, lw)?
                .reshape((b, lh * lw, c))?,
        );
        for r in hs..hs + lh {
            for q in ws..ws + lw {
                count[r * pw + q] += 1.0;
                positions.push((r * pw + q) as u32);
            }
        }
    }
    // Every window has the same size, so all of them go through the attention as one batch.
    let nwin = pieces.len();
    let out = attend(&Tensor::cat(&pieces, 0)?)?;
    // (nwin·B, lh·lw, C) -> (B, nwin·lh·lw, C), then one scatter-add into the padded frame.
    let out = out
        .reshape((nwin, b, lh * lw, c))?
        .transpose(0, 1)?
        .reshape((b, nwin * lh * lw, c))?;
    let idx = Tensor::from_vec(positions, nwin * lh * lw, grid4.device())?;
    let value = Tensor::zeros((b, ph * pw, c), out.dtype(), grid4.device())?
        .index_add(&idx, &out, 1)?
        .reshape((b, ph, pw, c))?;
    // Positions no window covers keep their zero value (the reference's where(count > 0)).
    let inv: Vec<f32> = count
        .iter()
        .map(|&k| if k > 0.0 { 1.0 / k } else { 1.0 })
        .collect();
    let inv = Tensor::from_vec(inv, (1, ph, pw, 1), grid4.device())?.to_dtype(grid4.dtype())?;
    value
        .broadcast_mul(&inv)?
        .narrow(1, jr_h, h)?
        .narrow(2, jr_w, w)
}

/// The fast global branch: attention within each strided sub-grid `x[i::s_h, j::s_w]` of
/// `grid4` (B, h, w, C); every token belongs to exactly one, so the outputs are put back, not
/// averaged. The reference's `fourg_window` branch: `s = input // training` (floor) and
/// sub-grids of unequal size where `s` does not divide the side, unlike the latent global
/// views (`tessera_core::tiling::GlobalViews`), which pad to views of one aligned size.
fn strided_global_branch(
    attend: &TokenAttention,
    grid4: &Tensor,
    (s_h, s_w): (usize, usize),
) -> Result<Tensor> {
    let (b, h, w, c) = grid4.dims4()?;
    let mut assembled = grid4.zeros_like()?;
    for i in 0..s_h.min(h) {
        let ri = strided_indices(h, i, s_h, grid4.device())?;
        let sub_rows = grid4.index_select(&ri, 1)?;
        let mut row_out = sub_rows.zeros_like()?;
        for j in 0..s_w.min(w) {
            let cj = strided_indices(w, j, s_w, grid4.device())?;
            let sub = sub_rows.index_select(&cj, 2)?;
            let (_, sh, sw, _) = sub.dims4()?;
            let out = attend(&sub.reshape((b, sh * sw, c))?)?.reshape((b, sh, sw, c))?;
            row_out = row_out.index_add(&cj, &out, 2)?;
        }
        assembled = assembled.index_add(&ri, &row_out, 1)?;
    }
    Ok(assembled)
}

/// Rows `start, start+step, …` of an axis of `len` (Python's `x[start::step]`).
fn strided_indices(len: usize, start: usize, step: usize, device: &Device) -> Result<Tensor> {
    let idx: Vec<u32> = (start..len).step_by(step).map(|i| i as u32).collect();
    Tensor::new(idx.as_slice(), device)
}

/// G of the in-UNet fusion: the reference's `gaussian_filter` on (B, h, w, d) features, a
/// separable 3-D Gaussian (size `kernel`, σ 1) over (h, w, d) with zero padding, so the blur
/// runs along the feature axis too and borders lose mass; done as three 1-D passes of shifted,
/// scaled copies.
///
/// A marked second copy of `tessera_core::method::fusion::gaussian_blur` with
/// `BlurAxes::Volumetric`: that one runs on the CPU in f32 for whole-stage latents; this one
/// stays on the model's device in its dtype (f16 on a GPU) and weights its taps with the f64
/// kernel [`gaussian_kernel_1d_f64`]. On the CPU in f32 the two agree bit for bit when given
/// the same taps (`blur_features_is_cores_volumetric_blur`).
pub fn blur_features(x: &Tensor, kernel: usize) -> Result<Tensor> {
    if kernel <= 1 {
        return Ok(x.clone());
    }
    let g =
        gaussian_kernel_1d_f64(kernel, 1.0).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    blur_with_taps(x, &g)
}

/// [`blur_features`] with the taps given: each axis of 1..4 in turn, zero padded by the
/// kernel's radius, as the sum of the shifted copies times their taps in kernel order.
fn blur_with_taps(x: &Tensor, g: &[f64]) -> Result<Tensor> {
    let r = g.len() / 2;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hooks::{SelfAttentionMode, UNetHooks};
    use crate::model::attention::BasicTransformerBlock;
    use candle_core::DType;
    use candle_nn::{VarBuilder, VarMap};
    use tessera_core::method::fusion::{gaussian_blur, gaussian_kernel_1d, BlurAxes};

    fn block() -> Result<(BasicTransformerBlock, VarMap)> {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        Ok((BasicTransformerBlock::new(vb.pp("blk"), 8, 2, 4, 6)?, vm))
    }

    #[test]
    fn scale_fusion_at_training_size_is_plain() -> Result<()> {
        let (blk, _vm) = block()?;
        let x = Tensor::randn(0f32, 1.0, (2, 6 * 4, 8), &Device::Cpu)?;
        let ctx = Tensor::randn(0f32, 1.0, (2, 3, 6), &Device::Cpu)?;
        let grid = LayerGrid {
            hw: (6, 4),
            input_hw: (12, 8),
        };
        let mut plain = UNetHooks::default();
        let a = blk.forward(&x, &ctx, grid, &mut plain)?;
        for fast in [false, true] {
            let mut sf = UNetHooks {
                self_attention: SelfAttentionMode::ScaleFusion(ScaleFusion {
                    train_latent: (12, 8),
                    fast,
                    jitter_seed: Some(3),
                }),
                ..Default::default()
            };
            let b = blk.forward(&x, &ctx, grid, &mut sf)?;
            let d = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-5, "fast={fast}: {d}");
        }
        Ok(())
    }

    #[test]
    fn scale_fusion_runs_at_twice_training_size() -> Result<()> {
        let (blk, _vm) = block()?;
        let x = Tensor::randn(0f32, 1.0, (1, 16 * 10, 8), &Device::Cpu)?;
        let ctx = Tensor::randn(0f32, 1.0, (1, 3, 6), &Device::Cpu)?;
        let grid = LayerGrid {
            hw: (16, 10),
            input_hw: (32, 20),
        };
        for fast in [false, true] {
            let mut hooks = UNetHooks {
                self_attention: SelfAttentionMode::ScaleFusion(ScaleFusion {
                    train_latent: (16, 8),
                    fast,
                    jitter_seed: Some(1),
                }),
                ..Default::default()
            };
            let y = blk.forward(&x, &ctx, grid, &mut hooks)?;
            assert_eq!(y.dims(), &[1, 160, 8]);
            assert!(y.sum_all()?.to_scalar::<f32>()?.is_finite());
        }
        Ok(())
    }

    #[test]
    fn blur_kernel_one_is_identity_and_mass_is_kept_inside() -> Result<()> {
        let x = Tensor::ones((1, 5, 5, 5), DType::F32, &Device::Cpu)?;
        let y = blur_features(&x, 1)?;
        assert_eq!(y.sum_all()?.to_scalar::<f32>()?, 125.0);
        let y = blur_features(&x, 3)?;
        let centre = y.get(0)?.get(2)?.get(2)?.get(2)?.to_scalar::<f32>()?;
        assert!((centre - 1.0).abs() < 1e-6);
        Ok(())
    }

    /// The two copies of G: with the same taps, the in-UNet tensor-op blur and core's CPU
    /// blur give the same f32 values; with their own taps (f64 here, f32 there) they agree
    /// exactly at kernel 3 and to f32 rounding above.
    #[test]
    fn blur_features_is_cores_volumetric_blur() -> Result<()> {
        let x = Tensor::randn(0f32, 1.0, (2, 9, 7, 12), &Device::Cpu)?;
        let values = |t: &Tensor| -> Result<Vec<f32>> { t.flatten_all()?.to_vec1::<f32>() };
        let core = |k: usize| -> Result<Vec<f32>> {
            let t = gaussian_blur(&x, k, 1.0, BlurAxes::Volumetric)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            values(&t)
        };
        for k in [3, 5, 7] {
            let taps: Vec<f64> = gaussian_kernel_1d(k, 1.0)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?
                .into_iter()
                .map(f64::from)
                .collect();
            assert_eq!(values(&blur_with_taps(&x, &taps)?)?, core(k)?, "kernel {k}");
            let ours = values(&blur_features(&x, k)?)?;
            if k == 3 {
                assert_eq!(ours, core(k)?);
            }
            for (a, b) in ours.iter().zip(core(k)?) {
                assert!(
                    (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                    "kernel {k}: {a} vs {b}"
                );
            }
        }
        Ok(())
    }
}
