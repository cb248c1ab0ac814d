//! GroupNorm as diffusers computes it (f32 statistics for half inputs, biased variance), with
//! its reductions shaped for GPUs.
//!
//! candle_nn's GroupNorm reduces each (sample, group) in one row: 64 rows of up to ~650k
//! elements in an SDXL UNet, which leaves most of a GPU idle. Here each channel is summed first
//! (B·C rows, hundreds to thousands) and the per-channel sums are then added within groups; the
//! affine part is folded into one per-channel scale and shift.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    channels: usize,
    eps: f64,
}

/// Reads `weight` and `bias` (ones and zeros when a backend makes them up), like
/// `candle_nn::group_norm`.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        candle_core::bail!("GroupNorm: {channels} channels do not split into {groups} groups");
    }
    Ok(GroupNorm {
        weight: vb.get_with_hints(channels, "weight", Init::Const(1.))?,
        bias: vb.get_with_hints(channels, "bias", Init::Const(0.))?,
        groups,
        channels,
        eps,
    })
}

impl GroupNorm {
    /// `silu(self.forward(x))`, fused into the normalisation where the GPU kernel applies.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        if crate::gpu::group_norm::applies(x, &self.weight) {
            let (w, b) = (&self.weight, &self.bias);
            return crate::gpu::group_norm::group_norm(x, w, b, self.groups, self.eps, true);
        }
        self.forward(x)?.silu()
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if crate::gpu::group_norm::applies(x, &self.weight) {
            let (w, b) = (&self.weight, &self.bias);
            return crate::gpu::group_norm::group_norm(x, w, b, self.groups, self.eps, false);
        }
        let dims = x.dims();
        if dims.len() < 3 || dims[1] != self.channels {
            candle_core::bail!(
                "GroupNorm over {} channels got a tensor of shape {dims:?}",
                self.channels
            );
        }
        let (b, c, g) = (dims[0], self.channels, self.groups);
        let m: usize = dims[2..].iter().product();
        let cg = c / g;
        let count = (cg * m) as f64;
        let xf = x.to_dtype(DType::F32)?.reshape((b, c, m))?;
        // (b, c, 1) per-channel values from (b, g, 1) per-group ones.
        let per_channel =
            |t: &Tensor| -> Result<Tensor> { t.broadcast_as((b, g, cg))?.reshape((b, c, 1)) };
        let group_sum = |t: &Tensor| -> Result<Tensor> {
            t.sum_keepdim(2)?.reshape((b, g, cg))?.sum_keepdim(2)
        };
        let mean = (group_sum(&xf)? / count)?;
        let centred = xf.broadcast_sub(&per_channel(&mean)?)?;
        let var = (group_sum(&centred.sqr()?)? / count)?;
        let rstd = (var + self.eps)?.sqrt()?.recip()?;
        let w = self.weight.to_dtype(DType::F32)?.reshape((1, c, 1))?;
        let bias = self.bias.to_dtype(DType::F32)?.reshape((1, c, 1))?;
        let scale = per_channel(&rstd)?.broadcast_mul(&w)?;
        centred
            .broadcast_mul(&scale)?
            .broadcast_add(&bias)?
            .to_dtype(x.dtype())?
            .reshape(dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    #[test]
    fn matches_candle_group_norm() -> Result<()> {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let ours = group_norm(4, 12, 1e-5, vb.pp("n"))?;
        let weight = Tensor::randn(1f32, 0.3, 12, &dev)?;
        let bias = Tensor::randn(0f32, 0.3, 12, &dev)?;
        let ours = GroupNorm {
            weight: weight.clone(),
            bias: bias.clone(),
            ..ours
        };
        let theirs = candle_nn::GroupNorm::new(weight, bias, 12, 4, 1e-5)?;
        let x = (Tensor::randn(0f32, 2.0, (2, 12, 5, 7), &dev)? + 3.0)?;
        let d = (ours.forward(&x)? - theirs.forward(&x)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        let half = ours.forward(&x.to_dtype(DType::F16)?)?;
        assert_eq!(half.dtype(), DType::F16);
        assert!(group_norm(5, 12, 1e-5, vb.pp("m")).is_err());
        Ok(())
    }

    #[test]
    fn emulated_fused_norm_and_silu_match_the_composition() -> Result<()> {
        let dev = Device::Cpu;
        let norm = GroupNorm {
            weight: Tensor::randn(1f32, 0.3, 32, &dev)?.to_dtype(DType::F16)?,
            bias: Tensor::randn(0f32, 0.3, 32, &dev)?.to_dtype(DType::F16)?,
            groups: 8,
            channels: 32,
            eps: 1e-5,
        };
        let x = (Tensor::randn(0f32, 2.0, (2, 32, 6, 5), &dev)? + 1.0)?.to_dtype(DType::F16)?;
        let want = (norm.forward(&x)?, norm.forward(&x)?.silu()?);
        let _emu = crate::gpu::emulator::enable();
        let got = (norm.forward(&x)?, norm.forward_silu(&x)?);
        for (g, w) in [(&got.0, &want.0), (&got.1, &want.1)] {
            assert_eq!(g.dtype(), DType::F16);
            let d = (g.to_dtype(DType::F32)? - w.to_dtype(DType::F32)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(d < 1e-2, "{d}");
        }
        Ok(())
    }
}
