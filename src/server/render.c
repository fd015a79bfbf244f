/* Rendering: a job's token events turned into the API's bytes — OpenAI chat and
 * completion objects, TGI objects, streamed as Server-Sent Events or whole. job.c owns the
 * lifecycle (threads, the event queue, the engine); this file owns the shapes and the
 * consumer-side state of each choice (its text, logprobs, finish), and runs on whichever
 * thread consumes the events (an HTTP worker for streams, a server worker for whole
 * answers).
 *
 * A token's text as logprobs show it is the token detokenized alone (U+FFFD where that is
 * not valid UTF-8 on its own); its `bytes` are the bytes it adds to the text, so a token
 * holding half a character gives that half, and the bytes of consecutive tokens join
 * into the text. */
#include "server/server.h"

#include "toolcall/toolcall.h"

#include <stdio.h>
#include <string.h>

/* ---- life ---------------------------------------------------------------------------- */

/* the text echo puts first: the prompt as sent, or its tokens detokenized */
static char *prompt_text(const zse_model *m, const srv_prompt *p)
{
    return p->text ? zse_strdup(p->text) : zse_detokenize(m, p->ids, p->n_ids, false);
}

int srv_render_init(srv_render *rd, const srv_request *req, const zse_model *m, int n_choices)
{
    zse_model_info info;
    zse_model_get_info(m, &info);
    for (int i = 0; i < info.n_eos && rd->n_eos < 8; i++)
        rd->eos[rd->n_eos++] = info.eos_ids[i];
    rd->req = req;
    rd->model = m;
    rd->ttft = -1;
    rd->n_choices = n_choices;
    rd->choices = zse_calloc((size_t)n_choices, sizeof *rd->choices);
    if (!rd->choices)
        return -1;
    for (int i = 0; i < n_choices; i++)
        rd->choices[i].prompt = i / req->n;
    /* echo text, once per prompt (completions' echo, TGI's return_full_text) */
    if (req->echo) {
        if (!(rd->echo = zse_calloc(req->n_prompts, sizeof *rd->echo)))
            return -1;
        for (size_t i = 0; i < req->n_prompts; i++)
            if (!(rd->echo[i] = prompt_text(m, &req->prompts[i])))
                return -1;
    }
    return 0;
}

void srv_render_free(srv_render *rd)
{
    for (int i = 0; rd->choices && i < rd->n_choices; i++) {
        zse_buf_free(&rd->choices[i].text);
        json_decref(rd->choices[i].logprobs);
        zse_tool_stream_free(rd->choices[i].tool_stream);
        json_decref(rd->choices[i].prompt_lp);
        json_decref(rd->choices[i].top_tokens);
    }
    free(rd->choices);
    for (size_t i = 0; rd->echo && i < rd->req->n_prompts; i++)
        free(rd->echo[i]);
    free(rd->echo);
    memset(rd, 0, sizeof *rd);
}

static const char *echo_of(const srv_render *rd, int prompt)
{
    return rd->echo ? rd->echo[prompt] : "";
}

void srv_render_usage(const srv_render *rd, srv_job_usage *u)
{
    memset(u, 0, sizeof *u);
    for (size_t i = 0; i < rd->req->n_prompts; i++)
        u->prompt_tokens += (int)rd->req->prompts[i].n_ids;
    u->ttft = rd->ttft;
    for (int i = 0; i < rd->n_choices; i++) {
        const srv_choice *c = &rd->choices[i];
        u->completion_tokens += c->completion_tokens;
        if (c->n_timed >= 2 && u->n_tpot < 64)
            u->tpot[u->n_tpot++] = (c->t_last - c->t_first) / (c->n_timed - 1);
    }
}

/* ---- pieces -------------------------------------------------------------------------- */

static const char *openai_finish(zse_finish f)
{
    switch (f) {
    case ZSE_FINISH_STOP: return "stop";
    case ZSE_FINISH_LENGTH: return "length";
    case ZSE_FINISH_CANCELLED: return "abort";
    default: return "error";
    }
}

static bool is_eos(const srv_render *rd, int32_t t)
{
    for (int i = 0; i < rd->n_eos; i++)
        if (rd->eos[i] == t)
            return true;
    return false;
}

static const char *tgi_finish(const srv_render *rd, const srv_choice *c)
{
    if (c->finish == ZSE_FINISH_LENGTH)
        return "length";
    if (c->finish == ZSE_FINISH_STOP)
        return is_eos(rd, c->last_token) ? "eos_token" : "stop_sequence";
    return "error";
}

/* a token's text as logprobs show it: the token detokenized alone, U+FFFD where that
 * is not valid UTF-8 (jansson refuses it) */
static json_t *token_string(const srv_render *rd, int32_t id)
{
    return srv_token_text(rd->model, id);
}

/* The bytes the token adds to the text (a byte-level or <0xNN> token holding part of a
 * character gives that byte) */
static json_t *token_bytes(const srv_render *rd, int32_t id)
{
    size_t n = 0;
    uint8_t *b = zse_token_bytes(rd->model, id, &n);
    json_t *a = b ? json_array() : NULL;
    for (size_t i = 0; a && i < n; i++)
        if (json_array_append_new(a, json_integer(b[i])) != 0) {
            json_decref(a);
            a = NULL;
        }
    zse_free(b);
    return a;
}

/* whether the event carries a generated token (not the EOS that ended the sequence, nor
 * an end without a token) */
static bool carries_token(const srv_render *rd, const srv_event *ev)
{
    if (ev->token < 0)
        return false;
    return !(ev->finish == ZSE_FINISH_STOP && !ev->text[0] && is_eos(rd, ev->token));
}

/* chat: {"token","logprob","bytes","top_logprobs":[{"token","logprob","bytes"}]} */
static json_t *chat_logprob(const srv_render *rd, const srv_event *ev)
{
    json_t *top = json_array();
    for (int k = 0; top && k < ev->n_top; k++) {
        json_t *entry = json_pack("{s:o, s:f, s:o}", "token", token_string(rd, ev->top_ids[k]), "logprob",
                                  (double)ev->top_logprobs[k], "bytes", token_bytes(rd, ev->top_ids[k]));
        if (!entry || json_array_append_new(top, entry) != 0) {
            json_decref(top);
            return NULL;
        }
    }
    if (!top)
        return NULL;
    return json_pack("{s:o, s:f, s:o, s:o}", "token", token_string(rd, ev->token), "logprob", (double)ev->logprob,
                     "bytes", token_bytes(rd, ev->token), "top_logprobs", top);
}

/* completions: appends to the legacy {"tokens","token_logprobs","top_logprobs","text_offset"} */
static int completion_logprob(const srv_render *rd, const srv_event *ev, size_t offset, json_t *lp)
{
    json_t *tok = token_string(rd, ev->token);
    json_t *top = json_object();
    int rc = tok && top ? 0 : -1;
    for (int k = 0; rc == 0 && k < ev->n_top; k++) {
        json_t *t = token_string(rd, ev->top_ids[k]);
        rc = t ? json_object_set_new(top, json_string_value(t), json_real(ev->top_logprobs[k])) : -1;
        json_decref(t);
    }
    if (rc == 0)
        rc = json_array_append(json_object_get(lp, "tokens"), tok) == 0 &&
                     json_array_append_new(json_object_get(lp, "token_logprobs"), json_real(ev->logprob)) == 0 &&
                     json_array_append(json_object_get(lp, "top_logprobs"), top) == 0 &&
                     json_array_append_new(json_object_get(lp, "text_offset"), json_integer((json_int_t)offset)) == 0
                 ? 0
                 : -1;
    json_decref(tok);
    json_decref(top);
    return rc;
}

static json_t *empty_completion_logprobs(void)
{
    return json_pack("{s:[], s:[], s:[], s:[]}", "tokens", "token_logprobs", "top_logprobs", "text_offset");
}

/* TGI: {"id","text","logprob","special"}; LoRAX's return_k_alternatives adds
 * "alternative_tokens": [{"id","text","logprob"}] */
static json_t *tgi_token(const srv_render *rd, const srv_event *ev)
{
    json_t *t = json_pack("{s:i, s:s, s:f, s:b}", "id", (int)ev->token, "text", ev->text, "logprob",
                          (double)ev->logprob, "special", is_eos(rd, ev->token));
    int k = rd->req->k_alternatives < ev->n_top ? rd->req->k_alternatives : ev->n_top;
    json_t *alt = t && k > 0 ? json_array() : NULL;
    for (int i = 0; alt && i < k; i++) {
        json_t *a = json_pack("{s:i, s:o, s:f}", "id", (int)ev->top_ids[i], "text", token_string(rd, ev->top_ids[i]),
                              "logprob", (double)ev->top_logprobs[i]);
        if (!a || json_array_append_new(alt, a) != 0) {
            json_decref(alt);
            alt = NULL;
        }
    }
    if (t && k > 0 && (!alt || json_object_set_new(t, "alternative_tokens", alt) != 0)) {
        json_decref(t);
        return NULL;
    }
    return t;
}

/* TGI top_tokens of one generated token: [{"id","text","logprob","special"}] */
static json_t *tgi_top_tokens(const srv_render *rd, const srv_event *ev)
{
    json_t *list = json_array();
    for (int k = 0; list && k < ev->n_top && k < rd->req->top_n_tokens; k++) {
        json_t *t = json_pack("{s:i, s:o, s:f, s:b}", "id", (int)ev->top_ids[k], "text",
                              token_string(rd, ev->top_ids[k]), "logprob", (double)ev->top_logprobs[k], "special",
                              is_eos(rd, ev->top_ids[k]));
        if (!t || json_array_append_new(list, t) != 0) {
            json_decref(list);
            return NULL;
        }
    }
    return list;
}

static json_t *base_object(const srv_render *rd, const char *object)
{
    return json_pack("{s:s, s:s, s:I, s:s, s:s}", "id", rd->id, "object", object, "created", (json_int_t)rd->created,
                     "model", rd->model_id, "system_fingerprint", rd->fingerprint);
}

static json_t *usage_object(const srv_render *rd)
{
    srv_job_usage u;
    srv_render_usage(rd, &u);
    return json_pack("{s:i, s:i, s:i}", "prompt_tokens", u.prompt_tokens, "completion_tokens", u.completion_tokens,
                     "total_tokens", u.prompt_tokens + u.completion_tokens);
}

/* "data: JSON\n\n"; consumes obj */
static int sse(zse_buf *out, json_t *obj)
{
    char *s = obj ? json_dumps(obj, JSON_COMPACT) : NULL;
    json_decref(obj);
    if (!s)
        return zse_fail("out of memory formatting a stream event");
    int rc = zse_buf_puts(out, "data: ") || zse_buf_puts(out, s) || zse_buf_puts(out, "\n\n") ? -1 : 0;
    free(s);
    return rc;
}

/* a chat.completion.chunk / text_completion chunk holding one choice */
static json_t *chunk(const srv_render *rd, json_t *choice_obj)
{
    bool chat = rd->req->api == SRV_API_CHAT;
    json_t *o = base_object(rd, chat ? "chat.completion.chunk" : "text_completion");
    if (!o || !choice_obj || json_object_set_new(o, "choices", json_pack("[o]", choice_obj)) != 0) {
        json_decref(o);
        return NULL;
    }
    if (rd->req->include_usage)
        json_object_set_new(o, "usage", json_null());
    return o;
}

static json_t *chat_delta_choice(int index, json_t *delta, json_t *logprobs, const char *finish)
{
    return json_pack("{s:i, s:o, s:o, s:o}", "index", index, "delta", delta, "logprobs",
                     logprobs ? logprobs : json_null(), "finish_reason", finish ? json_string(finish) : json_null());
}

static json_t *completion_choice(int index, const char *text, size_t len, json_t *logprobs, const char *finish)
{
    return json_pack("{s:i, s:s#, s:o, s:o}", "index", index, "text", text, len, "logprobs",
                     logprobs ? logprobs : json_null(), "finish_reason", finish ? json_string(finish) : json_null());
}

/* echo text + the choice's text */
static int full_text(const srv_render *rd, const srv_choice *c, zse_buf *out)
{
    const char *echo = echo_of(rd, c->prompt);
    return zse_buf_puts(out, echo) || zse_buf_append(out, zse_buf_str((zse_buf *)&c->text), c->text.len) ? -1 : 0;
}

/* ---- streams ------------------------------------------------------------------------- */

int srv_render_start(srv_render *rd, zse_buf *out)
{
    for (int i = 0; i < rd->n_choices; i++) {
        if (rd->req->api == SRV_API_CHAT) {
            json_t *delta = json_pack("{s:s, s:s}", "role", "assistant", "content", "");
            if (sse(out, chunk(rd, chat_delta_choice(i, delta, NULL, NULL))))
                return -1;
        } else if (rd->req->api == SRV_API_COMPLETION && rd->req->echo && !rd->req->echo_logprobs) {
            const char *t = echo_of(rd, rd->choices[i].prompt);
            if (sse(out, chunk(rd, completion_choice(i, t, strlen(t), NULL, NULL))))
                return -1;
            rd->choices[i].text_offset = strlen(t);
        }
    }
    return 0;
}

/* ---- tool calls -----------------------------------------------------------------------
 * With tools (and tool_choice other than "none") a chat answer's text is parsed into
 * OpenAI tool_calls with the format settled by srv_structured_prepare: whole answers parse
 * the text once; streams feed each piece to a zse_tool_stream, which holds back text that
 * may begin a call marker and turns calls into deltas (id and name first, then argument
 * fragments), as the OpenAI SDK's and LangChain's stream accumulators expect.
 * parallel_tool_calls false keeps the first call only. */

static bool parsing_tools(const srv_render *rd)
{
    return rd->req->api == SRV_API_CHAT && rd->req->structured.tool_format != 0;
}

/* call ids: the same request id and choice give the same ids, choices differ */
static uint64_t tool_id_seed(const srv_render *rd, int choice)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (const char *p = rd->id; p && *p; p++)
        h = (h ^ (uint8_t)*p) * 1099511628211ull;
    return h ^ ((uint64_t)(choice + 1) * 0x9e3779b97f4a7c15ull);
}

/* the whole answer's message; *finish becomes "tool_calls" when the model ended after calls */
static json_t *tool_message(const srv_render *rd, int i, const char **finish)
{
    const srv_choice *c = &rd->choices[i];
    const char *text = zse_buf_str((zse_buf *)&c->text);
    zse_tool_result res;
    if (zse_tool_parse((zse_tool_format)rd->req->structured.tool_format, text, c->text.len, tool_id_seed(rd, i),
                       &res) != 0)
        return NULL;
    json_t *msg;
    if (res.n_calls == 0) {
        msg = json_pack("{s:s, s:s#}", "role", "assistant", "content", text, c->text.len);
    } else {
        json_t *calls = zse_tool_calls_json(&res);
        while (calls && !rd->req->structured.parallel && json_array_size(calls) > 1)
            json_array_remove(calls, json_array_size(calls) - 1);
        json_t *content = res.content ? json_stringn(res.content, strlen(res.content)) : json_null();
        msg = json_pack("{s:s, s:o, s:o}", "role", "assistant", "content", content, "tool_calls", calls);
        if (c->finish == ZSE_FINISH_STOP)
            *finish = "tool_calls";
    }
    zse_tool_result_free(&res);
    return msg;
}

/* {"tool_calls": [{"index", "id", "type", "function": {"name", "arguments"}}]}: id, type and
 * name on a call's first delta only */
static json_t *tool_call_delta(const zse_tool_delta *d)
{
    json_t *fn = json_pack("{s:s}", "arguments", d->text ? d->text : "");
    if (fn && d->name && json_object_set_new(fn, "name", json_string(d->name)) != 0) {
        json_decref(fn);
        return NULL;
    }
    json_t *call = json_pack("{s:i, s:o}", "index", d->index, "function", fn);
    if (call && d->id &&
        (json_object_set_new(call, "id", json_string(d->id)) || json_object_set_new(call, "type", json_string("function")))) {
        json_decref(call);
        return NULL;
    }
    return call ? json_pack("{s:[o]}", "tool_calls", call) : NULL;
}

/* one streamed event of a chat with tools; lp (taken) rides on the first chunk it makes */
static int stream_tool_event(srv_render *rd, const srv_event *ev, json_t *lp, zse_buf *out)
{
    srv_choice *c = &rd->choices[ev->choice];
    if (!c->tool_stream && !(c->tool_stream = zse_tool_stream_new((zse_tool_format)rd->req->structured.tool_format,
                                                                    tool_id_seed(rd, ev->choice)))) {
        json_decref(lp);
        return -1;
    }
    zse_tool_deltas d = {0};
    int rc = zse_tool_stream_push(c->tool_stream, ev->text, strlen(ev->text), &d);
    if (rc == 0 && ev->finish != ZSE_FINISH_NONE)
        rc = zse_tool_stream_finish(c->tool_stream, &d);
    for (int k = 0; rc == 0 && k < d.n; k++) {
        const zse_tool_delta *x = &d.d[k];
        json_t *delta;
        if (x->kind == ZSE_TOOL_DELTA_CONTENT) {
            if (!x->text || !*x->text)
                continue;
            delta = json_pack("{s:s}", "content", x->text);
        } else {
            if (!rd->req->structured.parallel && x->index > 0)
                continue;
            delta = tool_call_delta(x);
        }
        rc = sse(out, chunk(rd, chat_delta_choice(ev->choice, delta, lp, NULL)));
        lp = NULL;
    }
    if (rc == 0 && lp) {
        rc = sse(out, chunk(rd, chat_delta_choice(ev->choice, json_object(), lp, NULL)));
        lp = NULL;
    }
    json_decref(lp);
    zse_tool_deltas_free(&d);
    if (rc != 0 || ev->finish == ZSE_FINISH_NONE)
        return rc;
    const char *finish = openai_finish(ev->finish);
    if (ev->finish == ZSE_FINISH_STOP && zse_tool_stream_calls(c->tool_stream) > 0)
        finish = "tool_calls";
    return sse(out, chunk(rd, chat_delta_choice(ev->choice, json_object(), NULL, finish)));
}

static int stream_chat_event(srv_render *rd, const srv_event *ev, bool token, zse_buf *out)
{
    json_t *lp = NULL;
    if (rd->req->logprobs && token) {
        json_t *entry = chat_logprob(rd, ev);
        if (!entry || !(lp = json_pack("{s:[o]}", "content", entry)))
            return zse_fail("out of memory formatting logprobs");
    }
    if (parsing_tools(rd))
        return stream_tool_event(rd, ev, lp, out);
    if (ev->text[0] || lp) {
        json_t *delta = json_pack("{s:s}", "content", ev->text);
        if (sse(out, chunk(rd, chat_delta_choice(ev->choice, delta, lp, NULL))))
            return -1;
    }
    if (ev->finish != ZSE_FINISH_NONE)
        return sse(out, chunk(rd, chat_delta_choice(ev->choice, json_object(), NULL, openai_finish(ev->finish))));
    return 0;
}

static int stream_completion_event(srv_render *rd, const srv_event *ev, bool token, zse_buf *out)
{
    srv_choice *c = &rd->choices[ev->choice];
    json_t *lp = NULL;
    if (rd->req->logprobs && token) {
        lp = empty_completion_logprobs();
        if (!lp || completion_logprob(rd, ev, c->text_offset, lp)) {
            json_decref(lp);
            return zse_fail("out of memory formatting logprobs");
        }
    }
    size_t len = strlen(ev->text);
    c->text_offset += len;
    const char *finish = ev->finish != ZSE_FINISH_NONE ? openai_finish(ev->finish) : NULL;
    if (!len && !lp && !finish)
        return 0;
    return sse(out, chunk(rd, completion_choice(ev->choice, ev->text, len, lp, finish)));
}

static json_t *tgi_details(const srv_render *rd, const srv_choice *c, bool with_tokens)
{
    const srv_request *req = rd->req;
    /* prompt_tokens: LoRAX's details carry it (its client requires it; TGI's ignore it) */
    uint64_t seed = req->sampling.seed + (uint64_t)((c - rd->choices) % req->n); /* as the choice drew */
    json_t *d = json_pack("{s:s, s:I, s:i, s:o}", "finish_reason", tgi_finish(rd, c), "prompt_tokens",
                          (json_int_t)req->prompts[c->prompt].n_ids, "generated_tokens", c->completion_tokens, "seed",
                          req->sampling.temperature > 0 ? json_integer((json_int_t)seed) : json_null());
    if (d && with_tokens) {
        json_object_set_new(d, "prefill", c->prompt_lp ? json_incref(c->prompt_lp) : json_array());
        json_object_set_new(d, "tokens", c->logprobs ? json_incref(c->logprobs) : json_array());
        if (req->top_n_tokens > 0)
            json_object_set_new(d, "top_tokens", c->top_tokens ? json_incref(c->top_tokens) : json_array());
    }
    return d;
}

static int stream_tgi_event(srv_render *rd, const srv_event *ev, zse_buf *out)
{
    if (ev->token < 0 && ev->finish == ZSE_FINISH_NONE)
        return 0;
    srv_choice *c = &rd->choices[ev->choice];
    bool final = ev->finish != ZSE_FINISH_NONE;
    json_t *o = json_pack("{s:i, s:o, s:n, s:n}", "index", c->completion_tokens, "token",
                          ev->token >= 0 ? tgi_token(rd, ev) : json_null(), "generated_text", "details");
    if (o && rd->req->top_n_tokens > 0 && ev->token >= 0)
        json_object_set_new(o, "top_tokens", tgi_top_tokens(rd, ev));
    if (o && final) {
        zse_buf full = {0};
        if (full_text(rd, c, &full) == 0)
            json_object_set_new(o, "generated_text", json_stringn(zse_buf_str(&full), full.len));
        zse_buf_free(&full);
        if (rd->req->details)
            json_object_set_new(o, "details", tgi_details(rd, c, false));
    }
    return sse(out, o);
}

/* ---- events -------------------------------------------------------------------------- */

/* the prompt's logprobs, on a choice's first event: the legacy echo entries (streamed with
 * the echo text), vLLM's prompt_logprobs or TGI's prefill */
static int render_prompt_logprobs(srv_render *rd, srv_choice *c, const srv_event *ev, zse_buf *out)
{
    const srv_request *req = rd->req;
    const srv_prompt *p = &req->prompts[c->prompt];
    int n_top = req->sampling.prompt_top_logprobs;
    if (req->api == SRV_API_TGI) {
        if (!c->prompt_lp && !(c->prompt_lp = srv_score_tgi_prefill(rd->model, p, ev->prompt_lp, ev->n_prompt_lp)))
            return -1;
        return 0;
    }
    if (req->prompt_logprobs && !c->prompt_lp &&
        !(c->prompt_lp = srv_score_vllm(rd->model, p, ev->prompt_lp, ev->n_prompt_lp, req->prompt_logprobs - 1)))
        return -1;
    if (!req->echo_logprobs || req->api != SRV_API_COMPLETION)
        return 0;
    json_t *legacy = empty_completion_logprobs();
    size_t offset = 0;
    if (!legacy || srv_score_legacy(rd->model, p, ev->prompt_lp, ev->n_prompt_lp, req->logprobs - 1 < n_top ?
                                    req->logprobs - 1 : n_top, legacy, &offset) != 0) {
        json_decref(legacy);
        return -1;
    }
    const char *echo = echo_of(rd, c->prompt);
    c->text_offset = strlen(echo); /* offsets of generated tokens count the echoed prompt */
    if (req->stream)
        return sse(out, chunk(rd, completion_choice(ev->choice, echo, strlen(echo), legacy, NULL)));
    json_decref(c->logprobs);
    c->logprobs = legacy;
    return 0;
}

/* TGI whole answers: the alternatives of each generated token */
static int tgi_keep_top(const srv_render *rd, srv_choice *c, const srv_event *ev)
{
    if (!c->top_tokens && !(c->top_tokens = json_array()))
        return -1;
    json_t *top = tgi_top_tokens(rd, ev);
    return top ? json_array_append_new(c->top_tokens, top) : -1;
}

int srv_render_event(srv_render *rd, const srv_event *ev, zse_buf *out)
{
    const srv_request *req = rd->req;
    srv_choice *c = &rd->choices[ev->choice];
    bool token = carries_token(rd, ev);
    if (ev->prompt_lp && render_prompt_logprobs(rd, c, ev, out) != 0)
        return -1;
    if (token) {
        c->sum_logprob += ev->logprob;
        if (req->api == SRV_API_TGI && req->top_n_tokens > 0 && !req->stream && tgi_keep_top(rd, c, ev) != 0)
            return -1;
        c->completion_tokens++;
        if (c->n_timed++ == 0)
            c->t_first = ev->time;
        c->t_last = ev->time;
        if (rd->ttft < 0)
            rd->ttft = ev->time - rd->t_arrival;
    }
    if (ev->finish != ZSE_FINISH_NONE) {
        c->finished = true;
        c->finish = ev->finish;
        c->last_token = ev->token;
        if (ev->completion_tokens > c->completion_tokens)
            c->completion_tokens = ev->completion_tokens;
        rd->n_finished++;
    }
    /* whole text: non-streaming answers and TGI's final generated_text */
    if ((!req->stream || req->api == SRV_API_TGI) && zse_buf_puts(&c->text, ev->text))
        return -1;
    if (req->stream) {
        if (req->api == SRV_API_CHAT)
            return stream_chat_event(rd, ev, token, out);
        if (req->api == SRV_API_COMPLETION)
            return stream_completion_event(rd, ev, token, out);
        return stream_tgi_event(rd, ev, out);
    }
    if (!req->logprobs || !token)
        return 0;
    if (req->api == SRV_API_CHAT) {
        if (!c->logprobs && !(c->logprobs = json_array()))
            return -1;
        json_t *entry = chat_logprob(rd, ev);
        return entry ? json_array_append_new(c->logprobs, entry) : -1;
    }
    if (req->api == SRV_API_COMPLETION) {
        if (!c->logprobs) {
            if (!(c->logprobs = empty_completion_logprobs()))
                return -1;
            c->text_offset = strlen(echo_of(rd, c->prompt)); /* offsets count the echoed prompt too */
        }
        int rc = completion_logprob(rd, ev, c->text_offset, c->logprobs);
        c->text_offset += strlen(ev->text);
        return rc;
    }
    if (!c->logprobs && !(c->logprobs = json_array()))
        return -1;
    return json_array_append_new(c->logprobs, tgi_token(rd, ev));
}

void srv_render_end_missing(srv_render *rd)
{
    for (int i = 0; i < rd->n_choices; i++) {
        srv_choice *c = &rd->choices[i];
        if (!c->finished) {
            c->finished = true;
            c->finish = ZSE_FINISH_ERROR;
            rd->n_finished++;
        }
    }
}

static bool any_error(const srv_render *rd)
{
    for (int i = 0; i < rd->n_choices; i++)
        if (rd->choices[i].finish == ZSE_FINISH_ERROR)
            return true;
    return rd->failed;
}

int srv_render_tail(srv_render *rd, zse_buf *out)
{
    if (rd->req->api == SRV_API_TGI)
        return 0;
    if (any_error(rd)) {
        srv_error e;
        if (rd->overloaded)
            srv_error_set(&e, 503, "server_error", "overloaded", NULL,
                          "the engine could not take every sequence of this request; retry shortly");
        else
            srv_error_set(&e, 500, "server_error", NULL, NULL, "generation failed part-way; the output is incomplete%s%s",
                          rd->error[0] ? ": " : "", rd->error);
        char *s = srv_error_openai_json(&e);
        int rc = s ? zse_buf_printf(out, "data: %s\n\n", s) : -1;
        free(s);
        if (rc)
            return -1;
    }
    if (rd->req->include_usage) {
        json_t *o = base_object(rd, rd->req->api == SRV_API_CHAT ? "chat.completion.chunk" : "text_completion");
        if (!o || json_object_set_new(o, "choices", json_array()) ||
            json_object_set_new(o, "usage", usage_object(rd)) || sse(out, o))
            return -1;
    }
    return zse_buf_puts(out, "data: [DONE]\n\n");
}

/* ---- whole answers ------------------------------------------------------------------- */

/* the non-streaming answer: the API's object around `choices` (taken) and usage */
static json_t *whole_object(const srv_render *rd, const char *object, json_t *choices)
{
    json_t *o = base_object(rd, object);
    if (!o || !choices) {
        json_decref(o);
        json_decref(choices);
        return NULL;
    }
    /* json_object_set_new takes its value even when it fails */
    if (json_object_set_new(o, "choices", choices) || json_object_set_new(o, "usage", usage_object(rd))) {
        json_decref(o);
        return NULL;
    }
    return o;
}

static json_t *whole_chat(const srv_render *rd)
{
    json_t *choices = json_array();
    for (int i = 0; choices && i < rd->n_choices; i++) {
        srv_choice *c = &rd->choices[i];
        const char *finish = openai_finish(c->finish);
        json_t *msg = parsing_tools(rd) ? tool_message(rd, i, &finish)
                                        : json_pack("{s:s, s:s#}", "role", "assistant", "content", zse_buf_str(&c->text),
                                                    c->text.len);
        json_t *lp = rd->req->logprobs ? json_pack("{s:O}", "content", c->logprobs ? c->logprobs : json_array())
                                       : json_null();
        json_t *ch = json_pack("{s:i, s:o, s:o, s:s}", "index", i, "message", msg, "logprobs", lp, "finish_reason",
                               finish);
        if (!ch || json_array_append_new(choices, ch)) {
            json_decref(choices);
            return NULL;
        }
    }
    json_t *o = whole_object(rd, "chat.completion", choices);
    if (o && rd->req->prompt_logprobs) /* vLLM: one list for the request's one prompt */
        json_object_set_new(o, "prompt_logprobs", rd->choices[0].prompt_lp ? json_incref(rd->choices[0].prompt_lp)
                                                                           : json_null());
    return o;
}

static double mean_logprob(const srv_choice *c)
{
    return c->completion_tokens ? c->sum_logprob / c->completion_tokens : 0;
}

/* best_of: whether candidate i is among the n_answers of its prompt with the highest mean
 * logprob per token (ties: the lower index wins) */
static bool is_answered(const srv_render *rd, int i)
{
    const srv_request *req = rd->req;
    if (req->n_answers <= 0)
        return true;
    int first = i - i % req->n, better = 0;
    double mine = mean_logprob(&rd->choices[i]);
    for (int k = first; k < first + req->n; k++) {
        double theirs = mean_logprob(&rd->choices[k]);
        if (theirs > mine || (theirs == mine && k < i))
            better++;
    }
    return better < req->n_answers;
}

/* the choice index an answered candidate gets: prompt × n_answers + its place among the
 * answered ones of its prompt (in candidate order) */
static int answered_index(const srv_render *rd, int i)
{
    const srv_request *req = rd->req;
    if (req->n_answers <= 0)
        return i;
    int first = i - i % req->n, before = 0;
    for (int k = first; k < i; k++)
        before += is_answered(rd, k);
    return (i / req->n) * req->n_answers + before;
}

static json_t *whole_completion(const srv_render *rd)
{
    json_t *choices = json_array();
    for (int i = 0; choices && i < rd->n_choices; i++) {
        srv_choice *c = &rd->choices[i];
        if (!is_answered(rd, i))
            continue;
        int index = answered_index(rd, i);
        zse_buf text = {0};
        json_t *ch = NULL;
        if (full_text(rd, c, &text) == 0) {
            json_t *lp = rd->req->logprobs ? (c->logprobs ? json_incref(c->logprobs) : empty_completion_logprobs())
                                           : NULL;
            ch = completion_choice(index, zse_buf_str(&text), text.len, lp, openai_finish(c->finish));
            if (ch && rd->req->prompt_logprobs)
                json_object_set_new(ch, "prompt_logprobs", c->prompt_lp ? json_incref(c->prompt_lp) : json_null());
        }
        zse_buf_free(&text);
        if (!ch || json_array_append_new(choices, ch)) {
            json_decref(choices);
            return NULL;
        }
    }
    return whole_object(rd, "text_completion", choices);
}

/* best_of: the candidate with the highest total logprob (TGI's choice) */
static int tgi_best(const srv_render *rd)
{
    int best = 0;
    for (int i = 1; i < rd->n_choices; i++)
        if (rd->choices[i].sum_logprob > rd->choices[best].sum_logprob)
            best = i;
    return best;
}

/* TGI's BestOfSequence: a candidate that lost, with its text and details */
static json_t *tgi_best_of_sequence(const srv_render *rd, const srv_choice *c)
{
    zse_buf full = {0};
    json_t *d = full_text(rd, c, &full) == 0 ? tgi_details(rd, c, true) : NULL;
    if (d && json_object_set_new(d, "generated_text", json_stringn(zse_buf_str(&full), full.len)) != 0) {
        json_decref(d);
        d = NULL;
    }
    zse_buf_free(&full);
    if (d)
        json_object_del(d, "prompt_tokens");
    return d;
}

static json_t *whole_tgi(const srv_render *rd)
{
    int best = tgi_best(rd);
    srv_choice *c = &rd->choices[best];
    zse_buf full = {0};
    json_t *o = full_text(rd, c, &full) == 0 ? json_pack("{s:s#}", "generated_text", zse_buf_str(&full), full.len)
                                             : NULL;
    zse_buf_free(&full);
    if (!o || !rd->req->details)
        return o;
    json_t *d = tgi_details(rd, c, true);
    if (d && rd->n_choices > 1) {
        json_t *others = json_array();
        for (int i = 0; others && i < rd->n_choices; i++)
            if (i != best && json_array_append_new(others, tgi_best_of_sequence(rd, &rd->choices[i])) != 0) {
                json_decref(others);
                others = NULL;
            }
        if (!others || json_object_set_new(d, "best_of_sequences", others) != 0) {
            json_decref(d);
            d = NULL;
        }
    }
    if (!d || json_object_set_new(o, "details", d) != 0) {
        json_decref(o);
        return NULL;
    }
    return o;
}

static bool any_token(const srv_render *rd)
{
    for (int i = 0; i < rd->n_choices; i++)
        if (rd->choices[i].completion_tokens > 0)
            return true;
    return false;
}

int srv_render_whole(srv_render *rd, zse_buf *out, int *status, int *retry_after)
{
    *status = 200;
    *retry_after = 0;
    bool tgi = rd->req->api == SRV_API_TGI;
    if (any_error(rd)) {
        srv_error e;
        if (rd->overloaded && !any_token(rd)) {
            srv_error_set(&e, 503, "server_error", "overloaded", NULL,
                          "the server cannot take this request now (%s); retry shortly", rd->overload_reason);
            *retry_after = e.retry_after = 1;
        } else {
            srv_error_set(&e, 500, "server_error", NULL, NULL, "generation failed; nothing was produced%s%s",
                          rd->error[0] ? ": " : "", rd->error);
        }
        char *s = tgi ? srv_error_tgi_json(&e) : srv_error_openai_json(&e);
        int rc = s ? zse_buf_puts(out, s) : -1;
        free(s);
        *status = e.status;
        return rc;
    }
    json_t *o = rd->req->api == SRV_API_CHAT         ? whole_chat(rd)
                : rd->req->api == SRV_API_COMPLETION ? whole_completion(rd)
                                                     : whole_tgi(rd);
    char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (!s) {
        *status = 500;
        return zse_fail("out of memory formatting the response");
    }
    int rc = zse_buf_puts(out, s);
    free(s);
    if (rc)
        *status = 500;
    return rc;
}
