//! GroupNorm, optionally followed by SiLU, in two kernels (`cuda/group_norm.cuh`): per-chunk
//! moments over many blocks, then one pass that normalises, applies the affine part and the
//! SiLU. Statistics in f32 whatever the element type, as diffusers computes them. The
//! reference is `model/norm.rs`'s composition (then candle's `silu`).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::launch::{self, Arg, Launch};

const THREADS: u32 = 256;
/// Elements per block: enough work per block, and many blocks per group.
const CHUNK_TARGET: usize = 8192;
const MAX_CHUNKS: usize = 256;

/// Whether the fused kernels normalise `x` (contiguous (B, C, …), weights of its dtype; the
/// switch: `TESSERA_GPU_FUSED_NORM`).
pub fn applies(x: &Tensor, weight: &Tensor) -> bool {
    super::fused_on(x, super::switches::get().fused_norm)
        && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && weight.dtype() == x.dtype()
        && x.rank() >= 3
        && x.is_contiguous()
}

/// GroupNorm of `x` (B, C, …) over `groups` groups with per-channel `weight` and `bias`, then
/// SiLU when `silu`.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    x.apply_op3_no_bwd(weight, bias, &GroupNormOp { groups, eps, silu })
}

struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

/// The two launches (statistics, then normalisation) over buffers x, weight, bias, y and the
/// f32 partial moments; with the output shape and the partials' length.
pub fn plan(
    dtype: DType,
    x: &Layout,
    w: &Layout,
    b: &Layout,
    op: (usize, f64, bool),
) -> Result<(Vec<Launch>, Shape, usize)> {
    let (groups, eps, silu) = op;
    let dims = x.dims();
    if dims.len() < 3 || !x.is_contiguous() {
        candle_core::bail!("fused GroupNorm takes a contiguous (B, C, …) tensor, not {dims:?}");
    }
    let (batch, c) = (dims[0], dims[1]);
    let hw: usize = dims[2..].iter().product();
    for (what, l) in [("weight", w), ("bias", b)] {
        if l.dims() != [c] || !l.is_contiguous() {
            candle_core::bail!("fused GroupNorm: {what} {:?} for {c} channels", l.dims());
        }
    }
    if groups == 0 || !c.is_multiple_of(groups) || hw == 0 {
        candle_core::bail!("fused GroupNorm: {c} channels do not split into {groups} groups");
    }
    let group_len = launch::int("elements per group", c / groups * hw)?;
    let chunks = (group_len as usize)
        .div_ceil(CHUNK_TARGET)
        .clamp(1, MAX_CHUNKS);
    let chunk_len = (group_len as usize).div_ceil(chunks);
    let chunks = (group_len as usize).div_ceil(chunk_len);
    let grid = (
        chunks as u32,
        launch::grid_dim("samples × groups", batch * groups, 65535)?,
        1,
    );
    let suffix = launch::dtype_suffix(dtype)?;
    let sizes = [
        Arg::I32(group_len),
        Arg::I32(chunk_len as i32),
        Arg::I32(chunks as i32),
    ];
    let stats = Launch {
        kernel: format!("tessera_group_norm_stats_{suffix}"),
        grid,
        threads: THREADS,
        args: [vec![Arg::Buf(0), Arg::Buf(4)], sizes.to_vec()].concat(),
    };
    let apply_args = [
        (0..5).map(Arg::Buf).collect(),
        sizes.to_vec(),
        vec![
            Arg::I32(groups as i32),
            Arg::I32(launch::int("positions", hw)?),
            Arg::F32(eps as f32),
            Arg::I32(silu as i32),
        ],
    ]
    .concat();
    let apply = Launch {
        kernel: format!("tessera_group_norm_apply_{suffix}"),
        grid,
        threads: THREADS,
        args: apply_args,
    };
    Ok((
        vec![stats, apply],
        x.shape().clone(),
        batch * groups * chunks * 3,
    ))
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "tessera-group-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        #[cfg(test)]
        if super::emulator::enabled() {
            use candle_core::backend::BackendStorage;
            let dtype = s1.dtype();
            let (launches, shape, parts) =
                plan(dtype, l1, l2, l3, (self.groups, self.eps, self.silu))?;
            let inputs = [(s1, l1), (s2, l2), (s3, l3)].map(|(s, l)| (s, l.start_offset()));
            let outputs = [(dtype, shape.elem_count()), (DType::F32, parts)];
            let out = super::emulator::run_op(&launches, &inputs, &outputs)?;
            return Ok((out, shape));
        }
        // Read here too: without tests or CUDA, nothing else reads the op's fields.
        let _ = (s1, l1, s2, l2, s3, l3, self.groups, self.eps, self.silu);
        candle_core::bail!("the fused GroupNorm runs on CUDA devices; the CPU uses the composition")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use launch::cuda::{address, address_mut, alloc, run};
        let dev = s1.device().clone();
        let dtype = s1.dtype();
        let (launches, shape, parts) = plan(dtype, l1, l2, l3, (self.groups, self.eps, self.silu))?;
        let stream = dev.cuda_stream();
        let mut out = alloc(&dev, dtype, shape.elem_count())?;
        let mut part = alloc(&dev, DType::F32, parts)?;
        {
            let (x, _x) = address(&s1.slice, l1.start_offset(), &stream)?;
            let (w, _w) = address(&s2.slice, l2.start_offset(), &stream)?;
            let (b, _b) = address(&s3.slice, l3.start_offset(), &stream)?;
            let (y, _y) = address_mut(&mut out, &stream)?;
            let (p, _p) = address_mut(&mut part, &stream)?;
            for l in &launches {
                run(l, &dev, &[x, w, b, y, p])?;
            }
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
    use crate::gpu::emulator::{self, rel_err};
    use crate::model::norm;
    use candle_core::{Device, Module};
    use candle_nn::VarBuilder;
    use std::collections::HashMap;

    #[test]
    fn emulated_kernels_match_the_composition() {
        let dev = Device::Cpu;
        // (shape, groups, dtype): one chunk per group, several chunks per group (16384
        // elements), a 3-D input, each element type; a mean far from zero checks the
        // variance is computed without cancellation.
        let cases: [(&[usize], usize, DType); 4] = [
            (&[2, 12, 5, 7], 4, DType::F32),
            (&[2, 64, 9, 9], 32, DType::F16),
            (&[1, 8, 64, 64], 2, DType::BF16),
            (&[1, 6, 130], 3, DType::F16),
        ];
        for (shape, groups, dtype) in cases {
            let c = shape[1];
            let tensors = HashMap::from([
                (
                    "n.weight".to_string(),
                    Tensor::randn(1f32, 0.3, c, &dev).unwrap(),
                ),
                (
                    "n.bias".to_string(),
                    Tensor::randn(0f32, 0.3, c, &dev).unwrap(),
                ),
            ]);
            let vb = VarBuilder::from_tensors(tensors, dtype, &dev);
            let gn = norm::group_norm(groups, c, 1e-5, vb.pp("n")).unwrap();
            let x = (Tensor::randn(0f32, 2.0, shape, &dev).unwrap() + 40.0)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let want = gn.forward(&x).unwrap();
            let want_silu = want.silu().unwrap();
            let _emu = emulator::enable();
            let got = gn.forward(&x).unwrap();
            let got_silu = gn.forward_silu(&x).unwrap();
            let bar = match dtype {
                DType::F32 => 1e-5,
                DType::F16 => 2e-3,
                _ => 1e-2,
            };
            for (g, w) in [(&got, &want), (&got_silu, &want_silu)] {
                assert_eq!(g.dtype(), dtype);
                let err = rel_err(g, w);
                assert!(err < bar, "{shape:?} {groups} groups {dtype:?}: {err}");
            }
        }
    }

    #[test]
    fn plan_spreads_large_groups_over_many_blocks() {
        // SDXL's first level at 1024²: 320 channels in 32 groups over 128² positions.
        let x = Layout::contiguous((2, 320, 128, 128));
        let w = Layout::contiguous(320);
        let (launches, _, parts) = plan(DType::F16, &x, &w, &w, (32, 1e-5, true)).unwrap();
        assert_eq!(launches[0].grid, (20, 64, 1));
        assert_eq!(parts, 64 * 20 * 3);
        assert_eq!(launches[1].kernel, "tessera_group_norm_apply_f16");
        let e = plan(DType::F16, &x, &w, &w, (48, 1e-5, true)).unwrap_err();
        assert!(e.to_string().contains("do not split"), "{e}");
        let e = plan(
            DType::F16,
            &x,
            &Layout::contiguous(32),
            &w,
            (32, 1e-5, true),
        )
        .unwrap_err();
        assert!(e.to_string().contains("weight"), "{e}");
    }
}
