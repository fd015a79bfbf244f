/* A program outside the project that uses libzse through its public header only, built
 * against a staged install with `cc app.c $(pkg-config --cflags --libs zse)`
 * (tests/install/check_install.sh): load a model, tokenize, generate greedily, print. */
#include <zse.h>

#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: app MODEL.zse PROMPT\n");
        return 2;
    }
    zse_load_params lp;
    zse_load_params_default(&lp);
    lp.device = "cpu";
    lp.ctx_size = 256;
    zse_model *m = zse_model_load(argv[1], &lp);
    if (!m) {
        fprintf(stderr, "app: %s\n", zse_last_error());
        return 1;
    }
    zse_model_info info;
    zse_model_get_info(m, &info);
    int32_t *ids = NULL;
    size_t n = 0;
    if (zse_tokenize(m, argv[2], strlen(argv[2]), ZSE_TOK_ADD_SPECIAL, &ids, &n) != 0) {
        fprintf(stderr, "app: %s\n", zse_last_error());
        zse_model_free(m);
        return 1;
    }
    zse_sampling s;
    zse_sampling_default(&s);
    s.temperature = 0;
    s.max_tokens = 16;
    zse_seq *q = zse_seq_new(m, &s);
    int rc = q && zse_seq_feed(q, ids, n) == 0 ? 0 : 1;
    printf("zse %s, %s, %d layers, prompt %zu tokens:", zse_version(), info.arch, info.n_layers, n);
    zse_finish finish = ZSE_FINISH_NONE;
    while (rc == 0 && finish == ZSE_FINISH_NONE) {
        int32_t t;
        char *piece = NULL;
        rc = zse_seq_next(q, &t, &piece, &finish) == 0 ? 0 : 1;
        if (piece)
            fputs(piece, stdout);
        zse_free(piece);
    }
    printf("\n");
    if (rc != 0)
        fprintf(stderr, "app: %s\n", zse_last_error());
    zse_free(ids);
    zse_seq_free(q);
    zse_model_free(m);
    return rc;
}
