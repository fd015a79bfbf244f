#!/usr/bin/env python3
"""make_embedding_goldens.py MODEL_DIR OUT.json — what transformers gives as the embedding of
a few texts: the final hidden state (`hidden_states[-1]`, after the model's last norm) of
each token, mean-pooled and last-token-pooled, each scaled to unit length. tests/unit/
test_embed.c checks zse_embed against it. Needs torch + transformers (CPU), e.g.

    python3 tools/make_embedding_goldens.py tests/fixtures/tiny-qwen2 tests/fixtures/tiny-qwen2/embeddings.json
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXTS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())", "x",
         "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n"
         "        self.items.append(x)\n" * 3]


def main():
    src, dst = sys.argv[1], sys.argv[2]
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    cases = []
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].double()
        mean, last = h.mean(0), h[-1]
        cases.append({"text": text, "ids": ids, "mean": (mean / mean.norm()).tolist(),
                      "last": (last / last.norm()).tolist()})
    with open(dst, "w") as f:
        json.dump({"model": src, "transformers": __import__("transformers").__version__, "cases": cases}, f)


if __name__ == "__main__":
    main()
