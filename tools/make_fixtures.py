#!/usr/bin/env python3
"""Build the reference fixtures that medvlm's Rust tests compare against.

Everything here comes from the reference stack (PyTorch + Hugging Face transformers, PIL,
tokenizers); nothing is computed by medvlm itself. CI never runs this script: it commits its
small outputs under tests/fixtures/.

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install -r tools/requirements.txt
    /tmp/ref/bin/python tools/make_fixtures.py            # writes tests/fixtures/
    python3 -m venv /tmp/ref5 && /tmp/ref5/bin/pip install -r tools/requirements-v5.txt
    /tmp/ref5/bin/python tools/make_fixtures.py --v5      # adds tiny-c, tiny-25a, tiny-25b

What it writes:
  images/             input images (square, non-square, grayscale, palette, RGBA, tiny, large,
                      JPEG, one real MRI slice from the MedVLM-R1 test set)
  pixels/             transformers' Qwen2VLImageProcessor (the PIL "slow" processor, the one the
                      released Qwen2-VL checkpoints were trained with) output per image:
                      pixel_values (f32) and image_grid_thw (i64), plus manifest.json
  tiny-a/, tiny-b/    two tiny random Qwen2-VL checkpoints in real Hugging Face layout that differ
                      in every axis we can vary (mrope_section, tied vs untied lm_head, depth,
                      GQA ratio, rope_theta, weight dtype f32 vs bf16, chat template location)
  tiny-c/             (--v5) Qwen2-VL saved by transformers 5: text_config, rope_parameters with
                      a non-default rope theta, dtype, layer_types; untied
  tiny-k/             (--v5) Qwen2-VL with a 256-wide decoder (bf16, tied, head width 128):
                      wide enough for q4_k's 256-value super-blocks
  tiny-25a/, tiny-25b/
                      (--v5) Qwen2.5-VL, released layout (flat config, model.layers.* / visual.*
                      names, tied, f32) and transformers-5 layout (untied, bf16); window
                      attention active on every test image (56-pixel windows), full attention
                      in the listed blocks
  cases-tiny-a.json, cases-tiny-a.safetensors (same for each model)
                      per prompt: input ids, M-RoPE position ids, logits, greedy continuation,
                      teacher-forced log-probs of a completion
"""

import json
import math
import os
import shutil
import sys

import numpy as np
import PIL
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    Qwen2TokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
)

try:  # transformers >= 4.49 has Qwen2.5-VL; the --v5 fixtures need 5.x
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
except ImportError:  # pragma: no cover
    Qwen2_5_VLConfig = Qwen2_5_VLForConditionalGeneration = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures")
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")

# The chat template shipped with Qwen/Qwen2-VL-2B-Instruct (tokenizer_config.json), verbatim.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's special tokens, in Qwen2-VL's order (ids follow the BPE vocabulary here).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2's pre-tokenizer split, as in the released tokenizer.json.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS = """
You are a helpful assistant. Answer the question about the medical image.
{Question} Your task: 1. Think through the question step by step, enclose your reasoning process
in <think>...</think> tags. 2. Then provide the correct single-letter choice (A, B, C, D,...)
inside <answer>...</answer> tags. 3. No extra information or text outside of these tags.
What modality is used to take this image? A) MRI B) CT C) X-Ray D) Ultrasound
Which organ is abnormal in this image? The liver shows a hypodense lesion in the right lobe.
The brain MRI shows a bright lesion in the left frontal lobe with surrounding edema.
Axial CT of the abdomen demonstrates a normal kidney and spleen. No fracture is seen.
The chest X-ray shows clear lungs, a normal heart size and no pleural effusion.
The knee MRI shows a torn meniscus. The shoulder shows a rotator cuff tear.
Where is the lesion located? Left, right, upper, lower, central. How many lesions are visible?
<think>The image is a grayscale axial slice with high contrast between fat and water, so it
is an MRI.</think><answer>A</answer> <think>The bright region is on the left side.</think>
<answer>B</answer> Question: Which side is brighter? Options: A) left B) right C) equal
Picture 1: Picture 2: Describe the scan. Compare the two scans. 0123456789 .,;:!?()[]{}<>/-+*=
"""


def seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

def smooth_noise(rng, h, w, channels):
    """A picture with structure at several scales, so resizing has something to get wrong."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.zeros((h, w, channels))
    for c in range(channels):
        for _ in range(4):
            fy, fx = rng.uniform(0.02, 0.4, size=2)
            ph = rng.uniform(0, 2 * np.pi)
            out[..., c] += np.sin(fy * yy + fx * xx + ph)
        out[..., c] += rng.normal(0, 0.6, size=(h, w))  # pixel-level detail
    out = (out - out.min()) / (out.max() - out.min())
    return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)


def make_images():
    d = os.path.join(OUT, "images")
    os.makedirs(d, exist_ok=True)
    rng = np.random.RandomState(1234)
    made = {}

    def save(name, im, **kw):
        path = os.path.join(d, name)
        im.save(path, **kw)
        made[name] = path

    save("square.png", Image.fromarray(smooth_noise(rng, 64, 64, 3), "RGB"))
    save("wide.png", Image.fromarray(smooth_noise(rng, 60, 150, 3), "RGB"))
    save("tall.png", Image.fromarray(smooth_noise(rng, 130, 45, 3), "RGB"))
    save("gray.png", Image.fromarray(smooth_noise(rng, 70, 90, 1)[..., 0], "L"))
    pal = Image.fromarray(smooth_noise(rng, 80, 80, 3), "RGB").quantize(colors=37, method=Image.Quantize.MEDIANCUT)
    save("palette.png", pal)
    rgba = np.concatenate([smooth_noise(rng, 50, 100, 3), smooth_noise(rng, 50, 100, 1)], axis=2)
    save("rgba.png", Image.fromarray(rgba, "RGBA"))
    save("tiny.png", Image.fromarray(smooth_noise(rng, 12, 20, 3), "RGB"))
    save("large.png", Image.fromarray(smooth_noise(rng, 300, 400, 3), "RGB"))
    save("photo.jpg", Image.fromarray(smooth_noise(rng, 90, 120, 3), "RGB"), quality=90)
    save("gray.jpg", Image.fromarray(smooth_noise(rng, 75, 100, 1)[..., 0], "L"), quality=85)
    real = os.path.join(SHARED, "medvlm-r1-testset", "images", "brain003631.png")
    if os.path.exists(real):
        shutil.copy(real, os.path.join(d, "mri-brain.png"))
        made["mri-brain.png"] = os.path.join(d, "mri-brain.png")
    else:
        sys.exit(f"missing {real}: the fixtures include one real MRI slice")
    return made


# Small pixel limits keep the fixtures small: at most 12 merged tokens per image.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 28 * 28 * 12


def image_processor(**overrides):
    kw = dict(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    kw.update(overrides)
    try:
        # transformers 5 names the torchvision processor Qwen2VLImageProcessor when torchvision
        # is installed (its resize differs, up to 0.015 in a normalised pixel); the PIL one,
        # the processor these fixtures follow, is Qwen2VLImageProcessorPil.
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        return Qwen2VLImageProcessorPil(**kw)
    except ImportError:
        return Qwen2VLImageProcessor(**kw)


def make_pixel_fixtures(images):
    d = os.path.join(OUT, "pixels")
    os.makedirs(d, exist_ok=True)
    manifest = []
    runs = [(name, {}) for name in sorted(images)]
    # User overrides of the pixel budget: shrink a large image hard, and blow a tiny one up.
    runs.append(("large.png", dict(max_pixels=28 * 28 * 4)))
    runs.append(("tiny.png", dict(min_pixels=28 * 28 * 9)))
    for name, over in runs:
        proc = image_processor(**over)
        im = Image.open(images[name])
        out = proc(images=[im], return_tensors="pt")
        pv = out["pixel_values"].float().contiguous()
        thw = out["image_grid_thw"].long().contiguous()
        tag = name.replace(".", "_") + ("" if not over else "_" + "_".join(f"{k}{v}" for k, v in over.items()))
        fname = tag + ".safetensors"
        save_file({"pixel_values": pv, "image_grid_thw": thw}, os.path.join(d, fname))
        manifest.append(
            dict(
                image=name,
                file=fname,
                mode=im.mode,
                size=[im.height, im.width],
                min_pixels=proc.min_pixels,
                max_pixels=proc.max_pixels,
                grid_thw=thw[0].tolist(),
            )
        )
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

def make_tokenizer(path):
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=480,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 3, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = Qwen2TokenizerFast(
        tokenizer_object=tok,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        add_prefix_space=False,
        model_max_length=32768,
    )
    fast.padding_side = "left"
    return fast


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

MODELS = {
    # f32 weights, tied embeddings, chat template inside tokenizer_config.json.
    "tiny-a": dict(
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            mrope_section=[2, 3, 3],
            tie_word_embeddings=True,
        ),
        vision=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2),
        dtype=torch.float32,
        template_in="tokenizer_config",
        seed=11,
    ),
    # bf16 weights, untied lm_head, more layers, GQA 3:1, another mrope split and theta,
    # chat template in chat_template.json.
    "tiny-b": dict(
        text=dict(
            hidden_size=96,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            mrope_section=[4, 2, 2],
            tie_word_embeddings=False,
        ),
        vision=dict(depth=3, embed_dim=48, num_heads=4, mlp_ratio=3),
        dtype=torch.bfloat16,
        template_in="chat_template_json",
        seed=22,
    ),
}

# Written with transformers 5.x (`--v5`): its own config / weight layouts, and Qwen2.5-VL.
V5_MODELS = {
    # A decoder as wide as a q4_k super-block (256 inputs; every other fixture is narrower,
    # so its layers would take q4_1): the quantized formats' error where q4_k applies.
    # Head width 128 and Qwen2-VL-2B's mrope split, bf16 weights (half the bytes), tied
    # embeddings; the vision tower stays tiny.
    "tiny-k": dict(
        arch="qwen2_vl",
        layout="v5",
        text=dict(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            mrope_section=[16, 24, 24],
            tie_word_embeddings=True,
        ),
        vision=dict(depth=1, embed_dim=32, num_heads=2, mlp_ratio=2),
        dtype=torch.bfloat16,
        template_in="chat_template_json",
        seed=44,
    ),
    # Qwen2-VL as transformers 5 saves it: text settings under text_config, rotary settings in
    # text_config.rope_parameters, `dtype`, `layer_types`; a rope theta far from the 1e6
    # default so a silently defaulted value shows; untied lm_head.
    "tiny-c": dict(
        arch="qwen2_vl",
        layout="v5",
        text=dict(
            hidden_size=64,
            intermediate_size=112,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            rms_norm_eps=1e-6,
            rope_theta=5000.0,
            mrope_section=[2, 2, 4],
            tie_word_embeddings=False,
        ),
        vision=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2),
        dtype=torch.float32,
        template_in="chat_template_json",
        seed=33,
    ),
    # Qwen2.5-VL in the released layout (flat config with rope_scaling and torch_dtype,
    # `model.layers.*` / `visual.*` weight names), tied embeddings. Windows of 56 pixels (2x2
    # merged tokens), so every test image spans several windows; block 1 attends fully.
    "tiny-25a": dict(
        arch="qwen2_5_vl",
        layout="released",
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            mrope_section=[2, 3, 3],
            tie_word_embeddings=True,
        ),
        vision=dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=48, window_size=56,
                    fullatt_block_indexes=[1]),
        dtype=torch.float32,
        template_in="tokenizer_config",
        seed=49,
    ),
    # Qwen2.5-VL as transformers 5 saves it, untied, bf16 weights, two full-attention blocks.
    "tiny-25b": dict(
        arch="qwen2_5_vl",
        layout="v5",
        text=dict(
            hidden_size=96,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            rope_theta=20000.0,
            mrope_section=[4, 2, 2],
            tie_word_embeddings=False,
        ),
        vision=dict(depth=4, hidden_size=48, num_heads=4, intermediate_size=64, window_size=56,
                    fullatt_block_indexes=[0, 3]),
        dtype=torch.bfloat16,
        template_in="chat_template_json",
        seed=57,
    ),
}

VOCAB_SIZE = 512  # padded beyond the tokenizer's 494 ids, as the real checkpoints are


def build_model(name, spec, tok):
    if spec.get("arch") == "qwen2_5_vl":
        return build_model_25(name, spec, tok)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    t = spec["text"]
    cfg = Qwen2VLConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t["num_key_value_heads"],
        rms_norm_eps=t["rms_norm_eps"],
        rope_theta=t["rope_theta"],
        rope_scaling={"type": "mrope", "mrope_section": t["mrope_section"]},
        tie_word_embeddings=t["tie_word_embeddings"],
        max_position_embeddings=4096,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        vision_config=dict(
            hidden_size=t["hidden_size"],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
            **spec["vision"],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    cfg._attn_implementation = "eager"
    seed_all(spec["seed"])
    model = Qwen2VLForConditionalGeneration(cfg)
    return randomize(model, spec, t), cfg, ids


def build_model_25(name, spec, tok):
    """A tiny Qwen2.5-VL (transformers 5.x)."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    t = spec["text"]
    text_config = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t["num_key_value_heads"],
        rms_norm_eps=t["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "mrope_section": t["mrope_section"], "rope_theta": t["rope_theta"]},
        max_position_embeddings=4096,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
    )
    cfg = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=dict(
            out_hidden_size=t["hidden_size"],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
            hidden_act="silu",
            **spec["vision"],
        ),
        tie_word_embeddings=t["tie_word_embeddings"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    cfg._attn_implementation = "eager"
    seed_all(spec["seed"])
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    return randomize(model, spec, t), cfg, ids


def model_class(spec):
    return Qwen2_5_VLForConditionalGeneration if spec.get("arch") == "qwen2_5_vl" else Qwen2VLForConditionalGeneration


def randomize(model, spec, t):
    # HF's init (std 0.02, norms at 1, biases at 0) gives near-uniform logits and would hide
    # bugs in norms and biases. Draw every parameter so each one matters to the output.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or "ln_q" in pname:
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if pname.endswith("weight") else 0.1 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                fan_in = p.shape[1] if p.dim() == 2 else int(np.prod(p.shape[1:]))
                p.copy_(torch.randn_like(p) * (1.6 / math.sqrt(fan_in)))
        if not t["tie_word_embeddings"]:
            model.lm_head.weight.copy_(torch.randn_like(model.lm_head.weight) * 0.25)
    model = model.to(spec["dtype"])
    model.eval()
    return model


def to_released_layout(d):
    """Rewrite a transformers-5 save as the released Qwen2.5-VL checkpoints are laid out: text
    settings at the top level with `rope_scaling` and `rope_theta`, `torch_dtype`, no
    `layer_types`; weights named `model.layers.*`, `model.embed_tokens`, `visual.*`."""
    from safetensors.torch import load_file
    path = os.path.join(d, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters")
    text.pop("layer_types", None)
    text.pop("model_type", None)
    for k, v in text.items():
        cfg.setdefault(k, v)
    cfg["rope_theta"] = rope["rope_theta"]
    cfg["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    cfg["vision_config"].pop("rope_parameters", None)
    cfg["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    st = os.path.join(d, "model.safetensors")
    tensors = load_file(st)
    renamed = {}
    for k, v in tensors.items():
        if k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        elif k.startswith("model.visual."):
            k = "visual." + k[len("model.visual."):]
        renamed[k] = v.contiguous()
    save_file(renamed, st, metadata={"format": "pt"})


def save_checkpoint(name, spec, model, tok, ids):
    d = os.path.join(OUT, name)
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)
    model.save_pretrained(d, safe_serialization=True)
    if spec.get("layout") == "released":
        to_released_layout(d)
    if spec["template_in"] == "tokenizer_config":
        # Where the released Qwen2-VL-2B-Instruct keeps it (transformers 4.57 would write a
        # chat_template.jinja file instead; medvlm reads all three places).
        tok.chat_template = None
        tok.save_pretrained(d)
        tc_path = os.path.join(d, "tokenizer_config.json")
        with open(tc_path) as f:
            tc = json.load(f)
        tc["chat_template"] = QWEN2_VL_CHAT_TEMPLATE
        with open(tc_path, "w") as f:
            json.dump(tc, f, indent=2, ensure_ascii=False)
    else:
        tok.chat_template = None
        tok.save_pretrained(d)
        with open(os.path.join(d, "chat_template.json"), "w") as f:
            json.dump({"chat_template": QWEN2_VL_CHAT_TEMPLATE}, f, indent=2)
    image_processor().save_pretrained(d)
    # Qwen2-VL-2B-Instruct's generation_config.json, with this vocabulary's ids.
    gen = {
        "bos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "repetition_penalty": 1.0,
        "temperature": 0.01,
        "top_k": 1,
        "top_p": 0.001,
        "transformers_version": transformers.__version__,
    }
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    for junk in ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json"):
        p = os.path.join(d, junk)
        if os.path.exists(p):
            os.remove(p)
    return d


CASES = [
    dict(name="text_only", images=[], system=None, text="Describe the scan.", completion=None),
    dict(
        name="one_image",
        images=["square.png"],
        system=None,
        text="Which organ is abnormal in this image? A) liver B) kidney",
        completion="<think>The liver shows a lesion.</think><answer>A</answer>",
    ),
    dict(
        name="two_images",
        images=["wide.png", "gray.png"],
        system=None,
        text="Compare the two scans.",
        interleave=True,
        completion=None,
    ),
    dict(
        name="system_large",
        images=["large.png"],
        system="You answer questions about MRI scans.",
        text="Where is the lesion located?",
        completion="<think>The bright region is on the left side.</think>\n<answer>B</answer><|im_end|>",
    ),
    dict(
        name="real_mri",
        images=["mri-brain.png"],
        system=None,
        text="What modality is used to take this image? A) MRI B) CT C) X-Ray D) Ultrasound",
        completion="<think>It is an MRI.</think><answer>A</answer>",
    ),
]


def messages_for(case):
    msgs = []
    if case["system"] is not None:
        msgs.append({"role": "system", "content": case["system"]})
    content = []
    if case.get("interleave"):
        # image, text, image: text between images exercises "text after an image resumes at max+1"
        content = [
            {"type": "image"},
            {"type": "text", "text": "First scan. Second scan:"},
            {"type": "image"},
            {"type": "text", "text": case["text"]},
        ]
    else:
        content = [{"type": "image"} for _ in case["images"]] + [{"type": "text", "text": case["text"]}]
    msgs.append({"role": "user", "content": content})
    return msgs


def expand_and_tokenize(tok, prompt, grids, merge=2):
    """What Qwen2VLProcessor.__call__ does: one <|image_pad|> per merged patch, then tokenize."""
    text = prompt
    for g in grids:
        n = int(np.prod(g)) // (merge * merge)
        text = text.replace("<|image_pad|>", "<|placeholder|>" * n, 1)
    text = text.replace("<|placeholder|>", "<|image_pad|>")
    return tok(text, add_special_tokens=False)["input_ids"]


V5 = transformers.__version__.startswith("5.")


def mm_types(model, ids):
    """transformers 5 marks image tokens with mm_token_type_ids (1) next to pixel_values."""
    if not V5:
        return {}
    return dict(mm_token_type_ids=(ids == model.config.image_token_id).int())


def rope_index(model, ii, grid):
    if not V5:
        return model.model.get_rope_index(ii, grid, None, torch.ones_like(ii))
    if grid is None:
        # Text only: transformers 5 leaves positions to the model (0..n on every axis).
        n = ii.shape[1]
        return torch.arange(n).view(1, 1, -1).expand(3, 1, n), torch.zeros(1, 1, dtype=torch.long)
    return model.model.get_rope_index(ii, mm_types(model, ii)["mm_token_type_ids"], grid,
                                      attention_mask=torch.ones_like(ii))


def run_cases(name, model, tok, ids, images):
    proc = image_processor()
    records, tensors = [], {}
    eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    for case in CASES:
        msgs = messages_for(case)
        prompt = tok.apply_chat_template(
            msgs, chat_template=QWEN2_VL_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
        )
        ims = [Image.open(images[i]) for i in case["images"]]
        if ims:
            pv = proc(images=ims, return_tensors="pt")
            pixel_values, grid = pv["pixel_values"], pv["image_grid_thw"]
            grids = grid.tolist()
        else:
            pixel_values, grid, grids = None, None, []
        input_ids = expand_and_tokenize(tok, prompt, grids)
        ii = torch.tensor([input_ids])
        with torch.no_grad():
            position_ids, deltas = rope_index(model, ii, grid)
            kw = dict(input_ids=ii, attention_mask=torch.ones_like(ii))
            if pixel_values is not None:
                kw.update(pixel_values=pixel_values, image_grid_thw=grid, **mm_types(model, ii))
            logits = model(**kw).logits[0].float()
            gen = model.generate(
                **kw, max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=ids["<|endoftext|>"],
                temperature=None, top_p=None, top_k=None,
            )
        new = gen[0, len(input_ids):].tolist()
        # Greedy decoding needs a clear winner at every step, or any float difference may flip it.
        with torch.no_grad():
            full = torch.tensor([input_ids + new])
            kw2 = dict(input_ids=full, attention_mask=torch.ones_like(full))
            if pixel_values is not None:
                kw2.update(pixel_values=pixel_values, image_grid_thw=grid, **mm_types(model, full))
            lg = model(**kw2).logits[0].float()
        margins = []
        for k in range(len(new)):
            top2 = torch.topk(lg[len(input_ids) - 1 + k], 2).values
            margins.append(float(top2[0] - top2[1]))
        rec = dict(
            name=case["name"],
            messages=msgs,
            images=case["images"],
            prompt=prompt,
            input_ids=input_ids,
            grid_thw=grids,
            rope_delta=int(deltas[0, 0]),
            greedy_new_tokens=new,
            greedy_text=tok.decode(new, skip_special_tokens=False),
            greedy_min_margin=min(margins) if margins else None,
        )
        tensors[f"{case['name']}.position_ids"] = position_ids[:, 0, :].long().contiguous()
        tensors[f"{case['name']}.logits"] = logits.contiguous()
        if case["completion"] is not None:
            comp_ids = tok(case["completion"], add_special_tokens=False)["input_ids"]
            full = torch.tensor([input_ids + comp_ids])
            kw3 = dict(input_ids=full, attention_mask=torch.ones_like(full))
            if pixel_values is not None:
                kw3.update(pixel_values=pixel_values, image_grid_thw=grid, **mm_types(model, full))
            with torch.no_grad():
                lg = model(**kw3).logits[0].float()
            lp = torch.log_softmax(lg, dim=-1)
            start = len(input_ids)
            token_lp = [float(lp[start - 1 + k, comp_ids[k]]) for k in range(len(comp_ids))]
            rec["completion"] = case["completion"]
            rec["completion_ids"] = comp_ids
            rec["completion_logprobs"] = token_lp
            rec["completion_logprob_sum"] = float(sum(token_lp))
        assert not margins or min(margins) > 1e-3, "greedy step too close to a tie: pick another seed"
        # The Rust tests compare all 24 greedy tokens (no early stop).
        assert len(new) == 24, f"greedy continuation stops after {len(new)} tokens: pick another seed"
        records.append(rec)
        print(
            f"  {name}/{case['name']}: {len(input_ids)} prompt tokens, greedy {len(new)} tokens, "
            f"min top-2 margin {rec['greedy_min_margin']}"
        )
    return records, tensors


def bf16_reference(name, spec, tok, ids, images):
    """tiny-b computed in bfloat16 by transformers: the loose check for `--dtype bf16`."""
    d = os.path.join(OUT, name)
    model = model_class(spec).from_pretrained(d, dtype=torch.bfloat16, attn_implementation="eager")
    model.eval()
    case = CASES[1]
    msgs = messages_for(case)
    prompt = tok.apply_chat_template(
        msgs, chat_template=QWEN2_VL_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    pv = image_processor()(images=[Image.open(images[i]) for i in case["images"]], return_tensors="pt")
    input_ids = expand_and_tokenize(tok, prompt, pv["image_grid_thw"].tolist())
    ii = torch.tensor([input_ids])
    with torch.no_grad():
        logits = model(input_ids=ii, attention_mask=torch.ones_like(ii), pixel_values=pv["pixel_values"],
                       image_grid_thw=pv["image_grid_thw"], **mm_types(model, ii)).logits[0, -1].float()
    return {f"{case['name']}.logits_last_bf16": logits.contiguous()}


def main():
    v5 = "--v5" in sys.argv[1:]
    if v5 and not transformers.__version__.startswith("5."):
        sys.exit("--v5 needs transformers 5.x (tools/requirements-v5.txt)")
    os.makedirs(OUT, exist_ok=True)
    if v5:
        # The images already exist (written by the 4.57 run); only the models are new.
        images = {n: os.path.join(OUT, "images", n) for n in os.listdir(os.path.join(OUT, "images"))}
        tok = make_tokenizer(os.path.join("/tmp", "medvlm-fixture-tokenizer"))
    else:
        images = make_images()
        make_pixel_fixtures(images)
        tok = make_tokenizer(os.path.join(OUT, "tokenizer"))
    only = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--only=")]
    for name, spec in (V5_MODELS if v5 else MODELS).items():
        if only and name not in only[0].split(","):
            continue
        model, cfg, ids = build_model(name, spec, tok)
        save_checkpoint(name, spec, model, tok, ids)
        # Reload from disk so the references come from exactly what the Rust side reads.
        model = model_class(spec).from_pretrained(
            os.path.join(OUT, name), dtype=torch.float32, attn_implementation="eager"
        )
        model.eval()
        records, tensors = run_cases(name, model, tok, ids, images)
        if spec["dtype"] == torch.bfloat16:
            tensors.update(bf16_reference(name, spec, tok, ids, images))
        save_file(tensors, os.path.join(OUT, f"cases-{name}.safetensors"))
        meta = dict(
            model=name,
            generated_by="tools/make_fixtures.py",
            versions=dict(torch=torch.__version__, transformers=transformers.__version__, pillow=PIL.__version__),
            special_token_ids=ids,
            num_parameters=model.num_parameters(),
            cases=records,
        )
        with open(os.path.join(OUT, f"cases-{name}.json"), "w") as f:
            json.dump(meta, f, indent=1)
    print("fixtures written to", OUT)


if __name__ == "__main__":
    main()
