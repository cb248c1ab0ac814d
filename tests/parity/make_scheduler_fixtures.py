"""Reference numbers for Tessera's DDIM and Euler schedulers (common/src/sched/), from diffusers.

Run from the repository root with the project's Python (torch + diffusers 0.42.1):

    /work/pyvenv/bin/python tests/parity/make_scheduler_fixtures.py

It writes, next to itself:

  fixtures/schedulers.safetensors
      alphas_cumprod                                f32 [1000], the training schedule
      {kind}.{pred}.{spacing}.timesteps             f64 [n]
      {kind}.{pred}.{spacing}.init                  f32 [1,4,4,6], initial sample (noise * init_noise_sigma)
      {kind}.{pred}.{spacing}.model_outputs         f32 [n,1,4,4,6], fixed random "UNet" outputs
      {kind}.{pred}.{spacing}.scaled_inputs         f32 [n,1,4,4,6], scale_model_input at each step
                                                    (euler only: DDIM's is the identity, checked here,
                                                    and leaving it out keeps the file under 200 KB)
      {kind}.{pred}.{spacing}.prev_samples          f32 [n,1,4,4,6], step(...).prev_sample
      {kind}.{pred}.{spacing}.pred_original         f32 [n,1,4,4,6], step(...).pred_original_sample
      {kind}.{spacing}.add_noise.{original,noise,result}   f32 [1,4,4,6]
    for kind in {ddim, euler}, pred in {epsilon, v_prediction}, spacing in {leading, linspace, trailing}.
  fixtures/schedulers.json
      {"cases": {"{kind}.{pred}.{spacing}": {"config": <scheduler config>, "init_noise_sigma": f,
                                             "num_inference_steps": n}},
       "add_noise": {"{kind}.{spacing}": {"config": <scheduler config>, "timestep": t}},
       "diffusers": version, "torch": version}

The sampling loop is the pipelines' one: x = scheduler.scale_model_input(x, t); step with a model output.
Everything comes from one seeded torch generator on the CPU, so re-running gives identical files.
Consumed by common/tests/parity_sched.rs.
"""

import json
import os

import diffusers
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "fixtures")
SHAPE = (1, 4, 4, 6)
STEPS = 10

# The SD 2.1 / SDXL scheduler settings (scheduler/scheduler_config.json of those models).
BASE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
)
CLASSES = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}


def make(kind, pred, spacing):
    extra = dict(set_alpha_to_one=False, clip_sample=False) if kind == "ddim" else {}
    return CLASSES[kind](**BASE, **extra, prediction_type=pred, timestep_spacing=spacing)


def plain_config(sched):
    cfg = {k: v for k, v in dict(sched.config).items() if not k.startswith("_")}
    cfg["_class_name"] = type(sched).__name__
    return json.loads(json.dumps(cfg, default=str))


def main():
    gen = torch.Generator("cpu").manual_seed(20240601)
    tensors, cases, add_noise = {}, {}, {}

    tensors["alphas_cumprod"] = make("ddim", "epsilon", "leading").alphas_cumprod.clone()

    for kind in ("ddim", "euler"):
        for pred in ("epsilon", "v_prediction"):
            for spacing in ("leading", "linspace", "trailing"):
                sched = make(kind, pred, spacing)
                sched.set_timesteps(STEPS)
                key = f"{kind}.{pred}.{spacing}"
                init_sigma = float(sched.init_noise_sigma)
                x = torch.randn(SHAPE, generator=gen, dtype=torch.float32) * init_sigma
                tensors[f"{key}.init"] = x.clone()
                outs, scaled, prevs, x0s = [], [], [], []
                for t in sched.timesteps:
                    inp = sched.scale_model_input(x, t)
                    eps = torch.randn(SHAPE, generator=gen, dtype=torch.float32)
                    res = sched.step(eps, t, x)
                    outs.append(eps)
                    scaled.append(inp)
                    prevs.append(res.prev_sample)
                    x0s.append(res.pred_original_sample)
                    x = res.prev_sample
                tensors[f"{key}.timesteps"] = sched.timesteps.to(torch.float64).clone()
                tensors[f"{key}.model_outputs"] = torch.stack(outs)
                if kind == "ddim":
                    assert all(torch.equal(a, b) for a, b in zip(scaled, [tensors[f"{key}.init"]] + prevs))
                else:
                    tensors[f"{key}.scaled_inputs"] = torch.stack(scaled)
                tensors[f"{key}.prev_samples"] = torch.stack(prevs)
                tensors[f"{key}.pred_original"] = torch.stack(x0s)
                cases[key] = dict(
                    config=plain_config(sched),
                    init_noise_sigma=init_sigma,
                    num_inference_steps=STEPS,
                )

        for spacing in ("leading", "linspace", "trailing"):
            sched = make(kind, "epsilon", spacing)
            sched.set_timesteps(STEPS)
            t = sched.timesteps[STEPS // 2]
            original = torch.randn(SHAPE, generator=gen, dtype=torch.float32)
            noise = torch.randn(SHAPE, generator=gen, dtype=torch.float32)
            result = sched.add_noise(original, noise, t.reshape(1))
            key = f"{kind}.{spacing}.add_noise"
            tensors[f"{key}.original"] = original
            tensors[f"{key}.noise"] = noise
            tensors[f"{key}.result"] = result
            add_noise[f"{kind}.{spacing}"] = dict(config=plain_config(sched), timestep=float(t))

    os.makedirs(OUT_DIR, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    path = os.path.join(OUT_DIR, "schedulers.safetensors")
    save_file(tensors, path)
    os.chmod(path, 0o644)
    meta = dict(
        cases=cases,
        add_noise=add_noise,
        diffusers=diffusers.__version__,
        torch=torch.__version__.split("+")[0],
    )
    with open(os.path.join(OUT_DIR, "schedulers.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
