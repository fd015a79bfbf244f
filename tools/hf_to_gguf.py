#!/usr/bin/env python3
"""Write a GGUF file from a Hugging Face llama / mistral / qwen2 directory the way llama.cpp's
converter lays it out, with the `gguf` Python package: GGUF tensor names, llama's q/k rows
permuted for ggml's RoPE, Llama-3 RoPE scaling as a rope_freqs tensor, the byte-level BPE
vocabulary as tokenizer.ggml.* and the chat template. For zse's GGUF tests: small models only
(needs numpy and gguf, not torch).

    python3 tools/hf_to_gguf.py tests/fixtures/tiny-llama /tmp/tl.gguf --type Q8_0
    python3 tools/hf_to_gguf.py DIR OUT.gguf --type Q4_K --dequant-dir /tmp/ref

--type: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (the gguf package's quantizers) or
Q4_K, Q5_K, Q6_K (the small reference quantizers below: the package only decodes those);
1-D tensors stay F32, as llama.cpp keeps them. --dequant-dir writes a Hugging Face directory
whose F32 weights are what the package decodes from the GGUF's tensors (q/k rows put back):
the exact reference a conversion of the GGUF must match. --arch writes another architecture
name (for error tests).
"""
import argparse
import json
import math
import os
import shutil
import struct
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q

QK_K = 256


def read_safetensors(d):
    """name -> float32 array of every tensor in d (one file or an index of shards)"""
    idx = os.path.join(d, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else ["model.safetensors"]
    out = {}
    for fn in files:
        raw = open(os.path.join(d, fn), "rb").read()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        base = 8 + n
        for name, e in header.items():
            if name == "__metadata__":
                continue
            b, end = e["data_offsets"]
            buf = raw[base + b:base + end]
            dt = e["dtype"]
            if dt == "BF16":
                a = (np.frombuffer(buf, "<u2").astype(np.uint32) << 16).view(np.float32)
            elif dt == "F16":
                a = np.frombuffer(buf, "<f2").astype(np.float32)
            elif dt == "F32":
                a = np.frombuffer(buf, "<f4").copy()
            else:
                sys.exit(f"hf_to_gguf: {name} has dtype {dt}")
            out[name] = a.reshape(e["shape"])
    return out


def write_safetensors(path, tensors):
    header, off, blobs = {}, 0, []
    for name, a in tensors.items():
        b = np.ascontiguousarray(a, np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)


def permute(w, n_head):
    """llama.cpp's LlamaModel.permute: each head's [first half; second half] rows become pairs"""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- reference K-quant writers (valid blocks; quality is not the point) ------------------

def f16(x):
    return np.float16(x).astype(np.float32)


def q4k_q5k_block(x, bits):
    """one 256-element block of Q4_K (bits 4) or Q5_K (bits 5) as bytes"""
    top = (1 << bits) - 1
    sub = x.reshape(8, 32)
    mn = np.minimum(sub.min(axis=1), 0)
    sc_f = (sub.max(axis=1) - mn) / top
    m_f = -mn
    d = f16(sc_f.max() / 63) if sc_f.max() > 0 else np.float32(0)
    dmin = f16(m_f.max() / 63) if m_f.max() > 0 else np.float32(0)
    sc = np.clip(np.round(sc_f / d), 0, 63).astype(np.uint8) if d > 0 else np.zeros(8, np.uint8)
    m = np.clip(np.round(m_f / dmin), 0, 63).astype(np.uint8) if dmin > 0 else np.zeros(8, np.uint8)
    q = np.zeros((8, 32), np.uint8)
    for s in range(8):
        step = d * np.float32(sc[s])
        if step > 0:
            q[s] = np.clip(np.round((sub[s] + dmin * np.float32(m[s])) / step), 0, top)
    packed = np.zeros(12, np.uint8)
    for j in range(4):
        packed[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6)
        packed[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6)
        packed[j + 8] = (sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4)
    qs = np.zeros(128, np.uint8)
    for p in range(4):
        qs[p * 32:(p + 1) * 32] = (q[2 * p] & 0xF) | ((q[2 * p + 1] & 0xF) << 4)
    parts = [np.float16(d).tobytes(), np.float16(dmin).tobytes(), packed.tobytes()]
    if bits == 5:
        qh = np.zeros(32, np.uint8)
        for s in range(8):
            qh |= ((q[s] >> 4) & 1) << s
        parts.append(qh.tobytes())
    parts.append(qs.tobytes())
    return b"".join(parts)


def q6k_block(x):
    sub = x.reshape(16, 16)
    amax_i = np.abs(sub).argmax(axis=1)
    scale_f = sub[np.arange(16), amax_i] / -32
    d = f16(np.abs(scale_f).max() / 127) if np.abs(scale_f).max() > 0 else np.float32(0)
    sc = np.clip(np.round(scale_f / d), -128, 127).astype(np.int8) if d > 0 else np.zeros(16, np.int8)
    q = np.zeros(256, np.uint8)
    for s in range(16):
        step = d * np.float32(sc[s])
        v = np.round(sub[s] / step) if step != 0 else np.zeros(16)
        q[s * 16:(s + 1) * 16] = (np.clip(v, -32, 31) + 32).astype(np.uint8)
    ql, qh = np.zeros(128, np.uint8), np.zeros(64, np.uint8)
    for n in range(2):
        b = q[n * 128:(n + 1) * 128]
        ql[n * 64:n * 64 + 32] = (b[0:32] & 0xF) | ((b[64:96] & 0xF) << 4)
        ql[n * 64 + 32:n * 64 + 64] = (b[32:64] & 0xF) | ((b[96:128] & 0xF) << 4)
        qh[n * 32:(n + 1) * 32] = (b[0:32] >> 4) | ((b[32:64] >> 4) << 2) | ((b[64:96] >> 4) << 4) | ((b[96:128] >> 4) << 6)
    return ql.tobytes() + qh.tobytes() + sc.tobytes() + np.float16(d).tobytes()


def kquant(w, qtype):
    rows, cols = w.shape
    enc = {Q.Q4_K: lambda b: q4k_q5k_block(b, 4), Q.Q5_K: lambda b: q4k_q5k_block(b, 5), Q.Q6_K: q6k_block}[qtype]
    out = bytearray()
    for r in range(rows):
        for c in range(0, cols, QK_K):
            out += enc(w[r, c:c + QK_K])
    return np.frombuffer(bytes(out), np.uint8).reshape(rows, -1)


# ---- the model -----------------------------------------------------------------------------

LAYER = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
         "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.weight": "attn_k.weight",
         "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.weight": "attn_v.weight",
         "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.weight": "attn_output.weight",
         "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
         "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def gguf_name(hf):
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")
    return f"blk.{parts[2]}.{LAYER['.'.join(parts[3:])]}"


def rope_params(cfg):
    rp = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", rp.get("rope_theta", 10000.0))
    return theta, rp


def llama3_factors(cfg, head_dim):
    """llama.cpp's rope_freqs for Llama-3 scaling: each frequency's divisor"""
    theta, rp = rope_params(cfg)
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = rp.get("factor", 8.0), rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old = rp.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < old / high:
            out.append(1.0)
        elif wl > old / low:
            out.append(factor)
        else:
            s = (old / wl - low) / (high - low)
            out.append(1 / ((1 - s) / factor + s))
    return np.array(out, np.float32)


def add_vocab(w, d, arch):
    tok = json.load(open(os.path.join(d, "tokenizer.json")))
    vocab = tok["model"]["vocab"]
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    n = max(list(vocab.values()) + list(added)) + 1
    tokens, types = [f"[PAD{i}]" for i in range(n)], [5] * n  # 5: UNUSED holes
    for s, i in vocab.items():
        tokens[i], types[i] = s, 1
    for i, t in added.items():
        tokens[i], types[i] = t["content"], 3 if t.get("special") else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    tc = json.load(open(os.path.join(d, "tokenizer_config.json")))
    cfg = json.load(open(os.path.join(d, "config.json")))
    by_name = {t["content"]: t["id"] for t in added.values()}

    def tid(v):
        v = v.get("content") if isinstance(v, dict) else v
        return by_name.get(v) if v else None

    bos = cfg.get("bos_token_id") if cfg.get("bos_token_id") is not None else tid(tc.get("bos_token"))
    eos = tid(tc.get("eos_token"))
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    pp = tok.get("post_processor") or {}
    w.add_add_bos_token("SpecialToken" in json.dumps(pp.get("single", pp)))
    tmpl = os.path.join(d, "chat_template.jinja")
    if os.path.exists(tmpl):
        w.add_chat_template(open(tmpl).read())
    elif tc.get("chat_template"):
        w.add_chat_template(tc["chat_template"])


def write_gguf(src, out, type_name="F16", dequant_dir=None, arch_override=None):
    """the GGUF of the Hugging Face directory src at out (see the module's doc)"""
    cfg = json.load(open(os.path.join(src, "config.json")))
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}[cfg["model_type"]]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    qtype = Q[type_name]
    w = gguf.GGUFWriter(out, arch_override or arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg.get("max_position_embeddings", 4096))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    theta, rp = rope_params(cfg)
    w.add_rope_freq_base(theta)
    w.add_vocab_size(cfg["vocab_size"])
    add_vocab(w, src, arch)
    weights = read_safetensors(src)
    if cfg.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)
    reference = {}
    if (rp.get("rope_type") or rp.get("type")) == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_factors(cfg, head_dim))
    for hf, t in weights.items():
        if "rotary_emb" in hf:
            continue
        name = gguf_name(hf)
        perm = 0
        if arch == "llama" and (".q_proj." in hf or ".k_proj." in hf):
            perm = heads if ".q_proj." in hf else kv
            t = permute(t, perm)
        if t.ndim == 1 or qtype == Q.F32:
            data, stored = t.astype(np.float32), Q.F32
        elif qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
            data, stored = kquant(t, qtype), qtype
        else:
            data, stored = gguf.quants.quantize(t.astype(np.float32), qtype), qtype
        w.add_tensor(name, data, raw_dtype=stored if stored != Q.F32 else None)
        if dequant_dir:
            deq = gguf.quants.dequantize(data, stored).reshape(t.shape).astype(np.float32)
            reference[hf] = unpermute(deq, perm) if perm else deq
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if dequant_dir:
        os.makedirs(dequant_dir, exist_ok=True)
        for f in os.listdir(src):
            if not f.endswith(".safetensors") and f != "model.safetensors.index.json" and f != "goldens.json":
                shutil.copy(os.path.join(src, f), os.path.join(dequant_dir, f))
        write_safetensors(os.path.join(dequant_dir, "model.safetensors"), reference)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--type", default="F16")
    ap.add_argument("--dequant-dir")
    ap.add_argument("--arch", help="write this general.architecture instead (error tests)")
    a = ap.parse_args()
    write_gguf(a.src, a.out, a.type, a.dequant_dir, a.arch)


if __name__ == "__main__":
    main()
