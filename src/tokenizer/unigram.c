/* unigram.c — the Unigram model (T5, ALBERT, XLNet, mT5, XLM-R vocabularies), exactly as
 * Hugging Face `tokenizers` runs it: each piece of text is cut into the vocabulary pieces
 * whose scores (log probabilities) add up highest — SentencePiece's Viterbi over a lattice
 * of every vocabulary piece that starts at every character. A character no piece of one
 * character covers is unknown and scores the lowest score less 10. Unknown characters next
 * to each other fuse into one token: their text if that is a piece, else their bytes as
 * <0xNN> tokens with byte_fallback, else the unk id.
 *
 * Ties go to the first candidate, which is the longest piece ending at a position (the
 * candidates arrive by start position, left to right), as HF's encode_optimized has it. */
#include "tokenizer/tokenizer_internal.h"

#include <math.h>

#define UNK_PENALTY 10.0 /* HF's K_UNK_PENALTY */

/* ---- the piece trie --------------------------------------------------------------------- */

static int32_t trie_new_node(piece_trie *tr, uint8_t byte)
{
    if (tr->n == tr->cap) {
        size_t cap = tr->cap ? tr->cap * 2 : 1024;
        trie_node *v = zse_realloc(tr->v, cap * sizeof *v);
        if (!v)
            return -1;
        tr->v = v;
        tr->cap = cap;
    }
    if (tr->n >= INT32_MAX)
        return zse_fail("tokenizer.json: Unigram vocabulary too large for its trie");
    tr->v[tr->n] = (trie_node){-1, -1, -1, byte};
    return (int32_t)tr->n++;
}

/* the child of `node` (-1: the root) for `byte`, -1 when none */
static int32_t trie_next(const piece_trie *tr, int32_t node, uint8_t byte)
{
    if (node < 0)
        return tr->root[byte];
    for (int32_t k = tr->v[node].child; k >= 0; k = tr->v[k].sibling)
        if (tr->v[k].byte == byte)
            return k;
    return -1;
}

/* the child of `node` for `byte`, created when absent */
static int32_t trie_child(piece_trie *tr, int32_t node, uint8_t byte)
{
    int32_t k = trie_next(tr, node, byte);
    if (k >= 0 || (k = trie_new_node(tr, byte)) < 0)
        return k;
    if (node < 0) {
        tr->root[byte] = k;
    } else {
        tr->v[k].sibling = tr->v[node].child;
        tr->v[node].child = k;
    }
    return k;
}

/* a later piece with the same text replaces an earlier one, as HF's token_to_ids map does */
static int trie_insert(piece_trie *tr, const char *s, int32_t id)
{
    size_t n = strlen(s);
    int32_t node = -1;
    for (size_t i = 0; i < n; i++)
        if ((node = trie_child(tr, node, (uint8_t)s[i])) < 0)
            return -1;
    if (node >= 0)
        tr->v[node].id = id;
    return 0;
}

void tok_trie_free(piece_trie *tr)
{
    free(tr->v);
    memset(tr, 0, sizeof *tr);
}

/* ---- loading ------------------------------------------------------------------------------ */

/* "vocab": [[piece, score], ...] — the id is the position */
int tok_unigram_count(const json_t *model, int *n_vocab)
{
    json_t *vocab = json_object_get(model, "vocab");
    if (!json_is_array(vocab))
        return zse_fail("tokenizer.json: the Unigram model's vocab is not a list of [piece, score]");
    if (json_array_size(vocab) == 0 || json_array_size(vocab) >= (1u << 24))
        return zse_fail("tokenizer.json: the Unigram model has %zu pieces", json_array_size(vocab));
    *n_vocab = (int)json_array_size(vocab);
    return 0;
}

/* the pieces into t->vocab, their scores, the trie, unk_id and byte_fallback */
int tok_unigram_load(zse_tokenizer *t, const json_t *model)
{
    json_t *vocab = json_object_get(model, "vocab");
    size_t n = json_array_size(vocab);
    t->scores = zse_calloc((size_t)t->n_vocab, sizeof *t->scores);
    if (!t->scores)
        return -1;
    for (int b = 0; b < 256; b++)
        t->trie.root[b] = -1;
    t->min_score = INFINITY;
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_array_get(vocab, i), *piece = json_array_get(e, 0), *score = json_array_get(e, 1);
        if (json_array_size(e) != 2 || !json_is_string(piece) || !json_is_number(score))
            return zse_fail("tokenizer.json: Unigram vocab entry %zu is not [piece, score]", i);
        const char *s = json_string_value(piece);
        if (!tok_utf8_valid(s, strlen(s)))
            return zse_fail("tokenizer.json: Unigram piece %zu is not valid UTF-8", i);
        if (!t->vocab[i] && !(t->vocab[i] = zse_strdup(s)))
            return -1;
        t->scores[i] = json_number_value(score);
        if (t->scores[i] < t->min_score)
            t->min_score = t->scores[i];
        if (*s && trie_insert(&t->trie, s, (int32_t)i))
            return -1;
    }
    json_t *unk = json_object_get(model, "unk_id");
    if (json_is_integer(unk)) {
        if (json_integer_value(unk) < 0 || (size_t)json_integer_value(unk) >= n)
            return zse_fail("tokenizer.json: Unigram unk_id %lld is not a piece", (long long)json_integer_value(unk));
        t->unk_id = (int32_t)json_integer_value(unk);
    }
    t->byte_fallback = json_is_true(json_object_get(model, "byte_fallback"));
    return 0;
}

/* ---- encoding ------------------------------------------------------------------------------ */

static int reserve_lattice(enc_state *st, size_t n)
{
    if (n <= st->ug_cap)
        return 0;
    size_t cap = st->ug_cap ? st->ug_cap : 64;
    while (cap < n)
        cap *= 2;
    double *s = zse_realloc(st->ug_score, cap * sizeof *s);
    if (!s)
        return -1;
    st->ug_score = s;
    int32_t *f = zse_realloc(st->ug_from, cap * sizeof *f);
    if (!f)
        return -1;
    st->ug_from = f;
    int32_t *d = zse_realloc(st->ug_id, cap * sizeof *d);
    if (!d)
        return -1;
    st->ug_id = d;
    st->ug_cap = cap;
    return 0;
}

/* a candidate: piece `id` over [from, to) whose path scores `score` */
static void offer(enc_state *st, size_t from, size_t to, int32_t id, double score)
{
    if (st->ug_from[to] < 0 || score > st->ug_score[to]) {
        st->ug_score[to] = score;
        st->ug_from[to] = (int32_t)from;
        st->ug_id[to] = id;
    }
}

/* the best path to every character boundary of w */
static int best_paths(const zse_tokenizer *t, enc_state *st, const char *w, size_t n)
{
    double unk_score = t->min_score - UNK_PENALTY;
    for (size_t i = 0; i <= n; i++)
        st->ug_from[i] = -1;
    st->ug_score[0] = 0.0;
    for (size_t at = 0; at < n;) {
        double till_here = st->ug_score[at];
        size_t mblen = tok_utf8_char_len((unsigned char)w[at]);
        if (mblen > n - at)
            mblen = n - at;
        bool single = false;
        int32_t node = -1;
        for (size_t k = at; k < n; k++) {
            if ((node = trie_next(&t->trie, node, (uint8_t)w[k])) < 0)
                break;
            int32_t id = t->trie.v[node].id;
            if (id < 0)
                continue;
            size_t len = k + 1 - at;
            offer(st, at, k + 1, id, t->scores[id] + till_here);
            single = single || len == mblen;
        }
        if (!single) {
            if (t->unk_id < 0)
                return zse_fail("Unigram: \"%.*s\" is unknown and the model has no unk_id", (int)mblen, w + at);
            offer(st, at, at + mblen, t->unk_id, unk_score + till_here);
        }
        at += mblen;
    }
    return 0;
}

/* the ids of a run of unknown characters w[a..b), pushed last first (the caller reverses) */
static int push_unknown_run(const zse_tokenizer *t, enc_state *st, const char *w, size_t a, size_t b)
{
    int32_t id = tok_str_map_get(&t->ids, w + a, b - a);
    if (id >= 0)
        return tok_ids_push(&st->out, id);
    if (t->byte_fallback) {
        bool all = true;
        for (size_t i = a; i < b && all; i++)
            all = t->byte_ids[(unsigned char)w[i]] >= 0;
        if (all) {
            for (size_t i = b; i-- > a;)
                if (tok_ids_push(&st->out, t->byte_ids[(unsigned char)w[i]]))
                    return -1;
            return 0;
        }
    }
    return tok_ids_push(&st->out, t->unk_id);
}

int tok_unigram_word(const zse_tokenizer *t, enc_state *st, const char *w, size_t n)
{
    if (!n)
        return 0;
    if (n >= INT32_MAX)
        return zse_fail("a %zu-byte piece is too long to encode", n);
    if (reserve_lattice(st, n + 1) || best_paths(t, st, w, n))
        return -1;
    size_t before = st->out.n, end = n, run_end = 0;
    bool in_run = false;
    while (end > 0) {
        size_t from = (size_t)st->ug_from[end];
        int32_t id = st->ug_id[end];
        if (id == t->unk_id) { /* fused with its unknown neighbours */
            if (!in_run)
                run_end = end;
            in_run = true;
        } else {
            if (in_run && push_unknown_run(t, st, w, end, run_end))
                return -1;
            in_run = false;
            if (tok_ids_push(&st->out, id))
                return -1;
        }
        end = from;
    }
    if (in_run && push_unknown_run(t, st, w, 0, run_end))
        return -1;
    for (size_t i = before, j = st->out.n; i + 1 < j; i++, j--) {
        int32_t tmp = st->out.v[i];
        st->out.v[i] = st->out.v[j - 1];
        st->out.v[j - 1] = tmp;
    }
    return 0;
}
