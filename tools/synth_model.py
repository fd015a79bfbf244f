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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS))
    ap.add_argument("--out", required=True, help="directory to write (created)")
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
    ap.add_argument("--quant", default="int4", help="recipe for --zse (default int4)")
    ap.add_argument("--zse-bin", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "build", "zse"))
    a = ap.parse_args()
    s = shape_from_args(a)
    if not a.tokenizer:
        sys.exit("synth_model: no tokenizer found; pass --tokenizer DIR (a directory with tokenizer.json)")
    top, eos, bos = token_ids(a.tokenizer)
    if top >= s["vocab"]:
        sys.exit(f"synth_model: the tokenizer has ids up to {top}, more than --vocab {s['vocab']} holds")

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
