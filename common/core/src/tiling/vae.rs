//! The VAE's tiles: where a decode or an encode larger than one tile is cut, and the weights
//! with which the overlapping results are blended. Pure geometry; the coordinator's
//! distributed VAE (`engine::vae`) cuts, dispatches and blends with it, and each worker runs
//! the VAE on one tile as it comes (no tiling of its own).

use crate::plan::Plan;
use crate::spec::PIXELS_PER_LATENT;

/// VAE tile geometry in latent cells.
///
/// Tiles are twice the training latent (SDXL: 256 latent = 2048 px; the tiny models: 256 px)
/// with a quarter of a tile shared between neighbours. Anything up to that size is one tile,
/// decoded in one piece exactly as diffusers' pipelines do; larger images are blended over a
/// quarter tile (SDXL: 512 px), well beyond the decoder's convolutional receptive field
/// (~100 px), so the mid-block attention's reach is the only thing tiles change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaeTiling {
    pub tile: usize,
    pub overlap: usize,
}

impl VaeTiling {
    pub fn for_plan(plan: &Plan) -> Self {
        let tile = (2 * plan.training_size / PIXELS_PER_LATENT).max(8) as usize;
        Self {
            tile,
            overlap: tile / 4,
        }
    }

    /// Tile starts along an axis of `n` cells: stride `tile - overlap`, the last tile pushed
    /// back to end at `n` so every tile has full size.
    pub fn starts(&self, n: usize) -> Vec<usize> {
        if n <= self.tile {
            return vec![0];
        }
        let stride = (self.tile - self.overlap).max(1);
        let mut starts = vec![0];
        let mut s = 0;
        while s + self.tile < n {
            s = (s + stride).min(n - self.tile);
            starts.push(s);
        }
        starts
    }

    /// Tiles along an axis of `n` cells.
    pub fn count(&self, n: usize) -> usize {
        self.starts(n).len()
    }
}

/// Raised-cosine ramp from 0 to 1 over `t` in [0, 1]; `r(t) + r(1 - t) = 1`, so where two
/// tiles share a span their weights sum to one and the blend has a continuous slope.
fn ramp(t: f32) -> f32 {
    0.5 - 0.5 * (std::f32::consts::PI * t.clamp(0.0, 1.0)).cos()
}

/// Normalised blend weights along one axis: for each tile (starts in cells, `len` cells each),
/// a weight per output position (`scale` outputs per cell). Each tile rises over the span it
/// shares with the previous tile and falls over the span it shares with the next; the weights
/// of all tiles at a position are divided by their sum, so they add up to one everywhere
/// (also where a clamped last tile overlaps more than one neighbour).
pub fn axis_weights(starts: &[usize], len: usize, scale: usize) -> Vec<Vec<f32>> {
    let n = starts.len();
    let raw: Vec<Vec<f32>> = (0..n)
        .map(|i| {
            let a = starts[i] * scale;
            let b = (starts[i] + len) * scale;
            let prev_end = (i > 0).then(|| (starts[i - 1] + len) * scale);
            let next_start = (i + 1 < n).then(|| starts[i + 1] * scale);
            (a..b)
                .map(|x| {
                    let xf = x as f32 + 0.5;
                    let mut w = 1.0f32;
                    if let Some(pe) = prev_end.filter(|pe| *pe > a) {
                        w *= ramp((xf - a as f32) / (pe - a) as f32);
                    }
                    if let Some(ns) = next_start.filter(|ns| *ns < b) {
                        w *= ramp((b as f32 - xf) / (b - ns) as f32);
                    }
                    w
                })
                .collect()
        })
        .collect();
    let total = starts.last().map_or(0, |s| (s + len) * scale);
    let mut sum = vec![0f32; total];
    for (i, w) in raw.iter().enumerate() {
        for (k, v) in w.iter().enumerate() {
            sum[starts[i] * scale + k] += v;
        }
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, w)| {
            w.into_iter()
                .enumerate()
                .map(|(k, v)| v / sum[starts[i] * scale + k])
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_axis_and_small_ones_are_one_tile() {
        let t = VaeTiling {
            tile: 32,
            overlap: 8,
        };
        assert_eq!(t.starts(32), vec![0]);
        assert_eq!(t.starts(20), vec![0]);
        assert_eq!(t.starts(64), vec![0, 24, 32]);
        assert_eq!(t.starts(80), vec![0, 24, 48]);
        for n in [33, 57, 100, 1000] {
            let s = t.starts(n);
            assert_eq!(*s.last().unwrap() + 32, n);
            for p in s.windows(2) {
                assert!(p[1] > p[0] && p[1] - p[0] <= 24, "{s:?}");
            }
        }
        // The same layout on a small tile (formerly the worker's own tiling test).
        let t = VaeTiling {
            tile: 8,
            overlap: 2,
        };
        assert_eq!(t.starts(8), vec![0]);
        assert_eq!(t.starts(5), vec![0]);
        assert_eq!(t.starts(14), vec![0, 6]);
        assert_eq!(t.starts(15), vec![0, 6, 7]);
        assert_eq!(t.starts(20), vec![0, 6, 12]);
    }

    #[test]
    fn blend_weights_sum_to_one_and_ramp_smoothly() {
        let t = VaeTiling {
            tile: 32,
            overlap: 8,
        };
        for n in [32, 64, 80, 101] {
            let starts = t.starts(n);
            let len = 32.min(n);
            let w = axis_weights(&starts, len, 8);
            let mut sum = vec![0f32; n * 8];
            for (i, wi) in w.iter().enumerate() {
                assert_eq!(wi.len(), len * 8);
                for (k, v) in wi.iter().enumerate() {
                    assert!((0.0..=1.0).contains(v));
                    sum[starts[i] * 8 + k] += v;
                }
            }
            for s in sum {
                assert!((s - 1.0).abs() < 1e-6, "{s}");
            }
            // No jumps: neighbouring weights of a tile differ by little.
            for wi in &w {
                for p in wi.windows(2) {
                    assert!((p[1] - p[0]).abs() < 0.05, "{p:?}");
                }
            }
        }
        // A single tile has weight exactly one.
        assert!(axis_weights(&[0], 16, 8)[0].iter().all(|&v| v == 1.0));
        // Two tiles sharing 16 of 64 positions: the pair sums to one there, both positive.
        let w = axis_weights(&[0, 48], 64, 1);
        for i in 48..64 {
            assert!((w[0][i] + w[1][i - 48] - 1.0).abs() < 1e-6);
        }
        assert!(w.iter().flatten().all(|v| *v > 0.0));
    }

    /// A purely local per-tile function (each output depends on its own cell only), cut in
    /// tiles and blended with these weights, gives back the untiled result.
    #[test]
    fn blending_of_a_local_op_is_exact() {
        let (h, w, scale) = (21usize, 30usize, 4usize);
        let input: Vec<f32> = (0..h * w).map(|i| ((i * 37) % 101) as f32 / 7.0).collect();
        let op = |v: f32| 2.0 * v;
        let t = VaeTiling {
            tile: 8,
            overlap: 3,
        };
        let (rows, cols) = (t.starts(h), t.starts(w));
        let (wy, wx) = (axis_weights(&rows, 8, scale), axis_weights(&cols, 8, scale));
        let (oh, ow) = (h * scale, w * scale);
        let mut acc = vec![0f32; oh * ow];
        for (i, &r) in rows.iter().enumerate() {
            for (j, &c) in cols.iter().enumerate() {
                for (y, &a) in wy[i].iter().enumerate() {
                    for (x, &b) in wx[j].iter().enumerate() {
                        let (py, px) = (r * scale + y, c * scale + x);
                        let v = op(input[(py / scale) * w + px / scale]);
                        acc[py * ow + px] += v * a * b;
                    }
                }
            }
        }
        for (k, got) in acc.iter().enumerate() {
            let want = op(input[(k / ow / scale) * w + (k % ow) / scale]);
            assert!((got - want).abs() < 1e-4, "{k}: {got} vs {want}");
        }
    }
}
