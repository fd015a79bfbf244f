/* Prompt scoring in the APIs' shapes: the prompt tokens' logprobs the engine reports on a
 * sequence's first event (zse_sampling.prompt_logprobs) rendered as
 *  - OpenAI's legacy completions logprobs with echo: the prompt's tokens lead `tokens`,
 *    `token_logprobs`, `top_logprobs` and `text_offset`, the first token's logprob and
 *    alternatives null (nothing comes before it) — what lm-eval's loglikelihood reads;
 *  - vLLM's `prompt_logprobs`: [null, {"<id>": {"logprob","rank","decoded_token"}, ...}, ...],
 *    the prompt token itself and its alternatives;
 *  - TGI's details.prefill: [{"id","text","logprob"}], the first logprob null.
 * The first entry the engine gives is all zero; it is never shown as a number. */
#include "server/server.h"

#include <stdio.h>
#include <string.h>

json_t *srv_token_text(const zse_model *m, int32_t id)
{
    char *s = zse_detokenize(m, &id, 1, false);
    json_t *v = s ? json_string(s) : NULL;
    if (!v && s)
        v = json_string("\xef\xbf\xbd"); /* not valid UTF-8 alone (jansson refuses it) */
    free(s);
    return v;
}

/* how many bytes token id adds to decoded text */
static size_t token_width(const zse_model *m, int32_t id)
{
    size_t n = 0;
    uint8_t *b = zse_token_bytes(m, id, &n);
    zse_free(b);
    return b ? n : 0;
}

static size_t scored_count(const srv_prompt *p, int n_lp)
{
    return n_lp < 0 ? 0 : (size_t)n_lp < p->n_ids ? (size_t)n_lp : p->n_ids;
}

/* {"<token text>": logprob, ...} of the alternatives; null for the first token */
static json_t *legacy_top(const zse_model *m, const zse_logprobs *lp, size_t i, int n_top)
{
    if (i == 0)
        return json_null();
    json_t *top = json_object();
    for (int k = 0; top && k < lp->n_top && k < n_top; k++) {
        json_t *t = srv_token_text(m, lp->top_ids[k]);
        if (!t || json_object_set_new(top, json_string_value(t), json_real(lp->top_logprobs[k])) != 0) {
            json_decref(t);
            json_decref(top);
            return NULL;
        }
        json_decref(t);
    }
    return top;
}

int srv_score_legacy(const zse_model *m, const srv_prompt *p, const zse_logprobs *lp, int n_lp, int n_top,
                     json_t *legacy, size_t *offset)
{
    json_t *tokens = json_object_get(legacy, "tokens"), *lps = json_object_get(legacy, "token_logprobs");
    json_t *tops = json_object_get(legacy, "top_logprobs"), *offs = json_object_get(legacy, "text_offset");
    if (!tokens || !lps || !tops || !offs)
        return zse_fail("the logprobs object lacks its lists");
    size_t n = scored_count(p, n_lp);
    for (size_t i = 0; i < n; i++) {
        int32_t id = p->ids[i];
        if (json_array_append_new(tokens, srv_token_text(m, id)) != 0 ||
            json_array_append_new(lps, i == 0 ? json_null() : json_real(lp[i].logprob)) != 0 ||
            json_array_append_new(tops, legacy_top(m, &lp[i], i, n_top)) != 0 ||
            json_array_append_new(offs, json_integer((json_int_t)*offset)) != 0)
            return zse_fail("out of memory formatting the prompt's logprobs");
        *offset += token_width(m, id);
    }
    return 0;
}

/* one vLLM entry: {"logprob","rank","decoded_token"} */
static int vllm_add(json_t *entry, const zse_model *m, int32_t id, float logprob, int rank)
{
    char key[16];
    snprintf(key, sizeof key, "%d", (int)id);
    if (json_object_get(entry, key))
        return 0; /* the token is also among the alternatives */
    json_t *o = json_pack("{s:f, s:i, s:o}", "logprob", (double)logprob, "rank", rank, "decoded_token",
                          srv_token_text(m, id));
    return o ? json_object_set_new(entry, key, o) : -1;
}

json_t *srv_score_vllm(const zse_model *m, const srv_prompt *p, const zse_logprobs *lp, int n_lp, int n_top)
{
    json_t *list = json_array();
    size_t n = scored_count(p, n_lp);
    for (size_t i = 0; list && i < n; i++) {
        json_t *entry = i == 0 ? json_null() : json_object();
        int rc = entry ? 0 : -1;
        if (i > 0 && rc == 0) {
            rc = vllm_add(entry, m, p->ids[i], lp[i].logprob, lp[i].rank);
            for (int k = 0; rc == 0 && k < lp[i].n_top && k < n_top; k++)
                rc = vllm_add(entry, m, lp[i].top_ids[k], lp[i].top_logprobs[k], k + 1);
        }
        if (rc != 0 || json_array_append_new(list, entry) != 0) {
            json_decref(list);
            return NULL;
        }
    }
    return list;
}

json_t *srv_score_tgi_prefill(const zse_model *m, const srv_prompt *p, const zse_logprobs *lp, int n_lp)
{
    json_t *list = json_array();
    size_t n = scored_count(p, n_lp);
    for (size_t i = 0; list && i < n; i++) {
        json_t *t = json_pack("{s:i, s:o, s:o}", "id", (int)p->ids[i], "text", srv_token_text(m, p->ids[i]),
                              "logprob", i == 0 ? json_null() : json_real(lp[i].logprob));
        if (!t || json_array_append_new(list, t) != 0) {
            json_decref(list);
            return NULL;
        }
    }
    return list;
}
