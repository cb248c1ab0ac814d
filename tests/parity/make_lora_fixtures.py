#!/usr/bin/env python3
"""LoRA parity fixtures over the tiny SDXL fixture model (tests/parity/fixtures/sdxl/model):

    tests/parity/fixtures/sdxl_lora/peft.safetensors   diffusers/PEFT format, written by
        StableDiffusionXLPipeline.save_lora_weights from peft adapters (UNet attention and
        text_encoder q/v; r=4, lora_alpha=8 in the file's adapter metadata)
    tests/parity/fixtures/sdxl_lora/kohya.safetensors  kohya format (lora_unet_*, lora_te2_*,
        lora_down/lora_up/alpha), including LoCon 3x3 convolution LoRAs on resnets
    tests/parity/fixtures/sdxl_lora/reference.{json,safetensors}   diffusers' pipeline with both
        loaded by load_lora_weights, weighted 0.7 (peft) and 0.4 (kohya) by set_adapters, then
        fuse_lora: pipeline case "cfg" (see make_fixtures.py)

HOW TO RUN: /work/pyenv/bin/python tests/parity/make_lora_fixtures.py
"""

import json
import os
import shutil
import sys

import torch
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_fixtures as mf  # noqa: E402

MODEL = os.path.join(HERE, "fixtures", "sdxl", "model")
OUT = os.path.join(HERE, "fixtures", "sdxl_lora")
WEIGHTS = {"peft": 0.7, "kohya": 0.4}
torch.set_grad_enabled(False)

# transformers 5.25 asks for peft >= 0.22 before it adds or loads a text encoder's adapter, a
# version not published yet; 0.21.2 (installed) has every API it calls, so let the check pass.
import transformers.integrations.peft as _tp  # noqa: E402
_tp.check_peft_version = lambda min_version: None


def load():
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL, torch_dtype=torch.float32, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def randomize_lora(model, seed):
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def metadata(cfg):
    """The adapter config as diffusers stores it, made reproducible: target modules sorted (peft
    keeps a set), no local base-model path."""
    d = cfg.to_dict()
    d["target_modules"] = sorted(d["target_modules"])
    d["base_model_name_or_path"] = None
    return d


def write_peft(path):
    pipe = load()
    unet_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    te_cfg = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"])
    pipe.unet.add_adapter(unet_cfg)
    pipe.text_encoder.add_adapter(te_cfg)
    randomize_lora(pipe.unet, 1)
    randomize_lora(pipe.text_encoder, 2)
    StableDiffusionXLPipeline.save_lora_weights(
        OUT, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=metadata(unet_cfg), text_encoder_lora_adapter_metadata=metadata(te_cfg),
        weight_name="peft.safetensors", safe_serialization=True)


def kohya_pair(g, out_f, in_f, rank, kernel=None):
    down = (rank, in_f) if kernel is None else (rank, in_f, kernel, kernel)
    up = (out_f, rank) if kernel is None else (out_f, rank, 1, 1)
    return torch.randn(down, generator=g) * 0.3, torch.randn(up, generator=g) * 0.3


def write_kohya(path):
    pipe = load()
    g = torch.Generator().manual_seed(3)
    modules = {"unet": pipe.unet, "te2": pipe.text_encoder_2}
    targets = [
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
        ("unet", "up_blocks.0.attentions.1.transformer_blocks.1.ff.net.2"),
        ("unet", "mid_block.attentions.0.proj_in"),
        ("unet", "down_blocks.1.resnets.0.conv1"),
        ("unet", "up_blocks.1.resnets.2.conv2"),
        ("te2", "text_model.encoder.layers.1.mlp.fc1"),
    ]
    sd = {}
    for part, name in targets:
        mod = modules[part].get_submodule(name)
        w = mod.weight
        kernel = w.shape[2] if w.ndim == 4 else None
        down, up = kohya_pair(g, w.shape[0], w.shape[1], 4, kernel)
        key = f"lora_{part}_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = down
        sd[f"{key}.lora_up.weight"] = up
        sd[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(sd, path)


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    write_peft(os.path.join(OUT, "peft.safetensors"))
    write_kohya(os.path.join(OUT, "kohya.safetensors"))
    pipe = load()
    pipe.load_lora_weights(OUT, weight_name="peft.safetensors", adapter_name="peft")
    pipe.load_lora_weights(OUT, weight_name="kohya.safetensors", adapter_name="kohya")
    pipe.set_adapters(list(WEIGHTS), list(WEIGHTS.values()))
    refs, meta = {}, {"pipelines": {}, "loras": WEIGHTS}
    unfused = {}
    mf.pipeline_case(pipe, unfused, {"pipelines": {}}, "cfg", mf.PROMPTS["prompt"], mf.PROMPTS["negative"], 3, 7.5, 64, 96, 400)
    pipe.fuse_lora(adapter_names=list(WEIGHTS))
    pipe.unload_lora_weights()
    mf.pipeline_case(pipe, refs, meta, "cfg", mf.PROMPTS["prompt"], mf.PROMPTS["negative"], 3, 7.5, 64, 96, 400)
    d = (refs["pipe.cfg.output_latents"] - unfused["pipe.cfg.output_latents"]).norm() / unfused["pipe.cfg.output_latents"].norm()
    print("fused vs unfused rel err", d.item())
    base = load()
    plain = {}
    mf.pipeline_case(base, plain, {"pipelines": {}}, "cfg", mf.PROMPTS["prompt"], mf.PROMPTS["negative"], 3, 7.5, 64, 96, 400)
    d = (refs["pipe.cfg.output_latents"] - plain["pipe.cfg.output_latents"]).norm() / plain["pipe.cfg.output_latents"].norm()
    print("with vs without LoRAs rel diff", d.item())
    save_file({k: v.contiguous() for k, v in refs.items()}, os.path.join(OUT, "reference.safetensors"))
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
