//! GEGLU, value · GELU(gate) over the two halves of the feed-forward projection, in one kernel
//! (`cuda/geglu.cuh`): one read of the projection, one write of the result. The reference is
//! the composition in `model/attention.rs` (`FeedForward::forward`).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::launch::{self, Arg, Launch};

const THREADS: u32 = 256;

/// Whether the fused kernel computes the GEGLU of projection `p` (contiguous, its last
/// dimension even; the switch: `TESSERA_GPU_FUSED_GEGLU`).
pub fn applies(p: &Tensor) -> bool {
    super::fused_on(p, super::switches::get().fused_geglu)
        && matches!(p.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && p.is_contiguous()
        && p.dims().last().is_some_and(|n| n % 2 == 0)
}

/// `p[…, :n] · gelu_erf(p[…, n:])` for `p` (…, 2n).
pub fn geglu(p: &Tensor) -> Result<Tensor> {
    p.apply_op1_no_bwd(&Geglu)
}

struct Geglu;

/// The launch over buffers p and out, and the output's shape.
pub fn plan(dtype: DType, p: &Layout) -> Result<(Launch, Shape)> {
    let dims = p.dims();
    let Some(&last) = dims.last() else {
        candle_core::bail!("fused GEGLU: a scalar has no halves");
    };
    if !p.is_contiguous() || last % 2 != 0 || last == 0 {
        candle_core::bail!("fused GEGLU takes a contiguous (…, 2n) projection, not {dims:?}");
    }
    let inner = last / 2;
    let rows = p.shape().elem_count() / last;
    let mut out = dims.to_vec();
    out[dims.len() - 1] = inner;
    let launch = Launch {
        kernel: format!("tessera_geglu_{}", launch::dtype_suffix(dtype)?),
        grid: (
            inner.div_ceil(THREADS as usize) as u32,
            launch::grid_dim("rows", rows.min(65535), 65535)?,
            1,
        ),
        threads: THREADS,
        args: vec![
            Arg::Buf(0),
            Arg::Buf(1),
            Arg::I32(launch::int("rows", rows)?),
            Arg::I32(launch::int("features", inner)?),
        ],
    };
    Ok((launch, Shape::from(out)))
}

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "tessera-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        #[cfg(test)]
        if super::emulator::enabled() {
            use candle_core::backend::BackendStorage;
            let dtype = s.dtype();
            let (launch, shape) = plan(dtype, l)?;
            let inputs = [(s, l.start_offset())];
            let out = super::emulator::run_op(&[launch], &inputs, &[(dtype, shape.elem_count())])?;
            return Ok((out, shape));
        }
        let _ = (s, l);
        candle_core::bail!("the fused GEGLU runs on CUDA devices; the CPU uses the composition")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use launch::cuda::{address, address_mut, alloc, run};
        let dev = s.device().clone();
        let dtype = s.dtype();
        let (launch, shape) = plan(dtype, l)?;
        let stream = dev.cuda_stream();
        let mut out = alloc(&dev, dtype, shape.elem_count())?;
        {
            let (p, _p) = address(&s.slice, l.start_offset(), &stream)?;
            let (o, _o) = address_mut(&mut out, &stream)?;
            run(&launch, &dev, &[p, o])?;
        }
        Ok((
            candle_core::CudaStorage {
                slice: out,
                device: dev,
            },
            shape,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::emulator;
    use candle_core::{Device, D};

    #[test]
    fn emulated_kernel_matches_the_composition() {
        let dev = Device::Cpu;
        // Several column blocks (300 > 256 features) and rows; each element type.
        for (shape, dtype) in [
            ((3, 5, 80), DType::F32),
            ((2, 7, 600), DType::F16),
            ((1, 4, 64), DType::BF16),
        ] {
            let p = Tensor::randn(0f32, 1.5, shape, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let half = shape.2 / 2;
            let value = p.narrow(D::Minus1, 0, half).unwrap();
            let gate = p.narrow(D::Minus1, half, half).unwrap().gelu_erf().unwrap();
            let want = (value * gate).unwrap().to_dtype(DType::F32).unwrap();
            let got = {
                let _emu = emulator::enable();
                geglu(&p).unwrap().to_dtype(DType::F32).unwrap()
            };
            assert_eq!(got.dims(), want.dims());
            let err = ((&got - &want).unwrap().sqr().unwrap().sum_all().unwrap())
                .to_scalar::<f32>()
                .unwrap()
                .sqrt()
                / want
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    .sqrt();
            let bar = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
            assert!(err < bar, "{shape:?} {dtype:?}: {err}");
        }
    }

    #[test]
    fn plan_refuses_odd_projections() {
        let (launch, shape) = plan(DType::F16, &Layout::contiguous((2, 4096, 10240))).unwrap();
        assert_eq!(shape.dims(), &[2, 4096, 5120]);
        assert_eq!(launch.grid, (20, 8192, 1));
        assert!(plan(DType::F16, &Layout::contiguous((2, 3, 5))).is_err());
        assert!(plan(DType::U8, &Layout::contiguous((2, 4))).is_err());
    }
}
