//! diffusers' `Attention` with `JointAttnProcessor2_0`, as SD3's MMDiT blocks use it: the image
//! tokens (`to_q`, `to_k`, `to_v`) and the text tokens (`add_q_proj`, `add_k_proj`,
//! `add_v_proj`) attend together over their concatenation, image first; the outputs split
//! back into `to_out.0` and (except in the last block) `to_add_out`. SD3.5's `qk_norm =
//! "rms_norm"` normalises every head's queries and keys. Where a hook applies (FreeScale's
//! scale fusion, FreCaS's text→image maps) the attention hands over to [`crate::hooks`].

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use crate::hooks::cross_attention;
use crate::hooks::scale_fusion::fused_attention;
use crate::hooks::{SelfAttentionMode, UNetHooks};
use crate::model::attention::{attend, LayerGrid};

/// diffusers' `RMSNorm` (eps 1e-6, with a weight): the mean square in f32, the weight applied
/// in the weight's dtype.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x32 = x.to_dtype(DType::F32)?;
        let inv = (x32.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        x32.broadcast_mul(&inv)?
            .to_dtype(self.weight.dtype())?
            .broadcast_mul(&self.weight)
    }
}

/// The projections of one token stream.
#[derive(Debug, Clone)]
struct Stream {
    q: Linear,
    k: Linear,
    v: Linear,
    norm_q: Option<RmsNorm>,
    norm_k: Option<RmsNorm>,
}

impl Stream {
    fn new(
        vb: &VarBuilder,
        names: [&str; 5],
        dim: usize,
        heads: usize,
        head_dim: usize,
        qk_norm: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let norm = |name: &str| -> Result<Option<RmsNorm>> {
            qk_norm
                .then(|| RmsNorm::new(head_dim, 1e-6, vb.pp(name)))
                .transpose()
        };
        Ok(Self {
            q: candle_nn::linear(dim, inner, vb.pp(names[0]))?,
            k: candle_nn::linear(dim, inner, vb.pp(names[1]))?,
            v: candle_nn::linear(dim, inner, vb.pp(names[2]))?,
            norm_q: norm(names[3])?,
            norm_k: norm(names[4])?,
        })
    }

    /// (B, N, C) -> q, k, v as (B, heads, N, d), queries and keys normalised per head.
    fn qkv(&self, x: &Tensor, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let split = |t: Tensor| -> Result<Tensor> {
            let (b, n, c) = t.dims3()?;
            t.reshape((b, n, heads, c / heads))?
                .transpose(1, 2)?
                .contiguous()
        };
        let norm = |t: Tensor, n: &Option<RmsNorm>| match n {
            Some(n) => n.forward(&t),
            None => Ok(t),
        };
        Ok((
            norm(split(self.q.forward(x)?)?, &self.norm_q)?,
            norm(split(self.k.forward(x)?)?, &self.norm_k)?,
            split(self.v.forward(x)?)?,
        ))
    }
}

/// The joint attention of an MMDiT block (`attn`), or with no text stream the extra
/// self-attention of SD3.5's dual-attention blocks (`attn2`).
#[derive(Debug, Clone)]
pub struct JointAttention {
    image: Stream,
    text: Option<Stream>,
    to_out: Linear,
    to_add_out: Option<Linear>,
    heads: usize,
    scale: f64,
    path: String,
}

/// Where an attention call sits: its image-token grid and what the hooks need besides.
#[derive(Debug, Clone, Copy)]
pub struct JointGrid {
    pub layer: LayerGrid,
    /// Image tokens of a training-size view (FreCaS's reuse scales by text / image tokens).
    pub training_tokens: usize,
}

impl JointAttention {
    /// `with_text`: the block's joint attention (`added_kv_proj_dim`); `text_out`: whether the
    /// text stream goes on (`to_add_out`; all blocks but the last).
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        qk_norm: bool,
        with_text: bool,
        text_out: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let image = Stream::new(
            &vb,
            ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
            dim,
            heads,
            head_dim,
            qk_norm,
        )?;
        let text = with_text
            .then(|| {
                Stream::new(
                    &vb,
                    [
                        "add_q_proj",
                        "add_k_proj",
                        "add_v_proj",
                        "norm_added_q",
                        "norm_added_k",
                    ],
                    dim,
                    heads,
                    head_dim,
                    qk_norm,
                )
            })
            .transpose()?;
        let to_add_out = (with_text && text_out)
            .then(|| candle_nn::linear(inner, dim, vb.pp("to_add_out")))
            .transpose()?;
        Ok(Self {
            image,
            text,
            to_out: candle_nn::linear(inner, dim, vb.pp("to_out").pp("0"))?,
            to_add_out,
            heads,
            scale: 1.0 / (head_dim as f64).sqrt(),
            path: vb.prefix(),
        })
    }

    /// (B, heads, N, d) -> (B, N, heads·d)
    fn merge(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, n, d) = x.dims4()?;
        x.transpose(1, 2)?.reshape((b, n, h * d))
    }

    /// The attention of image tokens `x` (B, N, C) together with text tokens `context`
    /// (B, T, C) when the layer has a text stream: (image output, text output when the text
    /// stream goes on). FreeScale's scale fusion and FreCaS's maps apply as `hooks` say.
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        grid: JointGrid,
        hooks: &mut UNetHooks,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let sf = match &hooks.self_attention {
            SelfAttentionMode::ScaleFusion(sf) => Some(sf.clone()),
            SelfAttentionMode::Plain => None,
        };
        let (image, text) = self.attend_all(x, context, grid, hooks)?;
        let image = self.to_out.forward(&self.merge(&image)?)?;
        let image = match sf {
            // FreeScale fuses the image tokens' outputs (as the UNet's `attn1` outputs); the
            // text tokens keep the global attention's.
            Some(sf) => {
                let attend = |t: &Tensor| self.to_out.forward(&self.image_only(t, context)?);
                fused_attention(&attend, &self.path, x, grid.layer, &sf, Some(image))?
            }
            None => image,
        };
        let text = match (text, &self.to_add_out) {
            (Some(t), Some(out)) => Some(out.forward(&self.merge(&t)?)?),
            _ => None,
        };
        Ok((image, text))
    }

    /// The joint attention over all tokens, per head and before the output projections:
    /// (image part, text part), with the text→image map captured or reused as `hooks` ask.
    fn attend_all(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        grid: JointGrid,
        hooks: &mut UNetHooks,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let n = x.dim(1)?;
        let (q, k, v) = self.image.qkv(x, self.heads)?;
        let (Some(stream), Some(ctx)) = (&self.text, context) else {
            let (out, _) = attend(&q, &k, &v, self.scale, false)?;
            return Ok((out, None));
        };
        let (cq, ck, cv) = stream.qkv(ctx, self.heads)?;
        let (out, _) = attend(
            &Tensor::cat(&[&q, &cq], 2)?,
            &Tensor::cat(&[&k, &ck], 2)?,
            &Tensor::cat(&[&v, &cv], 2)?,
            self.scale,
            false,
        )?;
        let image = out.narrow(2, 0, n)?;
        let text = out.narrow(2, n, out.dim(2)? - n)?;
        let hw = grid.layer.hw;
        if hooks.capture_cross_attention {
            let probs = cross_attention::joint_text_map(&q, &ck, self.scale)?;
            cross_attention::capture(hooks, &self.path, hw, probs);
        }
        let image = match &hooks.inject_cross_attention {
            Some(inj) => cross_attention::inject_joint(
                inj,
                &self.path,
                image,
                &cv,
                hw,
                grid.training_tokens,
            )?,
            None => image,
        };
        Ok((image, Some(text)))
    }

    /// The image tokens' output (merged heads, before `to_out`) of a batch of token sets,
    /// each attending with the text tokens of its sample (the local windows and strided
    /// sub-grids of scale fusion, batched window-major).
    fn image_only(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let n = x.dim(1)?;
        let (q, k, v) = self.image.qkv(x, self.heads)?;
        let out = match (&self.text, context) {
            (Some(stream), Some(ctx)) => {
                let reps = x.dim(0)? / ctx.dim(0)?.max(1);
                let ctx = ctx.repeat((reps, 1, 1))?;
                let (cq, ck, cv) = stream.qkv(&ctx, self.heads)?;
                let (out, _) = attend(
                    &Tensor::cat(&[&q, &cq], 2)?,
                    &Tensor::cat(&[&k, &ck], 2)?,
                    &Tensor::cat(&[&v, &cv], 2)?,
                    self.scale,
                    false,
                )?;
                out.narrow(2, 0, n)?
            }
            _ => attend(&q, &k, &v, self.scale, false)?.0,
        };
        self.merge(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hooks::{CrossAttnInjection, ScaleFusion};
    use candle_core::Device;
    use candle_nn::VarMap;

    fn attention() -> (JointAttention, VarMap) {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        (
            JointAttention::new(vb.pp("attn"), 8, 2, 4, true, true, true).unwrap(),
            vm,
        )
    }

    fn grid(h: usize, w: usize, train: usize) -> JointGrid {
        JointGrid {
            layer: LayerGrid {
                hw: (h, w),
                input_hw: (2 * h, 2 * w),
            },
            training_tokens: train,
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// At the training size FreeScale's fusion is the plain joint attention (one window, a
    /// global branch equal to it); at twice the size it runs over windows with the text.
    #[test]
    fn scale_fusion_on_the_joint_attention_is_plain_at_training_size() -> Result<()> {
        let (attn, _vm) = attention();
        let x = Tensor::randn(0f32, 1.0, (2, 4 * 6, 8), &Device::Cpu)?;
        let ctx = Tensor::randn(0f32, 1.0, (2, 5, 8), &Device::Cpu)?;
        let (plain, text) =
            attn.forward(&x, Some(&ctx), grid(4, 6, 24), &mut UNetHooks::default())?;
        let mut sf = UNetHooks {
            self_attention: SelfAttentionMode::ScaleFusion(ScaleFusion {
                train_latent: (8, 12),
                fast: false,
                jitter_seed: Some(3),
            }),
            ..Default::default()
        };
        let (fused, text2) = attn.forward(&x, Some(&ctx), grid(4, 6, 24), &mut sf)?;
        assert!(max_diff(&plain, &fused) < 1e-5);
        assert!(max_diff(&text.unwrap(), &text2.unwrap()) == 0.0);
        let big = Tensor::randn(0f32, 1.0, (1, 8 * 12, 8), &Device::Cpu)?;
        let (out, _) = attn.forward(&big, Some(&ctx.narrow(0, 0, 1)?), grid(8, 12, 24), &mut sf)?;
        assert_eq!(out.dims(), &[1, 96, 8]);
        assert!(out.sum_all()?.to_scalar::<f32>()?.is_finite());
        Ok(())
    }

    /// The captured text→image map is a distribution over the text tokens per image token;
    /// reusing it with weight 0 changes nothing, with weight w adds w·(T/N)·(map @ V_text).
    #[test]
    fn text_maps_are_captured_and_reused() -> Result<()> {
        let (attn, _vm) = attention();
        let x = Tensor::randn(0f32, 1.0, (2, 3 * 4, 8), &Device::Cpu)?;
        let ctx = Tensor::randn(0f32, 1.0, (2, 5, 8), &Device::Cpu)?;
        let mut capture = UNetHooks {
            capture_cross_attention: true,
            ..Default::default()
        };
        let (plain, _) = attn.forward(&x, Some(&ctx), grid(3, 4, 12), &mut capture)?;
        let probs = capture.captured[0].probs.clone();
        assert_eq!(probs.dims(), &[2, 12, 5]);
        let rows = probs.sum(2)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(rows.iter().all(|r| (r - 1.0).abs() < 1e-5));
        let map = probs.reshape((2, 3, 4, 5))?;
        let with = |weight: f64| -> Result<Tensor> {
            let mut hooks = UNetHooks {
                inject_cross_attention: Some(CrossAttnInjection {
                    weight,
                    map: map.clone(),
                }),
                ..Default::default()
            };
            Ok(attn.forward(&x, Some(&ctx), grid(3, 4, 12), &mut hooks)?.0)
        };
        assert!(max_diff(&with(0.0)?, &plain) < 1e-6);
        let (_, ck, cv) = attn.text.as_ref().unwrap().qkv(&ctx, 2)?;
        drop(ck);
        let reused = map
            .reshape((2, 12, 5))?
            .unsqueeze(1)?
            .broadcast_matmul(&cv)?;
        let delta = attn
            .to_out
            .forward(&attn.merge(&(reused * (0.5 * 5.0 / 12.0))?)?)?;
        let bias = attn
            .to_out
            .forward(&Tensor::zeros((2, 12, 8), DType::F32, &Device::Cpu)?)?;
        let want = ((plain + delta)? - bias)?;
        assert!(max_diff(&with(0.5)?, &want) < 1e-5);
        Ok(())
    }
}
