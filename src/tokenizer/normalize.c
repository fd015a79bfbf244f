/* normalize.c — UTF-8 and Unicode helpers, the normalizers (NFC/NFKC/NFD/NFKD, Lowercase,
 * Replace, Prepend, Strip) and the pre-tokenizers (Split with every behaviour, ByteLevel,
 * Metaspace and the fixed splits written as regexes), exactly as HF `tokenizers` runs them. */
#include "tokenizer/tokenizer_internal.h"

/* ---- UTF-8 and Unicode ---------------------------------------------------------- */

/* The length of the valid UTF-8 sequence at s, or 0 with *bad = the length of the
 * maximal invalid subpart to replace by one U+FFFD (what Python's and Rust's lossy
 * decoders do). */
static size_t utf8_seq(const unsigned char *s, size_t n, size_t *bad)
{
    unsigned char c = s[0], lo = 0x80, hi = 0xBF;
    size_t need;
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF) {
        need = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        need = 3;
        lo = c == 0xE0 ? 0xA0 : 0x80;
        hi = c == 0xED ? 0x9F : 0xBF;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 4;
        lo = c == 0xF0 ? 0x90 : 0x80;
        hi = c == 0xF4 ? 0x8F : 0xBF;
    } else {
        *bad = 1;
        return 0;
    }
    size_t k = 1;
    for (; k < need && k < n; k++) {
        unsigned char d = s[k];
        if (d < (k == 1 ? lo : 0x80) || d > (k == 1 ? hi : 0xBF))
            break;
    }
    if (k == need)
        return need;
    *bad = k;
    return 0;
}

/* valid UTF-8 copied, each maximal invalid subpart replaced by U+FFFD */
int tok_utf8_lossy(const char *in, size_t n, zse_buf *out)
{
    if (zse_buf_reserve(out, n))
        return -1;
    size_t i = 0;
    while (i < n) {
        size_t run = i;
        while (run < n && (unsigned char)in[run] < 0x80)
            run++;
        if (run > i && zse_buf_append(out, in + i, run - i))
            return -1;
        i = run;
        if (i >= n)
            break;
        size_t bad = 0, k = utf8_seq((const unsigned char *)in + i, n - i, &bad);
        if (k ? zse_buf_append(out, in + i, k) : zse_buf_append(out, REPLACEMENT_CHAR, 3))
            return -1;
        i += k ? k : bad;
    }
    return zse_buf_reserve(out, 0);
}

bool tok_utf8_valid(const char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        size_t bad = 0, k = utf8_seq((const unsigned char *)s + i, n - i, &bad);
        if (!k)
            return false;
        i += k;
    }
    return true;
}

/* the code point at s[i] of valid UTF-8, its length in *len */
int32_t tok_cp_at(const char *s, size_t n, size_t i, size_t *len)
{
    utf8proc_int32_t cp = -1;
    utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &cp);
    *len = k > 0 ? (size_t)k : 1;
    return k > 0 ? cp : -1;
}

/* the code point that ends just before s[i] */
int32_t tok_cp_before(const char *s, size_t i, size_t *len)
{
    size_t start = i - 1;
    while (start > 0 && i - start < 4 && ((unsigned char)s[start] & 0xC0) == 0x80)
        start--;
    size_t l;
    int32_t cp = tok_cp_at(s, i, start, &l);
    if (start + l != i) { /* not a whole character: treat the last byte alone */
        *len = 1;
        return -1;
    }
    *len = l;
    return cp;
}

size_t tok_utf8_char_len(unsigned char c)
{
    return c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
}

/* Rust's char::is_whitespace (the White_Space property), which HF's Strip and the
 * added tokens' lstrip/rstrip use */
bool tok_is_white_space(int32_t c)
{
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
           c == 0x3000;
}

/* a "word" character for single_word added tokens: alphanumeric or '_' */
bool tok_is_word_char(int32_t c)
{
    if (c < 0)
        return false;
    if (c < 0x80)
        return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    utf8proc_category_t cat = utf8proc_category(c);
    return (cat >= UTF8PROC_CATEGORY_LU && cat <= UTF8PROC_CATEGORY_LO) || cat == UTF8PROC_CATEGORY_MC ||
           (cat >= UTF8PROC_CATEGORY_ND && cat <= UTF8PROC_CATEGORY_NO);
}

/* ---- normalizers --------------------------------------------------------------------- */

int tok_replace_all(const char *s, size_t n, const char *from, const char *to, zse_buf *out)
{
    size_t fl = strlen(from), tl = strlen(to), i = 0;
    if (!fl)
        return zse_buf_append(out, s, n);
    while (i < n) {
        const char *hit = fl <= n - i ? memmem(s + i, n - i, from, fl) : NULL;
        size_t upto = hit ? (size_t)(hit - s) : n;
        if (zse_buf_append(out, s + i, upto - i) || (hit && zse_buf_append(out, to, tl)))
            return -1;
        i = hit ? upto + fl : n;
    }
    return zse_buf_reserve(out, 0);
}

/* every non-overlapping match of re replaced by the literal `to` */
int tok_replace_regex(const pcre2_code *re, const char *s, size_t n, const char *to, zse_buf *out)
{
    pcre2_match_data *md = pcre2_match_data_create(1, NULL);
    if (!md)
        return zse_fail("out of memory for regex matching");
    size_t pos = 0, last = 0;
    int rc = 0;
    while (pos <= n && rc == 0) {
        int m = pcre2_match(re, (PCRE2_SPTR)s, n, pos, 0, md, NULL);
        if (m == PCRE2_ERROR_NOMATCH)
            break;
        if (m < 0) {
            rc = zse_fail("regex replacement failed (PCRE2 error %d)", m);
            break;
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        rc = zse_buf_append(out, s + last, ov[0] - last) || zse_buf_puts(out, to);
        last = ov[1];
        pos = ov[1] > ov[0] ? ov[1] : ov[1] + (ov[1] < n ? tok_utf8_char_len((unsigned char)s[ov[1]]) : 1);
        if (ov[1] == ov[0] && ov[1] < n) { /* an empty match: the character after it is kept */
            rc = rc || zse_buf_append(out, s + last, pos - last);
            last = pos;
        }
    }
    pcre2_match_data_free(md);
    if (rc == 0 && last < n)
        rc = zse_buf_append(out, s + last, n - last);
    return rc ? -1 : zse_buf_reserve(out, 0);
}

static int utf8proc_normalize(enum norm_kind kind, const char *s, size_t n, zse_buf *out)
{
    int opts = UTF8PROC_STABLE | (kind == N_NFC || kind == N_NFKC ? UTF8PROC_COMPOSE : UTF8PROC_DECOMPOSE) |
               (kind == N_NFKC || kind == N_NFKD ? UTF8PROC_COMPAT : 0);
    utf8proc_uint8_t *r = NULL;
    utf8proc_ssize_t rl = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &r, (utf8proc_option_t)opts);
    if (rl < 0)
        return zse_fail("cannot normalize text: %s", utf8proc_errmsg(rl));
    int rc = zse_buf_append(out, r, (size_t)rl);
    free(r);
    return rc;
}

/* Every normal form of ASCII is itself, and two ASCII characters never compose, so the
 * text normalizes piecewise: ASCII runs are copied, and each non-ASCII run goes through
 * utf8proc with the ASCII character before it (a base that a combining mark may join). */
static int unicode_normalize(enum norm_kind kind, const char *s, size_t n, zse_buf *out)
{
    size_t i = 0;
    while (i < n) {
        size_t run = i;
        while (run < n && (unsigned char)s[run] < 0x80)
            run++;
        if (run == n)
            return zse_buf_append(out, s + i, n - i);
        size_t start = run > i ? run - 1 : run, end = run;
        while (end < n && (unsigned char)s[end] >= 0x80)
            end++;
        if (zse_buf_append(out, s + i, start - i) || utf8proc_normalize(kind, s + start, end - start, out))
            return -1;
        i = end;
    }
    return 0;
}

/* Rust's char::to_lowercase: one-to-one except U+0130 (İ → i̇); no final-sigma rule */
static int lowercase(const char *s, size_t n, zse_buf *out)
{
    if (zse_buf_reserve(out, n))
        return -1;
    size_t i = 0, l;
    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x80) {
            char lc = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
            if (zse_buf_append(out, &lc, 1))
                return -1;
            i++;
            continue;
        }
        int32_t cp = tok_cp_at(s, n, i, &l);
        if (cp == 0x130) {
            if (zse_buf_append(out, "i\xCC\x87", 3))
                return -1;
        } else {
            utf8proc_uint8_t enc[4];
            utf8proc_ssize_t el = utf8proc_encode_char(utf8proc_tolower(cp), enc);
            if (zse_buf_append(out, enc, (size_t)el))
                return -1;
        }
        i += l;
    }
    return 0;
}

static int strip(const norm_step *st, const char *s, size_t n, zse_buf *out)
{
    size_t a = 0, b = n, l;
    while (st->left && a < b && tok_is_white_space(tok_cp_at(s, n, a, &l)))
        a += l;
    while (st->right && b > a && tok_is_white_space(tok_cp_before(s, b, &l)))
        b -= l;
    return zse_buf_append(out, s + a, b - a);
}

/* Rust's char::is_whitespace for \t \n \r and the White_Space property: BERT's whitespace */
static bool bert_is_whitespace(int32_t c)
{
    return c == '\t' || c == '\n' || c == '\r' || tok_is_white_space(c);
}

/* BERT's control characters: categories Cc, Cf, Cn, Co, Cs except \t \n \r */
static bool bert_is_control(int32_t c)
{
    if (c == '\t' || c == '\n' || c == '\r')
        return false;
    utf8proc_category_t cat = utf8proc_category(c);
    return cat == UTF8PROC_CATEGORY_CC || cat == UTF8PROC_CATEGORY_CF || cat == UTF8PROC_CATEGORY_CN ||
           cat == UTF8PROC_CATEGORY_CO || cat == UTF8PROC_CATEGORY_CS;
}

/* the CJK Unified Ideographs blocks BERT puts spaces around */
static bool bert_is_chinese(int32_t c)
{
    return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) || (c >= 0x20000 && c <= 0x2A6DF) ||
           (c >= 0x2A700 && c <= 0x2B73F) || (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B920 && c <= 0x2CEAF) ||
           (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
}

/* BertNormalizer's clean_text (NUL, U+FFFD and control characters dropped, whitespace to a
 * space) and handle_chinese_chars (spaces around CJK ideographs), in one pass */
static int bert_clean(const norm_step *st, const char *s, size_t n, zse_buf *out)
{
    size_t l;
    for (size_t i = 0; i < n; i += l) {
        int32_t c = tok_cp_at(s, n, i, &l);
        int rc = 0;
        if (st->clean_text && (c == 0 || c == 0xFFFD || bert_is_control(c)))
            continue;
        if (st->clean_text && bert_is_whitespace(c))
            rc = zse_buf_append(out, " ", 1);
        else if (st->chinese_chars && bert_is_chinese(c))
            rc = zse_buf_append(out, " ", 1) || zse_buf_append(out, s + i, l) || zse_buf_append(out, " ", 1);
        else
            rc = zse_buf_append(out, s + i, l);
        if (rc)
            return -1;
    }
    return 0;
}

/* StripAccents: nonspacing marks (Mn) dropped */
static int drop_nonspacing_marks(const char *s, size_t n, zse_buf *out)
{
    size_t l;
    for (size_t i = 0; i < n; i += l) {
        int32_t c = tok_cp_at(s, n, i, &l);
        if (utf8proc_category(c) != UTF8PROC_CATEGORY_MN && zse_buf_append(out, s + i, l))
            return -1;
    }
    return 0;
}

/* the Nmt normalizer: some control characters dropped, some spaces and separators to ' ' */
static int nmt(const char *s, size_t n, zse_buf *out)
{
    size_t l;
    for (size_t i = 0; i < n; i += l) {
        int32_t c = tok_cp_at(s, n, i, &l);
        if ((c >= 0x01 && c <= 0x08) || c == 0x0B || (c >= 0x0E && c <= 0x1F) || c == 0x7F || c == 0x8F || c == 0x9F)
            continue;
        bool space = c == 0x09 || c == 0x0A || c == 0x0C || c == 0x0D || c == 0x1680 || (c >= 0x200B && c <= 0x200F) ||
                     c == 0x2028 || c == 0x2029 || c == 0x2581 || c == 0xFEFF || c == 0xFFFD;
        if (space ? zse_buf_append(out, " ", 1) : zse_buf_append(out, s + i, l))
            return -1;
    }
    return 0;
}

/* BertNormalizer: clean_text, handle_chinese_chars, strip_accents (NFD, then marks
 * dropped), lowercase — in that order, each on the result of the one before */
static int bert_normalize(const norm_step *st, const char *s, size_t n, zse_buf *out)
{
    zse_buf a = {0}, b = {0};
    int rc = bert_clean(st, s, n, &a) || zse_buf_reserve(&a, 0);
    if (rc == 0 && st->strip_accents) {
        rc = unicode_normalize(N_NFD, zse_buf_str(&a), a.len, &b) || zse_buf_reserve(&b, 0);
        a.len = 0;
        rc = rc || drop_nonspacing_marks(zse_buf_str(&b), b.len, &a) || zse_buf_reserve(&a, 0);
    }
    if (rc == 0)
        rc = st->lowercase ? lowercase(zse_buf_str(&a), a.len, out) : zse_buf_append(out, zse_buf_str(&a), a.len);
    zse_buf_free(&a);
    zse_buf_free(&b);
    return rc ? -1 : 0;
}

int tok_normalize(const zse_tokenizer *t, zse_buf *s)
{
    for (int k = 0; k < t->n_norms && s->len; k++) {
        const norm_step *st = &t->norms[k];
        zse_buf out = {0};
        int rc = 0;
        switch (st->kind) {
        case N_NFC: case N_NFKC: case N_NFD: case N_NFKD:
            rc = unicode_normalize(st->kind, s->data, s->len, &out);
            break;
        case N_LOWER:
            rc = lowercase(s->data, s->len, &out);
            break;
        case N_PREPEND:
            rc = zse_buf_puts(&out, st->a) || zse_buf_append(&out, s->data, s->len);
            break;
        case N_REPLACE:
            rc = st->re ? tok_replace_regex(st->re, s->data, s->len, st->b, &out)
                        : tok_replace_all(s->data, s->len, st->a, st->b, &out);
            break;
        case N_STRIP:
            rc = strip(st, s->data, s->len, &out);
            break;
        case N_STRIP_ACCENTS:
            rc = drop_nonspacing_marks(s->data, s->len, &out);
            break;
        case N_NMT:
            rc = nmt(s->data, s->len, &out);
            break;
        case N_BERT:
            rc = bert_normalize(st, s->data, s->len, &out);
            break;
        case N_PRECOMPILED:
            rc = tok_precompiled_normalize(&st->map, s->data, s->len, &out);
            break;
        }
        if (rc || zse_buf_reserve(&out, 0)) {
            zse_buf_free(&out);
            return -1;
        }
        zse_buf_free(s);
        *s = out;
    }
    return 0;
}

/* ---- pre-tokenizers -------------------------------------------------------------------- */

static int mark_push(enc_state *st, size_t *n, size_t a, size_t b, bool match)
{
    if (*n == st->marks_cap) {
        size_t cap = st->marks_cap ? st->marks_cap * 2 : 64;
        span *m = zse_realloc(st->marks, cap * sizeof *m);
        if (!m)
            return -1;
        st->marks = m;
        bool *f = zse_realloc(st->is_match, cap * sizeof *f);
        if (!f)
            return -1;
        st->is_match = f;
        st->marks_cap = cap;
    }
    st->marks[*n] = (span){a, b};
    st->is_match[(*n)++] = match;
    return 0;
}

/* the span cut into intervals, each a match of re or the text between two matches —
 * HF's find_matches. After an empty match, or an empty match right where the previous
 * one ended, the search moves on one character (Oniguruma's find_iter). */
static int find_matches(enc_state *st, const pcre2_code *re, const char *s, size_t a, size_t b, size_t *nm)
{
    size_t len = b - a, pos = 0, last = 0;
    bool had_match = false;
    *nm = 0;
    while (pos <= len) {
        int m = pcre2_match(re, (PCRE2_SPTR)(s + a), len, pos, 0, st->md, st->mctx);
        if (m == PCRE2_ERROR_NOMATCH)
            break;
        if (m == PCRE2_ERROR_JIT_STACKLIMIT) {
            if (tok_grow_jit_stack(st))
                return -1;
            continue;
        }
        if (m < 0) {
            PCRE2_UCHAR msg[160];
            pcre2_get_error_message(m, msg, sizeof msg);
            return zse_fail("pre-tokenizer regex failed on a %zu-byte piece: %s", len, msg);
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(st->md);
        size_t ms = ov[0], me = ov[1];
        if (ms == me && had_match && ms == last) { /* empty, right after the previous match */
            pos = ms < len ? ms + tok_utf8_char_len((unsigned char)s[a + ms]) : len + 1;
            continue;
        }
        if (ms > last && mark_push(st, nm, a + last, a + ms, false))
            return -1;
        if (mark_push(st, nm, a + ms, a + me, true))
            return -1;
        last = me;
        had_match = true;
        pos = me > ms ? me : me < len ? me + tok_utf8_char_len((unsigned char)s[a + me]) : len + 1;
    }
    if (last < len && mark_push(st, nm, a + last, b, false))
        return -1;
    return 0;
}

/* HF's SplitDelimiterBehavior applied to the intervals of one span */
static int apply_behavior(enc_state *st, size_t nm, enum split_behavior beh, bool invert, spans *out)
{
    span *m = st->marks;
    bool *is = st->is_match;
    if (invert)
        for (size_t i = 0; i < nm; i++)
            is[i] = !is[i];
    size_t w = 0; /* pieces are rebuilt in place: w ≤ i always */
    bool prev = false;
    switch (beh) {
    case B_ISOLATED:
        w = nm;
        break;
    case B_REMOVED:
        for (size_t i = 0; i < nm; i++)
            if (!is[i])
                m[w++] = m[i];
        break;
    case B_MERGED_PREV:
        for (size_t i = 0; i < nm; i++) {
            if (is[i] && !prev && w)
                m[w - 1].end = m[i].end;
            else
                m[w++] = m[i];
            prev = is[i];
        }
        break;
    case B_CONTIGUOUS:
        for (size_t i = 0; i < nm; i++) {
            if (is[i] == prev && w)
                m[w - 1].end = m[i].end;
            else
                m[w++] = m[i];
            prev = is[i];
        }
        break;
    case B_MERGED_NEXT: {
        /* folded from the right: a match joins the piece after it */
        size_t r = nm;
        for (size_t i = nm; i-- > 0;) {
            if (is[i] && !prev && r < nm)
                m[r].start = m[i].start;
            else
                m[--r] = m[i];
            prev = is[i];
        }
        for (size_t i = r; i < nm; i++)
            m[w++] = m[i];
        break;
    }
    }
    for (size_t i = 0; i < w; i++)
        if (tok_spans_push(out, m[i].start, m[i].end))
            return -1;
    return 0;
}

static int split_step(enc_state *st, const pcre2_code *re, enum split_behavior beh, bool invert)
{
    st->next.n = 0;
    for (size_t p = 0; p < st->cur.n; p++) {
        size_t nm;
        if (find_matches(st, re, st->text.data, st->cur.v[p].start, st->cur.v[p].end, &nm) ||
            apply_behavior(st, nm, beh, invert, &st->next))
            return -1;
    }
    spans tmp = st->cur;
    st->cur = st->next;
    st->next = tmp;
    return 0;
}

/* ByteLevel's add_prefix_space (a space before every piece that lacks one) and
 * Metaspace (spaces become ▁, which is prepended per the scheme): the text is rebuilt */
static int rewrite_step(enc_state *st, const pre_step *ps, bool first)
{
    zse_buf *nb = &st->spare;
    nb->len = 0;
    st->next.n = 0;
    for (size_t p = 0; p < st->cur.n; p++) {
        const char *src = st->text.data + st->cur.v[p].start;
        size_t n = st->cur.v[p].end - st->cur.v[p].start, begin = nb->len;
        int rc;
        if (ps->kind == P_BYTELEVEL) {
            rc = (src[0] != ' ' && zse_buf_append(nb, " ", 1)) || zse_buf_append(nb, src, n);
        } else {
            size_t rl = strlen(ps->replacement);
            bool starts = (n && src[0] == ' ') || (n >= rl && memcmp(src, ps->replacement, rl) == 0);
            bool prepend = !starts && (ps->prepend_scheme == 0 ||
                                       (ps->prepend_scheme == 1 && first && st->cur.v[p].start == 0));
            rc = (prepend && zse_buf_puts(nb, ps->replacement)) || tok_replace_all(src, n, " ", ps->replacement, nb);
        }
        if (rc || tok_spans_push(&st->next, begin, nb->len))
            return -1;
    }
    if (zse_buf_reserve(nb, 0))
        return -1;
    zse_buf tb = st->text;
    st->text = *nb;
    *nb = tb;
    spans tmp = st->cur;
    st->cur = st->next;
    st->next = tmp;
    return 0;
}

/* text → st->text cut into st->cur pieces. `first`: the text starts the input (where
 * Metaspace's prepend_scheme "first" puts its ▁) */
int tok_pre_tokenize(const zse_tokenizer *t, enc_state *st, const char *text, size_t n, bool first)
{
    st->text.len = 0;
    st->cur.n = 0;
    if (zse_buf_append(&st->text, text, n) || tok_spans_push(&st->cur, 0, n))
        return -1;
    for (int k = 0; k < t->n_pres; k++) {
        const pre_step *ps = &t->pres[k];
        int rc = 0;
        if (ps->kind == P_SPLIT)
            rc = split_step(st, ps->re, ps->behavior, ps->invert);
        else if (ps->kind == P_BYTELEVEL)
            rc = (ps->add_prefix_space && rewrite_step(st, ps, first)) ||
                 (ps->use_regex && split_step(st, ps->re, B_ISOLATED, false));
        else
            rc = rewrite_step(st, ps, first) || (ps->split && split_step(st, ps->re, B_MERGED_NEXT, false));
        if (rc)
            return -1;
    }
    return 0;
}

