#!/usr/bin/env python3
"""Golden values for undertone's LLM forward pass (models/nn/llama.cpp).

Reference: llama.cpp through PyPI llama-cpp-python, run twice:
 - "q4_1": on the pinned GGUF (SmolLM2-135M-Instruct Q4_1) as llama.cpp serves
   it (quantized dot products),
 - "f32": on an F32 GGUF made here from the same file (every tensor
   dequantized by gguf-py, metadata copied), so llama.cpp computes in fp32 with
   exactly the weights undertone uses; this pins the forward pass (including
   the q/k row permutation) to a tight tolerance.
Both with an F32 KV cache. Writes tests/golden/llm_golden.json with, for each
reference and prompt:
 - `tokens`: llama.cpp's token ids (special tokens parsed, no BOS: the model's
   add_bos_token is false),
 - `topk`: at every prompt position, the k largest logits and their token ids
   (llama.cpp's own logits, prompt evaluated in one batch),
 - `greedy`: 64 tokens of greedy continuation (argmax of the logits, no
   repetition penalty, no sampler), with `greedy_margin`: llama.cpp's gap
   between its top-1 and top-2 logits at each generated step and
   `greedy_topk` (the top-k at each generated step).

llama.cpp computes with the Q4_1/Q8_0 weights as stored and quantizes the
activations (q8_1/q8_0) for its dot products, whereas undertone dequantizes the
weights to fp32 and computes in fp32; logits therefore differ slightly. The
tolerance used by tests/test_llama.cpp is documented there.
Run: python3 tests/golden/make_llm_golden.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
"""
import json
import os
import sys

import tempfile

import numpy as np
import gguf
from gguf.quants import dequantize
import llama_cpp
import llama_cpp.llama_cpp as llama_cpp_c
from llama_cpp import Llama

# ggml's AMX "extra buffer type" executes AMX tile instructions that this
# sandbox's kernel does not enable (SIGILL at tilezero); the plain CPU buffer
# runs the same Q4_1 x q8_1 dot products with AVX2/AVX-512.
_default_params = llama_cpp_c.llama_model_default_params


def _params_without_extra_bufts():
    p = _default_params()
    p.use_extra_bufts = False
    return p


llama_cpp_c.llama_model_default_params = _params_without_extra_bufts

HERE = os.path.dirname(os.path.abspath(__file__))
home = os.environ.get("UNDERTONE_HOME") or os.path.expanduser("~/.cache/undertone")
path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    home, "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
TOPK = 10
N_GREEDY = 64

LONG = (
    "The history of the bicycle is a story of many small inventions. In 1817 Karl Drais built a "
    "wooden running machine that riders pushed along with their feet. Decades later, pedals were "
    "attached to the front wheel, and the high-wheeler appeared, fast but dangerous. The safety "
    "bicycle of the 1880s, with two wheels of equal size and a chain driving the rear wheel, made "
    "cycling popular with ordinary people. Pneumatic tyres, invented by John Boyd Dunlop, made the "
    "ride far more comfortable. Bicycles changed how people lived: women gained a new freedom of "
    "movement, workers could live farther from factories, and road associations lobbied for "
    "better paved streets, which later served the automobile. Today there are more than a billion "
    "bicycles in the world, and many cities build protected lanes to encourage people to ride. "
    "In summary, the three most important inventions in the history of the bicycle were")

PROMPTS = [
    "The capital of France is",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the boiling point of water at sea level?<|im_end|>\n<|im_start|>assistant\n",
    LONG,
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea,",
    "Translate to French: I am very happy today because",
]


def topk(row):
    idx = np.argsort(-row, kind="stable")[:TOPK]
    return [int(i) for i in idx], [float(row[i]) for i in idx]


def write_f32_gguf(src, dst):
    """Copies `src` to `dst` with every tensor dequantized to F32."""
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch=arch)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        val = f.contents()
        if f.name == "general.file_type":
            val = 0  # ALL_F32
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, val, vtype, sub_type=sub)
    for t in r.tensors:
        x = dequantize(t.data, t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, x.reshape([int(d) for d in reversed(t.shape)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def run(model_path):
    # type_k/type_v 0 = GGML_TYPE_F32: no fp16 rounding of the KV cache.
    llm = Llama(model_path=model_path, n_ctx=512, n_batch=512, logits_all=True, n_threads=2, seed=1234,
                type_k=0, type_v=0, verbose=False)
    prompts = []
    for text in PROMPTS:
        toks = llm.tokenize(text.encode(), add_bos=False, special=True)
        llm.reset()
        llm.eval(toks)
        scores = np.array(llm.scores[:len(toks)], dtype=np.float32)
        p = {"text": text, "tokens": toks, "topk_ids": [], "topk_logits": []}
        for row in scores:
            i, v = topk(row)
            p["topk_ids"].append(i)
            p["topk_logits"].append(v)
        greedy, margins, g_ids, g_logits = [], [], [], []
        last = scores[-1]
        for _ in range(N_GREEDY):
            i, v = topk(last)
            greedy.append(i[0])
            margins.append(v[0] - v[1])
            g_ids.append(i)
            g_logits.append(v)
            llm.eval([i[0]])
            last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        p.update({"greedy": greedy, "greedy_margin": margins, "greedy_topk_ids": g_ids,
                  "greedy_topk_logits": g_logits})
        print(f"{len(toks):4d} tokens  greedy: {llm.detokenize(greedy).decode(errors='replace')!r}"[:200])
        prompts.append(p)
    return prompts


def main():
    out = {"source": "llama-cpp-python " + llama_cpp.__version__, "file": os.path.basename(path),
           "k": TOPK, "n_greedy": N_GREEDY}
    out["q4_1"] = run(path)
    with tempfile.TemporaryDirectory() as tmp:
        f32 = os.path.join(tmp, "f32.gguf")
        write_f32_gguf(path, f32)
        out["f32"] = run(f32)
    dst = os.path.join(HERE, "llm_golden.json")
    with open(dst, "w") as f:
        json.dump(out, f, separators=(",", ":"))
    print("wrote", dst, os.path.getsize(dst), "bytes")


if __name__ == "__main__":
    main()
