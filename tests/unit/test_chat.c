/* The public API end to end on the project's fixtures: convert, load, render the chat
 * goldens through the model's own template, tokenize them, and keep KV across turns. */
#include "test.h"

#include "format/format.h"
#include "zse.h"

#include <unistd.h>

static void check_fixture(const char *fixtures, const char *name)
{
    char dir[512], out[512], gpath[600];
    snprintf(dir, sizeof dir, "%s/%s", fixtures, name);
    snprintf(out, sizeof out, "/tmp/zse-test-chat-%d-%s.zse", (int)getpid(), name);
    snprintf(gpath, sizeof gpath, "%s/goldens.json", dir);
    zse_convert_opts o = {.scheme = ZSE_SCHEME_BF16, .embed_scheme = -1, .lm_head_scheme = -1, .force = true};
    CHECK_MSG(zse_convert(dir, out, &o) == 0, "%s", zse_last_error());
    zse_model *m = zse_model_load(out, NULL);
    CHECK_MSG(m != NULL, "%s", zse_last_error());
    json_error_t err;
    json_t *g = json_load_file(gpath, 0, &err);
    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(g, "chat"), i, c) {
        char *msgs = json_dumps(json_object_get(c, "messages"), JSON_COMPACT);
        char *extra = json_dumps(json_object_get(c, "template_kwargs"), JSON_COMPACT);
        char *r = m ? zse_chat_render(m, msgs, extra, true) : NULL;
        const char *want = json_string_value(json_object_get(c, "rendered"));
        CHECK_MSG(r && want && strcmp(r, want) == 0, "%s chat %zu rendered:\n%s", name, i, r ? r : zse_last_error());
        json_t *ids = json_object_get(c, "ids");
        if (r && ids) {
            int32_t *got;
            size_t n;
            CHECK(zse_tokenize(m, r, strlen(r), ZSE_TOK_PARSE_SPECIAL, &got, &n) == 0);
            bool same = n == json_array_size(ids);
            for (size_t k = 0; same && k < n; k++)
                same = got[k] == json_integer_value(json_array_get(ids, k));
            CHECK_MSG(same, "%s chat %zu ids", name, i);
            zse_free(got);
        }
        zse_free(r);
        free(msgs);
        free(extra);
    }
    json_decref(g);
    if (m) {
        /* a second turn reuses the first turn's KV: truncate keeps the prefix */
        zse_sampling s;
        zse_sampling_default(&s);
        s.temperature = 0;
        s.max_tokens = 4;
        zse_seq *q = zse_seq_new(m, &s);
        int32_t ids[6] = {10, 11, 12, 13, 14, 15};
        CHECK(zse_seq_feed(q, ids, 6) == 0);
        float first[8];
        memcpy(first, zse_seq_logits(q), sizeof first);
        CHECK(zse_seq_truncate(q, 3) == 0 && zse_seq_length(q) == 3);
        CHECK(zse_seq_feed(q, ids + 3, 3) == 0);
        CHECK(memcmp(first, zse_seq_logits(q), sizeof first) == 0);
        int steps = 0;
        zse_finish fin = ZSE_FINISH_NONE;
        while (fin == ZSE_FINISH_NONE && steps < 10) {
            int32_t t;
            char *piece;
            CHECK(zse_seq_next(q, &t, &piece, &fin) == 0);
            zse_free(piece);
            steps++;
        }
        CHECK(fin != ZSE_FINISH_NONE && steps <= 4);
        CHECK(zse_seq_truncate(q, 100) == -1);
        zse_seq_free(q);
        zse_model_free(m);
    }
    remove(out);
}

int main(void)
{
    const char *fixtures = test_env("ZSE_TEST_DATA");
    if (!fixtures)
        fixtures = "tests/fixtures";
    check_fixture(fixtures, "tiny-qwen2");
    check_fixture(fixtures, "tiny-llama");
    zse_model *bad = zse_model_load("/nonexistent.zse", NULL);
    CHECK(bad == NULL && strstr(zse_last_error(), "/nonexistent.zse") != NULL);
    return test_main_end();
}
