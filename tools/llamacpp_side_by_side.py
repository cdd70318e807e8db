#!/usr/bin/env python3
"""Helper of tools/llamacpp_side_by_side.sh (standard library only, except `tokenizer`, which
runs in the converter's venv and imports gguf-py from the llama.cpp tree).

  tokenizer --checkpoint DIR --vocab-gguf FILE --out DIR
      A view of a `medvlm init` checkpoint that llama.cpp's convert_hf_to_gguf.py accepts:
      the same safetensors shards (symlinks, so the weights are bit for bit the checkpoint's),
      config.json and preprocessor_config.json, and a tokenizer.json whose BPE vocabulary and
      merges are Qwen2's real ones, read from models/ggml-vocab-qwen2.gguf (a vocab-only GGUF
      of Qwen2's tokenizer that ships in the llama.cpp tree). medvlm's own small BPE tokenizer
      fails the converter's pre-tokenizer hash check; Qwen2's passes it unpatched. The added
      (special) tokens are the checkpoint's, which are Qwen2-VL's (ids 151643..151656), and
      the converter pads the vocabulary to config.json's 151,936, so the embedding and the LM
      head keep their shape.
      With GPT-2's vocabulary (models/ggml-vocab-gpt-2.gguf, pre-tokenizer "gpt-2") the
      tokenizer.json also takes GPT-2's byte-level pre-tokenizer, so the converter's hash check
      recognises it; the checkpoint must then come from `small-vocab`.
  small-vocab --checkpoint DIR --base-vocab N --vocab-size V --out DIR
      The second benchmark shape: the checkpoint's model with a V-row vocabulary (the first V
      rows of its embedding, and of its LM head if untied), the Qwen2-VL special tokens moved
      to ids N.. (right after GPT-2's N normal tokens) in tokenizer.json and config.json, the
      other tensors as they are. Runs in the converter's venv (torch, safetensors).
  png --out FILE
      The 448x448 test card `medvlm bench generate` encodes (src/bench/mod.rs, test_image).
  table --out DIR
      Reads DIR/raw/rep*/, DIR/raw/decode*/ and DIR/meta.json, prints the markdown tables,
      writes DIR/table.md and DIR/summary.json.
"""

import argparse
import json
import math
import os
import re
import statistics
import struct
import sys
import zlib
from pathlib import Path


# --------------------------------------------------------------------------- tokenizer


def cmd_tokenizer(a):
    ckpt = Path(a.checkpoint).resolve()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from gguf import GGUFReader  # gguf-py of the llama.cpp tree, on PYTHONPATH

    r = GGUFReader(a.vocab_gguf)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    merges = r.fields["tokenizer.ggml.merges"].contents()
    pre = r.fields["tokenizer.ggml.pre"].contents()
    if pre not in ("qwen2", "gpt-2"):
        sys.exit(f"{a.vocab_gguf}: neither Qwen2's nor GPT-2's vocabulary (pre-tokenizer {pre})")
    # Normal tokens (type 1) come first, ids 0..151642; control and padding entries follow.
    n_normal = sum(1 for t in types if t == 1)
    if any(t != 1 for t in types[:n_normal]):
        sys.exit(f"{a.vocab_gguf}: normal tokens are not the first {n_normal} ids")

    tok = json.loads((ckpt / "tokenizer.json").read_text())
    added = tok["added_tokens"]
    if min(t["id"] for t in added) < n_normal:
        sys.exit("the checkpoint's added tokens overlap Qwen2's normal vocabulary")
    cfg = json.loads((ckpt / "config.json").read_text())
    if max(t["id"] for t in added) >= cfg["vocab_size"]:
        sys.exit("an added token lies beyond config.json's vocab_size")
    tok["model"]["vocab"] = {t: i for i, t in enumerate(tokens[:n_normal])}
    tok["model"]["merges"] = [m.split(" ", 1) for m in merges]
    if pre == "gpt-2":
        # GPT-2's tokenizer: byte-level with its own split regex, no normalizer. The
        # converter hashes how the tokenizer splits a test text; only GPT-2's own
        # pre-tokenizer gives GPT-2's hash.
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        tok["normalizer"] = None
        tok["pre_tokenizer"] = byte_level
        tok["decoder"] = byte_level
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))

    for name in os.listdir(ckpt):
        src = ckpt / name
        dst = out / name
        if name == "tokenizer.json":
            continue
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        dst.symlink_to(src)
    print(
        f"{out}: {pre} vocabulary ({n_normal} tokens, {len(merges)} merges) + "
        f"{len(added)} added tokens of the checkpoint; weights linked from {ckpt}"
    )


# --------------------------------------------------------------------------- small vocabulary


# config.json fields that hold a special token's id.
TOKEN_ID_FIELDS = (
    "bos_token_id", "eos_token_id", "pad_token_id", "image_token_id", "video_token_id",
    "vision_start_token_id", "vision_end_token_id", "vision_token_id",
)


def cmd_small_vocab(a):
    import torch  # the converter's venv
    from safetensors.torch import load_file, save_file

    ckpt = Path(a.checkpoint).resolve()
    out = Path(a.out)
    if out.exists():
        sys.exit(f"{out}: already exists")
    stage = out.with_name(out.name + ".part")
    if stage.exists():
        import shutil
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    cfg = json.loads((ckpt / "config.json").read_text())
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    first = min(t["id"] for t in tok["added_tokens"])
    remap = lambda i: i - first + a.base_vocab
    if remap(max(t["id"] for t in tok["added_tokens"])) >= a.vocab_size:
        sys.exit("the special tokens do not fit below --vocab-size")
    for t in tok["added_tokens"]:
        t["id"] = remap(t["id"])
    # Normal tokens are replaced by `tokenizer` (GPT-2's); keep only ids below the base.
    tok["model"]["vocab"] = {k: v for k, v in tok["model"]["vocab"].items() if v < a.base_vocab}
    for k in TOKEN_ID_FIELDS:
        v = cfg.get(k)
        if isinstance(v, int) and v >= first:
            cfg[k] = remap(v)
    cfg["vocab_size"] = a.vocab_size
    (stage / "config.json").write_text(json.dumps(cfg, indent=2))
    (stage / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    for name in ("generation_config.json", "tokenizer_config.json"):
        f = ckpt / name
        if f.exists():
            j = json.loads(f.read_text())
            for k in TOKEN_ID_FIELDS:
                v = j.get(k)
                if isinstance(v, int) and v >= first:
                    j[k] = remap(v)
                elif isinstance(v, list):
                    j[k] = [remap(x) if isinstance(x, int) and x >= first else x for x in v]
            if "added_tokens_decoder" in j:
                j["added_tokens_decoder"] = {
                    str(remap(int(k)) if int(k) >= first else k): v
                    for k, v in j["added_tokens_decoder"].items()
                }
            (stage / name).write_text(json.dumps(j, indent=2))
    for name in os.listdir(ckpt):
        if not (stage / name).exists() and not name.endswith(".safetensors") and name != "model.safetensors.index.json":
            (stage / name).write_bytes((ckpt / name).read_bytes())
    index = {"metadata": {}, "weight_map": {}}
    for shard in sorted(ckpt.glob("*.safetensors")):
        tensors = load_file(str(shard))
        for n in list(tensors):
            if n.endswith("embed_tokens.weight") or n == "lm_head.weight":
                tensors[n] = tensors[n][: a.vocab_size].contiguous()
            index["weight_map"][n] = shard.name
        save_file(tensors, str(stage / shard.name), metadata={"format": "pt"})
        del tensors
    (stage / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    stage.rename(out)
    print(f"{out}: {ckpt.name} with a {a.vocab_size}-row vocabulary, special tokens from id {a.base_vocab}")


# --------------------------------------------------------------------------- png


def cmd_png(a):
    w = h = 448
    rows = bytearray()
    for y in range(h):
        rows.append(0)  # filter: none
        for x in range(w):
            r = (x * 7 + y * 3) % 256
            g = (int(math.sin(x / 9.0) * 120.0 + 128.0) + (y % 17)) % 256
            b = (x ^ y) % 256
            rows += bytes((r, g, b))

    def chunk(kind, data):
        c = kind + data
        return struct.pack(">I", len(data)) + c + struct.pack(">I", zlib.crc32(c) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n"
    png += chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(bytes(rows), 9))
    png += chunk(b"IEND", b"")
    Path(a.out).write_bytes(png)


# --------------------------------------------------------------------------- table


def max_rss_mib(path):
    """Peak resident set size from GNU time -v, in MiB."""
    try:
        for line in Path(path).read_text().splitlines():
            if "Maximum resident set size" in line:
                return int(line.split(":")[1]) / 1024.0
    except FileNotFoundError:
        pass
    return None


def exit_ok(path):
    try:
        for line in Path(path).read_text().splitlines():
            if "Exit status:" in line:
                return int(line.split(":")[1]) == 0
    except FileNotFoundError:
        pass
    return False


def parse_llama_bench(rep_dir, stem):
    """One llama-bench run's figures (DIR/STEM.json, its exit status from DIR/STEM.time):
    prefill, decode after a filled cache and from an empty one, build, model size."""
    res = {}
    bench = rep_dir / f"{stem}.json"
    if bench.exists() and exit_ok(rep_dir / f"{stem}.time"):
        try:
            tests = json.loads(bench.read_text())
        except json.JSONDecodeError:
            return res
        for t in tests:
            # -d 0,N: each test from an empty cache and after N tokens (`n_depth`).
            depth = t.get("n_depth", 0)
            if t.get("n_gen", 0) == 0 and t.get("n_prompt", 0) > 0 and depth == 0:
                res["prefill_tok_s"] = t["avg_ts"]
                res["prompt_tokens"] = t["n_prompt"]
            elif t.get("n_prompt", 0) == 0 and t.get("n_gen", 0) > 0:
                res["decode_tok_s" if depth > 0 else "decode_empty_tok_s"] = t["avg_ts"]
                res["new_tokens"] = t["n_gen"]
            res["build"] = f"{t.get('build_commit')} (build {t.get('build_number')})"
            res["model_size_mib"] = t.get("model_size", 0) / 2**20
    return res


def parse_llama(rep_dir, q):
    res = parse_llama_bench(rep_dir, f"llama-{q}-bench")
    if res:
        res["rss_text_mib"] = max_rss_mib(rep_dir / f"llama-{q}-bench.time")
    log = rep_dir / f"llama-{q}-mtmd.log"
    if log.exists() and exit_ok(rep_dir / f"llama-{q}-mtmd.time"):
        # One line per encoded image: "mtmd batch encoding done in N ms" (llama-mtmd-cli of
        # the 0.3.36 sdist), "image slice encoded in N ms" (mtmd-helper, other versions).
        pat = r"(?:mtmd batch encoding done|image slice encoded) in (\d+) ms"
        enc = [int(m) for m in re.findall(pat, log.read_text(errors="replace"))]
        if enc:
            # The image is given twice: the first encode allocates the compute buffers;
            # the second is the warm one (medvlm also times its tower after a warm-up).
            res["vision_s"] = enc[-1] / 1e3
            res["vision_first_s"] = enc[0] / 1e3
        res["rss_vision_mib"] = max_rss_mib(rep_dir / f"llama-{q}-mtmd.time")
    return res


def parse_medvlm(rep_dir, v):
    f = rep_dir / f"medvlm-{v}.json"
    if not f.exists() or not exit_ok(rep_dir / f"medvlm-{v}.time"):
        return {}
    try:
        j = json.loads(f.read_text())
    except json.JSONDecodeError:
        return {}
    text_ms = j["prefill_ms"] - j["vision_ms"]
    return {
        "decode_tok_s": j["decode_tok_s_batch1"],
        "prefill_tok_s": j["prompt_tokens"] / (text_ms / 1e3),
        "prompt_tokens": j["prompt_tokens"],
        "vision_s": j["vision_ms"] / 1e3,
        "rss_mib": max_rss_mib(rep_dir / f"medvlm-{v}.time") or j["peak_rss_mib"],
        "dtype": j["dtype"],
    }


def decode_rounds_table(out, meta):
    """The decode-only rounds (raw/decode*/): per pair, both engines' medians and ranges,
    the ratio of the medians and how many rounds medvlm was ahead in; [] when none ran."""
    rounds = sorted(
        (p for p in (out / "raw").glob("decode*") if p.is_dir()),
        key=lambda p: int(p.name[6:]),
    )
    pairs = [p for p in meta["pairs"] if p.get("llama") and p.get("medvlm")]
    if not rounds or not pairs:
        return [], {}
    depth = meta.get("decode_depth", 0)
    lines = [
        f"Decoding alone, batch 1, {meta['llama_new_tokens']} new tokens after {depth} in the "
        f"cache: {len(rounds)} rounds, each llama.cpp (llama-bench -r 1) then medvlm (bench "
        "generate), per pair. Median (range) tok/s; ratio = medvlm's median / llama.cpp's.",
        "",
        f"| {meta.get('shape', 'Qwen2-VL-2B shape, random weights')} | llama.cpp | medvlm | "
        "ratio of medians | medvlm ahead | ratio per round |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    found = {}
    for pair in pairs:
        both = []
        for r in rounds:
            l = parse_llama_bench(r, f"llama-{pair['llama']}-decode").get("decode_tok_s")
            m = parse_medvlm(r, pair["medvlm"]).get("decode_tok_s")
            if l is not None and m is not None:
                both.append((l, m))
        found[f"{pair['llama']}/{pair['medvlm']}"] = both
        if not both:
            continue
        ls, ms = [b[0] for b in both], [b[1] for b in both]
        ratio, ahead, per_round = compare(both, higher_is_better=True)
        lines.append(
            f"| {pair['llama_label']} / {pair['medvlm']} | {fmt(ls, 1)} | {fmt(ms, 1)} | "
            f"{ratio:.2f}x | {ahead} of {len(both)} | {per_round} |"
        )
    return lines, found


def compare(both, higher_is_better):
    """(llama.cpp, medvlm) values of the same rounds -> medvlm's advantage as the ratio of
    the medians (above 1: medvlm ahead; a time or a memory figure is inverted so that this
    holds for it too), the rounds medvlm was ahead in, and each round's ratio."""
    ls, ms = [b[0] for b in both], [b[1] for b in both]
    lm, mm = statistics.median(ls), statistics.median(ms)
    ratio = mm / lm if higher_is_better else lm / mm
    ahead = sum(1 for l, m in both if (m > l if higher_is_better else m < l))
    per_round = ", ".join(f"{(m / l if higher_is_better else l / m):.2f}" for l, m in both)
    return ratio, ahead, per_round


def full_rounds_summary(reps, meta):
    """With several full rounds: per pair and figure, medvlm's advantage over the rounds
    (ratio of medians, rounds ahead; speeds as medvlm/llama.cpp, the vision tower's seconds
    and peak memory as llama.cpp/medvlm, so above 1 is medvlm ahead everywhere); [] for a
    single round, whose table says as much."""
    pairs = [p for p in meta["pairs"] if p.get("llama") and p.get("medvlm")]
    if len(reps) < 2 or not pairs:
        return []
    # (heading, llama.cpp's key, medvlm's key, higher is better)
    figures = [
        ("decode after the prompt", "decode_tok_s", "decode_tok_s", True),
        ("text prefill", "prefill_tok_s", "prefill_tok_s", True),
        ("vision tower", "vision_s", "vision_s", False),
        ("peak memory, text + vision", "rss_vision_mib", "rss_mib", False),
    ]
    lines = [
        f"Over the {len(reps)} rounds, medvlm's advantage per pair: ratio of the medians "
        "(above 1 = medvlm ahead: tok/s as medvlm/llama.cpp, seconds and memory as "
        "llama.cpp/medvlm), and the rounds medvlm was ahead in.",
        "",
        "| pair | " + " | ".join(f[0] for f in figures) + " |",
        "| --- |" + " --- |" * len(figures),
    ]
    for pair in pairs:
        runs = [(parse_llama(r, pair["llama"]), parse_medvlm(r, pair["medvlm"])) for r in reps]
        cells = []
        for _, lkey, mkey, higher in figures:
            both = [(l[lkey], m[mkey]) for l, m in runs if l.get(lkey) is not None and m.get(mkey) is not None]
            if both:
                ratio, ahead, _ = compare(both, higher)
                cells.append(f"{ratio:.2f}x ({ahead} of {len(both)})")
            else:
                cells.append("—")
        lines.append(f"| {pair['llama_label']} / {pair['medvlm']} | " + " | ".join(cells) + " |")
    return lines


def fmt(vals, digits, unit=""):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "—"
    s = lambda v: f"{v:,.{digits}f}"
    if len(vals) <= 3:
        body = ", ".join(s(v) for v in vals)
    else:
        body = f"{s(statistics.median(vals))} ({s(min(vals))}-{s(max(vals))})"
    return body + unit


def cmd_table(a):
    out = Path(a.out)
    meta = json.loads((out / "meta.json").read_text())
    reps = sorted(
        (p for p in (out / "raw").glob("rep*") if p.is_dir()),
        key=lambda p: int(p.name[3:]),
    )
    cols = []  # (label, kind, variant)
    for pair in meta["pairs"]:
        if pair.get("llama"):
            cols.append((f"llama.cpp {pair['llama_label']}", "llama", pair["llama"]))
        if pair.get("medvlm"):
            cols.append((f"medvlm {pair['medvlm']}", "medvlm", pair["medvlm"]))
    data = {}
    skipped = {}
    sk = out / "skipped.tsv"
    if sk.exists():
        for line in sk.read_text().splitlines():
            if "\t" in line:
                name, why = line.split("\t", 1)
                skipped[name] = why
    for label, kind, v in cols:
        runs = [parse_llama(r, v) if kind == "llama" else parse_medvlm(r, v) for r in reps]
        data[label] = runs

    def row(name, key, digits, unit="", kinds=("llama", "medvlm")):
        cells = []
        for label, kind, v in cols:
            if kind not in kinds:
                cells.append("—")
            elif kind == "medvlm" and v in skipped:
                cells.append("skipped")
            else:
                cells.append(fmt([r.get(key) for r in data[label]], digits, unit))
        return f"| {name} | " + " | ".join(cells) + " |"

    lines = []
    lines.append(
        f"CPU: {meta['cpu']}; {meta['threads']} threads, pinned with taskset -c {meta['cpus']}; "
        f"llama.cpp: {meta['llama_version']}; {meta['medvlm_version']}; {meta['date']}; "
        f"{len(reps)} alternating round(s), one value per round"
    )
    lines.append("")
    decode_lines, decode_runs = decode_rounds_table(out, meta)

    def emit(lines):
        text = "\n".join(lines)
        print(text)
        (out / "table.md").write_text(text + "\n")
        summary = {"meta": meta, "runs": data, "decode_rounds": decode_runs}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))

    if not reps:
        # --reps 0: the decode-only rounds alone.
        emit(lines + decode_lines)
        return
    shape = meta.get("shape", "Qwen2-VL-2B shape, random weights")
    lines.append(f"| {shape} | " + " | ".join(c[0] for c in cols) + " |")
    lines.append("| --- |" + " --- |" * len(cols))
    nt = meta["llama_new_tokens"]
    depth = meta.get("decode_depth")
    if depth:
        lines.append(
            row(f"decode, batch 1, {nt} new tokens after {depth} in the cache", "decode_tok_s", 1, " tok/s")
        )
        lines.append(
            row(f"decode, batch 1, {nt} new tokens, empty cache", "decode_empty_tok_s", 1, " tok/s", ("llama",))
        )
    else:
        # A run of this script before DECODE_DEPTH: llama-bench decoded from an empty cache
        # only, and that is the figure beside medvlm's.
        for label, kind, _ in cols:
            for r in data[label] if kind == "llama" else []:
                if "decode_empty_tok_s" in r:
                    r["decode_tok_s"] = r["decode_empty_tok_s"]
        lines.append(row(f"decode, batch 1, {nt} new tokens", "decode_tok_s", 1, " tok/s"))
    lines.append(
        row(f"text prefill, {meta['llama_prompt_tokens']}-token prompt", "prefill_tok_s", 1, " tok/s")
    )
    lines.append(row("vision tower, 448x448 (1,024 patches)", "vision_s", 2, " s"))
    lines.append(row("peak memory, text (llama-bench)", "rss_text_mib", 0, " MiB", ("llama",)))
    lines.append(row("peak memory, text + vision (mtmd-cli)", "rss_vision_mib", 0, " MiB", ("llama",)))
    lines.append(row("peak memory, whole bench process", "rss_mib", 0, " MiB", ("medvlm",)))
    lines.append("")
    lines.append(
        "llama.cpp: llama-bench -p/-n/-d (random tokens; decode after "
        f"{depth or 0} tokens in the cache, as medvlm decodes, and from an empty cache), "
        f"{meta['mmproj']} mmproj in llama-mtmd-cli for the vision tower (the image given twice, "
        "the second, warm encode reported), peak RSS by /usr/bin/time -v (mmap'd weight pages "
        "included). medvlm: bench generate --group 1 (its own random weights of the same "
        "shape; decode after its 358-token prompt, the image's 256 tokens among them; text prefill = "
        "prompt tokens / (prefill - vision tower))."
    )
    for v, why in skipped.items():
        lines.append(f"medvlm {v}: skipped ({why})")
    summary_lines = full_rounds_summary(reps, meta)
    if summary_lines:
        lines += [""] + summary_lines
    if decode_lines:
        lines += [""] + decode_lines
    emit(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenizer")
    t.add_argument("--checkpoint", required=True)
    t.add_argument("--vocab-gguf", required=True)
    t.add_argument("--out", required=True)
    v = sub.add_parser("small-vocab")
    v.add_argument("--checkpoint", required=True)
    v.add_argument("--base-vocab", type=int, required=True)
    v.add_argument("--vocab-size", type=int, required=True)
    v.add_argument("--out", required=True)
    g = sub.add_parser("png")
    g.add_argument("--out", required=True)
    s = sub.add_parser("table")
    s.add_argument("--out", required=True)
    a = p.parse_args()
    {"tokenizer": cmd_tokenizer, "small-vocab": cmd_small_vocab, "png": cmd_png, "table": cmd_table}[a.cmd](a)


if __name__ == "__main__":
    main()
