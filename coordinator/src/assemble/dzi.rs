//! A Deep Zoom (DZI) pyramid built while the picture streams: `NAME.dzi`, the tiles
//! `NAME_files/LEVEL/COL_ROW.png` (254-pixel tiles, 1-pixel overlap, PNG), and
//! `NAME_viewer.html`, a self-contained page that pans and zooms the pyramid offline.
//!
//! The full-resolution level is cut from the rows as they arrive; each lower level is the 2×2
//! box average of the one above, computed a row pair at a time. Every level keeps only the
//! rows of its current tile row (plus the overlap), so the whole pyramid costs about
//! 256 rows × width × 3 bytes × 4/3, never the picture.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::{partial_path, sample_u8};
use crate::engine::vae::RowSink;

pub const TILE: usize = 254;
pub const OVERLAP: usize = 1;
/// Pictures wider or taller than this get a pyramid under `--dzi auto`.
pub const AUTO_THRESHOLD: u32 = 16384;

pub use tessera_core::spec::DziMode;

/// The highest level's index: level `max` is full size, level 0 is 1×1.
pub fn max_level(width: usize, height: usize) -> u32 {
    let m = width.max(height).max(1);
    usize::BITS - (m - 1).leading_zeros()
}

struct Level {
    index: u32,
    width: usize,
    height: usize,
    /// RGB rows from `first_row` on.
    rows: Vec<u8>,
    first_row: usize,
    received: usize,
    next_tile_row: usize,
    /// A row waiting for its partner before going to the level below.
    pending: Option<Vec<u8>>,
}

/// Writes the pyramid as rows arrive (8-bit RGB); [`DziRows::finish`] completes it.
pub struct DziRows {
    files: PathBuf,
    files_tmp: PathBuf,
    dzi: PathBuf,
    viewer: PathBuf,
    width: usize,
    height: usize,
    /// Full resolution first.
    levels: Vec<Level>,
    done: bool,
}

impl DziRows {
    /// A pyramid for `png_path` (`DIR/NAME.png` gives `DIR/NAME.dzi`, `DIR/NAME_files/`,
    /// `DIR/NAME_viewer.html`).
    pub fn create(png_path: &Path, width: usize, height: usize) -> Result<Self> {
        let stem = png_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into());
        let dir = png_path.parent().unwrap_or(Path::new("."));
        let files = dir.join(format!("{stem}_files"));
        let files_tmp = partial_path(&files);
        let _ = fs::remove_dir_all(&files_tmp);
        let top = max_level(width, height);
        let mut levels = Vec::new();
        let (mut w, mut h) = (width, height);
        for index in (0..=top).rev() {
            fs::create_dir_all(files_tmp.join(index.to_string()))
                .with_context(|| format!("creating {}", files_tmp.display()))?;
            levels.push(Level {
                index,
                width: w,
                height: h,
                rows: Vec::new(),
                first_row: 0,
                received: 0,
                next_tile_row: 0,
                pending: None,
            });
            w = w.div_ceil(2);
            h = h.div_ceil(2);
        }
        Ok(Self {
            files,
            files_tmp,
            dzi: dir.join(format!("{stem}.dzi")),
            viewer: dir.join(format!("{stem}_viewer.html")),
            width,
            height,
            levels,
            done: false,
        })
    }

    fn push_row(&mut self, k: usize, row: Vec<u8>) -> Result<()> {
        {
            let level = &mut self.levels[k];
            level.rows.extend_from_slice(&row);
            level.received += 1;
        }
        self.emit_ready(k)?;
        if k + 1 < self.levels.len() {
            match self.levels[k].pending.take() {
                None => self.levels[k].pending = Some(row),
                Some(above) => {
                    let w = self.levels[k].width;
                    let down = box_down(&above, Some(&row), w);
                    self.push_row(k + 1, down)?;
                }
            }
        }
        Ok(())
    }

    /// Writes every tile row of level `k` whose rows have all arrived.
    fn emit_ready(&mut self, k: usize) -> Result<()> {
        loop {
            let level = &self.levels[k];
            let r = level.next_tile_row;
            // Tile rows start every TILE rows; each reaches OVERLAP rows into its neighbours.
            if r * TILE >= level.height {
                return Ok(());
            }
            let y0 = (r * TILE).saturating_sub(OVERLAP);
            let y1 = ((r + 1) * TILE + OVERLAP).min(level.height);
            if level.received < y1 {
                return Ok(());
            }
            let dir = self.files_tmp.join(level.index.to_string());
            let row_bytes = level.width * 3;
            let mut c = 0;
            while c * TILE < level.width {
                let x0 = (c * TILE).saturating_sub(OVERLAP);
                let x1 = ((c + 1) * TILE + OVERLAP).min(level.width);
                let mut data = Vec::with_capacity((y1 - y0) * (x1 - x0) * 3);
                for y in y0..y1 {
                    let off = (y - level.first_row) * row_bytes;
                    data.extend_from_slice(&level.rows[off + x0 * 3..off + x1 * 3]);
                }
                let path = dir.join(format!("{c}_{r}.png"));
                write_tile(&path, &data, x1 - x0, y1 - y0)?;
                c += 1;
            }
            let level = &mut self.levels[k];
            level.next_tile_row += 1;
            // Keep the rows the next tile row shares (its overlap).
            let keep_from = ((r + 1) * TILE).saturating_sub(OVERLAP);
            if keep_from > level.first_row {
                let drop = (keep_from - level.first_row).min(level.rows.len() / row_bytes.max(1));
                level.rows.drain(..drop * row_bytes);
                level.first_row += drop;
            }
        }
    }

    /// Completes every level, writes `NAME.dzi` and the viewer, and moves the tiles into place.
    pub fn finish(mut self) -> Result<()> {
        for k in 0..self.levels.len() {
            if self.levels[k].received != self.levels[k].height {
                anyhow::bail!(
                    "deep zoom level {}: {} of {} rows arrived",
                    self.levels[k].index,
                    self.levels[k].received,
                    self.levels[k].height
                );
            }
            // An odd last row goes down alone.
            if let Some(row) = self.levels[k].pending.take() {
                if k + 1 < self.levels.len() {
                    let w = self.levels[k].width;
                    self.push_row(k + 1, box_down(&row, None, w))?;
                }
            }
        }
        let _ = fs::remove_dir_all(&self.files);
        fs::rename(&self.files_tmp, &self.files)
            .with_context(|| format!("moving {} into place", self.files.display()))?;
        let name = self
            .files
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let xml = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Image xmlns=\"http://schemas.microsoft.com/deepzoom/2008\" Format=\"png\" Overlap=\"{OVERLAP}\" TileSize=\"{TILE}\">\n  <Size Width=\"{}\" Height=\"{}\"/>\n</Image>\n",
            self.width, self.height
        );
        write_atomic(&self.dzi, xml.as_bytes())?;
        let html = viewer_html(&name, self.width, self.height);
        write_atomic(&self.viewer, html.as_bytes())?;
        self.done = true;
        Ok(())
    }
}

impl Drop for DziRows {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.files_tmp);
        }
    }
}

impl RowSink for DziRows {
    fn write_rows(&mut self, rows: &[f32], width: usize) -> std::io::Result<()> {
        if width != self.width {
            return Err(std::io::Error::other("deep zoom: row width changed"));
        }
        for row in rows.chunks(width * 3) {
            let bytes: Vec<u8> = row.iter().map(|&v| sample_u8(v)).collect();
            self.push_row(0, bytes)
                .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        }
        Ok(())
    }
}

/// The 2×2 box average of two RGB rows (`below` absent at an odd last row), rounded; an odd
/// last column averages its own pixels.
fn box_down(above: &[u8], below: Option<&[u8]>, width: usize) -> Vec<u8> {
    let w2 = width.div_ceil(2);
    let mut out = Vec::with_capacity(w2 * 3);
    for x in 0..w2 {
        for k in 0..3 {
            let mut sum = 0u32;
            let mut n = 0u32;
            for xx in [2 * x, 2 * x + 1] {
                if xx < width {
                    sum += u32::from(above[xx * 3 + k]);
                    n += 1;
                    if let Some(b) = below {
                        sum += u32::from(b[xx * 3 + k]);
                        n += 1;
                    }
                }
            }
            out.push(((sum + n / 2) / n) as u8);
        }
    }
    out
}

fn write_tile(path: &Path, rgb: &[u8], width: usize, height: usize) -> Result<()> {
    let f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(f), width as u32, height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header()?;
    w.write_image_data(rgb)?;
    w.finish()?;
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = partial_path(path);
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("moving {} into place", tmp.display()))
}

/// A page that shows the pyramid with no network and no libraries: a canvas, tiles loaded by
/// relative URL as the view needs them, drag to pan, wheel or buttons to zoom.
pub fn viewer_html(files_dir: &str, width: usize, height: usize) -> String {
    let top = max_level(width, height);
    let files = serde_json::to_string(files_dir).unwrap_or_else(|_| "\"\"".into());
    VIEWER
        .replace("__FILES__", &files)
        .replace("__WIDTH__", &width.to_string())
        .replace("__HEIGHT__", &height.to_string())
        .replace("__TOP__", &top.to_string())
        .replace("__TILE__", &TILE.to_string())
        .replace("__OVERLAP__", &OVERLAP.to_string())
}

const VIEWER: &str = r##"<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>tessera deep zoom</title>
<style>
html,body{margin:0;height:100%;background:#111;overflow:hidden;font:14px sans-serif}
canvas{display:block;width:100%;height:100%;cursor:grab}
#bar{position:fixed;top:8px;left:8px;display:flex;gap:4px}
#bar button{font-size:18px;width:36px;height:36px}
#info{position:fixed;bottom:8px;left:8px;color:#ccc}
</style></head>
<body><canvas id="c"></canvas>
<div id="bar"><button id="in" title="zoom in">+</button><button id="out" title="zoom out">&minus;</button><button id="fit" title="fit">&#9633;</button></div>
<div id="info"></div>
<script>
"use strict";
const FILES=__FILES__, W=__WIDTH__, H=__HEIGHT__, TOP=__TOP__, TILE=__TILE__, OV=__OVERLAP__;
const canvas=document.getElementById("c"), ctx=canvas.getContext("2d");
const cache=new Map();
let zoom=1, ox=0, oy=0; // screen = image * zoom + offset
function size(){canvas.width=innerWidth*devicePixelRatio;canvas.height=innerHeight*devicePixelRatio;}
function fit(){size();zoom=Math.min(canvas.width/W,canvas.height/H);ox=(canvas.width-W*zoom)/2;oy=(canvas.height-H*zoom)/2;draw();}
function tile(level,c,r){
  const key=level+"/"+c+"_"+r;
  let img=cache.get(key);
  if(!img){img=new Image();img.onload=draw;img.src=FILES+"/"+key+".png";cache.set(key,img);}
  return img;
}
function drawLevel(level,only){
  const s=Math.pow(2,level-TOP), lw=Math.ceil(W*s), lh=Math.ceil(H*s);
  const k=zoom/s; // screen pixels per level pixel
  const x0=Math.max(0,Math.floor(-ox/k)), y0=Math.max(0,Math.floor(-oy/k));
  const x1=Math.min(lw,Math.ceil((canvas.width-ox)/k)), y1=Math.min(lh,Math.ceil((canvas.height-oy)/k));
  let complete=true;
  for(let r=Math.floor(y0/TILE);r*TILE<y1;r++){
    for(let c=Math.floor(x0/TILE);c*TILE<x1;c++){
      const img=only?cache.get(level+"/"+c+"_"+r):tile(level,c,r);
      if(!img||!img.complete||!img.naturalWidth){complete=false;continue;}
      const tx=c*TILE-(c>0?OV:0), ty=r*TILE-(r>0?OV:0);
      ctx.drawImage(img,ox+tx*k,oy+ty*k,img.naturalWidth*k,img.naturalHeight*k);
    }
  }
  return complete;
}
function draw(){
  ctx.fillStyle="#111";ctx.fillRect(0,0,canvas.width,canvas.height);
  const want=Math.max(0,Math.min(TOP,TOP+Math.ceil(Math.log2(zoom))));
  // Coarser tiles already loaded fill in while the sharp ones arrive.
  for(let l=Math.max(0,want-4);l<want;l++) drawLevel(l,true);
  drawLevel(want,false);
  document.getElementById("info").textContent=W+"\u00d7"+H+" \u00b7 "+(zoom*100).toPrecision(3)+"% \u00b7 level "+want+"/"+TOP;
}
function zoomAt(f,x,y){const z=Math.max(0.001,Math.min(64,zoom*f));f=z/zoom;ox=x-(x-ox)*f;oy=y-(y-oy)*f;zoom=z;draw();}
let drag=null;
canvas.addEventListener("mousedown",e=>{drag=[e.clientX,e.clientY];canvas.style.cursor="grabbing";});
addEventListener("mouseup",()=>{drag=null;canvas.style.cursor="grab";});
addEventListener("mousemove",e=>{if(!drag)return;ox+=(e.clientX-drag[0])*devicePixelRatio;oy+=(e.clientY-drag[1])*devicePixelRatio;drag=[e.clientX,e.clientY];draw();});
canvas.addEventListener("wheel",e=>{e.preventDefault();zoomAt(Math.pow(1.0015,-e.deltaY),e.clientX*devicePixelRatio,e.clientY*devicePixelRatio);},{passive:false});
document.getElementById("in").onclick=()=>zoomAt(2,canvas.width/2,canvas.height/2);
document.getElementById("out").onclick=()=>zoomAt(0.5,canvas.width/2,canvas.height/2);
document.getElementById("fit").onclick=fit;
addEventListener("resize",fit);
fit();
</script></body></html>
"##;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_box_downsampling() {
        assert_eq!(max_level(1, 1), 0);
        assert_eq!(max_level(254, 100), 8);
        assert_eq!(max_level(256, 3), 8);
        assert_eq!(max_level(257, 3), 9);
        // (0,0,0) (10,10,10) (20,..) over (2,..) (4,..) (6,..): 2x2 means 4, and the odd column 13.
        let a: Vec<u8> = [0u8, 10, 20].iter().flat_map(|&v| [v; 3]).collect();
        let b: Vec<u8> = [2u8, 4, 6].iter().flat_map(|&v| [v; 3]).collect();
        assert_eq!(box_down(&a, Some(&b), 3), vec![4, 4, 4, 13, 13, 13]);
        assert_eq!(box_down(&a, None, 3), vec![5, 5, 5, 20, 20, 20]);
    }

    #[test]
    fn a_streamed_pyramid_matches_its_picture() -> Result<()> {
        let (w, h) = (600usize, 300usize);
        let dir = std::env::temp_dir().join(format!("tessera-dzi-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let png = dir.join("pic.png");
        let value = |x: usize, y: usize, k: usize| ((x * 7 + y * 3 + k * 50) % 256) as u8;
        let mut dzi = DziRows::create(&png, w, h)?;
        // Rows in uneven pieces, as bands come.
        let mut y = 0;
        for piece in [1usize, 200, 99] {
            let mut rows = Vec::new();
            for yy in y..y + piece {
                for x in 0..w {
                    for k in 0..3 {
                        rows.push(f32::from(value(x, yy, k)) / 255.0 * 2.0 - 1.0);
                    }
                }
            }
            dzi.write_rows(&rows, w)?;
            y += piece;
        }
        dzi.finish()?;
        let top = max_level(w, h);
        assert_eq!(top, 10);
        let read = |level: u32, c: usize, r: usize| {
            let p = dir.join(format!("pic_files/{level}/{c}_{r}.png"));
            let mut rd = png::Decoder::new(std::io::BufReader::new(fs::File::open(&p).unwrap()))
                .read_info()
                .unwrap();
            let mut buf = vec![0; rd.output_buffer_size().unwrap()];
            let info = rd.next_frame(&mut buf).unwrap();
            (info.width as usize, info.height as usize, buf)
        };
        // Full level: tile (1, 1) covers x 253..509, y 253..300.
        let (tw, th, buf) = read(top, 1, 1);
        assert_eq!((tw, th), (256, 47));
        assert_eq!(
            &buf[..3],
            &[value(253, 253, 0), value(253, 253, 1), value(253, 253, 2)]
        );
        let (tw, th, _) = read(top, 2, 0);
        assert_eq!((tw, th), (600 - 507, 255));
        // Level 0 is one pixel; level top-1 is 300x150 in two columns.
        assert_eq!(read(0, 0, 0).0, 1);
        assert_eq!(read(top - 1, 1, 0).0, 300 - 253);
        assert!(dir.join("pic.dzi").is_file());
        let html = fs::read_to_string(dir.join("pic_viewer.html"))?;
        assert!(html.contains("\"pic_files\"") && !html.contains("http"));
        assert!(!dir.join("pic_files.partial").exists());
        fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
