"""Reference numbers for FreeScale's in-UNet scale fusion (tests/parity/fixtures/scale_fusion/).

Runs the official FreeScale `scale_forward` (scale_attention.py of ali-vilab/FreeScale, which is
not vendored here: pass the path of a checkout) on one small diffusers BasicTransformerBlock at
twice the training size, with jitter off, in normal and fast mode, and saves the block's
parameters, its inputs and its outputs. worker/tests/parity_unet.rs compares Tessera's
ScaleFusion self-attention with them.

    python3 -m venv v && v/bin/pip install torch diffusers einops safetensors
    v/bin/python tests/parity/make_scale_fusion_fixture.py /path/to/FreeScale

CI does not run this script; its output is committed (about 150 KB) and deterministic.
"""

import random
import sys
import types
from pathlib import Path

import torch
from diffusers.models.attention import BasicTransformerBlock
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent / "fixtures" / "scale_fusion"


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: make_scale_fusion_fixture.py FREESCALE_CHECKOUT")
    sys.path.insert(0, sys.argv[1])
    import scale_attention  # the reference implementation

    torch.manual_seed(1)
    block = BasicTransformerBlock(8, 2, 4, cross_attention_dim=6, activation_fn="geglu").eval()
    with torch.no_grad():
        # Perturb the default init (zeros and ones) so every parameter matters.
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    block.forward = types.MethodType(scale_attention.scale_forward, block)
    # Jitter off: Tessera draws its own seeded jitter, so only the unjittered placement of
    # windows and the fusion itself are comparable number for number.
    random.randint = lambda a, b: 0

    # A 32x32 token grid at a layer 8x below a 2048^2 image (latent 256^2): twice SDXL's
    # training size, windows of 16 tokens with stride 8.
    x = torch.randn(1, 32 * 32, 8)
    ctx = torch.randn(1, 5, 6)
    out = {"x": x, "ctx": ctx}
    with torch.no_grad():
        for fast in (False, True):
            block.current_hw = (2048, 2048)
            block.fast_mode = fast
            out[f"out.fast{int(fast)}"] = block(x, encoder_hidden_states=ctx)
    for k in ("out.fast0", "out.fast1"):
        assert torch.isfinite(out[k]).all()
    weights = {f"blk.{k}": v.contiguous() for k, v in block.state_dict().items()}
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(OUT / "sf_weights.safetensors"))
    save_file({k: v.contiguous() for k, v in out.items()}, str(OUT / "sf_ref.safetensors"))
    print("wrote", OUT, {k: tuple(v.shape) for k, v in out.items()})


if __name__ == "__main__":
    main()
