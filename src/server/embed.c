/* POST /v1/embeddings in OpenAI's shape: each input (a string, or token ids) runs through
 * the model (zse_embed: the final hidden state after the last norm, pooled over the tokens
 * and scaled to unit length). Pooling is the server's (--pooling: the last token's state by
 * default, as vLLM embeds with a causal LM; or the mean). encoding_format "base64" is the
 * little-endian float32 bytes, which the openai SDK asks for by default. */
#include "server/server.h"

#include <limits.h>
#include <stdio.h>
#include <string.h>

#define MAX_INPUTS 2048     /* OpenAI's limit per request */

static int oom(srv_error *e)
{
    return srv_error_set(e, 500, "server_error", NULL, NULL, "out of memory");
}

static char *base64_floats(const float *v, int n)
{
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t len = (size_t)n * 4;
    unsigned char *b = zse_malloc(len ? len : 1);
    char *out = zse_malloc((len + 2) / 3 * 4 + 1);
    if (!b || !out) {
        free(b);
        free(out);
        return NULL;
    }
    for (int i = 0; i < n; i++) { /* little-endian whatever the host */
        uint32_t u;
        memcpy(&u, &v[i], 4);
        for (int k = 0; k < 4; k++)
            b[(size_t)i * 4 + k] = (unsigned char)(u >> (8 * k));
    }
    size_t o = 0;
    for (size_t i = 0; i < len; i += 3) {
        uint32_t x = (uint32_t)b[i] << 16 | (i + 1 < len ? (uint32_t)b[i + 1] << 8 : 0) | (i + 2 < len ? b[i + 2] : 0);
        out[o++] = tab[x >> 18 & 63];
        out[o++] = tab[x >> 12 & 63];
        out[o++] = i + 1 < len ? tab[x >> 6 & 63] : '=';
        out[o++] = i + 2 < len ? tab[x & 63] : '=';
    }
    out[o] = '\0';
    free(b);
    return out;
}

/* one input's tokens: text tokenized (special tokens parsed, BOS/EOS as the tokenizer adds
 * them) or ids checked */
static int input_ids(const zse_model *m, const srv_model_facts *mf, json_t *v, const char *param, int32_t **ids,
                     size_t *n, srv_error *e)
{
    *ids = NULL;
    *n = 0;
    if (json_is_string(v)) {
        const char *s = json_string_value(v);
        if (strlen(s) != json_string_length(v))
            return srv_error_invalid(e, param, "'%s' must not contain NUL characters", param);
        if (mf->max_prompt_bytes && strlen(s) > mf->max_prompt_bytes)
            return srv_error_set(e, 400, "invalid_request_error", "context_length_exceeded", param,
                                 "'%s' is %zu bytes, more than this model's %d tokens of context can hold", param,
                                 strlen(s), mf->ctx_size);
        if (zse_tokenize(m, s, strlen(s), ZSE_TOK_PARSE_SPECIAL | ZSE_TOK_ADD_SPECIAL, ids, n) != 0)
            return srv_error_invalid(e, param, "cannot tokenize '%s': %s", param, zse_last_error());
    } else if (json_is_array(v)) {
        *n = json_array_size(v);
        if (!(*ids = zse_malloc((*n ? *n : 1) * sizeof **ids)))
            return oom(e);
        for (size_t i = 0; i < *n; i++) {
            json_t *t = json_array_get(v, i);
            if (!json_is_integer(t) || json_integer_value(t) < 0 || json_integer_value(t) >= mf->vocab_size)
                return srv_error_invalid(e, param, "'%s' holds something that is not a token id (0 to %d) at %zu",
                                         param, mf->vocab_size - 1, i);
            (*ids)[i] = (int32_t)json_integer_value(t);
        }
    } else {
        return srv_error_invalid(e, param, "'%s' must be a string or a list of token ids", param);
    }
    if (*n == 0)
        return srv_error_invalid(e, param, "'%s' is empty", param);
    if (*n > (size_t)mf->ctx_size)
        return srv_error_set(e, 400, "invalid_request_error", "context_length_exceeded", param,
                             "This model's maximum context length is %d tokens. However, '%s' has %zu tokens. "
                             "Please reduce its length.", mf->ctx_size, param, *n);
    return 0;
}

/* the inputs as a list: one string, one list of ids, or a list of either */
static json_t *input_list(json_t *input, srv_error *e)
{
    if (!input || json_is_null(input))
        return srv_error_invalid(e, "input", "'input' is required"), NULL;
    bool one = json_is_string(input) ||
               (json_is_array(input) && json_array_size(input) > 0 && json_is_integer(json_array_get(input, 0)));
    if (!one && !json_is_array(input))
        return srv_error_invalid(e, "input", "'input' must be a string, a list of strings, a list of token ids or "
                                             "a list of lists of token ids"), NULL;
    if (!one && json_array_size(input) == 0)
        return srv_error_invalid(e, "input", "'input' must not be an empty list"), NULL;
    if (!one && json_array_size(input) > MAX_INPUTS)
        return srv_error_invalid(e, "input", "'input' may hold at most %d items, not %zu", MAX_INPUTS,
                                 json_array_size(input)), NULL;
    json_t *list = one ? json_pack("[O]", input) : json_incref(input);
    if (!list)
        oom(e);
    return list;
}

static int check_options(json_t *root, const srv_model_facts *mf, int hidden, bool *b64, char *user_out,
                         size_t user_cap, srv_error *e)
{
    static const char *const fields[] = {"model", "input", "encoding_format", "dimensions", "user", NULL};
    if (srv_check_fields(root, fields, "", "/v1/embeddings", e))
        return -1;
    json_t *model = json_object_get(root, "model");
    const char *name = json_string_value(model);
    if (!name)
        return srv_error_invalid(e, "model", "you must provide a model parameter ('%s' is served here)", mf->name);
    if (!srv_model_name_is(mf, name))
        return srv_error_set(e, 404, "invalid_request_error", "model_not_found", "model",
                             "The model '%s' does not exist; this server serves '%s' (adapters do not embed)", name,
                             mf->name);
    json_t *fmt = json_object_get(root, "encoding_format");
    const char *f = json_string_value(fmt);
    *b64 = f && strcmp(f, "base64") == 0;
    if (fmt && !json_is_null(fmt) && (!f || (strcmp(f, "float") != 0 && !*b64)))
        return srv_error_invalid(e, "encoding_format", "'encoding_format' must be \"float\" or \"base64\"");
    json_t *dims = json_object_get(root, "dimensions");
    if (dims && !json_is_null(dims) && (!json_is_integer(dims) || json_integer_value(dims) != hidden))
        return srv_error_invalid(e, "dimensions", "'dimensions' other than the model's %d is not supported "
                                 "(this model's embeddings cannot be shortened)", hidden);
    json_t *user = json_object_get(root, "user");
    if (user && !json_is_null(user) && !json_is_string(user))
        return srv_error_invalid(e, "user", "'user' must be a string");
    if (json_is_string(user) && user_out && user_cap)
        snprintf(user_out, user_cap, "%s", json_string_value(user));
    return 0;
}

static json_t *embedding_value(const float *v, int n, bool b64)
{
    if (b64) {
        char *s = base64_floats(v, n);
        json_t *o = s ? json_string(s) : NULL;
        free(s);
        return o;
    }
    json_t *a = json_array();
    for (int i = 0; a && i < n; i++)
        if (json_array_append_new(a, json_real(v[i])) != 0) {
            json_decref(a);
            a = NULL;
        }
    return a;
}

int srv_embeddings(zse_model *m, const srv_model_facts *mf, zse_pooling pooling, const char *body, size_t len,
                   json_t **out, int *prompt_tokens, char *user, size_t user_cap, srv_error *e)
{
    *out = NULL;
    *prompt_tokens = 0;
    if (user && user_cap)
        user[0] = '\0';
    zse_model_info info;
    zse_model_get_info(m, &info);
    json_error_t jerr;
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return srv_error_invalid(e, NULL, "the body is not valid JSON (line %d, column %d): %s", jerr.line,
                                 jerr.column, jerr.text);
    bool b64 = false;
    json_t *list = NULL, *data = NULL;
    float *vec = zse_malloc((size_t)info.hidden_size * sizeof *vec);
    int rc = -1;
    if (!vec) {
        oom(e);
        goto done;
    }
    if (!json_is_object(root)) {
        srv_error_invalid(e, NULL, "the body must be a JSON object");
        goto done;
    }
    if (check_options(root, mf, info.hidden_size, &b64, user, user_cap, e) || !(list = input_list(json_object_get(root, "input"), e)))
        goto done;
    if (!(data = json_array())) {
        oom(e);
        goto done;
    }
    long long total = 0;
    for (size_t i = 0; i < json_array_size(list); i++) {
        char param[32];
        snprintf(param, sizeof param, json_array_size(list) > 1 ? "input[%zu]" : "input", i);
        int32_t *ids;
        size_t n;
        if (input_ids(m, mf, json_array_get(list, i), param, &ids, &n, e) != 0) {
            zse_free(ids);
            goto done;
        }
        int erc = zse_embed(m, ids, n, pooling, vec);
        zse_free(ids);
        if (erc != 0) {
            srv_error_set(e, 500, "server_error", NULL, NULL, "embedding failed: %s", zse_last_error());
            goto done;
        }
        total += (long long)n;
        json_t *item = json_pack("{s:s, s:I, s:o}", "object", "embedding", "index", (json_int_t)i, "embedding",
                                 embedding_value(vec, info.hidden_size, b64));
        if (!item || json_array_append_new(data, item) != 0) {
            oom(e);
            goto done;
        }
    }
    *prompt_tokens = total > INT_MAX ? INT_MAX : (int)total;
    *out = json_pack("{s:s, s:O, s:s, s:{s:I, s:I}}", "object", "list", "data", data, "model", mf->name, "usage",
                     "prompt_tokens", (json_int_t)total, "total_tokens", (json_int_t)total);
    rc = *out ? 0 : oom(e);
done:
    free(vec);
    json_decref(data);
    json_decref(list);
    json_decref(root);
    return rc;
}
