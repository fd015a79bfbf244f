/* The scanners: one per format, over the whole text so far. They split it into content
 * spans and calls (name, where the arguments are and how far they are known) and say from
 * where the text is still undecided. The complete parser runs them once with final set;
 * the streaming parser runs them after every piece and emits what became known since. */
#include "toolcall/toolcall.h"

#include <stdlib.h>
#include <string.h>

static bool is_ws(char c)
{
    return c == ' ' || c == '\n' || c == '\t' || c == '\r';
}

static size_t skip_ws(const char *t, size_t len, size_t i)
{
    while (i < len && is_ws(t[i]))
        i++;
    return i;
}

static bool starts(const char *t, size_t len, size_t i, const char *lit)
{
    size_t n = strlen(lit);
    return i + n <= len && !memcmp(t + i, lit, n);
}

/* text[i..len) is a proper prefix of lit (so lit may still come) */
static bool prefix_of(const char *t, size_t len, size_t i, const char *lit)
{
    size_t n = strlen(lit);
    return len - i < n && !memcmp(t + i, lit, len - i);
}

/* the end of the JSON value at i, or 0 when the text ends inside it */
static size_t value_end(const char *t, size_t len, size_t i)
{
    if (i >= len)
        return 0;
    char c = t[i];
    if (c == '"') {
        for (size_t j = i + 1; j < len; j++) {
            if (t[j] == '\\')
                j++;
            else if (t[j] == '"')
                return j + 1;
        }
        return 0;
    }
    if (c == '{' || c == '[') {
        int depth = 0;
        bool in_str = false;
        for (size_t j = i; j < len; j++) {
            char d = t[j];
            if (in_str) {
                if (d == '\\')
                    j++;
                else if (d == '"')
                    in_str = false;
            } else if (d == '"') {
                in_str = true;
            } else if (d == '{' || d == '[') {
                depth++;
            } else if ((d == '}' || d == ']') && --depth == 0) {
                return j + 1;
            }
        }
        return 0;
    }
    /* a number or literal: up to a delimiter */
    size_t j = i;
    while (j < len && !is_ws(t[j]) && t[j] != ',' && t[j] != '}' && t[j] != ']')
        j++;
    return j < len ? j : 0;
}

static int add_content(tc_scan *s, size_t a, size_t b)
{
    if (b <= a)
        return 0;
    if (s->n_content == s->cap_content) {
        int cap = s->cap_content ? s->cap_content * 2 : 8;
        tc_span *p = zse_realloc(s->content, (size_t)cap * sizeof *p);
        if (!p)
            return -1;
        s->content = p;
        s->cap_content = cap;
    }
    s->content[s->n_content++] = (tc_span){a, b};
    return 0;
}

static tc_call *add_call(tc_scan *s)
{
    if (s->n_calls == s->cap_calls) {
        int cap = s->cap_calls ? s->cap_calls * 2 : 4;
        tc_call *p = zse_realloc(s->calls, (size_t)cap * sizeof *p);
        if (!p)
            return NULL;
        s->calls = p;
        s->cap_calls = cap;
    }
    tc_call *c = &s->calls[s->n_calls++];
    memset(c, 0, sizeof *c);
    return c;
}

void tc_scan_free(tc_scan *s)
{
    for (int i = 0; i < s->n_calls; i++)
        free(s->calls[i].name);
    free(s->calls);
    free(s->content);
    memset(s, 0, sizeof *s);
}

/* A call object at i: {"name": ..., "arguments"|"parameters": ...} in any member order.
 * Fills c as far as the text goes; returns the object's end, or 0 when it is incomplete;
 * *not_call when it cannot be a call (not an object, a member that is not a key). */
static size_t scan_call_object(const char *t, size_t len, size_t i, tc_call *c, bool *not_call)
{
    *not_call = false;
    if (i >= len)
        return 0;
    if (t[i] != '{') {
        *not_call = true;
        return 0;
    }
    size_t j = i + 1;
    for (;;) {
        j = skip_ws(t, len, j);
        if (j >= len)
            return 0;
        if (t[j] == '}')
            break;
        if (t[j] == ',') {
            j++;
            continue;
        }
        if (t[j] != '"') {
            *not_call = true;
            return 0;
        }
        size_t ke = value_end(t, len, j);
        if (!ke)
            return 0;
        size_t k0 = j + 1, kn = ke - 1 - k0;
        j = skip_ws(t, len, ke);
        if (j >= len)
            return 0;
        if (t[j] != ':') {
            *not_call = true;
            return 0;
        }
        j = skip_ws(t, len, j + 1);
        if (j >= len)
            return 0;
        size_t ve = value_end(t, len, j);
        bool is_args = (kn == 9 && !memcmp(t + k0, "arguments", 9)) || (kn == 10 && !memcmp(t + k0, "parameters", 10));
        if (kn == 4 && !memcmp(t + k0, "name", 4) && t[j] == '"' && ve && !c->name) {
            json_t *n = json_loadb(t + j, ve - j, JSON_DECODE_ANY, NULL);
            if (json_is_string(n))
                c->name = zse_strdup(json_string_value(n));
            json_decref(n);
        } else if (is_args && !c->args_start) {
            c->args_start = j;
            c->args_is_string = t[j] == '"';
            c->args_end = ve ? ve : len;
            c->args_done = ve != 0;
        }
        if (!ve)
            return 0;
        j = ve;
    }
    size_t end = j + 1;
    /* complete: valid JSON with a string name */
    json_t *o = json_loadb(t + i, end - i, 0, NULL);
    c->complete = o && c->name && json_is_string(json_object_get(o, "name"));
    if (c->complete && c->args_is_string) {
        const json_t *a = json_object_get(o, "arguments");
        if (!a)
            a = json_object_get(o, "parameters");
        c->complete = json_is_string(a);
    }
    json_decref(o);
    if (!c->complete)
        *not_call = true;
    return end;
}

/* hermes: content <tool_call>{call}</tool_call> content ... */
static int scan_hermes(const char *t, size_t len, bool final, tc_scan *s)
{
    static const char open[] = "<tool_call>", close[] = "</tool_call>";
    size_t pos = 0;
    for (;;) {
        const char *m = pos < len ? memmem(t + pos, len - pos, open, sizeof open - 1) : NULL;
        if (!m) {
            size_t end = len;
            if (!final) /* hold back what may begin the marker */
                for (size_t k = pos; k < len; k++)
                    if (t[k] == '<' && prefix_of(t, len, k, open)) {
                        end = k;
                        break;
                    }
            s->held = end;
            return add_content(s, pos, end);
        }
        size_t at = (size_t)(m - t);
        if (add_content(s, pos, at))
            return -1;
        size_t p = skip_ws(t, len, at + sizeof open - 1);
        if (p >= len) {
            s->held = at;
            if (final)
                return add_content(s, at, len);
            return 0;
        }
        tc_call *c = add_call(s);
        if (!c)
            return -1;
        bool not_call;
        size_t end = scan_call_object(t, len, p, c, &not_call);
        if (not_call || (!end && final)) {
            /* not a call after all: the marker and what follows are text */
            free(c->name);
            s->n_calls--;
            if (add_content(s, at, p))
                return -1;
            pos = p;
            if (!end && !not_call) { /* final, unfinished: all of it is text */
                s->held = len;
                return add_content(s, p, len);
            }
            if (end) {
                if (add_content(s, p, end))
                    return -1;
                pos = end;
            }
            continue;
        }
        if (!end) {
            s->held = at;
            return 0;
        }
        size_t q = skip_ws(t, len, end);
        if (starts(t, len, q, close)) {
            pos = q + sizeof close - 1;
        } else if (!final && (q >= len || prefix_of(t, len, q, close))) {
            s->held = len; /* the call is whole; the closing tag may still come */
            return 0;
        } else {
            pos = end;
        }
    }
}

/* calls as a run of objects from p: separators sep (';' / ',' and whitespace); arrays when
 * bracket. Returns the end of the run, 0 when incomplete, sets *not_call */
static size_t scan_call_run(const char *t, size_t len, size_t p, bool bracket, tc_scan *s, bool *not_call)
{
    *not_call = false;
    if (bracket) {
        if (t[p] != '[') {
            *not_call = true;
            return 0;
        }
        p++;
    }
    for (;;) {
        p = skip_ws(t, len, p);
        if (p >= len)
            return 0;
        if (bracket && t[p] == ']')
            return p + 1;
        if (!bracket && t[p] != '{')
            return p; /* the run ends here */
        tc_call *c = add_call(s);
        if (!c)
            return 0;
        size_t end = scan_call_object(t, len, p, c, not_call);
        if (*not_call || !end)
            return 0;
        p = skip_ws(t, len, end);
        if (p < len && (t[p] == ',' || t[p] == ';'))
            p++;
        else if (!bracket)
            return p;
    }
}

/* llama3 and json: the whole output is the call(s), else it is all content */
static int scan_whole(zse_tool_format f, const char *t, size_t len, bool final, tc_scan *s)
{
    size_t p = skip_ws(t, len, 0), start = p;
    if (f == ZSE_TOOL_LLAMA3) {
        if (starts(t, len, p, "<|python_tag|>"))
            p = skip_ws(t, len, p + 14);
        else if (!final && prefix_of(t, len, p, "<|python_tag|>"))
            return s->held = 0, 0;
    } else {
        if (starts(t, len, p, "```json"))
            p = skip_ws(t, len, p + 7);
        else if (!final && prefix_of(t, len, p, "```json"))
            return s->held = 0, 0;
        else if (starts(t, len, p, "```"))
            p = skip_ws(t, len, p + 3);
    }
    if (p >= len) {
        if (final)
            return add_content(s, start, len);
        return s->held = 0, 0;
    }
    bool bracket = f == ZSE_TOOL_JSON && t[p] == '[';
    if (t[p] != '{' && !bracket) { /* plain text: no call in this output */
        s->held = len;
        return add_content(s, 0, len);
    }
    bool not_call;
    size_t end = scan_call_run(t, len, p, bracket, s, &not_call);
    if (not_call || (!end && final)) {
        for (int i = 0; i < s->n_calls; i++)
            free(s->calls[i].name);
        s->n_calls = 0;
        s->held = len;
        return add_content(s, 0, len);
    }
    if (!end) {
        s->held = 0;
        return 0;
    }
    size_t q = skip_ws(t, len, end);
    if (f == ZSE_TOOL_JSON && starts(t, len, q, "```"))
        q = skip_ws(t, len, q + 3);
    if (q < len) {
        if (!final && f == ZSE_TOOL_JSON && prefix_of(t, len, q, "```"))
            return s->held = len, 0;
        return add_content(s, q, len), s->held = len, 0;
    }
    s->held = len;
    return 0;
}

/* mistral: content [TOOL_CALLS][{...}, ...] or [TOOL_CALLS]name[ARGS]{...} (repeated) */
static int scan_mistral(const char *t, size_t len, bool final, tc_scan *s)
{
    static const char mark[] = "[TOOL_CALLS]", args[] = "[ARGS]";
    const char *m = memmem(t, len, mark, sizeof mark - 1);
    if (!m) {
        size_t end = len;
        if (!final)
            for (size_t k = 0; k < len; k++)
                if (t[k] == '[' && prefix_of(t, len, k, mark)) {
                    end = k;
                    break;
                }
        s->held = end;
        return add_content(s, 0, end);
    }
    size_t at = (size_t)(m - t), p = at + sizeof mark - 1;
    if (add_content(s, 0, at))
        return -1;
    s->held = at;
    p = skip_ws(t, len, p);
    if (p >= len)
        return final ? add_content(s, at, len) : 0;
    if (t[p] == '[') {
        bool not_call;
        size_t end = scan_call_run(t, len, p, true, s, &not_call);
        if (not_call || (!end && final)) {
            for (int i = 0; i < s->n_calls; i++)
                free(s->calls[i].name);
            s->n_calls = 0;
            s->held = len;
            return add_content(s, at, len);
        }
        if (end) {
            s->held = len;
            return add_content(s, skip_ws(t, len, end), len);
        }
        return 0;
    }
    /* name[ARGS]{...}, each call after its own [TOOL_CALLS] (the first one's already read) */
    for (;;) {
        const char *a = memmem(t + p, len - p, args, sizeof args - 1);
        if (!a) {
            if (final) {
                s->held = len;
                return add_content(s, at, len);
            }
            return 0;
        }
        size_t ne = (size_t)(a - t), vs = skip_ws(t, len, ne + sizeof args - 1);
        while (ne > p && is_ws(t[ne - 1]))
            ne--;
        tc_call *c = add_call(s);
        if (!c)
            return -1;
        c->name = zse_strndup(t + p, ne - p);
        if (!c->name)
            return -1;
        if (vs >= len)
            return final ? (s->held = len, add_content(s, at, len)) : 0;
        size_t ve = value_end(t, len, vs);
        c->args_start = vs;
        c->args_is_string = t[vs] == '"';
        c->args_end = ve ? ve : len;
        c->args_done = ve != 0;
        if (!ve) {
            if (final) { /* a call cut short is text */
                free(c->name);
                s->n_calls--;
                s->held = len;
                return add_content(s, at, len);
            }
            return 0;
        }
        json_t *v = json_loadb(t + vs, ve - vs, JSON_DECODE_ANY, NULL);
        c->complete = v && ne > p;
        json_decref(v);
        p = skip_ws(t, len, ve);
        if (starts(t, len, p, mark)) {
            p = skip_ws(t, len, p + sizeof mark - 1);
            continue;
        }
        if (!final && p < len && prefix_of(t, len, p, mark))
            return 0;
        if (!final && p >= len)
            return 0;
        s->held = len;
        return add_content(s, p, len);
    }
}

int tc_scan_text(zse_tool_format f, const char *text, size_t len, bool final, tc_scan *out)
{
    memset(out, 0, sizeof *out);
    switch (f) {
    case ZSE_TOOL_HERMES: return scan_hermes(text, len, final, out);
    case ZSE_TOOL_MISTRAL: return scan_mistral(text, len, final, out);
    case ZSE_TOOL_LLAMA3:
    case ZSE_TOOL_JSON: return scan_whole(f, text, len, final, out);
    }
    return zse_fail("tool calls: unknown format %d", (int)f);
}
