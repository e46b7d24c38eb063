#!/usr/bin/env python3
"""Golden values for undertone's GGUF reader and dequantizers.

Reference: the `gguf` package (gguf-py, maintained in the llama.cpp repository),
which has its own numpy dequantizers. Writes tests/golden/gguf_golden.json with
 - metadata of the pinned SmolLM2 GGUF,
 - for several real tensors: shape, type, sum, sum of |x|, and values at fixed
   indices after dequantization,
 - for every block type undertone supports: random blocks (fixed seed, valid
   fp16 scales) as hex and their dequantized values.
Run: python3 tests/golden/make_gguf_golden.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
"""
import json
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

HERE = os.path.dirname(os.path.abspath(__file__))
home = os.environ.get("UNDERTONE_HOME") or os.path.expanduser("~/.cache/undertone")
path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    home, "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")

r = gguf.GGUFReader(path)
out = {"source": "gguf-py " + getattr(gguf, "__version__", "?"), "file": os.path.basename(path)}


def field(name):
    f = r.fields[name]
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v.tolist()[0]


out["metadata"] = {k: field(k) for k in [
    "general.architecture", "llama.block_count", "llama.embedding_length", "llama.feed_forward_length",
    "llama.attention.head_count", "llama.attention.head_count_kv", "llama.context_length",
    "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "tokenizer.ggml.model",
    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"]}
out["tensor_count"] = len(r.tensors)
out["n_tokens"] = len(r.fields["tokenizer.ggml.tokens"].data)
out["n_merges"] = len(r.fields["tokenizer.ggml.merges"].data)

rng = np.random.default_rng(1234)
tensors = []
for name in ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.29.ffn_down.weight",
             "blk.0.attn_norm.weight", "output_norm.weight"]:
    t = next(t for t in r.tensors if t.name == name)
    x = dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1)
    idx = sorted(set([0, 1, 31, 32, len(x) - 1] + rng.integers(0, len(x), 27).tolist()))
    tensors.append({
        "name": name, "type": t.tensor_type.name.lower(), "shape": [int(d) for d in t.shape],
        "sum": float(x.sum()), "abs_sum": float(np.abs(x).sum()),
        "index": [int(i) for i in idx], "values": [float(x[i]) for i in idx]})
out["tensors"] = tensors

blocks = []
for qt in [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.F16, T.BF16]:
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qt]
    nb = 3 if block_elems > 1 else 64
    raw = rng.integers(0, 256, size=nb * block_bytes, dtype=np.uint8)
    raw2 = raw.reshape(nb, block_bytes)
    def put_f16(off):
        raw2[:, off:off + 2] = np.frombuffer(
            rng.uniform(-0.1, 0.1, nb).astype(np.float16).tobytes(), dtype=np.uint8).reshape(nb, 2)
    if qt in (T.Q4_0, T.Q5_0, T.Q8_0):
        put_f16(0)
    elif qt in (T.Q4_1, T.Q5_1, T.Q4_K, T.Q5_K):
        put_f16(0); put_f16(2)
    elif qt == T.Q6_K:
        put_f16(block_bytes - 2)
    elif qt == T.F16:
        raw = np.frombuffer(rng.uniform(-4, 4, nb).astype(np.float16).tobytes(), dtype=np.uint8).copy()
    elif qt == T.BF16:
        f = rng.uniform(-4, 4, nb).astype(np.float32)
        raw = np.frombuffer((f.view(np.uint32) >> 16).astype(np.uint16).tobytes(), dtype=np.uint8).copy()
    raw = raw.reshape(-1)
    n_elems = nb * block_elems
    vals = dequantize(raw, qt).astype(np.float64).reshape(-1)
    assert len(vals) == n_elems
    blocks.append({"type": qt.name.lower(), "ggml_type": int(qt), "n": n_elems, "hex": raw.tobytes().hex(),
                   "values": [float(v) for v in vals]})
out["blocks"] = blocks

with open(os.path.join(HERE, "gguf_golden.json"), "w") as f:
    json.dump(out, f, indent=1)
print("wrote", os.path.join(HERE, "gguf_golden.json"), os.path.getsize(os.path.join(HERE, "gguf_golden.json")), "bytes")
