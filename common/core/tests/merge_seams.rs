//! Tile seams of the local-view merge, and the global-view round trip.
//!
//! A smooth analytic function stands in for the model: view i's output at its local pixel
//! (ly, lx) is `field(global y, global x) + disagreement(i, ly)`, so every view sees the same
//! picture but the views disagree slightly and smoothly, as real model outputs of overlapping
//! tiles do. The merged result must not jump where a view starts or ends: the largest
//! neighbour difference across any tile border may not exceed `TOLERANCE` × the largest one
//! found strictly inside tiles. A "last view wins" paste of the same outputs, done by hand
//! below, fails that check, which shows the check can fail.

use std::collections::BTreeSet;

use candle_core::{DType, Device, Tensor};
use tessera_core::tiling::{
    EdgePadding, GlobalViewConfig, GlobalViews, LocalViewConfig, LocalViews, ViewWeighting,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const CHANNELS: usize = 2;
/// Border steps may be this much larger than the largest step inside tiles.
const TOLERANCE: f64 = 1.5;

/// The picture every view agrees on: smooth, with gradients up to about 0.07 per pixel.
fn field(c: usize, y: f64, x: f64) -> f64 {
    match c {
        0 => (0.05 * y).sin() * (0.07 * x).cos() + 0.01 * y,
        _ => (0.04 * y + 0.03 * x).cos() - 0.005 * x,
    }
}

/// How view `view` departs from the field at its local row `ly`: smooth inside the view,
/// different from view to view (amplitude 0.05, as a model's tile-to-tile disagreement).
fn disagreement(view: usize, c: usize, ly: f64) -> f64 {
    0.05 * (view as f64 + 0.1 * ly + c as f64).sin()
}

/// Every view's "model output", `(1, CHANNELS, window_h, window_w)` f32.
fn outputs(views: &LocalViews) -> candle_core::Result<Vec<Tensor>> {
    let (vh, vw) = views.window();
    views
        .rects()
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut v = Vec::with_capacity(CHANNELS * vh * vw);
            for c in 0..CHANNELS {
                for ly in 0..vh {
                    for lx in 0..vw {
                        let (y, x) = ((r.top + ly as i64) as f64, (r.left + lx as i64) as f64);
                        v.push((field(c, y, x) + disagreement(i, c, ly as f64)) as f32);
                    }
                }
            }
            Tensor::from_vec(v, (1, CHANNELS, vh, vw), &Device::Cpu)
        })
        .collect()
}

/// Rows and columns where some view starts or ends, inside the latent: the pair of pixels
/// (k − 1, k) straddles a border when k is in the set.
fn borders(views: &LocalViews) -> (BTreeSet<usize>, BTreeSet<usize>) {
    let (h, w) = views.latent_size();
    let (mut rows, mut cols) = (BTreeSet::new(), BTreeSet::new());
    for r in views.rects() {
        for (set, start, len, dim) in [
            (&mut rows, r.top, r.height, h),
            (&mut cols, r.left, r.width, w),
        ] {
            for k in [start, start + len as i64] {
                if k > 0 && k < dim as i64 {
                    set.insert(k as usize);
                }
            }
        }
    }
    (rows, cols)
}

/// Largest |neighbour difference| across borders and strictly inside tiles, over all
/// channels, of a `(CHANNELS, h, w)` image; with `residual` the field is subtracted first,
/// leaving only what the merge made of the views' disagreement.
fn steps(views: &LocalViews, img: &[f32], residual: bool) -> (f64, f64) {
    let (h, w) = views.latent_size();
    let (rows, cols) = borders(views);
    let at = |c: usize, y: usize, x: usize| {
        let v = img[(c * h + y) * w + x] as f64;
        if residual {
            v - field(c, y as f64, x as f64)
        } else {
            v
        }
    };
    let (mut border, mut inside) = (0f64, 0f64);
    for c in 0..CHANNELS {
        for y in 0..h {
            for x in 0..w {
                if x > 0 {
                    let d = (at(c, y, x) - at(c, y, x - 1)).abs();
                    let m = if cols.contains(&x) {
                        &mut border
                    } else {
                        &mut inside
                    };
                    *m = m.max(d);
                }
                if y > 0 {
                    let d = (at(c, y, x) - at(c, y - 1, x)).abs();
                    let m = if rows.contains(&y) {
                        &mut border
                    } else {
                        &mut inside
                    };
                    *m = m.max(d);
                }
            }
        }
    }
    (border, inside)
}

/// The wrong merge: views pasted in index order, each overwriting what is under it.
fn last_view_wins(views: &LocalViews, outs: &[Tensor]) -> candle_core::Result<Vec<f32>> {
    let (h, w) = views.latent_size();
    let (vh, vw) = views.window();
    let mut img = vec![f32::NAN; CHANNELS * h * w];
    for (r, out) in views.rects().iter().zip(outs) {
        let v = out.flatten_all()?.to_vec1::<f32>()?;
        for c in 0..CHANNELS {
            for ly in 0..vh {
                for lx in 0..vw {
                    let (y, x) = (r.top + ly as i64, r.left + lx as i64);
                    if (0..h as i64).contains(&y) && (0..w as i64).contains(&x) {
                        img[(c * h + y as usize) * w + x as usize] = v[(c * vh + ly) * vw + lx];
                    }
                }
            }
        }
    }
    assert!(img.iter().all(|v| v.is_finite()), "a pixel no view covers");
    Ok(img)
}

fn flat(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// (latent h, latent w, window): the 96x160 case of the issue, and the 8K geometry of SDXL
/// (latent 1024 over window 128) scaled down to 256 over 32, 15 x 15 views.
const GEOMETRIES: [(usize, usize, usize); 2] = [(96, 160, 32), (256, 256, 32)];
const SEEDS: [u64; 3] = [1, 7, 2024];

/// Runs the seam check on every geometry and seed with jitter on; returns the failures.
/// With `residual` the field is subtracted before comparing steps. Also asserts the check's
/// power: the last-view-wins paste of the same outputs must fail it.
fn seam_failures(
    weighting: ViewWeighting,
    residual: bool,
) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let mut failures = Vec::new();
    for (h, w, win) in GEOMETRIES {
        for seed in SEEDS {
            let cfg = LocalViewConfig::for_training_size(win);
            let views = LocalViews::new(h, w, &cfg, Some(seed))?;
            // Jitter is on: some window is off the plain stride grid.
            let stride = win as i64 / 2;
            assert!(views
                .rects()
                .iter()
                .any(|r| r.top % stride != 0 || r.left % stride != 0));
            let outs = outputs(&views)?;
            let merged = views.merge(&outs, weighting)?;
            assert_eq!(merged.dims(), &[1, CHANNELS, h, w]);
            let (border, inside) = steps(&views, &flat(&merged)?, residual);
            if border > TOLERANCE * inside {
                failures.push(format!(
                    "{h}x{w}/{win} seed {seed}: border step {border:.4} > {TOLERANCE} x inside step {inside:.4}"
                ));
            }
            // The check's power: pasting the same outputs without blending leaves steps of
            // the views' disagreement at the borders, and the check must see them.
            let (border, inside) = steps(&views, &last_view_wins(&views, &outs)?, residual);
            assert!(
                border > TOLERANCE * inside,
                "{h}x{w}/{win} seed {seed}: last-view-wins must show seams ({border} vs {inside})"
            );
        }
    }
    Ok(failures)
}

#[test]
fn gaussian_merge_shows_no_step_at_tile_borders() -> TestResult {
    let failures = seam_failures(ViewWeighting::GAUSSIAN, false)?;
    assert!(failures.is_empty(), "{failures:#?}");
    Ok(())
}

#[test]
fn gaussian_merge_has_no_seam_even_in_the_residual() -> TestResult {
    // Stricter: with the field subtracted only the blended disagreement is left. Gaussian
    // weights fade a view out before its border, so no border step exceeds the cross-fade
    // steps inside tiles. (Measured: border ≤ 0.93 x inside; last-view-wins ≈ 19 x.)
    let failures = seam_failures(ViewWeighting::GAUSSIAN, true)?;
    assert!(failures.is_empty(), "{failures:#?}");
    Ok(())
}

/// The same requirement for the uniform average (`--tile-weights uniform`, the reference's
/// plain average; Tessera's default is `gaussian`). It does not hold: where a view starts, the plain average jumps by (its output − the mean of the
/// others) / count, about half the views' disagreement where two views overlap. Measured
/// with the disagreement above (amplitude 0.05): border steps 0.091–0.118 against inside
/// steps of 0.070 (1.3–1.7 x); with the field subtracted 0.047–0.053 against 0.005 (≈ 10 x;
/// last-view-wins ≈ 0.095). Run with `--ignored` to see it.
#[test]
#[ignore = "known: a uniform average of disagreeing views steps at tile borders (--tile-weights uniform; the default is gaussian)"]
fn uniform_merge_shows_no_step_at_tile_borders() -> TestResult {
    let failures = seam_failures(ViewWeighting::Uniform, false)?;
    assert!(failures.is_empty(), "{failures:#?}");
    Ok(())
}

#[test]
fn agreeing_views_merge_to_the_field() -> TestResult {
    // Without disagreement every weighting returns the field itself (up to f32 rounding).
    let (h, w, win) = GEOMETRIES[0];
    let views = LocalViews::new(h, w, &LocalViewConfig::for_training_size(win), Some(3))?;
    let (vh, vw) = views.window();
    let outs = views
        .rects()
        .iter()
        .map(|r| {
            let v: Vec<f32> = (0..CHANNELS * vh * vw)
                .map(|k| {
                    let (c, ly, lx) = (k / (vh * vw), k / vw % vh, k % vw);
                    let (y, x) = (r.top + ly as i64, r.left + lx as i64);
                    field(c, y as f64, x as f64) as f32
                })
                .collect();
            Tensor::from_vec(v, (1, CHANNELS, vh, vw), &Device::Cpu)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    for weighting in [ViewWeighting::Uniform, ViewWeighting::GAUSSIAN] {
        let got = flat(&views.merge(&outs, weighting)?)?;
        for (k, g) in got.iter().enumerate() {
            let (c, y, x) = (k / (h * w), k / w % h, k % w);
            let want = field(c, y as f64, x as f64);
            assert!(
                (*g as f64 - want).abs() < 1e-5,
                "{weighting:?} ({c},{y},{x}): {g} vs {want}"
            );
        }
    }
    Ok(())
}

#[test]
fn global_views_round_trip_exactly() -> TestResult {
    // (h, w, training size): multiples of the stride and of the alignment, and not.
    let cases = [
        (256, 256, 128),
        (96, 160, 32),
        (100, 170, 32),
        (375, 212, 128),
        (33, 65, 32),
    ];
    for (h, w, b) in cases {
        let n = 3 * h * w;
        let vals: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1031) as f32) * 0.125 - 64.0)
            .collect();
        let latent = Tensor::from_vec(vals.clone(), (1, 3, h, w), &Device::Cpu)?;
        for padding in [
            EdgePadding::Zero,
            EdgePadding::Replicate,
            EdgePadding::Reflect,
        ] {
            let cfg = GlobalViewConfig {
                padding,
                ..GlobalViewConfig::for_training_size(b)
            };
            let g = match GlobalViews::new(h, w, &cfg) {
                Ok(g) => g,
                // Reflect cannot pad more rows than the axis has; the error says so.
                Err(_) if padding == EdgePadding::Reflect => continue,
                Err(e) => return Err(e.into()),
            };
            let (sh, sw) = g.strides();
            assert_eq!((sh, sw), (h.div_ceil(b), w.div_ceil(b)));
            let (vh, vw) = g.view_size();
            assert!(vh <= b && vw <= b && vh * sh >= h && vw * sw >= w);
            let outs = (0..g.len())
                .map(|i| g.extract(&latent, i))
                .collect::<Result<Vec<_>, _>>()?;
            let back = g.merge(&outs)?;
            assert_eq!(flat(&back)?, vals, "{h}x{w} b={b} {padding:?}");
            // Each latent pixel comes from exactly the view of its phase (y mod s_h, x mod s_w).
            let tags = (0..g.len())
                .map(|i| Tensor::full(i as f32, (1, 1, vh, vw), &Device::Cpu))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let owner = flat(&g.merge(&tags)?)?;
            for (k, o) in owner.iter().enumerate() {
                let (y, x) = (k / w, k % w);
                assert_eq!(
                    *o as usize,
                    (y % sh) * sw + x % sw,
                    "{h}x{w} pixel ({y},{x})"
                );
            }
        }
    }
    // The merge is a scatter, not an average: doubling one view's output changes only its
    // pixels.
    let g = GlobalViews::new(96, 160, &GlobalViewConfig::for_training_size(32))?;
    let latent = Tensor::ones((1, 1, 96, 160), DType::F32, &Device::Cpu)?;
    let mut outs = (0..g.len())
        .map(|i| g.extract(&latent, i))
        .collect::<Result<Vec<_>, _>>()?;
    outs[4] = (&outs[4] * 2.0)?;
    let back = flat(&g.merge(&outs)?)?;
    let (sh, sw) = g.strides();
    for (k, v) in back.iter().enumerate() {
        let own = (k / 160 % sh) * sw + k % 160 % sw == 4;
        assert_eq!(*v, if own { 2.0 } else { 1.0 });
    }
    Ok(())
}
