#!/usr/bin/env python3
"""The `medvlm bench generate` workload, run with transformers (PyTorch, CPU, fp32), so the
README can compare the two side by side on the same machine and thread count.

    python tools/bench_transformers.py --threads 2 [--new-tokens 64] [--group 8] \
        [--preset qwen2-vl-bench|qwen2-vl-2b|qwen3-vl-2b | --config FILE] [--dtype f32|bf16]

Same random model (src/model/presets/qwen2-vl-bench.json by default; --preset qwen2-vl-2b /
qwen3-vl-2b read the 2B configs in src/model/presets, --config any config.json), same prompt
shape (20 text tokens, one 448x448 image = 256 tokens with Qwen2-VL's 14-pixel patches, 196
with Qwen3-VL's 16-pixel ones, 80 text tokens), same decoding work (every sequence runs to
--new-tokens; no stop tokens). Qwen2-VL works with transformers 4.5x and 5.x; Qwen3-VL needs
4.57 or later.
"""

import argparse
import json
import os
import resource
import time

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = os.path.join("src", "model", "presets")
TEXT_BEFORE, TEXT_AFTER = 20, 80


def text_ids(n, salt):
    return [1000 + (i * 7919 + salt * 104729) % 140000 for i in range(n)]


def load_config(args):
    if args.config:
        path = os.path.join(args.config, "config.json") if os.path.isdir(args.config) else args.config
        return json.load(open(path)), path
    if args.preset == "qwen2-vl-2b":
        return json.load(open(os.path.join(ROOT, PRESETS, "qwen2-vl-2b.json"))), "Qwen2-VL-2B-Instruct"
    if args.preset == "qwen3-vl-2b":
        return json.load(open(os.path.join(ROOT, PRESETS, "qwen3-vl-2b.json"))), "Qwen3-VL-2B-Instruct"
    return json.load(open(os.path.join(ROOT, PRESETS, "qwen2-vl-bench.json"))), "src/model/presets/qwen2-vl-bench.json"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen2-vl-bench", choices=["qwen2-vl-bench", "qwen2-vl-2b", "qwen3-vl-2b"])
    ap.add_argument("--config")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"],
                    help="bf16: weights and activations in bfloat16 (torch's CPU bf16 path)")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    raw, shape = load_config(args)
    qwen3 = raw.get("model_type") == "qwen3_vl"
    if qwen3:
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
        cfg = Qwen3VLConfig(**raw)
        cfg._attn_implementation = "sdpa"
        model = Qwen3VLForConditionalGeneration(cfg).eval().to(dtype)
    else:
        cfg = Qwen2VLConfig(**raw)
        cfg._attn_implementation = "sdpa"
        model = Qwen2VLForConditionalGeneration(cfg).eval().to(dtype)
    params = model.num_parameters()
    vision = raw["vision_config"]
    patch, merge = vision.get("patch_size", 14), vision.get("spatial_merge_size", 2)

    x, y = np.meshgrid(np.arange(448), np.arange(448))
    img = np.stack([(x * 7 + y * 3) % 256, (np.sin(x / 9.0) * 120 + 128 + y % 17) % 256, (x ^ y) % 256], -1)
    image = Image.fromarray(img.astype(np.uint8), "RGB")
    t = time.perf_counter()
    # The image processor with the model's patch and merge sizes (Qwen3-VL: 16 and 2).
    proc = Qwen2VLImageProcessor(patch_size=patch, merge_size=merge)
    pv = proc(images=[image], return_tensors="pt")
    preprocess_ms = (time.perf_counter() - t) * 1e3
    grid = pv["image_grid_thw"]
    n_img = int(grid.prod()) // (merge * merge)
    ids = text_ids(TEXT_BEFORE, 1) + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img
    ids += [cfg.vision_end_token_id] + text_ids(TEXT_AFTER, 2)
    input_ids = torch.tensor([ids])
    kw = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
              pixel_values=pv["pixel_values"].to(dtype), image_grid_thw=grid)
    if int(__import__("transformers").__version__.split(".")[0]) >= 5:
        # transformers 5 finds the image tokens through mm_token_type_ids.
        kw["mm_token_type_ids"] = (input_ids == cfg.image_token_id).int()
    visual = model.model.visual if hasattr(model.model, "visual") else model.visual
    n = args.new_tokens

    def gen(max_new, **extra):
        return model.generate(**kw, max_new_tokens=max_new, min_new_tokens=max_new,
                              eos_token_id=None, pad_token_id=0, **extra)

    with torch.no_grad():
        gen(1, do_sample=False)  # warm-up
        t = time.perf_counter()
        visual(kw["pixel_values"], grid_thw=grid)
        vision = time.perf_counter() - t
        t = time.perf_counter()
        gen(1, do_sample=False)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        gen(n, do_sample=False)
        total = time.perf_counter() - t
        t = time.perf_counter()
        out = gen(n, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=args.group)
        group_total = time.perf_counter() - t
    assert out.shape[0] == args.group and out.shape[1] == len(ids) + n
    report = dict(
        shape=shape,
        parameters=params,
        threads=torch.get_num_threads(),
        dtype=args.dtype,
        prompt_tokens=len(ids),
        image_tokens=n_img,
        new_tokens=n,
        preprocess_ms=preprocess_ms,
        vision_ms=vision * 1e3,
        prefill_ms=prefill * 1e3,
        decode_tok_s_batch1=(n - 1) / (total - prefill),
        group_size=args.group,
        group_total_s=group_total,
        # transformers expands the prompt G times before prefill, so its G prefills are
        # part of the group run; subtract one prefill like the Rust side does.
        group_decode_tok_s=args.group * (n - 1) / (group_total - prefill),
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        versions=dict(torch=torch.__version__, transformers=__import__("transformers").__version__),
    )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
