//! FreeU (Si et al. 2023) as diffusers applies it (`utils/torch_utils.py`, `apply_freeu` and
//! `fourier_filter`): in the first two up blocks, the backbone's first half of channels is
//! scaled up and the skip connection's lowest frequencies are damped.

use candle_core::{DType, Device, Result, Tensor};

use super::FreeU;

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
}
