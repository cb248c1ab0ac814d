#!/usr/bin/env python3
"""Generate the numerical-parity fixtures for Tessera's SD3 model code.

HOW TO RUN (from the repository root, with the venv of make_fixtures.py):

    v/bin/python tests/parity/make_sd3_fixtures.py

WHAT IT WRITES:

    tests/parity/fixtures/sd3/model/      a complete StableDiffusion3Pipeline directory:
        tokenizer/, tokenizer_2/ (CLIP BPE), tokenizer_3/ (a small T5 unigram tokenizer.json),
        text_encoder/, text_encoder_2/ (CLIPTextModelWithProjection), text_encoder_3/
        (T5EncoderModel, gated-gelu), transformer/ (SD3Transformer2DModel in the SD3.5 layout:
        qk_norm rms_norm, a dual-attention block; weights stored FLOAT16), vae/ (16 channels,
        shift_factor), scheduler/ (FlowMatchEulerDiscreteScheduler, shift 3)
    tests/parity/fixtures/sd3/transformer_sd3_medium/   a second transformer in SD3 medium's
        layout (no qk_norm, no dual attention), float32
    tests/parity/fixtures/sd3/reference.safetensors     reference tensors (f32; token ids i64)
    tests/parity/fixtures/sd3/reference.json            prompts, pipeline cases, versions

Without T5 ("text_encoder_3: [null, null]", as FreCaS runs SD3) the references come from the
same directory loaded with text_encoder_3=None, tokenizer_3=None; the Rust test copies the
directory without those two folders and nulls them in model_index.json.

All references are computed in float32 from the saved (fp16-rounded) weights, with the pipeline
reloaded from disk. Deterministic; CI does not run it.
"""

import json
import os
import shutil
import sys

import torch

import diffusers
import safetensors
import transformers
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.models.attention_processor import JointAttnProcessor2_0
from safetensors.torch import save_file
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import (  # noqa: E402
    FIXTURES,
    PROMPTS,
    WORD_LIST,
    clean_model_dir,
    clip_text,
    dir_size,
    learn_bpe,
    make_tokenizer,
    perturb_norms,
    rand,
    smooth_image,
    text_refs,
    tokens,
    write_tokenizer_dir,
)

torch.set_grad_enabled(False)
torch.use_deterministic_algorithms(True)

OUT = os.path.join(FIXTURES, "sd3")
JOINT_DIM = 96  # T5 width = the transformer's joint_attention_dim (>= the 80 CLIP features)


def t5_tokenizer_json(words):
    """A small T5-style unigram tokenizer: NFKC, collapsed spaces, Metaspace, `</s>` appended."""
    vocab = [["<pad>", 0.0], ["</s>", 0.0], ["<unk>", 0.0], ["\u2581", -2.0]]
    for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'&-:;()":
        vocab += [[c, -5.0], ["\u2581" + c, -4.0]]
    seen = set()
    for w in words:
        if len(w) > 1 and w not in seen:
            seen.add(w)
            vocab.append(["\u2581" + w, -3.0])
    special = lambda i, c: {"id": i, "content": c, "single_word": False, "lstrip": False,  # noqa: E731
                            "rstrip": False, "normalized": False, "special": True}
    meta = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    seq = {"Sequence": {"id": "A", "type_id": 0}}
    eos = {"SpecialToken": {"id": "</s>", "type_id": 0}}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [special(0, "<pad>"), special(1, "</s>"), special(2, "<unk>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFKC"}, {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]},
        "pre_tokenizer": meta,
        "post_processor": {"type": "TemplateProcessing", "single": [seq, eos],
                           "pair": [seq, eos, {"Sequence": {"id": "B", "type_id": 0}}, eos],
                           "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}},
        "decoder": meta,
        "model": {"type": "Unigram", "unk_id": 2, "vocab": vocab, "byte_fallback": False},
    }


def make_t5_tokenizer(path):
    os.makedirs(path, exist_ok=True)
    words = " ".join(WORD_LIST).split() if isinstance(WORD_LIST, (list, tuple)) else WORD_LIST.split()
    with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(t5_tokenizer_json(words), f, ensure_ascii=False, indent=1)
    tok = T5TokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"), eos_token="</s>",
                          unk_token="<unk>", pad_token="<pad>", extra_ids=0)
    ids = tok(PROMPTS["prompt"]).input_ids
    assert ids[-1] == 1 and 2 not in ids, ids
    return tok


def perturb_rms(model, seed):
    """RMSNorm / T5 layer-norm weights start at one: randomize them too."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if ("norm" in name or "layer_norm" in name) and p.ndim == 1 and name.endswith("weight"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))


def tiny_t5(seed, vocab_size):
    cfg = T5Config(vocab_size=vocab_size, d_model=JOINT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=32, relative_attention_max_distance=128,
                   feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(seed)
    m = T5EncoderModel(cfg)
    perturb_rms(m, seed + 1)
    return m.eval()


def tiny_transformer(seed, sd35):
    torch.manual_seed(seed)
    t = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=JOINT_DIM, caption_projection_dim=32,
        pooled_projection_dim=32 + 48, out_channels=16, pos_embed_max_size=24,
        dual_attention_layers=(0,) if sd35 else (), qk_norm="rms_norm" if sd35 else None,
    )
    # Zero-initialised modulations (adaLN-Zero) would make every block the identity.
    g = torch.Generator().manual_seed(seed + 7)
    for name, p in sorted(t.named_parameters()):
        if p.abs().max() == 0:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    perturb_rms(t, seed + 1)
    return t.eval()


def tiny_vae16(seed):
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 16, 16, 16],
        layers_per_block=1, act_fn="silu", latent_channels=16, norm_num_groups=4, sample_size=64,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
        force_upcast=True,
    )
    perturb_norms(vae, seed + 1)
    return vae.eval()


class MapRecorder:
    """JointAttnProcessor2_0 that also records the text->image map: the image queries' softmax
    over the text keys alone, averaged over heads (FreCaS' camap for SD3)."""

    def __init__(self, name, store):
        self.name, self.store, self.inner = name, store, JointAttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *a, **k):
        if encoder_hidden_states is not None:
            b = hidden_states.shape[0]
            q = attn.to_q(hidden_states)
            hd = q.shape[-1] // attn.heads
            q = q.view(b, -1, attn.heads, hd).transpose(1, 2)
            kt = attn.add_k_proj(encoder_hidden_states).view(b, -1, attn.heads, hd).transpose(1, 2)
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_added_k is not None:
                kt = attn.norm_added_k(kt)
            probs = torch.softmax(q @ kt.transpose(-1, -2) * attn.scale, dim=-1)
            self.store[self.name] = probs.mean(1).contiguous()
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *a, **k)


def transformer_refs(tr, refs, prefix, meta, capture):
    h, w = 8, 12
    sample = rand((2, 16, h, w), 400)
    ehs = rand((2, 77 + 256, JOINT_DIM), 401)
    pooled = rand((2, 80), 402)
    t = torch.tensor([743.25, 743.25])
    # One set of inputs for both transformers.
    refs["transformer.sample"], refs["transformer.encoder_hidden_states"] = sample, ehs
    refs["transformer.pooled"], refs["transformer.timestep"] = pooled, t[:1]
    store = {}
    if capture:
        tr.set_attn_processor({n: MapRecorder(n.removesuffix(".processor"), store) if n.endswith("attn.processor")
                               else JointAttnProcessor2_0() for n in tr.attn_processors})
    refs[f"{prefix}.out"] = tr(hidden_states=sample, encoder_hidden_states=ehs, pooled_projections=pooled,
                               timestep=t).sample.contiguous()
    if capture:
        tr.set_attn_processor(JointAttnProcessor2_0())
        for name, m in sorted(store.items()):
            refs[f"{prefix}.camap.{name}"] = m
        meta["camap_layers"] = sorted(store)


def vae_refs(vae, refs):
    img = smooth_image(500)
    refs["vae.image"] = img
    dist = vae.encode(img).latent_dist
    refs["vae.posterior_mean"] = dist.mean.contiguous()
    refs["vae.posterior_logvar"] = dist.logvar.contiguous()
    lat = rand((1, 16, 8, 12), 501)
    refs["vae.latent"] = lat
    refs["vae.decoded"] = vae.decode(lat).sample.contiguous()


def pipeline_case(pipe, refs, meta, case, negative, steps, guidance, seed):
    height, width = 64, 96
    lat = rand((1, 16, height // 8, width // 8), seed)
    refs[f"pipe.{case}.latents"] = lat
    common = dict(prompt=PROMPTS["prompt"], negative_prompt=negative, num_inference_steps=steps,
                  guidance_scale=guidance, height=height, width=width)
    refs[f"pipe.{case}.output_latents"] = pipe(latents=lat.clone(), output_type="latent", **common).images.float().contiguous()
    img = pipe(latents=lat.clone(), output_type="pt", **common).images
    refs[f"pipe.{case}.image"] = img.float().contiguous()
    meta["pipelines"][case] = {"prompt": PROMPTS["prompt"], "negative_prompt": negative, "steps": steps,
                               "guidance": guidance, "height": height, "width": width,
                               "t5": pipe.text_encoder_3 is not None}
    pipe.scheduler.set_timesteps(steps)
    refs[f"pipe.{case}.timesteps"] = pipe.scheduler.timesteps.float().contiguous()


def build():
    vocab, merges = learn_bpe(400)
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    model_dir = os.path.join(OUT, "model")
    os.makedirs(OUT)
    tmp = os.path.join(OUT, "_tmp_tok")
    eos, bang = vocab["<|endoftext|>"], vocab["!"]
    tok = make_tokenizer(tmp, vocab, merges, "<|endoftext|>")
    tok2 = make_tokenizer(tmp + "2", vocab, merges, "!")
    tok3 = make_t5_tokenizer(tmp + "3")
    te = clip_text(41, "quick_gelu", vocab, eos, projection_dim=32, hidden=32, layers=2, heads=4)
    te2 = clip_text(42, "gelu", vocab, bang, projection_dim=48, hidden=48, layers=2, heads=4)
    te3 = tiny_t5(43, len(tok3))
    transformer = tiny_transformer(44, sd35=True)
    vae = tiny_vae16(45)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2,
        text_encoder_3=te3, tokenizer_3=tok3,
    )
    pipe.save_pretrained(model_dir, safe_serialization=True)
    # The transformer in half precision on disk.
    transformer.to(torch.float16).save_pretrained(os.path.join(model_dir, "transformer"), safe_serialization=True)
    for t in ["", "2", "3"]:
        shutil.rmtree(tmp + t)
    write_tokenizer_dir(os.path.join(model_dir, "tokenizer"), vocab, merges, "<|endoftext|>")
    write_tokenizer_dir(os.path.join(model_dir, "tokenizer_2"), vocab, merges, "!")
    clean_model_dir(model_dir)
    medium_dir = os.path.join(OUT, "transformer_sd3_medium")
    tiny_transformer(46, sd35=False).to(torch.float16).save_pretrained(medium_dir, safe_serialization=True)
    clean_model_dir(medium_dir)
    del pipe

    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder_3 is not None
    for p in pipe.transformer.parameters():
        assert p.dtype == torch.float32
    refs, meta = {}, {"arch": "sd3", "pipelines": {}}
    meta["versions"] = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                        "transformers": transformers.__version__, "safetensors": safetensors.__version__}
    meta["prompts"] = PROMPTS
    for prefix, tk in [("tokens", pipe.tokenizer), ("tokens_2", pipe.tokenizer_2)]:
        for key, text in PROMPTS.items():
            refs[f"{prefix}.{key}"] = tokens(tk, text)
    for key, text in PROMPTS.items():
        refs[f"tokens_3.{key}"] = pipe.tokenizer_3(text, padding="max_length", max_length=256, truncation=True,
                                                   add_special_tokens=True, return_tensors="pt").input_ids.to(torch.int64)
    text_refs(pipe.text_encoder, refs["tokens.prompt"], "text.prompt", refs, projected=True)
    text_refs(pipe.text_encoder_2, refs["tokens_2.prompt"], "text_2.prompt", refs, projected=True)
    refs["text_3.prompt.last_hidden_state"] = pipe.text_encoder_3(refs["tokens_3.prompt"])[0].contiguous()
    pe, ne, pp, npool = pipe.encode_prompt(PROMPTS["prompt"], None, None, negative_prompt=PROMPTS["negative"])
    refs.update({"encode.prompt_embeds": pe, "encode.pooled": pp, "encode.negative_pooled": npool})
    transformer_refs(pipe.transformer, refs, "transformer", meta, capture=True)
    medium = SD3Transformer2DModel.from_pretrained(medium_dir, torch_dtype=torch.float32).eval()
    transformer_refs(medium, refs, "transformer_medium", meta, capture=False)
    vae_refs(pipe.vae, refs)
    pipeline_case(pipe, refs, meta, "cfg", PROMPTS["negative"], 4, 7.5, 600)

    no_t5 = StableDiffusion3Pipeline.from_pretrained(model_dir, text_encoder_3=None, tokenizer_3=None,
                                                     torch_dtype=torch.float32)
    no_t5.set_progress_bar_config(disable=True)
    pe, ne, pp, npool = no_t5.encode_prompt(PROMPTS["prompt"], None, None, negative_prompt=None)
    refs.update({"encode_no_t5.negative_prompt_embeds": ne, "encode_no_t5.negative_pooled": npool})
    pipeline_case(no_t5, refs, meta, "no_t5", None, 3, 5.0, 601)

    meta["notes"] = {
        "tokens": "tokens/tokens_2: CLIP tokenizers, max_length 77; tokens_3: T5 tokenizer, padding max_length 256.",
        "text": "text.* / text_2.*: CLIPTextModelWithProjection (penultimate = hidden_states[-2], text_embeds); "
                "text_3.prompt.last_hidden_state: T5EncoderModel(tokens_3.prompt)[0].",
        "encode": "pipe.encode_prompt(prompt, negative_prompt=...): prompt embeds (1, 77+256, 96), pooled "
                  "(1, 80), negative pooled; encode_no_t5: the negative ('' for None) without text_encoder_3.",
        "transformer": "transformer(sample, encoder_hidden_states, pooled, timestep=[743.25]*2).sample, the "
                       "pipeline's fp16-stored SD3.5-layout transformer; camap.<block>.attn: softmax of image "
                       "queries over the text keys only, head mean, [2, 4*6, 333]. transformer_medium.*: the "
                       "SD3-medium-layout transformer of transformer_sd3_medium/.",
        "vae": "posterior of vae.image; decoded = vae.decode(vae.latent) (no scaling, no shift).",
        "pipe": "pipe(prompt, negative_prompt, steps, guidance, 64x96, latents=pipe.<case>.latents); "
                "output_latents before (x / scaling_factor + shift_factor); image in [0, 1].",
    }
    for k, v in refs.items():
        if v.dtype != torch.int64:
            v = v.float()
            assert torch.isfinite(v).all(), k
        refs[k] = v.contiguous()
    for k in sorted(refs):
        print(f"  {k:60s} {str(list(refs[k].shape)):18s} norm {refs[k].double().norm().item():.6g}")
    save_file(dict(sorted(refs.items())), os.path.join(OUT, "reference.safetensors"), metadata={"arch": "sd3"})
    meta["tensors"] = {k: list(refs[k].shape) for k in sorted(refs)}
    with open(os.path.join(OUT, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"TOTAL sd3 fixture size: {dir_size(OUT) / 1e6:.2f} MB")


if __name__ == "__main__":
    build()
