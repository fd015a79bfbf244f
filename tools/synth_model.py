#!/usr/bin/env python3
"""Write a Hugging Face-style model directory with random weights at a real model's shape,
so benchmarks run at real sizes without downloads. Needs only numpy.

    python3 tools/synth_model.py --preset qwen2.5-7b --out /tmp/qwen7b-synth
    zse convert /tmp/qwen7b-synth -o qwen7b.zse --quant int4

Weights are bf16, N(0, 0.02) (norms 1.0), written shard by shard (at most --shard-gb each)
with model.safetensors.index.json; memory use stays at one tensor. The tokenizer files are
copied from --tokenizer (default: tests/fixtures/tiny-llama); token ids beyond that
tokenizer's vocabulary simply never occur in text.
"""
import argparse, json, os, shutil, struct, sys

import numpy as np

PRESETS = {
    # model_type, layers, hidden, ffn, heads, kv heads, vocab, tied, qkv bias, rope theta, ctx
    "qwen2.5-0.5b": ("qwen2", 24, 896, 4864, 14, 2, 151936, True, True, 1e6, 32768),
    "qwen2.5-1.5b": ("qwen2", 28, 1536, 8960, 12, 2, 151936, True, True, 1e6, 32768),
    "qwen2.5-7b": ("qwen2", 28, 3584, 18944, 28, 4, 152064, False, True, 1e6, 32768),
    "qwen2.5-32b": ("qwen2", 64, 5120, 27648, 40, 8, 152064, False, True, 1e6, 32768),
    "llama-3-8b": ("llama", 32, 4096, 14336, 32, 8, 128256, False, False, 5e5, 8192),
    "llama-3.2-1b": ("llama", 16, 2048, 8192, 32, 8, 128256, True, False, 5e5, 131072),
}


def bf16_bytes(a):
    u = a.astype(np.float32).view(np.uint32)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # round to nearest even
    return u.astype(np.uint16).tobytes()


def tensors(p):
    mt, L, H, F, nh, nkv, V, tied, bias, _, _ = p
    hd = H // nh
    yield "model.embed_tokens.weight", (V, H)
    for l in range(L):
        pre = f"model.layers.{l}."
        yield pre + "input_layernorm.weight", (H,)
        yield pre + "self_attn.q_proj.weight", (nh * hd, H)
        yield pre + "self_attn.k_proj.weight", (nkv * hd, H)
        yield pre + "self_attn.v_proj.weight", (nkv * hd, H)
        if bias:
            yield pre + "self_attn.q_proj.bias", (nh * hd,)
            yield pre + "self_attn.k_proj.bias", (nkv * hd,)
            yield pre + "self_attn.v_proj.bias", (nkv * hd,)
        yield pre + "self_attn.o_proj.weight", (H, nh * hd)
        yield pre + "post_attention_layernorm.weight", (H,)
        yield pre + "mlp.gate_proj.weight", (F, H)
        yield pre + "mlp.up_proj.weight", (F, H)
        yield pre + "mlp.down_proj.weight", (H, F)
    yield "model.norm.weight", (H,)
    if not tied:
        yield "lm_head.weight", (V, H)


def write_shard(path, items, rng):
    header, off = {}, 0
    for name, shape in items:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for name, shape in items:
            if len(shape) == 1:
                a = np.ones(shape, np.float32) if "norm" in name else rng.standard_normal(shape, np.float32) * 0.02
            else:
                a = rng.standard_normal(shape, np.float32) * 0.02
            f.write(bf16_bytes(a))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, help="override the layer count (quick tests)")
    ap.add_argument("--tokenizer", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "tiny-llama"))
    ap.add_argument("--shard-gb", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    p = list(PRESETS[a.preset])
    if a.layers:
        p[1] = a.layers
    mt, L, H, F, nh, nkv, V, tied, bias, theta, ctx = p
    os.makedirs(a.out, exist_ok=True)
    cfg = {"architectures": ["Qwen2ForCausalLM" if mt == "qwen2" else "LlamaForCausalLM"], "model_type": mt,
           "num_hidden_layers": L, "hidden_size": H, "intermediate_size": F, "num_attention_heads": nh,
           "num_key_value_heads": nkv, "vocab_size": V, "tie_word_embeddings": tied, "rope_theta": theta,
           "max_position_embeddings": ctx, "rms_norm_eps": 1e-6, "hidden_act": "silu",
           "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16"}
    json.dump(cfg, open(os.path.join(a.out, "config.json"), "w"), indent=2)
    json.dump({"eos_token_id": 1}, open(os.path.join(a.out, "generation_config.json"), "w"))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        src = os.path.join(a.tokenizer, f)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(a.out, f))
    rng = np.random.default_rng(a.seed)
    limit = a.shard_gb * 1e9
    shards, cur, size = [], [], 0
    for name, shape in tensors(p):
        n = int(np.prod(shape)) * 2
        if cur and size + n > limit:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    shards.append(cur)
    weight_map, total = {}, 0
    for i, items in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(os.path.join(a.out, fname), items, rng)
        for name, shape in items:
            weight_map[name] = fname
            total += int(np.prod(shape)) * 2
        print(f"wrote {fname}", file=sys.stderr)
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              open(os.path.join(a.out, "model.safetensors.index.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
