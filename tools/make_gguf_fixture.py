"""GGUF files of the tiny fixtures, made by llama.cpp's own converter (`convert_hf_to_gguf.py`
from a llama.cpp source tree, e.g. the one in the llama-cpp-python sdist on PyPI), as a
llama.cpp or Ollama user has them: a text model file plus an `mmproj` file for the vision
tower. `medvlm import-gguf` is tested on them (tests/suite/gguf.rs).

Writes tests/fixtures/gguf/:
- tiny-a-f32.gguf + mmproj-tiny-a-f32.gguf, tiny-25a-f32.gguf + mmproj-tiny-25a-f32.gguf:
  every tensor f32, so the imported model must give transformers' numbers (the cases of
  tests/fixtures/cases-tiny-a.json / cases-tiny-25a.json).
- tiny-k-q4_k_m.gguf + mmproj-tiny-k-f16.gguf: the decoder in llama.cpp's Q4_K_M mix
  (`llama_tensor_get_type` in src/llama-quant.cpp: the tied embedding table / output and the
  attn_v and ffn_down of its "more bits" layers in Q6_K, every other matrix in Q4_K, norms
  and biases f32), quantized by ggml's own C quantizers (`quantize_row_q4_K_ref`,
  `quantize_row_q6_K_ref`, what `llama-quantize` calls without an importance matrix); the
  vision tower in f16 (the converter's default for an mmproj).
- tiny-25a-q8_0.gguf + mmproj-tiny-25a-q4_1.gguf: the converter's own `--outtype q8_0`, and
  the vision tower's matrices in Q4_1 (gguf-py's numpy quantizer).
- tiny-c-q8_0.gguf + mmproj-tiny-c-f16.gguf: an untied Qwen2-VL (transformers 5 layout), whose Q8_0 embedding table
  is not a linear layer's matrix.

Four things the converter cannot do for models this small are patched in, nothing else:
the tiny tokenizers use Qwen2's pre-tokenizer but their vocabularies are not Qwen2's, so the
converter's hash of a test string does not recognise them (it is told "qwen2" after the
pre-tokenizer's regex is checked to be Qwen2's); its tensor-name map for the vision tower is
built for as many blocks as the tower has, and the merger's `mlp.2` needs at least 3; and it
cannot write k-quants (the Q4_K_M mix is chosen per tensor and ggml's C quantizes); and it
does not write a Qwen2.5-VL's attention window, which llama.cpp then takes to be 112 pixels,
the released models' (tiny-25a's is 56, so its mmproj gets `clip.vision.window_size`, the
key llama.cpp reads).

    python3 -m venv /tmp/ref5 && /tmp/ref5/bin/pip install -r tools/requirements-v5.txt
    LLAMA_CPP_SRC=/path/to/llama.cpp /tmp/ref5/bin/python tools/make_gguf_fixture.py
    # the same Q4_K_M + f16 mmproj pair of any Qwen2-VL checkpoint directory:
    LLAMA_CPP_SRC=... /tmp/ref5/bin/python tools/make_gguf_fixture.py --pair DIR OUT
"""

import ctypes
import json
import os
import shutil
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def main() -> None:
    src = os.environ.get("LLAMA_CPP_SRC")
    if not src:
        sys.exit("set LLAMA_CPP_SRC to a llama.cpp source tree")
    sys.path.insert(0, os.path.join(src, "gguf-py"))
    sys.path.insert(0, src)
    import gguf
    import convert_hf_to_gguf
    from conversion import base

    sys.path.insert(0, HERE)
    from make_kquant_fixture import compile_ggml

    tmp = tempfile.mkdtemp()
    ggml = compile_ggml(src, tmp)
    T = gguf.GGMLQuantizationType

    # k-quants through ggml's C: rows are whole super-blocks, so the whole tensor is one call.
    c_quantizers = {T.Q4_K: (ggml.q4k, 144), T.Q6_K: (ggml.q6k, 210)}
    numpy_quantize = gguf.quants.quantize

    def quantize(data, qtype):
        if qtype not in c_quantizers:
            return numpy_quantize(data, qtype)
        fn, size = c_quantizers[qtype]
        if isinstance(data, gguf.lazy.LazyNumpyTensor):
            # A lazy tensor's array is its zero-filled stand-in: evaluate it first.
            data = gguf.lazy.LazyNumpyTensor.to_eager(data)
        x = np.ascontiguousarray(data, dtype=np.float32)
        assert x.shape[-1] % 256 == 0
        out = np.zeros(x.shape[:-1] + (x.shape[-1] // 256 * size,), dtype=np.uint8)
        fn(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
        return out

    gguf.quants.quantize = quantize

    def vocab_pre(self, tokenizer):
        with open(os.path.join(self.dir_model, "tokenizer.json")) as f:
            pre = json.load(f)["pre_tokenizer"]
        regex = pre["pretokenizers"][0]["pattern"]["Regex"]
        assert regex == QWEN2_SPLIT, "not Qwen2's pre-tokenizer"
        return "qwen2"

    base.TextModel.get_vocab_base_pre = vocab_pre

    mmproj_init = base.MmprojModel.__init__

    def init(self, *args, **kwargs):
        mmproj_init(self, *args, **kwargs)
        self.tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, max(self.block_count, 3))

    base.MmprojModel.__init__ = init

    # llama.cpp reads a Qwen2.5-VL window from `clip.vision.window_size` and takes 112 (the
    # released models') without it; the converter does not write it, and tiny-25a's is 56.
    from conversion import qwenvl
    vision_params = qwenvl.Qwen2VLVisionModel.set_gguf_parameters

    def set_params(self):
        vision_params(self)
        if "window_size" in self.hparams_vision:
            self.gguf_writer.add_vision_window_size(self.hparams_vision["window_size"])

    qwenvl.Qwen2VLVisionModel.set_gguf_parameters = set_params

    # Per-tensor types: None leaves the converter's choice.
    mix = {"rule": None}
    force = base.ModelBase.tensor_force_quant

    def force_quant(self, name, new_name, bid, n_dims):
        rule = mix["rule"]
        if rule is None or n_dims < 2 or not new_name.endswith(".weight"):
            return force(self, name, new_name, bid, n_dims)
        return rule(self, new_name, bid)

    base.ModelBase.tensor_force_quant = force_quant

    def q4_k_m(model, new_name, bid):
        n = model.block_count
        more_bits = bid is not None and (bid < n // 8 or bid >= 7 * n // 8 or (bid - n // 8) % 3 == 2)
        if new_name.startswith(("output.", "token_embd.")):
            return T.Q6_K
        if (".attn_v." in new_name or ".ffn_down." in new_name) and more_bits:
            return T.Q6_K
        return T.Q4_K

    def q4_1(model, new_name, bid):
        return T.Q4_1

    out = os.path.join(FIXTURES, "gguf")
    os.makedirs(out, exist_ok=True)

    def source(model):
        # Released Qwen2-VL configs name the architecture at the top level, where the
        # converter looks for an mmproj; tiny-a's (saved by transformers 4.57) has it only in
        # text_config, so a copy gets it added.
        src_dir = os.path.join(FIXTURES, model)
        with open(os.path.join(src_dir, "config.json")) as f:
            if json.load(f).get("architectures"):
                return src_dir
        d = os.path.join(tmp, model)
        if not os.path.isdir(d):
            shutil.copytree(src_dir, d)
            with open(os.path.join(d, "config.json")) as f:
                cfg = json.load(f)
            if not cfg.get("architectures"):
                cfg["architectures"] = cfg["text_config"]["architectures"]
                with open(os.path.join(d, "config.json"), "w") as f:
                    json.dump(cfg, f, indent=2)
        return d

    def convert(model, outtype, outfile, mmproj=False, rule=None):
        mix["rule"] = rule
        argv = [source(model), "--outtype", outtype, "--outfile", os.path.join(out, outfile)]
        if mmproj:
            argv.append("--mmproj")
        sys.argv = ["convert_hf_to_gguf.py"] + argv
        convert_hf_to_gguf.main()

    if len(sys.argv) == 4 and sys.argv[1] == "--pair":
        # Any Qwen2-VL checkpoint DIR as a Q4_K_M text file and an f16 mmproj in OUT (the
        # 2B-shape check of the README), made as the fixtures are.
        model, dest = os.path.abspath(sys.argv[2]), sys.argv[3]
        out = dest
        os.makedirs(out, exist_ok=True)
        name = os.path.basename(model.rstrip("/"))
        convert(model, "f16", f"{name}-q4_k_m.gguf", rule=q4_k_m)
        convert(model, "f16", f"mmproj-{name}-f16.gguf", mmproj=True)
        return
    for m in ["tiny-a", "tiny-25a"]:
        convert(m, "f32", f"{m}-f32.gguf")
        convert(m, "f32", f"mmproj-{m}-f32.gguf", mmproj=True)
    # The converter's type is overridden per tensor, so its outtype only names the file type.
    convert("tiny-k", "f16", "tiny-k-q4_k_m.gguf", rule=q4_k_m)
    convert("tiny-k", "f16", "mmproj-tiny-k-f16.gguf", mmproj=True)
    convert("tiny-25a", "q8_0", "tiny-25a-q8_0.gguf")
    convert("tiny-25a", "f16", "mmproj-tiny-25a-q4_1.gguf", mmproj=True, rule=q4_1)
    # Untied (transformers 5 layout): a quantized embedding table that is no linear layer.
    convert("tiny-c", "q8_0", "tiny-c-q8_0.gguf")
    convert("tiny-c", "f16", "mmproj-tiny-c-f16.gguf", mmproj=True)


if __name__ == "__main__":
    main()
