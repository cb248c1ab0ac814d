//! FreCaS's frequency-aware CFG (paper §3.3; reference `utils/facfg_wrapper.py`,
//! `freq_decompose` and `facfg_forward`).
//!
//! In a stage above the first, the previous stage already fixed the low frequencies; the new
//! stage mostly adds detail. So each prediction is split into a low band, what survives a
//! round trip through the previous stage's latent size (`F.interpolate(.., mode="bilinear")`
//! down then up, align_corners = false, no antialias), and the high remainder, and each band
//! gets its own guidance weight: `ε = Σ_band ε_u^band + w_band·(ε_c^band − ε_u^band)`.
//! The reference then feeds `[0, ε/gs]` through the pipeline's own CFG, which returns ε up to
//! rounding; here ε is returned directly.

use crate::error::{MathError, Result};
use candle_core::{DType, Tensor};

/// Guidance weights per band, `--facfg_weight W_HIGH W_LOW` order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaCfgWeights {
    pub high: f64,
    pub low: f64,
}

impl FaCfgWeights {
    /// From the reference's `[w_high, w_low]` list.
    pub fn from_pair([high, low]: [f64; 2]) -> Self {
        Self { high, low }
    }
}

/// Splits a `(B, C, H, W)` tensor into `(high, low)`: low = up(down(x, low_hw), (H, W)) with
/// bilinear resampling, align_corners = false (candle's `upsample_bilinear2d`, which follows
/// torch's source-index rule `(dst + ½)·in/out − ½` clamped at 0, also when shrinking),
/// high = x − low. Computed in f32.
pub fn frequency_split(x: &Tensor, low_hw: (usize, usize)) -> Result<(Tensor, Tensor)> {
    let x = x.to_dtype(DType::F32)?;
    let low = low_band(&x, low_hw)?;
    let high = (&x - &low)?;
    Ok((high, low))
}

/// The low band of [`frequency_split`]: `up(down(x, low_hw), (H, W))`, in f32.
fn low_band(x: &Tensor, low_hw: (usize, usize)) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if low_hw.0 == 0 || low_hw.1 == 0 {
        return Err(MathError::Invalid(format!(
            "low-band size {}x{} must be positive",
            low_hw.0, low_hw.1
        )));
    }
    Ok(x.to_dtype(DType::F32)?
        .upsample_bilinear2d(low_hw.0, low_hw.1, false)?
        .upsample_bilinear2d(h, w, false)?)
}

/// FA-CFG of merged unconditional and conditional predictions; `low_hw` is the previous
/// stage's latent size. f32 result.
pub fn fa_cfg(
    uncond: &Tensor,
    cond: &Tensor,
    low_hw: (usize, usize),
    weights: FaCfgWeights,
) -> Result<Tensor> {
    if uncond.dims() != cond.dims() {
        return Err(MathError::Invalid(format!(
            "unconditional {:?} and conditional {:?} predictions differ in shape",
            uncond.dims(),
            cond.dims()
        )));
    }
    let flat = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let low = |t: &Tensor| -> Result<Vec<f32>> { flat(&low_band(t, low_hw)?) };
    // One pass over the values instead of a dozen whole-latent temporaries (a 32K latent is
    // 268 MB each), with the tensor form's arithmetic: `frequency_split`'s `high = x − low`,
    // then the reference's `_uncout + _gsw*(_cout-_uncout)` per band, summed high then low.
    // A scalar product is candle's affine `v·w + 0`, kept as such.
    let (ul, cl) = (low(uncond)?, low(cond)?);
    let c = flat(cond)?;
    let mut out = flat(uncond)?;
    let (wh, wl) = (weights.high as f32, weights.low as f32);
    for (((o, &c), &ul), &cl) in out.iter_mut().zip(&c).zip(&ul).zip(&cl) {
        *o = fa_cfg_value((*o, c), (ul, cl), (wh, wl));
    }
    Ok(Tensor::from_vec(out, uncond.dims(), uncond.device())?)
}

/// FA-CFG of one value: the halves `(u, c)`, their low bands `(ul, cl)` and the weights
/// `(w_high, w_low)` in f32 — [`fa_cfg`]'s arithmetic.
#[inline]
fn fa_cfg_value((u, c): (f32, f32), (ul, cl): (f32, f32), (wh, wl): (f32, f32)) -> f32 {
    let (uh, ch) = (u - ul, c - cl);
    let high = uh + ((ch - uh) * wh + 0.0);
    let low = ul + ((cl - ul) * wl + 0.0);
    high + low
}

/// An output index's two source indices and the weight of the second.
type Tap = (usize, usize, f64);

/// One axis of candle's bilinear resampling from `n_in` to `n_out` (size mode,
/// align_corners = false): per output index its [`Tap`], as `upsample_bilinear2d` computes
/// them (torch's `(o + ½)·in/out − ½`, clamped at 0).
fn taps(n_in: usize, n_out: usize) -> Vec<Tap> {
    let scale = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|o| {
            let src = (scale * (o as f64 + 0.5) - 0.5).max(0.0);
            let i0 = src.floor() as usize;
            let i1 = (i0 + 1).min(n_in - 1);
            (i0, i1, (src - i0 as f64).clamp(0.0, 1.0))
        })
        .collect()
}

/// The value at row tap `(r0, r1, wr)` and column tap `(c0, c1, wc)` of a bilinear resampling
/// of the plane `src` (rows of `w_in` values): candle's f64 arithmetic, rounded to f32.
#[inline]
fn resample_at(src: &[f32], w_in: usize, (r0, r1, wr): Tap, (c0, c1, wc): Tap) -> f32 {
    let (top, bottom) = (&src[r0 * w_in..], &src[r1 * w_in..]);
    let t = f64::from(top[c0]) * (1.0 - wc) + f64::from(top[c1]) * wc;
    let b = f64::from(bottom[c0]) * (1.0 - wc) + f64::from(bottom[c1]) * wc;
    (t * (1.0 - wr) + b * wr) as f32
}

/// [`fa_cfg`] a band of rows at a time, for merged predictions that become final from the
/// top down: a row of the low band needs two rows of the previous stage's size, each of which
/// needs two rows of the prediction, so the guided rows follow the final ones a few rows
/// behind. Each value goes through [`fa_cfg`]'s arithmetic (the resampling as candle's), so
/// the bytes are the same.
#[derive(Debug)]
pub struct FaCfgBands {
    weights: (f32, f32),
    planes: usize,
    hw: (usize, usize),
    low_hw: (usize, usize),
    /// No resampling: the low band is the prediction itself (candle returns a copy).
    identity: bool,
    /// The resampling taps down to the previous stage's size and back up, (rows, columns).
    down: (Vec<Tap>, Vec<Tap>),
    up: (Vec<Tap>, Vec<Tap>),
    /// The halves shrunk to the previous stage's size, `planes × low_h × low_w` each, rows
    /// `0..low_done` computed.
    low: (Vec<f32>, Vec<f32>),
    low_done: usize,
}

impl FaCfgBands {
    /// FA-CFG of `planes` planes of `hw` whose low band goes through `low_hw`.
    pub fn new(
        planes: usize,
        hw: (usize, usize),
        low_hw: (usize, usize),
        weights: FaCfgWeights,
    ) -> Result<Self> {
        if low_hw.0 == 0 || low_hw.1 == 0 || hw.0 == 0 || hw.1 == 0 {
            return Err(MathError::Invalid(format!(
                "FA-CFG of {}x{} through a low band of {}x{}",
                hw.0, hw.1, low_hw.0, low_hw.1
            )));
        }
        let n = planes * low_hw.0 * low_hw.1;
        Ok(Self {
            weights: (weights.high as f32, weights.low as f32),
            planes,
            hw,
            low_hw,
            identity: hw == low_hw,
            down: (taps(hw.0, low_hw.0), taps(hw.1, low_hw.1)),
            up: (taps(low_hw.0, hw.0), taps(low_hw.1, hw.1)),
            low: (vec![0.0; n], vec![0.0; n]),
            low_done: 0,
        })
    }

    /// Takes rows `0..upto` of the merged halves (`planes` planes each, full size) as final
    /// and returns how many rows of the guided prediction can now be computed.
    pub fn advance(&mut self, uncond: &[f32], cond: &[f32], upto: usize) -> usize {
        let (h, w) = self.hw;
        let upto = upto.min(h);
        if self.identity {
            return upto;
        }
        let (lh, lw) = self.low_hw;
        let ready_low = if upto == h {
            lh
        } else {
            self.down.0.iter().take_while(|t| t.1 < upto).count()
        };
        for r in self.low_done..ready_low {
            for p in 0..self.planes {
                let row = p * lh * lw + r * lw;
                for (src, low) in [(uncond, &mut self.low.0), (cond, &mut self.low.1)] {
                    let plane = &src[p * h * w..(p + 1) * h * w];
                    for (o, &col) in low[row..row + lw].iter_mut().zip(&self.down.1) {
                        *o = resample_at(plane, w, self.down.0[r], col);
                    }
                }
            }
        }
        self.low_done = self.low_done.max(ready_low);
        if upto == h {
            return h;
        }
        self.up
            .0
            .iter()
            .take_while(|t| t.1 < self.low_done)
            .count()
            .min(upto)
    }

    /// Row `y` of plane `p` of the guided prediction into `out` (`w` values), from the merged
    /// halves' row `y`; `y` must be below what [`Self::advance`] returned.
    pub fn guide_row(&self, p: usize, y: usize, (u, c): (&[f32], &[f32]), out: &mut [f32]) {
        if self.identity {
            for ((o, &u), &c) in out.iter_mut().zip(u).zip(c) {
                *o = fa_cfg_value((u, c), (u, c), self.weights);
            }
            return;
        }
        let (lh, lw) = self.low_hw;
        let plane = p * lh * lw..(p + 1) * lh * lw;
        let (lu, lc) = (&self.low.0[plane.clone()], &self.low.1[plane]);
        let row = self.up.0[y];
        for (((o, &u), &c), &col) in out.iter_mut().zip(u).zip(c).zip(&self.up.1) {
            let low = (resample_at(lu, lw, row, col), resample_at(lc, lw, row, col));
            *o = fa_cfg_value((u, c), low, self.weights);
        }
    }
}

// Expected values are pasted verbatim from torch's f32 output (printed as f64 reprs).
#[cfg(test)]
#[allow(clippy::excessive_precision)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `sin(0.37·i + 0.1)` (or `cos(0.21·i)`) over the flat index of a (1, 2, 6, 8) tensor,
    /// as built with torch in /tmp/ref/misc.py.
    fn wave(cos: bool) -> Result<Tensor> {
        let v: Vec<f32> = (0..96)
            .map(|i| {
                if cos {
                    (i as f32 * 0.21).cos()
                } else {
                    (i as f32 * 0.37 + 0.1).sin()
                }
            })
            .collect();
        Ok(Tensor::from_vec(v, (1, 2, 6, 8), &Device::Cpu)?)
    }

    /// Bands of uneven heights (one row, several, the rest) give the whole-latent FA-CFG bit
    /// for bit: integer and non-integer ratios, one axis unchanged, and no resampling at all.
    #[test]
    fn banded_fa_cfg_matches_the_whole_latent_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        let weights = FaCfgWeights {
            high: 7.5,
            low: 35.0,
        };
        for ((h, w), low_hw) in [
            ((32, 24), (16, 12)),
            ((37, 29), (19, 15)),
            ((40, 30), (40, 17)),
            ((12, 10), (12, 10)),
        ] {
            let c = 3;
            let u = Tensor::randn(0f32, 1.0, (1, c, h, w), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (1, c, h, w), &dev)?;
            let want = fa_cfg(&u, &k, low_hw, weights)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let (uv, kv) = (
                u.flatten_all()?.to_vec1::<f32>()?,
                k.flatten_all()?.to_vec1::<f32>()?,
            );
            let mut bands = FaCfgBands::new(c, (h, w), low_hw, weights)?;
            let mut got = vec![f32::NAN; c * h * w];
            // The halves as the merge has them: rows not final yet are NaN, so reading one
            // early shows in the result.
            let (mut us, mut ks) = (vec![f32::NAN; c * h * w], vec![f32::NAN; c * h * w]);
            let (mut done, mut seen) = (0, 0);
            let mut steps = vec![1, 2, 7, 8, h / 2, h - 1, h];
            steps.sort_unstable();
            for upto in steps {
                for p in 0..c {
                    let rows = p * h * w + seen * w..p * h * w + upto * w;
                    us[rows.clone()].copy_from_slice(&uv[rows.clone()]);
                    ks[rows.clone()].copy_from_slice(&kv[rows]);
                }
                seen = upto;
                let ready = bands.advance(&us, &ks, upto);
                assert!(
                    ready <= upto && ready >= done,
                    "{ready} after {done} at {upto}"
                );
                for p in 0..c {
                    for y in done..ready {
                        let row = p * h * w + y * w..p * h * w + (y + 1) * w;
                        let (ur, kr) = (&us[row.clone()], &ks[row.clone()]);
                        bands.guide_row(p, y, (ur, kr), &mut got[row]);
                    }
                }
                done = ready;
            }
            assert_eq!(done, h);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{h}x{w} through {low_hw:?}");
        }
        Ok(())
    }

    /// (low-band size, expected low values, expected high values).
    type SplitCase = ((usize, usize), [f32; 6], [f32; 6]);

    #[test]
    fn split_matches_torch_interpolate() -> Result<()> {
        // Expected: `freq_decompose` of facfg_wrapper.py (F.interpolate bilinear down to
        // tsize and back up) run with torch in /tmp/ref/misc.py; flat indices
        // [0, 5, 17, 40, 77, 95]. (5, 3) shrinks rows by a non-integer factor and (4, 6)
        // shrinks both axes by 1.5 / 1.33.
        let x = wave(false)?;
        let idx = [0usize, 5, 17, 40, 77, 95];
        let cases: [SplitCase; 3] = [
            (
                (3, 4),
                [
                    0.0874490886926651,
                    -0.023541804403066635,
                    0.08318594843149185,
                    0.07679937034845352,
                    0.07961826771497726,
                    0.07364435493946075,
                ],
                [
                    0.012384332716464996,
                    0.9525015354156494,
                    0.023425616323947906,
                    0.6460815668106079,
                    -0.3900681734085083,
                    -0.7120928764343262,
                ],
            ),
            (
                (5, 3),
                [
                    0.3322959244251251,
                    0.6414393186569214,
                    -0.014979587867856026,
                    0.3956027328968048,
                    0.04342319071292877,
                    -0.28042367100715637,
                ],
                [
                    -0.23246249556541443,
                    0.2875204086303711,
                    0.12159115076065063,
                    0.3272782266139984,
                    -0.353873074054718,
                    -0.35802486538887024,
                ],
            ),
            (
                (4, 6),
                [
                    0.12413523346185684,
                    0.4324851930141449,
                    0.005889804568141699,
                    0.3721204400062561,
                    -0.12710490822792053,
                    -0.25873953104019165,
                ],
                [
                    -0.024301812052726746,
                    0.4964745342731476,
                    0.10072176158428192,
                    0.3507605195045471,
                    -0.1833449900150299,
                    -0.37970900535583496,
                ],
            ),
        ];
        for (hw, low, high) in cases {
            let (h, l) = frequency_split(&x, hw)?;
            let h = h.flatten_all()?.to_vec1::<f32>()?;
            let l = l.flatten_all()?.to_vec1::<f32>()?;
            for (j, &i) in idx.iter().enumerate() {
                assert!(
                    (l[i] - low[j]).abs() < 1e-6,
                    "{hw:?} low[{i}] {} vs {}",
                    l[i],
                    low[j]
                );
                assert!(
                    (h[i] - high[j]).abs() < 1e-6,
                    "{hw:?} high[{i}] {} vs {}",
                    h[i],
                    high[j]
                );
            }
        }
        Ok(())
    }

    #[test]
    fn fa_cfg_matches_reference_band_sum() -> Result<()> {
        // Expected: `sum([u + w*(c-u) for u, c, w in zip(freq_decompose(u), freq_decompose(c),
        // [35.0, 7.5])])` with u = sin wave, c = cos wave, tsize (3, 4), torch
        // (/tmp/ref/misc.py).
        let u = wave(false)?;
        let c = wave(true)?;
        let got = fa_cfg(&u, &c, (3, 4), FaCfgWeights::from_pair([35.0, 7.5]))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let want = [
            23.318283081054688,
            -9.202779769897461,
            -31.38697052001953,
            -44.07026290893555,
            -10.506627082824707,
            21.560470581054688,
        ];
        for (j, &i) in [0usize, 5, 17, 40, 77, 95].iter().enumerate() {
            assert!(
                (got[i] - want[j]).abs() < 2e-5,
                "[{i}] {} vs {}",
                got[i],
                want[j]
            );
        }
        Ok(())
    }

    #[test]
    fn equal_weights_reduce_to_plain_cfg() -> Result<()> {
        let u = wave(false)?;
        let c = wave(true)?;
        let got = fa_cfg(
            &u,
            &c,
            (3, 4),
            FaCfgWeights {
                high: 7.5,
                low: 7.5,
            },
        )?;
        let plain = crate::method::guidance::classifier_free(&u, &c, 7.5)?;
        let d = (got - plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "max difference {d}");
        assert!(fa_cfg(
            &u,
            &c.narrow(3, 0, 4)?,
            (3, 4),
            FaCfgWeights::from_pair([1.0, 1.0])
        )
        .is_err());
        assert!(frequency_split(&u, (0, 4)).is_err());
        Ok(())
    }

    #[test]
    fn split_at_stage_ratio_two_matches_reference_freq_decompose() -> Result<()> {
        // Expected: tests/parity/ref_formulas.py, the reference's own `freq_decompose`
        // imported from FreCaS utils/facfg_wrapper.py (torch f32), on `sin(0.37·i + 0.1)` over
        // a latent-shaped (1, 4, 16, 16) tensor with tsize (8, 8), the previous stage's latent
        // at the presets' size ratio 2; flat indices [0, 17, 255, 600, 1023].
        let v: Vec<f32> = (0..1024).map(|i| (i as f32 * 0.37 + 0.1).sin()).collect();
        let x = Tensor::from_vec(v, (1, 4, 16, 16), &Device::Cpu)?;
        let (high, low) = frequency_split(&x, (8, 8))?;
        let (high, low) = (
            high.flatten_all()?.to_vec1::<f32>()?,
            low.flatten_all()?.to_vec1::<f32>()?,
        );
        let want_low = [
            0.0997934341430664,
            0.09282156825065613,
            0.19094206392765045,
            0.7056587338447571,
            0.9658105373382568,
        ];
        let want_high = [
            3.9987266063690186e-05,
            0.01378999650478363,
            0.009899914264678955,
            0.10954004526138306,
            0.03303283452987671,
        ];
        for (j, i) in [0usize, 17, 255, 600, 1023].into_iter().enumerate() {
            assert!((low[i] - want_low[j]).abs() < 1e-6, "low[{i}] {}", low[i]);
            assert!(
                (high[i] - want_high[j]).abs() < 1e-6,
                "high[{i}] {}",
                high[i]
            );
        }
        Ok(())
    }
}
