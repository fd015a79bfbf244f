#!/usr/bin/env python3
"""Tiny random-weight models for configurations the trained fixtures do not cover, with
goldens from transformers (fp32, eager):

    python3 tools/make_random_models.py --out tests/fixtures/random

Each model reuses tests/fixtures/tiny-qwen2's tokenizer (vocab 2048), so every directory
is a complete Hugging Face model; goldens.json has the shape check_generation.py reads
(prompts as text, last-position logits, argmax per position, greedy continuation).
"""
import argparse, json, os, shutil

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "..", "tests", "fixtures", "random"))
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(TOK)
    for name, (cls, cfg_cls, extra) in MODELS.items():
        torch.manual_seed(0)
        out = os.path.join(args.out, name)
        os.makedirs(out, exist_ok=True)
        model = cls(cfg_cls(**COMMON, **extra)).eval()
        with torch.no_grad():  # larger weights than the init so logits are not all near zero
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.08)
        model.save_pretrained(out)  # f32
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(TOK, f), out)
        m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
        cases = []
        for prompt in PROMPTS:
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = m(torch.tensor([ids])).logits[0]
                gen = m.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                 pad_token_id=0)[0][len(ids):].tolist()
            cases.append({"prompt": prompt, "ids": ids, "last_logits": [round(float(v), 5) for v in logits[-1]],
                          "argmax_per_position": logits.argmax(-1).tolist(), "greedy_48": gen})
        json.dump({"model": name, "logits": cases, "meta": {"torch": torch.__version__, "seed": 0}},
                  open(os.path.join(out, "goldens.json"), "w"))
        print(name, "ok")


if __name__ == "__main__":
    main()
