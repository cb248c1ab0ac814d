//! Scheduler steps as one pass over contiguous f32 values on the CPU, split over the cores.
//!
//! A stage's latent is millions of values, and the step runs between a step's last result and
//! the next step's first task, when no worker has anything to do; as a chain of tensor
//! operations it makes five or six passes and as many stage-sized allocations. The fused
//! closures repeat the chain's f32 operations in its order — candle's scalar product is an
//! affine `v·m + 0`, and that `+ 0` is kept since it turns −0 into +0 — so the bytes match.

use candle_core::{CpuStorage, Result, Storage, Tensor};

use super::StepOutput;

/// `(prev, x0) = f(model_output, sample)` value by value; `None` where the two are not
/// contiguous CPU f32 tensors of one shape (the caller then runs the tensor chain).
pub(super) fn step(
    model_output: &Tensor,
    sample: &Tensor,
    f: impl Fn(f32, f32) -> (f32, f32) + Sync,
) -> Result<Option<StepOutput>> {
    if model_output.shape() != sample.shape() {
        return Ok(None);
    }
    let (e_store, e_layout) = model_output.storage_and_layout();
    let (s_store, s_layout) = sample.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(e)), Storage::Cpu(CpuStorage::F32(s))) =
        (&*e_store, &*s_store)
    else {
        return Ok(None);
    };
    let (Some((e0, e1)), Some((s0, s1))) =
        (e_layout.contiguous_offsets(), s_layout.contiguous_offsets())
    else {
        return Ok(None);
    };
    let (e, s) = (&e[e0..e1], &s[s0..s1]);
    let n = s.len();
    let mut prev = vec![0f32; n];
    let mut x0 = vec![0f32; n];
    let threads = if n < 1 << 16 {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |t| t.get())
    };
    let per = n.div_ceil(threads).max(1);
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
    let (shape, device) = (sample.shape().clone(), sample.device().clone());
    Ok(Some(StepOutput {
        prev_sample: Tensor::from_vec(prev, shape.clone(), &device)?,
        pred_original_sample: Tensor::from_vec(x0, shape, &device)?,
    }))
}

/// Test inputs: a model output and a sample of `n` values, the sample with a +0 and a −0.
#[cfg(test)]
pub(super) fn test_inputs(n: usize) -> Result<(Tensor, Tensor)> {
    let dev = candle_core::Device::Cpu;
    let e = Tensor::randn(0f32, 1.5, n, &dev)?;
    let mut s = Tensor::randn(0f32, 8.0, n, &dev)?.to_vec1::<f32>()?;
    s[0] = 0.0;
    s[1] = -0.0;
    Ok((e, Tensor::from_vec(s, n, &dev)?))
}

/// Whether two step outputs hold the same bits.
#[cfg(test)]
pub(super) fn same_bits(a: &StepOutput, b: &StepOutput) -> Result<bool> {
    let bits = |t: &Tensor| -> Result<Vec<u32>> {
        Ok(t.flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f32::to_bits)
            .collect())
    };
    Ok(bits(&a.prev_sample)? == bits(&b.prev_sample)?
        && bits(&a.pred_original_sample)? == bits(&b.pred_original_sample)?)
}
