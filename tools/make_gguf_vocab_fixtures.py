#!/usr/bin/env python3
"""Small GGUF vocabularies with goldens, so the GGUF reader is tested without ../shared:

    python3 tools/make_gguf_vocab_fixtures.py --out tests/fixtures/gguf

  llama-bpe.gguf  model gpt2, pre "llama-bpe", from tests/fixtures/tiny-llama (Llama-3 regex,
                  ignore_merges, add_bos) — goldens from HF `tokenizers` running the
                  tokenizer.json this GGUF describes (the source without its normalizer,
                  with ignore_merges and the BOS post-processor, added tokens matched raw)
  qwen2.gguf      model gpt2, pre "qwen2", from tests/fixtures/tiny-qwen2, the same way
  deepseek-llm.gguf  model gpt2, pre "deepseek-llm": a byte-level BPE built here with HF
                  `tokenizers` whose pre-tokenizer is DeepSeek LLM's (its tokenizer.json's
                  Sequence: Split [\r\n], letters of cased scripts with an optional leading
                  space, ASCII/full-width/quote punctuation runs, trailing whitespace, CJK
                  and other scripts in U+0800..U+4E00, then Digits(individual_digits) and
                  ByteLevel without its regex), BOS added — goldens from HF `tokenizers`
                  on TEXTS and DEEPSEEK_TEXTS (every split, and the characters at the edges
                  of its classes). The merges are learnt from whole texts, not from
                  DeepSeek's pieces, so they cross every boundary the splits draw: any other
                  split (the default one, deepseek-coder's, digits in runs) changes ids
  spm.gguf        model llama (scores, token types, <0xNN> bytes) from
                  tests/fixtures/tokenizers/spm-bytefallback.json — goldens from the
                  tokenizer transformers' GGUF loader builds (merges derived from the
                  scores), run with the ▁-prepending normalizer llama.cpp and the Llama-2
                  tokenizer.json use

  t5.gguf         model t5 (Unigram: scores, token types, precompiled_charsmap) from
                  tests/fixtures/tokenizers/unigram-t5.json — goldens from HF `tokenizers`
                  running the tokenizer.json HF's T5 conversion has for it (Precompiled and
                  Replace(" {2,}") normalizers, WhitespaceSplit + Metaspace, "$A </s>")
  bert.gguf       model bert (WordPiece, llama.cpp's phantom-space vocabulary: ▁word,
                  bare continuations) from tests/fixtures/tokenizers/wordpiece-bert.json —
                  goldens from that tokenizer.json (uncased BertNormalizer, BertPreTokenizer,
                  "[CLS] $A [SEP]")

Each file also carries metadata of every GGUF value type (all integer widths, floats,
bool, string, arrays of numbers and strings; the BPE ones arrays of arrays too) that the
reader must walk.
NAME.goldens.json holds {text, ids (specials as text), ids_special (specials parsed),
ids_bos (add_special_tokens=True)} per text.
"""
import argparse, base64, json, os, shutil, tempfile

import gguf
import numpy as np
from tokenizers import Tokenizer

TEXTS = ["Hello World", "  leading spaces and\ttabs\n", "naïve café", "numbers 1234567 and 3.14",
         "def f(x):\n    return x ** 2  # square", "日本語 한국어 русский", "emoji 🤖 ok", "MiXeD CaSe",
         "", " ", "a" * 50, "x\ny\r\nz", "I'm sure they'll say it's fine", "<|im_start|>user\nhi<|im_end|>",
         "<|begin_of_text|>text<|eot_id|>", "<s> tags </s> and <unk>", "\n\n\n", "tab\t\tend  ",
         "import os\nfor i in range(10):\n    print(i)\n", "x" * 300 + "y" * 3]

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# Texts for deepseek-llm.gguf besides TEXTS: every split of its pre-tokenizer and the characters
# at the edges of its classes. ª º ʔ are letters outside its letter class, ǅ ſ inside; Hebrew,
# Arabic and ° © ¿ ¡ » fall in no class, so only the trailing-whitespace split parts them from
# the spaces after them; Devanagari, Thai, U+2009 and ✨ sit in its "CJK" range U+0800..U+4E00;
# « » – — are outside its punctuation class, ‘ ’ “ ” „ ‟ 、 。 ！ inside; U+3000 is both
# whitespace and punctuation; ² ½ ٣ Ⅻ ₂ １ are digits to HF's Digits.
DEEPSEEK_TEXTS = [
    "Ünïcödé Straße façade Ærøskøbing ŁÓDŹ naïveté", "ªº ʔ ǅ ſ µ Ŋ ɐ ʕʖ", "Γειά σου κόσμε — Привет, мир! Բարեւ ႠႡ",
    "שלום עולם مرحبا بالعالم", "नमस्ते दुनिया สวัสดีครับ", "日本語の文章、カタカナ。中文，标点！한국어 텍스트",
    "“quoted” ‘single’ „low‟ «guillemets» – —", "ＡＢＣ ｆｕｌｌ－ｗｉｄｔｈ！ １２３　ｘ",
    "2024-01-15 12:30:45.678 +3.14e-10 x₂ y² ½ ٣٤٥ ⅫⅣ 1000000", "price: $1,234,567.89!!! (approx.) ... ?! -- ;;",
    "trailing spaces   ", "tabs\t\t", "mixed \t \n  \r\n end \u3000", "a  b   c    d\t\te", "  \n  x  \n  ",
    "emoji 🤖🎉 👨‍👩‍👧 ok ✨!", "line1\nline2\r\n\r\n  indented\n\t\ttabbed", "MiXeD123CaSe456 abc123def 7up",
    "e\u0301 n\u0303 combining", "non\u00a0breaking\u2009thin\u200bzero", "ΑΒΓ αβγ ϐϑ ἀἁ ᾳ Ω ℃ ℉ K Å",
    "<｜begin▁of▁sentence｜>Hi<｜end▁of▁sentence｜>", "def f(x):\n    return {'a': [1, 2]}  # ok\n",
    "  ", "\t", "9", " 9 ", "!", " !", "x!", "中", " 中", "中 ", "中1", "a中", "ü", "ٴ",
    "مرحبا  world", "🤖  ok 👋 ", "שלום  \tעולם  ", "«  »  x", "end »  ", "20°  C ©  ok ¿  qué ¡  sí §  1",
    "°  ©  ¿  ¡  ",
]

# DeepSeek LLM's tokenizer.json pre-tokenizer (deepseek-ai/deepseek-llm-7b-base; the same in
# DeepSeek-V2): five Splits, then single digits, then ByteLevel without its regex. The letter
# class is Unicode's cased letters as code point ranges.
DEEPSEEK_LETTERS = [
    (0x41, 0x5A), (0x61, 0x7A), (0xB5, 0xB5), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x1BA), (0x1BC, 0x1BF),
    (0x1C4, 0x293), (0x295, 0x2AF), (0x370, 0x373), (0x376, 0x376), (0x377, 0x377), (0x37B, 0x37D),
    (0x37F, 0x37F), (0x386, 0x386), (0x388, 0x38A), (0x38C, 0x38C), (0x38E, 0x3A1), (0x3A3, 0x3F5),
    (0x3F7, 0x481), (0x48A, 0x52F), (0x531, 0x556), (0x10A0, 0x10C5), (0x13A0, 0x13F5), (0x13F8, 0x13FD),
    (0x1C90, 0x1CBA), (0x1CBD, 0x1CBF), (0x1D00, 0x1D2B), (0x1D6B, 0x1D77), (0x1D79, 0x1D9A),
    (0x1E00, 0x1F15), (0x1F18, 0x1F1D), (0x1F20, 0x1F45), (0x1F48, 0x1F4D), (0x1F50, 0x1F57),
    (0x1F59, 0x1F59), (0x1F5B, 0x1F5B), (0x1F5D, 0x1F5D), (0x1F5F, 0x1F7D), (0x1F80, 0x1FB4),
    (0x1FB6, 0x1FBC), (0x1FBE, 0x1FBE), (0x1FC2, 0x1FC4), (0x1FC6, 0x1FCC), (0x1FD0, 0x1FD3),
    (0x1FD6, 0x1FDB), (0x1FE0, 0x1FEC), (0x1FF2, 0x1FF4), (0x1FF6, 0x1FFC), (0x2102, 0x2102),
    (0x2107, 0x2107), (0x210A, 0x2113), (0x2115, 0x2115), (0x2119, 0x211D), (0x2124, 0x2124),
    (0x2126, 0x2126), (0x2128, 0x2128), (0x212A, 0x212D), (0x212F, 0x2134), (0x2139, 0x2139),
    (0x213C, 0x213F), (0x2145, 0x2149), (0x214E, 0x214E), (0x2183, 0x2183), (0x2184, 0x2184),
    (0x2C00, 0x2C7B), (0x2C7E, 0x2CE4), (0x2CEB, 0x2CEE), (0x2CF2, 0x2CF2), (0x2CF3, 0x2CF3),
    (0xA640, 0xA66D), (0xA680, 0xA69B), (0xA722, 0xA76F), (0xA771, 0xA787), (0xA78B, 0xA78E),
    (0xAB70, 0xABBF), (0xFB00, 0xFB06), (0xFB13, 0xFB17), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A),
    (0x10400, 0x1044F), (0x104B0, 0x104D3), (0x104D8, 0x104FB), (0x10C80, 0x10CB2), (0x10CC0, 0x10CF2),
    (0x118A0, 0x118DF), (0x1E900, 0x1E943)]


def char_class(ranges):
    return "".join(chr(a) if a == b else chr(a) + "-" + chr(b) for a, b in ranges)


def deepseek_llm_pre_tokenizer():
    def split(rx):
        return {"type": "Split", "pattern": {"Regex": rx}, "behavior": "Isolated", "invert": False}

    punct = char_class([(0x21, 0x2F), (0x3A, 0x7E), (0xFF01, 0xFF0F), (0xFF1A, 0xFF5E), (0x2018, 0x201F),
                        (0x3000, 0x3002)])
    cjk = char_class([(0x4E00, 0x9FA5), (0x800, 0x4E00), (0xAC00, 0xD7FF)])
    return {"type": "Sequence", "pretokenizers": [
        split("[\r\n]"), split("\\s?[" + char_class(DEEPSEEK_LETTERS) + "]+"), split("\\s?[" + punct + "]+"),
        split("\\s+$"), split("[" + cjk + "]+"), {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def every_type_metadata(w, nested):
    w.add_uint8("zse.test.u8", 200)
    w.add_int8("zse.test.i8", -5)
    w.add_uint16("zse.test.u16", 60000)
    w.add_int16("zse.test.i16", -300)
    w.add_uint32("zse.test.u32", 4000000000)
    w.add_int32("zse.test.i32", -70000)
    w.add_float32("zse.test.f32", 1.5)
    w.add_uint64("zse.test.u64", 1 << 40)
    w.add_int64("zse.test.i64", -(1 << 40))
    w.add_float64("zse.test.f64", 2.25)
    w.add_bool("zse.test.bool", True)
    w.add_string("zse.test.string", "ünïcode")
    w.add_array("zse.test.ints", [1, 2, 3])
    w.add_array("zse.test.strings", ["a", "bc", ""])
    if nested:  # transformers' GGUF reader cannot read these, so spm.gguf goes without
        w.add_array("zse.test.nested", [[1, 2], [3], [4, 5, 6]])
        w.add_array("zse.test.nested_strings", [["x", "y"], ["z"]])


def write_gguf(path, arch, fill, nested=True):
    w = gguf.GGUFWriter(path, arch)
    every_type_metadata(w, nested)
    fill(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()


def bpe_fixture(out, name, src, pre, ignore_merges, add_bos):
    j = json.load(open(os.path.join(src, "tokenizer.json")))
    cfg = json.load(open(os.path.join(src, "tokenizer_config.json")))
    return bpe_gguf(out, name, j, cfg, pre, ignore_merges, add_bos, TEXTS)


def bpe_gguf(out, name, j, cfg, pre, ignore_merges, add_bos, texts):
    """NAME.gguf from tokenizer.json j and tokenizer_config cfg; the goldens of texts"""
    vocab = j["model"]["vocab"]
    added = {a["id"]: a for a in j["added_tokens"]}
    n = max(max(vocab.values()), max(added)) + 1
    tokens = [f"<unused{i}>" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    for k, i in vocab.items():
        tokens[i], types[i] = k, gguf.TokenType.NORMAL
    for i, a in added.items():
        tokens[i] = a["content"]
        types[i] = gguf.TokenType.CONTROL if a["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    bos = cfg.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    eos = cfg.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos

    def fill(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        if bos:
            w.add_bos_token_id(tokens.index(bos))
        if eos:
            w.add_eos_token_id(tokens.index(eos))
        w.add_add_bos_token(add_bos)

    write_gguf(os.path.join(out, name + ".gguf"), "llama", fill)
    # the tokenizer.json this GGUF describes, as llama.cpp reads it
    ref = json.loads(json.dumps(j))
    ref["normalizer"] = None
    ref["model"]["ignore_merges"] = ignore_merges
    for a in ref["added_tokens"]:
        a["normalized"] = False
    if add_bos and bos:
        bid = tokens.index(bos)
        ref["post_processor"] = {"type": "TemplateProcessing",
                                 "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                            {"Sequence": {"id": "A", "type_id": 0}}],
                                 "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                                 "special_tokens": {bos: {"id": bos, "ids": [bid], "tokens": [bos]}}}
    else:
        ref["post_processor"] = None
    tok = Tokenizer.from_str(json.dumps(ref))

    def enc(text, special, add):
        tok.encode_special_tokens = not special
        return tok.encode(text, add_special_tokens=add).ids

    return [{"text": t, "ids": enc(t, False, False), "ids_special": enc(t, True, False), "ids_bos": enc(t, False, True)}
            for t in texts]


def deepseek_llm_fixture(out, name):
    """A byte-level BPE with DeepSeek LLM's pre-tokenizer, its BOS/EOS and add_bos_token. The
    merges are learnt on whole documents (ByteLevel alone splits nothing), so tokens span
    letters and punctuation, spaces and digits, digit runs, newlines and CJK; only the right
    split gives HF's ids."""
    from tokenizers import models, pre_tokenizers, decoders, trainers

    docs = [p for p in open(os.path.join(ROOT, "tests/fixtures/eval.txt"), encoding="utf-8").read().split("\n\n") if p]
    docs += TEXTS * 3 + DEEPSEEK_TEXTS * 8  # the edge cases weigh more: merges across their splits
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=1000, min_frequency=2, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos, eos = "<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>"
    tok.add_special_tokens([bos, eos])
    j = json.loads(tok.to_str())
    j["normalizer"] = {"type": "Sequence", "normalizers": []}
    j["pre_tokenizer"] = deepseek_llm_pre_tokenizer()
    j["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    cfg = {"bos_token": bos, "eos_token": eos, "add_bos_token": True}
    return bpe_gguf(out, name, j, cfg, "deepseek-llm", False, True, TEXTS + DEEPSEEK_TEXTS)


def spm_fixture(out, name):
    j = json.load(open(os.path.join(ROOT, "tests/fixtures/tokenizers/spm-bytefallback.json")))
    vocab = j["model"]["vocab"]
    n = max(vocab.values()) + 1
    tokens = [None] * n
    for k, i in vocab.items():
        tokens[i] = k
    rank = {}
    for r, m in enumerate(j["model"]["merges"]):
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        rank.setdefault(a + b, r)
    # SentencePiece scores: a piece made by an earlier merge scores higher; characters last
    scores = [-float(rank[t]) if t in rank else -1e6 - i for i, t in enumerate(tokens)]
    types = []
    for t in tokens:
        if t == "<unk>":
            types.append(gguf.TokenType.UNKNOWN)
        elif t in ("<s>", "</s>"):
            types.append(gguf.TokenType.CONTROL)
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)

    def fill(w):
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores([float(np.float32(s)) for s in scores])
        w.add_token_types(types)
        w.add_bos_token_id(tokens.index("<s>"))
        w.add_eos_token_id(tokens.index("</s>"))
        w.add_unk_token_id(tokens.index("<unk>"))
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)

    path = os.path.join(out, name + ".gguf")
    write_gguf(path, "llama", fill, nested=False)
    from transformers import AutoTokenizer
    tmp = tempfile.mkdtemp()
    try:
        shutil.copy(path, tmp)
        hf = AutoTokenizer.from_pretrained(tmp, gguf_file=name + ".gguf")
    finally:
        shutil.rmtree(tmp)
    # transformers converts the vocabulary (merges from the scores) but pre-tokenizes with
    # Metaspace ("non-legacy"); llama.cpp, and the tokenizer.json of the Llama-2 family,
    # prepend ▁ to the text and turn spaces into ▁ ("legacy") — that is the reference
    ref = json.loads(hf.backend_tokenizer.to_str())
    ref["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    ref["pre_tokenizer"] = None
    tok = Tokenizer.from_str(json.dumps(ref))

    def enc(text, special, add):
        tok.encode_special_tokens = not special
        return tok.encode(text, add_special_tokens=add).ids

    return [{"text": t, "ids": enc(t, False, False), "ids_special": enc(t, True, False), "ids_bos": enc(t, False, True)}
            for t in TEXTS]


def goldens_of(tok):
    def enc(text, special, add):
        tok.encode_special_tokens = not special
        return tok.encode(text, add_special_tokens=add).ids

    return [{"text": t, "ids": enc(t, False, False), "ids_special": enc(t, True, False), "ids_bos": enc(t, False, True)}
            for t in TEXTS]


def t5_fixture(out, name):
    j = json.load(open(os.path.join(ROOT, "tests/fixtures/tokenizers/unigram-t5.json")))
    pieces = j["model"]["vocab"]
    tokens = [p for p, _ in pieces]
    special = {a["content"] for a in j["added_tokens"]}
    types = [gguf.TokenType.UNKNOWN if t == "<unk>" else gguf.TokenType.CONTROL if t in special
             else gguf.TokenType.NORMAL for t in tokens]
    charsmap = base64.b64decode(j["normalizer"]["normalizers"][0]["precompiled_charsmap"])

    def fill(w):
        w.add_tokenizer_model("t5")
        w.add_token_list(tokens)
        w.add_token_scores([float(np.float32(sc)) for _, sc in pieces])
        w.add_token_types(types)
        w.add_eos_token_id(tokens.index("</s>"))
        w.add_unk_token_id(tokens.index("<unk>"))
        w.add_pad_token_id(tokens.index("<pad>"))
        w.add_add_space_prefix(True)
        w.add_remove_extra_whitespaces(True)
        w.add_precompiled_charsmap(charsmap)

    write_gguf(os.path.join(out, name + ".gguf"), "t5", fill)
    ref = json.loads(json.dumps(j))
    ref["model"]["vocab"] = [[p, float(np.float32(sc))] for p, sc in pieces]  # the GGUF holds f32 scores
    ref["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "WhitespaceSplit"},
        {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}]}
    for a in ref["added_tokens"]:
        a["normalized"] = False
    return goldens_of(Tokenizer.from_str(json.dumps(ref)))


def bert_fixture(out, name):
    j = json.load(open(os.path.join(ROOT, "tests/fixtures/tokenizers/wordpiece-bert.json")))
    vocab = j["model"]["vocab"]
    tokens = [None] * (max(vocab.values()) + 1)
    for k, i in vocab.items():
        tokens[i] = k

    def phantom(t):  # llama.cpp's convert_hf_to_gguf.py BertModel vocabulary
        if t.startswith("[") and t.endswith("]"):
            return t
        return t[2:] if t.startswith("##") else "\u2581" + t

    special = {a["content"] for a in j["added_tokens"]}
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]

    def fill(w):
        w.add_tokenizer_model("bert")
        w.add_token_list([phantom(t) for t in tokens])
        w.add_token_types(types)
        w.add_unk_token_id(tokens.index("[UNK]"))
        w.add_uint32("tokenizer.ggml.cls_token_id", tokens.index("[CLS]"))  # the keys llama.cpp's BERT files carry
        w.add_uint32("tokenizer.ggml.seperator_token_id", tokens.index("[SEP]"))
        w.add_pad_token_id(tokens.index("[PAD]"))
        w.add_mask_token_id(tokens.index("[MASK]"))

    write_gguf(os.path.join(out, name + ".gguf"), "bert", fill)
    ref = json.loads(json.dumps(j))
    for a in ref["added_tokens"]:
        a["normalized"] = False
    cls, sep = tokens.index("[CLS]"), tokens.index("[SEP]")
    ref["post_processor"] = {"type": "BertProcessing", "sep": ["[SEP]", sep], "cls": ["[CLS]", cls]}
    return goldens_of(Tokenizer.from_str(json.dumps(ref)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/gguf"))
    ap.add_argument("--only", default="", help="comma-separated fixture names to rewrite")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    fixtures = {
        "llama-bpe": lambda: bpe_fixture(a.out, "llama-bpe", os.path.join(ROOT, "tests/fixtures/tiny-llama"),
                                         "llama-bpe", True, True),
        "qwen2": lambda: bpe_fixture(a.out, "qwen2", os.path.join(ROOT, "tests/fixtures/tiny-qwen2"), "qwen2", False,
                                     False),
        "deepseek-llm": lambda: deepseek_llm_fixture(a.out, "deepseek-llm"),
        "spm": lambda: spm_fixture(a.out, "spm"),
        "t5": lambda: t5_fixture(a.out, "t5"),
        "bert": lambda: bert_fixture(a.out, "bert"),
    }
    only = [n for n in a.only.split(",") if n]
    for name, make in fixtures.items():
        if only and name not in only:
            continue
        goldens = make()
        with open(os.path.join(a.out, name + ".goldens.json"), "w") as f:
            json.dump(goldens, f, ensure_ascii=False, indent=0)
        print(name, os.path.getsize(os.path.join(a.out, name + ".gguf")))


if __name__ == "__main__":
    main()
