/* server: request bodies → srv_request. Every field's type and range, errors that name the
 * field, the three API shapes, and preparation against the real fixture model (chat
 * template, tokenization, context limits). */
#include "server_test_model.h"

#include "server/server.h"

#include <math.h>
#include <stdlib.h>

static const srv_model_facts FACTS = {"tiny", 2048, 2048, 0, false, NULL, 0};
static const srv_model_facts LORA_FACTS = {"tiny", 2048, 2048, 0, true, NULL, 0}; /* a server with adapters */

static int parse(srv_api api, const char *body, srv_request *r, srv_error *e)
{
    return srv_request_parse(api, body, strlen(body), &FACTS, r, e);
}

/* the body fails with this status and names this field */
#define CHECK_REJECTS(api, body, status_, param_)                                                   \
    do {                                                                                            \
        srv_request r_;                                                                             \
        srv_error e_;                                                                               \
        memset(&e_, 0, sizeof e_);                                                                  \
        CHECK_MSG(parse(api, body, &r_, &e_) == -1, "accepted: %s", body);                          \
        CHECK_MSG(e_.status == (status_), "%s: status %d", body, e_.status);                        \
        CHECK_MSG(strcmp(e_.param, param_) == 0, "%s: param '%s' (%s)", body, e_.param, e_.message); \
        srv_request_free(&r_);                                                                      \
    } while (0)

#define CHAT(extra) "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]" extra "}"

static void test_chat(void)
{
    srv_request r;
    srv_error e;
    CHECK(parse(SRV_API_CHAT,
                "{\"model\":\"tiny\",\"messages\":[{\"role\":\"developer\",\"content\":\"Be brief.\"},"
                "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},{\"type\":\"text\",\"text\":\"b\"}]},"
                "{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":\"c1\",\"type\":\"function\","
                "\"function\":{\"name\":\"f\",\"arguments\":\"{}\"}}]},"
                "{\"role\":\"tool\",\"tool_call_id\":\"c1\",\"content\":\"42\"}],"
                "\"temperature\":0.5,\"top_p\":0.9,\"max_tokens\":7,\"stop\":[\"x\",\"yz\"],\"seed\":-1,"
                "\"presence_penalty\":0.5,\"frequency_penalty\":-0.5,\"logit_bias\":{\"5\":-100,\"7\":2.5},"
                "\"logprobs\":true,\"top_logprobs\":3,\"n\":2,\"user\":\"u1\",\"stream\":true,"
                "\"stream_options\":{\"include_usage\":true},\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\"}}],"
                "\"store\":false,\"service_tier\":\"auto\",\"metadata\":null,\"functions\":null}",
                &r, &e) == 0);
    CHECK(r.api == SRV_API_CHAT && r.n == 2 && r.stream && r.include_usage);
    CHECK(r.sampling.temperature == 0.5f && r.sampling.top_p == 0.9f && r.max_tokens == 7);
    CHECK(r.sampling.presence_penalty == 0.5f && r.sampling.frequency_penalty == -0.5f);
    CHECK(r.has_seed && r.sampling.seed == UINT64_MAX);
    CHECK(r.sampling.n_stop == 2 && strcmp(r.sampling.stop[1], "yz") == 0);
    CHECK(r.sampling.n_logit_bias == 2 && r.sampling.logit_bias[1].id == 7 && r.sampling.logit_bias[1].bias == 2.5f);
    CHECK(r.logprobs == 1 && r.sampling.logprobs && r.sampling.top_logprobs == 3);
    CHECK(r.user && strcmp(r.user, "u1") == 0);
    CHECK(json_array_size(r.messages) == 4);
    CHECK_EQ_STR(json_string_value(json_object_get(json_array_get(r.messages, 0), "role")), "system");
    CHECK_EQ_STR(json_string_value(json_object_get(json_array_get(r.messages, 1), "content")), "a\nb");
    CHECK(json_is_array(json_object_get(json_array_get(r.messages, 2), "tool_calls")));
    CHECK_EQ_STR(json_string_value(json_object_get(json_array_get(r.messages, 3), "tool_call_id")), "c1");
    CHECK(json_array_size(json_object_get(r.template_extra, "tools")) == 1);
    srv_request_free(&r);

    /* nulls count as absent; defaults */
    CHECK(parse(SRV_API_CHAT, CHAT(",\"stop\":null,\"max_tokens\":null,\"temperature\":null,\"seed\":null"), &r, &e) == 0);
    CHECK(r.n == 1 && !r.stream && r.max_tokens == 0 && r.sampling.temperature == 1.0f && !r.has_seed);
    CHECK(r.sampling.n_stop == 0 && r.logprobs == 0);
    srv_request_free(&r);
    CHECK(parse(SRV_API_CHAT, CHAT(",\"max_completion_tokens\":9,\"stop\":\"END\",\"top_p\":0"), &r, &e) == 0);
    CHECK(r.max_tokens == 9 && r.sampling.n_stop == 1 && r.sampling.temperature == 0);
    srv_request_free(&r);
    /* two requests without a seed get different seeds */
    srv_request r2;
    CHECK(parse(SRV_API_CHAT, CHAT(""), &r, &e) == 0 && parse(SRV_API_CHAT, CHAT(""), &r2, &e) == 0);
    CHECK(r.sampling.seed != r2.sampling.seed);
    srv_request_free(&r);
    srv_request_free(&r2);

    CHECK_REJECTS(SRV_API_CHAT, "{\"model\":\"tiny\",", 400, "");
    CHECK_REJECTS(SRV_API_CHAT, "[1,2]", 400, "");
    CHECK_REJECTS(SRV_API_CHAT, "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}", 400, "");
    CHECK_REJECTS(SRV_API_CHAT, "{\"model\":\"tiny\",\"model\":\"tiny\",\"messages\":[]}", 400, "");
    CHECK_REJECTS(SRV_API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 400, "model");
    CHECK_REJECTS(SRV_API_CHAT, "{\"model\":\"gpt-4\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 404, "model");
    CHECK_REJECTS(SRV_API_CHAT, "{\"model\":\"tiny\"}", 400, "messages");
    CHECK_REJECTS(SRV_API_CHAT, "{\"model\":\"tiny\",\"messages\":[]}", 400, "messages");
    CHECK_REJECTS(SRV_API_CHAT, "{\"model\":\"tiny\",\"messages\":\"hi\"}", 400, "messages");
    CHECK_REJECTS(SRV_API_CHAT, "{\"model\":\"tiny\",\"messages\":[3]}", 400, "messages[0]");
    CHECK_REJECTS(SRV_API_CHAT, "{\"model\":\"tiny\",\"messages\":[{\"content\":\"hi\"}]}", 400, "messages[0].role");
    CHECK_REJECTS(SRV_API_CHAT, "{\"model\":\"tiny\",\"messages\":[{\"role\":\"robot\",\"content\":\"hi\"}]}", 400,
                  "messages[0].role");
    CHECK_REJECTS(SRV_API_CHAT, "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\"}]}", 400, "messages[0].content");
    CHECK_REJECTS(SRV_API_CHAT, "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":5}]}", 400,
                  "messages[0].content");
    CHECK_REJECTS(SRV_API_CHAT,
                  "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"ok\"},{\"role\":\"user\","
                  "\"content\":[{\"type\":\"text\",\"text\":\"a\"},{\"type\":\"image_url\",\"image_url\":{\"url\":\"x\"}}]}]}",
                  400, "messages[1].content[1]");
    /* jansson refuses \u0000 itself: no NUL ever reaches a C string */
    CHECK_REJECTS(SRV_API_CHAT, "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"a\\u0000b\"}]}", 400, "");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"temperature\":3"), 400, "temperature");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"temperature\":\"hot\""), 400, "temperature");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"top_p\":1.5"), 400, "top_p");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"n\":0"), 400, "n");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"n\":17"), 400, "n");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"n\":1.5"), 400, "n");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"max_tokens\":0"), 400, "max_tokens");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"max_tokens\":-5"), 400, "max_tokens");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"max_completion_tokens\":\"9\""), 400, "max_completion_tokens");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"stop\":\"\""), 400, "stop");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"stop\":[\"a\",7]"), 400, "stop[1]");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"stop\":[\"1\",\"2\",\"3\",\"4\",\"5\",\"6\",\"7\",\"8\",\"9\",\"10\",\"11\",\"12\","
                                     "\"13\",\"14\",\"15\",\"16\",\"17\"]"),
                  400, "stop");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"stop\":{}"), 400, "stop");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"seed\":\"1\""), 400, "seed");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"presence_penalty\":2.5"), 400, "presence_penalty");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"frequency_penalty\":-3"), 400, "frequency_penalty");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"logit_bias\":{\"99999\":1}"), 400, "logit_bias");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"logit_bias\":{\"abc\":1}"), 400, "logit_bias");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"logit_bias\":{\"5\":101}"), 400, "logit_bias");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"logit_bias\":[1]"), 400, "logit_bias");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"top_logprobs\":2"), 400, "top_logprobs");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"logprobs\":true,\"top_logprobs\":21"), 400, "top_logprobs");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"logprobs\":1"), 400, "logprobs");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"stream_options\":{\"include_usage\":true}"), 400, "stream_options");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"stream\":true,\"stream_options\":{\"include_usage\":1}"), 400,
                  "stream_options.include_usage");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"stream\":\"yes\""), 400, "stream");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"response_format\":{\"type\":\"yaml\"}"), 400, "response_format.type");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"tools\":{}"), 400, "tools");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"user\":5"), 400, "user");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"top_k\":-2"), 400, "top_k");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"priority\":5000"), 400, "priority");
}

#define COMPLETION(extra) "{\"model\":\"tiny\",\"prompt\":\"def f(\"" extra "}"

static void test_completions(void)
{
    srv_request r;
    srv_error e;
    CHECK(parse(SRV_API_COMPLETION, COMPLETION(",\"echo\":true,\"logprobs\":2,\"max_tokens\":4,\"best_of\":1"), &r, &e) == 0);
    CHECK(r.n_prompts == 1 && strcmp(r.prompts[0].text, "def f(") == 0 && r.echo && r.max_tokens == 4);
    CHECK(r.logprobs == 3 && r.sampling.logprobs && r.sampling.top_logprobs == 2);
    srv_request_free(&r);
    CHECK(parse(SRV_API_COMPLETION, "{\"model\":\"tiny\",\"prompt\":[\"a\",\"b\",[1,2,3]],\"n\":2}", &r, &e) == 0);
    CHECK(r.n_prompts == 3 && r.n == 2 && r.prompts[2].n_ids == 3 && r.prompts[2].ids[2] == 3 && !r.prompts[2].text);
    srv_request_free(&r);
    CHECK(parse(SRV_API_COMPLETION, "{\"model\":\"tiny\",\"prompt\":[5,6]}", &r, &e) == 0);
    CHECK(r.n_prompts == 1 && r.prompts[0].n_ids == 2 && r.prompts[0].ids[0] == 5);
    srv_request_free(&r);
    CHECK(parse(SRV_API_COMPLETION, COMPLETION(",\"logprobs\":0"), &r, &e) == 0);
    CHECK(r.logprobs == 1 && r.sampling.top_logprobs == 0);
    srv_request_free(&r);

    CHECK_REJECTS(SRV_API_COMPLETION, "{\"model\":\"tiny\"}", 400, "prompt");
    CHECK_REJECTS(SRV_API_COMPLETION, "{\"model\":\"tiny\",\"prompt\":[]}", 400, "prompt");
    CHECK_REJECTS(SRV_API_COMPLETION, "{\"model\":\"tiny\",\"prompt\":5}", 400, "prompt");
    CHECK_REJECTS(SRV_API_COMPLETION, "{\"model\":\"tiny\",\"prompt\":[1,99999]}", 400, "prompt");
    CHECK_REJECTS(SRV_API_COMPLETION, "{\"model\":\"tiny\",\"prompt\":[\"a\",{}]}", 400, "prompt[1]");
    CHECK_REJECTS(SRV_API_COMPLETION, "{\"model\":\"tiny\",\"prompt\":[\"a\",[]]}", 400, "prompt[1]");
    CHECK_REJECTS(SRV_API_COMPLETION,
                  "{\"model\":\"tiny\",\"n\":16,\"prompt\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}", 400, "prompt");
    CHECK_REJECTS(SRV_API_COMPLETION, COMPLETION(",\"logprobs\":6"), 400, "logprobs");
    CHECK_REJECTS(SRV_API_COMPLETION, COMPLETION(",\"logprobs\":true"), 400, "logprobs");
    CHECK(parse(SRV_API_COMPLETION, COMPLETION(",\"best_of\":3,\"n\":2"), &r, &e) == 0);
    CHECK(r.n == 3 && r.best_of == 3 && r.n_answers == 2 && r.sampling.logprobs && r.logprobs == 0);
    srv_request_free(&r);
    CHECK_REJECTS(SRV_API_COMPLETION, COMPLETION(",\"best_of\":1,\"n\":2"), 400, "best_of");
    CHECK_REJECTS(SRV_API_COMPLETION, COMPLETION(",\"best_of\":2,\"stream\":true"), 400, "best_of");
    CHECK_REJECTS(SRV_API_COMPLETION, "{\"model\":\"tiny\",\"best_of\":16,\"prompt\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}",
                  400, "best_of");
    CHECK_REJECTS(SRV_API_COMPLETION, COMPLETION(",\"suffix\":\"end\""), 400, "suffix");
    CHECK_REJECTS(SRV_API_COMPLETION, COMPLETION(",\"echo\":1"), 400, "echo");
    CHECK_REJECTS(SRV_API_COMPLETION, "{\"model\":\"other\",\"prompt\":\"x\"}", 404, "model");
}

static void test_tgi(void)
{
    srv_request r;
    srv_error e;
    CHECK(parse(SRV_API_TGI, "{\"inputs\":\"def f(\"}", &r, &e) == 0);
    CHECK(r.sampling.temperature == 0 && r.max_tokens == 0 && !r.details && r.n == 1); /* greedy by default */
    srv_request_free(&r);
    CHECK(parse(SRV_API_TGI,
                "{\"inputs\":\"x\",\"parameters\":{\"max_new_tokens\":5,\"temperature\":0.7,\"top_k\":10,\"top_p\":0.9,"
                "\"repetition_penalty\":1.1,\"stop\":[\"\\n\"],\"seed\":3,\"details\":true,\"top_n_tokens\":2,"
                "\"adapter_id\":\"tiny\",\"return_full_text\":false,\"watermark\":false}}",
                &r, &e) == 0);
    CHECK(r.max_tokens == 5 && r.sampling.temperature == 0.7f && r.sampling.top_k == 10 && r.sampling.top_p == 0.9f);
    CHECK(r.sampling.repetition_penalty == 1.1f && r.sampling.n_stop == 1 && r.has_seed && r.sampling.seed == 3);
    CHECK(r.details && r.sampling.logprobs && r.sampling.top_logprobs == 2 && !r.echo);
    srv_request_free(&r);
    CHECK(parse(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"do_sample\":true,\"return_full_text\":true}}", &r, &e) == 0);
    CHECK(r.sampling.temperature == 1.0f && r.echo);
    srv_request_free(&r);

    CHECK_REJECTS(SRV_API_TGI, "{}", 400, "inputs");
    CHECK_REJECTS(SRV_API_TGI, "{\"inputs\":[\"a\"]}", 400, "inputs");
    CHECK_REJECTS(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":5}", 400, "parameters");
    CHECK_REJECTS(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"temperature\":0}}", 400, "temperature");
    CHECK_REJECTS(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"top_p\":1.0}}", 400, "top_p");
    CHECK_REJECTS(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"top_k\":0}}", 400, "top_k");
    CHECK_REJECTS(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"max_new_tokens\":0}}", 400, "max_new_tokens");
    CHECK_REJECTS(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"best_of\":2}}", 400, "parameters.best_of");
    CHECK_REJECTS(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"watermark\":true}}", 400, "parameters.watermark");
    CHECK_REJECTS(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"adapter_id\":\"my-lora\"}}", 404,
                  "parameters.adapter_id");
    srv_request bad;
    CHECK(parse(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"adapter_id\":\"my-lora\"}}", &bad, &e) == -1);
    CHECK(strstr(e.message, "my-lora") && strstr(e.message, "not loaded") && e.code && !strcmp(e.code, "adapter_not_found"));
    srv_request_free(&bad);
}

/* with adapters, another model name or a TGI adapter_id names an adapter (resolved against
 * the model later); LoRAX's other adapter sources, merging and hub tokens are refused */
static void test_adapters(void)
{
    srv_request r;
    srv_error e;
    const char *sql = "{\"model\":\"sql\",\"prompt\":\"x\"}", *base = "{\"model\":\"tiny\",\"prompt\":\"x\"}";
    CHECK(srv_request_parse(SRV_API_COMPLETION, sql, strlen(sql), &LORA_FACTS, &r, &e) == 0);
    CHECK(r.adapter_id && !strcmp(r.adapter_id, "sql") && !strcmp(r.model, "sql") && !r.adapter);
    srv_request_free(&r);
    CHECK(srv_request_parse(SRV_API_COMPLETION, base, strlen(base), &LORA_FACTS, &r, &e) == 0);
    CHECK(!r.adapter_id);
    srv_request_free(&r);
    const char *tgi = "{\"inputs\":\"x\",\"stream\":true,\"parameters\":{\"adapter_id\":\"sql\",\"adapter_source\":\"local\"}}";
    CHECK(srv_request_parse(SRV_API_TGI, tgi, strlen(tgi), &LORA_FACTS, &r, &e) == 0);
    CHECK(r.adapter_id && !strcmp(r.adapter_id, "sql") && r.stream);
    srv_request_free(&r);
    const char *bad[][2] = {
        {"{\"inputs\":\"x\",\"parameters\":{\"adapter_id\":\"sql\",\"adapter_source\":\"hub\"}}", "parameters.adapter_source"},
        {"{\"inputs\":\"x\",\"parameters\":{\"adapter_id\":\"sql\",\"api_token\":\"t\"}}", "parameters.api_token"},
        {"{\"inputs\":\"x\",\"parameters\":{\"merged_adapters\":{\"ids\":[\"a\",\"b\"]}}}", "parameters.merged_adapters"},
        {"{\"inputs\":\"x\",\"stream\":3}", "stream"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK(srv_request_parse(SRV_API_TGI, bad[i][0], strlen(bad[i][0]), &LORA_FACTS, &r, &e) == -1);
        CHECK_MSG(e.status == 400 && !strcmp(e.param, bad[i][1]), "%s: %d %s", bad[i][0], e.status, e.param);
    }
}

/* scoring: echo + logprobs asks for the prompt's logprobs, max_tokens 0 generates nothing,
 * vLLM's prompt_logprobs, min_tokens */
static void test_scoring_fields(void)
{
    srv_request r;
    srv_error e;
    CHECK(parse(SRV_API_COMPLETION, COMPLETION(",\"echo\":true,\"logprobs\":3,\"max_tokens\":0"), &r, &e) == 0);
    CHECK(r.echo_logprobs && r.sampling.prompt_logprobs && r.sampling.prompt_top_logprobs == 3);
    CHECK(r.max_tokens == ZSE_MAX_TOKENS_NONE && r.prompt_logprobs == 0);
    srv_request_free(&r);
    CHECK(parse(SRV_API_COMPLETION, COMPLETION(",\"echo\":true"), &r, &e) == 0); /* echo alone scores nothing */
    CHECK(!r.echo_logprobs && !r.sampling.prompt_logprobs && r.max_tokens == 0);
    srv_request_free(&r);
    CHECK(parse(SRV_API_COMPLETION, COMPLETION(",\"logprobs\":1"), &r, &e) == 0); /* nor logprobs alone */
    CHECK(!r.echo_logprobs && !r.sampling.prompt_logprobs);
    srv_request_free(&r);
    CHECK(parse(SRV_API_COMPLETION, COMPLETION(",\"prompt_logprobs\":5,\"min_tokens\":2"), &r, &e) == 0);
    CHECK(r.prompt_logprobs == 6 && r.sampling.prompt_logprobs && r.sampling.prompt_top_logprobs == 5);
    CHECK(r.sampling.min_tokens == 2 && !r.echo_logprobs);
    srv_request_free(&r);
    CHECK(parse(SRV_API_CHAT, CHAT(",\"prompt_logprobs\":0"), &r, &e) == 0);
    CHECK(r.prompt_logprobs == 1 && r.sampling.prompt_logprobs && r.sampling.prompt_top_logprobs == 0);
    srv_request_free(&r);
    CHECK_REJECTS(SRV_API_COMPLETION, COMPLETION(",\"max_tokens\":-1"), 400, "max_tokens");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"max_tokens\":0"), 400, "max_tokens");
    CHECK_REJECTS(SRV_API_COMPLETION, COMPLETION(",\"prompt_logprobs\":21"), 400, "prompt_logprobs");
    CHECK_REJECTS(SRV_API_COMPLETION, COMPLETION(",\"prompt_logprobs\":true"), 400, "prompt_logprobs");
    CHECK_REJECTS(SRV_API_COMPLETION, COMPLETION(",\"stream\":true,\"prompt_logprobs\":1"), 400, "prompt_logprobs");
    CHECK_REJECTS(SRV_API_COMPLETION, COMPLETION(",\"min_tokens\":-1"), 400, "min_tokens");
}

/* TGI: every token's logprob, top_n_tokens, decoder_input_details, best_of, truncate,
 * typical_p; what cannot stream is refused when the route streams */
static void test_tgi_parity(void)
{
    srv_request r;
    srv_error e;
    CHECK(parse(SRV_API_TGI, "{\"inputs\":\"x\"}", &r, &e) == 0);
    CHECK(r.sampling.logprobs && r.logprobs == 0 && r.best_of == 1 && r.n == 1); /* streamed tokens carry logprobs */
    srv_request_free(&r);
    CHECK(parse(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"details\":true,\"decoder_input_details\":true,"
                             "\"top_n_tokens\":4,\"truncate\":7,\"typical_p\":1.0}}", &r, &e) == 0);
    CHECK(r.decoder_input_details && r.sampling.prompt_logprobs && r.top_n_tokens == 4 && r.sampling.top_logprobs == 4);
    CHECK(r.truncate == 7 && r.logprobs == 5);
    CHECK(srv_request_set_stream(&r, true, &e) == -1 && !strcmp(e.param, "parameters.decoder_input_details"));
    srv_request_free(&r);
    /* LoRAX: return_k_alternatives asks for as many alternatives as top_n_tokens would; ignore_eos_token */
    CHECK(parse(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"return_k_alternatives\":3,\"top_n_tokens\":1,"
                             "\"ignore_eos_token\":true}}", &r, &e) == 0);
    CHECK(r.k_alternatives == 3 && r.top_n_tokens == 1 && r.sampling.top_logprobs == 3 && r.sampling.ignore_eos);
    srv_request_free(&r);
    CHECK_REJECTS(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"return_k_alternatives\":0}}", 400,
                  "return_k_alternatives");
    /* without details there is no prefill to fill: the prompt is not scored */
    CHECK(parse(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"decoder_input_details\":true}}", &r, &e) == 0);
    CHECK(!r.sampling.prompt_logprobs);
    srv_request_free(&r);
    CHECK(parse(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"best_of\":3,\"do_sample\":true}}", &r, &e) == 0);
    CHECK(r.best_of == 3 && r.n == 3 && r.sampling.temperature == 1.0f);
    CHECK(srv_request_set_stream(&r, false, &e) == 0);
    CHECK(srv_request_set_stream(&r, true, &e) == -1 && !strcmp(e.param, "parameters.best_of"));
    srv_request_free(&r);
    CHECK_REJECTS(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"best_of\":2,\"do_sample\":true,\"seed\":4}}", 400,
                  "parameters.seed");
    CHECK_REJECTS(SRV_API_TGI, "{\"inputs\":\"x\",\"stream\":true,\"parameters\":{\"best_of\":2,\"top_k\":5}}", 400,
                  "parameters.best_of");
    CHECK_REJECTS(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"best_of\":17,\"do_sample\":true}}", 400, "best_of");
    CHECK_REJECTS(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"typical_p\":0.5}}", 400, "parameters.typical_p");
    CHECK_REJECTS(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"truncate\":0}}", 400, "truncate");
    CHECK_REJECTS(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"top_n_tokens\":6}}", 400, "top_n_tokens");
    CHECK_REJECTS(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"decoder_input_details\":1}}", 400,
                  "decoder_input_details");
}

/* chat template options; --served-model-name's aliases */
static void test_template_options(void)
{
    srv_request r;
    srv_error e;
    CHECK(parse(SRV_API_CHAT, CHAT(""), &r, &e) == 0);
    CHECK(r.add_generation_prompt && !r.continue_final_message && !r.template_extra);
    srv_request_free(&r);
    const char *cont = "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},"
                       "{\"role\":\"assistant\",\"content\":\"He\"}],\"continue_final_message\":true,"
                       "\"chat_template_kwargs\":{\"enable_thinking\":false,\"date_string\":\"1 Jan\"}}";
    CHECK(parse(SRV_API_CHAT, cont, &r, &e) == 0);
    CHECK(r.continue_final_message && !r.add_generation_prompt); /* continuing opens no new turn */
    CHECK(json_is_false(json_object_get(r.template_extra, "enable_thinking")));
    CHECK_EQ_STR(json_string_value(json_object_get(r.template_extra, "date_string")), "1 Jan");
    srv_request_free(&r);
    CHECK(parse(SRV_API_CHAT, CHAT(",\"add_generation_prompt\":false"), &r, &e) == 0 && !r.add_generation_prompt);
    srv_request_free(&r);
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"continue_final_message\":true"), 400, "continue_final_message");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"chat_template_kwargs\":[]"), 400, "chat_template_kwargs");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"chat_template_kwargs\":{\"tools\":[]}"), 400, "chat_template_kwargs");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"add_generation_prompt\":\"yes\""), 400, "add_generation_prompt");

    static const char *const names[] = {"tiny", "alias-b"};
    srv_model_facts mf = FACTS;
    mf.aliases = names;
    mf.n_aliases = 2;
    CHECK(srv_model_name_is(&mf, "tiny") && srv_model_name_is(&mf, "alias-b") && !srv_model_name_is(&mf, "alias"));
    CHECK(!srv_model_name_is(&mf, NULL));
    const char *body = "{\"model\":\"alias-b\",\"prompt\":\"x\"}";
    CHECK(srv_request_parse(SRV_API_COMPLETION, body, strlen(body), &mf, &r, &e) == 0 && !r.adapter_id);
    srv_request_free(&r);
    CHECK(srv_request_parse(SRV_API_COMPLETION, body, strlen(body), &FACTS, &r, &e) == -1 && e.status == 404);
    srv_request_free(&r);
}


/* srv_check_fields: the one check every route's objects go through */
static void test_check_fields(void)
{
    static const char *const few[] = {"a", "b", NULL};
    srv_error e;
    json_t *o = json_loads("{\"a\":1,\"b\":null}", 0, NULL);
    CHECK(srv_check_fields(o, few, "", "/x", &e) == 0);
    json_decref(o);
    CHECK(srv_check_fields(NULL, few, "", "/x", &e) == 0); /* absent or not an object: the parser's to judge */
    o = json_loads("[1]", 0, NULL);
    CHECK(srv_check_fields(o, few, "", "/x", &e) == 0);
    json_decref(o);
    memset(&e, 0, sizeof e);
    o = json_loads("{\"a\":1,\"foo\":null}", 0, NULL); /* null does not make an unknown field known */
    CHECK(srv_check_fields(o, few, "", "/v1/x", &e) == -1);
    CHECK(e.status == 400 && !strcmp(e.type, "invalid_request_error") && !strcmp(e.param, "foo"));
    CHECK_EQ_STR(e.message, "unsupported field 'foo' for /v1/x; remove it (it takes: a, b)");
    json_decref(o);
    o = json_loads("{\"b\":1,\"x\\ny\":2}", 0, NULL); /* nested: the path; control characters escaped */
    CHECK(srv_check_fields(o, few, "parameters", "/generate", &e) == -1);
    CHECK_EQ_STR(e.param, "parameters.x\\x0ay");
    CHECK_EQ_STR(e.message, "unsupported field 'parameters.x\\x0ay' for /generate; remove it (parameters takes: a, b)");
    json_decref(o);
    /* a list too long to name points to the docs */
    static const char *long_list[40];
    char names[39][12];
    for (int i = 0; i < 39; i++) {
        snprintf(names[i], sizeof names[i], "field_%02d", i);
        long_list[i] = names[i];
    }
    long_list[39] = NULL;
    o = json_loads("{\"field_38\":1,\"zz\":2}", 0, NULL);
    CHECK(srv_check_fields(o, long_list, "", "/v1/chat/completions", &e) == -1);
    CHECK_EQ_STR(e.message, "unsupported field 'zz' for /v1/chat/completions; remove it (docs/SERVER.md lists the "
                            "fields it takes)");
    json_decref(o);
}

/* the message names the field and the route */
#define CHECK_UNSUPPORTED(api, body, param_, route_)                                                        \
    do {                                                                                                    \
        srv_request r_;                                                                                     \
        srv_error e_;                                                                                       \
        memset(&e_, 0, sizeof e_);                                                                          \
        CHECK_MSG(parse(api, body, &r_, &e_) == -1, "accepted: %s", body);                                 \
        CHECK_MSG(e_.status == 400 && !strcmp(e_.param, param_), "%s: %d '%s' (%s)", body, e_.status, e_.param, \
                  e_.message);                                                                              \
        char want_[160];                                                                                    \
        snprintf(want_, sizeof want_, "unsupported field '%s' for %s; remove it", param_, route_);         \
        CHECK_MSG(strstr(e_.message, want_) == e_.message, "%s: %s", body, e_.message);                    \
        srv_request_free(&r_);                                                                              \
    } while (0)

/* every object a route reads refuses a field it does not know, top-level and nested */
static void test_unknown_fields(void)
{
    const char *chat = "/v1/chat/completions", *cmpl = "/v1/completions", *tgi = "/generate (and / and /generate_stream)";
    CHECK_UNSUPPORTED(SRV_API_CHAT, CHAT(",\"foo\":1"), "foo", chat);
    CHECK_UNSUPPORTED(SRV_API_CHAT, CHAT(",\"echo\":true"), "echo", chat); /* a completions field */
    CHECK_UNSUPPORTED(SRV_API_CHAT, CHAT(",\"stream\":true,\"stream_options\":{\"include_usage\":true,\"x\":1}"),
                      "stream_options.x", chat);
    CHECK_UNSUPPORTED(SRV_API_CHAT, CHAT(",\"response_format\":{\"type\":\"json_object\",\"schema\":{}}"),
                      "response_format.schema", chat);
    CHECK_UNSUPPORTED(SRV_API_CHAT, CHAT(",\"response_format\":{\"type\":\"json_schema\",\"json_schema\":"
                                         "{\"name\":\"n\",\"schema\":{},\"strikt\":true}}"),
                      "response_format.json_schema.strikt", chat);
    CHECK_UNSUPPORTED(SRV_API_CHAT, CHAT(",\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\",\"x\":1}}]"),
                      "tools[0].function.x", chat);
    CHECK_UNSUPPORTED(SRV_API_CHAT, CHAT(",\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\"},\"y\":1}]"),
                      "tools[0].y", chat);
    CHECK_UNSUPPORTED(SRV_API_CHAT, CHAT(",\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\"}}],"
                                         "\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":\"f\",\"z\":1}}"),
                      "tool_choice.function.z", chat);
    CHECK_UNSUPPORTED(SRV_API_CHAT, CHAT(",\"structured_outputs\":{\"regex\":\"a\",\"q\":1}"), "structured_outputs.q",
                      chat);
    CHECK_UNSUPPORTED(SRV_API_CHAT, "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\",\"w\":1}]}",
                      "messages[0].w", chat);
    CHECK_UNSUPPORTED(SRV_API_CHAT, "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":"
                                    "[{\"type\":\"text\",\"text\":\"a\",\"cache_control\":{}}]}]}",
                      "messages[0].content[0].cache_control", chat);
    CHECK_UNSUPPORTED(SRV_API_COMPLETION, "{\"model\":\"tiny\",\"prompt\":\"x\",\"foo\":null}", "foo", cmpl);
    CHECK_UNSUPPORTED(SRV_API_COMPLETION, "{\"model\":\"tiny\",\"prompt\":\"x\",\"tools\":[]}", "tools", cmpl);
    CHECK_UNSUPPORTED(SRV_API_COMPLETION, "{\"model\":\"tiny\",\"prompt\":\"x\",\"stream\":true,\"stream_options\":"
                                          "{\"continuous_usage_stats\":true}}",
                      "stream_options.continuous_usage_stats", cmpl);
    CHECK_UNSUPPORTED(SRV_API_TGI, "{\"inputs\":\"x\",\"foo\":1}", "foo", tgi);
    CHECK_UNSUPPORTED(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"max_new_tokens\":2,\"foo\":1}}", "parameters.foo",
                      tgi);
    CHECK_UNSUPPORTED(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"grammar\":{\"type\":\"regex\",\"value\":\"a\","
                                   "\"x\":1}}}",
                      "parameters.grammar.x", tgi);
    CHECK_UNSUPPORTED(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"response_format\":{\"type\":\"json_object\","
                                   "\"schema\":{},\"strict\":true}}}",
                      "parameters.response_format.strict", tgi);

    /* what OpenAI takes only at its default, and null as not given */
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"store\":true"), 400, "store");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"metadata\":{\"a\":\"b\"}"), 400, "metadata");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"service_tier\":\"flex\""), 400, "service_tier");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\",\"strict\":true}}]"),
                  400, "tools[0].function.strict");
    CHECK_REJECTS(SRV_API_CHAT, "{\"model\":\"tiny\",\"messages\":[{\"role\":\"assistant\",\"content\":\"a\","
                                "\"refusal\":\"no\"}]}", 400, "messages[0].refusal");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"response_format\":{\"type\":\"text\",\"json_schema\":{\"schema\":{}}}"), 400,
                  "response_format.json_schema");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"stream_options\":{\"include_usage\":true}"), 400, "stream_options");
    srv_request r;
    srv_error e;
    CHECK(parse(SRV_API_CHAT, "{\"model\":\"tiny\",\"messages\":[{\"role\":\"assistant\",\"content\":\"a\",\"refusal\":null,"
                              "\"audio\":null,\"function_call\":null,\"name\":null}],\"stream_options\":null,\"tools\":"
                              "[{\"type\":\"function\",\"function\":{\"name\":\"f\",\"description\":\"d\",\"parameters\":{},"
                              "\"strict\":false}}],\"n\":null,\"stop\":null,\"logit_bias\":null,\"response_format\":"
                              "{\"type\":\"json_schema\",\"json_schema\":{\"name\":\"n\",\"description\":\"d\",\"schema\":"
                              "{\"type\":\"object\"},\"strict\":null}},\"store\":null,\"service_tier\":null}",
                &r, &e) == 0);
    CHECK(r.n == 1 && r.n_stop == 0 && r.structured.kind == SRV_GRAMMAR_JSON_SCHEMA && !r.structured.strict);
    srv_request_free(&r);
    /* text-generation's client sends every parameter, null when not set */
    CHECK(parse(SRV_API_TGI, "{\"inputs\":\"x\",\"stream\":false,\"parameters\":{\"best_of\":null,\"decoder_input_details\":"
                             "false,\"details\":true,\"do_sample\":false,\"frequency_penalty\":null,\"grammar\":null,"
                             "\"max_new_tokens\":5,\"repetition_penalty\":null,\"return_full_text\":false,\"seed\":null,"
                             "\"stop\":[],\"temperature\":null,\"top_k\":null,\"top_n_tokens\":null,\"top_p\":null,"
                             "\"truncate\":null,\"typical_p\":null,\"watermark\":false,\"adapter_id\":null,"
                             "\"adapter_source\":null,\"merged_adapters\":null,\"api_token\":null,\"ignore_eos_token\":false,"
                             "\"response_format\":null,\"return_k_alternatives\":null}}",
                &r, &e) == 0);
    CHECK(r.max_tokens == 5 && r.details && r.sampling.temperature == 0 && r.structured.kind == SRV_GRAMMAR_NONE);
    srv_request_free(&r);
    /* LoRAX's response_format constrains the output (with a schema, or any object) */
    CHECK(parse(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"response_format\":{\"type\":\"json_object\",\"schema\":"
                             "{\"type\":\"object\"}}}}", &r, &e) == 0);
    CHECK(r.structured.kind == SRV_GRAMMAR_JSON_SCHEMA && !strcmp(r.structured.text, "{\"type\":\"object\"}"));
    srv_request_free(&r);
    CHECK(parse(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"response_format\":{\"type\":\"json_object\"}}}", &r,
                &e) == 0);
    CHECK(r.structured.kind == SRV_GRAMMAR_JSON_OBJECT);
    srv_request_free(&r);
    CHECK_REJECTS(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"response_format\":{\"type\":\"json_object\"},"
                               "\"grammar\":{\"type\":\"regex\",\"value\":\"a\"}}}", 400, "parameters.grammar.value");
    CHECK_REJECTS(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"response_format\":{\"type\":\"text\"}}}", 400,
                  "parameters.response_format.type");
}

static void test_prepare(zse_model *m)
{
    srv_request r;
    srv_error e;
    zse_model_info info;
    zse_model_get_info(m, &info);
    srv_model_facts facts = {"tiny", info.vocab_size, info.ctx_size, 0, false, NULL, 0};
    CHECK(parse(SRV_API_CHAT, "{\"model\":\"tiny\",\"messages\":[{\"role\":\"system\",\"content\":\"S\"},"
                              "{\"role\":\"user\",\"content\":\"hi\"}]}", &r, &e) == 0);
    CHECK(srv_request_prepare(&r, m, &facts, &e) == 0);
    CHECK(r.prompts[0].text && strstr(r.prompts[0].text, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"));
    int32_t *ids;
    size_t n;
    CHECK(zse_tokenize(m, "<|im_start|>", 12, ZSE_TOK_PARSE_SPECIAL, &ids, &n) == 0 && n == 1);
    CHECK(r.prompts[0].n_ids > 5 && r.prompts[0].ids[0] == ids[0]); /* the template's special tokens are parsed */
    free(ids);
    CHECK(r.sampling.max_tokens == 0);
    srv_request_free(&r);

    /* completions: default 16 tokens; prompts given as ids stay as they are */
    CHECK(parse(SRV_API_COMPLETION, "{\"model\":\"tiny\",\"prompt\":[\"def f(\",[10,11,12]]}", &r, &e) == 0);
    CHECK(srv_request_prepare(&r, m, &facts, &e) == 0);
    CHECK(r.sampling.max_tokens == 16 && r.prompts[0].n_ids > 0 && r.prompts[1].n_ids == 3 && r.prompts[1].ids[0] == 10);
    srv_request_free(&r);
    CHECK(parse(SRV_API_TGI, "{\"inputs\":\"def f(\"}", &r, &e) == 0);
    CHECK(srv_request_prepare(&r, m, &facts, &e) == 0 && r.sampling.max_tokens == 100);
    srv_request_free(&r);

    /* context limits name both numbers */
    zse_buf big = {0};
    zse_buf_puts(&big, "{\"model\":\"tiny\",\"prompt\":\"");
    for (int i = 0; i < 3000; i++)
        zse_buf_puts(&big, "x = 1\\n");
    zse_buf_puts(&big, "\"}");
    CHECK(parse(SRV_API_COMPLETION, big.data, &r, &e) == 0);
    CHECK(srv_request_prepare(&r, m, &facts, &e) == -1);
    CHECK(e.status == 400 && e.code && strcmp(e.code, "context_length_exceeded") == 0);
    char want[64];
    snprintf(want, sizeof want, "maximum context length is %d tokens", info.ctx_size);
    CHECK_MSG(strstr(e.message, want) != NULL, "%s", e.message);
    CHECK_MSG(strstr(e.message, "resulted in") != NULL, "%s", e.message);
    srv_request_free(&r);
    zse_buf_free(&big);

    CHECK(parse(SRV_API_CHAT, CHAT(",\"max_tokens\":1000000"), &r, &e) == 0);
    CHECK(srv_request_prepare(&r, m, &facts, &e) == -1);
    CHECK(e.status == 400 && strcmp(e.param, "max_tokens") == 0);
    CHECK_MSG(strstr(e.message, "1000000 in the completion") && strstr(e.message, want), "%s", e.message);
    srv_request_free(&r);

    /* a default length that would overrun stops at the context's end instead */
    zse_buf near = {0};
    zse_buf_puts(&near, "{\"model\":\"tiny\",\"prompt\":[");
    for (int i = 0; i < info.ctx_size - 4; i++)
        zse_buf_printf(&near, "%s%d", i ? "," : "", 10 + i % 50);
    zse_buf_puts(&near, "]}");
    CHECK(parse(SRV_API_COMPLETION, near.data, &r, &e) == 0);
    CHECK(srv_request_prepare(&r, m, &facts, &e) == 0 && r.sampling.max_tokens == 4);
    srv_request_free(&r);
    zse_buf_free(&near);

    CHECK(parse(SRV_API_COMPLETION, "{\"model\":\"tiny\",\"prompt\":\"\"}", &r, &e) == 0);
    CHECK(srv_request_prepare(&r, m, &facts, &e) == -1 && e.status == 400 && strcmp(e.param, "prompt") == 0);
    srv_request_free(&r);

    /* text that cannot fit is refused before tokenizing, by its bytes (chat: the rendering) */
    facts.max_prompt_bytes = 4000;
    zse_buf_puts(&big, "{\"model\":\"tiny\",\"prompt\":\"");
    for (int i = 0; i < 4001; i++)
        zse_buf_puts(&big, " ");
    zse_buf_puts(&big, "\"}");
    CHECK(parse(SRV_API_COMPLETION, big.data, &r, &e) == 0);
    CHECK(srv_request_prepare(&r, m, &facts, &e) == -1 && e.status == 400);
    CHECK(e.code && strcmp(e.code, "context_length_exceeded") == 0);
    CHECK_MSG(strstr(e.message, "4001 bytes") && strstr(e.message, want), "%s", e.message);
    CHECK(r.prompts[0].ids == NULL); /* never tokenized */
    srv_request_free(&r);
    zse_buf_free(&big);
    zse_buf_puts(&big, "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"");
    for (int i = 0; i < 3990; i++)
        zse_buf_puts(&big, "y");
    zse_buf_puts(&big, "\"}]}");
    CHECK(parse(SRV_API_CHAT, big.data, &r, &e) == 0);
    CHECK(srv_request_prepare(&r, m, &facts, &e) == -1 && strcmp(e.param, "messages") == 0);
    srv_request_free(&r);
    zse_buf_free(&big);
    /* the priority a client asked for, and whether it did */
    CHECK(parse(SRV_API_CHAT, CHAT(",\"priority\":-3"), &r, &e) == 0 && r.has_priority && r.priority == -3);
    srv_request_free(&r);
    CHECK(parse(SRV_API_CHAT, CHAT(""), &r, &e) == 0 && !r.has_priority);
    srv_request_free(&r);
}

/* preparation of the new fields against the model: max_tokens 0, min_tokens, truncate, the
 * template's options */
static void test_prepare_extras(zse_model *m)
{
    srv_request r;
    srv_error e;
    zse_model_info info;
    zse_model_get_info(m, &info);
    srv_model_facts facts = {"tiny", info.vocab_size, info.ctx_size, 0, false, NULL, 0};
    CHECK(parse(SRV_API_COMPLETION, COMPLETION(",\"max_tokens\":0,\"echo\":true,\"logprobs\":0"), &r, &e) == 0);
    CHECK(srv_request_prepare(&r, m, &facts, &e) == 0 && r.sampling.max_tokens == ZSE_MAX_TOKENS_NONE);
    srv_request_free(&r);
    CHECK(parse(SRV_API_COMPLETION, COMPLETION(",\"max_tokens\":2,\"min_tokens\":3"), &r, &e) == 0);
    CHECK(srv_request_prepare(&r, m, &facts, &e) == -1 && !strcmp(e.param, "min_tokens"));
    srv_request_free(&r);
    CHECK(parse(SRV_API_COMPLETION, COMPLETION(",\"max_tokens\":0,\"min_tokens\":1"), &r, &e) == 0);
    CHECK(srv_request_prepare(&r, m, &facts, &e) == -1 && !strcmp(e.param, "min_tokens"));
    srv_request_free(&r);

    /* truncate keeps the prompt's last tokens, and its text is theirs */
    int32_t *full;
    size_t n_full;
    const char *text = "def fibonacci(n):\n    return n";
    CHECK(zse_tokenize(m, text, strlen(text), ZSE_TOK_PARSE_SPECIAL | ZSE_TOK_ADD_SPECIAL, &full, &n_full) == 0);
    char body[256];
    snprintf(body, sizeof body, "{\"inputs\":\"def fibonacci(n):\\n    return n\",\"parameters\":{\"truncate\":3}}");
    CHECK(parse(SRV_API_TGI, body, &r, &e) == 0 && srv_request_prepare(&r, m, &facts, &e) == 0);
    CHECK(r.prompts[0].n_ids == 3 && memcmp(r.prompts[0].ids, full + n_full - 3, 3 * sizeof *full) == 0);
    char *tail = zse_detokenize(m, full + n_full - 3, 3, false);
    CHECK(tail && !strcmp(r.prompts[0].text, tail));
    free(tail);
    free(full);
    srv_request_free(&r);

    /* continue_final_message: the rendering stops at the end of the last message's content */
    const char *cont = "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},"
                       "{\"role\":\"assistant\",\"content\":\"Hello th \"}],\"continue_final_message\":true}";
    CHECK(parse(SRV_API_CHAT, cont, &r, &e) == 0 && srv_request_prepare(&r, m, &facts, &e) == 0);
    const char *t = r.prompts[0].text;
    CHECK_MSG(strlen(t) > 9 && !strcmp(t + strlen(t) - 8, "Hello th"), "%s", t);
    srv_request_free(&r);
    CHECK(parse(SRV_API_CHAT, CHAT(",\"add_generation_prompt\":false"), &r, &e) == 0);
    CHECK(srv_request_prepare(&r, m, &facts, &e) == 0);
    t = r.prompts[0].text;
    CHECK_MSG(!strcmp(t + strlen(t) - strlen("hi<|im_end|>\n"), "hi<|im_end|>\n"), "%s", t);
    srv_request_free(&r);

    /* a template set on the model replaces the file's, its variables from chat_template_kwargs */
    const char *file_tpl = zse_model_chat_template(m);
    CHECK(file_tpl != NULL);
    CHECK(zse_model_set_chat_template(m, "{{ greeting }}:{% for x in messages %}{{ x.content }}{% endfor %}") == 0);
    CHECK(parse(SRV_API_CHAT, CHAT(",\"chat_template_kwargs\":{\"greeting\":\"yo\"}"), &r, &e) == 0);
    CHECK(srv_request_prepare(&r, m, &facts, &e) == 0);
    CHECK_EQ_STR(r.prompts[0].text, "yo:hi");
    srv_request_free(&r);
    CHECK(zse_model_set_chat_template(m, NULL) == 0 && zse_model_chat_template(m) == file_tpl);
}

/* the tokenizer routes, /info, embeddings */
static void test_routes(zse_model *m)
{
    zse_model_info info;
    zse_model_get_info(m, &info);
    srv_model_facts facts = {"tiny", info.vocab_size, info.ctx_size, 0, false, NULL, 0};
    srv_error e;
    json_t *o;
#define BODY(s) s, strlen(s)
    CHECK(srv_tokenize(m, &facts, BODY("{\"prompt\":\"def f\",\"return_token_strs\":true}"), &o, &e) == 0);
    CHECK(json_integer_value(json_object_get(o, "count")) == 2 && json_array_size(json_object_get(o, "tokens")) == 2);
    CHECK(json_integer_value(json_object_get(o, "max_model_len")) == info.ctx_size);
    CHECK_EQ_STR(json_string_value(json_array_get(json_object_get(o, "token_strs"), 1)), " f");
    json_t *ids = json_incref(json_object_get(o, "tokens"));
    json_decref(o);
    char *ids_text = json_dumps(ids, JSON_COMPACT), body[256];
    snprintf(body, sizeof body, "{\"model\":\"tiny\",\"tokens\":%s}", ids_text);
    CHECK(srv_detokenize(m, &facts, BODY(body), &o, &e) == 0);
    CHECK_EQ_STR(json_string_value(json_object_get(o, "prompt")), "def f");
    json_decref(o);
    free(ids_text);
    json_decref(ids);
    CHECK(srv_tokenize(m, &facts, BODY("{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}"), &o, &e) == 0);
    CHECK(json_is_null(json_object_get(o, "token_strs")) && json_integer_value(json_object_get(o, "count")) > 5);
    json_decref(o);
    const char *bad[][3] = {
        {"{\"prompt\":5}", "prompt", "400"},
        {"{}", "prompt", "400"},
        {"{\"prompt\":\"x\",\"model\":\"other\"}", "model", "404"},
        {"{\"prompt\":\"x\",\"add_special_tokens\":1}", "add_special_tokens", "400"},
        {"{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"chat_template\":\"x\"}", "chat_template", "400"},
        {"{\"messages\":[{\"role\":\"bot\",\"content\":\"hi\"}]}", "messages[0].role", "400"},
        {"[1]", "", "400"},
        {"{\"prompt\":\"x\",\"truncate_prompt_tokens\":3}", "truncate_prompt_tokens", "400"},
        {"{\"prompt\":\"x\",\"add_generation_prompt\":true}", "add_generation_prompt", "400"},
        {"{\"messages\":[{\"role\":\"user\",\"content\":\"hi\",\"x\":1}]}", "messages[0].x", "400"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        memset(&e, 0, sizeof e);
        CHECK_MSG(srv_tokenize(m, &facts, BODY(bad[i][0]), &o, &e) == -1 && !o, "%s", bad[i][0]);
        CHECK_MSG(!strcmp(e.param, bad[i][1]) && e.status == atoi(bad[i][2]), "%s: %s %d", bad[i][0], e.param, e.status);
    }
    CHECK(srv_detokenize(m, &facts, BODY("{\"tokens\":[1,-2]}"), &o, &e) == -1 && !strcmp(e.param, "tokens"));
    CHECK(srv_detokenize(m, &facts, BODY("{\"tokens\":null}"), &o, &e) == -1 && !strcmp(e.param, "tokens"));
    CHECK(srv_detokenize(m, &facts, BODY("{\"tokens\":[1],\"skip_special_tokens\":true}"), &o, &e) == -1);
    CHECK(!strcmp(e.param, "skip_special_tokens") && strstr(e.message, "for /detokenize; remove it (it takes: model, tokens)"));
    CHECK(srv_tokenize(m, &facts, BODY("{\"prompt\":\"x\",\"foo\":1}"), &o, &e) == -1);
    CHECK(strstr(e.message, "unsupported field 'foo' for /tokenize; remove it") == e.message);

    o = srv_tokenizer_info(m, &facts);
    CHECK(o && json_is_string(json_object_get(o, "tokenizer_class")) && json_is_string(json_object_get(o, "eos_token")));
    CHECK(json_integer_value(json_object_get(o, "model_max_length")) == info.ctx_size);
    CHECK_EQ_STR(json_string_value(json_object_get(o, "chat_template")), zse_model_chat_template(m));
    json_decref(o);
    srv_tgi_limits lim = {.max_concurrent_requests = 9, .max_best_of = 16, .max_stop_sequences = 16,
                          .max_batch_size = 4, .validation_workers = 2};
    o = srv_tgi_info(m, &facts, &lim);
    CHECK(o && !strcmp(json_string_value(json_object_get(o, "model_id")), "tiny"));
    CHECK(json_integer_value(json_object_get(o, "max_total_tokens")) == info.ctx_size);
    CHECK(json_integer_value(json_object_get(o, "max_input_tokens")) == info.ctx_size - 1);
    CHECK(json_integer_value(json_object_get(o, "max_batch_size")) == 4 && !json_object_get(o, "max_batch_total_tokens"));
    CHECK_EQ_STR(json_string_value(json_object_get(o, "version")), zse_version());
    json_decref(o);

    /* embeddings: unit length, the same whether floats or base64, ids or text */
    int tokens = 0;
    CHECK(srv_embeddings(m, &facts, ZSE_POOL_MEAN, BODY("{\"model\":\"tiny\",\"input\":[\"def f\",[455,285]]}"), &o,
                         &tokens, NULL, 0, &e) == 0);
    json_t *data = json_object_get(o, "data");
    CHECK(json_array_size(data) == 2 && tokens == 4);
    json_t *v0 = json_object_get(json_array_get(data, 0), "embedding"), *v1 = json_object_get(json_array_get(data, 1), "embedding");
    CHECK((int)json_array_size(v0) == info.hidden_size);
    double norm = 0, diff = 0;
    for (size_t i = 0; i < json_array_size(v0); i++) {
        double a = json_real_value(json_array_get(v0, i)), b = json_real_value(json_array_get(v1, i));
        norm += a * a;
        diff += fabs(a - b);
    }
    CHECK(fabs(norm - 1) < 1e-4 && diff < 1e-5); /* "def f" is [455, 285] */
    CHECK(json_integer_value(json_object_get(json_object_get(o, "usage"), "prompt_tokens")) == 4);
    json_decref(o);
    char user[16];
    CHECK(srv_embeddings(m, &facts, ZSE_POOL_LAST,
                         BODY("{\"model\":\"tiny\",\"input\":\"x\",\"encoding_format\":\"base64\",\"user\":\"u-17\"}"),
                         &o, &tokens, user, sizeof user, &e) == 0);
    CHECK(strcmp(user, "u-17") == 0); /* for the request log */
    const char *b64 = json_string_value(json_object_get(json_array_get(json_object_get(o, "data"), 0), "embedding"));
    CHECK(b64 && strlen(b64) == ((size_t)info.hidden_size * 4 + 2) / 3 * 4);
    json_decref(o);
    const char *ebad[][2] = {
        {"{\"model\":\"tiny\"}", "input"},
        {"{\"input\":\"x\"}", "model"},
        {"{\"model\":\"tiny\",\"input\":\"\"}", "input"},
        {"{\"model\":\"tiny\",\"input\":[\"a\",\"\"]}", "input[1]"},
        {"{\"model\":\"tiny\",\"input\":[]}", "input"},
        {"{\"model\":\"tiny\",\"input\":[[]]}", "input"},
        {"{\"model\":\"tiny\",\"input\":{}}", "input"},
        {"{\"model\":\"tiny\",\"input\":\"x\",\"dimensions\":8}", "dimensions"},
        {"{\"model\":\"tiny\",\"input\":\"x\",\"encoding_format\":\"hex\"}", "encoding_format"},
        {"{\"model\":\"tiny\",\"input\":\"x\",\"user\":3}", "user"},
        {"{\"model\":\"tiny\",\"input\":\"x\",\"truncate_prompt_tokens\":3}", "truncate_prompt_tokens"},
    };
    for (size_t i = 0; i < sizeof ebad / sizeof ebad[0]; i++) {
        memset(&e, 0, sizeof e);
        CHECK_MSG(srv_embeddings(m, &facts, ZSE_POOL_LAST, BODY(ebad[i][0]), &o, &tokens, NULL, 0, &e) == -1 && !o, "%s",
                  ebad[i][0]);
        CHECK_MSG(e.status == 400 && !strcmp(e.param, ebad[i][1]), "%s: %d %s", ebad[i][0], e.status, e.param);
    }
    CHECK(srv_embeddings(m, &facts, ZSE_POOL_LAST, BODY("{\"model\":\"nope\",\"input\":\"x\"}"), &o, &tokens, NULL, 0, &e) == -1);
    CHECK(e.status == 404);
#undef BODY
}

int main(void)
{
    test_chat();
    test_completions();
    test_tgi();
    test_adapters();
    test_scoring_fields();
    test_tgi_parity();
    test_template_options();
    test_check_fields();
    test_unknown_fields();
    zse_model *m = server_test_model("f32", 1);
    test_prepare(m);
    test_prepare_extras(m);
    test_routes(m);
    zse_model_free(m);
    return test_main_end();
}
