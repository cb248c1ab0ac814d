//! Model files as a user passes them: single-file checkpoints (`--model FILE.safetensors`) and
//! LoRAs (`--lora FILE[:WEIGHT]`).
//!
//! Single files: the fixtures are
//! tiny SDXL and SD 2.1 (v-prediction) models made as diffusers directories and converted to
//! one original-layout file each by diffusers' own conversion scripts
//! (`tests/parity/make_single_file_fixtures.py`); the references are diffusers' pipeline run
//! on the directory.

mod common;

use std::path::Path;

use common::*;

fn single_file_parity(arch: &str) {
    let root = repo_root().join("tests/parity/fixtures").join(arch);
    let dir = scratch(&format!("single-{arch}"));
    let (latent_err, err) = pipeline_parity(&root.join("model.safetensors"), &root, "cfg", &dir.0);
    eprintln!("{arch}: rel. L2 error vs diffusers on the directory: latents {latent_err:.2e}, 8-bit image {err:.2e}");
    assert!(
        latent_err <= 1e-4,
        "{arch}: final latents rel. L2 error {latent_err:.3e} > 1e-4"
    );
    assert!(
        err <= 5e-3,
        "{arch}: image rel. L2 error {err:.3e} (8-bit quantised)"
    );
}

#[test]
fn an_sdxl_single_file_renders_as_its_diffusers_directory() {
    single_file_parity("sdxl_single");
}

#[test]
fn an_sd21_single_file_renders_as_its_diffusers_directory() {
    single_file_parity("sd21_single");
}

/// Writes `tensors` (name, shape) as f16 zeros into `path`.
fn write_file(path: &Path, tensors: &[(&str, &[usize])]) {
    let map: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .iter()
        .map(|(k, s)| {
            let t =
                candle_core::Tensor::zeros(*s, candle_core::DType::F16, &candle_core::Device::Cpu);
            (k.to_string(), t.unwrap())
        })
        .collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

#[test]
fn files_of_other_kinds_get_one_line_saying_what_they_are() {
    let dir = scratch("single-others");
    type Keys<'a> = &'a [(&'a str, &'a [usize])];
    let cases: [(&str, Keys, &str); 3] = [
        (
            "sd15.safetensors",
            &[
                (
                    "model.diffusion_model.input_blocks.0.0.weight",
                    &[8, 4, 3, 3],
                ),
                (
                    "cond_stage_model.transformer.text_model.final_layer_norm.weight",
                    &[8],
                ),
            ],
            "Stable Diffusion 1.x",
        ),
        (
            "style.safetensors",
            &[(
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
                &[4, 8],
            )],
            "a LoRA",
        ),
        (
            "vae.safetensors",
            &[
                ("encoder.conv_in.weight", &[8, 3, 3, 3]),
                ("decoder.conv_in.weight", &[8, 4, 3, 3]),
            ],
            "a VAE alone",
        ),
    ];
    for (name, tensors, want) in cases {
        let path = dir.path(name);
        write_file(&path, tensors);
        let out = dir.path("x.png");
        let err = failing_render(&path, &out);
        assert!(err.contains(want), "{name}: {err}");
        assert!(
            err.contains("SDXL") && err.contains("SD 2.x"),
            "{name}: {err}"
        );
        assert!(err.trim().lines().count() <= 2, "{name}: {err}");
    }
}

/// Two LoRAs at once, one in each format (PEFT from diffusers' `save_lora_weights` at 0.7, kohya
/// with LoCon convolutions at 0.4), against diffusers' `load_lora_weights` + `set_adapters` +
/// `fuse_lora` (`tests/parity/make_lora_fixtures.py`); the PNG records both with their hashes.
#[test]
fn two_loras_in_both_formats_render_as_diffusers_fuses_them() {
    let root = repo_root().join("tests/parity/fixtures");
    let loras = root.join("sdxl_lora");
    let dir = scratch("lora-parity");
    let peft = format!("{}:0.7", loras.join("peft.safetensors").display());
    let kohya = format!("{}:0.4", loras.join("kohya.safetensors").display());
    let extra = ["--lora", &peft, "--lora", &kohya];
    let (latent_err, err) =
        pipeline_parity_with(&root.join("sdxl/model"), &loras, "cfg", &dir.0, &extra);
    eprintln!("LoRAs: rel. L2 error vs diffusers: latents {latent_err:.2e}, 8-bit image {err:.2e}");
    assert!(
        latent_err <= 1e-3,
        "latents rel. L2 error {latent_err:.3e} > 1e-3"
    );
    assert!(err <= 5e-3, "image rel. L2 error {err:.3e}");
    let png = std::fs::read(dir.path("cfg.png")).unwrap();
    let text = String::from_utf8_lossy(&png);
    assert!(
        text.contains("lora: peft.safetensors:0.7 (sha256:"),
        "PNG parameters lack the LoRA"
    );
    assert!(text.contains("lora: kohya.safetensors:0.4 (sha256:"));
}

#[test]
fn a_lora_for_another_model_names_its_unmatched_modules() {
    let root = repo_root().join("tests/parity/fixtures");
    let dir = scratch("lora-mismatch");
    let lora = root.join("sdxl_lora/kohya.safetensors");
    let out = dir.path("x.png");
    let o = tessera(&[
        "render",
        "--model",
        root.join("sd21/model").to_str().unwrap(),
        "--prompt",
        "x",
        "--steps",
        "1",
        "--lora",
        lora.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    // The tiny SD 2.1 shares the first module's name, not its shape; the second encoder's
    // module matches nothing at all: either way the file is named.
    assert!(err.contains("kohya.safetensors"), "{err}");
    assert!(
        err.contains("does not fit") || err.contains("match no weight"),
        "{err}"
    );
    assert!(err.trim().lines().count() <= 2, "{err}");
    assert!(!out.exists());
}

/// The job flags of the cluster tests: one small image, two steps.
const SMALL_JOB: [&str; 8] = [
    "--prompt",
    "a lighthouse",
    "--size",
    "64x64",
    "--steps",
    "2",
    "--seed",
    "7",
];

/// A coordinator and Redis in `dir`'s `cluster` folder, no workers yet.
fn start_cluster(dir: &Scratch) -> tessera_harness::LocalCluster {
    let cluster_dir = dir.path("cluster");
    std::fs::create_dir_all(&cluster_dir).unwrap();
    let opts = tessera_harness::ClusterOptions::default();
    tessera_harness::LocalCluster::start(Path::new(tessera_bin()), &cluster_dir, opts)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A worker process serving a single file (`worker --model FILE.safetensors`) renders the same
/// pixels as the embedded render of that file.
#[test]
fn a_cluster_worker_serves_a_single_file_as_the_embedded_render_does() {
    let dir = scratch("single-cluster");
    // A copy: the worker caches the file's fingerprint beside it.
    let model = dir.path("xl.safetensors");
    let fixture = repo_root().join("tests/parity/fixtures/sdxl_single/model.safetensors");
    std::fs::copy(&fixture, &model).unwrap();
    let flags = SMALL_JOB;
    let embedded = dir.path("embedded.png");
    let mut args = vec!["render", "--model", model.to_str().unwrap(), "-o"];
    args.push(embedded.to_str().unwrap());
    args.extend_from_slice(&flags);
    tessera_ok(&args);

    let mut cluster = start_cluster(&dir);
    // No --model-name: a file serves under its name without `.safetensors`.
    cluster
        .add_worker(&model, &[])
        .unwrap_or_else(|e| panic!("{e}"));
    cluster.wait_workers(1).unwrap_or_else(|e| panic!("{e}"));
    let mut submit = vec!["submit", "--model", "xl"];
    submit.extend_from_slice(&flags);
    let id = cluster.client_ok(&submit).unwrap_or_else(|e| panic!("{e}"));
    let watched = cluster.client(&["watch", id.trim()]).unwrap();
    assert!(watched.status.success(), "{}", cluster.logs());
    let fetched = dir.path("cluster.png");
    cluster
        .client_ok(&["fetch", id.trim(), "-o", fetched.to_str().unwrap()])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read_png(&fetched).2, read_png(&embedded).2);
}

/// The same checkpoint stored in f32 and bf16 (rewritten here from the f16 fixture): the f32
/// file holds the same values, so it renders the same latents; the bf16 one renders too.
#[test]
fn single_files_in_f32_and_bf16_load_as_f16_ones_do() {
    use candle_core::{DType, Device};
    let dir = scratch("single-dtypes");
    let fixture = repo_root().join("tests/parity/fixtures/sd21_single/model.safetensors");
    let tensors = candle_core::safetensors::load(&fixture, &Device::Cpu).unwrap();
    let render = |model: &Path, name: &str| {
        let out = dir.path(&format!("{name}.safetensors"));
        let png = dir.path(&format!("{name}.png"));
        tessera_ok(&[
            "render",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a lighthouse",
            "--size",
            "64x64",
            "--steps",
            "2",
            "--seed",
            "3",
            "--output-latents",
            out.to_str().unwrap(),
            "-o",
            png.to_str().unwrap(),
        ]);
        let t = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
        t["latents"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let f16 = render(&fixture, "f16");
    for (dtype, name) in [(DType::F32, "f32"), (DType::BF16, "bf16")] {
        let converted: std::collections::HashMap<String, candle_core::Tensor> = tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.to_dtype(dtype).unwrap()))
            .collect();
        let path = dir.path(&format!("model-{name}.safetensors"));
        candle_core::safetensors::save(&converted, &path).unwrap();
        let got = render(&path, name);
        if dtype == DType::F32 {
            assert_eq!(got, f16, "an f32 copy of an f16 file renders differently");
        } else {
            let err = rel_l2(&got, &f16);
            assert!(
                err.is_finite() && err < 0.2,
                "bf16: rel. L2 {err:.3e} from the f16 file"
            );
        }
    }
}

/// LoRAs on a cluster: the client sends each LoRA's name, weight and hash; the worker reads the
/// files from its `--lora-dir`. Two jobs with different LoRAs, submitted together to one
/// worker, each give the pixels of the embedded `render --lora`, and their PNGs record the
/// LoRAs as the embedded render does. A LoRA the worker lacks, or holds with other bytes,
/// fails its job at once, naming the file and the worker.
#[test]
fn cluster_jobs_with_different_loras_render_as_the_embedded_render_does() {
    let dir = scratch("lora-cluster");
    let fixtures = repo_root().join("tests/parity/fixtures");
    let model = dir.path("xl");
    copy_dir(&fixtures.join("sdxl/model"), &model);
    let lora_dir = dir.path("loras");
    copy_dir(&fixtures.join("sdxl_lora"), &lora_dir);
    let lora = |name: &str, weight: &str| format!("{}:{weight}", lora_dir.join(name).display());
    let (peft, kohya) = (
        lora("peft.safetensors", "0.7"),
        lora("kohya.safetensors", "0.4"),
    );
    let flags = SMALL_JOB;
    let embedded = |name: &str, lora: &str| {
        let out = dir.path(name);
        let mut args = vec!["render", "--model", model.to_str().unwrap(), "--lora", lora];
        args.extend_from_slice(&["-o", out.to_str().unwrap()]);
        args.extend_from_slice(&flags);
        tessera_ok(&args);
        read_png(&out)
    };
    let expected = [embedded("peft.png", &peft), embedded("kohya.png", &kohya)];
    assert!(
        expected[0].2 != expected[1].2,
        "the two LoRAs must change the picture"
    );

    let mut cluster = start_cluster(&dir);
    let extra = ["--lora-dir".to_string(), lora_dir.display().to_string()];
    cluster
        .add_worker(&model, &extra)
        .unwrap_or_else(|e| panic!("{e}"));
    cluster.wait_workers(1).unwrap_or_else(|e| panic!("{e}"));
    let submit = |lora: &str| {
        let mut args = vec!["submit", "--model", "xl", "--lora", lora];
        args.extend_from_slice(&flags);
        let id = cluster.client_ok(&args).unwrap_or_else(|e| panic!("{e}"));
        id.trim().to_string()
    };
    // Both queued before either is watched: the worker holds both sets at once.
    let ids = [submit(&peft), submit(&kohya)];
    for (i, (id, want)) in ids.iter().zip(&expected).enumerate() {
        let watched = cluster.client(&["watch", id]).unwrap();
        assert!(watched.status.success(), "{}", cluster.logs());
        let fetched = dir.path(&format!("cluster{i}.png"));
        cluster
            .client_ok(&["fetch", id, "-o", fetched.to_str().unwrap()])
            .unwrap_or_else(|e| panic!("{e}"));
        let got = read_png(&fetched);
        assert!(
            got.2 == want.2,
            "job {i}: pixels differ from the embedded render"
        );
        let lora_lines = |p: &(u32, u32, Vec<u8>, Vec<(String, String)>)| -> Vec<String> {
            let text = &p.3.iter().find(|(k, _)| k == "parameters").unwrap().1;
            text.lines()
                .filter(|l| l.starts_with("lora: "))
                .map(String::from)
                .collect()
        };
        assert_eq!(lora_lines(&got), lora_lines(want));
        assert_eq!(lora_lines(&got).len(), 1);
    }
    for line in cluster
        .logs()
        .lines()
        .filter(|l| l.contains("built a model with LoRAs") || l.contains("model loaded"))
    {
        eprintln!("{line}");
    }

    // The client's own files: one the worker lacks, one the worker holds with other bytes.
    let client_dir = dir.path("client");
    std::fs::create_dir_all(&client_dir).unwrap();
    let peft_bytes = std::fs::read(lora_dir.join("peft.safetensors")).unwrap();
    std::fs::write(client_dir.join("absent.safetensors"), &peft_bytes).unwrap();
    std::fs::write(client_dir.join("kohya.safetensors"), &peft_bytes).unwrap();
    for (name, why) in [
        ("absent.safetensors", "cannot be read"),
        ("kohya.safetensors", "has hash"),
    ] {
        let id = submit(&client_dir.join(name).display().to_string());
        let watched = cluster.client(&["watch", &id]).unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&watched.stdout),
            String::from_utf8_lossy(&watched.stderr)
        );
        assert!(!watched.status.success(), "{said}");
        assert!(said.contains(name) && said.contains(why), "{said}");
        assert!(said.contains("on worker"), "{said}");
        eprintln!("{name}: {}", said.trim());
    }
}

/// `submit` and `batch` hash each `--lora` file before they call the coordinator: a file that
/// cannot be read is an error naming it, and nothing is sent.
#[test]
fn submit_and_batch_name_a_lora_file_they_cannot_read() {
    let dir = scratch("lora-client");
    let prompts = dir.path("prompts.txt");
    std::fs::write(&prompts, "a lighthouse\n").unwrap();
    let missing = dir.path("gone.safetensors");
    let lora = missing.to_str().unwrap();
    // Port 9 (discard): nothing is ever called, so nothing needs to listen there.
    let at = ["--coordinator", "http://127.0.0.1:9", "--model", "xl"];
    for cmd in [
        vec!["submit", "--prompt", "a lighthouse", "--lora", lora],
        vec!["batch", prompts.to_str().unwrap(), "--lora", lora],
    ] {
        let mut args = cmd.clone();
        args.extend_from_slice(&at);
        let out = tessera(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains(&format!("--lora {lora}: cannot read it")),
            "{err}"
        );
    }
}
