//! Live previews: a cheap picture of a latent without the VAE. The latent is averaged down to
//! at most a few hundred cells a side and each cell's four channels are mapped to RGB by a
//! fixed linear fit of the VAE decoder's colours (the per-channel factors the community
//! previewers use for SD 1.x/2.x and SDXL latents). It shows composition and colour while a
//! job runs; it is not the decoded image.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use tessera_core::spec::BitDepth;

use crate::assemble::png_bytes_from;

/// Longest side of a preview in pixels, by default.
pub const PREVIEW_SIDE: usize = 256;

/// RGB contribution of each latent channel (rows: channels; columns: R, G, B), for latents as
/// the UNet sees them (scaled by the VAE's scaling factor).
const SD_FACTORS: [[f32; 3]; 4] = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
];
/// SD3's 16 channels, with a constant offset ([`SD3_BIAS`]).
const SD3_FACTORS: [[f32; 3]; 16] = [
    [-0.0922, -0.0175, 0.0749],
    [0.0311, 0.0633, 0.0954],
    [0.1994, 0.0927, 0.0458],
    [0.0856, 0.0339, 0.0902],
    [0.0587, 0.0272, -0.0496],
    [-0.0006, 0.1104, 0.0309],
    [0.0978, 0.0306, 0.0427],
    [-0.0042, 0.1038, 0.1358],
    [-0.0194, 0.0020, 0.0669],
    [-0.0488, 0.0130, -0.0268],
    [0.0922, 0.0988, 0.0951],
    [-0.0278, 0.0524, -0.0542],
    [0.0332, 0.0456, 0.0895],
    [-0.0069, -0.0030, -0.0810],
    [-0.0596, -0.0465, -0.0293],
    [-0.1448, -0.1463, -0.1189],
];
const SD3_BIAS: [f32; 3] = [0.2394, 0.2135, 0.1925];
const SDXL_FACTORS: [[f32; 3]; 4] = [
    [0.3920, 0.4054, 0.4549],
    [-0.2634, -0.0196, 0.0653],
    [0.0568, 0.1687, -0.0755],
    [-0.3112, -0.2359, -0.2076],
];

/// An 8-bit PNG of `latent` (1, 4, h, w), or SD3's (1, 16, h, w), at most `max_side` pixels
/// on its longer side: each pixel the mean of a block of latent cells, mapped to RGB in
/// [-1, 1] and then to 0..255.
pub fn preview_png(latent: &Tensor, sdxl: bool, max_side: usize) -> Result<Vec<u8>> {
    let (b, c, h, w) = latent.dims4()?;
    let (factors, bias): (&[[f32; 3]], [f32; 3]) = match (c, sdxl) {
        (16, _) => (&SD3_FACTORS, SD3_BIAS),
        (4, true) => (&SDXL_FACTORS, [0.0; 3]),
        (4, false) => (&SD_FACTORS, [0.0; 3]),
        _ => (&[], [0.0; 3]),
    };
    if b != 1 || factors.is_empty() || h == 0 || w == 0 || max_side == 0 {
        bail!(
            "a preview needs a (1, 4, h, w) or (1, 16, h, w) latent and a positive size, got {:?}",
            latent.dims()
        );
    }
    // Integer block size so every preview pixel averages the same number of cells.
    let block = h.max(w).div_ceil(max_side).max(1);
    let (ph, pw) = (h.div_ceil(block), w.div_ceil(block));
    let data = latent
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut sums = vec![0f32; c * ph * pw];
    let mut counts = vec![0u32; ph * pw];
    for ch in 0..c {
        let plane = &data[ch * h * w..(ch + 1) * h * w];
        for (y, row) in plane.chunks_exact(w).enumerate() {
            let out = &mut sums[(ch * ph + y / block) * pw..][..pw];
            for (x, &v) in row.iter().enumerate() {
                out[x / block] += v;
            }
        }
    }
    for y in 0..h {
        for x in 0..w {
            counts[(y / block) * pw + x / block] += 1;
        }
    }
    let mut rgb = Vec::with_capacity(3 * ph * pw);
    for (i, &n) in counts.iter().enumerate() {
        let mean = |ch: usize| sums[ch * ph * pw + i] / n as f32;
        let cells: Vec<f32> = (0..c).map(mean).collect();
        for k in 0..3 {
            let v: f32 = bias[k]
                + cells
                    .iter()
                    .zip(factors)
                    .map(|(c, f)| c * f[k])
                    .sum::<f32>();
            rgb.push(((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8);
        }
    }
    png_bytes_from(
        &rgb,
        pw,
        ph,
        BitDepth::Eight,
        "tessera preview (latent colours, not decoded)",
    )
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a viewer watching the
/// file never reads half a picture.
pub fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = crate::assemble::partial_path(path);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn previews_are_small_pngs_with_the_fitted_colours() -> Result<()> {
        // A 1024x512 latent: blocks of 4 cells give 256x128 pixels.
        let z = Tensor::zeros((1, 4, 512, 1024), DType::F32, &Device::Cpu)?;
        let png = preview_png(&z, true, 256)?;
        let decoder = png::Decoder::new(std::io::Cursor::new(&png));
        let mut reader = decoder.read_info()?;
        let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
        let info = reader.next_frame(&mut buf)?;
        assert_eq!((info.width, info.height), (256, 128));
        // A zero latent is mid-grey: 0 maps to 127.5, rounded to 128.
        assert!(buf[..info.buffer_size()].iter().all(|&v| v == 128));

        // Channel 0 alone at +1 gives SDXL's first row of factors.
        let ones = Tensor::ones((1, 1, 8, 8), DType::F32, &Device::Cpu)?;
        let rest = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu)?;
        let z = Tensor::cat(&[&ones, &rest], 1)?;
        for (sdxl, row) in [(true, SDXL_FACTORS[0]), (false, SD_FACTORS[0])] {
            let png = preview_png(&z, sdxl, 256)?;
            let mut reader = png::Decoder::new(std::io::Cursor::new(&png)).read_info()?;
            let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
            let info = reader.next_frame(&mut buf)?;
            assert_eq!((info.width, info.height), (8, 8));
            let want: Vec<u8> = row
                .iter()
                .map(|v| ((v + 1.0) * 127.5).round() as u8)
                .collect();
            assert_eq!(&buf[..3], &want[..]);
        }
        assert!(preview_png(
            &Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu)?,
            true,
            64
        )
        .is_err());
        Ok(())
    }
}
