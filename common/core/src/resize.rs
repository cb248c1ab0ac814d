//! Image resizing that reproduces `torch.nn.functional.interpolate(x, size=(h, w), mode=...,
//! align_corners=False)` (no antialias) number for number.
//!
//! The cascades move a picture from one stage's size to the next in pixel space: FreeScale
//! (`pipeline_freescale.py`) decodes the previous stage, resizes the image with `mode="bicubic"`
//! and encodes it again; FreCaS resizes its decoded predicted clean image with `mode="nearest"`.
//! candle has no bicubic resize, its nearest one uses another source index rule and its
//! bilinear one computes coordinates in f64, so all three are written out here as torch's CPU
//! kernels (`UpSampleKernel.cpp`, `UpSample.h`) compute them in float32: per-axis source
//! indices and weights, then two separable passes over a plain `Vec<f32>` on the CPU (this
//! runs once per stage transition, on images of a few thousand pixels a side).
use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use crate::error::{MathError, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

/// The interpolation mode, named as torch's `F.interpolate(mode=...)` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeFilter {
    /// Cubic convolution with A = -0.75 (FreeScale's stage transition).
    Bicubic,
    /// torch's legacy `"nearest"`: `src = floor(dst * in / out)` (FreCaS's stage transition).
    Nearest,
    /// Linear in each axis, half-pixel centres.
    Bilinear,
}

impl ResizeFilter {
    pub const ALL: [ResizeFilter; 3] = [Self::Bicubic, Self::Nearest, Self::Bilinear];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bicubic => "bicubic",
            Self::Nearest => "nearest",
            Self::Bilinear => "bilinear",
        }
    }
}

impl fmt::Display for ResizeFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ResizeFilter {
    type Err = MathError;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| {
                let valid: Vec<&str> = Self::ALL.iter().map(|f| f.as_str()).collect();
                MathError::Invalid(format!(
                    "unknown resize filter {s:?} (valid: {})",
                    valid.join(", ")
                ))
            })
    }
}

/// Resizes `x` (B, C, H, W), any dtype, to (B, C, `height`, `width`) as
/// `F.interpolate(x.float(), size=(height, width), mode=filter, align_corners=False)` does, for
/// up- and down-scaling and any ratio. The result is f32 on `x`'s device; an unchanged size
/// gives `x` as f32. The work is done on the CPU (see the module notes).
pub fn resize(x: &Tensor, height: usize, width: usize, filter: ResizeFilter) -> Result<Tensor> {
    let resizer = Resizer::new(x, height, width, filter)?;
    Ok(resizer.window(0..height, 0..width)?.to_device(x.device())?)
}

/// A resize whose output is computed a window at a time, so a stage transition never holds
/// the whole upscaled picture: each encode tile asks for its own pixels. Every output number
/// is computed with the same products in the same order as [`resize`], so any tiling of the
/// windows gives the bytes of the whole resize.
pub struct Resizer {
    src: Vec<f32>,
    planes: (usize, usize),
    from: (usize, usize),
    to: (usize, usize),
    filter: ResizeFilter,
}

impl Resizer {
    /// Takes `x` (B, C, H, W), any dtype and device, to be resized to `height` × `width`.
    pub fn new(x: &Tensor, height: usize, width: usize, filter: ResizeFilter) -> Result<Self> {
        let (b, c, h, w) = match *x.dims() {
            [b, c, h, w] => (b, c, h, w),
            _ => {
                return Err(MathError::Invalid(format!(
                    "resize expects a (B, C, H, W) tensor, got shape {:?}",
                    x.dims()
                )))
            }
        };
        let src = x
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Self::from_planes(src, (b, c), (h, w), height, width, filter)
    }

    /// Takes `b · c` row-major `h × w` planes of f32 (a (B, C, H, W) tensor's values) without
    /// copying them.
    pub fn from_planes(
        src: Vec<f32>,
        (b, c): (usize, usize),
        (h, w): (usize, usize),
        height: usize,
        width: usize,
        filter: ResizeFilter,
    ) -> Result<Self> {
        if height == 0 || width == 0 {
            return Err(MathError::Invalid(format!(
                "resize target must be non-empty, got {height}x{width}"
            )));
        }
        if h == 0 || w == 0 {
            return Err(MathError::Invalid(format!(
                "cannot resize an empty {h}x{w} image to {height}x{width}"
            )));
        }
        if src.len() != b * c * h * w {
            return Err(MathError::Invalid(format!(
                "{} values are not {b}x{c} planes of {h}x{w}",
                src.len()
            )));
        }
        Ok(Self {
            src,
            planes: (b, c),
            from: (h, w),
            to: (height, width),
            filter,
        })
    }

    /// The output's (height, width).
    pub fn size(&self) -> (usize, usize) {
        self.to
    }

    /// Output rows `ys` and columns `xs` of every plane, as a (B, C, rows, columns) f32 tensor
    /// on the CPU.
    pub fn window(&self, ys: Range<usize>, xs: Range<usize>) -> Result<Tensor> {
        let (b, c) = self.planes;
        if ys.start >= ys.end || xs.start >= xs.end || ys.end > self.to.0 || xs.end > self.to.1 {
            return Err(MathError::Invalid(format!(
                "window rows {ys:?}, columns {xs:?} is empty or outside the {}x{} output",
                self.to.1, self.to.0
            )));
        }
        let shape = (b, c, ys.len(), xs.len());
        let out = if self.from == self.to {
            // Unchanged size: the window is a crop of the input.
            let (h, w) = self.from;
            let mut out = Vec::with_capacity(b * c * ys.len() * xs.len());
            for plane in self.src.chunks_exact(h * w) {
                for y in ys.clone() {
                    out.extend_from_slice(&plane[y * w + xs.start..y * w + xs.end]);
                }
            }
            out
        } else {
            let (src, planes, from, to) = (&self.src, b * c, self.from, self.to);
            match self.filter {
                ResizeFilter::Bicubic => separable(src, planes, from, to, ys, xs, cubic_taps),
                ResizeFilter::Bilinear => separable(src, planes, from, to, ys, xs, linear_taps),
                ResizeFilter::Nearest => separable(src, planes, from, to, ys, xs, nearest_taps),
            }
        };
        Ok(Tensor::from_vec(out, shape, &Device::Cpu)?)
    }
}

/// The source indices and weights of each output position along one axis.
type Taps<const N: usize> = Vec<([usize; N], [f32; N])>;

/// Torch's `area_pixel_compute_scale` for `align_corners=False` and no explicit scale factor:
/// `(float)input_size / output_size`, in float32 like the kernels' `opmath_t`.
fn axis_scale(input: usize, output: usize) -> f32 {
    input as f32 / output as f32
}

/// Torch's `area_pixel_compute_source_index` for `align_corners=False`,
/// `scale * (dst + 0.5) - 0.5`, as torch's x86 build compiles it into its cubic weights: one
/// fused multiply-add (checked against its weights). Rounding the product separately moves
/// the coordinate by an ulp of the product and the cubic weights by up to ~5e-6.
fn cubic_source_coordinate(scale: f32, dst: usize) -> f32 {
    scale.mul_add(dst as f32 + 0.5, -0.5)
}

/// Torch's `guard_index_and_lambda`: `floor` of the coordinate capped at `in - 1`, and the
/// fraction clamped to [0, 1].
fn index_and_fraction(real: f32, input: usize) -> (i64, f32) {
    let base = (real.floor() as i64).min(input as i64 - 1);
    (base, (real - base as f32).clamp(0.0, 1.0))
}

/// Cubic convolution A as torch's `get_cubic_upsample_coefficients` (and OpenCV) use it.
const CUBIC_A: f32 = -0.75;

/// |x| <= 1 branch of the Keys kernel (torch's `cubic_convolution1`). torch's x86 CPU build
/// contracts `(A + 2) * x - (A + 3)` into one fused multiply-add and rounds the rest
/// separately; doing the same reproduces its weights bit for bit.
fn cubic_near(x: f32) -> f32 {
    (CUBIC_A + 2.0).mul_add(x, -(CUBIC_A + 3.0)) * x * x + 1.0
}

/// 1 < |x| < 2 branch of the Keys kernel (torch's `cubic_convolution2`), its two inner steps
/// fused as torch's x86 CPU build fuses them.
fn cubic_far(x: f32) -> f32 {
    CUBIC_A.mul_add(x, -5.0 * CUBIC_A).mul_add(x, 8.0 * CUBIC_A) * x - 4.0 * CUBIC_A
}

/// Torch's `HelperInterpCubic::compute_indices_weights`: the source coordinate is not clamped
/// at 0 (a negative one still weighs the border pixel through the clamped taps), taps at
/// `floor - 1 ..= floor + 2` clamped to the border.
fn cubic_taps(input: usize, output: usize, dsts: Range<usize>) -> Taps<4> {
    let scale = axis_scale(input, output);
    let last = input as i64 - 1;
    dsts.map(|dst| {
        let (base, t) = index_and_fraction(cubic_source_coordinate(scale, dst), input);
        // torch's `get_cubic_upsample_coefficients`, including its `(1 - t) + 1`.
        let t2 = 1.0 - t;
        let weights = [
            cubic_far(t + 1.0),
            cubic_near(t),
            cubic_near(t2),
            cubic_far(t2 + 1.0),
        ];
        let index = std::array::from_fn(|j| (base - 1 + j as i64).clamp(0, last) as usize);
        (index, weights)
    })
    .collect()
}

/// Torch's `compute_source_index_and_lambda` (`HelperInterpLinear`): an unchanged axis is
/// copied, otherwise the coordinate is clamped at 0 and the second tap stays on the last
/// pixel at the border. Unlike the cubic helper, torch's generic bilinear kernel rounds
/// `scale * (dst + 0.5)` before subtracting 0.5 (checked against its weights), so no fusion
/// here. torch switches to another kernel (fused coordinate, 2x2 weight products) when the
/// output's `h + w <= 128` or when it runs one thread on 3 channels; this differs from it by
/// ~1e-6 there. candle's `upsample_bilinear2d` computes the coordinate in f64, which is ~6e-6
/// away from either.
fn linear_taps(input: usize, output: usize, dsts: Range<usize>) -> Taps<2> {
    let scale = axis_scale(input, output);
    dsts.map(|dst| {
        if input == output {
            return ([dst, dst], [1.0, 0.0]);
        }
        let real = (scale * (dst as f32 + 0.5) - 0.5).max(0.0);
        let (i0, lambda1) = index_and_fraction(real, input);
        let i0 = i0 as usize;
        let i1 = (i0 + 1).min(input - 1);
        ([i0, i1], [1.0 - lambda1, lambda1])
    })
    .collect()
}

/// Torch's legacy `"nearest"` (`nearest_idx`): `min(floor(dst * scale), in - 1)` with the
/// product in float32; its special cases (same size, exactly twice) give the same indices.
fn nearest_taps(input: usize, output: usize, dsts: Range<usize>) -> Taps<1> {
    let scale = axis_scale(input, output);
    dsts.map(|dst| {
        (
            [((dst as f32 * scale).floor() as usize).min(input - 1)],
            [1.0],
        )
    })
    .collect()
}

/// `sum_j value(j) * weights[j]` accumulated in tap order, as torch's `Interpolate::eval`
/// does. (torch fuses each `acc += v * w`; plain f32 products differ from it by an ulp or so
/// and let the loops vectorize.)
#[inline(always)]
fn weighted<const N: usize>(weights: &[f32; N], value: impl Fn(usize) -> f32) -> f32 {
    let mut acc = value(0) * weights[0];
    for (j, &w) in weights.iter().enumerate().skip(1) {
        acc += value(j) * w;
    }
    acc
}

/// Resizes `planes` row-major `from` planes to `to` with per-axis taps, computing output rows
/// `ys` and columns `xs` only. Torch evaluates each output as
/// `sum_i wy_i * (sum_j wx_j * x[y_i][x_j])` in float32; the horizontal pass is the inner sum
/// for every source row the window needs, so the two passes add the same products in the same
/// order whatever the window.
fn separable<const N: usize>(
    src: &[f32],
    planes: usize,
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
    ys: Range<usize>,
    xs: Range<usize>,
    taps: fn(usize, usize, Range<usize>) -> Taps<N>,
) -> Vec<f32> {
    let rows = taps(h, oh, ys.clone());
    let cols = taps(w, ow, xs.clone());
    let (wh, ww) = (ys.len(), xs.len());
    // The source rows the window's taps touch.
    let lo = rows
        .iter()
        .flat_map(|(i, _)| i.iter())
        .copied()
        .min()
        .unwrap_or(0);
    let hi = rows
        .iter()
        .flat_map(|(i, _)| i.iter())
        .copied()
        .max()
        .map_or(0, |m| m + 1);
    let mut out = vec![0f32; planes * wh * ww];
    let mut tmp = vec![0f32; (hi - lo) * ww];
    for (plane, dst) in src.chunks_exact(h * w).zip(out.chunks_exact_mut(wh * ww)) {
        let used = &plane[lo * w..hi * w];
        for (line, tmp_line) in used.chunks_exact(w).zip(tmp.chunks_exact_mut(ww)) {
            for (o, (idx, wt)) in tmp_line.iter_mut().zip(&cols) {
                *o = weighted(wt, |j| line[idx[j]]);
            }
        }
        for (dst_line, (idx, wt)) in dst.chunks_exact_mut(ww).zip(&rows) {
            let lines: [&[f32]; N] =
                std::array::from_fn(|j| &tmp[(idx[j] - lo) * ww..(idx[j] - lo + 1) * ww]);
            for (x, o) in dst_line.iter_mut().enumerate() {
                *o = weighted(wt, |j| lines[j][x]);
            }
        }
    }
    out
}

// The reference numbers are pasted with the 10 significant digits the script prints.
#[cfg(test)]
#[allow(clippy::excessive_precision)]
mod tests {
    use super::*;

    // Reference numbers: `tests/parity/make_resize_fixture.py` run with torch 2.15.0 (x86 CPU,
    // AVX2, float32): the input is x.flat[i] = sin(0.37 * i + 0.1) over a (1, 2, 7, 9) tensor
    // (float64 then rounded to f32), resized with F.interpolate(..., align_corners=False). Each
    // case lists (flat index, value) pairs of the output and the output's sum (in float64).

    /// Per-value tolerance (f32 rounding of a few products).
    const TOL: f32 = 1e-5;
    /// The sum adds a few hundred values; its reference was accumulated in float64.
    const SUM_TOL: f64 = 1e-4;

    fn input() -> Tensor {
        let v: Vec<f32> = (0..2 * 7 * 9)
            .map(|i| (0.37 * i as f64 + 0.1).sin() as f32)
            .collect();
        Tensor::from_vec(v, (1, 2, 7, 9), &Device::Cpu).unwrap()
    }

    fn check(out: &Tensor, hw: (usize, usize), sum: f64, values: &[(usize, f32)]) {
        assert_eq!(out.dims(), &[1, 2, hw.0, hw.1]);
        assert_eq!(out.dtype(), DType::F32);
        let flat = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for &(i, want) in values {
            let err = (flat[i] - want).abs();
            assert!(err < TOL, "value {i}: {} vs torch {want}", flat[i]);
        }
        let got: f64 = flat.iter().map(|&v| v as f64).sum();
        assert!((got - sum).abs() < SUM_TOL, "sum {got} vs torch {sum}");
    }

    fn run(h: usize, w: usize, filter: ResizeFilter) -> Tensor {
        resize(&input(), h, w, filter).unwrap()
    }

    #[test]
    fn bicubic_upscale_matches_torch() {
        let out = run(13, 17, ResizeFilter::Bicubic);
        check(
            &out,
            (13, 17),
            1.622371984e+01,
            &[
                (0, 9.556118399e-02),
                (1, 2.386102378e-01),
                (16, 3.467984125e-02),
                (17, -6.020399183e-02),
                (147, 2.425815314e-01),
                (221, -1.194292545e+00),
                (228, -4.945898056e-01),
                (425, -7.291650176e-01),
                (440, 9.177534580e-01),
                (441, 8.288909197e-01),
            ],
        );
    }

    #[test]
    fn bicubic_downscale_matches_torch() {
        let out = run(4, 5, ResizeFilter::Bicubic);
        check(
            &out,
            (4, 5),
            6.765412463e+00,
            &[
                (0, -6.662543118e-02),
                (1, 6.607333571e-02),
                (4, 1.330625415e-01),
                (5, 4.789633751e-01),
                (13, 1.067673042e-01),
                (20, -1.552537233e-01),
                (27, 8.402201533e-02),
                (35, 1.972575858e-02),
                (38, 1.636003703e-01),
                (39, 5.868269876e-02),
            ],
        );
    }

    #[test]
    fn bicubic_mixed_ratio_matches_torch() {
        // Up in height (7 -> 20), down in width (9 -> 6).
        let out = run(20, 6, ResizeFilter::Bicubic);
        check(
            &out,
            (20, 6),
            8.620980754e+00,
            &[
                (0, 2.272681594e-01),
                (1, 8.340470791e-01),
                (5, 1.644282937e-01),
                (6, 1.591865122e-01),
                (80, 6.924674511e-01),
                (120, -1.210585952e+00),
                (127, -8.584419489e-01),
                (234, -6.214956045e-01),
                (238, 1.212373495e+00),
                (239, 9.211494923e-01),
            ],
        );
    }

    #[test]
    fn bicubic_same_size_is_identity() {
        let x = input();
        let out = resize(&x, 7, 9, ResizeFilter::Bicubic).unwrap();
        check(
            &out,
            (7, 9),
            4.968692373e+00,
            &[
                (0, 9.983341396e-02),
                (1, 4.528862834e-01),
                (8, 8.150215447e-02),
                (9, -2.844257057e-01),
                (42, 6.791096181e-02),
                (63, -9.884785414e-01),
                (70, 7.625584602e-01),
                (117, -5.582683682e-01),
                (124, 9.102509618e-01),
                (125, 6.989225149e-01),
            ],
        );
        let diff = (out - &x).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        // The kernel's own weights at an unchanged axis are exactly (0, 1, 0, 0).
        for (i, (idx, wt)) in cubic_taps(9, 9, 0..9).into_iter().enumerate() {
            assert_eq!(idx[1], i);
            assert_eq!(wt, [0.0, 1.0, 0.0, 0.0]);
        }
    }

    #[test]
    fn nearest_upscale_matches_torch() {
        let out = run(13, 17, ResizeFilter::Nearest);
        check(
            &out,
            (13, 17),
            5.980345860e+00,
            &[
                (0, 9.983341396e-02),
                (1, 9.983341396e-02),
                (16, 8.150215447e-02),
                (17, 9.983341396e-02),
                (147, 4.240958393e-01),
                (221, -9.884785414e-01),
                (228, -5.751121640e-01),
                (425, -5.582683682e-01),
                (440, 9.102509618e-01),
                (441, 6.989225149e-01),
            ],
        );
    }

    #[test]
    fn nearest_downscale_matches_torch() {
        let out = run(4, 6, ResizeFilter::Nearest);
        check(
            &out,
            (4, 6),
            -9.165503852e+00,
            &[
                (0, 9.983341396e-02),
                (1, 4.528862834e-01),
                (5, 4.363990724e-01),
                (6, -2.844257057e-01),
                (16, -2.535714507e-01),
                (24, -9.884785414e-01),
                (31, 9.185251594e-01),
                (42, 7.037800550e-01),
                (46, -9.913662076e-01),
                (47, -9.716936350e-01),
            ],
        );
    }

    #[test]
    fn bilinear_matches_torch() {
        let out = run(10, 12, ResizeFilter::Bilinear);
        check(
            &out,
            (10, 12),
            1.402860301e+01,
            &[
                (0, 9.983341396e-02),
                (1, 3.204914629e-01),
                (11, 8.150215447e-02),
                (12, -1.115090847e-01),
                (80, 1.105254963e-01),
                (120, -9.884785414e-01),
                (127, 1.706783772e-01),
                (228, -5.582683682e-01),
                (238, 8.310027719e-01),
                (239, 6.989225149e-01),
            ],
        );
    }

    #[test]
    fn axis_weights_round_like_torch() {
        // torch's weights of 128 -> 320 at outputs 40 and 160 (the script's last lines). The
        // other rounding of the source coordinate (fused for bicubic, not for bilinear) is
        // 9.5e-7 to 5e-6 away here; these are matched bit for bit.
        fn assert_taps<const N: usize>(taps: &([usize; N], [f32; N]), want: &[(usize, f32)]) {
            assert_eq!(
                taps.0.to_vec(),
                want.iter().map(|w| w.0).collect::<Vec<_>>()
            );
            for (got, &(i, w)) in taps.1.iter().zip(want) {
                assert!((got - w).abs() < 1e-7, "tap {i}: {got} vs torch {w}");
            }
        }
        let cubic = cubic_taps(128, 320, 0..320);
        assert_taps(
            &cubic[40],
            &[
                (14, -4.725003242e-02),
                (15, 3.262502551e-01),
                (16, 8.312498331e-01),
                (17, -1.102499962e-01),
            ],
        );
        assert_taps(
            &cubic[160],
            &[
                (62, -4.724979401e-02),
                (63, 3.262490034e-01),
                (64, 8.312507868e-01),
                (65, -1.102499962e-01),
            ],
        );
        let linear = linear_taps(128, 320, 0..320);
        assert_taps(&linear[40], &[(15, 2.999992371e-01), (16, 7.000007629e-01)]);
        assert_taps(
            &linear[160],
            &[(63, 2.999954224e-01), (64, 7.000045776e-01)],
        );
    }

    #[test]
    fn other_dtypes_and_strided_inputs_give_f32() {
        // An f16 input is resized as its f32 upcast; a transposed (non-contiguous) view as its
        // contiguous copy.
        let x16 = input().to_dtype(DType::F16).unwrap();
        let x32 = x16.to_dtype(DType::F32).unwrap();
        let xt = x32.transpose(2, 3).unwrap();
        for filter in ResizeFilter::ALL {
            let a = resize(&x16, 11, 5, filter).unwrap();
            let b = resize(&x32, 11, 5, filter).unwrap();
            assert_eq!(a.dtype(), DType::F32);
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{filter}");
            let a = resize(&xt, 5, 11, filter).unwrap();
            let b = resize(&xt.contiguous().unwrap(), 5, 11, filter).unwrap();
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{filter}");
        }
    }

    #[test]
    fn rejects_empty_sizes_and_bad_ranks() {
        let x = input();
        for filter in ResizeFilter::ALL {
            let e = resize(&x, 0, 4, filter).unwrap_err().to_string();
            assert!(e.contains("non-empty"), "{e}");
            let e = resize(&x, 4, 0, filter).unwrap_err().to_string();
            assert!(e.contains("non-empty"), "{e}");
        }
        let empty = Tensor::zeros((1, 1, 0, 3), DType::F32, &Device::Cpu).unwrap();
        let e = resize(&empty, 2, 2, ResizeFilter::Bicubic).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let flat = Tensor::zeros((7, 9), DType::F32, &Device::Cpu).unwrap();
        let e = resize(&flat, 2, 2, ResizeFilter::Nearest).unwrap_err();
        assert!(e.to_string().contains("(B, C, H, W)"), "{e}");
    }

    #[test]
    fn filter_names_parse_display_and_serde() {
        for filter in ResizeFilter::ALL {
            let name = filter.to_string();
            assert_eq!(name.parse::<ResizeFilter>().unwrap(), filter);
            let json = serde_json::to_string(&filter).unwrap();
            assert_eq!(json, format!("\"{name}\""));
            assert_eq!(serde_json::from_str::<ResizeFilter>(&json).unwrap(), filter);
        }
        let e = "lanczos".parse::<ResizeFilter>().unwrap_err().to_string();
        assert!(
            e.contains("lanczos") && e.contains("bicubic, nearest, bilinear"),
            "{e}"
        );
    }

    #[test]
    fn windows_give_the_bytes_of_the_whole_resize() {
        // Up, down, odd ratios and an unchanged size; windows that cross every tap border.
        let x = Tensor::arange(0f32, 2.0 * 3.0 * 13.0 * 11.0, &Device::Cpu)
            .unwrap()
            .sin()
            .unwrap()
            .reshape((2, 3, 13, 11))
            .unwrap();
        for filter in ResizeFilter::ALL {
            for (oh, ow) in [(40, 27), (6, 5), (13, 11)] {
                let whole = resize(&x, oh, ow, filter).unwrap();
                let r = Resizer::new(&x, oh, ow, filter).unwrap();
                assert_eq!(r.size(), (oh, ow));
                for (ys, xs) in [(0..oh, 0..ow), (1..oh / 2 + 1, 2..ow), (oh - 1..oh, 0..1)] {
                    let got = r.window(ys.clone(), xs.clone()).unwrap();
                    let want = whole
                        .narrow(2, ys.start, ys.len())
                        .unwrap()
                        .narrow(3, xs.start, xs.len())
                        .unwrap();
                    let (got, want) = (
                        got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    );
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{filter} to {oh}x{ow}, rows {ys:?} cols {xs:?}");
                }
                assert!(r.window(0..oh + 1, 0..ow).is_err());
                assert!(r.window(2..2, 0..ow).is_err());
            }
        }
    }
}
