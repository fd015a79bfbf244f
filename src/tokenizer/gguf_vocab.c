/* GGUF vocabularies: the tokenizer.ggml.* metadata of a .gguf file, turned into the
 * tokenizer.json pipeline Hugging Face would use for the same model, so one
 * implementation serves both:
 *   gpt2  → byte-level BPE; the pre-tokenizer regexes are the set llama.cpp names by
 *           tokenizer.ggml.pre (the Hugging Face originals where llama.cpp rewrote them)
 *   llama → SentencePiece-style BPE (▁, byte fallback) with merges derived from the scores
 *           the way Hugging Face's converter derives them
 * Special tokens follow llama.cpp: CONTROL and UNKNOWN tokens are special added tokens,
 * USER_DEFINED ones are added tokens matched in any text.
 *
 * The container (header, every key/value pair, the tensor directory) is read and checked
 * against the file by format/gguf.c; this reads the tokenizer.ggml.* values out of it. */
#include "tokenizer/tokenizer.h"

#include <string.h>

/* ---- the tokenizer.ggml.* keys (the container is read and checked by format/gguf.c) ------- */

typedef struct {
    const uint8_t *at;  /* first element */
    uint32_t type;
    uint64_t n;
} array_ref;

typedef struct {
    const char *path;
    const uint8_t *end; /* the mapping's end: string arrays are walked against it */
    char model[32], pre[64];
    array_ref tokens, scores, types, merges, charsmap;
    int64_t bos, eos, unk;
    int64_t cls, sep;
    int add_bos, add_eos, add_space_prefix, remove_extra_spaces; /* -1: not in the file */
} gguf_vocab;

static array_ref array_of(const zse_gguf *g, const char *key)
{
    const zse_gguf_kv *kv = zse_gguf_find(g, key);
    return kv && kv->type == ZSE_GGUF_ARR ? (array_ref){kv->at, kv->arr_type, kv->arr_n} : (array_ref){NULL, 0, 0};
}

static void string_of(const zse_gguf *g, const char *key, char *dst, size_t cap)
{
    size_t l;
    const zse_gguf_kv *kv = zse_gguf_find(g, key);
    const char *s = kv ? zse_gguf_kv_str(kv, &l) : NULL;
    if (s)
        snprintf(dst, cap, "%.*s", (int)(l < cap ? l : cap - 1), s);
}

static void read_vocab(const zse_gguf *g, gguf_vocab *v)
{
    v->tokens = array_of(g, "tokenizer.ggml.tokens");
    v->scores = array_of(g, "tokenizer.ggml.scores");
    v->types = array_of(g, "tokenizer.ggml.token_type");
    v->merges = array_of(g, "tokenizer.ggml.merges");
    v->charsmap = array_of(g, "tokenizer.ggml.precompiled_charsmap");
    string_of(g, "tokenizer.ggml.model", v->model, sizeof v->model);
    string_of(g, "tokenizer.ggml.pre", v->pre, sizeof v->pre);
    /* llama.cpp writes "seperator"; either spelling */
    const struct { const char *name; int64_t *id; int *flag; } ints[] = {
        {"tokenizer.ggml.bos_token_id", &v->bos, NULL},     {"tokenizer.ggml.eos_token_id", &v->eos, NULL},
        {"tokenizer.ggml.unknown_token_id", &v->unk, NULL}, {"tokenizer.ggml.add_bos_token", NULL, &v->add_bos},
        {"tokenizer.ggml.add_eos_token", NULL, &v->add_eos}, {"tokenizer.ggml.add_space_prefix", NULL, &v->add_space_prefix},
        {"tokenizer.ggml.remove_extra_whitespaces", NULL, &v->remove_extra_spaces},
        {"tokenizer.ggml.cls_token_id", &v->cls, NULL}, {"tokenizer.ggml.seperator_token_id", &v->sep, NULL},
        {"tokenizer.ggml.separator_token_id", &v->sep, NULL},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        int64_t x;
        const zse_gguf_kv *kv = zse_gguf_find(g, ints[i].name);
        if (!kv || !zse_gguf_kv_int(kv, &x))
            continue;
        if (ints[i].id)
            *ints[i].id = x;
        else
            *ints[i].flag = x != 0;
    }
}

/* an array of strings, walked in order (u64 length, then the bytes, each) */
typedef struct {
    const uint8_t *p, *end;
    const char *path;
} str_iter;

static str_iter strings_of(const gguf_vocab *v, const array_ref *a)
{
    return (str_iter){a->at, v->end, v->path};
}

static const char *next_str(str_iter *it, uint64_t *len)
{
    if (it->end - it->p < 8 || (uint64_t)(it->end - it->p - 8) < zse_load_le64(it->p)) {
        zse_fail("%s: a GGUF string array runs past the end of the file", it->path);
        return NULL;
    }
    *len = zse_load_le64(it->p);
    const char *s = (const char *)it->p + 8;
    it->p += 8 + *len;
    return s;
}

static float array_f32(const array_ref *a, uint64_t i)
{
    float f;
    memcpy(&f, a->at + 4 * i, 4);
    return f;
}

static int32_t array_i32(const array_ref *a, uint64_t i)
{
    int32_t x;
    memcpy(&x, a->at + 4 * i, 4);
    return x;
}

/* ---- pre-tokenizer regex sets, by llama.cpp's names --------------------------------------- */

#define GPT2_RX "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"
#define GPT2_NO_TAIL_RX "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
#define CONTRACTIONS "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
#define LLAMA3_RX CONTRACTIONS "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
#define QWEN2_RX CONTRACTIONS "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
#define CASED_WORDS(tail)                                                                                       \
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+" tail                      \
    "|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*" tail
#define BLOOM_RX " ?[^(\\s|.,!?\\x{2026}\\x{3002}\\x{ff0c}\\x{3001}\\x{0964}\\x{06d4}\\x{060c})]+"
#define CJK_RX "[\\x{4e00}-\\x{9fa5}\\x{0800}-\\x{4e00}\\x{ac00}-\\x{d7ff}]+"
#define DEEPSEEK_LLM_LETTERS_RX \
    "\\s?[A-Za-z\\x{00b5}\\x{00c0}-\\x{00d6}\\x{00d8}-\\x{00f6}\\x{00f8}-\\x{01ba}\\x{01bc}-\\x{01bf}" \
    "\\x{01c4}-\\x{0293}\\x{0295}-\\x{02af}\\x{0370}-\\x{0373}\\x{0376}\\x{0377}\\x{037b}-\\x{037d}" \
    "\\x{037f}\\x{0386}\\x{0388}-\\x{038a}\\x{038c}\\x{038e}-\\x{03a1}\\x{03a3}-\\x{03f5}" \
    "\\x{03f7}-\\x{0481}\\x{048a}-\\x{052f}\\x{0531}-\\x{0556}\\x{10a0}-\\x{10c5}\\x{13a0}-\\x{13f5}" \
    "\\x{13f8}-\\x{13fd}\\x{1c90}-\\x{1cba}\\x{1cbd}-\\x{1cbf}\\x{1d00}-\\x{1d2b}\\x{1d6b}-\\x{1d77}" \
    "\\x{1d79}-\\x{1d9a}\\x{1e00}-\\x{1f15}\\x{1f18}-\\x{1f1d}\\x{1f20}-\\x{1f45}\\x{1f48}-\\x{1f4d}" \
    "\\x{1f50}-\\x{1f57}\\x{1f59}\\x{1f5b}\\x{1f5d}\\x{1f5f}-\\x{1f7d}\\x{1f80}-\\x{1fb4}" \
    "\\x{1fb6}-\\x{1fbc}\\x{1fbe}\\x{1fc2}-\\x{1fc4}\\x{1fc6}-\\x{1fcc}\\x{1fd0}-\\x{1fd3}" \
    "\\x{1fd6}-\\x{1fdb}\\x{1fe0}-\\x{1fec}\\x{1ff2}-\\x{1ff4}\\x{1ff6}-\\x{1ffc}\\x{2102}\\x{2107}" \
    "\\x{210a}-\\x{2113}\\x{2115}\\x{2119}-\\x{211d}\\x{2124}\\x{2126}\\x{2128}\\x{212a}-\\x{212d}" \
    "\\x{212f}-\\x{2134}\\x{2139}\\x{213c}-\\x{213f}\\x{2145}-\\x{2149}\\x{214e}\\x{2183}\\x{2184}" \
    "\\x{2c00}-\\x{2c7b}\\x{2c7e}-\\x{2ce4}\\x{2ceb}-\\x{2cee}\\x{2cf2}\\x{2cf3}\\x{a640}-\\x{a66d}" \
    "\\x{a680}-\\x{a69b}\\x{a722}-\\x{a76f}\\x{a771}-\\x{a787}\\x{a78b}-\\x{a78e}\\x{ab70}-\\x{abbf}" \
    "\\x{fb00}-\\x{fb06}\\x{fb13}-\\x{fb17}\\x{ff21}-\\x{ff3a}\\x{ff41}-\\x{ff5a}\\x{10400}-\\x{1044f}" \
    "\\x{104b0}-\\x{104d3}\\x{104d8}-\\x{104fb}\\x{10c80}-\\x{10cb2}\\x{10cc0}-\\x{10cf2}" \
    "\\x{118a0}-\\x{118df}\\x{1e900}-\\x{1e943}]+"

typedef struct {
    const char *names;        /* space-separated names of tokenizer.ggml.pre */
    const char *rx[6];        /* applied in order, each splitting the pieces of the one before */
    bool ignore_merges;       /* a piece that is a token is taken whole */
    bool add_bos;             /* the default when add_bos_token is absent */
} pre_set;

static const pre_set PRE_SETS[] = {
    {"default", {"[\\p{P}\\$\\+<=>\\^~\\|]+", GPT2_NO_TAIL_RX, "\\p{N}+", "[0-9][0-9][0-9]"}, false, false},
    {"gpt-2 gpt2 phi-2 jina-es jina-de jina-v2-es jina-v2-de jina-v2-code mpt olmo jais trillion granite-docling "
     "exaone4 roberta-bpe gigachat",
     {GPT2_RX}, false, false},
    {"llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano", {LLAMA3_RX}, true, true},
    {"dbrx smaug-bpe chatglm-bpe glm4", {LLAMA3_RX}, false, false},
    {"qwen2 deepseek-r1-qwen kormo stablelm2 hunyuan megrez solar-open grok-2", {QWEN2_RX}, false, false},
    {"deepseek-coder", {"[\\r\\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", CJK_RX, "\\p{N}"}, false, false},
    /* DeepSeek LLM's tokenizer.json: letters of cased scripts, ASCII and full-width
     * punctuation, trailing whitespace, CJK, then single digits (HF's Digits with
     * individual_digits; llama.cpp writes \p{N}+, the same on this vocabulary, which has
     * no token of two digits) */
    {"deepseek-llm", {"[\\r\\n]", DEEPSEEK_LLM_LETTERS_RX, "\\s?[!-/:-~\\x{ff01}-\\x{ff0f}\\x{ff1a}-\\x{ff5e}\\x{2018}-\\x{201f}\\x{3000}-\\x{3002}]+",
                      "\\s+$", CJK_RX, "\\p{N}"}, false, false},
    {"deepseek-v3 hunyuan-dense",
     {"\\p{N}{1,3}", "[\\x{4e00}-\\x{9fa5}\\x{3040}-\\x{309f}\\x{30a0}-\\x{30ff}]+",
      "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\\r\\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| "
      "?[\\p{P}\\p{S}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
     false, false},
    {"falcon", {"[\\p{P}\\$\\+<=>\\^~\\|`]+", GPT2_NO_TAIL_RX, "[0-9][0-9][0-9]"}, false, false},
    {"starcoder refact command-r smollm codeshell exaone minerva-7b mellum2", {"\\p{N}", GPT2_NO_TAIL_RX}, false,
     false},
    {"poro-chat bloom gpt3-finnish", {BLOOM_RX}, false, false},
    {"viking", {BLOOM_RX, "\\p{N}"}, false, false},
    {"tekken", {CASED_WORDS("") "|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}, true, true},
    {"gpt-4o llama4 minimax-m2",
     {CASED_WORDS(CONTRACTIONS "?") "|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
     false, false},
    {"superbpe", {"\\p{N}+", "(?=(\\d{3})+(?!\\d))"}, false, false},
    {"bailingmoe bailingmoe2 llada-moe",
     {"'(?i:[sdmt]|ll|ve|re)|[^\\r\\n\\p{L}\\p{N}]?+\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]++[\\r\\n]*|\\s*[\\r\\n]|\\s+(?!\\S)|"
      "\\s+"},
     false, false},
    {"seed-coder",
     {CONTRACTIONS "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1}| ?[^\\s\\p{L}\\p{N}\\r\\n]+|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
     false, false},
    {"minicpm5",
     {"\\p{N}{1,3}",
      CONTRACTIONS "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}+| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
     true, false},
};

static bool name_in(const char *names, const char *name)
{
    size_t nl = strlen(name);
    for (const char *p = names; *p;) {
        const char *e = strchr(p, ' ');
        size_t l = e ? (size_t)(e - p) : strlen(p);
        if (l == nl && memcmp(p, name, l) == 0)
            return true;
        p += l + (e != NULL);
    }
    return false;
}

/* llama.cpp uses its default set, with a warning, for a name it does not know */
static const pre_set *pre_set_of(const char *pre, const char *path)
{
    const char *name = pre[0] ? pre : "default";
    for (size_t i = 0; i < sizeof PRE_SETS / sizeof PRE_SETS[0]; i++)
        if (name_in(PRE_SETS[i].names, name))
            return &PRE_SETS[i];
    zse_log(ZSE_LOG_WARN, "%s: pre-tokenizer '%s' is not known to zse; using llama.cpp's default regexes", path, pre);
    return &PRE_SETS[0];
}

/* ---- tokenizer.json from the metadata ----------------------------------------------------- */

typedef struct {
    float score;
    int32_t piece, left, right;
} spm_merge;

static int cmp_merge(const void *a, const void *b)
{
    const spm_merge *x = a, *y = b;
    if (x->score != y->score)
        return x->score > y->score ? -1 : 1;
    if (x->piece != y->piece)
        return x->piece < y->piece ? -1 : 1;
    if (x->left != y->left)
        return x->left < y->left ? -1 : 1;
    return x->right < y->right ? -1 : x->right > y->right;
}

/* Hugging Face's SentencePiece converter: every split of a piece into two vocabulary
 * pieces is a merge, ranked by the merged piece's score (highest first) */
static json_t *spm_merges(json_t *vocab, char **texts, const gguf_vocab *v, uint64_t n)
{
    spm_merge *m = NULL;
    size_t nm = 0, cap = 0;
    char left[512];
    for (uint64_t id = 0; id < n; id++) {
        const char *s = texts[id];
        size_t len = strlen(s);
        for (size_t i = 1; i < len && i < sizeof left; i++) {
            if (((unsigned char)s[i] & 0xC0) == 0x80)
                continue; /* split between characters only */
            memcpy(left, s, i);
            left[i] = '\0';
            json_t *l = json_object_get(vocab, left), *r = json_object_get(vocab, s + i);
            if (!l || !r)
                continue;
            if (zse_grow((void **)&m, &cap, nm + 1, sizeof *m, 4096) != 0) {
                free(m);
                return NULL;
            }
            m[nm++] = (spm_merge){array_f32(&v->scores, id), (int32_t)id, (int32_t)json_integer_value(l),
                                  (int32_t)json_integer_value(r)};
        }
    }
    qsort(m, nm, sizeof *m, cmp_merge);
    json_t *arr = json_array();
    for (size_t i = 0; arr && i < nm; i++)
        json_array_append_new(arr, json_pack("[s,s]", texts[m[i].left], texts[m[i].right]));
    free(m);
    return arr;
}

static json_t *split_step(const char *rx)
{
    return json_pack("{s:s, s:{s:s}, s:s, s:b}", "type", "Split", "pattern", "Regex", rx, "behavior", "Isolated",
                     "invert", 0);
}

/* TemplateProcessing with BOS before and/or EOS after the sequence */
static json_t *post_processor(const gguf_vocab *v, char **texts, bool bos, bool eos)
{
    json_t *single = json_array(), *specials = json_object();
    if (bos)
        json_array_append_new(single, json_pack("{s:{s:s, s:i}}", "SpecialToken", "id", texts[v->bos], "type_id", 0));
    json_array_append_new(single, json_pack("{s:{s:s, s:i}}", "Sequence", "id", "A", "type_id", 0));
    if (eos)
        json_array_append_new(single, json_pack("{s:{s:s, s:i}}", "SpecialToken", "id", texts[v->eos], "type_id", 0));
    if (bos)
        json_object_set_new(specials, texts[v->bos],
                            json_pack("{s:s, s:[I], s:[s]}", "id", texts[v->bos], "ids", (json_int_t)v->bos,
                                      "tokens", texts[v->bos]));
    if (eos)
        json_object_set_new(specials, texts[v->eos],
                            json_pack("{s:s, s:[I], s:[s]}", "id", texts[v->eos], "ids", (json_int_t)v->eos,
                                      "tokens", texts[v->eos]));
    return json_pack("{s:s, s:o, s:o}", "type", "TemplateProcessing", "single", single, "special_tokens", specials);
}

static bool valid_id(int64_t id, uint64_t n)
{
    return id >= 0 && (uint64_t)id < n;
}

static json_t *spm_model(const gguf_vocab *v, json_t *vocab, char **texts, uint64_t n, json_t **norm, json_t **dec)
{
    json_t *merges = spm_merges(vocab, texts, v, n);
    if (!merges)
        return NULL;
    /* add_space_prefix (default on): the ▁ SentencePiece puts before the text */
    *norm = v->add_space_prefix != 0
                ? json_pack("{s:s, s:[{s:s, s:s}, {s:s, s:{s:s}, s:s}]}", "type", "Sequence", "normalizers", "type",
                            "Prepend", "prepend", "\xe2\x96\x81", "type", "Replace", "pattern", "String", " ",
                            "content", "\xe2\x96\x81")
                : json_pack("{s:s, s:{s:s}, s:s}", "type", "Replace", "pattern", "String", " ", "content",
                            "\xe2\x96\x81");
    *dec = json_pack("{s:s, s:[{s:s, s:{s:s}, s:s}, {s:s}, {s:s}, {s:s, s:s, s:i, s:i}]}", "type", "Sequence",
                     "decoders", "type", "Replace", "pattern", "String", "\xe2\x96\x81", "content", " ", "type",
                     "ByteFallback", "type", "Fuse", "type", "Strip", "content", " ", "start",
                     v->add_space_prefix != 0 ? 1 : 0, "stop", 0);
    return json_pack("{s:s, s:O, s:o, s:b, s:s*}", "type", "BPE", "vocab", vocab, "merges", merges, "byte_fallback", 1,
                     "unk_token", valid_id(v->unk, n) ? texts[v->unk] : NULL);
}

static json_t *bpe_model(const gguf_vocab *v, json_t *vocab, const pre_set *ps, json_t **pre, json_t **dec)
{
    json_t *merges = json_array();
    str_iter mi = strings_of(v, &v->merges);
    for (uint64_t i = 0; merges && v->merges.type == ZSE_GGUF_STR && i < v->merges.n; i++) {
        uint64_t l;
        const char *s = next_str(&mi, &l);
        if (!s) {
            json_decref(merges);
            return NULL;
        }
        json_array_append_new(merges, json_stringn(s, l));
    }
    json_t *steps = json_array();
    for (int i = 0; i < 6 && ps->rx[i]; i++)
        json_array_append_new(steps, split_step(ps->rx[i]));
    json_array_append_new(steps, json_pack("{s:s, s:b, s:b}", "type", "ByteLevel", "add_prefix_space", 0,
                                           "use_regex", 0));
    *pre = json_pack("{s:s, s:o}", "type", "Sequence", "pretokenizers", steps);
    *dec = json_pack("{s:s}", "type", "ByteLevel");
    return json_pack("{s:s, s:O, s:o, s:b}", "type", "BPE", "vocab", vocab, "merges", merges, "ignore_merges",
                     ps->ignore_merges);
}

/* ---- Unigram (model "t5") and WordPiece (model "bert") -------------------------------- */

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* the precompiled_charsmap bytes as the base64 string tokenizer.json carries */
static json_t *charsmap_base64(const array_ref *a)
{
    zse_buf b = {0};
    const uint8_t *p = a->at;
    int rc = 0;
    for (uint64_t i = 0; i < a->n && rc == 0; i += 3) {
        uint32_t x = (uint32_t)p[i] << 16 | (i + 1 < a->n ? (uint32_t)p[i + 1] << 8 : 0) |
                     (i + 2 < a->n ? (uint32_t)p[i + 2] : 0);
        char q[4] = {B64[x >> 18 & 63], B64[x >> 12 & 63], i + 1 < a->n ? B64[x >> 6 & 63] : '=',
                     i + 2 < a->n ? B64[x & 63] : '='};
        rc = zse_buf_append(&b, q, 4);
    }
    json_t *j = rc ? NULL : json_stringn(zse_buf_str(&b), b.len);
    zse_buf_free(&b);
    return j;
}

/* T5-style SentencePiece Unigram, as HF's converter writes it: the precompiled charsmap,
 * runs of spaces collapsed and the ends trimmed (remove_extra_whitespaces), ▁ before
 * each word (add_space_prefix), the Metaspace decoder */
static json_t *ugm_model(const gguf_vocab *v, char **texts, uint64_t n, json_t **norm, json_t **pre, json_t **dec)
{
    json_t *pieces = json_array(), *norms = json_array(), *pres = json_array();
    bool byte_fallback = false;
    for (uint64_t id = 0; pieces && id < n; id++) {
        json_array_append_new(pieces, json_pack("[s,f]", texts[id], (double)array_f32(&v->scores, id)));
        byte_fallback = byte_fallback || (v->types.n && array_i32(&v->types, id) == 6); /* BYTE */
    }
    if (v->charsmap.n && zse_gguf_scalar_size(v->charsmap.type) == 1)
        json_array_append_new(norms, json_pack("{s:s, s:o}", "type", "Precompiled", "precompiled_charsmap",
                                               charsmap_base64(&v->charsmap)));
    if (v->remove_extra_spaces != 0) {
        json_array_append_new(norms, json_pack("{s:s, s:{s:s}, s:s}", "type", "Replace", "pattern", "Regex", " {2,}",
                                               "content", " "));
        json_array_append_new(pres, json_pack("{s:s}", "type", "WhitespaceSplit"));
    }
    const char *scheme = v->add_space_prefix != 0 ? "always" : "never";
    json_array_append_new(pres, json_pack("{s:s, s:s, s:s, s:b}", "type", "Metaspace", "replacement", "\xe2\x96\x81",
                                          "prepend_scheme", scheme, "split", 1));
    *norm = json_pack("{s:s, s:o}", "type", "Sequence", "normalizers", norms);
    *pre = json_pack("{s:s, s:o}", "type", "Sequence", "pretokenizers", pres);
    *dec = json_pack("{s:s, s:s, s:s, s:b}", "type", "Metaspace", "replacement", "\xe2\x96\x81", "prepend_scheme",
                     scheme, "split", 1);
    json_t *m = json_pack("{s:s, s:o, s:b}", "type", "Unigram", "vocab", pieces, "byte_fallback", byte_fallback);
    if (m && valid_id(v->unk, n))
        json_object_set_new(m, "unk_id", json_integer(v->unk));
    return m;
}

/* llama.cpp stores a BERT vocabulary with a "phantom space": word-initial tokens get ▁,
 * continuation tokens lose "##", [bracketed] ones stay. This undoes it. */
static int unphantom(char **text)
{
    char *s = *text;
    size_t l = strlen(s);
    if (l >= 2 && s[0] == '[' && s[l - 1] == ']')
        return 0;
    char *u = NULL;
    if (l >= 3 && memcmp(s, "\xe2\x96\x81", 3) == 0) {
        u = zse_strdup(s + 3);
    } else if ((u = zse_malloc(l + 3))) {
        memcpy(u, "##", 2);
        memcpy(u + 2, s, l + 1);
    }
    if (!u)
        return -1;
    free(s);
    *text = u;
    return 0;
}

/* BERT (uncased, as the GGUF BERT embedding models are): BertNormalizer, BertPreTokenizer,
 * WordPiece with "##", the WordPiece decoder */
static json_t *wpm_model(const gguf_vocab *v, json_t *vocab, char **texts, uint64_t n, json_t **norm, json_t **pre,
                         json_t **dec)
{
    *norm = json_pack("{s:s, s:b, s:b, s:n, s:b}", "type", "BertNormalizer", "clean_text", 1, "handle_chinese_chars", 1,
                      "strip_accents", "lowercase", 1);
    *pre = json_pack("{s:s}", "type", "BertPreTokenizer");
    *dec = json_pack("{s:s, s:s, s:b}", "type", "WordPiece", "prefix", "##", "cleanup", 1);
    return json_pack("{s:s, s:O, s:s*, s:s, s:i}", "type", "WordPiece", "vocab", vocab, "unk_token",
                     valid_id(v->unk, n) ? texts[v->unk] : NULL, "continuing_subword_prefix", "##",
                     "max_input_chars_per_word", 100);
}

/* BertProcessing: [CLS] A [SEP] */
static json_t *bert_processor(const gguf_vocab *v, char **texts)
{
    return json_pack("{s:s, s:[s,I], s:[s,I]}", "type", "BertProcessing", "cls", texts[v->cls], (json_int_t)v->cls,
                     "sep", texts[v->sep], (json_int_t)v->sep);
}

enum gguf_model { G_BPE, G_SPM, G_UGM, G_WPM };

static json_t *build_tokenizer_json(gguf_vocab *v)
{
    const char *path = v->path;
    enum gguf_model gm = strcmp(v->model, "gpt2") == 0    ? G_BPE
                         : strcmp(v->model, "llama") == 0 ? G_SPM
                         : strcmp(v->model, "t5") == 0    ? G_UGM
                         : strcmp(v->model, "bert") == 0  ? G_WPM
                                                          : (enum gguf_model)-1;
    if ((int)gm < 0) {
        zse_fail("%s: GGUF tokenizer model '%s' is not supported (gpt2, llama, t5 and bert are)", path,
                 v->model[0] ? v->model : "(none)");
        return NULL;
    }
    bool spm = gm == G_SPM, scored = gm == G_SPM || gm == G_UGM;
    uint64_t n = v->tokens.n;
    if (n == 0 || n > (1u << 24) || v->tokens.type != ZSE_GGUF_STR ||
        (v->types.n && (v->types.n != n || zse_gguf_scalar_size(v->types.type) != 4)) ||
        (scored && (v->scores.n != n || v->scores.type != ZSE_GGUF_F32)) ||
        (gm == G_BPE && v->merges.type != ZSE_GGUF_STR)) {
        zse_fail("%s: tokenizer.ggml.tokens/scores/token_type/merges are missing or inconsistent", path);
        return NULL;
    }
    const pre_set *ps = gm == G_BPE ? pre_set_of(v->pre, path) : NULL;
    if (spm) { /* llama.cpp's defaults for SentencePiece vocabularies */
        v->bos = v->bos < 0 ? 1 : v->bos;
        v->eos = v->eos < 0 ? 2 : v->eos;
        v->add_bos = v->add_bos < 0 ? 1 : v->add_bos;
    } else if (gm == G_UGM) { /* and for T5's: </s> after the text */
        v->eos = v->eos < 0 ? 1 : v->eos;
        v->unk = v->unk < 0 ? 2 : v->unk;
        v->add_bos = v->add_bos < 0 ? 0 : v->add_bos;
        v->add_eos = v->add_eos < 0 ? 1 : v->add_eos;
    } else if (gm == G_WPM) { /* and for BERT's: [CLS] and [SEP] around it */
        v->bos = valid_id(v->cls, n) ? v->cls : v->bos;
        v->eos = valid_id(v->sep, n) ? v->sep : v->eos;
        v->cls = v->bos;
        v->sep = v->eos;
        v->add_bos = v->add_bos < 0 ? 1 : v->add_bos;
    } else if (v->add_bos < 0) {
        v->add_bos = ps->add_bos;
    }
    char **texts = zse_calloc(n, sizeof *texts);
    json_t *vocab = json_object(), *added = json_array(), *root = NULL;
    if (!texts || !vocab || !added)
        goto done;
    str_iter it = strings_of(v, &v->tokens);
    for (uint64_t id = 0; id < n; id++) {
        uint64_t l;
        const char *s = next_str(&it, &l);
        if (!s || !(texts[id] = zse_strndup(s, l)) || (gm == G_WPM && unphantom(&texts[id])))
            goto done;
        json_object_set_new(vocab, texts[id], json_integer((json_int_t)id));
        int32_t type = v->types.n ? array_i32(&v->types, id) : 1;
        /* UNKNOWN (2) and CONTROL (3): special; USER_DEFINED (4): matched in any text */
        if ((type == 2 || type == 3 || type == 4) && texts[id][0])
            json_array_append_new(added, json_pack("{s:I, s:s, s:b, s:b, s:b, s:b, s:b}", "id", (json_int_t)id,
                                                   "content", texts[id], "special", type != 4, "lstrip", 0,
                                                   "rstrip", 0, "single_word", 0, "normalized", 0));
    }
    json_t *model, *pre = json_null(), *norm = json_null(), *dec = NULL;
    model = gm == G_SPM   ? spm_model(v, vocab, texts, n, &norm, &dec)
            : gm == G_UGM ? ugm_model(v, texts, n, &norm, &pre, &dec)
            : gm == G_WPM ? wpm_model(v, vocab, texts, n, &norm, &pre, &dec)
                          : bpe_model(v, vocab, ps, &pre, &dec);
    if (!model || !dec) {
        json_decref(model);
        json_decref(pre);
        json_decref(norm);
        json_decref(dec);
        zse_fail("%s: out of memory building the tokenizer", path);
        goto done;
    }
    root = json_pack("{s:o, s:o, s:o, s:o, s:O}", "model", model, "normalizer", norm, "pre_tokenizer", pre,
                     "decoder", dec, "added_tokens", added);
    bool bos = v->add_bos == 1 && valid_id(v->bos, n), eos = v->add_eos == 1 && valid_id(v->eos, n);
    if (root && gm == G_WPM && bos && valid_id(v->sep, n))
        json_object_set_new(root, "post_processor", bert_processor(v, texts));
    else if (root && (bos || eos))
        json_object_set_new(root, "post_processor", post_processor(v, texts, bos, eos));
done:
    for (uint64_t i = 0; texts && i < n; i++)
        free(texts[i]);
    free(texts);
    json_decref(vocab);
    json_decref(added);
    return root;
}

/* the string of token `id` as a JSON string (for tokenizer_config's bos/eos) */
static json_t *token_name(const gguf_vocab *v, int64_t id)
{
    if (!valid_id(id, v->tokens.n))
        return NULL;
    str_iter it = strings_of(v, &v->tokens);
    uint64_t l = 0;
    const char *s = NULL;
    for (int64_t i = 0; i <= id; i++)
        s = next_str(&it, &l);
    return s ? json_stringn(s, l) : NULL;
}

char *zse_tokenizer_json_from_gguf(const char *path, size_t *len, json_t **tokenizer_config)
{
    *tokenizer_config = NULL;
    zse_gguf *g = zse_gguf_open(path);
    if (!g)
        return NULL;
    char *text = NULL;
    gguf_vocab v = {.path = path, .end = g->map.data + g->map.size, .bos = -1, .eos = -1, .unk = -1, .cls = -1,
                    .sep = -1, .add_bos = -1, .add_eos = -1, .add_space_prefix = -1, .remove_extra_spaces = -1};
    read_vocab(g, &v);
    json_t *j = build_tokenizer_json(&v);
    if (!j)
        goto done;
    json_t *cfg = json_object(), *bos = token_name(&v, v.bos), *eos = token_name(&v, v.eos);
    if (bos)
        json_object_set_new(cfg, "bos_token", bos);
    if (eos)
        json_object_set_new(cfg, "eos_token", eos);
    /* as resolved above (the vocabulary model's default when the file does not say) */
    json_object_set_new(cfg, "add_bos_token", json_boolean(v.add_bos == 1));
    text = json_dumps(j, JSON_COMPACT);
    if (text) {
        *len = strlen(text);
        *tokenizer_config = cfg;
    } else {
        zse_fail("%s: out of memory building the tokenizer", path);
        json_decref(cfg);
    }
    json_decref(j);
done:
    zse_gguf_close(g);
    return text;
}

zse_tokenizer *zse_tokenizer_from_gguf(const char *path)
{
    size_t len = 0;
    json_t *cfg = NULL;
    char *text = zse_tokenizer_json_from_gguf(path, &len, &cfg);
    if (!text)
        return NULL;
    zse_tokenizer *t = zse_tokenizer_from_json(text, len, cfg);
    if (!t)
        zse_error_prefix("%s", path);
    free(text);
    json_decref(cfg);
    return t;
}
