//! diffusers' `JointTransformerBlock` (MMDiT) with its adaptive norms: `AdaLayerNormZero`
//! (`norm1`, `norm1_context`), SD3.5's `SD35AdaLayerNormZeroX` (blocks with a second
//! self-attention `attn2`), `AdaLayerNormContinuous` (the last block's text norm and the
//! model's `norm_out`), and the `FeedForward` with tanh-approximated GELU.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{LayerNorm, Linear, VarBuilder};

use super::joint_attention::{JointAttention, JointGrid};
use crate::hooks::UNetHooks;

/// LayerNorm without affine parameters (eps 1e-6), as every norm of the MMDiT block.
pub(super) fn plain_norm(dim: usize, vb: &VarBuilder) -> Result<LayerNorm> {
    let ones = Tensor::ones(dim, vb.dtype(), vb.device())?;
    Ok(LayerNorm::new_no_bias(ones, 1e-6))
}

/// `linear(silu(emb))` split into `n` (B, C) chunks.
fn modulation(linear: &Linear, emb: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    linear.forward(&emb.silu()?)?.chunk(n, D::Minus1)
}

/// `x · (1 + scale) + shift`, scale and shift (B, C) broadcast over the tokens.
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?
        .broadcast_add(&shift.unsqueeze(1)?)
}

/// diffusers' `AdaLayerNormContinuous` (`layer_norm`, no affine): the conditioning gives
/// (scale, shift), in that order.
#[derive(Debug, Clone)]
pub struct AdaLayerNormContinuous {
    linear: Linear,
    norm: LayerNorm,
}

impl AdaLayerNormContinuous {
    pub fn new(vb: VarBuilder, dim: usize, cond_dim: usize) -> Result<Self> {
        Ok(Self {
            linear: candle_nn::linear(cond_dim, 2 * dim, vb.pp("linear"))?,
            norm: plain_norm(dim, &vb)?,
        })
    }

    pub fn forward(&self, x: &Tensor, cond: &Tensor) -> Result<Tensor> {
        let m = modulation(&self.linear, cond, 2)?;
        modulate(&self.norm.forward(x)?, &m[1], &m[0])
    }
}

/// diffusers' `FeedForward(dim, dim_out=dim, activation_fn="gelu-approximate")`.
#[derive(Debug, Clone)]
pub struct GeluFeedForward {
    proj: Linear,
    out: Linear,
}

impl GeluFeedForward {
    pub fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        Ok(Self {
            proj: candle_nn::linear(dim, 4 * dim, vb.pp("net").pp("0").pp("proj"))?,
            out: candle_nn::linear(4 * dim, dim, vb.pp("net").pp("2"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // torch's GELU(approximate="tanh") is candle's `gelu`.
        self.out.forward(&self.proj.forward(x)?.gelu()?)
    }
}

/// The text stream of a block: an `AdaLayerNormZero` and a feed-forward, or (last block) an
/// `AdaLayerNormContinuous` whose output only feeds the attention.
#[derive(Debug, Clone)]
enum TextStream {
    Continues { norm1: Linear, ff: GeluFeedForward },
    Ends(AdaLayerNormContinuous),
}

/// One MMDiT block.
#[derive(Debug, Clone)]
pub struct JointTransformerBlock {
    /// `norm1.linear`: 6 modulations (9 with SD3.5's second self-attention).
    norm1: Linear,
    norm: LayerNorm,
    attn: JointAttention,
    attn2: Option<JointAttention>,
    ff: GeluFeedForward,
    text: TextStream,
}

/// How a block is built.
#[derive(Debug, Clone, Copy)]
pub struct BlockShape {
    pub dim: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub qk_norm: bool,
    /// The last block: its text stream ends at the attention.
    pub context_pre_only: bool,
    /// SD3.5's `dual_attention_layers`: a second self-attention over the image tokens.
    pub dual_attention: bool,
}

impl JointTransformerBlock {
    pub fn new(vb: VarBuilder, s: BlockShape) -> Result<Self> {
        let chunks = if s.dual_attention { 9 } else { 6 };
        let text = if s.context_pre_only {
            TextStream::Ends(AdaLayerNormContinuous::new(
                vb.pp("norm1_context"),
                s.dim,
                s.dim,
            )?)
        } else {
            TextStream::Continues {
                norm1: candle_nn::linear(s.dim, 6 * s.dim, vb.pp("norm1_context").pp("linear"))?,
                ff: GeluFeedForward::new(vb.pp("ff_context"), s.dim)?,
            }
        };
        let attn2 = s
            .dual_attention
            .then(|| {
                JointAttention::new(
                    vb.pp("attn2"),
                    s.dim,
                    s.heads,
                    s.head_dim,
                    s.qk_norm,
                    false,
                    false,
                )
            })
            .transpose()?;
        Ok(Self {
            norm1: candle_nn::linear(s.dim, chunks * s.dim, vb.pp("norm1").pp("linear"))?,
            norm: plain_norm(s.dim, &vb)?,
            attn: JointAttention::new(
                vb.pp("attn"),
                s.dim,
                s.heads,
                s.head_dim,
                s.qk_norm,
                true,
                !s.context_pre_only,
            )?,
            attn2,
            ff: GeluFeedForward::new(vb.pp("ff"), s.dim)?,
            text,
        })
    }

    /// (image tokens, text tokens) after the block; the text tokens are gone after the last.
    pub fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        temb: &Tensor,
        grid: JointGrid,
        hooks: &mut UNetHooks,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let n = if self.attn2.is_some() { 9 } else { 6 };
        let m = modulation(&self.norm1, temb, n)?;
        let (shift_msa, scale_msa, gate_msa) = (&m[0], &m[1], &m[2]);
        let (shift_mlp, scale_mlp, gate_mlp) = (&m[3], &m[4], &m[5]);
        let normed = self.norm.forward(x)?;
        let nx = modulate(&normed, shift_msa, scale_msa)?;
        let (nc, text_mods) = match &self.text {
            TextStream::Continues { norm1, .. } => {
                let c = modulation(norm1, temb, 6)?;
                (
                    modulate(&self.norm.forward(context)?, &c[0], &c[1])?,
                    Some(c),
                )
            }
            TextStream::Ends(norm) => (norm.forward(context, temb)?, None),
        };
        let (attn_out, ctx_out) = self.attn.forward(&nx, Some(&nc), grid, hooks)?;
        let mut x = (x + gated(gate_msa, &attn_out)?)?;
        if let Some(attn2) = &self.attn2 {
            // SD3.5: the second self-attention reads the same normed tokens, modulated anew.
            let nx2 = modulate(&normed, &m[6], &m[7])?;
            let (out2, _) = attn2.forward(&nx2, None, grid, hooks)?;
            x = (x + gated(&m[8], &out2)?)?;
        }
        let nx = modulate(&self.norm.forward(&x)?, shift_mlp, scale_mlp)?;
        let x = (&x + gated(gate_mlp, &self.ff.forward(&nx)?)?)?;
        let context = match (&self.text, text_mods, ctx_out) {
            (TextStream::Continues { ff, .. }, Some(c), Some(ctx_out)) => {
                let ctx = (context + gated(&c[2], &ctx_out)?)?;
                let nc = modulate(&self.norm.forward(&ctx)?, &c[3], &c[4])?;
                Some((&ctx + gated(&c[5], &ff.forward(&nc)?)?)?)
            }
            _ => None,
        };
        Ok((x, context))
    }
}

/// `gate.unsqueeze(1) · x`.
fn gated(gate: &Tensor, x: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&gate.unsqueeze(1)?)
}
