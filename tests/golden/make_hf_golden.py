#!/usr/bin/env python3
"""Tiny Hugging Face checkpoints and golden logits for undertone's HF loader.

Reference: HF `transformers` (and `safetensors`) on CPU in float32. Writes under
tests/golden/hf/:
  llama3/     LlamaForCausalLM, Llama-3.1-style rope_scaling (llama3) written in
              the pre-transformers-5 config layout (top-level rope_theta and
              rope_scaling, as published checkpoints have it), untied lm_head,
              weights stored as BF16.
  qwen2/      Qwen2ForCausalLM, q/k/v biases, tied embeddings, F32, config as
              written by transformers 5 (rope_parameters, layer_types).
  sharded/    LlamaForCausalLM (SmolLM2-like: tied, rope_theta 1e5, no scaling),
              F16, split into several shards with model.safetensors.index.json.
  dtypes.safetensors  one small tensor of every dtype, written by the reference
              `safetensors` writer, with its values in golden.json.
  golden.json  per model: hparams as transformers understood them, every
              tensor's HF name, dtype, shape, float64 sum and first values, and
              the float32 logits [T, vocab] for fixed token sequences, computed
              by transformers from the saved files (so dtype rounding is included).
Weights are random (seeded) but scaled so activations and logits are O(1)
rather than the ~0 that the default init (std 0.02) would give.
Run: python3 tests/golden/make_hf_golden.py   (needs torch, transformers, safetensors)
"""
import json
import math
import os
import shutil

import torch
import transformers
import safetensors
from safetensors.torch import save_file
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "hf")

SEQUENCES = [
    [1, 17, 200, 3, 99, 254, 0, 42],
    [5],
    [255, 128, 64, 32, 16, 8, 4, 2, 1, 0, 77, 180, 13, 250, 66, 91, 7, 120, 33, 201,
     9, 9, 9, 140, 141, 142, 60, 61, 62, 63, 230, 11],
]

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)


def g7(x):
    """float rounded to 7 significant digits (keeps the JSON small; float32 has ~7)."""
    return float(f"{x:.7g}")


def randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            r = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                v = 1.0 + 0.1 * r
            elif name.endswith(".bias"):
                v = 0.1 * r
            elif name.endswith("embed_tokens.weight"):
                v = 0.3 * r  # tied heads: keeps logits O(1)
            else:  # Linear [out, in]: unit-variance outputs
                v = r / math.sqrt(p.shape[1])
            p.copy_(v)


def tensor_summary(path_dir):
    """Every tensor of every safetensors file in a directory, by HF name."""
    from safetensors import safe_open
    out = {}
    for f in sorted(os.listdir(path_dir)):
        if not f.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(path_dir, f), framework="pt") as sf:
            for k in sf.keys():
                t = sf.get_tensor(k)
                x = t.to(torch.float64).reshape(-1)
                out[k] = {"file": f, "dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
                          "sum": float(x.sum()), "abs_sum": float(x.abs().sum()),
                          "first": [float(v) for v in x[:4]]}
    return out


def golden_for(name, path_dir):
    model = AutoModelForCausalLM.from_pretrained(path_dir, dtype=torch.float32)
    model.eval()
    cfg = model.config
    rp = dict(getattr(cfg, "rope_parameters", None) or {})
    hp = {
        "architecture": cfg.architectures[0], "n_layer": cfg.num_hidden_layers, "d_model": cfg.hidden_size,
        "n_head": cfg.num_attention_heads, "n_head_kv": cfg.num_key_value_heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        "d_ff": cfg.intermediate_size, "n_vocab": cfg.vocab_size, "train_ctx": cfg.max_position_embeddings,
        "rms_eps": cfg.rms_norm_eps, "tied_embeddings": bool(cfg.tie_word_embeddings),
        "rope_theta": rp.get("rope_theta"), "rope_type": rp.get("rope_type", "default"),
        "rope_factor": rp.get("factor"), "rope_low_freq_factor": rp.get("low_freq_factor"),
        "rope_high_freq_factor": rp.get("high_freq_factor"),
        "rope_original_ctx": rp.get("original_max_position_embeddings"),
    }
    cases = []
    with torch.no_grad():
        for seq in SEQUENCES:
            logits = model(torch.tensor([seq])).logits[0].to(torch.float32)  # [T, vocab]
            cases.append({"tokens": seq, "logits": [[g7(v) for v in row] for row in logits.tolist()]})
    return {"name": name, "dir": f"hf/{name}", "hparams": hp, "tensors": tensor_summary(path_dir),
            "cases": cases}


def make_llama3():
    d = os.path.join(OUT, "llama3")
    cfg = LlamaConfig(**COMMON, max_position_embeddings=512, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64})
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg)
    randomize(m, 11)
    m.to(torch.bfloat16).save_pretrained(d, safe_serialization=True)
    # Rewrite config.json the way Llama 3.1 on the hub has it (transformers 4.x layout).
    p = os.path.join(d, "config.json")
    c = json.load(open(p))
    rp = c.pop("rope_parameters")
    c["rope_theta"] = rp.pop("rope_theta")
    c["rope_scaling"] = rp
    c.pop("head_dim", None)  # also exercise head_dim = hidden_size / heads
    json.dump(c, open(p, "w"), indent=2, sort_keys=True)
    # Check that transformers reads the rewritten config as intended.
    back = LlamaConfig.from_pretrained(d)
    assert back.rope_parameters["rope_type"] == "llama3" and back.rope_parameters["factor"] == 8.0, back
    assert back.rope_parameters["original_max_position_embeddings"] == 64
    g = golden_for("llama3", d)
    # The golden must be sensitive to the llama3 frequency scaling: the same
    # weights with plain RoPE give visibly different logits on the long sequence.
    plain = LlamaConfig.from_pretrained(d)
    plain.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    m2 = AutoModelForCausalLM.from_pretrained(d, config=plain, dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (m2(torch.tensor([SEQUENCES[2]])).logits[0] - torch.tensor(g["cases"][2]["logits"])).abs().max()
    assert diff > 0.05, f"llama3 scaling changes logits by only {diff}"
    print(f"llama3: plain RoPE would change logits by up to {float(diff):.3f}")
    return g


def make_qwen2():
    d = os.path.join(OUT, "qwen2")
    cfg = Qwen2Config(**COMMON, max_position_embeddings=1024, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    torch.manual_seed(0)
    m = Qwen2ForCausalLM(cfg)
    randomize(m, 22)
    m.tie_weights()
    m.save_pretrained(d, safe_serialization=True)
    return golden_for("qwen2", d)


def make_sharded():
    d = os.path.join(OUT, "sharded")
    cfg = LlamaConfig(**dict(COMMON, num_hidden_layers=3), max_position_embeddings=2048, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg)
    randomize(m, 33)
    m.tie_weights()
    m.to(torch.float16).save_pretrained(d, safe_serialization=True, max_shard_size="60KB")
    shards = [f for f in os.listdir(d) if f.endswith(".safetensors")]
    assert len(shards) >= 3 and os.path.exists(os.path.join(d, "model.safetensors.index.json")), shards
    return golden_for("sharded", d)


def make_dtypes():
    gen = torch.Generator().manual_seed(44)
    f = torch.randn(2, 3, generator=gen) * 10
    t = {
        "f64": f.to(torch.float64) / 3,
        "f32": f,
        "f16": f.to(torch.float16),
        "bf16": f.to(torch.bfloat16),
        "i64": torch.tensor([-(2**40), -1, 0, 1, 2**40], dtype=torch.int64),
        "i32": torch.tensor([[-(2**31), 7], [2**31 - 1, -7]], dtype=torch.int32),
        "i16": torch.tensor([-32768, 12, 32767], dtype=torch.int16),
        "i8": torch.tensor([-128, -1, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 1, 200, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5, dtype=torch.float32),
        "empty": torch.zeros(0, 3, dtype=torch.float32),
    }
    path = os.path.join(OUT, "dtypes.safetensors")
    save_file(t, path, metadata={"source": "make_hf_golden.py", "note": "one tensor per dtype"})
    return {"file": "hf/dtypes.safetensors", "metadata": {"source": "make_hf_golden.py", "note": "one tensor per dtype"},
            "tensors": {k: {"dtype": {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                                      "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
                                      "bool": "BOOL"}[str(v.dtype).replace("torch.", "")],
                            "shape": list(v.shape),
                            "values": [float(x) for x in v.to(torch.float64).reshape(-1).tolist()]}
                        for k, v in t.items()}}


def main():
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    golden = {"source": f"transformers {transformers.__version__}, torch {torch.__version__}, "
                        f"safetensors {safetensors.__version__}",
              "models": [make_llama3(), make_qwen2(), make_sharded()],
              "dtypes": make_dtypes()}
    with open(os.path.join(OUT, "golden.json"), "w") as f:
        json.dump(golden, f, separators=(",", ":"))
    for r, _, ns in os.walk(OUT):
        for n in ns:
            os.chmod(os.path.join(r, n), 0o644)
    total = sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(OUT) for n in ns)
    print(f"wrote {OUT}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
