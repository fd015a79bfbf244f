/* filters.c — the builtins templates call on values: string, list and dict methods,
 * tests (`is ...`) and filters (`|...`), with Python's and jinja2's semantics. */
#include "template/template_internal.h"

/* ---- strings ------------------------------------------------------------ */

static bool py_space(uint32_t cp)
{
    return (cp >= 9 && cp <= 13) || (cp >= 0x1c && cp <= 0x20) || cp == 0x85 || cp == 0xa0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028 || cp == 0x2029 || cp == 0x202f || cp == 0x205f || cp == 0x3000;
}

static bool in_chars(uint32_t cp, const zstr *chars)
{
    for (size_t i = 0; i < chars->len;) {
        if (tpl_utf8_next(chars->p, chars->len, &i) == cp) return true;
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
            uint32_t cp = tpl_utf8_next(s->p, en, &i);
            if (chars ? !in_chars(cp, chars) : !py_space(cp)) break;
            st = i;
        }
    }
    if (right) {
        while (en > st) {
            size_t b = en - 1;
            while (b > st && ((unsigned char)s->p[b] & 0xC0) == 0x80) b--;
            size_t i = b;
            uint32_t cp = tpl_utf8_next(s->p, en, &i);
            if (chars ? !in_chars(cp, chars) : !py_space(cp)) break;
            en = b;
        }
    }
    return tpl_mkstrn(c, s->p + st, en - st);
}

#include <utf8proc.h>

/* mode 0 lower, 1 upper, 2 jinja title, 3 capitalize, 4 python title, 5 swapcase */
static val case_map(rctx *c, const zstr *s, int mode)
{
    obuf o = {0};
    bool word_start = true, first = true;
    for (size_t i = 0; i < s->len;) {
        uint32_t cp = tpl_utf8_next(s->p, s->len, &i);
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
            tpl_ob_puts(c, &o, "SS");
            continue;
        }
        char e[4];
        size_t k = 0;
        tpl_put_utf8(e, &k, (uint32_t)r);
        tpl_ob_put(c, &o, e, k);
    }
    return tpl_ob_val(c, &o);
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
                tpl_ob_put(c, &o, nw->p, nw->len);
                done++;
            }
            if (k == s->len) break;
            size_t st = k;
            tpl_utf8_next(s->p, s->len, &k);
            tpl_ob_put(c, &o, s->p + st, k - st);
        }
        return tpl_ob_val(c, &o);
    }
    while (i < s->len) {
        const char *f = (count < 0 || done < count) ? memmem(s->p + i, s->len - i, old->p, old->len) : NULL;
        if (!f) break;
        tpl_ob_put(c, &o, s->p + i, (size_t)(f - (s->p + i)));
        tpl_ob_put(c, &o, nw->p, nw->len);
        i = (size_t)(f - s->p) + old->len;
        done++;
    }
    tpl_ob_put(c, &o, s->p + i, s->len - i);
    return tpl_ob_val(c, &o);
}

/* str.split / rsplit */
static val str_split(rctx *c, const node *n, const zstr *s, const val *sepv, int64_t maxsplit, bool from_right)
{
    zlist *l = tpl_zl_new(c, 0);
    if (!sepv || sepv->t == V_NONE) {
        /* runs of whitespace; no empty strings */
        size_t i = 0;
        zlist *parts = tpl_zl_new(c, 0);
        while (i < s->len) {
            size_t j = i, k;
            while (j < s->len) {
                k = j;
                if (!py_space(tpl_utf8_next(s->p, s->len, &k))) break;
                j = k;
            }
            if (j >= s->len) break;
            size_t st = j;
            while (j < s->len) {
                k = j;
                if (py_space(tpl_utf8_next(s->p, s->len, &k))) break;
                j = k;
            }
            tpl_zl_push(c, parts, tpl_mkstrn(c, s->p + st, j - st));
            i = j;
        }
        if (maxsplit < 0 || (int64_t)parts->n <= maxsplit + 1) return tpl_mklist(parts, V_LIST);
        /* maxsplit: the rest stays one piece, keeping its inner and outer whitespace on
         * the far side (' a b  c '.split(None, 1) == ['a', 'b  c ']) */
        if (!from_right) {
            size_t k = 0;
            for (int64_t m = 0; m < maxsplit; m++) {
                tpl_zl_push(c, l, parts->v[m]);
                while (k < s->len && py_space((unsigned char)s->p[k])) k++;
                while (k < s->len && !py_space((unsigned char)s->p[k])) k++;
            }
            while (k < s->len && py_space((unsigned char)s->p[k])) k++;
            tpl_zl_push(c, l, tpl_mkstrn(c, s->p + k, s->len - k));
            return tpl_mklist(l, V_LIST);
        }
        size_t k = s->len;
        for (int64_t m = 0; m < maxsplit; m++) {
            while (k > 0 && py_space((unsigned char)s->p[k - 1])) k--;
            while (k > 0 && !py_space((unsigned char)s->p[k - 1])) k--;
        }
        while (k > 0 && py_space((unsigned char)s->p[k - 1])) k--;
        tpl_zl_push(c, l, tpl_mkstrn(c, s->p, k));
        for (size_t m = parts->n - (size_t)maxsplit; m < parts->n; m++) tpl_zl_push(c, l, parts->v[m]);
        return tpl_mklist(l, V_LIST);
    }
    if (sepv->t != V_STR) tpl_rfail(c, n, "must be str or None, not %s", tpl_type_name(sepv));
    const zstr *sep = sepv->u.s;
    if (!sep->len) tpl_rfail(c, n, "empty separator");
    if (!from_right) {
        size_t i = 0;
        int64_t done = 0;
        for (;;) {
            const char *f = (maxsplit < 0 || done < maxsplit) ? memmem(s->p + i, s->len - i, sep->p, sep->len) : NULL;
            if (!f) break;
            tpl_zl_push(c, l, tpl_mkstrn(c, s->p + i, (size_t)(f - s->p) - i));
            i = (size_t)(f - s->p) + sep->len;
            done++;
        }
        tpl_zl_push(c, l, tpl_mkstrn(c, s->p + i, s->len - i));
        return tpl_mklist(l, V_LIST);
    }
    zlist *rev = tpl_zl_new(c, 0);
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
        tpl_zl_push(c, rev, tpl_mkstrn(c, s->p + k, end - k));
        end = k - sep->len;
        done++;
    }
    tpl_zl_push(c, l, tpl_mkstrn(c, s->p, end));
    for (size_t m = rev->n; m > 0; m--) tpl_zl_push(c, l, rev->v[m - 1]);
    return tpl_mklist(l, V_LIST);
}

/* "%s" % args: %s %r %d %i %f %% (what chat templates use) */
val tpl_str_percent(rctx *c, const node *n, const zstr *fmt, const val *argsv)
{
    obuf o = {0};
    size_t ai = 0;
    const zlist *tl = argsv->t == V_TUPLE ? argsv->u.l : NULL;
    for (size_t i = 0; i < fmt->len; i++) {
        if (fmt->p[i] != '%') {
            tpl_ob_put(c, &o, fmt->p + i, 1);
            continue;
        }
        if (++i >= fmt->len) tpl_rfail(c, n, "incomplete format");
        char spec[32];
        size_t sl = 0;
        spec[sl++] = '%';
        while (i < fmt->len && fmt->p[i] && strchr("-+ 0#.123456789", fmt->p[i]) && sl < 20) spec[sl++] = fmt->p[i++];
        spec[sl] = 0;
        if (i >= fmt->len) tpl_rfail(c, n, "incomplete format");
        char conv = fmt->p[i];
        if (conv == '%') {
            tpl_ob_puts(c, &o, "%");
            continue;
        }
        const val *a;
        if (tl) {
            if (ai >= tl->n) tpl_rfail(c, n, "not enough arguments for format string");
            a = &tl->v[ai++];
        } else {
            if (ai++) tpl_rfail(c, n, "not enough arguments for format string");
            a = argsv;
        }
        char buf[128];
        if (conv == 's' || conv == 'r') {
            obuf t = {0};
            tpl_write_str(c, &t, a, conv == 'r');
            long width = atol(spec + 1 + (spec[1] == '-'));
            bool left = spec[1] == '-';
            long len = (long)tpl_utf8_count(t.p ? t.p : "", t.n);
            if (!left)
                for (long k = len; k < width; k++) tpl_ob_puts(c, &o, " ");
            tpl_ob_put(c, &o, t.p ? t.p : "", t.n);
            if (left)
                for (long k = len; k < width; k++) tpl_ob_puts(c, &o, " ");
        } else if (conv == 'd' || conv == 'i') {
            if (!is_num(a)) tpl_rfail(c, n, "%%d format: a real number is required, not %s", tpl_type_name(a));
            spec[sl++] = 'l';
            spec[sl++] = 'l';
            spec[sl++] = 'd';
            spec[sl] = 0;
            if (a->t == V_FLOAT && !tpl_fits_i64(a->u.f))
                tpl_rfail(c, n, "%%d format: %g does not fit a 64-bit integer", a->u.f);
            snprintf(buf, sizeof buf, spec, (long long)num_i(a));
            tpl_ob_puts(c, &o, buf);
        } else if (conv == 'f' || conv == 'e' || conv == 'g') {
            if (!is_num(a)) tpl_rfail(c, n, "must be real number, not %s", tpl_type_name(a));
            spec[sl++] = conv;
            spec[sl] = 0;
            snprintf(buf, sizeof buf, spec, num_f(a));
            tpl_ob_puts(c, &o, buf);
        } else {
            tpl_rfail(c, n, "unsupported format character '%c'", conv);
        }
    }
    if (tl ? ai < tl->n : ai == 0) tpl_rfail(c, n, "not all arguments converted during string formatting");
    return tpl_ob_val(c, &o);
}

/* "{} {name}".format(...) */
static val str_format(rctx *c, const node *n, const zstr *fmt, args_t *a)
{
    obuf o = {0};
    size_t auto_i = 0;
    for (size_t i = 0; i < fmt->len; i++) {
        char ch = fmt->p[i];
        if (ch == '{' && i + 1 < fmt->len && fmt->p[i + 1] == '{') {
            tpl_ob_puts(c, &o, "{");
            i++;
            continue;
        }
        if (ch == '}' && i + 1 < fmt->len && fmt->p[i + 1] == '}') {
            tpl_ob_puts(c, &o, "}");
            i++;
            continue;
        }
        if (ch != '{') {
            tpl_ob_put(c, &o, &ch, 1);
            continue;
        }
        const char *e = memchr(fmt->p + i, '}', fmt->len - i);
        if (!e) tpl_rfail(c, n, "Single '{' encountered in format string");
        size_t fl = (size_t)(e - (fmt->p + i + 1));
        char field[128];
        if (fl >= sizeof field) tpl_rfail(c, n, "format field too long");
        memcpy(field, fmt->p + i + 1, fl);
        field[fl] = 0;
        char *colon = strchr(field, ':');
        if (colon) *colon = 0;
        const val *v = NULL;
        if (!field[0]) {
            if (auto_i >= a->npos) tpl_rfail(c, n, "Replacement index %zu out of range for positional args tuple", auto_i);
            v = &a->pos[auto_i++];
        } else if (isdigit((unsigned char)field[0])) {
            size_t k = (size_t)atoi(field);
            if (k >= a->npos) tpl_rfail(c, n, "Replacement index %zu out of range for positional args tuple", k);
            v = &a->pos[k];
        } else {
            for (size_t k = 0; k < a->nkw; k++)
                if (!strcmp(a->kwn[k], field)) v = &a->kwv[k];
            if (!v) tpl_rfail(c, n, "'%s'", field);
        }
        tpl_write_str(c, &o, v, false);
        i = (size_t)(e - fmt->p);
    }
    return tpl_ob_val(c, &o);
}

static const zstr *str_arg(rctx *c, const node *n, const val *v, const char *what)
{
    if (!v || v->t != V_STR) tpl_rfail(c, n, "%s must be str, not %s", what, v ? tpl_type_name(v) : "nothing");
    return v->u.s;
}

static bool affix_match(const zstr *s, const zstr *x, bool start)
{
    if (x->len > s->len) return false;
    return memcmp(start ? s->p : s->p + s->len - x->len, x->p, x->len) == 0;
}

static val call_str_method(rctx *c, const node *n, const zstr *s, const char *m, args_t *a)
{
    const val *a0 = tpl_arg(a, 0, "x"), *a1 = tpl_arg(a, 1, "y");
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
        const val *sep = tpl_arg(a, 0, "sep"), *ms = tpl_arg(a, 1, "maxsplit");
        return str_split(c, n, s, sep, ms ? num_i(ms) : -1, m[0] == 'r');
    }
    if (!strcmp(m, "upper")) return case_map(c, s, 1);
    if (!strcmp(m, "lower") || !strcmp(m, "casefold")) return case_map(c, s, 0);
    if (!strcmp(m, "title")) return case_map(c, s, 4);
    if (!strcmp(m, "capitalize")) return case_map(c, s, 3);
    if (!strcmp(m, "swapcase")) return case_map(c, s, 5);
    if (!strcmp(m, "replace")) {
        const val *cnt = tpl_arg(a, 2, "count");
        return str_replace(c, s, str_arg(c, n, a0, m), str_arg(c, n, a1, m), cnt ? num_i(cnt) : -1);
    }
    if (!strcmp(m, "find") || !strcmp(m, "rfind") || !strcmp(m, "index") || !strcmp(m, "rindex") || !strcmp(m, "count")) {
        const zstr *x = str_arg(c, n, a0, m);
        if (!strcmp(m, "count")) {
            int64_t k = 0;
            if (!x->len) return mkint((int64_t)tpl_utf8_count(s->p, s->len) + 1);
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
        if (found < 0 && strstr(m, "index")) tpl_rfail(c, n, "substring not found");
        return mkint(found < 0 ? -1 : (int64_t)tpl_utf8_count(s->p, (size_t)found));
    }
    if (!strcmp(m, "format")) return str_format(c, n, s, a);
    if (!strcmp(m, "join")) {
        zlist *items = tpl_iter_items(c, n, a0 ? a0 : &UNDEF);
        obuf o = {0};
        for (size_t i = 0; i < items->n; i++) {
            if (i) tpl_ob_put(c, &o, s->p, s->len);
            if (items->v[i].t != V_STR) tpl_rfail(c, n, "sequence item %zu: expected str instance, %s found", i, tpl_type_name(&items->v[i]));
            tpl_ob_put(c, &o, items->v[i].u.s->p, items->v[i].u.s->len);
        }
        return tpl_ob_val(c, &o);
    }
    if (!strcmp(m, "splitlines")) {
        zlist *l = tpl_zl_new(c, 0);
        size_t st = 0;
        for (size_t i = 0; i < s->len; i++) {
            if (s->p[i] == '\n' || s->p[i] == '\r') {
                tpl_zl_push(c, l, tpl_mkstrn(c, s->p + st, i - st));
                if (s->p[i] == '\r' && i + 1 < s->len && s->p[i + 1] == '\n') i++;
                st = i + 1;
            }
        }
        if (st < s->len) tpl_zl_push(c, l, tpl_mkstrn(c, s->p + st, s->len - st));
        return tpl_mklist(l, V_LIST);
    }
    if (!strncmp(m, "is", 2)) {
        if (!s->len) return mkbool(false);
        bool any_cased = false, ok = true;
        for (size_t i = 0; i < s->len && ok;) {
            uint32_t cp = tpl_utf8_next(s->p, s->len, &i);
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
            else tpl_rfail(c, n, "str.%s is not supported", m);
        }
        if (!strcmp(m, "isupper") || !strcmp(m, "islower")) return mkbool(ok && any_cased);
        return mkbool(ok);
    }
    if (!strcmp(m, "removeprefix") || !strcmp(m, "removesuffix")) {
        const zstr *x = str_arg(c, n, a0, m);
        bool pre = m[6] == 'p';
        if (!affix_match(s, x, pre)) return (val){.t = V_STR, .u.s = (zstr *)s};
        return tpl_mkstrn(c, pre ? s->p + x->len : s->p, s->len - x->len);
    }
    if (!strcmp(m, "partition") || !strcmp(m, "rpartition")) {
        const zstr *x = str_arg(c, n, a0, m);
        zlist *l = tpl_zl_new(c, 3);
        const char *f = NULL;
        if (m[0] == 'p') f = memmem(s->p, s->len, x->p, x->len);
        else
            for (size_t k = s->len + 1; k-- > 0;)
                if (k + x->len <= s->len && memcmp(s->p + k, x->p, x->len) == 0) {
                    f = s->p + k;
                    break;
                }
        if (!f) {
            tpl_zl_push(c, l, m[0] == 'p' ? (val){.t = V_STR, .u.s = (zstr *)s} : tpl_mkstr(c, ""));
            tpl_zl_push(c, l, tpl_mkstr(c, ""));
            tpl_zl_push(c, l, m[0] == 'p' ? tpl_mkstr(c, "") : (val){.t = V_STR, .u.s = (zstr *)s});
        } else {
            tpl_zl_push(c, l, tpl_mkstrn(c, s->p, (size_t)(f - s->p)));
            tpl_zl_push(c, l, tpl_mkstrn(c, x->p, x->len));
            tpl_zl_push(c, l, tpl_mkstrn(c, f + x->len, s->len - (size_t)(f - s->p) - x->len));
        }
        return tpl_mklist(l, V_TUPLE);
    }
    if (!strcmp(m, "zfill") || !strcmp(m, "center") || !strcmp(m, "ljust") || !strcmp(m, "rjust")) {
        int64_t w = a0 ? num_i(a0) : 0, len = (int64_t)tpl_utf8_count(s->p, s->len);
        if (w <= len) return (val){.t = V_STR, .u.s = (zstr *)s};
        if (w > 1000000) tpl_rfail(c, n, "width too large");
        const char *fill = m[0] == 'z' ? "0" : (a1 && a1->t == V_STR ? a1->u.s->p : " ");
        int64_t pad = w - len, left = m[0] == 'l' ? 0 : m[0] == 'c' ? pad / 2 + (pad & w & 1) : pad;
        obuf o = {0};
        for (int64_t i = 0; i < left; i++) tpl_ob_puts(c, &o, fill);
        tpl_ob_put(c, &o, s->p, s->len);
        for (int64_t i = 0; i < pad - left; i++) tpl_ob_puts(c, &o, fill);
        return tpl_ob_val(c, &o);
    }
    tpl_rfail(c, n, "str.%s() is not supported", m);
}

val tpl_call_method(rctx *c, const node *n, const zobj *mo, args_t *a)
{
    const val *self = &mo->self;
    const char *m = mo->name;
    if (self->t == V_STR) return call_str_method(c, n, self->u.s, m, a);
    if (self->t == V_LOOP) {
        if (!strcmp(m, "cycle")) {
            if (!a->npos) tpl_rfail(c, n, "no items for cycling given");
            return a->pos[mo->self.u.o->idx % (int64_t)a->npos];
        }
        /* loop.changed(*values): true when the values differ from the last call's */
        zobj *lo = self->u.o;
        zlist *now = tpl_zl_new(c, a->npos);
        for (size_t i = 0; i < a->npos; i++) tpl_zl_push(c, now, a->pos[i]);
        val nv = tpl_mklist(now, V_TUPLE);
        bool changed = !lo->c || !tpl_val_eq(&lo->self, &nv);
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
    if (tpl_in_names(tpl_unsafe_methods, m)) tpl_rfail(c, n, "access to attribute '%s' of '%s' object is unsafe.", m, tpl_type_name(self));
    if (self->t == V_LIST || self->t == V_TUPLE) {
        const zlist *l = self->u.l;
        if (!strcmp(m, "copy")) {
            zlist *cp = tpl_zl_new(c, l->n);
            for (size_t i = 0; i < l->n; i++) tpl_zl_push(c, cp, l->v[i]);
            return tpl_mklist(cp, V_LIST);
        }
        const val *x = tpl_arg(a, 0, "x");
        if (!x) tpl_rfail(c, n, "%s() takes exactly one argument (0 given)", m);
        int64_t k = 0;
        for (size_t i = 0; i < l->n; i++) {
            if (!tpl_val_eq(&l->v[i], x)) continue;
            if (!strcmp(m, "index")) return mkint((int64_t)i);
            k++;
        }
        if (!strcmp(m, "index")) tpl_rfail(c, n, "value is not in list");
        return mkint(k);
    }
    if (self->t == V_DICT) {
        zdict *d = self->u.d;
        if (!strcmp(m, "get")) {
            const val *k = tpl_arg(a, 0, "key"), *def = tpl_arg(a, 1, "default");
            if (!k) tpl_rfail(c, n, "get expected at least 1 argument, got 0");
            val *v = tpl_zd_find(d, k);
            return v ? *v : def ? *def : NONE;
        }
        if (!strcmp(m, "items") || !strcmp(m, "keys") || !strcmp(m, "values")) {
            zlist *l = tpl_zl_new(c, d->n);
            for (size_t i = 0; i < d->n; i++) {
                if (m[0] == 'k') tpl_zl_push(c, l, d->k[i]);
                else if (m[0] == 'v') tpl_zl_push(c, l, d->v[i]);
                else {
                    zlist *t = tpl_zl_new(c, 2);
                    tpl_zl_push(c, t, d->k[i]);
                    tpl_zl_push(c, t, d->v[i]);
                    tpl_zl_push(c, l, tpl_mklist(t, V_TUPLE));
                }
            }
            return tpl_mklist(l, V_LIST);
        }
        if (!strcmp(m, "copy")) {
            zdict *nd = tpl_zd_new(c);
            for (size_t i = 0; i < d->n; i++) tpl_zd_set(c, nd, d->k[i], d->v[i]);
            return (val){.t = V_DICT, .u.d = nd};
        }
    }
    tpl_rfail(c, n, "'%s' object has no method '%s'", tpl_type_name(self), m);
}

/* ---- tests -------------------------------------------------------------- */

bool tpl_apply_test(rctx *c, const node *n, const char *name, const val *v, args_t *a)
{
    const val *x = tpl_arg(a, 0, "value");
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
        return tpl_val_eq(&r, v);
    }
    if (!strcmp(name, "odd") || !strcmp(name, "even") || !strcmp(name, "divisibleby")) {
        if (v->t == V_UNDEF) tpl_undef_fail(c, n, v);
        if (!is_num(v)) tpl_rfail(c, n, "unsupported operand type(s) for %%: '%s' and 'int'", tpl_type_name(v));
        if (name[0] == 'd') {
            if (!x || !is_num(x) || num_i(x) == 0) tpl_rfail(c, n, "divisibleby needs a non-zero number");
            val r = tpl_arith(c, n, "%", *v, *x);
            return !tpl_truthy(&r);
        }
        val r = tpl_arith(c, n, "%", *v, mkint(2));
        return tpl_truthy(&r) == (name[0] == 'o');
    }
    if (!strcmp(name, "sameas")) {
        if (!x) tpl_rfail(c, n, "sameas needs an argument");
        if (v->t != x->t) return false;
        if (v->t == V_NONE || v->t == V_UNDEF) return true;
        if (v->t == V_BOOL) return v->u.b == x->u.b;
        if (v->t == V_INT) return v->u.i == x->u.i;
        return v->u.o == x->u.o;
    }
    if (!strcmp(name, "in")) return x ? tpl_contains(c, n, v, x) : false;
    if (!strcmp(name, "filter") || !strcmp(name, "test")) return false;
    static const char *const cmp_names[][2] = {{"eq", "=="}, {"equalto", "=="}, {"==", "=="}, {"ne", "!="}, {"!=", "!="},
                                               {"lt", "<"}, {"lessthan", "<"}, {"<", "<"}, {"gt", ">"}, {"greaterthan", ">"},
                                               {">", ">"}, {"le", "<="}, {"<=", "<="}, {"ge", ">="}, {">=", ">="}};
    for (size_t i = 0; i < sizeof cmp_names / sizeof cmp_names[0]; i++)
        if (!strcmp(name, cmp_names[i][0])) {
            if (!x) tpl_rfail(c, n, "test '%s' needs an argument", name);
            return tpl_compare(c, n, cmp_names[i][1], v, x);
        }
    tpl_rfail(c, n, "No test named '%s'.", name);
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
        if (l >= sizeof part) tpl_rfail(c, n, "attribute name too long");
        memcpy(part, p, l);
        part[l] = 0;
        bool digits = l > 0;
        for (size_t i = 0; i < l; i++) digits = digits && isdigit((unsigned char)part[i]);
        val key = digits ? mkint(atoll(part)) : tpl_mkstr(c, part);
        if (v.t == V_UNDEF) tpl_undef_fail(c, n, &v);
        v = tpl_get_item(c, n, &v, &key);
        p = dot ? dot + 1 : p + l;
    }
    return v;
}

static val as_list(rctx *c, const node *n, const val *v)
{
    zlist *src = tpl_iter_items(c, n, v);
    zlist *l = tpl_zl_new(c, src->n);
    for (size_t i = 0; i < src->n; i++) tpl_zl_push(c, l, src->v[i]);
    return tpl_mklist(l, V_LIST);
}

/* select/reject/selectattr/rejectattr: the test and its arguments start at a->pos[first] */
static val select_items(rctx *c, const node *n, const val *v, args_t *a, bool attr, bool keep)
{
    /* jinja2 iterates only a truthy value: none|selectattr(...) is empty */
    zlist *src = tpl_truthy(v) ? tpl_iter_items(c, n, v) : tpl_zl_new(c, 0);
    size_t first = 0;
    const zstr *path = NULL;
    if (attr) {
        if (!a->npos || a->pos[0].t != V_STR) tpl_rfail(c, n, "selectattr/rejectattr need an attribute name");
        path = a->pos[0].u.s;
        first = 1;
    }
    const char *test = NULL;
    if (a->npos > first) {
        if (a->pos[first].t != V_STR) tpl_rfail(c, n, "the test name must be a string");
        test = a->pos[first].u.s->p;
    }
    args_t ta = {a->npos > first + 1 ? a->pos + first + 1 : NULL, a->npos > first + 1 ? a->npos - first - 1 : 0, a->kwn, a->kwv, a->nkw};
    zlist *out = tpl_zl_new(c, 0);
    for (size_t i = 0; i < src->n; i++) {
        val item = src->v[i];
        val subject = path ? attr_path(c, n, item, path) : item;
        bool r = test ? tpl_apply_test(c, n, test, &subject, &ta) : tpl_truthy(&subject);
        if (r == keep) tpl_zl_push(c, out, item);
    }
    return tpl_mklist(out, V_GEN);
}

static val map_items(rctx *c, const node *n, const val *v, args_t *a)
{
    zlist *src = tpl_truthy(v) ? tpl_iter_items(c, n, v) : tpl_zl_new(c, 0);
    zlist *out = tpl_zl_new(c, src->n);
    const val *attr = tpl_arg(a, 99, "attribute");
    if (attr) {
        const val *def = tpl_arg(a, 99, "default");
        for (size_t i = 0; i < src->n; i++) {
            val r = attr_path(c, n, src->v[i], tpl_to_str(c, attr));
            if (r.t == V_UNDEF && def) r = *def;
            tpl_zl_push(c, out, r);
        }
        return tpl_mklist(out, V_GEN);
    }
    if (!a->npos || a->pos[0].t != V_STR) tpl_rfail(c, n, "map needs a filter name or attribute=");
    const char *fname = a->pos[0].u.s->p;
    args_t fa = {a->npos > 1 ? a->pos + 1 : NULL, a->npos > 1 ? a->npos - 1 : 0, a->kwn, a->kwv, a->nkw};
    for (size_t i = 0; i < src->n; i++) tpl_zl_push(c, out, tpl_apply_filter(c, n, fname, src->v[i], &fa));
    return tpl_mklist(out, V_GEN);
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
        return tpl_val_cmp(e->c, e->n, &la, &lb, "<");
    }
    return tpl_val_cmp(e->c, e->n, a, b, "<");
}

/* stable insertion-merge sort over keys (errors longjmp out, so no qsort) */
static void sort_vals(sort_env *e, val *items, val *keys, size_t n, bool reverse)
{
    if (n < 2) return;
    val *tmp_i = tpl_ralloc(e->c, n * sizeof(val)), *tmp_k = tpl_ralloc(e->c, n * sizeof(val));
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
    const val *pv = tpl_arg(a, 0, "precision"), *mv = tpl_arg(a, 1, "method");
    int64_t prec = pv ? num_i(pv) : 0;
    const char *method = mv && mv->t == V_STR ? mv->u.s->p : "common";
    if (!is_num(v)) tpl_rfail(c, n, "type %s doesn't define __round__ method", tpl_type_name(v));
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
    else tpl_rfail(c, n, "method must be common, ceil or floor");
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
        char *sp = tpl_ralloc(c, (size_t)w + 1);
        memset(sp, ' ', (size_t)w);
        pad = tpl_zs_new(c, sp, (size_t)w);
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
        if ((line_no ? (blank || !is_blank) : first)) tpl_ob_put(c, &o, pad->p, pad->len);
        tpl_ob_put(c, &o, s->p + i, e - i);
        if (!nl) break;
        tpl_ob_puts(c, &o, "\n");
        i = e + 1;
        line_no = 1;
    }
    return tpl_ob_val(c, &o);
}

val tpl_apply_filter(rctx *c, const node *n, const char *name, val v, args_t *a)
{
    const val *a0 = a->npos ? &a->pos[0] : NULL;
    if (!strcmp(name, "tojson")) {
        const val *ind = tpl_arg(a, 0, "indent");
        obuf o = {0};
        tpl_to_json(c, n, &o, &v, ind && ind->t != V_NONE ? (int)num_i(ind) : -1, 0);
        return tpl_ob_val(c, &o);
    }
    if (!strcmp(name, "string")) return (val){.t = V_STR, .u.s = tpl_to_str(c, &v)};
    if (!strcmp(name, "safe")) {
        if (v.t == V_STR && v.u.s->safe) return v;
        zstr *s = tpl_to_str(c, &v);
        val r = tpl_mkstrn(c, s->p, s->len);
        r.u.s->safe = true;
        return r;
    }
    if (!strcmp(name, "e") || !strcmp(name, "escape") || !strcmp(name, "forceescape")) {
        zstr *s = tpl_to_str(c, &v);
        if (s->safe && name[0] != 'f') return (val){.t = V_STR, .u.s = s};
        obuf o = {0};
        tpl_html_escape(c, &o, s);
        val r = tpl_ob_val(c, &o);
        r.u.s->safe = true;
        return r;
    }
    if (!strcmp(name, "default") || !strcmp(name, "d")) {
        const val *def = tpl_arg(a, 0, "default_value"), *boolean = tpl_arg(a, 1, "boolean");
        bool use_def = v.t == V_UNDEF || (boolean && tpl_truthy(boolean) && !tpl_truthy(&v));
        return use_def ? (def ? *def : tpl_mkstr(c, "")) : v;
    }
    if (!strcmp(name, "length") || !strcmp(name, "count")) return mkint(tpl_val_len(c, n, &v));
    if (!strcmp(name, "list")) return as_list(c, n, &v);
    if (!strcmp(name, "first") || !strcmp(name, "last")) {
        if (v.t == V_UNDEF) return tpl_mkundef(c, "No first item, sequence was empty.");
        zlist *l = tpl_iter_items(c, n, &v);
        if (!l->n) return tpl_mkundef(c, "No %s item, sequence was empty.", name);
        return l->v[name[0] == 'f' ? 0 : l->n - 1];
    }
    if (!strcmp(name, "items")) {
        if (v.t == V_UNDEF) return tpl_mklist(tpl_zl_new(c, 0), V_GEN);
        if (v.t != V_DICT) tpl_rfail(c, n, "Can only get item pairs from a mapping.");
        zobj mo = {.kind = V_METHOD, .self = v, .name = "items"};
        val r = tpl_call_method(c, n, &mo, a);
        r.t = V_GEN;
        return r;
    }
    if (!strcmp(name, "map")) return map_items(c, n, &v, a);
    if (!strcmp(name, "select") || !strcmp(name, "reject")) return select_items(c, n, &v, a, false, name[0] == 's');
    if (!strcmp(name, "selectattr") || !strcmp(name, "rejectattr")) return select_items(c, n, &v, a, true, name[0] == 's');
    if (!strcmp(name, "join")) {
        const val *sep = tpl_arg(a, 0, "d"), *attr = tpl_arg(a, 1, "attribute");
        zlist *l = tpl_iter_items(c, n, &v);
        obuf o = {0};
        zstr *sp = sep ? tpl_to_str(c, sep) : NULL;
        for (size_t i = 0; i < l->n; i++) {
            if (i && sp) tpl_ob_put(c, &o, sp->p, sp->len);
            val item = attr ? attr_path(c, n, l->v[i], tpl_to_str(c, attr)) : l->v[i];
            tpl_write_str(c, &o, &item, false);
        }
        return tpl_ob_val(c, &o);
    }
    if (!strcmp(name, "attr")) {
        if (!a0) tpl_rfail(c, n, "attr needs a name");
        return tpl_get_attr(c, n, &v, tpl_to_str(c, a0)->p);
    }
    if (!strcmp(name, "reverse")) {
        if (v.t == V_STR) {
            zlist *l = tpl_iter_items(c, n, &v);
            obuf o = {0};
            for (size_t i = l->n; i > 0; i--) tpl_ob_put(c, &o, l->v[i - 1].u.s->p, l->v[i - 1].u.s->len);
            return tpl_ob_val(c, &o);
        }
        zlist *l = tpl_iter_items(c, n, &v), *r = tpl_zl_new(c, l->n);
        for (size_t i = l->n; i > 0; i--) tpl_zl_push(c, r, l->v[i - 1]);
        return tpl_mklist(r, V_GEN);
    }
    if (!strcmp(name, "unique")) {
        const val *cs = tpl_arg(a, 0, "case_sensitive"), *attr = tpl_arg(a, 1, "attribute");
        zlist *l = tpl_iter_items(c, n, &v), *out = tpl_zl_new(c, 0), *seen = tpl_zl_new(c, 0);
        for (size_t i = 0; i < l->n; i++) {
            val key = attr ? attr_path(c, n, l->v[i], tpl_to_str(c, attr)) : l->v[i];
            if (key.t == V_STR && !(cs && tpl_truthy(cs))) key = case_map(c, key.u.s, 0);
            bool dup = false;
            for (size_t k = 0; k < seen->n && !dup; k++) dup = tpl_val_eq(&seen->v[k], &key);
            if (dup) continue;
            tpl_zl_push(c, seen, key);
            tpl_zl_push(c, out, l->v[i]);
        }
        return tpl_mklist(out, V_GEN);
    }
    if (!strcmp(name, "sort") || !strcmp(name, "dictsort")) {
        bool dict = name[0] == 'd';
        const val *rev = tpl_arg(a, dict ? 2 : 0, "reverse"), *cs = tpl_arg(a, dict ? 0 : 1, "case_sensitive");
        const val *attr = dict ? NULL : tpl_arg(a, 2, "attribute"), *by = dict ? tpl_arg(a, 1, "by") : NULL;
        zlist *l;
        if (dict) {
            if (v.t != V_DICT) tpl_rfail(c, n, "dictsort needs a mapping");
            zobj mo = {.kind = V_METHOD, .self = v, .name = "items"};
            args_t none = {0};
            l = tpl_call_method(c, n, &mo, &none).u.l;
        } else {
            val lv = as_list(c, n, &v);
            l = lv.u.l;
        }
        val *keys = tpl_ralloc(c, (l->n + 1) * sizeof(val));
        bool by_value = by && by->t == V_STR && !strcmp(by->u.s->p, "value");
        for (size_t i = 0; i < l->n; i++)
            keys[i] = dict ? l->v[i].u.l->v[by_value ? 1 : 0] : attr ? attr_path(c, n, l->v[i], tpl_to_str(c, attr)) : l->v[i];
        sort_env e = {c, n, cs && tpl_truthy(cs)};
        sort_vals(&e, l->v, keys, l->n, rev && tpl_truthy(rev));
        return tpl_mklist(l, V_LIST);
    }
    if (!strcmp(name, "sum")) {
        const val *attr = tpl_arg(a, 0, "attribute"), *start = tpl_arg(a, 1, "start");
        val acc = start ? *start : mkint(0);
        zlist *l = tpl_iter_items(c, n, &v);
        for (size_t i = 0; i < l->n; i++) acc = tpl_arith(c, n, "+", acc, attr ? attr_path(c, n, l->v[i], tpl_to_str(c, attr)) : l->v[i]);
        return acc;
    }
    if (!strcmp(name, "min") || !strcmp(name, "max")) {
        const val *cs = tpl_arg(a, 0, "case_sensitive"), *attr = tpl_arg(a, 1, "attribute");
        zlist *l = tpl_iter_items(c, n, &v);
        if (!l->n) return tpl_mkundef(c, "No aggregated item, sequence was empty.");
        sort_env e = {c, n, cs && tpl_truthy(cs)};
        size_t best = 0;
        val bk = attr ? attr_path(c, n, l->v[0], tpl_to_str(c, attr)) : l->v[0];
        for (size_t i = 1; i < l->n; i++) {
            val k = attr ? attr_path(c, n, l->v[i], tpl_to_str(c, attr)) : l->v[i];
            int r = sort_cmp(&e, &k, &bk);
            if (name[1] == 'i' ? r < 0 : r > 0) best = i, bk = k;
        }
        return l->v[best];
    }
    if (!strcmp(name, "batch")) {
        const val *cnt = tpl_arg(a, 0, "linecount"), *fill = tpl_arg(a, 1, "fill_with");
        int64_t k = cnt ? num_i(cnt) : 0;
        if (k <= 0) tpl_rfail(c, n, "batch size must be positive");
        zlist *l = tpl_iter_items(c, n, &v), *out = tpl_zl_new(c, 0), *cur = NULL;
        for (size_t i = 0; i < l->n; i++) {
            if (!cur || (int64_t)cur->n == k) {
                cur = tpl_zl_new(c, (size_t)k);
                tpl_zl_push(c, out, tpl_mklist(cur, V_LIST));
            }
            tpl_zl_push(c, cur, l->v[i]);
        }
        if (cur && fill)
            while ((int64_t)cur->n < k) tpl_zl_push(c, cur, *fill);
        return tpl_mklist(out, V_GEN);
    }
    if (!strcmp(name, "int")) {
        const val *def = tpl_arg(a, 0, "default");
        val dv = def ? *def : mkint(0);
        if (v.t == V_INT) return v;
        if (v.t == V_BOOL) return mkint(v.u.b);
        double f = 0;
        if (v.t == V_FLOAT)
            f = v.u.f;
        if (v.t == V_STR) {
            zstr *s = do_strip(c, v.u.s, NULL, true, true).u.s;
            int64_t r;
            if (py_int(s, &r)) return mkint(r);
            if (!py_float(s, &f)) return dv;
        }
        if (v.t == V_FLOAT || v.t == V_STR) {
            if (!isfinite(f)) return dv;
            /* Python's int is unbounded; these are 64-bit */
            if (!tpl_fits_i64(f)) tpl_rfail(c, n, "int: %g does not fit a 64-bit integer", f);
            return mkint((int64_t)f);
        }
        return dv;
    }
    if (!strcmp(name, "float")) {
        const val *def = tpl_arg(a, 0, "default");
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
        tpl_rfail(c, n, "bad operand type for abs(): '%s'", tpl_type_name(&v));
    }
    if (!strcmp(name, "round")) return do_round(c, n, &v, a);
    if (!strcmp(name, "pprint")) {
        obuf o = {0};
        tpl_write_str(c, &o, &v, true);
        return tpl_ob_val(c, &o);
    }
    /* the rest work on str(value) */
    zstr *s = tpl_to_str(c, &v);
    if (!strcmp(name, "trim")) {
        const val *ch = tpl_arg(a, 0, "chars");
        return do_strip(c, s, ch && ch->t == V_STR ? ch->u.s : NULL, true, true);
    }
    if (!strcmp(name, "upper")) return case_map(c, s, 1);
    if (!strcmp(name, "lower")) return case_map(c, s, 0);
    if (!strcmp(name, "title")) return case_map(c, s, 2);
    if (!strcmp(name, "capitalize")) return case_map(c, s, 3);
    if (!strcmp(name, "replace")) {
        const val *old = tpl_arg(a, 0, "old"), *nw = tpl_arg(a, 1, "new"), *cnt = tpl_arg(a, 2, "count");
        if (!old || !nw) tpl_rfail(c, n, "replace needs old and new");
        return str_replace(c, s, tpl_to_str(c, old), tpl_to_str(c, nw), cnt && cnt->t != V_NONE ? num_i(cnt) : -1);
    }
    if (!strcmp(name, "indent")) {
        const val *first = tpl_arg(a, 1, "first"), *blank = tpl_arg(a, 2, "blank");
        return do_indent(c, s, tpl_arg(a, 0, "width"), first && tpl_truthy(first), blank && tpl_truthy(blank));
    }
    if (!strcmp(name, "center")) {
        const val *w = tpl_arg(a, 0, "width");
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
                    if (space && o.n) tpl_ob_puts(c, &o, " ");
                    space = false;
                    tpl_ob_put(c, &o, &ch, 1);
                }
            }
        }
        return tpl_ob_val(c, &o);
    }
    if (!strcmp(name, "truncate")) {
        const val *lv = tpl_arg(a, 0, "length"), *kw = tpl_arg(a, 1, "killwords"), *endv = tpl_arg(a, 2, "end"), *lev = tpl_arg(a, 3, "leeway");
        int64_t len = lv ? num_i(lv) : 255, leeway = lev ? num_i(lev) : 5;
        zstr *end = endv ? tpl_to_str(c, endv) : tpl_zs_new(c, "...", 3);
        int64_t sl = (int64_t)tpl_utf8_count(s->p, s->len);
        if (sl <= len + leeway) return (val){.t = V_STR, .u.s = s};
        int64_t keep = len - (int64_t)tpl_utf8_count(end->p, end->len);
        if (keep < 0) keep = 0;
        size_t off = tpl_utf8_offset(s->p, s->len, (size_t)keep);
        if (!(kw && tpl_truthy(kw))) {
            size_t sp = off;
            while (sp > 0 && s->p[sp - 1] != ' ') sp--;
            if (sp > 0) off = sp - 1;
        }
        obuf o = {0};
        tpl_ob_put(c, &o, s->p, off);
        tpl_ob_put(c, &o, end->p, end->len);
        return tpl_ob_val(c, &o);
    }
    if (!strcmp(name, "format")) return tpl_str_percent(c, n, s, a->npos == 1 ? &a->pos[0] : &(val){.t = V_TUPLE, .u.l = &(zlist){a->npos, a->npos, a->pos}});
    if (!strcmp(name, "wordwrap")) tpl_rfail(c, n, "the wordwrap filter is not supported");
    tpl_rfail(c, n, "No filter named '%s'.", name);
}
