//! The VAE distributed in tiles, on the tiny SDXL-architecture model: same bytes for any
//! number of workers and any task order, a small picture is one task, the final decode streams
//! in bands, the streamed PNG equals a whole-image encode of the same pixels, and the blended
//! output has no seams at tile borders.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use tessera_coordinator::assemble::{png_bytes_from, scanline_bytes, PngRows};
use tessera_coordinator::dispatch::{Dispatch, DispatchError, LocalWorkers};
use tessera_coordinator::engine::vae::RowSink;
use tessera_coordinator::engine::{Engine, ModelInfo};
use tessera_core::noise::{NoiseKey, NoisePurpose};
use tessera_core::plan::{plan, Plan};
use tessera_core::sched::SchedulerKind;
use tessera_core::spec::{BitDepth, RenderSpec};
use tessera_core::task::{Task, VaeNoise};
use tessera_core::tiling::vae::VaeTiling;
use tessera_store::{MemoryStore, Store};
use tessera_worker::model::arch::arch_info;
use tessera_worker::model::diffusion::DiffusionModel;
use tessera_worker::random_models::tiny::{synthesize, TinyArch};

fn model() -> (Arc<DiffusionModel>, Plan) {
    let dir = std::env::temp_dir().join(format!("tessera-tiled-vae-{}", std::process::id()));
    // The tests run in parallel: one of them writes the model, the others wait for it.
    static WRITE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    {
        let _once = WRITE.lock().unwrap_or_else(|e| e.into_inner());
        if !dir.join("model_index.json").is_file() {
            let _ = std::fs::remove_dir_all(&dir);
            synthesize(TinyArch::SdxlTiny, &dir, 3).unwrap();
            tessera_harness::remove_at_exit(dir.clone());
        }
    }
    let m = DiffusionModel::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let arch = arch_info(&dir, 4).unwrap();
    let spec = RenderSpec {
        loras: Vec::new(),
        prompt: "x".into(),
        negative_prompt: None,
        width: 128,
        height: 128,
        steps: 2,
        guidance: 7.5,
        scheduler: Some(SchedulerKind::Euler),
        seed: 1,
        method: Default::default(),
        output: Default::default(),
    };
    (Arc::new(m), plan(&spec, &arch).unwrap())
}

/// Hands tasks to in-process workers, in reverse order when `reverse`, and counts them.
struct Ordered<'a> {
    inner: &'a LocalWorkers,
    reverse: bool,
    tasks: AtomicUsize,
}

impl Dispatch for Ordered<'_> {
    /// Collects the whole stream first, so the order can be reversed.
    fn run_streamed(
        &self,
        tasks: &mut (dyn Iterator<Item = Task> + Send),
        done: &(dyn Fn(&Task) + Sync),
    ) -> Result<(), DispatchError> {
        let mut tasks: Vec<Task> = tasks.collect();
        self.tasks.fetch_add(tasks.len(), Ordering::Relaxed);
        if self.reverse {
            tasks.reverse();
        }
        self.inner.run(&tasks, done)
    }

    fn workers(&self) -> usize {
        self.inner.workers()
    }
}

/// Runs `f` with an engine on `workers` in-process workers (tasks in reverse order when
/// `reverse`); returns its result and the number of tasks dispatched, and checks that no
/// tile keys were left in the store.
fn with_engine<T>(
    model: &Arc<DiffusionModel>,
    workers: usize,
    reverse: bool,
    f: impl FnOnce(&Engine) -> T,
) -> (T, usize) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let local = LocalWorkers::new(vec![model.clone(); workers], store.clone());
    let dispatch = Ordered {
        inner: &local,
        reverse,
        tasks: AtomicUsize::new(0),
    };
    let engine = Engine {
        store: store.as_ref(),
        workers: &dispatch,
        model: ModelInfo {
            scheduler: model.scheduler_config.clone(),
            latent_channels: 4,
        },
    };
    let out = f(&engine);
    assert!(store.keys("").unwrap().is_empty(), "tile keys left behind");
    (out, dispatch.tasks.load(Ordering::Relaxed))
}

/// A smooth test latent with some structure: what a denoised latent roughly looks like
/// (random weights make the decoded picture busy anyway).
fn latent(h: usize, w: usize, seed: u64) -> Tensor {
    let noise = NoiseKey::new(seed, NoisePurpose::InitialLatent)
        .normal((1, 4, h, w), &Device::Cpu)
        .unwrap();
    let ys = Tensor::arange(0f32, h as f32, &Device::Cpu)
        .unwrap()
        .reshape((1, 1, h, 1))
        .unwrap();
    let xs = Tensor::arange(0f32, w as f32, &Device::Cpu)
        .unwrap()
        .reshape((1, 1, 1, w))
        .unwrap();
    let wave = ((ys * 0.11).unwrap().sin().unwrap())
        .broadcast_add(&(xs * 0.07).unwrap().cos().unwrap())
        .unwrap();
    (noise * 0.3).unwrap().broadcast_add(&wave).unwrap()
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Records the rows a sink receives, and the largest piece it was handed at once.
#[derive(Default)]
struct Rows {
    rgb: Vec<f32>,
    pieces: Vec<usize>,
}

impl RowSink for Rows {
    fn write_rows(&mut self, rows: &[f32], width: usize) -> std::io::Result<()> {
        self.pieces.push(rows.len() / (3 * width));
        self.rgb.extend_from_slice(rows);
        Ok(())
    }
}

#[test]
fn tiled_decode_and_encode_are_the_same_bytes_for_any_workers_and_order() {
    let (model, plan) = model();
    let tiling = VaeTiling::for_plan(&plan);
    assert_eq!(tiling.tile, 32, "tiny model: 256 px tiles");
    // 512x384 pixels: 3 x 2 decode tiles.
    let z = latent(48, 64, 11);
    let decode = |workers, reverse| {
        with_engine(&model, workers, reverse, |e| {
            e.decode_image("j", &plan, &z).unwrap()
        })
    };
    let (one, n1) = decode(1, false);
    let (three, n3) = decode(3, true);
    assert_eq!(n1, 6, "3 x 2 tiles");
    assert_eq!(n3, 6);
    assert_eq!(one.dims(), &[1, 3, 384, 512]);
    assert_eq!(
        to_vec(&one),
        to_vec(&three),
        "decode depends on the workers"
    );

    let px = one.clamp(-1f32, 1f32).unwrap();
    let noise = VaeNoise { seed: 9, stage: 2 };
    let encode = |workers, reverse| {
        with_engine(&model, workers, reverse, |e| {
            e.encode_image("j", &plan, noise, &px).unwrap()
        })
    };
    let (a, na) = encode(1, false);
    let (b, nb) = encode(4, true);
    assert_eq!((na, nb), (6, 6));
    assert_eq!(a.dims(), &[1, 4, 48, 64]);
    assert_eq!(to_vec(&a), to_vec(&b), "encode depends on the workers");
}

#[test]
fn a_picture_within_one_tile_is_one_task_and_a_plain_decode() {
    let (model, plan) = model();
    let z = latent(32, 24, 3);
    let ((px, whole), n) = with_engine(&model, 2, false, |e| {
        let px = e.decode_image("j", &plan, &z).unwrap();
        let whole = tessera_worker::tasks::decode_latents(&model, &z).unwrap();
        (px, whole)
    });
    assert_eq!(n, 1);
    assert_eq!(to_vec(&px), to_vec(&whole));
}

#[test]
fn the_final_decode_streams_in_bands_into_a_png_equal_to_a_whole_encode() {
    let (model, plan) = model();
    // 384x576 pixels: 3 bands of 2 tiles.
    let z = latent(72, 48, 5);
    let ((rows, whole), n) = with_engine(&model, 2, false, |e| {
        let mut rows = Rows::default();
        e.decode_output("j", &plan, &z, &mut rows, &|_| {}).unwrap();
        (rows, e.decode_image("j", &plan, &z).unwrap())
    });
    assert_eq!(n, 12);
    let (h, w) = (576, 384);
    assert_eq!(rows.rgb.len(), h * w * 3);
    // Rows come band by band, never the whole picture at once.
    assert_eq!(rows.pieces.len(), 3, "{:?}", rows.pieces);
    assert!(rows.pieces.iter().all(|&p| p <= 256), "{:?}", rows.pieces);
    let interleaved = to_vec(&whole.squeeze(0).unwrap().permute((1, 2, 0)).unwrap());
    assert_eq!(rows.rgb, interleaved);

    let dir = std::env::temp_dir().join(format!("tessera-tiled-png-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for depth in [BitDepth::Eight, BitDepth::Sixteen] {
        let path = dir.join(format!("out{}.png", depth.bits()));
        let ((), _) = with_engine(&model, 3, true, |e| {
            let mut png = PngRows::create(&path, w, h, depth, "prompt: x").unwrap();
            e.decode_output("j", &plan, &z, &mut png, &|_| {}).unwrap();
            png.finish().unwrap();
        });
        let streamed = std::fs::read(&path).unwrap();
        let mut data = Vec::new();
        scanline_bytes(&interleaved, depth, &mut data);
        let reference = png_bytes_from(&data, w, h, depth, "prompt: x").unwrap();
        let decoded = |bytes: &[u8]| {
            let mut r = png::Decoder::new(std::io::Cursor::new(bytes.to_vec()))
                .read_info()
                .unwrap();
            let mut buf = vec![0; r.output_buffer_size().unwrap()];
            let info = r.next_frame(&mut buf).unwrap();
            let text: Vec<String> = r
                .info()
                .utf8_text
                .iter()
                .map(|c| c.get_text().unwrap())
                .collect();
            (info.bit_depth, info.width, info.height, buf, text)
        };
        assert_eq!(decoded(&streamed), decoded(&reference), "{depth:?}");
        assert!(!dir
            .join(format!("out{}.png.partial", depth.bits()))
            .exists());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Mean absolute difference between pixel rows `y - 1` and `y` (or columns, `transpose`).
fn line_step(img: &[f32], h: usize, w: usize, y: usize, transpose: bool) -> f64 {
    let at = |r: usize, c: usize, k: usize| -> f64 {
        let (r, c) = if transpose { (c, r) } else { (r, c) };
        f64::from(img[(r * w + c) * 3 + k])
    };
    let n = if transpose { h } else { w };
    let mut s = 0.0;
    for i in 0..n {
        for k in 0..3 {
            s += (at(y, i, k) - at(y - 1, i, k)).abs();
        }
    }
    s / (3 * n) as f64
}

#[test]
fn tile_borders_leave_no_seams_in_the_png() {
    let (model, plan) = model();
    let tiling = VaeTiling::for_plan(&plan);
    // 640x640 pixels: 3 x 3 tiles (starts 0, 24, 48 latent cells).
    let (h, w) = (640usize, 640usize);
    let z = latent(h / 8, w / 8, 21);
    let dir = std::env::temp_dir().join(format!("tessera-seams-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("seams.png");
    with_engine(&model, 2, false, |e| {
        let mut png = PngRows::create(&path, w, h, BitDepth::Sixteen, "").unwrap();
        e.decode_output("j", &plan, &z, &mut png, &|_| {}).unwrap();
        png.finish().unwrap();
    });
    let mut r = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()))
        .read_info()
        .unwrap();
    let mut buf = vec![0; r.output_buffer_size().unwrap()];
    r.next_frame(&mut buf).unwrap();
    let img: Vec<f32> = buf
        .chunks(2)
        .map(|b| f32::from(u16::from_be_bytes([b[0], b[1]])) / 65535.0)
        .collect();
    std::fs::remove_dir_all(&dir).unwrap();

    // Borders: where a tile begins or ends (pixel lines).
    let starts = tiling.starts(h / 8);
    let mut borders = BTreeSet::new();
    for &s in &starts {
        for edge in [s * 8, (s + tiling.tile) * 8] {
            if edge > 0 && edge < h {
                borders.insert(edge);
            }
        }
    }
    assert!(borders.len() >= 4, "{borders:?}");
    // Interior lines: at least 24 pixels from any border and from the picture's edge.
    let interior: Vec<usize> = (24..h - 24)
        .filter(|y| borders.iter().all(|b| b.abs_diff(*y) >= 24))
        .step_by(7)
        .take(borders.len())
        .collect();
    assert_eq!(interior.len(), borders.len());
    for transpose in [false, true] {
        let mean = |lines: &mut dyn Iterator<Item = usize>| {
            let v: Vec<f64> = lines.map(|y| line_step(&img, h, w, y, transpose)).collect();
            v.iter().sum::<f64>() / v.len() as f64
        };
        let at_borders = mean(&mut borders.iter().copied());
        let inside = mean(&mut interior.iter().copied());
        eprintln!(
            "seam check (transpose {transpose}): borders {at_borders:.5}, interior {inside:.5}"
        );
        assert!(
            at_borders <= inside,
            "{}: mean step across tile borders {at_borders:.5} > interior {inside:.5}",
            if transpose { "columns" } else { "rows" }
        );
    }

    // The measure can see a seam: the same tiles cut hard (each pixel from the tile whose
    // centre is nearest, no blending) step visibly where the cut falls.
    let owner = |p: usize| -> usize {
        let centre = |i: usize| (starts[i] + tiling.tile / 2) * 8;
        (0..starts.len())
            .min_by_key(|&i| centre(i).abs_diff(p))
            .unwrap()
    };
    let tiles: Vec<Vec<Vec<f32>>> = starts
        .iter()
        .map(|&r| {
            starts
                .iter()
                .map(|&c| {
                    let piece = z
                        .narrow(2, r, tiling.tile)
                        .unwrap()
                        .narrow(3, c, tiling.tile)
                        .unwrap();
                    to_vec(&tessera_worker::tasks::decode_latents(&model, &piece).unwrap())
                })
                .collect()
        })
        .collect();
    let t = tiling.tile * 8;
    let mut cut = vec![0f32; h * w * 3];
    for y in 0..h {
        for x in 0..w {
            let (i, j) = (owner(y), owner(x));
            let (ty, tx) = (y - starts[i] * 8, x - starts[j] * 8);
            for k in 0..3 {
                let v = tiles[i][j][k * t * t + ty * t + tx];
                cut[(y * w + x) * 3 + k] = (v / 2.0 + 0.5).clamp(0.0, 1.0);
            }
        }
    }
    let cuts: Vec<usize> = (1..h).filter(|&y| owner(y) != owner(y - 1)).collect();
    assert_eq!(cuts.len(), starts.len() - 1);
    for transpose in [false, true] {
        let step = |img: &[f32]| {
            cuts.iter()
                .map(|&y| line_step(img, h, w, y, transpose))
                .sum::<f64>()
                / cuts.len() as f64
        };
        let (hard, blended) = (step(&cut), step(&img));
        eprintln!("seam check (transpose {transpose}): hard cut {hard:.5}, blended {blended:.5}");
        assert!(hard > blended, "hard cut {hard:.5} <= blended {blended:.5}");
    }
}
