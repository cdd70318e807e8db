#!/usr/bin/env python3
"""The `medvlm bench train` workload in PyTorch, step for step as TRL's GRPOTrainer runs it,
so the README can compare the two side by side (same machine, same threads, same run).

    python tools/bench_train_pytorch.py --threads 2 [--prompts 1 --group 8 --completion-len 256
                                         --micro-batch 2 --beta 0.04 --steps 3]

Same random model (src/model/presets/qwen2-vl-bench.json, or --config, f32), same prompt shape (20 text tokens, one
224x224 image = 64 image tokens, text up to 261 tokens), same work per optimizer step:
  1. generation: the prompt repeated G times (TRL's RepeatSampler), model.generate with
     sampling at temperature 1, every completion forced to --completion-len tokens;
  2. reference log-probs: a frozen copy of the initial model, no grad, micro-batches of
     --micro-batch rows, each row prompt + completion with its own copy of the image (TRL
     slices pixel_values per row), logits only for the completion (logits_to_keep), TRL's
     selective_log_softmax;
  3. policy forward + backward per micro-batch (gradient accumulation), TRL 1.x's loss
     (loss_type "grpo", num_iterations 1: old log-probs = detached current, k3 KL * beta);
  4. clip_grad_norm_(1.0) and AdamW (lr 1e-6), zero_grad.
With --sft, an SFT step as TRL's SFTTrainer runs it instead: prompts x group items, each with
its own copy of the prompt and image and a --completion-len-token target, labels -100 on the
prompt, transformers' own loss over the logits of every position (sum over target tokens /
their count in the step, gradient accumulation over --micro-batch items), clipping, AdamW.
With --autocast, the step as TRL runs it with `bf16=True` on the CPU: accelerate wraps every
forward pass (generation, reference model, policy) in torch.autocast("cpu", bfloat16) over the
f32 weights, and the logits are cast to f32 before the log-softmax, as `medvlm bench train
--dtype bf16` computes its log-softmax and loss in f32.
Prints one line per step and a JSON report.
"""

import argparse
import contextlib
import json
import os
import resource
import statistics
import time

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def text_ids(n, salt, cfg):
    """medvlm's bench text ids (src/bench/mod.rs text_ids / in_vocab): ordinary tokens below the
    vision tokens and the vocabulary's end."""
    vocab = getattr(getattr(cfg, "text_config", cfg), "vocab_size", None) or cfg.vocab_size
    limit = max(1, min(vocab, cfg.vision_start_token_id, cfg.image_token_id))
    return [(1000 + (i * 7919 + salt * 104729) % 140000) % limit for i in range(n)]


def selective_log_softmax(logits, index):
    """TRL's: log_softmax gathered at `index`, row by row for f32 to bound memory."""
    selected = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
    lse = torch.stack([torch.logsumexp(lg, dim=-1) for lg in logits])
    return selected - lse


def mm_types(ids, image_token_id):
    """transformers 5's mm_token_type_ids (1 at image tokens); 4.x ignores them."""
    return (ids == image_token_id).int()


def per_token_logps(model, ids, mask, pixel_values, grid, logits_to_keep, temperature=1.0):
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_grid_thw=grid,
                mm_token_type_ids=mm_types(ids, model.config.image_token_id),
                logits_to_keep=logits_to_keep + 1, use_cache=False)
    logits = out.logits[:, :-1, :].float() / temperature
    return selective_log_softmax(logits, ids[:, -logits_to_keep:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(ROOT, "src", "model", "presets", "qwen2-vl-bench.json"),
                    help="the model shape (random weights), as `medvlm bench train --config` / --preset: "
                         "e.g. src/model/presets/qwen2-vl-bench-layers.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--completion-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--prompt-tokens", type=int, default=261)
    ap.add_argument("--freeze-vision", action="store_true")
    ap.add_argument("--sft", action="store_true")
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast (TRL's bf16=True)")
    args = ap.parse_args()
    # TRL's bf16=True: accelerate runs every forward pass under autocast.
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.autocast else contextlib.nullcontext
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = Qwen2VLConfig(**json.load(open(args.config)))
    cfg._attn_implementation = "sdpa"
    policy = Qwen2VLForConditionalGeneration(cfg)
    policy.train()
    ref = Qwen2VLForConditionalGeneration(cfg)
    ref.load_state_dict(policy.state_dict())
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    if args.freeze_vision:
        for n, p in policy.named_parameters():
            if "visual" in n and "merger" not in n:
                p.requires_grad_(False)
    params = policy.num_parameters()
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6,
                            betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    s = args.image_size
    x, y = np.meshgrid(np.arange(s), np.arange(s))
    img = np.stack([(x * 7 + y * 3) % 256, (np.sin(x / 9.0) * 120 + 128 + y % 17) % 256, (x ^ y) % 256], -1)
    pv = Qwen2VLImageProcessor()(images=[Image.fromarray(img.astype(np.uint8), "RGB")], return_tensors="pt")
    grid = pv["image_grid_thw"]
    n_img = int(grid.prod()) // 4
    fixed = 20 + n_img + 2
    ids = text_ids(20, 1, cfg) + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img
    ids += [cfg.vision_end_token_id] + text_ids(args.prompt_tokens - fixed, 2, cfg)
    B, G, C, mb = args.prompts, args.group, args.completion_len, args.micro_batch
    rows = B * G
    prompt_ids = torch.tensor([ids] * rows)
    prompt_mask = torch.ones_like(prompt_ids)
    pixel_values = pv["pixel_values"].repeat(rows, 1)  # one image per row, as TRL batches them
    grids = grid.repeat(rows, 1)
    patches = pv["pixel_values"].shape[0]

    steps = []
    if args.sft:
        for step in range(args.steps):
            t0 = time.perf_counter()
            targets = torch.tensor([text_ids(C, 3 + step * rows + i, cfg) for i in range(rows)])
            full = torch.cat([prompt_ids, targets], 1)
            labels = torch.cat([torch.full_like(prompt_ids, -100), targets], 1)
            n_items = torch.tensor(rows * C)
            loss_sum = 0.0
            for i in range(0, rows, mb):
                sl = slice(i, i + mb)
                with amp():
                    out = policy(input_ids=full[sl], attention_mask=torch.ones_like(full[sl]),
                                 pixel_values=pixel_values[i * patches:(i + mb) * patches],
                                 image_grid_thw=grids[sl], mm_token_type_ids=mm_types(full[sl], cfg.image_token_id),
                                 labels=labels[sl], num_items_in_batch=n_items, use_cache=False)
                out.loss.backward()
                loss_sum += out.loss.item()
            pol_s = time.perf_counter() - t0
            t3 = time.perf_counter()
            gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0).item()
            opt.step()
            opt.zero_grad(set_to_none=True)
            opt_s = time.perf_counter() - t3
            rec = dict(generation_s=0.0, reference_s=0.0, policy_s=pol_s, optimizer_s=opt_s,
                       train_s=pol_s + opt_s, total_s=time.perf_counter() - t0, loss=loss_sum, grad_norm=gn)
            print(f"step {step + 1}: policy fwd+bwd {pol_s:.2f}s  optimizer {opt_s:.2f}s  "
                  f"total {rec['total_s']:.2f}s", flush=True)
            steps.append(rec)
    for step in range(0 if args.sft else args.steps):
        t0 = time.perf_counter()
        with torch.no_grad(), amp():
            policy.eval()
            out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, pixel_values=pixel_values,
                                  image_grid_thw=grids, mm_token_type_ids=mm_types(prompt_ids, cfg.image_token_id),
                                  max_new_tokens=C, min_new_tokens=C, do_sample=True,
                                  temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0)
            policy.train()
        assert out.shape == (rows, len(ids) + C)
        completion_ids = out[:, len(ids):]
        gen_s = time.perf_counter() - t0

        g = torch.Generator().manual_seed(step)
        rewards = torch.randint(0, 3, (rows,), generator=g).float()
        grouped = rewards.view(-1, G)
        adv = (rewards - grouped.mean(1).repeat_interleave(G)) / (grouped.std(1).repeat_interleave(G) + 1e-4)

        full = torch.cat([prompt_ids, completion_ids], 1)
        full_mask = torch.ones_like(full)
        cmask = torch.ones(rows, C)

        def rows_of(i):
            sl = slice(i, i + mb)
            px = pixel_values[i * patches:(i + mb) * patches]
            return full[sl], full_mask[sl], px, grids[sl]

        t1 = time.perf_counter()
        ref_lp = None
        if args.beta != 0.0:
            with torch.no_grad(), amp():
                ref_lp = torch.cat([per_token_logps(ref, *rows_of(i), C) for i in range(0, rows, mb)])
        ref_s = time.perf_counter() - t1

        t2 = time.perf_counter()
        steps_acc = (rows + mb - 1) // mb
        loss_sum = 0.0
        for i in range(0, rows, mb):
            with amp():
                lp = per_token_logps(policy, *rows_of(i), C)
            old = lp.detach()
            coef_1 = torch.exp(lp - old)
            coef_2 = torch.clamp(coef_1, 0.8, 1.2)
            a = adv[i:i + mb].unsqueeze(1)
            ptl = -torch.min(coef_1 * a, coef_2 * a)
            if ref_lp is not None:
                r = ref_lp[i:i + mb]
                ptl = ptl + args.beta * (torch.exp(r - lp) - (r - lp) - 1)
            m = cmask[i:i + mb]
            loss = ((ptl * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean() / steps_acc
            loss.backward()
            loss_sum += loss.item()
        pol_s = time.perf_counter() - t2

        t3 = time.perf_counter()
        gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        opt_s = time.perf_counter() - t3
        rec = dict(generation_s=gen_s, reference_s=ref_s, policy_s=pol_s, optimizer_s=opt_s,
                   train_s=ref_s + pol_s + opt_s, total_s=time.perf_counter() - t0, loss=loss_sum, grad_norm=gn)
        print(f"step {step + 1}: generation {gen_s:.2f}s  reference {ref_s:.2f}s  policy fwd+bwd {pol_s:.2f}s  "
              f"optimizer {opt_s:.2f}s  train {rec['train_s']:.2f}s  total {rec['total_s']:.2f}s", flush=True)
        steps.append(rec)

    med = {k: statistics.median(r[k] for r in steps) for k in steps[0]}
    print(json.dumps(dict(
        parameters=params, threads=torch.get_num_threads(), workload=vars(args), image_tokens=n_img,
        precision="bf16 autocast" if args.autocast else "f32",
        steps=steps, median=med, peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        versions=dict(torch=torch.__version__, transformers=__import__("transformers").__version__),
    ), indent=1))


if __name__ == "__main__":
    main()
