#!/usr/bin/env python3
"""A GRPO reward for medvlm: 1.0 when the completion's <answer> holds the right letter.

medvlm starts this once and writes one JSON object per completion to its stdin (prompt,
completion, question, options, answer, solution, kind, modality, id, step, ...). It
answers one line per completion, in order: a number, or {"score": x, "metrics": {...}}.
"""
import json
import re
import sys

for line in sys.stdin:
    sample = json.loads(line)
    found = re.search(r"<answer>\s*([A-J])\s*</answer>", sample["completion"])
    score = 1.0 if found and found.group(1) == sample["solution"] else 0.0
    print(json.dumps({"score": score, "metrics": {"answered": float(bool(found))}}), flush=True)
