//! The T5 encoder (transformers `T5EncoderModel`) as SD3's third text encoder, and its
//! tokenizer (`tokenizer_3/tokenizer.json`, a SentencePiece unigram model read by the
//! `tokenizers` crate). Pre-norm blocks with T5's RMS layer norm, attention without score
//! scaling whose bias comes from bucketed relative positions (computed by the first block and
//! shared by all), and the gated-GELU feed-forward of T5 v1.1.

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, Linear, VarBuilder};

fn default_d_model() -> usize {
    512
}
fn default_d_kv() -> usize {
    64
}
fn default_d_ff() -> usize {
    2048
}
fn default_layers() -> usize {
    6
}
fn default_heads() -> usize {
    8
}
fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff_proj() -> String {
    "relu".into()
}
fn default_vocab() -> usize {
    32128
}

/// `text_encoder_3/config.json` (transformers `T5Config`); absent keys take its defaults.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct T5Config {
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    #[serde(default = "default_d_model")]
    pub d_model: usize,
    #[serde(default = "default_d_kv")]
    pub d_kv: usize,
    #[serde(default = "default_d_ff")]
    pub d_ff: usize,
    #[serde(default = "default_layers")]
    pub num_layers: usize,
    #[serde(default = "default_heads")]
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_ff_proj")]
    pub feed_forward_proj: String,
}

impl T5Config {
    /// (gated, activation) of `feed_forward_proj`: "gated-gelu" is T5 v1.1's (gelu_new, the
    /// tanh approximation), "relu" the original T5's.
    fn feed_forward(&self) -> Result<(bool, Activation)> {
        let (gated, act) = match self.feed_forward_proj.split_once('-') {
            Some(("gated", act)) => (true, act),
            _ => (false, self.feed_forward_proj.as_str()),
        };
        let act = match act {
            // transformers maps "gated-gelu" to gelu_new.
            "gelu" | "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => candle_core::bail!("t5 config: unsupported feed_forward_proj {other:?}"),
        };
        Ok((gated, act))
    }
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    GeluTanh,
    Relu,
}

/// T5's layer norm: RMS without mean subtraction, the mean square in f32.
#[derive(Debug, Clone)]
struct T5LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl T5LayerNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x32 = x.to_dtype(DType::F32)?;
        let inv = (x32.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        x32.broadcast_mul(&inv)?
            .to_dtype(self.weight.dtype())?
            .broadcast_mul(&self.weight)
    }
}

/// T5's bidirectional bucket of `relative = key − query`: half the buckets per direction,
/// exact below a quarter of them, logarithmic up to `max_distance` (in f32 as torch).
fn relative_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = num_buckets / 2;
    let mut bucket = if relative > 0 { half } else { 0 };
    let n = relative.unsigned_abs() as usize;
    let max_exact = half / 2;
    if n < max_exact {
        bucket += n;
    } else {
        let ratio = (n as f32 / max_exact as f32).ln()
            / ((max_distance as f64 / max_exact as f64).ln() as f32)
            * (half - max_exact) as f32;
        bucket += (max_exact + ratio as usize).min(half - 1);
    }
    bucket
}

#[derive(Debug, Clone)]
struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    d_kv: usize,
    /// The first block's `relative_attention_bias` (buckets × heads).
    relative_bias: Option<Embedding>,
}

impl SelfAttention {
    fn new(cfg: &T5Config, vb: VarBuilder, with_bias: bool) -> Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        let relative_bias = with_bias
            .then(|| {
                candle_nn::embedding(
                    cfg.relative_attention_num_buckets,
                    cfg.num_heads,
                    vb.pp("relative_attention_bias"),
                )
            })
            .transpose()?;
        Ok(Self {
            q: candle_nn::linear_no_bias(cfg.d_model, inner, vb.pp("q"))?,
            k: candle_nn::linear_no_bias(cfg.d_model, inner, vb.pp("k"))?,
            v: candle_nn::linear_no_bias(cfg.d_model, inner, vb.pp("v"))?,
            o: candle_nn::linear_no_bias(inner, cfg.d_model, vb.pp("o"))?,
            heads: cfg.num_heads,
            d_kv: cfg.d_kv,
            relative_bias,
        })
    }

    /// (1, heads, N, N) position bias of a sequence of `n` tokens.
    fn position_bias(&self, cfg: &T5Config, n: usize, dev: &Device) -> Result<Option<Tensor>> {
        let Some(emb) = &self.relative_bias else {
            return Ok(None);
        };
        let buckets: Vec<u32> = (0..n)
            .flat_map(|q| {
                (0..n).map(move |k| {
                    relative_bucket(
                        k as i64 - q as i64,
                        cfg.relative_attention_num_buckets,
                        cfg.relative_attention_max_distance,
                    ) as u32
                })
            })
            .collect();
        let idx = Tensor::from_vec(buckets, (n, n), dev)?;
        Ok(Some(emb.forward(&idx)?.permute((2, 0, 1))?.unsqueeze(0)?))
    }

    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, n, self.heads, self.d_kv))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q.forward(x)?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        // T5 does not scale the scores; the softmax runs in f32.
        let scores = q
            .matmul(&k.t()?)?
            .broadcast_add(&bias.to_dtype(q.dtype())?)?;
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(q.dtype())?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, n, self.heads * self.d_kv))?;
        self.o.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct FeedForward {
    wi_0: Linear,
    wi_1: Option<Linear>,
    wo: Linear,
    act: Activation,
}

impl FeedForward {
    fn new(cfg: &T5Config, vb: VarBuilder) -> Result<Self> {
        let (gated, act) = cfg.feed_forward()?;
        let (wi_0, wi_1) = if gated {
            (
                candle_nn::linear_no_bias(cfg.d_model, cfg.d_ff, vb.pp("wi_0"))?,
                Some(candle_nn::linear_no_bias(
                    cfg.d_model,
                    cfg.d_ff,
                    vb.pp("wi_1"),
                )?),
            )
        } else {
            (
                candle_nn::linear_no_bias(cfg.d_model, cfg.d_ff, vb.pp("wi"))?,
                None,
            )
        };
        Ok(Self {
            wi_0,
            wi_1,
            wo: candle_nn::linear_no_bias(cfg.d_ff, cfg.d_model, vb.pp("wo"))?,
            act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.wi_0.forward(x)?;
        let h = match self.act {
            Activation::GeluTanh => h.gelu()?,
            Activation::Relu => h.relu()?,
        };
        let h = match &self.wi_1 {
            Some(wi_1) => (h * wi_1.forward(x)?)?,
            None => h,
        };
        self.wo.forward(&h)
    }
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: T5LayerNorm,
    attn: SelfAttention,
    ff_norm: T5LayerNorm,
    ff: FeedForward,
}

impl Block {
    fn new(cfg: &T5Config, vb: VarBuilder, first: bool) -> Result<Self> {
        let eps = cfg.layer_norm_epsilon;
        let l0 = vb.pp("layer").pp("0");
        let l1 = vb.pp("layer").pp("1");
        Ok(Self {
            attn_norm: T5LayerNorm::new(cfg.d_model, eps, l0.pp("layer_norm"))?,
            attn: SelfAttention::new(cfg, l0.pp("SelfAttention"), first)?,
            ff_norm: T5LayerNorm::new(cfg.d_model, eps, l1.pp("layer_norm"))?,
            ff: FeedForward::new(cfg, l1.pp("DenseReluDense"))?,
        })
    }

    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let x = clamp_half(&(x + self.attn.forward(&self.attn_norm.forward(x)?, bias)?)?)?;
        clamp_half(&(&x + self.ff.forward(&self.ff_norm.forward(&x)?)?)?)
    }
}

/// transformers keeps f16 activations finite: where one overflowed, all are clamped to the
/// f16 range less 1000.
fn clamp_half(x: &Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F16 {
        return Ok(x.clone());
    }
    let max = x
        .abs()?
        .max_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    if max.is_finite() {
        return Ok(x.clone());
    }
    let limit = 65504.0 - 1000.0;
    x.clamp(-limit, limit)
}

/// transformers' `T5EncoderModel`.
#[derive(Debug, Clone)]
pub struct T5EncoderModel {
    embed_tokens: Embedding,
    blocks: Vec<Block>,
    final_layer_norm: T5LayerNorm,
    cfg: T5Config,
}

impl T5EncoderModel {
    /// `vb` is the component root (`text_encoder_3/`): `shared.weight` (or the encoder's own
    /// `encoder.embed_tokens.weight`) and `encoder.*`.
    pub fn new(vb: VarBuilder, cfg: &T5Config) -> Result<Self> {
        if cfg.num_layers == 0 || cfg.num_heads == 0 {
            candle_core::bail!("t5 config: num_layers and num_heads must be positive");
        }
        let embed_name = if vb.contains_tensor("shared.weight") {
            "shared"
        } else {
            "encoder.embed_tokens"
        };
        let enc = vb.pp("encoder");
        let blocks = (0..cfg.num_layers)
            .map(|i| Block::new(cfg, enc.pp("block").pp(i), i == 0))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens: candle_nn::embedding(cfg.vocab_size, cfg.d_model, vb.pp(embed_name))?,
            blocks,
            final_layer_norm: T5LayerNorm::new(
                cfg.d_model,
                cfg.layer_norm_epsilon,
                enc.pp("final_layer_norm"),
            )?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &T5Config {
        &self.cfg
    }

    /// The last hidden state (B, N, d_model) of token ids (B, N); every token attends to
    /// every other, as the SD3 pipeline calls it (no attention mask).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, n) = ids.dims2()?;
        let dev = ids.device();
        let mut h = self.embed_tokens.forward(ids)?;
        let bias = self.blocks[0]
            .attn
            .position_bias(&self.cfg, n, dev)?
            .ok_or_else(|| candle_core::Error::Msg("t5: the first block has no bias".into()))?;
        for block in &self.blocks {
            h = block.forward(&h, &bias)?;
        }
        self.final_layer_norm.forward(&h)
    }
}

/// SD3's T5 tokenizer: the unigram vocabulary of `tokenizer.json` in the pipeline that
/// transformers' `T5Tokenizer` builds around it (what the SD3 pipeline calls): the file's
/// SentencePiece charsmap as the only normaliser, whitespace split then `Metaspace`, `</s>`
/// appended; padded and truncated to a fixed length with the end token kept.
pub struct T5Tokenizer {
    inner: tokenizers::Tokenizer,
    length: usize,
    pad_id: u32,
}

impl T5Tokenizer {
    pub fn from_file(path: &Path, length: usize) -> std::result::Result<Self, String> {
        let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
        let text = std::fs::read_to_string(path).map_err(|e| err(&e))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(&e))?;
        let mut inner: tokenizers::Tokenizer = text.parse().map_err(|e| err(&e))?;
        let eos = inner
            .token_to_id("</s>")
            .ok_or_else(|| err(&"the vocabulary has no </s>"))?;
        let pad_id = inner.token_to_id("<pad>").unwrap_or(0);
        let normalizer: Option<tokenizers::NormalizerWrapper> = match precompiled_charsmap(&json) {
            Some(n) => Some(serde_json::from_value(n).map_err(|e| err(&e))?),
            None => None,
        };
        inner.with_normalizer(normalizer).map_err(|e| err(&e))?;
        let pre: tokenizers::PreTokenizerWrapper = serde_json::from_value(serde_json::json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "WhitespaceSplit"},
                {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "always", "split": true}
            ]
        }))
        .map_err(|e| err(&e))?;
        inner.with_pre_tokenizer(Some(pre));
        let post: tokenizers::PostProcessorWrapper = serde_json::from_value(serde_json::json!({
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [eos], "tokens": ["</s>"]}}
        }))
        .map_err(|e| err(&e))?;
        inner.with_post_processor(Some(post));
        inner
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: length,
                ..Default::default()
            }))
            .map_err(|e| err(&e))?;
        inner.with_padding(None);
        Ok(Self {
            inner,
            length,
            pad_id,
        })
    }

    /// `length` ids: the text's, the end token, then padding.
    pub fn encode(&self, text: &str) -> std::result::Result<Vec<u32>, String> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| format!("t5 tokenizer: {e}"))?;
        let mut ids = enc.get_ids().to_vec();
        ids.truncate(self.length);
        ids.resize(self.length, self.pad_id);
        Ok(ids)
    }
}

/// The `Precompiled` normaliser of a tokenizer.json, alone or in a sequence.
fn precompiled_charsmap(json: &serde_json::Value) -> Option<serde_json::Value> {
    let n = json.get("normalizer")?;
    let list = match n.get("type").and_then(|t| t.as_str()) {
        Some("Sequence") => n.get("normalizers")?.as_array()?.clone(),
        _ => vec![n.clone()],
    };
    list.into_iter()
        .find(|n| n.get("type").and_then(|t| t.as_str()) == Some("Precompiled"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers' `_relative_position_bucket(bidirectional=True, 32, 128)` at a few
    /// distances (printed by torch).
    #[test]
    fn buckets_match_transformers() {
        let cases = [
            (0, 0),
            (1, 17),
            (-1, 1),
            (7, 23),
            (8, 24),
            (-8, 8),
            (20, 26),
            (-50, 13),
            (127, 31),
            (-300, 15),
        ];
        for (rel, want) in cases {
            assert_eq!(relative_bucket(rel, 32, 128), want, "relative {rel}");
        }
    }
}
