/* precompiled.c — the Precompiled normalizer: SentencePiece's precompiled_charsmap (the
 * nmt_nfkc rules and their kin, as T5/ALBERT/XLNet/mT5/XLM-R tokenizer.json files carry
 * them, base64-encoded), applied the way Hugging Face `tokenizers` applies it.
 *
 * The charsmap is a u32 (little-endian) trie size, a Darts-clone double-array trie of that
 * many bytes mapping source strings to offsets, then NUL-terminated replacement strings.
 * HF walks the text by extended grapheme clusters: a cluster shorter than 6 bytes is
 * replaced whole by the replacement of its *shortest* prefix that the trie holds (so a
 * mark after a mapped character goes with it); otherwise, and when nothing matches, each
 * character is looked up alone. Every offset read from the charsmap is bounds-checked. */
#include "tokenizer/tokenizer_internal.h"

/* ---- base64 (RFC 4648, with padding) ------------------------------------------------------ */

static int b64_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    return c == '+' ? 62 : c == '/' ? 63 : -1;
}

static unsigned char *b64_decode(const char *s, size_t n, size_t *out_len)
{
    unsigned char *out = zse_malloc(n / 4 * 3 + 3);
    if (!out)
        return NULL;
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '=')
            break;
        int v = b64_value((unsigned char)s[i]);
        if (v < 0) {
            free(out);
            zse_fail("tokenizer.json: precompiled_charsmap is not base64 (byte %zu)", i);
            return NULL;
        }
        acc = acc << 6 | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (unsigned char)(acc >> bits);
        }
    }
    *out_len = o;
    return out;
}

/* ---- the charsmap ------------------------------------------------------------------------- */

int tok_charsmap_load(charsmap *m, const char *b64, size_t b64_len)
{
    size_t n = 0;
    memset(m, 0, sizeof *m);
    if (!(m->data = b64_decode(b64, b64_len, &n)))
        return -1;
    uint32_t trie_size = n >= 4 ? (uint32_t)m->data[0] | (uint32_t)m->data[1] << 8 | (uint32_t)m->data[2] << 16 |
                                      (uint32_t)m->data[3] << 24
                                : 0;
    if (n < 8 || trie_size < 4 || trie_size % 4 || trie_size > n - 4) {
        free(m->data);
        m->data = NULL;
        return zse_fail("tokenizer.json: precompiled_charsmap is corrupt (%zu bytes, trie of %u)", n, trie_size);
    }
    m->units = m->data + 4;
    m->n_units = trie_size / 4;
    m->normalized = (const char *)m->data + 4 + trie_size;
    m->normalized_len = n - 4 - trie_size;
    return 0;
}

static uint32_t unit_at(const charsmap *m, size_t i)
{
    const unsigned char *p = m->units + 4 * i;
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Darts-clone's unit fields */
static bool unit_has_leaf(uint32_t u) { return (u >> 8) & 1; }
static uint32_t unit_value(uint32_t u) { return u & ((1u << 31) - 1); }
static uint32_t unit_label(uint32_t u) { return u & ((1u << 31) | 0xFF); }
static size_t unit_offset(uint32_t u) { return (size_t)(u >> 10) << ((u & (1u << 9)) >> 6); }

/* the value of the shortest key that prefixes s[0..n), or -1 */
static int64_t first_prefix_value(const charsmap *m, const char *s, size_t n)
{
    size_t pos = unit_offset(unit_at(m, 0));
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == 0)
            break;
        pos ^= c;
        if (pos >= m->n_units)
            return -1;
        uint32_t u = unit_at(m, pos);
        if (unit_label(u) != c)
            return -1;
        pos ^= unit_offset(u);
        if (pos >= m->n_units)
            return -1;
        if (unit_has_leaf(u))
            return unit_value(unit_at(m, pos));
    }
    return -1;
}

/* the replacement of s[0..n) (its shortest mapped prefix), or false */
static bool transform(const charsmap *m, const char *s, size_t n, const char **rep, size_t *rep_len)
{
    int64_t v = first_prefix_value(m, s, n);
    if (v < 0 || (size_t)v >= m->normalized_len)
        return false;
    const char *r = m->normalized + v;
    const char *nul = memchr(r, 0, m->normalized_len - (size_t)v);
    *rep = r;
    *rep_len = nul ? (size_t)(nul - r) : m->normalized_len - (size_t)v;
    return true;
}

/* where the extended grapheme cluster starting at s[i] ends */
static size_t grapheme_end(const char *s, size_t n, size_t i)
{
    utf8proc_int32_t state = 0;
    size_t l;
    int32_t prev = tok_cp_at(s, n, i, &l);
    size_t j = i + l;
    while (j < n) {
        int32_t c = tok_cp_at(s, n, j, &l);
        if (utf8proc_grapheme_break_stateful(prev, c, &state))
            break;
        prev = c;
        j += l;
    }
    return j;
}

int tok_precompiled_normalize(const charsmap *m, const char *s, size_t n, zse_buf *out)
{
    const char *rep;
    size_t rl, l;
    for (size_t i = 0; i < n;) {
        size_t g = grapheme_end(s, n, i);
        if (g - i < 6 && transform(m, s + i, g - i, &rep, &rl)) {
            if (zse_buf_append(out, rep, rl))
                return -1;
            i = g;
            continue;
        }
        for (; i < g; i += l) {
            tok_cp_at(s, n, i, &l);
            int rc = transform(m, s + i, l, &rep, &rl) ? zse_buf_append(out, rep, rl) : zse_buf_append(out, s + i, l);
            if (rc)
                return -1;
        }
    }
    return zse_buf_reserve(out, 0);
}
