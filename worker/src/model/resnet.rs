//! diffusers' `ResnetBlock2D`, `Downsample2D` and `Upsample2D`, with convs whose dilation a
//! hook can change per call (FreeScale's re-dilation).

use super::norm::GroupNorm;
use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder};

use crate::hooks::UNetHooks;

/// A conv that remembers its parameter path so `UNetHooks::dilation` can address it.
#[derive(Debug, Clone)]
pub struct HookedConv2d {
    conv: Conv2d,
    path: String,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl HookedConv2d {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let path = vb.prefix();
        let cfg = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        let conv = candle_nn::conv2d(in_channels, out_channels, kernel, cfg, vb)?;
        Ok(Self {
            conv,
            path,
            kernel,
            stride,
            padding,
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn forward(&self, x: &Tensor, hooks: &UNetHooks) -> Result<Tensor> {
        let dilation = hooks.dilation_of(&self.path);
        if dilation == 0 {
            candle_core::bail!("dilation 0 requested for conv {}", self.path);
        }
        if dilation == 1 || self.kernel == 1 {
            return self.conv.forward(x);
        }
        // FreeScale sets padding = dilation on its 3×3 convs, which keeps the output size;
        // generalised as padding·dilation (the same for the usual padding 1).
        let y = x.conv2d(
            self.conv.weight(),
            self.padding * dilation,
            self.stride,
            dilation,
            1,
        )?;
        match self.conv.bias() {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
            None => Ok(y),
        }
    }
}

/// diffusers' `ResnetBlock2D` with the UNet's settings (time_embedding_norm "default", SiLU).
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: HookedConv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: HookedConv2d,
    conv_shortcut: Option<HookedConv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f64,
        output_scale_factor: f64,
    ) -> Result<Self> {
        let norm1 = super::norm::group_norm(groups, in_channels, eps, vb.pp("norm1"))?;
        let conv1 = HookedConv2d::new(in_channels, out_channels, 3, 1, 1, vb.pp("conv1"))?;
        let time_emb_proj = match temb_channels {
            Some(t) => Some(candle_nn::linear(t, out_channels, vb.pp("time_emb_proj"))?),
            None => None,
        };
        let norm2 = super::norm::group_norm(groups, out_channels, eps, vb.pp("norm2"))?;
        let conv2 = HookedConv2d::new(out_channels, out_channels, 3, 1, 1, vb.pp("conv2"))?;
        let conv_shortcut = if in_channels != out_channels {
            Some(HookedConv2d::new(
                in_channels,
                out_channels,
                1,
                1,
                0,
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            output_scale_factor,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>, hooks: &UNetHooks) -> Result<Tensor> {
        let h = self.norm1.forward_silu(x)?;
        let mut h = self.conv1.forward(&h, hooks)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&temb.silu()?)?.unsqueeze(2)?.unsqueeze(3)?;
            h = h.broadcast_add(&t)?;
        }
        let h = self.norm2.forward_silu(&h)?;
        let h = self.conv2.forward(&h, hooks)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x, hooks)?,
            None => x.clone(),
        };
        let out = (shortcut + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// diffusers' `Downsample2D` with `use_conv=True`: a stride-2 3×3 conv named `conv`.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: HookedConv2d,
    padding: usize,
}

impl Downsample2D {
    pub fn new(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        let conv = HookedConv2d::new(channels, channels, 3, 2, padding, vb.pp("conv"))?;
        Ok(Self { conv, padding })
    }

    pub fn forward(&self, x: &Tensor, hooks: &UNetHooks) -> Result<Tensor> {
        // diffusers pads right/bottom by one when the conv has no padding of its own.
        let x = if self.padding == 0 {
            x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?
        } else {
            x.clone()
        };
        self.conv.forward(&x, hooks)
    }
}

/// diffusers' `Upsample2D` with `use_conv=True`: nearest resize then a 3×3 conv.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: HookedConv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        let conv = HookedConv2d::new(channels, channels, 3, 1, 1, vb.pp("conv"))?;
        Ok(Self { conv })
    }

    /// `size` is the skip connection's spatial size (diffusers' `upsample_size`); nearest
    /// resizing to it equals the ×2 resize whenever the size is even.
    pub fn forward(
        &self,
        x: &Tensor,
        size: Option<(usize, usize)>,
        hooks: &UNetHooks,
    ) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        let x = x.upsample_nearest2d(th, tw)?;
        self.conv.forward(&x, hooks)
    }
}
