"""Fusion kernel, FA-CFG split and CA-map resizes, from the references' own functions.

- `gaussian_kernel` / `gaussian_filter` of ali-vilab/FreeScale `scale_attention.py` (the fusion's G)
  and the fusion `gaussian_local + (attn_output_global - gaussian_global)` of `scale_forward`;
- `freq_decompose` of xtudbxk/FreCaS `utils/facfg_wrapper.py` and `facfg_forward`'s band sum;
- the CA-map resizes: `F.interpolate(camap, size=(s1, s2), mode="bilinear")` of
  `utils/camap_wrapper.py` along the flattened token axis, and the spatial resize Tessera uses.
Inputs are `sin(0.37 i + 0.1)` / `cos(0.21 i)` over the flat index (float32), as the Rust tests
build them; values are printed at a few flat indices.

    /work/pyvenv/bin/python tests/parity/ref_formulas.py /path/to/FreeScale /path/to/FreCaS

Pasted into common/src/method/{fusion,facfg,camap}.rs (tests). Not run by CI.
"""

import sys
import types

import torch
import torch.nn.functional as F

sys.path[:0] = sys.argv[1:3]
sys.modules.setdefault("loguru", types.SimpleNamespace(logger=types.SimpleNamespace(
    opt=lambda **k: None, error=print, warning=print, info=print, trace=print)))
from scale_attention import gaussian_filter, gaussian_kernel  # noqa: E402
from utils.facfg_wrapper import freq_decompose  # noqa: E402


def wave(shape, cos=False):
    i = torch.arange(torch.Size(shape).numel(), dtype=torch.float32)
    return (torch.cos(i * 0.21) if cos else torch.sin(i * 0.37 + 0.1)).reshape(shape)


def at(t, idx):
    return [repr(t.flatten()[j].item()) for j in idx]


for k in [3, 5, 7, 15]:  # s = 2, 3, 4, 8
    g = gaussian_kernel(k, 1.0, 1)[0, 0]
    c = k // 2
    pos = [(0, 0, 0), (0, c, c), (c, c, c), (c, c, 0), (c - 1, c, c + 1), (k - 1, 0, c)]
    print("kernel3d", k, [(p, repr(g[p].item())) for p in pos], "sum", repr(g.sum().item()))
local, glob = wave((2, 5, 6, 3)), wave((2, 5, 6, 3), cos=True)
for s in [2, 3]:
    gl, gg = gaussian_filter(local, 2 * s - 1), gaussian_filter(glob, 2 * s - 1)
    fused = gl + (glob - gg)
    print("blur s", s, at(gl, [0, 7, 50, 89, 133, 179]))
    print("fused s", s, at(fused, [0, 7, 50, 89, 133, 179]), "abs sum", repr(fused.abs().sum().item()))

x = wave((1, 2, 6, 8))
for tsize in [(3, 4), (5, 3), (4, 6)]:
    hi, lo = freq_decompose(x, tsize=tsize)
    print("split", tsize, "low", at(lo, [0, 5, 17, 40, 77, 95]), "high", at(hi, [0, 5, 17, 40, 77, 95]))
u, c = wave((1, 2, 6, 8)), wave((1, 2, 6, 8), cos=True)
out = sum(a + w * (b - a) for a, b, w in zip(freq_decompose(u, (3, 4)), freq_decompose(c, (3, 4)), [35.0, 7.5]))
print("facfg [35, 7.5]", at(out, [0, 5, 17, 40, 77, 95]))
lat = wave((1, 4, 16, 16))  # a latent-shaped case at the real stage ratio 2
hi, lo = freq_decompose(lat, tsize=(8, 8))
print("split (1,4,16,16)->(8,8) low", at(lo, [0, 17, 255, 600, 1023]), "high", at(hi, [0, 17, 255, 600, 1023]))

m = wave((1, 4, 6, 3))
for hw in [(8, 12), (2, 3), (5, 7)]:
    r = F.interpolate(m.permute(0, 3, 1, 2), size=hw, mode="bilinear").permute(0, 2, 3, 1)
    print("spatial resize", hw, at(r, [0, 10, r.numel() // 2, r.numel() - 1]))
r = F.interpolate(m.reshape(1, 1, 24, 3), size=(96, 3), mode="bilinear")
print("token-axis resize 24->96", at(r, [0, 10, 37, 150, 287]))
