/* encode.c — text to ids: invalid UTF-8 → U+FFFD; added tokens that match the raw text
 * are split out → each remaining span is normalized → added tokens that match normalized
 * text are split out → pre-tokenizers cut the rest into pieces → the BPE model merges each
 * piece by rank → ids; the post-processor's tokens go around the whole (add_special). */
#include "tokenizer/tokenizer_internal.h"

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
int tok_grow_jit_stack(enc_state *st)
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
    free(st->ug_score);
    free(st->ug_from);
    free(st->ug_id);
    zse_buf_free(&st->piece);
}

int tok_spans_push(spans *s, size_t a, size_t b)
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

int tok_ids_push(id_vec *v, int32_t id)
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
    if (nx >= 0 && tok_pair_get(&t->merges, sy[pos].id, sy[nx].id, &rank, &merged))
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
        if (!tok_pair_get(&t->merges, c.left, c.right, &rank, &merged))
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
        if (tok_ids_push(&st->out, sy[k].id))
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
    int32_t id = tok_str_map_get(&t->ids, s, sl);
    size_t l;
    if (id >= 0) {
        if (*pending_unk) {
            st->sy[(*ns)++] = (sym){t->unk_id, -1, 0, 0};
            *pending_unk = false;
        }
        st->sy[(*ns)++] = (sym){id, s == c ? tok_cp_at(c, cl, 0, &l) : -1, 0, 0};
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
        if (a >= 0 && b >= 0 && !tok_cp_pairs_has(&t->joined, a, b)) {
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
        utf8proc_ssize_t el = utf8proc_encode_char((utf8proc_int32_t)tok_cp_of_byte[(unsigned char)w[i]], enc);
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
        st->sy[i] = (sym){id, (int32_t)tok_cp_of_byte[(unsigned char)w[i]], 0, 0};
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
        int32_t whole = tok_str_map_get(&t->ids, word, wn);
        if (whole >= 0)
            return tok_ids_push(&st->out, whole);
        if (t->byte_level && byte_symbols(t, st, w, n, &ns))
            return merge_word(t, st, ns);
    }
    if (ns)
        return merge_word(t, st, ns);
    zse_buf tmp = {0};
    bool pending_unk = false;
    int rc = reserve_syms(st, wn + 2);
    for (size_t i = 0; i < wn && rc == 0;) {
        size_t cl = tok_utf8_char_len((unsigned char)word[i]);
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

/* one pre-tokenized piece through the model. Unigram and WordPiece see a byte-level
 * piece in GPT-2's alphabet, as HF's ByteLevel pre-tokenizer leaves it (BPE maps bytes
 * itself, from a table where it can). */
static int model_word(const zse_tokenizer *t, enc_state *st, const char *w, size_t n)
{
    if (t->model == MODEL_BPE)
        return bpe_word(t, st, w, n);
    if (t->byte_level) {
        if (map_bytes(st, w, n))
            return -1;
        w = st->mapped.data;
        n = st->mapped.len;
    }
    return t->model == MODEL_UNIGRAM ? tok_unigram_word(t, st, w, n) : tok_wordpiece_word(t, st, w, n);
}

/* ---- encoding ------------------------------------------------------------------------- */

typedef struct {
    size_t start, end; /* what the token takes from the text, stripped whitespace included */
    int32_t id;
} added_hit;

static bool single_word_ok(const char *s, size_t n, size_t a, size_t b)
{
    size_t l;
    return (a == 0 || !tok_is_word_char(tok_cp_before(s, a, &l))) && (b == n || !tok_is_word_char(tok_cp_at(s, n, b, &l)));
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
            while (start > from && tok_is_white_space(tok_cp_before(s, start, &l)))
                start -= l;
        if (a->rstrip)
            while (end < n && tok_is_white_space(tok_cp_at(s, n, end, &l)))
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
        return model_word(t, st, w, n);
    if (!st->cache && !(st->cache = zse_calloc(CACHE_SLOTS, sizeof *st->cache)))
        return -1;
    uint64_t h = zse_hash64(w, n) | 1;
    size_t i = (size_t)h & (CACHE_SLOTS - 1);
    for (; st->cache[i].hash; i = (i + 1) & (CACHE_SLOTS - 1)) {
        const struct cache_slot *c = &st->cache[i];
        if (c->hash == h && c->text_len == n && memcmp(st->cache_text.data + c->text_at, w, n) == 0) {
            for (uint32_t k = 0; k < c->ids_len; k++)
                if (tok_ids_push(&st->out, st->cache_ids.v[c->ids_at + k]))
                    return -1;
            return 0;
        }
    }
    size_t before = st->out.n;
    if (model_word(t, st, w, n))
        return -1;
    if (st->cache_used >= CACHE_SLOTS / 2)
        return 0;
    struct cache_slot c = {h, (uint32_t)st->cache_text.len, (uint32_t)n, (uint32_t)st->cache_ids.n,
                           (uint32_t)(st->out.n - before)};
    if (zse_buf_append(&st->cache_text, w, n))
        return -1;
    for (size_t k = before; k < st->out.n; k++)
        if (tok_ids_push(&st->cache_ids, st->out.v[k]))
            return -1;
    st->cache[i] = c;
    st->cache_used++;
    return 0;
}

static int model_pieces(const zse_tokenizer *t, enc_state *st, const char *text, size_t n, bool first)
{
    if (!n)
        return 0;
    if (tok_pre_tokenize(t, st, text, n, first))
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
    if (zse_buf_append(&norm, text, n) || tok_normalize(t, &norm)) {
        zse_buf_free(&norm);
        return -1;
    }
    const char *s = zse_buf_str(&norm);
    size_t len = norm.len, from = 0;
    added_hit hit;
    int rc = 0;
    while (rc == 0 && from < len && next_added(t, s, len, from, true, parse_special, &hit)) {
        rc = model_pieces(t, st, s + from, hit.start - from, at_start && from == 0) || tok_ids_push(&st->out, hit.id);
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
    if (rc == 0 && !tok_utf8_valid(text, len)) { /* as Python's decode(errors="replace") */
        rc = tok_utf8_lossy(text, len, &clean);
        s = clean.data;
        len = clean.len;
    }
    for (int k = 0; k < t->n_prefix && add_special && rc == 0; k++)
        rc = tok_ids_push(&st.out, t->prefix_ids[k]);
    size_t from = 0;
    added_hit hit;
    while (rc == 0 && from < len && next_added(t, s, len, from, false, parse_special, &hit)) {
        rc = (hit.start > from && encode_span(t, &st, s + from, hit.start - from, from == 0, parse_special)) ||
             tok_ids_push(&st.out, hit.id);
        from = hit.end;
    }
    if (rc == 0 && from < len)
        rc = encode_span(t, &st, s + from, len - from, from == 0, parse_special);
    for (int k = 0; k < t->n_suffix && add_special && rc == 0; k++)
        rc = tok_ids_push(&st.out, t->suffix_ids[k]);
    if (rc == 0 && !st.out.v) { /* an empty result is still an allocation the caller frees */
        rc = tok_ids_push(&st.out, 0);
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

