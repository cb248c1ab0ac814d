//! diffusers' `Attention`, `FeedForward` (GEGLU), `BasicTransformerBlock` and
//! `Transformer2DModel` as the SD 2.1 / SDXL UNet uses them. Where a hook applies (FreeScale's
//! scale fusion on `attn1`, FreCaS's map capture / injection on `attn2`) they hand over to
//! [`crate::hooks`].

use super::norm::GroupNorm;
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Conv2d, LayerNorm, Linear, VarBuilder};

use crate::gpu;
use crate::hooks::cross_attention::{self, head_mean};
use crate::hooks::scale_fusion::fused_self_attention;
use crate::hooks::{SelfAttentionMode, UNetHooks};

/// Upper bound on elements of one (B, heads, queries, keys) score block; larger attentions are
/// computed in query chunks so memory stays bounded at high resolutions.
const MAX_SCORE_ELEMENTS: usize = 1 << 27;

/// Multi-head attention with diffusers' parameter names (`to_q`, `to_k`, `to_v`, `to_out.0`).
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
    scale: f64,
    context_dim: usize,
    path: String,
}

impl Attention {
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let context_dim = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: candle_nn::linear_no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: candle_nn::linear_no_bias(context_dim, inner, vb.pp("to_k"))?,
            to_v: candle_nn::linear_no_bias(context_dim, inner, vb.pp("to_v"))?,
            to_out: candle_nn::linear(inner, query_dim, vb.pp("to_out").pp("0"))?,
            heads,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
            context_dim,
            path: vb.prefix(),
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// (B, N, heads·d) -> (B, heads, N, d)
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        x.reshape((b, n, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// (B, heads, N, d) -> (B, N, heads·d) -> to_out
    pub(crate) fn merge_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, n, _) = x.dims4()?;
        let x = x
            .transpose(1, 2)?
            .reshape((b, n, self.heads * self.head_dim))?;
        self.to_out.forward(&x)
    }

    fn check_context(&self, context: &Tensor) -> Result<()> {
        let cd = context.dim(D::Minus1)?;
        if cd != self.context_dim {
            candle_core::bail!(
                "{}: context has {cd} features, the layer expects {}",
                self.path,
                self.context_dim
            );
        }
        Ok(())
    }

    pub(crate) fn qkv(&self, x: &Tensor, context: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        self.check_context(context)?;
        let q = self.split_heads(&self.to_q.forward(x)?)?;
        let k = self.split_heads(&self.to_k.forward(context)?)?;
        let v = self.split_heads(&self.to_v.forward(context)?)?;
        Ok((q, k, v))
    }

    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        want_mean: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        attend(q, k, v, self.scale, want_mean)
    }

    /// Attention through the fused GPU kernel where it applies ([`gpu::flash_attn`]): the
    /// (B, N, heads·d) projections go in and come out as they are.
    fn fused(&self, x: &Tensor, context: &Tensor) -> Result<Option<Tensor>> {
        if !gpu::flash_attn::applies(x, self.head_dim) {
            return Ok(None);
        }
        self.check_context(context)?;
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        let out = gpu::flash_attn::attention(&q, &k, &v, self.heads, self.scale)?;
        self.to_out.forward(&out).map(Some)
    }

    /// Plain self-attention over all tokens of `x` (B, N, C).
    pub fn forward_self(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(out) = self.fused(x, x)? {
            return Ok(out);
        }
        let (q, k, v) = self.qkv(x, x)?;
        let (out, _) = self.attend(&q, &k, &v, false)?;
        self.merge_heads(&out)
    }

    /// Cross-attention of `x` (B, h·w, C) on `context` (B, T, C'), with capture and injection.
    pub fn forward_cross(
        &self,
        x: &Tensor,
        context: &Tensor,
        hw: (usize, usize),
        hooks: &mut UNetHooks,
    ) -> Result<Tensor> {
        // Capture and injection need the probabilities: they keep the composition.
        if !hooks.capture_cross_attention && hooks.inject_cross_attention.is_none() {
            if let Some(out) = self.fused(x, context)? {
                return Ok(out);
            }
        }
        let (q, k, v) = self.qkv(x, context)?;
        let (out, mean) = self.attend(&q, &k, &v, hooks.capture_cross_attention)?;
        if let Some(probs) = mean {
            cross_attention::capture(hooks, &self.path, hw, probs);
        }
        let out = match &hooks.inject_cross_attention {
            Some(inj) => cross_attention::inject(inj, &self.path, out, &v, hw)?,
            None => out,
        };
        self.merge_heads(&out)
    }
}

/// softmax(q·kᵀ·scale)·v of (B, heads, N, d) queries in query chunks. With `want_mean` it
/// also returns the head-averaged probabilities (B, N, keys).
pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    want_mean: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let (b, h, n, _) = q.dims4()?;
    let nk = k.dim(2)?;
    let per_query = (b * h * nk).max(1);
    let chunk = (MAX_SCORE_ELEMENTS / per_query).clamp(1, n.max(1));
    let kt = k.t()?;
    // Half precision: the scale is folded into q (small) rather than applied to the scores
    // (large), and the scores stay in half precision; the softmax kernel subtracts the row
    // maximum and sums in f32. This keeps the biggest tensor of a high-resolution step at
    // 2 bytes per element and touched twice, instead of converted and copied four times.
    let half = matches!(q.dtype(), DType::F16 | DType::BF16);
    let q = if half { (q * scale)? } else { q.clone() };
    let mut outs = Vec::new();
    let mut means = Vec::new();
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let qc = if len == n {
            q.clone()
        } else {
            q.narrow(2, start, len)?
        };
        let scores = qc.matmul(&kt)?;
        let probs = if half {
            candle_nn::ops::softmax_last_dim(&scores)?
        } else {
            candle_nn::ops::softmax_last_dim(&(scores * scale)?)?
        };
        outs.push(probs.matmul(v)?);
        if want_mean {
            means.push(head_mean(&probs)?);
        }
        start += len;
    }
    let out = if outs.len() == 1 {
        outs.remove(0)
    } else {
        Tensor::cat(&outs, 2)?
    };
    let mean = if want_mean {
        Some(if means.len() == 1 {
            means.remove(0)
        } else {
            Tensor::cat(&means, 1)?
        })
    } else {
        None
    };
    Ok((out, mean))
}

/// diffusers' `FeedForward` with GEGLU: `net.0.proj` (dim -> 2·inner), `net.2` (inner -> dim).
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    pub fn new(vb: VarBuilder, dim: usize, mult: usize) -> Result<Self> {
        let inner = dim * mult;
        Ok(Self {
            proj: candle_nn::linear(dim, inner * 2, vb.pp("net").pp("0").pp("proj"))?,
            out: candle_nn::linear(inner, dim, vb.pp("net").pp("2"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.proj.forward(x)?;
        if gpu::geglu::applies(&p) {
            return self.out.forward(&gpu::geglu::geglu(&p)?);
        }
        let half = p.dim(D::Minus1)? / 2;
        // GEGLU: value half times exact (erf) GELU of the gate half, as torch's F.gelu.
        let value = p.narrow(D::Minus1, 0, half)?;
        let gate = p.narrow(D::Minus1, half, half)?.gelu_erf()?;
        self.out.forward(&(value * gate)?)
    }
}

/// Where a transformer block sits: its token grid and the UNet input's latent size.
#[derive(Debug, Clone, Copy)]
pub struct LayerGrid {
    pub hw: (usize, usize),
    pub input_hw: (usize, usize),
}

/// diffusers' `BasicTransformerBlock` (layer norms, self-attn, cross-attn, GEGLU FF).
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        context_dim: usize,
    ) -> Result<Self> {
        Ok(Self {
            norm1: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, None, heads, head_dim)?,
            norm2: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), dim, Some(context_dim), heads, head_dim)?,
            norm3: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim, 4)?,
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        grid: LayerGrid,
        hooks: &mut UNetHooks,
    ) -> Result<Tensor> {
        let n = self.norm1.forward(x)?;
        let a = match &hooks.self_attention {
            SelfAttentionMode::Plain => self.attn1.forward_self(&n)?,
            SelfAttentionMode::ScaleFusion(sf) => fused_self_attention(&self.attn1, &n, grid, sf)?,
        };
        let x = (x + a)?;
        let n = self.norm2.forward(&x)?;
        let x = (&x + self.attn2.forward_cross(&n, context, grid.hw, hooks)?)?;
        let n = self.norm3.forward(&x)?;
        &x + self.ff.forward(&n)?
    }
}

#[derive(Debug, Clone)]
enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

/// diffusers' `Transformer2DModel` (continuous input): GroupNorm (eps 1e-6), proj_in, blocks,
/// proj_out, residual. `proj_in`/`proj_out` are linear or 1×1 convs per `use_linear_projection`.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        heads: usize,
        layers: usize,
        context_dim: usize,
        groups: usize,
        use_linear_projection: bool,
    ) -> Result<Self> {
        if heads == 0 || !channels.is_multiple_of(heads) {
            candle_core::bail!(
                "{}: {channels} channels do not split into {heads} heads",
                vb.prefix()
            );
        }
        let head_dim = channels / heads;
        let inner = heads * head_dim;
        let norm = super::norm::group_norm(groups, channels, 1e-6, vb.pp("norm"))?;
        let (proj_in, proj_out) = if use_linear_projection {
            (
                Projection::Linear(candle_nn::linear(channels, inner, vb.pp("proj_in"))?),
                Projection::Linear(candle_nn::linear(inner, channels, vb.pp("proj_out"))?),
            )
        } else {
            let cfg = Default::default();
            (
                Projection::Conv(candle_nn::conv2d(
                    channels,
                    inner,
                    1,
                    cfg,
                    vb.pp("proj_in"),
                )?),
                Projection::Conv(candle_nn::conv2d(
                    inner,
                    channels,
                    1,
                    cfg,
                    vb.pp("proj_out"),
                )?),
            )
        };
        let blocks = (0..layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp("transformer_blocks").pp(i),
                    inner,
                    heads,
                    head_dim,
                    context_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm,
            proj_in,
            blocks,
            proj_out,
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        input_hw: (usize, usize),
        hooks: &mut UNetHooks,
    ) -> Result<Tensor> {
        let (b, _c, h, w) = x.dims4()?;
        let n = self.norm.forward(x)?;
        // Tokens are laid out (B, h·w, C) row-major, as diffusers' permute(0, 2, 3, 1).
        let to_tokens = |t: &Tensor| -> Result<Tensor> {
            let c = t.dim(1)?;
            t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))
        };
        let mut t = match &self.proj_in {
            Projection::Linear(l) => l.forward(&to_tokens(&n)?)?,
            Projection::Conv(c) => to_tokens(&c.forward(&n)?)?,
        };
        let grid = LayerGrid {
            hw: (h, w),
            input_hw,
        };
        for block in &self.blocks {
            t = block.forward(&t, context, grid, hooks)?;
        }
        let to_map = |t: &Tensor| -> Result<Tensor> {
            let c = t.dim(2)?;
            t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()
        };
        let out = match &self.proj_out {
            Projection::Linear(l) => to_map(&l.forward(&t)?)?,
            Projection::Conv(c) => c.forward(&to_map(&t)?)?,
        };
        out + x
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::emulator::{self, rel_err};
    use candle_core::Device;
    use candle_nn::VarMap;

    /// A half-precision transformer block with every fused path on (run through the kernels'
    /// CPU emulation) against the same block as the CPU runs it: the model hands the kernels
    /// the right tensors and takes the right ones back; map capture keeps the composition.
    #[test]
    fn emulated_fused_paths_match_the_block_as_the_cpu_runs_it() -> Result<()> {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F16, &dev);
        let block = BasicTransformerBlock::new(vb, 64, 2, 32, 48)?;
        for v in varmap.all_vars() {
            v.set(&(v.as_tensor() + 0.05)?)?; // non-zero biases and norm shifts
        }
        let half = |t: &Tensor| t.to_dtype(DType::F16);
        let x = half(&Tensor::randn(0f32, 1.0, (2, 16, 64), &dev)?)?;
        let ctx = half(&Tensor::randn(0f32, 1.0, (2, 7, 48), &dev)?)?;
        let grid = LayerGrid {
            hw: (4, 4),
            input_hw: (4, 4),
        };
        let run = |hooks: &mut UNetHooks| block.forward(&x, &ctx, grid, hooks);
        let want = run(&mut UNetHooks::default())?;
        let _emu = emulator::enable();
        let got = run(&mut UNetHooks::default())?;
        let err = rel_err(&got, &want);
        assert!(err < 5e-3, "{err}");
        let mut capture = UNetHooks {
            capture_cross_attention: true,
            ..Default::default()
        };
        let captured = run(&mut capture)?;
        assert_eq!(capture.captured.len(), 1, "attn2 must keep the composition");
        assert!(rel_err(&captured, &want) < 5e-3);
        Ok(())
    }
}
