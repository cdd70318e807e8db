"""Reference quantization for medvlm's q8_0 / q4_1 weights: gguf-py's numpy Q8_0 and Q4_1
(bit-exact with ggml-quants.c's reference quantizers, as gguf-py states), applied to a small
weight with the cases that matter (an all-zero group, a constant group, outliers, ties at
half a step, both signs), and dequantized by gguf-py.

Writes tests/fixtures/quant/gguf-py.safetensors: `weight` (n x k, f32), and for each format
`<format>.dequantized` (n x k, f32) and `<format>.blocks` (u8, ggml's block bytes, row by
row). The Rust test quantizes `weight` itself and compares.

    python3 -m venv /tmp/gg && /tmp/gg/bin/pip install gguf==0.19.0 numpy
    /tmp/gg/bin/python tools/make_quant_fixture.py
"""

import json
import os
import struct

import numpy as np
from gguf import quants, GGMLQuantizationType

N, K = 20, 96


def weight() -> np.ndarray:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((N, K)).astype(np.float32) * np.linspace(0.01, 3.0, N, dtype=np.float32)[:, None]
    w[0, :32] = 0.0                      # an all-zero group
    w[1, 32:64] = 0.75                   # a constant group
    w[2, 5] = 40.0                       # an outlier
    w[3, 64:96] = -w[3, 64:96] ** 2      # one sign only
    # values on exact half steps of q8_0's scale (127 / amax = 1): round half away from zero
    w[4, :32] = np.arange(32, dtype=np.float32) - 15.5
    w[4, 31] = 127.0
    w[5, :] = rng.integers(-8, 8, K).astype(np.float32) * 0.125
    return w


def save(tensors: dict, out: str) -> None:
    """Writes f32 / u8 numpy arrays as a safetensors file (no torch needed)."""
    os.makedirs(os.path.dirname(out), exist_ok=True)
    header, data, off = {}, b"", 0
    for k in sorted(tensors):
        a = np.ascontiguousarray(tensors[k])
        raw = a.tobytes()
        header[k] = {"dtype": {np.float32: "F32", np.uint8: "U8"}[a.dtype.type], "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        data += raw
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)
    print(out, off, "bytes")


def main() -> None:
    w = weight()
    tensors = {"weight": w}
    for name, qt in (("q8_0", GGMLQuantizationType.Q8_0), ("q4_1", GGMLQuantizationType.Q4_1)):
        blocks = quants.quantize(w, qt)
        tensors[f"{name}.blocks"] = np.ascontiguousarray(blocks).reshape(-1).view(np.uint8)
        tensors[f"{name}.dequantized"] = quants.dequantize(blocks, qt).astype(np.float32).reshape(N, K)
    save(tensors, os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "quant", "gguf-py.safetensors"))


if __name__ == "__main__":
    main()
