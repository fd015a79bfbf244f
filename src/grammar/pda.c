/* The pushdown automaton. A stack is a chain of nodes (elem, parent): the top node's elem
 * is the grammar element to match next; each node below holds the element to continue at
 * when the frame above it ends. A state is a set of stacks whose tops are byte classes
 * (several when the grammar is ambiguous so far), plus "may end here".
 *
 * Nodes are hash-consed: (elem, parent) has one id, so equal stacks share storage and a
 * set deduplicates by id. Persistent nodes live as long as the matcher (they are few: a
 * step adds one or two); speculative nodes (mask computation, trial advances) go in a
 * scratch area that is cut back after each trial.
 *
 * Closure (what to match next after a byte): an element that is a rule pushes a return
 * node and opens each alternative — unless the rule is the last element of its
 * alternative, where the frame is reused (tail call): loops written as right recursion
 * (S → x S | ε) then keep one frame, which bounds stack depth and lets a cached position
 * cover a whole string body. An alternative's end pops to the node below. */
#include "grammar/grammar.h"

#include <stdlib.h>
#include <string.h>

#define GR_MAX_TOPS 4096

int gr_store_init(gr_store *s)
{
    memset(s, 0, sizeof *s);
    return 0;
}

void gr_store_free(gr_store *s)
{
    free(s->nodes);
    free(s->hash);
    free(s->scratch);
    free(s->step_key);
    free(s->step_val);
    free(s->step_gen);
    memset(s, 0, sizeof *s);
}

void gr_store_clear(gr_store *s)
{
    s->n_nodes = 0;
    s->n_scratch = 0;
    if (s->hash)
        memset(s->hash, 0, (size_t)s->hash_cap * sizeof *s->hash);
    s->hash_used = 0;
}

int gr_set_push(gr_set *set, uint32_t id)
{
    for (uint32_t i = 0; i < set->n; i++)
        if (set->tops[i] == id)
            return 0;
    if (set->n >= GR_MAX_TOPS)
        return zse_fail("grammar: more than %d parses are alive at once; the grammar is too ambiguous", GR_MAX_TOPS);
    if (gr_grow((void **)&set->tops, &set->cap, set->n + 1, sizeof *set->tops))
        return -1;
    set->tops[set->n++] = id;
    return 0;
}

void gr_set_free(gr_set *set)
{
    free(set->tops);
    memset(set, 0, sizeof *set);
}

static inline uint32_t hash2(uint32_t a, uint32_t b)
{
    uint64_t h = ((uint64_t)a << 32 | b) * 0x9E3779B97F4A7C15ull;
    return (uint32_t)(h >> 32);
}

/* ---- the step table ---------------------------------------------------------------------
 * keys: 1 | elem | parent → a scratch node; 2 | id → a top already in the output set;
 * 3 | rule | ret → a rule expansion already made (cycle guard) */
#define KEY_NODE(e, p) (1ull << 62 | (uint64_t)(e) << 32 | (p))
#define KEY_TOP(id) (2ull << 62 | (id))
#define KEY_RULE(r, ret) (3ull << 62 | (uint64_t)(r) << 32 | (ret))

static void step_begin(gr_store *s)
{
    s->step_used = 0;
    if (++s->gen == 0) { /* wrapped: forget every stamp */
        if (s->step_gen)
            memset(s->step_gen, 0, (size_t)s->step_cap * sizeof *s->step_gen);
        s->gen = 1;
    }
}

static inline uint32_t hash_key(uint64_t k)
{
    return (uint32_t)((k * 0x9E3779B97F4A7C15ull) >> 32);
}

static int step_grow(gr_store *s)
{
    uint32_t cap = s->step_cap ? s->step_cap * 2 : 256;
    uint64_t *key = zse_malloc((size_t)cap * sizeof *key);
    uint32_t *val = zse_malloc((size_t)cap * sizeof *val), *gen = zse_calloc(cap, sizeof *gen);
    if (!key || !val || !gen) {
        free(key);
        free(val);
        free(gen);
        return -1;
    }
    for (uint32_t i = 0; i < s->step_cap; i++) {
        if (s->step_gen[i] != s->gen)
            continue;
        uint32_t h = hash_key(s->step_key[i]) & (cap - 1);
        while (gen[h] == s->gen)
            h = (h + 1) & (cap - 1);
        key[h] = s->step_key[i];
        val[h] = s->step_val[i];
        gen[h] = s->gen;
    }
    free(s->step_key);
    free(s->step_val);
    free(s->step_gen);
    s->step_key = key;
    s->step_val = val;
    s->step_gen = gen;
    s->step_cap = cap;
    return 0;
}

/* the slot of key k this step: *found tells whether it was there; -1 on failure */
static int64_t step_slot(gr_store *s, uint64_t k, bool *found)
{
    if ((s->step_used + 1) * 2 > s->step_cap && step_grow(s))
        return -1;
    uint32_t h = hash_key(k) & (s->step_cap - 1);
    while (s->step_gen[h] == s->gen) {
        if (s->step_key[h] == k) {
            *found = true;
            return h;
        }
        h = (h + 1) & (s->step_cap - 1);
    }
    *found = false;
    s->step_gen[h] = s->gen;
    s->step_key[h] = k;
    s->step_used++;
    return h;
}

/* a scratch node (elem, parent), one per pair within a step */
static int64_t scratch_node(gr_store *s, uint32_t elem, uint32_t parent)
{
    bool found;
    int64_t slot = step_slot(s, KEY_NODE(elem, parent), &found);
    if (slot < 0)
        return -1;
    if (found)
        return GR_SCRATCH | s->step_val[slot];
    if (s->n_scratch >= 0x7ffffff0u)
        return zse_fail("grammar: scratch stack space exhausted");
    if (gr_grow((void **)&s->scratch, &s->cap_scratch, s->n_scratch + 1, sizeof *s->scratch))
        return -1;
    s->scratch[s->n_scratch] = (gr_node){elem, parent};
    s->step_val[slot] = s->n_scratch;
    return GR_SCRATCH | s->n_scratch++;
}

static bool seen_before(gr_store *s, uint32_t rule, uint32_t ret)
{
    bool found = false;
    return step_slot(s, KEY_RULE(rule, ret), &found) >= 0 && found;
}

static int push_top(gr_store *s, gr_set *out, uint32_t id)
{
    bool found;
    if (step_slot(s, KEY_TOP(id), &found) < 0)
        return -1;
    if (found)
        return 0;
    if (out->n >= GR_MAX_TOPS)
        return zse_fail("grammar: more than %d parses are alive at once; the grammar is too ambiguous", GR_MAX_TOPS);
    if (gr_grow((void **)&out->tops, &out->cap, out->n + 1, sizeof *out->tops))
        return -1;
    out->tops[out->n++] = id;
    return 0;
}

static int close_rec(const zse_grammar *g, gr_store *s, uint32_t elem, uint32_t parent, gr_set *out)
{
    for (;;) {
        gr_elem e = g->elems[elem];
        if (e.kind == GE_CLASS) {
            int64_t id = scratch_node(s, elem, parent);
            return id < 0 ? -1 : push_top(s, out, (uint32_t)id);
        }
        if (e.kind == GE_END) {
            if (parent == GR_NIL) {
                out->accept = true;
                return 0;
            }
            if (parent == GR_BOTTOM) {
                out->escaped = true;
                return 0;
            }
            const gr_node *p = gr_node_at(s, parent);
            elem = p->elem;
            parent = p->parent;
            continue;
        }
        /* a rule: the frame below continues at elem+1, unless that is the end (tail call) */
        uint32_t ret = parent;
        if (g->elems[elem + 1].kind != GE_END) {
            int64_t id = scratch_node(s, elem + 1, parent);
            if (id < 0)
                return -1;
            ret = (uint32_t)id;
        }
        const gr_rule *r = &g->rules[e.arg];
        if (seen_before(s, e.arg, ret))
            return 0;
        for (uint32_t a = 0; a < r->n_alts; a++)
            if (close_rec(g, s, g->alt_start[r->first_alt + a], ret, out))
                return -1;
        return 0;
    }
}

int gr_close(const zse_grammar *g, gr_store *s, uint32_t elem, uint32_t parent, gr_set *out)
{
    step_begin(s);
    bool found;
    for (uint32_t i = 0; i < out->n; i++) /* tops already there stay unique */
        if (step_slot(s, KEY_TOP(out->tops[i]), &found) < 0)
            return -1;
    return close_rec(g, s, elem, parent, out);
}

int gr_advance(const zse_grammar *g, gr_store *s, const gr_set *in, uint8_t byte, gr_set *out)
{
    out->n = 0;
    out->accept = out->escaped = false;
    step_begin(s);
    for (uint32_t i = 0; i < in->n; i++) {
        const gr_node *n = gr_node_at(s, in->tops[i]);
        if (!gr_class_has(&g->classes[g->elems[n->elem].arg], byte))
            continue;
        uint32_t elem = n->elem + 1, parent = n->parent;
        if (close_rec(g, s, elem, parent, out))
            return -1;
    }
    return 0;
}

int gr_pop(const zse_grammar *g, gr_store *s, uint32_t id, gr_set *out)
{
    out->n = 0;
    out->accept = out->escaped = false;
    const gr_node *n = gr_node_at(s, id);
    if (n->parent == GR_NIL) {
        out->accept = true;
        return 0;
    }
    if (n->parent == GR_BOTTOM) {
        out->escaped = true;
        return 0;
    }
    const gr_node *p = gr_node_at(s, n->parent);
    return gr_close(g, s, p->elem, p->parent, out);
}

static int hash_grow(gr_store *s)
{
    uint32_t cap = s->hash_cap ? s->hash_cap * 2 : 1024;
    uint32_t *h = zse_calloc(cap, sizeof *h);
    if (!h)
        return -1;
    for (uint32_t i = 0; i < s->n_nodes; i++) {
        uint32_t k = hash2(s->nodes[i].elem, s->nodes[i].parent) & (cap - 1);
        while (h[k])
            k = (k + 1) & (cap - 1);
        h[k] = i + 1;
    }
    free(s->hash);
    s->hash = h;
    s->hash_cap = cap;
    return 0;
}

int64_t gr_persist(gr_store *s, uint32_t id)
{
    if (!(id & GR_SCRATCH) || id == GR_NIL || id == GR_BOTTOM)
        return id;
    gr_node n = s->scratch[id & ~GR_SCRATCH];
    int64_t parent = gr_persist(s, n.parent);
    if (parent < 0)
        return -1;
    if ((s->n_nodes + 1) * 2 > s->hash_cap && hash_grow(s))
        return -1;
    uint32_t k = hash2(n.elem, (uint32_t)parent) & (s->hash_cap - 1);
    while (s->hash[k]) {
        const gr_node *m = &s->nodes[s->hash[k] - 1];
        if (m->elem == n.elem && m->parent == (uint32_t)parent)
            return s->hash[k] - 1;
        k = (k + 1) & (s->hash_cap - 1);
    }
    if (s->n_nodes >= 0x7ffffff0u)
        return zse_fail("grammar: the matcher's stack store is full");
    if (gr_grow((void **)&s->nodes, &s->cap_nodes, s->n_nodes + 1, sizeof *s->nodes))
        return -1;
    s->nodes[s->n_nodes] = (gr_node){n.elem, (uint32_t)parent};
    s->hash[k] = s->n_nodes + 1;
    s->hash_used++;
    return s->n_nodes++;
}
