#!/usr/bin/env python3
"""The diffusers side of `tessera bench unet`: the same denoiser (UNet, or SD3's MMDiT
transformer) with random weights in diffusers + PyTorch, fp16 (or bf16) with PyTorch's scaled-dot-product attention, timed the same
way (warm-up, then the median of synchronized evaluations) on the same GPU.

    python3 bench/gpu/diffusers_baseline.py --config /tmp/tessera-synthetic-sdxl-v1/unet/config.json \
        --size 1024x1024 --batch 2

`--config` is the UNet config tessera's `synthetic:sdxl` writes (run `tessera bench unet` once
first), or the transformer config of `synthetic:sd3`
(`/tmp/tessera-synthetic-sd3-v1/transformer/config.json`: SD3Transformer2DModel, with 77 CLIP
+ 256 T5 text tokens and the pooled text), so both sides build exactly the same architecture. FLOPs are counted independently with
torch's FlopCounterMode, next to the count tessera prints, and the bf16 matrix-multiply peak is
measured here as tessera measures it. Prints one JSON object per size (`--size A,B`: one model,
several sizes).

`--profile DIR` then profiles one more evaluation with torch.profiler and writes DIR/trace.json
(Chrome trace), DIR/kernels.csv (`kernel,launches,total_us`: the device time of each kernel,
memcpy and memset, the table `tessera bench kernels --torch` reads) and adds to the JSON the
scaled-dot-product-attention operator PyTorch dispatched to (its backend: cudnn, flash,
efficient or math). `--device cpu --dtype fp32` runs the same code on a CPU (for checking the
script; the kernel table is then empty).
"""
import argparse
import csv
import json
import os
import statistics
import sys
import time

import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, warmup, iters, device=torch.device("cuda")):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return times


# The operator each SDPA backend runs as (torch/nn/functional dispatch, PyTorch 2.x).
SDPA_BACKENDS = [
    ("_scaled_dot_product_cudnn_attention", "cudnn"),
    ("_scaled_dot_product_flash_attention_for_cpu", "flash (cpu)"),
    ("_scaled_dot_product_flash_attention", "flash"),
    ("_scaled_dot_product_efficient_attention", "efficient"),
    ("_scaled_dot_product_attention_math", "math"),
]


def profile_one(evaluate, device, out_dir):
    """One evaluation under torch.profiler: the trace, the kernel table, the SDPA backend."""
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(out_dir, exist_ok=True)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        evaluate()
        sync(device)
    trace = os.path.join(out_dir, "trace.json")
    prof.export_chrome_trace(trace)
    with open(trace) as f:
        events = json.load(f).get("traceEvents", [])
    kernels, ops = {}, set()
    for e in events:
        cat = e.get("cat", "")
        if cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            k = kernels.setdefault(e["name"], [0, 0.0])
            k[0] += 1
            k[1] += float(e.get("dur", 0.0))
        elif cat == "cpu_op":
            ops.add(e.get("name", ""))
    table = os.path.join(out_dir, "kernels.csv")
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kernel", "launches", "total_us"])
        for name, (n, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1]):
            w.writerow([name, n, f"{us:.3f}"])
    sdpa_ops = sorted(o for o in ops if "scaled_dot_product" in o)
    backends = sorted({b for op, b in SDPA_BACKENDS for o in sdpa_ops if o.endswith(op)})
    return {
        "trace": trace,
        "kernel_table": table,
        "kernels": len(kernels),
        "device_ms": sum(us for _, us in kernels.values()) / 1e3,
        "sdpa_ops": sdpa_ops,
        "attention_backend": backends,
    }


def matmul_peak(device):
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = statistics.median(timed(lambda: a @ b, 3, 10))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True,
                   help="unet/config.json or transformer/config.json of the architecture")
    p.add_argument("--size", default="1024x1024",
                   help="WIDTHxHEIGHT in pixels; several, comma-separated, print one line each")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.add_argument("--no-peak", action="store_true")
    p.add_argument("--profile", metavar="DIR", help="profile one evaluation into DIR")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    args = p.parse_args()

    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.size.split(",")]
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    device = torch.device(args.device)
    with open(args.config) as f:
        config = json.load(f)
    torch.manual_seed(0)
    model = build(config, device, dtype)
    peak = None if args.no_peak or device.type != "cuda" else matmul_peak(device)
    for w, h in sizes:
        forward = make_forward(model, config, (w, h), args.batch, device, dtype)
        profile_dir = os.path.join(args.profile, f"{w}x{h}") if args.profile else None
        print(json.dumps(run(args, forward, device, (w, h), peak, profile_dir)))
        sys.stdout.flush()


def build(config, device, dtype):
    """The denoiser with random weights, made on the device (initialising 2.6 B parameters on
    the CPU takes minutes)."""
    sd3 = config.get("_class_name") == "SD3Transformer2DModel"
    with device:
        model = (SD3Transformer2DModel if sd3 else UNet2DConditionModel).from_config(config)
    model = model.to(device=device, dtype=dtype).eval()
    model.set_attn_processor(JointAttnProcessor2_0() if sd3 else AttnProcessor2_0())
    return model


def make_forward(model, config, size, b, device, dtype):
    """One evaluation of `model` on random inputs of image size `size`."""
    w, h = size
    sample = torch.randn(b, config["in_channels"], h // 8, w // 8, device=device, dtype=dtype)
    t = torch.tensor(500.0, device=device)
    if isinstance(model, SD3Transformer2DModel):
        ctx = torch.randn(b, 77 + 256, config["joint_attention_dim"], device=device, dtype=dtype)
        pooled = torch.randn(b, config["pooled_projection_dim"], device=device, dtype=dtype)

        def forward():
            model(hidden_states=sample, encoder_hidden_states=ctx, pooled_projections=pooled,
                  timestep=t.expand(b))

        return forward
    return unet_forward(model, config, sample, t, b, h, w, device, dtype)


def unet_forward(unet, config, sample, t, b, h, w, device, dtype):
    ctx = torch.randn(b, 77, config["cross_attention_dim"], device=device, dtype=dtype)
    kwargs = {}
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(b, pooled, device=device, dtype=dtype),
            "time_ids": torch.tensor([[h, w, 0, 0, h, w]] * b, device=device, dtype=dtype),
        }

    def forward():
        unet(sample, t, encoder_hidden_states=ctx, **kwargs)

    return forward


def run(args, forward, device, size, peak, profile_dir):
    """Times (and profiles) one image size; returns its JSON record."""
    w, h = size
    b = args.batch

    @torch.inference_mode()
    def evaluate():
        forward()

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        evaluate()
    flops = counter.get_total_flops()

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = timed(evaluate, args.warmup, args.iters, device)
    median = statistics.median(times)
    tflops = flops / (median * 1e-3) / 1e12
    peak_memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    profiled = profile_one(evaluate, device, profile_dir) if profile_dir else None
    return {
        "impl": "diffusers",
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if cuda else "cpu",
        "dtype": args.dtype,
        "size": [h, w],
        "batch": b,
        "iters": args.iters,
        "ms_median": median,
        "ms_mean": statistics.fmean(times),
        "ms_min": min(times),
        "tflop_per_eval": flops / 1e12,
        "tflops": tflops,
        "peak_tflops": peak,
        "fraction_of_peak": None if peak is None else tflops / peak,
        "peak_memory_gib": peak_memory,
        "profile": profiled,
    }


if __name__ == "__main__":
    main()
