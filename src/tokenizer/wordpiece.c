/* wordpiece.c — the WordPiece model (BERT and its descendants), exactly as Hugging Face
 * `tokenizers` runs it: each word is cut greedily from the left into the longest
 * vocabulary strings, every piece after the first carrying continuing_subword_prefix
 * ("##"). A word longer than max_input_chars_per_word characters, or one with a part no
 * vocabulary string covers, is the unk token as a whole. */
#include "tokenizer/tokenizer_internal.h"

int tok_wordpiece_load(zse_tokenizer *t, const json_t *model)
{
    json_t *max = json_object_get(model, "max_input_chars_per_word");
    t->max_input_chars = 100; /* HF's default */
    if (json_is_integer(max)) {
        if (json_integer_value(max) < 0)
            return zse_fail("tokenizer.json: WordPiece max_input_chars_per_word is negative");
        t->max_input_chars = json_integer_value(max) > INT32_MAX ? INT32_MAX : (int)json_integer_value(max);
    }
    if (!json_object_get(model, "continuing_subword_prefix") && !(t->subword_prefix = zse_strdup("##")))
        return -1;
    for (int i = 0; i < t->n_vocab; i++) {
        size_t l = t->vocab[i] ? strlen(t->vocab[i]) : 0;
        if (l > t->max_piece_len)
            t->max_piece_len = l;
    }
    return 0;
}

static int push_unk(const zse_tokenizer *t, enc_state *st, const char *w, size_t n)
{
    if (t->unk_id < 0)
        return zse_fail("WordPiece: \"%.*s\" is unknown and the model has no unk_token", (int)(n > 40 ? 40 : n), w);
    return tok_ids_push(&st->out, t->unk_id);
}

/* the longest vocabulary string at w[start..n) (with the prefix after the first piece):
 * its id and end, or -1. Candidates longer than the longest vocabulary string are skipped
 * without a look-up (none can match), which keeps a long word linear in its length. */
static int32_t longest_piece(const zse_tokenizer *t, enc_state *st, const char *w, size_t n, size_t start,
                             size_t *end_out)
{
    const char *prefix = start > 0 && t->subword_prefix ? t->subword_prefix : "";
    size_t plen = strlen(prefix);
    if (plen >= t->max_piece_len)
        return -1;
    size_t end = n - start > t->max_piece_len - plen ? start + (t->max_piece_len - plen) : n;
    while (end > start && end < n && ((unsigned char)w[end] & 0xC0) == 0x80)
        end--; /* a candidate ends between characters */
    while (end > start) {
        st->piece.len = 0;
        if (zse_buf_append(&st->piece, prefix, plen) || zse_buf_append(&st->piece, w + start, end - start))
            return -2;
        int32_t id = tok_str_map_get(&t->ids, st->piece.data, st->piece.len);
        if (id >= 0) {
            *end_out = end;
            return id;
        }
        size_t cl;
        tok_cp_before(w, end, &cl);
        end -= cl;
    }
    return -1;
}

int tok_wordpiece_word(const zse_tokenizer *t, enc_state *st, const char *w, size_t n)
{
    if (!n)
        return 0;
    size_t chars = 0;
    for (size_t i = 0; i < n; i++)
        chars += ((unsigned char)w[i] & 0xC0) != 0x80;
    if (chars > (size_t)t->max_input_chars)
        return push_unk(t, st, w, n);
    size_t before = st->out.n, start = 0;
    while (start < n) {
        size_t end = start;
        int32_t id = longest_piece(t, st, w, n, start, &end);
        if (id == -2)
            return -1;
        if (id < 0) { /* a part nothing covers: the whole word is unknown */
            st->out.n = before;
            return push_unk(t, st, w, n);
        }
        if (tok_ids_push(&st->out, id))
            return -1;
        start = end;
    }
    return 0;
}
