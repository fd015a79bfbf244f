/* The grammar builder: expressions (byte classes, sequences, alternations, repetitions,
 * named rules), UTF-8 code point ranges as byte sequences, JSON-string escapes, text
 * without a marker, and the compile shortcuts. lower.c turns expressions into rules.
 * Identical byte classes are stored once. */
#include "grammar/grammar.h"

#include <stdlib.h>
#include <string.h>

#define GB_MAX_EXPRS (1u << 24)

int gr_grow(void **p, uint32_t *cap, uint32_t need, size_t elem)
{
    if (need <= *cap)
        return 0;
    uint32_t n = *cap ? *cap : 64;
    while (n < need)
        n *= 2;
    void *q = zse_realloc(*p, (size_t)n * elem);
    if (!q)
        return -1;
    *p = q;
    *cap = n;
    return 0;
}

zse_gb *zse_gb_new(void)
{
    return zse_calloc(1, sizeof(zse_gb));
}

void zse_gb_free(zse_gb *b)
{
    if (!b)
        return;
    free(b->x);
    free(b->kids);
    free(b->classes);
    free(b->rule_body);
    free(b);
}

static zse_gx new_expr(zse_gb *b, gb_expr e)
{
    if (b->nx >= GB_MAX_EXPRS) {
        zse_fail("grammar: more than %u expressions; the schema or pattern is too large", GB_MAX_EXPRS);
        return -1;
    }
    if (gr_grow((void **)&b->x, &b->capx, b->nx + 1, sizeof *b->x))
        return -1;
    b->x[b->nx] = e;
    return (zse_gx)b->nx++;
}

static bool valid(const zse_gb *b, zse_gx x)
{
    return x >= 0 && (uint32_t)x < b->nx;
}

zse_gx gb_class(zse_gb *b, const gr_class *c)
{
    uint32_t i;
    for (i = 0; i < b->nclasses; i++)
        if (!memcmp(&b->classes[i], c, sizeof *c))
            break;
    if (i == b->nclasses) {
        if (gr_grow((void **)&b->classes, &b->capclasses, b->nclasses + 1, sizeof *b->classes))
            return -1;
        b->classes[b->nclasses++] = *c;
    }
    return new_expr(b, (gb_expr){.kind = X_CLASS, .a = (int32_t)i});
}

zse_gx gb_empty(zse_gb *b)
{
    return new_expr(b, (gb_expr){.kind = X_EMPTY});
}

zse_gx zse_gb_byte_range(zse_gb *b, uint8_t lo, uint8_t hi)
{
    gr_class c = {{0}};
    for (unsigned v = lo; v <= hi; v++)
        c.bits[v >> 6] |= 1ull << (v & 63);
    return gb_class(b, &c);
}

static zse_gx list_expr(zse_gb *b, int kind, const zse_gx *xs, int n)
{
    for (int i = 0; i < n; i++)
        if (!valid(b, xs[i]))
            return -1;
    if (n == 1)
        return xs[0];
    if (gr_grow((void **)&b->kids, &b->capkids, b->nkids + (uint32_t)n, sizeof *b->kids))
        return -1;
    uint32_t k0 = b->nkids;
    memcpy(b->kids + k0, xs, (size_t)n * sizeof *xs);
    b->nkids += (uint32_t)n;
    return new_expr(b, (gb_expr){.kind = (uint8_t)kind, .kid0 = k0, .nkid = (uint32_t)n});
}

zse_gx zse_gb_seq(zse_gb *b, const zse_gx *xs, int n)
{
    return n == 0 ? gb_empty(b) : list_expr(b, X_SEQ, xs, n);
}

zse_gx zse_gb_alt(zse_gb *b, const zse_gx *xs, int n)
{
    if (n < 1) {
        zse_fail("grammar: an alternation needs at least one branch");
        return -1;
    }
    return list_expr(b, X_ALT, xs, n);
}

zse_gx gb_seq2(zse_gb *b, zse_gx x, zse_gx y)
{
    zse_gx v[2] = {x, y};
    return zse_gb_seq(b, v, 2);
}

zse_gx gb_seq3(zse_gb *b, zse_gx x, zse_gx y, zse_gx z)
{
    zse_gx v[3] = {x, y, z};
    return zse_gb_seq(b, v, 3);
}

zse_gx gb_alt2(zse_gb *b, zse_gx x, zse_gx y)
{
    zse_gx v[2] = {x, y};
    return zse_gb_alt(b, v, 2);
}

zse_gx gb_opt(zse_gb *b, zse_gx x)
{
    return zse_gb_repeat(b, x, 0, 1);
}

zse_gx zse_gb_text(zse_gb *b, const char *s, size_t n)
{
    if (n == 0)
        return gb_empty(b);
    if (n > GB_MAX_EXPRS / 2) {
        zse_fail("grammar: a literal of %zu bytes is too long", n);
        return -1;
    }
    zse_gx *v = zse_malloc(n * sizeof *v);
    if (!v)
        return -1;
    for (size_t i = 0; i < n; i++)
        if ((v[i] = zse_gb_byte_range(b, (uint8_t)s[i], (uint8_t)s[i])) < 0) {
            free(v);
            return -1;
        }
    zse_gx r = zse_gb_seq(b, v, (int)n);
    free(v);
    return r;
}

zse_gx gb_cstr(zse_gb *b, const char *s)
{
    return zse_gb_text(b, s, strlen(s));
}

/* whether x matches the empty string; rules under definition count as not (a rule's
 * nullability is only needed for repetition bodies, and a cycle through a rule is caught by
 * the left-recursion check of the lowered grammar) */
static bool nullable_depth(zse_gb *b, zse_gx x, int depth)
{
    if (!valid(b, x) || depth > 200)
        return false;
    const gb_expr *e = &b->x[x];
    switch (e->kind) {
    case X_EMPTY: return true;
    case X_CLASS: return false;
    case X_SEQ:
        for (uint32_t i = 0; i < e->nkid; i++)
            if (!nullable_depth(b, b->kids[e->kid0 + i], depth + 1))
                return false;
        return true;
    case X_ALT:
        for (uint32_t i = 0; i < e->nkid; i++)
            if (nullable_depth(b, b->kids[e->kid0 + i], depth + 1))
                return true;
        return false;
    case X_REPEAT: return e->min == 0 || nullable_depth(b, e->a, depth + 1);
    case X_RULE: {
        zse_gx body = b->rule_body[e->a];
        return body >= 0 && nullable_depth(b, body, depth + 1);
    }
    }
    return false;
}

bool gb_nullable(zse_gb *b, zse_gx x)
{
    return nullable_depth(b, x, 0);
}

zse_gx zse_gb_repeat(zse_gb *b, zse_gx x, int min, int max)
{
    if (!valid(b, x))
        return -1;
    if (min < 0 || (max >= 0 && max < min)) {
        zse_fail("grammar: a repetition {%d,%d} is empty or negative", min, max);
        return -1;
    }
    if (max == 0)
        return gb_empty(b);
    if (min == 1 && max == 1)
        return x;
    if (gb_nullable(b, x)) {
        zse_fail("grammar: a repeated part can match the empty string; write it so each repetition consumes text");
        return -1;
    }
    if (min > 100000 || max > 100000) {
        zse_fail("grammar: a repetition bound above 100000 (%d,%d) is not supported", min, max);
        return -1;
    }
    return new_expr(b, (gb_expr){.kind = X_REPEAT, .a = x, .min = min, .max = max});
}

zse_gx zse_gb_rule(zse_gb *b)
{
    if (gr_grow((void **)&b->rule_body, &b->caprules, b->nrules + 1, sizeof *b->rule_body))
        return -1;
    b->rule_body[b->nrules] = -1;
    return new_expr(b, (gb_expr){.kind = X_RULE, .a = (int32_t)b->nrules++});
}

int zse_gb_define(zse_gb *b, zse_gx rule, zse_gx body)
{
    if (!valid(b, rule) || b->x[rule].kind != X_RULE || !valid(b, body))
        return zse_fail("grammar: zse_gb_define needs a rule from zse_gb_rule and a body");
    if (b->rule_body[b->x[rule].a] >= 0)
        return zse_fail("grammar: a rule is defined twice");
    b->rule_body[b->x[rule].a] = body;
    return 0;
}

/* ---- UTF-8 ---------------------------------------------------------------------------- */

static int utf8_encode(uint32_t cp, uint8_t out[4])
{
    if (cp < 0x80) {
        out[0] = (uint8_t)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (uint8_t)(0xC0 | (cp >> 6));
        out[1] = (uint8_t)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (uint8_t)(0xE0 | (cp >> 12));
        out[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (uint8_t)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (uint8_t)(0xF0 | (cp >> 18));
    out[1] = (uint8_t)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (uint8_t)(0x80 | (cp & 0x3F));
    return 4;
}

/* collects the byte-range sequences of [lo, hi] (one encoded length) as RE2 does: split
 * until every continuation position spans a whole or an aligned range */
typedef struct {
    zse_gb *b;
    zse_gx *alts;
    int n, cap;
    bool failed;
} cp_acc;

static void acc_add(cp_acc *acc, zse_gx x)
{
    if (x < 0 || gr_grow((void **)&acc->alts, (uint32_t *)&acc->cap, (uint32_t)acc->n + 1, sizeof(zse_gx))) {
        acc->failed = true;
        return;
    }
    acc->alts[acc->n++] = x;
}

static void cp_split(cp_acc *acc, uint32_t lo, uint32_t hi)
{
    static const uint32_t max_of_len[4] = {0x7F, 0x7FF, 0xFFFF, 0x10FFFF};
    if (acc->failed || lo > hi)
        return;
    for (int l = 0; l < 3; l++)
        if (lo <= max_of_len[l] && hi > max_of_len[l]) {
            cp_split(acc, lo, max_of_len[l]);
            cp_split(acc, max_of_len[l] + 1, hi);
            return;
        }
    if (lo < 0xD800 && hi >= 0xD800) { /* surrogates are not characters */
        cp_split(acc, lo, 0xD7FF);
        cp_split(acc, 0xD800, hi);
        return;
    }
    if (lo >= 0xD800 && lo <= 0xDFFF) {
        if (hi > 0xDFFF)
            cp_split(acc, 0xE000, hi);
        return;
    }
    if (hi < 0x80) {
        acc_add(acc, zse_gb_byte_range(acc->b, (uint8_t)lo, (uint8_t)hi));
        return;
    }
    uint8_t a[4], z[4];
    int len = utf8_encode(lo, a);
    for (int i = 1; i < len; i++) {
        uint32_t m = (1u << (6 * i)) - 1;
        if ((lo & ~m) != (hi & ~m)) {
            if (lo & m) {
                cp_split(acc, lo, lo | m);
                cp_split(acc, (lo | m) + 1, hi);
                return;
            }
            if ((hi & m) != m) {
                cp_split(acc, lo, (hi & ~m) - 1);
                cp_split(acc, hi & ~m, hi);
                return;
            }
        }
    }
    utf8_encode(hi, z);
    zse_gx parts[4];
    for (int i = 0; i < len; i++)
        if ((parts[i] = zse_gb_byte_range(acc->b, a[i], z[i])) < 0) {
            acc->failed = true;
            return;
        }
    acc_add(acc, zse_gb_seq(acc->b, parts, len));
}

static zse_gx cp_finish(cp_acc *acc)
{
    zse_gx r = -1;
    if (!acc->failed) {
        if (acc->n == 0)
            zse_fail("grammar: an empty character set can match nothing");
        else
            r = zse_gb_alt(acc->b, acc->alts, acc->n);
    }
    free(acc->alts);
    return r;
}

zse_gx gb_codepoints(zse_gb *b, uint32_t lo, uint32_t hi)
{
    cp_acc acc = {.b = b};
    cp_split(&acc, lo, hi > 0x10FFFF ? 0x10FFFF : hi);
    return cp_finish(&acc);
}

/* a code point inside a JSON string as its escape: \" \\ \b \f \n \r \t or \u00XX */
static void json_escape_alts(cp_acc *acc, uint32_t cp)
{
    static const char hex[] = "0123456789abcdef";
    const char *shortform = cp == '"' ? "\\\"" : cp == '\\' ? "\\\\" : cp == '\b' ? "\\b" : cp == '\f' ? "\\f"
                          : cp == '\n' ? "\\n" : cp == '\r' ? "\\r" : cp == '\t' ? "\\t" : NULL;
    if (shortform)
        acc_add(acc, gb_cstr(acc->b, shortform));
    if (cp >= 0x20)
        return;
    /* \u00XY, hex digits of either case */
    char hi = hex[cp >> 4], lo = hex[cp & 15];
    gr_class c = {{0}};
    c.bits[(uint8_t)lo >> 6] |= 1ull << ((uint8_t)lo & 63);
    if (lo >= 'a') {
        char up = (char)(lo - 'a' + 'A');
        c.bits[(uint8_t)up >> 6] |= 1ull << ((uint8_t)up & 63);
    }
    char pre[6] = {'\\', 'u', '0', '0', hi, 0};
    acc_add(acc, gb_seq2(acc->b, gb_cstr(acc->b, pre), gb_class(acc->b, &c)));
}

zse_gx gb_ranges(zse_gb *b, const gr_range *r, int n, bool json)
{
    cp_acc acc = {.b = b};
    for (int i = 0; i < n && !acc.failed; i++) {
        uint32_t lo = r[i].lo, hi = r[i].hi > 0x10FFFF ? 0x10FFFF : r[i].hi;
        if (!json) {
            cp_split(&acc, lo, hi);
            continue;
        }
        /* split around the code points JSON must escape: 0x00-0x1F, '"', '\\' */
        for (uint32_t cp = lo; cp <= hi && cp < 0x20; cp++)
            json_escape_alts(&acc, cp);
        uint32_t start = lo < 0x20 ? 0x20 : lo;
        static const uint32_t special[2] = {'"', '\\'};
        for (int s = 0; s < 2 && start <= hi; s++) {
            if (special[s] < start || special[s] > hi)
                continue;
            if (special[s] > start)
                cp_split(&acc, start, special[s] - 1);
            json_escape_alts(&acc, special[s]);
            start = special[s] + 1;
        }
        if (start <= hi)
            cp_split(&acc, start, hi);
    }
    return cp_finish(&acc);
}

/* ---- text without a marker (free text before a trigger) --------------------------------- */

zse_gx zse_gb_text_without(zse_gb *b, const char *marker)
{
    size_t m = marker ? strlen(marker) : 0;
    if (m == 0 || m > 256)
        return zse_fail("grammar: a marker of 1-256 bytes is needed"), -1;
    for (size_t i = 0; i < m; i++)
        if ((uint8_t)marker[i] >= 0x80)
            return zse_fail("grammar: a trigger marker must be ASCII"), -1;
    /* KMP failure function; state j = the longest prefix of marker that ends the text */
    size_t *fail = zse_calloc(m + 1, sizeof *fail);
    zse_gx *state = zse_malloc(m * sizeof *state);
    zse_gx r = -1;
    if (!fail || !state)
        goto out;
    for (size_t i = 1, k = 0; i < m; i++) {
        while (k && marker[i] != marker[k])
            k = fail[k];
        if (marker[i] == marker[k])
            k++;
        fail[i + 1] = k;
    }
    for (size_t j = 0; j < m; j++)
        if ((state[j] = zse_gb_rule(b)) < 0)
            goto out;
    zse_gx other_cp = gb_codepoints(b, 0x80, 0x10FFFF);
    if (other_cp < 0)
        goto out;
    for (size_t j = 0; j < m; j++) {
        /* group the ASCII bytes by the state they lead to */
        gr_class by_target[257];
        memset(by_target, 0, sizeof by_target);
        for (unsigned c = 0; c < 0x80; c++) {
            size_t k = j;
            while (k && (char)c != marker[k])
                k = fail[k];
            if ((char)c == marker[k])
                k++;
            by_target[k].bits[c >> 6] |= 1ull << (c & 63);
        }
        zse_gx alts[260];
        int na = 0;
        for (size_t k = 0; k < m; k++) { /* k == m would complete the marker: excluded */
            gr_class *c = &by_target[k];
            if (!(c->bits[0] | c->bits[1]))
                continue;
            alts[na++] = gb_seq2(b, gb_class(b, c), state[k]);
        }
        alts[na++] = gb_seq2(b, other_cp, state[0]);
        alts[na++] = gb_empty(b);
        if (zse_gb_define(b, state[j], zse_gb_alt(b, alts, na)))
            goto out;
    }
    r = state[0];
out:
    free(fail);
    free(state);
    return r;
}

/* ---- shortcuts ------------------------------------------------------------------------ */

static zse_grammar *compile_and_free(zse_gb *b, zse_gx root, const zse_grammar_vocab *v)
{
    zse_grammar *g = root < 0 ? NULL : zse_grammar_compile(b, root, v);
    zse_gb_free(b);
    return g;
}

zse_grammar *zse_grammar_json_schema(const zse_grammar_vocab *v, const char *schema, size_t len, unsigned flags)
{
    json_error_t jerr;
    json_t *s = json_loadb(schema, len, JSON_DECODE_ANY, &jerr);
    if (!s) {
        zse_fail("json schema: not valid JSON (line %d: %s)", jerr.line, jerr.text);
        return NULL;
    }
    zse_gb *b = zse_gb_new();
    zse_grammar *g = b ? compile_and_free(b, zse_gb_json_schema(b, s, flags), v) : NULL;
    json_decref(s);
    return g;
}

zse_grammar *zse_grammar_json_object(const zse_grammar_vocab *v)
{
    zse_gb *b = zse_gb_new();
    return b ? compile_and_free(b, zse_gb_json_object(b), v) : NULL;
}

zse_grammar *zse_grammar_regex(const zse_grammar_vocab *v, const char *pattern, size_t len)
{
    zse_gb *b = zse_gb_new();
    return b ? compile_and_free(b, zse_gb_regex(b, pattern, len), v) : NULL;
}

zse_grammar *zse_grammar_choice(const zse_grammar_vocab *v, const char *const *choices, int n)
{
    if (n < 1) {
        zse_fail("grammar: a choice list needs at least one string");
        return NULL;
    }
    zse_gb *b = zse_gb_new();
    if (!b)
        return NULL;
    zse_gx *alts = zse_malloc((size_t)n * sizeof *alts);
    zse_gx root = -1;
    if (alts) {
        int i;
        for (i = 0; i < n; i++)
            if ((alts[i] = gb_cstr(b, choices[i])) < 0)
                break;
        if (i == n)
            root = zse_gb_alt(b, alts, n);
        free(alts);
    }
    return compile_and_free(b, root, v);
}
