//! A step's end — guidance and the scheduler step — run a band of rows at a time behind the
//! merge, so that after the step's last result only the last band is left.
//!
//! The merge (and the scale fusion behind it) settles the stage's merged predictions from the
//! top down while later views still compute. Classifier-free guidance and every scheduler
//! step Tessera runs (DDIM without clipping, Euler, flow matching) are value by value, so each
//! band of settled rows is guided and stepped as soon as it is final, straight from the
//! merged values into the next latent: each value goes through the whole-latent pass's
//! arithmetic (`guidance::cfg_value`, `sched::ValueStep`), so the bytes are the same. FA-CFG's
//! low band resamples through the previous stage's size, so its rows follow the final ones a
//! few rows behind (`facfg::FaCfgBands`, the same bytes as `fa_cfg`). A DDIM that clips x̂₀
//! keeps its step end after the last result.

use candle_core::{Device, Tensor};
use tessera_core::codec::with_f32_values;
use tessera_core::method::facfg::{FaCfgBands, FaCfgWeights};
use tessera_core::method::guidance::cfg_value;
use tessera_core::plan::GuidancePlan;
use tessera_core::sched::{StageStepper as Stepper, ValueStep};

use super::step_input::{InputRule, StepInput};
use super::{EngineError, Result};
use std::sync::Arc;

/// Values past which a band is split between threads.
const PARALLEL_MIN: usize = 1 << 16;

/// Guidance and the scheduler step of one step over the rows of the merged predictions that
/// are final so far; the next latent and the predicted clean latent fill in as they go.
pub struct StepEnd {
    /// Whether the merged predictions hold both halves.
    guided: bool,
    guide: Guide,
    step: ValueStep,
    /// The step's sample, `(1, C, H, W)` contiguous f32 on the CPU.
    sample: Tensor,
    /// `(C, H, W)` of the latent.
    dims: (usize, usize, usize),
    /// Rows stepped so far.
    done: usize,
    next: Vec<f32>,
    x0: Vec<f32>,
    /// Where the next step's first rows go as soon as they are stepped (its input, scaled
    /// for the model), and up to which row.
    publish: Option<(Arc<StepInput>, InputRule, usize)>,
}

impl StepEnd {
    /// The end of step `j` at `t` from `sample`, or `None` where it cannot run in bands: a
    /// step that is not value by value, or a sample that is not one contiguous `(1, C, H, W)`
    /// f32 latent on the CPU (the whole-latent path then runs as before).
    pub fn new(
        guidance: &GuidancePlan,
        guided: bool,
        stepper: &Stepper,
        (j, t): (usize, f64),
        sample: &Tensor,
    ) -> Option<Self> {
        let (1, channels, h, w) = sample.dims4().ok()? else {
            return None;
        };
        with_f32_values(sample, |_| ())?;
        let step = stepper.value_step(j, t)?;
        let guide = match (guidance, guided) {
            (GuidancePlan::Cfg { scale }, true) => Guide::Cfg(*scale as f32),
            (
                GuidancePlan::FaCfg {
                    high,
                    low,
                    low_latent,
                },
                true,
            ) => {
                let weights = FaCfgWeights {
                    high: *high,
                    low: *low,
                };
                let low_hw = (low_latent[0], low_latent[1]);
                Guide::FaCfg(Box::new(
                    FaCfgBands::new(channels, (h, w), low_hw, weights).ok()?,
                ))
            }
            _ => Guide::Cond,
        };
        let n = channels * h * w;
        Some(Self {
            guided,
            guide,
            step,
            sample: sample.clone(),
            dims: (channels, h, w),
            done: 0,
            next: vec![0.0; n],
            x0: vec![0.0; n],
            publish: None,
        })
    }

    /// Publishes the next latent's rows `0..rows` to `input` as they are stepped, made the
    /// model's input by `rule` (see [`StepInput`]).
    pub fn publish_to(&mut self, input: Arc<StepInput>, rule: InputRule, rows: usize) {
        self.publish = Some((input, rule, rows));
    }

    /// Guides and steps rows `done..upto` of `merged`, the `(halves, C, H, W)` merged
    /// predictions (`[uncond; cond]` guided, `[cond]` otherwise), whose rows `0..upto` are
    /// final.
    pub fn advance(&mut self, merged: &[f32], upto: usize) -> Result<()> {
        let (channels, h, w) = self.dims;
        let (from, upto) = (self.done, upto.min(h));
        if upto <= from {
            return Ok(());
        }
        let plane = h * w;
        let halves = if self.guided { 2 } else { 1 };
        if merged.len() != halves * channels * plane {
            return Err(EngineError::Invalid(format!(
                "merged predictions of {} values for {halves} halves of a {channels}x{h}x{w} \
                 latent",
                merged.len()
            )));
        }
        // FA-CFG's rows lag the final ones by its resampling's reach.
        let upto = match &mut self.guide {
            Guide::FaCfg(bands) => {
                let (uncond, cond) = merged.split_at(channels * plane);
                bands.advance(uncond, cond, upto)
            }
            _ => upto,
        };
        if upto <= from {
            return Ok(());
        }
        let sample = self.sample.clone();
        with_f32_values(&sample, |sample| {
            self.step_rows(sample, merged, (from, upto))
        })
        .ok_or_else(|| EngineError::Invalid("the step's sample moved".into()))?;
        if let Some((input, rule, limit)) = &self.publish {
            input.publish(&self.next, (from, upto), rule, *limit);
        }
        self.done = upto;
        Ok(())
    }

    /// Guides and steps rows `from..upto` of every plane, from `sample`'s values.
    fn step_rows(&mut self, sample: &[f32], merged: &[f32], (from, upto): (usize, usize)) {
        let (channels, h, w) = self.dims;
        let plane = h * w;
        let rows = from * w..upto * w;
        let (guided, guide, step) = (self.guided, &self.guide, self.step);
        let parallel = rows.len() * channels >= PARALLEL_MIN;
        std::thread::scope(|scope| {
            let planes = self
                .next
                .chunks_exact_mut(plane)
                .zip(self.x0.chunks_exact_mut(plane));
            for (c, (next, x0)) in planes.enumerate() {
                let at = |p: usize| &merged[p * plane..(p + 1) * plane][rows.clone()];
                let (cond, uncond) = match guided {
                    true => (at(channels + c), Some(at(c))),
                    false => (at(c), None),
                };
                let band = Band {
                    at: (c, from, w),
                    cond,
                    uncond,
                    sample: &sample[c * plane..(c + 1) * plane][rows.clone()],
                    next: &mut next[rows.clone()],
                    x0: &mut x0[rows.clone()],
                };
                if parallel {
                    scope.spawn(move || band.run(guide, step));
                } else {
                    band.run(guide, step);
                }
            }
        });
    }

    /// The next latent and the predicted clean latent, once every row is stepped.
    pub fn finish(self) -> Result<(Tensor, Tensor)> {
        let (channels, h, w) = self.dims;
        if self.done != h {
            return Err(EngineError::Invalid(format!(
                "the step end reached row {} of {h}",
                self.done
            )));
        }
        let shape = (1, channels, h, w);
        Ok((
            Tensor::from_vec(self.next, shape, &Device::Cpu)?,
            Tensor::from_vec(self.x0, shape, &Device::Cpu)?,
        ))
    }
}

/// How the merged halves become the step's prediction.
enum Guide {
    /// The conditional prediction alone (unguided).
    Cond,
    /// Classifier-free guidance at this scale.
    Cfg(f32),
    FaCfg(Box<FaCfgBands>),
}

/// One channel's rows of a band: the merged halves and the sample in, the step's outputs out.
struct Band<'v> {
    /// (channel, first row, row width).
    at: (usize, usize, usize),
    cond: &'v [f32],
    uncond: Option<&'v [f32]>,
    sample: &'v [f32],
    next: &'v mut [f32],
    x0: &'v mut [f32],
}

impl Band<'_> {
    fn run(self, guide: &Guide, step: ValueStep) {
        let outs = self.next.iter_mut().zip(self.x0.iter_mut());
        let ins = self.cond.iter().zip(self.sample);
        match (guide, self.uncond) {
            (Guide::Cfg(w), Some(u)) => {
                for (((n, x), (&c, &s)), &u) in outs.zip(ins).zip(u) {
                    (*n, *x) = step.apply(cfg_value(u, c, *w), s);
                }
            }
            (Guide::FaCfg(bands), Some(u)) => {
                let (plane, first, w) = self.at;
                let mut eps = vec![0f32; w];
                let rows = self
                    .next
                    .chunks_exact_mut(w)
                    .zip(self.x0.chunks_exact_mut(w));
                let ins = self.cond.chunks_exact(w).zip(u.chunks_exact(w));
                for (r, ((next, x0), (c, u))) in rows.zip(ins).enumerate() {
                    bands.guide_row(plane, first + r, (u, c), &mut eps);
                    let s = &self.sample[r * w..(r + 1) * w];
                    for (((n, x), &e), &s) in next.iter_mut().zip(x0.iter_mut()).zip(&eps).zip(s) {
                        (*n, *x) = step.apply(e, s);
                    }
                }
            }
            _ => {
                for ((n, x), (&c, &s)) in outs.zip(ins) {
                    (*n, *x) = step.apply(c, s);
                }
            }
        }
    }
}

/// A stepper of `schedule` from a diffusers config of `kind` (SDXL's betas; `prediction`
/// and DDIM's clipping as given), for tests.
#[cfg(test)]
pub(super) fn test_stepper_of(
    kind: tessera_core::sched::SchedulerKind,
    prediction: &str,
    clip: bool,
    schedule: &tessera_core::plan::StageSchedule,
) -> Stepper {
    use tessera_core::sched::{SchedulerConfig, SchedulerKind};
    let json = match kind {
        SchedulerKind::FlowEuler => r#"{"_class_name": "FlowMatchEulerDiscreteScheduler",
            "num_train_timesteps": 1000, "shift": 3.0}"#
            .to_string(),
        _ => format!(
            r#"{{"_class_name": "{}", "num_train_timesteps": 1000,
            "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": false,
            "prediction_type": "{prediction}", "clip_sample": {clip}}}"#,
            match kind {
                SchedulerKind::Euler => "EulerDiscreteScheduler",
                _ => "DDIMScheduler",
            }
        ),
    };
    let cfg = SchedulerConfig::from_json(json.as_bytes()).expect("a scheduler config");
    Stepper::new(schedule, &cfg).expect("a scheduler")
}

/// Ten steps of `kind` (epsilon, no clipping), for tests.
#[cfg(test)]
pub(super) fn test_stepper(kind: tessera_core::sched::SchedulerKind) -> Stepper {
    let schedule = tessera_core::plan::StageSchedule::Schedule {
        scheduler: kind,
        steps: 10,
        start: 0,
        mu: None,
    };
    test_stepper_of(kind, "epsilon", false, &schedule)
}

#[cfg(test)]
mod tests {
    use super::super::guide_halves;
    use super::*;
    use candle_core::DType;
    use tessera_core::plan::StageSchedule;
    use tessera_core::sched::SchedulerKind;

    fn bits(t: &Tensor) -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.into_iter().map(f32::to_bits).collect()
    }

    /// Every stepping rule a stage can have (each scheduler, both parameterisations, FreCaS'
    /// DDIM and flow rules), with and without CFG.
    fn steppers() -> Vec<(String, Stepper, usize)> {
        let schedule = |scheduler| StageSchedule::Schedule {
            scheduler,
            steps: 10,
            start: 2,
            mu: None,
        };
        let mut all = Vec::new();
        for kind in [SchedulerKind::Ddim, SchedulerKind::Euler] {
            for prediction in ["epsilon", "v_prediction"] {
                let s = test_stepper_of(kind, prediction, false, &schedule(kind));
                all.push((format!("{kind:?} {prediction}"), s, 3));
            }
        }
        let flow = SchedulerKind::FlowEuler;
        all.push((
            "flow".into(),
            test_stepper_of(flow, "", false, &schedule(flow)),
            3,
        ));
        let frecas = StageSchedule::Frecas {
            inference_steps: 10,
        };
        let ddim = SchedulerKind::Ddim;
        for (j, name) in [(0, "frecas first"), (9, "frecas last")] {
            let s = test_stepper_of(ddim, "epsilon", false, &frecas);
            all.push((name.into(), s, j));
        }
        let flow_frecas = StageSchedule::FrecasFlow {
            indices: vec![0, 200, 400, 600],
            mu: None,
        };
        for (j, name) in [(1, "frecas flow"), (3, "frecas flow last")] {
            let s = test_stepper_of(flow, "", false, &flow_frecas);
            all.push((name.into(), s, j));
        }
        all
    }

    /// Bands of uneven heights (one row, a jump over several, the rest) give the whole
    /// latent's guided step bit for bit, on a latent large enough for the threaded passes.
    #[test]
    fn bands_step_to_the_whole_latents_bytes() -> Result<()> {
        let dev = Device::Cpu;
        let (c, h, w) = (4, 67, 301);
        for (name, stepper, j) in steppers() {
            let planned = [
                999.0, 899.0, 799.0, 699.0, 599.0, 499.0, 399.0, 299.0, 199.0, 99.0,
            ];
            let t = stepper.timestep(j, planned[j]);
            let sample = (Tensor::randn(0f32, 1.0, (1, c, h, w), &dev)? * 3.0)?;
            // A plan's guidance and its halves agree; the other pairs take the whole path's
            // reading too (the conditional prediction alone). FA-CFG through a previous
            // stage of about half the size (not an integer ratio).
            let fa = GuidancePlan::FaCfg {
                high: 7.5,
                low: 35.0,
                low_latent: [h / 2, w / 2],
            };
            for (guidance, halves) in [
                (GuidancePlan::Cfg { scale: 7.5 }, 2),
                (fa.clone(), 2),
                (GuidancePlan::None, 1),
                (GuidancePlan::None, 2),
                (GuidancePlan::Cfg { scale: 7.5 }, 1),
                (fa, 1),
            ] {
                let merged = Tensor::randn(0f32, 1.0, (halves, c, h, w), &dev)?;
                let (cond, uncond) = match halves {
                    2 => (merged.narrow(0, 1, 1)?, Some(merged.narrow(0, 0, 1)?)),
                    _ => (merged.clone(), None),
                };
                let eps = guide_halves(&guidance, &cond, uncond.as_ref())?;
                let (want_next, want_x0) = stepper.step(&eps, j, t, &sample)?;

                // Rows not final yet are NaN: reading one early shows in the result.
                let values = merged.flatten_all()?.to_vec1::<f32>()?;
                let mut seen = vec![f32::NAN; values.len()];
                let plane = h * w;
                let mut end = StepEnd::new(&guidance, halves == 2, &stepper, (j, t), &sample)
                    .expect("bands for this guidance");
                let mut from = 0;
                for upto in [1, 1, 9, 40, h] {
                    for p in 0..halves * c {
                        let rows = p * plane + from * w..p * plane + upto * w;
                        seen[rows.clone()].copy_from_slice(&values[rows]);
                    }
                    from = upto;
                    end.advance(&seen, upto)?;
                }
                let (next, x0) = end.finish()?;
                assert_eq!(bits(&next), bits(&want_next), "{name}, {halves} halves");
                assert_eq!(bits(&x0), bits(&want_x0), "{name}, {halves} halves");
            }
        }
        Ok(())
    }

    #[test]
    fn what_is_not_value_by_value_is_left_to_the_whole_latent() -> Result<()> {
        let dev = Device::Cpu;
        let stepper = test_stepper(SchedulerKind::Ddim);
        let sample = Tensor::zeros((1, 4, 8, 8), DType::F32, &dev)?;
        let at = (0, stepper.timestep(0, 901.0));
        let fa = GuidancePlan::FaCfg {
            high: 7.5,
            low: 35.0,
            low_latent: [0, 4],
        };
        assert!(StepEnd::new(&fa, true, &stepper, at, &sample).is_none());
        let cfg = GuidancePlan::Cfg { scale: 7.5 };
        let half = sample.to_dtype(DType::F16)?;
        assert!(StepEnd::new(&cfg, true, &stepper, at, &half).is_none());
        let strided = Tensor::zeros((1, 4, 8, 8), DType::F32, &dev)?.transpose(2, 3)?;
        assert!(StepEnd::new(&cfg, true, &stepper, at, &strided).is_none());
        let schedule = StageSchedule::Frecas {
            inference_steps: 10,
        };
        let clipping = test_stepper_of(SchedulerKind::Ddim, "epsilon", true, &schedule);
        assert!(StepEnd::new(&cfg, true, &clipping, at, &sample).is_none());
        // Unfinished bands and merged values of another size are errors.
        let mut end = StepEnd::new(&cfg, true, &stepper, at, &sample).expect("bands");
        end.advance(&[0.0; 2 * 4 * 8 * 8], 5)?;
        assert!(end.finish().is_err());
        let mut end = StepEnd::new(&cfg, true, &stepper, at, &sample).expect("bands");
        assert!(end.advance(&[0.0; 4 * 8 * 8], 5).is_err());
        Ok(())
    }
}
