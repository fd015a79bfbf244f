/* Regular expressions → builder expressions. The subset (docs/GRAMMAR.md): literals (UTF-8),
 * escapes (\n \t \r \f \v \0 \xHH \uHHHH \UHHHHHHHH and escaped punctuation), `.`, classes
 * [...] with ranges and negation, \d \w \s (ASCII) and \D \W \S (ASCII complements, so the
 * output is also matched by Python's Unicode-aware classes), groups ( ), (?: ), (?P<n> ),
 * (?<n> ), alternation, quantifiers * + ? {m} {m,} {m,n} {,n} (lazy forms accepted: same
 * language), `^` at the start and `$` at the end of a top-level branch. Refused with the
 * offset: backreferences, lookaround, \b \B \A \Z, \p{..}, inline flags, possessive
 * quantifiers, a repeated group that can match the empty string.
 * The whole input must match (Python re.fullmatch). In json mode (a schema's "pattern")
 * the text is a JSON string's content, characters escaped as JSON needs, and the pattern is
 * searched (re.search): an unanchored side may have any text. */
#include "grammar/grammar.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    zse_gb *b;
    const char *p;
    size_t n, i;
    bool json;
    int depth;
} rx;

#define RX_MAX_RANGES 4096

static zse_gx rx_fail(rx *r, const char *what)
{
    zse_fail("regex: %s at offset %zu", what, r->i);
    return -1;
}

static bool at_end(const rx *r)
{
    return r->i >= r->n;
}

static int peek(const rx *r)
{
    return at_end(r) ? -1 : (uint8_t)r->p[r->i];
}

/* one UTF-8 code point from the pattern; -1 on malformed UTF-8 */
static int64_t next_cp(rx *r)
{
    const uint8_t *s = (const uint8_t *)r->p;
    uint8_t c = s[r->i];
    int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (!len || r->i + (size_t)len > r->n)
        return -1;
    uint32_t cp = len == 1 ? c : len == 2 ? c & 0x1F : len == 3 ? c & 0x0F : c & 0x07;
    for (int k = 1; k < len; k++) {
        if ((s[r->i + (size_t)k] & 0xC0) != 0x80)
            return -1;
        cp = cp << 6 | (s[r->i + (size_t)k] & 0x3F);
    }
    r->i += (size_t)len;
    return cp;
}

typedef struct {
    gr_range r[RX_MAX_RANGES];
    int n;
    bool unicode_class; /* holds \d \w \s: a negation stays inside ASCII */
} rset;

static int rset_add(rset *s, uint32_t lo, uint32_t hi)
{
    if (s->n >= RX_MAX_RANGES)
        return zse_fail("regex: a character class with more than %d ranges", RX_MAX_RANGES);
    s->r[s->n++] = (gr_range){lo, hi};
    return 0;
}

static int cmp_range(const void *a, const void *b)
{
    const gr_range *x = a, *y = b;
    return x->lo < y->lo ? -1 : x->lo > y->lo;
}

static void rset_normalize(rset *s)
{
    qsort(s->r, (size_t)s->n, sizeof *s->r, cmp_range);
    int k = 0;
    for (int i = 0; i < s->n; i++) {
        if (k && s->r[i].lo <= s->r[k - 1].hi + 1) {
            if (s->r[i].hi > s->r[k - 1].hi)
                s->r[k - 1].hi = s->r[i].hi;
        } else {
            s->r[k++] = s->r[i];
        }
    }
    s->n = k;
}

static void rset_negate(rset *s, uint32_t limit)
{
    rset_normalize(s);
    gr_range out[RX_MAX_RANGES + 1];
    int k = 0;
    uint32_t next = 0;
    for (int i = 0; i < s->n && next <= limit; i++) {
        if (s->r[i].lo > next)
            out[k++] = (gr_range){next, s->r[i].lo - 1 < limit ? s->r[i].lo - 1 : limit};
        next = s->r[i].hi + 1;
    }
    if (next <= limit)
        out[k++] = (gr_range){next, limit};
    memcpy(s->r, out, (size_t)k * sizeof *out);
    s->n = k;
}

/* \d \w \s and complements; 0 when c is not a class letter */
static int add_class_escape(rset *s, int c)
{
    rset t = {.n = 0};
    switch (c) {
    case 'd': case 'D': rset_add(&t, '0', '9'); break;
    case 'w': case 'W':
        rset_add(&t, '0', '9');
        rset_add(&t, 'A', 'Z');
        rset_add(&t, '_', '_');
        rset_add(&t, 'a', 'z');
        break;
    case 's': case 'S':
        rset_add(&t, '\t', '\r');
        rset_add(&t, ' ', ' ');
        if (c == 'S')
            rset_add(&t, 0x1C, 0x1F); /* Python's str.isspace counts these */
        break;
    default: return 0;
    }
    if (c == 'D' || c == 'W' || c == 'S')
        rset_negate(&t, 0x7F);
    s->unicode_class = true;
    for (int i = 0; i < t.n; i++)
        if (rset_add(s, t.r[i].lo, t.r[i].hi))
            return -1;
    return 1;
}

static int hex_digits(rx *r, int count, uint32_t *out)
{
    uint32_t v = 0;
    for (int k = 0; k < count; k++) {
        int c = peek(r);
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0)
            return -1;
        v = v * 16 + (uint32_t)d;
        r->i++;
    }
    *out = v;
    return 0;
}

/* an escape after '\' that stands for one code point; -1 and an error when unsupported */
static int64_t escape_cp(rx *r, bool in_class)
{
    if (at_end(r))
        return rx_fail(r, "a pattern cannot end with a backslash");
    int c = peek(r);
    uint32_t v;
    r->i++;
    switch (c) {
    case 'n': return '\n';
    case 't': return '\t';
    case 'r': return '\r';
    case 'f': return '\f';
    case 'v': return '\v';
    case 'a': return '\a';
    case '0': return 0;
    case 'b':
        if (in_class)
            return '\b';
        r->i--;
        return rx_fail(r, "\\b (word boundary) is not supported");
    case 'x':
        if (hex_digits(r, 2, &v))
            return rx_fail(r, "\\x needs two hex digits");
        return v;
    case 'u':
    case 'U':
        if (hex_digits(r, c == 'u' ? 4 : 8, &v) || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF))
            return rx_fail(r, "\\u needs 4 hex digits (\\U 8) naming a character");
        return v;
    }
    r->i--;
    if (c >= '1' && c <= '9')
        return rx_fail(r, "backreferences are not supported");
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))
        return rx_fail(r, "this escape is not supported (\\b \\B \\A \\Z \\p and backreferences are refused)");
    return next_cp(r);
}

static zse_gx from_set(rx *r, rset *s)
{
    rset_normalize(s);
    return gb_ranges(r->b, s->r, s->n, r->json);
}

static zse_gx parse_class(rx *r)
{
    rset s = {.n = 0};
    bool neg = false;
    r->i++; /* '[' */
    if (peek(r) == '^') {
        neg = true;
        r->i++;
    }
    bool first = true;
    for (;;) {
        if (at_end(r))
            return rx_fail(r, "an unterminated character class [");
        int c = peek(r);
        if (c == ']' && !first) {
            r->i++;
            break;
        }
        first = false;
        int64_t lo;
        if (c == '\\') {
            r->i++;
            int k = add_class_escape(&s, peek(r));
            if (k < 0)
                return -1;
            if (k) {
                r->i++;
                continue;
            }
            if ((lo = escape_cp(r, true)) < 0)
                return -1;
        } else if ((lo = next_cp(r)) < 0) {
            return rx_fail(r, "malformed UTF-8");
        }
        int64_t hi = lo;
        if (peek(r) == '-' && r->i + 1 < r->n && r->p[r->i + 1] != ']') {
            r->i++;
            if (peek(r) == '\\') {
                r->i++;
                if ((hi = escape_cp(r, true)) < 0)
                    return -1;
            } else if ((hi = next_cp(r)) < 0) {
                return rx_fail(r, "malformed UTF-8");
            }
            if (hi < lo)
                return rx_fail(r, "a class range goes backwards");
        }
        if (rset_add(&s, (uint32_t)lo, (uint32_t)hi))
            return -1;
    }
    if (neg)
        rset_negate(&s, s.unicode_class ? 0x7F : 0x10FFFF);
    if (s.n == 0)
        return rx_fail(r, "a character class that matches nothing");
    return from_set(r, &s);
}

static zse_gx parse_alt(rx *r, bool top);

static zse_gx parse_atom(rx *r)
{
    int c = peek(r);
    rset s = {.n = 0};
    if (c == '(') {
        size_t at = r->i++;
        if (peek(r) == '?') {
            r->i++;
            int k = peek(r);
            if (k == ':') {
                r->i++;
            } else if (k == 'P' || k == '<') {
                if (k == 'P')
                    r->i++;
                if (peek(r) != '<')
                    return rx_fail(r, "(?P= and other (?P forms are not supported");
                r->i++;
                if (peek(r) == '=' || peek(r) == '!')
                    return rx_fail(r, "lookbehind is not supported");
                while (!at_end(r) && peek(r) != '>')
                    r->i++;
                if (at_end(r))
                    return rx_fail(r, "an unterminated group name");
                r->i++;
            } else {
                return rx_fail(r, "lookaround, inline flags and other (? forms are not supported");
            }
        }
        if (++r->depth > 200)
            return rx_fail(r, "groups nested deeper than 200");
        zse_gx x = parse_alt(r, false);
        r->depth--;
        if (x < 0)
            return -1;
        if (peek(r) != ')') {
            r->i = at;
            return rx_fail(r, "an unclosed group (");
        }
        r->i++;
        return x;
    }
    if (c == '[')
        return parse_class(r);
    if (c == '.') {
        r->i++;
        rset_add(&s, 0, '\n' - 1);
        rset_add(&s, '\n' + 1, 0x10FFFF);
        return from_set(r, &s);
    }
    if (c == '\\') {
        r->i++;
        int k = add_class_escape(&s, peek(r));
        if (k < 0)
            return -1;
        if (k) {
            r->i++;
            return from_set(r, &s);
        }
        int64_t cp = escape_cp(r, false);
        if (cp < 0)
            return -1;
        rset_add(&s, (uint32_t)cp, (uint32_t)cp);
        return from_set(r, &s);
    }
    if (c == '^' || c == '$')
        return rx_fail(r, "^ and $ are supported only at the start and end of the pattern");
    if (c == '*' || c == '+' || c == '?')
        return rx_fail(r, "nothing to repeat");
    if (c == ')')
        return rx_fail(r, "an unbalanced )");
    int64_t cp = next_cp(r);
    if (cp < 0)
        return rx_fail(r, "malformed UTF-8");
    rset_add(&s, (uint32_t)cp, (uint32_t)cp);
    return from_set(r, &s);
}

/* {m}, {m,}, {m,n}, {,n}; false (and the offset restored) when this '{' is a literal */
static bool parse_braces(rx *r, int *min, int *max)
{
    size_t at = r->i;
    r->i++;
    long a = -1, b = -1;
    while (peek(r) >= '0' && peek(r) <= '9' && a < 1000000)
        a = (a < 0 ? 0 : a * 10) + (peek(r) - '0'), r->i++;
    if (peek(r) == '}') {
        r->i++;
        if (a < 0)
            goto literal;
        *min = *max = (int)a;
        return true;
    }
    if (peek(r) != ',')
        goto literal;
    r->i++;
    while (peek(r) >= '0' && peek(r) <= '9' && b < 1000000)
        b = (b < 0 ? 0 : b * 10) + (peek(r) - '0'), r->i++;
    if (peek(r) != '}')
        goto literal;
    r->i++;
    *min = a < 0 ? 0 : (int)a;
    *max = b < 0 ? -1 : (int)b;
    return true;
literal:
    r->i = at;
    return false;
}

static zse_gx parse_repeat(rx *r)
{
    zse_gx x = parse_atom(r);
    bool repeated = false;
    while (x >= 0 && !at_end(r)) {
        int c = peek(r), min, max;
        size_t at = r->i;
        if (c == '*')
            min = 0, max = -1, r->i++;
        else if (c == '+')
            min = 1, max = -1, r->i++;
        else if (c == '?')
            min = 0, max = 1, r->i++;
        else if (c == '{' && parse_braces(r, &min, &max))
            ;
        else
            break;
        if (repeated) {
            r->i = at;
            return rx_fail(r, "multiple repeat");
        }
        repeated = true;
        if (peek(r) == '?')
            r->i++; /* lazy: the same language */
        else if (peek(r) == '+')
            return rx_fail(r, "possessive quantifiers are not supported");
        if (max >= 0 && max < min) {
            r->i = at;
            return rx_fail(r, "a repetition {m,n} with n < m");
        }
        if (gb_nullable(r->b, x)) {
            if (max == 1 || (min <= 1 && max == 1))
                continue; /* (x)? with x matching empty is x */
            r->i = at;
            return rx_fail(r, "a repeated group that can match the empty string is not supported");
        }
        x = zse_gb_repeat(r->b, x, min, max);
    }
    return x;
}

static zse_gx parse_concat(rx *r)
{
    zse_gx *xs = NULL;
    int n = 0, cap = 0;
    zse_gx out = -1;
    while (!at_end(r) && peek(r) != '|' && peek(r) != ')') {
        if (peek(r) == '$' && r->depth == 0) {
            size_t j = r->i + 1;
            if (j == r->n || r->p[j] == '|')
                break; /* the end anchor of a top-level branch */
        }
        zse_gx x = parse_repeat(r);
        if (x < 0)
            goto out;
        if (n == cap) {
            cap = cap ? cap * 2 : 16;
            zse_gx *p = zse_realloc(xs, (size_t)cap * sizeof *p);
            if (!p)
                goto out;
            xs = p;
        }
        xs[n++] = x;
    }
    out = zse_gb_seq(r->b, xs, n);
out:
    free(xs);
    return out;
}

static zse_gx any_text(rx *r)
{
    gr_range all = {0, 0x10FFFF};
    zse_gx c = gb_ranges(r->b, &all, 1, r->json);
    return c < 0 ? -1 : zse_gb_repeat(r->b, c, 0, -1);
}

/* top: a top-level branch may be anchored (^ first, $ last); search mode pads the other ends */
static zse_gx parse_alt(rx *r, bool top)
{
    zse_gx branches[256];
    int n = 0;
    for (;;) {
        bool start = false, end = false;
        if (top && peek(r) == '^') {
            start = true;
            r->i++;
        }
        zse_gx x = parse_concat(r);
        if (x < 0)
            return -1;
        if (top && peek(r) == '$') {
            end = true;
            r->i++;
        }
        if (top && r->b && !start && r->depth == 0 && r->json) {
            zse_gx pad = any_text(r);
            x = gb_seq2(r->b, pad, x);
        }
        if (top && !end && r->json) {
            zse_gx pad = any_text(r);
            x = gb_seq2(r->b, x, pad);
        }
        if (x < 0)
            return -1;
        if (n == 256)
            return rx_fail(r, "more than 256 alternatives in one group");
        branches[n++] = x;
        if (peek(r) != '|')
            break;
        r->i++;
    }
    return zse_gb_alt(r->b, branches, n);
}

zse_gx gb_regex_mode(zse_gb *b, const char *pattern, size_t len, bool json)
{
    rx r = {.b = b, .p = pattern, .n = len, .json = json};
    zse_gx x = parse_alt(&r, true);
    if (x >= 0 && !at_end(&r))
        return rx_fail(&r, peek(&r) == ')' ? "an unbalanced )" : "unexpected text");
    return x;
}

zse_gx zse_gb_regex(zse_gb *b, const char *pattern, size_t len)
{
    return gb_regex_mode(b, pattern, len, false);
}
