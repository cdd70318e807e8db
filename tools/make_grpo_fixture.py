#!/usr/bin/env python3
"""Build the GRPO loss / gradient reference that medvlm's Rust trainer tests compare against.

An independent PyTorch reference of TRL 1.16's GRPO loss (`GRPOTrainer._compute_loss`,
token-level importance sampling, temperature 1.0, no entropy terms) and of the gradient norm it
produces, for a fixed tiny model, fixed prompts, fixed completions and fixed rewards; and of its
loss options (GSPO's sequence-level importance ratio, the high-entropy token mask
`top_entropy_quantile`, the `entropy` metric, a temperature, micro-batches).

    /work/pyenv/bin/python tools/make_grpo_fixture.py      # needs tests/fixtures/tiny-a
    /work/venv/bin/python tools/make_grpo_fixture.py --ref=tiny-25a --prefix=grpo25
                                  # the same on Qwen2.5-VL (transformers 5.x): grpo25-policy/,
                                  # grpo25-cases.json
    /tmp/ref5/bin/python tools/make_grpo_fixture.py --ref=tiny-3a --prefix=grpo3
                                  # the same on Qwen3-VL (transformers 5.24 with torchvision: the
                                  # checkpoint's own chat template and image processor, DeepStack)
    TRL_SRC=/path/to/trl/src python tools/make_grpo_fixture.py --check-trl   # optional: also run
                                  # TRL's own _compute_loss on the same log-probs and compare
    python tools/make_grpo_fixture.py --options-only [--ref=tiny-25a --prefix=grpo25] [--check-trl]
                                  # only the loss options' cases, keeping grpo-policy/ and
                                  # grpo-cases.json (checked to be reproduced first); the same
                                  # environments as above: tiny-a with transformers 4.57
                                  # (torch 2.8), tiny-25a with transformers 5.24 (torch 2.15)
    python tools/make_grpo_fixture.py --bf16-reference [--ref=tiny-3a --prefix=grpo3]
                                  # only PyTorch's own mixed-precision step on case 0, added as the
                                  # key "bf16_autocast" to the existing {prefix}-cases.json (nothing
                                  # else is regenerated or changed; the f32 log-probs, loss and
                                  # gradient norm are checked to be reproduced first); the
                                  # environment that wrote the file: tiny-a with transformers 4.57
                                  # (torch 2.8), tiny-3a with transformers 5.24 (torch 2.15)

What it writes:
  tests/fixtures/grpo-policy/   tiny-a with every parameter perturbed (p + 0.02 * randn, seed 1234),
                                f32 safetensors + tokenizer / preprocessor / generation config
  tests/fixtures/grpo-cases.json
                                inputs (prompt ids, completion ids, rewards, old-log-prob offsets),
                                per-token log-probs of policy and reference, advantages, and per
                                case: loss, gradient norm, a few per-parameter gradient norms and
                                the number of clipped tokens.
  tests/fixtures/grpo-cases.json "bf16_autocast" (--bf16-reference)
                                PyTorch's mixed-precision step on case 0 (grpo_beta0.04_iter1):
                                policy forward under torch.autocast("cpu", bfloat16) over the f32
                                weights, logits cast to f32 before the log-softmax, the reference
                                model cast to bf16; loss, gradient norm, the gradient's cosine with
                                the f32 gradient, max |bf16 - f32| of policy and reference log-probs.
  tests/fixtures/grpo-options-cases.json
                                the loss options' cases (OPTIONS_CASES): per-token log-probs and
                                entropies at each temperature, and per case loss, gradient norm,
                                per-parameter gradient norms, the entropy metric, clip ratio and
                                the entropy mask's thresholds; torch.quantile checks.

Formulas (TRL 1.16, trainer/grpo_trainer.py):
  per_token_logps = log_softmax(logits[:, :-1] / T) gathered at the completion tokens (f32)
  advantages      = (r - group mean) / (std + 1e-4)   (std with N-1; "batch": over all rewards;
                                                       "none": r - group mean)
  coef_1 = exp(logp - old), old = logp.detach() when num_iterations == 1
  coef_2 = clamp(coef_1, 1 - eps_low, 1 + eps_high)
  ptl    = -min(coef_1 * A, coef_2 * A) + beta * (exp(ref - logp) - (ref - logp) - 1)
  grpo   : mean over sequences of (ptl * m).sum(-1) / m.sum(-1).clamp(min=1)
  bnpo   : (ptl * m).sum() / m.sum().clamp(min=1)
  dr_grpo: (ptl * m).sum() / (B * max_completion_length)
  dapo   : (ptl * m).sum() / m.sum()            (the whole batch is one accumulation window)
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
from safetensors import safe_open
from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import expand_and_tokenize, image_processor  # noqa: E402  (same prompt pipeline)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
# `--ref tiny-25a --prefix grpo25` (transformers 5.x) makes the same fixture for Qwen2.5-VL:
# tests/fixtures/grpo25-policy/ and grpo25-cases.json.
def _arg(flag, default):
    for a in sys.argv[1:]:
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return default


REF_NAME = _arg("--ref", "tiny-a")
PREFIX = _arg("--prefix", "grpo")
REF_DIR = os.path.join(FIX, REF_NAME)
POLICY_DIR = os.path.join(FIX, f"{PREFIX}-policy")
OUT_JSON = os.path.join(FIX, f"{PREFIX}-cases.json")
OPTIONS_JSON = os.path.join(FIX, f"{PREFIX}-options-cases.json")
# `--options-only`: keep {PREFIX}-policy/ and {PREFIX}-cases.json as they are (after checking this
# environment reproduces their log-probs) and write only {PREFIX}-options-cases.json.
OPTIONS_ONLY = "--options-only" in sys.argv[1:]
# `--bf16-reference`: keep everything, add PyTorch's bf16 autocast step on case 0 to
# {PREFIX}-cases.json as the key "bf16_autocast" (see bf16_reference()).
BF16_REFERENCE = "--bf16-reference" in sys.argv[1:]
V5 = transformers.__version__.startswith("5.")

TEMPERATURE = 1.0
G = 3
MAX_COMPLETION_LENGTH = 32

GROUPS = [
    dict(
        image="square.png",
        text="Which side is brighter?\nA) left\nB) right",
        completions=[
            "<think>The left half is bright.</think><answer>A</answer><|im_end|>",
            "<think>right</think><answer>B</answer><|im_end|>",
            "<think>The image shows",
        ],
        rewards=[2.0, 1.0, 0.0],
    ),
    dict(
        image="wide.png",
        text="What modality is this?\nA) MRI\nB) CT\nC) X-Ray",
        completions=[
            "<answer>A</answer><|im_end|>",
            "<think>CT scan of the abdomen with contrast.</think><answer>B</answer><|im_end|>",
            "<think>It is an X-Ray.</think><answer>C</answer><|im_end|>",
        ],
        rewards=[0.5, 2.0, 1.5],
    ),
    dict(
        image="gray.png",
        text="Is there a lesion?\nA) yes\nB) no",
        completions=[
            "<think>no</think><answer>B</answer><|im_end|>",
            "<think>yes</think><answer>A</answer><|im_end|>",
            "<think>x</think><answer>B</answer><|im_end|>",
        ],
        rewards=[1.0, 1.0, 1.0],
    ),
]

BASE = dict(
    loss_type="grpo",
    beta=0.04,
    num_iterations=1,
    epsilon_low=0.2,
    epsilon_high=0.2,
    scale_rewards="group",
    mask_truncated_completions=False,
    max_completion_length=MAX_COMPLETION_LENGTH,
)
CASES = [
    dict(loss_type="grpo", beta=0.04, num_iterations=1),
    dict(loss_type="grpo", beta=0.0, num_iterations=1),
    dict(loss_type="bnpo", beta=0.04, num_iterations=1),
    dict(loss_type="bnpo", beta=0.0, num_iterations=1),
    dict(loss_type="grpo", beta=0.04, num_iterations=2),
    dict(loss_type="grpo", beta=0.0, num_iterations=2),
    dict(loss_type="bnpo", beta=0.04, num_iterations=2),
    dict(loss_type="bnpo", beta=0.0, num_iterations=2),
    dict(loss_type="dr_grpo", beta=0.04, num_iterations=1),
    dict(loss_type="dapo", beta=0.04, num_iterations=2, epsilon_low=0.2, epsilon_high=0.28),
    dict(loss_type="grpo", beta=0.04, num_iterations=1, scale_rewards="batch"),
    dict(loss_type="grpo", beta=0.04, num_iterations=1, scale_rewards="none"),
    dict(loss_type="grpo", beta=0.04, num_iterations=1, mask_truncated_completions=True),
]

with open(os.path.join(REF_DIR, "config.json")) as _f:
    MODEL_TYPE = json.load(_f)["model_type"]
QWEN3 = MODEL_TYPE == "qwen3_vl"

# The loss options of TRL 1.16 beyond the cases above, written to {PREFIX}-options-cases.json:
# GSPO's sequence-level importance ratio, the high-entropy token mask (top_entropy_quantile)
# and the `entropy` metric. micro_batch is TRL's per_device_train_batch_size: the 9 completions
# go through _compute_loss in order, micro_batch at a time (gradient_accumulation_steps =
# steps_per_generation = 9 / micro_batch), and the entropy mask's quantile is taken over each
# micro-batch's tokens.
OPTIONS_BASE = dict(BASE, importance_sampling_level="token", top_entropy_quantile=1.0, micro_batch=9,
                    temperature=TEMPERATURE)
OPTIONS_CASES = [
    dict(importance_sampling_level="sequence", loss_type="grpo", beta=0.04, num_iterations=2),
    dict(importance_sampling_level="sequence", loss_type="grpo", beta=0.0, num_iterations=2,
         epsilon_low=3e-4, epsilon_high=4e-4),  # the GSPO paper's clipping range
    dict(importance_sampling_level="sequence", loss_type="dapo", beta=0.04, num_iterations=2, epsilon_high=0.28),
    dict(importance_sampling_level="sequence", loss_type="dr_grpo", beta=0.04, num_iterations=2),
    dict(importance_sampling_level="sequence", loss_type="grpo", beta=0.04, num_iterations=1),
    dict(importance_sampling_level="sequence", loss_type="grpo", beta=0.04, num_iterations=2,
         mask_truncated_completions=True),
    dict(top_entropy_quantile=0.2, loss_type="grpo", beta=0.04, num_iterations=1),
    dict(top_entropy_quantile=0.5, loss_type="grpo", beta=0.04, num_iterations=2),
    dict(top_entropy_quantile=0.2, loss_type="dapo", beta=0.0, num_iterations=2, micro_batch=3),
    dict(top_entropy_quantile=0.4, importance_sampling_level="sequence", loss_type="grpo", beta=0.04,
         num_iterations=2, mask_truncated_completions=True),
    # beta 0 here: at T = 0.7 this fixture's policy/reference KL terms reach exp(ref - logp) ~ 1e3
    dict(top_entropy_quantile=0.2, loss_type="grpo", beta=0.0, num_iterations=2, temperature=0.7),
    dict(top_entropy_quantile=0.5, importance_sampling_level="sequence", loss_type="bnpo", beta=0.04,
         num_iterations=2, micro_batch=3),
]

OPTIONS_NOTES = (
    "Generated by tools/make_grpo_fixture.py --options-only (PyTorch reference of TRL 1.16 GRPOTrainer._compute_loss "
    "with its loss options; --check-trl ran TRL 1.16.0's own _compute_loss, get_high_entropy_mask and "
    "entropy_from_logits on the same tensors and agreed to <1e-7 in loss, <1e-6 relative in gradient norm). "
    "Same prompts, completions, rewards, policy (grpo-policy) and reference (tiny-a) as grpo-cases.json, whose "
    "log-probs this run reproduced. Advantages: scale_rewards 'group'. "
    "temperatures[T]: per-token policy log-probs, reference log-probs and policy entropies at temperature T "
    "(entropy = -(exp(logp) * logp).sum(-1) of log_softmax(f32 logits / T), TRL's entropy_from_logits; TRL 1.16's "
    "fused LM head (ChunkedLogProbFunction, log Z - sum(e*z)/S) agrees within ~2e-6). "
    "Old log-probs (num_iterations 2): policy log-probs + old_logp_offsets, as in grpo-cases.json. "
    "importance_sampling_level 'sequence': log_w = (log_ratio*mask).sum(-1)/mask.sum(-1).clamp(min=1), one ratio "
    "exp(log_w) per completion, -min(coef_1*A, clamp(coef_1, 1-eps_low, 1+eps_high)*A) broadcast over its tokens, "
    "KL per token, aggregated by loss_type. "
    "top_entropy_quantile rho < 1: mask = entropies >= torch.quantile(entropies of the micro-batch's mask tokens, "
    "1 - rho) (linear), applied to the policy term before the KL is added; denominators unchanged. "
    "micro_batch m: the 9 completions in order, m per _compute_loss call, gradient_accumulation_steps = "
    "steps_per_generation = 9/m (grpo/bnpo/dr_grpo divide each call's loss by 9/m; dapo divides by the 9 "
    "completions' token count, num_items_in_batch); the mask's quantile is per call. "
    "Per case: loss (sum over calls), grad_norm (sqrt of the f64 sum of squared f32 gradients, all parameters), "
    "param_grad_norms, entropy (TRL's metric: per call (entropies*mask).sum()/mask.sum().clamp(min=1), averaged "
    "over the calls), clip_ratio (TRL's clip_ratio/region_mean averaged over the calls; at sequence level every "
    "completion counts once, masked ones too), region_clipped (tokens, or completions at sequence level), "
    "kept_tokens (tokens the entropy mask keeps, all calls), entropy_thresholds (one per call), "
    "entropy_threshold_margin (min |entropy - threshold| over the population's tokens not equal to it: > 1e-4 "
    "asserted, so another implementation's entropies a few 1e-6 off keep the same mask), clip_boundary_margin "
    "(min |coef_1 - bound|; > 1e-5 asserted for 2 iterations). "
    "quantile_checks: torch.quantile(x, q) of random f32 x as this torch computes it (torch 2.8 rounds the rank "
    "q*(n-1) to f32, torch 2.15 keeps it in f64 from q rounded to f32; the results can differ by an ulp). "
    "The T=0.7 case has beta 0: at that temperature this fixture's KL terms reach exp(ref - logp) ~ 1e3."
)

# Parameters whose gradient norms are recorded, by their names in model.safetensors.
GRAD_PARAMS_QWEN3 = [
    "model.language_model.embed_tokens.weight",
    "model.visual.patch_embed.proj.weight",
    "model.visual.patch_embed.proj.bias",
    "model.visual.pos_embed.weight",
    "model.visual.merger.linear_fc2.weight",
    "model.visual.deepstack_merger_list.0.linear_fc1.weight",
    "model.visual.deepstack_merger_list.2.norm.weight",
    "model.visual.blocks.3.mlp.linear_fc2.weight",
    "model.language_model.layers.0.self_attn.q_norm.weight",
    "model.language_model.layers.2.mlp.down_proj.weight",
]
GRAD_PARAMS = [
    "model.embed_tokens.weight",
    "visual.patch_embed.proj.weight",
    "visual.merger.mlp.2.weight",
    "model.layers.1.mlp.down_proj.weight",
]


def checkpoint_name(internal):
    """transformers >= 4.52 module names -> the names save_pretrained writes (released layout;
    Qwen3-VL's released names are the module names)."""
    if QWEN3:
        return internal
    if internal.startswith("model.language_model."):
        return "model." + internal[len("model.language_model."):]
    if internal.startswith("model.visual."):
        return "visual." + internal[len("model.visual."):]
    return internal


def load(d):
    with open(os.path.join(d, "config.json")) as f:
        model_type = json.load(f)["model_type"]
    if model_type == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration as cls
    elif model_type == "qwen3_vl":
        from transformers import Qwen3VLForConditionalGeneration as cls
    else:
        cls = Qwen2VLForConditionalGeneration
    m = cls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    m.eval()
    return m


def mm(model, ids):
    """transformers 5 wants the image tokens marked next to pixel_values."""
    return dict(mm_token_type_ids=(ids == model.config.image_token_id).int()) if V5 else {}


def make_policy():
    model = load(REF_DIR)
    torch.manual_seed(1234)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(p + 0.02 * torch.randn_like(p))
    if os.path.exists(POLICY_DIR):
        shutil.rmtree(POLICY_DIR)
    os.makedirs(POLICY_DIR)
    model.save_pretrained(POLICY_DIR, safe_serialization=True)
    with safe_open(os.path.join(REF_DIR, "model.safetensors"), "pt") as f:
        released = "model.embed_tokens.weight" in set(f.keys())
    if V5 and released:
        # transformers 5 saves its own layout; keep the reference's (released) one.
        from make_fixtures import to_released_layout
        to_released_layout(POLICY_DIR)
    for f in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json",
              "chat_template.json", "chat_template.jinja"):
        if os.path.exists(os.path.join(REF_DIR, f)):
            shutil.copy(os.path.join(REF_DIR, f), os.path.join(POLICY_DIR, f))
    # Saved under the released names, in f32, tied lm_head not stored.
    with safe_open(os.path.join(POLICY_DIR, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float32 for k in keys)
    assert set(grad_params()) <= keys, keys
    assert "lm_head.weight" not in keys


def grad_params():
    return GRAD_PARAMS_QWEN3 if QWEN3 else GRAD_PARAMS


def build_inputs(tok):
    if QWEN3:
        # The checkpoint's own template and image processor (transformers 5.24's torchvision
        # backend, as tools/make_qwen3_fixtures.py records it).
        from transformers import AutoImageProcessor
        with open(os.path.join(REF_DIR, "chat_template.json")) as f:
            template = json.load(f)["chat_template"]
        proc = AutoImageProcessor.from_pretrained(REF_DIR)
    else:
        with open(os.path.join(REF_DIR, "tokenizer_config.json")) as f:
            template = json.load(f)["chat_template"]
        proc = image_processor()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    groups, seqs = [], []
    for g in GROUPS:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": g["text"]}]}]
        prompt = tok.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=True)
        pv = proc(images=[Image.open(os.path.join(FIX, "images", g["image"]))], return_tensors="pt")
        input_ids = expand_and_tokenize(tok, prompt, pv["image_grid_thw"].tolist())
        comps = []
        for text in g["completions"]:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert image_pad not in ids
            truncated = ids[-1] not in (im_end, eot)
            assert truncated == (not text.endswith("<|im_end|>"))
            comps.append(dict(text=text, ids=ids, truncated=truncated))
            seqs.append(dict(prompt_ids=input_ids, ids=ids, truncated=truncated,
                             pixel_values=pv["pixel_values"], grid=pv["image_grid_thw"]))
        groups.append(dict(images=[g["image"]], text=g["text"], prompt=prompt, input_ids=input_ids,
                           image_grid_thw=pv["image_grid_thw"].tolist(), completions=comps,
                           rewards=g["rewards"]))
    return groups, seqs


def seq_logps(model, s, temperature=TEMPERATURE, entropy=False):
    """Per-token log-probs of one completion: batch 1, prompt + completion, no padding; with
    `entropy`, also each position's entropy as TRL's `entropy_from_logits` computes it,
    -(exp(logp) * logp).sum(-1) of the f32 logits / temperature."""
    full = torch.tensor([s["prompt_ids"] + s["ids"]])
    out = model(input_ids=full, attention_mask=torch.ones_like(full), pixel_values=s["pixel_values"],
                image_grid_thw=s["grid"], use_cache=False, **mm(model, full))
    n = len(s["ids"])
    logits = out.logits[0, :-1, :][-n:].float() / temperature  # position j predicts token j+1
    lp = torch.log_softmax(logits, dim=-1)
    picked = lp.gather(-1, torch.tensor(s["ids"]).unsqueeze(-1)).squeeze(-1)
    if entropy:
        with torch.no_grad():
            return picked, -(torch.exp(lp) * lp).sum(-1)
    return picked


def padded(rows, cmax):
    out = torch.zeros(len(rows), cmax, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def batched_logps(model, seqs, pad_id):
    """Second way: one TRL-style batch, prompts left-padded, completions right-padded."""
    pmax = max(len(s["prompt_ids"]) for s in seqs)
    cmax = max(len(s["ids"]) for s in seqs)
    ids, am = [], []
    for s in seqs:
        lp, lc = len(s["prompt_ids"]), len(s["ids"])
        ids.append([pad_id] * (pmax - lp) + s["prompt_ids"] + s["ids"] + [pad_id] * (cmax - lc))
        am.append([0] * (pmax - lp) + [1] * (lp + lc) + [0] * (cmax - lc))
    ids, am = torch.tensor(ids), torch.tensor(am)
    out = model(input_ids=ids, attention_mask=am, pixel_values=torch.cat([s["pixel_values"] for s in seqs]),
                image_grid_thw=torch.cat([s["grid"] for s in seqs]), use_cache=False, **mm(model, ids))
    logits = out.logits[:, :-1, :][:, -cmax:].float() / TEMPERATURE
    comp = ids[:, -cmax:]
    return torch.log_softmax(logits, -1).gather(-1, comp.unsqueeze(-1)).squeeze(-1)


def advantages(rewards, scale):
    r = torch.tensor(rewards, dtype=torch.float32)
    grouped = r.view(-1, G)
    mean = grouped.mean(dim=1).repeat_interleave(G)
    if scale == "group":
        std = grouped.std(dim=1).repeat_interleave(G)
    elif scale == "batch":
        std = r.std().expand_as(r)
    a = r - mean
    if scale != "none":
        a = a / (std + 1e-4)
    return a


def loss_from(case, logp, ref, old_off, mask, adv):
    """logp (B, C) with grad; ref (B, C); old_off (B, C) offsets; mask (B, C) float."""
    if case["num_iterations"] == 1:
        old = logp.detach()
    else:
        old = logp.detach() + old_off
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - case["epsilon_low"], 1 + case["epsilon_high"])
    A = adv.unsqueeze(1)
    ptl = -torch.min(coef_1 * A, coef_2 * A)
    if case["beta"] != 0.0:
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        ptl = ptl + case["beta"] * kl
    lt = case["loss_type"]
    if lt == "grpo":
        loss = ((ptl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif lt == "bnpo":
        loss = (ptl * mask).sum() / mask.sum().clamp(min=1.0)
    elif lt == "dr_grpo":
        loss = (ptl * mask).sum() / (ptl.size(0) * case["max_completion_length"])
    elif lt == "dapo":
        loss = (ptl * mask).sum() / mask.sum()
    else:
        raise ValueError(lt)
    c1 = coef_1.detach()
    lo, hi = 1 - case["epsilon_low"], 1 + case["epsilon_high"]
    on = mask > 0
    outside = ((c1 < lo) | (c1 > hi)) & on
    region = (((c1 < lo) & (A < 0)) | ((c1 > hi) & (A > 0))) & on
    margin = torch.minimum((c1 - lo).abs(), (c1 - hi).abs())[on].min().item()
    return loss, int(outside.sum()), int(region.sum()), margin


def check_against_trl(policy, seqs, cmax, ref, old_off, full_mask, trunc_mask, advs, results, pad_id):
    """Optional (--check-trl): run TRL's own GRPOTrainer._compute_loss on the same tensors.

    TRL is not a dependency of this script; point TRL_SRC at TRL's src/ (and TRL_EXTRA_SITE at
    directories, ':'-separated, holding pandas / datasets / accelerate if the environment lacks them). Only the
    model forward is ours (TRL 1.16 calls a fused lm-head op there); everything downstream of the
    per-token log-probs is TRL's code. Prints and asserts; does not change the JSON.
    """
    import contextlib
    from collections import defaultdict
    from types import SimpleNamespace

    if os.environ.get("TRL_SRC"):
        sys.path.insert(0, os.environ["TRL_SRC"])
    for d in os.environ.get("TRL_EXTRA_SITE", "").split(os.pathsep):
        if d:
            sys.path.append(d)
    from trl.trainer.grpo_trainer import GRPOTrainer

    pmax = max(len(s["prompt_ids"]) for s in seqs)
    prompt_ids = torch.tensor([[pad_id] * (pmax - len(s["prompt_ids"])) + s["prompt_ids"] for s in seqs])
    prompt_mask = torch.tensor([[0] * (pmax - len(s["prompt_ids"])) + [1] * len(s["prompt_ids"]) for s in seqs])
    completion_ids = torch.tensor([s["ids"] + [pad_id] * (cmax - len(s["ids"])) for s in seqs])

    class Acc:
        num_processes = 1
        sync_gradients = True

        def autocast(self):
            return contextlib.nullcontext()

        def gather(self, x):
            return x

        def gather_for_metrics(self, x):
            return x

        def reduce(self, x, reduction="sum"):
            return x

    for rec in results:
        policy.zero_grad(set_to_none=True)
        iters = rec["num_iterations"]
        mask = (trunc_mask if rec["mask_truncated_completions"] else full_mask).long()

        def logps_fn(model, *a, **k):
            lp = padded([seq_logps(model, s) for s in seqs], cmax)
            return lp, torch.zeros_like(lp), None

        stub = SimpleNamespace(
            _get_per_token_logps_and_entropies=logps_fn,
            aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
            importance_sampling_level="token", beta=rec["beta"], loss_type=rec["loss_type"],
            epsilon_low=rec["epsilon_low"], epsilon_high=rec["epsilon_high"], use_vllm=False,
            vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
            current_gradient_accumulation_steps=1, max_completion_length=rec["max_completion_length"],
            accelerator=Acc(), _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list)},
            args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        )
        inputs = dict(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids, completion_mask=mask,
            advantages=advs[rec["scale_rewards"]], ref_per_token_logps=ref,
            num_items_in_batch=mask.sum(),
        )
        if iters > 1:
            with torch.no_grad():
                inputs["old_per_token_logps"] = padded([seq_logps(policy, s) for s in seqs], cmax) + old_off
        loss = GRPOTrainer._compute_loss(stub, policy, inputs)
        loss.backward()
        gn = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in policy.parameters() if p.grad is not None))
        dl = abs(loss.item() - rec["loss"])
        dg = abs(gn - rec["grad_norm"]) / rec["grad_norm"]
        m = stub._metrics["train"]
        region = m.get("clip_ratio/region_mean", [0.0])[0] * float(mask.sum())
        print(f"  TRL {rec['name']:40s} |dloss| {dl:.2e}  grad_norm rel diff {dg:.2e}  region-clipped {region:.1f}")
        assert dl < 1e-7 and dg < 1e-6, rec["name"]
        assert abs(region - rec["region_clipped_tokens"]) < 1e-3, (region, rec["region_clipped_tokens"])


def high_entropy_mask(entropies, mask, threshold):
    """TRL 1.16 GRPOTrainer.get_high_entropy_mask with one process (no padding or gathering):
    torch.quantile (linear) of the entropies of the mask's tokens at `threshold` = 1 - rho;
    tokens at or above it are kept. Also returns the threshold (None when no token is active)."""
    local = entropies[mask.bool()].float()
    if local.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool), None
    thr = torch.quantile(local, threshold)
    return ((entropies * mask.float()) >= thr) & mask.bool(), thr


def options_name(case):
    name = f"{case['importance_sampling_level']}_{case['loss_type']}_beta{case['beta']}_iter{case['num_iterations']}"
    if case["top_entropy_quantile"] < 1.0:
        name += f"_rho{case['top_entropy_quantile']}"
    if (case["epsilon_low"], case["epsilon_high"]) != (0.2, 0.2):
        name += f"_eps{case['epsilon_low']}-{case['epsilon_high']}"
    if case["mask_truncated_completions"]:
        name += "_masktrunc"
    if case["micro_batch"] != 9:
        name += f"_mb{case['micro_batch']}"
    if case["temperature"] != 1.0:
        name += f"_T{case['temperature']}"
    return name


def options_loss(case, logp, ref, old, mask, adv, ent, total_tokens, gas):
    """One _compute_loss call of TRL 1.16 on a micro-batch (the formulas, written out): logp (b, C)
    with grad; ref, old, ent (b, C); mask (b, C) float; adv (b,). Returns the micro-batch's loss
    (scaled for gradient accumulation as TRL scales it) and its metrics."""
    log_ratio = logp - old
    if case["importance_sampling_level"] == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_w)
    coef_2 = torch.clamp(coef_1, 1 - case["epsilon_low"], 1 + case["epsilon_high"])
    A = adv.unsqueeze(1)
    ptl = -torch.min(coef_1 * A, coef_2 * A)
    thr = None
    kept = int(mask.sum())
    if case["top_entropy_quantile"] < 1.0:
        emask, thr = high_entropy_mask(ent, mask, 1 - case["top_entropy_quantile"])
        ptl = ptl * emask
        kept = int(emask.sum())
    if case["beta"] != 0.0:
        ptl = ptl + case["beta"] * (torch.exp(ref - logp) - (ref - logp) - 1)
    lt = case["loss_type"]
    if lt == "grpo":
        loss = ((ptl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / gas
    elif lt == "bnpo":
        loss = (ptl * mask).sum() / mask.sum().clamp(min=1.0) / gas
    elif lt == "dr_grpo":
        loss = (ptl * mask).sum() / (ptl.size(0) * case["max_completion_length"]) / gas
    elif lt == "dapo":
        # num_items_in_batch (the generation batch's tokens) * gas / steps_per_generation (= gas)
        loss = (ptl * mask).sum() / max(total_tokens, 1.0)
    else:
        raise ValueError(lt)
    c1 = coef_1.detach()
    lo, hi = 1 - case["epsilon_low"], 1 + case["epsilon_high"]
    region = ((c1 < lo) & (A < 0)) | ((c1 > hi) & (A > 0))
    if c1.shape[1] == 1:  # TRL's global_masked_mean: one item per sequence, masked ones too
        region_mean = float(region.float().sum()) / c1.shape[0]
        near = c1.squeeze(1)
    else:
        region_mean = float((region.float() * mask).sum()) / max(float(mask.sum()), 1.0)
        near = c1[mask > 0]
    margin = torch.minimum((near - lo).abs(), (near - hi).abs()).min().item() if near.numel() else math.inf
    entropy_metric = float((ent * mask).sum() / mask.sum().clamp(min=1.0))
    stats = dict(region_mean=region_mean, clip_margin=margin, entropy=entropy_metric, kept=kept,
                 region=int(region.sum()) if c1.shape[1] == 1 else int((region & (mask > 0)).sum()))
    if thr is not None:
        act = ent[mask.bool()]
        d = (act - thr).abs()
        d = d[act != thr]
        stats["threshold"] = thr.item()
        stats["threshold_margin"] = d.min().item() if d.numel() else math.inf
    return loss, stats


def quantile_checks():
    """torch.quantile on random f32 samples at the q values the mask uses and others: the Rust
    reimplementation must give the same f32."""
    g = torch.Generator().manual_seed(27)
    out = []
    qs = [1 - 0.2, 1 - 0.5, 1 - 0.1, 1 - 0.3, 0.0, 1.0]
    for k in range(100):
        n = int(torch.randint(1, 60, (1,), generator=g))
        x = (torch.rand(n, generator=g) * float(torch.randint(1, 12, (1,), generator=g))).float()
        q = qs[k % len(qs)] if k < 60 else float(torch.rand(1, generator=g, dtype=torch.float64))
        out.append(dict(values=[float(v) for v in x], q=q, quantile=float(torch.quantile(x, q))))
    return out


def make_options(policy, ref_model, seqs, lens, old_offsets, rewards, names, check_trl, pad_id):
    """The loss-option cases (OPTIONS_CASES) -> OPTIONS_JSON."""
    n = len(seqs)
    cmax = max(lens)
    full_mask = padded([torch.ones(L) for L in lens], cmax)
    trunc_mask = full_mask.clone()
    for i, s in enumerate(seqs):
        if s["truncated"]:
            trunc_mask[i] = 0
    old_off = padded([torch.tensor(o, dtype=torch.float32) for o in old_offsets], cmax)
    adv = advantages(rewards, "group")
    per_t = {}
    for T in sorted({c.get("temperature", TEMPERATURE) for c in OPTIONS_CASES} | {TEMPERATURE}):
        with torch.no_grad():
            pol = [seq_logps(policy, s, T, entropy=True) for s in seqs]
            ref_rows = [seq_logps(ref_model, s, T) for s in seqs]
        per_t[T] = dict(policy_logps=[r[0] for r in pol], entropies=[r[1] for r in pol], ref_logps=ref_rows)
    results = []
    for spec in OPTIONS_CASES:
        case = dict(OPTIONS_BASE)
        case.update(spec)
        name = options_name(case)
        T = case["temperature"]
        mb, gas = case["micro_batch"], n // case["micro_batch"]
        assert n % mb == 0
        mask = trunc_mask if case["mask_truncated_completions"] else full_mask
        ref = padded(per_t[T]["ref_logps"], cmax)
        ent = padded(per_t[T]["entropies"], cmax)
        policy.zero_grad(set_to_none=True)
        logp = padded([seq_logps(policy, s, T) for s in seqs], cmax)
        old = logp.detach() + old_off if case["num_iterations"] > 1 else logp.detach()
        loss_sum = None
        mstats = []
        for k in range(gas):
            r = slice(k * mb, (k + 1) * mb)
            loss, st = options_loss(case, logp[r], ref[r], old[r], mask[r], adv[r], ent[r], float(mask.sum()), gas)
            loss_sum = loss if loss_sum is None else loss_sum + loss
            mstats.append(st)
        loss_sum.backward()
        total = loss_sum.item()
        grad_norm = math.sqrt(sum(float((p.grad.double() ** 2).sum())
                                  for p in policy.parameters() if p.grad is not None))
        pgn = {nm: math.sqrt(float((names[nm].grad.double() ** 2).sum())) for nm in grad_params()}
        assert math.isfinite(total) and grad_norm > 0, name
        rec = dict(name=name, **case, loss=total, grad_norm=grad_norm, param_grad_norms=pgn,
                   entropy=sum(s["entropy"] for s in mstats) / len(mstats),
                   clip_ratio=sum(s["region_mean"] for s in mstats) / len(mstats),
                   region_clipped=sum(s["region"] for s in mstats),
                   clip_boundary_margin=min(s["clip_margin"] for s in mstats),
                   kept_tokens=sum(s["kept"] for s in mstats))
        if case["top_entropy_quantile"] < 1.0:
            rec["entropy_thresholds"] = [s["threshold"] for s in mstats]
            rec["entropy_threshold_margin"] = min(s["threshold_margin"] for s in mstats)
            # Entropies a little off (another implementation's rounding) cannot move a token
            # across the threshold.
            assert rec["entropy_threshold_margin"] > 1e-4, (name, rec["entropy_threshold_margin"])
            assert 0 < rec["kept_tokens"] < int(mask.sum()), name
        if case["num_iterations"] > 1:
            assert rec["clip_boundary_margin"] > 1e-5, (name, rec["clip_boundary_margin"])
        results.append(rec)
        print(f"  {name:50s} loss {total:+.9f}  grad_norm {grad_norm:.9f}  entropy {rec['entropy']:.6f}  "
              f"kept {rec['kept_tokens']}  region-clipped {rec['region_clipped']}")

    if check_trl:
        check_options_against_trl(policy, seqs, cmax, per_t, old_off, full_mask, trunc_mask, adv, results, pad_id)
    return dict(
        temperatures={str(T): dict(policy_logps=[r.tolist() for r in v["policy_logps"]],
                                   ref_logps=[r.tolist() for r in v["ref_logps"]],
                                   entropies=[r.tolist() for r in v["entropies"]])
                      for T, v in per_t.items()},
        advantages=adv.tolist(),
        quantile_checks=quantile_checks(),
        cases=results,
    )


def check_options_against_trl(policy, seqs, cmax, per_t, old_off, full_mask, trunc_mask, adv, results, pad_id):
    """--check-trl for the option cases: TRL's own GRPOTrainer._compute_loss, one call per
    micro-batch with gradient accumulation, on the same per-token log-probs and entropies (its
    get_high_entropy_mask, torch.quantile, sequence-level ratio and aggregation; its `entropy`
    metric), and TRL's own entropy code on the model's logits."""
    from collections import defaultdict
    from types import SimpleNamespace

    if os.environ.get("TRL_SRC"):
        sys.path.insert(0, os.environ["TRL_SRC"])
    for d in os.environ.get("TRL_EXTRA_SITE", "").split(os.pathsep):
        if d:
            sys.path.append(d)
    import trl
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.utils import entropy_from_logits

    from trl.kernels import ChunkedLogProbFunction

    print(f"  TRL {trl.__version__} from {os.path.dirname(trl.__file__)}")
    # TRL's entropy_from_logits on the same logits as the reference's formula, and the fused
    # LM head GRPOTrainer runs in 1.16 (log-probs and entropies from the final hidden states
    # without full logits; its torch path here, no Triton on CPU).
    worst, worst_fused, worst_fused_lp = 0.0, 0.0, 0.0
    for T in per_t:
        for s, want, want_lp in zip(seqs, per_t[T]["entropies"], per_t[T]["policy_logps"]):
            full = torch.tensor([s["prompt_ids"] + s["ids"]])
            with torch.no_grad():
                out = policy(input_ids=full, attention_mask=torch.ones_like(full), pixel_values=s["pixel_values"],
                             image_grid_thw=s["grid"], use_cache=False, output_hidden_states=True,
                             **mm(policy, full))
                n_c = len(s["ids"])
                logits = out.logits[0, :-1, :][-n_c:].float() / T
                worst = max(worst, (entropy_from_logits(logits) - want).abs().max().item())
                hidden = out.hidden_states[-1][0, :-1, :][-n_c:].float()
                head = policy.get_output_embeddings().weight
                assert (hidden @ head.t() / T - logits).abs().max().item() < 1e-4  # post-norm states
                lp, h, *_ = ChunkedLogProbFunction.apply(hidden, head, None, torch.tensor(s["ids"]), T, 32768,
                                                         None, 1.0, ("entropy",))
                worst_fused = max(worst_fused, (h - want).abs().max().item())
                worst_fused_lp = max(worst_fused_lp, (lp - want_lp).abs().max().item())
    print(f"  TRL entropy_from_logits vs the reference's entropies: max diff {worst:.2e}; TRL's fused LM head "
          f"(ChunkedLogProbFunction): entropies {worst_fused:.2e}, log-probs {worst_fused_lp:.2e}")
    assert worst < 1e-6 and worst_fused < 1e-4 and worst_fused_lp < 1e-4, (worst, worst_fused, worst_fused_lp)

    pmax = max(len(s["prompt_ids"]) for s in seqs)
    prompt_ids = torch.tensor([[pad_id] * (pmax - len(s["prompt_ids"])) + s["prompt_ids"] for s in seqs])
    prompt_mask = torch.tensor([[0] * (pmax - len(s["prompt_ids"])) + [1] * len(s["prompt_ids"]) for s in seqs])
    completion_ids = torch.tensor([s["ids"] + [pad_id] * (cmax - len(s["ids"])) for s in seqs])

    class Acc:
        num_processes = 1
        sync_gradients = True

        def autocast(self):
            import contextlib
            return contextlib.nullcontext()

        def gather(self, x):
            return x

        def gather_for_metrics(self, x):
            return x

        def reduce(self, x, reduction="sum"):
            return x

        def pad_across_processes(self, x, dim=0, pad_index=0):
            return x

    n = len(seqs)
    for rec in results:
        policy.zero_grad(set_to_none=True)
        T, mb = rec["temperature"], rec["micro_batch"]
        gas = n // mb
        mask = (trunc_mask if rec["mask_truncated_completions"] else full_mask).long()
        ref = padded(per_t[T]["ref_logps"], cmax)
        ent = padded(per_t[T]["entropies"], cmax)
        metrics = {"train": defaultdict(list)}
        stub = SimpleNamespace(
            aux_loss_enabled=False, top_entropy_quantile=rec["top_entropy_quantile"],
            off_policy_mask_threshold=None, importance_sampling_level=rec["importance_sampling_level"],
            beta=rec["beta"], loss_type=rec["loss_type"], epsilon_low=rec["epsilon_low"],
            epsilon_high=rec["epsilon_high"], use_vllm=False, vllm_importance_sampling_correction=False,
            model=SimpleNamespace(training=True), current_gradient_accumulation_steps=gas,
            max_completion_length=rec["max_completion_length"], accelerator=Acc(), _entropy_bonus_enabled=False,
            _metrics=metrics,
            args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=gas),
        )
        stub.get_high_entropy_mask = lambda e, m, t: GRPOTrainer.get_high_entropy_mask(stub, e, m, t)
        total = 0.0
        for k in range(gas):
            r = slice(k * mb, (k + 1) * mb)
            mb_seqs = seqs[r]

            def logps_fn(model, *a, **kw):
                lp = padded([seq_logps(model, s, T) for s in mb_seqs], cmax)
                return lp, ent[r], None

            stub._get_per_token_logps_and_entropies = logps_fn
            inputs = dict(prompt_ids=prompt_ids[r], prompt_mask=prompt_mask[r], completion_ids=completion_ids[r],
                          completion_mask=mask[r], advantages=adv[r], ref_per_token_logps=ref[r],
                          num_items_in_batch=mask.sum())
            if rec["num_iterations"] > 1:
                with torch.no_grad():
                    old = padded([seq_logps(policy, s, T) for s in mb_seqs], cmax)
                    inputs["old_per_token_logps"] = old + old_off[r]
            loss = GRPOTrainer._compute_loss(stub, policy, inputs)
            loss.backward()
            total += loss.item()
        gn = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in policy.parameters() if p.grad is not None))
        m = metrics["train"]
        entropy = sum(m["entropy"]) / len(m["entropy"])
        region = sum(m["clip_ratio/region_mean"]) / len(m["clip_ratio/region_mean"])
        dl, dg = abs(total - rec["loss"]), abs(gn - rec["grad_norm"]) / rec["grad_norm"]
        de, dr = abs(entropy - rec["entropy"]), abs(region - rec["clip_ratio"])
        print(f"  TRL {rec['name']:50s} |dloss| {dl:.1e}  grad_norm rel {dg:.1e}  |dentropy| {de:.1e}  "
              f"|dclip| {dr:.1e}")
        assert dl < 1e-7 and dg < 1e-6 and de < 1e-6 and dr < 1e-6, rec["name"]


BF16_NOTES = (
    "PyTorch's own mixed-precision GRPO step on cases[0] (grpo_beta0.04_iter1), written by "
    "tools/make_grpo_fixture.py --bf16-reference (the rest of this file is unchanged by it). Same inputs, "
    "loss function (loss_from) and one CPU thread as the f32 cases. Policy: f32 master weights, each "
    "completion's forward pass (batch 1, eager attention) and the log-softmax/gather under "
    "torch.autocast('cpu', dtype=torch.bfloat16), the logits cast to float32 before the log-softmax as TRL "
    "does before selective_log_softmax (autocast runs linears/matmuls/convs in bf16 and every other op in its "
    "input's dtype: the vision tower is bf16 from its patch-embedding conv on, LayerNorms, GELUs and residual "
    "stream included, while the language model's embeddings, residual stream and RMSNorms stay f32, the bf16 "
    "attention/MLP outputs being added to f32; the lm_head's logits are bf16). Reference: the "
    "reference model cast to bf16 (model.to(torch.bfloat16)), no autocast, logits cast to float32 before "
    "the log-softmax; these bf16 reference log-probs enter the loss. Loss, exp/min/clamp and the "
    "aggregation in f32, backward into f32 .grad. loss and grad_norm (sqrt of the f64 sum of squared f32 "
    "gradients, all parameters) compare with cases[0].loss / grad_norm; grad_cosine_vs_f32 is the cosine "
    "(f64 sums) between this gradient and the f32 step's gradient (recomputed in the same run, reproducing "
    "cases[0]) over all parameters that get a gradient; ref_logps_max_diff / policy_logps_max_diff are the "
    "max |bf16 - f32| over all completion tokens against ref_logps / policy_logps. "
    "bf16_model: for comparison, the same step (same bf16 reference log-probs) with the policy itself cast to "
    "bf16 (model.to(torch.bfloat16), no autocast): bf16 weights, activations everywhere (the language model's "
    "residual stream included) and bf16 gradients, cast to f64 for the norm and the cosine."
)


def bf16_reference():
    """--bf16-reference: PyTorch's own bf16 mixed-precision step on case 0, added to OUT_JSON as
    "bf16_autocast". The existing file is loaded and written back with the same json.dump call, so
    the only change is the added (or replaced) key; this environment must first reproduce the
    stored f32 log-probs, loss and gradient norm."""
    with open(OUT_JSON) as f:
        stored = json.load(f)
    tok = AutoTokenizer.from_pretrained(REF_DIR)
    _, seqs = build_inputs(tok)
    lens = [len(s["ids"]) for s in seqs]
    cmax = max(lens)
    ref_model = load(REF_DIR)
    policy = load(POLICY_DIR)
    for p in policy.parameters():
        p.requires_grad_(True)
    for p in ref_model.parameters():
        p.requires_grad_(False)

    def max_diff(rows, want):
        return max(abs(a - b) for r, w in zip(rows, want) for a, b in zip(r.tolist(), w))

    with torch.no_grad():
        ref_rows = [seq_logps(ref_model, s) for s in seqs]
        pol_rows = [seq_logps(policy, s) for s in seqs]
    d_pol, d_ref = max_diff(pol_rows, stored["policy_logps"]), max_diff(ref_rows, stored["ref_logps"])
    print(f"  f32 log-probs vs {OUT_JSON}: policy max diff {d_pol:.2e}, reference {d_ref:.2e} (stored by "
          f"torch {stored['versions']['torch']}, transformers {stored['versions']['transformers']})")
    assert d_pol < 1e-5 and d_ref < 1e-5

    case = dict(BASE)
    case.update(CASES[0])
    want = stored["cases"][0]
    assert want["name"] == "grpo_beta0.04_iter1" and all(want[k] == v for k, v in case.items()), want["name"]
    full_mask = padded([torch.ones(L) for L in lens], cmax)
    old_off = padded([torch.tensor(o, dtype=torch.float32) for o in stored["old_logp_offsets"]], cmax)
    rewards = [r for g in stored["groups"] for r in g["rewards"]]
    adv = advantages(rewards, "group")
    assert adv.tolist() == stored["advantages"]["group"]

    def step(logp, ref):
        policy.zero_grad(set_to_none=True)
        loss, _, _, _ = loss_from(case, logp, ref, old_off, full_mask, adv)
        loss.backward()
        grads = {k: p.grad.detach().clone() for k, p in policy.named_parameters() if p.grad is not None}
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
        return loss.item(), norm, grads

    # The f32 step again: the gradient the bf16 one is compared with.
    loss32, norm32, g32 = step(padded([seq_logps(policy, s) for s in seqs], cmax), padded(ref_rows, cmax))
    print(f"  f32 step: loss {loss32:+.9f} (stored {want['loss']:+.9f}), grad_norm {norm32:.9f} "
          f"(stored {want['grad_norm']:.9f})")
    assert abs(loss32 - want["loss"]) < 1e-6 and abs(norm32 - want["grad_norm"]) / want["grad_norm"] < 1e-5

    ref_bf16 = load(REF_DIR).to(torch.bfloat16)
    for p in ref_bf16.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        ref16_rows = [seq_logps(ref_bf16, s) for s in seqs]
    del ref_bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pol16_rows = [seq_logps(policy, s) for s in seqs]
    assert all(r.dtype == torch.float32 for r in pol16_rows + ref16_rows)
    d_pol16 = max_diff([r.detach() for r in pol16_rows], stored["policy_logps"])
    d_ref16 = max_diff(ref16_rows, stored["ref_logps"])
    loss16, norm16, g16 = step(padded(pol16_rows, cmax), padded(ref16_rows, cmax))
    assert set(g16) == set(g32) and all(g.dtype == torch.float32 for g in g16.values())

    def cos(g):
        return sum(float((g[k].double() * g32[k].double()).sum()) for k in g32) / (norm32 * math.sqrt(
            sum(float((v.double() ** 2).sum()) for v in g.values())))

    cosine = cos(g16)

    # For comparison: the whole policy in bf16 (weights, activations, gradients).
    policy_bf16 = load(POLICY_DIR).to(torch.bfloat16)
    for p in policy_bf16.parameters():
        p.requires_grad_(True)
    policy_bf16.zero_grad(set_to_none=True)
    polb_rows = [seq_logps(policy_bf16, s) for s in seqs]
    lossb, _, _, _ = loss_from(case, padded(polb_rows, cmax), padded(ref16_rows, cmax), old_off, full_mask, adv)
    lossb.backward()
    gb = {k: p.grad for k, p in policy_bf16.named_parameters() if p.grad is not None}
    assert set(gb) == set(g32)
    bf16_model = dict(
        loss=lossb.item(),
        grad_norm=math.sqrt(sum(float((v.double() ** 2).sum()) for v in gb.values())),
        grad_cosine_vs_f32=cos(gb),
        policy_logps_max_diff=max_diff([r.detach() for r in polb_rows], stored["policy_logps"]),
    )
    print(f"  bf16 autocast: reference log-probs max diff {d_ref16:.3f}, policy {d_pol16:.3f}; loss {loss16:.6f} vs "
          f"{want['loss']:.6f} (rel {abs(loss16 - want['loss']) / abs(want['loss']):.1e}); grad_norm {norm16:.5f} vs "
          f"{want['grad_norm']:.5f} (rel {abs(norm16 - want['grad_norm']) / want['grad_norm']:.1e}); "
          f"gradient cosine {cosine:.6f}")
    print(f"  bf16 model: policy log-probs max diff {bf16_model['policy_logps_max_diff']:.3f}; loss "
          f"{bf16_model['loss']:.6f}; grad_norm {bf16_model['grad_norm']:.5f}; gradient cosine "
          f"{bf16_model['grad_cosine_vs_f32']:.6f}")
    stored["bf16_autocast"] = dict(
        case=want["name"],
        loss=loss16,
        grad_norm=norm16,
        grad_cosine_vs_f32=cosine,
        ref_logps_max_diff=d_ref16,
        policy_logps_max_diff=d_pol16,
        bf16_model=bf16_model,
        torch=torch.__version__,
        transformers=transformers.__version__,
        notes=BF16_NOTES,
    )
    with open(OUT_JSON, "w") as f:
        json.dump(stored, f, indent=1)
    print("wrote", OUT_JSON, "(added bf16_autocast)")


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # fixed reduction order: byte-identical output on every run
    if BF16_REFERENCE:
        bf16_reference()
        return
    if not OPTIONS_ONLY:
        make_policy()
    tok = AutoTokenizer.from_pretrained(REF_DIR)
    groups, seqs = build_inputs(tok)
    n = len(seqs)
    lens = [len(s["ids"]) for s in seqs]
    cmax = max(lens)
    assert cmax <= MAX_COMPLETION_LENGTH

    ref_model = load(REF_DIR)
    policy = load(POLICY_DIR)  # reloaded: references come from exactly the saved weights
    for p in policy.parameters():
        p.requires_grad_(True)
    for p in ref_model.parameters():
        p.requires_grad_(False)
    names = {checkpoint_name(k): p for k, p in policy.named_parameters()}
    assert set(grad_params()) <= set(names)

    with torch.no_grad():
        ref_rows = [seq_logps(ref_model, s) for s in seqs]
        pol_rows = [seq_logps(policy, s) for s in seqs]
    ref = padded(ref_rows, cmax)

    # Old log-prob offsets: 0.3 * sin(1.0 + 0.7 k), k running over all completion tokens in order.
    offsets, k = [], 0
    for L in lens:
        offsets.append([0.3 * math.sin(1.0 + 0.7 * (k + t)) for t in range(L)])
        k += L
    old_off = padded([torch.tensor(o, dtype=torch.float32) for o in offsets], cmax)

    full_mask = padded([torch.ones(L) for L in lens], cmax)
    trunc_mask = full_mask.clone()
    for i, s in enumerate(seqs):
        if s["truncated"]:
            trunc_mask[i] = 0

    rewards = [r for g in groups for r in g["rewards"]]
    advs = {sc: advantages(rewards, sc) for sc in ("group", "batch", "none")}
    assert torch.all(advs["group"][6:9] == 0)

    pad_id = tok.convert_tokens_to_ids("<|endoftext|>")
    check_trl = "--check-trl" in sys.argv[1:]
    if not OPTIONS_ONLY:
        results = []
        for spec in CASES:
            case = dict(BASE)
            case.update(spec)
            name = f"{case['loss_type']}_beta{case['beta']}_iter{case['num_iterations']}"
            if case["epsilon_high"] != case["epsilon_low"]:
                name += f"_epshigh{case['epsilon_high']}"
            if case["scale_rewards"] != "group":
                name += f"_scale{case['scale_rewards']}"
            if case["mask_truncated_completions"]:
                name += "_masktrunc"
            policy.zero_grad(set_to_none=True)
            logp = padded([seq_logps(policy, s) for s in seqs], cmax)
            mask = trunc_mask if case["mask_truncated_completions"] else full_mask
            loss, clipped, region, margin = loss_from(case, logp, ref, old_off, mask, advs[case["scale_rewards"]])
            loss.backward()
            sq = 0.0
            for p in policy.parameters():
                if p.grad is not None:
                    sq += float((p.grad.double() ** 2).sum())
            grad_norm = math.sqrt(sq)
            pgn = {nm: math.sqrt(float((names[nm].grad.double() ** 2).sum())) for nm in grad_params()}
            assert math.isfinite(loss.item()) and grad_norm > 0 and math.isfinite(grad_norm), name
            assert all(v > 0 for v in pgn.values()), (name, pgn)
            if case["num_iterations"] == 1:
                assert clipped == 0
            else:
                assert clipped > 0, name
                # coef_1 is never near a clip boundary, so f32 noise cannot flip which branch is taken
                assert margin > 1e-5, (name, margin)
            rec = dict(name=name, **case, loss=loss.item(), grad_norm=grad_norm, param_grad_norms=pgn,
                       clipped_tokens=clipped, region_clipped_tokens=region, clip_boundary_margin=margin)
            results.append(rec)
            print(f"  {name:40s} loss {rec['loss']:+.9f}  grad_norm {grad_norm:.9f}  clipped {clipped}")

        # Sanity check: case 1 computed a second way, one TRL-style padded batch with an attention mask.
        case = dict(BASE)
        case.update(CASES[0])
        policy.zero_grad(set_to_none=True)
        pad_id = tok.convert_tokens_to_ids("<|endoftext|>")
        with torch.no_grad():
            ref_b = batched_logps(ref_model, seqs, pad_id) * full_mask
            logp_b = batched_logps(policy, seqs, pad_id) * full_mask
        loss_b, _, _, _ = loss_from(case, logp_b, ref_b, old_off, full_mask, advs["group"])
        d_loss = abs(loss_b.item() - results[0]["loss"])
        d_lp = (logp_b - padded(pol_rows, cmax)).abs().max().item()
        print(f"  batched check: |dloss| {d_loss:.3e}, max |dlogp| {d_lp:.3e}")
        assert d_loss < 1e-6, d_loss

        notes = (
            "Generated by tools/make_grpo_fixture.py (PyTorch reference of TRL 1.16 GRPOTrainer._compute_loss, "
            "token-level importance sampling, temperature 1.0, no entropy terms, gradient accumulation 1, one process). "
            "Log-probs: each completion is its own forward pass (batch 1, prompt + completion, no padding, eager "
            "attention, f32); logits at position j predict token j+1; per-token tensors padded to (9, C_max) with mask 0. "
            "Prompts: chat template from tiny-a's tokenizer_config.json, Qwen2VLImageProcessor(min_pixels=56*56, "
            "max_pixels=28*28*12), one <|image_pad|> per merged patch, tokenized without special tokens. "
            "Advantages computed in float32 like TRL (rewards float32, torch .std with N-1, + 1e-4); "
            "'advantages' holds them for each scale_rewards mode. "
            "Old log-probs (num_iterations 2): old = policy_logp (detached) + old_logp_offsets[i][t], where the offset "
            "is 0.3*sin(1.0+0.7*k) computed in float64 and then rounded to float32 before being added (k runs over all "
            "completion tokens in order); so coef_1 = exp(logp - old) is exp(-offset) up to f32 rounding. "
            "num_iterations 1: old = logp.detach(), coef_1 == 1 exactly. "
            "clipped_tokens counts masked-in tokens where coef_1 < 1-epsilon_low or coef_1 > 1+epsilon_high; "
            "region_clipped_tokens is TRL's clip_ratio/region count: clipped tokens where the clip is active "
            "(coef_1 < 1-eps_low with A < 0, or coef_1 > 1+eps_high with A > 0). "
            "clip_boundary_margin is min |coef_1 - bound| over masked-in tokens (>1e-5 asserted for iters 2 cases, so "
            "f32 noise cannot flip a branch). torch.min ties (unclipped tokens, coef_1 == coef_2) split the gradient "
            "evenly between both branches, which sums to the plain gradient. "
            "KL: exp(ref - logp) - (ref - logp) - 1 with ref from tiny-a (no grad), added as beta * kl. "
            "mask_truncated_completions: a completion whose last id is not <|im_end|> or <|endoftext|> "
            "(TRL: eos_token_ids + pad_token_id, which are these two ids) gets an all-zero mask; the grpo denominator "
            "clamps its zero token count to 1, so it contributes 0 to the mean over 9 sequences. "
            "dapo: normalizer = mask.sum() (num_items_in_batch with one process, one accumulation window). "
            "dr_grpo: denominator 9 * max_completion_length (32). "
            "grad_norm = sqrt(sum over all policy parameters of sum(grad^2)) accumulated in float64 from the f32 grads; "
            "the tied embedding / lm_head is one parameter (model.embed_tokens.weight). param_grad_norms use the names "
            "stored in model.safetensors. policy_logps / ref_logps are the unpadded per-token log-probs (no grad) of "
            "grpo-policy and tiny-a. The batched cross-check (prompts left-padded, completions right-padded, one forward "
            "pass of all 9 sequences) reproduces case 1's loss within batched_check.abs_loss_diff (0: with one CPU thread "
            "the padded batch gives bit-identical log-probs; with two threads they differ by ~3e-6). "
            "`make_grpo_fixture.py --check-trl` (TRL_SRC=<trl>/src) also runs TRL 1.16's own GRPOTrainer._compute_loss on "
            "the same log-probs for every case: loss, grad_norm and TRL's region-clip count agree exactly. "
            "Magnitudes to expect: the perturbed policy is far from tiny-a (per-token ref - logp in [-4.3, 5.3], mean "
            "per-token KL ~4.2, max exp(ref - logp) ~199), so KL terms dominate the beta 0.04 gradients; "
            "case grpo_beta0.0_iter1 is mathematically 0 (per-sequence mean of -A, averaged over groups) and is "
            "~1.7e-8 from f32 rounding: compare it absolutely."
        )
        if REF_NAME != "tiny-a":
            notes = notes.replace("tiny-a", REF_NAME).replace("grpo-policy", f"{PREFIX}-policy")
            notes += f" (The magnitudes quoted were measured on tiny-a, not {REF_NAME}.)"
        out = dict(
            notes=notes,
            generated_by="tools/make_grpo_fixture.py",
            versions=dict(torch=torch.__version__, transformers=transformers.__version__, pillow=PIL.__version__,
                          numpy=np.__version__, trl="1.16 (formulas, not imported)"),
            reference_model=REF_NAME,
            policy_model=f"{PREFIX}-policy",
            policy_perturbation="p + 0.02 * randn_like(p), torch.manual_seed(1234), model.named_parameters() order",
            temperature=TEMPERATURE,
            num_generations=G,
            max_completion_length=MAX_COMPLETION_LENGTH,
            special_token_ids={t: tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>", "<|image_pad|>")},
            groups=groups,
            old_logp_offsets=[[float(x) for x in torch.tensor(o, dtype=torch.float32)] for o in offsets],
            policy_logps=[r.tolist() for r in pol_rows],
            ref_logps=[r.tolist() for r in ref_rows],
            advantages={k: v.tolist() for k, v in advs.items()},
            batched_check=dict(abs_loss_diff=d_loss, max_abs_logp_diff=d_lp),
            cases=results,
        )
        with open(OUT_JSON, "w") as f:
            json.dump(out, f, indent=1)
        if "--check-trl" in sys.argv[1:]:
            check_against_trl(policy, seqs, cmax, ref, old_off, full_mask, trunc_mask, advs, results, pad_id)
        print("wrote", OUT_JSON, "and", POLICY_DIR)
    else:
        # The saved policy and fixture are kept; this environment must reproduce their log-probs.
        with open(OUT_JSON) as f:
            stored = json.load(f)
        d = max(abs(a - b) for r, w in zip(pol_rows, stored["policy_logps"]) for a, b in zip(r.tolist(), w))
        d_ref = max(abs(a - b) for r, w in zip(ref_rows, stored["ref_logps"]) for a, b in zip(r.tolist(), w))
        print(f"  {OUT_JSON}: policy log-probs max diff {d:.2e}, reference {d_ref:.2e} (stored by "
              f"torch {stored['versions']['torch']}, transformers {stored['versions']['transformers']})")
        assert d < 1e-5 and d_ref < 1e-5

    opts = make_options(policy, ref_model, seqs, lens, offsets, rewards, names, check_trl, pad_id)
    trl_version = "1.16 (formulas, not imported)"
    if check_trl:
        import trl
        trl_version = f"{trl.__version__} (formulas; --check-trl ran its _compute_loss)"
    out = dict(
        notes=OPTIONS_NOTES.replace("grpo-policy", f"{PREFIX}-policy").replace("grpo-cases", f"{PREFIX}-cases")
        .replace("tiny-a", REF_NAME),
        generated_by="tools/make_grpo_fixture.py",
        versions=dict(torch=torch.__version__, transformers=transformers.__version__, trl=trl_version),
        reference_model=REF_NAME,
        policy_model=f"{PREFIX}-policy",
        num_generations=G,
        max_completion_length=MAX_COMPLETION_LENGTH,
        old_logp_offsets=[[float(x) for x in torch.tensor(o, dtype=torch.float32)] for o in offsets],
        **opts,
    )
    with open(OPTIONS_JSON, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", OPTIONS_JSON)


if __name__ == "__main__":
    main()
