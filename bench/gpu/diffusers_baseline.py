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
measured here as tessera measures it. Prints one JSON object.
"""
import argparse
import json
import statistics
import time

import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0


def timed(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return times


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
    p.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT in pixels")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    p.add_argument("--no-peak", action="store_true")
    args = p.parse_args()

    w, h = (int(v) for v in args.size.lower().split("x"))
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    device = torch.device("cuda")
    with open(args.config) as f:
        config = json.load(f)
    torch.manual_seed(0)
    b = args.batch
    sample = torch.randn(b, config["in_channels"], h // 8, w // 8, device=device, dtype=dtype)
    t = torch.tensor(500.0, device=device)
    if config.get("_class_name") == "SD3Transformer2DModel":
        model = SD3Transformer2DModel.from_config(config).to(device=device, dtype=dtype).eval()
        model.set_attn_processor(JointAttnProcessor2_0())
        ctx = torch.randn(b, 77 + 256, config["joint_attention_dim"], device=device, dtype=dtype)
        pooled = torch.randn(b, config["pooled_projection_dim"], device=device, dtype=dtype)

        def forward():
            model(hidden_states=sample, encoder_hidden_states=ctx, pooled_projections=pooled,
                  timestep=t.expand(b))
    else:
        model = UNet2DConditionModel.from_config(config).to(device=device, dtype=dtype).eval()
        model.set_attn_processor(AttnProcessor2_0())
        forward = unet_forward(model, config, sample, t, b, h, w, device, dtype)
    run(args, forward, device, h, w, b)


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


def run(args, forward, device, h, w, b):
    @torch.inference_mode()
    def evaluate():
        forward()

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        evaluate()
    flops = counter.get_total_flops()

    times = timed(evaluate, args.warmup, args.iters)
    median = statistics.median(times)
    tflops = flops / (median * 1e-3) / 1e12
    peak = None if args.no_peak else matmul_peak(device)
    print(json.dumps({
        "impl": "diffusers",
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0),
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
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }))


if __name__ == "__main__":
    main()
