/* decode.c — ids to text: token strings through the decoder steps (ByteLevel, Replace,
 * ByteFallback, Fuse, Strip, Metaspace), one token's bytes, and the streaming
 * detokenizer. */
#include "tokenizer/tokenizer_internal.h"

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
            int32_t cp = tok_cp_at(s, n, i, &cl);
            mapped = cp >= 0 && cp < 512 && tok_byte_of_cp[cp] >= 0;
            char b = mapped ? (char)tok_byte_of_cp[cp] : 0;
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
    if (tok_utf8_lossy(zse_buf_str(&bytes), bytes.len, &text))
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
        if (tok_utf8_valid(raw.data, raw.len)) {
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

/* HF's wordpiece::cleanup: spaces before punctuation and contractions removed, each
 * replacement on the result of the one before */
static int wordpiece_cleanup(const char *s, size_t n, zse_buf *out)
{
    static const char *const pairs[][2] = {{" .", "."}, {" ?", "?"}, {" !", "!"}, {" ,", ","}, {" ' ", "'"},
                                           {" n't", "n't"}, {" 'm", "'m"}, {" do not", " don't"}, {" 's", "'s"},
                                           {" 've", "'ve"}, {" 're", "'re"}};
    zse_buf a = {0}, b = {0};
    int rc = zse_buf_append(&a, s, n);
    for (size_t k = 0; rc == 0 && k < sizeof pairs / sizeof pairs[0]; k++) {
        b.len = 0;
        rc = tok_replace_all(zse_buf_str(&a), a.len, pairs[k][0], pairs[k][1], &b);
        zse_buf tmp = a;
        a = b;
        b = tmp;
    }
    if (rc == 0)
        rc = zse_buf_append(out, zse_buf_str(&a), a.len);
    zse_buf_free(&a);
    zse_buf_free(&b);
    return rc ? -1 : 0;
}

/* HF's WordPiece decoder on token `index`: after the first, a token with the prefix loses
 * it and one without gets a space before it; then the cleanup */
static int wordpiece_decode_one(const dec_step *d, size_t index, const char *s, size_t n, zse_buf *out)
{
    zse_buf tok = {0};
    size_t pl = strlen(d->a);
    int rc;
    if (index == 0)
        rc = zse_buf_append(&tok, s, n);
    else if (n >= pl && memcmp(s, d->a, pl) == 0)
        rc = zse_buf_append(&tok, s + pl, n - pl);
    else
        rc = zse_buf_append(&tok, " ", 1) || zse_buf_append(&tok, s, n);
    if (rc == 0)
        rc = d->cleanup ? wordpiece_cleanup(zse_buf_str(&tok), tok.len, out)
                        : zse_buf_append(out, zse_buf_str(&tok), tok.len);
    zse_buf_free(&tok);
    return rc ? -1 : 0;
}

/* HF's CTC decoder on one token: the pad token removed; with cleanup, the WordPiece
 * cleanup and the word delimiter to a space */
static int ctc_decode_one(const dec_step *d, const char *s, size_t n, zse_buf *out)
{
    zse_buf a = {0}, b = {0};
    int rc = tok_replace_all(s, n, d->a, "", &a);
    if (rc == 0 && d->cleanup) {
        rc = wordpiece_cleanup(zse_buf_str(&a), a.len, &b);
        a.len = 0;
        rc = rc || tok_replace_all(zse_buf_str(&b), b.len, d->b, " ", &a);
    }
    if (rc == 0)
        rc = zse_buf_append(out, zse_buf_str(&a), a.len);
    zse_buf_free(&a);
    zse_buf_free(&b);
    return rc ? -1 : 0;
}

/* CTC over the list: repeats of a token collapse to one, then tokens that decode to
 * nothing are dropped */
static int ctc_decode(const dec_step *d, tok_list *l)
{
    size_t w = 0;
    for (size_t i = 0; i < l->n; i++) {
        if (w && l->v[i].len == l->v[w - 1].len && memcmp(zse_buf_str(&l->v[i]), zse_buf_str(&l->v[w - 1]), l->v[i].len) == 0) {
            zse_buf_free(&l->v[i]);
            continue;
        }
        if (w != i) {
            l->v[w] = l->v[i];
            memset(&l->v[i], 0, sizeof l->v[i]);
        }
        w++;
    }
    /* w tokens remain: decode each, keeping the non-empty ones (the dedup above compared
     * raw tokens, as HF's does) */
    size_t k = 0;
    for (size_t i = 0; i < w; i++) {
        zse_buf out = {0};
        if (ctc_decode_one(d, zse_buf_str(&l->v[i]), l->v[i].len, &out) || zse_buf_reserve(&out, 0)) {
            zse_buf_free(&out);
            return -1;
        }
        zse_buf_free(&l->v[i]);
        if (out.len)
            l->v[k++] = out;
        else
            zse_buf_free(&out);
    }
    for (size_t i = k; i < w; i++)
        memset(&l->v[i], 0, sizeof l->v[i]);
    l->n = k;
    return 0;
}

static int decode_one(const dec_step *d, size_t index, const zse_buf *b, zse_buf *out)
{
    const char *s = b->data ? b->data : "";
    switch (d->kind) {
    case D_REPLACE:
        return d->re ? tok_replace_regex(d->re, s, b->len, d->b, out) : tok_replace_all(s, b->len, d->a, d->b, out);
    case D_METASPACE: {
        /* ▁ → space, except that the first token loses its ▁s (HF drops them all) */
        bool drop = index == 0 && d->prepend_scheme != 2;
        return tok_replace_all(s, b->len, d->a, drop ? "" : " ", out);
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
    case D_WORDPIECE:
        return wordpiece_decode_one(d, index, s, b->len, out);
    case D_CTC:
        return ctc_decode_one(d, s, b->len, out);
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
    if (d->kind == D_CTC)
        return ctc_decode(d, l);
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
    if (tok_utf8_lossy(zse_buf_str(&joined), joined.len, &clean) == 0)
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
        int32_t cp = tok_cp_at(s, n, i, &cl);
        if (cp < 0 || cp >= 512 || tok_byte_of_cp[cp] < 0) /* outside GPT-2's alphabet: as it is */
            return zse_buf_append(out, s, n);
    }
    for (size_t i = 0; i < n; i += cl) {
        char b = (char)tok_byte_of_cp[tok_cp_at(s, n, i, &cl)];
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
    if (tok_ids_push(&s->ids, id))
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

