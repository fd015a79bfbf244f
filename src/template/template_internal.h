/* template_internal.h — what the stages of the template interpreter share: the arena, the
 * value model, the AST, the lexer's tokens and the render context. Private to src/template
 * (the public API is template.h).
 *
 *   lexer.c    source → tokens (whitespace control, trim_blocks, lstrip_blocks, raw)
 *   parser.c   tokens → AST (jinja2's grammar and precedence); zse_template_parse/free
 *   values.c   the arena, Python values: construction, str/repr, equality, ordering,
 *              iteration, JSON in and out
 *   eval.c     expressions, attribute and item access, operators, calls and macros,
 *              statements; zse_template_render and the chat-template entry points
 *   filters.c  string methods, list/dict methods, tests and filters
 *
 * Errors: the parser and the renderer longjmp to their entry points (the arena makes that
 * leak-free). */
#ifndef ZSE_TEMPLATE_INTERNAL_H
#define ZSE_TEMPLATE_INTERNAL_H

#include "template/template.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
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

/* the builtin functions (V_FUNC's u.fn) */
enum { F_RANGE = 1, F_DICT, F_NAMESPACE, F_RAISE, F_STRFTIME, F_CYCLER, F_JOINER };

/* evaluated call arguments */
typedef struct {
    val *pos;
    size_t npos;
    const char **kwn;
    val *kwv;
    size_t nkw;
} args_t;

static const val UNDEF = {.t = V_UNDEF};
static const val NONE = {.t = V_NONE};
static inline val mkbool(bool b) { return (val){.t = V_BOOL, .u.b = b}; }
static inline val mkint(int64_t i) { return (val){.t = V_INT, .u.i = i}; }
static inline val mkfloat(double f) { return (val){.t = V_FLOAT, .u.f = f}; }
static inline bool is_num(const val *v) { return v->t == V_INT || v->t == V_FLOAT || v->t == V_BOOL; }
static inline double num_f(const val *v) { return v->t == V_FLOAT ? v->u.f : v->t == V_INT ? (double)v->u.i : (double)v->u.b; }
/* whether a double converts to an int64 (C's cast is undefined outside the range, and for
 * NaN), and the conversion saturated where it does not (NaN: 0) */
static inline bool tpl_fits_i64(double f) { return f >= -9223372036854775808.0 && f < 9223372036854775808.0; }
static inline int64_t tpl_f2i(double f)
{
    return tpl_fits_i64(f) ? (int64_t)f : f > 0 ? INT64_MAX : f < 0 ? INT64_MIN : 0;
}
static inline int64_t num_i(const val *v) { return v->t == V_INT ? v->u.i : v->t == V_BOOL ? v->u.b : tpl_f2i(v->u.f); }

/* ---- shared between the stages ------------------------------------------------------ */

/* eval.c */
const val *tpl_arg(const args_t *a, size_t i, const char *name);
val tpl_arith(rctx *c, const node *n, const char *op, val a, val b);
bool tpl_compare(rctx *c, const node *n, const char *op, const val *a, const val *b);
bool tpl_contains(rctx *c, const node *n, const val *item, const val *cont);
val tpl_get_attr(rctx *c, const node *n, const val *obj, const char *name);
val tpl_get_item(rctx *c, const node *n, const val *obj, const val *key);
void tpl_html_escape(rctx *c, obuf *o, const zstr *s);
bool tpl_in_names(const char *const *names, const char *s);
extern const char *const tpl_unsafe_methods[];

/* filters.c */
val tpl_apply_filter(rctx *c, const node *n, const char *name, val v, args_t *a);
bool tpl_apply_test(rctx *c, const node *n, const char *name, const val *v, args_t *a);
val tpl_call_method(rctx *c, const node *n, const zobj *mo, args_t *a);
val tpl_str_percent(rctx *c, const node *n, const zstr *fmt, const val *argsv);

/* lexer.c */
int tpl_lex_all(lexer *lx);
void tpl_put_utf8(char *out, size_t *o, uint32_t cp);

/* values.c */
void *tpl_arena_alloc(arena *a, size_t n);
void tpl_arena_free(arena *a);
val tpl_from_json(rctx *c, const json_t *j);
zlist *tpl_iter_items(rctx *c, const node *n, const val *v);
val tpl_mklist(zlist *l, int t);
zobj *tpl_mkobj(rctx *c, int kind);
val tpl_mkstr(rctx *c, const char *p);
val tpl_mkstrn(rctx *c, const char *p, size_t n);
val tpl_mkundef(rctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void tpl_ob_put(rctx *c, obuf *b, const char *p, size_t n);
void tpl_ob_puts(rctx *c, obuf *b, const char *s);
val tpl_ob_val(rctx *c, obuf *b);
void *tpl_ralloc(rctx *c, size_t n);
zlist *tpl_range_list(rctx *c, const zobj *o);
_Noreturn void tpl_rfail(rctx *c, const node *n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
_Noreturn void tpl_rraise(rctx *c, const char *msg, size_t len);
void tpl_step(rctx *c, const node *n);
void tpl_to_json(rctx *c, const node *n, obuf *b, const val *v, int indent, int level);
zstr *tpl_to_str(rctx *c, const val *v);
bool tpl_truthy(const val *v);
const char *tpl_type_name(const val *v);
_Noreturn void tpl_undef_fail(rctx *c, const node *n, const val *v);
size_t tpl_utf8_count(const char *s, size_t n);
uint32_t tpl_utf8_next(const char *s, size_t n, size_t *i);
size_t tpl_utf8_offset(const char *s, size_t n, size_t cp);
int tpl_val_cmp(rctx *c, const node *n, const val *a, const val *b, const char *op);
bool tpl_val_eq(const val *a, const val *b);
int64_t tpl_val_len(rctx *c, const node *n, const val *v);
void tpl_write_str(rctx *c, obuf *b, const val *v, bool repr);
val *tpl_zd_find(zdict *d, const val *k);
val *tpl_zd_get(zdict *d, const char *key);
zdict *tpl_zd_new(rctx *c);
void tpl_zd_set(rctx *c, zdict *d, val k, val v);
void tpl_zd_sets(rctx *c, zdict *d, const char *key, val v);
zlist *tpl_zl_new(rctx *c, size_t cap);
void tpl_zl_push(rctx *c, zlist *l, val v);
zstr *tpl_zs_new(rctx *c, const char *p, size_t n);

#endif
