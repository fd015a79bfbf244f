#!/usr/bin/env python3
"""Small tokenizer.json files that exercise each pipeline component zse implements, with
goldens from Hugging Face `tokenizers`:

    python3 tools/make_tokenizer_goldens.py --out tests/fixtures/tokenizers

Writes NAME.json (a tokenizer.json) and NAME.goldens.json for every variant, and index.json
listing the names. A goldens file holds
  "encode": [{text, ids, decoded, ids_with_special}] — encode(text, add_special_tokens=False)
            (special tokens in the text are parsed, as HF does), its decode, and
            encode(text) with the post-processor's tokens;
  "decode": [{ids, skip_special, text}] — decode() of arbitrary id sequences (random ids,
            byte-token runs that are not valid UTF-8), which exercises the decoders on
            sequences encode never produces.
The BPE models are trained on a few Python standard-library files so the files stay small.
"""
import argparse, glob, json, os, random, sysconfig

from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors, trainers)

TEXTS = ["Hello World", "  leading spaces and\ttabs\n", "ÉCOLE ﬁne Ｆｕｌｌｗｉｄｔｈ ①②", "naïve café",
         "numbers 1234567 and 3.14", "def f(x):\n    return x ** 2  # square", "日本語 한국어 русский",
         "emoji 🤖 ok", "<special> inside <special>text", " <tag> spaced  <tag>  ", "word<single>word <single> x",
         "MiXeD CaSe", "", " ", "a" * 50, "x\ny\r\nz", "tab\t\tend", "ǅ ǈ ǋ ß ẞ",
         # added in the second round: Unicode whitespace, special lowercase, dashes, camel case
         "İstanbul ΣΑΣ ς", "x\u00a0<tag>\u3000y", "\u2003lead and trail\u2003", "a-b-c 12-34--5",
         "HeLLo hello HELLO hellO", "[MASK] mask [MASK]x", "<Raw> raw  <Raw>", "CamelCaseWords123456",
         "   ", "🤖🤖 x", "ab\u0301c", "a.b,c;d!e?f", "x" * 300 + " " + "9" * 40]


def corpus():
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:40]
    extra = os.path.join(os.path.dirname(__file__), "..", "docs", "FORMAT.md")
    return files + [extra]


def bpe_trainer(vocab_size, **kw):
    return trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, **kw)


def bytelevel_variant(normalizer, extra_pre=None, added=(), prefix_space=False, model=None):
    tok = Tokenizer(model or models.BPE())
    tok.normalizer = normalizer
    steps = ([extra_pre] if extra_pre else []) + [pre_tokenizers.ByteLevel(add_prefix_space=prefix_space,
                                                                           use_regex=extra_pre is None)]
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    tok.train(corpus(), bpe_trainer(600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
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
    tok.train(corpus(), bpe_trainer(900, special_tokens=["<unk>", "<s>", "</s>"] + bytes_))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def metaspace_variant(scheme="first", split=True, normalizer=None):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizer or normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=split)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme, split=split)
    tok.train(corpus(), bpe_trainer(700, special_tokens=["<unk>"]))
    return tok


def subword_variant():
    # a non-byte-level BPE with WordPiece-like affixes: continuing_subword_prefix,
    # end_of_word_suffix, a small alphabet so unknown characters fuse into one [UNK];
    # no decoder, so decode joins tokens with spaces as HF does
    kw = dict(continuing_subword_prefix="##", end_of_word_suffix="</w>")
    tok = Tokenizer(models.BPE(unk_token="[UNK]", fuse_unk=True, **kw))
    tok.normalizer = normalizers.Sequence([normalizers.NFKD(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train(corpus(), bpe_trainer(500, special_tokens=["[UNK]", "[CLS]", "[SEP]"], limit_alphabet=45, **kw))
    tok.post_processor = processors.BertProcessing(("[SEP]", 2), ("[CLS]", 1))
    return tok


def split_variant():
    # Split behaviours the other variants lack (contiguous, merged_with_next, inverted
    # merged_with_previous), a regex Replace normalizer, and ByteLevel's prefix space added
    # to every piece; RobertaProcessing around the sequence
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"[ \t]{2,}"), " "),
                                           normalizers.Strip(left=True, right=False)])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d"), behavior="contiguous"),
        pre_tokenizers.Split(Regex(r"[A-Z]"), behavior="merged_with_next"),
        pre_tokenizers.Split(Regex(r"[a-z]+"), behavior="merged_with_previous", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=False)])
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace(Regex(r"\s+$"), "")])
    tok.train(corpus(), bpe_trainer(600, special_tokens=["<s>", "</s>"],
                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.RobertaProcessing(("</s>", 1), ("<s>", 0))
    return tok


def punct_variant():
    # WhitespaceSplit, CharDelimiterSplit, Punctuation (contiguous) and grouped Digits in
    # front of a plain BPE with byte fallback (ByteFallback + Fuse decoders, no ▁)
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.CharDelimiterSplit("-"),
        pre_tokenizers.Punctuation(behavior="contiguous"), pre_tokenizers.Digits(individual_digits=False)])
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tok.train(corpus(), bpe_trainer(700, special_tokens=bytes_, limit_alphabet=60))
    return tok


def added_normalized_variant():
    # added tokens matched in normalized text (normalized=True, lowercased content) and in
    # raw text (normalized=False), special ones with lstrip/rstrip, a single_word one;
    # ignore_merges on the model
    tok = bytelevel_variant(normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()]),
                            model=models.BPE(ignore_merges=True))
    tok.add_tokens([AddedToken("HeLLo", normalized=True), AddedToken("<Raw>", normalized=False, lstrip=True),
                    AddedToken("mask", normalized=True, single_word=True)])
    tok.add_special_tokens([AddedToken("[MASK]", normalized=True, lstrip=True, rstrip=True),
                            AddedToken("<tag>", normalized=False, rstrip=True)])
    return tok


def decode_cases(tok, rng):
    n = tok.get_vocab_size(with_added_tokens=True)
    cases = []
    for _ in range(12):
        ids = [rng.randrange(n) for _ in range(rng.randrange(1, 12))]
        cases.append(ids)
    vocab = tok.get_vocab()
    byte_ids = [vocab[f"<0x{b:02X}>"] for b in (0xE6, 0x97, 0xA5, 0xFF, 0x41) if f"<0x{b:02X}>" in vocab]
    if len(byte_ids) == 5:
        e6, x97, xa5, ff, a = byte_ids
        cases += [[e6, x97, xa5], [e6, x97], [a, e6, x97, a], [ff], [e6, x97, xa5, e6]]
    out = []
    for ids in cases:
        for skip in (False, True):
            out.append({"ids": ids, "skip_special": skip, "text": tok.decode(ids, skip_special_tokens=skip)})
    return out


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
        "metaspace-always-nosplit": metaspace_variant("always", False, normalizers.NFKD()),
        "subword-affixes": subword_variant(),
        "split-behaviours": split_variant(),
        "punct-bytefallback": punct_variant(),
        "added-normalized": added_normalized_variant(),
    }
    rng = random.Random(7)
    for name, tok in variants.items():
        tok.save(os.path.join(a.out, name + ".json"))
        enc = []
        for t in TEXTS:
            ids = tok.encode(t, add_special_tokens=False).ids
            enc.append({"text": t, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False),
                        "ids_with_special": tok.encode(t).ids})
        goldens = {"encode": enc, "decode": decode_cases(tok, rng)}
        with open(os.path.join(a.out, name + ".goldens.json"), "w") as f:
            json.dump(goldens, f, ensure_ascii=False, indent=0)
        print(name, os.path.getsize(os.path.join(a.out, name + ".json")))
    with open(os.path.join(a.out, "index.json"), "w") as f:
        json.dump(list(variants), f, indent=0)


if __name__ == "__main__":
    main()
