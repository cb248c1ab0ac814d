//! Live previews: a cheap picture of a latent without the VAE. The latent is averaged down (or
//! enlarged) to 256 pixels on its long side and each cell's channels (four, or SD3's sixteen)
//! are mapped to RGB by a fixed linear fit of the VAE decoder's colours (the per-channel factors
//! the community previewers use for SD 1.x/2.x, SDXL and SD3 latents). It shows composition and
//! colour while a job runs; it is not the decoded image.

use anyhow::{bail, Result};
use candle_core::{CpuStorage, DType, Storage, Tensor};

use tessera_core::spec::{BitDepth, PIXELS_PER_LATENT};

use crate::assemble::png_bytes_from;

/// Long side of a preview in pixels: previews are this large, or the picture's own size when
/// that is smaller (a latent cell is 8 pixels, so a small latent is enlarged).
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

/// An 8-bit PNG of `latent` (1, 4, h, w), or SD3's (1, 16, h, w), `side` pixels on its longer
/// side or the picture's size (8 pixels per latent cell) when that is smaller: each pixel the
/// mean of the latent cells it covers (or, enlarged, the cell it lies in), mapped to RGB in
/// [-1, 1] and then to 0..255.
pub fn preview_png(latent: &Tensor, sdxl: bool, side: usize) -> Result<Vec<u8>> {
    let (b, c, h, w) = latent.dims4()?;
    let (factors, bias): (&[[f32; 3]], [f32; 3]) = match (c, sdxl) {
        (16, _) => (&SD3_FACTORS, SD3_BIAS),
        (4, true) => (&SDXL_FACTORS, [0.0; 3]),
        (4, false) => (&SD_FACTORS, [0.0; 3]),
        _ => (&[], [0.0; 3]),
    };
    if b != 1 || factors.is_empty() || h == 0 || w == 0 || side == 0 {
        bail!(
            "a preview needs a (1, 4, h, w) or (1, 16, h, w) latent and a positive size, got {:?}",
            latent.dims()
        );
    }
    let (ph, pw) = preview_size(h, w, side);
    let (rows, cols) = (cells_of(h, ph), cells_of(w, pw));
    // A stage latent (16 MB at 8K) is read where it lies, not copied out for every step's
    // 256-pixel picture; anything else is converted first.
    let (storage, layout) = latent.storage_and_layout();
    let owned;
    let data: &[f32] = match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((from, to))) => &v[from..to],
        _ => {
            owned = latent
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            &owned
        }
    };
    // Per pixel row: each channel's latent rows summed once across the whole width (a
    // straight pass over memory), then each pixel's columns of those sums.
    let mut rgb = Vec::with_capacity(3 * ph * pw);
    let mut sums = vec![0.0f32; c * w];
    for ys in &rows {
        sums.fill(0.0);
        for (ch, sum) in sums.chunks_exact_mut(w).enumerate() {
            let plane = &data[ch * h * w..(ch + 1) * h * w];
            for y in ys.clone() {
                for (s, v) in sum.iter_mut().zip(&plane[y * w..(y + 1) * w]) {
                    *s += v;
                }
            }
        }
        for xs in &cols {
            let n = (ys.len() * xs.len()) as f32;
            let mut v = bias;
            for (sum, f) in sums.chunks_exact(w).zip(factors) {
                let mean = sum[xs.clone()].iter().sum::<f32>() / n;
                for k in 0..3 {
                    v[k] += mean * f[k];
                }
            }
            rgb.extend(v.map(|v| ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8));
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

/// (height, width) of the preview of an `h`×`w` latent: `side` on the longer side, or the
/// picture's own size when smaller; the shorter side keeps the aspect ratio.
fn preview_size(h: usize, w: usize, side: usize) -> (usize, usize) {
    let long = h.max(w);
    let out = side.min(long * PIXELS_PER_LATENT as usize);
    let scale = |d: usize| ((d * out + long / 2) / long).max(1);
    (scale(h), scale(w))
}

/// The latent cells behind each of `n` preview pixels along an axis of `len` cells: whole
/// blocks when shrinking, the one cell a pixel lies in when enlarging.
fn cells_of(len: usize, n: usize) -> Vec<std::ops::Range<usize>> {
    (0..n)
        .map(|i| {
            let start = i * len / n;
            start..((i + 1) * len / n).max(start + 1)
        })
        .collect()
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

    fn dims(png: &[u8]) -> (u32, u32, Vec<u8>) {
        let mut reader = png::Decoder::new(std::io::Cursor::new(png))
            .read_info()
            .unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
        let info = reader.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    #[test]
    fn previews_are_256_pixels_on_the_long_side_or_the_picture_when_smaller() -> Result<()> {
        // (latent h, w) -> preview (width, height): a 256x256 picture, a 128x128 one (shown at
        // its own size), a 4096x2048 one and a 384x256 one.
        for ((h, w), want) in [
            ((32, 32), (256, 256)),
            ((16, 16), (128, 128)),
            ((256, 512), (256, 128)),
            ((32, 48), (256, 171)),
            ((8, 8), (64, 64)),
        ] {
            let z = Tensor::zeros((1, 4, h, w), DType::F32, &Device::Cpu)?;
            let (pw, ph, px) = dims(&preview_png(&z, true, PREVIEW_SIDE)?);
            assert_eq!((pw, ph), want, "latent {h}x{w}");
            // A zero latent is mid-grey: 0 maps to 127.5, rounded to 128.
            assert!(px.iter().all(|&v| v == 128));
        }
        Ok(())
    }

    #[test]
    fn previews_average_the_cells_they_cover_with_the_fitted_colours() -> Result<()> {
        // Channel 0 alone at +1 gives each family's first row of factors, enlarged or not.
        let ones = Tensor::ones((1, 1, 8, 8), DType::F32, &Device::Cpu)?;
        let rest = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu)?;
        let z = Tensor::cat(&[&ones, &rest], 1)?;
        for (sdxl, row) in [(true, SDXL_FACTORS[0]), (false, SD_FACTORS[0])] {
            let (w, h, px) = dims(&preview_png(&z, sdxl, 256)?);
            assert_eq!((w, h), (64, 64));
            let want: Vec<u8> = row
                .iter()
                .map(|v| ((v + 1.0) * 127.5).round() as u8)
                .collect();
            assert!(px.chunks(3).all(|p| p == &want[..]));
        }
        // Shrinking averages: a 512x512 latent whose left half is +1 in channel 0 gives a
        // 256-pixel preview whose left half has the factors and right half is grey.
        let half = Tensor::cat(
            &[
                Tensor::ones((1, 1, 512, 256), DType::F32, &Device::Cpu)?,
                Tensor::zeros((1, 1, 512, 256), DType::F32, &Device::Cpu)?,
            ],
            3,
        )?;
        let z = Tensor::cat(
            &[
                &half,
                &Tensor::zeros((1, 3, 512, 512), DType::F32, &Device::Cpu)?,
            ],
            1,
        )?;
        let (w, _, px) = dims(&preview_png(&z, true, 256)?);
        assert_eq!(w, 256);
        let r = ((SDXL_FACTORS[0][0] + 1.0) * 127.5).round() as u8;
        assert_eq!((px[0], px[3 * 127], px[3 * 128]), (r, r, 128));
        assert!(preview_png(
            &Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu)?,
            true,
            64
        )
        .is_err());
        Ok(())
    }

    #[test]
    fn sd3_previews_map_sixteen_channels_with_the_bias() -> Result<()> {
        // A zero 16-channel latent is the bias alone; channel 15 at +1 adds its row.
        let zero = Tensor::zeros((1, 16, 8, 8), DType::F32, &Device::Cpu)?;
        let (_, _, px) = dims(&preview_png(&zero, false, 64)?);
        let grey: Vec<u8> = SD3_BIAS
            .iter()
            .map(|v| ((v + 1.0) * 127.5).round() as u8)
            .collect();
        assert!(px.chunks(3).all(|p| p == &grey[..]));
        let last = Tensor::cat(
            &[
                Tensor::zeros((1, 15, 8, 8), DType::F32, &Device::Cpu)?,
                Tensor::ones((1, 1, 8, 8), DType::F32, &Device::Cpu)?,
            ],
            1,
        )?;
        let (_, _, px) = dims(&preview_png(&last, true, 64)?);
        let want: Vec<u8> = (0..3)
            .map(|k| ((SD3_BIAS[k] + SD3_FACTORS[15][k] + 1.0) * 127.5).round() as u8)
            .collect();
        assert_eq!(&px[..3], &want[..]);
        Ok(())
    }

    #[test]
    fn a_latent_read_in_place_previews_as_its_converted_copy() -> Result<()> {
        // Read in place (contiguous f32, also at an offset into its storage) or converted
        // first (a transposed view, an f16 tensor): the same picture.
        let z = Tensor::arange(0f32, 2.0 * 4.0 * 24.0 * 24.0, &Device::Cpu)?
            .affine(1e-3, -2.0)?
            .sin()?
            .reshape((2, 4, 24, 24))?;
        let second = z.narrow(0, 1, 1)?;
        let want = preview_png(&second.copy()?, true, 64)?;
        assert_eq!(preview_png(&second, true, 64)?, want);
        let transposed = second.transpose(2, 3)?.contiguous()?.transpose(2, 3)?;
        assert!(!transposed.is_contiguous());
        assert_eq!(preview_png(&transposed, true, 64)?, want);
        let half = second.to_dtype(DType::F16)?;
        let want_half = preview_png(&half.to_dtype(DType::F32)?, true, 64)?;
        assert_eq!(preview_png(&half, true, 64)?, want_half);
        Ok(())
    }
}
