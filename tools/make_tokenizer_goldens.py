#!/usr/bin/env python3
"""Small tokenizer.json files that exercise each pipeline component zse implements, with
goldens from Hugging Face `tokenizers`:

    python3 tools/make_tokenizer_goldens.py --out tests/fixtures/tokenizers

Each NAME.json is a tokenizer.json; NAME.goldens.json lists {text, ids, decoded} for
encode(text, add_special_tokens=False) (special tokens in text are parsed, as HF does).
"""
import argparse, glob, json, os, sysconfig

from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors, trainers)

TEXTS = ["Hello World", "  leading spaces and\ttabs\n", "ÉCOLE ﬁne Ｆｕｌｌｗｉｄｔｈ ①②", "naïve café",
         "numbers 1234567 and 3.14", "def f(x):\n    return x ** 2  # square", "日本語 한국어 русский",
         "emoji 🤖 ok", "<special> inside <special>text", " <tag> spaced  <tag>  ", "word<single>word <single> x",
         "MiXeD CaSe", "", " ", "a" * 50, "x\ny\r\nz", "tab\t\tend", "ǅ ǈ ǋ ß ẞ"]


def corpus():
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:40]
    extra = os.path.join(os.path.dirname(__file__), "..", "docs", "FORMAT.md")
    return files + [extra]


def bytelevel_variant(normalizer, extra_pre=None, added=()):
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizer
    steps = ([extra_pre] if extra_pre else []) + [pre_tokenizers.ByteLevel(add_prefix_space=False)]
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    tok.train(corpus(), trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                            show_progress=False))
    tok.add_tokens(list(added))
    return tok


def spm_variant():
    # SentencePiece-style BPE as converted Llama/Mistral tokenizers are: ▁ prepend+replace,
    # byte fallback, and the Replace/ByteFallback/Fuse/Strip decoder chain
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tok.train(corpus(), trainers.BpeTrainer(vocab_size=900, special_tokens=["<unk>", "<s>", "</s>"] + bytes_,
                                            show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def metaspace_variant():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train(corpus(), trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>"], show_progress=False))
    return tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/tokenizers")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    variants = {
        "nfkc-lowercase-digits": bytelevel_variant(
            normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()]),
            pre_tokenizers.Digits(individual_digits=True)),
        "nfd-strip-replace": bytelevel_variant(
            normalizers.Sequence([normalizers.NFD(), normalizers.Strip(), normalizers.Replace("\t", "    ")]),
            pre_tokenizers.Split(Regex(r"\p{N}+"), behavior="merged_with_previous")),
        "added-tokens": bytelevel_variant(
            normalizers.NFC(), pre_tokenizers.Split(" ", behavior="merged_with_next"),
            added=[AddedToken("<special>", special=True),
                   AddedToken("<tag>", lstrip=True, rstrip=True, special=False, normalized=False),
                   AddedToken("<single>", single_word=True, special=False, normalized=False)]),
        "spm-bytefallback": spm_variant(),
        "metaspace-nfkc": metaspace_variant(),
    }
    for name, tok in variants.items():
        tok.save(os.path.join(a.out, name + ".json"))
        cases = []
        for t in TEXTS:
            ids = tok.encode(t, add_special_tokens=False).ids
            cases.append({"text": t, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False),
                          "ids_with_special": tok.encode(t).ids})
        json.dump(cases, open(os.path.join(a.out, name + ".goldens.json"), "w"), ensure_ascii=False, indent=0)
        print(name, os.path.getsize(os.path.join(a.out, name + ".json")))


if __name__ == "__main__":
    main()
