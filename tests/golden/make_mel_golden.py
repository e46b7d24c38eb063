#!/usr/bin/env python3
"""Golden values for undertone's Whisper log-mel front end (models/mel.hpp).

References (both independent of undertone):
 - HF transformers' WhisperFeatureExtractor (numpy, float64 FFT). Its __call__ pads
   to 30 s, so we call its feature function `_np_extract_fbank_features` on the
   unpadded waveform: centred STFT with reflect padding, the last STFT frame
   dropped (as openai-whisper does), log10, clamp at max - 8, (x + 4) / 4.
   Raw log10 mel comes from transformers.audio_utils.spectrogram with the same
   arguments (before the clamp), minus the last frame.
 - openai-whisper's `log_mel_spectrogram` (torch.stft, float32, librosa's filters
   from whisper/assets/mel_filters.npz), loaded without whisper's heavy imports
   (`pip install --no-deps openai-whisper`); used as a cross-check of HF here
   and as the filterbank reference. Optional: skipped with a note if missing.
Audio: real RAVDESS speech (16 kHz mono 16-bit FLAC), decoded with `sox` (libFLAC,
not libsndfile) to int16 / 32768.

Writes tests/golden/mel_golden.json (metadata, short synthetic cases inline) and
tests/golden/mel_golden.f32 (little-endian float32 arrays; offsets in the json).
Run: python3 tests/golden/make_mel_golden.py [ravdess_dir]
"""
import importlib.util
import json
import os
import site
import subprocess
import sys
import types

import numpy as np
import transformers
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import spectrogram, window_function

HERE = os.path.dirname(os.path.abspath(__file__))
RAVDESS = sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/ravdess-train"
# A loud (angry, strong) clip and a quiet one whose length is a multiple of 160
# samples, so its last frame needs the end reflection.
CLIPS = ["03-01-05-02-01-01-01.flac", "03-01-03-01-02-01-05.flac"]


def decode(path):
    raw = subprocess.run(["sox", path, "-t", "raw", "-e", "signed", "-b", "16", "-c", "1", "-"],
                         check=True, capture_output=True).stdout
    return np.frombuffer(raw, np.int16).astype(np.float32) / 32768.0


def hf_normalized(x, n_mels):
    fe = WhisperFeatureExtractor(feature_size=n_mels)
    return fe._np_extract_fbank_features(x[None, :], "cpu")[0].T.astype(np.float32)  # [T, n_mels]


def hf_raw(x, n_mels):
    fe = WhisperFeatureExtractor(feature_size=n_mels)
    s = spectrogram(x, window_function(fe.n_fft, "hann"), frame_length=fe.n_fft,
                    hop_length=fe.hop_length, power=2.0, mel_filters=fe.mel_filters, log_mel="log10")
    return s[:, :-1].T.astype(np.float32)  # [T, n_mels], drop the last frame as Whisper does


def load_openai_whisper_audio():
    dirs = [p for p in site.getsitepackages() + [site.getusersitepackages()]
            if os.path.isdir(os.path.join(p, "whisper"))]
    if not dirs:
        return None
    d = os.path.join(dirs[0], "whisper")
    pkg = types.ModuleType("whisper")  # skip whisper/__init__ (tiktoken, numba, ...)
    pkg.__path__ = [d]
    sys.modules.setdefault("whisper", pkg)
    spec = importlib.util.spec_from_file_location("whisper.audio", os.path.join(d, "audio.py"))
    m = importlib.util.module_from_spec(spec)
    sys.modules["whisper.audio"] = m
    try:
        spec.loader.exec_module(m)
    except Exception as e:  # noqa: BLE001
        print("openai-whisper not usable:", e)
        return None
    return m


blob = bytearray()
arrays = {}


def put(name, a):
    a = np.ascontiguousarray(a, dtype="<f4")
    arrays[name] = {"offset": len(blob), "shape": list(a.shape)}
    blob.extend(a.tobytes())


out = {"source": f"transformers {transformers.__version__} WhisperFeatureExtractor (numpy)",
       "clips": []}
wa = load_openai_whisper_audio()
if wa is not None:
    import torch
    out["cross_check"] = f"openai-whisper audio.py, torch {torch.__version__}"
    put("whisper_filters_80", wa.mel_filters("cpu", 80).numpy())  # [80, 201], librosa

for i, name in enumerate(CLIPS):
    x = decode(os.path.join(RAVDESS, name))
    clip = {"file": name, "n_samples": int(len(x)), "sum": float(np.sum(x.astype(np.float64))),
            "sum_abs": float(np.sum(np.abs(x.astype(np.float64))))}
    hn = hf_normalized(x, 80)
    put(f"clip{i}_norm80", hn)
    clip["frames"] = int(hn.shape[0])
    if i == 1:
        put(f"clip{i}_raw80", hf_raw(x, 80))
        put(f"clip{i}_norm128", hf_normalized(x, 128))
    if wa is not None:
        import torch
        w = wa.log_mel_spectrogram(torch.from_numpy(x)).numpy().T
        assert w.shape == hn.shape, (w.shape, hn.shape)
        clip["max_abs_hf_vs_openai_whisper"] = float(np.abs(w - hn).max())
        print(name, "frames", hn.shape[0], "HF vs openai-whisper max abs", clip["max_abs_hf_vs_openai_whisper"])
    out["clips"].append(clip)

# Short synthetic inputs that exercise the framing edges (raw log10 mel, HF numpy,
# whose np.pad reflect also handles input shorter than the 200-sample pad).
rng = np.random.RandomState(1234)
out["synthetic"] = []
for j, n in enumerate([170, 200, 201, 359, 360, 399, 430, 1630]):
    x = (0.3 * rng.randn(n)).astype(np.float32)
    put(f"synth{j}_samples", x)
    put(f"synth{j}_raw80", hf_raw(x, 80))
    out["synthetic"].append({"samples": f"synth{j}_samples", "raw80": f"synth{j}_raw80"})

out["arrays"] = arrays
with open(os.path.join(HERE, "mel_golden.f32"), "wb") as f:
    f.write(blob)
with open(os.path.join(HERE, "mel_golden.json"), "w") as f:
    json.dump(out, f, indent=1)
print("wrote", len(blob), "bytes of arrays")
