#!/usr/bin/env python3
"""Reference fixtures for videos: the slices of a volume sent as the frames of one video.

Run with the transformers 4.57 stack (tools/requirements.txt plus torchvision 0.23, which
transformers' video processor needs):

    /tmp/ref/bin/pip install torchvision==0.23.0
    /tmp/ref/bin/python tools/make_video_fixtures.py     # writes tests/fixtures/video/

Why 4.57: its get_rope_index is the rule the released Qwen2-VL / Qwen2.5-VL models and vLLM
use for videos (text after a video resumes at the largest position plus one, and a list of
frames is taken at 2 frames per second); transformers 5.24 resumes at `max(h, w) / merge`
and takes lists of frames at 24 fps, which changes the positions of every video whose
temporal extent is the larger one (both cases below).

What it writes:
  frame-NN.png                the frames (smooth noise, as make_fixtures.py's test images,
                              at sizes that need no resizing, so pixels can be compared
                              bit for bit: our resize is Pillow's, transformers' video
                              resize is torchvision's)
  video_preprocessor_config.json
                              transformers' Qwen2VLVideoProcessor with per-frame pixel bounds
                              small enough for the tiny models, as save_pretrained writes it
  cases.json, cases.safetensors
                              per model (tiny-a: Qwen2-VL; tiny-25a: Qwen2.5-VL with window
                              attention and tokens_per_second 4) and case: the prompt, input
                              ids, pixel_values_videos / pixel_values, grids, M-RoPE positions
                              and rope delta, logits, and a greedy continuation with its margins
"""

import json
import os
import sys

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIX, "video")

assert transformers.__version__.startswith("4.57"), "run with the transformers 4.57 stack"

# The chat template of the tiny checkpoints (Qwen2-VL's, as make_fixtures.py writes it).
sys.path.insert(0, os.path.join(ROOT, "tools"))
from make_fixtures import QWEN2_VL_CHAT_TEMPLATE, smooth_noise  # noqa: E402

# Frame sets: (name, count, height, width). 5 frames pad to 6 (the last one repeated), so
# grid_t = 3; 4 frames give grid_t = 2.
FRAMES = [("a", 5, 56, 84), ("b", 4, 84, 56)]

CASES = [
    # A video, then the question.
    dict(name="video", content=[("video", "a"), ("text", "Which slice shows the lesion?")]),
    # Text, a video, text, an image, text: both kinds in one prompt, in reading order.
    dict(
        name="video_then_image",
        content=[
            ("text", "The series:"),
            ("video", "b"),
            ("text", "and the key image:"),
            ("image", "square.png"),
            ("text", "Is it the same plane?"),
        ],
    ),
]

MODELS = [("tiny-a", Qwen2VLForConditionalGeneration, Qwen2VLProcessor),
          ("tiny-25a", Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor)]


def make_frames():
    rng = np.random.default_rng(20261206)
    out = {}
    for name, n, h, w in FRAMES:
        files = []
        base = smooth_noise(rng, h, w, 1)
        for k in range(n):
            # One anatomy drifting through the stack, as neighbouring slices do.
            shift = smooth_noise(rng, h, w, 1) * 0.35
            gray = np.clip(base * 0.65 + shift + k * 8, 0, 255).astype(np.uint8)[..., 0]
            rgb = np.stack([gray, gray, gray], axis=-1)
            f = f"frame-{name}{k:02d}.png"
            Image.fromarray(rgb).save(os.path.join(OUT, f))
            files.append(f)
        out[name] = files
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    frames = make_frames()
    video_proc = Qwen2VLVideoProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16})
    video_proc.save_pretrained(OUT)
    records, tensors = [], {}
    for model_name, cls, proc_cls in MODELS:
        ckpt = os.path.join(FIX, model_name)
        model = cls.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(ckpt)
        proc = proc_cls(
            image_processor=Qwen2VLImageProcessor.from_pretrained(ckpt),
            tokenizer=tok,
            video_processor=video_proc,
            chat_template=QWEN2_VL_CHAT_TEMPLATE,
        )
        eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
        for case in CASES:
            content, images, videos = [], [], []
            for kind, value in case["content"]:
                if kind == "text":
                    content.append({"type": "text", "text": value})
                elif kind == "video":
                    content.append({"type": "video"})
                    videos.append([np.array(Image.open(os.path.join(OUT, f))) for f in frames[value]])
                else:
                    content.append({"type": "image"})
                    images.append(Image.open(os.path.join(FIX, "images", value)).convert("RGB"))
            msgs = [{"role": "user", "content": content}]
            prompt = tok.apply_chat_template(msgs, chat_template=QWEN2_VL_CHAT_TEMPLATE, tokenize=False,
                                             add_generation_prompt=True)
            kw = dict(text=[prompt], videos=videos, return_tensors="pt")
            if images:
                kw["images"] = images
            batch = proc(**kw)
            ids = batch["input_ids"]
            with torch.no_grad():
                rope_kw = dict(image_grid_thw=batch.get("image_grid_thw"), video_grid_thw=batch["video_grid_thw"],
                               attention_mask=batch["attention_mask"])
                if "second_per_grid_ts" in batch:
                    rope_kw["second_per_grid_ts"] = batch["second_per_grid_ts"]
                position_ids, deltas = model.model.get_rope_index(ids, **rope_kw)
                logits = model(**batch).logits[0].float()
                gen = model.generate(**batch, max_new_tokens=16, do_sample=False, eos_token_id=eos,
                                     pad_token_id=eos[1], temperature=None, top_p=None, top_k=None)
            new = gen[0, ids.shape[1]:].tolist()
            # Every greedy step needs a clear winner, or float differences may flip it.
            full = dict(batch)
            full["input_ids"] = torch.tensor([ids[0].tolist() + new])
            full["attention_mask"] = torch.ones_like(full["input_ids"])
            with torch.no_grad():
                lg = model(**full).logits[0].float()
            margins = [float(torch.topk(lg[ids.shape[1] - 1 + k], 2).values.diff().abs()) for k in range(len(new))]
            assert len(new) == 16 and min(margins) > 1e-3, (len(new), min(margins))
            key = f"{model_name}.{case['name']}"
            rec = dict(
                model=model_name,
                name=case["name"],
                messages=msgs,
                frames={v: frames[v] for k, v in case["content"] if k == "video"},
                images=[v for k, v in case["content"] if k == "image"],
                prompt=prompt,
                input_ids=ids[0].tolist(),
                video_grid_thw=batch["video_grid_thw"].tolist(),
                image_grid_thw=batch["image_grid_thw"].tolist() if "image_grid_thw" in batch else [],
                second_per_grid_ts=[float(x) for x in batch.get("second_per_grid_ts", [])],
                rope_delta=int(deltas[0, 0]),
                greedy_new_tokens=new,
                greedy_min_margin=min(margins),
            )
            tensors[f"{key}.pixel_values_videos"] = batch["pixel_values_videos"].contiguous()
            if "pixel_values" in batch:
                tensors[f"{key}.pixel_values"] = batch["pixel_values"].contiguous()
            tensors[f"{key}.position_ids"] = position_ids[:, 0, :].long().contiguous()
            tensors[f"{key}.logits"] = logits.contiguous()
            records.append(rec)
            print(f"  {key}: {ids.shape[1]} tokens, video grids {rec['video_grid_thw']}, "
                  f"rope delta {rec['rope_delta']}, greedy margin {min(margins):.4f}")
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(dict(transformers=transformers.__version__, torch=torch.__version__, cases=records), f, indent=1)
    save_file(tensors, os.path.join(OUT, "cases.safetensors"))


if __name__ == "__main__":
    main()
