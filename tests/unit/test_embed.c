/* zse_embed against transformers (tests/fixtures/tiny-qwen2/embeddings.json, made by
 * tools/make_embedding_goldens.py): mean and last-token pooling of the final hidden state,
 * unit length, within 1e-4 of the golden at f32, for a text longer than one pass's rows;
 * bad input refused. */
#include "fixture.h"
#include "test.h"

#include "format/format.h"
#include "zse.h"

#include <math.h>
#include <unistd.h>

int main(void)
{
    char path[512], gold[512];
    test_fixture_path("tiny-qwen2/embeddings.json", gold, sizeof gold);
    if (test_convert_fixture("tiny-qwen2", "embed", path, sizeof path) != 0)
        return 1;
    json_error_t err;
    json_t *g = json_load_file(gold, 0, &err);
    CHECK_MSG(g != NULL, "%s: %s", gold, err.text);
    zse_load_params lp;
    zse_load_params_default(&lp);
    lp.device = "cpu";
    lp.threads = 2;
    lp.ctx_size = 512;
    zse_model *m = zse_model_load(path, &lp);
    CHECK(m != NULL);
    zse_model_info info;
    if (m)
        zse_model_get_info(m, &info);
    size_t i;
    json_t *c;
    int checked = 0;
    json_array_foreach(json_object_get(g, "cases"), i, c) {
        if (!m)
            break;
        json_t *jids = json_object_get(c, "ids");
        size_t n = json_array_size(jids);
        int32_t *ids = malloc(n * sizeof *ids);
        for (size_t k = 0; k < n; k++)
            ids[k] = (int32_t)json_integer_value(json_array_get(jids, k));
        /* the model's tokenizer gives the same ids */
        const char *text = json_string_value(json_object_get(c, "text"));
        int32_t *mine;
        size_t n_mine;
        CHECK(zse_tokenize(m, text, strlen(text), 0, &mine, &n_mine) == 0 && n_mine == n &&
              memcmp(mine, ids, n * sizeof *ids) == 0);
        zse_free(mine);
        float *out = malloc((size_t)info.hidden_size * sizeof *out);
        for (int p = 0; p < 2; p++) {
            const json_t *want = json_object_get(c, p ? "last" : "mean");
            CHECK(json_array_size(want) == (size_t)info.hidden_size);
            CHECK_MSG(zse_embed(m, ids, n, p ? ZSE_POOL_LAST : ZSE_POOL_MEAN, out) == 0, "%s", zse_last_error());
            double worst = 0, norm = 0;
            for (int k = 0; k < info.hidden_size; k++) {
                worst = fmax(worst, fabs(out[k] - json_real_value(json_array_get(want, (size_t)k))));
                norm += (double)out[k] * out[k];
            }
            CHECK_MSG(worst < 1e-4, "case %zu %s pooling: worst difference %.3g", i, p ? "last" : "mean", worst);
            CHECK_NEAR(norm, 1.0, 1e-5);
            checked++;
        }
        free(out);
        free(ids);
    }
    CHECK(checked >= 8);
    if (m) {
        float out[4096];
        int32_t bad = 1 << 30;
        CHECK(zse_embed(m, &bad, 1, ZSE_POOL_MEAN, out) == -1 && strstr(zse_last_error(), "vocabulary"));
        CHECK(zse_embed(m, &bad, 0, ZSE_POOL_MEAN, out) == -1 && strstr(zse_last_error(), "no tokens"));
        int32_t *longp = calloc(600, sizeof *longp);
        CHECK(zse_embed(m, longp, 600, ZSE_POOL_MEAN, out) == -1 && strstr(zse_last_error(), "context"));
        free(longp);
    }
    zse_model_free(m);
    json_decref(g);
    remove(path);
    return test_main_end();
}
