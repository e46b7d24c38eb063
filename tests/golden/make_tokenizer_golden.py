#!/usr/bin/env python3
"""Writes the tokenizer and chat-template golden files from independent references.

Outputs (next to this script):
  tokenizer_golden.json   corpus strings and reference token ids / decodes:
    - llama.cpp (llama-cpp-python, vocab_only) on the pinned SmolLM2 GGUF, with and
      without special-token parsing, detokenize(special=True), the EOG (stop) ids,
      and the same vocabulary re-labelled with other tokenizer.ggml.pre values
      (llama-bpe, qwen2, gpt-2, default) through a temporary vocab-only GGUF;
    - HF `tokenizers` on Whisper tiny.en's tokenizer.json (special tokens parsed /
      encode_special_tokens=True), Tokenizer.decode;
    - HF `tokenizers` on synthetic tokenizer.json files built from the SmolLM2 vocab
      with other pre-tokenizers (Split/Digits/ByteLevel variants); the C++ test builds
      the identical file from the GGUF and the stored pre_tokenizer JSON;
    - python `sentencepiece` on tokenizer_sp_tiny.model (trained here, see below);
    - random token sequences with llama.cpp's raw bytes and Python's
      bytes.decode("utf-8", "replace") (checks decode and the UTF-8 sanitizer).
  tokenizer_sp_tiny.model  a ~1000-piece SentencePiece BPE model (byte fallback,
    identity normalisation, dummy prefix, split digits: the Llama 2 settings) trained
    on the hand-written part of tokenizer_corpus.txt.
  chat_golden.json  jinja2 renderings (HF's settings: trim_blocks, lstrip_blocks) of
    the SmolLM2 GGUF chat template and of chatml / Qwen2 / Llama 3 templates for a
    few conversations, plus llama.cpp's token ids of the SmolLM2 renderings.

The corpus: tokenizer_corpus.txt (hand-written for this project) plus generated
strings (number formats, whitespace runs, seeded random mixes of corpus lines).

Usage:  UNDERTONE_HOME=~/.cache/undertone python3 tests/golden/make_tokenizer_golden.py [--bench]
--bench prints llama-cpp-python's tokenize throughput on the corpus (not stored).
"""
import json
import os
import random
import sys
import tempfile
import time

import gguf
import jinja2.sandbox
import llama_cpp
import sentencepiece as spm
import tokenizers

HERE = os.path.dirname(os.path.abspath(__file__))
HOME = os.environ.get("UNDERTONE_HOME", os.path.expanduser("~/.cache/undertone"))
GGUF_PATH = os.path.join(HOME, "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
WHISPER_JSON = os.path.join(HOME, "models/whisper-tiny.en/tokenizer.json")
SP_MODEL = os.path.join(HERE, "tokenizer_sp_tiny.model")


def unescape(line):
    out, i = [], 0
    while i < len(line):
        c = line[i]
        if c == "\\" and i + 1 < len(line):
            n = line[i + 1]
            if n in "ntr\\":
                out.append({"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[n])
                i += 2
                continue
            if n == "u" and i + 6 <= len(line):
                out.append(chr(int(line[i + 2:i + 6], 16)))
                i += 6
                continue
        out.append(c)
        i += 1
    return "".join(out)


def read_corpus():
    out = []
    with open(os.path.join(HERE, "tokenizer_corpus.txt"), encoding="utf-8") as f:
        for raw in f:
            line = raw.rstrip("\n")
            if line.startswith("#:"):
                continue
            out.append("" if line == "<<empty>>" else unescape(line))
    return out


def generated(base, rng):
    g = []
    # numbers of every length, with and without separators / leading space
    for n in range(1, 25):
        digits = "".join(str((i * 7 + n) % 10) for i in range(n))
        g.append(digits)
        g.append(" " + digits + " items")
    for v in [1234567, 9876543210, 1000000, 42]:
        g.append(f"{v:,}")
        g.append(f"{v / 7:.4f}")
    # whitespace runs before different kinds of characters
    for k in range(1, 9):
        for ws in [" ", "\n", "\t", " \n", "\r\n"]:
            for nxt in ["a", "1", "!", "é", "中", "😀", ""]:
                if rng.random() < 0.35:
                    g.append("x" + ws * k + nxt)
    # seeded mixes of corpus lines
    nonempty = [s for s in base if s]
    seps = ["", " ", "\n", "  ", "\t", "\n\n", " - ", "<|im_end|>", "<|endoftext|>"]
    for _ in range(90):
        parts = rng.sample(nonempty, rng.randint(2, 3))
        s = parts[0]
        for p in parts[1:]:
            s += rng.choice(seps) + p
        g.append(s)
    return g


def vocab_only_gguf(src, dst, pre):
    """Copy of src's metadata (no tensors) with tokenizer.ggml.pre = pre."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch=bytes(r.fields["general.architecture"].parts[-1]).decode())
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        t = f.types[0]
        if t == gguf.GGUFValueType.ARRAY:
            st = f.types[1]
            if st == gguf.GGUFValueType.STRING:
                v = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
            else:
                v = [f.parts[i][0].item() for i in f.data]
            w.add_key_value(k, v, t, sub_type=st)
        elif t == gguf.GGUFValueType.STRING:
            v = bytes(f.parts[f.data[0]]).decode("utf-8")
            w.add_key_value(k, pre if k == "tokenizer.ggml.pre" else v, t)
        else:
            w.add_key_value(k, f.parts[f.data[0]][0].item(), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_vocab(src):
    r = gguf.GGUFReader(src)
    f = r.fields["tokenizer.ggml.tokens"]
    toks = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    f = r.fields["tokenizer.ggml.token_type"]
    types = [int(f.parts[i][0]) for i in f.data]
    f = r.fields["tokenizer.ggml.merges"]
    merges = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    return toks, types, merges


def synthetic_tokenizer_json(toks, types, merges, pre_tokenizer, ignore_merges, pair_merges):
    """Must match build_synthetic_json() in tests/test_tokenizer.cpp."""
    vocab = {t: i for i, t in enumerate(toks)}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in enumerate(toks) if types[i] == 3]
    ms = [m.split(" ", 1) for m in merges] if pair_merges else merges
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": pre_tokenizer, "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": vocab, "merges": ms},
    }


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
BYTE_LEVEL_NOREGEX = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
            r"\s*[\r\n]+|\s+(?!\S)|\s+")
SYNTHETIC = {
    "smollm_hf": dict(pre={"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, BYTE_LEVEL]}, ignore_merges=False, pairs=False),
    "llama3_hf": dict(pre={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_RE}, "behavior": "Isolated", "invert": False},
        BYTE_LEVEL_NOREGEX]}, ignore_merges=True, pairs=True),
    "qwen2_hf": dict(pre={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_RE}, "behavior": "Isolated", "invert": False},
        BYTE_LEVEL_NOREGEX]}, ignore_merges=False, pairs=True),
    "prefix_space_hf": dict(pre={"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                 "use_regex": True}, ignore_merges=False, pairs=False),
    "split_behaviors_hf": dict(pre={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"String": "\n"}, "behavior": "MergedWithNext", "invert": False},
        {"type": "Split", "pattern": {"Regex": r"[.,!?;:]"}, "behavior": "MergedWithPrevious", "invert": False},
        {"type": "Split", "pattern": {"Regex": r"\p{N}+"}, "behavior": "Contiguous", "invert": False},
        {"type": "Digits", "individual_digits": False},
        BYTE_LEVEL]}, ignore_merges=False, pairs=False),
    "split_removed_hf": dict(pre={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\s+"}, "behavior": "Removed", "invert": False},
        {"type": "Split", "pattern": {"Regex": r"\p{L}+"}, "behavior": "Isolated", "invert": True},
        BYTE_LEVEL_NOREGEX]}, ignore_merges=False, pairs=True),
}

SP_TRAIN_ARGS = dict(vocab_size=1000, model_type="bpe", byte_fallback=True, split_digits=True,
                     normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
                     allow_whitespace_only_pieces=True, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
                     character_coverage=0.9995, hard_vocab_limit=False, num_threads=1, seed_sentencepiece_size=100000,
                     bos_id=1, eos_id=2, unk_id=0, pad_id=-1)


def train_sp(hand_written):
    with tempfile.TemporaryDirectory() as td:
        txt = os.path.join(td, "train.txt")
        with open(txt, "w", encoding="utf-8") as f:
            for s in hand_written:
                for line in s.split("\n"):
                    if line.strip():
                        f.write(line + "\n")
        prefix = os.path.join(td, "sp")
        spm.SentencePieceTrainer.train(input=txt, model_prefix=prefix, minloglevel=2, **SP_TRAIN_ARGS)
        with open(prefix + ".model", "rb") as f:
            data = f.read()
    with open(SP_MODEL, "wb") as f:
        f.write(data)


LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "Why did the chicken cross the road?"},
     {"role": "user", "content": "  Why?\n"}],
    [{"role": "system", "content": "Réponds en français. 🙂"}, {"role": "user", "content": "  Bonjour, ça va ?  "},
     {"role": "assistant", "content": "Oui, très bien !\n\nEt toi ?"}, {"role": "user", "content": "日本語で話して"}],
    [],
]


def render(template, messages, gen):
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=gen,
                                            bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")


def main():
    bench = "--bench" in sys.argv
    rng = random.Random(20240315)
    hand = read_corpus()
    corpus = hand + generated(hand, rng)
    assert len(corpus) >= 300, len(corpus)

    llm = llama_cpp.Llama(model_path=GGUF_PATH, vocab_only=True, verbose=False)
    tok = lambda m, s, sp: m.tokenize(s.encode("utf-8"), add_bos=False, special=sp)
    smol_special = [tok(llm, s, True) for s in corpus]
    smol_plain = [tok(llm, s, False) for s in corpus]
    smol_decode = [llm.detokenize(ids, special=True).decode("utf-8") for ids in smol_special]
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llm.n_vocab()
    eog = [i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)]

    pre_variants = {}
    with tempfile.TemporaryDirectory() as td:
        for pre in ["llama-bpe", "qwen2", "gpt-2", "default"]:
            path = os.path.join(td, pre + ".gguf")
            vocab_only_gguf(GGUF_PATH, path, pre)
            m = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
            pre_variants[pre] = [tok(m, s, True) for s in corpus]
            del m

    # random token sequences: raw bytes from llama.cpp and Python's replacement decoding
    normal = [i for i in range(n_vocab) if llm._model.token_get_attr(i) == llama_cpp.LLAMA_TOKEN_ATTR_NORMAL]
    random_decode = []
    for _ in range(300):
        ids = [rng.choice(normal) for _ in range(rng.randint(1, 6))]
        raw = llm.detokenize(ids, special=True)
        random_decode.append({"ids": ids, "bytes_hex": raw.hex(), "replaced": raw.decode("utf-8", "replace")})

    wt = tokenizers.Tokenizer.from_file(WHISPER_JSON)
    wh_special = [wt.encode(s, add_special_tokens=False).ids for s in corpus]
    wh_decode = [wt.decode(ids, skip_special_tokens=False) for ids in wh_special]
    wt.encode_special_tokens = True
    wh_plain = [wt.encode(s, add_special_tokens=False).ids for s in corpus]

    toks, types, merges = gguf_vocab(GGUF_PATH)
    synthetic = {}
    for name, spec in SYNTHETIC.items():
        j = synthetic_tokenizer_json(toks, types, merges, spec["pre"], spec["ignore_merges"], spec["pairs"])
        t = tokenizers.Tokenizer.from_str(json.dumps(j))
        synthetic[name] = {"pre_tokenizer": spec["pre"], "ignore_merges": spec["ignore_merges"],
                           "pair_merges": spec["pairs"],
                           "ids": [t.encode(s, add_special_tokens=False).ids for s in corpus]}

    train_sp(hand)
    sp = spm.SentencePieceProcessor(model_file=SP_MODEL)
    sp_ids = [sp.encode(s) for s in corpus]
    sp_decode = [sp.decode(ids) for ids in sp_ids]

    golden = {
        "about": "written by tests/golden/make_tokenizer_golden.py; references: llama-cpp-python "
                 + llama_cpp.__version__ + ", tokenizers " + tokenizers.__version__ + ", sentencepiece "
                 + spm.__version__,
        "corpus": corpus,
        "smollm_gguf": {"bos": llm.token_bos(), "eos": llm.token_eos(), "eog": eog, "n_vocab": n_vocab,
                        "special": smol_special, "plain": smol_plain, "decode": smol_decode},
        "gguf_pre_variants": pre_variants,
        "random_decode": random_decode,
        "whisper_json": {"special": wh_special, "plain": wh_plain, "decode": wh_decode},
        "synthetic_json": synthetic,
        "sentencepiece": {"model": "tokenizer_sp_tiny.model", "vocab_size": sp.get_piece_size(),
                          "bos": sp.bos_id(), "eos": sp.eos_id(), "ids": sp_ids, "decode": sp_decode},
    }
    with open(os.path.join(HERE, "tokenizer_golden.json"), "w", encoding="utf-8") as f:
        json.dump(golden, f, ensure_ascii=False, separators=(",", ":"))

    smol_template = llm.metadata["tokenizer.chat_template"]
    chat = {"templates": {"smollm2": smol_template, "qwen2": QWEN2_TEMPLATE, "chatml": CHATML_TEMPLATE,
                          "llama3": LLAMA3_TEMPLATE},
            "conversations": CONVERSATIONS, "cases": []}
    for tname, ttext in chat["templates"].items():
        for ci, conv in enumerate(CONVERSATIONS):
            for gen in (False, True):
                text = render(ttext, conv, gen)
                case = {"template": tname, "conversation": ci, "add_generation_prompt": gen, "text": text}
                if tname == "smollm2":
                    case["smollm_ids"] = tok(llm, text, True)
                chat["cases"].append(case)
    with open(os.path.join(HERE, "chat_golden.json"), "w", encoding="utf-8") as f:
        json.dump(chat, f, ensure_ascii=False, indent=1)

    print(f"{len(corpus)} corpus strings, {sum(len(s.encode()) for s in corpus)} bytes")
    if bench:
        data = [s.encode("utf-8") for s in corpus]
        total = sum(len(d) for d in data)
        reps = 20
        t0 = time.perf_counter()
        for _ in range(reps):
            for d in data:
                llm.tokenize(d, add_bos=False, special=True)
        dt = time.perf_counter() - t0
        print(f"llama-cpp-python tokenize, per string: {total * reps / dt / 1e6:.2f} MB/s")
        joined = b"\n".join(data) * 8
        t0 = time.perf_counter()
        for _ in range(5):
            llm.tokenize(joined, add_bos=False, special=True)
        dt = time.perf_counter() - t0
        print(f"llama-cpp-python tokenize, one {len(joined)}-byte text: {len(joined) * 5 / dt / 1e6:.2f} MB/s")


if __name__ == "__main__":
    main()
