/* server: structured output and tool calls — response_format, guided_*, structured_outputs,
 * TGI grammar, tools / tool_choice / parallel_tool_calls parsed and checked (conflicts and
 * unsupported fields name the field), compiled against the real fixture model (the grammar
 * compiler's errors become 400s), and the rendering of tool calls: whole answers and streams
 * whose deltas accumulate to the same calls. */
#include "server_test_model.h"

#include "server/server.h"
#include "toolcall/toolcall.h"

static const srv_model_facts FACTS = {"tiny", 2048, 2048, 0, false, NULL, 0};

static int parse(srv_api api, const char *body, srv_request *r, srv_error *e)
{
    return srv_request_parse(api, body, strlen(body), &FACTS, r, e);
}

#define CHECK_REJECTS(api, body, param_)                                                               \
    do {                                                                                               \
        srv_request r_;                                                                                \
        srv_error e_;                                                                                  \
        memset(&e_, 0, sizeof e_);                                                                     \
        CHECK_MSG(parse(api, body, &r_, &e_) == -1, "accepted: %s", body);                             \
        CHECK_MSG(e_.status == 400, "%s: status %d", body, e_.status);                                 \
        CHECK_MSG(strcmp(e_.param, param_) == 0, "%s: param '%s' (%s)", body, e_.param, e_.message);    \
        srv_request_free(&r_);                                                                         \
    } while (0)

#define CHAT(extra) "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]" extra "}"
#define TOOLS                                                                                          \
    ",\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"parameters\":{\"type\":" \
    "\"object\",\"properties\":{\"city\":{\"type\":\"string\",\"maxLength\":12}},\"required\":[\"city\"]}}}," \
    "{\"type\":\"function\",\"function\":{\"name\":\"now\"}}]"

static void test_grammar_fields(void)
{
    srv_request r;
    srv_error e;
    CHECK(parse(SRV_API_CHAT, CHAT(",\"response_format\":{\"type\":\"json_object\"}"), &r, &e) == 0);
    CHECK(r.structured.kind == SRV_GRAMMAR_JSON_OBJECT && r.structured.tools == SRV_TOOLS_OFF);
    srv_request_free(&r);
    CHECK(parse(SRV_API_CHAT, CHAT(",\"response_format\":{\"type\":\"text\"}"), &r, &e) == 0);
    CHECK(r.structured.kind == SRV_GRAMMAR_NONE);
    srv_request_free(&r);
    CHECK(parse(SRV_API_CHAT,
                CHAT(",\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"name\":\"x\",\"strict\":true,"
                     "\"schema\":{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"integer\"}},\"required\":[\"a\"],"
                     "\"additionalProperties\":false}}}"),
                &r, &e) == 0);
    CHECK(r.structured.kind == SRV_GRAMMAR_JSON_SCHEMA && r.structured.strict);
    CHECK(r.structured.text && strstr(r.structured.text, "\"additionalProperties\":false"));
    CHECK_EQ_STR(r.structured.param, "response_format.json_schema.schema");
    srv_request_free(&r);
    /* vLLM: a schema as a string, a regex, choices; completions take them too */
    CHECK(parse(SRV_API_COMPLETION, "{\"model\":\"tiny\",\"prompt\":\"x\",\"guided_json\":\"{\\\"type\\\":\\\"integer\\\"}\"}",
                &r, &e) == 0);
    CHECK(r.structured.kind == SRV_GRAMMAR_JSON_SCHEMA && strcmp(r.structured.text, "{\"type\":\"integer\"}") == 0);
    srv_request_free(&r);
    CHECK(parse(SRV_API_CHAT, CHAT(",\"guided_regex\":\"[a-c]+\""), &r, &e) == 0);
    CHECK(r.structured.kind == SRV_GRAMMAR_REGEX && strcmp(r.structured.text, "[a-c]+") == 0);
    srv_request_free(&r);
    CHECK(parse(SRV_API_CHAT, CHAT(",\"guided_choice\":[\"yes\",\"no\"]"), &r, &e) == 0);
    CHECK(r.structured.kind == SRV_GRAMMAR_CHOICE && r.structured.n_choices == 2 &&
          strcmp(r.structured.choices[1], "no") == 0);
    srv_request_free(&r);
    CHECK(parse(SRV_API_CHAT, CHAT(",\"structured_outputs\":{\"choice\":[\"a\"]}"), &r, &e) == 0);
    CHECK(r.structured.kind == SRV_GRAMMAR_CHOICE && strcmp(r.structured.param, "structured_outputs.choice") == 0);
    srv_request_free(&r);
    CHECK(parse(SRV_API_COMPLETION, "{\"model\":\"tiny\",\"prompt\":\"x\",\"response_format\":{\"type\":\"json_object\"}}",
                &r, &e) == 0);
    CHECK(r.structured.kind == SRV_GRAMMAR_JSON_OBJECT);
    srv_request_free(&r);
    /* TGI */
    CHECK(parse(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"grammar\":{\"type\":\"json\",\"value\":{\"type\":"
                             "\"object\"}}}}", &r, &e) == 0);
    CHECK(r.structured.kind == SRV_GRAMMAR_JSON_SCHEMA && strcmp(r.structured.text, "{\"type\":\"object\"}") == 0);
    srv_request_free(&r);
    CHECK(parse(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"grammar\":{\"type\":\"regex\",\"value\":\"\\\\d+\"}}}",
                &r, &e) == 0);
    CHECK(r.structured.kind == SRV_GRAMMAR_REGEX && strcmp(r.structured.text, "\\d+") == 0);
    srv_request_free(&r);

    /* malformed, unsupported, conflicting */
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"response_format\":{\"type\":\"yaml\"}"), "response_format.type");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"response_format\":\"json\""), "response_format");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"response_format\":{\"type\":\"json_schema\"}"), "response_format.json_schema");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"name\":\"x\"}}"),
                  "response_format.json_schema.schema");
    CHECK_REJECTS(SRV_API_CHAT,
                  CHAT(",\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"schema\":{},\"strict\":1}}"),
                  "response_format.json_schema.strict");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"response_format\":{\"type\":\"json_object\"},\"guided_regex\":\"a\""),
                  "guided_regex");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"guided_json\":{},\"guided_choice\":[\"a\"]"), "guided_choice");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"guided_grammar\":\"root ::= \\\"a\\\"\""), "guided_grammar");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"guided_json\":\"{nope\""), "guided_json");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"guided_json\":[1]"), "guided_json");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"guided_choice\":[]"), "guided_choice");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"guided_choice\":[\"a\",2]"), "guided_choice");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"guided_regex\":\"\""), "guided_regex");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"guided_regex\":\"a\",\"guided_decoding_backend\":\"xgrammar\""),
                  "guided_decoding_backend");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"guided_json\":{},\"guided_whitespace_pattern\":\" \""),
                  "guided_whitespace_pattern");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"structured_outputs\":{\"grammar\":\"x\"}"), "structured_outputs.grammar");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"structured_outputs\":[]"), "structured_outputs");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"structured_outputs\":{\"structural_tag\":\"{}\"}"),
                  "structured_outputs.structural_tag");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"functions\":[{\"name\":\"f\"}]"), "functions");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"function_call\":\"auto\""), "function_call");
    CHECK_REJECTS(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"grammar\":{\"type\":\"ebnf\",\"value\":\"x\"}}}",
                  "parameters.grammar.type");
    CHECK_REJECTS(SRV_API_TGI, "{\"inputs\":\"x\",\"parameters\":{\"grammar\":{\"type\":\"json\"}}}", "parameters.grammar");
}

static void test_tool_fields(void)
{
    srv_request r;
    srv_error e;
    CHECK(parse(SRV_API_CHAT, CHAT(TOOLS), &r, &e) == 0);
    CHECK(r.structured.tools == SRV_TOOLS_AUTO && r.structured.parallel && r.structured.tools_json);
    CHECK(r.structured.tool_format == 0); /* settled by prepare */
    srv_request_free(&r);
    CHECK(parse(SRV_API_CHAT, CHAT(TOOLS ",\"tool_choice\":\"none\""), &r, &e) == 0);
    CHECK(r.structured.tools == SRV_TOOLS_OFF && json_object_get(r.template_extra, "tools")); /* still rendered */
    srv_request_free(&r);
    CHECK(parse(SRV_API_CHAT, CHAT(TOOLS ",\"tool_choice\":\"required\",\"parallel_tool_calls\":false"), &r, &e) == 0);
    CHECK(r.structured.tools == SRV_TOOLS_REQUIRED && !r.structured.parallel);
    srv_request_free(&r);
    CHECK(parse(SRV_API_CHAT, CHAT(TOOLS ",\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":\"now\"}}"), &r,
                &e) == 0);
    CHECK(r.structured.tools == SRV_TOOLS_NAMED && strcmp(r.structured.tool_name, "now") == 0);
    srv_request_free(&r);
    /* tool_choice none without tools is fine; anything else needs tools */
    CHECK(parse(SRV_API_CHAT, CHAT(",\"tool_choice\":\"none\""), &r, &e) == 0);
    srv_request_free(&r);
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"tool_choice\":\"required\""), "tool_choice");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(TOOLS ",\"tool_choice\":\"sometimes\""), "tool_choice");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(TOOLS ",\"tool_choice\":{\"type\":\"function\"}"), "tool_choice");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(TOOLS ",\"parallel_tool_calls\":\"yes\""), "parallel_tool_calls");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"tools\":[{\"type\":\"retrieval\"}]"), "tools[0]");
    CHECK_REJECTS(SRV_API_CHAT, CHAT(",\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"\"}}]"), "tools[0]");
    CHECK_REJECTS(SRV_API_CHAT,
                  CHAT(",\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\",\"parameters\":[]}}]"), "tools[0]");
    /* a grammar and a forced call cannot both hold; with auto the grammar wins */
    CHECK_REJECTS(SRV_API_CHAT, CHAT(TOOLS ",\"tool_choice\":\"required\",\"response_format\":{\"type\":\"json_object\"}"),
                  "tool_choice");
    CHECK(parse(SRV_API_CHAT, CHAT(TOOLS ",\"response_format\":{\"type\":\"json_object\"}"), &r, &e) == 0);
    CHECK(r.structured.kind == SRV_GRAMMAR_JSON_OBJECT && r.structured.tools == SRV_TOOLS_AUTO);
    srv_request_free(&r);

    /* assistant calls' arguments reach the template as objects; tool results keep their id */
    CHECK(parse(SRV_API_CHAT,
                "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"w?\"},{\"role\":\"assistant\","
                "\"content\":null,\"tool_calls\":[{\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":"
                "\"get_weather\",\"arguments\":\"{\\\"city\\\": \\\"Paris\\\"}\"}}]},{\"role\":\"tool\",\"tool_call_id\":"
                "\"call_1\",\"content\":\"sunny\"}]}",
                &r, &e) == 0);
    json_t *fn = json_object_get(json_array_get(json_object_get(json_array_get(r.messages, 1), "tool_calls"), 0), "function");
    CHECK(json_is_object(json_object_get(fn, "arguments")));
    CHECK_EQ_STR(json_string_value(json_object_get(json_object_get(fn, "arguments"), "city")), "Paris");
    srv_request_free(&r);
    CHECK_REJECTS(SRV_API_CHAT,
                  "{\"model\":\"tiny\",\"messages\":[{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":"
                  "\"c\"}]}]}", "messages[0].tool_calls[0]");

    /* --tool-parser names */
    int f = -1;
    CHECK(srv_tool_parser_from_name("hermes", &f) == 0 && f == ZSE_TOOL_HERMES);
    CHECK(srv_tool_parser_from_name("llama3_json", &f) == 0 && f == ZSE_TOOL_LLAMA3);
    CHECK(srv_tool_parser_from_name("mistral", &f) == 0 && f == ZSE_TOOL_MISTRAL);
    CHECK(srv_tool_parser_from_name("json", &f) == 0 && f == ZSE_TOOL_JSON);
    CHECK(srv_tool_parser_from_name("none", &f) == 0 && f == 0);
    CHECK(srv_tool_parser_from_name("pythonic", &f) == -1 && strstr(zse_last_error(), SRV_TOOL_PARSER_NAMES));
}

/* parse + prepare against the model; returns the prepare's result */
static int prepare(zse_model *m, const char *body, int tool_parser, srv_request *r, srv_error *e)
{
    zse_model_info info;
    zse_model_get_info(m, &info);
    srv_model_facts facts = {"tiny", info.vocab_size, info.ctx_size, 0, false, NULL, 0};
    memset(e, 0, sizeof *e);
    if (srv_request_parse(SRV_API_CHAT, body, strlen(body), &facts, r, e) != 0)
        return -2;
    if (srv_request_prepare(r, m, &facts, e) != 0)
        return -3;
    return srv_structured_prepare(r, m, tool_parser, NULL, e);
}

static void test_prepare(zse_model *m)
{
    srv_request r;
    srv_error e;
    CHECK(prepare(m, CHAT(",\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"name\":\"x\",\"schema\":"
                          "{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"integer\"}}}}}"), -1, &r, &e) == 0);
    CHECK(r.structured.constraint && r.sampling.constraint == r.structured.constraint);
    CHECK(r.structured.tool_format == 0);
    srv_request_free(&r);
    /* the compiler's refusal: 400 naming the keyword and its path */
    CHECK(prepare(m, CHAT(",\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"name\":\"x\",\"schema\":"
                          "{\"type\":\"object\",\"properties\":{\"a\":{\"not\":{}}}}}}"), -1, &r, &e) == -1);
    CHECK(e.status == 400 && strcmp(e.param, "response_format.json_schema.schema") == 0);
    CHECK_MSG(strstr(e.message, "'not'") && strstr(e.message, "#/properties/a"), "%s", e.message);
    srv_request_free(&r);
    /* strict refuses an open object, as OpenAI does */
    CHECK(prepare(m, CHAT(",\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"name\":\"x\",\"strict\":true,"
                          "\"schema\":{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"integer\"}}}}}"), -1, &r, &e) == -1);
    CHECK_MSG(e.status == 400 && strstr(e.message, "strict"), "%s", e.message);
    srv_request_free(&r);
    CHECK(prepare(m, CHAT(",\"guided_regex\":\"(a\""), -1, &r, &e) == -1 && strcmp(e.param, "guided_regex") == 0);
    srv_request_free(&r);

    /* tools: the fixture's template (Qwen2.5) writes hermes calls */
    CHECK(prepare(m, CHAT(TOOLS ",\"tool_choice\":\"required\""), -1, &r, &e) == 0);
    CHECK(r.structured.tool_format == ZSE_TOOL_HERMES && r.sampling.constraint);
    srv_request_free(&r);
    CHECK(prepare(m, CHAT(TOOLS), -1, &r, &e) == 0); /* auto: a grammar that triggers on <tool_call> */
    CHECK(r.structured.tool_format == ZSE_TOOL_HERMES && r.sampling.constraint);
    srv_request_free(&r);
    CHECK(prepare(m, CHAT(TOOLS), ZSE_TOOL_LLAMA3, &r, &e) == 0); /* no marker: auto is not constrained */
    CHECK(r.structured.tool_format == ZSE_TOOL_LLAMA3 && !r.sampling.constraint);
    srv_request_free(&r);
    CHECK(prepare(m, CHAT(TOOLS ",\"tool_choice\":\"none\""), -1, &r, &e) == 0);
    CHECK(r.structured.tool_format == 0 && !r.sampling.constraint);
    srv_request_free(&r);
    CHECK(prepare(m, CHAT(TOOLS ",\"response_format\":{\"type\":\"json_object\"}"), -1, &r, &e) == 0);
    CHECK(r.structured.tool_format == 0 && r.sampling.constraint); /* the output is JSON, not calls */
    srv_request_free(&r);
    CHECK(prepare(m, CHAT(TOOLS ",\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":\"later\"}}"), -1, &r,
                  &e) == -1);
    CHECK_MSG(e.status == 400 && strcmp(e.param, "tool_choice") == 0 && strstr(e.message, "later"), "%s", e.message);
    srv_request_free(&r);
    CHECK(prepare(m, CHAT(TOOLS ",\"tool_choice\":\"required\""), 0, &r, &e) == -1);
    CHECK(e.status == 400 && strstr(e.message, "--tool-parser none"));
    srv_request_free(&r);
    CHECK(prepare(m, CHAT(",\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\",\"parameters\":{\"type\":"
                          "\"object\",\"properties\":{\"x\":{\"multipleOf\":2}}}}}],\"tool_choice\":\"required\""),
                  -1, &r, &e) == -1);
    CHECK_MSG(e.status == 400 && strstr(e.message, "multipleOf"), "%s", e.message);
    srv_request_free(&r);
}

/* the same request shape reuses its compiled constraint; another shape gets its own */
static void test_cache(zse_model *m)
{
    zse_model_info info;
    zse_model_get_info(m, &info);
    srv_model_facts facts = {"tiny", info.vocab_size, info.ctx_size, 0, false, NULL, 0};
    srv_grammar_cache *cache = srv_grammar_cache_new(2);
    CHECK(cache != NULL);
    static const char *const bodies[] = {
        CHAT(",\"guided_choice\":[\"a\",\"b\"]"), CHAT(",\"guided_choice\":[\"a\",\"b\"],\"temperature\":1"),
        CHAT(",\"guided_choice\":[\"a\",\"c\"]"), CHAT(TOOLS ",\"tool_choice\":\"required\""),
        CHAT(TOOLS ",\"tool_choice\":\"required\",\"max_tokens\":3"), CHAT(TOOLS ",\"tool_choice\":\"required\",\"parallel_tool_calls\":false"),
    };
    srv_request r[6];
    srv_error e;
    for (int i = 0; i < 6; i++) {
        CHECK(srv_request_parse(SRV_API_CHAT, bodies[i], strlen(bodies[i]), &facts, &r[i], &e) == 0);
        CHECK(srv_request_prepare(&r[i], m, &facts, &e) == 0);
        CHECK(srv_structured_prepare(&r[i], m, -1, cache, &e) == 0 && r[i].sampling.constraint);
    }
    CHECK(r[0].sampling.constraint == r[1].sampling.constraint);
    CHECK(r[0].sampling.constraint != r[2].sampling.constraint);
    CHECK(r[3].sampling.constraint == r[4].sampling.constraint);
    CHECK(r[3].sampling.constraint != r[5].sampling.constraint);
    for (int i = 0; i < 6; i++)
        srv_request_free(&r[i]); /* the cache keeps its own references */
    srv_grammar_cache_free(cache);
}

/* ---- rendering ------------------------------------------------------------------------- */

static int32_t eos_of(zse_model *m)
{
    zse_model_info info;
    zse_model_get_info(m, &info);
    return info.eos_ids[0];
}

/* the pieces as events of choice 0 (token 1 each), then EOS; the rendered bytes in out */
static void render_pieces(srv_render *rd, zse_model *m, const char *const *pieces, int n, zse_buf *out)
{
    for (int i = 0; i <= n; i++) {
        srv_event ev = {0};
        ev.token = i < n ? 1 : eos_of(m);
        ev.text = (char *)(i < n ? pieces[i] : "");
        ev.finish = i < n ? ZSE_FINISH_NONE : ZSE_FINISH_STOP;
        ev.completion_tokens = n;
        CHECK(srv_render_event(rd, &ev, out) == 0);
    }
}

static int render_setup(zse_model *m, const char *body, srv_request *r, srv_render *rd)
{
    srv_error e;
    int rc = prepare(m, body, -1, r, &e);
    CHECK_MSG(rc == 0, "%s", e.message);
    memset(rd, 0, sizeof *rd);
    CHECK(srv_render_init(rd, r, m, 1) == 0);
    rd->id = "chatcmpl-test";
    rd->model_id = "tiny";
    rd->fingerprint = "fp";
    return rc;
}

static const char *const CALL_PIECES[] = {
    "Let me check.", "\n<tool", "_call>\n{\"name\": \"get_", "weather\", \"arguments\": {\"city\": ",
    "\"Paris\"}}\n</tool_call>", "\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>",
};

static void test_render_whole(zse_model *m)
{
    srv_request r;
    srv_render rd;
    zse_buf out = {0};
    render_setup(m, CHAT(TOOLS), &r, &rd);
    render_pieces(&rd, m, CALL_PIECES, 6, &out);
    int status, retry;
    CHECK(srv_render_whole(&rd, &out, &status, &retry) == 0 && status == 200);
    json_t *o = json_loads(zse_buf_str(&out), 0, NULL);
    json_t *ch = json_array_get(json_object_get(o, "choices"), 0);
    json_t *msg = json_object_get(ch, "message");
    CHECK_EQ_STR(json_string_value(json_object_get(ch, "finish_reason")), "tool_calls");
    CHECK(strncmp(json_string_value(json_object_get(msg, "content")), "Let me check.", 13) == 0); /* + newlines between */
    CHECK(strspn(json_string_value(json_object_get(msg, "content")) + 13, "\n") ==
          strlen(json_string_value(json_object_get(msg, "content")) + 13));
    json_t *calls = json_object_get(msg, "tool_calls");
    CHECK(json_array_size(calls) == 2);
    json_t *c0 = json_array_get(calls, 0);
    CHECK(strncmp(json_string_value(json_object_get(c0, "id")), "call_", 5) == 0);
    CHECK_EQ_STR(json_string_value(json_object_get(c0, "type")), "function");
    CHECK_EQ_STR(json_string_value(json_object_get(json_object_get(c0, "function"), "name")), "get_weather");
    json_t *args = json_loads(json_string_value(json_object_get(json_object_get(c0, "function"), "arguments")), 0, NULL);
    CHECK_EQ_STR(json_string_value(json_object_get(args, "city")), "Paris");
    CHECK(strcmp(json_string_value(json_object_get(c0, "id")),
                 json_string_value(json_object_get(json_array_get(calls, 1), "id"))) != 0);
    json_decref(args);
    json_decref(o);
    srv_render_free(&rd);
    srv_request_free(&r);

    /* parallel_tool_calls false: the first call only */
    zse_buf_free(&out);
    render_setup(m, CHAT(TOOLS ",\"parallel_tool_calls\":false"), &r, &rd);
    render_pieces(&rd, m, CALL_PIECES, 6, &out);
    CHECK(srv_render_whole(&rd, &out, &status, &retry) == 0);
    o = json_loads(zse_buf_str(&out), 0, NULL);
    msg = json_object_get(json_array_get(json_object_get(o, "choices"), 0), "message");
    CHECK(json_array_size(json_object_get(msg, "tool_calls")) == 1);
    json_decref(o);
    srv_render_free(&rd);
    srv_request_free(&r);

    /* no call written: plain content, finish stop; tool_choice none: calls stay text */
    static const char *const plain[] = {"It is ", "sunny."};
    zse_buf_free(&out);
    render_setup(m, CHAT(TOOLS), &r, &rd);
    render_pieces(&rd, m, plain, 2, &out);
    CHECK(srv_render_whole(&rd, &out, &status, &retry) == 0);
    o = json_loads(zse_buf_str(&out), 0, NULL);
    ch = json_array_get(json_object_get(o, "choices"), 0);
    CHECK_EQ_STR(json_string_value(json_object_get(ch, "finish_reason")), "stop");
    CHECK_EQ_STR(json_string_value(json_object_get(json_object_get(ch, "message"), "content")), "It is sunny.");
    CHECK(!json_object_get(json_object_get(ch, "message"), "tool_calls"));
    json_decref(o);
    srv_render_free(&rd);
    srv_request_free(&r);
    zse_buf_free(&out);
    render_setup(m, CHAT(TOOLS ",\"tool_choice\":\"none\""), &r, &rd);
    render_pieces(&rd, m, CALL_PIECES, 6, &out);
    CHECK(srv_render_whole(&rd, &out, &status, &retry) == 0);
    o = json_loads(zse_buf_str(&out), 0, NULL);
    ch = json_array_get(json_object_get(o, "choices"), 0);
    CHECK(strstr(json_string_value(json_object_get(json_object_get(ch, "message"), "content")), "<tool_call>"));
    CHECK_EQ_STR(json_string_value(json_object_get(ch, "finish_reason")), "stop");
    json_decref(o);
    srv_render_free(&rd);
    srv_request_free(&r);
    zse_buf_free(&out);
}

/* accumulates a chat stream's deltas as the OpenAI SDK does: content joined, calls by index
 * (id, name from their first delta, arguments joined); returns the finish reason seen */
static char *accumulate(const char *sse, zse_buf *content, json_t *calls)
{
    char *finish = NULL;
    for (const char *p = strstr(sse, "data: "); p; p = strstr(p, "data: ")) {
        p += 6;
        const char *end = strstr(p, "\n\n");
        if (strncmp(p, "[DONE]", 6) == 0)
            break;
        json_t *o = json_loadb(p, (size_t)(end - p), 0, NULL);
        CHECK(o != NULL);
        json_t *ch = json_array_get(json_object_get(o, "choices"), 0);
        json_t *d = json_object_get(ch, "delta");
        if (json_is_string(json_object_get(d, "content")))
            zse_buf_puts(content, json_string_value(json_object_get(d, "content")));
        size_t i;
        json_t *tc;
        json_array_foreach(json_object_get(d, "tool_calls"), i, tc) {
            size_t idx = (size_t)json_integer_value(json_object_get(tc, "index"));
            if (idx == json_array_size(calls)) {
                CHECK(json_is_string(json_object_get(tc, "id")) && json_is_string(json_object_get(json_object_get(tc, "function"), "name")));
                json_array_append_new(calls, json_pack("{s:s, s:s, s:s}", "id", json_string_value(json_object_get(tc, "id")),
                                                       "name", json_string_value(json_object_get(json_object_get(tc, "function"), "name")),
                                                       "arguments", ""));
            }
            CHECK(idx < json_array_size(calls));
            json_t *acc = json_array_get(calls, idx);
            const char *frag = json_string_value(json_object_get(json_object_get(tc, "function"), "arguments"));
            char joined[512];
            snprintf(joined, sizeof joined, "%s%s", json_string_value(json_object_get(acc, "arguments")), frag ? frag : "");
            json_object_set_new(acc, "arguments", json_string(joined));
        }
        if (json_is_string(json_object_get(ch, "finish_reason"))) {
            free(finish);
            finish = strdup(json_string_value(json_object_get(ch, "finish_reason")));
        }
        json_decref(o);
        p = end;
    }
    return finish;
}

static void test_render_stream(zse_model *m)
{
    srv_request r;
    srv_render rd;
    zse_buf out = {0}, content = {0};
    render_setup(m, CHAT(TOOLS ",\"stream\":true"), &r, &rd);
    CHECK(srv_render_start(&rd, &out) == 0);
    render_pieces(&rd, m, CALL_PIECES, 6, &out);
    CHECK(srv_render_tail(&rd, &out) == 0);
    json_t *calls = json_array();
    char *finish = accumulate(zse_buf_str(&out), &content, calls);
    CHECK(finish && strcmp(finish, "tool_calls") == 0);
    CHECK_MSG(strncmp(zse_buf_str(&content), "Let me check.", 13) == 0 &&
                  strspn(zse_buf_str(&content) + 13, "\n") == strlen(zse_buf_str(&content) + 13),
              "content '%s'", zse_buf_str(&content));
    CHECK(json_array_size(calls) == 2);
    CHECK_EQ_STR(json_string_value(json_object_get(json_array_get(calls, 0), "name")), "get_weather");
    json_t *args = json_loads(json_string_value(json_object_get(json_array_get(calls, 0), "arguments")), 0, NULL);
    CHECK(args && strcmp(json_string_value(json_object_get(args, "city")), "Paris") == 0);
    json_decref(args);
    CHECK_EQ_STR(json_string_value(json_object_get(json_array_get(calls, 1), "name")), "now");
    CHECK(strncmp(json_string_value(json_object_get(json_array_get(calls, 1), "id")), "call_", 5) == 0);
    free(finish);
    json_decref(calls);
    srv_render_free(&rd);
    srv_request_free(&r);

    /* parallel_tool_calls false: one call streamed */
    zse_buf_free(&out);
    zse_buf_free(&content);
    render_setup(m, CHAT(TOOLS ",\"stream\":true,\"parallel_tool_calls\":false"), &r, &rd);
    CHECK(srv_render_start(&rd, &out) == 0);
    render_pieces(&rd, m, CALL_PIECES, 6, &out);
    calls = json_array();
    finish = accumulate(zse_buf_str(&out), &content, calls);
    CHECK(json_array_size(calls) == 1 && finish && strcmp(finish, "tool_calls") == 0);
    free(finish);
    json_decref(calls);
    srv_render_free(&rd);
    srv_request_free(&r);
    zse_buf_free(&out);
    zse_buf_free(&content);
}

int main(void)
{
    test_grammar_fields();
    test_tool_fields();
    zse_model *m = server_test_model("f32", 1);
    test_prepare(m);
    test_cache(m);
    test_render_whole(m);
    test_render_stream(m);
    zse_model_free(m);
    return test_main_end();
}
