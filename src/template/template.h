/* template — chat templates: a Jinja2 interpreter that renders what transformers'
 * apply_chat_template renders, byte for byte.
 *
 * The environment is the one transformers builds: ImmutableSandboxedEnvironment with
 * trim_blocks, lstrip_blocks, the loopcontrols extension (break/continue), a `generation`
 * block tag that renders its body, `tojson` as Python's json.dumps (ensure_ascii=False),
 * and the globals raise_exception(msg) and strftime_now(fmt). Values come in as jansson
 * json_t and behave with Python semantics (truthiness, repr, int/float arithmetic);
 * undefined names behave like jinja2's default Undefined.
 *
 * A parsed template is read-only: many threads may render it at once. Each render keeps
 * its state (values, scopes) in its own arena and frees it before returning. Renders are
 * bounded: output size, loop iterations and recursion depth have caps that end the render
 * with an error instead of exhausting memory or hanging. */
#ifndef ZSE_TEMPLATE_H
#define ZSE_TEMPLATE_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <time.h>

#include "util/util.h"

typedef struct zse_template zse_template;

/* NULL + zse_fail("line L, column C: ...") on a syntax error */
zse_template *zse_template_parse(const char *src, size_t len);

/* Renders into out (appended). 0 on success; -1 with the message in zse_error_message():
 * raise_exception's text verbatim, or "L:C: " and jinja2's message for runtime errors
 * (e.g. "3:7: 'x' is undefined"). On error, out holds what it held before the call. */
int zse_template_render(const zse_template *t, const json_t *context, zse_buf *out);

void zse_template_free(zse_template *t);

/* The context transformers builds for apply_chat_template: messages, tools (when not NULL),
 * add_generation_prompt, bos_token, eos_token (when not NULL) and every key of extra
 * (which win over the others), then parses and renders template_src. */
int zse_chat_template_apply(const char *template_src, const json_t *messages, const json_t *tools,
                            bool add_generation_prompt, const char *bos_token,
                            const char *eos_token, const json_t *extra, zse_buf *out);

/* tokenizer_config.json's chat_template: a string, or a list of {name, template} of which
 * transformers takes "default". Heap string, or NULL with an error. */
char *zse_template_from_tokenizer_config(const json_t *tokenizer_config);

/* strftime_now() normally reads the local clock. Tests fix it: a time_t (seconds since
 * the epoch, rendered as UTC) or -1 to go back to the clock. Process-wide. */
void zse_template_set_fixed_time(time_t t);

/* Limits of one render (defaults: 64 MiB output, 2M loop iterations and macro calls, depth 200). */
#define ZSE_TEMPLATE_MAX_OUTPUT ((size_t)64 << 20)
#define ZSE_TEMPLATE_MAX_STEPS 2000000L
#define ZSE_TEMPLATE_MAX_DEPTH 200

#endif
