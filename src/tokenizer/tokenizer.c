/* Byte-level and SentencePiece-style BPE from tokenizer.json, exactly as Hugging Face
 * `tokenizers` runs it.
 *
 * encode: invalid UTF-8 → U+FFFD; added tokens that match the raw text are split out →
 * each remaining span is normalized → added tokens that match normalized text are split
 * out → pre-tokenizers cut the rest into pieces → BPE merges by rank per piece → ids;
 * the post-processor's tokens go around the whole (add_special).
 * decode: token strings → decoder steps (ByteLevel, Replace, ByteFallback, Fuse, Strip,
 * Metaspace) → text.
 *
 * A loaded tokenizer is never written again: every encode/decode keeps its scratch space
 * (regex match data, BPE heaps) in its own enc_state, so any number of threads may share one. */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "tokenizer/tokenizer.h"

#include <pcre2.h>
#include <pthread.h>
#include <string.h>
#include <utf8proc.h>

#define REPLACEMENT_CHAR "\xEF\xBF\xBD" /* U+FFFD */
#define MAX_SPECIAL_AROUND 8           /* post-processor tokens before or after a sequence */

/* ---- hash maps ------------------------------------------------------------------ */

/* string → id; keys are borrowed from the vocabulary array */
typedef struct {
    const char **keys;
    uint32_t *lens;
    int32_t *vals;
    size_t cap; /* power of two */
} str_map;

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

static int32_t str_map_get(const str_map *m, const char *s, size_t n)
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

/* (left id, right id) → (rank, merged id) */
typedef struct {
    uint64_t *keys; /* (left << 32 | right) + 1; 0 = empty */
    int32_t *rank;
    int32_t *merged;
    size_t cap;
} pair_map;

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

static bool pair_get(const pair_map *m, int32_t a, int32_t b, int32_t *rank, int32_t *merged)
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

/* a set of code point pairs (a, b): which characters ever sit side by side inside a
 * vocabulary token. Where two neighbours of a word never do, no merge can join them, so
 * the word may be cut there and each part merged alone with the same result. */
typedef struct {
    uint64_t *keys;
    size_t cap, n;
} cp_pair_set;

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

static bool cp_pairs_has(const cp_pair_set *s, int32_t a, int32_t b)
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

/* ---- UTF-8 and Unicode ---------------------------------------------------------- */

/* The length of the valid UTF-8 sequence at s, or 0 with *bad = the length of the
 * maximal invalid subpart to replace by one U+FFFD (what Python's and Rust's lossy
 * decoders do). */
static size_t utf8_seq(const unsigned char *s, size_t n, size_t *bad)
{
    unsigned char c = s[0], lo = 0x80, hi = 0xBF;
    size_t need;
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF) {
        need = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        need = 3;
        lo = c == 0xE0 ? 0xA0 : 0x80;
        hi = c == 0xED ? 0x9F : 0xBF;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 4;
        lo = c == 0xF0 ? 0x90 : 0x80;
        hi = c == 0xF4 ? 0x8F : 0xBF;
    } else {
        *bad = 1;
        return 0;
    }
    size_t k = 1;
    for (; k < need && k < n; k++) {
        unsigned char d = s[k];
        if (d < (k == 1 ? lo : 0x80) || d > (k == 1 ? hi : 0xBF))
            break;
    }
    if (k == need)
        return need;
    *bad = k;
    return 0;
}

/* valid UTF-8 copied, each maximal invalid subpart replaced by U+FFFD */
static int utf8_lossy(const char *in, size_t n, zse_buf *out)
{
    if (zse_buf_reserve(out, n))
        return -1;
    size_t i = 0;
    while (i < n) {
        size_t run = i;
        while (run < n && (unsigned char)in[run] < 0x80)
            run++;
        if (run > i && zse_buf_append(out, in + i, run - i))
            return -1;
        i = run;
        if (i >= n)
            break;
        size_t bad = 0, k = utf8_seq((const unsigned char *)in + i, n - i, &bad);
        if (k ? zse_buf_append(out, in + i, k) : zse_buf_append(out, REPLACEMENT_CHAR, 3))
            return -1;
        i += k ? k : bad;
    }
    return zse_buf_reserve(out, 0);
}

static bool utf8_valid(const char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        size_t bad = 0, k = utf8_seq((const unsigned char *)s + i, n - i, &bad);
        if (!k)
            return false;
        i += k;
    }
    return true;
}

/* the code point at s[i] of valid UTF-8, its length in *len */
static int32_t cp_at(const char *s, size_t n, size_t i, size_t *len)
{
    utf8proc_int32_t cp = -1;
    utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &cp);
    *len = k > 0 ? (size_t)k : 1;
    return k > 0 ? cp : -1;
}

/* the code point that ends just before s[i] */
static int32_t cp_before(const char *s, size_t i, size_t *len)
{
    size_t start = i - 1;
    while (start > 0 && i - start < 4 && ((unsigned char)s[start] & 0xC0) == 0x80)
        start--;
    size_t l;
    int32_t cp = cp_at(s, i, start, &l);
    if (start + l != i) { /* not a whole character: treat the last byte alone */
        *len = 1;
        return -1;
    }
    *len = l;
    return cp;
}

static size_t utf8_char_len(unsigned char c)
{
    return c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
}

/* Rust's char::is_whitespace (the White_Space property), which HF's Strip and the
 * added tokens' lstrip/rstrip use */
static bool is_white_space(int32_t c)
{
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
           c == 0x3000;
}

/* a "word" character for single_word added tokens: alphanumeric or '_' */
static bool is_word_char(int32_t c)
{
    if (c < 0)
        return false;
    if (c < 0x80)
        return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    utf8proc_category_t cat = utf8proc_category(c);
    return (cat >= UTF8PROC_CATEGORY_LU && cat <= UTF8PROC_CATEGORY_LO) || cat == UTF8PROC_CATEGORY_MC ||
           (cat >= UTF8PROC_CATEGORY_ND && cat <= UTF8PROC_CATEGORY_NO);
}

/* ---- pipeline description -------------------------------------------------------- */

enum norm_kind { N_NFC, N_NFKC, N_NFD, N_NFKD, N_LOWER, N_PREPEND, N_REPLACE, N_STRIP };
typedef struct {
    enum norm_kind kind;
    char *a, *b;           /* Prepend: a; Replace: a = literal pattern (or re), b = content */
    pcre2_code *re;        /* Replace with a Regex pattern */
    bool left, right;      /* Strip */
} norm_step;

enum pre_kind { P_SPLIT, P_BYTELEVEL, P_METASPACE };
enum split_behavior { B_ISOLATED, B_REMOVED, B_MERGED_PREV, B_MERGED_NEXT, B_CONTIGUOUS };
typedef struct {
    enum pre_kind kind;
    pcre2_code *re;           /* Split/ByteLevel: the pattern; Metaspace: the replacement */
    enum split_behavior behavior;
    bool invert;              /* Split: the pieces between matches are the "matches" */
    bool add_prefix_space;    /* ByteLevel */
    bool use_regex;           /* ByteLevel */
    char *replacement;        /* Metaspace */
    int prepend_scheme;       /* Metaspace: 0 always, 1 first, 2 never */
    bool split;               /* Metaspace */
} pre_step;

enum dec_kind { D_BYTELEVEL, D_REPLACE, D_BYTEFALLBACK, D_FUSE, D_STRIP, D_METASPACE };
typedef struct {
    enum dec_kind kind;
    char *a, *b;              /* Replace: a → b (or re → b); Strip: a = content; Metaspace: a */
    pcre2_code *re;
    int start, stop;          /* Strip */
    int prepend_scheme;       /* Metaspace */
} dec_step;

typedef struct {
    char *content;            /* as written */
    size_t len;
    char *norm;               /* content after the normalizer (normalized tokens match this) */
    size_t norm_len;
    int32_t id;
    bool special, lstrip, rstrip, single_word, normalized;
} added_token;

struct zse_tokenizer {
    char **vocab;             /* id → the model's string ("" for holes) */
    const char **text;        /* id → the token's text: an added token's, else vocab[id] */
    int n_vocab;
    str_map ids;              /* string → id (model vocabulary and added tokens) */
    pair_map merges;
    cp_pair_set joined;       /* code point neighbours inside tokens: safe cut points */
    bool byte_level;          /* a ByteLevel pre-tokenizer maps bytes before BPE */
    bool ignore_merges, byte_fallback, fuse_unk;
    char *subword_prefix;     /* continuing_subword_prefix, NULL when none */
    char *word_suffix;        /* end_of_word_suffix, NULL when none */
    int32_t unk_id;
    int32_t byte_ids[256];    /* <0xNN> tokens for byte fallback, -1 when absent */
    int32_t byte_sym[256];    /* byte-level: the id of each byte's mapped character, -1 when absent */
    norm_step *norms;
    int n_norms;
    pre_step *pres;
    int n_pres;
    dec_step *decs;
    int n_decs;
    added_token *added;
    int n_added;
    uint8_t added_first[256]; /* bit 1: a raw-matched added token starts with this byte; bit 2: normalized */
    bool *is_special;         /* [n_vocab] */
    bool *skippable;          /* [n_vocab]: dropped by skip_special (see prepare_added) */
    int32_t prefix_ids[MAX_SPECIAL_AROUND], suffix_ids[MAX_SPECIAL_AROUND];
    int n_prefix, n_suffix;
    int32_t bos, eos;
    const char *type;
};

/* ---- GPT-2's byte ↔ printable character table -------------------------------------- */

static uint32_t g_cp_of_byte[256];
static int g_byte_of_cp[512];
static pthread_once_t g_tables_once = PTHREAD_ONCE_INIT;

static void init_byte_tables(void)
{
    int n = 0;
    for (int b = 0; b < 256; b++) {
        bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        g_cp_of_byte[b] = printable ? (uint32_t)b : (uint32_t)(256 + n++);
    }
    for (int i = 0; i < 512; i++)
        g_byte_of_cp[i] = -1;
    for (int b = 0; b < 256; b++)
        g_byte_of_cp[g_cp_of_byte[b]] = b;
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
    /* files from older tokenizers omit the type of a BPE model */
    if (type ? strcmp(type, "BPE") != 0 : !json_object_get(model, "merges"))
        return zse_fail("tokenizer.json: model type '%s' is not supported (BPE is)", type ? type : "?");
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
        int32_t cp = cp_at(s, n, i, &l);
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
        int32_t ia = str_map_get(&t->ids, a, alen), ib = str_map_get(&t->ids, b, blen);
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

static int normalize(const zse_tokenizer *t, zse_buf *s);

/* normalized added tokens are looked for in normalized text, so their content is
 * normalized the same way; the first-byte table lets the scan skip most positions */
static int prepare_added(zse_tokenizer *t)
{
    for (int i = 0; i < t->n_added; i++) {
        added_token *a = &t->added[i];
        if (a->normalized) {
            zse_buf b = {0};
            if (zse_buf_append(&b, a->content, a->len) || normalize(t, &b)) {
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
    json_object_foreach(json_object_get(model, "vocab"), k, v) {
        if (set_token(t, (int32_t)json_integer_value(v), k) || add_token_pairs(t, k))
            return -1;
    }
    /* string → id, lowest id first (the map borrows the strings of t->vocab); ids only
     * added tokens use are holes of the model's vocabulary */
    for (int i = 0; i < t->n_vocab; i++) {
        if (t->vocab[i])
            str_map_put(&t->ids, t->vocab[i], i);
        else if (!(t->vocab[i] = zse_strdup("")))
            return -1;
        t->text[i] = t->vocab[i];
    }
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        t->byte_ids[b] = str_map_get(&t->ids, name, strlen(name));
        char enc[4];
        utf8proc_ssize_t el = utf8proc_encode_char((utf8proc_int32_t)g_cp_of_byte[b], (utf8proc_uint8_t *)enc);
        t->byte_sym[b] = str_map_get(&t->ids, enc, (size_t)el);
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
        t->unk_id = str_map_get(&t->ids, unk, strlen(unk));
    const char *pre = json_string_value(json_object_get(model, "continuing_subword_prefix"));
    const char *suf = json_string_value(json_object_get(model, "end_of_word_suffix"));
    if ((pre && *pre && !(t->subword_prefix = zse_strdup(pre))) || (suf && *suf && !(t->word_suffix = zse_strdup(suf))))
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

zse_tokenizer *zse_tokenizer_from_dir(const char *dir)
{
    char *path = zse_path_join(dir, "tokenizer.json");
    char *cfg_path = zse_path_join(dir, "tokenizer_config.json");
    zse_tokenizer *t = NULL;
    size_t len;
    char *text = path ? zse_read_file(path, &len) : NULL;
    json_t *cfg = NULL;
    if (text && cfg_path && zse_file_exists(cfg_path)) {
        json_error_t err;
        cfg = json_load_file(cfg_path, JSON_DECODE_INT_AS_REAL, &err); /* model_max_length can be 1e30 */
        if (!cfg)
            zse_log(ZSE_LOG_WARN, "%s: %s (line %d); bos/eos come from tokenizer.json alone", cfg_path, err.text,
                    err.line);
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
    free(t->text);
    str_map_free(&t->ids);
    free(t->merges.keys);
    free(t->merges.rank);
    free(t->merges.merged);
    free(t->joined.keys);
    free(t->subword_prefix);
    free(t->word_suffix);
    for (int i = 0; i < t->n_norms; i++) {
        free(t->norms[i].a);
        free(t->norms[i].b);
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
    return str_map_get(&t->ids, text, strlen(text));
}

bool zse_tokenizer_is_special(const zse_tokenizer *t, int32_t id)
{
    return id >= 0 && id < t->n_vocab && t->is_special[id];
}

/* ---- per-call scratch --------------------------------------------------------------- */

typedef struct {
    size_t start, end;
} span;

typedef struct {
    span *v;
    size_t n, cap;
} spans;

typedef struct {
    int32_t *v;
    size_t n, cap;
} id_vec;

typedef struct {
    int32_t id;
    int32_t cp;     /* the character an initial symbol stands for; -1 for byte/unk symbols */
    int prev, next;
} sym;

typedef struct {
    int32_t rank;
    int pos;
    int32_t left, right;
} cand;

typedef struct {
    pcre2_match_data *md;
    pcre2_match_context *mctx;
    pcre2_jit_stack *jit;
    zse_buf text;       /* the piece being pre-tokenized (rewritten by ByteLevel/Metaspace) */
    zse_buf spare;      /* rewrites build here, then swap with text */
    zse_buf mapped;     /* a byte-level piece in GPT-2's alphabet (for ignore_merges) */
    spans cur, next;
    span *marks;        /* split intervals of one span */
    bool *is_match;
    size_t marks_cap;
    sym *sy;
    cand *heap;
    size_t sym_cap;
    id_vec out;
    /* short pieces already encoded in this call (texts repeat their words): the cache
     * belongs to the call, so threads share nothing */
    struct cache_slot { uint64_t hash; uint32_t text_at, text_len, ids_at, ids_len; } *cache;
    size_t cache_used, pieces;
    zse_buf cache_text;
    id_vec cache_ids;
} enc_state;

#define CACHE_SLOTS 8192        /* power of two; filled to half at most */
#define CACHE_MAX_PIECE 32      /* bytes */
#define CACHE_AFTER 256         /* pieces: a short prompt does not pay for the table */

static int enc_state_init(enc_state *st)
{
    memset(st, 0, sizeof *st);
    st->md = pcre2_match_data_create(1, NULL);
    return st->md ? 0 : zse_fail("out of memory for regex matching");
}

/* JIT matching runs on a 32 KB stack by default; a pattern that needs more on a long
 * piece gets a stack of its own (per call, so threads share nothing), then the match is
 * retried */
static int grow_jit_stack(enc_state *st)
{
    if (st->jit)
        return zse_fail("pre-tokenizer regex needs more than 64 MB of JIT stack");
    st->mctx = pcre2_match_context_create(NULL);
    st->jit = pcre2_jit_stack_create(256 * 1024, 64 * 1024 * 1024, NULL);
    if (!st->mctx || !st->jit)
        return zse_fail("out of memory for regex matching");
    pcre2_jit_stack_assign(st->mctx, NULL, st->jit);
    return 0;
}

static void enc_state_free(enc_state *st)
{
    pcre2_match_data_free(st->md);
    pcre2_match_context_free(st->mctx);
    pcre2_jit_stack_free(st->jit);
    zse_buf_free(&st->text);
    zse_buf_free(&st->spare);
    zse_buf_free(&st->mapped);
    free(st->cur.v);
    free(st->next.v);
    free(st->marks);
    free(st->is_match);
    free(st->sy);
    free(st->heap);
    free(st->out.v);
    free(st->cache);
    zse_buf_free(&st->cache_text);
    free(st->cache_ids.v);
}

static int spans_push(spans *s, size_t a, size_t b)
{
    if (a >= b)
        return 0; /* HF drops empty pieces */
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 64;
        span *p = zse_realloc(s->v, cap * sizeof *p);
        if (!p)
            return -1;
        s->v = p;
        s->cap = cap;
    }
    s->v[s->n++] = (span){a, b};
    return 0;
}

static int ids_push(id_vec *v, int32_t id)
{
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 256;
        int32_t *p = zse_realloc(v->v, cap * sizeof *p);
        if (!p)
            return -1;
        v->v = p;
        v->cap = cap;
    }
    v->v[v->n++] = id;
    return 0;
}

/* ---- normalizers --------------------------------------------------------------------- */

static int replace_all(const char *s, size_t n, const char *from, const char *to, zse_buf *out)
{
    size_t fl = strlen(from), tl = strlen(to), i = 0;
    if (!fl)
        return zse_buf_append(out, s, n);
    while (i < n) {
        const char *hit = fl <= n - i ? memmem(s + i, n - i, from, fl) : NULL;
        size_t upto = hit ? (size_t)(hit - s) : n;
        if (zse_buf_append(out, s + i, upto - i) || (hit && zse_buf_append(out, to, tl)))
            return -1;
        i = hit ? upto + fl : n;
    }
    return zse_buf_reserve(out, 0);
}

/* every non-overlapping match of re replaced by the literal `to` */
static int replace_regex(const pcre2_code *re, const char *s, size_t n, const char *to, zse_buf *out)
{
    pcre2_match_data *md = pcre2_match_data_create(1, NULL);
    if (!md)
        return zse_fail("out of memory for regex matching");
    size_t pos = 0, last = 0;
    int rc = 0;
    while (pos <= n && rc == 0) {
        int m = pcre2_match(re, (PCRE2_SPTR)s, n, pos, 0, md, NULL);
        if (m == PCRE2_ERROR_NOMATCH)
            break;
        if (m < 0) {
            rc = zse_fail("regex replacement failed (PCRE2 error %d)", m);
            break;
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        rc = zse_buf_append(out, s + last, ov[0] - last) || zse_buf_puts(out, to);
        last = ov[1];
        pos = ov[1] > ov[0] ? ov[1] : ov[1] + (ov[1] < n ? utf8_char_len((unsigned char)s[ov[1]]) : 1);
        if (ov[1] == ov[0] && ov[1] < n) { /* an empty match: the character after it is kept */
            rc = rc || zse_buf_append(out, s + last, pos - last);
            last = pos;
        }
    }
    pcre2_match_data_free(md);
    if (rc == 0 && last < n)
        rc = zse_buf_append(out, s + last, n - last);
    return rc ? -1 : zse_buf_reserve(out, 0);
}

static int utf8proc_normalize(enum norm_kind kind, const char *s, size_t n, zse_buf *out)
{
    int opts = UTF8PROC_STABLE | (kind == N_NFC || kind == N_NFKC ? UTF8PROC_COMPOSE : UTF8PROC_DECOMPOSE) |
               (kind == N_NFKC || kind == N_NFKD ? UTF8PROC_COMPAT : 0);
    utf8proc_uint8_t *r = NULL;
    utf8proc_ssize_t rl = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &r, (utf8proc_option_t)opts);
    if (rl < 0)
        return zse_fail("cannot normalize text: %s", utf8proc_errmsg(rl));
    int rc = zse_buf_append(out, r, (size_t)rl);
    free(r);
    return rc;
}

/* Every normal form of ASCII is itself, and two ASCII characters never compose, so the
 * text normalizes piecewise: ASCII runs are copied, and each non-ASCII run goes through
 * utf8proc with the ASCII character before it (a base that a combining mark may join). */
static int unicode_normalize(enum norm_kind kind, const char *s, size_t n, zse_buf *out)
{
    size_t i = 0;
    while (i < n) {
        size_t run = i;
        while (run < n && (unsigned char)s[run] < 0x80)
            run++;
        if (run == n)
            return zse_buf_append(out, s + i, n - i);
        size_t start = run > i ? run - 1 : run, end = run;
        while (end < n && (unsigned char)s[end] >= 0x80)
            end++;
        if (zse_buf_append(out, s + i, start - i) || utf8proc_normalize(kind, s + start, end - start, out))
            return -1;
        i = end;
    }
    return 0;
}

/* Rust's char::to_lowercase: one-to-one except U+0130 (İ → i̇); no final-sigma rule */
static int lowercase(const char *s, size_t n, zse_buf *out)
{
    if (zse_buf_reserve(out, n))
        return -1;
    size_t i = 0, l;
    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x80) {
            char lc = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
            if (zse_buf_append(out, &lc, 1))
                return -1;
            i++;
            continue;
        }
        int32_t cp = cp_at(s, n, i, &l);
        if (cp == 0x130) {
            if (zse_buf_append(out, "i\xCC\x87", 3))
                return -1;
        } else {
            utf8proc_uint8_t enc[4];
            utf8proc_ssize_t el = utf8proc_encode_char(utf8proc_tolower(cp), enc);
            if (zse_buf_append(out, enc, (size_t)el))
                return -1;
        }
        i += l;
    }
    return 0;
}

static int strip(const norm_step *st, const char *s, size_t n, zse_buf *out)
{
    size_t a = 0, b = n, l;
    while (st->left && a < b && is_white_space(cp_at(s, n, a, &l)))
        a += l;
    while (st->right && b > a && is_white_space(cp_before(s, b, &l)))
        b -= l;
    return zse_buf_append(out, s + a, b - a);
}

static int normalize(const zse_tokenizer *t, zse_buf *s)
{
    for (int k = 0; k < t->n_norms && s->len; k++) {
        const norm_step *st = &t->norms[k];
        zse_buf out = {0};
        int rc = 0;
        switch (st->kind) {
        case N_NFC: case N_NFKC: case N_NFD: case N_NFKD:
            rc = unicode_normalize(st->kind, s->data, s->len, &out);
            break;
        case N_LOWER:
            rc = lowercase(s->data, s->len, &out);
            break;
        case N_PREPEND:
            rc = zse_buf_puts(&out, st->a) || zse_buf_append(&out, s->data, s->len);
            break;
        case N_REPLACE:
            rc = st->re ? replace_regex(st->re, s->data, s->len, st->b, &out)
                        : replace_all(s->data, s->len, st->a, st->b, &out);
            break;
        case N_STRIP:
            rc = strip(st, s->data, s->len, &out);
            break;
        }
        if (rc || zse_buf_reserve(&out, 0)) {
            zse_buf_free(&out);
            return -1;
        }
        zse_buf_free(s);
        *s = out;
    }
    return 0;
}

/* ---- pre-tokenizers -------------------------------------------------------------------- */

static int mark_push(enc_state *st, size_t *n, size_t a, size_t b, bool match)
{
    if (*n == st->marks_cap) {
        size_t cap = st->marks_cap ? st->marks_cap * 2 : 64;
        span *m = zse_realloc(st->marks, cap * sizeof *m);
        if (!m)
            return -1;
        st->marks = m;
        bool *f = zse_realloc(st->is_match, cap * sizeof *f);
        if (!f)
            return -1;
        st->is_match = f;
        st->marks_cap = cap;
    }
    st->marks[*n] = (span){a, b};
    st->is_match[(*n)++] = match;
    return 0;
}

/* the span cut into intervals, each a match of re or the text between two matches —
 * HF's find_matches. After an empty match, or an empty match right where the previous
 * one ended, the search moves on one character (Oniguruma's find_iter). */
static int find_matches(enc_state *st, const pcre2_code *re, const char *s, size_t a, size_t b, size_t *nm)
{
    size_t len = b - a, pos = 0, last = 0;
    bool had_match = false;
    *nm = 0;
    while (pos <= len) {
        int m = pcre2_match(re, (PCRE2_SPTR)(s + a), len, pos, 0, st->md, st->mctx);
        if (m == PCRE2_ERROR_NOMATCH)
            break;
        if (m == PCRE2_ERROR_JIT_STACKLIMIT) {
            if (grow_jit_stack(st))
                return -1;
            continue;
        }
        if (m < 0) {
            PCRE2_UCHAR msg[160];
            pcre2_get_error_message(m, msg, sizeof msg);
            return zse_fail("pre-tokenizer regex failed on a %zu-byte piece: %s", len, msg);
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(st->md);
        size_t ms = ov[0], me = ov[1];
        if (ms == me && had_match && ms == last) { /* empty, right after the previous match */
            pos = ms < len ? ms + utf8_char_len((unsigned char)s[a + ms]) : len + 1;
            continue;
        }
        if (ms > last && mark_push(st, nm, a + last, a + ms, false))
            return -1;
        if (mark_push(st, nm, a + ms, a + me, true))
            return -1;
        last = me;
        had_match = true;
        pos = me > ms ? me : me < len ? me + utf8_char_len((unsigned char)s[a + me]) : len + 1;
    }
    if (last < len && mark_push(st, nm, a + last, b, false))
        return -1;
    return 0;
}

/* HF's SplitDelimiterBehavior applied to the intervals of one span */
static int apply_behavior(enc_state *st, size_t nm, enum split_behavior beh, bool invert, spans *out)
{
    span *m = st->marks;
    bool *is = st->is_match;
    if (invert)
        for (size_t i = 0; i < nm; i++)
            is[i] = !is[i];
    size_t w = 0; /* pieces are rebuilt in place: w ≤ i always */
    bool prev = false;
    switch (beh) {
    case B_ISOLATED:
        w = nm;
        break;
    case B_REMOVED:
        for (size_t i = 0; i < nm; i++)
            if (!is[i])
                m[w++] = m[i];
        break;
    case B_MERGED_PREV:
        for (size_t i = 0; i < nm; i++) {
            if (is[i] && !prev && w)
                m[w - 1].end = m[i].end;
            else
                m[w++] = m[i];
            prev = is[i];
        }
        break;
    case B_CONTIGUOUS:
        for (size_t i = 0; i < nm; i++) {
            if (is[i] == prev && w)
                m[w - 1].end = m[i].end;
            else
                m[w++] = m[i];
            prev = is[i];
        }
        break;
    case B_MERGED_NEXT: {
        /* folded from the right: a match joins the piece after it */
        size_t r = nm;
        for (size_t i = nm; i-- > 0;) {
            if (is[i] && !prev && r < nm)
                m[r].start = m[i].start;
            else
                m[--r] = m[i];
            prev = is[i];
        }
        for (size_t i = r; i < nm; i++)
            m[w++] = m[i];
        break;
    }
    }
    for (size_t i = 0; i < w; i++)
        if (spans_push(out, m[i].start, m[i].end))
            return -1;
    return 0;
}

static int split_step(enc_state *st, const pcre2_code *re, enum split_behavior beh, bool invert)
{
    st->next.n = 0;
    for (size_t p = 0; p < st->cur.n; p++) {
        size_t nm;
        if (find_matches(st, re, st->text.data, st->cur.v[p].start, st->cur.v[p].end, &nm) ||
            apply_behavior(st, nm, beh, invert, &st->next))
            return -1;
    }
    spans tmp = st->cur;
    st->cur = st->next;
    st->next = tmp;
    return 0;
}

/* ByteLevel's add_prefix_space (a space before every piece that lacks one) and
 * Metaspace (spaces become ▁, which is prepended per the scheme): the text is rebuilt */
static int rewrite_step(enc_state *st, const pre_step *ps, bool first)
{
    zse_buf *nb = &st->spare;
    nb->len = 0;
    st->next.n = 0;
    for (size_t p = 0; p < st->cur.n; p++) {
        const char *src = st->text.data + st->cur.v[p].start;
        size_t n = st->cur.v[p].end - st->cur.v[p].start, begin = nb->len;
        int rc;
        if (ps->kind == P_BYTELEVEL) {
            rc = (src[0] != ' ' && zse_buf_append(nb, " ", 1)) || zse_buf_append(nb, src, n);
        } else {
            size_t rl = strlen(ps->replacement);
            bool starts = (n && src[0] == ' ') || (n >= rl && memcmp(src, ps->replacement, rl) == 0);
            bool prepend = !starts && (ps->prepend_scheme == 0 ||
                                       (ps->prepend_scheme == 1 && first && st->cur.v[p].start == 0));
            rc = (prepend && zse_buf_puts(nb, ps->replacement)) || replace_all(src, n, " ", ps->replacement, nb);
        }
        if (rc || spans_push(&st->next, begin, nb->len))
            return -1;
    }
    if (zse_buf_reserve(nb, 0))
        return -1;
    zse_buf tb = st->text;
    st->text = *nb;
    *nb = tb;
    spans tmp = st->cur;
    st->cur = st->next;
    st->next = tmp;
    return 0;
}

/* text → st->text cut into st->cur pieces. `first`: the text starts the input (where
 * Metaspace's prepend_scheme "first" puts its ▁) */
static int pre_tokenize(const zse_tokenizer *t, enc_state *st, const char *text, size_t n, bool first)
{
    st->text.len = 0;
    st->cur.n = 0;
    if (zse_buf_append(&st->text, text, n) || spans_push(&st->cur, 0, n))
        return -1;
    for (int k = 0; k < t->n_pres; k++) {
        const pre_step *ps = &t->pres[k];
        int rc = 0;
        if (ps->kind == P_SPLIT)
            rc = split_step(st, ps->re, ps->behavior, ps->invert);
        else if (ps->kind == P_BYTELEVEL)
            rc = (ps->add_prefix_space && rewrite_step(st, ps, first)) ||
                 (ps->use_regex && split_step(st, ps->re, B_ISOLATED, false));
        else
            rc = rewrite_step(st, ps, first) || (ps->split && split_step(st, ps->re, B_MERGED_NEXT, false));
        if (rc)
            return -1;
    }
    return 0;
}

/* ---- the BPE model -------------------------------------------------------------------- */

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

static void push_pair(const zse_tokenizer *t, const sym *sy, int pos, cand *heap, size_t *hn)
{
    int nx = sy[pos].next;
    int32_t rank, merged;
    if (nx >= 0 && pair_get(&t->merges, sy[pos].id, sy[nx].id, &rank, &merged))
        heap_push(heap, hn, (cand){rank, pos, sy[pos].id, sy[nx].id});
}

/* merges symbols [lo, hi) lowest rank first (leftmost among equals), as HF's Word does,
 * then appends the ids left. The heap holds at most one entry per live pair plus the
 * stale ones each merge leaves, so a word costs O(n log n). */
static int merge_symbols(const zse_tokenizer *t, enc_state *st, int lo, int hi)
{
    sym *sy = st->sy;
    for (int k = lo; k < hi; k++) {
        sy[k].prev = k > lo ? k - 1 : -1;
        sy[k].next = k + 1 < hi ? k + 1 : -1;
    }
    size_t hn = 0;
    for (int k = lo; k + 1 < hi; k++)
        push_pair(t, sy, k, st->heap, &hn);
    while (hn) {
        cand c = heap_pop(st->heap, &hn);
        int nx = sy[c.pos].next;
        if (sy[c.pos].id != c.left || nx < 0 || sy[nx].id != c.right)
            continue; /* stale: one side merged already */
        int32_t rank, merged;
        if (!pair_get(&t->merges, c.left, c.right, &rank, &merged))
            continue;
        sy[c.pos].id = merged;
        sy[nx].id = -1;
        sy[c.pos].next = sy[nx].next;
        if (sy[nx].next >= 0)
            sy[sy[nx].next].prev = c.pos;
        if (sy[c.pos].prev >= 0)
            push_pair(t, sy, sy[c.pos].prev, st->heap, &hn);
        push_pair(t, sy, c.pos, st->heap, &hn);
    }
    for (int k = lo < hi ? lo : -1; k >= 0; k = sy[k].next)
        if (ids_push(&st->out, sy[k].id))
            return -1;
    return 0;
}

static int reserve_syms(enc_state *st, size_t n)
{
    if (n <= st->sym_cap)
        return 0;
    size_t cap = st->sym_cap ? st->sym_cap : 64;
    while (cap < n)
        cap *= 2;
    sym *s = zse_realloc(st->sy, cap * sizeof *s);
    if (!s)
        return -1;
    st->sy = s;
    cand *h = zse_realloc(st->heap, 2 * cap * sizeof *h);
    if (!h)
        return -1;
    st->heap = h;
    st->sym_cap = cap;
    return 0;
}

/* one character of a non-byte-level word → its symbols (HF's merge_word): the character
 * (with the subword prefix when not first, the word suffix when last), else its
 * <0xNN> bytes, else unk — consecutive unks fused with fuse_unk. *pending_unk is the
 * unk not yet written (HF holds it back the same way). */
static int char_symbols(const zse_tokenizer *t, enc_state *st, const char *c, size_t cl, bool is_first,
                        bool is_last, int *ns, bool *pending_unk, zse_buf *tmp)
{
    const char *s = c;
    size_t sl = cl;
    if ((t->subword_prefix && !is_first) || (t->word_suffix && is_last)) {
        tmp->len = 0;
        if ((t->subword_prefix && !is_first && zse_buf_puts(tmp, t->subword_prefix)) || zse_buf_append(tmp, c, cl) ||
            (t->word_suffix && is_last && zse_buf_puts(tmp, t->word_suffix)))
            return -1;
        s = tmp->data;
        sl = tmp->len;
    }
    int32_t id = str_map_get(&t->ids, s, sl);
    size_t l;
    if (id >= 0) {
        if (*pending_unk) {
            st->sy[(*ns)++] = (sym){t->unk_id, -1, 0, 0};
            *pending_unk = false;
        }
        st->sy[(*ns)++] = (sym){id, s == c ? cp_at(c, cl, 0, &l) : -1, 0, 0};
        return 0;
    }
    if (t->byte_fallback) {
        bool all = true;
        for (size_t b = 0; b < sl && all; b++)
            all = t->byte_ids[(unsigned char)s[b]] >= 0;
        if (all) {
            if (reserve_syms(st, (size_t)*ns + sl + 2))
                return -1;
            for (size_t b = 0; b < sl; b++)
                st->sy[(*ns)++] = (sym){t->byte_ids[(unsigned char)s[b]], -1, 0, 0};
            return 0;
        }
    }
    if (t->unk_id >= 0) {
        if (*pending_unk && !t->fuse_unk)
            st->sy[(*ns)++] = (sym){t->unk_id, -1, 0, 0};
        *pending_unk = true;
    }
    return 0;
}

/* long words are merged in parts cut where no token could ever span the cut (two
 * characters that never neighbour inside a vocabulary token): same result, but the
 * heap stays small, so a megabyte-long word costs what its parts cost */
#define CUT_WORDS_LONGER_THAN 64

static int merge_word(const zse_tokenizer *t, enc_state *st, int ns)
{
    if (ns <= CUT_WORDS_LONGER_THAN || t->subword_prefix || t->word_suffix)
        return merge_symbols(t, st, 0, ns);
    int lo = 0;
    for (int k = 1; k < ns; k++) {
        int32_t a = st->sy[k - 1].cp, b = st->sy[k].cp;
        if (a >= 0 && b >= 0 && !cp_pairs_has(&t->joined, a, b)) {
            if (merge_symbols(t, st, lo, k))
                return -1;
            lo = k;
        }
    }
    return merge_symbols(t, st, lo, ns);
}

/* a byte-level piece written in GPT-2's alphabet */
static int map_bytes(enc_state *st, const char *w, size_t n)
{
    st->mapped.len = 0;
    for (size_t i = 0; i < n; i++) {
        utf8proc_uint8_t enc[4];
        utf8proc_ssize_t el = utf8proc_encode_char((utf8proc_int32_t)g_cp_of_byte[(unsigned char)w[i]], enc);
        if (zse_buf_append(&st->mapped, enc, (size_t)el))
            return -1;
    }
    return zse_buf_reserve(&st->mapped, 0);
}

/* the common byte-level case: every byte's character is a token, no prefix or suffix —
 * the initial symbols come from a table. false when the general path must run. */
static bool byte_symbols(const zse_tokenizer *t, enc_state *st, const char *w, size_t n, int *ns)
{
    if (t->subword_prefix || t->word_suffix)
        return false;
    for (size_t i = 0; i < n; i++) {
        int32_t id = t->byte_sym[(unsigned char)w[i]];
        if (id < 0)
            return false;
        st->sy[i] = (sym){id, (int32_t)g_cp_of_byte[(unsigned char)w[i]], 0, 0};
    }
    *ns = (int)n;
    return true;
}

static int bpe_word(const zse_tokenizer *t, enc_state *st, const char *w, size_t n)
{
    if (!n)
        return 0;
    if (n > INT32_MAX / 4)
        return zse_fail("a %zu-byte piece is too long to encode", n);
    if (reserve_syms(st, n + 2))
        return -1;
    int ns = 0;
    const char *word = w;
    size_t wn = n;
    if (t->byte_level) {
        if (t->ignore_merges || !byte_symbols(t, st, w, n, &ns)) {
            if (map_bytes(st, w, n))
                return -1;
            word = st->mapped.data;
            wn = st->mapped.len;
        }
    }
    if (t->ignore_merges) { /* a piece that is a token is taken whole */
        int32_t whole = str_map_get(&t->ids, word, wn);
        if (whole >= 0)
            return ids_push(&st->out, whole);
        if (t->byte_level && byte_symbols(t, st, w, n, &ns))
            return merge_word(t, st, ns);
    }
    if (ns)
        return merge_word(t, st, ns);
    zse_buf tmp = {0};
    bool pending_unk = false;
    int rc = reserve_syms(st, wn + 2);
    for (size_t i = 0; i < wn && rc == 0;) {
        size_t cl = utf8_char_len((unsigned char)word[i]);
        if (cl > wn - i)
            cl = wn - i;
        rc = reserve_syms(st, (size_t)ns + 4) ||
             char_symbols(t, st, word + i, cl, i == 0, i + cl == wn, &ns, &pending_unk, &tmp);
        i += cl;
    }
    zse_buf_free(&tmp);
    if (rc)
        return -1;
    if (pending_unk)
        st->sy[ns++] = (sym){t->unk_id, -1, 0, 0};
    return merge_word(t, st, ns);
}

/* ---- encoding ------------------------------------------------------------------------- */

typedef struct {
    size_t start, end; /* what the token takes from the text, stripped whitespace included */
    int32_t id;
} added_hit;

static bool single_word_ok(const char *s, size_t n, size_t a, size_t b)
{
    size_t l;
    return (a == 0 || !is_word_char(cp_before(s, a, &l))) && (b == n || !is_word_char(cp_at(s, n, b, &l)));
}

/* The next added token in s[from..n) — HF's AddedVocabulary: leftmost-longest among the
 * tokens of this pass (raw text: normalized=false; normalized text: normalized=true).
 * A special token found while specials are not parsed, or a single_word token inside a
 * word, is passed over as text. lstrip/rstrip take the whitespace beside the token. */
static bool next_added(const zse_tokenizer *t, const char *s, size_t n, size_t from, bool normalized_pass,
                       bool parse_special, added_hit *hit)
{
    uint8_t want = normalized_pass ? 2 : 1;
    for (size_t i = from; i < n; i++) {
        if (!(t->added_first[(unsigned char)s[i]] & want))
            continue;
        int best = -1;
        size_t best_len = 0;
        for (int k = 0; k < t->n_added; k++) {
            const added_token *a = &t->added[k];
            if (a->normalized != normalized_pass)
                continue;
            const char *c = normalized_pass ? a->norm : a->content;
            size_t cl = normalized_pass ? a->norm_len : a->len;
            if (cl <= best_len || cl > n - i || memcmp(s + i, c, cl) != 0)
                continue;
            best = k;
            best_len = cl;
        }
        if (best < 0)
            continue;
        const added_token *a = &t->added[best];
        if ((a->special && !parse_special) || (a->single_word && !single_word_ok(s, n, i, i + best_len))) {
            i += best_len - 1; /* the match is consumed as text */
            continue;
        }
        size_t start = i, end = i + best_len, l;
        if (a->lstrip)
            while (start > from && is_white_space(cp_before(s, start, &l)))
                start -= l;
        if (a->rstrip)
            while (end < n && is_white_space(cp_at(s, n, end, &l)))
                end += l;
        *hit = (added_hit){start, end, a->id};
        return true;
    }
    return false;
}

/* the ids of one piece, from this call's cache when it was seen before */
static int encode_piece(const zse_tokenizer *t, enc_state *st, const char *w, size_t n)
{
    if (n > CACHE_MAX_PIECE || ++st->pieces < CACHE_AFTER)
        return bpe_word(t, st, w, n);
    if (!st->cache && !(st->cache = zse_calloc(CACHE_SLOTS, sizeof *st->cache)))
        return -1;
    uint64_t h = zse_hash64(w, n) | 1;
    size_t i = (size_t)h & (CACHE_SLOTS - 1);
    for (; st->cache[i].hash; i = (i + 1) & (CACHE_SLOTS - 1)) {
        const struct cache_slot *c = &st->cache[i];
        if (c->hash == h && c->text_len == n && memcmp(st->cache_text.data + c->text_at, w, n) == 0) {
            for (uint32_t k = 0; k < c->ids_len; k++)
                if (ids_push(&st->out, st->cache_ids.v[c->ids_at + k]))
                    return -1;
            return 0;
        }
    }
    size_t before = st->out.n;
    if (bpe_word(t, st, w, n))
        return -1;
    if (st->cache_used >= CACHE_SLOTS / 2)
        return 0;
    struct cache_slot c = {h, (uint32_t)st->cache_text.len, (uint32_t)n, (uint32_t)st->cache_ids.n,
                           (uint32_t)(st->out.n - before)};
    if (zse_buf_append(&st->cache_text, w, n))
        return -1;
    for (size_t k = before; k < st->out.n; k++)
        if (ids_push(&st->cache_ids, st->out.v[k]))
            return -1;
    st->cache[i] = c;
    st->cache_used++;
    return 0;
}

static int model_pieces(const zse_tokenizer *t, enc_state *st, const char *text, size_t n, bool first)
{
    if (!n)
        return 0;
    if (pre_tokenize(t, st, text, n, first))
        return -1;
    for (size_t p = 0; p < st->cur.n; p++)
        if (encode_piece(t, st, st->text.data + st->cur.v[p].start, st->cur.v[p].end - st->cur.v[p].start))
            return -1;
    return 0;
}

/* a span between raw-matched added tokens: normalize, split out the normalized added
 * tokens, run the rest through the pre-tokenizers and the model */
static int encode_span(const zse_tokenizer *t, enc_state *st, const char *text, size_t n, bool at_start,
                       bool parse_special)
{
    zse_buf norm = {0};
    if (zse_buf_append(&norm, text, n) || normalize(t, &norm)) {
        zse_buf_free(&norm);
        return -1;
    }
    const char *s = zse_buf_str(&norm);
    size_t len = norm.len, from = 0;
    added_hit hit;
    int rc = 0;
    while (rc == 0 && from < len && next_added(t, s, len, from, true, parse_special, &hit)) {
        rc = model_pieces(t, st, s + from, hit.start - from, at_start && from == 0) || ids_push(&st->out, hit.id);
        from = hit.end;
    }
    if (rc == 0 && from < len)
        rc = model_pieces(t, st, s + from, len - from, at_start && from == 0);
    zse_buf_free(&norm);
    return rc;
}

int zse_tokenizer_encode(const zse_tokenizer *t, const char *text, size_t len, bool add_special, bool parse_special,
                         int32_t **ids_out, size_t *n_out)
{
    *ids_out = NULL;
    *n_out = 0;
    enc_state st;
    zse_buf clean = {0};
    int rc = enc_state_init(&st);
    const char *s = text;
    if (rc == 0 && !utf8_valid(text, len)) { /* as Python's decode(errors="replace") */
        rc = utf8_lossy(text, len, &clean);
        s = clean.data;
        len = clean.len;
    }
    for (int k = 0; k < t->n_prefix && add_special && rc == 0; k++)
        rc = ids_push(&st.out, t->prefix_ids[k]);
    size_t from = 0;
    added_hit hit;
    while (rc == 0 && from < len && next_added(t, s, len, from, false, parse_special, &hit)) {
        rc = (hit.start > from && encode_span(t, &st, s + from, hit.start - from, from == 0, parse_special)) ||
             ids_push(&st.out, hit.id);
        from = hit.end;
    }
    if (rc == 0 && from < len)
        rc = encode_span(t, &st, s + from, len - from, from == 0, parse_special);
    for (int k = 0; k < t->n_suffix && add_special && rc == 0; k++)
        rc = ids_push(&st.out, t->suffix_ids[k]);
    if (rc == 0 && !st.out.v) { /* an empty result is still an allocation the caller frees */
        rc = ids_push(&st.out, 0);
        st.out.n = 0;
    }
    if (rc == 0) {
        *ids_out = st.out.v;
        *n_out = st.out.n;
        st.out.v = NULL;
    }
    enc_state_free(&st);
    zse_buf_free(&clean);
    return rc ? -1 : 0;
}

/* ---- decoding ---------------------------------------------------------------------------
 * The decoders work on a list of token strings, as HF's decode_chain does. */

typedef struct {
    zse_buf *v;
    size_t n;
} tok_list;

/* HF's ByteLevel decoder: each token's characters back to bytes (a token with any
 * character outside GPT-2's alphabet is kept as it is), all fused into one string */
static int bytelevel_decode(tok_list *l)
{
    zse_buf bytes = {0}, text = {0};
    for (size_t t = 0; t < l->n; t++) {
        const char *s = zse_buf_str(&l->v[t]);
        size_t n = l->v[t].len, i = 0, start = bytes.len, cl;
        bool mapped = true;
        while (i < n && mapped) {
            int32_t cp = cp_at(s, n, i, &cl);
            mapped = cp >= 0 && cp < 512 && g_byte_of_cp[cp] >= 0;
            char b = mapped ? (char)g_byte_of_cp[cp] : 0;
            if (mapped && zse_buf_append(&bytes, &b, 1))
                goto fail;
            i += cl;
        }
        if (!mapped) {
            bytes.len = start;
            if (zse_buf_append(&bytes, s, n))
                goto fail;
        }
    }
    if (utf8_lossy(zse_buf_str(&bytes), bytes.len, &text))
        goto fail;
    zse_buf_free(&bytes);
    for (size_t t = 0; t < l->n; t++)
        zse_buf_free(&l->v[t]);
    l->v[0] = text;
    l->n = 1;
    return 0;
fail:
    zse_buf_free(&bytes);
    zse_buf_free(&text);
    return -1;
}

static int byte_token(const zse_buf *b)
{
    if (b->len != 6 || memcmp(b->data, "<0x", 3) != 0 || b->data[5] != '>')
        return -1;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char c = b->data[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (d < 0)
            return -1;
        v = v * 16 + d;
    }
    return v;
}

/* HF's ByteFallback: a run of <0xNN> tokens becomes its bytes when they are valid UTF-8,
 * otherwise one U+FFFD per byte. Slots [w, i) of the list are always empty, and a run of
 * k tokens becomes at most k strings, so results are written in place. */
static int bytefallback_decode(tok_list *l)
{
    zse_buf raw = {0};
    size_t w = 0;
    for (size_t i = 0; i < l->n;) {
        if (byte_token(&l->v[i]) < 0) {
            if (w != i) { /* move, leaving the old slot empty so it is freed once */
                l->v[w] = l->v[i];
                memset(&l->v[i], 0, sizeof l->v[i]);
            }
            w++;
            i++;
            continue;
        }
        raw.len = 0;
        size_t j = i;
        for (; j < l->n && byte_token(&l->v[j]) >= 0; j++) {
            char c = (char)byte_token(&l->v[j]);
            zse_buf_free(&l->v[j]);
            if (zse_buf_append(&raw, &c, 1))
                goto fail;
        }
        if (utf8_valid(raw.data, raw.len)) {
            if (zse_buf_append(&l->v[w++], raw.data, raw.len))
                goto fail;
        } else {
            for (size_t k = 0; k < raw.len; k++)
                if (zse_buf_append(&l->v[w++], REPLACEMENT_CHAR, 3))
                    goto fail;
        }
        i = j;
    }
    l->n = w;
    zse_buf_free(&raw);
    return 0;
fail:
    zse_buf_free(&raw);
    return -1;
}

static int decode_one(const dec_step *d, size_t index, const zse_buf *b, zse_buf *out)
{
    const char *s = b->data ? b->data : "";
    switch (d->kind) {
    case D_REPLACE:
        return d->re ? replace_regex(d->re, s, b->len, d->b, out) : replace_all(s, b->len, d->a, d->b, out);
    case D_METASPACE: {
        /* ▁ → space, except that the first token loses its ▁s (HF drops them all) */
        bool drop = index == 0 && d->prepend_scheme != 2;
        return replace_all(s, b->len, d->a, drop ? "" : " ", out);
    }
    case D_STRIP: {
        /* up to `start` leading and `stop` trailing copies of the content character */
        size_t cl = strlen(d->a), a = 0, e = b->len;
        for (int k = 0; cl && k < d->start && e - a >= cl && memcmp(s + a, d->a, cl) == 0; k++)
            a += cl;
        for (int k = 0; cl && k < d->stop && e - a >= cl && memcmp(s + e - cl, d->a, cl) == 0; k++)
            e -= cl;
        return zse_buf_append(out, s + a, e - a);
    }
    default:
        return zse_buf_append(out, s, b->len);
    }
}

static int apply_decoder(const dec_step *d, tok_list *l)
{
    if (d->kind == D_BYTELEVEL)
        return bytelevel_decode(l);
    if (d->kind == D_BYTEFALLBACK)
        return bytefallback_decode(l);
    if (d->kind == D_FUSE) {
        for (size_t i = 1; i < l->n; i++) {
            if (zse_buf_append(&l->v[0], zse_buf_str(&l->v[i]), l->v[i].len))
                return -1;
            zse_buf_free(&l->v[i]);
        }
        l->n = l->n ? 1 : 0;
        return 0;
    }
    for (size_t i = 0; i < l->n; i++) {
        zse_buf out = {0};
        if (decode_one(d, i, &l->v[i], &out) || zse_buf_reserve(&out, 0)) {
            zse_buf_free(&out);
            return -1;
        }
        zse_buf_free(&l->v[i]);
        l->v[i] = out;
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
        if (skip_special && t->skippable[ids[i]])
            continue;
        if (zse_buf_puts(&l.v[l.n++], t->text[ids[i]]))
            goto done;
    }
    for (int k = 0; k < t->n_decs; k++)
        if (apply_decoder(&t->decs[k], &l))
            goto done;
    zse_buf joined = {0}, clean = {0};
    for (size_t i = 0; i < l.n; i++) /* with no decoder at all, HF joins tokens with spaces */
        if ((i && !t->n_decs && zse_buf_append(&joined, " ", 1)) ||
            zse_buf_append(&joined, zse_buf_str(&l.v[i]), l.v[i].len)) {
            zse_buf_free(&joined);
            goto done;
        }
    /* without a ByteLevel decoder, byte-level strings pass through: keep the text valid */
    if (utf8_lossy(zse_buf_str(&joined), joined.len, &clean) == 0)
        result = clean.data ? clean.data : zse_strdup("");
    else
        zse_buf_free(&clean);
    zse_buf_free(&joined);
done:
    for (size_t i = 0; i < n + 1; i++)
        zse_buf_free(&l.v[i]);
    free(l.v);
    return result;
}

/* ---- one token's bytes ------------------------------------------------------------------
 * What a token adds to the decoded bytes when it follows other tokens, before any UTF-8
 * check: the decoder chain on the token alone, with ByteLevel mapping characters back to
 * bytes and ByteFallback turning <0xNN> into its byte, but neither replacing an incomplete
 * character with U+FFFD. Constrained decoding matches these bytes against a grammar and
 * logprobs report them, so a token that holds half a character must give its real byte. */

static int bytelevel_bytes(const zse_buf *in, zse_buf *out)
{
    const char *s = in->data ? in->data : "";
    size_t n = in->len, cl;
    for (size_t i = 0; i < n; i += cl) {
        int32_t cp = cp_at(s, n, i, &cl);
        if (cp < 0 || cp >= 512 || g_byte_of_cp[cp] < 0) /* outside GPT-2's alphabet: as it is */
            return zse_buf_append(out, s, n);
    }
    for (size_t i = 0; i < n; i += cl) {
        char b = (char)g_byte_of_cp[cp_at(s, n, i, &cl)];
        if (zse_buf_append(out, &b, 1))
            return -1;
    }
    return 0;
}

int zse_tokenizer_token_bytes(const zse_tokenizer *t, int32_t id, zse_buf *out)
{
    if (id < 0 || id >= t->n_vocab)
        return zse_fail("token id %d is outside the vocabulary (0..%d)", id, t->n_vocab - 1);
    zse_buf cur = {0}, next = {0};
    /* with no decoder at all, HF joins tokens with spaces */
    int rc = (!t->n_decs ? zse_buf_append(&cur, " ", 1) : 0) || zse_buf_puts(&cur, t->text[id]);
    bool fused = false; /* after a Fuse, Strip touches only the ends of the whole text */
    for (int k = 0; rc == 0 && k < t->n_decs; k++) {
        const dec_step *d = &t->decs[k];
        next.len = 0;
        int b;
        fused = fused || d->kind == D_FUSE;
        if (d->kind == D_BYTELEVEL) {
            rc = bytelevel_bytes(&cur, &next);
        } else if (d->kind == D_BYTEFALLBACK && (b = byte_token(&cur)) >= 0) {
            char c = (char)b;
            rc = zse_buf_append(&next, &c, 1);
        } else if (d->kind == D_BYTEFALLBACK || d->kind == D_FUSE || (fused && d->kind == D_STRIP)) {
            rc = zse_buf_append(&next, zse_buf_str(&cur), cur.len);
        } else {
            rc = decode_one(d, 1, &cur, &next); /* index 1: not the sequence's first token */
        }
        zse_buf tmp = cur;
        cur = next;
        next = tmp;
    }
    if (rc == 0)
        rc = zse_buf_append(out, zse_buf_str(&cur), cur.len);
    zse_buf_free(&cur);
    zse_buf_free(&next);
    return rc ? -1 : 0;
}

/* ---- streaming ----------------------------------------------------------------------------
 * Emits what each new id adds to the text, as the difference between decoding a window
 * with and without the ids not yet emitted. The window starts one emission back, so
 * decoders that treat the first token specially (SentencePiece's leading space) see the
 * same context as the whole decode does. Text that ends in an incomplete character
 * (U+FFFD) is held back until more ids complete it or the stream is flushed. Ids that
 * skip_special drops are never stored: the whole decode drops them before its decoders. */
struct zse_tokenizer_stream {
    const zse_tokenizer *t;
    bool skip_special;
    id_vec ids;
    size_t prefix, read;   /* window start; ids before `read` are emitted */
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

/* the text ids[read..n) add after the context ids[from..read); NULL when decoding with
 * them changes the earlier text (a byte run that turned invalid) or on error */
static char *text_added(const zse_tokenizer_stream *s, size_t from, bool *failed)
{
    char *prev = zse_tokenizer_decode(s->t, s->ids.v + from, s->read - from, false);
    char *cur = zse_tokenizer_decode(s->t, s->ids.v + from, s->ids.n - from, false);
    char *added = NULL;
    if (!prev || !cur) {
        *failed = true;
    } else {
        size_t pl = strlen(prev);
        if (strncmp(cur, prev, pl) == 0) {
            added = zse_strdup(cur + pl);
            *failed = !added;
        }
    }
    free(prev);
    free(cur);
    return added;
}

static int stream_emit(zse_tokenizer_stream *s, zse_buf *out, bool final)
{
    bool failed = false;
    char *added = text_added(s, s->prefix, &failed);
    /* ByteFallback reads a run of <0xNN> tokens as a whole, so bytes that spoil a run
     * change its earlier text: then only the last emitted token is context */
    if (!added && !failed && s->read > s->prefix)
        added = text_added(s, s->read - 1, &failed);
    if (!added && !failed)
        added = zse_tokenizer_decode(s->t, s->ids.v + s->read, s->ids.n - s->read, false);
    if (!added)
        return -1;
    size_t al = strlen(added);
    bool incomplete = al >= 3 && memcmp(added + al - 3, REPLACEMENT_CHAR, 3) == 0;
    int rc = 0;
    if (!incomplete || final) {
        rc = zse_buf_append(out, added, al);
        s->prefix = s->read;
        s->read = s->ids.n;
    }
    free(added);
    /* ids before the window are never looked at again */
    if (rc == 0 && s->prefix > 4096) {
        memmove(s->ids.v, s->ids.v + s->prefix, (s->ids.n - s->prefix) * sizeof *s->ids.v);
        s->ids.n -= s->prefix;
        s->read -= s->prefix;
        s->prefix = 0;
    }
    return rc ? -1 : zse_buf_reserve(out, 0);
}

int zse_tokenizer_stream_push(zse_tokenizer_stream *s, int32_t id, zse_buf *out)
{
    /* a model's embedding table is often padded beyond its tokenizer (Qwen2.5: 152064 rows,
     * 151665 tokens); an id past the tokenizer has no text */
    if (id < 0 || id >= s->t->n_vocab)
        return id < 0 ? zse_fail("token id %d is negative", id) : zse_buf_reserve(out, 0);
    if (s->skip_special && s->t->skippable[id])
        return zse_buf_reserve(out, 0);
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
