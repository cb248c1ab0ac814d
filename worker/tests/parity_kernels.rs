//! Tessera's fused GPU kernels against the candle compositions they replace, on the device the
//! parity tests run on (`TESSERA_TEST_DEVICE=cuda:0`, built by `deploy/gpu/build.sh
//! --with-tests`), at the shapes of SDXL's UNet, in f16 and bf16; each line also prints the
//! kernel's and the composition's time (informative, never asserted). On the CPU the test
//! checks the other half of the contract: the fused paths never run there, the CPU keeps the
//! compositions (the kernels' CPU emulation is tested by the worker's unit tests).
mod common;

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use tessera_worker::gpu::{flash_attn, geglu, group_norm};

fn rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    common::rel_l2(&a.to_dtype(DType::F32)?, &b.to_dtype(DType::F32)?)
}

/// Median milliseconds of `f` over a few synchronised runs.
fn time_ms(dev: &Device, mut f: impl FnMut() -> candle_core::Result<Tensor>) -> Result<f64> {
    f()?;
    dev.synchronize()?;
    let mut t = Vec::new();
    for _ in 0..5 {
        let s = Instant::now();
        drop(f()?);
        dev.synchronize()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[2])
}

fn bar(dtype: DType) -> f64 {
    if dtype == DType::BF16 {
        2e-2
    } else {
        5e-3
    }
}

/// softmax(q·kᵀ·scale)·v per head in f32 from the same inputs, (B, N, H·d) in and out.
fn attention_composition(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let split = |t: &Tensor| -> candle_core::Result<Tensor> {
        let (b, n, c) = t.dims3()?;
        t.to_dtype(DType::F32)?
            .reshape((b, n, heads, c / heads))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q4, k4, v4) = (split(q)?, split(k)?, split(v)?);
    let d = q4.dim(D::Minus1)?;
    let scores = (q4.matmul(&k4.t()?)? / (d as f64).sqrt())?;
    let out = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v4)?;
    let (b, h, n, d) = out.dims4()?;
    Ok(out.transpose(1, 2)?.reshape((b, n, h * d))?)
}

fn check_attention(dev: &Device, dtype: DType) -> Result<()> {
    // (batch, heads, queries, keys, head size): SDXL's self-attention at 1024² (levels 1, 2),
    // its cross-attention, and the tiny fixtures' and the largest padded head sizes.
    for (b, h, nq, nk, d) in [
        (2, 10, 4096, 4096, 64),
        (2, 20, 1024, 1024, 64),
        (2, 10, 4096, 77, 64),
        (2, 2, 64, 64, 8),
        (1, 4, 1000, 1000, 128),
    ] {
        let rnd = |n: usize| Tensor::randn(0f32, 1.0, (b, n, h * d), dev)?.to_dtype(dtype);
        let (q, k, v) = (rnd(nq)?, rnd(nk)?, rnd(nk)?);
        let scale = 1.0 / (d as f64).sqrt();
        let got = flash_attn::attention(&q, &k, &v, h, scale)?;
        let want = attention_composition(&q, &k, &v, h)?;
        let err = rel(&got, &want)?;
        let fused = time_ms(dev, || flash_attn::attention(&q, &k, &v, h, scale))?;
        let comp = time_ms(dev, || {
            attention_composition(&q, &k, &v, h).map_err(|e| candle_core::Error::Msg(e.to_string()))
        })?;
        println!(
            "flash attention {dtype:?} {b}x{h} heads {nq}x{nk} d{d}: rel {err:.2e}, \
             {fused:.3} ms (composition in f32: {comp:.3} ms)"
        );
        assert!(
            err < bar(dtype),
            "flash attention {b}x{h}x{nq}x{nk}x{d} {dtype:?}: {err}"
        );
    }
    Ok(())
}

fn check_group_norm(dev: &Device, dtype: DType) -> Result<()> {
    use candle_nn::VarBuilder;
    use std::collections::HashMap;
    for (shape, groups) in [
        (vec![2, 320, 128, 128], 32),
        (vec![2, 1280, 32, 32], 32),
        (vec![1, 128, 256, 256], 32),
    ] {
        let c = shape[1];
        let tensors = HashMap::from([
            ("n.weight".to_string(), Tensor::randn(1f32, 0.3, c, dev)?),
            ("n.bias".to_string(), Tensor::randn(0f32, 0.3, c, dev)?),
        ]);
        let vb = VarBuilder::from_tensors(tensors, dtype, dev);
        let (w, b) = (vb.get(c, "n.weight")?, vb.get(c, "n.bias")?);
        let x = (Tensor::randn(0f32, 2.0, shape.as_slice(), dev)? + 1.0)?.to_dtype(dtype)?;
        for silu in [false, true] {
            let got = group_norm::group_norm(&x, &w, &b, groups, 1e-5, silu)?;
            let want = norm_f32(&x, &w, &b, groups)?;
            let want = if silu { want.silu()? } else { want };
            let err = rel(&got, &want)?;
            let fused = time_ms(dev, || {
                group_norm::group_norm(&x, &w, &b, groups, 1e-5, silu)
            })?;
            println!("group norm {dtype:?} {shape:?} silu {silu}: rel {err:.2e}, {fused:.3} ms");
            assert!(
                err < bar(dtype),
                "group norm {shape:?} {dtype:?} silu {silu}: {err}"
            );
        }
    }
    Ok(())
}

/// GroupNorm in f32 as diffusers computes it (biased variance), a plain candle composition (the
/// model's own GroupNorm may itself be the fused path when TESSERA_GPU_FUSED_NORM is on).
fn norm_f32(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (n, c) = (dims[0], dims[1]);
    let xf = x.to_dtype(DType::F32)?.reshape((n, groups, ()))?;
    let mean = xf.mean_keepdim(2)?;
    let centred = xf.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(2)?;
    let normed = centred
        .broadcast_div(&(var + 1e-5)?.sqrt()?)?
        .reshape(dims.as_slice())?;
    let shape: Vec<usize> = [1, c]
        .into_iter()
        .chain(dims[2..].iter().map(|_| 1))
        .collect();
    let w = w.to_dtype(DType::F32)?.reshape(shape.as_slice())?;
    let b = b.to_dtype(DType::F32)?.reshape(shape.as_slice())?;
    Ok(normed.broadcast_mul(&w)?.broadcast_add(&b)?)
}

fn check_geglu(dev: &Device, dtype: DType) -> Result<()> {
    for shape in [(2, 4096, 2 * 2560), (2, 1024, 2 * 5120)] {
        let p = Tensor::randn(0f32, 1.0, shape, dev)?.to_dtype(dtype)?;
        let half = shape.2 / 2;
        let want =
            (p.narrow(D::Minus1, 0, half)? * p.narrow(D::Minus1, half, half)?.gelu_erf()?)?;
        let got = geglu::geglu(&p)?;
        let err = rel(&got, &want)?;
        let fused = time_ms(dev, || geglu::geglu(&p))?;
        let comp = time_ms(dev, || {
            p.narrow(D::Minus1, 0, half)? * p.narrow(D::Minus1, half, half)?.gelu_erf()?
        })?;
        println!(
            "geglu {dtype:?} {shape:?}: rel {err:.2e}, {fused:.3} ms (composition {comp:.3} ms)"
        );
        assert!(err < bar(dtype), "geglu {shape:?} {dtype:?}: {err}");
    }
    Ok(())
}

#[test]
fn fused_kernels_match_their_compositions() -> Result<()> {
    let dev = common::device();
    if dev.is_cpu() {
        // The CPU keeps the compositions: no fused path applies, and the ops refuse to run.
        let x = Tensor::zeros((1, 8, 4, 4), DType::F16, &dev)?;
        let w = Tensor::ones(8, DType::F16, &dev)?;
        assert!(!flash_attn::applies(&x, 64));
        assert!(!group_norm::applies(&x, &w));
        assert!(!geglu::applies(&x));
        let e = geglu::geglu(&x).unwrap_err().to_string();
        assert!(e.contains("CUDA"), "{e}");
        return Ok(());
    }
    for dtype in [DType::F16, DType::BF16] {
        check_attention(&dev, dtype)?;
        check_group_norm(&dev, dtype)?;
        check_geglu(&dev, dtype)?;
    }
    Ok(())
}
