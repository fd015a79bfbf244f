/* Request bodies → srv_request: JSON parsed with jansson, every field checked for type and
 * range, errors naming the field the way OpenAI does ("messages[2].content"). Every object
 * the server reads has its list of fields (srv_check_fields): a field it does not know is a
 * 400 naming the field and the route, never silently dropped. null is "not given".
 *
 * Three shapes: OpenAI chat completions, OpenAI (legacy) completions, and TGI's
 * {"inputs", "parameters"}. */
#include "server/server.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>

#define MAX_CHOICES SRV_MAX_CHOICES
#define MAX_SEQUENCES 64        /* prompts × n per request */
#define MAX_STOP SRV_MAX_STOP
#define MAX_STOP_BYTES 256
#define MAX_TOP_LOGPROBS 20
#define MAX_COMPLETION_LOGPROBS 5
#define COMPLETIONS_DEFAULT_MAX_TOKENS 16   /* OpenAI's default for /v1/completions */
#define TGI_DEFAULT_MAX_NEW_TOKENS 100      /* TGI's default */

/* ---- typed field access: null counts as absent; errors name the field ------------------- */

static int get_number(json_t *obj, const char *key, double lo, double hi, double *out, bool *present,
                      srv_error *e)
{
    json_t *v = json_object_get(obj, key);
    *present = v && !json_is_null(v);
    if (!*present)
        return 0;
    if (!json_is_number(v))
        return srv_error_invalid(e, key, "'%s' must be a number", key);
    double x = json_number_value(v);
    if (!(x >= lo && x <= hi))
        return srv_error_invalid(e, key, "'%s' must be between %g and %g, not %g", key, lo, hi, x);
    *out = x;
    return 0;
}

static int get_int(json_t *obj, const char *key, long long lo, long long hi, long long *out, bool *present,
                   srv_error *e)
{
    json_t *v = json_object_get(obj, key);
    *present = v && !json_is_null(v);
    if (!*present)
        return 0;
    if (!json_is_integer(v))
        return srv_error_invalid(e, key, "'%s' must be an integer", key);
    long long x = json_integer_value(v);
    if (x < lo || x > hi)
        return srv_error_invalid(e, key, "'%s' must be between %lld and %lld, not %lld", key, lo, hi, x);
    *out = x;
    return 0;
}

static int get_bool(json_t *obj, const char *key, bool *out, srv_error *e)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_boolean(v))
        return srv_error_invalid(e, key, "'%s' must be true or false", key);
    *out = json_is_true(v);
    return 0;
}

/* optional string; *out stays NULL when absent */
static int get_string(json_t *obj, const char *key, const char **out, srv_error *e)
{
    json_t *v = json_object_get(obj, key);
    *out = NULL;
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_string(v))
        return srv_error_invalid(e, key, "'%s' must be a string", key);
    *out = json_string_value(v);
    return 0;
}

static int oom(srv_error *e)
{
    return srv_error_set(e, 500, "server_error", NULL, NULL, "out of memory reading the request");
}

/* ---- the fields a route takes ------------------------------------------------------------ */

const char *srv_api_route(srv_api api)
{
    return api == SRV_API_CHAT ? "/v1/chat/completions" : api == SRV_API_COMPLETION ? "/v1/completions"
                                                                                   : "/generate (and / and /generate_stream)";
}

static bool field_listed(const char *const *allowed, const char *key)
{
    for (; *allowed; allowed++)
        if (strcmp(*allowed, key) == 0)
            return true;
    return false;
}

int srv_check_fields(json_t *obj, const char *const *allowed, const char *where, const char *route, srv_error *e)
{
    if (!json_is_object(obj))
        return 0;
    const char *key;
    json_t *v;
    json_object_foreach(obj, key, v) {
        if (field_listed(allowed, key))
            continue;
        char clean[64], param[96];
        srv_text_clean(clean, sizeof clean, key, strlen(key), SRV_TEXT_ESCAPE_CONTROLS);
        snprintf(param, sizeof param, "%s%s%s", where, *where ? "." : "", clean);
        /* a short list is named in the message; a long one (chat's) is in docs/SERVER.md */
        zse_buf list = {0};
        for (size_t i = 0; allowed[i] && list.len < 200; i++)
            zse_buf_printf(&list, "%s%s", i ? ", " : "", allowed[i]);
        int rc = list.len < 200 && list.data
                     ? srv_error_invalid(e, param, "unsupported field '%s' for %s; remove it (%s takes: %s)", param,
                                         route, *where ? where : "it", zse_buf_str(&list))
                     : srv_error_invalid(e, param, "unsupported field '%s' for %s; remove it (docs/SERVER.md lists "
                                                   "the fields it takes)", param, route);
        zse_buf_free(&list);
        return rc;
    }
    return 0;
}

static bool has_nul(json_t *s)
{
    return strlen(json_string_value(s)) != json_string_length(s);
}

/* ---- sampling fields shared by chat and completions ------------------------------------ */

static int parse_stop(json_t *body, const char *key, srv_request *r, srv_error *e)
{
    json_t *v = json_object_get(body, key);
    if (!v || json_is_null(v))
        return 0;
    json_t *one = json_is_string(v) ? v : NULL;
    size_t n = one ? 1 : json_is_array(v) ? json_array_size(v) : 0;
    if (!one && !json_is_array(v))
        return srv_error_invalid(e, key, "'%s' must be a string or a list of strings", key);
    if (n > MAX_STOP)
        return srv_error_invalid(e, key, "'%s' may hold at most %d strings, not %zu", key, MAX_STOP, n);
    if (n == 0)
        return 0;
    r->stop = zse_calloc(n, sizeof *r->stop);
    if (!r->stop)
        return oom(e);
    for (size_t i = 0; i < n; i++) {
        json_t *s = one ? one : json_array_get(v, i);
        char param[64];
        snprintf(param, sizeof param, one ? "%s" : "%s[%zu]", key, i);
        if (!json_is_string(s))
            return srv_error_invalid(e, param, "'%s' must be a string", param);
        size_t len = json_string_length(s);
        if (len == 0 || len > MAX_STOP_BYTES || has_nul(s))
            return srv_error_invalid(e, param, "'%s' must be 1 to %d bytes without NUL", param, MAX_STOP_BYTES);
        if (!(r->stop[r->n_stop++] = zse_strdup(json_string_value(s))))
            return oom(e);
    }
    return 0;
}

static int parse_logit_bias(json_t *body, int vocab, srv_request *r, srv_error *e)
{
    json_t *v = json_object_get(body, "logit_bias");
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_object(v))
        return srv_error_invalid(e, "logit_bias", "'logit_bias' must map token ids to numbers");
    size_t n = json_object_size(v);
    if (n == 0)
        return 0;
    if (n > 1024)
        return srv_error_invalid(e, "logit_bias", "'logit_bias' may hold at most 1024 tokens");
    r->bias = zse_calloc(n, sizeof *r->bias);
    if (!r->bias)
        return oom(e);
    const char *k;
    json_t *x;
    json_object_foreach(v, k, x) {
        int64_t id;
        if (!zse_parse_i64(k, &id) || id < 0 || id >= vocab)
            return srv_error_invalid(e, "logit_bias", "logit_bias key '%s' is not a token id (0 to %d)", k, vocab - 1);
        if (!json_is_number(x) || json_number_value(x) < -100 || json_number_value(x) > 100)
            return srv_error_invalid(e, "logit_bias", "logit_bias of token %s must be a number from -100 to 100", k);
        r->bias[r->n_bias].id = (int32_t)id;
        r->bias[r->n_bias].bias = (float)json_number_value(x);
        r->n_bias++;
    }
    return 0;
}

static uint64_t random_seed(void)
{
    uint64_t s = 0;
    if (getrandom(&s, sizeof s, 0) != (ssize_t)sizeof s)
        s = (uint64_t)(zse_now() * 1e9);
    return s;
}

/* vLLM's prompt_logprobs: N alternatives for every prompt token (0: the token's own) */
static int parse_prompt_logprobs(json_t *body, srv_request *r, srv_error *e)
{
    long long i = 0;
    bool have;
    if (get_int(body, "prompt_logprobs", 0, MAX_TOP_LOGPROBS, &i, &have, e))
        return -1;
    if (!have)
        return 0;
    if (r->stream) /* vLLM's rule too: the list would have no chunk to go in */
        return srv_error_invalid(e, "prompt_logprobs", "'prompt_logprobs' is not available when 'stream' is true");
    r->prompt_logprobs = 1 + (int)i;
    r->sampling.prompt_logprobs = true;
    if (r->sampling.prompt_top_logprobs < (int)i)
        r->sampling.prompt_top_logprobs = (int)i;
    return 0;
}

/* temperature, top_p, penalties, seed, stop, logit_bias, and the vLLM-style extras
 * (top_k, min_p, repetition_penalty, ignore_eos, priority) */
static int parse_sampling(json_t *body, const srv_model_facts *mf, srv_request *r, srv_error *e)
{
    zse_sampling *s = &r->sampling;
    double x;
    long long i = 0;
    bool have;
    if (get_number(body, "temperature", 0, 2, &x, &have, e))
        return -1;
    if (have)
        s->temperature = (float)x;
    if (get_number(body, "top_p", 0, 1, &x, &have, e))
        return -1;
    if (have) {
        s->top_p = (float)x;
        if (x == 0) /* only the most likely token survives */
            s->temperature = 0;
    }
    if (get_number(body, "presence_penalty", -2, 2, &x, &have, e))
        return -1;
    if (have)
        s->presence_penalty = (float)x;
    if (get_number(body, "frequency_penalty", -2, 2, &x, &have, e))
        return -1;
    if (have)
        s->frequency_penalty = (float)x;
    if (get_number(body, "repetition_penalty", 0.01, 10, &x, &have, e))
        return -1;
    if (have)
        s->repetition_penalty = (float)x;
    if (get_number(body, "min_p", 0, 1, &x, &have, e))
        return -1;
    if (have)
        s->min_p = (float)x;
    if (get_int(body, "top_k", -1, mf->vocab_size, &i, &have, e))
        return -1;
    if (have)
        s->top_k = i > 0 ? (int)i : 0;
    if (get_int(body, "seed", LLONG_MIN, LLONG_MAX, &i, &r->has_seed, e))
        return -1;
    s->seed = r->has_seed ? (uint64_t)i : random_seed();
    if (get_bool(body, "ignore_eos", &s->ignore_eos, e))
        return -1;
    if (get_int(body, "priority", SRV_PRIORITY_MIN, SRV_PRIORITY_MAX, &i, &r->has_priority, e))
        return -1;
    if (r->has_priority)
        r->priority = (int)i;
    if (get_int(body, "min_tokens", 0, INT_MAX, &i, &have, e))
        return -1;
    if (have)
        s->min_tokens = (int)i;
    if (parse_stop(body, "stop", r, e) || parse_logit_bias(body, mf->vocab_size, r, e) || parse_prompt_logprobs(body, r, e))
        return -1;
    const char *user;
    if (get_string(body, "user", &user, e))
        return -1;
    if (user && !(r->user = zse_strdup(user)))
        return oom(e);
    return 0;
}

static int parse_max_tokens(json_t *body, const char *key, srv_request *r, srv_error *e)
{
    long long i = 0;
    bool have;
    if (get_int(body, key, 1, INT_MAX, &i, &have, e))
        return -1;
    if (have)
        r->max_tokens = (int)i;
    return 0;
}

static int parse_n(json_t *body, srv_request *r, srv_error *e)
{
    long long i = 0;
    bool have;
    r->n = 1;
    if (get_int(body, "n", 1, MAX_CHOICES, &i, &have, e))
        return -1;
    if (have)
        r->n = (int)i;
    return 0;
}

static int parse_stream(json_t *body, const char *route, srv_request *r, srv_error *e)
{
    static const char *const options[] = {"include_usage", NULL};
    if (get_bool(body, "stream", &r->stream, e))
        return -1;
    json_t *so = json_object_get(body, "stream_options");
    if (!so || json_is_null(so))
        return 0;
    if (!r->stream)
        return srv_error_invalid(e, "stream_options", "'stream_options' is only allowed when 'stream' is true");
    if (!json_is_object(so))
        return srv_error_invalid(e, "stream_options", "'stream_options' must be an object");
    if (srv_check_fields(so, options, "stream_options", route, e))
        return -1;
    json_t *iu = json_object_get(so, "include_usage");
    if (iu && !json_is_null(iu) && !json_is_boolean(iu))
        return srv_error_invalid(e, "stream_options.include_usage", "'stream_options.include_usage' must be true or false");
    r->include_usage = json_is_true(iu);
    return 0;
}

bool srv_model_name_is(const srv_model_facts *mf, const char *name)
{
    if (!name)
        return false;
    if (mf->name && strcmp(name, mf->name) == 0)
        return true;
    for (int i = 0; i < mf->n_aliases; i++)
        if (mf->aliases[i] && strcmp(name, mf->aliases[i]) == 0)
            return true;
    return false;
}

/* the model field: required, and it must be the model this server serves */
static int parse_model(json_t *body, const srv_model_facts *mf, srv_request *r, srv_error *e)
{
    const char *model;
    if (get_string(body, "model", &model, e))
        return -1;
    if (!model)
        return srv_error_invalid(e, "model", "you must provide a model parameter ('%s' is served here)", mf->name);
    const bool base = srv_model_name_is(mf, model);
    if (!base && !mf->adapters)
        return srv_error_set(e, 404, "invalid_request_error", "model_not_found", "model",
                             "The model '%s' does not exist; this server serves '%s'", model, mf->name);
    r->model = zse_strdup(model);
    if (!base && r->model && !(r->adapter_id = zse_strdup(model))) /* a LoRA adapter's name */
        return oom(e);
    return r->model ? 0 : oom(e);
}

/* ---- chat messages ------------------------------------------------------------------- */

/* content: a string, null, or a list of {"type":"text","text":...} parts joined by "\n" */
static int message_text(json_t *content, size_t mi, const char *route, zse_buf *out, bool *is_null, srv_error *e)
{
    static const char *const part_fields[] = {"type", "text", NULL};
    char param[64];
    snprintf(param, sizeof param, "messages[%zu].content", mi);
    *is_null = !content || json_is_null(content);
    if (*is_null)
        return 0;
    if (json_is_string(content)) {
        if (has_nul(content))
            return srv_error_invalid(e, param, "'%s' must not contain NUL characters", param);
        return zse_buf_append(out, json_string_value(content), json_string_length(content)) ? oom(e) : 0;
    }
    if (!json_is_array(content))
        return srv_error_invalid(e, param, "'%s' must be a string or a list of content parts", param);
    size_t j;
    json_t *part;
    json_array_foreach(content, j, part) {
        char pp[104];
        snprintf(pp, sizeof pp, "%s[%zu]", param, j);
        const char *type = json_string_value(json_object_get(part, "type"));
        if (!json_is_object(part) || !type)
            return srv_error_invalid(e, pp, "'%s' must be an object with a 'type'", pp);
        if (strcmp(type, "text") != 0)
            return srv_error_invalid(e, pp, "content part type '%s' in '%s' is not supported (this model reads text)",
                                     type, pp);
        if (srv_check_fields(part, part_fields, pp, route, e))
            return -1;
        json_t *text = json_object_get(part, "text");
        if (!json_is_string(text) || has_nul(text))
            return srv_error_invalid(e, pp, "'%s.text' must be a string", pp);
        if ((j > 0 && zse_buf_puts(out, "\n")) || zse_buf_append(out, json_string_value(text), json_string_length(text)))
            return oom(e);
    }
    return 0;
}

/* OpenAI's assistant fields a client replaying a conversation may carry: only null (not
 * given) is taken, since no template reads them */
static int check_assistant_extras(json_t *m, const char *param, srv_error *e)
{
    static const char *const extras[] = {"refusal", "audio", "function_call"};
    for (size_t k = 0; k < sizeof extras / sizeof extras[0]; k++) {
        json_t *v = json_object_get(m, extras[k]);
        if (v && !json_is_null(v)) {
            char p[96];
            snprintf(p, sizeof p, "%s.%s", param, extras[k]);
            return srv_error_invalid(e, p, "'%s' is not supported in messages (the chat template cannot show it); "
                                           "leave it out or null%s", p,
                                     k == 2 ? " and send the call in 'tool_calls'" : "");
        }
    }
    return 0;
}

/* one message, rebuilt with only what templates read: role, content (a string), name,
 * tool_calls, tool_call_id; any other field is refused */
static json_t *normalize_message(json_t *m, size_t i, const char *route, srv_error *e)
{
    static const char *const fields[] = {"role", "content", "name", "tool_calls", "tool_call_id",
                                         "refusal", "audio", "function_call", NULL};
    char param[64];
    snprintf(param, sizeof param, "messages[%zu]", i);
    if (!json_is_object(m))
        return srv_error_invalid(e, param, "'%s' must be an object with 'role' and 'content'", param), NULL;
    if (srv_check_fields(m, fields, param, route, e) || check_assistant_extras(m, param, e))
        return NULL;
    const char *role = json_string_value(json_object_get(m, "role"));
    snprintf(param, sizeof param, "messages[%zu].role", i);
    if (!role)
        return srv_error_invalid(e, param, "'%s' is required", param), NULL;
    bool known = !strcmp(role, "system") || !strcmp(role, "user") || !strcmp(role, "assistant") ||
                 !strcmp(role, "tool") || !strcmp(role, "developer");
    if (!known)
        return srv_error_invalid(e, param, "'%s' must be system, developer, user, assistant or tool, not '%s'",
                                 param, role), NULL;
    zse_buf text = {0};
    bool is_null;
    if (message_text(json_object_get(m, "content"), i, route, &text, &is_null, e)) {
        zse_buf_free(&text);
        return NULL;
    }
    json_t *tool_calls = json_object_get(m, "tool_calls");
    bool has_calls = json_is_array(tool_calls) && json_array_size(tool_calls) > 0;
    if (is_null && !(strcmp(role, "assistant") == 0 && has_calls)) {
        zse_buf_free(&text);
        snprintf(param, sizeof param, "messages[%zu].content", i);
        return srv_error_invalid(e, param, "'%s' is required", param), NULL;
    }
    /* "developer" is what newer SDKs send for system instructions; templates know "system" */
    json_t *out = json_pack("{s:s, s:s#}", "role", strcmp(role, "developer") == 0 ? "system" : role, "content",
                            zse_buf_str(&text), text.len);
    zse_buf_free(&text);
    if (!out)
        return oom(e), NULL;
    static const char *const keep[] = {"name", "tool_call_id"};
    for (size_t k = 0; k < sizeof keep / sizeof keep[0]; k++) {
        json_t *v = json_object_get(m, keep[k]);
        if (v && !json_is_null(v) && json_object_set(out, keep[k], v) != 0) {
            json_decref(out);
            return oom(e), NULL;
        }
    }
    if (tool_calls && !json_is_null(tool_calls)) {
        json_t *calls = srv_template_tool_calls(tool_calls, i, e);
        if (!calls) {
            json_decref(out);
            return NULL;
        }
        if (json_object_set_new(out, "tool_calls", calls) != 0) {
            json_decref(out);
            return oom(e), NULL;
        }
    }
    return out;
}

static int parse_messages(json_t *body, const char *route, srv_request *r, srv_error *e)
{
    json_t *msgs = json_object_get(body, "messages");
    if (!msgs || json_is_null(msgs))
        return srv_error_invalid(e, "messages", "'messages' is required");
    if (!json_is_array(msgs) || json_array_size(msgs) == 0)
        return srv_error_invalid(e, "messages", "'messages' must be a non-empty list");
    if (!(r->messages = json_array()))
        return oom(e);
    size_t i;
    json_t *m;
    json_array_foreach(msgs, i, m) {
        json_t *nm = normalize_message(m, i, route, e);
        if (!nm || json_array_append_new(r->messages, nm) != 0)
            return nm ? oom(e) : -1;
    }
    json_t *tools = json_object_get(body, "tools");
    if (tools && !json_is_null(tools)) {
        if (!json_is_array(tools))
            return srv_error_invalid(e, "tools", "'tools' must be a list");
        if (json_array_size(tools) && !(r->template_extra = json_pack("{s:O}", "tools", tools)))
            return oom(e);
    }
    return 0;
}

/* add_generation_prompt (default true), continue_final_message (the last message must be
 * the assistant's, left open), chat_template_kwargs (further template variables, e.g.
 * enable_thinking; they never replace messages, tools or add_generation_prompt) */
static int parse_template_options(json_t *body, srv_request *r, srv_error *e)
{
    r->add_generation_prompt = true;
    if (get_bool(body, "add_generation_prompt", &r->add_generation_prompt, e) ||
        get_bool(body, "continue_final_message", &r->continue_final_message, e))
        return -1;
    if (r->continue_final_message && r->add_generation_prompt) {
        json_t *agp = json_object_get(body, "add_generation_prompt");
        if (json_is_true(agp))
            return srv_error_invalid(e, "continue_final_message", "'continue_final_message' and "
                                     "'add_generation_prompt' cannot both be true");
        r->add_generation_prompt = false; /* continuing the last message opens no new one */
    }
    if (r->continue_final_message) {
        json_t *last = json_array_get(r->messages, json_array_size(r->messages) - 1);
        if (strcmp(json_string_value(json_object_get(last, "role")), "assistant") != 0)
            return srv_error_invalid(e, "continue_final_message", "'continue_final_message' needs the last "
                                     "message to be the assistant's");
    }
    json_t *kw = json_object_get(body, "chat_template_kwargs");
    if (!kw || json_is_null(kw))
        return 0;
    if (!json_is_object(kw))
        return srv_error_invalid(e, "chat_template_kwargs", "'chat_template_kwargs' must be an object");
    static const char *const reserved[] = {"messages", "tools", "add_generation_prompt"};
    for (size_t k = 0; k < sizeof reserved / sizeof reserved[0]; k++)
        if (json_object_get(kw, reserved[k]))
            return srv_error_invalid(e, "chat_template_kwargs", "'chat_template_kwargs' must not set '%s' (use "
                                     "the request field of that name)", reserved[k]);
    if (!r->template_extra && !(r->template_extra = json_object()))
        return oom(e);
    return json_object_update(r->template_extra, kw) == 0 ? 0 : oom(e);
}

int srv_request_parse_messages(json_t *body, const char *route, srv_request *r, srv_error *e)
{
    return parse_messages(body, route, r, e) || parse_template_options(body, r, e) ? -1 : 0;
}

static int parse_chat_logprobs(json_t *body, srv_request *r, srv_error *e)
{
    bool lp = false;
    long long top = 0;
    bool have;
    if (get_bool(body, "logprobs", &lp, e) || get_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, &top, &have, e))
        return -1;
    if (have && !lp)
        return srv_error_invalid(e, "top_logprobs", "'top_logprobs' needs 'logprobs' set to true");
    r->logprobs = lp ? 1 : 0;
    r->sampling.logprobs = lp;
    r->sampling.top_logprobs = (int)top;
    return 0;
}

/* the fields shared by chat and completions: sampling (parse_sampling), the vLLM extras,
 * streaming, and structured output (structured.c) */
#define SAMPLING_FIELDS                                                                                   \
    "model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "presence_penalty",               \
        "frequency_penalty", "logit_bias", "logprobs", "stream", "stream_options", "user", "top_k", "min_p", \
        "repetition_penalty", "ignore_eos", "priority", "min_tokens", "prompt_logprobs"
#define STRUCTURED_FIELDS                                                                               \
    "response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",               \
        "guided_structural_tag", "guided_whitespace_pattern", "guided_decoding_backend", "guided_backend", \
        "structured_outputs"

static const char *const CHAT_FIELDS[] = {
    SAMPLING_FIELDS, STRUCTURED_FIELDS, "messages", "max_completion_tokens", "top_logprobs", "store", "metadata",
    "service_tier", "add_generation_prompt", "continue_final_message", "chat_template_kwargs", "tools",
    "tool_choice", "parallel_tool_calls", "functions", "function_call", NULL};

static const char *const COMPLETION_FIELDS[] = {SAMPLING_FIELDS, STRUCTURED_FIELDS, "prompt", "echo", "best_of",
                                                "suffix", NULL};

/* OpenAI's chat fields that only label a request for OpenAI's own keeping: store (false: this
 * server keeps no completions, so false is what happens; true is refused), metadata (kept
 * only with stored completions: refused), service_tier ("auto" and "default" are the one way
 * this server runs requests; the paid tiers are refused) */
static int parse_openai_keeping(json_t *body, srv_error *e)
{
    bool store = false;
    if (get_bool(body, "store", &store, e))
        return -1;
    if (store)
        return srv_error_invalid(e, "store", "'store': true is not supported: this server keeps no completions "
                                             "(send false or leave it out)");
    json_t *md = json_object_get(body, "metadata");
    if (md && !json_is_null(md))
        return srv_error_invalid(e, "metadata", "'metadata' is not supported: OpenAI keeps it with stored "
                                                "completions, and this server stores none (leave it out)");
    const char *tier;
    if (get_string(body, "service_tier", &tier, e))
        return -1;
    if (tier && strcmp(tier, "auto") != 0 && strcmp(tier, "default") != 0)
        return srv_error_invalid(e, "service_tier", "'service_tier' '%s' is not supported: this server has one "
                                                    "tier (\"auto\" or \"default\")", tier);
    return 0;
}

static int parse_chat(json_t *body, const srv_model_facts *mf, srv_request *r, srv_error *e)
{
    const char *route = srv_api_route(SRV_API_CHAT);
    if (srv_check_fields(body, CHAT_FIELDS, "", route, e) || parse_openai_keeping(body, e))
        return -1;
    if (parse_model(body, mf, r, e) || srv_request_parse_messages(body, route, r, e) || parse_stream(body, route, r, e) ||
        parse_n(body, r, e) || parse_sampling(body, mf, r, e) || parse_chat_logprobs(body, r, e) ||
        parse_max_tokens(body, "max_tokens", r, e) || parse_max_tokens(body, "max_completion_tokens", r, e) ||
        srv_structured_parse(body, r, e))
        return -1;
    r->prompts = zse_calloc(1, sizeof *r->prompts);
    if (!r->prompts)
        return oom(e);
    r->n_prompts = 1;
    return 0;
}

/* ---- completions --------------------------------------------------------------------- */

static int ids_from_array(json_t *arr, int vocab, const char *param, srv_prompt *p, srv_error *e)
{
    size_t n = json_array_size(arr);
    if (n == 0)
        return srv_error_invalid(e, param, "'%s' must not be empty", param);
    p->ids = zse_malloc(n * sizeof *p->ids);
    if (!p->ids)
        return oom(e);
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(arr, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= vocab)
            return srv_error_invalid(e, param, "'%s' holds something that is not a token id (0 to %d) at %zu", param,
                                     vocab - 1, i);
        p->ids[i] = (int32_t)json_integer_value(v);
    }
    p->n_ids = n;
    return 0;
}

static int text_prompt(json_t *s, const char *param, srv_prompt *p, srv_error *e)
{
    if (has_nul(s))
        return srv_error_invalid(e, param, "'%s' must not contain NUL characters", param);
    p->text = zse_strdup(json_string_value(s));
    return p->text ? 0 : oom(e);
}

/* a string, a list of strings, a list of token ids, or a list of lists of token ids */
static int parse_prompts(json_t *body, const srv_model_facts *mf, srv_request *r, srv_error *e)
{
    json_t *v = json_object_get(body, "prompt");
    if (!v || json_is_null(v))
        return srv_error_invalid(e, "prompt", "'prompt' is required");
    bool ids_only = json_is_array(v) && json_array_size(v) > 0 && json_is_integer(json_array_get(v, 0));
    size_t n = json_is_string(v) || ids_only ? 1 : json_is_array(v) ? json_array_size(v) : 0;
    if (!json_is_string(v) && !json_is_array(v))
        return srv_error_invalid(e, "prompt", "'prompt' must be a string, a list of strings or a list of token ids");
    if (n == 0)
        return srv_error_invalid(e, "prompt", "'prompt' must not be an empty list");
    if (n * (size_t)r->n > MAX_SEQUENCES)
        return srv_error_invalid(e, "prompt", "%zu prompts with n=%d make more than %d sequences", n, r->n, MAX_SEQUENCES);
    if (!(r->prompts = zse_calloc(n, sizeof *r->prompts)))
        return oom(e);
    r->n_prompts = n;
    if (json_is_string(v))
        return text_prompt(v, "prompt", &r->prompts[0], e);
    if (ids_only)
        return ids_from_array(v, mf->vocab_size, "prompt", &r->prompts[0], e);
    for (size_t i = 0; i < n; i++) {
        json_t *x = json_array_get(v, i);
        char param[48];
        snprintf(param, sizeof param, "prompt[%zu]", i);
        int rc = json_is_string(x) ? text_prompt(x, param, &r->prompts[i], e)
                 : json_is_array(x) ? ids_from_array(x, mf->vocab_size, param, &r->prompts[i], e)
                                    : srv_error_invalid(e, param, "'%s' must be a string or a list of token ids", param);
        if (rc)
            return -1;
    }
    return 0;
}

/* best_of: that many candidates per prompt, of which the n with the highest logprob per
 * token are answered (OpenAI's legacy rule; not streamed) */
static int parse_completion_best_of(json_t *body, srv_request *r, srv_error *e)
{
    long long i = 0;
    bool have;
    if (get_int(body, "best_of", 1, MAX_CHOICES, &i, &have, e))
        return -1;
    if (!have || i == r->n)
        return 0;
    if (i < r->n)
        return srv_error_invalid(e, "best_of", "'best_of' (%lld) must be at least n (%d)", i, r->n);
    if (r->stream)
        return srv_error_invalid(e, "best_of", "'best_of' greater than n cannot be streamed");
    if (r->n_prompts * (size_t)i > MAX_SEQUENCES)
        return srv_error_invalid(e, "best_of", "%zu prompts with best_of=%lld make more than %d sequences", r->n_prompts,
                                 i, MAX_SEQUENCES);
    r->n_answers = r->n;
    r->best_of = (int)i;
    r->n = (int)i;
    r->sampling.logprobs = true; /* candidates are ranked by them */
    return 0;
}

static int parse_completion(json_t *body, const srv_model_facts *mf, srv_request *r, srv_error *e)
{
    long long i = 0;
    bool have;
    r->max_tokens = 0;
    const char *route = srv_api_route(SRV_API_COMPLETION);
    if (srv_check_fields(body, COMPLETION_FIELDS, "", route, e))
        return -1;
    if (parse_model(body, mf, r, e) || parse_n(body, r, e) || parse_prompts(body, mf, r, e) ||
        parse_stream(body, route, r, e) || parse_sampling(body, mf, r, e) || get_bool(body, "echo", &r->echo, e) ||
        srv_structured_parse(body, r, e))
        return -1;
    /* max_tokens 0 generates nothing: with echo and logprobs the prompt is only scored */
    if (get_int(body, "max_tokens", 0, INT_MAX, &i, &have, e))
        return -1;
    if (have)
        r->max_tokens = i == 0 ? ZSE_MAX_TOKENS_NONE : (int)i;
    if (get_int(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS, &i, &have, e))
        return -1;
    if (have) {
        r->logprobs = 1 + (int)i;
        r->sampling.logprobs = true;
        r->sampling.top_logprobs = (int)i;
    }
    if (r->echo && r->logprobs) { /* OpenAI's legacy scoring: the prompt's tokens come first */
        r->echo_logprobs = true;
        r->sampling.prompt_logprobs = true;
        if (r->sampling.prompt_top_logprobs < r->logprobs - 1)
            r->sampling.prompt_top_logprobs = r->logprobs - 1;
    }
    if (parse_completion_best_of(body, r, e))
        return -1;
    const char *suffix;
    if (get_string(body, "suffix", &suffix, e))
        return -1;
    if (suffix && *suffix)
        return srv_error_invalid(e, "suffix", "'suffix' (insertion) is not supported by this model");
    return 0;
}

/* ---- TGI / LoRAX --------------------------------------------------------------------- */

/* adapter_id names a LoRA adapter of this server (LoRAX's adapter_source "local": a name
 * from --lora / --lora-dir, or a path in the adapter directory); LoRAX's other sources
 * (the Hugging Face hub, S3, Predibase) and adapter merging are refused */
static int parse_tgi_adapter(json_t *params, const srv_model_facts *mf, srv_request *r, srv_error *e)
{
    const char *adapter, *source;
    if (get_string(params, "adapter_id", &adapter, e) || get_string(params, "adapter_source", &source, e))
        return -1;
    if (source && strcmp(source, "local") != 0)
        return srv_error_invalid(e, "parameters.adapter_source",
                                 "adapter_source '%s' is not supported: this server serves local adapters (--lora, "
                                 "--lora-dir, /v1/load_lora_adapter); use \"local\"", source);
    json_t *merged = json_object_get(params, "merged_adapters"), *token = json_object_get(params, "api_token");
    if (merged && !json_is_null(merged))
        return srv_error_invalid(e, "parameters.merged_adapters", "merged_adapters is not supported: name one adapter");
    if (token && !json_is_null(token))
        return srv_error_invalid(e, "parameters.api_token", "api_token is for adapters from the hub, which this "
                                                            "server does not load");
    if (!adapter || !*adapter || srv_model_name_is(mf, adapter))
        return 0;
    r->adapter_id = zse_strdup(adapter);
    if (!r->adapter_id)
        return oom(e);
    if (mf->adapters)
        return 0;
    return srv_error_set(e, 404, "not_found", "adapter_not_found", "parameters.adapter_id",
                         "adapter '%s' is not loaded: this server serves only the base model '%s' (start it with "
                         "--lora NAME=PATH or --lora-dir DIR to serve adapters)", adapter, mf->name);
}

/* top_n_tokens, decoder_input_details, truncate; every generated token carries its real
 * logprob (streamed ones too, with or without details) */
static int parse_tgi_scoring(json_t *p, srv_request *r, srv_error *e)
{
    long long i = 0;
    bool have;
    if (get_int(p, "top_n_tokens", 0, MAX_COMPLETION_LOGPROBS, &i, &have, e))
        return -1;
    r->top_n_tokens = have ? (int)i : 0;
    if (get_int(p, "return_k_alternatives", 1, MAX_COMPLETION_LOGPROBS, &i, &have, e) ||
        get_bool(p, "ignore_eos_token", &r->sampling.ignore_eos, e))
        return -1;
    r->k_alternatives = have ? (int)i : 0;
    r->sampling.top_logprobs = r->top_n_tokens > r->k_alternatives ? r->top_n_tokens : r->k_alternatives;
    r->sampling.logprobs = true;
    r->logprobs = r->details ? 1 + r->top_n_tokens : 0;
    if (get_bool(p, "decoder_input_details", &r->decoder_input_details, e))
        return -1;
    /* the prefill list lives in details: without details there is nowhere to put it */
    if (r->decoder_input_details && r->details)
        r->sampling.prompt_logprobs = true;
    if (get_int(p, "truncate", 1, INT_MAX, &i, &have, e))
        return -1;
    r->truncate = have ? (int)i : 0;
    return 0;
}

/* best_of: that many sampled candidates, the one with the highest total logprob answers
 * (TGI's rules: sampling only, no seed, no streaming) */
static int parse_tgi_best_of(json_t *p, bool sampling, srv_request *r, srv_error *e)
{
    long long i = 0;
    bool have;
    if (get_int(p, "best_of", 1, MAX_CHOICES, &i, &have, e))
        return -1;
    r->best_of = have ? (int)i : 1;
    if (r->best_of == 1)
        return 0;
    if (!sampling)
        return srv_error_invalid(e, "parameters.best_of", "best_of > 1 needs sampling: set do_sample (or "
                                                          "temperature, top_k, top_p)");
    if (r->has_seed)
        return srv_error_invalid(e, "parameters.seed", "seed must not be set when best_of > 1 (each candidate "
                                                       "draws its own)");
    r->n = r->best_of;
    return 0;
}

int srv_request_set_stream(srv_request *r, bool stream, srv_error *e)
{
    r->stream = stream;
    if (r->api != SRV_API_TGI || !stream)
        return 0;
    if (r->best_of > 1)
        return srv_error_invalid(e, "parameters.best_of", "best_of > 1 is not supported when streaming tokens");
    if (r->decoder_input_details)
        return srv_error_invalid(e, "parameters.decoder_input_details",
                                 "decoder_input_details == true is not supported when streaming tokens");
    return 0;
}

static const char *const TGI_FIELDS[] = {"inputs", "parameters", "stream", NULL};

/* TGI's parameters, LoRAX's (adapter_*, merged_adapters, api_token, ignore_eos_token,
 * return_k_alternatives, response_format) and the ones only their default is taken of
 * (watermark false, typical_p 1) */
static const char *const TGI_PARAMETERS[] = {
    "do_sample", "details", "return_full_text", "temperature", "top_p", "top_k", "repetition_penalty",
    "frequency_penalty", "max_new_tokens", "seed", "stop", "adapter_id", "adapter_source", "merged_adapters",
    "api_token", "top_n_tokens", "return_k_alternatives", "ignore_eos_token", "decoder_input_details", "truncate",
    "grammar", "response_format", "watermark", "typical_p", "best_of", NULL};

static int parse_tgi(json_t *body, const srv_model_facts *mf, srv_request *r, srv_error *e)
{
    const char *route = srv_api_route(SRV_API_TGI);
    if (srv_check_fields(body, TGI_FIELDS, "", route, e) ||
        srv_check_fields(json_object_get(body, "parameters"), TGI_PARAMETERS, "parameters", route, e))
        return -1;
    json_t *inputs = json_object_get(body, "inputs");
    if (!json_is_string(inputs))
        return srv_error_invalid(e, "inputs", "'inputs' must be a string");
    if (!(r->prompts = zse_calloc(1, sizeof *r->prompts)))
        return oom(e);
    r->n_prompts = 1;
    r->n = 1;
    if (text_prompt(inputs, "inputs", &r->prompts[0], e))
        return -1;
    if (get_bool(body, "stream", &r->stream, e)) /* the compat route "/"; the others set it */
        return -1;
    json_t *p = json_object_get(body, "parameters");
    if (p && !json_is_null(p) && !json_is_object(p))
        return srv_error_invalid(e, "parameters", "'parameters' must be an object");
    json_t *empty = NULL;
    if (!p || json_is_null(p))
        p = empty = json_object();
    if (!p)
        return oom(e);
    int rc = -1;
    zse_sampling *s = &r->sampling;
    double x;
    long long i = 0;
    bool have, do_sample = false, warped = false;
    if (get_bool(p, "do_sample", &do_sample, e) || get_bool(p, "details", &r->details, e) ||
        get_bool(p, "return_full_text", &r->echo, e))
        goto done;
    if (get_number(p, "temperature", 1e-4, 100, &x, &have, e))
        goto done;
    if (have)
        s->temperature = (float)x, warped = warped || x != 1.0;
    if (get_number(p, "top_p", 1e-6, 1 - 1e-9, &x, &have, e))
        goto done;
    if (have)
        s->top_p = (float)x, warped = true;
    if (get_int(p, "top_k", 1, mf->vocab_size, &i, &have, e))
        goto done;
    if (have)
        s->top_k = (int)i, warped = true;
    if (get_number(p, "repetition_penalty", 1e-4, 100, &x, &have, e))
        goto done;
    if (have)
        s->repetition_penalty = (float)x;
    if (get_number(p, "frequency_penalty", -2, 2, &x, &have, e))
        goto done;
    if (have)
        s->frequency_penalty = (float)x;
    if (get_int(p, "max_new_tokens", 1, INT_MAX, &i, &have, e))
        goto done;
    r->max_tokens = have ? (int)i : 0;
    if (get_int(p, "seed", 0, LLONG_MAX, &i, &r->has_seed, e))
        goto done;
    s->seed = r->has_seed ? (uint64_t)i : random_seed();
    if (parse_stop(p, "stop", r, e) || parse_tgi_adapter(p, mf, r, e) || parse_tgi_scoring(p, r, e) ||
        srv_structured_parse_tgi(p, r, e))
        goto done;
    bool wm = false;
    if (get_bool(p, "watermark", &wm, e))
        goto done;
    if (wm) {
        srv_error_invalid(e, "parameters.watermark", "watermarking is not supported");
        goto done;
    }
    if (get_number(p, "typical_p", 0, 1, &x, &have, e))
        goto done;
    if (have && x < 1) {
        srv_error_invalid(e, "parameters.typical_p", "typical_p (locally typical sampling) is not supported; use "
                                                     "top_p, top_k or temperature");
        goto done;
    }
    /* TGI samples when asked to or when any warper is set; otherwise it is greedy */
    if (!do_sample && !warped)
        s->temperature = 0;
    if (parse_tgi_best_of(p, do_sample || warped, r, e) || srv_request_set_stream(r, r->stream, e))
        goto done;
    rc = 0;
done:
    json_decref(empty);
    return rc;
}

/* ---- entry points -------------------------------------------------------------------- */

int srv_request_parse(srv_api api, const char *body, size_t len, const srv_model_facts *mf, srv_request *r,
                      srv_error *e)
{
    memset(r, 0, sizeof *r);
    r->api = api;
    zse_sampling_default(&r->sampling);
    json_error_t jerr;
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return srv_error_invalid(e, NULL, "the body is not valid JSON (line %d, column %d): %s", jerr.line,
                                 jerr.column, jerr.text);
    int rc;
    if (!json_is_object(root))
        rc = srv_error_invalid(e, NULL, "the body must be a JSON object");
    else if (api == SRV_API_CHAT)
        rc = parse_chat(root, mf, r, e);
    else if (api == SRV_API_COMPLETION)
        rc = parse_completion(root, mf, r, e);
    else
        rc = parse_tgi(root, mf, r, e);
    json_decref(root);
    if (rc == 0) {
        r->sampling.stop = (const char *const *)r->stop;
        r->sampling.n_stop = r->n_stop;
        r->sampling.logit_bias = r->bias;
        r->sampling.n_logit_bias = r->n_bias;
    } else {
        srv_request_free(r);
        r->api = api;
    }
    return rc;
}

static int render_chat(srv_request *r, const zse_model *m, srv_error *e);

/* continue_final_message: the rendering ends where the last message's content does (as
 * transformers cuts it), so the model continues that message */
static int cut_after_final_message(srv_request *r, char *text, srv_error *e)
{
    json_t *last = json_array_get(r->messages, json_array_size(r->messages) - 1);
    const char *content = json_string_value(json_object_get(last, "content"));
    size_t len = content ? strlen(content) : 0;
    while (len && (content[len - 1] == ' ' || content[len - 1] == '\n' || content[len - 1] == '\t'))
        len--;
    while (len && (*content == ' ' || *content == '\n' || *content == '\t'))
        content++, len--;
    if (!len) /* an empty final message: nothing to find; the rendering stands */
        return 0;
    char *needle = zse_malloc(len + 1);
    if (!needle)
        return oom(e);
    memcpy(needle, content, len);
    needle[len] = '\0';
    char *at = NULL;
    for (char *p = text; (p = strstr(p, needle)) != NULL; p++) /* the last occurrence */
        at = p;
    free(needle);
    if (!at)
        return srv_error_invalid(e, "continue_final_message", "the chat template's rendering does not hold the "
                                 "final message's content, so it cannot be continued");
    at[len] = '\0';
    return 0;
}

/* chat: the template's rendering of the messages, tokenized with special tokens parsed (the
 * template writes them as text) and nothing added */
int srv_request_render_chat(srv_request *r, const zse_model *m, srv_error *e)
{
    return render_chat(r, m, e);
}

static int render_chat(srv_request *r, const zse_model *m, srv_error *e)
{
    char *msgs = json_dumps(r->messages, JSON_COMPACT);
    char *extra = r->template_extra ? json_dumps(r->template_extra, JSON_COMPACT) : NULL;
    if (!msgs || (r->template_extra && !extra)) {
        free(msgs);
        free(extra);
        return oom(e);
    }
    char *text = zse_chat_render(m, msgs, extra, r->add_generation_prompt);
    free(msgs);
    free(extra);
    if (!text)
        return srv_error_invalid(e, "messages", "the model's chat template cannot render these messages: %s",
                                 zse_last_error());
    if (r->continue_final_message && cut_after_final_message(r, text, e) != 0) {
        free(text);
        return -1;
    }
    free(r->prompts[0].text);
    r->prompts[0].text = text;
    return 0;
}

static const char *prompt_word(srv_api api);

static int tokenize_prompt(srv_request *r, srv_prompt *p, const zse_model *m, const srv_model_facts *mf, int flags,
                           srv_error *e)
{
    if (p->ids)
        return 0;
    /* Text longer than the context could hold at the longest token is refused before the
     * tokenizer spends seconds on it (4 MB of spaces took 2.5 s) */
    size_t len = strlen(p->text);
    if (mf->max_prompt_bytes && len > mf->max_prompt_bytes) {
        const char *what = prompt_word(r->api);
        return srv_error_set(e, 400, "invalid_request_error", "context_length_exceeded", what,
                             "This model's maximum context length is %d tokens. However, your %s is %zu bytes, more "
                             "than %d tokens can hold (%zu bytes at most). Please reduce the length of the %s.",
                             mf->ctx_size, what, len, mf->ctx_size, mf->max_prompt_bytes, what);
    }
    if (zse_tokenize(m, p->text, strlen(p->text), flags, &p->ids, &p->n_ids) != 0)
        return srv_error_invalid(e, "prompt", "cannot tokenize the prompt: %s", zse_last_error());
    return 0;
}

/* TGI's truncate: only the last r->truncate tokens of the prompt are kept (the echoed
 * text, return_full_text, is then theirs too) */
static int truncate_prompt(srv_request *r, srv_prompt *p, const zse_model *m, srv_error *e)
{
    if (r->truncate <= 0 || p->n_ids <= (size_t)r->truncate)
        return 0;
    size_t drop = p->n_ids - (size_t)r->truncate;
    memmove(p->ids, p->ids + drop, (size_t)r->truncate * sizeof *p->ids);
    p->n_ids = (size_t)r->truncate;
    char *text = zse_detokenize(m, p->ids, p->n_ids, false);
    if (!text)
        return oom(e);
    free(p->text);
    p->text = text;
    return 0;
}

static const char *prompt_word(srv_api api)
{
    return api == SRV_API_CHAT ? "messages" : api == SRV_API_COMPLETION ? "prompt" : "inputs";
}

/* the prompt fits, and with max_tokens the prompt plus the completion fit (both numbers in
 * the message); a default max_tokens shrinks to what fits instead */
static int check_context(srv_request *r, const srv_prompt *p, int ctx, bool explicit_max, srv_error *e)
{
    const char *what = prompt_word(r->api);
    if (p->n_ids == 0)
        return srv_error_invalid(e, what, "the %s is empty after tokenization", what);
    if (p->n_ids >= (size_t)ctx)
        return srv_error_set(e, 400, "invalid_request_error", "context_length_exceeded", what,
                             "This model's maximum context length is %d tokens. However, your %s resulted in %zu "
                             "tokens. Please reduce the length of the %s.", ctx, what, p->n_ids, what);
    if (explicit_max && r->max_tokens > 0 && p->n_ids + (size_t)r->max_tokens > (size_t)ctx)
        return srv_error_set(e, 400, "invalid_request_error", "context_length_exceeded",
                             r->api == SRV_API_TGI ? "parameters.max_new_tokens" : "max_tokens",
                             "This model's maximum context length is %d tokens. However, you requested %zu tokens "
                             "(%zu in the %s, %d in the completion). Please reduce the length of the %s or "
                             "completion.", ctx, p->n_ids + (size_t)r->max_tokens, p->n_ids, what, r->max_tokens, what);
    return 0;
}

int srv_request_prepare(srv_request *r, const zse_model *m, const srv_model_facts *mf, srv_error *e)
{
    if (r->api == SRV_API_CHAT && render_chat(r, m, e))
        return -1;
    int flags = ZSE_TOK_PARSE_SPECIAL | (r->api == SRV_API_CHAT ? 0 : ZSE_TOK_ADD_SPECIAL);
    bool explicit_max = r->max_tokens != 0; /* ZSE_MAX_TOKENS_NONE: given as 0 */
    if (!explicit_max && r->api == SRV_API_COMPLETION)
        r->max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS;
    if (!explicit_max && r->api == SRV_API_TGI)
        r->max_tokens = TGI_DEFAULT_MAX_NEW_TOKENS;
    size_t longest = 0;
    for (size_t i = 0; i < r->n_prompts; i++) {
        if (tokenize_prompt(r, &r->prompts[i], m, mf, flags, e) || truncate_prompt(r, &r->prompts[i], m, e) ||
            check_context(r, &r->prompts[i], mf->ctx_size, explicit_max, e))
            return -1;
        if (r->prompts[i].n_ids > longest)
            longest = r->prompts[i].n_ids;
    }
    /* a default length stops at the context's end rather than failing */
    if (!explicit_max && r->max_tokens > 0 && longest + (size_t)r->max_tokens > (size_t)mf->ctx_size)
        r->max_tokens = mf->ctx_size - (int)longest;
    r->sampling.max_tokens = r->max_tokens;
    if (r->sampling.min_tokens > 0 && r->max_tokens > 0 && r->sampling.min_tokens > r->max_tokens)
        return srv_error_invalid(e, "min_tokens", "'min_tokens' (%d) must not be more than max_tokens (%d)",
                                 r->sampling.min_tokens, r->max_tokens);
    if (r->sampling.min_tokens > 0 && r->max_tokens == ZSE_MAX_TOKENS_NONE)
        return srv_error_invalid(e, "min_tokens", "'min_tokens' needs max_tokens above 0");
    return 0;
}

void srv_request_free(srv_request *r)
{
    free(r->model);
    json_decref(r->messages);
    json_decref(r->template_extra);
    for (size_t i = 0; r->prompts && i < r->n_prompts; i++) {
        free(r->prompts[i].text);
        free(r->prompts[i].ids);
    }
    free(r->prompts);
    for (int i = 0; r->stop && i < r->n_stop; i++)
        free(r->stop[i]);
    free(r->stop);
    free(r->bias);
    free(r->user);
    free(r->adapter_id);
    zse_adapter_release(r->adapter);
    srv_structured_free(&r->structured);
    memset(r, 0, sizeof *r);
}
