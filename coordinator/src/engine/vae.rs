//! The VAE distributed in tiles: a decode or an encode larger than one VAE tile becomes one task
//! per tile, run by any worker through the [`Dispatch`], and the coordinator blends the
//! overlapping results with smooth ramps (the tile layout and the weights:
//! [`tessera_core::tiling::vae`]). Tiles are taken band by band (a band = one row of
//! tiles); while one band is blended the next is already out with the workers, so the store
//! and the coordinator hold about two bands of tiles, and the final decode hands finished pixel
//! rows to a [`RowSink`] as soon as no later band can touch them.
//!
//! Determinism: every tile task is a pure function of its input tile, the blend weights
//! depend only on the geometry, and tiles are accumulated in a fixed order, so the result is
//! the same bytes for any number of workers and any completion order. The encode's posterior
//! noise is drawn here, over the whole latent, from the job's seeded key.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use tessera_core::noise::{NoiseKey, NoisePurpose};
use tessera_core::resize::Resizer;
use tessera_core::task::{Task, TaskKind, VaeNoise};
use tessera_core::tiling::vae::{axis_weights, VaeTiling};
use tessera_store::{get_tensor, keys, put_tensor};

use super::{Engine, EngineError, Result};

/// Pixels per latent cell.
const F: usize = 8;

/// Receives finished output rows, top to bottom: `rows` holds whole rows of `width` RGB pixels,
/// interleaved, as f32 in [-1, 1].
pub trait RowSink {
    fn write_rows(&mut self, rows: &[f32], width: usize) -> std::io::Result<()>;
}

/// The picture an encode reads its tiles from.
#[derive(Clone, Copy)]
pub enum Pixels<'a> {
    /// (1, 3, H, W) held whole (an init image, a test picture).
    Whole(&'a Tensor),
    /// A stage transition's upscaled picture, computed a tile window at a time.
    Resized(&'a Resizer),
}

impl Pixels<'_> {
    /// (height, width) in pixels.
    pub fn size(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Pixels::Whole(t) => {
                let (_, _, h, w) = t.dims4()?;
                (h, w)
            }
            Pixels::Resized(r) => r.size(),
        })
    }

    /// Rows `ys` and columns `xs` as a contiguous (1, 3, rows, columns) tensor on the CPU.
    pub fn window(&self, ys: Range<usize>, xs: Range<usize>) -> Result<Tensor> {
        Ok(match self {
            Pixels::Whole(t) => t
                .to_device(&Device::Cpu)?
                .narrow(2, ys.start, ys.len())?
                .narrow(3, xs.start, xs.len())?
                .contiguous()?,
            Pixels::Resized(r) => r.window(ys, xs)?,
        })
    }
}

/// Collects rows into a (1, 3, H, W) tensor: for transitions, whose pixels are resized whole.
pub struct CollectRows {
    rgb: Vec<f32>,
}

impl CollectRows {
    pub fn new() -> Self {
        Self { rgb: Vec::new() }
    }

    /// The rows as 3 row-major planes (R, G, B) of `width` columns, and the height: a
    /// (1, 3, H, W) picture's values.
    pub fn into_planes(self, width: usize) -> (Vec<f32>, usize) {
        let n = self.rgb.len() / 3;
        let h = n / width.max(1);
        let mut planes = vec![0f32; 3 * n];
        let (r, rest) = planes.split_at_mut(n);
        let (g, b) = rest.split_at_mut(n);
        for (i, px) in self.rgb.chunks_exact(3).enumerate() {
            (r[i], g[i], b[i]) = (px[0], px[1], px[2]);
        }
        (planes, h)
    }

    pub fn into_tensor(self, width: usize) -> Result<Tensor> {
        let (planes, h) = self.into_planes(width);
        Ok(Tensor::from_vec(planes, (1, 3, h, width), &Device::Cpu)?)
    }
}

impl Default for CollectRows {
    fn default() -> Self {
        Self::new()
    }
}

impl RowSink for CollectRows {
    fn write_rows(&mut self, rows: &[f32], _width: usize) -> std::io::Result<()> {
        self.rgb.extend_from_slice(rows);
        Ok(())
    }
}

impl Engine<'_> {
    /// Runs one band of tile tasks after another, the next band dispatched while `consume`
    /// blends the current one. `prepare(i)` stores band `i`'s inputs and returns its tasks;
    /// `consume(i, tasks)` reads their outputs (and deletes their keys).
    fn run_bands(
        &self,
        bands: usize,
        prepare: &dyn Fn(usize) -> Result<Vec<Task>>,
        consume: &mut dyn FnMut(usize, &[Task]) -> Result<()>,
    ) -> Result<()> {
        if bands == 0 {
            return Ok(());
        }
        let workers = self.workers;
        std::thread::scope(|scope| -> Result<()> {
            let launch = |tasks: Vec<Task>| {
                scope.spawn(move || -> Result<Vec<Task>> {
                    workers.run(&tasks, &|_| {})?;
                    Ok(tasks)
                })
            };
            let mut out = Some(launch(prepare(0)?));
            for i in 0..bands {
                let handle = out.take().ok_or_else(|| {
                    EngineError::Invalid("tiled vae: a band was not dispatched".into())
                })?;
                let tasks = handle
                    .join()
                    .map_err(|_| EngineError::Invalid("tiled vae: dispatch panicked".into()))??;
                if i + 1 < bands {
                    out = Some(launch(prepare(i + 1)?));
                }
                consume(i, &tasks)?;
            }
            Ok(())
        })
    }

    /// Decodes `latent` (1, C, h, w) to pixels in tiles and hands the rows, top to bottom, to
    /// `sink`. Holds at most about two bands of tiles (and one band of f32 rows) at once.
    pub(crate) fn decode_rows(
        &self,
        job: &str,
        name: &str,
        tiling: VaeTiling,
        latent: &Tensor,
        sink: &mut dyn RowSink,
    ) -> Result<()> {
        let latent = latent.to_device(&Device::Cpu)?.contiguous()?;
        let (_, _, h, w) = latent.dims4()?;
        let rows = tiling.starts(h);
        let cols = tiling.starts(w);
        let (th, tw) = (tiling.tile.min(h), tiling.tile.min(w));
        let wy = axis_weights(&rows, th, F);
        let wx = axis_weights(&cols, tw, F);
        let width = w * F;
        let key = |i: usize, j: usize, part: &str| {
            keys::stage(job, 0, &format!("vae:{name}:r{i}c{j}:{part}"))
        };
        let prepare = |i: usize| -> Result<Vec<Task>> {
            let mut tasks = Vec::with_capacity(cols.len());
            for (j, &c) in cols.iter().enumerate() {
                let piece = latent.narrow(2, rows[i], th)?.narrow(3, c, tw)?;
                put_tensor(self.store, &key(i, j, "latent"), &piece)?;
                tasks.push(Task {
                    job: job.to_string(),
                    id: format!("decode:{name}:r{i}c{j}"),
                    kind: TaskKind::Decode {
                        input: key(i, j, "latent"),
                        output: key(i, j, "pixels"),
                    },
                });
            }
            Ok(tasks)
        };
        // `acc` holds the rows [acc_start, acc_start + acc.len() / (3 * width)) still open.
        let mut acc: Vec<f32> = Vec::new();
        let mut acc_start = 0usize;
        let row_len = 3 * width;
        let mut consume = |i: usize, _tasks: &[Task]| -> Result<()> {
            let y0 = rows[i] * F;
            let y1 = y0 + th * F;
            let open_end = acc_start + acc.len() / row_len;
            if y1 > open_end {
                acc.resize((y1 - acc_start) * row_len, 0.0);
            }
            for (j, &c) in cols.iter().enumerate() {
                let px = get_tensor(self.store, &key(i, j, "pixels"), &Device::Cpu)?;
                let (_, ch, ph, pw) = px.dims4()?;
                if ch != 3 || ph != th * F || pw != tw * F {
                    return Err(EngineError::Model(format!(
                        "a decoded tile has shape {:?}, expected (1, 3, {}, {})",
                        px.dims(),
                        th * F,
                        tw * F
                    )));
                }
                // Workers send the VAE's own dtype (f16 on a GPU).
                let data = px.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                let x0 = c * F;
                let plane = ph * pw;
                for (y, &wyv) in wy[i].iter().enumerate() {
                    let row = &mut acc[(y0 + y - acc_start) * row_len..][..row_len];
                    for (x, &wxv) in wx[j].iter().enumerate() {
                        let wgt = wyv * wxv;
                        let d = &mut row[(x0 + x) * 3..(x0 + x) * 3 + 3];
                        for (k, dv) in d.iter_mut().enumerate() {
                            *dv += data[k * plane + y * pw + x] * wgt;
                        }
                    }
                }
                self.store.delete(&key(i, j, "latent"))?;
                self.store.delete(&key(i, j, "pixels"))?;
            }
            // Rows above the next band's first row are final.
            let done_to = rows.get(i + 1).map_or(y1, |r| r * F);
            if done_to > acc_start {
                let n = done_to - acc_start;
                sink.write_rows(&acc[..n * row_len], width)
                    .map_err(|e| EngineError::Output(e.to_string()))?;
                acc.drain(..n * row_len);
                acc_start = done_to;
            }
            Ok(())
        };
        self.run_bands(rows.len(), &prepare, &mut consume)
    }

    /// Decodes `latent` whole (a transition's pixels), (1, 3, 8h, 8w) in [-1, 1].
    /// [`Engine::decode_tiled`] as 3 row-major planes and (height, width), for a transition.
    pub(crate) fn decode_planes(
        &self,
        job: &str,
        name: &str,
        tiling: VaeTiling,
        latent: &Tensor,
    ) -> Result<(Vec<f32>, (usize, usize))> {
        let mut rows = CollectRows::new();
        self.decode_rows(job, name, tiling, latent, &mut rows)?;
        let w = latent.dim(3)? * F;
        let (planes, h) = rows.into_planes(w);
        Ok((planes, (h, w)))
    }

    pub(crate) fn decode_tiled(
        &self,
        job: &str,
        name: &str,
        tiling: VaeTiling,
        latent: &Tensor,
    ) -> Result<Tensor> {
        let mut rows = CollectRows::new();
        self.decode_rows(job, name, tiling, latent, &mut rows)?;
        rows.into_tensor(latent.dim(3)? * F)
    }

    /// Encodes `pixels` (1, 3, H, W) in [-1, 1] to the stage's latent: one `Encode` task when
    /// the image fits one tile, else `EncodeTile` tasks whose `[mean, std]` the coordinator
    /// blends before drawing the sample with the seeded noise of (seed, stage). Each tile's
    /// pixels are taken from `pixels` as its task is prepared, so a resized transition picture
    /// is never held whole.
    pub(crate) fn encode_tiled(
        &self,
        job: &str,
        tiling: VaeTiling,
        noise: VaeNoise,
        pixels: Pixels<'_>,
    ) -> Result<Tensor> {
        let (ph, pw) = pixels.size()?;
        if ph % F != 0 || pw % F != 0 {
            return Err(EngineError::Invalid(format!(
                "cannot encode a {pw}x{ph} picture: sides must be multiples of {F}"
            )));
        }
        let (h, w) = (ph / F, pw / F);
        let rows = tiling.starts(h);
        let cols = tiling.starts(w);
        let stage = noise.stage as usize;
        if rows.len() == 1 && cols.len() == 1 {
            return self.encode_whole(job, noise, &pixels.window(0..ph, 0..pw)?);
        }
        let (th, tw) = (tiling.tile.min(h), tiling.tile.min(w));
        let wy = axis_weights(&rows, th, 1);
        let wx = axis_weights(&cols, tw, 1);
        let key = |i: usize, j: usize, part: &str| {
            keys::stage(job, stage, &format!("vae:encode:r{i}c{j}:{part}"))
        };
        let prepare = |i: usize| -> Result<Vec<Task>> {
            let mut tasks = Vec::with_capacity(cols.len());
            for (j, &c) in cols.iter().enumerate() {
                let (y, x) = (rows[i] * F, c * F);
                let piece = pixels.window(y..y + th * F, x..x + tw * F)?;
                put_tensor(self.store, &key(i, j, "pixels"), &piece)?;
                tasks.push(Task {
                    job: job.to_string(),
                    id: format!("encode:s{stage}:r{i}c{j}"),
                    kind: TaskKind::EncodeTile {
                        input: key(i, j, "pixels"),
                        output: key(i, j, "moments"),
                    },
                });
            }
            Ok(tasks)
        };
        // (2C, h, w) planes: C means then C standard deviations.
        let mut acc: Vec<f32> = Vec::new();
        let mut planes = 0usize;
        let mut consume = |i: usize, _tasks: &[Task]| -> Result<()> {
            for (j, &c) in cols.iter().enumerate() {
                let m = get_tensor(self.store, &key(i, j, "moments"), &Device::Cpu)?;
                let (_, c2, mh, mw) = m.dims4()?;
                if mh != th || mw != tw || c2 % 2 != 0 || (planes != 0 && c2 != planes) {
                    return Err(EngineError::Model(format!(
                        "an encoded tile has shape {:?}, expected (1, 2C, {th}, {tw})",
                        m.dims()
                    )));
                }
                if planes == 0 {
                    planes = c2;
                    acc = vec![0f32; c2 * h * w];
                }
                let data = m.flatten_all()?.to_vec1::<f32>()?;
                for p in 0..c2 {
                    for (y, &wyv) in wy[i].iter().enumerate() {
                        let dst = &mut acc[p * h * w + (rows[i] + y) * w + c..][..tw];
                        let src = &data[p * th * tw + y * tw..][..tw];
                        for ((d, s), &wxv) in dst.iter_mut().zip(src).zip(&wx[j]) {
                            *d += s * wyv * wxv;
                        }
                    }
                }
                self.store.delete(&key(i, j, "pixels"))?;
                self.store.delete(&key(i, j, "moments"))?;
            }
            Ok(())
        };
        self.run_bands(rows.len(), &prepare, &mut consume)?;
        let c = planes / 2;
        let eps = NoiseKey {
            seed: noise.seed,
            stage: noise.stage,
            step: 0,
            purpose: NoisePurpose::VaeSample,
        }
        .normal((1, c, h, w), &Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
        // mean + std · ε in place over the means (the same f32 operations as the tensor
        // form), so a gigapixel latent is not held three more times.
        let n = c * h * w;
        let (mean, std) = acc.split_at_mut(n);
        for ((m, &s), &e) in mean.iter_mut().zip(&std[..n]).zip(&eps) {
            *m += s * e;
        }
        drop(eps);
        acc.truncate(n);
        Ok(Tensor::from_vec(acc, (1, c, h, w), &Device::Cpu)?)
    }

    /// One `Encode` task for a picture that fits a tile: the worker draws the same seeded
    /// noise over the whole latent.
    fn encode_whole(&self, job: &str, noise: VaeNoise, pixels: &Tensor) -> Result<Tensor> {
        let stage = noise.stage as usize;
        let input = keys::stage(job, stage, "entry:pixels");
        let output = keys::stage(job, stage, "entry:latent");
        put_tensor(self.store, &input, pixels)?;
        let task = Task {
            job: job.to_string(),
            id: format!("encode:s{stage}"),
            kind: TaskKind::Encode {
                input: input.clone(),
                output: output.clone(),
                noise,
            },
        };
        self.workers.run(std::slice::from_ref(&task), &|_| {})?;
        let z = get_tensor(self.store, &output, &Device::Cpu)?;
        self.store.delete(&input)?;
        self.store.delete(&output)?;
        Ok(z)
    }
}
