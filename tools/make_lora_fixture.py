#!/usr/bin/env python3
"""Build the LoRA adapter reference that medvlm's Rust LoRA tests compare against.

A PEFT LoRA adapter on tiny-a (language-model projections and vision-tower attn.qkv / mlp.fc1),
with seeded random lora_A / lora_B so the adapter visibly changes the output, saved exactly as
PEFT's `save_pretrained` writes it, plus what the adapted model computes for three one-image
prompts.

    /work/venv/bin/pip install peft                      # torch, transformers already there
    /work/venv/bin/python tools/make_lora_fixture.py     # needs tests/fixtures/tiny-a
    /work/venv/bin/python tools/make_lora_fixture.py --check-adapter DIR --out FILE.json
                       # load an adapter written by another program (e.g. medvlm) onto tiny-a with
                       # PeftModel.from_pretrained and write the per-token log-probs of the same
                       # prompts + completions; exits non-zero on missing / unexpected adapter keys
    /work/venv/bin/python tools/make_lora_fixture.py --check-merged DIR
                       # DIR from `medvlm merge --model tests/fixtures/tiny-a --adapter
                       # tests/fixtures/lora-a --out DIR`: transformers loads it and gives the
                       # adapter's logits (max |diff| < 5e-5)
    /work/venv/bin/python tools/make_lora_fixture.py --base tiny-3a --check-adapter DIR --out FILE.json
    /work/venv/bin/python tools/make_lora_fixture.py --base tiny-3a --check-merged DIR --adapter ADAPTER
                       # the same on a Qwen3-VL fixture (tiny-3a, or tiny-3b: bf16 weights) with
                       # Qwen3VLForConditionalGeneration and the checkpoint's Qwen3VLProcessor
                       # (chat template, torchvision image backend, pixel bounds), the prompts built
                       # as tools/make_qwen3_fixtures.py builds its cases; --check-merged then
                       # compares with PEFT's merge_and_unload() of ADAPTER computed here, rounded
                       # to the base's dtype, weights and logits (the merge keeps the base's dtype)

What it writes (default mode):
  tests/fixtures/lora-a/        adapter_config.json + adapter_model.safetensors (PEFT's own
                                save_pretrained; the auto-generated README.md model card is removed)
  tests/fixtures/lora-a-cases.json
                                versions, LoRA config, the adapter's key list with shapes, and per
                                prompt: prompt text, image, input ids, image_grid_thw, completion
                                text / ids, per-token completion log-probs with the adapter and with
                                the adapter disabled, and the prompt-logit differences
  tests/fixtures/lora-a-cases.safetensors
                                logits.{i}: (prompt_len, vocab) f32 logits of the adapted model at
                                every prompt position of prompt i

LoRA (PEFT, plain LoRA: no rsLoRA / DoRA, dropout 0, bias "none"), for every targeted nn.Linear:
  scaling = lora_alpha / r = 8 / 4 = 2
  y = x W^T + b + scaling * (x A^T) B^T      A = lora_A.weight (r, in), B = lora_B.weight (out, r)
  merged: W' = W + scaling * B @ A, bias unchanged
  Targets (module-name suffixes): q_proj k_proj v_proj o_proj gate_proj up_proj down_proj (text
  layers) and qkv fc1 (vision blocks' attn.qkv, the fused (3*embed, embed) projection, and mlp.fc1).
  lora_A / lora_B are overwritten after get_peft_model: torch.manual_seed(7), then for every LoRA
  parameter in model.named_parameters() order, p = 0.05 * randn_like(p).

Qwen3-VL bases (--base tiny-3a / tiny-3b, --check-adapter and --check-merged only): the same three
prompts and completions, rendered by the checkpoint's own processor (no default system prompt in the
Qwen3-VL template; pixels at the checkpoint's 4..12 merged-token budget); mm_token_type_ids is
checked equal to (input_ids == image_token_id). The committed adapters lora-medvlm-3a / -3b were
trained by medvlm (the commands are above the test medvlm_qwen3_adapters_are_ones_peft_reads in
tests/suite/lora.rs), and lora-medvlm-3a-peft.json / -3b-peft.json are this script's
--check-adapter output for them.

Log-probs: batch 1, prompt + completion, no padding, eager attention, f32; logits at position j
predict token j+1; log_softmax in f32, gathered at the completion tokens. Prompts: chat template
from tiny-a's tokenizer_config.json (default system prompt), one image, Qwen2VLImageProcessor
(min_pixels=56*56, max_pixels=28*28*12), one <|image_pad|> per merged patch, tokenized without
special tokens (tools/make_fixtures.py). transformers 5.x needs mm_token_type_ids (1 at
<|image_pad|>) whenever pixel_values are given; it does not change the result (tiny-a's
cases-tiny-a.json logits are reproduced bit for bit and this script checks one of them).

Checks (asserted): adapter disabled == tiny-a without PEFT (bit-identical); merge_and_unload()
logits == adapter logits within 5e-5 (observed ~1.8e-5; both f32 paths are ~2e-5 from an f64
evaluation of the same adapter, which the script also runs and records, so 1e-5 is below the f32
noise floor here); merged log-probs within 1e-5; the adapter changes the logits by much more;
reloading lora-a with PeftModel.from_pretrained reproduces the log-probs exactly.
Deterministic: one CPU thread, deterministic algorithms, fixed seeds, and PYTHONHASHSEED=0 (the
script re-executes itself with it: PEFT writes target_modules, a set, in hash order) ->
byte-identical outputs. target_modules order in adapter_config.json carries no meaning.
"""

import argparse
import json
import os
import shutil
import sys
import warnings

import numpy as np
import peft
import PIL
import safetensors
import torch
import transformers
from PIL import Image
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils.save_and_load import load_peft_weights
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration, Qwen3VLForConditionalGeneration

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import expand_and_tokenize, image_processor  # noqa: E402  (same prompt pipeline)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX_REL = os.path.join("tests", "fixtures")
BASE_REL = os.path.join(FIX_REL, "tiny-a")  # relative, so adapter_config.json holds no local path
# The bases --check-adapter / --check-merged take (--base): the Qwen2-VL fixture this script's own
# adapter is made for, and the two Qwen3-VL fixtures of tools/make_qwen3_fixtures.py.
BASES = {"tiny-a": "qwen2", "tiny-3a": "qwen3", "tiny-3b": "qwen3"}
ADAPTER_REL = os.path.join(FIX_REL, "lora-a")
OUT_JSON_REL = os.path.join(FIX_REL, "lora-a-cases.json")
OUT_ST_REL = os.path.join(FIX_REL, "lora-a-cases.safetensors")

LORA = dict(
    r=4,
    lora_alpha=8,
    lora_dropout=0.0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv", "fc1"],
    bias="none",
    task_type="CAUSAL_LM",
)
LORA_SEED = 7
LORA_STD = 0.05
# merge_and_unload() vs the unmerged adapter, max |logit diff|. Not 1e-5: both f32 paths are
# ~2e-5 away from the same model evaluated in f64 (logits up to ~8), so they differ by ~2e-5 too.
MERGE_TOL = 5e-5

PROMPTS = [
    dict(image="square.png", text="Which side is brighter?\nA) left\nB) right",
         completion="<think>The left half is bright.</think><answer>A</answer><|im_end|>"),
    dict(image="wide.png", text="What modality is this?\nA) MRI\nB) CT\nC) X-Ray",
         completion="<think>x</think><answer>B</answer><|im_end|>"),
    dict(image="gray.png", text="Is there a lesion?\nA) yes\nB) no",
         completion="<answer>A</answer><|im_end|>"),
]


def versions():
    return dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                safetensors=safetensors.__version__, pillow=PIL.__version__, numpy=np.__version__)


def model_class(base):
    return Qwen3VLForConditionalGeneration if BASES[base] == "qwen3" else Qwen2VLForConditionalGeneration


def load_base(base="tiny-a"):
    m = model_class(base).from_pretrained(os.path.join(FIX_REL, base), dtype=torch.float32,
                                          attn_implementation="eager")
    m.eval()
    return m


def build_prompts(tok, image_token_id, base="tiny-a"):
    if BASES[base] == "qwen3":
        return build_prompts_qwen3(tok, image_token_id, base)
    with open(os.path.join(BASE_REL, "tokenizer_config.json")) as f:
        template = json.load(f)["chat_template"]
    proc = image_processor()
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert image_pad == image_token_id
    out = []
    for i, p in enumerate(PROMPTS):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p["text"]}]}]
        prompt = tok.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=True)
        pv = proc(images=[Image.open(os.path.join(FIX_REL, "images", p["image"]))], return_tensors="pt")
        input_ids = expand_and_tokenize(tok, prompt, pv["image_grid_thw"].tolist())
        comp_ids = tok(p["completion"], add_special_tokens=False)["input_ids"]
        assert image_pad not in comp_ids
        out.append(dict(index=i, image=p["image"], text=p["text"], prompt=prompt, input_ids=input_ids,
                        image_grid_thw=pv["image_grid_thw"].tolist(), completion=p["completion"],
                        completion_ids=comp_ids, pixel_values=pv["pixel_values"], grid=pv["image_grid_thw"]))
    return out


def build_prompts_qwen3(tok, image_token_id, base):
    """The same prompts for a Qwen3-VL base, as tools/make_qwen3_fixtures.py builds its cases: the
    checkpoint's Qwen3VLProcessor (its chat template, no default system prompt; the torchvision
    image backend at the checkpoint's pixel bounds) renders, expands and tokenizes them."""
    proc = AutoProcessor.from_pretrained(os.path.join(FIX_REL, base))
    assert type(proc).__name__ == "Qwen3VLProcessor", type(proc)
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert image_pad == image_token_id
    out = []
    for i, p in enumerate(PROMPTS):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p["text"]}]}]
        prompt = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        enc = proc(text=[prompt], images=[Image.open(os.path.join(FIX_REL, "images", p["image"]))],
                   return_tensors="pt")
        input_ids = enc["input_ids"][0].tolist()
        # forward_logits rebuilds mm_token_type_ids from the ids: the processor's must be that.
        assert torch.equal(enc["mm_token_type_ids"], (enc["input_ids"] == image_token_id).to(enc["mm_token_type_ids"].dtype))
        comp_ids = tok(p["completion"], add_special_tokens=False)["input_ids"]
        assert image_pad not in comp_ids
        out.append(dict(index=i, image=p["image"], text=p["text"], prompt=prompt, input_ids=input_ids,
                        image_grid_thw=enc["image_grid_thw"].tolist(), completion=p["completion"],
                        completion_ids=comp_ids, pixel_values=enc["pixel_values"], grid=enc["image_grid_thw"]))
    return out


def forward_logits(model, ids, p, image_token_id, dtype=torch.float32):
    ii = torch.tensor([ids])
    with torch.no_grad():
        out = model(input_ids=ii, attention_mask=torch.ones_like(ii), pixel_values=p["pixel_values"].to(dtype),
                    image_grid_thw=p["grid"], mm_token_type_ids=(ii == image_token_id).int(), use_cache=False)
    return out.logits[0].to(dtype)


def prompt_logits(model, p, image_token_id, dtype=torch.float32):
    return forward_logits(model, p["input_ids"], p, image_token_id, dtype)


def completion_logps(model, p, image_token_id):
    """Teacher forcing on prompt + completion: position j predicts token j+1."""
    lg = forward_logits(model, p["input_ids"] + p["completion_ids"], p, image_token_id)
    n = len(p["completion_ids"])
    lp = torch.log_softmax(lg[:-1][-n:], dim=-1)
    return lp.gather(-1, torch.tensor(p["completion_ids"]).unsqueeze(-1)).squeeze(-1)


def adapter_file_keys(d):
    with safe_open(os.path.join(d, "adapter_model.safetensors"), "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in sorted(f.keys())}, f.metadata()


def prompt_record(p):
    return {k: p[k] for k in ("index", "image", "text", "prompt", "input_ids", "image_grid_thw",
                              "completion", "completion_ids")}


def setup(base="tiny-a"):
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # fixed reduction order: byte-identical output on every run
    os.chdir(ROOT)
    tok = AutoTokenizer.from_pretrained(os.path.join(FIX_REL, base))
    return tok


def sanity_check_base(base, tok, image_token_id):
    """transformers 5.x + mm_token_type_ids reproduces cases-tiny-a (written by transformers 4.57)."""
    cases = json.load(open(os.path.join(FIX_REL, "cases-tiny-a.json")))["cases"]
    case = next(c for c in cases if c["name"] == "one_image")
    pv = image_processor()(images=[Image.open(os.path.join(FIX_REL, "images", i)) for i in case["images"]],
                           return_tensors="pt")
    p = dict(pixel_values=pv["pixel_values"], grid=pv["image_grid_thw"])
    got = forward_logits(base, case["input_ids"], p, image_token_id)
    want = load_file(os.path.join(FIX_REL, "cases-tiny-a.safetensors"))["one_image.logits"]
    d = (got - want).abs().max().item()
    print(f"  base model vs cases-tiny-a.json one_image logits: max |diff| {d:.3e}")
    assert d < 1e-5, d


def make():
    tok = setup()
    base = load_base()
    image_token_id = base.config.image_token_id
    prompts = build_prompts(tok, image_token_id)
    sanity_check_base(base, tok, image_token_id)

    # Pure tiny-a (no PEFT wrapping) references.
    base_lp = [completion_logps(base, p, image_token_id) for p in prompts]
    base_logits = [prompt_logits(base, p, image_token_id) for p in prompts]

    model = get_peft_model(base, LoraConfig(**LORA))
    model.eval()
    torch.manual_seed(LORA_SEED)
    lora_params = []
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                prm.copy_(LORA_STD * torch.randn_like(prm))
                lora_params.append(name)
    print(f"  {len(lora_params)} LoRA parameters randomised, e.g. {lora_params[0]}")

    if os.path.exists(ADAPTER_REL):
        shutil.rmtree(ADAPTER_REL)
    model.save_pretrained(ADAPTER_REL, safe_serialization=True)
    readme = os.path.join(ADAPTER_REL, "README.md")
    if os.path.exists(readme):
        os.remove(readme)  # generated model card, not part of the adapter format
    assert sorted(os.listdir(ADAPTER_REL)) == ["adapter_config.json", "adapter_model.safetensors"], \
        os.listdir(ADAPTER_REL)
    with open(os.path.join(ADAPTER_REL, "adapter_config.json")) as f:
        adapter_config = json.load(f)
    keys, st_meta = adapter_file_keys(ADAPTER_REL)
    print("  adapter_config.json:", json.dumps(adapter_config, indent=1, sort_keys=True))
    print(f"  adapter_model.safetensors: {len(keys)} tensors, metadata {st_meta}")
    for k, s in keys.items():
        print(f"    {k} {s}")
    assert len(keys) == len(lora_params)

    records, tensors = [], {}
    max_logit_change = 0.0
    adapter_logits, adapter_lp = [], []
    for p in prompts:
        lg = prompt_logits(model, p, image_token_id)
        lp = completion_logps(model, p, image_token_id)
        with model.disable_adapter():
            lp_off = completion_logps(model, p, image_token_id)
            lg_off = prompt_logits(model, p, image_token_id)
        # switching the adapter off gives exactly the base model
        assert torch.equal(lp_off, base_lp[p["index"]]) and torch.equal(lg_off, base_logits[p["index"]])
        change = (lg - lg_off).abs().max().item()
        max_logit_change = max(max_logit_change, change)
        adapter_logits.append(lg)
        adapter_lp.append(lp)
        tensors[f"logits.{p['index']}"] = lg.contiguous()
        rec = prompt_record(p)
        rec.update(
            prompt_len=len(p["input_ids"]),
            logprobs_adapter=lp.tolist(),
            logprobs_adapter_disabled=lp_off.tolist(),
            logprob_sum_adapter=float(lp.double().sum()),
            logprob_sum_adapter_disabled=float(lp_off.double().sum()),
            max_abs_prompt_logit_change=change,
            max_abs_prompt_logit=lg.abs().max().item(),
            max_abs_logprob_change=(lp - lp_off).abs().max().item(),
        )
        records.append(rec)
        print(f"  prompt {p['index']} ({p['image']}): {len(p['input_ids'])} prompt tokens, "
              f"{len(p['completion_ids'])} completion tokens, logp sum adapter {rec['logprob_sum_adapter']:+.5f} "
              f"/ disabled {rec['logprob_sum_adapter_disabled']:+.5f}, max |dlogit| {change:.4f}")
    assert max_logit_change > 1000 * MERGE_TOL, max_logit_change

    # Reload check: PeftModel.from_pretrained on the saved directory gives the same numbers.
    reloaded, report = load_adapter_checked(ADAPTER_REL)
    for p in prompts:
        assert torch.equal(completion_logps(reloaded, p, image_token_id), adapter_lp[p["index"]])
        assert torch.equal(prompt_logits(reloaded, p, image_token_id), adapter_logits[p["index"]])
    del reloaded

    # f64 evaluation of the same adapter: the yardstick for the f32 merge tolerance.
    base64 = load_base().double()
    model64 = PeftModel.from_pretrained(base64, ADAPTER_REL).double().eval()
    f64_logits = [prompt_logits(model64, p, image_token_id, torch.float64) for p in prompts]
    del model64, base64
    adapter_vs_f64 = max((a.double() - b).abs().max().item() for a, b in zip(adapter_logits, f64_logits))

    # Merge check (the merged model is not saved).
    merged = model.merge_and_unload()
    merged.eval()
    merge_diff, merge_lp_diff, merged_vs_f64 = 0.0, 0.0, 0.0
    for p in prompts:
        lg = prompt_logits(merged, p, image_token_id)
        merge_diff = max(merge_diff, (lg - adapter_logits[p["index"]]).abs().max().item())
        merged_vs_f64 = max(merged_vs_f64, (lg.double() - f64_logits[p["index"]]).abs().max().item())
        merge_lp_diff = max(merge_lp_diff, (completion_logps(merged, p, image_token_id) - adapter_lp[p["index"]])
                            .abs().max().item())
    print(f"  merge_and_unload: max |logit diff| {merge_diff:.3e}, max |logp diff| {merge_lp_diff:.3e}")
    print(f"  f32 vs f64 evaluation: max |logit diff| adapter {adapter_vs_f64:.3e}, merged {merged_vs_f64:.3e}")
    print(f"  adapter vs base: max |prompt logit change| {max_logit_change:.4f}")
    assert merge_diff < MERGE_TOL and merge_lp_diff < 1e-5, (merge_diff, merge_lp_diff)

    notes = (
        "Generated by tools/make_lora_fixture.py. lora-a/ is PEFT's save_pretrained output for a LoRA on tiny-a "
        "(README.md model card removed). Keys in adapter_model.safetensors have no adapter name; PEFT inserts "
        "'.default' (lora_A.weight -> lora_A.default.weight) on load. scaling = lora_alpha / r; "
        "y = x W^T + b + scaling * (x A^T) B^T; merged W' = W + scaling * B @ A. lora_A / lora_B drawn as "
        f"{LORA_STD} * randn (torch.manual_seed({LORA_SEED}), model.named_parameters() order) after get_peft_model. "
        "logprobs_*: per-token log-probs of completion_ids given prompt (input_ids) + earlier completion tokens, "
        "batch 1, no padding, eager attention, f32, log_softmax in f32. logprobs_adapter_disabled: under "
        "model.disable_adapter(), asserted bit-identical to tiny-a loaded without PEFT. lora-a-cases.safetensors "
        "logits.{i}: adapted-model logits at every prompt position of prompts[i] (prompt-only forward pass). "
        "merge_check: merge_and_unload() vs adapter, over all prompt logits / completion log-probs; both f32 paths "
        "are also compared with the adapter model evaluated in f64 (same inputs): each is ~2e-5 off, so f32 "
        "implementations of the adapter should expect logit agreement at ~1e-5..5e-5, not 1e-6. "
        "Forward passes get mm_token_type_ids = (input_ids == image_token_id) (required by transformers 5.x "
        "with pixel_values; output unchanged vs transformers 4.57)."
    )
    out = dict(
        notes=notes,
        generated_by="tools/make_lora_fixture.py",
        versions=versions(),
        base_model="tiny-a",
        adapter_dir="lora-a",
        lora_config=dict(LORA, scaling=LORA["lora_alpha"] / LORA["r"]),
        lora_init=dict(seed=LORA_SEED, std=LORA_STD, order="model.named_parameters()"),
        adapter_config=adapter_config,
        adapter_safetensors_metadata=st_meta,
        adapter_keys=keys,
        peft_model_parameter_names=lora_params,
        image_token_id=image_token_id,
        special_token_ids={t: tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>", "<|image_pad|>")},
        max_abs_prompt_logit_change=max_logit_change,
        merge_check=dict(max_abs_logit_diff=merge_diff, max_abs_logprob_diff=merge_lp_diff, tolerance=MERGE_TOL,
                         adapter_f32_vs_f64_max_abs_logit_diff=adapter_vs_f64,
                         merged_f32_vs_f64_max_abs_logit_diff=merged_vs_f64),
        reload_check=report,
        prompts=records,
    )
    with open(OUT_JSON_REL, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    save_file(tensors, OUT_ST_REL)
    print("wrote", ADAPTER_REL, OUT_JSON_REL, OUT_ST_REL)


def load_adapter_checked(adapter_dir, base="tiny-a"):
    """PeftModel.from_pretrained(base, adapter_dir) plus a strict key check.

    from_pretrained loads with strict=False: it warns about missing adapter keys but silently drops
    unexpected ones. So the same weights are loaded a second time into the same adapter with
    set_peft_model_state_dict (PEFT's own key conversion, idempotent) and its load result is
    inspected: any missing LoRA key or any unexpected key is an error.
    """
    base_model = load_base(base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base_model, adapter_dir)
    model.eval()
    msgs = [f"{w.category.__name__}: {w.message}" for w in caught]
    for m in msgs:
        print("  warning:", m)
    sd = load_peft_weights(adapter_dir, device="cpu")
    res = set_peft_model_state_dict(model, sd, adapter_name="default")
    missing = sorted(k for k in res.missing_keys if "lora_" in k)
    unexpected = sorted(res.unexpected_keys)
    file_keys, _ = adapter_file_keys(adapter_dir)
    canonical = sorted(get_peft_model_state_dict(model).keys())  # the names PEFT itself would save
    report = dict(
        missing_keys=missing,
        unexpected_keys=unexpected,
        warnings=msgs,
        num_file_keys=len(file_keys),
        num_model_lora_params=sum(1 for n, _ in model.named_parameters() if "lora_" in n),
        file_keys_equal_peft_save_names=sorted(file_keys) == canonical,
    )
    for k in missing:
        print("  MISSING adapter key:", k)
    for k in unexpected:
        print("  UNEXPECTED adapter key:", k)
    if not report["file_keys_equal_peft_save_names"]:
        print("  note: file keys differ from the names PEFT itself saves:")
        print("    only in file:", sorted(set(file_keys) - set(canonical)))
        print("    only in PEFT's names:", sorted(set(canonical) - set(file_keys)))
    bad = missing or unexpected or any("missing adapter keys" in m for m in msgs)
    if bad:
        sys.exit(f"adapter {adapter_dir}: PEFT reports missing / unexpected keys")
    return model, report


def check_adapter(adapter_dir, out_path, base):
    adapter_dir, out_path = os.path.abspath(adapter_dir), os.path.abspath(out_path)
    tok = setup(base)
    image_token_id = load_base(base).config.image_token_id
    model, report = load_adapter_checked(adapter_dir, base)
    prompts = build_prompts(tok, image_token_id, base)
    records = []
    for p in prompts:
        lp = completion_logps(model, p, image_token_id)
        with model.disable_adapter():
            lp_off = completion_logps(model, p, image_token_id)
        rec = prompt_record(p)
        rec.update(
            prompt_len=len(p["input_ids"]),
            logprobs_adapter=lp.tolist(),
            logprobs_adapter_disabled=lp_off.tolist(),
            logprob_sum_adapter=float(lp.double().sum()),
            logprob_sum_adapter_disabled=float(lp_off.double().sum()),
            max_abs_logprob_change=(lp - lp_off).abs().max().item(),
        )
        records.append(rec)
        print(f"  prompt {p['index']} ({p['image']}): logp sum adapter {rec['logprob_sum_adapter']:+.5f} "
              f"/ disabled {rec['logprob_sum_adapter_disabled']:+.5f}")
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        adapter_config = json.load(f)
    keys, st_meta = adapter_file_keys(adapter_dir)
    out = dict(
        generated_by=f"tools/make_lora_fixture.py --check-adapter --base {base}",
        versions=versions(),
        base_model=base,
        # Relative to the repository when inside it: the file then names no local path.
        adapter_dir=os.path.relpath(adapter_dir, ROOT) if adapter_dir.startswith(ROOT + os.sep) else adapter_dir,
        adapter_config=adapter_config,
        adapter_safetensors_metadata=st_meta,
        adapter_keys=keys,
        load_report=report,
        prompts=records,
    )
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print("wrote", out_path)


def checkpoint_dtype(d):
    """The one dtype of a checkpoint's floating-point tensors (medvlm merge keeps the base's)."""
    dtypes = set()
    for name in sorted(os.listdir(d)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(d, name), "pt") as f:
                dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
    assert len(dtypes) == 1, dtypes
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[dtypes.pop()]


def check_merged(merged_dir, base, adapter_dir=None):
    """transformers loads a checkpoint written by `medvlm merge --model BASE --adapter ADAPTER`
    with no missing or unexpected weights, and its prompt logits are the PEFT adapter's: for
    tiny-a without --adapter, lora-a's (tests/fixtures/lora-a-cases.safetensors); otherwise
    PEFT's own merge_and_unload() of ADAPTER on BASE (loaded in f32), computed here. The merge
    is stored in the base's dtype: for a bf16 base (tiny-3b) PEFT's f32 merged weights are
    rounded to bf16 once before the comparison (and compared with the checkpoint's weights
    too), the rounding's own effect on the logits being reported apart."""
    tok = setup(base)
    cls = model_class(base)
    merged, info = cls.from_pretrained(os.path.abspath(merged_dir), dtype=torch.float32,
                                       attn_implementation="eager", output_loading_info=True)
    merged.eval()
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not bad, f"{merged_dir}: {bad}"
    image_token_id = merged.config.image_token_id
    prompts = build_prompts(tok, image_token_id, base)
    got = [prompt_logits(merged, p, image_token_id) for p in prompts]
    if adapter_dir is None:
        if base != "tiny-a":
            sys.exit("--check-merged on a base other than tiny-a needs --adapter (the adapter that was merged)")
        want = load_file(os.path.join(FIX_REL, "lora-a-cases.safetensors"))
        want = [want[f"logits.{p['index']}"] for p in prompts]
        worst = max((g - w).abs().max().item() for g, w in zip(got, want))
        for p, g, w in zip(prompts, got, want):
            print(f"  prompt {p['index']}: merged checkpoint in transformers vs PEFT adapter: "
                  f"max |logit diff| {(g - w).abs().max().item():.2e}")
        assert worst < MERGE_TOL, worst
        print(f"merged checkpoint OK (max {worst:.2e})")
        return
    dtype = checkpoint_dtype(os.path.join(FIX_REL, base))
    assert checkpoint_dtype(os.path.abspath(merged_dir)) == dtype, "the merge must keep the base's dtype"
    peft_model, _ = load_adapter_checked(os.path.abspath(adapter_dir), base)
    adapter = [prompt_logits(peft_model, p, image_token_id) for p in prompts]
    with peft_model.disable_adapter():
        base_logits = [prompt_logits(peft_model, p, image_token_id) for p in prompts]
    ref = peft_model.merge_and_unload().eval()
    with torch.no_grad():
        for prm in ref.parameters():
            prm.copy_(prm.to(dtype).float())  # the identity for f32, and on the base's bf16 weights
    want = [prompt_logits(ref, p, image_token_id) for p in prompts]
    ref_sd, got_sd = ref.state_dict(), merged.state_dict()
    assert set(ref_sd) == set(got_sd), set(ref_sd) ^ set(got_sd)
    differ = sum(int((ref_sd[k] != got_sd[k]).sum()) for k in ref_sd)
    total = sum(t.numel() for t in ref_sd.values())
    worst_w = max((ref_sd[k] - got_sd[k]).abs().max().item() for k in ref_sd)
    print(f"  weights ({dtype}): {differ} of {total} differ from PEFT's merge (max |diff| {worst_w:.2e})")
    worst = 0.0
    for p, g, w, a, b in zip(prompts, got, want, adapter, base_logits):
        d = (g - w).abs().max().item()
        worst = max(worst, d)
        change = (g - b).abs().max().item()
        print(f"  prompt {p['index']}: merged checkpoint in transformers vs PEFT's merge: max |logit diff| {d:.2e}; "
              f"vs PEFT's unmerged adapter {(g - a).abs().max().item():.2e}; vs the base {change:.2e}")
        assert change > 1000 * MERGE_TOL, change  # the merge changed something
    assert worst < MERGE_TOL, worst
    print(f"merged checkpoint OK (max {worst:.2e})")


def main():
    if os.environ.get("PYTHONHASHSEED") != "0":
        # PEFT keeps target_modules as a set and writes it to adapter_config.json in set order,
        # which follows Python's per-process string-hash seed: pin it for byte-identical output.
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, PYTHONHASHSEED="0"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check-adapter", metavar="DIR", help="PEFT adapter directory to load onto --base")
    ap.add_argument("--out", metavar="FILE.json", help="where --check-adapter writes its log-probs")
    ap.add_argument("--check-merged", metavar="DIR",
                    help="a checkpoint from `medvlm merge --model BASE --adapter ADAPTER`: transformers must give "
                         "the adapter's logits")
    ap.add_argument("--adapter", metavar="DIR",
                    help="with --check-merged: the adapter that was merged (default, tiny-a only: lora-a and its "
                         "stored logits)")
    ap.add_argument("--base", choices=sorted(BASES), default="tiny-a",
                    help="the fixture checkpoint --check-adapter / --check-merged work on (default tiny-a)")
    a = ap.parse_args()
    if a.check_merged:
        check_merged(a.check_merged, a.base, a.adapter)
    elif a.check_adapter:
        if not a.out:
            ap.error("--check-adapter needs --out")
        check_adapter(a.check_adapter, a.out, a.base)
    else:
        if a.out or a.adapter or a.base != "tiny-a":
            ap.error("--out, --adapter and --base only go with --check-adapter / --check-merged")
        make()


if __name__ == "__main__":
    main()
