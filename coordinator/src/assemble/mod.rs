//! Writing the finished picture: a PNG (8 or 16 bits per sample) whose metadata carries the
//! generation parameters, streamed row by row as the tiled decode finishes them, under
//! `NAME.partial` and renamed when complete, so a crash never leaves half a file and the
//! picture is never held whole.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use tessera_core::spec::BitDepth;

use crate::engine::vae::RowSink;

pub mod dzi;

/// [-1, 1] to an 8-bit sample exactly as [`crate::engine::to_rgb8`] (diffusers' image
/// processor): `(x / 2 + 0.5)` clamped to [0, 1], times 255, rounded half away from zero.
pub fn sample_u8(x: f32) -> u8 {
    ((x / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8
}

/// [-1, 1] to a 16-bit sample, the same mapping onto 0..=65535.
pub fn sample_u16(x: f32) -> u16 {
    ((x / 2.0 + 0.5).clamp(0.0, 1.0) * 65535.0).round() as u16
}

/// Interleaved RGB f32 rows to PNG scanline bytes (16-bit samples big-endian, as PNG stores
/// them).
pub fn scanline_bytes(rows: &[f32], depth: BitDepth, out: &mut Vec<u8>) {
    out.clear();
    match depth {
        BitDepth::Eight => out.extend(rows.iter().map(|&v| sample_u8(v))),
        BitDepth::Sixteen => {
            out.reserve(rows.len() * 2);
            for &v in rows {
                out.extend_from_slice(&sample_u16(v).to_be_bytes());
            }
        }
    }
}

fn encoder<W: Write>(
    w: W,
    width: u32,
    height: u32,
    depth: BitDepth,
    parameters: &str,
) -> Result<png::Encoder<'static, W>> {
    let mut enc = png::Encoder::new(w, width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(match depth {
        BitDepth::Eight => png::BitDepth::Eight,
        BitDepth::Sixteen => png::BitDepth::Sixteen,
    });
    enc.add_itxt_chunk("parameters".to_string(), parameters.to_string())?;
    enc.add_itxt_chunk("Software".to_string(), software())?;
    Ok(enc)
}

/// The file under the PNG stream: shared so it can be flushed and synced after the PNG
/// encoder (which owns its writer) has finished.
#[derive(Clone)]
struct SharedFile(Arc<Mutex<BufWriter<File>>>);

impl Write for SharedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

/// A PNG written row by row: rows go to `PATH.partial` as they come; [`PngRows::finish`]
/// checks that every row came, completes the file and renames it to `PATH`. Dropped
/// unfinished, it removes the partial file.
pub struct PngRows {
    path: PathBuf,
    tmp: PathBuf,
    file: SharedFile,
    stream: Option<png::StreamWriter<'static, SharedFile>>,
    depth: BitDepth,
    width: usize,
    height: usize,
    rows_written: usize,
    buf: Vec<u8>,
}

impl PngRows {
    pub fn create(
        path: &Path,
        width: usize,
        height: usize,
        depth: BitDepth,
        parameters: &str,
    ) -> Result<Self> {
        let tmp = partial_path(path);
        let f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let file = SharedFile(Arc::new(Mutex::new(BufWriter::with_capacity(1 << 20, f))));
        let enc = encoder(file.clone(), width as u32, height as u32, depth, parameters)?;
        let stream = enc.write_header()?.into_stream_writer()?;
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
            file,
            stream: Some(stream),
            depth,
            width,
            height,
            rows_written: 0,
            buf: Vec::new(),
        })
    }

    /// Completes the PNG and moves it into place.
    pub fn finish(mut self) -> Result<()> {
        if self.rows_written != self.height {
            bail!(
                "{}: {} of {} rows were written",
                self.path.display(),
                self.rows_written,
                self.height
            );
        }
        if let Some(s) = self.stream.take() {
            s.finish()?;
        }
        {
            let mut f = self.file.0.lock().unwrap_or_else(|p| p.into_inner());
            f.flush()?;
            f.get_ref().sync_all()?;
        }
        fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("cannot move {} into place", self.tmp.display()))?;
        self.rows_written = usize::MAX; // done: keep the file on drop
        Ok(())
    }
}

impl RowSink for PngRows {
    fn write_rows(&mut self, rows: &[f32], width: usize) -> std::io::Result<()> {
        let n = rows.len() / (3 * width.max(1));
        if width != self.width || self.rows_written + n > self.height {
            return Err(std::io::Error::other(format!(
                "{}: got {n} rows of {width} pixels after {} rows, the image is {}x{}",
                self.path.display(),
                self.rows_written,
                self.width,
                self.height
            )));
        }
        scanline_bytes(rows, self.depth, &mut self.buf);
        let stream = self
            .stream
            .as_mut()
            .ok_or_else(|| std::io::Error::other("the PNG is already finished"))?;
        stream.write_all(&self.buf)?;
        self.rows_written += n;
        Ok(())
    }
}

impl Drop for PngRows {
    fn drop(&mut self) {
        if self.rows_written != usize::MAX {
            drop(self.stream.take());
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Everything a finished picture is written to: the PNG, and a Deep Zoom pyramid beside it
/// when the spec asks for one (`--dzi`). Both take the same rows as they stream.
pub struct OutputFiles {
    png: PngRows,
    dzi: Option<dzi::DziRows>,
}

impl OutputFiles {
    /// `threshold`: the side above which `--dzi auto` builds a pyramid
    /// ([`dzi::AUTO_THRESHOLD`] unless a test says otherwise).
    pub fn create(
        path: &Path,
        spec: &tessera_core::spec::RenderSpec,
        parameters: &str,
        threshold: u32,
    ) -> Result<Self> {
        let (w, h) = (spec.width as usize, spec.height as usize);
        let png = PngRows::create(path, w, h, spec.output.bit_depth, parameters)?;
        let dzi = if spec.output.dzi.wanted(spec.width, spec.height, threshold) {
            Some(dzi::DziRows::create(path, w, h)?)
        } else {
            None
        };
        Ok(Self { png, dzi })
    }

    pub fn finish(self) -> Result<()> {
        if let Some(d) = self.dzi {
            d.finish()?;
        }
        self.png.finish()
    }
}

impl RowSink for OutputFiles {
    fn write_rows(&mut self, rows: &[f32], width: usize) -> std::io::Result<()> {
        self.png.write_rows(rows, width)?;
        if let Some(d) = &mut self.dzi {
            d.write_rows(rows, width)?;
        }
        Ok(())
    }
}

/// Writes `image` (3, H, W) u8 as an 8-bit PNG with `parameters` in an iTXt chunk (UTF-8, so
/// any prompt survives) under the key `parameters`, the key most image viewers show.
pub fn write_png(path: &Path, image: &Tensor, parameters: &str) -> Result<()> {
    let bytes = png_bytes(image, parameters)?;
    let tmp = partial_path(path);
    if let Err(e) = fs::write(&tmp, &bytes) {
        let _ = fs::remove_file(&tmp);
        return Err(anyhow::Error::new(e).context(format!("writing {}", tmp.display())));
    }
    fs::rename(&tmp, path).with_context(|| format!("cannot move {} into place", tmp.display()))
}

/// The PNG of a whole (3, H, W) u8 picture in memory, encoded in one piece: the reference the
/// streamed writer is tested against.
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
    png_bytes_from(&rgb, w, h, BitDepth::Eight, parameters)
}

/// A PNG in memory from scanline bytes (RGB, 8 or 16-bit big-endian samples), in one piece.
pub fn png_bytes_from(
    data: &[u8],
    width: usize,
    height: usize,
    depth: BitDepth,
    parameters: &str,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let enc = encoder(&mut out, width as u32, height as u32, depth, parameters)?;
        let mut writer = enc.write_header()?;
        writer.write_image_data(data)?;
        writer.finish()?;
    }
    Ok(out)
}

pub fn software() -> String {
    format!("tessera {}", env!("CARGO_PKG_VERSION"))
}

pub use tessera_core::partial::partial_path;

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
