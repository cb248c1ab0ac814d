//! SD3 through the real `tessera` binary: whole CFG runs of the diffusers-made fixture model
//! against diffusers' pipeline (with T5 and as a directory without it), the FreCaS plan of the
//! reference's SD3 preset, FreCaS and hybrid cascades of the tiny SD3 model above its training
//! size (the same bytes for 1 and 3 workers), and a cluster serving an SD3 and an SDXL model
//! side by side, one job of each at once, the SD3 job pixel-identical to `tessera render`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::{copy_dir, read_png, rel_l2, repo_root, scratch, tessera_bin, tessera_ok, tiny_model};
use tessera_harness::{ClusterOptions, LocalCluster};

fn fixture_root() -> PathBuf {
    repo_root().join("tests/parity/fixtures/sd3")
}

/// The fixture model without T5: a copy with `text_encoder_3` and `tokenizer_3` null.
fn fixture_without_t5(dir: &Path) -> PathBuf {
    let dst = dir.join("no-t5");
    copy_dir(&fixture_root().join("model"), &dst);
    for c in ["text_encoder_3", "tokenizer_3"] {
        std::fs::remove_dir_all(dst.join(c)).unwrap();
    }
    let index = dst.join("model_index.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
    json["text_encoder_3"] = serde_json::json!([null, null]);
    json["tokenizer_3"] = serde_json::json!([null, null]);
    std::fs::write(&index, json.to_string()).unwrap();
    dst
}

/// `tessera render --method single --latents` of `model` against diffusers' pipeline case.
fn pipeline_parity(model: &Path, case: &str, dir: &Path) -> (f64, f64) {
    let root = fixture_root();
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("reference.json")).unwrap()).unwrap();
    let params = &reference["pipelines"][case];
    let tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(root.join("reference.safetensors"), &Device::Cpu).unwrap();
    let get = |k: &str| tensors.get(k).unwrap_or_else(|| panic!("no {k}")).clone();
    let latents_in = dir.join(format!("{case}-in.safetensors"));
    candle_core::safetensors::save(
        &HashMap::from([("latents", get(&format!("pipe.{case}.latents")))]),
        &latents_in,
    )
    .unwrap();
    let (latents_out, png) = (
        dir.join(format!("{case}-out.safetensors")),
        dir.join(format!("{case}.png")),
    );
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
    tessera_ok(&args);
    let flat = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    let ours = candle_core::safetensors::load(&latents_out, &Device::Cpu).unwrap();
    let latent_err = rel_l2(
        &flat(&ours["latents"]),
        &flat(&get(&format!("pipe.{case}.output_latents"))),
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
    let image_err = rel_l2(&pixels, &flat(&image));
    eprintln!("sd3/{case}: rel. L2 error vs diffusers: latents {latent_err:.2e}, 8-bit image {image_err:.2e}");
    (latent_err, image_err)
}

#[test]
fn sd3_whole_runs_match_diffusers_with_and_without_t5() {
    let dir = scratch("sd3-parity");
    let (l, i) = pipeline_parity(&fixture_root().join("model"), "cfg", &dir.0);
    assert!(
        l <= 1e-3 && i <= 5e-3,
        "with T5: latents {l:.2e}, image {i:.2e}"
    );
    let no_t5 = fixture_without_t5(&dir.0);
    let (l, i) = pipeline_parity(&no_t5, "no_t5", &dir.0);
    assert!(
        l <= 1e-3 && i <= 5e-3,
        "without T5: latents {l:.2e}, image {i:.2e}"
    );
}

/// The plan: the reference's SD3 preset, its timesteps as the reference's own
/// `scheduler_wrapper` prints them (tests/parity/ref_frecas_sd3_schedule.py; the numbers are
/// pinned in `tessera-core`'s plan tests too).
#[test]
fn sd3_frecas_plan_prints_the_reference_timesteps() {
    let model = fixture_root().join("model");
    let out = tessera_ok(&[
        "plan",
        "--model",
        model.to_str().unwrap(),
        "--method",
        "frecas",
        "--size",
        "2048x2048",
        "--stages",
        "1024x1024,2048x2048",
        "--end-times",
        "50,0",
        "--stage-steps",
        "20,8",
        "--json",
    ]);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ts = |k: usize| -> Vec<f64> {
        plan["stages"][k]["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    // serde_json's float parsing may be one unit in the last place off.
    let close = |a: &[f64], b: &[f64]| {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| (x - y).abs() <= 1e-12 * y.abs())
    };
    assert_eq!(ts(0).len(), 20);
    assert!(
        close(&[ts(0)[0], ts(0)[19]], &[1000.0, 143.50180053710938]),
        "{:?}",
        ts(0)
    );
    assert!(
        close(
            &ts(1),
            &[
                188.48167419433594,
                165.18649291992188,
                141.04881286621094,
                116.02210235595703,
                90.05628204345703,
                63.09751510620117,
                35.08771896362305,
                8.928571701049805
            ]
        ),
        "{:?}",
        ts(1)
    );
}

/// The cascade flags of the tiny SD3 model (training size 128) rendered at 256² or 256×192.
const FRECAS: &[&str] = &[
    "--prompt",
    "a lighthouse on a cliff",
    "--method",
    "frecas",
    "--size",
    "256x256",
    "--steps",
    "6",
    "--seed",
    "5",
];
const HYBRID: &[&str] = &[
    "--prompt",
    "a lighthouse on a cliff",
    "--size",
    "256x192",
    "--steps",
    "6",
    "--view-batch",
    "2",
    "--seed",
    "5",
];

fn render(model: &Path, flags: &[&str], workers: &str, out: &Path) -> Vec<u8> {
    let mut args = vec!["render", "--model", model.to_str().unwrap()];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--workers", workers, "-o", out.to_str().unwrap()]);
    tessera_ok(&args);
    std::fs::read(out).unwrap()
}

#[test]
fn sd3_frecas_and_hybrid_cascades_are_the_same_bytes_for_1_and_3_workers() {
    let model = tiny_model("sd3-tiny");
    let dir = scratch("sd3-cascades");
    for (name, flags) in [("frecas", FRECAS), ("hybrid", HYBRID)] {
        let one = render(&model, flags, "1", &dir.path(&format!("{name}-1.png")));
        let three = render(&model, flags, "3", &dir.path(&format!("{name}-3.png")));
        assert!(one == three, "{name}: 1 and 3 workers differ");
        let (w, h, pixels, text) = read_png(&dir.path(&format!("{name}-1.png")));
        assert_eq!(
            (w, h),
            if name == "frecas" {
                (256, 256)
            } else {
                (256, 192)
            }
        );
        let params = text.iter().find(|(k, _)| k == "parameters").unwrap();
        assert!(params.1.contains(name), "{}", params.1);
        // Not a flat picture: the cascade ran the model.
        let first = &pixels[..3];
        assert!(pixels.chunks(3).any(|p| p != first));
    }
    // UNet-only methods are refused for SD3 with a message naming the flag.
    let out = common::tessera(&[
        "render",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "x",
        "--size",
        "256x256",
        "--freeu",
        "true",
        "-o",
        dir.path("no.png").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("drop --freeu"),
        "{err}"
    );
}

/// One SDXL worker and one SD3 worker behind one coordinator: a job for each model at once,
/// each routed to its worker; the SD3 job gives `tessera render`'s pixels.
#[test]
fn a_mixed_cluster_serves_sdxl_and_sd3_side_by_side() {
    let (sd3, sdxl) = (tiny_model("sd3-tiny"), tiny_model("sdxl-tiny"));
    let dir = scratch("sd3-mixed");
    let want = {
        let out = dir.path("embedded.png");
        render(&sd3, HYBRID, "1", &out);
        read_png(&out).2
    };
    let mut cluster =
        LocalCluster::start(Path::new(tessera_bin()), &dir.0, ClusterOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
    for (model, name) in [(&sd3, "sd3"), (&sdxl, "sdxl")] {
        let flags = ["--model-name".to_string(), name.to_string()];
        cluster
            .add_worker(model, &flags)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    cluster.wait_workers(2).unwrap_or_else(|e| panic!("{e}"));
    let submit = |model: &str, flags: &[&str]| -> String {
        let mut args = vec!["submit", "--model", model];
        args.extend_from_slice(flags);
        cluster.client_ok(&args).unwrap_or_else(|e| panic!("{e}"))
    };
    let sd3_job = submit("sd3", HYBRID);
    let sdxl_job = submit("sdxl", HYBRID);
    for id in [&sd3_job, &sdxl_job] {
        let out = cluster.client(&["watch", id]).unwrap();
        assert!(out.status.success(), "job {id} failed:\n{}", cluster.logs());
    }
    let fetch = |id: &str| -> Vec<u8> {
        let out = dir.path(&format!("{id}.png"));
        cluster
            .client_ok(&["fetch", id, "-o", out.to_str().unwrap()])
            .unwrap_or_else(|e| panic!("{e}"));
        read_png(&out).2
    };
    assert!(
        fetch(&sd3_job) == want,
        "the cluster's SD3 image differs from the embedded render"
    );
    assert_eq!(fetch(&sdxl_job).len(), 256 * 192 * 3);
    // Each job ran on its model's worker only.
    let logs: Vec<String> = cluster.workers.iter().map(|w| w.log()).collect();
    assert!(
        logs.iter().all(|l| !l.contains("panicked")),
        "{}",
        cluster.logs()
    );
}
