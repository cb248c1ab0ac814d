//! diffusers' UNet blocks: `DownBlock2D` / `CrossAttnDownBlock2D`, `UNetMidBlock2DCrossAttn`
//! and `UpBlock2D` / `CrossAttnUpBlock2D` (one struct per direction; the cross-attention
//! variants just carry `attentions`).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::Transformer2DModel;
use super::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use crate::hooks::freeu::apply_freeu;
use crate::hooks::UNetHooks;

/// Settings shared by the blocks of one UNet.
#[derive(Debug, Clone, Copy)]
pub struct BlockSettings {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
    pub use_linear_projection: bool,
}

/// Transformer settings of a cross-attention block (absent for the plain variants).
#[derive(Debug, Clone, Copy)]
pub struct CrossAttnSettings {
    pub heads: usize,
    pub layers: usize,
    pub context_dim: usize,
}

fn attentions(
    vb: &VarBuilder,
    count: usize,
    channels: usize,
    cross: Option<CrossAttnSettings>,
    s: &BlockSettings,
) -> Result<Vec<Transformer2DModel>> {
    match cross {
        None => Ok(Vec::new()),
        Some(x) => (0..count)
            .map(|i| {
                Transformer2DModel::new(
                    vb.pp("attentions").pp(i),
                    channels,
                    x.heads,
                    x.layers,
                    x.context_dim,
                    s.groups,
                    s.use_linear_projection,
                )
            })
            .collect(),
    }
}

#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        layers: usize,
        add_downsample: bool,
        downsample_padding: usize,
        cross: Option<CrossAttnSettings>,
        s: &BlockSettings,
    ) -> Result<Self> {
        let resnets = (0..layers)
            .map(|i| {
                let cin = if i == 0 { in_channels } else { out_channels };
                ResnetBlock2D::new(
                    vb.pp("resnets").pp(i),
                    cin,
                    out_channels,
                    Some(s.temb_channels),
                    s.groups,
                    s.eps,
                    s.output_scale_factor,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = attentions(&vb, layers, out_channels, cross, s)?;
        let downsampler = if add_downsample {
            Some(Downsample2D::new(
                vb.pp("downsamplers").pp(0),
                out_channels,
                downsample_padding,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Returns the block output and the skip tensors it contributes (one per resnet, plus the
    /// downsampled output).
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        input_hw: (usize, usize),
        hooks: &mut UNetHooks,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut x = x.clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(&x, Some(temb), hooks)?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, context, input_hw, hooks)?;
            }
            skips.push(x.clone());
        }
        if let Some(d) = &self.downsampler {
            x = d.forward(&x, hooks)?;
            skips.push(x.clone());
        }
        Ok((x, skips))
    }
}

#[derive(Debug, Clone)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    /// `UNetMidBlock2DCrossAttn` with diffusers' default single layer: resnet, attn, resnet.
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        cross: CrossAttnSettings,
        s: &BlockSettings,
        output_scale_factor: f64,
    ) -> Result<Self> {
        let num_layers = 1;
        let resnets = (0..=num_layers)
            .map(|i| {
                ResnetBlock2D::new(
                    vb.pp("resnets").pp(i),
                    channels,
                    channels,
                    Some(s.temb_channels),
                    s.groups,
                    s.eps,
                    output_scale_factor,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = attentions(&vb, num_layers, channels, Some(cross), s)?;
        Ok(Self {
            resnets,
            attentions,
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        input_hw: (usize, usize),
        hooks: &mut UNetHooks,
    ) -> Result<Tensor> {
        let mut x = self.resnets[0].forward(x, Some(temb), hooks)?;
        for (attn, resnet) in self.attentions.iter().zip(self.resnets.iter().skip(1)) {
            x = attn.forward(&x, context, input_hw, hooks)?;
            x = resnet.forward(&x, Some(temb), hooks)?;
        }
        Ok(x)
    }
}

#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
    /// Position among the up blocks; FreeU acts on 0 and 1 (diffusers' `resolution_idx`).
    resolution_idx: usize,
}

impl UpBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        prev_output_channels: usize,
        out_channels: usize,
        layers: usize,
        add_upsample: bool,
        resolution_idx: usize,
        cross: Option<CrossAttnSettings>,
        s: &BlockSettings,
    ) -> Result<Self> {
        let resnets = (0..layers)
            .map(|i| {
                // The last resnet takes the skip from before the matching down block.
                let skip = if i == layers - 1 {
                    in_channels
                } else {
                    out_channels
                };
                let cin = if i == 0 {
                    prev_output_channels
                } else {
                    out_channels
                };
                ResnetBlock2D::new(
                    vb.pp("resnets").pp(i),
                    cin + skip,
                    out_channels,
                    Some(s.temb_channels),
                    s.groups,
                    s.eps,
                    s.output_scale_factor,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = attentions(&vb, layers, out_channels, cross, s)?;
        let upsampler = if add_upsample {
            Some(Upsample2D::new(vb.pp("upsamplers").pp(0), out_channels)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
            resolution_idx,
        })
    }

    pub fn num_resnets(&self) -> usize {
        self.resnets.len()
    }

    /// Consumes one skip per resnet from the end of `skips`; `upsample_size` is the spatial
    /// size of the next block's skips.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
        input_hw: (usize, usize),
        hooks: &mut UNetHooks,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let mut skip = match skips.pop() {
                Some(s) => s,
                None => candle_core::bail!(
                    "up block {}: ran out of skip connections",
                    self.resolution_idx
                ),
            };
            if let Some(freeu) = hooks.freeu {
                let (h, s) = apply_freeu(self.resolution_idx, &x, &skip, &freeu)?;
                x = h;
                skip = s;
            }
            x = Tensor::cat(&[&x, &skip], 1)?;
            x = resnet.forward(&x, Some(temb), hooks)?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, context, input_hw, hooks)?;
            }
        }
        if let Some(u) = &self.upsampler {
            x = u.forward(&x, upsample_size, hooks)?;
        }
        Ok(x)
    }
}
