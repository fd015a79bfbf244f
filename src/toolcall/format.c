/* Tool-call formats: names (for --tool-parser), detection from a chat template, the
 * special tokens a format's grammar writes, call ids. */
#include "toolcall/toolcall.h"

#include <stdio.h>
#include <string.h>

static const struct {
    const char *name;
    zse_tool_format f;
} names[] = {
    {"hermes", ZSE_TOOL_HERMES}, {"qwen", ZSE_TOOL_HERMES}, {"qwen2.5", ZSE_TOOL_HERMES}, {"qwen3", ZSE_TOOL_HERMES},
    {"llama3", ZSE_TOOL_LLAMA3}, {"llama3_json", ZSE_TOOL_LLAMA3}, {"llama", ZSE_TOOL_LLAMA3},
    {"mistral", ZSE_TOOL_MISTRAL}, {"json", ZSE_TOOL_JSON},
};

int zse_tool_format_from_name(const char *name, zse_tool_format *out)
{
    for (size_t i = 0; name && i < sizeof names / sizeof *names; i++)
        if (!strcmp(name, names[i].name)) {
            *out = names[i].f;
            return 0;
        }
    return zse_fail("unknown tool parser '%s': use hermes (qwen, qwen2.5, qwen3), llama3 (llama3_json), mistral or json",
                    name ? name : "");
}

const char *zse_tool_format_name(zse_tool_format f)
{
    switch (f) {
    case ZSE_TOOL_HERMES: return "hermes";
    case ZSE_TOOL_LLAMA3: return "llama3";
    case ZSE_TOOL_MISTRAL: return "mistral";
    case ZSE_TOOL_JSON: return "json";
    }
    return "json";
}

zse_tool_format zse_tool_format_detect(const char *t)
{
    if (!t)
        return ZSE_TOOL_JSON;
    if (strstr(t, "<tool_call>"))
        return ZSE_TOOL_HERMES;
    if (strstr(t, "[TOOL_CALLS]"))
        return ZSE_TOOL_MISTRAL;
    if (strstr(t, "<|python_tag|>") || (strstr(t, "<|start_header_id|>") && strstr(t, "\"parameters\"")))
        return ZSE_TOOL_LLAMA3;
    return ZSE_TOOL_JSON;
}

const char *const *zse_tool_format_special_texts(zse_tool_format f)
{
    static const char *const hermes[] = {"<tool_call>", "</tool_call>", NULL};
    static const char *const mistral[] = {"[TOOL_CALLS]", "[ARGS]", NULL};
    static const char *const none[] = {NULL};
    return f == ZSE_TOOL_HERMES ? hermes : f == ZSE_TOOL_MISTRAL ? mistral : none;
}

static uint64_t mix(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

char *tc_call_id(zse_tool_format f, uint64_t seed, int index)
{
    uint64_t a = mix(seed ^ mix((uint64_t)index + 1)), b = mix(a);
    char buf[40];
    if (f == ZSE_TOOL_MISTRAL) { /* Mistral's templates require 9 letters or digits */
        static const char alnum[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        for (int i = 0; i < 9; i++) {
            buf[i] = alnum[a % 62];
            a /= 62;
        }
        buf[9] = 0;
    } else {
        snprintf(buf, sizeof buf, "call_%016llx%08llx", (unsigned long long)a, (unsigned long long)(b >> 32));
    }
    return zse_strdup(buf);
}
