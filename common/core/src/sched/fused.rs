//! Element-wise arithmetic over a whole stage latent as one pass over contiguous f32 values on
//! the CPU, split over the cores: the scheduler step, classifier-free guidance and the input
//! scaling.
//!
//! A stage's latent is millions of values, and these run between a step's last result and
//! the next step's first task, when no worker has anything to do; as chains of tensor
//! operations they make several single-threaded passes and as many stage-sized allocations.
//! The fused closures repeat the chain's f32 operations in its order — candle's scalar
//! product is an affine `v·m + 0` (a division by a scalar `v·(1/d) + 0`), and that `+ 0` is
//! kept since it turns −0 into +0 — so the bytes match.

use std::ops::Range;

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

use super::StepOutput;

/// The values of a contiguous CPU f32 tensor.
fn values<'s>(storage: &'s Storage, layout: &Layout) -> Option<&'s [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((from, to))) => Some(&v[from..to]),
        _ => None,
    }
}

/// Values per thread: one run per core, a single run for small tensors.
fn run_length(n: usize) -> usize {
    let threads = if n < 1 << 16 {
        1
    } else {
        crate::tiling::cores()
    };
    n.div_ceil(threads).max(1)
}

/// `f` over the values of two tensors of one shape; `None` where they are not both
/// contiguous CPU f32 tensors (the caller then runs the tensor chain).
fn with_values<R>(a: &Tensor, b: &Tensor, f: impl FnOnce(&[f32], &[f32]) -> R) -> Option<R> {
    if a.shape() != b.shape() {
        return None;
    }
    let (a_store, a_layout) = a.storage_and_layout();
    let (b_store, b_layout) = b.storage_and_layout();
    Some(f(values(&a_store, a_layout)?, values(&b_store, b_layout)?))
}

/// `n` values, each run of them (one per thread, see [`run_length`]) filled by `fill` with
/// the run's range of indices.
fn in_runs(n: usize, fill: impl Fn(Range<usize>, &mut [f32]) + Sync) -> Vec<f32> {
    let per = run_length(n);
    let mut out = vec![0f32; n];
    std::thread::scope(|scope| {
        for (i, run) in out.chunks_mut(per).enumerate() {
            let fill = &fill;
            scope.spawn(move || fill(i * per..i * per + run.len(), run));
        }
    });
    out
}

/// `f(a, b)` value by value over two tensors of one shape; `None` where they are not both
/// contiguous CPU f32 tensors (the caller then runs the tensor chain).
pub(crate) fn zip_map(
    a: &Tensor,
    b: &Tensor,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Result<Option<Tensor>> {
    let out = with_values(a, b, |x, y| {
        in_runs(x.len(), |r, out| {
            for ((o, &x), &y) in out.iter_mut().zip(&x[r.clone()]).zip(&y[r]) {
                *o = f(x, y);
            }
        })
    });
    out.map(|out| Tensor::from_vec(out, a.shape().clone(), a.device()))
        .transpose()
}

/// `f(a, b, c)` value by value over three tensors of one shape; `None` where they are not all
/// contiguous CPU f32 tensors.
pub(crate) fn zip3_map(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    f: impl Fn(f32, f32, f32) -> f32 + Sync,
) -> Result<Option<Tensor>> {
    if a.shape() != c.shape() {
        return Ok(None);
    }
    let (c_store, c_layout) = c.storage_and_layout();
    let Some(z) = values(&c_store, c_layout) else {
        return Ok(None);
    };
    let out = with_values(a, b, |x, y| {
        in_runs(x.len(), |r, out| {
            let ins = x[r.clone()].iter().zip(&y[r.clone()]).zip(&z[r]);
            for (o, ((&x, &y), &z)) in out.iter_mut().zip(ins) {
                *o = f(x, y, z);
            }
        })
    });
    out.map(|out| Tensor::from_vec(out, a.shape().clone(), a.device()))
        .transpose()
}

/// `f(a)` value by value; `None` where `a` is not a contiguous CPU f32 tensor.
pub(crate) fn map(a: &Tensor, f: impl Fn(f32) -> f32 + Sync) -> Result<Option<Tensor>> {
    zip_map(a, a, |x, _| f(x))
}

/// `(prev, x0) = f(model_output, sample)` value by value; `None` where the two are not
/// contiguous CPU f32 tensors of one shape (the caller then runs the tensor chain).
pub(super) fn step(
    model_output: &Tensor,
    sample: &Tensor,
    f: impl Fn(f32, f32) -> (f32, f32) + Sync,
) -> Result<Option<StepOutput>> {
    let out = with_values(model_output, sample, |e, s| {
        let n = s.len();
        let (mut prev, mut x0) = (vec![0f32; n], vec![0f32; n]);
        let per = run_length(n);
        std::thread::scope(|scope| {
            for (((p, x), e), s) in prev
                .chunks_mut(per)
                .zip(x0.chunks_mut(per))
                .zip(e.chunks(per))
                .zip(s.chunks(per))
            {
                let f = &f;
                scope.spawn(move || {
                    for (((p, x), &e), &s) in p.iter_mut().zip(x.iter_mut()).zip(e).zip(s) {
                        (*p, *x) = f(e, s);
                    }
                });
            }
        });
        (prev, x0)
    });
    let Some((prev, x0)) = out else {
        return Ok(None);
    };
    let (shape, device) = (sample.shape().clone(), sample.device().clone());
    Ok(Some(StepOutput {
        prev_sample: Tensor::from_vec(prev, shape.clone(), &device)?,
        pred_original_sample: Tensor::from_vec(x0, shape, &device)?,
    }))
}

/// Checks a fused step against its tensor chain bit for bit, for both parameterisations and
/// each `(from, to)` pair of schedule values, on a latent large enough to be threaded (with a
/// +0 and a −0 among the sample's values).
#[cfg(test)]
pub(super) fn check_against_chain(
    pairs: &[(f64, f64)],
    fused: impl Fn(super::PredictionType, &Tensor, &Tensor, f64, f64) -> Result<Option<StepOutput>>,
    chain: impl Fn(super::PredictionType, &Tensor, &Tensor, f64, f64) -> Result<StepOutput>,
) -> Result<()> {
    let dev = candle_core::Device::Cpu;
    let n = 3 * (1 << 16) + 5;
    let e = Tensor::randn(0f32, 1.5, n, &dev)?;
    let mut s = Tensor::randn(0f32, 8.0, n, &dev)?.to_vec1::<f32>()?;
    s[0] = 0.0;
    s[1] = -0.0;
    let s = Tensor::from_vec(s, n, &dev)?;
    let bits = |t: &Tensor| -> Result<Vec<u32>> {
        Ok(t.to_vec1::<f32>()?.into_iter().map(f32::to_bits).collect())
    };
    for prediction in [
        super::PredictionType::Epsilon,
        super::PredictionType::VPrediction,
    ] {
        for &(from, to) in pairs {
            let a = fused(prediction, &e, &s, from, to)?.expect("contiguous f32");
            let b = chain(prediction, &e, &s, from, to)?;
            assert_eq!(
                bits(&a.prev_sample)?,
                bits(&b.prev_sample)?,
                "{prediction:?} {from}"
            );
            assert_eq!(
                bits(&a.pred_original_sample)?,
                bits(&b.pred_original_sample)?,
                "{prediction:?} {from}"
            );
        }
    }
    Ok(())
}
