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
The Unigram and WordPiece variants are trained on tests/fixtures/eval.txt: Unigram by the
`sentencepiece` package (as T5/ALBERT/XLNet vocabularies are), converted the way
transformers' SentencePiece converter does, with a Precompiled normalizer built from a small
normalization rule table; WordPiece by `tokenizers`' WordPieceTrainer. `--only a,b` rewrites
just those variants (index.json keeps the others).
"""
import argparse, glob, json, os, random, sysconfig, tempfile

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


EVAL_TXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "eval.txt")

# texts the Unigram/WordPiece variants add: accents and combining marks (graphemes for
# Precompiled), full-width forms and ligatures, CJK (BertNormalizer pads it), control and
# format characters, U+FFFD and NUL (clean_text drops them), long words (WordPiece's
# max_input_chars_per_word), contractions and punctuation (the WordPiece decoder's cleanup)
MODEL_TEXTS = ["Ｈｅｌｌｏ ﬁne ①② ｗｏｒｌｄ", "e\u0301te\u0301 cafe\u0301 Ｅ\u0301", "中文字符 and 日本語テキスト",
               "ctrl\x01\x7f \u200bzero\u200dwidth \ufffd\x00 nul", "I don't think it's , fine . really ?",
               "supercalifragilisticexpialidocious unbelievable", "Tokenizer.json FORMAT, version 1!",
               "x\ty\u00a0z\u3000w", "  many   spaces   between  ", "ÀÉÎÕÜ àéîõü Ǆ ǅ ǆ", "12345 67.89 ①",
               "weird-chars: 🤖 \U0001F600\U0001F600 ok"]


def spm_rules(path):
    # a small normalization table in SentencePiece's TSV form (source code points, tab,
    # target code points): full-width ASCII, ligatures, circled digits, odd spaces, a
    # two-character source (e + combining acute), and a character removed
    rows = []
    for c in range(0xFF01, 0xFF5F):
        rows.append((f"{c:X}", f"{c - 0xFEE0:X}"))
    rows += [("FB01", "66 69"), ("FB02", "66 6C"), ("2460", "31"), ("2461", "32"), ("2462", "33"),
             ("A0", "20"), ("3000", "20"), ("9", "20"), ("65 301", "E9"), ("45 301", "C9"), ("200B", ""),
             ("2028", "20")]
    with open(path, "w") as f:
        for a, b in rows:
            f.write(f"{a}\t{b}\n")


def spm_train(workdir, name, **kw):
    import sentencepiece as spm
    rules = os.path.join(workdir, "rules.tsv")
    spm_rules(rules)
    prefix = os.path.join(workdir, name)
    spm.SentencePieceTrainer.train(input=EVAL_TXT, model_prefix=prefix, model_type="unigram",
                                   normalization_rule_tsv=rules, character_coverage=1.0,
                                   minloglevel=2, **kw)
    from sentencepiece import sentencepiece_model_pb2 as pb
    m = pb.ModelProto()
    m.ParseFromString(open(prefix + ".model", "rb").read())
    return m


def unigram_t5_variant():
    # T5-style: Precompiled + Replace(" {2,}"), Metaspace(always), "$A </s>"
    with tempfile.TemporaryDirectory() as d:
        m = spm_train(d, "t5", vocab_size=400, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    vocab = [(p.piece, p.score) for p in m.pieces]
    tok = Tokenizer(models.Unigram(vocab, unk_id=m.trainer_spec.unk_id, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Precompiled(m.normalizer_spec.precompiled_charsmap),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    return tok


def unigram_albert_variant():
    # ALBERT/XLNet-style normalizers around Precompiled (quotes, NFKD, StripAccents,
    # Lowercase, Strip right, runs of spaces to ▁), byte fallback in the model, the
    # Llama-style decoder chain, "[CLS] $A [SEP]"
    with tempfile.TemporaryDirectory() as d:
        m = spm_train(d, "albert", vocab_size=700, byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                      bos_piece="[CLS]", eos_piece="[SEP]")
    vocab = [(p.piece, p.score) for p in m.pieces]
    tok = Tokenizer(models.Unigram(vocab, unk_id=m.trainer_spec.unk_id, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([
        normalizers.Replace("``", '"'), normalizers.Replace("''", '"'), normalizers.NFKD(),
        normalizers.StripAccents(), normalizers.Lowercase(),
        normalizers.Precompiled(m.normalizer_spec.precompiled_charsmap),
        normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), "▁")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.add_special_tokens(["<pad>", "<unk>", "[CLS]", "[SEP]"])
    return tok


def wordpiece_trainer(vocab_size, **kw):
    return trainers.WordPieceTrainer(vocab_size=vocab_size, show_progress=False,
                                     special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], **kw)


def wordpiece_bert_variant():
    # BERT uncased: BertNormalizer (clean_text, CJK, accents follow lowercase), BertPreTokenizer,
    # the WordPiece decoder with cleanup, "[CLS] $A [SEP]"
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.train([EVAL_TXT], wordpiece_trainer(700, limit_alphabet=80))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


def wordpiece_cased_variant():
    # cased WordPiece with its own prefix and a short max_input_chars_per_word, Nmt and a
    # BertNormalizer that keeps case and accents, Whitespace/Punctuation/Digits splits, the
    # CTC decoder, BertProcessing
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="@@", max_input_chars_per_word=12))
    tok.normalizer = normalizers.Sequence([normalizers.Nmt(), normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=False, strip_accents=False, lowercase=False)])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.CTC(pad_token="[PAD]", word_delimiter_token="@@", cleanup=True)
    tok.train([EVAL_TXT], wordpiece_trainer(600, limit_alphabet=90, continuing_subword_prefix="@@"))
    tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
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


MODEL_VARIANTS = ("unigram-t5", "unigram-albert", "wordpiece-bert", "wordpiece-cased-ctc")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/tokenizers")
    ap.add_argument("--only", default="", help="comma-separated variant names to rewrite")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    makers = {
        "nfkc-lowercase-digits": lambda: bytelevel_variant(
            normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()]),
            pre_tokenizers.Digits(individual_digits=True)),
        "nfd-strip-replace": lambda: bytelevel_variant(
            normalizers.Sequence([normalizers.NFD(), normalizers.Strip(), normalizers.Replace("\t", "    ")]),
            pre_tokenizers.Split(Regex(r"\p{N}+"), behavior="merged_with_previous")),
        "added-tokens": lambda: bytelevel_variant(
            normalizers.NFC(), pre_tokenizers.Split(" ", behavior="merged_with_next"),
            added=[AddedToken("<special>", special=True),
                   AddedToken("<tag>", lstrip=True, rstrip=True, special=False, normalized=False),
                   AddedToken("<single>", single_word=True, special=False, normalized=False)]),
        "spm-bytefallback": spm_variant,
        "metaspace-nfkc": metaspace_variant,
        "metaspace-always-nosplit": lambda: metaspace_variant("always", False, normalizers.NFKD()),
        "subword-affixes": subword_variant,
        "split-behaviours": split_variant,
        "punct-bytefallback": punct_variant,
        "added-normalized": added_normalized_variant,
        "unigram-t5": unigram_t5_variant,
        "unigram-albert": unigram_albert_variant,
        "wordpiece-bert": wordpiece_bert_variant,
        "wordpiece-cased-ctc": wordpiece_cased_variant,
    }
    only = [n for n in a.only.split(",") if n]
    for n in only:
        if n not in makers:
            raise SystemExit(f"unknown variant {n}")
    shared_rng = random.Random(7)  # the BPE variants draw their decode cases from one sequence
    for name, make in makers.items():
        if only and name not in only:
            continue
        rng = random.Random(sum(map(ord, name))) if name in MODEL_VARIANTS else shared_rng
        tok = make()
        tok.save(os.path.join(a.out, name + ".json"))
        enc = []
        for t in TEXTS + (MODEL_TEXTS if name in MODEL_VARIANTS else []):
            ids = tok.encode(t, add_special_tokens=False).ids
            enc.append({"text": t, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False),
                        "ids_with_special": tok.encode(t).ids})
        goldens = {"encode": enc, "decode": decode_cases(tok, rng)}
        with open(os.path.join(a.out, name + ".goldens.json"), "w") as f:
            json.dump(goldens, f, ensure_ascii=False, indent=0)
        print(name, os.path.getsize(os.path.join(a.out, name + ".json")))
    with open(os.path.join(a.out, "index.json"), "w") as f:
        json.dump(list(makers), f, indent=0)


if __name__ == "__main__":
    main()
