/* Lowering: builder expressions → the flat rules the matcher walks (rules → alternatives →
 * elements), and the compiled grammar's life (compile, retain, release). The choices that
 * keep masks cheap (docs/GRAMMAR.md "The algorithm"): continuation passing (an alternation or
 * repetition followed by more text becomes a tail call whose exits continue in a rule holding
 * that text), left-factoring and merged first classes, counted repetitions as chains of
 * "s repetitions done" states, and a left-recursion check. */
#include "grammar/grammar.h"

#include <stdlib.h>
#include <string.h>

#define GR_MAX_ELEMS (1u << 24)

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
    } *pend;
    uint32_t n_pend, cap_pend;
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
    if (gr_grow((void **)&L->rules, &L->cap_rules, L->n_rules + 1, sizeof *L->rules) ||
        gr_grow((void **)&L->pend, &L->cap_pend, L->n_rules + 1, sizeof *L->pend))
        return -1;
    L->rules[L->n_rules] = (gr_rule){0, 0};
    L->pend[L->n_rules] = (struct pending){kind, x, step, -1, -1};
    L->n_pend = L->n_rules + 1;
    return L->n_rules++;
}

static int put_elem(lowering *L, unsigned kind, uint32_t arg)
{
    if (L->n_elems >= GR_MAX_ELEMS)
        return zse_fail("grammar: more than %u grammar elements; the schema or pattern is too large", GR_MAX_ELEMS);
    if (gr_grow((void **)&L->elems, &L->cap_elems, L->n_elems + 1, sizeof *L->elems))
        return -1;
    L->elems[L->n_elems++] = (gr_elem){.kind = kind, .arg = arg};
    return 0;
}

static int begin_alt(lowering *L)
{
    if (gr_grow((void **)&L->alt_start, &L->cap_alt, L->n_alt + 1, sizeof *L->alt_start))
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
        if (gr_grow((void **)out, cap, *n + 1, sizeof **out))
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
    if (gr_grow((void **)&L->atoms, &L->cap_atoms, L->n_atoms + 1, sizeof *L->atoms))
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
    if (gr_grow((void **)&L->ent, &L->cap_ent, L->n_ent + 1, sizeof *L->ent))
        return -2;
    L->ent[L->n_ent++] = (struct entry){off, n, cont};
    int64_t r = new_rule(L, 3, (zse_gx)(L->n_ent - 1), 1);
    return r < 0 ? -2 : r;
}

/* a new atom list: atoms[off .. off+k) then the rule atom r */
static int64_t prefix_then_rule(lowering *L, uint32_t off, uint32_t k, int64_t r)
{
    if (gr_grow((void **)&L->atoms, &L->cap_atoms, L->n_atoms + k + 1, sizeof *L->atoms))
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
                if (!rc && gr_grow((void **)&L->ent, &L->cap_ent, L->n_ent + 1, sizeof *L->ent))
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
                L->pend[r].cont = (int32_t)K;
                L->pend[r].first = (int32_t)target;
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
            if (gr_grow((void **)&L->atoms, &L->cap_atoms, L->n_atoms + a->n, sizeof *L->atoms))
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
                if (gr_grow((void **)&L->ent, &L->cap_ent, L->n_ent + 1, sizeof *L->ent))
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
        if (!rc && gr_grow((void **)&L->ent, &L->cap_ent, L->n_ent + 2, sizeof *L->ent))
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
    struct pending p = L->pend[r];
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
        if (!rc && gr_grow((void **)&L->ent, &L->cap_ent, L->n_ent + 2, sizeof *L->ent))
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
    if (!b || !v || root < 0 || (uint32_t)root >= b->nx) {
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
    if (b->nclasses) /* a grammar without character classes has no array to copy (NULL) */
        memcpy(g->classes, b->classes, (size_t)b->nclasses * sizeof *g->classes);
    g->n_classes = b->nclasses;
    if (check_left_recursion(g))
        goto fail;
    free(L.alt_rule);
    free(L.pend);
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
    free(L.pend);
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

