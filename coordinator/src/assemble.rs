//! Writing the finished picture: an 8-bit RGB PNG whose metadata carries the generation
//! parameters, written to a temporary name and renamed so a crash never leaves half a file.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

/// Writes `image` (3, H, W) u8 as a PNG with `parameters` in an iTXt chunk (UTF-8, so any
/// prompt survives) under the key `parameters`, the key most image viewers show.
pub fn write_png(path: &Path, image: &Tensor, parameters: &str) -> Result<()> {
    let bytes = png_bytes(image, parameters)?;
    let tmp = partial_path(path);
    if let Err(e) = fs::write(&tmp, &bytes) {
        let _ = fs::remove_file(&tmp);
        return Err(anyhow::Error::new(e).context(format!("writing {}", tmp.display())));
    }
    fs::rename(&tmp, path).with_context(|| format!("cannot move {} into place", tmp.display()))
}

/// The PNG of [`write_png`] in memory (the cluster keeps finished images in the store).
pub fn png_bytes(image: &Tensor, parameters: &str) -> Result<Vec<u8>> {
    let (c, h, w) = image.dims3().context("image tensor must be (3, H, W)")?;
    if c != 3 || image.dtype() != DType::U8 {
        bail!(
            "image tensor must be (3, H, W) u8, got {:?} {:?}",
            image.dims(),
            image.dtype()
        );
    }
    let rgb: Vec<u8> = image.permute((1, 2, 0))?.flatten_all()?.to_vec1()?;
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w as u32, h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.add_itxt_chunk("parameters".to_string(), parameters.to_string())?;
        enc.add_itxt_chunk("Software".to_string(), software())?;
        let mut writer = enc.write_header()?;
        writer.write_image_data(&rgb)?;
        writer.finish()?;
    }
    Ok(out)
}

pub fn software() -> String {
    format!("tessera {}", env!("CARGO_PKG_VERSION"))
}

/// `dir/name.partial` next to the target, so the final rename stays on one filesystem.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn writes_a_png_with_parameters() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("tessera-png-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let path = dir.join("x.png");
        let data: Vec<u8> = (0..3 * 4 * 5).map(|i| i as u8).collect();
        let img = Tensor::from_vec(data, (3, 4, 5), &Device::Cpu)?;
        write_png(&path, &img, "prompt: é\nseed: 7")?;
        let dec = png::Decoder::new(std::io::BufReader::new(fs::File::open(&path)?));
        let mut reader = dec.read_info()?;
        let info = reader.info();
        assert_eq!((info.width, info.height), (5, 4));
        let text: Vec<String> = info
            .utf8_text
            .iter()
            .filter(|c| c.keyword == "parameters")
            .map(|c| c.get_text().unwrap())
            .collect();
        assert_eq!(text, vec!["prompt: é\nseed: 7".to_string()]);
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut buf)?;
        // pixel (row 0, col 1) = channels at flat offsets 1, 21, 41
        assert_eq!(&buf[3..6], &[1, 21, 41]);
        assert!(!partial_path(&path).exists());
        fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
