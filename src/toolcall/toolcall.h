/* toolcall — tool calls in a model's output: the families' formats, detected from the chat
 * template (or named), parsed from a complete output or from text streamed as it is
 * generated (OpenAI-shaped deltas), and the grammars that force a valid call for
 * tool_choice "required" or a named function (and trigger on a call marker for "auto").
 *
 * Formats:
 *   hermes   <tool_call>{"name": N, "arguments": {...}}</tool_call>, several in a row, text
 *            around them (Hermes, Qwen2.5, Qwen3)
 *   llama3   {"name": N, "parameters": {...}} as the whole message, optionally after
 *            <|python_tag|>; several separated by ';' (Llama 3.1 / 3.2)
 *   mistral  [TOOL_CALLS][{"name": N, "arguments": {...}}, ...] or, newer,
 *            [TOOL_CALLS]N[ARGS]{...} (repeated for several); text before the marker
 *   json     the whole output is a call object {"name", "arguments" | "parameters"} or an
 *            array of them, optionally in a ```json fence (any other model)
 * Arguments are returned as the JSON text the model wrote (a JSON string's content when the
 * model wrote the arguments as a string).
 *
 * Files: format.c (names, detection), scan.c (one scanner per format, used by both parsers),
 * parse.c (complete and streaming parsers), grammar.c (tool_choice grammars).
 * Everything here is plain data in, plain data out: no shared state, safe from any thread;
 * a zse_tool_stream belongs to one sequence. Errors: -1 / NULL with zse_fail. */
#ifndef ZSE_TOOLCALL_H
#define ZSE_TOOLCALL_H

#include "grammar/grammar.h"
#include "util/util.h"

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum {
    ZSE_TOOL_HERMES = 1,
    ZSE_TOOL_LLAMA3,
    ZSE_TOOL_MISTRAL,
    ZSE_TOOL_JSON,
} zse_tool_format;

/* "hermes" (also "qwen", "qwen2.5", "qwen3"), "llama3" ("llama3_json", "llama"), "mistral",
 * "json"; -1 and an error listing the names for anything else (for --tool-parser NAME) */
int zse_tool_format_from_name(const char *name, zse_tool_format *out);
const char *zse_tool_format_name(zse_tool_format f);
/* from a chat template's text: the markers it writes; json when it shows none */
zse_tool_format zse_tool_format_detect(const char *chat_template);
/* texts of special tokens a grammar for this format must be able to produce (pass them to
 * zse_grammar_vocab_from_tokenizer's allow_special): NULL-terminated */
const char *const *zse_tool_format_special_texts(zse_tool_format f);

/* ---- complete outputs --------------------------------------------------------------- */
typedef struct {
    char *id;        /* "call_" + 24 hex digits; 9 letters/digits for mistral (its templates check) */
    char *name;
    char *arguments; /* JSON text */
} zse_tool_call;

typedef struct {
    char *content; /* the text outside calls, NULL when there is none but whitespace */
    zse_tool_call *calls;
    int n_calls;
} zse_tool_result;

/* id_seed makes the call ids (e.g. the request's id hashed): the same seed, the same ids */
int zse_tool_parse(zse_tool_format f, const char *text, size_t len, uint64_t id_seed, zse_tool_result *out);
void zse_tool_result_free(zse_tool_result *r);
/* OpenAI's tool_calls array: [{"id", "type": "function", "function": {"name", "arguments"}}] */
json_t *zse_tool_calls_json(const zse_tool_result *r);

/* ---- streaming ----------------------------------------------------------------------- */
typedef enum { ZSE_TOOL_DELTA_CONTENT, ZSE_TOOL_DELTA_CALL } zse_tool_delta_kind;

typedef struct {
    zse_tool_delta_kind kind;
    int index;      /* ZSE_TOOL_DELTA_CALL: the call's index (0, 1, ...) */
    char *id;       /* the first delta of a call carries id and name; later ones NULL */
    char *name;
    char *text;     /* content text, or a fragment of the call's arguments ("" allowed) */
} zse_tool_delta;

typedef struct {
    zse_tool_delta *d;
    int n, cap;
} zse_tool_deltas;

typedef struct zse_tool_stream zse_tool_stream;
zse_tool_stream *zse_tool_stream_new(zse_tool_format f, uint64_t id_seed);
void zse_tool_stream_free(zse_tool_stream *s);
/* a piece of generated text (any split, UTF-8 whole); appends the deltas it makes final:
 * text that may begin a call marker is held back until it is known */
int zse_tool_stream_push(zse_tool_stream *s, const char *piece, size_t len, zse_tool_deltas *out);
/* the end of generation: held-back text that never became a call is content */
int zse_tool_stream_finish(zse_tool_stream *s, zse_tool_deltas *out);
/* how many calls were started (finish_reason "tool_calls" when > 0) */
int zse_tool_stream_calls(const zse_tool_stream *s);
void zse_tool_deltas_clear(zse_tool_deltas *d); /* frees the deltas' strings, keeps the array */
void zse_tool_deltas_free(zse_tool_deltas *d);

/* ---- grammars for tool_choice --------------------------------------------------------- */
typedef struct {
    const char *name;
    const json_t *parameters; /* a JSON Schema; NULL: any object */
} zse_tool_def;

typedef enum {
    ZSE_TOOL_CHOICE_AUTO,     /* free text; once the model writes the call marker, a valid call */
    ZSE_TOOL_CHOICE_REQUIRED, /* one call (several with parallel) of any listed tool, nothing else */
    ZSE_TOOL_CHOICE_NAMED,    /* one call of the named tool */
} zse_tool_choice;

/* A grammar the output must match. Errors: an unknown named tool, a schema the grammar
 * compiler refuses (the message names the tool, keyword and path), "auto" for a format
 * without a marker (llama3, json: sample those without a grammar). */
zse_grammar *zse_tool_grammar(zse_tool_format f, const zse_tool_def *tools, int n_tools, zse_tool_choice choice,
                              const char *named, bool parallel, const zse_grammar_vocab *v);

/* ======================================================================================
 * Internal to src/toolcall: the scanners shared by both parsers.
 * ====================================================================================== */
typedef struct {
    size_t start, end;
} tc_span;

typedef struct {
    char *name;          /* decoded, NULL until the name string is complete */
    size_t args_start;   /* where the arguments value starts; 0 until seen */
    size_t args_end;     /* how far it is known (its end once complete) */
    bool args_done;      /* the arguments value is complete */
    bool complete;       /* the whole call is complete and valid */
    bool args_is_string; /* the model wrote the arguments as a JSON string */
} tc_call;

typedef struct {
    tc_span *content;
    int n_content, cap_content;
    tc_call *calls;
    int n_calls, cap_calls;
    size_t held; /* text from here on is undecided (streaming) */
} tc_scan;

/* scans text[0..len); final: no more text will come (undecided text becomes content) */
int tc_scan_text(zse_tool_format f, const char *text, size_t len, bool final, tc_scan *out);
void tc_scan_free(tc_scan *s);
char *tc_call_id(zse_tool_format f, uint64_t seed, int index);

#endif
