#!/usr/bin/env python3
"""Generate the numerical-parity fixtures for Tessera's model code (SD 2.1 and SDXL).

HOW TO RUN (from the repository root):

    python3 -m venv v && v/bin/pip install torch diffusers transformers safetensors
    v/bin/python tests/parity/make_fixtures.py

WHAT IT WRITES (for arch in sd21, sdxl):

    tests/parity/fixtures/<arch>/model/               a complete diffusers pipeline directory
        model_index.json, scheduler/, tokenizer/ (+ tokenizer_2/ for sdxl),
        text_encoder/ (+ text_encoder_2/), unet/, vae/   (safetensors only, no .bin)
    tests/parity/fixtures/<arch>/reference.safetensors  reference tensors (float32, token ids int64)
    tests/parity/fixtures/<arch>/reference.json         prompts, pipeline cases, layer metadata, versions

The models are TINY versions of the real architectures with random (seeded) weights; the
tokenizers use a small CLIP BPE vocabulary learned (greedily) in this script from a built-in
word list.  The sdxl weights are stored in float16; all sdxl references are computed in float32
from the fp16-rounded weights (the saved pipeline is reloaded with torch_dtype=float32), so a
loader that reads the fp16 files and upcasts to f32 must reproduce them.

Every reference is computed with the pipeline RELOADED from the saved directory via
from_pretrained, which proves the directory is loadable by diffusers.

The script is deterministic (fixed seeds everywhere): running it twice gives byte-identical
files.  CI does NOT run it; the generated files are committed and the Rust tests only read them.
"""

import json
import os
import re
import shutil
import sys
from collections import Counter

import torch

import diffusers
import safetensors
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")

torch.set_grad_enabled(False)
torch.use_deterministic_algorithms(True)

# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------

LONG_PROMPT = (
    "a highly detailed oil painting of a red and white lighthouse standing on a rocky cliff "
    "above a stormy sea at dusk, with dramatic clouds, golden light breaking through the sky, "
    "waves crashing against the dark stones below, a small wooden boat with a lantern drifting "
    "near the shore, seagulls flying in the wind, a narrow path winding up the green hill toward "
    "an old stone cottage with a warm glowing window, tall grass bending in the breeze, soft mist "
    "rolling over the water, distant mountains fading into blue haze, a bright moon rising over "
    "the horizon, reflections shimmering on the wet sand, intricate brush strokes, rich colors, "
    "cinematic composition, sharp focus, trending on an art gallery wall, masterpiece, award "
    "winning, ultra realistic, volumetric lighting, deep shadows, gentle highlights, calm and "
    "peaceful mood, painted by a famous artist in the classic romantic style of the old masters"
)

PROMPTS = {
    "prompt": "a red lighthouse on a cliff",
    "negative": "blurry, low quality",
    "messy": "  A  Lighthouse,   AT Dusk!! 3 boats & 2 gulls  ",
    "long": LONG_PROMPT,
}

# --------------------------------------------------------------------------------------------
# 1. A small, real CLIP byte-level BPE vocabulary
# --------------------------------------------------------------------------------------------

WORD_LIST = (
    LONG_PROMPT + " " + " ".join(PROMPTS.values()) + " "
    "the the the a a a an of of and and in on with at to for from by is are photo photograph "
    "portrait landscape city street night day morning evening sunset sunrise forest river lake "
    "ocean beach island mountain valley desert snow winter summer spring autumn flower flowers "
    "tree trees garden house castle tower bridge road car train ship boat boats bird birds gull "
    "gulls cat dog horse man woman child people face eyes hair dress red green blue yellow orange "
    "purple black white gray golden silver bright dark light lights shadow colorful beautiful "
    "detailed realistic painting drawing sketch illustration render digital art style quality "
    "high low blurry sharp focus lens camera wide angle close up view scene background "
    "foreground lighthouse lighthouses cliff cliffs dusk stormy clouds cloud water waves sky "
    "sun moon stars star rain fog mist smoke fire glowing glow warm cold soft hard old new "
    "ancient modern futuristic fantasy magic dream dreamy epic cinematic dramatic studio "
    "lighting reflection reflections texture textures pattern patterns window windows door "
    "stone stones wooden wood metal glass paper gold rocky rock rocks sand hill hills grass"
)


def bytes_to_unicode():
    """The GPT-2 / CLIP byte -> printable unicode character table (ordered as CLIP uses it)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


CLIP_PAT = re.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+""")


def word_symbols(word, byte_encoder):
    chars = [byte_encoder[b] for b in word.encode("utf-8")]
    return tuple(chars[:-1]) + (chars[-1] + "</w>",)


def learn_bpe(num_merges):
    byte_encoder = bytes_to_unicode()
    base = list(byte_encoder.values())
    vocab_list = base + [v + "</w>" for v in base]
    known = set(vocab_list)
    counts = Counter(CLIP_PAT.findall(WORD_LIST.lower()))
    words = {word_symbols(w, byte_encoder): c for w, c in sorted(counts.items())}
    merges = []
    while len(merges) < num_merges:
        pairs = Counter()
        for sym, c in words.items():
            for i in range(len(sym) - 1):
                pairs[(sym[i], sym[i + 1])] += c
        cands = sorted(
            (p for p in pairs if p[0] + p[1] not in known), key=lambda p: (-pairs[p], p)
        )
        if not cands:
            break
        best = cands[0]
        merged = best[0] + best[1]
        merges.append(best)
        vocab_list.append(merged)
        known.add(merged)
        new_words = {}
        for sym, c in words.items():
            out, i = [], 0
            while i < len(sym):
                if i < len(sym) - 1 and (sym[i], sym[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
        words = new_words
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab_list) == len(set(vocab_list)) and len(vocab_list) <= 1000
    return {t: i for i, t in enumerate(vocab_list)}, merges


def reference_clip_tokenize(text, vocab, merges, pad_token):
    """Independent re-implementation of the CLIP tokenizer, used as a cross-check.

    Note: like transformers, special tokens (bos, eos AND the pad token) are split out of the raw
    text before BPE, so with pad_token "!" every "!" in a prompt becomes the bare "!" token (id of
    "!", not "!</w>")."""
    byte_encoder = bytes_to_unicode()
    ranks = {m: i for i, m in enumerate(merges)}
    text = re.sub(r"\s+", " ", text).strip().lower()
    ids = [vocab["<|startoftext|>"]]
    specials = sorted({"<|startoftext|>", "<|endoftext|>", pad_token}, key=len, reverse=True)
    pieces = re.split("(" + "|".join(re.escape(t) for t in specials) + ")", text)
    toks = []
    for i, piece in enumerate(pieces):
        toks += [piece] if i % 2 == 1 else CLIP_PAT.findall(piece)
    for tok in toks:
        if tok in specials:
            ids.append(vocab[tok])
            continue
        word = list(word_symbols(tok, byte_encoder))
        while len(word) > 1:
            pairs = [(ranks.get((word[i], word[i + 1]), 1 << 30), i) for i in range(len(word) - 1)]
            r, _ = min(pairs)
            if r == 1 << 30:
                break
            first, second = merges[r]
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    out.append(first + second)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        ids += [vocab[w] for w in word]
    ids = ids[:76] + [vocab["<|endoftext|>"]]
    return ids


def write_tokenizer_dir(path, vocab, merges, pad_token):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
    cfg = dict(special)
    cfg.update(
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": 77,
            "do_lower_case": True,
            "errors": "replace",
            "clean_up_tokenization_spaces": True,
            "add_prefix_space": False,
        }
    )
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)


def make_tokenizer(tmp_dir, vocab, merges, pad_token):
    write_tokenizer_dir(tmp_dir, vocab, merges, pad_token)
    tok = CLIPTokenizer.from_pretrained(tmp_dir)
    assert tok.pad_token == pad_token and tok.model_max_length == 77
    for text in PROMPTS.values():
        got = tok(text, truncation=True, max_length=77).input_ids
        exp = reference_clip_tokenize(text, vocab, merges, pad_token)
        assert got == exp, (text, got, exp)
    return tok


# --------------------------------------------------------------------------------------------
# 2. Tiny models
# --------------------------------------------------------------------------------------------


def perturb_norms(model, seed):
    """Default norm init (weight 1, bias 0) would hide weight/bias mix-ups: randomize it."""
    g = torch.Generator().manual_seed(seed)
    for name, m in sorted(model.named_modules()):
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
            m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))


def clip_text(seed, hidden_act, vocab, pad_id, projection_dim=None, hidden=32, layers=2, heads=4):
    cfg = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        projection_dim=projection_dim if projection_dim is not None else hidden,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=pad_id,
    )
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(cfg) if projection_dim is not None else CLIPTextModel(cfg)
    perturb_norms(model, seed + 1)
    return model.eval()


def tiny_vae(seed, scaling_factor, force_upcast):
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 16, 16],
        layers_per_block=1,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )
    perturb_norms(vae, seed + 1)
    return vae.eval()


def tiny_unet_sd21(seed, cross_dim):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        block_out_channels=[8, 16, 16],
        layers_per_block=2,
        attention_head_dim=[2, 4, 4],
        transformer_layers_per_block=[1, 2, 1],
        norm_num_groups=4,
        cross_attention_dim=cross_dim,
        use_linear_projection=True,
        upcast_attention=True,
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    perturb_norms(unet, seed + 1)
    return unet.eval()


def tiny_unet_sdxl(seed, cross_dim, proj_dim, time_dim):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        block_out_channels=[8, 16, 16],
        layers_per_block=2,
        attention_head_dim=[2, 2, 4],
        transformer_layers_per_block=[1, 1, 2],
        norm_num_groups=4,
        cross_attention_dim=cross_dim,
        use_linear_projection=True,
        upcast_attention=False,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + proj_dim,
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    perturb_norms(unet, seed + 1)
    return unet.eval()


SD21_SCHED = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
    timestep_spacing="leading",
)

SDXL_SCHED = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    use_karras_sigmas=False,
)

# --------------------------------------------------------------------------------------------
# 3. References
# --------------------------------------------------------------------------------------------


def rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def smooth_image(seed, h=64, w=96):
    g = torch.Generator().manual_seed(seed)
    yy = torch.linspace(0, 1, h).view(1, h, 1)
    xx = torch.linspace(0, 1, w).view(1, 1, w)
    img = torch.zeros(3, h, w)
    for _ in range(4):
        fy, fx = (torch.rand(2, generator=g) * 4 + 0.5).tolist()
        ph = (torch.rand(3, 1, 1, generator=g) * 6.2832)
        amp = torch.rand(3, 1, 1, generator=g) * 0.5 + 0.1
        img = img + amp * torch.sin(6.2832 * (fy * yy + fx * xx) + ph)
    return img.clamp(-1, 1).unsqueeze(0).contiguous()


class ProbsAttnProcessor:
    """Plain attention that records softmax(QK^T*scale) averaged over heads.

    Also runs the default processor and checks both outputs agree."""

    def __init__(self, name, store):
        self.name = name
        self.store = store
        self.default = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        assert attention_mask is None and attn.norm_cross is None and attn.group_norm is None
        assert attn.spatial_norm is None and not attn.residual_connection
        assert hidden_states.ndim == 3
        ref = self.default(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        b, n, _ = hidden_states.shape
        ctx = encoder_hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states)).float()
        k = attn.head_to_batch_dim(attn.to_k(ctx)).float()
        v = attn.head_to_batch_dim(attn.to_v(ctx)).float()
        probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)
        self.store[self.name] = probs.view(b, attn.heads, n, ctx.shape[1]).mean(1).contiguous()
        out = attn.batch_to_head_dim(probs @ v)
        out = attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor
        err = (out - ref).abs().max().item()
        assert err <= 1e-6 * max(1.0, ref.abs().max().item()), (self.name, err)
        return out


def unet_references(unet, refs, meta, xl, cross_dim, proj_dim):
    h, w = 8, 12
    nb = len(unet.config.block_out_channels)
    assert h % 2 ** (nb - 1) == 0 and w % 2 ** (nb - 1) == 0
    sample = rand((2, 4, h, w), 100)
    t = torch.tensor([421.0], dtype=torch.float32)
    ehs = rand((2, 77, cross_dim), 101)
    refs["unet.sample"] = sample
    refs["unet.timestep"] = t
    refs["unet.encoder_hidden_states"] = ehs
    kwargs = {}
    if xl:
        te = rand((2, proj_dim), 102)
        tid = torch.tensor([[64, 96, 0, 0, 64, 96], [80, 120, 4, 8, 64, 96]], dtype=torch.float32)
        refs["unet.text_embeds"] = te
        refs["unet.time_ids"] = tid
        kwargs["added_cond_kwargs"] = {"text_embeds": te, "time_ids": tid}

    def run():
        return unet(sample, t, ehs, **kwargs).sample.float().contiguous()

    refs["unet.out.plain"] = run()

    unet.enable_freeu(s1=0.6, s2=0.4, b1=1.1, b2=1.2)
    refs["unet.out.freeu"] = run()
    unet.disable_freeu()

    convs = ["down_blocks.1.downsamplers.0.conv"]
    last = nb - 1
    for i in range(len(unet.down_blocks[last].resnets)):
        convs += [f"down_blocks.{last}.resnets.{i}.conv1", f"down_blocks.{last}.resnets.{i}.conv2"]
    for i in range(len(unet.mid_block.resnets)):
        convs += [f"mid_block.resnets.{i}.conv1", f"mid_block.resnets.{i}.conv2"]
    mods = dict(unet.named_modules())
    for c in convs:
        m = mods[c]
        assert isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
        m.dilation, m.padding = (2, 2), (2, 2)
    refs["unet.out.dilated"] = run()
    for c in convs:
        mods[c].dilation, mods[c].padding = (1, 1), (1, 1)
    meta["unet_dilation"] = {"dilation": 2, "padding": 2, "convs": convs}
    assert torch.equal(run(), refs["unet.out.plain"])

    # cross-attention maps
    store, shapes, hooks = {}, {}, []
    orig = unet.attn_processors
    procs = {}
    for key in orig:
        path = key[: -len(".processor")]
        procs[key] = ProbsAttnProcessor(path, store) if path.endswith(".attn2") else AttnProcessor2_0()
    unet.set_attn_processor(procs)
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    for name, m in unet.named_modules():
        if isinstance(m, Transformer2DModel):
            def hook(mod, args, kw, name=name):
                hs = args[0] if args else kw["hidden_states"]
                shapes[name] = list(hs.shape[-2:])
            hooks.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    out = run()
    for hk in hooks:
        hk.remove()
    unet.set_attn_processor(orig)
    err = (out - refs["unet.out.plain"]).abs().max().item()
    print(f"  camap processor vs default: max abs diff {err:.3g}")
    assert err <= 1e-5
    layers = {}
    for path in sorted(store):
        tpath = path.split(".transformer_blocks.")[0]
        hl, wl = shapes[tpath]
        assert store[path].shape == (2, hl * wl, 77)
        refs[f"unet.camap.{path}"] = store[path]
        layers[path] = [hl, wl]
    meta["camap_layers"] = layers


def vae_references(vae, refs):
    img = smooth_image(200)
    refs["vae.image"] = img
    dist = vae.encode(img).latent_dist
    refs["vae.posterior_mean"] = dist.mean.contiguous()
    refs["vae.posterior_logvar"] = dist.logvar.contiguous()
    lat = rand((1, 4, 8, 12), 201)
    refs["vae.latent"] = lat
    refs["vae.decoded"] = vae.decode(lat).sample.contiguous()


def pipeline_case(pipe, refs, meta, case, prompt, negative, steps, guidance, height, width, seed):
    nb = len(pipe.unet.config.block_out_channels)
    div = pipe.vae_scale_factor * 2 ** (nb - 1)
    assert height % div == 0 and width % div == 0
    lat = rand((1, 4, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor), seed)
    refs[f"pipe.{case}.latents"] = lat
    common = dict(
        prompt=prompt,
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        generator=torch.Generator().manual_seed(0),
    )
    out_lat = pipe(latents=lat.clone(), output_type="latent", **common).images
    common["generator"] = torch.Generator().manual_seed(0)
    img = pipe(latents=lat.clone(), output_type="pt", **common).images
    refs[f"pipe.{case}.output_latents"] = out_lat.float().contiguous()
    refs[f"pipe.{case}.image"] = img.float().contiguous()
    assert img.shape == (1, 3, height, width) and img.min() >= 0 and img.max() <= 1
    meta["pipelines"][case] = {
        "prompt": prompt,
        "negative_prompt": negative,
        "steps": steps,
        "guidance": guidance,
        "height": height,
        "width": width,
    }


def tokens(tok, text):
    return tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(torch.int64)


def text_refs(te, ids, prefix, refs, projected=False):
    out = te(ids, output_hidden_states=True)
    if projected:
        refs[f"{prefix}.last_hidden_state"] = out.last_hidden_state.contiguous()
        refs[f"{prefix}.text_embeds"] = out.text_embeds.contiguous()
    else:
        refs[f"{prefix}.last_hidden_state"] = out[0].contiguous()
    refs[f"{prefix}.penultimate"] = out.hidden_states[-2].contiguous()


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def clean_model_dir(d):
    for root, _, files in os.walk(d):
        for f in files:
            if f.endswith((".bin", ".pt", ".ckpt", ".msgpack", ".h5")):
                os.remove(os.path.join(root, f))


def dir_size(d):
    total = 0
    for root, _, files in os.walk(d):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def build(arch, vocab, merges):
    out_dir = os.path.join(FIXTURES, arch)
    model_dir = os.path.join(out_dir, "model")
    tmp = os.path.join(out_dir, "_tmp_tok")
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    eos = vocab["<|endoftext|>"]
    bang = vocab["!"]
    xl = arch == "sdxl"

    if not xl:
        tok = make_tokenizer(tmp, vocab, merges, "!")
        te = clip_text(10, "gelu", vocab, bang, hidden=32, layers=3, heads=4)
        unet = tiny_unet_sd21(20, cross_dim=32)
        vae = tiny_vae(30, 0.18215, False)
        sched = DDIMScheduler(**SD21_SCHED)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(model_dir, safe_serialization=True)
    else:
        tok = make_tokenizer(tmp, vocab, merges, "<|endoftext|>")
        tok2 = make_tokenizer(tmp + "2", vocab, merges, "!")
        te = clip_text(11, "quick_gelu", vocab, eos, hidden=32, layers=2, heads=4)
        te2 = clip_text(12, "gelu", vocab, bang, projection_dim=24, hidden=48, layers=2, heads=4)
        unet = tiny_unet_sdxl(21, cross_dim=32 + 48, proj_dim=24, time_dim=8)
        vae = tiny_vae(31, 0.13025, True)
        sched = EulerDiscreteScheduler(**SDXL_SCHED)
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
            unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True, add_watermarker=False,
        )
        pipe.to(torch.float16)
        pipe.save_pretrained(model_dir, safe_serialization=True)
        shutil.rmtree(tmp + "2")
    shutil.rmtree(tmp)
    # transformers 5 only writes tokenizer.json + tokenizer_config.json: add the classic CLIP files
    # (vocab.json, merges.txt, special_tokens_map.json) and a clean tokenizer_config.json.
    write_tokenizer_dir(os.path.join(model_dir, "tokenizer"), vocab, merges, "<|endoftext|>" if xl else "!")
    if xl:
        write_tokenizer_dir(os.path.join(model_dir, "tokenizer_2"), vocab, merges, "!")
    clean_model_dir(model_dir)
    del pipe, unet, vae, te

    # ---- reload (float32) and compute every reference with the reloaded pipeline ----
    if xl:
        pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, torch_dtype=torch.float32, add_watermarker=False)
        for name in ["unet", "vae", "text_encoder", "text_encoder_2"]:
            for p in getattr(pipe, name).parameters():
                assert p.dtype == torch.float32
    else:
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
        assert pipe.safety_checker is None
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == ("EulerDiscreteScheduler" if xl else "DDIMScheduler")
    for name in ["tokenizer", "tokenizer_2"] if xl else ["tokenizer"]:
        d = os.path.join(model_dir, name)
        assert os.path.isfile(os.path.join(d, "vocab.json")) and os.path.isfile(os.path.join(d, "merges.txt")), d

    refs, meta = {}, {"arch": arch, "pipelines": {}}
    meta["versions"] = {
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "safetensors": safetensors.__version__,
        "python": sys.version.split()[0],
    }
    meta["prompts"] = PROMPTS
    tok_list = [("tokens", pipe.tokenizer)] + ([("tokens_2", pipe.tokenizer_2)] if xl else [])
    for prefix, tk in tok_list:
        for key, text in PROMPTS.items():
            refs[f"{prefix}.{key}"] = tokens(tk, text)
            exp = reference_clip_tokenize(text, vocab, merges, tk.pad_token)
            exp = exp + [tk.pad_token_id] * (77 - len(exp))
            assert refs[f"{prefix}.{key}"][0].tolist() == exp, (prefix, key)
    meta["special_tokens"] = {
        "vocab_size": len(vocab), "bos": vocab["<|startoftext|>"], "eos": eos,
        "pad_tokenizer": pipe.tokenizer.pad_token_id,
    }
    if xl:
        meta["special_tokens"]["pad_tokenizer_2"] = pipe.tokenizer_2.pad_token_id

    text_refs(pipe.text_encoder, refs["tokens.prompt"], "text.prompt", refs)
    if xl:
        text_refs(pipe.text_encoder_2, refs["tokens_2.prompt"], "text_2.prompt", refs, projected=True)

    cross_dim = pipe.unet.config.cross_attention_dim
    proj_dim = pipe.text_encoder_2.config.projection_dim if xl else None
    unet_references(pipe.unet, refs, meta, xl, cross_dim, proj_dim)
    vae_references(pipe.vae, refs)

    pipeline_case(pipe, refs, meta, "cfg", PROMPTS["prompt"], PROMPTS["negative"], 4, 7.5, 64, 96, 300)
    if xl:
        pipeline_case(pipe, refs, meta, "noneg", PROMPTS["prompt"], None, 3, 5.0, 64, 96, 301)

    meta["notes"] = {
        "tokens": "tokenizer(text, padding='max_length', max_length=77, truncation=True).input_ids, int64 [1,77]; "
                  "tokens_2 from tokenizer_2 (sdxl). Keys of reference.json 'prompts'.",
        "text": "text_encoder(tokens.prompt, output_hidden_states=True): last_hidden_state = output[0] (after "
                "final_layer_norm), penultimate = hidden_states[-2] (no final_layer_norm); text_2.* likewise for "
                "text_encoder_2 (CLIPTextModelWithProjection), text_embeds = projected pooled output (EOS token).",
        "unet": "unet(unet.sample, unet.timestep, unet.encoder_hidden_states[, added_cond_kwargs={text_embeds,time_ids}])"
                ".sample. out.plain: default; out.freeu: enable_freeu(s1=0.6,s2=0.4,b1=1.1,b2=1.2); out.dilated: "
                "convs in 'unet_dilation' set to dilation=2, padding=2. camap.<attn2 path>: softmax(QK^T*scale) "
                "averaged over heads, [batch, h_layer*w_layer, 77] (row-major h,w), from the plain run; "
                "'camap_layers' gives [h_layer, w_layer].",
        "vae": "posterior_mean/logvar = vae.encode(vae.image).latent_dist.mean/.logvar (logvar clamped to [-30,20]); "
               "decoded = vae.decode(vae.latent).sample (latent NOT scaled by scaling_factor).",
        "pipe": "pipe(prompt, negative_prompt, num_inference_steps, guidance_scale, height, width, "
                "latents=pipe.<case>.latents); the pipeline multiplies latents by scheduler.init_noise_sigma first. "
                "output_latents: output_type='latent' (final denoised latents, unscaled); image: output_type='pt' "
                "[1,3,H,W] in [0,1] = clamp(vae.decode(latents/scaling_factor)/2+0.5).",
    }
    if xl:
        meta["notes"]["fp16"] = ("sdxl weights are stored float16; references computed in float32 from the "
                                 "fp16-rounded weights (pipeline reloaded with torch_dtype=float32).")
        meta["notes"]["noneg"] = ("negative_prompt=None with force_zeros_for_empty_prompt=True: negative prompt "
                                  "embeds and negative pooled embeds are all zeros (text encoders not run).")

    for k, v in refs.items():
        if v.dtype != torch.int64:
            assert v.dtype == torch.float32, k
            assert torch.isfinite(v).all(), k
            if not (k.startswith("unet.camap") or k in ("unet.timestep",)):
                assert v.abs().max() > 1e-6, f"{k} is trivially zero"
        refs[k] = v.contiguous()
    for k in ["unet.out.freeu", "unet.out.dilated"]:
        d = (refs[k] - refs["unet.out.plain"]).norm() / refs["unet.out.plain"].norm()
        print(f"  rel diff {k} vs plain: {d:.4f}")
        assert d > 1e-3
    for k in sorted(refs):
        v = refs[k]
        print(f"  {k:60s} {str(list(v.shape)):18s} {str(v.dtype)[6:]:8s} norm {v.double().norm().item():.6g}")

    save_file(dict(sorted(refs.items())), os.path.join(out_dir, "reference.safetensors"), metadata={"arch": arch})
    meta["tensors"] = {k: list(refs[k].shape) for k in sorted(refs)}
    with open(os.path.join(out_dir, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")

    for root, _, files in sorted(os.walk(out_dir)):
        for fn in sorted(files):
            p = os.path.join(root, fn)
            print(f"  {os.path.relpath(p, FIXTURES):60s} {os.path.getsize(p):>9d} B")
    return dir_size(out_dir)


def main():
    vocab, merges = learn_bpe(400)
    print(f"BPE vocab: {len(vocab)} tokens ({len(merges)} merges)")
    total = 0
    for arch in ["sd21", "sdxl"]:
        print(f"== {arch}")
        total += build(arch, vocab, merges)
    print(f"TOTAL fixture size (sd21+sdxl): {total} B = {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
