//! Pictures given on the command line: `--init-image` and `--mask` PNGs, checked and turned
//! into tensors. Every failure names the flag and the file.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

/// 8-bit pixels of a PNG as (height, width, channels) with channels 1 (grey) or 3 (RGB);
/// alpha is dropped, 16-bit samples are reduced to 8.
fn read_file(flag: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag} {}: cannot open the file", path.display()))
}

/// Decodes PNG `bytes`; `path` only names the source in messages (a file, or a submitted job's
/// field).
fn read_png(flag: &str, path: &Path, bytes: &[u8]) -> Result<(usize, usize, usize, Vec<u8>)> {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().with_context(|| {
        format!(
            "{flag} {}: not a readable PNG (give a PNG file)",
            path.display()
        )
    })?;
    let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
    let info = reader
        .next_frame(&mut buf)
        .with_context(|| format!("{flag} {}: the PNG is truncated or corrupt", path.display()))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let src_channels = info.color_type.samples();
    let bytes = &buf[..info.buffer_size()];
    let (channels, data) = match info.color_type {
        png::ColorType::Grayscale => (1, bytes.to_vec()),
        png::ColorType::GrayscaleAlpha => (1, bytes.chunks_exact(2).map(|p| p[0]).collect()),
        png::ColorType::Rgb => (3, bytes.to_vec()),
        png::ColorType::Rgba => (
            3,
            bytes
                .chunks_exact(4)
                .flat_map(|p| [p[0], p[1], p[2]])
                .collect(),
        ),
        other => bail!(
            "{flag} {}: colour type {other:?} with {src_channels} samples is not supported: save it as RGB or greyscale",
            path.display()
        ),
    };
    if w < 8 || h < 8 {
        bail!(
            "{flag} {}: {w}x{h} is too small (at least 8x8 pixels)",
            path.display()
        );
    }
    Ok((h, w, channels, data))
}

/// Aspect ratios must agree within 1%: the picture is resized, not cropped, to each stage.
/// `target` is the size the picture is resized to, which `what` names for the user.
fn check_aspect(
    flag: &str,
    path: &Path,
    (h, w): (usize, usize),
    (what, target): (&str, (u32, u32)),
) -> Result<()> {
    let got = w as f64 / h as f64;
    let want = f64::from(target.0) / f64::from(target.1);
    if (got / want - 1.0).abs() > 0.01 {
        bail!(
            "{flag} {} is {w}x{h} (aspect {got:.3}) but {what} is {}x{} (aspect {want:.3}): \
             crop the picture or pick a --size with its aspect ratio",
            path.display(),
            target.0,
            target.1
        );
    }
    Ok(())
}

/// `--init-image`: (1, 3, H, W) in [-1, 1]; `target` is the (width, height) of the first
/// stage, which the picture is resized to.
pub fn read_init_image(path: &Path, target: (u32, u32)) -> Result<Tensor> {
    decode_init_image(path, &read_file("--init-image", path)?, target)
}

/// [`read_init_image`] of PNG bytes already read; `path` names them in messages.
pub fn decode_init_image(path: &Path, bytes: &[u8], target: (u32, u32)) -> Result<Tensor> {
    let (h, w, c, data) = read_png("--init-image", path, bytes)?;
    let what = "the first stage, which it is resized to,";
    check_aspect("--init-image", path, (h, w), (what, target))?;
    let mut planar = vec![0f32; 3 * h * w];
    for y in 0..h {
        for x in 0..w {
            for ch in 0..3 {
                let v = data[(y * w + x) * c + if c == 1 { 0 } else { ch }];
                planar[(ch * h + y) * w + x] = f32::from(v) / 127.5 - 1.0;
            }
        }
    }
    Ok(Tensor::from_vec(planar, (1, 3, h, w), &Device::Cpu)?)
}

/// `--mask`: (H, W) with 1 where any channel is non-zero (the reference binarises the same
/// way), 0 elsewhere.
pub fn read_mask(path: &Path, target: (u32, u32)) -> Result<Tensor> {
    decode_mask(path, &read_file("--mask", path)?, target)
}

/// [`read_mask`] of PNG bytes already read; `path` names them in messages.
pub fn decode_mask(path: &Path, bytes: &[u8], target: (u32, u32)) -> Result<Tensor> {
    let (h, w, c, data) = read_png("--mask", path, bytes)?;
    check_aspect("--mask", path, (h, w), ("the render", target))?;
    let mask: Vec<f32> = data
        .chunks_exact(c)
        .map(|p| if p.iter().any(|&v| v != 0) { 1.0 } else { 0.0 })
        .collect();
    Ok(Tensor::from_vec(mask, (h, w), &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, w: u32, h: u32, color: png::ColorType, data: &[u8]) {
        let f = std::fs::File::create(path).unwrap();
        let mut enc = png::Encoder::new(std::io::BufWriter::new(f), w, h);
        enc.set_color(color);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header().unwrap().write_image_data(data).unwrap();
    }

    #[test]
    fn images_and_masks_read_and_bad_ones_are_named() {
        let dir = std::env::temp_dir().join(format!("tessera-img-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rgb = dir.join("rgb.png");
        let mut px = vec![0u8; 16 * 16 * 3];
        px[0] = 255;
        write_png(&rgb, 16, 16, png::ColorType::Rgb, &px);
        let t = read_init_image(&rgb, (512, 512)).unwrap();
        assert_eq!(t.dims(), &[1, 3, 16, 16]);
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!((v[0], v[1]), (1.0, -1.0));

        let grey = dir.join("mask.png");
        let mut m = vec![0u8; 16 * 8];
        m[3] = 9;
        write_png(&grey, 16, 8, png::ColorType::Grayscale, &m);
        let mask = read_mask(&grey, (1024, 512)).unwrap();
        assert_eq!(mask.dims(), &[8, 16]);
        assert_eq!(mask.sum_all().unwrap().to_scalar::<f32>().unwrap(), 1.0);

        let err = read_mask(&grey, (512, 512)).unwrap_err().to_string();
        assert!(err.contains("--mask") && err.contains("aspect"), "{err}");
        let junk = dir.join("junk.png");
        std::fs::write(&junk, b"not a png").unwrap();
        let err = read_init_image(&grey, (512, 512)).unwrap_err().to_string();
        assert!(
            err.contains("but the first stage, which it is resized to, is 512x512"),
            "{err}"
        );
        let err = read_init_image(&junk, (512, 512)).unwrap_err().to_string();
        assert!(err.contains("--init-image") && err.contains("PNG"), "{err}");
        let err = read_init_image(&dir.join("absent.png"), (512, 512))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot open"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
