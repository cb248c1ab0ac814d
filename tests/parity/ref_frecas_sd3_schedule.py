"""FreCaS stage timesteps on SD3, straight from the reference's own code (not a copy).

Runs `scheduler_wrapper(...)` + `set_timesteps` of xtudbxk/FreCaS `utils/scheduler_wrapper.py`
on its `FlowMatchEulerDiscreteModifiedScheduler` (SD3 medium's scheduler config: shift 3) for
the reference's SD3 preset (test.sh "sd3 -- 2048": 1024 -> 2048, end times 50 0, steps 20 8),
and prints per stage its start, the schedule entries (`indexs`) and the timesteps, as f64
reprs of torch's float32 values.

    /work/pyenv/bin/python tests/parity/ref_frecas_sd3_schedule.py /path/to/FreCaS-checkout

Pasted into common/core/src/plan.rs (tests). Not run by CI.
"""

import sys
import types

sys.path.insert(0, sys.argv[1])
sys.modules.setdefault("loguru", types.SimpleNamespace(logger=types.SimpleNamespace(
    opt=lambda **k: None, error=print, warning=print, info=print, trace=print)))
from diffusers import StableDiffusion3Pipeline  # noqa: E402
from utils.scheduler_wrapper import scheduler_wrapper  # noqa: E402
from utils.scheduling_flow_match_euler_discrete_modified import (  # noqa: E402
    FlowMatchEulerDiscreteModifiedScheduler,
)

sched = FlowMatchEulerDiscreteModifiedScheduler(num_train_timesteps=1000, shift=3.0)
# The wrapper picks the rectified-flow rule by `isinstance(pipeline, StableDiffusion3Pipeline)`.
pipe = StableDiffusion3Pipeline.__new__(StableDiffusion3Pipeline)
object.__setattr__(pipe, "scheduler", sched)
object.__setattr__(pipe, "vae", types.SimpleNamespace(device="cpu"))
sizes, ends, steps = [[1024, 1024], [2048, 2048]], [50, 0], [20, 8]
stages = [{"endtime": e, "steps": s, "size": z} for z, e, s in zip(sizes, ends, steps)]
scheduler_wrapper(pipe, schedulers=stages)
pipe.scheduler.set_timesteps(sum(steps))
for k, st in enumerate(stages):
    idx = st["indexs"].tolist()
    print(f"stage {k}: indexs {idx}")
    print(f"  timesteps {[float(t) for t in st['timesteps'].tolist()]}")
