//! A step's model input as it becomes known, so that its first tasks can go out before the
//! step before it has ended.
//!
//! Steps overlap at their edge: while a step's last tasks compute, its end (guidance and the
//! scheduler step, [`super::step_end::StepEnd`]) has already produced the top rows of the
//! next latent, and the workers left idle by the step's last round can start on the next
//! step's top local views. The step end *publishes* those rows here — scaled for the model
//! with the same per-value arithmetic as the whole-latent `scale_input` — and the writers of
//! the next step's first tasks wait for the rows their views need. The rest of the next
//! step's tasks wait for the whole input, set once the step has begun (after the restraint,
//! where the stage has one). Either way a view's values are the same bytes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use candle_core::{DType, Tensor};
use tessera_core::codec::with_f32_values;
use tessera_core::method::freescale::ValueRestraint;
use tessera_core::sched::InputScale;

use super::{EngineError, Result};
use crate::sync::lock;

/// The model input of one step, `(B, C, H, W)`: rows published early, then the whole of it.
pub struct StepInput {
    dims: (usize, usize, usize, usize),
    state: Mutex<InputState>,
    changed: Condvar,
    /// Nanoseconds writers have spent waiting for rows (not work: kept out of the timings).
    waited: AtomicU64,
}

#[derive(Default)]
struct InputState {
    /// Rows `0..head_rows` of every plane are final (the rest of the buffer is unused).
    head: Vec<f32>,
    head_rows: usize,
    /// The whole input, contiguous f32 on the CPU.
    whole: Option<Tensor>,
    /// The stage stopped before this step could run: waiting writers give up.
    stopped: bool,
}

impl StepInput {
    pub fn new(dims: (usize, usize, usize, usize)) -> Arc<Self> {
        Arc::new(Self {
            dims,
            state: Mutex::new(InputState::default()),
            changed: Condvar::new(),
            waited: AtomicU64::new(0),
        })
    }

    /// `(B, C, H, W)` of the input.
    pub fn dims(&self) -> (usize, usize, usize, usize) {
        self.dims
    }

    /// Sets the whole input (the step has begun); every waiting writer may go on.
    pub fn set_whole(&self, input: &Tensor) -> Result<()> {
        let (b, c, h, w) = self.dims;
        if input.dims4()? != (b, c, h, w) {
            return Err(EngineError::Invalid(format!(
                "a step input of shape {:?} for a {b}x{c}x{h}x{w} latent",
                input.dims()
            )));
        }
        let whole = match with_f32_values(input, |_| ()) {
            Some(()) => input.clone(),
            None => input.to_dtype(DType::F32)?.contiguous()?,
        };
        let mut s = lock(&self.state);
        let published = std::mem::take(&mut s.head);
        let rows = s.head_rows;
        s.whole = Some(whole.clone());
        self.changed.notify_all();
        drop(s);
        // Tasks may have been cut from either: they must be the same bytes.
        if rows > 0 && !same_rows(&published, &whole, (c * h * w, h * w), rows * w) {
            return Err(EngineError::Invalid(
                "the rows published for a step's first tasks differ from its input".into(),
            ));
        }
        Ok(())
    }

    /// Publishes rows `from..upto` of `next` (the next latent's `(C, H, W)` values, those rows
    /// final), made the model's input by `rule`, up to row `limit`. Rows must come in order.
    pub fn publish(
        &self,
        next: &[f32],
        (from, upto): (usize, usize),
        rule: &InputRule,
        limit: usize,
    ) {
        let (b, c, h, w) = self.dims;
        let upto = upto.min(limit).min(h);
        let mut s = lock(&self.state);
        if b != 1 || next.len() != c * h * w || s.whole.is_some() || from != s.head_rows {
            return;
        }
        if upto <= from {
            return;
        }
        if s.head.is_empty() {
            s.head = vec![0.0; c * h * w];
        }
        for plane in 0..c {
            let rows = plane * h * w + from * w..plane * h * w + upto * w;
            if !rule.make(&next[rows.clone()], rows.start, &mut s.head[rows]) {
                return;
            }
        }
        s.head_rows = upto;
        self.changed.notify_all();
    }

    /// Stops the step: writers still waiting give up with an error.
    pub fn stop(&self) {
        lock(&self.state).stopped = true;
        self.changed.notify_all();
    }

    /// Runs `f` over the input's values once rows `0..rows` are known (`None`: the whole
    /// input), waiting until they are. Only the rows asked for may be read.
    pub fn with_rows<R>(&self, rows: Option<usize>, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
        let mut s = lock(&self.state);
        loop {
            if let Some(whole) = s.whole.clone() {
                drop(s);
                return with_f32_values(&whole, f)
                    .ok_or_else(|| EngineError::Invalid("the step input moved".into()));
            }
            if s.stopped {
                return Err(EngineError::Invalid(
                    "the stage stopped before this step's input was known".into(),
                ));
            }
            if let Some(r) = rows {
                if s.head_rows >= r && !s.head.is_empty() {
                    return Ok(f(&s.head));
                }
            }
            let clock = Instant::now();
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
            let waited = clock.elapsed().as_nanos() as u64;
            self.waited.fetch_add(waited, Ordering::Relaxed);
        }
    }

    /// Seconds writers have spent waiting in [`Self::with_rows`] so far.
    pub fn waited(&self) -> f64 {
        self.waited.load(Ordering::Relaxed) as f64 * 1e-9
    }
}

/// Whether the first `n` values of every plane (`plane` values each, `len` in all) of `a` and
/// the contiguous f32 tensor `b` are the same bits.
fn same_rows(a: &[f32], b: &Tensor, (len, plane): (usize, usize), n: usize) -> bool {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    with_f32_values(b, |b| {
        a.len() == len
            && b.len() == len
            && (0..len / plane.max(1)).all(|p| {
                let r = p * plane..p * plane + n;
                bits(&a[r.clone()]) == bits(&b[r])
            })
    })
    .unwrap_or(false)
}

/// How a step's model input is made from its latent, value by value: the restraint (where
/// the stage has one and its one-pass form applies), then the input scaling — the
/// arithmetic of the whole-latent passes, so the bytes are the same.
pub struct InputRule {
    pub scale: InputScale,
    /// The step's restraint with the stage's `(z_up, ε)`, contiguous f32 on the CPU.
    pub restraint: Option<(ValueRestraint, Tensor, Tensor)>,
}

impl InputRule {
    /// Writes the input of the latent values `z`, which start at value `at` of the latent,
    /// into `out`; false where the restraint's tensors cannot be read value by value.
    fn make(&self, z: &[f32], at: usize, out: &mut [f32]) -> bool {
        let Some((rule, z_up, eps)) = &self.restraint else {
            for (o, &v) in out.iter_mut().zip(z) {
                *o = self.scale.apply(v);
            }
            return true;
        };
        let values = at..at + z.len();
        let made = with_f32_values(z_up, |up| {
            with_f32_values(eps, |ep| {
                let (up, ep) = (up.get(values.clone())?, ep.get(values.clone())?);
                for (((o, &v), &x), &n) in out.iter_mut().zip(z).zip(up).zip(ep) {
                    *o = self.scale.apply(rule.apply(x, n, v));
                }
                Some(())
            })
        });
        made.flatten().flatten().is_some()
    }
}

/// Stops a step's input when dropped: a step opened early but never begun (the stage ended
/// with an error first) must not leave its writers waiting.
pub struct StopOnDrop(pub Arc<StepInput>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn published_rows_are_the_scaled_rows_of_the_whole_input() -> Result<()> {
        let (c, h, w) = (3, 6, 5);
        let z: Vec<f32> = (0..c * h * w).map(|i| i as f32 * 0.37 - 9.0).collect();
        let scale = InputScale::Times(0.3);
        let rule = InputRule {
            scale,
            restraint: None,
        };
        let input = StepInput::new((1, c, h, w));
        input.publish(&z, (0, 2), &rule, 4);
        input.publish(&z, (2, 6), &rule, 4);
        let head = input.with_rows(Some(4), |v| v.to_vec())?;
        let whole = Tensor::from_vec(
            z.iter().map(|&v| scale.apply(v)).collect(),
            (1, c, h, w),
            &Device::Cpu,
        )?;
        let want = whole.flatten_all()?.to_vec1::<f32>()?;
        for plane in 0..c {
            let rows = plane * h * w..plane * h * w + 4 * w;
            assert_eq!(head[rows.clone()], want[rows]);
        }
        input.set_whole(&whole)?;
        assert_eq!(input.with_rows(None, |v| v.to_vec())?, want);
        // Published rows that are not the input's are an error, not a different picture.
        let other = StepInput::new((1, c, h, w));
        other.publish(&z, (0, 2), &rule, 4);
        assert!(other.set_whole(&(whole + 1.0)?).is_err());
        Ok(())
    }

    /// A restrained stage's published rows are the whole-latent restraint and scaling's.
    #[test]
    fn restrained_rows_are_the_whole_latent_passes_bytes() -> Result<()> {
        use tessera_core::method::freescale::RestrainedStructure;
        use tessera_core::sched::SchedulerKind;
        let (c, h, w) = (4, 7, 6);
        let stepper = super::super::step_end::test_stepper(SchedulerKind::Euler);
        let (j, t) = (3, stepper.scheduler().timesteps()[3]);
        let randn = |s: f64| Tensor::randn(0f32, s as f32, (1, c, h, w), &Device::Cpu);
        let (z, z_up, eps) = (randn(2.0)?, randn(1.0)?, randn(1.0)?);
        let structure = RestrainedStructure::uniform(3.0, 1000);
        let noise = stepper
            .value_noise(j, t)
            .expect("Euler noises value by value");
        let restrained = structure
            .apply_in_one_pass(&z, (&z_up, &eps), (j, t), noise)?
            .expect("one pass applies");
        let whole = stepper.scale_input(&restrained, j)?;
        let rule = InputRule {
            scale: stepper.input_scale(j)?,
            restraint: Some((
                structure.value_restraint((j, t), noise).expect("a rule"),
                z_up,
                eps,
            )),
        };
        let input = StepInput::new((1, c, h, w));
        let values = z.flatten_all()?.to_vec1::<f32>()?;
        input.publish(&values, (0, h), &rule, 5);
        assert_eq!(lock(&input.state).head_rows, 5);
        // The check in `set_whole` compares the published rows bit for bit.
        input.set_whole(&whole)?;
        Ok(())
    }

    #[test]
    fn a_writer_waits_for_its_rows_and_a_stop_ends_the_wait() -> Result<()> {
        let (c, h, w) = (1, 8, 2);
        let z = vec![1.0f32; c * h * w];
        let input = StepInput::new((1, c, h, w));
        std::thread::scope(|s| {
            let waiting = s.spawn(|| input.with_rows(Some(3), |v| v[5]));
            std::thread::sleep(std::time::Duration::from_millis(20));
            let rule = InputRule {
                scale: InputScale::Identity,
                restraint: None,
            };
            input.publish(&z, (0, 3), &rule, 8);
            assert_eq!(waiting.join().unwrap().unwrap(), 1.0);
            let never = s.spawn(|| input.with_rows(None, |v| v.len()));
            std::thread::sleep(std::time::Duration::from_millis(20));
            drop(StopOnDrop(input.clone()));
            assert!(never.join().unwrap().is_err());
        });
        Ok(())
    }
}
