/* Constrained decoding, the model's side (zse.h: zse_constraint_*): grammars compiled against
 * the model's vocabulary by src/grammar, tool-call grammars by src/toolcall. A zse_constraint
 * is a zse_grammar (reference counted); the sequence core (seq.c) runs a matcher over it.
 * The vocabulary a grammar needs (every token's bytes in a trie) is built once per model on
 * first use; tool-call grammars get their own, which lets the format's marker tokens (e.g.
 * Mistral's [TOOL_CALLS]) through. */
#include "engine/engine.h"

#include "toolcall/toolcall.h"

#include <string.h>

/* the tool-call format the model's chat template writes (json when it shows none) */
static zse_tool_format model_tool_format(const zse_model *m)
{
    const char *tpl = zse_model_chat_template(m);
    return tpl ? zse_tool_format_detect(tpl) : ZSE_TOOL_JSON;
}

const zse_grammar_vocab *zse_model_grammar_vocab(zse_model *m, bool tools)
{
    pthread_mutex_lock(&m->grammar_lock);
    zse_grammar_vocab **slot = tools ? &m->gvocab_tools : &m->gvocab;
    if (!*slot) {
        const char *const *special = tools ? zse_tool_format_special_texts(model_tool_format(m)) : NULL;
        int n_special = 0;
        while (special && special[n_special])
            n_special++;
        *slot = zse_grammar_vocab_from_tokenizer(m->tok, m->eos, m->n_eos, special, n_special);
    }
    const zse_grammar_vocab *v = *slot;
    pthread_mutex_unlock(&m->grammar_lock);
    return v;
}

static zse_constraint *as_constraint(zse_grammar *g) { return (zse_constraint *)g; }

zse_constraint *zse_constraint_json_schema(zse_model *m, const char *schema, size_t len, bool strict)
{
    const zse_grammar_vocab *v = zse_model_grammar_vocab(m, false);
    return v ? as_constraint(zse_grammar_json_schema(v, schema, len, strict ? ZSE_SCHEMA_STRICT : 0)) : NULL;
}

zse_constraint *zse_constraint_json_object(zse_model *m)
{
    const zse_grammar_vocab *v = zse_model_grammar_vocab(m, false);
    return v ? as_constraint(zse_grammar_json_object(v)) : NULL;
}

zse_constraint *zse_constraint_regex(zse_model *m, const char *pattern, size_t len)
{
    const zse_grammar_vocab *v = zse_model_grammar_vocab(m, false);
    return v ? as_constraint(zse_grammar_regex(v, pattern, len)) : NULL;
}

zse_constraint *zse_constraint_choice(zse_model *m, const char *const *choices, int n)
{
    const zse_grammar_vocab *v = zse_model_grammar_vocab(m, false);
    return v ? as_constraint(zse_grammar_choice(v, choices, n)) : NULL;
}

/* the OpenAI tools array as tool definitions (pointing into tools) */
static int tool_defs(const json_t *tools, zse_tool_def **out, int *n)
{
    if (!json_is_array(tools) || json_array_size(tools) == 0)
        return zse_fail("tools must be a non-empty array of {\"type\": \"function\", \"function\": {...}}");
    size_t count = json_array_size(tools);
    zse_tool_def *d = zse_calloc(count, sizeof *d);
    if (!d)
        return -1;
    for (size_t i = 0; i < count; i++) {
        const json_t *fn = json_object_get(json_array_get(tools, i), "function");
        d[i].name = json_string_value(json_object_get(fn, "name"));
        d[i].parameters = json_object_get(fn, "parameters");
        if (!d[i].name) {
            free(d);
            return zse_fail("tools[%zu].function.name is missing", i);
        }
    }
    *out = d;
    *n = (int)count;
    return 0;
}

zse_constraint *zse_constraint_tools(zse_model *m, const char *tools_json, const char *choice, bool parallel,
                                     const char *format)
{
    zse_tool_format f = model_tool_format(m);
    if (format && zse_tool_format_from_name(format, &f) != 0)
        return NULL;
    json_error_t jerr;
    json_t *tools = json_loads(tools_json, 0, &jerr);
    zse_tool_def *defs = NULL;
    int n = 0;
    zse_grammar *g = NULL;
    const zse_grammar_vocab *v = zse_model_grammar_vocab(m, true);
    if (!tools)
        zse_fail("tools is not JSON: %s", jerr.text);
    else if (v && tool_defs(tools, &defs, &n) == 0) {
        zse_tool_choice c = !choice || strcmp(choice, "required") == 0 ? ZSE_TOOL_CHOICE_REQUIRED
                            : strcmp(choice, "auto") == 0             ? ZSE_TOOL_CHOICE_AUTO
                                                                      : ZSE_TOOL_CHOICE_NAMED;
        g = zse_tool_grammar(f, defs, n, c, c == ZSE_TOOL_CHOICE_NAMED ? choice : NULL, parallel, v);
    }
    free(defs);
    json_decref(tools);
    return as_constraint(g);
}

void zse_model_find_tool_markers(zse_model *m)
{
    const char *const *texts = zse_tool_format_special_texts(model_tool_format(m));
    m->n_tool_markers = 0;
    for (int i = 0; texts[i] && m->n_tool_markers < 4; i++) {
        int32_t id = zse_tokenizer_token_id(m->tok, texts[i]);
        if (id >= 0 && zse_tokenizer_is_special(m->tok, id)) {
            m->tool_marker_ids[m->n_tool_markers] = id;
            m->tool_marker_texts[m->n_tool_markers++] = texts[i];
        }
    }
}

const char *zse_model_tool_format(const zse_model *m) { return zse_tool_format_name(model_tool_format(m)); }

zse_constraint *zse_constraint_retain(zse_constraint *c)
{
    return c ? as_constraint(zse_grammar_retain((zse_grammar *)c)) : NULL;
}

void zse_constraint_free(zse_constraint *c) { zse_grammar_release((zse_grammar *)c); }
