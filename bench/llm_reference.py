#!/usr/bin/env python3
"""llama.cpp reference numbers for bench/llm (same GGUF, same thread count).

Uses llama-cpp-python's low-level API so that B sequences decode in ONE
llama_decode call per step (llama.cpp's own continuous batching), exactly the
workload bench/llm measures for undertone. Prints one JSON object per batch size:
{"engine": "llama.cpp", "batch": B, "prefill_tok_s": ..., "decode_tok_s": ..., ...}

Workload per batch size B: prefill B prompts of P tokens (one call per prompt,
B*P tokens total), then N decode steps, each one batched step of B rows (greedy
argmax on the returned logits, as a server would). Timings: median of --repeats.
"""
import argparse
import ctypes
import json
import os
import statistics
import sys
import time

import numpy as np
import llama_cpp as L


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    home = os.environ.get("UNDERTONE_HOME") or os.path.expanduser("~/.cache/undertone")
    ap.add_argument("--model", default=os.path.join(home, "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    L.llama_backend_init()
    _quiet = L.llama_log_callback(lambda level, text, data: None)  # keep a reference: ctypes callback
    L.llama_log_set(_quiet, ctypes.c_void_p())
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(args.model.encode(), mp)
    if not model:
        sys.exit(f"cannot load {args.model}")
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)

    for B in args.batch:
        cp = L.llama_context_default_params()
        cp.n_ctx = B * (args.prompt_tokens + args.decode_tokens + 8)
        cp.n_batch = max(args.prompt_tokens, B)
        cp.n_ubatch = max(args.prompt_tokens, B)
        cp.n_seq_max = B
        cp.n_threads = args.threads
        cp.n_threads_batch = args.threads
        ctx = L.llama_init_from_model(model, cp)
        batch = L.llama_batch_init(max(args.prompt_tokens, B), 0, B)
        prefill_s, decode_s = [], []
        rng = np.random.default_rng(0)
        for rep in range(args.repeats):
            L.llama_memory_clear(L.llama_get_memory(ctx), True)
            prompts = rng.integers(100, n_vocab - 100, size=(B, args.prompt_tokens))
            t0 = time.perf_counter()
            last = []
            for s in range(B):
                batch.n_tokens = args.prompt_tokens
                for i in range(args.prompt_tokens):
                    batch.token[i] = int(prompts[s, i])
                    batch.pos[i] = i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = s
                    batch.logits[i] = i == args.prompt_tokens - 1
                if L.llama_decode(ctx, batch) != 0:
                    sys.exit("llama_decode failed (prefill)")
                lp = L.llama_get_logits_ith(ctx, args.prompt_tokens - 1)
                last.append(int(np.argmax(np.ctypeslib.as_array(lp, shape=(n_vocab,)))))
            t1 = time.perf_counter()
            for step in range(args.decode_tokens):
                batch.n_tokens = B
                for s in range(B):
                    batch.token[s] = last[s]
                    batch.pos[s] = args.prompt_tokens + step
                    batch.n_seq_id[s] = 1
                    batch.seq_id[s][0] = s
                    batch.logits[s] = True
                if L.llama_decode(ctx, batch) != 0:
                    sys.exit("llama_decode failed (decode)")
                for s in range(B):
                    lp = L.llama_get_logits_ith(ctx, s)
                    last[s] = int(np.argmax(np.ctypeslib.as_array(lp, shape=(n_vocab,))))
            t2 = time.perf_counter()
            prefill_s.append(t1 - t0)
            decode_s.append(t2 - t1)
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        p, d = statistics.median(prefill_s), statistics.median(decode_s)
        print(json.dumps({"engine": "llama.cpp", "dtype": "q4_1", "batch": B, "threads": args.threads,
                          "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens,
                          "prefill_tok_s": round(B * args.prompt_tokens / p, 1),
                          "decode_tok_s": round(B * args.decode_tokens / d, 1),
                          "decode_ms_per_step": round(1000 * d / args.decode_tokens, 2)}), flush=True)
    L.llama_model_free(model)


if __name__ == "__main__":
    main()
