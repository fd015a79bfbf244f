#!/usr/bin/env python3
"""Write a PEFT LoRA adapter directory with random weights for a model directory's shape, so
adapter loading and multi-adapter serving can be benchmarked at real sizes. Needs only numpy;
the safetensors file is written by hand.

    python3 tools/synth_lora.py --model /tmp/qwen7b-synth --rank 16 --out /tmp/lora-r16

--model is a Hugging Face model directory (its config.json gives the widths; e.g. one from
tools/synth_model.py). The adapter targets --targets (default: all seven projections of every
layer) at --rank with lora_alpha 2 x rank; A and B are N(0, --std) in f16 (B is not zero, so
the adapter changes the output), each tensor's values a function of --seed and its name.
"""
import argparse
import json
import os
import struct
import zlib

import numpy as np

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def widths(cfg, module):
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    kv = cfg.get("num_key_value_heads", heads) * head_dim
    q = heads * head_dim
    ffn = cfg["intermediate_size"]
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, ffn), "up_proj": (hidden, ffn), "down_proj": (ffn, hidden)}[module]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default=",".join(ALL))
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = json.load(open(os.path.join(args.model, "config.json")))
    targets = args.targets.split(",")
    tensors = []  # (name, shape)
    for layer in range(cfg["num_hidden_layers"]):
        for module in targets:
            part = "self_attn" if module in ALL[:4] else "mlp"
            fan_in, fan_out = widths(cfg, module)
            key = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors.append((f"{key}.lora_A.weight", (args.rank, fan_in)))
            tensors.append((f"{key}.lora_B.weight", (fan_out, args.rank)))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        size = shape[0] * shape[1] * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    os.makedirs(args.out, exist_ok=True)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(os.path.join(args.out, "adapter_model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in tensors:
            rng = np.random.default_rng([args.seed, zlib.crc32(name.encode())])
            f.write((rng.standard_normal(shape, dtype=np.float32) * args.std).astype("<f2").tobytes())
    config = {"peft_type": "LORA", "r": args.rank, "lora_alpha": 2 * args.rank, "target_modules": targets,
              "bias": "none", "use_rslora": False, "use_dora": False, "modules_to_save": None,
              "base_model_name_or_path": args.model, "task_type": "CAUSAL_LM"}
    with open(os.path.join(args.out, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    print(f"{args.out}: rank {args.rank} on {len(targets)} projections of {cfg['num_hidden_layers']} layers, "
          f"{offset / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
