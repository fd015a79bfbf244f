/* template.c — lexer, parser and tree-walking renderer of the Jinja2 subset chat
 * templates use. The lexer follows jinja2's lexer (whitespace control, trim_blocks,
 * lstrip_blocks, raw); the parser follows jinja2's grammar and precedence; the renderer
 * walks the read-only tree with per-render state kept in an arena, and reports errors by
 * longjmp to the render's entry point (the arena makes that leak-free). */
#include "template/template.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ======================================================================
 * Arena: every AST node (per template) and every runtime value (per render)
 * ====================================================================== */

typedef struct arena_block {
    struct arena_block *next;
    size_t used, cap;
    _Alignas(16) unsigned char data[];
} arena_block;

typedef struct {
    arena_block *head;
    size_t total;     /* bytes obtained from malloc */
    size_t limit;     /* 0 = none */
} arena;

/* NULL when out of memory or over the arena's limit */
static void *arena_alloc(arena *a, size_t n)
{
    n = (n + 15) & ~(size_t)15;
    if (!a->head || a->head->cap - a->head->used < n) {
        size_t cap = n > 65536 ? n : 65536;
        if (a->limit && a->total + cap > a->limit) return NULL;
        arena_block *b = malloc(sizeof *b + cap);
        if (!b) return NULL;
        b->next = a->head;
        b->used = 0;
        b->cap = cap;
        a->head = b;
        a->total += cap;
    }
    void *p = a->head->data + a->head->used;
    a->head->used += n;
    return p;
}

static void arena_free(arena *a)
{
    arena_block *b = a->head;
    while (b) {
        arena_block *n = b->next;
        free(b);
        b = n;
    }
    a->head = NULL;
    a->total = 0;
}

/* ======================================================================
 * Values
 * ====================================================================== */

enum vtype {
    V_UNDEF, V_NONE, V_BOOL, V_INT, V_FLOAT, V_STR,
    V_LIST, V_TUPLE, V_GEN, V_DICT, V_NS,
    V_FUNC, V_METHOD, V_MACRO, V_LOOP, V_CYCLER, V_JOINER, V_RANGE,
    V_UNSET     /* a loop frame's variable from the previous iteration: not visible */
};

typedef struct zstr {
    size_t len;
    bool safe;      /* markupsafe.Markup (from |safe or |e): '+' escapes the other operand */
    char p[];
} zstr;
typedef struct zlist zlist;
typedef struct zdict zdict;
typedef struct zobj zobj;

typedef struct {
    uint8_t t;
    union {
        bool b;
        int64_t i;
        double f;
        zstr *s;        /* V_STR; V_UNDEF: the message an error about it gives (or NULL) */
        zlist *l;       /* V_LIST, V_TUPLE, V_GEN */
        zdict *d;       /* V_DICT, V_NS */
        zobj *o;        /* callables, loop, cycler, joiner, range */
        int fn;         /* V_FUNC: builtin id */
    } u;
} val;

struct zlist { size_t n, cap; val *v; };
struct zdict { size_t n, cap; val *k; val *v; };

/* ======================================================================
 * AST
 * ====================================================================== */

enum nkind {
    /* expressions */
    N_CONST, N_NAME, N_LIST, N_TUPLE, N_DICT, N_GETATTR, N_GETITEM, N_SLICE, N_CALL,
    N_FILTER, N_TEST, N_BINOP, N_NEG, N_POS, N_NOT, N_AND, N_OR, N_COMPARE, N_COND,
    /* statements */
    S_DATA, S_PRINT, S_IF, S_FOR, S_SET, S_SETBLOCK, S_MACRO, S_CALLBLOCK, S_FILTERBLOCK,
    S_BREAK, S_CONTINUE, S_BODY, S_WITH
};

typedef struct node node;
struct node {
    uint8_t kind;
    int line, col;
    const char *name;      /* N_NAME, N_GETATTR, N_FILTER, N_TEST, N_BINOP/N_COMPARE ops, S_MACRO */
    val cval;              /* N_CONST */
    node *a, *b, *c, *d;   /* children; meaning per kind */
    node **items;          /* args / list items / body statements / compare operands */
    size_t n;
    const char **kwn;      /* keyword argument names (calls, filters, tests), macro param names */
    node **kwv;            /* keyword argument values, macro defaults (NULL = none) */
    size_t nkw;
    const char **ops;      /* N_COMPARE: operators between items */
    bool flag;             /* N_TEST: negated; S_FOR: recursive */
};

struct zse_template {
    arena ar;
    node *root;
};

/* ======================================================================
 * Lexer
 * ====================================================================== */

enum tkind { T_EOF, T_DATA, T_VAR_BEGIN, T_VAR_END, T_BLOCK_BEGIN, T_BLOCK_END,
             T_NAME, T_STRING, T_INT, T_FLOAT, T_OP };

typedef struct {
    uint8_t kind;
    int line, col;
    const char *s;     /* T_DATA / T_STRING: decoded text; T_NAME / T_OP: spelling */
    size_t len;
    int64_t i;
    double f;
} token;

typedef struct {
    const char *src;   /* newline-normalized source */
    size_t len;
    arena *ar;
    token *toks;
    size_t n, cap;
    char err[512];
    int depth;
    size_t pos;        /* parser cursor */
} lexer;

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
    char *p = arena_alloc(a, n + 1);
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

static void put_utf8(char *out, size_t *o, uint32_t cp)
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
    char *out = arena_alloc(lx->ar, rawlen * 2 + 1);  /* \xNN (4 bytes) never grows past 2x */
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
                put_utf8(out, &o, v);
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
            put_utf8(out, &o, v);
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

static int lex_all(lexer *lx)
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

/* ======================================================================
 * Parser (jinja2's grammar and precedence). Errors longjmp to zse_template_parse.
 * ====================================================================== */

typedef struct {
    lexer lx;
    jmp_buf jb;
} parser;

#define PARSE_MAX_DEPTH 200

static _Noreturn void perr(parser *ps, const token *t, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static _Noreturn void perr(parser *ps, const token *t, const char *fmt, ...)
{
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (!ps->lx.err[0]) snprintf(ps->lx.err, sizeof ps->lx.err, "line %d, column %d: %s", t->line, t->col, msg);
    longjmp(ps->jb, 1);
}

static token *cur(parser *ps) { return &ps->lx.toks[ps->lx.pos]; }
static token *advance(parser *ps)
{
    token *t = cur(ps);
    if (t->kind != T_EOF) ps->lx.pos++;
    return t;
}
static bool is_op(const token *t, const char *op) { return t->kind == T_OP && strcmp(t->s, op) == 0; }
static bool is_name(const token *t, const char *n) { return t->kind == T_NAME && strcmp(t->s, n) == 0; }
static bool skip_op(parser *ps, const char *op)
{
    if (is_op(cur(ps), op)) {
        advance(ps);
        return true;
    }
    return false;
}
static bool skip_name(parser *ps, const char *n)
{
    if (is_name(cur(ps), n)) {
        advance(ps);
        return true;
    }
    return false;
}
static const char *tok_desc(const token *t)
{
    switch (t->kind) {
    case T_EOF: return "end of template";
    case T_BLOCK_END: return "end of statement block";
    case T_VAR_END: return "end of print statement";
    case T_BLOCK_BEGIN: return "begin of statement block";
    case T_VAR_BEGIN: return "begin of print statement";
    case T_STRING: return "string";
    case T_INT: return "integer";
    case T_FLOAT: return "float";
    default: return t->s;
    }
}
static void expect_op(parser *ps, const char *op)
{
    if (!skip_op(ps, op)) perr(ps, cur(ps), "expected token '%s', got '%s'", op, tok_desc(cur(ps)));
}
static const char *expect_name(parser *ps)
{
    if (cur(ps)->kind != T_NAME) perr(ps, cur(ps), "expected name, got '%s'", tok_desc(cur(ps)));
    return advance(ps)->s;
}
static void expect_block_end(parser *ps)
{
    if (cur(ps)->kind != T_BLOCK_END) perr(ps, cur(ps), "expected token 'end of statement block', got '%s'", tok_desc(cur(ps)));
    advance(ps);
}

static node *mk(parser *ps, int kind, const token *t)
{
    node *n = arena_alloc(ps->lx.ar, sizeof *n);
    if (!n) perr(ps, t, "out of memory");
    memset(n, 0, sizeof *n);
    n->kind = (uint8_t)kind;
    n->line = t->line;
    n->col = t->col;
    return n;
}

/* growable node-pointer vector in the arena */
typedef struct { node **v; size_t n, cap; } nvec;
static void nv_push(parser *ps, nvec *v, node *x)
{
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 4;
        node **nn = arena_alloc(ps->lx.ar, cap * sizeof *nn);
        if (!nn) perr(ps, cur(ps), "out of memory");
        if (v->n) memcpy(nn, v->v, v->n * sizeof *nn);
        v->v = nn;
        v->cap = cap;
    }
    v->v[v->n++] = x;
}
typedef struct { const char **v; size_t n, cap; } svec;
static void sv_push(parser *ps, svec *v, const char *x)
{
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 4;
        const char **nn = arena_alloc(ps->lx.ar, cap * sizeof *nn);
        if (!nn) perr(ps, cur(ps), "out of memory");
        if (v->n) memcpy(nn, v->v, v->n * sizeof *nn);
        v->v = nn;
        v->cap = cap;
    }
    v->v[v->n++] = x;
}

static node *parse_expr(parser *ps);
static node *parse_or(parser *ps);
static node *parse_unary(parser *ps, bool with_filter);
static node *parse_primary(parser *ps);
static node *parse_postfix(parser *ps, node *n);

static void enter(parser *ps)
{
    if (++ps->lx.depth > PARSE_MAX_DEPTH) perr(ps, cur(ps), "template nesting too deep (more than %d levels)", PARSE_MAX_DEPTH);
}
static void leave(parser *ps) { ps->lx.depth--; }

/* (args, kw=args) after '(' was seen */
static void parse_call_args(parser *ps, node *n)
{
    nvec args = {0}, kwv = {0};
    svec kwn = {0};
    while (!is_op(cur(ps), ")")) {
        if (args.n || kwn.n) {
            expect_op(ps, ",");
            if (is_op(cur(ps), ")")) break;
        }
        token *t = cur(ps);
        if (t->kind == T_NAME && is_op(&ps->lx.toks[ps->lx.pos + 1], "=")) {
            advance(ps);
            advance(ps);
            sv_push(ps, &kwn, t->s);
            nv_push(ps, &kwv, parse_expr(ps));
        } else {
            if (kwn.n) perr(ps, t, "positional argument follows keyword argument");
            nv_push(ps, &args, parse_expr(ps));
        }
    }
    expect_op(ps, ")");
    n->items = args.v;
    n->n = args.n;
    n->kwn = kwn.v;
    n->kwv = kwv.v;
    n->nkw = kwn.n;
}

static node *parse_tuple_or_expr(parser *ps, bool explicit_parens)
{
    token *t = cur(ps);
    nvec items = {0};
    bool is_tuple = false;
    for (;;) {
        if (items.n) {
            if (!skip_op(ps, ",")) break;
            is_tuple = true;
        }
        token *c = cur(ps);
        if (c->kind == T_VAR_END || c->kind == T_BLOCK_END || is_op(c, ")") || (items.n && (is_name(c, "in") || is_op(c, "=")))) break;
        nv_push(ps, &items, parse_expr(ps));
    }
    if (!is_tuple) {
        if (items.n == 0) {
            if (!explicit_parens) perr(ps, t, "expected an expression, got '%s'", tok_desc(t));
        } else {
            return items.v[0];
        }
    }
    node *n = mk(ps, N_TUPLE, t);
    n->items = items.v;
    n->n = items.n;
    return n;
}

static node *parse_primary(parser *ps)
{
    token *t = cur(ps);
    node *n;
    enter(ps);
    if (t->kind == T_NAME) {
        advance(ps);
        n = mk(ps, N_CONST, t);
        if (!strcmp(t->s, "true") || !strcmp(t->s, "True")) n->cval = (val){.t = V_BOOL, .u.b = true};
        else if (!strcmp(t->s, "false") || !strcmp(t->s, "False")) n->cval = (val){.t = V_BOOL, .u.b = false};
        else if (!strcmp(t->s, "none") || !strcmp(t->s, "None")) n->cval = (val){.t = V_NONE};
        else {
            n->kind = N_NAME;
            n->name = t->s;
        }
    } else if (t->kind == T_STRING) {
        /* adjacent literals concatenate */
        size_t total = 0, k = ps->lx.pos;
        while (ps->lx.toks[k].kind == T_STRING) total += ps->lx.toks[k++].len;
        zstr *s = arena_alloc(ps->lx.ar, sizeof *s + total + 1);
        if (!s) perr(ps, t, "out of memory");
        s->len = 0;
        s->safe = false;
        while (cur(ps)->kind == T_STRING) {
            token *st = advance(ps);
            memcpy(s->p + s->len, st->s, st->len);
            s->len += st->len;
        }
        s->p[s->len] = 0;
        n = mk(ps, N_CONST, t);
        n->cval = (val){.t = V_STR, .u.s = s};
    } else if (t->kind == T_INT) {
        advance(ps);
        n = mk(ps, N_CONST, t);
        n->cval = (val){.t = V_INT, .u.i = t->i};
    } else if (t->kind == T_FLOAT) {
        advance(ps);
        n = mk(ps, N_CONST, t);
        n->cval = (val){.t = V_FLOAT, .u.f = t->f};
    } else if (is_op(t, "(")) {
        advance(ps);
        n = parse_tuple_or_expr(ps, true);
        expect_op(ps, ")");
    } else if (is_op(t, "[")) {
        advance(ps);
        nvec items = {0};
        while (!is_op(cur(ps), "]")) {
            if (items.n) {
                expect_op(ps, ",");
                if (is_op(cur(ps), "]")) break;
            }
            nv_push(ps, &items, parse_expr(ps));
        }
        expect_op(ps, "]");
        n = mk(ps, N_LIST, t);
        n->items = items.v;
        n->n = items.n;
    } else if (is_op(t, "{")) {
        advance(ps);
        nvec keys = {0}, vals = {0};
        while (!is_op(cur(ps), "}")) {
            if (keys.n) {
                expect_op(ps, ",");
                if (is_op(cur(ps), "}")) break;
            }
            nv_push(ps, &keys, parse_expr(ps));
            expect_op(ps, ":");
            nv_push(ps, &vals, parse_expr(ps));
        }
        expect_op(ps, "}");
        n = mk(ps, N_DICT, t);
        n->items = keys.v;
        n->kwv = vals.v;
        n->n = keys.n;
    } else {
        perr(ps, t, "unexpected '%s'", tok_desc(t));
    }
    leave(ps);
    return n;
}

static node *parse_subscript(parser *ps, node *obj)
{
    token *t = advance(ps);
    if (is_op(t, ".")) {
        token *a = cur(ps);
        node *n = mk(ps, N_GETATTR, t);
        n->a = obj;
        if (a->kind == T_NAME) {
            n->name = advance(ps)->s;
        } else if (a->kind == T_INT) {
            advance(ps);
            n->kind = N_GETITEM;
            n->b = mk(ps, N_CONST, a);
            n->b->cval = (val){.t = V_INT, .u.i = a->i};
        } else {
            perr(ps, a, "expected name or number");
        }
        return n;
    }
    /* '[' : index or slice */
    node *parts[3] = {NULL, NULL, NULL};
    bool slice = false;
    int k = 0;
    for (;;) {
        if (is_op(cur(ps), ":")) {
            advance(ps);
            slice = true;
            if (++k > 2) perr(ps, cur(ps), "invalid slice");
            continue;
        }
        if (is_op(cur(ps), "]")) break;
        if (parts[k]) perr(ps, cur(ps), "expected ']'");
        parts[k] = parse_expr(ps);
    }
    expect_op(ps, "]");
    node *n = mk(ps, slice ? N_SLICE : N_GETITEM, t);
    n->a = obj;
    if (slice) {
        n->b = parts[0];
        n->c = parts[1];
        n->d = parts[2];
    } else {
        if (!parts[0]) perr(ps, t, "expected an expression inside []");
        n->b = parts[0];
    }
    return n;
}

static node *parse_postfix(parser *ps, node *n)
{
    for (;;) {
        token *t = cur(ps);
        if (is_op(t, ".") || is_op(t, "[")) {
            n = parse_subscript(ps, n);
        } else if (is_op(t, "(")) {
            advance(ps);
            node *c = mk(ps, N_CALL, t);
            c->a = n;
            parse_call_args(ps, c);
            n = c;
        } else {
            return n;
        }
    }
}

static const char *parse_dotted_name(parser *ps)
{
    const char *name = expect_name(ps);
    while (is_op(cur(ps), ".") && ps->lx.toks[ps->lx.pos + 1].kind == T_NAME) {
        advance(ps);
        const char *more = advance(ps)->s;
        size_t l = strlen(name) + strlen(more) + 2;
        char *j = arena_alloc(ps->lx.ar, l);
        if (!j) perr(ps, cur(ps), "out of memory");
        snprintf(j, l, "%s.%s", name, more);
        name = j;
    }
    return name;
}

static node *parse_filter(parser *ps, node *obj, bool start_inline)
{
    while (start_inline || is_op(cur(ps), "|")) {
        token *t = start_inline ? cur(ps) : advance(ps);
        start_inline = false;
        node *f = mk(ps, N_FILTER, t);
        f->a = obj;
        f->name = parse_dotted_name(ps);
        if (skip_op(ps, "(")) parse_call_args(ps, f);
        obj = f;
    }
    return obj;
}

static node *parse_test(parser *ps, node *obj)
{
    token *t = advance(ps); /* 'is' */
    node *n = mk(ps, N_TEST, t);
    n->a = obj;
    n->flag = skip_name(ps, "not");
    n->name = parse_dotted_name(ps);
    token *c = cur(ps);
    if (is_op(c, "(")) {
        advance(ps);
        parse_call_args(ps, n);
    } else if ((c->kind == T_NAME || c->kind == T_STRING || c->kind == T_INT || c->kind == T_FLOAT || is_op(c, "(") || is_op(c, "[") || is_op(c, "{")) &&
               !is_name(c, "else") && !is_name(c, "or") && !is_name(c, "and")) {
        if (is_name(c, "is")) perr(ps, c, "You cannot chain multiple tests with is");
        node *arg = parse_postfix(ps, parse_primary(ps));
        node **items = arena_alloc(ps->lx.ar, sizeof *items);
        if (!items) perr(ps, c, "out of memory");
        items[0] = arg;
        n->items = items;
        n->n = 1;
    }
    return n;
}

static node *parse_unary(parser *ps, bool with_filter)
{
    token *t = cur(ps);
    node *n;
    enter(ps);
    if (is_op(t, "-") || is_op(t, "+")) {
        advance(ps);
        n = mk(ps, is_op(t, "-") ? N_NEG : N_POS, t);
        n->a = parse_unary(ps, false);
    } else {
        n = parse_primary(ps);
    }
    n = parse_postfix(ps, n);
    if (with_filter) {
        for (;;) {
            if (is_op(cur(ps), "|")) n = parse_filter(ps, n, false);
            else if (is_name(cur(ps), "is")) n = parse_test(ps, n);
            else if (is_op(cur(ps), "(")) n = parse_postfix(ps, n);
            else break;
        }
    }
    leave(ps);
    return n;
}

static node *binop(parser *ps, token *t, const char *op, node *l, node *r)
{
    node *n = mk(ps, N_BINOP, t);
    n->name = op;
    n->a = l;
    n->b = r;
    return n;
}

static node *parse_pow(parser *ps)
{
    node *l = parse_unary(ps, true);
    while (is_op(cur(ps), "**")) {
        token *t = advance(ps);
        l = binop(ps, t, "**", l, parse_unary(ps, true));
    }
    return l;
}

static node *parse_math2(parser *ps)
{
    node *l = parse_pow(ps);
    while (is_op(cur(ps), "*") || is_op(cur(ps), "/") || is_op(cur(ps), "//") || is_op(cur(ps), "%")) {
        token *t = advance(ps);
        l = binop(ps, t, t->s, l, parse_pow(ps));
    }
    return l;
}

static node *parse_concat(parser *ps)
{
    node *l = parse_math2(ps);
    while (is_op(cur(ps), "~")) {
        token *t = advance(ps);
        l = binop(ps, t, "~", l, parse_math2(ps));
    }
    return l;
}

static node *parse_math1(parser *ps)
{
    node *l = parse_concat(ps);
    while (is_op(cur(ps), "+") || is_op(cur(ps), "-")) {
        token *t = advance(ps);
        l = binop(ps, t, t->s, l, parse_concat(ps));
    }
    return l;
}

static node *parse_compare(parser *ps)
{
    token *t0 = cur(ps);
    node *first = parse_math1(ps);
    nvec items = {0};
    svec ops = {0};
    for (;;) {
        token *t = cur(ps);
        const char *op = NULL;
        if (t->kind == T_OP && (!strcmp(t->s, "==") || !strcmp(t->s, "!=") || !strcmp(t->s, "<") || !strcmp(t->s, ">") ||
                                !strcmp(t->s, "<=") || !strcmp(t->s, ">="))) {
            op = t->s;
            advance(ps);
        } else if (is_name(t, "in")) {
            op = "in";
            advance(ps);
        } else if (is_name(t, "not") && is_name(&ps->lx.toks[ps->lx.pos + 1], "in")) {
            op = "notin";
            advance(ps);
            advance(ps);
        } else {
            break;
        }
        if (!items.n) nv_push(ps, &items, first);
        sv_push(ps, &ops, op);
        nv_push(ps, &items, parse_math1(ps));
    }
    if (!items.n) return first;
    node *n = mk(ps, N_COMPARE, t0);
    n->items = items.v;
    n->n = items.n;
    n->ops = ops.v;
    return n;
}

static node *parse_not(parser *ps)
{
    if (is_name(cur(ps), "not")) {
        token *t = advance(ps);
        enter(ps);
        node *n = mk(ps, N_NOT, t);
        n->a = parse_not(ps);
        leave(ps);
        return n;
    }
    return parse_compare(ps);
}

static node *parse_and(parser *ps)
{
    node *l = parse_not(ps);
    while (is_name(cur(ps), "and")) {
        token *t = advance(ps);
        node *n = mk(ps, N_AND, t);
        n->a = l;
        n->b = parse_not(ps);
        l = n;
    }
    return l;
}

static node *parse_or(parser *ps)
{
    node *l = parse_and(ps);
    while (is_name(cur(ps), "or")) {
        token *t = advance(ps);
        node *n = mk(ps, N_OR, t);
        n->a = l;
        n->b = parse_and(ps);
        l = n;
    }
    return l;
}

/* condexpr: or ['if' or ['else' condexpr]] */
static node *parse_expr(parser *ps)
{
    enter(ps);
    node *n = parse_or(ps);
    while (is_name(cur(ps), "if")) {
        token *t = advance(ps);
        node *c = mk(ps, N_COND, t);
        c->a = n;
        c->b = parse_or(ps);
        if (skip_name(ps, "else")) c->c = parse_expr(ps);
        n = c;
    }
    leave(ps);
    return n;
}

/* assignment target: name, dotted ns.attr, or tuple of names */
static node *parse_target(parser *ps, bool allow_attr)
{
    token *t = cur(ps);
    nvec items = {0};
    bool tuple = false;
    bool paren = skip_op(ps, "(");
    for (;;) {
        token *nt = cur(ps);
        const char *name = expect_name(ps);
        node *n = mk(ps, N_NAME, nt);
        n->name = name;
        if (allow_attr && !items.n && is_op(cur(ps), ".")) {
            advance(ps);
            node *g = mk(ps, N_GETATTR, nt);
            g->a = n;
            g->name = expect_name(ps);
            return g;
        }
        nv_push(ps, &items, n);
        if (!skip_op(ps, ",")) break;
        tuple = true;
        if (paren && is_op(cur(ps), ")")) break;
    }
    if (paren) expect_op(ps, ")");
    if (!tuple && !paren) return items.v[0];
    if (!tuple) return items.v[0];
    node *n = mk(ps, N_TUPLE, t);
    n->items = items.v;
    n->n = items.n;
    return n;
}

/* statements up to one of the end words (the matched word is left current) */
static node *parse_body(parser *ps, const char *const *ends, const char **which);

static node *body_node(parser *ps, token *t, nvec *v)
{
    node *b = mk(ps, S_BODY, t);
    b->items = v->v;
    b->n = v->n;
    return b;
}

static node *parse_if(parser *ps, token *t)
{
    static const char *const ends[] = {"elif", "else", "endif", NULL};
    node *n = mk(ps, S_IF, t);
    n->a = parse_tuple_or_expr(ps, false);
    expect_block_end(ps);
    const char *which;
    n->b = parse_body(ps, ends, &which);
    token *w = advance(ps);
    if (!strcmp(which, "elif")) {
        n->c = parse_if(ps, w);
        return n;
    }
    if (!strcmp(which, "else")) {
        static const char *const ends2[] = {"endif", NULL};
        expect_block_end(ps);
        n->c = parse_body(ps, ends2, &which);
        advance(ps);
    }
    expect_block_end(ps);
    return n;
}

static node *parse_for(parser *ps, token *t)
{
    static const char *const ends[] = {"else", "endfor", NULL};
    node *n = mk(ps, S_FOR, t);
    n->a = parse_target(ps, false);
    if (!skip_name(ps, "in")) perr(ps, cur(ps), "expected 'in', got '%s'", tok_desc(cur(ps)));
    /* the iterable: a tuple without 'if' conditions (jinja2: with_condexpr=False) */
    token *it = cur(ps);
    nvec items = {0};
    bool tuple = false;
    for (;;) {
        nv_push(ps, &items, parse_or(ps));
        if (!skip_op(ps, ",")) break;
        tuple = true;
        if (cur(ps)->kind == T_BLOCK_END || is_name(cur(ps), "if") || is_name(cur(ps), "recursive")) break;
    }
    if (tuple) {
        n->b = mk(ps, N_TUPLE, it);
        n->b->items = items.v;
        n->b->n = items.n;
    } else {
        n->b = items.v[0];
    }
    if (skip_name(ps, "if")) n->c = parse_expr(ps);
    if (skip_name(ps, "recursive")) n->flag = true;
    expect_block_end(ps);
    const char *which;
    n->d = parse_body(ps, ends, &which);
    advance(ps);
    if (!strcmp(which, "else")) {
        static const char *const ends2[] = {"endfor", NULL};
        expect_block_end(ps);
        node *e = parse_body(ps, ends2, &which);
        advance(ps);
        /* else body hangs off the body node's 'a' */
        n->d->a = e;
    }
    expect_block_end(ps);
    return n;
}

static node *parse_set(parser *ps, token *t)
{
    node *target = parse_target(ps, true);
    if (skip_op(ps, "=")) {
        node *n = mk(ps, S_SET, t);
        n->a = target;
        n->b = parse_tuple_or_expr(ps, false);
        expect_block_end(ps);
        return n;
    }
    node *n = mk(ps, S_SETBLOCK, t);
    n->a = target;
    if (is_op(cur(ps), "|")) n->c = parse_filter(ps, NULL, false);
    expect_block_end(ps);
    static const char *const ends[] = {"endset", NULL};
    const char *which;
    n->b = parse_body(ps, ends, &which);
    advance(ps);
    expect_block_end(ps);
    return n;
}

static void parse_signature(parser *ps, node *n)
{
    svec names = {0};
    nvec defs = {0};
    expect_op(ps, "(");
    while (!is_op(cur(ps), ")")) {
        if (names.n) expect_op(ps, ",");
        const char *nm = expect_name(ps);
        sv_push(ps, &names, nm);
        if (skip_op(ps, "=")) nv_push(ps, &defs, parse_expr(ps));
        else {
            if (defs.n && defs.v[defs.n - 1]) perr(ps, cur(ps), "non-default argument follows default argument");
            nv_push(ps, &defs, NULL);
        }
    }
    expect_op(ps, ")");
    n->kwn = names.v;
    n->kwv = defs.v;
    n->nkw = names.n;
}

static node *parse_macro(parser *ps, token *t)
{
    node *n = mk(ps, S_MACRO, t);
    n->name = expect_name(ps);
    parse_signature(ps, n);
    expect_block_end(ps);
    static const char *const ends[] = {"endmacro", NULL};
    const char *which;
    n->b = parse_body(ps, ends, &which);
    advance(ps);
    if (cur(ps)->kind == T_NAME) advance(ps); /* {% endmacro name %} */
    expect_block_end(ps);
    return n;
}

static node *parse_call_block(parser *ps, token *t)
{
    node *n = mk(ps, S_CALLBLOCK, t);
    if (is_op(cur(ps), "(")) parse_signature(ps, n);
    n->a = parse_expr(ps);
    if (n->a->kind != N_CALL) perr(ps, t, "expected call");
    expect_block_end(ps);
    static const char *const ends[] = {"endcall", NULL};
    const char *which;
    n->b = parse_body(ps, ends, &which);
    advance(ps);
    expect_block_end(ps);
    return n;
}

static node *parse_statement(parser *ps)
{
    advance(ps); /* block begin */
    token *t = cur(ps);
    if (t->kind != T_NAME) perr(ps, t, "tag name expected");
    advance(ps);
    const char *w = t->s;
    enter(ps);
    node *n;
    if (!strcmp(w, "if")) n = parse_if(ps, t);
    else if (!strcmp(w, "for")) n = parse_for(ps, t);
    else if (!strcmp(w, "set")) n = parse_set(ps, t);
    else if (!strcmp(w, "macro")) n = parse_macro(ps, t);
    else if (!strcmp(w, "call")) n = parse_call_block(ps, t);
    else if (!strcmp(w, "break") || !strcmp(w, "continue")) {
        n = mk(ps, w[0] == 'b' ? S_BREAK : S_CONTINUE, t);
        expect_block_end(ps);
    } else if (!strcmp(w, "filter")) {
        n = mk(ps, S_FILTERBLOCK, t);
        n->a = parse_filter(ps, NULL, true);
        expect_block_end(ps);
        static const char *const ends[] = {"endfilter", NULL};
        const char *which;
        n->b = parse_body(ps, ends, &which);
        advance(ps);
        expect_block_end(ps);
    } else if (!strcmp(w, "generation")) {
        /* transformers' AssistantTracker: renders its body unchanged */
        expect_block_end(ps);
        static const char *const ends[] = {"endgeneration", NULL};
        const char *which;
        n = parse_body(ps, ends, &which);
        advance(ps);
        expect_block_end(ps);
    } else if (!strcmp(w, "with")) {
        n = mk(ps, S_WITH, t);
        nvec tg = {0}, vals = {0};
        while (cur(ps)->kind != T_BLOCK_END) {
            if (tg.n) expect_op(ps, ",");
            nv_push(ps, &tg, parse_target(ps, false));
            expect_op(ps, "=");
            nv_push(ps, &vals, parse_expr(ps));
        }
        expect_block_end(ps);
        n->items = tg.v;
        n->kwv = vals.v;
        n->n = tg.n;
        static const char *const ends[] = {"endwith", NULL};
        const char *which;
        n->b = parse_body(ps, ends, &which);
        advance(ps);
        expect_block_end(ps);
    } else {
        perr(ps, t, "Encountered unknown tag '%s'.", w);
    }
    leave(ps);
    return n;
}

static node *parse_body(parser *ps, const char *const *ends, const char **which)
{
    token *t0 = cur(ps);
    nvec v = {0};
    for (;;) {
        token *t = cur(ps);
        if (t->kind == T_EOF) {
            if (ends) {
                char want[128] = "";
                for (int k = 0; ends[k]; k++)
                    snprintf(want + strlen(want), sizeof want - strlen(want), "%s'%s'", k ? " or " : "", ends[k]);
                perr(ps, t, "Unexpected end of template. Jinja was looking for the following tags: %s.", want);
            }
            break;
        }
        if (t->kind == T_DATA) {
            advance(ps);
            node *n = mk(ps, S_DATA, t);
            zstr *s = arena_alloc(ps->lx.ar, sizeof *s + t->len + 1);
            if (!s) perr(ps, t, "out of memory");
            s->len = t->len;
            s->safe = false;
            memcpy(s->p, t->s, t->len);
            s->p[t->len] = 0;
            n->cval = (val){.t = V_STR, .u.s = s};
            nv_push(ps, &v, n);
        } else if (t->kind == T_VAR_BEGIN) {
            advance(ps);
            node *n = mk(ps, S_PRINT, t);
            n->a = parse_tuple_or_expr(ps, false);
            if (cur(ps)->kind != T_VAR_END) perr(ps, cur(ps), "expected token 'end of print statement', got '%s'", tok_desc(cur(ps)));
            advance(ps);
            nv_push(ps, &v, n);
        } else if (t->kind == T_BLOCK_BEGIN) {
            token *w = &ps->lx.toks[ps->lx.pos + 1];
            if (ends && w->kind == T_NAME) {
                for (int k = 0; ends[k]; k++)
                    if (!strcmp(w->s, ends[k])) {
                        advance(ps);
                        *which = ends[k];
                        return body_node(ps, t0, &v);
                    }
            }
            if (w->kind == T_NAME && (!strncmp(w->s, "end", 3) || !strcmp(w->s, "elif") || !strcmp(w->s, "else")))
                perr(ps, w, "Encountered unknown tag '%s'.", w->s);
            nv_push(ps, &v, parse_statement(ps));
        } else {
            perr(ps, t, "unexpected '%s'", tok_desc(t));
        }
    }
    return body_node(ps, t0, &v);
}

zse_template *zse_template_parse(const char *src, size_t len)
{
    zse_template *t = zse_calloc(1, sizeof *t);
    if (!t) return NULL;
    parser *ps = zse_calloc(1, sizeof *ps);
    if (!ps) {
        free(t);
        return NULL;
    }
    /* jinja2 normalizes \r\n and \r to \n and drops one trailing newline */
    char *norm = arena_alloc(&t->ar, len + 1);
    if (!norm) goto oom;
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        if (src[i] == '\r') {
            norm[o++] = '\n';
            if (i + 1 < len && src[i + 1] == '\n') i++;
        } else {
            norm[o++] = src[i];
        }
    }
    if (o && norm[o - 1] == '\n') o--;
    norm[o] = 0;
    ps->lx.src = norm;
    ps->lx.len = o;
    ps->lx.ar = &t->ar;
    if (lex_all(&ps->lx) < 0) goto fail;
    if (setjmp(ps->jb)) goto fail;
    t->root = parse_body(ps, NULL, NULL);
    free(ps->lx.toks);
    free(ps);
    return t;
oom:
    snprintf(ps->lx.err, sizeof ps->lx.err, "out of memory parsing a template of %zu bytes", len);
fail:
    zse_fail("%s", ps->lx.err);
    free(ps->lx.toks);
    free(ps);
    arena_free(&t->ar);
    free(t);
    return NULL;
}

void zse_template_free(zse_template *t)
{
    if (!t) return;
    arena_free(&t->ar);
    free(t);
}

/* ======================================================================
 * Render state
 * ====================================================================== */

typedef struct frame {
    zdict *vars;
    struct frame *parent;
} frame;

typedef struct { char *p; size_t n, cap; } obuf;

struct zobj {
    int kind;               /* V_METHOD, V_MACRO, V_LOOP, V_CYCLER, V_JOINER, V_RANGE */
    val self;               /* V_METHOD: receiver */
    const char *name;       /* V_METHOD: method name */
    const node *def;        /* V_MACRO: S_MACRO or S_CALLBLOCK */
    frame *scope;           /* V_MACRO: caller's frame (call blocks) */
    val caller;             /* V_MACRO: the caller() for a call block's macro */
    zlist *items;           /* V_LOOP: the iterated items; V_CYCLER: the items */
    int64_t idx;            /* V_LOOP: index0; V_CYCLER: position; V_JOINER: used */
    int64_t a, b, c;        /* V_RANGE: start, stop, step */
    zstr *sep;              /* V_JOINER */
};

typedef struct {
    arena ar;
    jmp_buf jb;
    obuf *out;
    char err[ZSE_ERROR_MAX];
    long steps;
    int depth;
    int brk;                /* 1 break, 2 continue */
    frame *root;            /* the template's top level: what macros see */
    frame *f;               /* the current scope */
    const void *printing[ZSE_TEMPLATE_MAX_DEPTH]; /* containers being printed (cycle check) */
    int nprinting;
} rctx;

static _Noreturn void rfail(rctx *c, const node *n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static _Noreturn void rfail(rctx *c, const node *n, const char *fmt, ...)
{
    char msg[ZSE_ERROR_MAX - 64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n) snprintf(c->err, sizeof c->err, "%d:%d: %s", n->line, n->col, msg);
    else snprintf(c->err, sizeof c->err, "%s", msg);
    longjmp(c->jb, 1);
}

/* raise_exception: the template's own message, verbatim */
static _Noreturn void rraise(rctx *c, const char *msg, size_t len)
{
    size_t l = len < sizeof c->err - 1 ? len : sizeof c->err - 1;
    memcpy(c->err, msg, l);
    c->err[l] = 0;
    longjmp(c->jb, 1);
}

static void *ralloc(rctx *c, size_t n)
{
    void *p = arena_alloc(&c->ar, n);
    if (!p) rfail(c, NULL, "template render ran out of memory (limit %zu MiB)", c->ar.limit >> 20);
    return p;
}

static const val UNDEF = {.t = V_UNDEF};
static const val NONE = {.t = V_NONE};
static val mkbool(bool b) { return (val){.t = V_BOOL, .u.b = b}; }
static val mkint(int64_t i) { return (val){.t = V_INT, .u.i = i}; }
static val mkfloat(double f) { return (val){.t = V_FLOAT, .u.f = f}; }

static zstr *zs_new(rctx *c, const char *p, size_t n)
{
    zstr *s = ralloc(c, sizeof *s + n + 1);
    s->len = n;
    s->safe = false;
    if (n) memcpy(s->p, p, n);
    s->p[n] = 0;
    return s;
}
static val mkstrn(rctx *c, const char *p, size_t n) { return (val){.t = V_STR, .u.s = zs_new(c, p, n)}; }
static val mkstr(rctx *c, const char *p) { return mkstrn(c, p, strlen(p)); }

static val mkundef(rctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static val mkundef(rctx *c, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return (val){.t = V_UNDEF, .u.s = zs_new(c, msg, strlen(msg))};
}

static zlist *zl_new(rctx *c, size_t cap)
{
    zlist *l = ralloc(c, sizeof *l);
    l->n = 0;
    l->cap = cap;
    l->v = cap ? ralloc(c, cap * sizeof(val)) : NULL;
    return l;
}
static void zl_push(rctx *c, zlist *l, val v)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 8;
        val *nv = ralloc(c, cap * sizeof *nv);
        if (l->n) memcpy(nv, l->v, l->n * sizeof *nv);
        l->v = nv;
        l->cap = cap;
    }
    l->v[l->n++] = v;
}
static val mklist(zlist *l, int t) { return (val){.t = (uint8_t)t, .u.l = l}; }

static zdict *zd_new(rctx *c)
{
    zdict *d = ralloc(c, sizeof *d);
    memset(d, 0, sizeof *d);
    return d;
}
static bool val_eq(const val *a, const val *b);
static bool val_eq_d(const val *a, const val *b, int depth);
static val *zd_find(zdict *d, const val *k)
{
    for (size_t i = 0; i < d->n; i++)
        if (val_eq(&d->k[i], k)) return &d->v[i];
    return NULL;
}
static val *zd_get(zdict *d, const char *key)
{
    size_t kl = strlen(key);
    for (size_t i = 0; i < d->n; i++)
        if (d->k[i].t == V_STR && d->k[i].u.s->len == kl && memcmp(d->k[i].u.s->p, key, kl) == 0) return &d->v[i];
    return NULL;
}
static void zd_set(rctx *c, zdict *d, val k, val v)
{
    val *slot = zd_find(d, &k);
    if (slot) {
        *slot = v;
        return;
    }
    if (d->n == d->cap) {
        size_t cap = d->cap ? d->cap * 2 : 8;
        val *nk = ralloc(c, cap * sizeof *nk), *nv = ralloc(c, cap * sizeof *nv);
        if (d->n) {
            memcpy(nk, d->k, d->n * sizeof *nk);
            memcpy(nv, d->v, d->n * sizeof *nv);
        }
        d->k = nk;
        d->v = nv;
        d->cap = cap;
    }
    d->k[d->n] = k;
    d->v[d->n++] = v;
}
static void zd_sets(rctx *c, zdict *d, const char *key, val v)
{
    val *slot = zd_get(d, key);
    if (slot) *slot = v;
    else zd_set(c, d, mkstr(c, key), v);
}

static zobj *mkobj(rctx *c, int kind)
{
    zobj *o = ralloc(c, sizeof *o);
    memset(o, 0, sizeof *o);
    o->kind = kind;
    return o;
}

/* ---- output buffers --------------------------------------------------- */

static void ob_put(rctx *c, obuf *b, const char *p, size_t n)
{
    if (!n) return;
    if (b->n + n > ZSE_TEMPLATE_MAX_OUTPUT) rfail(c, NULL, "template output exceeds %zu MiB", ZSE_TEMPLATE_MAX_OUTPUT >> 20);
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 256;
        while (cap < b->n + n + 1) cap *= 2;
        char *np = ralloc(c, cap);
        if (b->n) memcpy(np, b->p, b->n);
        b->p = np;
        b->cap = cap;
    }
    memcpy(b->p + b->n, p, n);
    b->n += n;
    b->p[b->n] = 0;
}
static void ob_puts(rctx *c, obuf *b, const char *s) { ob_put(c, b, s, strlen(s)); }
static val ob_val(rctx *c, obuf *b) { return mkstrn(c, b->p ? b->p : "", b->n); }

/* ---- Python names and formatting -------------------------------------- */

static const char *type_name(const val *v)
{
    switch (v->t) {
    case V_UNDEF: return "Undefined";
    case V_NONE: return "NoneType";
    case V_BOOL: return "bool";
    case V_INT: return "int";
    case V_FLOAT: return "float";
    case V_STR: return "str";
    case V_LIST: return "list";
    case V_TUPLE: return "tuple";
    case V_GEN: return "generator";
    case V_DICT: return "dict";
    case V_NS: return "Namespace";
    case V_RANGE: return "range";
    case V_LOOP: return "LoopContext";
    case V_MACRO: return "Macro";
    default: return "function";
    }
}

/* float as Python's repr(): shortest digits that round-trip */
static void fmt_float(double x, char *out, size_t cap, bool json)
{
    if (isnan(x)) {
        snprintf(out, cap, json ? "NaN" : "nan");
        return;
    }
    if (isinf(x)) {
        snprintf(out, cap, x < 0 ? (json ? "-Infinity" : "-inf") : (json ? "Infinity" : "inf"));
        return;
    }
    char buf[64];
    int prec;
    for (prec = 1; prec <= 17; prec++) {
        snprintf(buf, sizeof buf, "%.*e", prec - 1, x);
        if (strtod(buf, NULL) == x) break;
    }
    /* buf = [-]d.ddde[+-]XX */
    char digits[32];
    int nd = 0, exp10;
    const char *p = buf;
    bool neg = false;
    if (*p == '-') {
        neg = true;
        p++;
    }
    for (; *p && *p != 'e'; p++)
        if (isdigit((unsigned char)*p)) digits[nd++] = *p;
    exp10 = atoi(p + 1);
    while (nd > 1 && digits[nd - 1] == '0') nd--;
    digits[nd] = 0;
    size_t o = 0;
    char res[64];
    if (neg) res[o++] = '-';
    if (exp10 >= -4 && exp10 < 16) {
        if (exp10 >= 0) {
            for (int i = 0; i <= exp10; i++) res[o++] = i < nd ? digits[i] : '0';
            res[o++] = '.';
            if (nd > exp10 + 1) {
                for (int i = exp10 + 1; i < nd; i++) res[o++] = digits[i];
            } else {
                res[o++] = '0';
            }
        } else {
            res[o++] = '0';
            res[o++] = '.';
            for (int i = 0; i < -exp10 - 1; i++) res[o++] = '0';
            for (int i = 0; i < nd; i++) res[o++] = digits[i];
        }
        res[o] = 0;
    } else {
        res[o++] = digits[0];
        if (nd > 1) {
            res[o++] = '.';
            for (int i = 1; i < nd; i++) res[o++] = digits[i];
        }
        res[o] = 0;
        char e[16];
        snprintf(e, sizeof e, "e%c%02d", exp10 < 0 ? '-' : '+', exp10 < 0 ? -exp10 : exp10);
        strcat(res, e);
    }
    snprintf(out, cap, "%s", res);
}

/* decode one UTF-8 code point (invalid bytes come back as themselves, length 1) */
static uint32_t utf8_next(const char *s, size_t n, size_t *i)
{
    const unsigned char *u = (const unsigned char *)s;
    uint32_t c = u[*i];
    int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    if (*i + (size_t)len > n) len = 1;
    if (len == 1) {
        (*i)++;
        return c;
    }
    uint32_t cp = c & (0xFF >> (len + 1));
    for (int k = 1; k < len; k++) {
        if ((u[*i + k] & 0xC0) != 0x80) {
            (*i)++;
            return c;
        }
        cp = (cp << 6) | (u[*i + k] & 0x3F);
    }
    *i += (size_t)len;
    return cp;
}

static size_t utf8_count(const char *s, size_t n)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (((unsigned char)s[i] & 0xC0) != 0x80) k++;
    return k;
}

/* byte offset of code point index cp (clamped to n) */
static size_t utf8_offset(const char *s, size_t n, size_t cp)
{
    size_t i = 0;
    while (cp && i < n) {
        utf8_next(s, n, &i);
        cp--;
    }
    return i;
}

static void repr_str(rctx *c, obuf *b, const zstr *s)
{
    bool has_sq = memchr(s->p, '\'', s->len) != NULL, has_dq = memchr(s->p, '"', s->len) != NULL;
    char q = has_sq && !has_dq ? '"' : '\'';
    ob_put(c, b, &q, 1);
    for (size_t i = 0; i < s->len;) {
        size_t st = i;
        uint32_t cp = utf8_next(s->p, s->len, &i);
        char e[16];
        if (cp == (uint32_t)q || cp == '\\') {
            e[0] = '\\';
            e[1] = (char)cp;
            ob_put(c, b, e, 2);
        } else if (cp == '\n') ob_puts(c, b, "\\n");
        else if (cp == '\r') ob_puts(c, b, "\\r");
        else if (cp == '\t') ob_puts(c, b, "\\t");
        else if (cp < 0x20 || cp == 0x7f || (cp >= 0x80 && cp < 0xa0)) {
            snprintf(e, sizeof e, "\\x%02x", cp);
            ob_puts(c, b, e);
        } else {
            ob_put(c, b, s->p + st, i - st);
        }
    }
    ob_put(c, b, &q, 1);
}

static void write_str(rctx *c, obuf *b, const val *v, bool repr);

static void write_seq(rctx *c, obuf *b, const val *v)
{
    const zlist *l = v->u.l;
    ob_puts(c, b, v->t == V_TUPLE ? "(" : "[");
    for (size_t i = 0; i < l->n; i++) {
        if (i) ob_puts(c, b, ", ");
        write_str(c, b, &l->v[i], true);
    }
    if (v->t == V_TUPLE && l->n == 1) ob_puts(c, b, ",");
    ob_puts(c, b, v->t == V_TUPLE ? ")" : "]");
}

/* Python str() (repr=false) or repr() of a value */
static void write_str(rctx *c, obuf *b, const val *v, bool repr)
{
    char num[64];
    switch (v->t) {
    case V_UNDEF: return;
    case V_NONE: ob_puts(c, b, "None"); return;
    case V_BOOL: ob_puts(c, b, v->u.b ? "True" : "False"); return;
    case V_INT: snprintf(num, sizeof num, "%lld", (long long)v->u.i); ob_puts(c, b, num); return;
    case V_FLOAT: fmt_float(v->u.f, num, sizeof num, false); ob_puts(c, b, num); return;
    case V_STR:
        if (repr) repr_str(c, b, v->u.s);
        else ob_put(c, b, v->u.s->p, v->u.s->len);
        return;
    case V_LIST:
    case V_TUPLE:
    case V_DICT:
    case V_NS: break;
    case V_GEN: ob_puts(c, b, "<generator object at 0x7f0000000000>"); return;
    case V_RANGE:
        if (v->u.o->c == 1) snprintf(num, sizeof num, "range(%lld, %lld)", (long long)v->u.o->a, (long long)v->u.o->b);
        else snprintf(num, sizeof num, "range(%lld, %lld, %lld)", (long long)v->u.o->a, (long long)v->u.o->b, (long long)v->u.o->c);
        ob_puts(c, b, num);
        return;
    case V_MACRO: ob_puts(c, b, "<Macro>"); return;
    default: ob_puts(c, b, "<function>"); return;
    }
    /* containers: Python prints a container inside itself as [...] or {...} */
    const void *id = v->t == V_LIST || v->t == V_TUPLE ? (const void *)v->u.l : (const void *)v->u.d;
    for (int i = 0; i < c->nprinting; i++)
        if (c->printing[i] == id) {
            ob_puts(c, b, v->t == V_LIST ? "[...]" : v->t == V_TUPLE ? "(...)" : "{...}");
            return;
        }
    if (c->nprinting >= ZSE_TEMPLATE_MAX_DEPTH) rfail(c, NULL, "value nested too deeply to print");
    c->printing[c->nprinting++] = id;
    if (v->t == V_LIST || v->t == V_TUPLE) {
        write_seq(c, b, v);
    } else {
        const zdict *d = v->u.d;
        if (v->t == V_NS) ob_puts(c, b, "<Namespace ");
        ob_puts(c, b, "{");
        for (size_t i = 0; i < d->n; i++) {
            if (i) ob_puts(c, b, ", ");
            write_str(c, b, &d->k[i], true);
            ob_puts(c, b, ": ");
            write_str(c, b, &d->v[i], true);
        }
        ob_puts(c, b, "}");
        if (v->t == V_NS) ob_puts(c, b, ">");
    }
    c->nprinting--;
}

static zstr *to_str(rctx *c, const val *v)
{
    if (v->t == V_STR) return v->u.s;
    obuf b = {0};
    write_str(c, &b, v, false);
    return zs_new(c, b.p ? b.p : "", b.n);
}

/* ---- truthiness, equality, ordering ----------------------------------- */

static bool truthy(const val *v)
{
    switch (v->t) {
    case V_UNDEF:
    case V_NONE: return false;
    case V_BOOL: return v->u.b;
    case V_INT: return v->u.i != 0;
    case V_FLOAT: return v->u.f != 0.0;
    case V_STR: return v->u.s->len > 0;
    case V_LIST:
    case V_TUPLE: return v->u.l->n > 0;
    case V_DICT: return v->u.d->n > 0;
    case V_RANGE: {
        const zobj *o = v->u.o;
        return o->c > 0 ? o->a < o->b : o->a > o->b;
    }
    default: return true;
    }
}

static bool is_num(const val *v) { return v->t == V_INT || v->t == V_FLOAT || v->t == V_BOOL; }
static double num_f(const val *v) { return v->t == V_FLOAT ? v->u.f : v->t == V_INT ? (double)v->u.i : (double)v->u.b; }
static int64_t num_i(const val *v) { return v->t == V_INT ? v->u.i : v->t == V_BOOL ? v->u.b : (int64_t)v->u.f; }

static bool val_eq(const val *a, const val *b) { return val_eq_d(a, b, 0); }

/* Python ==; containers nested deeper than the render depth (or cyclic) compare unequal */
static bool val_eq_d(const val *a, const val *b, int depth)
{
    if (depth > ZSE_TEMPLATE_MAX_DEPTH) return false;
    if (is_num(a) && is_num(b)) {
        if (a->t == V_FLOAT || b->t == V_FLOAT) return num_f(a) == num_f(b);
        return num_i(a) == num_i(b);
    }
    if (a->t != b->t) return false;
    switch (a->t) {
    case V_UNDEF:
    case V_NONE: return true;
    case V_STR: return a->u.s->len == b->u.s->len && memcmp(a->u.s->p, b->u.s->p, a->u.s->len) == 0;
    case V_LIST:
    case V_TUPLE:
        if (a->u.l->n != b->u.l->n) return false;
        for (size_t i = 0; i < a->u.l->n; i++)
            if (!val_eq_d(&a->u.l->v[i], &b->u.l->v[i], depth + 1)) return false;
        return true;
    case V_DICT:
        if (a->u.d->n != b->u.d->n) return false;
        for (size_t i = 0; i < a->u.d->n; i++) {
            val *o = zd_find(b->u.d, &a->u.d->k[i]);
            if (!o || !val_eq_d(&a->u.d->v[i], o, depth + 1)) return false;
        }
        return true;
    default: return a->u.o == b->u.o;
    }
}

static int val_cmp(rctx *c, const node *n, const val *a, const val *b, const char *op);

/* <0, 0, >0; TypeError for types Python cannot order */
static int val_cmp_inner(rctx *c, const node *n, const val *a, const val *b, const char *op)
{
    if (is_num(a) && is_num(b)) {
        if (a->t == V_FLOAT || b->t == V_FLOAT) {
            double x = num_f(a), y = num_f(b);
            return x < y ? -1 : x > y ? 1 : 0;
        }
        int64_t x = num_i(a), y = num_i(b);
        return x < y ? -1 : x > y ? 1 : 0;
    }
    if (a->t == V_STR && b->t == V_STR) {
        size_t m = a->u.s->len < b->u.s->len ? a->u.s->len : b->u.s->len;
        int r = memcmp(a->u.s->p, b->u.s->p, m);
        if (r) return r;
        return a->u.s->len < b->u.s->len ? -1 : a->u.s->len > b->u.s->len ? 1 : 0;
    }
    if ((a->t == V_LIST || a->t == V_TUPLE) && a->t == b->t) {
        for (size_t i = 0; i < a->u.l->n && i < b->u.l->n; i++) {
            if (val_eq(&a->u.l->v[i], &b->u.l->v[i])) continue;
            return val_cmp(c, n, &a->u.l->v[i], &b->u.l->v[i], op);
        }
        return a->u.l->n < b->u.l->n ? -1 : a->u.l->n > b->u.l->n ? 1 : 0;
    }
    if (a->t == V_UNDEF) rfail(c, n, "%s", a->u.s ? a->u.s->p : "undefined value");
    if (b->t == V_UNDEF) rfail(c, n, "%s", b->u.s ? b->u.s->p : "undefined value");
    rfail(c, n, "'%s' not supported between instances of '%s' and '%s'", op, type_name(a), type_name(b));
}

static int val_cmp(rctx *c, const node *n, const val *a, const val *b, const char *op)
{
    if (++c->depth > ZSE_TEMPLATE_MAX_DEPTH * 4) rfail(c, n, "maximum recursion depth exceeded in comparison");
    int r = val_cmp_inner(c, n, a, b, op);
    c->depth--;
    return r;
}

static _Noreturn void undef_fail(rctx *c, const node *n, const val *v)
{
    rfail(c, n, "%s", v->u.s ? v->u.s->p : "undefined value");
}

/* ---- iteration -------------------------------------------------------- */

static zlist *range_list(rctx *c, const zobj *o)
{
    zlist *l = zl_new(c, 0);
    if (o->c > 0)
        for (int64_t i = o->a; i < o->b; i += o->c) zl_push(c, l, mkint(i));
    else
        for (int64_t i = o->a; i > o->b; i += o->c) zl_push(c, l, mkint(i));
    return l;
}

/* the items `for x in v` visits */
static zlist *iter_items(rctx *c, const node *n, const val *v)
{
    switch (v->t) {
    case V_UNDEF: return zl_new(c, 0);
    case V_LIST:
    case V_TUPLE:
    case V_GEN: return v->u.l;
    case V_DICT: {
        zlist *l = zl_new(c, v->u.d->n);
        for (size_t i = 0; i < v->u.d->n; i++) zl_push(c, l, v->u.d->k[i]);
        return l;
    }
    case V_STR: {
        zlist *l = zl_new(c, 0);
        const zstr *s = v->u.s;
        for (size_t i = 0; i < s->len;) {
            size_t st = i;
            utf8_next(s->p, s->len, &i);
            zl_push(c, l, mkstrn(c, s->p + st, i - st));
        }
        return l;
    }
    case V_RANGE: return range_list(c, v->u.o);
    default: rfail(c, n, "'%s' object is not iterable", type_name(v));
    }
}

static int64_t val_len(rctx *c, const node *n, const val *v)
{
    switch (v->t) {
    case V_UNDEF: return 0;
    case V_STR: return (int64_t)utf8_count(v->u.s->p, v->u.s->len);
    case V_LIST:
    case V_TUPLE: return (int64_t)v->u.l->n;
    case V_DICT:
    case V_NS: return (int64_t)v->u.d->n;
    case V_RANGE: return (int64_t)range_list(c, v->u.o)->n;
    default: rfail(c, n, "object of type '%s' has no len()", type_name(v));
    }
}

static void step(rctx *c, const node *n)
{
    if (++c->steps > ZSE_TEMPLATE_MAX_STEPS) rfail(c, n, "template ran more than %ld loop iterations and calls", ZSE_TEMPLATE_MAX_STEPS);
}

/* ---- JSON in and out -------------------------------------------------- */

static val from_json(rctx *c, const json_t *j)
{
    switch (json_typeof(j)) {
    case JSON_OBJECT: {
        zdict *d = zd_new(c);
        const char *k;
        json_t *v;
        json_object_foreach((json_t *)j, k, v) zd_sets(c, d, k, from_json(c, v));
        return (val){.t = V_DICT, .u.d = d};
    }
    case JSON_ARRAY: {
        zlist *l = zl_new(c, json_array_size(j));
        size_t i;
        json_t *v;
        json_array_foreach((json_t *)j, i, v) zl_push(c, l, from_json(c, v));
        return mklist(l, V_LIST);
    }
    case JSON_STRING: return mkstrn(c, json_string_value(j), json_string_length(j));
    case JSON_INTEGER: return mkint(json_integer_value(j));
    case JSON_REAL: return mkfloat(json_real_value(j));
    case JSON_TRUE: return mkbool(true);
    case JSON_FALSE: return mkbool(false);
    default: return NONE;
    }
}

static void json_str(rctx *c, obuf *b, const char *p, size_t n)
{
    ob_puts(c, b, "\"");
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)p[i];
        char e[8];
        switch (ch) {
        case '"': ob_puts(c, b, "\\\""); break;
        case '\\': ob_puts(c, b, "\\\\"); break;
        case '\n': ob_puts(c, b, "\\n"); break;
        case '\r': ob_puts(c, b, "\\r"); break;
        case '\t': ob_puts(c, b, "\\t"); break;
        case '\b': ob_puts(c, b, "\\b"); break;
        case '\f': ob_puts(c, b, "\\f"); break;
        default:
            if (ch < 0x20) {
                snprintf(e, sizeof e, "\\u%04x", ch);
                ob_puts(c, b, e);
            } else {
                ob_put(c, b, p + i, 1);
            }
        }
    }
    ob_puts(c, b, "\"");
}

static void json_newline(rctx *c, obuf *b, int indent, int level)
{
    ob_puts(c, b, "\n");
    for (int i = 0; i < indent * level; i++) ob_puts(c, b, " ");
}

/* Python json.dumps(v, ensure_ascii=False, indent=indent) (indent < 0: None) */
static void to_json(rctx *c, const node *n, obuf *b, const val *v, int indent, int level)
{
    if (level > ZSE_TEMPLATE_MAX_DEPTH) rfail(c, n, "tojson: value nested too deeply");
    char num[64];
    switch (v->t) {
    case V_NONE: ob_puts(c, b, "null"); return;
    case V_BOOL: ob_puts(c, b, v->u.b ? "true" : "false"); return;
    case V_INT: snprintf(num, sizeof num, "%lld", (long long)v->u.i); ob_puts(c, b, num); return;
    case V_FLOAT: fmt_float(v->u.f, num, sizeof num, true); ob_puts(c, b, num); return;
    case V_STR: json_str(c, b, v->u.s->p, v->u.s->len); return;
    case V_LIST:
    case V_TUPLE: {
        const zlist *l = v->u.l;
        if (!l->n) {
            ob_puts(c, b, "[]");
            return;
        }
        ob_puts(c, b, "[");
        for (size_t i = 0; i < l->n; i++) {
            if (i) ob_puts(c, b, indent >= 0 ? "," : ", ");
            if (indent >= 0) json_newline(c, b, indent, level + 1);
            to_json(c, n, b, &l->v[i], indent, level + 1);
        }
        if (indent >= 0) json_newline(c, b, indent, level);
        ob_puts(c, b, "]");
        return;
    }
    case V_DICT: {
        const zdict *d = v->u.d;
        if (!d->n) {
            ob_puts(c, b, "{}");
            return;
        }
        ob_puts(c, b, "{");
        for (size_t i = 0; i < d->n; i++) {
            if (i) ob_puts(c, b, indent >= 0 ? "," : ", ");
            if (indent >= 0) json_newline(c, b, indent, level + 1);
            const val *k = &d->k[i];
            if (k->t == V_STR) json_str(c, b, k->u.s->p, k->u.s->len);
            else if (k->t == V_INT || k->t == V_FLOAT || k->t == V_BOOL || k->t == V_NONE) {
                obuf kb = {0};
                to_json(c, n, &kb, k, -1, level + 1);
                json_str(c, b, kb.p, kb.n);
            } else rfail(c, n, "keys must be str, int, float, bool or None, not %s", type_name(k));
            ob_puts(c, b, ": ");
            to_json(c, n, b, &d->v[i], indent, level + 1);
        }
        if (indent >= 0) json_newline(c, b, indent, level);
        ob_puts(c, b, "}");
        return;
    }
    default: rfail(c, n, "Object of type %s is not JSON serializable", type_name(v));
    }
}

/* ======================================================================
 * Evaluation
 * ====================================================================== */

enum { F_RANGE = 1, F_DICT, F_NAMESPACE, F_RAISE, F_STRFTIME, F_CYCLER, F_JOINER };

static atomic_llong fixed_time = -1;

void zse_template_set_fixed_time(time_t t) { atomic_store(&fixed_time, (long long)t); }

static val eval(rctx *c, const node *n);
static void render_body(rctx *c, const node *body, frame *f);

typedef struct {
    val *pos;
    size_t npos;
    const char **kwn;
    val *kwv;
    size_t nkw;
} args_t;

static val lookup(rctx *c, frame *f, const node *n)
{
    for (; f; f = f->parent) {
        val *v = zd_get(f->vars, n->name);
        if (v && v->t != V_UNSET) return *v;
    }
    if (!strcmp(n->name, "range")) return (val){.t = V_FUNC, .u.fn = F_RANGE};
    if (!strcmp(n->name, "dict")) return (val){.t = V_FUNC, .u.fn = F_DICT};
    if (!strcmp(n->name, "namespace")) return (val){.t = V_FUNC, .u.fn = F_NAMESPACE};
    if (!strcmp(n->name, "raise_exception")) return (val){.t = V_FUNC, .u.fn = F_RAISE};
    if (!strcmp(n->name, "strftime_now")) return (val){.t = V_FUNC, .u.fn = F_STRFTIME};
    if (!strcmp(n->name, "cycler")) return (val){.t = V_FUNC, .u.fn = F_CYCLER};
    if (!strcmp(n->name, "joiner")) return (val){.t = V_FUNC, .u.fn = F_JOINER};
    return mkundef(c, "'%s' is undefined", n->name);
}

static const char *const str_methods[] = {
    "startswith", "endswith", "strip", "lstrip", "rstrip", "split", "rsplit", "upper", "lower", "title",
    "capitalize", "replace", "find", "rfind", "index", "rindex", "count", "format", "join", "splitlines",
    "isdigit", "isalpha", "isspace", "isalnum", "isupper", "islower", "isnumeric", "isdecimal", "istitle",
    "zfill", "center", "ljust", "rjust", "swapcase", "casefold", "partition", "rpartition", "removeprefix",
    "removesuffix", "expandtabs", "encode", NULL};
static const char *const list_methods[] = {"index", "count", "copy", "append", "extend", "pop", "insert", "remove",
                                           "reverse", "sort", "clear", NULL};
static const char *const dict_methods[] = {"get", "items", "keys", "values", "copy", "update", "pop", "setdefault",
                                           "clear", "popitem", "fromkeys", NULL};
static const char *const unsafe_methods[] = {"append", "extend", "pop", "insert", "remove", "reverse", "sort",
                                             "clear", "update", "setdefault", "popitem", NULL};

static bool in_names(const char *const *names, const char *s)
{
    for (; *names; names++)
        if (!strcmp(*names, s)) return true;
    return false;
}

static val mkmethod(rctx *c, const val *self, const char *name)
{
    zobj *o = mkobj(c, V_METHOD);
    o->self = *self;
    o->name = name;
    return (val){.t = V_METHOD, .u.o = o};
}

static val loop_attr(rctx *c, const zobj *o, const char *name)
{
    int64_t len = (int64_t)o->items->n, i = o->idx;
    if (!strcmp(name, "index")) return mkint(i + 1);
    if (!strcmp(name, "index0")) return mkint(i);
    if (!strcmp(name, "revindex")) return mkint(len - i);
    if (!strcmp(name, "revindex0")) return mkint(len - i - 1);
    if (!strcmp(name, "first")) return mkbool(i == 0);
    if (!strcmp(name, "last")) return mkbool(i == len - 1);
    if (!strcmp(name, "length")) return mkint(len);
    if (!strcmp(name, "depth")) return mkint(1);
    if (!strcmp(name, "depth0")) return mkint(0);
    if (!strcmp(name, "previtem")) return i > 0 ? o->items->v[i - 1] : mkundef(c, "there is no previous item");
    if (!strcmp(name, "nextitem")) return i + 1 < len ? o->items->v[i + 1] : mkundef(c, "there is no next item");
    if (!strcmp(name, "cycle") || !strcmp(name, "changed")) {
        val self = {.t = V_LOOP, .u.o = (zobj *)o};
        return mkmethod(c, &self, name);
    }
    return mkundef(c, "'LoopContext object' has no attribute '%s'", name);
}

/* jinja2 getattr: attribute (methods) first, then item */
static val get_attr(rctx *c, const node *n, const val *obj, const char *name)
{
    switch (obj->t) {
    case V_UNDEF: undef_fail(c, n, obj);
    case V_DICT: {
        if (in_names(dict_methods, name)) return mkmethod(c, obj, name);
        val *v = zd_get(obj->u.d, name);
        if (v) return *v;
        return mkundef(c, "'dict object' has no attribute '%s'", name);
    }
    case V_NS: {
        val *v = zd_get(obj->u.d, name);
        if (v) return *v;
        return mkundef(c, "'Namespace object' has no attribute '%s'", name);
    }
    case V_STR:
        if (in_names(str_methods, name)) return mkmethod(c, obj, name);
        break;
    case V_LIST:
    case V_TUPLE:
        if (in_names(list_methods, name) && (obj->t == V_LIST || !strcmp(name, "index") || !strcmp(name, "count")))
            return mkmethod(c, obj, name);
        break;
    case V_LOOP: return loop_attr(c, obj->u.o, name);
    case V_CYCLER:
        if (!strcmp(name, "next") || !strcmp(name, "reset")) return mkmethod(c, obj, name);
        if (!strcmp(name, "current")) return obj->u.o->items->v[obj->u.o->idx % (int64_t)obj->u.o->items->n];
        break;
    case V_NONE: return mkundef(c, "'None' has no attribute '%s'", name);
    default: break;
    }
    return mkundef(c, "'%s object' has no attribute '%s'", type_name(obj), name);
}

/* jinja2 getitem: item first, then attribute for string keys */
static val get_item(rctx *c, const node *n, const val *obj, const val *key)
{
    if (obj->t == V_RANGE) {
        val l = mklist(range_list(c, obj->u.o), V_LIST);
        return get_item(c, n, &l, key);
    }
    switch (obj->t) {
    case V_UNDEF: undef_fail(c, n, obj);
    case V_DICT:
    case V_NS: {
        val *v = zd_find(obj->u.d, key);
        if (v) return *v;
        break;
    }
    case V_LIST:
    case V_TUPLE:
    case V_STR: {
        if (key->t != V_INT && key->t != V_BOOL) break;
        int64_t len = val_len(c, n, obj), i = num_i(key);
        if (i < 0) i += len;
        if (i < 0 || i >= len) return mkundef(c, "%s object has no element %lld", type_name(obj), (long long)num_i(key));
        if (obj->t != V_STR) return obj->u.l->v[i];
        size_t st = utf8_offset(obj->u.s->p, obj->u.s->len, (size_t)i), e = st;
        utf8_next(obj->u.s->p, obj->u.s->len, &e);
        return mkstrn(c, obj->u.s->p + st, e - st);
    }
    default: break;
    }
    if (key->t == V_STR) {
        if (obj->t == V_DICT) {
            if (in_names(dict_methods, key->u.s->p)) return mkmethod(c, obj, key->u.s->p);
            return mkundef(c, "'dict object' has no attribute '%s'", key->u.s->p);
        }
        return get_attr(c, n, obj, key->u.s->p);
    }
    zstr *ks = to_str(c, key);
    return mkundef(c, "'%s object' has no attribute '%s'", type_name(obj), ks->p);
}

static int64_t slice_index(rctx *c, const node *n, const val *v, int64_t len, int64_t def, int64_t stepv)
{
    if (!v || v->t == V_NONE) return def;
    if (v->t != V_INT && v->t != V_BOOL) rfail(c, n, "slice indices must be integers or None");
    int64_t i = num_i(v);
    if (i < 0) i += len;
    if (stepv > 0) {
        if (i < 0) i = 0;
        if (i > len) i = len;
    } else {
        if (i < -1) i = -1;
        if (i > len - 1) i = len - 1;
    }
    return i;
}

static val do_slice(rctx *c, const node *n, const val *obj, const val *sa, const val *sb, const val *sc)
{
    if (obj->t == V_UNDEF) undef_fail(c, n, obj);
    int64_t stepv = 1;
    if (sc && sc->t != V_NONE) {
        if (sc->t != V_INT) rfail(c, n, "slice indices must be integers or None");
        stepv = sc->u.i;
        if (stepv == 0) rfail(c, n, "slice step cannot be zero");
    }
    zlist *src;
    if (obj->t == V_STR || obj->t == V_RANGE) src = iter_items(c, n, obj);
    else if (obj->t == V_LIST || obj->t == V_TUPLE) src = obj->u.l;
    else rfail(c, n, "'%s' object is not subscriptable", type_name(obj));
    int64_t len = (int64_t)src->n;
    int64_t start = slice_index(c, n, sa, len, stepv > 0 ? 0 : len - 1, stepv);
    int64_t stop = slice_index(c, n, sb, len, stepv > 0 ? len : -1, stepv);
    zlist *out = zl_new(c, 0);
    if (stepv > 0)
        for (int64_t i = start; i < stop; i += stepv) zl_push(c, out, src->v[i]);
    else
        for (int64_t i = start; i > stop; i += stepv) zl_push(c, out, src->v[i]);
    if (obj->t != V_STR) return mklist(out, obj->t == V_RANGE ? V_LIST : obj->t);
    obuf b = {0};
    for (size_t i = 0; i < out->n; i++) ob_put(c, &b, out->v[i].u.s->p, out->v[i].u.s->len);
    return ob_val(c, &b);
}

static int64_t floordiv_i(int64_t a, int64_t b)
{
    int64_t q = a / b;
    if ((a % b != 0) && ((a < 0) != (b < 0))) q--;
    return q;
}

static _Noreturn void binop_type_error(rctx *c, const node *n, const char *op, const val *a, const val *b)
{
    if (!strcmp(op, "+") && (a->t == V_STR || a->t == V_LIST || a->t == V_TUPLE))
        rfail(c, n, "can only concatenate %s (not \"%s\") to %s", type_name(a), type_name(b), type_name(a));
    rfail(c, n, "unsupported operand type(s) for %s: '%s' and '%s'", op, type_name(a), type_name(b));
}

static val str_percent(rctx *c, const node *n, const zstr *fmt, const val *argsv);

/* markupsafe.escape */
static void html_escape(rctx *c, obuf *o, const zstr *s)
{
    for (size_t i = 0; i < s->len; i++) {
        switch (s->p[i]) {
        case '&': ob_puts(c, o, "&amp;"); break;
        case '<': ob_puts(c, o, "&lt;"); break;
        case '>': ob_puts(c, o, "&gt;"); break;
        case '"': ob_puts(c, o, "&#34;"); break;
        case '\'': ob_puts(c, o, "&#39;"); break;
        default: ob_put(c, o, s->p + i, 1);
        }
    }
}

static val arith(rctx *c, const node *n, const char *op, val a, val b)
{
    if (a.t == V_UNDEF) undef_fail(c, n, &a);
    if (b.t == V_UNDEF) undef_fail(c, n, &b);
    if (is_num(&a) && is_num(&b)) {
        bool fl = a.t == V_FLOAT || b.t == V_FLOAT;
        if (!strcmp(op, "/")) {
            if (num_f(&b) == 0) rfail(c, n, "division by zero");
            return mkfloat(num_f(&a) / num_f(&b));
        }
        if (fl) {
            double x = num_f(&a), y = num_f(&b);
            switch (op[0]) {
            case '+': return mkfloat(x + y);
            case '-': return mkfloat(x - y);
            case '*': return op[1] ? mkfloat(pow(x, y)) : mkfloat(x * y);
            case '/':
                if (y == 0) rfail(c, n, "float floor division by zero");
                return mkfloat(floor(x / y));
            case '%': {
                if (y == 0) rfail(c, n, "float modulo");
                double r = fmod(x, y);
                if (r != 0 && ((r < 0) != (y < 0))) r += y;
                return mkfloat(r);
            }
            }
        }
        int64_t x = num_i(&a), y = num_i(&b), r;
        switch (op[0]) {
        case '+':
            if (__builtin_add_overflow(x, y, &r)) return mkfloat((double)x + (double)y);
            return mkint(r);
        case '-':
            if (__builtin_sub_overflow(x, y, &r)) return mkfloat((double)x - (double)y);
            return mkint(r);
        case '*':
            if (op[1]) {
                if (y < 0) return mkfloat(pow((double)x, (double)y));
                double p = pow((double)x, (double)y);
                if (fabs(p) > 9e18) return mkfloat(p);
                r = 1;
                for (int64_t k = 0; k < y; k++) r *= x;
                return mkint(r);
            }
            if (__builtin_mul_overflow(x, y, &r)) return mkfloat((double)x * (double)y);
            return mkint(r);
        case '/':
            if (y == 0) rfail(c, n, "integer division or modulo by zero");
            if (x == INT64_MIN && y == -1) return mkfloat(9223372036854775808.0);
            return mkint(floordiv_i(x, y));
        case '%':
            if (y == 0) rfail(c, n, "integer division or modulo by zero");
            if (y == -1) return mkint(0);
            r = x % y;
            if (r != 0 && ((r < 0) != (y < 0))) r += y;
            return mkint(r);
        }
    }
    if (op[0] == '+' && a.t == V_STR && b.t == V_STR) {
        obuf o = {0};
        bool safe = a.u.s->safe || b.u.s->safe;
        if (safe && !a.u.s->safe) html_escape(c, &o, a.u.s);
        else ob_put(c, &o, a.u.s->p, a.u.s->len);
        if (safe && !b.u.s->safe) html_escape(c, &o, b.u.s);
        else ob_put(c, &o, b.u.s->p, b.u.s->len);
        val r = ob_val(c, &o);
        r.u.s->safe = safe;
        return r;
    }
    if (op[0] == '+' && (a.t == V_LIST || a.t == V_TUPLE) && a.t == b.t) {
        zlist *l = zl_new(c, a.u.l->n + b.u.l->n);
        for (size_t i = 0; i < a.u.l->n; i++) zl_push(c, l, a.u.l->v[i]);
        for (size_t i = 0; i < b.u.l->n; i++) zl_push(c, l, b.u.l->v[i]);
        return mklist(l, a.t);
    }
    if (op[0] == '*' && !op[1] && (a.t == V_INT || b.t == V_INT) && (a.t == V_STR || b.t == V_STR || a.t == V_LIST || b.t == V_LIST)) {
        val seq = a.t == V_INT ? b : a;
        int64_t k = a.t == V_INT ? a.u.i : b.u.i;
        if (seq.t == V_STR) {
            if (k > 0 && seq.u.s->len * (uint64_t)k > ZSE_TEMPLATE_MAX_OUTPUT) rfail(c, n, "string repetition too large");
            obuf o = {0};
            for (int64_t i = 0; i < k; i++) ob_put(c, &o, seq.u.s->p, seq.u.s->len);
            return ob_val(c, &o);
        }
        if (k > 0 && seq.u.l->n * (uint64_t)k > 10000000) rfail(c, n, "list repetition too large");
        zlist *l = zl_new(c, 0);
        for (int64_t i = 0; i < k; i++)
            for (size_t j = 0; j < seq.u.l->n; j++) zl_push(c, l, seq.u.l->v[j]);
        return mklist(l, V_LIST);
    }
    if (op[0] == '%' && a.t == V_STR) return str_percent(c, n, a.u.s, &b);
    binop_type_error(c, n, op, &a, &b);
}

static bool contains(rctx *c, const node *n, const val *item, const val *cont)
{
    switch (cont->t) {
    case V_UNDEF: return false;
    case V_STR: {
        if (item->t != V_STR) rfail(c, n, "'in <string>' requires string as left operand, not %s", type_name(item));
        if (!item->u.s->len) return true;
        return memmem(cont->u.s->p, cont->u.s->len, item->u.s->p, item->u.s->len) != NULL;
    }
    case V_LIST:
    case V_TUPLE:
    case V_GEN:
        for (size_t i = 0; i < cont->u.l->n; i++)
            if (val_eq(item, &cont->u.l->v[i])) return true;
        return false;
    case V_DICT:
    case V_NS: return zd_find(cont->u.d, item) != NULL;
    case V_RANGE: {
        zlist *l = range_list(c, cont->u.o);
        for (size_t i = 0; i < l->n; i++)
            if (val_eq(item, &l->v[i])) return true;
        return false;
    }
    default: rfail(c, n, "argument of type '%s' is not iterable", type_name(cont));
    }
}

static bool compare(rctx *c, const node *n, const char *op, const val *a, const val *b)
{
    if (!strcmp(op, "==")) return val_eq(a, b);
    if (!strcmp(op, "!=")) return !val_eq(a, b);
    if (!strcmp(op, "in")) return contains(c, n, a, b);
    if (!strcmp(op, "notin")) return !contains(c, n, a, b);
    int r = val_cmp(c, n, a, b, op);
    if (!strcmp(op, "<")) return r < 0;
    if (!strcmp(op, ">")) return r > 0;
    if (!strcmp(op, "<=")) return r <= 0;
    return r >= 0;
}

static void eval_args(rctx *c, const node *n, args_t *a)
{
    a->npos = n->n;
    a->pos = n->n ? ralloc(c, n->n * sizeof(val)) : NULL;
    for (size_t i = 0; i < n->n; i++) a->pos[i] = eval(c, n->items[i]);
    a->nkw = n->nkw;
    a->kwn = n->kwn;
    a->kwv = n->nkw ? ralloc(c, n->nkw * sizeof(val)) : NULL;
    for (size_t i = 0; i < n->nkw; i++) a->kwv[i] = eval(c, n->kwv[i]);
}

/* argument i (positional) or by keyword; NULL when absent */
static const val *arg(const args_t *a, size_t i, const char *name)
{
    if (i < a->npos) return &a->pos[i];
    for (size_t k = 0; k < a->nkw; k++)
        if (!strcmp(a->kwn[k], name)) return &a->kwv[k];
    return NULL;
}

static val call_value(rctx *c, const node *n, const val *f, args_t *a);
static val apply_filter(rctx *c, const node *n, const char *name, val v, args_t *a);
static bool apply_test(rctx *c, const node *n, const char *name, const val *v, args_t *a);

static val eval(rctx *c, const node *n)
{
    if (++c->depth > ZSE_TEMPLATE_MAX_DEPTH * 4) rfail(c, n, "expression nested too deeply");
    val r;
    switch (n->kind) {
    case N_CONST: r = n->cval; break;
    case N_NAME: r = lookup(c, c->f, n); break;
    case N_LIST:
    case N_TUPLE: {
        zlist *l = zl_new(c, n->n);
        for (size_t i = 0; i < n->n; i++) zl_push(c, l, eval(c, n->items[i]));
        r = mklist(l, n->kind == N_LIST ? V_LIST : V_TUPLE);
        break;
    }
    case N_DICT: {
        zdict *d = zd_new(c);
        for (size_t i = 0; i < n->n; i++) {
            val k = eval(c, n->items[i]);
            zd_set(c, d, k, eval(c, n->kwv[i]));
        }
        r = (val){.t = V_DICT, .u.d = d};
        break;
    }
    case N_GETATTR: {
        val o = eval(c, n->a);
        r = get_attr(c, n, &o, n->name);
        break;
    }
    case N_GETITEM: {
        val o = eval(c, n->a), k = eval(c, n->b);
        if (o.t == V_UNDEF) undef_fail(c, n, &o);
        r = get_item(c, n, &o, &k);
        break;
    }
    case N_SLICE: {
        val o = eval(c, n->a), a = n->b ? eval(c, n->b) : NONE, b = n->c ? eval(c, n->c) : NONE, s = n->d ? eval(c, n->d) : NONE;
        r = do_slice(c, n, &o, &a, &b, &s);
        break;
    }
    case N_CALL: {
        val f = eval(c, n->a);
        args_t a;
        eval_args(c, n, &a);
        r = call_value(c, n, &f, &a);
        break;
    }
    case N_FILTER: {
        val v = eval(c, n->a);
        args_t a;
        eval_args(c, n, &a);
        r = apply_filter(c, n, n->name, v, &a);
        break;
    }
    case N_TEST: {
        val v = eval(c, n->a);
        args_t a;
        eval_args(c, n, &a);
        bool t = apply_test(c, n, n->name, &v, &a);
        r = mkbool(n->flag ? !t : t);
        break;
    }
    case N_BINOP:
        if (n->name[0] == '~') {
            val a = eval(c, n->a), b = eval(c, n->b);
            obuf o = {0};
            write_str(c, &o, &a, false);
            write_str(c, &o, &b, false);
            r = ob_val(c, &o);
        } else {
            val a = eval(c, n->a);
            r = arith(c, n, n->name, a, eval(c, n->b));
        }
        break;
    case N_NEG:
    case N_POS: {
        val v = eval(c, n->a);
        if (v.t == V_UNDEF) undef_fail(c, n, &v);
        if (!is_num(&v)) rfail(c, n, "bad operand type for unary %c: '%s'", n->kind == N_NEG ? '-' : '+', type_name(&v));
        if (n->kind == N_POS) r = v.t == V_BOOL ? mkint(v.u.b) : v;
        else if (v.t == V_FLOAT) r = mkfloat(-v.u.f);
        else r = mkint(-num_i(&v));
        break;
    }
    case N_NOT: {
        val v = eval(c, n->a);
        r = mkbool(!truthy(&v));
        break;
    }
    case N_AND: {
        val a = eval(c, n->a);
        r = truthy(&a) ? eval(c, n->b) : a;
        break;
    }
    case N_OR: {
        val a = eval(c, n->a);
        r = truthy(&a) ? a : eval(c, n->b);
        break;
    }
    case N_COMPARE: {
        val a = eval(c, n->items[0]);
        r = mkbool(true);
        for (size_t i = 1; i < n->n; i++) {
            val b = eval(c, n->items[i]);
            if (!compare(c, n, n->ops[i - 1], &a, &b)) {
                r = mkbool(false);
                break;
            }
            a = b;
        }
        break;
    }
    case N_COND: {
        val t = eval(c, n->b);
        if (truthy(&t)) r = eval(c, n->a);
        else if (n->c) r = eval(c, n->c);
        else r = mkundef(c, "the inline if-expression on line %d evaluated to false and no else section was defined.", n->line);
        break;
    }
    default: rfail(c, n, "internal error: not an expression");
    }
    c->depth--;
    return r;
}

/* ---- strings ------------------------------------------------------------ */

static bool py_space(uint32_t cp)
{
    return (cp >= 9 && cp <= 13) || (cp >= 0x1c && cp <= 0x20) || cp == 0x85 || cp == 0xa0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028 || cp == 0x2029 || cp == 0x202f || cp == 0x205f || cp == 0x3000;
}

static bool in_chars(uint32_t cp, const zstr *chars)
{
    for (size_t i = 0; i < chars->len;) {
        if (utf8_next(chars->p, chars->len, &i) == cp) return true;
    }
    return false;
}

/* str.strip/lstrip/rstrip: chars NULL = whitespace */
static val do_strip(rctx *c, const zstr *s, const zstr *chars, bool left, bool right)
{
    size_t st = 0, en = s->len;
    if (left) {
        while (st < en) {
            size_t i = st;
            uint32_t cp = utf8_next(s->p, en, &i);
            if (chars ? !in_chars(cp, chars) : !py_space(cp)) break;
            st = i;
        }
    }
    if (right) {
        while (en > st) {
            size_t b = en - 1;
            while (b > st && ((unsigned char)s->p[b] & 0xC0) == 0x80) b--;
            size_t i = b;
            uint32_t cp = utf8_next(s->p, en, &i);
            if (chars ? !in_chars(cp, chars) : !py_space(cp)) break;
            en = b;
        }
    }
    return mkstrn(c, s->p + st, en - st);
}

#include <utf8proc.h>

/* mode 0 lower, 1 upper, 2 jinja title, 3 capitalize, 4 python title, 5 swapcase */
static val case_map(rctx *c, const zstr *s, int mode)
{
    obuf o = {0};
    bool word_start = true, first = true;
    for (size_t i = 0; i < s->len;) {
        uint32_t cp = utf8_next(s->p, s->len, &i);
        int32_t r = (int32_t)cp;
        if (mode == 0) r = utf8proc_tolower(r);
        else if (mode == 1) r = utf8proc_toupper(r);
        else if (mode == 2) {
            bool sep = cp == '-' || cp == '(' || cp == '{' || cp == '[' || cp == '<' || py_space(cp);
            r = word_start && !sep ? utf8proc_toupper(r) : utf8proc_tolower(r);
            word_start = sep;
        } else if (mode == 3) {
            r = first ? utf8proc_toupper(r) : utf8proc_tolower(r);
        } else if (mode == 4) {
            const utf8proc_property_t *p = utf8proc_get_property(r);
            bool cased = p->category == UTF8PROC_CATEGORY_LU || p->category == UTF8PROC_CATEGORY_LL || p->category == UTF8PROC_CATEGORY_LT;
            r = cased ? (word_start ? utf8proc_toupper(r) : utf8proc_tolower(r)) : r;
            word_start = !cased;
        } else {
            r = utf8proc_isupper(r) ? utf8proc_tolower(r) : utf8proc_toupper(r);
        }
        first = false;
        if (cp == 0xDF && r == 0x1E9E) {
            /* Python's full case mapping: 'ß'.upper() == 'SS' */
            ob_puts(c, &o, "SS");
            continue;
        }
        char e[4];
        size_t k = 0;
        put_utf8(e, &k, (uint32_t)r);
        ob_put(c, &o, e, k);
    }
    return ob_val(c, &o);
}

static val str_replace(rctx *c, const zstr *s, const zstr *old, const zstr *nw, int64_t count)
{
    obuf o = {0};
    size_t i = 0;
    int64_t done = 0;
    if (!old->len) {
        /* Python inserts the replacement between every character */
        for (size_t k = 0; k <= s->len;) {
            if (count < 0 || done < count) {
                ob_put(c, &o, nw->p, nw->len);
                done++;
            }
            if (k == s->len) break;
            size_t st = k;
            utf8_next(s->p, s->len, &k);
            ob_put(c, &o, s->p + st, k - st);
        }
        return ob_val(c, &o);
    }
    while (i < s->len) {
        const char *f = (count < 0 || done < count) ? memmem(s->p + i, s->len - i, old->p, old->len) : NULL;
        if (!f) break;
        ob_put(c, &o, s->p + i, (size_t)(f - (s->p + i)));
        ob_put(c, &o, nw->p, nw->len);
        i = (size_t)(f - s->p) + old->len;
        done++;
    }
    ob_put(c, &o, s->p + i, s->len - i);
    return ob_val(c, &o);
}

/* str.split / rsplit */
static val str_split(rctx *c, const node *n, const zstr *s, const val *sepv, int64_t maxsplit, bool from_right)
{
    zlist *l = zl_new(c, 0);
    if (!sepv || sepv->t == V_NONE) {
        /* runs of whitespace; no empty strings */
        size_t i = 0;
        zlist *parts = zl_new(c, 0);
        while (i < s->len) {
            size_t j = i, k;
            while (j < s->len) {
                k = j;
                if (!py_space(utf8_next(s->p, s->len, &k))) break;
                j = k;
            }
            if (j >= s->len) break;
            size_t st = j;
            while (j < s->len) {
                k = j;
                if (py_space(utf8_next(s->p, s->len, &k))) break;
                j = k;
            }
            zl_push(c, parts, mkstrn(c, s->p + st, j - st));
            i = j;
        }
        if (maxsplit < 0 || (int64_t)parts->n <= maxsplit + 1) return mklist(parts, V_LIST);
        /* maxsplit: the rest stays one piece, keeping its inner and outer whitespace on
         * the far side (' a b  c '.split(None, 1) == ['a', 'b  c ']) */
        if (!from_right) {
            size_t k = 0;
            for (int64_t m = 0; m < maxsplit; m++) {
                zl_push(c, l, parts->v[m]);
                while (k < s->len && py_space((unsigned char)s->p[k])) k++;
                while (k < s->len && !py_space((unsigned char)s->p[k])) k++;
            }
            while (k < s->len && py_space((unsigned char)s->p[k])) k++;
            zl_push(c, l, mkstrn(c, s->p + k, s->len - k));
            return mklist(l, V_LIST);
        }
        size_t k = s->len;
        for (int64_t m = 0; m < maxsplit; m++) {
            while (k > 0 && py_space((unsigned char)s->p[k - 1])) k--;
            while (k > 0 && !py_space((unsigned char)s->p[k - 1])) k--;
        }
        while (k > 0 && py_space((unsigned char)s->p[k - 1])) k--;
        zl_push(c, l, mkstrn(c, s->p, k));
        for (size_t m = parts->n - (size_t)maxsplit; m < parts->n; m++) zl_push(c, l, parts->v[m]);
        return mklist(l, V_LIST);
    }
    if (sepv->t != V_STR) rfail(c, n, "must be str or None, not %s", type_name(sepv));
    const zstr *sep = sepv->u.s;
    if (!sep->len) rfail(c, n, "empty separator");
    if (!from_right) {
        size_t i = 0;
        int64_t done = 0;
        for (;;) {
            const char *f = (maxsplit < 0 || done < maxsplit) ? memmem(s->p + i, s->len - i, sep->p, sep->len) : NULL;
            if (!f) break;
            zl_push(c, l, mkstrn(c, s->p + i, (size_t)(f - s->p) - i));
            i = (size_t)(f - s->p) + sep->len;
            done++;
        }
        zl_push(c, l, mkstrn(c, s->p + i, s->len - i));
        return mklist(l, V_LIST);
    }
    zlist *rev = zl_new(c, 0);
    size_t end = s->len;
    int64_t done = 0;
    while (maxsplit < 0 || done < maxsplit) {
        size_t k = end;
        bool found = false;
        while (k >= sep->len) {
            if (memcmp(s->p + k - sep->len, sep->p, sep->len) == 0) {
                found = true;
                break;
            }
            k--;
        }
        if (!found) break;
        zl_push(c, rev, mkstrn(c, s->p + k, end - k));
        end = k - sep->len;
        done++;
    }
    zl_push(c, l, mkstrn(c, s->p, end));
    for (size_t m = rev->n; m > 0; m--) zl_push(c, l, rev->v[m - 1]);
    return mklist(l, V_LIST);
}

/* "%s" % args: %s %r %d %i %f %% (what chat templates use) */
static val str_percent(rctx *c, const node *n, const zstr *fmt, const val *argsv)
{
    obuf o = {0};
    size_t ai = 0;
    const zlist *tl = argsv->t == V_TUPLE ? argsv->u.l : NULL;
    for (size_t i = 0; i < fmt->len; i++) {
        if (fmt->p[i] != '%') {
            ob_put(c, &o, fmt->p + i, 1);
            continue;
        }
        if (++i >= fmt->len) rfail(c, n, "incomplete format");
        char spec[32];
        size_t sl = 0;
        spec[sl++] = '%';
        while (i < fmt->len && fmt->p[i] && strchr("-+ 0#.123456789", fmt->p[i]) && sl < 20) spec[sl++] = fmt->p[i++];
        spec[sl] = 0;
        if (i >= fmt->len) rfail(c, n, "incomplete format");
        char conv = fmt->p[i];
        if (conv == '%') {
            ob_puts(c, &o, "%");
            continue;
        }
        const val *a;
        if (tl) {
            if (ai >= tl->n) rfail(c, n, "not enough arguments for format string");
            a = &tl->v[ai++];
        } else {
            if (ai++) rfail(c, n, "not enough arguments for format string");
            a = argsv;
        }
        char buf[128];
        if (conv == 's' || conv == 'r') {
            obuf t = {0};
            write_str(c, &t, a, conv == 'r');
            long width = atol(spec + 1 + (spec[1] == '-'));
            bool left = spec[1] == '-';
            long len = (long)utf8_count(t.p ? t.p : "", t.n);
            if (!left)
                for (long k = len; k < width; k++) ob_puts(c, &o, " ");
            ob_put(c, &o, t.p ? t.p : "", t.n);
            if (left)
                for (long k = len; k < width; k++) ob_puts(c, &o, " ");
        } else if (conv == 'd' || conv == 'i') {
            if (!is_num(a)) rfail(c, n, "%%d format: a real number is required, not %s", type_name(a));
            spec[sl++] = 'l';
            spec[sl++] = 'l';
            spec[sl++] = 'd';
            spec[sl] = 0;
            snprintf(buf, sizeof buf, spec, (long long)(a->t == V_FLOAT ? (int64_t)a->u.f : num_i(a)));
            ob_puts(c, &o, buf);
        } else if (conv == 'f' || conv == 'e' || conv == 'g') {
            if (!is_num(a)) rfail(c, n, "must be real number, not %s", type_name(a));
            spec[sl++] = conv;
            spec[sl] = 0;
            snprintf(buf, sizeof buf, spec, num_f(a));
            ob_puts(c, &o, buf);
        } else {
            rfail(c, n, "unsupported format character '%c'", conv);
        }
    }
    if (tl ? ai < tl->n : ai == 0) rfail(c, n, "not all arguments converted during string formatting");
    return ob_val(c, &o);
}

/* "{} {name}".format(...) */
static val str_format(rctx *c, const node *n, const zstr *fmt, args_t *a)
{
    obuf o = {0};
    size_t auto_i = 0;
    for (size_t i = 0; i < fmt->len; i++) {
        char ch = fmt->p[i];
        if (ch == '{' && i + 1 < fmt->len && fmt->p[i + 1] == '{') {
            ob_puts(c, &o, "{");
            i++;
            continue;
        }
        if (ch == '}' && i + 1 < fmt->len && fmt->p[i + 1] == '}') {
            ob_puts(c, &o, "}");
            i++;
            continue;
        }
        if (ch != '{') {
            ob_put(c, &o, &ch, 1);
            continue;
        }
        const char *e = memchr(fmt->p + i, '}', fmt->len - i);
        if (!e) rfail(c, n, "Single '{' encountered in format string");
        size_t fl = (size_t)(e - (fmt->p + i + 1));
        char field[128];
        if (fl >= sizeof field) rfail(c, n, "format field too long");
        memcpy(field, fmt->p + i + 1, fl);
        field[fl] = 0;
        char *colon = strchr(field, ':');
        if (colon) *colon = 0;
        const val *v = NULL;
        if (!field[0]) {
            if (auto_i >= a->npos) rfail(c, n, "Replacement index %zu out of range for positional args tuple", auto_i);
            v = &a->pos[auto_i++];
        } else if (isdigit((unsigned char)field[0])) {
            size_t k = (size_t)atoi(field);
            if (k >= a->npos) rfail(c, n, "Replacement index %zu out of range for positional args tuple", k);
            v = &a->pos[k];
        } else {
            for (size_t k = 0; k < a->nkw; k++)
                if (!strcmp(a->kwn[k], field)) v = &a->kwv[k];
            if (!v) rfail(c, n, "'%s'", field);
        }
        write_str(c, &o, v, false);
        i = (size_t)(e - fmt->p);
    }
    return ob_val(c, &o);
}

static const zstr *str_arg(rctx *c, const node *n, const val *v, const char *what)
{
    if (!v || v->t != V_STR) rfail(c, n, "%s must be str, not %s", what, v ? type_name(v) : "nothing");
    return v->u.s;
}

static bool affix_match(const zstr *s, const zstr *x, bool start)
{
    if (x->len > s->len) return false;
    return memcmp(start ? s->p : s->p + s->len - x->len, x->p, x->len) == 0;
}

static val call_str_method(rctx *c, const node *n, const zstr *s, const char *m, args_t *a)
{
    const val *a0 = arg(a, 0, "x"), *a1 = arg(a, 1, "y");
    if (!strcmp(m, "startswith") || !strcmp(m, "endswith")) {
        bool start = m[0] == 's';
        if (a0 && a0->t == V_TUPLE) {
            for (size_t i = 0; i < a0->u.l->n; i++)
                if (affix_match(s, str_arg(c, n, &a0->u.l->v[i], m), start)) return mkbool(true);
            return mkbool(false);
        }
        return mkbool(affix_match(s, str_arg(c, n, a0, m), start));
    }
    if (!strcmp(m, "strip") || !strcmp(m, "lstrip") || !strcmp(m, "rstrip")) {
        const zstr *chars = a0 && a0->t != V_NONE ? str_arg(c, n, a0, m) : NULL;
        return do_strip(c, s, chars, m[0] != 'r', m[0] != 'l');
    }
    if (!strcmp(m, "split") || !strcmp(m, "rsplit")) {
        const val *sep = arg(a, 0, "sep"), *ms = arg(a, 1, "maxsplit");
        return str_split(c, n, s, sep, ms ? num_i(ms) : -1, m[0] == 'r');
    }
    if (!strcmp(m, "upper")) return case_map(c, s, 1);
    if (!strcmp(m, "lower") || !strcmp(m, "casefold")) return case_map(c, s, 0);
    if (!strcmp(m, "title")) return case_map(c, s, 4);
    if (!strcmp(m, "capitalize")) return case_map(c, s, 3);
    if (!strcmp(m, "swapcase")) return case_map(c, s, 5);
    if (!strcmp(m, "replace")) {
        const val *cnt = arg(a, 2, "count");
        return str_replace(c, s, str_arg(c, n, a0, m), str_arg(c, n, a1, m), cnt ? num_i(cnt) : -1);
    }
    if (!strcmp(m, "find") || !strcmp(m, "rfind") || !strcmp(m, "index") || !strcmp(m, "rindex") || !strcmp(m, "count")) {
        const zstr *x = str_arg(c, n, a0, m);
        if (!strcmp(m, "count")) {
            int64_t k = 0;
            if (!x->len) return mkint((int64_t)utf8_count(s->p, s->len) + 1);
            for (const char *p = s->p; (p = memmem(p, s->len - (size_t)(p - s->p), x->p, x->len)); p += x->len) k++;
            return mkint(k);
        }
        int64_t found = -1;
        if (m[0] == 'r' && m[1] != 'e') {
            for (size_t k = s->len + 1; k-- > 0;)
                if (k + x->len <= s->len && memcmp(s->p + k, x->p, x->len) == 0) {
                    found = (int64_t)k;
                    break;
                }
        } else {
            const char *f = x->len ? memmem(s->p, s->len, x->p, x->len) : s->p;
            if (f) found = f - s->p;
        }
        if (found < 0 && strstr(m, "index")) rfail(c, n, "substring not found");
        return mkint(found < 0 ? -1 : (int64_t)utf8_count(s->p, (size_t)found));
    }
    if (!strcmp(m, "format")) return str_format(c, n, s, a);
    if (!strcmp(m, "join")) {
        zlist *items = iter_items(c, n, a0 ? a0 : &UNDEF);
        obuf o = {0};
        for (size_t i = 0; i < items->n; i++) {
            if (i) ob_put(c, &o, s->p, s->len);
            if (items->v[i].t != V_STR) rfail(c, n, "sequence item %zu: expected str instance, %s found", i, type_name(&items->v[i]));
            ob_put(c, &o, items->v[i].u.s->p, items->v[i].u.s->len);
        }
        return ob_val(c, &o);
    }
    if (!strcmp(m, "splitlines")) {
        zlist *l = zl_new(c, 0);
        size_t st = 0;
        for (size_t i = 0; i < s->len; i++) {
            if (s->p[i] == '\n' || s->p[i] == '\r') {
                zl_push(c, l, mkstrn(c, s->p + st, i - st));
                if (s->p[i] == '\r' && i + 1 < s->len && s->p[i + 1] == '\n') i++;
                st = i + 1;
            }
        }
        if (st < s->len) zl_push(c, l, mkstrn(c, s->p + st, s->len - st));
        return mklist(l, V_LIST);
    }
    if (!strncmp(m, "is", 2)) {
        if (!s->len) return mkbool(false);
        bool any_cased = false, ok = true;
        for (size_t i = 0; i < s->len && ok;) {
            uint32_t cp = utf8_next(s->p, s->len, &i);
            const utf8proc_property_t *p = utf8proc_get_property((int32_t)cp);
            bool up = p->category == UTF8PROC_CATEGORY_LU, lo = p->category == UTF8PROC_CATEGORY_LL;
            bool alpha = p->category >= UTF8PROC_CATEGORY_LU && p->category <= UTF8PROC_CATEGORY_LO;
            bool digit = p->category == UTF8PROC_CATEGORY_ND;
            if (!strcmp(m, "isdigit") || !strcmp(m, "isdecimal") || !strcmp(m, "isnumeric")) ok = digit;
            else if (!strcmp(m, "isalpha")) ok = alpha;
            else if (!strcmp(m, "isalnum")) ok = alpha || digit;
            else if (!strcmp(m, "isspace")) ok = py_space(cp);
            else if (!strcmp(m, "isupper")) { ok = !lo; any_cased |= up; }
            else if (!strcmp(m, "islower")) { ok = !up; any_cased |= lo; }
            else rfail(c, n, "str.%s is not supported", m);
        }
        if (!strcmp(m, "isupper") || !strcmp(m, "islower")) return mkbool(ok && any_cased);
        return mkbool(ok);
    }
    if (!strcmp(m, "removeprefix") || !strcmp(m, "removesuffix")) {
        const zstr *x = str_arg(c, n, a0, m);
        bool pre = m[6] == 'p';
        if (!affix_match(s, x, pre)) return (val){.t = V_STR, .u.s = (zstr *)s};
        return mkstrn(c, pre ? s->p + x->len : s->p, s->len - x->len);
    }
    if (!strcmp(m, "partition") || !strcmp(m, "rpartition")) {
        const zstr *x = str_arg(c, n, a0, m);
        zlist *l = zl_new(c, 3);
        const char *f = NULL;
        if (m[0] == 'p') f = memmem(s->p, s->len, x->p, x->len);
        else
            for (size_t k = s->len + 1; k-- > 0;)
                if (k + x->len <= s->len && memcmp(s->p + k, x->p, x->len) == 0) {
                    f = s->p + k;
                    break;
                }
        if (!f) {
            zl_push(c, l, m[0] == 'p' ? (val){.t = V_STR, .u.s = (zstr *)s} : mkstr(c, ""));
            zl_push(c, l, mkstr(c, ""));
            zl_push(c, l, m[0] == 'p' ? mkstr(c, "") : (val){.t = V_STR, .u.s = (zstr *)s});
        } else {
            zl_push(c, l, mkstrn(c, s->p, (size_t)(f - s->p)));
            zl_push(c, l, mkstrn(c, x->p, x->len));
            zl_push(c, l, mkstrn(c, f + x->len, s->len - (size_t)(f - s->p) - x->len));
        }
        return mklist(l, V_TUPLE);
    }
    if (!strcmp(m, "zfill") || !strcmp(m, "center") || !strcmp(m, "ljust") || !strcmp(m, "rjust")) {
        int64_t w = a0 ? num_i(a0) : 0, len = (int64_t)utf8_count(s->p, s->len);
        if (w <= len) return (val){.t = V_STR, .u.s = (zstr *)s};
        if (w > 1000000) rfail(c, n, "width too large");
        const char *fill = m[0] == 'z' ? "0" : (a1 && a1->t == V_STR ? a1->u.s->p : " ");
        int64_t pad = w - len, left = m[0] == 'l' ? 0 : m[0] == 'c' ? pad / 2 + (pad & w & 1) : pad;
        obuf o = {0};
        for (int64_t i = 0; i < left; i++) ob_puts(c, &o, fill);
        ob_put(c, &o, s->p, s->len);
        for (int64_t i = 0; i < pad - left; i++) ob_puts(c, &o, fill);
        return ob_val(c, &o);
    }
    rfail(c, n, "str.%s() is not supported", m);
}

static val call_method(rctx *c, const node *n, const zobj *mo, args_t *a)
{
    const val *self = &mo->self;
    const char *m = mo->name;
    if (self->t == V_STR) return call_str_method(c, n, self->u.s, m, a);
    if (self->t == V_LOOP) {
        if (!strcmp(m, "cycle")) {
            if (!a->npos) rfail(c, n, "no items for cycling given");
            return a->pos[mo->self.u.o->idx % (int64_t)a->npos];
        }
        /* loop.changed(*values): true when the values differ from the last call's */
        zobj *lo = self->u.o;
        zlist *now = zl_new(c, a->npos);
        for (size_t i = 0; i < a->npos; i++) zl_push(c, now, a->pos[i]);
        val nv = mklist(now, V_TUPLE);
        bool changed = !lo->c || !val_eq(&lo->self, &nv);
        lo->self = nv;
        lo->c = 1;
        return mkbool(changed);
    }
    if (self->t == V_CYCLER) {
        zobj *o = self->u.o;
        if (!strcmp(m, "reset")) {
            o->idx = 0;
            return NONE;
        }
        val v = o->items->v[o->idx % (int64_t)o->items->n];
        o->idx++;
        return v;
    }
    if (in_names(unsafe_methods, m)) rfail(c, n, "access to attribute '%s' of '%s' object is unsafe.", m, type_name(self));
    if (self->t == V_LIST || self->t == V_TUPLE) {
        const zlist *l = self->u.l;
        if (!strcmp(m, "copy")) {
            zlist *cp = zl_new(c, l->n);
            for (size_t i = 0; i < l->n; i++) zl_push(c, cp, l->v[i]);
            return mklist(cp, V_LIST);
        }
        const val *x = arg(a, 0, "x");
        if (!x) rfail(c, n, "%s() takes exactly one argument (0 given)", m);
        int64_t k = 0;
        for (size_t i = 0; i < l->n; i++) {
            if (!val_eq(&l->v[i], x)) continue;
            if (!strcmp(m, "index")) return mkint((int64_t)i);
            k++;
        }
        if (!strcmp(m, "index")) rfail(c, n, "value is not in list");
        return mkint(k);
    }
    if (self->t == V_DICT) {
        zdict *d = self->u.d;
        if (!strcmp(m, "get")) {
            const val *k = arg(a, 0, "key"), *def = arg(a, 1, "default");
            if (!k) rfail(c, n, "get expected at least 1 argument, got 0");
            val *v = zd_find(d, k);
            return v ? *v : def ? *def : NONE;
        }
        if (!strcmp(m, "items") || !strcmp(m, "keys") || !strcmp(m, "values")) {
            zlist *l = zl_new(c, d->n);
            for (size_t i = 0; i < d->n; i++) {
                if (m[0] == 'k') zl_push(c, l, d->k[i]);
                else if (m[0] == 'v') zl_push(c, l, d->v[i]);
                else {
                    zlist *t = zl_new(c, 2);
                    zl_push(c, t, d->k[i]);
                    zl_push(c, t, d->v[i]);
                    zl_push(c, l, mklist(t, V_TUPLE));
                }
            }
            return mklist(l, V_LIST);
        }
        if (!strcmp(m, "copy")) {
            zdict *nd = zd_new(c);
            for (size_t i = 0; i < d->n; i++) zd_set(c, nd, d->k[i], d->v[i]);
            return (val){.t = V_DICT, .u.d = nd};
        }
    }
    rfail(c, n, "'%s' object has no method '%s'", type_name(self), m);
}

/* ---- calls ------------------------------------------------------------ */

static val call_macro(rctx *c, const node *n, const zobj *mo, args_t *a)
{
    const node *def = mo->def;
    if (++c->depth > ZSE_TEMPLATE_MAX_DEPTH) rfail(c, n, "maximum recursion depth exceeded in macro calls");
    step(c, n);
    frame *f = ralloc(c, sizeof *f);
    f->vars = zd_new(c);
    /* macros see the template's top level; a call block's caller() sees its own scope */
    f->parent = mo->scope ? mo->scope : c->root;
    frame *saved_f = c->f;
    c->f = f;
    zlist *varargs = zl_new(c, 0);
    zdict *kwargs = zd_new(c);
    for (size_t i = 0; i < a->npos; i++) {
        if (i < def->nkw) zd_sets(c, f->vars, def->kwn[i], a->pos[i]);
        else zl_push(c, varargs, a->pos[i]);
    }
    for (size_t k = 0; k < a->nkw; k++) {
        size_t p;
        for (p = 0; p < def->nkw; p++)
            if (!strcmp(def->kwn[p], a->kwn[k])) break;
        if (p < def->nkw) zd_sets(c, f->vars, a->kwn[k], a->kwv[k]);
        else zd_sets(c, kwargs, a->kwn[k], a->kwv[k]);
    }
    for (size_t p = 0; p < def->nkw; p++) {
        if (zd_get(f->vars, def->kwn[p])) continue;
        if (def->kwv[p]) zd_sets(c, f->vars, def->kwn[p], eval(c, def->kwv[p]));
        else zd_sets(c, f->vars, def->kwn[p], mkundef(c, "parameter '%s' was not provided", def->kwn[p]));
    }
    zd_sets(c, f->vars, "varargs", mklist(varargs, V_TUPLE));
    zd_sets(c, f->vars, "kwargs", (val){.t = V_DICT, .u.d = kwargs});
    if (mo->caller.t == V_MACRO) zd_sets(c, f->vars, "caller", mo->caller);
    obuf *saved = c->out;
    obuf cap = {0};
    c->out = &cap;
    render_body(c, def->b, f);
    c->out = saved;
    c->f = saved_f;
    c->depth--;
    return ob_val(c, &cap);
}

static val call_builtin(rctx *c, const node *n, int fn, args_t *a)
{
    switch (fn) {
    case F_RANGE: {
        if (!a->npos || a->npos > 3) rfail(c, n, "range expected 1 to 3 arguments, got %zu", a->npos);
        for (size_t i = 0; i < a->npos; i++)
            if (a->pos[i].t != V_INT && a->pos[i].t != V_BOOL) rfail(c, n, "'%s' object cannot be interpreted as an integer", type_name(&a->pos[i]));
        zobj *o = mkobj(c, V_RANGE);
        o->a = a->npos > 1 ? num_i(&a->pos[0]) : 0;
        o->b = a->npos > 1 ? num_i(&a->pos[1]) : num_i(&a->pos[0]);
        o->c = a->npos > 2 ? num_i(&a->pos[2]) : 1;
        if (!o->c) rfail(c, n, "range() arg 3 must not be zero");
        double cnt = o->c > 0 ? ceil(((double)o->b - (double)o->a) / (double)o->c) : ceil(((double)o->a - (double)o->b) / -(double)o->c);
        if (cnt > 100000) rfail(c, n, "Range too big. The sandbox blocks ranges larger than MAX_RANGE (100000).");
        return (val){.t = V_RANGE, .u.o = o};
    }
    case F_DICT:
    case F_NAMESPACE: {
        zdict *d = zd_new(c);
        for (size_t i = 0; i < a->npos; i++) {
            if (a->pos[i].t == V_DICT || a->pos[i].t == V_NS) {
                for (size_t k = 0; k < a->pos[i].u.d->n; k++) zd_set(c, d, a->pos[i].u.d->k[k], a->pos[i].u.d->v[k]);
            } else {
                zlist *items = iter_items(c, n, &a->pos[i]);
                for (size_t k = 0; k < items->n; k++) {
                    const val *p = &items->v[k];
                    if ((p->t != V_LIST && p->t != V_TUPLE) || p->u.l->n != 2) rfail(c, n, "dictionary update sequence element #%zu has wrong length", k);
                    zd_set(c, d, p->u.l->v[0], p->u.l->v[1]);
                }
            }
        }
        for (size_t k = 0; k < a->nkw; k++) zd_sets(c, d, a->kwn[k], a->kwv[k]);
        return (val){.t = fn == F_DICT ? V_DICT : V_NS, .u.d = d};
    }
    case F_RAISE: {
        zstr *m = a->npos ? to_str(c, &a->pos[0]) : zs_new(c, "", 0);
        rraise(c, m->p, m->len);
    }
    case F_STRFTIME: {
        const val *f = arg(a, 0, "format");
        if (!f || f->t != V_STR) rfail(c, n, "strftime_now() needs a format string");
        long long ft = atomic_load(&fixed_time);
        time_t now = ft >= 0 ? (time_t)ft : time(NULL);
        struct tm tm;
        if (ft >= 0) gmtime_r(&now, &tm);
        else localtime_r(&now, &tm);
        char buf[512];
        size_t len = f->u.s->len ? strftime(buf, sizeof buf, f->u.s->p, &tm) : 0;
        return mkstrn(c, buf, len);
    }
    case F_CYCLER: {
        if (!a->npos) rfail(c, n, "at least one item has to be provided");
        zobj *o = mkobj(c, V_CYCLER);
        o->items = zl_new(c, a->npos);
        for (size_t i = 0; i < a->npos; i++) zl_push(c, o->items, a->pos[i]);
        return (val){.t = V_CYCLER, .u.o = o};
    }
    case F_JOINER: {
        const val *s = arg(a, 0, "sep");
        zobj *o = mkobj(c, V_JOINER);
        o->sep = s ? to_str(c, s) : zs_new(c, ", ", 2);
        return (val){.t = V_JOINER, .u.o = o};
    }
    }
    rfail(c, n, "unknown function");
}

static val call_value(rctx *c, const node *n, const val *f, args_t *a)
{
    switch (f->t) {
    case V_FUNC: return call_builtin(c, n, f->u.fn, a);
    case V_METHOD: return call_method(c, n, f->u.o, a);
    case V_MACRO: return call_macro(c, n, f->u.o, a);
    case V_JOINER:
        if (!f->u.o->idx) {
            f->u.o->idx = 1;
            return mkstr(c, "");
        }
        return (val){.t = V_STR, .u.s = f->u.o->sep};
    case V_UNDEF: undef_fail(c, n, f);
    default: rfail(c, n, "'%s' object is not callable", type_name(f));
    }
}

/* ---- tests -------------------------------------------------------------- */

static bool apply_test(rctx *c, const node *n, const char *name, const val *v, args_t *a)
{
    const val *x = arg(a, 0, "value");
    if (!strcmp(name, "defined")) return v->t != V_UNDEF;
    if (!strcmp(name, "undefined")) return v->t == V_UNDEF;
    if (!strcmp(name, "none")) return v->t == V_NONE;
    if (!strcmp(name, "string")) return v->t == V_STR;
    if (!strcmp(name, "number")) return is_num(v);
    if (!strcmp(name, "integer")) return v->t == V_INT;
    if (!strcmp(name, "float")) return v->t == V_FLOAT;
    if (!strcmp(name, "boolean")) return v->t == V_BOOL;
    if (!strcmp(name, "true")) return v->t == V_BOOL && v->u.b;
    if (!strcmp(name, "false")) return v->t == V_BOOL && !v->u.b;
    if (!strcmp(name, "mapping")) return v->t == V_DICT;
    if (!strcmp(name, "sequence")) return v->t == V_STR || v->t == V_LIST || v->t == V_TUPLE || v->t == V_DICT || v->t == V_RANGE || v->t == V_UNDEF;
    if (!strcmp(name, "iterable")) return v->t == V_STR || v->t == V_LIST || v->t == V_TUPLE || v->t == V_DICT || v->t == V_RANGE || v->t == V_GEN || v->t == V_UNDEF;
    if (!strcmp(name, "callable")) return v->t == V_FUNC || v->t == V_METHOD || v->t == V_MACRO || v->t == V_JOINER;
    if (!strcmp(name, "escaped")) return false;
    if (!strcmp(name, "lower") || !strcmp(name, "upper")) {
        if (v->t != V_STR) return false;
        val r = case_map(c, v->u.s, name[0] == 'l' ? 0 : 1);
        return val_eq(&r, v);
    }
    if (!strcmp(name, "odd") || !strcmp(name, "even") || !strcmp(name, "divisibleby")) {
        if (v->t == V_UNDEF) undef_fail(c, n, v);
        if (!is_num(v)) rfail(c, n, "unsupported operand type(s) for %%: '%s' and 'int'", type_name(v));
        if (name[0] == 'd') {
            if (!x || !is_num(x) || num_i(x) == 0) rfail(c, n, "divisibleby needs a non-zero number");
            val r = arith(c, n, "%", *v, *x);
            return !truthy(&r);
        }
        val r = arith(c, n, "%", *v, mkint(2));
        return truthy(&r) == (name[0] == 'o');
    }
    if (!strcmp(name, "sameas")) {
        if (!x) rfail(c, n, "sameas needs an argument");
        if (v->t != x->t) return false;
        if (v->t == V_NONE || v->t == V_UNDEF) return true;
        if (v->t == V_BOOL) return v->u.b == x->u.b;
        if (v->t == V_INT) return v->u.i == x->u.i;
        return v->u.o == x->u.o;
    }
    if (!strcmp(name, "in")) return x ? contains(c, n, v, x) : false;
    if (!strcmp(name, "filter") || !strcmp(name, "test")) return false;
    static const char *const cmp_names[][2] = {{"eq", "=="}, {"equalto", "=="}, {"==", "=="}, {"ne", "!="}, {"!=", "!="},
                                               {"lt", "<"}, {"lessthan", "<"}, {"<", "<"}, {"gt", ">"}, {"greaterthan", ">"},
                                               {">", ">"}, {"le", "<="}, {"<=", "<="}, {"ge", ">="}, {">=", ">="}};
    for (size_t i = 0; i < sizeof cmp_names / sizeof cmp_names[0]; i++)
        if (!strcmp(name, cmp_names[i][0])) {
            if (!x) rfail(c, n, "test '%s' needs an argument", name);
            return compare(c, n, cmp_names[i][1], v, x);
        }
    rfail(c, n, "No test named '%s'.", name);
}

/* ---- filters ------------------------------------------------------------ */

/* attribute path "a.b.0" as jinja2's make_attrgetter */
static val attr_path(rctx *c, const node *n, val v, const zstr *path)
{
    const char *p = path->p;
    while (*p) {
        const char *dot = strchr(p, '.');
        size_t l = dot ? (size_t)(dot - p) : strlen(p);
        char part[256];
        if (l >= sizeof part) rfail(c, n, "attribute name too long");
        memcpy(part, p, l);
        part[l] = 0;
        bool digits = l > 0;
        for (size_t i = 0; i < l; i++) digits = digits && isdigit((unsigned char)part[i]);
        val key = digits ? mkint(atoll(part)) : mkstr(c, part);
        if (v.t == V_UNDEF) undef_fail(c, n, &v);
        v = get_item(c, n, &v, &key);
        p = dot ? dot + 1 : p + l;
    }
    return v;
}

static val as_list(rctx *c, const node *n, const val *v)
{
    zlist *src = iter_items(c, n, v);
    zlist *l = zl_new(c, src->n);
    for (size_t i = 0; i < src->n; i++) zl_push(c, l, src->v[i]);
    return mklist(l, V_LIST);
}

/* select/reject/selectattr/rejectattr: the test and its arguments start at a->pos[first] */
static val select_items(rctx *c, const node *n, const val *v, args_t *a, bool attr, bool keep)
{
    /* jinja2 iterates only a truthy value: none|selectattr(...) is empty */
    zlist *src = truthy(v) ? iter_items(c, n, v) : zl_new(c, 0);
    size_t first = 0;
    const zstr *path = NULL;
    if (attr) {
        if (!a->npos || a->pos[0].t != V_STR) rfail(c, n, "selectattr/rejectattr need an attribute name");
        path = a->pos[0].u.s;
        first = 1;
    }
    const char *test = NULL;
    if (a->npos > first) {
        if (a->pos[first].t != V_STR) rfail(c, n, "the test name must be a string");
        test = a->pos[first].u.s->p;
    }
    args_t ta = {a->npos > first + 1 ? a->pos + first + 1 : NULL, a->npos > first + 1 ? a->npos - first - 1 : 0, a->kwn, a->kwv, a->nkw};
    zlist *out = zl_new(c, 0);
    for (size_t i = 0; i < src->n; i++) {
        val item = src->v[i];
        val subject = path ? attr_path(c, n, item, path) : item;
        bool r = test ? apply_test(c, n, test, &subject, &ta) : truthy(&subject);
        if (r == keep) zl_push(c, out, item);
    }
    return mklist(out, V_GEN);
}

static val map_items(rctx *c, const node *n, const val *v, args_t *a)
{
    zlist *src = truthy(v) ? iter_items(c, n, v) : zl_new(c, 0);
    zlist *out = zl_new(c, src->n);
    const val *attr = arg(a, 99, "attribute");
    if (attr) {
        const val *def = arg(a, 99, "default");
        for (size_t i = 0; i < src->n; i++) {
            val r = attr_path(c, n, src->v[i], to_str(c, attr));
            if (r.t == V_UNDEF && def) r = *def;
            zl_push(c, out, r);
        }
        return mklist(out, V_GEN);
    }
    if (!a->npos || a->pos[0].t != V_STR) rfail(c, n, "map needs a filter name or attribute=");
    const char *fname = a->pos[0].u.s->p;
    args_t fa = {a->npos > 1 ? a->pos + 1 : NULL, a->npos > 1 ? a->npos - 1 : 0, a->kwn, a->kwv, a->nkw};
    for (size_t i = 0; i < src->n; i++) zl_push(c, out, apply_filter(c, n, fname, src->v[i], &fa));
    return mklist(out, V_GEN);
}

/* sort key comparison for the sort filter (case-insensitive strings by default) */
typedef struct {
    rctx *c;
    const node *n;
    bool case_sensitive;
} sort_env;

static int sort_cmp(sort_env *e, const val *a, const val *b)
{
    if (!e->case_sensitive && a->t == V_STR && b->t == V_STR) {
        val la = case_map(e->c, a->u.s, 0), lb = case_map(e->c, b->u.s, 0);
        return val_cmp(e->c, e->n, &la, &lb, "<");
    }
    return val_cmp(e->c, e->n, a, b, "<");
}

/* stable insertion-merge sort over keys (errors longjmp out, so no qsort) */
static void sort_vals(sort_env *e, val *items, val *keys, size_t n, bool reverse)
{
    if (n < 2) return;
    val *tmp_i = ralloc(e->c, n * sizeof(val)), *tmp_k = ralloc(e->c, n * sizeof(val));
    for (size_t width = 1; width < n; width *= 2) {
        for (size_t lo = 0; lo < n; lo += 2 * width) {
            size_t mid = lo + width < n ? lo + width : n, hi = lo + 2 * width < n ? lo + 2 * width : n;
            size_t i = lo, j = mid, k = lo;
            while (i < mid && j < hi) {
                int r = sort_cmp(e, &keys[j], &keys[i]);
                bool take_right = reverse ? r > 0 : r < 0;
                if (take_right) tmp_i[k] = items[j], tmp_k[k++] = keys[j++];
                else tmp_i[k] = items[i], tmp_k[k++] = keys[i++];
            }
            while (i < mid) tmp_i[k] = items[i], tmp_k[k++] = keys[i++];
            while (j < hi) tmp_i[k] = items[j], tmp_k[k++] = keys[j++];
        }
        memcpy(items, tmp_i, n * sizeof(val));
        memcpy(keys, tmp_k, n * sizeof(val));
    }
}

/* Python int(s, 10): sign, digits, single underscores between digits */
static bool py_int(const zstr *s, int64_t *out)
{
    char buf[64];
    size_t b = 0, i = 0;
    if (i < s->len && (s->p[i] == '+' || s->p[i] == '-')) buf[b++] = s->p[i++];
    if (i >= s->len) return false;
    for (; i < s->len; i++) {
        char ch = s->p[i];
        if (ch == '_' && i > 0 && isdigit((unsigned char)s->p[i - 1]) && i + 1 < s->len && isdigit((unsigned char)s->p[i + 1])) continue;
        if (!isdigit((unsigned char)ch) || b >= sizeof buf - 1) return false;
        buf[b++] = ch;
    }
    buf[b] = 0;
    return zse_parse_i64(buf, out);
}

/* Python float(s): decimal or inf/nan spellings; no hex (strtod would take it) */
static bool py_float(const zstr *s, double *out)
{
    char buf[128];
    size_t b = 0;
    for (size_t i = 0; i < s->len; i++) {
        char ch = s->p[i];
        if (ch == '_' && i > 0 && isdigit((unsigned char)s->p[i - 1]) && i + 1 < s->len && isdigit((unsigned char)s->p[i + 1])) continue;
        if (ch == 'x' || ch == 'X' || b >= sizeof buf - 1) return false;
        buf[b++] = ch;
    }
    buf[b] = 0;
    if (!b) return false;
    char *end;
    errno = 0;
    *out = strtod(buf, &end);
    return *end == 0;
}

static val do_round(rctx *c, const node *n, const val *v, args_t *a)
{
    const val *pv = arg(a, 0, "precision"), *mv = arg(a, 1, "method");
    int64_t prec = pv ? num_i(pv) : 0;
    const char *method = mv && mv->t == V_STR ? mv->u.s->p : "common";
    if (!is_num(v)) rfail(c, n, "type %s doesn't define __round__ method", type_name(v));
    double x = num_f(v), m = pow(10.0, (double)prec);
    double r;
    /* Python's round(int, n) stays an int */
    if (!strcmp(method, "common") && v->t != V_FLOAT && prec >= 0) return mkint(num_i(v));
    if (!strcmp(method, "common")) {
        /* Python's round(): half to even on the decimal value */
        char buf[64];
        snprintf(buf, sizeof buf, "%.*f", (int)(prec > 0 ? prec : 0), x);
        r = prec >= 0 ? strtod(buf, NULL) : rint(x * m) / m;
    } else if (!strcmp(method, "ceil")) r = ceil(x * m) / m;
    else if (!strcmp(method, "floor")) r = floor(x * m) / m;
    else rfail(c, n, "method must be common, ceil or floor");
    return mkfloat(r);
}

static val do_indent(rctx *c, const zstr *s, const val *wv, bool first, bool blank)
{
    zstr *pad;
    if (wv && wv->t == V_STR) pad = wv->u.s;
    else {
        int64_t w = wv ? num_i(wv) : 4;
        if (w < 0) w = 0;
        if (w > 10000) w = 10000;
        char *sp = ralloc(c, (size_t)w + 1);
        memset(sp, ' ', (size_t)w);
        pad = zs_new(c, sp, (size_t)w);
    }
    obuf o = {0};
    size_t i = 0;
    bool line_no = 0;
    while (i <= s->len) {
        const char *nl = memchr(s->p + i, '\n', s->len - i);
        size_t e = nl ? (size_t)(nl - s->p) : s->len;
        bool is_blank = true;
        for (size_t k = i; k < e; k++)
            if (!py_space((unsigned char)s->p[k])) is_blank = false;
        if ((line_no ? (blank || !is_blank) : first)) ob_put(c, &o, pad->p, pad->len);
        ob_put(c, &o, s->p + i, e - i);
        if (!nl) break;
        ob_puts(c, &o, "\n");
        i = e + 1;
        line_no = 1;
    }
    return ob_val(c, &o);
}

static val apply_filter(rctx *c, const node *n, const char *name, val v, args_t *a)
{
    const val *a0 = a->npos ? &a->pos[0] : NULL;
    if (!strcmp(name, "tojson")) {
        const val *ind = arg(a, 0, "indent");
        obuf o = {0};
        to_json(c, n, &o, &v, ind && ind->t != V_NONE ? (int)num_i(ind) : -1, 0);
        return ob_val(c, &o);
    }
    if (!strcmp(name, "string")) return (val){.t = V_STR, .u.s = to_str(c, &v)};
    if (!strcmp(name, "safe")) {
        if (v.t == V_STR && v.u.s->safe) return v;
        zstr *s = to_str(c, &v);
        val r = mkstrn(c, s->p, s->len);
        r.u.s->safe = true;
        return r;
    }
    if (!strcmp(name, "e") || !strcmp(name, "escape") || !strcmp(name, "forceescape")) {
        zstr *s = to_str(c, &v);
        if (s->safe && name[0] != 'f') return (val){.t = V_STR, .u.s = s};
        obuf o = {0};
        html_escape(c, &o, s);
        val r = ob_val(c, &o);
        r.u.s->safe = true;
        return r;
    }
    if (!strcmp(name, "default") || !strcmp(name, "d")) {
        const val *def = arg(a, 0, "default_value"), *boolean = arg(a, 1, "boolean");
        bool use_def = v.t == V_UNDEF || (boolean && truthy(boolean) && !truthy(&v));
        return use_def ? (def ? *def : mkstr(c, "")) : v;
    }
    if (!strcmp(name, "length") || !strcmp(name, "count")) return mkint(val_len(c, n, &v));
    if (!strcmp(name, "list")) return as_list(c, n, &v);
    if (!strcmp(name, "first") || !strcmp(name, "last")) {
        if (v.t == V_UNDEF) return mkundef(c, "No first item, sequence was empty.");
        zlist *l = iter_items(c, n, &v);
        if (!l->n) return mkundef(c, "No %s item, sequence was empty.", name);
        return l->v[name[0] == 'f' ? 0 : l->n - 1];
    }
    if (!strcmp(name, "items")) {
        if (v.t == V_UNDEF) return mklist(zl_new(c, 0), V_GEN);
        if (v.t != V_DICT) rfail(c, n, "Can only get item pairs from a mapping.");
        zobj mo = {.kind = V_METHOD, .self = v, .name = "items"};
        val r = call_method(c, n, &mo, a);
        r.t = V_GEN;
        return r;
    }
    if (!strcmp(name, "map")) return map_items(c, n, &v, a);
    if (!strcmp(name, "select") || !strcmp(name, "reject")) return select_items(c, n, &v, a, false, name[0] == 's');
    if (!strcmp(name, "selectattr") || !strcmp(name, "rejectattr")) return select_items(c, n, &v, a, true, name[0] == 's');
    if (!strcmp(name, "join")) {
        const val *sep = arg(a, 0, "d"), *attr = arg(a, 1, "attribute");
        zlist *l = iter_items(c, n, &v);
        obuf o = {0};
        zstr *sp = sep ? to_str(c, sep) : NULL;
        for (size_t i = 0; i < l->n; i++) {
            if (i && sp) ob_put(c, &o, sp->p, sp->len);
            val item = attr ? attr_path(c, n, l->v[i], to_str(c, attr)) : l->v[i];
            write_str(c, &o, &item, false);
        }
        return ob_val(c, &o);
    }
    if (!strcmp(name, "attr")) {
        if (!a0) rfail(c, n, "attr needs a name");
        return get_attr(c, n, &v, to_str(c, a0)->p);
    }
    if (!strcmp(name, "reverse")) {
        if (v.t == V_STR) {
            zlist *l = iter_items(c, n, &v);
            obuf o = {0};
            for (size_t i = l->n; i > 0; i--) ob_put(c, &o, l->v[i - 1].u.s->p, l->v[i - 1].u.s->len);
            return ob_val(c, &o);
        }
        zlist *l = iter_items(c, n, &v), *r = zl_new(c, l->n);
        for (size_t i = l->n; i > 0; i--) zl_push(c, r, l->v[i - 1]);
        return mklist(r, V_GEN);
    }
    if (!strcmp(name, "unique")) {
        const val *cs = arg(a, 0, "case_sensitive"), *attr = arg(a, 1, "attribute");
        zlist *l = iter_items(c, n, &v), *out = zl_new(c, 0), *seen = zl_new(c, 0);
        for (size_t i = 0; i < l->n; i++) {
            val key = attr ? attr_path(c, n, l->v[i], to_str(c, attr)) : l->v[i];
            if (key.t == V_STR && !(cs && truthy(cs))) key = case_map(c, key.u.s, 0);
            bool dup = false;
            for (size_t k = 0; k < seen->n && !dup; k++) dup = val_eq(&seen->v[k], &key);
            if (dup) continue;
            zl_push(c, seen, key);
            zl_push(c, out, l->v[i]);
        }
        return mklist(out, V_GEN);
    }
    if (!strcmp(name, "sort") || !strcmp(name, "dictsort")) {
        bool dict = name[0] == 'd';
        const val *rev = arg(a, dict ? 2 : 0, "reverse"), *cs = arg(a, dict ? 0 : 1, "case_sensitive");
        const val *attr = dict ? NULL : arg(a, 2, "attribute"), *by = dict ? arg(a, 1, "by") : NULL;
        zlist *l;
        if (dict) {
            if (v.t != V_DICT) rfail(c, n, "dictsort needs a mapping");
            zobj mo = {.kind = V_METHOD, .self = v, .name = "items"};
            args_t none = {0};
            l = call_method(c, n, &mo, &none).u.l;
        } else {
            val lv = as_list(c, n, &v);
            l = lv.u.l;
        }
        val *keys = ralloc(c, (l->n + 1) * sizeof(val));
        bool by_value = by && by->t == V_STR && !strcmp(by->u.s->p, "value");
        for (size_t i = 0; i < l->n; i++)
            keys[i] = dict ? l->v[i].u.l->v[by_value ? 1 : 0] : attr ? attr_path(c, n, l->v[i], to_str(c, attr)) : l->v[i];
        sort_env e = {c, n, cs && truthy(cs)};
        sort_vals(&e, l->v, keys, l->n, rev && truthy(rev));
        return mklist(l, V_LIST);
    }
    if (!strcmp(name, "sum")) {
        const val *attr = arg(a, 0, "attribute"), *start = arg(a, 1, "start");
        val acc = start ? *start : mkint(0);
        zlist *l = iter_items(c, n, &v);
        for (size_t i = 0; i < l->n; i++) acc = arith(c, n, "+", acc, attr ? attr_path(c, n, l->v[i], to_str(c, attr)) : l->v[i]);
        return acc;
    }
    if (!strcmp(name, "min") || !strcmp(name, "max")) {
        const val *cs = arg(a, 0, "case_sensitive"), *attr = arg(a, 1, "attribute");
        zlist *l = iter_items(c, n, &v);
        if (!l->n) return mkundef(c, "No aggregated item, sequence was empty.");
        sort_env e = {c, n, cs && truthy(cs)};
        size_t best = 0;
        val bk = attr ? attr_path(c, n, l->v[0], to_str(c, attr)) : l->v[0];
        for (size_t i = 1; i < l->n; i++) {
            val k = attr ? attr_path(c, n, l->v[i], to_str(c, attr)) : l->v[i];
            int r = sort_cmp(&e, &k, &bk);
            if (name[1] == 'i' ? r < 0 : r > 0) best = i, bk = k;
        }
        return l->v[best];
    }
    if (!strcmp(name, "batch")) {
        const val *cnt = arg(a, 0, "linecount"), *fill = arg(a, 1, "fill_with");
        int64_t k = cnt ? num_i(cnt) : 0;
        if (k <= 0) rfail(c, n, "batch size must be positive");
        zlist *l = iter_items(c, n, &v), *out = zl_new(c, 0), *cur = NULL;
        for (size_t i = 0; i < l->n; i++) {
            if (!cur || (int64_t)cur->n == k) {
                cur = zl_new(c, (size_t)k);
                zl_push(c, out, mklist(cur, V_LIST));
            }
            zl_push(c, cur, l->v[i]);
        }
        if (cur && fill)
            while ((int64_t)cur->n < k) zl_push(c, cur, *fill);
        return mklist(out, V_GEN);
    }
    if (!strcmp(name, "int")) {
        const val *def = arg(a, 0, "default");
        val dv = def ? *def : mkint(0);
        if (v.t == V_INT) return v;
        if (v.t == V_BOOL) return mkint(v.u.b);
        if (v.t == V_FLOAT) return isfinite(v.u.f) ? mkint((int64_t)v.u.f) : dv;
        if (v.t == V_STR) {
            zstr *s = do_strip(c, v.u.s, NULL, true, true).u.s;
            int64_t r;
            double f;
            if (py_int(s, &r)) return mkint(r);
            if (py_float(s, &f) && isfinite(f)) return mkint((int64_t)f);
        }
        return dv;
    }
    if (!strcmp(name, "float")) {
        const val *def = arg(a, 0, "default");
        if (v.t == V_FLOAT) return v;
        if (v.t == V_INT || v.t == V_BOOL) return mkfloat(num_f(&v));
        double f;
        if (v.t == V_STR) {
            zstr *s = do_strip(c, v.u.s, NULL, true, true).u.s;
            if (py_float(s, &f)) return mkfloat(f);
        }
        return def ? *def : mkfloat(0.0);
    }
    if (!strcmp(name, "abs")) {
        if (v.t == V_INT) return mkint(v.u.i < 0 ? -v.u.i : v.u.i);
        if (v.t == V_FLOAT) return mkfloat(fabs(v.u.f));
        if (v.t == V_BOOL) return mkint(v.u.b);
        rfail(c, n, "bad operand type for abs(): '%s'", type_name(&v));
    }
    if (!strcmp(name, "round")) return do_round(c, n, &v, a);
    if (!strcmp(name, "pprint")) {
        obuf o = {0};
        write_str(c, &o, &v, true);
        return ob_val(c, &o);
    }
    /* the rest work on str(value) */
    zstr *s = to_str(c, &v);
    if (!strcmp(name, "trim")) {
        const val *ch = arg(a, 0, "chars");
        return do_strip(c, s, ch && ch->t == V_STR ? ch->u.s : NULL, true, true);
    }
    if (!strcmp(name, "upper")) return case_map(c, s, 1);
    if (!strcmp(name, "lower")) return case_map(c, s, 0);
    if (!strcmp(name, "title")) return case_map(c, s, 2);
    if (!strcmp(name, "capitalize")) return case_map(c, s, 3);
    if (!strcmp(name, "replace")) {
        const val *old = arg(a, 0, "old"), *nw = arg(a, 1, "new"), *cnt = arg(a, 2, "count");
        if (!old || !nw) rfail(c, n, "replace needs old and new");
        return str_replace(c, s, to_str(c, old), to_str(c, nw), cnt && cnt->t != V_NONE ? num_i(cnt) : -1);
    }
    if (!strcmp(name, "indent")) {
        const val *first = arg(a, 1, "first"), *blank = arg(a, 2, "blank");
        return do_indent(c, s, arg(a, 0, "width"), first && truthy(first), blank && truthy(blank));
    }
    if (!strcmp(name, "center")) {
        const val *w = arg(a, 0, "width");
        args_t ca = {(val *)(w ? w : &(val){.t = V_INT, .u.i = 80}), 1, NULL, NULL, 0};
        return call_str_method(c, n, s, "center", &ca);
    }
    if (!strcmp(name, "wordcount")) {
        int64_t k = 0;
        bool in = false;
        for (size_t i = 0; i < s->len; i++) {
            bool w = isalnum((unsigned char)s->p[i]) || s->p[i] == '_' || ((unsigned char)s->p[i] & 0x80);
            if (w && !in) k++;
            in = w;
        }
        return mkint(k);
    }
    if (!strcmp(name, "striptags")) {
        obuf o = {0};
        bool tag = false, space = false;
        for (size_t i = 0; i < s->len; i++) {
            char ch = s->p[i];
            if (ch == '<') tag = true;
            else if (ch == '>' && tag) tag = false;
            else if (!tag) {
                if (py_space((unsigned char)ch)) space = true;
                else {
                    if (space && o.n) ob_puts(c, &o, " ");
                    space = false;
                    ob_put(c, &o, &ch, 1);
                }
            }
        }
        return ob_val(c, &o);
    }
    if (!strcmp(name, "truncate")) {
        const val *lv = arg(a, 0, "length"), *kw = arg(a, 1, "killwords"), *endv = arg(a, 2, "end"), *lev = arg(a, 3, "leeway");
        int64_t len = lv ? num_i(lv) : 255, leeway = lev ? num_i(lev) : 5;
        zstr *end = endv ? to_str(c, endv) : zs_new(c, "...", 3);
        int64_t sl = (int64_t)utf8_count(s->p, s->len);
        if (sl <= len + leeway) return (val){.t = V_STR, .u.s = s};
        int64_t keep = len - (int64_t)utf8_count(end->p, end->len);
        if (keep < 0) keep = 0;
        size_t off = utf8_offset(s->p, s->len, (size_t)keep);
        if (!(kw && truthy(kw))) {
            size_t sp = off;
            while (sp > 0 && s->p[sp - 1] != ' ') sp--;
            if (sp > 0) off = sp - 1;
        }
        obuf o = {0};
        ob_put(c, &o, s->p, off);
        ob_put(c, &o, end->p, end->len);
        return ob_val(c, &o);
    }
    if (!strcmp(name, "format")) return str_percent(c, n, s, a->npos == 1 ? &a->pos[0] : &(val){.t = V_TUPLE, .u.l = &(zlist){a->npos, a->npos, a->pos}});
    if (!strcmp(name, "wordwrap")) rfail(c, n, "the wordwrap filter is not supported");
    rfail(c, n, "No filter named '%s'.", name);
}

/* ======================================================================
 * Statements
 * ====================================================================== */

static void emit(rctx *c, const val *v)
{
    write_str(c, c->out, v, false);
}

static void assign(rctx *c, const node *target, val v)
{
    if (target->kind == N_NAME) {
        zd_sets(c, c->f->vars, target->name, v);
        return;
    }
    if (target->kind == N_GETATTR) {
        val ns = lookup(c, c->f, target->a);
        if (ns.t != V_NS) rfail(c, target, "cannot assign attribute on non-namespace object");
        zd_sets(c, ns.u.d, target->name, v);
        return;
    }
    /* tuple unpacking */
    zlist *items = iter_items(c, target, &v);
    if (items->n < target->n) rfail(c, target, "not enough values to unpack (expected %zu, got %zu)", target->n, items->n);
    if (items->n > target->n) rfail(c, target, "too many values to unpack (expected %zu)", target->n);
    for (size_t i = 0; i < target->n; i++) assign(c, target->items[i], items->v[i]);
}

static frame *new_frame(rctx *c, frame *parent)
{
    frame *f = ralloc(c, sizeof *f);
    f->vars = zd_new(c);
    f->parent = parent;
    return f;
}

static void render_stmt(rctx *c, const node *s);

static void render_for(rctx *c, const node *s)
{
    val it = eval(c, s->b);
    zlist *src = iter_items(c, s->b, &it);
    frame *outer = c->f;
    zlist *items = src;
    if (s->c) {
        /* the inline filter runs before the loop: loop.length counts what passes */
        items = zl_new(c, 0);
        frame *probe = new_frame(c, outer);
        for (size_t i = 0; i < src->n; i++) {
            step(c, s);
            c->f = probe;
            assign(c, s->a, src->v[i]);
            val ok = eval(c, s->c);
            if (truthy(&ok)) zl_push(c, items, src->v[i]);
        }
        c->f = outer;
    } else if (src == it.u.l) {
        /* iterate a snapshot: the body cannot see its own edits to the list */
        items = zl_new(c, src->n);
        for (size_t i = 0; i < src->n; i++) zl_push(c, items, src->v[i]);
    }
    zobj *loop = mkobj(c, V_LOOP);
    loop->items = items;
    val loopv = {.t = V_LOOP, .u.o = loop};
    /* one frame for all iterations, its variables hidden at each start: a variable set in
     * one iteration is not seen by the next (jinja2 scoping), and long loops allocate
     * nothing per iteration (nothing keeps a reference to a loop frame) */
    frame *iter = new_frame(c, outer);
    for (size_t i = 0; i < items->n; i++) {
        step(c, s);
        for (size_t k = 0; k < iter->vars->n; k++) iter->vars->v[k].t = V_UNSET;
        c->f = iter;
        loop->idx = (int64_t)i;
        zd_sets(c, c->f->vars, "loop", loopv);
        assign(c, s->a, items->v[i]);
        render_body(c, s->d, c->f);
        c->f = outer;
        if (c->brk == 1) {
            c->brk = 0;
            break;
        }
        c->brk = 0;
    }
    c->f = outer;
    if (!items->n && s->d->a) render_body(c, s->d->a, outer);
}

static void render_body(rctx *c, const node *body, frame *f)
{
    frame *saved = c->f;
    c->f = f;
    for (size_t i = 0; i < body->n && !c->brk; i++) render_stmt(c, body->items[i]);
    c->f = saved;
}

static val capture(rctx *c, const node *body)
{
    obuf *saved = c->out;
    obuf cap = {0};
    c->out = &cap;
    render_body(c, body, c->f);
    c->out = saved;
    return ob_val(c, &cap);
}

/* a filter chain parsed with a NULL innermost operand, applied to v */
static val apply_chain(rctx *c, const node *f, val v)
{
    if (!f) return v;
    v = apply_chain(c, f->a, v);
    args_t a;
    eval_args(c, f, &a);
    return apply_filter(c, f, f->name, v, &a);
}

static void render_stmt(rctx *c, const node *s)
{
    if (++c->depth > ZSE_TEMPLATE_MAX_DEPTH * 4) rfail(c, s, "template nested too deeply");
    switch (s->kind) {
    case S_DATA: ob_put(c, c->out, s->cval.u.s->p, s->cval.u.s->len); break;
    case S_PRINT: {
        val v = eval(c, s->a);
        emit(c, &v);
        break;
    }
    case S_IF: {
        val cond = eval(c, s->a);
        if (truthy(&cond)) render_body(c, s->b, c->f);
        else if (s->c) {
            if (s->c->kind == S_IF) render_stmt(c, s->c);
            else render_body(c, s->c, c->f);
        }
        break;
    }
    case S_FOR: render_for(c, s); break;
    case S_SET: assign(c, s->a, eval(c, s->b)); break;
    case S_SETBLOCK: assign(c, s->a, apply_chain(c, s->c, capture(c, s->b))); break;
    case S_MACRO: {
        zobj *o = mkobj(c, V_MACRO);
        o->def = s;
        zd_sets(c, c->f->vars, s->name, (val){.t = V_MACRO, .u.o = o});
        break;
    }
    case S_CALLBLOCK: {
        zobj *caller = mkobj(c, V_MACRO);
        caller->def = s;
        caller->scope = c->f;
        val f = eval(c, s->a->a);
        if (f.t != V_MACRO) rfail(c, s, "call blocks need a macro");
        zobj *mo = mkobj(c, V_MACRO);
        *mo = *f.u.o;
        mo->caller = (val){.t = V_MACRO, .u.o = caller};
        args_t a;
        eval_args(c, s->a, &a);
        val r = call_macro(c, s, mo, &a);
        emit(c, &r);
        break;
    }
    case S_FILTERBLOCK: {
        val v = apply_chain(c, s->a, capture(c, s->b));
        emit(c, &v);
        break;
    }
    case S_BREAK: c->brk = 1; break;
    case S_CONTINUE: c->brk = 2; break;
    case S_BODY: render_body(c, s, c->f); break;
    case S_WITH: {
        frame *f = new_frame(c, c->f);
        zlist *vals = zl_new(c, s->n);
        for (size_t i = 0; i < s->n; i++) zl_push(c, vals, eval(c, s->kwv[i]));
        frame *saved = c->f;
        c->f = f;
        for (size_t i = 0; i < s->n; i++) assign(c, s->items[i], vals->v[i]);
        c->f = saved;
        render_body(c, s->b, f);
        break;
    }
    default: rfail(c, s, "internal error: not a statement");
    }
    c->depth--;
}

/* ======================================================================
 * Entry points
 * ====================================================================== */

int zse_template_render(const zse_template *t, const json_t *context, zse_buf *out)
{
    if (!t || !out) return zse_fail("template render: no template or output buffer");
    if (context && !json_is_object(context)) return zse_fail("template render: the context must be a JSON object");
    rctx *c = calloc(1, sizeof *c);
    if (!c) return zse_fail("template render: out of memory");
    c->ar.limit = (size_t)1 << 30;
    obuf main_out = {0};
    int rc = 0;
    if (setjmp(c->jb)) {
        rc = zse_fail("%s", c->err);
        goto done;
    }
    c->root = new_frame(c, NULL);
    c->f = c->root;
    c->out = &main_out;
    if (context) {
        const char *k;
        json_t *v;
        json_object_foreach((json_t *)context, k, v) zd_sets(c, c->root->vars, k, from_json(c, v));
    }
    render_body(c, t->root, c->root);
    if (main_out.n && zse_buf_append(out, main_out.p, main_out.n) < 0) rc = -1;
done:
    arena_free(&c->ar);
    free(c);
    return rc;
}

int zse_chat_template_apply(const char *template_src, const json_t *messages, const json_t *tools,
                            bool add_generation_prompt, const char *bos_token, const char *eos_token,
                            const json_t *extra, zse_buf *out)
{
    if (!template_src) return zse_fail("chat template: no template given");
    json_t *ctx = json_object();
    if (!ctx) return zse_fail("chat template: out of memory");
    int rc = 0;
    if (messages) rc |= json_object_set(ctx, "messages", (json_t *)messages);
    if (tools && !json_is_null(tools)) rc |= json_object_set(ctx, "tools", (json_t *)tools);
    rc |= json_object_set_new(ctx, "add_generation_prompt", json_boolean(add_generation_prompt));
    if (bos_token) rc |= json_object_set_new(ctx, "bos_token", json_string(bos_token));
    if (eos_token) rc |= json_object_set_new(ctx, "eos_token", json_string(eos_token));
    if (extra && json_is_object(extra)) rc |= json_object_update(ctx, (json_t *)extra);
    if (rc) {
        json_decref(ctx);
        return zse_fail("chat template: could not build the context (invalid UTF-8 in a token?)");
    }
    zse_template *t = zse_template_parse(template_src, strlen(template_src));
    if (!t) {
        json_decref(ctx);
        return -1;
    }
    rc = zse_template_render(t, ctx, out);
    zse_template_free(t);
    json_decref(ctx);
    return rc;
}

char *zse_template_from_tokenizer_config(const json_t *tc)
{
    const json_t *ct = json_object_get(tc, "chat_template");
    if (json_is_string(ct)) return zse_strdup(json_string_value(ct));
    if (json_is_array(ct)) {
        size_t i;
        const json_t *e;
        json_array_foreach(ct, i, e) {
            const char *name = json_string_value(json_object_get(e, "name"));
            const char *tmpl = json_string_value(json_object_get(e, "template"));
            if (name && tmpl && !strcmp(name, "default")) return zse_strdup(tmpl);
        }
        zse_fail("tokenizer_config.json: chat_template is a list without a \"default\" template");
        return NULL;
    }
    zse_fail("tokenizer_config.json has no chat_template");
    return NULL;
}
