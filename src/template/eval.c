/* eval.c — the tree-walking renderer: expressions, attribute/item access, operators,
 * calls and macros, statements, and the public entry points (render, chat template,
 * tokenizer_config lookup). Errors longjmp to zse_template_render. */
#include "template/template_internal.h"

static atomic_llong fixed_time = -1;

void zse_template_set_fixed_time(time_t t) { atomic_store(&fixed_time, (long long)t); }

static val eval(rctx *c, const node *n);
static void render_body(rctx *c, const node *body, frame *f);

static val lookup(rctx *c, frame *f, const node *n)
{
    for (; f; f = f->parent) {
        val *v = tpl_zd_get(f->vars, n->name);
        if (v && v->t != V_UNSET) return *v;
    }
    if (!strcmp(n->name, "range")) return (val){.t = V_FUNC, .u.fn = F_RANGE};
    if (!strcmp(n->name, "dict")) return (val){.t = V_FUNC, .u.fn = F_DICT};
    if (!strcmp(n->name, "namespace")) return (val){.t = V_FUNC, .u.fn = F_NAMESPACE};
    if (!strcmp(n->name, "raise_exception")) return (val){.t = V_FUNC, .u.fn = F_RAISE};
    if (!strcmp(n->name, "strftime_now")) return (val){.t = V_FUNC, .u.fn = F_STRFTIME};
    if (!strcmp(n->name, "cycler")) return (val){.t = V_FUNC, .u.fn = F_CYCLER};
    if (!strcmp(n->name, "joiner")) return (val){.t = V_FUNC, .u.fn = F_JOINER};
    return tpl_mkundef(c, "'%s' is undefined", n->name);
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
const char *const tpl_unsafe_methods[] = {"append", "extend", "pop", "insert", "remove", "reverse", "sort",
                                             "clear", "update", "setdefault", "popitem", NULL};

bool tpl_in_names(const char *const *names, const char *s)
{
    for (; *names; names++)
        if (!strcmp(*names, s)) return true;
    return false;
}

static val mkmethod(rctx *c, const val *self, const char *name)
{
    zobj *o = tpl_mkobj(c, V_METHOD);
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
    if (!strcmp(name, "previtem")) return i > 0 ? o->items->v[i - 1] : tpl_mkundef(c, "there is no previous item");
    if (!strcmp(name, "nextitem")) return i + 1 < len ? o->items->v[i + 1] : tpl_mkundef(c, "there is no next item");
    if (!strcmp(name, "cycle") || !strcmp(name, "changed")) {
        val self = {.t = V_LOOP, .u.o = (zobj *)o};
        return mkmethod(c, &self, name);
    }
    return tpl_mkundef(c, "'LoopContext object' has no attribute '%s'", name);
}

/* jinja2 getattr: attribute (methods) first, then item */
val tpl_get_attr(rctx *c, const node *n, const val *obj, const char *name)
{
    switch (obj->t) {
    case V_UNDEF: tpl_undef_fail(c, n, obj);
    case V_DICT: {
        if (tpl_in_names(dict_methods, name)) return mkmethod(c, obj, name);
        val *v = tpl_zd_get(obj->u.d, name);
        if (v) return *v;
        return tpl_mkundef(c, "'dict object' has no attribute '%s'", name);
    }
    case V_NS: {
        val *v = tpl_zd_get(obj->u.d, name);
        if (v) return *v;
        return tpl_mkundef(c, "'Namespace object' has no attribute '%s'", name);
    }
    case V_STR:
        if (tpl_in_names(str_methods, name)) return mkmethod(c, obj, name);
        break;
    case V_LIST:
    case V_TUPLE:
        if (tpl_in_names(list_methods, name) && (obj->t == V_LIST || !strcmp(name, "index") || !strcmp(name, "count")))
            return mkmethod(c, obj, name);
        break;
    case V_LOOP: return loop_attr(c, obj->u.o, name);
    case V_CYCLER:
        if (!strcmp(name, "next") || !strcmp(name, "reset")) return mkmethod(c, obj, name);
        if (!strcmp(name, "current")) return obj->u.o->items->v[obj->u.o->idx % (int64_t)obj->u.o->items->n];
        break;
    case V_NONE: return tpl_mkundef(c, "'None' has no attribute '%s'", name);
    default: break;
    }
    return tpl_mkundef(c, "'%s object' has no attribute '%s'", tpl_type_name(obj), name);
}

/* jinja2 getitem: item first, then attribute for string keys */
val tpl_get_item(rctx *c, const node *n, const val *obj, const val *key)
{
    if (obj->t == V_RANGE) {
        val l = tpl_mklist(tpl_range_list(c, obj->u.o), V_LIST);
        return tpl_get_item(c, n, &l, key);
    }
    switch (obj->t) {
    case V_UNDEF: tpl_undef_fail(c, n, obj);
    case V_DICT:
    case V_NS: {
        val *v = tpl_zd_find(obj->u.d, key);
        if (v) return *v;
        break;
    }
    case V_LIST:
    case V_TUPLE:
    case V_STR: {
        if (key->t != V_INT && key->t != V_BOOL) break;
        int64_t len = tpl_val_len(c, n, obj), i = num_i(key);
        if (i < 0) i += len;
        if (i < 0 || i >= len) return tpl_mkundef(c, "%s object has no element %lld", tpl_type_name(obj), (long long)num_i(key));
        if (obj->t != V_STR) return obj->u.l->v[i];
        size_t st = tpl_utf8_offset(obj->u.s->p, obj->u.s->len, (size_t)i), e = st;
        tpl_utf8_next(obj->u.s->p, obj->u.s->len, &e);
        return tpl_mkstrn(c, obj->u.s->p + st, e - st);
    }
    default: break;
    }
    if (key->t == V_STR) {
        if (obj->t == V_DICT) {
            if (tpl_in_names(dict_methods, key->u.s->p)) return mkmethod(c, obj, key->u.s->p);
            return tpl_mkundef(c, "'dict object' has no attribute '%s'", key->u.s->p);
        }
        return tpl_get_attr(c, n, obj, key->u.s->p);
    }
    zstr *ks = tpl_to_str(c, key);
    return tpl_mkundef(c, "'%s object' has no attribute '%s'", tpl_type_name(obj), ks->p);
}

static int64_t slice_index(rctx *c, const node *n, const val *v, int64_t len, int64_t def, int64_t stepv)
{
    if (!v || v->t == V_NONE) return def;
    if (v->t != V_INT && v->t != V_BOOL) tpl_rfail(c, n, "slice indices must be integers or None");
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
    if (obj->t == V_UNDEF) tpl_undef_fail(c, n, obj);
    int64_t stepv = 1;
    if (sc && sc->t != V_NONE) {
        if (sc->t != V_INT) tpl_rfail(c, n, "slice indices must be integers or None");
        stepv = sc->u.i;
        if (stepv == 0) tpl_rfail(c, n, "slice step cannot be zero");
    }
    zlist *src;
    if (obj->t == V_STR || obj->t == V_RANGE) src = tpl_iter_items(c, n, obj);
    else if (obj->t == V_LIST || obj->t == V_TUPLE) src = obj->u.l;
    else tpl_rfail(c, n, "'%s' object is not subscriptable", tpl_type_name(obj));
    int64_t len = (int64_t)src->n;
    int64_t start = slice_index(c, n, sa, len, stepv > 0 ? 0 : len - 1, stepv);
    int64_t stop = slice_index(c, n, sb, len, stepv > 0 ? len : -1, stepv);
    zlist *out = tpl_zl_new(c, 0);
    if (stepv > 0)
        for (int64_t i = start; i < stop; i += stepv) tpl_zl_push(c, out, src->v[i]);
    else
        for (int64_t i = start; i > stop; i += stepv) tpl_zl_push(c, out, src->v[i]);
    if (obj->t != V_STR) return tpl_mklist(out, obj->t == V_RANGE ? V_LIST : obj->t);
    obuf b = {0};
    for (size_t i = 0; i < out->n; i++) tpl_ob_put(c, &b, out->v[i].u.s->p, out->v[i].u.s->len);
    return tpl_ob_val(c, &b);
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
        tpl_rfail(c, n, "can only concatenate %s (not \"%s\") to %s", tpl_type_name(a), tpl_type_name(b), tpl_type_name(a));
    tpl_rfail(c, n, "unsupported operand type(s) for %s: '%s' and '%s'", op, tpl_type_name(a), tpl_type_name(b));
}


/* markupsafe.escape */
void tpl_html_escape(rctx *c, obuf *o, const zstr *s)
{
    for (size_t i = 0; i < s->len; i++) {
        switch (s->p[i]) {
        case '&': tpl_ob_puts(c, o, "&amp;"); break;
        case '<': tpl_ob_puts(c, o, "&lt;"); break;
        case '>': tpl_ob_puts(c, o, "&gt;"); break;
        case '"': tpl_ob_puts(c, o, "&#34;"); break;
        case '\'': tpl_ob_puts(c, o, "&#39;"); break;
        default: tpl_ob_put(c, o, s->p + i, 1);
        }
    }
}

val tpl_arith(rctx *c, const node *n, const char *op, val a, val b)
{
    if (a.t == V_UNDEF) tpl_undef_fail(c, n, &a);
    if (b.t == V_UNDEF) tpl_undef_fail(c, n, &b);
    if (is_num(&a) && is_num(&b)) {
        bool fl = a.t == V_FLOAT || b.t == V_FLOAT;
        if (!strcmp(op, "/")) {
            if (num_f(&b) == 0) tpl_rfail(c, n, "division by zero");
            return mkfloat(num_f(&a) / num_f(&b));
        }
        if (fl) {
            double x = num_f(&a), y = num_f(&b);
            switch (op[0]) {
            case '+': return mkfloat(x + y);
            case '-': return mkfloat(x - y);
            case '*': return op[1] ? mkfloat(pow(x, y)) : mkfloat(x * y);
            case '/':
                if (y == 0) tpl_rfail(c, n, "float floor division by zero");
                return mkfloat(floor(x / y));
            case '%': {
                if (y == 0) tpl_rfail(c, n, "float modulo");
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
            if (y == 0) tpl_rfail(c, n, "integer division or modulo by zero");
            if (x == INT64_MIN && y == -1) return mkfloat(9223372036854775808.0);
            return mkint(floordiv_i(x, y));
        case '%':
            if (y == 0) tpl_rfail(c, n, "integer division or modulo by zero");
            if (y == -1) return mkint(0);
            r = x % y;
            if (r != 0 && ((r < 0) != (y < 0))) r += y;
            return mkint(r);
        }
    }
    if (op[0] == '+' && a.t == V_STR && b.t == V_STR) {
        obuf o = {0};
        bool safe = a.u.s->safe || b.u.s->safe;
        if (safe && !a.u.s->safe) tpl_html_escape(c, &o, a.u.s);
        else tpl_ob_put(c, &o, a.u.s->p, a.u.s->len);
        if (safe && !b.u.s->safe) tpl_html_escape(c, &o, b.u.s);
        else tpl_ob_put(c, &o, b.u.s->p, b.u.s->len);
        val r = tpl_ob_val(c, &o);
        r.u.s->safe = safe;
        return r;
    }
    if (op[0] == '+' && (a.t == V_LIST || a.t == V_TUPLE) && a.t == b.t) {
        zlist *l = tpl_zl_new(c, a.u.l->n + b.u.l->n);
        for (size_t i = 0; i < a.u.l->n; i++) tpl_zl_push(c, l, a.u.l->v[i]);
        for (size_t i = 0; i < b.u.l->n; i++) tpl_zl_push(c, l, b.u.l->v[i]);
        return tpl_mklist(l, a.t);
    }
    if (op[0] == '*' && !op[1] && (a.t == V_INT || b.t == V_INT) && (a.t == V_STR || b.t == V_STR || a.t == V_LIST || b.t == V_LIST)) {
        val seq = a.t == V_INT ? b : a;
        int64_t k = a.t == V_INT ? a.u.i : b.u.i;
        if (seq.t == V_STR) {
            if (k > 0 && seq.u.s->len * (uint64_t)k > ZSE_TEMPLATE_MAX_OUTPUT) tpl_rfail(c, n, "string repetition too large");
            obuf o = {0};
            for (int64_t i = 0; i < k; i++) tpl_ob_put(c, &o, seq.u.s->p, seq.u.s->len);
            return tpl_ob_val(c, &o);
        }
        if (k > 0 && seq.u.l->n * (uint64_t)k > 10000000) tpl_rfail(c, n, "list repetition too large");
        zlist *l = tpl_zl_new(c, 0);
        for (int64_t i = 0; i < k; i++)
            for (size_t j = 0; j < seq.u.l->n; j++) tpl_zl_push(c, l, seq.u.l->v[j]);
        return tpl_mklist(l, V_LIST);
    }
    if (op[0] == '%' && a.t == V_STR) return tpl_str_percent(c, n, a.u.s, &b);
    binop_type_error(c, n, op, &a, &b);
}

bool tpl_contains(rctx *c, const node *n, const val *item, const val *cont)
{
    switch (cont->t) {
    case V_UNDEF: return false;
    case V_STR: {
        if (item->t != V_STR) tpl_rfail(c, n, "'in <string>' requires string as left operand, not %s", tpl_type_name(item));
        if (!item->u.s->len) return true;
        return memmem(cont->u.s->p, cont->u.s->len, item->u.s->p, item->u.s->len) != NULL;
    }
    case V_LIST:
    case V_TUPLE:
    case V_GEN:
        for (size_t i = 0; i < cont->u.l->n; i++)
            if (tpl_val_eq(item, &cont->u.l->v[i])) return true;
        return false;
    case V_DICT:
    case V_NS: return tpl_zd_find(cont->u.d, item) != NULL;
    case V_RANGE: {
        zlist *l = tpl_range_list(c, cont->u.o);
        for (size_t i = 0; i < l->n; i++)
            if (tpl_val_eq(item, &l->v[i])) return true;
        return false;
    }
    default: tpl_rfail(c, n, "argument of type '%s' is not iterable", tpl_type_name(cont));
    }
}

bool tpl_compare(rctx *c, const node *n, const char *op, const val *a, const val *b)
{
    if (!strcmp(op, "==")) return tpl_val_eq(a, b);
    if (!strcmp(op, "!=")) return !tpl_val_eq(a, b);
    if (!strcmp(op, "in")) return tpl_contains(c, n, a, b);
    if (!strcmp(op, "notin")) return !tpl_contains(c, n, a, b);
    int r = tpl_val_cmp(c, n, a, b, op);
    if (!strcmp(op, "<")) return r < 0;
    if (!strcmp(op, ">")) return r > 0;
    if (!strcmp(op, "<=")) return r <= 0;
    return r >= 0;
}

static void eval_args(rctx *c, const node *n, args_t *a)
{
    a->npos = n->n;
    a->pos = n->n ? tpl_ralloc(c, n->n * sizeof(val)) : NULL;
    for (size_t i = 0; i < n->n; i++) a->pos[i] = eval(c, n->items[i]);
    a->nkw = n->nkw;
    a->kwn = n->kwn;
    a->kwv = n->nkw ? tpl_ralloc(c, n->nkw * sizeof(val)) : NULL;
    for (size_t i = 0; i < n->nkw; i++) a->kwv[i] = eval(c, n->kwv[i]);
}

/* argument i (positional) or by keyword; NULL when absent */
const val *tpl_arg(const args_t *a, size_t i, const char *name)
{
    if (i < a->npos) return &a->pos[i];
    for (size_t k = 0; k < a->nkw; k++)
        if (!strcmp(a->kwn[k], name)) return &a->kwv[k];
    return NULL;
}

static val call_value(rctx *c, const node *n, const val *f, args_t *a);

static val eval(rctx *c, const node *n)
{
    if (++c->depth > ZSE_TEMPLATE_MAX_DEPTH * 4) tpl_rfail(c, n, "expression nested too deeply");
    val r;
    switch (n->kind) {
    case N_CONST: r = n->cval; break;
    case N_NAME: r = lookup(c, c->f, n); break;
    case N_LIST:
    case N_TUPLE: {
        zlist *l = tpl_zl_new(c, n->n);
        for (size_t i = 0; i < n->n; i++) tpl_zl_push(c, l, eval(c, n->items[i]));
        r = tpl_mklist(l, n->kind == N_LIST ? V_LIST : V_TUPLE);
        break;
    }
    case N_DICT: {
        zdict *d = tpl_zd_new(c);
        for (size_t i = 0; i < n->n; i++) {
            val k = eval(c, n->items[i]);
            tpl_zd_set(c, d, k, eval(c, n->kwv[i]));
        }
        r = (val){.t = V_DICT, .u.d = d};
        break;
    }
    case N_GETATTR: {
        val o = eval(c, n->a);
        r = tpl_get_attr(c, n, &o, n->name);
        break;
    }
    case N_GETITEM: {
        val o = eval(c, n->a), k = eval(c, n->b);
        if (o.t == V_UNDEF) tpl_undef_fail(c, n, &o);
        r = tpl_get_item(c, n, &o, &k);
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
        r = tpl_apply_filter(c, n, n->name, v, &a);
        break;
    }
    case N_TEST: {
        val v = eval(c, n->a);
        args_t a;
        eval_args(c, n, &a);
        bool t = tpl_apply_test(c, n, n->name, &v, &a);
        r = mkbool(n->flag ? !t : t);
        break;
    }
    case N_BINOP:
        if (n->name[0] == '~') {
            val a = eval(c, n->a), b = eval(c, n->b);
            obuf o = {0};
            tpl_write_str(c, &o, &a, false);
            tpl_write_str(c, &o, &b, false);
            r = tpl_ob_val(c, &o);
        } else {
            val a = eval(c, n->a);
            r = tpl_arith(c, n, n->name, a, eval(c, n->b));
        }
        break;
    case N_NEG:
    case N_POS: {
        val v = eval(c, n->a);
        if (v.t == V_UNDEF) tpl_undef_fail(c, n, &v);
        if (!is_num(&v)) tpl_rfail(c, n, "bad operand type for unary %c: '%s'", n->kind == N_NEG ? '-' : '+', tpl_type_name(&v));
        if (n->kind == N_POS) r = v.t == V_BOOL ? mkint(v.u.b) : v;
        else if (v.t == V_FLOAT) r = mkfloat(-v.u.f);
        else r = mkint(-num_i(&v));
        break;
    }
    case N_NOT: {
        val v = eval(c, n->a);
        r = mkbool(!tpl_truthy(&v));
        break;
    }
    case N_AND: {
        val a = eval(c, n->a);
        r = tpl_truthy(&a) ? eval(c, n->b) : a;
        break;
    }
    case N_OR: {
        val a = eval(c, n->a);
        r = tpl_truthy(&a) ? a : eval(c, n->b);
        break;
    }
    case N_COMPARE: {
        val a = eval(c, n->items[0]);
        r = mkbool(true);
        for (size_t i = 1; i < n->n; i++) {
            val b = eval(c, n->items[i]);
            if (!tpl_compare(c, n, n->ops[i - 1], &a, &b)) {
                r = mkbool(false);
                break;
            }
            a = b;
        }
        break;
    }
    case N_COND: {
        val t = eval(c, n->b);
        if (tpl_truthy(&t)) r = eval(c, n->a);
        else if (n->c) r = eval(c, n->c);
        else r = tpl_mkundef(c, "the inline if-expression on line %d evaluated to false and no else section was defined.", n->line);
        break;
    }
    default: tpl_rfail(c, n, "internal error: not an expression");
    }
    c->depth--;
    return r;
}

/* ---- calls ------------------------------------------------------------ */

static val call_macro(rctx *c, const node *n, const zobj *mo, args_t *a)
{
    const node *def = mo->def;
    if (++c->depth > ZSE_TEMPLATE_MAX_DEPTH) tpl_rfail(c, n, "maximum recursion depth exceeded in macro calls");
    tpl_step(c, n);
    frame *f = tpl_ralloc(c, sizeof *f);
    f->vars = tpl_zd_new(c);
    /* macros see the template's top level; a call block's caller() sees its own scope */
    f->parent = mo->scope ? mo->scope : c->root;
    frame *saved_f = c->f;
    c->f = f;
    zlist *varargs = tpl_zl_new(c, 0);
    zdict *kwargs = tpl_zd_new(c);
    for (size_t i = 0; i < a->npos; i++) {
        if (i < def->nkw) tpl_zd_sets(c, f->vars, def->kwn[i], a->pos[i]);
        else tpl_zl_push(c, varargs, a->pos[i]);
    }
    for (size_t k = 0; k < a->nkw; k++) {
        size_t p;
        for (p = 0; p < def->nkw; p++)
            if (!strcmp(def->kwn[p], a->kwn[k])) break;
        if (p < def->nkw) tpl_zd_sets(c, f->vars, a->kwn[k], a->kwv[k]);
        else tpl_zd_sets(c, kwargs, a->kwn[k], a->kwv[k]);
    }
    for (size_t p = 0; p < def->nkw; p++) {
        if (tpl_zd_get(f->vars, def->kwn[p])) continue;
        if (def->kwv[p]) tpl_zd_sets(c, f->vars, def->kwn[p], eval(c, def->kwv[p]));
        else tpl_zd_sets(c, f->vars, def->kwn[p], tpl_mkundef(c, "parameter '%s' was not provided", def->kwn[p]));
    }
    tpl_zd_sets(c, f->vars, "varargs", tpl_mklist(varargs, V_TUPLE));
    tpl_zd_sets(c, f->vars, "kwargs", (val){.t = V_DICT, .u.d = kwargs});
    if (mo->caller.t == V_MACRO) tpl_zd_sets(c, f->vars, "caller", mo->caller);
    obuf *saved = c->out;
    obuf cap = {0};
    c->out = &cap;
    render_body(c, def->b, f);
    c->out = saved;
    c->f = saved_f;
    c->depth--;
    return tpl_ob_val(c, &cap);
}

static val call_builtin(rctx *c, const node *n, int fn, args_t *a)
{
    switch (fn) {
    case F_RANGE: {
        if (!a->npos || a->npos > 3) tpl_rfail(c, n, "range expected 1 to 3 arguments, got %zu", a->npos);
        for (size_t i = 0; i < a->npos; i++)
            if (a->pos[i].t != V_INT && a->pos[i].t != V_BOOL) tpl_rfail(c, n, "'%s' object cannot be interpreted as an integer", tpl_type_name(&a->pos[i]));
        zobj *o = tpl_mkobj(c, V_RANGE);
        o->a = a->npos > 1 ? num_i(&a->pos[0]) : 0;
        o->b = a->npos > 1 ? num_i(&a->pos[1]) : num_i(&a->pos[0]);
        o->c = a->npos > 2 ? num_i(&a->pos[2]) : 1;
        if (!o->c) tpl_rfail(c, n, "range() arg 3 must not be zero");
        double cnt = o->c > 0 ? ceil(((double)o->b - (double)o->a) / (double)o->c) : ceil(((double)o->a - (double)o->b) / -(double)o->c);
        if (cnt > 100000) tpl_rfail(c, n, "Range too big. The sandbox blocks ranges larger than MAX_RANGE (100000).");
        return (val){.t = V_RANGE, .u.o = o};
    }
    case F_DICT:
    case F_NAMESPACE: {
        zdict *d = tpl_zd_new(c);
        for (size_t i = 0; i < a->npos; i++) {
            if (a->pos[i].t == V_DICT || a->pos[i].t == V_NS) {
                for (size_t k = 0; k < a->pos[i].u.d->n; k++) tpl_zd_set(c, d, a->pos[i].u.d->k[k], a->pos[i].u.d->v[k]);
            } else {
                zlist *items = tpl_iter_items(c, n, &a->pos[i]);
                for (size_t k = 0; k < items->n; k++) {
                    const val *p = &items->v[k];
                    if ((p->t != V_LIST && p->t != V_TUPLE) || p->u.l->n != 2) tpl_rfail(c, n, "dictionary update sequence element #%zu has wrong length", k);
                    tpl_zd_set(c, d, p->u.l->v[0], p->u.l->v[1]);
                }
            }
        }
        for (size_t k = 0; k < a->nkw; k++) tpl_zd_sets(c, d, a->kwn[k], a->kwv[k]);
        return (val){.t = fn == F_DICT ? V_DICT : V_NS, .u.d = d};
    }
    case F_RAISE: {
        zstr *m = a->npos ? tpl_to_str(c, &a->pos[0]) : tpl_zs_new(c, "", 0);
        tpl_rraise(c, m->p, m->len);
    }
    case F_STRFTIME: {
        const val *f = tpl_arg(a, 0, "format");
        if (!f || f->t != V_STR) tpl_rfail(c, n, "strftime_now() needs a format string");
        long long ft = atomic_load(&fixed_time);
        time_t now = ft >= 0 ? (time_t)ft : time(NULL);
        struct tm tm;
        if (ft >= 0) gmtime_r(&now, &tm);
        else localtime_r(&now, &tm);
        char buf[512];
        size_t len = f->u.s->len ? strftime(buf, sizeof buf, f->u.s->p, &tm) : 0;
        return tpl_mkstrn(c, buf, len);
    }
    case F_CYCLER: {
        if (!a->npos) tpl_rfail(c, n, "at least one item has to be provided");
        zobj *o = tpl_mkobj(c, V_CYCLER);
        o->items = tpl_zl_new(c, a->npos);
        for (size_t i = 0; i < a->npos; i++) tpl_zl_push(c, o->items, a->pos[i]);
        return (val){.t = V_CYCLER, .u.o = o};
    }
    case F_JOINER: {
        const val *s = tpl_arg(a, 0, "sep");
        zobj *o = tpl_mkobj(c, V_JOINER);
        o->sep = s ? tpl_to_str(c, s) : tpl_zs_new(c, ", ", 2);
        return (val){.t = V_JOINER, .u.o = o};
    }
    }
    tpl_rfail(c, n, "unknown function");
}

static val call_value(rctx *c, const node *n, const val *f, args_t *a)
{
    switch (f->t) {
    case V_FUNC: return call_builtin(c, n, f->u.fn, a);
    case V_METHOD: return tpl_call_method(c, n, f->u.o, a);
    case V_MACRO: return call_macro(c, n, f->u.o, a);
    case V_JOINER:
        if (!f->u.o->idx) {
            f->u.o->idx = 1;
            return tpl_mkstr(c, "");
        }
        return (val){.t = V_STR, .u.s = f->u.o->sep};
    case V_UNDEF: tpl_undef_fail(c, n, f);
    default: tpl_rfail(c, n, "'%s' object is not callable", tpl_type_name(f));
    }
}

/* ======================================================================
 * Statements
 * ====================================================================== */

static void emit(rctx *c, const val *v)
{
    tpl_write_str(c, c->out, v, false);
}

static void assign(rctx *c, const node *target, val v)
{
    if (target->kind == N_NAME) {
        tpl_zd_sets(c, c->f->vars, target->name, v);
        return;
    }
    if (target->kind == N_GETATTR) {
        val ns = lookup(c, c->f, target->a);
        if (ns.t != V_NS) tpl_rfail(c, target, "cannot assign attribute on non-namespace object");
        tpl_zd_sets(c, ns.u.d, target->name, v);
        return;
    }
    /* tuple unpacking */
    zlist *items = tpl_iter_items(c, target, &v);
    if (items->n < target->n) tpl_rfail(c, target, "not enough values to unpack (expected %zu, got %zu)", target->n, items->n);
    if (items->n > target->n) tpl_rfail(c, target, "too many values to unpack (expected %zu)", target->n);
    for (size_t i = 0; i < target->n; i++) assign(c, target->items[i], items->v[i]);
}

static frame *new_frame(rctx *c, frame *parent)
{
    frame *f = tpl_ralloc(c, sizeof *f);
    f->vars = tpl_zd_new(c);
    f->parent = parent;
    return f;
}

static void render_stmt(rctx *c, const node *s);

static void render_for(rctx *c, const node *s)
{
    val it = eval(c, s->b);
    zlist *src = tpl_iter_items(c, s->b, &it);
    frame *outer = c->f;
    zlist *items = src;
    if (s->c) {
        /* the inline filter runs before the loop: loop.length counts what passes */
        items = tpl_zl_new(c, 0);
        frame *probe = new_frame(c, outer);
        for (size_t i = 0; i < src->n; i++) {
            tpl_step(c, s);
            c->f = probe;
            assign(c, s->a, src->v[i]);
            val ok = eval(c, s->c);
            if (tpl_truthy(&ok)) tpl_zl_push(c, items, src->v[i]);
        }
        c->f = outer;
    } else if (src == it.u.l) {
        /* iterate a snapshot: the body cannot see its own edits to the list */
        items = tpl_zl_new(c, src->n);
        for (size_t i = 0; i < src->n; i++) tpl_zl_push(c, items, src->v[i]);
    }
    zobj *loop = tpl_mkobj(c, V_LOOP);
    loop->items = items;
    val loopv = {.t = V_LOOP, .u.o = loop};
    /* one frame for all iterations, its variables hidden at each start: a variable set in
     * one iteration is not seen by the next (jinja2 scoping), and long loops allocate
     * nothing per iteration (nothing keeps a reference to a loop frame) */
    frame *iter = new_frame(c, outer);
    for (size_t i = 0; i < items->n; i++) {
        tpl_step(c, s);
        for (size_t k = 0; k < iter->vars->n; k++) iter->vars->v[k].t = V_UNSET;
        c->f = iter;
        loop->idx = (int64_t)i;
        tpl_zd_sets(c, c->f->vars, "loop", loopv);
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
    return tpl_ob_val(c, &cap);
}

/* a filter chain parsed with a NULL innermost operand, applied to v */
static val apply_chain(rctx *c, const node *f, val v)
{
    if (!f) return v;
    v = apply_chain(c, f->a, v);
    args_t a;
    eval_args(c, f, &a);
    return tpl_apply_filter(c, f, f->name, v, &a);
}

static void render_stmt(rctx *c, const node *s)
{
    if (++c->depth > ZSE_TEMPLATE_MAX_DEPTH * 4) tpl_rfail(c, s, "template nested too deeply");
    switch (s->kind) {
    case S_DATA: tpl_ob_put(c, c->out, s->cval.u.s->p, s->cval.u.s->len); break;
    case S_PRINT: {
        val v = eval(c, s->a);
        emit(c, &v);
        break;
    }
    case S_IF: {
        val cond = eval(c, s->a);
        if (tpl_truthy(&cond)) render_body(c, s->b, c->f);
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
        zobj *o = tpl_mkobj(c, V_MACRO);
        o->def = s;
        tpl_zd_sets(c, c->f->vars, s->name, (val){.t = V_MACRO, .u.o = o});
        break;
    }
    case S_CALLBLOCK: {
        zobj *caller = tpl_mkobj(c, V_MACRO);
        caller->def = s;
        caller->scope = c->f;
        val f = eval(c, s->a->a);
        if (f.t != V_MACRO) tpl_rfail(c, s, "call blocks need a macro");
        zobj *mo = tpl_mkobj(c, V_MACRO);
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
        zlist *vals = tpl_zl_new(c, s->n);
        for (size_t i = 0; i < s->n; i++) tpl_zl_push(c, vals, eval(c, s->kwv[i]));
        frame *saved = c->f;
        c->f = f;
        for (size_t i = 0; i < s->n; i++) assign(c, s->items[i], vals->v[i]);
        c->f = saved;
        render_body(c, s->b, f);
        break;
    }
    default: tpl_rfail(c, s, "internal error: not a statement");
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
        json_object_foreach((json_t *)context, k, v) tpl_zd_sets(c, c->root->vars, k, tpl_from_json(c, v));
    }
    render_body(c, t->root, c->root);
    if (main_out.n && zse_buf_append(out, main_out.p, main_out.n) < 0) rc = -1;
done:
    tpl_arena_free(&c->ar);
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
