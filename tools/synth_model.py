#!/usr/bin/env python3
"""Write a Hugging Face-style model directory with random weights at a real model's shape,
so conversion, loading and decoding can be benchmarked at real sizes without downloads.
Needs only numpy; the safetensors files are written by hand.

    python3 tools/synth_model.py --preset qwen2.5-7b --out /tmp/qwen7b-synth
    python3 tools/synth_model.py --preset qwen2.5-7b --layers 4 --out /tmp/q7b-4 --zse /tmp/q7b-4.zse
    python3 tools/synth_model.py --arch llama --layers 2 --hidden 256 --ffn 512 --heads 4 \\
        --kv-heads 2 --vocab 4096 --out /tmp/custom
    python3 tools/synth_model.py --preset qwen3-30b-a3b --layers 2 --out /tmp/q30a3-2   # experts

What it writes: config.json (the preset's shape, every field zse reads), generation_config.json,
the tokenizer files of --tokenizer (default: tests/fixtures/tiny-qwen2, else
../shared/fixtures/tiny-qwen2), and bf16 weights N(0, 0.02) (norms 1.0, biases N(0, 0.02))
in shards of at most --shard-gb with model.safetensors.index.json. Mixture-of-experts shapes
(qwen3_moe, qwen2_moe, mixtral) get a router and --experts routed experts per layer, each
its own gate/up/down tensors as released checkpoints name them, and qwen2_moe a shared
expert with its gate. The vocabulary is the
shape's: the embedding table has --vocab rows, so every id the small tokenizer produces is
valid and the rest never occur in text; eos/bos ids in the configs are the tokenizer's own.

Each tensor's values depend only on --seed and the tensor's name, not on the shard size.
Memory stays at a few hundred MB whatever the size: tensors are generated and written in
row chunks. With --zse OUT.zse the directory is converted straight away (--quant, --zse-bin).

With --zse-direct OUT.zse no bf16 is written at all: the .zse file itself (docs/FORMAT.md)
comes out of random codes packed in the scheme's layout (int4: uniform 4-bit codes with one
f16 scale and min per group, about the spread of N(0, 0.02); int8 / f16 likewise), the
embedding table int8 under integer recipes, norms 1, routers f32 N(0, 0.02), with every
checksum (XXH3-64 through the system's libxxhash, which zse links, or the xxhash module).
A 72B-shaped int4 file (~40 GB) takes minutes and needs no room for a 145 GB bf16 source:

    python3 tools/synth_model.py --preset qwen2.5-72b --zse-direct /data/q72b-int4.zse
    python3 tools/synth_model.py --preset mixtral-8x7b --zse-direct /data/mixtral-int4.zse --quant int4

The header is what zse convert writes for the same config.json (the CTest synth_direct checks
it against a conversion); --out is then optional (the tokenizer and configs are read from
--tokenizer).

With --gguf-direct OUT.gguf the same shape is written as a GGUF file for llama.cpp, every
weight matrix Q4_0 (random codes, one f16 scale a block; experts as llama.cpp's 3-D
ffn_*_exps tensors), norms and routers F32, the tokenizer's vocabulary as tokenizer.ggml.*
padded to the shape's vocabulary: llama.cpp's side of the same benchmark without a 93 GB
bf16 Mixtral to convert (llama, mistral, mixtral, qwen2, qwen3, qwen3_moe shapes).
"""
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np

# model_type, layers, hidden, ffn, heads, kv heads, vocab, tied, qkv bias, rope theta, context
PRESETS = {
    "qwen2.5-0.5b": ("qwen2", 24, 896, 4864, 14, 2, 151936, True, True, 1e6, 32768),
    "qwen2.5-1.5b": ("qwen2", 28, 1536, 8960, 12, 2, 151936, True, True, 1e6, 32768),
    "qwen2.5-7b": ("qwen2", 28, 3584, 18944, 28, 4, 152064, False, True, 1e6, 32768),
    "qwen2.5-32b": ("qwen2", 64, 5120, 27648, 40, 8, 152064, False, True, 1e6, 32768),
    "qwen2.5-72b": ("qwen2", 80, 8192, 29568, 64, 8, 152064, False, True, 1e6, 32768),
    "llama-3-8b": ("llama", 32, 4096, 14336, 32, 8, 128256, False, False, 5e5, 8192),
    "llama-3.2-1b": ("llama", 16, 2048, 8192, 32, 8, 128256, True, False, 5e5, 131072),
    "mistral-7b": ("mistral", 32, 4096, 14336, 32, 8, 32768, False, False, 1e6, 32768),
    "qwen3-8b": ("qwen3", 36, 4096, 12288, 32, 8, 151936, False, False, 1e6, 40960),
    "qwen3-32b": ("qwen3", 64, 5120, 25600, 64, 8, 151936, False, False, 1e6, 40960),
    "qwen3-30b-a3b": ("qwen3_moe", 48, 2048, 6144, 32, 4, 151936, False, False, 1e6, 40960),
    "mixtral-8x7b": ("mixtral", 32, 4096, 14336, 32, 8, 32000, False, False, 1e6, 32768),
    "qwen2-57b-a14b": ("qwen2_moe", 28, 3584, 18944, 28, 4, 151936, False, True, 1e6, 32768),
}
FIELDS = ("arch", "layers", "hidden", "ffn", "heads", "kv_heads", "vocab", "tied", "bias", "theta", "ctx")
# what the presets' model cards give beyond the fields above: an explicit head_dim, and the
# experts (count, per token, width, the shared expert's width, renormalized top-k)
EXTRA = {
    "qwen3-8b": dict(head_dim=128),
    "qwen3-32b": dict(head_dim=128),
    "qwen3-30b-a3b": dict(head_dim=128, experts=128, experts_used=8, moe_ffn=768, norm_topk=True),
    "mixtral-8x7b": dict(experts=8, experts_used=2),
    "qwen2-57b-a14b": dict(experts=64, experts_used=8, moe_ffn=2560, shared_ffn=20480),
}
MOE_ARCHS = ("qwen2_moe", "qwen3_moe", "mixtral")
CHUNK_ELEMS = 1 << 24  # values generated per step: 64 MB of float32


def bf16_bytes(a):
    """float32 array -> little-endian bf16 bytes, rounded to nearest even"""
    u = a.astype(np.float32).view(np.uint32)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype("<u2").tobytes()


def mlp_tensors(s, p):
    """a layer's MLP: dense, or a router, routed experts (and qwen2_moe's shared expert)"""
    h = s["hidden"]
    if not s.get("experts"):
        yield p + "mlp.gate_proj.weight", (s["ffn"], h), "weight"
        yield p + "mlp.up_proj.weight", (s["ffn"], h), "weight"
        yield p + "mlp.down_proj.weight", (h, s["ffn"]), "weight"
        return
    f = s["moe_ffn"]
    if s["arch"] == "mixtral":
        yield p + "block_sparse_moe.gate.weight", (s["experts"], h), "weight"
        for e in range(s["experts"]):
            for w, shape in (("w1", (f, h)), ("w3", (f, h)), ("w2", (h, f))):
                yield p + f"block_sparse_moe.experts.{e}.{w}.weight", shape, "weight"
        return
    yield p + "mlp.gate.weight", (s["experts"], h), "weight"
    for e in range(s["experts"]):
        for w, shape in (("gate_proj", (f, h)), ("up_proj", (f, h)), ("down_proj", (h, f))):
            yield p + f"mlp.experts.{e}.{w}.weight", shape, "weight"
    if s.get("shared_ffn"):
        sf = s["shared_ffn"]
        yield p + "mlp.shared_expert_gate.weight", (1, h), "weight"
        for w, shape in (("gate_proj", (sf, h)), ("up_proj", (sf, h)), ("down_proj", (h, sf))):
            yield p + f"mlp.shared_expert.{w}.weight", shape, "weight"


def tensors(s):
    """(name, shape, kind) of every tensor in forward order; kind is norm, bias or weight"""
    hd = s["head_dim"]
    q, kv = s["heads"] * hd, s["kv_heads"] * hd
    yield "model.embed_tokens.weight", (s["vocab"], s["hidden"]), "weight"
    for layer in range(s["layers"]):
        p = f"model.layers.{layer}."
        yield p + "input_layernorm.weight", (s["hidden"],), "norm"
        yield p + "self_attn.q_proj.weight", (q, s["hidden"]), "weight"
        yield p + "self_attn.k_proj.weight", (kv, s["hidden"]), "weight"
        yield p + "self_attn.v_proj.weight", (kv, s["hidden"]), "weight"
        if s["bias"]:
            yield p + "self_attn.q_proj.bias", (q,), "bias"
            yield p + "self_attn.k_proj.bias", (kv,), "bias"
            yield p + "self_attn.v_proj.bias", (kv,), "bias"
        if s["arch"] in ("qwen3", "qwen3_moe"):
            yield p + "self_attn.q_norm.weight", (hd,), "norm"
            yield p + "self_attn.k_norm.weight", (hd,), "norm"
        yield p + "self_attn.o_proj.weight", (s["hidden"], q), "weight"
        yield p + "post_attention_layernorm.weight", (s["hidden"],), "norm"
        yield from mlp_tensors(s, p)
    yield "model.norm.weight", (s["hidden"],), "norm"
    if not s["tied"]:
        yield "lm_head.weight", (s["vocab"], s["hidden"]), "weight"


def nbytes(shape):
    return int(np.prod(shape)) * 2


def write_values(f, name, shape, kind, seed):
    n = int(np.prod(shape))
    if kind == "norm":
        f.write(bf16_bytes(np.ones(n, np.float32)))
        return
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    for first in range(0, n, CHUNK_ELEMS):
        count = min(CHUNK_ELEMS, n - first)
        f.write(bf16_bytes(rng.standard_normal(count, np.float32) * np.float32(0.02)))


def write_shard(path, items, seed):
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in items:
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nbytes(shape)]}
        off += nbytes(shape)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)  # data starts 8-aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for name, shape, kind in items:
            write_values(f, name, shape, kind, seed)


def default_tokenizer():
    here = os.path.dirname(os.path.abspath(__file__))
    for d in (os.path.join(here, "..", "tests", "fixtures", "tiny-qwen2"),
              os.path.join(here, "..", "..", "shared", "fixtures", "tiny-qwen2")):
        if os.path.exists(os.path.join(d, "tokenizer.json")):
            return os.path.normpath(d)
    return None


def token_ids(tok_dir):
    """(largest id, eos id, bos id) of the tokenizer in tok_dir; ids from its added tokens"""
    tok = json.load(open(os.path.join(tok_dir, "tokenizer.json")))
    ids = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    vocab = tok.get("model", {}).get("vocab", {})
    top = max(list(ids.values()) + (list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]))
    cfg_path = os.path.join(tok_dir, "tokenizer_config.json")
    tc = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}

    def named(key):
        v = tc.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return ids.get(v) if v else None

    return top, named("eos_token"), named("bos_token")


MOE_FIELDS = ("experts", "experts_used", "moe_ffn", "shared_ffn")


def shape_from_args(a):
    s = dict(zip(FIELDS, PRESETS[a.preset])) if a.preset else {}
    s.update(EXTRA.get(a.preset, {}))
    if not a.preset and a.arch:  # custom shapes: what a model of that family usually has
        s.update({"tied": False, "bias": a.arch in ("qwen2", "qwen2_moe"), "theta": 1e4, "ctx": 4096})
    for k in FIELDS + MOE_FIELDS:
        v = getattr(a, k, None)
        if v is not None:
            s[k] = v
    missing = [k for k in FIELDS if k not in s]
    if missing:
        sys.exit(f"synth_model: without --preset, give --{' --'.join(m.replace('_', '-') for m in missing)}")
    s["head_dim"] = a.head_dim or s.get("head_dim") or s["hidden"] // s["heads"]
    if s["heads"] % s["kv_heads"]:
        sys.exit("synth_model: --heads must be a multiple of --kv-heads")
    if s["arch"] in MOE_ARCHS:
        if not s.get("experts") or not s.get("experts_used"):
            sys.exit("synth_model: a mixture-of-experts shape needs --experts and --experts-used")
        if s["arch"] == "mixtral":
            s["moe_ffn"] = s["ffn"]  # Mixtral's experts are its MLPs
        s.setdefault("moe_ffn", s["ffn"])
        if s["arch"] == "qwen2_moe":
            s.setdefault("shared_ffn", s["ffn"])
        elif s.get("shared_ffn"):
            sys.exit("synth_model: --shared-ffn is qwen2_moe's (the other MoE shapes have no shared expert)")
    elif s.get("experts"):
        sys.exit(f"synth_model: --experts needs a mixture-of-experts architecture ({', '.join(MOE_ARCHS)})")
    return s


def config_json(s, eos, bos):
    arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
            "mixtral": "MixtralForCausalLM"}[s["arch"]]
    cfg = {"architectures": [arch], "model_type": s["arch"], "num_hidden_layers": s["layers"],
           "hidden_size": s["hidden"], "intermediate_size": s["ffn"], "num_attention_heads": s["heads"],
           "num_key_value_heads": s["kv_heads"], "head_dim": s["head_dim"], "vocab_size": s["vocab"],
           "tie_word_embeddings": s["tied"], "rope_theta": s["theta"], "rope_scaling": None,
           "max_position_embeddings": s["ctx"], "rms_norm_eps": 1e-6, "hidden_act": "silu",
           "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": "bfloat16"}
    if s["arch"] in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        cfg.update({"use_sliding_window": False, "sliding_window": None, "max_window_layers": s["layers"],
                    "attention_dropout": 0.0})
    if s["arch"] in ("llama", "qwen3", "qwen3_moe"):
        cfg.update({"attention_bias": s["bias"], "mlp_bias": False})
    elif s["arch"] == "qwen2_moe":
        cfg["qkv_bias"] = s["bias"]
    elif s["arch"] in ("mistral", "mixtral"):
        cfg["sliding_window"] = None
    if s["arch"] == "mixtral":
        cfg.update({"num_local_experts": s["experts"], "num_experts_per_tok": s["experts_used"],
                    "router_jitter_noise": 0.0})
    elif s["arch"] in MOE_ARCHS:
        cfg.update({"num_experts": s["experts"], "num_experts_per_tok": s["experts_used"],
                    "moe_intermediate_size": s["moe_ffn"], "decoder_sparse_step": 1, "mlp_only_layers": [],
                    "norm_topk_prob": bool(s.get("norm_topk", False))})
        if s["arch"] == "qwen2_moe":
            cfg["shared_expert_intermediate_size"] = s["shared_ffn"]
    return cfg




# ---- --zse-direct: a quantized .zse of the shape, written without a source ------------------

SCHEMES = {"f32": (0, 0), "f16": (1, 0), "bf16": (2, 0), "int8": (3, 1), "int4": (4, 2)}  # id, layout
ALIGN = 4096


def align(n, a=ALIGN):
    return (n + a - 1) // a * a


def packed_size(scheme, rows, cols, group):
    """bytes and plane offsets (qs, scales, mins) of a packed tensor (src/quant/quant.c)"""
    if scheme in ("f32", "f16", "bf16"):
        return rows * cols * (4 if scheme == "f32" else 2), None, None
    if scheme == "int8":
        cp = (cols + 31) // 32 * 32
        sc = align(rows * cp, 64)
        return sc + rows * 4, sc, None
    cp = (cols + group - 1) // group * group
    groups = cp // group
    sc = align(rows * cp // 2, 64)
    mn = align(sc + rows * groups * 2, 64)
    return mn + rows * groups * 2, sc, mn


class Hasher:
    """XXH3-64 streaming, from libxxhash (what zse itself links) or the xxhash module"""

    def __init__(self):
        self.lib = None
        try:
            import ctypes
            import ctypes.util
            name = ctypes.util.find_library("xxhash") or "libxxhash.so.0"
            lib = ctypes.CDLL(name)
            lib.XXH3_createState.restype = ctypes.c_void_p
            lib.XXH3_64bits_reset.argtypes = [ctypes.c_void_p]
            lib.XXH3_64bits_update.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
            lib.XXH3_64bits_digest.argtypes = [ctypes.c_void_p]
            lib.XXH3_64bits_digest.restype = ctypes.c_uint64
            lib.XXH3_64bits.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
            lib.XXH3_64bits.restype = ctypes.c_uint64
            self.lib, self.state = lib, lib.XXH3_createState()
        except (OSError, AttributeError):
            try:
                import xxhash
                self.mod = xxhash
            except ImportError:
                sys.exit("synth_model: --zse-direct needs libxxhash (apt install libxxhash0) or the xxhash module")

    def start(self):
        if self.lib:
            self.lib.XXH3_64bits_reset(self.state)
        else:
            self.h = self.mod.xxh3_64()

    def update(self, b):
        if self.lib:
            self.lib.XXH3_64bits_update(self.state, bytes(b), len(b))
        else:
            self.h.update(b)

    def digest(self):
        return self.lib.XXH3_64bits_digest(self.state) if self.lib else self.h.intdigest()

    def once(self, b):
        self.start()
        self.update(b)
        return self.digest()


def plain_json(v):
    """tokenizer_config as zse stores it: integers past 64 bits become reals (jansson)"""
    if isinstance(v, dict):
        return {k: plain_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain_json(x) for x in v]
    if isinstance(v, int) and not isinstance(v, bool) and not -(1 << 63) <= v < (1 << 63):
        return float(v)
    return v


def zse_config(s, cfg, gen, tok_cfg, tok):
    """the normalized config zse convert makes of config.json (src/format/hf.c)"""
    added = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}

    def tid(v):
        return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= (1 << 30) else -1

    def named(key):
        v = (tok_cfg or {}).get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return added.get(v, -1) if v else -1

    bos = tid((gen or {}).get("bos_token_id"))
    bos = bos if bos >= 0 else tid(cfg.get("bos_token_id"))
    pad = tid((gen or {}).get("pad_token_id"))
    pad = pad if pad >= 0 else tid(cfg.get("pad_token_id"))
    eos = []
    for v in ((gen or {}).get("eos_token_id"), cfg.get("eos_token_id"), named("eos_token")):
        for i in v if isinstance(v, list) else [v]:
            if tid(i) >= 0 and i not in eos:
                eos.append(i)
    bos = bos if bos >= 0 else named("bos_token")
    pad = pad if pad >= 0 else named("pad_token")
    moe = s["arch"] in MOE_ARCHS
    c = {"arch": s["arch"], "n_layers": s["layers"], "n_heads": s["heads"], "n_kv_heads": s["kv_heads"],
         "head_dim": s["head_dim"], "hidden_size": s["hidden"], "intermediate_size": s["ffn"],
         "vocab_size": s["vocab"], "max_position": s["ctx"], "rms_eps": float(np.float32(1e-6)),
         "rope_theta": float(s["theta"]),
         "rope_scaling": {"type": "none", "factor": 1.0, "low_freq_factor": 0.0, "high_freq_factor": 0.0,
                          "original_max_position": 0, "attn_factor": 0.0, "beta_fast": 0.0, "beta_slow": 0.0},
         "tie_embeddings": bool(s["tied"]), "attn_bias": bool(s["bias"]), "attn_out_bias": False, "mlp_bias": False,
         "qk_norm": s["arch"] in ("qwen3", "qwen3_moe"), "sliding_window": 0,
         "n_experts": s["experts"] if moe else 0, "n_experts_used": s["experts_used"] if moe else 0,
         "bos_id": bos, "pad_id": pad, "eos_ids": eos}
    if moe:
        c.update({"expert_ffn": s["moe_ffn"], "shared_ffn": s.get("shared_ffn", 0) if s["arch"] == "qwen2_moe" else 0,
                  "shared_gate": s["arch"] == "qwen2_moe", "router": "softmax_topk",
                  "norm_topk": s["arch"] == "mixtral" or bool(s.get("norm_topk", False)),
                  "moe_layers": list(range(s["layers"]))})
    return c


def entries(s, quant, group):
    """the file's entries in forward order: (canonical name, source name, rows, cols, scheme, kind) for
    tensors, ("bank", layer) for expert banks; kind: norm, bias, router, weight"""
    h, hd = s["hidden"], s["head_dim"]
    q, kv = s["heads"] * hd, s["kv_heads"] * hd
    integer = quant in ("int8", "int4")
    yield ("token_embd.weight", "model.embed_tokens.weight", s["vocab"], h, "int8" if integer else quant, "weight")
    moe = s["arch"] in MOE_ARCHS
    for l in range(s["layers"]):
        b, p = f"blk.{l}.", f"model.layers.{l}."
        yield (b + "attn_norm.weight", p + "input_layernorm.weight", 1, h, "f32", "norm")
        for name, hf, rows in (("attn_q", "q_proj", q), ("attn_k", "k_proj", kv), ("attn_v", "v_proj", kv)):
            yield (b + name + ".weight", p + f"self_attn.{hf}.weight", rows, h, quant, "weight")
            if s["bias"]:
                yield (b + name + ".bias", p + f"self_attn.{hf}.bias", 1, rows, "f32", "bias")
        if s["arch"] in ("qwen3", "qwen3_moe"):
            yield (b + "attn_q_norm.weight", p + "self_attn.q_norm.weight", 1, hd, "f32", "norm")
            yield (b + "attn_k_norm.weight", p + "self_attn.k_norm.weight", 1, hd, "f32", "norm")
        yield (b + "attn_output.weight", p + "self_attn.o_proj.weight", h, q, quant, "weight")
        yield (b + "ffn_norm.weight", p + "post_attention_layernorm.weight", 1, h, "f32", "norm")
        if not moe:
            for name, hf, rows, cols in (("ffn_gate", "gate_proj", s["ffn"], h), ("ffn_up", "up_proj", s["ffn"], h),
                                         ("ffn_down", "down_proj", h, s["ffn"])):
                yield (b + name + ".weight", p + f"mlp.{hf}.weight", rows, cols, quant, "weight")
            continue
        gate = "block_sparse_moe.gate.weight" if s["arch"] == "mixtral" else "mlp.gate.weight"
        yield (b + "ffn_gate_inp.weight", p + gate, s["experts"], h, "f32", "router")
        yield ("bank", l)
        if s["arch"] == "qwen2_moe":
            sf = s["shared_ffn"]
            yield (b + "ffn_gate_inp_shexp.weight", p + "mlp.shared_expert_gate.weight", 1, h, "f32", "bias")
            for name, hf, rows, cols in (("ffn_gate_shexp", "gate_proj", sf, h), ("ffn_up_shexp", "up_proj", sf, h),
                                         ("ffn_down_shexp", "down_proj", h, sf)):
                yield (b + name + ".weight", p + f"mlp.shared_expert.{hf}.weight", rows, cols, quant, "weight")
    yield ("output_norm.weight", "model.norm.weight", 1, h, "f32", "norm")
    if not s["tied"]:
        yield ("output.weight", "lm_head.weight", s["vocab"], h, quant, "weight")


POOL_BYTES = 1 << 26


class Filler:
    """random bytes from a 64 MiB pool (weights of a benchmark need not be unique, only
    spread), and the constant planes of each scheme"""

    def __init__(self, seed):
        self.pool = np.random.default_rng(seed).integers(0, 256, POOL_BYTES, dtype=np.uint8).tobytes()
        self.at = 0

    def random(self, n):
        out = []
        while n > 0:
            take = min(n, POOL_BYTES - self.at)
            out.append(self.pool[self.at:self.at + take])
            self.at = (self.at + take) % POOL_BYTES
            n -= take
        return out

    @staticmethod
    def const(value, dtype, n):
        return np.full(n, value, dtype=dtype).tobytes()


def tensor_chunks(f, rng, scheme, rows, cols, group, kind):
    """the packed bytes of one tensor, in pieces"""
    if kind == "norm":
        return [Filler.const(1.0, "<f4", rows * cols)]
    if kind in ("bias", "router") or scheme == "f32":
        return [(rng.standard_normal(rows * cols, np.float32) * np.float32(0.02)).astype("<f4").tobytes()]
    if scheme in ("f16", "bf16"):
        vals = rng.standard_normal(min(rows * cols, POOL_BYTES // 2), np.float32) * np.float32(0.02)
        raw = vals.astype("<f2").tobytes() if scheme == "f16" else bf16_bytes(vals)
        reps, rest = divmod(rows * cols * 2, len(raw))
        return [raw] * reps + [raw[:rest]]
    size, sc, mn = packed_size(scheme, rows, cols, group)
    if scheme == "int8":
        cp = (cols + 31) // 32 * 32
        out = f.random(rows * cp) + [bytes(sc - rows * cp)]
        return out + [Filler.const(0.02 * 3 ** 0.5 / 127, "<f4", rows)]
    cp = (cols + group - 1) // group * group
    groups = cp // group
    step = 0.02 * 12 ** 0.5 / 15  # uniform codes 0..15 times step, less 7.5 steps: std 0.02
    out = f.random(rows * cp // 2) + [bytes(sc - rows * cp // 2)]
    out += [Filler.const(step, "<f2", rows * groups), bytes(mn - sc - rows * groups * 2)]
    return out + [Filler.const(-7.5 * step, "<f2", rows * groups)]


def write_direct(s, a):
    quant, group = a.quant, 128
    if quant not in ("int4", "int8", "f16", "bf16", "f32"):
        sys.exit(f"synth_model: --zse-direct writes int4, int8, f16, bf16 or f32, not {quant}")
    tok_dir = a.tokenizer
    tok_bytes = open(os.path.join(tok_dir, "tokenizer.json"), "rb").read()
    tok = json.loads(tok_bytes)
    tc_path = os.path.join(tok_dir, "tokenizer_config.json")
    tok_cfg = json.load(open(tc_path)) if os.path.exists(tc_path) else None
    top, eos, bos = token_ids(tok_dir)
    cfg = config_json(s, eos if eos is not None else 0, bos)
    gen = {"eos_token_id": [eos if eos is not None else 0], "do_sample": True, "temperature": 0.7, "top_p": 0.8}
    if bos is not None:
        gen["bos_token_id"] = bos
    tmpl_path = os.path.join(tok_dir, "chat_template.jinja")
    template = open(tmpl_path).read() if os.path.exists(tmpl_path) else (tok_cfg or {}).get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    model = tok.get("model", {}).get("type")
    dec = tok.get("decoder") or {}
    bytelevel = dec.get("type") == "ByteLevel" or any(d.get("type") == "ByteLevel" for d in dec.get("decoders") or [])
    tok_type = ("unknown" if not model else "bpe-bytelevel" if model == "BPE" and bytelevel else
                "bpe-sentencepiece" if model == "BPE" else {"Unigram": "unigram", "WordPiece": "wordpiece"}.get(model, "other"))
    moe = s["arch"] in MOE_ARCHS
    grouped = quant == "int4"

    # the layout: entries in forward order, each 4096-aligned; a bank's experts each a 4096-aligned stride
    plan = []
    for e in entries(s, quant, group):
        if e[0] == "bank":
            parts, at = [], 0
            f_ = s["moe_ffn"]
            for name, rows, cols, src in (("ffn_gate_exps", f_, s["hidden"], "gate"), ("ffn_up_exps", f_, s["hidden"], "up"),
                                          ("ffn_down_exps", s["hidden"], f_, "down")):
                size = packed_size(quant, rows, cols, group)[0]
                parts.append({"name": name, "rows": rows, "cols": cols, "at": at, "size": size, "src": src})
                at = align(at + size, 256)
            size = parts[2]["at"] + parts[2]["size"]
            plan.append({"bank": e[1], "parts": parts, "size": size, "stride": align(size), "count": s["experts"]})
        else:
            name, src, rows, cols, scheme, kind = e
            g = group if scheme == "int4" else 0
            plan.append({"name": name, "source": src, "rows": rows, "cols": cols, "scheme": scheme, "group": g,
                         "kind": kind, "size": packed_size(scheme, rows, cols, g)[0]})

    def expert_source(l, part):
        if s["arch"] == "mixtral":
            return f"model.layers.{l}.block_sparse_moe.experts.{{e}}." + {"gate": "w1", "up": "w3", "down": "w2"}[part] + ".weight"
        return f"model.layers.{l}.mlp.experts.{{e}}.{part}_proj.weight"

    def header(data_offset, sums, bank_sums):
        off = align(data_offset + len(tok_bytes))
        tensors, banks = [], []
        for i, t in enumerate(plan):
            t["offset"] = off
            if "bank" in t:
                banks.append({"layer": t["bank"], "count": t["count"], "offset": off, "stride": t["stride"],
                              "size": t["size"], "parts": [
                                  {"name": p["name"], "source": expert_source(t["bank"], p["src"]), "scheme": quant,
                                   "layout": SCHEMES[quant][1], "shape": [p["rows"], p["cols"]],
                                   "group_size": group if grouped else 0, "at": p["at"], "size": p["size"]}
                                  for p in t["parts"]],
                              "checksums": [f"{v:016x}" for v in bank_sums.get(i, [0] * t["count"])]})
                off = align(off + t["stride"] * (t["count"] - 1) + t["size"])
                continue
            tensors.append({"name": t["name"], "source": t["source"], "scheme": t["scheme"],
                            "layout": SCHEMES[t["scheme"]][1], "shape": [t["rows"], t["cols"]],
                            "group_size": t["group"], "offset": off, "size": t["size"],
                            "checksum": f"{sums.get(i, 0):016x}"})
            off = align(off + t["size"])
        last = plan[-1]
        end = last["offset"] + (last["stride"] * (last["count"] - 1) + last["size"] if "bank" in last else last["size"])
        embed = next(t["scheme"] for t in plan if t.get("name") == "token_embd.weight")
        head = next((t["scheme"] for t in plan if t.get("name") == "output.weight"), None)
        h = {"format": "zse", "version": [2 if moe else 1, 0], "config": zse_config(s, cfg, gen, tok_cfg, tok),
             "tokenizer_config": plain_json(tok_cfg), "tokenizer_type": tok_type, "chat_template": template,
             "generation": gen,
             "quant": {"scheme": quant, "group_size": group, "embed": embed, "lm_head": head, "keep_fp16": []},
             "provenance": {"source_files": [], "zse_version": "synth_model.py --zse-direct",
                            "created": __import__("time").strftime("%Y-%m-%dT%H:%M:%SZ", __import__("time").gmtime())},
             "blobs": {"tokenizer.json": {"offset": data_offset, "size": len(tok_bytes),
                                          "checksum": f"{hasher.once(tok_bytes):016x}"}},
             "tensors": tensors}
        if banks:
            h["experts"] = banks
        return h, end

    hasher = Hasher()
    # the header's length fixes the data's start, which the header holds: iterate (checksums are fixed width)
    data_offset = ALIGN
    for _ in range(8):
        h, end = header(data_offset, {}, {})
        want = align(64 + len(json.dumps(h, separators=(",", ":"), ensure_ascii=False).encode()))
        if want == data_offset:
            break
        data_offset = want
    tmp = a.zse_direct + ".tmp"
    filler = Filler(a.seed)
    sums, bank_sums, done, total = {}, {}, 0, end
    with open(tmp, "wb") as f:
        f.truncate(end)
        f.seek(data_offset)
        f.write(tok_bytes)
        for i, t in enumerate(plan):
            f.seek(t["offset"])
            rng = np.random.default_rng([a.seed, zlib.crc32(str(t.get("name", t.get("bank"))).encode())])
            if "bank" in t:
                bank_sums[i] = []
                for e in range(t["count"]):
                    f.seek(t["offset"] + e * t["stride"])
                    hasher.start()
                    pos = 0
                    for p in t["parts"]:
                        if p["at"] > pos:
                            pad = bytes(p["at"] - pos)
                            f.write(pad)
                            hasher.update(pad)
                        for c in tensor_chunks(filler, rng, quant, p["rows"], p["cols"], group, "weight"):
                            f.write(c)
                            hasher.update(c)
                        pos = p["at"] + p["size"]
                    bank_sums[i].append(hasher.digest())
                done += t["stride"] * t["count"]
            else:
                hasher.start()
                for c in tensor_chunks(filler, rng, t["scheme"], t["rows"], t["cols"], t["group"], t["kind"]):
                    f.write(c)
                    hasher.update(c)
                sums[i] = hasher.digest()
                done += t["size"]
            if i % 16 == 0:
                print(f"\r{done / 1e9:.2f} / {total / 1e9:.2f} GB", end="", file=sys.stderr, flush=True)
        h, end2 = header(data_offset, sums, bank_sums)
        body = json.dumps(h, separators=(",", ":"), ensure_ascii=False).encode()
        if align(64 + len(body)) != data_offset or end2 != end:
            sys.exit("synth_model: the header's layout moved (internal error)")
        pre = bytearray(64)
        pre[0:8] = b"ZSEMODEL"
        pre[8:16] = struct.pack("<HHI", 2 if moe else 1, 0, 0)
        pre[16:56] = struct.pack("<QQQQQ", 64, len(body), hasher.once(body), data_offset, end)
        pre[56:64] = struct.pack("<Q", hasher.once(bytes(pre[:56])))
        f.seek(0)
        f.write(pre)
        f.write(body)
    os.replace(tmp, a.zse_direct)
    print(f"\r{a.zse_direct}: {end / 1e9:.2f} GB, {quant}", file=sys.stderr)


# ---- --gguf-direct: the same shape for llama.cpp -------------------------------------------

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "qwen3_moe": "qwen3moe"}
T_F32, T_Q4_0 = 0, 2   # GGML types
V_U32, V_I32, V_F32, V_STR, V_ARR = 4, 5, 6, 8, 9


def gguf_str(b):
    b = b.encode() if isinstance(b, str) else b
    return struct.pack("<Q", len(b)) + b


def gguf_kv(key, vtype, value, etype=None):
    out = gguf_str(key) + struct.pack("<I", vtype)
    if vtype == V_ARR:
        out += struct.pack("<IQ", etype, len(value))
        if etype == V_STR:
            return out + b"".join(gguf_str(v) for v in value)
        return out + np.asarray(value, dtype="<i4" if etype == V_I32 else "<u4").tobytes()
    if vtype == V_STR:
        return out + gguf_str(value)
    return out + struct.pack({V_U32: "<I", V_I32: "<i", V_F32: "<f"}[vtype], value)


def gguf_tensors(s):
    """(name, ggml dims [cols, rows(, experts)], type, kind) in llama.cpp's names and order"""
    h, hd = s["hidden"], s["head_dim"]
    q, kv = s["heads"] * hd, s["kv_heads"] * hd
    yield "token_embd.weight", [h, s["vocab"]], T_Q4_0, "weight"
    moe = s["arch"] in MOE_ARCHS
    for l in range(s["layers"]):
        b = f"blk.{l}."
        yield b + "attn_norm.weight", [h], T_F32, "norm"
        for n, rows in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
            yield b + n + ".weight", [h, rows], T_Q4_0, "weight"
            if s["bias"]:
                yield b + n + ".bias", [rows], T_F32, "bias"
        if s["arch"] in ("qwen3", "qwen3_moe"):
            yield b + "attn_q_norm.weight", [hd], T_F32, "norm"
            yield b + "attn_k_norm.weight", [hd], T_F32, "norm"
        yield b + "attn_output.weight", [q, h], T_Q4_0, "weight"
        yield b + "ffn_norm.weight", [h], T_F32, "norm"
        if moe:
            f, e = s["moe_ffn"], s["experts"]
            yield b + "ffn_gate_inp.weight", [h, e], T_F32, "router"
            yield b + "ffn_gate_exps.weight", [h, f, e], T_Q4_0, "weight"
            yield b + "ffn_down_exps.weight", [f, h, e], T_Q4_0, "weight"
            yield b + "ffn_up_exps.weight", [h, f, e], T_Q4_0, "weight"
        else:
            yield b + "ffn_gate.weight", [h, s["ffn"]], T_Q4_0, "weight"
            yield b + "ffn_down.weight", [s["ffn"], h], T_Q4_0, "weight"
            yield b + "ffn_up.weight", [h, s["ffn"]], T_Q4_0, "weight"
    yield "output_norm.weight", [h], T_F32, "norm"
    if not s["tied"]:
        yield "output.weight", [h, s["vocab"]], T_Q4_0, "weight"


def gguf_nbytes(dims, t):
    n = int(np.prod(dims))
    return n * 4 if t == T_F32 else n // 32 * 18


def write_gguf_direct(s, a):
    arch = GGUF_ARCH.get(s["arch"])
    if not arch:
        sys.exit(f"synth_model: --gguf-direct writes llama, mistral, mixtral, qwen2, qwen3 and qwen3_moe shapes, not {s['arch']}")
    tok = json.load(open(os.path.join(a.tokenizer, "tokenizer.json")))
    top, eos, bos = token_ids(a.tokenizer)
    vocab = tok["model"]["vocab"]
    tokens = [None] * (top + 1)
    types = [1] * (top + 1)
    for t, i in vocab.items():
        tokens[i] = t
    for t in tok.get("added_tokens", []):
        tokens[t["id"]] = t["content"]
        types[t["id"]] = 3 if t.get("special") else 4
    for i in range(len(tokens)):
        if tokens[i] is None:
            tokens[i], types[i] = f"[PAD{i}]", 4
    tokens += [f"[PAD{i}]" for i in range(len(tokens), s["vocab"])]
    types += [4] * (s["vocab"] - len(types))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    for dims in (d for _, d, t, _ in gguf_tensors(s) if t == T_Q4_0):
        if dims[0] % 32:
            sys.exit(f"synth_model: Q4_0 rows of {dims[0]} are not a multiple of 32")
    k = arch + "."
    kvs = [gguf_kv("general.architecture", V_STR, arch), gguf_kv("general.name", V_STR, f"synth {s['arch']}"),
           gguf_kv("general.file_type", V_U32, 2), gguf_kv("general.alignment", V_U32, 32),
           gguf_kv(k + "vocab_size", V_U32, s["vocab"]), gguf_kv(k + "context_length", V_U32, s["ctx"]),
           gguf_kv(k + "embedding_length", V_U32, s["hidden"]), gguf_kv(k + "block_count", V_U32, s["layers"]),
           gguf_kv(k + "feed_forward_length", V_U32, s["ffn"]),
           gguf_kv(k + "attention.head_count", V_U32, s["heads"]),
           gguf_kv(k + "attention.head_count_kv", V_U32, s["kv_heads"]),
           gguf_kv(k + "attention.key_length", V_U32, s["head_dim"]),
           gguf_kv(k + "attention.value_length", V_U32, s["head_dim"]),
           gguf_kv(k + "rope.dimension_count", V_U32, s["head_dim"]),
           gguf_kv(k + "rope.freq_base", V_F32, float(s["theta"])),
           gguf_kv(k + "attention.layer_norm_rms_epsilon", V_F32, 1e-6),
           gguf_kv("tokenizer.ggml.model", V_STR, "gpt2"), gguf_kv("tokenizer.ggml.pre", V_STR, "qwen2"),
           gguf_kv("tokenizer.ggml.tokens", V_ARR, tokens, V_STR),
           gguf_kv("tokenizer.ggml.token_type", V_ARR, types, V_I32),
           gguf_kv("tokenizer.ggml.merges", V_ARR, merges, V_STR),
           gguf_kv("tokenizer.ggml.eos_token_id", V_U32, eos if eos is not None else 0)]
    if bos is not None:
        kvs.append(gguf_kv("tokenizer.ggml.bos_token_id", V_U32, bos))
    if s["arch"] in MOE_ARCHS:
        kvs += [gguf_kv(k + "expert_count", V_U32, s["experts"]), gguf_kv(k + "expert_used_count", V_U32, s["experts_used"])]
        if s["arch"] != "mixtral":
            kvs.append(gguf_kv(k + "expert_feed_forward_length", V_U32, s["moe_ffn"]))
    infos, off, items = [], 0, list(gguf_tensors(s))
    for name, dims, t, _ in items:
        infos.append(gguf_str(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) +
                     struct.pack("<IQ", t, off))
        off = align(off + gguf_nbytes(dims, t), 32)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(items), len(kvs)) + b"".join(kvs) + b"".join(infos)
    filler = Filler(a.seed)
    block = 0.02 * 12 ** 0.5 / 15  # a Q4_0 value is (q - 8) * d: uniform codes, std about 0.02
    tmp = a.gguf_direct + ".tmp"
    with open(tmp, "wb") as f:
        f.write(head)
        f.write(bytes(align(len(head), 32) - len(head)))
        base = f.tell()
        for (name, dims, t, kind), info in zip(items, infos):
            rel = struct.unpack("<Q", info[-8:])[0]
            f.seek(base + rel)
            n = int(np.prod(dims))
            if kind == "norm":
                f.write(Filler.const(1.0, "<f4", n))
            elif t == T_F32:
                rng = np.random.default_rng([a.seed, zlib.crc32(name.encode())])
                f.write((rng.standard_normal(n, np.float32) * np.float32(0.02)).astype("<f4").tobytes())
            else:  # Q4_0 blocks: f16 d, 16 bytes of codes; written a slab of blocks at a time
                scale = np.frombuffer(np.float16(block).tobytes(), np.uint8)
                left = n // 32
                while left:
                    k_ = min(left, 1 << 20)
                    buf = np.empty((k_, 18), np.uint8)
                    buf[:, :2] = scale
                    buf[:, 2:] = np.frombuffer(b"".join(filler.random(k_ * 16)), np.uint8).reshape(k_, 16)
                    f.write(buf.tobytes())
                    left -= k_
        f.truncate(base + off)
    os.replace(tmp, a.gguf_direct)
    print(f"{a.gguf_direct}: {(base + off) / 1e9:.2f} GB, Q4_0", file=sys.stderr)


def write_configs(s, a, eos, bos):
    """config.json, generation_config.json and the tokenizer files into --out"""
    os.makedirs(a.out, exist_ok=True)
    eos_ids = [eos if eos is not None else 0]
    json.dump(config_json(s, eos_ids[0], bos), open(os.path.join(a.out, "config.json"), "w"), indent=2)
    gen = {"eos_token_id": eos_ids, "do_sample": True, "temperature": 0.7, "top_p": 0.8}
    if bos is not None:
        gen["bos_token_id"] = bos
    json.dump(gen, open(os.path.join(a.out, "generation_config.json"), "w"), indent=2)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        src = os.path.join(a.tokenizer, f)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(a.out, f))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS))
    ap.add_argument("--out", help="directory to write (created); not needed with --zse-direct")
    ap.add_argument("--arch", choices=("qwen2", "llama", "mistral", "qwen3") + MOE_ARCHS)
    for k in ("layers", "hidden", "ffn", "heads", "kv-heads", "head-dim", "vocab", "ctx", "experts",
              "experts-used", "moe-ffn", "shared-ffn"):
        ap.add_argument("--" + k, type=int)
    ap.add_argument("--theta", type=float, help="rope theta")
    ap.add_argument("--tied", action=argparse.BooleanOptionalAction, help="tie embeddings and lm_head")
    ap.add_argument("--bias", action=argparse.BooleanOptionalAction, help="q/k/v biases")
    ap.add_argument("--tokenizer", default=default_tokenizer(), help="directory with tokenizer.json")
    ap.add_argument("--shard-gb", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--zse", help="then convert to this .zse file")
    ap.add_argument("--zse-direct", help="write this quantized .zse file directly (no bf16 source; --quant)")
    ap.add_argument("--gguf-direct", help="write this shape as a Q4_0 GGUF file for llama.cpp (no bf16 source)")
    ap.add_argument("--quant", default="int4", help="recipe for --zse (default int4)")
    ap.add_argument("--zse-bin", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "build", "zse"))
    a = ap.parse_args()
    s = shape_from_args(a)
    if not a.tokenizer:
        sys.exit("synth_model: no tokenizer found; pass --tokenizer DIR (a directory with tokenizer.json)")
    top, eos, bos = token_ids(a.tokenizer)
    if top >= s["vocab"]:
        sys.exit(f"synth_model: the tokenizer has ids up to {top}, more than --vocab {s['vocab']} holds")
    if a.zse_direct or a.gguf_direct:
        if a.out: # the configs beside the file, for tools that read config.json (synth_lora.py)
            write_configs(s, a, eos, bos)
        if a.zse_direct:
            write_direct(s, a)
        if a.gguf_direct:
            write_gguf_direct(s, a)
        return
    if not a.out:
        sys.exit("synth_model: --out DIR (or --zse-direct FILE) is required")

    write_configs(s, a, eos, bos)

    shards, cur, size = [], [], 0
    for item in tensors(s):
        n = nbytes(item[1])
        if cur and size + n > a.shard_gb * 1e9:
            shards.append(cur)
            cur, size = [], 0
        cur.append(item)
        size += n
    shards.append(cur)
    weight_map, total = {}, 0
    for i, items in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(os.path.join(a.out, fname), items, a.seed)
        for name, shape, _ in items:
            weight_map[name] = fname
            total += nbytes(shape)
        print(f"wrote {fname} ({sum(nbytes(t[1]) for t in items) / 1e9:.2f} GB)", file=sys.stderr)
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              open(os.path.join(a.out, "model.safetensors.index.json"), "w"), indent=1)
    params = total // 2
    print(f"{a.out}: {params / 1e9:.3f} B parameters, {total / 1e9:.2f} GB bf16 in {len(shards)} shard(s)",
          file=sys.stderr)
    if a.zse:
        cmd = [a.zse_bin, "convert", a.out, "-o", a.zse, "--quant", a.quant, "--force"]
        print(" ".join(cmd), file=sys.stderr)
        sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
