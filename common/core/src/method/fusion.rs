//! FreeScale's scale fusion: keep the low frequencies of the local (windowed) result and the
//! high frequencies of the global one, `G(local) + (global − G(global))` (paper §3.3;
//! reference `scale_forward` in `scale_attention.py`).
//!
//! G is the reference's `gaussian_filter`: a normalised Gaussian of size 2s − 1, σ = 1,
//! applied as a 3-D convolution with zero padding over the last three axes of a 4-D tensor.
//! In the reference those axes are (height, width, feature) of the self-attention output
//! `(batch·heads, h, w, d)`, so the blur also smooths across the feature channels; the 3-D
//! kernel is the outer product of three 1-D kernels, so it is applied here as three 1-D
//! passes (same result up to f32 rounding).
//!
//! The worker's in-UNet fusion applies the same G to attention features with tensor ops on the
//! model's device (`tessera_worker::hooks::scale_fusion::blur_features`, taps from
//! [`gaussian_kernel_1d_f64`]): a marked second copy, pinned to [`gaussian_blur`] by a test
//! there.

use candle_core::{DType, Tensor};

use crate::error::{MathError, Result};
use crate::tiling::for_each_row_chunk;

/// Which axes of a 4-D tensor G blurs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BlurAxes {
    /// The last three axes, as the reference's `conv3d` over (h, w, d).
    #[default]
    Volumetric,
    /// The last two axes only: for latents `(B, C, H, W)`, where mixing the four latent
    /// channels has no counterpart in the reference (it fuses attention features).
    Spatial,
}

/// Kernel size of G for a stage `s` times the training size: 2s − 1.
pub fn fusion_kernel_size(scale: usize) -> Result<usize> {
    if scale == 0 {
        return Err(MathError::Invalid("scale must be at least 1".into()));
    }
    Ok(2 * scale - 1)
}

/// The reference's scale count: `current_hw // 1024` per axis, the larger of the two; in
/// latent pixels `stage // training` (integer division).
pub fn scale_count(stage_hw: (usize, usize), training_hw: (usize, usize)) -> Result<usize> {
    if training_hw.0 == 0 || training_hw.1 == 0 {
        return Err(MathError::Invalid("training size must be positive".into()));
    }
    Ok((stage_hw.0 / training_hw.0)
        .max(stage_hw.1 / training_hw.1)
        .max(1))
}

/// Normalised 1-D Gaussian `exp(−(i − (k−1)/2)² / 2σ²)`, computed in f32 as the reference's
/// `gaussian_kernel` (torch default dtype).
pub fn gaussian_kernel_1d(size: usize, sigma: f32) -> Result<Vec<f32>> {
    check_kernel(size, sigma.is_finite() && sigma > 0.0, sigma)?;
    let mid = (size as f32 - 1.0) / 2.0;
    let g: Vec<f32> = (0..size)
        .map(|i| {
            let d = i as f32 - mid;
            (-(d * d) / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let sum: f32 = g.iter().sum();
    Ok(g.into_iter().map(|v| v / sum).collect())
}

/// [`gaussian_kernel_1d`] computed in f64: the kernel of the worker's in-UNet scale fusion
/// (`hooks::scale_fusion`), whose tensor-op blur scales each shifted copy by an f64 tap.
///
/// A marked second copy: every render that fuses inside the UNet has been made with these
/// taps, so its bytes depend on them. Rounded to f32 they are within one unit in the last place
/// of the f32 kernel's, and equal for size 3 (a stage at twice the training size); the test
/// `the_f64_kernel_is_the_f32_kernel_to_an_ulp` pins the two together.
pub fn gaussian_kernel_1d_f64(size: usize, sigma: f64) -> Result<Vec<f64>> {
    check_kernel(size, sigma.is_finite() && sigma > 0.0, sigma)?;
    let mid = (size as f64 - 1.0) / 2.0;
    let g: Vec<f64> = (0..size)
        .map(|i| (-((i as f64 - mid).powi(2)) / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f64 = g.iter().sum();
    Ok(g.into_iter().map(|v| v / sum).collect())
}

fn check_kernel(size: usize, sigma_ok: bool, sigma: impl std::fmt::Display) -> Result<()> {
    if size == 0 || size.is_multiple_of(2) {
        return Err(MathError::Invalid(format!(
            "Gaussian kernel size must be odd and positive, got {size}"
        )));
    }
    if !sigma_ok {
        return Err(MathError::Invalid(format!(
            "sigma must be positive, got {sigma}"
        )));
    }
    Ok(())
}

/// The reference's 3-D kernel `g[i]·g[j]·g[k]`, flattened in (i, j, k) order.
pub fn gaussian_kernel_3d(size: usize, sigma: f32) -> Result<Vec<f32>> {
    let g = gaussian_kernel_1d(size, sigma)?;
    Ok(g.iter()
        .flat_map(|a| {
            let g = &g;
            g.iter().flat_map(move |b| g.iter().map(move |c| a * b * c))
        })
        .collect())
}

/// Zero-padded 1-D convolution of `x` along `dim` with an odd symmetric kernel, same size.
///
/// A plain loop over contiguous f32 rows: each output adds its taps in kernel order, one
/// `k · x` product at a time, the same arithmetic as summing shifted, scaled copies of the
/// tensor, without the copies (an 8K step blurs 2 × 8 planes of 1024² here; the tensor-op
/// version spent seconds on it).
fn blur_axis(x: &Tensor, dim: usize, kernel: &[f32]) -> Result<Tensor> {
    if kernel.len() == 1 {
        return Ok((x * f64::from(kernel[0]))?);
    }
    let dims = x.dims().to_vec();
    // (outer, n, inner): the blurred axis in the middle.
    let n = dims[dim];
    let inner: usize = dims[dim + 1..].iter().product();
    let src = x
        .to_dtype(DType::F32)?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut out = vec![0f32; src.len()];
    // Rows of the output are independent: they are split between threads, each computing its
    // rows with the same arithmetic, so the bytes do not depend on the split.
    if inner == 1 {
        // The last axis: shift along each row, tap by tap.
        for_each_row_chunk(&mut out, n, |first_row, rows| {
            let src = &src[first_row * n..first_row * n + rows.len()];
            for (dst, row) in rows.chunks_mut(n).zip(src.chunks(n)) {
                blur_line(dst, row, kernel);
            }
        });
        return Ok(Tensor::from_vec(out, dims, x.device())?);
    }
    for_each_row_chunk(&mut out, inner, |first_row, rows| {
        for (ri, dst) in rows.chunks_mut(inner).enumerate() {
            // Output row (o, i) of the (outer, n) grid of rows.
            let (o, i) = ((first_row + ri) / n, (first_row + ri) % n);
            blur_across(dst, &src[o * n * inner..(o + 1) * n * inner], n, i, kernel);
        }
    });
    Ok(Tensor::from_vec(out, dims, x.device())?)
}

/// G: Gaussian blur of a 4-D tensor (computed in f32, returned in f32).
pub fn gaussian_blur(x: &Tensor, kernel_size: usize, sigma: f32, axes: BlurAxes) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() != 4 {
        return Err(MathError::Invalid(format!(
            "Gaussian blur expects a 4-D tensor, got shape {dims:?}"
        )));
    }
    let g = gaussian_kernel_1d(kernel_size, sigma)?;
    let mut y = x.to_dtype(DType::F32)?;
    let first = match axes {
        BlurAxes::Volumetric => 1,
        BlurAxes::Spatial => 2,
    };
    for dim in first..4 {
        y = blur_axis(&y, dim, &g)?;
    }
    Ok(y)
}

fn same_shape(local: &Tensor, global: &Tensor) -> Result<()> {
    if local.dims() != global.dims() {
        return Err(MathError::Invalid(format!(
            "local {:?} and global {:?} predictions differ in shape",
            local.dims(),
            global.dims()
        )));
    }
    Ok(())
}

/// `G(local) + (global − G(global))` with the reference's G (kernel 2s − 1, σ = 1, over the
/// last three axes).
pub fn fuse_scales(local: &Tensor, global: &Tensor, scale: usize) -> Result<Tensor> {
    fuse_scales_with(local, global, scale, BlurAxes::Volumetric)
}

/// [`fuse_scales`] with a choice of blurred axes. Inputs of any float dtype; f32 result.
pub fn fuse_scales_with(
    local: &Tensor,
    global: &Tensor,
    scale: usize,
    axes: BlurAxes,
) -> Result<Tensor> {
    same_shape(local, global)?;
    let k = fusion_kernel_size(scale)?;
    let gl = gaussian_blur(local, k, 1.0, axes)?;
    let global = global.to_dtype(DType::F32)?;
    let gg = gaussian_blur(&global, k, 1.0, axes)?;
    // `gl + (global − gg)` element by element, the rows split between threads.
    let dims = gl.dims().to_vec();
    let row = dims[3].max(1);
    let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
    let (g, gg) = (flat(&global)?, flat(&gg)?);
    let mut out = flat(&gl)?;
    for_each_row_chunk(&mut out, row, |first_row, rows| {
        let at = first_row * row;
        let (g, gg) = (&g[at..at + rows.len()], &gg[at..at + rows.len()]);
        for ((o, &a), &b) in rows.iter_mut().zip(g).zip(gg) {
            *o += a - b;
        }
    });
    Ok(Tensor::from_vec(out, dims, &candle_core::Device::Cpu)?.to_device(local.device())?)
}

/// [`fuse_scales_with`] with one blur instead of two: G is linear (a convolution with zero
/// padding), so `G(local) + (global − G(global)) = global + G(local − global)`. Equal up to
/// f32 rounding, half the cost; the coordinator fuses whole-stage predictions with it, once
/// per step on the critical path. Inputs of any float dtype; f32 result.
pub fn fuse_scales_once(
    local: &Tensor,
    global: &Tensor,
    scale: usize,
    axes: BlurAxes,
) -> Result<Tensor> {
    same_shape(local, global)?;
    let dims: [usize; 4] = local.dims().try_into().map_err(|_| {
        MathError::Invalid(format!(
            "fusion expects 4-D tensors, got {:?}",
            local.dims()
        ))
    })?;
    let flat = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let out = fuse_scales_once_in_place(flat(local)?, flat(global)?, dims, scale, axes)?;
    Ok(
        Tensor::from_vec(out, dims.to_vec(), &candle_core::Device::Cpu)?
            .to_device(local.device())?,
    )
}

/// [`fuse_scales_once`] on owned row-major `(B, C, H, W)` f32 values, in place: `local` is
/// used as scratch and the result is returned in `global`'s buffer, so a gigapixel stage's
/// fusion holds its two inputs, one plane of scratch per pass and nothing else. The same
/// arithmetic, in the same order, as [`fuse_scales_once`]: the same bytes.
pub fn fuse_scales_once_in_place(
    mut local: Vec<f32>,
    mut global: Vec<f32>,
    dims: [usize; 4],
    scale: usize,
    axes: BlurAxes,
) -> Result<Vec<f32>> {
    let len: usize = dims.iter().product();
    if local.len() != len || global.len() != len {
        return Err(MathError::Invalid(format!(
            "local ({}) and global ({}) predictions must both hold {dims:?} = {len} values",
            local.len(),
            global.len()
        )));
    }
    let k = fusion_kernel_size(scale)?;
    let g = gaussian_kernel_1d(k, 1.0)?;
    let row = dims[3].max(1);
    for_each_row_chunk(&mut local, row, |first_row, rows| {
        let at = first_row * row;
        let g = &global[at..at + rows.len()];
        for (d, &b) in rows.iter_mut().zip(g) {
            *d -= b;
        }
    });
    let first = match axes {
        BlurAxes::Volumetric => 1,
        BlurAxes::Spatial => 2,
    };
    for dim in first..4 {
        blur_axis_in_place(&mut local, &dims, dim, &g);
    }
    // `blurred + global`: f32 addition is commutative, so adding into `global` gives the
    // bytes of adding into the blurred buffer.
    for_each_row_chunk(&mut global, row, |first_row, rows| {
        let at = first_row * row;
        let d = &local[at..at + rows.len()];
        for (o, &b) in rows.iter_mut().zip(d) {
            *o += b;
        }
    });
    Ok(global)
}

/// [`blur_axis`] on a buffer in place: each block of `(n, inner)` values along the blurred
/// axis is copied to scratch first and recomputed from it, tap by tap in kernel order.
fn blur_axis_in_place(data: &mut [f32], dims: &[usize], dim: usize, kernel: &[f32]) {
    if kernel.len() == 1 {
        // As candle's scalar product (an affine `v·k + 0`) computes it.
        for v in data.iter_mut() {
            *v = *v * kernel[0] + 0.0;
        }
        return;
    }
    let n = dims[dim];
    let inner: usize = dims[dim + 1..].iter().product();
    if inner == 1 {
        for_each_row_chunk(data, n, |_, rows| {
            let mut src = vec![0f32; n];
            for dst in rows.chunks_mut(n) {
                src.copy_from_slice(dst);
                blur_line(dst, &src, kernel);
            }
        });
        return;
    }
    let block = n * inner;
    let mut src = vec![0f32; block];
    for out in data.chunks_mut(block) {
        src.copy_from_slice(out);
        let src = &src;
        for_each_row_chunk(out, inner, |first_row, rows| {
            for (ri, dst) in rows.chunks_mut(inner).enumerate() {
                blur_across(dst, src, n, first_row + ri, kernel);
            }
        });
    }
}

/// One line of a 1-D blur along a contiguous axis: `dst = Σ_j k_j · src[· + j − r]`, zero
/// outside, tap by tap in kernel order.
fn blur_line(dst: &mut [f32], src: &[f32], kernel: &[f32]) {
    let (n, r) = (src.len(), kernel.len() / 2);
    dst.fill(0.0);
    for (j, &k) in kernel.iter().enumerate() {
        let (lo, hi) = (r.saturating_sub(j), (n + r).saturating_sub(j).min(n));
        if lo >= hi {
            continue;
        }
        let shift = lo + j - r;
        for (d, &v) in dst[lo..hi].iter_mut().zip(&src[shift..shift + (hi - lo)]) {
            *d += v * k;
        }
    }
}

/// Line `i` of a 1-D blur across lines: `src` holds `n` lines of `dst.len()` values, and
/// `dst = Σ_j k_j · src[i + j − r]`, zero outside, tap by tap in kernel order.
fn blur_across(dst: &mut [f32], src: &[f32], n: usize, i: usize, kernel: &[f32]) {
    let (inner, r) = (dst.len(), kernel.len() / 2);
    dst.fill(0.0);
    for (j, &k) in kernel.iter().enumerate() {
        let Some(si) = (i + j).checked_sub(r).filter(|&si| si < n) else {
            continue;
        };
        for (d, &v) in dst.iter_mut().zip(&src[si * inner..(si + 1) * inner]) {
            *d += v * k;
        }
    }
}

/// [`fuse_scales_once_in_place`] over the two spatial axes of `(B, C, H, W)` values, a band
/// of rows at a time, for a merge that settles the local predictions from the top down: each
/// output row needs the rows within the kernel's radius of it, so fusion can run behind the
/// merge frontier while later views are still being computed, and only the last band is left
/// for after the last view. Each value goes through the same operations in the same order as
/// in the whole-stage version, so the bytes are the same.
#[derive(Debug)]
pub struct FusionBands {
    planes: usize,
    h: usize,
    w: usize,
    kernel: Vec<f32>,
    /// Rows of `local` that hold `local − global`.
    differenced: usize,
    /// Rows of `global` that hold the fused result.
    fused: usize,
}

impl FusionBands {
    /// Fusion of `planes` (B·C) planes of `h × w` at `scale`.
    pub fn new(planes: usize, (h, w): (usize, usize), scale: usize) -> Result<Self> {
        let k = fusion_kernel_size(scale)?;
        Ok(Self {
            planes,
            h,
            w,
            kernel: gaussian_kernel_1d(k, 1.0)?,
            differenced: 0,
            fused: 0,
        })
    }

    /// Takes rows `0..settled` of `local` as final (every plane) and fuses every row whose
    /// window is now complete into `global`, which must already hold the whole merged global
    /// prediction. `local`'s settled rows become scratch.
    pub fn advance(&mut self, local: &mut [f32], global: &mut [f32], settled: usize) -> Result<()> {
        let (h, w, plane) = (self.h, self.w, self.h * self.w);
        let len = self.planes * plane;
        if local.len() != len || global.len() != len {
            return Err(MathError::Invalid(format!(
                "banded fusion of {} planes of {h}x{w} got {} local and {} global values",
                self.planes,
                local.len(),
                global.len()
            )));
        }
        let settled = settled.min(h);
        if settled > self.differenced {
            let rows = self.differenced * w..settled * w;
            for (l, g) in local.chunks_mut(plane).zip(global.chunks(plane)) {
                for (d, &b) in l[rows.clone()].iter_mut().zip(&g[rows.clone()]) {
                    *d -= b;
                }
            }
            self.differenced = settled;
        }
        let r = self.kernel.len() / 2;
        let upto = if settled == h {
            h
        } else {
            settled.saturating_sub(r)
        };
        if upto <= self.fused {
            return Ok(());
        }
        let (from, kernel, local) = (self.fused, &self.kernel, &*local);
        // Planes are independent: whole planes go to each thread.
        for_each_row_chunk(global, plane, |first_plane, outs| {
            let (mut across, mut line) = (vec![0f32; w], vec![0f32; w]);
            for (i, out) in outs.chunks_mut(plane).enumerate() {
                let p = first_plane + i;
                let src = &local[p * plane..(p + 1) * plane];
                for y in from..upto {
                    blur_across(&mut across, src, h, y, kernel);
                    blur_line(&mut line, &across, kernel);
                    for (o, &b) in out[y * w..(y + 1) * w].iter_mut().zip(&line) {
                        *o += b;
                    }
                }
            }
        });
        self.fused = upto;
        Ok(())
    }

    /// Rows of `global` that hold the fused result so far.
    pub fn fused_rows(&self) -> usize {
        self.fused
    }

    /// The rest of the rows (`local` now wholly final); the fused values, in `global`'s buffer.
    pub fn finish(mut self, local: &mut [f32], mut global: Vec<f32>) -> Result<Vec<f32>> {
        self.advance(local, &mut global, self.h)?;
        Ok(global)
    }
}

// Expected values are pasted verbatim from torch's f32 output (printed as f64 reprs).
#[cfg(test)]
#[allow(clippy::excessive_precision)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Bands settled in uneven steps (some thinner than the kernel's radius, one jump over
    /// several bands) give the whole-stage fusion's bytes, at several scales and shapes.
    #[test]
    fn banded_fusion_matches_whole_stage_fusion_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        for (scale, dims) in [
            (1, [1, 2, 9, 7]),
            (3, [2, 4, 37, 29]),
            (8, [2, 4, 70, 33]),
            (8, [2, 4, 150, 130]),
        ] {
            let [b, c, h, w] = dims;
            let n = b * c * h * w;
            let local = Tensor::randn(0f32, 1.0, n, &dev)?.to_vec1::<f32>()?;
            let global = Tensor::randn(0f32, 1.0, n, &dev)?.to_vec1::<f32>()?;
            let whole = fuse_scales_once_in_place(
                local.clone(),
                global.clone(),
                dims,
                scale,
                BlurAxes::Spatial,
            )?;
            let (mut l, mut g) = (local, global);
            let mut bands = FusionBands::new(b * c, (h, w), scale)?;
            for settled in [0, 1, 3, 4, 11, 12, h / 2, h / 2, h - 1] {
                bands.advance(&mut l, &mut g, settled)?;
            }
            let banded = bands.finish(&mut l, g)?;
            assert!(
                whole
                    .iter()
                    .zip(&banded)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "scale {scale}, {dims:?}"
            );
        }
        let mut bands = FusionBands::new(2, (4, 4), 2)?;
        assert!(bands.advance(&mut [0.0; 8], &mut [0.0; 32], 1).is_err());
        Ok(())
    }

    fn close(got: f32, want: f32, tol: f32) {
        assert!((got - want).abs() <= tol, "{got} vs {want}");
    }

    /// `sin(0.37·i + 0.1)` / `cos(0.21·i)` over the flat index, as built with torch in
    /// /tmp/ref/misc.py.
    fn inputs() -> Result<(Tensor, Tensor)> {
        let n = 2 * 5 * 6 * 3;
        let l: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + 0.1).sin()).collect();
        let g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.21).cos()).collect();
        let dev = Device::Cpu;
        Ok((
            Tensor::from_vec(l, (2, 5, 6, 3), &dev)?,
            Tensor::from_vec(g, (2, 5, 6, 3), &dev)?,
        ))
    }

    #[test]
    fn the_f64_kernel_is_the_f32_kernel_to_an_ulp() -> Result<()> {
        for size in (1..=63).step_by(2) {
            let single = gaussian_kernel_1d(size, 1.0)?;
            let double = gaussian_kernel_1d_f64(size, 1.0)?;
            for (a, b) in single.iter().zip(&double) {
                let b = *b as f32;
                assert!(
                    a.to_bits().abs_diff(b.to_bits()) <= 1,
                    "size {size}: {a} vs {b}"
                );
                if size <= 3 {
                    assert_eq!(a.to_bits(), b.to_bits(), "size {size}");
                }
            }
        }
        assert!(gaussian_kernel_1d_f64(4, 1.0).is_err());
        assert!(gaussian_kernel_1d_f64(3, 0.0).is_err());
        Ok(())
    }

    #[test]
    fn kernels_match_reference_gaussian_kernel() -> Result<()> {
        // Expected values: `gaussian_kernel(k)` of scale_attention.py run with torch
        // (/tmp/ref/misc.py), the 1-D factor and three entries of the 3-D kernel for k = 3.
        let want: [(usize, &[f32]); 4] = [
            (1, &[1.0]),
            (
                3,
                &[0.2740686237812042, 0.45186275243759155, 0.2740686237812042],
            ),
            (
                5,
                &[
                    0.054488688707351685,
                    0.24420136213302612,
                    0.40261995792388916,
                    0.24420136213302612,
                    0.054488688707351685,
                ],
            ),
            (
                7,
                &[
                    0.004433047957718372,
                    0.05400557816028595,
                    0.24203622341156006,
                    0.3990502655506134,
                    0.24203622341156006,
                    0.05400557816028595,
                    0.004433047957718372,
                ],
            ),
        ];
        for (k, w) in want {
            let g = gaussian_kernel_1d(k, 1.0)?;
            assert_eq!(g.len(), k);
            for (a, b) in g.iter().zip(w) {
                close(*a, *b, 1e-7);
            }
        }
        let g3 = gaussian_kernel_3d(3, 1.0)?;
        close(g3[13], 0.09226131439208984, 1e-8); // centre (1,1,1)
        close(g3[0], 0.02058628387749195, 1e-8); // corner (0,0,0)
        close(g3[4], 0.055959317833185196, 1e-8); // (0,1,1)
        assert!(gaussian_kernel_1d(4, 1.0).is_err());
        assert_eq!(fusion_kernel_size(8)?, 15);
        assert_eq!(scale_count((512, 256), (128, 128))?, 4);
        Ok(())
    }

    #[test]
    fn one_blur_fusion_equals_the_two_blur_form() -> Result<()> {
        let (local, global) = inputs()?;
        for (scale, axes) in [
            (2, BlurAxes::Spatial),
            (4, BlurAxes::Spatial),
            (3, BlurAxes::Volumetric),
        ] {
            let two = fuse_scales_with(&local, &global, scale, axes)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let one = fuse_scales_once(&local, &global, scale, axes)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (a, b) in one.iter().zip(&two) {
                close(*a, *b, 1e-5);
            }
        }
        assert!(fuse_scales_once(&local, &global.narrow(0, 0, 1)?, 2, BlurAxes::Spatial).is_err());
        Ok(())
    }

    #[test]
    fn blur_and_fusion_match_reference_gaussian_filter() -> Result<()> {
        // Expected values: `gaussian_filter` (F.conv3d, groups = batch) and
        // `gaussian_local + (attn_output_global − gaussian_global)` from scale_attention.py,
        // run with torch on the (2, 5, 6, 3) inputs above (/tmp/ref/misc.py), flat indices
        // [0, 7, 50, 89, 133, 179], plus Σ|fused|.
        let (local, global) = inputs()?;
        let idx = [0usize, 7, 50, 89, 133, 179];
        let cases: [(usize, [f32; 6], [f32; 6], f32); 2] = [
            (
                2,
                [
                    0.22496850788593292,
                    0.1457928568124771,
                    -0.18108542263507843,
                    0.25485602021217346,
                    -0.5259168744087219,
                    0.10271629691123962,
                ],
                [
                    1.0894922018051147,
                    0.08215811103582382,
                    -0.6525181531906128,
                    1.1017565727233887,
                    -1.457495093345642,
                    0.957546591758728,
                ],
                116.82972717285156,
            ),
            (
                3,
                [
                    0.20958666503429413,
                    0.08446832746267319,
                    -0.1827118694782257,
                    0.1710382103919983,
                    -0.3633277118206024,
                    0.1252659410238266,
                ],
                [
                    1.1011784076690674,
                    0.10081426054239273,
                    -0.6435685157775879,
                    1.0515656471252441,
                    -1.275729775428772,
                    1.0117343664169312,
                ],
                114.0733413696289,
            ),
        ];
        for (s, blur, fused, abs_sum) in cases {
            let k = fusion_kernel_size(s)?;
            let b = gaussian_blur(&local, k, 1.0, BlurAxes::Volumetric)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let f = fuse_scales(&local, &global, s)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (j, &i) in idx.iter().enumerate() {
                close(b[i], blur[j], 2e-6);
                close(f[i], fused[j], 2e-6);
            }
            close(f.iter().map(|v| v.abs()).sum(), abs_sum, 1e-3);
        }
        Ok(())
    }

    #[test]
    fn scale_one_is_identity_and_spatial_blur_keeps_channels_apart() -> Result<()> {
        let (local, global) = inputs()?;
        // s = 1: kernel size 1, G is the identity, fusion returns the local branch (at the
        // training size local and global coincide anyway).
        let f = fuse_scales(&local, &global, 1)?;
        let d = (f - &local)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-6);
        // Spatial blur of a tensor constant along axes 2, 3 away from the border touches
        // nothing along axis 1: a one-hot channel stays one-hot.
        let mut v = vec![0f32; 4 * 9 * 9];
        for i in 0..81 {
            v[81 + i] = 1.0;
        }
        let x = Tensor::from_vec(v, (1, 4, 9, 9), &Device::Cpu)?;
        let b = gaussian_blur(&x, 3, 1.0, BlurAxes::Spatial)?;
        let ch0 = b.get(0)?.get(0)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let centre = b.get(0)?.get(1)?.get(4)?.get(4)?.to_scalar::<f32>()?;
        assert_eq!(ch0, 0.0);
        close(centre, 1.0, 1e-6);
        assert!(fuse_scales(&local, &global.narrow(0, 0, 1)?, 2).is_err());
        Ok(())
    }

    #[test]
    fn volumetric_kernels_at_2x_4x_8x_match_reference() -> Result<()> {
        // Expected: tests/parity/ref_formulas.py, the reference's own `gaussian_kernel(k, 1.0,
        // 1)` imported from scale_attention.py (torch f32), entries of the 3-D kernel at
        // (i, j, l) for the kernel sizes of s = 3, 4 and 8 (k = 2s − 1), and its sum.
        type Case = (usize, [((usize, usize, usize), f32); 6], f32);
        let cases: [Case; 3] = [
            (
                5,
                [
                    ((0, 0, 0), 0.00016177786164917052),
                    ((0, 2, 2), 0.008832770399749279),
                    ((2, 2, 2), 0.06526583433151245),
                    ((2, 2, 0), 0.008832770399749279),
                    ((1, 2, 3), 0.024009961634874344),
                    ((4, 0, 2), 0.0011953855864703655),
                ],
                1.0000001192092896,
            ),
            (
                7,
                [
                    ((0, 0, 0), 8.711787558013384e-08),
                    ((0, 3, 3), 0.000705923477653414),
                    ((3, 3, 3), 0.06354520469903946),
                    ((3, 3, 0), 0.000705923477653414),
                    ((2, 3, 4), 0.02337697707116604),
                    ((6, 0, 3), 7.842101695132442e-06),
                ],
                0.9999998807907104,
            ),
            (
                15,
                [
                    ((0, 0, 0), 7.622296589945345e-34),
                    ((0, 7, 7), 1.4538360749646873e-12),
                    ((7, 7, 7), 0.06349363923072815),
                    ((7, 7, 0), 1.4538360749646873e-12),
                    ((6, 7, 8), 0.02335800603032112),
                    ((14, 0, 7), 3.3288993033571296e-23),
                ],
                1.0000001192092896,
            ),
        ];
        for (k, entries, sum) in cases {
            let g = gaussian_kernel_3d(k, 1.0)?;
            assert_eq!(g.len(), k * k * k);
            for ((i, j, l), want) in entries {
                let got = g[(i * k + j) * k + l];
                // Relative: the corner of k = 15 is ~1e-33.
                assert!(
                    (got - want).abs() <= 2e-7 * want,
                    "k={k} ({i},{j},{l}): {got} vs {want}"
                );
            }
            // torch sums pairwise in f32; summed in f64 here, both are 1 to about 1e-7.
            let total: f64 = g.iter().map(|&v| f64::from(v)).sum();
            assert!((total - f64::from(sum)).abs() < 1e-6, "k={k}: sum {total}");
        }
        assert_eq!(fusion_kernel_size(8)?, 15);
        Ok(())
    }

    #[test]
    fn in_place_blur_gives_the_bytes_of_the_tensor_blur() -> Result<()> {
        let (x, _) = inputs()?;
        let dims: [usize; 4] = x.dims().try_into().unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (k, axes) in [
            (3, BlurAxes::Spatial),
            (5, BlurAxes::Volumetric),
            (1, BlurAxes::Spatial),
        ] {
            let want = flat(&gaussian_blur(&x, k, 1.0, axes)?);
            let mut got = flat(&x);
            let g = gaussian_kernel_1d(k, 1.0)?;
            let first = if axes == BlurAxes::Spatial { 2 } else { 1 };
            for dim in first..4 {
                blur_axis_in_place(&mut got, &dims, dim, &g);
            }
            let same = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "kernel {k} {axes:?}");
        }
        let bad = fuse_scales_once_in_place(
            vec![0.0; 3],
            vec![0.0; 4],
            [1, 1, 2, 2],
            2,
            BlurAxes::Spatial,
        );
        assert!(bad.is_err());
        Ok(())
    }
}
