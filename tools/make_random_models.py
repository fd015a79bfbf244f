#!/usr/bin/env python3
"""Tiny random-weight models for configurations the trained fixtures do not cover, with
goldens from transformers (fp32, eager):

    python3 tools/make_random_models.py --out tests/fixtures/random [--only NAME ...]

Each model reuses tests/fixtures/tiny-qwen2's tokenizer (vocab 2048), so every directory
is a complete Hugging Face model; goldens.json has the shape check_generation.py reads
(prompts as text, last-position logits, argmax per position, greedy continuation).

The qwen3 and mixture-of-experts models (qwen3-headdim, qwen2-moe, qwen3-moe, mixtral) are
stored in bf16 at hidden 16 to stay under ~300 KB a directory; their goldens come from
reloading those bf16 files in fp32, so zse's f32 conversion sees the same numbers.
qwen3-moe is saved in transformers 5's fused expert layout (save_original_format=False:
mlp.experts.gate_up_proj / down_proj as 3-D tensors), the others in the per-expert layout
released checkpoints use.
"""
import argparse, json, os, shutil

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

HERE = os.path.dirname(os.path.abspath(__file__))
TOK = os.path.join(HERE, "..", "tests", "fixtures", "tiny-qwen2")
PROMPTS = ["def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
           "import os\nimport sys\n"]

COMMON = dict(vocab_size=2048, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
              max_position_embeddings=512, rms_norm_eps=1e-6, eos_token_id=2)

MODELS = {
    # sliding window smaller than the prompts, so the window matters
    "mistral-window": (MistralForCausalLM, MistralConfig, dict(num_attention_heads=4, num_key_value_heads=2,
                                                              sliding_window=8, tie_word_embeddings=False)),
    # head_dim given explicitly, not hidden / heads (40 * 4 != 64)
    "llama-headdim40": (LlamaForCausalLM, LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=1,
                                                            head_dim=40, tie_word_embeddings=False)),
    "llama-rope-linear": (LlamaForCausalLM, LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=4,
                                                              rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                                               "rope_theta": 10000.0})),
    "llama-rope-yarn": (LlamaForCausalLM, LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2,
                                                            rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                             "rope_theta": 10000.0,
                                                                             "original_max_position_embeddings": 32})),
    "qwen2-untied": (Qwen2ForCausalLM, Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2,
                                                         tie_word_embeddings=False)),
}

# smaller, bf16: (class, config class, config, save in the original per-expert layout)
SMALL = dict(vocab_size=2048, hidden_size=16, max_position_embeddings=512, rms_norm_eps=1e-6, eos_token_id=2,
             tie_word_embeddings=True)
SMALL_MODELS = {
    # q/k RMSNorm per head; head_dim 16 with hidden 16 and 2 heads (not hidden / heads)
    "qwen3-headdim": (Qwen3ForCausalLM, Qwen3Config, dict(num_hidden_layers=2, intermediate_size=40,
                                                          num_attention_heads=2, num_key_value_heads=1,
                                                          head_dim=16), True),
    # shared expert with its sigmoid gate, top-4 of 8 without renormalization, experts only in
    # layer 1 of 3 (decoder_sparse_step 2), q/k/v biases
    "qwen2-moe": (Qwen2MoeForCausalLM, Qwen2MoeConfig, dict(num_hidden_layers=3, intermediate_size=40,
                                                            num_attention_heads=4, num_key_value_heads=2,
                                                            num_experts=8, num_experts_per_tok=4,
                                                            moe_intermediate_size=8,
                                                            shared_expert_intermediate_size=24,
                                                            decoder_sparse_step=2, norm_topk_prob=False), True),
    # top-3 of 8 renormalized, layer 1 dense (mlp_only_layers), q/k norms, head_dim 8 with
    # hidden 16 and 4 heads; fused expert tensors
    "qwen3-moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig, dict(num_hidden_layers=3, intermediate_size=40,
                                                            num_attention_heads=4, num_key_value_heads=2,
                                                            head_dim=8, num_experts=8, num_experts_per_tok=3,
                                                            moe_intermediate_size=12, mlp_only_layers=[1],
                                                            norm_topk_prob=True), False),
    # top-2 of 4, every layer (block_sparse_moe.experts.E.w1/w2/w3)
    "mixtral": (MixtralForCausalLM, MixtralConfig, dict(num_hidden_layers=2, intermediate_size=24,
                                                        num_attention_heads=4, num_key_value_heads=1,
                                                        num_local_experts=4, num_experts_per_tok=2), True),
}


def top2_gap(logits):
    """the smallest gap between a row's two largest values, relative to the row's largest magnitude"""
    top = logits.topk(2, dim=-1).values
    scale = logits.masked_fill(~torch.isfinite(logits), 0).abs().max(-1).values  # generate sets eos to -inf
    return float(((top[..., 0] - top[..., 1]) / scale).min())


def write_goldens(out, name, tok, seed=0):
    """Writes goldens.json; returns the margins a faithful reimplementation could still trip
    over: the smallest top-2 gap of any logit row zse is compared on (every prompt position,
    every greedy step) and, for MoE models, the smallest gap between the k-th and the next
    expert's probability (relative to the k-th) of any routing decision."""
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    route_gap = [1.0]

    def on_route(module, args, output):
        probs = torch.softmax(output[0].float(), dim=-1)
        top = probs.topk(min(module.top_k + 1, probs.shape[-1]), dim=-1).values
        if top.shape[-1] > module.top_k:
            route_gap[0] = min(route_gap[0], float(((top[:, -2] - top[:, -1]) / top[:, -2]).min()))

    for mod in m.modules():
        if type(mod).__name__.endswith("TopKRouter"):
            mod.register_forward_hook(on_route)
    cases, logit_gap = [], 1.0
    for prompt in PROMPTS:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = m(torch.tensor([ids])).logits[0]
            g = m.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                           pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        gen = g.sequences[0][len(ids):].tolist()
        logit_gap = min(logit_gap, top2_gap(logits), min(top2_gap(sc[0]) for sc in g.scores))
        cases.append({"prompt": prompt, "ids": ids, "last_logits": [round(float(v), 5) for v in logits[-1]],
                      "argmax_per_position": logits.argmax(-1).tolist(), "greedy_48": gen})
    json.dump({"model": name, "logits": cases, "meta": {"torch": torch.__version__, "seed": seed}},
              open(os.path.join(out, "goldens.json"), "w"))
    return logit_gap, route_gap[0]


def copy_tokenizer(out):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOK, f), out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "..", "tests", "fixtures", "random"))
    ap.add_argument("--only", nargs="*", help="make only these models")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(TOK)
    for name, (cls, cfg_cls, extra) in MODELS.items():
        if args.only and name not in args.only:
            continue
        torch.manual_seed(0)
        out = os.path.join(args.out, name)
        os.makedirs(out, exist_ok=True)
        model = cls(cfg_cls(**COMMON, **extra)).eval()
        with torch.no_grad():  # larger weights than the init so logits are not all near zero
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.08)
        model.save_pretrained(out)  # f32
        copy_tokenizer(out)
        write_goldens(out, name, tok)
        print(name, "ok")
    for name, (cls, cfg_cls, extra, original) in SMALL_MODELS.items():
        if args.only and name not in args.only:
            continue
        out = os.path.join(args.out, name)
        os.makedirs(out, exist_ok=True)
        # The first seed whose goldens keep clear of near-ties: a greedy pick or an expert
        # choice decided by less than f16 KV rounding would test luck, not zse.
        for seed in range(200):
            torch.manual_seed(seed)
            model = cls(cfg_cls(**SMALL, **extra)).eval()
            with torch.no_grad():  # weights large enough that routing and logits spread out
                for n, p in model.named_parameters():
                    if "norm" in n:
                        p.uniform_(0.8, 1.2)
                    elif p.dim() >= 2:
                        p.normal_(0, 0.25)
                    else:
                        p.normal_(0, 0.1)
            for f in os.listdir(out):
                os.remove(os.path.join(out, f))
            model.to(torch.bfloat16).save_pretrained(out, save_original_format=original)
            copy_tokenizer(out)
            logit_gap, route_gap = write_goldens(out, name, tok, seed)
            if logit_gap >= 1e-3 and route_gap >= 1e-3:
                break
            print(f"{name}: seed {seed} has a near-tie (logit gap {logit_gap:.2e}, routing gap {route_gap:.2e})",
                  flush=True)
        print(name, "seed", seed, f"logit gap {logit_gap:.2e}, routing gap {route_gap:.2e},",
              sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)), "bytes")


if __name__ == "__main__":
    main()
