"""FreCaS stage timesteps, straight from the reference's own code (not a copy).

Runs `scheduler_wrapper(...)` + `set_timesteps` of xtudbxk/FreCaS `utils/scheduler_wrapper.py` on
a diffusers DDIMScheduler with the SD/SDXL betas (scaled_linear 0.00085 -> 0.012; main.py builds
its DDIM from the model's config, and only the betas matter here) for the four presets of the
reference's test.sh, and prints per stage: the start timestep, the timestep list and the
`num_inference_steps` the wrapper stores for DDIM's previous-timestep rule. Also prints the
`target_alphas` of `get_next_starttimestep` for the transitions.

    /work/pyvenv/bin/python tests/parity/ref_frecas_schedule.py /path/to/FreCaS-checkout

Pasted into common/src/method/frecas.rs (tests). Not run by CI.
"""

import sys
import types

import torch
from diffusers import DDIMScheduler

sys.path.insert(0, sys.argv[1])
# The wrapper imports loguru only to log; a stub keeps the venv small.
sys.modules.setdefault("loguru", types.SimpleNamespace(logger=types.SimpleNamespace(
    opt=lambda **k: None, error=print, warning=print, info=print, trace=print)))
from utils.scheduler_wrapper import get_next_starttimestep, scheduler_wrapper  # noqa: E402

# test.sh: (tsize, msp_endtimes, msp_steps, msp_gamma)
PRESETS = {
    "sd21_1024": ([[512, 512], [1024, 1024]], [100, 0], [40, 10], 3.0),
    "sd21_2048": ([[512, 512], [1024, 1024], [2048, 2048]], [200, 200, 0], [30, 10, 10], 3.0),
    "sdxl_2048": ([[1024, 1024], [2048, 2048]], [200, 0], [40, 10], 1.5),
    "sdxl_4096": ([[1024, 1024], [2048, 2048], [4096, 4096]], [400, 200, 0], [30, 5, 15], 2.0),
}

for name, (sizes, ends, steps, gamma) in PRESETS.items():
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    pipe = types.SimpleNamespace(scheduler=sched, vae=types.SimpleNamespace(device="cpu"))
    stages = [{"endtime": e, "steps": s, "size": z} for z, e, s in zip(sizes, ends, steps)]
    scheduler_wrapper(pipe, schedulers=stages, gamma=gamma)
    pipe.scheduler.set_timesteps(sum(steps))
    print("==", name)
    for k, st in enumerate(stages):
        ts = st["timesteps"].tolist()
        print(f"  stage {k}: start {ts[0]} nis {st['num_inference_steps']} ts {ts}")
        if k + 1 < len(stages):
            s = (sizes[k][0] / sizes[k + 1][0]) ** gamma
            a = sched.alphas_cumprod[st["endtime"]]
            print("    target_alphas", repr((s * a / (1 + (s - 1) * a)).item()),
                  "next", get_next_starttimestep(sched, st["endtime"], sizes[k][0], sizes[k + 1][0], gamma))
