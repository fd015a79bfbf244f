/* The complete-output parser and the streaming parser, both over the scanners of scan.c:
 * the streaming one rescans the text so far after each piece (outputs are short) and emits
 * what became known since: content up to where a marker may begin, then per call a first
 * delta with id and name, then the arguments as they arrive. */
#include "toolcall/toolcall.h"

#include <stdlib.h>
#include <string.h>

static char *arguments_text(const char *t, const tc_call *c)
{
    if (!c->args_start)
        return zse_strdup("{}");
    if (c->args_is_string) { /* written as a JSON string: its content is the arguments */
        json_t *v = json_loadb(t + c->args_start, c->args_end - c->args_start, JSON_DECODE_ANY, NULL);
        char *s = json_is_string(v) ? zse_strdup(json_string_value(v)) : NULL;
        json_decref(v);
        return s ? s : zse_strdup("{}");
    }
    return zse_strndup(t + c->args_start, c->args_end - c->args_start);
}

void zse_tool_result_free(zse_tool_result *r)
{
    if (!r)
        return;
    free(r->content);
    for (int i = 0; i < r->n_calls; i++) {
        free(r->calls[i].id);
        free(r->calls[i].name);
        free(r->calls[i].arguments);
    }
    free(r->calls);
    memset(r, 0, sizeof *r);
}

static bool all_space(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\n' && s[i] != '\t' && s[i] != '\r')
            return false;
    return true;
}

int zse_tool_parse(zse_tool_format f, const char *text, size_t len, uint64_t id_seed, zse_tool_result *out)
{
    memset(out, 0, sizeof *out);
    tc_scan s;
    if (tc_scan_text(f, text, len, true, &s)) {
        tc_scan_free(&s);
        return -1;
    }
    bool calls_ok = true;
    for (int i = 0; i < s.n_calls; i++)
        calls_ok = calls_ok && s.calls[i].complete && s.calls[i].name;
    zse_buf content = {0};
    int rc = -1;
    if (!calls_ok) { /* a call that does not parse: the output is text */
        if (zse_buf_append(&content, text, len))
            goto out;
        s.n_calls = 0;
    } else {
        for (int i = 0; i < s.n_content; i++)
            if (zse_buf_append(&content, text + s.content[i].start, s.content[i].end - s.content[i].start))
                goto out;
    }
    if (content.len && !(s.n_calls && all_space(content.data, content.len)))
        out->content = zse_strndup(content.data, content.len);
    if (s.n_calls && !(out->calls = zse_calloc((size_t)s.n_calls, sizeof *out->calls)))
        goto out;
    for (int i = 0; i < s.n_calls; i++) {
        zse_tool_call *c = &out->calls[out->n_calls++];
        c->id = tc_call_id(f, id_seed, i);
        c->name = zse_strdup(s.calls[i].name);
        c->arguments = arguments_text(text, &s.calls[i]);
        if (!c->id || !c->name || !c->arguments)
            goto out;
    }
    rc = 0;
out:
    zse_buf_free(&content);
    tc_scan_free(&s);
    if (rc)
        zse_tool_result_free(out);
    return rc;
}

json_t *zse_tool_calls_json(const zse_tool_result *r)
{
    json_t *a = json_array();
    for (int i = 0; a && i < r->n_calls; i++) {
        json_t *c = json_pack("{s:s,s:s,s:{s:s,s:s}}", "id", r->calls[i].id, "type", "function", "function", "name",
                              r->calls[i].name, "arguments", r->calls[i].arguments);
        if (!c || json_array_append_new(a, c)) {
            json_decref(a);
            return NULL;
        }
    }
    return a;
}

/* ---- streaming ---------------------------------------------------------------------------- */

typedef struct {
    bool header_sent;
    size_t args_sent; /* the arguments' text sent up to here (absolute) */
    bool args_finished;
} call_state;

struct zse_tool_stream {
    zse_tool_format f;
    uint64_t seed;
    zse_buf text;
    size_t content_sent; /* content emitted up to here (absolute) */
    call_state *calls;
    int n_calls, cap_calls;
    bool finished;
};

zse_tool_stream *zse_tool_stream_new(zse_tool_format f, uint64_t id_seed)
{
    zse_tool_stream *s = zse_calloc(1, sizeof *s);
    if (s) {
        s->f = f;
        s->seed = id_seed;
    }
    return s;
}

void zse_tool_stream_free(zse_tool_stream *s)
{
    if (!s)
        return;
    zse_buf_free(&s->text);
    free(s->calls);
    free(s);
}

int zse_tool_stream_calls(const zse_tool_stream *s)
{
    int n = 0;
    for (int i = 0; i < s->n_calls; i++)
        n += s->calls[i].header_sent;
    return n;
}

void zse_tool_deltas_clear(zse_tool_deltas *d)
{
    for (int i = 0; i < d->n; i++) {
        free(d->d[i].id);
        free(d->d[i].name);
        free(d->d[i].text);
    }
    d->n = 0;
}

void zse_tool_deltas_free(zse_tool_deltas *d)
{
    zse_tool_deltas_clear(d);
    free(d->d);
    memset(d, 0, sizeof *d);
}

static int add_delta(zse_tool_deltas *d, zse_tool_delta_kind kind, int index, char *id, char *name, const char *text,
                     size_t n)
{
    if (d->n == d->cap) {
        int cap = d->cap ? d->cap * 2 : 8;
        zse_tool_delta *p = zse_realloc(d->d, (size_t)cap * sizeof *p);
        if (!p)
            goto fail;
        d->d = p;
        d->cap = cap;
    }
    char *t = zse_strndup(text, n);
    if (!t)
        goto fail;
    d->d[d->n++] = (zse_tool_delta){kind, index, id, name, t};
    return 0;
fail:
    free(id);
    free(name);
    return -1;
}

static int emit(zse_tool_stream *s, bool final, zse_tool_deltas *out)
{
    const char *t = s->text.data ? s->text.data : "";
    tc_scan sc;
    int rc = -1;
    if (tc_scan_text(s->f, t, s->text.len, final, &sc))
        goto out;
    for (int i = 0; i < sc.n_content; i++) {
        tc_span sp = sc.content[i];
        if (sp.end <= s->content_sent)
            continue;
        size_t a = sp.start > s->content_sent ? sp.start : s->content_sent;
        /* whitespace before the first call of a whole-output format is not content */
        if (add_delta(out, ZSE_TOOL_DELTA_CONTENT, 0, NULL, NULL, t + a, sp.end - a))
            goto out;
        s->content_sent = sp.end;
    }
    if (sc.n_calls > s->cap_calls) {
        call_state *p = zse_realloc(s->calls, (size_t)sc.n_calls * sizeof *p);
        if (!p)
            goto out;
        s->calls = p;
        s->cap_calls = sc.n_calls;
    }
    while (s->n_calls < sc.n_calls)
        s->calls[s->n_calls++] = (call_state){0};
    for (int i = 0; i < sc.n_calls; i++) {
        const tc_call *c = &sc.calls[i];
        call_state *st = &s->calls[i];
        if (!c->name)
            break; /* calls go out in order: a later one waits for this one's name */
        if (!st->header_sent) {
            char *id = tc_call_id(s->f, s->seed, i), *name = zse_strdup(c->name);
            if (!id || !name) {
                free(id);
                free(name);
                goto out;
            }
            if (add_delta(out, ZSE_TOOL_DELTA_CALL, i, id, name, "", 0))
                goto out;
            st->header_sent = true;
        }
        if (!c->args_start || st->args_finished)
            continue;
        if (c->args_is_string) { /* sent whole once complete: its decoded content */
            if (!c->args_done)
                continue;
            char *a = arguments_text(t, c);
            int r = a ? add_delta(out, ZSE_TOOL_DELTA_CALL, i, NULL, NULL, a, strlen(a)) : -1;
            free(a);
            if (r)
                goto out;
            st->args_finished = true;
            continue;
        }
        if (st->args_sent < c->args_start)
            st->args_sent = c->args_start;
        if (c->args_end > st->args_sent) {
            if (add_delta(out, ZSE_TOOL_DELTA_CALL, i, NULL, NULL, t + st->args_sent, c->args_end - st->args_sent))
                goto out;
            st->args_sent = c->args_end;
        }
        st->args_finished = c->args_done;
    }
    if (final) /* a call without arguments: "{}" */
        for (int i = 0; i < sc.n_calls && i < s->n_calls; i++)
            if (s->calls[i].header_sent && !sc.calls[i].args_start && !s->calls[i].args_finished) {
                if (add_delta(out, ZSE_TOOL_DELTA_CALL, i, NULL, NULL, "{}", 2))
                    goto out;
                s->calls[i].args_finished = true;
            }
    rc = 0;
out:
    tc_scan_free(&sc);
    return rc;
}

int zse_tool_stream_push(zse_tool_stream *s, const char *piece, size_t len, zse_tool_deltas *out)
{
    if (s->finished)
        return zse_fail("tool calls: text pushed after the stream finished");
    if (zse_buf_append(&s->text, piece, len))
        return -1;
    return emit(s, false, out);
}

int zse_tool_stream_finish(zse_tool_stream *s, zse_tool_deltas *out)
{
    if (s->finished)
        return 0;
    s->finished = true;
    return emit(s, true, out);
}
