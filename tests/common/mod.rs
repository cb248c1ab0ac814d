//! Shared setup for the cross-process tests: the real `tessera` binary, scratch directories,
//! and synthesized models.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub fn tessera_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tessera")
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub use tessera_harness::Scratch;

/// The cluster tests' job: a 3-stage hybrid cascade of the tiny SDXL model (a coordinator can
/// be stopped mid-stage, and its pixels are compared with the embedded render's).
pub const CASCADE: &[&str] = &[
    "--prompt",
    "a lighthouse on a cliff at dusk",
    "--size",
    "512x512",
    "--stages",
    "128x128,256x256,512x512",
    "--method",
    "hybrid",
    "--stage-steps",
    "2,3,4",
    "--seed",
    "11",
];

/// Holds the cross-process tests of one file to one at a time (each starts a whole cluster, and
/// two at once on a small machine would only slow both).
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|p| p.into_inner())
}

/// A fresh scratch directory for a test, removed when dropped.
pub fn scratch(name: &str) -> Scratch {
    Scratch::new(&format!("test-{name}")).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `tessera` with `args`, returning its output whatever the exit status.
pub fn tessera(args: &[&str]) -> Output {
    Command::new(tessera_bin())
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run tessera")
}

/// Runs `tessera` and fails the test with its stderr if it does not succeed.
pub fn tessera_ok(args: &[&str]) -> Output {
    let out = tessera(args);
    assert!(
        out.status.success(),
        "tessera {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A tiny synthesized model shared by the tests of one process (synthesis is deterministic).
pub fn tiny_model(arch: &str) -> PathBuf {
    static SDXL: OnceLock<PathBuf> = OnceLock::new();
    static SD21: OnceLock<PathBuf> = OnceLock::new();
    static SD3: OnceLock<PathBuf> = OnceLock::new();
    let cell = match arch {
        "sdxl-tiny" => &SDXL,
        "sd21-tiny" => &SD21,
        "sd3-tiny" => &SD3,
        other => panic!("unknown tiny arch {other}"),
    };
    cell.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tessera-model-{arch}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        tessera_ok(&[
            "model",
            "synth",
            "--arch",
            arch,
            "--out",
            dir.to_str().unwrap(),
            "--seed",
            "1",
        ]);
        tessera_harness::remove_at_exit(dir.clone());
        dir
    })
    .clone()
}

/// Copies a directory tree (model fixtures are small).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// ||a - b|| / ||b||
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Decodes an 8-bit RGB PNG: (width, height, pixels, text chunks).
pub fn read_png(path: &Path) -> (u32, u32, Vec<u8>, Vec<(String, String)>) {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut buf).unwrap();
    buf.truncate(frame.buffer_size());
    let info = reader.info();
    let text = info
        .utf8_text
        .iter()
        .map(|c| (c.keyword.clone(), c.get_text().unwrap()))
        .collect();
    (info.width, info.height, buf, text)
}

/// Runs `render` with each case's extra flags and checks that it fails, with a message of at
/// most three lines containing the expected text, and leaves no output file.
pub fn expect_render_errors(model: &Path, out: &Path, cases: &[(&[&str], &str)]) {
    for (extra, want) in cases {
        let mut args = vec![
            "render",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "x",
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let r = tessera(&args);
        assert!(!r.status.success(), "{extra:?} succeeded");
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains(want), "{extra:?}: {err:?} lacks {want:?}");
        assert!(err.lines().count() <= 3, "{extra:?}: long error {err:?}");
        assert!(!out.exists(), "{extra:?} left {}", out.display());
    }
}

/// Writes 8-bit pixels (`Rgb` or `Grayscale`) as a PNG.
pub fn write_png(path: &Path, width: u32, height: u32, color: png::ColorType, data: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(f), width, height);
    enc.set_color(color);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header().unwrap().write_image_data(data).unwrap();
}

/// `tessera render --method single --latents` of `model` from the initial latents of
/// diffusers' pipeline case `case` (recorded in `fixtures`' reference.json and
/// reference.safetensors), into `dir`: the relative L2 errors of the final latents and of the
/// 8-bit PNG against diffusers' decoded image (in [0, 1], quantised the same way).
pub fn pipeline_parity(model: &Path, fixtures: &Path, case: &str, dir: &Path) -> (f64, f64) {
    pipeline_parity_with(model, fixtures, case, dir, &[])
}

/// [`pipeline_parity`] with `extra` render flags (`--lora …`).
pub fn pipeline_parity_with(
    model: &Path,
    fixtures: &Path,
    case: &str,
    dir: &Path,
    extra: &[&str],
) -> (f64, f64) {
    use candle_core::{Device, Tensor};
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures.join("reference.json")).unwrap()).unwrap();
    let params = &reference["pipelines"][case];
    let tensors =
        candle_core::safetensors::load(fixtures.join("reference.safetensors"), &Device::Cpu)
            .unwrap();
    let get = |name: &str| -> &Tensor {
        tensors
            .get(name)
            .unwrap_or_else(|| panic!("fixture tensor {name} missing"))
    };
    let latents_in = dir.join(format!("{case}-in.safetensors"));
    candle_core::safetensors::save(
        &std::collections::HashMap::from([(
            "latents",
            get(&format!("pipe.{case}.latents")).clone(),
        )]),
        &latents_in,
    )
    .unwrap();
    let latents_out = dir.join(format!("{case}-out.safetensors"));
    let png = dir.join(format!("{case}.png"));
    let size = format!("{}x{}", params["width"], params["height"]);
    let (steps, guidance) = (params["steps"].to_string(), params["guidance"].to_string());
    let mut args = vec![
        "render",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        params["prompt"].as_str().unwrap(),
        "--size",
        &size,
        "--method",
        "single",
        "--steps",
        &steps,
        "--guidance",
        &guidance,
        "--latents",
        latents_in.to_str().unwrap(),
        "--output-latents",
        latents_out.to_str().unwrap(),
        "-o",
        png.to_str().unwrap(),
    ];
    if let Some(neg) = params["negative_prompt"].as_str() {
        args.extend(["--negative-prompt", neg]);
    }
    args.extend_from_slice(extra);
    tessera_ok(&args);
    let flat = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    let ours = candle_core::safetensors::load(&latents_out, &Device::Cpu).unwrap();
    let latent_err = rel_l2(
        &flat(&ours["latents"]),
        &flat(get(&format!("pipe.{case}.output_latents"))),
    );
    let image = get(&format!("pipe.{case}.image"))
        .squeeze(0)
        .unwrap()
        .permute((1, 2, 0))
        .unwrap();
    let pixels: Vec<f32> = read_png(&png)
        .2
        .iter()
        .map(|&p| f32::from(p) / 255.0)
        .collect();
    (latent_err, rel_l2(&pixels, &flat(&image)))
}

/// Runs a render expected to fail and returns its stderr, checking the failure is short and
/// free of panics and backtraces.
pub fn failing_render(model: &Path, out: &Path) -> String {
    let o = tessera(&[
        "render",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "x",
        "--steps",
        "1",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success(), "render of a broken model succeeded");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(err.lines().count() <= 4, "error too long:\n{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    assert!(
        !out.exists(),
        "a failed render must not leave an output file"
    );
    err
}
