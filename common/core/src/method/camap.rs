//! FreCaS's cross-attention map reuse (paper §3.4; reference `utils/camap_wrapper.py`).
//!
//! At the last step of a non-final stage every cross-attention layer's probabilities
//! `softmax(QKᵀ/√d)` are averaged over heads, giving `(B, h·w, n_text)` per layer. Maps of one
//! resolution are averaged; the resolutions are then brought to the largest and averaged with
//! equal weight per resolution. In later stages each cross-attention output becomes
//! `(1 − w)·out + w·(map · V)`.
//!
//! Difference from the reference: it resizes `(B, 1, h·w, n_text)` with `F.interpolate` along
//! the flattened token axis, which does not correspond to a spatial resize (stretching a
//! row-major 64² map to 128² tokens turns each source row into two output rows holding its
//! two halves). Tessera stores the map spatially, `(B, h0, w0, n_text)`, and resizes it
//! spatially (bilinear, align_corners = false), because a tile needs the part of the map
//! under it. [`resize_token_axis`] reproduces the reference's resize for comparison.

use std::collections::BTreeMap;

use crate::error::{invalid, MathError, Result};
use candle_core::{DType, Device, Tensor};

/// A head- and layer-averaged cross-attention map, `(B, h0, w0, n_text)` f32, on the grid of
/// the stage latent it was captured at (the largest attention resolution).
#[derive(Debug, Clone)]
pub struct CaMap {
    map: Tensor,
}

/// Sums per-layer maps by resolution, in the order layers are added (a forward pass visits
/// them in a fixed order, so the sums are reproducible).
#[derive(Debug, Default)]
pub struct CaMapCollector {
    /// (h, w) → (sum, count); BTreeMap so iteration does not depend on hashing.
    by_res: BTreeMap<(usize, usize), (Tensor, usize)>,
}

impl CaMapCollector {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one layer's head-averaged probabilities `(B, h·w, n_text)` captured on an
    /// `h × w` token grid.
    pub fn add(&mut self, probs: &Tensor, hw: (usize, usize)) -> Result<()> {
        let (b, n, t) = probs.dims3()?;
        if n != hw.0 * hw.1 || n == 0 {
            return invalid(format!(
                "map has {n} tokens but its grid is {}x{}",
                hw.0, hw.1
            ));
        }
        let spatial = probs.to_dtype(DType::F32)?.reshape((b, hw.0, hw.1, t))?;
        if let Some((first, _)) = self.by_res.values().next() {
            let (fb, _, _, ft) = first.dims4()?;
            if (fb, ft) != (b, t) {
                return invalid(format!(
                    "map batch/text {:?} differs from earlier maps {:?}",
                    (b, t),
                    (fb, ft)
                ));
            }
        }
        match self.by_res.get_mut(&hw) {
            Some((sum, count)) => {
                *sum = (&*sum + spatial)?;
                *count += 1;
            }
            None => {
                self.by_res.insert(hw, (spatial, 1));
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.by_res.is_empty()
    }

    /// Average within each resolution, resize each to the largest grid, average across
    /// resolutions with equal weight (the reference divides by the number of resolutions).
    pub fn finish(self) -> Result<CaMap> {
        let target = self
            .by_res
            .keys()
            .copied()
            .max_by_key(|&(h, w)| (h * w, h))
            .ok_or_else(|| MathError::Invalid("no cross-attention maps were captured".into()))?;
        // Largest first, then by descending size: a fixed summation order.
        let mut entries: Vec<_> = self.by_res.into_iter().collect();
        entries.sort_by_key(|&((h, w), _)| std::cmp::Reverse((h * w, h, w)));
        let n_res = entries.len();
        let mut acc: Option<Tensor> = None;
        for (_, (sum, count)) in entries {
            let mean = (sum / count as f64)?;
            let at_target = resize_spatial(&mean, target)?;
            acc = Some(match acc {
                None => at_target,
                Some(a) => (a + at_target)?,
            });
        }
        let map = (acc.expect("at least one resolution") / n_res as f64)?;
        Ok(CaMap { map })
    }
}

/// Bilinear resize (align_corners = false) of a `(B, h, w, n)` map to `(B, hw.0, hw.1, n)`,
/// torch's `F.interpolate` on the spatial axes.
pub fn resize_spatial(map: &Tensor, hw: (usize, usize)) -> Result<Tensor> {
    if hw.0 == 0 || hw.1 == 0 {
        return invalid("resize target must be positive");
    }
    let m = map
        .to_dtype(DType::F32)?
        .permute((0, 3, 1, 2))?
        .contiguous()?;
    Ok(m.upsample_bilinear2d(hw.0, hw.1, false)?
        .permute((0, 2, 3, 1))?
        .contiguous()?)
}

/// The reference's resize of `(B, N, n)` to `(B, n_out, n)`: 1-D linear interpolation along
/// the flattened token axis, align_corners = false (what `F.interpolate(.., size=(s1, s2),
/// mode="bilinear")` does to `(B, 1, N, n)` when n is unchanged).
pub fn resize_token_axis(map: &Tensor, n_out: usize) -> Result<Tensor> {
    let (_, _, t) = map.dims3()?;
    if n_out == 0 {
        return invalid("resize target must be positive");
    }
    Ok(map
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .upsample_bilinear2d(n_out, t, false)?
        .squeeze(1)?)
}

/// Where a view lies in the stage latent, for cutting its part of the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ViewPlacement {
    /// A window whose top-left latent pixel is (top, left) (may be negative after jitter).
    Window { top: i64, left: i64 },
    /// The strided view `z[.., p::s_h, q::s_w]`.
    Strided {
        phase: (usize, usize),
        strides: (usize, usize),
    },
}

impl CaMap {
    /// Wraps an existing `(B, h0, w0, n_text)` map.
    pub fn from_tensor(map: Tensor) -> Result<Self> {
        map.dims4()?;
        Ok(Self {
            map: map.to_dtype(DType::F32)?,
        })
    }

    pub fn tensor(&self) -> &Tensor {
        &self.map
    }

    /// (h0, w0).
    pub fn grid(&self) -> Result<(usize, usize)> {
        let (_, h, w, _) = self.map.dims4()?;
        Ok((h, w))
    }

    pub fn resize(&self, hw: (usize, usize)) -> Result<CaMap> {
        Ok(CaMap {
            map: resize_spatial(&self.map, hw)?,
        })
    }

    /// Rows `top..top+h`, columns `left..left+w` of the map's own grid.
    pub fn crop(&self, top: usize, left: usize, h: usize, w: usize) -> Result<CaMap> {
        Ok(CaMap {
            map: self.map.narrow(1, top, h)?.narrow(2, left, w)?,
        })
    }

    /// The map as one attention layer inside a view sees it: `(B, lh·lw, n_text)` for a
    /// layer with an `lh × lw` token grid over a view of `view_hw` latent pixels placed at
    /// `placement` in a stage latent of `stage_hw`.
    ///
    /// Each layer token is sampled at its centre in latent coordinates with the bilinear,
    /// align_corners = false rule of the map's grid over the whole stage, so for an aligned
    /// window this equals resizing the map to the full-stage layer grid and cropping; parts
    /// of a view outside the latent (jitter, padding) read the nearest edge value.
    pub fn for_view(
        &self,
        stage_hw: (usize, usize),
        view_hw: (usize, usize),
        layer_hw: (usize, usize),
        placement: ViewPlacement,
    ) -> Result<Tensor> {
        let flat = FlatCaMap::new(self)?;
        let (b, _, _, t) = flat.dims;
        let out = flat.view(stage_hw, view_hw, layer_hw, placement)?;
        Ok(
            Tensor::from_vec(out, (b, layer_hw.0 * layer_hw.1, t), &Device::Cpu)?
                .to_device(self.map.device())?,
        )
    }
}

/// A stage's map with its values read out once, to cut many views from (a worker keeps one
/// per stage: every view task of the stage cuts its own views from it).
#[derive(Debug, Clone)]
pub struct FlatCaMap {
    data: Vec<f32>,
    /// (B, h0, w0, n_text).
    dims: (usize, usize, usize, usize),
}

impl FlatCaMap {
    pub fn new(map: &CaMap) -> Result<Self> {
        let dims = map.map.dims4()?;
        let data = map
            .map
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Self { data, dims })
    }

    /// [`CaMap::for_view`]'s values, `(B, lh·lw, n_text)` row-major.
    fn view(
        &self,
        stage_hw: (usize, usize),
        view_hw: (usize, usize),
        layer_hw: (usize, usize),
        placement: ViewPlacement,
    ) -> Result<Vec<f32>> {
        let (b, mh, mw, t) = self.dims;
        if [
            stage_hw.0, stage_hw.1, view_hw.0, view_hw.1, layer_hw.0, layer_hw.1,
        ]
        .contains(&0)
        {
            return invalid("stage, view and layer sizes must be positive");
        }
        let fy = view_hw.0 as f64 / layer_hw.0 as f64;
        let fx = view_hw.1 as f64 / layer_hw.1 as f64;
        // Centre of layer token i in latent coordinates (pixel y spans [y, y + 1)).
        let centres = |n: usize, f: f64, axis: usize| -> Vec<f64> {
            (0..n)
                .map(|i| match placement {
                    ViewPlacement::Window { top, left } => {
                        let o = if axis == 0 { top } else { left } as f64;
                        o + (i as f64 + 0.5) * f
                    }
                    ViewPlacement::Strided { phase, strides } => {
                        let (p, s) = if axis == 0 {
                            (phase.0, strides.0)
                        } else {
                            (phase.1, strides.1)
                        };
                        p as f64 + 0.5 + s as f64 * ((i as f64 + 0.5) * f - 0.5)
                    }
                })
                .collect()
        };
        let taps = |centres: Vec<f64>, map_n: usize, stage_n: usize| -> Vec<(usize, usize, f64)> {
            let scale = map_n as f64 / stage_n as f64;
            centres
                .into_iter()
                .map(|c| {
                    let src = (c * scale - 0.5).clamp(0.0, (map_n - 1) as f64);
                    let i0 = src.floor() as usize;
                    let i1 = (i0 + 1).min(map_n - 1);
                    (i0, i1, src - i0 as f64)
                })
                .collect()
        };
        let ty = taps(centres(layer_hw.0, fy, 0), mh, stage_hw.0);
        let tx = taps(centres(layer_hw.1, fx, 1), mw, stage_hw.1);
        let src = &self.data;
        let at = |bi: usize, y: usize, x: usize, k: usize| src[((bi * mh + y) * mw + x) * t + k];
        let mut out = Vec::with_capacity(b * layer_hw.0 * layer_hw.1 * t);
        for bi in 0..b {
            for &(y0, y1, ly) in &ty {
                let (ly1, ly0) = (ly as f32, 1.0 - ly as f32);
                for &(x0, x1, lx) in &tx {
                    let (lx1, lx0) = (lx as f32, 1.0 - lx as f32);
                    for k in 0..t {
                        let top = lx0 * at(bi, y0, x0, k) + lx1 * at(bi, y0, x1, k);
                        let bottom = lx0 * at(bi, y1, x0, k) + lx1 * at(bi, y1, x1, k);
                        out.push(ly0 * top + ly1 * bottom);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The part of the map each view of a batch sees, laid out like the batch:
    /// `[half 0 × N, half 1 × N]` (uncond then cond when guided), each `(view_h, view_w,
    /// n_text)` — what a view task injects.
    pub fn batch(
        &self,
        stage_hw: (usize, usize),
        view_hw: (usize, usize),
        placements: &[ViewPlacement],
    ) -> Result<Tensor> {
        let (halves, _, _, t) = self.dims;
        let per: Vec<Vec<f32>> = placements
            .iter()
            .map(|&p| self.view(stage_hw, view_hw, view_hw, p))
            .collect::<Result<_>>()?;
        let plane = view_hw.0 * view_hw.1 * t;
        let mut out = Vec::with_capacity(halves * placements.len() * plane);
        for half in 0..halves {
            for v in &per {
                out.extend_from_slice(&v[half * plane..(half + 1) * plane]);
            }
        }
        Ok(Tensor::from_vec(
            out,
            (halves * placements.len(), view_hw.0, view_hw.1, t),
            &Device::Cpu,
        )?)
    }
}

/// `(1 − w)·out + w·(probs · V)`: the reused map applied to one cross-attention layer.
/// `out` `(B, heads, N, d)`, `probs` `(B, N, n_text)` (shared by all heads), `value`
/// `(B, heads, n_text, d)`.
pub fn blend_attention(
    out: &Tensor,
    probs: &Tensor,
    value: &Tensor,
    weight: f64,
) -> Result<Tensor> {
    let (b, heads, n, d) = out.dims4()?;
    let (pb, pn, t) = probs.dims3()?;
    let (vb, vh, vt, vd) = value.dims4()?;
    if (pb, pn) != (b, n) || (vb, vh, vt, vd) != (b, heads, t, d) {
        return invalid(format!(
            "shapes do not fit: out {:?}, map {:?}, value {:?}",
            out.dims(),
            probs.dims(),
            value.dims()
        ));
    }
    let p = probs
        .to_dtype(value.dtype())?
        .unsqueeze(1)?
        .broadcast_as((b, heads, n, t))?
        .contiguous()?;
    let reused = p.matmul(&value.contiguous()?)?;
    Ok(((out * (1.0 - weight))? + (reused * weight)?)?)
}

// Expected values are pasted verbatim from torch's f32 output (printed as f64 reprs).
#[cfg(test)]
#[allow(clippy::excessive_precision)]
mod tests {
    use super::*;

    /// `sin(0.37·i + 0.1)` over the flat index of a (1, 4, 6, 3) map, as in /tmp/ref/misc.py.
    fn map46() -> Result<Tensor> {
        let v: Vec<f32> = (0..72).map(|i| (i as f32 * 0.37 + 0.1).sin()).collect();
        Ok(Tensor::from_vec(v, (1, 4, 6, 3), &Device::Cpu)?)
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn spatial_resize_matches_torch() -> Result<()> {
        // Expected: F.interpolate(m.permute(0,3,1,2), size, mode="bilinear").permute(0,2,3,1)
        // in torch (/tmp/ref/misc.py), flat indices [0, 10, numel/2, numel-1].
        let m = map46()?;
        let cases: [((usize, usize), [f32; 4]); 3] = [
            (
                (8, 12),
                [
                    0.0998334214091301,
                    0.859067976474762,
                    0.6799909472465515,
                    0.9448903203010559,
                ],
            ),
            (
                (2, 3),
                [
                    0.623568058013916,
                    0.7701738476753235,
                    0.8345728516578674,
                    0.39574143290519714,
                ],
            ),
            (
                (5, 7),
                [
                    0.0998334214091301,
                    -0.08772939443588257,
                    -0.5175395011901855,
                    0.9448904395103455,
                ],
            ),
        ];
        for (hw, want) in cases {
            let r = flat(&resize_spatial(&m, hw)?);
            let n = r.len();
            for (i, w) in [0, 10, n / 2, n - 1].into_iter().zip(want) {
                assert!((r[i] - w).abs() < 1e-6, "{hw:?}[{i}] {} vs {w}", r[i]);
            }
        }
        Ok(())
    }

    #[test]
    fn token_axis_resize_matches_reference() -> Result<()> {
        // Expected: camap_wrapper.py's F.interpolate of (1, 1, 24, 3) to (96, 3), bilinear,
        // in torch (/tmp/ref/misc.py), flat indices [0, 10, 37, 150, 287].
        let m = map46()?.reshape((1, 24, 3))?;
        let r = flat(&resize_token_axis(&m, 96)?);
        let want = [
            0.0998334214091301,
            0.6580380201339722,
            -0.21876150369644165,
            0.7749404907226562,
            0.9448903799057007,
        ];
        for (i, w) in [0usize, 10, 37, 150, 287].into_iter().zip(want) {
            assert!((r[i] - w).abs() < 1e-6, "[{i}] {} vs {w}", r[i]);
        }
        Ok(())
    }

    #[test]
    fn aggregation_averages_within_then_across_resolutions() -> Result<()> {
        // Expected: torch ((a + b)/2 + interpolate(small, (4, 6)))/2 with a = sin wave,
        // b = cos(0.21·i) over (1,4,6,3), small = sin(0.5·i) over (1,2,3,3)
        // (/tmp/ref/misc.py), flat indices [0, 10, 37, 71].
        let a = map46()?;
        let b = Tensor::from_vec(
            (0..72).map(|i| (i as f32 * 0.21).cos()).collect::<Vec<_>>(),
            (1, 4, 6, 3),
            &Device::Cpu,
        )?;
        let small = Tensor::from_vec(
            (0..18).map(|i| (i as f32 * 0.5).sin()).collect::<Vec<_>>(),
            (1, 2, 3, 3),
            &Device::Cpu,
        )?;
        let mut c = CaMapCollector::new();
        c.add(&a.reshape((1, 24, 3))?, (4, 6))?;
        c.add(&small.reshape((1, 6, 3))?, (2, 3))?;
        c.add(&b.reshape((1, 24, 3))?, (4, 6))?;
        let m = c.finish()?;
        assert_eq!(m.grid()?, (4, 6));
        let r = flat(m.tensor());
        let want = [
            0.2749583423137665,
            0.017962664365768433,
            -0.043612509965896606,
            0.46092456579208374,
        ];
        for (i, w) in [0usize, 10, 37, 71].into_iter().zip(want) {
            assert!((r[i] - w).abs() < 1e-6, "[{i}] {} vs {w}", r[i]);
        }
        let mut bad = CaMapCollector::new();
        assert!(bad.add(&a.reshape((1, 24, 3))?, (5, 5)).is_err());
        assert!(CaMapCollector::new().finish().is_err());
        Ok(())
    }

    #[test]
    fn view_crop_equals_resize_then_crop() -> Result<()> {
        // Stage latent 16x24 with the map captured on 4x6; a layer at half resolution
        // (grid 8x12 over the stage). A window of 8x8 latent pixels at (8, 8) sees a 4x4
        // layer grid: rows 4..8, cols 4..8 of the map resized to 8x12.
        let m = CaMap::from_tensor(map46()?)?;
        let full = m.resize((8, 12))?;
        let want = flat(full.crop(4, 4, 4, 4)?.tensor());
        let got = m.for_view(
            (16, 24),
            (8, 8),
            (4, 4),
            ViewPlacement::Window { top: 8, left: 8 },
        )?;
        assert_eq!(got.dims(), &[1, 16, 3]);
        for (g, w) in flat(&got).iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
        // A strided view (phase (1, 0), strides (2, 2)) of a 16x24 latent at full layer
        // resolution: token (i, j) sits on latent pixel (1 + 2i, 2j).
        let fine = m.resize((16, 24))?;
        let fine_v = flat(fine.tensor());
        let got = flat(&m.for_view(
            (16, 24),
            (8, 12),
            (8, 12),
            ViewPlacement::Strided {
                phase: (1, 0),
                strides: (2, 2),
            },
        )?);
        for (i, j) in [(0usize, 0usize), (3, 5), (7, 11)] {
            for k in 0..3 {
                let w = fine_v[((1 + 2 * i) * 24 + 2 * j) * 3 + k];
                let g = got[(i * 12 + j) * 3 + k];
                assert!((g - w).abs() < 1e-6, "({i},{j},{k}) {g} vs {w}");
            }
        }
        Ok(())
    }

    #[test]
    fn blend_uses_map_times_value() -> Result<()> {
        let dev = Device::Cpu;
        let out = Tensor::ones((1, 2, 2, 2), DType::F32, &dev)?;
        let probs = Tensor::new(&[[[1.0f32, 0.0], [0.5, 0.5]]], &dev)?;
        let value = Tensor::new(
            &[[[[2.0f32, 4.0], [6.0, 8.0]], [[0.0, 0.0], [2.0, 2.0]]]],
            &dev,
        )?;
        let got = flat(&blend_attention(&out, &probs, &value, 0.5)?);
        // head 0: rows [2,4], [4,6]; head 1: rows [0,0], [1,1]; blended with 1 at w = 0.5.
        assert_eq!(got, vec![1.5, 2.5, 2.5, 3.5, 0.5, 0.5, 1.0, 1.0]);
        assert!(blend_attention(&out, &probs.narrow(1, 0, 1)?, &value, 0.5).is_err());
        Ok(())
    }
}
