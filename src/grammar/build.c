/* The grammar builder: expressions (byte classes, sequences, alternations, repetitions,
 * rules) and their lowering into the flat form the matcher walks (rules → alternatives →
 * elements). Lowering choices that keep masks cheap (docs/GRAMMAR.md):
 *   - an alternation repeated (a JSON string's characters) is distributed into the loop
 *     rule, so a character and the loop share one frame and one cached position: S → a S |
 *     b S | ... | ε, the tail call S reusing the frame (pda.c);
 *   - x{m,n} is a chain of rules "s repetitions done", each with x's alternatives inline,
 *     so counted strings stay in one frame too;
 *   - identical byte classes are stored once. */
#include "grammar/grammar.h"

#include <stdlib.h>
#include <string.h>

enum { X_EMPTY, X_CLASS, X_SEQ, X_ALT, X_REPEAT, X_RULE };

typedef struct {
    uint8_t kind;
    int32_t a;          /* class (X_CLASS), child (X_REPEAT), builder rule (X_RULE) */
    int32_t min, max;   /* X_REPEAT */
    uint32_t kid0, nkid; /* X_SEQ, X_ALT: kids[kid0 .. kid0+nkid) */
} gb_expr;

struct zse_gb {
    gb_expr *x;
    uint32_t nx, capx;
    zse_gx *kids;
    uint32_t nkids, capkids;
    gr_class *classes;
    uint32_t nclasses, capclasses;
    zse_gx *rule_body; /* builder rules: their body expression, -1 until defined */
    uint32_t nrules, caprules;
    bool failed;
};

#define GB_MAX_EXPRS (1u << 24)
#define GR_MAX_ELEMS (1u << 24)

static int grow(void **p, uint32_t *cap, uint32_t need, size_t elem)
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
    if (grow((void **)&b->x, &b->capx, b->nx + 1, sizeof *b->x))
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
        if (grow((void **)&b->classes, &b->capclasses, b->nclasses + 1, sizeof *b->classes))
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
    if (grow((void **)&b->kids, &b->capkids, b->nkids + (uint32_t)n, sizeof *b->kids))
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
    if (grow((void **)&b->rule_body, &b->caprules, b->nrules + 1, sizeof *b->rule_body))
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
    if (x < 0 || grow((void **)&acc->alts, (uint32_t *)&acc->cap, (uint32_t)acc->n + 1, sizeof(zse_gx))) {
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

/* ---- lowering --------------------------------------------------------------------------- */

typedef struct {
    zse_gb *b;
    gr_elem *elems;
    uint32_t n_elems, cap_elems;
    uint32_t *alt_start;
    uint32_t n_alt, cap_alt;
    gr_rule *rules;
    uint32_t n_rules, cap_rules;
    /* rules waiting to be lowered */
    struct pending {
        int kind; /* 0: body expression, 1: repetition state, 2: builder rule x, 3: factored
                   * (x: first entry in `ent`, step: how many), 4: repetition state whose
                   * stop continues at rule cont (first: the chain's first rule) */
        zse_gx x;
        int32_t step;
        int32_t cont, first;
    } *todo;
    uint32_t n_todo, cap_todo;
    /* alternatives as atom lists (an atom: a class, rule or nested alternation/repetition)
     * with the rule to continue at (-1: none), for left-factoring */
    zse_gx *atoms;
    uint32_t n_atoms, cap_atoms;
    struct entry {
        uint32_t off, n;
        int32_t cont;
    } *ent;
    uint32_t n_ent, cap_ent;
    int32_t *alt_rule; /* expression → its anonymous rule (X_ALT), or the first rule of its chain (X_REPEAT) */
} lowering;

static int64_t new_rule(lowering *L, int kind, zse_gx x, int32_t step)
{
    if (grow((void **)&L->rules, &L->cap_rules, L->n_rules + 1, sizeof *L->rules) ||
        grow((void **)&L->todo, &L->cap_todo, L->n_rules + 1, sizeof *L->todo))
        return -1;
    L->rules[L->n_rules] = (gr_rule){0, 0};
    L->todo[L->n_rules] = (struct pending){kind, x, step, -1, -1};
    L->n_todo = L->n_rules + 1;
    return L->n_rules++;
}

static int put_elem(lowering *L, unsigned kind, uint32_t arg)
{
    if (L->n_elems >= GR_MAX_ELEMS)
        return zse_fail("grammar: more than %u grammar elements; the schema or pattern is too large", GR_MAX_ELEMS);
    if (grow((void **)&L->elems, &L->cap_elems, L->n_elems + 1, sizeof *L->elems))
        return -1;
    L->elems[L->n_elems++] = (gr_elem){.kind = kind, .arg = arg};
    return 0;
}

static int begin_alt(lowering *L)
{
    if (grow((void **)&L->alt_start, &L->cap_alt, L->n_alt + 1, sizeof *L->alt_start))
        return -1;
    L->alt_start[L->n_alt++] = L->n_elems;
    return 0;
}

/* the rule of an X_ALT used inside a sequence, or the first state rule of a repetition */
static int64_t rule_of(lowering *L, zse_gx x)
{
    if (L->alt_rule[x] >= 0)
        return L->alt_rule[x];
    const gb_expr *e = &L->b->x[x];
    int64_t r;
    if (e->kind == X_ALT) {
        r = new_rule(L, 0, x, 0);
    } else { /* X_REPEAT: states 0..min (unbounded) or 0..max-1 */
        int32_t n = e->max < 0 ? e->min + 1 : e->max;
        r = new_rule(L, 1, x, 0);
        for (int32_t s = 1; r >= 0 && s < n; s++)
            if (new_rule(L, 1, x, s) < 0)
                r = -1;
    }
    if (r >= 0)
        L->alt_rule[x] = (int32_t)r;
    return r;
}

static int emit(lowering *L, zse_gx x)
{
    if (x < 0) /* an atom naming a lowered rule: -(rule + 1) */
        return put_elem(L, GE_RULE, (uint32_t)(-x - 1));
    const gb_expr *e = &L->b->x[x];
    switch (e->kind) {
    case X_EMPTY: return 0;
    case X_CLASS: return put_elem(L, GE_CLASS, (uint32_t)e->a);
    case X_SEQ:
        for (uint32_t i = 0; i < e->nkid; i++)
            if (emit(L, L->b->kids[L->b->x[x].kid0 + i]))
                return -1;
        return 0;
    case X_RULE:
        if (L->b->rule_body[e->a] < 0)
            return zse_fail("grammar: a rule is used but never defined");
        return put_elem(L, GE_RULE, (uint32_t)e->a);
    case X_ALT:
    case X_REPEAT: {
        int64_t r = rule_of(L, x);
        return r < 0 ? -1 : put_elem(L, GE_RULE, (uint32_t)r);
    }
    }
    return zse_fail("grammar: corrupt expression");
}

/* the alternatives of x as a flat list (nested alternations opened) */
static int alts_of(zse_gb *b, zse_gx x, zse_gx **out, uint32_t *n, uint32_t *cap)
{
    const gb_expr *e = &b->x[x];
    if (e->kind != X_ALT) {
        if (grow((void **)out, cap, *n + 1, sizeof **out))
            return -1;
        (*out)[(*n)++] = x;
        return 0;
    }
    for (uint32_t i = 0; i < e->nkid; i++)
        if (alts_of(b, b->kids[b->x[x].kid0 + i], out, n, cap))
            return -1;
    return 0;
}

/* the atoms of x (sequences opened, empties dropped) appended to the atom pool */
static int flatten(lowering *L, zse_gx x)
{
    const gb_expr *e = &L->b->x[x];
    if (e->kind == X_EMPTY)
        return 0;
    if (e->kind == X_SEQ) {
        for (uint32_t i = 0; i < e->nkid; i++)
            if (flatten(L, L->b->kids[L->b->x[x].kid0 + i]))
                return -1;
        return 0;
    }
    if (grow((void **)&L->atoms, &L->cap_atoms, L->n_atoms + 1, sizeof *L->atoms))
        return -1;
    L->atoms[L->n_atoms++] = x;
    return 0;
}

static bool atom_eq(const lowering *L, zse_gx a, zse_gx b)
{
    if (a == b)
        return true;
    if (a < 0 || b < 0)
        return false;
    const gb_expr *x = &L->b->x[a], *y = &L->b->x[b];
    return x->kind == X_CLASS && y->kind == X_CLASS && x->a == y->a;
}

static bool tail_eq(const lowering *L, const struct entry *a, const struct entry *b, uint32_t from)
{
    if (a->n != b->n || a->cont != b->cont)
        return false;
    for (uint32_t i = from; i < a->n; i++)
        if (!atom_eq(L, L->atoms[a->off + i], L->atoms[b->off + i]))
            return false;
    return true;
}

/* a rule over one entry (the continuation after an alternation or repetition) */
static int64_t continuation_rule(lowering *L, uint32_t off, uint32_t n, int32_t cont)
{
    if (n == 0)
        return cont; /* nothing to add: continue where the entry did (-1: the end) */
    if (grow((void **)&L->ent, &L->cap_ent, L->n_ent + 1, sizeof *L->ent))
        return -2;
    L->ent[L->n_ent++] = (struct entry){off, n, cont};
    int64_t r = new_rule(L, 3, (zse_gx)(L->n_ent - 1), 1);
    return r < 0 ? -2 : r;
}

/* a new atom list: atoms[off .. off+k) then the rule atom r */
static int64_t prefix_then_rule(lowering *L, uint32_t off, uint32_t k, int64_t r)
{
    if (grow((void **)&L->atoms, &L->cap_atoms, L->n_atoms + k + 1, sizeof *L->atoms))
        return -1;
    uint32_t at = L->n_atoms;
    memmove(L->atoms + at, L->atoms + off, k * sizeof *L->atoms);
    L->atoms[at + k] = (zse_gx)(-r - 1);
    L->n_atoms += k + 1;
    return at;
}

/* Continuation passing: an alternation or repetition followed by more text (in the entry,
 * or by its continuation) becomes a tail call whose every way out continues in a rule K
 * holding that text. No frame is pushed for it, so a cached position sees through it (a
 * string's closing quote, the ',' after an array item, the space after ':' are all in the
 * frame). Named rules (recursion, shared values) keep their frames. */
static int expand_entries(lowering *L, uint32_t e0, uint32_t *n)
{
    for (uint32_t i = 0; i < *n; i++) {
        struct entry e = L->ent[e0 + i];
        uint32_t k = 0;
        for (; k < e.n; k++) {
            zse_gx a = L->atoms[e.off + k];
            if (a < 0)
                continue;
            int kind = L->b->x[a].kind;
            if ((kind == X_ALT || kind == X_REPEAT) && !(k == e.n - 1 && e.cont < 0))
                break;
        }
        if (k == e.n)
            continue;
        zse_gx a = L->atoms[e.off + k];
        int64_t K = continuation_rule(L, e.off + k + 1, e.n - k - 1, e.cont);
        if (K < -1)
            return -1;
        int64_t target;
        if (L->b->x[a].kind == X_ALT) { /* A' → alt_i K, for each alternative */
            zse_gx *alts = NULL;
            uint32_t na = 0, cap = 0;
            if (alts_of(L->b, a, &alts, &na, &cap))
                return free(alts), -1;
            uint32_t f0 = L->n_ent;
            int rc = 0;
            for (uint32_t j = 0; j < na && !rc; j++) {
                uint32_t off = L->n_atoms;
                rc = flatten(L, alts[j]);
                if (!rc && grow((void **)&L->ent, &L->cap_ent, L->n_ent + 1, sizeof *L->ent))
                    rc = -1;
                if (!rc)
                    L->ent[L->n_ent++] = (struct entry){off, L->n_atoms - off, (int32_t)K};
            }
            free(alts);
            if (rc)
                return -1;
            target = new_rule(L, 3, (zse_gx)f0, (int32_t)(L->n_ent - f0));
        } else { /* a chain of states whose stops continue at K */
            const gb_expr *rep = &L->b->x[a];
            int32_t states = rep->max < 0 ? rep->min + 1 : rep->max;
            target = -1;
            for (int32_t st = 0; st < states; st++) {
                int64_t r = new_rule(L, 4, a, st);
                if (r < 0)
                    return -1;
                if (st == 0)
                    target = r;
                L->todo[r].cont = (int32_t)K;
                L->todo[r].first = (int32_t)target;
            }
        }
        if (target < 0)
            return -1;
        int64_t at = prefix_then_rule(L, e.off, k, target);
        if (at < 0)
            return -1;
        L->ent[e0 + i] = (struct entry){(uint32_t)at, k + 1, -1};
    }
    return 0;
}

/* Emits rule r's alternatives from entries ent[e0 .. e0+n). Two normalizations keep the
 * stack sets small while every transition stays a tail call (one frame, so a cached
 * position covers a whole string body):
 *   - entries that differ only in their first byte class merge into one class ([a] X | [b]
 *     X → [ab] X: the ASCII ranges and UTF-8 lead bytes of a character set);
 *   - entries that share their first atom are left-factored: A F with a new rule F over
 *     their rests (\n | \t | \u.. → \ F), each rest ending in its continuation. */
static int lower_entries(lowering *L, uint32_t r, uint32_t e0, uint32_t n)
{
    /* merge first classes of otherwise equal entries */
    if (expand_entries(L, e0, &n))
        return -1;
    for (uint32_t i = 0; i < n; i++) {
        struct entry *a = &L->ent[e0 + i];
        if (!a->n || L->atoms[a->off] < 0 || L->b->x[L->atoms[a->off]].kind != X_CLASS)
            continue;
        gr_class merged = L->b->classes[L->b->x[L->atoms[a->off]].a];
        bool any = false;
        for (uint32_t j = i + 1; j < n; j++) {
            struct entry *c = &L->ent[e0 + j];
            if (!c->n || L->atoms[c->off] < 0 || L->b->x[L->atoms[c->off]].kind != X_CLASS || !tail_eq(L, a, c, 1))
                continue;
            const gr_class *cc = &L->b->classes[L->b->x[L->atoms[c->off]].a];
            for (int k = 0; k < 4; k++)
                merged.bits[k] |= cc->bits[k];
            L->ent[e0 + j] = L->ent[e0 + n - 1]; /* drop c: order within a rule is free */
            n--;
            j--;
            any = true;
        }
        if (any) {
            /* a fresh atom list: the merged class, then the shared rest */
            uint32_t off = L->n_atoms;
            if (grow((void **)&L->atoms, &L->cap_atoms, L->n_atoms + a->n, sizeof *L->atoms))
                return -1;
            zse_gx c = gb_class(L->b, &merged);
            if (c < 0)
                return -1;
            a = &L->ent[e0 + i];
            L->atoms[off] = c;
            memcpy(L->atoms + off + 1, L->atoms + a->off + 1, (a->n - 1) * sizeof *L->atoms);
            L->n_atoms += a->n;
            a->off = off;
        }
    }
    L->rules[r].first_alt = L->n_alt;
    bool *done = zse_calloc(n ? n : 1, sizeof *done);
    if (!done)
        return -1;
    int rc = 0;
    for (uint32_t i = 0; i < n && !rc; i++) {
        if (done[i])
            continue;
        struct entry a = L->ent[e0 + i];
        uint32_t group = 0;
        for (uint32_t j = i; j < n && a.n; j++)
            if (!done[j] && L->ent[e0 + j].n && atom_eq(L, L->atoms[L->ent[e0 + j].off], L->atoms[a.off]))
                group++;
        rc = begin_alt(L);
        if (!rc && group <= 1) { /* alone: its atoms, then its continuation */
            done[i] = true;
            for (uint32_t k = 0; k < a.n && !rc; k++)
                rc = emit(L, L->atoms[a.off + k]);
            if (!rc && a.cont >= 0)
                rc = put_elem(L, GE_RULE, (uint32_t)a.cont);
        } else if (!rc) { /* the shared first atom, then a rule over the rests */
            rc = emit(L, L->atoms[a.off]);
            uint32_t f0 = L->n_ent;
            for (uint32_t j = i; j < n && !rc; j++) {
                struct entry c = L->ent[e0 + j];
                if (done[j] || !c.n || !atom_eq(L, L->atoms[c.off], L->atoms[a.off]))
                    continue;
                done[j] = true;
                if (grow((void **)&L->ent, &L->cap_ent, L->n_ent + 1, sizeof *L->ent))
                    rc = -1;
                else
                    L->ent[L->n_ent++] = (struct entry){c.off + 1, c.n - 1, c.cont};
            }
            int64_t f = rc ? -1 : new_rule(L, 3, (zse_gx)f0, (int32_t)(L->n_ent - f0));
            if (f < 0)
                rc = -1;
            else
                rc = put_elem(L, GE_RULE, (uint32_t)f);
        }
        if (!rc)
            rc = put_elem(L, GE_END, 0);
    }
    L->rules[r].n_alts = L->n_alt - L->rules[r].first_alt;
    free(done);
    return rc;
}

/* state p.step of a repetition whose stop continues at rule p.cont */
static int lower_chain_state(lowering *L, uint32_t r, struct pending p)
{
    const gb_expr *rep = &L->b->x[p.x];
    int32_t min = rep->min, max = rep->max;
    int32_t next;
    if (max < 0)
        next = p.first + (p.step + 1 < min ? p.step + 1 : min);
    else
        next = p.step + 1 < max ? p.first + p.step + 1 : p.cont;
    zse_gx *alts = NULL;
    uint32_t na = 0, cap = 0;
    if (alts_of(L->b, rep->a, &alts, &na, &cap))
        return free(alts), -1;
    uint32_t e0 = L->n_ent;
    int rc = 0;
    for (uint32_t i = 0; i < na && !rc; i++) {
        uint32_t off = L->n_atoms;
        rc = flatten(L, alts[i]);
        if (!rc && grow((void **)&L->ent, &L->cap_ent, L->n_ent + 2, sizeof *L->ent))
            rc = -1;
        if (!rc)
            L->ent[L->n_ent++] = (struct entry){off, L->n_atoms - off, next};
    }
    if (!rc && p.step >= min)
        L->ent[L->n_ent++] = (struct entry){L->n_atoms, 0, p.cont};
    free(alts);
    return rc ? -1 : lower_entries(L, r, e0, L->n_ent - e0);
}

static int lower_rule(lowering *L, uint32_t r)
{
    struct pending p = L->todo[r];
    if (p.kind == 3)
        return lower_entries(L, r, (uint32_t)p.x, (uint32_t)p.step);
    if (p.kind == 4)
        return lower_chain_state(L, r, p);
    zse_gx *alts = NULL;
    uint32_t na = 0, cap = 0;
    zse_gx body = p.kind == 2 ? L->b->rule_body[p.x] : p.kind == 0 ? p.x : L->b->x[p.x].a;
    if (body < 0 || alts_of(L->b, body, &alts, &na, &cap)) {
        free(alts);
        return body < 0 ? zse_fail("grammar: a rule is used but never defined") : -1;
    }
    int32_t next = -1;
    bool may_stop = true;
    if (p.kind == 1) { /* repetition state p.step: p.step repetitions done */
        const gb_expr *rep = &L->b->x[p.x];
        int32_t min = rep->min, max = rep->max;
        uint32_t first = (uint32_t)L->alt_rule[p.x];
        if (max < 0)
            next = (int32_t)(first + (uint32_t)(p.step + 1 < min ? p.step + 1 : min));
        else
            next = p.step + 1 < max ? (int32_t)(first + (uint32_t)p.step + 1) : -1;
        may_stop = p.step >= min;
    }
    uint32_t e0 = L->n_ent;
    int rc = 0;
    for (uint32_t i = 0; i < na && !rc; i++) {
        uint32_t off = L->n_atoms;
        rc = flatten(L, alts[i]);
        if (!rc && grow((void **)&L->ent, &L->cap_ent, L->n_ent + 2, sizeof *L->ent))
            rc = -1;
        if (!rc)
            L->ent[L->n_ent++] = (struct entry){off, L->n_atoms - off, next};
    }
    if (!rc && p.kind == 1 && may_stop)
        L->ent[L->n_ent++] = (struct entry){L->n_atoms, 0, -1};
    free(alts);
    return rc ? -1 : lower_entries(L, r, e0, L->n_ent - e0);
}

/* nullable rules (fixpoint), then a left-recursion check: a rule reaching itself before
 * consuming a byte would expand forever */
static int check_left_recursion(const zse_grammar *g)
{
    bool *nullable = zse_calloc(g->n_rules, sizeof *nullable);
    uint8_t *mark = zse_calloc(g->n_rules, 1);
    uint32_t *stack = zse_malloc((size_t)g->n_rules * 2 * sizeof *stack);
    int rc = -1;
    if (!nullable || !mark || !stack)
        goto out;
    for (bool changed = true; changed;) {
        changed = false;
        for (uint32_t r = 0; r < g->n_rules; r++) {
            if (nullable[r])
                continue;
            for (uint32_t a = 0; a < g->rules[r].n_alts && !nullable[r]; a++) {
                uint32_t e = g->alt_start[g->rules[r].first_alt + a];
                while (g->elems[e].kind == GE_RULE && nullable[g->elems[e].arg])
                    e++;
                if (g->elems[e].kind == GE_END)
                    nullable[r] = changed = true;
            }
        }
    }
    /* depth-first over left corners; mark 1 = on the path, 2 = done */
    for (uint32_t start = 0; start < g->n_rules; start++) {
        if (mark[start])
            continue;
        uint32_t sp = 0;
        stack[sp++] = start;
        stack[sp++] = 0; /* next alternative/element cursor, encoded as an index into corners */
        mark[start] = 1;
        while (sp) {
            uint32_t r = stack[sp - 2], cursor = stack[sp - 1];
            /* enumerate left-corner rules of r: cursor counts them */
            uint32_t seen = 0, child = UINT32_MAX;
            for (uint32_t a = 0; a < g->rules[r].n_alts && child == UINT32_MAX; a++) {
                for (uint32_t e = g->alt_start[g->rules[r].first_alt + a]; g->elems[e].kind == GE_RULE; e++) {
                    if (seen++ == cursor) {
                        child = g->elems[e].arg;
                        break;
                    }
                    if (!nullable[g->elems[e].arg])
                        break;
                }
            }
            if (child == UINT32_MAX) {
                mark[r] = 2;
                sp -= 2;
                continue;
            }
            stack[sp - 1] = cursor + 1;
            if (mark[child] == 1) {
                zse_fail("grammar: a rule can reach itself without consuming text (left recursion); "
                         "rewrite it so text comes first");
                goto out;
            }
            if (mark[child] == 0) {
                mark[child] = 1;
                stack[sp++] = child;
                stack[sp++] = 0;
            }
        }
    }
    rc = 0;
out:
    free(nullable);
    free(mark);
    free(stack);
    return rc;
}

void gr_cache_free(gr_pos_cache *c);

static void grammar_free(zse_grammar *g)
{
    if (!g)
        return;
    if (g->caches)
        for (uint32_t i = 0; i < g->n_elems; i++)
            gr_cache_free(atomic_load(&g->caches[i]));
    free(g->caches);
    free(g->elems);
    free(g->alt_start);
    free(g->rules);
    free(g->classes);
    free(g);
}

zse_grammar *zse_grammar_compile(zse_gb *b, zse_gx root, const zse_grammar_vocab *v)
{
    if (!b || !v || !valid(b, root)) {
        zse_fail("grammar: nothing to compile (an earlier step failed)");
        return NULL;
    }
    lowering L = {.b = b};
    zse_grammar *g = NULL;
    L.alt_rule = zse_malloc((size_t)b->nx * sizeof *L.alt_rule);
    if (!L.alt_rule)
        goto fail;
    memset(L.alt_rule, 0xff, (size_t)b->nx * sizeof *L.alt_rule);
    /* builder rules keep their numbers; the root is one rule more */
    for (uint32_t r = 0; r < b->nrules; r++)
        if (new_rule(&L, 2, (zse_gx)r, 0) < 0)
            goto fail;
    int64_t root_rule = new_rule(&L, 0, root, 0);
    if (root_rule < 0)
        goto fail;
    if (b->x[root].kind == X_ALT)
        L.alt_rule[root] = (int32_t)root_rule;
    for (uint32_t r = 0; r < L.n_rules; r++) /* n_rules grows as rules are referenced */
        if (lower_rule(&L, r))
            goto fail;
    g = zse_calloc(1, sizeof *g);
    if (!g)
        goto fail;
    atomic_init(&g->refs, 1);
    g->vocab = v;
    g->elems = L.elems;
    g->n_elems = L.n_elems;
    g->alt_start = L.alt_start;
    g->n_alt = L.n_alt;
    g->rules = L.rules;
    g->n_rules = L.n_rules;
    g->root = (uint32_t)root_rule;
    L.elems = NULL;
    L.alt_start = NULL;
    L.rules = NULL;
    g->classes = zse_malloc((size_t)(b->nclasses ? b->nclasses : 1) * sizeof *g->classes);
    g->caches = zse_calloc(g->n_elems ? g->n_elems : 1, sizeof *g->caches);
    if (!g->classes || !g->caches)
        goto fail;
    memcpy(g->classes, b->classes, (size_t)b->nclasses * sizeof *g->classes);
    g->n_classes = b->nclasses;
    if (check_left_recursion(g))
        goto fail;
    free(L.alt_rule);
    free(L.todo);
    free(L.atoms);
    free(L.ent);
    return g;
fail:
    zse_error_prefix("compiling a grammar");
    grammar_free(g);
    free(L.elems);
    free(L.alt_start);
    free(L.rules);
    free(L.alt_rule);
    free(L.todo);
    free(L.atoms);
    free(L.ent);
    return NULL;
}

zse_grammar *zse_grammar_retain(zse_grammar *g)
{
    if (g)
        atomic_fetch_add(&g->refs, 1);
    return g;
}

void zse_grammar_release(zse_grammar *g)
{
    if (g && atomic_fetch_sub(&g->refs, 1) == 1)
        grammar_free(g);
}

const zse_grammar_vocab *zse_grammar_vocab_of(const zse_grammar *g)
{
    return g->vocab;
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
