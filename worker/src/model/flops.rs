//! Floating-point operations of one UNet evaluation, counted from the architecture: what a
//! benchmark divides by its time to report achieved TFLOP/s.
//!
//! Counted, as is customary, are the multiply-adds (2 FLOPs each) of convolutions, linear
//! layers and the two attention products (QKᵀ and the weighted sum of V). Norms, activations,
//! softmax and additions are left out: they are memory-bound and a few percent of the total.

use super::unet::UNetConfig;

/// FLOPs of one forward pass of a single sample at latent size `h`×`w`, with a text context of
/// `context_len` tokens. Multiply by the batch for a batch.
pub fn unet_flops(
    cfg: &UNetConfig,
    h: usize,
    w: usize,
    context_len: usize,
) -> candle_core::Result<f64> {
    let n = cfg.block_out_channels.len();
    let ch = &cfg.block_out_channels;
    let blocks = cfg.per_block()?;
    let (layers, tlayers, cross) = (
        &blocks.layers,
        &blocks.transformer_layers,
        &blocks.cross_dims,
    );
    let conv =
        |cin: usize, cout: usize, k: usize, px: usize| 2.0 * (cin * cout * k * k * px) as f64;
    let resnet = |cin: usize, cout: usize, px: usize| {
        conv(cin, cout, 3, px)
            + conv(cout, cout, 3, px)
            + if cin != cout {
                conv(cin, cout, 1, px)
            } else {
                0.0
            }
    };
    // One Transformer2DModel of `depth` blocks over `px` tokens of width `c`.
    let transformer = |c: usize, depth: usize, px: usize, ctx_dim: usize| {
        let (c, t, l) = (c as f64, px as f64, context_len as f64);
        let proj = 2.0 * 2.0 * c * c * t;
        let self_attn = 4.0 * 2.0 * c * c * t + 2.0 * 2.0 * t * t * c;
        let cross_attn =
            2.0 * 2.0 * c * c * t + 2.0 * 2.0 * ctx_dim as f64 * c * l + 2.0 * 2.0 * t * l * c;
        // GEGLU: c -> 8c (value and gate), then 4c -> c.
        let ff = 2.0 * c * 8.0 * c * t + 2.0 * 4.0 * c * c * t;
        proj + depth as f64 * (self_attn + cross_attn + ff)
    };
    let has_attn = |t: &str| t.starts_with("CrossAttn");

    let (mut hh, mut ww) = (h, w);
    let mut total = conv(cfg.in_channels, ch[0], cfg.conv_in_kernel, hh * ww);
    for (i, t) in cfg.down_block_types.iter().enumerate() {
        let px = hh * ww;
        for j in 0..layers[i] {
            let cin = if j == 0 {
                if i == 0 {
                    ch[0]
                } else {
                    ch[i - 1]
                }
            } else {
                ch[i]
            };
            total += resnet(cin, ch[i], px);
            if has_attn(t) {
                total += transformer(ch[i], tlayers[i], px, cross[i]);
            }
        }
        if i + 1 < n {
            hh = hh.div_ceil(2);
            ww = ww.div_ceil(2);
            total += conv(ch[i], ch[i], 3, hh * ww);
        }
    }
    let c = ch[n - 1];
    total += 2.0 * resnet(c, c, hh * ww) + transformer(c, tlayers[n - 1], hh * ww, cross[n - 1]);
    for (i, t) in cfg.up_block_types.iter().enumerate() {
        let r = n - 1 - i;
        let px = hh * ww;
        let prev = if i == 0 { ch[n - 1] } else { ch[r + 1] };
        let skip_in = ch[r.saturating_sub(1)];
        let count = layers[r] + 1;
        for j in 0..count {
            let skip = if j + 1 == count { skip_in } else { ch[r] };
            let cin = if j == 0 { prev } else { ch[r] };
            total += resnet(cin + skip, ch[r], px);
            if has_attn(t) {
                total += transformer(ch[r], tlayers[r], px, cross[r]);
            }
        }
        if i + 1 < n {
            hh *= 2;
            ww *= 2;
            total += conv(ch[r], ch[r], 3, hh * ww);
        }
    }
    total += conv(ch[0], cfg.out_channels, cfg.conv_out_kernel, h * w);
    Ok(total)
}

/// FLOPs of one forward pass of SD3's MMDiT on a single sample at latent size `h`×`w` with
/// `context_len` text tokens: per block the image and text streams' projections and
/// feed-forwards and the joint attention's two products over all tokens (the last block's
/// text stream stops after the attention's inputs); SD3.5's extra self-attention where
/// configured; the patch embedding, context embedding and output projection.
pub fn mmdit_flops(
    cfg: &super::sd3::transformer::Sd3TransformerConfig,
    h: usize,
    w: usize,
    context_len: usize,
) -> f64 {
    let p = cfg.patch_size.max(1);
    let (n, t) = ((h / p * (w / p)) as f64, context_len as f64);
    let d = cfg.inner_dim() as f64;
    let pc = (p * p) as f64;
    let mut total = 2.0 * n * cfg.in_channels as f64 * pc * d
        + 2.0 * t * cfg.joint_attention_dim as f64 * d
        + 2.0 * n * d * pc * cfg.out_channels() as f64;
    for i in 0..cfg.num_layers {
        let last = i + 1 == cfg.num_layers;
        // q, k, v, out and the 4× feed-forward: 4 + 8 = 12 D² multiply-adds per token.
        total += 2.0 * 12.0 * n * d * d;
        total += 2.0 * if last { 3.0 } else { 12.0 } * t * d * d;
        total += 2.0 * 2.0 * (n + t) * (n + t) * d;
        if cfg.dual_attention_layers.contains(&i) {
            total += 2.0 * 4.0 * n * d * d + 2.0 * 2.0 * n * n * d;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::loader::ModelDir;

    #[test]
    fn sdxl_at_1024_is_about_six_tflop() -> anyhow::Result<()> {
        // Published estimates put one SDXL UNet evaluation at 1024² near 6 TFLOP.
        let cfg: UNetConfig = ModelDir::open("synthetic:sdxl")?.config("unet")?;
        let f = unet_flops(&cfg, 128, 128, 77)?;
        assert!((5.0e12..7.5e12).contains(&f), "{f:e}");
        // Four times the pixels: more than four times the FLOPs (attention is quadratic).
        let big = unet_flops(&cfg, 256, 256, 77)?;
        assert!(big > 4.0 * f && big < 6.0 * f, "{big:e} vs {f:e}");
        Ok(())
    }
}
