//! `tessera model synth` and `tessera render` driven as a user drives them: the real binary,
//! real files, real exit codes; and the first mistakes a user makes (an output that cannot be
//! written, a size off the grid, no coordinator or Redis where the flags point).

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::*;

#[test]
fn readme_quick_start_renders_byte_identical_pngs() {
    let model = tiny_model("sdxl-tiny");
    let dir = scratch("quickstart");
    let (a, b) = (dir.path("a.png"), dir.path("b.png"));
    for out in [&a, &b] {
        tessera_ok(&[
            "render",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a lighthouse",
            "--size",
            "256x256",
            "--steps",
            "4",
            "--seed",
            "7",
            "-o",
            out.to_str().unwrap(),
        ]);
    }
    let (bytes_a, bytes_b) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(bytes_a, bytes_b, "same seed must give byte-identical PNGs");
    let (w, h, pixels, text) = read_png(&a);
    assert_eq!((w, h), (256, 256));
    let params = &text
        .iter()
        .find(|(k, _)| k == "parameters")
        .expect("parameters chunk")
        .1;
    for want in [
        "prompt: a lighthouse",
        "seed: 7",
        "steps: 4",
        "size: 256x256",
        "method: hybrid",
        "stages: 128x128,256x256",
        "scheduler: ddim",
    ] {
        assert!(params.contains(want), "{want:?} missing from {params:?}");
    }
    // A picture, not a constant: the random model still produces varied pixels.
    let distinct: std::collections::BTreeSet<u8> = pixels.iter().copied().collect();
    assert!(distinct.len() > 16, "image is nearly constant");

    // Another seed gives another picture.
    let c = dir.path("c.png");
    tessera_ok(&[
        "render",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a lighthouse",
        "--size",
        "256x256",
        "--steps",
        "4",
        "--seed",
        "8",
        "-o",
        c.to_str().unwrap(),
    ]);
    assert_ne!(read_png(&c).2, pixels);

    // 16-bit, with a Deep Zoom pyramid: the same picture at finer steps.
    let d = dir.path("deep.png");
    tessera_ok(&[
        "render",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a lighthouse",
        "--size",
        "256x256",
        "--steps",
        "4",
        "--seed",
        "7",
        "--bit-depth",
        "16",
        "--dzi",
        "always",
        "-o",
        d.to_str().unwrap(),
    ]);
    let (w16, h16, px16, text16) = read_png(&d);
    assert_eq!((w16, h16), (256, 256));
    assert_eq!(px16.len(), 2 * pixels.len(), "16 bits per sample");
    assert!(text16.iter().any(|(_, v)| v.contains("bit_depth: 16")));
    for (i, (p8, p16)) in pixels.iter().zip(px16.chunks(2)).enumerate() {
        let v16 = f64::from(u16::from_be_bytes([p16[0], p16[1]])) / 65535.0 * 255.0;
        assert!(
            (v16 - f64::from(*p8)).abs() <= 0.51,
            "sample {i}: 8-bit {p8}, 16-bit {v16}"
        );
    }
    // 256 px: levels 0..=8, level 8 is 2x2 tiles of 254 px with a 1 px overlap.
    assert!(dir.path("deep.dzi").is_file());
    assert!(dir.path("deep_viewer.html").is_file());
    let (tw, th, _, _) = read_png(&dir.path("deep_files/8/1_1.png"));
    assert_eq!((tw, th), (256 - 253, 256 - 253));
    assert_eq!(read_png(&dir.path("deep_files/0/0_0.png")).0, 1);
    assert!(!dir.path("deep.png.partial").exists() && !dir.path("deep_files.partial").exists());
}

#[test]
fn sd21_tiny_renders_non_square_with_ddim_and_writes_latents() {
    let model = tiny_model("sd21-tiny");
    let dir = scratch("sd21");
    let (png, lat) = (dir.path("o.png"), dir.path("o.safetensors"));
    tessera_ok(&[
        "render",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red boat",
        "--negative-prompt",
        "fog",
        "--size",
        "192x128",
        "--method",
        "single",
        "--steps",
        "3",
        "--seed",
        "3",
        "--output-latents",
        lat.to_str().unwrap(),
        "--preview",
        dir.path("preview.png").to_str().unwrap(),
        "-o",
        png.to_str().unwrap(),
    ]);
    let (w, h, _, text) = read_png(&png);
    assert_eq!((w, h), (192, 128));
    // The live preview: latent colours, not decoded; at the picture's own size, which is
    // smaller than a preview's 256 px.
    let (pw, ph, preview, ptext) = read_png(&dir.path("preview.png"));
    assert_eq!((pw, ph), (192, 128));
    assert!(preview.iter().any(|&v| v != preview[0]), "a flat preview");
    assert!(
        ptext.iter().any(|(_, v)| v.contains("preview")),
        "{ptext:?}"
    );
    assert!(text.iter().any(|(_, v)| v.contains("scheduler: ddim")));
    let t = candle_core::safetensors::load(&lat, &Device::Cpu).unwrap();
    assert_eq!(t["latents"].dims(), &[1, 4, 16, 24]);

    // --scheduler overrides the model's config; guidance 1 runs the conditional branch alone.
    let (euler, unguided) = (dir.path("euler.png"), dir.path("unguided.png"));
    tessera_ok(&[
        "render",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red boat",
        "--size",
        "192x128",
        "--method",
        "single",
        "--steps",
        "3",
        "--seed",
        "3",
        "--scheduler",
        "euler",
        "-o",
        euler.to_str().unwrap(),
    ]);
    let (_, _, euler_pixels, text) = read_png(&euler);
    assert!(text.iter().any(|(_, v)| v.contains("scheduler: euler")));
    tessera_ok(&[
        "render",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red boat",
        "--size",
        "192x128",
        "--method",
        "single",
        "--steps",
        "3",
        "--seed",
        "3",
        "--guidance",
        "1",
        "-o",
        unguided.to_str().unwrap(),
    ]);
    let base = read_png(&png).2;
    assert_ne!(euler_pixels, base);
    assert_ne!(read_png(&unguided).2, base);
}

/// Renders a diffusers-made model directory from the pipeline's own initial latents and
/// compares with what diffusers' pipeline produced for the same inputs.
fn diffusers_pipeline_parity(arch: &str, case: &str) {
    let root = repo_root().join("tests/parity/fixtures").join(arch);
    let dir = scratch(&format!("parity-{arch}-{case}"));
    let (latent_err, err) = pipeline_parity(&root.join("model"), &root, case, &dir.0);
    assert!(
        latent_err <= 1e-3,
        "{arch}/{case}: final latents rel. L2 error {latent_err:.3e} > 1e-3"
    );
    assert!(
        err <= 5e-3,
        "{arch}/{case}: image rel. L2 error {err:.3e} (8-bit quantised)"
    );
    eprintln!("{arch}/{case}: rel. L2 error vs diffusers: latents {latent_err:.2e}, 8-bit image {err:.2e}");
}

#[test]
fn diffusers_made_sd21_directory_matches_diffusers_pipeline() {
    diffusers_pipeline_parity("sd21", "cfg");
}

#[test]
fn diffusers_made_sdxl_directory_matches_diffusers_pipeline() {
    diffusers_pipeline_parity("sdxl", "cfg");
    diffusers_pipeline_parity("sdxl", "noneg");
}

/// Truncates a file to half its length (a weights file whose header still reads).
fn cut_in_half(path: &Path) {
    let len = std::fs::metadata(path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
}

#[test]
fn broken_model_directories_get_short_errors_naming_the_file() {
    let good = tiny_model("sdxl-tiny");
    let dir = scratch("broken");

    // A truncated UNet file.
    let m = dir.path("truncated");
    copy_dir(&good, &m);
    cut_in_half(&m.join("unet/diffusion_pytorch_model.safetensors"));
    let err = failing_render(&m, &dir.path("a.png"));
    assert!(
        err.contains("unet/diffusion_pytorch_model.safetensors"),
        "{err}"
    );
    assert!(err.contains("truncated or corrupt"), "{err}");

    // A missing unet/config.json.
    let m = dir.path("noconfig");
    copy_dir(&good, &m);
    std::fs::remove_file(m.join("unet/config.json")).unwrap();
    let err = failing_render(&m, &dir.path("b.png"));
    assert!(err.contains("unet/config.json"), "{err}");
    assert!(err.contains("missing"), "{err}");

    // A unet file holding the wrong tensors (the VAE's).
    let m = dir.path("wrongtensors");
    copy_dir(&good, &m);
    std::fs::copy(
        m.join("vae/diffusion_pytorch_model.safetensors"),
        m.join("unet/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let err = failing_render(&m, &dir.path("c.png"));
    assert!(err.contains("unet"), "{err}");
    assert!(
        err.contains("conv_in") || err.contains("cannot find tensor") || err.contains("shape"),
        "{err}"
    );

    // Not a model directory at all.
    let err = failing_render(&dir.path("nothing-here"), &dir.path("d.png"));
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn bad_flags_get_clear_errors() {
    let model = tiny_model("sdxl-tiny");
    let m = model.to_str().unwrap();
    let dir = scratch("flags");
    let out = dir.path("x.png");
    let o = out.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--size", "250x256"],
            "use --size 192x256 or --size 256x256",
        ),
        (&["--size", "256"], "WIDTHxHEIGHT"),
        (&["--steps", "0"], "use 1 to 1000"),
        (&["--guidance", "NaN"], "guidance"),
        (&["--scheduler", "pndm"], "ddim"),
        (&["--device", "gpu"], "use cpu or cuda:N"),
        (
            &["--latents", "/nonexistent/l.safetensors"],
            "cannot read latents",
        ),
    ];
    expect_render_errors(&model, &out, cases);
    // Latents of the wrong shape.
    let lat = dir.path("l.safetensors");
    let t = Tensor::zeros((1, 4, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("x", t)]), &lat).unwrap();
    let r = tessera(&[
        "render",
        "--model",
        m,
        "--prompt",
        "x",
        "--size",
        "128x128",
        "--latents",
        lat.to_str().unwrap(),
        "--steps",
        "1",
        "-o",
        o,
    ]);
    assert!(!r.status.success());
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("--size 64x64"),
        "{:?}",
        r
    );
}

#[test]
fn every_subcommand_has_help() {
    for args in [
        vec!["--help"],
        vec!["render", "--help"],
        vec!["model", "--help"],
        vec!["model", "synth", "--help"],
    ] {
        let o = tessera_ok(&args);
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.contains("Usage:"), "{args:?}: {text}");
    }
    let o = tessera_ok(&["render", "--help"]);
    let text = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--model",
        "--prompt",
        "--negative-prompt",
        "--size",
        "--steps",
        "--guidance",
        "--scheduler",
        "--seed",
        "--latents",
        "--output-latents",
        "--device",
        "--output",
    ] {
        assert!(text.contains(flag), "render --help lacks {flag}");
    }
}

#[test]
fn synth_is_deterministic_and_never_overwrites_foreign_directories() {
    let dir = scratch("synth");
    let (a, b, c) = (dir.path("a"), dir.path("b"), dir.path("c"));
    for (out, seed) in [(&a, "5"), (&b, "5"), (&c, "6")] {
        tessera_ok(&[
            "model",
            "synth",
            "--arch",
            "sd21-tiny",
            "--out",
            out.to_str().unwrap(),
            "--seed",
            seed,
        ]);
    }
    let files = [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "unet/config.json",
        "scheduler/scheduler_config.json",
        "model_index.json",
    ];
    for f in files {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f} differs"
        );
    }
    assert_ne!(
        std::fs::read(a.join("unet/diffusion_pytorch_model.safetensors")).unwrap(),
        std::fs::read(c.join("unet/diffusion_pytorch_model.safetensors")).unwrap()
    );
    // A directory that is not a synthesized model is never replaced.
    let foreign = dir.path("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("keep.txt"), "mine").unwrap();
    let o = tessera(&[
        "model",
        "synth",
        "--arch",
        "sdxl-tiny",
        "--out",
        foreign.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not empty"));
    assert_eq!(
        std::fs::read_to_string(foreign.join("keep.txt")).unwrap(),
        "mine"
    );
}

/// Every file name in `dir`, sorted: what a refused command must leave unchanged.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn outputs_that_cannot_be_written_are_refused_before_the_weights_load() {
    // Weights cut short: a render that reaches the model load fails on them, so a refusal
    // naming an output flag proves the outputs were checked first.
    let dir = scratch("outputs");
    let model = dir.path("model");
    copy_dir(&tiny_model("sdxl-tiny"), &model);
    cut_in_half(&model.join("unet/diffusion_pytorch_model.safetensors"));
    let (png, missing) = (dir.path("a.png"), dir.path("no-such-dir/a.png"));
    let render = |extra: &[&str]| {
        let mut args = vec![
            "render",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "x",
        ];
        args.extend_from_slice(&["--size", "256x256", "--steps", "4"]);
        args.extend_from_slice(extra);
        String::from_utf8_lossy(&tessera(&args).stderr).into_owned()
    };
    let err = render(&["-o", png.to_str().unwrap()]);
    assert!(err.contains("truncated or corrupt"), "{err}");

    let before = listing(&dir.0);
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["-o", missing.to_str().unwrap()],
            format!("-o {}: the directory", missing.display()),
        ),
        (
            vec![
                "-o",
                png.to_str().unwrap(),
                "--output-latents",
                missing.to_str().unwrap(),
            ],
            "--output-latents".into(),
        ),
        (
            vec![
                "-o",
                png.to_str().unwrap(),
                "--preview",
                missing.to_str().unwrap(),
            ],
            "--preview".into(),
        ),
        (vec!["-o", dir.0.to_str().unwrap()], "is a directory".into()),
        (
            vec![
                "-o",
                png.to_str().unwrap(),
                "--preview",
                png.to_str().unwrap(),
            ],
            "-o and --preview both name".into(),
        ),
    ];
    for (extra, want) in &cases {
        let err = render(extra);
        assert!(err.contains(want.as_str()), "{extra:?}: {err}");
        assert!(
            !err.contains("truncated"),
            "{extra:?} loaded the weights first: {err}"
        );
    }
    assert_eq!(
        listing(&dir.0),
        before,
        "a refused render left files behind"
    );

    // fetch and watch check their files before calling a coordinator (none runs here).
    let err = tessera(&["fetch", "job", "-o", missing.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&err.stderr);
    assert!(
        err.contains("-o ") && err.contains("does not exist"),
        "{err}"
    );
    let err = tessera(&["watch", "job", "--preview", missing.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&err.stderr);
    assert!(
        err.contains("--preview ") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn a_size_off_the_grid_gets_a_size_that_keeps_every_rule() {
    let model = tiny_model("sdxl-tiny");
    let m = model.to_str().unwrap();
    // 500 is neither on the cascade's 64-pixel grid nor are its halves: the size offered is
    // in the user's words and plans at once.
    let r = tessera(&["plan", "--model", m, "--size", "500x500"]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("--size 500x500:") && err.contains("use --size 448x448 or --size 512x512"),
        "{err}"
    );
    assert!(!err.contains("stage"), "{err}");
    for offered in ["448x448", "512x512"] {
        tessera_ok(&["plan", "--model", m, "--size", offered]);
    }
    // --stages alone: the last stage is the picture's size.
    let r = tessera_ok(&[
        "plan",
        "--model",
        m,
        "--stages",
        "128x128,256x192",
        "--json",
    ]);
    let plan: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(plan["stages"][1]["size"], serde_json::json!([256, 192]));

    // An init image of another shape is measured against the first stage, named as such.
    let dir = scratch("init-aspect");
    let init = dir.path("wide.png");
    write_png(&init, 64, 32, png::ColorType::Rgb, &[90; 64 * 32 * 3]);
    let out = dir.path("x.png");
    let cases: &[(&[&str], &str)] = &[(
        &["--size", "256x256", "--init-image", init.to_str().unwrap()],
        "but the first stage, which it is resized to, is 128x128",
    )];
    expect_render_errors(&model, &out, cases);
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Starts `tessera ARGS` with stderr piped (so not a terminal, and without NO_COLOR), waits
/// for a stderr line containing `want` (at most a minute), stops the process and returns the
/// stderr read so far.
fn stderr_until(args: &[&str], want: &str) -> String {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(tessera_bin())
        .args(args)
        .env_remove("NO_COLOR")
        .env_remove("TESSERA_LOG")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
                if line.contains(want) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    seen
}

#[test]
fn connection_errors_name_the_address_and_how_to_point_elsewhere() {
    let url = format!("http://127.0.0.1:{}", closed_port());
    // No coordinator there: each client command fails at once, naming the URL and the
    // flag and variable that change it; watch does not wait for one that never came.
    for args in [
        vec!["status", "j", "--coordinator", url.as_str()],
        vec!["watch", "j", "--coordinator", url.as_str()],
        vec![
            "submit",
            "--model",
            "m",
            "--prompt",
            "x",
            "--coordinator",
            url.as_str(),
        ],
    ] {
        let r = tessera(&args);
        assert!(!r.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(
            err.contains(&format!("cannot reach the coordinator at {url}"))
                && err.contains("--coordinator URL")
                && err.contains("TESSERA_COORDINATOR"),
            "{args:?}: {err}"
        );
    }
    let r = std::process::Command::new(tessera_bin())
        .args(["list"])
        .env("TESSERA_COORDINATOR", &url)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&r.stderr).contains(&url));

    // No Redis there: coordinator and worker say where they wait, with the password masked,
    // and what to change; stderr is not a terminal, so the log has no colour codes.
    let redis = format!("redis://:hunter2@127.0.0.1:{}/0", closed_port());
    let masked = redis.replace("hunter2", "***");
    let model = tiny_model("sdxl-tiny");
    let coordinator = ["coordinator", "--redis", &redis, "--listen", "127.0.0.1:0"];
    let worker = [
        "worker",
        "--redis",
        &redis,
        "--model",
        model.to_str().unwrap(),
    ];
    for args in [&coordinator[..], &worker[..]] {
        let log = stderr_until(args, "waiting for Redis");
        assert!(
            log.contains(&format!("waiting for Redis at {masked}"))
                && log.contains("--redis URL or the TESSERA_REDIS variable"),
            "{args:?}: {log}"
        );
        assert!(!log.contains("hunter2"), "{log}");
        assert!(
            !log.contains('\x1b'),
            "colour codes in a log that is not a terminal: {log:?}"
        );
    }
}
