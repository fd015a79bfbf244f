/* vLLM's tokenizer routes: POST /tokenize (a prompt, or chat messages rendered by the
 * template exactly as /v1/chat/completions renders them), POST /detokenize and
 * GET /tokenizer_info (the tokenizer's configuration, as tokenizer_config.json holds it). */
#include "server/server.h"

#include <stdio.h>
#include <string.h>

static int oom(srv_error *e)
{
    return srv_error_set(e, 500, "server_error", NULL, NULL, "out of memory");
}

/* vLLM's fields (model optional); /tokenize's chat form takes chat's template options */
static const char *const TOKENIZE_FIELDS[] = {"model", "prompt", "messages", "add_special_tokens", "return_token_strs",
                                              "tools", "add_generation_prompt", "continue_final_message",
                                              "chat_template_kwargs", "chat_template", NULL};
static const char *const DETOKENIZE_FIELDS[] = {"model", "tokens", NULL};

/* the body as a JSON object of the route's fields, its optional model naming this server's
 * model (or an adapter: they share its tokenizer) */
static json_t *load_body(const char *body, size_t len, const srv_model_facts *mf, const char *const *fields,
                         const char *route, srv_error *e)
{
    json_error_t jerr;
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return srv_error_invalid(e, NULL, "the body is not valid JSON (line %d, column %d): %s", jerr.line,
                                 jerr.column, jerr.text), NULL;
    if (!json_is_object(root)) {
        json_decref(root);
        return srv_error_invalid(e, NULL, "the body must be a JSON object"), NULL;
    }
    if (srv_check_fields(root, fields, "", route, e)) {
        json_decref(root);
        return NULL;
    }
    json_t *model = json_object_get(root, "model");
    const char *name = json_string_value(model);
    if (model && !json_is_null(model) && (!name || (!srv_model_name_is(mf, name) && !mf->adapters))) {
        if (!name)
            srv_error_invalid(e, "model", "'model' must be a string");
        else
            srv_error_set(e, 404, "invalid_request_error", "model_not_found", "model",
                          "The model '%s' does not exist; this server serves '%s'", name, mf->name);
        json_decref(root); /* name lives in it */
        return NULL;
    }
    return root;
}

static int get_flag(json_t *body, const char *key, bool dflt, bool *out, srv_error *e)
{
    json_t *v = json_object_get(body, key);
    *out = dflt;
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_boolean(v))
        return srv_error_invalid(e, key, "'%s' must be true or false", key);
    *out = json_is_true(v);
    return 0;
}

/* messages → the template's text (chat's options and tools included) */
static char *chat_text(json_t *body, const zse_model *m, srv_error *e)
{
    srv_request r;
    memset(&r, 0, sizeof r);
    r.api = SRV_API_CHAT;
    json_t *tpl = json_object_get(body, "chat_template");
    if (tpl && !json_is_null(tpl))
        return srv_error_invalid(e, "chat_template", "a per-request 'chat_template' is not supported: the model's "
                                                     "(or zse serve --chat-template FILE's) is used"), NULL;
    if (!(r.prompts = zse_calloc(1, sizeof *r.prompts)))
        return oom(e), NULL;
    r.n_prompts = 1;
    char *text = NULL;
    if (srv_request_parse_messages(body, "/tokenize", &r, e) == 0 && srv_request_render_chat(&r, m, e) == 0) {
        text = r.prompts[0].text;
        r.prompts[0].text = NULL;
    }
    srv_request_free(&r);
    return text;
}

/* the template's options mean nothing to a plain prompt: refused rather than dropped */
static int chat_only_field(json_t *body, srv_error *e)
{
    static const char *const chat_only[] = {"tools", "add_generation_prompt", "continue_final_message",
                                            "chat_template_kwargs", "chat_template"};
    for (size_t i = 0; i < sizeof chat_only / sizeof chat_only[0]; i++) {
        json_t *v = json_object_get(body, chat_only[i]);
        if (v && !json_is_null(v))
            return srv_error_invalid(e, chat_only[i], "'%s' is taken only with 'messages' (the chat template's "
                                     "option), not with 'prompt'", chat_only[i]);
    }
    return 0;
}

static json_t *token_strs(const zse_model *m, const int32_t *ids, size_t n)
{
    json_t *a = json_array();
    for (size_t i = 0; a && i < n; i++)
        if (json_array_append_new(a, srv_token_text(m, ids[i])) != 0) {
            json_decref(a);
            a = NULL;
        }
    return a;
}

int srv_tokenize(const zse_model *m, const srv_model_facts *mf, const char *body, size_t len, json_t **out,
                 srv_error *e)
{
    *out = NULL;
    json_t *root = load_body(body, len, mf, TOKENIZE_FIELDS, "/tokenize", e);
    if (!root)
        return -1;
    json_t *msgs = json_object_get(root, "messages"), *prompt = json_object_get(root, "prompt");
    bool chat = msgs && !json_is_null(msgs), special, strs;
    char *text = NULL;
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = -1;
    if (chat && prompt && !json_is_null(prompt)) {
        srv_error_invalid(e, "prompt", "send either 'prompt' or 'messages', not both");
        goto done;
    }
    if (!chat && chat_only_field(root, e))
        goto done;
    /* a prompt gets the tokenizer's BOS/EOS by default; a template writes its own */
    if (get_flag(root, "add_special_tokens", !chat, &special, e) || get_flag(root, "return_token_strs", false, &strs, e))
        goto done;
    if (chat) {
        if (!(text = chat_text(root, m, e)))
            goto done;
    } else if (!json_is_string(prompt)) {
        srv_error_invalid(e, "prompt", "'prompt' (a string) or 'messages' (a list) is required");
        goto done;
    } else if (strlen(json_string_value(prompt)) != json_string_length(prompt)) {
        srv_error_invalid(e, "prompt", "'prompt' must not contain NUL characters");
        goto done;
    } else if (!(text = zse_strdup(json_string_value(prompt)))) {
        oom(e);
        goto done;
    }
    int flags = ZSE_TOK_PARSE_SPECIAL | (special ? ZSE_TOK_ADD_SPECIAL : 0);
    if (zse_tokenize(m, text, strlen(text), flags, &ids, &n) != 0) {
        srv_error_invalid(e, chat ? "messages" : "prompt", "cannot tokenize: %s", zse_last_error());
        goto done;
    }
    json_t *list = json_array();
    for (size_t i = 0; list && i < n; i++)
        if (json_array_append_new(list, json_integer(ids[i])) != 0) {
            json_decref(list);
            list = NULL;
        }
    *out = json_pack("{s:I, s:i, s:o, s:o}", "count", (json_int_t)n, "max_model_len", mf->ctx_size, "tokens", list,
                     "token_strs", strs ? token_strs(m, ids, n) : json_null());
    rc = *out ? 0 : oom(e);
done:
    zse_free(ids);
    free(text);
    json_decref(root);
    return rc;
}

int srv_detokenize(const zse_model *m, const srv_model_facts *mf, const char *body, size_t len, json_t **out,
                   srv_error *e)
{
    *out = NULL;
    json_t *root = load_body(body, len, mf, DETOKENIZE_FIELDS, "/detokenize", e);
    if (!root)
        return -1;
    json_t *tokens = json_object_get(root, "tokens");
    size_t n = json_array_size(tokens);
    int32_t *ids = zse_malloc((n ? n : 1) * sizeof *ids);
    int rc = -1;
    if (!ids) {
        oom(e);
        goto done;
    }
    if (!json_is_array(tokens)) {
        srv_error_invalid(e, "tokens", "'tokens' (a list of token ids) is required");
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(tokens, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= mf->vocab_size) {
            srv_error_invalid(e, "tokens", "'tokens' holds something that is not a token id (0 to %d) at %zu",
                              mf->vocab_size - 1, i);
            goto done;
        }
        ids[i] = (int32_t)json_integer_value(v);
    }
    char *text = zse_detokenize(m, ids, n, false);
    if (!text) {
        srv_error_invalid(e, "tokens", "cannot detokenize: %s", zse_last_error());
        goto done;
    }
    json_t *s = json_string(text);
    if (!s) /* not valid UTF-8 (a cut character): shown with U+FFFD */
        s = json_string("\xef\xbf\xbd");
    free(text);
    *out = json_pack("{s:o}", "prompt", s);
    rc = *out ? 0 : oom(e);
done:
    free(ids);
    json_decref(root);
    return rc;
}

json_t *srv_tokenizer_info(const zse_model *m, const srv_model_facts *mf)
{
    char *cfg = zse_model_tokenizer_config(m);
    json_t *o = cfg ? json_loads(cfg, 0, NULL) : json_object();
    free(cfg);
    if (!json_is_object(o)) {
        json_decref(o);
        o = json_object();
    }
    if (!o)
        return NULL;
    if (!json_object_get(o, "tokenizer_class"))
        json_object_set_new(o, "tokenizer_class", json_string("PreTrainedTokenizerFast"));
    const char *tpl = zse_model_chat_template(m);
    json_object_set_new(o, "chat_template", tpl ? json_string(tpl) : json_null());
    json_object_set_new(o, "model_max_length", json_integer(mf->ctx_size));
    json_object_set_new(o, "vocab_size", json_integer(mf->vocab_size));
    return o;
}
