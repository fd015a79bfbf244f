/* libFuzzer target: arbitrary bytes as a chat template, parsed and rendered with a chat
 * context (messages with tool calls, tools). Must never crash, leak or hang: syntax errors,
 * runtime errors and the render limits all end in an error return. */
#include "template/template.h"

#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static json_t *ctx;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!ctx) {
        ctx = json_loads("{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"},"
                         " {\"role\": \"user\", \"content\": \"Gr\\u00fc\\u00dfe <b>&\\n\"},"
                         " {\"role\": \"assistant\", \"content\": \"\", \"tool_calls\": [{\"id\": \"c1\", \"type\": \"function\","
                         " \"function\": {\"name\": \"f\", \"arguments\": {\"x\": 1.5, \"y\": [true, null]}}}]},"
                         " {\"role\": \"tool\", \"content\": \"{}\"}],"
                         " \"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"f\", \"parameters\": {}}}],"
                         " \"add_generation_prompt\": true, \"bos_token\": \"<s>\", \"eos_token\": \"</s>\", \"n\": 3}",
                         0, NULL);
        if (!ctx)
            abort();
    }
    zse_template *t = zse_template_parse((const char *)data, size);
    if (!t)
        return 0;
    zse_buf out = {0};
    zse_template_render(t, ctx, &out);
    zse_buf_free(&out);
    zse_template_free(t);
    return 0;
}
