"""Reference k-quants for medvlm's q4_k weights: ggml's own C quantizer
(`quantize_row_q4_K_ref`, and `quantize_row_q6_K_ref`), compiled from a llama.cpp source
tree, applied to a small weight with the cases that matter (an all-zero super-block, a
constant sub-block, outliers, one sign only, tiny and huge magnitudes side by side), and
the blocks dequantized by gguf-py's numpy (an implementation independent of both ggml's C
and medvlm's Rust).

gguf-py has no numpy quantizer for the k-quants, hence the C. It is compiled with
`-ffp-contract=off`: the C as written, no fused multiply-adds. (A llama.cpp build for a CPU
with FMA may contract some of the quantizer's float steps and, rarely, round a scale
differently; this fixture pins the algorithm as written.)

Writes tests/fixtures/quant/ggml-kquants.safetensors: `weight` (n x k, f32), and for each
format `<format>.blocks` (u8, ggml's block bytes, row by row) and `<format>.dequantized`
(n x k, f32, gguf-py's dequantization of those blocks).

    python3 -m venv /tmp/gg && /tmp/gg/bin/pip install gguf==0.19.0 numpy
    LLAMA_CPP_SRC=/path/to/llama.cpp /tmp/gg/bin/python tools/make_kquant_fixture.py
"""

import ctypes
import os
import subprocess
import tempfile

import numpy as np
from gguf import quants, GGMLQuantizationType

from make_quant_fixture import save

N, K = 20, 512

HARNESS = r"""
#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
#include <stddef.h>
void quantize_row_q4_K_ref(const float * x, void * y, int64_t k);
void quantize_row_q6_K_ref(const float * x, void * y, int64_t k);
void q4k(const float *x, void *y, int64_t k) { quantize_row_q4_K_ref(x, y, k); }
void q6k(const float *x, void *y, int64_t k) { quantize_row_q6_K_ref(x, y, k); }
/* ggml-quants.c references these from code paths the two quantizers never take. */
void ggml_abort(const char *file, int line, const char *fmt, ...) { fprintf(stderr, "%s:%d\n", file, line); abort(); }
size_t ggml_row_size(int t, int64_t n) { abort(); }
const char * ggml_type_name(int t) { abort(); }
size_t ggml_type_size(int t) { abort(); }
"""


def weight() -> np.ndarray:
    rng = np.random.default_rng(7)
    w = rng.standard_normal((N, K)).astype(np.float32) * np.linspace(0.01, 3.0, N, dtype=np.float32)[:, None]
    w[0, :256] = 0.0                       # an all-zero super-block
    w[1, 32:64] = 0.75                     # a constant sub-block
    w[1, 256 + 64:256 + 96] = -0.5         # a negative constant sub-block
    w[2, 5] = 40.0                         # an outlier
    w[2, 300] = -55.0
    w[3, :] = -np.abs(w[3, :])             # one sign only (all minima)
    w[4, :] = np.abs(w[4, :]) + 1.0        # all positive: minimum clipped to 0
    w[5, :256] *= np.repeat(np.float32(10.0) ** np.arange(-4, 4, dtype=np.float32), 32)  # sub-blocks of very different scales
    w[6, :] = rng.integers(-8, 8, K).astype(np.float32) * 0.125  # exact grid values
    w[7, :32] = 0.0                        # one zero sub-block among others
    return w


def compile_ggml(src: str, out: str) -> ctypes.CDLL:
    ggml = os.path.join(src, "ggml")
    harness = os.path.join(out, "harness.c")
    with open(harness, "w") as f:
        f.write(HARNESS)
    lib = os.path.join(out, "libkq.so")
    subprocess.run(["cc", "-O2", "-ffp-contract=off", "-fPIC", "-shared",
                    f"-I{ggml}/include", f"-I{ggml}/src", "-o", lib,
                    f"{ggml}/src/ggml-quants.c", harness, "-lm"], check=True)
    return ctypes.CDLL(lib)


def main() -> None:
    src = os.environ.get("LLAMA_CPP_SRC")
    if not src:
        raise SystemExit("set LLAMA_CPP_SRC to a llama.cpp source tree (the one in llama-cpp-python's sdist will do)")
    w = weight()
    tensors = {"weight": w}
    with tempfile.TemporaryDirectory() as tmp:
        lib = compile_ggml(src, tmp)
        for name, fn, qt in (("q4_k", lib.q4k, GGMLQuantizationType.Q4_K), ("q6_k", lib.q6k, GGMLQuantizationType.Q6_K)):
            block_size, type_size = quants.GGML_QUANT_SIZES[qt]
            row_bytes = K // block_size * type_size
            blocks = np.zeros((N, row_bytes), dtype=np.uint8)
            for r in range(N):
                row = np.ascontiguousarray(w[r])
                fn(row.ctypes.data_as(ctypes.c_void_p), blocks[r].ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(K))
            tensors[f"{name}.blocks"] = blocks.reshape(-1)
            tensors[f"{name}.dequantized"] = quants.dequantize(blocks, qt).astype(np.float32).reshape(N, K)
    save(tensors, os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "quant", "ggml-kquants.safetensors"))


if __name__ == "__main__":
    main()
