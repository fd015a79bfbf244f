/* values.c — the arena and the Python value model of the renderer: construction,
 * str()/repr(), truthiness, equality and ordering, iteration, JSON in and out. */
#include "template/template_internal.h"

/* NULL when out of memory or over the arena's limit */
void *tpl_arena_alloc(arena *a, size_t n)
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

void tpl_arena_free(arena *a)
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


_Noreturn void tpl_rfail(rctx *c, const node *n, const char *fmt, ...)
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
_Noreturn void tpl_rraise(rctx *c, const char *msg, size_t len)
{
    size_t l = len < sizeof c->err - 1 ? len : sizeof c->err - 1;
    memcpy(c->err, msg, l);
    c->err[l] = 0;
    longjmp(c->jb, 1);
}

void *tpl_ralloc(rctx *c, size_t n)
{
    void *p = tpl_arena_alloc(&c->ar, n);
    if (!p) tpl_rfail(c, NULL, "template render ran out of memory (limit %zu MiB)", c->ar.limit >> 20);
    return p;
}


zstr *tpl_zs_new(rctx *c, const char *p, size_t n)
{
    zstr *s = tpl_ralloc(c, sizeof *s + n + 1);
    s->len = n;
    s->safe = false;
    if (n) memcpy(s->p, p, n);
    s->p[n] = 0;
    return s;
}
val tpl_mkstrn(rctx *c, const char *p, size_t n) { return (val){.t = V_STR, .u.s = tpl_zs_new(c, p, n)}; }
val tpl_mkstr(rctx *c, const char *p) { return tpl_mkstrn(c, p, strlen(p)); }

val tpl_mkundef(rctx *c, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return (val){.t = V_UNDEF, .u.s = tpl_zs_new(c, msg, strlen(msg))};
}

zlist *tpl_zl_new(rctx *c, size_t cap)
{
    zlist *l = tpl_ralloc(c, sizeof *l);
    l->n = 0;
    l->cap = cap;
    l->v = cap ? tpl_ralloc(c, cap * sizeof(val)) : NULL;
    return l;
}
void tpl_zl_push(rctx *c, zlist *l, val v)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 8;
        val *nv = tpl_ralloc(c, cap * sizeof *nv);
        if (l->n) memcpy(nv, l->v, l->n * sizeof *nv);
        l->v = nv;
        l->cap = cap;
    }
    l->v[l->n++] = v;
}
val tpl_mklist(zlist *l, int t) { return (val){.t = (uint8_t)t, .u.l = l}; }

zdict *tpl_zd_new(rctx *c)
{
    zdict *d = tpl_ralloc(c, sizeof *d);
    memset(d, 0, sizeof *d);
    return d;
}
static bool val_eq_d(const val *a, const val *b, int depth);
val *tpl_zd_find(zdict *d, const val *k)
{
    for (size_t i = 0; i < d->n; i++)
        if (tpl_val_eq(&d->k[i], k)) return &d->v[i];
    return NULL;
}
val *tpl_zd_get(zdict *d, const char *key)
{
    size_t kl = strlen(key);
    for (size_t i = 0; i < d->n; i++)
        if (d->k[i].t == V_STR && d->k[i].u.s->len == kl && memcmp(d->k[i].u.s->p, key, kl) == 0) return &d->v[i];
    return NULL;
}
void tpl_zd_set(rctx *c, zdict *d, val k, val v)
{
    val *slot = tpl_zd_find(d, &k);
    if (slot) {
        *slot = v;
        return;
    }
    if (d->n == d->cap) {
        size_t cap = d->cap ? d->cap * 2 : 8;
        val *nk = tpl_ralloc(c, cap * sizeof *nk), *nv = tpl_ralloc(c, cap * sizeof *nv);
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
void tpl_zd_sets(rctx *c, zdict *d, const char *key, val v)
{
    val *slot = tpl_zd_get(d, key);
    if (slot) *slot = v;
    else tpl_zd_set(c, d, tpl_mkstr(c, key), v);
}

zobj *tpl_mkobj(rctx *c, int kind)
{
    zobj *o = tpl_ralloc(c, sizeof *o);
    memset(o, 0, sizeof *o);
    o->kind = kind;
    return o;
}

/* ---- output buffers --------------------------------------------------- */

void tpl_ob_put(rctx *c, obuf *b, const char *p, size_t n)
{
    if (!n) return;
    if (b->n + n > ZSE_TEMPLATE_MAX_OUTPUT) tpl_rfail(c, NULL, "template output exceeds %zu MiB", ZSE_TEMPLATE_MAX_OUTPUT >> 20);
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 256;
        while (cap < b->n + n + 1) cap *= 2;
        char *np = tpl_ralloc(c, cap);
        if (b->n) memcpy(np, b->p, b->n);
        b->p = np;
        b->cap = cap;
    }
    memcpy(b->p + b->n, p, n);
    b->n += n;
    b->p[b->n] = 0;
}
void tpl_ob_puts(rctx *c, obuf *b, const char *s) { tpl_ob_put(c, b, s, strlen(s)); }
val tpl_ob_val(rctx *c, obuf *b) { return tpl_mkstrn(c, b->p ? b->p : "", b->n); }

/* ---- Python names and formatting -------------------------------------- */

const char *tpl_type_name(const val *v)
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
uint32_t tpl_utf8_next(const char *s, size_t n, size_t *i)
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

size_t tpl_utf8_count(const char *s, size_t n)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (((unsigned char)s[i] & 0xC0) != 0x80) k++;
    return k;
}

/* byte offset of code point index cp (clamped to n) */
size_t tpl_utf8_offset(const char *s, size_t n, size_t cp)
{
    size_t i = 0;
    while (cp && i < n) {
        tpl_utf8_next(s, n, &i);
        cp--;
    }
    return i;
}

static void repr_str(rctx *c, obuf *b, const zstr *s)
{
    bool has_sq = memchr(s->p, '\'', s->len) != NULL, has_dq = memchr(s->p, '"', s->len) != NULL;
    char q = has_sq && !has_dq ? '"' : '\'';
    tpl_ob_put(c, b, &q, 1);
    for (size_t i = 0; i < s->len;) {
        size_t st = i;
        uint32_t cp = tpl_utf8_next(s->p, s->len, &i);
        char e[16];
        if (cp == (uint32_t)q || cp == '\\') {
            e[0] = '\\';
            e[1] = (char)cp;
            tpl_ob_put(c, b, e, 2);
        } else if (cp == '\n') tpl_ob_puts(c, b, "\\n");
        else if (cp == '\r') tpl_ob_puts(c, b, "\\r");
        else if (cp == '\t') tpl_ob_puts(c, b, "\\t");
        else if (cp < 0x20 || cp == 0x7f || (cp >= 0x80 && cp < 0xa0)) {
            snprintf(e, sizeof e, "\\x%02x", cp);
            tpl_ob_puts(c, b, e);
        } else {
            tpl_ob_put(c, b, s->p + st, i - st);
        }
    }
    tpl_ob_put(c, b, &q, 1);
}


static void write_seq(rctx *c, obuf *b, const val *v)
{
    const zlist *l = v->u.l;
    tpl_ob_puts(c, b, v->t == V_TUPLE ? "(" : "[");
    for (size_t i = 0; i < l->n; i++) {
        if (i) tpl_ob_puts(c, b, ", ");
        tpl_write_str(c, b, &l->v[i], true);
    }
    if (v->t == V_TUPLE && l->n == 1) tpl_ob_puts(c, b, ",");
    tpl_ob_puts(c, b, v->t == V_TUPLE ? ")" : "]");
}

/* Python str() (repr=false) or repr() of a value */
void tpl_write_str(rctx *c, obuf *b, const val *v, bool repr)
{
    char num[64];
    switch (v->t) {
    case V_UNDEF: return;
    case V_NONE: tpl_ob_puts(c, b, "None"); return;
    case V_BOOL: tpl_ob_puts(c, b, v->u.b ? "True" : "False"); return;
    case V_INT: snprintf(num, sizeof num, "%lld", (long long)v->u.i); tpl_ob_puts(c, b, num); return;
    case V_FLOAT: fmt_float(v->u.f, num, sizeof num, false); tpl_ob_puts(c, b, num); return;
    case V_STR:
        if (repr) repr_str(c, b, v->u.s);
        else tpl_ob_put(c, b, v->u.s->p, v->u.s->len);
        return;
    case V_LIST:
    case V_TUPLE:
    case V_DICT:
    case V_NS: break;
    case V_GEN: tpl_ob_puts(c, b, "<generator object at 0x7f0000000000>"); return;
    case V_RANGE:
        if (v->u.o->c == 1) snprintf(num, sizeof num, "range(%lld, %lld)", (long long)v->u.o->a, (long long)v->u.o->b);
        else snprintf(num, sizeof num, "range(%lld, %lld, %lld)", (long long)v->u.o->a, (long long)v->u.o->b, (long long)v->u.o->c);
        tpl_ob_puts(c, b, num);
        return;
    case V_MACRO: tpl_ob_puts(c, b, "<Macro>"); return;
    default: tpl_ob_puts(c, b, "<function>"); return;
    }
    /* containers: Python prints a container inside itself as [...] or {...} */
    const void *id = v->t == V_LIST || v->t == V_TUPLE ? (const void *)v->u.l : (const void *)v->u.d;
    for (int i = 0; i < c->nprinting; i++)
        if (c->printing[i] == id) {
            tpl_ob_puts(c, b, v->t == V_LIST ? "[...]" : v->t == V_TUPLE ? "(...)" : "{...}");
            return;
        }
    if (c->nprinting >= ZSE_TEMPLATE_MAX_DEPTH) tpl_rfail(c, NULL, "value nested too deeply to print");
    c->printing[c->nprinting++] = id;
    if (v->t == V_LIST || v->t == V_TUPLE) {
        write_seq(c, b, v);
    } else {
        const zdict *d = v->u.d;
        if (v->t == V_NS) tpl_ob_puts(c, b, "<Namespace ");
        tpl_ob_puts(c, b, "{");
        for (size_t i = 0; i < d->n; i++) {
            if (i) tpl_ob_puts(c, b, ", ");
            tpl_write_str(c, b, &d->k[i], true);
            tpl_ob_puts(c, b, ": ");
            tpl_write_str(c, b, &d->v[i], true);
        }
        tpl_ob_puts(c, b, "}");
        if (v->t == V_NS) tpl_ob_puts(c, b, ">");
    }
    c->nprinting--;
}

zstr *tpl_to_str(rctx *c, const val *v)
{
    if (v->t == V_STR) return v->u.s;
    obuf b = {0};
    tpl_write_str(c, &b, v, false);
    return tpl_zs_new(c, b.p ? b.p : "", b.n);
}

/* ---- truthiness, equality, ordering ----------------------------------- */

bool tpl_truthy(const val *v)
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


bool tpl_val_eq(const val *a, const val *b) { return val_eq_d(a, b, 0); }

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
            val *o = tpl_zd_find(b->u.d, &a->u.d->k[i]);
            if (!o || !val_eq_d(&a->u.d->v[i], o, depth + 1)) return false;
        }
        return true;
    default: return a->u.o == b->u.o;
    }
}


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
            if (tpl_val_eq(&a->u.l->v[i], &b->u.l->v[i])) continue;
            return tpl_val_cmp(c, n, &a->u.l->v[i], &b->u.l->v[i], op);
        }
        return a->u.l->n < b->u.l->n ? -1 : a->u.l->n > b->u.l->n ? 1 : 0;
    }
    if (a->t == V_UNDEF) tpl_rfail(c, n, "%s", a->u.s ? a->u.s->p : "undefined value");
    if (b->t == V_UNDEF) tpl_rfail(c, n, "%s", b->u.s ? b->u.s->p : "undefined value");
    tpl_rfail(c, n, "'%s' not supported between instances of '%s' and '%s'", op, tpl_type_name(a), tpl_type_name(b));
}

int tpl_val_cmp(rctx *c, const node *n, const val *a, const val *b, const char *op)
{
    if (++c->depth > ZSE_TEMPLATE_MAX_DEPTH * 4) tpl_rfail(c, n, "maximum recursion depth exceeded in comparison");
    int r = val_cmp_inner(c, n, a, b, op);
    c->depth--;
    return r;
}

_Noreturn void tpl_undef_fail(rctx *c, const node *n, const val *v)
{
    tpl_rfail(c, n, "%s", v->u.s ? v->u.s->p : "undefined value");
}

/* ---- iteration -------------------------------------------------------- */

zlist *tpl_range_list(rctx *c, const zobj *o)
{
    zlist *l = tpl_zl_new(c, 0);
    if (o->c > 0)
        for (int64_t i = o->a; i < o->b; i += o->c) tpl_zl_push(c, l, mkint(i));
    else
        for (int64_t i = o->a; i > o->b; i += o->c) tpl_zl_push(c, l, mkint(i));
    return l;
}

/* the items `for x in v` visits */
zlist *tpl_iter_items(rctx *c, const node *n, const val *v)
{
    switch (v->t) {
    case V_UNDEF: return tpl_zl_new(c, 0);
    case V_LIST:
    case V_TUPLE:
    case V_GEN: return v->u.l;
    case V_DICT: {
        zlist *l = tpl_zl_new(c, v->u.d->n);
        for (size_t i = 0; i < v->u.d->n; i++) tpl_zl_push(c, l, v->u.d->k[i]);
        return l;
    }
    case V_STR: {
        zlist *l = tpl_zl_new(c, 0);
        const zstr *s = v->u.s;
        for (size_t i = 0; i < s->len;) {
            size_t st = i;
            tpl_utf8_next(s->p, s->len, &i);
            tpl_zl_push(c, l, tpl_mkstrn(c, s->p + st, i - st));
        }
        return l;
    }
    case V_RANGE: return tpl_range_list(c, v->u.o);
    default: tpl_rfail(c, n, "'%s' object is not iterable", tpl_type_name(v));
    }
}

int64_t tpl_val_len(rctx *c, const node *n, const val *v)
{
    switch (v->t) {
    case V_UNDEF: return 0;
    case V_STR: return (int64_t)tpl_utf8_count(v->u.s->p, v->u.s->len);
    case V_LIST:
    case V_TUPLE: return (int64_t)v->u.l->n;
    case V_DICT:
    case V_NS: return (int64_t)v->u.d->n;
    case V_RANGE: return (int64_t)tpl_range_list(c, v->u.o)->n;
    default: tpl_rfail(c, n, "object of type '%s' has no len()", tpl_type_name(v));
    }
}

void tpl_step(rctx *c, const node *n)
{
    if (++c->steps > ZSE_TEMPLATE_MAX_STEPS) tpl_rfail(c, n, "template ran more than %ld loop iterations and calls", ZSE_TEMPLATE_MAX_STEPS);
}

/* ---- JSON in and out -------------------------------------------------- */

val tpl_from_json(rctx *c, const json_t *j)
{
    switch (json_typeof(j)) {
    case JSON_OBJECT: {
        zdict *d = tpl_zd_new(c);
        const char *k;
        json_t *v;
        json_object_foreach((json_t *)j, k, v) tpl_zd_sets(c, d, k, tpl_from_json(c, v));
        return (val){.t = V_DICT, .u.d = d};
    }
    case JSON_ARRAY: {
        zlist *l = tpl_zl_new(c, json_array_size(j));
        size_t i;
        json_t *v;
        json_array_foreach((json_t *)j, i, v) tpl_zl_push(c, l, tpl_from_json(c, v));
        return tpl_mklist(l, V_LIST);
    }
    case JSON_STRING: return tpl_mkstrn(c, json_string_value(j), json_string_length(j));
    case JSON_INTEGER: return mkint(json_integer_value(j));
    case JSON_REAL: return mkfloat(json_real_value(j));
    case JSON_TRUE: return mkbool(true);
    case JSON_FALSE: return mkbool(false);
    default: return NONE;
    }
}

static void json_str(rctx *c, obuf *b, const char *p, size_t n)
{
    tpl_ob_puts(c, b, "\"");
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)p[i];
        char e[8];
        switch (ch) {
        case '"': tpl_ob_puts(c, b, "\\\""); break;
        case '\\': tpl_ob_puts(c, b, "\\\\"); break;
        case '\n': tpl_ob_puts(c, b, "\\n"); break;
        case '\r': tpl_ob_puts(c, b, "\\r"); break;
        case '\t': tpl_ob_puts(c, b, "\\t"); break;
        case '\b': tpl_ob_puts(c, b, "\\b"); break;
        case '\f': tpl_ob_puts(c, b, "\\f"); break;
        default:
            if (ch < 0x20) {
                snprintf(e, sizeof e, "\\u%04x", ch);
                tpl_ob_puts(c, b, e);
            } else {
                tpl_ob_put(c, b, p + i, 1);
            }
        }
    }
    tpl_ob_puts(c, b, "\"");
}

static void json_newline(rctx *c, obuf *b, int indent, int level)
{
    tpl_ob_puts(c, b, "\n");
    for (int i = 0; i < indent * level; i++) tpl_ob_puts(c, b, " ");
}

/* Python json.dumps(v, ensure_ascii=False, indent=indent) (indent < 0: None) */
void tpl_to_json(rctx *c, const node *n, obuf *b, const val *v, int indent, int level)
{
    if (level > ZSE_TEMPLATE_MAX_DEPTH) tpl_rfail(c, n, "tojson: value nested too deeply");
    char num[64];
    switch (v->t) {
    case V_NONE: tpl_ob_puts(c, b, "null"); return;
    case V_BOOL: tpl_ob_puts(c, b, v->u.b ? "true" : "false"); return;
    case V_INT: snprintf(num, sizeof num, "%lld", (long long)v->u.i); tpl_ob_puts(c, b, num); return;
    case V_FLOAT: fmt_float(v->u.f, num, sizeof num, true); tpl_ob_puts(c, b, num); return;
    case V_STR: json_str(c, b, v->u.s->p, v->u.s->len); return;
    case V_LIST:
    case V_TUPLE: {
        const zlist *l = v->u.l;
        if (!l->n) {
            tpl_ob_puts(c, b, "[]");
            return;
        }
        tpl_ob_puts(c, b, "[");
        for (size_t i = 0; i < l->n; i++) {
            if (i) tpl_ob_puts(c, b, indent >= 0 ? "," : ", ");
            if (indent >= 0) json_newline(c, b, indent, level + 1);
            tpl_to_json(c, n, b, &l->v[i], indent, level + 1);
        }
        if (indent >= 0) json_newline(c, b, indent, level);
        tpl_ob_puts(c, b, "]");
        return;
    }
    case V_DICT: {
        const zdict *d = v->u.d;
        if (!d->n) {
            tpl_ob_puts(c, b, "{}");
            return;
        }
        tpl_ob_puts(c, b, "{");
        for (size_t i = 0; i < d->n; i++) {
            if (i) tpl_ob_puts(c, b, indent >= 0 ? "," : ", ");
            if (indent >= 0) json_newline(c, b, indent, level + 1);
            const val *k = &d->k[i];
            if (k->t == V_STR) json_str(c, b, k->u.s->p, k->u.s->len);
            else if (k->t == V_INT || k->t == V_FLOAT || k->t == V_BOOL || k->t == V_NONE) {
                obuf kb = {0};
                tpl_to_json(c, n, &kb, k, -1, level + 1);
                json_str(c, b, kb.p, kb.n);
            } else tpl_rfail(c, n, "keys must be str, int, float, bool or None, not %s", tpl_type_name(k));
            tpl_ob_puts(c, b, ": ");
            tpl_to_json(c, n, b, &d->v[i], indent, level + 1);
        }
        if (indent >= 0) json_newline(c, b, indent, level);
        tpl_ob_puts(c, b, "}");
        return;
    }
    default: tpl_rfail(c, n, "Object of type %s is not JSON serializable", tpl_type_name(v));
    }
}

