/* parser.c — tokens to the AST, with jinja2's grammar and operator precedence.
 * Errors longjmp to zse_template_parse, which reports "line L, column C: message". */
#include "template/template_internal.h"

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
    node *n = tpl_arena_alloc(ps->lx.ar, sizeof *n);
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
        node **nn = tpl_arena_alloc(ps->lx.ar, cap * sizeof *nn);
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
        const char **nn = tpl_arena_alloc(ps->lx.ar, cap * sizeof *nn);
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
        zstr *s = tpl_arena_alloc(ps->lx.ar, sizeof *s + total + 1);
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
        char *j = tpl_arena_alloc(ps->lx.ar, l);
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
        node **items = tpl_arena_alloc(ps->lx.ar, sizeof *items);
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
            zstr *s = tpl_arena_alloc(ps->lx.ar, sizeof *s + t->len + 1);
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
    char *norm = tpl_arena_alloc(&t->ar, len + 1);
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
    if (tpl_lex_all(&ps->lx) < 0) goto fail;
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
    tpl_arena_free(&t->ar);
    free(t);
    return NULL;
}

void zse_template_free(zse_template *t)
{
    if (!t) return;
    tpl_arena_free(&t->ar);
    free(t);
}
