/* The matcher: one per sequence. Holds the current set of stacks (persistent nodes of its
 * own store), a bounded history of earlier sets for rollback, and work sets. */
#include "grammar/grammar.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    uint32_t *tops;
    uint32_t n;
    bool accept, ended;
} snapshot;

struct zse_matcher {
    zse_grammar *g;
    gr_store s;
    gr_set state; /* persistent ids */
    bool ended;
    snapshot *hist; /* ring of max_rollback states before each step */
    int max_rollback, n_hist, hist_next;
    gr_set work[2], pop;
    gr_set *walk;    /* per depth of an uncertain token's rest */
    uint32_t *walk_mark;
    uint32_t n_walk;
    uint32_t *seen_elems;
    uint32_t n_seen_elems, cap_seen_elems;
};

static int initial_state(zse_matcher *m)
{
    const zse_grammar *g = m->g;
    const gr_rule *r = &g->rules[g->root];
    gr_set *out = &m->work[0];
    out->n = 0;
    out->accept = out->escaped = false;
    for (uint32_t a = 0; a < r->n_alts; a++)
        if (gr_close(g, &m->s, g->alt_start[r->first_alt + a], GR_NIL, out))
            return -1;
    m->state.n = 0;
    m->state.accept = out->accept;
    for (uint32_t i = 0; i < out->n; i++) {
        int64_t id = gr_persist(&m->s, out->tops[i]);
        if (id < 0 || gr_set_push(&m->state, (uint32_t)id))
            return -1;
    }
    m->s.n_scratch = 0;
    m->ended = false;
    return 0;
}

zse_matcher *zse_matcher_new(zse_grammar *g, int max_rollback)
{
    if (!g || max_rollback < 0) {
        zse_fail("grammar matcher: needs a grammar and max_rollback >= 0");
        return NULL;
    }
    zse_matcher *m = zse_calloc(1, sizeof *m);
    if (!m)
        return NULL;
    m->g = zse_grammar_retain(g);
    gr_store_init(&m->s);
    m->max_rollback = max_rollback;
    if (max_rollback && !(m->hist = zse_calloc((size_t)max_rollback, sizeof *m->hist)))
        goto fail;
    if (initial_state(m))
        goto fail;
    return m;
fail:
    zse_error_prefix("starting a grammar matcher");
    zse_matcher_free(m);
    return NULL;
}

void zse_matcher_free(zse_matcher *m)
{
    if (!m)
        return;
    for (int i = 0; i < m->max_rollback && m->hist; i++)
        free(m->hist[i].tops);
    free(m->hist);
    gr_set_free(&m->state);
    gr_set_free(&m->work[0]);
    gr_set_free(&m->work[1]);
    gr_set_free(&m->pop);
    for (uint32_t i = 0; i < m->n_walk; i++)
        gr_set_free(&m->walk[i]);
    free(m->walk);
    free(m->walk_mark);
    free(m->seen_elems);
    gr_store_free(&m->s);
    zse_grammar_release(m->g);
    free(m);
}

void zse_matcher_reset(zse_matcher *m)
{
    gr_store_clear(&m->s);
    m->n_hist = 0;
    if (initial_state(m)) /* cannot fail after a first success but for memory */
        m->state.n = 0;
}

bool zse_matcher_can_end(const zse_matcher *m)
{
    return !m->ended && m->state.accept;
}

bool zse_matcher_must_end(const zse_matcher *m)
{
    return !m->ended && m->state.accept && m->state.n == 0;
}

bool zse_matcher_ended(const zse_matcher *m)
{
    return m->ended;
}

/* advances `start` over bytes; the result (in a work set, scratch nodes) or NULL when dead */
static const gr_set *run_bytes(zse_matcher *m, const gr_set *start, const uint8_t *b, size_t n, int *err)
{
    const gr_set *in = start;
    for (size_t i = 0; i < n; i++) {
        if (in->n == 0)
            return NULL;
        gr_set *out = &m->work[i & 1];
        if (gr_advance(m->g, &m->s, in, b[i], out)) {
            *err = -1;
            return NULL;
        }
        in = out;
    }
    return in->n || in->accept ? in : NULL;
}

static int save_history(zse_matcher *m)
{
    if (!m->max_rollback)
        return 0;
    snapshot *h = &m->hist[m->hist_next];
    uint32_t *tops = zse_realloc(h->tops, (size_t)(m->state.n ? m->state.n : 1) * sizeof *tops);
    if (!tops)
        return -1;
    h->tops = tops;
    if (m->state.n)
        memcpy(tops, m->state.tops, (size_t)m->state.n * sizeof *tops);
    h->n = m->state.n;
    h->accept = m->state.accept;
    h->ended = m->ended;
    m->hist_next = (m->hist_next + 1) % m->max_rollback;
    if (m->n_hist < m->max_rollback)
        m->n_hist++;
    return 0;
}

static int step_bytes(zse_matcher *m, const uint8_t *b, size_t n)
{
    int err = 0;
    if (m->ended)
        return 1;
    const gr_set *r = run_bytes(m, &m->state, b, n, &err);
    if (!r) {
        m->s.n_scratch = 0;
        return err ? -1 : 1;
    }
    if (save_history(m))
        return -1;
    /* the new tops become persistent; state is rebuilt from them */
    gr_set next = {0};
    next.accept = r->accept;
    for (uint32_t i = 0; i < r->n; i++) {
        int64_t id = gr_persist(&m->s, r->tops[i]);
        if (id < 0 || gr_set_push(&next, (uint32_t)id)) {
            gr_set_free(&next);
            m->s.n_scratch = 0;
            return -1;
        }
    }
    m->s.n_scratch = 0;
    gr_set_free(&m->state);
    m->state = next;
    return 0;
}

int zse_matcher_accept_token(zse_matcher *m, int32_t id)
{
    const zse_grammar_vocab *v = m->g->vocab;
    if (id < 0 || id >= v->n_vocab)
        return zse_fail("grammar matcher: token %d is outside the vocabulary of %d", id, v->n_vocab);
    if (m->ended)
        return 1;
    if (v->is_eos[id]) {
        if (!m->state.accept)
            return 1;
        if (save_history(m))
            return -1;
        m->ended = true;
        return 0;
    }
    if (!v->bytes[id] || v->lens[id] == 0)
        return 1;
    return step_bytes(m, v->bytes[id], v->lens[id]);
}

int zse_matcher_accept_bytes(zse_matcher *m, const void *bytes, size_t n)
{
    if (n == 0)
        return m->ended ? 1 : 0;
    return step_bytes(m, bytes, n);
}

int zse_matcher_rollback(zse_matcher *m, int k)
{
    if (k < 0 || k > m->n_hist)
        return zse_fail("grammar matcher: cannot roll back %d steps (%d kept)", k, m->n_hist);
    if (k == 0)
        return 0;
    int idx = ((m->hist_next - k) % m->max_rollback + m->max_rollback) % m->max_rollback;
    snapshot *h = &m->hist[idx];
    m->state.n = 0;
    for (uint32_t i = 0; i < h->n; i++)
        if (gr_set_push(&m->state, h->tops[i]))
            return -1;
    m->state.accept = h->accept;
    m->ended = h->ended;
    m->n_hist -= k;
    m->hist_next = idx;
    return 0;
}

static void set_eos(const zse_grammar_vocab *v, uint32_t *mask)
{
    for (int i = 0; i < v->n_eos; i++)
        mask[v->eos[i] >> 5] |= 1u << (v->eos[i] & 31);
}

static bool elem_seen(zse_matcher *m, uint32_t elem)
{
    for (uint32_t i = 0; i < m->n_seen_elems; i++)
        if (m->seen_elems[i] == elem)
            return true;
    if (m->n_seen_elems == m->cap_seen_elems) {
        uint32_t cap = m->cap_seen_elems ? m->cap_seen_elems * 2 : 16;
        uint32_t *p = zse_realloc(m->seen_elems, cap * sizeof *p);
        if (!p)
            return false; /* only costs a repeated OR */
        m->seen_elems = p;
        m->cap_seen_elems = cap;
    }
    m->seen_elems[m->n_seen_elems++] = elem;
    return false;
}

static int walk_depth(zse_matcher *m, uint32_t need)
{
    if (need <= m->n_walk)
        return 0;
    gr_set *w = zse_realloc(m->walk, need * sizeof *w);
    if (!w)
        return -1;
    m->walk = w;
    uint32_t *mk = zse_realloc(m->walk_mark, need * sizeof *mk);
    if (!mk)
        return -1;
    m->walk_mark = mk;
    memset(m->walk + m->n_walk, 0, (need - m->n_walk) * sizeof *w);
    m->n_walk = need;
    return 0;
}

/* The uncertain tokens of one top: those that left the frame at an offset continue from
 * the real stack below it (the pop set); sorted by that rest, they are walked as a trie,
 * sharing the sets of common prefixes and skipping every rest under a dead prefix. */
static int check_uncertain(zse_matcher *m, const gr_pos_cache *c, uint32_t top, uint32_t *mask)
{
    const zse_grammar *g = m->g;
    const zse_grammar_vocab *v = g->vocab;
    if (!c->n_uncertain)
        return 0;
    m->s.n_scratch = 0;
    gr_set one = {.tops = &top, .n = 1, .cap = 1};
    for (uint32_t k = 0; k < c->n_whole; k++) { /* left the frame more than once: whole */
        int32_t id = c->uncertain_ids[k];
        if (mask[id >> 5] >> (id & 31) & 1)
            continue;
        int err = 0;
        const gr_set *r = run_bytes(m, &one, v->bytes[id], v->lens[id], &err);
        if (err)
            return -1;
        if (r)
            mask[id >> 5] |= 1u << (id & 31);
        m->s.n_scratch = 0;
    }
    if (c->n_whole == c->n_uncertain)
        return 0;
    if (walk_depth(m, 1) || gr_pop(g, &m->s, top, &m->walk[0]))
        return -1;
    m->walk_mark[0] = m->s.n_scratch;
    uint32_t valid = 0, dead_at = UINT32_MAX;
    for (uint32_t k = c->n_whole; k < c->n_uncertain; k++) {
        int32_t id = c->uncertain_ids[k];
        uint32_t from = c->uncertain_from[k], len = v->lens[id] - from;
        const uint8_t *rest = v->bytes[id] + from;
        uint32_t share = c->uncertain_lcp[k] < valid ? c->uncertain_lcp[k] : valid;
        if (mask[id >> 5] >> (id & 31) & 1) {
            valid = share; /* not walked: the sets beyond the shared part are stale */
            if (dead_at > valid)
                dead_at = UINT32_MAX;
            continue;
        }
        if (dead_at <= share)
            continue; /* a prefix it shares is already dead */
        dead_at = UINT32_MAX;
        if (walk_depth(m, len + 1))
            return -1;
        bool alive = true;
        for (uint32_t d = share + 1; d <= len; d++) {
            m->s.n_scratch = m->walk_mark[d - 1];
            if (gr_advance(g, &m->s, &m->walk[d - 1], rest[d - 1], &m->walk[d]))
                return -1;
            m->walk_mark[d] = m->s.n_scratch;
            valid = d;
            if (m->walk[d].n == 0 && !(d == len && m->walk[d].accept)) {
                dead_at = d;
                alive = false;
                break;
            }
        }
        if (share == len) /* the same rest as a token already walked */
            alive = m->walk[len].n > 0 || m->walk[len].accept;
        if (alive)
            mask[id >> 5] |= 1u << (id & 31);
    }
    m->s.n_scratch = 0;
    return 0;
}

int zse_matcher_fill_mask(zse_matcher *m, uint32_t *mask)
{
    const zse_grammar *g = m->g;
    const zse_grammar_vocab *v = g->vocab;
    int words = zse_grammar_mask_words(v);
    memset(mask, 0, (size_t)words * sizeof *mask);
    if (m->ended || (m->state.n == 0 && m->state.accept)) {
        set_eos(v, mask);
        return v->n_eos;
    }
    m->n_seen_elems = 0;
    for (uint32_t t = 0; t < m->state.n; t++) {
        uint32_t top = m->state.tops[t];
        uint32_t elem = m->s.nodes[top].elem;
        const gr_pos_cache *c = gr_cache_get(g, elem);
        if (!c)
            return -1;
        if (!elem_seen(m, elem)) {
            if (c->accepted_bits) {
                for (int w = 0; w < words; w++)
                    mask[w] |= c->accepted_bits[w];
            } else {
                for (uint32_t k = 0; k < c->n_accepted; k++)
                    mask[c->accepted_ids[k] >> 5] |= 1u << (c->accepted_ids[k] & 31);
            }
        }
        if (!c->n_uncertain)
            continue;
        if (check_uncertain(m, c, top, mask))
            return -1;
    }
    if (m->state.accept)
        set_eos(v, mask);
    int count = 0, w = 0;
    for (; w + 1 < words; w += 2) { /* SWAR over 64 bits: no popcnt instruction assumed */
        uint64_t x = (uint64_t)mask[w] | (uint64_t)mask[w + 1] << 32;
        x = x - ((x >> 1) & 0x5555555555555555ull);
        x = (x & 0x3333333333333333ull) + ((x >> 2) & 0x3333333333333333ull);
        count += (int)((((x + (x >> 4)) & 0x0F0F0F0F0F0F0F0Full) * 0x0101010101010101ull) >> 56);
    }
    for (; w < words; w++)
        for (uint32_t x = mask[w]; x; x &= x - 1)
            count++;
    return count;
}

int zse_matcher_forced_bytes(zse_matcher *m, zse_buf *out, size_t max)
{
    if (m->ended)
        return 0;
    const gr_set *cur = &m->state;
    size_t n = 0;
    int rc = 0;
    while (n < max && cur->n && !cur->accept) {
        gr_class u = {{0}};
        for (uint32_t i = 0; i < cur->n; i++) {
            const gr_class *c = &m->g->classes[m->g->elems[gr_node_at(&m->s, cur->tops[i])->elem].arg];
            for (int w = 0; w < 4; w++)
                u.bits[w] |= c->bits[w];
        }
        int count = 0, byte = -1;
        for (int w = 0; w < 4; w++) {
            count += __builtin_popcountll(u.bits[w]);
            if (u.bits[w] && byte < 0)
                byte = w * 64 + __builtin_ctzll(u.bits[w]);
        }
        if (count != 1)
            break;
        uint8_t b = (uint8_t)byte;
        if (zse_buf_append(out, &b, 1)) {
            rc = -1;
            break;
        }
        gr_set *next = &m->work[n & 1];
        if (gr_advance(m->g, &m->s, cur, b, next)) {
            rc = -1;
            break;
        }
        cur = next;
        n++;
    }
    m->s.n_scratch = 0;
    return rc;
}
