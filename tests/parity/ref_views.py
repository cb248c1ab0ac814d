"""Local and global view placement from FreeScale's own `get_views` / `scale_forward` code.

Imports ali-vilab/FreeScale `scale_attention.py`, switches its jitter off (`random.randint`
returns 0; the window is then only shifted by the jitter padding, subtracted here) and prints,
for SDXL at 2x, 4x, 8x the training latent 128 (latent 256, 512, 1024 square):
- the windows of `get_views(latent, latent, 128, 128, scale_factor=1)` in latent pixels as
  (top, left, height, width), in the reference's order;
- a check that the calls `scale_forward` really makes on token grids (the 2x- and 4x-downsampled
  attention layers, `scale_factor = 128 * current_hw[0] // 1024 / tokens`) give the same windows
  once scaled back to latent pixels;
- the global views' phases in `scale_forward`'s order and the latent pixels view s + 1
  `x[:, h::s, w::s]` picks;
- the window size `scale_forward` uses for a non-square stage (2048x4096 px).

    /work/pyvenv/bin/python tests/parity/ref_views.py /path/to/FreeScale-checkout

Pasted into common/src/tiling.rs (tests). Not run by CI.
"""

import random
import sys

import torch

sys.path.insert(0, sys.argv[1])
import scale_attention  # noqa: E402  (the reference)

random.randint = lambda a, b: 0


def windows(n, win, scale_factor):
    pad = int(win / scale_factor) // 8  # the jitter padding get_views adds with jitter 0
    return [(h0 - pad, w0 - pad, h1 - h0, w1 - w0)
            for h0, h1, w0, w1 in scale_attention.get_views(n, n, win, win, scale_factor=scale_factor)]


for s in [2, 4, 8]:
    n = 128 * s
    lat = windows(n, 128, 1)
    print(f"== {s}x latent {n}: {len(lat)} windows")
    print("  rows", sorted({v[0] for v in lat}), "cols", sorted({v[1] for v in lat}))
    assert lat == [(r, c, 128, 128) for r in sorted({v[0] for v in lat}) for c in sorted({v[1] for v in lat})]
    print("  = rows x cols in row-major order; first", lat[:3], "last", lat[-1], "index 5", lat[5])
    for down in [2, 4]:  # token grids of the attention layers at latent/2 and latent/4
        tokens = n // down
        sf = 128 * (n * 8 // 1024) / tokens  # scale_forward's scale_factor
        tok = [(t * down, l * down, h * down, w * down) for t, l, h, w in windows(tokens, 128, sf)]
        assert tok == lat, (s, down)
    gviews = [[h, w] for h in range(s) for w in range(s)]  # scale_forward's global_views
    idx = torch.arange(n * n).reshape(1, n, n, 1)
    h, w = gviews[s + 1] if s > 1 else gviews[0]
    sub = idx[:, h::s, w::s, :]
    print("  global", len(gviews), "view", s + 1, "phase", (h, w), "shape", tuple(sub.shape[1:3]),
          "pixel (0,0)", divmod(sub[0, 0, 0, 0].item(), n), "pixel (5,9)", divmod(sub[0, 5, 9, 0].item(), n))

# Non-square stage, 2048x4096 px (latent 256x512), the layer at latent/2 (128x256 tokens):
# scale_forward's own arithmetic makes windows of sub_h x sub_w = 64x128 tokens / scale_factor,
# i.e. 64x128 latent pixels (the image's aspect), not 128x128.
ch, cw, th, tw = 2, 4, 128, 256
ratio = ch / cw
lh = int((th * tw * ratio) ** 0.5)
sf = 128 * ch / lh
sub_h, sub_w = (128, int(128 / ratio)) if ratio > 1 else (int(128 * ratio), 128)
v = scale_attention.get_views(lh, int(lh / ratio), sub_h, sub_w, scale_factor=sf)
print("== 2048x4096 px:", len(v), "windows of", (int((v[0][1] - v[0][0]) * 2), int((v[0][3] - v[0][2]) * 2)),
      "latent pixels")
