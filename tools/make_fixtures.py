#!/usr/bin/env python3
"""Make the project's tiny real test models and their Hugging Face goldens.

Runs on CPU (this machine) or on the GPU device alike (torch + transformers + tokenizers):

    python3 tools/make_fixtures.py --out tests/fixtures [--seconds 90]

Makes tests/fixtures/tiny-llama: a LlamaForCausalLM (untied embeddings, llama3 rope
scaling) with a Llama-3-style byte-level BPE tokenizer trained on the Python standard
library sources, the Llama-3.1 chat template, trained briefly, saved as bf16 safetensors,
plus goldens.json in the shape of ../shared/fixtures/tiny-qwen2/goldens.json, computed by
reloading the saved files in fp32 with eager attention.
"""
import argparse, glob, json, os, random, sys, sysconfig, time

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, decoders, processors, trainers, Regex
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, AutoModelForCausalLM, AutoTokenizer

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATE = os.path.join(HERE, "..", "..", "shared", "chat-templates", "templates",
                        "meta-llama-Llama-3.1-8B-Instruct.jinja")


def corpus_files():
    lib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(lib, "*.py")))
    random.Random(0).shuffle(files)
    return files[:120]


def train_tokenizer(vocab):
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(corpus_files(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    return tok


def training_text(limit=3_000_000):
    text = ""
    for f in corpus_files():
        try:
            text += open(f, encoding="utf-8").read()
        except UnicodeDecodeError:
            pass
        if len(text) > limit:
            break
    return text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures")
    ap.add_argument("--seconds", type=float, default=90)
    args = ap.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = os.path.join(args.out, "tiny-llama")
    os.makedirs(out, exist_ok=True)

    tok = train_tokenizer(2048)
    template = open(TEMPLATE).read()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>", pad_token="<|end_of_text|>")
    fast.chat_template = template
    fast.save_pretrained(out)

    ids = tok.encode(training_text(), add_special_tokens=False).ids
    data = torch.tensor(ids, dtype=torch.long)
    eot = tok.token_to_id("<|eot_id|>")
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=352,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=tok.token_to_id("<|begin_of_text|>"),
                      eos_token_id=[tok.token_to_id("<|end_of_text|>"), eot],
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64})
    model = LlamaForCausalLM(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seq, bs, t0, step = 128, 16, time.time(), 0
    while time.time() - t0 < args.seconds:
        starts = torch.randint(0, len(data) - seq - 1, (bs,))
        x = torch.stack([data[s:s + seq] for s in starts]).to(dev)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
    print(f"trained {step} steps, loss {loss.item():.3f}", file=sys.stderr)
    model.to(torch.bfloat16).save_pretrained(out)
    model.generation_config.eos_token_id = [tok.token_to_id("<|end_of_text|>"), eot]
    model.generation_config.save_pretrained(out)
    make_goldens(out, step, float(loss.item()))


def make_goldens(out, steps, loss):
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    texts = ["Hello world", "def add(a, b):\n    return a + b\n", "  leading and   multiple   spaces",
             "import os\nimport sys\n\n\nclass Foo(object):\n\tpass", "naïve café — déjà vu", "日本語のテキスト",
             "emoji 🤖🚀 done", "numbers 1234567 3.14159 1e-5", "tabs\tand\nnewlines\r\n", "",
             "<|begin_of_text|> special text", "x = {'a': [1, 2, 3]}  # comment", "Ünïcödé ÀÉÎ",
             "a" * 40, "The quick brown fox jumps over the lazy dog."]
    goldens = {"model": "tiny-llama", "meta": {"torch": torch.__version__, "train_steps": steps,
                                               "final_loss": loss, "seed": 0}}
    goldens["tokenizer"] = [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"],
                             "ids_with_special": tok(t)["input_ids"],
                             "decoded": tok.decode(tok(t, add_special_tokens=False)["input_ids"])} for t in texts]
    chats = [[{"role": "user", "content": "Write a function that adds two numbers."}],
             [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Sort a list?"}]]
    goldens["chat"] = [{"messages": m, "add_generation_prompt": True, "template_kwargs": {"date_string": "26 Jul 2024"},
                        "rendered": tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True,
                                                            date_string="26 Jul 2024")} for m in chats]
    for c in goldens["chat"]:
        c["ids"] = tok(c["rendered"], add_special_tokens=False)["input_ids"]
    goldens["logits"] = []
    for prompt in ["def fibonacci(n):\n", "import os\nimport ", "class Parser:\n    def __init__(self"]:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
            gen = model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False, min_new_tokens=48,
                                 pad_token_id=tok.pad_token_id)[0][len(ids):].tolist()
        goldens["logits"].append({"prompt": prompt, "ids": ids,
                                  "last_logits": [round(float(v), 5) for v in logits[-1]],
                                  "argmax_per_position": logits.argmax(-1).tolist(), "greedy_48": gen,
                                  "greedy_text": tok.decode(gen)})
    json.dump(goldens, open(os.path.join(out, "goldens.json"), "w"), indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
