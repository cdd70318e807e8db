#!/usr/bin/env python3
"""Check that a checkpoint directory written by medvlm (train ... final/, checkpoint-N/, merge)
loads in transformers 5 and gives the log-probs medvlm gives.

    /work/venv/bin/python tools/check_checkpoint.py DIR [DIR ...] [--medvlm target/release/medvlm]

For each DIR: transformers' Auto class for its model_type (Qwen2-VL, Qwen2.5-VL or Qwen3-VL) loads it
with no missing or unexpected weights; one prompt with a fixture image (several windows for
Qwen2.5-VL) and a completion is scored by transformers (f32, eager) and by `medvlm score
--json`; the per-token log-probs must agree within 1e-4. Exits non-zero otherwise.
"""

import json
import os
import subprocess
import sys

import torch
import transformers
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, Qwen2VLImageProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "tests", "fixtures", "images", "wide.png")
PROMPT = "Which side of the scan is brighter? A) left B) right"
COMPLETION = "<think>The left half is brighter.</think><answer>A</answer>"


def model_class(d):
    with open(os.path.join(d, "config.json")) as f:
        mt = json.load(f)["model_type"]
    if mt == "qwen2_5_vl":
        return transformers.Qwen2_5_VLForConditionalGeneration
    if mt == "qwen2_vl":
        return transformers.Qwen2VLForConditionalGeneration
    if mt == "qwen3_vl":
        return transformers.Qwen3VLForConditionalGeneration
    sys.exit(f"{d}: model_type {mt!r} is not Qwen2-VL, Qwen2.5-VL or Qwen3-VL")


def check(d, medvlm):
    cls = model_class(d)
    model, info = cls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager",
                                      output_loading_info=True)
    model.eval()
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not bad, f"{d}: {bad}"
    out = subprocess.run([medvlm, "score", "--model", d, "--image", IMAGE, "--prompt", PROMPT,
                          "--completion", COMPLETION, "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    ours = json.loads(out.stdout)
    prompt_ids = ours["prompt_token_ids"]
    comp_ids = ours["completion_token_ids"]
    # Independent of medvlm's processor: pixel values from transformers' own image processor
    # with the checkpoint's preprocessor_config.json.
    ip = Qwen2VLImageProcessor.from_pretrained(d)
    pv = ip(images=[Image.open(IMAGE)], return_tensors="pt")
    full = torch.tensor([prompt_ids + comp_ids])
    image_id = model.config.image_token_id
    n_img = int((full == image_id).sum())
    grid = pv["image_grid_thw"]
    assert n_img == int(grid.prod()) // 4, (n_img, grid)
    # (With torchvision installed transformers 5 gives the torchvision backend here, which is
    # what a Qwen3-VL checkpoint's "Fast" processor type asks medvlm for.)
    kw = dict(input_ids=full, attention_mask=torch.ones_like(full), pixel_values=pv["pixel_values"],
              image_grid_thw=grid, mm_token_type_ids=(full == image_id).int())
    with torch.no_grad():
        logits = model(**kw).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    start = len(prompt_ids)
    theirs = [float(lp[start - 1 + k, t]) for k, t in enumerate(comp_ids)]
    worst = max(abs(a["logprob"] - b) for a, b in zip(ours["tokens"], theirs))
    print(f"{d}: {cls.__name__}, grid {grid.tolist()}, {len(comp_ids)} tokens, max |logprob diff| {worst:.2e}")
    assert worst < 1e-4, worst


def main():
    args = sys.argv[1:]
    medvlm = os.path.join(ROOT, "target", "release", "medvlm")
    if "--medvlm" in args:
        i = args.index("--medvlm")
        medvlm = args[i + 1]
        del args[i:i + 2]
    if not args:
        sys.exit(__doc__)
    for d in args:
        check(d, medvlm)
    print("all checkpoints OK")


if __name__ == "__main__":
    main()
