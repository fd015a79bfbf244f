/* A model's vocabulary for grammars: each token's bytes, the EOS ids, and a byte trie of
 * the tokens in depth-first preorder (node i's subtree is i+1 .. end-1), so a mask
 * computation walks the vocabulary once, sharing the work of common prefixes and skipping
 * every token under a prefix the grammar rejects. */
#include "grammar/grammar.h"

#include <stdlib.h>
#include <string.h>

void zse_grammar_vocab_free(zse_grammar_vocab *v)
{
    if (!v)
        return;
    if (v->bytes)
        for (int i = 0; i < v->n_vocab; i++)
            free(v->bytes[i]);
    free(v->bytes);
    free(v->lens);
    free(v->is_eos);
    free(v->eos);
    free(v->trie);
    free(v->dup_next);
    free(v);
}

int zse_grammar_vocab_size(const zse_grammar_vocab *v)
{
    return v->n_vocab;
}

int zse_grammar_mask_words(const zse_grammar_vocab *v)
{
    return (v->n_vocab + 31) / 32;
}

typedef struct {
    const uint8_t *bytes;
    uint32_t len;
    int32_t id;
} tok_ref;

static int cmp_tokens(const void *a, const void *b)
{
    const tok_ref *x = a, *y = b;
    int c = memcmp(x->bytes, y->bytes, x->len < y->len ? x->len : y->len);
    if (c)
        return c;
    if (x->len != y->len)
        return x->len < y->len ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

static int build_trie(zse_grammar_vocab *v)
{
    tok_ref *order = zse_malloc((size_t)(v->n_vocab ? v->n_vocab : 1) * sizeof *order);
    v->dup_next = zse_malloc((size_t)(v->n_vocab ? v->n_vocab : 1) * sizeof *v->dup_next);
    if (!order || !v->dup_next) {
        free(order);
        return -1;
    }
    int n = 0;
    size_t total = 0;
    for (int i = 0; i < v->n_vocab; i++) {
        v->dup_next[i] = -1;
        if (v->bytes[i] && v->lens[i] > 0 && !v->is_eos[i]) {
            if (v->lens[i] > 65535)
                return free(order), zse_fail("grammar vocabulary: token %d is longer than 65535 bytes", i);
            order[n++] = (tok_ref){v->bytes[i], v->lens[i], i};
            total += v->lens[i];
        }
    }
    qsort(order, (size_t)n, sizeof *order, cmp_tokens);
    v->trie = zse_malloc((total ? total : 1) * sizeof *v->trie);
    uint32_t *open = zse_malloc(65537 * sizeof *open); /* node index per depth on the current path */
    if (!v->trie || !open) {
        free(order);
        free(open);
        return -1;
    }
    uint32_t nn = 0, depth = 0;
    int32_t prev = -1;
    for (int k = 0; k < n; k++) {
        int32_t t = order[k].id;
        const uint8_t *b = v->bytes[t];
        uint32_t len = v->lens[t], lcp = 0;
        if (prev >= 0) {
            uint32_t pl = v->lens[prev];
            while (lcp < len && lcp < pl && v->bytes[prev][lcp] == b[lcp])
                lcp++;
            if (lcp == len && len == pl) { /* the same bytes as the previous token */
                int32_t last = prev;
                while (v->dup_next[last] >= 0)
                    last = v->dup_next[last];
                v->dup_next[last] = t;
                continue;
            }
        }
        while (depth > lcp) /* close the nodes this token does not share */
            v->trie[open[--depth]].end = nn;
        for (uint32_t d = lcp; d < len; d++) {
            v->trie[nn] = (gr_trie_node){.byte = b[d], .depth = (uint16_t)(d + 1), .end = 0, .token = -1};
            open[depth++] = nn++;
        }
        v->trie[open[len - 1]].token = t;
        prev = t;
    }
    while (depth > 0)
        v->trie[open[--depth]].end = nn;
    v->n_trie = nn;
    free(order);
    free(open);
    return 0;
}

zse_grammar_vocab *zse_grammar_vocab_new(int n_vocab, const uint8_t *const *bytes, const uint32_t *lens,
                                         const int32_t *eos, int n_eos)
{
    if (n_vocab < 1 || n_eos < 1) {
        zse_fail("grammar vocabulary: needs at least one token and one EOS id (got %d and %d)", n_vocab, n_eos);
        return NULL;
    }
    zse_grammar_vocab *v = zse_calloc(1, sizeof *v);
    if (!v)
        return NULL;
    v->n_vocab = n_vocab;
    v->bytes = zse_calloc((size_t)n_vocab, sizeof *v->bytes);
    v->lens = zse_calloc((size_t)n_vocab, sizeof *v->lens);
    v->is_eos = zse_calloc((size_t)n_vocab, sizeof *v->is_eos);
    v->eos = zse_malloc((size_t)n_eos * sizeof *v->eos);
    if (!v->bytes || !v->lens || !v->is_eos || !v->eos)
        goto fail;
    for (int i = 0; i < n_eos; i++) {
        if (eos[i] < 0 || eos[i] >= n_vocab) {
            zse_fail("grammar vocabulary: EOS id %d is outside the vocabulary of %d", eos[i], n_vocab);
            goto fail;
        }
        v->eos[i] = eos[i];
        v->is_eos[eos[i]] = true;
    }
    v->n_eos = n_eos;
    for (int i = 0; i < n_vocab; i++) {
        if (!bytes[i])
            continue;
        v->bytes[i] = zse_malloc(lens[i] ? lens[i] : 1);
        if (!v->bytes[i])
            goto fail;
        memcpy(v->bytes[i], bytes[i], lens[i]);
        v->lens[i] = lens[i];
    }
    if (build_trie(v))
        goto fail;
    return v;
fail:
    zse_error_prefix("building a grammar vocabulary");
    zse_grammar_vocab_free(v);
    return NULL;
}

zse_grammar_vocab *zse_grammar_vocab_from_tokenizer(const zse_tokenizer *tok, const int32_t *eos, int n_eos,
                                                    const char *const *allow_special, int n_allow)
{
    int n = zse_tokenizer_n_vocab(tok);
    if (n < 1) {
        zse_fail("grammar vocabulary: the tokenizer has no tokens");
        return NULL;
    }
    uint8_t **bytes = zse_calloc((size_t)n, sizeof *bytes);
    uint32_t *lens = zse_calloc((size_t)n, sizeof *lens);
    zse_buf buf = {0};
    zse_grammar_vocab *v = NULL;
    if (!bytes || !lens)
        goto out;
    for (int32_t i = 0; i < n; i++) {
        if (zse_tokenizer_is_special(tok, i)) {
            const char *text = zse_tokenizer_token_text(tok, i);
            bool allowed = false;
            for (int k = 0; k < n_allow && text && !allowed; k++)
                allowed = !strcmp(text, allow_special[k]);
            if (!allowed)
                continue; /* never matches */
        }
        buf.len = 0;
        if (zse_tokenizer_token_bytes(tok, i, &buf))
            continue; /* an id with no token (a hole in the vocabulary) */
        bytes[i] = zse_malloc(buf.len ? buf.len : 1);
        if (!bytes[i])
            goto out;
        memcpy(bytes[i], buf.data, buf.len);
        lens[i] = (uint32_t)buf.len;
    }
    v = zse_grammar_vocab_new(n, (const uint8_t *const *)bytes, lens, eos, n_eos);
out:
    if (bytes)
        for (int i = 0; i < n; i++)
            free(bytes[i]);
    free(bytes);
    free(lens);
    zse_buf_free(&buf);
    return v;
}
