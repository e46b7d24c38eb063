#!/usr/bin/env python3
"""Golden data for undertone's Whisper encoder (models/nn/whisper_encoder.*).

Independent references:
  * CTranslate2 (PyPI `ctranslate2`) running the pinned whisper-tiny.en model
    ($UNDERTONE_HOME/models/whisper-tiny.en, fp16 weights, computed in fp32 on
    CPU) on the log-mel features of a real RAVDESS clip computed by HF
    `transformers`' WhisperFeatureExtractor (80 bins, 30 s = 3000 frames).
  * HF `transformers` WhisperForConditionalGeneration, a tiny random model with
    128 mel bins (large-v3 layout) saved with save_pretrained in F16, run on
    128-bin features of the same clip (400 frames).

Writes
  tests/golden/encoder_golden.safetensors   (F32 unless noted)
    ct2.features      [n_keep, 80]  feature frames 0..n_keep-1 (frames x mels);
                      frames n_keep..2999 all equal ct2.pad_value (asserted here)
    ct2.pad_value     [1]
    ct2.output_head   [n_head, 384] CT2 encoder output rows 0..n_head-1
    ct2.output_tail_rows [m] I64    indices of further rows (every 20th)
    ct2.output_tail   [m, 384]      those rows
    hf.features       [400, 128] F16 (the reference ran on exactly these values)
    hf.output         [200, 32]     transformers' encoder last_hidden_state
  tests/golden/encoder_golden_hf/{config.json, model.safetensors} the tiny model
Run: python3 tests/golden/make_encoder_golden.py
     (needs ctranslate2, transformers, torch, safetensors, soundfile, numpy)
"""
import json
import os
import shutil

import ctranslate2
import numpy as np
import soundfile as sf
import torch
from safetensors.numpy import save_file
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

HERE = os.path.dirname(os.path.abspath(__file__))
HOME = os.environ.get("UNDERTONE_HOME", os.path.expanduser("~/.cache/undertone"))
CT2_DIR = os.path.join(HOME, "models", "whisper-tiny.en")
CLIP = "/work/shared/data/ravdess-train/03-01-05-01-02-01-01.flac"  # angry, "dogs are sitting by the door"


def load_clip():
    audio, sr = sf.read(CLIP, dtype="float32")
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    assert sr == 16000, f"{CLIP}: expected 16 kHz, got {sr}"
    return audio


def ct2_part(audio, out):
    fe = WhisperFeatureExtractor(feature_size=80)
    feats = fe(audio, sampling_rate=16000, return_tensors="np").input_features.astype(np.float32)
    assert feats.shape == (1, 80, 3000), feats.shape
    f = feats[0]  # [80, 3000]
    pad_value = f[0, -1]
    differs = np.nonzero((f != pad_value).any(axis=0))[0]
    n_keep = int(differs[-1]) + 1
    assert np.all(f[:, n_keep:] == pad_value)
    model = ctranslate2.models.Whisper(CT2_DIR, device="cpu", compute_type="float32")
    enc = model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(feats)), to_cpu=True)
    y = np.array(enc, dtype=np.float32)[0]  # [1500, 384]
    n_head = min(1500, (n_keep + 1) // 2 + 10)
    tail_rows = np.arange(n_head, 1500, 20, dtype=np.int64)
    out["ct2.features"] = np.ascontiguousarray(f[:, :n_keep].T)
    out["ct2.pad_value"] = np.array([pad_value], dtype=np.float32)
    out["ct2.output_head"] = np.ascontiguousarray(y[:n_head])
    out["ct2.output_tail_rows"] = tail_rows
    out["ct2.output_tail"] = np.ascontiguousarray(y[tail_rows])
    print(f"ct2: n_keep={n_keep} pad={pad_value:.6f} n_head={n_head} tail={len(tail_rows)} "
          f"|y|max={np.abs(y).max():.3f}")


def randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            r = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * r)
            elif name.endswith("bias") or "embed_positions" in name:
                p.copy_(0.3 * r)
            else:  # [out, in] or [out, in, k]: unit-variance outputs
                fan_in = p[0].numel()
                p.copy_(r / fan_in ** 0.5)


def hf_part(audio, out):
    cfg = WhisperConfig(vocab_size=64, num_mel_bins=128, encoder_layers=2, encoder_attention_heads=4,
                        decoder_layers=1, decoder_attention_heads=4, d_model=32, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_source_positions=200, max_target_positions=16,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    model = WhisperForConditionalGeneration(cfg)
    randomize(model, 1234)
    model = model.half()
    d = os.path.join(HERE, "encoder_golden_hf")
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d)
    for extra in os.listdir(d):
        if extra not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(d, extra))
    # Reload from the saved F16 files, compute in float32.
    model = WhisperForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    fe = WhisperFeatureExtractor(feature_size=128, chunk_length=4)
    feats = fe(audio[:64000], sampling_rate=16000, return_tensors="np").input_features
    feats16 = feats.astype(np.float16)
    assert feats16.shape == (1, 128, 400), feats16.shape
    with torch.no_grad():
        y = model.model.encoder(torch.from_numpy(feats16.astype(np.float32))).last_hidden_state[0]
    out["hf.features"] = np.ascontiguousarray(feats16[0].T)
    out["hf.output"] = y.numpy().astype(np.float32)
    print(f"hf: |y|max={y.abs().max():.3f}")


def main():
    audio = load_clip()
    out = {}
    ct2_part(audio, out)
    hf_part(audio, out)
    path = os.path.join(HERE, "encoder_golden.safetensors")
    save_file(out, path, metadata={"clip": os.path.basename(CLIP), "ct2_model": "whisper-tiny.en",
                                   "ctranslate2": ctranslate2.__version__})
    total = os.path.getsize(path) + sum(os.path.getsize(os.path.join(HERE, "encoder_golden_hf", f))
                                        for f in os.listdir(os.path.join(HERE, "encoder_golden_hf")))
    print(f"wrote {path} and encoder_golden_hf/ ({total / 1e6:.2f} MB total)")


if __name__ == "__main__":
    main()
