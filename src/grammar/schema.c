/* JSON Schema → builder expressions. docs/GRAMMAR.md lists what is supported; anything
 * else is an error naming the keyword and its JSON path (never ignored).
 *
 * Whitespace policy: JSON is written compactly with at most one optional space after
 * '{', '[', ',' and ':' (so `{"a": 1, "b": [1, 2]}` and `{"a":1}` both match): a model
 * cannot loop on whitespace, and the common tokenizations of ", " and ": " stay allowed.
 * Object properties come in the schema's order; an optional property may be left out.
 * Without additionalProperties no extra property is generated (a subset of what the schema
 * allows, so every output still validates). Strings carry no \uXXXX escapes except for
 * control characters (every character is written as itself, so counting characters for
 * minLength/maxLength is exact); unconstrained numbers have at most 20 integer digits,
 * 20 fraction digits and 2 exponent digits (always a finite double). */
#include "grammar/grammar.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SC_MAX_DEPTH 64

typedef struct {
    const json_t *target;
    zse_gx rule;
} ref_memo;

typedef struct {
    zse_gb *b;
    const json_t *root;
    unsigned flags;
    char path[1024];
    int depth;
    ref_memo *refs;
    int n_refs, cap_refs;
    json_t *owned; /* merged schemas kept alive until the end */
    zse_gx ws, str_char, string, value, number;
} sc;

static zse_gx sc_fail(sc *s, const char *fmt, const char *what)
{
    char msg[512];
    snprintf(msg, sizeof msg, fmt, what);
    zse_fail("json schema: %s at %s", msg, s->path);
    return -1;
}

/* appends "/name" (JSON-pointer escaped) to the path; returns the old length */
static size_t path_push(sc *s, const char *name)
{
    size_t old = strlen(s->path), n = old;
    if (n + 2 < sizeof s->path)
        s->path[n++] = '/';
    for (const char *p = name; *p && n + 3 < sizeof s->path; p++) {
        if (*p == '~' || *p == '/') {
            s->path[n++] = '~';
            s->path[n++] = *p == '~' ? '0' : '1';
        } else {
            s->path[n++] = *p;
        }
    }
    s->path[n] = 0;
    return old;
}

static size_t path_push_index(sc *s, const char *name, size_t i)
{
    char buf[64];
    size_t old = path_push(s, name);
    snprintf(buf, sizeof buf, "%zu", i);
    path_push(s, buf);
    return old;
}

static void path_pop(sc *s, size_t old)
{
    s->path[old] = 0;
}

static zse_gx lit(sc *s, const char *t)
{
    return gb_cstr(s->b, t);
}

/* ---- shared pieces ---------------------------------------------------------------------- */

static zse_gx ws(sc *s)
{
    if (s->ws < 0)
        s->ws = gb_opt(s->b, lit(s, " "));
    return s->ws;
}

static zse_gx str_char(sc *s)
{
    if (s->str_char < 0) {
        gr_range all = {0, 0x10FFFF};
        s->str_char = gb_ranges(s->b, &all, 1, true);
    }
    return s->str_char;
}

static zse_gx any_string(sc *s)
{
    if (s->string < 0) {
        zse_gx r = zse_gb_rule(s->b);
        zse_gx body = gb_seq3(s->b, lit(s, "\""), zse_gb_repeat(s->b, str_char(s), 0, -1), lit(s, "\""));
        if (r < 0 || zse_gb_define(s->b, r, body))
            return -1;
        s->string = r;
    }
    return s->string;
}

static zse_gx digits(sc *s, int min, int max)
{
    return zse_gb_repeat(s->b, zse_gb_byte_range(s->b, '0', '9'), min, max);
}

/* -?(0|[1-9][0-9]{0,19})(\.[0-9]{1,20})?([eE][+-]?[0-9]{1,2})?: finite as a double */
static zse_gx any_number(sc *s)
{
    if (s->number < 0) {
        zse_gb *b = s->b;
        zse_gx r = zse_gb_rule(b);
        zse_gx intpart = gb_alt2(b, lit(s, "0"), gb_seq2(b, zse_gb_byte_range(b, '1', '9'), digits(s, 0, 19)));
        zse_gx frac = gb_opt(b, gb_seq2(b, lit(s, "."), digits(s, 1, 20)));
        zse_gx e = zse_gb_alt(b, (zse_gx[]){lit(s, "e"), lit(s, "E")}, 2);
        zse_gx sign = gb_opt(b, zse_gb_alt(b, (zse_gx[]){lit(s, "+"), lit(s, "-")}, 2));
        zse_gx exp = gb_opt(b, gb_seq3(b, e, sign, digits(s, 1, 2)));
        zse_gx xs[4] = {gb_opt(b, lit(s, "-")), intpart, frac, exp};
        if (r < 0 || zse_gb_define(b, r, zse_gb_seq(b, xs, 4)))
            return -1;
        s->number = r;
    }
    return s->number;
}

/* '{' ws (member (',' ws member)*)? '}' with members key ':' ws item; key is the whole
 * quoted key; item the value expression */
static zse_gx object_of(sc *s, zse_gx key, zse_gx item)
{
    zse_gb *b = s->b;
    zse_gx xs[4] = {key, lit(s, ":"), ws(s), item};
    zse_gx member = zse_gb_seq(b, xs, 4);
    zse_gx more = zse_gb_repeat(b, gb_seq3(b, lit(s, ","), ws(s), member), 0, -1);
    zse_gx ys[4] = {lit(s, "{"), ws(s), gb_opt(b, gb_seq2(b, member, more)), lit(s, "}")};
    return zse_gb_seq(b, ys, 4);
}

static zse_gx any_value(sc *s)
{
    if (s->value < 0) {
        zse_gb *b = s->b;
        zse_gx r = zse_gb_rule(b);
        if (r < 0)
            return -1;
        s->value = r;
        zse_gx more = zse_gb_repeat(b, gb_seq3(b, lit(s, ","), ws(s), r), 0, -1);
        zse_gx arr_xs[4] = {lit(s, "["), ws(s), gb_opt(b, gb_seq2(b, r, more)), lit(s, "]")};
        zse_gx alts[7] = {object_of(s, any_string(s), r), zse_gb_seq(b, arr_xs, 4), any_string(s), any_number(s),
                          lit(s, "true"), lit(s, "false"), lit(s, "null")};
        if (zse_gb_define(b, r, zse_gb_alt(b, alts, 7)))
            return -1;
    }
    return s->value;
}

/* ---- integers and numbers with bounds ------------------------------------------------- */

#define SC_MAX_MAG 1000000000000000000LL /* 10^18 */

static bool all_digit(const char *p, char c, int n)
{
    for (int i = 0; i < n; i++)
        if (p[i] != c)
            return false;
    return true;
}

/* decimal strings of equal length (not NUL-terminated): every number in [lo, hi] */
static zse_gx same_len_range(sc *s, const char *lo, const char *hi, int len)
{
    zse_gb *b = s->b;
    if (len == 0)
        return gb_empty(b);
    if (lo[0] == hi[0])
        return gb_seq2(b, zse_gb_byte_range(b, (uint8_t)lo[0], (uint8_t)lo[0]), same_len_range(s, lo + 1, hi + 1, len - 1));
    bool lo_zeros = all_digit(lo + 1, '0', len - 1), hi_nines = all_digit(hi + 1, '9', len - 1);
    if (lo_zeros && hi_nines)
        return gb_seq2(b, zse_gb_byte_range(b, (uint8_t)lo[0], (uint8_t)hi[0]), digits(s, len - 1, len - 1));
    char nines[24], zeros[24];
    memset(nines, '9', sizeof nines);
    memset(zeros, '0', sizeof zeros);
    zse_gx alts[3];
    int n = 0;
    char first = lo[0], last = hi[0];
    if (lo_zeros)
        first--; /* lo's leading digit goes with the middle */
    else
        alts[n++] = gb_seq2(b, zse_gb_byte_range(b, (uint8_t)lo[0], (uint8_t)lo[0]), same_len_range(s, lo + 1, nines, len - 1));
    if (hi_nines)
        last++;
    if (first + 1 <= last - 1)
        alts[n++] = gb_seq2(b, zse_gb_byte_range(b, (uint8_t)(first + 1), (uint8_t)(last - 1)), digits(s, len - 1, len - 1));
    if (!hi_nines)
        alts[n++] = gb_seq2(b, zse_gb_byte_range(b, (uint8_t)hi[0], (uint8_t)hi[0]), same_len_range(s, zeros, hi + 1, len - 1));
    return zse_gb_alt(b, alts, n);
}

/* non-negative integers in [lo, hi], hi < 0 meaning unbounded (up to 19 digits) */
static zse_gx uint_range(sc *s, long long lo, long long hi)
{
    zse_gb *b = s->b;
    zse_gx alts[24];
    int n = 0;
    char a[24], z[24];
    unsigned long long pow = 1;
    for (int len = 1; len <= 19; len++, pow *= 10) {
        unsigned long long lmin = len == 1 ? 0 : pow, lmax = pow * 10 - 1; /* 10^19 - 1 fits */
        unsigned long long from = (unsigned long long)lo > lmin ? (unsigned long long)lo : lmin;
        unsigned long long to = hi >= 0 && (unsigned long long)hi < lmax ? (unsigned long long)hi : lmax;
        if (from <= to) {
            snprintf(a, sizeof a, "%0*llu", len, from);
            snprintf(z, sizeof z, "%0*llu", len, to);
            alts[n++] = same_len_range(s, a, z, len);
        }
        if (hi >= 0 && (unsigned long long)hi <= lmax)
            break;
    }
    if (n == 0)
        return sc_fail(s, "%s: the bounds leave no integer", "minimum/maximum");
    return zse_gb_alt(b, alts, n);
}

/* reads a bound; returns 1 when present; -1 on error */
static int read_bound(sc *s, const json_t *schema, const char *key, double *out)
{
    const json_t *v = json_object_get(schema, key);
    if (!v)
        return 0;
    if (!json_is_number(v)) {
        sc_fail(s, "'%s' must be a number", key);
        return -1;
    }
    *out = json_number_value(v);
    if (!(fabs(*out) <= (double)SC_MAX_MAG)) {
        sc_fail(s, "'%s' beyond ±10^18 is not supported", key);
        return -1;
    }
    return 1;
}

/* integer bounds: *has_lo / *has_hi, inclusive, after exclusive ones and rounding */
static int int_bounds(sc *s, const json_t *schema, bool integer, long long *lo, bool *has_lo, long long *hi,
                      bool *has_hi)
{
    double v;
    int k;
    *has_lo = *has_hi = false;
    const char *keys[4] = {"minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"};
    for (int i = 0; i < 4; i++) {
        if ((k = read_bound(s, schema, keys[i], &v)) < 0)
            return -1;
        if (!k)
            continue;
        bool lower = i < 2, exclusive = i & 1;
        if (!integer && (exclusive || v != floor(v))) {
            size_t old = path_push(s, keys[i]);
            sc_fail(s, "'%s' on a number is supported only as an inclusive integer bound", keys[i]);
            path_pop(s, old);
            return -1;
        }
        long long x;
        if (lower) {
            x = (long long)ceil(v);
            if (exclusive && (double)x == v)
                x++;
            if (!*has_lo || x > *lo)
                *lo = x;
            *has_lo = true;
        } else {
            x = (long long)floor(v);
            if (exclusive && (double)x == v)
                x--;
            if (!*has_hi || x < *hi)
                *hi = x;
            *has_hi = true;
        }
    }
    if (*has_lo && *has_hi && *lo > *hi)
        return sc_fail(s, "%s: the bounds leave no value", "minimum/maximum"), -1;
    return 0;
}

static zse_gx integer_expr(sc *s, const json_t *schema)
{
    zse_gb *b = s->b;
    long long lo = 0, hi = 0;
    bool has_lo, has_hi;
    if (int_bounds(s, schema, true, &lo, &has_lo, &hi, &has_hi))
        return -1;
    zse_gx alts[2];
    int n = 0;
    if (!has_hi || hi >= 0) /* non-negative part */
        alts[n++] = uint_range(s, has_lo && lo > 0 ? lo : 0, has_hi ? hi : -1);
    if (!has_lo || lo < 0) { /* negative part: magnitudes [max(1, -hi), -lo] */
        long long mlo = has_hi && hi < 0 ? -hi : 1;
        alts[n++] = gb_seq2(b, lit(s, "-"), uint_range(s, mlo, has_lo ? -lo : -1));
    }
    return zse_gb_alt(b, alts, n);
}

/* magnitudes in [a, c] (c < 0: unbounded) written as a number without exponent */
static zse_gx magnitude_range(sc *s, long long a, long long c)
{
    zse_gb *b = s->b;
    zse_gx frac = gb_opt(b, gb_seq2(b, lit(s, "."), digits(s, 1, 20)));
    if (c < 0)
        return gb_seq2(b, uint_range(s, a, -1), frac);
    zse_gx zero_frac = gb_opt(b, gb_seq2(b, lit(s, "."), zse_gb_repeat(b, lit(s, "0"), 1, 20)));
    char top[24];
    snprintf(top, sizeof top, "%lld", c);
    zse_gx exact = gb_seq2(b, lit(s, top), zero_frac);
    if (a > c - 1)
        return exact;
    return gb_alt2(b, gb_seq2(b, uint_range(s, a, c - 1), frac), exact);
}

static zse_gx number_expr(sc *s, const json_t *schema)
{
    zse_gb *b = s->b;
    long long lo = 0, hi = 0;
    bool has_lo, has_hi;
    if (int_bounds(s, schema, false, &lo, &has_lo, &hi, &has_hi))
        return -1;
    if (!has_lo && !has_hi)
        return any_number(s);
    zse_gx alts[2];
    int n = 0;
    if (!has_hi || hi >= 0)
        alts[n++] = magnitude_range(s, has_lo && lo > 0 ? lo : 0, has_hi ? hi : -1);
    if (!has_lo || lo < 0) {
        long long mlo = has_hi && hi < 0 ? -hi : 0;
        alts[n++] = gb_seq2(b, lit(s, "-"), magnitude_range(s, mlo, has_lo ? -lo : -1));
    }
    return zse_gb_alt(b, alts, n);
}

/* ---- strings ----------------------------------------------------------------------------- */

static const struct {
    const char *name, *regex;
} formats[] = {
    {"date", "[0-9]{4}-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)|02-(0[1-9]|1[0-9]|2[0-8]))"},
    {"time", "([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"},
    {"date-time", "[0-9]{4}-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)|02-(0[1-9]|1[0-9]|2[0-8]))"
                  "T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"},
    {"uuid", "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"},
    {"email", "[a-zA-Z0-9_%+-]{1,32}(\\.[a-zA-Z0-9_%+-]{1,32}){0,3}@[a-zA-Z0-9]{1,32}(-[a-zA-Z0-9]{1,32}){0,2}"
              "(\\.[a-zA-Z0-9]{1,32}(-[a-zA-Z0-9]{1,32}){0,2}){1,4}"},
    {"hostname", "[a-zA-Z0-9]{1,32}(-[a-zA-Z0-9]{1,16}){0,2}(\\.[a-zA-Z0-9]{1,32}(-[a-zA-Z0-9]{1,16}){0,2}){0,6}"},
    {"ipv4", "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}"},
    {"ipv6", "[0-9a-fA-F]{1,4}(:[0-9a-fA-F]{1,4}){7}"},
    {"uri", "[a-zA-Z][a-zA-Z0-9+.-]{0,15}://[a-zA-Z0-9-]{1,63}(\\.[a-zA-Z0-9-]{1,63}){0,6}(/[a-zA-Z0-9._~!$&'()*+,;=:@-]{0,64}){0,16}"},
};

static zse_gx string_expr(sc *s, const json_t *schema)
{
    zse_gb *b = s->b;
    const json_t *fmt = json_object_get(schema, "format"), *pat = json_object_get(schema, "pattern");
    const json_t *minl = json_object_get(schema, "minLength"), *maxl = json_object_get(schema, "maxLength");
    int constraints = (fmt != NULL) + (pat != NULL) + (minl || maxl);
    if (constraints > 1)
        return sc_fail(s, "%s together on one string are not supported", "format, pattern and minLength/maxLength");
    zse_gx q = lit(s, "\"");
    if (fmt) {
        size_t old = path_push(s, "format");
        if (!json_is_string(fmt))
            return sc_fail(s, "%s must be a string", "'format'");
        for (size_t i = 0; i < sizeof formats / sizeof *formats; i++)
            if (!strcmp(formats[i].name, json_string_value(fmt))) {
                path_pop(s, old);
                return gb_seq3(b, q, gb_regex_mode(b, formats[i].regex, strlen(formats[i].regex), false), q);
            }
        return sc_fail(s, "format '%s' is not supported", json_string_value(fmt));
    }
    if (pat) {
        size_t old = path_push(s, "pattern");
        if (!json_is_string(pat))
            return sc_fail(s, "%s must be a string", "'pattern'");
        zse_gx x = gb_regex_mode(b, json_string_value(pat), json_string_length(pat), true);
        if (x < 0) {
            zse_error_prefix("json schema: 'pattern' at %s", s->path);
            return -1;
        }
        path_pop(s, old);
        return gb_seq3(b, q, x, q);
    }
    if (minl || maxl) {
        json_int_t lo = 0, hi = -1;
        if (minl && (!json_is_integer(minl) || (lo = json_integer_value(minl)) < 0))
            return sc_fail(s, "%s must be a non-negative integer", "'minLength'");
        if (maxl && (!json_is_integer(maxl) || (hi = json_integer_value(maxl)) < 0))
            return sc_fail(s, "%s must be a non-negative integer", "'maxLength'");
        if (hi >= 0 && hi < lo)
            return sc_fail(s, "%s leave no string", "'minLength' and 'maxLength'");
        if (lo > 10000 || hi > 10000)
            return sc_fail(s, "%s above 10000 is not supported", "'minLength'/'maxLength'");
        return gb_seq3(b, q, zse_gb_repeat(b, str_char(s), (int)lo, (int)hi), q);
    }
    return any_string(s);
}

/* ---- keywords ---------------------------------------------------------------------------- */

static const char *const annotations[] = {"title", "description", "default", "examples", "$schema", "$id",
                                          "$comment", "deprecated", "readOnly", "writeOnly", "$defs",
                                          "definitions", NULL};
static const char *const supported[] = {
    "type", "properties", "required", "additionalProperties", "enum", "const", "items", "prefixItems",
    "minItems", "maxItems", "anyOf", "oneOf", "allOf", "$ref", "minLength", "maxLength", "pattern", "format",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "nullable", NULL};

static bool in_list(const char *const *list, const char *k)
{
    for (; *list; list++)
        if (!strcmp(*list, k))
            return true;
    return false;
}

static int check_keywords(sc *s, const json_t *schema)
{
    const char *k;
    const json_t *v;
    json_object_foreach((json_t *)schema, k, v) {
        if (in_list(annotations, k) || in_list(supported, k))
            continue;
        size_t old = path_push(s, k);
        sc_fail(s, "unsupported keyword '%s'", k);
        path_pop(s, old);
        return -1;
    }
    return 0;
}

static zse_gx compile(sc *s, const json_t *schema);

/* the JSON text of a value, compact, UTF-8 as is */
static zse_gx json_literal(sc *s, const json_t *v)
{
    char *t = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
    if (!t)
        return zse_fail("json schema: out of memory"), -1;
    zse_gx x = lit(s, t);
    free(t);
    return x;
}

static const char *type_of_value(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "object";
    case JSON_ARRAY: return "array";
    case JSON_STRING: return "string";
    case JSON_INTEGER: return "integer";
    case JSON_REAL: return "number";
    case JSON_TRUE:
    case JSON_FALSE: return "boolean";
    default: return "null";
    }
}

static bool type_allows(const json_t *type, const char *t)
{
    if (!type)
        return true;
    if (json_is_string(type))
        return !strcmp(json_string_value(type), t) || (!strcmp(t, "integer") && !strcmp(json_string_value(type), "number"));
    size_t i;
    const json_t *x;
    json_array_foreach(type, i, x) if (type_allows(x, t)) return true;
    return false;
}

static zse_gx enum_expr(sc *s, const json_t *schema)
{
    const json_t *en = json_object_get(schema, "enum"), *cst = json_object_get(schema, "const");
    const json_t *type = json_object_get(schema, "type");
    if (en && cst)
        return sc_fail(s, "%s together are not supported", "'enum' and 'const'");
    if (cst) {
        if (!type_allows(type, type_of_value(cst)))
            return sc_fail(s, "%s does not match 'type'", "'const'");
        return json_literal(s, cst);
    }
    if (!json_is_array(en) || json_array_size(en) == 0)
        return sc_fail(s, "%s must be a non-empty array", "'enum'");
    zse_gx *alts = zse_malloc(json_array_size(en) * sizeof *alts);
    if (!alts)
        return -1;
    int n = 0;
    size_t i;
    const json_t *v;
    json_array_foreach(en, i, v) {
        if (!type_allows(type, type_of_value(v)))
            continue; /* a value the type excludes can never validate */
        if ((alts[n++] = json_literal(s, v)) < 0) {
            free(alts);
            return -1;
        }
    }
    zse_gx x = n ? zse_gb_alt(s->b, alts, n) : sc_fail(s, "%s leaves no value of the given type", "'enum'");
    free(alts);
    return x;
}

static const json_t *resolve_ref(sc *s, const json_t *ref)
{
    if (!json_is_string(ref)) {
        sc_fail(s, "%s must be a string", "'$ref'");
        return NULL;
    }
    const char *r = json_string_value(ref);
    if (r[0] != '#') {
        sc_fail(s, "$ref '%s': only references inside the schema (#...) are supported", r);
        return NULL;
    }
    const json_t *cur = s->root;
    const char *p = r + 1;
    while (*p == '/') {
        p++;
        char tok[256];
        size_t n = 0;
        for (; *p && *p != '/' && n + 1 < sizeof tok; p++) {
            if (*p == '~' && (p[1] == '0' || p[1] == '1')) {
                tok[n++] = p[1] == '0' ? '~' : '/';
                p++;
            } else {
                tok[n++] = *p;
            }
        }
        tok[n] = 0;
        if (json_is_object(cur)) {
            cur = json_object_get(cur, tok);
        } else if (json_is_array(cur)) {
            char *end;
            long idx = strtol(tok, &end, 10);
            cur = *end || idx < 0 ? NULL : json_array_get(cur, (size_t)idx);
        } else {
            cur = NULL;
        }
        if (!cur) {
            sc_fail(s, "$ref '%s' points at nothing", r);
            return NULL;
        }
    }
    if (*p) {
        sc_fail(s, "$ref '%s': only JSON-pointer references are supported", r);
        return NULL;
    }
    return cur;
}

static zse_gx ref_expr(sc *s, const json_t *ref)
{
    const json_t *target = resolve_ref(s, ref);
    if (!target)
        return -1;
    for (int i = 0; i < s->n_refs; i++)
        if (s->refs[i].target == target)
            return s->refs[i].rule;
    if (s->n_refs == s->cap_refs) {
        int cap = s->cap_refs ? s->cap_refs * 2 : 16;
        ref_memo *p = zse_realloc(s->refs, (size_t)cap * sizeof *p);
        if (!p)
            return -1;
        s->refs = p;
        s->cap_refs = cap;
    }
    zse_gx rule = zse_gb_rule(s->b);
    if (rule < 0)
        return -1;
    s->refs[s->n_refs++] = (ref_memo){target, rule};
    char saved[sizeof s->path];
    memcpy(saved, s->path, sizeof saved);
    snprintf(s->path, sizeof s->path, "%s", json_string_value(ref));
    int saved_depth = s->depth;
    s->depth = 0;
    zse_gx body = compile(s, target);
    s->depth = saved_depth;
    memcpy(s->path, saved, sizeof saved);
    if (body < 0 || zse_gb_define(s->b, rule, body))
        return -1;
    return rule;
}

/* ---- merging (allOf, and anyOf branches under sibling keywords) -------------------------- */

static json_t *deref(sc *s, const json_t *x)
{
    for (int hops = 0; json_is_object(x) && json_object_get(x, "$ref"); hops++) {
        if (hops > 32 || json_object_size(x) > 1) {
            sc_fail(s, "%s: a $ref with sibling keywords, or a chain of references, cannot be merged", "allOf");
            return NULL;
        }
        if (!(x = resolve_ref(s, json_object_get(x, "$ref"))))
            return NULL;
    }
    if (json_is_true(x))
        return json_object();
    if (!json_is_object(x)) {
        sc_fail(s, "%s: every subschema must be an object", "allOf");
        return NULL;
    }
    return json_deep_copy(x);
}

static json_t *type_array(const json_t *t)
{
    if (json_is_array(t))
        return json_deep_copy(t);
    json_t *a = json_array();
    json_array_append(a, (json_t *)t);
    return a;
}

/* into `a`, the keywords of `b` (a and b both plain objects without $ref) */
static int merge_into(sc *s, json_t *a, const json_t *b)
{
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)b, k, v) {
        json_t *have = json_object_get(a, k);
        if (!have) {
            json_object_set(a, k, v);
            continue;
        }
        if (in_list(annotations, k) || json_equal(have, v))
            continue;
        if (!strcmp(k, "properties") && json_is_object(have) && json_is_object(v)) {
            const char *pk;
            json_t *pv;
            json_object_foreach(v, pk, pv) {
                json_t *mine = json_object_get(have, pk);
                if (!mine) {
                    json_object_set(have, pk, pv);
                } else {
                    json_t *both = json_pack("{s:[OO]}", "allOf", mine, pv);
                    json_object_set_new(have, pk, both);
                }
            }
        } else if (!strcmp(k, "required") && json_is_array(have) && json_is_array(v)) {
            size_t i;
            json_t *x;
            json_array_foreach(v, i, x) {
                size_t j;
                json_t *y;
                bool found = false;
                json_array_foreach(have, j, y) found = found || json_equal(x, y);
                if (!found)
                    json_array_append(have, x);
            }
        } else if (!strcmp(k, "type")) {
            json_t *ta = type_array(have), *tb = type_array(v), *both = json_array();
            size_t i;
            json_t *x;
            json_array_foreach(ta, i, x) if (type_allows(tb, json_string_value(x))) json_array_append(both, x);
            json_decref(ta);
            json_decref(tb);
            if (json_array_size(both) == 0) {
                json_decref(both);
                return sc_fail(s, "%s: the subschemas' types do not intersect", "allOf");
            }
            json_object_set_new(a, k, both);
        } else {
            size_t old = path_push(s, k);
            sc_fail(s, "allOf: differing '%s' cannot be merged", k);
            path_pop(s, old);
            return -1;
        }
    }
    return 0;
}

static zse_gx compile_owned(sc *s, json_t *merged)
{
    if (!merged)
        return -1;
    json_array_append_new(s->owned, merged); /* freed with the compiler's state */
    return compile(s, merged);
}

static zse_gx all_of(sc *s, const json_t *schema)
{
    json_t *merged = json_deep_copy(schema);
    json_object_del(merged, "allOf");
    json_array_append_new(s->owned, merged);
    const json_t *list = json_object_get(schema, "allOf");
    if (!json_is_array(list) || json_array_size(list) == 0)
        return sc_fail(s, "%s must be a non-empty array", "'allOf'");
    size_t i;
    const json_t *x;
    json_array_foreach(list, i, x) {
        size_t old = path_push_index(s, "allOf", i);
        json_t *part = deref(s, x);
        if (!part)
            return -1;
        json_t *inner = json_object_get(part, "allOf");
        if (inner) {
            json_decref(part);
            return sc_fail(s, "%s inside allOf is not supported", "'allOf'");
        }
        int rc = merge_into(s, merged, part);
        json_decref(part);
        if (rc)
            return -1;
        path_pop(s, old);
    }
    if (json_object_get(merged, "$ref"))
        return sc_fail(s, "%s next to allOf is not supported", "'$ref'");
    return compile(s, merged);
}

static bool has_constraints(const json_t *schema, const char *except)
{
    const char *k;
    const json_t *v;
    json_object_foreach((json_t *)schema, k, v) if (strcmp(k, except) && !in_list(annotations, k)) return true;
    return false;
}

static zse_gx any_of(sc *s, const json_t *schema, const char *key)
{
    const json_t *list = json_object_get(schema, key);
    if (!json_is_array(list) || json_array_size(list) == 0)
        return sc_fail(s, "'%s' must be a non-empty array", key);
    bool merge = has_constraints(schema, key);
    zse_gx *alts = zse_malloc(json_array_size(list) * sizeof *alts);
    if (!alts)
        return -1;
    size_t i;
    const json_t *x;
    zse_gx out = -1;
    json_array_foreach(list, i, x) {
        size_t old = path_push_index(s, key, i);
        if (merge) { /* the siblings apply to every branch */
            json_t *m = json_deep_copy(schema), *part = deref(s, x);
            json_object_del(m, key);
            if (!part || merge_into(s, m, part)) {
                json_decref(part);
                json_decref(m);
                goto out;
            }
            json_decref(part);
            alts[i] = compile_owned(s, m);
        } else {
            alts[i] = compile(s, x);
        }
        if (alts[i] < 0)
            goto out;
        path_pop(s, old);
    }
    out = zse_gb_alt(s->b, alts, (int)json_array_size(list));
out:
    free(alts);
    return out;
}

/* ---- objects ----------------------------------------------------------------------------- */

/* the rest of a key after its opening quote, including the closing one: printable ASCII
 * but '"' and '\\', and not one of the declared names (so an extra property never repeats a
 * declared one): a trie of the names, walked by prefix. */
typedef struct {
    sc *s;
    const char *const *names;
    gr_class plain;
    zse_gx free_rest, quote;
} key_ctx;

static zse_gx key_rest(key_ctx *c, const int *ids, int k, size_t depth)
{
    zse_gb *b = c->s->b;
    bool terminal = false;
    gr_class next = {{0}};
    for (int i = 0; i < k; i++) {
        const char *nm = c->names[ids[i]];
        if (strlen(nm) == depth)
            terminal = true;
        else
            next.bits[(uint8_t)nm[depth] >> 6] |= 1ull << ((uint8_t)nm[depth] & 63);
    }
    zse_gx alts[130];
    int na = 0;
    int *sub = zse_malloc((size_t)(k ? k : 1) * sizeof *sub);
    if (!sub)
        return -1;
    for (unsigned ch = 0x20; ch < 0x7F; ch++) {
        if (!gr_class_has(&next, (uint8_t)ch))
            continue;
        int m = 0;
        for (int i = 0; i < k; i++) {
            const char *nm = c->names[ids[i]];
            if (strlen(nm) > depth && (uint8_t)nm[depth] == ch)
                sub[m++] = ids[i];
        }
        alts[na++] = gb_seq2(b, zse_gb_byte_range(b, (uint8_t)ch, (uint8_t)ch), key_rest(c, sub, m, depth + 1));
    }
    free(sub);
    gr_class other = c->plain;
    for (int w = 0; w < 4; w++)
        other.bits[w] &= ~next.bits[w];
    if (other.bits[0] | other.bits[1])
        alts[na++] = gb_seq2(b, gb_class(b, &other), c->free_rest);
    if (!terminal)
        alts[na++] = c->quote;
    return zse_gb_alt(b, alts, na);
}

static zse_gx extra_key(sc *s, const char *const *names, int n)
{
    key_ctx c = {.s = s};
    for (unsigned ch = 0x20; ch < 0x7F; ch++)
        if (ch != '"' && ch != '\\')
            c.plain.bits[ch >> 6] |= 1ull << (ch & 63);
    c.quote = lit(s, "\"");
    c.free_rest = gb_seq2(s->b, zse_gb_repeat(s->b, gb_class(s->b, &c.plain), 0, -1), c.quote);
    c.names = names;
    /* only names made of plain characters can collide with an extra key */
    int *ids = zse_malloc((size_t)(n ? n : 1) * sizeof *ids), k = 0;
    if (!ids)
        return -1;
    for (int i = 0; i < n; i++) {
        const char *nm = names[i];
        bool plain = true;
        for (const char *p = nm; *p && plain; p++)
            plain = gr_class_has(&c.plain, (uint8_t)*p);
        if (plain)
            ids[k++] = i;
    }
    zse_gx rest = key_rest(&c, ids, k, 0);
    free(ids);
    return gb_seq2(s->b, c.quote, rest);
}

static bool is_required(const json_t *required, const char *name)
{
    size_t i;
    const json_t *x;
    json_array_foreach(required, i, x) if (json_is_string(x) && !strcmp(json_string_value(x), name)) return true;
    return false;
}

static zse_gx object_expr(sc *s, const json_t *schema)
{
    zse_gb *b = s->b;
    const json_t *props = json_object_get(schema, "properties"), *req = json_object_get(schema, "required");
    const json_t *addl = json_object_get(schema, "additionalProperties");
    if (props && !json_is_object(props))
        return sc_fail(s, "%s must be an object", "'properties'");
    if (req && !json_is_array(req))
        return sc_fail(s, "%s must be an array", "'required'");
    if (addl && !json_is_boolean(addl) && !json_is_object(addl))
        return sc_fail(s, "%s must be a boolean or a schema", "'additionalProperties'");
    if (s->flags & ZSE_SCHEMA_STRICT) {
        if (!json_is_false(addl))
            return sc_fail(s, "strict: %s must be false on every object", "'additionalProperties'");
        const char *k;
        const json_t *v;
        json_object_foreach((json_t *)props, k, v) if (!is_required(req, k))
            return sc_fail(s, "strict: 'required' must list every property ('%s' is missing)", k);
    }
    bool extras = addl && !json_is_false(addl);
    /* the members in order: declared properties, then required names not declared */
    size_t np = props ? json_object_size(props) : 0, nr = req ? json_array_size(req) : 0;
    const char **names = zse_calloc(np + nr + 1, sizeof *names);
    zse_gx *member = zse_calloc(np + nr + 1, sizeof *member);
    bool *optional = zse_calloc(np + nr + 1, sizeof *optional);
    zse_gx out = -1;
    size_t n = 0;
    if (!names || !member || !optional)
        goto done;
    const char *k;
    const json_t *v;
    json_object_foreach((json_t *)props, k, v) {
        size_t old = path_push(s, "properties");
        path_push(s, k);
        zse_gx val = compile(s, v);
        path_pop(s, old);
        json_t *ks = json_string(k);
        zse_gx kx = ks ? json_literal(s, ks) : -1;
        json_decref(ks);
        if (val < 0 || kx < 0)
            goto done;
        zse_gx xs[4] = {kx, lit(s, ":"), ws(s), val};
        names[n] = k;
        optional[n] = !is_required(req, k);
        member[n++] = zse_gb_seq(b, xs, 4);
    }
    size_t i;
    json_array_foreach(req, i, v) {
        if (!json_is_string(v)) {
            size_t old = path_push_index(s, "required", i);
            sc_fail(s, "%s must hold strings", "'required'");
            path_pop(s, old);
            goto done;
        }
        if (props && json_object_get(props, json_string_value(v)))
            continue;
        if (!extras) {
            sc_fail(s, "required property '%s' is not in 'properties' and additional properties are not allowed",
                    json_string_value(v));
            goto done;
        }
        bool dup = false;
        for (size_t j = 0; j < n; j++)
            dup = dup || !strcmp(names[j], json_string_value(v));
        if (dup)
            continue;
        size_t old = path_push(s, "additionalProperties");
        zse_gx val = json_is_object(addl) ? compile(s, addl) : any_value(s);
        path_pop(s, old);
        zse_gx kx = json_literal(s, v);
        if (val < 0 || kx < 0)
            goto done;
        zse_gx xs[4] = {kx, lit(s, ":"), ws(s), val};
        names[n] = json_string_value(v);
        member[n++] = zse_gb_seq(b, xs, 4);
    }
    /* A: nothing written yet; B: something written (a comma comes first) */
    zse_gx A = gb_empty(b), B = gb_empty(b);
    if (extras) {
        size_t old = path_push(s, "additionalProperties");
        zse_gx val = json_is_object(addl) ? compile(s, addl) : any_value(s);
        path_pop(s, old);
        zse_gx xs[4] = {extra_key(s, names, (int)n), lit(s, ":"), ws(s), val};
        zse_gx em = zse_gb_seq(b, xs, 4);
        zse_gx after = zse_gb_repeat(b, gb_seq3(b, lit(s, ","), ws(s), em), 0, -1);
        A = gb_opt(b, gb_seq2(b, em, after));
        B = after;
    }
    for (size_t j = n; j-- > 0;) {
        zse_gx a = gb_seq2(b, member[j], B);
        zse_gx bb = gb_seq2(b, gb_seq3(b, lit(s, ","), ws(s), member[j]), B);
        A = optional[j] ? gb_alt2(b, a, A) : a;
        B = optional[j] ? gb_alt2(b, bb, B) : bb;
    }
    zse_gx xs[4] = {lit(s, "{"), ws(s), A, lit(s, "}")};
    out = zse_gb_seq(b, xs, 4);
done:
    free(names);
    free(member);
    free(optional);
    return out;
}

/* ---- arrays ------------------------------------------------------------------------------ */

static zse_gx array_expr(sc *s, const json_t *schema)
{
    zse_gb *b = s->b;
    const json_t *items = json_object_get(schema, "items"), *prefix = json_object_get(schema, "prefixItems");
    const json_t *mini = json_object_get(schema, "minItems"), *maxi = json_object_get(schema, "maxItems");
    json_int_t lo = 0, hi = -1;
    if (mini && (!json_is_integer(mini) || (lo = json_integer_value(mini)) < 0))
        return sc_fail(s, "%s must be a non-negative integer", "'minItems'");
    if (maxi && (!json_is_integer(maxi) || (hi = json_integer_value(maxi)) < 0))
        return sc_fail(s, "%s must be a non-negative integer", "'maxItems'");
    if (lo > 10000 || hi > 10000)
        return sc_fail(s, "%s above 10000 is not supported", "'minItems'/'maxItems'");
    if (json_is_array(items)) { /* the older tuple form */
        if (prefix)
            return sc_fail(s, "%s as an array next to 'prefixItems' is not supported", "'items'");
        prefix = items;
        items = json_false();
    }
    if (prefix && !json_is_array(prefix))
        return sc_fail(s, "%s must be an array", "'prefixItems'");
    size_t k = prefix ? json_array_size(prefix) : 0;
    if (hi >= 0 && k > (size_t)hi)
        k = (size_t)hi; /* maxItems cuts the tuple short */
    bool closed = json_is_false(items);
    if (closed && (hi < 0 || (size_t)hi > k))
        hi = (json_int_t)k;
    if (hi >= 0 && hi < lo)
        return sc_fail(s, "%s leave no array", "the item counts");
    zse_gx item = -1;
    if (!closed) {
        size_t old = path_push(s, "items");
        item = items ? compile(s, items) : any_value(s);
        path_pop(s, old);
        if (item < 0)
            return -1;
    }
    zse_gx sep = gb_seq2(b, lit(s, ","), ws(s));
    /* the tail after k prefix items (j = k items written) */
    zse_gx tail;
    size_t j = k;
    if (closed || (hi >= 0 && (size_t)hi <= j)) {
        tail = gb_empty(b);
    } else {
        int need = lo > (json_int_t)j ? (int)(lo - (json_int_t)j) : 0, most = hi < 0 ? -1 : (int)(hi - (json_int_t)j);
        if (j > 0) {
            tail = zse_gb_repeat(b, gb_seq2(b, sep, item), need, most);
        } else {
            zse_gx rest = zse_gb_repeat(b, gb_seq2(b, sep, item), need > 0 ? need - 1 : 0, most < 0 ? -1 : most - 1);
            tail = gb_seq2(b, item, rest);
            if (need == 0)
                tail = gb_opt(b, tail);
        }
    }
    for (size_t p = k; p-- > 0;) {
        size_t old = path_push_index(s, "prefixItems", p);
        zse_gx x = compile(s, json_array_get(prefix, p));
        path_pop(s, old);
        if (x < 0)
            return -1;
        zse_gx step = p ? gb_seq3(b, sep, x, tail) : gb_seq2(b, x, tail);
        tail = (json_int_t)p >= lo ? gb_opt(b, step) : step;
    }
    zse_gx xs[4] = {lit(s, "["), ws(s), tail, lit(s, "]")};
    return zse_gb_seq(b, xs, 4);
}

/* ---- one schema -------------------------------------------------------------------------- */

static zse_gx typed(sc *s, const json_t *schema, const char *t)
{
    if (!strcmp(t, "object"))
        return object_expr(s, schema);
    if (!strcmp(t, "array"))
        return array_expr(s, schema);
    if (!strcmp(t, "string"))
        return string_expr(s, schema);
    if (!strcmp(t, "integer"))
        return integer_expr(s, schema);
    if (!strcmp(t, "number"))
        return number_expr(s, schema);
    if (!strcmp(t, "boolean"))
        return gb_alt2(s->b, lit(s, "true"), lit(s, "false"));
    if (!strcmp(t, "null"))
        return lit(s, "null");
    return sc_fail(s, "unknown type '%s'", t);
}

static const char *infer_type(const json_t *schema)
{
    static const struct {
        const char *key, *type;
    } hints[] = {{"properties", "object"}, {"required", "object"}, {"additionalProperties", "object"},
                 {"items", "array"}, {"prefixItems", "array"}, {"minItems", "array"}, {"maxItems", "array"},
                 {"minLength", "string"}, {"maxLength", "string"}, {"pattern", "string"}, {"format", "string"},
                 {"minimum", "number"}, {"maximum", "number"}, {"exclusiveMinimum", "number"},
                 {"exclusiveMaximum", "number"}};
    for (size_t i = 0; i < sizeof hints / sizeof *hints; i++)
        if (json_object_get(schema, hints[i].key))
            return hints[i].type;
    return NULL;
}

static zse_gx compile(sc *s, const json_t *schema)
{
    if (json_is_true(schema))
        return any_value(s);
    if (json_is_false(schema))
        return sc_fail(s, "%s matches nothing", "the schema false");
    if (!json_is_object(schema))
        return sc_fail(s, "%s must be an object or a boolean", "a schema");
    if (++s->depth > SC_MAX_DEPTH) {
        s->depth--;
        return sc_fail(s, "schemas nested deeper than %s are not supported", "64");
    }
    zse_gx x = -1;
    if (check_keywords(s, schema))
        goto out;
    const json_t *type = json_object_get(schema, "type"), *nullable = json_object_get(schema, "nullable");
    if (nullable && !json_is_boolean(nullable)) {
        x = sc_fail(s, "%s must be a boolean", "'nullable'");
        goto out;
    }
    if (json_is_true(nullable) && type && !type_allows(type, "null")) {
        json_t *m = json_deep_copy(schema);
        json_t *t = type_array(type);
        json_array_append_new(t, json_string("null"));
        json_object_set_new(m, "type", t);
        json_object_del(m, "nullable");
        x = compile_owned(s, m);
        goto out;
    }
    if (json_object_get(schema, "$ref")) {
        if (has_constraints(schema, "$ref")) {
            x = sc_fail(s, "%s with sibling constraint keywords is not supported", "'$ref'");
            goto out;
        }
        x = ref_expr(s, json_object_get(schema, "$ref"));
        goto out;
    }
    if (json_object_get(schema, "allOf")) {
        x = all_of(s, schema);
        goto out;
    }
    if (json_object_get(schema, "anyOf") || json_object_get(schema, "oneOf")) {
        if (json_object_get(schema, "anyOf") && json_object_get(schema, "oneOf")) {
            x = sc_fail(s, "%s together are not supported", "'anyOf' and 'oneOf'");
            goto out;
        }
        x = any_of(s, schema, json_object_get(schema, "anyOf") ? "anyOf" : "oneOf");
        goto out;
    }
    if (json_object_get(schema, "enum") || json_object_get(schema, "const")) {
        x = enum_expr(s, schema);
        goto out;
    }
    if (!type) {
        const char *t = infer_type(schema);
        x = t ? typed(s, schema, t) : any_value(s);
        goto out;
    }
    if (json_is_string(type)) {
        x = typed(s, schema, json_string_value(type));
        goto out;
    }
    if (!json_is_array(type) || json_array_size(type) == 0) {
        x = sc_fail(s, "%s must be a string or a non-empty array", "'type'");
        goto out;
    }
    zse_gx alts[8];
    size_t i, n = 0;
    const json_t *t;
    json_array_foreach(type, i, t) {
        if (!json_is_string(t) || n == 8) {
            x = sc_fail(s, "%s must hold distinct type names", "'type'");
            goto out;
        }
        bool dup = false;
        for (size_t j = 0; j < i; j++)
            dup = dup || json_equal(json_array_get(type, j), t);
        if (dup)
            continue;
        if ((alts[n++] = typed(s, schema, json_string_value(t))) < 0)
            goto out;
    }
    x = zse_gb_alt(s->b, alts, (int)n);
out:
    s->depth--;
    return x;
}

zse_gx zse_gb_json_schema(zse_gb *b, const json_t *schema, unsigned flags)
{
    sc s = {.b = b, .root = schema, .flags = flags, .path = "#", .ws = -1, .str_char = -1, .string = -1, .value = -1,
            .number = -1};
    s.owned = json_array();
    if (!s.owned)
        return zse_fail("json schema: out of memory"), -1;
    zse_gx x = compile(&s, schema);
    free(s.refs);
    json_decref(s.owned);
    return x;
}

zse_gx zse_gb_json_object(zse_gb *b)
{
    sc s = {.b = b, .ws = -1, .str_char = -1, .string = -1, .value = -1, .number = -1};
    return object_of(&s, any_string(&s), any_value(&s));
}

zse_gx zse_gb_json_value(zse_gb *b)
{
    sc s = {.b = b, .ws = -1, .str_char = -1, .string = -1, .value = -1, .number = -1};
    return any_value(&s);
}
