#!/usr/bin/env python3
"""Reference fixtures for medvlm's Qwen3-VL (dense) support, from transformers 5.24 on the CPU.

Everything here comes from the reference stack (PyTorch, transformers 5.24 with its default
torchvision image backend, tokenizers); nothing is computed by medvlm. CI never runs this
script: it commits its small outputs under tests/fixtures/.

    python3 -m venv /tmp/ref5 && /tmp/ref5/bin/pip install -r tools/requirements-v5.txt torchvision
    /tmp/ref5/bin/python tools/make_qwen3_fixtures.py

Inputs: the test images written by tools/make_fixtures.py (tests/fixtures/images/), its tokenizer
recipe, and src/model/presets/qwen3-vl-chat-template.jinja: the Qwen3-VL Instruct chat template, copied
verbatim from TRL 1.16.0 (trl/chat_templates/qwen3_vl.jinja, "Original Qwen3-VL chat template",
5292 bytes, sha256 3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4, the same
bytes as the tokenizer.chat_template of Qwen/Qwen3-VL-8B-Instruct-GGUF).

What it writes:
  tiny-3a/          a tiny random Qwen3-VL as the released checkpoints are laid out: config.json
                    with text_config.rope_scaling {mrope_interleaved, mrope_section} and rope_theta,
                    vision_config.model_type "qwen3_vl", top-level tie_word_embeddings true (so no
                    lm_head.weight), f32 weights named model.visual.* / model.language_model.*,
                    chat_template.json, preprocessor_config.json naming Qwen2VLImageProcessorFast;
                    DeepStack from vision blocks 0, 1 and 3 of 4 (added after decoder layers 0, 1, 2
                    of 4)
  tiny-3b/          the same family as transformers 5.24 saves it (rope_parameters, dtype), untied,
                    bf16 weights, an explicit head_dim (num_heads x head_dim != hidden_size), GQA 4:1,
                    DeepStack from blocks [2, 0] in that order (block 0's output goes through merger 1
                    and is added after decoder layer 0), chat_template.jinja
  cases-tiny-3a.json / .safetensors (same for tiny-3b)
                    per prompt: chat-templated text, input ids, M-RoPE positions and rope delta,
                    pixel_values (in cases-tiny-3a only: both checkpoints have the same processor
                    files) and image_grid_thw as transformers' processor made them, logits,
                    a 24-token greedy continuation with its smallest top-2 margin, teacher-forced
                    log-probs of a completion; and one_image.logits_last_bf16, the one_image
                    case's last-position logits with the model loaded and run in bfloat16
  pixels-qwen3/     the torchvision backend on every test image: resized.safetensors, the uint8 RGB
                    image after transformers' resize call (bicubic, antialias) at six sizes each;
                    pixels.safetensors, the image processor's pixel_values and image_grid_thw at a
                    budget of 2..4 merged tokens
"""

import json
import math
import os
import shutil
import sys

import numpy as np
import PIL
import torch
import torchvision
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import SPECIAL_TOKENS, make_tokenizer, seed_all  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures")
TEMPLATE = open(os.path.join(ROOT, "src", "model", "presets", "qwen3-vl-chat-template.jinja")).read()

VOCAB_SIZE = 512

# The checkpoint whose cases file holds the pixel values of every model's cases.
PIXELS_IN = "tiny-3a"

# Small pixel budgets keep the fixtures small: 4..12 merged tokens (32x32 pixels each) per image,
# grids of 4..10 patches a side, so the 8x8 and 10x10 learned position tables are both
# stretched and shrunk.
MIN_PIXELS = 32 * 32 * 4
MAX_PIXELS = 32 * 32 * 12

MODELS = {
    "tiny-3a": dict(
        layout="released",
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            # More layers than DeepStack levels: a level added after the last layer could not
            # reach any completion token (only the image positions' own logits), and its merger
            # would get no gradient in training.
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rms_norm_eps=1e-6,
            rope_theta=5000000.0,
            mrope_section=[4, 2, 2],
        ),
        vision=dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=48,
                    num_position_embeddings=64, deepstack_visual_indexes=[0, 1, 3]),
        tie=True,
        dtype=torch.float32,
        seed=301,
    ),
    "tiny-3b": dict(
        layout="v5",
        text=dict(
            hidden_size=96,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=32,
            rms_norm_eps=1e-5,
            rope_theta=20000.0,
            mrope_section=[6, 5, 5],
        ),
        vision=dict(depth=4, hidden_size=48, num_heads=4, intermediate_size=64,
                    num_position_embeddings=100, deepstack_visual_indexes=[2, 0]),
        tie=False,
        dtype=torch.bfloat16,
        seed=302,
    ),
}


def build_model(spec, ids):
    t = spec["text"]
    text_config = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t["num_key_value_heads"],
        head_dim=t["head_dim"],
        rms_norm_eps=t["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "mrope_section": t["mrope_section"],
                         "mrope_interleaved": True, "rope_theta": t["rope_theta"]},
        max_position_embeddings=4096,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        hidden_act="silu",
    )
    cfg = Qwen3VLConfig(
        text_config=text_config,
        vision_config=dict(
            out_hidden_size=t["hidden_size"],
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
            hidden_act="gelu_pytorch_tanh",
            **spec["vision"],
        ),
        tie_word_embeddings=spec["tie"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    cfg._attn_implementation = "eager"
    seed_all(spec["seed"])
    model = Qwen3VLForConditionalGeneration(cfg)
    # As tools/make_fixtures.py: draw every parameter so each one matters to the output.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if pname.endswith("weight") else 0.1 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                fan_in = p.shape[1] if p.dim() == 2 else int(np.prod(p.shape[1:]))
                p.copy_(torch.randn_like(p) * (1.6 / math.sqrt(fan_in)))
        if not spec["tie"]:
            model.lm_head.weight.copy_(torch.randn_like(model.lm_head.weight) * 0.25)
    return model.to(spec["dtype"]).eval()


def released_config(d, spec):
    """Rewrite a 5.24 config.json as the released Qwen3-VL config.json is written (transformers
    4.57 saves): rope_scaling + rope_theta in text_config, vision model_type "qwen3_vl", the tie flag
    at both levels, torch_dtype."""
    path = os.path.join(d, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    text = cfg["text_config"]
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope.pop("rope_theta")
    text["rope_scaling"] = rope
    text["tie_word_embeddings"] = spec["tie"]
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
        text["dtype"] = cfg["torch_dtype"]
    v = cfg["vision_config"]
    v["model_type"] = "qwen3_vl"
    v.pop("rope_parameters", None)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def preprocessor_config(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    # Qwen3-VL's released preprocessor_config.json (see notes/28-research.md §4.2), with small
    # pixel bounds.
    return {
        "size": {"longest_edge": max_pixels, "shortest_edge": min_pixels},
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "Qwen3VLProcessor",
        "image_processor_type": "Qwen2VLImageProcessorFast",
    }


def save_checkpoint(name, spec, model, tok, ids):
    d = os.path.join(OUT, name)
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)
    model.save_pretrained(d, safe_serialization=True)
    if spec["layout"] == "released":
        released_config(d, spec)
    tok.chat_template = None
    tok.save_pretrained(d)
    for junk in ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json",
                 "chat_template.jinja", "chat_template.json"):
        p = os.path.join(d, junk)
        if os.path.exists(p):
            os.remove(p)
    if spec["layout"] == "released":
        with open(os.path.join(d, "chat_template.json"), "w") as f:
            json.dump({"chat_template": TEMPLATE}, f, indent=2)
    else:
        with open(os.path.join(d, "chat_template.jinja"), "w") as f:
            f.write(TEMPLATE)
    with open(os.path.join(d, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor_config(), f, indent=4)
    gen = {
        "bos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "do_sample": False,
        "transformers_version": transformers.__version__,
    }
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
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
        completion="<think>The left one is brighter.</think><answer>A</answer>",
    ),
    dict(
        name="system_large",
        images=["large.png"],
        system="You answer questions about MRI scans.",
        text="Where is the lesion located?",
        completion="<think>The bright region is on the left side.</think>\n<answer>B</answer><|im_end|>",
    ),
    dict(
        name="tall_mri",
        images=["tall.png", "mri-brain.png"],
        system=None,
        text="What modality is used to take this image? A) MRI B) CT C) X-Ray D) Ultrasound",
        completion="<think>It is an MRI.</think><answer>A</answer>",
    ),
]


def messages_for(case):
    msgs = []
    if case["system"] is not None:
        msgs.append({"role": "system", "content": case["system"]})
    if case.get("interleave"):
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


def model_inputs(proc, prompt, ims):
    """What Qwen3VLProcessor gives the model: ids with expanded image tokens, mm_token_type_ids,
    pixel_values, image_grid_thw."""
    out = proc(text=[prompt], images=ims or None, return_tensors="pt")
    kw = dict(input_ids=out["input_ids"], attention_mask=out["attention_mask"])
    if ims:
        kw.update(pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"],
                  mm_token_type_ids=out["mm_token_type_ids"])
    return kw


def with_tokens(kw, extra):
    """The same inputs with `extra` text tokens appended (type 0)."""
    kw = dict(kw)
    add = torch.tensor([extra], dtype=kw["input_ids"].dtype)
    kw["input_ids"] = torch.cat([kw["input_ids"], add], 1)
    kw["attention_mask"] = torch.ones_like(kw["input_ids"])
    if "mm_token_type_ids" in kw:
        kw["mm_token_type_ids"] = torch.cat(
            [kw["mm_token_type_ids"], torch.zeros_like(add, dtype=kw["mm_token_type_ids"].dtype)], 1)
    return kw


def run_cases(name, model, proc, ids, images):
    records, tensors = [], {}
    eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    for case in CASES:
        msgs = messages_for(case)
        prompt = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ims = [Image.open(images[i]) for i in case["images"]]
        kw = model_inputs(proc, prompt, ims)
        ii = kw["input_ids"]
        input_ids = ii[0].tolist()
        with torch.no_grad():
            if ims:
                position_ids, deltas = model.model.get_rope_index(
                    ii, kw["mm_token_type_ids"], kw["image_grid_thw"], attention_mask=kw["attention_mask"])
            else:
                # Text only: transformers 5 leaves positions to the model (0..n on every axis).
                n = ii.shape[1]
                position_ids = torch.arange(n).view(1, 1, -1).expand(3, 1, n)
                deltas = torch.zeros(1, 1, dtype=torch.long)
            logits = model(**kw).logits[0].float()
            gen = model.generate(
                **kw, max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=ids["<|endoftext|>"],
                temperature=None, top_p=None, top_k=None, return_dict_in_generate=True, output_logits=True,
            )
        new = gen.sequences[0, len(input_ids):].tolist()
        # Greedy decoding needs a clear winner at every step, or any float difference may flip it.
        # (The step logits generate() saw: a random model may emit <|image_pad|>, which generate()
        # embeds as text but a fresh forward pass would take for an image slot.)
        margins = []
        for step in gen.logits:
            top2 = torch.topk(step[0].float(), 2).values
            margins.append(float(top2[0] - top2[1]))
        rec = dict(
            name=case["name"],
            messages=msgs,
            images=case["images"],
            prompt=prompt,
            input_ids=input_ids,
            grid_thw=kw["image_grid_thw"].tolist() if ims else [],
            rope_delta=int(deltas.reshape(-1)[0]),
            greedy_new_tokens=new,
            greedy_text=proc.tokenizer.decode(new, skip_special_tokens=False),
            greedy_min_margin=min(margins),
        )
        c = case["name"]
        tensors[f"{c}.position_ids"] = position_ids[:, 0, :].long().contiguous()
        tensors[f"{c}.logits"] = logits.contiguous()
        if ims:
            tensors[f"{c}.pixel_values"] = kw["pixel_values"].float().contiguous()
            tensors[f"{c}.image_grid_thw"] = kw["image_grid_thw"].long().contiguous()
        if case["completion"] is not None:
            comp_ids = proc.tokenizer(case["completion"], add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                lg = model(**with_tokens(kw, comp_ids)).logits[0].float()
            lp = torch.log_softmax(lg, dim=-1)
            start = len(input_ids)
            token_lp = [float(lp[start - 1 + k, comp_ids[k]]) for k in range(len(comp_ids))]
            rec["completion"] = case["completion"]
            rec["completion_ids"] = comp_ids
            rec["completion_logprobs"] = token_lp
        records.append(rec)
        print(f"  {name}/{c}: {len(input_ids)} prompt tokens, greedy {len(new)} tokens, "
              f"min top-2 margin {rec['greedy_min_margin']:.4f}")
    return records, tensors


def bf16_reference(d, images):
    """The one_image case's last-position logits with the checkpoint computed in bfloat16 by
    transformers (weights and activations bf16, eager attention): what medvlm's `--dtype bf16`
    is held to, as tools/make_fixtures.py's bf16_reference for tiny-b."""
    model = Qwen3VLForConditionalGeneration.from_pretrained(d, dtype=torch.bfloat16,
                                                            attn_implementation="eager").eval()
    proc = AutoProcessor.from_pretrained(d)
    case = next(c for c in CASES if c["name"] == "one_image")
    prompt = proc.apply_chat_template(messages_for(case), tokenize=False, add_generation_prompt=True)
    kw = model_inputs(proc, prompt, [Image.open(images[i]) for i in case["images"]])
    kw["pixel_values"] = kw["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        logits = model(**kw).logits[0, -1].float()
    return {f"{case['name']}.logits_last_bf16": logits.contiguous()}


def good_enough(records):
    return all(len(r["greedy_new_tokens"]) == 24 and r["greedy_min_margin"] > 0.01 for r in records)


# Target sizes (height, width) for the resize fixtures; None keeps that side, so one pass of the
# separable filter is skipped.
RESIZES = [(32, 32), (64, 96), (96, 48), (None, 64), (80, None), (100, 140)]


def make_pixel_fixtures(images):
    """What the torchvision backend (transformers 5.24's default where torchvision is installed)
    does to each test image: the image converted to RGB as transformers converts a PIL image, then
    `tvF.resize(..., BICUBIC, antialias=True)` on the uint8 tensor (the call
    `TorchvisionBackend.resize` makes) to several sizes, shrinking and enlarging, stored as uint8;
    and the processor's pixel_values at a small pixel budget."""
    from torchvision.transforms.v2 import functional as tvF
    from transformers.image_transforms import convert_to_rgb

    d = os.path.join(OUT, "pixels-qwen3")
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)
    tmp = os.path.join("/tmp", "medvlm-qwen3-pp")
    os.makedirs(tmp, exist_ok=True)
    lo, hi = 32 * 32 * 2, 32 * 32 * 4
    with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor_config(lo, hi), f)
    ip = AutoImageProcessor.from_pretrained(tmp)
    resized, pixels, runs = {}, {}, []
    for name in sorted(images):
        im = Image.open(images[name])
        rgb = torch.from_numpy(convert_to_rgb(im, return_numpy=True)).permute(2, 0, 1).contiguous()
        sizes = []
        for h, w in RESIZES:
            h, w = h or rgb.shape[1], w or rgb.shape[2]
            out = tvF.resize(rgb[None], [h, w], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
            resized[f"{name}@{h}x{w}"] = out[0].contiguous()
            sizes.append([h, w])
        out = ip(images=[im], return_tensors="pt")
        pixels[f"{name}.pixel_values"] = out["pixel_values"].float().contiguous()
        pixels[f"{name}.image_grid_thw"] = out["image_grid_thw"].long().contiguous()
        runs.append(dict(image=name, size=[im.height, im.width], resized=sizes,
                         grid_thw=out["image_grid_thw"][0].tolist()))
    save_file(resized, os.path.join(d, "resized.safetensors"))
    save_file(pixels, os.path.join(d, "pixels.safetensors"))
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump(dict(generated_by="tools/make_qwen3_fixtures.py",
                       versions=dict(torch=torch.__version__, torchvision=torchvision.__version__,
                                     transformers=transformers.__version__),
                       cpu_capability=torch.backends.cpu.get_cpu_capability(),
                       image_processor=type(ip).__name__,
                       min_pixels=lo, max_pixels=hi, runs=runs), f, indent=1)


def main():
    if transformers.__version__ != "5.24.0":
        sys.exit(f"needs transformers 5.24.0 (tools/requirements-v5.txt), found {transformers.__version__}")
    images = {n: os.path.join(OUT, "images", n) for n in os.listdir(os.path.join(OUT, "images"))}
    # --only=pixels,tiny-3a,... limits what is written.
    only = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--only=")]
    if not only or "pixels" in only[0].split(","):
        make_pixel_fixtures(images)
    tok = make_tokenizer(os.path.join("/tmp", "medvlm-fixture-tokenizer"))
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    for name, spec in MODELS.items():
        if only and name not in only[0].split(","):
            continue
        base = spec["seed"]
        for attempt in range(20):
            spec = dict(spec, seed=base + 1000 * attempt)
            model = build_model(spec, ids)
            d = save_checkpoint(name, spec, model, tok, ids)
            # Reload from disk, processor and all, so the references come from exactly what the
            # Rust side reads.
            model = Qwen3VLForConditionalGeneration.from_pretrained(d, dtype=torch.float32,
                                                                    attn_implementation="eager").eval()
            proc = AutoProcessor.from_pretrained(d)
            assert isinstance(proc, Qwen3VLProcessor), type(proc)
            records, tensors = run_cases(name, model, proc, ids, images)
            if good_enough(records):
                break
            print(f"  {name}: seed {spec['seed']} gives a short or near-tied greedy continuation; next seed")
        else:
            sys.exit(f"{name}: no seed gave clear greedy margins")
        tensors.update(bf16_reference(d, images))
        if name != PIXELS_IN:
            # The processor files are the same for both checkpoints: the pixels are stored once,
            # in cases-tiny-3a, after checking they are the same here.
            ref = load_file(os.path.join(OUT, f"cases-{PIXELS_IN}.safetensors"))
            for k in [k for k in tensors if k.endswith(".pixel_values")]:
                assert torch.equal(tensors.pop(k), ref[k]), k
        save_file(tensors, os.path.join(OUT, f"cases-{name}.safetensors"))
        meta = dict(
            model=name,
            generated_by="tools/make_qwen3_fixtures.py",
            versions=dict(torch=torch.__version__, torchvision=torchvision.__version__,
                          transformers=transformers.__version__, pillow=PIL.__version__),
            image_processor=type(proc.image_processor).__name__,
            pixel_values_in=f"cases-{PIXELS_IN}.safetensors",
            seed=spec["seed"],
            special_token_ids=ids,
            num_parameters=model.num_parameters(),
            cases=records,
        )
        with open(os.path.join(OUT, f"cases-{name}.json"), "w") as f:
            json.dump(meta, f, indent=1)
    print("fixtures written to", OUT)


if __name__ == "__main__":
    main()
