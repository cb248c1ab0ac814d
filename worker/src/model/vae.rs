//! AutoencoderKL (the Stable Diffusion VAE) with diffusers' parameter names. It encodes and
//! decodes what it is given in one pass; pictures larger than a VAE tile are cut, dispatched
//! and blended by the coordinator (`engine::vae`, geometry in `tessera_core::tiling::vae`).
//!
//! Layout follows diffusers' `Encoder`/`Decoder` in `models/autoencoders/vae.py`: `conv_in`,
//! `down_blocks.N.{resnets.M, downsamplers.0.conv}`, `mid_block.{resnets.0, attentions.0,
//! resnets.1}`, `conv_norm_out`, `conv_out`, and `up_blocks.N.{resnets.M, upsamplers.0.conv}`.

use super::norm::GroupNorm;
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder};

/// Every norm inside the diffusers VAE uses this epsilon (`resnet_eps=1e-6`).
const VAE_EPS: f64 = 1e-6;

fn default_in_channels() -> usize {
    3
}
fn default_down_block_types() -> Vec<String> {
    vec!["DownEncoderBlock2D".to_string()]
}
fn default_up_block_types() -> Vec<String> {
    vec!["UpDecoderBlock2D".to_string()]
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64]
}
fn default_layers_per_block() -> usize {
    1
}
fn default_act_fn() -> String {
    "silu".to_string()
}
fn default_latent_channels() -> usize {
    4
}
fn default_norm_num_groups() -> usize {
    32
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}

/// `vae/config.json` as diffusers writes it; absent keys take `AutoencoderKL.__init__`'s defaults.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct VaeConfig {
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    #[serde(default = "default_in_channels")]
    pub out_channels: usize,
    #[serde(default = "default_down_block_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_up_block_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: usize,
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: usize,
    /// An int in real configs; kept loose because it is informational only.
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

impl VaeConfig {
    /// Rejects settings this implementation does not cover, before any weight is read.
    fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            candle_core::bail!("vae config: block_out_channels is empty");
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            candle_core::bail!(
                "vae config: {} block_out_channels but {} down_block_types and {} up_block_types",
                n,
                self.down_block_types.len(),
                self.up_block_types.len()
            );
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            candle_core::bail!("vae config: unsupported down block type {t}");
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            candle_core::bail!("vae config: unsupported up block type {t}");
        }
        if self.act_fn != "silu" {
            candle_core::bail!("vae config: unsupported act_fn {}", self.act_fn);
        }
        if self.norm_num_groups == 0 {
            candle_core::bail!("vae config: norm_num_groups is 0");
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|c| **c % self.norm_num_groups != 0)
        {
            candle_core::bail!(
                "vae config: {c} channels do not divide into {} groups",
                self.norm_num_groups
            );
        }
        Ok(())
    }

    /// Pixel size of one latent cell: 2 per down block after the first.
    pub fn downscale_factor(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }
}

fn conv3x3(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    candle_nn::conv2d(cin, cout, 3, cfg, vb)
}

fn conv1x1(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv2d> {
    candle_nn::conv2d(cin, cout, 1, Default::default(), vb)
}

/// diffusers `ResnetBlock2D` without a time embedding (the VAE never passes one).
#[derive(Debug)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(cin: usize, cout: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let conv_shortcut = if cin != cout {
            Some(conv1x1(cin, cout, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: super::norm::group_norm(groups, cin, VAE_EPS, vb.pp("norm1"))?,
            conv1: conv3x3(cin, cout, vb.pp("conv1"))?,
            norm2: super::norm::group_norm(groups, cout, VAE_EPS, vb.pp("norm2"))?,
            conv2: conv3x3(cout, cout, vb.pp("conv2"))?,
            conv_shortcut,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(xs)?.silu()?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        skip + h
    }
}

/// The mid block's single-head self-attention over all pixels (diffusers `Attention` with
/// `heads = 1`, `dim_head = C`, group norm in front and a residual connection).
#[derive(Debug)]
struct SpatialAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    channels: usize,
}

impl SpatialAttention {
    fn new(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        // Checkpoints converted before diffusers 0.14 name the projections query/key/value/proj_attn.
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let (q, k, v, o) = if legacy {
            (
                vb.pp("query"),
                vb.pp("key"),
                vb.pp("value"),
                vb.pp("proj_attn"),
            )
        } else {
            (
                vb.pp("to_q"),
                vb.pp("to_k"),
                vb.pp("to_v"),
                vb.pp("to_out").pp("0"),
            )
        };
        Ok(Self {
            group_norm: super::norm::group_norm(groups, channels, VAE_EPS, vb.pp("group_norm"))?,
            to_q: candle_nn::linear(channels, channels, q)?,
            to_k: candle_nn::linear(channels, channels, k)?,
            to_v: candle_nn::linear(channels, channels, v)?,
            to_out: candle_nn::linear(channels, channels, o)?,
            channels,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let tokens = self
            .group_norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        let scale = 1.0 / (self.channels as f64).sqrt();
        // diffusers upcasts the softmax; do the whole score computation in f32. Queries go in
        // chunks so the score block stays bounded: a 2048² tile has 65536 tokens here, and a
        // full 65536² f32 matrix (16 GiB, over 2³² elements) is more than GPU kernels accept.
        let in_dtype = q.dtype();
        let attended = chunked_attention(&q, &k, &v, scale, MAX_VAE_SCORES)?.to_dtype(in_dtype)?;
        let out = self.to_out.forward(&attended)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + xs
    }
}

/// Largest (batch, queries, keys) f32 score block the VAE's attention holds at once (512 MiB).
const MAX_VAE_SCORES: usize = 1 << 27;

/// softmax(q·kᵀ·scale)·v in f32 for (B, N, C) inputs, in query chunks of at most `max_scores`
/// score elements.
fn chunked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    max_scores: usize,
) -> Result<Tensor> {
    let (b, n, _) = q.dims3()?;
    let q = q.to_dtype(DType::F32)?;
    let kt = k.to_dtype(DType::F32)?.t()?;
    let v = v.to_dtype(DType::F32)?;
    let nk = kt.dim(2)?;
    let chunk = (max_scores / (b * nk).max(1)).clamp(1, n.max(1));
    let mut parts = Vec::with_capacity(n.div_ceil(chunk));
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let qc = if len == n {
            q.clone()
        } else {
            q.narrow(1, start, len)?
        };
        let probs = candle_nn::ops::softmax_last_dim(&(qc.matmul(&kt)? * scale)?)?;
        parts.push(probs.matmul(&v)?);
    }
    if parts.len() == 1 {
        Ok(parts.remove(0))
    } else {
        Tensor::cat(&parts, 1)
    }
}

/// diffusers `UNetMidBlock2D` as the VAE uses it: resnet, (attention), resnet.
#[derive(Debug)]
struct MidBlock {
    resnet0: ResnetBlock,
    attention: Option<SpatialAttention>,
    resnet1: ResnetBlock,
}

impl MidBlock {
    fn new(channels: usize, groups: usize, add_attention: bool, vb: VarBuilder) -> Result<Self> {
        let resnets = vb.pp("resnets");
        let attention = if add_attention {
            Some(SpatialAttention::new(
                channels,
                groups,
                vb.pp("attentions").pp("0"),
            )?)
        } else {
            None
        };
        Ok(Self {
            resnet0: ResnetBlock::new(channels, channels, groups, resnets.pp("0"))?,
            attention,
            resnet1: ResnetBlock::new(channels, channels, groups, resnets.pp("1"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet0.forward(xs)?;
        if let Some(a) = &self.attention {
            h = a.forward(&h)?;
        }
        self.resnet1.forward(&h)
    }
}

#[derive(Debug)]
struct DownEncoderBlock {
    resnets: Vec<ResnetBlock>,
    /// Stride-2 conv without padding, applied after a (0, 1, 0, 1) zero pad: diffusers
    /// `Downsample2D` with `padding=0` pads only right and bottom.
    downsampler: Option<Conv2d>,
}

impl DownEncoderBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = xs.clone();
        for r in &self.resnets {
            h = r.forward(&h)?;
        }
        if let Some(conv) = &self.downsampler {
            h = h
                .pad_with_zeros(D::Minus1, 0, 1)?
                .pad_with_zeros(D::Minus2, 0, 1)?;
            h = conv.forward(&h)?;
        }
        Ok(h)
    }
}

#[derive(Debug)]
struct UpDecoderBlock {
    resnets: Vec<ResnetBlock>,
    /// Nearest-neighbour 2x, then a 3x3 conv (diffusers `Upsample2D`).
    upsampler: Option<Conv2d>,
}

impl UpDecoderBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = xs.clone();
        for r in &self.resnets {
            h = r.forward(&h)?;
        }
        if let Some(conv) = &self.upsampler {
            let (_, _, hh, ww) = h.dims4()?;
            h = conv.forward(&h.upsample_nearest2d(2 * hh, 2 * ww)?)?;
        }
        Ok(h)
    }
}

#[derive(Debug)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let conv_in = conv3x3(cfg.in_channels, ch[0], vb.pp("conv_in"))?;
        let mut down_blocks = Vec::with_capacity(ch.len());
        let vb_down = vb.pp("down_blocks");
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let vb_b = vb_down.pp(i.to_string());
            let mut resnets = Vec::with_capacity(cfg.layers_per_block);
            for j in 0..cfg.layers_per_block {
                let rin = if j == 0 { cin } else { cout };
                resnets.push(ResnetBlock::new(
                    rin,
                    cout,
                    g,
                    vb_b.pp("resnets").pp(j.to_string()),
                )?);
            }
            let downsampler = if i + 1 < ch.len() {
                let cfg2 = Conv2dConfig {
                    stride: 2,
                    ..Default::default()
                };
                Some(candle_nn::conv2d(
                    cout,
                    cout,
                    3,
                    cfg2,
                    vb_b.pp("downsamplers").pp("0").pp("conv"),
                )?)
            } else {
                None
            };
            down_blocks.push(DownEncoderBlock {
                resnets,
                downsampler,
            });
            cin = cout;
        }
        let top = *ch.last().unwrap_or(&ch[0]);
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: MidBlock::new(top, g, cfg.mid_block_add_attention, vb.pp("mid_block"))?,
            conv_norm_out: super::norm::group_norm(g, top, VAE_EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(top, 2 * cfg.latent_channels, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(xs)?;
        for b in &self.down_blocks {
            h = b.forward(&h)?;
        }
        h = self.mid_block.forward(&h)?;
        h = self.conv_norm_out.forward(&h)?.silu()?;
        self.conv_out.forward(&h)
    }
}

#[derive(Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpDecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let top = rev[0];
        let conv_in = conv3x3(cfg.latent_channels, top, vb.pp("conv_in"))?;
        let mid_block = MidBlock::new(top, g, cfg.mid_block_add_attention, vb.pp("mid_block"))?;
        let vb_up = vb.pp("up_blocks");
        let mut up_blocks = Vec::with_capacity(rev.len());
        let mut cin = top;
        for (i, &cout) in rev.iter().enumerate() {
            let vb_b = vb_up.pp(i.to_string());
            let mut resnets = Vec::with_capacity(cfg.layers_per_block + 1);
            for j in 0..cfg.layers_per_block + 1 {
                let rin = if j == 0 { cin } else { cout };
                resnets.push(ResnetBlock::new(
                    rin,
                    cout,
                    g,
                    vb_b.pp("resnets").pp(j.to_string()),
                )?);
            }
            let upsampler = if i + 1 < rev.len() {
                Some(conv3x3(
                    cout,
                    cout,
                    vb_b.pp("upsamplers").pp("0").pp("conv"),
                )?)
            } else {
                None
            };
            up_blocks.push(UpDecoderBlock { resnets, upsampler });
            cin = cout;
        }
        let bottom = cfg.block_out_channels[0];
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: super::norm::group_norm(g, bottom, VAE_EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(bottom, cfg.out_channels, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, zs: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(zs)?;
        h = self.mid_block.forward(&h)?;
        for b in &self.up_blocks {
            h = b.forward(&h)?;
        }
        h = self.conv_norm_out.forward(&h)?.silu()?;
        self.conv_out.forward(&h)
    }
}

/// The encoder's posterior: a diagonal Gaussian per latent element (diffusers
/// `DiagonalGaussianDistribution`).
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Clamped to [-30, 20] as diffusers does, so `std` never over- or underflows.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Splits the encoder's `2 * latent_channels` moments into mean and log-variance.
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let c2 = moments.dim(1)?;
        if c2 % 2 != 0 {
            candle_core::bail!("posterior moments have an odd channel count {c2}");
        }
        let mean = moments.narrow(1, 0, c2 / 2)?;
        let logvar = moments.narrow(1, c2 / 2, c2 / 2)?.clamp(-30f32, 20f32)?;
        Ok(Self { mean, logvar })
    }

    pub fn mean(&self) -> &Tensor {
        &self.mean
    }

    pub fn logvar(&self) -> &Tensor {
        &self.logvar
    }

    pub fn std(&self) -> Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }

    /// `mean + std * noise`; the caller owns the noise so that sampling is reproducible.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        let noise = noise.to_dtype(self.mean.dtype())?;
        &self.mean + self.std()?.mul(&noise)?
    }
}

#[derive(Debug)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    cfg: VaeConfig,
}

impl AutoencoderKL {
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        cfg.validate()?;
        let lc = cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(conv1x1(2 * lc, 2 * lc, vb.pp("quant_conv"))?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(conv1x1(lc, lc, vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            quant_conv,
            post_quant_conv,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// Raw posterior moments (mean and unclamped log-variance stacked on channels).
    fn moments(&self, image: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = image.dims4()?;
        if c != self.cfg.in_channels {
            candle_core::bail!(
                "vae encode: image has {c} channels, expected {}",
                self.cfg.in_channels
            );
        }
        let h = self.encoder.forward(image)?;
        match &self.quant_conv {
            Some(q) => q.forward(&h),
            None => Ok(h),
        }
    }

    /// `image`: (B, 3, H, W) in [-1, 1]. Returns the posterior over unscaled latents.
    pub fn encode(&self, image: &Tensor) -> Result<DiagonalGaussian> {
        DiagonalGaussian::from_moments(&self.moments(image)?)
    }

    /// `latent`: (B, C, h, w), unscaled (already divided by `scaling_factor`).
    pub fn decode(&self, latent: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = latent.dims4()?;
        if c != self.cfg.latent_channels {
            candle_core::bail!(
                "vae decode: latent has {c} channels, expected {}",
                self.cfg.latent_channels
            );
        }
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(latent)?,
            None => latent.clone(),
        };
        self.decoder.forward(&z)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_in_query_chunks_equals_one_block() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 37, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, 37, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (2, 37, 8), &dev)?;
        let whole = chunked_attention(&q, &k, &v, 0.35, usize::MAX)?;
        // 2·37 keys per query: at most 3 queries per chunk, a short last chunk.
        let chunked = chunked_attention(&q, &k, &v, 0.35, 2 * 37 * 3)?;
        let d = (whole - chunked)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-6, "{d}");
        Ok(())
    }
    use candle_core::Device;

    fn tiny_cfg() -> VaeConfig {
        serde_json::from_str(
            r#"{"block_out_channels":[8,16],"layers_per_block":1,"norm_num_groups":4,
                "latent_channels":4,"down_block_types":["DownEncoderBlock2D","DownEncoderBlock2D"],
                "up_block_types":["UpDecoderBlock2D","UpDecoderBlock2D"]}"#,
        )
        .unwrap()
    }

    /// A tiny VAE with deterministic random weights: candle's default initialisers (which set
    /// the scale of each tensor) are redrawn from a fixed-seed generator, so runs are repeatable.
    fn tiny_vae() -> AutoencoderKL {
        let dev = Device::Cpu;
        let vm = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let vae = AutoencoderKL::new(vb, &tiny_cfg()).unwrap();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let data = vm.data().lock().unwrap();
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names {
            let var = &data[name];
            let v = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            if v.iter().all(|x| *x == v[0]) {
                continue; // norm scales and shifts keep their constant init
            }
            let dims = var.as_tensor().dims().to_vec();
            // Unit-gain scale for weights (variance 1/fan_in), small biases.
            let bound = if dims.len() >= 2 {
                (3.0 / dims[1..].iter().product::<usize>() as f32).sqrt()
            } else {
                0.05
            };
            let fresh: Vec<f32> = (0..v.len())
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let u = (state >> 40) as f32 / (1u64 << 24) as f32;
                    (2.0 * u - 1.0) * bound
                })
                .collect();
            let t = Tensor::from_vec(fresh, var.as_tensor().shape(), &dev).unwrap();
            var.set(&t).unwrap();
        }
        drop(data);
        // The model holds the same storage as the VarMap's vars, so it sees the new values.
        vae
    }

    #[test]
    fn decode_and_encode_shapes() {
        let vae = tiny_vae();
        let z = Tensor::randn(0f32, 1f32, (1, 4, 6, 5), &Device::Cpu).unwrap();
        let img = vae.decode(&z).unwrap();
        assert_eq!(img.dims4().unwrap(), (1, 3, 12, 10));
        let post = vae.encode(&img).unwrap();
        assert_eq!(post.mean().dims4().unwrap(), (1, 4, 6, 5));
        let s = post.sample(&post.mean().zeros_like().unwrap()).unwrap();
        let d = (s - post.mean()).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    }
}
