/* load.c — tokenizer.json into the pipeline encode and decode run: the vocabulary
 * (string ↔ id, byte tables), BPE merges, added tokens, and the normalizer,
 * pre-tokenizer, decoder and post-processor steps; free and the accessors. */
#include "tokenizer/tokenizer_internal.h"

static int str_map_init(str_map *m, size_t n)
{
    m->cap = 16;
    while (m->cap < n * 2)
        m->cap *= 2;
    m->keys = zse_calloc(m->cap, sizeof *m->keys);
    m->lens = zse_calloc(m->cap, sizeof *m->lens);
    m->vals = zse_calloc(m->cap, sizeof *m->vals);
    return m->keys && m->lens && m->vals ? 0 : -1;
}

static void str_map_free(str_map *m)
{
    free(m->keys);
    free(m->lens);
    free(m->vals);
}

int32_t tok_str_map_get(const str_map *m, const char *s, size_t n)
{
    if (!m->cap)
        return -1;
    size_t i = (size_t)zse_hash64(s, n) & (m->cap - 1);
    while (m->keys[i]) {
        if (m->lens[i] == n && memcmp(m->keys[i], s, n) == 0)
            return m->vals[i];
        i = (i + 1) & (m->cap - 1);
    }
    return -1;
}

/* first put of a key wins (HF's vocabulary maps each string to one id) */
static void str_map_put(str_map *m, const char *key, int32_t val)
{
    size_t n = strlen(key), i = (size_t)zse_hash64(key, n) & (m->cap - 1);
    while (m->keys[i]) {
        if (m->lens[i] == n && memcmp(m->keys[i], key, n) == 0)
            return;
        i = (i + 1) & (m->cap - 1);
    }
    m->keys[i] = key;
    m->lens[i] = (uint32_t)n;
    m->vals[i] = val;
}

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    return x;
}


static uint64_t pair_key(int32_t a, int32_t b)
{
    return ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
}

static void pair_put(pair_map *m, int32_t a, int32_t b, int32_t rank, int32_t merged)
{
    uint64_t k = pair_key(a, b);
    size_t i = (size_t)mix64(k) & (m->cap - 1);
    while (m->keys[i] && m->keys[i] != k)
        i = (i + 1) & (m->cap - 1);
    if (m->keys[i] == k)
        return; /* the first (lowest) rank wins */
    m->keys[i] = k;
    m->rank[i] = rank;
    m->merged[i] = merged;
}

bool tok_pair_get(const pair_map *m, int32_t a, int32_t b, int32_t *rank, int32_t *merged)
{
    if (!m->cap)
        return false;
    uint64_t k = pair_key(a, b);
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

static int cp_pairs_add(cp_pair_set *s, int32_t a, int32_t b)
{
    if ((s->n + 1) * 2 > s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 1024;
        uint64_t *k = zse_calloc(cap, sizeof *k);
        if (!k)
            return -1;
        for (size_t i = 0; i < s->cap; i++) {
            if (!s->keys[i])
                continue;
            size_t j = (size_t)mix64(s->keys[i]) & (cap - 1);
            while (k[j])
                j = (j + 1) & (cap - 1);
            k[j] = s->keys[i];
        }
        free(s->keys);
        s->keys = k;
        s->cap = cap;
    }
    uint64_t key = pair_key(a, b);
    size_t i = (size_t)mix64(key) & (s->cap - 1);
    while (s->keys[i] && s->keys[i] != key)
        i = (i + 1) & (s->cap - 1);
    if (!s->keys[i]) {
        s->keys[i] = key;
        s->n++;
    }
    return 0;
}

bool tok_cp_pairs_has(const cp_pair_set *s, int32_t a, int32_t b)
{
    if (!s->cap)
        return false;
    uint64_t key = pair_key(a, b);
    size_t i = (size_t)mix64(key) & (s->cap - 1);
    while (s->keys[i]) {
        if (s->keys[i] == key)
            return true;
        i = (i + 1) & (s->cap - 1);
    }
    return false;
}

/* ---- GPT-2's byte ↔ printable character table -------------------------------------- */

uint32_t tok_cp_of_byte[256];
int tok_byte_of_cp[512];
static pthread_once_t g_tables_once = PTHREAD_ONCE_INIT;

static void init_byte_tables(void)
{
    int n = 0;
    for (int b = 0; b < 256; b++) {
        bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        tok_cp_of_byte[b] = printable ? (uint32_t)b : (uint32_t)(256 + n++);
    }
    for (int i = 0; i < 512; i++)
        tok_byte_of_cp[i] = -1;
    for (int b = 0; b < 256; b++)
        tok_byte_of_cp[tok_cp_of_byte[b]] = b;
}

static const char GPT2_REGEX[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

/* HF's Punctuation pre-tokenizer: Unicode P* or ASCII punctuation (which includes $+<=>^`|~) */
static const char PUNCT_REGEX[] = "[\\p{P}!-/:-@\\[-`{-~]";

/* HF runs Split and Replace patterns with Oniguruma and its Whitespace pre-tokenizer with
 * Rust's regex crate; PCRE2 with UCP differs from both in a few classes, so patterns are
 * rewritten before compiling:
 *   \w — Oniguruma: Alphabetic, marks, decimal digits, connector punctuation (PCRE2 10.42:
 *        letters, all numbers, '_'); Rust adds the two join controls
 *   \s — both: the White_Space property, which includes U+0085 (PCRE2's does not)
 * and ^ $ match at every line, as Oniguruma's Ruby syntax has them (PCRE2_MULTILINE). */
#define WORD_CLASS "\\p{L}\\p{Nl}\\p{M}\\p{Nd}\\p{Pc}\\x{24B6}-\\x{24E9}\\x{1F130}-\\x{1F149}\\x{1F150}-\\x{1F169}\\x{1F170}-\\x{1F189}"
#define JOIN_CONTROLS "\\x{200C}\\x{200D}"
#define SPACE_CLASS "\\s\\x{85}"

static int translate_regex(const char *p, size_t n, bool rust_word, zse_buf *out)
{
    const char *word = rust_word ? WORD_CLASS JOIN_CONTROLS : WORD_CLASS;
    bool in_class = false;
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0;) {
        char c = p[i];
        if (c == '\\' && i + 1 < n) {
            char d = p[i + 1];
            if (d == 'w')
                rc = in_class ? zse_buf_puts(out, word) : zse_buf_printf(out, "[%s]", word);
            else if (d == 'W' && !in_class)
                rc = zse_buf_printf(out, "[^%s]", word);
            else if (d == 's')
                rc = zse_buf_puts(out, in_class ? SPACE_CLASS : "[" SPACE_CLASS "]");
            else if (d == 'S' && !in_class)
                rc = zse_buf_puts(out, "[^" SPACE_CLASS "]");
            else if (d == 'Q') { /* \Q...\E is literal: copied as it is */
                const char *e = memmem(p + i, n - i, "\\E", 2);
                size_t end = e ? (size_t)(e - p) + 2 : n;
                rc = zse_buf_append(out, p + i, end - i);
                i = end;
                continue;
            } else
                rc = zse_buf_append(out, p + i, 2);
            i += 2;
            continue;
        }
        if (c == '[' && !in_class) {
            in_class = true;
            size_t j = i + 1;
            if (j < n && p[j] == '^')
                j++;
            if (j < n && p[j] == ']') /* a ] first in a class is literal */
                j++;
            rc = zse_buf_append(out, p + i, j - i);
            i = j;
            continue;
        }
        if (c == '[' && in_class && i + 1 < n && p[i + 1] == ':') { /* [:alpha:] */
            const char *e = memmem(p + i, n - i, ":]", 2);
            size_t end = e ? (size_t)(e - p) + 2 : i + 1;
            rc = zse_buf_append(out, p + i, end - i);
            i = end;
            continue;
        }
        if (c == ']' && in_class)
            in_class = false;
        rc = zse_buf_append(out, &c, 1);
        i++;
    }
    return rc ? -1 : zse_buf_reserve(out, 0);
}

static pcre2_code *compile_pcre2(const char *pattern, size_t len, uint32_t opts)
{
    int err;
    PCRE2_SIZE off;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pattern, len, PCRE2_UTF | PCRE2_MATCH_INVALID_UTF | opts, &err, &off,
                                   NULL);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        zse_fail("tokenizer.json: pattern \"%.*s\" does not compile at offset %zu: %s", (int)(len > 80 ? 80 : len),
                 pattern, (size_t)off, msg);
        return NULL;
    }
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* the interpreter runs it where JIT is absent */
    return re;
}

/* a string pattern: matched literally */
static pcre2_code *compile_literal(const char *s, size_t len)
{
    return compile_pcre2(s, len, PCRE2_LITERAL);
}

/* a regex as HF would run it (see translate_regex) */
static pcre2_code *compile_regex_as(const char *pattern, bool rust_word)
{
    zse_buf tr = {0};
    pcre2_code *re = NULL;
    if (translate_regex(pattern, strlen(pattern), rust_word, &tr) == 0)
        re = compile_pcre2(zse_buf_str(&tr), tr.len, PCRE2_UCP | PCRE2_MULTILINE);
    zse_buf_free(&tr);
    return re;
}

static pcre2_code *compile_regex(const char *pattern)
{
    return compile_regex_as(pattern, false);
}

/* ---- loading ------------------------------------------------------------------------ */

static char *dup_str(const json_t *v)
{
    const char *s = json_string_value(v);
    return zse_strdup(s ? s : "");
}

/* {"String": s} or {"Regex": r} → a compiled pattern */
static pcre2_code *load_pattern(const json_t *pat)
{
    const char *rx = json_string_value(json_object_get(pat, "Regex"));
    json_t *str = json_object_get(pat, "String");
    if (rx)
        return compile_regex(rx);
    if (json_is_string(str))
        return compile_literal(json_string_value(str), json_string_length(str));
    zse_fail("tokenizer.json: a pattern is neither {\"String\": ...} nor {\"Regex\": ...}");
    return NULL;
}

static int prepend_scheme_of(const json_t *n)
{
    const char *ps = json_string_value(json_object_get(n, "prepend_scheme"));
    if (ps)
        return strcmp(ps, "first") == 0 ? 1 : strcmp(ps, "never") == 0 ? 2 : 0;
    /* older files: add_prefix_space true/false */
    json_t *aps = json_object_get(n, "add_prefix_space");
    return aps && !json_is_true(aps) ? 2 : 0;
}

static int push_norm(zse_tokenizer *t, norm_step s)
{
    norm_step *p = zse_realloc(t->norms, (size_t)(t->n_norms + 1) * sizeof *p);
    if (!p) {
        free(s.a);
        free(s.b);
        free(s.map.data);
        pcre2_code_free(s.re);
        return -1;
    }
    t->norms = p;
    t->norms[t->n_norms++] = s;
    return 0;
}

static int load_normalizer(zse_tokenizer *t, const json_t *n, int depth)
{
    if (!n || json_is_null(n))
        return 0;
    const char *type = json_string_value(json_object_get(n, "type"));
    if (!type || depth > 8)
        return zse_fail("tokenizer.json: normalizer without a type (or nested too deeply)");
    if (strcmp(type, "Sequence") == 0) {
        size_t i;
        json_t *e;
        json_array_foreach(json_object_get(n, "normalizers"), i, e) if (load_normalizer(t, e, depth + 1)) return -1;
        return 0;
    }
    norm_step s = {0};
    if (strcmp(type, "NFC") == 0) {
        s.kind = N_NFC;
    } else if (strcmp(type, "NFKC") == 0) {
        s.kind = N_NFKC;
    } else if (strcmp(type, "NFD") == 0) {
        s.kind = N_NFD;
    } else if (strcmp(type, "NFKD") == 0) {
        s.kind = N_NFKD;
    } else if (strcmp(type, "Lowercase") == 0) {
        s.kind = N_LOWER;
    } else if (strcmp(type, "Prepend") == 0) {
        s.kind = N_PREPEND;
        if (!(s.a = dup_str(json_object_get(n, "prepend"))))
            return -1;
    } else if (strcmp(type, "Replace") == 0) {
        s.kind = N_REPLACE;
        json_t *pat = json_object_get(n, "pattern");
        if (json_is_string(json_object_get(pat, "String"))) {
            s.a = dup_str(json_object_get(pat, "String")); /* plain search is faster than a regex */
        } else if (!(s.re = load_pattern(pat))) {
            return -1;
        }
        if (!(s.b = dup_str(json_object_get(n, "content")))) {
            free(s.a);
            pcre2_code_free(s.re);
            return -1;
        }
    } else if (strcmp(type, "Strip") == 0) {
        s.kind = N_STRIP;
        s.left = json_is_true(json_object_get(n, "strip_left"));
        s.right = json_is_true(json_object_get(n, "strip_right"));
    } else if (strcmp(type, "StripAccents") == 0) {
        s.kind = N_STRIP_ACCENTS;
    } else if (strcmp(type, "Nmt") == 0) {
        s.kind = N_NMT;
    } else if (strcmp(type, "BertNormalizer") == 0) {
        s.kind = N_BERT;
        json_t *clean = json_object_get(n, "clean_text"), *cjk = json_object_get(n, "handle_chinese_chars"),
               *lower = json_object_get(n, "lowercase"), *accents = json_object_get(n, "strip_accents");
        s.clean_text = !clean || json_is_true(clean); /* HF's defaults: true, true, true, none */
        s.chinese_chars = !cjk || json_is_true(cjk);
        s.lowercase = !lower || json_is_true(lower);
        s.strip_accents = json_is_boolean(accents) ? json_is_true(accents) : s.lowercase;
    } else if (strcmp(type, "Precompiled") == 0) {
        s.kind = N_PRECOMPILED;
        json_t *map = json_object_get(n, "precompiled_charsmap");
        if (json_is_null(map) || (json_is_string(map) && json_string_length(map) == 0))
            return 0; /* an empty charsmap normalizes nothing (HF skips it too) */
        if (!json_is_string(map))
            return zse_fail("tokenizer.json: Precompiled normalizer without a precompiled_charsmap string");
        if (tok_charsmap_load(&s.map, json_string_value(map), json_string_length(map)))
            return -1;
    } else {
        return zse_fail("tokenizer.json: normalizer '%s' is not supported", type);
    }
    return push_norm(t, s);
}

static int push_pre(zse_tokenizer *t, pre_step s)
{
    pre_step *p = zse_realloc(t->pres, (size_t)(t->n_pres + 1) * sizeof *p);
    if (!p) {
        pcre2_code_free(s.re);
        free(s.replacement);
        return -1;
    }
    t->pres = p;
    t->pres[t->n_pres++] = s;
    return 0;
}

static int push_split(zse_tokenizer *t, const char *regex, enum split_behavior b, bool invert)
{
    pre_step s = {.kind = P_SPLIT, .behavior = b, .invert = invert};
    if (!(s.re = compile_regex(regex)))
        return -1;
    return push_pre(t, s);
}

static int behavior_of(const json_t *n, enum split_behavior *out)
{
    const char *b = json_string_value(json_object_get(n, "behavior"));
    if (!b || strcmp(b, "Isolated") == 0) *out = B_ISOLATED;
    else if (strcmp(b, "Removed") == 0) *out = B_REMOVED;
    else if (strcmp(b, "MergedWithPrevious") == 0) *out = B_MERGED_PREV;
    else if (strcmp(b, "MergedWithNext") == 0) *out = B_MERGED_NEXT;
    else if (strcmp(b, "Contiguous") == 0) *out = B_CONTIGUOUS;
    else return zse_fail("tokenizer.json: split behavior '%s' is not known", b);
    return 0;
}

static int load_pre_tokenizer(zse_tokenizer *t, const json_t *n, int depth)
{
    if (!n || json_is_null(n))
        return 0;
    const char *type = json_string_value(json_object_get(n, "type"));
    if (!type || depth > 8)
        return zse_fail("tokenizer.json: pre_tokenizer without a type (or nested too deeply)");
    if (strcmp(type, "Sequence") == 0) {
        size_t i;
        json_t *e;
        json_array_foreach(json_object_get(n, "pretokenizers"), i, e) if (load_pre_tokenizer(t, e, depth + 1)) return -1;
        return 0;
    }
    pre_step s = {0};
    if (strcmp(type, "Split") == 0) {
        s.kind = P_SPLIT;
        s.invert = json_is_true(json_object_get(n, "invert"));
        if (behavior_of(n, &s.behavior) || !(s.re = load_pattern(json_object_get(n, "pattern"))))
            return -1;
        return push_pre(t, s);
    }
    if (strcmp(type, "ByteLevel") == 0) {
        s.kind = P_BYTELEVEL;
        s.add_prefix_space = json_is_true(json_object_get(n, "add_prefix_space"));
        json_t *ur = json_object_get(n, "use_regex");
        s.use_regex = !ur || json_is_true(ur);
        if (s.use_regex && !(s.re = compile_regex(GPT2_REGEX)))
            return -1;
        t->byte_level = true;
        return push_pre(t, s);
    }
    if (strcmp(type, "Metaspace") == 0) {
        s.kind = P_METASPACE;
        if (!(s.replacement = dup_str(json_object_get(n, "replacement"))))
            return -1;
        s.prepend_scheme = prepend_scheme_of(n);
        json_t *sp = json_object_get(n, "split");
        s.split = !sp || json_is_true(sp);
        s.behavior = B_MERGED_NEXT; /* each ▁ starts a piece */
        if (!*s.replacement) {
            free(s.replacement);
            return zse_fail("tokenizer.json: Metaspace with an empty replacement");
        }
        if (!(s.re = compile_literal(s.replacement, strlen(s.replacement)))) {
            free(s.replacement);
            return -1;
        }
        return push_pre(t, s);
    }
    /* the rest are fixed splits, written as the regexes HF's character tests amount to */
    if (strcmp(type, "Digits") == 0)
        return push_split(t, "\\p{N}", json_is_true(json_object_get(n, "individual_digits")) ? B_ISOLATED : B_CONTIGUOUS,
                          false);
    if (strcmp(type, "Punctuation") == 0) {
        enum split_behavior b;
        return behavior_of(n, &b) ? -1 : push_split(t, PUNCT_REGEX, b, false);
    }
    if (strcmp(type, "Whitespace") == 0) { /* run by Rust's regex crate, whose \w has the join controls */
        s = (pre_step){.kind = P_SPLIT, .behavior = B_REMOVED, .invert = true};
        if (!(s.re = compile_regex_as("\\w+|[^\\w\\s]+", true)))
            return -1;
        return push_pre(t, s);
    }
    if (strcmp(type, "WhitespaceSplit") == 0)
        return push_split(t, "\\s", B_REMOVED, false);
    if (strcmp(type, "BertPreTokenizer") == 0)
        return push_split(t, "\\s", B_REMOVED, false) || push_split(t, PUNCT_REGEX, B_ISOLATED, false) ? -1 : 0;
    if (strcmp(type, "CharDelimiterSplit") == 0) {
        const char *d = json_string_value(json_object_get(n, "delimiter"));
        if (!d || !*d)
            return zse_fail("tokenizer.json: CharDelimiterSplit without a delimiter");
        s.kind = P_SPLIT;
        s.behavior = B_REMOVED;
        if (!(s.re = compile_literal(d, strlen(d))))
            return -1;
        return push_pre(t, s);
    }
    return zse_fail("tokenizer.json: pre-tokenizer '%s' is not supported", type);
}

static int push_dec(zse_tokenizer *t, dec_step s)
{
    dec_step *p = zse_realloc(t->decs, (size_t)(t->n_decs + 1) * sizeof *p);
    if (!p) {
        free(s.a);
        free(s.b);
        pcre2_code_free(s.re);
        return -1;
    }
    t->decs = p;
    t->decs[t->n_decs++] = s;
    return 0;
}

static int load_decoder(zse_tokenizer *t, const json_t *n, int depth)
{
    if (!n || json_is_null(n))
        return 0;
    const char *type = json_string_value(json_object_get(n, "type"));
    if (!type || depth > 8)
        return zse_fail("tokenizer.json: decoder without a type (or nested too deeply)");
    if (strcmp(type, "Sequence") == 0) {
        size_t i;
        json_t *e;
        json_array_foreach(json_object_get(n, "decoders"), i, e) if (load_decoder(t, e, depth + 1)) return -1;
        return 0;
    }
    dec_step s = {0};
    if (strcmp(type, "ByteLevel") == 0) {
        s.kind = D_BYTELEVEL;
    } else if (strcmp(type, "ByteFallback") == 0) {
        s.kind = D_BYTEFALLBACK;
    } else if (strcmp(type, "Fuse") == 0) {
        s.kind = D_FUSE;
    } else if (strcmp(type, "Replace") == 0) {
        s.kind = D_REPLACE;
        json_t *pat = json_object_get(n, "pattern");
        if (json_is_string(json_object_get(pat, "String")))
            s.a = dup_str(json_object_get(pat, "String"));
        else if (!(s.re = load_pattern(pat)))
            return -1;
        s.b = dup_str(json_object_get(n, "content"));
    } else if (strcmp(type, "Strip") == 0) {
        s.kind = D_STRIP;
        s.a = dup_str(json_object_get(n, "content"));
        s.start = (int)json_integer_value(json_object_get(n, "start"));
        s.stop = (int)json_integer_value(json_object_get(n, "stop"));
    } else if (strcmp(type, "WordPiece") == 0) {
        s.kind = D_WORDPIECE;
        json_t *prefix = json_object_get(n, "prefix"), *cleanup = json_object_get(n, "cleanup");
        s.a = zse_strdup(json_is_string(prefix) ? json_string_value(prefix) : "##");
        s.cleanup = !cleanup || json_is_true(cleanup);
    } else if (strcmp(type, "CTC") == 0) {
        s.kind = D_CTC;
        json_t *pad = json_object_get(n, "pad_token"), *delim = json_object_get(n, "word_delimiter_token"),
               *cleanup = json_object_get(n, "cleanup");
        s.a = zse_strdup(json_is_string(pad) ? json_string_value(pad) : "<pad>");
        s.b = zse_strdup(json_is_string(delim) ? json_string_value(delim) : "|");
        s.cleanup = !cleanup || json_is_true(cleanup);
    } else if (strcmp(type, "Metaspace") == 0) {
        s.kind = D_METASPACE;
        s.a = dup_str(json_object_get(n, "replacement"));
        s.prepend_scheme = prepend_scheme_of(n);
    } else {
        return zse_fail("tokenizer.json: decoder '%s' is not supported", type);
    }
    return push_dec(t, s);
}

static int add_around(zse_tokenizer *t, bool after, int32_t id)
{
    int *n = after ? &t->n_suffix : &t->n_prefix;
    if (*n >= MAX_SPECIAL_AROUND)
        return zse_fail("tokenizer.json: post-processor adds more than %d tokens", MAX_SPECIAL_AROUND);
    (after ? t->suffix_ids : t->prefix_ids)[(*n)++] = id;
    return 0;
}

/* the special tokens a post-processor puts around one sequence (what add_special adds) */
static int load_post_processor(zse_tokenizer *t, const json_t *n, int depth)
{
    if (!n || json_is_null(n))
        return 0;
    const char *type = json_string_value(json_object_get(n, "type"));
    if (!type || depth > 8)
        return zse_fail("tokenizer.json: post_processor without a type (or nested too deeply)");
    size_t i;
    json_t *e;
    if (strcmp(type, "Sequence") == 0) {
        json_array_foreach(json_object_get(n, "processors"), i, e) if (load_post_processor(t, e, depth + 1)) return -1;
        return 0;
    }
    if (strcmp(type, "RobertaProcessing") == 0 || strcmp(type, "BertProcessing") == 0) {
        /* "cls": [token, id], "sep": [token, id]: <cls> A <sep> */
        json_t *cls = json_array_get(json_object_get(n, "cls"), 1), *sep = json_array_get(json_object_get(n, "sep"), 1);
        if (!json_is_integer(cls) || !json_is_integer(sep))
            return zse_fail("tokenizer.json: %s without cls/sep ids", type);
        return add_around(t, false, (int32_t)json_integer_value(cls)) ||
                       add_around(t, true, (int32_t)json_integer_value(sep)) ? -1 : 0;
    }
    if (strcmp(type, "TemplateProcessing") != 0)
        return 0; /* ByteLevel (offsets only) adds no tokens */
    json_t *specials = json_object_get(n, "special_tokens");
    bool after = false;
    json_array_foreach(json_object_get(n, "single"), i, e) {
        if (json_object_get(e, "Sequence")) {
            after = true;
            continue;
        }
        const char *name = json_string_value(json_object_get(json_object_get(e, "SpecialToken"), "id"));
        json_t *ids = json_object_get(json_object_get(specials, name ? name : ""), "ids");
        if (!json_is_array(ids))
            return zse_fail("tokenizer.json: TemplateProcessing names '%s', which special_tokens lacks", name ? name : "?");
        size_t k;
        json_t *id;
        json_array_foreach(ids, k, id) if (add_around(t, after, (int32_t)json_integer_value(id))) return -1;
    }
    return 0;
}

static int count_vocab(zse_tokenizer *t, const json_t *model)
{
    const char *type = json_string_value(json_object_get(model, "type"));
    /* files from older tokenizers omit the type of a model: BPE has merges, WordPiece a
     * continuing_subword_prefix, Unigram a list for its vocab */
    if (!type)
        type = json_object_get(model, "merges")                      ? "BPE"
               : json_is_array(json_object_get(model, "vocab"))      ? "Unigram"
               : json_object_get(model, "continuing_subword_prefix") ? "WordPiece"
                                                                     : "?";
    if (strcmp(type, "Unigram") == 0) {
        t->model = MODEL_UNIGRAM;
        return tok_unigram_count(model, &t->n_vocab);
    }
    if (strcmp(type, "WordPiece") == 0)
        t->model = MODEL_WORDPIECE;
    else if (strcmp(type, "BPE") != 0)
        return zse_fail("tokenizer.json: model type '%s' is not supported (BPE, Unigram and WordPiece are)", type);
    json_t *vocab = json_object_get(model, "vocab");
    if (!json_is_object(vocab))
        return zse_fail("tokenizer.json: model.vocab is missing");
    int max_id = -1;
    const char *k;
    json_t *v;
    json_object_foreach(vocab, k, v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= (1 << 24))
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

static int add_token_pairs(zse_tokenizer *t, const char *s)
{
    size_t n = strlen(s), i = 0, l;
    int32_t prev = -1;
    while (i < n) {
        int32_t cp = tok_cp_at(s, n, i, &l);
        if (prev >= 0 && cp >= 0 && cp_pairs_add(&t->joined, prev, cp))
            return -1;
        prev = cp;
        i += l;
    }
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
    size_t plen = t->subword_prefix ? strlen(t->subword_prefix) : 0;
    zse_buf joined = {0};
    for (size_t i = 0; i < n; i++) {
        json_t *m = json_array_get(merges, i);
        const char *a, *b, *s = json_string_value(m);
        size_t alen, blen;
        if (s) { /* "a b": the first space separates (tokens of this form hold none) */
            const char *sp = strchr(s, ' ');
            if (!sp) {
                zse_buf_free(&joined);
                return zse_fail("tokenizer.json: merge %zu (\"%s\") is not \"left right\"", i, s);
            }
            a = s;
            alen = (size_t)(sp - s);
            b = sp + 1;
            blen = strlen(b);
        } else if (json_array_size(m) == 2 && json_is_string(json_array_get(m, 0)) &&
                   json_is_string(json_array_get(m, 1))) {
            a = json_string_value(json_array_get(m, 0));
            b = json_string_value(json_array_get(m, 1));
            alen = strlen(a);
            blen = strlen(b);
        } else {
            zse_buf_free(&joined);
            return zse_fail("tokenizer.json: merge %zu is neither \"a b\" nor [\"a\", \"b\"]", i);
        }
        int32_t ia = tok_str_map_get(&t->ids, a, alen), ib = tok_str_map_get(&t->ids, b, blen);
        /* with a continuing-subword prefix, "a" + "##b" makes "ab" */
        const char *btail = b;
        size_t btail_len = blen;
        if (plen && blen >= plen && memcmp(b, t->subword_prefix, plen) == 0) {
            btail += plen;
            btail_len -= plen;
        }
        joined.len = 0;
        if (zse_buf_append(&joined, a, alen) || zse_buf_append(&joined, btail, btail_len)) {
            zse_buf_free(&joined);
            return -1;
        }
        int32_t im = tok_str_map_get(&t->ids, joined.data, joined.len);
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
        if (!json_is_integer(id) || json_integer_value(id) < 0 || json_integer_value(id) >= (1 << 24) || !content ||
            !*content)
            return zse_fail("tokenizer.json: added token %zu lacks a valid id or content", i);
        a->id = (int32_t)json_integer_value(id);
        if (a->id >= t->n_vocab)
            t->n_vocab = a->id + 1;
        if (!(a->content = zse_strdup(content)))
            return -1;
        a->len = strlen(content);
        a->special = json_is_true(json_object_get(e, "special"));
        a->lstrip = json_is_true(json_object_get(e, "lstrip"));
        a->rstrip = json_is_true(json_object_get(e, "rstrip"));
        a->single_word = json_is_true(json_object_get(e, "single_word"));
        json_t *norm = json_object_get(e, "normalized");
        a->normalized = norm ? json_is_true(norm) : !a->special; /* HF's default */
        t->n_added++;
    }
    return 0;
}


/* normalized added tokens are looked for in normalized text, so their content is
 * normalized the same way; the first-byte table lets the scan skip most positions */
static int prepare_added(zse_tokenizer *t)
{
    for (int i = 0; i < t->n_added; i++) {
        added_token *a = &t->added[i];
        if (a->normalized) {
            zse_buf b = {0};
            if (zse_buf_append(&b, a->content, a->len) || tok_normalize(t, &b)) {
                zse_buf_free(&b);
                return -1;
            }
            a->norm = b.data;
            a->norm_len = b.len;
            if (!a->norm_len)
                continue; /* normalizes to nothing: can never match */
            t->added_first[(unsigned char)a->norm[0]] |= 2;
        } else {
            t->added_first[(unsigned char)a->content[0]] |= 1;
        }
        /* an added token's text is its content — normalized, for a normalized token
         * (what HF's id_to_token and decode give) */
        t->text[a->id] = a->norm && a->norm_len ? a->norm : a->content;
        /* HF's decode skips a token whose text is a special token's content: a special
         * token that normalizes to other text is kept */
        t->skippable[a->id] = a->special && strcmp(t->text[a->id], a->content) == 0;
    }
    return 0;
}

static int32_t id_of_name(const zse_tokenizer *t, const json_t *v)
{
    const char *name = json_is_string(v) ? json_string_value(v) : json_string_value(json_object_get(v, "content"));
    return name ? zse_tokenizer_token_id(t, name) : -1;
}

static const char *type_of(const zse_tokenizer *t)
{
    if (t->model == MODEL_UNIGRAM)
        return "unigram";
    if (t->model == MODEL_WORDPIECE)
        return "wordpiece";
    if (t->byte_level)
        return "bpe-bytelevel";
    for (int i = 0; i < t->n_pres; i++)
        if (t->pres[i].kind == P_METASPACE)
            return "bpe-sentencepiece";
    for (int i = 0; i < t->n_norms; i++)
        if ((t->norms[i].kind == N_PREPEND && strcmp(t->norms[i].a, "\xe2\x96\x81") == 0) ||
            (t->norms[i].kind == N_REPLACE && t->norms[i].b && strcmp(t->norms[i].b, "\xe2\x96\x81") == 0))
            return "bpe-sentencepiece";
    return t->byte_fallback ? "bpe-sentencepiece" : "bpe";
}

/* the vocabulary proper: id → string, string → id, the byte-fallback and byte-level
 * symbol tables, and which characters ever neighbour inside a token */
static int load_model_vocab(zse_tokenizer *t, const json_t *model)
{
    t->vocab = zse_calloc((size_t)t->n_vocab, sizeof *t->vocab);
    t->text = zse_calloc((size_t)t->n_vocab, sizeof *t->text);
    t->is_special = zse_calloc((size_t)t->n_vocab, sizeof *t->is_special);
    t->skippable = zse_calloc((size_t)t->n_vocab, sizeof *t->skippable);
    if (!t->vocab || !t->text || !t->is_special || !t->skippable || str_map_init(&t->ids, (size_t)t->n_vocab))
        return -1;
    for (int i = 0; i < t->n_added; i++)
        t->is_special[t->added[i].id] = t->added[i].special;
    const char *k;
    json_t *v;
    if (t->model == MODEL_UNIGRAM) {
        if (tok_unigram_load(t, model))
            return -1;
    } else {
        json_object_foreach(json_object_get(model, "vocab"), k, v) {
            if (set_token(t, (int32_t)json_integer_value(v), k) || (t->model == MODEL_BPE && add_token_pairs(t, k)))
                return -1;
        }
    }
    /* string → id, lowest id first — Unigram: highest first, as HF's map of its pieces
     * keeps the last of equal strings (the map borrows the strings of t->vocab); ids only
     * added tokens use are holes of the model's vocabulary */
    for (int k2 = 0; k2 < t->n_vocab; k2++) {
        int i = t->model == MODEL_UNIGRAM ? t->n_vocab - 1 - k2 : k2;
        if (t->vocab[i])
            str_map_put(&t->ids, t->vocab[i], i);
    }
    for (int i = 0; i < t->n_vocab; i++) {
        if (!t->vocab[i] && !(t->vocab[i] = zse_strdup("")))
            return -1;
        t->text[i] = t->vocab[i];
    }
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        t->byte_ids[b] = tok_str_map_get(&t->ids, name, strlen(name));
        char enc[4];
        utf8proc_ssize_t el = utf8proc_encode_char((utf8proc_int32_t)tok_cp_of_byte[b], (utf8proc_uint8_t *)enc);
        t->byte_sym[b] = tok_str_map_get(&t->ids, enc, (size_t)el);
    }
    return 0;
}

static int load_model_options(zse_tokenizer *t, const json_t *model)
{
    t->ignore_merges = json_is_true(json_object_get(model, "ignore_merges"));
    t->byte_fallback = json_is_true(json_object_get(model, "byte_fallback"));
    t->fuse_unk = json_is_true(json_object_get(model, "fuse_unk"));
    const char *unk = json_string_value(json_object_get(model, "unk_token"));
    if (unk)
        t->unk_id = tok_str_map_get(&t->ids, unk, strlen(unk));
    const char *pre = json_string_value(json_object_get(model, "continuing_subword_prefix"));
    const char *suf = json_string_value(json_object_get(model, "end_of_word_suffix"));
    if ((pre && *pre && !(t->subword_prefix = zse_strdup(pre))) || (suf && *suf && !(t->word_suffix = zse_strdup(suf))))
        return -1;
    if (t->model == MODEL_WORDPIECE && tok_wordpiece_load(t, model))
        return -1;
    json_t *dropout = json_object_get(model, "dropout");
    if (json_is_number(dropout) && json_number_value(dropout) > 0)
        zse_log(ZSE_LOG_WARN, "tokenizer.json: BPE dropout %g is ignored (encoding is deterministic)",
                json_number_value(dropout));
    return 0;
}

zse_tokenizer *zse_tokenizer_from_json(const char *text, size_t len, const json_t *tok_cfg)
{
    pthread_once(&g_tables_once, init_byte_tables);
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
    t->unk_id = t->bos = t->eos = -1;
    if (count_vocab(t, model) || load_added(t, json_object_get(root, "added_tokens")) ||
        load_model_vocab(t, model) || load_model_options(t, model) ||
        load_merges(t, json_object_get(model, "merges")) ||
        load_normalizer(t, json_object_get(root, "normalizer"), 0) ||
        load_pre_tokenizer(t, json_object_get(root, "pre_tokenizer"), 0) ||
        load_decoder(t, json_object_get(root, "decoder"), 0) ||
        load_post_processor(t, json_object_get(root, "post_processor"), 0) || prepare_added(t))
        goto fail;
    for (int i = 0; i < t->n_prefix; i++)
        if (t->prefix_ids[i] < 0 || t->prefix_ids[i] >= t->n_vocab) {
            zse_fail("tokenizer.json: post-processor token id %d is not in the vocabulary", t->prefix_ids[i]);
            goto fail;
        }
    for (int i = 0; i < t->n_suffix; i++)
        if (t->suffix_ids[i] < 0 || t->suffix_ids[i] >= t->n_vocab) {
            zse_fail("tokenizer.json: post-processor token id %d is not in the vocabulary", t->suffix_ids[i]);
            goto fail;
        }
    t->bos = id_of_name(t, json_object_get(tok_cfg, "bos_token"));
    t->eos = id_of_name(t, json_object_get(tok_cfg, "eos_token"));
    if (t->bos < 0 && t->n_prefix)
        t->bos = t->prefix_ids[0]; /* no tokenizer_config: the token the post-processor leads with */
    t->type = type_of(t);
    json_decref(root);
    return t;
fail:
    json_decref(root);
    zse_tokenizer_free(t);
    return NULL;
}

void zse_tokenizer_free(zse_tokenizer *t)
{
    if (!t)
        return;
    for (int i = 0; t->vocab && i < t->n_vocab; i++)
        free(t->vocab[i]);
    free(t->vocab);
    free(t->text);
    str_map_free(&t->ids);
    free(t->merges.keys);
    free(t->merges.rank);
    free(t->merges.merged);
    free(t->joined.keys);
    free(t->subword_prefix);
    free(t->scores);
    tok_trie_free(&t->trie);
    free(t->word_suffix);
    for (int i = 0; i < t->n_norms; i++) {
        free(t->norms[i].a);
        free(t->norms[i].b);
        free(t->norms[i].map.data);
        pcre2_code_free(t->norms[i].re);
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
        pcre2_code_free(t->decs[i].re);
    }
    free(t->decs);
    for (int i = 0; i < t->n_added; i++) {
        free(t->added[i].content);
        free(t->added[i].norm);
    }
    free(t->added);
    free(t->is_special);
    free(t->skippable);
    free(t);
}

int zse_tokenizer_n_vocab(const zse_tokenizer *t) { return t->n_vocab; }
int32_t zse_tokenizer_bos(const zse_tokenizer *t) { return t->bos; }
int32_t zse_tokenizer_eos(const zse_tokenizer *t) { return t->eos; }
const char *zse_tokenizer_type(const zse_tokenizer *t) { return t->type; }

bool zse_tokenizer_add_bos(const zse_tokenizer *t)
{
    return t->n_prefix > 0 && t->bos >= 0 && t->prefix_ids[0] == t->bos;
}

const char *zse_tokenizer_token_text(const zse_tokenizer *t, int32_t id)
{
    return id >= 0 && id < t->n_vocab ? t->text[id] : NULL;
}

/* as HF's token_to_id: an added token's content first, then the model's vocabulary */
int32_t zse_tokenizer_token_id(const zse_tokenizer *t, const char *text)
{
    for (int i = 0; i < t->n_added; i++)
        if (strcmp(t->added[i].content, text) == 0)
            return t->added[i].id;
    return tok_str_map_get(&t->ids, text, strlen(text));
}

bool zse_tokenizer_is_special(const zse_tokenizer *t, int32_t id)
{
    return id >= 0 && id < t->n_vocab && t->is_special[id];
}

