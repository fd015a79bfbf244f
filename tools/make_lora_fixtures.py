#!/usr/bin/env python3
"""PEFT LoRA adapters on the tiny fixtures, with goldens from PEFT itself (fp32, eager):

    python3 tools/make_lora_fixtures.py --out tests/fixtures/lora     (torch, transformers, peft)

For each base (tests/fixtures/tiny-llama, tests/fixtures/tiny-qwen2) a few adapters of
different ranks, targets, lora_alpha, use_rslora, rank_pattern / alpha_pattern and layer
subsets, saved by PEFT (save_pretrained) in f32, bf16 or f16, with their weights random
(init_lora_weights=False, so B is not zero: the adapter changes the output). Goldens are
computed after reloading each saved adapter onto the fp32 base, so they see the same
numbers zse reads. tests/fixtures/lora/goldens.json:

    {"<base>": {"prompts": [{"text", "ids"}],
                "base": [{"last_logits", "greedy"}],           # adapter disabled
                "adapters": {"<name>": [{"last_logits", "greedy"}]}}}

one entry per prompt; last_logits of the last prompt position, greedy 24 new tokens (EOS
ignored, as `zse run --ignore-eos`).
"""
import argparse, json, os, shutil

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "tests", "fixtures")
PROMPTS = ["def fibonacci(n):\n    if n < 2:\n        return n\n", "import os\nimport sys\n\nclass Config:"]
GREEDY = 24
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

ADAPTERS = {
    "tiny-llama": {
        # every projection, rank 8, saved in f32
        "all-r8": (dict(r=8, lora_alpha=16, target_modules=ALL), torch.float32),
        # q and v only, rsLoRA scaling (alpha / sqrt(r)), saved in bf16
        "qv-rslora": (dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]), torch.bfloat16),
        # per-module ranks and alphas by pattern, only layers 0, 1 and 3, saved in f16
        "patterns": (dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                          rank_pattern={"k_proj": 2, "layers.3.self_attn.o_proj": 16},
                          alpha_pattern={"down_proj": 4.0}, layers_to_transform=[0, 1, 3]), torch.float16),
    },
    "tiny-qwen2": {
        # the MLP alone, rank 16 (qwen2's q/k/v carry biases: the delta goes after them)
        "mlp-r16": (dict(r=16, lora_alpha=32, target_modules=["gate_proj", "up_proj", "down_proj"]), torch.float32),
        # attention alone, rank 8, alpha = r
        "attn-r8": (dict(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), torch.bfloat16),
    },
}


def greedy(model, ids):
    out = model.generate(torch.tensor([ids]), max_new_tokens=GREEDY, do_sample=False, eos_token_id=None,
                         pad_token_id=0, min_new_tokens=GREEDY)
    return out[0, len(ids):].tolist()


def case(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].tolist()
        return {"last_logits": [float(f"{v:.7g}") for v in logits], "greedy": greedy(model, ids)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(FIX, "lora"))
    args = ap.parse_args()
    torch.manual_seed(1234)
    goldens = {}
    for base, adapters in ADAPTERS.items():
        src = os.path.join(FIX, base)
        tok = AutoTokenizer.from_pretrained(src)
        prompts = [{"text": p, "ids": tok(p, add_special_tokens=False)["input_ids"]} for p in PROMPTS]
        model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32, attn_implementation="eager")
        model.eval()
        g = {"prompts": prompts, "base": [case(model, p["ids"]) for p in prompts], "adapters": {}}
        for name, (cfg, dtype) in adapters.items():
            peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **cfg))
            with torch.no_grad():  # B random (PEFT's uniform init, scaled): a clear change of the output
                for n, p in peft_model.named_parameters():
                    if "lora_B" in n:
                        p.mul_(0.6)
            out = os.path.join(args.out, base, name)
            shutil.rmtree(out, ignore_errors=True)
            peft_model.to(dtype)
            peft_model.save_pretrained(out)
            os.remove(os.path.join(out, "README.md"))  # PEFT's model card template
            cfg_path = os.path.join(out, "adapter_config.json")
            saved = json.load(open(cfg_path))
            saved["base_model_name_or_path"] = f"tests/fixtures/{base}"
            with open(cfg_path, "w") as f:
                json.dump(saved, f, indent=2, sort_keys=True)
                f.write("\n")
            os.chmod(os.path.join(out, "adapter_model.safetensors"), 0o644)
            model = peft_model.unload().to(torch.float32)  # the base back, without the adapter
            # the goldens from the saved files, in fp32
            loaded = PeftModel.from_pretrained(model, out, torch_dtype=torch.float32)
            loaded.to(torch.float32).eval()
            g["adapters"][name] = [case(loaded, p["ids"]) for p in prompts]
            model = loaded.unload()
            print(f"{base}/{name}: {os.path.getsize(os.path.join(out, 'adapter_model.safetensors'))} bytes")
        goldens[base] = g
    with open(os.path.join(args.out, "goldens.json"), "w") as f:
        json.dump(goldens, f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
