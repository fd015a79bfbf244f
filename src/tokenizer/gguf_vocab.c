/* GGUF vocabularies: the tokenizer.ggml.* metadata of a .gguf file, turned into the
 * equivalent tokenizer.json pipeline so one implementation serves both:
 *   gpt2  → byte-level BPE with the pre-tokenizer regexes named by tokenizer.ggml.pre
 *   llama → SentencePiece-style BPE (▁, byte fallback) with merges derived from the scores
 *           the way Hugging Face's converter derives them
 * Every length and count read from the file is checked against the file's size. */
#include "tokenizer/tokenizer.h"

#include <string.h>

typedef struct {
    const uint8_t *p, *end;
    const char *path;
    bool bad;
} reader;

static bool need(reader *r, size_t n)
{
    if (r->bad || (size_t)(r->end - r->p) < n) {
        if (!r->bad)
            zse_fail("%s: GGUF metadata runs past the end of the file (truncated or corrupt)", r->path);
        r->bad = true;
        return false;
    }
    return true;
}

static uint64_t rd(reader *r, int n)
{
    uint64_t v = 0;
    if (!need(r, (size_t)n))
        return 0;
    for (int i = 0; i < n; i++)
        v |= (uint64_t)r->p[i] << (8 * i);
    r->p += n;
    return v;
}

/* a GGUF string: u64 length + bytes; returns a pointer into the file */
static const char *rd_str(reader *r, uint64_t *len)
{
    *len = rd(r, 8);
    if (!need(r, *len))
        return NULL;
    const char *s = (const char *)r->p;
    r->p += *len;
    return s;
}

enum { T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR, T_U64, T_I64, T_F64 };

static int scalar_size(uint32_t t)
{
    static const int sz[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    return t < 13 ? sz[t] : -1;
}

typedef struct {
    const uint8_t *at;  /* first element */
    uint32_t type;
    uint64_t n;
} array_ref;

typedef struct {
    char model[32], pre[64];
    array_ref tokens, scores, types, merges;
    int64_t bos, eos, unk;
    int add_bos;
} gguf_vocab;

static void skip_value(reader *r, uint32_t t)
{
    if (t == T_STR) {
        uint64_t l;
        rd_str(r, &l);
    } else if (scalar_size(t) > 0) {
        rd(r, scalar_size(t));
    } else {
        zse_fail("%s: unknown GGUF value type %u", r->path, t);
        r->bad = true;
    }
}

static void read_kv(reader *r, gguf_vocab *v)
{
    uint64_t kl;
    const char *k = rd_str(r, &kl);
    uint32_t t = (uint32_t)rd(r, 4);
    if (r->bad)
        return;
#define KEY(s) (kl == strlen(s) && memcmp(k, s, kl) == 0)
    if (t == T_ARR) {
        uint32_t et = (uint32_t)rd(r, 4);
        uint64_t n = rd(r, 8);
        array_ref a = {r->p, et, n};
        if (et == T_STR) {
            for (uint64_t i = 0; i < n && !r->bad; i++)
                skip_value(r, T_STR);
        } else if (scalar_size(et) > 0 && n <= (uint64_t)(r->end - r->p) / (uint64_t)scalar_size(et)) {
            r->p += n * (uint64_t)scalar_size(et);
        } else {
            zse_fail("%s: GGUF array of %llu elements of type %u does not fit the file", r->path,
                     (unsigned long long)n, et);
            r->bad = true;
        }
        if (KEY("tokenizer.ggml.tokens")) v->tokens = a;
        else if (KEY("tokenizer.ggml.scores")) v->scores = a;
        else if (KEY("tokenizer.ggml.token_type")) v->types = a;
        else if (KEY("tokenizer.ggml.merges")) v->merges = a;
        return;
    }
    if (t == T_STR && (KEY("tokenizer.ggml.model") || KEY("tokenizer.ggml.pre"))) {
        uint64_t l;
        const char *s = rd_str(r, &l);
        char *dst = KEY("tokenizer.ggml.model") ? v->model : v->pre;
        size_t cap = KEY("tokenizer.ggml.model") ? sizeof v->model : sizeof v->pre;
        if (s)
            snprintf(dst, cap, "%.*s", (int)(l < cap ? l : cap - 1), s);
        return;
    }
    if (scalar_size(t) > 0 && (KEY("tokenizer.ggml.bos_token_id") || KEY("tokenizer.ggml.eos_token_id") ||
                                KEY("tokenizer.ggml.unknown_token_id") || KEY("tokenizer.ggml.add_bos_token"))) {
        int64_t x = (int64_t)rd(r, scalar_size(t));
        if (KEY("tokenizer.ggml.bos_token_id")) v->bos = x;
        else if (KEY("tokenizer.ggml.eos_token_id")) v->eos = x;
        else if (KEY("tokenizer.ggml.unknown_token_id")) v->unk = x;
        else v->add_bos = (int)x;
        return;
    }
#undef KEY
    skip_value(r, t);
}

/* the i-th string of an array (arrays of strings are walked; callers go in order) */
typedef struct {
    reader r;
    uint64_t i;
} str_iter;

static const char *next_str(str_iter *it, uint64_t *len)
{
    it->i++;
    return rd_str(&it->r, len);
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

/* llama.cpp's regex sets per pre-tokenizer name (applied in order, each splitting the
 * pieces of the previous one); NULL = not known */
static const char *const *pre_regexes(const char *pre)
{
    static const char *const gpt2[] = {
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+", NULL};
    static const char *const llama3[] = {
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?"
        "[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+", NULL};
    static const char *const qwen2[] = {
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?"
        "[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+", NULL};
    static const char *const deepseek_coder[] = {
        "[\\r\\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[\\x{4e00}-\\x{9fa5}\\x{0800}-\\x{4e00}\\x{ac00}-\\x{d7ff}]+",
        "\\p{N}", NULL};
    static const char *const falcon[] = {
        "[\\p{P}\\$\\+<=>\\^~\\|`]+",
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)", "[0-9][0-9][0-9]", NULL};
    static const char *const starcoder[] = {
        "\\p{N}", "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)", NULL};
    static const struct { const char *name; const char *const *rx; } table[] = {
        {"default", gpt2}, {"gpt-2", gpt2}, {"gpt2", gpt2}, {"mpt", gpt2}, {"olmo", gpt2}, {"jais", gpt2},
        {"llama3", llama3}, {"llama-bpe", llama3}, {"dbrx", llama3}, {"smaug-bpe", llama3},
        {"qwen2", qwen2}, {"deepseek-coder", deepseek_coder}, {"falcon", falcon},
        {"starcoder", starcoder}, {"refact", starcoder}, {"command-r", starcoder}, {"smollm", starcoder},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (strcmp(pre, table[i].name) == 0)
            return table[i].rx;
    return NULL;
}

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

/* Hugging Face's SentencePiece converter: every split of a piece into two vocab pieces is
 * a merge, ranked by the merged piece's score (highest first) */
static json_t *spm_merges(json_t *vocab, char **texts, const gguf_vocab *v, uint64_t n)
{
    spm_merge *m = NULL;
    size_t nm = 0, cap = 0;
    for (uint64_t id = 0; id < n; id++) {
        const char *s = texts[id];
        size_t len = strlen(s);
        for (size_t i = 1; i < len; i++) {
            if (((unsigned char)s[i] & 0xC0) == 0x80)
                continue; /* split between characters only */
            char left[512];
            if (i >= sizeof left)
                break;
            memcpy(left, s, i);
            left[i] = '\0';
            json_t *l = json_object_get(vocab, left), *r = json_object_get(vocab, s + i);
            if (!l || !r)
                continue;
            if (nm == cap) {
                cap = cap ? cap * 2 : 4096;
                spm_merge *p = zse_realloc(m, cap * sizeof *p);
                if (!p) {
                    free(m);
                    return NULL;
                }
                m = p;
            }
            m[nm++] = (spm_merge){array_f32(&v->scores, id), (int32_t)id, (int32_t)json_integer_value(l),
                                  (int32_t)json_integer_value(r)};
        }
    }
    qsort(m, nm, sizeof *m, cmp_merge);
    json_t *arr = json_array();
    for (size_t i = 0; i < nm; i++)
        json_array_append_new(arr, json_pack("[s,s]", texts[m[i].left], texts[m[i].right]));
    free(m);
    return arr;
}

static json_t *split_step(const char *rx)
{
    return json_pack("{s:s, s:{s:s}, s:s, s:b}", "type", "Split", "pattern", "Regex", rx, "behavior", "Isolated",
                     "invert", 0);
}

static json_t *build_tokenizer_json(const gguf_vocab *v, reader *r, const char *path)
{
    bool spm = strcmp(v->model, "llama") == 0;
    if (!spm && strcmp(v->model, "gpt2") != 0) {
        zse_fail("%s: GGUF tokenizer model '%s' is not supported (gpt2 and llama are)", path, v->model);
        return NULL;
    }
    uint64_t n = v->tokens.n;
    if (n == 0 || n > (1u << 24) || v->tokens.type != T_STR ||
        (v->types.n && (v->types.n != n || scalar_size(v->types.type) != 4)) ||
        (spm && (v->scores.n != n || v->scores.type != T_F32))) {
        zse_fail("%s: tokenizer.ggml.tokens/scores/token_type are missing or inconsistent", path);
        return NULL;
    }
    char **texts = zse_calloc(n, sizeof *texts);
    json_t *vocab = json_object(), *added = json_array(), *root = NULL;
    if (!texts)
        goto done;
    str_iter it = {{v->tokens.at, r->end, path, false}, 0};
    for (uint64_t id = 0; id < n; id++) {
        uint64_t l;
        const char *s = next_str(&it, &l);
        if (!s || !(texts[id] = zse_strndup(s, l)))
            goto done;
        json_object_set_new(vocab, texts[id], json_integer((json_int_t)id));
        int32_t type = v->types.n ? array_i32(&v->types, id) : 1;
        if (type == 3 || type == 4) /* CONTROL, USER_DEFINED: matched before the model */
            json_array_append_new(added, json_pack("{s:I, s:s, s:b, s:b, s:b, s:b, s:b}", "id", (json_int_t)id,
                                                   "content", texts[id], "special", type == 3, "lstrip", 0,
                                                   "rstrip", 0, "single_word", 0, "normalized", type == 4));
    }
    json_t *model, *pre = json_null(), *norm = json_null(), *dec;
    if (spm) {
        json_t *merges = spm_merges(vocab, texts, v, n);
        if (!merges)
            goto done;
        model = json_pack("{s:s, s:O, s:o, s:b, s:s*}", "type", "BPE", "vocab", vocab, "merges", merges,
                          "byte_fallback", 1, "unk_token",
                          v->unk >= 0 && (uint64_t)v->unk < n ? texts[v->unk] : NULL);
        norm = json_pack("{s:s, s:[{s:s, s:s}, {s:s, s:{s:s}, s:s}]}", "type", "Sequence", "normalizers", "type",
                         "Prepend", "prepend", "\xe2\x96\x81", "type", "Replace", "pattern", "String", " ",
                         "content", "\xe2\x96\x81");
        dec = json_pack("{s:s, s:[{s:s, s:{s:s}, s:s}, {s:s}, {s:s}, {s:s, s:s, s:i, s:i}]}", "type", "Sequence",
                        "decoders", "type", "Replace", "pattern", "String", "\xe2\x96\x81", "content", " ", "type",
                        "ByteFallback", "type", "Fuse", "type", "Strip", "content", " ", "start", 1, "stop", 0);
    } else {
        json_t *merges = json_array();
        str_iter mi = {{v->merges.at, r->end, path, false}, 0};
        for (uint64_t i = 0; v->merges.type == T_STR && i < v->merges.n; i++) {
            uint64_t l;
            const char *s = next_str(&mi, &l);
            if (!s)
                goto done;
            json_array_append_new(merges, json_stringn(s, l));
        }
        model = json_pack("{s:s, s:O, s:o}", "type", "BPE", "vocab", vocab, "merges", merges);
        const char *const *rx = pre_regexes(v->pre[0] ? v->pre : "default");
        if (!rx) {
            zse_fail("%s: pre-tokenizer '%s' is not known to zse", path, v->pre);
            json_decref(model);
            goto done;
        }
        json_t *steps = json_array();
        for (int i = 0; rx[i]; i++)
            json_array_append_new(steps, split_step(rx[i]));
        json_array_append_new(steps, json_pack("{s:s, s:b, s:b}", "type", "ByteLevel", "add_prefix_space", 0,
                                               "use_regex", 0));
        pre = json_pack("{s:s, s:o}", "type", "Sequence", "pretokenizers", steps);
        dec = json_pack("{s:s}", "type", "ByteLevel");
    }
    root = json_pack("{s:o, s:o, s:o, s:o, s:O}", "model", model, "normalizer", norm, "pre_tokenizer", pre,
                     "decoder", dec, "added_tokens", added);
    /* add_bos_token: BOS before the sequence when special tokens are added */
    if (root && v->add_bos == 1 && v->bos >= 0 && (uint64_t)v->bos < n)
        json_object_set_new(root, "post_processor",
                            json_pack("{s:s, s:[{s:{s:s, s:i}}, {s:{s:s, s:i}}], s:{s:{s:s, s:[I], s:[s]}}}",
                                      "type", "TemplateProcessing", "single", "SpecialToken", "id", texts[v->bos],
                                      "type_id", 0, "Sequence", "id", "A", "type_id", 0, "special_tokens",
                                      texts[v->bos], "id", texts[v->bos], "ids", (json_int_t)v->bos, "tokens",
                                      texts[v->bos]));
done:
    for (uint64_t i = 0; texts && i < n; i++)
        free(texts[i]);
    free(texts);
    json_decref(vocab);
    json_decref(added);
    return root;
}

zse_tokenizer *zse_tokenizer_from_gguf(const char *path)
{
    zse_map m;
    if (zse_map_open(&m, path) != 0)
        return NULL;
    reader r = {m.data, m.data + m.size, path, false};
    zse_tokenizer *t = NULL;
    if (m.size < 24 || memcmp(m.data, "GGUF", 4) != 0) {
        zse_fail("%s is not a GGUF file", path);
        goto done;
    }
    r.p += 4;
    uint32_t version = (uint32_t)rd(&r, 4);
    if (version < 2 || version > 3) {
        zse_fail("%s: GGUF version %u is not supported (2 and 3 are)", path, version);
        goto done;
    }
    rd(&r, 8); /* tensor count: the vocabulary needs none */
    uint64_t n_kv = rd(&r, 8);
    gguf_vocab v = {.bos = -1, .eos = -1, .unk = -1, .add_bos = -1};
    for (uint64_t i = 0; i < n_kv && !r.bad; i++)
        read_kv(&r, &v);
    if (r.bad)
        goto done;
    json_t *j = build_tokenizer_json(&v, &r, path);
    if (!j)
        goto done;
    json_t *cfg = json_object();
    if (v.bos >= 0 && (uint64_t)v.bos < v.tokens.n) {
        str_iter it = {{v.tokens.at, r.end, path, false}, 0};
        uint64_t l = 0;
        const char *s = NULL;
        for (int64_t i = 0; i <= v.bos; i++)
            s = next_str(&it, &l);
        if (s)
            json_object_set_new(cfg, "bos_token", json_stringn(s, l));
    }
    char *text = json_dumps(j, JSON_COMPACT);
    if (text)
        t = zse_tokenizer_from_json(text, strlen(text), cfg);
    free(text);
    json_decref(j);
    json_decref(cfg);
done:
    zse_map_close(&m);
    return t;
}
