/* Grammars for tool_choice: a call in the format's own shape whose arguments validate
 * against the tool's JSON Schema, composed with the grammar builder:
 *   hermes   <tool_call>\n{"name": "N", "arguments": ARGS}\n</tool_call>   (calls joined by \n)
 *   llama3   {"name": "N", "parameters": ARGS}                              (joined by "; ")
 *   mistral  [TOOL_CALLS][{"name": "N", "arguments": ARGS}, ...]
 *   json     {"name": "N", "arguments": ARGS}, several as a JSON array
 * "auto" (hermes, mistral): any text without the marker, then optionally calls. */
#include "toolcall/toolcall.h"

#include <stdlib.h>
#include <string.h>

static zse_gx call_expr(zse_gb *b, zse_tool_format f, const zse_tool_def *t)
{
    json_t *name = json_string(t->name);
    char *quoted = name ? json_dumps(name, JSON_ENCODE_ANY) : NULL;
    json_decref(name);
    if (!quoted) {
        zse_fail("tool '%s': the name is not valid UTF-8", t->name);
        return -1;
    }
    zse_buf head = {0};
    const char *key = f == ZSE_TOOL_LLAMA3 ? "parameters" : "arguments";
    zse_buf_printf(&head, "{\"name\": %s, \"%s\": ", quoted, key);
    free(quoted);
    zse_gx args = t->parameters ? zse_gb_json_schema(b, t->parameters, 0) : zse_gb_json_object(b);
    if (args < 0)
        zse_error_prefix("tool '%s' parameters", t->name);
    zse_gx x[3] = {zse_gb_text(b, head.data, head.len), args, zse_gb_text(b, "}", 1)};
    zse_buf_free(&head);
    zse_gx obj = args < 0 ? -1 : zse_gb_seq(b, x, 3);
    if (obj < 0 || f != ZSE_TOOL_HERMES)
        return obj;
    static const char open[] = "<tool_call>\n", close[] = "\n</tool_call>";
    zse_gx y[3] = {zse_gb_text(b, open, sizeof open - 1), obj, zse_gb_text(b, close, sizeof close - 1)};
    return zse_gb_seq(b, y, 3);
}

/* one or more calls (more only when parallel) joined as the format joins them */
static zse_gx calls_expr(zse_gb *b, zse_tool_format f, zse_gx one, bool parallel)
{
    const char *join = f == ZSE_TOOL_HERMES ? "\n" : f == ZSE_TOOL_LLAMA3 ? "; " : ", ";
    zse_gx more = parallel ? zse_gb_repeat(b, zse_gb_seq(b, (zse_gx[]){zse_gb_text(b, join, strlen(join)), one}, 2), 0, -1)
                           : zse_gb_seq(b, NULL, 0);
    zse_gx run = zse_gb_seq(b, (zse_gx[]){one, more}, 2);
    if (f == ZSE_TOOL_MISTRAL)
        return zse_gb_seq(b, (zse_gx[]){zse_gb_text(b, "[TOOL_CALLS][", 13), run, zse_gb_text(b, "]", 1)}, 3);
    if (f == ZSE_TOOL_JSON && parallel)
        return zse_gb_seq(b, (zse_gx[]){zse_gb_text(b, "[", 1), run, zse_gb_text(b, "]", 1)}, 3);
    return run;
}

zse_grammar *zse_tool_grammar(zse_tool_format f, const zse_tool_def *tools, int n_tools, zse_tool_choice choice,
                              const char *named, bool parallel, const zse_grammar_vocab *v)
{
    if (n_tools < 1) {
        zse_fail("tool calls: a tool_choice grammar needs at least one tool");
        return NULL;
    }
    if (choice == ZSE_TOOL_CHOICE_AUTO && f != ZSE_TOOL_HERMES && f != ZSE_TOOL_MISTRAL) {
        zse_fail("tool calls: the %s format has no call marker to trigger on; sample tool_choice auto without a grammar",
                 zse_tool_format_name(f));
        return NULL;
    }
    zse_gb *b = zse_gb_new();
    zse_gx *alts = zse_calloc((size_t)n_tools, sizeof *alts);
    zse_grammar *g = NULL;
    if (!b || !alts)
        goto out;
    int n = 0;
    for (int i = 0; i < n_tools; i++) {
        if (!tools[i].name || !*tools[i].name) {
            zse_fail("tool calls: tool %d has no name", i);
            goto out;
        }
        if (choice == ZSE_TOOL_CHOICE_NAMED && strcmp(tools[i].name, named ? named : ""))
            continue;
        if ((alts[n++] = call_expr(b, f, &tools[i])) < 0)
            goto out;
    }
    if (n == 0) {
        zse_fail("tool calls: tool_choice names '%s', which is not among the tools", named ? named : "");
        goto out;
    }
    zse_gx one = zse_gb_alt(b, alts, n);
    zse_gx root = calls_expr(b, f, one, parallel && choice != ZSE_TOOL_CHOICE_NAMED);
    if (choice == ZSE_TOOL_CHOICE_AUTO) {
        const char *marker = f == ZSE_TOOL_HERMES ? "<tool_call>" : "[TOOL_CALLS]";
        zse_gx text = zse_gb_text_without(b, marker);
        root = zse_gb_seq(b, (zse_gx[]){text, zse_gb_repeat(b, root, 0, 1)}, 2);
    }
    if (root >= 0)
        g = zse_grammar_compile(b, root, v);
out:
    free(alts);
    zse_gb_free(b);
    return g;
}
