//! The cascade driven through the real binary: multi-stage renders of every method on a tiny
//! SDXL model, worker-count independence, init-image upscaling with a detail mask, `plan`, and
//! the errors of bad cascade flags.

mod common;

use std::path::Path;

use common::*;

/// Renders with the tiny SDXL model (training size 128) and returns the PNG's pixels and its
/// parameters text.
fn render(dir: &Scratch, name: &str, extra: &[&str]) -> (u32, u32, Vec<u8>, String) {
    let model = tiny_model("sdxl-tiny");
    let out = dir.path(name);
    let mut args = vec![
        "render",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a lighthouse on a cliff",
        "--seed",
        "11",
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    tessera_ok(&args);
    let (w, h, px, text) = read_png(&out);
    let params = text
        .into_iter()
        .find(|(k, _)| k == "parameters")
        .expect("parameters chunk")
        .1;
    (w, h, px, params)
}

fn varied(px: &[u8]) -> bool {
    px.iter()
        .copied()
        .collect::<std::collections::BTreeSet<u8>>()
        .len()
        > 16
}

#[test]
fn every_method_renders_two_and_three_stages() {
    let dir = scratch("methods");
    for method in ["freescale", "frecas", "hybrid"] {
        for stages in ["128x128,256x256", "128x128,256x256,512x512"] {
            let size = stages.rsplit(',').next().unwrap();
            let name = format!("{method}-{}.png", stages.matches(',').count() + 1);
            let (w, h, px, params) = render(
                &dir,
                &name,
                &[
                    "--method", method, "--stages", stages, "--size", size, "--steps", "6",
                ],
            );
            let side: u32 = size.split('x').next().unwrap().parse().unwrap();
            assert_eq!((w, h), (side, side), "{name}");
            assert!(varied(&px), "{name} is nearly constant");
            for want in [format!("method: {method}"), format!("stages: {stages}")] {
                assert!(
                    params.contains(&want),
                    "{name}: {want:?} missing from {params:?}"
                );
            }
        }
    }
}

#[test]
fn same_seed_same_pixels_for_one_two_and_three_workers() {
    let dir = scratch("workers");
    let mut images = Vec::new();
    for workers in ["1", "2", "3"] {
        let lat = dir.path(&format!("w{workers}.safetensors"));
        let (_, _, px, _) = render(
            &dir,
            &format!("w{workers}.png"),
            &[
                "--size",
                "256x256",
                "--steps",
                "4",
                "--view-batch",
                "2",
                "--tile-weights",
                "gaussian",
                "--workers",
                workers,
                "--output-latents",
                lat.to_str().unwrap(),
            ],
        );
        images.push((px, std::fs::read(&lat).unwrap()));
    }
    for (i, (px, lat)) in images.iter().enumerate().skip(1) {
        assert!(px == &images[0].0, "--workers {} changed the pixels", i + 1);
        assert!(
            lat == &images[0].1,
            "--workers {} changed the final latent",
            i + 1
        );
    }
}

/// A 128×128 RGB gradient with a bright square, written as PNG.
fn write_picture(path: &Path, w: u32, h: u32) {
    let mut data = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            let inside = (w / 4..w / 2).contains(&x) && (h / 4..h / 2).contains(&y);
            data.extend_from_slice(&[
                (x * 255 / w) as u8,
                (y * 255 / h) as u8,
                if inside { 255 } else { 40 },
            ]);
        }
    }
    write_png(path, w, h, png::ColorType::Rgb, &data);
}

fn write_mask(path: &Path, side: u32) {
    let data: Vec<u8> = (0..side * side)
        .map(|i| if (i % side) < side / 2 { 255 } else { 0 })
        .collect();
    write_png(path, side, side, png::ColorType::Grayscale, &data);
}

#[test]
fn init_image_upscales_128_to_512_through_two_stages_with_and_without_a_mask() {
    let dir = scratch("imgen");
    let picture = dir.path("in.png");
    write_picture(&picture, 128, 128);
    let mask = dir.path("mask.png");
    write_mask(&mask, 64);
    let common = [
        "--method",
        "freescale",
        "--init-image",
        picture.to_str().unwrap(),
        "--stages",
        "256x256,512x512",
        "--size",
        "512x512",
        "--steps",
        "4",
    ];
    let (w, h, plain, params) = render(&dir, "up.png", &common);
    assert_eq!((w, h), (512, 512));
    assert!(params.contains("\"init_image\":true"), "{params}");
    let mut masked_args = common.to_vec();
    masked_args.extend([
        "--mask",
        mask.to_str().unwrap(),
        "--cosine-scale",
        "3",
        "--cosine-scale-bg",
        "0.5",
    ]);
    let (_, _, masked, _) = render(&dir, "masked.png", &masked_args);
    assert!(varied(&plain) && varied(&masked));
    assert!(plain != masked, "the mask changed nothing");

    // Bad pictures and flags are refused before any work, naming what to change.
    let wide = dir.path("wide.png");
    write_picture(&wide, 128, 64);
    let model = tiny_model("sdxl-tiny");
    let out = dir.path("bad.png");
    let bad: &[(&[&str], &str)] = &[
        (
            &["--init-image", wide.to_str().unwrap(), "--size", "512x512"],
            "aspect",
        ),
        (
            &["--init-image", mask.to_str().unwrap(), "--size", "128x128"],
            "--init-image upscales",
        ),
        (
            &[
                "--mask",
                mask.to_str().unwrap(),
                "--size",
                "256x256",
                "--method",
                "frecas",
            ],
            "--method freescale or hybrid",
        ),
        (
            &[
                "--mask",
                wide.to_str().unwrap(),
                "--size",
                "256x256",
                "--method",
                "freescale",
            ],
            "--mask",
        ),
        (
            &["--cosine-scale-bg", "0.5", "--size", "256x256"],
            "give a --mask",
        ),
        (
            &["--init-image", "/nonexistent.png", "--size", "256x256"],
            "cannot open",
        ),
    ];
    expect_render_errors(&model, &out, bad);
}

#[test]
fn plan_reports_views_evaluations_and_memory() {
    let freescale_8k = [
        "plan",
        "--arch",
        "sdxl",
        "--method",
        "freescale",
        "--size",
        "8192x8192",
    ];
    let r = tessera_ok(&[&freescale_8k[..], &["--json"]].concat());
    let plan: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    let stages = plan["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 4);
    let last = stages.last().unwrap();
    assert_eq!(last["size"], serde_json::json!([8192, 8192]));
    assert_eq!(last["local_views"], 225);
    assert_eq!(last["global_views"], 64);
    assert_eq!(last["evaluations_per_step"], 578);
    assert_eq!(last["timesteps"].as_array().unwrap().len(), 35);
    assert!(plan["total_evaluations"].as_u64().unwrap() > 20_000);
    assert!(plan["memory"]["worker_bytes"].as_u64().unwrap() > 5 << 30);

    let text = tessera_ok(&freescale_8k);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("225 local") && text.contains("+ 64 global"),
        "{text}"
    );

    // --workers: how busy the batch keeps them, and the batch that keeps them busiest.
    let on_32 = [&freescale_8k[..], &["--workers", "32"]].concat();
    let r = tessera_ok(&[&on_32[..], &["--json"]].concat());
    let plan: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    let fit = &plan["workers"];
    assert_eq!(
        (fit["workers"].as_u64(), fit["view_batch"].as_u64()),
        (Some(32), Some(4))
    );
    let (busy, best) = (
        fit["busy"].as_f64().unwrap(),
        fit["recommended_busy"].as_f64().unwrap(),
    );
    assert!(0.0 < busy && busy < best && best <= 1.0, "{fit}");
    let b = fit["recommended_view_batch"].as_u64().unwrap();
    let text = tessera_ok(&on_32);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!("; --view-batch {b} keeps them")) && text.contains("(recommended)"),
        "{text}"
    );
    let r = tessera(&[
        "plan",
        "--arch",
        "sdxl",
        "--size",
        "4096x4096",
        "--workers",
        "0",
    ]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("--workers"));

    // From a model directory: the tiny model's training size is 128.
    let model = tiny_model("sdxl-tiny");
    let r = tessera_ok(&[
        "plan",
        "--model",
        model.to_str().unwrap(),
        "--size",
        "512x512",
        "--json",
    ]);
    let plan: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(plan["method"], "hybrid");
    assert_eq!(plan["training_size"], 128);
    assert_eq!(plan["stages"].as_array().unwrap().len(), 3);
}

#[test]
fn bad_cascade_flags_say_what_to_change() {
    let model = tiny_model("sdxl-tiny");
    let dir = scratch("cascade-flags");
    let out = dir.path("x.png");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--size", "200x256", "--method", "hybrid"],
            "multiple of 64",
        ),
        (
            &["--size", "256x256", "--stages", "128x128,512x512"],
            "make them equal",
        ),
        (
            &["--size", "256x256", "--stages", "256x256,128x128"],
            "smallest first",
        ),
        (
            &[
                "--size",
                "256x256",
                "--method",
                "single",
                "--stages",
                "128x128,256x256",
            ],
            "one stage",
        ),
        (
            &[
                "--size",
                "256x256",
                "--method",
                "frecas",
                "--end-times",
                "200",
            ],
            "one per stage",
        ),
        (&["--size", "256x256", "--method", "tiles"], "freescale"),
        (&["--size", "256x256", "--facfg", "35"], "W_HIGH,W_LOW"),
        (
            &["--size", "256x256", "--tile-overlap", "0.95"],
            "--tile-overlap",
        ),
        (&["--size", "256x256", "--workers", "0"], "--workers"),
    ];
    expect_render_errors(&model, &out, cases);
}

#[test]
fn readme_plan_sample_is_what_plan_prints() {
    // The README shows `$ tessera plan … | tail -N` and the lines it prints; they must not drift.
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let (_, after) = readme
        .split_once("$ tessera plan ")
        .expect("README has a `$ tessera plan` sample");
    let (command, rest) = after.split_once('\n').unwrap();
    let (args, tail) = command
        .split_once(" | tail -")
        .expect("a `| tail -N` sample");
    let n: usize = tail.trim().parse().unwrap();
    let shown: Vec<&str> = rest.lines().take_while(|l| !l.starts_with("```")).collect();
    assert_eq!(
        shown.len(),
        n,
        "the sample shows {} lines of tail -{n}",
        shown.len()
    );
    let mut argv = vec!["plan"];
    argv.extend(args.split_whitespace());
    let out = tessera_ok(&argv);
    let printed = String::from_utf8_lossy(&out.stdout);
    let last: Vec<&str> = printed.lines().rev().take(n).collect::<Vec<_>>();
    let last: Vec<&str> = last.into_iter().rev().collect();
    assert_eq!(
        shown, last,
        "README's plan sample differs from `tessera plan {args}`"
    );
}
