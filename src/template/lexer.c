/* lexer.c — template source to tokens, following jinja2's lexer: {{ }}, {% %}, {# #},
 * whitespace control (-/+), trim_blocks, lstrip_blocks and raw blocks. */
#include "template/template_internal.h"

static void pos_of(const char *src, size_t off, int *line, int *col)
{
    int l = 1, c = 1;
    for (size_t i = 0; i < off; i++) {
        if (src[i] == '\n') {
            l++;
            c = 1;
        } else if (((unsigned char)src[i] & 0xC0) != 0x80) {
            c++;
        }
    }
    *line = l;
    *col = c;
}

static int lex_fail(lexer *lx, size_t off, const char *msg)
{
    if (!lx->err[0]) {
        int l, c;
        pos_of(lx->src, off < lx->len ? off : lx->len, &l, &c);
        snprintf(lx->err, sizeof lx->err, "line %d, column %d: %s", l, c, msg);
    }
    return -1;
}

static token *lex_push(lexer *lx, int kind, size_t off)
{
    if (lx->n == lx->cap) {
        size_t cap = lx->cap ? lx->cap * 2 : 256;
        token *t = realloc(lx->toks, cap * sizeof *t);
        if (!t) return NULL;
        lx->toks = t;
        lx->cap = cap;
    }
    token *t = &lx->toks[lx->n++];
    memset(t, 0, sizeof *t);
    t->kind = (uint8_t)kind;
    t->s = lx->src + off;
    /* line/col filled lazily below: computing per token from the start would be quadratic */
    t->line = (int)(off & 0x7fffffff);
    return t;
}

static bool is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

static char *arena_strndup(arena *a, const char *s, size_t n)
{
    char *p = tpl_arena_alloc(a, n + 1);
    if (!p) return NULL;
    memcpy(p, s, n);
    p[n] = 0;
    return p;
}

static int lex_data(lexer *lx, size_t off, size_t start, size_t end)
{
    if (end <= start) return 0;
    token *t = lex_push(lx, T_DATA, off);
    if (!t) return lex_fail(lx, off, "out of memory");
    t->s = lx->src + start;
    t->len = end - start;
    return 0;
}

void tpl_put_utf8(char *out, size_t *o, uint32_t cp)
{
    if (cp < 0x80) {
        out[(*o)++] = (char)cp;
    } else if (cp < 0x800) {
        out[(*o)++] = (char)(0xC0 | (cp >> 6));
        out[(*o)++] = (char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        out[(*o)++] = (char)(0xE0 | (cp >> 12));
        out[(*o)++] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[(*o)++] = (char)(0x80 | (cp & 0x3F));
    } else {
        out[(*o)++] = (char)(0xF0 | (cp >> 18));
        out[(*o)++] = (char)(0x80 | ((cp >> 12) & 0x3F));
        out[(*o)++] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[(*o)++] = (char)(0x80 | (cp & 0x3F));
    }
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* A string literal at src[*p] (the quote). Decodes escapes as Python's unicode-escape
 * does (jinja2 decodes literals that way); unknown escapes keep their backslash. */
static int lex_string(lexer *lx, size_t *p)
{
    size_t start = *p;
    char q = lx->src[start];
    size_t i = start + 1;
    while (i < lx->len && lx->src[i] != q) {
        if (lx->src[i] == '\\' && i + 1 < lx->len) i++;
        i++;
    }
    if (i >= lx->len) return lex_fail(lx, start, "unexpected end of string");
    size_t rawlen = i - start - 1;
    char *out = tpl_arena_alloc(lx->ar, rawlen * 2 + 1);  /* \xNN (4 bytes) never grows past 2x */
    if (!out) return lex_fail(lx, start, "out of memory");
    size_t o = 0;
    for (size_t k = start + 1; k < i; k++) {
        char c = lx->src[k];
        if (c != '\\') {
            out[o++] = c;
            continue;
        }
        char e = lx->src[++k];
        int digits = 0;
        switch (e) {
        case 'n': out[o++] = '\n'; break;
        case 't': out[o++] = '\t'; break;
        case 'r': out[o++] = '\r'; break;
        case '\\': out[o++] = '\\'; break;
        case '\'': out[o++] = '\''; break;
        case '"': out[o++] = '"'; break;
        case 'a': out[o++] = '\a'; break;
        case 'b': out[o++] = '\b'; break;
        case 'f': out[o++] = '\f'; break;
        case 'v': out[o++] = '\v'; break;
        case '\n': break;
        case 'x': digits = 2; break;
        case 'u': digits = 4; break;
        case 'U': digits = 8; break;
        default:
            if (e >= '0' && e <= '7') {
                uint32_t v = 0;
                int m = 0;
                while (m < 3 && k < i && lx->src[k] >= '0' && lx->src[k] <= '7') v = v * 8 + (uint32_t)(lx->src[k++] - '0'), m++;
                k--;
                tpl_put_utf8(out, &o, v);
            } else {
                out[o++] = '\\';
                out[o++] = e;
            }
        }
        if (digits) {
            uint32_t v = 0;
            for (int m = 0; m < digits; m++) {
                int h = k + 1 + (size_t)m < i ? hexval(lx->src[k + 1 + m]) : -1;
                if (h < 0) return lex_fail(lx, k, "truncated \\x, \\u or \\U escape in string");
                v = v * 16 + (uint32_t)h;
            }
            if (v > 0x10FFFF) return lex_fail(lx, k, "illegal Unicode character in string");
            k += (size_t)digits;
            tpl_put_utf8(out, &o, v);
        }
    }
    out[o] = 0;
    token *t = lex_push(lx, T_STRING, start);
    if (!t) return lex_fail(lx, start, "out of memory");
    t->s = out;
    t->len = o;
    *p = i + 1;
    return 0;
}

static int lex_number(lexer *lx, size_t *p)
{
    size_t start = *p, i = start;
    char buf[128];
    size_t b = 0;
    bool is_float = false;
#define NUM_PUT(ch)                                                                 \
    do {                                                                            \
        if (b >= sizeof buf - 1) return lex_fail(lx, start, "number literal too long"); \
        buf[b++] = (ch);                                                            \
    } while (0)
    while (i < lx->len && (isdigit((unsigned char)lx->src[i]) || lx->src[i] == '_')) {
        if (lx->src[i] != '_') NUM_PUT(lx->src[i]);
        i++;
    }
    if (i + 1 < lx->len && lx->src[i] == '.' && isdigit((unsigned char)lx->src[i + 1])) {
        is_float = true;
        NUM_PUT('.');
        i++;
        while (i < lx->len && (isdigit((unsigned char)lx->src[i]) || lx->src[i] == '_')) {
            if (lx->src[i] != '_') NUM_PUT(lx->src[i]);
            i++;
        }
    }
    if (i < lx->len && (lx->src[i] == 'e' || lx->src[i] == 'E')) {
        size_t j = i + 1;
        if (j < lx->len && (lx->src[j] == '+' || lx->src[j] == '-')) j++;
        if (j < lx->len && isdigit((unsigned char)lx->src[j])) {
            is_float = true;
            while (i < j) NUM_PUT(lx->src[i++]);
            while (i < lx->len && isdigit((unsigned char)lx->src[i])) NUM_PUT(lx->src[i++]);
        }
    }
#undef NUM_PUT
    buf[b] = 0;
    token *t = lex_push(lx, is_float ? T_FLOAT : T_INT, start);
    if (!t) return lex_fail(lx, start, "out of memory");
    if (is_float) {
        t->f = strtod(buf, NULL);
    } else {
        errno = 0;
        long long v = strtoll(buf, NULL, 10);
        if (errno) return lex_fail(lx, start, "integer literal too large");
        t->i = v;
    }
    *p = i;
    return 0;
}

static const char *const lex_ops[] = {
    "//", "**", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<", ">", "=",
    ".", ",", ":", "|", "(", ")", "[", "]", "{", "}", NULL
};

/* Tokens inside {{ }} or {% %} up to the closing delimiter. end_ch is '}' or '%'.
 * On return *p is past the closing tag and *strip_after says how the following data
 * is trimmed: 0 none, 1 all whitespace ('-'), 2 one newline (trim_blocks). */
static int lex_tag(lexer *lx, size_t *p, char end_ch, bool block, int *after)
{
    size_t i = *p;
    int nest = 0;
    for (;;) {
        while (i < lx->len && is_ws(lx->src[i])) i++;
        if (i >= lx->len) return lex_fail(lx, i, block ? "unexpected end of template, expected '%}'" : "unexpected end of template, expected '}}'");
        const char *s = lx->src + i;
        size_t rest = lx->len - i;
        /* closing delimiter (not while inside brackets for '}}', which may close a dict) */
        if (rest >= 3 && (s[0] == '-' || s[0] == '+') && s[1] == end_ch && s[2] == '}') {
            token *t = lex_push(lx, block ? T_BLOCK_END : T_VAR_END, i);
            if (!t) return lex_fail(lx, i, "out of memory");
            *after = s[0] == '-' ? 1 : (block ? 3 : 0);
            *p = i + 3;
            return 0;
        }
        if (rest >= 2 && s[0] == end_ch && s[1] == '}' && (block || nest == 0)) {
            token *t = lex_push(lx, block ? T_BLOCK_END : T_VAR_END, i);
            if (!t) return lex_fail(lx, i, "out of memory");
            *after = block ? 2 : 0;
            *p = i + 2;
            return 0;
        }
        char c = s[0];
        if (c == '\'' || c == '"') {
            if (lex_string(lx, &i) < 0) return -1;
        } else if (isdigit((unsigned char)c)) {
            if (lex_number(lx, &i) < 0) return -1;
        } else if (isalpha((unsigned char)c) || c == '_') {
            size_t j = i;
            while (j < lx->len && (isalnum((unsigned char)lx->src[j]) || lx->src[j] == '_')) j++;
            token *t = lex_push(lx, T_NAME, i);
            if (!t) return lex_fail(lx, i, "out of memory");
            t->s = arena_strndup(lx->ar, s, j - i);
            if (!t->s) return lex_fail(lx, i, "out of memory");
            t->len = j - i;
            i = j;
        } else {
            int k;
            for (k = 0; lex_ops[k]; k++) {
                size_t ol = strlen(lex_ops[k]);
                if (rest >= ol && memcmp(s, lex_ops[k], ol) == 0) break;
            }
            if (!lex_ops[k]) {
                char msg[64];
                snprintf(msg, sizeof msg, "unexpected char '%c'", c);
                return lex_fail(lx, i, msg);
            }
            token *t = lex_push(lx, T_OP, i);
            if (!t) return lex_fail(lx, i, "out of memory");
            t->s = lex_ops[k];
            t->len = strlen(lex_ops[k]);
            if (c == '(' || c == '[' || c == '{') nest++;
            if ((c == ')' || c == ']' || c == '}') && nest > 0) nest--;
            i += t->len;
        }
    }
}

/* after a closing tag: '-' strips all whitespace, trim_blocks one newline */
static size_t skip_after(lexer *lx, size_t i, int how)
{
    if (how == 1) {
        while (i < lx->len && is_ws(lx->src[i])) i++;
    } else if (how == 2) {
        if (i < lx->len && lx->src[i] == '\n') i++;
    }
    return i;
}

/* Text before a tag: '-' rstrips it; lstrip_blocks removes the tag's indentation when only
 * whitespace precedes it on its line (jinja2: not for '+', not for {{ }}). */
static size_t trim_before(lexer *lx, size_t start, size_t end, char modifier, bool is_var, bool line_starting)
{
    if (modifier == '-') {
        while (end > start && is_ws(lx->src[end - 1])) end--;
        return end;
    }
    if (modifier == '+' || is_var) return end;
    size_t l = end;
    while (l > start && lx->src[l - 1] != '\n') l--;
    if (l == start && !line_starting) return end;
    if (l == end) return end;
    for (size_t k = l; k < end; k++)
        if (!is_ws(lx->src[k])) return end;
    return l;
}

/* {% raw %}: returns true (and the bounds) when the block tag at i is "raw" */
static bool match_word_tag(lexer *lx, size_t i, const char *word, size_t *tag_end, char *lmod, char *rmod)
{
    /* i points at '{%' */
    size_t j = i + 2;
    *lmod = 0;
    if (j < lx->len && (lx->src[j] == '-' || lx->src[j] == '+')) *lmod = lx->src[j++];
    while (j < lx->len && is_ws(lx->src[j])) j++;
    size_t wl = strlen(word);
    if (j + wl > lx->len || memcmp(lx->src + j, word, wl) != 0) return false;
    j += wl;
    if (j < lx->len && (isalnum((unsigned char)lx->src[j]) || lx->src[j] == '_')) return false;
    while (j < lx->len && is_ws(lx->src[j])) j++;
    *rmod = 0;
    if (j < lx->len && (lx->src[j] == '-' || lx->src[j] == '+')) *rmod = lx->src[j++];
    if (j + 2 > lx->len || lx->src[j] != '%' || lx->src[j + 1] != '}') return false;
    *tag_end = j + 2;
    return true;
}

int tpl_lex_all(lexer *lx)
{
    size_t i = 0;
    bool line_starting = true;
    while (i <= lx->len) {
        size_t s = i;
        while (s + 1 < lx->len && !(lx->src[s] == '{' && (lx->src[s + 1] == '{' || lx->src[s + 1] == '%' || lx->src[s + 1] == '#'))) s++;
        if (s + 1 >= lx->len) {
            if (lex_data(lx, i, i, lx->len) < 0) return -1;
            break;
        }
        char kind = lx->src[s + 1];
        char mod = s + 2 < lx->len ? lx->src[s + 2] : 0;
        if (mod != '-' && mod != '+') mod = 0;
        size_t raw_end;
        char lm, rm;
        bool raw = kind == '%' && match_word_tag(lx, s, "raw", &raw_end, &lm, &rm);
        size_t dend = trim_before(lx, i, s, mod, kind == '{', line_starting);
        if (lex_data(lx, i, i, dend) < 0) return -1;
        if (kind == '#') {
            size_t j = s + 2;
            while (j + 1 < lx->len && !(lx->src[j] == '#' && lx->src[j + 1] == '}')) j++;
            if (j + 1 >= lx->len) return lex_fail(lx, s, "missing end of comment tag");
            int how = lx->src[j - 1] == '-' && j - 1 >= s + 2 + (mod ? 1 : 0) ? 1 : 2;
            if (j >= 1 && lx->src[j - 1] == '+') how = 0;
            i = skip_after(lx, j + 2, how);
            line_starting = i > 0 && lx->src[i - 1] == '\n';
            continue;
        }
        if (raw) {
            size_t j = skip_after(lx, raw_end, rm == '-' ? 1 : 0);
            size_t k = j, tend = 0;
            char elm = 0, erm = 0;
            for (; k + 1 < lx->len; k++)
                if (lx->src[k] == '{' && lx->src[k + 1] == '%' && match_word_tag(lx, k, "endraw", &tend, &elm, &erm)) break;
            if (k + 1 >= lx->len) return lex_fail(lx, s, "missing end of raw directive");
            size_t e = trim_before(lx, j, k, elm, false, false);
            if (lex_data(lx, s, j, e) < 0) return -1;
            i = skip_after(lx, tend, erm == '-' ? 1 : (erm == '+' ? 0 : 2));
            line_starting = i > 0 && lx->src[i - 1] == '\n';
            continue;
        }
        bool block = kind == '%';
        token *t = lex_push(lx, block ? T_BLOCK_BEGIN : T_VAR_BEGIN, s);
        if (!t) return lex_fail(lx, s, "out of memory");
        size_t p = s + 2 + (mod ? 1 : 0);
        int how = 0;
        if (lex_tag(lx, &p, block ? '%' : '}', block, &how) < 0) return -1;
        i = skip_after(lx, p, how == 3 ? 0 : how);
        line_starting = i > 0 && lx->src[i - 1] == '\n';
    }
    token *t = lex_push(lx, T_EOF, lx->len);
    if (!t) return lex_fail(lx, lx->len, "out of memory");
    /* offsets -> line/column in one pass */
    int line = 1, col = 1;
    size_t off = 0;
    for (size_t k = 0; k < lx->n; k++) {
        size_t target = (size_t)lx->toks[k].line;
        while (off < target && off < lx->len) {
            if (lx->src[off] == '\n') line++, col = 1;
            else if (((unsigned char)lx->src[off] & 0xC0) != 0x80) col++;
            off++;
        }
        lx->toks[k].line = line;
        lx->toks[k].col = col;
    }
    return 0;
}

