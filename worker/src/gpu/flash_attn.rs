//! Attention, softmax(q·kᵀ·scale)·v, in one kernel (`cuda/flash_attn.cuh`): the queries,
//! keys and values go in as the projections produce them, (B, tokens, heads·d), and the output
//! comes out the same way, ready for `to_out`. No score matrix, no head transposes. Half
//! precision (f16, bf16), head sizes up to 128. The reference is the composition in
//! `model/attention.rs` (`Attention::attend`): two matrix products around candle's softmax.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::launch::{self, Arg, Launch};

/// Head sizes the kernel is built for; a head is zero-padded up to the next one.
const PADDED_HEADS: [usize; 4] = [16, 32, 64, 128];
const QUERIES_PER_BLOCK: usize = 64;

/// Whether the fused kernel computes an attention over `x`'s device and dtype with heads of
/// `head_dim` (its switch: `TESSERA_GPU_FLASH_ATTN`).
pub fn applies(x: &Tensor, head_dim: usize) -> bool {
    super::fused_on(x, super::switches::get().flash_attn)
        && matches!(x.dtype(), DType::F16 | DType::BF16)
        && (1..=*PADDED_HEADS.last().unwrap_or(&0)).contains(&head_dim)
}

/// softmax(q·kᵀ·scale)·v per head, for q (B, Nq, heads·d) and k, v (B, Nk, heads·d), each
/// with unit stride along its last dimension; returns (B, Nq, heads·d).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    q.apply_op3_no_bwd(k, v, &FlashAttn { heads, scale })
}

struct FlashAttn {
    heads: usize,
    scale: f64,
}

/// (batch, tokens, batch stride, token stride) of a (B, N, heads·d) layout, which must have
/// unit stride along heads·d.
fn token_strides(what: &str, l: &Layout) -> Result<(usize, usize, usize, usize)> {
    let (b, n, _) = l.shape().dims3()?;
    let s = l.stride();
    if s[2] != 1 {
        candle_core::bail!("fused attention: {what} needs unit stride along its last dimension");
    }
    Ok((b, n, s[0], s[1]))
}

/// The launch for the given layouts (their start offsets are the buffers' offsets), and the
/// output's shape.
pub fn plan(
    dtype: DType,
    q: &Layout,
    k: &Layout,
    v: &Layout,
    heads: usize,
    scale: f64,
) -> Result<(Launch, Shape)> {
    if !matches!(dtype, DType::F16 | DType::BF16) {
        candle_core::bail!("fused attention takes f16 or bf16, not {dtype:?}");
    }
    let (_, _, c) = q.shape().dims3()?;
    let (b, nq, q_sb, q_sn) = token_strides("q", q)?;
    let (kb, nk, k_sb, k_sn) = token_strides("k", k)?;
    let (vb, nv, v_sb, v_sn) = token_strides("v", v)?;
    if kb != b || vb != b || nv != nk || k.dims()[2] != c || v.dims()[2] != c {
        candle_core::bail!(
            "fused attention: q {:?}, k {:?} and v {:?} do not match",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if heads == 0 || !c.is_multiple_of(heads) {
        candle_core::bail!("fused attention: {c} features do not split into {heads} heads");
    }
    let d = c / heads;
    let Some(&padded) = PADDED_HEADS.iter().find(|&&p| p >= d) else {
        candle_core::bail!("fused attention: heads of {d} are larger than the kernel's 128");
    };
    if nq == 0 || nk == 0 {
        candle_core::bail!("fused attention: {nq} queries, {nk} keys");
    }
    // 16-byte loads need every row start 16-byte aligned: d, the strides and the offsets in
    // multiples of 8 elements (device allocations themselves are 256-byte aligned).
    let aligned = [d, q_sb, q_sn, k_sb, k_sn, v_sb, v_sn]
        .iter()
        .chain(&[q.start_offset(), k.start_offset(), v.start_offset()])
        .all(|x| x % 8 == 0);
    let kernel = format!(
        "tessera_flash_attn_{}_d{padded}",
        launch::dtype_suffix(dtype)?
    );
    let grid = (
        launch::grid_dim(
            "query blocks",
            nq.div_ceil(QUERIES_PER_BLOCK),
            i32::MAX as usize,
        )?,
        launch::grid_dim("heads", heads, 65535)?,
        launch::grid_dim("batch", b, 65535)?,
    );
    let l64 = |v: usize| Arg::I64(v as i64);
    let mut args = vec![Arg::Buf(0), Arg::Buf(1), Arg::Buf(2), Arg::Buf(3)];
    for (sb, sn) in [(q_sb, q_sn), (k_sb, k_sn), (v_sb, v_sn), (nq * c, c)] {
        args.extend([l64(sb), l64(sn), l64(d)]);
    }
    args.extend([
        Arg::I32(launch::int("queries", nq)?),
        Arg::I32(launch::int("keys", nk)?),
        Arg::I32(d as i32),
        // The kernel exponentiates in base 2: scores · scale · log2(e).
        Arg::F32((scale * std::f64::consts::LOG2_E) as f32),
        Arg::I32(aligned as i32),
    ]);
    let launch = Launch {
        kernel,
        grid,
        threads: 128,
        args,
    };
    Ok((launch, Shape::from((b, nq, c))))
}

impl CustomOp3 for FlashAttn {
    fn name(&self) -> &'static str {
        "tessera-flash-attn"
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
            let (l, shape) = plan(dtype, l1, l2, l3, self.heads, self.scale)?;
            let inputs = [(s1, l1), (s2, l2), (s3, l3)].map(|(s, l)| (s, l.start_offset()));
            let out = super::emulator::run_op(&[l], &inputs, &[(dtype, shape.elem_count())])?;
            return Ok((out, shape));
        }
        // Read here too: without tests or CUDA, nothing else reads the op's fields.
        let _ = (s1, l1, s2, l2, s3, l3, self.heads, self.scale);
        candle_core::bail!(
            "the fused attention kernel runs on CUDA devices; the CPU uses the composition"
        )
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
        let (l, shape) = plan(dtype, l1, l2, l3, self.heads, self.scale)?;
        let stream = dev.cuda_stream();
        let mut out = alloc(&dev, dtype, shape.elem_count())?;
        {
            let (q, _q) = address(&s1.slice, l1.start_offset(), &stream)?;
            let (k, _k) = address(&s2.slice, l2.start_offset(), &stream)?;
            let (v, _v) = address(&s3.slice, l3.start_offset(), &stream)?;
            let (o, _o) = address_mut(&mut out, &stream)?;
            run(&l, &dev, &[q, k, v, o])?;
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
    use candle_core::{Device, D};

    /// The composition the kernel replaces, in f32 from the same half-precision inputs.
    fn composition(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Tensor {
        let split = |t: &Tensor| {
            let (b, n, c) = t.dims3().unwrap();
            t.to_dtype(DType::F32)
                .unwrap()
                .reshape((b, n, heads, c / heads))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q4, k4, v4) = (split(q), split(k), split(v));
        let scores = (q4.matmul(&k4.t().unwrap()).unwrap() * scale).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let out = probs.matmul(&v4).unwrap().transpose(1, 2).unwrap();
        let (b, n, h, d) = out.dims4().unwrap();
        out.reshape((b, n, h * d)).unwrap()
    }

    #[test]
    fn emulated_kernel_matches_the_composition() {
        let dev = Device::Cpu;
        let _emu = emulator::enable();
        // (batch, heads, queries, keys, head size, dtype): head sizes padded (40, 20, 8),
        // unaligned (20), partial query and key blocks, cross-attention's 77 keys.
        let cases = [
            (1, 2, 70, 77, 64, DType::F16),
            (2, 1, 100, 130, 8, DType::F16),
            (1, 1, 33, 5, 40, DType::F16),
            (1, 1, 20, 64, 20, DType::BF16),
            (1, 1, 65, 64, 128, DType::F16),
        ];
        for (b, h, nq, nk, d, dtype) in cases {
            let rnd = |n| {
                Tensor::randn(0f32, 1.0, (b, n, h * d), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let (q, k, v) = (rnd(nq), rnd(nk), rnd(nk));
            let scale = 1.0 / (d as f64).sqrt();
            let got = attention(&q, &k, &v, h, scale).unwrap();
            assert_eq!(got.dims(), &[b, nq, h * d]);
            let err = rel_err(&got, &composition(&q, &k, &v, h, scale));
            let bar = if dtype == DType::F16 { 2e-3 } else { 1e-2 };
            assert!(
                err < bar,
                "{b}x{h} heads, {nq}x{nk}, d {d} {dtype:?}: {err}"
            );
        }
    }

    #[test]
    fn emulated_kernel_reads_strided_and_offset_projections() {
        // q, k and v as views into one packed (B, N, 3·C) projection: offsets and token
        // strides that are not the contiguous ones.
        let dev = Device::Cpu;
        let _emu = emulator::enable();
        let (b, n, h, d) = (2, 40, 2, 32);
        let c = h * d;
        let packed = Tensor::randn(0f32, 1.0, (b, n, 3 * c), &dev)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let part = |i| packed.narrow(D::Minus1, i * c, c).unwrap();
        let (q, k, v) = (part(0), part(1), part(2));
        let got = attention(&q, &k, &v, h, 0.125).unwrap();
        let err = rel_err(&got, &composition(&q, &k, &v, h, 0.125));
        assert!(err < 2e-3, "{err}");
    }

    #[test]
    fn plan_refuses_what_the_kernel_cannot_run() {
        let l = |dims: &[usize]| Layout::contiguous(dims);
        let ok = plan(
            DType::F16,
            &l(&[2, 9, 64]),
            &l(&[2, 7, 64]),
            &l(&[2, 7, 64]),
            1,
            0.1,
        );
        let (launch, shape) = ok.unwrap();
        assert_eq!(launch.kernel, "tessera_flash_attn_f16_d64");
        assert_eq!(
            (launch.grid, shape.dims().to_vec()),
            ((1, 1, 2), vec![2, 9, 64])
        );
        let err = |r: Result<(Launch, Shape)>| r.unwrap_err().to_string();
        let e = err(plan(
            DType::F32,
            &l(&[1, 4, 8]),
            &l(&[1, 4, 8]),
            &l(&[1, 4, 8]),
            1,
            1.0,
        ));
        assert!(e.contains("f16 or bf16"), "{e}");
        let e = err(plan(
            DType::F16,
            &l(&[1, 4, 8]),
            &l(&[1, 4, 8]),
            &l(&[1, 5, 8]),
            1,
            1.0,
        ));
        assert!(e.contains("do not match"), "{e}");
        let e = err(plan(
            DType::F16,
            &l(&[1, 4, 512]),
            &l(&[1, 4, 512]),
            &l(&[1, 4, 512]),
            2,
            1.0,
        ));
        assert!(e.contains("larger than the kernel's 128"), "{e}");
        let e = err(plan(
            DType::F16,
            &l(&[1, 4, 12]),
            &l(&[1, 4, 12]),
            &l(&[1, 4, 12]),
            5,
            1.0,
        ));
        assert!(e.contains("do not split"), "{e}");
        let t = l(&[1, 4, 8]).transpose(1, 2).unwrap();
        let e = err(plan(DType::F16, &t, &t, &t, 1, 1.0));
        assert!(e.contains("unit stride"), "{e}");
    }
}
