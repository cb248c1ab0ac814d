//! The CLIP text encoder (transformers `CLIPTextModel` / `CLIPTextModelWithProjection`).
//!
//! Written here rather than taken from candle-transformers because Stable Diffusion needs the
//! penultimate hidden state without the final norm, transformers' two EOS-pooling rules, an
//! optional bias-free projection and both checkpoint naming schemes (`text_model.` prefix or not).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};

fn default_vocab_size() -> usize {
    49408
}
fn default_hidden_size() -> usize {
    512
}
fn default_intermediate_size() -> usize {
    2048
}
fn default_num_hidden_layers() -> usize {
    12
}
fn default_num_attention_heads() -> usize {
    8
}
fn default_max_position_embeddings() -> usize {
    77
}
fn default_hidden_act() -> String {
    "quick_gelu".to_string()
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_eos() -> TokenIdSpec {
    TokenIdSpec::One(49407)
}
fn default_bos() -> Option<u32> {
    Some(49406)
}
fn default_pad() -> Option<u32> {
    Some(1)
}

/// transformers allows `eos_token_id` to be a single id or a list.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum TokenIdSpec {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIdSpec {
    pub fn first(&self) -> Option<u32> {
        match self {
            TokenIdSpec::One(i) => Some(*i),
            TokenIdSpec::Many(v) => v.first().copied(),
        }
    }
}

/// `text_encoder/config.json` (transformers `CLIPTextConfig`); absent keys take its defaults.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
    #[serde(default = "default_eos")]
    pub eos_token_id: TokenIdSpec,
    #[serde(default = "default_bos")]
    pub bos_token_id: Option<u32>,
    #[serde(default = "default_pad")]
    pub pad_token_id: Option<u32>,
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    QuickGelu,
    Gelu,
    GeluTanh,
    Relu,
}

impl Activation {
    fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => candle_core::bail!("clip text config: unsupported hidden_act {other}"),
        })
    }

    fn apply(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            // OpenAI's approximation x * sigmoid(1.702 x).
            Activation::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Activation::Gelu => xs.gelu_erf(),
            Activation::GeluTanh => xs.gelu(),
            Activation::Relu => xs.relu(),
        }
    }
}

#[derive(Debug)]
struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl SelfAttention {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            q_proj: candle_nn::linear(d, d, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear(d, d, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear(d, d, vb.pp("v_proj"))?,
            out_proj: candle_nn::linear(d, d, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
            head_dim: d / cfg.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let (b, n, d) = xs.dims3()?;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, n, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((self.q_proj.forward(xs)? * (self.head_dim as f64).powf(-0.5))?)?;
        let k = split(self.k_proj.forward(xs)?)?;
        let v = split(self.v_proj.forward(xs)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(causal_mask)?;
        let in_dtype = scores.dtype();
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(in_dtype)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))?;
        self.out_proj.forward(&out)
    }
}

#[derive(Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: SelfAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn new(cfg: &ClipTextConfig, act: Activation, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            layer_norm1: candle_nn::layer_norm(d, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            self_attn: SelfAttention::new(cfg, vb.pp("self_attn"))?,
            layer_norm2: candle_nn::layer_norm(d, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: candle_nn::linear(d, cfg.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: candle_nn::linear(cfg.intermediate_size, d, vb.pp("mlp").pp("fc2"))?,
            act,
        })
    }

    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let h = (xs
            + self
                .self_attn
                .forward(&self.layer_norm1.forward(xs)?, causal_mask)?)?;
        let m = self.fc2.forward(
            &self
                .act
                .apply(&self.fc1.forward(&self.layer_norm2.forward(&h)?)?)?,
        )?;
        h + m
    }
}

/// What Stable Diffusion pipelines read from the text encoder.
#[derive(Debug, Clone)]
pub struct TextOutput {
    /// (B, N, D), after `final_layer_norm` (SD 1.x/2.x conditioning uses this).
    pub last_hidden_state: Tensor,
    /// (B, N, D), `hidden_states[-2]`: the output of the second-to-last layer, no final norm
    /// (SDXL's conditioning).
    pub penultimate: Tensor,
    /// (B, D), `last_hidden_state` at the EOS position.
    pub pooled: Tensor,
    /// (B, projection_dim), `text_projection(pooled)` when built with the projection.
    pub text_embeds: Option<Tensor>,
}

#[derive(Debug)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    cfg: ClipTextConfig,
}

impl ClipTextModel {
    /// `vb` is the component root (`text_encoder/`). Accepts `text_model.`-prefixed tensors
    /// (real checkpoints) or unprefixed ones (`CLIPTextModel` saved by transformers 5).
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig, with_projection: bool) -> Result<Self> {
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            candle_core::bail!(
                "clip text config: hidden_size {} is not divisible by {} heads",
                cfg.hidden_size,
                cfg.num_attention_heads
            );
        }
        if cfg.num_hidden_layers < 2 {
            candle_core::bail!(
                "clip text config: need at least 2 layers for the penultimate state"
            );
        }
        let act = Activation::parse(&cfg.hidden_act)?;
        let tm = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb.clone()
        };
        let emb = tm.pp("embeddings");
        let token_embedding =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, emb.pp("token_embedding"))?;
        let position_embedding = candle_nn::embedding(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            emb.pp("position_embedding"),
        )?;
        let vb_layers = tm.pp("encoder").pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(cfg, act, vb_layers.pp(i.to_string())))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = candle_nn::layer_norm(
            cfg.hidden_size,
            cfg.layer_norm_eps,
            tm.pp("final_layer_norm"),
        )?;
        let text_projection = if with_projection {
            let dim = match cfg.projection_dim {
                Some(d) => d,
                None => candle_core::bail!(
                    "clip text config: projection_dim is needed for text_projection"
                ),
            };
            Some(candle_nn::linear_no_bias(
                cfg.hidden_size,
                dim,
                vb.pp("text_projection"),
            )?)
        } else {
            None
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.cfg
    }

    /// Row index of the pooled token in each sequence, by transformers' rule: with the legacy
    /// `eos_token_id == 2` the (first) largest id, otherwise the first occurrence of the EOS id.
    fn pool_positions(&self, ids: &[Vec<i64>]) -> Result<Vec<u32>> {
        let eos = self.cfg.eos_token_id.first();
        ids.iter()
            .map(|row| {
                let pos = match eos {
                    Some(e) if e != 2 => row.iter().position(|&t| t == e as i64).unwrap_or(0),
                    _ => {
                        let mut best = 0;
                        for (i, &t) in row.iter().enumerate() {
                            if t > row[best] {
                                best = i;
                            }
                        }
                        best
                    }
                };
                Ok(pos as u32)
            })
            .collect()
    }

    /// `input_ids`: (B, N) of u32 or i64 token ids, N <= max_position_embeddings.
    pub fn forward(&self, input_ids: &Tensor) -> Result<TextOutput> {
        let (b, n) = input_ids.dims2()?;
        if n == 0 || n > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "clip text: sequence length {n} not in 1..={}",
                self.cfg.max_position_embeddings
            );
        }
        let ids: Vec<Vec<i64>> = match input_ids.dtype() {
            DType::I64 => input_ids.to_vec2::<i64>()?,
            DType::U32 => input_ids
                .to_vec2::<u32>()?
                .into_iter()
                .map(|r| r.into_iter().map(i64::from).collect())
                .collect(),
            other => candle_core::bail!("clip text: token ids must be u32 or i64, got {other:?}"),
        };
        if let Some(bad) = ids
            .iter()
            .flatten()
            .find(|&&t| t < 0 || t as usize >= self.cfg.vocab_size)
        {
            candle_core::bail!(
                "clip text: token id {bad} outside the vocabulary ({})",
                self.cfg.vocab_size
            );
        }
        let dev = self.token_embedding.embeddings().device().clone();
        let flat: Vec<u32> = ids.iter().flatten().map(|&t| t as u32).collect();
        let ids_t = Tensor::from_vec(flat, (b, n), &dev)?;
        let positions = Tensor::arange(0u32, n as u32, &dev)?;
        let mut h = self
            .token_embedding
            .forward(&ids_t)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(n, h.dtype(), &dev)?;
        let mut penultimate = None;
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            if i == last {
                penultimate = Some(h.clone());
            }
            h = layer.forward(&h, &mask)?;
        }
        let penultimate = match penultimate {
            Some(p) => p,
            None => candle_core::bail!("clip text: no layers"),
        };
        let last_hidden_state = self.final_layer_norm.forward(&h)?;
        let pos = self.pool_positions(&ids)?;
        let pooled = (0..b)
            .map(|i| last_hidden_state.get(i)?.get(pos[i] as usize))
            .collect::<Result<Vec<_>>>()?;
        let pooled = Tensor::stack(&pooled, 0)?;
        let text_embeds = match &self.text_projection {
            Some(p) => Some(p.forward(&pooled)?),
            None => None,
        };
        Ok(TextOutput {
            last_hidden_state,
            penultimate,
            pooled,
            text_embeds,
        })
    }
}

/// (1, 1, N, N): 0 on and below the diagonal, -inf above (each token sees only its past).
fn causal_mask(n: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(v, (1, 1, n, n), dev)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(eos: u32) -> ClipTextConfig {
        serde_json::from_str(&format!(
            r#"{{"vocab_size":100,"hidden_size":16,"intermediate_size":32,"num_hidden_layers":3,
               "num_attention_heads":2,"max_position_embeddings":8,"hidden_act":"gelu",
               "projection_dim":12,"eos_token_id":{eos}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn shapes_prefix_and_pooling() {
        let dev = Device::Cpu;
        let vm = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let m = ClipTextModel::new(vb.clone(), &cfg(99), true).unwrap();
        let ids = Tensor::new(&[[98u32, 5, 7, 99, 99, 99, 99, 99]], &dev).unwrap();
        let out = m.forward(&ids).unwrap();
        assert_eq!(out.last_hidden_state.dims3().unwrap(), (1, 8, 16));
        assert_eq!(out.penultimate.dims3().unwrap(), (1, 8, 16));
        assert_eq!(out.text_embeds.as_ref().unwrap().dims2().unwrap(), (1, 12));
        let at3 = out.last_hidden_state.get(0).unwrap().get(3).unwrap();
        let d = (at3 - out.pooled.get(0).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
        assert!(m.pool_positions(&[vec![1, 2, 99, 0]]).unwrap() == vec![2]);
        let legacy = ClipTextModel::new(vb, &cfg(2), false).unwrap();
        assert_eq!(
            legacy.pool_positions(&[vec![1, 50, 99, 99]]).unwrap(),
            vec![2]
        );
        let bad = Tensor::new(&[[1u32, 500]], &dev).unwrap();
        assert!(m.forward(&bad).is_err());
    }
}
