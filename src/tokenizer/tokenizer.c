/* Byte-level and SentencePiece-style BPE from tokenizer.json.
 *
 * encode: split out added tokens → for each remaining span: normalize → pre-tokenize into
 * pieces → (byte-level: map bytes to the printable alphabet) → BPE merges by rank → ids.
 * decode: token strings → decoder steps (ByteLevel, Replace, ByteFallback, Fuse, Strip,
 * Metaspace) → bytes, with invalid UTF-8 replaced by U+FFFD as Python does. */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "tokenizer/tokenizer.h"

#include <pcre2.h>
#include <string.h>
#include <utf8proc.h>

/* ---- hash maps ------------------------------------------------------------------ */

typedef struct {
    char **keys;
    int32_t *vals;
    size_t cap; /* power of two */
} str_map;

static uint64_t hash_bytes(const char *s, size_t n)
{
    return zse_hash64(s, n);
}

static int str_map_init(str_map *m, size_t n)
{
    m->cap = 16;
    while (m->cap < n * 2)
        m->cap *= 2;
    m->keys = zse_calloc(m->cap, sizeof *m->keys);
    m->vals = zse_calloc(m->cap, sizeof *m->vals);
    return m->keys && m->vals ? 0 : -1;
}

static int32_t str_map_get(const str_map *m, const char *s, size_t n)
{
    if (!m->cap)
        return -1;
    size_t i = (size_t)hash_bytes(s, n) & (m->cap - 1);
    while (m->keys[i]) {
        if (strlen(m->keys[i]) == n && memcmp(m->keys[i], s, n) == 0)
            return m->vals[i];
        i = (i + 1) & (m->cap - 1);
    }
    return -1;
}

/* the map borrows key (owned by the vocab array) */
static void str_map_put(str_map *m, char *key, int32_t val)
{
    size_t n = strlen(key), i = (size_t)hash_bytes(key, n) & (m->cap - 1);
    while (m->keys[i]) {
        if (strcmp(m->keys[i], key) == 0) {
            m->vals[i] = val;
            return;
        }
        i = (i + 1) & (m->cap - 1);
    }
    m->keys[i] = key;
    m->vals[i] = val;
}

typedef struct {
    uint64_t *keys; /* (left << 32 | right) + 1; 0 = empty */
    int32_t *rank;
    int32_t *merged;
    size_t cap;
} pair_map;

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    return x;
}

static void pair_put(pair_map *m, int32_t a, int32_t b, int32_t rank, int32_t merged)
{
    uint64_t k = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
    size_t i = (size_t)mix64(k) & (m->cap - 1);
    while (m->keys[i] && m->keys[i] != k)
        i = (i + 1) & (m->cap - 1);
    if (m->keys[i] == k)
        return; /* first (lowest) rank wins */
    m->keys[i] = k;
    m->rank[i] = rank;
    m->merged[i] = merged;
}

static bool pair_get(const pair_map *m, int32_t a, int32_t b, int32_t *rank, int32_t *merged)
{
    if (!m->cap)
        return false;
    uint64_t k = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
    size_t i = (size_t)mix64(k) & (m->cap - 1);
    while (m->keys[i]) {
        if (m->keys[i] == k) {
            *rank = m->rank[i];
            *merged = m->merged[i];
            return true;
        }
        i = (i + 1) & (m->cap - 1);
    }
    return false;
}

/* ---- pipeline description -------------------------------------------------------- */

enum norm_kind { N_NFC, N_NFKC, N_NFD, N_NFKD, N_LOWER, N_PREPEND, N_REPLACE, N_STRIP };
typedef struct {
    enum norm_kind kind;
    char *a, *b;
    bool left, right;
} norm_step;

enum pre_kind { P_SPLIT, P_BYTELEVEL, P_DIGITS, P_METASPACE, P_WHITESPACE_SPLIT };
enum split_behavior { B_ISOLATED, B_REMOVED, B_MERGED_PREV, B_MERGED_NEXT, B_CONTIGUOUS, B_MATCHES_ONLY };
typedef struct {
    enum pre_kind kind;
    pcre2_code *re;
    enum split_behavior behavior;
    bool add_prefix_space, use_regex, individual_digits;
    char *replacement;      /* metaspace */
    int prepend_scheme;     /* metaspace: 0 always, 1 first, 2 never */
    bool split;             /* metaspace */
} pre_step;

enum dec_kind { D_BYTELEVEL, D_REPLACE, D_BYTEFALLBACK, D_FUSE, D_STRIP, D_METASPACE };
typedef struct {
    enum dec_kind kind;
    char *a, *b;
    int start, stop;
    int prepend_scheme;
} dec_step;

typedef struct {
    char *content;
    size_t len;
    int32_t id;
    bool special, lstrip, rstrip, single_word;
} added_token;

struct zse_tokenizer {
    char **vocab;           /* id -> string */
    int n_vocab;
    str_map ids;
    pair_map merges;
    bool byte_level;        /* a ByteLevel pre-tokenizer maps bytes before BPE */
    bool ignore_merges, byte_fallback;
    int32_t unk_id;
    int32_t byte_ids[256];  /* <0xNN> tokens for byte fallback, -1 when absent */
    norm_step *norms;
    int n_norms;
    pre_step *pres;
    int n_pres;
    dec_step *decs;
    int n_decs;
    added_token *added;
    int n_added;
    bool *is_special;       /* [n_vocab] */
    int32_t prefix_ids[4], suffix_ids[4];
    int n_prefix, n_suffix;
    int32_t bos, eos;
};

/* GPT-2's byte <-> printable code point table */
static void byte_level_table(uint32_t cp_of_byte[256])
{
    int n = 0;
    for (int b = 0; b < 256; b++) {
        bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        cp_of_byte[b] = printable ? (uint32_t)b : (uint32_t)(256 + n++);
    }
}

static uint32_t g_cp_of_byte[256];
static int g_byte_of_cp[512];

static void init_byte_tables(void)
{
    static bool done;
    if (done)
        return;
    byte_level_table(g_cp_of_byte);
    for (int i = 0; i < 512; i++)
        g_byte_of_cp[i] = -1;
    for (int b = 0; b < 256; b++)
        g_byte_of_cp[g_cp_of_byte[b]] = b;
    done = true;
}

static const char GPT2_REGEX[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static pcre2_code *compile_regex(const char *pattern)
{
    int err;
    PCRE2_SIZE off;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pattern, PCRE2_ZERO_TERMINATED,
                                   PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &err, &off, NULL);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        zse_fail("tokenizer.json: pre-tokenizer regex does not compile at offset %zu: %s", (size_t)off, msg);
        return NULL;
    }
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* falls back to the interpreter if JIT is absent */
    return re;
}

/* ---- loading ------------------------------------------------------------------------ */

static char *dup_str(const json_t *v)
{
    const char *s = json_string_value(v);
    return zse_strdup(s ? s : "");
}

static int load_normalizer(zse_tokenizer *t, const json_t *n)
{
    if (!n || json_is_null(n))
        return 0;
    const char *type = json_string_value(json_object_get(n, "type"));
    if (!type)
        return zse_fail("tokenizer.json: normalizer without a type");
    if (strcmp(type, "Sequence") == 0) {
        size_t i;
        json_t *e;
        json_array_foreach(json_object_get(n, "normalizers"), i, e) if (load_normalizer(t, e) != 0) return -1;
        return 0;
    }
    norm_step s = {0};
    if (strcmp(type, "NFC") == 0) s.kind = N_NFC;
    else if (strcmp(type, "NFKC") == 0) s.kind = N_NFKC;
    else if (strcmp(type, "NFD") == 0) s.kind = N_NFD;
    else if (strcmp(type, "NFKD") == 0) s.kind = N_NFKD;
    else if (strcmp(type, "Lowercase") == 0) s.kind = N_LOWER;
    else if (strcmp(type, "Prepend") == 0) {
        s.kind = N_PREPEND;
        s.a = dup_str(json_object_get(n, "prepend"));
    } else if (strcmp(type, "Replace") == 0) {
        s.kind = N_REPLACE;
        json_t *pat = json_object_get(n, "pattern");
        if (!json_object_get(pat, "String"))
            return zse_fail("tokenizer.json: Replace normalizer with a regex pattern is not supported");
        s.a = dup_str(json_object_get(pat, "String"));
        s.b = dup_str(json_object_get(n, "content"));
    } else if (strcmp(type, "Strip") == 0) {
        s.kind = N_STRIP;
        s.left = json_is_true(json_object_get(n, "strip_left"));
        s.right = json_is_true(json_object_get(n, "strip_right"));
    } else {
        return zse_fail("tokenizer.json: normalizer '%s' is not supported", type);
    }
    norm_step *p = zse_realloc(t->norms, (size_t)(t->n_norms + 1) * sizeof *p);
    if (!p)
        return -1;
    t->norms = p;
    t->norms[t->n_norms++] = s;
    return 0;
}

static int add_pre(zse_tokenizer *t, pre_step s)
{
    pre_step *p = zse_realloc(t->pres, (size_t)(t->n_pres + 1) * sizeof *p);
    if (!p)
        return -1;
    t->pres = p;
    t->pres[t->n_pres++] = s;
    return 0;
}

static int load_pre_tokenizer(zse_tokenizer *t, const json_t *n)
{
    if (!n || json_is_null(n))
        return 0;
    const char *type = json_string_value(json_object_get(n, "type"));
    if (!type)
        return zse_fail("tokenizer.json: pre_tokenizer without a type");
    pre_step s = {0};
    if (strcmp(type, "Sequence") == 0) {
        size_t i;
        json_t *e;
        json_array_foreach(json_object_get(n, "pretokenizers"), i, e) if (load_pre_tokenizer(t, e) != 0) return -1;
        return 0;
    }
    if (strcmp(type, "Split") == 0) {
        s.kind = P_SPLIT;
        json_t *pat = json_object_get(n, "pattern");
        const char *rx = json_string_value(json_object_get(pat, "Regex"));
        const char *str = json_string_value(json_object_get(pat, "String"));
        if (json_is_true(json_object_get(n, "invert")))
            return zse_fail("tokenizer.json: Split with invert=true is not supported");
        if (rx) {
            s.re = compile_regex(rx);
        } else if (str) {
            uint32_t opts = PCRE2_UTF | PCRE2_LITERAL | PCRE2_MATCH_INVALID_UTF;
            int err;
            PCRE2_SIZE off;
            s.re = pcre2_compile((PCRE2_SPTR)str, PCRE2_ZERO_TERMINATED, opts, &err, &off, NULL);
        }
        if (!s.re)
            return rx ? -1 : zse_fail("tokenizer.json: Split pre-tokenizer without a pattern");
        const char *b = json_string_value(json_object_get(n, "behavior"));
        s.behavior = !b || strcmp(b, "Isolated") == 0 ? B_ISOLATED
                     : strcmp(b, "Removed") == 0       ? B_REMOVED
                     : strcmp(b, "MergedWithPrevious") == 0 ? B_MERGED_PREV
                     : strcmp(b, "MergedWithNext") == 0     ? B_MERGED_NEXT
                                                            : B_CONTIGUOUS;
    } else if (strcmp(type, "ByteLevel") == 0) {
        s.kind = P_BYTELEVEL;
        s.add_prefix_space = json_is_true(json_object_get(n, "add_prefix_space"));
        json_t *ur = json_object_get(n, "use_regex");
        s.use_regex = !ur || json_is_true(ur);
        if (s.use_regex && !(s.re = compile_regex(GPT2_REGEX)))
            return -1;
        t->byte_level = true;
    } else if (strcmp(type, "Digits") == 0) {
        s.kind = P_DIGITS;
        s.individual_digits = json_is_true(json_object_get(n, "individual_digits"));
        if (!(s.re = compile_regex(s.individual_digits ? "\\p{N}" : "\\p{N}+")))
            return -1;
        s.behavior = B_ISOLATED;
    } else if (strcmp(type, "Metaspace") == 0) {
        s.kind = P_METASPACE;
        s.replacement = dup_str(json_object_get(n, "replacement"));
        const char *ps = json_string_value(json_object_get(n, "prepend_scheme"));
        s.prepend_scheme = !ps || strcmp(ps, "always") == 0 ? 0 : strcmp(ps, "first") == 0 ? 1 : 2;
        json_t *sp = json_object_get(n, "split");
        s.split = !sp || json_is_true(sp);
    } else if (strcmp(type, "WhitespaceSplit") == 0) {
        s.kind = P_WHITESPACE_SPLIT;
        if (!(s.re = compile_regex("\\s+")))
            return -1;
        s.behavior = B_REMOVED;
    } else if (strcmp(type, "Whitespace") == 0) {
        s.kind = P_SPLIT;
        if (!(s.re = compile_regex("\\w+|[^\\w\\s]+")))
            return -1;
        s.behavior = B_MATCHES_ONLY;
    } else {
        return zse_fail("tokenizer.json: pre-tokenizer '%s' is not supported", type);
    }
    return add_pre(t, s);
}

static int load_decoder(zse_tokenizer *t, const json_t *n)
{
    if (!n || json_is_null(n))
        return 0;
    const char *type = json_string_value(json_object_get(n, "type"));
    if (!type)
        return zse_fail("tokenizer.json: decoder without a type");
    if (strcmp(type, "Sequence") == 0) {
        size_t i;
        json_t *e;
        json_array_foreach(json_object_get(n, "decoders"), i, e) if (load_decoder(t, e) != 0) return -1;
        return 0;
    }
    dec_step s = {0};
    if (strcmp(type, "ByteLevel") == 0) s.kind = D_BYTELEVEL;
    else if (strcmp(type, "ByteFallback") == 0) s.kind = D_BYTEFALLBACK;
    else if (strcmp(type, "Fuse") == 0) s.kind = D_FUSE;
    else if (strcmp(type, "Replace") == 0) {
        s.kind = D_REPLACE;
        s.a = dup_str(json_object_get(json_object_get(n, "pattern"), "String"));
        s.b = dup_str(json_object_get(n, "content"));
    } else if (strcmp(type, "Strip") == 0) {
        s.kind = D_STRIP;
        s.a = dup_str(json_object_get(n, "content"));
        s.start = (int)json_integer_value(json_object_get(n, "start"));
        s.stop = (int)json_integer_value(json_object_get(n, "stop"));
    } else if (strcmp(type, "Metaspace") == 0) {
        s.kind = D_METASPACE;
        s.a = dup_str(json_object_get(n, "replacement"));
        const char *ps = json_string_value(json_object_get(n, "prepend_scheme"));
        s.prepend_scheme = !ps || strcmp(ps, "always") == 0 ? 0 : strcmp(ps, "first") == 0 ? 1 : 2;
    } else {
        return zse_fail("tokenizer.json: decoder '%s' is not supported", type);
    }
    dec_step *p = zse_realloc(t->decs, (size_t)(t->n_decs + 1) * sizeof *p);
    if (!p)
        return -1;
    t->decs = p;
    t->decs[t->n_decs++] = s;
    return 0;
}

static int load_post_processor(zse_tokenizer *t, const json_t *n)
{
    if (!n || json_is_null(n))
        return 0;
    const char *type = json_string_value(json_object_get(n, "type"));
    if (type && strcmp(type, "Sequence") == 0) {
        size_t i;
        json_t *e;
        json_array_foreach(json_object_get(n, "processors"), i, e) if (load_post_processor(t, e) != 0) return -1;
        return 0;
    }
    if (!type || strcmp(type, "TemplateProcessing") != 0)
        return 0; /* ByteLevel / others add no tokens for a single sequence */
    json_t *specials = json_object_get(n, "special_tokens");
    bool after = false;
    size_t i;
    json_t *e;
    json_array_foreach(json_object_get(n, "single"), i, e) {
        if (json_object_get(e, "Sequence")) {
            after = true;
            continue;
        }
        const char *name = json_string_value(json_object_get(json_object_get(e, "SpecialToken"), "id"));
        json_t *ids = json_object_get(json_object_get(specials, name ? name : ""), "ids");
        size_t k;
        json_t *id;
        json_array_foreach(ids, k, id) {
            if (after && t->n_suffix < 4)
                t->suffix_ids[t->n_suffix++] = (int32_t)json_integer_value(id);
            else if (!after && t->n_prefix < 4)
                t->prefix_ids[t->n_prefix++] = (int32_t)json_integer_value(id);
        }
    }
    return 0;
}

static int load_vocab(zse_tokenizer *t, const json_t *model)
{
    const char *type = json_string_value(json_object_get(model, "type"));
    if (!type || strcmp(type, "BPE") != 0)
        return zse_fail("tokenizer.json: model type '%s' is not supported (BPE is)", type ? type : "?");
    json_t *vocab = json_object_get(model, "vocab");
    if (!json_is_object(vocab))
        return zse_fail("tokenizer.json: model.vocab is missing");
    int max_id = -1;
    const char *k;
    json_t *v;
    json_object_foreach(vocab, k, v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > (1 << 24))
            return zse_fail("tokenizer.json: vocab entry '%s' has a bad id", k);
        if (json_integer_value(v) > max_id)
            max_id = (int)json_integer_value(v);
    }
    t->n_vocab = max_id + 1;
    return 0;
}

static int set_token(zse_tokenizer *t, int32_t id, const char *text)
{
    if (id < 0 || id >= t->n_vocab)
        return zse_fail("tokenizer.json: token id %d is out of range", id);
    if (!t->vocab[id] && !(t->vocab[id] = zse_strdup(text)))
        return -1;
    return 0;
}

static int load_merges(zse_tokenizer *t, const json_t *merges)
{
    size_t n = json_array_size(merges);
    t->merges.cap = 16;
    while (t->merges.cap < n * 2 + 2)
        t->merges.cap *= 2;
    t->merges.keys = zse_calloc(t->merges.cap, sizeof *t->merges.keys);
    t->merges.rank = zse_calloc(t->merges.cap, sizeof *t->merges.rank);
    t->merges.merged = zse_calloc(t->merges.cap, sizeof *t->merges.merged);
    if (!t->merges.keys || !t->merges.rank || !t->merges.merged)
        return -1;
    zse_buf joined = {0};
    for (size_t i = 0; i < n; i++) {
        json_t *m = json_array_get(merges, i);
        const char *a, *b;
        size_t alen, blen;
        const char *s = json_string_value(m);
        if (s) { /* "a b": the first space separates (tokens never contain one here) */
            const char *sp = strchr(s, ' ');
            if (!sp)
                continue;
            a = s;
            alen = (size_t)(sp - s);
            b = sp + 1;
            blen = strlen(b);
        } else if (json_is_array(m) && json_array_size(m) == 2) {
            a = json_string_value(json_array_get(m, 0));
            b = json_string_value(json_array_get(m, 1));
            if (!a || !b)
                continue;
            alen = strlen(a);
            blen = strlen(b);
        } else {
            continue;
        }
        int32_t ia = str_map_get(&t->ids, a, alen), ib = str_map_get(&t->ids, b, blen);
        joined.len = 0;
        if (zse_buf_append(&joined, a, alen) || zse_buf_append(&joined, b, blen)) {
            zse_buf_free(&joined);
            return -1;
        }
        int32_t im = str_map_get(&t->ids, joined.data, joined.len);
        if (ia >= 0 && ib >= 0 && im >= 0)
            pair_put(&t->merges, ia, ib, (int32_t)i, im);
    }
    zse_buf_free(&joined);
    return 0;
}

static int load_added(zse_tokenizer *t, const json_t *arr)
{
    size_t n = json_array_size(arr), i;
    json_t *e;
    t->added = zse_calloc(n + 1, sizeof *t->added);
    if (!t->added)
        return -1;
    json_array_foreach(arr, i, e) {
        added_token *a = &t->added[t->n_added];
        json_t *id = json_object_get(e, "id");
        const char *content = json_string_value(json_object_get(e, "content"));
        if (!json_is_integer(id) || !content || !*content)
            return zse_fail("tokenizer.json: added token %zu lacks id or content", i);
        a->id = (int32_t)json_integer_value(id);
        if (a->id >= t->n_vocab)
            t->n_vocab = a->id + 1; /* grown below before set_token */
        a->content = zse_strdup(content);
        if (!a->content)
            return -1;
        a->len = strlen(content);
        a->special = json_is_true(json_object_get(e, "special"));
        a->lstrip = json_is_true(json_object_get(e, "lstrip"));
        a->rstrip = json_is_true(json_object_get(e, "rstrip"));
        a->single_word = json_is_true(json_object_get(e, "single_word"));
        t->n_added++;
    }
    return 0;
}

static int32_t id_of_name(const zse_tokenizer *t, const json_t *v)
{
    const char *name = json_is_string(v) ? json_string_value(v) : json_string_value(json_object_get(v, "content"));
    return name ? zse_tokenizer_token_id(t, name) : -1;
}

zse_tokenizer *zse_tokenizer_from_json(const char *text, size_t len, const json_t *tok_cfg)
{
    init_byte_tables();
    json_error_t err;
    json_t *root = json_loadb(text, len, 0, &err);
    if (!json_is_object(root)) {
        zse_fail("tokenizer.json is not valid JSON (line %d: %s)", err.line, err.text);
        json_decref(root);
        return NULL;
    }
    zse_tokenizer *t = zse_calloc(1, sizeof *t);
    if (!t) {
        json_decref(root);
        return NULL;
    }
    json_t *model = json_object_get(root, "model");
    t->unk_id = -1;
    t->bos = t->eos = -1;
    if (load_vocab(t, model) || load_added(t, json_object_get(root, "added_tokens")))
        goto fail;
    t->vocab = zse_calloc((size_t)t->n_vocab, sizeof *t->vocab);
    t->is_special = zse_calloc((size_t)t->n_vocab, sizeof *t->is_special);
    if (!t->vocab || !t->is_special || str_map_init(&t->ids, (size_t)t->n_vocab))
        goto fail;
    const char *k;
    json_t *v;
    json_object_foreach(json_object_get(model, "vocab"), k, v) if (set_token(t, (int32_t)json_integer_value(v), k)) goto fail;
    for (int i = 0; i < t->n_added; i++) {
        if (set_token(t, t->added[i].id, t->added[i].content))
            goto fail;
        t->is_special[t->added[i].id] = t->added[i].special;
    }
    for (int i = 0; i < t->n_vocab; i++)
        if (t->vocab[i])
            str_map_put(&t->ids, t->vocab[i], i);
        else if (!(t->vocab[i] = zse_strdup("")))
            goto fail;
    t->ignore_merges = json_is_true(json_object_get(model, "ignore_merges"));
    t->byte_fallback = json_is_true(json_object_get(model, "byte_fallback"));
    const char *unk = json_string_value(json_object_get(model, "unk_token"));
    if (unk)
        t->unk_id = str_map_get(&t->ids, unk, strlen(unk));
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        t->byte_ids[b] = str_map_get(&t->ids, name, strlen(name));
    }
    if (load_merges(t, json_object_get(model, "merges")) ||
        load_normalizer(t, json_object_get(root, "normalizer")) ||
        load_pre_tokenizer(t, json_object_get(root, "pre_tokenizer")) ||
        load_decoder(t, json_object_get(root, "decoder")) ||
        load_post_processor(t, json_object_get(root, "post_processor")))
        goto fail;
    t->bos = id_of_name(t, json_object_get(tok_cfg, "bos_token"));
    t->eos = id_of_name(t, json_object_get(tok_cfg, "eos_token"));
    json_decref(root);
    return t;
fail:
    json_decref(root);
    zse_tokenizer_free(t);
    return NULL;
}

zse_tokenizer *zse_tokenizer_from_dir(const char *dir)
{
    char *path = zse_path_join(dir, "tokenizer.json");
    char *cfg_path = zse_path_join(dir, "tokenizer_config.json");
    zse_tokenizer *t = NULL;
    size_t len;
    char *text = path ? zse_read_file(path, &len) : NULL;
    json_t *cfg = NULL;
    if (cfg_path && zse_file_exists(cfg_path)) {
        json_error_t err;
        cfg = json_load_file(cfg_path, JSON_DECODE_INT_AS_REAL, &err);
    }
    if (text) {
        t = zse_tokenizer_from_json(text, len, cfg);
        if (!t)
            zse_error_prefix("%s", path);
    }
    json_decref(cfg);
    free(text);
    free(path);
    free(cfg_path);
    return t;
}

void zse_tokenizer_free(zse_tokenizer *t)
{
    if (!t)
        return;
    for (int i = 0; t->vocab && i < t->n_vocab; i++)
        free(t->vocab[i]);
    free(t->vocab);
    free(t->ids.keys);
    free(t->ids.vals);
    free(t->merges.keys);
    free(t->merges.rank);
    free(t->merges.merged);
    for (int i = 0; i < t->n_norms; i++) {
        free(t->norms[i].a);
        free(t->norms[i].b);
    }
    free(t->norms);
    for (int i = 0; i < t->n_pres; i++) {
        pcre2_code_free(t->pres[i].re);
        free(t->pres[i].replacement);
    }
    free(t->pres);
    for (int i = 0; i < t->n_decs; i++) {
        free(t->decs[i].a);
        free(t->decs[i].b);
    }
    free(t->decs);
    for (int i = 0; i < t->n_added; i++)
        free(t->added[i].content);
    free(t->added);
    free(t->is_special);
    free(t);
}

int zse_tokenizer_n_vocab(const zse_tokenizer *t) { return t->n_vocab; }
int32_t zse_tokenizer_bos(const zse_tokenizer *t) { return t->bos; }
int32_t zse_tokenizer_eos(const zse_tokenizer *t) { return t->eos; }

const char *zse_tokenizer_token_text(const zse_tokenizer *t, int32_t id)
{
    return id >= 0 && id < t->n_vocab ? t->vocab[id] : NULL;
}

int32_t zse_tokenizer_token_id(const zse_tokenizer *t, const char *text)
{
    return str_map_get(&t->ids, text, strlen(text));
}

bool zse_tokenizer_is_special(const zse_tokenizer *t, int32_t id)
{
    return id >= 0 && id < t->n_vocab && t->is_special[id];
}

/* ---- encoding ------------------------------------------------------------------------ */

typedef struct {
    size_t start, end;
} span;

typedef struct {
    span *v;
    size_t n, cap;
} spans;

static int spans_push(spans *s, size_t a, size_t b)
{
    if (a >= b)
        return 0;
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 16;
        span *p = zse_realloc(s->v, cap * sizeof *p);
        if (!p)
            return -1;
        s->v = p;
        s->cap = cap;
    }
    s->v[s->n++] = (span){a, b};
    return 0;
}

/* Python's bytes.decode(errors="replace"): invalid sequences become U+FFFD */
static int sanitize_utf8(const char *in, size_t n, zse_buf *out)
{
    size_t i = 0;
    while (i < n) {
        utf8proc_int32_t cp;
        utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)in + i, (utf8proc_ssize_t)(n - i), &cp);
        if (k < 0) {
            if (zse_buf_append(out, "\xEF\xBF\xBD", 3))
                return -1;
            i++;
        } else {
            if (zse_buf_append(out, in + i, (size_t)k))
                return -1;
            i += (size_t)k;
        }
    }
    return zse_buf_reserve(out, 0);
}

static int replace_all(const char *s, size_t n, const char *from, const char *to, zse_buf *out)
{
    size_t fl = strlen(from), tl = strlen(to), i = 0;
    if (!fl)
        return zse_buf_append(out, s, n);
    while (i < n) {
        if (i + fl <= n && memcmp(s + i, from, fl) == 0) {
            if (zse_buf_append(out, to, tl))
                return -1;
            i += fl;
        } else {
            if (zse_buf_append(out, s + i, 1))
                return -1;
            i++;
        }
    }
    return zse_buf_reserve(out, 0);
}

static int normalize(const zse_tokenizer *t, zse_buf *s)
{
    for (int k = 0; k < t->n_norms; k++) {
        const norm_step *st = &t->norms[k];
        zse_buf out = {0};
        int rc = 0;
        if (s->len == 0)
            break;
        switch (st->kind) {
        case N_NFC: case N_NFKC: case N_NFD: case N_NFKD: {
            int opts = UTF8PROC_STABLE | (st->kind == N_NFC || st->kind == N_NFKC ? UTF8PROC_COMPOSE : UTF8PROC_DECOMPOSE) |
                       (st->kind == N_NFKC || st->kind == N_NFKD ? UTF8PROC_COMPAT : 0);
            utf8proc_uint8_t *r = NULL;
            utf8proc_ssize_t rl = utf8proc_map((const utf8proc_uint8_t *)s->data, (utf8proc_ssize_t)s->len,
                                               &r, (utf8proc_option_t)opts);
            if (rl < 0)
                return zse_fail("cannot normalize text: %s", utf8proc_errmsg(rl));
            rc = zse_buf_append(&out, r, (size_t)rl);
            free(r);
            break;
        }
        case N_LOWER: {
            size_t i = 0;
            while (i < s->len && rc == 0) {
                utf8proc_int32_t cp;
                utf8proc_ssize_t n = utf8proc_iterate((const utf8proc_uint8_t *)s->data + i, (utf8proc_ssize_t)(s->len - i), &cp);
                if (n <= 0)
                    return zse_fail("invalid UTF-8 while lowercasing");
                utf8proc_uint8_t enc[4];
                utf8proc_ssize_t el = utf8proc_encode_char(utf8proc_tolower(cp), enc);
                rc = zse_buf_append(&out, enc, (size_t)el);
                i += (size_t)n;
            }
            break;
        }
        case N_PREPEND:
            rc = zse_buf_puts(&out, st->a) || zse_buf_append(&out, s->data, s->len);
            break;
        case N_REPLACE:
            rc = replace_all(s->data, s->len, st->a, st->b, &out);
            break;
        case N_STRIP: {
            size_t a = 0, b = s->len;
            while (st->left && a < b && (s->data[a] == ' ' || (s->data[a] >= '\t' && s->data[a] <= '\r')))
                a++;
            while (st->right && b > a && (s->data[b - 1] == ' ' || (s->data[b - 1] >= '\t' && s->data[b - 1] <= '\r')))
                b--;
            rc = zse_buf_append(&out, s->data + a, b - a);
            break;
        }
        }
        if (rc) {
            zse_buf_free(&out);
            return -1;
        }
        zse_buf_free(s);
        *s = out;
    }
    return 0;
}

/* split each span by the regex per the Split behaviours of HF tokenizers */
static int regex_split(const pcre2_code *re, enum split_behavior beh, const char *s, spans *in, spans *out)
{
    pcre2_match_data *md = pcre2_match_data_create_from_pattern(re, NULL);
    if (!md)
        return zse_fail("out of memory for regex matching");
    int rc = 0;
    for (size_t p = 0; p < in->n && rc == 0; p++) {
        size_t a = in->v[p].start, b = in->v[p].end, pos = 0, len = b - a, last = 0;
        size_t pending = 0; /* merged_with_next: where the current piece starts */
        while (pos <= len && rc == 0) {
            int m = pcre2_match(re, (PCRE2_SPTR)(s + a), len, pos, 0, md, NULL);
            if (m < 0)
                break;
            PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
            size_t ms = ov[0], me = ov[1];
            if (me == ms) { /* empty match: step one character */
                pos = ms + 1;
                while (pos < len && ((unsigned char)s[a + pos] & 0xC0) == 0x80)
                    pos++;
                continue;
            }
            switch (beh) {
            case B_ISOLATED: case B_CONTIGUOUS:
                rc = spans_push(out, a + last, a + ms) || spans_push(out, a + ms, a + me);
                break;
            case B_REMOVED:
                rc = spans_push(out, a + last, a + ms);
                break;
            case B_MATCHES_ONLY:
                rc = spans_push(out, a + ms, a + me);
                break;
            case B_MERGED_PREV:
                rc = spans_push(out, a + last, a + me);
                break;
            case B_MERGED_NEXT:
                rc = spans_push(out, a + pending, a + ms);
                pending = ms;
                break;
            }
            last = me;
            pos = me;
        }
        if (rc == 0) {
            if (beh == B_MERGED_NEXT)
                rc = spans_push(out, a + pending, b);
            else if (beh != B_MATCHES_ONLY)
                rc = spans_push(out, a + last, b);
        }
    }
    pcre2_match_data_free(md);
    return rc;
}

/* Metaspace rewrites the text: spaces become the replacement (▁), a replacement is
 * prepended per the scheme, and with split each ▁ starts a new piece */
static int metaspace(const pre_step *st, zse_buf *s, spans *in, spans *out, bool first_segment)
{
    zse_buf nb = {0};
    size_t rl = strlen(st->replacement);
    for (size_t p = 0; p < in->n; p++) {
        size_t piece_start = nb.len;
        const char *src = s->data + in->v[p].start;
        size_t n = in->v[p].end - in->v[p].start;
        bool prepend = st->prepend_scheme == 0 || (st->prepend_scheme == 1 && first_segment && p == 0);
        if (prepend && !(n >= rl && memcmp(src, st->replacement, rl) == 0) && !(n && src[0] == ' '))
            if (zse_buf_puts(&nb, st->replacement))
                goto fail;
        if (replace_all(src, n, " ", st->replacement, &nb))
            goto fail;
        size_t end = nb.len, cur = piece_start;
        if (st->split) {
            for (size_t i = piece_start + 1; i + rl <= end; i++)
                if (memcmp(nb.data + i, st->replacement, rl) == 0) {
                    if (spans_push(out, cur, i))
                        goto fail;
                    cur = i;
                }
        }
        if (spans_push(out, cur, end))
            goto fail;
    }
    zse_buf_free(s);
    *s = nb;
    return 0;
fail:
    zse_buf_free(&nb);
    return -1;
}

static int pre_tokenize(const zse_tokenizer *t, zse_buf *s, spans *out, bool first_segment)
{
    spans cur = {0};
    if (spans_push(&cur, 0, s->len))
        return -1;
    for (int k = 0; k < t->n_pres; k++) {
        const pre_step *st = &t->pres[k];
        spans next = {0};
        int rc = 0;
        if (st->kind == P_BYTELEVEL) {
            if (st->add_prefix_space && s->len && s->data[0] != ' ') {
                zse_buf nb = {0};
                rc = zse_buf_puts(&nb, " ") || zse_buf_append(&nb, s->data, s->len);
                if (rc == 0) {
                    zse_buf_free(s);
                    *s = nb;
                    for (size_t i = 0; i < cur.n; i++) {
                        cur.v[i].start += i ? 1 : 0;
                        cur.v[i].end += 1;
                    }
                }
            }
            if (rc == 0 && st->use_regex)
                rc = regex_split(st->re, B_ISOLATED, s->data, &cur, &next);
            else if (rc == 0) {
                free(next.v);
                continue;
            }
        } else if (st->kind == P_METASPACE) {
            rc = metaspace(st, s, &cur, &next, first_segment);
        } else {
            rc = regex_split(st->re, st->behavior, s->data, &cur, &next);
        }
        free(cur.v);
        cur = next;
        if (rc) {
            free(cur.v);
            return -1;
        }
    }
    *out = cur;
    return 0;
}

typedef struct {
    int32_t *v;
    size_t n, cap;
} id_vec;

static int ids_push(id_vec *v, int32_t id)
{
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 64;
        int32_t *p = zse_realloc(v->v, cap * sizeof *p);
        if (!p)
            return -1;
        v->v = p;
        v->cap = cap;
    }
    v->v[v->n++] = id;
    return 0;
}

typedef struct {
    int32_t id;
    int prev, next;
} sym;

typedef struct {
    int32_t rank;
    int pos;
    int32_t left, right;
} cand;

static bool cand_less(const cand *a, const cand *b)
{
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(cand *h, size_t *n, cand c)
{
    size_t i = (*n)++;
    h[i] = c;
    while (i > 0 && cand_less(&h[i], &h[(i - 1) / 2])) {
        cand tmp = h[i];
        h[i] = h[(i - 1) / 2];
        h[(i - 1) / 2] = tmp;
        i = (i - 1) / 2;
    }
}

static cand heap_pop(cand *h, size_t *n)
{
    cand top = h[0];
    h[0] = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < *n && cand_less(&h[l], &h[m]))
            m = l;
        if (r < *n && cand_less(&h[r], &h[m]))
            m = r;
        if (m == i)
            break;
        cand tmp = h[i];
        h[i] = h[m];
        h[m] = tmp;
        i = m;
    }
    return top;
}

static void push_pair(const zse_tokenizer *t, sym *sy, int pos, cand *heap, size_t *hn)
{
    int nx = sy[pos].next;
    int32_t rank, merged;
    if (nx >= 0 && pair_get(&t->merges, sy[pos].id, sy[nx].id, &rank, &merged))
        heap_push(heap, hn, (cand){rank, pos, sy[pos].id, sy[nx].id});
}

/* BPE over one piece: symbols are the piece's characters, merged lowest rank first
 * (leftmost among equals) with a heap, so long pieces stay O(n log n) */
static int bpe_word(const zse_tokenizer *t, const char *w, size_t n, id_vec *out)
{
    if (t->ignore_merges) {
        int32_t whole = str_map_get(&t->ids, w, n);
        if (whole >= 0)
            return ids_push(out, whole);
    }
    sym *sy = zse_malloc((n + 1) * sizeof *sy);
    cand *heap = zse_malloc((2 * n + 2) * sizeof *heap);
    if (!sy || !heap) {
        free(sy);
        free(heap);
        return -1;
    }
    int ns = 0;
    size_t i = 0;
    while (i < n) {
        size_t cl = 1;
        unsigned char c = (unsigned char)w[i];
        if (c >= 0xF0) cl = 4;
        else if (c >= 0xE0) cl = 3;
        else if (c >= 0xC0) cl = 2;
        if (i + cl > n)
            cl = n - i;
        int32_t id = str_map_get(&t->ids, w + i, cl);
        if (id >= 0) {
            sy[ns++] = (sym){id, 0, -1}; /* links set below */
        } else if (t->byte_fallback) {
            for (size_t b = 0; b < cl; b++) {
                int32_t bid = t->byte_ids[(unsigned char)w[i + b]];
                if (bid >= 0)
                    sy[ns++] = (sym){bid, 0, -1}; /* links set below */
                else if (t->unk_id >= 0)
                    sy[ns++] = (sym){t->unk_id, 0, -1}; /* links set below */
            }
        } else if (t->unk_id >= 0) {
            sy[ns++] = (sym){t->unk_id, 0, -1}; /* links set below */
        }
        i += cl;
    }
    for (int k = 0; k < ns; k++) {
        sy[k].prev = k - 1;
        sy[k].next = k + 1 < ns ? k + 1 : -1;
    }
    size_t hn = 0;
    for (int k = 0; k + 1 < ns; k++)
        push_pair(t, sy, k, heap, &hn);
    while (hn) {
        cand c = heap_pop(heap, &hn);
        int nx = sy[c.pos].next;
        if (sy[c.pos].id != c.left || nx < 0 || sy[nx].id != c.right)
            continue; /* stale: one side merged already */
        int32_t rank = 0, merged = -1;
        if (!pair_get(&t->merges, c.left, c.right, &rank, &merged))
            continue;
        sy[c.pos].id = merged;
        sy[nx].id = -1;
        sy[c.pos].next = sy[nx].next;
        if (sy[nx].next >= 0)
            sy[sy[nx].next].prev = c.pos;
        if (sy[c.pos].prev >= 0)
            push_pair(t, sy, sy[c.pos].prev, heap, &hn);
        push_pair(t, sy, c.pos, heap, &hn);
    }
    int rc = 0;
    for (int k = ns ? 0 : -1; k >= 0 && rc == 0; k = sy[k].next)
        rc = ids_push(out, sy[k].id);
    free(sy);
    free(heap);
    return rc;
}

static int encode_segment(const zse_tokenizer *t, const char *text, size_t n, bool first, id_vec *out)
{
    zse_buf s = {0};
    if (zse_buf_append(&s, text, n) || normalize(t, &s)) {
        zse_buf_free(&s);
        return -1;
    }
    spans pieces = {0};
    if (pre_tokenize(t, &s, &pieces, first)) {
        zse_buf_free(&s);
        return -1;
    }
    zse_buf mapped = {0};
    int rc = 0;
    for (size_t p = 0; p < pieces.n && rc == 0; p++) {
        const char *w = s.data + pieces.v[p].start;
        size_t wl = pieces.v[p].end - pieces.v[p].start;
        if (t->byte_level) {
            mapped.len = 0;
            for (size_t i = 0; i < wl && rc == 0; i++) {
                utf8proc_uint8_t enc[4];
                utf8proc_ssize_t el = utf8proc_encode_char((utf8proc_int32_t)g_cp_of_byte[(unsigned char)w[i]], enc);
                rc = zse_buf_append(&mapped, enc, (size_t)el);
            }
            if (rc == 0)
                rc = bpe_word(t, mapped.data, mapped.len, out);
        } else {
            rc = bpe_word(t, w, wl, out);
        }
    }
    zse_buf_free(&mapped);
    free(pieces.v);
    zse_buf_free(&s);
    return rc;
}

static bool is_word_byte(unsigned char c)
{
    return c >= 0x80 || (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}

static bool is_space(char c)
{
    return c == ' ' || (c >= '\t' && c <= '\r');
}

/* the longest added token matching at text[i], honoring single_word; -1 if none */
static int match_added(const zse_tokenizer *t, const char *text, size_t n, size_t i, bool parse_special)
{
    int best = -1;
    for (int k = 0; k < t->n_added; k++) {
        const added_token *a = &t->added[k];
        if (a->special && !parse_special)
            continue;
        if (a->len > n - i || (best >= 0 && a->len <= t->added[best].len))
            continue;
        if (memcmp(text + i, a->content, a->len) != 0)
            continue;
        if (a->single_word && ((i > 0 && is_word_byte((unsigned char)text[i - 1])) ||
                               (i + a->len < n && is_word_byte((unsigned char)text[i + a->len]))))
            continue;
        best = k;
    }
    return best;
}

int zse_tokenizer_encode(const zse_tokenizer *t, const char *text, size_t len, bool add_special,
                         bool parse_special, int32_t **ids_out, size_t *n_out)
{
    zse_buf clean = {0};
    if (sanitize_utf8(text, len, &clean))
        return -1;
    const char *s = clean.data;
    size_t n = clean.len;
    id_vec out = {0};
    int rc = 0;
    for (int k = 0; k < t->n_prefix && add_special && rc == 0; k++)
        rc = ids_push(&out, t->prefix_ids[k]);
    size_t seg = 0, i = 0;
    bool first = true;
    while (i < n && rc == 0) {
        int k = t->n_added ? match_added(t, s, n, i, parse_special) : -1;
        if (k < 0) {
            i++;
            continue;
        }
        const added_token *a = &t->added[k];
        size_t seg_end = i, next = i + a->len;
        if (a->lstrip)
            while (seg_end > seg && is_space(s[seg_end - 1]))
                seg_end--;
        if (a->rstrip)
            while (next < n && is_space(s[next]))
                next++;
        if (seg_end > seg)
            rc = encode_segment(t, s + seg, seg_end - seg, first, &out);
        if (rc == 0)
            rc = ids_push(&out, a->id);
        first = false;
        seg = i = next;
    }
    if (rc == 0 && seg < n)
        rc = encode_segment(t, s + seg, n - seg, first, &out);
    for (int k = 0; k < t->n_suffix && add_special && rc == 0; k++)
        rc = ids_push(&out, t->suffix_ids[k]);
    zse_buf_free(&clean);
    if (rc) {
        free(out.v);
        return -1;
    }
    if (!out.v && !(out.v = zse_malloc(sizeof *out.v)))
        return -1;
    *ids_out = out.v;
    *n_out = out.n;
    return 0;
}

/* ---- decoding -------------------------------------------------------------------------- */

typedef struct {
    zse_buf *v;
    size_t n;
} tok_list;

static int bytelevel_decode(const char *s, size_t n, zse_buf *out)
{
    size_t i = 0;
    while (i < n) {
        utf8proc_int32_t cp;
        utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &cp);
        if (k <= 0) {
            if (zse_buf_append(out, s + i, 1))
                return -1;
            i++;
            continue;
        }
        if (cp < 512 && g_byte_of_cp[cp] >= 0) {
            char b = (char)g_byte_of_cp[cp];
            if (zse_buf_append(out, &b, 1))
                return -1;
        } else if (zse_buf_append(out, s + i, (size_t)k)) {
            return -1;
        }
        i += (size_t)k;
    }
    return zse_buf_reserve(out, 0);
}

static int parse_byte_token(const zse_buf *b)
{
    if (b->len != 6 || memcmp(b->data, "<0x", 3) != 0 || b->data[5] != '>')
        return -1;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char c = b->data[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0)
            return -1;
        v = v * 16 + d;
    }
    return v;
}

static int apply_decoder(const zse_tokenizer *t, const dec_step *d, tok_list *l)
{
    for (size_t i = 0; i < l->n; i++) {
        zse_buf out = {0};
        int rc = 0;
        zse_buf *b = &l->v[i];
        switch (d->kind) {
        case D_BYTELEVEL:
            rc = bytelevel_decode(zse_buf_str(b), b->len, &out);
            break;
        case D_REPLACE:
            rc = replace_all(zse_buf_str(b), b->len, d->a, d->b, &out);
            break;
        case D_METASPACE:
            rc = replace_all(zse_buf_str(b), b->len, d->a, " ", &out);
            if (rc == 0 && i == 0 && d->prepend_scheme != 2 && out.len && out.data[0] == ' ') {
                memmove(out.data, out.data + 1, out.len);
                out.len--;
            }
            break;
        case D_STRIP: {
            size_t cl = strlen(d->a), a = 0, e = b->len;
            for (int k = 0; k < d->start && e - a >= cl && cl && memcmp(b->data + a, d->a, cl) == 0; k++)
                a += cl;
            for (int k = 0; k < d->stop && e - a >= cl && cl && memcmp(b->data + e - cl, d->a, cl) == 0; k++)
                e -= cl;
            rc = zse_buf_append(&out, zse_buf_str(b) + a, e - a);
            break;
        }
        case D_BYTEFALLBACK: case D_FUSE:
            continue;
        }
        (void)t;
        if (rc) {
            zse_buf_free(&out);
            return -1;
        }
        zse_buf_free(b);
        *b = out;
    }
    if (d->kind == D_BYTEFALLBACK) {
        /* runs of <0xNN> tokens become their bytes; invalid UTF-8 becomes U+FFFD per byte */
        size_t w = 0;
        for (size_t i = 0; i < l->n;) {
            if (parse_byte_token(&l->v[i]) < 0) {
                if (w != i) { /* move, leaving the old slot empty so it is freed once */
                    l->v[w] = l->v[i];
                    memset(&l->v[i], 0, sizeof l->v[i]);
                }
                w++;
                i++;
                continue;
            }
            zse_buf raw = {0}, fixed = {0};
            size_t j = i;
            while (j < l->n && parse_byte_token(&l->v[j]) >= 0) {
                char c = (char)parse_byte_token(&l->v[j]);
                if (zse_buf_append(&raw, &c, 1))
                    return -1;
                zse_buf_free(&l->v[j]);
                j++;
            }
            if (sanitize_utf8(raw.data, raw.len, &fixed))
                return -1;
            zse_buf_free(&raw);
            l->v[w++] = fixed;
            i = j;
        }
        l->n = w;
    } else if (d->kind == D_FUSE && l->n > 1) {
        for (size_t i = 1; i < l->n; i++) {
            if (zse_buf_append(&l->v[0], zse_buf_str(&l->v[i]), l->v[i].len))
                return -1;
            zse_buf_free(&l->v[i]);
        }
        l->n = 1;
    }
    return 0;
}

char *zse_tokenizer_decode(const zse_tokenizer *t, const int32_t *ids, size_t n, bool skip_special)
{
    tok_list l = {zse_calloc(n + 1, sizeof(zse_buf)), 0};
    if (!l.v)
        return NULL;
    char *result = NULL;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->n_vocab) {
            zse_fail("token id %d is outside the vocabulary (0..%d)", ids[i], t->n_vocab - 1);
            goto done;
        }
        if (skip_special && t->is_special[ids[i]])
            continue;
        if (zse_buf_puts(&l.v[l.n++], t->vocab[ids[i]]))
            goto done;
    }
    for (int k = 0; k < t->n_decs; k++)
        if (apply_decoder(t, &t->decs[k], &l))
            goto done;
    zse_buf joined = {0}, clean = {0};
    for (size_t i = 0; i < l.n; i++)
        if (zse_buf_append(&joined, zse_buf_str(&l.v[i]), l.v[i].len))
            goto done;
    if (sanitize_utf8(zse_buf_str(&joined), joined.len, &clean) == 0)
        result = clean.data ? clean.data : zse_strdup("");
    zse_buf_free(&joined);
done:
    for (size_t i = 0; i < n; i++)
        zse_buf_free(&l.v[i]);
    free(l.v);
    return result;
}

/* ---- streaming ----------------------------------------------------------------------------
 * Decodes a sliding window of ids and emits what the newest id adds, holding text back
 * while it ends in an incomplete character (U+FFFD). The window starts one emission back
 * so decoders that look at the first token (SentencePiece's leading space) see context. */
struct zse_tokenizer_stream {
    const zse_tokenizer *t;
    bool skip_special;
    id_vec ids;
    size_t prefix, read;
};

zse_tokenizer_stream *zse_tokenizer_stream_new(const zse_tokenizer *t, bool skip_special)
{
    zse_tokenizer_stream *s = zse_calloc(1, sizeof *s);
    if (s) {
        s->t = t;
        s->skip_special = skip_special;
    }
    return s;
}

static int stream_emit(zse_tokenizer_stream *s, zse_buf *out, bool final)
{
    char *prev = zse_tokenizer_decode(s->t, s->ids.v + s->prefix, s->read - s->prefix, s->skip_special);
    char *cur = zse_tokenizer_decode(s->t, s->ids.v + s->prefix, s->ids.n - s->prefix, s->skip_special);
    int rc = 0;
    if (!prev || !cur) {
        rc = -1;
    } else {
        size_t pl = strlen(prev), cl = strlen(cur);
        bool incomplete = cl >= 3 && memcmp(cur + cl - 3, "\xEF\xBF\xBD", 3) == 0;
        if ((!incomplete || final) && cl >= pl && memcmp(cur, prev, pl) == 0) {
            rc = zse_buf_append(out, cur + pl, cl - pl);
            s->prefix = s->read;
            s->read = s->ids.n;
        } else if (!incomplete && zse_buf_reserve(out, 0) == 0) {
            s->read = s->ids.n; /* the window's decoding changed; move on */
        }
    }
    free(prev);
    free(cur);
    return rc;
}

int zse_tokenizer_stream_push(zse_tokenizer_stream *s, int32_t id, zse_buf *out)
{
    /* a model's embedding table is often padded beyond its tokenizer (Qwen2.5: 152064 rows,
     * 151665 tokens); an id past the tokenizer has no text */
    if (id < 0 || id >= s->t->n_vocab)
        return id < 0 ? zse_fail("token id %d is negative", id) : zse_buf_reserve(out, 0);
    if (ids_push(&s->ids, id))
        return -1;
    return stream_emit(s, out, false);
}

int zse_tokenizer_stream_flush(zse_tokenizer_stream *s, zse_buf *out)
{
    return s->read < s->ids.n ? stream_emit(s, out, true) : zse_buf_reserve(out, 0);
}

void zse_tokenizer_stream_free(zse_tokenizer_stream *s)
{
    if (!s)
        return;
    free(s->ids.v);
    free(s);
}

/* ---- opening from a model path ---------------------------------------------------------- */

zse_tokenizer *zse_tokenizer_from_zse(const zse_file *f)
{
    size_t len;
    const char *json = zse_file_tokenizer_json(f, &len);
    if (!json)
        return NULL;
    zse_tokenizer *t = zse_tokenizer_from_json(json, len, zse_file_tokenizer_config(f));
    if (!t)
        zse_error_prefix("%s", zse_file_path(f));
    return t;
}

zse_tokenizer *zse_tokenizer_open(const char *path)
{
    if (zse_file_exists(path)) {
        /* a GGUF file by its magic, whatever its name */
        char magic[4] = {0};
        FILE *fp = fopen(path, "rb");
        size_t got = fp ? fread(magic, 1, 4, fp) : 0;
        if (fp)
            fclose(fp);
        if (got == 4 && memcmp(magic, "GGUF", 4) == 0)
            return zse_tokenizer_from_gguf(path);
        zse_file *f = zse_file_open(path);
        if (!f)
            return NULL;
        zse_tokenizer *t = zse_tokenizer_from_zse(f);
        zse_file_close(f);
        return t;
    }
    return zse_tokenizer_from_dir(path);
}
