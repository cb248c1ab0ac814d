#!/usr/bin/env python3
"""Single-file checkpoint fixtures: a tiny SDXL and a tiny SD 2.1 (v-prediction) model written
as diffusers directories, converted to ONE original-layout (LDM/SGM) .safetensors file each by
diffusers' own conversion scripts, plus diffusers pipeline references computed from the
DIRECTORY.  The Rust test renders the single file and compares (tests/cli_single_file.rs).

HOW TO RUN (from the repository root; the two scripts come from the huggingface/diffusers
repository, scripts/convert_diffusers_to_original_{sdxl,stable_diffusion}.py, and are not
committed):

    /work/pyenv/bin/python tests/parity/make_single_file_fixtures.py SCRIPTS_DIR

WHAT IT WRITES, for arch in sdxl_single, sd21_single:

    tests/parity/fixtures/<arch>/model.safetensors      the single file (--half: float16)
    tests/parity/fixtures/<arch>/reference.{json,safetensors}   pipeline cases (see
        make_fixtures.py: pipe.<case>.latents / output_latents / image)

The tokenizers are the standard CLIP BPE vocabulary (49408 tokens) that Tessera ships in
worker/assets/clip_bpe_simple_vocab_16e6.txt.gz, so the text encoders' embedding tables have the
real vocabulary size (hidden width 8 keeps them small).  The shapes follow the rules Tessera
infers a single file's config by: 64-channel attention heads (one head when narrower), 32
GroupNorm groups or the gcd with the narrowest width, a UNet narrower than 320 channels is a
test model with a 128 px training size.  References are computed in float32 from the
fp16-rounded weights (the directory is saved in fp16 and reloaded as float32).
"""

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_fixtures as mf  # noqa: E402  (helpers: tokenizer files, seeded tensors, pipeline cases)

ROOT = os.path.dirname(os.path.dirname(HERE))
BPE = os.path.join(ROOT, "worker", "assets", "clip_bpe_simple_vocab_16e6.txt.gz")
FIXTURES = os.path.join(HERE, "fixtures")
torch.set_grad_enabled(False)


def standard_vocab():
    """CLIP's vocabulary and merges as open_clip's SimpleTokenizer derives them from the file."""
    lines = gzip.open(BPE).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(mf.bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def text(seed, act, vocab, pad_id, layers, projection_dim=None):
    return mf.clip_text(seed, act, vocab, pad_id, projection_dim=projection_dim, hidden=8, layers=layers, heads=1)


def vae(seed, scaling_factor, force_upcast):
    torch.manual_seed(seed)
    v = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                      up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 16, 16],
                      layers_per_block=2, latent_channels=4, norm_num_groups=8, sample_size=128,
                      scaling_factor=scaling_factor, force_upcast=force_upcast)
    mf.perturb_norms(v, seed + 1)
    return v.eval()


def unet(seed, **arch):
    """A tiny UNet under the rules above: one head per level, 8 GroupNorm groups, 128 px."""
    torch.manual_seed(seed)
    levels = len(arch["block_out_channels"])
    u = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
                             attention_head_dim=[1] * levels, norm_num_groups=8,
                             use_linear_projection=True, **arch)
    mf.perturb_norms(u, seed + 1)
    return u.eval()


def unet_sdxl(seed):
    return unet(seed, block_out_channels=[8, 16, 16],
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                transformer_layers_per_block=[1, 1, 2], cross_attention_dim=16, addition_embed_type="text_time",
                addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4)


def unet_sd21(seed):
    return unet(seed, block_out_channels=[8, 16, 16, 16], down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, cross_attention_dim=8,
                upcast_attention=True)


def save_dir(pipe, model_dir, tmp, vocab, merges, pads):
    pipe.to(torch.float16)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    for enc in ["text_encoder", "text_encoder_2"]:
        prefix_text_model(os.path.join(model_dir, enc, "model.safetensors"))
    for sub, pad in pads:
        mf.write_tokenizer_dir(os.path.join(model_dir, sub), vocab, merges, pad)
    mf.clean_model_dir(model_dir)


def prefix_text_model(path):
    """transformers 5 saves CLIPTextModel without the `text_model.` prefix that every published
    checkpoint has (and that the conversion scripts look for): restore it."""
    if not os.path.exists(path):
        return
    sd = load_file(path)
    save_file({(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
               for k, v in sd.items()}, path, metadata={"format": "pt"})


def build(arch, scripts, vocab, merges):
    out = os.path.join(FIXTURES, arch)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    tmp = tempfile.mkdtemp()
    model_dir = os.path.join(tmp, "model")
    eos, bang = vocab["<|endoftext|>"], vocab["!"]
    xl = arch.startswith("sdxl")
    tok = mf.make_tokenizer(os.path.join(tmp, "t1"), vocab, merges, "<|endoftext|>" if xl else "!")
    if xl:
        tok2 = mf.make_tokenizer(os.path.join(tmp, "t2"), vocab, merges, "!")
        pipe = StableDiffusionXLPipeline(
            vae=vae(31, 0.13025, True), text_encoder=text(11, "quick_gelu", vocab, eos, 2),
            text_encoder_2=text(12, "gelu", vocab, bang, 2, projection_dim=8), tokenizer=tok, tokenizer_2=tok2,
            unet=unet_sdxl(21), scheduler=EulerDiscreteScheduler(**mf.SDXL_SCHED),
            force_zeros_for_empty_prompt=True, add_watermarker=False)
        save_dir(pipe, model_dir, tmp, vocab, merges, [("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")])
        script = "convert_diffusers_to_original_sdxl.py"
    else:
        # 23 layers: the conversion script recognises SD 2.x by the depth of its text encoder.
        pipe = StableDiffusionPipeline(
            vae=vae(30, 0.18215, False), text_encoder=text(10, "gelu", vocab, bang, 23), tokenizer=tok,
            unet=unet_sd21(20), scheduler=DDIMScheduler(**mf.SD21_SCHED), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        save_dir(pipe, model_dir, tmp, vocab, merges, [("tokenizer", "!")])
        script = "convert_diffusers_to_original_stable_diffusion.py"
    subprocess.run([sys.executable, os.path.join(scripts, script), "--model_path", model_dir,
                    "--checkpoint_path", os.path.join(out, "model.safetensors"), "--half",
                    "--use_safetensors"], check=True)
    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    extra = {"add_watermarker": False} if xl else {}
    pipe = cls.from_pretrained(model_dir, torch_dtype=torch.float32, **extra)
    pipe.set_progress_bar_config(disable=True)
    refs, meta = {}, {"pipelines": {}, "source": "directory " + arch + ", converted by diffusers/scripts/" + script}
    mf.pipeline_case(pipe, refs, meta, "cfg", mf.PROMPTS["prompt"], mf.PROMPTS["negative"], 3, 7.5, 64, 64, 300)
    save_file({k: v.contiguous() for k, v in refs.items()}, os.path.join(out, "reference.safetensors"))
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    keep = os.environ.get("KEEP_DIRS")  # to compare Tessera on the directory by hand
    if keep:
        shutil.copytree(model_dir, os.path.join(keep, arch), dirs_exist_ok=True)
    shutil.rmtree(tmp)


def main():
    vocab, merges = standard_vocab()
    assert len(vocab) == 49408
    for arch in ["sdxl_single", "sd21_single"]:
        build(arch, sys.argv[1], vocab, merges)


if __name__ == "__main__":
    main()
