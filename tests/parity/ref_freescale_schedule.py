"""FreeScale's restart step and cosine factors, evaluated with the reference's own source lines.

Builds SDXL's scheduler (EulerDiscreteScheduler, scaled_linear 0.00085 -> 0.012, "leading",
steps_offset 1), sets 50 steps, takes the restart default `restart_steps = [int(num_inference_steps
*0.3)]` and evaluates the `cosine_factor = ...` / `c1 = ...` lines copied at run time out of
ali-vilab/FreeScale `pipeline_freescale.py` (so a change there shows up here), for several steps
and cosine scales.

    /work/pyvenv/bin/python tests/parity/ref_freescale_schedule.py /path/to/FreeScale-checkout

Pasted into common/src/method/freescale.rs (tests). Not run by CI.
"""

import sys
import types
from pathlib import Path

import torch
from diffusers import EulerDiscreteScheduler

src = Path(sys.argv[1], "pipeline_freescale.py").read_text().splitlines()
pick = lambda head: next(l.strip() for l in src if l.strip().startswith(head))  # noqa: E731
restart_line = pick("restart_steps = [int(")
cos_line, c1_line = pick("cosine_factor = "), pick("c1 = ")
print("reference lines:", restart_line, "|", cos_line, "|", c1_line, sep="\n  ")

sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                               timestep_spacing="leading", steps_offset=1)
sched.set_timesteps(50)
ts = sched.timesteps
print("timesteps", ts.dtype, ts.tolist())
env = {"num_inference_steps": 50, "target_sizes": [None], "torch": torch,
       "self": types.SimpleNamespace(scheduler=sched)}
for n in [1, 3, 4, 10, 20, 25, 30, 40, 60, 100]:
    exec(restart_line, {**env, "num_inference_steps": n}, out := {})
    print("restart for", n, "steps:", out["restart_steps"][0])
exec(restart_line, env)
restart = env["restart_steps"][0]
print("restart", restart, "t", ts[restart].item(), "sigma", repr(sched.sigmas[restart].item()))
for i in [15, 16, 20, 25, 30, 34, 35, 40, 49]:
    row = []
    for scale in [1.0, 2.0, 0.5]:
        env.update(t=ts[i], cosine_scale=scale)
        exec(cos_line, env)
        exec(c1_line, env)
        row.append(repr(env["c1"].item()))
    print("i", i, "t", ts[i].item(), "c1 at 1.0, 2.0, 0.5:", ", ".join(row))
