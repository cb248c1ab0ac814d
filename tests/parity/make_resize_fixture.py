"""Reference numbers for common/src/resize.rs (torch.nn.functional.interpolate).

Builds a deterministic (1, 2, 7, 9) float32 input, x.flat[i] = sin(0.37 * i + 0.1) (computed in
float64, then rounded to float32), resizes it with F.interpolate(size=..., mode=...,
align_corners=False) and prints, for each case, the output values at a few fixed flat indices and
the output's sum. It also prints torch's per-axis weights for 128 -> 320 (bicubic and bilinear)
at output positions 40 and 160, read off by resizing one-hot rows; these pin how torch rounds the
source coordinate (its x86 CPU build fuses `scale * (dst + 0.5) - 0.5` into one multiply-add for
bicubic but not for its generic bilinear kernel), which moves the weights there by up to 5e-6.
The printed numbers are pasted into the unit tests of common/src/resize.rs; nothing is written
to disk. (Run on an x86 CPU with AVX2; `torch.backends.cpu.get_cpu_capability()` is printed.)

    /path/to/venv/bin/python tests/parity/make_resize_fixture.py
"""

import torch
import torch.nn.functional as F

SHAPE = (1, 2, 7, 9)
CASES = [
    ("bicubic", (13, 17)),
    ("bicubic", (4, 5)),
    ("bicubic", (7, 9)),
    ("bicubic", (20, 6)),  # up in one axis, down in the other
    ("nearest", (13, 17)),
    ("nearest", (4, 6)),
    ("bilinear", (10, 12)),
]


def main():
    torch.set_grad_enabled(False)
    n = 1
    for d in SHAPE:
        n *= d
    i = torch.arange(n, dtype=torch.float64)
    x = torch.sin(0.37 * i + 0.1).to(torch.float32).reshape(SHAPE)
    print(f"# torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    for mode, size in CASES:
        kwargs = {} if mode == "nearest" else {"align_corners": False}
        y = F.interpolate(x, size=size, mode=mode, **kwargs)
        flat = y.reshape(-1)
        m = flat.numel()
        idx = sorted({0, 1, size[1] - 1, size[1], m // 3, m // 2, m // 2 + 7, m - size[1], m - 2, m - 1})
        vals = ", ".join(f"({k}, {flat[k].item():.9e})" for k in idx)
        total = flat.to(torch.float64).sum().item()
        print(f"{mode} {size[0]}x{size[1]}: sum = {total:.9e}")
        print(f"    values = [{vals}]")

    # Per-axis weights: row k of the one-hot batch is e_k, so output column o of batch k is the
    # weight of source pixel k in output pixel o. Output height 1 = input height 1 leaves the
    # rows alone; an output of 1 + 320 > 128 pixels keeps torch on its generic kernel.
    eye = torch.eye(128).reshape(128, 1, 1, 128)
    for mode in ("bicubic", "bilinear"):
        w = F.interpolate(eye, size=(1, 320), mode=mode, align_corners=False)[:, 0, 0, :].T
        for o in (40, 160):
            nz = torch.nonzero(w[o]).reshape(-1).tolist()
            pairs = ", ".join(f"({k}, {w[o, k].item():.9e})" for k in nz)
            print(f"{mode} weights 128->320 output {o}: [{pairs}]")


if __name__ == "__main__":
    main()
