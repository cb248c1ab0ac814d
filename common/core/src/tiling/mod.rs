//! Geometry of the pieces a large latent is cut into, and how their outputs are put back.
//!
//! This module: the views of a high-resolution step, i.e. which training-size pieces of the
//! stage latent the model is evaluated on. Two families, after FreeScale's scale fusion
//! (`scale_attention.py`, `get_views` and the `fourg_window` branch of `scale_forward`), lifted
//! from the attention tokens to the latent:
//! - local views: b × b windows at stride b/2, the last one clamped to the edge, jittered;
//!   outputs are merged by a weighted average;
//! - global views: the s_h · s_w strided sub-latents `z[.., p::s_h, q::s_w]`; every latent pixel
//!   lies in exactly one of them, so outputs are scattered back, not averaged.
//!
//! Merges run on the CPU in f32, views in index order, whatever the order their outputs arrived
//! in: the same inputs give the same bits.
//!
//! Submodules: [`windows`], the window layout and jitter along one axis (shared with the
//! worker's in-UNet scale fusion, which lays the same windows over attention tokens), and
//! [`vae`], the VAE's tiles and their blend weights.

pub mod vae;
pub mod windows;

use crate::error::{invalid, MathError, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use windows::{jittered_corners, window_starts};

/// What a view reads where it reaches past the latent's edge.
///
/// FreeScale pads with zeros (`F.pad(..., 'constant', 0)` before its jittered windows); that is
/// harmless for attention features but puts an out-of-distribution band into a noisy latent, so
/// Tessera defaults to `Replicate`. `Reflect` mirrors without repeating the edge pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EdgePadding {
    Zero,
    #[default]
    Replicate,
    Reflect,
}

/// Per-pixel weight of a local view in the merge.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum ViewWeighting {
    /// Plain average where views overlap, as the reference's `value / count`.
    #[default]
    Uniform,
    /// Separable Gaussian centred on the window, σ = `sigma_fraction` × window side, so a
    /// view's influence fades towards its border and tile seams blend smoothly.
    Gaussian { sigma_fraction: f64 },
}

impl ViewWeighting {
    /// σ = 0.1 × window, Mixture of Diffusers' choice (variance 0.01 in window units): a
    /// view's weight at its own border is e^-12.5 of its centre, so a view ending leaves no
    /// visible step.
    pub const GAUSSIAN: Self = Self::Gaussian {
        sigma_fraction: 0.1,
    };

    fn axis(&self, n: usize) -> Result<Vec<f64>> {
        match *self {
            Self::Uniform => Ok(vec![1.0; n]),
            Self::Gaussian { sigma_fraction } => {
                if !(sigma_fraction.is_finite() && sigma_fraction > 0.0) {
                    return invalid(format!(
                        "Gaussian view weights need sigma_fraction > 0, got {sigma_fraction}"
                    ));
                }
                let sigma = sigma_fraction * n as f64;
                let mid = (n as f64 - 1.0) / 2.0;
                Ok((0..n)
                    .map(|i| {
                        let d = (i as f64 - mid) / sigma;
                        (-0.5 * d * d).exp()
                    })
                    .collect())
            }
        }
    }

    /// The `height × width` weight map of one view, row-major.
    pub fn map(&self, height: usize, width: usize) -> Result<Vec<f32>> {
        let wy = self.axis(height)?;
        let wx = self.axis(width)?;
        Ok(wy
            .iter()
            .flat_map(|a| wx.iter().map(move |b| (a * b) as f32))
            .collect())
    }
}

/// A view's window in latent pixels. `top`/`left` may be negative and the window may end past
/// the latent when jitter pushed an edge window outwards (as the reference does); the part
/// outside is read through [`EdgePadding`] and dropped when merging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ViewRect {
    pub top: i64,
    pub left: i64,
    pub height: usize,
    pub width: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalViewConfig {
    /// Window side in latent pixels: the training latent size b (SDXL 128, SD2.1-base 64).
    pub window: usize,
    /// Fraction of a window shared with its neighbour; 0.5 gives the reference's stride b/2.
    pub overlap: f64,
    /// Largest jitter offset in latent pixels; the reference uses window / 8. 0 disables it.
    pub jitter_range: usize,
    pub padding: EdgePadding,
}

impl LocalViewConfig {
    /// The reference's geometry: stride b/2, jitter up to b/8.
    pub fn for_training_size(b: usize) -> Self {
        Self {
            window: b,
            overlap: 0.5,
            jitter_range: b / 8,
            padding: EdgePadding::default(),
        }
    }
}

/// Overlapping training-size windows over a stage latent, in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalViews {
    latent: (usize, usize),
    window: (usize, usize),
    grid: (usize, usize),
    rects: Vec<ViewRect>,
    padding: EdgePadding,
}

impl LocalViews {
    /// Windows over an `height × width` latent. With `jitter_seed` the grid is jittered by a
    /// ChaCha20 stream seeded from it (one draw per axis per view, width first, as the
    /// reference draws); the caller derives the seed from (job, stage, step) so a retried or
    /// resumed step sees the same windows. Axes shorter than the window get one window of
    /// the axis' length.
    pub fn new(
        height: usize,
        width: usize,
        cfg: &LocalViewConfig,
        jitter_seed: Option<u64>,
    ) -> Result<Self> {
        if height == 0 || width == 0 {
            return invalid(format!("latent {height}x{width} is empty"));
        }
        if cfg.window == 0 {
            return invalid("local view window must be at least 1 latent pixel");
        }
        if !(0.0..1.0).contains(&cfg.overlap) {
            return invalid(format!(
                "tile overlap {} is outside [0, 1): use e.g. 0.5 for half-window stride",
                cfg.overlap
            ));
        }
        let win = (cfg.window.min(height), cfg.window.min(width));
        let stride_of = |w: usize| ((w as f64 * (1.0 - cfg.overlap)).round() as usize).max(1);
        let stride = (stride_of(win.0), stride_of(win.1));
        let r = if jitter_seed.is_some() {
            cfg.jitter_range
        } else {
            0
        };
        // Neighbours drifting apart by up to 2r must still overlap, or pixels go uncovered.
        for (axis, (w, s), dim) in [
            ("height", (win.0, stride.0), height),
            ("width", (win.1, stride.1), width),
        ] {
            if dim > w && 2 * r > w - s {
                return invalid(format!(
                    "jitter range {r} is too large for a {w}-pixel window at stride {s} along the {axis}: \
                     it must be at most half the overlap ({})",
                    (w - s) / 2
                ));
            }
        }
        let rows = window_starts(height, win.0, stride.0);
        let cols = window_starts(width, win.1, stride.1);
        let mut rng = ChaCha20Rng::seed_from_u64(jitter_seed.unwrap_or(0));
        let rects = jittered_corners(&rows, &cols, win, (height, width), (r, r), &mut rng)
            .into_iter()
            .map(|(top, left)| ViewRect {
                top,
                left,
                height: win.0,
                width: win.1,
            })
            .collect();
        Ok(Self {
            latent: (height, width),
            window: win,
            grid: (rows.len(), cols.len()),
            rects,
            padding: cfg.padding,
        })
    }

    pub fn len(&self) -> usize {
        self.rects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rects.is_empty()
    }

    /// (rows, columns) of the window grid.
    pub fn grid(&self) -> (usize, usize) {
        self.grid
    }

    pub fn window(&self) -> (usize, usize) {
        self.window
    }

    pub fn latent_size(&self) -> (usize, usize) {
        self.latent
    }

    pub fn rects(&self) -> &[ViewRect] {
        &self.rects
    }

    /// View `index` of a `(B, C, H, W)` latent as `(B, C, window_h, window_w)`.
    pub fn extract(&self, latent: &Tensor, index: usize) -> Result<Tensor> {
        check_latent(latent, self.latent)?;
        let rect = self.rect(index)?;
        let (h, w) = self.latent;
        let rows: Vec<i64> = (0..rect.height as i64).map(|i| rect.top + i).collect();
        let cols: Vec<i64> = (0..rect.width as i64).map(|j| rect.left + j).collect();
        gather(latent, &rows, &cols, h, w, self.padding)
    }

    /// Several views stacked along the batch axis, in the order given, for one forward pass.
    pub fn extract_batch(&self, latent: &Tensor, indices: &[usize]) -> Result<Tensor> {
        let views = indices
            .iter()
            .map(|&i| self.extract(latent, i))
            .collect::<Result<Vec<_>>>()?;
        if views.is_empty() {
            return invalid("no views to extract");
        }
        Ok(Tensor::cat(&views, 0)?)
    }

    /// [`LocalViews::extract`] of view `index` without tensors: `latent` is a `(B, C, H, W)`
    /// latent's row-major values, and `row` gets the view's rows in order (plane by plane),
    /// the same values `extract` gives.
    pub fn for_each_row(
        &self,
        latent: &[f32],
        index: usize,
        row: &mut dyn FnMut(&[f32]),
    ) -> Result<()> {
        let rect = self.rect(index)?;
        let rows: Vec<i64> = (0..rect.height as i64).map(|i| rect.top + i).collect();
        let cols: Vec<i64> = (0..rect.width as i64).map(|j| rect.left + j).collect();
        gather_rows(latent, self.latent, &rows, &cols, self.padding, row)
    }

    fn rect(&self, index: usize) -> Result<ViewRect> {
        self.rects.get(index).copied().ok_or_else(|| {
            MathError::Invalid(format!(
                "local view {index} does not exist ({} views)",
                self.rects.len()
            ))
        })
    }

    /// Weighted average of the views' outputs (`outputs[i]` belongs to view i, each
    /// `(B, C, window_h, window_w)`) into a `(B, C, H, W)` f32 tensor on the first output's
    /// device. Accumulates in f32 on the CPU in view index order; pixels a view read through
    /// padding are dropped.
    pub fn merge(&self, outputs: &[Tensor], weighting: ViewWeighting) -> Result<Tensor> {
        if outputs.len() != self.rects.len() {
            return invalid(format!(
                "{} outputs for {} local views",
                outputs.len(),
                self.rects.len()
            ));
        }
        let (bc, device) = batch_channels(outputs, self.window)?;
        let mut merge = self.merge_in_order(bc, weighting)?;
        for out in outputs {
            merge.add(&to_f32_vec(out)?)?;
        }
        let (b, c) = outputs[0].dims4().map(|d| (d.0, d.1))?;
        Ok(merge
            .finish()?
            .reshape((b, c, self.latent.0, self.latent.1))?
            .to_device(&device)?)
    }

    /// [`LocalViews::merge`] one view at a time, as outputs arrive: the views must be added
    /// in index order (the accumulation order is what makes the result the same bytes for
    /// any number of workers), each as `bc = B · C` planes of `window_h × window_w` f32.
    pub fn merge_in_order(&self, bc: usize, weighting: ViewWeighting) -> Result<LocalMerge<'_>> {
        self.merge_in_order_reusing(bc, weighting, MergeBuffers::default())
    }

    /// [`LocalViews::merge_in_order`] summing into `buffers` (what an earlier merge left,
    /// [`LocalMerge::finish_reusable`]), zeroed first: stage-sized buffers reused step after
    /// step instead of fresh pages faulted in each time. The same bytes as a fresh merge.
    pub fn merge_in_order_reusing(
        &self,
        bc: usize,
        weighting: ViewWeighting,
        buffers: MergeBuffers,
    ) -> Result<LocalMerge<'_>> {
        let (vh, vw) = self.window;
        let (h, w) = self.latent;
        // A lone view has nothing to blend with; weights would only round its values.
        let weighting = if self.rects.len() == 1 {
            ViewWeighting::Uniform
        } else {
            weighting
        };
        let zeroed = |mut v: Vec<f32>, n: usize| {
            v.clear();
            v.resize(n, 0.0);
            v
        };
        Ok(LocalMerge {
            views: self,
            bc,
            weights: weighting.map(vh, vw)?,
            acc: zeroed(buffers.sums, bc * h * w),
            den: zeroed(buffers.weights, h * w),
            next: 0,
            normalized: 0,
        })
    }
}

/// A local merge's stage-sized buffers, kept for the next merge: its sums and its weight sums.
#[derive(Debug, Default)]
pub struct MergeBuffers {
    pub sums: Vec<f32>,
    pub weights: Vec<f32>,
}

/// A weighted merge of local views in progress (see [`LocalViews::merge_in_order`]).
pub struct LocalMerge<'a> {
    views: &'a LocalViews,
    bc: usize,
    weights: Vec<f32>,
    acc: Vec<f32>,
    den: Vec<f32>,
    next: usize,
    /// Rows `0..normalized` of every plane already hold their final values (`acc / den`).
    normalized: usize,
}

impl LocalMerge<'_> {
    /// Index of the view the next [`LocalMerge::add`] belongs to.
    pub fn next_view(&self) -> usize {
        self.next
    }

    /// Adds the next view's output, `bc` planes of `window_h × window_w` f32.
    pub fn add(&mut self, vals: &[f32]) -> Result<()> {
        self.add_parts(&[vals])
    }

    /// [`LocalMerge::add`] with the view's planes in consecutive parts (e.g. the guidance
    /// halves as they were read), each a whole number of planes: no copy into one buffer.
    pub fn add_parts(&mut self, parts: &[&[f32]]) -> Result<()> {
        let (vh, vw) = self.views.window;
        let (h, w) = self.views.latent;
        let bc = self.bc;
        let Some(rect) = self.views.rects.get(self.next).copied() else {
            return invalid(format!(
                "more outputs than the {} local views",
                self.views.rects.len()
            ));
        };
        let planes = view_planes(parts, vh * vw);
        if planes.len() != bc {
            return invalid(format!(
                "view {} output has {} values, expected {bc} x {vh} x {vw}",
                self.next,
                parts.iter().map(|p| p.len()).sum::<usize>()
            ));
        }
        // The columns of the window inside the latent; each value's arithmetic is the same
        // as pixel by pixel, but whole row runs at a time (so the loops vectorise).
        let x0 = (-rect.left).clamp(0, vw as i64) as usize;
        let x1 = (w as i64 - rect.left).clamp(x0 as i64, vw as i64) as usize;
        let gx0 = (rect.left + x0 as i64).max(0) as usize;
        let run = x1 - x0;
        for y in 0..vh {
            let gy = rect.top + y as i64;
            if gy < 0 || gy >= h as i64 || run == 0 {
                continue;
            }
            let wts = &self.weights[y * vw + x0..y * vw + x1];
            let dst = gy as usize * w + gx0;
            for (d, &wt) in self.den[dst..dst + run].iter_mut().zip(wts) {
                *d += wt;
            }
            for (k, plane) in planes.iter().enumerate() {
                let src = &plane[y * vw + x0..y * vw + x1];
                let acc = &mut self.acc[k * h * w + dst..k * h * w + dst + run];
                for ((a, &wt), &v) in acc.iter_mut().zip(wts).zip(src) {
                    *a += wt * v;
                }
            }
        }
        self.next += 1;
        Ok(())
    }

    /// The merged `(bc, H, W)` f32 tensor on the CPU, once every view was added. The
    /// normalisation is split over rows between threads (each value's arithmetic is the same
    /// whatever the split).
    pub fn finish(self) -> Result<Tensor> {
        let (bc, (h, w)) = (self.bc, self.views.latent);
        Ok(Tensor::from_vec(
            self.finish_vec()?,
            (bc, h, w),
            &Device::Cpu,
        )?)
    }

    /// [`LocalMerge::finish`]'s values, `(bc, H, W)` row-major, without a copy into a tensor.
    pub fn finish_vec(self) -> Result<Vec<f32>> {
        Ok(self.finish_reusable()?.0)
    }

    /// [`LocalMerge::finish_vec`]'s values, and the weight sums' buffer for a later merge.
    pub fn finish_reusable(mut self) -> Result<(Vec<f32>, Vec<f32>)> {
        if self.next != self.views.rects.len() {
            return invalid(format!(
                "{} of {} local views merged",
                self.next,
                self.views.rects.len()
            ));
        }
        self.normalize_rows(self.views.latent.0)?;
        Ok((self.acc, self.den))
    }

    /// Rows `0..n` of the latent that no view still to be added touches: their sums are final.
    pub fn settled_rows(&self) -> usize {
        let h = self.views.latent.0;
        self.views.rects[self.next..]
            .iter()
            .map(|r| r.top.clamp(0, h as i64) as usize)
            .min()
            .unwrap_or(h)
    }

    /// Normalises the rows settled so far (the arithmetic [`LocalMerge::finish_vec`] does),
    /// so work on them can start while later views are still coming. Returns the number of
    /// final rows and the `(bc, H, W)` values: the caller may rewrite rows below that count
    /// in every plane (they are never touched again here) and must leave the others alone.
    pub fn settle(&mut self) -> Result<(usize, &mut [f32])> {
        let settled = self.settled_rows();
        self.normalize_rows(settled)?;
        Ok((self.normalized, &mut self.acc))
    }

    /// Divides rows `normalized..upto` of every plane by their weight sums, split over rows
    /// between threads (each value's arithmetic is the same whatever the split).
    fn normalize_rows(&mut self, upto: usize) -> Result<()> {
        let (h, w) = self.views.latent;
        let (from, upto) = (self.normalized, upto.min(h));
        if upto <= from {
            return Ok(());
        }
        let den = &self.den;
        if let Some(p) = den[from * w..upto * w].iter().position(|&d| d <= 0.0) {
            let p = from * w + p;
            return invalid(format!(
                "latent pixel ({}, {}) is covered by no local view",
                p / w,
                p % w
            ));
        }
        let den = &den[from * w..upto * w];
        let planes = self.bc;
        // Only the new rows of each plane; split between threads when there is enough of them
        // to pay for the threads (a few settled rows after each view are not).
        let divide = |first_row: usize, rows: &mut [f32]| {
            for (a, &d) in rows.iter_mut().zip(&den[first_row * w..]) {
                *a /= d;
            }
        };
        for plane in self.acc.chunks_exact_mut(h * w) {
            let band = &mut plane[from * w..upto * w];
            if band.len() * planes < PARALLEL_MIN {
                divide(0, band);
            } else {
                for_each_row_chunk(band, w, divide);
            }
        }
        self.normalized = upto;
        Ok(())
    }
}

/// The cores this process may use, asked once: the standard library reads the cgroup's
/// quota files on every call, which cost more than the small row runs a step hands out.
pub fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Fewer values than this are not worth the threads of [`for_each_row_chunk`].
const PARALLEL_MIN: usize = 1 << 18;

/// Runs `f(first_row, rows)` over `data` cut into runs of whole rows of `row_len`, one run per
/// available core (scoped threads; a coordinator host has many).
pub fn for_each_row_chunk<F>(data: &mut [f32], row_len: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let rows = data.len() / row_len.max(1);
    let threads = cores().min(rows.max(1));
    if threads <= 1 || row_len == 0 {
        f(0, data);
        return;
    }
    let per = rows.div_ceil(threads) * row_len;
    std::thread::scope(|s| {
        for (i, chunk) in data.chunks_mut(per).enumerate() {
            let f = &f;
            s.spawn(move || f(i * per / row_len, chunk));
        }
    });
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GlobalViewConfig {
    /// The training latent size b; s = ceil(dim / b) views per axis.
    pub training_size: usize,
    /// View sides are rounded up to a multiple of this (the UNet's total downsampling, 8).
    pub align: usize,
    pub padding: EdgePadding,
}

impl GlobalViewConfig {
    pub fn for_training_size(b: usize) -> Self {
        Self {
            training_size: b,
            align: 8,
            padding: EdgePadding::default(),
        }
    }
}

/// The strided sub-latents `z[.., p::s_h, q::s_w]`, in row-major (p, q) order.
///
/// When H is not a multiple of s_h the sub-grids would differ in size, so the latent is
/// conceptually padded at the bottom (right) to `s_h · view_h` rows with
/// `view_h = round_up(ceil(H / s_h), align)`: every view then has the same size, a multiple of
/// the UNet's downsampling and at most b; padded rows come from [`EdgePadding`] and are
/// dropped when scattering back. For H a multiple of b this is exactly the reference's view.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalViews {
    latent: (usize, usize),
    strides: (usize, usize),
    view: (usize, usize),
    padding: EdgePadding,
}

impl GlobalViews {
    pub fn new(height: usize, width: usize, cfg: &GlobalViewConfig) -> Result<Self> {
        if height == 0 || width == 0 {
            return invalid(format!("latent {height}x{width} is empty"));
        }
        if cfg.training_size == 0 || cfg.align == 0 {
            return invalid("global views need a training size and alignment of at least 1");
        }
        let b = cfg.training_size;
        let strides = (height.div_ceil(b), width.div_ceil(b));
        let side = |dim: usize, s: usize| dim.div_ceil(s).div_ceil(cfg.align) * cfg.align;
        let view = (side(height, strides.0), side(width, strides.1));
        if cfg.padding == EdgePadding::Reflect {
            for (dim, s, v) in [(height, strides.0, view.0), (width, strides.1, view.1)] {
                if s * v - dim >= dim {
                    return invalid(format!(
                        "reflect padding of {} rows does not fit a {dim}-pixel latent axis: use replicate",
                        s * v - dim
                    ));
                }
            }
        }
        Ok(Self {
            latent: (height, width),
            strides,
            view,
            padding: cfg.padding,
        })
    }

    pub fn len(&self) -> usize {
        self.strides.0 * self.strides.1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (s_h, s_w).
    pub fn strides(&self) -> (usize, usize) {
        self.strides
    }

    /// Side lengths of every view.
    pub fn view_size(&self) -> (usize, usize) {
        self.view
    }

    pub fn latent_size(&self) -> (usize, usize) {
        self.latent
    }

    /// The phase (p, q) of view `index`.
    pub fn offset(&self, index: usize) -> Result<(usize, usize)> {
        if index >= self.len() {
            return invalid(format!(
                "global view {index} does not exist ({} views)",
                self.len()
            ));
        }
        Ok((index / self.strides.1, index % self.strides.1))
    }

    /// View `index` of a `(B, C, H, W)` latent as `(B, C, view_h, view_w)`.
    pub fn extract(&self, latent: &Tensor, index: usize) -> Result<Tensor> {
        check_latent(latent, self.latent)?;
        let (p, q) = self.offset(index)?;
        let (sh, sw) = self.strides;
        let rows: Vec<i64> = (0..self.view.0).map(|i| (p + i * sh) as i64).collect();
        let cols: Vec<i64> = (0..self.view.1).map(|j| (q + j * sw) as i64).collect();
        gather(
            latent,
            &rows,
            &cols,
            self.latent.0,
            self.latent.1,
            self.padding,
        )
    }

    pub fn extract_batch(&self, latent: &Tensor, indices: &[usize]) -> Result<Tensor> {
        let views = indices
            .iter()
            .map(|&i| self.extract(latent, i))
            .collect::<Result<Vec<_>>>()?;
        if views.is_empty() {
            return invalid("no views to extract");
        }
        Ok(Tensor::cat(&views, 0)?)
    }

    /// [`GlobalViews::extract`] of view `index` without tensors, row by row (see
    /// [`LocalViews::for_each_row`]).
    pub fn for_each_row(
        &self,
        latent: &[f32],
        index: usize,
        row: &mut dyn FnMut(&[f32]),
    ) -> Result<()> {
        let (p, q) = self.offset(index)?;
        let (sh, sw) = self.strides;
        let rows: Vec<i64> = (0..self.view.0).map(|i| (p + i * sh) as i64).collect();
        let cols: Vec<i64> = (0..self.view.1).map(|j| (q + j * sw) as i64).collect();
        gather_rows(latent, self.latent, &rows, &cols, self.padding, row)
    }

    /// Puts every view's output back at its strided positions, dropping padding: a
    /// `(B, C, H, W)` f32 tensor on the first output's device. Each latent pixel belongs to
    /// exactly one view, so this is a copy, not an average.
    pub fn merge(&self, outputs: &[Tensor]) -> Result<Tensor> {
        if outputs.len() != self.len() {
            return invalid(format!(
                "{} outputs for {} global views",
                outputs.len(),
                self.len()
            ));
        }
        let (bc, device) = batch_channels(outputs, self.view)?;
        let mut scatter = self.scatter(bc);
        for (index, out) in outputs.iter().enumerate() {
            scatter.add(index, &to_f32_vec(out)?)?;
        }
        let (b, c) = outputs[0].dims4().map(|d| (d.0, d.1))?;
        Ok(scatter
            .finish()?
            .reshape((b, c, self.latent.0, self.latent.1))?
            .to_device(&device)?)
    }

    /// [`GlobalViews::merge`] one view at a time, in any order (a copy: the order cannot
    /// change the bytes), each view as `bc` planes of `view_h × view_w` f32.
    pub fn scatter(&self, bc: usize) -> GlobalScatter<'_> {
        GlobalScatter {
            views: self,
            bc,
            dst: vec![0f32; bc * self.latent.0 * self.latent.1],
            seen: vec![false; self.len()],
        }
    }
}

/// Global views being put back (see [`GlobalViews::scatter`]).
pub struct GlobalScatter<'a> {
    views: &'a GlobalViews,
    bc: usize,
    dst: Vec<f32>,
    seen: Vec<bool>,
}

impl GlobalScatter<'_> {
    pub fn add(&mut self, index: usize, vals: &[f32]) -> Result<()> {
        self.add_parts(index, &[vals])
    }

    /// [`GlobalScatter::add`] with the view's planes in consecutive parts (see
    /// [`LocalMerge::add_parts`]).
    pub fn add_parts(&mut self, index: usize, parts: &[&[f32]]) -> Result<()> {
        let (vh, vw) = self.views.view;
        let (h, w) = self.views.latent;
        let (sh, sw) = self.views.strides;
        let bc = self.bc;
        if index >= self.seen.len() {
            return invalid(format!(
                "global view {index} does not exist ({} views)",
                self.seen.len()
            ));
        }
        let planes = view_planes(parts, vh * vw);
        if planes.len() != bc {
            return invalid(format!(
                "global view {index} output has {} values, expected {bc} x {vh} x {vw}",
                parts.iter().map(|p| p.len()).sum::<usize>()
            ));
        }
        let (p, q) = (index / sw, index % sw);
        // Columns of the view that land inside the latent.
        let cols = vw.min((w.saturating_sub(q)).div_ceil(sw));
        for (k, plane) in planes.iter().enumerate() {
            for i in 0..vh {
                let y = p + i * sh;
                if y >= h {
                    break;
                }
                let dst = &mut self.dst[(k * h + y) * w..(k * h + y + 1) * w];
                let src = &plane[i * vw..i * vw + cols];
                for (d, &v) in dst[q..].chunks_mut(sw).zip(src) {
                    d[0] = v;
                }
            }
        }
        self.seen[index] = true;
        Ok(())
    }

    /// The `(bc, H, W)` f32 tensor on the CPU, once every view was added.
    pub fn finish(self) -> Result<Tensor> {
        let (bc, (h, w)) = (self.bc, self.views.latent);
        Ok(Tensor::from_vec(
            self.finish_vec()?,
            (bc, h, w),
            &Device::Cpu,
        )?)
    }

    /// Whether every global view has been added.
    pub fn is_complete(&self) -> bool {
        self.seen.iter().all(|&s| s)
    }

    /// [`GlobalScatter::finish`]'s values, `(bc, H, W)` row-major, without a copy.
    pub fn finish_vec(self) -> Result<Vec<f32>> {
        if let Some(i) = self.seen.iter().position(|&s| !s) {
            return invalid(format!("global view {i} was never merged"));
        }
        Ok(self.dst)
    }
}

/// The (2s − 1)² + s² model evaluations of one high-resolution step, as the methods count them
/// for square multiples: local then global view counts for this stage.
pub fn view_counts(local: &LocalViews, global: &GlobalViews) -> (usize, usize) {
    (local.len(), global.len())
}

fn check_latent(latent: &Tensor, (h, w): (usize, usize)) -> Result<()> {
    let (_, _, lh, lw) = latent.dims4()?;
    if (lh, lw) != (h, w) {
        return invalid(format!(
            "latent is {lh}x{lw} but the views were laid out for {h}x{w}"
        ));
    }
    Ok(())
}

/// Maps a possibly out-of-range coordinate to a source index; `None` means a zero.
fn pad_index(i: i64, n: usize, padding: EdgePadding) -> Option<u32> {
    let n = n as i64;
    if (0..n).contains(&i) {
        return Some(i as u32);
    }
    match padding {
        EdgePadding::Zero => None,
        EdgePadding::Replicate => Some(i.clamp(0, n - 1) as u32),
        EdgePadding::Reflect => {
            if n == 1 {
                return Some(0);
            }
            let period = 2 * (n - 1);
            let m = i.rem_euclid(period);
            Some((if m < n { m } else { period - m }) as u32)
        }
    }
}

/// `latent[.., rows, cols]` with out-of-range coordinates resolved by `padding`. Zero padding
/// points at an appended zero row/column.
fn gather(
    latent: &Tensor,
    rows: &[i64],
    cols: &[i64],
    h: usize,
    w: usize,
    padding: EdgePadding,
) -> Result<Tensor> {
    let ri: Vec<Option<u32>> = rows.iter().map(|&r| pad_index(r, h, padding)).collect();
    let ci: Vec<Option<u32>> = cols.iter().map(|&c| pad_index(c, w, padding)).collect();
    let needs_zero = ri.iter().chain(&ci).any(Option::is_none);
    let src = if needs_zero {
        latent.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?
    } else {
        latent.clone()
    };
    let ri: Vec<u32> = ri.into_iter().map(|i| i.unwrap_or(h as u32)).collect();
    let ci: Vec<u32> = ci.into_iter().map(|i| i.unwrap_or(w as u32)).collect();
    let dev = latent.device();
    let ri = Tensor::from_vec(ri, rows.len(), dev)?;
    let ci = Tensor::from_vec(ci, cols.len(), dev)?;
    Ok(src.index_select(&ri, 2)?.index_select(&ci, 3)?)
}

/// A view's planes of `plane` values each, from parts holding whole planes; empty when the
/// parts do not split into whole planes (the caller reports the count it wanted).
fn view_planes<'v>(parts: &[&'v [f32]], plane: usize) -> Vec<&'v [f32]> {
    if plane == 0 || parts.iter().any(|p| p.len() % plane != 0) {
        return Vec::new();
    }
    parts.iter().flat_map(|p| p.chunks_exact(plane)).collect()
}

/// [`gather`] over row-major values, one output row at a time: `latent` holds whole
/// `h × w` planes, and each plane's `rows × cols` are handed to `row` in order. A row whose
/// columns are one run inside the latent is handed over without a copy.
fn gather_rows(
    latent: &[f32],
    (h, w): (usize, usize),
    rows: &[i64],
    cols: &[i64],
    padding: EdgePadding,
    row: &mut dyn FnMut(&[f32]),
) -> Result<()> {
    if h * w == 0 || !latent.len().is_multiple_of(h * w) {
        return invalid(format!(
            "{} latent values are not whole {h}x{w} planes",
            latent.len()
        ));
    }
    let ri: Vec<Option<usize>> = rows
        .iter()
        .map(|&r| pad_index(r, h, padding).map(|i| i as usize))
        .collect();
    let ci: Vec<Option<usize>> = cols
        .iter()
        .map(|&c| pad_index(c, w, padding).map(|i| i as usize))
        .collect();
    // Columns that are one run inside the latent: rows are plain slices of it.
    let run = match ci.first() {
        Some(&Some(a)) if ci.iter().enumerate().all(|(j, &c)| c == Some(a + j)) => Some(a),
        _ => None,
    };
    let zeros = vec![0f32; ci.len()];
    let mut buf = vec![0f32; ci.len()];
    for plane in latent.chunks_exact(h * w) {
        for r in &ri {
            let Some(r) = *r else {
                row(&zeros);
                continue;
            };
            let src = &plane[r * w..(r + 1) * w];
            if let Some(a) = run {
                row(&src[a..a + ci.len()]);
                continue;
            }
            for (b, c) in buf.iter_mut().zip(&ci) {
                *b = c.map_or(0.0, |c| src[c]);
            }
            row(&buf);
        }
    }
    Ok(())
}

/// Checks all outputs have one `(B, C, vh, vw)` shape; returns B·C and the device.
fn batch_channels(outputs: &[Tensor], (vh, vw): (usize, usize)) -> Result<(usize, Device)> {
    let first = outputs
        .first()
        .ok_or_else(|| MathError::Invalid("no view outputs to merge".into()))?;
    let (b, c, _, _) = first.dims4()?;
    for (i, out) in outputs.iter().enumerate() {
        let dims = out.dims4()?;
        if dims != (b, c, vh, vw) {
            return invalid(format!(
                "view {i} output is {dims:?}, expected ({b}, {c}, {vh}, {vw})"
            ));
        }
    }
    Ok((b * c, first.device().clone()))
}

fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

// Expected values are pasted verbatim from torch's f32 output (printed as f64 reprs).
#[cfg(test)]
#[allow(clippy::excessive_precision)]
mod tests {
    use super::*;

    /// (latent h, latent w, window, row starts, column starts).
    type GridCase = (usize, usize, usize, Vec<i64>, Vec<i64>);

    fn starts(v: &LocalViews) -> (Vec<i64>, Vec<i64>) {
        let (rows, cols) = v.grid();
        let r = (0..rows).map(|i| v.rects()[i * cols].top).collect();
        let c = (0..cols).map(|j| v.rects()[j].left).collect();
        (r, c)
    }

    fn ramp(b: usize, c: usize, h: usize, w: usize) -> Result<Tensor> {
        // Dyadic values (multiples of 1/64 in [-4, 4)): sums of a few of them and their
        // quotients by the count are exact in f32, so the identity merge can be compared
        // bit for bit.
        let n = b * c * h * w;
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 512) as f32 - 256.0) / 64.0)
            .collect();
        Ok(Tensor::from_vec(v, (b, c, h, w), &Device::Cpu)?)
    }

    #[test]
    fn local_grid_matches_reference_get_views() -> Result<()> {
        // Expected starts: `get_views` of scale_attention.py run in /tmp/ref/misc.py with
        // random_jitter disabled and scale_factor 1 (window in latent pixels).
        let cases: [GridCase; 5] = [
            (256, 256, 128, vec![0, 64, 128], vec![0, 64, 128]),
            (
                1024,
                1024,
                128,
                (0..15).map(|i| i * 64).collect(),
                (0..15).map(|i| i * 64).collect(),
            ),
            (300, 200, 128, vec![0, 64, 128, 172], vec![0, 64, 72]),
            (128, 384, 128, vec![0], vec![0, 64, 128, 192, 256]),
            (200, 100, 64, vec![0, 32, 64, 96, 128, 136], vec![0, 32, 36]),
        ];
        for (h, w, b, rows, cols) in cases {
            let v = LocalViews::new(h, w, &LocalViewConfig::for_training_size(b), None)?;
            assert_eq!(starts(&v), (rows.clone(), cols.clone()), "{h}x{w} b={b}");
            assert_eq!(v.len(), rows.len() * cols.len());
        }
        Ok(())
    }

    #[test]
    fn sdxl_view_counts_at_2x_4x_8x() -> Result<()> {
        // (2s − 1)² local + s² global; 8192² SDXL → latent 1024²: 225 + 64.
        for (s, local, global) in [(2usize, 9usize, 4usize), (4, 49, 16), (8, 225, 64)] {
            let n = 128 * s;
            let l = LocalViews::new(n, n, &LocalViewConfig::for_training_size(128), Some(1))?;
            let g = GlobalViews::new(n, n, &GlobalViewConfig::for_training_size(128))?;
            assert_eq!(view_counts(&l, &g), (local, global));
            assert_eq!(g.view_size(), (128, 128));
            assert_eq!(g.strides(), (s, s));
        }
        let l = LocalViews::new(1024, 1024, &LocalViewConfig::for_training_size(128), None)?;
        assert_eq!(l.grid(), (15, 15));
        assert_eq!(
            l.rects()[224],
            ViewRect {
                top: 896,
                left: 896,
                height: 128,
                width: 128
            }
        );
        Ok(())
    }

    #[test]
    fn non_square_and_non_multiple_sizes() -> Result<()> {
        // 3000x1700 px SDXL → latent 375x212 (not multiples of 8 or 128).
        let l = LocalViews::new(375, 212, &LocalViewConfig::for_training_size(128), None)?;
        assert_eq!(l.grid(), (5, 3));
        assert_eq!(starts(&l), (vec![0, 64, 128, 192, 247], vec![0, 64, 84]));
        let g = GlobalViews::new(375, 212, &GlobalViewConfig::for_training_size(128))?;
        assert_eq!(g.strides(), (3, 2));
        // ceil(375/3) = 125 → 128; ceil(212/2) = 106 → 112.
        assert_eq!(g.view_size(), (128, 112));
        // A latent smaller than the window on one axis: one full-length window there.
        let l = LocalViews::new(40, 300, &LocalViewConfig::for_training_size(128), Some(3))?;
        assert_eq!(l.window(), (40, 128));
        assert!(l.rects().iter().all(|r| r.top == 0));
        Ok(())
    }

    #[test]
    fn jitter_is_deterministic_per_seed_and_within_bounds() -> Result<()> {
        let cfg = LocalViewConfig::for_training_size(128);
        let plain = LocalViews::new(1024, 768, &cfg, None)?;
        let a = LocalViews::new(1024, 768, &cfg, Some(42))?;
        let b = LocalViews::new(1024, 768, &cfg, Some(42))?;
        let c = LocalViews::new(1024, 768, &cfg, Some(43))?;
        assert_eq!(a, b);
        assert_ne!(a.rects(), c.rects());
        assert_ne!(a.rects(), plain.rects());
        let r = 16i64;
        for (j, p) in a.rects().iter().zip(plain.rects()) {
            for (js, ps, dim) in [(j.top, p.top, 1024i64), (j.left, p.left, 768i64)] {
                let d = js - ps;
                assert!((-r..=r).contains(&d), "jitter {d}");
                if ps == 0 {
                    assert!(d <= 0, "first window may only move outwards");
                }
                if ps + 128 == dim {
                    assert!(d >= 0, "last window may only move outwards");
                }
            }
        }
        let bad = LocalViewConfig {
            jitter_range: 40,
            ..cfg
        };
        assert!(LocalViews::new(1024, 768, &bad, Some(1)).is_err());
        Ok(())
    }

    #[test]
    fn identity_model_merge_reproduces_latent() -> Result<()> {
        let latent = ramp(1, 4, 300, 212)?;
        let want = latent.flatten_all()?.to_vec1::<f32>()?;
        for padding in [
            EdgePadding::Zero,
            EdgePadding::Replicate,
            EdgePadding::Reflect,
        ] {
            let cfg = LocalViewConfig {
                padding,
                ..LocalViewConfig::for_training_size(128)
            };
            for seed in [None, Some(7u64), Some(8)] {
                let views = LocalViews::new(300, 212, &cfg, seed)?;
                let outs = (0..views.len())
                    .map(|i| views.extract(&latent, i))
                    .collect::<Result<Vec<_>>>()?;
                let got = views.merge(&outs, ViewWeighting::Uniform)?;
                assert_eq!(
                    got.flatten_all()?.to_vec1::<f32>()?,
                    want,
                    "{padding:?} {seed:?}"
                );
                // Gaussian weights: Σ w·v / Σ w rounds, so equal to a few ulp.
                let got = views.merge(&outs, ViewWeighting::GAUSSIAN)?;
                for (g, w) in got.flatten_all()?.to_vec1::<f32>()?.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 4.0 * f32::EPSILON * w.abs().max(1.0),
                        "{g} vs {w}"
                    );
                }
            }
        }
        let g = GlobalViews::new(300, 212, &GlobalViewConfig::for_training_size(128))?;
        let outs = (0..g.len())
            .map(|i| g.extract(&latent, i))
            .collect::<Result<Vec<_>>>()?;
        assert_eq!(g.merge(&outs)?.flatten_all()?.to_vec1::<f32>()?, want);
        Ok(())
    }

    #[test]
    fn global_view_is_strided_slice() -> Result<()> {
        let latent = ramp(1, 2, 256, 256)?;
        let g = GlobalViews::new(256, 256, &GlobalViewConfig::for_training_size(128))?;
        let v = g.extract(&latent, 3)?; // (p, q) = (1, 1)
        let lat = latent.i_at(0, 1)?;
        let view = v.i_at(0, 1)?;
        for (i, j) in [(0usize, 0usize), (5, 9), (127, 127)] {
            assert_eq!(view[i][j], lat[1 + 2 * i][1 + 2 * j]);
        }
        Ok(())
    }

    /// A view's rows handed to a callback, as the tests call `for_each_row`.
    type EachRow<'a> = dyn Fn(&mut dyn FnMut(&[f32])) -> Result<()> + 'a;

    /// Every view read row by row from the values is what `extract` cuts from the tensor,
    /// with each padding mode and views that reach past the edges.
    #[test]
    fn views_read_row_by_row_are_the_extracted_views() -> Result<()> {
        let (h, w) = (45, 38);
        let latent = Tensor::arange(0f32, (2 * 3 * h * w) as f32, &Device::Cpu)?
            .reshape((2, 3, h, w))?
            .affine(0.37, -5.0)?
            .sin()?;
        let values = latent.flatten_all()?.to_vec1::<f32>()?;
        let rows_of = |each: &EachRow| -> Result<Vec<f32>> {
            let mut out = Vec::new();
            each(&mut |row| out.extend_from_slice(row))?;
            Ok(out)
        };
        let flat = |t: Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
        for padding in [
            EdgePadding::Zero,
            EdgePadding::Replicate,
            EdgePadding::Reflect,
        ] {
            let cfg = LocalViewConfig {
                padding,
                ..LocalViewConfig::for_training_size(16)
            };
            let local = LocalViews::new(h, w, &cfg, Some(3))?;
            assert!(local.rects().iter().any(|r| r.top < 0 || r.left < 0));
            for i in 0..local.len() {
                let rows = rows_of(&|row| local.for_each_row(&values, i, row))?;
                assert_eq!(
                    rows,
                    flat(local.extract(&latent, i)?)?,
                    "{padding:?} local {i}"
                );
            }
            let gcfg = GlobalViewConfig {
                padding,
                ..GlobalViewConfig::for_training_size(16)
            };
            let global = GlobalViews::new(h, w, &gcfg)?;
            for i in 0..global.len() {
                let rows = rows_of(&|row| global.for_each_row(&values, i, row))?;
                assert_eq!(
                    rows,
                    flat(global.extract(&latent, i)?)?,
                    "{padding:?} global {i}"
                );
            }
        }
        Ok(())
    }

    /// A view added in parts (the guidance halves where they were read) merges and scatters
    /// to the same bytes as the view in one buffer.
    #[test]
    fn views_added_in_parts_merge_to_the_same_bytes() -> Result<()> {
        let (h, w) = (40, 36);
        let local = LocalViews::new(h, w, &LocalViewConfig::for_training_size(16), Some(9))?;
        let global = GlobalViews::new(h, w, &GlobalViewConfig::for_training_size(16))?;
        let view = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|k| ((k * 31 + seed * 7) as f32 * 0.013).cos())
                .collect()
        };
        let (vh, vw) = local.window();
        let mut whole = local.merge_in_order(4, ViewWeighting::GAUSSIAN)?;
        let mut parts = local.merge_in_order(4, ViewWeighting::GAUSSIAN)?;
        for i in 0..local.len() {
            let v = view(4 * vh * vw, i);
            whole.add(&v)?;
            parts.add_parts(&[&v[..vh * vw], &v[vh * vw..]])?;
        }
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        assert_eq!(bits(whole.finish_vec()?), bits(parts.finish_vec()?));
        let (gh, gw) = global.view_size();
        let (mut whole, mut parts) = (global.scatter(4), global.scatter(4));
        for i in 0..global.len() {
            let v = view(4 * gh * gw, i);
            whole.add(i, &v)?;
            parts.add_parts(i, &[&v[..2 * gh * gw], &v[2 * gh * gw..]])?;
        }
        assert_eq!(bits(whole.finish_vec()?), bits(parts.finish_vec()?));
        // Parts that do not hold whole planes are refused.
        let mut m = local.merge_in_order(2, ViewWeighting::Uniform)?;
        let v = view(2 * vh * vw, 0);
        assert!(m.add_parts(&[&v[..5], &v[5..]]).is_err());
        Ok(())
    }

    /// A merge summing into an earlier merge's buffers (dirty, of other sizes) gives a fresh
    /// merge's bytes, and hands its buffers on.
    #[test]
    fn a_merge_reusing_buffers_gives_a_fresh_merges_bytes() -> Result<()> {
        let (h, w) = (40, 36);
        let local = LocalViews::new(h, w, &LocalViewConfig::for_training_size(16), Some(3))?;
        let (vh, vw) = local.window();
        let run = |merge: &mut LocalMerge| -> Result<()> {
            for i in 0..local.len() {
                let v: Vec<f32> = (0..2 * vh * vw)
                    .map(|k| ((k * 17 + i * 5) as f32 * 0.021).sin())
                    .collect();
                merge.add(&v)?;
            }
            Ok(())
        };
        let mut fresh = local.merge_in_order(2, ViewWeighting::GAUSSIAN)?;
        run(&mut fresh)?;
        let want = fresh.finish_vec()?;
        for (sums, weights) in [(vec![7.5; 10], vec![-1.0; 5_000]), (want.clone(), vec![])] {
            let buffers = MergeBuffers { sums, weights };
            let mut reused = local.merge_in_order_reusing(2, ViewWeighting::GAUSSIAN, buffers)?;
            run(&mut reused)?;
            let (got, weights) = reused.finish_reusable()?;
            assert!(got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
            assert_eq!((got.len(), weights.len()), (want.len(), h * w));
        }
        Ok(())
    }

    #[test]
    fn padding_modes_fill_outside_pixels() -> Result<()> {
        let latent = ramp(1, 1, 4, 4)?;
        let lat = latent.i_at(0, 0)?;
        let rows = [-2i64, -1, 0, 3, 4, 5];
        for (padding, want) in [
            (EdgePadding::Replicate, [0usize, 0, 0, 3, 3, 3]),
            (EdgePadding::Reflect, [2, 1, 0, 3, 2, 1]),
        ] {
            let t = gather(&latent, &rows, &[0], 4, 4, padding)?;
            let got = t.flatten_all()?.to_vec1::<f32>()?;
            let exp: Vec<f32> = want.iter().map(|&r| lat[r][0]).collect();
            assert_eq!(got, exp, "{padding:?}");
        }
        let t = gather(&latent, &rows, &[0], 4, 4, EdgePadding::Zero)?;
        let got = t.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(got, vec![0.0, 0.0, lat[0][0], lat[3][0], 0.0, 0.0]);
        Ok(())
    }

    #[test]
    fn smooth_field_has_no_seams_with_gaussian_weights() -> Result<()> {
        // Every view's "model" returns the same smooth analytic field f plus its own constant
        // bias (models disagree between tiles). On the merged result minus f, the largest
        // jump between neighbouring pixels across a window border must not exceed the largest
        // one inside windows (where the Gaussian weights blend the biases smoothly). Uniform
        // weights must fail the same check (the test's sensitivity).
        let (h, w) = (320usize, 448usize);
        let f = |y: i64, x: i64| ((y as f32) / 37.0).sin() * ((x as f32) / 53.0).cos();
        let views = LocalViews::new(h, w, &LocalViewConfig::for_training_size(128), Some(5))?;
        let (vh, vw) = views.window();
        let outs = views
            .rects()
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let bias = ((i * 7919) % 11) as f32 / 10.0 * 0.05 - 0.025;
                let v: Vec<f32> = (0..vh * vw)
                    .map(|k| f(r.top + (k / vw) as i64, r.left + (k % vw) as i64) + bias)
                    .collect();
                Ok(Tensor::from_vec(v, (1, 1, vh, vw), &Device::Cpu)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut border_x = std::collections::HashSet::new();
        let mut border_y = std::collections::HashSet::new();
        for r in views.rects() {
            border_x.extend([r.left, r.left + vw as i64]);
            border_y.extend([r.top, r.top + vh as i64]);
        }
        let steps = |m: &Tensor| -> Result<(f32, f32)> {
            let m = m.i_at(0, 0)?;
            let e = |y: usize, x: usize| m[y][x] - f(y as i64, x as i64);
            let (mut at_border, mut inside) = (0f32, 0f32);
            for y in 0..h {
                for x in 0..w {
                    if x > 0 {
                        let d = (e(y, x) - e(y, x - 1)).abs();
                        if border_x.contains(&(x as i64)) {
                            at_border = at_border.max(d);
                        } else {
                            inside = inside.max(d);
                        }
                    }
                    if y > 0 {
                        let d = (e(y, x) - e(y - 1, x)).abs();
                        if border_y.contains(&(y as i64)) {
                            at_border = at_border.max(d);
                        } else {
                            inside = inside.max(d);
                        }
                    }
                }
            }
            Ok((at_border, inside))
        };
        let (border, inside) = steps(&views.merge(&outs, ViewWeighting::GAUSSIAN)?)?;
        assert!(
            border <= inside,
            "Gaussian: border step {border} > inside {inside}"
        );
        let (border, inside) = steps(&views.merge(&outs, ViewWeighting::Uniform)?)?;
        assert!(
            border > inside,
            "uniform should show the seam: {border} vs {inside}"
        );
        Ok(())
    }

    #[test]
    fn merge_is_reproducible_and_rejects_bad_outputs() -> Result<()> {
        // Same outputs merged twice give the same bits (fixed view order), and a wrong
        // output count or shape is an error rather than a panic.
        let latent = ramp(2, 4, 192, 192)?;
        let views = LocalViews::new(192, 192, &LocalViewConfig::for_training_size(64), Some(9))?;
        let outs = (0..views.len())
            .map(|i| Ok((views.extract(&latent, i)? * 1.5)?))
            .collect::<Result<Vec<_>>>()?;
        let a = views
            .merge(&outs, ViewWeighting::GAUSSIAN)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let b = views
            .merge(&outs, ViewWeighting::GAUSSIAN)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(a, b);
        assert!(views.merge(&outs[1..], ViewWeighting::Uniform).is_err());
        let mut bad = outs.clone();
        bad[3] = Tensor::zeros((2, 4, 8, 8), DType::F32, &Device::Cpu)?;
        assert!(views.merge(&bad, ViewWeighting::Uniform).is_err());
        assert!(views.extract(&latent, views.len()).is_err());
        assert!(LocalViews::new(0, 10, &LocalViewConfig::for_training_size(64), None).is_err());
        Ok(())
    }

    /// The row-run accumulation gives the bytes of the pixel-by-pixel one, with windows that
    /// hang over every edge of the latent (their outside pixels dropped).
    #[test]
    fn merge_rows_match_pixel_by_pixel_accumulation() -> Result<()> {
        let (h, w, (vh, vw), bc) = (20, 17, (8, 6), 3);
        // A grid that covers the latent, then windows over every edge and corner.
        let grid = [0, 6, 12]
            .into_iter()
            .flat_map(|t| [0, 5, 11].map(|l| (t, l)));
        let edges = [(-3, -2), (5, 13), (15, -4), (-6, 14), (9, 4), (16, 15)];
        let rects: Vec<ViewRect> = grid
            .chain(edges)
            .map(|(top, left)| ViewRect {
                top,
                left,
                height: vh,
                width: vw,
            })
            .collect();
        let views = LocalViews {
            latent: (h, w),
            window: (vh, vw),
            grid: (1, rects.len()),
            rects: rects.clone(),
            padding: EdgePadding::Zero,
        };
        let outs: Vec<Vec<f32>> = (0..rects.len())
            .map(|i| {
                (0..bc * vh * vw)
                    .map(|j| ((i * 131 + j * 7) as f32 * 0.377).sin())
                    .collect()
            })
            .collect();
        let weights = ViewWeighting::GAUSSIAN.map(vh, vw)?;
        let (mut acc, mut den) = (vec![0f32; bc * h * w], vec![0f32; h * w]);
        for (rect, vals) in rects.iter().zip(&outs) {
            for y in 0..vh {
                for x in 0..vw {
                    let (gy, gx) = (rect.top + y as i64, rect.left + x as i64);
                    if gy < 0 || gy >= h as i64 || gx < 0 || gx >= w as i64 {
                        continue;
                    }
                    let (wt, dst) = (weights[y * vw + x], gy as usize * w + gx as usize);
                    den[dst] += wt;
                    for k in 0..bc {
                        acc[k * h * w + dst] += wt * vals[(k * vh + y) * vw + x];
                    }
                }
            }
        }
        for (i, a) in acc.iter_mut().enumerate() {
            *a /= den[i % (h * w)];
        }
        let mut m = views.merge_in_order(bc, ViewWeighting::GAUSSIAN)?;
        for vals in &outs {
            m.add(vals)?;
        }
        let got = m.finish_vec()?;
        assert!(got
            .iter()
            .zip(&acc)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        Ok(())
    }

    #[test]
    fn incremental_merges_match_the_whole_merges() -> Result<()> {
        // Views added one by one (local in index order, global in any order) give the bytes
        // of the all-at-once merges; a view too many or a missing one is an error.
        let latent = ramp(2, 4, 192, 192)?;
        let views = LocalViews::new(192, 192, &LocalViewConfig::for_training_size(64), Some(3))?;
        let outs = (0..views.len())
            .map(|i| Ok((views.extract(&latent, i)? * 0.75)?))
            .collect::<Result<Vec<_>>>()?;
        let whole = views.merge(&outs, ViewWeighting::GAUSSIAN)?;
        let mut m = views.merge_in_order(8, ViewWeighting::GAUSSIAN)?;
        assert!(views
            .merge_in_order(8, ViewWeighting::GAUSSIAN)?
            .finish()
            .is_err());
        for out in &outs {
            m.add(&to_f32_vec(out)?)?;
        }
        assert!(m.add(&to_f32_vec(&outs[0])?).is_err());
        let parts = m.finish()?.reshape((2, 4, 192, 192))?;
        let whole_vals = whole.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(parts.flatten_all()?.to_vec1::<f32>()?, whole_vals);

        // Settling as views arrive: the rows it reports final already hold the whole merge's
        // values in every plane, they only grow, and the end result is unchanged.
        let mut m = views.merge_in_order(8, ViewWeighting::GAUSSIAN)?;
        let (mut last, plane) = (0, 192 * 192);
        for out in &outs {
            m.add(&to_f32_vec(out)?)?;
            let (settled, vals) = m.settle()?;
            assert!(settled >= last);
            last = settled;
            for p in 0..8 {
                let rows = p * plane..p * plane + settled * 192;
                assert_eq!(vals[rows.clone()], whole_vals[rows]);
            }
        }
        assert_eq!(last, 192);
        assert_eq!(m.finish_vec()?, whole_vals);

        let g = GlobalViews::new(300, 212, &GlobalViewConfig::for_training_size(128))?;
        let latent = ramp(2, 4, 300, 212)?;
        let outs = (0..g.len())
            .map(|i| g.extract(&latent, i))
            .collect::<Result<Vec<_>>>()?;
        let whole = g.merge(&outs)?;
        let mut sc = g.scatter(8);
        for i in (0..g.len()).rev() {
            sc.add(i, &to_f32_vec(&outs[i])?)?;
        }
        assert!(sc.add(g.len(), &to_f32_vec(&outs[0])?).is_err());
        let parts = sc.finish()?.reshape((2, 4, 300, 212))?;
        assert_eq!(
            parts.flatten_all()?.to_vec1::<f32>()?,
            whole.flatten_all()?.to_vec1::<f32>()?
        );
        let mut partial = g.scatter(8);
        partial.add(0, &to_f32_vec(&outs[0])?)?;
        assert!(partial.finish().is_err());
        Ok(())
    }

    #[test]
    fn sdxl_2x_4x_8x_rects_match_reference_scale_forward() -> Result<()> {
        // Expected: tests/parity/ref_views.py, which imports FreeScale's scale_attention.py,
        // makes `random.randint` return 0 (jitter off; the jitter padding is subtracted) and
        // prints `get_views(n, n, 128, 128, scale_factor=1)` for latents 256, 512, 1024 (it also
        // checks that the token-grid calls `scale_forward` makes at latent/2 and latent/4 give
        // the same windows scaled back): every window is 128 x 128, the list is rows x columns
        // in row-major order. For the global views it prints `scale_forward`'s `global_views`
        // order and which latent pixels `x[:, h::s, w::s]` of view s + 1 (phase (1, 1)) holds.
        type Case = (usize, Vec<i64>, ViewRect, (usize, usize), (usize, usize));
        let rect = |top, left| ViewRect {
            top,
            left,
            height: 128,
            width: 128,
        };
        let cases: [Case; 3] = [
            (2, vec![0, 64, 128], rect(64, 128), (11, 19), (128, 128)),
            (
                4,
                vec![0, 64, 128, 192, 256, 320, 384],
                rect(0, 320),
                (21, 37),
                (384, 384),
            ),
            (
                8,
                vec![
                    0, 64, 128, 192, 256, 320, 384, 448, 512, 576, 640, 704, 768, 832, 896,
                ],
                rect(0, 320),
                (41, 73),
                (896, 896),
            ),
        ];
        for (s, starts, at5, pixel_5_9, last) in cases {
            let n = 128 * s;
            let l = LocalViews::new(n, n, &LocalViewConfig::for_training_size(128), None)?;
            let want: Vec<ViewRect> = starts
                .iter()
                .flat_map(|&t| starts.iter().map(move |&c| rect(t, c)))
                .collect();
            assert_eq!(l.rects(), &want[..], "{s}x");
            assert_eq!(l.rects()[5], at5);
            let end = l.rects()[l.len() - 1];
            assert_eq!((end.top as usize, end.left as usize), last);
            // Global views: s² of them, phase (p, q) = (index / s, index % s).
            let g = GlobalViews::new(n, n, &GlobalViewConfig::for_training_size(128))?;
            assert_eq!((g.len(), g.view_size()), (s * s, (128, 128)));
            for idx in 0..g.len() {
                assert_eq!(g.offset(idx)?, (idx / s, idx % s));
            }
            let v: Vec<f32> = (0..n * n).map(|i| i as f32).collect();
            let latent = Tensor::from_vec(v, (1, 1, n, n), &Device::Cpu)?;
            let view = g.extract(&latent, s + 1)?.i_at(0, 0)?;
            let pos = |v: f32| (v as usize / n, v as usize % n);
            assert_eq!(pos(view[0][0]), (1, 1));
            assert_eq!(pos(view[5][9]), pixel_5_9);
        }
        Ok(())
    }

    /// Test helper: plane (b, c) of a 4-D tensor as nested vectors.
    trait PlaneAt {
        fn i_at(&self, b: usize, c: usize) -> Result<Vec<Vec<f32>>>;
    }

    impl PlaneAt for Tensor {
        fn i_at(&self, b: usize, c: usize) -> Result<Vec<Vec<f32>>> {
            Ok(self
                .get(b)?
                .get(c)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?)
        }
    }
}
